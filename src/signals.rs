//! SIGTERM and SIGINT for the commands that handle files (`run`, `watch`, `rescan`).
//!
//! The first one asks the run to stop admitting files: the files in flight finish, are
//! recorded and have their sources removed as usual, and the rest stay in the drop
//! directory for the next run (`rescan`: the deliveries being rescanned are recorded,
//! the rest wait for the next retro-scan). SIGTERM is what systemd sends on `systemctl stop` and at
//! shutdown, and what `timeout` sends from cron. A second SIGINT (an impatient
//! operator's Ctrl-C) ends the process at once with exit 130; the next run's recovery
//! handles the files it had begun, as after any crash.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::states::ExitCode;

/// [`stop_flag`] for a command that goes on without it: a failure to install the
/// handlers is one warning, and a stop signal then ends `what` at once (the next run's
/// recovery handles what it had begun, as after a crash).
pub fn stop_flag_or_warn(what: &str) -> Option<Arc<AtomicBool>> {
    match stop_flag() {
        Ok(flag) => Some(flag),
        Err(e) => {
            tracing::warn!(
                "cannot install the SIGTERM/SIGINT handlers ({e}): a stop signal ends this {what} at once, and the next run's recovery handles what it had begun"
            );
            None
        }
    }
}

/// Installs the handlers; the flag they raise.
pub fn stop_flag() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    // Registered before the flag itself, so that it sees the flag as the first
    // SIGINT left it.
    signal_hook::flag::register_conditional_shutdown(
        SIGINT,
        ExitCode::Interrupted.into(),
        Arc::clone(&flag),
    )?;
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}
