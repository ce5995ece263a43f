//! Logging (DESIGN §8): stderr plus one log file per run in `log_path`
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

use tracing_subscriber::fmt::time::ChronoLocal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Lines waiting for the log file writer before a logging thread waits.
pub const LINES_QUEUED: usize = 4096;

/// Keeps the background log writer alive; dropping it flushes the file.
pub struct LogGuard {
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
    pub file: Option<PathBuf>,
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
                .finish(BufWriter::with_capacity(64 << 10, f));
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
    Ok(LogGuard { _file: guard, file })
}
