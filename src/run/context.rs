//! What every part of a run's middle shares: the run's parts ([`Run`]), its three
//! directories opened once ([`Roots`]), a file handed to a worker ([`Job`]), and the
//! journal's lock.
//!
//! It is its own module so that the per-file steps (`file.rs`), settling (`settle.rs`)
//! and the workers (`pipeline.rs`) each depend on it and never on each other in both
//! directions.

use std::collections::HashMap;

use crate::config::Config;
use crate::deliver::{Destination, FsDestination};
use crate::discover::Candidate;
use crate::journal::{Finished, Identity, Journal, JournalError, SetAside};
use crate::notify::Notifier;
use crate::scan::Scanners;

/// The parts of a run every file's handling needs.
pub struct Run<'a> {
    pub cfg: &'a Config,
    pub journal: &'a crate::journal::Shared,
    pub run_id: i64,
    pub scanners: &'a Scanners,
    pub notifier: &'a Notifier,
    /// The hazard archive, validated before the run started (None: suspects deleted).
    pub hazard: Option<&'a crate::hazard::HazardArchive>,
    /// Set by `shuttle watch` on SIGTERM/SIGINT: admit no more files.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    pub roots: &'a Roots,
    /// What the engines can scan whole (sizes, archives).
    pub limits: &'a crate::scan::limits::ScanLimits,
    /// Files set aside by earlier runs, by identity, and the limits now in force: a
    /// file set aside under the same limits is neither copied nor reported again.
    pub set_aside: &'a HashMap<Identity, SetAside>,
    pub limits_fingerprint: &'a str,
    /// The per-file settings, resolved once from `cfg`.
    pub policy: FilePolicy,
    /// The steps of settling a test must be able to fail on demand.
    pub hooks: Hooks,
    /// Fleet mode: the lease keeper; once it says the lease is lost, admit nothing.
    pub fleet: Option<&'a crate::journal::Heartbeat>,
    /// The daily limits a fleet claim counts (exact across nodes).
    pub day_limits: crate::journal::DayLimits,
}

/// What one file's handling and settling need of the configuration, resolved once
/// per run: the middle layer (`file.rs`, `settle.rs`) reads this, never the global
/// [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct FilePolicy {
    /// `delete_source_files_after_copying`: remove a source once its copy is durable.
    pub delete_source: bool,
    /// `defender_handles_suspect_files`: Defender may remove a suspect copy itself;
    /// the verified source is archived instead.
    pub defender_handles_suspects: bool,
}

impl FilePolicy {
    pub fn of(cfg: &Config) -> FilePolicy {
        FilePolicy {
            delete_source: cfg.delete_source_files,
            defender_handles_suspects: cfg.scanning.defender_handles_suspect_files,
        }
    }
}

/// Records a batch's ends; `Ok` lists the files whose fleet claim was lost meanwhile.
pub type RecordBatch = fn(&dyn Journal, &[Finished]) -> Result<Vec<i64>, JournalError>;

/// Settling's `syncfs` of the destination and its journal record of a batch, as
/// plain functions: a run uses [`Hooks::REAL`]; the run core's unit tests put
/// failing ones in their place.
#[derive(Clone, Copy)]
pub struct Hooks {
    pub syncfs: fn(&dyn Destination) -> std::io::Result<()>,
    pub record_batch: RecordBatch,
}

fn sync_destination(d: &dyn Destination) -> std::io::Result<()> {
    d.sync()
}

fn record_batch(j: &dyn Journal, batch: &[Finished]) -> Result<Vec<i64>, JournalError> {
    j.finish_batch(batch)
}

impl Hooks {
    pub const REAL: Hooks = Hooks {
        syncfs: sync_destination,
        record_batch,
    };
}

/// The run's three directories, opened once: every path below them is resolved
/// through these handles, never through a symlink (fsx::Beneath). The destination is
/// behind its seam ([`Destination`]).
pub struct Roots {
    pub source: crate::fsx::Beneath,
    pub quarantine: std::sync::Arc<crate::fsx::Beneath>,
    pub destination: Box<dyn Destination>,
    /// What a source must pass before it is copied or removed.
    pub checks: crate::quarantine::SourceChecks,
}

impl Roots {
    pub fn open(cfg: &Config, writers: crate::lease::WriterCheck) -> std::io::Result<Roots> {
        let quarantine = crate::fsx::Beneath::open(&cfg.quarantine_path)?;
        let destination = crate::fsx::Beneath::open(&cfg.destination_path)?;
        let here = std::ffi::OsStr::new(".");
        let same_fs = quarantine.root().meta(here)?.dev == destination.root().meta(here)?.dev;
        Ok(Roots {
            source: crate::fsx::Beneath::open(&cfg.source_path)?,
            quarantine: std::sync::Arc::new(quarantine),
            destination: Box::new(FsDestination {
                root: destination,
                on_conflict: cfg.on_conflict,
                same_fs,
            }),
            checks: crate::quarantine::SourceChecks {
                writers,
                allow_hard_links: cfg.allow_hard_links,
            },
        })
    }
}

/// Files handed to a worker.
pub struct Job {
    pub id: i64,
    pub candidate: Candidate,
}

/// A candidate's identity, as set-aside files are remembered by.
pub fn identity(c: &Candidate) -> Identity {
    Identity {
        dev: c.dev,
        ino: c.ino,
        size: c.size,
        mtime_ns: c.mtime_ns,
    }
}

pub fn lock(j: &crate::journal::Shared) -> std::sync::MutexGuard<'_, Box<dyn Journal>> {
    j.lock().unwrap_or_else(|p| p.into_inner())
}
