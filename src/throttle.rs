//! Admission and throttling (docs/design.md §2): may the next file be
//! admitted without filling a disk or breaking a daily or per-run limit?
//!
//! Free space is `statvfs` f_bavail, read fresh for every admitted file (once per
//! target filesystem), minus what this run has reserved for files admitted and not yet
//! finished. Targets on the same filesystem are checked together: the file's size is
//! counted once per target there and the largest threshold applies. Free space that
//! cannot be read counts as not enough.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::fsx::{self, mib};
use crate::journal::SpaceSample;
use crate::states::ThrottleReason;

const MIB: u64 = 1_048_576;

/// One place Shuttle writes to.
#[derive(Debug, Clone)]
pub struct Target {
    /// "quarantine", "destination" or "hazard_archive".
    pub name: &'static str,
    pub path: PathBuf,
    /// Bytes that must stay free after a copy.
    pub threshold: u64,
}

/// Targets sharing one filesystem.
#[derive(Debug)]
struct FsGroup {
    /// Device id, or `None` when the target could not be stat'ed.
    dev: Option<u64>,
    targets: Vec<usize>,
    threshold: u64,
    reserved: u64,
    /// The filesystem's size, read once (`None`: it could not be read): a file larger
    /// than it never fits, and a filesystem's size does not change under a run the way
    /// its free space does.
    total: Option<u64>,
}

/// Why admission stopped (docs/design.md §2 "On denial").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    DiskSpace { message: String, path: PathBuf },
    DailyLimit { message: String },
    PerRunLimit { message: String },
}

impl Denial {
    /// The JSON report's `throttle.reason`.
    pub fn reason(&self) -> ThrottleReason {
        match self {
            Denial::DiskSpace { .. } => ThrottleReason::DiskSpace,
            Denial::DailyLimit { .. } => ThrottleReason::DailyLimit,
            Denial::PerRunLimit { .. } => ThrottleReason::PerRunLimit,
        }
    }

    /// The words after `THROTTLE REASON:` in the log.
    pub fn title(&self) -> &'static str {
        match self {
            Denial::DiskSpace { .. } => "Insufficient disk space",
            Denial::DailyLimit { .. } => "Daily Limit Reached",
            Denial::PerRunLimit { .. } => "Per-Run Limit Reached",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Denial::DiskSpace { message, .. }
            | Denial::DailyLimit { message }
            | Denial::PerRunLimit { message } => message,
        }
    }

    /// The one log line an administrator greps for.
    pub fn log_line(&self) -> String {
        format!("THROTTLE REASON: {}: {}", self.title(), self.message())
    }
}

/// Space reserved for one admitted file, released when it finishes.
#[derive(Debug)]
pub struct Ticket {
    size: u64,
    per_group: Vec<(usize, u64)>,
}

/// Limits in files and bytes; 0 = none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub day_files: u64,
    pub day_bytes: u64,
    pub run_files: u64,
    pub run_bytes: u64,
}

/// Free space read for a group of files admitted together ([`Admission::admit_reading`]):
/// one reading per filesystem, taken when the group's first file is judged.
#[derive(Debug, Default)]
pub struct FreeSpace(Vec<Option<u64>>);

/// The admission gate of one run.
#[derive(Debug)]
pub struct Admission {
    enabled: bool,
    targets: Vec<Target>,
    groups: Vec<FsGroup>,
    limits: Limits,
    /// Files and bytes finished today before this run started (from the journal).
    day_before: (u64, u64),
    /// Admitted this run and not failed (counts toward the daily limits).
    day_this_run: (u64, u64),
    /// Admitted this run (counts toward the per-run limits).
    run: (u64, u64),
}

/// The targets of a configuration, with their thresholds.
pub fn targets(cfg: &Config) -> Vec<Target> {
    let t = &cfg.throttle;
    let mut v = vec![
        Target {
            name: "quarantine",
            path: cfg.quarantine_path.clone(),
            threshold: t.quarantine_free_mb.saturating_mul(MIB),
        },
        Target {
            name: "destination",
            path: cfg.destination_path.clone(),
            threshold: t.destination_free_mb.saturating_mul(MIB),
        },
    ];
    if let Some(h) = cfg.hazard_archive() {
        v.push(Target {
            name: "hazard_archive",
            path: h.to_path_buf(),
            threshold: t.hazard_free_mb.saturating_mul(MIB),
        });
    }
    v
}

impl Admission {
    /// `day_before` = files and bytes the journal says finished today.
    pub fn new(cfg: &Config, day_before: (u64, u64)) -> Admission {
        let t = &cfg.throttle;
        let limits = Limits {
            day_files: t.max_files_per_day,
            day_bytes: t.max_mb_per_day.saturating_mul(MIB),
            run_files: t.max_files_per_run,
            run_bytes: t.max_mb_per_run.saturating_mul(MIB),
        };
        Self::with_targets(t.enabled, targets(cfg), limits, day_before)
    }

    pub fn with_targets(
        enabled: bool,
        targets: Vec<Target>,
        limits: Limits,
        day_before: (u64, u64),
    ) -> Admission {
        let mut groups: Vec<FsGroup> = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let dev = std::fs::metadata(&target.path).ok().map(|m| m.dev());
            match groups.iter_mut().find(|g| dev.is_some() && g.dev == dev) {
                Some(g) => {
                    g.targets.push(i);
                    g.threshold = g.threshold.max(target.threshold);
                }
                None => groups.push(FsGroup {
                    dev,
                    targets: vec![i],
                    threshold: target.threshold,
                    reserved: 0,
                    total: fsx::space(&target.path).ok().map(|s| s.total),
                }),
            }
        }
        Admission {
            enabled,
            targets,
            groups,
            limits,
            day_before,
            day_this_run: (0, 0),
            run: (0, 0),
        }
    }

    /// Decides on a file of `size` bytes. On `Ok` its space is reserved until
    /// [`Admission::finish`].
    pub fn admit(&mut self, size: u64) -> Result<Ticket, Denial> {
        self.admit_reading(size, &mut FreeSpace::default())
    }

    /// [`Admission::admit`] for one of several files admitted together: each
    /// filesystem's free space is read once, for the first of them, and kept in
    /// `free`. What the earlier ones need is reserved before the next is judged, so
    /// each file is still checked against the space left for it; only the reading
    /// is shared (`statfs` once per group rather than once per file).
    pub fn admit_reading(&mut self, size: u64, free: &mut FreeSpace) -> Result<Ticket, Denial> {
        if !self.enabled {
            self.run.0 += 1;
            self.run.1 += size;
            return Ok(Ticket {
                size,
                per_group: Vec::new(),
            });
        }
        self.check_limits(size)?;
        let mut per_group = Vec::with_capacity(self.groups.len());
        for (gi, g) in self.groups.iter().enumerate() {
            let need = size.saturating_mul(g.targets.len() as u64);
            let probe = &self.targets[g.targets[0]].path;
            let names = self.group_names(g);
            let reading = match free.0.get(gi).copied().flatten() {
                Some(available) => Ok(available),
                None => fsx::space(probe).map(|s| s.available),
            };
            let free_now = match reading {
                Ok(available) => {
                    if free.0.len() <= gi {
                        free.0.resize(gi + 1, None);
                    }
                    free.0[gi] = Some(available);
                    available
                }
                Err(e) => {
                    return Err(Denial::DiskSpace {
                        message: format!(
                            "{names} {}: free space cannot be read ({e}); counted as not enough",
                            probe.display()
                        ),
                        path: probe.clone(),
                    });
                }
            };
            let required = g.reserved.saturating_add(need).saturating_add(g.threshold);
            if free_now < required {
                let shared = if g.targets.len() > 1 {
                    " (same filesystem: the file is counted once per target)"
                } else {
                    ""
                };
                return Err(Denial::DiskSpace {
                    message: format!(
                        "{names} {}: {:.1} MB free, {:.1} MB required ({:.1} MB for the file{shared}, {:.1} MB reserved for files in flight, {:.0} MB must stay free)",
                        probe.display(),
                        mib(free_now),
                        mib(required),
                        mib(need),
                        mib(g.reserved),
                        mib(g.threshold),
                    ),
                    path: probe.clone(),
                });
            }
            per_group.push((gi, need));
        }
        for &(gi, need) in &per_group {
            self.groups[gi].reserved += need;
        }
        self.run.0 += 1;
        self.run.1 += size;
        self.day_this_run.0 += 1;
        self.day_this_run.1 += size;
        Ok(Ticket { size, per_group })
    }

    fn check_limits(&self, size: u64) -> Result<(), Denial> {
        let l = &self.limits;
        let day_files = self.day_before.0 + self.day_this_run.0;
        let day_bytes = self.day_before.1 + self.day_this_run.1;
        if l.day_files > 0 && day_files + 1 > l.day_files {
            return Err(Denial::DailyLimit {
                message: format!(
                    "{day_files} files handled today (including in flight), throttle_max_file_count_per_day is {}",
                    l.day_files
                ),
            });
        }
        if l.day_bytes > 0 && day_bytes + size > l.day_bytes {
            return Err(Denial::DailyLimit {
                message: format!(
                    "{:.1} MB handled today (including in flight) + {:.1} MB for the next file would exceed throttle_max_file_volume_per_day_mb {:.0}",
                    mib(day_bytes),
                    mib(size),
                    mib(l.day_bytes)
                ),
            });
        }
        if l.run_files > 0 && self.run.0 + 1 > l.run_files {
            return Err(Denial::PerRunLimit {
                message: format!(
                    "{} files admitted this run, throttle_max_file_count_per_run is {}",
                    self.run.0, l.run_files
                ),
            });
        }
        // A single file larger than the per-run volume is still admitted as the first
        // file of a run; otherwise it would block the drop directory forever.
        if l.run_bytes > 0 && self.run.1 + size > l.run_bytes && self.run.0 > 0 {
            return Err(Denial::PerRunLimit {
                message: format!(
                    "{:.1} MB admitted this run + {:.1} MB for the next file would exceed throttle_max_file_volume_per_run_mb {:.0}",
                    mib(self.run.1),
                    mib(size),
                    mib(l.run_bytes)
                ),
            });
        }
        Ok(())
    }

    /// Releases a finished file's reservation. A file that did not complete (failed or
    /// left for later) no longer counts toward today's totals.
    pub fn finish(&mut self, ticket: Ticket, completed: bool) {
        for (gi, need) in ticket.per_group {
            self.groups[gi].reserved = self.groups[gi].reserved.saturating_sub(need);
        }
        if !completed {
            self.day_this_run.0 = self.day_this_run.0.saturating_sub(1);
            self.day_this_run.1 = self.day_this_run.1.saturating_sub(ticket.size);
        }
    }

    /// What decides [`Admission::never_fits`]: a file set aside as too large is tried
    /// again when this changes (a bigger filesystem, a lower threshold).
    pub fn fingerprint(&self) -> String {
        let mut s = format!("throttle={};day={}", self.enabled, self.limits.day_bytes);
        for g in &self.groups {
            let total = fsx::space(&self.targets[g.targets[0]].path)
                .map(|s| s.total)
                .unwrap_or(0);
            s.push_str(&format!(";{}x{}+{}", total, g.targets.len(), g.threshold));
        }
        s
    }

    /// Why a file of `size` bytes could never be admitted, even with every target
    /// otherwise empty: larger than a target filesystem's whole size less its
    /// threshold (counted once per target sharing it), or than the daily volume
    /// limit. Such a file is set aside as too large rather than stopping admission
    /// for the files behind it. Sizes are apparent sizes (`st_size`): what the copy
    /// writes, sparse or not, the same figure admission reserves.
    pub fn never_fits(&self, size: u64) -> Option<String> {
        for g in &self.groups {
            let probe = &self.targets[g.targets[0]].path;
            let Some(total) = g.total else {
                continue;
            };
            let need = size.saturating_mul(g.targets.len() as u64);
            let threshold = if self.enabled { g.threshold } else { 0 };
            // A threshold no file could meet is the configuration's fault, not the
            // file's: that stays a throttle stop.
            if threshold < total && need.saturating_add(threshold) > total {
                return Some(format!(
                    "{:.1} MB cannot fit {} {} even when it is empty ({:.1} MB filesystem{})",
                    mib(size),
                    self.group_names(g),
                    probe.display(),
                    mib(total),
                    if threshold > 0 {
                        format!(", {:.0} MB must stay free", mib(threshold))
                    } else {
                        String::new()
                    }
                ));
            }
        }
        let day = self.limits.day_bytes;
        if self.enabled && day > 0 && size > day {
            return Some(format!(
                "{:.1} MB is more than throttle_max_file_volume_per_day_mb ({:.0})",
                mib(size),
                mib(day)
            ));
        }
        None
    }

    fn group_names(&self, g: &FsGroup) -> String {
        g.targets
            .iter()
            .map(|&i| self.targets[i].name)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Free space per target now, for the journal's trend data.
    pub fn samples(&self) -> Vec<(SpaceSample, u64)> {
        samples_of(&self.targets)
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

/// Free space of every target of `cfg` now.
pub fn targets_space(cfg: &Config) -> Vec<(SpaceSample, u64)> {
    samples_of(&targets(cfg))
}

fn samples_of(targets: &[Target]) -> Vec<(SpaceSample, u64)> {
    let now = chrono::Utc::now().timestamp();
    targets
        .iter()
        .filter_map(|t| {
            let s = fsx::space(&t.path).ok()?;
            Some((
                SpaceSample {
                    time: now,
                    target: t.name.to_string(),
                    path: t.path.display().to_string(),
                    free_bytes: s.available,
                    threshold_bytes: t.threshold,
                },
                s.total,
            ))
        })
        .collect()
}

/// What Shuttle-owned data occupies a full filesystem, largest first (docs/design.md §2,
/// "cleanup recommendations"). Computed only when admission stops, never per file.
pub fn recommendations(cfg: &Config, full: &Path, delivered_last_7_days: u64) -> Vec<String> {
    let dev = std::fs::metadata(full).ok().map(|m| m.dev());
    let same_fs = |p: &Path| std::fs::metadata(p).ok().map(|m| m.dev()) == dev && dev.is_some();
    let mut items: Vec<(u64, String)> = Vec::new();
    if same_fs(&cfg.quarantine_path) {
        let (files, bytes, _) = tree_usage(&cfg.quarantine_path);
        if files > 0 {
            items.push((
                bytes,
                format!(
                    "quarantine {} holds {files} leftover file(s), {:.1} MB: not from a running Shuttle; inspect and remove them",
                    cfg.quarantine_path.display(),
                    mib(bytes)
                ),
            ));
        }
    }
    if let Some(h) = cfg.hazard_archive()
        && same_fs(h)
    {
        let (files, bytes, oldest) = tree_usage(h);
        let age = oldest
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| format!(", oldest entry {} days old", d.as_secs() / 86_400))
            .unwrap_or_default();
        items.push((
            bytes,
            format!(
                "hazard archive {} holds {files} file(s), {:.1} MB{age}: hand old entries to your analyst and remove them",
                h.display(),
                mib(bytes)
            ),
        ));
    }
    if same_fs(&cfg.destination_path) {
        items.push((
            delivered_last_7_days,
            format!(
                "destination {} received {:.1} MB from Shuttle in the last 7 days: make sure its consumers move files away",
                cfg.destination_path.display(),
                mib(delivered_last_7_days)
            ),
        ));
    }
    items.sort_by_key(|i| std::cmp::Reverse(i.0));
    items.into_iter().map(|(_, s)| s).collect()
}

/// Files, bytes and oldest mtime below `root` (not following symlinks).
fn tree_usage(root: &Path) -> (u64, u64, Option<std::time::SystemTime>) {
    let (mut files, mut bytes, mut oldest) = (0u64, 0u64, None::<std::time::SystemTime>);
    let Ok(root) = fsx::Beneath::open(root) else {
        return (files, bytes, oldest);
    };
    fsx::walk(root.root(), |step| {
        let fsx::Step::Entry(e) = step else {
            return false;
        };
        let Ok(m) = e.dir.meta(&e.name) else {
            return false;
        };
        if m.kind == rustix::fs::FileType::Directory {
            return true;
        }
        if m.kind == rustix::fs::FileType::RegularFile {
            files += 1;
            bytes += m.size;
            if let Ok(ns) = u64::try_from(m.mtime_ns) {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
                oldest = Some(oldest.map_or(t, |o: std::time::SystemTime| o.min(t)));
            }
        }
        false
    });
    (files, bytes, oldest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: Limits, day_before: (u64, u64)) -> Admission {
        let d = std::env::temp_dir();
        let t = vec![Target {
            name: "destination",
            path: d,
            threshold: 0,
        }];
        Admission::with_targets(true, t, limits, day_before)
    }

    /// A group shares one free-space reading, and each file is still judged against
    /// what the files before it left: with room for three files above the threshold,
    /// the fourth of the group is denied.
    #[test]
    fn a_group_sharing_one_reading_reserves_each_file_before_the_next() {
        let d = std::env::temp_dir();
        let free = fsx::space(&d).unwrap().available;
        let size = 64 * MIB;
        let t = vec![Target {
            name: "destination",
            path: d,
            threshold: free.saturating_sub(3 * size + size / 2),
        }];
        let mut a = Admission::with_targets(true, t, Limits::default(), (0, 0));
        let mut reading = FreeSpace::default();
        for n in 0..3 {
            a.admit_reading(size, &mut reading)
                .unwrap_or_else(|e| panic!("file {n}: {}", e.log_line()));
        }
        let denied = a.admit_reading(size, &mut reading).unwrap_err();
        assert_eq!(
            denied.reason().as_str(),
            "disk_space",
            "{}",
            denied.log_line()
        );
        assert!(
            denied
                .log_line()
                .contains("192.0 MB reserved for files in flight"),
            "{}",
            denied.log_line()
        );
    }

    #[test]
    fn daily_count_counts_earlier_runs() {
        let mut a = gate(
            Limits {
                day_files: 10,
                ..Default::default()
            },
            (7, 0),
        );
        for _ in 0..3 {
            a.admit(1).unwrap();
        }
        assert_eq!(a.admit(1).unwrap_err().reason().as_str(), "daily_limit");
    }

    #[test]
    fn daily_volume_allows_exactly_up_to_the_limit() {
        let mut a = gate(
            Limits {
                day_bytes: 50 * MIB,
                ..Default::default()
            },
            (6, 30 * MIB),
        );
        for _ in 0..4 {
            a.admit(5 * MIB).unwrap();
        }
        let d = a.admit(5 * MIB).unwrap_err();
        assert!(
            d.log_line()
                .starts_with("THROTTLE REASON: Daily Limit Reached"),
            "{}",
            d.log_line()
        );
    }

    #[test]
    fn failed_files_give_back_their_daily_share() {
        let mut a = gate(
            Limits {
                day_files: 1,
                ..Default::default()
            },
            (0, 0),
        );
        let t = a.admit(1).unwrap();
        a.finish(t, false);
        assert!(a.admit(1).is_ok());
    }

    #[test]
    fn a_huge_first_file_passes_the_per_run_volume() {
        let mut a = gate(
            Limits {
                run_bytes: MIB,
                ..Default::default()
            },
            (0, 0),
        );
        a.admit(5 * MIB).unwrap();
        assert_eq!(a.admit(1).unwrap_err().reason().as_str(), "per_run_limit");
    }

    #[test]
    fn unreadable_free_space_is_not_enough() {
        let t = vec![Target {
            name: "destination",
            path: "/nonexistent/shuttle".into(),
            threshold: 0,
        }];
        let mut a = Admission::with_targets(true, t, Limits::default(), (0, 0));
        let d = a.admit(1).unwrap_err();
        assert_eq!(d.reason().as_str(), "disk_space");
        assert!(d.message().contains("cannot be read"), "{}", d.message());
    }
}
