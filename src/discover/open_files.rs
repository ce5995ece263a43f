//! Which files does any process hold open, and which process? One pass over
//! `/proc/*/fd` per run, instead of the earlier implementation's one `lsof` process
//! per file.
//!
//! The pass keeps, for each open regular file, the first process seen holding it and
//! how many do, so that a skipped file's log line names its holder ("open in another
//! process: pid 4242 (rsync)"): what an administrator would otherwise look up with
//! `lsof` or `fuser` after the fact, when the process may be gone. [`writers_of`]
//! does the same for one file, for a refusal found later (a read lease refused at
//! copy time), and counts only processes holding it open for writing.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The regular files some process has open, by (device, inode).
#[derive(Debug, Default)]
pub struct OpenFiles {
    held: HashMap<(u64, u64), Holders>,
    /// Processes whose descriptors could not be read (not root, or exited meanwhile).
    pub unreadable_processes: usize,
}

/// Who holds a file open: the first process found, and how many processes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holders {
    pub pid: u32,
    pub count: u32,
}

impl Holders {
    /// `pid 4242 (rsync)`, `pid 4242 (rsync) and 2 other processes`. The command name
    /// is read now (`/proc/<pid>/comm`, which any user may read) and left out when the
    /// process has exited since.
    pub fn describe(&self) -> String {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .ok()
            .map(|c| c.trim_end_matches('\n').to_string())
            .filter(|c| !c.is_empty());
        let first = match comm {
            // A command name is chosen by whoever started the process: shown escaped.
            Some(c) => format!("pid {} ({})", self.pid, c.escape_debug()),
            None => format!("pid {}", self.pid),
        };
        match self.count.saturating_sub(1) {
            0 => first,
            1 => format!("{first} and 1 other process"),
            n => format!("{first} and {n} other processes"),
        }
    }
}

impl OpenFiles {
    /// Scans `/proc`. Shuttle's own descriptors are ignored.
    pub fn scan() -> OpenFiles {
        let mut out = OpenFiles::default();
        out.unreadable_processes = each_open_file(Path::new("/proc"), |pid, _, dev, ino| {
            out.held
                .entry((dev, ino))
                .and_modify(|h| h.count += 1)
                .or_insert(Holders { pid, count: 1 });
        });
        out
    }

    pub fn is_open(&self, dev: u64, ino: u64) -> bool {
        self.held.contains_key(&(dev, ino))
    }

    /// Who holds the file open, if any process the scan could see does.
    pub fn holders(&self, dev: u64, ino: u64) -> Option<Holders> {
        self.held.get(&(dev, ino)).copied()
    }
}

/// The processes holding the file (device, inode) open for writing, found by a pass
/// over `/proc` made now; `None` when none could be seen (not root, or gone since).
pub fn writers_of(dev: u64, ino: u64) -> Option<Holders> {
    let mut found: Option<Holders> = None;
    each_open_file(Path::new("/proc"), |pid, fd, d, i| {
        if (d, i) == (dev, ino) && opened_for_writing(pid, fd) {
            match &mut found {
                Some(h) => h.count += 1,
                None => found = Some(Holders { pid, count: 1 }),
            }
        }
    });
    found
}

/// Whether descriptor `fd` of `pid` was opened for writing (`flags:` in its fdinfo,
/// octal, access mode not `O_RDONLY`). Unreadable: assumed so, as the kernel's
/// refusal of the lease says some process writes.
fn opened_for_writing(pid: u32, fd: &str) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
        return true;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_none_or(|flags| flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
}

/// Calls `found(pid, fd, dev, ino)` for every regular file open in every process
/// under `proc_root` but this one; returns how many processes' descriptors could not
/// be read.
fn each_open_file(proc_root: &Path, mut found: impl FnMut(u32, &str, u64, u64)) -> usize {
    let mut unreadable = 0;
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return unreadable;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            unreadable += 1;
            continue;
        };
        for fd in fds.flatten() {
            // metadata() follows the magic link to the open file itself, even if it
            // was renamed or unlinked since it was opened.
            if let Ok(m) = std::fs::metadata(fd.path())
                && m.is_file()
                && let Some(n) = fd.file_name().to_str()
            {
                found(pid, n, m.dev(), m.ino());
            }
        }
    }
    unreadable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child holding `f` open on descriptor 3, `>>` (writing) or `<` (reading).
    fn holder(f: &Path, how: &str) -> std::process::Child {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3{how}\"$0\"; exec sleep 30"))
            .arg(f)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        child
    }

    #[test]
    fn a_file_held_by_a_child_process_is_seen_with_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        std::fs::write(&f, "x").unwrap();
        let mut child = holder(&f, "<");
        let m = std::fs::metadata(&f).unwrap();
        let open = OpenFiles::scan();
        let described = open.holders(m.dev(), m.ino()).map(|h| h.describe());
        let writers = writers_of(m.dev(), m.ino());
        let _ = child.kill();
        let _ = child.wait();
        assert!(open.is_open(m.dev(), m.ino()));
        assert_eq!(
            described.as_deref(),
            Some(format!("pid {} (sleep)", child.id()).as_str())
        );
        assert_eq!(writers, None, "a reader is not a writer");
    }

    #[test]
    fn the_writers_of_a_file_are_found_by_their_open_mode() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("written");
        std::fs::write(&f, "x").unwrap();
        let mut reader = holder(&f, "<");
        let mut writer = holder(&f, ">>");
        let m = std::fs::metadata(&f).unwrap();
        let writers = writers_of(m.dev(), m.ino());
        let open = OpenFiles::scan().holders(m.dev(), m.ino());
        for c in [&mut reader, &mut writer] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(
            writers,
            Some(Holders {
                pid: writer.id(),
                count: 1
            })
        );
        assert_eq!(open.map(|h| h.count), Some(2), "both holders are counted");
        let gone = Holders {
            pid: writer.id(),
            count: 3,
        };
        assert_eq!(
            gone.describe(),
            format!("pid {} and 2 other processes", writer.id()),
            "an exited process is named by its pid alone"
        );
    }
}
