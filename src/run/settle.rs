//! Step 10 for every file, whatever its outcome: the one path that records a file's end
//! in the journal and then, where its copy is durable, removes its source
//! (docs/design.md §1.10).
//!
//! A file's handling (`file.rs`) ends in a [`FileResult`] that says, in its [`Settle`],
//! what its source may become: kept (skipped, failed, set aside), removable now (a
//! suspect durably archived or deliberately deleted), or removable once its batch is
//! durable (a clean delivery: the committer `syncfs`es the destination first). Either
//! way [`commit`] does the rest, so a clean delivery and a suspect leave the source by
//! the same steps: the end recorded (one journal transaction), then each source
//! re-opened by handle, checked and re-hashed against what was scanned, unlinked, and
//! the removals recorded. A journal that cannot record the end keeps every source.

use super::context::{Run, lock};
use crate::cleanup::{self, SourceKept};
use crate::journal::Outcome;
use crate::names::shown;
use crate::quarantine::SourceRecord;
use crate::report::KeptSource;
use crate::states::{Disposition, SkipKind, StopReason, Verdict};

/// What settling may do with a file's source.
#[derive(Debug)]
pub enum Settle {
    /// Nothing of the file is durable elsewhere, or its source must stay for the
    /// administrator: record the end only.
    Keep,
    /// The suspect copy is durable in the hazard archive, or was deliberately
    /// deleted: record the end, then remove the source.
    RemoveSource(SourceRecord),
    /// Delivered but not yet durable: the committer makes its batch durable (one
    /// `syncfs`), then records the end and removes the source.
    AfterSync(SourceRecord),
}

impl Settle {
    /// Must the destination be made durable before this file's end is recorded?
    pub fn needs_sync(&self) -> bool {
        matches!(self, Settle::AfterSync(_))
    }
}

/// The typed end of one file's handling, settled by [`commit`] and then counted.
#[derive(Debug)]
pub struct FileResult {
    pub id: i64,
    pub rel: String,
    pub size: u64,
    pub outcome: Outcome,
    /// What became of its bytes (the journal's `disposition`).
    pub disposition: Disposition,
    /// What settling may do with its source.
    pub settle: Settle,
    pub sha256: Option<String>,
    pub destination: Option<String>,
    pub detections: Vec<String>,
    pub error: Option<String>,
    /// Each engine's answer, serialized once when the scan ends: the journal stores
    /// this text and the report embeds it (no JSON tree kept per file).
    pub scanners: Option<Box<serde_json::value::RawValue>>,
    pub kept: Option<KeptSource>,
    /// A problem that must stop the run (disk full, journal broken).
    pub fatal: Option<StopReason>,
    /// The combined verdict once scanned.
    pub verdict: Option<Verdict>,
    /// Per-engine scan figures for the file's log line (empty until scanned).
    pub figures: String,
    /// Skipped: the report's `skipped_by_reason` label.
    pub skip_label: Option<SkipKind>,
}

impl FileResult {
    /// A file's result before anything is known about it beyond its identity.
    pub fn blank(id: i64, rel: String, size: u64, outcome: Outcome) -> FileResult {
        FileResult {
            skip_label: None,
            id,
            rel,
            size,
            outcome,
            disposition: Disposition::LeftInSource,
            settle: Settle::Keep,
            sha256: None,
            destination: None,
            detections: Vec::new(),
            error: None,
            scanners: None,
            kept: None,
            fatal: None,
            verdict: None,
            figures: String::new(),
        }
    }

    /// `; scan: clamav 12 ms for 3000 bytes (timeout 300.0 s)` once scanned.
    pub fn scan_part(&self) -> String {
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
    pub fn finished(&self) -> crate::journal::Finished<'_> {
        crate::journal::Finished {
            id: self.id,
            outcome: self.outcome,
            disposition: self.disposition.as_str(),
            final_path: self.destination.as_deref(),
            error: self.error.as_deref(),
            sha256: self.sha256.as_deref(),
            verdict: self.verdict.map(Verdict::as_str),
            scan_results: self.scanners.as_deref(),
        }
    }
}

/// Settles `batch`, whose copies are durable (a batch of deliveries after its
/// `syncfs`, or one file whose end needs nothing more): records every end in one
/// journal transaction, then removes the sources that may go (with
/// `delete_source_files`), each re-verified, and records the removals.
///
/// `Err`: the ends could not be recorded; every source is kept (each file's
/// [`Settle`] is `Keep` afterwards) and the run must stop. `buf` is the hashing buffer.
pub fn commit(run: &Run, batch: &mut [FileResult], buf: &mut [u8]) -> Result<(), StopReason> {
    let recorded = {
        let records: Vec<_> = batch.iter().map(FileResult::finished).collect();
        (run.hooks.record_batch)(&**lock(run.journal), &records)
    };
    let lost = match recorded {
        Ok(lost) => lost,
        Err(e) => {
            // The journal does not know these files finished: keep their sources.
            let mut kept = 0;
            for r in batch.iter_mut() {
                if !matches!(std::mem::replace(&mut r.settle, Settle::Keep), Settle::Keep) {
                    kept += 1;
                    if run.fleet.is_some() && r.outcome == Outcome::Clean {
                        // Not this node's to count: its claim is unconfirmed, and
                        // another node may take the file over (and find these bytes
                        // delivered).
                        r.outcome = Outcome::Failed;
                        r.error = Some(format!(
                            "delivered but not recorded (journal write failed: {e}); source kept for the next run"
                        ));
                    }
                }
            }
            let why = StopReason::Journal(if kept > 0 {
                format!("{e}; sources of {kept} file(s) kept")
            } else {
                e.to_string()
            });
            tracing::error!("{why}");
            return Err(why);
        }
    };
    for r in batch.iter_mut().filter(|r| lost.contains(&r.id)) {
        // Fleet: this node's lease ran out and another node took the file over. What
        // it delivered stays (the new owner finds the same bytes already present);
        // the source is the new owner's to remove.
        tracing::warn!(
            "{:?}: claim lost to another node (lease expired); source left to it",
            shown(&r.rel)
        );
        r.settle = Settle::Keep;
        r.outcome = Outcome::Skipped;
        r.skip_label = Some(SkipKind::ClaimLost);
        r.error = Some("claim lost: lease expired, another node took the file over".into());
    }
    if batch.iter().any(|r| !matches!(r.settle, Settle::Keep)) {
        crate::crashpoint::here("commit: journaled, before source removal");
    }
    let mut removed = Vec::new();
    let mut dirs = cleanup::SourceDirs::default();
    for r in batch.iter_mut() {
        let q = match std::mem::replace(&mut r.settle, Settle::Keep) {
            Settle::Keep => continue,
            Settle::RemoveSource(q) | Settle::AfterSync(q) => q,
        };
        if !run.policy.delete_source {
            continue;
        }
        match remove_source(run, &q, &mut dirs, buf) {
            Ok(true) => removed.push(r.id),
            Ok(false) => {}
            Err(kept) => r.kept = Some(kept),
        }
    }
    if let Err(e) = lock(run.journal).sources_removed(&removed) {
        tracing::error!(
            "cannot record {} source removal(s) in the journal: {e}",
            removed.len()
        );
    }
    Ok(())
}

/// Removes one file's source if it still holds the scanned bytes.
/// `Ok(false)`: it was already gone; `Err`: kept, and why.
fn remove_source(
    run: &Run,
    q: &SourceRecord,
    dirs: &mut cleanup::SourceDirs,
    buf: &mut [u8],
) -> Result<bool, KeptSource> {
    let checks = run.roots.checks.writers;
    match cleanup::remove_source(&run.roots.source, q, checks, dirs, buf) {
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
