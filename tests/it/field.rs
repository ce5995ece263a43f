//! Shuttle as deployed: mount layouts systemd's sandbox makes (bind mounts), and
//! uploads still held open for writing by another process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `mount --bind dir dir`: a second mount of the same filesystem, as systemd's
/// `ReadWritePaths=` makes. Unmounted when dropped.
struct BindMount(PathBuf);

impl BindMount {
    fn onto_itself(dir: &Path) -> BindMount {
        let ok = Command::new("mount")
            .arg("--bind")
            .arg(dir)
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount --bind {}", dir.display());
        BindMount(dir.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn delivers_across_a_bind_mount(which: fn(&Env) -> &Path) {
    if !is_root() {
        eprintln!("skipped: bind mounts need root");
        return;
    }
    let env = Env::new();
    env.drop_file("sub/a.bin", &noise(300_000, 7));
    env.drop_file("b.txt", b"hello");
    let _m = BindMount::onto_itself(which(&env));
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst["sub/a.bin"], noise(300_000, 7));
    assert_eq!(dst["b.txt"], b"hello");
    assert!(
        Env::tree(&env.src).is_empty(),
        "sources removed after delivery"
    );
    assert_eq!(env.report()["files"]["clean"], 2);
}

#[test]
fn a_bind_mounted_destination_gets_every_file() {
    delivers_across_a_bind_mount(|e| &e.dst);
}

#[test]
fn a_bind_mounted_quarantine_delivers_every_file() {
    delivers_across_a_bind_mount(|e| &e.quarantine);
}

#[test]
fn a_file_held_open_for_writing_is_neither_taken_nor_removed() {
    let env = Env::new();
    let path = env.drop_file("upload.bin", &noise(100_000, 3));
    // A writer holding the file open (as an SFTP or Samba upload that paused),
    // older than stability_seconds.
    let mut writer = writer_holding(&path);
    age(&path, 60);
    let r = env.run(&[]);
    let _ = writer.kill();
    let _ = writer.wait();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        Env::tree(&env.dst).is_empty(),
        "a file being written was taken"
    );
    assert_eq!(Env::tree(&env.src)["upload.bin"], noise(100_000, 3));
}

/// A FUSE filesystem (tests/fixtures/hangfs) with a file held open by a `sleep`,
/// which stops answering on [`HungMount::hang`]: what a hard-mounted NFS share whose
/// server went away is to every other program. Dropping it answers again first, then
/// stops the holder and the filesystem, so that a failed assertion leaves nothing
/// hanging for the tests running beside it.
struct HungMount {
    dir: PathBuf,
    trigger: PathBuf,
    fs: std::process::Child,
    holder: Option<std::process::Child>,
}

impl HungMount {
    fn start(root: &Path) -> HungMount {
        let dir = root.join("hung");
        let trigger = root.join("hang-now");
        std::fs::create_dir(&dir).unwrap();
        let log = root.join("hangfs.log");
        let fs = Command::new(repo().join("tests/fixtures/hangfs"))
            .arg(&dir)
            .arg(&trigger)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("tests/fixtures/hangfs runs");
        let mut m = HungMount {
            dir,
            trigger,
            fs,
            holder: None,
        };
        let held = m.dir.join("held.txt");
        let mut gone = None;
        let mounted = wait_until(Duration::from_secs(20), || {
            gone = m.fs.try_wait().unwrap();
            gone.is_some() || held.exists()
        });
        assert!(
            mounted && gone.is_none(),
            "hangfs did not mount (exit {gone:?}; scripts/install-deps installs \
             python3-fusepy): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        m.holder = Some(process_holding(&held, "3<"));
        m
    }

    fn hang(&self) {
        std::fs::write(&self.trigger, b"").unwrap();
    }

    /// The holder's descriptor for the file, as every pass over `/proc` finds it.
    fn fd_link(&self) -> PathBuf {
        let pid = self.holder.as_ref().map(|h| h.id()).unwrap_or(0);
        PathBuf::from(format!("/proc/{pid}/fd/3"))
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.trigger);
        if let Some(h) = self.holder.as_mut() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = self.fs.kill();
        let _ = self.fs.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Is `child` still running `secs` seconds from now? (A process waiting on a FUSE
/// request the daemon has taken cannot be killed, not even by SIGKILL: it is reaped
/// only after the filesystem answers again.)
fn still_running_after(child: &mut std::process::Child, secs: u64) -> bool {
    !wait_until(Duration::from_secs(secs), || {
        child.try_wait().unwrap().is_some()
    })
}

#[test]
fn a_file_held_open_on_a_mount_that_stopped_answering_does_not_stall_a_run() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: mounting a FUSE filesystem needs root and /dev/fuse");
        return;
    }
    let env = Env::new();
    env.drop_file("plc-1/batch.csv", b"t,value\n1,42\n");
    let mount = HungMount::start(env.root());
    mount.hang();

    // The fixture does hang: a plain stat of the holder's descriptor (what lsof does,
    // and Shuttle's pass over /proc did) waits for an answer that does not come.
    let mut stat = Command::new("stat")
        .arg("-L")
        .arg(mount.fd_link())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        still_running_after(&mut stat, 2),
        "stat of a file on the hung mount returned: the fixture does not hang"
    );

    let mut run = env
        .run_command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let hung = still_running_after(&mut run, 60);
    drop(mount);
    let _ = stat.wait();
    if hung {
        let _ = run.kill();
        let _ = run.wait();
        panic!("shuttle run hung on a file held open on a mount that stopped answering");
    }
    let r = Run::from(run.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(Env::tree(&env.dst)["plc-1/batch.csv"], b"t,value\n1,42\n");
    assert!(Env::tree(&env.src).is_empty(), "the source was not removed");
    assert_eq!(env.report()["files"]["clean"], 1);
}

/// The packaged service's user, and another user uploading into the drop directory
/// (Samba, SFTP). Neither needs a passwd entry: `setpriv` switches to bare IDs.
const SERVICE: u32 = 64_001;
const UPLOADER: u32 = 64_002;

/// `file` is there with exactly `bytes` (compared without printing megabytes).
fn holds(file: Option<&Vec<u8>>, bytes: &[u8]) -> bool {
    file.is_some_and(|f| f.as_slice() == bytes)
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An Env laid out as docs/deployment.md prescribes: the drop directory belongs to
/// the uploader with the service's group (rwx), everything else to the service.
fn service_env() -> Env {
    let env = Env::new();
    chown(env.root(), SERVICE, SERVICE);
    chmod(env.root(), 0o755);
    chown(&env.src, UPLOADER, SERVICE);
    chmod(&env.src, 0o2770);
    chown(&env.quarantine, SERVICE, SERVICE);
    chown(&env.dst, SERVICE, SERVICE);
    chmod(&env.config, 0o644);
    env
}

/// An upload by the other user: written, owned by it, aged past the stability window.
fn upload(env: &Env, rel: &str, bytes: &[u8]) -> PathBuf {
    let p = env.drop_file(rel, bytes);
    // The drop directory is setgid: uploads get the service's group.
    chown(&p, UPLOADER, SERVICE);
    chmod(&p, 0o640);
    p
}

/// A process of the uploader holding `path` open for writing (a paused upload).
fn uploader_writing(path: &Path) -> std::process::Child {
    let child = Command::new("setpriv")
        .args([
            "--reuid",
            &UPLOADER.to_string(),
            "--regid",
            &UPLOADER.to_string(),
        ])
        .arg("--clear-groups")
        .args(["sh", "-c", "exec 3>>\"$0\"; exec sleep 60"])
        .arg(path)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    age(path, 60);
    child
}

/// Shuttle run as the service user, with `CAP_LEASE` as the packaged units grant it
/// (`AmbientCapabilities=CAP_LEASE`) or without.
fn as_service(env: &Env, cap_lease: bool, args: &[&str]) -> Run {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &SERVICE.to_string(),
        "--regid",
        &SERVICE.to_string(),
    ])
    .arg("--clear-groups");
    if cap_lease {
        c.args(["--inh-caps", "+lease", "--ambient-caps", "+lease"]);
    }
    c.arg(shuttle_bin())
        .args(args)
        .env_remove("SHUTTLE_CONFIG_PATH")
        .env("HOME", env.root())
        .stdin(std::process::Stdio::null());
    Run::from(c.output().unwrap())
}

fn run_as_service(env: &Env, cap_lease: bool) -> Run {
    let (config, report) = (env.config.to_str().unwrap(), env.report.to_str().unwrap());
    as_service(
        env,
        cap_lease,
        &["run", "--config", config, "--report-json", report],
    )
}

#[test]
fn as_the_service_user_with_cap_lease_closed_uploads_go_and_open_ones_stay() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let env = service_env();
    upload(&env, "done.bin", &noise(200_000, 11));
    let open = upload(&env, "paused.bin", &noise(2 << 20, 12));
    let mut writer = uploader_writing(&open);
    let r = run_as_service(&env, true);
    let _ = writer.kill();
    let _ = writer.wait();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert!(
        holds(dst.get("done.bin"), &noise(200_000, 11)),
        "done.bin has other bytes or is missing"
    );
    assert!(
        !dst.contains_key("paused.bin"),
        "a file being written was taken"
    );
    let src = Env::tree(&env.src);
    assert!(
        holds(src.get("paused.bin"), &noise(2 << 20, 12)),
        "the paused upload is intact"
    );
    assert!(
        !src.contains_key("done.bin"),
        "the delivered source is removed"
    );
    assert_eq!(env.report()["skipped_by_reason"]["open_by_process"], 1);

    // Once the writer is gone, the next run takes the file whole.
    let r = run_as_service(&env, true);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        holds(Env::tree(&env.dst).get("paused.bin"), &noise(2 << 20, 12)),
        "paused.bin has other bytes or is missing"
    );
}

#[test]
fn as_the_service_user_without_cap_lease_other_users_files_stay_and_check_says_why() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let env = service_env();
    upload(&env, "done.bin", &noise(50_000, 21));
    let open = upload(&env, "paused.bin", &noise(300_000, 22));
    let mut writer = uploader_writing(&open);
    let r = run_as_service(&env, false);
    let _ = writer.kill();
    let _ = writer.wait();
    // Neither can be proven closed: both stay, whole; the run says why at start.
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(Env::tree(&env.dst).is_empty());
    let src = Env::tree(&env.src);
    assert!(
        holds(src.get("done.bin"), &noise(50_000, 21)),
        "done.bin has other bytes or is missing"
    );
    assert!(
        holds(src.get("paused.bin"), &noise(300_000, 22)),
        "paused.bin has other bytes or is missing"
    );
    assert!(r.stderr.contains("without CAP_LEASE"), "{}", r.stderr);

    let config = env.config.to_str().unwrap();
    let c = as_service(&env, false, &["check", "--config", config]);
    assert_eq!(c.code, 2, "{}", c.stdout);
    assert!(
        c.stdout.contains("problem: open-writer detection")
            && c.stdout.contains("AmbientCapabilities=CAP_LEASE"),
        "{}",
        c.stdout
    );
    let c = as_service(&env, true, &["check", "--config", config]);
    assert_eq!(c.code, 0, "{}", c.stdout);
    assert!(c.stdout.contains("configuration OK"), "{}", c.stdout);
}

#[test]
fn check_as_the_service_user_names_each_directory_it_cannot_use_and_the_fix() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let mut env = service_env();
    // As an administrator would leave them: made by root for the service.
    std::fs::create_dir_all(&env.logs).unwrap();
    chown(&env.dst, 0, 0);
    let hazard = env.root().join("hazard");
    std::fs::create_dir(&hazard).unwrap();
    let (_home, key) = gpg_key(env.root(), "default");
    chmod(&key, 0o644);
    env.set("hazard_archive_path", hazard.to_str().unwrap());
    env.set("hazard_encryption_key_path", key.to_str().unwrap());
    env.set(
        "metrics_path",
        env.root().join("metrics/shuttle.prom").to_str().unwrap(),
    );
    let config = env.config.to_str().unwrap().to_string();
    chmod(&env.config, 0o644);
    let c = as_service(&env, true, &["check", "--config", &config]);
    assert_eq!(c.code, 2, "{}", c.stdout);
    let problems: Vec<&str> = c
        .stdout
        .lines()
        .filter(|l| l.starts_with("problem:"))
        .collect();
    let about = |key: &str| problems.iter().find(|p| p.contains(key)).copied();
    for key in [
        "log_path",
        "destination_path",
        "hazard_archive_path",
        "metrics_path",
    ] {
        let p = about(key).unwrap_or_else(|| panic!("no problem about {key}: {}", c.stdout));
        assert!(p.contains("uid 64001") && p.contains("fix:"), "{p}");
    }
    assert_eq!(problems.len(), 4, "{}", c.stdout);

    // Fixed as the messages say: check is satisfied, and so is a run.
    for d in [&env.logs, &env.dst, &hazard] {
        chown(d, SERVICE, SERVICE);
    }
    let metrics = env.root().join("metrics");
    std::fs::create_dir(&metrics).unwrap();
    chown(&metrics, SERVICE, SERVICE);
    let c = as_service(&env, true, &["check", "--config", &config]);
    assert_eq!(c.code, 0, "{}", c.stdout);
    upload(&env, "a.txt", b"a");
    let r = run_as_service(&env, true);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).get("a.txt").map(Vec::as_slice),
        Some(&b"a"[..])
    );
    assert!(metrics.join("shuttle.prom").exists());
}
