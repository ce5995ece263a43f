//! The core pipeline, driven through the CLI against a real clamd.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use shuttle::journal::Journal as _;

#[test]
fn clean_files_arrive_byte_identical_with_their_tree_and_sources_go() {
    let env = Env::new();
    let a = noise(300_000, 1);
    let b = noise(5, 2);
    env.drop_file("lab/2026/a.bin", &a);
    env.drop_file("b.txt", &b);
    env.drop_file("deep/x/y/z/c.dat", b"");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.get("lab/2026/a.bin"), Some(&a));
    assert_eq!(dst.get("b.txt"), Some(&b));
    assert_eq!(dst.get("deep/x/y/z/c.dat"), Some(&Vec::new()));
    assert_eq!(dst.len(), 3);
    assert!(
        Env::tree(&env.src).is_empty(),
        "sources removed after verified delivery"
    );
    assert!(Env::tree(&env.quarantine).is_empty(), "quarantine emptied");
    let rep = env.report();
    assert_eq!(rep["exit_code"], 0);
    assert_eq!(rep["files"]["clean"], 3);
    assert_eq!(rep["bytes"]["clean"], 300_005);
    assert_eq!(rep["throttle"]["stopped"], false);
    assert!(r.stderr.contains("3 clean"), "summary line: {}", r.stderr);
}

#[test]
fn eicar_and_marker_files_never_reach_the_destination() {
    let env = Env::new();
    env.drop_file("in/eicar.com", EICAR);
    env.drop_file("marker.txt", MARKER);
    env.drop_file("ok.txt", b"fine");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "suspect files are not failures: {}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.keys().collect::<Vec<_>>(), ["ok.txt"]);
    assert!(
        Env::tree(&env.quarantine).is_empty(),
        "suspect quarantine copies deleted"
    );
    let rep = env.report();
    assert_eq!(rep["files"]["suspect"], 2);
    let log = env.log_text();
    assert!(log.contains("SUSPECT \"in/eicar.com\""), "{log}");
    assert!(log.contains("Shuttle.Test.Marker"), "{log}");
}

/// `stderr_log_level = warn` (cron mails whatever a job prints): stderr shows the
/// suspect file, not each clean one; the log file still has every line.
#[test]
fn stderr_shows_only_problems_at_warn_and_the_log_file_keeps_everything() {
    let env = Env::new();
    env.drop_file("eicar.com", EICAR);
    env.drop_file("ok.txt", b"fine");
    let r = env.run(&["--stderr-log-level", "warn"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).keys().collect::<Vec<_>>(), ["ok.txt"]);
    assert!(r.stderr.contains("SUSPECT \"eicar.com\""), "{}", r.stderr);
    assert!(!r.stderr.contains("clean: \"ok.txt\""), "{}", r.stderr);
    let log = env.log_text();
    assert!(
        log.contains("clean: \"ok.txt\"") && log.contains("SUSPECT \"eicar.com\""),
        "{log}"
    );
    // `off`: nothing on stderr at all, even the summary; the file is whole.
    env.drop_file("ok2.txt", b"fine too");
    let r = env.run(&["--stderr-log-level", "off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    assert!(env.log_text().contains("clean: \"ok2.txt\""));
    let r = env.run(&["--stderr-log-level", "loud"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("stderr_log_level") && r.stderr.contains("loud"),
        "{}",
        r.stderr
    );
}

#[test]
fn symlinks_fifos_and_unsafe_names_are_skipped_and_counted() {
    let env = Env::new();
    env.drop_file("real.txt", b"real");
    std::os::unix::fs::symlink("/etc/passwd", env.src.join("x")).unwrap();
    std::os::unix::fs::symlink("/etc", env.src.join("etcdir")).unwrap();
    let fifo = env.src.join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    env.drop_file("-rf", b"dash");
    env.drop_file("new\nline", b"nl");
    env.drop_file(".shuttle-tmp.99", b"temp");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).keys().collect::<Vec<_>>(), ["real.txt"]);
    assert!(
        env.src.join("x").symlink_metadata().is_ok(),
        "symlink left alone"
    );
    assert!(env.src.join("-rf").exists() && env.src.join("new\nline").exists());
    let rep = env.report();
    let by = &rep["skipped_by_reason"];
    assert_eq!(by["symlink"], 2);
    assert_eq!(by["special_file"], 1);
    assert_eq!(by["unsafe_name"], 2);
    assert_eq!(by["temp_file"], 1);
    assert_eq!(rep["files"]["skipped"], 6);
    let log = env.log_text();
    assert!(log.contains("\"x\": symlink"), "{log}");
    assert!(log.contains("unsafe name: starts with '-'"), "{log}");
    assert!(log.contains("\"new\\nline\": unsafe name"), "{log}");
}

#[test]
fn a_file_held_open_waits_for_the_next_run() {
    let env = Env::new();
    let held = env.drop_file("held.log", b"still writing");
    let mut child = writer_holding(&held);
    age(&held, 60);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty(), "held file not delivered");
    assert_eq!(std::fs::read(&held).unwrap(), b"still writing");
    assert_eq!(env.report()["skipped_by_reason"]["open_by_process"], 1);
    // The line names the holder, as `fuser` would have.
    let line = format!(
        "skipped \"held.log\": open in another process: pid {} (sleep)\n",
        child.id()
    );
    let log = env.log_text();
    assert!(log.contains(&line), "{line:?} not in {log}");
    child.kill().unwrap();
    child.wait().unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("held.log").map(Vec::as_slice),
        Some(&b"still writing"[..])
    );
}

/// Runs Shuttle over `file` (an hour old), pausing at kill point `at` while a writer
/// opens the file; returns the run's stderr, once it has exited 0, and the writer's
/// pid. Kill points exist only in `crashpoints` builds.
#[cfg(feature = "crashpoints")]
fn run_with_a_writer_from(env: &Env, file: &std::path::Path, at: &str) -> (String, u32) {
    age(file, 3600);
    let mut cmd = env.run_command();
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let (run, resume) = env.spawn_paused(cmd, at);
    let mut writer = writer_holding(file);
    std::fs::write(&resume, b"").unwrap();
    let out = run.wait_with_output().unwrap();
    let _ = writer.kill();
    let _ = writer.wait();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    (stderr, writer.id())
}

/// A writer that opens a file after discovery found it closed: the read lease taken
/// before the copy is refused, nothing is copied, the file stays whole, and both the
/// report and the log name the writer. (Pauses before admission: a kill point,
/// which exists only in builds with the `crashpoints` feature.)
#[cfg(feature = "crashpoints")]
#[test]
fn a_file_opened_for_writing_after_discovery_stays_and_its_writer_is_named() {
    let env = Env::new();
    let late = env.drop_file("late.log", b"first part");
    let (stderr, writer) = run_with_a_writer_from(&env, &late, "journal: before file_admitted");
    assert!(Env::tree(&env.dst).is_empty(), "nothing delivered");
    assert!(Env::tree(&env.quarantine).is_empty(), "no copy left");
    assert_eq!(std::fs::read(&late).unwrap(), b"first part");
    let rep = env.report();
    assert_eq!(rep["skipped_by_reason"]["open_by_process"], 1);
    let why = format!(
        "source is open for writing in another process: pid {writer} (sleep); left for a later run"
    );
    let entry = &rep["file_results"][0];
    assert_eq!(entry["path"], "late.log");
    assert_eq!(entry["outcome"], "skipped");
    assert_eq!(entry["error"], why.as_str());
    assert!(
        env.log_text()
            .contains(&format!("skipped \"late.log\": {why}")),
        "{stderr}"
    );
}

/// A writer that opens a source after its copy was delivered and recorded, just
/// before the source's removal: the delivery stands, the source is kept whole, and
/// the report names the writer. (Pauses at a kill point: `crashpoints` builds only.)
#[cfg(feature = "crashpoints")]
#[test]
fn a_source_opened_for_writing_before_its_removal_is_kept_and_its_writer_is_named() {
    let env = Env::new();
    let src = env.drop_file("log.txt", b"delivered bytes");
    let (_, writer) =
        run_with_a_writer_from(&env, &src, "commit: journaled, before source removal");
    assert_eq!(
        Env::tree(&env.dst).get("log.txt").map(Vec::as_slice),
        Some(&b"delivered bytes"[..])
    );
    assert_eq!(std::fs::read(&src).unwrap(), b"delivered bytes");
    let rep = env.report();
    assert_eq!(rep["sources_kept"][0]["path"], "log.txt");
    assert_eq!(
        rep["sources_kept"][0]["reason"],
        format!("source is open for writing in another process: pid {writer} (sleep); kept")
            .as_str()
    );
}

#[test]
fn a_fresh_file_waits_until_it_is_stability_seconds_old() {
    let mut env = Env::new();
    env.set("stability_seconds", "2");
    std::fs::write(env.src.join("fresh.txt"), b"new").unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    assert_eq!(env.report()["skipped_by_reason"]["recently_modified"], 1);
    // The log says when the file will be old enough, and the setting that decides it:
    // in 2 s (1 s on a machine slow enough to take over a second to get there; the
    // rounding is the unit test's).
    let log = env.log_text();
    assert!(
        ["2", "1"].iter().any(|s| log.contains(&format!(
            "\"fresh.txt\": modified too recently (stability check): old enough in {s} s if unchanged (stability_seconds = 2)"
        ))),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(2100));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).contains_key("fresh.txt"));
    // skip_stability_check turns it off.
    std::fs::write(env.src.join("now.txt"), b"now").unwrap();
    let r = env.run(&["--skip-stability-check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).contains_key("now.txt"));
}

#[test]
fn clamd_unreachable_touches_nothing_and_exits_1() {
    let mut env = Env::new();
    env.set("clamd_socket", "/nonexistent/clamd.sock");
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("clamd at unix socket /nonexistent/clamd.sock"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("no file was touched"), "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    assert_eq!(std::fs::read(env.src.join("a.txt")).unwrap(), b"a");
    assert_eq!(env.report()["exit_code"], 1);
}

#[test]
fn bad_config_values_exit_2_naming_key_value_and_origin() {
    let mut env = Env::new();
    env.drop_file("a.txt", b"a");
    env.set("max_scan_threads", "banana");
    let r = env.run(&[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("max_scan_threads") && r.stderr.contains("\"banana\""),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("{} line", env.config.display())),
        "{}",
        r.stderr
    );
    env.set("max_scan_threads", "2");
    let r = env.run(&["--throttle", "maybe"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("flag --throttle"), "{}", r.stderr);
    let r = env.run(&["--throttle-free-space-mb=-5"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("throttle_free_space_mb"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(env.src.join("a.txt")).unwrap(),
        b"a",
        "nothing touched"
    );
    assert!(Env::tree(&env.dst).is_empty());
}

#[test]
fn nested_or_identical_directories_exit_2_before_any_file_is_touched() {
    let env = Env::new();
    env.drop_file("a.txt", b"a");
    let inside = env.src.join("q");
    std::fs::create_dir(&inside).unwrap();
    let r = env.run(&["--quarantine-path", inside.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("quarantine_path") && r.stderr.contains("inside source_path"),
        "{}",
        r.stderr
    );
    let r = env.run(&["--destination-path", env.src.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("same directory"), "{}", r.stderr);
    assert!(env.src.join("a.txt").exists());
}

#[test]
fn config_is_found_by_alias_env_var_and_default_location() {
    let env = Env::new();
    env.drop_file("a.txt", b"a");
    let r = env.shuttle(&["run", "--settings-path", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    env.drop_file("b.txt", b"b");
    let r = Run::from(
        env.command(&["run"])
            .env("SHUTTLE_CONFIG_PATH", &env.config)
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    env.drop_file("c.txt", b"c");
    let home_conf = env.root().join(".config/shuttle/config.conf");
    std::fs::create_dir_all(home_conf.parent().unwrap()).unwrap();
    std::fs::copy(&env.config, &home_conf).unwrap();
    let r = env.shuttle(&["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 3);
}

#[test]
fn a_second_run_exits_3_naming_the_holder_and_a_killed_holder_blocks_nothing() {
    let env = Env::new();
    env.drop_file("a.txt", b"a");
    let lock = env.root().join("shuttle.lock");
    // --no-fork: the one process that holds the lock is the one killed below.
    let mut holder = Command::new("flock")
        .args(["-x", "--no-fork"])
        .arg(&lock)
        .arg("-c")
        .arg(format!("echo $$ > {}; exec sleep 60", lock.display()))
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(&lock).unwrap().trim().to_string();
    let r = env.run(&[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("another shuttle run is active (pid {pid})")),
        "{}",
        r.stderr
    );
    assert!(env.src.join("a.txt").exists());
    // SIGKILL the holder: the kernel drops the flock, the next run goes ahead.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).contains_key("a.txt"));
}

#[test]
fn an_existing_different_file_is_never_overwritten_and_same_bytes_are_not_duplicated() {
    let mut env = Env::new();
    std::fs::write(env.dst.join("report.csv"), b"older report").unwrap();
    std::fs::write(env.dst.join("same.txt"), b"same").unwrap();
    env.drop_file("report.csv", b"new report");
    env.drop_file("same.txt", b"same");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst["report.csv"], b"older report");
    assert_eq!(dst["report_1.csv"], b"new report");
    assert_eq!(dst["same.txt"], b"same");
    assert_eq!(dst.len(), 3, "{:?}", dst.keys());
    // skip: not delivered, source kept.
    env.set("on_conflict", "skip");
    env.drop_file("report.csv", b"third version");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(env.src.join("report.csv")).unwrap(),
        b"third version"
    );
    assert_eq!(Env::tree(&env.dst)["report.csv"], b"older report");
    // overwrite: replaced.
    env.set("on_conflict", "overwrite");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst)["report.csv"], b"third version");
}

#[test]
fn modes_keep_owner_and_group_bits_but_never_world_or_setuid() {
    let env = Env::new();
    let p = env.drop_file("tool.sh", b"#!/bin/sh\n");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o6755)).unwrap();
    let q = env.drop_file("data.txt", b"d");
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o640)).unwrap();
    age(&p, 3600);
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(mode(&env.dst.join("tool.sh")), 0o750);
    assert_eq!(mode(&env.dst.join("data.txt")), 0o640);
    assert_eq!(
        std::fs::metadata(env.dst.join("tool.sh"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime,
        "mtime preserved"
    );
}

#[test]
fn sources_stay_when_delete_is_off() {
    let mut env = Env::new();
    env.set("delete_source_files_after_copying", "false");
    env.drop_file("keep.txt", b"k");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.src.join("keep.txt").exists());
    assert!(env.dst.join("keep.txt").exists());
}

#[test]
fn instream_over_tcp_scans_and_a_stream_over_the_limit_fails_never_clean() {
    let mut env = Env::new();
    env.unset("clamd_socket");
    env.set("clamd_address", &clamd().tcp);
    // clamd's configuration unread: Shuttle assumes a 25 MiB StreamMaxLength, so the
    // 1 MiB stream reaches clamd, which refuses it.
    env.set("clamd_config", "/nonexistent/clamd.conf");
    env.drop_file("small.txt", b"small");
    env.drop_file("eicar.com", EICAR);
    let big = noise((STREAM_MAX + 4096) as usize, 7);
    env.drop_file("big.bin", &big);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "a failed file makes exit 1: {}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.keys().collect::<Vec<_>>(), ["small.txt"]);
    assert_eq!(
        std::fs::read(env.src.join("big.bin")).unwrap(),
        big,
        "failed file stays in source"
    );
    let rep = env.report();
    assert_eq!(rep["files"]["failed"], 1);
    assert_eq!(rep["files"]["suspect"], 1);
    assert!(r.stderr.contains("size limit"), "{}", r.stderr);
    assert!(Env::tree(&env.quarantine).is_empty());
}

#[test]
fn check_reports_ok_or_every_problem() {
    let env = Env::new();
    let r = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("ok: scanner clamav answers: ClamAV"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("canary detected"), "{}", r.stdout);
    let r = env.shuttle(&[
        "check",
        "--config",
        env.config.to_str().unwrap(),
        "--clamd-socket",
        "/nonexistent.sock",
        "--destination-path",
        "/nonexistent/dst",
    ]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stdout
            .contains("problem: destination_path /nonexistent/dst"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("problem: scanner clamav"), "{}", r.stdout);
    assert!(r.stdout.contains("2 problem(s)"), "{}", r.stdout);
}

#[test]
fn journal_records_lifecycle_hashes_and_engine_version() {
    let env = Env::new();
    env.drop_file("a.txt", b"alpha");
    env.drop_file("e.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = shuttle::journal::SqliteJournal::open(&env.state).unwrap();
    let rows: Vec<(String, String, String, String, i64, String)> = {
        let mut st = j
            .connection()
            .prepare("SELECT rel_path, sha256, outcome, disposition, source_removed, scan_results FROM files ORDER BY rel_path")
            .unwrap();
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "a.txt");
    assert_eq!(
        rows[0].1,
        "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"
    );
    assert_eq!(
        (rows[0].2.as_str(), rows[0].3.as_str(), rows[0].4),
        ("clean", "delivered", 1)
    );
    assert!(rows[0].5.contains("\"version\":\"ClamAV "), "{}", rows[0].5);
    assert_eq!(
        (rows[1].2.as_str(), rows[1].3.as_str()),
        ("suspect", "deleted")
    );
    let runs = j.last_runs(1).unwrap();
    assert_eq!(runs[0].exit_code, Some(0));
}

#[test]
fn a_log_file_per_run_is_written_in_log_path() {
    let env = Env::new();
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 0);
    let names: Vec<String> = std::fs::read_dir(&env.logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // shuttle_YYYYMMDD_HHMMSS_<pid>.log
    let parts: Vec<&str> = names[0].trim_end_matches(".log").split('_').collect();
    assert_eq!(parts.len(), 4, "{names:?}");
    assert_eq!(parts[0], "shuttle");
    assert!(parts[1].len() == 8 && parts[2].len() == 6, "{names:?}");
    assert!(
        parts[1..]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit())),
        "{names:?}"
    );
    assert!(env.log_text().contains("run finished (exit 0)"));
}

#[test]
fn a_run_killed_mid_copy_leaves_nothing_blocking_and_the_rerun_delivers_once() {
    let mut env = Env::new();
    env.set("max_scan_threads", "1");
    let big = noise(64 << 20, 3);
    env.drop_file("big.bin", &big);
    env.drop_file("small.txt", b"small");
    let mut child = env
        .command(&["run", "--config", env.config.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the quarantine holds a temp file (mid-copy) or after 2 s.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if Env::tree(&env.quarantine)
            .keys()
            .any(|k| k.contains(".shuttle-tmp."))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.len(), 2, "{:?}", dst.keys());
    assert_eq!(dst["big.bin"], big);
    assert!(Env::tree(&env.quarantine).is_empty());
    assert!(Env::tree(&env.src).is_empty());
}

#[test]
fn a_source_appended_to_during_its_copy_is_not_delivered_and_stays_whole() {
    let mut env = Env::new();
    env.set("skip_stability_check", "true");
    let path = env.drop_file("growing.log", &noise(48 << 20, 11));
    // Appends a line every few milliseconds, opening and closing the file each time
    // (so the open-file check cannot see it between appends).
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg("while :; do echo more >> \"$0\"; sleep 0.002; done")
        .arg(&path)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let r = env.run(&[]);
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !env.dst.join("growing.log").exists(),
        "a changing file is never delivered"
    );
    assert!(
        Env::tree(&env.quarantine).is_empty(),
        "its copy was dropped"
    );
    let rep = env.report();
    let skipped = rep["skipped_by_reason"]["changed_or_conflict"]
        .as_u64()
        .unwrap_or(0)
        + rep["skipped_by_reason"]["open_by_process"]
            .as_u64()
            .unwrap_or(0);
    assert_eq!(skipped, 1, "{rep}");
    let data = std::fs::read(&path).unwrap();
    assert!(
        data.len() > 48 << 20 && data.ends_with(b"more\n"),
        "source intact and still growing"
    );
}

#[test]
fn empty_source_subdirectories_untouched_for_5_minutes_go_but_never_the_root() {
    let env = Env::new();
    for d in ["old/empty/deeper", "fresh-empty", "old-with-file"] {
        std::fs::create_dir_all(env.src.join(d)).unwrap();
    }
    std::fs::write(
        env.src.join("old-with-file/keep.txt"),
        b"still being written",
    )
    .unwrap();
    let ten_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(600);
    for d in ["old/empty/deeper", "old/empty", "old", "old-with-file"] {
        std::fs::File::open(env.src.join(d))
            .unwrap()
            .set_modified(ten_minutes_ago)
            .unwrap();
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !env.src.join("old/empty/deeper").exists(),
        "empty and old: removed"
    );
    assert!(
        env.src.join("fresh-empty").is_dir(),
        "touched within 5 minutes: kept"
    );
    assert!(
        env.src.join("old-with-file/keep.txt").exists(),
        "not empty: kept"
    );
    assert!(env.src.is_dir(), "the source root is never removed");
}

/// A file waiting for its batch to become durable holds no descriptor: under a limit
/// of 64 open files, a run of 1,100 files (a first batch of 512) delivers every one.
#[test]
fn a_run_of_many_files_fits_a_low_open_file_limit() {
    let mut env = Env::new();
    env.set("max_scan_threads", "4");
    let files: Vec<(String, Vec<u8>)> = (0..1100)
        .map(|i| (format!("d{}/f{i}.bin", i % 3), noise(512, i)))
        .collect();
    for (rel, bytes) in &files {
        env.drop_file(rel, bytes);
    }
    let shuttle = env.run_command();
    let out = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg("--")
        .arg(shuttle.get_program())
        .args(shuttle.get_args())
        .env_remove("SHUTTLE_CONFIG_PATH")
        .env("HOME", env.root())
        .stdin(Stdio::null())
        .output()
        .expect("prlimit (util-linux) runs");
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.len(), 1100, "{}", r.stderr);
    for (rel, bytes) in &files {
        assert_eq!(dst.get(rel.as_str()), Some(bytes), "{rel}");
    }
    assert!(Env::tree(&env.src).is_empty(), "every source removed");
    assert_eq!(env.report()["files"]["clean"], 1100);
}

#[test]
fn sigterm_stops_a_run_after_the_file_in_flight_and_leaves_the_rest_for_the_next() {
    let mut env = Env::new();
    env.set("max_scan_threads", "1");
    let mut dropped = Vec::new();
    for i in 0..5 {
        let body = format!("file {i}\n").repeat(100);
        env.drop_file(&format!("f{i}.txt"), body.as_bytes());
        dropped.push((format!("f{i}.txt"), body));
    }
    let mut cmd = env.run_command();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Paused with the first file copied into the quarantine, before its scan.
    let (child, resume) = env.spawn_paused(cmd, "scan: quarantined, before scan");
    term(&child);
    std::fs::write(&resume, b"").unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    assert_eq!(
        r.code, 0,
        "a stopped run that lost nothing exits 0: {}",
        r.stderr
    );

    // The file in flight was finished (delivered, its source removed); no other was
    // admitted, and every byte is in exactly one place.
    let rep = env.report();
    assert_eq!(rep["files"]["clean"], 1, "{rep}");
    let delivered = Env::tree(&env.dst);
    let waiting = Env::tree(&env.src);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(waiting.len(), 4, "{waiting:?}");
    for (name, body) in &dropped {
        let here = delivered.get(name).or_else(|| waiting.get(name));
        assert_eq!(here.map(Vec::as_slice), Some(body.as_bytes()), "{name}");
    }
    assert!(Env::tree(&env.quarantine).is_empty(), "quarantine emptied");
    assert!(
        r.stderr.contains("stop requested: no more files admitted"),
        "{}",
        r.stderr
    );

    // The next run takes the rest.
    let again = env.run(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 5);
    assert!(Env::tree(&env.src).is_empty());
}
