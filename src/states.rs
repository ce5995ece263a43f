//! The states a file, a run and the process end in, as types.
//!
//! Each crosses module boundaries — the run core decides them, the report, the
//! journal, `watch` and the metrics read them — so each is an enum here rather than a
//! string compared in several places. Their names on the outside (report JSON,
//! journal columns, log lines) are fixed: `as_str` gives exactly the strings earlier
//! versions wrote, and serialisation uses it, so reports and journals stay
//! compatible. A file's [`Outcome`] lives with the journal that stores it and is
//! re-exported here.

use serde::{Serialize, Serializer};

pub use crate::journal::Outcome;

/// Serialises a state by its stable name.
macro_rules! serialize_as_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// The process exit code (docs/design.md §1), the one list every command returns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExitCode {
    /// Finished: files may be suspect, admission may be throttled.
    #[default]
    Ok,
    /// A file failed, a file was newly set aside, or a runtime error.
    Failed,
    /// Usage or configuration error.
    Usage,
    /// Another run holds the lock.
    Locked,
    /// `watch`: a second SIGINT ends the process at once (128 + SIGINT).
    Interrupted,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Ok => 0,
            ExitCode::Failed => 1,
            ExitCode::Usage => 2,
            ExitCode::Locked => 3,
            ExitCode::Interrupted => 130,
        }
    }

    /// A failed output turns an otherwise successful exit into a failure.
    pub fn or_failed(self) -> ExitCode {
        if self == ExitCode::Ok {
            ExitCode::Failed
        } else {
            self
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c.code())
    }
}

impl From<ExitCode> for i32 {
    fn from(c: ExitCode) -> i32 {
        i32::from(c.code())
    }
}

/// Reports write the exit code as a number.
impl Serialize for ExitCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(i32::from(*self))
    }
}

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// What became of a file's bytes: the journal's `disposition` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Clean, renamed or copied into the destination.
    Delivered,
    /// Clean, and the same bytes were already in the destination.
    AlreadyPresent,
    /// Clean, replaced a different file (`on_conflict = overwrite`).
    Overwrote,
    /// Suspect, encrypted into the hazard archive.
    Archived,
    /// Suspect, no hazard archive: the copy deleted.
    Deleted,
    /// Suspect, an engine removed the quarantine copy itself.
    RemovedByScanner,
    /// Skipped or set aside: the source untouched.
    LeftInSource,
    /// Skipped: the destination holds different bytes (`on_conflict = skip`).
    ConflictSkipped,
    QuarantineFailed,
    ScanFailed,
    DeliveryFailed,
    HazardFailed,
    /// An interrupted run's file, cleaned up by recovery.
    Recovered,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Delivered => "delivered",
            Disposition::AlreadyPresent => "already_present",
            Disposition::Overwrote => "overwrote",
            Disposition::Archived => "archived",
            Disposition::Deleted => "deleted",
            Disposition::RemovedByScanner => "removed_by_scanner",
            Disposition::LeftInSource => "left_in_source",
            Disposition::ConflictSkipped => "conflict_skipped",
            Disposition::QuarantineFailed => "quarantine_failed",
            Disposition::ScanFailed => "scan_failed",
            Disposition::DeliveryFailed => "delivery_failed",
            Disposition::HazardFailed => "hazard_failed",
            Disposition::Recovered => "recovered",
        }
    }
}
serialize_as_str!(Disposition);

/// A scanned file's combined verdict, as the report and the journal record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// An encrypted archive delivered because `block_encrypted_archives` is off.
    CleanEncrypted,
    Suspect,
    Failed,
    Unscannable,
    TooLarge,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::CleanEncrypted => "clean (encrypted archive contents unscanned)",
            Verdict::Suspect => "suspect",
            Verdict::Failed => "failed",
            Verdict::Unscannable => "unscannable",
            Verdict::TooLarge => "too_large",
        }
    }

    /// The verdict of a file set aside with `outcome` (unscannable or too large).
    pub fn set_aside(outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::TooLarge => Verdict::TooLarge,
            _ => Verdict::Unscannable,
        }
    }
}
serialize_as_str!(Verdict);

/// What `shuttle hazard list` makes of one entry of the hazard archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveEntry {
    /// An archive with its sidecar, both readable.
    Ok,
    /// An archive or sidecar without the other, or unreadable.
    Damaged,
    /// Not Shuttle's.
    Foreign,
    /// Shuttle's temp file (an archive being written, or an interrupted run's).
    Temp,
}

impl ArchiveEntry {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveEntry::Ok => "ok",
            ArchiveEntry::Damaged => "damaged",
            ArchiveEntry::Foreign => "foreign",
            ArchiveEntry::Temp => "temp",
        }
    }
}
serialize_as_str!(ArchiveEntry);

/// Why a file was left in the source this run: the report's `skipped_by_reason` keys.
/// Ordered by name, as the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipKind {
    Symlink,
    SpecialFile,
    UnsafeName,
    TempFile,
    RecentlyModified,
    OpenByProcess,
    HardLinked,
    Unreadable,
    /// Set aside by an earlier run under the same limits.
    SetAside,
    /// Changed while copied, vanished, or a conflict.
    ChangedOrConflict,
    /// Nothing could tell whether another process writes it.
    WriterUnknown,
    /// Fleet mode: another node holds the file's claim; left to it.
    OtherNode,
    /// Fleet mode: this node's lease ran out and another node took the file over.
    ClaimLost,
}

impl SkipKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Symlink => "symlink",
            SkipKind::SpecialFile => "special_file",
            SkipKind::UnsafeName => "unsafe_name",
            SkipKind::TempFile => "temp_file",
            SkipKind::RecentlyModified => "recently_modified",
            SkipKind::OpenByProcess => "open_by_process",
            SkipKind::HardLinked => "hard_linked",
            SkipKind::Unreadable => "unreadable",
            SkipKind::SetAside => "set_aside",
            SkipKind::ChangedOrConflict => "changed_or_conflict",
            SkipKind::WriterUnknown => "writer_unknown",
            SkipKind::OtherNode => "other_node",
            SkipKind::ClaimLost => "claim_lost",
        }
    }
}
serialize_as_str!(SkipKind);

impl Ord for SkipKind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for SkipKind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why admission stopped: the report's `throttle.reason` and the journal's
/// throttle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    DiskSpace,
    DailyLimit,
    PerRunLimit,
}

impl ThrottleReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [ThrottleReason; 3] = [
        ThrottleReason::DiskSpace,
        ThrottleReason::DailyLimit,
        ThrottleReason::PerRunLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleReason::DiskSpace => "disk_space",
            ThrottleReason::DailyLimit => "daily_limit",
            ThrottleReason::PerRunLimit => "per_run_limit",
        }
    }
}
serialize_as_str!(ThrottleReason);

/// Why a run admitted no more files before its queue was empty (other than a
/// throttle, which ends the run normally). Each ends in the report's errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The scanners' circuit breaker, or signatures that became too old.
    Scanners(String),
    /// The list of waiting files could not be read back.
    Queue(String),
    /// A journal write failed.
    Journal(String),
    /// A file's handling met a problem that stops the run (a full disk).
    Fatal(String),
    /// A batch could not be made durable or recorded; its sources were kept.
    Commit(String),
    /// Fleet mode: this node's lease could not be renewed (PostgreSQL gone, or the
    /// node was stalled past its lease).
    Fleet(String),
    /// The committer thread ended before the workers did.
    CommitterGone,
    CommitterPanicked,
    WorkerPanicked,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Scanners(why)
            | StopReason::Queue(why)
            | StopReason::Fatal(why)
            | StopReason::Commit(why)
            | StopReason::Fleet(why) => f.write_str(why),
            StopReason::Journal(e) => write!(f, "journal write failed: {e}"),
            StopReason::CommitterGone => {
                f.write_str("commit thread ended unexpectedly; sources kept")
            }
            StopReason::CommitterPanicked => {
                f.write_str("the commit thread panicked; sources of delivered files kept")
            }
            StopReason::WorkerPanicked => f.write_str("a worker thread panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_kinds_sort_by_name_as_the_report_lists_them() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(SkipKind::Unreadable, 1);
        m.insert(SkipKind::ChangedOrConflict, 1);
        m.insert(SkipKind::RecentlyModified, 1);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"changed_or_conflict":1,"recently_modified":1,"unreadable":1}"#
        );
    }

    #[test]
    fn exit_codes_are_numbers() {
        assert_eq!(serde_json::to_string(&ExitCode::Usage).unwrap(), "2");
        assert_eq!(ExitCode::Ok.or_failed(), ExitCode::Failed);
        assert_eq!(ExitCode::Locked.or_failed(), ExitCode::Locked);
    }
}
