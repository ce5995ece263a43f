//! Discovery (docs/design.md §1.5): which files under `source_path` may be handled this run.
//!
//! Symlinks are never followed; FIFOs, sockets and devices are never opened; files
//! still being written (recently modified, or open in some process), unsafe names and
//! Shuttle's own temp files are skipped for this run, each with a logged reason.
//! A candidate costs only its relative path and a few numbers (docs/design.md §3), packed,
//! and spilled to disk in sorted runs beyond a fixed budget ([`queue`]).
//!
//! Name rules ([`unsafe_name`]), applied to every file and directory name: never
//! allowed are names that are not UTF-8, start with `-`, or hold control or Unicode
//! format characters (bidirectional overrides, zero-width characters). By default,
//! as the earlier implementation did, hidden names (`.name`, also AppleDouble `._x`,
//! `.DS_Store` and rsync's `.name.XXXXXX` temp files), names holding any of
//! `\ > < | * $ & ; \`` (several are invalid on the Windows clients reading the
//! destination over SMB) and names holding `..` are skipped too; [`NameRules`]
//! relaxes each of these three rules (`allow_hidden_names`,
//! `allow_special_characters`, `allow_double_dots`).

mod open_files;
pub mod queue;

pub use open_files::{Holders, OpenFiles, writers_of};
pub use queue::{Candidates, Queue};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fsx;
use crate::states::SkipKind;

/// Admission order (docs/design.md §2, "priority when space is limited").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Oldest,
    Newest,
    Smallest,
    Largest,
}

/// A file that may be admitted.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Path relative to `source_path`; always valid UTF-8.
    pub rel: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    /// Device and inode: with size and mtime, the file's identity for files set aside.
    pub dev: u64,
    pub ino: u64,
}

/// Why a file was left alone this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    Symlink,
    Special(&'static str),
    UnsafeName(&'static str),
    OwnTempFile,
    /// Changed less than `stability_seconds` (`window`) ago: old enough for a run
    /// `wait` seconds from now (rounded up) if it stays unchanged.
    RecentlyModified {
        window: u64,
        wait: u64,
    },
    /// Some process holds it open: `holders` names it (`pid 4242 (rsync)`).
    OpenByProcess {
        holders: String,
    },
    /// More than one hard link (and `allow_hard_links` off): another name may lead
    /// to it from outside the drop directory.
    HardLinked(u64),
    Unreadable(String),
}

impl SkipReason {
    /// [`SkipReason::RecentlyModified`] from nanoseconds: the window in whole seconds
    /// (as configured), the wait rounded up (never "in 0 s" for a file still too new).
    fn recently_modified(window_ns: i64, wait_ns: i64) -> SkipReason {
        const NS: u64 = 1_000_000_000;
        let ns = |v: i64| u64::try_from(v).unwrap_or(0);
        SkipReason::RecentlyModified {
            window: ns(window_ns) / NS,
            wait: ns(wait_ns).div_ceil(NS),
        }
    }

    /// Short stable label, used to count skips in the report.
    pub fn label(&self) -> SkipKind {
        match self {
            SkipReason::Symlink => SkipKind::Symlink,
            SkipReason::Special(_) => SkipKind::SpecialFile,
            SkipReason::UnsafeName(_) => SkipKind::UnsafeName,
            SkipReason::OwnTempFile => SkipKind::TempFile,
            SkipReason::RecentlyModified { .. } => SkipKind::RecentlyModified,
            SkipReason::OpenByProcess { .. } => SkipKind::OpenByProcess,
            SkipReason::HardLinked(_) => SkipKind::HardLinked,
            SkipReason::Unreadable(_) => SkipKind::Unreadable,
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Symlink => write!(f, "symlink (never followed)"),
            SkipReason::Special(kind) => write!(f, "{kind}, not a regular file"),
            SkipReason::UnsafeName(why) => write!(f, "unsafe name: {why}"),
            SkipReason::OwnTempFile => write!(f, "Shuttle temp file"),
            SkipReason::RecentlyModified { window, wait } => write!(
                f,
                "modified too recently (stability check): old enough in {wait} s if unchanged (stability_seconds = {window})"
            ),
            SkipReason::OpenByProcess { holders } => {
                write!(f, "open in another process: {holders}")
            }
            SkipReason::HardLinked(n) => write!(
                f,
                "has {n} hard links, one may lie outside the drop directory (allow_hard_links = true takes such files)"
            ),
            SkipReason::Unreadable(e) => write!(f, "cannot read: {e}"),
        }
    }
}

/// How discovery decides.
#[derive(Debug, Clone)]
pub struct Rules {
    /// `None` = `skip_stability_check`.
    pub stability: Option<Duration>,
    pub priority: Priority,
    pub priority_paths: Vec<PathBuf>,
    pub names: NameRules,
    /// Where the list of waiting files spills to beyond its memory budget (an
    /// unnamed temporary file); `None`: the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
    /// Take files with more than one hard link.
    pub allow_hard_links: bool,
}

/// The name rules a site may relax; all `false` (strict) by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameRules {
    /// Take names starting with `.`.
    pub allow_hidden: bool,
    /// Take names holding any of [`SPECIAL_CHARACTERS`].
    pub allow_special: bool,
    /// Take names holding `..`.
    pub allow_double_dots: bool,
}

/// Characters the earlier implementation refused in names (shell metacharacters and
/// characters Windows does not allow in file names).
pub const SPECIAL_CHARACTERS: &[char] = &['\\', '>', '<', '|', '*', '$', '&', ';', '`'];

/// What one walk of the source found.
pub struct Discovery {
    /// Admission order: priority paths first, then by `priority`.
    pub candidates: Candidates,
    /// Count of skipped entries by reason label.
    pub skipped: BTreeMap<SkipKind, u64>,
    /// Every subdirectory seen (relative), for the empty-directory cleanup.
    pub dirs: Vec<PathBuf>,
}

impl Discovery {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    fn skip(&mut self, rel: &Path, reason: SkipReason) {
        // Names may hold control characters: log them escaped.
        tracing::info!("skipped {:?}: {reason}", crate::names::shown(rel));
        *self.skipped.entry(reason.label()).or_default() += 1;
    }
}

/// Why a name is unsafe under `rules`, if it is.
pub fn unsafe_name(name: &std::ffi::OsStr, rules: &NameRules) -> Option<&'static str> {
    let Some(s) = name.to_str() else {
        return Some("not valid UTF-8");
    };
    if s.starts_with('-') {
        return Some("starts with '-'");
    }
    if s.chars().any(char::is_control) {
        return Some("contains control characters");
    }
    if s.chars().any(crate::names::is_format) {
        return Some(
            "contains Unicode format characters (bidirectional override or zero-width character)",
        );
    }
    // Shuttle's own temp names start with a dot too: they are skipped as such later.
    if !rules.allow_hidden && s.starts_with('.') && !fsx::is_temp_name(s) {
        return Some(
            "hidden name (starts with '.'; set allow_hidden_names = true to take such files)",
        );
    }
    if !rules.allow_special && s.contains(SPECIAL_CHARACTERS) {
        return Some(
            "contains one of \\ > < | * $ & ; ` (set allow_special_characters = true to take such files)",
        );
    }
    if !rules.allow_double_dots && s.contains("..") {
        return Some("contains '..' (set allow_double_dots = true to take such files)");
    }
    None
}

/// Walks `source` ([`fsx::walk`]: beneath its handle, never following symlinks) and
/// returns the candidates in admission order.
pub fn discover(source: &Path, rules: &Rules, open: &OpenFiles) -> Discovery {
    let mut out = Discovery {
        candidates: Candidates::new(rules),
        skipped: BTreeMap::new(),
        dirs: Vec::new(),
    };
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(i64::MAX);
    // A window beyond i64's 292 years is as good as forever (a plain cast would wrap
    // it negative and turn the check off).
    let stability_ns = rules
        .stability
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let root = match fsx::Beneath::open(source) {
        Ok(r) => r,
        Err(e) => {
            out.skip(Path::new(""), SkipReason::Unreadable(e.to_string()));
            return out;
        }
    };
    fsx::walk(root.root(), |step| {
        let e = match step {
            fsx::Step::Entry(e) => e,
            fsx::Step::Unreadable(rel_dir, e) => {
                out.skip(rel_dir, SkipReason::Unreadable(e.to_string()));
                return false;
            }
        };
        let (name, rel) = (&e.name, &e.rel);
        // lstat: a symlink is reported as such, never followed.
        let meta = match e.dir.meta(name) {
            Ok(m) => m,
            Err(err) => {
                out.skip(rel, SkipReason::Unreadable(err.to_string()));
                return false;
            }
        };
        use rustix::fs::FileType;
        let ft = meta.kind;
        if ft == FileType::Symlink {
            out.skip(rel, SkipReason::Symlink);
            return false;
        }
        if let Some(why) = unsafe_name(name, &rules.names) {
            out.skip(rel, SkipReason::UnsafeName(why));
            return false;
        }
        if ft == FileType::Directory {
            out.dirs.push(rel.clone());
            return true;
        }
        if ft != FileType::RegularFile {
            let kind = match ft {
                FileType::Fifo => "FIFO",
                FileType::Socket => "socket",
                _ => "device",
            };
            out.skip(rel, SkipReason::Special(kind));
            return false;
        }
        if name.to_str().is_some_and(fsx::is_temp_name) {
            out.skip(rel, SkipReason::OwnTempFile);
            return false;
        }
        if let Some(window) = stability_ns
            && let Some(wait_ns) = unstable_for(&meta, now_ns, window)
        {
            out.skip(rel, SkipReason::recently_modified(window, wait_ns));
            return false;
        }
        if !rules.allow_hard_links && meta.nlink > 1 {
            out.skip(rel, SkipReason::HardLinked(meta.nlink));
            return false;
        }
        if let Some(holders) = open.holders(meta.dev, meta.ino) {
            let holders = holders.describe();
            out.skip(rel, SkipReason::OpenByProcess { holders });
            return false;
        }
        out.candidates.push(Candidate {
            rel: rel.clone(),
            size: meta.size,
            mtime_ns: meta.mtime_ns,
            dev: meta.dev,
            ino: meta.ino,
        });
        false
    });
    out.dirs.sort();
    out
}

/// How much longer a file must stay unchanged to be stable (`None`: it is). A file is
/// stable when its mtime is at least `window` old. A file whose mtime lies in the
/// future (a device with a wrong clock) is judged by its ctime instead, which only
/// this host's kernel sets, so it is not held back forever.
fn unstable_for(meta: &fsx::Meta, now_ns: i64, window: i64) -> Option<i64> {
    let changed = if meta.mtime_ns > now_ns {
        meta.ctime_ns
    } else {
        meta.mtime_ns
    };
    let age = now_ns.saturating_sub(changed);
    (age < window).then(|| window.saturating_sub(age))
}

/// Sorts candidates into admission order ([`Candidates`] yields this same order).
pub fn order(candidates: &mut [Candidate], rules: &Rules) {
    let group = |c: &Candidate| {
        rules
            .priority_paths
            .iter()
            .position(|p| c.rel.starts_with(p))
            .unwrap_or(rules.priority_paths.len())
    };
    candidates.sort_by(|a, b| {
        let by_priority = match rules.priority {
            Priority::Oldest => a.mtime_ns.cmp(&b.mtime_ns),
            Priority::Newest => b.mtime_ns.cmp(&a.mtime_ns),
            Priority::Smallest => a.size.cmp(&b.size),
            Priority::Largest => b.size.cmp(&a.size),
        };
        group(a)
            .cmp(&group(b))
            .then(by_priority)
            .then_with(|| a.rel.cmp(&b.rel))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(mtime_ns: i64, ctime_ns: i64) -> fsx::Meta {
        fsx::Meta {
            kind: rustix::fs::FileType::RegularFile,
            dev: 0,
            ino: 0,
            nlink: 1,
            uid: 0,
            size: 0,
            mtime_ns,
            ctime_ns,
        }
    }

    #[test]
    fn the_stability_check_says_how_long_a_file_must_still_wait() {
        const S: i64 = 1_000_000_000;
        let now = 1_000 * S;
        // Modified 4.2 s ago, window 5 s: 0.8 s left, which the log rounds up to 1 s.
        let wait = unstable_for(
            &changed(now - 4_200_000_000, now - 4_200_000_000),
            now,
            5 * S,
        );
        assert_eq!(wait, Some(800_000_000));
        let skip = SkipReason::recently_modified(5 * S, 800_000_000);
        assert_eq!(
            skip.to_string(),
            "modified too recently (stability check): old enough in 1 s if unchanged (stability_seconds = 5)"
        );
        // Exactly the window old: stable.
        assert_eq!(
            unstable_for(&changed(now - 5 * S, now - 5 * S), now, 5 * S),
            None
        );
        // An mtime an hour ahead (a device's clock) is judged by the ctime, 2 s ago.
        assert_eq!(
            unstable_for(&changed(now + 3600 * S, now - 2 * S), now, 5 * S),
            Some(3 * S)
        );
        // Window 0 only holds back a file whose ctime is ahead of this host's clock,
        // until that time has come.
        assert_eq!(unstable_for(&changed(now, now), now, 0), None);
        assert_eq!(
            unstable_for(&changed(now + 7 * S, now + 7 * S), now, 0),
            Some(7 * S)
        );
    }

    fn c(rel: &str, size: u64, mtime_ns: i64) -> Candidate {
        Candidate {
            rel: rel.into(),
            size,
            mtime_ns,
            dev: 0,
            ino: 0,
        }
    }

    #[test]
    fn priority_paths_come_first_then_the_priority_order() {
        let mut v = vec![
            c("a", 5, 1),
            c("urgent/b", 1, 9),
            c("c", 9, 2),
            c("urgent/d", 7, 3),
        ];
        let rules = Rules {
            stability: None,
            priority: Priority::Largest,
            priority_paths: vec!["urgent".into()],
            names: NameRules::default(),
            spill_dir: None,
            allow_hard_links: false,
        };
        order(&mut v, &rules);
        let names: Vec<_> = v.iter().map(|c| c.rel.to_str().unwrap()).collect();
        assert_eq!(names, ["urgent/d", "urgent/b", "c", "a"]);
    }

    #[test]
    fn unsafe_names() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let strict = NameRules::default();
        let relaxed = NameRules {
            allow_hidden: true,
            allow_special: true,
            allow_double_dots: true,
        };
        for rules in [&strict, &relaxed] {
            assert!(unsafe_name(OsStr::new("-rf"), rules).is_some());
            assert!(unsafe_name(OsStr::new("a\nb"), rules).is_some());
            assert!(unsafe_name(OsStr::from_bytes(b"\xff"), rules).is_some());
            assert!(unsafe_name(OsStr::new("report\u{202e}txt.scr"), rules).is_some());
            assert!(unsafe_name(OsStr::new("a\u{200b}b"), rules).is_some());
            assert!(unsafe_name(OsStr::new("plain name.txt"), rules).is_none());
            assert!(unsafe_name(OsStr::new(".shuttle-tmp.12"), rules).is_none());
        }
        for name in [
            ".DS_Store",
            "._x",
            ".name.Ab12Cd",
            "a b\\c.txt",
            "a>b",
            "a<b",
            "a|b",
            "a*b",
            "$x",
            "a&b",
            "a;b",
            "a`b",
            "a..b",
            "..",
        ] {
            assert!(unsafe_name(OsStr::new(name), &strict).is_some(), "{name}");
            assert!(unsafe_name(OsStr::new(name), &relaxed).is_none(), "{name}");
        }
    }
}
