//! Logging (docs/design.md §8): stderr plus one log file per run in `log_path`
//! (`shuttle_YYYYMMDD_HHMMSS_<pid>.log`).
//!
//! Each line is formatted once and written, whole, by the thread that logs it: first
//! to the file (one `write` to an `O_APPEND` descriptor, so lines from several threads
//! never interleave), then to stderr. Nothing is queued, so nothing can be dropped and
//! nothing is lost when the process is killed: the log ends with the last thing
//! Shuttle did, which is the line an administrator looks for after a crash. A write
//! to the page cache rarely waits on the disk; a background writer (tried earlier)
//! cost more than it saved, a thread hand-off and a wake-up for every line.
//!
//! The log file is created mode 0640 explicitly (and the process runs under umask
//! 007, set first thing in `main`): it names files and hosts, and is never
//! world-readable, whatever umask Shuttle was started with.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use chrono::format::{Item, StrftimeItems};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The per-run log file's name and the first write to it that failed.
pub struct LogGuard {
    pub file: Option<PathBuf>,
    failure: Arc<OnceLock<String>>,
}

impl LogGuard {
    /// `Err` names the first write to the log file that failed (a full disk, say):
    /// the log is incomplete, which makes the run a failure.
    pub fn finish(self) -> Result<(), String> {
        match (self.failure.get(), &self.file) {
            (Some(e), Some(f)) => Err(format!("cannot write the log file {}: {e}", f.display())),
            _ => Ok(()),
        }
    }
}

/// Where each formatted line goes: the log file (if any), then stderr if the line's
/// level is one `stderr` shows. A failed write to the file is remembered, not returned
/// (the formatter has nowhere to report it), and does not keep the line from stderr.
struct Tee {
    file: Option<std::fs::File>,
    failure: Arc<OnceLock<String>>,
    stderr: LevelFilter,
}

/// One line on its way, as the formatter writes it in one `write_all`.
struct TeeLine<'a> {
    tee: &'a Tee,
    to_stderr: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeLine<'a>;

    fn make_writer(&'a self) -> TeeLine<'a> {
        TeeLine {
            tee: self,
            to_stderr: self.stderr != LevelFilter::OFF,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> TeeLine<'a> {
        TeeLine {
            tee: self,
            to_stderr: self.stderr >= *meta.level(),
        }
    }
}

impl Write for TeeLine<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let Tee { file, failure, .. } = self.tee;
        if let Some(mut f) = file.as_ref()
            && let Err(e) = f.write_all(line)
        {
            failure.get_or_init(|| e.to_string());
        }
        // stderr may be a closed pipe (cron's mailer gone): the file has the line.
        if self.to_stderr {
            let _ = std::io::stderr().lock().write_all(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Each line's local time, `2026-12-05 23:24:17.655`: the format parsed once, not
/// for every line as tracing-subscriber's `ChronoLocal` does.
struct LocalTime(Vec<Item<'static>>);

impl LocalTime {
    fn new() -> LocalTime {
        // A constant format: it parses.
        let items = StrftimeItems::new("%Y-%m-%d %H:%M:%S%.3f")
            .parse_to_owned()
            .unwrap_or_default();
        LocalTime(items)
    }
}

impl tracing_subscriber::fmt::time::FormatTime for LocalTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(
            w,
            "{}",
            chrono::Local::now().format_with_items(self.0.iter())
        )
    }
}

/// Starts logging at `level` to a new file in `dir` (if any) and to stderr, which
/// shows only the lines at `stderr_level` or above ("off": none).
pub fn init(level: &str, stderr_level: &str, dir: Option<&Path>) -> std::io::Result<LogGuard> {
    let failure = Arc::new(OnceLock::new());
    let (file, path) = match dir {
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
            (Some(f), Some(path))
        }
        None => (None, None),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(Tee {
            file,
            failure: failure.clone(),
            // The configuration only lets the names LevelFilter reads through.
            stderr: stderr_level.parse().unwrap_or(LevelFilter::INFO),
        })
        .with_target(false)
        .with_timer(LocalTime::new())
        .with_ansi(false)
        .with_filter(EnvFilter::new(format!("shuttle={level},warn")));
    // A second init (tests calling the library twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layer).try_init();
    Ok(LogGuard {
        file: path,
        failure,
    })
}

/// Starts logging for a command with its configuration loaded: stderr plus the
/// per-run log file in `log_path`, then the configuration's warnings as the first
/// lines. `Err` is the one line to print on stderr (a configuration error, exit 2).
pub fn start(cfg: &crate::config::Config, warnings: &[String]) -> Result<LogGuard, String> {
    let guard = init(
        &cfg.log_level,
        &cfg.stderr_log_level,
        cfg.log_path.as_deref(),
    )
    .map_err(|e| {
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
