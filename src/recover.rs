//! Recovery (DESIGN §1.3): reconcile what an interrupted earlier run left behind.
//!
//! Nothing an interrupted run left can be the only copy of a file: a source is removed
//! only after its copy is durable elsewhere. So recovery removes the dead run's temp
//! files and quarantine copies and marks its files interrupted; their sources (still
//! in the drop directory) are simply handled again. A delivery that completed before
//! the crash is recognised by its identical bytes and not duplicated.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::fsx;
use crate::journal::{Journal, JournalError};

/// What recovery did, for the log and report.
#[derive(Debug, Default)]
pub struct Recovered {
    pub interrupted_files: usize,
    pub removed: Vec<PathBuf>,
    /// Files in the quarantine the journal knows nothing about: left alone, reported.
    pub unknown_in_quarantine: Vec<PathBuf>,
}

pub fn reconcile(
    journal: &Journal,
    cfg: &Config,
    current_run: i64,
) -> Result<Recovered, JournalError> {
    let mut out = Recovered::default();
    for run in journal.unfinished_runs(current_run)? {
        tracing::warn!("run {run} did not finish (crashed or killed); recovering its files");
        journal.mark_run_interrupted(run)?;
    }
    let mut known = std::collections::HashSet::new();
    for f in journal.unfinished()? {
        let rel = Path::new(&f.rel_path);
        let q_final = cfg.quarantine_path.join(rel);
        let candidates = [
            fsx::temp_path_for(&q_final, f.id),
            q_final.clone(),
            fsx::temp_path_for(&cfg.destination_path.join(rel), f.id),
        ];
        for p in candidates {
            match fsx::remove_if_exists(&p) {
                Ok(true) => out.removed.push(p),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("recovery: cannot remove {:?}: {e}", crate::names::shown(&p))
                }
            }
        }
        if let Some(h) = cfg.hazard_archive() {
            remove_temps_named(h, f.id, &mut out.removed);
        }
        known.insert(q_final);
        journal.mark_interrupted(
            f.id,
            "interrupted run; quarantine copy and temp files removed, source left for this run",
        )?;
        out.interrupted_files += 1;
    }
    sweep_quarantine(&cfg.quarantine_path, &mut out);
    for p in &out.removed {
        tracing::info!("recovery removed {:?}", crate::names::shown(p));
    }
    for p in &out.unknown_in_quarantine {
        tracing::warn!(
            "quarantine holds {:?} which no journal entry explains; left in place (remove it once you know what it is)",
            crate::names::shown(p)
        );
    }
    Ok(out)
}

fn remove_temps_named(dir: &Path, id: i64, removed: &mut Vec<PathBuf>) {
    let p = dir.join(format!("{}{id}", fsx::TEMP_PREFIX));
    if let Ok(true) = fsx::remove_if_exists(&p) {
        removed.push(p);
    }
}

/// Removes Shuttle temp files anywhere in the quarantine; lists other leftovers.
fn sweep_quarantine(root: &Path, out: &mut Recovered) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(path);
            } else if e.file_name().to_str().is_some_and(fsx::is_temp_name) {
                if let Ok(true) = fsx::remove_if_exists(&path) {
                    out.removed.push(path);
                }
            } else {
                out.unknown_in_quarantine.push(path);
            }
        }
    }
}
