//! Verdict integrity against real clamd processes, each with its own limits: nothing
//! a scanner could not scan whole is delivered, whatever clamd answers; what cannot
//! be scanned is set aside in the source, reported once, and not copied again; a run
//! with stale or undated signatures delivers nothing.

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A zip holding `entries` (name, bytes), deflated.
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// The marker, zipped `depth` times.
fn nested_zip(depth: usize) -> Vec<u8> {
    let mut inner = MARKER.to_vec();
    for i in 0..depth {
        inner = zip_of(&[(&format!("level{i}.bin"), &inner)]);
    }
    inner
}

/// The marker in a tar.gz, in a tar.gz, … `depth` times.
fn nested_tar_gz(depth: usize) -> Vec<u8> {
    let mut inner = MARKER.to_vec();
    for i in 0..depth {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(inner.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("level{i}.tar.gz"), &inner[..])
            .unwrap();
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        inner = gz.finish().unwrap();
    }
    inner
}

/// A password-protected zip (stock `zip -P`) holding the marker.
fn encrypted_zip(dir: &Path) -> Vec<u8> {
    let work = dir.join("zipwork");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("secret.txt"), MARKER).unwrap();
    let ok = Command::new("zip")
        .current_dir(&work)
        .args(["-q", "-P", "s3cret", "enc.zip", "secret.txt"])
        .status()
        .expect("zip is installed (scripts/install-deps)")
        .success();
    assert!(ok);
    let bytes = std::fs::read(work.join("enc.zip")).unwrap();
    std::fs::remove_dir_all(&work).unwrap();
    bytes
}

/// The files every limits test drops: name, bytes, the reason expected.
fn unscannable_files(env: &Env) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    // 1.5 MB with the signature at its end (MaxFileSize 1M).
    let mut over = noise(1_500_000, 1);
    over.extend_from_slice(MARKER);
    // 10,050 entries, the signature last.
    let many: Vec<(String, Vec<u8>)> = (0..10_050)
        .map(|i| {
            let body = if i == 10_049 {
                MARKER.to_vec()
            } else {
                b"x".to_vec()
            };
            (format!("f{i}.txt"), body)
        })
        .collect();
    let many_refs: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    // One 3 MiB member (compresses to a few KB) with the signature at its end.
    let mut big_member = vec![0u8; 3 << 20];
    big_member.extend_from_slice(MARKER);
    vec![
        ("over.bin", over, "exceeds MaxFileSize 1 MiB"),
        ("nested20.zip", nested_zip(20), "archive recursion limit"),
        ("many.zip", zip_of(&many_refs), "more than MaxFiles 10000"),
        (
            "encrypted.zip",
            encrypted_zip(env.root()),
            "encrypted archive",
        ),
        (
            "member.zip",
            zip_of(&[("big.bin", &big_member)]),
            "exceeds MaxFileSize 1 MiB",
        ),
        (
            "nested20.tar.gz",
            nested_tar_gz(20),
            "archive recursion limit",
        ),
    ]
}

fn results_by_path(
    rep: &serde_json::Value,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    rep["file_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// Drops the unscannable files and two clean ones, runs twice against `clamd`.
fn nothing_unscanned_is_delivered(limits: &str) {
    let (clamd, _child) = Clamd::start_with(limits, &[]);
    let mut env = Env::new();
    env.set("clamd_socket", clamd.socket.to_str().unwrap());
    env.set("clamd_config", clamd.conf().to_str().unwrap());
    let files = unscannable_files(&env);
    for (name, bytes, _) in &files {
        env.drop_file(name, bytes);
    }
    let ok_zip = zip_of(&[("a.txt", b"hello"), ("b.txt", b"world")]);
    env.drop_file("ok.zip", &ok_zip);
    env.drop_file("clean.txt", b"clean");

    let r = env.run(&[]);
    assert_eq!(r.code, 1, "files set aside make exit 1: {}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(
        dst.keys().collect::<Vec<_>>(),
        ["clean.txt", "ok.zip"],
        "{}",
        r.stderr
    );
    assert_eq!(dst["ok.zip"], ok_zip);
    let src = Env::tree(&env.src);
    for (name, bytes, _) in &files {
        assert_eq!(
            src.get(*name),
            Some(bytes),
            "{name} untouched in the source"
        );
    }
    assert!(Env::tree(&env.quarantine).is_empty());
    let rep = env.report();
    assert_eq!(rep["files"]["unscannable"], files.len(), "{rep:#}");
    assert_eq!(rep["files"]["failed"], 0);
    let by_path = results_by_path(&rep);
    for (name, _, reason) in &files {
        let e = &by_path[*name];
        assert_eq!(e["outcome"], "unscannable", "{name}: {e}");
        let why = e["error"].as_str().unwrap();
        assert!(why.contains(reason), "{name}: {why:?} lacks {reason:?}");
        assert!(
            r.stderr.contains(&format!("UNSCANNABLE \"{name}\"")),
            "{name} in the log: {}",
            r.stderr
        );
    }
    // Which signatures cleared the delivered files.
    let clean = &by_path["clean.txt"];
    assert_eq!(clean["scanners"][0]["signatures"]["version"], "27450");

    // The second run copies none of them again and reports nothing.
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = env.report();
    assert_eq!(rep["files"]["admitted"], 0, "{rep:#}");
    assert_eq!(rep["files"]["unscannable"], 0);
    assert_eq!(rep["skipped_by_reason"]["set_aside"], files.len());
    assert!(!r.stderr.contains("UNSCANNABLE"), "{}", r.stderr);
    assert_eq!(Env::tree(&env.src).len(), files.len());

    // A changed file is judged again.
    let p = env.src.join("over.bin");
    std::fs::write(&p, b"now small").unwrap();
    age(&p, 60);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.dst.join("over.bin").exists());
}

#[test]
fn stock_limits_without_alert_exceeds_max_deliver_nothing_unscanned() {
    // clamd's compiled-in limits (MaxRecursion 17, MaxFiles 10000), MaxFileSize 1M,
    // AlertExceedsMax off: clamd answers OK for all of these.
    nothing_unscanned_is_delivered("MaxFileSize 1M\n");
}

#[test]
fn with_alert_exceeds_max_nothing_unscanned_is_delivered_either() {
    nothing_unscanned_is_delivered("MaxFileSize 1M\nAlertExceedsMax yes\n");
}

#[test]
fn a_clamd_whose_configuration_cannot_be_read_gets_conservative_limits() {
    let mut env = Env::new();
    env.unset("clamd_socket");
    env.set("clamd_address", &clamd().tcp);
    env.set("clamd_config", "/nonexistent/clamd.conf");
    // Over the assumed 25 MiB, a format Shuttle does not walk, and a clean file.
    let big = env.drop_file("big.bin", b"");
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(26 << 20)
        .unwrap();
    age(&big, 60);
    let mut seven = b"7z\xBC\xAF\x27\x1C".to_vec();
    seven.extend_from_slice(&noise(100, 2));
    env.drop_file("x.7z", &seven);
    env.drop_file("clean.txt", b"clean");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["clean.txt"]
    );
    let rep = env.report();
    let by_path = results_by_path(&rep);
    let why = by_path["big.bin"]["error"].as_str().unwrap();
    assert!(
        why.contains("exceeds MaxFileSize 25 MiB") && why.contains("assumed"),
        "{why}"
    );
    let why = by_path["x.7z"]["error"].as_str().unwrap();
    assert!(
        why.contains("7z archive") && why.contains("AlertExceedsMax"),
        "{why}"
    );
    assert!(r.stderr.contains("clamd limits ASSUMED"), "{}", r.stderr);
    // check names what to set.
    let c = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert!(
        c.stdout
            .contains("warning: clamd's configuration cannot be read"),
        "{}",
        c.stdout
    );
}

#[test]
fn encrypted_archives_pass_only_when_allowed_and_say_so() {
    let mut env = Env::new();
    env.set("block_encrypted_archives", "false");
    let enc = encrypted_zip(env.root());
    env.drop_file("enc.zip", &enc);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(env.dst.join("enc.zip")).unwrap(), enc);
    let rep = env.report();
    assert_eq!(
        rep["file_results"][0]["verdict"],
        "clean (encrypted archive contents unscanned)"
    );
}

/// Runs against a private clamd whose database is made with `signatures`.
fn run_with_signatures(signatures: &[&str]) -> (Env, Run, Clamd, std::process::Child) {
    let (clamd, child) = Clamd::start_with(DEFAULT_LIMITS, signatures);
    let mut env = Env::new();
    env.set("clamd_socket", clamd.socket.to_str().unwrap());
    env.set("clamd_config", clamd.conf().to_str().unwrap());
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    (env, r, clamd, child)
}

#[test]
fn stale_or_undated_signatures_deliver_nothing_fresh_ones_do() {
    let (env, r, _c, _k) = run_with_signatures(&["--age-days", "10"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(env.src.join("a.txt").exists() && Env::tree(&env.dst).is_empty());
    let rep = env.report();
    let errors = rep["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = errors[0].as_str().unwrap();
    for part in [
        "clamav",
        "27450",
        "240 hours old",
        "max_signature_age_hours (168)",
    ] {
        assert!(e.contains(part), "{part} in {e}");
    }
    assert_eq!(
        r.stderr.matches("signatures too old").count(),
        1,
        "one error line: {}",
        r.stderr
    );
    let c = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(c.code, 2, "{}", c.stdout);
    assert!(
        c.stdout.contains("problem: signatures too old"),
        "{}",
        c.stdout
    );

    let (env, r, _c, _k) = run_with_signatures(&["--undated"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(env.src.join("a.txt").exists() && Env::tree(&env.dst).is_empty());
    assert!(r.stderr.contains("has no date"), "{}", r.stderr);

    let (env, r, _c, _k) = run_with_signatures(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.dst.join("a.txt").exists());
    let rep = env.report();
    assert_eq!(rep["scanners"][0]["signatures"]["version"], "27450");
    assert!(
        rep["scanners"][0]["signature_age_seconds"]
            .as_u64()
            .unwrap()
            < 3600
    );
}

#[test]
fn defender_definitions_age_comes_from_mdatp_health() {
    let mut env = Env::new();
    env.set("on_demand_clam_av", "false");
    env.set("on_demand_defender", "true");
    env.set(
        "mdatp_command",
        repo().join("tests/fixtures/mdatp-sim").to_str().unwrap(),
    );
    env.drop_file("a.txt", b"a");
    let run = |age: &str| {
        let mut c = env.run_command();
        c.env("MDATP_SIM_DEFS_AGE_MINUTES", age);
        Run::from(c.output().unwrap())
    };
    let r = run("20000");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("defender: signature database 1.419.166.0"),
        "{}",
        r.stderr
    );
    assert!(Env::tree(&env.dst).is_empty());
    let r = run("none");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("has no date"), "{}", r.stderr);
    let r = run("60");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(env.dst.join("a.txt").exists());
    let rep = env.report();
    assert_eq!(
        rep["file_results"][0]["scanners"][0]["signatures"]["version"],
        "1.419.166.0"
    );
}

#[test]
fn a_file_that_can_never_fit_is_set_aside_and_the_rest_proceed() {
    let mut env = Env::new();
    let q = Tmpfs::mount(&env.root().join("qfs"), 16);
    std::fs::remove_dir(&env.quarantine).unwrap();
    env.quarantine = q.dir.clone();
    env.write_config();
    env.set("throttle", "true");
    env.set("quarantine_free_space_mb", "1");
    env.set("destination_free_space_mb", "1");
    // 64 MiB sparse (nothing on disk; within clamd's limits, beyond the 16 MiB
    // quarantine filesystem), oldest, so first in line. (Beyond 2 GiB it would be
    // unscannable first.)
    let big = env.drop_file("a-sparse.img", b"");
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    age(&big, 600);
    env.drop_file("b.txt", b"b");
    env.drop_file("c.txt", b"c");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "newly set aside: {}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst.keys().collect::<Vec<_>>(), ["b.txt", "c.txt"]);
    let rep = env.report();
    assert_eq!(rep["files"]["too_large"], 1, "{rep:#}");
    assert_eq!(rep["throttle"]["stopped"], false);
    assert!(
        r.stderr.contains("TOO LARGE \"a-sparse.img\""),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "reported once: {}", r.stderr);
    assert!(!r.stderr.contains("TOO LARGE"));
    drop(q);
}

/// Asks clamd at `socket` for its version line.
fn clamd_version(socket: &Path) -> String {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"zVERSION\0").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.trim_end_matches('\0').to_string()
}

/// clamd reloads signatures 10 days old in the middle of a run (after the run's
/// freshness gate passed): the file scanned with them is not delivered, the run
/// admits nothing more, and says which engine and database, with its age.
#[test]
fn signatures_reloaded_mid_run_to_stale_ones_stop_delivery() {
    use std::io::Write as _;
    let (clamd, _child) = Clamd::start_with(DEFAULT_LIMITS, &[]);
    let mut env = Env::new();
    env.set("clamd_socket", clamd.socket.to_str().unwrap());
    env.set("clamd_config", clamd.conf().to_str().unwrap());
    env.set("max_scan_threads", "1");
    for name in ["a.txt", "b.txt", "c.txt"] {
        env.drop_file(name, name.as_bytes());
    }
    let before = clamd_version(&clamd.socket);
    let mut cmd = env.run_command();
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (child, resume) = env.spawn_paused(cmd, "scan: quarantined, before scan");
    let started = std::time::Instant::now();
    // The run has passed its gate and copied the first file: reload old signatures.
    let ok = Command::new(repo().join("scripts/make-test-signatures"))
        .arg(clamd.dir.join("db"))
        .args(["--age-days", "10"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut s = std::os::unix::net::UnixStream::connect(&clamd.socket).unwrap();
    s.write_all(b"zRELOAD\0").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
    assert!(reply.starts_with("RELOADING"), "{reply}");
    while clamd_version(&clamd.socket) == before {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "clamd never reloaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::fs::write(&resume, "").unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("signatures changed mid-run to too old ones: clamav")
            && r.stderr.contains("240 hours old"),
        "{}",
        r.stderr
    );
    assert!(Env::tree(&env.dst).is_empty(), "nothing delivered");
    let src = Env::tree(&env.src);
    for name in ["a.txt", "b.txt", "c.txt"] {
        assert_eq!(
            src.get(name).map(Vec::as_slice),
            Some(name.as_bytes()),
            "{name}"
        );
    }
    let rep = env.report();
    assert_eq!(rep["files"]["failed"], 1);
    assert_eq!(rep["files"]["admitted"], 1);
    assert_eq!(rep["files"]["deferred"], 2);
    // The three small files were admitted as one group; the two whose turn never came
    // are released: ended as skipped in the journal, none left open for recovery.
    let j = shuttle::journal::SqliteJournal::open(&env.state).unwrap();
    let rows: Vec<(String, String, Option<String>)> = j
        .connection()
        .prepare("SELECT rel_path, outcome, error FROM files ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0].1, "failed", "{rows:?}");
    for row in &rows[1..] {
        assert_eq!(row.1, "skipped", "{rows:?}");
        let note = row.2.as_deref().unwrap_or_default();
        assert!(note.contains("the run stopped before its turn"), "{rows:?}");
    }
}
