//! Property-based fuzzing of everything Shuttle parses from the outside world: the
//! config file, clamd's replies, mdatp's output. No panic, and above all no input
//! that is not clearly clean ever parses as clean. Bounded: PROPTEST_CASES (default
//! 2,000 per property) keeps the CI time fixed.

use std::io::Write;

use proptest::prelude::*;
use shuttle::config::{self, CommandLine, ini};
use shuttle::scan::Verdict;
use shuttle::scan::clamav::parse_reply;
use shuttle::scan::defender::parse_scan;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// Text that looks like INI: sections, keys from the real table, junk, comments.
fn ini_like() -> impl Strategy<Value = String> {
    let key = prop::sample::select(
        config::keys::KEYS
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>(),
    );
    let line = prop_oneof![
        "\\[[a-z]{0,12}\\]?".prop_map(|s| s),
        (key, "[ -~\t]{0,30}").prop_map(|(k, v)| format!("{k} = {v}")),
        "[ -~\t]{0,60}",
        "[#;][ -~]{0,40}",
        any::<String>(),
    ];
    prop::collection::vec(line, 0..30).prop_map(|l| l.join("\n"))
}

/// Lines in clamd's reply shapes, with hostile variations.
fn clamd_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("fd[5]: OK".to_string()),
        "fd\\[[0-9]{1,3}\\]: [A-Za-z.\\-]{0,20} FOUND",
        "[ -~]{0,40} ERROR",
        "stream: OK",
        "[ -~]{0,60}",
        any::<String>(),
    ];
    (
        prop::collection::vec(line, 0..5),
        prop::sample::select(vec!["\0", "\n", "\0\n", ""]),
    )
        .prop_map(|(l, sep)| l.join(sep))
}

/// mdatp-shaped output, including file names that contain the clean text.
fn mdatp_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("Scan has started".to_string()),
        Just("\t1 file(s) scanned".to_string()),
        Just("\t0 file(s) scanned".to_string()),
        Just("\t0 threat(s) detected".to_string()),
        Just("\t1 threat(s) detected".to_string()),
        Just("Threat(s) found".to_string()),
        "\t/[ -~]{0,30}: [A-Za-z:/_]{0,25}",
        "[ -~\t]{0,60}",
        any::<String>(),
    ];
    prop::collection::vec(line, 0..8).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ini_parser_never_panics(text in ini_like()) {
        let _ = ini::parse(&text);
    }

    #[test]
    fn config_loading_never_panics_and_errors_name_a_key_or_line(text in ini_like()) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        match config::load(&CommandLine { config_file: Some(f.path().to_path_buf()), flags: vec![] }) {
            Ok(_) => {}
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    let msg = e.to_string();
                    prop_assert!(!msg.is_empty() && !msg.contains('\n'), "one line per problem: {msg:?}");
                }
            }
        }
    }

    #[test]
    fn clamd_replies_are_clean_only_when_every_line_says_ok(reply in clamd_like()) {
        if let Ok(Verdict::Clean) = parse_reply(&reply) {
            let lines: Vec<&str> = reply.split(['\0', '\n']).map(str::trim).filter(|l| !l.is_empty()).collect();
            prop_assert!(!lines.is_empty());
            prop_assert!(lines.iter().all(|l| l.ends_with(": OK")), "clean from {reply:?}");
        }
    }

    #[test]
    fn mdatp_output_is_clean_only_when_it_ends_with_one_file_and_no_threat(out in mdatp_like(), code in prop::option::of(-2i32..4)) {
        if let Ok(Verdict::Clean) = parse_scan(&out, code) {
            prop_assert_eq!(code, Some(0));
            prop_assert!(!out.contains("Threat(s) found"), "clean although threats: {out:?}");
            prop_assert!(out.trim_end().ends_with("\t1 file(s) scanned\n\t0 threat(s) detected"), "clean from {out:?}");
        }
    }

    #[test]
    fn a_file_name_holding_the_clean_text_never_makes_a_threat_clean(name in "[ -~]{0,20}") {
        let out = format!(
            "Scan has started\nThreat(s) found\n\t/q/{name}\n\t1 file(s) scanned\n\t0 threat(s) detected: Virus:DOS/EICAR\n\t1 file(s) scanned\n\t1 threat(s) detected"
        );
        prop_assert!(!matches!(parse_scan(&out, Some(0)), Ok(Verdict::Clean)));
    }
}
