//! Quarantine (docs/design.md §1.7): copy a source file into `quarantine_path/<relative path>`,
//! computing its SHA-256 in the same pass.
//!
//! The copy is written under its own name, not a temp name renamed afterwards: the
//! file's journal row is durable before the copy exists, and recovery removes the
//! quarantine copy of every file its run did not finish, complete or not. Only the
//! [`Quarantined`] returned by [`copy_in`] says a copy is whole. One rename per file
//! fewer is measurable on small files.
//!
//! The copy is owner-only (0600) while it is unscanned; the source's permission bits
//! (without setuid/setgid/sticky, without world bits) are applied when it is
//! delivered. If the source changes while it is being copied the copy is dropped.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fsx;

/// The identity and state of a file at one moment, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ctime_ns: m
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.ctime_nsec()),
        }
    }

    /// Same file, same content as far as the inode tells (ctime catches any write,
    /// even one that restores the mtime).
    pub fn unchanged(&self, other: &Stamp) -> bool {
        self == other
    }
}

/// A finished quarantine copy.
#[derive(Debug)]
pub struct Quarantined {
    /// Where the copy is (for messages and path-based scanners).
    pub path: PathBuf,
    /// The copy's directory, opened beneath the quarantine root when the copy was
    /// made, and the copy's path beneath that root: every reopen, rename and removal
    /// goes through this handle, never through a symlink.
    pub dir: std::sync::Arc<fsx::Dir>,
    pub rel: PathBuf,
    /// SHA-256 of the bytes read from the source and written here, lowercase hex.
    pub sha256: String,
    pub size: u64,
    /// The copy itself (its ctime changes with later chmod; dev/ino/size/mtime do not).
    pub copy: Stamp,
    /// The source as it was while being copied.
    pub source: Stamp,
    /// Permission bits to give the delivered file.
    pub mode: u32,
    /// The copy's first bytes look like an archive (`scan::archive::looks_like_archive`),
    /// judged from the copy buffer, so that other files are not opened again to be
    /// inspected.
    pub maybe_archive: bool,
    /// The read-only descriptor the last scan was given ([`Quarantined::open_for_scan`]),
    /// kept for delivery ([`Quarantined::open_scanned`]) so that the copy is not
    /// opened a third time.
    scanned: std::sync::Mutex<Option<File>>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// The source changed since discovery or during the copy: skip it this run.
    #[error("source changed while being copied ({0}); left for the next run")]
    Changed(&'static str),
    #[error("source is no longer a regular file")]
    NotRegular,
    /// Some process has the source open for writing (or opened it during the copy).
    #[error(
        "source is open for writing in another process{}{writers}; left for a later run",
        during(.during_copy)
    )]
    OpenForWriting {
        /// Opened after the copy began (the lease broke), not before.
        during_copy: bool,
        writers: crate::lease::Writers,
    },
    /// No lease could be had and `/proc` does not show every process: nothing can
    /// tell whether the source is still being written.
    #[error(
        "cannot tell whether another process is writing the source (no read lease: {0}; this user cannot see other users' open files): left in place. Give Shuttle CAP_LEASE, or run it as the files' owner"
    )]
    CannotTell(String),
    #[error(
        "source has {0} hard links, one may lie outside the drop directory: left in place (allow_hard_links = true takes such files)"
    )]
    HardLinked(u64),
    #[error("source vanished before it could be copied")]
    Vanished,
    #[error("disk full writing quarantine copy {path}: {source}")]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl QuarantineError {
    /// [`QuarantineError::OpenForWriting`] for `src` (its lease refused, or broken
    /// during the copy): the lease given up, the writers found now named.
    fn open_for_writing(src: &File, during_copy: bool) -> QuarantineError {
        QuarantineError::OpenForWriting {
            during_copy,
            writers: crate::lease::Writers::of(src),
        }
    }
}

fn during(during_copy: &bool) -> &'static str {
    if *during_copy {
        " (opened during the copy)"
    } else {
        ""
    }
}

fsx::impl_io_error!(QuarantineError);

/// Permission bits a delivered file may carry: no setuid/setgid/sticky, no world bits
/// (docs/design.md §1.4, umask 007).
pub fn delivered_mode(source_mode: u32) -> u32 {
    source_mode & 0o770
}

/// What a source must pass before it is copied.
#[derive(Debug, Clone, Copy)]
pub struct SourceChecks {
    pub writers: crate::lease::WriterCheck,
    pub allow_hard_links: bool,
}

/// The quarantine directory of the last file one worker copied, kept open for its next
/// file: files come in discovery order, so most share their directory with the file
/// before, and opening it again (beneath the quarantine root) was two system calls a
/// file. The quarantine is Shuttle's own; its empty directories are removed only after
/// a run's or watch pass's workers are done (`cleanup::empty_quarantine`), and a copy
/// that cannot be created in a cached directory (removed meanwhile by hand) is tried
/// again in one opened afresh.
#[derive(Default)]
pub struct DirCache {
    last: Option<(PathBuf, std::sync::Arc<fsx::Dir>)>,
}

impl DirCache {
    /// `rel_dir` beneath `quarantine`, created if missing; `fresh` opens it again.
    fn get(
        &mut self,
        quarantine: &fsx::Beneath,
        rel_dir: &Path,
        fresh: bool,
    ) -> io::Result<std::sync::Arc<fsx::Dir>> {
        if !fresh
            && let Some((p, d)) = &self.last
            && p == rel_dir
        {
            return Ok(d.clone());
        }
        let d = std::sync::Arc::new(quarantine.create_dir_all(rel_dir, false)?);
        self.last = Some((rel_dir.to_path_buf(), d.clone()));
        Ok(d)
    }
}

/// Copies `source_root/rel` to `quarantine_root/rel`.
/// `expected` is the size and mtime discovery saw.
///
/// The source is read under a read lease (see [`crate::lease`]): a source some
/// process holds open for writing is not copied, and one that any process opens for
/// writing during the copy is given up. Where no lease can be had, discovery's
/// `/proc` scan decided, if it saw every process ([`WriterCheck::LeaseOrProc`]);
/// otherwise the file is left alone.
///
/// [`WriterCheck::LeaseOrProc`]: crate::lease::WriterCheck::LeaseOrProc
pub fn copy_in(
    sources: &fsx::Beneath,
    quarantine: &std::sync::Arc<fsx::Beneath>,
    rel: &Path,
    expected: (u64, i64),
    checks: SourceChecks,
    buf: &mut [u8],
    dirs: &mut DirCache,
) -> Result<Quarantined, QuarantineError> {
    let src_path = sources.path().join(rel);
    let (parent, name) = split(rel)?;
    let mut src = match sources.open_read(rel) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(QuarantineError::Vanished),
        // A symlink swapped in for the file or one of its directories.
        Err(e) if fsx::is_symlink_refusal(&e) => return Err(QuarantineError::NotRegular),
        Err(e) => return Err(fsx::failed("open source", &src_path)(e)),
    };
    let before = src
        .metadata()
        .map_err(fsx::failed("stat source", &src_path))?;
    if !before.is_file() {
        return Err(QuarantineError::NotRegular);
    }
    let source_mode = before.mode();
    if !checks.allow_hard_links && before.nlink() > 1 {
        return Err(QuarantineError::HardLinked(before.nlink()));
    }
    let leased = match crate::lease::take(&src) {
        crate::lease::Taken::Held => true,
        crate::lease::Taken::Writer => return Err(QuarantineError::open_for_writing(&src, false)),
        crate::lease::Taken::Unavailable(e) => match checks.writers {
            crate::lease::WriterCheck::LeaseOrProc => false,
            crate::lease::WriterCheck::LeaseOnly => {
                return Err(QuarantineError::CannotTell(e.to_string()));
            }
        },
    };
    let before = Stamp::of(&before);
    if (before.size, before.mtime_ns) != expected {
        return Err(QuarantineError::Changed(
            "size or mtime differs from discovery",
        ));
    }

    let final_path = quarantine.path().join(rel);
    let dir_failed = |e| {
        fsx::failed(
            "create quarantine directory",
            final_path.parent().unwrap_or(quarantine.path()),
        )(e)
    };
    let mut qdir = dirs.get(quarantine, parent, false).map_err(&dir_failed)?;
    // A copy of this file left by a killed run is replaced (removed only when it is
    // there, not on the chance: one system call fewer per file).
    let create = |qdir: &fsx::Dir| match qdir.create_new(name) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = qdir.remove(name);
            qdir.create_new(name)
        }
        other => other,
    };
    let mut out = match create(&qdir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            qdir = dirs.get(quarantine, parent, true).map_err(&dir_failed)?;
            create(&qdir)
        }
        other => other,
    }
    .map_err(fsx::failed("create", &final_path))?;
    crate::crashpoint::here("quarantine: copy created");

    let copied = copy_hashing(
        &mut src,
        &mut out,
        leased,
        before.size,
        buf,
        &src_path,
        &final_path,
    );
    let result = copied.and_then(
        |Copied {
             sha256,
             n,
             maybe_archive,
         }| {
            let after = src
                .metadata()
                .map_err(fsx::failed("stat source", &src_path))?;
            if !Stamp::of(&after).unchanged(&before) || n != before.size {
                return Err(QuarantineError::Changed(
                    "source was modified during the copy",
                ));
            }
            if leased && !crate::lease::still_held(&src) {
                return Err(QuarantineError::open_for_writing(&src, true));
            }
            let mtime = rustix::fs::Timespec {
                tv_sec: before.mtime_ns.div_euclid(1_000_000_000),
                tv_nsec: before.mtime_ns.rem_euclid(1_000_000_000) as _,
            };
            let times = rustix::fs::Timestamps {
                last_access: mtime,
                last_modification: mtime,
            };
            rustix::fs::futimens(&out, &times)
                .map_err(|e| fsx::failed("set mtime of", &final_path)(e.into()))?;
            let copy = Stamp::of(&out.metadata().map_err(fsx::failed("stat", &final_path))?);
            crate::crashpoint::here("quarantine: copied");
            Ok(Quarantined {
                path: final_path.clone(),
                dir: qdir.clone(),
                rel: rel.to_path_buf(),
                sha256,
                size: n,
                copy,
                source: before,
                mode: delivered_mode(source_mode),
                maybe_archive,
                scanned: Default::default(),
            })
        },
    );
    if result.is_err() {
        drop(out);
        let _ = qdir.remove(name);
    }
    result
}

/// A relative file path's directory and name.
fn split(rel: &Path) -> Result<(&Path, &std::ffi::OsStr), QuarantineError> {
    match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(QuarantineError::NotRegular),
    }
}

/// What one copy pass learned about the bytes.
struct Copied {
    sha256: String,
    n: u64,
    maybe_archive: bool,
}

/// Copies `src` to `out` ([`fsx::copy_hashing`]), reading up to `size` (what its
/// `fstat` said; the caller compares the one after), returning the hex SHA-256 and the
/// byte count. With `leased`, the lease on `src` is checked after every read but the
/// first (the caller checks it once more after the last): a writer that opens the
/// file meanwhile waits for it, so a long copy is given up at once.
fn copy_hashing(
    src: &mut File,
    out: &mut File,
    leased: bool,
    size: u64,
    buf: &mut [u8],
    src_path: &Path,
    out_path: &Path,
) -> Result<Copied, QuarantineError> {
    // Judged from the first read; a first read too short to tell counts as maybe.
    let mut maybe_archive = false;
    let copied = fsx::copy_hashing(src, out, buf, Some(size), |src, chunk, n| {
        let got = chunk.len() as u64;
        if leased && n != got && !crate::lease::still_held(src) {
            return Err(QuarantineError::open_for_writing(src, true));
        }
        if n == got {
            maybe_archive = crate::scan::archive::looks_like_archive(chunk);
            crate::crashpoint::here("quarantine: mid-copy");
        } else if (n - got) < crate::scan::archive::PEEK as u64 {
            maybe_archive = true;
        }
        Ok(())
    });
    match copied {
        Ok(h) => Ok(Copied {
            sha256: h.sha256,
            n: h.bytes,
            maybe_archive,
        }),
        Err(fsx::CopyFailure::Read(e)) => Err(fsx::failed("read source", src_path)(e)),
        Err(fsx::CopyFailure::Write(e)) => Err(fsx::failed("write", out_path)(e)),
        Err(fsx::CopyFailure::Stopped(e)) => Err(e),
    }
}

/// What removing a source needs of its quarantined file once the copy is disposed of:
/// the source's identity as it was copied and the hash of the bytes scanned. It holds
/// no open handle, so files waiting for their batch hold no descriptors.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub rel: PathBuf,
    pub source: Stamp,
    pub sha256: String,
}

impl Quarantined {
    /// What settling keeps of this file ([`SourceRecord`]).
    pub fn source_record(&self) -> SourceRecord {
        SourceRecord {
            rel: self.rel.clone(),
            source: self.source,
            sha256: self.sha256.clone(),
        }
    }

    /// The copy's name in [`Quarantined::dir`] (a `Quarantined` is only made for a
    /// path with a file name).
    pub fn name(&self) -> &std::ffi::OsStr {
        self.rel.file_name().unwrap_or_default()
    }

    /// Reopens the copy for reading and checks it is still the file written (same
    /// inode, size and mtime): what is scanned and delivered is what was hashed.
    pub fn reopen(&self) -> io::Result<File> {
        let f = self.dir.open_read(self.name())?;
        let now = Stamp::of(&f.metadata()?);
        self.check((now.dev, now.ino, now.size, now.mtime_ns))?;
        Ok(f)
    }

    /// [`Quarantined::reopen`] for a scan, keeping a duplicate of the descriptor for
    /// [`Quarantined::open_scanned`] (the last one, when a scan is tried again).
    pub fn open_for_scan(&self) -> io::Result<File> {
        let f = self.reopen()?;
        let kept = f.try_clone()?;
        *self.scanned.lock().unwrap_or_else(|p| p.into_inner()) = Some(kept);
        Ok(f)
    }

    /// The copy for delivery: the descriptor the scan was given, once the copy's name
    /// is checked to still be that inode, with the same size and mtime (an `lstat`,
    /// the check [`Quarantined::reopen`] makes, without opening the file again). Its
    /// offset is wherever the scan left it. Without a kept descriptor, opened afresh.
    pub fn open_scanned(&self) -> io::Result<File> {
        let kept = self
            .scanned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(f) = kept else {
            return self.reopen();
        };
        let now = self.dir.meta(self.name())?;
        self.check((now.dev, now.ino, now.size, now.mtime_ns))?;
        Ok(f)
    }

    /// Is `(dev, ino, size, mtime_ns)` still the copy written: same inode, size and
    /// mtime? (Its ctime changes with the chmod of delivery.)
    fn check(&self, now: (u64, u64, u64, i64)) -> io::Result<()> {
        let c = &self.copy;
        if now != (c.dev, c.ino, c.size, c.mtime_ns) {
            return Err(io::Error::other("quarantine copy was replaced or modified"));
        }
        Ok(())
    }

    /// `lstat` of the copy's name, beneath the quarantine's handle (an engine may
    /// have removed the copy: `NotFound`).
    pub fn stat(&self) -> io::Result<fsx::Meta> {
        self.dir.meta(self.name())
    }

    /// Removes the copy, through its directory's handle: a symlink planted in its
    /// place is never followed (returns whether the copy existed).
    pub fn remove(&self) -> io::Result<bool> {
        self.dir.remove(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn copy(
        src: &fsx::Beneath,
        q: &std::sync::Arc<fsx::Beneath>,
        rel: &str,
        dirs: &mut DirCache,
    ) -> Result<Quarantined, QuarantineError> {
        let m = std::fs::metadata(src.path().join(rel)).unwrap();
        let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        let checks = SourceChecks {
            writers: crate::lease::WriterCheck::LeaseOrProc,
            allow_hard_links: false,
        };
        let mut buf = vec![0u8; 1 << 16];
        copy_in(
            src,
            q,
            Path::new(rel),
            (m.len(), mtime),
            checks,
            &mut buf,
            dirs,
        )
    }

    /// Files of one directory share the worker's open quarantine directory; one that
    /// vanished meanwhile (removed by hand) is made again, and the copy still lands.
    #[test]
    fn a_worker_keeps_its_quarantine_directory_and_remakes_a_removed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, qroot) = (tmp.path().join("src"), tmp.path().join("q"));
        std::fs::create_dir_all(s.join("d")).unwrap();
        std::fs::create_dir_all(&qroot).unwrap();
        for (name, bytes) in [("a", b"first" as &[u8]), ("b", b"second"), ("c", b"third")] {
            std::fs::write(s.join("d").join(name), bytes).unwrap();
        }
        let src = fsx::Beneath::open(&s).unwrap();
        let q = std::sync::Arc::new(fsx::Beneath::open(&qroot).unwrap());
        let mut dirs = DirCache::default();
        let a = copy(&src, &q, "d/a", &mut dirs).unwrap();
        let b = copy(&src, &q, "d/b", &mut dirs).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.dir, &b.dir), "one open directory");
        assert_eq!(std::fs::read(qroot.join("d/b")).unwrap(), b"second");
        drop((a, b));
        std::fs::remove_dir_all(qroot.join("d")).unwrap();
        let c = copy(&src, &q, "d/c", &mut dirs).unwrap();
        assert_eq!(std::fs::read(qroot.join("d/c")).unwrap(), b"third");
        use sha2::Digest;
        assert_eq!(c.sha256, hex::encode(sha2::Sha256::digest(b"third")));
    }
}
