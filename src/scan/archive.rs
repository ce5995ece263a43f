//! Archive inspection: Shuttle's own judgement of whether the engines can scan an
//! archive whole, independent of what clamd answers.
//!
//! clamd skips silently what exceeds its limits inside an archive (a member above
//! `MaxFileSize`, nesting beyond `MaxRecursion`, entries beyond `MaxFiles`, expanded
//! bytes beyond `MaxScanSize`) and cannot look into encrypted members, yet answers
//! `OK` unless `AlertExceedsMax` is on — and even then not for every case. So before a
//! quarantine copy is scanned, its headers and directories are read here, for zip,
//! gzip and tar and any nesting of them, with the `zip`, `flate2` and `tar` crates:
//!
//! - a zip's central directory gives each member's size and encryption flag without
//!   decompressing it; a member is decompressed only as far as needed to see whether
//!   it is itself an archive (its first 512 bytes), and then walked as a stream;
//! - gzip and tar are walked as streams (decompressed through, never written to disk),
//!   counting every expanded byte;
//! - memory stays bounded: a nested zip is held in memory only up to
//!   [`NESTED_ZIP_IN_MEMORY`] (a zip needs its central directory at the end), larger
//!   ones are read entry by entry from their local headers.
//!
//! Any of: a member larger than the per-file limit, nesting as deep as the recursion
//! limit, more entries than the file limit, more expanded bytes than the scan limit,
//! an encrypted member (with `block_encrypted_archives`) or an archive that cannot be
//! read makes the file unscannable. Other archive formats clamd unpacks (7z, RAR, CAB,
//! bzip2, xz, ARJ, cpio) are not walked: they are accepted only when clamd is known to
//! report limit hits (`AlertExceedsMax yes` read from its configuration).

use std::io::{self, Cursor, Read, Seek};

/// A nested zip up to this size is read in memory through its central directory.
pub const NESTED_ZIP_IN_MEMORY: u64 = 64 << 20;
/// How much of a stream is looked at to recognise an archive format.
/// How many leading bytes decide whether a file is an archive.
pub const PEEK: usize = 512;

/// The limits an archive must stay within (0: no limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveLimits {
    pub max_file_size: u64,
    pub max_scan_size: u64,
    pub max_recursion: u64,
    pub max_files: u64,
    pub block_encrypted: bool,
    /// The engine is known to report limit hits itself: formats Shuttle does not walk
    /// are left to it.
    pub engine_reports_limits: bool,
}

/// What inspection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Not an archive Shuttle recognises.
    NotArchive,
    /// An archive within every limit.
    WithinLimits,
    /// An archive with encrypted members, allowed (`block_encrypted_archives = false`):
    /// their contents are not scanned.
    EncryptedAllowed,
    /// The engines cannot scan it whole; the reason.
    Unscannable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Zip,
    Gzip,
    Tar,
    /// Unpacked by clamd, not walked by Shuttle.
    Other(&'static str),
}

/// Whether a file starting with `head` (at least [`PEEK`] bytes, or the whole file)
/// is a format Shuttle inspects or must refuse: the same test [`inspect`] starts with.
pub fn looks_like_archive(head: &[u8]) -> bool {
    detect(&head[..head.len().min(PEEK)]).is_some()
}

fn detect(head: &[u8]) -> Option<Format> {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"PK\x03\x04") || starts(b"PK\x05\x06") || starts(b"PK\x07\x08") {
        Some(Format::Zip)
    } else if starts(&[0x1f, 0x8b]) {
        Some(Format::Gzip)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Some(Format::Tar)
    } else if starts(b"7z\xBC\xAF\x27\x1C") {
        Some(Format::Other("7z"))
    } else if starts(b"Rar!\x1a\x07") {
        Some(Format::Other("RAR"))
    } else if starts(b"MSCF") {
        Some(Format::Other("CAB"))
    } else if starts(b"BZh") && head.len() > 3 && head[3].is_ascii_digit() {
        Some(Format::Other("bzip2"))
    } else if starts(b"\xFD7zXZ\x00") {
        Some(Format::Other("xz"))
    } else if starts(&[0x60, 0xEA]) {
        Some(Format::Other("ARJ"))
    } else if starts(b"070701") || starts(b"070707") || starts(b"070702") {
        Some(Format::Other("cpio"))
    } else {
        None
    }
}

/// Why inspection stopped early.
struct Stop(String);

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        // The counting reader reports an exceeded scan size as an error.
        if e.kind() == io::ErrorKind::FileTooLarge {
            return Stop(e.to_string());
        }
        Stop(format!("archive cannot be read: {e}"))
    }
}

struct Walk<'a> {
    l: &'a ArchiveLimits,
    files: u64,
    expanded: u64,
    encrypted: bool,
}

/// Inspects the file `f` (a quarantine copy, read from its start).
pub fn inspect(f: &mut std::fs::File, l: &ArchiveLimits) -> io::Result<Finding> {
    f.rewind()?;
    let mut head = Vec::with_capacity(PEEK);
    (&mut *f).take(PEEK as u64).read_to_end(&mut head)?;
    f.rewind()?;
    let Some(format) = detect(&head) else {
        return Ok(Finding::NotArchive);
    };
    let mut w = Walk {
        l,
        files: 0,
        expanded: 0,
        encrypted: false,
    };
    let walked = match format {
        Format::Zip => w.zip_seekable(f, 1),
        other => w.stream(f as &mut dyn Read, other, 1),
    };
    Ok(match walked {
        Err(Stop(why)) => Finding::Unscannable(why),
        Ok(()) if w.encrypted => Finding::EncryptedAllowed,
        Ok(()) => Finding::WithinLimits,
    })
}

fn size_label(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / 1_048_576.0)
    } else {
        format!("{b} bytes")
    }
}

impl Walk<'_> {
    /// Entering an archive at nesting `depth` (the file itself is 1).
    fn enter(&self, depth: u64) -> Result<(), Stop> {
        let max = self.l.max_recursion;
        if max > 0 && depth >= max {
            return Err(Stop(format!(
                "archive recursion limit: archives nested {depth} deep, MaxRecursion is {max}"
            )));
        }
        Ok(())
    }

    fn member(&mut self, name: &str, size: u64) -> Result<(), Stop> {
        self.files += 1;
        let l = self.l;
        if l.max_files > 0 && self.files > l.max_files {
            return Err(Stop(format!(
                "archive has more than MaxFiles {} entries",
                l.max_files
            )));
        }
        if l.max_file_size > 0 && size > l.max_file_size {
            return Err(Stop(format!(
                "archive member {name:?} ({}) exceeds MaxFileSize {}",
                size_label(size),
                size_label(l.max_file_size)
            )));
        }
        Ok(())
    }

    fn encrypted_member(&mut self, name: &str) -> Result<(), Stop> {
        if self.l.block_encrypted {
            return Err(Stop(format!("encrypted archive (member {name:?})")));
        }
        self.encrypted = true;
        Ok(())
    }

    /// What is left of the scan size.
    fn budget(&self) -> u64 {
        match self.l.max_scan_size {
            0 => u64::MAX,
            max => max.saturating_sub(self.expanded),
        }
    }

    fn scan_limit(&self) -> Result<(), Stop> {
        let max = self.l.max_scan_size;
        if max > 0 && self.expanded > max {
            return Err(Stop(format!(
                "archive expands beyond MaxScanSize {}",
                size_label(max)
            )));
        }
        Ok(())
    }

    /// A zip read through its central directory.
    fn zip_seekable<R: Read + Seek>(&mut self, r: R, depth: u64) -> Result<(), Stop> {
        self.enter(depth)?;
        let mut z = zip::ZipArchive::new(r)
            .map_err(|e| Stop(format!("zip archive cannot be read: {e}")))?;
        let mut declared: u64 = 0;
        for i in 0..z.len() {
            let (name, size, encrypted, dir) = {
                let m = z
                    .by_index_raw(i)
                    .map_err(|e| Stop(format!("zip archive cannot be read: {e}")))?;
                (
                    m.name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into()),
                    m.size(),
                    m.encrypted(),
                    m.is_dir(),
                )
            };
            if dir {
                continue;
            }
            self.member(&name, size)?;
            declared = declared.saturating_add(size);
            let max = self.l.max_scan_size;
            if max > 0 && self.expanded.saturating_add(declared) > max {
                return Err(Stop(format!(
                    "archive expands beyond MaxScanSize {}",
                    size_label(max)
                )));
            }
            if encrypted {
                self.encrypted_member(&name)?;
                continue;
            }
            let mut m = z
                .by_index(i)
                .map_err(|e| Stop(format!("zip member {name:?} cannot be read: {e}")))?;
            self.nested(&mut m, depth)?;
        }
        self.expanded = self.expanded.saturating_add(declared);
        self.scan_limit()
    }

    /// A zip read entry by entry from its local headers (too large to hold).
    fn zip_stream(&mut self, mut r: &mut dyn Read, depth: u64) -> Result<(), Stop> {
        self.enter(depth)?;
        loop {
            let entry = zip::read::read_zipfile_from_stream(&mut r)
                .map_err(|e| Stop(format!("nested zip archive cannot be read: {e}")))?;
            let Some(m) = entry else { break };
            if m.is_dir() {
                continue;
            }
            let name = m
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            self.member(&name, m.size())?;
            if m.encrypted() {
                self.encrypted_member(&name)?;
                continue;
            }
            let mut m = m;
            let mut counted = Counting {
                inner: &mut m as &mut dyn Read,
                walk_expanded: 0,
                budget: self.budget(),
            };
            self.nested_counted(&mut counted, &name, depth)?;
        }
        self.scan_limit()
    }

    /// A member's bytes: walked if they are an archive, and counted toward the
    /// expanded size only when the directory did not already declare them (streams).
    fn nested(&mut self, m: &mut dyn Read, depth: u64) -> Result<(), Stop> {
        let mut head = Vec::with_capacity(PEEK);
        (&mut *m).take(PEEK as u64).read_to_end(&mut head)?;
        let Some(format) = detect(&head) else {
            return Ok(());
        };
        let mut rest = Cursor::new(head).chain(m);
        self.walk_format(&mut rest, format, depth + 1)
    }

    fn nested_counted(
        &mut self,
        m: &mut Counting<&mut dyn Read>,
        _name: &str,
        depth: u64,
    ) -> Result<(), Stop> {
        let mut head = Vec::with_capacity(PEEK);
        (&mut *m).take(PEEK as u64).read_to_end(&mut head)?;
        let format = detect(&head);
        let walked = match format {
            None => Ok(()),
            Some(format) => {
                let mut rest = Cursor::new(std::mem::take(&mut head)).chain(&mut *m);
                self.walk_format(&mut rest, format, depth + 1)
            }
        };
        walked?;
        // Whatever was not read yet still counts toward the expanded size.
        io::copy(&mut *m, &mut io::sink())?;
        self.expanded = self.expanded.saturating_add(m.walk_expanded);
        self.scan_limit()
    }

    fn walk_format(&mut self, r: &mut dyn Read, format: Format, depth: u64) -> Result<(), Stop> {
        match format {
            Format::Zip => {
                // A zip's directory is at its end: hold a small one in memory, read a
                // large one entry by entry.
                let mut buf = Vec::new();
                (&mut *r)
                    .take(NESTED_ZIP_IN_MEMORY + 1)
                    .read_to_end(&mut buf)?;
                if buf.len() as u64 <= NESTED_ZIP_IN_MEMORY {
                    self.zip_seekable(Cursor::new(buf), depth)
                } else {
                    self.zip_stream(&mut Cursor::new(buf).chain(r), depth)
                }
            }
            other => self.stream(r, other, depth),
        }
    }

    /// gzip, tar, or a format clamd unpacks and Shuttle does not.
    fn stream(&mut self, r: &mut dyn Read, format: Format, depth: u64) -> Result<(), Stop> {
        match format {
            Format::Zip => self.walk_format(r, format, depth),
            Format::Gzip => {
                self.enter(depth)?;
                let mut gz = flate2::read::MultiGzDecoder::new(r);
                let mut inner = Counting {
                    inner: &mut gz as &mut dyn Read,
                    walk_expanded: 0,
                    budget: self.budget(),
                };
                self.member("(gzip content)", 0)?;
                self.nested_counted(&mut inner, "(gzip content)", depth)?;
                let max = self.l.max_file_size;
                if max > 0 && inner.walk_expanded > max {
                    return Err(Stop(format!(
                        "gzip content ({}) exceeds MaxFileSize {}",
                        size_label(inner.walk_expanded),
                        size_label(max)
                    )));
                }
                Ok(())
            }
            Format::Tar => {
                self.enter(depth)?;
                let mut t = tar::Archive::new(r);
                let entries = t
                    .entries()
                    .map_err(|e| Stop(format!("tar archive cannot be read: {e}")))?;
                for entry in entries {
                    let mut e =
                        entry.map_err(|e| Stop(format!("tar archive cannot be read: {e}")))?;
                    if !e.header().entry_type().is_file() {
                        continue;
                    }
                    let name = e
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "?".into());
                    let size = e.size();
                    self.member(&name, size)?;
                    let mut c = Counting {
                        inner: &mut e as &mut dyn Read,
                        walk_expanded: 0,
                        budget: self.budget(),
                    };
                    self.nested_counted(&mut c, &name, depth)?;
                }
                Ok(())
            }
            Format::Other(name) => {
                if self.l.engine_reports_limits {
                    Ok(())
                } else {
                    Err(Stop(format!(
                        "{name} archive: Shuttle cannot check it against the scanner's limits, and clamd is not known to report limit hits (AlertExceedsMax)"
                    )))
                }
            }
        }
    }
}

/// Counts the bytes read through it, and stops with an error past `budget` (what is
/// left of the scan size), so an archive bomb is never expanded further than that.
struct Counting<R> {
    inner: R,
    walk_expanded: u64,
    budget: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.walk_expanded += n as u64;
        if self.walk_expanded > self.budget {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "archive expands beyond MaxScanSize",
            ));
        }
        Ok(n)
    }
}
