//! Small filesystem operations the pipeline steps share: Shuttle's temp names, opening
//! without following symlinks, atomic no-replace renames, directory fsync, free space.

use std::fs::{File, OpenOptions};
use std::io;
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

/// The temp path for file `id` next to `final_path`; deterministic so that recovery
/// can find it from the journal alone.
pub fn temp_path_for(final_path: &Path, id: i64) -> PathBuf {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    dir.join(format!("{TEMP_PREFIX}{id}"))
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

/// Bytes → MiB for messages (DESIGN: MB means MiB).
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
}
