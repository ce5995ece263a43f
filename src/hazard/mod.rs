//! Suspect files (docs/design.md §1.9, suspect branch) and the hazard archive.
//!
//! With `hazard_archive_path` set, a suspect file is encrypted to the OpenPGP public
//! key in `hazard_encryption_key_path` as
//! `hazard_archive_path/hazard_<name>_<YYYYMMDDHHMMSS>.gpg`, with a JSON sidecar
//! `<archive>.json` describing it. Only the holder of the private key (an analyst,
//! elsewhere) can open it: nobody on this host opens malware by accident. Without a
//! hazard archive the suspect quarantine copy is simply deleted.
//!
//! Encryption is done in-process with rPGP (pure Rust, no `gpg` binary at run time),
//! streaming: the plaintext is read in chunks and written as partial-length packets,
//! so memory stays flat whatever the file size. The output is what GnuPG 2.2 reads:
//! a v3 PKESK for a v4 key, and a SEIPDv1 (MDC) packet with AES-256.
//!
//! Durability and naming: the archive is written to Shuttle's temp name
//! (`.shuttle-tmp.<journal id>`, which recovery removes after a crash), fsynced, and
//! only then renamed to its final name with `rename_noreplace`, taking the first free
//! counter suffix (`_2`, `_3`, …): two suspects with the same name in the same second
//! never overwrite each other (the earlier implementation lost files exactly there).

pub mod key;

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pgp::composed::MessageBuilder;
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::fsx;
use crate::states::ArchiveEntry;
pub use key::{KeyError, Recipient};

/// Identifies sidecars written by this implementation.
pub const SIDECAR_FORMAT: &str = "shuttle-hazard/1";
/// Archives and sidecars: owner read/write, group read (the analysts' group), nothing
/// for others.
pub const ARCHIVE_MODE: u32 = 0o640;
/// Longest file-name part kept in an archive name (bytes, ASCII after sanitising).
const NAME_MAX: usize = 100;
/// Counter suffixes tried before giving up on a name (only reachable if the
/// directory is flooded with same-named archives within one second).
const MAX_COUNTER: u32 = 100_000;

/// What became of a suspect file.
#[derive(Debug, Clone)]
pub enum Disposal {
    /// Encrypted into the hazard archive (archive and sidecar durable).
    Archived(Box<Stored>),
    /// No archive configured: the quarantine copy was deleted.
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum HazardError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "hazard_archive_path is set but hazard_encryption_key_path is not: suspect files cannot be archived without a public key"
    )]
    NoKey,
    #[error("cannot delete suspect quarantine copy {path}: {source}")]
    Delete { path: PathBuf, source: io::Error },
    #[error("disk full writing hazard archive {path}: {source}")]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot encrypt into {path}: {reason}")]
    Encrypt { path: PathBuf, reason: String },
    #[error(
        "the bytes read for archiving ({got_size} bytes, sha256 {got_sha}) are not the scanned file ({size} bytes, sha256 {sha}); not archived"
    )]
    Mismatch {
        size: u64,
        sha: String,
        got_size: u64,
        got_sha: String,
    },
    #[error("no free archive name for {0} (counter exhausted)")]
    NoName(String),
}

fsx::impl_io_error!(HazardError);

impl HazardError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HazardError + 'a {
        fsx::failed(action, path)
    }

    /// A full disk stops the run (as in quarantine and delivery).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, HazardError::DiskFull { .. })
    }
}

/// One scanner's identity in a verdict: engine and signature versions as the engine
/// reports them (clamd: `ClamAV 1.0.7/27400/Mon Sep 29 …`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScannerInfo {
    pub scanner: String,
    pub version: String,
}

/// What the caller knows about the plaintext it hands to [`HazardArchive::store`].
#[derive(Debug, Clone)]
pub struct EntryMeta {
    /// Journal id of the file; names the temp file (recovery finds it by this).
    pub file_id: i64,
    /// Path relative to `source_path`.
    pub original_path: String,
    pub size: u64,
    /// SHA-256 (lowercase hex) of the bytes that were scanned; the streamed plaintext
    /// must hash to this or nothing is archived.
    pub sha256: String,
    pub detections: Vec<String>,
    pub scanners: Vec<ScannerInfo>,
    /// Set when a retro-scan withdraws a delivered file: the destination path it was
    /// taken from (`crate::rescan`).
    pub withdrawn_from: Option<String>,
}

/// The JSON sidecar next to each archive (metadata only, never file content).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sidecar {
    pub format: String,
    /// File name of the archive this sidecar describes.
    pub archive: String,
    pub original_path: String,
    pub size: u64,
    pub sha256: String,
    pub detections: Vec<String>,
    pub scanners: Vec<ScannerInfo>,
    /// RFC 3339, local time with offset.
    pub archived_at: String,
    /// Primary key fingerprint of the recipient (to find the right private key).
    pub key_fingerprint: String,
    /// The (sub)key the session key is encrypted to.
    pub encryption_key: String,
    pub file_id: i64,
    /// A delivered file withdrawn by a retro-scan: the destination path it was taken
    /// from (absent for files archived on their way in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn_from: Option<String>,
}

/// A finished, durable archive entry.
#[derive(Debug, Clone)]
pub struct Stored {
    pub archive: PathBuf,
    pub sidecar_path: PathBuf,
    pub sidecar: Sidecar,
}

/// A configured hazard archive with a validated recipient key.
#[derive(Debug)]
pub struct HazardArchive {
    dir: PathBuf,
    recipient: Recipient,
}

impl HazardArchive {
    /// Validates the hazard configuration: `Ok(None)` when no archive is configured,
    /// an error (a configuration error, exit 2) when the key cannot be used. Called
    /// once per run before any file is touched, and by `shuttle check`.
    pub fn open(cfg: &Config) -> Result<Option<HazardArchive>, HazardError> {
        let Some(dir) = cfg.hazard_archive() else {
            return Ok(None);
        };
        let key_path = cfg
            .hazard_encryption_key_path
            .as_deref()
            .ok_or(HazardError::NoKey)?;
        HazardArchive::new(dir, key_path).map(Some)
    }

    /// An archive in `dir` encrypting to the key in `key_path` (validated now).
    pub fn new(dir: &Path, key_path: &Path) -> Result<HazardArchive, HazardError> {
        let recipient = key::load(key_path, std::time::SystemTime::now())?;
        Ok(HazardArchive {
            dir: dir.to_path_buf(),
            recipient,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn recipient(&self) -> &Recipient {
        &self.recipient
    }

    /// Encrypts `plaintext` (read to its end) into the archive and writes its sidecar.
    /// Once this returns Ok both are durable (fsynced, directory fsynced). On error
    /// nothing of this entry is left behind.
    ///
    /// It takes a reader rather than a quarantine copy so that a caller may archive
    /// another file holding the scanned bytes (Defender's `defender_handles_suspect_files`
    /// archives the source); the SHA-256 check guarantees it is the same content.
    pub fn store(&self, plaintext: &mut dyn Read, meta: &EntryMeta) -> Result<Stored, HazardError> {
        let now = chrono::Local::now();
        // Every name below is resolved beneath the archive directory's handle.
        let root = fsx::Beneath::open(&self.dir).map_err(HazardError::io("open", &self.dir))?;
        let dir = root.root();
        let temp_name = fsx::temp_name(meta.file_id);
        let temp_name = std::ffi::OsStr::new(&temp_name);
        let temp = self.dir.join(temp_name);
        let _ = dir.remove(temp_name);
        let file = dir
            .create_new(temp_name)
            .map_err(HazardError::io("create", &temp))?;
        let written = self.encrypt(plaintext, &file, &temp, meta);
        drop(file);
        if let Err(e) = written {
            let _ = dir.remove(temp_name);
            return Err(e);
        }

        let stem = format!(
            "hazard_{}_{}",
            safe_name(&meta.original_path),
            now.format("%Y%m%d%H%M%S")
        );
        let archive_name = match self.reserve(dir, temp_name, &stem) {
            Ok(n) => n,
            Err(e) => {
                let _ = dir.remove(temp_name);
                return Err(e);
            }
        };
        let archive = self.dir.join(&archive_name);
        let sidecar = Sidecar {
            format: SIDECAR_FORMAT.into(),
            archive: archive_name.clone(),
            original_path: meta.original_path.clone(),
            size: meta.size,
            sha256: meta.sha256.clone(),
            detections: meta.detections.clone(),
            scanners: meta.scanners.clone(),
            archived_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            key_fingerprint: self.recipient.fingerprint.clone(),
            encryption_key: self.recipient.encryption_fingerprint.clone(),
            file_id: meta.file_id,
            withdrawn_from: meta.withdrawn_from.clone(),
        };
        let sidecar_name = format!("{archive_name}.json");
        let sidecar_path = self.dir.join(&sidecar_name);
        // The sidecar is written and renamed without replacing anything, then the
        // directory fsynced: both entries are durable once this succeeds.
        let done = serde_json::to_vec_pretty(&sidecar)
            .map_err(|e| HazardError::Io {
                action: "serialise",
                path: sidecar_path.clone(),
                source: io::Error::other(e),
            })
            .and_then(|mut text| {
                text.push(b'\n');
                dir.write_new(temp_name, sidecar_name.as_ref(), &text, ARCHIVE_MODE, true)
                    .map_err(HazardError::io("write", &sidecar_path))
            });
        if let Err(e) = done {
            // An archive without its description would be listed as damaged: take
            // both back; the source stays and the next run archives it again.
            let _ = dir.remove(temp_name);
            let _ = dir.remove(sidecar_name.as_ref());
            let _ = dir.remove(archive_name.as_ref());
            let _ = dir.fsync();
            return Err(e);
        }
        Ok(Stored {
            archive,
            sidecar_path,
            sidecar,
        })
    }

    /// Streams the OpenPGP message into `file`, checks the plaintext was the scanned
    /// file, sets the mode and fsyncs.
    fn encrypt(
        &self,
        plaintext: &mut dyn Read,
        file: &File,
        temp: &Path,
        meta: &EntryMeta,
    ) -> Result<(), HazardError> {
        let mut rng = rand::thread_rng();
        let mut reader = Hashing {
            inner: plaintext,
            hasher: Sha256::new(),
            n: 0,
            error: None,
        };
        let mut writer = Tracking {
            inner: BufWriter::with_capacity(1 << 16, file),
            error: None,
        };
        let encrypted = {
            let mut builder = MessageBuilder::from_reader("", &mut reader)
                .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
            let added = match &self.recipient.key {
                key::EncryptionKey::Primary(k) => builder.encrypt_to_key(&mut rng, k).map(drop),
                key::EncryptionKey::Subkey(k) => builder.encrypt_to_key(&mut rng, k).map(drop),
            };
            added.and_then(|()| builder.to_writer(&mut rng, &mut writer))
        };
        if let Err(e) = encrypted {
            // Prefer the underlying I/O error (disk full, unreadable plaintext).
            if let Some(source) = writer.error.take() {
                return Err(HazardError::io("write", temp)(source));
            }
            if let Some(source) = reader.error.take() {
                return Err(HazardError::Io {
                    action: "read the plaintext for",
                    path: temp.to_path_buf(),
                    source,
                });
            }
            return Err(HazardError::Encrypt {
                path: temp.to_path_buf(),
                reason: e.to_string(),
            });
        }
        writer
            .inner
            .flush()
            .map_err(HazardError::io("write", temp))?;
        let got_sha = hex::encode(reader.hasher.finalize_reset());
        if got_sha != meta.sha256 || reader.n != meta.size {
            return Err(HazardError::Mismatch {
                size: meta.size,
                sha: meta.sha256.clone(),
                got_size: reader.n,
                got_sha,
            });
        }
        file.set_permissions(std::fs::Permissions::from_mode(ARCHIVE_MODE))
            .map_err(HazardError::io("set mode of", temp))?;
        file.sync_all().map_err(HazardError::io("fsync", temp))
    }

    /// Renames `temp` to the first free `<stem>.gpg`, `<stem>_2.gpg`, … atomically
    /// (never replacing anything, even a stray sidecar); returns the name taken.
    fn reserve(
        &self,
        dir: &fsx::Dir,
        temp: &std::ffi::OsStr,
        stem: &str,
    ) -> Result<String, HazardError> {
        for n in 1..=MAX_COUNTER {
            let name = if n == 1 {
                format!("{stem}.gpg")
            } else {
                format!("{stem}_{n}.gpg")
            };
            if dir.stat(format!("{name}.json").as_ref()).is_ok() {
                continue;
            }
            match dir.rename_to(temp, dir, name.as_ref(), true) {
                Ok(()) => return Ok(name),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(HazardError::io("rename into", &self.dir.join(&name))(e)),
            }
        }
        Err(HazardError::NoName(stem.to_string()))
    }
}

/// Disposes of a suspect file: archives `plaintext` when an archive is configured.
/// Once this returns Ok the suspect content is durably archived (or, without an
/// archive, deliberately let go): the caller deletes the quarantine copy and the
/// source may be removed (§1.10).
pub fn dispose(
    archive: Option<&HazardArchive>,
    plaintext: &mut dyn Read,
    meta: &EntryMeta,
) -> Result<Disposal, HazardError> {
    Ok(match archive {
        Some(a) => Disposal::Archived(Box::new(a.store(plaintext, meta)?)),
        None => Disposal::Deleted,
    })
}

/// The file-name part of `original` (never its directories), reduced to characters
/// safe in any shell or file manager; leading dots removed so an archive is never a
/// hidden file or mistaken for a Shuttle temp file.
pub fn safe_name(original: &str) -> String {
    let base = original.rsplit('/').next().unwrap_or(original);
    let mut s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    s = s.trim_start_matches(['.', '-']).to_string();
    s.truncate(NAME_MAX);
    if s.is_empty() { "file".into() } else { s }
}

/// Hashes what the encryptor reads, and keeps the I/O error it may hide.
struct Hashing<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    n: u64,
    error: Option<io::Error>,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(k) => {
                self.hasher.update(&buf[..k]);
                self.n += k as u64;
                Ok(k)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.error = Some(e);
                Err(copy)
            }
        }
    }
}

/// Keeps the first write error (rPGP wraps it; disk full must stay recognisable).
struct Tracking<W: Write> {
    inner: W,
    error: Option<io::Error>,
}

impl<W: Write> Write for Tracking<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.keep(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|e| self.keep(e))
    }
}

impl<W: Write> Tracking<W> {
    fn keep(&mut self, e: &io::Error) {
        if self.error.is_none() {
            self.error = Some(match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            });
        }
    }
}

/// One entry of `shuttle hazard list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub status: ArchiveEntry,
    /// File name in the archive directory.
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Size of the encrypted file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Sidecar>,
    /// Sort key: archived_at for good entries, mtime otherwise (unix seconds).
    #[serde(skip)]
    pub time: i64,
}

/// Reads the archive directory: every entry with its metadata, newest first, the good
/// ones before the others. Damaged
/// entries (archive without sidecar, unreadable sidecar, sidecar without archive, not
/// an OpenPGP message) and foreign files are listed as such; nothing here panics or
/// stops at a bad file.
pub fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    // Every entry is looked at beneath the directory's handle, never through a symlink.
    let root = fsx::Beneath::open(dir)?;
    let d = root.root();
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (name, _) in d.entries()? {
        match name.into_string() {
            Ok(n) => names.push(n),
            Err(raw) => out.push(Listed {
                status: ArchiveEntry::Foreign,
                file: raw.to_string_lossy().into_owned(),
                problem: Some("file name is not UTF-8; not a Shuttle hazard archive file".into()),
                archive_bytes: None,
                meta: None,
                time: mtime(d, &raw),
            }),
        }
    }
    let present: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    for name in &names {
        let entry = |status, problem: String| Listed {
            status,
            file: name.clone(),
            problem: Some(problem),
            archive_bytes: None,
            meta: None,
            time: mtime(d, name.as_ref()),
        };
        let is_file = d
            .meta(name.as_ref())
            .is_ok_and(|m| m.kind == rustix::fs::FileType::RegularFile);
        if fsx::is_temp_name(name) {
            out.push(entry(ArchiveEntry::Temp, "Shuttle temp file (an archive being written, or left by an interrupted run; the next run removes it)".into()));
        } else if !is_file {
            out.push(entry(
                ArchiveEntry::Foreign,
                "not a regular file; not a Shuttle hazard archive file".into(),
            ));
        } else if let Some(archive) = name
            .strip_suffix(".json")
            .filter(|a| a.starts_with("hazard_") && a.ends_with(".gpg"))
        {
            if !present.contains(archive) {
                out.push(entry(
                    ArchiveEntry::Damaged,
                    format!("sidecar without its archive {archive}"),
                ));
            }
        } else if name.starts_with("hazard_") && name.ends_with(".gpg") {
            out.push(check_entry(d, name));
        } else {
            out.push(entry(
                ArchiveEntry::Foreign,
                "not a Shuttle hazard archive file".into(),
            ));
        }
    }
    // Archived files first (what the operator hands on), then what needs a look;
    // each group newest first.
    out.sort_by(|a, b| {
        (b.status == ArchiveEntry::Ok)
            .cmp(&(a.status == ArchiveEntry::Ok))
            .then(b.time.cmp(&a.time))
            .then_with(|| b.file.cmp(&a.file))
    });
    Ok(out)
}

fn mtime(d: &fsx::Dir, name: &std::ffi::OsStr) -> i64 {
    d.meta(name)
        .map(|m| m.mtime_ns.div_euclid(1_000_000_000))
        .unwrap_or(0)
}

/// Checks one `hazard_*.gpg` and its sidecar.
fn check_entry(d: &fsx::Dir, name: &str) -> Listed {
    let size = d.meta(name.as_ref()).map(|m| m.size).ok();
    let damaged = |problem: String| Listed {
        status: ArchiveEntry::Damaged,
        file: name.to_string(),
        problem: Some(problem),
        archive_bytes: size,
        meta: None,
        time: mtime(d, name.as_ref()),
    };
    let sidecar_name = format!("{name}.json");
    let text = match read_small(d, &sidecar_name) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return damaged(format!(
                "no sidecar {name}.json (metadata lost; the archive may still decrypt)"
            ));
        }
        Err(e) => return damaged(format!("cannot read sidecar {name}.json: {e}")),
    };
    let sidecar: Sidecar = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => {
            return damaged(format!(
                "sidecar {name}.json is not a Shuttle hazard sidecar: {e}"
            ));
        }
    };
    if sidecar.format != SIDECAR_FORMAT || sidecar.archive != name {
        return damaged(format!(
            "sidecar {name}.json describes {:?} (format {:?}), not this archive",
            sidecar.archive, sidecar.format
        ));
    }
    if let Err(why) = looks_encrypted(d, name) {
        return Listed {
            meta: Some(sidecar),
            ..damaged(why)
        };
    }
    let time = chrono::DateTime::parse_from_rfc3339(&sidecar.archived_at)
        .map(|t| t.timestamp())
        .unwrap_or_else(|_| mtime(d, name.as_ref()));
    Listed {
        status: ArchiveEntry::Ok,
        file: name.to_string(),
        problem: None,
        archive_bytes: size,
        meta: Some(sidecar),
        time,
    }
}

fn read_small(d: &fsx::Dir, name: &str) -> io::Result<Vec<u8>> {
    let f = d.open_read(name.as_ref())?;
    let mut v = Vec::new();
    f.take(1 << 20).read_to_end(&mut v)?;
    Ok(v)
}

/// A Shuttle archive starts with a public-key encrypted session key packet (tag 1,
/// old or new packet format). Cheap check against truncation and foreign content;
/// only the private key can prove more.
fn looks_encrypted(d: &fsx::Dir, name: &str) -> Result<(), String> {
    let mut first = [0u8; 1];
    let mut f = d
        .open_read(name.as_ref())
        .map_err(|e| format!("cannot open archive: {e}"))?;
    match f.read(&mut first) {
        Ok(0) => return Err("archive is empty".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("cannot read archive: {e}")),
    }
    let b = first[0];
    let tag = if b & 0xC0 == 0xC0 {
        b & 0x3F
    } else if b & 0xC0 == 0x80 {
        (b & 0x3C) >> 2
    } else {
        0
    };
    if tag == 1 {
        Ok(())
    } else {
        Err("does not start with an OpenPGP encrypted session key (not an encrypted archive, or damaged)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_name_keeps_only_the_file_name_and_safe_characters() {
        assert_eq!(safe_name("a/b/eicar.com"), "eicar.com");
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("x/.hidden"), "hidden");
        assert_eq!(safe_name("we ird$name;rm -rf"), "we_ird_name_rm_-rf");
        assert_eq!(safe_name("ünï.bin"), "_n_.bin");
        assert_eq!(safe_name("dir/..."), "file");
        assert_eq!(safe_name(&"a".repeat(300)).len(), NAME_MAX);
    }
}
