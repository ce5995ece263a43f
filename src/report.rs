//! The run's figures (docs/design.md §8): one summary line in the log and `--report-json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::fsx;

#[derive(Debug, Default, Clone, Serialize)]
pub struct FileCounts {
    pub discovered: u64,
    pub skipped: u64,
    pub admitted: u64,
    pub clean: u64,
    pub suspect: u64,
    pub failed: u64,
    /// An engine cannot scan them whole: set aside in the source this run.
    pub unscannable: u64,
    /// Can never fit a target, or larger than max_file_size_mb: set aside this run.
    pub too_large: u64,
    pub deferred: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ByteCounts {
    pub clean: u64,
    pub suspect: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ThrottleReport {
    pub stopped: bool,
    pub reason: Option<crate::states::ThrottleReason>,
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<String>,
}

/// A source that was not removed although its file was handled, and why.
#[derive(Debug, Clone, Serialize)]
pub struct KeptSource {
    pub path: String,
    pub reason: String,
}

/// One file's outcome, in the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub path: String,
    #[serde(serialize_with = "outcome_name")]
    pub outcome: crate::states::Outcome,
    /// The combined verdict when scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<crate::states::Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detections: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scanners: Option<Box<serde_json::value::RawValue>>,
}

/// A file's outcome by its journal name.
fn outcome_name<S: serde::Serializer>(o: &crate::states::Outcome, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(o.as_str())
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineVersion {
    pub scanner: &'static str,
    pub version: String,
    /// The signature database the run scanned with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signatures: Option<crate::scan::Signatures>,
    /// Its age in seconds at the start of the run (unknown: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_age_seconds: Option<u64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub exit_code: crate::states::ExitCode,
    pub started: String,
    pub finished: String,
    pub run_id: Option<i64>,
    pub files: FileCounts,
    pub bytes: ByteCounts,
    pub throttle: ThrottleReport,
    /// Skips by reason (`recently_modified`, `open_by_process`, `symlink`, …).
    pub skipped_by_reason: BTreeMap<crate::states::SkipKind, u64>,
    pub scanners: Vec<EngineVersion>,
    /// The retro-scan of earlier deliveries this run or pass made (`crate::rescan`).
    pub rescan: crate::rescan::RescanCounts,
    /// The clamd pool's endpoints at the end of the run: health, version, scans.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<crate::scan::pool::EndpointStatus>,
    /// The first 10,000 sources kept; the rest are counted in `sources_kept_omitted`.
    pub sources_kept: Vec<KeptSource>,
    pub sources_kept_omitted: u64,
    /// Run-level errors (scanner down, circuit breaker, disk full…).
    pub errors: Vec<String>,
    /// The first 10,000 files handled, in the order they finished; the rest are
    /// counted in `file_results_omitted` (the journal holds every file). A run's
    /// memory stays the same however many files it handles.
    pub file_results: Vec<FileEntry>,
    pub file_results_omitted: u64,
}

impl Report {
    /// The one summary line of the log.
    pub fn summary_line(&self) -> String {
        let f = &self.files;
        let mut s = format!(
            "run finished (exit {}): {} discovered, {} skipped, {} admitted: {} clean ({}), {} suspect, {} failed, {} unscannable, {} too large; {} deferred",
            self.exit_code,
            f.discovered,
            f.skipped,
            f.admitted,
            f.clean,
            fsx::volume(self.bytes.clean),
            f.suspect,
            f.failed,
            f.unscannable,
            f.too_large,
            f.deferred
        );
        if let (true, Some(reason)) = (self.throttle.stopped, self.throttle.reason) {
            s.push_str(&format!("; admission stopped: {reason}"));
        }
        let r = &self.rescan;
        if r.scanned + r.changed + r.gone > 0 || r.unfinished {
            s.push_str(&format!(
                "; retro-scan: {} rescanned, {} alerted, {} withdrawn, {} changed downstream{}",
                r.scanned,
                r.alerted,
                r.withdrawn,
                r.changed,
                if r.unfinished {
                    " (more next pass)"
                } else {
                    ""
                }
            ));
        }
        s
    }

    /// Writes the report atomically ([`fsx::write_atomic`]), so a reader never sees
    /// half.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        fsx::write_atomic(path, &text, None)
    }
}
