//! Retro-scan against a real clamd: files are delivered under signature database 27450,
//! then a newer database (27451) that knows one of them is installed and clamd told
//! to RELOAD; the next run or `shuttle rescan` finds exactly that file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::smtp::{Mode, Smtp};
use crate::common::*;

fn clamd_version(socket: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"zVERSION\0").unwrap();
    let mut v = String::new();
    s.read_to_string(&mut v).unwrap();
    v
}

/// Installs database 27451 with hash signatures for `detect` (named
/// `Shuttle.Test.Late`, made with `sigtool --md5`) and makes clamd reload it.
fn newer_signatures(clamd: &Clamd, detect: &[&[u8]]) {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for bytes in detect {
        std::fs::write(tmp.path().join("Shuttle.Test.Late"), bytes).unwrap();
        let out = Command::new("sigtool")
            .arg("--md5")
            .arg("Shuttle.Test.Late")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        lines.push_str(&String::from_utf8(out.stdout).unwrap());
    }
    let extra = tmp.path().join("extra.hdb");
    std::fs::write(&extra, lines).unwrap();
    let before = clamd_version(&clamd.socket);
    let ok = Command::new(repo().join("scripts/make-test-signatures"))
        .arg(clamd.dir.join("db"))
        .args(["--version", "27451", "--extra-hdb"])
        .arg(&extra)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut s = std::os::unix::net::UnixStream::connect(&clamd.socket).unwrap();
    s.write_all(b"zRELOAD\0").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("RELOADING"), "{reply}");
    let started = Instant::now();
    while clamd_version(&clamd.socket) == before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "clamd never reloaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(clamd_version(&clamd.socket).contains("/27451/"));
}

fn env_for(clamd: &Clamd, smtp: Option<&Smtp>) -> Env {
    let mut env = Env::new();
    env.set("clamd_socket", clamd.socket.to_str().unwrap());
    env.set("clamd_config", clamd.conf().to_str().unwrap());
    if let Some(smtp) = smtp {
        env.set("notify", "true");
        env.set("smtp_server", "127.0.0.1");
        env.set("smtp_port", &smtp.port.to_string());
        env.set("use_tls", "false");
        env.set("sender_email", "shuttle@example.invalid");
        env.set("recipient_email", "admin@example.invalid");
        env.set("recipient_email_hazard", "hazard@example.invalid");
    }
    env
}

fn gpg_decrypt(home: &Path, file: &Path) -> Vec<u8> {
    let out = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--quiet", "--decrypt", "--output", "-"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Withdraw: exactly the file the newer signatures know is encrypted into the hazard
/// archive (sidecar: withdrawn, from where) and taken out of the destination; a copy
/// changed downstream is reported and left as it is; a second run rescans nothing.
#[test]
fn newer_signatures_withdraw_exactly_the_delivered_file_they_detect() {
    let (clamd, _child) = Clamd::start_with(DEFAULT_LIMITS, &[]);
    let smtp = Smtp::start(Mode::Normal);
    let mut env = env_for(&clamd, Some(&smtp));
    let (gnupg, key) = gpg_key(env.root(), "default");
    let archive = env.root().join("hazard");
    std::fs::create_dir(&archive).unwrap();
    env.set("hazard_archive_path", archive.to_str().unwrap());
    env.set("hazard_encryption_key_path", key.to_str().unwrap());
    let late = noise(4000, 1);
    let edited = noise(5000, 2);
    env.drop_file("late.bin", &late);
    env.drop_file("edited.bin", &edited);
    env.drop_file("ok.bin", &noise(3000, 3));
    env.drop_file("sub/ok2.bin", &noise(3000, 4));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.report()["files"]["clean"], 4);
    assert_eq!(env.report()["rescan"]["scanned"], 0, "nothing newer yet");
    // The run's own deliveries, cleared by the signatures of now, are marked examined
    // under them without being read back: the next run starts past them.
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let (mark, last): (i64, i64) = db
        .query_row(
            "SELECT (SELECT below FROM rescan_marks WHERE generation = 'clamav=27450'),
                    (SELECT MAX(id) FROM files)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(mark, last);
    drop(db);
    // Downstream, someone edits one delivered file.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(env.dst.join("edited.bin"))
        .unwrap();
    f.write_all(b" edited").unwrap();
    drop(f);

    newer_signatures(&clamd, &[&late, &edited]);
    env.set("rescan_action", "withdraw");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = env.report();
    assert_eq!(rep["rescan"]["withdrawn"], 1, "{rep:#}");
    assert_eq!(rep["rescan"]["changed"], 1, "{rep:#}");
    assert_eq!(rep["rescan"]["clean"], 2, "{rep:#}");
    let dst = Env::tree(&env.dst);
    assert!(!dst.contains_key("late.bin"), "withdrawn");
    assert_eq!(dst["edited.bin"].len(), 5000 + 7, "left alone");
    assert!(dst.contains_key("ok.bin") && dst.contains_key("sub/ok2.bin"));
    // The archive holds exactly the delivered bytes, and its sidecar says whence.
    let sidecars: Vec<PathBuf> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(sidecars.len(), 1, "{sidecars:?}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sidecars[0]).unwrap()).unwrap();
    assert_eq!(
        meta["withdrawn_from"],
        env.dst.join("late.bin").to_str().unwrap()
    );
    assert_eq!(meta["detections"][0], "Shuttle.Test.Late.UNOFFICIAL");
    let gpg_file = archive.join(meta["archive"].as_str().unwrap());
    assert_eq!(gpg_decrypt(&gnupg, &gpg_file), late);
    // Mail: the withdrawal, and the changed copy.
    let mails = smtp.wait_for(2, Duration::from_secs(10));
    let withdrawn = mails
        .iter()
        .find(|m| m.subject().contains("detected") && m.subject().contains("late.bin"))
        .expect("a mail about late.bin");
    for want in [
        "Shuttle.Test.Late",
        "clamav signatures 27451",
        "Cleared then by: clamav signatures 27450",
        "Withdrawn",
    ] {
        assert!(withdrawn.body.contains(want), "{want}: {}", withdrawn.body);
    }
    assert!(
        mails
            .iter()
            .any(|m| m.subject().contains("changed downstream")
                && m.subject().contains("edited.bin")),
        "{mails:#?}"
    );
    // History shows the rescan.
    let h = env.shuttle(&[
        "history",
        "late.bin",
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(
        h.stdout.contains("rescanned") && h.stdout.contains("clamav=27451: withdrawn"),
        "{}",
        h.stdout
    );
    // Nothing is rescanned twice under the same signatures.
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.report()["rescan"]["scanned"], 0);
}

/// Alert (the default): mail, journal, report; the copy stays. `shuttle rescan
/// --path` limits it to a subtree.
#[test]
fn alert_names_the_file_its_detection_and_what_cleared_it() {
    let (clamd, _child) = Clamd::start_with(DEFAULT_LIMITS, &[]);
    let smtp = Smtp::start(Mode::Normal);
    let env = env_for(&clamd, Some(&smtp));
    let late = noise(2000, 7);
    env.drop_file("a/late.bin", &late);
    env.drop_file("b/late.bin", &late);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    newer_signatures(&clamd, &[&late]);
    let config = env.config.to_str().unwrap();
    let r = env.shuttle(&["rescan", "--config", config, "--path", "a/"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("1 rescanned: 0 clean, 1 alerted"),
        "{}",
        r.stdout
    );
    let mails = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1, "{mails:#?}");
    assert_eq!(mails[0].rcpt, ["hazard@example.invalid"]);
    for want in [
        "a/late.bin",
        "Shuttle.Test.Late",
        "27451",
        "Delivered:",
        "Cleared then by: clamav signatures 27450",
        "alert only",
    ] {
        assert!(mails[0].body.contains(want), "{want}: {}", mails[0].body);
    }
    let r = env.shuttle(&["rescan", "--config", config]);
    assert!(
        r.stdout.contains("1 rescanned: 0 clean, 1 alerted"),
        "{}",
        r.stdout
    );
    assert_eq!(Env::tree(&env.dst).len(), 2, "alert leaves the copies");
    let h = env.shuttle(&["history", "a/late.bin", "--config", config]);
    assert!(
        h.stdout
            .contains("clamav=27451: alerted [Shuttle.Test.Late"),
        "{}",
        h.stdout
    );
}

/// Clones delivery `seed` (one real delivery) into `n` more journal records and
/// destination copies, as `n` earlier deliveries of small files would have left them.
fn clone_deliveries(env: &Env, n: usize) {
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let (seed, mtime_ns, final_path): (i64, i64, String) = db
        .query_row(
            "SELECT id, mtime_ns, final_path FROM files WHERE outcome = 'clean'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let bytes = std::fs::read(&final_path).unwrap();
    let dir = env.dst.join("many");
    std::fs::create_dir_all(&dir).unwrap();
    let mtime = std::time::UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64);
    for i in 0..n {
        let p = dir.join(format!("f{i}.txt"));
        let f = std::fs::File::create(&p).unwrap();
        (&f).write_all(&bytes).unwrap();
        f.set_modified(mtime).unwrap();
    }
    db.execute(
        "WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < ?2)
         INSERT INTO files (run_id, rel_path, size, mtime_ns, state, sha256, verdict, scan_results, outcome,
                            disposition, final_path, source_removed, admitted_at, finished_at, finished_day)
         SELECT run_id, 'many/f' || i || '.txt', size, mtime_ns, state, sha256, verdict, scan_results, outcome,
                disposition, ?3 || '/many/f' || i || '.txt', source_removed, admitted_at, finished_at, finished_day
         FROM files, k WHERE files.id = ?1",
        rusqlite::params![seed, n as i64, env.dst.to_str().unwrap()],
    )
    .unwrap();
}

fn rescans(env: &Env) -> (i64, i64, i64) {
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    db.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT file_id), SUM(state = 'clean') FROM rescans",
        [],
        |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                r.get::<_, Option<i64>>(2)?.unwrap_or(0),
            ))
        },
    )
    .unwrap()
}

const MANY: usize = 10_000;

/// Many deliveries: a run spends at most its budget on them; a SIGKILL in the middle
/// of `shuttle rescan` loses and repeats nothing: the next one rescans exactly the
/// rest, each delivery once.
#[test]
fn a_killed_rescan_of_many_deliveries_resumes_and_a_pass_keeps_its_budget() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:6.2} s {what}", t0.elapsed().as_secs_f64());
    let (clamd, _child) = Clamd::start_with(DEFAULT_LIMITS, &[]);
    let mut env = env_for(&clamd, None);
    env.drop_file("seed.txt", b"a small delivered file\n");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    phase("clamd up, seed delivered");
    clone_deliveries(&env, MANY);
    phase("deliveries cloned");
    let total = MANY as i64 + 1;
    newer_signatures(&clamd, &[]);
    phase("clamd reloaded");

    // A run with a one-second budget: some, not all, and not much longer.
    env.set("rescan_budget_seconds", "1");
    let started = Instant::now();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = env.report();
    let first = rep["rescan"]["scanned"].as_i64().unwrap();
    assert!(first > 0 && first < total, "{rep:#}");
    assert_eq!(rep["rescan"]["unfinished"], true);
    assert!(rep["rescan"]["seconds"].as_f64().unwrap() < 1.5, "{rep:#}");
    eprintln!(
        "budget 1 s: {first} rescanned in {:.2} s (run {:.2} s)",
        rep["rescan"]["seconds"],
        started.elapsed().as_secs_f64()
    );
    assert_eq!(rescans(&env), (first, first, first));
    // The pages it finished are marked, so the next pass does not read them again.
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let mark: i64 = db
        .query_row(
            "SELECT below FROM rescan_marks WHERE generation = 'clamav=27451'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        mark > 0 && mark <= first + 1,
        "mark {mark}, {first} rescanned"
    );
    drop(db);
    phase("budgeted run");

    // Killed part-way (two kill points per file: after the scan, before its record).
    let config = env.config.to_str().unwrap().to_string();
    let kill_at = (total - first) as u64; // about half of the rest
    let out = env
        .command(&["rescan", "--config", &config])
        .env("SHUTTLE_CRASH_AT", kill_at.to_string())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        None,
        "killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rows, files, clean) = rescans(&env);
    assert_eq!(rows, files, "no delivery rescanned twice");
    assert_eq!(rows, clean);
    assert!(rows > first && rows < total, "{rows}");
    phase("killed rescan");

    // Stopped by SIGTERM part-way: the delivery in hand is recorded, then it ends
    // (exit 0), saying so; nothing is rescanned twice.
    env.set("max_scan_threads", "1");
    env.write_config();
    let mut cmd = env.command(&["rescan", "--config", &config]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (child, resume) = env.spawn_paused(cmd, "rescan: scanned, before record");
    term(&child);
    std::fs::write(&resume, b"").unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("1 rescanned: 1 clean")
            && r.stdout.contains("stopped on request before the end"),
        "{}",
        r.stdout
    );
    let rows_before = rows;
    let (rows, files, clean) = rescans(&env);
    assert_eq!(
        (rows, files, clean),
        (rows_before + 1, rows_before + 1, rows_before + 1)
    );
    phase("stopped rescan");

    // The rest, each exactly once.
    let started = Instant::now();
    let r = env.shuttle(&["rescan", "--config", &config]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "{} rescanned: {} clean",
            total - rows,
            total - rows
        )),
        "{}",
        r.stdout
    );
    eprintln!(
        "resumed: {} rescanned in {:.2} s",
        total - rows,
        started.elapsed().as_secs_f64()
    );
    phase("resumed");
    assert_eq!(rescans(&env), (total, total, total));
    phase("counted");
    assert_eq!(Env::tree(&env.dst).len(), total as usize, "nothing lost");
    phase("tree");
}

/// A withdrawal killed at every kill point on its way (recorded, archived, recorded
/// again, removed): the next `shuttle rescan` finishes it. Every file ends withdrawn
/// exactly once: one archive that decrypts to the delivered bytes, no copy left in
/// the destination, nothing archived twice.
#[test]
fn a_withdrawal_killed_at_any_point_is_finished_once() {
    let (clamd, _child) = Clamd::start_with(DEFAULT_LIMITS, &[]);
    let mut env = env_for(&clamd, None);
    let (gnupg, key) = gpg_key(env.root(), "default");
    let archive = env.root().join("hazard");
    std::fs::create_dir(&archive).unwrap();
    env.set("hazard_archive_path", archive.to_str().unwrap());
    env.set("hazard_encryption_key_path", key.to_str().unwrap());
    env.set("rescan_action", "withdraw");
    let late = noise(3000, 9);
    const N: usize = 8;
    for k in 0..N {
        env.drop_file(&format!("late{k}/late.bin"), &late);
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    newer_signatures(&clamd, &[&late]);
    let config = env.config.to_str().unwrap().to_string();
    // How many kill points one withdrawal passes.
    let traced = env
        .command(&["rescan", "--config", &config, "--path", "late0/"])
        .env("SHUTTLE_CRASH_TRACE", "1")
        .output()
        .unwrap();
    assert!(traced.status.success());
    let points = String::from_utf8_lossy(&traced.stderr)
        .lines()
        .filter(|l| l.starts_with("crashpoint "))
        .count();
    assert!((5..N).contains(&points), "{points} kill points");
    for k in 1..=points {
        let prefix = format!("late{k}/");
        let out = env
            .command(&["rescan", "--config", &config, "--path", &prefix])
            .env("SHUTTLE_CRASH_AT", k.to_string())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), None, "killed at point {k}");
        let r = env.shuttle(&["rescan", "--config", &config, "--path", &prefix]);
        assert_eq!(r.code, 0, "after a kill at point {k}: {}", r.stderr);
    }
    // Every one withdrawn once; the ones not yet rescanned are left for a last run.
    let r = env.shuttle(&["rescan", "--config", &config]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty(), "all withdrawn");
    let mut from = Vec::new();
    for e in std::fs::read_dir(&archive).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(!name.starts_with(".shuttle-tmp"), "temp left: {name}");
        if name.ends_with(".json") {
            let meta: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let gpg_file = archive.join(meta["archive"].as_str().unwrap());
            assert_eq!(gpg_decrypt(&gnupg, &gpg_file), late);
            from.push(meta["withdrawn_from"].as_str().unwrap().to_string());
        } else {
            assert!(
                archive.join(format!("{name}.json")).exists(),
                "{name} has a sidecar"
            );
        }
    }
    from.sort();
    let want: Vec<String> = (0..N)
        .map(|k| {
            env.dst
                .join(format!("late{k}/late.bin"))
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(from, want, "each withdrawn exactly once");
    let db = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let states: Vec<(i64, String)> = db
        .prepare("SELECT file_id, state FROM rescans ORDER BY file_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(states.len(), N, "{states:?}");
    assert!(states.iter().all(|(_, s)| s == "withdrawn"), "{states:?}");
}
