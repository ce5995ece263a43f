//! Scanning (docs/design.md §1.8): every enabled engine scans the quarantine copy; a file is
//! clean only if every engine says clean.
//!
//! Each engine lives in its own file behind the [`Scanner`] trait. What is common to
//! all of them is here: the dynamic timeout, retries after a timeout, and the circuit
//! breaker that stops the run after `malware_scan_retry_count` timeouts. ClamAV is a
//! [`pool::ClamPool`] of one or more clamd endpoints, which retries a failed scan on
//! another endpoint itself; only when every endpoint failed does the failure reach the
//! retries and the circuit breaker here.

pub mod archive;
pub mod clamav;
pub mod defender;
pub mod limits;
pub mod pool;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::ScanConfig;

/// The engines `cfg` enables (not yet contacted), ClamAV first: it reads through
/// its own descriptor, while Defender may remove a file it detects.
pub fn enabled(cfg: &crate::config::Config) -> Result<Vec<Box<dyn Scanner>>, String> {
    let mut v: Vec<Box<dyn Scanner>> = Vec::new();
    if cfg.scanning.clam_av {
        if cfg.scanning.clamd.is_empty() {
            return Err("on_demand_clam_av: no clamd socket or address known".into());
        }
        v.push(Box::new(pool::ClamPool::new(cfg)));
    }
    if cfg.scanning.defender {
        v.push(Box::new(defender::Defender::new(
            &cfg.scanning.mdatp_command,
        )));
    }
    Ok(v)
}

/// What one engine said about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// Detection names.
    Suspect(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The engine could not scan the whole file (a scan limit was hit): retrying
    /// gives the same answer, so the file is set aside, never delivered.
    #[error("{0}")]
    Unscannable(String),
    #[error("scan timed out after {0:?}")]
    Timeout(Duration),
    #[error("scanner unreachable: {0}")]
    Unreachable(String),
    #[error("scanner error: {0}")]
    Failed(String),
    /// The engine answered, clearly, that it could not scan this file (clamd's
    /// `ERROR` reply, e.g. a stream over `StreamMaxLength`): a fault of the file, not
    /// of the engine, so it does not count against the engine's health.
    #[error("scanner error: {0}")]
    Rejected(String),
}

/// One malware engine.
pub trait Scanner: Send + Sync {
    /// Short engine name for logs, reports and the journal ("clamav", "defender").
    fn name(&self) -> &'static str;

    /// Engine and signature version, asked at the start of a run, again at most every
    /// [`Scanner::recheck_every`] while files are scanned, and recorded with every
    /// verdict.
    fn version(&self) -> Result<String, ScanError>;

    /// How often a run asks again for [`Scanner::version`] and [`Scanner::signatures`]
    /// to notice a signature reload; zero (the default): after every file's scan, so
    /// that no file scanned after a reload to too old signatures is delivered.
    fn recheck_every(&self) -> Duration {
        Duration::ZERO
    }

    /// The signature database's version and date; `version` is what [`Scanner::version`]
    /// returned. An engine that cannot tell the date returns `updated: None`, which the
    /// freshness gate treats as too old.
    fn signatures(&self, version: &str) -> Result<Signatures, ScanError>;

    /// Scans one quarantine copy. `file` is an open read-only descriptor of `path`,
    /// already checked to be the copy Shuttle wrote.
    fn scan(
        &self,
        file: &File,
        path: &Path,
        size: u64,
        timeout: Option<Duration>,
    ) -> Result<Verdict, ScanError>;

    /// Scans one quarantine copy, opening it with `open` (a fresh descriptor per
    /// attempt), and says where: an engine with several endpoints (the clamd pool)
    /// names the one whose verdict this is, and may try several.
    fn scan_routed(
        &self,
        open: &dyn Fn() -> std::io::Result<File>,
        path: &Path,
        size: u64,
        timeout: Option<Duration>,
    ) -> (Result<Verdict, ScanError>, Option<String>) {
        match open() {
            Ok(file) => (self.scan(&file, path, size, timeout), None),
            Err(e) => (
                Err(ScanError::Failed(format!(
                    "cannot open quarantine copy: {e}"
                ))),
                None,
            ),
        }
    }

    /// Why the engine can take no more scans this run, if it cannot (every endpoint
    /// of a pool out of use).
    fn unusable(&self) -> Option<String> {
        None
    }

    /// The engine's endpoints and their health (the clamd pool); empty otherwise.
    fn endpoints(&self) -> Vec<pool::EndpointStatus> {
        Vec::new()
    }
}

/// An engine's signature database: which one, and how old, for the freshness gate and
/// for the record of which signatures cleared a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Signatures {
    /// The database version as the engine reports it (clamd: `27450`).
    pub version: String,
    /// When the database was built or last updated (RFC 3339, UTC); `None`: unknown.
    pub updated: Option<String>,
}

impl Signatures {
    /// The database's age at `now`; `None` when its date is unknown.
    pub fn age(&self, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
        let t = chrono::DateTime::parse_from_rfc3339(self.updated.as_deref()?).ok()?;
        Some(
            (now - t.with_timezone(&chrono::Utc))
                .to_std()
                .unwrap_or(Duration::ZERO),
        )
    }
}

/// What one engine made of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineOutcome {
    Clean,
    Suspect,
    Failed,
    /// The engine could not scan the whole file.
    Unscannable,
}

/// One engine's part in a file's verdict, as the journal and report record it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineResult {
    pub scanner: &'static str,
    pub version: String,
    pub result: EngineOutcome,
    /// The endpoint whose answer this is (a clamd socket path or `host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The signatures this engine scanned with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signatures: Option<Signatures>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detections: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The quarantine copy was gone after this engine's detection: the engine
    /// removed it (Defender does, when it remediates threats itself).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub removed_file: bool,
}

/// The combined verdict on one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileVerdict {
    Clean,
    Suspect(Vec<String>),
    /// Not known to be clean: the file stays in the source for a later run.
    Failed(String),
    /// An engine cannot scan the whole file (a limit, encryption): the file stays in
    /// the source, set aside until it or the limits change.
    Unscannable(String),
}

#[derive(Debug)]
pub struct FileScan {
    pub verdict: FileVerdict,
    pub results: Vec<EngineResult>,
    /// The engine after whose detection the quarantine copy had vanished, if any.
    pub removed_by: Option<&'static str>,
    /// How long each engine took, for the per-file log line.
    pub figures: Vec<ScanFigures>,
}

/// One engine's scan of one file, as the log shows it: engine, wall time (all
/// attempts), bytes, the timeout each attempt had.
#[derive(Debug, Clone)]
pub struct ScanFigures {
    pub engine: &'static str,
    /// The endpoint that answered (the clamd pool).
    pub endpoint: Option<String>,
    pub elapsed: Duration,
    pub bytes: u64,
    pub timeout: Option<Duration>,
}

impl std::fmt::Display for ScanFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.engine)?;
        if let Some(e) = &self.endpoint {
            write!(f, " ({e})")?;
        }
        write!(
            f,
            " {} ms for {} bytes",
            self.elapsed.as_millis(),
            self.bytes
        )?;
        match self.timeout {
            Some(t) => write!(f, " (timeout {:.1} s)", t.as_secs_f64()),
            None => write!(f, " (no timeout)"),
        }
    }
}

impl FileScan {
    /// `clamav 12 ms for 3000 bytes (timeout 300.0 s); defender …`
    pub fn figures_line(&self) -> String {
        let parts: Vec<String> = self.figures.iter().map(|f| f.to_string()).collect();
        parts.join("; ")
    }
}

/// Timeouts and retries (docs/design.md §1.8).
#[derive(Debug, Clone)]
pub struct Policy {
    pub base: Duration,
    pub ms_per_byte: f64,
    pub retry_wait: Duration,
    /// Timeouts in one run before the circuit breaker opens; 0 = no limit.
    pub retry_count: u32,
}

impl Policy {
    pub fn from_config(c: &ScanConfig) -> Policy {
        Policy {
            base: Duration::from_secs(c.timeout_seconds),
            ms_per_byte: c.timeout_ms_per_byte,
            retry_wait: Duration::from_secs(c.retry_wait_seconds),
            retry_count: c.retry_count,
        }
    }

    /// The scan deadline for a file of `size` bytes; [`SCAN_CEILING`] when both parts
    /// are 0 (no timeout configured). Always `Some`.
    pub fn timeout_for(&self, size: u64) -> Option<Duration> {
        let extra = Duration::from_secs_f64((self.ms_per_byte * size as f64 / 1000.0).min(1e9));
        let t = self.base + extra;
        // "No timeout" still has a ceiling: a scanner that never answers must not hang
        // the run (and hold its lock) forever.
        Some(if t.is_zero() { SCAN_CEILING } else { t })
    }
}

/// The longest any one scan may take when no timeout is configured.
pub const SCAN_CEILING: Duration = Duration::from_secs(2 * 3600);

/// The enabled engines of a run, with their versions and the run's circuit breaker.
pub struct Scanners {
    engines: Vec<(Box<dyn Scanner>, RwLock<Loaded>)>,
    policy: Policy,
    timeouts: AtomicU32,
    tripped: AtomicBool,
    /// `max_signature_age_hours`, enforced again whenever an engine's version changes.
    max_age: Option<Duration>,
    /// When each engine's version was last asked.
    checked: Mutex<Vec<Instant>>,
    /// Why the run must admit no more files (signatures changed to too old ones).
    stopped: Mutex<Option<String>>,
}

/// What an engine has loaded: its version line and signature database.
#[derive(Debug, Clone)]
struct Loaded {
    version: String,
    signatures: Signatures,
}

/// An engine that is not usable at the start of a run.
#[derive(Debug, thiserror::Error)]
#[error("{engine}: {problem}")]
pub struct EngineProblem {
    pub engine: &'static str,
    pub problem: String,
}

impl Scanners {
    /// Asks every engine for its version (proving it answers) and, with `canary`,
    /// checks that it detects the EICAR test file.
    pub fn start(
        engines: Vec<Box<dyn Scanner>>,
        policy: Policy,
        canary: bool,
    ) -> Result<Scanners, EngineProblem> {
        let mut ready = Vec::new();
        for engine in engines {
            let version = engine.version().map_err(|e| EngineProblem {
                engine: engine.name(),
                problem: e.to_string(),
            })?;
            let sigs = engine.signatures(&version).map_err(|e| EngineProblem {
                engine: engine.name(),
                problem: format!("cannot tell its signature database's version and date: {e}"),
            })?;
            if canary {
                check_canary(engine.as_ref(), &policy)?;
            }
            tracing::info!(
                "scanner {} ready: {version}; signatures {} of {}",
                engine.name(),
                sigs.version,
                sigs.updated.as_deref().unwrap_or("unknown date")
            );
            ready.push((
                engine,
                RwLock::new(Loaded {
                    version,
                    signatures: sigs,
                }),
            ));
        }
        let checked = Mutex::new(vec![Instant::now(); ready.len()]);
        Ok(Scanners {
            engines: ready,
            policy,
            timeouts: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
            max_age: None,
            checked,
            stopped: Mutex::new(None),
        })
    }

    /// Keeps enforcing the freshness gate for the rest of the run: when an engine's
    /// version changes (a signature reload), its new database must be dated and no
    /// older than `max_age` too, or the run admits no more files.
    pub fn keep_fresh(&mut self, max_age: Option<Duration>) {
        self.max_age = max_age;
    }

    fn loaded(&self, i: usize) -> Loaded {
        self.engines[i]
            .1
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Engine names and versions, for the report and metrics.
    pub fn versions(&self) -> Vec<(&'static str, String)> {
        (0..self.engines.len())
            .map(|i| (self.engines[i].0.name(), self.loaded(i).version))
            .collect()
    }

    /// Engine names and their signature databases.
    pub fn signatures(&self) -> Vec<(&'static str, Signatures)> {
        (0..self.engines.len())
            .map(|i| (self.engines[i].0.name(), self.loaded(i).signatures))
            .collect()
    }

    /// Why the run must admit no more files, if it must: the circuit breaker, or an
    /// engine that reloaded signatures too old (or undated) mid-run.
    pub fn stop_reason(&self) -> Option<String> {
        if let Some(r) = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(r);
        }
        if self.tripped() {
            return Some("circuit breaker: too many scan timeouts this run".to_string());
        }
        self.engines.iter().find_map(|(e, _)| e.unusable())
    }

    /// Every engine's endpoints and their health (the clamd pool's).
    pub fn endpoints(&self) -> Vec<pool::EndpointStatus> {
        self.engines
            .iter()
            .flat_map(|(e, _)| e.endpoints())
            .collect()
    }

    /// Asks each engine whose [`Scanner::recheck_every`] has passed for its version;
    /// a changed version is logged, its signatures read, and the freshness gate
    /// applied to them.
    fn recheck(&self) {
        let due: Vec<usize> = {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            (0..self.engines.len())
                .filter(|&i| {
                    let due = checked[i].elapsed() >= self.engines[i].0.recheck_every();
                    if due {
                        checked[i] = Instant::now();
                    }
                    due
                })
                .collect()
        };
        for i in due {
            let (engine, state) = &self.engines[i];
            // An engine that does not answer now fails the scan that follows.
            let Ok(version) = engine.version() else {
                continue;
            };
            let sigs = engine.signatures(&version);
            let mut loaded = state.write().unwrap_or_else(|p| p.into_inner());
            let same = |s: &Signatures| {
                loaded.version == version && loaded.signatures.version == s.version
            };
            if sigs.as_ref().is_ok_and(same) {
                continue;
            }
            let problem = match sigs {
                Ok(sigs) => {
                    tracing::info!(
                        "scanner {} reloaded: {} -> {version}; signatures {} of {}",
                        engine.name(),
                        loaded.version,
                        sigs.version,
                        sigs.updated.as_deref().unwrap_or("unknown date")
                    );
                    let problem = self
                        .max_age
                        .and_then(|max| stale(engine.name(), &sigs, max, chrono::Utc::now()));
                    loaded.signatures = sigs;
                    problem
                }
                Err(e) => Some(format!(
                    "{}: cannot tell the reloaded signature database's version and date: {e}",
                    engine.name()
                )),
            };
            loaded.version = version;
            if let Some(p) = problem {
                let msg = format!("signatures changed mid-run to too old ones: {p}");
                tracing::error!("{msg}");
                self.stopped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(msg);
            }
        }
    }

    /// The freshness gate: one problem per engine whose signatures are older than
    /// `max_age`, or of unknown age. `None`: the gate is off.
    pub fn stale_signatures(&self, max_age: Option<Duration>) -> Vec<String> {
        let Some(max) = max_age else {
            return Vec::new();
        };
        let now = chrono::Utc::now();
        self.signatures()
            .iter()
            .filter_map(|(e, s)| stale(e, s, max, now))
            .collect()
    }

    /// Has the circuit breaker stopped the run?
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }

    /// Scans the quarantine copy at `path` with every engine. `open` reopens it for
    /// each attempt (a fresh descriptor, checked by the caller to be the same file).
    pub fn scan(
        &self,
        path: &Path,
        size: u64,
        open: &dyn Fn() -> std::io::Result<File>,
    ) -> FileScan {
        let mut results = Vec::new();
        let mut detections = Vec::new();
        let mut failure: Option<String> = None;
        let mut unscannable: Option<String> = None;
        let mut removed_by = None;
        let mut figures = Vec::new();
        if let Some(why) = self.stop_reason() {
            return FileScan {
                verdict: FileVerdict::Failed(why),
                results,
                removed_by,
                figures,
            };
        }
        for (engine, state) in &self.engines {
            let Loaded {
                version,
                signatures: sigs,
            } = state.read().unwrap_or_else(|p| p.into_inner()).clone();
            let started = std::time::Instant::now();
            let (outcome, endpoint) = self.scan_one(engine.as_ref(), path, size, open);
            figures.push(ScanFigures {
                engine: engine.name(),
                endpoint: endpoint.clone(),
                elapsed: started.elapsed(),
                bytes: size,
                timeout: self.policy.timeout_for(size),
            });
            tracing::debug!(
                "scan {:?}: {} {}",
                crate::names::shown(path),
                figures[figures.len() - 1],
                match &outcome {
                    Ok(Verdict::Clean) => "clean".to_string(),
                    Ok(Verdict::Suspect(n)) => format!("suspect ({})", n.join(", ")),
                    Err(e) => format!("failed ({e})"),
                }
            );
            let removed_file = removed_by.is_none()
                && matches!(outcome, Ok(Verdict::Suspect(_)))
                // Asked through `open` (beneath the quarantine's handle), not by path.
                && matches!(open(), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if removed_file {
                tracing::warn!(
                    "{} removed the quarantine copy {:?} after its detection",
                    engine.name(),
                    crate::names::shown(path)
                );
                removed_by = Some(engine.name());
            }
            let (result, dets, error) = match outcome {
                Ok(Verdict::Clean) => (EngineOutcome::Clean, Vec::new(), None),
                Ok(Verdict::Suspect(names)) => {
                    detections.extend(names.iter().cloned());
                    (EngineOutcome::Suspect, names, None)
                }
                Err(ScanError::Unscannable(why)) => {
                    let msg = format!("{}: {why}", engine.name());
                    unscannable.get_or_insert(why);
                    (EngineOutcome::Unscannable, Vec::new(), Some(msg))
                }
                Err(e) => {
                    let msg = format!("{}: {e}", engine.name());
                    failure.get_or_insert(msg.clone());
                    (EngineOutcome::Failed, Vec::new(), Some(msg))
                }
            };
            results.push(EngineResult {
                scanner: engine.name(),
                version: version.clone(),
                result,
                endpoint,
                signatures: Some(sigs.clone()),
                detections: dets,
                error,
                removed_file,
            });
        }
        // Asked after the scan: a reload during it shows as a changed version, and a
        // file possibly scanned with signatures too old is not clean.
        self.recheck();
        let reloaded_stale = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // A detection by any engine outweighs another engine's failure; a file an
        // engine cannot scan whole is unscannable whatever the others said.
        let verdict = if !detections.is_empty() {
            FileVerdict::Suspect(detections)
        } else if let Some(why) = reloaded_stale {
            FileVerdict::Failed(why)
        } else if let Some(u) = unscannable {
            FileVerdict::Unscannable(u)
        } else if let Some(f) = failure {
            FileVerdict::Failed(f)
        } else {
            FileVerdict::Clean
        };
        FileScan {
            verdict,
            results,
            removed_by,
            figures,
        }
    }

    fn scan_one(
        &self,
        engine: &dyn Scanner,
        path: &Path,
        size: u64,
        open: &dyn Fn() -> std::io::Result<File>,
    ) -> (Result<Verdict, ScanError>, Option<String>) {
        let timeout = self.policy.timeout_for(size);
        loop {
            if self.tripped() {
                return (
                    Err(ScanError::Failed(
                        "circuit breaker open after repeated timeouts".into(),
                    )),
                    None,
                );
            }
            match engine.scan_routed(open, path, size, timeout) {
                (Err(ScanError::Timeout(t)), endpoint) => {
                    let n = self.timeouts.fetch_add(1, Ordering::SeqCst) + 1;
                    let allowed = match self.policy.retry_count {
                        0 => "no limit".to_string(),
                        c => format!("{c} allowed"),
                    };
                    tracing::warn!(
                        "{} timed out after {t:?} scanning {:?} (timeout {n} this run, {allowed})",
                        engine.name(),
                        crate::names::shown(path),
                    );
                    // 0 = no limit (the earlier implementation's meaning).
                    if self.policy.retry_count > 0 && n >= self.policy.retry_count {
                        if !self.tripped.swap(true, Ordering::SeqCst) {
                            tracing::error!(
                                "circuit breaker: {n} scan timeouts this run; admitting no more files"
                            );
                        }
                        return (Err(ScanError::Timeout(t)), endpoint);
                    }
                    std::thread::sleep(self.policy.retry_wait);
                }
                other => return other,
            }
        }
    }
}

/// The EICAR test string, stored reversed so that Shuttle's own binary is not flagged
/// by the scanners it drives.
const EICAR_REVERSED: &str =
    r"*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE$}7)CC7)^P(45XZP\4[PA@%P!O5X";

/// The 68-byte EICAR test file.
pub fn eicar() -> Vec<u8> {
    EICAR_REVERSED.bytes().rev().collect()
}

/// One line naming the engine, its database, its age and the limit, when the engine's
/// signatures are too old or of unknown age.
pub(crate) fn stale(
    engine: &str,
    s: &Signatures,
    max: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let hours = |d: Duration| d.as_secs() as f64 / 3600.0;
    match s.age(now) {
        Some(age) if age <= max => None,
        Some(age) => Some(format!(
            "{engine}: signature database {} dated {} is {:.0} hours old, more than max_signature_age_hours ({:.0}); update the signatures",
            s.version,
            s.updated.as_deref().unwrap_or("?"),
            hours(age),
            hours(max)
        )),
        None => Some(format!(
            "{engine}: signature database {} has no date, so its age is unknown (max_signature_age_hours {:.0}); install dated signatures (freshclam) or set max_signature_age_hours = 0",
            s.version,
            hours(max)
        )),
    }
}

fn check_canary(engine: &dyn Scanner, policy: &Policy) -> Result<(), EngineProblem> {
    let problem = |p: String| EngineProblem {
        engine: engine.name(),
        problem: p,
    };
    let dir = tempfile::Builder::new()
        .prefix("shuttle-canary.")
        .tempdir()
        .map_err(|e| problem(format!("cannot create canary directory: {e}")))?;
    let path = dir.path().join("eicar.com");
    std::fs::write(&path, eicar())
        .map_err(|e| problem(format!("cannot write canary file: {e}")))?;
    let file = File::open(&path).map_err(|e| problem(format!("cannot open canary file: {e}")))?;
    match engine.scan(&file, &path, eicar().len() as u64, policy.timeout_for(68)) {
        Ok(Verdict::Suspect(_)) => Ok(()),
        Ok(Verdict::Clean) => Err(problem(
            "canary failed: the EICAR test file was reported clean; the engine cannot be trusted (signatures missing?)".into(),
        )),
        Err(e) => Err(problem(format!("canary scan of the EICAR test file failed: {e}"))),
    }
}

/// `max_signature_age_hours` as a duration; `None` when the gate is off.
pub fn max_signature_age(c: &ScanConfig) -> Option<Duration> {
    match c.max_signature_age_hours {
        0 => None,
        h => Some(Duration::from_secs(h.saturating_mul(3600))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eicar_is_the_standard_string() {
        let e = eicar();
        assert_eq!(e.len(), 68);
        assert!(e.starts_with(b"X5O!P%@AP"));
    }

    /// Times out `timeouts` times, then answers clean.
    struct Slow {
        timeouts: AtomicU32,
    }

    impl Scanner for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn version(&self) -> Result<String, ScanError> {
            Ok("slow 1".into())
        }
        fn signatures(&self, _: &str) -> Result<Signatures, ScanError> {
            Ok(Signatures {
                version: "1".into(),
                updated: Some(chrono::Utc::now().to_rfc3339()),
            })
        }
        fn scan(
            &self,
            _: &File,
            _: &Path,
            _: u64,
            _: Option<Duration>,
        ) -> Result<Verdict, ScanError> {
            let left = self.timeouts.load(Ordering::SeqCst);
            if left == 0 {
                return Ok(Verdict::Clean);
            }
            self.timeouts.store(left - 1, Ordering::SeqCst);
            Err(ScanError::Timeout(Duration::from_millis(1)))
        }
    }

    #[test]
    fn retry_count_zero_means_no_limit() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let open = || File::open(f.path());
        for (count, tripped) in [(0, false), (3, true)] {
            let policy = Policy {
                base: Duration::from_secs(1),
                ms_per_byte: 0.0,
                retry_wait: Duration::ZERO,
                retry_count: count,
            };
            let engine = Slow {
                timeouts: AtomicU32::new(5),
            };
            let s = Scanners::start(vec![Box::new(engine)], policy, false).unwrap();
            let scan = s.scan(f.path(), 0, &open);
            assert_eq!(s.tripped(), tripped, "retry_count {count}");
            if !tripped {
                assert_eq!(scan.verdict, FileVerdict::Clean);
                assert_eq!(scan.figures.len(), 1);
            }
        }
    }

    #[test]
    fn timeout_grows_with_size_and_zero_means_the_ceiling() {
        let p = Policy {
            base: Duration::from_secs(2),
            ms_per_byte: 0.5,
            retry_wait: Duration::ZERO,
            retry_count: 3,
        };
        assert_eq!(p.timeout_for(2000), Some(Duration::from_secs(3)));
        let none = Policy {
            base: Duration::ZERO,
            ms_per_byte: 0.0,
            ..p
        };
        assert_eq!(none.timeout_for(10), Some(SCAN_CEILING));
    }
}
