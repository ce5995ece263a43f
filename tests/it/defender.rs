//! Microsoft Defender scanning, the tested-version ledger and `shuttle defender-test`,
//! driven through the CLI against `tests/fixtures/mdatp-sim` (which prints what
//! `mdatp` prints) and, where both engines are on, the real private clamd.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::common::*;

const VERSION: &str = "101.24092.0002";

/// As the earlier Python implementation (PyYAML, `sort_keys=False`) wrote it, plus a
/// key Shuttle does not know.
const PYTHON_LEDGER: &str = "defender:\n  tested_versions:\n  - version: 101.24092.0002\n    test_time: '2024-11-02T09:15:27.483920'\n    test_result: pass\n    test_details: All tests passed\n  - version: 101.24082.0004\n    test_time: '2024-10-01T08:00:00.000001'\n    test_result: fail\n    test_details: 'EICAR detected: False'\nsite: lab-3\n";

fn sim() -> PathBuf {
    repo().join("tests/fixtures/mdatp-sim")
}

/// An installation with Defender (the simulator) on and, with `clamav`, ClamAV too.
fn env(clamav: bool) -> Env {
    let mut env = Env::new();
    env.set("on_demand_defender", "true")
        .set("on_demand_clam_av", if clamav { "true" } else { "false" })
        .set("mdatp_command", &sim().display().to_string())
        .set("malware_scan_timeout_seconds", "10")
        .set("malware_scan_retry_wait_seconds", "0");
    env
}

/// `shuttle ARGS…` with extra environment variables (for the simulator).
fn shuttle_with(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Run {
    let mut c = env.command(args);
    for (k, v) in vars {
        c.env(k, v);
    }
    Run::from(c.output().unwrap())
}

fn run_with(env: &Env, vars: &[(&str, &str)]) -> Run {
    let (config, report) = (
        env.config.display().to_string(),
        env.report.display().to_string(),
    );
    shuttle_with(
        env,
        vars,
        &["run", "--config", &config, "--report-json", &report],
    )
}

fn check_with(env: &Env, vars: &[(&str, &str)]) -> Run {
    let config = env.config.display().to_string();
    shuttle_with(env, vars, &["check", "--config", &config])
}

fn defender_test(env: &Env, vars: &[(&str, &str)]) -> Run {
    let config = env.config.display().to_string();
    shuttle_with(env, vars, &["defender-test", "--config", &config])
}

/// The report's entry for one file.
fn entry(rep: &serde_json::Value, path: &str) -> serde_json::Value {
    rep["file_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in report: {rep:#}"))
        .clone()
}

/// What each engine said about `path`: `[(scanner, result)]`.
fn said(rep: &serde_json::Value, path: &str) -> Vec<(String, String)> {
    entry(rep, path)["scanners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["scanner"].as_str().unwrap().to_string(),
                s["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn names(dir: &Path) -> Vec<String> {
    Env::tree(dir).into_keys().collect()
}

#[test]
fn defender_alone_delivers_clean_files_and_stops_threats() {
    let env = env(false);
    env.drop_file("ok.txt", b"fine");
    env.drop_file("in/eicar.com", EICAR);
    env.drop_file("marker.txt", MARKER);
    env.drop_file("slow.txt", b"SIM:DELAY\n");
    let r = run_with(&env, &[("MDATP_SIM_DELAY", "0.5")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        names(&env.dst),
        ["ok.txt", "slow.txt"],
        "a slow scan within the timeout is fine"
    );
    assert!(
        Env::tree(&env.src).is_empty(),
        "sources handled and removed"
    );
    assert!(Env::tree(&env.quarantine).is_empty());
    let rep = env.report();
    assert_eq!(rep["files"]["clean"], 2);
    assert_eq!(rep["files"]["suspect"], 2);
    assert_eq!(said(&rep, "ok.txt"), [pair("defender", "clean")]);
    assert_eq!(said(&rep, "in/eicar.com"), [pair("defender", "suspect")]);
    assert_eq!(
        entry(&rep, "in/eicar.com")["detections"],
        serde_json::json!(["Virus:DOS/EICAR_Test_File"])
    );
    assert_eq!(rep["scanners"][0]["scanner"], "defender");
    assert_eq!(rep["scanners"][0]["version"], VERSION);
}

#[test]
fn both_engines_clean_only_if_both_say_clean_and_each_verdict_is_recorded() {
    let env = env(true);
    env.drop_file("ok.txt", b"fine");
    env.drop_file("eicar.com", EICAR);
    env.drop_file("defender-only.txt", b"SIM:FLAG\n");
    env.drop_file(
        "clamav-only.txt",
        b"SIM:MISS\n... SHUTTLE-TEST-MARKER ...\n",
    );
    env.drop_file("defender-broke.txt", b"SIM:CRASH\n");
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 1, "a failed file: exit 1\n{}", r.stderr);
    assert_eq!(names(&env.dst), ["ok.txt"]);
    assert_eq!(
        names(&env.src),
        ["defender-broke.txt"],
        "only the failed file's source stays"
    );
    let rep = env.report();
    assert_eq!(
        said(&rep, "ok.txt"),
        [pair("clamav", "clean"), pair("defender", "clean")]
    );
    assert_eq!(
        said(&rep, "eicar.com"),
        [pair("clamav", "suspect"), pair("defender", "suspect")]
    );
    assert_eq!(
        said(&rep, "defender-only.txt"),
        [pair("clamav", "clean"), pair("defender", "suspect")]
    );
    assert_eq!(entry(&rep, "defender-only.txt")["outcome"], "suspect");
    assert_eq!(
        said(&rep, "clamav-only.txt"),
        [pair("clamav", "suspect"), pair("defender", "clean")]
    );
    assert_eq!(entry(&rep, "clamav-only.txt")["outcome"], "suspect");
    assert_eq!(
        said(&rep, "defender-broke.txt"),
        [pair("clamav", "clean"), pair("defender", "failed")]
    );
    assert_eq!(entry(&rep, "defender-broke.txt")["outcome"], "failed");

    // The journal records the same per-engine verdicts.
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let results: String = db
        .query_row(
            "SELECT scan_results FROM files WHERE rel_path = 'defender-only.txt'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&results).unwrap();
    assert_eq!(v[0]["scanner"], "clamav");
    assert_eq!(v[0]["result"], "clean");
    assert_eq!(v[1]["scanner"], "defender");
    assert_eq!(v[1]["result"], "suspect");
    assert_eq!(v[1]["detections"][0], "Trojan:Script/SimOnlyDefender");
}

#[test]
fn anything_not_clearly_clean_fails_and_keeps_the_source() {
    let mut env = env(false);
    env.set("max_scan_threads", "3");
    let cases: [(&str, &[u8], &str); 6] = [
        ("not-found.txt", b"SIM:NOTFOUND\n", "0 file(s) scanned"),
        ("exit-3.txt", b"SIM:EXIT\n", "exited with status 3"),
        ("garbage.txt", b"SIM:GARBAGE\n", "not recognised"),
        ("empty.txt", b"SIM:EMPTY\n", "no output"),
        ("crash.txt", b"SIM:CRASH\n", "killed by signal 11"),
        // The name holds the clean text and mdatp prints it last: still not clean.
        (
            "x 1 file(s) scanned 0 threat(s) detected",
            b"SIM:ECHO-NAME\n",
            "not recognised",
        ),
    ];
    for (name, content, _) in &cases {
        env.drop_file(name, content);
    }
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty(), "nothing delivered");
    assert!(Env::tree(&env.quarantine).is_empty(), "copies removed");
    let src = Env::tree(&env.src);
    let rep = env.report();
    assert_eq!(rep["files"]["failed"], 6);
    for (name, content, why) in &cases {
        assert_eq!(src.get(*name).map(Vec::as_slice), Some(*content), "{name}");
        let e = entry(&rep, name);
        assert_eq!(e["outcome"], "failed", "{name}");
        let err = e["error"].as_str().unwrap();
        assert!(err.contains(why), "{name}: {err}");
        assert_eq!(said(&rep, name), [pair("defender", "failed")]);
    }
}

/// Processes whose process group is one of `pgids` (the simulator leads its group).
fn processes_in_groups(pgids: &BTreeSet<i32>) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp …; comm may hold spaces: split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let pgrp: i32 = rest
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pgids.contains(&pgrp) {
            found.push(stat);
        }
    }
    found
}

#[test]
fn hung_mdatp_times_out_retries_then_the_circuit_breaker_stops_the_run_leaving_no_orphans() {
    let mut env = env(false);
    env.set("malware_scan_timeout_seconds", "1")
        .set("malware_scan_retry_count", "2")
        .set("max_scan_threads", "1");
    let hang = env.drop_file("a-hang.txt", b"SIM:HANG\n");
    age(&hang, 600); // oldest: admitted first
    for i in 0..3 {
        env.drop_file(&format!("later-{i}.txt"), format!("file {i}").as_bytes());
    }
    let before = Env::tree(&env.src);
    let log = env.root().join("sim.log");
    let started = std::time::Instant::now();
    let r = run_with(&env, &[("MDATP_SIM_LOG", log.to_str().unwrap())]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    assert_eq!(Env::tree(&env.src), before, "every source untouched");
    assert!(Env::tree(&env.dst).is_empty());
    assert!(Env::tree(&env.quarantine).is_empty());
    let rep = env.report();
    assert_eq!(rep["files"]["failed"], 1);
    assert_eq!(rep["files"]["deferred"], 3);
    assert!(
        rep["errors"].to_string().contains("circuit breaker"),
        "{rep:#}"
    );
    assert!(
        entry(&rep, "a-hang.txt")["error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );

    let invocations = std::fs::read_to_string(&log).unwrap();
    let hang_scans = invocations
        .lines()
        .filter(|l| l.contains("a-hang.txt"))
        .count();
    assert_eq!(hang_scans, 2, "one scan and one retry:\n{invocations}");
    let mut pgids = BTreeSet::new();
    for line in invocations.lines() {
        let mut f = line.split_whitespace();
        let (pid, pgid): (i32, i32) = (
            f.next().unwrap().parse().unwrap(),
            f.next().unwrap().parse().unwrap(),
        );
        assert_eq!(pid, pgid, "mdatp runs as the leader of its own group");
        pgids.insert(pgid);
    }
    let left = processes_in_groups(&pgids);
    assert!(left.is_empty(), "orphans of mdatp left behind: {left:?}");
}

#[test]
fn defender_removing_a_threat_itself_with_defender_handles_suspect_files() {
    let mut env = env(false);
    env.set("defender_handles_suspect_files", "true");
    env.drop_file("eicar.com", EICAR);
    env.drop_file("ok.txt", b"fine");
    let r = run_with(&env, &[("MDATP_SIM_MODE", "delete")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(names(&env.dst), ["ok.txt"]);
    assert!(
        Env::tree(&env.src).is_empty(),
        "the source, verified to hold the scanned bytes, is the suspect copy and goes"
    );
    assert!(Env::tree(&env.quarantine).is_empty());
    let rep = env.report();
    let e = entry(&rep, "eicar.com");
    assert_eq!(e["outcome"], "suspect");
    assert_eq!(e["scanners"][0]["removed_file"], true);
    assert!(env.log_text().contains("removed by defender itself"));
}

#[test]
fn defender_removing_a_threat_without_the_setting_keeps_the_source() {
    let mut env = env(false);
    // On by default (as in the earlier implementation): turned off here.
    env.set("defender_handles_suspect_files", "false");
    env.drop_file("eicar.com", EICAR);
    let r = run_with(&env, &[("MDATP_SIM_MODE", "delete")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty(), "never delivered");
    assert_eq!(
        Env::tree(&env.src).get("eicar.com").map(Vec::as_slice),
        Some(EICAR),
        "source kept: Shuttle could not dispose of the suspect copy itself"
    );
    let rep = env.report();
    assert_eq!(entry(&rep, "eicar.com")["outcome"], "suspect");
    assert!(
        rep["sources_kept"]
            .to_string()
            .contains("defender_handles_suspect_files is off"),
        "{rep:#}"
    );
}

#[test]
fn with_the_setting_a_threat_defender_leaves_is_handled_by_shuttle() {
    let mut env = env(false);
    env.set("defender_handles_suspect_files", "true");
    env.drop_file("eicar.com", EICAR);
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    assert!(Env::tree(&env.src).is_empty());
    assert!(
        Env::tree(&env.quarantine).is_empty(),
        "Shuttle deleted its copy"
    );
    let rep = env.report();
    let e = entry(&rep, "eicar.com");
    assert_eq!(e["outcome"], "suspect");
    assert!(e["scanners"][0].get("removed_file").is_none(), "{e:#}");
}

#[test]
fn ledger_gate_admits_only_versions_recorded_as_passed() {
    let mut env = env(false);
    let ledger = env.root().join("ledger.yaml");
    env.set("ledger_file_path", &ledger.display().to_string());
    env.drop_file("ok.txt", b"fine");
    let src = Env::tree(&env.src);

    // Missing ledger: refused, naming the file and the installed version.
    for r in [run_with(&env, &[]), check_with(&env, &[])] {
        assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
        let out = format!("{}{}", r.stdout, r.stderr);
        assert!(
            out.contains(VERSION) && out.contains("ledger.yaml"),
            "{out}"
        );
    }
    // Garbled.
    std::fs::write(&ledger, "defender: [unclosed\n").unwrap();
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not valid YAML"), "{}", r.stderr);

    // Python-era ledger: a listed fail, an unlisted version, a listed pass.
    std::fs::write(&ledger, PYTHON_LEDGER).unwrap();
    let failed = [("MDATP_SIM_VERSION", "101.24082.0004")];
    for r in [run_with(&env, &failed), check_with(&env, &failed)] {
        assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
        let out = format!("{}{}", r.stdout, r.stderr);
        assert!(
            out.contains("101.24082.0004") && out.contains("failed its test"),
            "{out}"
        );
    }
    let unlisted = [("MDATP_SIM_VERSION", "101.99999.0001")];
    for r in [run_with(&env, &unlisted), check_with(&env, &unlisted)] {
        assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
        let out = format!("{}{}", r.stdout, r.stderr);
        assert!(
            out.contains("101.99999.0001") && out.contains("not recorded as tested"),
            "{out}"
        );
    }
    assert_eq!(Env::tree(&env.src), src, "nothing touched while refused");
    assert!(Env::tree(&env.dst).is_empty());

    let r = check_with(&env, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(names(&env.dst), ["ok.txt"]);
}

#[test]
fn defender_test_records_pass_and_fail_keeping_earlier_entries() {
    let mut env = env(false);
    let ledger = env.root().join("ledger.yaml");
    env.set("ledger_file_path", &ledger.display().to_string());
    std::fs::write(&ledger, PYTHON_LEDGER).unwrap();

    // A new version that passes: appended; notification of kind summary.
    env.set("notify", "true")
        .set("notify_summary", "true")
        .set("smtp_server", "127.0.0.1")
        .set("sender_email", "shuttle@example.org")
        .set("recipient_email", "admin@example.org");
    let new = [("MDATP_SIM_VERSION", "101.25010.0001")];
    let r = defender_test(&env, &new);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("test pass"), "{}", r.stdout);
    assert!(r.stderr.contains("summary notification"), "{}", r.stderr);

    // A version whose engine detects nothing: fail, recorded; error notification.
    let broken = [
        ("MDATP_SIM_VERSION", "101.25020.0001"),
        ("MDATP_SIM_MODE", "clean"),
    ];
    let r = defender_test(&env, &broken);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("expected a detection"), "{}", r.stdout);
    assert!(r.stderr.contains("error notification"), "{}", r.stderr);

    let text = std::fs::read_to_string(&ledger).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(doc["site"], "lab-3", "other keys kept:\n{text}");
    let list = doc["defender"]["tested_versions"].as_sequence().unwrap();
    let got: Vec<(String, String)> = list
        .iter()
        .map(|e| {
            (
                e["version"].as_str().unwrap().to_string(),
                e["test_result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            pair("101.24092.0002", "pass"),
            pair("101.24082.0004", "fail"),
            pair("101.25010.0001", "pass"),
            pair("101.25020.0001", "fail"),
        ]
    );
    for e in &list[2..] {
        assert!(!e["test_time"].as_str().unwrap().is_empty());
        assert!(e["test_details"].as_str().unwrap().contains("EICAR"));
    }
    let leftovers: Vec<_> = std::fs::read_dir(env.root())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".shuttle-ledger."))
        .collect();
    assert!(leftovers.is_empty(), "no temp file left");

    // The gate now follows the ledger: the passed version runs, the failed one not.
    env.unset("notify");
    assert_eq!(run_with(&env, &new).code, 0);
    let r = run_with(&env, &broken);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("101.25020.0001"), "{}", r.stderr);
}

#[test]
fn a_defender_that_misses_the_canary_stops_the_run_before_any_file() {
    for clamav in [false, true] {
        let env = env(clamav);
        env.drop_file("ok.txt", b"fine");
        env.drop_file("eicar.com", EICAR);
        let src = Env::tree(&env.src);
        let r = run_with(&env, &[("MDATP_SIM_MODE", "clean")]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("defender: canary failed"),
            "the engine is named: {}",
            r.stderr
        );
        assert_eq!(Env::tree(&env.src), src, "nothing touched");
        assert!(Env::tree(&env.dst).is_empty());
        assert!(Env::tree(&env.quarantine).is_empty());
        assert_eq!(env.report()["files"]["admitted"], 0);
    }
}

#[test]
fn check_reports_defender_and_its_canary() {
    let env = env(true);
    let r = check_with(&env, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!(
            "scanner defender answers: {VERSION}, canary detected"
        )),
        "{}",
        r.stdout
    );
    let r = check_with(&env, &[("MDATP_SIM_MODE", "noversion")]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stdout.contains("defender"), "{}", r.stdout);
}

/// A stand-in clamd on 127.0.0.1 that answers VERSION and calls every INSTREAM
/// clean: an engine without signatures.
fn blind_clamd() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut cmd = Vec::new();
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && b[0] != 0 {
                cmd.push(b[0]);
            }
            if cmd == b"zINSTREAM" {
                let mut len = [0u8; 4];
                while c.read_exact(&mut len).is_ok() {
                    let n = u32::from_be_bytes(len) as usize;
                    if n == 0 {
                        break;
                    }
                    let mut chunk = vec![0u8; n];
                    if c.read_exact(&mut chunk).is_err() {
                        break;
                    }
                }
                let _ = c.write_all(b"stream: OK\0");
            } else {
                let _ = c.write_all(b"ClamAV 1.0.0/1/Thu Jan  1 00:00:00 2026\0");
            }
        }
    });
    addr
}

#[test]
fn a_clamav_that_misses_the_canary_stops_the_run_too() {
    let mut env = env(true);
    env.unset("clamd_socket")
        .set("clamd_address", &blind_clamd());
    env.drop_file("ok.txt", b"fine");
    let src = Env::tree(&env.src);
    let r = run_with(&env, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("clamav: canary failed"), "{}", r.stderr);
    assert_eq!(Env::tree(&env.src), src, "nothing touched");
    assert!(Env::tree(&env.dst).is_empty());
}

#[test]
fn a_threat_defender_removed_itself_is_archived_from_the_verified_source() {
    let mut env = env(false);
    let (home, key) = gpg_key(env.root(), "default");
    let archive = env.root().join("hazard");
    std::fs::create_dir_all(&archive).unwrap();
    env.set("defender_handles_suspect_files", "true")
        .set("hazard_archive_path", archive.to_str().unwrap())
        .set("hazard_encryption_key_path", key.to_str().unwrap());
    env.drop_file("lab/eicar.com", EICAR);
    env.drop_file("ok.txt", b"fine");
    let r = run_with(&env, &[("MDATP_SIM_MODE", "delete")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(names(&env.dst), ["ok.txt"]);
    assert!(
        Env::tree(&env.src).is_empty(),
        "source archived, then removed"
    );
    let gpgs: Vec<PathBuf> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gpg"))
        .collect();
    assert_eq!(gpgs.len(), 1, "{gpgs:?}");
    let out = std::process::Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--quiet", "--decrypt"])
        .arg(&gpgs[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout, EICAR,
        "the archive holds the scanned bytes, taken from the source"
    );
    assert!(
        env.log_text()
            .contains("from the source (defender removed the quarantine copy itself)"),
        "{}",
        env.log_text()
    );
}
