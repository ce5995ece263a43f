//! Logging (docs/design.md §8): stderr plus one log file per run in `log_path`
//! (`shuttle_YYYYMMDD_HHMMSS_<pid>.log`), written by one buffered background writer
//! so that logging rarely waits on the disk in the middle of a file's handling.
//!
//! The file log is lossless: when the writer falls [`LINES_QUEUED`] lines behind, the
//! thread that logs waits for it (tracing-appender's default would drop the line).
//! The queue is short so that it bounds memory too; the writer batches what is
//! queued into few `write`s through a [`BufWriter`], flushed whenever the queue is
//! empty.
//!
//! The log file is created mode 0640 explicitly (and the process runs under umask
//! 007, set first thing in `main`): it names files and hosts, and is never
//! world-readable, whatever umask Shuttle was started with.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tracing_subscriber::fmt::time::ChronoLocal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Lines waiting for the log file writer before a logging thread waits.
pub const LINES_QUEUED: usize = 4096;

/// Keeps the background log writer alive; dropping it flushes the file.
pub struct LogGuard {
    worker: Option<tracing_appender::non_blocking::WorkerGuard>,
    pub file: Option<PathBuf>,
    failure: Arc<OnceLock<String>>,
}

impl LogGuard {
    /// Flushes the log file and stops its writer; `Err` names the first write to the
    /// file that failed (a full disk, say): the log is incomplete, which makes the
    /// run a failure.
    pub fn finish(mut self) -> Result<(), String> {
        drop(self.worker.take());
        match (self.failure.get(), &self.file) {
            (Some(e), Some(f)) => Err(format!("cannot write the log file {}: {e}", f.display())),
            _ => Ok(()),
        }
    }
}

/// The log file, remembering its first write error (tracing-appender's writer
/// thread has nowhere to return one to).
struct Watched {
    file: std::fs::File,
    failure: Arc<OnceLock<String>>,
}

impl Watched {
    fn note<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r {
            self.failure.get_or_init(|| e.to_string());
        }
        r
    }
}

impl std::io::Write for Watched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.file.write(buf);
        self.note(r)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.file.flush();
        self.note(r)
    }
}

/// Starts logging at `level` to stderr and, with `dir`, to a new file in it.
pub fn init(level: &str, dir: Option<&Path>) -> std::io::Result<LogGuard> {
    let filter = || EnvFilter::new(format!("shuttle={level},warn"));
    let timer = || ChronoLocal::new("%Y-%m-%d %H:%M:%S%.3f".into());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_timer(timer())
        .with_ansi(false)
        .with_filter(filter());
    let failure = Arc::new(OnceLock::new());
    let (file_layer, guard, file) = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let name = format!(
                "shuttle_{}_{}.log",
                chrono::Local::now().format("%Y%m%d_%H%M%S"),
                std::process::id()
            );
            let path = dir.join(name);
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)?;
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .buffered_lines_limit(LINES_QUEUED)
                .thread_name("shuttle-log")
                .finish(BufWriter::with_capacity(
                    64 << 10,
                    Watched {
                        file: f,
                        failure: failure.clone(),
                    },
                ));
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_target(false)
                .with_timer(timer())
                .with_ansi(false)
                .with_filter(filter());
            (Some(layer), Some(guard), Some(path))
        }
        None => (None, None, None),
    };
    // A second init (tests calling the library twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
    Ok(LogGuard {
        worker: guard,
        file,
        failure,
    })
}

/// Starts logging for a command with its configuration loaded: stderr plus the
/// per-run log file in `log_path`, then the configuration's warnings as the first
/// lines. `Err` is the one line to print on stderr (a configuration error, exit 2).
pub fn start(cfg: &crate::config::Config, warnings: &[String]) -> Result<LogGuard, String> {
    let guard = init(&cfg.log_level, cfg.log_path.as_deref()).map_err(|e| {
        let dir = cfg
            .log_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("configuration error: log_path {dir}: cannot create the log file: {e}")
    })?;
    for w in warnings {
        tracing::warn!("config: {w}");
    }
    Ok(guard)
}

/// Removes the per-run log files (`shuttle_*.log`, and their rotated or compressed
/// forms `shuttle_*.log.1`, `shuttle_*.log.2.gz`, …) in `dir` last modified more than
/// `days` days ago; `days == 0` keeps everything. Each run writes its own file, which
/// logrotate cannot expire (it would rotate every file into an empty one plus a `.1`
/// kept forever), so Shuttle expires them itself. A file being written (a `watch`'s)
/// is modified on every pass and never old enough. Returns how many were removed;
/// failures are logged, never fatal.
pub fn prune_old_logs(dir: &Path, days: u64) -> usize {
    if days == 0 {
        return 0;
    }
    let Some(cutoff) = std::time::SystemTime::now()
        .checked_sub(std::time::Duration::from_secs(days.saturating_mul(86_400)))
    else {
        return 0;
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("log retention: cannot list {}: {e}", dir.display());
            return 0;
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("shuttle_") && name.contains(".log")) {
            continue;
        }
        // DirEntry::metadata does not follow symlinks: only regular files are removed.
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok().map(|t| t < cutoff));
        if old != Some(true) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(
                "log retention: cannot remove {}: {e}",
                entry.path().display()
            ),
        }
    }
    if removed > 0 {
        tracing::info!(
            "log retention: removed {removed} log file(s) older than {days} days from {}",
            dir.display()
        );
    }
    removed
}
