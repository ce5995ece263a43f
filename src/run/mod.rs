//! One run, step by step (docs/design.md §1). Each step is a call into the module named after
//! it; this file only orders them and keeps the run's figures.

mod context;
mod file;
mod pipeline;
mod settle;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::discover::{self, OpenFiles, Rules};
use crate::hazard::HazardArchive;
use crate::journal::{self, Journal};
use crate::lock;
use crate::notify::{self, Notifier};
use crate::report::{EngineVersion, Report};
use crate::scan::{self, Scanner, Scanners};
use crate::states::ExitCode;
use crate::throttle::Admission;
use crate::{cleanup, recover};

/// Step 1 and what stops a run before it starts: shared with `shuttle rescan`.
pub use crate::preflight::{RunError, preflight};
pub use pipeline::Buffers;

/// Source subdirectories are removed once empty and untouched this long (docs/design.md §1.11).
const EMPTY_DIR_AGE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub report_json: Option<PathBuf>,
    /// Set on SIGTERM/SIGINT (`crate::signals`): stops admission; in-flight files finish.
    pub stop: Option<Arc<AtomicBool>>,
    /// `shuttle watch`: notifications already sent by earlier passes (hold-down).
    pub memory: Option<Arc<notify::Memory>>,
    /// One pass of `shuttle watch` rather than a one-shot `run`.
    pub watch: bool,
    /// `shuttle watch`: the copy buffers, kept from pass to pass.
    pub buffers: Option<Arc<Buffers>>,
}

pub fn now_string() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// Runs one pass over the drop directory. Returns the run's report (its `exit_code`
/// is the process exit code), or an error when the run could not start.
pub fn run(cfg: &Config, opts: &RunOptions) -> Result<Report, RunError> {
    preflight(cfg)?;
    // 2. Single instance.
    let _lock = lock::acquire(&cfg.lock_path)?;
    Ok(pass(cfg, opts))
}

/// How long a healthy run can go without showing progress on the lock file: one
/// file's scans of the largest size it may take, every engine and every retry,
/// plus ten minutes for copying and committing, plus the pause between `watch`
/// passes. A holder idle for longer is taken to be hung.
pub fn stalled_after(cfg: &Config) -> Duration {
    let policy = scan::Policy::from_config(&cfg.scanning);
    let largest = match cfg.scanning.max_file_size_mb {
        0 => scan::limits::CLAMD_HARD_LIMIT,
        mb => mb.saturating_mul(1 << 20),
    };
    let engines = u32::from(cfg.scanning.clam_av) + u32::from(cfg.scanning.defender);
    let attempts = cfg.scanning.retry_count.max(1).saturating_add(1);
    let one = policy.timeout_for(largest).unwrap_or(scan::SCAN_CEILING) + policy.retry_wait;
    one.saturating_mul(engines.max(1).saturating_mul(attempts))
        + Duration::from_secs(600 + cfg.rescan_interval_seconds)
}

/// Steps 3–12, with the lock held by the caller (`run`, or `watch` for all its passes).
pub fn pass(cfg: &Config, opts: &RunOptions) -> Report {
    let clock = std::time::Instant::now();
    // 4. umask 007: everything Shuttle creates is group- but never world-accessible.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o007));
    crate::lock::beat(&cfg.lock_path);
    if let Some(dir) = &cfg.log_path {
        crate::logging::prune_old_logs(dir, cfg.log_retention_days);
    }

    let notifier = Notifier::with_memory(&cfg.notifications, opts.memory.clone());
    let mut report = Report {
        started: now_string(),
        ..Default::default()
    };
    let mut journal = None;
    // Engines and the hazard key are set up again for every pass: a `watch` notices
    // a key that expired or a scanner that came back.
    let done = scan::enabled(cfg)
        .map_err(|e| anyhow::anyhow!(e))
        .and_then(|engines| {
            let hazard = HazardArchive::open(cfg).map_err(|e| anyhow::anyhow!(e))?;
            run_locked(
                cfg,
                engines,
                hazard.as_ref(),
                &notifier,
                opts,
                &mut report,
                &mut journal,
            )
        });
    if let Err(e) = done {
        let msg = format!("{e:#}");
        tracing::error!("run stopped: {msg}");
        notifier.send_once(notify::Kind::Error, "Shuttle run stopped", &msg);
        report.errors.push(msg);
    }
    report.exit_code = exit_code(&report);
    report.finished = now_string();
    if let Some(j) = &journal
        && let Err(e) = record_end(&**context::lock(j), &report)
    {
        output_failed(&mut report, e);
    }

    // 12. Report. Shuttle's own outputs failing fail the run: metrics first, so that
    // the report can say so.
    if let Err(e) = crate::metrics::write(cfg, &report, clock.elapsed()) {
        output_failed(&mut report, e.to_string());
    }
    if let Some(path) = &opts.report_json
        && let Err(e) = report.write_json(path)
    {
        output_failed(
            &mut report,
            format!("cannot write report {}: {e}", path.display()),
        );
    }
    tracing::info!("{}", report.summary_line());
    notify::run_end(&notifier, cfg.notifications.notify_summary, &report);
    // Dropping the notifier waits for the mail queue, at most one SMTP timeout.
    drop(notifier);
    report
}

/// 0 = finished (files may be suspect, admission may be throttled); 1 = a file failed,
/// a file was newly set aside (unscannable, too large: reported once, so a later run
/// that only finds it again exits 0), or the run hit a runtime error (docs/design.md §1).
fn exit_code(r: &Report) -> ExitCode {
    let f = &r.files;
    if f.failed > 0 || f.unscannable > 0 || f.too_large > 0 || !r.errors.is_empty() {
        ExitCode::Failed
    } else {
        ExitCode::Ok
    }
}

/// Says at the start of a run how it tells files still being written, and what it
/// cannot tell.
fn say_writer_check(writers: crate::lease::WriterCheck, unreadable: usize) {
    let cap = crate::lease::has_cap_lease();
    match (writers, cap) {
        (_, true) => tracing::info!(
            "open-writer detection: read leases (CAP_LEASE held: any file, whoever owns it)"
        ),
        (crate::lease::WriterCheck::LeaseOrProc, false) => tracing::info!(
            "open-writer detection: read leases on files this user owns, /proc for the others"
        ),
        (crate::lease::WriterCheck::LeaseOnly, false) => tracing::warn!(
            "open-writer detection: without CAP_LEASE only files this user owns can be checked, and {unreadable} processes' open files are hidden in /proc; files owned by other users are left in place. Add AmbientCapabilities=CAP_LEASE to the unit (or run as the files' owner)"
        ),
    }
}

/// Records the run's end and totals in the journal.
fn record_end(journal: &dyn Journal, report: &Report) -> Result<(), String> {
    let Some(run_id) = report.run_id else {
        return Ok(());
    };
    let summary = serde_json::json!({ "files": report.files, "bytes": report.bytes, "throttle": report.throttle });
    journal
        .record_endpoints(run_id, &report.endpoints)
        .and_then(|()| {
            journal.finish_run(run_id, &report.finished, report.exit_code.into(), &summary)
        })
        .map_err(|e| format!("cannot record the end of run {run_id} in the journal: {e}"))
}

/// One of Shuttle's own outputs (journal, metrics, report) could not be written: an
/// error on stderr and in the report, and exit 1.
fn output_failed(report: &mut Report, msg: String) {
    tracing::error!("{msg}");
    report.errors.push(msg);
    report.exit_code = exit_code(report);
}

fn run_locked(
    cfg: &Config,
    engines: Vec<Box<dyn Scanner>>,
    hazard: Option<&HazardArchive>,
    notifier: &Notifier,
    opts: &RunOptions,
    report: &mut Report,
    journal_slot: &mut Option<journal::Shared>,
) -> anyhow::Result<()> {
    // 3. Recovery: reconcile what an interrupted run left (journal first).
    let journal = journal_slot.insert(Mutex::new(
        journal::open(cfg).context("cannot open the journal")?,
    ));
    let journal = &*journal;
    let j = context::lock(journal);
    let run_id = j.begin_run(&report.started)?;
    report.run_id = Some(run_id);
    // Every file id above this is this run's (one node holds the run lock; a fleet's
    // nodes share the ids), for the retro-scan's mark.
    let ids_before = match &cfg.fleet {
        None => Some(j.last_file_id()?),
        Some(_) => None,
    };
    // Fleet: the lease keeper renews this node's claims from its own connection.
    let heartbeat = match &cfg.fleet {
        Some(f) => Some(journal::Heartbeat::start(f).context("cannot start the fleet heartbeat")?),
        None => None,
    };
    let recovered = recover::reconcile(&**j, cfg, run_id)?;
    if recovered.interrupted_files > 0 {
        tracing::warn!(
            "recovered {} file(s) of an interrupted run; their sources are handled again",
            recovered.interrupted_files
        );
    }

    // 8 (first part). Every scanner must answer, and detect the canary, before any
    // file is touched.
    let mut scanners = Scanners::start(
        engines,
        scan::Policy::from_config(&cfg.scanning),
        cfg.scanning.canary,
    )
    .map_err(|e| anyhow::anyhow!("scanner not usable, no file was touched: {e}"))?;
    let now = chrono::Utc::now();
    report.scanners = scanners
        .versions()
        .into_iter()
        .zip(scanners.signatures())
        .map(|((scanner, version), (_, sigs))| EngineVersion {
            scanner,
            version,
            signature_age_seconds: sigs.age(now).map(|a| a.as_secs()),
            signatures: Some(sigs),
        })
        .collect();
    // Signature freshness: every engine's database must be dated and young enough,
    // or nothing is delivered this run.
    let stale = scanners.stale_signatures(scan::max_signature_age(&cfg.scanning));
    if !stale.is_empty() {
        anyhow::bail!(
            "signatures too old, no file was touched: {}",
            stale.join("; ")
        );
    }
    scanners.keep_fresh(scan::max_signature_age(&cfg.scanning));
    report.endpoints = scanners.endpoints();
    let own_files = ids_before.map(|after| crate::rescan::OwnFiles {
        after,
        generation: crate::rescan::generation(&scanners.signatures()),
    });
    let limits = scan::limits::ScanLimits::for_config(cfg);
    if let Some(d) = limits.describe() {
        tracing::info!("{d}");
    }
    for r in limits.recommendations() {
        tracing::warn!("{r}");
    }

    // 5. Discover.
    let open = OpenFiles::scan();
    let writers = crate::lease::WriterCheck::new(open.unreadable_processes == 0);
    say_writer_check(writers, open.unreadable_processes);
    let rules = Rules {
        stability: (!cfg.skip_stability_check).then(|| Duration::from_secs(cfg.stability_seconds)),
        priority: cfg.priority,
        priority_paths: cfg.priority_paths.clone(),
        names: cfg.name_rules,
        spill_dir: Some(cfg.tracking_data_path.clone()),
        allow_hard_links: cfg.allow_hard_links,
    };
    let discovery = discover::discover(&cfg.source_path, &rules, &open);
    report.files.discovered = discovery.candidates.len() + discovery.skipped_total();
    report.files.skipped = discovery.skipped_total();
    report.skipped_by_reason = discovery.skipped.clone();
    tracing::info!(
        "discovered {} file(s) in {}: {} to handle, {} skipped this run",
        report.files.discovered,
        cfg.source_path.display(),
        discovery.candidates.len(),
        report.files.skipped
    );

    // 6–10. Admit, quarantine, scan, dispose, remove sources.
    // Today's totals only count against a daily limit: without one they are not
    // read (a server's journal holds a day of files, and summing them is the run's
    // start spent on one core: 4-11 ms for 60,000 files).
    let t = &cfg.throttle;
    let mut day_before = (0, 0);
    if t.enabled && (t.max_files_per_day > 0 || t.max_mb_per_day > 0) {
        let today = journal::local_day(chrono::Local::now());
        day_before = j.day_totals(&today)?;
        if let Some((files, bytes)) =
            crate::legacy::day_totals(&cfg.tracking_data_path, &**j, run_id, &today)
        {
            day_before.0 += files;
            day_before.1 += bytes;
        }
    }
    let admission = Admission::new(cfg, day_before);
    for (sample, total) in admission.samples() {
        j.record_space(run_id, &sample, total)?;
    }
    let set_aside = j.set_aside_all()?;
    drop(j);
    let fingerprint = format!("{};{}", limits.fingerprint(), admission.fingerprint());
    let dirs = discovery.dirs;
    let roots = context::Roots::open(cfg, writers)
        .context("cannot open the source, quarantine or destination directory")?;
    let run = context::Run {
        roots: &roots,
        cfg,
        journal,
        run_id,
        scanners: &scanners,
        notifier,
        hazard,
        stop: opts.stop.as_deref(),
        limits: &limits,
        set_aside: &set_aside,
        limits_fingerprint: &fingerprint,
        policy: context::FilePolicy::of(cfg),
        hooks: context::Hooks::REAL,
        fleet: heartbeat.as_ref(),
        day_limits: journal::DayLimits::of(cfg),
    };
    if discovery.candidates.spilled_runs() > 0 {
        tracing::debug!(
            "list of waiting files spilled to disk in {} sorted run(s)",
            discovery.candidates.spilled_runs()
        );
    }
    let own = Buffers::default();
    let buffers = opts.buffers.as_deref().unwrap_or(&own);
    let queue = discovery.candidates.into_queue();
    let processed = pipeline::process(&run, admission, queue, report, buffers);
    report.endpoints = scanners.endpoints();
    processed?;

    // Retro-scan: a bounded slice of earlier deliveries, after this pass's new files.
    if scanners.stop_reason().is_none() {
        let slice = crate::rescan::Slice {
            cfg,
            journal,
            scanners: &scanners,
            hazard,
            notifier,
            run_id: Some(run_id),
            days: cfg.rescan.days,
            prefix: None,
            budget: match cfg.rescan.budget_seconds {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            stop: opts.stop.as_deref(),
            use_mark: true,
            own: own_files,
        };
        match crate::rescan::slice(&slice) {
            Ok(counts) => report.rescan = counts,
            Err(e) => {
                let msg = format!("retro-scan: {e}");
                tracing::error!("{msg}");
                report.errors.push(msg);
            }
        }
    }
    let j = context::lock(journal);
    for (sample, total) in crate::throttle::targets_space(cfg) {
        j.record_space(run_id, &sample, total)?;
    }

    // 11. Clean up.
    cleanup::empty_quarantine(&cfg.quarantine_path);
    let removed = cleanup::remove_empty_dirs(&cfg.source_path, &dirs, EMPTY_DIR_AGE, "source");
    if removed > 0 {
        tracing::info!("removed {removed} empty source subdirectories untouched for 5 minutes");
    }
    Ok(())
}
