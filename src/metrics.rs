//! The Prometheus text-format metrics file (docs/design.md §8, `metrics_path`), for
//! node_exporter's textfile collector.
//!
//! Written at the end of every run (every `watch` pass) through a temp file in the same
//! directory and a rename, so the collector never reads half a file. The figures are
//! those of the last run (gauges, `shuttle_run_*`), beside counters that add up every
//! run and `watch` pass (`shuttle_files_total{outcome}`, `shuttle_bytes_total{outcome}`,
//! `shuttle_scans_total`, `shuttle_errors_total`, `shuttle_passes_total`): each write
//! reads the counters of the previous file and adds the pass's figures, so they survive
//! across processes. A lost or unreadable file starts them from zero again, which
//! Prometheus' `rate()` and `increase()` treat as a counter reset.
//! `shuttle_last_success_timestamp_seconds` survives failed runs the same way (read
//! back from the previous file, else from the journal) so an alert can fire on "no
//! successful run for N hours".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;
use crate::fsx;
use crate::report::Report;

const LAST_SUCCESS: &str = "shuttle_last_success_timestamp_seconds";

/// Why the metrics file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot write metrics file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Writes `cfg.metrics_path` (if set) for `report`; `duration` is the run's wall time.
/// Failures are logged, never fatal.
pub fn write(
    cfg: &Config,
    report: &Report,
    duration: std::time::Duration,
) -> Result<(), MetricsError> {
    let Some(path) = &cfg.metrics_path else {
        return Ok(());
    };
    let now = chrono::Utc::now().timestamp();
    let last_success = if report.exit_code == crate::states::ExitCode::Ok {
        Some(now)
    } else {
        previous_success(path).or_else(|| journal_success(cfg))
    };
    let previous = std::fs::read_to_string(path).unwrap_or_default();
    let mut text = render(cfg, report, duration, now, last_success);
    text.push_str(&render_counters(&counters(&previous, report)));
    write_atomic(path, &text)?;
    tracing::debug!("metrics written to {}", path.display());
    Ok(())
}

/// The metrics text.
pub fn render(
    cfg: &Config,
    report: &Report,
    duration: std::time::Duration,
    now: i64,
    last_success: Option<i64>,
) -> String {
    let mut s = String::new();
    head(
        &mut s,
        "shuttle_run_files",
        "Files of the last run by outcome",
    );
    for (outcome, n) in file_outcomes(report) {
        let _ = writeln!(s, "shuttle_run_files{{outcome=\"{outcome}\"}} {n}");
    }
    head(
        &mut s,
        "shuttle_run_bytes",
        "Bytes of the last run by outcome",
    );
    for (outcome, n) in byte_outcomes(report) {
        let _ = writeln!(s, "shuttle_run_bytes{{outcome=\"{outcome}\"}} {n}");
    }
    head(
        &mut s,
        "shuttle_run_duration_seconds",
        "Wall time of the last run",
    );
    let _ = writeln!(
        s,
        "shuttle_run_duration_seconds {:.3}",
        duration.as_secs_f64()
    );
    head(
        &mut s,
        "shuttle_run_exit_code",
        "Exit code of the last run (0 finished, 1 a file failed or a runtime error)",
    );
    let _ = writeln!(s, "shuttle_run_exit_code {}", report.exit_code);
    head(
        &mut s,
        "shuttle_run_timestamp_seconds",
        "When the last run ended (Unix time)",
    );
    let _ = writeln!(s, "shuttle_run_timestamp_seconds {now}");
    if let Some(t) = last_success {
        head(
            &mut s,
            LAST_SUCCESS,
            "When the last run that exited 0 ended (Unix time)",
        );
        let _ = writeln!(s, "{LAST_SUCCESS} {t}");
    }

    let space = crate::throttle::targets_space(cfg);
    head(
        &mut s,
        "shuttle_target_free_bytes",
        "Free bytes (usable by Shuttle) on each target's filesystem at the end of the run",
    );
    for (sample, _) in &space {
        let _ = writeln!(
            s,
            "shuttle_target_free_bytes{{target=\"{}\",path=\"{}\"}} {}",
            sample.target,
            escape(&sample.path),
            sample.free_bytes
        );
    }
    head(
        &mut s,
        "shuttle_target_threshold_bytes",
        "Free bytes each target must keep when throttle is on",
    );
    for (sample, _) in &space {
        let _ = writeln!(
            s,
            "shuttle_target_threshold_bytes{{target=\"{}\",path=\"{}\"}} {}",
            sample.target,
            escape(&sample.path),
            sample.threshold_bytes
        );
    }
    head(
        &mut s,
        "shuttle_throttle_enabled",
        "1 when throttle is on in the configuration",
    );
    let _ = writeln!(
        s,
        "shuttle_throttle_enabled {}",
        u8::from(cfg.throttle.enabled)
    );
    head(
        &mut s,
        "shuttle_throttle_stopped",
        "1 when the last run stopped admitting files because of a throttle",
    );
    let _ = writeln!(
        s,
        "shuttle_throttle_stopped {}",
        u8::from(report.throttle.stopped)
    );
    head(
        &mut s,
        "shuttle_throttle_reason",
        "1 for the reason admission stopped in the last run, 0 for the others",
    );
    for reason in crate::states::ThrottleReason::ALL {
        let on = report.throttle.stopped && report.throttle.reason == Some(reason);
        let _ = writeln!(
            s,
            "shuttle_throttle_reason{{reason=\"{reason}\"}} {}",
            u8::from(on)
        );
    }
    head(
        &mut s,
        "shuttle_scanner_info",
        "Scanner engines used by the last run, version as a label",
    );
    for e in &report.scanners {
        let _ = writeln!(
            s,
            "shuttle_scanner_info{{scanner=\"{}\",version=\"{}\"}} 1",
            escape(e.scanner),
            escape(&e.version)
        );
    }
    if !report.endpoints.is_empty() {
        head(
            &mut s,
            "shuttle_scanner_endpoint_up",
            "1 if the clamd endpoint was usable at the end of the last run, 0 if not",
        );
        for e in &report.endpoints {
            let _ = writeln!(
                s,
                "shuttle_scanner_endpoint_up{{endpoint=\"{}\"}} {}",
                escape(&e.endpoint),
                u8::from(e.health == crate::scan::pool::Health::Up)
            );
        }
        head(
            &mut s,
            "shuttle_scanner_endpoint_scans",
            "Scans the clamd endpoint answered in the last run",
        );
        for e in &report.endpoints {
            let _ = writeln!(
                s,
                "shuttle_scanner_endpoint_scans{{endpoint=\"{}\"}} {}",
                escape(&e.endpoint),
                e.scans
            );
        }
        head(
            &mut s,
            "shuttle_scanner_endpoint_errors",
            "Scans that failed on the clamd endpoint in the last run (each tried again elsewhere when possible)",
        );
        for e in &report.endpoints {
            let _ = writeln!(
                s,
                "shuttle_scanner_endpoint_errors{{endpoint=\"{}\"}} {}",
                escape(&e.endpoint),
                e.errors
            );
        }
        head(
            &mut s,
            "shuttle_scanner_endpoint_latency_seconds",
            "Mean wall time of the clamd endpoint's answered scans in the last run (NaN: none)",
        );
        for e in &report.endpoints {
            let mean = if e.scans == 0 {
                "NaN".to_string()
            } else {
                format!("{:.6}", e.scan_seconds / e.scans as f64)
            };
            let _ = writeln!(
                s,
                "shuttle_scanner_endpoint_latency_seconds{{endpoint=\"{}\"}} {mean}",
                escape(&e.endpoint)
            );
        }
    }
    head(
        &mut s,
        "shuttle_signature_age_seconds",
        "Age of each engine's signature database at the start of the last run (NaN: unknown)",
    );
    for e in &report.scanners {
        let age = e
            .signature_age_seconds
            .map_or_else(|| "NaN".to_string(), |a| a.to_string());
        let _ = writeln!(
            s,
            "shuttle_signature_age_seconds{{scanner=\"{}\"}} {age}",
            escape(e.scanner)
        );
    }
    s
}

/// Files of a pass by outcome: the `outcome` label values of `shuttle_run_files` and
/// `shuttle_files_total`.
pub fn file_outcomes(report: &Report) -> Vec<(&'static str, u64)> {
    let f = &report.files;
    vec![
        ("discovered", f.discovered),
        ("skipped", f.skipped),
        ("admitted", f.admitted),
        ("clean", f.clean),
        ("suspect", f.suspect),
        ("failed", f.failed),
        ("unscannable", f.unscannable),
        ("too_large", f.too_large),
        ("deferred", f.deferred),
    ]
}

/// Bytes of a pass by outcome: the `outcome` label values of `shuttle_run_bytes` and
/// `shuttle_bytes_total`.
pub fn byte_outcomes(report: &Report) -> Vec<(&'static str, u64)> {
    vec![
        ("clean", report.bytes.clean),
        ("suspect", report.bytes.suspect),
    ]
}

/// The counters (metric name, then label text or "") and their help.
const COUNTERS: &[(&str, &str)] = &[
    (
        "shuttle_rescan_files_total",
        "Delivered files rescanned because the signatures became newer, by result (clean, alerted, withdrawn, changed, gone, failed)",
    ),
    (
        "shuttle_files_total",
        "Files handled by every run and watch pass since the metrics file was first written, by outcome",
    ),
    (
        "shuttle_bytes_total",
        "Bytes handled by every run and watch pass, by outcome",
    ),
    (
        "shuttle_scans_total",
        "Files that every enabled engine scanned to a verdict (clean or suspect)",
    ),
    (
        "shuttle_errors_total",
        "Failed files plus run-level errors (scanner down, disk full, circuit breaker)",
    ),
    ("shuttle_passes_total", "Runs and watch passes"),
];

/// Counter series (`name{labels}` → value): those of `previous` (the earlier metrics
/// file's text) plus this pass's figures. Series of the earlier file this version does
/// not produce are kept as they were.
pub fn counters(previous: &str, report: &Report) -> BTreeMap<String, u64> {
    let mut c: BTreeMap<String, u64> = BTreeMap::new();
    for line in previous.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !COUNTERS.iter().any(|(n, _)| *n == name) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>()
            && v.is_finite()
            && v >= 0.0
        {
            // Counters are whole numbers; the cast saturates.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            c.insert(series.to_string(), v as u64);
        }
    }
    let mut add = |series: String, n: u64| {
        let v = c.entry(series).or_insert(0);
        *v = v.saturating_add(n);
    };
    for (outcome, n) in file_outcomes(report) {
        add(format!("shuttle_files_total{{outcome=\"{outcome}\"}}"), n);
    }
    for (outcome, n) in byte_outcomes(report) {
        add(format!("shuttle_bytes_total{{outcome=\"{outcome}\"}}"), n);
    }
    add(
        "shuttle_scans_total".into(),
        report.files.clean + report.files.suspect,
    );
    let errors = report.files.failed + report.errors.len() as u64;
    add("shuttle_errors_total".into(), errors);
    add("shuttle_passes_total".into(), 1);
    let r = &report.rescan;
    for (result, n) in [
        ("clean", r.clean),
        ("alerted", r.alerted),
        ("withdrawn", r.withdrawn),
        ("changed", r.changed),
        ("gone", r.gone),
        ("failed", r.failed),
    ] {
        add(
            format!("shuttle_rescan_files_total{{result=\"{result}\"}}"),
            n,
        );
    }
    c
}

/// The counters' text, each metric's series under its HELP and TYPE lines.
pub fn render_counters(c: &BTreeMap<String, u64>) -> String {
    let mut s = String::new();
    for (name, help) in COUNTERS {
        let series: Vec<_> = c
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(*name))
            .collect();
        if series.is_empty() {
            continue;
        }
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        for (k, v) in series {
            let _ = writeln!(s, "{k} {v}");
        }
    }
    s
}

fn head(s: &mut String, name: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// Escapes a label value (backslash, double quote, newline: the exposition format).
/// A value holding other control or Unicode format characters (a path or version
/// string from outside) is first shown the way log lines show names
/// ([`crate::names`]), so no raw one reaches a label.
fn escape(v: &str) -> String {
    let shown;
    let v = if v
        .chars()
        .any(|c| (c.is_control() && c != '\n') || crate::names::is_format(c))
    {
        shown = crate::names::escape(v);
        shown.as_str()
    } else {
        v
    };
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The last-success time recorded in the metrics file of an earlier run.
fn previous_success(path: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(LAST_SUCCESS)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// The end of the last run that exited 0, from the journal.
fn journal_success(cfg: &Config) -> Option<i64> {
    let j = crate::journal::open(cfg).ok()?;
    let runs = j.last_runs(1000).ok()?;
    runs.iter()
        .filter(|r| r.exit_code == Some(0))
        .find_map(|r| {
            let f = r.finished.as_deref()?;
            chrono::DateTime::parse_from_rfc3339(f)
                .ok()
                .map(|t| t.timestamp())
        })
}

fn write_atomic(path: &Path, text: &str) -> Result<(), MetricsError> {
    // node_exporter runs as another user: the file must be readable by the group
    // (umask 007 applies), like everything Shuttle creates.
    fsx::write_atomic(path, text.as_bytes(), Some(0o640)).map_err(|source| MetricsError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert!(!escape("dir\u{202e}x\u{1b}").contains(['\u{202e}', '\u{1b}']));
    }

    #[test]
    fn counters_add_up_and_keep_unknown_series() {
        let mut r = Report::default();
        r.files.clean = 3;
        r.files.failed = 1;
        r.bytes.clean = 300;
        let first = render_counters(&counters("", &r));
        let with_foreign = format!("{first}shuttle_files_total{{outcome=\"future\"}} 7\n");
        let second = counters(&with_foreign, &r);
        assert_eq!(second["shuttle_files_total{outcome=\"clean\"}"], 6);
        assert_eq!(second["shuttle_bytes_total{outcome=\"clean\"}"], 600);
        assert_eq!(second["shuttle_errors_total"], 2);
        assert_eq!(second["shuttle_passes_total"], 2);
        assert_eq!(second["shuttle_files_total{outcome=\"future\"}"], 7);
    }

    #[test]
    fn reads_back_the_last_success() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.prom");
        std::fs::write(&p, format!("# HELP x\n{LAST_SUCCESS} 1234\n")).unwrap();
        assert_eq!(previous_success(&p), Some(1234));
    }
}
