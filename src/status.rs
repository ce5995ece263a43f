//! `shuttle status` (docs/design.md §6, §2 "space trends"): today's counts against the limits,
//! free space per target against its threshold, consumption and a projection of the
//! days left before the threshold is reached, the last runs, the hazard archive size.
//!
//! Everything comes from the journal plus one `statvfs` per target; nothing is written.

use serde::Serialize;

use crate::config::{self, CommandLine, Config};
use crate::fsx::{self, mib};
use crate::journal::{self, Journal, RunRow, SpaceSample};
use crate::states::ExitCode;
use crate::throttle;

const DAY: i64 = 86_400;

#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub path: String,
    pub free_mb: Option<f64>,
    pub threshold_mb: f64,
    /// Free space lost since the first sample of today (negative: space was freed).
    pub consumed_today_mb: Option<f64>,
    /// Average free space lost per day over the last 7 days of samples.
    pub avg_daily_consumption_mb: Option<f64>,
    /// Days until free space reaches the threshold at that rate; `None` when the trend
    /// is flat, rising, or unknown.
    pub projected_days_to_threshold: Option<f64>,
    pub below_threshold: bool,
}

#[derive(Debug, Serialize)]
pub struct Limit {
    pub used: u64,
    /// 0 = no limit.
    pub limit: u64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub day: String,
    pub files_today: Limit,
    pub mb_today: Limit,
    /// Today's volume exactly (`mb_today` counts whole MB, as the daily limit does).
    pub bytes_today: u64,
    pub throttle_enabled: bool,
    pub targets: Vec<TargetStatus>,
    pub hazard_archive_mb: Option<f64>,
    pub last_runs: Vec<RunRow>,
    /// Fleet mode: every node with its last heartbeat and claims, and the fleet's
    /// totals of today (absent for a journal of one node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<journal::FleetStatus>,
}

/// Builds the status from the journal and the filesystems, at `now` (unix seconds).
pub fn gather(
    cfg: &Config,
    journal: &dyn Journal,
    now: i64,
) -> Result<Status, journal::JournalError> {
    let day = journal::local_day(chrono::Local::now());
    let (mut files, mut bytes) = journal.day_totals(&day)?;
    // On cut-over day the earlier implementation's tracking file counts too, as it
    // does for the run's daily limits (run id 0: no run of this process).
    if let Some((f, b)) = crate::legacy::day_totals(&cfg.tracking_data_path, journal, 0, &day) {
        files += f;
        bytes += b;
    }
    let midnight = chrono::Local::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .and_then(|t| t.and_local_timezone(chrono::Local).earliest())
        .map(|t| t.timestamp())
        .unwrap_or(now - DAY);
    let mut targets = Vec::new();
    for t in throttle::targets(cfg) {
        let free = fsx::space(&t.path).ok().map(|s| s.available);
        let samples = journal.space_samples(t.name, now - 7 * DAY)?;
        let today: Vec<&SpaceSample> = samples.iter().filter(|s| s.time >= midnight).collect();
        let consumed_today = match (today.first(), free) {
            (Some(first), Some(f)) => Some(first.free_bytes as f64 - f as f64),
            _ => None,
        };
        let avg = trend_per_day(&samples, free, now);
        let projected = match (avg, free) {
            (Some(rate), Some(f)) if rate > 0.0 => {
                Some(((f as f64 - t.threshold as f64) / rate).max(0.0))
            }
            _ => None,
        };
        targets.push(TargetStatus {
            target: t.name.to_string(),
            path: t.path.display().to_string(),
            free_mb: free.map(mib),
            threshold_mb: mib(t.threshold),
            consumed_today_mb: consumed_today.map(|b| b / 1_048_576.0),
            avg_daily_consumption_mb: avg.map(|b| b / 1_048_576.0),
            projected_days_to_threshold: projected.map(|d| (d * 10.0).round() / 10.0),
            below_threshold: free.is_some_and(|f| f < t.threshold),
        });
    }
    let hazard_archive_mb = cfg.hazard_archive().map(|h| mib(dir_bytes(h)));
    Ok(Status {
        day,
        files_today: Limit {
            used: files,
            limit: cfg.throttle.max_files_per_day,
        },
        mb_today: Limit {
            used: bytes / 1_048_576,
            limit: cfg.throttle.max_mb_per_day,
        },
        bytes_today: bytes,
        throttle_enabled: cfg.throttle.enabled,
        targets,
        hazard_archive_mb,
        fleet: journal.fleet_status()?,
        last_runs: journal.last_runs(5)?,
    })
}

/// Bytes of free space lost per day: from the oldest sample of the window to now.
/// `None` with less than an hour of history.
fn trend_per_day(samples: &[SpaceSample], free_now: Option<u64>, now: i64) -> Option<f64> {
    let first = samples.first()?;
    let (last_free, last_time) = match free_now {
        Some(f) => (f, now),
        None => {
            let l = samples.last()?;
            (l.free_bytes, l.time)
        }
    };
    let span = last_time - first.time;
    if span < 3600 {
        return None;
    }
    Some((first.free_bytes as f64 - last_free as f64) / (span as f64 / DAY as f64))
}

/// Bytes of the regular files below `root` ([`crate::fsx::walk`], no symlink followed).
fn dir_bytes(root: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(root) = crate::fsx::Beneath::open(root) {
        crate::fsx::walk(root.root(), |step| {
            let crate::fsx::Step::Entry(e) = step else {
                return false;
            };
            match e.dir.meta(&e.name) {
                Ok(m) if m.kind == rustix::fs::FileType::Directory => true,
                Ok(m) if m.kind == rustix::fs::FileType::RegularFile => {
                    total += m.size;
                    false
                }
                _ => false,
            }
        });
    }
    total
}

/// "2 of 100 files", "2 files (no daily limit)".
fn files_text(l: &Limit) -> String {
    if l.limit == 0 {
        format!("{} files (no daily limit)", l.used)
    } else {
        format!("{} of {} files", l.used, l.limit)
    }
}

/// "2.0 MB of 100 MB", "300 bytes (no daily limit)": today's volume exactly, never
/// "0 MB" for a few small files.
fn volume_text(bytes: u64, limit_mb: u64) -> String {
    if limit_mb == 0 {
        format!("{} (no daily limit)", fsx::volume(bytes))
    } else {
        format!("{} of {limit_mb} MB", fsx::volume(bytes))
    }
}

/// Today's use of a filesystem, from its free space: when others freed more than was
/// written, "none (free space grew …)" rather than a negative figure.
fn consumed(mb: Option<f64>) -> String {
    match mb {
        Some(x) if x < 0.0 => format!("none (free space grew {})", mb_volume(-x)),
        Some(x) => mb_volume(x),
        None => "unknown".into(),
    }
}

/// The average daily use of a filesystem: a volume a day, how much free space grew a
/// day when it grew on average, or why there is none yet.
fn per_day(mb: Option<f64>) -> String {
    match mb {
        Some(x) if x >= 0.0 => format!("avg {}/day", mb_volume(x)),
        Some(x) => format!("avg none (free space grew {}/day)", mb_volume(-x)),
        None => "no daily average yet (under an hour of samples)".into(),
    }
}

/// A non-negative figure in MB, for people ([`fsx::volume`]).
fn mb_volume(mb: f64) -> String {
    fsx::volume((mb * 1_048_576.0).round() as u64)
}

/// Prints the status for people.
pub fn print(s: &Status) {
    println!("Shuttle status for {}", s.day);
    println!(
        "  today: {}, {}",
        files_text(&s.files_today),
        volume_text(s.bytes_today, s.mb_today.limit)
    );
    println!(
        "  throttle: {}",
        if s.throttle_enabled { "on" } else { "off" }
    );
    for t in &s.targets {
        let projection = match t.projected_days_to_threshold {
            Some(d) => format!("threshold reached in ~{d:.1} days at this rate"),
            None => "no consumption trend toward the threshold".into(),
        };
        println!(
            "  {} {}: {} free, threshold {:.0} MB{}; used today {}, {}; {projection}",
            t.target,
            t.path,
            t.free_mb.map_or_else(|| "unknown".into(), mb_volume),
            // As configured (`throttle_free_space_mb`): "10000 MB", not "9.8 GB".
            t.threshold_mb,
            if t.below_threshold {
                " (BELOW THRESHOLD)"
            } else {
                ""
            },
            consumed(t.consumed_today_mb),
            per_day(t.avg_daily_consumption_mb),
        );
    }
    if let Some(h) = s.hazard_archive_mb {
        println!("  hazard archive: {}", mb_volume(h));
    }
    if let Some(f) = &s.fleet {
        println!(
            "  fleet: {} node(s), {} claim(s) in flight, today {} files, {}",
            f.nodes.len(),
            f.claims_in_flight,
            f.today_files,
            fsx::volume(f.today_bytes)
        );
        for n in &f.nodes {
            let silent = if n.state == "running" && n.heartbeat_age_seconds > n.lease_seconds {
                " (SILENT PAST ITS LEASE)"
            } else {
                ""
            };
            println!(
                "    {} pid {} {}: last heartbeat {} ({} s ago){silent}, {} claim(s) in flight, run #{}",
                n.name,
                n.pid,
                n.state,
                n.last_heartbeat,
                n.heartbeat_age_seconds,
                n.claims_in_flight,
                n.run_id
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    println!("  last runs:");
    for r in &s.last_runs {
        println!(
            "    #{} started {} finished {} exit {}",
            r.id,
            r.started,
            r.finished.as_deref().unwrap_or("(running or crashed)"),
            r.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// `shuttle status [--json]`; returns the exit code.
pub fn main(cli: &CommandLine, json: bool) -> ExitCode {
    let loaded = match config::load(cli) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::Usage;
        }
    };
    let cfg = &loaded.config;
    let journal = match journal::open(cfg) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("shuttle status: {e}");
            return ExitCode::Failed;
        }
    };
    match gather(cfg, &*journal, chrono::Utc::now().timestamp()) {
        Ok(s) if json => match serde_json::to_string_pretty(&s) {
            Ok(text) => {
                println!("{text}");
                ExitCode::Ok
            }
            Err(e) => {
                eprintln!("shuttle status: {e}");
                ExitCode::Failed
            }
        },
        Ok(s) => {
            print(&s);
            ExitCode::Ok
        }
        Err(e) => {
            eprintln!("shuttle status: {e}");
            ExitCode::Failed
        }
    }
}
