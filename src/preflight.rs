//! Step 1 of a run, and of `shuttle rescan` and `shuttle watch`: the checks made
//! before the lock is taken and any file is touched, and the error that stops a run
//! before it starts. Its own module so that the run and the retro-scan command, which
//! the run also calls, both depend on it rather than on each other.

use crate::config::Config;
use crate::hazard::HazardArchive;
use crate::lock::LockError;
use crate::scan;

/// What stops a run before it starts; everything later ends in the report instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{0}")]
    Config(String),
}

/// Step 1, configuration: loaded by the caller; the directories and scanners are
/// checked here, before the lock is taken and any file is touched.
pub fn preflight(cfg: &Config) -> Result<(), RunError> {
    let problems = cfg.check_paths();
    if !problems.is_empty() {
        return Err(RunError::Config(problems.join("\n")));
    }
    scan::enabled(cfg).map_err(RunError::Config)?;
    crate::ledger::gate(cfg).map_err(RunError::Config)?;
    // The hazard key is validated here too: a key that cannot be used would turn
    // every suspect file into a failed one, so it is a configuration error.
    if let Some(h) = HazardArchive::open(cfg).map_err(|e| RunError::Config(e.to_string()))? {
        tracing::info!(
            "hazard archive {}: {}",
            h.dir().display(),
            h.recipient().describe()
        );
    }
    Ok(())
}
