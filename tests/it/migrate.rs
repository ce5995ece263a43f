//! Migrating from the earlier implementation: its configs, flags, program names, name
//! rules, tracking file and habits keep working, and no credential ever crosses the
//! wire in clear. Against the real SMTP server of the suite (tests/it/common/smtp.rs),
//! a real clamd and the Defender simulator.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::smtp::{Mode, Smtp};
use crate::common::*;

const SENDER: &str = "shuttle@example.invalid";
const ADMIN: &str = "admin@example.invalid";

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Mail settings as a migrated config has them: server, sender, recipient.
fn mailing(env: &mut Env, port: u16) {
    env.set("notify", "true")
        .set("notify_summary", "true")
        .set("smtp_server", "127.0.0.1")
        .set("smtp_port", &port.to_string())
        .set("sender_email", SENDER)
        .set("recipient_email", ADMIN);
}

#[test]
fn no_password_crosses_the_wire_in_clear() {
    const USER: &str = "migrated-user";
    const PASSWORD: &str = "Corr3ct-Horse-Battery";
    let secrets = [
        PASSWORD.to_string(),
        b64(PASSWORD.as_bytes()),
        b64(format!("\0{USER}\0{PASSWORD}").as_bytes()),
        b64(format!("{USER}\0{USER}\0{PASSWORD}").as_bytes()),
    ];
    // A server offering AUTH but no STARTTLS; the migrated config has a password and
    // no use_tls line (the earlier default was true, and is here).
    let smtp = Smtp::start(Mode::Normal);
    let mut env = Env::new();
    mailing(&mut env, smtp.port);
    env.set("username", USER).set("password", PASSWORD);
    env.drop_file("a.txt", b"hello");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "the run goes on: {}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 1, "the file moved");
    let wire = smtp.wire();
    assert!(!wire.is_empty(), "Shuttle talked to the server");
    for s in &secrets {
        assert!(!contains(&wire, s.as_bytes()), "{s:?} on the wire");
    }
    let cmds = smtp.commands();
    assert!(
        !cmds.iter().any(|c| c.to_uppercase().starts_with("AUTH")),
        "{cmds:?}"
    );
    assert!(!cmds.iter().any(|c| c.starts_with("MAIL FROM")), "{cmds:?}");
    assert!(smtp.mails().is_empty());
    let log = env.log_text();
    assert!(log.contains("summary notification not sent"), "{log}");
    assert!(!log.contains(PASSWORD), "the password is not logged either");

    // use_tls = false with a password: refused before any connection, one error line.
    let smtp2 = Smtp::start(Mode::Normal);
    env.set("smtp_port", &smtp2.port.to_string())
        .set("use_tls", "false");
    env.drop_file("b.txt", b"hello again");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.dst.join("b.txt").exists());
    std::thread::sleep(Duration::from_millis(200));
    let wire = smtp2.wire();
    for s in &secrets {
        assert!(!contains(&wire, s.as_bytes()), "{s:?} on the wire");
    }
    assert!(smtp2.mails().is_empty());
    assert!(
        r.stderr
            .contains("notifications off: username/password are set but use_tls is off"),
        "{}",
        r.stderr
    );
    let check = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(check.code, 2, "{}", check.stdout);
    assert!(
        check
            .stdout
            .contains("problem: username/password are set but use_tls is off"),
        "{}",
        check.stdout
    );
    assert!(!check.stdout.contains(PASSWORD));
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_installers_config_runs_with_its_old_meanings() {
    let smtp = Smtp::start(Mode::Normal);
    let clamd = clamd();
    let root = tempfile::Builder::new()
        .prefix("shuttle-migrate.")
        .tempdir()
        .unwrap();
    let r = root.path();
    for d in ["src", "dst", "q"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    // What the earlier installer wrote: Python booleans, CRITICAL, 0 for "sequential"
    // and "unlimited", notify without sender_email, [notification] section name.
    let config = r.join("settings.ini");
    std::fs::write(
        &config,
        format!(
            "[paths]\nsource_path = {0}/src\ndestination_path = {0}/dst\nquarantine_path = {0}/q\nlog_path = {0}/logs\nlock_path = {0}/lock\n\
             [settings]\nmax_scan_threads = 0\ndelete_source_files_after_copying = True\n\
             [scanning]\nclamd_socket = {1}\nclamd_config = {2}\nmalware_scan_retry_count = 0\n\
             [logging]\nlog_level = CRITICAL\n\
             [notification]\nnotify = True\nnotify_summary = True\nrecipient_email = {ADMIN}\nsmtp_server = 127.0.0.1\nsmtp_port = {3}\nuse_tls = False\n",
            r.display(),
            clamd.socket.display(),
            clamd.conf().display(),
            smtp.port
        ),
    )
    .unwrap();
    let env = Env::new();
    let config = config.to_str().unwrap();
    let check = env.shuttle(&["check", "--config", config]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    for w in [
        "max_scan_threads = 0: one file at a time",
        "malware_scan_retry_count = 0 means no limit",
        "RISKY",
        "log_level = CRITICAL",
        &format!(
            "sender_email is not set: mail is sent from shuttle@{}",
            hostname()
        ),
    ] {
        assert!(check.stdout.contains(w), "warning {w:?}:\n{}", check.stdout);
    }
    std::fs::write(r.join("src/report.pdf"), b"report").unwrap();
    age(&r.join("src/report.pdf"), 60);
    let run = env.shuttle(&["run", "--config", config]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(r.join("dst/report.pdf")).unwrap(), b"report");
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert_eq!(mails[0].from, format!("shuttle@{}", hostname()));
    // CRITICAL: only errors reach the log.
    assert!(!run.stderr.contains(" INFO "), "{}", run.stderr);
}

#[test]
fn incomplete_notification_settings_never_stop_files() {
    let mut env = Env::new();
    env.set("notify", "true");
    env.drop_file("a.txt", b"payload");
    let check = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(check.code, 2, "{}", check.stdout);
    assert!(
        check
            .stdout
            .contains("problem: notify is on but smtp_server is not set")
            && check
                .stdout
                .contains("problem: notify is on but no recipient is set"),
        "{}",
        check.stdout
    );
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(env.dst.join("a.txt")).unwrap(), b"payload");
    let log = env.log_text();
    assert!(
        log.contains("ERROR notifications off: notify is on but smtp_server is not set"),
        "{log}"
    );
}

#[test]
fn the_earlier_notify_flags_are_accepted() {
    let smtp = Smtp::start(Mode::Normal);
    let env = Env::new();
    env.drop_file("a.txt", b"hello");
    let port = smtp.port.to_string();
    let r = env.run(&[
        "--notify",
        "--notify-summary",
        "--notify-smtp-server",
        "127.0.0.1",
        "--notify-smtp-port",
        &port,
        "--notify-sender-email",
        SENDER,
        "--notify-recipient-email",
        "nobody@example.invalid",
        "--notify-recipient-email-summary",
        ADMIN,
        "--notify-recipient-email-error",
        ADMIN,
        "--notify-recipient-email-hazard",
        ADMIN,
        "--notify-use-tls",
        "false",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert_eq!(mails[0].rcpt, [ADMIN]);
    assert_eq!(mails[0].from, SENDER);
    // The credential flags parse too (and, without TLS, are refused by check).
    let check = env.shuttle(&[
        "check",
        "--config",
        env.config.to_str().unwrap(),
        "--notify",
        "--notify-smtp-server",
        "127.0.0.1",
        "--notify-recipient-email",
        ADMIN,
        "--notify-username",
        "u",
        "--notify-password",
        "p",
        "--notify-use-tls=false",
    ]);
    assert!(check.stdout.contains("ok: config file"), "{}", check.stderr);
    assert!(check.stdout.contains("use_tls is off"), "{}", check.stdout);
}

#[test]
fn old_program_names_run_the_old_commands() {
    let env = Env::new();
    env.drop_file("a.txt", b"via run-shuttle");
    let dir = env.root().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("run-shuttle");
    std::os::unix::fs::symlink(shuttle_bin(), &link).unwrap();
    let out = std::process::Command::new(&link)
        .args(["--settings-path", env.config.to_str().unwrap()])
        .env("HOME", env.root())
        .env_remove("SHUTTLE_CONFIG_PATH")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(env.dst.join("a.txt")).unwrap(),
        b"via run-shuttle"
    );

    let mut env = Env::new();
    env.set("on_demand_defender", "true").set(
        "mdatp_command",
        repo().join("tests/fixtures/mdatp-sim").to_str().unwrap(),
    );
    let link = dir.join("run-shuttle-defender-test");
    std::os::unix::fs::symlink(shuttle_bin(), &link).unwrap();
    let out = std::process::Command::new(&link)
        .args(["--settings-path", env.config.to_str().unwrap()])
        .env("HOME", env.root())
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("test pass"), "{}", r.stdout);
}

/// Names the earlier implementation refused, each with the rule that refuses it.
const REFUSED: &[&str] = &[
    ".DS_Store",
    "._report.pdf",
    ".report.pdf.Xa12Bc",
    ".hidden-dir/inside.txt",
    "a>b.txt",
    "a<b.txt",
    "a|b.txt",
    "a*b.txt",
    "$HOME.txt",
    "a&b.txt",
    "a;b.txt",
    "a`b`.txt",
    "back\\slash.txt",
    "two..dots.txt",
];
const FORMAT_NAMES: &[&str] = &[
    "report\u{202e}txt.scr",
    "zero\u{200b}width.txt",
    "bom\u{feff}.txt",
];

fn raw_unsafe(text: &str) -> Option<char> {
    text.chars().find(|&c| {
        (c.is_control() && c != '\n' && c != '\r' && c != '\t')
            || ('\u{200b}'..='\u{200f}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
            || c == '\u{feff}'
    })
}

#[test]
fn the_earlier_name_rules_hold_by_default_and_each_can_be_relaxed() {
    let smtp = Smtp::start(Mode::Normal);
    let mut env = Env::new();
    mailing(&mut env, smtp.port);
    env.set("use_tls", "false");
    let metrics = env.root().join("shuttle.prom");
    env.set("metrics_path", metrics.to_str().unwrap());
    env.drop_file("ok.txt", b"fine");
    for (i, n) in REFUSED.iter().chain(FORMAT_NAMES).enumerate() {
        env.drop_file(n, format!("file {i}").as_bytes());
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["ok.txt"],
        "only the ordinary name is delivered"
    );
    for n in REFUSED.iter().chain(FORMAT_NAMES) {
        assert!(env.src.join(n).exists(), "{n:?} left in the source");
    }
    let rep = env.report();
    // .hidden-dir counts once (its contents are not walked).
    assert_eq!(
        rep["skipped_by_reason"]["unsafe_name"],
        (REFUSED.len() + FORMAT_NAMES.len()) as u64,
        "{rep:#}"
    );
    let log = env.log_text();
    for why in [
        "\".DS_Store\": unsafe name: hidden name",
        "\".hidden-dir\": unsafe name: hidden name",
        "\"a|b.txt\": unsafe name: contains one of",
        "\"back\\\\slash.txt\": unsafe name: contains one of",
        "\"two..dots.txt\": unsafe name: contains '..'",
        "\"report\\u{202e}txt.scr\": unsafe name: contains Unicode format characters",
        "\"zero\\u{200b}width.txt\": unsafe name: contains Unicode format characters",
    ] {
        assert!(log.contains(why), "{why:?} in\n{log}");
    }
    // No raw control or format character anywhere an operator looks.
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert!(!mails.is_empty());
    let mut places = vec![
        ("log".to_string(), log.clone()),
        ("stderr".to_string(), r.stderr.clone()),
        (
            "metrics".to_string(),
            std::fs::read_to_string(&metrics).unwrap(),
        ),
        (
            "report".to_string(),
            std::fs::read_to_string(&env.report).unwrap(),
        ),
    ];
    for m in &mails {
        places.push((
            format!("mail {}", m.subject()),
            format!("{}\n{}", m.subject(), m.body),
        ));
    }
    for (place, text) in &places {
        assert_eq!(
            raw_unsafe(text),
            None,
            "raw character in the {place}:\n{text}"
        );
    }

    // Each rule relaxed: everything but the format characters arrives.
    env.set("allow_hidden_names", "true")
        .set("allow_special_characters", "true")
        .set("allow_double_dots", "true");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    for n in REFUSED {
        assert!(
            dst.contains_key(*n),
            "{n:?} delivered when allowed: {:?}",
            dst.keys()
        );
    }
    for n in FORMAT_NAMES {
        assert!(env.src.join(n).exists(), "{n:?} never delivered");
    }
    assert_eq!(env.report()["skipped_by_reason"]["unsafe_name"], 3);
}

fn today() -> String {
    chrono::Local::now().format("%Y-%m-%d").to_string()
}

#[test]
fn the_earlier_daily_tracking_file_counts_toward_todays_limits() {
    let mut env = Env::new();
    env.set("throttle", "true")
        .set("throttle_free_space_mb", "0")
        .set("throttle_max_file_count_per_day", "10");
    std::fs::create_dir_all(&env.state).unwrap();
    // What the earlier implementation left this morning: 8 files done.
    std::fs::write(
        env.state.join(format!("throttle_{}.yaml", today())),
        "metrics:\n  failed_files: 0\n  successful_files: 8\nstart_time: '2026-01-01T08:00:00'\ntotals:\n  files_processed: 8\n  volume_processed_mb: 1.5\n",
    )
    .unwrap();
    // A file from another day is ignored.
    std::fs::write(
        env.state.join("throttle_2001-01-01.yaml"),
        "totals:\n  files_processed: 1000\n  volume_processed_mb: 0\n",
    )
    .unwrap();
    for i in 0..3 {
        env.drop_file(&format!("f{i}.bin"), &noise(100, i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = env.report();
    assert_eq!(rep["files"]["clean"], 2, "8 + 2 = the limit of 10: {rep:#}");
    assert_eq!(rep["throttle"]["reason"], "daily_limit");
    // A later run the same day still counts them (and does not log it again).
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.report()["files"]["admitted"], 0);
    assert_eq!(env.report()["throttle"]["reason"], "daily_limit");
    let st = env.shuttle(&["status", "--json", "--config", env.config.to_str().unwrap()]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(
        st["files_today"]["used"], 10,
        "status counts them too: {st:#}"
    );
    let log = env.log_text();
    assert_eq!(
        log.matches("counting 8 file(s) and 1.5 MB from the earlier implementation's")
            .count(),
        1,
        "{log}"
    );
}

#[test]
fn summary_mails_only_for_runs_that_did_something() {
    let smtp = Smtp::start(Mode::Normal);
    let mut env = Env::new();
    mailing(&mut env, smtp.port);
    env.set("use_tls", "false");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Only a skipped file: nothing handled either.
    env.drop_file(".DS_Store", b"finder");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::thread::sleep(Duration::from_millis(300));
    assert!(smtp.mails().is_empty(), "{:#?}", smtp.mails());
    env.drop_file("a.txt", b"something");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1);
    assert!(mails[0].subject().starts_with("Shuttle summary: 1 clean"));
}

/// A config holding only what `defender-test` uses.
fn defender_only_config(root: &Path, port: u16, extra: &str) -> PathBuf {
    let config = root.join("defender.conf");
    std::fs::write(
        &config,
        format!(
            "[paths]\nledger_file_path = {0}/ledger.yaml\nlog_path = {0}/dlogs\n\
             [settings]\non_demand_defender = true\n\
             [scanning]\nmdatp_command = {1}\nmalware_scan_timeout_seconds = 10\n\
             [notifications]\nnotify = true\nsmtp_server = 127.0.0.1\nsmtp_port = {port}\nuse_tls = false\nsender_email = {SENDER}\nrecipient_email = {ADMIN}\n{extra}",
            root.display(),
            repo().join("tests/fixtures/mdatp-sim").display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn defender_test_logs_mails_failures_and_needs_only_its_keys() {
    let smtp = Smtp::start(Mode::Normal);
    let env = Env::new();
    let root = env.root();
    let config = defender_only_config(root, smtp.port, "");
    let config = config.to_str().unwrap();
    let r = env.shuttle(&["defender-test", "--config", config]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("test pass"), "{}", r.stdout);
    let logs: Vec<_> = std::fs::read_dir(root.join("dlogs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "one log file in log_path");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(text.contains("test pass"), "{text}");
    assert_eq!(mode(&logs[0]) & 0o007, 0, "log not world-accessible");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        smtp.mails().is_empty(),
        "a pass is not mailed without notify_summary"
    );

    let mut c = env.command(&["defender-test", "--config", config]);
    c.env("MDATP_SIM_MODE", "clean")
        .env("MDATP_SIM_VERSION", "101.99999.0001");
    let r = Run::from(c.output().unwrap());
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].subject().contains("FAILED"),
        "{}",
        mails[0].subject()
    );

    let config = defender_only_config(root, smtp.port, "notify_summary = true\n");
    let r = env.shuttle(&["defender-test", "--config", config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let mails = smtp.wait_for(2, Duration::from_secs(5));
    assert_eq!(mails.len(), 2);
    assert!(
        mails[1].subject().contains("test passed"),
        "{}",
        mails[1].subject()
    );
}

/// Every file and directory below `dir`, with its mode.
fn modes(dir: &Path) -> BTreeMap<PathBuf, u32> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            out.insert(e.path(), m.permissions().mode() & 0o7777);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn nothing_shuttle_creates_is_world_accessible_whatever_the_umask() {
    let mut env = Env::new();
    let metrics_dir = env.root().join("metrics");
    let hazard = env.root().join("hazard");
    std::fs::create_dir_all(&metrics_dir).unwrap();
    std::fs::create_dir_all(&hazard).unwrap();
    let (_, key) = gpg_key(env.root(), "default");
    env.set(
        "metrics_path",
        metrics_dir.join("shuttle.prom").to_str().unwrap(),
    )
    .set("hazard_archive_path", hazard.to_str().unwrap())
    .set("hazard_encryption_key_path", key.to_str().unwrap());
    env.drop_file("sub/a.txt", b"clean");
    env.drop_file("eicar.com", EICAR);
    let cmd = format!(
        "umask 000; exec {} run --config {} --report-json {}",
        shuttle_bin().display(),
        env.config.display(),
        env.report.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .env("HOME", env.root())
        .env_remove("SHUTTLE_CONFIG_PATH")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.dst.join("sub/a.txt").exists());
    let mut checked = 0;
    for dir in [&env.logs, &env.state, &env.dst, &hazard, &metrics_dir] {
        for (p, m) in modes(dir) {
            assert_eq!(m & 0o007, 0, "{} is mode {m:o}", p.display());
            checked += 1;
        }
    }
    assert_eq!(mode(&env.report) & 0o007, 0, "report");
    assert!(env.logs.is_dir() && mode(&env.logs) & 0o007 == 0);
    assert!(checked >= 6, "{checked}");
    let log = std::fs::read_dir(&env.logs)
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    assert_eq!(mode(&log.path()), 0o640, "log file created 0640");
}

#[test]
fn logs_an_operator_can_use_at_3_am() {
    let mut env = Env::new();
    env.drop_file("in/a.txt", &noise(3000, 1));
    env.drop_file("in/eicar.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = env.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("in/a.txt")).collect();
    assert_eq!(lines.len(), 1, "one INFO line per file: {lines:#?}");
    let l = lines[0];
    eprintln!("{l}");
    assert!(
        l.contains("clean: \"in/a.txt\"") && l.contains("3000 bytes"),
        "{l}"
    );
    assert!(
        l.contains("scan: clamav ") && l.contains(" ms for 3000 bytes (timeout 300.0 s)"),
        "{l}"
    );
    let s: Vec<&str> = log.lines().filter(|l| l.contains("in/eicar.com")).collect();
    assert_eq!(s.len(), 1, "{s:#?}");
    assert!(
        s[0].contains("SUSPECT") && s[0].contains("scan: clamav "),
        "{}",
        s[0]
    );

    env.set("log_level", "DEBUG");
    env.drop_file("in/b.txt", b"bee");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let steps: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("in/b.txt"))
        .collect();
    for step in [
        "admitted",
        "quarantined",
        "scan ",
        "delivering",
        "clean: ",
        "source",
    ] {
        assert!(
            steps.iter().any(|l| l.contains(step)),
            "DEBUG step {step:?}: {steps:#?}"
        );
    }
    assert!(
        r.stderr.contains("durable"),
        "batch commit step: {}",
        r.stderr
    );
}

#[test]
fn history_tells_what_happened_to_a_file() {
    let mut env = Env::new();
    let (_, key) = gpg_key(env.root(), "default");
    let hazard = env.root().join("hazard");
    std::fs::create_dir_all(&hazard).unwrap();
    env.set("hazard_archive_path", hazard.to_str().unwrap())
        .set("hazard_encryption_key_path", key.to_str().unwrap())
        .set("max_file_size_mb", "1");
    env.drop_file("in/invoice-7.pdf", b"first version");
    env.drop_file("in/virus.com", EICAR);
    env.drop_file("big/invoice-7.pdf", &noise(2 << 20, 3));
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "one set aside as too large: {}", r.stderr);
    std::thread::sleep(Duration::from_millis(1100));
    env.drop_file("in/invoice-7.pdf", b"second version");
    // The too-large file was reported once; it is not handled again.
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let config = env.config.to_str().unwrap();
    let h = env.shuttle(&["history", "invoice-7.pdf", "--config", config, "--json"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    let doc: serde_json::Value = serde_json::from_str(&h.stdout).unwrap();
    let recs = doc["records"].as_array().unwrap();
    // in/invoice-7.pdf twice, big/invoice-7.pdf (set aside as too large) once.
    assert_eq!(recs.len(), 3, "{doc:#}");
    let ids: Vec<i64> = recs.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "newest first");
    let clean: Vec<_> = recs
        .iter()
        .filter(|r| r["rel_path"] == "in/invoice-7.pdf")
        .collect();
    assert_eq!(clean.len(), 2);
    let newest = clean[0];
    assert_eq!(newest["outcome"], "clean");
    assert_eq!(newest["source_removed"], true);
    assert!(
        newest["final_path"]
            .as_str()
            .unwrap()
            .ends_with("dst/in/invoice-7_1.pdf")
            || newest["final_path"]
                .as_str()
                .unwrap()
                .ends_with("dst/in/invoice-7.pdf"),
        "{newest:#}"
    );
    assert_eq!(newest["scan_results"][0]["scanner"], "clamav");
    assert!(
        newest["scan_results"][0]["version"]
            .as_str()
            .unwrap()
            .starts_with("ClamAV")
    );
    assert_eq!(newest["sha256"].as_str().unwrap().len(), 64);
    let failed: Vec<_> = recs
        .iter()
        .filter(|r| r["rel_path"] == "big/invoice-7.pdf")
        .collect();
    assert_eq!(failed.len(), 1, "{doc:#}");
    assert_eq!(failed[0]["outcome"], "too_large");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("max_file_size_mb")
    );
    assert_eq!(failed[0]["source_removed"], false);

    // By path relative to the source, or absolute; the suspect with its archive.
    let h = env.shuttle(&[
        "history",
        env.src.join("in/virus.com").to_str().unwrap(),
        "--config",
        config,
    ]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    eprintln!("{}", h.stdout);
    assert!(h.stdout.contains("1 record(s)"), "{}", h.stdout);
    assert!(h.stdout.contains("suspect (archived)"), "{}", h.stdout);
    assert!(
        h.stdout.contains("archived     ") && h.stdout.contains("hazard_"),
        "{}",
        h.stdout
    );
    assert!(h.stdout.to_lowercase().contains("eicar"), "{}", h.stdout);
    let none = env.shuttle(&["history", "never-seen.txt", "--config", config]);
    assert_eq!(none.code, 1);
    assert!(
        none.stdout.contains("no journal record matches"),
        "{}",
        none.stdout
    );
}
