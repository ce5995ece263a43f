//! The progress bar (docs/design.md §8): on an interactive terminal only, files and bytes
//! done out of admitted, and throughput. When stderr is not a terminal (cron,
//! systemd, a pipe) nothing is drawn at all, so logs stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often at most a finished file marks progress on the lock file.
pub const BEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Progress of one run; a no-op when stderr is not a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
    /// The lock file whose time marks progress ([`crate::lock::beat`]), and when it
    /// was last marked.
    heartbeat: Option<(std::path::PathBuf, std::time::Instant)>,
    files_admitted: u64,
    files_done: u64,
}

impl Progress {
    /// A bar on stderr if stderr is a terminal, else nothing. `lock`: the lock file
    /// to mark as files finish (at most every [`BEAT_EVERY`]).
    pub fn for_stderr(lock: Option<&std::path::Path>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        let p = Progress {
            bar,
            heartbeat: lock.map(|l| (l.to_path_buf(), std::time::Instant::now())),
            files_admitted: 0,
            files_done: 0,
        };
        p.show();
        p
    }

    /// One more file admitted, of `size` bytes.
    pub fn admitted(&mut self, size: u64) {
        self.files_admitted += 1;
        if let Some(b) = &self.bar {
            b.inc_length(size);
        }
        self.show();
    }

    /// One admitted file finished (whatever its outcome).
    pub fn done(&mut self, size: u64) {
        self.files_done += 1;
        if let Some(b) = &self.bar {
            b.inc(size);
        }
        if let Some((lock, last)) = &mut self.heartbeat
            && last.elapsed() >= BEAT_EVERY
        {
            crate::lock::beat(lock);
            *last = std::time::Instant::now();
        }
        self.show();
    }

    fn show(&self) {
        if let Some(b) = &self.bar {
            b.set_message(format!("files {}/{}", self.files_done, self.files_admitted));
        }
    }

    /// Leaves the final state on the terminal.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
