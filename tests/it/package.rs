//! Deployment: the Debian package on the real system (root and dpkg; skipped
//! otherwise), built from the binary these tests just compiled, installed, run as its
//! service user, upgraded, removed and purged; the systemd units and logrotate rules in
//! packaging/ as systemd-analyze and logrotate read them; and the expiry of per-run
//! log files that logrotate leaves to Shuttle.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::*;

/// Whether `name` is on PATH.
fn have(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

/// Runs `cmd`, asserts it succeeded, returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let o = output(cmd);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The fields of `getent DB NAME`, if it exists.
fn getent(db: &str, name: &str) -> Option<Vec<String>> {
    let o = output(Command::new("getent").args([db, name]));
    o.status.success().then(|| {
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(':')
            .map(String::from)
            .collect()
    })
}

/// dpkg's status of the shuttle package ("installed", "config-files", …), if it
/// knows the package at all.
fn package_status() -> Option<String> {
    let o = output(Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Status}", "shuttle"]));
    let status = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !status.is_empty() && status != "not-installed").then_some(status)
}

fn installed_version() -> String {
    ok(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "shuttle"]))
}

fn dpkg(args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// scripts/package with the test binary, into `out` (nothing in the repository changes).
fn build_package(out: &Path, version: &str) -> PathBuf {
    let stdout = ok(Command::new(repo().join("scripts/package"))
        .arg("--binary")
        .arg(shuttle_bin())
        .args(["--version", version])
        .env("SHUTTLE_PACKAGE_DIR", out));
    let deb = PathBuf::from(stdout.trim());
    assert!(deb.is_file(), "scripts/package printed {stdout:?}");
    assert!(
        deb.starts_with(out),
        "{} outside {}",
        deb.display(),
        out.display()
    );
    deb
}

/// What the package test installs system-wide; purged again when dropped, so a failing
/// test leaves no user, directory or package behind. Armed only once the test has seen
/// that none of it existed before.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(
            Command::new("dpkg")
                .args(["--purge", "shuttle"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
        if getent("passwd", "shuttle").is_some() {
            quiet(Command::new("userdel").arg("shuttle"));
        }
        if getent("group", "shuttle").is_some() {
            quiet(Command::new("groupdel").arg("shuttle"));
        }
        for dir in SYSTEM_DIRS {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What installing and running the package creates outside its file list, and purge
/// removes.
const SYSTEM_DIRS: &[&str] = &[
    "/etc/shuttle",
    "/var/lib/shuttle",
    "/var/log/shuttle",
    "/run/shuttle",
];

/// Why the package test cannot run here, if it cannot.
fn package_test_unavailable() -> Option<String> {
    if !rustix::process::getuid().is_root() {
        return Some("installing a package needs root".into());
    }
    for tool in ["dpkg", "dpkg-deb", "dpkg-query"] {
        if !have(tool) {
            return Some(format!("{tool} is missing: not a Debian system"));
        }
    }
    for tool in ["objdump", "strip", "adduser", "setpriv"] {
        if !have(tool) {
            return Some(format!("{tool} is missing (scripts/install-deps)"));
        }
    }
    if let Some(status) = package_status() {
        return Some(format!(
            "a shuttle package is on this machine (dpkg status {status}); the test would purge it"
        ));
    }
    if getent("passwd", "shuttle").is_some() || getent("group", "shuttle").is_some() {
        return Some("a user or group shuttle exists; the test would delete it".into());
    }
    if let Some(d) = SYSTEM_DIRS.iter().find(|d| Path::new(d).exists()) {
        return Some(format!("{d} exists; the test would delete it"));
    }
    None
}

/// Asserts `path`'s owner, group and permission bits.
fn assert_owned(path: &str, uid: u32, gid: u32, mode: u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (uid, gid, mode),
        "{path}: (uid, gid, mode)"
    );
}

/// `config` with `#KEY = …` (the template's commented default) set to `value`; asserts
/// the template has that line exactly once.
fn set_key(config: &str, key: &str, value: &str) -> String {
    let commented = format!("#{key} =");
    let hits = config
        .lines()
        .filter(|l| *l == commented || l.starts_with(&format!("{commented} ")))
        .count();
    assert_eq!(hits, 1, "the packaged config has one `{commented}` line");
    config
        .lines()
        .map(|l| {
            if l == commented || l.starts_with(&format!("{commented} ")) {
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The first `Key=` value of a unit file.
fn unit_value(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// The installed unit's ExecStart= (with `shuttle_args` instead of its arguments when
/// given), run as its User= and Group= with its AmbientCapabilities= and
/// CapabilityBoundingSet= (CAP_LEASE) and no new privileges, as systemd would start it.
fn as_unit(unit: &str, shuttle_args: Option<&[&str]>) -> Run {
    let text = std::fs::read_to_string(format!("/lib/systemd/system/{unit}"))
        .unwrap_or_else(|e| panic!("{unit}: {e}"));
    assert_eq!(unit_value(&text, "User").as_deref(), Some("shuttle"));
    assert_eq!(unit_value(&text, "Group").as_deref(), Some("shuttle"));
    let exec = unit_value(&text, "ExecStart").expect("ExecStart=");
    let mut argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(argv[0], "/usr/bin/shuttle", "{unit}: {exec}");
    if let Some(args) = shuttle_args {
        argv.truncate(1);
        argv.extend_from_slice(args);
    }
    let caps = unit_value(&text, "AmbientCapabilities").unwrap_or_default();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        "shuttle",
        "--regid",
        "shuttle",
        "--init-groups",
        "--no-new-privs",
    ]);
    if caps == "CAP_LEASE" {
        cmd.args([
            "--inh-caps",
            "+lease",
            "--ambient-caps",
            "+lease",
            "--bounding-set",
            "-all,+lease",
        ]);
    } else {
        assert!(caps.is_empty(), "{unit}: AmbientCapabilities={caps}");
    }
    cmd.arg("--")
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/var/lib/shuttle")
        .current_dir("/");
    Run::from(output(&mut cmd))
}

/// The package's per-run log files in /var/log/shuttle.
fn run_logs() -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir("/var/log/shuttle")
        .expect("/var/log/shuttle")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shuttle_") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    logs
}

/// Every packaged unit file name in packaging/.
fn packaged_units() -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(repo().join("packaging"))
        .expect("packaging/")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".service") || n.ends_with(".timer"))
        .collect();
    units.sort();
    assert!(units.len() >= 5, "units in packaging/: {units:?}");
    units
}

/// `systemd-analyze verify` of `units`; returns what it printed (nothing when clean).
fn systemd_verify(units: &[PathBuf], man: bool) -> (bool, String) {
    let o = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--man={}", if man { "yes" } else { "no" }))
            .args(units),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn package_installs_runs_as_its_user_upgrades_keeping_config_and_journal_and_purges_everything() {
    if let Some(why) = package_test_unavailable() {
        eprintln!("package test skipped: {why}");
        return;
    }
    // Two test suites on one machine would install and purge under each other.
    let lock = std::fs::File::create(std::env::temp_dir().join("shuttle-package-test.lock"))
        .expect("lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    if let Some(why) = package_test_unavailable() {
        eprintln!("package test skipped: {why}");
        return;
    }
    let started = std::time::Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("shuttle-package.")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let crate_version = env!("CARGO_PKG_VERSION");
    let (v1, v2) = (
        format!("{crate_version}+pkgtest1"),
        format!("{crate_version}+pkgtest2"),
    );
    // Both packages at once (the second is the upgrade): two scripts/package in parallel.
    let (deb1, deb2) = std::thread::scope(|s| {
        let second = s.spawn(|| build_package(&tmp.path().join("build2"), &v2));
        let first = build_package(&tmp.path().join("build1"), &v1);
        (first, second.join().expect("second package built"))
    });

    eprintln!("installing: {:?}", started.elapsed());
    // Install.
    let _purge = Purge;
    dpkg(&["-i", deb1.to_str().expect("utf-8 path")]);
    assert_eq!(installed_version(), v1);
    let files: Vec<String> = ok(Command::new("dpkg").args(["-L", "shuttle"]))
        .lines()
        .map(str::to_string)
        .collect();
    for f in [
        "/usr/bin/shuttle",
        "/usr/bin/run-shuttle",
        "/usr/bin/run-shuttle-defender-test",
        "/usr/lib/shuttle/defender-enabled",
        "/etc/shuttle/config.conf",
        "/etc/logrotate.d/shuttle",
        "/usr/share/man/man1/shuttle.1.gz",
        "/usr/share/man/man1/shuttle-run.1.gz",
        "/usr/share/bash-completion/completions/shuttle",
        "/usr/share/doc/shuttle/deployment.md",
        "/usr/lib/tmpfiles.d/shuttle.conf",
    ] {
        assert!(
            files.iter().any(|l| l == f),
            "{f} in the package: {files:?}"
        );
        assert!(Path::new(f).exists(), "{f} installed");
    }
    // The units, logrotate rules and tmpfiles.d entry are packaging/'s, byte for byte.
    for unit in packaged_units() {
        let installed = format!("/lib/systemd/system/{unit}");
        assert!(files.contains(&installed), "{installed} in the package");
        assert_eq!(
            std::fs::read(&installed).expect("installed unit"),
            std::fs::read(repo().join("packaging").join(&unit)).expect("packaged unit"),
            "{installed}"
        );
    }
    for (installed, packaged) in [
        ("/etc/logrotate.d/shuttle", "shuttle.logrotate"),
        ("/usr/lib/tmpfiles.d/shuttle.conf", "shuttle.tmpfiles"),
    ] {
        assert_eq!(
            std::fs::read(installed).expect("installed"),
            std::fs::read(repo().join("packaging").join(packaged)).expect("packaging/"),
            "{installed}"
        );
    }
    // The installed binary is the one just built (same version line, commit included).
    let version_of = |bin: &Path| ok(Command::new(bin).arg("--version"));
    assert_eq!(
        version_of(Path::new("/usr/bin/shuttle")),
        version_of(&shuttle_bin())
    );

    eprintln!("installed: {:?}", started.elapsed());
    // The service user and group, and the directories it owns.
    let user = getent("passwd", "shuttle").expect("user shuttle created");
    let group = getent("group", "shuttle").expect("group shuttle created");
    let uid: u32 = user[2].parse().expect("uid");
    let gid: u32 = group[2].parse().expect("gid");
    assert!(uid < 1000, "a system user: uid {uid}");
    assert_eq!(user[3], group[2], "primary group shuttle");
    assert_eq!(user[5], "/var/lib/shuttle", "home");
    assert_eq!(user[6], "/usr/sbin/nologin", "no login shell");
    for d in [
        "/var/lib/shuttle",
        "/var/lib/shuttle/quarantine",
        "/var/log/shuttle",
    ] {
        assert!(Path::new(d).is_dir(), "{d}");
        assert_owned(d, uid, gid, 0o750);
    }
    // The lock's directory: made by postinst, and again at boot by the tmpfiles.d entry
    // (/run is a tmpfs), so that a run by hand or from cron as user shuttle can lock.
    assert_owned("/run/shuttle", uid, gid, 0o770);
    if have("systemd-tmpfiles") {
        std::fs::remove_dir("/run/shuttle").expect("rmdir /run/shuttle");
        ok(Command::new("systemd-tmpfiles").args(["--create", "shuttle.conf"]));
        assert_owned("/run/shuttle", uid, gid, 0o770);
    }
    assert_owned("/etc/shuttle", 0, gid, 0o750);
    assert_owned("/etc/shuttle/config.conf", 0, gid, 0o640);
    assert_owned("/usr/bin/shuttle", 0, 0, 0o755);

    eprintln!("checking units: {:?}", started.elapsed());
    // The installed units, with their binaries and man pages in place, verify clean.
    let installed_units: Vec<PathBuf> = packaged_units()
        .iter()
        .map(|u| Path::new("/lib/systemd/system").join(u))
        .collect();
    if have("systemd-analyze") {
        let (success, text) = systemd_verify(&installed_units, have("man"));
        assert!(
            success && !text.contains("shuttle"),
            "systemd-analyze verify of the installed units:\n{text}"
        );
    } else {
        eprintln!("systemd-analyze missing: installed units not verified (scripts/install-deps)");
    }
    // logrotate accepts the installed rules with the real user and log directory.
    if have("logrotate") {
        let state = tmp.path().join("logrotate.state");
        let o = output(
            Command::new("logrotate")
                .arg("--debug")
                .arg("--state")
                .arg(&state)
                .arg("/etc/logrotate.d/shuttle"),
        );
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            o.status.success() && !text.contains("error"),
            "logrotate --debug /etc/logrotate.d/shuttle:\n{text}"
        );
    }

    eprintln!("units and logrotate checked: {:?}", started.elapsed());
    // The fresh config names what an administrator must set: `shuttle check` as the
    // service user (who may read the config through its group) says so, exit 2.
    let r = as_unit(
        "shuttle-run.service",
        Some(&["check", "--config", "/etc/shuttle/config.conf"]),
    );
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("source_path") && said.contains("destination_path"),
        "{said}"
    );

    // An administrator's setup: a drop directory the delivering party (root here)
    // writes and group shuttle may empty, a destination group shuttle writes, the
    // private clamd's socket; the rest stays as packaged (quarantine, logs, journal).
    let drop = tmp.path().join("drop");
    let protected = tmp.path().join("protected");
    for d in [&drop, &protected] {
        std::fs::create_dir(d).expect("mkdir");
        std::os::unix::fs::chown(d, Some(0), Some(gid)).expect("chown");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    }
    let clamd = clamd();
    std::fs::set_permissions(&clamd.dir, std::fs::Permissions::from_mode(0o755))
        .expect("the service user reaches the test clamd's socket and config");
    let packaged_config = std::fs::read_to_string("/etc/shuttle/config.conf").expect("config");
    let mut config = packaged_config.clone();
    for (key, value) in [
        ("source_path", drop.display().to_string()),
        ("destination_path", protected.display().to_string()),
        ("clamd_socket", clamd.socket.display().to_string()),
        ("clamd_config", clamd.conf().display().to_string()),
        ("delete_source_files_after_copying", "true".into()),
        ("max_scan_threads", "2".into()),
    ] {
        config = set_key(&config, key, &value);
    }
    std::fs::write("/etc/shuttle/config.conf", &config).expect("edit the config");

    let report = noise(70_000, 16);
    std::fs::create_dir(drop.join("reports")).expect("mkdir");
    std::fs::set_permissions(drop.join("reports"), std::fs::Permissions::from_mode(0o770))
        .expect("chmod");
    std::os::unix::fs::chown(drop.join("reports"), Some(0), Some(gid)).expect("chown");
    for (rel, bytes) in [("reports/week.csv", &report[..]), ("eicar.com", EICAR)] {
        let p = drop.join(rel);
        std::fs::write(&p, bytes).expect("drop a file");
        age(&p, 60);
    }

    // `shuttle check` passes and touches nothing.
    let r = as_unit(
        "shuttle-run.service",
        Some(&["check", "--config", "/etc/shuttle/config.conf"]),
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("configuration OK"), "{}", r.stdout);
    assert_eq!(Env::tree(&drop).len(), 2, "check moved nothing");
    assert!(Env::tree(&protected).is_empty());

    eprintln!("checked: {:?}", started.elapsed());
    // One run, exactly as shuttle-run.service starts it.
    let r = as_unit("shuttle-run.service", None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let delivered = Env::tree(&protected);
    assert_eq!(
        delivered,
        BTreeMap::from([("reports/week.csv".to_string(), report.clone())]),
        "only the clean file arrives, byte-identical"
    );
    let meta = std::fs::metadata(protected.join("reports/week.csv")).expect("delivered");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (uid, gid),
        "written by the service"
    );
    assert_eq!(meta.mode() & 0o007, 0, "never world-accessible");
    // Both sources go: the clean one delivered, the suspect one deleted (no hazard
    // archive configured).
    assert!(
        Env::tree(&drop).is_empty(),
        "sources removed once handled: {:?}",
        Env::tree(&drop).keys()
    );
    assert!(
        Env::tree(Path::new("/var/lib/shuttle/quarantine")).is_empty(),
        "quarantine emptied"
    );
    let last: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("/var/lib/shuttle/last-run.json").expect("--report-json"),
    )
    .expect("report JSON");
    assert_eq!(last["exit_code"], 0);
    assert_eq!(last["files"]["clean"], 1);
    assert_eq!(last["files"]["suspect"], 1);
    let journal = "/var/lib/shuttle/shuttle-journal.sqlite3";
    let m = std::fs::metadata(journal).expect("journal in tracking_data_path");
    assert_eq!((m.uid(), m.mode() & 0o007), (uid, 0), "{journal}");
    let logs = run_logs();
    assert_eq!(logs.len(), 1, "one per-run log: {logs:?}");
    let log = logs[0].to_str().expect("utf-8").to_string();
    assert_owned(&log, uid, gid, 0o640);
    let log_text = std::fs::read_to_string(&log).expect("log");
    assert!(
        log_text.contains("SUSPECT \"eicar.com\"")
            && log_text.contains("deleted (no hazard archive configured)"),
        "{log_text}"
    );

    eprintln!("ran: {:?}", started.elapsed());
    // Upgrade to a newer package: the changed config and the state stay.
    let journal_before = std::fs::read(journal).expect("journal");
    dpkg(&["-i", deb2.to_str().expect("utf-8 path")]);
    assert_eq!(installed_version(), v2);
    assert_eq!(
        std::fs::read_to_string("/etc/shuttle/config.conf").expect("config"),
        config,
        "the administrator's config survives the upgrade"
    );
    assert_owned("/etc/shuttle/config.conf", 0, gid, 0o640);
    assert!(
        !Path::new("/etc/shuttle/config.conf.dpkg-new").exists()
            && !Path::new("/etc/shuttle/config.conf.dpkg-old").exists(),
        "no conffile prompt leftovers"
    );
    assert_eq!(
        std::fs::read(journal).expect("journal kept"),
        journal_before,
        "the journal survives the upgrade untouched"
    );
    assert_eq!(run_logs(), logs, "the logs survive the upgrade");
    for d in ["/var/lib/shuttle", "/var/log/shuttle"] {
        assert_owned(d, uid, gid, 0o750);
    }
    eprintln!("upgraded: {:?}", started.elapsed());
    // The upgraded binary reads the journal the first one wrote.
    let r = as_unit(
        "shuttle-run.service",
        Some(&[
            "history",
            "--config",
            "/etc/shuttle/config.conf",
            "--json",
            "reports/week.csv",
        ]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let history: serde_json::Value = serde_json::from_str(&r.stdout).expect("history JSON");
    assert_eq!(
        history["records"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );

    eprintln!("history read: {:?}", started.elapsed());
    // Remove keeps configuration, state, logs and the user; purge takes everything.
    dpkg(&["-r", "shuttle"]);
    assert_eq!(package_status().as_deref(), Some("config-files"));
    assert!(!Path::new("/usr/bin/shuttle").exists());
    assert_eq!(
        std::fs::read_to_string("/etc/shuttle/config.conf").expect("config kept on remove"),
        config
    );
    assert_eq!(
        std::fs::read(journal).expect("journal kept on remove"),
        journal_before
    );
    assert!(getent("passwd", "shuttle").is_some(), "user kept on remove");

    dpkg(&["--purge", "shuttle"]);
    assert_eq!(package_status(), None, "purged");
    assert_eq!(getent("passwd", "shuttle"), None, "user deleted");
    assert_eq!(getent("group", "shuttle"), None, "group deleted");
    for d in SYSTEM_DIRS {
        assert!(!Path::new(d).exists(), "{d} removed by purge");
    }
    for f in &files {
        let gone = std::fs::symlink_metadata(f).is_err();
        let shared_dir = Path::new(f).is_dir() && !f.contains("shuttle");
        assert!(gone || shared_dir, "{f} left after purge");
    }
    eprintln!("package test: {:?}", started.elapsed());
}

/// The units as systemd reads them: `systemd-analyze verify` prints nothing about
/// them. The binaries they start are those of this build (ExecStart= rewritten to
/// them in a temp copy), so no root and no installed package are needed.
#[test]
fn units_verify_without_warnings() {
    if !have("systemd-analyze") {
        eprintln!("skipped: systemd-analyze is missing (scripts/install-deps installs systemd)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut paths = Vec::new();
    for unit in packaged_units() {
        let text = std::fs::read_to_string(repo().join("packaging").join(&unit)).expect("unit");
        let text = text
            .replace("/usr/bin/shuttle", shuttle_bin().to_str().expect("utf-8"))
            .replace(
                "/usr/lib/shuttle/defender-enabled",
                repo()
                    .join("packaging/defender-enabled")
                    .to_str()
                    .expect("utf-8"),
            );
        let p = dir.path().join(&unit);
        std::fs::write(&p, text).expect("write unit");
        paths.push(p);
    }
    let (success, text) = systemd_verify(&paths, false);
    assert!(
        success && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

/// The units keep the hardening and the behaviour deployment.md promises.
#[test]
fn units_keep_their_hardening() {
    let units = packaged_units();
    for unit in &units {
        let text =
            std::fs::read_to_string(repo().join("packaging").join(unit)).expect("packaged unit");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |line: &str| lines.contains(&line);
        if unit.ends_with(".service") {
            for required in [
                "User=shuttle",
                "Group=shuttle",
                "UMask=0007",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "ProtectHome=yes",
                "PrivateTmp=yes",
                "StateDirectory=shuttle",
                "LogsDirectory=shuttle",
            ] {
                assert!(has(required), "{unit}: {required}");
            }
            let bounding = unit_value(&text, "CapabilityBoundingSet").expect("bounding set");
            assert!(
                bounding.is_empty() || bounding == "CAP_LEASE",
                "{unit}: CapabilityBoundingSet={bounding}"
            );
            assert!(
                !lines.iter().any(|l| l.starts_with("ReadWritePaths=")),
                "{unit}: write access is the administrator's drop-in"
            );
        } else {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with("OnCalendar=") && l.len() > 11),
                "{unit}: OnCalendar="
            );
            assert!(has("Persistent=true"), "{unit}: Persistent=true");
            let service = unit.replace(".timer", ".service");
            assert!(units.contains(&service), "{unit} starts {service}");
        }
    }
    for unit in ["shuttle-run.service", "shuttle-watch.service"] {
        let text = std::fs::read_to_string(repo().join("packaging").join(unit)).expect("unit");
        assert_eq!(
            unit_value(&text, "RuntimeDirectory").as_deref(),
            Some("shuttle"),
            "{unit}: the lock's directory"
        );
        assert_eq!(
            unit_value(&text, "RuntimeDirectoryPreserve").as_deref(),
            Some("yes"),
            "{unit}: a timer run and a watch lock the same file"
        );
        assert_eq!(
            unit_value(&text, "AmbientCapabilities").as_deref(),
            Some("CAP_LEASE")
        );
    }
    let watch =
        std::fs::read_to_string(repo().join("packaging/shuttle-watch.service")).expect("unit");
    assert_eq!(
        unit_value(&watch, "RestartPreventExitStatus").as_deref(),
        Some("2"),
        "a configuration error is not retried"
    );
    assert_eq!(unit_value(&watch, "Restart").as_deref(), Some("on-failure"));
    let run = std::fs::read_to_string(repo().join("packaging/shuttle-run.service")).expect("unit");
    assert_eq!(
        unit_value(&run, "SuccessExitStatus").as_deref(),
        Some("3"),
        "a held lock is not a failure"
    );
}

/// The packaged logrotate rules, run by logrotate itself on a copy pointed at a temp
/// directory: a long-running watch's log past 50 MiB is rotated (copied, truncated in
/// place), small per-run logs are left alone.
#[test]
fn logrotate_rotates_a_large_watch_log_and_leaves_run_logs() {
    if !have("logrotate") {
        eprintln!("skipped: logrotate is missing (scripts/install-deps installs it)");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = dir.path().join("log");
    std::fs::create_dir(&logs).expect("mkdir");
    let user = ok(Command::new("id").arg("-un")).trim().to_string();
    let group = ok(Command::new("id").arg("-gn")).trim().to_string();
    let rules = std::fs::read_to_string(repo().join("packaging/shuttle.logrotate"))
        .expect("packaging/shuttle.logrotate");
    assert!(
        rules.contains("/var/log/shuttle/shuttle_*.log {"),
        "{rules}"
    );
    assert!(rules.contains("su shuttle shuttle"), "{rules}");
    let rules = rules
        .replace("/var/log/shuttle/", &format!("{}/", logs.display()))
        .replace("su shuttle shuttle", &format!("su {user} {group}"));
    let conf = dir.path().join("shuttle.logrotate");
    std::fs::write(&conf, rules).expect("write rules");
    let state = dir.path().join("state");

    let o = output(
        Command::new("logrotate")
            .arg("--debug")
            .arg("--state")
            .arg(&state)
            .arg(&conf),
    );
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success() && !text.contains("error"),
        "logrotate --debug:\n{text}"
    );

    let watch = logs.join("shuttle_20260101_000000_100.log");
    let big = std::fs::File::create(&watch).expect("watch log");
    big.set_len(51 << 20).expect("51 MiB");
    drop(big);
    let run = logs.join("shuttle_20260101_000500_200.log");
    std::fs::write(&run, b"one run\n").expect("run log");
    let o = output(
        Command::new("logrotate")
            .arg("--state")
            .arg(&state)
            .arg(&conf),
    );
    assert!(
        o.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .expect("log dir")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "shuttle_20260101_000000_100.log",
            "shuttle_20260101_000000_100.log.1",
            "shuttle_20260101_000500_200.log",
        ]
    );
    assert_eq!(
        std::fs::metadata(&watch).expect("kept").len(),
        0,
        "truncated in place"
    );
    assert_eq!(
        std::fs::metadata(logs.join("shuttle_20260101_000000_100.log.1"))
            .expect("rotated")
            .len(),
        51 << 20
    );
    assert_eq!(std::fs::read(&run).expect("run log"), b"one run\n");
}

/// `log_retention_days`: a run removes the per-run logs (and their rotated and
/// compressed forms) older than that, and nothing else.
#[test]
fn a_run_expires_old_per_run_logs_and_keeps_fresh_ones() {
    let mut env = Env::new();
    env.set("log_retention_days", "7");
    std::fs::create_dir_all(&env.logs).expect("log dir");
    let day = 86_400;
    let old = [
        ("shuttle_20250101_000000_11.log", 8 * day),
        ("shuttle_20250101_000000_12.log.1", 30 * day),
        ("shuttle_20250101_000000_13.log.2.gz", 8 * day),
    ];
    let fresh = [
        ("shuttle_20260101_000000_21.log", 6 * day),
        ("shuttle_20260101_000000_22.log.1", 60),
        ("shuttle_20260101_000000_23.log.2.gz", 6 * day),
        // Not Shuttle's: never removed, however old.
        ("other.log", 90 * day),
        ("shuttle-notes.txt", 90 * day),
    ];
    for (name, age_secs) in old.iter().chain(&fresh) {
        let p = env.logs.join(name);
        std::fs::write(&p, name.as_bytes()).expect("write log");
        age(&p, *age_secs);
    }
    env.drop_file("a.txt", b"payload");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("a.txt").map(Vec::as_slice),
        Some(&b"payload"[..])
    );

    let left = Env::tree(&env.logs);
    for (name, _) in old {
        assert!(!left.contains_key(name), "{name} expired");
    }
    for (name, _) in fresh {
        assert_eq!(
            left.get(name).map(Vec::as_slice),
            Some(name.as_bytes()),
            "{name} kept as it was"
        );
    }
    let current: Vec<&String> = left
        .keys()
        .filter(|n| !fresh.iter().any(|(f, _)| f == n))
        .collect();
    assert_eq!(current.len(), 1, "only this run's log is new: {current:?}");
    let text = String::from_utf8_lossy(&left[current[0]]).into_owned();
    assert!(
        text.contains("log retention: removed 3 log file(s) older than 7 days"),
        "{text}"
    );
}
