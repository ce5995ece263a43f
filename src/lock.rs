//! Single instance (docs/design.md §1.2): an exclusive `flock` on the lock file.
//!
//! The kernel drops a `flock` when its holder dies, so a run killed with SIGKILL never
//! leaves a stale lock; the PID written into the file is only for the message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another shuttle run is active (pid {pid}) holding {path}")]
    Held {
        pid: String,
        path: PathBuf,
        /// How long since the holder last showed progress ([`beat`]); `None` when the
        /// lock file's time cannot be read.
        idle: Option<Duration>,
    },
    #[error("cannot open lock file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the life of a run; the lock is released when this is dropped.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the lock or reports who holds it. The default lock directory (`/run/shuttle`,
/// made by systemd's `RuntimeDirectory=` for the units) is created when missing, as a
/// run started by hand or from cron would otherwise find no directory after a reboot
/// (`/run` is a tmpfs); any other missing directory is an error.
pub fn acquire(path: &Path) -> Result<InstanceLock, LockError> {
    if path == Path::new(crate::config::DEFAULT_LOCK_PATH)
        && let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        use std::os::unix::fs::DirBuilderExt;
        // Errors show up as the open's error just below.
        let _ = std::fs::DirBuilder::new().mode(0o770).create(dir);
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o660)
        .open(path)
        .map_err(|source| LockError::Open {
            path: path.into(),
            source,
        })?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() {
                "unknown".to_string()
            } else {
                pid.to_string()
            };
            let idle = file
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            return Err(LockError::Held {
                pid,
                path: path.into(),
                idle,
            });
        }
        Err(e) => {
            return Err(LockError::Lock {
                path: path.into(),
                source: e.into(),
            });
        }
    }
    let write = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        writeln!(f, "{}", std::process::id())?;
        f.flush()
    };
    write(&mut file).map_err(|source| LockError::Lock {
        path: path.into(),
        source,
    })?;
    Ok(InstanceLock { _file: file })
}

/// Marks progress: sets the lock file's modification time to now. A run does this
/// when it starts a pass and as files finish, so that a run finding the lock held can
/// tell a busy holder from a hung one (see `LockError::Held::idle`). Failures only
/// weaken that diagnosis, so they are logged at debug level.
pub fn beat(path: &Path) {
    let now = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
    };
    if let Err(e) = rustix::fs::utimensat(rustix::fs::CWD, path, &now, rustix::fs::AtFlags::empty())
    {
        tracing::debug!(
            "cannot mark progress on the lock file {}: {e}",
            path.display()
        );
    }
}
