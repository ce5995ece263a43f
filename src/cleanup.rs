//! Source removal and end-of-run cleanup (docs/design.md §1.10, §1.11).
//!
//! A source is removed only after its clean copy is durable and verified in the
//! destination (or its suspect copy durable in the hazard archive, or deliberately
//! deleted), and only if the source still hashes to what was quarantined.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fsx;
use crate::fsx::hash_file;
use crate::quarantine::{SourceRecord, Stamp};

/// Why a source was kept.
#[derive(Debug, thiserror::Error)]
pub enum SourceKept {
    #[error("source changed after it was quarantined (sha256 now {now}); kept")]
    Changed { now: String },
    #[error("source is no longer the file that was copied (replaced or renamed); kept")]
    Replaced,
    #[error("source is open for writing in another process{writers}; kept")]
    OpenForWriting { writers: crate::lease::Writers },
    #[error("cannot tell whether another process is writing the source (no read lease: {0}); kept")]
    CannotTell(String),
    #[error("source already gone")]
    Gone,
    #[error("cannot remove source {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The source directory [`remove_source`] opened last, kept for the next file of the
/// same directory: one batch's files mostly share a few directories, and each
/// directory is then opened once a batch rather than once a file. Made anew for each
/// batch, so a handle is never kept longer than one commit.
#[derive(Debug, Default)]
pub struct SourceDirs(Option<(PathBuf, fsx::Dir)>);

/// Removes `source_root/<q.rel>` if it still holds the quarantined bytes and no process
/// has it open for writing. Everything goes through a directory handle beneath the
/// source: a symlink planted meanwhile is never followed.
///
/// The source is hashed and unlinked under a read lease ([`crate::lease`]): the
/// kernel grants it only while no process has the file open for writing, and any
/// open for writing meanwhile breaks it, which is checked right before the unlink.
/// Where no lease can be had, `/proc` decides if it showed every process at the
/// start of the run; otherwise the source is kept.
pub fn remove_source(
    sources: &fsx::Beneath,
    q: &SourceRecord,
    writers: crate::lease::WriterCheck,
    dirs: &mut SourceDirs,
    buf: &mut [u8],
) -> Result<(), SourceKept> {
    let rel = q.rel.as_path();
    let path = sources.path().join(rel);
    let io = |source| SourceKept::Io {
        path: path.clone(),
        source,
    };
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(SourceKept::Replaced);
    };
    let dir = match &mut dirs.0 {
        Some((p, d)) if p == parent => d,
        cached => match sources.open_dir(parent) {
            Ok(d) => &cached.insert((parent.to_path_buf(), d)).1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SourceKept::Gone),
            Err(e) if fsx::is_symlink_refusal(&e) => return Err(SourceKept::Replaced),
            Err(e) => return Err(io(e)),
        },
    };
    let mut f = match dir.open_read(name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SourceKept::Gone),
        Err(e) if fsx::is_symlink_refusal(&e) => return Err(SourceKept::Replaced),
        Err(e) => return Err(io(e)),
    };
    let before = Stamp::of(&f.metadata().map_err(io)?);
    if (before.dev, before.ino) != (q.source.dev, q.source.ino) {
        return Err(SourceKept::Replaced);
    }
    let leased = match crate::lease::take(&f) {
        crate::lease::Taken::Held => true,
        crate::lease::Taken::Writer => {
            let writers = crate::lease::Writers::of(&f);
            return Err(SourceKept::OpenForWriting { writers });
        }
        crate::lease::Taken::Unavailable(e) => match writers {
            crate::lease::WriterCheck::LeaseOrProc => false,
            crate::lease::WriterCheck::LeaseOnly => {
                return Err(SourceKept::CannotTell(e.to_string()));
            }
        },
    };
    // Read up to the size just seen: growth since shows in `after` below.
    let (now, _) = hash_file(&mut f, buf, Some(before.size)).map_err(io)?;
    if now != q.sha256 {
        return Err(SourceKept::Changed { now });
    }
    let after = Stamp::of(&f.metadata().map_err(io)?);
    if !after.unchanged(&before) {
        return Err(SourceKept::Changed {
            now: "(modified while hashing)".into(),
        });
    }
    // The name must still lead to the inode just hashed.
    match dir.stat(name) {
        Ok(st) if (st.st_dev, st.st_ino) == (after.dev, after.ino) => {}
        _ => return Err(SourceKept::Replaced),
    }
    if leased && !crate::lease::still_held(&f) {
        let writers = crate::lease::Writers::of(&f);
        return Err(SourceKept::OpenForWriting { writers });
    }
    crate::crashpoint::here("source: verified, before unlink");
    dir.remove(name).map_err(io)?;
    crate::crashpoint::here("source: unlinked");
    Ok(())
}

/// Removes the empty subdirectories among `dirs` (relative to `root`, never `root`
/// itself) whose mtime is at least `min_age` old. Deepest first; `rmdir` refuses any
/// directory that is not empty, so nothing can be lost. Every directory is reached
/// beneath `root`'s handle, never through a symlink. Returns how many went.
pub fn remove_empty_dirs(root: &Path, dirs: &[PathBuf], min_age: Duration, what: &str) -> usize {
    let root = match fsx::Beneath::open(root) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "cannot open {} to remove empty directories: {e}",
                root.display()
            );
            return 0;
        }
    };
    let mut sorted: Vec<&PathBuf> = dirs.iter().filter(|d| !d.as_os_str().is_empty()).collect();
    sorted.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let now = SystemTime::now();
    let mut removed = 0;
    for rel in sorted {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let Ok(dir) = root.open_dir(parent) else {
            continue;
        };
        let Ok(m) = dir.meta(name) else {
            continue;
        };
        if m.kind != rustix::fs::FileType::Directory {
            continue;
        }
        let mtime = UNIX_EPOCH + Duration::from_nanos(u64::try_from(m.mtime_ns).unwrap_or(0));
        let old_enough = now.duration_since(mtime).is_ok_and(|age| age >= min_age);
        if old_enough && dir.remove_dir(name).is_ok() {
            tracing::debug!(
                "removed empty {what} directory {}",
                dir.path().join(name).display()
            );
            removed += 1;
        }
    }
    removed
}

/// Every subdirectory below `root` (not following symlinks), relative.
pub fn subdirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(root) = fsx::Beneath::open(root) {
        fsx::walk(root.root(), |step| {
            let fsx::Step::Entry(e) = step else {
                return false;
            };
            let dir = e.kind == rustix::fs::FileType::Directory;
            if dir {
                out.push(e.rel.clone());
            }
            dir
        });
    }
    out
}

/// Removes the quarantine's empty directories (the run's leftovers).
pub fn empty_quarantine(quarantine: &Path) -> usize {
    remove_empty_dirs(
        quarantine,
        &subdirs(quarantine),
        Duration::ZERO,
        "quarantine",
    )
}
