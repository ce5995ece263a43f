//! Kill points for the crash-safety tests.
//!
//! They exist only in builds with the `crashpoints` cargo feature, which `scripts/test`
//! enables; in every other build [`here`] is an empty inline function and the binary
//! reads none of the variables below, so no environment variable can pause or kill a
//! production run.
//!
//! `SHUTTLE_PAUSE_AT=<point name>` with `SHUTTLE_PAUSE_FILE=<path>` instead pauses at
//! the first point of that name: Shuttle creates `<path>.reached` and waits (at most
//! 60 s) until `<path>` exists, so a test can change the disk between two steps.
//!
//! With `SHUTTLE_CRASH_AT=N` in the environment the process kills itself with SIGKILL
//! at the N-th kill point it reaches, exactly as a power cut or `kill -9` would stop
//! it between two steps. `SHUTTLE_CRASH_TRACE=1` prints every kill point reached, so
//! a test can count them.

/// A point between two steps where a crash must leave every file safe (no-op: this
/// build has no kill points).
#[cfg(not(feature = "crashpoints"))]
#[inline(always)]
pub fn here(_name: &str) {}

#[cfg(feature = "crashpoints")]
pub use hooks::here;

#[cfg(feature = "crashpoints")]
mod hooks {

    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static REACHED: AtomicU64 = AtomicU64::new(0);

    struct Settings {
        kill_at: Option<u64>,
        trace: bool,
        pause: Option<(String, std::path::PathBuf)>,
    }

    fn settings() -> &'static Settings {
        static S: OnceLock<Settings> = OnceLock::new();
        S.get_or_init(|| Settings {
            kill_at: std::env::var("SHUTTLE_CRASH_AT")
                .ok()
                .and_then(|v| v.parse().ok()),
            trace: std::env::var_os("SHUTTLE_CRASH_TRACE").is_some(),
            pause: std::env::var("SHUTTLE_PAUSE_AT")
                .ok()
                .zip(std::env::var_os("SHUTTLE_PAUSE_FILE").map(std::path::PathBuf::from)),
        })
    }

    /// A point between two steps where a crash must leave every file safe.
    pub fn here(name: &str) {
        let s = settings();
        if s.kill_at.is_none() && !s.trace && s.pause.is_none() {
            return;
        }
        if let Some((at, file)) = &s.pause
            && at == name
        {
            pause(file);
        }
        let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
        if s.trace {
            eprintln!("crashpoint {n}: {name}");
        }
        if s.kill_at == Some(n) {
            eprintln!("crashpoint {n}: {name}: killing myself (SHUTTLE_CRASH_AT)");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }

    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    fn pause(file: &std::path::Path) {
        if PAUSED.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut reached = file.as_os_str().to_owned();
        reached.push(".reached");
        let _ = std::fs::write(&reached, b"");
        let started = std::time::Instant::now();
        while !file.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
