//! The hazard archive (docs/design.md §1.9), driven through the CLI against a real
//! clamd, with real GnuPG keys; every archive is decrypted with stock `gpg`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::common::*;
use sha2::{Digest, Sha256};

/// Throwaway GnuPG homes and exported public keys, made once per test binary.
struct Keys {
    /// Holds the secret keys of `curve`, `rsa`, `sign_only`, `expired`.
    home: PathBuf,
    /// Holds only the secret key of an unrelated key.
    other_home: PathBuf,
    /// ed25519 primary + cv25519 encryption subkey, ASCII-armored.
    curve_asc: PathBuf,
    /// RSA-3072 primary + RSA-3072 encryption subkey, binary.
    rsa_bin: PathBuf,
    sign_only: PathBuf,
    expired: PathBuf,
    secret: PathBuf,
}

fn gpg(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args([
            "--batch",
            "--quiet",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("gpg runs (scripts/install-deps installs gnupg)")
}

fn gpg_ok(home: &Path, args: &[&str]) -> Vec<u8> {
    let out = gpg(home, args);
    assert!(
        out.status.success(),
        "gpg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn fingerprint(home: &Path, uid: &str) -> String {
    let out = String::from_utf8(gpg_ok(home, &["--with-colons", "--list-keys", uid])).unwrap();
    out.lines()
        .find(|l| l.starts_with("fpr:"))
        .and_then(|l| l.split(':').nth(9))
        .unwrap()
        .to_string()
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("sh-gpg.")
            .tempdir()
            .unwrap()
            .keep();
        let home = dir.join("h");
        let other_home = dir.join("o");
        for h in [&home, &other_home] {
            std::fs::create_dir(h).unwrap();
            std::fs::set_permissions(h, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
        }
        gpg_ok(
            &home,
            &[
                "--quick-gen-key",
                "Curve <curve@example>",
                "ed25519",
                "cert",
                "never",
            ],
        );
        let f = fingerprint(&home, "curve@example");
        gpg_ok(&home, &["--quick-add-key", &f, "cv25519", "encr", "never"]);
        gpg_ok(
            &home,
            &[
                "--quick-gen-key",
                "Rsa <rsa@example>",
                "rsa3072",
                "cert",
                "never",
            ],
        );
        let f = fingerprint(&home, "rsa@example");
        gpg_ok(&home, &["--quick-add-key", &f, "rsa3072", "encr", "never"]);
        gpg_ok(
            &home,
            &[
                "--quick-gen-key",
                "Sign <sign@example>",
                "ed25519",
                "sign",
                "never",
            ],
        );
        // Made "in 2020", valid one day: expired now.
        gpg_ok(
            &home,
            &[
                "--faked-system-time",
                "20200101T000000",
                "--quick-gen-key",
                "Old <old@example>",
                "future-default",
                "default",
                "1d",
            ],
        );
        gpg_ok(
            &other_home,
            &[
                "--quick-gen-key",
                "Other <other@example>",
                "future-default",
                "default",
                "never",
            ],
        );
        // The gpg-agents these homes start, and the keys, go when this test process
        // ends: a watcher shell (its parent is this process) cleans up after it.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(r#"while kill -0 "$PPID" 2>/dev/null; do sleep 1; done; for h in "$1/h" "$1/o"; do gpgconf --homedir "$h" --kill gpg-agent; done; rm -rf "$1""#)
            .arg("sh")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let write = |name: &str, bytes: Vec<u8>| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        Keys {
            curve_asc: write(
                "curve.asc",
                gpg_ok(&home, &["--armor", "--export", "curve@example"]),
            ),
            rsa_bin: write("rsa.gpg", gpg_ok(&home, &["--export", "rsa@example"])),
            sign_only: write(
                "sign.asc",
                gpg_ok(&home, &["--armor", "--export", "sign@example"]),
            ),
            expired: write(
                "old.asc",
                gpg_ok(&home, &["--armor", "--export", "old@example"]),
            ),
            secret: write(
                "secret.asc",
                gpg_ok(&home, &["--armor", "--export-secret-keys", "curve@example"]),
            ),
            home,
            other_home,
        }
    })
}

/// Decrypts with stock gpg; None if gpg refuses.
fn decrypt(home: &Path, file: &Path) -> Option<Vec<u8>> {
    let out = gpg(
        home,
        &["--decrypt", "--output", "-", file.to_str().unwrap()],
    );
    out.status.success().then_some(out.stdout)
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// An Env with a hazard archive encrypting to `key`.
fn hazard_env(key: &Path) -> (Env, PathBuf) {
    let mut env = Env::new();
    let archive = env.root().join("hazard");
    std::fs::create_dir(&archive).unwrap();
    env.set("hazard_archive_path", archive.to_str().unwrap());
    env.set("hazard_encryption_key_path", key.to_str().unwrap());
    (env, archive)
}

/// Archive file name → (bytes of the .gpg, parsed sidecar).
fn entries(archive: &Path) -> BTreeMap<String, (PathBuf, serde_json::Value)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(archive).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".gpg") {
            let side = std::fs::read_to_string(archive.join(format!("{name}.json")))
                .expect("sidecar next to archive");
            out.insert(name, (e.path(), serde_json::from_str(&side).unwrap()));
        }
    }
    out
}

#[test]
fn suspects_are_encrypted_to_a_curve25519_key_and_decrypt_with_gpg_only_with_that_key() {
    let k = keys();
    let (env, archive) = hazard_env(&k.curve_asc);
    let a = EICAR.to_vec();
    let b = [MARKER, &noise(300_000, 7)].concat();
    let c = [&noise(1000, 8), MARKER].concat();
    env.drop_file("lab/one/eicar.com", &a);
    env.drop_file("lab/two/eicar.com", &b);
    env.drop_file("three/eicar.com", &c);
    env.drop_file("clean.txt", b"fine");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(env.report()["files"]["suspect"], 3);
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["clean.txt"]
    );
    assert!(
        Env::tree(&env.src).is_empty(),
        "sources removed: delete is on and hashes match"
    );
    assert!(Env::tree(&env.quarantine).is_empty());

    let originals: BTreeMap<&str, &[u8]> = [
        ("lab/one/eicar.com", &a[..]),
        ("lab/two/eicar.com", &b[..]),
        ("three/eicar.com", &c[..]),
    ]
    .into();
    let got = entries(&archive);
    assert_eq!(
        got.len(),
        3,
        "three same-named suspects, three archives: {:?}",
        got.keys()
    );
    assert_eq!(
        std::fs::read_dir(&archive).unwrap().count(),
        6,
        "3 archives + 3 sidecars, no temp files"
    );
    let mut seen = Vec::new();
    for (name, (path, side)) in &got {
        let stamp = name
            .strip_prefix("hazard_eicar.com_")
            .unwrap()
            .strip_suffix(".gpg")
            .unwrap();
        let (ts, counter) = stamp.split_once('_').unwrap_or((stamp, "1"));
        assert!(
            ts.len() == 14 && ts.bytes().all(|c| c.is_ascii_digit()),
            "{name}"
        );
        assert!(["1", "2", "3"].contains(&counter), "{name}");
        let m = mode(path) & 0o777;
        assert_eq!(m & 0o137, 0, "{name} mode {m:o} must be 0640 or stricter");
        assert_eq!(mode(&archive.join(format!("{name}.json"))) & 0o137, 0);

        let orig_path = side["original_path"].as_str().unwrap();
        let orig = originals[orig_path];
        seen.push(orig_path.to_string());
        assert_eq!(
            decrypt(&k.home, path).as_deref(),
            Some(orig),
            "{name} decrypts to {orig_path}"
        );
        assert_eq!(
            decrypt(&k.other_home, path),
            None,
            "an unrelated key cannot decrypt {name}"
        );
        assert_ne!(std::fs::read(path).unwrap(), orig);

        assert_eq!(side["archive"], name.as_str());
        assert_eq!(side["size"], orig.len() as u64);
        assert_eq!(side["sha256"], sha256(orig));
        let det = side["detections"].to_string();
        assert!(
            det.to_lowercase().contains("eicar") || det.contains("Shuttle.Test.Marker"),
            "{det}"
        );
        assert_eq!(side["scanners"][0]["scanner"], "clamav");
        assert!(
            side["scanners"][0]["version"]
                .as_str()
                .unwrap()
                .starts_with("ClamAV ")
        );
        assert!(
            chrono::DateTime::parse_from_rfc3339(side["archived_at"].as_str().unwrap()).is_ok()
        );
        assert_eq!(
            side["key_fingerprint"],
            fingerprint(&k.home, "curve@example")
        );
        let text = std::fs::read(archive.join(format!("{name}.json"))).unwrap();
        assert!(
            !text.windows(MARKER.len()).any(|w| w == MARKER)
                && !text.windows(20).any(|w| w == &EICAR[..20])
        );
    }
    seen.sort();
    assert_eq!(
        seen,
        ["lab/one/eicar.com", "lab/two/eicar.com", "three/eicar.com"]
    );

    // The journal has the same metadata, and the files point at their archives.
    let j = shuttle::journal::SqliteJournal::open(&env.state).unwrap();
    let rows: Vec<(String, String, String, String)> = j
        .connection()
        .prepare("SELECT h.original_path, h.sha256, h.archive_path, f.final_path FROM hazard h JOIN files f ON f.id = h.file_id ORDER BY 1")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3);
    for (orig, sha, arch, fin) in rows {
        assert_eq!(sha, sha256(originals[orig.as_str()]));
        assert_eq!(arch, fin);
        assert!(Path::new(&arch).is_file());
    }
}

#[test]
fn an_rsa_key_in_binary_form_works_and_sources_stay_when_delete_is_off() {
    let k = keys();
    let (mut env, archive) = hazard_env(&k.rsa_bin);
    env.set("delete_source_files_after_copying", "false");
    let m = [&noise(5000, 3)[..], MARKER].concat();
    env.drop_file("x/../m a r k.bin", &m);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = entries(&archive);
    assert_eq!(got.len(), 1);
    let (name, (path, side)) = got.into_iter().next().unwrap();
    assert!(
        name.starts_with("hazard_m_a_r_k.bin_"),
        "only the file name, unsafe characters replaced: {name}"
    );
    assert_eq!(side["original_path"], "m a r k.bin");
    assert_eq!(decrypt(&k.home, &path).unwrap(), m);
    assert_eq!(
        Env::tree(&env.src).get("m a r k.bin"),
        Some(&m),
        "delete is off: source stays"
    );
}

/// A clamd stand-in: answers VERSION, flags every FILDES scan as suspect, and (after
/// the canary) appends to `mutate` before answering, i.e. the source changes after
/// it was quarantined.
fn fake_clamd(dir: &Path, mutate: PathBuf) -> PathBuf {
    use crate::common::fake_clamd::{Answer, serve};
    let sock = dir.join("fake-clamd.sock");
    let scans = std::sync::atomic::AtomicUsize::new(0);
    serve(&sock, move |cmd| {
        if cmd.starts_with(b"zVERSION") {
            return Answer::Reply(b"ClamAV 0.0.0-fake/1/Thu Jan  1 00:00:00 1970".to_vec());
        }
        if cmd.starts_with(b"zPING") {
            return Answer::Reply(b"PONG".to_vec());
        }
        if scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&mutate)
                .unwrap();
            f.write_all(b"changed").unwrap();
        }
        Answer::Reply(b"fd[5]: Fake.Suspect FOUND".to_vec())
    });
    sock
}

#[test]
fn a_source_changed_after_quarantine_is_kept_and_reported_but_its_scanned_bytes_are_archived() {
    let k = keys();
    let (mut env, archive) = hazard_env(&k.curve_asc);
    let src = env.drop_file("evil.bin", b"original bytes");
    let sock = fake_clamd(env.root(), src.clone());
    env.set("clamd_socket", sock.to_str().unwrap());
    // The fake's signatures are dated 1970.
    env.set("max_signature_age_hours", "0");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(&src).unwrap(),
        b"original byteschanged",
        "changed source kept"
    );
    let rep = env.report();
    let kept = rep["sources_kept"].to_string();
    assert!(
        kept.contains("evil.bin") && kept.contains("changed after it was quarantined"),
        "{rep}"
    );
    let got = entries(&archive);
    let (path, side) = got.values().next().unwrap();
    assert_eq!(decrypt(&k.home, path).unwrap(), b"original bytes");
    assert_eq!(
        side["scanners"][0]["version"],
        "ClamAV 0.0.0-fake/1/Thu Jan  1 00:00:00 1970"
    );
    assert_eq!(side["detections"][0], "Fake.Suspect");
}

#[test]
fn without_a_hazard_archive_the_suspect_copy_is_deleted() {
    let env = Env::new();
    env.drop_file("e.com", EICAR);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.quarantine).is_empty() && Env::tree(&env.src).is_empty());
    assert!(Env::tree(&env.dst).is_empty(), "nothing delivered");
    // Nothing of the file is left anywhere: the line says so, and what would keep it.
    let log = env.log_text();
    assert!(
        log.contains(
            "SUSPECT \"e.com\": eicar.com.UNOFFICIAL; quarantine copy deleted (no hazard archive \
             configured); once its source is removed as well, no copy of the file is kept (set \
             hazard_archive_path and hazard_encryption_key_path to keep suspect files, \
             encrypted)"
        ),
        "{log}"
    );
}

#[test]
fn unusable_keys_are_configuration_errors_in_check_and_run() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.asc");
    std::fs::write(&garbage, "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n").unwrap();
    let noise_file = dir.path().join("noise.gpg");
    std::fs::write(&noise_file, noise(500, 1)).unwrap();
    let unreadable = dir.path().join("dir.asc");
    std::fs::create_dir(&unreadable).unwrap();
    let missing = dir.path().join("missing.asc");
    let cases: [(&Path, &str); 7] = [
        (&missing, "does not exist"),
        (&unreadable, "cannot read"),
        (&garbage, "not an OpenPGP public key"),
        (&noise_file, "not an OpenPGP public key"),
        (&k.secret, "secret (private) key"),
        (&k.sign_only, "no usable encryption-capable (sub)key"),
        (&k.expired, "expired on 2020-01-02"),
    ];
    let (mut env, archive) = hazard_env(&missing);
    let src = env.drop_file("e.com", EICAR);
    for (key, problem) in cases {
        env.set("hazard_encryption_key_path", key.to_str().unwrap());
        let c = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
        assert_eq!(c.code, 2, "check with {key:?}: {}", c.stdout);
        let line = c
            .stdout
            .lines()
            .find(|l| l.starts_with("problem: hazard_encryption_key_path"))
            .unwrap_or_default();
        assert!(
            line.contains(key.to_str().unwrap()) && line.contains(problem),
            "{key:?}: {}",
            c.stdout
        );
        let r = env.run(&[]);
        assert_eq!(r.code, 2, "run with {key:?}: {}", r.stderr);
        assert!(r.stderr.contains(problem), "{key:?}: {}", r.stderr);
        assert_eq!(std::fs::read(&src).unwrap(), EICAR, "no file touched");
        assert!(Env::tree(&archive).is_empty());
    }
    env.unset("hazard_encryption_key_path");
    let r = env.run(&[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("hazard_encryption_key_path is not"),
        "{}",
        r.stderr
    );
    let c = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(c.code, 2);

    env.set("hazard_encryption_key_path", k.curve_asc.to_str().unwrap());
    let c = env.shuttle(&["check", "--config", env.config.to_str().unwrap()]);
    assert_eq!(c.code, 0, "{}", c.stdout);
    assert!(
        c.stdout.contains("ok: hazard archive")
            && c.stdout.contains(&fingerprint(&k.home, "curve@example"))
    );
}

#[test]
fn hazard_list_shows_entries_newest_first_and_flags_damaged_and_foreign_files() {
    let k = keys();
    let (env, archive) = hazard_env(&k.curve_asc);
    env.drop_file("first.com", EICAR);
    assert_eq!(env.run(&[]).code, 0);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.drop_file("second.bin", MARKER);
    assert_eq!(env.run(&[]).code, 0);
    std::fs::write(archive.join("notes.txt"), "analyst notes").unwrap();
    std::fs::write(
        archive.join("hazard_lost_20200101000000.gpg"),
        "not encrypted",
    )
    .unwrap();
    std::fs::write(archive.join("hazard_gone_20200101000000.gpg.json"), "{}").unwrap();
    std::fs::write(
        archive.join("hazard_bad_20200101000000.gpg"),
        [0xC1u8, 1, 2],
    )
    .unwrap();
    std::fs::write(
        archive.join("hazard_bad_20200101000000.gpg.json"),
        "{not json",
    )
    .unwrap();

    let cfg = env.config.to_str().unwrap();
    let l = env.shuttle(&["hazard", "list", "--config", cfg]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    let second = l.stdout.find("original: second.bin").expect(&l.stdout);
    let first = l.stdout.find("original: first.com").expect(&l.stdout);
    assert!(second < first, "newest first:\n{}", l.stdout);
    assert!(
        l.stdout.contains("detections: eicar")
            && l.stdout.contains("detections: Shuttle.Test.Marker"),
        "{}",
        l.stdout
    );
    assert!(l.stdout.contains("FOREIGN  notes.txt"), "{}", l.stdout);
    assert!(
        l.stdout
            .contains("DAMAGED  hazard_lost_20200101000000.gpg: no sidecar"),
        "{}",
        l.stdout
    );
    assert!(
        l.stdout
            .contains("DAMAGED  hazard_gone_20200101000000.gpg.json: sidecar without its archive")
    );
    assert!(
        l.stdout
            .contains("DAMAGED  hazard_bad_20200101000000.gpg: sidecar"),
        "{}",
        l.stdout
    );

    let j = env.shuttle(&["hazard", "list", "--json", "--config", cfg]);
    assert_eq!(j.code, 0, "{}", j.stderr);
    let doc: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    let list = doc["entries"].as_array().unwrap();
    assert_eq!(list.len(), 6, "{doc}");
    assert_eq!(list[0]["status"], "ok");
    assert_eq!(list[0]["meta"]["original_path"], "second.bin");
    assert_eq!(list[1]["meta"]["original_path"], "first.com");
    assert_eq!(list[1]["meta"]["sha256"], sha256(EICAR));
    assert_eq!(list[1]["meta"]["size"], EICAR.len());
    let status = |f: &str| {
        list.iter()
            .find(|e| e["file"] == f)
            .map(|e| e["status"].clone())
            .unwrap()
    };
    assert_eq!(status("notes.txt"), "foreign");
    assert_eq!(status("hazard_lost_20200101000000.gpg"), "damaged");
    assert_eq!(status("hazard_gone_20200101000000.gpg.json"), "damaged");
    assert_eq!(status("hazard_bad_20200101000000.gpg"), "damaged");

    // No archive configured: a clear configuration error.
    let mut plain = Env::new();
    plain.set("log_level", "info");
    let n = plain.shuttle(&["hazard", "list", "--config", plain.config.to_str().unwrap()]);
    assert_eq!(n.code, 2);
    assert!(
        n.stderr.contains("hazard_archive_path is not set"),
        "{}",
        n.stderr
    );
}

#[test]
fn a_full_hazard_archive_disk_fails_the_file_and_keeps_the_source() {
    let k = keys();
    let (mut env, _archive) = hazard_env(&k.curve_asc);
    let mnt = Tmpfs::mount(&env.root().join("mnt-hazard"), 4);
    // The file fits the empty filesystem (it is not set aside as too large), but
    // 2 MiB are taken by something else.
    std::fs::write(mnt.dir.join("filler"), noise(2 << 20, 96)).unwrap();
    let h = mnt.dir.join("h");
    std::fs::create_dir(&h).unwrap();
    env.set("hazard_archive_path", h.to_str().unwrap());
    let mut data = MARKER.to_vec();
    data.extend(noise(3 << 20, 8));
    env.drop_file("big-suspect.bin", &data);
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("disk full"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(env.src.join("big-suspect.bin")).unwrap(),
        data,
        "source intact"
    );
    let left: Vec<_> = std::fs::read_dir(&h)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "no partial archive or temp left: {left:?}");
    assert!(Env::tree(&env.quarantine).is_empty());
    assert!(Env::tree(&env.dst).is_empty());
}
