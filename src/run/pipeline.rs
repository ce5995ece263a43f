//! Steps 6–10 for all files: `max_scan_threads` workers, each admitting its own next
//! file in priority order (docs/design.md §3), handling it (`file.rs`) and settling it
//! (`settle.rs`), and a committer thread making batches of deliveries durable (one
//! `syncfs`) before settling them the same way (group commit).
//!
//! A waiting file is only its [`Candidate`] record. A worker takes the next one under
//! the books' lock only when it is free, so a file is admitted — and its free space
//! checked — just before it is handled, and the first denial stops admission for all.
//! Results are settled by the file's journal id, never matched by position.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::mpsc;

use super::context::{Job, Run, identity, lock};
use super::file;
use super::settle::{self, FileResult, Settle};
use crate::discover::{Candidate, Queue};
use crate::journal::{Admit, Outcome, SetAside};
use crate::notify;
use crate::report::{FileEntry, Report};
use crate::states::{SkipKind, StopReason};
use crate::throttle::{self, Admission, Denial};

/// The JSON report lists at most this many files, and this many kept sources (the
/// journal has all of them; the report counts the ones left out).
const REPORT_FILE_LIMIT: usize = 10_000;
/// Copy buffer per worker.
const BUFFER: usize = 1 << 20;

pub fn process(
    run: &Run,
    admission: Admission,
    candidates: Queue,
    report: &mut Report,
) -> anyhow::Result<()> {
    let threads = run.cfg.max_scan_threads.max(1);
    let total = candidates.len();
    let commit_failure = Mutex::new(None);
    // Bounded: when the committer falls behind, the workers wait for it instead of
    // piling up finished files in memory.
    let (commits, batches) = mpsc::sync_channel::<Vec<FileResult>>(COMMITS_QUEUED);
    let report = Mutex::new(report);
    let books = Mutex::new(Books {
        queue: candidates,
        ended: false,
        tickets: HashMap::new(),
        admission,
        stop: None,
        progress: crate::progress::Progress::for_stderr(Some(&run.cfg.lock_path)),
        batch: Vec::new(),
        batch_bytes: 0,
        commits,
        commit_failure: &commit_failure,
        uncommitted: Vec::new(),
        report: &report,
        set_aside: 0,
        elsewhere: 0,
    });

    let committed = std::thread::scope(|scope| {
        let committer = scope.spawn(|| committer(run, batches, &commit_failure, &report));
        // Each worker admits its next file itself, under the books' lock, in priority
        // order: no hand-off between threads per file.
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut buf = vec![0u8; BUFFER];
                    let mut last: Option<FileResult> = None;
                    loop {
                        let job = {
                            let mut b = books.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(r) = last.take() {
                                b.settle(r);
                            }
                            b.next_job(run)
                        };
                        let Some(job) = job else { break };
                        let mut r = file::handle(run, &job, &mut buf);
                        // Everything but a delivery waiting for its batch's syncfs is
                        // settled here, outside the books' lock (it may hash a source).
                        if !r.settle.needs_sync()
                            && let Err(stop) =
                                settle::commit(run, std::slice::from_mut(&mut r), &mut buf)
                        {
                            r.fatal.get_or_insert(stop);
                        }
                        last = Some(r);
                    }
                })
            })
            .collect();
        let mut panicked = false;
        for w in workers {
            panicked |= w.join().is_err();
        }
        let mut b = books.lock().unwrap_or_else(|p| p.into_inner());
        if panicked {
            b.stop.get_or_insert(StopReason::WorkerPanicked);
        }
        b.flush();
        let (tx, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut b.commits, tx));
        drop(b);
        committer.join()
    });
    let books = books.into_inner().unwrap_or_else(|p| p.into_inner());
    let Books {
        uncommitted,
        mut stop,
        progress,
        set_aside,
        elsewhere,
        ..
    } = books;
    let report = report.into_inner().unwrap_or_else(|p| p.into_inner());
    for r in uncommitted {
        tally(report, r);
    }
    if committed.is_err() {
        stop = Some(StopReason::CommitterPanicked)
    }
    if let Some(f) = commit_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        stop.get_or_insert(f);
    }
    progress.finish();

    report.files.deferred = total.saturating_sub(report.files.admitted + set_aside + elsewhere);
    if let Some(why) = run.scanners.stop_reason() {
        stop.get_or_insert(StopReason::Scanners(why));
    }
    if let Some(why) = run.fleet.and_then(|h| h.lost()) {
        stop.get_or_insert(StopReason::Fleet(why));
    }
    if let Some(reason) = stop {
        anyhow::bail!(
            "{reason}; {} file(s) left in the source for the next run",
            report.files.deferred
        );
    }
    Ok(())
}

/// A batch is committed at this many files or bytes (and at the end of the run).
const BATCH_FILES: usize = 128;
const BATCH_BYTES: u64 = 128 << 20;
/// Full batches waiting for the committer; beyond this the workers wait.
const COMMITS_QUEUED: usize = 2;

/// The run's books, shared by the workers under one lock: the files still waiting in
/// priority order, space reservations, the reason to stop, the report, and the batch
/// of deliveries waiting to be made durable.
struct Books<'a, 'r> {
    queue: Queue,
    /// Admission has stopped (throttle, stop request, fatal problem, no more files).
    ended: bool,
    tickets: HashMap<i64, throttle::Ticket>,
    admission: Admission,
    stop: Option<StopReason>,
    progress: crate::progress::Progress,
    batch: Vec<FileResult>,
    batch_bytes: u64,
    /// Full batches go to the committer thread.
    commits: mpsc::SyncSender<Vec<FileResult>>,
    /// Set by the committer when a commit failed: admit nothing more.
    commit_failure: &'a Mutex<Option<StopReason>>,
    /// Files whose batch could not reach the committer: counted, sources kept.
    uncommitted: Vec<FileResult>,
    /// Counted into as files finish; the committer counts the files it commits.
    report: &'a Mutex<&'r mut Report>,
    /// Files set aside before admission (newly, or known from an earlier run): not
    /// admitted, yet not waiting for a later run either.
    set_aside: u64,
    /// Fleet: files another node holds (left to it, not deferred).
    elsewhere: u64,
}

impl Books<'_, '_> {
    /// Step 6 for the next file in priority order: admits it (throttle, limits),
    /// records it in the journal, and hands it to the calling worker. `None` once
    /// admission has stopped; the first denial stops it for every worker.
    fn next_job(&mut self, run: &Run) -> Option<Job> {
        if self.ended {
            return None;
        }
        if let Some(why) = run.scanners.stop_reason() {
            self.stop.get_or_insert(StopReason::Scanners(why));
        }
        let stop_requested = run
            .stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if stop_requested {
            tracing::info!("stop requested: no more files admitted; in-flight files finish");
        }
        if self.stop.is_some() || stop_requested {
            self.ended = true;
            return None;
        }
        if let Some(why) = run.fleet.and_then(|h| h.lost()) {
            self.stop.get_or_insert(StopReason::Fleet(why));
            self.ended = true;
            return None;
        }
        loop {
            let candidate = loop {
                let Some(candidate) = self.queue.next() else {
                    if let Some(e) = self.queue.error() {
                        self.stop
                            .get_or_insert_with(|| StopReason::Queue(e.to_string()));
                    }
                    self.ended = true;
                    return None;
                };
                match self.set_aside_before_admission(run, &candidate) {
                    Ok(true) => {
                        self.set_aside += 1;
                        continue;
                    }
                    Ok(false) => break candidate,
                    Err(stop) => {
                        self.stop = Some(stop);
                        self.ended = true;
                        return None;
                    }
                }
            };
            let ticket = match self.admission.admit(candidate.size) {
                Ok(t) => t,
                Err(denial) => {
                    throttle_stop(run, &denial, &mut lock_report(self.report));
                    self.ended = true;
                    return None;
                }
            };
            // Committed at once (not batched): recovery finds a dead run's temp files
            // through this row.
            let rel = candidate.rel.to_string_lossy().into_owned();
            let admitted = lock(run.journal).admit_file(
                run.run_id,
                &rel,
                candidate.size,
                candidate.mtime_ns,
                &run.day_limits,
            );
            let id = match admitted {
                Ok(Admit::Admitted { id, .. }) => id,
                Ok(Admit::Taken(why)) => {
                    // Another node of the fleet has it: not this node's to count.
                    self.admission.finish(ticket, false);
                    tracing::debug!(
                        "{:?} left to another node: {why}",
                        crate::names::shown(&rel)
                    );
                    let mut report = lock_report(self.report);
                    report.files.skipped += 1;
                    *report
                        .skipped_by_reason
                        .entry(SkipKind::OtherNode)
                        .or_default() += 1;
                    drop(report);
                    self.elsewhere += 1;
                    continue;
                }
                Ok(Admit::Limit(message)) => {
                    self.admission.finish(ticket, false);
                    let denial = Denial::DailyLimit { message };
                    throttle_stop(run, &denial, &mut lock_report(self.report));
                    self.ended = true;
                    return None;
                }
                Err(e) => {
                    self.admission.finish(ticket, false);
                    self.stop = Some(StopReason::Journal(e.to_string()));
                    self.ended = true;
                    return None;
                }
            };
            tracing::debug!(
                "admitted {:?}: {} bytes, journal id {id}",
                crate::names::shown(&rel),
                candidate.size
            );
            self.tickets.insert(id, ticket);
            lock_report(self.report).files.admitted += 1;
            self.progress.admitted(candidate.size);
            return Some(Job { id, candidate });
        }
    }

    /// A file that is not admitted because it is set aside: already (same identity,
    /// same limits: counted as skipped, not reported again), or now, because of its
    /// size alone (an engine cannot scan that much, or it can never fit a target).
    /// `Ok(true)`: the file is set aside.
    fn set_aside_before_admission(&mut self, run: &Run, c: &Candidate) -> Result<bool, StopReason> {
        let identity = identity(c);
        if let Some(known) = run.set_aside.get(&identity)
            && known.limits == run.limits_fingerprint
        {
            tracing::debug!(
                "{:?} stays set aside ({}: {})",
                c.rel,
                known.outcome.as_str(),
                known.reason
            );
            let mut report = lock_report(self.report);
            report.files.skipped += 1;
            *report
                .skipped_by_reason
                .entry(SkipKind::SetAside)
                .or_default() += 1;
            return Ok(true);
        }
        use crate::scan::limits::SizeRefusal;
        let (outcome, reason) = match run.limits.refuse_size(c.size) {
            Some(SizeRefusal::Unscannable(r)) => (Outcome::Unscannable, r),
            Some(SizeRefusal::TooLarge(r)) => (Outcome::TooLarge, r),
            None => match self.admission.never_fits(c.size) {
                Some(r) => (Outcome::TooLarge, r),
                None => return Ok(false),
            },
        };
        let rel = c.rel.to_string_lossy().into_owned();
        let what = SetAside {
            outcome,
            reason: reason.clone(),
            limits: run.limits_fingerprint.to_string(),
        };
        let id = {
            let j = lock(run.journal);
            let id = j.file_admitted(run.run_id, &rel, c.size, c.mtime_ns);
            id.and_then(|id| j.set_aside(&identity, &rel, &what, Some(id)).map(|()| id))
                .map_err(|e| StopReason::Journal(e.to_string()))?
        };
        let mut r = FileResult::set_aside(id, rel, c.size, outcome, reason);
        // Never copied: its source stays, so settling hashes nothing (no buffer).
        settle::commit(run, std::slice::from_mut(&mut r), &mut [])?;
        file::log_set_aside(&r.rel, outcome, r.error.as_deref().unwrap_or_default());
        tally(&mut lock_report(self.report), r);
        Ok(true)
    }

    /// Takes in one file a worker finished: releases its reservation, notes a fatal
    /// problem, and counts it, or queues it for the next commit.
    fn settle(&mut self, r: FileResult) {
        self.progress.done(r.size);
        if let Some(t) = self.tickets.remove(&r.id) {
            self.admission
                .finish(t, matches!(r.outcome, Outcome::Clean | Outcome::Suspect));
        }
        if let Some(f) = &r.fatal {
            self.stop.get_or_insert_with(|| f.clone());
        }
        if let Some(f) = self
            .commit_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            self.stop.get_or_insert_with(|| f.clone());
        }
        if !r.settle.needs_sync() {
            tally(&mut lock_report(self.report), r);
            return;
        }
        self.batch_bytes += r.size;
        self.batch.push(r);
        if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Hands the current batch to the committer thread.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        if let Err(mpsc::SendError(batch)) = self.commits.send(batch) {
            // The committer is gone (it cannot be, short of a panic): keep every
            // source; the files count as failed.
            let why = StopReason::CommitterGone;
            tracing::error!("{why}");
            self.stop.get_or_insert_with(|| why.clone());
            let mut lost = self
                .commit_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            lost.get_or_insert(why);
            drop(lost);
            for mut r in batch {
                r.settle = Settle::Keep;
                r.outcome = Outcome::Failed;
                self.uncommitted.push(r);
            }
        }
    }
}

/// The committer thread: group commit for batch after batch, while the
/// workers go on with the next files. One `syncfs` makes every delivery of a batch
/// durable, one journal transaction records them, and only then are their sources
/// removed (each still re-hashed against what was scanned). Nothing is weaker than
/// one fsync chain per file; it is just paid once per batch. Each file is counted into
/// the report as soon as its batch is done, so nothing per file outlives its batch.
fn committer(
    run: &Run,
    batches: mpsc::Receiver<Vec<FileResult>>,
    failure: &Mutex<Option<StopReason>>,
    report: &Mutex<&mut Report>,
) {
    let mut done = Vec::with_capacity(BATCH_FILES);
    let mut buf = vec![0u8; BUFFER];
    for batch in batches {
        commit(run, batch, &mut buf, failure, &mut done);
        let mut report = lock_report(report);
        for r in done.drain(..) {
            tally(&mut report, r);
        }
    }
}

/// One batch of deliveries: made durable by one `syncfs` of the destination, then
/// settled ([`settle::commit`]: the ends recorded, the sources removed).
fn commit(
    run: &Run,
    mut batch: Vec<FileResult>,
    buf: &mut [u8],
    failure: &Mutex<Option<StopReason>>,
    done: &mut Vec<FileResult>,
) {
    let fail = |why: StopReason| {
        tracing::error!("{why}");
        failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
    };
    let started = std::time::Instant::now();
    crate::crashpoint::here("commit: before syncfs");
    if let Err(e) = (run.hooks.syncfs)(&*run.roots.destination) {
        // Delivered, but not known durable: keep every source; the next run finds the
        // same bytes in the destination and counts them as delivered.
        let why = format!(
            "cannot make deliveries durable (syncfs {}: {e}); sources kept",
            run.roots.destination.describe()
        );
        fail(StopReason::Commit(why.clone()));
        for mut r in batch {
            r.settle = Settle::Keep;
            r.outcome = Outcome::Failed;
            r.error = Some(why.clone());
            done.push(r);
        }
        return;
    }
    crate::crashpoint::here("commit: synced, before journal");
    if let Err(why) = settle::commit(run, &mut batch, buf) {
        fail(why);
    }
    tracing::debug!(
        "batch of {} delivered file(s) durable (syncfs, journal), sources settled in {} ms",
        batch.len(),
        started.elapsed().as_millis()
    );
    done.extend(batch);
}

fn lock_report<'a, 'b>(r: &'a Mutex<&'b mut Report>) -> std::sync::MutexGuard<'a, &'b mut Report> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one finished file into the report.
fn tally(report: &mut Report, r: FileResult) {
    let f = &mut report.files;
    match r.outcome {
        Outcome::Clean => {
            f.clean += 1;
            report.bytes.clean += r.size;
        }
        Outcome::Suspect => {
            f.suspect += 1;
            report.bytes.suspect += r.size;
        }
        Outcome::Failed | Outcome::Interrupted => f.failed += 1,
        Outcome::Unscannable => f.unscannable += 1,
        Outcome::TooLarge => f.too_large += 1,
        Outcome::Skipped => {
            f.skipped += 1;
            *report
                .skipped_by_reason
                .entry(r.skip_label.unwrap_or(SkipKind::ChangedOrConflict))
                .or_default() += 1;
        }
    }
    if let Some(k) = r.kept {
        if report.sources_kept.len() < REPORT_FILE_LIMIT {
            report.sources_kept.push(k);
        } else {
            report.sources_kept_omitted += 1;
        }
    }
    if report.file_results.len() >= REPORT_FILE_LIMIT {
        report.file_results_omitted += 1;
    } else {
        report.file_results.push(FileEntry {
            path: r.rel,
            outcome: r.outcome,
            verdict: r.verdict,
            sha256: r.sha256,
            destination: r.destination,
            detections: r.detections,
            error: r.error,
            scanners: r.scanners,
        });
    }
}

/// Admission stops: log `THROTTLE REASON:`, journal, notify once, report.
fn throttle_stop(run: &Run, denial: &Denial, report: &mut Report) {
    tracing::error!("{}", denial.log_line());
    let mut recommendations = Vec::new();
    if let Denial::DiskSpace { path, .. } = denial {
        let week_ago = chrono::Utc::now().timestamp() - 7 * 86_400;
        let delivered = lock(run.journal)
            .delivered_bytes_since(week_ago)
            .unwrap_or(0);
        recommendations = throttle::recommendations(run.cfg, path, delivered);
        for r in &recommendations {
            tracing::warn!("cleanup recommendation: {r}");
        }
    }
    if let Err(e) =
        lock(run.journal).record_throttle(run.run_id, denial.reason().as_str(), denial.message())
    {
        tracing::error!("cannot record the throttle decision in the journal: {e}");
    }
    let mut body = format!(
        "{}\n\nFiles not admitted stay untouched in the source for the next run.\n",
        denial.log_line()
    );
    if !recommendations.is_empty() {
        body.push_str("\nWhat Shuttle keeps on the full filesystem, largest first:\n");
        for r in &recommendations {
            body.push_str(&format!("- {r}\n"));
        }
    }
    // Once per run; `watch` holds back the same stop repeated pass after pass.
    run.notifier.send_once(
        notify::Kind::Error,
        &format!("Shuttle throttled: {}", denial.title()),
        &body,
    );
    report.throttle.stopped = true;
    report.throttle.reason = Some(denial.reason());
    report.throttle.message = Some(denial.message().to_string());
    report.throttle.recommendations = recommendations;
}
