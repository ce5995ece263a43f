//! Crash safety: kill `shuttle run` with SIGKILL at every kill point (and at random
//! times), run again, and check that no file was lost, duplicated or half-delivered.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

struct Corpus {
    /// What the destination must hold after the rerun (relative path → bytes).
    expected_dst: BTreeMap<String, Vec<u8>>,
}

fn drop_corpus(env: &Env, dst: &std::path::Path, big: usize) -> Corpus {
    let mut files = BTreeMap::new();
    files.insert("a.txt".to_string(), b"alpha".to_vec());
    files.insert("lab/run/b.csv".to_string(), noise(20_000, 1));
    files.insert("big.bin".to_string(), noise(big, 2));
    files.insert("lab/eicar.com".to_string(), EICAR.to_vec());
    files.insert("marker.dat".to_string(), MARKER.to_vec());
    files.insert("report.csv".to_string(), b"new report".to_vec());
    for (rel, data) in &files {
        env.drop_file(rel, data);
    }
    // A different file already holds one name: the new one gets `_1`, exactly once.
    std::fs::write(dst.join("report.csv"), b"older report").unwrap();
    let mut expected_dst = BTreeMap::new();
    for rel in ["a.txt", "lab/run/b.csv", "big.bin"] {
        expected_dst.insert(rel.to_string(), files[rel].clone());
    }
    expected_dst.insert("report.csv".into(), b"older report".to_vec());
    expected_dst.insert("report_1.csv".into(), b"new report".to_vec());
    Corpus { expected_dst }
}

/// After a completed rerun: every clean file exactly once in the destination under
/// its own name, suspects nowhere, sources gone, quarantine empty, no temp files, and
/// the journal agreeing with the disk.
fn check_after_rerun(env: &Env, corpus: &Corpus, dst: &std::path::Path, label: &str) {
    let got = Env::tree(dst);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        corpus.expected_dst.keys().collect::<Vec<_>>(),
        "{label}: destination names"
    );
    for (k, v) in &corpus.expected_dst {
        assert!(got[k] == *v, "{label}: {k} byte-identical");
    }
    assert!(
        Env::tree(&env.src).is_empty(),
        "{label}: sources removed: {:?}",
        Env::tree(&env.src).keys()
    );
    let q = Env::tree(&env.quarantine);
    assert!(q.is_empty(), "{label}: quarantine empty: {:?}", q.keys());
    let j = shuttle::journal::SqliteJournal::open(&env.state).unwrap();
    let open: i64 = j
        .connection()
        .query_row(
            "SELECT COUNT(*) FROM files WHERE outcome IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(open, 0, "{label}: no unfinished journal entries");
    for rel in corpus.expected_dst.keys().filter(|k| *k != "report.csv") {
        let path = dst.join(rel).display().to_string();
        let n: i64 = j
            .connection()
            .query_row(
                "SELECT COUNT(*) FROM files WHERE outcome = 'clean' AND final_path = ?1",
                [&path],
                |r| r.get(0),
            )
            .unwrap();
        assert!(n >= 1, "{label}: journal records {path} as delivered clean");
    }
}

fn crash_run(env: &Env, at: u64) -> (i32, String) {
    let o = env
        .command(&["run", "--config", env.config.to_str().unwrap()])
        .env("SHUTTLE_CRASH_AT", at.to_string())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-9),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Kills at point 1, 2, 3, … until a run finishes without reaching the point.
/// Returns how many distinct points were exercised.
fn sweep(label: &str, setup: &dyn Fn(&mut Env) -> Option<Tmpfs>, big: usize) -> usize {
    let mut exercised = 0;
    for at in 1u64.. {
        let mut env = Env::new();
        let mnt = setup(&mut env);
        let dst = mnt
            .as_ref()
            .map(|m| m.dir.clone())
            .unwrap_or_else(|| env.dst.clone());
        let corpus = drop_corpus(&env, &dst, big);
        let (code, stderr) = crash_run(&env, at);
        let killed = stderr.contains("killing myself");
        let point = stderr
            .lines()
            .find(|l| l.contains("killing myself"))
            .unwrap_or("")
            .to_string();
        if killed {
            assert_eq!(code, -9, "{label} at {at}: killed by SIGKILL");
            exercised += 1;
        } else {
            assert_eq!(
                code, 0,
                "{label}: a run with no kill point left must succeed: {stderr}"
            );
        }
        let r = env.run(&[]);
        assert_eq!(
            r.code, 0,
            "{label}: rerun after kill at {point}: {}",
            r.stderr
        );
        check_after_rerun(&env, &corpus, &dst, &format!("{label}, kill at {point}"));
        drop(mnt);
        if !killed {
            break;
        }
    }
    exercised
}

#[test]
fn killed_at_every_kill_point_nothing_is_lost_or_duplicated() {
    let same_fs = sweep(
        "same filesystem",
        &|env: &mut Env| {
            env.set("max_scan_threads", "1");
            None
        },
        3 << 20,
    );
    let cross_fs = sweep(
        "destination on another filesystem",
        &|env: &mut Env| {
            let mnt = Tmpfs::mount(&env.root().join("mnt-dst"), 64);
            env.set("destination_path", mnt.dir.to_str().unwrap());
            env.set("max_scan_threads", "2");
            Some(mnt)
        },
        3 << 20,
    );
    println!(
        "exercised {} kill points ({same_fs} same filesystem, {cross_fs} across filesystems)",
        same_fs + cross_fs
    );
    assert!(
        same_fs + cross_fs >= 50,
        "at least 50 kill points: {}",
        same_fs + cross_fs
    );
}

#[test]
fn killed_at_random_times_nothing_is_lost_or_duplicated() {
    let mut killed = 0;
    for round in 0..12u64 {
        let mut env = Env::new();
        env.set("max_scan_threads", "2");
        let dst = env.dst.clone();
        let corpus = drop_corpus(&env, &dst, 24 << 20);
        let mut child = env
            .command(&["run", "--config", env.config.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + (round * 37) % 160));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        let r = env.run(&[]);
        assert_eq!(r.code, 0, "rerun after random kill {round}: {}", r.stderr);
        check_after_rerun(&env, &corpus, &dst, &format!("random kill {round}"));
    }
    println!("killed {killed} of 12 runs at random times");
    assert!(
        killed >= 6,
        "most runs were still busy when killed ({killed})"
    );
}

/// The log file is written line by line by the thread that logs, nothing queued: a
/// run killed with SIGKILL while its deliveries wait for the batch's `syncfs` has
/// already logged them, though their sources are still in place; the next run
/// finishes them and its own log says what it recovered.
#[test]
fn a_run_killed_before_its_batch_is_durable_has_logged_its_deliveries() {
    let mut env = Env::new();
    env.set("max_scan_threads", "1");
    env.drop_file("a.txt", b"alpha");
    env.drop_file("lab/b.txt", b"beta");
    let mut cmd = env.run_command();
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let (mut child, _) = env.spawn_paused(cmd, "commit: before syncfs");
    child.kill().unwrap();
    child.wait().unwrap();

    let log = env.log_text();
    for line in ["clean: \"a.txt\" -> ", "clean: \"lab/b.txt\" -> "] {
        assert!(log.contains(line), "{line} in the killed run's log:\n{log}");
    }
    assert_eq!(
        Env::tree(&env.src).keys().collect::<Vec<_>>(),
        ["a.txt", "lab/b.txt"],
        "sources kept until their batch is durable"
    );

    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.len(), 2, "delivered once each: {:?}", dst.keys());
    assert_eq!(dst.get("a.txt").map(Vec::as_slice), Some(&b"alpha"[..]));
    assert_eq!(dst.get("lab/b.txt").map(Vec::as_slice), Some(&b"beta"[..]));
    assert!(
        Env::tree(&env.src).is_empty(),
        "sources removed by the rerun"
    );
    assert!(
        env.log_text()
            .contains("did not finish (crashed or killed)"),
        "the rerun's log names the killed run"
    );
}
