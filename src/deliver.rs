//! Delivery (DESIGN §1.9, clean branch): the scanned quarantine copy becomes
//! `destination_path/<relative path>`.
//!
//! On the same filesystem the copy itself is renamed (after checking it is still the
//! inode that was written, hashed and scanned); across filesystems it is copied to a
//! temp name while hashing, compared with the quarantine hash, fsynced and renamed.
//! Final names are taken with `RENAME_NOREPLACE`, so an existing file is never
//! overwritten by accident; `on_conflict` decides what happens then.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::OnConflict;
use crate::fsx;
use crate::quarantine::{Quarantined, Stamp, hash_file};

/// How a clean file reached the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Renamed from the quarantine (same filesystem).
    Renamed,
    /// Copied across filesystems.
    Copied,
    /// The same bytes were already there (a re-run after a crash, or a duplicate drop).
    AlreadyPresent,
    /// Replaced a different file (`on_conflict = overwrite`).
    Overwrote,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Renamed => "delivered",
            How::Copied => "delivered",
            How::AlreadyPresent => "already_present",
            How::Overwrote => "overwrote",
        }
    }
}

#[derive(Debug)]
pub struct Delivered {
    pub path: PathBuf,
    pub how: How,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// `on_conflict = skip` and the name holds other bytes: the source stays.
    #[error("{0} already exists with different content (on_conflict = skip)")]
    ConflictSkipped(PathBuf),
    #[error("quarantine copy {0} changed after it was scanned; not delivered")]
    QuarantineChanged(PathBuf),
    #[error("copy to {path} does not match the scanned bytes (sha256 {got}, expected {expected})")]
    HashMismatch {
        path: PathBuf,
        got: String,
        expected: String,
    },
    #[error("disk full delivering to {path}: {source}")]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DeliverError + 'a {
    move |source| {
        if fsx::is_disk_full(&source) {
            DeliverError::DiskFull {
                path: path.to_path_buf(),
                source,
            }
        } else {
            DeliverError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Where and how to deliver.
pub struct Target<'a> {
    pub root: &'a Path,
    pub on_conflict: OnConflict,
    /// Quarantine and destination are on the same filesystem.
    pub same_fs: bool,
}

/// Delivers quarantine copy `q` of file `id` to `target.root/rel`. On success the file
/// is durable under its final name with the scanned bytes, and the quarantine copy is
/// gone (renamed away or removed).
pub fn deliver(
    q: &Quarantined,
    rel: &Path,
    id: i64,
    target: &Target,
    buf: &mut [u8],
) -> Result<Delivered, DeliverError> {
    let final_path = target.root.join(rel);
    let dir = final_path.parent().unwrap_or(target.root).to_path_buf();
    create_dirs_durable(target.root, &dir)?;

    // The copy must still be the inode that was written, hashed and scanned.
    let mut copy =
        fsx::open_read_nofollow(&q.path).map_err(io_err("open quarantine copy", &q.path))?;
    let now = Stamp::of(&copy.metadata().map_err(io_err("stat", &q.path))?);
    if (now.dev, now.ino, now.size, now.mtime_ns)
        != (q.copy.dev, q.copy.ino, q.copy.size, q.copy.mtime_ns)
    {
        return Err(DeliverError::QuarantineChanged(q.path.clone()));
    }

    let (staged, how) = if target.same_fs {
        copy.set_permissions(std::fs::Permissions::from_mode(q.mode))
            .map_err(io_err("chmod", &q.path))?;
        copy.sync_all().map_err(io_err("fsync", &q.path))?;
        (q.path.clone(), How::Renamed)
    } else {
        let temp = fsx::temp_path_for(&final_path, id);
        let _ = fsx::remove_if_exists(&temp);
        if let Err(e) = copy_verified(&mut copy, &temp, q, buf) {
            let _ = fsx::remove_if_exists(&temp);
            return Err(e);
        }
        (temp, How::Copied)
    };

    crate::crashpoint::here("deliver: staged, before rename");
    let placed = place(&staged, &final_path, q, target.on_conflict, buf);
    crate::crashpoint::here("deliver: placed, before directory fsync");
    let result = match placed {
        Ok((path, placed_how)) => {
            fsx::fsync_dir(path.parent().unwrap_or(target.root))
                .map_err(io_err("fsync directory", &dir))?;
            let how = if placed_how == How::Renamed {
                how
            } else {
                placed_how
            };
            Ok(Delivered { path, how })
        }
        Err(e) => Err(e),
    };
    // The staged temp must not linger; on success the quarantine copy is done with
    // (renamed away already, or a duplicate of what is delivered).
    if !target.same_fs {
        let _ = fsx::remove_if_exists(&staged);
    }
    if result.is_ok() {
        let _ = fsx::remove_if_exists(&q.path);
    }
    result
}

/// Copies the open quarantine copy to `temp`, hashing; refuses a mismatch.
fn copy_verified(
    src: &mut File,
    temp: &Path,
    q: &Quarantined,
    buf: &mut [u8],
) -> Result<(), DeliverError> {
    let mut out = fsx::create_new(temp).map_err(io_err("create", temp))?;
    let mut hasher = Sha256::new();
    loop {
        let n = match src.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read quarantine copy", &q.path)(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err("write", temp))?;
        crate::crashpoint::here("deliver: mid-copy across filesystems");
    }
    let got = hex::encode(hasher.finalize());
    if got != q.sha256 {
        return Err(DeliverError::HashMismatch {
            path: temp.to_path_buf(),
            got,
            expected: q.sha256.clone(),
        });
    }
    out.set_permissions(std::fs::Permissions::from_mode(q.mode))
        .map_err(io_err("chmod", temp))?;
    let t = rustix::fs::Timespec {
        tv_sec: q.source.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: q.source.mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::futimens(
        &out,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
    .map_err(|e| io_err("set mtime of", temp)(e.into()))?;
    out.sync_all().map_err(io_err("fsync", temp))
}

/// Gives `staged` its final name under the conflict policy.
fn place(
    staged: &Path,
    final_path: &Path,
    q: &Quarantined,
    policy: OnConflict,
    buf: &mut [u8],
) -> Result<(PathBuf, How), DeliverError> {
    match fsx::rename_noreplace(staged, final_path) {
        Ok(()) => return Ok((final_path.to_path_buf(), How::Renamed)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("rename into", final_path)(e)),
    }
    if holds_same_bytes(final_path, q, buf) {
        return Ok((final_path.to_path_buf(), How::AlreadyPresent));
    }
    match policy {
        OnConflict::Skip => Err(DeliverError::ConflictSkipped(final_path.to_path_buf())),
        OnConflict::Overwrite => {
            std::fs::rename(staged, final_path).map_err(io_err("overwrite", final_path))?;
            Ok((final_path.to_path_buf(), How::Overwrote))
        }
        OnConflict::Rename => {
            for n in 1..10_000u32 {
                let candidate = suffixed(final_path, n);
                match fsx::rename_noreplace(staged, &candidate) {
                    Ok(()) => return Ok((candidate, How::Renamed)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // A re-run after a crash finds its own earlier delivery here.
                        if holds_same_bytes(&candidate, q, buf) {
                            return Ok((candidate, How::AlreadyPresent));
                        }
                    }
                    Err(e) => return Err(io_err("rename into", &candidate)(e)),
                }
            }
            Err(DeliverError::Io {
                action: "find a free name for",
                path: final_path.to_path_buf(),
                source: io::Error::other("10,000 suffixed names are taken"),
            })
        }
    }
}

/// `report.csv` → `report_1.csv`; `archive.tar.gz` → `archive_1.tar.gz`; `README` → `README_1`.
pub fn suffixed(path: &Path, n: u32) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (stem, ext) = match name.find('.') {
        Some(0) | None => (name, ""),
        Some(i) => (&name[..i], &name[i..]),
    };
    path.with_file_name(format!("{stem}_{n}{ext}"))
}

/// Is `path` a regular file (not a symlink) holding exactly the scanned bytes?
fn holds_same_bytes(path: &Path, q: &Quarantined, buf: &mut [u8]) -> bool {
    let Ok(mut f) = fsx::open_read_nofollow(path) else {
        return false;
    };
    match f.metadata() {
        Ok(m) if m.is_file() && m.len() == q.size => {}
        _ => return false,
    }
    // Renamed delivery: this may be the very inode we wrote.
    if let Ok(m) = f.metadata()
        && (m.dev(), m.ino()) == (q.copy.dev, q.copy.ino)
    {
        return true;
    }
    matches!(hash_file(&mut f, buf), Ok((h, _)) if h == q.sha256)
}

/// Creates `dir` (inside `root`) component by component, refusing symlinks on the
/// way, and fsyncs each new entry's parent so the path survives a power loss.
fn create_dirs_durable(root: &Path, dir: &Path) -> Result<(), DeliverError> {
    let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
    let mut cur = root.to_path_buf();
    for part in rel.components() {
        let parent = cur.clone();
        cur.push(part);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => {
                return Err(DeliverError::Io {
                    action: "use directory",
                    path: cur,
                    source: io::Error::other(
                        "exists but is not a directory (symlinks are never followed)",
                    ),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", &cur)(e)),
        }
        match std::fs::create_dir(&cur) {
            Ok(()) => fsx::fsync_dir(&parent).map_err(io_err("fsync directory", &parent))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create directory", &cur)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_keep_the_extension() {
        assert_eq!(
            suffixed(Path::new("/d/report.csv"), 1),
            PathBuf::from("/d/report_1.csv")
        );
        assert_eq!(
            suffixed(Path::new("/d/a.tar.gz"), 2),
            PathBuf::from("/d/a_2.tar.gz")
        );
        assert_eq!(
            suffixed(Path::new("/d/README"), 3),
            PathBuf::from("/d/README_3")
        );
        assert_eq!(
            suffixed(Path::new("/d/.hidden"), 1),
            PathBuf::from("/d/.hidden_1")
        );
    }
}
