//! The waiting files of a run, in admission order, in bounded memory.
//!
//! A drop directory may hold millions of files. Each waiting file costs only its
//! relative path and a few numbers, packed: the paths in one byte arena, the numbers
//! in a fixed-size record. Once those reach [`MEMORY_BUDGET`], the records are
//! sorted and written out as one sorted run to an unnamed temporary file (in the
//! journal's directory; it disappears when closed, or when the process dies).
//! Admission then merges the runs (a k-way merge over a binary heap), reading each
//! run through a small buffer. Memory therefore does not grow with the number of
//! files; a run of 1,000,000 files writes about 40 MB of spill.
//!
//! The order is [`super::order`]'s: priority paths first, then the configured
//! priority, then the path (component by component). Hand-written rather than a
//! crate: external-sort crates found either keep one file per run or need every
//! record to be a serde value, and the format here is five fields.
//!
//! If the spill file cannot be written, the candidates simply stay in memory (and
//! the failure is logged): more memory, but no file is left out.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Priority;
use super::{Candidate, Rules};

/// In-memory records and path bytes before a sorted run is spilled.
pub const MEMORY_BUDGET: usize = 8 << 20;
/// Read buffer of all runs together while merging (each gets at least 4 KiB).
const MERGE_BUFFERS: usize = 4 << 20;

/// One waiting file, packed. The path is `arena[off..off + len]`.
#[derive(Clone, Copy)]
struct Packed {
    /// Priority-path group, then the priority as an ascending number.
    group: u32,
    key: u64,
    size: u64,
    mtime_ns: i64,
    dev: u64,
    ino: u64,
    off: usize,
    len: usize,
}

/// Every candidate of one discovery, in bounded memory (see the module doc).
pub struct Candidates {
    priority: Priority,
    priority_paths: Vec<PathBuf>,
    spill_dir: Option<PathBuf>,
    budget: usize,
    records: Vec<Packed>,
    arena: Vec<u8>,
    spill: Option<Spill>,
    /// Spilling failed once: keep everything in memory from then on.
    spill_failed: bool,
    len: u64,
}

/// Sorted runs, one after the other in one unnamed file.
struct Spill {
    file: File,
    /// (start, end) byte offsets of each run.
    runs: Vec<(u64, u64)>,
    end: u64,
}

impl Candidates {
    pub fn new(rules: &Rules) -> Candidates {
        Candidates {
            priority: rules.priority,
            priority_paths: rules.priority_paths.clone(),
            spill_dir: rules.spill_dir.clone(),
            budget: MEMORY_BUDGET,
            records: Vec::new(),
            arena: Vec::new(),
            spill: None,
            spill_failed: false,
            len: 0,
        }
    }

    /// With a smaller budget, to exercise spilling in tests.
    #[cfg(test)]
    fn with_budget(rules: &Rules, budget: usize) -> Candidates {
        Candidates {
            budget,
            ..Candidates::new(rules)
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs written to disk so far.
    pub fn spilled_runs(&self) -> usize {
        self.spill.as_ref().map_or(0, |s| s.runs.len())
    }

    pub fn push(&mut self, c: Candidate) {
        let bytes = c.rel.as_os_str().as_bytes();
        let group = self
            .priority_paths
            .iter()
            .position(|p| c.rel.starts_with(p))
            .unwrap_or(self.priority_paths.len()) as u32;
        // Ascending number for the configured priority (i64 flipped into u64 order).
        let ordered = |v: i64| (v as u64) ^ (1 << 63);
        let key = match self.priority {
            Priority::Oldest => ordered(c.mtime_ns),
            Priority::Newest => !ordered(c.mtime_ns),
            Priority::Smallest => c.size,
            Priority::Largest => !c.size,
        };
        self.records.push(Packed {
            group,
            key,
            size: c.size,
            mtime_ns: c.mtime_ns,
            dev: c.dev,
            ino: c.ino,
            off: self.arena.len(),
            len: bytes.len(),
        });
        self.arena.extend_from_slice(bytes);
        self.len += 1;
        let used = self.arena.len() + self.records.len() * std::mem::size_of::<Packed>();
        if used >= self.budget
            && !self.spill_failed
            && let Err(e) = self.spill_run()
        {
            tracing::warn!(
                "cannot spill the list of waiting files to disk ({e}); keeping it in memory"
            );
            self.spill_failed = true;
        }
    }

    fn sort(&mut self) {
        let arena = &self.arena;
        self.records.sort_unstable_by(|a, b| {
            (a.group, a.key)
                .cmp(&(b.group, b.key))
                .then_with(|| path_of(arena, a).cmp(path_of(arena, b)))
        });
    }

    /// Sorts what is in memory and appends it to the spill file as one run.
    fn spill_run(&mut self) -> std::io::Result<()> {
        if self.spill.is_none() {
            let dir = self.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
            self.spill = Some(Spill {
                file: tempfile::tempfile_in(dir)?,
                runs: Vec::new(),
                end: 0,
            });
        }
        self.sort();
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let start = spill.end;
        let mut w = BufWriter::with_capacity(256 << 10, Offset(&spill.file, start));
        let mut written = 0u64;
        for r in &self.records {
            let path = &self.arena[r.off..r.off + r.len];
            let len = u32::try_from(path.len()).map_err(std::io::Error::other)?;
            w.write_all(&r.group.to_le_bytes())?;
            w.write_all(&r.key.to_le_bytes())?;
            w.write_all(&r.size.to_le_bytes())?;
            w.write_all(&r.mtime_ns.to_le_bytes())?;
            w.write_all(&r.dev.to_le_bytes())?;
            w.write_all(&r.ino.to_le_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(path)?;
            written += (HEADER + path.len()) as u64;
        }
        w.flush()?;
        spill.runs.push((start, start + written));
        spill.end = start + written;
        self.records.clear();
        self.arena.clear();
        // Give the memory back: the next run fills it again only as files come.
        self.records.shrink_to(0);
        self.arena.shrink_to(0);
        Ok(())
    }

    /// The candidates in admission order.
    pub fn into_queue(mut self) -> Queue {
        self.sort();
        let memory = Run::Memory {
            records: std::mem::take(&mut self.records).into_iter(),
            arena: std::mem::take(&mut self.arena),
        };
        let mut runs = vec![memory];
        if let Some(spill) = self.spill.take() {
            let file = std::sync::Arc::new(spill.file);
            let each = (MERGE_BUFFERS / spill.runs.len().max(1)).max(4096);
            for (start, end) in spill.runs {
                runs.push(Run::Disk(DiskRun {
                    file: std::sync::Arc::clone(&file),
                    pos: start,
                    end,
                    buf: Vec::with_capacity(each),
                    at: 0,
                    cap: each,
                }));
            }
        }
        let mut q = Queue {
            runs,
            heap: BinaryHeap::new(),
            error: None,
            len: self.len,
            taken: 0,
        };
        for i in 0..q.runs.len() {
            q.refill(i);
        }
        q
    }
}

const HEADER: usize = 4 + 8 + 8 + 8 + 8 + 8 + 4;

fn path_of<'a>(arena: &'a [u8], r: &Packed) -> &'a Path {
    Path::new(OsStr::from_bytes(&arena[r.off..r.off + r.len]))
}

/// Writes at an offset of a file, advancing.
struct Offset<'a>(&'a File, u64);

impl Write for Offset<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write_at(buf, self.1)?;
        self.1 += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sorted source of candidates.
enum Run {
    Memory {
        records: std::vec::IntoIter<Packed>,
        arena: Vec<u8>,
    },
    Disk(DiskRun),
}

struct DiskRun {
    file: std::sync::Arc<File>,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
    cap: usize,
}

impl DiskRun {
    /// Makes at least `n` bytes available at `buf[at..]`, unless the run ends first.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        if self.buf.len() - self.at >= n {
            return Ok(true);
        }
        self.buf.drain(..self.at);
        self.at = 0;
        let want = self.cap.max(n) - self.buf.len();
        let left = (self.end - self.pos) as usize;
        let take = want.min(left);
        let old = self.buf.len();
        self.buf.resize(old + take, 0);
        self.file.read_exact_at(&mut self.buf[old..], self.pos)?;
        self.pos += take as u64;
        Ok(self.buf.len() >= n)
    }

    fn next(&mut self) -> std::io::Result<Option<Head>> {
        if !self.fill(HEADER)? {
            if self.buf.len() > self.at {
                return Err(std::io::Error::other("spill run ends inside a record"));
            }
            return Ok(None);
        }
        let h = &self.buf[self.at..self.at + HEADER];
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let group = u32_at(0);
        let key = u64_at(4);
        let size = u64_at(12);
        let mtime_ns = u64_at(20) as i64;
        let dev = u64_at(28);
        let ino = u64_at(36);
        let len = u32_at(44) as usize;
        if !self.fill(HEADER + len)? {
            return Err(std::io::Error::other("spill run ends inside a path"));
        }
        let path = self.buf[self.at + HEADER..self.at + HEADER + len].to_vec();
        self.at += HEADER + len;
        Ok(Some(Head {
            group,
            key,
            path,
            size,
            mtime_ns,
            dev,
            ino,
            run: 0,
        }))
    }
}

/// The smallest not yet taken candidate of one run.
struct Head {
    group: u32,
    key: u64,
    path: Vec<u8>,
    size: u64,
    mtime_ns: i64,
    dev: u64,
    ino: u64,
    run: usize,
}

impl Head {
    fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }
}

impl Ord for Head {
    fn cmp(&self, other: &Head) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, the merge wants the smallest.
        (other.group, other.key)
            .cmp(&(self.group, self.key))
            .then_with(|| other.path().cmp(self.path()))
    }
}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Head) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Head {
    fn eq(&self, other: &Head) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}

/// The candidates in admission order, taken one at a time.
pub struct Queue {
    runs: Vec<Run>,
    heap: BinaryHeap<Head>,
    error: Option<String>,
    len: u64,
    taken: u64,
}

impl Queue {
    /// How many candidates the queue started with.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// How many candidates have not been taken yet.
    pub fn left(&self) -> u64 {
        self.len - self.taken
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Why the queue ended early (the spill file could not be read back); the files
    /// not taken stay in the source.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn refill(&mut self, i: usize) {
        let next = match &mut self.runs[i] {
            Run::Memory { records, arena } => Ok(records.next().map(|r| Head {
                group: r.group,
                key: r.key,
                path: arena[r.off..r.off + r.len].to_vec(),
                size: r.size,
                mtime_ns: r.mtime_ns,
                dev: r.dev,
                ino: r.ino,
                run: 0,
            })),
            Run::Disk(d) => d.next(),
        };
        match next {
            Ok(Some(mut h)) => {
                h.run = i;
                self.heap.push(h);
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("cannot read back the spilled list of waiting files: {e}");
                tracing::error!("{why}");
                self.error.get_or_insert(why);
            }
        }
    }
}

impl Iterator for Queue {
    type Item = Candidate;

    fn next(&mut self) -> Option<Candidate> {
        if self.error.is_some() {
            return None;
        }
        let h = self.heap.pop()?;
        self.taken += 1;
        self.refill(h.run);
        if self.error.is_some() {
            return None;
        }
        Some(Candidate {
            rel: PathBuf::from(std::ffi::OsString::from_vec(h.path)),
            size: h.size,
            mtime_ns: h.mtime_ns,
            dev: h.dev,
            ino: h.ino,
        })
    }
}

use std::os::unix::ffi::OsStringExt;

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(priority: Priority, dir: &Path) -> Rules {
        Rules {
            stability: None,
            priority,
            priority_paths: vec!["urgent".into(), "b/c".into()],
            spill_dir: Some(dir.to_path_buf()),
            names: Default::default(),
            allow_hard_links: false,
        }
    }

    fn sample(n: usize) -> Vec<Candidate> {
        // Deterministic pseudo-random names, sizes and times, with ties.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut step = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let dirs = ["", "urgent/", "b/", "b/c/", "b.c/", "a/b/"];
        (0..n)
            .map(|i| {
                let d = dirs[(step() % dirs.len() as u64) as usize];
                Candidate {
                    rel: format!("{d}f{}-{i}.bin", step() % 50).into(),
                    size: step() % 7,
                    mtime_ns: (step() % 11) as i64 - 5,
                    dev: 1,
                    ino: i as u64,
                }
            })
            .collect()
    }

    #[test]
    fn same_order_as_sorting_in_memory_with_and_without_spill() {
        let dir = tempfile::tempdir().unwrap();
        for priority in [
            Priority::Oldest,
            Priority::Newest,
            Priority::Smallest,
            Priority::Largest,
        ] {
            let r = rules(priority, dir.path());
            let mut expected = sample(5_000);
            super::super::order(&mut expected, &r);
            let expected: Vec<_> = expected.into_iter().map(|c| c.rel).collect();
            for budget in [MEMORY_BUDGET, 4_000, 100] {
                let mut c = Candidates::with_budget(&r, budget);
                for x in sample(5_000) {
                    c.push(x);
                }
                if budget < MEMORY_BUDGET {
                    assert!(c.spilled_runs() > 1, "budget {budget} spills");
                }
                let q = c.into_queue();
                assert_eq!(q.len(), 5_000);
                let got: Vec<_> = q.map(|c| c.rel).collect();
                assert!(got == expected, "{priority:?} with budget {budget}");
            }
        }
    }

    #[test]
    fn sizes_and_times_survive_the_spill() {
        let dir = tempfile::tempdir().unwrap();
        let r = rules(Priority::Oldest, dir.path());
        let mut c = Candidates::with_budget(&r, 64);
        c.push(Candidate {
            rel: "x/y z.bin".into(),
            size: u64::MAX,
            mtime_ns: i64::MIN,
            dev: u64::MAX,
            ino: 7,
        });
        c.push(Candidate {
            rel: "a".into(),
            size: 0,
            mtime_ns: i64::MAX,
            dev: 0,
            ino: u64::MAX,
        });
        let got: Vec<_> = c
            .into_queue()
            .map(|c| (c.rel, c.size, c.mtime_ns, c.dev, c.ino))
            .collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("x/y z.bin"), u64::MAX, i64::MIN, u64::MAX, 7),
                (PathBuf::from("a"), 0, i64::MAX, 0, u64::MAX)
            ]
        );
    }

    #[test]
    fn an_unwritable_spill_directory_keeps_everything_in_memory() {
        let r = Rules {
            spill_dir: Some("/nonexistent/shuttle-spill".into()),
            ..rules(Priority::Smallest, Path::new("/"))
        };
        let mut c = Candidates::with_budget(&r, 100);
        for x in sample(300) {
            c.push(x);
        }
        assert_eq!(c.spilled_runs(), 0);
        assert_eq!(c.into_queue().count(), 300);
    }
}
