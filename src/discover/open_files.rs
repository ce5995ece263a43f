//! Which files does any process hold open, and which process? One pass over
//! `/proc/*/fd` per run, instead of the earlier implementation's one `lsof` process
//! per file.
//!
//! The pass keeps, for each open regular file, the first process seen holding it and
//! how many processes do, so that a skipped file's log line names its holder ("open
//! in another process: pid 4242 (rsync)"): what an administrator would otherwise look
//! up with `lsof` or `fuser` after the fact, when the process may be gone. Only the
//! processes this user may inspect are seen: all of them as root, else its own.
//! [`writers_of`] does the same for one file when a read lease is refused or broken
//! later in the run, and counts only the processes holding it open for writing.
//!
//! Another process's file is looked at only through its descriptor's magic link, with
//! `statx(AT_STATX_DONT_SYNC)` asking for the type and inode alone ([`identity`]): the
//! kernel answers from what it has cached, so a file held open on a mount whose server
//! has stopped answering (a FUSE daemon that hangs, as the tests show; a hard-mounted
//! NFS share, whose client answers this from its cache too) does not stall the run, as
//! a plain `stat` of it would, until the server returns.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

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
    pub processes: u32,
}

impl Holders {
    /// `pid 4242 (rsync)`, `pid 4242 (rsync) and 2 other processes`. The command name
    /// is read now (`/proc/<pid>/comm`, which any user may read) and left out when the
    /// process has exited since.
    pub fn describe(&self) -> String {
        let comm = std::fs::read(format!("/proc/{}/comm", self.pid))
            .ok()
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .trim_end_matches('\n')
                    .to_string()
            })
            .filter(|c| !c.is_empty());
        let first = match comm {
            // A command name is chosen by whoever started the process: shown escaped.
            Some(c) => format!("pid {} ({})", self.pid, c.escape_debug()),
            None => format!("pid {}", self.pid),
        };
        match self.processes.saturating_sub(1) {
            0 => first,
            1 => format!("{first} and 1 other process"),
            n => format!("{first} and {n} other processes"),
        }
    }
}

impl OpenFiles {
    /// Scans `/proc`. Shuttle's own descriptors are ignored; a process holding a file
    /// on several descriptors counts once.
    pub fn scan() -> OpenFiles {
        let mut out = OpenFiles::default();
        let mut this_process = HashSet::new();
        for (pid, dir) in processes() {
            let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
                out.unreadable_processes += 1;
                continue;
            };
            this_process.clear();
            let mut unreadable = false;
            for fd in fds.flatten() {
                match identity(&fd.path()) {
                    Ok(Some(file)) if this_process.insert(file) => {
                        out.held
                            .entry(file)
                            .or_insert(Holders { pid, processes: 0 })
                            .processes += 1;
                    }
                    // A descriptor closed since the listing, or the process gone.
                    Ok(_) | Err(rustix::io::Errno::NOENT | rustix::io::Errno::SRCH) => {}
                    // Anything else (statx refused by a seccomp filter, say) leaves this
                    // process's files unknown: counted, so that nothing relies on the scan.
                    Err(_) => unreadable = true,
                }
            }
            out.unreadable_processes += usize::from(unreadable);
        }
        out
    }

    /// Who holds the file open, if any process the scan could see does.
    pub fn holders(&self, dev: u64, ino: u64) -> Option<Holders> {
        self.held.get(&(dev, ino)).copied()
    }
}

/// The processes holding the file (device, inode) open for writing, found by a pass
/// over `/proc` made now; `None` when none could be seen.
///
/// Each descriptor's `fdinfo` (its open flags and inode number) is read first, and
/// only a descriptor with the file's inode number is followed to its file to compare
/// the device: no other process's files are touched, so a file open on a hung
/// network mount elsewhere cannot stall the worker asking.
pub fn writers_of(dev: u64, ino: u64) -> Option<Holders> {
    let mut found: Option<Holders> = None;
    for (pid, dir) in processes() {
        let Ok(infos) = std::fs::read_dir(dir.join("fdinfo")) else {
            continue;
        };
        let writes = infos.flatten().any(|info| {
            std::fs::read_to_string(info.path()).is_ok_and(|text| {
                let (flags, inode) = fdinfo_fields(&text);
                inode == Some(ino)
                    && flags.is_none_or(|f| f & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
                    && identity(&dir.join("fd").join(info.file_name())) == Ok(Some((dev, ino)))
            })
        });
        if writes {
            found.get_or_insert(Holders { pid, processes: 0 }).processes += 1;
        }
    }
    found
}

/// The (device, inode) of the regular file a descriptor's magic link `/proc/<pid>/fd/<n>`
/// leads to (the open file itself, even if renamed or unlinked since it was opened);
/// `None` for anything else. Only the type and inode are asked for, from the kernel's
/// cache (`AT_STATX_DONT_SYNC`): FUSE and NFS answer that without asking their server,
/// which may not be answering. Both are fixed for an open file, so the cache cannot be
/// stale about them.
fn identity(fd_link: &Path) -> rustix::io::Result<Option<(u64, u64)>> {
    use rustix::fs::{AtFlags, CWD, FileType, StatxFlags, makedev, statx};
    let x = statx(
        CWD,
        fd_link,
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::TYPE | StatxFlags::INO,
    )?;
    Ok(
        (FileType::from_raw_mode(x.stx_mode.into()) == FileType::RegularFile)
            .then(|| (makedev(x.stx_dev_major, x.stx_dev_minor), x.stx_ino)),
    )
}

/// The open flags (octal in `flags:`) and inode number (`ino:`) of a descriptor's
/// `fdinfo`. ([`writers_of`] counts flags it cannot read as writing: the lease's
/// refusal already says some process writes.)
fn fdinfo_fields(text: &str) -> (Option<u32>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    (
        field("flags:").and_then(|f| u32::from_str_radix(f, 8).ok()),
        field("ino:").and_then(|i| i.parse().ok()),
    )
}

/// Every process under `/proc` but this one: its pid and its directory.
fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    let me = std::process::id();
    std::fs::read_dir(Path::new("/proc"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            (pid != me).then(|| (pid, entry.path()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A child holding `f` open as `redirections` say (`3<` reading, `3>>` writing),
    /// returned once it is `sleep` with them in place.
    fn holder(f: &Path, redirections: &str) -> std::process::Child {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec {redirections}; exec sleep 30"))
            .arg(f)
            .spawn()
            .unwrap();
        let comm = format!("/proc/{}/comm", child.id());
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
            assert!(started.elapsed().as_secs() < 10, "the holder never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    fn end(children: &mut [&mut std::process::Child]) {
        for c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn a_file_held_by_a_child_process_is_seen_with_its_holder() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        std::fs::write(&f, "x").unwrap();
        // Held twice by one process (as `cmd >>log 2>&1` holds its log): one holder.
        let mut child = holder(&f, "3<\"$0\" 4<\"$0\"");
        let m = std::fs::metadata(&f).unwrap();
        let described = OpenFiles::scan()
            .holders(m.dev(), m.ino())
            .map(|h| h.describe());
        let writers = writers_of(m.dev(), m.ino());
        end(&mut [&mut child]);
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
        let mut reader = holder(&f, "3<\"$0\"");
        let mut writer = holder(&f, "3>>\"$0\" 4>>\"$0\"");
        let m = std::fs::metadata(&f).unwrap();
        let writers = writers_of(m.dev(), m.ino());
        let open = OpenFiles::scan().holders(m.dev(), m.ino());
        end(&mut [&mut reader, &mut writer]);
        assert_eq!(
            writers,
            Some(Holders {
                pid: writer.id(),
                processes: 1
            })
        );
        assert_eq!(open.map(|h| h.processes), Some(2), "both processes count");
    }

    #[test]
    fn several_holders_and_a_process_gone_read_plainly() {
        // No process can have this pid (above any pid_max), so no name is found.
        let gone = Holders {
            pid: u32::MAX,
            processes: 3,
        };
        assert_eq!(gone.describe(), "pid 4294967295 and 2 other processes");
        let two = Holders {
            pid: u32::MAX,
            processes: 2,
        };
        assert_eq!(two.describe(), "pid 4294967295 and 1 other process");
    }
}
