//! The earlier implementation's daily tracking file, read on cut-over day.
//!
//! It kept each day's processed files and volume in
//! `throttle_<YYYY-MM-DD>.yaml` in its tracking directory (`tracking_data_path`, whose
//! old name `daily_processing_tracker_logs_path` is accepted), as
//!
//! ```yaml
//! start_time: '2026-11-25T08:00:03.123456'
//! totals:
//!   files_processed: 412
//!   volume_processed_mb: 1834.5
//! metrics: { … }
//! ```
//!
//! When such a file exists for today, its totals count toward today's daily limits,
//! so that the limits do not start from zero on the day Shuttle takes over. It is
//! counted when Shuttle has no run recorded for today yet, and on every later run of
//! the day as long as the file predates Shuttle's first run of the day (the earlier
//! implementation wrote it before the cut-over); it is logged once, on the first run.
//! Also read: `files_processed` / `volume_processed_mb` or `total_files` /
//! `total_volume_mb` at the top level or under `totals` / `daily_totals`. MB are MiB,
//! as the earlier implementation computed them. The file is never written.

use std::path::{Path, PathBuf};

use crate::journal::Journal;

/// Today's file of the earlier implementation.
pub fn throttle_file(dir: &Path, day: &str) -> PathBuf {
    dir.join(format!("throttle_{day}.yaml"))
}

/// Files and bytes an earlier-implementation tracking file records.
pub fn parse(text: &str) -> Result<(u64, u64), String> {
    let doc: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let number = |v: &serde_norway::Value| -> Option<f64> {
        v.as_f64()
            .or_else(|| v.as_u64().map(|n| n as f64))
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    let find = |names: &[&str]| -> Option<f64> {
        for scope in [doc.get("totals"), doc.get("daily_totals"), Some(&doc)]
            .into_iter()
            .flatten()
        {
            for n in names {
                if let Some(v) = scope.get(*n).and_then(number) {
                    return Some(v);
                }
            }
        }
        None
    };
    let files = find(&["files_processed", "total_files"]);
    let mb = find(&["volume_processed_mb", "total_volume_mb"]);
    if files.is_none() && mb.is_none() {
        return Err("no files_processed / volume_processed_mb totals in it".into());
    }
    let files = files.unwrap_or(0.0).round() as u64;
    let bytes = (mb.unwrap_or(0.0) * 1_048_576.0).round() as u64;
    Ok((files, bytes))
}

/// The earlier implementation's totals for local day `day` that count toward today's
/// limits (see the module doc), or `None`.
pub fn day_totals(tracking: &Path, j: &dyn Journal, run_id: i64, day: &str) -> Option<(u64, u64)> {
    let path = throttle_file(tracking, day);
    let meta = std::fs::metadata(&path).ok()?;
    let first_run = match j.first_run_on_day(day, run_id) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("cannot read the journal's runs of {day}: {e}");
            return None;
        }
    };
    if let Some(started) = &first_run {
        // The journal keeps whole seconds: compare at that precision.
        let first = chrono::DateTime::parse_from_rfc3339(started).ok()?;
        let written: chrono::DateTime<chrono::Utc> = meta.modified().ok()?.into();
        if written.timestamp() > first.timestamp() {
            tracing::debug!(
                "{} was written after Shuttle's first run of {day}: not counted",
                path.display()
            );
            return None;
        }
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                "cannot read the earlier implementation's {}: {e}; today's daily limits start from Shuttle's own figures",
                path.display()
            );
            return None;
        }
    };
    match parse(&text) {
        Ok((files, bytes)) => {
            let msg = format!(
                "counting {files} file(s) and {:.1} MB from the earlier implementation's {} toward today's daily limits",
                crate::fsx::mib(bytes),
                path.display()
            );
            if first_run.is_none() {
                tracing::info!("{msg}");
            } else {
                tracing::debug!("{msg}");
            }
            Some((files, bytes))
        }
        Err(e) => {
            if first_run.is_none() {
                tracing::warn!(
                    "{} is not an earlier tracking file Shuttle can read ({e}): not counted",
                    path.display()
                );
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_earlier_format_and_its_variants() {
        let text = "start_time: '2026-11-25T08:00:03'\ntotals:\n  files_processed: 412\n  volume_processed_mb: 2.5\nmetrics:\n  failed_files: 1\n";
        assert_eq!(parse(text), Ok((412, 2_621_440)));
        assert_eq!(
            parse("total_files: 3\ntotal_volume_mb: 1\n"),
            Ok((3, 1_048_576))
        );
        assert_eq!(parse("files_processed: 7\n"), Ok((7, 0)));
        assert!(parse("something: else\n").is_err());
        assert!(parse(": : :\n- [").is_err());
    }
}
