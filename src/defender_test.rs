//! `shuttle defender-test` (docs/design.md §6): proves that the installed Microsoft Defender
//! still detects EICAR and still prints a clean result Shuttle recognises, and
//! records the outcome for its version in the ledger (see [`crate::ledger`]), which
//! `run` and `check` consult before they use Defender.
//!
//! Meant to run after every Defender update (e.g. daily from cron). Exit 0 pass,
//! 1 fail (recorded as `fail`), 2 configuration error.
//!
//! It logs like a run (stderr and a file in `log_path`), mails a failure as an error
//! notification and a pass only with `notify_summary`, and needs only the Defender,
//! ledger, logging and notification keys: a config describing just Defender is enough.

use std::fs::File;
use std::path::Path;

use crate::config::{self, CommandLine};
use crate::ledger::{Ledger, TestRecord};
use crate::notify::{self, Notifier};
use crate::scan::defender::Defender;
use crate::scan::{self, Scanner, Verdict};
use crate::states::ExitCode;

const CLEAN_TEXT: &[u8] =
    b"Shuttle defender-test: an ordinary text file that no scanner should flag.\n";

/// Runs the test; returns the process exit code.
pub fn main(cli: &CommandLine) -> ExitCode {
    let loaded = match config::load_for(cli, config::Needs::KeysOnly) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    let mut cfg = loaded.config;
    let _log = match crate::logging::start(&cfg, &loaded.warnings) {
        Ok(g) => g,
        Err(line) => {
            eprintln!("{line}");
            return ExitCode::Usage;
        }
    };
    notify::off_when_unusable(&mut cfg.notifications);
    let cfg = &cfg;
    tracing::info!(
        "defender-test: testing {:?} with an EICAR file and a clean file",
        cfg.scanning.mdatp_command
    );
    let notifier = Notifier::new(&cfg.notifications);
    let defender = Defender::new(&cfg.scanning.mdatp_command);
    let policy = scan::Policy::from_config(&cfg.scanning);

    let version = match defender.product_version() {
        Ok(v) => v,
        Err(e) => {
            let msg = format!(
                "Microsoft Defender test FAILED: cannot get the version of {:?}: {e}; nothing recorded",
                cfg.scanning.mdatp_command
            );
            println!("{msg}");
            tracing::error!("{msg}");
            notifier.send(notify::Kind::Error, "Shuttle: Defender test failed", &msg);
            return ExitCode::Failed;
        }
    };
    let (passed, details) = match run_test(&defender, &policy) {
        Ok(r) => r,
        Err(e) => (false, format!("test could not run: {e}")),
    };
    let result = if passed { "pass" } else { "fail" };
    let mut summary = format!("Microsoft Defender {version}: test {result}: {details}");

    match &cfg.ledger_file_path {
        None => summary.push_str("\n(ledger_file_path is not set: result not recorded)"),
        Some(path) => match record(path, &version, result, &details) {
            Ok(()) => summary.push_str(&format!("\nrecorded in {}", path.display())),
            Err((code, e)) => {
                let msg = format!("{summary}\nnot recorded: {e}");
                println!("{msg}");
                tracing::error!("{}", msg.replace('\n', "; "));
                notifier.send(
                    notify::Kind::Error,
                    "Shuttle: Defender test not recorded",
                    &msg,
                );
                return code;
            }
        },
    }
    println!("{summary}");
    let line = summary.replace('\n', "; ");
    if passed {
        tracing::info!("{line}");
        if cfg.notifications.notify_summary {
            notifier.send(
                notify::Kind::Summary,
                &format!("Shuttle: Defender {version} test passed"),
                &summary,
            );
        }
        ExitCode::Ok
    } else {
        tracing::error!("{line}");
        notifier.send(
            notify::Kind::Error,
            &format!("Shuttle: Defender {version} test FAILED"),
            &summary,
        );
        ExitCode::Failed
    }
}

/// Scans a fresh EICAR file and a fresh clean file in a new temporary directory.
/// Passes only if EICAR is a detection and the clean file is clean.
fn run_test(defender: &Defender, policy: &scan::Policy) -> std::io::Result<(bool, String)> {
    let dir = tempfile::Builder::new()
        .prefix("shuttle-defender-test.")
        .tempdir()?;
    let eicar_path = dir.path().join("eicar.com");
    let clean_path = dir.path().join("clean.txt");
    std::fs::write(&eicar_path, scan::eicar())?;
    std::fs::write(&clean_path, CLEAN_TEXT)?;

    let eicar = scan_one(defender, policy, &eicar_path)?;
    let clean = scan_one(defender, policy, &clean_path)?;
    let eicar_ok = matches!(eicar, Ok(Verdict::Suspect(_)));
    let clean_ok = matches!(clean, Ok(Verdict::Clean));
    let describe = |r: &Result<Verdict, scan::ScanError>| match r {
        Ok(Verdict::Clean) => "clean".to_string(),
        Ok(Verdict::Suspect(names)) => format!("detected ({})", names.join(", ")),
        Err(e) => format!("error ({e})"),
    };
    let details = format!(
        "EICAR file: {} [{}]; clean file: {} [{}]",
        describe(&eicar),
        if eicar_ok {
            "ok"
        } else {
            "expected a detection"
        },
        describe(&clean),
        if clean_ok { "ok" } else { "expected clean" },
    );
    Ok((eicar_ok && clean_ok, details))
}

fn scan_one(
    defender: &Defender,
    policy: &scan::Policy,
    path: &Path,
) -> std::io::Result<Result<Verdict, scan::ScanError>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    Ok(defender.scan(&file, path, size, policy.timeout_for(size)))
}

/// Records one result. An existing ledger that cannot be read or parsed is never
/// overwritten: that is a configuration problem (exit 2); a failed write is exit 1.
fn record(
    path: &Path,
    version: &str,
    result: &str,
    details: &str,
) -> Result<(), (ExitCode, String)> {
    let mut ledger = Ledger::load_or_empty(path).map_err(|e| (ExitCode::Usage, e.to_string()))?;
    ledger
        .upsert(&TestRecord {
            version: version.to_string(),
            test_time: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            test_result: result.to_string(),
            test_details: details.to_string(),
        })
        .map_err(|e| (ExitCode::Usage, e.to_string()))?;
    ledger.save().map_err(|e| (ExitCode::Failed, e.to_string()))
}
