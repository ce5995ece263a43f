//! Shuttle as deployed: mount layouts systemd's sandbox makes (bind mounts), and
//! uploads still held open for writing by another process.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

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
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg("exec 3>>\"$0\"; sleep 30")
        .arg(&path)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
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
