//! The command line: subcommands, and one `--kebab-case` flag per configuration key
//! (generated from the key table, so flags and INI keys never drift apart).

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{self, CommandLine, keys};
use crate::lock::LockError;
use crate::run::{self, RunError, RunOptions};
use crate::{check, logging};

/// Exit codes (DESIGN §1).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_LOCKED: u8 = 3;

const CONFIG_HEADING: &str =
    "Configuration (each flag overrides the config file key of the same name)";

fn is_bool_key(name: &str) -> bool {
    matches!(
        name,
        "delete_source_files_after_copying"
            | "on_demand_clam_av"
            | "on_demand_defender"
            | "defender_handles_suspect_files"
            | "throttle"
            | "skip_stability_check"
            | "allow_hard_links"
            | "canary"
            | "notify"
            | "notify_summary"
            | "use_tls"
    )
}

/// The clap command tree.
pub fn command() -> Command {
    let report_json = Arg::new("report-json")
        .long("report-json")
        .value_name("FILE")
        .value_parser(clap::value_parser!(PathBuf))
        .help("Write the run's figures as JSON to FILE");
    let mut cmd = Command::new("shuttle")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Scanning file-transfer gateway: drop directory -> quarantine -> malware scan -> destination")
        .arg(
            Arg::new("config")
                .long("config")
                .visible_alias("settings-path")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help("Config file [default: $SHUTTLE_CONFIG_PATH, ~/.config/shuttle/config.conf, ..., /etc/shuttle/config.conf]"),
        )
        .arg(report_json.clone())
        .subcommand(Command::new("run").about("One pass over the drop directory (the default)").arg(report_json.clone()))
        .subcommand(
            Command::new("watch")
                .about("Keep running: react to new files (inotify) and rescan every rescan_interval_seconds; SIGTERM/SIGINT finish in-flight files and exit 0")
                .arg(report_json),
        )
        .subcommand(Command::new("check").about("Validate configuration, directories and scanners; exit 0 or 2"))
        .subcommand(Command::new("defender-test").about(
            "Scan a fresh EICAR file and a clean file with Microsoft Defender; record pass/fail for its version in the ledger; exit 0 pass, 1 fail",
        ))
        .subcommand(
            Command::new("hazard")
                .about("The hazard archive of encrypted suspect files")
                .subcommand_required(true)
                .subcommand(
                    Command::new("list")
                        .about("Archived suspect files with their metadata, newest first; damaged or foreign files flagged")
                        .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Machine-readable output")),
                ),
        )
        .subcommand(
            Command::new("status")
                .about("Today's counts against the limits, free space per target and its trend, last runs")
                .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Machine-readable output")),
        );
    for key in keys::KEYS {
        let mut arg = Arg::new(key.name)
            .long(keys::flag_name(key.name))
            .value_name(if is_bool_key(key.name) {
                "BOOL"
            } else {
                "VALUE"
            })
            .help(key.help)
            .global(true)
            .help_heading(CONFIG_HEADING);
        for alias in key.aliases {
            arg = arg.alias(keys::flag_name(alias));
        }
        if is_bool_key(key.name) {
            arg = arg.num_args(0..=1).default_missing_value("true");
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

fn command_line(m: &ArgMatches) -> CommandLine {
    let flags = keys::KEYS
        .iter()
        .filter_map(|k| m.get_one::<String>(k.name).map(|v| (k.name, v.clone())))
        .collect();
    CommandLine {
        config_file: m.get_one::<PathBuf>("config").cloned(),
        flags,
    }
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> u8 {
    let matches = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    let (name, sub) = matches.subcommand().unwrap_or(("run", &matches));
    let cli = command_line(sub);
    match name {
        // These only print: a reader that goes away (`shuttle status | head -1`)
        // ends them quietly, the way SIGPIPE ends any other command-line tool.
        "status" | "hazard" => restore_sigpipe(),
        _ => {}
    }
    match name {
        "check" => u8::try_from(check::check(&cli)).unwrap_or(EXIT_USAGE),
        "status" => crate::status::main(&cli, sub.get_flag("json")),
        "defender-test" => crate::defender_test::main(&cli),
        "hazard" => match sub.subcommand() {
            Some(("list", list)) => hazard_list(&command_line(list), list.get_flag("json")),
            _ => EXIT_USAGE,
        },
        _ => run_command(
            &cli,
            sub.get_one::<PathBuf>("report-json")
                .or(matches.get_one("report-json"))
                .cloned(),
            name == "watch",
        ),
    }
}

/// Gives SIGPIPE back its default action (end the process), which the Rust runtime
/// sets to "ignore" so that writes to a closed pipe fail with `BrokenPipe` and
/// `println!` panics. Only for commands that write to stdout and open no sockets:
/// `run` and `check` talk to clamd and mail servers, whose closed connections must be
/// errors, not a silent death.
pub fn restore_sigpipe() {
    // SAFETY: signal() with SIG_DFL installs no handler; it is called before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `run` (one pass) or `watch` (passes until SIGTERM/SIGINT).
fn run_command(cli: &CommandLine, report_json: Option<PathBuf>, watch: bool) -> u8 {
    let loaded = match config::load(cli) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return EXIT_USAGE;
        }
    };
    let cfg = loaded.config;
    let _log = match logging::init(&cfg.log_level, cfg.log_path.as_deref()) {
        Ok(g) => g,
        Err(e) => {
            let dir = cfg
                .log_path
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            eprintln!("configuration error: log_path {dir}: cannot create the log file: {e}");
            return EXIT_USAGE;
        }
    };
    for w in loaded.warnings.iter().chain(&loaded.unknown_keys) {
        tracing::warn!("config: {w}");
    }
    if let Some(f) = &cfg.file {
        tracing::info!("config file {}", f.display());
    }
    let opts = RunOptions {
        report_json,
        ..Default::default()
    };
    let done = if watch {
        crate::watch::watch(&cfg, opts)
    } else {
        run::run(&cfg, &opts).map(|report| report.exit_code)
    };
    match done {
        Ok(code) => u8::try_from(code).unwrap_or(EXIT_FAILED),
        Err(RunError::Lock(e @ LockError::Held { .. })) => {
            tracing::error!("{e}");
            EXIT_LOCKED
        }
        Err(RunError::Lock(e)) => {
            tracing::error!("{e}");
            EXIT_FAILED
        }
        Err(RunError::Config(msg)) => {
            for line in msg.lines() {
                tracing::error!("configuration error: {line}");
            }
            EXIT_USAGE
        }
    }
}

/// `shuttle hazard list [--json]`: reads the sidecars; needs only `hazard_archive_path`
/// (not the key), so it also works where the key file is being replaced.
fn hazard_list(cli: &CommandLine, json: bool) -> u8 {
    let cfg = match config::load(cli) {
        Ok(l) => l.config,
        Err(errors) => {
            eprintln!("{errors}");
            return EXIT_USAGE;
        }
    };
    let Some(dir) = cfg.hazard_archive() else {
        eprintln!(
            "configuration error: hazard_archive_path is not set: there is no hazard archive to list"
        );
        return EXIT_USAGE;
    };
    let entries = match crate::hazard::list(dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot read hazard archive {}: {e}", dir.display());
            return EXIT_FAILED;
        }
    };
    if json {
        let doc = serde_json::json!({ "archive": dir, "entries": entries });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("cannot serialise the listing: {e}");
                return EXIT_FAILED;
            }
        }
        return EXIT_OK;
    }
    let ok = entries.iter().filter(|e| e.status == "ok").count();
    println!(
        "hazard archive {}: {ok} archived file(s), {} other entr(y/ies)",
        dir.display(),
        entries.len() - ok
    );
    for e in &entries {
        match (&e.meta, e.status) {
            (Some(m), "ok") => {
                let engines: Vec<String> = m
                    .scanners
                    .iter()
                    .map(|s| format!("{} {}", s.scanner, s.version))
                    .collect();
                println!("{}  {}", m.archived_at, e.file);
                println!(
                    "    original: {} ({} bytes, sha256 {})",
                    m.original_path, m.size, m.sha256
                );
                println!("    detections: {}", m.detections.join(", "));
                println!("    scanners: {}", engines.join("; "));
                println!("    key: {}", m.key_fingerprint);
            }
            _ => println!(
                "{}  {}: {}",
                e.status.to_uppercase(),
                e.file,
                e.problem.as_deref().unwrap_or("")
            ),
        }
    }
    EXIT_OK
}
