//! Which files does any process hold open? One pass over `/proc/*/fd` per run, instead
//! of the earlier implementation's one `lsof` process per file.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The (device, inode) pairs of regular files some process has open.
#[derive(Debug, Default)]
pub struct OpenFiles {
    held: HashSet<(u64, u64)>,
    /// Processes whose descriptors could not be read (not root, or exited meanwhile).
    pub unreadable_processes: usize,
}

impl OpenFiles {
    /// Scans `/proc`. Shuttle's own descriptors are ignored.
    pub fn scan() -> OpenFiles {
        Self::scan_in(Path::new("/proc"))
    }

    fn scan_in(proc_root: &Path) -> OpenFiles {
        let mut out = OpenFiles::default();
        let me = std::process::id().to_string();
        let Ok(entries) = std::fs::read_dir(proc_root) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str() else { continue };
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                out.unreadable_processes += 1;
                continue;
            };
            for fd in fds.flatten() {
                // metadata() follows the magic link to the open file itself, even if it
                // was renamed or unlinked since it was opened.
                if let Ok(m) = std::fs::metadata(fd.path())
                    && m.is_file()
                {
                    out.held.insert((m.dev(), m.ino()));
                }
            }
        }
        out
    }

    pub fn is_open(&self, dev: u64, ino: u64) -> bool {
        self.held.contains(&(dev, ino))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_held_by_a_child_process_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        std::fs::write(&f, "x").unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; sleep 30")
            .arg(&f)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let m = std::fs::metadata(&f).unwrap();
        let open = OpenFiles::scan();
        let _ = child.kill();
        let _ = child.wait();
        assert!(open.is_open(m.dev(), m.ino()));
    }
}
