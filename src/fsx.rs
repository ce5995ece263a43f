//! The filesystem layer: every file below the source, quarantine, destination and hazard
//! archive is reached beneath a directory handle ([`Beneath`], [`Dir`]), never by a
//! path that a planted symlink could redirect. Here too are the few operations the
//! steps share, each once: Shuttle's temp names, the directory walk ([`walk`]), the
//! hash-while-copy ([`copy_hashing`]), the atomic file write that fsyncs its directory
//! ([`write_atomic`]), free space, and the classification of I/O failures
//! ([`classify`], [`failed`]).
//!
//! The walk is Shuttle's own rather than `walkdir`'s: `walkdir` opens every directory
//! by path, which is what the handles exist to avoid.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, OFlags, RenameFlags};
use sha2::{Digest, Sha256};

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

/// The temp path for file `id` next to `final_path` (relative to the same root);
/// deterministic so that recovery can find it from the journal alone.
pub fn temp_path_for(final_path: &Path, id: i64) -> PathBuf {
    let dir = final_path.parent().unwrap_or(Path::new("."));
    dir.join(temp_name(id))
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

/// A volume for people: bytes below 1 KB, KB below 1 MB, MB below 1 GB, then GB (KB,
/// MB and GB mean KiB, MiB and GiB, as everywhere in Shuttle's messages), so that a few
/// small files never read as "0.0 MB" nor a disk's free space as "63002.7 MB".
pub fn volume(bytes: u64) -> String {
    let kb = bytes as f64 / 1_024.0;
    let mb = mib(bytes);
    if bytes < 1_024 {
        format!("{bytes} bytes")
    } else if kb < 999.95 {
        format!("{kb:.1} KB")
    } else if mb < 999.95 {
        format!("{mb:.1} MB")
    } else {
        format!("{:.1} GB", mb / 1_024.0)
    }
}

/// What an I/O failure means to Shuttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// `ENOSPC`/`EDQUOT`: a full disk or quota; it stops the run.
    DiskFull,
    /// `ELOOP`/`ENOTDIR`/`EXDEV` from a handle's resolution: a symlink (or a
    /// non-directory) stood where a file or directory was expected, and was not
    /// followed.
    SymlinkRefused,
    /// `EXDEV` from a rename: two different mounts.
    CrossDevice,
    NotFound,
    Other,
}

/// The one classifier of I/O failures. `EXDEV` is both a refused resolution
/// (`openat2` with `RESOLVE_BENEATH`) and a cross-device rename: `rename` says which.
pub fn classify(e: &io::Error, rename: bool) -> IoKind {
    use rustix::io::Errno;
    let Some(code) = e.raw_os_error() else {
        return match e.kind() {
            io::ErrorKind::NotFound => IoKind::NotFound,
            _ => IoKind::Other,
        };
    };
    let is = |x: Errno| x.raw_os_error() == code;
    if is(Errno::NOSPC) || is(Errno::DQUOT) {
        IoKind::DiskFull
    } else if is(Errno::XDEV) && rename {
        IoKind::CrossDevice
    } else if is(Errno::LOOP) || is(Errno::NOTDIR) || is(Errno::XDEV) {
        IoKind::SymlinkRefused
    } else if is(Errno::NOENT) {
        IoKind::NotFound
    } else {
        IoKind::Other
    }
}

/// Is this I/O error a full disk or quota?
pub fn is_disk_full(e: &io::Error) -> bool {
    classify(e, false) == IoKind::DiskFull
}

/// Was a symlink (or a non-directory) refused while resolving beneath a handle?
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    classify(e, false) == IoKind::SymlinkRefused
}

/// An error type that tells a full disk from other I/O failures; [`failed`] builds it.
pub trait IoError: Sized {
    fn disk_full(path: PathBuf, source: io::Error) -> Self;
    fn io(action: &'static str, path: PathBuf, source: io::Error) -> Self;
}

/// Implements [`IoError`] for an error enum with the variants
/// `DiskFull { path, source }` and `Io { action, path, source }`.
macro_rules! impl_io_error {
    ($t:ident) => {
        impl $crate::fsx::IoError for $t {
            fn disk_full(path: std::path::PathBuf, source: std::io::Error) -> Self {
                $t::DiskFull { path, source }
            }
            fn io(action: &'static str, path: std::path::PathBuf, source: std::io::Error) -> Self {
                $t::Io {
                    action,
                    path,
                    source,
                }
            }
        }
    };
}
pub(crate) use impl_io_error;

/// `map_err(failed("write", &path))`: the I/O failure of `action` on `path`, a full
/// disk told apart (quarantine, delivery and the hazard archive all stop the run on
/// it).
pub fn failed<'a, E: IoError>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> E + 'a {
    move |source| {
        if is_disk_full(&source) {
            E::disk_full(path.to_path_buf(), source)
        } else {
            E::io(action, path.to_path_buf(), source)
        }
    }
}

/// The SHA-256 (lowercase hex) and length of what [`copy_hashing`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub sha256: String,
    pub bytes: u64,
}

/// Why [`copy_hashing`] stopped.
#[derive(Debug)]
pub enum CopyFailure<E> {
    Read(io::Error),
    Write(io::Error),
    /// The per-chunk check said stop.
    Stopped(E),
}

/// The one hash-while-copy: reads `src` to its end, hashing, writing each chunk to
/// `out` (`io::sink()` to only hash), then lets `each` see the source, the chunk and
/// the count so far (it may stop the copy). Used by the quarantine copy, the delivery across
/// filesystems, and every re-hash of a source or copy ([`hash_file`]).
///
/// `size`: what an `fstat` of `src` said just before. The copy then ends once that
/// many bytes are read, without the last `read` that would only return 0 (one system
/// call a file). A caller that gives it must compare a later `fstat` with that one,
/// size included: bytes appended meanwhile are caught there, not here.
pub fn copy_hashing<R: Read, E>(
    src: &mut R,
    out: &mut dyn Write,
    buf: &mut [u8],
    size: Option<u64>,
    mut each: impl FnMut(&R, &[u8], u64) -> Result<(), E>,
) -> Result<Hashed, CopyFailure<E>> {
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    while size != Some(n) || n == 0 {
        let got = match src.read(buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyFailure::Read(e)),
        };
        hasher.update(&buf[..got]);
        out.write_all(&buf[..got]).map_err(CopyFailure::Write)?;
        n += got as u64;
        each(src, &buf[..got], n).map_err(CopyFailure::Stopped)?;
    }
    Ok(Hashed {
        sha256: hex::encode(hasher.finalize()),
        bytes: n,
    })
}

/// SHA-256 of an open file, reading it from its current position to the end (or to
/// `size`, see [`copy_hashing`]).
pub fn hash_file(f: &mut File, buf: &mut [u8], size: Option<u64>) -> io::Result<(String, u64)> {
    match copy_hashing(f, &mut io::sink(), buf, size, |_, _, _| {
        Ok::<(), io::Error>(())
    }) {
        Ok(h) => Ok((h.sha256, h.bytes)),
        Err(CopyFailure::Read(e) | CopyFailure::Write(e) | CopyFailure::Stopped(e)) => Err(e),
    }
}

/// Writes `bytes` to `path` atomically: a temp file beside it (Shuttle's prefix),
/// mode `mode` (0600 when `None`), fsynced, renamed over `path`, and the directory
/// fsynced, so a reader sees the old file or the new one, and a crash keeps one.
/// The one atomic write (report, metrics, ledger; the hazard sidecar takes its name
/// without replacing, see [`Dir::write_new`]).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let (dir, name) = split_path(path)?;
    let dir = Beneath::open(dir)?;
    let temp = format!(
        "{TEMP_PREFIX}{}.{}",
        name.to_string_lossy(),
        std::process::id()
    );
    dir.root()
        .write_new(temp.as_ref(), name, bytes, mode.unwrap_or(0o600), false)
}

/// A path's directory (`.` for a bare name) and file name.
fn split_path(path: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((dir, name))
}

/// What `lstat` says of an entry, in the same types on every platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: rustix::fs::FileType,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// The owner.
    pub uid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Meta {
    /// The kernel's field types differ between architectures; these casts only widen.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    pub fn of(st: &rustix::fs::Stat) -> Meta {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Meta {
            kind: rustix::fs::FileType::from_raw_mode(st.st_mode as _),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
            uid: st.st_uid as u32,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }
}

/// One entry met by [`walk`].
pub struct Entry<'a> {
    /// The directory holding it, open.
    pub dir: &'a Dir,
    /// Its path relative to the walk's root.
    pub rel: PathBuf,
    pub name: std::ffi::OsString,
    /// Its type as `lstat` sees it (a symlink is a symlink, never followed).
    pub kind: rustix::fs::FileType,
}

/// What [`walk`] shows its visitor.
pub enum Step<'a> {
    /// An entry; the visitor returns whether to descend into it (directories only).
    Entry(&'a Entry<'a>),
    /// A directory (relative to the root) that could not be opened or read: skipped.
    Unreadable(&'a Path, io::Error),
}

/// The one directory walk: every entry below `root`, each directory opened beneath
/// its parent's handle without following a symlink (a symlink is an entry of kind
/// symlink, never descended into).
pub fn walk(root: &Dir, mut visit: impl FnMut(Step) -> bool) {
    let mut stack: Vec<(Option<Dir>, PathBuf)> = vec![(None, PathBuf::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let dir = dir.as_ref().unwrap_or(root);
        let entries = match dir.entries() {
            Ok(e) => e,
            Err(e) => {
                visit(Step::Unreadable(&rel_dir, e));
                continue;
            }
        };
        for (name, kind) in entries {
            let entry = Entry {
                dir,
                rel: rel_dir.join(&name),
                name,
                kind,
            };
            if visit(Step::Entry(&entry)) && kind == rustix::fs::FileType::Directory {
                match dir.open_subdir(&entry.name) {
                    Ok(sub) => stack.push((Some(sub), entry.rel)),
                    Err(e) => {
                        visit(Step::Unreadable(&entry.rel, e));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_reads_in_bytes_kb_mb_or_gb_never_as_zero_mb() {
        assert_eq!(volume(0), "0 bytes");
        assert_eq!(volume(1_023), "1023 bytes");
        assert_eq!(volume(2_300), "2.2 KB");
        assert_eq!(volume(1_023_897), "999.9 KB");
        assert_eq!(volume(1_048_575), "1.0 MB");
        assert_eq!(volume(8_110_080), "7.7 MB");
        assert_eq!(volume(1_048_471_142), "999.9 MB");
        assert_eq!(volume(1_048_576_000), "1.0 GB");
        assert_eq!(volume(66_063_729_869), "61.5 GB");
    }

    /// A reader that counts its `read` calls.
    struct Counted<'a>(&'a [u8], usize);

    impl Read for Counted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 += 1;
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_known_size_spares_the_last_read_and_never_hides_bytes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let whole = hex::encode(Sha256::digest(&data));
        let mut buf = vec![0u8; 4096];
        let hash = |size: Option<u64>, buf: &mut [u8]| {
            let mut r = Counted(&data, 0);
            let h = copy_hashing(&mut r, &mut io::sink(), buf, size, |_, _, _| {
                Ok::<(), io::Error>(())
            })
            .unwrap();
            (h.sha256, h.bytes, r.1)
        };
        // To the end: three chunks and the read that returns 0.
        assert_eq!(hash(None, &mut buf), (whole.clone(), 10_000, 4));
        // The size an fstat gave: the same bytes, one read fewer.
        assert_eq!(hash(Some(10_000), &mut buf), (whole.clone(), 10_000, 3));
        // A file that grew after its fstat is read on to its end, unless the old size
        // falls on a chunk boundary: then the caller's second fstat tells (size differs).
        let (h, n, _) = hash(Some(5_000), &mut buf);
        assert_eq!((h, n), (whole, 10_000));
        assert_eq!(hash(Some(8_192), &mut buf).1, 8_192);
    }

    #[test]
    fn rename_noreplace_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "old").unwrap();
        let dir = Beneath::open(d.path()).unwrap();
        let dir = dir.root();
        let err = dir
            .rename_to("a".as_ref(), dir, "b".as_ref(), true)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
    }

    #[test]
    fn open_refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("l")).unwrap();
        let dir = Beneath::open(d.path()).unwrap();
        assert!(dir.root().open_read("l".as_ref()).is_err());
    }

    #[test]
    fn atomic_writes_replace_whole_and_leave_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.json");
        write_atomic(&p, b"one", None).unwrap();
        write_atomic(&p, b"two", Some(0o640)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        let dir = Beneath::open(d.path()).unwrap();
        let err = dir
            .root()
            .write_new(".t".as_ref(), "report.json".as_ref(), b"x", 0o600, true)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn the_walk_sees_everything_below_and_follows_no_symlink() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("a/l")).unwrap();
        let root = Beneath::open(d.path()).unwrap();
        let mut seen = Vec::new();
        walk(root.root(), |s| {
            if let Step::Entry(e) = s {
                seen.push(e.rel.clone());
            }
            true
        });
        seen.sort();
        let want: Vec<PathBuf> = ["a", "a/b", "a/b/f", "a/l"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn io_failures_are_classified_once() {
        use rustix::io::Errno;
        let e = |x: Errno| io::Error::from_raw_os_error(x.raw_os_error());
        assert_eq!(classify(&e(Errno::NOSPC), false), IoKind::DiskFull);
        assert_eq!(classify(&e(Errno::DQUOT), false), IoKind::DiskFull);
        assert_eq!(classify(&e(Errno::LOOP), false), IoKind::SymlinkRefused);
        assert_eq!(classify(&e(Errno::XDEV), false), IoKind::SymlinkRefused);
        assert_eq!(classify(&e(Errno::XDEV), true), IoKind::CrossDevice);
        assert_eq!(classify(&e(Errno::NOENT), false), IoKind::NotFound);
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

    /// `lstat` of an entry as plain numbers (see [`Meta`]).
    pub fn meta(&self, name: &std::ffi::OsStr) -> io::Result<Meta> {
        self.stat(name).map(|st| Meta::of(&st))
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

    /// Removes the empty directory `name` (`rmdir`: refused unless empty).
    pub fn remove_dir(&self, name: &std::ffi::OsStr) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
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

    /// Writes `bytes` under `temp` in this directory (mode `mode`, fsynced), renames
    /// it to `name` (with `noreplace`, never over an existing file: `AlreadyExists`)
    /// and fsyncs the directory. On error the temp file is removed.
    pub fn write_new(
        &self,
        temp: &std::ffi::OsStr,
        name: &std::ffi::OsStr,
        bytes: &[u8],
        mode: u32,
        noreplace: bool,
    ) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let _ = self.remove(temp);
        let written = self.create_new(temp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.sync_all()
        });
        let done = written
            .and_then(|()| self.rename_to(temp, self, name, noreplace))
            .and_then(|()| self.fsync());
        if done.is_err() {
            let _ = self.remove(temp);
        }
        done
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
