//! `shuttle check` (DESIGN §6): validate configuration, directories, scanners and
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
                for (name, version) in s.versions() {
                    let canary = if cfg.scanning.canary {
                        ", canary detected"
                    } else {
                        ""
                    };
                    println!("ok: scanner {name} answers: {version}{canary}");
                }
            }
            Err(e) => problems.push(format!("scanner {e}")),
        },
    }
    if cfg.scanning.clam_av {
        for w in clamd_limit_warnings(cfg) {
            println!("warning: {w}");
        }
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

/// Warns when clamd, as its configuration reads, would report a file larger than its
/// scan limits as clean (issue: `AlertExceedsMax`).
fn clamd_limit_warnings(cfg: &config::Config) -> Vec<String> {
    use crate::config::ClamdEndpoint;
    use crate::scan::clamav::ClamdLimits;
    let conf = &cfg.scanning.clamd_config;
    let limits = match ClamdLimits::read(conf) {
        Ok(l) => l,
        Err(e) => {
            return vec![format!(
                "cannot read clamd's configuration {} ({e}): cannot tell whether clamd reports files above its scan limits as clean; set clamd_config, or max_file_size_mb below clamd's MaxFileSize",
                conf.display()
            )];
        }
    };
    if let (Some(ClamdEndpoint::Unix(sock)), Some(local)) =
        (&cfg.scanning.clamd, &limits.local_socket)
        && sock != local
    {
        return vec![format!(
            "{} describes the clamd at {}, not {}: point clamd_config at the right file to check its scan limits",
            conf.display(),
            local.display(),
            sock.display()
        )];
    }
    let Some(largest) = limits.largest_scanned() else {
        return Vec::new();
    };
    let cap = cfg.scanning.max_file_size_mb.saturating_mul(1 << 20);
    if limits.alert_exceeds_max || (cap > 0 && cap <= largest) {
        return Vec::new();
    }
    vec![format!(
        "clamd ({}) has AlertExceedsMax off: a file larger than {:.0} MB (MaxFileSize/MaxScanSize) is scanned only in part and reported clean. Set `AlertExceedsMax yes` in clamd.conf (Shuttle then fails such files), or max_file_size_mb to {:.0} or less",
        conf.display(),
        crate::fsx::mib(largest),
        crate::fsx::mib(largest)
    )]
}
