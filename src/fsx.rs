//! Small filesystem operations the pipeline steps share: Shuttle's temp names, opening
//! without following symlinks, atomic no-replace renames, directory fsync, free space.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, OFlags, RenameFlags};

/// Every file Shuttle writes under a final name is first written under this prefix.
/// Discovery never picks such a file up and recovery removes leftovers.
pub const TEMP_PREFIX: &str = ".shuttle-tmp.";

/// Is this file name one of Shuttle's own temp files?
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// The temp file name for file `id`.
pub fn temp_name(id: i64) -> String {
    format!("{TEMP_PREFIX}{id}")
}

/// The temp path for file `id` next to `final_path`; deterministic so that recovery
/// can find it from the journal alone.
pub fn temp_path_for(final_path: &Path, id: i64) -> PathBuf {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    dir.join(temp_name(id))
}

/// Opens a file for reading without following a symlink in its last component and
/// without blocking on a FIFO that replaced a regular file.
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)
}

/// Creates a new file exclusively (never through a symlink), mode 0600 until finished.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Renames `from` to `to` unless `to` exists (EEXIST then). Falls back to link+unlink on
/// filesystems without `RENAME_NOREPLACE`; both are atomic with respect to `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            rustix::fs::linkat(CWD, from, CWD, to, AtFlags::empty())?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes a directory entry change (create, rename, unlink) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Space on the filesystem holding `path`.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// What an unprivileged writer can still use (f_bavail).
    pub available: u64,
    pub total: u64,
}

/// `statvfs` of `path`.
pub fn space(path: &Path) -> io::Result<Space> {
    let s = rustix::fs::statvfs(path)?;
    Ok(Space {
        available: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// Bytes → MiB for messages (MB means MiB throughout).
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Removes a file, treating "already gone" as success.
pub fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `ELOOP`/`ENOTDIR`/`EXDEV`: a symlink (or a non-directory) stood where a file or
/// directory was expected, and was not followed.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(e.raw_os_error(), Some(c) if [Errno::LOOP, Errno::NOTDIR, Errno::XDEV].iter().any(|x| x.raw_os_error() == c))
}

/// Is this I/O error a full disk or quota?
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() || code == rustix::io::Errno::DQUOT.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_noreplace_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "old").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
    }

    #[test]
    fn open_refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("l")).unwrap();
        assert!(open_read_nofollow(&d.path().join("l")).is_err());
    }

    #[test]
    fn beneath_never_follows_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::fs::write(d.path().join("real/f"), "ok").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        let b = Beneath::open(d.path()).unwrap();
        assert!(b.open_read(Path::new("real/f")).is_ok());
        assert!(
            b.open_read(Path::new("link/passwd")).is_err(),
            "symlinked directory"
        );
        assert!(b.open_read(Path::new("../etc/passwd")).is_err(), "escape");
        assert!(b.create_dir_all(Path::new("link/sub"), false).is_err());
        assert!(!Path::new("/etc/sub").exists());
        let made = b.create_dir_all(Path::new("a/b/c"), true).unwrap();
        assert_eq!(made.path(), d.path().join("a/b/c"));
        assert!(d.path().join("a/b/c").is_dir());
    }
}

/// A directory that relative paths are resolved beneath: never through a symlink and
/// never out of it (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). Used for
/// the source, quarantine and destination so that a symlink planted between two steps
/// cannot redirect a read or a write.
#[derive(Debug)]
pub struct Beneath {
    dir: Dir,
}

/// An open directory and the path it was opened as (for messages only).
#[derive(Debug)]
pub struct Dir {
    fd: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens the root itself (configured by the administrator; may be a symlink).
    pub fn open(root: &Path) -> io::Result<Beneath> {
        let fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Beneath {
            dir: Dir {
                fd,
                path: root.to_path_buf(),
            },
        })
    }

    pub fn root(&self) -> &Dir {
        &self.dir
    }

    /// The root's path (for messages).
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    fn resolve(&self, rel: &Path, flags: OFlags) -> io::Result<std::os::fd::OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = rustix::fs::ResolveFlags::BENEATH
            | rustix::fs::ResolveFlags::NO_SYMLINKS
            | rustix::fs::ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(
            &self.dir.fd,
            rel,
            flags | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            how,
        ) {
            Err(e) if e == rustix::io::Errno::NOSYS => self.resolve_walk(rel, flags),
            other => other.map_err(io::Error::from),
        }
    }

    /// Kernels before 5.6: walk component by component with `O_NOFOLLOW`.
    fn resolve_walk(&self, rel: &Path, flags: OFlags) -> io::Result<std::os::fd::OwnedFd> {
        use std::path::Component;
        let parts: Vec<_> = rel.components().collect();
        let mut cur = rustix::io::dup(&self.dir.fd)?;
        for (i, c) in parts.iter().enumerate() {
            let Component::Normal(name) = c else {
                if matches!(c, Component::CurDir) {
                    continue;
                }
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path leaves its directory",
                ));
            };
            let last = i + 1 == parts.len();
            let f = if last {
                flags
            } else {
                OFlags::DIRECTORY | OFlags::RDONLY
            };
            cur = rustix::fs::openat(
                &cur,
                *name,
                f | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
        }
        Ok(cur)
    }

    /// Opens `rel_dir` beneath the root.
    pub fn open_dir(&self, rel_dir: &Path) -> io::Result<Dir> {
        let fd = self.resolve(rel_dir, OFlags::DIRECTORY | OFlags::RDONLY)?;
        Ok(Dir {
            fd,
            path: self.dir.path.join(rel_dir),
        })
    }

    /// Opens `rel_dir`, creating missing components (never through a symlink). With
    /// `durable`, each new directory's parent is fsynced so the path survives a crash.
    pub fn create_dir_all(&self, rel_dir: &Path, durable: bool) -> io::Result<Dir> {
        match self.open_dir(rel_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if is_symlink_refusal(&e) => {
                return Err(io::Error::other(format!(
                    "a symlink or non-directory stands in {} ({e}); symlinks are never followed",
                    self.dir.path.join(rel_dir).display()
                )));
            }
            other => return other,
        }
        let mut cur = Dir {
            fd: rustix::io::dup(&self.dir.fd)?,
            path: self.dir.path.clone(),
        };
        for c in rel_dir.components() {
            let std::path::Component::Normal(name) = c else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path leaves its directory",
                ));
            };
            match rustix::fs::mkdirat(&cur.fd, name, rustix::fs::Mode::from_raw_mode(0o770)) {
                Ok(()) if durable => cur.fsync()?,
                Ok(()) => {}
                Err(e) if e == rustix::io::Errno::EXIST => {}
                Err(e) => return Err(io::Error::from(e)),
            }
            let fd = rustix::fs::openat(
                &cur.fd,
                name,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| {
                if e == rustix::io::Errno::NOTDIR || e == rustix::io::Errno::LOOP {
                    io::Error::other(format!(
                        "{} exists but is not a directory (symlinks are never followed)",
                        cur.path.join(name).display()
                    ))
                } else {
                    io::Error::from(e)
                }
            })?;
            cur = Dir {
                fd,
                path: cur.path.join(name),
            };
        }
        Ok(cur)
    }

    /// Removes the file `rel` beneath the root (never through a symlink); "already
    /// gone", including a missing parent directory, is success (returns whether it
    /// existed).
    pub fn remove(&self, rel: &Path) -> io::Result<bool> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file path beneath its directory",
            ));
        };
        match self.open_dir(parent) {
            Ok(dir) => dir.remove(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Opens a file beneath the root for reading (no symlinks, no blocking on FIFOs).
    pub fn open_read(&self, rel: &Path) -> io::Result<File> {
        let fd = self.resolve(
            rel,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
        )?;
        Ok(File::from(fd))
    }
}

impl Dir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a new file in this directory, mode 0600, never through a symlink.
    pub fn create_new(&self, name: &std::ffi::OsStr) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// Opens a file of this directory for reading, never through a symlink.
    pub fn open_read(&self, name: &std::ffi::OsStr) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// `lstat` of an entry.
    pub fn stat(&self, name: &std::ffi::OsStr) -> io::Result<rustix::fs::Stat> {
        Ok(rustix::fs::statat(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Renames `from` here to `to` in `dest`; with `noreplace`, fails with
    /// `AlreadyExists` rather than replace (link + unlink where the filesystem lacks
    /// `RENAME_NOREPLACE`).
    pub fn rename_to(
        &self,
        from: &std::ffi::OsStr,
        dest: &Dir,
        to: &std::ffi::OsStr,
        noreplace: bool,
    ) -> io::Result<()> {
        let flags = if noreplace {
            RenameFlags::NOREPLACE
        } else {
            RenameFlags::empty()
        };
        match rustix::fs::renameat_with(&self.fd, from, &dest.fd, to, flags) {
            Ok(()) => Ok(()),
            Err(e)
                if noreplace
                    && (e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS) =>
            {
                rustix::fs::linkat(&self.fd, from, &dest.fd, to, AtFlags::empty())?;
                Ok(rustix::fs::unlinkat(&self.fd, from, AtFlags::empty())?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a file; "already gone" is success (returns whether it existed).
    pub fn remove(&self, name: &std::ffi::OsStr) -> io::Result<bool> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The entries of this directory (not `.` and `..`), each with its type as
    /// `lstat` sees it: symlinks are reported as such, never followed.
    pub fn entries(&self) -> io::Result<Vec<(std::ffi::OsString, rustix::fs::FileType)>> {
        let fd = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name).to_os_string();
            let kind = match entry.file_type() {
                rustix::fs::FileType::Unknown => {
                    rustix::fs::FileType::from_raw_mode(self.stat(&name)?.st_mode)
                }
                k => k,
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    /// Opens the subdirectory `name` of this directory, never through a symlink.
    pub fn open_subdir(&self, name: &std::ffi::OsStr) -> io::Result<Dir> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Makes this directory's entries durable.
    pub fn fsync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }

    /// Makes everything written to this directory's filesystem durable: one call for
    /// a whole batch of deliveries (group commit) instead of two fsyncs per file.
    pub fn syncfs(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&self.fd)?)
    }
}
