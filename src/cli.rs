//! The command line: subcommands, and one `--kebab-case` flag per configuration key
//! (generated from the key table, so flags and INI keys never drift apart).

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{self, CommandLine, keys};
use crate::lock::LockError;
use crate::run::{self, RunError, RunOptions};
use crate::{check, logging};

use crate::states::ArchiveEntry;
/// Exit codes (docs/design.md §1): one enum, [`crate::states::ExitCode`].
pub use crate::states::ExitCode;

const CONFIG_HEADING: &str =
    "Configuration (each flag overrides the config file key of the same name)";

/// Boolean keys take `true`/`false` or stand alone as a flag (`--throttle`).
fn is_bool_key(name: &str) -> bool {
    keys::lookup(name).is_some_and(|k| k.kind() == keys::Kind::Bool)
}

/// `shuttle --version`: the version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SHUTTLE_COMMIT"),
    ")"
);

/// The clap command tree.
pub fn command() -> Command {
    let report_json = Arg::new("report-json")
        .long("report-json")
        .value_name("FILE")
        .value_parser(clap::value_parser!(PathBuf))
        .help("Write the run's figures as JSON to FILE");
    let mut cmd = Command::new("shuttle")
        .version(VERSION)
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
            Command::new("history")
                .about("Every journal record of the files matching NAME-OR-PATH (a name, a path relative to source_path, or a source or destination path), newest first")
                .arg(Arg::new("name").value_name("NAME-OR-PATH").required(true).help("File name or path"))
                .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Machine-readable output")),
        )
        .subcommand(
            Command::new("journal")
                .about("The journal itself")
                .subcommand_required(true)
                .subcommand(
                    Command::new("migrate")
                        .about("Copy this node's SQLite journal, with its history, into an empty PostgreSQL journal (fleet mode; the password comes from journal_password_file or PGPASSFILE)")
                        .arg(Arg::new("to").long("to").value_name("URL").required(true).help("postgresql://user@host:port/database, without a password")),
                ),
        )
        .subcommand(
            Command::new("rescan")
                .about("Retro-scan now: rescan in place the destination copies of recent deliveries that older signatures cleared, with no time budget; alert or withdraw what is detected (rescan_action)")
                .arg(Arg::new("days").long("days").value_name("N").value_parser(clap::value_parser!(u64)).help("Deliveries of the last N days [default: rescan_days]"))
                .arg(Arg::new("path").long("path").value_name("PREFIX").help("Only deliveries whose path relative to destination_path starts with PREFIX")),
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
        // The earlier implementation's flags: `--notify-smtp-server`, `--notify-use-tls`, …
        if key.sections == ["notifications"] && !key.name.starts_with("notify") {
            arg = arg.alias(format!("notify-{}", keys::flag_name(key.name)));
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

/// The command line, with the subcommand the program's name implies: installed
/// under the earlier implementation's names, `run-shuttle` is `shuttle run` and
/// `run-shuttle-defender-test` is `shuttle defender-test`.
pub fn args_for_invocation(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(argv0) = args.first() else {
        return args;
    };
    let name = std::path::Path::new(argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sub = match name.as_str() {
        "run-shuttle" => "run",
        "run-shuttle-defender-test" => "defender-test",
        _ => return args,
    };
    let mut out = Vec::with_capacity(args.len() + 1);
    out.push(std::ffi::OsString::from("shuttle"));
    out.push(std::ffi::OsString::from(sub));
    out.extend(args.into_iter().skip(1));
    out
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> ExitCode {
    // Nothing Shuttle creates is world-accessible, whatever the caller's umask: set
    // before anything (the log file first) is created.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o007));
    let args = args_for_invocation(std::env::args_os().collect());
    let matches = match command()
        .subcommand(crate::generate::command())
        .try_get_matches_from(args)
    {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::Usage
            } else {
                ExitCode::Ok
            };
        }
    };
    let (name, sub) = matches.subcommand().unwrap_or(("run", &matches));
    let cli = command_line(sub);
    match name {
        // These only print: a reader that goes away (`shuttle status | head -1`)
        // ends them quietly, the way SIGPIPE ends any other command-line tool.
        "status" | "hazard" | "history" | "generate" => restore_sigpipe(),
        _ => {}
    }
    match name {
        "check" => check::check(&cli),
        "status" => crate::status::main(&cli, sub.get_flag("json")),
        "defender-test" => crate::defender_test::main(&cli),
        "history" => crate::history::main(
            &cli,
            sub.get_one::<String>("name").map_or("", String::as_str),
            sub.get_flag("json"),
        ),
        "generate" => crate::generate::main(sub, command()),
        "rescan" => crate::rescan::main(
            &cli,
            sub.get_one::<u64>("days").copied(),
            sub.get_one::<String>("path").map(String::as_str),
        ),
        "journal" => match sub.subcommand() {
            Some(("migrate", m)) => crate::journal::migrate::main(
                &command_line(m),
                m.get_one::<String>("to").map_or("", String::as_str),
            ),
            _ => ExitCode::Usage,
        },
        "hazard" => match sub.subcommand() {
            Some(("list", list)) => hazard_list(&command_line(list), list.get_flag("json")),
            _ => ExitCode::Usage,
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
fn run_command(cli: &CommandLine, report_json: Option<PathBuf>, watch: bool) -> ExitCode {
    let loaded = match config::load(cli) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    let mut cfg = loaded.config;
    let log = match logging::start(&cfg, &loaded.warnings) {
        Ok(g) => g,
        Err(line) => {
            eprintln!("{line}");
            return ExitCode::Usage;
        }
    };
    crate::notify::off_when_unusable(&mut cfg.notifications);
    for w in &loaded.unknown_keys {
        tracing::warn!("config: {w}");
    }
    if let Some(f) = &cfg.file {
        tracing::info!("config file {}", f.display());
    }
    let mut opts = RunOptions {
        report_json,
        ..Default::default()
    };
    let done = if watch {
        crate::watch::watch(&cfg, opts)
    } else {
        // SIGTERM (systemctl stop, shutdown) or Ctrl-C: the files in flight finish,
        // the rest wait in the drop directory for the next run.
        opts.stop = crate::signals::stop_flag_or_warn("run");
        run::run(&cfg, &opts).map(|report| report.exit_code)
    };
    let code = match done {
        Ok(code) => code,
        Err(RunError::Lock(LockError::Held { pid, path, idle })) => {
            let limit = run::stalled_after(&cfg);
            match idle {
                Some(idle) if idle > limit => {
                    let msg = format!(
                        "the shuttle run holding {} (pid {pid}) has shown no progress for {} minutes, longer than its timeouts allow ({} minutes); it is probably hung, and no file is handled until it ends: check it (journalctl, its log) and stop it (kill {pid})",
                        path.display(),
                        idle.as_secs() / 60,
                        limit.as_secs() / 60
                    );
                    tracing::error!("{msg}");
                    crate::notify::Notifier::new(&cfg.notifications).send(
                        crate::notify::Kind::Error,
                        "Shuttle run stalled",
                        &msg,
                    );
                    ExitCode::Failed
                }
                _ => {
                    tracing::error!(
                        "another shuttle run is active (pid {pid}) holding {}",
                        path.display()
                    );
                    ExitCode::Locked
                }
            }
        }
        Err(RunError::Lock(e)) => {
            tracing::error!("{e}");
            ExitCode::Failed
        }
        Err(RunError::Config(msg)) => {
            for line in msg.lines() {
                tracing::error!("configuration error: {line}");
            }
            ExitCode::Usage
        }
    };
    // An incomplete log is a failed run (stderr is all that is left to say it on).
    match log.finish() {
        Err(e) => {
            eprintln!("shuttle: {e}");
            code.or_failed()
        }
        Ok(()) => code,
    }
}

/// `shuttle hazard list [--json]`: reads the sidecars; needs only `hazard_archive_path`
/// (not the key), so it also works where the key file is being replaced.
fn hazard_list(cli: &CommandLine, json: bool) -> ExitCode {
    let cfg = match config::load_for(cli, config::Needs::KeysOnly) {
        Ok(l) => l.config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::Usage;
        }
    };
    let Some(dir) = cfg.hazard_archive() else {
        eprintln!(
            "configuration error: hazard_archive_path is not set: there is no hazard archive to list"
        );
        return ExitCode::Usage;
    };
    let entries = match crate::hazard::list(dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot read hazard archive {}: {e}", dir.display());
            return ExitCode::Failed;
        }
    };
    if json {
        let doc = serde_json::json!({ "archive": dir, "entries": entries });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("cannot serialise the listing: {e}");
                return ExitCode::Failed;
            }
        }
        return ExitCode::Ok;
    }
    let ok = entries
        .iter()
        .filter(|e| e.status == ArchiveEntry::Ok)
        .count();
    println!(
        "hazard archive {}: {ok} archived file(s), {} other entr(y/ies)",
        dir.display(),
        entries.len() - ok
    );
    for e in &entries {
        match (&e.meta, e.status) {
            (Some(m), ArchiveEntry::Ok) => {
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
                e.status.as_str().to_uppercase(),
                e.file,
                e.problem.as_deref().unwrap_or("")
            ),
        }
    }
    ExitCode::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn earlier_program_names_imply_their_command() {
        assert_eq!(
            args_for_invocation(args(&[
                "/usr/local/bin/run-shuttle",
                "--settings-path",
                "x"
            ])),
            args(&["shuttle", "run", "--settings-path", "x"])
        );
        assert_eq!(
            args_for_invocation(args(&["run-shuttle-defender-test"])),
            args(&["shuttle", "defender-test"])
        );
        let plain = args(&["/usr/bin/shuttle", "check"]);
        assert_eq!(args_for_invocation(plain.clone()), plain);
    }

    #[test]
    fn notify_flags_are_hidden_aliases() {
        let m = command()
            .try_get_matches_from([
                "shuttle",
                "run",
                "--notify-use-tls",
                "false",
                "--notify-smtp-server",
                "m",
            ])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert_eq!(
            sub.get_one::<String>("use_tls").map(String::as_str),
            Some("false")
        );
        assert_eq!(
            sub.get_one::<String>("smtp_server").map(String::as_str),
            Some("m")
        );
        let help = command().render_long_help().to_string();
        assert!(
            !help.contains("--notify-use-tls"),
            "aliases stay out of --help"
        );
    }
}
