//! Notifications (docs/design.md §7), metrics (§8) and the progress bar, against a real SMTP
//! server on 127.0.0.1 (tests/it/common/smtp.rs) and a real clamd.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::smtp::{Mail, Mode, Smtp};
use crate::common::*;
use sha2::Digest;

const SENDER: &str = "shuttle@example.invalid";
const ADMIN: &str = "admin@example.invalid";

/// An Env that mails through 127.0.0.1:`port`, in clear and without AUTH (the tests
/// that need TLS set `use_tls`).
fn mailing(port: u16) -> Env {
    let mut env = Env::new();
    env.set("notify", "true");
    env.set("smtp_server", "127.0.0.1");
    env.set("smtp_port", &port.to_string());
    env.set("use_tls", "false");
    env.set("sender_email", SENDER);
    env.set("recipient_email", ADMIN);
    env
}

fn to<'a>(mails: &'a [Mail], rcpt: &str) -> Vec<&'a Mail> {
    mails.iter().filter(|m| m.rcpt == [rcpt]).collect()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn hazard_failed_and_summary_mails_reach_their_recipients_with_the_figures() {
    let smtp = Smtp::start(Mode::Normal);
    let mut env = mailing(smtp.port);
    env.set("recipient_email_hazard", "hazard@example.invalid");
    env.set("recipient_email_error", "errors@example.invalid");
    // No recipient_email_summary: summaries fall back to recipient_email.
    env.set("notify_summary", "true");
    env.set("max_file_size_mb", "1");
    let clean1 = noise(3000, 1);
    let clean2 = noise(5000, 2);
    env.drop_file("in/a.txt", &clean1);
    env.drop_file("in/b.bin", &clean2);
    env.drop_file("in/eicar.com", EICAR);
    env.drop_file("in/big.bin", &noise(2 << 20, 3)); // over max_file_size_mb: set aside

    let t = Instant::now();
    let r = env.run(&[]);
    let took = t.elapsed();
    assert_eq!(
        r.code, 1,
        "a file newly set aside makes exit 1: {}",
        r.stderr
    );
    let mails = smtp.wait_for(3, Duration::from_secs(5));
    assert_eq!(mails.len(), 3, "hazard, error, summary: {mails:#?}");
    assert!(took < Duration::from_secs(20), "run took {took:?}");

    for m in &mails {
        assert_eq!(m.from, SENDER);
        assert_eq!(m.header("From"), Some(SENDER));
        assert_eq!(m.auth, None, "no AUTH without username");
        assert!(!m.tls, "no STARTTLS with use_tls = false");
    }
    let hazard = to(&mails, "hazard@example.invalid");
    assert_eq!(hazard.len(), 1, "one hazard mail per suspect file");
    let h = hazard[0];
    assert!(h.subject().contains("in/eicar.com"), "{}", h.subject());
    assert!(h.body.contains("File: in/eicar.com"), "{}", h.body);
    assert!(h.body.contains(&sha256(EICAR)), "{}", h.body);
    assert!(
        h.body.to_lowercase().contains("detections: eicar"),
        "detection named: {}",
        h.body
    );
    assert!(h.body.contains("deleted"), "where it went: {}", h.body);

    let errors = to(&mails, "errors@example.invalid");
    assert_eq!(
        errors.len(),
        1,
        "one error mail listing the files set aside"
    );
    let e = errors[0];
    assert_eq!(
        e.subject(),
        "Shuttle: 1 file(s) set aside (unscannable or too large)"
    );
    assert!(e.body.contains("in/big.bin"), "{}", e.body);
    assert!(e.body.contains("max_file_size_mb"), "{}", e.body);

    let summary = to(&mails, ADMIN);
    assert_eq!(summary.len(), 1, "summary falls back to recipient_email");
    let s = summary[0];
    assert_eq!(
        s.subject(),
        "Shuttle summary: 2 clean, 1 suspect, 0 failed, 1 set aside"
    );
    let total = clean1.len() + clean2.len();
    for line in [
        "Files discovered: 4".to_string(),
        "Admitted:         3".to_string(),
        format!("Clean (delivered): 2 ({total} bytes"),
        format!("Suspect:          1 ({} bytes)", EICAR.len()),
        "Failed:           0".to_string(),
        "Too large (set aside):   1".to_string(),
        "exit code 1".to_string(),
    ] {
        assert!(s.body.contains(&line), "summary has {line:?}:\n{}", s.body);
    }
    let cmds = smtp.commands();
    assert!(cmds.iter().any(|c| c.starts_with("EHLO")), "{cmds:?}");
    assert!(!cmds.iter().any(|c| c == "STARTTLS"), "{cmds:?}");
}

#[test]
fn throttle_stop_mails_once_with_the_reason_and_a_summary() {
    let smtp = Smtp::start(Mode::Normal);
    let mut env = mailing(smtp.port);
    env.set("throttle", "true");
    env.set("throttle_free_space_mb", "999999999"); // no filesystem has that
    for i in 0..3 {
        env.drop_file(&format!("f{i}.bin"), &noise(1000, i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "throttling is a normal end: {}", r.stderr);
    let mails = smtp.wait_for(2, Duration::from_secs(5));
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let stop: Vec<_> = mails
        .iter()
        .filter(|m| m.subject().starts_with("Shuttle throttled"))
        .collect();
    assert_eq!(stop.len(), 1, "one throttle mail per run");
    assert_eq!(
        stop[0].subject(),
        "Shuttle throttled: Insufficient disk space"
    );
    assert!(
        stop[0]
            .body
            .contains("THROTTLE REASON: Insufficient disk space"),
        "{}",
        stop[0].body
    );
    assert!(stop[0].body.contains("untouched in the source"));
    let sum: Vec<_> = mails
        .iter()
        .filter(|m| m.subject().starts_with("Shuttle summary"))
        .collect();
    assert_eq!(
        sum.len(),
        1,
        "summary when throttled, even without notify_summary"
    );
    assert!(sum[0].subject().contains("throttled (disk_space)"));
    assert!(
        sum[0]
            .body
            .contains("Deferred (left in the source for the next run): 3")
    );
    assert_eq!(Env::tree(&env.src).len(), 3, "sources untouched");
}

#[test]
fn scanner_unreachable_sends_an_error_mail() {
    let smtp = Smtp::start(Mode::Normal);
    let mut env = mailing(smtp.port);
    env.set("recipient_email_error", "errors@example.invalid");
    env.set(
        "clamd_socket",
        env.root().join("no-clamd.sock").to_str().unwrap(),
    );
    env.drop_file("a.txt", b"hello");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    let errors = to(&mails, "errors@example.invalid");
    assert_eq!(errors.len(), 1, "{mails:#?}");
    assert_eq!(errors[0].subject(), "Shuttle run stopped");
    assert!(
        errors[0].body.contains("scanner not usable"),
        "{}",
        errors[0].body
    );
    assert_eq!(Env::tree(&env.src).len(), 1);
}

#[test]
fn a_mail_server_that_is_down_never_fails_or_slows_the_run() {
    let mut env = mailing(Smtp::down_port());
    env.set("notify_summary", "true");
    env.drop_file("a.txt", b"hello");
    env.drop_file("eicar.com", EICAR);
    let t = Instant::now();
    let r = env.run(&[]);
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(took < Duration::from_secs(5), "refused: {took:?}");
    assert_eq!(Env::tree(&env.dst).len(), 1);
    let log = env.log_text();
    assert!(
        log.contains("hazard notification not sent")
            && log.contains("summary notification not sent"),
        "{log}"
    );
    eprintln!("mail server down: run took {took:?}");
}

#[test]
fn a_mail_server_that_falls_behind_gets_a_bounded_queue_and_one_digest() {
    // 80 suspect files in well under a second; the server takes one mail every 60 ms.
    // Each hazard notification is either mailed on its own or counted in the one
    // digest mail: none is lost, and the queue (memory) stays bounded.
    const SUSPECTS: usize = 80;
    let smtp = Smtp::start(Mode::Slow(Duration::from_millis(60)));
    let env = mailing(smtp.port);
    for i in 0..SUSPECTS {
        env.drop_file(&format!("in/eicar{i:03}.com"), EICAR);
    }
    env.drop_file("in/a.txt", b"hello");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        env.report()["files"]["suspect"],
        SUSPECTS,
        "every file handled"
    );
    assert_eq!(Env::tree(&env.dst).len(), 1);

    let mails = smtp.mails();
    let (digests, single): (Vec<&Mail>, Vec<&Mail>) = mails
        .iter()
        .partition(|m| m.subject().contains("not mailed"));
    assert_eq!(digests.len(), 1, "one digest: {:#?}", digests);
    let d = digests[0];
    let counted: usize = d
        .subject()
        .strip_prefix("Shuttle: ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("count in the digest's subject: {}", d.subject()));
    assert!(
        single.len() < SUSPECTS && counted > 0,
        "the queue filled up: {} mailed, {counted} counted",
        single.len()
    );
    assert_eq!(
        single.len() + counted,
        SUSPECTS,
        "every notification mailed or counted"
    );
    assert!(
        single.len() <= 51,
        "at most 50 queued plus the one being sent: {}",
        single.len()
    );
    assert!(
        single
            .iter()
            .all(|m| m.subject().starts_with("Shuttle: suspect file in/eicar")),
        "{single:#?}"
    );
    assert!(d.body.contains("shuttle hazard list"), "{}", d.body);
    eprintln!(
        "slow mail server: {} hazard mails on their own, {counted} counted in the digest",
        single.len()
    );
    let log = env.log_text();
    assert!(
        log.contains("50 hazard notifications wait for the mail server")
            && log.contains(&format!(
                "{counted} hazard notification(s) were not mailed one by one"
            )),
        "{log}"
    );
    assert_eq!(
        log.matches("SUSPECT \"in/eicar").count(),
        SUSPECTS,
        "every suspect file has its log line"
    );
}

#[test]
fn a_mail_server_that_hangs_delays_the_run_end_by_at_most_the_smtp_timeout() {
    let smtp = Smtp::start(Mode::Hang);
    let mut env = mailing(smtp.port);
    env.set("notify_summary", "true");
    env.drop_file("a.txt", b"hello");
    env.drop_file("eicar.com", EICAR);
    let t = Instant::now();
    let r = env.run(&[]);
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}", r.stderr);
    // One SMTP timeout (10 s) for the queue, plus the run itself.
    assert!(took < Duration::from_secs(16), "hanging server: {took:?}");
    assert_eq!(Env::tree(&env.dst).len(), 1, "files handled meanwhile");
    let log = env.log_text();
    assert!(
        log.contains("mail server did not take the notifications within 10 s")
            || log.contains("notification not sent"),
        "failure logged: {log}"
    );
    eprintln!("mail server hangs: run took {took:?}");
}

#[test]
fn use_tls_issues_starttls_and_a_failed_handshake_is_only_logged() {
    let smtp = Smtp::start(Mode::StartTlsThenClose);
    let mut env = mailing(smtp.port);
    env.set("use_tls", "true");
    env.set("notify_summary", "true");
    env.drop_file("a.txt", b"hello");
    let t = Instant::now();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(12));
    let cmds = smtp.commands();
    assert!(cmds.iter().any(|c| c == "STARTTLS"), "{cmds:?}");
    assert!(
        !cmds.iter().any(|c| c.starts_with("MAIL FROM")),
        "nothing sent in clear after a failed STARTTLS: {cmds:?}"
    );
    assert!(smtp.mails().is_empty());
    assert!(env.log_text().contains("summary notification not sent"));
}

/// A self-signed certificate for 127.0.0.1, made with the openssl command.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = (dir.join("smtp-cert.pem"), dir.join("smtp-key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        // A server certificate, not a CA (webpki refuses a CA as end entity).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/install-deps installs it)")
        .success();
    assert!(ok, "openssl req failed");
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (cert, Arc::new(cfg))
}

#[test]
fn use_tls_sends_over_a_verified_starttls_session_with_auth() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, tls) = self_signed(dir.path());
    let smtp = Smtp::start(Mode::Tls(tls));
    let mut env = mailing(smtp.port);
    env.set("use_tls", "true");
    env.set("username", "u");
    env.set("password", "tls-only-s3cret");
    env.set("notify_summary", "true");
    env.drop_file("a.txt", b"hello");
    // The server's certificate is trusted through the standard SSL_CERT_FILE.
    let args = ["run", "--config", env.config.to_str().unwrap()];
    let out = env
        .command(&args)
        .env("SSL_CERT_FILE", &cert)
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1, "{}\n{:?}", r.stderr, smtp.commands());
    assert!(mails[0].tls, "sent inside TLS");
    assert_eq!(mails[0].auth.as_deref(), Some("u\0tls-only-s3cret"));
    let wire = String::from_utf8_lossy(&smtp.wire()).into_owned();
    assert!(wire.contains("STARTTLS"), "EHLO and STARTTLS in clear");
    assert!(
        !wire.contains("tls-only-s3cret") && !wire.contains("AUTH"),
        "AUTH only inside TLS: nothing of it on the wire in clear"
    );
    assert!(mails[0].subject().starts_with("Shuttle summary: 1 clean"));
    // Without trusting it, the same server is refused (certificate checked).
    let smtp2 = {
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let (_, tls2) = self_signed(&other);
        Smtp::start(Mode::Tls(tls2))
    };
    env.set("smtp_port", &smtp2.port.to_string());
    env.drop_file("b.txt", b"hello again");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        smtp2.mails().is_empty(),
        "untrusted certificate: nothing sent"
    );
    assert!(env.log_text().contains("summary notification not sent"));
}

/// name{labels} value lines of a Prometheus text file, checking HELP/TYPE exist.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (series, value) = l.rsplit_once(' ').expect("name value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        assert!(name.starts_with("shuttle_"), "{name}");
        // Counters (`_total`, kept across runs) beside the last run's gauges.
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert!(
            text.contains(&format!("# HELP {name} "))
                && text.contains(&format!("# TYPE {name} {kind}")),
            "HELP/TYPE {kind} for {name}"
        );
        out.push((
            name.to_string(),
            labels.to_string(),
            value.parse().expect("number"),
        ));
    }
    out
}

/// Asserts each `(name, labels, value)` of `want` in the parsed metrics `m`.
fn assert_metrics(m: &[(String, String, f64)], want: &[(&str, &str, f64)]) {
    for &(name, labels, value) in want {
        assert_eq!(metric(m, name, labels), Some(value), "{name}{{{labels}}}");
    }
}

fn metric(m: &[(String, String, f64)], name: &str, labels: &str) -> Option<f64> {
    m.iter()
        .find(|(n, l, _)| n == name && l.contains(labels))
        .map(|x| x.2)
}

#[test]
fn metrics_file_has_the_run_figures_and_keeps_the_last_success() {
    let mut env = Env::new();
    let path = env.root().join("metrics/shuttle.prom");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    env.set("metrics_path", path.to_str().unwrap());
    env.drop_file("a.bin", &noise(4096, 1));
    env.drop_file("b.bin", &noise(1000, 2));
    env.drop_file("eicar.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&path).unwrap();
    let m = parse_metrics(&text);
    assert_metrics(
        &m,
        &[
            ("shuttle_run_files", "outcome=\"clean\"", 2.0),
            ("shuttle_run_files", "outcome=\"suspect\"", 1.0),
            ("shuttle_run_files", "outcome=\"failed\"", 0.0),
            ("shuttle_run_bytes", "outcome=\"clean\"", 5096.0),
            (
                "shuttle_run_bytes",
                "outcome=\"suspect\"",
                EICAR.len() as f64,
            ),
        ],
    );
    assert!(metric(&m, "shuttle_run_duration_seconds", "").unwrap() > 0.0);
    assert_eq!(metric(&m, "shuttle_throttle_stopped", ""), Some(0.0));
    assert_eq!(
        metric(&m, "shuttle_throttle_reason", "reason=\"disk_space\""),
        Some(0.0)
    );
    let free = metric(&m, "shuttle_target_free_bytes", "target=\"destination\"").unwrap();
    assert!(free > 0.0);
    assert_eq!(
        metric(
            &m,
            "shuttle_target_threshold_bytes",
            "target=\"quarantine\""
        ),
        Some(10000.0 * 1048576.0)
    );
    let (_, labels, _) = m
        .iter()
        .find(|(n, _, _)| n == "shuttle_scanner_info")
        .expect("scanner info");
    assert!(
        labels.contains("scanner=\"clamav\"") && labels.contains("version=\"ClamAV "),
        "{labels}"
    );
    let success = metric(&m, "shuttle_last_success_timestamp_seconds", "").unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - success).abs() < 60.0);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temp files left next to it");

    // A failing run keeps the last success time and records the failure.
    std::thread::sleep(Duration::from_millis(1100));
    env.set("max_file_size_mb", "1");
    env.drop_file("big.bin", &noise(2 << 20, 9));
    let r = env.run(&[]);
    assert_eq!(r.code, 1);
    let m = parse_metrics(&std::fs::read_to_string(&path).unwrap());
    assert_metrics(
        &m,
        &[
            ("shuttle_run_files", "outcome=\"too_large\"", 1.0),
            ("shuttle_run_exit_code", "", 1.0),
            ("shuttle_last_success_timestamp_seconds", "", success),
        ],
    );

    // Throttled: state and reason.
    env.unset("max_file_size_mb");
    env.set("throttle", "true");
    env.set("throttle_free_space_mb", "999999999");
    let r = env.run(&[]);
    assert_eq!(r.code, 0);
    let m = parse_metrics(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(metric(&m, "shuttle_throttle_stopped", ""), Some(1.0));
    assert_eq!(
        metric(&m, "shuttle_throttle_reason", "reason=\"disk_space\""),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "shuttle_target_threshold_bytes",
            "target=\"destination\""
        ),
        Some(999999999.0 * 1048576.0)
    );
}

/// The file as Prometheus reads it: `promtool check metrics` accepts it after each
/// run, and the counters add the second run's files to the first's.
#[test]
fn metrics_pass_promtool_and_counters_add_up_across_runs() {
    let promtool_ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !promtool_ok {
        eprintln!("skipped: promtool is missing (scripts/install-deps installs prometheus)");
        return;
    }
    let mut env = Env::new();
    let path = env.root().join("metrics/shuttle.prom");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    env.set("metrics_path", path.to_str().unwrap());
    let promtool = |path: &std::path::Path| {
        let file = std::fs::File::open(path).expect("metrics file written");
        let o = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(file)
            .output()
            .expect("promtool runs");
        assert!(
            o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
            "promtool check metrics: {}{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        parse_metrics(&std::fs::read_to_string(path).expect("metrics file"))
    };

    env.drop_file("a.bin", &noise(3000, 1));
    env.drop_file("b.bin", &noise(500, 2));
    env.drop_file("eicar.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = promtool(&path);
    assert_metrics(
        &first,
        &[
            ("shuttle_files_total", "outcome=\"clean\"", 2.0),
            ("shuttle_files_total", "outcome=\"suspect\"", 1.0),
            ("shuttle_bytes_total", "outcome=\"clean\"", 3500.0),
            ("shuttle_passes_total", "", 1.0),
        ],
    );

    env.drop_file("c.bin", &noise(100, 3));
    env.drop_file("marker.txt", MARKER);
    env.drop_file("eicar2.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let second = promtool(&path);
    assert_eq!(
        metric(&second, "shuttle_run_files", "outcome=\"clean\""),
        Some(1.0),
        "the gauges are the last run's"
    );
    assert_eq!(
        metric(&second, "shuttle_files_total", "outcome=\"clean\""),
        Some(3.0),
        "2 + 1 clean"
    );
    assert_eq!(
        metric(&second, "shuttle_files_total", "outcome=\"suspect\""),
        Some(3.0),
        "1 + 2 suspect"
    );
    assert_eq!(
        metric(&second, "shuttle_bytes_total", "outcome=\"clean\""),
        Some(3600.0)
    );
    assert_eq!(metric(&second, "shuttle_passes_total", ""), Some(2.0));
    // No counter ever goes down between the runs.
    for (name, labels, value) in first.iter().filter(|(n, _, _)| n.ends_with("_total")) {
        let after = metric(&second, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}}"));
        assert!(after >= *value, "{name}{{{labels}}}: {value} -> {after}");
    }
}

#[test]
fn progress_bar_only_on_a_terminal() {
    let env = Env::new();
    for i in 0..4 {
        env.drop_file(&format!("p{i}.bin"), &noise(200_000, i));
    }
    // Under a pseudo-terminal (script(1) from util-linux): the bar is drawn.
    let cmd = format!(
        "{} run --config {}",
        shuttle_bin().display(),
        env.config.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("HOME", env.root())
        .env_remove("SHUTTLE_CONFIG_PATH")
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("files 4/4"), "bar on the tty: {tty}");
    assert!(
        tty.contains("KiB/s") || tty.contains("MiB/s") || tty.contains("B/s"),
        "{tty}"
    );
    assert_eq!(Env::tree(&env.dst).len(), 4);

    // stderr a pipe: nothing of it.
    for i in 0..4 {
        env.drop_file(&format!("q{i}.bin"), &noise(200_000, 10 + i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0);
    assert!(
        !r.stderr.contains("files 4/4") && !r.stderr.contains('\u{1b}'),
        "{}",
        r.stderr
    );
}

/// A lock held by a run that has shown no progress for far longer than its timeouts
/// allow is an error, logged and mailed (exit 1); a busy holder is the usual exit 3
/// with no mail.
#[test]
fn a_lock_held_by_a_stalled_run_is_an_error_mailed_to_the_admin() {
    let smtp = Smtp::start(Mode::Normal);
    let env = mailing(smtp.port);
    env.drop_file("a.txt", b"a");
    let lock = env.root().join("shuttle.lock");
    std::fs::write(&lock, "").unwrap();
    let mut holder = Command::new("flock")
        .args(["-x", "--no-fork"])
        .arg(&lock)
        .arg("-c")
        .arg(format!("echo $$ > {}; exec sleep 60", lock.display()))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&lock).unwrap().trim().to_string();

    // Busy: the holder marked progress just now.
    let r = env.run(&[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stderr.contains("no progress"), "{}", r.stderr);

    // Stalled: no progress for two days (defaults allow well under one).
    age(&lock, 2 * 86400);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "(pid {pid}) has shown no progress for 2880 minutes"
        )),
        "{}",
        r.stderr
    );
    let mails = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].subject(), "Shuttle run stalled");
    assert!(
        mails[0].body.contains(&format!("kill {pid}")),
        "{}",
        mails[0].body
    );
    assert_eq!(std::fs::read(env.src.join("a.txt")).unwrap(), b"a");
    holder.kill().unwrap();
    holder.wait().unwrap();
}
