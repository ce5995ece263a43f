//! Configuration: command-line flags > config file > defaults (docs/design.md §1.1, §5).
//!
//! Every value remembers where it came from, so that a wrong value is reported with
//! the key, the value and its origin (`/etc/shuttle/config.conf line 12`, `flag
//! --max-scan-threads`) and is never silently replaced by a default.
//!
//! The earlier implementation's values keep their meaning: `log_level = CRITICAL`
//! (and `FATAL`, `WARN`, Python's numeric levels), `max_scan_threads = 0` (one file
//! at a time), `malware_scan_retry_count = 0` (no limit); each is accepted with a
//! warning saying what it means here, and what is risky about it where it is.
//!
//! What a command needs is checked per command ([`Needs`]): `run`, `watch` and
//! `check` need the three directories and a scanner; `defender-test`, `history` and
//! `hazard list` run with a config that holds only the keys they use.

pub mod ini;
pub mod keys;

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: usize },
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File { path, line } => write!(f, "{} line {line}", path.display()),
            Origin::Flag(flag) => write!(f, "flag --{flag}"),
        }
    }
}

/// A configuration problem. Each one is a single line an administrator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {key} (from {origin}): expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        expected: String,
    },
    #[error("cannot read config file {path} (named by {named_by}): {source}")]
    Read {
        path: PathBuf,
        named_by: &'static str,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Syntax {
        path: PathBuf,
        source: ini::SyntaxError,
    },
    #[error("{0}")]
    Problem(String),
}

/// All problems found, reported together (`shuttle check` prints each).
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "configuration error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Admission order: discovery's ([`crate::discover::Priority`]), configured here.
pub use crate::discover::Priority;

/// What a retro-scan does with a delivered file that newer signatures detect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescanAction {
    /// Mail, journal and report it; the destination copy stays.
    Alert,
    /// Also encrypt the destination copy into the hazard archive and remove it.
    Withdraw,
}

/// The retro-scan settings (`rescan_days`, `rescan_action`, `rescan_budget_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescanConfig {
    /// Deliveries this many days back are rescanned; 0 = off.
    pub days: u64,
    pub action: RescanAction,
    /// Per run or watch pass; 0 = no limit.
    pub budget_seconds: u64,
}

/// What to do when the destination name holds different bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Keep both: the new file gets a numbered suffix.
    Rename,
    /// Do not deliver; the source stays for a later run.
    Skip,
    Overwrite,
}

/// How to reach clamd.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClamdEndpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl fmt::Display for ClamdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdEndpoint::Unix(p) => write!(f, "unix socket {}", p.display()),
            ClamdEndpoint::Tcp(a) => write!(f, "tcp {a}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    pub enabled: bool,
    pub quarantine_free_mb: u64,
    pub destination_free_mb: u64,
    pub hazard_free_mb: u64,
    pub max_files_per_day: u64,
    pub max_mb_per_day: u64,
    pub max_files_per_run: u64,
    pub max_mb_per_run: u64,
}

#[derive(Debug, Clone)]
pub struct ScanConfig {
    pub clam_av: bool,
    pub defender: bool,
    pub defender_handles_suspect_files: bool,
    pub timeout_seconds: u64,
    pub timeout_ms_per_byte: f64,
    pub retry_wait_seconds: u64,
    pub retry_count: u32,
    /// The clamd pool: every endpoint of `clamd_socket` and `clamd_address`, sockets
    /// first. Empty when ClamAV is off or no socket could be determined (a validation
    /// error).
    pub clamd: Vec<ClamdEndpoint>,
    /// Scans one endpoint is given at once; 0: its clamd.conf `MaxThreads` when
    /// `clamd_config` describes it, else clamd's default of 10.
    pub clamd_endpoint_concurrency: u64,
    /// How often endpoints are checked again (PING, VERSION, canary) during a run.
    pub clamd_health_interval_seconds: u64,
    /// clamd's configuration file (default socket, scan limits for `check`).
    pub clamd_config: PathBuf,
    pub mdatp_command: String,
    pub canary: bool,
    pub max_file_size_mb: u64,
    /// 0: the signature freshness gate is off.
    pub max_signature_age_hours: u64,
    pub block_encrypted_archives: bool,
}

#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub notify: bool,
    pub notify_summary: bool,
    pub recipient_email: Option<String>,
    pub recipient_email_error: Option<String>,
    pub recipient_email_summary: Option<String>,
    pub recipient_email_hazard: Option<String>,
    pub sender_email: Option<String>,
    pub smtp_server: Option<String>,
    pub smtp_port: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// STARTTLS required (default true). AUTH is never attempted without it.
    pub use_tls: bool,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            notify: false,
            notify_summary: false,
            recipient_email: None,
            recipient_email_error: None,
            recipient_email_summary: None,
            recipient_email_hazard: None,
            sender_email: None,
            smtp_server: None,
            smtp_port: None,
            username: None,
            password: None,
            use_tls: true,
        }
    }
}

impl NotifyConfig {
    /// Why no mail at all can be sent with these settings (empty when `notify` is off
    /// or mail can go). `check` reports each as a problem; `run` logs each as an
    /// error and goes on without mail: files keep moving.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.notify {
            return p;
        }
        if self.smtp_server.is_none() {
            p.push("notify is on but smtp_server is not set: no mail can be sent".to_string());
        }
        if self.recipient_email.is_none()
            && self.recipient_email_error.is_none()
            && self.recipient_email_hazard.is_none()
            && self.recipient_email_summary.is_none()
        {
            p.push(
                "notify is on but no recipient is set (recipient_email, or recipient_email_error/_hazard/_summary): no mail can be sent"
                    .to_string(),
            );
        }
        if self.username.is_some() && !self.use_tls {
            p.push(
                "username/password are set but use_tls is off: Shuttle never sends a password over an unencrypted connection, so no mail can be sent (set use_tls = true, the default, with a mail server that offers STARTTLS; or remove username/password for a server that needs no AUTH)"
                    .to_string(),
            );
        }
        p
    }
}

/// Where the single-instance lock lives unless `lock_path` says otherwise: under
/// `/run/shuttle`, which the systemd units create (`RuntimeDirectory=shuttle`) and which,
/// unlike `/tmp`, is the same directory for every unit (`PrivateTmp` gives each its own
/// `/tmp`).
pub const DEFAULT_LOCK_PATH: &str = "/run/shuttle/shuttle.lock";

/// The validated configuration of one Shuttle invocation.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    pub source_path: PathBuf,
    pub destination_path: PathBuf,
    pub quarantine_path: PathBuf,
    pub hazard_archive_path: Option<PathBuf>,
    pub hazard_encryption_key_path: Option<PathBuf>,
    pub ledger_file_path: Option<PathBuf>,
    pub log_path: Option<PathBuf>,
    /// Per-run log files older than this many days are removed; 0 keeps them all.
    pub log_retention_days: u64,
    pub lock_path: PathBuf,
    pub tracking_data_path: PathBuf,
    pub metrics_path: Option<PathBuf>,
    /// Fleet mode: the journal in PostgreSQL (`None`: SQLite in `tracking_data_path`).
    pub fleet: Option<FleetConfig>,
    /// The fleet keys other than the URL (node name, password file, lease), for
    /// `shuttle journal migrate --to URL`.
    pub fleet_keys: FleetConfig,
    pub delete_source_files: bool,
    pub max_scan_threads: usize,
    pub throttle: ThrottleConfig,
    pub skip_stability_check: bool,
    /// Take files with more than one hard link (default: leave them in place).
    pub allow_hard_links: bool,
    pub stability_seconds: u64,
    pub priority: Priority,
    /// Source subdirectories admitted first, relative to `source_path`.
    pub priority_paths: Vec<PathBuf>,
    pub on_conflict: OnConflict,
    pub rescan_interval_seconds: u64,
    /// Retro-scan of recent deliveries when signatures are newer (`crate::rescan`).
    pub rescan: RescanConfig,
    pub scanning: ScanConfig,
    pub log_level: String,
    /// The lines stderr shows ("off": none); the log file follows `log_level`.
    pub stderr_log_level: String,
    pub notifications: NotifyConfig,
    /// Which name rules discovery relaxes (all strict by default).
    pub name_rules: crate::discover::NameRules,
}

/// Fleet mode (docs/fleet.md): the journal in PostgreSQL, shared by several nodes.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `postgresql://user@host:port/db`, never with a password.
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// This node's name in claims and status.
    pub node: String,
    pub lease_seconds: u64,
}

/// The fleet keys. A URL that is not PostgreSQL's, or that carries a password, is a
/// configuration error: passwords come from a file, never a flag or a URL.
fn fleet_config(r: &mut Reader) -> (FleetConfig, Option<FleetConfig>) {
    let password_file = r.path("journal_password_file");
    let node = r.text("fleet_node_name");
    let lease_seconds = r.number("fleet_lease_seconds", 300, 3);
    let base = FleetConfig {
        url: String::new(),
        password_file,
        node: node.unwrap_or_else(|| {
            rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned()
        }),
        lease_seconds,
    };
    let fleet = fleet_url(r).map(|url| FleetConfig {
        url,
        ..base.clone()
    });
    (base, fleet)
}

/// `journal_url`, when it names a PostgreSQL database without a password.
fn fleet_url(r: &mut Reader) -> Option<String> {
    let (url, origin) = r.get("journal_url")?;
    if url.is_empty() {
        return None;
    }
    let origin = origin.clone();
    let Some(rest) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
    else {
        r.invalid(
            "journal_url",
            url,
            &origin,
            "empty (SQLite) or postgresql://user@host:port/database",
        );
        return None;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        // Never echo the value: it holds a password.
        r.errors.push(ConfigError::Problem(format!(
            "journal_url ({origin}) carries a password: remove it and put it in journal_password_file or PGPASSFILE"
        )));
        return None;
    }
    Some(url.to_string())
}

/// What the command being run needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `run`, `watch`, `check`, `status`: the three directories and a scanner.
    Transfer,
    /// `defender-test`, `history`, `hazard list`: only the keys they read; missing
    /// directories or clamd settings are not an error.
    KeysOnly,
}

/// A loaded configuration and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
    /// Keys the config file names that Shuttle does not know (a typo leaves the key
    /// it meant at its default), each with the closest known key: a problem for
    /// `check`, a warning for `run`.
    pub unknown_keys: Vec<String>,
}

/// What the command line says about configuration.
#[derive(Debug, Default, Clone)]
pub struct CommandLine {
    /// `--config` / `--settings-path`.
    pub config_file: Option<PathBuf>,
    /// Canonical key name → value given as a flag.
    pub flags: Vec<(&'static str, String)>,
}

/// Default config file locations, in search order (docs/design.md §1.1).
fn default_locations() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(home) = home_dir() {
        v.push(home.join(".config/shuttle/config.conf"));
        v.push(home.join(".shuttle/config.conf"));
        v.push(home.join(".shuttle/settings.ini"));
    }
    v.push(PathBuf::from("/etc/shuttle/config.conf"));
    v.push(PathBuf::from("/usr/local/etc/shuttle/config.conf"));
    v
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Expands a leading `~` to `$HOME`.
pub fn expand_tilde(value: &str) -> PathBuf {
    if value == "~" {
        return home_dir().unwrap_or_else(|| PathBuf::from(value));
    }
    if let Some(rest) = value.strip_prefix("~/")
        && let Some(home) = home_dir()
    {
        return home.join(rest);
    }
    PathBuf::from(value)
}

/// Raw values by canonical key, each with its origin; later sources override earlier.
#[derive(Default)]
struct Raw {
    values: HashMap<&'static str, (String, Origin)>,
}

impl Raw {
    fn get(&self, key: &str) -> Option<(&str, &Origin)> {
        self.values.get(key).map(|(v, o)| (v.as_str(), o))
    }
}

/// Collects typed values, remembering every invalid one.
struct Reader<'a> {
    raw: &'a Raw,
    /// Every key asked for: a test checks that each key in the table is read.
    asked: std::collections::BTreeSet<&'static str>,
    errors: Vec<ConfigError>,
    /// Problems that matter only to commands moving files ([`Needs::Transfer`]).
    transfer_errors: Vec<ConfigError>,
}

impl<'a> Reader<'a> {
    /// The raw value of `key`, if set; every lookup goes through here.
    fn get(&mut self, key: &'static str) -> Option<(&'a str, &'a Origin)> {
        self.asked.insert(key);
        self.raw.get(key)
    }

    fn invalid(&mut self, key: &'static str, value: &str, origin: &Origin, expected: &str) {
        self.errors.push(ConfigError::Invalid {
            key,
            value: value.to_string(),
            origin: origin.clone(),
            expected: expected.to_string(),
        });
    }

    /// A text value; empty counts as unset.
    fn text(&mut self, key: &'static str) -> Option<String> {
        self.get(key)
            .map(|(v, _)| v.to_string())
            .filter(|v| !v.is_empty())
    }

    fn path(&mut self, key: &'static str) -> Option<PathBuf> {
        self.text(key).map(|v| expand_tilde(&v))
    }

    fn bool(&mut self, key: &'static str, default: bool) -> bool {
        let Some((v, origin)) = self.get(key) else {
            return default;
        };
        match parse_bool(v) {
            Some(b) => b,
            None => {
                let origin = origin.clone();
                self.invalid(key, v, &origin, "true/false, yes/no, on/off or 1/0");
                default
            }
        }
    }

    fn number(&mut self, key: &'static str, default: u64, min: u64) -> u64 {
        let Some((v, origin)) = self.get(key) else {
            return default;
        };
        match v.parse::<u64>() {
            Ok(n) if n >= min => n,
            _ => {
                let origin = origin.clone();
                let expected = format!("a whole number ≥ {min}");
                self.invalid(key, v, &origin, &expected);
                default
            }
        }
    }

    fn float(&mut self, key: &'static str, default: f64) -> f64 {
        let Some((v, origin)) = self.get(key) else {
            return default;
        };
        match v.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => n,
            _ => {
                let origin = origin.clone();
                self.invalid(key, v, &origin, "a number ≥ 0");
                default
            }
        }
    }

    fn choice<T: Copy>(&mut self, key: &'static str, default: T, options: &[(&str, T)]) -> T {
        let Some((v, origin)) = self.get(key) else {
            return default;
        };
        let lower = v.to_ascii_lowercase();
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == lower) {
            return *t;
        }
        let origin = origin.clone();
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.invalid(key, v, &origin, &format!("one of {}", names.join(", ")));
        default
    }
}

/// `true/false`, `yes/no`, `1/0`, `on/off`, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Some(true),
        "false" | "no" | "0" | "off" => Some(false),
        _ => None,
    }
}

/// The names `log_level` and `stderr_log_level` take, and the level each means
/// (Python's level names and numbers keep their meaning); `off` is stderr's alone.
const LOG_LEVELS: &[(&str, &str)] = &[
    ("off", "off"),
    ("error", "error"),
    ("critical", "error"),
    ("fatal", "error"),
    ("warn", "warn"),
    ("warning", "warn"),
    ("info", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
    ("notset", "debug"),
    ("50", "error"),
    ("40", "error"),
    ("30", "warn"),
    ("20", "info"),
    ("10", "debug"),
    ("0", "debug"),
];

/// Loads the configuration from the command line, the config file and the defaults.
/// Nothing on disk is touched except reading the config file(s).
pub fn load(cli: &CommandLine) -> Result<Loaded, ConfigErrors> {
    load_for(cli, Needs::Transfer)
}

/// Like [`load`], checking only what `needs` asks for.
pub fn load_for(cli: &CommandLine, needs: Needs) -> Result<Loaded, ConfigErrors> {
    let mut warnings = Vec::new();
    let mut unknown_keys = Vec::new();
    let mut raw = Raw {
        values: HashMap::new(),
    };

    let file = locate_file(cli).map_err(|e| ConfigErrors(vec![e]))?;
    if let Some(path) = &file {
        read_file(path, &mut raw, &mut warnings, &mut unknown_keys)
            .map_err(|e| ConfigErrors(vec![e]))?;
    }
    for (key, value) in &cli.flags {
        raw.values.insert(
            key,
            (value.trim().to_string(), Origin::Flag(keys::flag_name(key))),
        );
    }

    let mut r = Reader {
        raw: &raw,
        asked: Default::default(),
        errors: Vec::new(),
        transfer_errors: Vec::new(),
    };
    let config = build(&mut r, file.clone(), &mut warnings);
    if needs == Needs::Transfer {
        let deferred = std::mem::take(&mut r.transfer_errors);
        r.errors.extend(deferred);
    }
    if file.is_none() && !r.errors.is_empty() {
        let looked: Vec<String> = default_locations()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        r.errors.push(ConfigError::Problem(format!(
            "no config file was read: none given with --config or $SHUTTLE_CONFIG_PATH, and none of {} exists",
            looked.join(", ")
        )));
    }
    if !r.errors.is_empty() {
        return Err(ConfigErrors(r.errors));
    }
    Ok(Loaded {
        config,
        warnings,
        unknown_keys,
    })
}

fn locate_file(cli: &CommandLine) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(p) = &cli.config_file {
        return Ok(Some(must_exist(
            expand_tilde(&p.to_string_lossy()),
            "--config",
        )?));
    }
    if let Some(p) = std::env::var_os("SHUTTLE_CONFIG_PATH").filter(|p| !p.is_empty()) {
        return Ok(Some(must_exist(
            expand_tilde(&p.to_string_lossy()),
            "$SHUTTLE_CONFIG_PATH",
        )?));
    }
    Ok(default_locations().into_iter().find(|p| p.is_file()))
}

fn must_exist(path: PathBuf, named_by: &'static str) -> Result<PathBuf, ConfigError> {
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(ConfigError::Read {
            path,
            named_by,
            source: std::io::Error::other("not a regular file"),
        }),
        Err(source) => Err(ConfigError::Read {
            path,
            named_by,
            source,
        }),
    }
}

fn read_file(
    path: &Path,
    raw: &mut Raw,
    warnings: &mut Vec<String>,
    unknown_keys: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        named_by: "config file",
        source,
    })?;
    let entries = ini::parse(&text).map_err(|source| ConfigError::Syntax {
        path: path.to_path_buf(),
        source,
    })?;
    for e in entries {
        let origin = Origin::File {
            path: path.to_path_buf(),
            line: e.line,
        };
        let Some(key) = keys::lookup(&e.key) else {
            let hint = match keys::closest(&e.key) {
                Some(k) => format!("did you mean {k}?"),
                None => "see shuttle --help for the known keys".to_string(),
            };
            unknown_keys.push(format!(
                "unknown key {:?} in [{}] ({origin}): ignored, so the setting it was meant for keeps its default; {hint}",
                e.key, e.section
            ));
            continue;
        };
        let section = keys::canonical_section(&e.section);
        if !key.sections.contains(&section) {
            warnings.push(format!(
                "key {} found in [{}] ({origin}), documented in [{}]: accepted",
                e.key, e.section, key.sections[0]
            ));
        }
        if key.name == "password"
            && let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o004 != 0
        {
            warnings.push(format!(
                "config file {} holds an SMTP password and is world-readable: chmod o-r it",
                path.display()
            ));
        }
        raw.values.insert(key.name, (e.value, origin));
    }
    Ok(())
}

fn build(r: &mut Reader, file: Option<PathBuf>, warnings: &mut Vec<String>) -> Config {
    let source_path = r.path("source_path");
    let destination_path = r.path("destination_path");
    let quarantine_path = r.path("quarantine_path");
    for (key, value) in [
        ("source_path", &source_path),
        ("destination_path", &destination_path),
        ("quarantine_path", &quarantine_path),
    ] {
        if value.is_none() {
            r.transfer_errors.push(ConfigError::Problem(format!(
                "{key} is not set (set it in [paths] of the config file or with --{})",
                keys::flag_name(key)
            )));
        }
    }
    let log_path = r.path("log_path");
    let tracking_data_path = r
        .path("tracking_data_path")
        .or_else(|| log_path.clone())
        .unwrap_or_else(|| expand_tilde("~/.local/state/shuttle"));

    let (fleet_keys, fleet) = fleet_config(r);
    let free = r.number("throttle_free_space_mb", 10_000, 0);
    let throttle = ThrottleConfig {
        enabled: r.bool("throttle", false),
        quarantine_free_mb: r.number("quarantine_free_space_mb", free, 0),
        destination_free_mb: r.number("destination_free_space_mb", free, 0),
        hazard_free_mb: r.number("hazard_free_space_mb", free, 0),
        max_files_per_day: r.number("throttle_max_file_count_per_day", 0, 0),
        max_mb_per_day: r.number("throttle_max_file_volume_per_day_mb", 0, 0),
        max_files_per_run: r.number("throttle_max_file_count_per_run", 1000, 0),
        max_mb_per_run: r.number("throttle_max_file_volume_per_run_mb", 1024, 0),
    };

    let clam_av = r.bool("on_demand_clam_av", true);
    let clamd_config = r
        .path("clamd_config")
        .unwrap_or_else(|| PathBuf::from("/etc/clamav/clamd.conf"));
    let clamd = clamd_endpoint(r, clam_av, &clamd_config);
    let retry_count = r.number("malware_scan_retry_count", 3, 0);
    if retry_count == 0 {
        warnings.push(
            "malware_scan_retry_count = 0 means no limit, as in the earlier implementation: RISKY, the circuit breaker never opens, and a file that makes a scanner time out every time is retried (after malware_scan_retry_wait_seconds) for ever, so the run never ends; set a number such as 3".into(),
        );
    }
    let scanning = ScanConfig {
        clam_av,
        defender: r.bool("on_demand_defender", false),
        defender_handles_suspect_files: r.bool("defender_handles_suspect_files", true),
        timeout_seconds: r.number("malware_scan_timeout_seconds", 300, 0),
        timeout_ms_per_byte: r.float("malware_scan_timeout_ms_per_byte", 0.0),
        retry_wait_seconds: r.number("malware_scan_retry_wait_seconds", 30, 0),
        retry_count: u32::try_from(retry_count).unwrap_or(u32::MAX),
        clamd,
        clamd_config,
        clamd_endpoint_concurrency: r.number("clamd_endpoint_concurrency", 0, 0),
        clamd_health_interval_seconds: r.number("clamd_health_interval_seconds", 30, 1),
        mdatp_command: r.text("mdatp_command").unwrap_or_else(|| "mdatp".into()),
        canary: r.bool("canary", true),
        max_file_size_mb: r.number("max_file_size_mb", 0, 0),
        max_signature_age_hours: r.number("max_signature_age_hours", 168, 0),
        block_encrypted_archives: r.bool("block_encrypted_archives", true),
    };
    if !scanning.clam_av && !scanning.defender {
        r.transfer_errors.push(ConfigError::Problem(
            "no scanner enabled: set on_demand_clam_av or on_demand_defender to true".into(),
        ));
    }

    let priority_paths = priority_paths(r, source_path.as_deref());
    let log_level = r.choice("log_level", "info", &LOG_LEVELS[1..]);
    let stderr_log_level = r.choice("stderr_log_level", log_level, LOG_LEVELS);
    if let Some((v, origin)) = r.get("log_level")
        && matches!(v.to_ascii_lowercase().as_str(), "critical" | "fatal" | "50")
    {
        warnings.push(format!(
            "log_level = {v} ({origin}): Shuttle has no level above error; logging errors (a little more than before)"
        ));
    }
    let notifications = notify_config(r, warnings);

    let threads = match r.number("max_scan_threads", 2, 0) {
        0 => {
            warnings.push(
                "max_scan_threads = 0: one file at a time, as in the earlier implementation (same as 1)".into(),
            );
            1
        }
        n => n,
    };
    Config {
        file,
        source_path: source_path.unwrap_or_default(),
        destination_path: destination_path.unwrap_or_default(),
        quarantine_path: quarantine_path.unwrap_or_default(),
        hazard_archive_path: r.path("hazard_archive_path"),
        hazard_encryption_key_path: r.path("hazard_encryption_key_path"),
        ledger_file_path: r.path("ledger_file_path"),
        log_path,
        log_retention_days: r.number("log_retention_days", 30, 0),
        lock_path: r
            .path("lock_path")
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_PATH)),
        tracking_data_path,
        metrics_path: r.path("metrics_path"),
        fleet,
        fleet_keys,
        delete_source_files: r.bool("delete_source_files_after_copying", false),
        max_scan_threads: usize::try_from(threads).unwrap_or(usize::MAX),
        throttle,
        skip_stability_check: r.bool("skip_stability_check", false),
        allow_hard_links: r.bool("allow_hard_links", false),
        stability_seconds: r.number("stability_seconds", 5, 0),
        priority: r.choice(
            "priority",
            Priority::Oldest,
            &[
                ("oldest", Priority::Oldest),
                ("newest", Priority::Newest),
                ("smallest", Priority::Smallest),
                ("largest", Priority::Largest),
            ],
        ),
        priority_paths,
        on_conflict: r.choice(
            "on_conflict",
            OnConflict::Rename,
            &[
                ("rename", OnConflict::Rename),
                ("skip", OnConflict::Skip),
                ("overwrite", OnConflict::Overwrite),
            ],
        ),
        rescan_interval_seconds: r.number("rescan_interval_seconds", 60, 1),
        rescan: RescanConfig {
            days: r.number("rescan_days", 7, 0),
            action: r.choice(
                "rescan_action",
                RescanAction::Alert,
                &[
                    ("alert", RescanAction::Alert),
                    ("withdraw", RescanAction::Withdraw),
                ],
            ),
            budget_seconds: r.number("rescan_budget_seconds", 5, 0),
        },
        scanning,
        log_level: log_level.to_string(),
        stderr_log_level: stderr_log_level.to_string(),
        notifications,
        name_rules: crate::discover::NameRules {
            allow_hidden: r.bool("allow_hidden_names", false),
            allow_special: r.bool("allow_special_characters", false),
            allow_double_dots: r.bool("allow_double_dots", false),
        },
    }
}

/// The clamd pool from `clamd_socket` and `clamd_address`, each a comma-separated
/// list; both may be set. Neither: clamd.conf's `LocalSocket`.
fn clamd_endpoint(r: &mut Reader, clam_av: bool, clamd_conf: &Path) -> Vec<ClamdEndpoint> {
    let split = |v: Option<String>| -> Vec<String> {
        v.map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
    };
    let sockets = split(r.text("clamd_socket"));
    let addresses = split(r.text("clamd_address"));
    let mut v: Vec<ClamdEndpoint> = sockets
        .iter()
        .map(|s| ClamdEndpoint::Unix(expand_tilde(s)))
        .collect();
    for a in addresses {
        if !a.contains(':') {
            let origin = r
                .get("clamd_address")
                .map(|(_, o)| o.clone())
                .unwrap_or(Origin::Default);
            r.invalid("clamd_address", &a, &origin, "host:port[, host:port…]");
            continue;
        }
        v.push(ClamdEndpoint::Tcp(a));
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|e| seen.insert(e.clone()));
    if v.is_empty() && clam_av {
        match local_socket_from(clamd_conf) {
            Some(p) => v.push(ClamdEndpoint::Unix(p)),
            None => r.transfer_errors.push(ConfigError::Problem(
                format!("ClamAV is on but no clamd socket is known: set clamd_socket (or clamd_address), or LocalSocket in {}", clamd_conf.display()),
            )),
        }
    }
    v
}

/// `LocalSocket` from a clamd.conf, if the file exists and names one.
pub fn local_socket_from(clamd_conf: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(clamd_conf).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some("LocalSocket")).then(|| parts.next().map(PathBuf::from))?
    })
}

fn priority_paths(r: &mut Reader, source: Option<&Path>) -> Vec<PathBuf> {
    let Some((value, origin)) = r.get("priority_paths") else {
        return Vec::new();
    };
    let (value, origin) = (value.to_string(), origin.clone());
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = expand_tilde(item);
        let rel = match (p.is_absolute(), source) {
            (true, Some(src)) => match p.strip_prefix(src) {
                Ok(rel) => rel.to_path_buf(),
                Err(_) => {
                    r.invalid(
                        "priority_paths",
                        item,
                        &origin,
                        "subdirectories of source_path",
                    );
                    continue;
                }
            },
            (true, None) => continue,
            (false, _) => p,
        };
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            r.invalid(
                "priority_paths",
                item,
                &origin,
                "subdirectories of source_path (no `..`)",
            );
            continue;
        }
        out.push(rel);
    }
    out
}

/// The host name for the default sender address (`shuttle@<hostname>`).
fn hostname() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

fn notify_config(r: &mut Reader, warnings: &mut Vec<String>) -> NotifyConfig {
    let port = r.get("smtp_port").map(|(v, o)| (v.to_string(), o.clone()));
    let smtp_port = match port {
        None => None,
        Some((v, origin)) => match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                r.invalid("smtp_port", &v, &origin, "a port number 1-65535");
                None
            }
        },
    };
    let mut n = NotifyConfig {
        notify: r.bool("notify", false),
        notify_summary: r.bool("notify_summary", false),
        recipient_email: r.text("recipient_email"),
        recipient_email_error: r.text("recipient_email_error"),
        recipient_email_summary: r.text("recipient_email_summary"),
        recipient_email_hazard: r.text("recipient_email_hazard"),
        sender_email: r.text("sender_email"),
        smtp_server: r.text("smtp_server"),
        smtp_port,
        username: r.text("username"),
        password: r.text("password"),
        use_tls: r.bool("use_tls", true),
    };
    if n.sender_email.is_none() {
        let sender = format!("shuttle@{}", hostname());
        if n.notify {
            warnings.push(format!(
                "notify is on but sender_email is not set: mail is sent from {sender}"
            ));
        }
        n.sender_email = Some(sender);
    }
    if n.notify && !n.problems().is_empty() {
        return n;
    }
    if n.notify && n.recipient_email.is_none() {
        for (key, value) in [
            ("recipient_email_error", &n.recipient_email_error),
            ("recipient_email_hazard", &n.recipient_email_hazard),
            ("recipient_email_summary", &n.recipient_email_summary),
        ] {
            if value.is_none() {
                warnings.push(format!(
                    "{key} and recipient_email are not set: those notifications are not mailed"
                ));
            }
        }
    }
    n
}

impl Config {
    /// Checks the directories before any file is touched: source, destination and
    /// quarantine set, existing, distinct and not inside one another (nor the hazard
    /// archive). Returns every problem found.
    pub fn check_paths(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut dirs: Vec<(&str, PathBuf)> = Vec::new();
        let mut named = vec![
            ("source_path", &self.source_path),
            ("destination_path", &self.destination_path),
            ("quarantine_path", &self.quarantine_path),
        ];
        if let Some(h) = &self.hazard_archive_path {
            named.push(("hazard_archive_path", h));
        }
        for (key, path) in named {
            if path.as_os_str().is_empty() {
                continue;
            }
            match std::fs::canonicalize(path) {
                Ok(c) if c.is_dir() => dirs.push((key, c)),
                Ok(_) => problems.push(format!("{key} {} is not a directory", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
                    "{key} {} cannot be used: {e}; create it (or mount what belongs there): Shuttle never creates it, so that a missing mount is not filled by accident",
                    path.display()
                )),
                Err(e) => problems.push(format!("{key} {} cannot be used: {e}", path.display())),
            }
        }
        for (i, (ka, a)) in dirs.iter().enumerate() {
            for (kb, b) in dirs.iter().skip(i + 1) {
                if a == b {
                    problems.push(format!(
                        "{ka} and {kb} are the same directory {}",
                        a.display()
                    ));
                } else if a.starts_with(b) {
                    problems.push(format!(
                        "{ka} {} is inside {kb} {}",
                        a.display(),
                        b.display()
                    ));
                } else if b.starts_with(a) {
                    problems.push(format!(
                        "{kb} {} is inside {ka} {}",
                        b.display(),
                        a.display()
                    ));
                }
            }
        }
        if self.hazard_archive_path.is_some() && self.hazard_encryption_key_path.is_none() {
            problems.push(
                "hazard_archive_path is set but hazard_encryption_key_path is not: suspect files cannot be archived without a public key".into(),
            );
        }
        problems
    }

    /// The hazard archive, when one is configured.
    pub fn hazard_archive(&self) -> Option<&Path> {
        self.hazard_archive_path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The key table is the single truth: a key in it that the configuration never
    /// reads would be documented, accepted and silently ignored.
    #[test]
    fn every_key_in_the_table_is_read() {
        let raw = Raw::default();
        let mut r = Reader {
            raw: &raw,
            asked: Default::default(),
            errors: Vec::new(),
            transfer_errors: Vec::new(),
        };
        let _ = build(&mut r, None, &mut Vec::new());
        let never: Vec<&str> = keys::KEYS
            .iter()
            .map(|k| k.name)
            .filter(|k| !r.asked.contains(k))
            .collect();
        assert!(never.is_empty(), "keys never read: {never:?}");
        let unknown: Vec<&&str> = r
            .asked
            .iter()
            .filter(|k| keys::lookup(k).is_none())
            .collect();
        assert!(
            unknown.is_empty(),
            "keys read but not in the table: {unknown:?}"
        );
    }

    fn load_text(text: &str, flags: Vec<(&'static str, String)>) -> Result<Loaded, ConfigErrors> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        load(&CommandLine {
            config_file: Some(f.path().to_path_buf()),
            flags,
        })
    }

    const BASE: &str = "[paths]\nsource_path=/s\ndestination_path=/d\nquarantine_path=/q\n[scanning]\nclamd_socket=/c.sock\n";

    #[test]
    fn bad_value_names_key_value_and_line() {
        let err = load_text(
            &format!("{BASE}[settings]\nmax_scan_threads = banana # x\n"),
            vec![],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_scan_threads"), "{msg}");
        assert!(msg.contains("\"banana\""), "{msg}");
        assert!(msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn flag_beats_file_and_is_named_on_error() {
        let ok = load_text(
            &format!("{BASE}[settings]\nmax_scan_threads = 3\n"),
            vec![("max_scan_threads", "5".into())],
        )
        .unwrap();
        assert_eq!(ok.config.max_scan_threads, 5);
        let err = load_text(BASE, vec![("throttle", "maybe".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("flag --throttle"), "{err}");
    }

    #[test]
    fn aliases_and_misplaced_keys_are_accepted_with_warning() {
        let l = load_text(
            &format!("{BASE}[settings]\ndelete_source_files = YES\nthrottle_free_space = 42\n[logging]\nfoo = 1\n"),
            vec![],
        )
        .unwrap();
        assert!(l.config.delete_source_files);
        assert_eq!(l.config.throttle.destination_free_mb, 42);
        assert!(
            l.unknown_keys
                .iter()
                .any(|w| w.contains("unknown key \"foo\"")),
            "{:?}",
            l.unknown_keys
        );
    }

    #[test]
    fn negative_size_is_an_error() {
        let err = load_text(
            &format!("{BASE}[settings]\nthrottle_free_space_mb = -5\n"),
            vec![],
        )
        .unwrap_err();
        assert!(err.to_string().contains("throttle_free_space_mb"));
    }

    /// Every default the key table states as a value (and so the generated config
    /// template and docs/configuration.md) is what parsing yields when the key is unset.
    #[test]
    fn key_table_defaults_are_the_parsed_defaults() {
        let debug = |loaded: Loaded| {
            // The two loads read different temp files: compare everything else.
            let mut c = loaded.config;
            c.file = None;
            format!("{c:?}")
        };
        let base = debug(load_text(BASE, vec![]).unwrap());
        let mut checked = 0;
        for key in keys::KEYS {
            let Some(value) = key.default_value() else {
                continue;
            };
            let section = key.sections[0];
            let text = format!("{BASE}[{section}]\n{} = {value}\n", key.name);
            let loaded = load_text(&text, vec![]).unwrap_or_else(|e| {
                panic!("{} = {value} (its table default) is refused: {e}", key.name)
            });
            assert_eq!(
                debug(loaded),
                base,
                "key {}: the key table says its default is {value:?}, but setting that differs from leaving it unset",
                key.name
            );
            checked += 1;
        }
        assert!(checked > 25, "only {checked} defaults checked");
    }

    #[test]
    fn the_earlier_implementations_values_keep_their_meaning() {
        let l = load_text(
            &format!(
                "{BASE}[settings]\nmax_scan_threads = 0\n[scanning]\nmalware_scan_retry_count = 0\n[logging]\nlog_level = CRITICAL\n"
            ),
            vec![],
        )
        .unwrap();
        let c = &l.config;
        assert_eq!(c.max_scan_threads, 1);
        assert_eq!(c.scanning.retry_count, 0, "0 = no limit");
        assert_eq!(c.log_level, "error");
        assert!(c.scanning.defender_handles_suspect_files, "default true");
        assert!(c.notifications.use_tls, "default true");
        let all = l.warnings.join("\n");
        for w in ["max_scan_threads = 0", "RISKY", "log_level = CRITICAL"] {
            assert!(all.contains(w), "{w}: {all}");
        }
        for (given, level) in [
            ("FATAL", "error"),
            ("WARN", "warn"),
            ("10", "debug"),
            ("NOTSET", "debug"),
        ] {
            let l = load_text(&format!("{BASE}[logging]\nlog_level = {given}\n"), vec![]).unwrap();
            assert_eq!(l.config.log_level, level, "{given}");
            // stderr shows what the log file shows unless told otherwise.
            assert_eq!(l.config.stderr_log_level, level, "{given}");
        }
        let l = load_text(
            &format!("{BASE}[logging]\nlog_level = debug\nstderr_log_level = WARNING\n"),
            vec![],
        )
        .unwrap();
        assert_eq!(
            (
                l.config.log_level.as_str(),
                l.config.stderr_log_level.as_str()
            ),
            ("debug", "warn")
        );
    }

    #[test]
    fn notification_gaps_are_problems_not_errors_and_sender_has_a_default() {
        let l = load_text(&format!("{BASE}[notifications]\nnotify = True\n"), vec![]).unwrap();
        let n = &l.config.notifications;
        assert!(n.sender_email.as_deref().unwrap().starts_with("shuttle@"));
        let p = n.problems().join("\n");
        assert!(
            p.contains("smtp_server") && p.contains("no recipient"),
            "{p}"
        );
        let l = load_text(
            &format!("{BASE}[notifications]\nnotify = 1\nsmtp_server = m\nrecipient_email = a@b.c\nusername = u\npassword = p\nuse_tls = no\n"),
            vec![],
        )
        .unwrap();
        assert!(l.config.notifications.problems()[0].contains("use_tls is off"));
    }

    #[test]
    fn keys_only_commands_need_no_directories_or_clamd() {
        let text = "[paths]\nledger_file_path = /l.yaml\n[settings]\non_demand_defender = true\n";
        assert!(load_text(text, vec![]).is_err());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let cli = CommandLine {
            config_file: Some(f.path().to_path_buf()),
            flags: vec![],
        };
        let l = load_for(&cli, Needs::KeysOnly).unwrap();
        assert!(l.config.scanning.defender);
    }

    #[test]
    fn missing_required_paths_are_each_reported() {
        let err = load_text("[scanning]\nclamd_socket=/c\n", vec![]).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
