//! A private PostgreSQL 15 server for the fleet tests: `initdb` as the `postgres` user
//! into a temp dir, `pg_ctl` on a free port on 127.0.0.1 with its unix socket in that
//! dir. Stopped (immediately) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    pub fn start() -> Postgres {
        assert!(
            Path::new(BIN).join("initdb").exists(),
            "PostgreSQL 15 is not installed: run scripts/install-deps"
        );
        let dir = tempfile::Builder::new()
            .prefix("shuttle-pg.")
            .tempdir()
            .unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(chown.success());
        let data = dir.path().join("data");
        as_postgres(&[
            &format!("{BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let pg = Postgres {
            port: super::free_port(),
            dir,
        };
        pg.ctl("start");
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn ctl(&self, what: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            self.data().to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            what,
        ]);
    }

    /// The URL nodes are given (trust authentication: no password needed).
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops and starts the server (every open connection is cut).
    pub fn restart(&self) {
        self.ctl("restart");
    }

    pub fn stop(&self) {
        self.ctl("stop");
    }

    pub fn start_again(&self) {
        self.ctl("start");
    }

    /// Runs one query and returns its rows (psql's unaligned, tuples-only output).
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new(format!("{BIN}/psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{BIN}/pg_ctl"))
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}
