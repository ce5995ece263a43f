//! `shuttle history NAME-OR-PATH [--json]`: "what happened to invoice-7.pdf?"
//!
//! Every journal record of the matching files, newest first: the run that discovered
//! and admitted it, size, the quarantine copy's SHA-256, each engine's verdict with its
//! version, where it was delivered or archived, whether its source was removed, and
//! why it failed, and every retro-scan of a delivery (`crate::rescan`). Reads the journal only; needs no directories but
//! `tracking_data_path` (so it works with a config that holds just that).
//!
//! NAME-OR-PATH matches a file whose path relative to `source_path`, or whose
//! delivery or archive path, is exactly it or ends in `/NAME-OR-PATH`; an absolute
//! path under `source_path` is taken relative to it. The journal records a file from
//! its admission: a file skipped at discovery (unsafe name, still being written) has
//! no record; its skip is in that run's log.

use std::path::Path;

use crate::config::{self, CommandLine};
use crate::journal::{self, FileHistory, Journal};
use crate::names::shown;
use crate::states::ExitCode;

/// Runs the command; returns the exit code: 0 records found, 1 none (or the journal
/// cannot be read), 2 usage or configuration error.
pub fn main(cli: &CommandLine, query: &str, json: bool) -> ExitCode {
    if query.is_empty() {
        eprintln!("shuttle history: give a file name or path");
        return ExitCode::Usage;
    }
    let cfg = match config::load_for(cli, config::Needs::KeysOnly) {
        Ok(l) => l.config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    if let Some(why) = journal::absent(&cfg) {
        eprintln!("{why}");
        return ExitCode::Failed;
    }
    let mut db = String::new();
    let records = match journal::open(&cfg).and_then(|j| {
        db = j.describe();
        lookup(&*j, &cfg.source_path, query)
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read the journal: {e}");
            return ExitCode::Failed;
        }
    };
    if json {
        let doc = serde_json::json!({ "query": query, "journal": db, "records": records });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("cannot serialise the history: {e}");
                return ExitCode::Failed;
            }
        }
    } else {
        print!("{}", render(query, &records));
    }
    if records.is_empty() {
        ExitCode::Failed
    } else {
        ExitCode::Ok
    }
}

/// The records matching `query` (see the module doc), newest first.
pub fn lookup(
    j: &dyn Journal,
    source: &Path,
    query: &str,
) -> Result<Vec<FileHistory>, journal::JournalError> {
    let q = Path::new(query);
    let exact = match q.strip_prefix(source) {
        Ok(rel) if q.is_absolute() && !source.as_os_str().is_empty() => {
            rel.to_string_lossy().into_owned()
        }
        _ => query.to_string(),
    };
    j.file_history(&exact, &exact)
}

fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// The human-readable history.
pub fn render(query: &str, records: &[FileHistory]) -> String {
    let mut s = String::new();
    if records.is_empty() {
        s.push_str(&format!(
            "no journal record matches {:?} (a file skipped at discovery has none: see that run's log)\n",
            shown(query)
        ));
        return s;
    }
    s.push_str(&format!(
        "{} record(s) matching {:?}, newest first\n",
        records.len(),
        shown(query)
    ));
    for r in records {
        s.push('\n');
        s.push_str(&format!(
            "{}  (journal file {}, run {})\n",
            shown(&r.rel_path),
            r.id,
            r.run_id
        ));
        let mut line = |what: &str, text: String| s.push_str(&format!("  {what:<12} {text}\n"));
        line(
            "discovered",
            format!(
                "by run {} started {}",
                r.run_id,
                r.run_started.as_deref().unwrap_or("?")
            ),
        );
        line(
            "admitted",
            format!("{} ({} bytes)", time(r.admitted_at), r.size),
        );
        if let Some(sha) = &r.sha256 {
            line("quarantined", format!("sha256 {sha}"));
        }
        if let Some(serde_json::Value::Array(engines)) = &r.scan_results {
            for e in engines {
                let get = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
                let mut text =
                    format!("{} ({}): {}", get("scanner"), get("version"), get("result"));
                if let Some(serde_json::Value::Array(d)) = e.get("detections") {
                    let names: Vec<&str> = d.iter().filter_map(|v| v.as_str()).collect();
                    text.push_str(&format!(" [{}]", names.join(", ")));
                }
                if let Some(err) = e.get("error").and_then(|v| v.as_str()) {
                    text.push_str(&format!(": {err}"));
                }
                line("scanned", text);
            }
        } else if let Some(v) = &r.verdict {
            line("scanned", v.clone());
        }
        match &r.outcome {
            None => line(
                "outcome",
                "none yet (in flight, or its run was killed and recovery has not run)".into(),
            ),
            Some(o) => {
                let mut text = o.clone();
                if let Some(d) = &r.disposition {
                    text.push_str(&format!(" ({d})"));
                }
                if let Some(t) = r.finished_at {
                    text.push_str(&format!(" at {}", time(t)));
                }
                line("outcome", text);
            }
        }
        if let Some(p) = &r.final_path {
            let what = if r.hazard_archive.is_some() {
                "archived"
            } else {
                "delivered"
            };
            line(what, format!("{}", shown(p)));
        }
        if let Some(k) = &r.hazard_key_fingerprint {
            line("key", k.clone());
        }
        if let Some(e) = &r.error {
            line("reason", e.clone());
        }
        for x in &r.rescans {
            let mut text = format!(
                "{} with {}: {}",
                time(x.time),
                x.generation,
                x.state.as_str()
            );
            if let Some(serde_json::Value::Array(d)) = &x.detections {
                let names: Vec<&str> = d.iter().filter_map(|v| v.as_str()).collect();
                text.push_str(&format!(" [{}]", names.join(", ")));
            }
            if let Some(a) = &x.archive_path {
                text.push_str(&format!(", archived {}", shown(a)));
            }
            if let Some(n) = &x.note {
                text.push_str(&format!(": {n}"));
            }
            line("rescanned", text);
        }
        line(
            "source",
            if r.source_removed {
                "removed".into()
            } else {
                "not removed by Shuttle".into()
            },
        );
    }
    s
}
