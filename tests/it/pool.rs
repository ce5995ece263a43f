//! The clamd pool: several real clamd processes behind one run. Every test checks
//! the two promises (nothing lost: every file in the destination or the source with
//! its exact bytes; nothing unscanned delivered) and what the report says about the
//! endpoints.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;

/// Drops `n` clean files; returns every dropped file's bytes by relative path.
fn drop_clean(env: &Env, n: usize) -> BTreeMap<String, Vec<u8>> {
    (0..n)
        .map(|i| {
            let rel = format!("d{}/f{i}.bin", i % 3);
            let bytes = noise(1000 + i * 37, i as u64 + 1);
            env.drop_file(&rel, &bytes);
            (rel, bytes)
        })
        .collect()
}

/// Nothing lost, nothing but `clean` delivered: each dropped file is in the
/// destination (only if clean) or in the source, with its exact bytes.
fn assert_safe(env: &Env, dropped: &BTreeMap<String, Vec<u8>>, clean: &[&str]) {
    let dst = Env::tree(&env.dst);
    let src = Env::tree(&env.src);
    for (rel, bytes) in dst.iter() {
        assert!(
            clean.contains(&rel.as_str()),
            "{rel} delivered but not known clean"
        );
        assert_eq!(
            Some(bytes),
            dropped.get(rel),
            "{rel} delivered with other bytes"
        );
    }
    for (rel, bytes) in dropped {
        if clean.contains(&rel.as_str()) {
            assert_eq!(dst.get(rel), Some(bytes), "{rel} not delivered");
        } else if let Some(b) = src.get(rel) {
            assert_eq!(b, bytes, "{rel} changed in the source");
        }
    }
}

fn endpoints(rep: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    rep["endpoints"]
        .as_array()
        .expect("report lists endpoints")
        .iter()
        .map(|e| (e["endpoint"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// Which endpoint scanned each file, from the report.
fn scanned_by(rep: &serde_json::Value) -> BTreeMap<String, String> {
    rep["file_results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| {
            Some((
                f["path"].as_str()?.to_string(),
                f["scanners"][0]["endpoint"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn sock(c: &Clamd) -> String {
    c.socket.display().to_string()
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn two_endpoints_share_the_files() {
    let (b, child) = Clamd::start();
    let mut env = Env::new();
    env.set("clamd_socket", &format!("{}, {}", sock(clamd()), sock(&b)));
    env.set("max_scan_threads", "4");
    let mut dropped = drop_clean(&env, 24);
    env.drop_file("bad/eicar.com", EICAR);
    dropped.insert("bad/eicar.com".into(), EICAR.to_vec());
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<String> = dropped
        .keys()
        .filter(|k| !k.ends_with("eicar.com"))
        .cloned()
        .collect();
    let clean: Vec<&str> = clean.iter().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let rep = env.report();
    let eps = endpoints(&rep);
    assert_eq!(eps.len(), 2, "{eps:?}");
    for (name, e) in &eps {
        assert_eq!(e["health"], "up", "{name}: {e}");
        assert!(e["scans"].as_u64().unwrap() > 0, "{name} did no scan: {e}");
    }
    // clamd_config describes the shared clamd only: its MaxThreads; the other gets
    // clamd's default.
    assert_eq!(eps[&sock(clamd())]["concurrency"], 8);
    assert_eq!(eps[&sock(&b)]["concurrency"], 10);
    let by = scanned_by(&rep);
    assert_eq!(by.len(), 25, "every file names its endpoint: {by:?}");
    assert!(by.values().all(|e| eps.contains_key(e)));
    // The journal too: each file's scan results and the run's endpoints.
    let j = rusqlite::Connection::open(env.state.join("shuttle-journal.sqlite3")).unwrap();
    let with_endpoint: i64 = j
        .query_row(
            "SELECT count(*) FROM files WHERE scan_results LIKE '%\"endpoint\":%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(with_endpoint, 25);
    let recorded: Vec<(String, String, i64)> = j
        .prepare("SELECT endpoint, health, scans FROM run_endpoints ORDER BY endpoint")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    for (name, health, scans) in &recorded {
        assert_eq!(health, "up");
        assert_eq!(*scans as u64, eps[name]["scans"].as_u64().unwrap());
    }
    stop(child);
}

#[test]
fn three_endpoints_over_sockets_and_tcp_all_scan() {
    let (b, cb) = Clamd::start();
    let (c, cc) = Clamd::start();
    let mut env = Env::new();
    env.set("clamd_socket", &format!("{},{}", sock(clamd()), sock(&b)));
    env.set("clamd_address", &c.tcp);
    env.set("max_scan_threads", "6");
    env.set("clamd_endpoint_concurrency", "2");
    let dropped = drop_clean(&env, 30);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let rep = env.report();
    let eps = endpoints(&rep);
    assert_eq!(eps.len(), 3);
    for (name, e) in &eps {
        assert_eq!(e["health"], "up", "{name}: {e}");
        assert_eq!(e["concurrency"], 2);
        assert!(e["scans"].as_u64().unwrap() > 0, "{name} did no scan: {e}");
    }
    assert!(scanned_by(&rep).values().any(|e| *e == c.tcp));
    // `shuttle check` lists each endpoint with its version and health.
    let out = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    for name in eps.keys() {
        assert!(
            out.stdout
                .contains(&format!("ok: clamd endpoint {name}: up, ClamAV ")),
            "{}",
            out.stdout
        );
    }
    stop(cb);
    stop(cc);
}

#[test]
fn a_dead_endpoint_is_named_and_the_others_carry_the_run() {
    let mut env = Env::new();
    let dead = env.root().join("nobody-here.sock");
    env.set(
        "clamd_socket",
        &format!("{},{}", sock(clamd()), dead.display()),
    );
    let dropped = drop_clean(&env, 6);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let eps = endpoints(&env.report());
    let d = &eps[&dead.display().to_string()];
    assert_eq!(d["health"], "unreachable", "{d}");
    assert_eq!(d["scans"], 0);
    assert!(
        r.stderr.contains(&format!(
            "clamd endpoint {}: NOT USED (unreachable)",
            dead.display()
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn no_usable_endpoint_stops_the_run_before_any_file_is_touched() {
    let mut env = Env::new();
    let a = env.root().join("a.sock");
    let b = env.root().join("b.sock");
    env.set("clamd_socket", &format!("{},{}", a.display(), b.display()));
    drop_clean(&env, 3);
    let before = Env::tree(&env.src);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("no usable clamd endpoint"),
        "{}",
        r.stderr
    );
    assert_eq!(Env::tree(&env.src), before, "nothing touched");
    assert!(Env::tree(&env.dst).is_empty());
}

#[test]
fn an_endpoint_with_older_signatures_gets_no_scan() {
    let (old, child) =
        Clamd::start_with(DEFAULT_LIMITS, &["--age-days", "3", "--version", "27449"]);
    let mut env = Env::new();
    env.set("clamd_socket", &format!("{},{}", sock(&old), sock(clamd())));
    let dropped = drop_clean(&env, 8);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let rep = env.report();
    let eps = endpoints(&rep);
    let o = &eps[&sock(&old)];
    assert_eq!(o["health"], "behind", "{o}");
    assert!(o["why"].as_str().unwrap().contains("older than"), "{o}");
    assert_eq!(o["scans"], 0, "{o}");
    assert!(scanned_by(&rep).values().all(|e| *e == sock(clamd())));
    stop(child);
}

#[test]
fn an_endpoint_too_old_for_the_gate_is_stale_and_alone_stops_the_run() {
    let (old, child) = Clamd::start_with(DEFAULT_LIMITS, &["--age-days", "10"]);
    let mut env = Env::new();
    env.set("clamd_socket", &format!("{},{}", sock(clamd()), sock(&old)));
    let dropped = drop_clean(&env, 4);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    assert_eq!(endpoints(&env.report())[&sock(&old)]["health"], "stale");
    // The stale one alone: the freshness gate stops the run, nothing touched.
    let mut env = Env::new();
    env.set(
        "clamd_socket",
        &format!("{},{}", sock(&old), env.root().join("x.sock").display()),
    );
    drop_clean(&env, 2);
    let before = Env::tree(&env.src);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("signatures too old"), "{}", r.stderr);
    assert_eq!(Env::tree(&env.src), before);
    stop(child);
}

/// A fake clamd that answers PING and VERSION as the `real` one does and detects the
/// first file it is sent (the health check's canary), then answers garbage.
fn garbage_clamd(dir: &Path, real: PathBuf) -> PathBuf {
    use crate::common::fake_clamd::{Answer, serve};
    let path = dir.join("garbage.sock");
    let scans = std::sync::atomic::AtomicUsize::new(0);
    serve(&path, move |cmd| match cmd {
        b"zPING" => Answer::Reply(b"PONG".to_vec()),
        b"zVERSION" => {
            let mut r = UnixStream::connect(&real).unwrap();
            r.write_all(b"zVERSION\0").unwrap();
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            Answer::Reply(v.strip_suffix(b"\0").unwrap_or(&v).to_vec())
        }
        _ => {
            if scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Answer::Reply(b"fd[3]: Eicar-Test-Signature FOUND".to_vec())
            } else {
                Answer::Reply(b"banana split".to_vec())
            }
        }
    });
    path
}

#[test]
fn an_endpoint_answering_garbage_is_taken_out_and_its_files_scanned_elsewhere() {
    let mut env = Env::new();
    let fake = garbage_clamd(env.root(), clamd().socket.clone());
    env.set(
        "clamd_socket",
        &format!("{},{}", sock(clamd()), fake.display()),
    );
    env.set("max_scan_threads", "3");
    let metrics = env.root().join("shuttle.prom");
    env.set("metrics_path", metrics.to_str().unwrap());
    let dropped = drop_clean(&env, 12);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let rep = env.report();
    let f = &endpoints(&rep)[&fake.display().to_string()];
    assert_eq!(f["health"], "failing", "{f}");
    assert!(f["errors"].as_u64().unwrap() >= 1, "{f}");
    assert!(f["why"].as_str().unwrap().contains("banana"), "{f}");
    assert!(
        scanned_by(&rep).values().all(|e| *e == sock(clamd())),
        "garbage is never a verdict"
    );
    let m = std::fs::read_to_string(&metrics).unwrap();
    for line in [
        format!(
            "shuttle_scanner_endpoint_up{{endpoint=\"{}\"}} 0",
            fake.display()
        ),
        format!(
            "shuttle_scanner_endpoint_up{{endpoint=\"{}\"}} 1",
            sock(clamd())
        ),
        // The 12 files and the run's own canary at its start.
        format!(
            "shuttle_scanner_endpoint_scans{{endpoint=\"{}\"}} 13",
            sock(clamd())
        ),
    ] {
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    assert!(m.contains(&format!(
        "shuttle_scanner_endpoint_errors{{endpoint=\"{}\"}}",
        fake.display()
    )));
}

#[test]
fn an_endpoint_frozen_mid_run_costs_its_timeouts_not_the_run() {
    let (b, child) = Clamd::start();
    let mut env = Env::new();
    env.set("clamd_socket", &format!("{},{}", sock(clamd()), sock(&b)));
    env.set("max_scan_threads", "1");
    env.set("malware_scan_timeout_seconds", "2");
    env.set("malware_scan_retry_wait_seconds", "0");
    let dropped = drop_clean(&env, 10);
    let started = Instant::now();
    let (mut run, pause) = env.spawn_paused(env.run_command(), "scan: quarantined, before scan");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::STOP,
    )
    .unwrap();
    std::fs::write(&pause, b"").unwrap();
    let code = run.wait().unwrap().code();
    let took = started.elapsed();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::CONT,
    );
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(25), "took {took:?}");
    let clean: Vec<&str> = dropped.keys().map(String::as_str).collect();
    assert_safe(&env, &dropped, &clean);
    let rep = env.report();
    let frozen = &endpoints(&rep)[&sock(&b)];
    assert_eq!(frozen["health"], "failing", "{frozen}");
    assert!(frozen["errors"].as_u64().unwrap() >= 1, "{frozen}");
    assert!(scanned_by(&rep).values().all(|e| *e == sock(clamd())));
    let metrics_hint = env.log_text();
    assert!(
        metrics_hint.contains("NOT USED (failing)"),
        "{metrics_hint}"
    );
    stop(child);
}
