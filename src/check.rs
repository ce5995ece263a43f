//! `shuttle check` (docs/design.md §6): validate configuration, directories, scanners and
//! keys without touching a file; print every problem; exit 0 or 2.

use std::path::{Path, PathBuf};

use rustix::fs::Access;

use crate::config::{self, CommandLine, Config};
use crate::hazard::{self, HazardArchive, HazardError};
use crate::scan::{self, Scanners};
use crate::states::ExitCode;

/// Runs the checks, printing to stdout. Returns the exit code.
pub fn check(cli: &CommandLine) -> ExitCode {
    let loaded = match config::load(cli) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors.0 {
                println!("problem: {e}");
            }
            println!("shuttle check: {} problem(s) found", errors.0.len());
            return ExitCode::Usage;
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
    for u in &loaded.unknown_keys {
        problems.push(u.clone());
    }
    problems.extend(access_problems(cfg));
    match writer_detection(cfg) {
        Ok(line) => println!("ok: {line}"),
        Err(p) => problems.push(p),
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
    if let Some(f) = &cfg.fleet {
        // Fleet mode: the journal must answer (and be a schema this Shuttle knows)
        // before a node joins; opening it creates or migrates the schema.
        match crate::journal::open(cfg).and_then(|j| j.fleet_status()) {
            Ok(status) => println!(
                "ok: fleet journal {} as node {} (lease {} s): {} node(s) known",
                f.url,
                f.node,
                f.lease_seconds,
                status.map_or(0, |s| s.nodes.len())
            ),
            Err(e) => problems.push(format!(
                "{e} (check journal_url, journal_password_file or PGPASSFILE, and that PostgreSQL is running)"
            )),
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
                let endpoints = s.endpoints();
                for e in endpoints.iter().filter(|_| endpoints.len() > 1) {
                    let sigs = e
                        .signatures
                        .as_ref()
                        .map(|s| {
                            format!(
                                "; signatures {} of {}",
                                s.version,
                                s.updated.as_deref().unwrap_or("unknown date")
                            )
                        })
                        .unwrap_or_default();
                    let version = e.version.as_deref().unwrap_or("version unknown");
                    match e.health {
                        crate::scan::pool::Health::Up => println!(
                            "ok: clamd endpoint {}: up, {version}{sigs}; concurrency {}",
                            e.endpoint, e.concurrency
                        ),
                        h => println!(
                            "warning: clamd endpoint {}: not used ({h}): {}{}",
                            e.endpoint,
                            e.why.as_deref().unwrap_or(""),
                            if e.version.is_some() {
                                format!("; {version}{sigs}")
                            } else {
                                String::new()
                            }
                        ),
                    }
                }
                for stale in s.stale_signatures(crate::scan::max_signature_age(&cfg.scanning)) {
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
        ExitCode::Ok
    } else {
        println!("shuttle check: {} problem(s) found", problems.len());
        ExitCode::Usage
    }
}

/// One directory a run needs, and what for.
struct Need {
    key: &'static str,
    dir: PathBuf,
    access: Access,
    what: &'static str,
    /// The run creates the directory when missing (then its nearest existing
    /// ancestor must let it).
    created: bool,
}

/// Probes every directory a run uses for the access the run needs, as the user
/// `check` runs as (effective IDs, so permissions, ACLs and read-only mounts all
/// count), creating nothing. One problem per directory, with the fix.
fn access_problems(cfg: &Config) -> Vec<String> {
    let rwx = Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK;
    let wx = Access::WRITE_OK | Access::EXEC_OK;
    let need = |key, dir: &Path, access, what, created| Need {
        key,
        dir: dir.to_path_buf(),
        access,
        what,
        created,
    };
    let mut needs = vec![
        need(
            "source_path",
            &cfg.source_path,
            rwx,
            "list it and remove files from it",
            false,
        ),
        need(
            "quarantine_path",
            &cfg.quarantine_path,
            rwx,
            "create, rename and remove files in it",
            false,
        ),
        need(
            "destination_path",
            &cfg.destination_path,
            wx,
            "create and rename files in it",
            false,
        ),
        need(
            "tracking_data_path",
            &cfg.tracking_data_path,
            rwx,
            "keep its journal in it",
            true,
        ),
    ];
    if let Some(h) = &cfg.hazard_archive_path {
        needs.push(need(
            "hazard_archive_path",
            h,
            wx,
            "create and rename files in it",
            false,
        ));
    }
    if let Some(l) = &cfg.log_path {
        needs.push(need(
            "log_path",
            l,
            rwx,
            "create log files in it and expire old ones",
            true,
        ));
    }
    if let Some(dir) = cfg.metrics_path.as_deref().and_then(Path::parent) {
        needs.push(need(
            "metrics_path",
            dir,
            wx,
            "write the metrics file into its directory",
            false,
        ));
    }
    if let Some(dir) = cfg.lock_path.parent() {
        // systemd makes the default directory (RuntimeDirectory=shuttle), and a run
        // started by hand creates it.
        let default = cfg.lock_path == Path::new(crate::config::DEFAULT_LOCK_PATH);
        needs.push(need(
            "lock_path",
            dir,
            wx,
            "create the lock file in its directory",
            default,
        ));
    }
    let user = current_user();
    needs
        .iter()
        .filter(|n| !n.dir.as_os_str().is_empty())
        .filter_map(|n| probe(n, &user).err())
        .collect()
}

/// `Err`: the problem, naming the user, the missing access and the fix.
fn probe(n: &Need, user: &str) -> Result<(), String> {
    let mut dir = n.dir.as_path();
    let mut missing = false;
    while !dir.exists() {
        if !n.created {
            // check_paths reports the missing source, quarantine, destination and
            // hazard archive; the others are reported here.
            return match n.key {
                "metrics_path" | "lock_path" => Err(format!(
                    "{} {}: directory {} does not exist; fix: create it, writable for {user}",
                    n.key,
                    match n.key {
                        "metrics_path" => cfg_path_hint(&n.dir),
                        _ => n.dir.display().to_string(),
                    },
                    n.dir.display()
                )),
                _ => Ok(()),
            };
        }
        missing = true;
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p,
            _ => return Ok(()),
        }
    }
    let access = if missing {
        Access::WRITE_OK | Access::EXEC_OK
    } else {
        n.access
    };
    match rustix::fs::accessat(rustix::fs::CWD, dir, access, rustix::fs::AtFlags::EACCESS) {
        Ok(()) => Ok(()),
        Err(e) => {
            let rights = describe(access);
            let (what, target) = if missing {
                ("create it", dir)
            } else {
                (n.what, dir)
            };
            let fix = if missing && n.key == "lock_path" {
                format!(
                    "the packaged units have systemd create {} (RuntimeDirectory=shuttle); outside them create it: install -d -o shuttle -g shuttle {}",
                    n.dir.display(),
                    n.dir.display()
                )
            } else if e == rustix::io::Errno::ROFS {
                format!(
                    "{} is on a read-only filesystem (in a systemd unit: add it to ReadWritePaths=)",
                    target.display()
                )
            } else {
                format!(
                    "give {user} {rights} permission on {} (e.g. chgrp shuttle and chmod g+{}, or an ACL)",
                    target.display(),
                    modes(access)
                )
            };
            Err(format!(
                "{} {}: {user} cannot {what} ({}: {e}); fix: {fix}",
                n.key,
                n.dir.display(),
                target.display(),
            ))
        }
    }
}

/// The metrics key names a file; its problem is about the file's directory.
fn cfg_path_hint(dir: &Path) -> String {
    format!("(file in {})", dir.display())
}

fn describe(a: Access) -> String {
    let mut v = Vec::new();
    if a.contains(Access::READ_OK) {
        v.push("read");
    }
    if a.contains(Access::WRITE_OK) {
        v.push("write");
    }
    if a.contains(Access::EXEC_OK) {
        v.push("search");
    }
    v.join(", ")
}

fn modes(a: Access) -> String {
    let mut s = String::new();
    if a.contains(Access::READ_OK) {
        s.push('r');
    }
    if a.contains(Access::WRITE_OK) {
        s.push('w');
    }
    if a.contains(Access::EXEC_OK) {
        s.push('x');
    }
    s
}

/// "user NAME (uid N)" for the effective user.
fn current_user() -> String {
    let uid = rustix::process::geteuid().as_raw();
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?;
            (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(n) => format!("user {n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// How a run will tell files still being written. `Err` when it cannot for files
/// already waiting in the drop directory: they would be left there run after run.
fn writer_detection(cfg: &Config) -> Result<String, String> {
    if crate::lease::has_cap_lease() {
        return Ok("open-writer detection: read leases on any file (CAP_LEASE)".into());
    }
    let open = crate::discover::OpenFiles::scan();
    if open.unreadable_processes == 0 {
        return Ok(
            "open-writer detection: read leases on this user's files, /proc for the others".into(),
        );
    }
    let uid = rustix::process::geteuid().as_raw();
    // Listed beneath the source's handle ([`crate::fsx`]), never through a symlink.
    let others = crate::fsx::Beneath::open(&cfg.source_path)
        .and_then(|root| {
            let dir = root.root();
            Ok(dir
                .entries()?
                .into_iter()
                .take(10_000)
                .filter_map(|(name, _)| dir.meta(&name).ok())
                .filter(|m| m.uid != uid)
                .count())
        })
        .unwrap_or(0);
    let why = format!(
        "without CAP_LEASE this user can take a read lease only on its own files, and {} processes' open files are hidden from it in /proc, so files owned by other users are never taken",
        open.unreadable_processes
    );
    let fix = "add AmbientCapabilities=CAP_LEASE (and CapabilityBoundingSet=CAP_LEASE) to the unit, as the packaged units do, or run as the uploads' owner";
    if others > 0 {
        Err(format!(
            "open-writer detection: {why}; {others} entries in source_path {} belong to other users; fix: {fix}",
            cfg.source_path.display()
        ))
    } else {
        println!("warning: open-writer detection: {why}; fix: {fix}");
        Ok("open-writer detection: read leases on this user's files".into())
    }
}
