//! Is another process writing this file? Asked of the kernel with a read lease
//! (`fcntl(F_SETLEASE, F_RDLCK)`), not by reading other processes' `/proc` entries.
//!
//! The kernel grants a read lease only while no process has the file open for
//! writing (it answers `EAGAIN` otherwise), and breaks it as soon as any process opens
//! the file for writing or truncates it. So: a lease taken before a source is copied,
//! and still held (`F_GETLEASE`) after its last byte was read, proves no process
//! wrote to it meanwhile and none held it open for writing. The same holds for the
//! hash check before a source is unlinked.
//!
//! A lease needs the file's owner or `CAP_LEASE`: an unprivileged service user
//! handling other users' uploads needs `AmbientCapabilities=CAP_LEASE` in its unit.
//! Some filesystems (some NFS setups) and `fs.leases-enable = 0` refuse leases
//! altogether. Where no lease can be had, the caller falls back to `/proc` (see
//! [`crate::discover::OpenFiles`]), which only sees every process when run as root.
//!
//! A writer that opens a leased file waits (at most `/proc/sys/fs/lease-break-time`
//! seconds) until the lease is released; the copy loop checks the lease after every
//! buffer and gives the file up at once when it is broken, so a writer waits at
//! most the time of one read. The lease-break signal (SIGIO) is ignored: its default
//! action would end the process, and [`still_held`] is how Shuttle learns of a break.
//!
//! rustix has no `F_SETLEASE`/`F_GETLEASE`, so these two `fcntl`s go through `libc`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Once;

/// What the kernel said to a read lease.
#[derive(Debug)]
pub enum Taken {
    /// Granted: no process has the file open for writing. Released when the file is
    /// closed (or by [`release`]).
    Held,
    /// Refused because some process has the file open for writing.
    Writer,
    /// Refused for another reason: not the owner and no `CAP_LEASE`, or the
    /// filesystem does not support leases. Shuttle cannot tell this way.
    Unavailable(io::Error),
}

static IGNORE_SIGIO: Once = Once::new();

/// The processes found holding a file open for writing when its lease was refused or
/// broke, for the message that says the file was left because of them: shown as
/// `: pid 4242 (rsync)`, or as nothing when none could be seen (another user's
/// process without root, or one that has not finished opening the file yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writers(Option<String>);

impl Writers {
    /// Gives up `f`'s lease, if it holds one (a writer waiting for it goes on), then
    /// looks for `f`'s writers: one pass over `/proc`, made only now.
    pub fn of(f: &File) -> Writers {
        release(f);
        let Ok(m) = f.metadata() else {
            return Writers(None);
        };
        Writers(crate::discover::writers_of(m.dev(), m.ino()).map(|h| h.describe()))
    }
}

impl std::fmt::Display for Writers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(who) => write!(f, ": {who}"),
            None => Ok(()),
        }
    }
}

/// Asks for a read lease on `f` (which must be open read-only).
pub fn take(f: &File) -> Taken {
    IGNORE_SIGIO.call_once(|| {
        // SAFETY: installs no handler; SIG_IGN is async-signal-safe by definition.
        unsafe {
            libc::signal(libc::SIGIO, libc::SIG_IGN);
        }
    });
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        return Taken::Held;
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EBUSY) => Taken::Writer,
        _ => Taken::Unavailable(e),
    }
}

/// Is the read lease taken on `f` still in force (not broken by a writer's open or a
/// truncate, not timed out)?
pub fn still_held(f: &File) -> bool {
    // SAFETY: as in take().
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) };
    rc == libc::F_RDLCK
}

/// Gives the lease up before the file is closed (nothing happens without one).
pub fn release(f: &File) {
    // SAFETY: as in take().
    unsafe {
        libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK);
    }
}

/// How a run tells whether a file is still being written, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterCheck {
    /// Read leases; where one cannot be had for a file, `/proc` covers every process.
    LeaseOrProc,
    /// Read leases; where one cannot be had for a file, nothing tells: that file is
    /// left alone (never copied, never removed).
    LeaseOnly,
}

impl WriterCheck {
    /// `proc_complete`: the `/proc` scan read every process's descriptors.
    pub fn new(proc_complete: bool) -> WriterCheck {
        if proc_complete {
            WriterCheck::LeaseOrProc
        } else {
            WriterCheck::LeaseOnly
        }
    }
}

/// Probes whether this process can take a lease on a file it does not own, i.e.
/// whether it is root or has `CAP_LEASE`: creates nothing, reads the capability sets.
pub fn has_cap_lease() -> bool {
    // CAP_LEASE is capability 28; CapEff in /proc/self/status is a hex bit mask.
    const CAP_LEASE: u32 = 28;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << CAP_LEASE) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_lease_is_refused_while_the_file_is_open_for_writing_and_broken_by_a_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut w = File::create(&p).unwrap();
        w.write_all(b"x").unwrap();
        let r = File::open(&p).unwrap();
        assert!(matches!(take(&r), Taken::Writer));
        drop(w);
        assert!(matches!(take(&r), Taken::Held));
        assert!(still_held(&r));
        // A writer opening meanwhile breaks it (O_NONBLOCK: do not wait for the
        // release; the open fails with EWOULDBLOCK but the break is started).
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p);
        assert!(!still_held(&r));
        release(&r);
    }
}
