//! Files generated from the program's own definitions, for packaging and the docs:
//! the commented configuration file, `docs/configuration.md` (both from the key table,
//! so they list exactly the keys Shuttle reads, with the defaults it applies), the man
//! pages and the shell completions (both from the clap command tree, with `clap_mangen`
//! and `clap_complete`).
//!
//! Reached through the hidden `shuttle generate …` subcommand, run by `scripts/package`
//! when the Debian package is built (not by a build script, so ordinary builds do not
//! pay for it).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use clap::{Arg, Command};

use crate::config::keys::{self, Key};

/// Keys a configuration must set.
pub const REQUIRED: &[&str] = &["source_path", "destination_path", "quarantine_path"];

/// Values the packaged configuration sets (uncommented) for a Debian install: the
/// directories the package creates and the service user owns.
pub const PACKAGE_VALUES: &[(&str, &str)] = &[
    ("quarantine_path", "/var/lib/shuttle/quarantine"),
    ("log_path", "/var/log/shuttle"),
    ("tracking_data_path", "/var/lib/shuttle"),
];

/// Sections in the order the config file and the docs show them.
fn sections() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for key in keys::KEYS {
        if !v.contains(&key.sections[0]) {
            v.push(key.sections[0]);
        }
    }
    v
}

fn keys_in(section: &str) -> impl Iterator<Item = &'static Key> + '_ {
    keys::KEYS.iter().filter(move |k| k.sections[0] == section)
}

/// The commented configuration file installed as `/etc/shuttle/config.conf`: every
/// key, each with its meaning and default, commented out unless the package sets it.
pub fn config_template() -> String {
    let mut s = String::new();
    s.push_str(
        "# Shuttle configuration (generated from Shuttle's key table by\n\
         # `shuttle generate config`; docs/configuration.md lists the same keys).\n\
         #\n\
         # Every key Shuttle reads is below, commented out with its default: uncomment\n\
         # and change a line to set it. Every key also has a command-line flag\n\
         # (`max_scan_threads` -> `--max-scan-threads 4`); flags beat this file, this\n\
         # file beats the defaults. Lines starting with # or ; are comments; so is the\n\
         # rest of a line after \" #\" or \" ;\".\n\
         #\n\
         # This file may hold the SMTP password: keep it root:shuttle 0640.\n\
         # `shuttle check` validates it without touching any file.\n",
    );
    for section in sections() {
        let _ = writeln!(s, "\n[{section}]");
        for key in keys_in(section) {
            s.push('\n');
            let mut meaning = key.meaning().to_string();
            if REQUIRED.contains(&key.name) {
                meaning.push_str(" (required)");
            }
            for line in wrap(&meaning, 78) {
                let _ = writeln!(s, "# {line}");
            }
            match key.default_text() {
                Some(d) => {
                    let _ = writeln!(s, "# Default: {d}");
                }
                None if !REQUIRED.contains(&key.name) => {
                    s.push_str("# Default: not set\n");
                }
                None => {}
            }
            if !key.aliases.is_empty() {
                let _ = writeln!(
                    s,
                    "# Also read under the older name(s): {}",
                    key.aliases.join(", ")
                );
            }
            let package = PACKAGE_VALUES.iter().find(|(k, _)| *k == key.name);
            match package {
                Some((_, v)) => {
                    let _ = writeln!(s, "{} = {v}", key.name);
                }
                None => {
                    let line = format!("#{} = {}", key.name, key.default_value().unwrap_or(""));
                    let _ = writeln!(s, "{}", line.trim_end());
                }
            }
        }
    }
    s
}

/// `docs/configuration.md`: one table per section.
pub fn config_markdown() -> String {
    let mut s = String::new();
    s.push_str(
        "# Configuration keys\n\n\
         <!-- Generated from src/config/keys.rs by `cargo run --quiet -- generate config-doc > docs/configuration.md`; \
         a test fails when this file is out of date. Do not edit by hand. -->\n\n\
         Shuttle reads an INI file (`--config FILE`, else `$SHUTTLE_CONFIG_PATH`, else the first of\n\
         `~/.config/shuttle/config.conf`, `~/.shuttle/config.conf`, `~/.shuttle/settings.ini`,\n\
         `/etc/shuttle/config.conf`, `/usr/local/etc/shuttle/config.conf`). Every key also has a\n\
         command-line flag; flags beat the file, the file beats the defaults. A key found in another\n\
         section than the one listed here is accepted with a warning; an older name (alias) is\n\
         accepted as it is. The Debian package installs `/etc/shuttle/config.conf` with every key\n\
         below, commented out with its default.\n",
    );
    for section in sections() {
        let _ = writeln!(s, "\n## [{section}]\n");
        s.push_str("| Key | Flag | Aliases | Default | Meaning |\n|---|---|---|---|---|\n");
        for key in keys_in(section) {
            let aliases: Vec<String> = key.aliases.iter().map(|a| format!("`{a}`")).collect();
            let default = match key.default_text() {
                Some(d) if key.default_value().is_some() => format!("`{}`", cell(d)),
                Some(d) => cell(d),
                None if REQUIRED.contains(&key.name) => "required".into(),
                None => "not set".into(),
            };
            let mut meaning = cell(key.meaning());
            if key.sections.len() > 1 {
                let _ = write!(meaning, " (also in [{}])", key.sections[1..].join("], ["));
            }
            let _ = writeln!(
                s,
                "| `{}` | `--{}` | {} | {} | {} |",
                key.name,
                keys::flag_name(key.name),
                aliases.join(", "),
                default,
                meaning
            );
        }
    }
    s
}

/// A table cell: `|` escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// Splits text into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Writes `shuttle.1` and one page per subcommand (`shuttle-run.1`, …) into `dir`.
pub fn man_pages(cmd: Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)
}

/// Writes bash (`shuttle.bash`), zsh (`_shuttle`) and fish (`shuttle.fish`) completions
/// into `dir`.
pub fn completions(mut cmd: Command, dir: &Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "shuttle", dir)?;
    }
    Ok(())
}

/// The hidden `generate` subcommand.
pub fn command() -> Command {
    let dir = || {
        Arg::new("dir")
            .value_name("DIR")
            .required(true)
            .value_parser(clap::value_parser!(std::path::PathBuf))
    };
    Command::new("generate")
        .hide(true)
        .about("Write generated files (for packaging): man pages, completions, config template, config docs")
        .subcommand_required(true)
        .subcommand(Command::new("man").about("Man pages into DIR").arg(dir()))
        .subcommand(Command::new("completions").about("bash, zsh and fish completions into DIR").arg(dir()))
        .subcommand(Command::new("config").about("The commented config file, to stdout"))
        .subcommand(Command::new("config-doc").about("docs/configuration.md, to stdout"))
}

/// Runs `shuttle generate …` for the command line `cli` (man pages and completions
/// describe it); returns the exit code.
pub fn main(m: &clap::ArgMatches, cli: clap::Command) -> crate::states::ExitCode {
    use crate::states::ExitCode;
    let dir = |sub: &clap::ArgMatches| sub.get_one::<std::path::PathBuf>("dir").cloned();
    let result = match m.subcommand() {
        Some(("man", sub)) => dir(sub).map(|d| man_pages(cli, &d)),
        Some(("completions", sub)) => dir(sub).map(|d| completions(cli, &d)),
        Some(("config", _)) => Some(std::io::stdout().write_all(config_template().as_bytes())),
        Some(("config-doc", _)) => Some(std::io::stdout().write_all(config_markdown().as_bytes())),
        _ => None,
    };
    match result {
        Some(Ok(())) => ExitCode::Ok,
        Some(Err(e)) => {
            eprintln!("shuttle generate: {e}");
            ExitCode::Failed
        }
        None => ExitCode::Usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/configuration.md is what the generator makes of today's key table.
    #[test]
    fn configuration_doc_is_up_to_date() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == config_markdown(),
            "docs/configuration.md is out of date with src/config/keys.rs; regenerate it with\n    \
             cargo run --quiet -- generate config-doc > docs/configuration.md"
        );
    }

    /// The template parses, names every key exactly once, and loaded as it is (with the
    /// required paths added) yields the same configuration as no file at all.
    #[test]
    fn config_template_lists_every_key_and_parses() {
        let text = config_template();
        let entries = crate::config::ini::parse(&text).expect("template parses");
        let set: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        let expected: Vec<&str> = PACKAGE_VALUES.iter().map(|(k, _)| *k).collect();
        assert_eq!(set, expected, "only the package's own values are set");
        for key in keys::KEYS {
            let commented = format!("\n#{} =", key.name);
            let set = format!("\n{} =", key.name);
            let n = text.matches(&commented).count() + text.matches(&set).count();
            assert_eq!(n, 1, "key {} appears {n} times in the template", key.name);
        }
        for e in &entries {
            let key = keys::lookup(&e.key).expect("known key");
            assert_eq!(
                crate::config::keys::canonical_section(&e.section),
                key.sections[0]
            );
        }
    }

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
    }
}
