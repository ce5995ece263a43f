//! Bad input: strange names, deep trees, empty and sparse files, hard links, symlinks
//! (also planted between two steps of a run). No crash, no hang, a log line, nothing lost.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::common::*;

#[test]
fn strange_names_are_delivered_or_skipped_with_a_reason() {
    let mut env = Env::new();
    // Backslashes and shell characters are refused by default (tests/migrate.rs);
    // a site may take them.
    env.set("allow_special_characters", "true");
    let long = "x".repeat(251) + ".bin"; // 255 bytes, the longest name Linux allows
    env.drop_file("back\\slash.txt", b"backslash");
    env.drop_file(&long, b"long name");
    env.drop_file("sp ace & $(dollar).txt", b"shell chars");
    env.drop_file("-leading-dash", b"dash");
    env.drop_file("line\nbreak", b"newline");
    env.drop_file("tab\there", b"tab");
    let bad = env.src.join(OsStr::from_bytes(b"latin1-\xe9t\xe9.txt"));
    std::fs::write(&bad, b"not utf-8").unwrap();
    age(&bad, 60);
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dst = Env::tree(&env.dst);
    assert_eq!(dst["back\\slash.txt"], b"backslash");
    assert_eq!(dst[&long], b"long name");
    assert_eq!(dst["sp ace & $(dollar).txt"], b"shell chars");
    assert_eq!(dst.len(), 3, "{:?}", dst.keys());
    for kept in ["-leading-dash", "line\nbreak", "tab\there"] {
        assert!(env.src.join(kept).exists(), "{kept:?} left in the source");
    }
    assert!(bad.exists());
    let log = env.log_text();
    assert!(log.contains("unsafe name: starts with '-'"), "{log}");
    assert!(
        log.contains("unsafe name: contains control characters"),
        "{log}"
    );
    assert!(log.contains("unsafe name: not valid UTF-8"), "{log}");
    assert_eq!(env.report()["skipped_by_reason"]["unsafe_name"], 4);
}

#[test]
fn a_tree_100_levels_deep_and_empty_files_arrive_whole() {
    let env = Env::new();
    let deep: PathBuf = (0..100).map(|i| format!("d{i}")).collect();
    let rel = deep.join("bottom.txt");
    env.drop_file(rel.to_str().unwrap(), b"deep down");
    env.drop_file("empty.dat", b"");
    env.drop_file("dir/also-empty", b"");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(env.dst.join(&rel)).unwrap(), b"deep down");
    assert_eq!(std::fs::read(env.dst.join("empty.dat")).unwrap(), b"");
    assert_eq!(std::fs::read(env.dst.join("dir/also-empty")).unwrap(), b"");
    assert!(Env::tree(&env.src).is_empty());
}

#[test]
fn hard_linked_files_stay_in_place_unless_allowed() {
    let env = Env::new();
    let a = env.drop_file("a/one.bin", &noise(10_000, 1));
    std::fs::create_dir_all(env.src.join("b")).unwrap();
    std::fs::hard_link(&a, env.src.join("b/two.bin")).unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        Env::tree(&env.dst).is_empty(),
        "a hard-linked file was taken"
    );
    assert_eq!(Env::tree(&env.src).len(), 2, "sources stay");
    assert_eq!(env.report()["skipped_by_reason"]["hard_linked"], 2);
}

#[test]
fn hard_links_are_two_files_and_both_arrive_when_allowed() {
    let env = Env::new();
    let a = env.drop_file("a/one.bin", &noise(10_000, 1));
    std::fs::create_dir_all(env.src.join("b")).unwrap();
    std::fs::hard_link(&a, env.src.join("b/two.bin")).unwrap();
    let r = env.run(&["--allow-hard-links"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Removing one name changes the shared inode's ctime; if the other name was being
    // copied at that moment it counts as changed and waits for the next run.
    if Env::tree(&env.dst).len() < 2 {
        assert!(
            env.log_text().contains("source changed while being copied"),
            "{}",
            env.log_text()
        );
        age(&env.src.join("b/two.bin"), 60);
        let r = env.run(&["--allow-hard-links"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let dst = Env::tree(&env.dst);
    assert_eq!(dst["a/one.bin"], noise(10_000, 1));
    assert_eq!(dst["b/two.bin"], noise(10_000, 1));
    let (x, y) = (
        std::fs::metadata(env.dst.join("a/one.bin")).unwrap(),
        std::fs::metadata(env.dst.join("b/two.bin")).unwrap(),
    );
    assert_ne!(x.ino(), y.ino(), "delivered as independent files");
    assert!(Env::tree(&env.src).is_empty());
}

#[test]
fn symlinks_inside_and_out_of_the_tree_are_never_followed() {
    let env = Env::new();
    let outside = env.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"outside secret").unwrap();
    env.drop_file("real/file.txt", b"real");
    std::os::unix::fs::symlink(&outside, env.src.join("to-outside-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), env.src.join("to-outside-file"))
        .unwrap();
    std::os::unix::fs::symlink("real", env.src.join("to-inside-dir")).unwrap();
    std::os::unix::fs::symlink("real/file.txt", env.src.join("to-inside-file")).unwrap();
    std::os::unix::fs::symlink("nowhere", env.src.join("dangling")).unwrap();
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        Env::tree(&env.dst).keys().collect::<Vec<_>>(),
        ["real/file.txt"]
    );
    assert_eq!(
        std::fs::read(outside.join("secret.txt")).unwrap(),
        b"outside secret"
    );
    assert_eq!(env.report()["skipped_by_reason"]["symlink"], 5);
}

#[test]
fn a_destination_subdirectory_that_is_a_symlink_is_never_written_through() {
    let env = Env::new();
    let outside = env.root().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, env.dst.join("sub")).unwrap();
    env.drop_file("sub/file.txt", b"payload");
    let r = env.run(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("symlinks are never followed"),
        "{}",
        r.stderr
    );
    assert!(
        Env::tree(&outside).is_empty(),
        "nothing escaped the destination"
    );
    assert_eq!(
        std::fs::read(env.src.join("sub/file.txt")).unwrap(),
        b"payload"
    );
}

/// Symlinks planted between two steps of a run: the run pauses at a kill point, which
/// exists only in builds with the `crashpoints` feature (scripts/test enables it).
#[cfg(feature = "crashpoints")]
mod planted {
    use super::*;
    use std::path::Path;
    use std::process::{Child, Stdio};

    /// Starts a run that pauses at kill point `at`; returns once it is paused there.
    fn run_paused_at(env: &Env, at: &str) -> (Child, PathBuf) {
        let mut cmd = env.run_command();
        cmd.stderr(Stdio::piped());
        env.spawn_paused(cmd, at)
    }

    fn swap_for_symlink(dir: &Path, target: &Path) {
        let aside = dir.with_extension("aside");
        std::fs::rename(dir, &aside).unwrap();
        std::os::unix::fs::symlink(target, dir).unwrap();
    }

    #[test]
    fn a_symlink_planted_in_the_quarantine_between_scan_and_delivery_cannot_redirect_the_read() {
        let env = Env::new();
        env.drop_file("sub/file.txt", b"the scanned bytes");
        let evil = env.root().join("evil");
        std::fs::create_dir_all(&evil).unwrap();
        std::fs::write(evil.join("file.txt"), EICAR).unwrap();
        let (child, resume) = run_paused_at(&env, "scan: scanned, before disposal");
        swap_for_symlink(&env.quarantine.join("sub"), &evil);
        std::fs::write(&resume, b"").unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Delivery goes through the handle of the directory the copy was made in (now
        // `sub.aside`), never through the planted name: the scanned copy is delivered.
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let delivered = Env::tree(&env.dst);
        assert!(
            delivered.values().all(|v| v.as_slice() != EICAR),
            "the planted file was not delivered"
        );
        assert_eq!(
            delivered.get("sub/file.txt").map(Vec::as_slice),
            Some(&b"the scanned bytes"[..]),
            "{stderr}"
        );
        assert_eq!(delivered.len(), 1, "{:?}", delivered.keys());
        assert!(
            !env.src.join("sub/file.txt").exists(),
            "the source goes once its scanned copy is delivered: {stderr}"
        );
        assert_eq!(
            std::fs::read(evil.join("file.txt")).unwrap(),
            EICAR,
            "the planted file is untouched"
        );
    }

    #[test]
    fn a_symlink_planted_in_the_destination_before_delivery_cannot_redirect_the_write() {
        let env = Env::new();
        std::fs::create_dir_all(env.dst.join("sub")).unwrap();
        env.drop_file("sub/file.txt", b"payload");
        let outside = env.root().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let (child, resume) = run_paused_at(&env, "scan: scanned, before disposal");
        swap_for_symlink(&env.dst.join("sub"), &outside);
        std::fs::write(&resume, b"").unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            Env::tree(&outside).is_empty(),
            "nothing written outside the destination"
        );
        assert_eq!(
            std::fs::read(env.src.join("sub/file.txt")).unwrap(),
            b"payload"
        );
        assert!(Env::tree(&env.quarantine).is_empty());
    }
}

/// A mistyped key would leave its setting at the default: `check` calls it a
/// problem (exit 2) and names the key meant; `run` warns and goes on.
#[test]
fn a_mistyped_key_is_a_problem_in_check_and_a_warning_in_run() {
    let env = Env::new();
    let mut text = std::fs::read_to_string(&env.config).unwrap();
    text.push_str("[settings]\ndelete_source_files_after_coping = false\n");
    std::fs::write(&env.config, text).unwrap();
    let config = env.config.to_str().unwrap();
    let c = env.shuttle(&["check", "--config", config]);
    assert_eq!(c.code, 2, "{}", c.stdout);
    let problem = c
        .stdout
        .lines()
        .find(|l| l.starts_with("problem: unknown key"))
        .unwrap_or_else(|| panic!("{}", c.stdout));
    assert!(
        problem.contains("\"delete_source_files_after_coping\"")
            && problem.contains("did you mean delete_source_files_after_copying?")
            && problem.contains("line "),
        "{problem}"
    );
    env.drop_file("a.txt", b"a");
    let r = env.run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("WARN config: unknown key"),
        "{}",
        r.stderr
    );
    assert!(Env::tree(&env.dst).contains_key("a.txt"));
}

/// Output into a pipe whose reader is gone (`shuttle status | head -1` once head has
/// exited) ends the process the way SIGPIPE ends any Unix tool: quietly, no panic.
#[test]
fn writing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let env = Env::new();
    let config = env.config.to_str().unwrap();
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    // clap's help: the write error is ignored, the exit quiet.
    let help = env.command(&["--help"]).stdout(w).output().unwrap();
    let stderr = String::from_utf8_lossy(&help.stderr);
    assert!(
        help.status.code() == Some(0) && !stderr.contains("panicked"),
        "{stderr}"
    );
    for args in [
        vec!["status", "--config", config],
        vec!["history", "--config", config, "x"],
        vec!["generate", "config"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = env
            .command(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(13),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
