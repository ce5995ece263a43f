//! The PostgreSQL journal: fleet mode (docs/fleet.md). Several nodes share one drop
//! directory, one destination and this journal; the journal is what makes them one
//! fleet.
//!
//! Why PostgreSQL: the claim on a file must be one transaction that sees every node's
//! claims and counts (row locks with `SKIP LOCKED`, a sequence for fencing tokens),
//! which a file on a shared mount cannot give. The schema mirrors the SQLite one, plus
//! the node of each run and file, the `claims` table and the `nodes` table; it is
//! versioned in `schema_version` and brought forward by ordered migrations, one
//! transaction each, under an advisory lock so that two nodes starting at once do not
//! both migrate.
//!
//! A claim (`claims`, one row per source path) is taken in the transaction that
//! records the file's admission, and counts the fleet's daily totals there: finished
//! files of the day plus live claims. Its fencing token comes from a sequence; the
//! group commit turns it into `done` only while the token is still the node's, in the
//! same transaction that records the delivery. A node that lost its claim (its lease
//! ran out and another node took the file over) records the file as skipped and leaves
//! the source to the new owner.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Row};

use super::{
    Admit, DayLimits, Delivery, FileHistory, Finished, FleetNode, FleetStatus, HazardRow, Identity,
    Journal, JournalError, Outcome, RESCAN_ATTEMPTS, RescanRow, RescanState, RunRow, SetAside,
    SpaceSample, Unfinished, local_day, now_secs,
};
use crate::config::FleetConfig;

/// The schema, as ordered migrations: migration `i` takes the database from version
/// `i` to `i + 1` (the one row of `schema_version`).
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1];

const SCHEMA_V1: &str = "
CREATE TABLE runs (
    id BIGSERIAL PRIMARY KEY,
    node TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    exit_code BIGINT,
    summary TEXT
);
CREATE TABLE files (
    id BIGSERIAL PRIMARY KEY,
    run_id BIGINT NOT NULL REFERENCES runs(id),
    node TEXT NOT NULL,
    rel_path TEXT NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    state TEXT NOT NULL,
    sha256 TEXT,
    verdict TEXT,
    scan_results TEXT,
    outcome TEXT,
    disposition TEXT,
    final_path TEXT,
    error TEXT,
    source_removed BOOLEAN NOT NULL DEFAULT false,
    admitted_at BIGINT NOT NULL,
    finished_at BIGINT,
    finished_day TEXT
);
CREATE INDEX files_day ON files(finished_day, outcome);
CREATE INDEX files_open ON files(node) WHERE outcome IS NULL;
CREATE INDEX files_rel ON files(rel_path);
CREATE INDEX files_finished ON files(finished_at) WHERE outcome = 'clean';
CREATE TABLE space (
    run_id BIGINT NOT NULL,
    node TEXT NOT NULL,
    time BIGINT NOT NULL,
    target TEXT NOT NULL,
    path TEXT NOT NULL,
    free_bytes BIGINT NOT NULL,
    threshold_bytes BIGINT NOT NULL,
    total_bytes BIGINT NOT NULL
);
CREATE INDEX space_time ON space(target, time);
CREATE TABLE hazard (
    file_id BIGINT PRIMARY KEY REFERENCES files(id),
    archive_path TEXT NOT NULL,
    sidecar_path TEXT NOT NULL,
    original_path TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    detections TEXT NOT NULL,
    scanners TEXT NOT NULL,
    archived_at TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL
);
CREATE TABLE throttle_events (
    run_id BIGINT NOT NULL,
    node TEXT NOT NULL,
    time BIGINT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE set_aside (
    node TEXT NOT NULL,
    dev BIGINT NOT NULL,
    ino BIGINT NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    rel_path TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    limits TEXT NOT NULL,
    file_id BIGINT,
    first_seen BIGINT NOT NULL,
    PRIMARY KEY (node, dev, ino, size, mtime_ns)
);
CREATE TABLE rescans (
    id BIGSERIAL PRIMARY KEY,
    file_id BIGINT NOT NULL REFERENCES files(id),
    run_id BIGINT,
    generation TEXT NOT NULL,
    time BIGINT NOT NULL,
    state TEXT NOT NULL,
    detections TEXT,
    scan_results TEXT,
    archive_path TEXT,
    note TEXT
);
CREATE INDEX rescans_file ON rescans(file_id, generation);
CREATE TABLE rescan_marks (
    generation TEXT PRIMARY KEY,
    below BIGINT NOT NULL
);
CREATE TABLE run_endpoints (
    run_id BIGINT NOT NULL REFERENCES runs(id),
    endpoint TEXT NOT NULL,
    health TEXT NOT NULL,
    why TEXT,
    version TEXT,
    concurrency BIGINT NOT NULL,
    scans BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    scan_seconds DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, endpoint)
);
CREATE SEQUENCE claim_tokens;
CREATE TABLE claims (
    rel_path TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    node TEXT NOT NULL,
    token BIGINT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    state TEXT NOT NULL,
    file_id BIGINT
);
CREATE INDEX claims_node ON claims(node);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    pid BIGINT NOT NULL,
    run_id BIGINT,
    started TEXT NOT NULL,
    heartbeat TIMESTAMPTZ NOT NULL,
    lease_seconds BIGINT NOT NULL,
    state TEXT NOT NULL
);
";

/// Serialises the claims that count the fleet's daily totals, so the limit is exact.
const DAY_LOCK: i64 = 0x5348_5554_0001;
/// Serialises migrations.
const MIGRATE_LOCK: i64 = 0x5348_5554_0002;

/// Connects to `cfg.url` with the password from `journal_password_file`, else
/// `PGPASSFILE` or `~/.pgpass`. Sessions get statement and idle-in-transaction
/// timeouts so that a node stopped while it holds a lock cannot hold it for ever.
pub fn connect(cfg: &FleetConfig) -> Result<Client, JournalError> {
    let shown = shown_url(&cfg.url);
    let bad = |why: String| JournalError::Connect {
        url: shown.clone(),
        why,
    };
    let mut pc = postgres::Config::from_str(&cfg.url)
        .map_err(|e| bad(format!("not a valid PostgreSQL URL: {e}")))?;
    if pc.get_password().is_some() {
        return Err(bad(
            "the URL carries a password: use journal_password_file or PGPASSFILE".into(),
        ));
    }
    if let Some(pw) = password(cfg, &pc).map_err(bad)? {
        pc.password(pw);
    }
    let idle = (cfg.lease_seconds / 3).clamp(1, 60);
    pc.options(&format!(
        "-c statement_timeout=30000 -c lock_timeout=30000 -c idle_in_transaction_session_timeout={}",
        idle * 1000
    ));
    pc.connect_timeout(Duration::from_secs(10));
    pc.keepalives(true);
    pc.keepalives_idle(Duration::from_secs(30));
    pc.application_name(&format!("shuttle {}", cfg.node));
    pc.connect(NoTls).map_err(|e| bad(describe_error(&e)))
}

/// What went wrong connecting, in words: the server's message (authentication,
/// unknown database) or the I/O cause (refused, unreachable).
pub fn describe_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The URL as messages show it (it never holds a password; see [`connect`]).
pub fn shown_url(url: &str) -> String {
    url.to_string()
}

/// The password for `pc`: the first line of `journal_password_file`, else the
/// matching line of `PGPASSFILE` (or `~/.pgpass`); `None` when there is none.
fn password(cfg: &FleetConfig, pc: &postgres::Config) -> Result<Option<String>, String> {
    if let Some(f) = &cfg.password_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read journal_password_file {}: {e}", f.display()))?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(format!("journal_password_file {} is empty", f.display()));
        }
        return Ok(Some(line.to_string()));
    }
    let file = match std::env::var_os("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => Path::new(&h).join(".pgpass"),
            None => return Ok(None),
        },
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(None);
    };
    let host = match pc.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        // libpq's rule: a socket directory matches "localhost".
        _ => "localhost".to_string(),
    };
    let port = pc.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = pc.get_dbname().unwrap_or("").to_string();
    let user = pc.get_user().unwrap_or("").to_string();
    let want = [host.as_str(), &port, &db, &user];
    Ok(pgpass_lookup(&text, &want))
}

/// The password of the first `host:port:database:user:password` line matching `want`
/// (`*` matches anything; `\:` and `\\` are escapes).
pub fn pgpass_lookup(text: &str, want: &[&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// Brings the database to the newest schema.
fn migrate(c: &mut Client) -> Result<(), postgres::Error> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let v: Option<i32> = tx
        .query_opt("SELECT version FROM schema_version", &[])?
        .map(|r| r.try_get(0))
        .transpose()?;
    if v.is_none() {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
    }
    tx.commit()?;
    let _ = v;
    loop {
        let mut tx = c.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
        let v: i32 = tx
            .query_one("SELECT version FROM schema_version", &[])?
            .try_get(0)?;
        let from = usize::try_from(v).unwrap_or(0);
        if from >= MIGRATIONS.len() {
            tx.commit()?;
            return Ok(());
        }
        tx.batch_execute(MIGRATIONS[from])?;
        tx.execute(
            "UPDATE schema_version SET version = $1",
            &[&((from + 1) as i32)],
        )?;
        tx.commit()?;
    }
}

/// The version the database is at (after [`migrate`]).
fn version(c: &mut Client) -> Result<i32, postgres::Error> {
    c.query_one("SELECT version FROM schema_version", &[])?
        .try_get(0)
}

pub struct PgJournal {
    client: Mutex<Client>,
    url: String,
    node: String,
    lease_seconds: i64,
    /// This node's claims: journal id → (source path, fencing token).
    tokens: Mutex<HashMap<i64, (String, i64)>>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn json(s: Option<String>) -> Option<serde_json::Value> {
    s.and_then(|s| serde_json::from_str(&s).ok())
}

fn rescan_row(r: &Row) -> Result<RescanRow, postgres::Error> {
    let state: String = r.try_get(5)?;
    Ok(RescanRow {
        id: r.try_get(0)?,
        file_id: r.try_get(1)?,
        run_id: r.try_get(2)?,
        generation: r.try_get(3)?,
        time: r.try_get(4)?,
        state: RescanState::parse(&state).unwrap_or(RescanState::Failed),
        detections: json(r.try_get(6)?),
        archive_path: r.try_get(7)?,
        note: r.try_get(8)?,
    })
}

fn delivery_row(r: &Row) -> Result<Delivery, postgres::Error> {
    Ok(Delivery {
        file_id: r.try_get(0)?,
        rel_path: r.try_get(1)?,
        size: u(r.try_get(2)?),
        mtime_ns: r.try_get(3)?,
        sha256: r.try_get(4)?,
        scan_results: json(r.try_get(5)?),
        final_path: r.try_get(6)?,
        finished_at: r.try_get::<_, Option<i64>>(7)?.unwrap_or(0),
    })
}

const FINISH_SQL: &str = "UPDATE files SET state = 'finished', outcome = $2, disposition = $3, final_path = $4, error = $5,
     finished_at = $6, finished_day = $7, sha256 = COALESCE($8, sha256), verdict = COALESCE($9, verdict),
     scan_results = COALESCE($10, scan_results) WHERE id = $1";

fn finish_in(tx: &mut postgres::Transaction, f: &Finished) -> Result<(), postgres::Error> {
    let day = local_day(chrono::Local::now());
    let results = f.scan_results.map(serde_json::value::RawValue::get);
    tx.execute(
        FINISH_SQL,
        &[
            &f.id,
            &f.outcome.as_str(),
            &f.disposition,
            &f.final_path,
            &f.error,
            &now_secs(),
            &day,
            &f.sha256,
            &f.verdict,
            &results,
        ],
    )?;
    Ok(())
}

impl PgJournal {
    /// Connects, migrates and checks the schema version.
    pub fn open(cfg: &FleetConfig) -> Result<PgJournal, JournalError> {
        let mut client = connect(cfg)?;
        let url = shown_url(&cfg.url);
        let err = |source| JournalError::Postgres {
            url: url.clone(),
            source,
        };
        // A database a newer Shuttle migrated is refused before anything is written.
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
            .and_then(|r| r.try_get(0))
            .map_err(err)?;
        if exists {
            let v = version(&mut client).map_err(err)?;
            if usize::try_from(v).unwrap_or(0) > MIGRATIONS.len() {
                return Err(JournalError::Schema(format!(
                    "journal {url}: schema version {v} is newer than this Shuttle knows ({}); use a newer Shuttle",
                    MIGRATIONS.len()
                )));
            }
        }
        migrate(&mut client).map_err(err)?;
        Ok(PgJournal {
            client: Mutex::new(client),
            url,
            node: cfg.node.clone(),
            lease_seconds: i64::try_from(cfg.lease_seconds).unwrap_or(300),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` on the connection; errors name the database.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, JournalError> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c).map_err(|source| JournalError::Postgres {
            url: self.url.clone(),
            source,
        })
    }

    fn token_of(&self, id: i64) -> Option<(String, i64)> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn forget_token(&self, id: i64) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Settles the claim of file `f` in `tx`: kept as `done` (with a fresh lease, while
    /// the source is removed) when it was delivered or archived, released otherwise.
    /// `false` when the claim is no longer this node's.
    fn settle_claim(
        &self,
        tx: &mut postgres::Transaction,
        f: &Finished,
    ) -> Result<bool, postgres::Error> {
        let Some((rel, token)) = self.token_of(f.id) else {
            return Ok(true);
        };
        let n = if matches!(f.outcome, Outcome::Clean | Outcome::Suspect) {
            tx.execute(
                "UPDATE claims SET state = 'done', lease_until = now() + make_interval(secs => $3)
                 WHERE rel_path = $1 AND token = $2",
                &[&rel, &token, &(self.lease_seconds as f64)],
            )?
        } else {
            tx.execute(
                "DELETE FROM claims WHERE rel_path = $1 AND token = $2",
                &[&rel, &token],
            )?
        };
        Ok(n == 1)
    }
}

impl Journal for PgJournal {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn begin_run(&self, started: &str) -> Result<i64, JournalError> {
        let node = self.node.clone();
        let lease = self.lease_seconds;
        self.with(|c| {
            let mut tx = c.transaction()?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO runs (node, pid, started) VALUES ($1, $2, $3) RETURNING id",
                    &[&node, &i64::from(std::process::id()), &started],
                )?
                .try_get(0)?;
            // Claims this node held in a run that died are released: this run starts
            // over (recovery cleans their temp files).
            tx.execute(
                "DELETE FROM claims WHERE node = $1 AND state = 'claimed'",
                &[&node],
            )?;
            tx.execute(
                "INSERT INTO nodes (name, pid, run_id, started, heartbeat, lease_seconds, state)
                 VALUES ($1, $2, $3, $4, now(), $5, 'running')
                 ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, run_id = excluded.run_id,
                   started = excluded.started, heartbeat = now(), lease_seconds = excluded.lease_seconds,
                   state = 'running'",
                &[&node, &i64::from(std::process::id()), &id, &started, &lease],
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn finish_run(
        &self,
        run: i64,
        finished: &str,
        exit_code: i32,
        summary: &serde_json::Value,
    ) -> Result<(), JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE runs SET finished = $2, exit_code = $3, summary = $4 WHERE id = $1",
                &[&run, &finished, &i64::from(exit_code), &summary.to_string()],
            )?;
            tx.execute(
                "UPDATE nodes SET state = 'idle', heartbeat = now() WHERE name = $1 AND run_id = $2",
                &[&node, &run],
            )?;
            tx.commit()
        })
    }

    fn record_endpoints(
        &self,
        run: i64,
        endpoints: &[crate::scan::pool::EndpointStatus],
    ) -> Result<(), JournalError> {
        self.with(|c| {
            for e in endpoints {
                c.execute(
                    "INSERT INTO run_endpoints (run_id, endpoint, health, why, version, concurrency, scans, errors, scan_seconds)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (run_id, endpoint) DO UPDATE SET health = excluded.health, why = excluded.why,
                       version = excluded.version, concurrency = excluded.concurrency, scans = excluded.scans,
                       errors = excluded.errors, scan_seconds = excluded.scan_seconds",
                    &[
                        &run,
                        &e.endpoint,
                        &e.health.to_string(),
                        &e.why,
                        &e.version,
                        &(e.concurrency as i64),
                        &(e.scans as i64),
                        &(e.errors as i64),
                        &e.scan_seconds,
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn file_admitted(
        &self,
        run: i64,
        rel_path: &str,
        size: u64,
        mtime_ns: i64,
    ) -> Result<i64, JournalError> {
        crate::crashpoint::here("journal: before file_admitted");
        let node = self.node.clone();
        self.with(|c| {
            c.query_one(
                "INSERT INTO files (run_id, node, rel_path, size, mtime_ns, state, admitted_at)
                 VALUES ($1, $2, $3, $4, $5, 'admitted', $6) RETURNING id",
                &[&run, &node, &rel_path, &i(size), &mtime_ns, &now_secs()],
            )?
            .try_get(0)
        })
    }

    fn admit_file(
        &self,
        run: i64,
        rel_path: &str,
        size: u64,
        mtime_ns: i64,
        limits: &DayLimits,
    ) -> Result<Admit, JournalError> {
        crate::crashpoint::here("journal: before file_admitted");
        let node = self.node.clone();
        let lease = self.lease_seconds as f64;
        let day = local_day(chrono::Local::now());
        let admitted = self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO claims (rel_path, size, mtime_ns, node, token, lease_until, state)
                 VALUES ($1, $2, $3, '', 0, '-infinity', 'free') ON CONFLICT (rel_path) DO NOTHING",
                &[&rel_path, &i(size), &mtime_ns],
            )?;
            let Some(row) = tx.query_opt(
                "SELECT node, state, lease_until > now() FROM claims WHERE rel_path = $1
                 FOR UPDATE SKIP LOCKED",
                &[&rel_path],
            )?
            else {
                tx.rollback()?;
                return Ok(Admit::Taken("another node is claiming it".into()));
            };
            let holder: String = row.try_get(0)?;
            let state: String = row.try_get(1)?;
            let live: bool = row.try_get(2)?;
            if live && state != "free" {
                tx.rollback()?;
                return Ok(Admit::Taken(format!("claimed by node {holder} ({state})")));
            }
            if limits.files > 0 || limits.bytes > 0 {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DAY_LOCK])?;
                let r = tx.query_one(
                    "SELECT
                       (SELECT count(*) FROM files WHERE finished_day = $1 AND outcome IN ('clean', 'suspect')),
                       (SELECT COALESCE(sum(size), 0)::BIGINT FROM files WHERE finished_day = $1 AND outcome IN ('clean', 'suspect')),
                       (SELECT count(*) FROM claims WHERE state = 'claimed' AND lease_until > now()),
                       (SELECT COALESCE(sum(size), 0)::BIGINT FROM claims WHERE state = 'claimed' AND lease_until > now())",
                    &[&day],
                )?;
                let files = u(r.try_get::<_, i64>(0)?) + u(r.try_get::<_, i64>(2)?);
                let bytes = u(r.try_get::<_, i64>(1)?) + u(r.try_get::<_, i64>(3)?);
                if limits.files > 0 && files + 1 > limits.files {
                    tx.rollback()?;
                    return Ok(Admit::Limit(format!(
                        "{files} files handled today by the fleet (including in flight), throttle_max_file_count_per_day is {}",
                        limits.files
                    )));
                }
                if limits.bytes > 0 && bytes + size > limits.bytes {
                    tx.rollback()?;
                    return Ok(Admit::Limit(format!(
                        "{:.1} MB handled today by the fleet (including in flight) + {:.1} MB for the next file would exceed throttle_max_file_volume_per_day_mb {:.0}",
                        crate::fsx::mib(bytes),
                        crate::fsx::mib(size),
                        crate::fsx::mib(limits.bytes)
                    )));
                }
            }
            let id: i64 = tx
                .query_one(
                    "INSERT INTO files (run_id, node, rel_path, size, mtime_ns, state, admitted_at)
                     VALUES ($1, $2, $3, $4, $5, 'admitted', $6) RETURNING id",
                    &[&run, &node, &rel_path, &i(size), &mtime_ns, &now_secs()],
                )?
                .try_get(0)?;
            let token: i64 = tx
                .query_one(
                    "UPDATE claims SET size = $2, mtime_ns = $3, node = $4, token = nextval('claim_tokens'),
                       lease_until = now() + make_interval(secs => $5), state = 'claimed', file_id = $6
                     WHERE rel_path = $1 RETURNING token",
                    &[&rel_path, &i(size), &mtime_ns, &node, &lease, &id],
                )?
                .try_get(0)?;
            tx.commit()?;
            Ok(Admit::Admitted { id, token })
        })?;
        if let Admit::Admitted { id, token } = &admitted {
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*id, (rel_path.to_string(), *token));
        }
        Ok(admitted)
    }

    fn claim_held(&self, id: i64) -> Result<bool, JournalError> {
        let Some((rel, token)) = self.token_of(id) else {
            return Ok(true);
        };
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM claims WHERE rel_path = $1 AND token = $2 AND state = 'claimed'",
                &[&rel, &token],
            )?
            .is_some())
        })
    }

    fn file_finished(&self, f: &Finished) -> Result<(), JournalError> {
        crate::crashpoint::here("journal: before file_finished");
        self.with(|c| {
            let mut tx = c.transaction()?;
            finish_in(&mut tx, f)?;
            self.settle_claim(&mut tx, f)?;
            tx.commit()
        })?;
        if !matches!(f.outcome, Outcome::Clean | Outcome::Suspect) {
            self.forget_token(f.id);
        }
        Ok(())
    }

    fn finish_batch(&self, items: &[Finished]) -> Result<Vec<i64>, JournalError> {
        let lost = self.with(|c| {
            let mut tx = c.transaction()?;
            let mut lost = Vec::new();
            for f in items {
                crate::crashpoint::here("journal: before file_finished");
                if self.settle_claim(&mut tx, f)? {
                    finish_in(&mut tx, f)?;
                } else {
                    // Another node owns the file now: it delivers (or finds these bytes
                    // already delivered) and removes the source.
                    let note = "claim lost (lease expired, another node took the file over); source left to it";
                    finish_in(
                        &mut tx,
                        &Finished {
                            outcome: Outcome::Skipped,
                            disposition: "claim_lost",
                            error: Some(note),
                            ..f.clone()
                        },
                    )?;
                    lost.push(f.id);
                }
            }
            tx.commit()?;
            Ok(lost)
        })?;
        for id in &lost {
            self.forget_token(*id);
        }
        Ok(lost)
    }

    fn sources_removed(&self, ids: &[i64]) -> Result<(), JournalError> {
        if ids.is_empty() {
            return Ok(());
        }
        crate::crashpoint::here("journal: before source_removed");
        let claims: Vec<(String, i64)> = ids.iter().filter_map(|id| self.token_of(*id)).collect();
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE files SET source_removed = true WHERE id = ANY($1)",
                &[&ids],
            )?;
            for (rel, token) in &claims {
                tx.execute(
                    "DELETE FROM claims WHERE rel_path = $1 AND token = $2",
                    &[rel, token],
                )?;
            }
            tx.commit()
        })?;
        for id in ids {
            self.forget_token(*id);
        }
        Ok(())
    }

    fn hazard_archived(&self, h: &HazardRow) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO hazard (file_id, archive_path, sidecar_path, original_path, size, sha256, detections, scanners, archived_at, key_fingerprint)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (file_id) DO UPDATE SET archive_path = excluded.archive_path,
                   sidecar_path = excluded.sidecar_path, original_path = excluded.original_path,
                   size = excluded.size, sha256 = excluded.sha256, detections = excluded.detections,
                   scanners = excluded.scanners, archived_at = excluded.archived_at,
                   key_fingerprint = excluded.key_fingerprint",
                &[
                    &h.file_id,
                    &h.archive_path,
                    &h.sidecar_path,
                    &h.original_path,
                    &i(h.size),
                    &h.sha256,
                    &h.detections.to_string(),
                    &h.scanners.to_string(),
                    &h.archived_at,
                    &h.key_fingerprint,
                ],
            )
            .map(drop)
        })
    }

    fn source_removed(&self, id: i64) -> Result<(), JournalError> {
        self.sources_removed(&[id])
    }

    fn unfinished(&self) -> Result<Vec<Unfinished>, JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.query(
                "SELECT id, run_id, rel_path FROM files WHERE outcome IS NULL AND node = $1 ORDER BY id",
                &[&node],
            )?
            .iter()
            .map(|r| {
                Ok(Unfinished {
                    id: r.try_get(0)?,
                    run_id: r.try_get(1)?,
                    rel_path: r.try_get(2)?,
                })
            })
            .collect()
        })
    }

    fn unfinished_runs(&self, current: i64) -> Result<Vec<i64>, JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.query(
                "SELECT id FROM runs WHERE finished IS NULL AND id != $1 AND node = $2",
                &[&current, &node],
            )?
            .iter()
            .map(|r| r.try_get(0))
            .collect()
        })
    }

    fn mark_run_interrupted(&self, run: i64) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET finished = 'interrupted', exit_code = -1 WHERE id = $1",
                &[&run],
            )
            .map(drop)
        })
    }

    fn day_totals(&self, day: &str) -> Result<(u64, u64), JournalError> {
        self.with(|c| {
            let r = c.query_one(
                "SELECT count(*), COALESCE(sum(size), 0)::BIGINT FROM files
                 WHERE finished_day = $1 AND outcome IN ('clean', 'suspect')",
                &[&day],
            )?;
            Ok((u(r.try_get(0)?), u(r.try_get(1)?)))
        })
    }

    fn delivered_bytes_since(&self, since: i64) -> Result<u64, JournalError> {
        self.with(|c| {
            let r = c.query_one(
                "SELECT COALESCE(sum(size), 0)::BIGINT FROM files WHERE outcome = 'clean' AND finished_at >= $1",
                &[&since],
            )?;
            Ok(u(r.try_get(0)?))
        })
    }

    fn record_space(&self, run: i64, s: &SpaceSample, total: u64) -> Result<(), JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.execute(
                "INSERT INTO space (run_id, node, time, target, path, free_bytes, threshold_bytes, total_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &run,
                    &node,
                    &s.time,
                    &s.target,
                    &s.path,
                    &i(s.free_bytes),
                    &i(s.threshold_bytes),
                    &i(total),
                ],
            )
            .map(drop)
        })
    }

    fn space_samples(&self, target: &str, since: i64) -> Result<Vec<SpaceSample>, JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.query(
                "SELECT time, target, path, free_bytes, threshold_bytes FROM space
                 WHERE target = $1 AND time >= $2 AND node = $3 ORDER BY time",
                &[&target, &since, &node],
            )?
            .iter()
            .map(|r| {
                Ok(SpaceSample {
                    time: r.try_get(0)?,
                    target: r.try_get(1)?,
                    path: r.try_get(2)?,
                    free_bytes: u(r.try_get(3)?),
                    threshold_bytes: u(r.try_get(4)?),
                })
            })
            .collect()
        })
    }

    fn record_throttle(&self, run: i64, reason: &str, message: &str) -> Result<(), JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.execute(
                "INSERT INTO throttle_events (run_id, node, time, reason, message) VALUES ($1, $2, $3, $4, $5)",
                &[&run, &node, &now_secs(), &reason, &message],
            )
            .map(drop)
        })
    }

    fn last_runs(&self, n: u32) -> Result<Vec<RunRow>, JournalError> {
        self.with(|c| {
            c.query(
                "SELECT id, started, finished, exit_code, summary FROM runs ORDER BY id DESC LIMIT $1",
                &[&i64::from(n)],
            )?
            .iter()
            .map(|r| {
                Ok(RunRow {
                    id: r.try_get(0)?,
                    started: r.try_get(1)?,
                    finished: r.try_get(2)?,
                    exit_code: r.try_get(3)?,
                    summary: json(r.try_get(4)?),
                })
            })
            .collect()
        })
    }

    fn file_outcome(&self, id: i64) -> Result<Option<(String, Option<String>)>, JournalError> {
        self.with(|c| {
            c.query_opt("SELECT state, outcome FROM files WHERE id = $1", &[&id])?
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
        })
    }

    fn file_history(&self, exact: &str, suffix: &str) -> Result<Vec<FileHistory>, JournalError> {
        let tail = format!("/{}", suffix.trim_start_matches('/'));
        let mut records: Vec<FileHistory> = self.with(|c| {
            c.query(
                "SELECT f.id, f.run_id, r.started, f.rel_path, f.size, f.mtime_ns, f.state, f.admitted_at,
                        f.sha256, f.verdict, f.scan_results, f.outcome, f.disposition, f.final_path, f.error,
                        f.source_removed, f.finished_at, h.archive_path, h.key_fingerprint
                 FROM files f LEFT JOIN runs r ON r.id = f.run_id LEFT JOIN hazard h ON h.file_id = f.id
                 WHERE f.rel_path = $1 OR f.final_path = $1
                    OR right(f.rel_path, length($2)) = $2 OR right(f.final_path, length($2)) = $2
                 ORDER BY f.id DESC",
                &[&exact, &tail],
            )?
            .iter()
            .map(|r| {
                Ok(FileHistory {
                    id: r.try_get(0)?,
                    run_id: r.try_get(1)?,
                    run_started: r.try_get(2)?,
                    rel_path: r.try_get(3)?,
                    size: u(r.try_get(4)?),
                    mtime_ns: r.try_get(5)?,
                    state: r.try_get(6)?,
                    admitted_at: r.try_get(7)?,
                    sha256: r.try_get(8)?,
                    verdict: r.try_get(9)?,
                    scan_results: json(r.try_get(10)?),
                    outcome: r.try_get(11)?,
                    disposition: r.try_get(12)?,
                    final_path: r.try_get(13)?,
                    error: r.try_get(14)?,
                    source_removed: r.try_get(15)?,
                    finished_at: r.try_get(16)?,
                    hazard_archive: r.try_get(17)?,
                    hazard_key_fingerprint: r.try_get(18)?,
                    rescans: Vec::new(),
                })
            })
            .collect::<Result<_, postgres::Error>>()
        })?;
        for rec in &mut records {
            rec.rescans = self.rescans_of(rec.id)?;
        }
        Ok(records)
    }

    fn rescans_of(&self, id: i64) -> Result<Vec<RescanRow>, JournalError> {
        self.with(|c| {
            c.query(
                "SELECT id, file_id, run_id, generation, time, state, detections, archive_path, note
                 FROM rescans WHERE file_id = $1 ORDER BY id",
                &[&id],
            )?
            .iter()
            .map(rescan_row)
            .collect()
        })
    }

    fn rescans_withdrawing(&self) -> Result<Vec<RescanRow>, JournalError> {
        self.with(|c| {
            c.query(
                "SELECT id, file_id, run_id, generation, time, state, detections, archive_path, note
                 FROM rescans WHERE state = 'withdrawing' ORDER BY id",
                &[],
            )?
            .iter()
            .map(rescan_row)
            .collect()
        })
    }

    fn deliveries_to_rescan(
        &self,
        since: i64,
        generation: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, JournalError> {
        self.with(|c| {
            c.query(
                "SELECT f.id, f.rel_path, f.size, f.mtime_ns, f.sha256, f.scan_results, f.final_path, f.finished_at
                 FROM files f
                 WHERE f.outcome = 'clean' AND f.final_path IS NOT NULL AND f.finished_at >= $1 AND f.id > $3
                   AND NOT EXISTS (SELECT 1 FROM rescans r WHERE r.file_id = f.id
                                   AND r.state IN ('alerted', 'withdrawing', 'withdrawn', 'changed', 'gone'))
                   AND NOT EXISTS (SELECT 1 FROM rescans r WHERE r.file_id = f.id AND r.generation = $2
                                   AND r.state != 'failed')
                   AND (SELECT count(*) FROM rescans r WHERE r.file_id = f.id AND r.generation = $2
                        AND r.state = 'failed') < $5
                 ORDER BY f.id LIMIT $4",
                &[&since, &generation, &after, &i64::from(limit), &RESCAN_ATTEMPTS],
            )?
            .iter()
            .map(delivery_row)
            .collect()
        })
    }

    fn rescan_mark(&self, generation: &str) -> Result<i64, JournalError> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT below FROM rescan_marks WHERE generation = $1",
                &[&generation],
            )?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0))
        })
    }

    fn set_rescan_mark(&self, generation: &str, below: i64) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO rescan_marks (generation, below) VALUES ($1, $2)
                 ON CONFLICT (generation) DO UPDATE SET below = GREATEST(rescan_marks.below, excluded.below)",
                &[&generation, &below],
            )
            .map(drop)
        })
    }

    fn last_file_id(&self) -> Result<i64, JournalError> {
        self.with(|c| {
            c.query_one("SELECT COALESCE(MAX(id), 0) FROM files", &[])?
                .try_get(0)
        })
    }

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
        let dets = (!detections.is_empty()).then(|| serde_json::json!(detections).to_string());
        let results = scan_results.map(|v| v.to_string());
        self.with(|c| {
            c.query_one(
                "INSERT INTO rescans (file_id, run_id, generation, time, state, detections, scan_results, note)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[
                    &file_id,
                    &run_id,
                    &generation,
                    &now_secs(),
                    &state.as_str(),
                    &dets,
                    &results,
                    &note,
                ],
            )?
            .try_get(0)
        })
    }

    fn rescan_updated(
        &self,
        id: i64,
        state: RescanState,
        archive_path: Option<&str>,
        note: Option<&str>,
    ) -> Result<(), JournalError> {
        crate::crashpoint::here("journal: before rescan_updated");
        self.with(|c| {
            c.execute(
                "UPDATE rescans SET state = $2, archive_path = COALESCE($3, archive_path),
                 note = COALESCE($4, note), time = $5 WHERE id = $1",
                &[&id, &state.as_str(), &archive_path, &note, &now_secs()],
            )
            .map(drop)
        })
    }

    fn rescan_forgotten(&self, id: i64) -> Result<(), JournalError> {
        self.with(|c| {
            c.execute("DELETE FROM rescans WHERE id = $1", &[&id])
                .map(drop)
        })
    }

    fn delivery(&self, file_id: i64) -> Result<Option<Delivery>, JournalError> {
        self.with(|c| {
            c.query_opt(
                "SELECT id, rel_path, size, mtime_ns, sha256, scan_results, final_path, finished_at
                 FROM files WHERE id = $1 AND final_path IS NOT NULL",
                &[&file_id],
            )?
            .map(|r| delivery_row(&r))
            .transpose()
        })
    }

    fn set_aside_all(&self) -> Result<HashMap<Identity, SetAside>, JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.query(
                "SELECT dev, ino, size, mtime_ns, outcome, reason, limits FROM set_aside WHERE node = $1",
                &[&node],
            )?
            .iter()
            .map(|r| {
                let outcome: String = r.try_get(4)?;
                Ok((
                    Identity {
                        dev: r.try_get::<_, i64>(0)? as u64,
                        ino: r.try_get::<_, i64>(1)? as u64,
                        size: u(r.try_get(2)?),
                        mtime_ns: r.try_get(3)?,
                    },
                    SetAside {
                        outcome: if outcome == "too_large" {
                            Outcome::TooLarge
                        } else {
                            Outcome::Unscannable
                        },
                        reason: r.try_get(5)?,
                        limits: r.try_get(6)?,
                    },
                ))
            })
            .collect()
        })
    }

    fn first_run_on_day(&self, day: &str, current: i64) -> Result<Option<String>, JournalError> {
        self.with(|c| {
            c.query_one(
                "SELECT MIN(started) FROM runs WHERE substr(started, 1, 10) = $1 AND id != $2",
                &[&day, &current],
            )?
            .try_get(0)
        })
    }

    fn set_aside(
        &self,
        id: &Identity,
        rel_path: &str,
        what: &SetAside,
        file_id: Option<i64>,
    ) -> Result<(), JournalError> {
        let node = self.node.clone();
        self.with(|c| {
            c.execute(
                "INSERT INTO set_aside (node, dev, ino, size, mtime_ns, rel_path, outcome, reason, limits, file_id, first_seen)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (node, dev, ino, size, mtime_ns) DO UPDATE SET rel_path = excluded.rel_path,
                   outcome = excluded.outcome, reason = excluded.reason, limits = excluded.limits,
                   file_id = excluded.file_id, first_seen = excluded.first_seen",
                &[
                    &node,
                    &(id.dev as i64),
                    &(id.ino as i64),
                    &i(id.size),
                    &id.mtime_ns,
                    &rel_path,
                    &what.outcome.as_str(),
                    &what.reason,
                    &what.limits,
                    &file_id,
                    &now_secs(),
                ],
            )
            .map(drop)
        })
    }

    fn fleet_status(&self) -> Result<Option<FleetStatus>, JournalError> {
        let day = local_day(chrono::Local::now());
        self.with(|c| {
            let nodes = c
                .query(
                    "SELECT n.name, n.pid, n.run_id, n.started, n.state,
                            to_char(n.heartbeat AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                            EXTRACT(EPOCH FROM (now() - n.heartbeat))::BIGINT, n.lease_seconds,
                            (SELECT count(*) FROM claims c WHERE c.node = n.name AND c.state = 'claimed'
                               AND c.lease_until > now())
                     FROM nodes n ORDER BY n.name",
                    &[],
                )?
                .iter()
                .map(|r| {
                    Ok(FleetNode {
                        name: r.try_get(0)?,
                        pid: r.try_get(1)?,
                        run_id: r.try_get(2)?,
                        started: r.try_get(3)?,
                        state: r.try_get(4)?,
                        last_heartbeat: r.try_get(5)?,
                        heartbeat_age_seconds: r.try_get(6)?,
                        lease_seconds: r.try_get(7)?,
                        claims_in_flight: u(r.try_get(8)?),
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            let r = c.query_one(
                "SELECT (SELECT count(*) FROM claims WHERE state = 'claimed' AND lease_until > now()),
                        (SELECT count(*) FROM files WHERE finished_day = $1 AND outcome IN ('clean', 'suspect')),
                        (SELECT COALESCE(sum(size), 0)::BIGINT FROM files WHERE finished_day = $1
                           AND outcome IN ('clean', 'suspect'))",
                &[&day],
            )?;
            Ok(Some(FleetStatus {
                claims_in_flight: u(r.try_get(0)?),
                today_files: u(r.try_get(1)?),
                today_bytes: u(r.try_get(2)?),
                nodes,
            }))
        })
    }
}

/// The lease keeper of a fleet node: a thread with its own connection that renews this
/// node's live claims and its heartbeat every third of the lease. When a renewal fails,
/// or none succeeded for a whole lease, the node is told to stop admitting
/// ([`Heartbeat::lost`]); its claims then run out and other nodes take them over.
pub struct Heartbeat {
    lost: Arc<Mutex<Option<String>>>,
    flag: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(cfg: &FleetConfig) -> Result<Heartbeat, JournalError> {
        let mut client = connect(cfg)?;
        let lost = Arc::new(Mutex::new(None::<String>));
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let node = cfg.node.clone();
        let lease = Duration::from_secs(cfg.lease_seconds);
        let every = lease / 3;
        let lease_secs = cfg.lease_seconds as f64;
        let (lost2, flag2) = (lost.clone(), flag.clone());
        let thread = std::thread::Builder::new()
            .name("fleet-heartbeat".into())
            .spawn(move || {
                let mut last_ok = Instant::now();
                let say = |why: String| {
                    tracing::error!("fleet: {why}; no more files admitted, in-flight files are not committed unless still claimed");
                    lost2.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
                    flag2.store(true, Ordering::SeqCst);
                };
                loop {
                    match rx.recv_timeout(every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    if last_ok.elapsed() > lease {
                        say(format!(
                            "lease lost: no renewal for {:.0} s (more than fleet_lease_seconds {}); the process was stopped or the database was slow",
                            last_ok.elapsed().as_secs_f64(),
                            lease.as_secs()
                        ));
                        return;
                    }
                    // The renewal locks every claim of this node at once, while the
                    // node's own commits lock some of them in another order: PostgreSQL
                    // may pick the renewal as a deadlock's victim. That is not a lost
                    // lease: try again at once (the lease check above still bounds how
                    // long renewals may fail).
                    let mut renewed = renew(&mut client, &node, lease_secs);
                    for _ in 0..3 {
                        match &renewed {
                            Err(e) if transient(e) => {
                                std::thread::sleep(Duration::from_millis(50));
                                renewed = renew(&mut client, &node, lease_secs);
                            }
                            _ => break,
                        }
                    }
                    match renewed {
                        Ok(_) => last_ok = Instant::now(),
                        Err(e) => {
                            say(format!(
                                "cannot renew this node's claims in the journal: {}",
                                describe_error(&e)
                            ));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| JournalError::Connect {
                url: shown_url(&cfg.url),
                why: format!("cannot start the heartbeat thread: {e}"),
            })?;
        Ok(Heartbeat {
            lost,
            flag,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Why this node must stop admitting, once it must.
    pub fn lost(&self) -> Option<String> {
        if !self.flag.load(Ordering::SeqCst) {
            return None;
        }
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One heartbeat: renews this node's live claims and its `nodes` row.
fn renew(
    client: &mut postgres::Client,
    node: &str,
    lease_secs: f64,
) -> Result<u64, postgres::Error> {
    client.execute(
        "UPDATE claims SET lease_until = now() + make_interval(secs => $2)
         WHERE node = $1 AND lease_until > now()",
        &[&node, &lease_secs],
    )?;
    client.execute(
        "UPDATE nodes SET heartbeat = now() WHERE name = $1",
        &[&node],
    )
}

/// A failure PostgreSQL asks the client to retry: a deadlock's victim, a
/// serialization failure, a lock not available.
fn transient(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|c| {
        [
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::LOCK_NOT_AVAILABLE,
        ]
        .contains(c)
    })
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:db:u:nope\n127.0.0.1:*:shuttle:shuttle:s\\:cret\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, &["127.0.0.1", "5433", "shuttle", "shuttle"]).as_deref(),
            Some("s:cret")
        );
        assert_eq!(
            pgpass_lookup(text, &["db.example", "5432", "x", "y"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("a:b:c:d\n", &["a", "b", "c", "d"]), None);
    }
}
