//! Steps 7–9 for one file: quarantine, scan, dispose. Its life reads top to bottom in
//! [`handle`], which ends in a typed [`FileResult`]: the outcome, the disposition, and
//! what may become of the source ([`Settle`]). Recording the end and removing the
//! source (step 10) is `settle.rs`'s, the same for every outcome.
//!
//! Each step is recorded in the journal only after it is durable. Whatever goes
//! wrong, the source stays where it was unless its copy is safely delivered or
//! archived.

use std::fs::File;
use std::path::Path;

use super::context::{Job, Run, identity, lock};
use super::settle::{FileResult, Settle};
use crate::deliver::DeliverError;
use crate::fsx;
use crate::hazard;
use crate::journal::{Journal, Outcome};
use crate::names::shown;
use crate::notify;
use crate::quarantine::{self, QuarantineError, Quarantined, Stamp};
use crate::report::KeptSource;
use crate::scan::{EngineResult, FileVerdict};
use crate::states::{Disposition, SkipKind, StopReason, Verdict};

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
            .get_or_insert_with(|| StopReason::Journal(e.to_string()));
    }
}

/// The end of a file's handling whose source stays; settling records it.
fn finish(
    mut r: FileResult,
    outcome: Outcome,
    disposition: Disposition,
    error: Option<String>,
) -> FileResult {
    r.outcome = outcome;
    r.disposition = disposition;
    r.error = error;
    r
}

/// Ends a file as failed: its quarantine copy (if any) removed, the source left where
/// it is for the next run, one log line; a full disk also stops the run.
fn fail(
    mut r: FileResult,
    copy: Option<&Quarantined>,
    disposition: Disposition,
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
        r.fatal = Some(StopReason::Fatal(why.clone()));
    }
    finish(r, Outcome::Failed, disposition, Some(why))
}

/// Handles one admitted file.
pub fn handle(run: &Run, job: &Job, buf: &mut [u8], dirs: &mut quarantine::DirCache) -> FileResult {
    let rel = job.candidate.rel.as_path();
    let mut r = FileResult::blank(
        job.id,
        job.candidate.rel.to_string_lossy().into_owned(),
        job.candidate.size,
        Outcome::Failed,
    );

    // Files beyond the engines' size limits or max_file_size_mb were set aside
    // before admission (pipeline::Books::set_aside_before_admission).

    // 7. Quarantine.
    let expected = (job.candidate.size, job.candidate.mtime_ns);
    let q = match quarantine::copy_in(
        &run.roots.source,
        &run.roots.quarantine,
        rel,
        expected,
        run.roots.checks,
        buf,
        dirs,
    ) {
        Ok(q) => q,
        Err(
            e @ (QuarantineError::Changed(_)
            | QuarantineError::Vanished
            | QuarantineError::NotRegular
            | QuarantineError::OpenForWriting { .. }
            | QuarantineError::CannotTell(_)
            | QuarantineError::HardLinked(_)),
        ) => {
            r.skip_label = Some(match e {
                QuarantineError::OpenForWriting { .. } => SkipKind::OpenByProcess,
                QuarantineError::CannotTell(_) => SkipKind::WriterUnknown,
                QuarantineError::HardLinked(_) => SkipKind::HardLinked,
                _ => SkipKind::ChangedOrConflict,
            });
            if matches!(e, QuarantineError::CannotTell(_)) {
                tracing::warn!("skipped {:?}: {e}", shown(rel));
            } else {
                tracing::info!("skipped {:?}: {e}", shown(rel));
            }
            return finish(
                r,
                Outcome::Skipped,
                Disposition::LeftInSource,
                Some(e.to_string()),
            );
        }
        Err(e) => {
            let disk_full = matches!(e, QuarantineError::DiskFull { .. });
            return fail(
                r,
                None,
                Disposition::QuarantineFailed,
                e.to_string(),
                disk_full,
            );
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
    let scan = run.scanners.scan(&q.path, q.size, &|| q.open_for_scan());
    crate::crashpoint::here("scan: scanned, before disposal");
    r.figures = scan.figures_line();
    let verdict = scan.verdict.clone();
    r.scanners = serde_json::value::to_raw_value(&scan.results).ok();
    r.verdict = Some(match verdict {
        FileVerdict::Clean if encrypted_allowed => Verdict::CleanEncrypted,
        _ => verdict_of(&verdict),
    });

    // 9. Dispose. Step 10 (the end recorded, the source removed) is settling's.
    match verdict {
        FileVerdict::Clean => deliver_clean(run, r, &q, rel, job.id, buf),
        FileVerdict::Suspect(detections) => match scan.removed_by {
            None => dispose_suspect(run, r, &q, job.id, detections, &scan.results, None),
            Some(engine) => {
                removed_by_engine(run, r, &q, job.id, detections, &scan.results, engine, buf)
            }
        },
        FileVerdict::Failed(why) => fail(r, Some(&q), Disposition::ScanFailed, why, false),
        FileVerdict::Unscannable(why) => set_aside(run, r, &q, job, Outcome::Unscannable, why),
    }
}

fn remove_copy(q: &Quarantined) {
    if let Err(e) = q.remove() {
        tracing::error!("cannot remove quarantine copy {:?}: {e}", shown(&q.path));
    }
}

fn verdict_of(v: &FileVerdict) -> Verdict {
    match v {
        FileVerdict::Clean => Verdict::Clean,
        FileVerdict::Suspect(_) => Verdict::Suspect,
        FileVerdict::Failed(_) => Verdict::Failed,
        FileVerdict::Unscannable(_) => Verdict::Unscannable,
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
    r.verdict = Some(Verdict::set_aside(outcome));
    let what = crate::journal::SetAside {
        outcome,
        reason: why.clone(),
        limits: run.limits_fingerprint.to_string(),
    };
    let identity = identity(&job.candidate);
    let (id, rel) = (r.id, r.rel.clone());
    journal(run, &mut r, |j| {
        j.set_aside(&identity, &rel, &what, Some(id))
    });
    finish(r, outcome, Disposition::LeftInSource, Some(why))
}

/// Fleet mode: is this file's claim still this node's? A node whose lease ran out
/// and whose file another node took over neither delivers nor archives it (settling
/// checks the fencing token again before any source is removed; this check narrows
/// the window in which both nodes act). `false`: the returned result is the file's
/// end, its copy removed. One node (SQLite) always holds its claims.
fn still_ours(
    run: &Run,
    mut r: FileResult,
    q: &Quarantined,
    id: i64,
    on_error: Disposition,
) -> (FileResult, bool) {
    if run.fleet.is_none() {
        // One node holds every claim: no need to wait for the journal (the committer
        // may hold it for a whole batch).
        return (r, true);
    }
    // The journal's guard is dropped before anything below takes it again.
    let held = lock(run.journal).claim_held(id);
    match held {
        Ok(true) => (r, true),
        Ok(false) => {
            remove_copy(q);
            tracing::warn!(
                "not handled: {:?} was taken over by another node (lease expired); source left to it",
                shown(&r.rel)
            );
            r.skip_label = Some(SkipKind::ClaimLost);
            let ended = finish(
                r,
                Outcome::Skipped,
                Disposition::LeftInSource,
                Some("claim lost: lease expired, another node took the file over".into()),
            );
            (ended, false)
        }
        Err(e) => {
            let why = format!("cannot check this node's claim: {e}");
            (fail(r, Some(q), on_error, why, false), false)
        }
    }
}

/// Clean branch: deliver, verified and durable.
fn deliver_clean(
    run: &Run,
    r: FileResult,
    q: &Quarantined,
    rel: &Path,
    id: i64,
    buf: &mut [u8],
) -> FileResult {
    let (mut r, ours) = still_ours(run, r, q, id, Disposition::DeliveryFailed);
    if !ours {
        return r;
    }
    tracing::debug!("delivering {:?} to the destination", shown(rel));
    // Made durable with its batch: one syncfs for many files (group commit).
    match run.roots.destination.deliver(q, rel, id, buf) {
        Ok(d) => {
            r.destination = Some(d.path.display().to_string());
            tracing::info!(
                "clean: {:?} -> {:?} ({}); {} bytes{}",
                shown(rel),
                shown(&d.path),
                d.how.disposition(),
                q.size,
                r.scan_part()
            );
            // Not finished yet: the journal records it, and the source goes, only
            // once the batch it joins is durable (settle::Settle::AfterSync).
            r.settle = Settle::AfterSync(q.source_record());
            finish(r, Outcome::Clean, d.how.disposition(), None)
        }
        Err(DeliverError::ConflictSkipped(p)) => {
            remove_copy(q);
            tracing::warn!(
                "not delivered: {:?} holds different bytes (on_conflict = skip); source {:?} kept{}",
                shown(&p),
                shown(rel),
                r.scan_part()
            );
            finish(
                r,
                Outcome::Skipped,
                Disposition::ConflictSkipped,
                Some(format!("{} exists", p.display())),
            )
        }
        Err(e) => {
            let disk_full = matches!(e, DeliverError::DiskFull { .. });
            fail(
                r,
                Some(q),
                Disposition::DeliveryFailed,
                e.to_string(),
                disk_full,
            )
        }
    }
}

/// Suspect branch: archive (when configured) and delete the quarantine copy.
/// `removed_by`: the engine that already removed the quarantine copy itself, with the
/// source, verified to hold the scanned bytes, open for archiving instead (see
/// [`removed_by_engine`]).
fn dispose_suspect(
    run: &Run,
    r: FileResult,
    q: &Quarantined,
    id: i64,
    detections: Vec<String>,
    engines: &[EngineResult],
    removed_by: Option<(&'static str, File)>,
) -> FileResult {
    let (mut r, ours) = still_ours(run, r, q, id, Disposition::HazardFailed);
    if !ours {
        return r;
    }
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
                        Disposition::Archived,
                        format!("encrypted into {}{from}", shown(&stored.archive)),
                    )
                }
                (hazard::Disposal::Deleted, Some(engine)) => (
                    Disposition::RemovedByScanner,
                    format!(
                        "removed by {engine} itself (defender_handles_suspect_files); the source holds the same bytes{}",
                        none_kept(run)
                    ),
                ),
                (hazard::Disposal::Deleted, None) => (
                    Disposition::Deleted,
                    format!("deleted (no hazard archive configured){}", none_kept(run)),
                ),
            };
            announce_suspect(
                run,
                &r,
                q,
                &found,
                SuspectFate {
                    logged: &format!("quarantine copy {place}"),
                    disposal: &place,
                    source_kept: false,
                },
            );
            if !run.policy.delete_source {
                tracing::warn!(
                    "suspect source {:?} stays in the drop directory (delete_source_files_after_copying is off)",
                    shown(&rel)
                );
            }
            r.settle = Settle::RemoveSource(q.source_record());
            finish(r, Outcome::Suspect, how, None)
        }
        Err(e) => {
            let why = format!("suspect ({found}), but {e}");
            fail(r, Some(q), Disposition::HazardFailed, why, e.is_disk_full())
        }
    }
}

/// What a suspect's line adds when no hazard archive keeps it: with sources deleted,
/// nothing of the file will be left once its source goes (which a later line says
/// did not happen, if the source changed or is in use), and which settings keep one.
fn none_kept(run: &Run) -> &'static str {
    if run.policy.delete_source {
        "; once its source is removed as well, no copy of the file is kept (set \
         hazard_archive_path and hazard_encryption_key_path to keep suspect files, encrypted)"
    } else {
        ""
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
) -> FileResult {
    let rel = q.rel.as_path();
    let found = detections.join(", ");
    match q.stat() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => {
            // Gone during the scan, present again now: not ours to trust.
            let why = format!(
                "quarantine copy vanished after {engine}'s detection ({found}) and then reappeared ({other:?})"
            );
            r.detections = detections;
            return fail(r, Some(q), Disposition::ScanFailed, why, false);
        }
    }
    let handled = engine == "defender" && run.policy.defender_handles_suspects;
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
            announce_suspect(
                run,
                &r,
                q,
                &found,
                SuspectFate {
                    logged: &format!("{why}; source kept"),
                    disposal: &format!("{why}; the source stays in the drop directory"),
                    source_kept: true,
                },
            );
            r.kept = Some(KeptSource {
                path: r.rel.clone(),
                reason: why.clone(),
            });
            finish(
                r,
                Outcome::Suspect,
                Disposition::RemovedByScanner,
                Some(why),
            )
        }
    }
}

/// What became of a suspect file, as its log line and its mail say it.
struct SuspectFate<'a> {
    /// After the detections in the log line.
    logged: &'a str,
    /// The mail's `Disposal:` line.
    disposal: &'a str,
    /// The source stays for the administrator: the line is an error, not a warning.
    source_kept: bool,
}

/// The one log line and the mail of a suspect file.
fn announce_suspect(run: &Run, r: &FileResult, q: &Quarantined, found: &str, fate: SuspectFate) {
    let SuspectFate {
        logged,
        disposal,
        source_kept,
    } = fate;
    if source_kept {
        tracing::error!(
            "SUSPECT {:?}: {found}; {logged}; {} bytes{}",
            shown(&r.rel),
            q.size,
            r.scan_part()
        );
    } else {
        tracing::warn!(
            "SUSPECT {:?}: {found}; {logged}; {} bytes{}",
            shown(&r.rel),
            q.size,
            r.scan_part()
        );
    }
    run.notifier.send(
        notify::Kind::Hazard,
        &format!("Shuttle: suspect file {}", shown(&r.rel)),
        &format!(
            "File: {}\nSHA-256: {}\nDetections: {found}\nDisposal: {disposal}\n",
            shown(&r.rel),
            q.sha256
        ),
    );
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
    let (sha, _) = fsx::hash_file(&mut f, buf, None)
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
