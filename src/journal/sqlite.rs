//! The SQLite journal: one file in `tracking_data_path`, the default store. Its schema
//! is versioned with `PRAGMA user_version` and brought forward by ordered migrations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Admit, DayLimits, Delivery, FileHistory, Finished, HazardRow, Identity, Journal, JournalError,
    NewFile, Outcome, RESCAN_ATTEMPTS, RescanRow, RescanState, RunRow, SetAside, SpaceSample,
    Unfinished, local_day, now_secs,
};

pub const FILE_NAME: &str = "shuttle-journal.sqlite3";

pub struct SqliteJournal {
    conn: Connection,
    path: PathBuf,
}

/// The schema, as an ordered list of migrations: migration `i` takes a journal from
/// version `i` to `i + 1` (`PRAGMA user_version`). A journal written before
/// versioning has user_version 0 and the tables of migration 0, which uses
/// `IF NOT EXISTS` throughout and so applies to it unchanged.
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5];

/// Version 3: retro-scans of delivered files (`crate::rescan`). One row per rescan of
/// one delivery under one signature generation; a row is the progress mark that lets
/// an interrupted retro-scan resume where it stopped.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS rescans (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id),
    run_id INTEGER,
    generation TEXT NOT NULL,
    time INTEGER NOT NULL,
    state TEXT NOT NULL,
    detections TEXT,
    scan_results TEXT,
    archive_path TEXT,
    note TEXT
);
CREATE INDEX IF NOT EXISTS rescans_file ON rescans(file_id, generation);
CREATE TABLE IF NOT EXISTS rescan_marks (
    generation TEXT PRIMARY KEY,
    below INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_finished ON files(finished_at) WHERE outcome = 'clean';
";

/// Version 5: the sizes in the indexes that sums go through. Admission's daily
/// totals (`day_totals`, read at a run's start when a daily limit is set, and by
/// `status`) and the delivered volume since a time (`delivered_bytes_since`, on a
/// throttle stop) read every file of the day or the period; with `size` in the index
/// they read the index alone, not each file's row (a server's journal holds a day of
/// files: 16,000 files read 1,600 pages, 8 ms, when this was written).
/// They replace the two indexes those sums used to go through (`outcome` is in the
/// partial one only so that SQLite counts it as covering; the retro-scan's pages
/// still go by file id).
const SCHEMA_V5: &str = "
CREATE INDEX IF NOT EXISTS files_day_size ON files(finished_day, outcome, size);
DROP INDEX IF EXISTS files_day;
CREATE INDEX IF NOT EXISTS files_clean_size ON files(finished_at, size, outcome) WHERE outcome = 'clean';
DROP INDEX IF EXISTS files_finished;
";

/// Files and bytes finished on a local day, clean or suspect (from `files_day_size`).
const DAY_TOTALS: &str = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE finished_day = ?1 AND outcome IN ('clean', 'suspect')";
/// Bytes delivered clean since a time (from `files_clean_size`).
const DELIVERED_SINCE: &str =
    "SELECT COALESCE(SUM(size), 0) FROM files WHERE outcome = 'clean' AND finished_at >= ?1";

/// Version 4: the clamd endpoints of each run, with their health and figures (each
/// file's own endpoint is in its `scan_results`).
const SCHEMA_V4: &str = "
CREATE TABLE IF NOT EXISTS run_endpoints (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    endpoint TEXT NOT NULL,
    health TEXT NOT NULL,
    why TEXT,
    version TEXT,
    concurrency INTEGER NOT NULL,
    scans INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    scan_seconds REAL NOT NULL,
    PRIMARY KEY (run_id, endpoint)
);
";

/// Version 2: set-aside files (unscannable, too large).
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS set_aside (
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    rel_path TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    limits TEXT NOT NULL,
    file_id INTEGER,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (dev, ino, size, mtime_ns)
);
";

/// Version 1: the schema before versioning.
pub const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    exit_code INTEGER,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    rel_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    sha256 TEXT,
    verdict TEXT,
    scan_results TEXT,
    outcome TEXT,
    disposition TEXT,
    final_path TEXT,
    error TEXT,
    source_removed INTEGER NOT NULL DEFAULT 0,
    admitted_at INTEGER NOT NULL,
    finished_at INTEGER,
    finished_day TEXT
);
CREATE INDEX IF NOT EXISTS files_day ON files(finished_day, outcome);
CREATE INDEX IF NOT EXISTS files_open ON files(outcome) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS space (
    run_id INTEGER NOT NULL,
    time INTEGER NOT NULL,
    target TEXT NOT NULL,
    path TEXT NOT NULL,
    free_bytes INTEGER NOT NULL,
    threshold_bytes INTEGER NOT NULL,
    total_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS space_time ON space(target, time);
CREATE TABLE IF NOT EXISTS hazard (
    file_id INTEGER PRIMARY KEY REFERENCES files(id),
    archive_path TEXT NOT NULL,
    sidecar_path TEXT NOT NULL,
    original_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    detections TEXT NOT NULL,
    scanners TEXT NOT NULL,
    archived_at TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS throttle_events (
    run_id INTEGER NOT NULL,
    time INTEGER NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
";

/// Brings the journal to the newest schema, one migration per transaction.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let from = usize::try_from(version).unwrap_or(0);
    if from > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal schema version {version} is newer than this Shuttle knows ({}); use a newer Shuttle",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// A delivery, from `SELECT id, rel_path, size, mtime_ns, sha256, scan_results,
/// final_path, finished_at`.
fn delivery_row(r: &rusqlite::Row) -> rusqlite::Result<Delivery> {
    let results: Option<String> = r.get(5)?;
    Ok(Delivery {
        file_id: r.get(0)?,
        rel_path: r.get(1)?,
        size: r.get::<_, i64>(2)?.max(0) as u64,
        mtime_ns: r.get(3)?,
        sha256: r.get(4)?,
        scan_results: results.and_then(|s| serde_json::from_str(&s).ok()),
        final_path: r.get(6)?,
        finished_at: r.get::<_, Option<i64>>(7)?.unwrap_or(0),
    })
}

fn rescan_row(r: &rusqlite::Row) -> rusqlite::Result<RescanRow> {
    let state: String = r.get(5)?;
    let dets: Option<String> = r.get(6)?;
    Ok(RescanRow {
        id: r.get(0)?,
        file_id: r.get(1)?,
        run_id: r.get(2)?,
        generation: r.get(3)?,
        time: r.get(4)?,
        // An unknown state (a newer Shuttle's) is shown as failed: never as done.
        state: RescanState::parse(&state).unwrap_or(RescanState::Failed),
        detections: dets.and_then(|s| serde_json::from_str(&s).ok()),
        archive_path: r.get(7)?,
        note: r.get(8)?,
    })
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<SqliteJournal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Dir {
            path: dir.into(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let err = |source| JournalError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // No checkpoint when the connection closes. The closing checkpoint fsyncs the
        // WAL, copies it into the database and fsyncs that: about 10 ms at the end of
        // every run, with the run already done. The WAL stays beside the database
        // instead (`-wal`, `-shm`), the next connection reads it, and SQLite's
        // automatic checkpoint folds it in whenever it passes 1,000 pages, during a
        // later commit. With `synchronous = NORMAL` no commit is fsynced anyway: a
        // power cut just after a run may now cost the journal its last records, as
        // one during a run always could. The journal only ever lags the disk, and
        // recovery is built for that (docs/design.md §4).
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(SqliteJournal { conn, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn wrap<T>(&self, r: rusqlite::Result<T>) -> Result<T, JournalError> {
        r.map_err(|source| JournalError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Direct access for tests and the status command's ad-hoc queries.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl Journal for SqliteJournal {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn begin_run(&self, started: &str) -> Result<i64, JournalError> {
        self.wrap(self.conn.execute(
            "INSERT INTO runs (pid, started) VALUES (?1, ?2)",
            params![std::process::id(), started],
        ))?;
        Ok(self.conn.last_insert_rowid())
    }

    fn finish_run(
        &self,
        run: i64,
        finished: &str,
        exit_code: i32,
        summary: &serde_json::Value,
    ) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "UPDATE runs SET finished = ?2, exit_code = ?3, summary = ?4 WHERE id = ?1",
            params![run, finished, exit_code, summary.to_string()],
        ))
        .map(drop)
    }

    /// Records the clamd endpoints of run `run` as they were at its end.
    fn record_endpoints(
        &self,
        run: i64,
        endpoints: &[crate::scan::pool::EndpointStatus],
    ) -> Result<(), JournalError> {
        for e in endpoints {
            self.wrap(self.conn.execute(
                "INSERT OR REPLACE INTO run_endpoints (run_id, endpoint, health, why, version, concurrency, scans, errors, scan_seconds)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    run,
                    e.endpoint,
                    e.health.to_string(),
                    e.why,
                    e.version,
                    e.concurrency as i64,
                    e.scans as i64,
                    e.errors as i64,
                    e.scan_seconds
                ],
            ))?;
        }
        Ok(())
    }

    /// Records an admitted file; the returned id names its temp files.
    fn file_admitted(
        &self,
        run: i64,
        rel_path: &str,
        size: u64,
        mtime_ns: i64,
    ) -> Result<i64, JournalError> {
        crate::crashpoint::here("journal: before file_admitted");
        let mut st = self.wrap(self.conn.prepare_cached(
            "INSERT INTO files (run_id, rel_path, size, mtime_ns, state, admitted_at) VALUES (?1, ?2, ?3, ?4, 'admitted', ?5)",
        ))?;
        self.wrap(st.execute(params![run, rel_path, size as i64, mtime_ns, now_secs()]))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// One transaction for the whole group (one node: no claims, no fleet limits).
    fn admit_files(
        &self,
        run: i64,
        files: &[NewFile<'_>],
        _limits: &DayLimits,
    ) -> Result<Vec<Admit>, JournalError> {
        let tx = self.wrap(self.conn.unchecked_transaction())?;
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let id = self.file_admitted(run, f.rel_path, f.size, f.mtime_ns)?;
            out.push(Admit::Admitted { id, token: 0 });
        }
        self.wrap(tx.commit())?;
        Ok(out)
    }

    /// The file's outcome is final and durable (delivered, archived, deleted or
    /// failed), with what was learned on the way: hash, verdict, each engine's answer.
    fn file_finished(&self, f: &Finished) -> Result<(), JournalError> {
        crate::crashpoint::here("journal: before file_finished");
        let mut st = self.wrap(self.conn.prepare_cached(
            "UPDATE files SET state = 'finished', outcome = ?2, disposition = ?3, final_path = ?4, error = ?5,
             finished_at = ?6, finished_day = ?7, sha256 = COALESCE(?8, sha256), verdict = COALESCE(?9, verdict),
             scan_results = COALESCE(?10, scan_results) WHERE id = ?1",
        ))?;
        let day = local_day(chrono::Local::now());
        let results = f.scan_results.map(serde_json::value::RawValue::get);
        self.wrap(st.execute(params![
            f.id,
            f.outcome.as_str(),
            f.disposition,
            f.final_path,
            f.error,
            now_secs(),
            day,
            f.sha256,
            f.verdict,
            results
        ]))
        .map(drop)
    }

    /// Many files finished at once, in one transaction (group commit).
    fn finish_batch(&self, items: &[Finished]) -> Result<Vec<i64>, JournalError> {
        let tx = self.wrap(self.conn.unchecked_transaction())?;
        for f in items {
            self.file_finished(f)?;
        }
        self.wrap(tx.commit())?;
        Ok(Vec::new())
    }

    /// Sources removed, in one transaction.
    fn sources_removed(&self, ids: &[i64]) -> Result<(), JournalError> {
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self.wrap(self.conn.unchecked_transaction())?;
        for &id in ids {
            self.source_removed(id)?;
        }
        self.wrap(tx.commit())
    }

    /// Records a hazard archive entry; call only once archive and sidecar are durable.
    fn hazard_archived(&self, h: &HazardRow) -> Result<(), JournalError> {
        let mut st = self.wrap(self.conn.prepare_cached(
            "INSERT OR REPLACE INTO hazard (file_id, archive_path, sidecar_path, original_path, size, sha256, detections, scanners, archived_at, key_fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        ))?;
        self.wrap(st.execute(params![
            h.file_id,
            h.archive_path,
            h.sidecar_path,
            h.original_path,
            h.size as i64,
            h.sha256,
            h.detections.to_string(),
            h.scanners.to_string(),
            h.archived_at,
            h.key_fingerprint
        ]))
        .map(drop)
    }

    fn source_removed(&self, id: i64) -> Result<(), JournalError> {
        crate::crashpoint::here("journal: before source_removed");
        let mut st = self.wrap(
            self.conn
                .prepare_cached("UPDATE files SET source_removed = 1 WHERE id = ?1"),
        )?;
        self.wrap(st.execute(params![id])).map(drop)
    }

    /// Files an earlier run admitted but did not finish (it crashed or was killed).
    fn unfinished(&self) -> Result<Vec<Unfinished>, JournalError> {
        let mut st =
            self.wrap(self.conn.prepare(
                "SELECT id, run_id, rel_path FROM files WHERE outcome IS NULL ORDER BY id",
            ))?;
        let rows = self.wrap(st.query_map([], |r| {
            Ok(Unfinished {
                id: r.get(0)?,
                run_id: r.get(1)?,
                rel_path: r.get(2)?,
            })
        }))?;
        self.wrap(rows.collect())
    }

    /// Runs that never recorded their end.
    fn unfinished_runs(&self, current: i64) -> Result<Vec<i64>, JournalError> {
        let mut st = self.wrap(
            self.conn
                .prepare("SELECT id FROM runs WHERE finished IS NULL AND id != ?1"),
        )?;
        let rows = self.wrap(st.query_map([current], |r| r.get(0)))?;
        self.wrap(rows.collect())
    }

    fn mark_run_interrupted(&self, run: i64) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "UPDATE runs SET finished = 'interrupted', exit_code = -1 WHERE id = ?1",
            params![run],
        ))
        .map(drop)
    }

    /// Files and bytes finished on local day `day` (clean or suspect), across runs.
    fn day_totals(&self, day: &str) -> Result<(u64, u64), JournalError> {
        let row: (i64, i64) = self.wrap(
            self.conn
                .query_row(DAY_TOTALS, [day], |r| Ok((r.get(0)?, r.get(1)?))),
        )?;
        Ok((row.0.max(0) as u64, row.1.max(0) as u64))
    }

    /// Bytes of files delivered clean since `since` (unix seconds).
    fn delivered_bytes_since(&self, since: i64) -> Result<u64, JournalError> {
        let b: i64 = self.wrap(self.conn.query_row(DELIVERED_SINCE, [since], |r| r.get(0)))?;
        Ok(b.max(0) as u64)
    }

    fn record_space(&self, run: i64, s: &SpaceSample, total: u64) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "INSERT INTO space (run_id, time, target, path, free_bytes, threshold_bytes, total_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![run, s.time, s.target, s.path, s.free_bytes as i64, s.threshold_bytes as i64, total as i64],
        ))
        .map(drop)
    }

    /// Free-space samples of `target` since `since` (unix seconds), oldest first.
    fn space_samples(&self, target: &str, since: i64) -> Result<Vec<SpaceSample>, JournalError> {
        let mut st = self.wrap(self.conn.prepare(
            "SELECT time, target, path, free_bytes, threshold_bytes FROM space WHERE target = ?1 AND time >= ?2 ORDER BY time",
        ))?;
        let rows = self.wrap(st.query_map(params![target, since], |r| {
            Ok(SpaceSample {
                time: r.get(0)?,
                target: r.get(1)?,
                path: r.get(2)?,
                free_bytes: r.get::<_, i64>(3)?.max(0) as u64,
                threshold_bytes: r.get::<_, i64>(4)?.max(0) as u64,
            })
        }))?;
        self.wrap(rows.collect())
    }

    fn record_throttle(&self, run: i64, reason: &str, message: &str) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "INSERT INTO throttle_events (run_id, time, reason, message) VALUES (?1, ?2, ?3, ?4)",
            params![run, now_secs(), reason, message],
        ))
        .map(drop)
    }

    fn last_runs(&self, n: u32) -> Result<Vec<RunRow>, JournalError> {
        let mut st = self.wrap(self.conn.prepare(
            "SELECT id, started, finished, exit_code, summary FROM runs ORDER BY id DESC LIMIT ?1",
        ))?;
        let rows = self.wrap(st.query_map([n], |r| {
            let summary: Option<String> = r.get(4)?;
            Ok(RunRow {
                id: r.get(0)?,
                started: r.get(1)?,
                finished: r.get(2)?,
                exit_code: r.get(3)?,
                summary: summary.and_then(|s| serde_json::from_str(&s).ok()),
            })
        }))?;
        self.wrap(rows.collect())
    }

    /// The outcome and disposition recorded for file `id` (tests and status).
    fn file_outcome(&self, id: i64) -> Result<Option<(String, Option<String>)>, JournalError> {
        self.wrap(
            self.conn
                .query_row(
                    "SELECT state, outcome FROM files WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional(),
        )
    }

    /// Every record of a file whose source path (relative to `source_path`) or final
    /// path is `exact`, or ends in `/suffix`; newest first.
    fn file_history(&self, exact: &str, suffix: &str) -> Result<Vec<FileHistory>, JournalError> {
        let tail = format!("/{}", suffix.trim_start_matches('/'));
        let mut st = self.wrap(self.conn.prepare(
            "SELECT f.id, f.run_id, r.started, f.rel_path, f.size, f.mtime_ns, f.state, f.admitted_at,
                    f.sha256, f.verdict, f.scan_results, f.outcome, f.disposition, f.final_path, f.error,
                    f.source_removed, f.finished_at, h.archive_path, h.key_fingerprint
             FROM files f LEFT JOIN runs r ON r.id = f.run_id LEFT JOIN hazard h ON h.file_id = f.id
             WHERE f.rel_path = ?1 OR f.final_path = ?1
                OR substr(f.rel_path, -length(?2)) = ?2 OR substr(f.final_path, -length(?2)) = ?2
             ORDER BY f.id DESC",
        ))?;
        let rows = self.wrap(st.query_map(params![exact, tail], |r| {
            let results: Option<String> = r.get(10)?;
            Ok(FileHistory {
                id: r.get(0)?,
                run_id: r.get(1)?,
                run_started: r.get(2)?,
                rel_path: r.get(3)?,
                size: r.get::<_, i64>(4)?.max(0) as u64,
                mtime_ns: r.get(5)?,
                state: r.get(6)?,
                admitted_at: r.get(7)?,
                sha256: r.get(8)?,
                verdict: r.get(9)?,
                scan_results: results.and_then(|s| serde_json::from_str(&s).ok()),
                outcome: r.get(11)?,
                disposition: r.get(12)?,
                final_path: r.get(13)?,
                error: r.get(14)?,
                source_removed: r.get::<_, i64>(15)? != 0,
                finished_at: r.get(16)?,
                hazard_archive: r.get(17)?,
                hazard_key_fingerprint: r.get(18)?,
                rescans: Vec::new(),
            })
        }))?;
        let mut records: Vec<FileHistory> = self.wrap(rows.collect())?;
        for rec in &mut records {
            rec.rescans = self.rescans_of(rec.id)?;
        }
        Ok(records)
    }

    /// Every rescan of file `id`, oldest first.
    fn rescans_of(&self, id: i64) -> Result<Vec<RescanRow>, JournalError> {
        let mut st = self.wrap(self.conn.prepare_cached(
            "SELECT id, file_id, run_id, generation, time, state, detections, archive_path, note
             FROM rescans WHERE file_id = ?1 ORDER BY id",
        ))?;
        let rows = self.wrap(st.query_map([id], rescan_row))?;
        self.wrap(rows.collect())
    }

    /// Rescans left in [`RescanState::Withdrawing`] by a run that was killed.
    fn rescans_withdrawing(&self) -> Result<Vec<RescanRow>, JournalError> {
        let mut st = self.wrap(self.conn.prepare(
            "SELECT id, file_id, run_id, generation, time, state, detections, archive_path, note
             FROM rescans WHERE state = 'withdrawing' ORDER BY id",
        ))?;
        let rows = self.wrap(st.query_map([], rescan_row))?;
        self.wrap(rows.collect())
    }

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
    ) -> Result<Vec<Delivery>, JournalError> {
        let mut st = self.wrap(self.conn.prepare_cached(
            "SELECT f.id, f.rel_path, f.size, f.mtime_ns, f.sha256, f.scan_results, f.final_path, f.finished_at
             FROM files f
             WHERE f.outcome = 'clean' AND f.final_path IS NOT NULL AND f.finished_at >= ?1 AND f.id > ?3
               AND NOT EXISTS (SELECT 1 FROM rescans r WHERE r.file_id = f.id
                               AND r.state IN ('alerted', 'withdrawing', 'withdrawn', 'changed', 'gone'))
               AND NOT EXISTS (SELECT 1 FROM rescans r WHERE r.file_id = f.id AND r.generation = ?2
                               AND r.state != 'failed')
               AND (SELECT COUNT(*) FROM rescans r WHERE r.file_id = f.id AND r.generation = ?2
                    AND r.state = 'failed') < ?5
             ORDER BY f.id LIMIT ?4",
        ))?;
        let rows = self.wrap(st.query_map(
            params![since, generation, after, limit, RESCAN_ATTEMPTS],
            delivery_row,
        ))?;
        self.wrap(rows.collect())
    }

    /// The file id up to which a run's retro-scan under `generation` has examined
    /// every delivery (0: none yet).
    fn rescan_mark(&self, generation: &str) -> Result<i64, JournalError> {
        self.wrap(
            self.conn
                .query_row(
                    "SELECT below FROM rescan_marks WHERE generation = ?1",
                    [generation],
                    |r| r.get(0),
                )
                .optional(),
        )
        .map(|v| v.unwrap_or(0))
    }

    /// Moves the mark of `generation` on to `below` (see [`Journal::rescan_mark`]).
    fn set_rescan_mark(&self, generation: &str, below: i64) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "INSERT INTO rescan_marks (generation, below) VALUES (?1, ?2)
             ON CONFLICT(generation) DO UPDATE SET below = MAX(below, excluded.below)",
            params![generation, below],
        ))
        .map(drop)
    }

    fn last_file_id(&self) -> Result<i64, JournalError> {
        self.wrap(
            self.conn
                .query_row("SELECT COALESCE(MAX(id), 0) FROM files", [], |r| r.get(0)),
        )
    }

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
    ) -> Result<i64, JournalError> {
        crate::crashpoint::here("journal: before rescan_recorded");
        let mut st = self.wrap(self.conn.prepare_cached(
            "INSERT INTO rescans (file_id, run_id, generation, time, state, detections, scan_results, note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        ))?;
        let dets = (!detections.is_empty()).then(|| serde_json::json!(detections).to_string());
        self.wrap(st.execute(params![
            file_id,
            run_id,
            generation,
            now_secs(),
            state.as_str(),
            dets,
            scan_results.map(|v| v.to_string()),
            note
        ]))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Moves rescan `id` on to `state` (and records the archive it went to, if any).
    fn rescan_updated(
        &self,
        id: i64,
        state: RescanState,
        archive_path: Option<&str>,
        note: Option<&str>,
    ) -> Result<(), JournalError> {
        crate::crashpoint::here("journal: before rescan_updated");
        self.wrap(self.conn.execute(
            "UPDATE rescans SET state = ?2, archive_path = COALESCE(?3, archive_path),
             note = COALESCE(?4, note), time = ?5 WHERE id = ?1",
            params![id, state.as_str(), archive_path, note, now_secs()],
        ))
        .map(drop)
    }

    /// Forgets rescan `id` (a withdrawal interrupted before its archive existed: it
    /// is done again from the start).
    fn rescan_forgotten(&self, id: i64) -> Result<(), JournalError> {
        self.wrap(
            self.conn
                .execute("DELETE FROM rescans WHERE id = ?1", params![id]),
        )
        .map(drop)
    }

    /// The delivery `file_id` (whatever its age), for resuming a withdrawal.
    fn delivery(&self, file_id: i64) -> Result<Option<Delivery>, JournalError> {
        self.wrap(
            self.conn
                .query_row(
                    "SELECT id, rel_path, size, mtime_ns, sha256, scan_results, final_path, finished_at
                     FROM files WHERE id = ?1 AND final_path IS NOT NULL",
                    [file_id],
                    delivery_row,
                )
                .optional(),
        )
    }

    /// Every set-aside file, by identity.
    fn set_aside_all(&self) -> Result<std::collections::HashMap<Identity, SetAside>, JournalError> {
        let mut st = self
            .wrap(self.conn.prepare(
                "SELECT dev, ino, size, mtime_ns, outcome, reason, limits FROM set_aside",
            ))?;
        let rows = self.wrap(st.query_map([], |r| {
            let outcome: String = r.get(4)?;
            Ok((
                Identity {
                    dev: r.get::<_, i64>(0)? as u64,
                    ino: r.get::<_, i64>(1)? as u64,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                },
                SetAside {
                    outcome: if outcome == "too_large" {
                        Outcome::TooLarge
                    } else {
                        Outcome::Unscannable
                    },
                    reason: r.get(5)?,
                    limits: r.get(6)?,
                },
            ))
        }))?;
        self.wrap(rows.collect())
    }

    /// When the first run other than `current` started on local day `day`
    /// (`YYYY-MM-DD`), as recorded (RFC 3339); `None` when there was none.
    fn first_run_on_day(&self, day: &str, current: i64) -> Result<Option<String>, JournalError> {
        self.wrap(self.conn.query_row(
            "SELECT MIN(started) FROM runs WHERE substr(started, 1, 10) = ?1 AND id != ?2",
            params![day, current],
            |r| r.get(0),
        ))
    }

    /// Remembers a file set aside (replacing what an earlier judgement said).
    fn set_aside(
        &self,
        id: &Identity,
        rel_path: &str,
        what: &SetAside,
        file_id: Option<i64>,
    ) -> Result<(), JournalError> {
        self.wrap(self.conn.execute(
            "INSERT OR REPLACE INTO set_aside (dev, ino, size, mtime_ns, rel_path, outcome, reason, limits, file_id, first_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                id.dev as i64,
                id.ino as i64,
                id.size as i64,
                id.mtime_ns,
                rel_path,
                what.outcome.as_str(),
                what.reason,
                what.limits,
                file_id,
                now_secs()
            ],
        ))
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A journal written before the schema was versioned (user_version 0, the tables
    /// of version 1) keeps its history and daily totals when opened, and gains the
    /// newer tables.
    #[test]
    fn a_journal_from_before_versioning_is_migrated_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            old.execute_batch(SCHEMA_V1).unwrap();
            old.execute_batch(
                "INSERT INTO runs (id, pid, started, finished, exit_code, summary)
                   VALUES (1, 42, '2026-11-24T08:00:00+00:00', '2026-11-24T08:01:00+00:00', 0, '{\"files\":{\"clean\":2}}');
                 INSERT INTO files (run_id, rel_path, size, mtime_ns, state, outcome, admitted_at, finished_at, finished_day)
                   VALUES (1, 'a.txt', 100, 1, 'finished', 'clean', 1, 2, '2026-11-24'),
                          (1, 'b.txt', 250, 1, 'finished', 'suspect', 1, 2, '2026-11-24'),
                          (1, 'c.txt', 999, 1, 'finished', 'failed', 1, 2, '2026-11-24');",
            )
            .unwrap();
            let v: i64 = old
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 0, "today's journals carry no version");
        }
        let j = SqliteJournal::open(dir.path()).unwrap();
        let v: i64 = j
            .connection()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        assert_eq!(j.day_totals("2026-11-24").unwrap(), (2, 350));
        let runs = j.last_runs(5).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].exit_code, Some(0));
        assert_eq!(runs[0].summary.as_ref().unwrap()["files"]["clean"], 2);
        assert!(j.set_aside_all().unwrap().is_empty());
        // Opening again is a no-op; the new table works.
        drop(j);
        let j = SqliteJournal::open(dir.path()).unwrap();
        let id = Identity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
        };
        let what = SetAside {
            outcome: Outcome::Unscannable,
            reason: "encrypted archive".into(),
            limits: "x".into(),
        };
        j.set_aside(&id, "e.zip", &what, None).unwrap();
        assert_eq!(j.set_aside_all().unwrap().get(&id), Some(&what));
        assert_eq!(j.day_totals("2026-11-24").unwrap(), (2, 350));
    }

    /// The journal closes without a checkpoint: a run's records wait in the
    /// write-ahead log beside it, and the next open reads them. The sums a run's start
    /// makes read an index alone, never every file's row.
    #[test]
    fn records_wait_in_the_wal_after_close_and_the_start_sums_read_indexes_only() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = SqliteJournal::open(dir.path()).unwrap();
            j.connection()
                .execute_batch(
                    "INSERT INTO runs (id, pid, started) VALUES (1, 1, 'x');
                     INSERT INTO files (run_id, rel_path, size, mtime_ns, state, outcome, admitted_at, finished_at, finished_day)
                       VALUES (1, 'a', 100, 1, 'finished', 'clean', 1, 20, '2026-12-06'),
                              (1, 'b', 50, 1, 'finished', 'suspect', 1, 20, '2026-12-06'),
                              (1, 'c', 7, 1, 'finished', 'failed', 1, 20, '2026-12-06');",
                )
                .unwrap();
        }
        let wal = dir.path().join(format!("{FILE_NAME}-wal"));
        assert!(wal.metadata().unwrap().len() > 0, "no closing checkpoint");
        let j = SqliteJournal::open(dir.path()).unwrap();
        assert_eq!(j.day_totals("2026-12-06").unwrap(), (2, 150));
        assert_eq!(j.delivered_bytes_since(10).unwrap(), 100);
        for sql in [DAY_TOTALS, DELIVERED_SINCE] {
            let plan: String = j
                .connection()
                .query_row(&format!("EXPLAIN QUERY PLAN {sql}"), ["x"], |r| r.get(3))
                .unwrap();
            assert!(plan.contains("COVERING INDEX"), "{sql}: {plan}");
        }
    }

    #[test]
    fn a_journal_from_a_newer_shuttle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = SqliteJournal::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("newer"), "{e}");
    }
}
