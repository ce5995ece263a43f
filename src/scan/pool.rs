//! A pool of clamd endpoints behind the one ClamAV engine.
//!
//! One clamd is one machine's worth of scanning, and when it went down every run
//! stopped. `clamd_socket` and `clamd_address` therefore each take a list, and every
//! endpoint named is used. The pool keeps Shuttle's two promises with several daemons:
//!
//! - **Only current signatures.** Each endpoint is checked (`PING`, `VERSION`, and the
//!   EICAR canary when `canary` is on) before it is given a scan: at the start of every
//!   run or watch pass, every `clamd_health_interval_seconds` while it is idle or out
//!   of use, and its `VERSION` again after each scan it did. An endpoint whose
//!   signatures are older than the newest any reachable endpoint has, or older than
//!   `max_signature_age_hours`, gets no scans until it catches up; a scan after which
//!   its endpoint no longer qualifies does not count and is done again elsewhere.
//! - **A failure is never clean.** A scan that fails on one endpoint (refused, reset,
//!   timeout, garbage reply) is done again on another with a fresh descriptor, and the
//!   endpoint is taken out of use until a health check passes, so an endpoint that hangs
//!   (SIGSTOP) costs the scans it held their timeouts, not the run. The last usable
//!   endpoint is never taken out for a failed scan: its failures go to the run's own
//!   retries and circuit breaker, exactly as with a single clamd. When health checks
//!   find no endpoint usable, the run admits no more files.
//! - **Routing.** Least outstanding scans first, each endpoint bounded by
//!   `clamd_endpoint_concurrency` (or its clamd.conf `MaxThreads`), so
//!   `max_scan_threads` may exceed one clamd's share without scans queueing inside a
//!   clamd, where their timeouts would run while they wait.
//!
//! A single endpoint is a pool of one and behaves as before.

use std::fs::File;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::clamav::{ClamAv, parse_signatures};
use super::{ScanError, Scanner, Signatures, Verdict};
use crate::config::{ClamdEndpoint, Config};

/// clamd's compiled-in `MaxThreads`: the concurrency of an endpoint whose
/// configuration Shuttle cannot read.
const DEFAULT_CONCURRENCY: usize = 10;

/// Whether an endpoint is given scans, and if not, why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked yet.
    Unknown,
    /// Answers, detects the canary, has the newest signatures: given scans.
    Up,
    /// No connection, or no sensible answer to `PING` / `VERSION`.
    Unreachable,
    /// Did not detect the EICAR test file.
    CanaryFailed,
    /// Older signatures than another endpoint of the pool.
    Behind,
    /// Signatures older than `max_signature_age_hours`, or undated.
    Stale,
    /// A scan failed on it (refused, reset, timeout, garbage) while another endpoint
    /// could take over; back when a health check passes.
    Failing,
}

impl Health {
    /// Reachable, with signatures known now (whether or not usable).
    fn answers(self) -> bool {
        matches!(self, Health::Up | Health::Behind | Health::Stale)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Unreachable => "unreachable",
            Health::CanaryFailed => "canary failed",
            Health::Behind => "behind",
            Health::Stale => "stale",
            Health::Failing => "failing",
        })
    }
}

/// One endpoint as the report, metrics and `shuttle check` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    /// The socket path or `host:port`.
    pub endpoint: String,
    pub health: Health,
    /// Why it is not usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signatures: Option<Signatures>,
    /// Scans given to it at once.
    pub concurrency: usize,
    /// Scans it answered this run (clean, suspect, or a clear refusal).
    pub scans: u64,
    /// Scans that failed on it this run.
    pub errors: u64,
    /// Wall time of its answered scans, seconds.
    pub scan_seconds: f64,
}

struct Member {
    clamd: ClamAv,
    limit: usize,
}

struct State {
    ends: Vec<EndpointStatus>,
    outstanding: Vec<usize>,
    last_health: Instant,
    health_running: bool,
    started: bool,
}

/// What a health check found.
enum Probe {
    Answers { version: String, sigs: Signatures },
    Down(Health, String),
}

/// The clamd endpoints of a run, as one [`Scanner`].
pub struct ClamPool {
    members: Vec<Member>,
    state: Mutex<State>,
    freed: Condvar,
    canary: bool,
    canary_timeout: Option<Duration>,
    max_age: Option<Duration>,
    health_every: Duration,
}

/// The socket path or `host:port`.
pub fn label(e: &ClamdEndpoint) -> String {
    match e {
        ClamdEndpoint::Unix(p) => p.display().to_string(),
        ClamdEndpoint::Tcp(a) => a.clone(),
    }
}

impl ClamPool {
    /// The pool `cfg` configures (nothing contacted yet).
    pub fn new(cfg: &Config) -> ClamPool {
        let s = &cfg.scanning;
        let conf = std::fs::read_to_string(&s.clamd_config).unwrap_or_default();
        let members: Vec<Member> = s
            .clamd
            .iter()
            .map(|e| Member {
                clamd: ClamAv::new(e.clone(), Duration::from_secs(s.timeout_seconds)),
                limit: match usize::try_from(s.clamd_endpoint_concurrency) {
                    Ok(0) | Err(_) => max_threads(&conf, e).unwrap_or(DEFAULT_CONCURRENCY),
                    Ok(n) => n,
                },
            })
            .collect();
        let ends = members
            .iter()
            .map(|m| EndpointStatus {
                endpoint: label(m.clamd.endpoint()),
                health: Health::Unknown,
                why: None,
                version: None,
                signatures: None,
                concurrency: m.limit,
                scans: 0,
                errors: 0,
                scan_seconds: 0.0,
            })
            .collect();
        ClamPool {
            state: Mutex::new(State {
                outstanding: vec![0; members.len()],
                ends,
                last_health: Instant::now(),
                health_running: false,
                started: false,
            }),
            members,
            freed: Condvar::new(),
            canary: s.canary,
            canary_timeout: super::Policy::from_config(s).timeout_for(68),
            max_age: super::max_signature_age(&cfg.scanning),
            health_every: Duration::from_secs(s.clamd_health_interval_seconds.max(1)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every endpoint now, for the report, metrics and `check`.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.lock().ends.clone()
    }

    fn probe(&self, i: usize) -> Probe {
        let c = &self.members[i].clamd;
        // A pool of one is asked only what a single clamd always was (VERSION, which
        // proves it answers as well as PING does).
        let pool = self.members.len() > 1;
        if pool && let Err(e) = c.ping() {
            return Probe::Down(Health::Unreachable, inner(e));
        }
        let version = match c.version() {
            Ok(v) => v,
            Err(e) => return Probe::Down(Health::Unreachable, inner(e)),
        };
        // A pool of one leaves the canary to the run's own check at its start, which
        // says what it always said.
        if self.canary
            && pool
            && let Err(why) = canary(c, self.canary_timeout)
        {
            return Probe::Down(Health::CanaryFailed, why);
        }
        let sigs = parse_signatures(&version);
        Probe::Answers { version, sigs }
    }

    /// Checks the endpoints (all of them at the start; later those out of use and
    /// those idle), in parallel: a hung one costs its command timeout once.
    fn health_pass(&self, all: bool) {
        let which: Vec<usize> = {
            let st = self.lock();
            (0..self.members.len())
                .filter(|&i| all || st.ends[i].health != Health::Up || st.outstanding[i] == 0)
                .collect()
        };
        let found: Vec<(usize, Probe)> = std::thread::scope(|s| {
            let handles: Vec<_> = which
                .iter()
                .map(|&i| (i, s.spawn(move || self.probe(i))))
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| {
                    let p = h.join().unwrap_or_else(|_| {
                        Probe::Down(Health::Unreachable, "health check panicked".into())
                    });
                    (i, p)
                })
                .collect()
        });
        let mut st = self.lock();
        let before: Vec<Health> = st.ends.iter().map(|e| e.health).collect();
        for (i, p) in found {
            let e = &mut st.ends[i];
            match p {
                Probe::Answers { version, sigs } => {
                    e.version = Some(version);
                    e.signatures = Some(sigs);
                    e.health = Health::Up;
                    e.why = None;
                }
                Probe::Down(h, why) => {
                    e.health = h;
                    e.why = Some(why);
                }
            }
        }
        self.judge(&mut st);
        for (i, e) in st.ends.iter().enumerate() {
            if all || e.health != before[i] {
                log_health(e);
            }
        }
        st.last_health = Instant::now();
        drop(st);
        self.freed.notify_all();
    }

    /// The freshness rules: of the endpoints that answer, those with signatures older
    /// than the newest, or older than `max_signature_age_hours`, are not used.
    fn judge(&self, st: &mut State) {
        let newest = st
            .ends
            .iter()
            .filter(|e| e.health.answers())
            .filter_map(|e| e.signatures.as_ref())
            .max_by_key(|s| sig_key(s))
            .cloned();
        let now = chrono::Utc::now();
        for e in st.ends.iter_mut().filter(|e| e.health.answers()) {
            let Some(sigs) = e.signatures.clone() else {
                continue;
            };
            let stale = self
                .max_age
                .and_then(|max| super::stale("clamav", &sigs, max, now));
            (e.health, e.why) = match (stale, &newest) {
                (Some(why), _) => (Health::Stale, Some(why)),
                (None, Some(n)) if sig_key(&sigs) < sig_key(n) => (
                    Health::Behind,
                    Some(format!(
                        "signatures {} of {} are older than {} of {} elsewhere in the pool",
                        sigs.version,
                        sigs.updated.as_deref().unwrap_or("unknown date"),
                        n.version,
                        n.updated.as_deref().unwrap_or("unknown date")
                    )),
                ),
                _ => (Health::Up, None),
            };
        }
    }

    /// A health pass, when one is due and no other thread runs one.
    fn maybe_health(&self) {
        {
            let mut st = self.lock();
            if st.health_running || st.last_health.elapsed() < self.health_every {
                return;
            }
            st.health_running = true;
        }
        self.health_pass(false);
        self.lock().health_running = false;
    }

    /// The usable endpoint not yet `tried` with the fewest outstanding scans, waiting
    /// while all such are at their concurrency; `None` when none is left.
    fn acquire(&self, tried: &[bool]) -> Option<usize> {
        self.acquire_if(tried, |h| h == Health::Up)
    }

    /// [`Self::acquire`] among the endpoints whose health is `accept`ed.
    fn acquire_if(&self, tried: &[bool], accept: fn(Health) -> bool) -> Option<usize> {
        let mut st = self.lock();
        loop {
            let usable: Vec<usize> = (0..self.members.len())
                .filter(|&i| !tried[i] && accept(st.ends[i].health))
                .collect();
            if usable.is_empty() {
                return None;
            }
            if let Some(&i) = usable
                .iter()
                .filter(|&&i| st.outstanding[i] < self.members[i].limit)
                .min_by_key(|&&i| (st.outstanding[i], st.ends[i].scans + st.ends[i].errors))
            {
                st.outstanding[i] += 1;
                return Some(i);
            }
            st = self
                .freed
                .wait_timeout(st, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Hands endpoint `i` back after a scan, counting it; a failure takes the
    /// endpoint out of use while another can take over.
    fn release(&self, i: usize, elapsed: Duration, outcome: &Result<Verdict, ScanError>) {
        let mut st = self.lock();
        st.outstanding[i] = st.outstanding[i].saturating_sub(1);
        let others_up = (0..self.members.len()).any(|j| j != i && st.ends[j].health == Health::Up);
        let e = &mut st.ends[i];
        match outcome {
            Ok(_) | Err(ScanError::Unscannable(_)) | Err(ScanError::Rejected(_)) => {
                e.scans += 1;
                e.scan_seconds += elapsed.as_secs_f64();
            }
            Err(err) => {
                e.errors += 1;
                if others_up && e.health == Health::Up {
                    e.health = Health::Failing;
                    e.why = Some(err.to_string());
                    log_health(e);
                }
            }
        }
        drop(st);
        self.freed.notify_all();
    }

    /// After a scan by endpoint `i`, with the version it answered with the scan: a
    /// scan after which the endpoint no longer has current signatures, or that came
    /// without a version, does not count.
    fn confirm(
        &self,
        i: usize,
        verdict: Verdict,
        version: Option<String>,
    ) -> Result<Verdict, ScanError> {
        // Without an answer the signatures this scan used are not known to be current:
        // the scan does not count (the file is scanned again elsewhere or next run).
        let Some(version) = version else {
            return Err(ScanError::Failed(format!(
                "clamd {} did not answer VERSION with the scan, so the signatures it \
                 scanned with are not confirmed",
                self.members[i].clamd.endpoint()
            )));
        };
        let mut st = self.lock();
        if st.ends[i].version.as_deref() != Some(version.as_str()) {
            let sigs = parse_signatures(&version);
            tracing::info!(
                "clamd endpoint {} reloaded: {} -> {version}; signatures {} of {}",
                st.ends[i].endpoint,
                st.ends[i].version.as_deref().unwrap_or("?"),
                sigs.version,
                sigs.updated.as_deref().unwrap_or("unknown date")
            );
            st.ends[i].version = Some(version);
            st.ends[i].signatures = Some(sigs);
            let before: Vec<Health> = st.ends.iter().map(|e| e.health).collect();
            self.judge(&mut st);
            for (j, e) in st.ends.iter().enumerate() {
                if e.health != before[j] {
                    log_health(e);
                }
            }
        }
        let e = &st.ends[i];
        if e.health == Health::Up {
            Ok(verdict)
        } else {
            Err(ScanError::Failed(format!(
                "clamd {} is {} after the scan: {}",
                e.endpoint,
                e.health,
                e.why.as_deref().unwrap_or("")
            )))
        }
    }

    fn why_none(st: &State) -> String {
        let parts: Vec<String> = st
            .ends
            .iter()
            .map(|e| {
                format!(
                    "{} {}{}",
                    e.endpoint,
                    e.health,
                    e.why
                        .as_deref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        format!("no usable clamd endpoint: {}", parts.join("; "))
    }
}

impl Scanner for ClamPool {
    fn name(&self) -> &'static str {
        "clamav"
    }

    /// The first call checks every endpoint; every call answers the version of the
    /// newest endpoint that answers (usable, or out of use for its signatures only),
    /// so that the run's freshness gate sees the pool's signatures.
    fn version(&self) -> Result<String, ScanError> {
        let first = {
            let mut st = self.lock();
            !std::mem::replace(&mut st.started, true)
        };
        if first {
            self.health_pass(true);
        }
        let st = self.lock();
        let pick = |ok: fn(Health) -> bool| {
            st.ends
                .iter()
                .enumerate()
                .filter(|(_, e)| ok(e.health))
                .filter_map(|(i, e)| Some((i, e.signatures.as_ref()?, e.version.as_ref()?)))
                // The first of equals, so that the answer does not flip between
                // endpoints with the same database (a spurious "reloaded").
                .max_by_key(|&(i, s, _)| (sig_key(s), std::cmp::Reverse(i)))
                .map(|(_, _, v)| v.clone())
        };
        pick(|h| h == Health::Up)
            .or_else(|| pick(Health::answers))
            .ok_or_else(|| match st.ends.as_slice() {
                // A pool of one says what a single clamd always said.
                [e] => ScanError::Unreachable(e.why.clone().unwrap_or_default()),
                _ => ScanError::Unreachable(Self::why_none(&st)),
            })
    }

    fn signatures(&self, version: &str) -> Result<Signatures, ScanError> {
        Ok(parse_signatures(version))
    }

    fn scan(
        &self,
        file: &File,
        path: &Path,
        size: u64,
        timeout: Option<Duration>,
    ) -> Result<Verdict, ScanError> {
        // The run's canary check at its start: one descriptor, sent once, no retry
        // elsewhere. Any endpoint that answers will do (detection does not depend on
        // how new the signatures are; the freshness gate judges them after).
        let tried = vec![false; self.members.len()];
        let i = self
            .acquire(&tried)
            .or_else(|| self.acquire_if(&tried, Health::answers))
            .ok_or_else(|| ScanError::Unreachable(Self::why_none(&self.lock())))?;
        let started = Instant::now();
        let out = self.members[i].clamd.scan(file, path, size, timeout);
        self.release(i, started.elapsed(), &out);
        out
    }

    fn scan_routed(
        &self,
        open: &dyn Fn() -> std::io::Result<File>,
        path: &Path,
        size: u64,
        timeout: Option<Duration>,
    ) -> (Result<Verdict, ScanError>, Option<String>) {
        self.maybe_health();
        let mut tried = vec![false; self.members.len()];
        let mut last: Option<(ScanError, String)> = None;
        loop {
            // A fresh descriptor per attempt: a stream read to its end by one attempt
            // must not be sent empty to the next.
            let file = match open() {
                Ok(f) => f,
                Err(e) => {
                    let err = ScanError::Failed(format!("cannot open quarantine copy: {e}"));
                    return (Err(err), None);
                }
            };
            let Some(i) = self.acquire(&tried) else {
                break;
            };
            tried[i] = true;
            let name = label(self.members[i].clamd.endpoint());
            let started = Instant::now();
            let out = match self.members[i]
                .clamd
                .scan_with_version(&file, path, size, timeout)
            {
                Ok((v, version)) => self.confirm(i, v, version),
                Err(e) => Err(e),
            };
            self.release(i, started.elapsed(), &out);
            match out {
                Ok(v) => return (Ok(v), Some(name)),
                Err(ScanError::Unscannable(w)) => {
                    return (Err(ScanError::Unscannable(w)), Some(name));
                }
                Err(e) => {
                    tracing::warn!(
                        "clamd {name}: scan of {:?} failed: {e}",
                        crate::names::shown(path)
                    );
                    last = Some((e, name));
                }
            }
        }
        match last {
            Some((e, name)) => (Err(e), Some(name)),
            None => (
                Err(ScanError::Unreachable(Self::why_none(&self.lock()))),
                None,
            ),
        }
    }

    fn unusable(&self) -> Option<String> {
        let st = self.lock();
        (st.started && !st.ends.iter().any(|e| e.health == Health::Up)).then(|| Self::why_none(&st))
    }

    fn endpoints(&self) -> Vec<EndpointStatus> {
        self.status()
    }
}

/// An error's own message, without the variant's prefix.
fn inner(e: ScanError) -> String {
    match e {
        ScanError::Unscannable(m)
        | ScanError::Unreachable(m)
        | ScanError::Failed(m)
        | ScanError::Rejected(m) => m,
        ScanError::Timeout(t) => format!("no answer within {t:?}"),
    }
}

fn log_health(e: &EndpointStatus) {
    if e.health == Health::Up {
        tracing::info!(
            "clamd endpoint {}: up, {}; concurrency {}",
            e.endpoint,
            e.version.as_deref().unwrap_or("?"),
            e.concurrency
        );
    } else {
        tracing::warn!(
            "clamd endpoint {}: NOT USED ({}): {}",
            e.endpoint,
            e.health,
            e.why.as_deref().unwrap_or("")
        );
    }
}

/// Orders signature databases by version number (one number is one database, however
/// often it is rebuilt); unnumbered ones first, among themselves by date.
fn sig_key(s: &Signatures) -> (Option<u64>, Option<chrono::DateTime<chrono::FixedOffset>>) {
    match s.version.parse() {
        Ok(n) => (Some(n), None),
        Err(_) => (
            None,
            s.updated
                .as_deref()
                .and_then(|d| chrono::DateTime::parse_from_rfc3339(d).ok()),
        ),
    }
}

/// `MaxThreads` of the clamd.conf `conf`, when it describes `endpoint` (its
/// `LocalSocket`, or a `TCPSocket` with the endpoint's port).
fn max_threads(conf: &str, endpoint: &ClamdEndpoint) -> Option<usize> {
    let value = |key: &str| {
        conf.lines().find_map(|l| {
            let mut p = l.split_whitespace();
            (p.next() == Some(key)).then(|| p.next().map(str::to_string))?
        })
    };
    let describes = match endpoint {
        ClamdEndpoint::Unix(p) => value("LocalSocket").is_some_and(|s| Path::new(&s) == p),
        ClamdEndpoint::Tcp(a) => {
            value("TCPSocket").is_some_and(|port| a.rsplit(':').next() == Some(port.as_str()))
        }
    };
    if !describes {
        return None;
    }
    Some(
        value("MaxThreads")
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(DEFAULT_CONCURRENCY),
    )
}

/// Scans the EICAR test file with one endpoint; `Err`: why it cannot be trusted.
fn canary(c: &ClamAv, timeout: Option<Duration>) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("shuttle-canary.")
        .tempdir()
        .map_err(|e| format!("cannot create canary directory: {e}"))?;
    let path = dir.path().join("eicar.com");
    std::fs::write(&path, super::eicar()).map_err(|e| format!("cannot write canary file: {e}"))?;
    let file = File::open(&path).map_err(|e| format!("cannot open canary file: {e}"))?;
    match c.scan(&file, &path, super::eicar().len() as u64, timeout) {
        Ok(Verdict::Suspect(_)) => Ok(()),
        Ok(Verdict::Clean) => {
            Err("the EICAR test file was reported clean (signatures missing?)".into())
        }
        Err(e) => Err(format!("canary scan of the EICAR test file failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_threads_only_from_a_conf_that_describes_the_endpoint() {
        let conf = "LocalSocket /run/c.sock\nTCPSocket 3310\nMaxThreads 4\n";
        let unix = |p: &str| ClamdEndpoint::Unix(p.into());
        assert_eq!(max_threads(conf, &unix("/run/c.sock")), Some(4));
        assert_eq!(max_threads(conf, &unix("/run/other.sock")), None);
        assert_eq!(
            max_threads(conf, &ClamdEndpoint::Tcp("10.0.0.1:3310".into())),
            Some(4)
        );
        assert_eq!(
            max_threads(conf, &ClamdEndpoint::Tcp("10.0.0.1:3311".into())),
            None
        );
        assert_eq!(max_threads("LocalSocket /a\n", &unix("/a")), Some(10));
    }

    #[test]
    fn versions_then_dates_order_signatures() {
        let s = |v: &str, d: Option<&str>| Signatures {
            version: v.into(),
            updated: d.map(str::to_string),
        };
        let day = |d: &str| Some(format!("2026-01-0{d}T00:00:00Z"));
        assert!(sig_key(&s("none", None)) < sig_key(&s("1", day("1").as_deref())));
        assert!(sig_key(&s("1", day("2").as_deref())) < sig_key(&s("2", day("1").as_deref())));
        assert_eq!(
            sig_key(&s("2", day("1").as_deref())),
            sig_key(&s("2", day("2").as_deref()))
        );
        assert!(
            sig_key(&s("none", day("1").as_deref())) < sig_key(&s("none", day("2").as_deref()))
        );
    }
}
