//! Faults: every file stays safe, the error is clear, the exit code right.
//!
//! The real clamd is used wherever it can produce the fault (killed mid-run, scan
//! limits); a small fake clamd on a unix socket stands in only for what a real one
//! cannot be made to do on demand (answer garbage, hang, drop the connection).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

#[derive(Clone, Copy)]
enum Fake {
    Garbage,
    Hang,
    Drop,
    /// Leaves the `VERSION` sent with a scan unanswered, answers the scan `OK`, and
    /// closes.
    CleanWithoutVersion,
}

/// A fake clamd: answers VERSION, passes the canary (first scan), then misbehaves.
fn fake_clamd(dir: &Path, mode: Fake) -> PathBuf {
    use crate::common::fake_clamd::{Answer, serve};
    let sock = dir.join("fake-clamd.sock");
    let scans = std::sync::atomic::AtomicUsize::new(0);
    let unanswered = std::sync::atomic::AtomicBool::new(false);
    serve(&sock, move |cmd| {
        use std::sync::atomic::Ordering::SeqCst;
        if cmd == b"zVERSION" {
            // Shuttle asks VERSION just before each scan, on the same session.
            if matches!(mode, Fake::CleanWithoutVersion) && scans.load(SeqCst) > 0 {
                unanswered.store(true, SeqCst);
                return Answer::Nothing;
            }
            return Answer::Reply(b"ClamAV 1.4.6/1/fake".to_vec());
        }
        if scans.fetch_add(1, SeqCst) == 0 {
            return Answer::Reply(b"fd[3]: Eicar-Test-Signature FOUND".to_vec());
        }
        match mode {
            Fake::Garbage => Answer::Reply(b"banana split".to_vec()),
            Fake::Hang => Answer::Hang(Duration::from_secs(30)),
            Fake::Drop => Answer::Drop,
            Fake::CleanWithoutVersion if unanswered.swap(false, SeqCst) => {
                Answer::ReplyThenClose(b"fd[3]: OK".to_vec())
            }
            Fake::CleanWithoutVersion => Answer::Reply(b"fd[3]: OK".to_vec()),
        }
    });
    sock
}

fn env_with_fake(mode: Fake) -> Env {
    let mut env = Env::new();
    let sock = fake_clamd(env.root(), mode);
    env.set("clamd_socket", sock.to_str().unwrap());
    // The fake's signatures have no date.
    env.set("max_signature_age_hours", "0");
    env
}

/// One file `a.txt` (`a`) dropped, the fake in `mode`: the run fails it with a message
/// containing `says`, delivers nothing, keeps the source and leaves no quarantine copy.
fn fails_and_keeps_the_source(mode: Fake, says: &str) -> Env {
    let env = env_with_fake(mode);
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(says), "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    assert_eq!(std::fs::read(env.src.join("a.txt")).unwrap(), b"a");
    assert!(Env::tree(&env.quarantine).is_empty());
    assert_eq!(env.report()["files"]["failed"], 1);
    env
}

#[test]
fn clamd_answering_garbage_fails_the_file_and_keeps_the_source() {
    fails_and_keeps_the_source(Fake::Garbage, "unrecognised clamd reply: \"banana split\"");
}

#[test]
fn a_clean_scan_whose_signatures_clamd_does_not_confirm_is_not_delivered() {
    let env = fails_and_keeps_the_source(
        Fake::CleanWithoutVersion,
        "did not answer VERSION with the scan",
    );
    assert_eq!(env.report()["files"]["clean"], 0);
}

#[test]
fn clamd_dropping_the_connection_fails_the_file() {
    let env = env_with_fake(Fake::Drop);
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("clamd closed the connection without the scan's reply"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(env.src.join("a.txt")).unwrap(), b"a");
}

#[test]
fn a_hanging_clamd_times_out_retries_and_the_circuit_breaker_stops_the_run() {
    let mut env = env_with_fake(Fake::Hang);
    env.set("malware_scan_timeout_seconds", "1");
    env.set("malware_scan_retry_wait_seconds", "0");
    env.set("malware_scan_retry_count", "2");
    env.set("max_scan_threads", "1");
    for i in 0..5 {
        env.drop_file(&format!("f{i}.txt"), format!("file {i}").as_bytes());
    }
    let started = Instant::now();
    let r = env.run(&[]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded by the timeouts"
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    assert!(r.stderr.contains("circuit breaker"), "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    for i in 0..5 {
        assert_eq!(
            std::fs::read(env.src.join(format!("f{i}.txt"))).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
    let rep = env.report();
    assert_eq!(
        rep["files"]["admitted"], 1,
        "admission stopped after the breaker opened"
    );
    assert_eq!(rep["files"]["deferred"], 4);
    assert!(
        rep["errors"][0]
            .as_str()
            .unwrap()
            .contains("circuit breaker"),
        "{rep}"
    );
    assert!(Env::tree(&env.quarantine).is_empty());
}

#[test]
fn clamd_killed_mid_run_leaves_every_file_delivered_or_in_the_source() {
    let (own, mut clamd_proc) = Clamd::start();
    let mut env = Env::new();
    env.set("clamd_socket", own.socket.to_str().unwrap());
    env.set("max_scan_threads", "2");
    let mut files = Vec::new();
    for i in 0..400 {
        let data = noise(64 * 1024, i);
        env.drop_file(&format!("d{}/f{i:03}.bin", i % 4), &data);
        files.push((format!("d{}/f{i:03}.bin", i % 4), data));
    }
    let child = env.run_command().stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while Env::tree(&env.dst).len() < 20 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    clamd_proc.kill().unwrap();
    clamd_proc.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("clamd at unix socket"),
        "names clamd: {stderr}"
    );
    let dst = Env::tree(&env.dst);
    assert!(
        !dst.is_empty() && dst.len() < 400,
        "{} delivered before the kill",
        dst.len()
    );
    for (rel, data) in &files {
        match dst.get(rel) {
            Some(b) => assert!(b == data, "{rel} byte-identical"),
            None => assert_eq!(
                &std::fs::read(env.src.join(rel)).unwrap(),
                data,
                "{rel} still in source"
            ),
        }
    }
    assert!(Env::tree(&env.quarantine).is_empty());
    assert!(env.report()["files"]["failed"].as_u64().unwrap() >= 1);
}

#[test]
fn a_file_beyond_clamds_scan_limits_is_set_aside_never_clean() {
    let env = Env::new();
    let p = env.drop_file("huge.img", b"");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(401 << 20)
        .unwrap();
    age(&p, 60);
    env.drop_file("ok.txt", b"ok");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("UNSCANNABLE \"huge.img\": exceeds MaxFileSize 400 MiB"),
        "{}",
        r.stderr
    );
    assert_eq!(env.report()["files"]["unscannable"], 1);
    assert_eq!(Env::tree(&env.dst).keys().collect::<Vec<_>>(), ["ok.txt"]);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        401 << 20,
        "source kept"
    );
    assert_eq!(
        env.report()["files"]["suspect"],
        0,
        "a size limit is not a detection"
    );
}

#[test]
fn max_file_size_mb_fails_a_sparse_2_gib_file_without_copying_it() {
    let mut env = Env::new();
    env.set("max_file_size_mb", "100");
    let p = env.drop_file("sparse.img", b"");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    age(&p, 60);
    let started = Instant::now();
    let r = env.run(&[]);
    assert!(started.elapsed() < Duration::from_secs(5), "not copied");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("exceeds max_file_size_mb (100 MiB)"),
        "{}",
        r.stderr
    );
    assert_eq!(env.report()["files"]["too_large"], 1);
    assert!(Env::tree(&env.quarantine).is_empty() && Env::tree(&env.dst).is_empty());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30);
}

#[test]
fn check_shows_the_clamd_lines_to_set() {
    let mut env = Env::new();
    let conf = env.root().join("clamd-no-alert.conf");
    std::fs::write(
        &conf,
        format!(
            "LocalSocket {}\nMaxFileSize 50M\n",
            clamd().socket.display()
        ),
    )
    .unwrap();
    env.set("clamd_config", conf.to_str().unwrap());
    let r = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert!(
        r.stdout.contains("warning: set `AlertExceedsMax yes`"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("MaxFileSize 50 MiB"), "{}", r.stdout);
    // The test clamd has AlertExceedsMax yes: nothing to set.
    env.set("clamd_config", clamd().conf().to_str().unwrap());
    let r = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(!r.stdout.contains("AlertExceedsMax yes`"), "{}", r.stdout);
}

#[test]
fn sources_deleted_truncated_or_appended_after_discovery_are_left_alone() {
    let mut env = Env::new();
    env.set("max_scan_threads", "1");
    let big = env.drop_file("0-big.bin", &noise(64 << 20, 1));
    age(&big, 600);
    let gone = env.drop_file("1-gone.txt", b"to be deleted");
    let short = env.drop_file("2-short.txt", b"to be truncated");
    let long = env.drop_file("3-long.txt", b"to be appended");
    let mut child = env.run_command().stderr(Stdio::null()).spawn().unwrap();
    // While the big (oldest) file is being handled, change the others.
    let started = Instant::now();
    while !Env::tree(&env.quarantine)
        .keys()
        .any(|k| k.contains("shuttle-tmp") || k == "0-big.bin")
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "big file never reached the quarantine"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::remove_file(&gone).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(3)
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&long)
        .unwrap()
        .write_all(b" and more")
        .unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(
        code,
        Some(0),
        "changed sources are skipped, not failures: {}",
        env.log_text()
    );
    let dst = Env::tree(&env.dst);
    assert_eq!(
        dst.keys().collect::<Vec<_>>(),
        ["0-big.bin"],
        "only the unchanged file"
    );
    assert_eq!(std::fs::read(&short).unwrap(), b"to ");
    assert_eq!(std::fs::read(&long).unwrap(), b"to be appended and more");
    let rep = env.report();
    assert_eq!(rep["skipped_by_reason"]["changed_or_conflict"], 3, "{rep}");
    // Once stable, the next run takes them.
    age(&short, 60);
    age(&long, 60);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 3);
}

/// Runs shuttle as `nobody` (root bypasses permission checks).
fn run_as_nobody(env: &Env) -> Run {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(shuttle_bin())
        .args([
            "run",
            "--config",
            env.config.to_str().unwrap(),
            "--report-json",
            env.report.to_str().unwrap(),
        ])
        .env("HOME", env.root())
        .output()
        .unwrap();
    Run::from(out)
}

fn chown_nobody(p: &Path) {
    assert!(
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn permission_denied_on_a_source_file_or_a_destination_directory_keeps_the_source() {
    let env = Env::new();
    std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.drop_file("secret.txt", b"no access");
    env.drop_file("sub/ok.txt", b"fine");
    env.drop_file("locked/x.txt", b"x");
    std::fs::create_dir_all(env.dst.join("locked")).unwrap();
    chown_nobody(env.root());
    std::fs::set_permissions(
        env.src.join("secret.txt"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    std::fs::set_permissions(
        env.dst.join("locked"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    let r = run_as_nobody(&env);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("secret.txt") && r.stderr.contains("Permission denied"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("locked") && r.stderr.contains("delivering")
            || r.stderr.contains("Permission denied"),
        "{}",
        r.stderr
    );
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["sub/ok.txt"]
    );
    assert!(env.src.join("secret.txt").exists());
    assert_eq!(std::fs::read(env.src.join("locked/x.txt")).unwrap(), b"x");
    assert!(Env::tree(&env.quarantine).is_empty());
    assert_eq!(env.report()["files"]["failed"], 2);
}

#[test]
fn a_locked_journal_stops_the_run_before_any_file_is_touched() {
    let env = Env::new();
    env.drop_file("a.txt", b"a");
    assert_eq!(env.run(&[]).code, 0, "creates the journal");
    env.drop_file("b.txt", b"b");
    let db = env.state.join("shuttle-journal.sqlite3");
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)")
        .arg(&db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 6];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let r = env.run(&[]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("journal") && r.stderr.contains("locked"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(env.src.join("b.txt")).unwrap(), b"b");
    assert!(!env.dst.join("b.txt").exists());
}

#[test]
fn a_corrupt_journal_stops_the_run_with_a_clear_error() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).unwrap();
    std::fs::write(env.state.join("shuttle-journal.sqlite3"), noise(8192, 5)).unwrap();
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("shuttle-journal.sqlite3") && r.stderr.contains("not a database"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(env.src.join("a.txt")).unwrap(), b"a");
    assert!(Env::tree(&env.dst).is_empty());
}

/// A clamd that stopped accepting connections: its listen queue is full, so a
/// blocking `connect()` would wait forever. The run must end on its own, say what is
/// wrong, touch no file, and release the lock for the next run.
#[test]
fn clamd_accepting_no_connection_ends_the_run_and_releases_the_lock() {
    use std::os::fd::AsFd;
    let mut env = Env::new();
    let sock = env.root().join("stuck-clamd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    rustix::net::listen(listener.as_fd(), 0).unwrap();
    // Fill the queue from here: connections nobody will ever accept.
    let mut queued = Vec::new();
    loop {
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let addr = rustix::net::SocketAddrUnix::new(&sock).unwrap();
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => queued.push(fd),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("filling the listen queue: {e}"),
        }
        assert!(queued.len() < 64, "the listen queue never filled");
    }
    env.set("clamd_socket", sock.to_str().unwrap());
    env.set("malware_scan_timeout_seconds", "2");
    let original = env.drop_file("a.txt", b"kept");
    let started = Instant::now();
    let r = env.run(&[]);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("no connection accepted within 2s"),
        "{}",
        r.stderr
    );
    assert!(took < Duration::from_secs(20), "the run took {took:?}");
    assert_eq!(std::fs::read(&original).unwrap(), b"kept");
    assert!(Env::tree(&env.dst).is_empty());
    drop(queued);
    drop(listener);

    // The lock was released: the next run, against the real clamd, delivers.
    env.set("clamd_socket", clamd().socket.to_str().unwrap());
    env.unset("malware_scan_timeout_seconds");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("a.txt").map(Vec::as_slice),
        Some(&b"kept"[..])
    );
}

/// Shuttle's own outputs failing fail the run: a log disk that is full, a metrics
/// file that cannot be written, a report that cannot be written. Each is said on
/// stderr, the exit code is 1, and the files themselves are handled as usual.
#[test]
fn a_full_log_disk_or_unwritable_metrics_and_report_make_the_run_fail() {
    let mut env = Env::new();
    let logs = Tmpfs::mount(&env.logs, 1);
    // Fill the log filesystem to the last block.
    let filler = std::fs::File::create(logs.dir.join("filler")).unwrap();
    let mut w = std::io::BufWriter::new(filler);
    let chunk = vec![0u8; 4096];
    while w.write_all(&chunk).and_then(|()| w.flush()).is_ok() {}
    drop(w);
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot write the log file"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("a.txt").map(Vec::as_slice),
        Some(&b"a"[..])
    );
    drop(logs);

    // Metrics into a directory that does not exist: the report says so, exit 1.
    env.set(
        "metrics_path",
        env.root()
            .join("no-such-dir/shuttle.prom")
            .to_str()
            .unwrap(),
    );
    env.drop_file("b.txt", b"b");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = env.report();
    assert_eq!(report["exit_code"], 1);
    let errors = report["errors"].to_string();
    assert!(errors.contains("no-such-dir"), "{errors}");
    assert!(r.stderr.contains("no-such-dir"), "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("b.txt").map(Vec::as_slice),
        Some(&b"b"[..])
    );

    // A report that cannot be written.
    env.unset("metrics_path");
    env.drop_file("c.txt", b"c");
    let bad = env.root().join("no-such-dir/report.json");
    let config = env.config.to_str().unwrap();
    let r = env.shuttle(&[
        "run",
        "--config",
        config,
        "--report-json",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot write report"), "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("c.txt").map(Vec::as_slice),
        Some(&b"c"[..])
    );
}
