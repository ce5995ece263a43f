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
}

impl FileResult {
    fn new(job: &Job) -> FileResult {
        FileResult {
            id: job.id,
            rel: job.candidate.rel.to_string_lossy().into_owned(),
            size: job.candidate.size,
            outcome: Outcome::Failed,
            sha256: None,
            destination: None,
            detections: Vec::new(),
            error: None,
            scanners: serde_json::Value::Null,
            kept: None,
            fatal: None,
        }
    }
}

/// Runs `f` on the journal; a failed write stops the run (the file stays safe: the
/// journal only ever lags the disk).
fn journal(
    run: &Run,
    r: &mut FileResult,
    f: impl FnOnce(&Journal) -> Result<(), crate::journal::JournalError>,
) {
    if let Err(e) = f(&lock(run.journal)) {
        tracing::error!("journal write failed for {}: {e}", r.rel);
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
    let (id, dest, err) = (r.id, r.destination.clone(), r.error.clone());
    journal(run, &mut r, |j| {
        j.file_finished(id, outcome, disposition, dest.as_deref(), err.as_deref())
    });
    r
}

/// Handles one admitted file.
pub fn handle(run: &Run, job: &Job, buf: &mut [u8]) -> FileResult {
    let cfg = run.cfg;
    let rel = job.candidate.rel.as_path();
    let mut r = FileResult::new(job);

    // 7. Quarantine.
    let expected = (job.candidate.size, job.candidate.mtime_ns);
    let q = match quarantine::copy_in(
        &cfg.source_path,
        &cfg.quarantine_path,
        rel,
        job.id,
        expected,
        buf,
    ) {
        Ok(q) => q,
        Err(
            e @ (QuarantineError::Changed(_)
            | QuarantineError::Vanished
            | QuarantineError::NotRegular),
        ) => {
            tracing::info!("skipped {:?}: {e}", rel);
            return finish(
                run,
                r,
                Outcome::Skipped,
                "left_in_source",
                Some(e.to_string()),
            );
        }
        Err(e) => {
            tracing::error!("FAILED {:?}: {e}; source left in place", rel);
            if matches!(e, QuarantineError::DiskFull { .. }) {
                r.fatal = Some(e.to_string());
            }
            return finish(
                run,
                r,
                Outcome::Failed,
                "quarantine_failed",
                Some(e.to_string()),
            );
        }
    };
    r.sha256 = Some(q.sha256.clone());
    let sha = q.sha256.clone();
    journal(run, &mut r, |j| j.file_quarantined(job.id, &sha));

    // 8. Scan.
    let max = cfg.scanning.max_file_size_mb.saturating_mul(1_048_576);
    let scan = if max > 0 && q.size > max {
        None
    } else {
        Some(run.scanners.scan(&q.path, q.size, &|| open_copy(&q)))
    };
    let verdict = match &scan {
        None => FileVerdict::Failed(format!(
            "larger than max_file_size_mb ({} MB): not scanned",
            cfg.scanning.max_file_size_mb
        )),
        Some(s) => s.verdict.clone(),
    };
    if let Some(s) = &scan {
        r.scanners = serde_json::to_value(&s.results).unwrap_or_default();
    }
    let (label, results) = (verdict_label(&verdict), r.scanners.clone());
    journal(run, &mut r, |j| j.file_scanned(job.id, label, &results));

    // 9. Dispose.
    let disposed = match verdict {
        FileVerdict::Clean => deliver_clean(run, r, &q, rel, job.id, buf),
        FileVerdict::Suspect(detections) => {
            let engines = scan.as_ref().map(|s| &s.results[..]).unwrap_or(&[]);
            dispose_suspect(run, r, &q, job.id, detections, engines)
        }
        FileVerdict::Failed(why) => {
            remove_copy(&q);
            tracing::error!("FAILED {:?}: {why}; source left for the next run", rel);
            return finish(run, r, Outcome::Failed, "scan_failed", Some(why));
        }
    };
    let mut r = match disposed {
        Disposed::SourceMayGo(r) => r,
        Disposed::Finished(r) => return r,
    };

    // 10. Source removal.
    if cfg.delete_source_files {
        match cleanup::remove_source(&cfg.source_path, rel, &q, buf) {
            Ok(()) => {
                let id = r.id;
                journal(run, &mut r, |j| j.source_removed(id));
            }
            Err(SourceKept::Gone) => {}
            Err(kept) => {
                tracing::warn!("source {:?} kept: {kept}", rel);
                r.kept = Some(KeptSource {
                    path: r.rel.clone(),
                    reason: kept.to_string(),
                });
            }
        }
    }
    r
}

/// Opens the quarantine copy for a scan, checking it is still the file written.
fn open_copy(q: &Quarantined) -> std::io::Result<File> {
    let f = fsx::open_read_nofollow(&q.path)?;
    let now = Stamp::of(&f.metadata()?);
    if (now.dev, now.ino, now.size, now.mtime_ns)
        != (q.copy.dev, q.copy.ino, q.copy.size, q.copy.mtime_ns)
    {
        return Err(std::io::Error::other(
            "quarantine copy was replaced or modified",
        ));
    }
    Ok(f)
}

fn remove_copy(q: &Quarantined) {
    if let Err(e) = fsx::remove_if_exists(&q.path) {
        tracing::error!("cannot remove quarantine copy {}: {e}", q.path.display());
    }
}

fn verdict_label(v: &FileVerdict) -> &'static str {
    match v {
        FileVerdict::Clean => "clean",
        FileVerdict::Suspect(_) => "suspect",
        FileVerdict::Failed(_) => "failed",
    }
}

/// After disposal: may the source be removed (DESIGN §1.10)?
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
        root: &cfg.destination_path,
        on_conflict: cfg.on_conflict,
        same_fs: same_fs(cfg),
    };
    match deliver::deliver(q, rel, id, &target, buf) {
        Ok(d) => {
            r.destination = Some(d.path.display().to_string());
            tracing::info!(
                "clean: {:?} -> {} ({})",
                rel,
                d.path.display(),
                d.how.as_str()
            );
            Disposed::SourceMayGo(finish(run, r, Outcome::Clean, d.how.as_str(), None))
        }
        Err(DeliverError::ConflictSkipped(p)) => {
            remove_copy(q);
            tracing::warn!(
                "not delivered: {} holds different bytes (on_conflict = skip); source {:?} kept",
                p.display(),
                rel
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
            remove_copy(q);
            tracing::error!("FAILED {:?}: {e}; source left in place", rel);
            if matches!(e, DeliverError::DiskFull { .. }) {
                r.fatal = Some(e.to_string());
            }
            Disposed::Finished(finish(
                run,
                r,
                Outcome::Failed,
                "delivery_failed",
                Some(e.to_string()),
            ))
        }
    }
}

/// Suspect branch: archive (when configured) and delete the quarantine copy.
fn dispose_suspect(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    id: i64,
    detections: Vec<String>,
    engines: &[EngineResult],
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
    };
    let disposed = match run.hazard {
        // The copy is re-opened through the identity check: only the bytes that
        // were scanned are archived (store() verifies their SHA-256 as well).
        Some(_) => open_copy(q)
            .map(Some)
            .map_err(|source| hazard::HazardError::Io {
                action: "open the suspect quarantine copy",
                path: q.path.clone(),
                source,
            }),
        None => Ok(None),
    }
    .and_then(|mut copy| {
        let mut none = std::io::empty();
        let plaintext: &mut dyn std::io::Read = match copy.as_mut() {
            Some(f) => f,
            None => &mut none,
        };
        hazard::dispose(run.hazard, &q.path, plaintext, &meta)
    });
    match disposed {
        Ok(disposal) => {
            let (how, place) = match &disposal {
                hazard::Disposal::Archived(stored) => {
                    let row = hazard_row(stored);
                    journal(run, &mut r, |j| j.hazard_archived(&row));
                    r.destination = Some(stored.archive.display().to_string());
                    (
                        "archived",
                        format!("encrypted into {}", stored.archive.display()),
                    )
                }
                hazard::Disposal::Deleted => (
                    "deleted",
                    "deleted (no hazard archive configured)".to_string(),
                ),
            };
            tracing::warn!("SUSPECT {:?}: {found}; quarantine copy {place}", rel);
            run.notifier.send(
                notify::Kind::Hazard,
                &format!("Shuttle: suspect file {}", r.rel),
                &format!(
                    "File: {}\nSHA-256: {}\nDetections: {found}\nDisposal: {place}\n",
                    r.rel, q.sha256
                ),
            );
            if !run.cfg.delete_source_files {
                tracing::warn!(
                    "suspect source {:?} stays in the drop directory (delete_source_files_after_copying is off)",
                    rel
                );
            }
            Disposed::SourceMayGo(finish(run, r, Outcome::Suspect, how, None))
        }
        Err(e) => {
            remove_copy(q);
            tracing::error!(
                "FAILED {:?} (suspect: {found}): {e}; source left in place",
                rel
            );
            if e.is_disk_full() {
                r.fatal = Some(e.to_string());
            }
            Disposed::Finished(finish(
                run,
                r,
                Outcome::Failed,
                "hazard_failed",
                Some(e.to_string()),
            ))
        }
    }
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

/// Are quarantine and destination on one filesystem (delivery by rename)?
fn same_fs(cfg: &crate::config::Config) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(&cfg.quarantine_path),
        std::fs::metadata(&cfg.destination_path),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}
