//! Disk-space throttling and limits (docs/design.md §2) on real small tmpfs mounts.

use crate::common::*;
use shuttle::journal::Journal as _;

const MIB: usize = 1 << 20;

/// An Env with throttling on and every threshold at `mb` unless overridden.
fn throttled(mb: u64) -> Env {
    let mut env = Env::new();
    env.set("throttle", "true");
    env.set("throttle_free_space_mb", &mb.to_string());
    env.set("throttle_max_file_count_per_run", "0");
    env.set("throttle_max_file_volume_per_run_mb", "0");
    env
}

fn throttle_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("THROTTLE REASON:"))
        .collect()
}

#[test]
fn destination_tmpfs_keeps_its_threshold_free_and_the_rest_waits_untouched() {
    let mut env = throttled(40);
    let mnt = Tmpfs::mount(&env.root().join("mnt-dst"), 64);
    env.set("destination_path", mnt.dir.to_str().unwrap());
    let files: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (format!("batch/f{i:02}.bin"), noise(MIB, i)))
        .collect();
    for (i, (name, data)) in files.iter().enumerate() {
        let p = env.drop_file(name, data);
        age(&p, 1000 - i as u64); // f00 oldest: admission order is f00, f01, …
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "a throttle stop is a normal end: {}", r.stderr);
    assert!(
        mnt.free_mib() >= 40.0,
        "destination keeps 40 MiB free, has {:.1}",
        mnt.free_mib()
    );
    let dst = Env::tree(&mnt.dir);
    assert!(dst.len() >= 15 && dst.len() < 30, "{} delivered", dst.len());
    for (name, data) in &files {
        match dst.get(name) {
            Some(bytes) => assert_eq!(bytes, data, "{name} byte-identical"),
            None => assert_eq!(
                &std::fs::read(env.src.join(name)).unwrap(),
                data,
                "{name} untouched in source"
            ),
        }
    }
    // Oldest first: what was delivered is a prefix of the admission order.
    let delivered: Vec<&String> = files
        .iter()
        .map(|f| &f.0)
        .filter(|n| dst.contains_key(*n))
        .collect();
    assert_eq!(
        delivered,
        files
            .iter()
            .map(|f| &f.0)
            .take(dst.len())
            .collect::<Vec<_>>()
    );
    let rep = env.report();
    assert_eq!(rep["throttle"]["stopped"], true);
    assert_eq!(rep["throttle"]["reason"], "disk_space");
    assert_eq!(
        rep["files"]["deferred"].as_u64().unwrap() as usize,
        30 - dst.len()
    );
    let log = env.log_text();
    let lines = throttle_lines(&log);
    assert_eq!(lines.len(), 1, "one THROTTLE line per run: {lines:?}");
    let line = lines[0];
    assert!(
        line.contains("ERROR") && line.contains("THROTTLE REASON: Insufficient disk space"),
        "{line}"
    );
    assert!(
        line.contains(mnt.dir.to_str().unwrap())
            && line.contains("MB free")
            && line.contains("MB required"),
        "{line}"
    );
    assert!(
        rep["throttle"]["message"]
            .as_str()
            .unwrap()
            .contains("MB free")
    );

    // Space freed: the next run delivers the rest.
    for name in dst.keys() {
        std::fs::remove_file(mnt.dir.join(name)).unwrap();
    }
    let first = dst.len();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let second = Env::tree(&mnt.dir);
    assert_eq!(
        first + second.len(),
        30,
        "every file delivered over the two runs"
    );
    assert!(Env::tree(&env.src).is_empty());
}

#[test]
fn quarantine_tmpfs_stops_admission_at_the_first_file_that_would_break_its_threshold() {
    let mut env = throttled(0);
    let mnt = Tmpfs::mount(&env.root().join("mnt-q"), 16);
    // 1 MiB of something else on the filesystem: big.bin would fit it empty (so it is
    // not set aside as too large), but not now.
    std::fs::write(mnt.dir.join("filler"), noise(MIB, 99)).unwrap();
    let q = mnt.dir.join("q");
    std::fs::create_dir(&q).unwrap();
    env.set("quarantine_path", q.to_str().unwrap());
    env.set("quarantine_free_space_mb", "10");
    for (i, (name, size)) in [
        // While a.bin is being copied its bytes are both on disk and reserved: b.bin
        // must still pass with a.bin counted twice (15 - 1.5 - 1.5 - 1.5 >= 10).
        ("a.bin", 3 * MIB / 2),
        ("b.bin", 3 * MIB / 2),
        ("big.bin", 5 * MIB + MIB / 2),
        ("c.bin", MIB),
    ]
    .iter()
    .enumerate()
    {
        let p = env.drop_file(name, &noise(*size, i as u64));
        age(&p, 100 - i as u64);
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.keys().collect::<Vec<_>>(), ["a.bin", "b.bin"]);
    assert!(
        env.src.join("big.bin").exists() && env.src.join("c.bin").exists(),
        "stop, not skip: c waits too"
    );
    let rep = env.report();
    assert_eq!(rep["throttle"]["reason"], "disk_space");
    assert!(
        rep["throttle"]["message"]
            .as_str()
            .unwrap()
            .starts_with("quarantine "),
        "{}",
        rep["throttle"]["message"]
    );
    assert_eq!(rep["files"]["deferred"], 2);
}

#[test]
fn targets_on_one_filesystem_are_checked_together() {
    let mut env = throttled(40);
    let mnt = Tmpfs::mount(&env.root().join("mnt-shared"), 64);
    let (q, d) = (mnt.dir.join("q"), mnt.dir.join("d"));
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    env.set("quarantine_path", q.to_str().unwrap());
    env.set("destination_path", d.to_str().unwrap());
    // 8 MiB used by something else. 11 MiB counted for both targets is 22 MiB:
    // 56 - 22 < 40. Counted once it would pass.
    std::fs::write(mnt.dir.join("filler"), noise(8 * MIB, 98)).unwrap();
    env.drop_file("big.bin", &noise(11 * MIB, 1));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&d).is_empty());
    let msg = env.report()["throttle"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("quarantine+destination") && msg.contains("same filesystem"),
        "{msg}"
    );
    // 10 MiB twice is 20 MiB: 64 - 20 >= 40, admitted and delivered.
    std::fs::remove_file(env.src.join("big.bin")).unwrap();
    let data = noise(7 * MIB, 2);
    env.drop_file("ok.bin", &data);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&d).get("ok.bin"), Some(&data));
}

#[test]
fn a_nearly_full_hazard_archive_stops_admission_even_for_clean_files() {
    let mut env = throttled(0);
    let mnt = Tmpfs::mount(&env.root().join("mnt-hazard"), 8);
    std::fs::write(
        mnt.dir.join("hazard_old.bin_20260101000000.gpg"),
        noise(6 * MIB, 9),
    )
    .unwrap();
    let (_home, key) = gpg_key(env.root(), "default");
    env.set("hazard_archive_path", mnt.dir.to_str().unwrap());
    env.set("hazard_encryption_key_path", key.to_str().unwrap());
    env.set("hazard_free_space_mb", "2");
    env.drop_file("clean.txt", &noise(MIB, 3));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty(), "nothing admitted");
    assert!(env.src.join("clean.txt").exists());
    let rep = env.report();
    assert_eq!(rep["throttle"]["reason"], "disk_space");
    assert!(
        rep["throttle"]["message"]
            .as_str()
            .unwrap()
            .starts_with("hazard_archive ")
    );
    // Cleanup recommendations name what Shuttle keeps on the full filesystem.
    let recs = rep["throttle"]["recommendations"].as_array().unwrap();
    assert!(
        recs[0].as_str().unwrap().contains("hazard archive")
            && recs[0].as_str().unwrap().contains("6.0 MB"),
        "{recs:?}"
    );
    assert!(
        env.log_text()
            .contains("cleanup recommendation: hazard archive"),
        "{}",
        env.log_text()
    );
}

#[test]
fn recommendations_list_leftover_quarantine_files_largest_first() {
    let mut env = throttled(0);
    let mnt = Tmpfs::mount(&env.root().join("mnt-all"), 16);
    let (q, d) = (mnt.dir.join("q"), mnt.dir.join("d"));
    std::fs::create_dir_all(q.join("old")).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(q.join("old/stray.bin"), noise(5 * MIB, 4)).unwrap();
    env.set("quarantine_path", q.to_str().unwrap());
    env.set("destination_path", d.to_str().unwrap());
    env.set("throttle_free_space_mb", "8");
    env.drop_file("x.bin", &noise(2 * MIB, 5));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = env.report();
    let recs: Vec<&str> = rep["throttle"]["recommendations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(recs[0].contains("1 leftover file(s), 5.0 MB"), "{recs:?}");
    assert!(recs[1].starts_with("destination "), "{recs:?}");
    assert!(
        q.join("old/stray.bin").exists(),
        "unknown quarantine files are never deleted"
    );
}

#[test]
fn daily_count_limit_spans_runs() {
    let mut env = throttled(0);
    env.set("throttle_max_file_count_per_day", "10");
    for i in 0..7 {
        env.drop_file(&format!("r1/{i}.txt"), format!("run1 {i}").as_bytes());
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 7);
    for i in 0..5 {
        env.drop_file(&format!("r2/{i}.txt"), format!("run2 {i}").as_bytes());
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 10, "exactly 3 more");
    assert_eq!(Env::tree(&env.src).len(), 2);
    let rep = env.report();
    assert_eq!(rep["throttle"]["reason"], "daily_limit");
    assert_eq!(rep["files"]["admitted"], 3);
    assert!(
        r.stderr.contains("THROTTLE REASON: Daily Limit Reached"),
        "{}",
        r.stderr
    );
}

#[test]
fn daily_volume_limit_counts_what_was_done_earlier_today() {
    let mut env = throttled(0);
    env.set("throttle_max_file_volume_per_day_mb", "50");
    for i in 0..6 {
        env.drop_file(&format!("early/{i}.bin"), &noise(5 * MIB, i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 6, "30 MB done today");
    for i in 0..6 {
        env.drop_file(&format!("late/{i}.bin"), &noise(5 * MIB, 100 + i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 10, "exactly 4 more");
    assert_eq!(env.report()["throttle"]["reason"], "daily_limit");
}

#[test]
fn per_run_limits_stop_admission() {
    let mut env = throttled(0);
    env.set("throttle_max_file_count_per_run", "3");
    for i in 0..5 {
        env.drop_file(&format!("{i}.txt"), b"x");
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 3);
    assert_eq!(env.report()["throttle"]["reason"], "per_run_limit");
    assert!(
        r.stderr.contains("THROTTLE REASON: Per-Run Limit Reached"),
        "{}",
        r.stderr
    );
    env.set("throttle_max_file_count_per_run", "0");
    env.set("throttle_max_file_volume_per_run_mb", "2");
    for i in 3..5 {
        std::fs::remove_file(env.src.join(format!("{i}.txt"))).unwrap();
    }
    for i in 0..3 {
        env.drop_file(&format!("v{i}.bin"), &noise(MIB, i));
    }
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        env.report()["files"]["admitted"],
        2,
        "2 MB per run of 1 MiB files"
    );
    assert_eq!(env.report()["throttle"]["reason"], "per_run_limit");
}

#[test]
fn priority_orders_admission() {
    for (priority, expect) in [
        ("oldest", "a.txt"),
        ("newest", "b.txt"),
        ("smallest", "a.txt"),
        ("largest", "b.txt"),
    ] {
        let mut env = throttled(0);
        env.set("throttle_max_file_count_per_run", "1");
        env.set("priority", priority);
        let a = env.drop_file("a.txt", &[1; 10]);
        let b = env.drop_file("b.txt", &[2; 30]);
        let c = env.drop_file("c.txt", &[3; 20]);
        age(&a, 300);
        age(&c, 200);
        age(&b, 100);
        let r = env.run(&[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            Env::tree(&env.dst).keys().collect::<Vec<_>>(),
            [expect],
            "priority = {priority}"
        );
    }
    let mut env = throttled(0);
    env.set("throttle_max_file_count_per_run", "2");
    env.set("priority_paths", "urgent, also");
    let old = env.drop_file("old.txt", b"old");
    age(&old, 9999);
    env.drop_file("also/x.txt", b"x");
    env.drop_file("urgent/y.txt", b"y");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["also/x.txt", "urgent/y.txt"]
    );
}

#[test]
fn throttle_off_still_survives_a_real_disk_full() {
    // Quarantine too small for the file.
    let mut env = Env::new();
    let mnt = Tmpfs::mount(&env.root().join("mnt-tiny-q"), 8);
    // Room for the file on the empty filesystem (so it is not set aside as too
    // large), but 4 MiB are taken.
    std::fs::write(mnt.dir.join("filler"), noise(4 * MIB, 97)).unwrap();
    let q = mnt.dir.join("q");
    std::fs::create_dir(&q).unwrap();
    env.set("quarantine_path", q.to_str().unwrap());
    let data = noise(6 * MIB, 6);
    env.drop_file("big.bin", &data);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("disk full writing quarantine copy"),
        "{}",
        r.stderr
    );
    assert!(Env::tree(&q).is_empty(), "temp file removed");
    assert_eq!(
        std::fs::read(env.src.join("big.bin")).unwrap(),
        data,
        "source intact"
    );
    assert!(Env::tree(&env.dst).is_empty());
    drop(mnt);

    // Destination without room for the file (it would fit the empty filesystem).
    let mut env = Env::new();
    let mnt = Tmpfs::mount(&env.root().join("mnt-tiny-d"), 8);
    std::fs::write(mnt.dir.join("filler"), noise(4 * MIB, 95)).unwrap();
    let d = mnt.dir.join("d");
    std::fs::create_dir(&d).unwrap();
    env.set("destination_path", d.to_str().unwrap());
    env.drop_file("big.bin", &data);
    env.drop_file("later.txt", b"later");
    let r = env.run(&["--max-scan-threads", "1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("disk full delivering to"), "{}", r.stderr);
    assert!(
        Env::tree(&d).keys().all(|k| !k.contains(".shuttle-tmp")),
        "no temp left: {:?}",
        Env::tree(&d).keys()
    );
    assert!(!d.join("big.bin").exists());
    assert_eq!(
        std::fs::read(env.src.join("big.bin")).unwrap(),
        data,
        "source intact"
    );
    assert!(Env::tree(&env.quarantine).is_empty());
}

/// A few small files: the run's last line and `status` give their volume in bytes or
/// KB, not "0.0 MB" (which reads as nothing delivered); JSON keeps whole MB for the
/// limit and the exact bytes beside it.
#[test]
fn a_few_small_files_are_counted_in_kb_not_as_zero_mb() {
    let env = throttled(1);
    env.drop_file("a.txt", &[b'a'; 100]);
    env.drop_file("b.txt", &[b'b'; 200]);
    env.drop_file("c.txt", &[b'c'; 2_000]);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst).len(), 3);
    let log = env.log_text();
    assert!(
        log.contains("admitted: 3 clean (2.2 KB), 0 suspect"),
        "{log}"
    );
    let r = env.shuttle(&["status", "--config", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("today: 3 files (no daily limit), 2.2 KB (no daily limit)"),
        "{}",
        r.stdout
    );
    // A fresh journal has no trend yet, and says so rather than "avg unknown/day".
    assert!(
        r.stdout
            .contains("no daily average yet (under an hour of samples)"),
        "{}",
        r.stdout
    );
    let r = env.shuttle(&["status", "--json", "--config", env.config.to_str().unwrap()]);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["bytes_today"], 2_300);
    assert_eq!(s["mb_today"]["used"], 0);
}

#[test]
fn status_shows_limits_free_space_and_the_trend_from_journal_history() {
    let mut env = throttled(20);
    let mnt = Tmpfs::mount(&env.root().join("mnt-status"), 64);
    env.set("destination_path", mnt.dir.to_str().unwrap());
    env.set("throttle_max_file_count_per_day", "100");
    env.drop_file("a.bin", &noise(MIB, 1));
    env.drop_file("b.bin", &noise(MIB, 2));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // History: the destination lost 10 MiB a day over the last three days.
    let free_now = (mnt.free_mib() * 1_048_576.0) as u64;
    let now = chrono::Utc::now().timestamp();
    {
        let j = shuttle::journal::SqliteJournal::open(&env.state).unwrap();
        for days_ago in 1..=3u64 {
            let s = shuttle::journal::SpaceSample {
                time: now - (days_ago as i64) * 86_400,
                target: "destination".into(),
                path: mnt.dir.display().to_string(),
                free_bytes: free_now + days_ago * 10 * MIB as u64,
                threshold_bytes: 20 * MIB as u64,
            };
            j.record_space(0, &s, 64 * MIB as u64).unwrap();
        }
        j.connection()
            .execute(
                "DELETE FROM space WHERE target = 'destination' AND time > ?1",
                [now - 3600],
            )
            .unwrap();
        let s = shuttle::journal::SpaceSample {
            time: now - 60,
            target: "destination".into(),
            path: mnt.dir.display().to_string(),
            free_bytes: free_now + 2 * MIB as u64,
            threshold_bytes: 20 * MIB as u64,
        };
        j.record_space(0, &s, 64 * MIB as u64).unwrap();
    }
    let r = env.shuttle(&["status", "--json", "--config", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["files_today"]["used"], 2);
    assert_eq!(s["files_today"]["limit"], 100);
    let dest = s["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "destination")
        .unwrap();
    assert_eq!(dest["threshold_mb"], 20.0);
    let avg = dest["avg_daily_consumption_mb"].as_f64().unwrap();
    assert!((avg - 10.0).abs() < 0.5, "avg {avg}");
    let days = dest["projected_days_to_threshold"].as_f64().unwrap();
    let expect = (mnt.free_mib() - 20.0) / 10.0;
    assert!(
        (days - expect).abs() < 0.3,
        "projected {days}, expected about {expect}"
    );
    let today = dest["consumed_today_mb"].as_f64().unwrap();
    assert!((today - 2.0).abs() < 0.2, "consumed today {today}");
    // The human form says the same.
    let r = env.shuttle(&["status", "--config", env.config.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("today: 2 of 100 files"), "{}", r.stdout);
    assert!(
        r.stdout.contains("avg 10.0 MB/day; threshold reached in ~"),
        "{}",
        r.stdout
    );
    // The threshold as configured (throttle_free_space_mb), in whole MB.
    assert!(
        r.stdout.contains(" MB free, threshold 20 MB"),
        "{}",
        r.stdout
    );
}

/// A file that could not fit the quarantine even if it were empty (a sparse 300 MiB
/// image, 4 KiB on disk, counted by its size as the copy would be) must not block
/// the files behind it, throttle on or off: it is set aside as too large once, left
/// untouched, and the next run passes it over in silence.
#[test]
fn a_file_that_can_never_fit_is_set_aside_and_the_rest_proceed() {
    for throttle in [true, false] {
        let mut env = throttled(8);
        env.set("throttle", &throttle.to_string());
        let q = Tmpfs::mount(&env.root().join("q"), 64);
        env.set("quarantine_path", q.dir.to_str().unwrap());
        env.set("priority", "largest");
        let image = env.drop_file("image.raw", b"");
        std::fs::File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(300 << 20)
            .unwrap();
        age(&image, 60);
        env.drop_file("small.txt", b"behind it");
        let r = env.run(&[]);
        assert_eq!(r.code, 1, "throttle {throttle}: {}", r.stderr);
        let rep = env.report();
        assert_eq!(rep["files"]["too_large"], 1, "throttle {throttle}");
        assert_eq!(rep["files"]["clean"], 1, "throttle {throttle}");
        assert_eq!(rep["files"]["deferred"], 0, "throttle {throttle}");
        assert!(r.stderr.contains("TOO LARGE \"image.raw\""), "{}", r.stderr);
        assert!(r.stderr.contains("even when it is empty"), "{}", r.stderr);
        assert_eq!(
            Env::tree(&env.dst).get("small.txt").map(Vec::as_slice),
            Some(&b"behind it"[..])
        );
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 300 << 20);
        assert!(
            Env::tree(&q.dir).is_empty(),
            "nothing left in the quarantine"
        );

        let r = env.run(&[]);
        assert_eq!(r.code, 0, "throttle {throttle}: {}", r.stderr);
        assert!(!r.stderr.contains("TOO LARGE"), "{}", r.stderr);
        assert_eq!(env.report()["skipped_by_reason"]["set_aside"], 1);
        assert!(image.exists());
    }
}
