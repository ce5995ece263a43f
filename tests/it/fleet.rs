//! Fleet mode: several `shuttle run` processes (nodes), each with its own quarantine,
//! state and config, sharing one drop directory, one destination and one journal in a
//! real PostgreSQL server started here. What a user cares about: every file reaches
//! the destination exactly once with its bytes, none is lost, limits hold for the
//! fleet, and a node that dies, stalls or loses the database leaves nothing behind
//! that the next run cannot finish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::pg::Postgres;
use crate::common::{Env, clamd, noise, shuttle_bin};

/// The shared drop directory and destination.
struct Fleet {
    tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    url: String,
    /// What was dropped: relative path → bytes.
    dropped: BTreeMap<String, Vec<u8>>,
}

/// One node: its own quarantine, state, logs, lock and config.
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    report: PathBuf,
}

struct Finished {
    code: i32,
    stderr: String,
    report: serde_json::Value,
}

impl Fleet {
    fn new(pg: &Postgres, files: usize) -> Fleet {
        let tmp = tempfile::Builder::new()
            .prefix("shuttle-fleet.")
            .tempdir()
            .unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let mut dropped = BTreeMap::new();
        for i in 0..files {
            let rel = format!("d{}/f{i:04}.bin", i % 10);
            let bytes = noise(4096, i as u64 + 1);
            let p = src.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &bytes).unwrap();
            crate::common::age(&p, 60);
            dropped.insert(rel, bytes);
        }
        Fleet {
            tmp,
            src,
            dst,
            url: pg.url(),
            dropped,
        }
    }

    fn node(&self, name: &str, extra: &[(&str, &str)]) -> Node {
        let dir = self.tmp.path().join(name);
        for d in ["quarantine", "logs", "state"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut settings = format!(
            "[settings]\njournal_url = {}\nfleet_node_name = {name}\nfleet_lease_seconds = 3\ndelete_source_files_after_copying = true\nmax_scan_threads = 2\n",
            self.url
        );
        let mut scanning = format!(
            "[scanning]\nclamd_socket = {}\nclamd_config = {}\n",
            clamd().socket.display(),
            clamd().conf().display()
        );
        for (k, v) in extra {
            let section = shuttle::config::keys::lookup(k)
                .map(|k| k.sections[0])
                .unwrap_or("settings");
            let line = format!("{k} = {v}\n");
            if section == "scanning" {
                scanning.push_str(&line);
            } else {
                settings.push_str(&line);
            }
        }
        let text = format!(
            "[paths]\nsource_path = {}\ndestination_path = {}\nquarantine_path = {}\nlog_path = {}\ntracking_data_path = {}\nlock_path = {}\n{settings}{scanning}",
            self.src.display(),
            self.dst.display(),
            dir.join("quarantine").display(),
            dir.join("logs").display(),
            dir.join("state").display(),
            dir.join("shuttle.lock").display(),
        );
        let config = dir.join("shuttle.conf");
        std::fs::write(&config, text).unwrap();
        Node {
            name: name.into(),
            report: dir.join("report.json"),
            config,
            dir,
        }
    }

    /// Asserts the destination holds every dropped file exactly once, byte for byte,
    /// and nothing else; and that the drop directory is empty of files.
    fn assert_all_delivered_once(&self) {
        let got = Env::tree(&self.dst);
        let missing: Vec<_> = self
            .dropped
            .keys()
            .filter(|k| !got.contains_key(*k))
            .collect();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !self.dropped.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty(),
            "{} file(s) missing from the destination, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(
            extra.is_empty(),
            "unexpected files (duplicates?): {extra:?}"
        );
        for (k, v) in &self.dropped {
            assert!(got[k] == *v, "{k}: bytes differ from what was dropped");
        }
        let left = Env::tree(&self.src);
        assert!(
            left.is_empty(),
            "sources left: {:?}",
            left.keys().take(5).collect::<Vec<_>>()
        );
    }
}

impl Node {
    fn command(&self, env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(shuttle_bin());
        c.args([
            "run",
            "--config",
            self.config.to_str().unwrap(),
            "--report-json",
            self.report.to_str().unwrap(),
        ])
        .env_remove("SHUTTLE_CONFIG_PATH")
        .env("HOME", &self.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn spawn(&self, env: &[(&str, &str)]) -> Child {
        let _ = std::fs::remove_file(&self.report);
        self.command(env).spawn().unwrap()
    }

    fn wait(&self, child: Child) -> Finished {
        let out = child.wait_with_output().unwrap();
        let report = std::fs::read_to_string(&self.report)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        Finished {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            report,
        }
    }

    fn run(&self) -> Finished {
        let c = self.spawn(&[]);
        self.wait(c)
    }
}

fn clean(f: &Finished) -> u64 {
    f.report["files"]["clean"].as_u64().unwrap_or(0)
}

fn count_files(dir: &Path) -> usize {
    Env::tree(dir).len()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn concurrently(fleet: &Fleet, nodes: &[Node]) -> Vec<Finished> {
    let children: Vec<_> = nodes.iter().map(|n| n.spawn(&[])).collect();
    let _ = fleet;
    nodes.iter().zip(children).map(|(n, c)| n.wait(c)).collect()
}

/// Two and then three nodes on one drop directory of 500 files: each file is delivered
/// exactly once, byte-identical, and counted clean by exactly one node.
#[test]
fn two_and_three_nodes_deliver_each_file_exactly_once() {
    let pg = Postgres::start();
    for n in [2usize, 3] {
        let fleet = Fleet::new(&pg, 500);
        let nodes: Vec<Node> = (0..n)
            .map(|i| fleet.node(&format!("n{n}-{i}"), &[]))
            .collect();
        let done = concurrently(&fleet, &nodes);
        for (node, f) in nodes.iter().zip(&done) {
            assert_eq!(f.code, 0, "{}: {}", node.name, f.stderr);
        }
        fleet.assert_all_delivered_once();
        let total: u64 = done.iter().map(clean).sum();
        assert_eq!(
            total,
            500,
            "clean counts over the nodes: {:?}",
            done.iter().map(clean).collect::<Vec<_>>()
        );
        let working = done.iter().filter(|f| clean(f) > 0).count();
        assert!(
            working >= 2,
            "the nodes shared the work: {:?}",
            done.iter().map(clean).collect::<Vec<_>>()
        );
    }
    // Nothing left claimed; the fleet's day is counted once.
    assert_eq!(
        pg.query("SELECT count(*) FROM claims WHERE state = 'claimed'"),
        "0"
    );
    assert_eq!(
        pg.query("SELECT count(*) FROM files WHERE outcome = 'clean'"),
        "1000"
    );
}

/// A node killed mid-run (SIGKILL at its 400th kill point) leaves claims that hold
/// until their lease runs out: another node leaves those files alone, then takes them
/// over after the lease and finishes them. Nothing is lost or duplicated.
#[cfg(feature = "crashpoints")]
#[test]
fn a_killed_nodes_files_are_finished_by_another_after_its_lease() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 500);
    let a = fleet.node("a", &[("fleet_lease_seconds", "5")]);
    let b = fleet.node("b", &[("fleet_lease_seconds", "5")]);
    let killed = a.wait(a.spawn(&[("SHUTTLE_CRASH_AT", "400")]));
    assert_ne!(killed.code, 0, "node a was killed");
    let held: u64 = pg
        .query("SELECT count(*) FROM claims WHERE node = 'a' AND state = 'claimed'")
        .parse()
        .unwrap();
    assert!(held > 0, "node a died holding claims");
    let first = b.run();
    assert_eq!(first.code, 0, "{}", first.stderr);
    let left = count_files(&fleet.src);
    assert!(
        left > 0,
        "a's claimed files were left to it while its lease held"
    );
    std::thread::sleep(Duration::from_secs(6));
    let second = b.run();
    assert_eq!(second.code, 0, "{}", second.stderr);
    fleet.assert_all_delivered_once();
}

/// A node stopped (SIGSTOP) at its first group commit, with files already renamed into
/// the destination, past its lease: another node takes its files over. Resumed, the
/// stopped node commits none of those (its tokens are stale), stops admitting, leaves
/// no temp file and exits 1. Every file is in the destination once, counted once.
#[cfg(feature = "crashpoints")]
#[test]
fn a_node_stopped_past_its_lease_delivers_no_duplicate() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 500);
    let a = fleet.node("a", &[]);
    let b = fleet.node("b", &[]);
    let pause = a.dir.join("pause");
    let reached = a.dir.join("pause.reached");
    let child = a.spawn(&[
        ("SHUTTLE_PAUSE_AT", "commit: synced, before journal"),
        ("SHUTTLE_PAUSE_FILE", pause.to_str().unwrap()),
    ]);
    wait_for("a's first commit", Duration::from_secs(30), || {
        reached.exists()
    });
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let delivered_by_a = count_files(&fleet.dst);
    assert!(
        delivered_by_a > 0,
        "a had delivered files before its commit"
    );
    std::thread::sleep(Duration::from_secs(4));
    let bf = b.run();
    assert_eq!(bf.code, 0, "{}", bf.stderr);
    std::fs::write(&pause, "").unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    let af = a.wait(child);
    assert_eq!(af.code, 1, "a lost its lease: {}", af.stderr);
    assert!(
        af.stderr.contains("lease lost") || af.stderr.contains("claim lost"),
        "{}",
        af.stderr
    );
    // b took over every file except any a held open when it was stopped (b leaves a
    // file another process has open); a, resumed, commits only those: its other
    // tokens are stale. Together: each file counted once.
    let held_open = bf.report["skipped_by_reason"]["open_by_process"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(clean(&bf) + held_open, 500, "b: {}", bf.report["files"]);
    assert!(
        clean(&af) <= held_open,
        "a committed files b had taken over: {}",
        clean(&af)
    );
    assert_eq!(clean(&af) + clean(&bf), 500);
    let temps = Env::tree(&a.dir.join("quarantine"));
    assert!(
        temps.is_empty(),
        "a left temp files: {:?}",
        temps.keys().collect::<Vec<_>>()
    );
    fleet.assert_all_delivered_once();
}

/// A fleet-wide daily limit is exact under concurrency: three nodes, a limit of 100
/// files a day, 500 files: exactly 100 are delivered, the rest stay in the source.
#[test]
fn a_fleet_wide_daily_limit_is_exact_under_concurrency() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 500);
    let limits = [
        ("throttle", "true"),
        ("throttle_free_space_mb", "0"),
        ("throttle_max_file_count_per_day", "100"),
    ];
    let nodes: Vec<Node> = (0..3)
        .map(|i| fleet.node(&format!("n{i}"), &limits))
        .collect();
    let done = concurrently(&fleet, &nodes);
    for (node, f) in nodes.iter().zip(&done) {
        assert_eq!(f.code, 0, "{}: {}", node.name, f.stderr);
    }
    let total: u64 = done.iter().map(clean).sum();
    assert_eq!(total, 100);
    assert_eq!(count_files(&fleet.dst), 100);
    assert_eq!(count_files(&fleet.src), 400);
    assert!(
        done.iter()
            .any(|f| f.report["throttle"]["reason"] == "daily_limit"),
        "the limit stopped admission"
    );
    // A later run the same day admits nothing more.
    let again = nodes[0].run();
    assert_eq!(clean(&again), 0);
    assert_eq!(count_files(&fleet.dst), 100);
}

/// PostgreSQL restarted mid-run: the nodes stop admitting and exit 1 saying the
/// journal failed; nothing is lost; the next runs finish every file exactly once.
#[test]
fn postgresql_restarted_mid_run_loses_and_duplicates_nothing() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 500);
    let nodes: Vec<Node> = (0..2)
        .map(|i| fleet.node(&format!("n{i}"), &[("max_scan_threads", "1")]))
        .collect();
    let children: Vec<_> = nodes.iter().map(|n| n.spawn(&[])).collect();
    wait_for("the first deliveries", Duration::from_secs(30), || {
        count_files(&fleet.dst) >= 30
    });
    pg.restart();
    let done: Vec<Finished> = nodes.iter().zip(children).map(|(n, c)| n.wait(c)).collect();
    assert!(
        count_files(&fleet.src) > 0,
        "the restart came before the nodes had finished"
    );
    for f in &done {
        assert_eq!(f.code, 1, "{}", f.stderr);
        assert!(
            f.stderr.contains("journal"),
            "the message names the journal: {}",
            f.stderr
        );
    }
    let again = concurrently(&fleet, &nodes);
    for f in &again {
        assert_eq!(f.code, 0, "{}", f.stderr);
    }
    fleet.assert_all_delivered_once();
}

/// `shuttle status --json` shows the fleet: both nodes with a heartbeat, nothing in
/// flight after the runs, and today's fleet totals.
#[test]
fn status_shows_the_fleet() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 20);
    let a = fleet.node("a", &[]);
    let b = fleet.node("b", &[]);
    let done = concurrently(&fleet, &[a, b]);
    assert!(done.iter().all(|f| f.code == 0));
    let a = fleet.node("a", &[]);
    let out = Command::new(shuttle_bin())
        .args(["status", "--json", "--config", a.config.to_str().unwrap()])
        .env("HOME", &a.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = s["fleet"]["nodes"].as_array().unwrap();
    let names: Vec<_> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "idle" && n["heartbeat_age_seconds"].as_i64().unwrap() < 60)
    );
    assert_eq!(s["fleet"]["claims_in_flight"], 0);
    let c = Command::new(shuttle_bin())
        .args(["check", "--config", a.config.to_str().unwrap()])
        .env("HOME", &a.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&c.stdout);
    assert!(
        text.contains("ok: fleet journal") && text.contains("2 node(s) known"),
        "{text}"
    );
    assert_eq!(s["fleet"]["today_files"], 20);
    let text = Command::new(shuttle_bin())
        .args(["status", "--config", a.config.to_str().unwrap()])
        .env("HOME", &a.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("fleet: 2 node(s)"), "{text}");
    // Twenty files of 4 KiB: their volume in KB, not "0.1 MB".
    assert!(text.contains("today 20 files, 80.0 KB"), "{text}");
}

/// A journal URL that cannot work is a clear error, before any file is touched: an
/// unreachable server names the URL; a URL with a password is refused as configuration.
#[test]
fn a_bad_journal_url_is_a_clear_error() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 3);
    let port = crate::common::free_port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
    let n = fleet.node("x", &[]);
    let text = std::fs::read_to_string(&n.config)
        .unwrap()
        .replace(&fleet.url, &url);
    std::fs::write(&n.config, text).unwrap();
    let f = n.run();
    assert_eq!(f.code, 1, "{}", f.stderr);
    assert!(
        f.stderr.contains(&url) && f.stderr.contains("cannot connect"),
        "{}",
        f.stderr
    );
    assert_eq!(count_files(&fleet.src), 3, "no file touched");
    // `shuttle check` says so too, and fails.
    let c = Command::new(shuttle_bin())
        .args(["check", "--config", n.config.to_str().unwrap()])
        .env("HOME", &n.dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&c.stdout).into_owned() + &String::from_utf8_lossy(&c.stderr);
    assert_eq!(c.status.code(), Some(2), "{text}");
    assert!(
        text.contains("cannot connect") && text.contains("journal_url"),
        "{text}"
    );
    let with_pw = fleet.url.replace("postgres@", "postgres:secret@");
    let text = std::fs::read_to_string(&n.config)
        .unwrap()
        .replace(&url, &with_pw);
    std::fs::write(&n.config, text).unwrap();
    let f = n.run();
    assert_eq!(f.code, 2, "{}", f.stderr);
    assert!(
        f.stderr.contains("carries a password") && !f.stderr.contains("secret"),
        "{}",
        f.stderr
    );
}

/// `shuttle journal migrate --to URL` copies a SQLite journal with its history into
/// PostgreSQL: the runs, every file record (so today's totals and `shuttle history`
/// carry over), and the ids go on from there. A second migration into the now
/// non-empty journal is refused.
#[test]
fn a_sqlite_journal_is_migrated_into_postgresql_with_its_history() {
    let pg = Postgres::start();
    let env = Env::new();
    for i in 0..3 {
        env.drop_file(&format!("m{i}.txt"), format!("file {i}").as_bytes());
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cfg = env.config.to_str().unwrap();
    let m = env.shuttle(&[
        "journal",
        "migrate",
        "--config",
        cfg,
        "--fleet-node-name",
        "first",
        "--to",
        &pg.url(),
    ]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert!(m.stdout.contains("3 files"), "{}", m.stdout);
    assert_eq!(
        pg.query("SELECT count(*) FROM files WHERE outcome = 'clean' AND node = 'first'"),
        "3"
    );
    assert_eq!(pg.query("SELECT count(*) FROM runs"), "1");
    // History reads the migrated records from PostgreSQL.
    let h = env.shuttle(&[
        "history",
        "--config",
        cfg,
        "--journal-url",
        &pg.url(),
        "m1.txt",
    ]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert!(h.stdout.contains("m1.txt"), "{}", h.stdout);
    // The node now runs on PostgreSQL: its ids continue after the migrated ones.
    env.drop_file("m3.txt", b"file 3");
    let r = env.shuttle(&[
        "run",
        "--config",
        cfg,
        "--journal-url",
        &pg.url(),
        "--fleet-node-name",
        "first",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        pg.query("SELECT min(id) FROM files WHERE rel_path = 'm3.txt'"),
        "4"
    );
    assert_eq!(
        pg.query("SELECT count(*) FROM files WHERE outcome = 'clean'"),
        "4"
    );
    let again = env.shuttle(&["journal", "migrate", "--config", cfg, "--to", &pg.url()]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("already holds"), "{}", again.stderr);
}

/// A PostgreSQL journal that a newer Shuttle migrated is refused before any file is
/// touched, with a message that says so.
#[test]
fn a_journal_from_a_newer_shuttle_is_refused() {
    let pg = Postgres::start();
    let fleet = Fleet::new(&pg, 3);
    pg.query("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (99)");
    let f = fleet.node("a", &[]).run();
    assert_eq!(f.code, 1, "{}", f.stderr);
    assert!(
        f.stderr.contains("schema version 99 is newer"),
        "{}",
        f.stderr
    );
    assert_eq!(count_files(&fleet.src), 3, "no file touched");
    assert_eq!(count_files(&fleet.dst), 0);
}
