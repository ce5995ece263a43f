//! Steps 7–10 for one file: quarantine, scan, dispose, remove the source.
//!
//! Each step is recorded in the journal only after it is durable. Whatever goes
//! wrong, the source stays where it was unless its copy is safely delivered or
//! archived.

use std::fs::File;
use std::path::Path;

use super::pipeline::{Job, Run, lock};
use crate::cleanup::{self, SourceKept};
use crate::deliver::{self, DeliverError, Target};
use crate::fsx;
use crate::hazard;
use crate::journal::{Journal, Outcome};
use crate::names::shown;
use crate::notify;
use crate::quarantine::{self, QuarantineError, Quarantined, Stamp};
use crate::report::KeptSource;
use crate::scan::{EngineResult, FileVerdict};

/// The outcome of one file, sent back to the admission thread.
#[derive(Debug)]
pub struct FileResult {
    pub id: i64,
    pub rel: String,
    pub size: u64,
    pub outcome: Outcome,
    pub sha256: Option<String>,
    pub destination: Option<String>,
    pub detections: Vec<String>,
    pub error: Option<String>,
    pub scanners: serde_json::Value,
    pub kept: Option<KeptSource>,
    /// A problem that must stop the run (disk full, journal broken).
    pub fatal: Option<String>,
    /// "clean", "suspect" or "failed" once scanned.
    pub verdict: Option<&'static str>,
    /// Delivered but not yet durable: the admission thread commits it with its batch
    /// (one syncfs, one journal transaction) and only then removes the source.
    pub pending: Option<Pending>,
    /// Per-engine scan figures for the file's log line (empty until scanned).
    pub figures: String,
    /// Skipped: the report's `skipped_by_reason` label.
    pub skip_label: Option<&'static str>,
}

/// A clean delivery waiting for its batch's commit.
#[derive(Debug)]
pub struct Pending {
    pub q: Quarantined,
    pub disposition: &'static str,
}

impl FileResult {
    fn new(job: &Job) -> FileResult {
        let rel = job.candidate.rel.to_string_lossy().into_owned();
        FileResult::blank(job.id, rel, job.candidate.size, Outcome::Failed)
    }

    /// A file's result before anything is known about it beyond its identity.
    fn blank(id: i64, rel: String, size: u64, outcome: Outcome) -> FileResult {
        FileResult {
            skip_label: None,
            id,
            rel,
            size,
            outcome,
            sha256: None,
            destination: None,
            detections: Vec::new(),
            error: None,
            scanners: serde_json::Value::Null,
            kept: None,
            fatal: None,
            verdict: None,
            pending: None,
            figures: String::new(),
        }
    }

    /// `; scan: clamav 12 ms for 3000 bytes (timeout 300.0 s)` once scanned.
    fn scan_part(&self) -> String {
        if self.figures.is_empty() {
            String::new()
        } else {
            format!("; scan: {}", self.figures)
        }
    }

    /// A file set aside before it was admitted (never copied).
    pub fn set_aside(id: i64, rel: String, size: u64, outcome: Outcome, why: String) -> FileResult {
        FileResult {
            error: Some(why),
            ..FileResult::blank(id, rel, size, outcome)
        }
    }

    /// The journal's final record of this file.
    pub fn finished<'a>(&'a self, disposition: &'a str) -> crate::journal::Finished<'a> {
        crate::journal::Finished {
            id: self.id,
            outcome: self.outcome,
            disposition,
            final_path: self.destination.as_deref(),
            error: self.error.as_deref(),
            sha256: self.sha256.as_deref(),
            verdict: self.verdict,
            scan_results: Some(&self.scanners),
        }
    }
}

/// Runs `f` on the journal; a failed write stops the run (the file stays safe: the
/// journal only ever lags the disk).
fn journal(
    run: &Run,
    r: &mut FileResult,
    f: impl FnOnce(&dyn Journal) -> Result<(), crate::journal::JournalError>,
) {
    if let Err(e) = f(&**lock(run.journal)) {
        tracing::error!("journal write failed for {}: {e}", shown(&r.rel));
        r.fatal
            .get_or_insert_with(|| format!("journal write failed: {e}"));
    }
}

fn finish(
    run: &Run,
    mut r: FileResult,
    outcome: Outcome,
    disposition: &str,
    error: Option<String>,
) -> FileResult {
    r.outcome = outcome;
    r.error = error;
    if let Err(e) = lock(run.journal).file_finished(&r.finished(disposition)) {
        tracing::error!("journal write failed for {}: {e}", shown(&r.rel));
        r.fatal
            .get_or_insert_with(|| format!("journal write failed: {e}"));
    }
    r
}

/// Ends a file as failed: its quarantine copy (if any) removed, the source left where
/// it is for the next run, one log line; a full disk also stops the run.
fn fail(
    run: &Run,
    mut r: FileResult,
    copy: Option<&Quarantined>,
    disposition: &str,
    why: String,
    disk_full: bool,
) -> FileResult {
    if let Some(q) = copy {
        remove_copy(q);
    }
    tracing::error!(
        "FAILED {:?}: {why}; source left in place; {} bytes{}",
        shown(&r.rel),
        r.size,
        r.scan_part()
    );
    if disk_full {
        r.fatal = Some(why.clone());
    }
    finish(run, r, Outcome::Failed, disposition, Some(why))
}

/// Handles one admitted file.
pub fn handle(run: &Run, job: &Job, buf: &mut [u8]) -> FileResult {
    let cfg = run.cfg;
    let rel = job.candidate.rel.as_path();
    let mut r = FileResult::new(job);

    // Files beyond the engines' size limits or max_file_size_mb were set aside
    // before admission (pipeline::Books::set_aside_before_admission).

    // 7. Quarantine.
    let expected = (job.candidate.size, job.candidate.mtime_ns);
    let q = match quarantine::copy_in(
        &run.roots.source,
        &run.roots.quarantine,
        rel,
        job.id,
        expected,
        run.roots.checks,
        buf,
    ) {
        Ok(q) => q,
        Err(
            e @ (QuarantineError::Changed(_)
            | QuarantineError::Vanished
            | QuarantineError::NotRegular
            | QuarantineError::OpenForWriting(_)
            | QuarantineError::CannotTell(_)
            | QuarantineError::HardLinked(_)),
        ) => {
            r.skip_label = Some(match e {
                QuarantineError::OpenForWriting(_) => "open_by_process",
                QuarantineError::CannotTell(_) => "writer_unknown",
                QuarantineError::HardLinked(_) => "hard_linked",
                _ => "changed_or_conflict",
            });
            if matches!(e, QuarantineError::CannotTell(_)) {
                tracing::warn!("skipped {:?}: {e}", shown(rel));
            } else {
                tracing::info!("skipped {:?}: {e}", shown(rel));
            }
            return finish(
                run,
                r,
                Outcome::Skipped,
                "left_in_source",
                Some(e.to_string()),
            );
        }
        Err(e) => {
            let disk_full = matches!(e, QuarantineError::DiskFull { .. });
            return fail(run, r, None, "quarantine_failed", e.to_string(), disk_full);
        }
    };
    r.sha256 = Some(q.sha256.clone());
    tracing::debug!(
        "quarantined {:?}: {} bytes, sha256 {}",
        shown(rel),
        q.size,
        q.sha256
    );

    // 8. Scan: first Shuttle's own judgement of archives, then every engine.
    let encrypted_allowed = match inspect_archive(run, &q) {
        Ok(encrypted) => encrypted,
        Err(why) => return set_aside(run, r, &q, job, Outcome::Unscannable, why),
    };
    crate::crashpoint::here("scan: quarantined, before scan");
    let scan = run.scanners.scan(&q.path, q.size, &|| q.reopen());
    crate::crashpoint::here("scan: scanned, before disposal");
    r.figures = scan.figures_line();
    let verdict = scan.verdict.clone();
    r.scanners = serde_json::to_value(&scan.results).unwrap_or_default();
    r.verdict = Some(match verdict {
        FileVerdict::Clean if encrypted_allowed => CLEAN_ENCRYPTED,
        _ => verdict_label(&verdict),
    });

    // 9. Dispose.
    let disposed = match verdict {
        FileVerdict::Clean => deliver_clean(run, r, &q, rel, job.id, buf),
        FileVerdict::Suspect(detections) => match scan.removed_by {
            None => dispose_suspect(run, r, &q, job.id, detections, &scan.results, None),
            Some(engine) => {
                removed_by_engine(run, r, &q, job.id, detections, &scan.results, engine, buf)
            }
        },
        FileVerdict::Failed(why) => return fail(run, r, Some(&q), "scan_failed", why, false),
        FileVerdict::Unscannable(why) => {
            return set_aside(run, r, &q, job, Outcome::Unscannable, why);
        }
    };
    let mut r = match disposed {
        Disposed::SourceMayGo(r) => r,
        Disposed::Finished(r) => return r,
    };

    // 10. Source removal.
    if cfg.delete_source_files {
        match remove_source(run, &q, buf) {
            Ok(true) => {
                let id = r.id;
                journal(run, &mut r, |j| j.source_removed(id));
            }
            Ok(false) => {}
            Err(kept) => r.kept = Some(kept),
        }
    }
    r
}

/// Step 10 for one file: removes its source if it still holds the scanned bytes.
/// `Ok(false)`: it was already gone; `Err`: kept, and why.
pub fn remove_source(run: &Run, q: &Quarantined, buf: &mut [u8]) -> Result<bool, KeptSource> {
    match cleanup::remove_source(&run.roots.source, &q.rel, q, run.roots.checks.writers, buf) {
        Ok(()) => {
            tracing::debug!("source {:?} removed", shown(&q.rel));
            Ok(true)
        }
        Err(SourceKept::Gone) => Ok(false),
        Err(kept) => {
            tracing::warn!("source {:?} kept: {kept}", shown(&q.rel));
            Err(KeptSource {
                path: q.rel.to_string_lossy().into_owned(),
                reason: kept.to_string(),
            })
        }
    }
}

fn remove_copy(q: &Quarantined) {
    if let Err(e) = q.remove() {
        tracing::error!("cannot remove quarantine copy {:?}: {e}", shown(&q.path));
    }
}

/// The verdict recorded for an encrypted archive delivered because
/// `block_encrypted_archives` is off.
pub const CLEAN_ENCRYPTED: &str = "clean (encrypted archive contents unscanned)";

fn verdict_label(v: &FileVerdict) -> &'static str {
    match v {
        FileVerdict::Clean => "clean",
        FileVerdict::Suspect(_) => "suspect",
        FileVerdict::Failed(_) => "failed",
        FileVerdict::Unscannable(_) => "unscannable",
    }
}

/// Shuttle's own look into an archive (scan::archive). `Ok(true)`: an encrypted
/// archive allowed by `block_encrypted_archives = false`; `Err`: unscannable, why.
fn inspect_archive(run: &Run, q: &Quarantined) -> Result<bool, String> {
    use crate::scan::archive::{self, Finding};
    if !q.maybe_archive {
        return Ok(false);
    }
    let mut f = q
        .reopen()
        .map_err(|e| format!("quarantine copy cannot be opened for inspection: {e}"))?;
    match archive::inspect(&mut f, &run.limits.archive()) {
        Ok(Finding::NotArchive | Finding::WithinLimits) => Ok(false),
        Ok(Finding::EncryptedAllowed) => Ok(true),
        Ok(Finding::Unscannable(why)) => Err(why),
        Err(e) => Err(format!("archive inspection failed: {e}")),
    }
}

/// The one log line of a file set aside.
pub fn log_set_aside(rel: &str, outcome: Outcome, why: &str) {
    let label = match outcome {
        Outcome::TooLarge => "TOO LARGE",
        _ => "UNSCANNABLE",
    };
    tracing::error!(
        "{label} {rel:?}: {why}; left in the source untouched and set aside: not copied or reported again until it changes or the limits change"
    );
}

/// Ends a file as set aside after it was copied: the copy removed, the source left
/// untouched, remembered by its identity so that it is not copied again.
fn set_aside(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    job: &Job,
    outcome: Outcome,
    why: String,
) -> FileResult {
    remove_copy(q);
    log_set_aside(&r.rel, outcome, &why);
    r.verdict = Some(outcome.as_str());
    let what = crate::journal::SetAside {
        outcome,
        reason: why.clone(),
        limits: run.limits_fingerprint.to_string(),
    };
    let identity = super::pipeline::identity(&job.candidate);
    let (id, rel) = (r.id, r.rel.clone());
    journal(run, &mut r, |j| {
        j.set_aside(&identity, &rel, &what, Some(id))
    });
    finish(run, r, outcome, "left_in_source", Some(why))
}

/// After disposal: may the source be removed (docs/design.md §1.10)?
enum Disposed {
    /// The copy is durable in the destination or hazard archive, or deliberately
    /// deleted as suspect.
    SourceMayGo(FileResult),
    /// The file's handling ended here; the source stays.
    Finished(FileResult),
}

/// Clean branch: deliver, verified and durable.
fn deliver_clean(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    rel: &Path,
    id: i64,
    buf: &mut [u8],
) -> Disposed {
    let cfg = run.cfg;
    let target = Target {
        root: &run.roots.destination,
        on_conflict: cfg.on_conflict,
        same_fs: run.roots.same_fs,
        // Made durable with its batch: one syncfs for many files (group commit).
        durable: false,
    };
    // Fleet: a node whose claim was taken over does not deliver (the group commit
    // checks the fencing token again; this only narrows the window).
    // (The guard must be gone before `finish` or `fail` takes the journal again.)
    let held = lock(run.journal).claim_held(id);
    match held {
        Ok(true) => {}
        Ok(false) => {
            remove_copy(q);
            tracing::warn!(
                "not delivered: {:?} was taken over by another node (lease expired); source left to it",
                shown(rel)
            );
            r.skip_label = Some("claim_lost");
            return Disposed::Finished(finish(
                run,
                r,
                Outcome::Skipped,
                "claim_lost",
                Some("claim lost: lease expired, another node took the file over".into()),
            ));
        }
        Err(e) => {
            return Disposed::Finished(fail(
                run,
                r,
                Some(q),
                "journal_failed",
                format!("cannot check this node's claim: {e}"),
                false,
            ));
        }
    }
    tracing::debug!("delivering {:?} to the destination", shown(rel));
    match deliver::deliver(q, rel, id, &target, buf) {
        Ok(d) => {
            r.destination = Some(d.path.display().to_string());
            tracing::info!(
                "clean: {:?} -> {:?} ({}); {} bytes{}",
                shown(rel),
                shown(&d.path),
                d.how.as_str(),
                q.size,
                r.scan_part()
            );
            // Not finished yet: the journal records it, and the source goes, only
            // once the batch it joins is durable (pipeline::Batch).
            r.outcome = Outcome::Clean;
            r.pending = Some(Pending {
                q: q.clone(),
                disposition: d.how.as_str(),
            });
            Disposed::Finished(r)
        }
        Err(DeliverError::ConflictSkipped(p)) => {
            remove_copy(q);
            tracing::warn!(
                "not delivered: {:?} holds different bytes (on_conflict = skip); source {:?} kept{}",
                shown(&p),
                shown(rel),
                r.scan_part()
            );
            Disposed::Finished(finish(
                run,
                r,
                Outcome::Skipped,
                "conflict_skipped",
                Some(format!("{} exists", p.display())),
            ))
        }
        Err(e) => {
            let disk_full = matches!(e, DeliverError::DiskFull { .. });
            Disposed::Finished(fail(
                run,
                r,
                Some(q),
                "delivery_failed",
                e.to_string(),
                disk_full,
            ))
        }
    }
}

/// Suspect branch: archive (when configured) and delete the quarantine copy.
/// `removed_by`: the engine that already removed the quarantine copy itself, with the
/// source, verified to hold the scanned bytes, open for archiving instead (see
/// [`removed_by_engine`]).
fn dispose_suspect(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    id: i64,
    detections: Vec<String>,
    engines: &[EngineResult],
    removed_by: Option<(&'static str, File)>,
) -> Disposed {
    let found = detections.join(", ");
    r.detections = detections;
    let rel = r.rel.clone();
    let meta = hazard::EntryMeta {
        file_id: id,
        original_path: rel.clone(),
        size: q.size,
        sha256: q.sha256.clone(),
        detections: r.detections.clone(),
        scanners: engines
            .iter()
            .map(|e| hazard::ScannerInfo {
                scanner: e.scanner.to_string(),
                version: e.version.clone(),
            })
            .collect(),
        withdrawn_from: None,
    };
    let engine = removed_by.as_ref().map(|(e, _)| *e);
    // Only the bytes that were scanned are archived: the quarantine copy re-opened
    // through its identity check, or the verified source when the engine removed the
    // copy. store() checks their SHA-256 against the scan's as it encrypts.
    let plaintext = match (run.hazard, removed_by) {
        (None, _) => Ok(None),
        (Some(_), Some((_, source))) => Ok(Some(source)),
        (Some(_), None) => q
            .reopen()
            .map(Some)
            .map_err(|source| hazard::HazardError::Io {
                action: "open the suspect quarantine copy",
                path: q.path.clone(),
                source,
            }),
    };
    let disposed = plaintext.and_then(|mut file| {
        let mut none = std::io::empty();
        let reader: &mut dyn std::io::Read = match file.as_mut() {
            Some(f) => f,
            None => &mut none,
        };
        hazard::dispose(run.hazard, reader, &meta)
    });
    // Archived or not, the suspect quarantine copy goes (through its directory handle).
    remove_copy(q);
    match disposed {
        Ok(disposal) => {
            let (how, place) = match (&disposal, engine) {
                (hazard::Disposal::Archived(stored), _) => {
                    let row = hazard_row(stored);
                    journal(run, &mut r, |j| j.hazard_archived(&row));
                    r.destination = Some(stored.archive.display().to_string());
                    let from = match engine {
                        Some(e) => {
                            format!(" from the source ({e} removed the quarantine copy itself)")
                        }
                        None => String::new(),
                    };
                    (
                        "archived",
                        format!("encrypted into {}{from}", shown(&stored.archive)),
                    )
                }
                (hazard::Disposal::Deleted, Some(engine)) => (
                    "removed_by_scanner",
                    format!(
                        "removed by {engine} itself (defender_handles_suspect_files); the source holds the same bytes"
                    ),
                ),
                (hazard::Disposal::Deleted, None) => (
                    "deleted",
                    "deleted (no hazard archive configured)".to_string(),
                ),
            };
            tracing::warn!(
                "SUSPECT {:?}: {found}; quarantine copy {place}; {} bytes{}",
                shown(&rel),
                q.size,
                r.scan_part()
            );
            run.notifier.send(
                notify::Kind::Hazard,
                &format!("Shuttle: suspect file {}", shown(&r.rel)),
                &format!(
                    "File: {}\nSHA-256: {}\nDetections: {found}\nDisposal: {place}\n",
                    shown(&r.rel),
                    q.sha256
                ),
            );
            if !run.cfg.delete_source_files {
                tracing::warn!(
                    "suspect source {:?} stays in the drop directory (delete_source_files_after_copying is off)",
                    shown(&rel)
                );
            }
            Disposed::SourceMayGo(finish(run, r, Outcome::Suspect, how, None))
        }
        Err(e) => {
            let why = format!("suspect ({found}), but {e}");
            Disposed::Finished(fail(
                run,
                r,
                Some(q),
                "hazard_failed",
                why,
                e.is_disk_full(),
            ))
        }
    }
}

/// Suspect branch when the quarantine copy vanished after `engine`'s detection.
///
/// With `defender_handles_suspect_files` and Defender the remover, that is expected:
/// once the copy is confirmed gone, the source is the suspect copy, provided it is
/// still the file that was copied and hashes to what was scanned; it is then
/// disposed of like a suspect copy and removed per docs/design.md §1.10. In every other case
/// (flag off, another engine, source changed) nothing is delivered and the source
/// stays where it is, for the administrator.
#[allow(clippy::too_many_arguments)]
fn removed_by_engine(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    id: i64,
    detections: Vec<String>,
    engines: &[EngineResult],
    engine: &'static str,
    buf: &mut [u8],
) -> Disposed {
    let rel = q.rel.as_path();
    let cfg = run.cfg;
    let found = detections.join(", ");
    match std::fs::symlink_metadata(&q.path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => {
            // Gone during the scan, present again now: not ours to trust.
            let why = format!(
                "quarantine copy vanished after {engine}'s detection ({found}) and then reappeared ({other:?})"
            );
            r.detections = detections;
            return Disposed::Finished(fail(run, r, Some(q), "scan_failed", why, false));
        }
    }
    let handled = engine == "defender" && cfg.scanning.defender_handles_suspect_files;
    let source_check = if handled {
        source_holds_scanned_bytes(&run.roots.source, rel, q, buf)
    } else {
        Err(format!(
            "{engine} removed the quarantine copy after detecting {found}, but defender_handles_suspect_files is off: Shuttle could not archive it"
        ))
    };
    match source_check {
        Ok(source) => {
            // The source (open, identity- and SHA-256-verified against q.sha256) is
            // the suspect copy now: it is what gets archived. The source itself is
            // removed in step 10 only per docs/design.md §1.10 (hash re-checked).
            dispose_suspect(run, r, q, id, detections, engines, Some((engine, source)))
        }
        Err(why) => {
            r.detections = detections;
            tracing::error!(
                "SUSPECT {:?}: {found}; {why}; source kept; {} bytes{}",
                shown(rel),
                q.size,
                r.scan_part()
            );
            run.notifier.send(
                notify::Kind::Hazard,
                &format!("Shuttle: suspect file {}", shown(&r.rel)),
                &format!(
                    "File: {}\nSHA-256: {}\nDetections: {found}\nDisposal: {why}; the source stays in the drop directory\n",
                    shown(&r.rel),
                    q.sha256
                ),
            );
            r.kept = Some(KeptSource {
                path: r.rel.clone(),
                reason: why.clone(),
            });
            Disposed::Finished(finish(
                run,
                r,
                Outcome::Suspect,
                "removed_by_scanner",
                Some(why),
            ))
        }
    }
}

/// Opens the source and checks it is the file that was quarantined (same inode) and
/// still hashes to the quarantine copy's SHA-256. Returns it open, for archiving.
fn source_holds_scanned_bytes(
    root: &fsx::Beneath,
    rel: &Path,
    q: &Quarantined,
    buf: &mut [u8],
) -> Result<File, String> {
    let path = root.path().join(rel);
    let mut f = root
        .open_read(rel)
        .map_err(|e| format!("source {} cannot be opened: {e}", path.display()))?;
    let before = f
        .metadata()
        .map(|m| Stamp::of(&m))
        .map_err(|e| format!("source {}: {e}", path.display()))?;
    if (before.dev, before.ino) != (q.source.dev, q.source.ino) {
        return Err("the source was replaced after it was quarantined".into());
    }
    let (sha, _) = quarantine::hash_file(&mut f, buf)
        .map_err(|e| format!("source {} cannot be read: {e}", path.display()))?;
    if sha != q.sha256 {
        return Err(format!(
            "the source changed after it was quarantined (sha256 {sha}, scanned {})",
            q.sha256
        ));
    }
    use std::io::Seek;
    f.rewind()
        .map_err(|e| format!("source {}: {e}", path.display()))?;
    Ok(f)
}

fn hazard_row(s: &hazard::Stored) -> crate::journal::HazardRow {
    crate::journal::HazardRow {
        file_id: s.sidecar.file_id,
        archive_path: s.archive.display().to_string(),
        sidecar_path: s.sidecar_path.display().to_string(),
        original_path: s.sidecar.original_path.clone(),
        size: s.sidecar.size,
        sha256: s.sidecar.sha256.clone(),
        detections: serde_json::json!(s.sidecar.detections),
        scanners: serde_json::to_value(&s.sidecar.scanners).unwrap_or_default(),
        archived_at: s.sidecar.archived_at.clone(),
        key_fingerprint: s.sidecar.key_fingerprint.clone(),
    }
}
