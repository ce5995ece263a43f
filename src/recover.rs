//! Recovery (docs/design.md §1.3): reconcile what an interrupted earlier run left behind.
//!
//! Nothing an interrupted run left can be the only copy of a file: a source is removed
//! only after its copy is durable elsewhere. So recovery removes the dead run's temp
//! files and quarantine copies and marks its files interrupted; their sources (still
//! in the drop directory) are simply handled again. A delivery that completed before
//! the crash is recognised by its identical bytes and not duplicated.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::fsx::{self, Beneath, Dir};
use crate::journal::{Journal, JournalError};

/// What recovery did, for the log and report.
#[derive(Debug, Default)]
pub struct Recovered {
    pub interrupted_files: usize,
    pub removed: Vec<PathBuf>,
    /// Files in the quarantine the journal knows nothing about: left alone, reported.
    pub unknown_in_quarantine: Vec<PathBuf>,
}

/// Every path is resolved beneath the quarantine's, the destination's and the hazard
/// archive's directory handles, never through a symlink: a link planted where a dead
/// run's temp file was cannot make recovery remove a file elsewhere.
pub fn reconcile(
    journal: &dyn Journal,
    cfg: &Config,
    current_run: i64,
) -> Result<Recovered, JournalError> {
    let mut out = Recovered::default();
    for run in journal.unfinished_runs(current_run)? {
        tracing::warn!("run {run} did not finish (crashed or killed); recovering its files");
        journal.mark_run_interrupted(run)?;
    }
    let quarantine = open_root(&cfg.quarantine_path);
    let destination = open_root(&cfg.destination_path);
    let hazard = cfg.hazard_archive().and_then(open_root);
    for f in journal.unfinished()? {
        let rel = Path::new(&f.rel_path);
        let temp = fsx::temp_path_for(rel, f.id);
        let candidates = [
            (&quarantine, temp.clone()),
            (&quarantine, rel.to_path_buf()),
            (&destination, temp),
        ];
        for (root, p) in candidates {
            if let Some(root) = root {
                remove(root, &p, &mut out.removed);
            }
        }
        if let Some(h) = &hazard {
            remove(h, Path::new(&fsx::temp_name(f.id)), &mut out.removed);
        }
        journal.mark_interrupted(
            f.id,
            "interrupted run; quarantine copy and temp files removed, source left for this run",
        )?;
        out.interrupted_files += 1;
    }
    if let Some(q) = &quarantine {
        sweep_quarantine(q.root(), &mut out);
    }
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

fn open_root(path: &Path) -> Option<Beneath> {
    match Beneath::open(path) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!("recovery: cannot open {}: {e}", path.display());
            None
        }
    }
}

fn remove(root: &Beneath, rel: &Path, removed: &mut Vec<PathBuf>) {
    match root.remove(rel) {
        Ok(true) => removed.push(root.path().join(rel)),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            "recovery: cannot remove {:?}: {e}",
            crate::names::shown(&root.path().join(rel))
        ),
    }
}

/// Removes Shuttle temp files anywhere in the quarantine; lists other leftovers.
fn sweep_quarantine(root: &Dir, out: &mut Recovered) {
    fsx::walk(root, |step| {
        let fsx::Step::Entry(e) = step else {
            return false;
        };
        let path = e.dir.path().join(&e.name);
        if e.kind == rustix::fs::FileType::Directory {
            return true;
        }
        if e.name.to_str().is_some_and(fsx::is_temp_name) {
            if let Ok(true) = e.dir.remove(&e.name) {
                out.removed.push(path);
            }
        } else {
            out.unknown_in_quarantine.push(path);
        }
        false
    });
}
