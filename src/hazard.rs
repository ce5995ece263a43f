//! Suspect files (DESIGN §1.9, suspect branch).
//!
//! Without a hazard archive the suspect quarantine copy is deleted. The encrypted
//! OpenPGP archive (`hazard_archive_path`) plugs in here.

use std::path::{Path, PathBuf};

use crate::fsx;
use crate::quarantine::Quarantined;

/// What became of a suspect quarantine copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposal {
    /// Encrypted into the hazard archive at this path.
    Archived(PathBuf),
    /// No archive configured: the copy was deleted.
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum HazardError {
    #[error("cannot delete suspect quarantine copy {path}: {source}")]
    Delete {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Disposes of a suspect quarantine copy. Once this returns Ok the suspect copy is
/// durably archived or deliberately gone, and the source may be removed.
pub fn dispose(
    q: &Quarantined,
    _rel: &Path,
    _detections: &[String],
) -> Result<Disposal, HazardError> {
    fsx::remove_if_exists(&q.path).map_err(|source| HazardError::Delete {
        path: q.path.clone(),
        source,
    })?;
    Ok(Disposal::Deleted)
}
