//! Records the commit the binary is built from, for `shuttle --version`.
//!
//! `git rev-parse --short HEAD` when the sources are a git checkout and git is
//! installed; `SHUTTLE_COMMIT` in the environment wins (a build from a source tarball
//! can pass it); else "unknown". Cargo reruns this only when HEAD, the branch it points
//! to or packed-refs change, so ordinary builds do not pay for it.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SHUTTLE_COMMIT");
    // In a git worktree .git is a file: ask git where HEAD and the refs really are.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        println!("cargo:rerun-if-changed={packed}");
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(r) = git(&["rev-parse", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={r}");
    }
    let commit = std::env::var("SHUTTLE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SHUTTLE_COMMIT={commit}");
}
