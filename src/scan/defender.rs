//! Microsoft Defender for Endpoint through its command-line client (docs/design.md §1.8):
//! `mdatp scan custom --ignore-exclusions --path FILE`, one process per file.
//!
//! mdatp has no machine-readable scan output, so the verdict is read from its text:
//! [`parse_scan`] is strict on purpose. Anything that is not clearly clean (exit 0,
//! the final lines `\t1 file(s) scanned` / `\t0 threat(s) detected`) is a detection or
//! a failure, never clean. Which Defender versions print what we expect is recorded
//! in the ledger by `shuttle defender-test` (see [`crate::ledger`]).
//!
//! Every mdatp process runs in its own process group; when its timeout expires the
//! whole group is killed and reaped, so a hung mdatp (or anything it started) never
//! outlives the scan.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, WaitOptions};

use super::{ScanError, Scanner, Verdict};

/// How long `mdatp version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running mdatp is checked for exit.
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for the processes of a killed group to die and be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(5);
/// Output beyond this is not kept (mdatp prints a few lines per file).
const MAX_OUTPUT: usize = 1 << 20;
/// Detection name when mdatp says a threat was found but names none we can read.
pub const GENERIC_DETECTION: &str = "Defender:UnnamedThreat";

pub struct Defender {
    command: String,
}

impl Defender {
    /// `command` is `mdatp_command` (default `mdatp`), looked up in `$PATH`.
    pub fn new(command: &str) -> Defender {
        Defender {
            command: command.to_string(),
        }
    }

    /// `mdatp version` → the `Product version:` it prints (e.g. `101.24092.0002`).
    pub fn product_version(&self) -> Result<String, ScanError> {
        let out = run(&self.command, &["version"], Some(VERSION_TIMEOUT))?;
        if !out.status.success() {
            return Err(ScanError::Failed(format!(
                "`{} version` {}: {}",
                self.command,
                describe_status(out.status),
                snippet(&out.stdout, &out.stderr)
            )));
        }
        parse_version(&out.stdout).ok_or_else(|| {
            ScanError::Failed(format!(
                "`{} version` printed no `Product version:` line: {}",
                self.command,
                snippet(&out.stdout, &out.stderr)
            ))
        })
    }
}

impl Scanner for Defender {
    fn name(&self) -> &'static str {
        "defender"
    }

    fn version(&self) -> Result<String, ScanError> {
        self.product_version()
    }

    /// `mdatp health` is a process start: asked once a minute, not after every file.
    fn recheck_every(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// `mdatp health` → `definitions_version` and `definitions_updated_minutes_ago`
    /// (or, without it, `definitions_updated`, e.g. `Nov 24, 2026 at 08:00:00 AM`, taken
    /// as UTC).
    fn signatures(&self, _version: &str) -> Result<super::Signatures, ScanError> {
        let out = run(&self.command, &["health"], Some(VERSION_TIMEOUT))?;
        if !out.status.success() {
            return Err(ScanError::Failed(format!(
                "`{} health` {}: {}",
                self.command,
                describe_status(out.status),
                snippet(&out.stdout, &out.stderr)
            )));
        }
        Ok(parse_health(out.stdout.as_bytes(), chrono::Utc::now()))
    }

    /// Defender scans by path (it opens the file itself); `file` only proves that
    /// the caller checked the copy is the one Shuttle wrote.
    fn scan(
        &self,
        _file: &File,
        path: &Path,
        _size: u64,
        timeout: Option<Duration>,
    ) -> Result<Verdict, ScanError> {
        let Some(path_str) = path.to_str() else {
            return Err(ScanError::Failed(format!(
                "path {} is not valid UTF-8; not passed to mdatp",
                path.display()
            )));
        };
        // mdatp's clean result is recognised by `\n\t` line starts: a path holding a
        // control character could forge one, so such a path is never scanned (discovery
        // skips such names anyway).
        if path_str.chars().any(char::is_control) {
            return Err(ScanError::Failed(format!(
                "path {path_str:?} contains control characters; not passed to mdatp"
            )));
        }
        let out = run(
            &self.command,
            &["scan", "custom", "--ignore-exclusions", "--path", path_str],
            timeout,
        )?;
        parse_scan(&out.stdout, out.status.code()).map_err(|e| match e {
            ParseError::NonZeroExit => ScanError::Failed(format!(
                "mdatp {}: {}",
                describe_status(out.status),
                snippet(&out.stdout, &out.stderr)
            )),
            other => ScanError::Failed(format!(
                "mdatp: {other}: {}",
                snippet(&out.stdout, &out.stderr)
            )),
        })
    }
}

/// Why an mdatp scan output is not a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("no output")]
    Empty,
    #[error("0 file(s) scanned: the file was not found or not readable by Defender")]
    NotFound,
    #[error("exit status not 0 and no threat reported")]
    NonZeroExit,
    #[error("output not recognised as a clean result")]
    Unrecognised,
}

const THREATS_FOUND: &str = "Threat(s) found";
const CLEAN_COUNT: &str = "\t0 threat(s) detected";
const ONE_FILE: &str = "\t1 file(s) scanned";
const NO_FILE: &str = "\t0 file(s) scanned";

/// Reads a verdict from `mdatp scan custom` output and its exit code (`None`: killed
/// by a signal).
///
/// Order matters: `Threat(s) found` anywhere wins (a detection is never dismissed,
/// whatever the exit code); then the output must *end* with the counts
/// `\t1 file(s) scanned\n\t0 threat(s) detected` and the exit code be 0 to be clean.
/// Anchoring on the final lines, not `contains`, means a file name that holds the
/// clean text cannot fake a clean result; `0 file(s) scanned` means mdatp did not
/// scan the file at all.
pub fn parse_scan(stdout: &str, code: Option<i32>) -> Result<Verdict, ParseError> {
    if stdout.contains(THREATS_FOUND) {
        return Ok(Verdict::Suspect(detection_names(stdout)));
    }
    if code != Some(0) {
        return Err(ParseError::NonZeroExit);
    }
    let text = stdout.trim_end();
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    let mut lines = text.rsplit('\n').map(|l| l.trim_end_matches('\r'));
    let last = lines.next().unwrap_or_default();
    let before = lines.next().map(str::trim_end).unwrap_or_default();
    if last == CLEAN_COUNT && before == ONE_FILE {
        Ok(Verdict::Clean)
    } else if last == CLEAN_COUNT && before == NO_FILE {
        Err(ParseError::NotFound)
    } else {
        Err(ParseError::Unrecognised)
    }
}

/// Detection names from the lines after `Threat(s) found`: `\t<path>: <name>`.
/// The name is what follows the last `": "` (paths may contain one; Defender's names,
/// like `Virus:DOS/EICAR_Test_File`, contain `:` but no `": "`). Falls back to
/// [`GENERIC_DETECTION`] so that a detection always has a name.
pub fn detection_names(stdout: &str) -> Vec<String> {
    let mut names = Vec::new();
    let Some((_, after)) = stdout.split_once(THREATS_FOUND) else {
        return vec![GENERIC_DETECTION.to_string()];
    };
    for line in after.lines().map(str::trim) {
        if line.is_empty() || is_count_line(line) {
            continue;
        }
        if let Some((_, name)) = line.rsplit_once(": ") {
            let name = name.trim();
            let plausible = !name.is_empty()
                && name.len() <= 200
                && !name.chars().any(|c| c.is_control() || c.is_whitespace());
            if plausible && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    if names.is_empty() {
        names.push(GENERIC_DETECTION.to_string());
    }
    names
}

fn is_count_line(line: &str) -> bool {
    let mut parts = line.splitn(2, ' ');
    let (Some(n), Some(rest)) = (parts.next(), parts.next()) else {
        return false;
    };
    n.chars().all(|c| c.is_ascii_digit())
        && matches!(rest, "file(s) scanned" | "threat(s) detected")
}

/// `Product version: X` from `mdatp version`.
pub fn parse_version(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let v = l.trim().strip_prefix("Product version:")?.trim();
        let ok = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        ok.then(|| v.to_string())
    })
}

/// What an mdatp process printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command args…` in a new process group, its output read on two threads.
/// With a timeout, on expiry the whole group gets SIGKILL, is reaped and the result
/// is [`ScanError::Timeout`]. After a normal exit any process the child left in its
/// group is killed too, before the child is reaped (so the group id cannot have been
/// reused).
///
/// Shuttle makes itself a child subreaper (Linux `PR_SET_CHILD_SUBREAPER`) first:
/// the killed child's own children are then reparented to Shuttle instead of init
/// and reaped here, so not even a zombie of a scan outlives it.
pub fn run(command: &str, args: &[&str], timeout: Option<Duration>) -> Result<Output, ScanError> {
    static SUBREAPER: std::sync::Once = std::sync::Once::new();
    SUBREAPER.call_once(|| {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::debug!("cannot become a child subreaper: {e}");
        }
    });
    let started = Instant::now();
    let mut child = Command::new(command)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| ScanError::Unreachable(format!("cannot start {command:?}: {e}")))?;
    let pid = Pid::from_child(&child);

    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let readers: Vec<(bool, Box<dyn Read + Send>)> = [
        child
            .stdout
            .take()
            .map(|s| (true, Box::new(s) as Box<dyn Read + Send>)),
        child
            .stderr
            .take()
            .map(|s| (false, Box::new(s) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let expected = readers.len();
    for (is_stdout, mut pipe) in readers {
        let tx = tx.clone();
        // Detached: if a grandchild escaped the group and keeps the pipe open, the
        // thread ends when it does; the scan does not wait for it.
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.by_ref().take(MAX_OUTPUT as u64).read_to_end(&mut buf);
            // Drain the rest so the writer never blocks on a full pipe.
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            let _ = tx.send((is_stdout, buf));
        });
    }
    drop(tx);

    let deadline = timeout.map(|t| started + t);
    let expired = |now: Instant| deadline.is_some_and(|d| now >= d);
    let on_timeout = |child: &mut Child| {
        kill_group(pid);
        let _ = child.wait();
        reap_group(pid);
        ScanError::Timeout(timeout.unwrap_or_default())
    };

    // 1. Wait for the child to exit, without reaping it.
    loop {
        match rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        ) {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                kill_group(pid);
                let _ = child.wait();
                reap_group(pid);
                return Err(ScanError::Failed(format!("waiting for {command}: {e}")));
            }
        }
        if expired(Instant::now()) {
            return Err(on_timeout(&mut child));
        }
        std::thread::sleep(POLL);
    }
    // 2. Nothing of this scan may outlive it.
    kill_group(pid);
    let status = child
        .wait()
        .map_err(|e| ScanError::Failed(format!("reaping {command}: {e}")));
    reap_group(pid);
    let status = status?;

    // 3. Collect the output; the pipes close now that the group is gone.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..expected {
        let got = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match got {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(ScanError::Timeout(timeout.unwrap_or_default()));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// SIGKILL to every process in the group led by `pid`. ESRCH (nothing left) is fine.
fn kill_group(pid: Pid) {
    match rustix::process::kill_process_group(pid, Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => tracing::error!("cannot kill process group {}: {e}", pid.as_raw_nonzero()),
    }
}

/// Reaps what is left of the killed group `pgid` (its members that became Shuttle's
/// children as orphans), until none is left or [`REAP_LIMIT`] passes. The leader
/// is reaped by then, so the group id stays unique only while members remain: a
/// stale id finds no children and ends the loop.
fn reap_group(pgid: Pid) {
    let until = Instant::now() + REAP_LIMIT;
    loop {
        match rustix::process::waitpgid(pgid, WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            Ok(None) if Instant::now() < until => std::thread::sleep(POLL),
            Ok(None) => {
                tracing::warn!(
                    "processes of killed process group {} have not ended after {REAP_LIMIT:?}",
                    pgid.as_raw_nonzero()
                );
                return;
            }
            Err(rustix::io::Errno::INTR) => {}
            // ECHILD: none of the group is (or will become) Shuttle's child.
            Err(_) => return,
        }
    }
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {s}"),
    }
}

/// The end of what mdatp printed, on one line, for an error message.
fn snippet(stdout: &str, stderr: &str) -> String {
    let joined = format!("{} {}", stdout.trim(), stderr.trim());
    let one_line: String = joined
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if one_line.is_empty() {
        return "(no output)".into();
    }
    let n = one_line.chars().count();
    if n > 300 {
        let tail: String = one_line.chars().skip(n - 300).collect();
        format!("…{tail}")
    } else {
        one_line
    }
}

/// The definitions' version and date in `mdatp health` output (`field : value` lines).
pub fn parse_health(stdout: &[u8], now: chrono::DateTime<chrono::Utc>) -> super::Signatures {
    let text = String::from_utf8_lossy(stdout);
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let version = field("definitions_version").unwrap_or_else(|| "unknown".into());
    let by_minutes = field("definitions_updated_minutes_ago")
        .and_then(|m| m.parse::<i64>().ok())
        .filter(|m| *m >= 0)
        .map(|m| now - chrono::Duration::minutes(m));
    let by_date = || {
        let d = field("definitions_updated")?;
        chrono::NaiveDateTime::parse_from_str(&d, "%b %d, %Y at %I:%M:%S %p")
            .ok()
            .map(|t| t.and_utc())
    };
    let updated = by_minutes
        .or_else(by_date)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    super::Signatures { version, updated }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str =
        "Scan has started\nScan has finished\n\t1 file(s) scanned\n\t0 threat(s) detected\n";

    fn threat(path: &str) -> String {
        format!(
            "Scan has started\nScan has finished\nThreat(s) found\n\t{path}: Virus:DOS/EICAR_Test_File\n\t1 file(s) scanned\n\t1 threat(s) detected\n"
        )
    }

    #[test]
    fn clean_needs_exit_0_one_file_and_zero_threats_at_the_end() {
        assert_eq!(parse_scan(CLEAN, Some(0)), Ok(Verdict::Clean));
        assert_eq!(
            parse_scan(&CLEAN.replace('\n', "\r\n"), Some(0)),
            Ok(Verdict::Clean)
        );
        assert_eq!(parse_scan(CLEAN, Some(2)), Err(ParseError::NonZeroExit));
        assert_eq!(parse_scan(CLEAN, None), Err(ParseError::NonZeroExit));
        assert_eq!(
            parse_scan("\n\t0 threat(s) detected\n", Some(0)),
            Err(ParseError::Unrecognised),
            "no file count: not clean"
        );
        assert_eq!(
            parse_scan("\t10 threat(s) detected", Some(0)),
            Err(ParseError::Unrecognised)
        );
    }

    #[test]
    fn threat_found_wins_whatever_else() {
        let v = parse_scan(&threat("/q/a.com"), Some(0));
        assert_eq!(
            v,
            Ok(Verdict::Suspect(vec!["Virus:DOS/EICAR_Test_File".into()]))
        );
        assert!(matches!(
            parse_scan(&threat("/q/a.com"), Some(3)),
            Ok(Verdict::Suspect(_))
        ));
        // Clean counts printed after a threat line still mean a threat.
        let mixed = format!("Threat(s) found\n{CLEAN}");
        assert_eq!(
            parse_scan(&mixed, Some(0)),
            Ok(Verdict::Suspect(vec![GENERIC_DETECTION.into()]))
        );
    }

    #[test]
    fn a_file_name_holding_the_clean_text_cannot_fake_clean() {
        // The name is printed after the counts (e.g. in an error): the last lines
        // are not the counts, so not clean.
        let name = "/q/x\n\t1 file(s) scanned\n\t0 threat(s) detected";
        let tricked = format!("Scan has started\nError: cannot open {name}: denied\n");
        assert_eq!(parse_scan(&tricked, Some(0)), Err(ParseError::Unrecognised));
        let plain = "/q/x 1 file(s) scanned 0 threat(s) detected";
        assert_eq!(
            parse_scan(&format!("Error: Path does not exist: {plain}\n"), Some(0)),
            Err(ParseError::Unrecognised)
        );
        // A threat in a file so named is still a threat, with its name parsed.
        let v = parse_scan(&threat(name), Some(0));
        assert_eq!(
            v,
            Ok(Verdict::Suspect(vec!["Virus:DOS/EICAR_Test_File".into()]))
        );
    }

    #[test]
    fn not_found_empty_and_garbage_are_failures() {
        let nf =
            "Scan has started\nScan has finished\n\t0 file(s) scanned\n\t0 threat(s) detected\n";
        assert_eq!(parse_scan(nf, Some(0)), Err(ParseError::NotFound));
        assert_eq!(parse_scan("", Some(0)), Err(ParseError::Empty));
        assert_eq!(parse_scan(" \n\n", Some(0)), Err(ParseError::Empty));
        assert_eq!(
            parse_scan("Segmentation fault\n%$#@!", Some(0)),
            Err(ParseError::Unrecognised)
        );
    }

    #[test]
    fn detection_names_from_threat_lines() {
        let out = "Threat(s) found\n\t/q/a: b.com: Virus:DOS/EICAR_Test_File\n\t/q/c: Trojan:Win32/X\n\t/q/d: Virus:DOS/EICAR_Test_File\n\t2 file(s) scanned\n\t3 threat(s) detected\n";
        assert_eq!(
            detection_names(out),
            vec!["Virus:DOS/EICAR_Test_File", "Trojan:Win32/X"]
        );
        assert_eq!(
            detection_names("Threat(s) found\n"),
            vec![GENERIC_DETECTION]
        );
    }

    #[test]
    fn health_fields() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let s = parse_health(
            b"healthy : true\ndefinitions_updated : Nov 24, 2026 at 08:00:00 AM\ndefinitions_updated_minutes_ago : 120\ndefinitions_version : \"1.419.166.0\"\n",
            now,
        );
        assert_eq!(s.version, "1.419.166.0");
        assert_eq!(s.updated.as_deref(), Some("2026-11-25T08:00:00Z"));
        let s = parse_health(
            b"definitions_updated : Nov 24, 2026 at 08:00:00 PM\ndefinitions_version : \"1.2\"\n",
            now,
        );
        assert_eq!(s.updated.as_deref(), Some("2026-11-24T20:00:00Z"));
        assert_eq!(parse_health(b"healthy : true\n", now).updated, None);
    }

    #[test]
    fn version_line() {
        let out = "Product version: 101.24092.0002\nEngine version: 1.1.24090.11\n";
        assert_eq!(parse_version(out).as_deref(), Some("101.24092.0002"));
        assert_eq!(parse_version("Engine version: 1\n"), None);
        assert_eq!(parse_version("Product version: \n"), None);
        assert_eq!(parse_version("Product version: 1 2\n"), None);
    }
}
