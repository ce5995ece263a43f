//! Retro-scan: finds what got through before the signatures knew it.
//!
//! A file is delivered because every engine's signatures of that moment found nothing.
//! Malware is often recognised only days later. So whenever an enabled engine's
//! signature database is newer than the one that cleared a recent delivery (within
//! `rescan_days`), Shuttle scans the destination copy again — in place: the copy is
//! opened beneath the destination with [`crate::fsx::Beneath`] (no symlink followed) and its
//! descriptor handed to the engines (clamd: `FILDES`), nothing is copied.
//!
//! Only a copy that still holds the delivered bytes is Shuttle's business. Size and
//! mtime (delivery sets the source's mtime) are compared first, cheaply; a copy that
//! differs is recorded as changed and never touched. A detected copy is hashed before
//! anything is said or done about it, so an alert or a withdrawal always concerns
//! exactly the delivered bytes.
//!
//! `rescan_action = alert` mails (as a hazard notification), journals and reports;
//! `withdraw` also encrypts the copy into the hazard archive (its sidecar says
//! `withdrawn_from`) and only then removes it from the destination.
//!
//! The work comes in slices: each run or `watch` pass rescans for at most
//! `rescan_budget_seconds` after its new files, so new deliveries wait seconds, not
//! hours. Progress is the journal itself — one `rescans` row per delivery per
//! signature generation, written as each file is done — so a killed run resumes
//! where it stopped and rescans nothing twice. A withdrawal is recorded before it
//! starts (`withdrawing`) and finished by the next slice if it was interrupted: the
//! archive is looked up by the delivery's id before anything is archived again, so
//! a kill at any point neither loses the file nor archives it twice.

use std::fs::File;
use std::io::Seek;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Config, RescanAction};
use crate::fsx::Beneath;
use crate::hazard::{self, HazardArchive};
use crate::journal::{Delivery, Journal, JournalError, RescanState};
use crate::names::shown;
use crate::notify::{self, Notifier};
use crate::scan::{FileVerdict, Scanners, Signatures};
use crate::states::ExitCode;

/// Deliveries read from the journal at a time.
const PAGE: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum RescanError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot open the destination directory {path}: {source}")]
    Destination {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one slice did, for the report and metrics.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RescanCounts {
    /// Deliveries rescanned (a scan was made).
    pub scanned: u64,
    pub clean: u64,
    pub alerted: u64,
    pub withdrawn: u64,
    /// Copies that no longer hold the delivered bytes: reported, left alone.
    pub changed: u64,
    /// Copies no longer in the destination.
    pub gone: u64,
    pub failed: u64,
    /// The budget ran out, or a stop was requested, with deliveries still to rescan.
    pub unfinished: bool,
    /// Seconds spent.
    pub seconds: f64,
}

impl RescanCounts {
    fn add(&mut self, o: &RescanCounts) {
        self.scanned += o.scanned;
        self.clean += o.clean;
        self.alerted += o.alerted;
        self.withdrawn += o.withdrawn;
        self.changed += o.changed;
        self.gone += o.gone;
        self.failed += o.failed;
        self.unfinished |= o.unfinished;
    }
}

/// One slice's scope and limits.
pub struct Slice<'a> {
    pub cfg: &'a Config,
    pub journal: &'a crate::journal::Shared,
    pub scanners: &'a Scanners,
    pub hazard: Option<&'a HazardArchive>,
    pub notifier: &'a Notifier,
    pub run_id: Option<i64>,
    /// Deliveries this many days back.
    pub days: u64,
    /// Only deliveries whose path relative to the destination starts with this.
    pub prefix: Option<&'a str>,
    /// Stop starting new rescans after this long; `None`: no limit.
    pub budget: Option<Duration>,
    pub stop: Option<&'a AtomicBool>,
    /// Start after, and move on, the journal's mark of deliveries already examined
    /// under this signature generation, so that a pass does not read again what
    /// earlier passes finished. Only for the configured window and no prefix (runs
    /// and watch passes); `shuttle rescan` looks at everything it is asked to.
    pub use_mark: bool,
    /// A run's or watch pass's own files, which it has just scanned: the mark may
    /// pass over them unread (see [`OwnFiles`]).
    pub own: Option<OwnFiles>,
}

/// The files of the pass that runs the slice: every id above `after` is one of them
/// (one node, under the run lock), and each delivered one was cleared by the
/// signatures of `generation`, read when the pass started. When that is still the
/// generation, none of them needs a rescan under it (versions only move forward,
/// so the pass's scans all had those signatures), and a mark that already reaches
/// `after` moves past them without reading a row: otherwise each pass would read
/// back, and parse, every delivery it made.
#[derive(Debug, Clone)]
pub struct OwnFiles {
    pub after: i64,
    pub generation: String,
}

fn lock(j: &crate::journal::Shared) -> std::sync::MutexGuard<'_, Box<dyn Journal>> {
    j.lock().unwrap_or_else(|p| p.into_inner())
}

/// The signature generation: every enabled engine's database version, e.g.
/// `clamav=27451`. A delivery is rescanned at most once per generation.
pub fn generation(sigs: &[(&'static str, Signatures)]) -> String {
    let mut parts: Vec<String> = sigs
        .iter()
        .map(|(e, s)| format!("{e}={}", s.version))
        .collect();
    parts.sort();
    parts.join(",")
}

/// The signature version an engine recorded for a delivery: its `signatures.version`,
/// or for older records the middle field of clamd's `ClamAV x/VERSION/date`.
fn delivered_version(results: Option<&serde_json::Value>, engine: &str) -> Option<String> {
    let serde_json::Value::Array(list) = results? else {
        return None;
    };
    let e = list
        .iter()
        .find(|e| e.get("scanner").and_then(|v| v.as_str()) == Some(engine))?;
    if let Some(v) = e
        .get("signatures")
        .and_then(|s| s.get("version"))
        .and_then(|v| v.as_str())
    {
        return Some(v.to_string());
    }
    let line = e.get("version")?.as_str()?;
    line.split('/').nth(1).map(str::to_string)
}

/// Is `now` a newer signature version than `then`? Numbers are compared as numbers;
/// anything else by inequality.
fn newer(now: &str, then: &str) -> bool {
    match (now.trim().parse::<u64>(), then.trim().parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => now != then,
    }
}

/// Does any enabled engine have newer signatures than those that cleared `d`?
pub fn needs_rescan(d: &Delivery, sigs: &[(&'static str, Signatures)]) -> bool {
    sigs.iter().any(|(engine, s)| {
        delivered_version(d.scan_results.as_ref(), engine)
            .is_some_and(|then| newer(&s.version, &then))
    })
}

/// `engine signatures V` for each engine that cleared `d`.
fn cleared_by(d: &Delivery) -> String {
    let Some(serde_json::Value::Array(list)) = &d.scan_results else {
        return "unknown (not recorded)".into();
    };
    let parts: Vec<String> = list
        .iter()
        .map(|e| {
            let name = e.get("scanner").and_then(|v| v.as_str()).unwrap_or("?");
            let engine = name.to_string();
            let version = delivered_version(d.scan_results.as_ref(), &engine).unwrap_or_default();
            let date = e
                .get("signatures")
                .and_then(|s| s.get("updated"))
                .and_then(|v| v.as_str())
                .unwrap_or("unknown date");
            format!("{name} signatures {version} of {date}")
        })
        .collect();
    parts.join("; ")
}

fn now_signatures(sigs: &[(&'static str, Signatures)]) -> String {
    let parts: Vec<String> = sigs
        .iter()
        .map(|(e, s)| {
            format!(
                "{e} signatures {} of {}",
                s.version,
                s.updated.as_deref().unwrap_or("unknown date")
            )
        })
        .collect();
    parts.join("; ")
}

fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Reads `file` from its start to its end: (bytes, SHA-256 hex).
fn hash(file: &mut File) -> std::io::Result<(u64, String)> {
    file.rewind()?;
    let (sha256, n) = crate::fsx::hash_file(file, &mut vec![0u8; 1 << 16], None)?;
    file.rewind()?;
    Ok((n, sha256))
}

/// Does the open copy still look like the delivery (regular file, size, mtime)?
/// `None`: yes; `Some(why)`: no.
fn differs(file: &File, d: &Delivery) -> Option<String> {
    let m = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot stat it: {e}")),
    };
    if !m.file_type().is_file() {
        return Some("it is no longer a regular file".into());
    }
    let mtime_ns = m
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec());
    if m.len() != d.size || mtime_ns != d.mtime_ns {
        return Some(format!(
            "it is {} bytes modified at {} now, {} bytes modified at {} when delivered",
            m.len(),
            time(m.mtime()),
            d.size,
            time(d.mtime_ns.div_euclid(1_000_000_000))
        ));
    }
    None
}

/// Rescans what `s` covers, oldest delivery first, until done or the budget is spent.
pub fn slice(s: &Slice) -> Result<RescanCounts, RescanError> {
    let started = Instant::now();
    let mut counts = RescanCounts::default();
    if s.days == 0 {
        return Ok(counts);
    }
    let dest =
        Beneath::open(&s.cfg.destination_path).map_err(|source| RescanError::Destination {
            path: s.cfg.destination_path.clone(),
            source,
        })?;
    // Withdrawals a killed run left half done come first.
    let open = lock(s.journal).rescans_withdrawing()?;
    for row in open {
        resume_withdrawal(s, &dest, row.id, row.file_id, row.archive_path, &mut counts)?;
    }
    let sigs = s.scanners.signatures();
    let generation_key = generation(&sigs);
    let since = chrono::Utc::now().timestamp()
        - i64::try_from(s.days.saturating_mul(86_400)).unwrap_or(i64::MAX);
    let use_mark = s.use_mark && s.prefix.is_none();
    let mut after = if use_mark {
        lock(s.journal).rescan_mark(&generation_key)?
    } else {
        0
    };
    if use_mark
        && let Some(own) = &s.own
        && own.generation == generation_key
        && after >= own.after
    {
        let last = lock(s.journal).last_file_id()?;
        if last > after {
            lock(s.journal).set_rescan_mark(&generation_key, last)?;
            after = last;
        }
    }
    // The mark moves only over a run of pages with nothing left to retry.
    let mut advancing = use_mark;
    let workers = s.cfg.max_scan_threads.max(1);
    'pages: loop {
        let page = lock(s.journal).deliveries_to_rescan(since, &generation_key, after, PAGE)?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.file_id;
        let mut todo = Vec::with_capacity(page.len());
        for d in page {
            if !needs_rescan(&d, &sigs) {
                continue;
            }
            let Some(rel) = relative(s.cfg, &d) else {
                record(
                    s,
                    &generation_key,
                    &d,
                    RescanState::Gone,
                    &[],
                    None,
                    Some("no longer under destination_path"),
                    &mut counts,
                )?;
                continue;
            };
            if s.prefix.is_some_and(|p| !rel.starts_with(p)) {
                continue;
            }
            todo.push((d, rel));
        }
        // `max_scan_threads` workers take the page's deliveries in order; each
        // checks the budget before starting one.
        let next = AtomicUsize::new(0);
        let done: Vec<Result<RescanCounts, RescanError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.min(todo.len().max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = RescanCounts::default();
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            let Some((d, rel)) = todo.get(i) else {
                                return Ok(mine);
                            };
                            let out_of_time = s.budget.is_some_and(|b| started.elapsed() >= b);
                            if out_of_time
                                || s.stop.is_some_and(|f| f.load(Ordering::SeqCst))
                                || s.scanners.stop_reason().is_some()
                            {
                                mine.unfinished = true;
                                return Ok(mine);
                            }
                            one(s, &dest, &generation_key, &sigs, d, rel, &mut mine)?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let failed_before = counts.failed;
        for c in done {
            counts.add(&c?);
        }
        if counts.unfinished {
            break 'pages;
        }
        advancing &= counts.failed == failed_before;
        if advancing {
            lock(s.journal).set_rescan_mark(&generation_key, after)?;
        }
    }
    counts.seconds = started.elapsed().as_secs_f64();
    if counts.scanned + counts.gone + counts.changed > 0 || counts.unfinished {
        tracing::info!(
            "retro-scan with {generation_key}: {} rescanned ({} clean, {} alerted, {} withdrawn, {} failed), {} changed, {} gone downstream, in {:.1} s{}",
            counts.scanned,
            counts.clean,
            counts.alerted,
            counts.withdrawn,
            counts.failed,
            counts.changed,
            counts.gone,
            counts.seconds,
            if counts.unfinished {
                "; the rest waits for the next pass"
            } else {
                ""
            }
        );
    }
    Ok(counts)
}

/// The delivery's path relative to the destination.
fn relative(cfg: &Config, d: &Delivery) -> Option<String> {
    let rel = Path::new(&d.final_path)
        .strip_prefix(&cfg.destination_path)
        .ok()?;
    if rel.as_os_str().is_empty() {
        return None;
    }
    Some(rel.to_string_lossy().into_owned())
}

#[allow(clippy::too_many_arguments)]
fn record(
    s: &Slice,
    generation_key: &str,
    d: &Delivery,
    state: RescanState,
    detections: &[String],
    results: Option<&serde_json::Value>,
    note: Option<&str>,
    counts: &mut RescanCounts,
) -> Result<i64, JournalError> {
    let id = lock(s.journal).rescan_recorded(
        d.file_id,
        s.run_id,
        generation_key,
        state,
        detections,
        results,
        note,
    )?;
    match state {
        RescanState::Clean => counts.clean += 1,
        RescanState::Alerted => counts.alerted += 1,
        RescanState::Withdrawn => counts.withdrawn += 1,
        RescanState::Changed => counts.changed += 1,
        RescanState::Gone => counts.gone += 1,
        RescanState::Failed => counts.failed += 1,
        RescanState::Withdrawing => {}
    }
    match state {
        RescanState::Changed | RescanState::Gone => tracing::warn!(
            "retro-scan: delivered file {:?} left alone: {}",
            shown(&d.final_path),
            note.unwrap_or(state.as_str())
        ),
        RescanState::Failed => tracing::error!(
            "retro-scan: {:?} could not be rescanned: {}",
            shown(&d.final_path),
            note.unwrap_or("")
        ),
        _ => {}
    }
    Ok(id)
}

/// Rescans one delivery.
fn one(
    s: &Slice,
    dest: &Beneath,
    generation_key: &str,
    sigs: &[(&'static str, Signatures)],
    d: &Delivery,
    rel: &str,
    counts: &mut RescanCounts,
) -> Result<(), RescanError> {
    let mut file = match dest.open_read(Path::new(rel)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            record(
                s,
                generation_key,
                d,
                RescanState::Gone,
                &[],
                None,
                Some("no longer in the destination"),
                counts,
            )?;
            return Ok(());
        }
        Err(e) if crate::fsx::is_symlink_refusal(&e) => {
            let why = format!("a symlink or special file stands in its place ({e})");
            record(
                s,
                generation_key,
                d,
                RescanState::Changed,
                &[],
                None,
                Some(&why),
                counts,
            )?;
            return Ok(());
        }
        Err(e) => {
            let why = format!("cannot open it: {e}");
            record(
                s,
                generation_key,
                d,
                RescanState::Failed,
                &[],
                None,
                Some(&why),
                counts,
            )?;
            return Ok(());
        }
    };
    if let Some(why) = differs(&file, d) {
        record(
            s,
            generation_key,
            d,
            RescanState::Changed,
            &[],
            None,
            Some(&why),
            counts,
        )?;
        notify_changed(s, d, &why);
        return Ok(());
    }
    let ino = file.metadata().map(|m| (m.dev(), m.ino())).ok();
    let path = s.cfg.destination_path.join(rel);
    // Every attempt gets a fresh descriptor of the same file (same inode).
    let reopen = || -> std::io::Result<File> {
        let f = dest.open_read(Path::new(rel))?;
        let m = f.metadata()?;
        if Some((m.dev(), m.ino())) != ino {
            return Err(std::io::Error::other(
                "the destination copy was replaced during the rescan",
            ));
        }
        Ok(f)
    };
    let scan = s.scanners.scan(&path, d.size, &reopen);
    counts.scanned += 1;
    let results = serde_json::to_value(&scan.results).ok();
    crate::crashpoint::here("rescan: scanned, before record");
    let detections = match scan.verdict {
        FileVerdict::Clean => {
            record(
                s,
                generation_key,
                d,
                RescanState::Clean,
                &[],
                results.as_ref(),
                None,
                counts,
            )?;
            return Ok(());
        }
        FileVerdict::Failed(why) | FileVerdict::Unscannable(why) => {
            record(
                s,
                generation_key,
                d,
                RescanState::Failed,
                &[],
                results.as_ref(),
                Some(&why),
                counts,
            )?;
            return Ok(());
        }
        FileVerdict::Suspect(names) => names,
    };
    // Detected: say or do nothing unless these are exactly the delivered bytes.
    let same = match (hash(&mut file), &d.sha256) {
        (Ok((n, sha)), Some(want)) if n == d.size && &sha == want => Ok(()),
        (Ok((n, sha)), want) => Err(format!(
            "detected ({}), but it is no longer the delivered file: {n} bytes, sha256 {sha} now; {} bytes, sha256 {} delivered",
            detections.join(", "),
            d.size,
            want.as_deref().unwrap_or("unknown")
        )),
        (Err(e), _) => Err(format!(
            "detected ({}), but cannot read it to verify it: {e}",
            detections.join(", ")
        )),
    };
    if let Err(why) = same {
        record(
            s,
            generation_key,
            d,
            RescanState::Changed,
            &detections,
            results.as_ref(),
            Some(&why),
            counts,
        )?;
        notify_changed(s, d, &why);
        return Ok(());
    }
    match (s.cfg.rescan.action, s.hazard) {
        (RescanAction::Alert, _) => {
            record(
                s,
                generation_key,
                d,
                RescanState::Alerted,
                &detections,
                results.as_ref(),
                None,
                counts,
            )?;
            alert(s, d, &detections, sigs, None);
        }
        (RescanAction::Withdraw, None) => {
            let note = "rescan_action = withdraw needs hazard_archive_path: alerted only";
            record(
                s,
                generation_key,
                d,
                RescanState::Alerted,
                &detections,
                results.as_ref(),
                Some(note),
                counts,
            )?;
            alert(s, d, &detections, sigs, Some(note));
        }
        (RescanAction::Withdraw, Some(archive)) => {
            let row = lock(s.journal).rescan_recorded(
                d.file_id,
                s.run_id,
                generation_key,
                RescanState::Withdrawing,
                &detections,
                results.as_ref(),
                None,
            )?;
            crate::crashpoint::here("rescan: withdrawing, before archive");
            withdraw(
                s,
                dest,
                archive,
                row,
                d,
                rel,
                &mut file,
                &detections,
                sigs,
                counts,
            )?;
        }
    }
    Ok(())
}

/// Archives the open copy, records it, then removes it from the destination.
#[allow(clippy::too_many_arguments)]
fn withdraw(
    s: &Slice,
    dest: &Beneath,
    archive: &HazardArchive,
    row: i64,
    d: &Delivery,
    rel: &str,
    file: &mut File,
    detections: &[String],
    sigs: &[(&'static str, Signatures)],
    counts: &mut RescanCounts,
) -> Result<(), RescanError> {
    let meta = hazard::EntryMeta {
        file_id: d.file_id,
        original_path: d.rel_path.clone(),
        size: d.size,
        sha256: d.sha256.clone().unwrap_or_default(),
        detections: detections.to_vec(),
        scanners: sigs
            .iter()
            .map(|(e, sig)| hazard::ScannerInfo {
                scanner: e.to_string(),
                version: sig.version.clone(),
            })
            .collect(),
        withdrawn_from: Some(d.final_path.clone()),
    };
    let stored = file
        .rewind()
        .map_err(|e| e.to_string())
        .and_then(|()| archive.store(file, &meta).map_err(|e| e.to_string()));
    let stored = match stored {
        Ok(st) => st,
        Err(why) => {
            let note = format!("detected, but not withdrawn: {why}; the destination copy stays");
            lock(s.journal).rescan_updated(row, RescanState::Failed, None, Some(&note))?;
            counts.failed += 1;
            tracing::error!("retro-scan: {:?}: {note}", shown(&d.final_path));
            alert(s, d, detections, sigs, Some(&note));
            return Ok(());
        }
    };
    let archived = stored.archive.display().to_string();
    lock(s.journal).rescan_updated(row, RescanState::Withdrawing, Some(&archived), None)?;
    crate::crashpoint::here("rescan: archived, before removal");
    let state = remove_copy(dest, rel, d, file);
    finish_withdrawal(s, row, d, detections, sigs, &archived, state, counts)
}

/// Takes the copy out of the destination if the name still holds the inode that was
/// archived (same size and mtime); `Err(why)` when it does not.
fn remove_copy(dest: &Beneath, rel: &str, d: &Delivery, archived: &File) -> Result<(), String> {
    let rel = Path::new(rel);
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err("not a file path".into());
    };
    let dir = dest
        .open_dir(parent)
        .map_err(|e| format!("cannot open its directory: {e}"))?;
    let st = dir.stat(name).map_err(|e| format!("cannot stat it: {e}"))?;
    let m = archived
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    let mtime_ns = st
        .st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::try_from(st.st_mtime_nsec).unwrap_or(0));
    if st.st_ino != m.ino()
        || st.st_dev != m.dev()
        || (st.st_size as u64) != d.size
        || mtime_ns != d.mtime_ns
    {
        return Err("the destination name was replaced or changed after it was archived".into());
    }
    dir.remove(name)
        .map_err(|e| format!("cannot remove it: {e}"))?;
    dir.fsync()
        .map_err(|e| format!("cannot fsync its directory: {e}"))
}

#[allow(clippy::too_many_arguments)]
fn finish_withdrawal(
    s: &Slice,
    row: i64,
    d: &Delivery,
    detections: &[String],
    sigs: &[(&'static str, Signatures)],
    archived: &str,
    removed: Result<(), String>,
    counts: &mut RescanCounts,
) -> Result<(), RescanError> {
    match removed {
        Ok(()) => {
            lock(s.journal).rescan_updated(row, RescanState::Withdrawn, None, None)?;
            counts.withdrawn += 1;
            tracing::warn!(
                "retro-scan: withdrew {:?} ({}) into {}",
                shown(&d.final_path),
                detections.join(", "),
                shown(archived)
            );
            alert(
                s,
                d,
                detections,
                sigs,
                Some(&format!(
                    "Withdrawn: encrypted into {} and removed from the destination.",
                    shown(archived)
                )),
            );
        }
        Err(why) => {
            let note =
                format!("archived into {archived}, but the destination copy was left: {why}");
            lock(s.journal).rescan_updated(row, RescanState::Changed, None, Some(&note))?;
            counts.changed += 1;
            tracing::warn!("retro-scan: {:?}: {note}", shown(&d.final_path));
            notify_changed(s, d, &note);
        }
    }
    Ok(())
}

/// Finishes a withdrawal a killed run left in `withdrawing`.
fn resume_withdrawal(
    s: &Slice,
    dest: &Beneath,
    row: i64,
    file_id: i64,
    archive_path: Option<String>,
    counts: &mut RescanCounts,
) -> Result<(), RescanError> {
    let Some(d) = lock(s.journal).delivery(file_id)? else {
        lock(s.journal).rescan_forgotten(row)?;
        return Ok(());
    };
    // Killed between archiving and recording the archive: find it by the delivery's id.
    let archived = archive_path.or_else(|| {
        let dir = s.hazard?.dir().to_path_buf();
        hazard::list(&dir).ok()?.into_iter().find_map(|l| {
            let m = l.meta.as_ref()?;
            (l.status == crate::states::ArchiveEntry::Ok
                && m.file_id == file_id
                && m.withdrawn_from.as_deref() == Some(d.final_path.as_str()))
            .then(|| dir.join(&l.file).display().to_string())
        })
    });
    let Some(archived) = archived else {
        // Nothing was archived: the next pass starts this withdrawal again.
        lock(s.journal).rescan_forgotten(row)?;
        return Ok(());
    };
    let rows = lock(s.journal).rescans_of(file_id)?;
    let detections: Vec<String> = rows
        .iter()
        .find(|r| r.id == row)
        .and_then(|r| r.detections.clone())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let sigs = s.scanners.signatures();
    let removed = match relative(s.cfg, &d) {
        None => Ok(()),
        Some(rel) => match dest.open_read(Path::new(&rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot open it: {e}")),
            Ok(mut f) => match (differs(&f, &d), hash(&mut f)) {
                (None, Ok((n, sha))) if n == d.size && Some(&sha) == d.sha256.as_ref() => {
                    remove_copy(dest, &rel, &d, &f)
                }
                (Some(why), _) => Err(why),
                (None, Ok(_)) => Err("its content changed".into()),
                (None, Err(e)) => Err(format!("cannot read it: {e}")),
            },
        },
    };
    tracing::info!(
        "retro-scan: finishing the interrupted withdrawal of {:?}",
        shown(&d.final_path)
    );
    finish_withdrawal(s, row, &d, &detections, &sigs, &archived, removed, counts)
}

/// The hazard-style mail about a delivered file newer signatures detect.
fn alert(
    s: &Slice,
    d: &Delivery,
    detections: &[String],
    sigs: &[(&'static str, Signatures)],
    extra: Option<&str>,
) {
    let subject = format!(
        "Shuttle retro-scan: delivered file detected: {}",
        shown(&d.final_path)
    );
    let mut body = format!(
        "A file Shuttle delivered is detected by newer signatures.\n\nFile: {}\nSource path: {}\nDetection: {}\nDetected with: {}\nDelivered: {}\nCleared then by: {}\nSize: {} bytes\nSHA-256: {}\n",
        shown(&d.final_path),
        shown(&d.rel_path),
        detections.join(", "),
        now_signatures(sigs),
        time(d.finished_at),
        cleared_by(d),
        d.size,
        d.sha256.as_deref().unwrap_or("unknown"),
    );
    match extra {
        Some(x) => body.push_str(&format!("\n{x}\n")),
        None => body.push_str("\nAction: alert only; the destination copy is still in place.\n"),
    }
    tracing::warn!(
        "retro-scan: delivered file {:?} detected ({}) with {}",
        shown(&d.final_path),
        detections.join(", "),
        now_signatures(sigs)
    );
    s.notifier.send(notify::Kind::Hazard, &subject, &body);
}

fn notify_changed(s: &Slice, d: &Delivery, why: &str) {
    let subject = format!(
        "Shuttle retro-scan: delivered file changed downstream: {}",
        shown(&d.final_path)
    );
    let body = format!(
        "A retro-scan left a delivered file alone: {why}.\n\nFile: {}\nDelivered: {}\nCleared then by: {}\n",
        shown(&d.final_path),
        time(d.finished_at),
        cleared_by(d)
    );
    s.notifier.send(notify::Kind::Hazard, &subject, &body);
}

/// `shuttle rescan [--days N] [--path PREFIX]`: a retro-scan now, with no time budget,
/// under the run lock. Exit 0 done, 1 a rescan failed or the run stopped, 2
/// configuration, 3 another run holds the lock. SIGTERM or SIGINT (`crate::signals`)
/// stops it after the deliveries being rescanned; the next one takes the rest.
pub fn main(cli: &crate::config::CommandLine, days: Option<u64>, prefix: Option<&str>) -> ExitCode {
    let loaded = match crate::config::load(cli) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    let mut cfg = loaded.config;
    let log = match crate::logging::start(&cfg, &loaded.warnings) {
        Ok(g) => g,
        Err(line) => {
            eprintln!("{line}");
            return ExitCode::Usage;
        }
    };
    notify::off_when_unusable(&mut cfg.notifications);
    let stop = crate::signals::stop_flag_or_warn("retro-scan");
    let code = match now(
        &cfg,
        days.unwrap_or(cfg.rescan.days),
        prefix,
        stop.as_deref(),
    ) {
        Ok(counts) => {
            let stopped =
                stop.as_deref().is_some_and(|f| f.load(Ordering::SeqCst)) && counts.unfinished;
            println!(
                "retro-scan: {} rescanned: {} clean, {} alerted, {} withdrawn, {} failed; {} changed and {} gone downstream (left alone); {:.1} s{}",
                counts.scanned,
                counts.clean,
                counts.alerted,
                counts.withdrawn,
                counts.failed,
                counts.changed,
                counts.gone,
                counts.seconds,
                if stopped {
                    "; stopped on request before the end: the next `shuttle rescan` takes the rest"
                } else {
                    ""
                }
            );
            if counts.failed > 0 {
                ExitCode::Failed
            } else {
                ExitCode::Ok
            }
        }
        Err(NowError::Run(crate::preflight::RunError::Lock(crate::lock::LockError::Held {
            pid,
            path,
            ..
        }))) => {
            tracing::error!(
                "another shuttle run is active (pid {pid}) holding {}",
                path.display()
            );
            ExitCode::Locked
        }
        Err(NowError::Run(crate::preflight::RunError::Config(msg))) => {
            for line in msg.lines() {
                tracing::error!("configuration error: {line}");
            }
            ExitCode::Usage
        }
        Err(e) => {
            tracing::error!("retro-scan stopped: {e}");
            ExitCode::Failed
        }
    };
    match log.finish() {
        Err(e) => {
            eprintln!("shuttle: {e}");
            code.or_failed()
        }
        Ok(()) => code,
    }
}

/// Why `shuttle rescan` could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum NowError {
    #[error(transparent)]
    Run(#[from] crate::preflight::RunError),
    #[error(transparent)]
    Rescan(#[from] RescanError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("scanner not usable: {0}")]
    Scanner(#[from] crate::scan::EngineProblem),
    #[error("signatures too old: {0}")]
    Stale(String),
}

/// The retro-scan of `shuttle rescan`.
fn now(
    cfg: &Config,
    days: u64,
    prefix: Option<&str>,
    stop: Option<&AtomicBool>,
) -> Result<RescanCounts, NowError> {
    crate::preflight::preflight(cfg)?;
    let _lock = crate::lock::acquire(&cfg.lock_path).map_err(crate::preflight::RunError::Lock)?;
    let engines = crate::scan::enabled(cfg).map_err(crate::preflight::RunError::Config)?;
    let hazard =
        HazardArchive::open(cfg).map_err(|e| crate::preflight::RunError::Config(e.to_string()))?;
    let journal = Mutex::new(crate::journal::open(cfg)?);
    let mut scanners = Scanners::start(
        engines,
        crate::scan::Policy::from_config(&cfg.scanning),
        cfg.scanning.canary,
    )?;
    let max_age = crate::scan::max_signature_age(&cfg.scanning);
    let stale = scanners.stale_signatures(max_age);
    if !stale.is_empty() {
        return Err(NowError::Stale(stale.join("; ")));
    }
    scanners.keep_fresh(max_age);
    let notifier = Notifier::new(&cfg.notifications);
    let slice = Slice {
        cfg,
        journal: &journal,
        scanners: &scanners,
        hazard: hazard.as_ref(),
        notifier: &notifier,
        run_id: None,
        days,
        prefix,
        budget: None,
        stop,
        use_mark: false,
        own: None,
    };
    Ok(self::slice(&slice)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers_and_old_records_are_read() {
        assert!(newer("27451", "27450"));
        assert!(!newer("27450", "27450"));
        assert!(!newer("9", "27450"));
        let d = Delivery {
            file_id: 1,
            rel_path: "a".into(),
            size: 1,
            mtime_ns: 0,
            sha256: None,
            scan_results: Some(
                serde_json::json!([{"scanner": "clamav", "version": "ClamAV 1.0.7/27400/Mon Sep 29 2025"}]),
            ),
            final_path: "/d/a".into(),
            finished_at: 0,
        };
        let sig = |v: &str| {
            vec![(
                "clamav",
                Signatures {
                    version: v.into(),
                    updated: None,
                },
            )]
        };
        assert!(needs_rescan(&d, &sig("27401")));
        assert!(!needs_rescan(&d, &sig("27400")));
        assert_eq!(generation(&sig("27401")), "clamav=27401");
    }
}
