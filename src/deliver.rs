//! Delivery (docs/design.md §1.9, clean branch): the scanned quarantine copy becomes
//! `destination_path/<relative path>`.
//!
//! On the same filesystem the copy itself is renamed (after checking it is still the
//! inode that was written, hashed and scanned); across filesystems, or when the rename
//! fails with `EXDEV` (two mounts of one filesystem, as bind mounts make), it is copied
//! to a temp name while hashing, compared with the quarantine hash, fsynced and renamed.
//! Final names are taken with `RENAME_NOREPLACE`, so an existing file is never
//! overwritten by accident; `on_conflict` decides what happens then.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::OnConflict;
use crate::fsx;
use crate::fsx::hash_file;
use crate::quarantine::Quarantined;
use crate::states::Disposition;

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
    /// The journal's disposition of a file delivered this way.
    pub fn disposition(self) -> Disposition {
        match self {
            How::Renamed | How::Copied => Disposition::Delivered,
            How::AlreadyPresent => Disposition::AlreadyPresent,
            How::Overwrote => Disposition::Overwrote,
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

fsx::impl_io_error!(DeliverError);

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DeliverError + 'a {
    fsx::failed(action, path)
}

/// Where and how to deliver.
pub struct Target<'a> {
    pub root: &'a fsx::Beneath,
    pub on_conflict: OnConflict,
    /// Quarantine and destination are on the same filesystem.
    pub same_fs: bool,
    /// fsync the file and its directory now. `false`: the caller makes a whole batch
    /// durable at once (`syncfs`) before it relies on these deliveries.
    pub durable: bool,
}

/// Where clean files go: the seam another kind of destination (object storage, a
/// remote host) would implement. A run delivers every clean file through it and,
/// once per batch, makes what it delivered durable before any source is removed.
pub trait Destination: Send + Sync {
    /// Places the verified quarantine copy `q` of file `id` as `rel`, never
    /// overwriting a different file unless the conflict policy says so. Not yet
    /// durable: see [`Destination::sync`].
    fn deliver(
        &self,
        q: &Quarantined,
        rel: &Path,
        id: i64,
        buf: &mut [u8],
    ) -> Result<Delivered, DeliverError>;

    /// Makes every delivery so far durable (the batch's group commit).
    fn sync(&self) -> io::Result<()>;

    /// Where it is, for messages.
    fn describe(&self) -> String;
}

/// The destination directory: deliveries beneath its handle, one `syncfs` a batch.
pub struct FsDestination {
    pub root: fsx::Beneath,
    pub on_conflict: OnConflict,
    /// Quarantine and destination are on the same filesystem: delivery by rename.
    pub same_fs: bool,
}

impl Destination for FsDestination {
    fn deliver(
        &self,
        q: &Quarantined,
        rel: &Path,
        id: i64,
        buf: &mut [u8],
    ) -> Result<Delivered, DeliverError> {
        let target = Target {
            root: &self.root,
            on_conflict: self.on_conflict,
            same_fs: self.same_fs,
            // Made durable with its batch: one syncfs for many files (group commit).
            durable: false,
        };
        deliver(q, rel, id, &target, buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.root.root().syncfs()
    }

    fn describe(&self) -> String {
        self.root.path().display().to_string()
    }
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
    let final_path = target.root.path().join(rel);
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(DeliverError::Io {
            action: "deliver",
            path: final_path,
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        });
    };
    let dir_path = final_path
        .parent()
        .unwrap_or(target.root.path())
        .to_path_buf();
    let ddir = target
        .root
        .create_dir_all(parent, target.durable)
        .map_err(io_err("create destination directory", &dir_path))?;

    // The copy must still be the inode that was written, hashed and scanned (its
    // directory is the handle the copy was made through): the descriptor the scan was
    // given, its name checked again.
    let qdir = &*q.dir;
    let mut copy = q.open_scanned().map_err(|e| {
        if e.kind() == io::ErrorKind::Other {
            DeliverError::QuarantineChanged(q.path.clone())
        } else {
            io_err("open quarantine copy", &q.path)(e)
        }
    })?;

    let temp_name: OsString = fsx::temp_name(id).into();
    // Same filesystem: the scanned copy itself is renamed into place. A rename can
    // still fail with EXDEV when the two are different mounts of one filesystem (a
    // bind mount, e.g. systemd's ReadWritePaths=): then the verified copy below.
    let mut renamed = None;
    if target.same_fs {
        copy.set_permissions(std::fs::Permissions::from_mode(q.mode))
            .map_err(io_err("chmod", &q.path))?;
        if target.durable {
            copy.sync_all().map_err(io_err("fsync", &q.path))?;
        }
        crate::crashpoint::here("deliver: staged, before rename");
        match place(qdir, q.name(), &ddir, name, q, target.on_conflict, buf) {
            Err(DeliverError::Io { source, .. }) if is_cross_device(&source) => {
                tracing::debug!(
                    "{} and {} are different mounts: copying instead of renaming",
                    q.path.display(),
                    dir_path.display()
                );
            }
            other => renamed = Some(other),
        }
    }
    let (placed, how, staged_temp) = match renamed {
        Some(placed) => (placed, How::Renamed, false),
        None => {
            let _ = ddir.remove(&temp_name);
            // The scan may have read the shared descriptor (a stream to clamd).
            let copied = copy
                .rewind()
                .map_err(io_err("read quarantine copy", &q.path))
                .and_then(|()| copy_verified(&mut copy, &ddir, &temp_name, q, target.durable, buf));
            if let Err(e) = copied {
                let _ = ddir.remove(&temp_name);
                return Err(e);
            }
            crate::crashpoint::here("deliver: staged, before rename");
            let placed = place(&ddir, &temp_name, &ddir, name, q, target.on_conflict, buf);
            (placed, How::Copied, true)
        }
    };
    crate::crashpoint::here("deliver: placed, before directory fsync");
    let result = placed.and_then(|(placed_name, placed_how)| {
        if target.durable {
            ddir.fsync().map_err(io_err("fsync directory", &dir_path))?;
        }
        let how = if placed_how == How::Renamed {
            how
        } else {
            placed_how
        };
        Ok(Delivered {
            path: dir_path.join(placed_name),
            how,
        })
    });
    // The staged temp must not linger; on success the quarantine copy is done with
    // (renamed away already, or a duplicate of what is delivered).
    if staged_temp {
        let _ = ddir.remove(&temp_name);
    }
    // When the copy itself was renamed into place there is nothing left to remove.
    let moved = how == How::Renamed
        && result
            .as_ref()
            .is_ok_and(|d| matches!(d.how, How::Renamed | How::Overwrote));
    if result.is_ok() && !moved {
        let _ = qdir.remove(q.name());
    }
    result
}

/// `EXDEV`: source and target of a rename are on different mounts.
fn is_cross_device(e: &io::Error) -> bool {
    fsx::classify(e, true) == fsx::IoKind::CrossDevice
}

/// Copies the open quarantine copy to `temp` in `dir`, hashing; refuses a mismatch.
fn copy_verified(
    src: &mut File,
    dir: &fsx::Dir,
    temp: &OsStr,
    q: &Quarantined,
    durable: bool,
    buf: &mut [u8],
) -> Result<(), DeliverError> {
    let temp_path = dir.path().join(temp);
    let mut out = dir.create_new(temp).map_err(io_err("create", &temp_path))?;
    let copied = fsx::copy_hashing(src, &mut out, buf, None, |_, _, _| {
        crate::crashpoint::here("deliver: mid-copy across filesystems");
        Ok::<(), io::Error>(())
    });
    let got = match copied {
        Ok(h) => h.sha256,
        Err(fsx::CopyFailure::Read(e) | fsx::CopyFailure::Stopped(e)) => {
            return Err(io_err("read quarantine copy", &q.path)(e));
        }
        Err(fsx::CopyFailure::Write(e)) => return Err(io_err("write", &temp_path)(e)),
    };
    if got != q.sha256 {
        return Err(DeliverError::HashMismatch {
            path: temp_path,
            got,
            expected: q.sha256.clone(),
        });
    }
    out.set_permissions(std::fs::Permissions::from_mode(q.mode))
        .map_err(io_err("chmod", &temp_path))?;
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
    .map_err(|e| io_err("set mtime of", &temp_path)(e.into()))?;
    if durable {
        out.sync_all().map_err(io_err("fsync", &temp_path))?;
    }
    Ok(())
}

/// Gives the staged file its final name in `ddir` under the conflict policy; returns
/// the name it got.
fn place(
    from_dir: &fsx::Dir,
    from: &OsStr,
    ddir: &fsx::Dir,
    name: &OsStr,
    q: &Quarantined,
    policy: OnConflict,
    buf: &mut [u8],
) -> Result<(OsString, How), DeliverError> {
    let final_path = ddir.path().join(name);
    match from_dir.rename_to(from, ddir, name, true) {
        Ok(()) => return Ok((name.to_os_string(), How::Renamed)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("rename into", &final_path)(e)),
    }
    if holds_same_bytes(ddir, name, q, buf) {
        return Ok((name.to_os_string(), How::AlreadyPresent));
    }
    match policy {
        OnConflict::Skip => Err(DeliverError::ConflictSkipped(final_path)),
        OnConflict::Overwrite => {
            if ddir.stat(name).is_ok_and(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
            }) {
                return Err(DeliverError::Io {
                    action: "overwrite",
                    path: final_path,
                    source: io::Error::other("a directory has that name"),
                });
            }
            from_dir
                .rename_to(from, ddir, name, false)
                .map_err(io_err("overwrite", &final_path))?;
            Ok((name.to_os_string(), How::Overwrote))
        }
        OnConflict::Rename => {
            for n in 1..10_000u32 {
                let candidate = suffixed(name, n);
                match from_dir.rename_to(from, ddir, &candidate, true) {
                    Ok(()) => return Ok((candidate, How::Renamed)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // A re-run after a crash finds its own earlier delivery here.
                        if holds_same_bytes(ddir, &candidate, q, buf) {
                            return Ok((candidate, How::AlreadyPresent));
                        }
                    }
                    Err(e) => return Err(io_err("rename into", &ddir.path().join(&candidate))(e)),
                }
            }
            Err(DeliverError::Io {
                action: "find a free name for",
                path: final_path,
                source: io::Error::other("10,000 suffixed names are taken"),
            })
        }
    }
}

/// `report.csv` → `report_1.csv`; `archive.tar.gz` → `archive_1.tar.gz`; `README` → `README_1`.
pub fn suffixed(name: &OsStr, n: u32) -> OsString {
    let name = name.to_str().unwrap_or("file");
    let (stem, ext) = match name.find('.') {
        Some(0) | None => (name, ""),
        Some(i) => (&name[..i], &name[i..]),
    };
    format!("{stem}_{n}{ext}").into()
}

/// Is `name` in `dir` a regular file (not a symlink) holding exactly the scanned bytes?
fn holds_same_bytes(dir: &fsx::Dir, name: &OsStr, q: &Quarantined, buf: &mut [u8]) -> bool {
    let Ok(mut f) = dir.open_read(name) else {
        return false;
    };
    let Ok(m) = f.metadata() else { return false };
    if !m.is_file() || m.len() != q.size {
        return false;
    }
    // Renamed delivery: this may be the very inode we wrote.
    if (m.dev(), m.ino()) == (q.copy.dev, q.copy.ino) {
        return true;
    }
    matches!(hash_file(&mut f, buf, None), Ok((h, _)) if h == q.sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptor kept from the scan may have been read to its end (a stream to
    /// clamd over TCP): a delivery that copies instead of renaming still delivers the
    /// whole file, verified against the quarantine hash.
    #[test]
    fn a_copy_read_to_its_end_by_its_scan_is_delivered_whole_when_copied() {
        use std::io::Read;
        let tmp = tempfile::tempdir().unwrap();
        let dir = |d: &str| {
            let p = tmp.path().join(d);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (src, quarantine, dst) = (dir("src"), dir("q"), dir("dst"));
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f.bin"), &bytes).unwrap();
        let m = std::fs::metadata(src.join("d/f.bin")).unwrap();
        let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        let mut buf = vec![0u8; 1 << 16];
        let q = crate::quarantine::copy_in(
            &fsx::Beneath::open(&src).unwrap(),
            &std::sync::Arc::new(fsx::Beneath::open(&quarantine).unwrap()),
            Path::new("d/f.bin"),
            (m.len(), mtime),
            crate::quarantine::SourceChecks {
                writers: crate::lease::WriterCheck::LeaseOrProc,
                allow_hard_links: false,
            },
            &mut buf,
            &mut Default::default(),
        )
        .unwrap();
        let mut scanned = q.open_for_scan().unwrap();
        let mut sent = Vec::new();
        scanned.read_to_end(&mut sent).unwrap();
        assert_eq!(sent, bytes);
        let destination = FsDestination {
            root: fsx::Beneath::open(&dst).unwrap(),
            on_conflict: OnConflict::Skip,
            same_fs: false,
        };
        let d = destination
            .deliver(&q, Path::new("d/f.bin"), 7, &mut buf)
            .unwrap();
        assert_eq!(d.how, How::Copied);
        assert_eq!(std::fs::read(dst.join("d/f.bin")).unwrap(), bytes);
        assert!(!quarantine.join("d/f.bin").exists(), "copy removed");
    }

    #[test]
    fn suffixes_keep_the_extension() {
        assert_eq!(suffixed(OsStr::new("report.csv"), 1), "report_1.csv");
        assert_eq!(suffixed(OsStr::new("a.tar.gz"), 2), "a_2.tar.gz");
        assert_eq!(suffixed(OsStr::new("README"), 3), "README_3");
        assert_eq!(suffixed(OsStr::new(".hidden"), 1), ".hidden_1");
    }
}
