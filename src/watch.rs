//! `shuttle watch` (docs/design.md §6): keep running, react to new files and rescan
//! periodically, with the same rules as `run`.
//!
//! The watch is a loop of passes; each pass is exactly a `run` ([`run::pass`]) with
//! the lock held for the whole watch. Between passes the process sleeps in `poll(2)`
//! on three things only: inotify events under `source_path` (recursive; new
//! subdirectories are watched as they appear), a self-pipe written by the SIGTERM /
//! SIGINT handlers, and a timeout (the next periodic rescan, the moment a fresh file
//! becomes `stability_seconds` old, or the end of a throttle wait). It never spins:
//!
//! - a file still being written is skipped by the pass (open, or too recent); its
//!   close (`IN_CLOSE_WRITE`) or the stability deadline wakes the next pass;
//! - a disk-space throttle stop waits for the next rescan (events are ignored until
//!   then), a daily-limit stop waits for local midnight, a per-run limit goes on at once
//!   (each pass makes progress);
//! - SIGTERM/SIGINT stop admission; in-flight files finish, the lock is released, the
//!   process exits 0. A second SIGINT exits at once (the journal recovers next start).
//!
//! If inotify is not available (no watches left), the periodic rescan still works.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use rustix::event::{PollFd, PollFlags};

use crate::config::Config;
use crate::lock;
use crate::notify;
use crate::run::{self, RunError, RunOptions};
use crate::states::{ExitCode, SkipKind, ThrottleReason};

/// Events closer together than this are handled by one pass.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Slack after the stability deadline, so the file is surely old enough.
const STABILITY_SLACK: Duration = Duration::from_millis(100);

/// Why the watch could not set up its signal handling.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs passes until SIGTERM/SIGINT; returns the exit code (0 after a clean stop).
pub fn watch(cfg: &Config, opts: RunOptions) -> Result<ExitCode, RunError> {
    run::preflight(cfg)?;
    let signals = Signals::install().map_err(|e| RunError::Config(e.to_string()))?;
    let _lock = lock::acquire(&cfg.lock_path)?;
    let opts = RunOptions {
        stop: Some(Arc::clone(&signals.flag)),
        memory: Some(Arc::new(notify::Memory::default())),
        watch: true,
        buffers: Some(Arc::new(run::Buffers::default())),
        ..opts
    };
    let mut source = match Source::watch(&cfg.source_path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "inotify not available ({e}); new files are found by the rescan every {} s only",
                cfg.rescan_interval_seconds
            );
            None
        }
    };
    let rescan = Duration::from_secs(cfg.rescan_interval_seconds.max(1));
    let settle = if cfg.skip_stability_check {
        DEBOUNCE
    } else {
        Duration::from_secs(cfg.stability_seconds) + STABILITY_SLACK
    };
    tracing::info!(
        "watching {} (rescan every {} s)",
        cfg.source_path.display(),
        rescan.as_secs()
    );

    let mut plan = Plan {
        due: Some(Instant::now()),
        next_rescan: Instant::now() + rescan,
        hold_until: None,
    };
    let mut passes = 0u64;
    while !signals.stopped() {
        let now = Instant::now();
        let wake = plan.wake();
        if now >= wake {
            let report = run::pass(cfg, &opts);
            passes += 1;
            plan = Plan::after(cfg, &report, rescan, settle);
            continue;
        }
        let timeout = wake - now;
        let woke = wait(source.as_ref(), &signals.pipe, timeout);
        if woke.source
            && let Some(s) = source.as_mut()
            && s.drain()
        {
            // A file closed or moved in: run once it is stability_seconds old.
            let t = Instant::now() + settle.max(DEBOUNCE);
            plan.due = Some(plan.due.map_or(t, |d| d.min(t)));
        }
        if woke.signal {
            let mut buf = [0u8; 64];
            let _ = (&signals.pipe).read(&mut buf);
        }
    }
    tracing::info!("stop requested: watch ends after {passes} pass(es); lock released");
    Ok(ExitCode::Ok)
}

/// When the next pass is due.
struct Plan {
    /// An event (or a too-fresh file) asks for a pass at this time.
    due: Option<Instant>,
    next_rescan: Instant,
    /// Throttled: no pass before this time, whatever happens.
    hold_until: Option<Instant>,
}

impl Plan {
    fn wake(&self) -> Instant {
        let hold = |t: Instant| self.hold_until.map_or(t, |h| t.max(h));
        let rescan = hold(self.next_rescan);
        self.due.map_or(rescan, |d| hold(d).min(rescan))
    }

    /// What the pass that produced `report` asks for next.
    fn after(
        cfg: &Config,
        report: &crate::report::Report,
        rescan: Duration,
        settle: Duration,
    ) -> Plan {
        let now = Instant::now();
        let mut plan = Plan {
            due: None,
            next_rescan: now + rescan,
            hold_until: None,
        };
        if report.throttle.stopped {
            match report.throttle.reason {
                Some(ThrottleReason::PerRunLimit) => plan.due = Some(now),
                Some(ThrottleReason::DailyLimit) => {
                    let midnight = now + until_local_midnight();
                    tracing::info!(
                        "daily limit reached: admission resumes after local midnight ({} s)",
                        (midnight - now).as_secs()
                    );
                    plan.hold_until = Some(midnight);
                }
                _ => {
                    tracing::info!(
                        "throttled: next attempt at the rescan in {} s",
                        rescan.as_secs()
                    );
                    plan.hold_until = Some(plan.next_rescan);
                }
            }
        } else if !cfg.skip_stability_check
            && report
                .skipped_by_reason
                .get(&SkipKind::RecentlyModified)
                .is_some_and(|&n| n > 0)
        {
            // Every skipped file becomes old enough within stability_seconds.
            plan.due = Some(now + settle);
        }
        plan
    }
}

/// Time until the next local midnight (plus a second), when the daily limits reset.
fn until_local_midnight() -> Duration {
    let now = chrono::Local::now();
    let tomorrow = now
        .date_naive()
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 1));
    let next = tomorrow.and_then(|t| t.and_local_timezone(chrono::Local).earliest());
    next.and_then(|t| (t - now).to_std().ok())
        .unwrap_or(Duration::from_secs(3600))
}

struct Woke {
    source: bool,
    signal: bool,
}

/// Sleeps until an inotify event, a signal, or `timeout`.
fn wait(source: Option<&Source>, pipe: &UnixStream, timeout: Duration) -> Woke {
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    let mut fds = vec![PollFd::new(pipe, PollFlags::IN)];
    if let Some(s) = source {
        fds.push(PollFd::new(&s.inotify, PollFlags::IN));
    }
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) => Woke {
            signal: !fds[0].revents().is_empty(),
            source: fds.get(1).is_some_and(|f| !f.revents().is_empty()),
        },
        Err(rustix::io::Errno::INTR) => Woke {
            source: false,
            signal: true,
        },
        Err(e) => {
            // Should not happen; sleep the timeout rather than spin.
            tracing::error!("poll failed: {e}");
            std::thread::sleep(timeout.min(Duration::from_secs(1)));
            Woke {
                source: false,
                signal: false,
            }
        }
    }
}

/// SIGTERM/SIGINT: a flag read by the admission loop, and a self-pipe that wakes
/// `poll`.
struct Signals {
    flag: Arc<AtomicBool>,
    pipe: UnixStream,
}

impl Signals {
    fn install() -> Result<Signals, WatchError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let (rd, wr) = UnixStream::pair().map_err(WatchError::Signals)?;
        rd.set_nonblocking(true).map_err(WatchError::Signals)?;
        wr.set_nonblocking(true).map_err(WatchError::Signals)?;
        let flag = crate::signals::stop_flag().map_err(WatchError::Signals)?;
        for sig in [SIGTERM, SIGINT] {
            let w = wr.try_clone().map_err(WatchError::Signals)?;
            signal_hook::low_level::pipe::register(sig, w).map_err(WatchError::Signals)?;
        }
        Ok(Signals { flag, pipe: rd })
    }

    fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// inotify watches on `source_path` and every directory below it.
struct Source {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    full_warned: bool,
}

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::ATTRIB
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
}

impl Source {
    fn watch(root: &Path) -> std::io::Result<Source> {
        let inotify = Inotify::init()?;
        let mut s = Source {
            inotify,
            dirs: HashMap::new(),
            full_warned: false,
        };
        let wd = s.inotify.watches().add(root, mask())?;
        s.dirs.insert(wd, root.to_path_buf());
        s.add_below(root);
        Ok(s)
    }

    /// Watches every directory below `dir` ([`crate::fsx::walk`], not following
    /// symlinks; inotify itself takes paths).
    fn add_below(&mut self, dir: &Path) {
        let Ok(root) = crate::fsx::Beneath::open(dir) else {
            return;
        };
        crate::fsx::walk(root.root(), |step| {
            let crate::fsx::Step::Entry(e) = step else {
                return false;
            };
            let is_dir = e.kind == rustix::fs::FileType::Directory;
            if is_dir {
                self.add(&e.dir.path().join(&e.name));
            }
            is_dir
        });
    }

    fn add(&mut self, dir: &Path) {
        match self.inotify.watches().add(dir, mask()) {
            Ok(wd) => {
                self.dirs.insert(wd, dir.to_path_buf());
            }
            Err(e) if !self.full_warned => {
                self.full_warned = true;
                tracing::warn!(
                    "cannot watch {:?} ({e}); files there are found by the periodic rescan",
                    crate::names::shown(dir)
                );
            }
            Err(_) => {}
        }
    }

    /// Reads pending events; watches new directories. True if a pass is worth it.
    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        let mut relevant = false;
        loop {
            let events: Vec<(WatchDescriptor, EventMask, Option<PathBuf>)> =
                match self.inotify.read_events(&mut buf) {
                    Ok(evs) => evs
                        .map(|e| (e.wd, e.mask, e.name.map(PathBuf::from)))
                        .collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::error!("reading inotify events failed: {e}");
                        return true;
                    }
                };
            if events.is_empty() {
                break;
            }
            for (wd, m, name) in events {
                if m.contains(EventMask::Q_OVERFLOW) {
                    relevant = true;
                    continue;
                }
                if m.contains(EventMask::IGNORED) {
                    self.dirs.remove(&wd);
                    continue;
                }
                let path = match (self.dirs.get(&wd), name) {
                    (Some(d), Some(n)) => d.join(n),
                    _ => continue,
                };
                if m.contains(EventMask::ISDIR) {
                    if m.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        self.add(&path);
                        self.add_below(&path);
                        relevant = true;
                    }
                } else if m
                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO | EventMask::ATTRIB)
                {
                    relevant = true;
                }
            }
        }
        relevant
    }
}
