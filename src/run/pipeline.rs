//! Steps 6–10 for all files: `max_scan_threads` workers, each admitting its own next
//! file in priority order (docs/design.md §3), handling it (`file.rs`) and settling it
//! (`settle.rs`), and a committer thread making batches of deliveries durable (one
//! `syncfs`) before settling them the same way (group commit).
//!
//! A waiting file is only its [`Candidate`] record. A worker takes the next one under
//! the books' lock only when it is free. Files are admitted — their free space checked,
//! their journal rows written — just before they are handled: one at a time, or for
//! small files a short group at a time in one journal transaction (at most
//! [`ADMIT_GROUP`] files and [`ADMIT_GROUP_BYTES`]), each group handed out one file per
//! worker. The first denial stops admission for all; files admitted ahead whose turn
//! does not come because the run stops are released (journal row ended as skipped,
//! reservation returned, source untouched). Results are settled by the file's journal
//! id, never matched by position.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::mpsc;

use super::context::{Job, Run, identity, lock};
use super::file;
use super::settle::{self, FileResult, Settle};
use crate::discover::{Candidate, Queue};
use crate::journal::{Admit, NewFile, Outcome, SetAside};
use crate::notify;
use crate::report::{FileEntry, Report};
use crate::states::{SkipKind, StopReason};
use crate::throttle::{self, Admission, Denial};

/// The JSON report lists at most this many files, and this many kept sources (the
/// journal has all of them; the report counts the ones left out).
const REPORT_FILE_LIMIT: usize = 10_000;
/// Copy buffer per worker.
const BUFFER: usize = 1 << 20;

/// The workers' and the committer's copy buffers (1 MiB each), kept for
/// the next pass: `shuttle watch` gives the same ones to pass after pass, so that
/// they are allocated once rather than once a pass. A freed buffer this large raises
/// glibc's threshold for giving memory back to the system, so the next pass's
/// buffers would stay in the allocator's per-thread arenas; resident memory then
/// grew over the first passes by about one buffer per worker.
#[derive(Debug, Default)]
pub struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        kept.unwrap_or_else(|| vec![0u8; BUFFER])
    }

    fn give_back(&self, buf: Vec<u8>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

pub fn process(
    run: &Run,
    admission: Admission,
    candidates: Queue,
    report: &mut Report,
    buffers: &Buffers,
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
        ready: VecDeque::new(),
        ended: false,
        stop_seen: false,
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
        let committer = scope.spawn(|| committer(run, batches, &commit_failure, &report, buffers));
        // Each worker admits its next file itself, under the books' lock, in priority
        // order: no hand-off between threads per file.
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut buf = buffers.take();
                    let mut dirs = crate::quarantine::DirCache::default();
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
                        let mut r = file::handle(run, &job, &mut buf, &mut dirs);
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
                    buffers.give_back(buf);
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
        b.release(run);
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
///
/// Every `syncfs` makes the filesystem commit its journal, and while it does so the
/// workers' file creations, renames and unlinks in the same metadata blocks wait:
/// with batches of 128 small files the workers spent twice as often in such waits
/// as with 512, and corpus A took 9 % longer between its first file and its last.
const BATCH_FILES: usize = 512;
/// Once fewer files than [`BATCH_FILES`] are left to take from the queue, batches
/// are committed at this many files: the sources of the run's last batch are
/// removed (each re-read and re-hashed) after every other file is done, by the
/// committer alone, and a last batch of 512 added 15 ms to the end of corpus A.
const BATCH_FILES_AT_END: usize = 128;
const BATCH_BYTES: u64 = 128 << 20;
/// At most this many files, and (but for a file larger on its own) this many bytes,
/// are admitted in one journal transaction. A group is admitted under the books'
/// lock, while the other workers wait for it: groups of 64 rather than 16 took 3–7 %
/// off 20,000 files of 1 KiB, and nothing off 2,000 of 4 KiB.
const ADMIT_GROUP: usize = 64;
const ADMIT_GROUP_BYTES: u64 = 1 << 20;
/// Full batches waiting for the committer; beyond this the workers wait.
const COMMITS_QUEUED: usize = 2;

/// The run's books, shared by the workers under one lock: the files still waiting in
/// priority order, space reservations, the reason to stop, the report, and the batch
/// of deliveries waiting to be made durable.
struct Books<'a, 'r> {
    queue: Queue,
    /// Files admitted (journal row, reservation) and waiting for a worker, in order.
    ready: VecDeque<Job>,
    /// Admission has stopped (throttle, stop request, fatal problem, no more files).
    ended: bool,
    /// A stop request (SIGTERM/SIGINT) was seen and logged.
    stop_seen: bool,
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
    /// admission has stopped; the first denial stops it for every worker. Small files
    /// are admitted a few at a time ([`Books::admit_group`]) and handed out one by one.
    fn next_job(&mut self, run: &Run) -> Option<Job> {
        if self.stop.is_none()
            && let Some(why) = run.scanners.stop_reason()
        {
            self.stop = Some(StopReason::Scanners(why));
        }
        let stop_requested = run
            .stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if stop_requested && !self.stop_seen {
            self.stop_seen = true;
            tracing::info!("stop requested: no more files admitted; in-flight files finish");
        }
        if self.stop.is_none()
            && let Some(why) = run.fleet.and_then(|h| h.lost())
        {
            self.stop = Some(StopReason::Fleet(why));
        }
        if self.stop.is_some() || stop_requested {
            // Files admitted ahead but not begun are released at the end (`release`).
            self.ended = true;
            return None;
        }
        // A group may come back empty without ending admission (in a fleet, every
        // file of it taken by another node): admit the next one.
        while self.ready.is_empty() && !self.ended {
            self.admit_group(run);
        }
        self.ready.pop_front()
    }

    /// Admits the next files in priority order into `ready`: up to [`ADMIT_GROUP`]
    /// files and [`ADMIT_GROUP_BYTES`] (a large file is a group of its own; in a fleet,
    /// one file at a time, so that the nodes share the work evenly), each checked
    /// against the throttle in turn, recorded in one journal transaction. The rows are
    /// durable before any of the files is copied, as one file's row would be; a crash
    /// leaves the ones not begun to recovery, like any admitted file.
    fn admit_group(&mut self, run: &Run) {
        let most = if run.fleet.is_some() { 1 } else { ADMIT_GROUP };
        let mut group: Vec<(Candidate, throttle::Ticket)> = Vec::new();
        let mut bytes = 0u64;
        let mut free = throttle::FreeSpace::default();
        while group.len() < most && bytes < ADMIT_GROUP_BYTES {
            let Some(candidate) = self.next_candidate(run) else {
                break;
            };
            match self.admission.admit_reading(candidate.size, &mut free) {
                Ok(ticket) => {
                    bytes += candidate.size;
                    group.push((candidate, ticket));
                }
                Err(denial) => {
                    throttle_stop(run, &denial, &mut lock_report(self.report));
                    self.ended = true;
                    break;
                }
            }
        }
        if group.is_empty() {
            return;
        }
        let names: Vec<String> = group
            .iter()
            .map(|(c, _)| c.rel.to_string_lossy().into_owned())
            .collect();
        let files: Vec<NewFile> = group
            .iter()
            .zip(&names)
            .map(|((c, _), rel)| NewFile {
                rel_path: rel,
                size: c.size,
                mtime_ns: c.mtime_ns,
            })
            .collect();
        let admitted = lock(run.journal).admit_files(run.run_id, &files, &run.day_limits);
        let admitted = match admitted {
            Ok(a) => a,
            Err(e) => {
                for (_, ticket) in group {
                    self.admission.finish(ticket, false);
                }
                self.stop = Some(StopReason::Journal(e.to_string()));
                self.ended = true;
                return;
            }
        };
        let mut answers = admitted.into_iter();
        for ((candidate, ticket), rel) in group.into_iter().zip(names) {
            match answers.next() {
                Some(Admit::Admitted { id, .. }) => {
                    tracing::debug!(
                        "admitted {:?}: {} bytes, journal id {id}",
                        crate::names::shown(&rel),
                        candidate.size
                    );
                    self.tickets.insert(id, ticket);
                    lock_report(self.report).files.admitted += 1;
                    self.progress.admitted(candidate.size);
                    self.ready.push_back(Job { id, candidate });
                }
                Some(Admit::Taken(why)) => {
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
                }
                Some(Admit::Limit(message)) => {
                    self.admission.finish(ticket, false);
                    let denial = Denial::DailyLimit { message };
                    throttle_stop(run, &denial, &mut lock_report(self.report));
                    self.ended = true;
                }
                // After a limit: not admitted, waits for a later run.
                None => self.admission.finish(ticket, false),
            }
        }
    }

    /// The next file in priority order that is not set aside; `None` (admission
    /// ended) at the end of the queue or when setting one aside failed.
    fn next_candidate(&mut self, run: &Run) -> Option<Candidate> {
        loop {
            let Some(candidate) = self.queue.next() else {
                if let Some(e) = self.queue.error() {
                    self.stop
                        .get_or_insert_with(|| StopReason::Queue(e.to_string()));
                }
                self.ended = true;
                return None;
            };
            match self.set_aside_before_admission(run, &candidate) {
                Ok(true) => self.set_aside += 1,
                Ok(false) => return Some(candidate),
                Err(stop) => {
                    self.stop = Some(stop);
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// Files admitted ahead whose turn never came (the run stopped first): their
    /// reservations are returned, the journal ends them as skipped, and they count
    /// as waiting for the next run, not as admitted.
    fn release(&mut self, run: &Run) {
        for job in std::mem::take(&mut self.ready) {
            if let Some(t) = self.tickets.remove(&job.id) {
                self.admission.finish(t, false);
            }
            lock_report(self.report).files.admitted -= 1;
            if let Err(e) = lock(run.journal).release_file(job.id) {
                tracing::error!(
                    "journal write failed for {}: {e}",
                    crate::names::shown(&job.candidate.rel)
                );
                self.stop
                    .get_or_insert_with(|| StopReason::Journal(e.to_string()));
            }
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
        let files = if self.queue.left() < BATCH_FILES as u64 {
            BATCH_FILES_AT_END
        } else {
            BATCH_FILES
        };
        if self.batch.len() >= files || self.batch_bytes >= BATCH_BYTES {
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
    buffers: &Buffers,
) {
    let mut done = Vec::with_capacity(BATCH_FILES);
    let mut buf = buffers.take();
    for batch in batches {
        commit(run, batch, &mut buf, failure, &mut done);
        let mut report = lock_report(report);
        for r in done.drain(..) {
            tally(&mut report, r);
        }
    }
    buffers.give_back(buf);
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
