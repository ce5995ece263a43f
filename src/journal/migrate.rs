//! `shuttle journal migrate --to URL`: copies a node's SQLite journal into an empty
//! PostgreSQL journal, history and all (runs, files, hazard entries, set-aside files,
//! retro-scans, free-space samples, throttle decisions), so that a node joining a fleet
//! keeps its daily totals, `shuttle history` and retro-scan marks.
//!
//! Ids are kept (temp names and hazard entries refer to them) and the sequences are
//! moved past them. One transaction: a failed migration leaves the database empty.

use std::path::Path;

use postgres::types::ToSql;
use rusqlite::types::Value;

use super::JournalError;
use crate::config::FleetConfig;
use crate::states::ExitCode;

/// How a column is written in PostgreSQL.
#[derive(Clone, Copy)]
enum Col {
    Int,
    Text,
    Real,
    Bool,
}
use Col::*;

/// A table's name, its columns (in both schemas) with their kinds, and whether
/// PostgreSQL adds the node's name.
type Table = (&'static str, &'static [(&'static str, Col)], bool);

const TABLES: &[Table] = &[
    (
        "runs",
        &[
            ("id", Int),
            ("pid", Int),
            ("started", Text),
            ("finished", Text),
            ("exit_code", Int),
            ("summary", Text),
        ],
        true,
    ),
    (
        "files",
        &[
            ("id", Int),
            ("run_id", Int),
            ("rel_path", Text),
            ("size", Int),
            ("mtime_ns", Int),
            ("state", Text),
            ("sha256", Text),
            ("verdict", Text),
            ("scan_results", Text),
            ("outcome", Text),
            ("disposition", Text),
            ("final_path", Text),
            ("error", Text),
            ("source_removed", Bool),
            ("admitted_at", Int),
            ("finished_at", Int),
            ("finished_day", Text),
        ],
        true,
    ),
    (
        "space",
        &[
            ("run_id", Int),
            ("time", Int),
            ("target", Text),
            ("path", Text),
            ("free_bytes", Int),
            ("threshold_bytes", Int),
            ("total_bytes", Int),
        ],
        true,
    ),
    (
        "hazard",
        &[
            ("file_id", Int),
            ("archive_path", Text),
            ("sidecar_path", Text),
            ("original_path", Text),
            ("size", Int),
            ("sha256", Text),
            ("detections", Text),
            ("scanners", Text),
            ("archived_at", Text),
            ("key_fingerprint", Text),
        ],
        false,
    ),
    (
        "throttle_events",
        &[
            ("run_id", Int),
            ("time", Int),
            ("reason", Text),
            ("message", Text),
        ],
        true,
    ),
    (
        "set_aside",
        &[
            ("dev", Int),
            ("ino", Int),
            ("size", Int),
            ("mtime_ns", Int),
            ("rel_path", Text),
            ("outcome", Text),
            ("reason", Text),
            ("limits", Text),
            ("file_id", Int),
            ("first_seen", Int),
        ],
        true,
    ),
    (
        "rescans",
        &[
            ("id", Int),
            ("file_id", Int),
            ("run_id", Int),
            ("generation", Text),
            ("time", Int),
            ("state", Text),
            ("detections", Text),
            ("scan_results", Text),
            ("archive_path", Text),
            ("note", Text),
        ],
        false,
    ),
    (
        "rescan_marks",
        &[("generation", Text), ("below", Int)],
        false,
    ),
    (
        "run_endpoints",
        &[
            ("run_id", Int),
            ("endpoint", Text),
            ("health", Text),
            ("why", Text),
            ("version", Text),
            ("concurrency", Int),
            ("scans", Int),
            ("errors", Int),
            ("scan_seconds", Real),
        ],
        false,
    ),
];

/// A value as PostgreSQL takes it for a column of kind `col`.
fn convert(v: Value, col: Col) -> Box<dyn ToSql + Sync> {
    match (col, v) {
        (Int, Value::Integer(i)) => Box::new(Some(i)),
        (Int, Value::Real(f)) => Box::new(Some(f as i64)),
        (Int, Value::Text(t)) => Box::new(t.parse::<i64>().ok()),
        (Int, _) => Box::new(None::<i64>),
        (Real, Value::Real(f)) => Box::new(Some(f)),
        (Real, Value::Integer(i)) => Box::new(Some(i as f64)),
        (Real, _) => Box::new(None::<f64>),
        (Bool, Value::Integer(i)) => Box::new(i != 0),
        (Bool, _) => Box::new(false),
        (Text, Value::Text(t)) => Box::new(Some(t)),
        (Text, Value::Integer(i)) => Box::new(Some(i.to_string())),
        (Text, Value::Real(f)) => Box::new(Some(f.to_string())),
        (Text, _) => Box::new(None::<String>),
    }
}

/// Rows copied per table.
pub type Copied = Vec<(&'static str, u64)>;

/// Copies the SQLite journal in `dir` into the (empty) PostgreSQL journal `to`.
pub fn to_postgres(dir: &Path, to: &FleetConfig) -> Result<Copied, JournalError> {
    let sqlite = super::SqliteJournal::open(dir)?;
    let src_name = sqlite.path().display().to_string();
    let sq = |source| JournalError::Sqlite {
        path: sqlite.path().to_path_buf(),
        source,
    };
    // Creates (or checks) the schema first.
    drop(super::PgJournal::open(to)?);
    let mut client = super::pg::connect(to)?;
    let pg = |source| JournalError::Postgres {
        url: to.url.clone(),
        source,
    };
    let mut tx = client.transaction().map_err(pg)?;
    let runs: i64 = tx
        .query_one("SELECT count(*) FROM runs", &[])
        .and_then(|r| r.try_get(0))
        .map_err(pg)?;
    if runs > 0 {
        return Err(JournalError::Schema(format!(
            "journal {}: already holds {runs} run(s); migrate only into an empty journal (the first node of a fleet)",
            to.url
        )));
    }
    let mut copied = Vec::new();
    for (table, cols, with_node) in TABLES {
        let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let mut pg_names = names.clone();
        if *with_node {
            pg_names.push("node");
        }
        let params: Vec<String> = (1..=pg_names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            pg_names.join(", "),
            params.join(", ")
        );
        let stmt = tx.prepare(&insert).map_err(pg)?;
        let conn = sqlite.connection();
        let mut st = conn.prepare(&select).map_err(sq)?;
        let mut rows = st.query([]).map_err(sq)?;
        let mut n = 0u64;
        while let Some(row) = rows.next().map_err(sq)? {
            let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(pg_names.len());
            for (i, (_, col)) in cols.iter().enumerate() {
                let v: Value = row.get(i).map_err(sq)?;
                values.push(convert(v, *col));
            }
            if *with_node {
                values.push(Box::new(to.node.clone()));
            }
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|b| b.as_ref()).collect();
            tx.execute(&stmt, &refs).map_err(pg)?;
            n += 1;
        }
        copied.push((*table, n));
    }
    for (table, seq) in [
        ("runs", "runs_id_seq"),
        ("files", "files_id_seq"),
        ("rescans", "rescans_id_seq"),
    ] {
        tx.execute(
            &format!(
                "SELECT setval('{seq}', GREATEST((SELECT COALESCE(max(id), 0) FROM {table}), 1))"
            ),
            &[],
        )
        .map_err(pg)?;
    }
    tx.commit().map_err(pg)?;
    tracing::info!("journal {src_name} copied into {}", to.url);
    Ok(copied)
}

/// `shuttle journal migrate --to URL`; returns the exit code.
pub fn main(cli: &crate::config::CommandLine, to: &str) -> ExitCode {
    let cfg = match crate::config::load_for(cli, crate::config::Needs::KeysOnly) {
        Ok(l) => l.config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    if !(to.starts_with("postgresql://") || to.starts_with("postgres://")) {
        eprintln!("shuttle journal migrate: --to must be a postgresql:// URL, not {to:?}");
        return ExitCode::Usage;
    }
    if let Some(why) = super::absent(&crate::config::Config {
        fleet: None,
        ..cfg.clone()
    }) {
        eprintln!("shuttle journal migrate: {why}");
        return ExitCode::Failed;
    }
    let target = FleetConfig {
        url: to.to_string(),
        ..cfg.fleet_keys.clone()
    };
    match to_postgres(&cfg.tracking_data_path, &target) {
        Ok(copied) => {
            let parts: Vec<String> = copied.iter().map(|(t, n)| format!("{n} {t}")).collect();
            println!(
                "copied {} into {} as node {}: {}",
                cfg.tracking_data_path.join(super::FILE_NAME).display(),
                to,
                target.node,
                parts.join(", ")
            );
            ExitCode::Ok
        }
        Err(e) => {
            eprintln!("shuttle journal migrate: {e}");
            ExitCode::Failed
        }
    }
}
