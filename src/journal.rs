//! The journal (docs/design.md §4): every file's lifecycle, each run's totals, throttle
//! decisions and per-target free space.
//!
//! It is the source of truth for daily limits, `shuttle status` and crash recovery. The
//! pipeline writes a step here only after that step is durable on disk, so the journal
//! may under-claim after a crash but never over-claims.
//!
//! Why a trait: one node keeps its journal in SQLite beside its state
//! ([`SqliteJournal`]); a fleet of nodes sharing a drop directory keeps it in
//! PostgreSQL ([`PgJournal`], docs/fleet.md), where a file is also claimed by one node
//! before it is copied. The run and the commands see only [`Journal`], opened in one
//! place, [`open`], from the configuration.

use std::path::PathBuf;

pub mod migrate;
mod pg;
mod sqlite;

pub use pg::{Heartbeat, PgJournal, pgpass_lookup};
pub use sqlite::{FILE_NAME, MIGRATIONS, SCHEMA_V1, SqliteJournal};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create journal directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("journal {url}: cannot connect: {why}")]
    Connect { url: String, why: String },
    #[error("journal {url}: {}", pg::describe_error(source))]
    Postgres {
        url: String,
        source: postgres::Error,
    },
    #[error("{0}")]
    Schema(String),
}

/// A file's final outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Clean,
    Suspect,
    Failed,
    /// Left in the source for a later run (changed while copied, conflict skip).
    Skipped,
    /// An earlier run died while handling it; recovery cleaned up after it.
    Interrupted,
    /// An engine cannot scan it whole (a scan limit, encryption): left in the source,
    /// set aside until it or the limits change.
    Unscannable,
    /// It can never fit (larger than `max_file_size_mb`, or than a target's whole
    /// filesystem less its threshold): left in the source, set aside likewise.
    TooLarge,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::Suspect => "suspect",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
            Outcome::Unscannable => "unscannable",
            Outcome::TooLarge => "too_large",
        }
    }
}

/// What a retro-scan made of one delivery (`crate::rescan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RescanState {
    /// Still clean under the newer signatures.
    Clean,
    /// Detected; reported, the destination copy left in place.
    Alerted,
    /// Detected; being archived and removed (a crash here is resumed).
    Withdrawing,
    /// Detected; encrypted into the hazard archive and removed from the destination.
    Withdrawn,
    /// The destination copy no longer holds the delivered bytes: reported, untouched.
    Changed,
    /// The destination copy is gone (moved or removed downstream).
    Gone,
    /// The scan failed; tried again by a later pass (at most [`RESCAN_ATTEMPTS`] times
    /// per signature generation).
    Failed,
}

/// Failed rescans of one delivery under one signature generation before it is left.
pub const RESCAN_ATTEMPTS: i64 = 3;

impl RescanState {
    pub fn as_str(self) -> &'static str {
        match self {
            RescanState::Clean => "clean",
            RescanState::Alerted => "alerted",
            RescanState::Withdrawing => "withdrawing",
            RescanState::Withdrawn => "withdrawn",
            RescanState::Changed => "changed",
            RescanState::Gone => "gone",
            RescanState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RescanState> {
        Some(match s {
            "clean" => RescanState::Clean,
            "alerted" => RescanState::Alerted,
            "withdrawing" => RescanState::Withdrawing,
            "withdrawn" => RescanState::Withdrawn,
            "changed" => RescanState::Changed,
            "gone" => RescanState::Gone,
            "failed" => RescanState::Failed,
            _ => return None,
        })
    }
}

/// A delivered file, as a retro-scan needs it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub file_id: i64,
    pub rel_path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: Option<String>,
    /// Each engine's answer when it was delivered (JSON as recorded).
    pub scan_results: Option<serde_json::Value>,
    /// Where it was delivered (absolute, as recorded).
    pub final_path: String,
    /// Unix seconds.
    pub finished_at: i64,
}

/// One rescan of a file, for `shuttle history`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RescanRow {
    pub id: i64,
    pub file_id: i64,
    pub run_id: Option<i64>,
    /// The signatures it was rescanned with (`clamav=27451`).
    pub generation: String,
    /// Unix seconds.
    pub time: i64,
    pub state: RescanState,
    pub detections: Option<serde_json::Value>,
    pub archive_path: Option<String>,
    pub note: Option<String>,
}

/// A file's final record (see [`Journal::file_finished`]).
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    pub id: i64,
    pub outcome: Outcome,
    pub disposition: &'a str,
    pub final_path: Option<&'a str>,
    pub error: Option<&'a str>,
    pub sha256: Option<&'a str>,
    /// "clean", "suspect" or "failed" when the file was scanned.
    pub verdict: Option<&'a str>,
    /// Each engine's answer (JSON text, stored as it is), when scanned.
    pub scan_results: Option<&'a serde_json::value::RawValue>,
}

impl Default for Finished<'_> {
    fn default() -> Self {
        Finished {
            id: 0,
            outcome: Outcome::Failed,
            disposition: "",
            final_path: None,
            error: None,
            sha256: None,
            verdict: None,
            scan_results: None,
        }
    }
}

/// A file an earlier run admitted but never finished.
#[derive(Debug, Clone)]
pub struct Unfinished {
    pub id: i64,
    pub run_id: i64,
    pub rel_path: String,
}

/// A suspect file durably encrypted into the hazard archive (docs/design.md §1.9).
#[derive(Debug, Clone)]
pub struct HazardRow {
    pub file_id: i64,
    pub archive_path: String,
    pub sidecar_path: String,
    pub original_path: String,
    pub size: u64,
    pub sha256: String,
    /// JSON array of detection names.
    pub detections: serde_json::Value,
    /// JSON array of `{scanner, version}`.
    pub scanners: serde_json::Value,
    pub archived_at: String,
    pub key_fingerprint: String,
}

/// One earlier run, for `shuttle status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub started: String,
    pub finished: Option<String>,
    pub exit_code: Option<i64>,
    pub summary: Option<serde_json::Value>,
}

/// One file's journal record with its run and hazard entry (`shuttle history`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileHistory {
    /// The file's journal id (also the number in its temp names).
    pub id: i64,
    pub run_id: i64,
    /// When the run that discovered and admitted it started.
    pub run_started: Option<String>,
    pub rel_path: String,
    pub size: u64,
    pub mtime_ns: i64,
    /// `admitted` while in flight, `finished` once its outcome is final.
    pub state: String,
    /// Unix seconds.
    pub admitted_at: i64,
    /// SHA-256 of the quarantine copy.
    pub sha256: Option<String>,
    pub verdict: Option<String>,
    /// Each engine's answer, with its version (JSON as the run recorded it).
    pub scan_results: Option<serde_json::Value>,
    pub outcome: Option<String>,
    pub disposition: Option<String>,
    /// Where it was delivered, or archived.
    pub final_path: Option<String>,
    pub error: Option<String>,
    pub source_removed: bool,
    /// Unix seconds.
    pub finished_at: Option<i64>,
    pub hazard_archive: Option<String>,
    pub hazard_key_fingerprint: Option<String>,
    /// Every retro-scan of this delivery, oldest first.
    pub rescans: Vec<RescanRow>,
}

/// One free-space sample.
#[derive(Debug, Clone)]
pub struct SpaceSample {
    pub time: i64,
    pub target: String,
    pub path: String,
    pub free_bytes: u64,
    pub threshold_bytes: u64,
}

/// A file that is set aside: by its identity, so that it is neither copied again nor
/// reported again until it changes or the limits change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Why a file is set aside (the outcome it got).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub outcome: Outcome,
    pub reason: String,
    /// The limits it was judged under ([`crate::scan::limits::ScanLimits::fingerprint`]).
    pub limits: String,
}

/// What the run, `status`, `history`, `metrics` and `rescan` need of a journal. One
/// implementation per store: [`SqliteJournal`] (the default, a file beside the state)
/// and, for a fleet, PostgreSQL. Every method is one durable step: when it returns
/// `Ok`, what it recorded survives a crash.
pub trait Journal: Send {
    /// What the journal is, for messages (`/var/lib/shuttle/shuttle-journal.sqlite3`).
    fn describe(&self) -> String;

    /// Admits a file: records it (as [`Journal::file_admitted`]) and, in a fleet, claims
    /// it for this node in the same transaction, counting the fleet's daily totals
    /// against `limits`. A journal without claims admits every file.
    fn admit_file(
        &self,
        run: i64,
        rel_path: &str,
        size: u64,
        mtime_ns: i64,
        limits: &DayLimits,
    ) -> Result<Admit, JournalError> {
        let _ = limits;
        let id = self.file_admitted(run, rel_path, size, mtime_ns)?;
        Ok(Admit::Admitted { id, token: 0 })
    }

    /// Admits `files` in order, as [`Journal::admit_file`] does one, in one
    /// transaction where the store allows: the price of one commit for a group of
    /// small files. Stops at the first [`Admit::Limit`], so the answer may be shorter
    /// than `files`: the rest were not admitted.
    fn admit_files(
        &self,
        run: i64,
        files: &[NewFile<'_>],
        limits: &DayLimits,
    ) -> Result<Vec<Admit>, JournalError> {
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let admit = self.admit_file(run, f.rel_path, f.size, f.mtime_ns, limits)?;
            let limit = matches!(admit, Admit::Limit(_));
            out.push(admit);
            if limit {
                break;
            }
        }
        Ok(out)
    }

    /// Ends file `id`, admitted but never handled because the run stopped first, as
    /// skipped: nothing was done to it, and its source waits for the next run.
    fn release_file(&self, id: i64) -> Result<(), JournalError> {
        self.file_finished(&Finished {
            id,
            outcome: Outcome::Skipped,
            disposition: crate::states::Disposition::LeftInSource.as_str(),
            error: Some(
                "not handled: the run stopped before its turn; left in the source for the next run",
            ),
            ..Finished::default()
        })
    }

    /// Whether this node still holds the claim on file `id` (always, without claims).
    fn claim_held(&self, id: i64) -> Result<bool, JournalError> {
        let _ = id;
        Ok(true)
    }

    /// The fleet's nodes and today's totals; `None` for a journal of one node.
    fn fleet_status(&self) -> Result<Option<FleetStatus>, JournalError> {
        Ok(None)
    }

    fn begin_run(&self, started: &str) -> Result<i64, JournalError>;

    fn finish_run(
        &self,
        run: i64,
        finished: &str,
        exit_code: i32,
        summary: &serde_json::Value,
    ) -> Result<(), JournalError>;

    /// Records the clamd endpoints of run `run` as they were at its end.
    fn record_endpoints(
        &self,
        run: i64,
        endpoints: &[crate::scan::pool::EndpointStatus],
    ) -> Result<(), JournalError>;

    /// Records an admitted file; the returned id names its temp files.
    fn file_admitted(
        &self,
        run: i64,
        rel_path: &str,
        size: u64,
        mtime_ns: i64,
    ) -> Result<i64, JournalError>;

    /// The file's outcome is final and durable (delivered, archived, deleted or
    /// failed), with what was learned on the way: hash, verdict, each engine's answer.
    fn file_finished(&self, f: &Finished) -> Result<(), JournalError>;

    /// Many files finished at once, in one transaction (group commit). Returns the ids
    /// of files whose fleet claim was lost (another node took them over): those are
    /// recorded as skipped, and their sources must be left alone. Always empty for a
    /// journal without claims.
    fn finish_batch(&self, items: &[Finished]) -> Result<Vec<i64>, JournalError>;

    /// Sources removed, in one transaction.
    fn sources_removed(&self, ids: &[i64]) -> Result<(), JournalError>;

    /// Records a hazard archive entry; call only once archive and sidecar are durable.
    fn hazard_archived(&self, h: &HazardRow) -> Result<(), JournalError>;

    fn source_removed(&self, id: i64) -> Result<(), JournalError>;

    /// Files an earlier run admitted but did not finish (it crashed or was killed).
    fn unfinished(&self) -> Result<Vec<Unfinished>, JournalError>;

    /// Runs that never recorded their end.
    fn unfinished_runs(&self, current: i64) -> Result<Vec<i64>, JournalError>;

    fn mark_run_interrupted(&self, run: i64) -> Result<(), JournalError>;

    /// Ends file `id` of an interrupted run as `interrupted` (recovery), with `note`.
    fn mark_interrupted(&self, id: i64, note: &str) -> Result<(), JournalError> {
        self.file_finished(&Finished {
            id,
            outcome: Outcome::Interrupted,
            disposition: "recovered",
            error: Some(note),
            ..Finished::default()
        })
    }

    /// Files and bytes finished on local day `day` (clean or suspect), across runs.
    fn day_totals(&self, day: &str) -> Result<(u64, u64), JournalError>;

    /// Bytes of files delivered clean since `since` (unix seconds).
    fn delivered_bytes_since(&self, since: i64) -> Result<u64, JournalError>;

    fn record_space(&self, run: i64, s: &SpaceSample, total: u64) -> Result<(), JournalError>;

    /// Free-space samples of `target` since `since` (unix seconds), oldest first.
    fn space_samples(&self, target: &str, since: i64) -> Result<Vec<SpaceSample>, JournalError>;

    fn record_throttle(&self, run: i64, reason: &str, message: &str) -> Result<(), JournalError>;

    fn last_runs(&self, n: u32) -> Result<Vec<RunRow>, JournalError>;

    /// The outcome and disposition recorded for file `id` (tests and status).
    fn file_outcome(&self, id: i64) -> Result<Option<(String, Option<String>)>, JournalError>;

    /// Every record of a file whose source path (relative to `source_path`) or final
    /// path is `exact`, or ends in `/suffix`; newest first.
    fn file_history(&self, exact: &str, suffix: &str) -> Result<Vec<FileHistory>, JournalError>;

    /// Every rescan of file `id`, oldest first.
    fn rescans_of(&self, id: i64) -> Result<Vec<RescanRow>, JournalError>;

    /// Rescans left in [`RescanState::Withdrawing`] by a run that was killed.
    fn rescans_withdrawing(&self) -> Result<Vec<RescanRow>, JournalError>;

    /// Up to `limit` deliveries finished since `since` (unix seconds) with ids above
    /// `after`, oldest first, that still need a rescan under `generation`: not yet
    /// rescanned under it (a failed rescan counts after [`RESCAN_ATTEMPTS`]), and not
    /// already alerted on, withdrawn, changed or gone.
    fn deliveries_to_rescan(
        &self,
        since: i64,
        generation: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, JournalError>;

    /// The file id up to which a run's retro-scan under `generation` has examined
    /// every delivery (0: none yet).
    fn rescan_mark(&self, generation: &str) -> Result<i64, JournalError>;

    /// Moves the mark of `generation` on to `below` (see [`Journal::rescan_mark`]).
    fn set_rescan_mark(&self, generation: &str, below: i64) -> Result<(), JournalError>;

    /// The highest file id given out so far (0: none).
    fn last_file_id(&self) -> Result<i64, JournalError>;

    /// Records a rescan of delivery `file_id`; returns the row's id.
    #[allow(clippy::too_many_arguments)]
    fn rescan_recorded(
        &self,
        file_id: i64,
        run_id: Option<i64>,
        generation: &str,
        state: RescanState,
        detections: &[String],
        scan_results: Option<&serde_json::Value>,
        note: Option<&str>,
    ) -> Result<i64, JournalError>;

    /// Moves rescan `id` on to `state` (and records the archive it went to, if any).
    fn rescan_updated(
        &self,
        id: i64,
        state: RescanState,
        archive_path: Option<&str>,
        note: Option<&str>,
    ) -> Result<(), JournalError>;

    /// Forgets rescan `id` (a withdrawal interrupted before its archive existed: it
    /// is done again from the start).
    fn rescan_forgotten(&self, id: i64) -> Result<(), JournalError>;

    /// The delivery `file_id` (whatever its age), for resuming a withdrawal.
    fn delivery(&self, file_id: i64) -> Result<Option<Delivery>, JournalError>;

    /// Every set-aside file, by identity.
    fn set_aside_all(&self) -> Result<std::collections::HashMap<Identity, SetAside>, JournalError>;

    /// When the first run other than `current` started on local day `day`
    /// (`YYYY-MM-DD`), as recorded (RFC 3339); `None` when there was none.
    fn first_run_on_day(&self, day: &str, current: i64) -> Result<Option<String>, JournalError>;

    /// Remembers a file set aside (replacing what an earlier judgement said).
    fn set_aside(
        &self,
        id: &Identity,
        rel_path: &str,
        what: &SetAside,
        file_id: Option<i64>,
    ) -> Result<(), JournalError>;
}

pub(crate) fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Today's local date as the journal stores it (daily limits use the local day).
pub fn local_day(t: chrono::DateTime<chrono::Local>) -> String {
    t.format("%Y-%m-%d").to_string()
}

/// The daily limits a fleet claim counts against (0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct DayLimits {
    pub files: u64,
    pub bytes: u64,
}

impl DayLimits {
    pub fn of(cfg: &crate::config::Config) -> DayLimits {
        let t = &cfg.throttle;
        if !t.enabled {
            return DayLimits::default();
        }
        DayLimits {
            files: t.max_files_per_day,
            bytes: t.max_mb_per_day.saturating_mul(1_048_576),
        }
    }
}

/// A file to admit ([`Journal::admit_files`]).
#[derive(Debug, Clone, Copy)]
pub struct NewFile<'a> {
    pub rel_path: &'a str,
    pub size: u64,
    pub mtime_ns: i64,
}

/// What [`Journal::admit_file`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Recorded (and claimed): `id` names its temp files; `token` fences its commits.
    Admitted { id: i64, token: i64 },
    /// Another node holds or is taking the file: left to it.
    Taken(String),
    /// The fleet's daily limit is reached: admission stops.
    Limit(String),
}

/// The fleet, for `shuttle status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetStatus {
    pub nodes: Vec<FleetNode>,
    /// Live claims of every node.
    pub claims_in_flight: u64,
    /// Files and bytes the fleet finished today (clean or suspect).
    pub today_files: u64,
    pub today_bytes: u64,
}

/// One node of a fleet.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetNode {
    pub name: String,
    pub pid: i64,
    pub run_id: Option<i64>,
    /// When its current or last run started (RFC 3339, the node's clock).
    pub started: String,
    /// `running` or `idle` (its last run ended).
    pub state: String,
    /// The database's clock, UTC.
    pub last_heartbeat: String,
    pub heartbeat_age_seconds: i64,
    pub lease_seconds: i64,
    pub claims_in_flight: u64,
}

/// Opens the journal the configuration names: the one place a journal is opened, so
/// the run, `status`, `history`, `metrics` and `rescan` all see the same store.
pub fn open(cfg: &crate::config::Config) -> Result<Box<dyn Journal>, JournalError> {
    match &cfg.fleet {
        Some(f) => Ok(Box::new(PgJournal::open(f)?)),
        None => Ok(Box::new(SqliteJournal::open(&cfg.tracking_data_path)?)),
    }
}

/// The journal as the run's threads share it (one connection, one mutex).
pub type Shared = std::sync::Mutex<Box<dyn Journal>>;

/// Why there is nothing to read yet: the configured SQLite journal does not exist
/// (`None` when it does, or when the journal is a database server).
pub fn absent(cfg: &crate::config::Config) -> Option<String> {
    if cfg.fleet.is_some() {
        return None;
    }
    let db = cfg.tracking_data_path.join(FILE_NAME);
    (!db.is_file()).then(|| {
        format!(
            "no journal at {} (tracking_data_path): Shuttle has not run with this configuration",
            db.display()
        )
    })
}
