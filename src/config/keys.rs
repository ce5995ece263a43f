//! The table of every configuration key Shuttle knows (docs/design.md §5).
//!
//! One table drives the INI reader, the `--kebab-case` command-line flags and the
//! unknown-key warnings, so a key cannot exist in one place and be forgotten in another.

/// One configuration key: its canonical name, the INI section(s) the documentation puts
/// it in, and the older names the earlier implementation accepted.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    /// Sections where the key belongs. Found elsewhere it is accepted with a warning.
    pub sections: &'static [&'static str],
    pub aliases: &'static [&'static str],
    /// What the key does; ends in `[default: …]` when it has a default.
    pub help: &'static str,
    /// The default as a config file would spell it, where it is one value.
    pub default: DefaultValue,
}

/// A key's default value, as the generated config template and documentation show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// Whatever the help's `[default: X]` suffix says: X is the value when it is a
    /// single word (`2`, `true`, `/etc/clamav/clamd.conf`); no suffix means no default.
    FromHelp,
    /// This value.
    Value(&'static str),
    /// No single value: the help's `[default: …]` describes how it is derived.
    Derived,
}

/// How a key's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Number,
    Text,
}

impl Key {
    /// The `[default: …]` text of the help, if any (a value or a description).
    pub fn default_text(&self) -> Option<&'static str> {
        if let DefaultValue::Value(v) = self.default {
            return Some(v);
        }
        let start = self.help.rfind("[default: ")?;
        let rest = &self.help[start + "[default: ".len()..];
        rest.strip_suffix(']')
    }

    /// The default as one config-file value, when there is one.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.default {
            DefaultValue::Value(v) => Some(v),
            DefaultValue::Derived => None,
            DefaultValue::FromHelp => self
                .default_text()
                .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace) && !v.contains(',')),
        }
    }

    /// The help without its `[default: …]` suffix.
    pub fn meaning(&self) -> &'static str {
        match self.help.rfind("[default: ") {
            Some(i) if self.help.ends_with(']') => self.help[..i].trim_end(),
            _ => self.help,
        }
    }

    /// Boolean keys take `true`/`false` and may be given as a bare flag; a key is boolean
    /// when its default is `true` or `false`.
    pub fn kind(&self) -> Kind {
        match self.default_value() {
            Some("true" | "false") => Kind::Bool,
            Some(v) if v.parse::<f64>().is_ok() => Kind::Number,
            _ => Kind::Text,
        }
    }
}

const P: &[&str] = &["paths"];
const S: &[&str] = &["settings"];
const SC: &[&str] = &["scanning"];
const N: &[&str] = &["notifications"];

/// `key!(name, sections, [aliases], help)`: the default is read from the help's
/// `[default: X]` suffix. `key!(name, sections, [aliases], default = Derived, help)` (or
/// `Value("x")`) says it outright. The aliases may be left out.
macro_rules! key {
    ($name:literal, $sec:expr, $help:literal) => {
        key!($name, $sec, [], default = FromHelp, $help)
    };
    ($name:literal, $sec:expr, [$($alias:literal),*], $help:literal) => {
        key!($name, $sec, [$($alias),*], default = FromHelp, $help)
    };
    ($name:literal, $sec:expr, default = $default:expr, $help:literal) => {
        key!($name, $sec, [], default = $default, $help)
    };
    ($name:literal, $sec:expr, [$($alias:literal),*], default = $default:expr, $help:literal) => {
        Key {
            name: $name,
            sections: $sec,
            aliases: &[$($alias),*],
            help: $help,
            default: {
                #[allow(unused_imports)]
                use DefaultValue::*;
                $default
            },
        }
    };
}

/// Every key, in the order `shuttle --help` lists them.
pub const KEYS: &[Key] = &[
    key!("source_path", P, "Drop directory files are taken from"),
    key!(
        "destination_path",
        P,
        "Protected directory clean files are delivered to"
    ),
    key!(
        "quarantine_path",
        P,
        "Working directory where copies are scanned"
    ),
    key!(
        "hazard_archive_path",
        P,
        "Directory for encrypted suspect files"
    ),
    key!(
        "hazard_encryption_key_path",
        P,
        "OpenPGP public key for the hazard archive"
    ),
    key!(
        "ledger_file_path",
        P,
        ["ledger_path"],
        "YAML ledger of tested Defender versions"
    ),
    key!(
        "log_path",
        &["paths", "logging"],
        "Directory for per-run log files"
    ),
    key!(
        "lock_path",
        P,
        ["lock_file"],
        "Single-instance lock file [default: /run/shuttle/shuttle.lock]"
    ),
    key!(
        "log_retention_days",
        &["paths", "logging"],
        "Per-run log files (shuttle_*.log*) in log_path older than this many days are removed at the start of each run, 0 = keep all [default: 30]"
    ),
    key!(
        "tracking_data_path",
        P,
        ["daily_processing_tracker_logs_path"],
        "Directory of the journal database [default: log_path, else ~/.local/state/shuttle]"
    ),
    key!(
        "journal_url",
        S,
        "Where the journal lives: empty for the SQLite file in tracking_data_path, or postgresql://user@host:port/db (fleet mode: several nodes share one drop directory, see docs/fleet.md). The URL must not carry a password: use journal_password_file or PGPASSFILE / ~/.pgpass"
    ),
    key!(
        "journal_password_file",
        S,
        "File holding the PostgreSQL password of journal_url (first line); without it PGPASSFILE or ~/.pgpass is read"
    ),
    key!(
        "fleet_node_name",
        S,
        "Fleet mode: this node's name in the claims and in shuttle status; unique per node [default: the host name]"
    ),
    key!(
        "fleet_lease_seconds",
        S,
        "Fleet mode: how long a claim on a file holds without renewal; renewed every third of it. A node silent for longer loses its files to the others [default: 300]"
    ),
    key!(
        "metrics_path",
        P,
        "Prometheus text file written after each run"
    ),
    key!(
        "delete_source_files_after_copying",
        S,
        ["delete_source_files"],
        "Remove a source once its copy is durable and verified [default: false]"
    ),
    key!(
        "max_scan_threads",
        S,
        "Files in flight at once; 0 = one at a time. With small files, about twice clamd's MaxThreads, with clamd_endpoint_concurrency alike, keeps clamd busy (docs/deployment.md) [default: 2]"
    ),
    key!(
        "on_demand_clam_av",
        S,
        "Scan with ClamAV (clamd) [default: true]"
    ),
    key!(
        "on_demand_defender",
        S,
        "Scan with Microsoft Defender (mdatp) [default: false]"
    ),
    key!(
        "defender_handles_suspect_files",
        S,
        "Defender removes suspect files itself: the verified source is archived instead [default: true]"
    ),
    key!(
        "throttle",
        S,
        "Check free space and limits before admitting a file [default: false]"
    ),
    key!(
        "throttle_free_space_mb",
        S,
        ["throttle_free_space"],
        "MiB that must stay free on every target [default: 10000]"
    ),
    key!(
        "quarantine_free_space_mb",
        S,
        default = Derived,
        "MiB that must stay free for the quarantine [default: throttle_free_space_mb]"
    ),
    key!(
        "destination_free_space_mb",
        S,
        default = Derived,
        "MiB that must stay free for the destination [default: throttle_free_space_mb]"
    ),
    key!(
        "hazard_free_space_mb",
        S,
        default = Derived,
        "MiB that must stay free for the hazard archive [default: throttle_free_space_mb]"
    ),
    key!(
        "throttle_max_file_count_per_day",
        S,
        "Files per local day, 0 = no limit [default: 0]"
    ),
    key!(
        "throttle_max_file_volume_per_day_mb",
        S,
        "MiB per local day, 0 = no limit [default: 0]"
    ),
    key!(
        "throttle_max_file_count_per_run",
        S,
        "Files per run, 0 = no limit [default: 1000]"
    ),
    key!(
        "throttle_max_file_volume_per_run_mb",
        S,
        "MiB per run, 0 = no limit [default: 1024]"
    ),
    key!(
        "allow_hard_links",
        S,
        "Take files that have more than one hard link; by default they are left in place and logged, since another link may lead outside the drop directory [default: false]"
    ),
    key!(
        "skip_stability_check",
        S,
        "Do not wait for files to be stability_seconds old [default: false]"
    ),
    key!(
        "stability_seconds",
        S,
        "A file modified more recently is left for a later run [default: 5]"
    ),
    key!(
        "priority",
        S,
        "Admission order: oldest|newest|smallest|largest [default: oldest]"
    ),
    key!(
        "priority_paths",
        S,
        "Comma-separated source subdirectories admitted first"
    ),
    key!(
        "on_conflict",
        S,
        "Destination name taken by other bytes: rename|skip|overwrite [default: rename]"
    ),
    key!(
        "rescan_interval_seconds",
        S,
        "shuttle watch: full rescan period [default: 60]"
    ),
    key!(
        "rescan_days",
        S,
        "Retro-scan: when an engine's signatures are newer than those that cleared a delivery, rescan the destination copies of files delivered this many days back. 0 = off [default: 7]"
    ),
    key!(
        "rescan_action",
        S,
        "Retro-scan: what to do with a delivered file the newer signatures detect: alert (mail, journal, report) or withdraw (also encrypt the destination copy into the hazard archive and remove it, if it still holds exactly the delivered bytes) [default: alert]"
    ),
    key!(
        "rescan_budget_seconds",
        S,
        "Retro-scan: the longest each run or watch pass spends rescanning, after its new files; the rest waits for the next pass. 0 = no limit [default: 5]"
    ),
    key!(
        "malware_scan_timeout_seconds",
        SC,
        "Base scan timeout in seconds; also bounds connecting to clamd and its short answers (at most 30 s). 0 = no per-file timeout, though no scan may take more than 2 hours, so a hung scanner cannot hang a run [default: 300]"
    ),
    key!(
        "malware_scan_timeout_ms_per_byte",
        SC,
        "Extra timeout per byte of file [default: 0]"
    ),
    key!(
        "malware_scan_retry_wait_seconds",
        SC,
        "Wait before retrying a timed-out scan [default: 30]"
    ),
    key!(
        "malware_scan_retry_count",
        SC,
        "Timeouts per run before the run stops; 0 = no limit (risky) [default: 3]"
    ),
    key!(
        "clamd_socket",
        SC,
        "clamd unix socket, or several separated by commas (a pool: every endpoint is used, each checked for health before use) [default: LocalSocket of /etc/clamav/clamd.conf]"
    ),
    key!(
        "clamd_config",
        SC,
        "clamd's own config, read for its LocalSocket and scan limits [default: /etc/clamav/clamd.conf]"
    ),
    key!(
        "clamd_address",
        SC,
        "clamd TCP address host:port, or several separated by commas (uses INSTREAM; no authentication: isolated network only); may be set with clamd_socket, all form one pool"
    ),
    key!(
        "clamd_endpoint_concurrency",
        SC,
        "Scans given to one clamd endpoint at once (beyond its MaxThreads they wait in clamd's queue, their timeouts running); 0 = its MaxThreads when clamd_config describes it, else 10 [default: 0]"
    ),
    key!(
        "clamd_health_interval_seconds",
        SC,
        "How often clamd endpoints are checked again (PING, VERSION, canary) during a run; one not usable is not given scans until it passes [default: 30]"
    ),
    key!(
        "mdatp_command",
        SC,
        "Microsoft Defender command [default: mdatp]"
    ),
    key!(
        "canary",
        SC,
        "Scan an EICAR test file with every engine before each run [default: true]"
    ),
    key!(
        "max_file_size_mb",
        SC,
        "Larger files are set aside as too large, never copied, 0 = no limit [default: 0]"
    ),
    key!(
        "max_signature_age_hours",
        SC,
        "A run delivers nothing while an engine's signatures are older than this or of unknown age, 0 = off [default: 168]"
    ),
    key!(
        "block_encrypted_archives",
        SC,
        "Encrypted archives are unscannable (set aside); false delivers them as clean with their contents unscanned [default: true]"
    ),
    key!(
        "allow_hidden_names",
        S,
        "Take files and directories whose name starts with '.' [default: false]"
    ),
    key!(
        "allow_special_characters",
        S,
        "Take names holding any of \\ > < | * $ & ; ` [default: false]"
    ),
    key!(
        "allow_double_dots",
        S,
        "Take names holding '..' [default: false]"
    ),
    key!(
        "log_level",
        &["logging"],
        "error|warn|info|debug|trace (also CRITICAL, FATAL, WARNING, NOTSET, 10-50) [default: info]"
    ),
    key!(
        "stderr_log_level",
        &["logging"],
        default = Derived,
        "What stderr shows: off|error|warn|info|debug|trace (the same names as log_level); the log file keeps every line of log_level. warn keeps cron's mail, or the system journal, to problems [default: log_level's]"
    ),
    key!("notify", N, "Send email notifications [default: false]"),
    key!(
        "notify_summary",
        N,
        "Send a summary after every run that handled, failed or throttled a file [default: false]"
    ),
    key!(
        "recipient_email",
        N,
        "Default recipient of every notification"
    ),
    key!(
        "recipient_email_error",
        N,
        "Recipient of error notifications"
    ),
    key!("recipient_email_summary", N, "Recipient of run summaries"),
    key!(
        "recipient_email_hazard",
        N,
        "Recipient of hazard notifications"
    ),
    key!(
        "sender_email",
        N,
        default = DefaultValue::Derived,
        "From address [default: shuttle@<hostname>]"
    ),
    key!("smtp_server", N, "SMTP server host"),
    key!(
        "smtp_port",
        N,
        "SMTP server port [default: 25, or 587 with use_tls]"
    ),
    key!(
        "username",
        N,
        "SMTP user (AUTH when set; only ever over STARTTLS)"
    ),
    key!("password", N, "SMTP password"),
    key!(
        "use_tls",
        N,
        "Require STARTTLS with a verified certificate [default: true]"
    ),
];

/// Finds a key by its canonical name or one of its aliases.
pub fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter()
        .find(|k| k.name == name || k.aliases.contains(&name))
}

/// The known key (or alias) closest to a mistyped `name`, if one is close enough to
/// be what was meant (Damerau-Levenshtein distance, via `strsim`).
pub fn closest(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    let limit = (name.len() / 3).max(2);
    KEYS.iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .map(|k| (strsim::damerau_levenshtein(&name, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| lookup(k).map_or(k, |key| key.name))
}

/// `--source-path` for `source_path`.
pub fn flag_name(name: &str) -> String {
    name.replace('_', "-")
}

/// Section names that are spellings of another (`[notification]` of the old examples).
pub fn canonical_section(section: &str) -> &str {
    match section {
        "notification" => "notifications",
        s => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_are_unique() {
        let mut all: Vec<&str> = KEYS
            .iter()
            .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(n, all.len(), "a key name or alias is listed twice");
    }

    #[test]
    fn alias_finds_canonical_key() {
        assert_eq!(
            lookup("throttle_free_space").map(|k| k.name),
            Some("throttle_free_space_mb")
        );
        assert_eq!(lookup("lock_file").map(|k| k.name), Some("lock_path"));
        assert!(lookup("no_such_key").is_none());
    }
}
