//! `shuttle watch` (docs/design.md §6): inotify-driven passes, stability, SIGTERM.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn start_watch(env: &Env) -> Child {
    let child = env
        .command(&["watch", "--config", env.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Up and through its first pass.
    wait_until(Duration::from_secs(20), || {
        env.log_text().contains("run finished")
    });
    child
}

/// Waits for the process to exit; its exit code.
fn exit_code(mut child: Child, limit: Duration) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("watch did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of regular files below `dir` (no contents read).
fn names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(
                    e.path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                ),
                _ => {}
            }
        }
    }
    out
}

#[test]
fn a_file_dropped_while_watching_is_delivered_within_stability_plus_2s() {
    let mut env = Env::new();
    env.set("stability_seconds", "1");
    env.set("rescan_interval_seconds", "60");
    let child = start_watch(&env);

    // In a subdirectory created after the watch started (recursive watches).
    let data = noise(300_000, 7);
    std::fs::create_dir_all(env.src.join("new/deeper")).unwrap();
    std::fs::write(env.src.join("new/deeper/x.bin"), &data).unwrap();
    let closed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || env
            .dst
            .join("new/deeper/x.bin")
            .exists()),
        "not delivered: {}",
        env.log_text()
    );
    let took = closed.elapsed();
    eprintln!("dropped file delivered {took:?} after close (stability_seconds = 1)");
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        std::fs::read(env.dst.join("new/deeper/x.bin")).unwrap(),
        data
    );

    // A file written slowly (kept open) is taken only once closed and stable.
    let slow = env.src.join("slow.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&slow).unwrap();
        for i in 0..3 {
            f.write_all(&noise(10_000, 100 + i)).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            assert!(!env.dst.join("slow.bin").exists(), "taken while open");
        }
    }
    let closed = Instant::now();
    assert!(wait_until(Duration::from_secs(6), || env
        .dst
        .join("slow.bin")
        .exists()));
    let took = closed.elapsed();
    eprintln!("slowly written file delivered {took:?} after close");
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    assert!(
        wait_until(Duration::from_secs(2), || !slow.exists()),
        "source removed after delivery"
    );

    // Idle: no busy loop (CPU time stays tiny while nothing happens).
    let pid = child.id();
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu(pid) - before;
    assert!(ticks < 20, "idle watch used {ticks} clock ticks in 3 s");

    term(&child);
    assert_eq!(exit_code(child, Duration::from_secs(10)), 0);
    assert!(env.log_text().contains("lock released"));
    // The lock is free again.
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn sigterm_during_a_large_copy_finishes_it_cleanly_and_admits_nothing_more() {
    let mut env = Env::new();
    let dst = Tmpfs::mount(&env.root().join("mnt-dst"), 400);
    env.set("destination_path", dst.dir.to_str().unwrap());
    env.set("max_scan_threads", "1");
    env.set("throttle_max_file_volume_per_run_mb", "0");
    let big = noise(200 << 20, 1);
    let second = noise(20 << 20, 2);
    env.drop_file("big.bin", &big);
    env.drop_file("second.bin", &second);
    crate::common::age(&env.src.join("big.bin"), 600); // oldest first: big.bin is admitted first

    let child = env
        .command(&["watch", "--config", env.config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SIGTERM as soon as the copy into the quarantine is under way.
    let caught = wait_until(Duration::from_secs(20), || {
        !names(&env.quarantine).is_empty()
    });
    let t = Instant::now();
    term(&child);
    eprintln!("SIGTERM sent; copy in progress seen: {caught}");
    assert_eq!(exit_code(child, Duration::from_secs(120)), 0);
    eprintln!("watch exited {:?} after SIGTERM", t.elapsed());

    assert!(names(&env.quarantine).is_empty(), "quarantine emptied");
    let delivered = names(&dst.dir);
    eprintln!("after SIGTERM: delivered {delivered:?}");
    // Nothing partial under a final name: either all of big.bin or nothing.
    assert!(delivered.len() <= 1, "{delivered:?}");
    match delivered.first().map(String::as_str) {
        Some("big.bin") => {
            assert!(
                std::fs::read(dst.dir.join("big.bin")).unwrap() == big,
                "complete"
            );
        }
        Some(other) => panic!("unexpected {other}"),
        None => assert!(
            std::fs::read(env.src.join("big.bin")).unwrap() == big,
            "source intact"
        ),
    }
    if delivered.is_empty() {
        assert!(env.src.join("big.bin").exists());
    }
    assert!(
        std::fs::read(env.src.join("second.bin")).unwrap() == second,
        "the waiting file was not admitted and is untouched"
    );
    let log = env.log_text();
    assert!(log.contains("stop requested"), "{log}");
}

#[test]
fn throttled_watch_waits_without_spinning_mails_once_and_resumes_when_space_frees() {
    let smtp = crate::common::smtp::Smtp::start(crate::common::smtp::Mode::Normal);
    let mut env = Env::new();
    let dst = Tmpfs::mount(&env.root().join("mnt-dst"), 64);
    env.set("destination_path", dst.dir.to_str().unwrap());
    env.set("throttle", "true");
    env.set("throttle_free_space_mb", "40");
    env.set("throttle_max_file_count_per_run", "0");
    env.set("throttle_max_file_volume_per_run_mb", "0");
    env.set("rescan_interval_seconds", "1");
    env.set("stability_seconds", "1");
    env.set("notify", "true");
    env.set("smtp_server", "127.0.0.1");
    env.set("smtp_port", &smtp.port.to_string());
    env.set("use_tls", "false"); // the test server offers no STARTTLS
    env.set("sender_email", "shuttle@example.invalid");
    env.set("recipient_email", "admin@example.invalid");
    let ballast = dst.dir.join("ballast");
    std::fs::write(&ballast, noise(30 << 20, 5)).unwrap();
    let data = noise(1 << 20, 6);
    env.drop_file("wait.bin", &data);

    let child = start_watch(&env);
    std::thread::sleep(Duration::from_secs(4));
    let log = env.log_text();
    let passes = log.matches("run finished").count();
    assert!(
        (2..=8).contains(&passes),
        "one pass per rescan while throttled: {passes}"
    );
    assert!(env.src.join("wait.bin").exists(), "still waiting");
    let throttle_mails = smtp
        .mails()
        .iter()
        .filter(|m| m.subject().starts_with("Shuttle throttled"))
        .count();
    assert_eq!(throttle_mails, 1, "the same throttle stop is mailed once");

    std::fs::remove_file(&ballast).unwrap();
    let freed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || dst.dir.join("wait.bin").exists()),
        "resumes when space frees: {}",
        env.log_text()
    );
    eprintln!(
        "delivered {:?} after space was freed (rescan 1 s)",
        freed.elapsed()
    );
    assert_eq!(std::fs::read(dst.dir.join("wait.bin")).unwrap(), data);
    term(&child);
    assert_eq!(exit_code(child, Duration::from_secs(10)), 0);
}
