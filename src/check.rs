//! `shuttle check` (docs/design.md §6): validate configuration, directories, scanners and
//! keys without touching a file; print every problem; exit 0 or 2.

use std::path::Path;

use crate::config::{self, CommandLine};
use crate::hazard::{self, HazardArchive, HazardError};
use crate::scan::{self, Scanners};

/// Runs the checks, printing to stdout. Returns the exit code.
pub fn check(cli: &CommandLine) -> i32 {
    let loaded = match config::load(cli) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors.0 {
                println!("problem: {e}");
            }
            println!("shuttle check: {} problem(s) found", errors.0.len());
            return 2;
        }
    };
    let cfg = &loaded.config;
    for w in &loaded.warnings {
        println!("warning: {w}");
    }
    match &cfg.file {
        Some(f) => println!("ok: config file {}", f.display()),
        None => println!("ok: no config file; flags and defaults only"),
    }
    let mut problems = cfg.check_paths();
    // A run goes on without mail in these cases; `check` says so loudly.
    problems.extend(cfg.notifications.problems());
    if problems.is_empty() {
        println!(
            "ok: source {}, quarantine {}, destination {}",
            cfg.source_path.display(),
            cfg.quarantine_path.display(),
            cfg.destination_path.display()
        );
    }
    if let Some(parent) = cfg.lock_path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
        && cfg.lock_path != Path::new(crate::config::DEFAULT_LOCK_PATH)
    {
        problems.push(format!(
            "lock_path {}: directory {} does not exist",
            cfg.lock_path.display(),
            parent.display()
        ));
    }
    match HazardArchive::open(cfg) {
        Ok(Some(h)) => println!(
            "ok: hazard archive {}: {}",
            h.dir().display(),
            h.recipient().describe()
        ),
        // check_paths already reported an archive without a key.
        Err(HazardError::NoKey) => {}
        Err(e) => problems.push(e.to_string()),
        Ok(None) => {
            // A key without an archive is unused, but a broken one is still worth
            // knowing about before someone sets hazard_archive_path.
            if let Some(key) = &cfg.hazard_encryption_key_path {
                match hazard::key::load(key, std::time::SystemTime::now()) {
                    Ok(r) => println!(
                        "ok: hazard_encryption_key_path {} (unused: no hazard_archive_path): {}",
                        key.display(),
                        r.describe()
                    ),
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
    }
    if let Err(e) = crate::ledger::gate(cfg) {
        problems.push(e);
    } else if cfg.scanning.defender
        && let Some(l) = &cfg.ledger_file_path
    {
        println!(
            "ok: installed Microsoft Defender is recorded as tested in {}",
            l.display()
        );
    }
    match scan::enabled(cfg) {
        Err(e) => problems.push(e),
        Ok(engines) => match Scanners::start(
            engines,
            scan::Policy::from_config(&cfg.scanning),
            cfg.scanning.canary,
        ) {
            Ok(s) => {
                for ((name, version), (_, sigs)) in s.versions().into_iter().zip(s.signatures()) {
                    let canary = if cfg.scanning.canary {
                        ", canary detected"
                    } else {
                        ""
                    };
                    println!(
                        "ok: scanner {name} answers: {version}{canary}; signatures {} of {}",
                        sigs.version,
                        sigs.updated.as_deref().unwrap_or("unknown date")
                    );
                }
                for stale in s.stale_signatures(crate::run::max_signature_age(cfg)) {
                    problems.push(format!(
                        "signatures too old: {stale} (a run would deliver nothing)"
                    ));
                }
            }
            Err(e) => problems.push(format!("scanner {e}")),
        },
    }
    // What the engines scan whole: a run sets aside (never delivers) what lies beyond,
    // so these are not problems, but the clamd.conf lines that avoid setting files
    // aside needlessly are shown until they are set.
    let limits = crate::scan::limits::ScanLimits::for_config(cfg);
    if let Some(d) = limits.describe() {
        println!("ok: {d}");
    }
    for r in limits.recommendations() {
        println!("warning: {r}");
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if problems.is_empty() {
        println!("shuttle check: configuration OK");
        0
    } else {
        println!("shuttle check: {} problem(s) found", problems.len());
        2
    }
}
