//! Shared fixtures for the integration tests: a real private clamd with the test
//! signature database, a scratch installation (drop, quarantine, destination, logs,
//! journal, config file) per test, and the built `shuttle` binary.
#![allow(dead_code)]

pub mod fake_clamd;
pub mod pg;
pub mod smtp;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

pub const EICAR: &[u8] = concat!(
    "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD",
    "-ANTIVIRUS-TEST-FILE!$H+H*"
)
.as_bytes();
pub const MARKER: &[u8] = b"... SHUTTLE-TEST-MARKER ...";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shuttle_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shuttle"))
}

/// A private clamd for this test binary: unix socket and a TCP port on 127.0.0.1,
/// StreamMaxLength 1 MiB (so INSTREAM limits can be tested with small files).
pub struct Clamd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub tcp: String,
}

pub const STREAM_MAX: u64 = 1 << 20;

/// Starts clamd once per test binary. It is started from a thread that lives as long
/// as the process and gets SIGKILL when the process exits (PR_SET_PDEATHSIG), so no
/// clamd outlives the tests.
pub fn clamd() -> &'static Clamd {
    static CLAMD: OnceLock<Clamd> = OnceLock::new();
    CLAMD.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = Clamd::start();
            tx.send(started).unwrap();
            loop {
                std::thread::park();
            }
        });
        let (clamd, _child) = rx.recv().unwrap();
        clamd
    })
}

/// The scan limits of the shared test clamd.
pub const DEFAULT_LIMITS: &str =
    "StreamMaxLength 1M\nMaxFileSize 400M\nMaxScanSize 400M\nAlertExceedsMax yes\n";

impl Clamd {
    /// Starts a new private clamd and waits until it answers. The returned child dies
    /// with the thread that started it (PR_SET_PDEATHSIG) or when killed.
    pub fn start() -> (Clamd, std::process::Child) {
        Clamd::start_with(DEFAULT_LIMITS, &[])
    }

    /// A private clamd with `limits` (clamd.conf lines: MaxFileSize, AlertExceedsMax,
    /// …; what they leave out is clamd's compiled-in default) and a signature database
    /// made by `make-test-signatures DIR signatures…` (none: dated now;
    /// `["--age-days", "10"]`; `["--undated"]`).
    pub fn start_with(limits: &str, signatures: &[&str]) -> (Clamd, std::process::Child) {
        let dir = tempfile::Builder::new()
            .prefix("shuttle-clamd.")
            .tempdir()
            .unwrap()
            .keep();
        let status = Command::new(repo().join("scripts/make-test-signatures"))
            .arg(dir.join("db"))
            .args(signatures)
            .status()
            .unwrap();
        assert!(status.success(), "make-test-signatures failed");
        let port = free_port();
        let socket = dir.join("clamd.sock");
        let mut conf = format!(
            "LocalSocket {}\nLocalSocketMode 666\nTCPSocket {port}\nTCPAddr 127.0.0.1\nDatabaseDirectory {}\nForeground yes\nLogFile {}\n{limits}MaxThreads 8\n",
            socket.display(),
            dir.join("db").display(),
            dir.join("clamd.log").display()
        );
        if rustix::process::getuid().is_root() {
            conf.push_str("User root\n");
        }
        let conf_path = dir.join("clamd.conf");
        std::fs::write(&conf_path, conf).unwrap();
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("clamd");
        cmd.arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .expect("cannot start clamd (is clamav-daemon installed? run scripts/install-deps)");
        let started = std::time::Instant::now();
        while !socket.exists() || std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "clamd did not come up; see {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (
            Clamd {
                dir,
                socket,
                tcp: format!("127.0.0.1:{port}"),
            },
            child,
        )
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("clamd.conf")
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One scratch installation.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub quarantine: PathBuf,
    pub logs: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub report: PathBuf,
    /// Extra `[settings]`/`[scanning]` lines, as `key = value`.
    settings: BTreeMap<String, String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("shuttle-test.")
            .tempdir()
            .unwrap();
        let root = tmp.path().to_path_buf();
        let env = Env {
            src: root.join("src"),
            dst: root.join("dst"),
            quarantine: root.join("quarantine"),
            logs: root.join("logs"),
            state: root.join("state"),
            config: root.join("shuttle.conf"),
            report: root.join("report.json"),
            settings: BTreeMap::new(),
            tmp,
        };
        for d in [&env.src, &env.dst, &env.quarantine] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut env = env;
        env.set("clamd_socket", &clamd().socket.display().to_string());
        env.set("clamd_config", &clamd().conf().display().to_string());
        env.set("max_scan_threads", "2");
        env.set("delete_source_files_after_copying", "true");
        env.write_config();
        env
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// Sets a key (any section: Shuttle accepts a known key anywhere, with a warning
    /// when misplaced; the config writer puts each key in its documented section).
    pub fn set(&mut self, key: &str, value: &str) -> &mut Env {
        self.settings.insert(key.to_string(), value.to_string());
        self.write_config();
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Env {
        self.settings.remove(key);
        self.write_config();
        self
    }

    pub fn write_config(&self) {
        let mut paths = format!(
            "[paths]\nsource_path = {}\ndestination_path = {}\nquarantine_path = {}\nlog_path = {}\ntracking_data_path = {}\nlock_path = {}\n",
            self.src.display(),
            self.dst.display(),
            self.quarantine.display(),
            self.logs.display(),
            self.state.display(),
            self.root().join("shuttle.lock").display()
        );
        let mut sections: BTreeMap<&str, String> = BTreeMap::new();
        for (k, v) in &self.settings {
            let section = shuttle::config::keys::lookup(k)
                .map(|k| k.sections[0])
                .unwrap_or("settings");
            if section == "paths" {
                paths.push_str(&format!("{k} = {v}\n"));
            } else {
                sections
                    .entry(section)
                    .or_default()
                    .push_str(&format!("{k} = {v}\n"));
            }
        }
        let mut text = paths;
        for (s, body) in sections {
            text.push_str(&format!("[{s}]\n{body}"));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// Writes a source file aged past the stability window.
    pub fn drop_file(&self, rel: &str, content: &[u8]) -> PathBuf {
        let p = self.src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        age(&p, 60);
        p
    }

    pub fn shuttle(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// `shuttle run --config … --report-json …` plus `extra`.
    pub fn run(&self, extra: &[&str]) -> Run {
        let mut args = self.run_args().to_vec();
        args.extend_from_slice(extra);
        self.shuttle(&args)
    }

    /// `shuttle run` with this environment's config and report, not yet started: for
    /// tests that act while it runs or give it more environment.
    pub fn run_command(&self) -> Command {
        self.command(&self.run_args())
    }

    /// Spawns `cmd` (a `shuttle` command, its output set up by the caller) to pause at
    /// kill point `at`, and returns once it is paused there, with the file whose
    /// creation resumes it. Kill points exist only in `crashpoints` builds.
    pub fn spawn_paused(&self, mut cmd: Command, at: &str) -> (std::process::Child, PathBuf) {
        let resume = self.root().join("resume");
        let child = cmd
            .env("SHUTTLE_PAUSE_AT", at)
            .env("SHUTTLE_PAUSE_FILE", &resume)
            .spawn()
            .unwrap();
        let reached = self.root().join("resume.reached");
        let started = std::time::Instant::now();
        while !reached.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "never paused at {at}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (child, resume)
    }

    fn run_args(&self) -> [&str; 5] {
        [
            "run",
            "--config",
            self.config.to_str().unwrap(),
            "--report-json",
            self.report.to_str().unwrap(),
        ]
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(shuttle_bin());
        c.args(args)
            .env_remove("SHUTTLE_CONFIG_PATH")
            .env("HOME", self.root())
            .stdin(Stdio::null());
        c
    }

    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.report).expect("report written");
        serde_json::from_str(&text).unwrap()
    }

    /// Every regular file below `dir`, relative, with its bytes.
    pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() {
                    let rel = e
                        .path()
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.insert(rel, std::fs::read(e.path()).unwrap());
                }
            }
        }
        out
    }

    pub fn log_text(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.logs) {
            let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names {
                all.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        all
    }
}

/// Sends SIGTERM to a spawned `shuttle` (systemd's stop, `timeout` from cron).
pub fn term(child: &std::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

/// A process holding `path` open for writing (a paused upload), returned once it
/// runs `sleep` with the file open.
pub fn writer_holding(path: &Path) -> std::process::Child {
    process_holding(path, "3>>")
}

/// A process holding `path` open on descriptor 3 as `redirection` says (`3<` reading,
/// `3>>` writing), returned once it runs `sleep` with the file open: `sh` opens it,
/// then becomes `sleep`.
pub fn process_holding(path: &Path, redirection: &str) -> std::process::Child {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {redirection}\"$0\"; exec sleep 60"))
        .arg(path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let comm = format!("/proc/{}/comm", child.id());
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&comm).unwrap_or_default() == "sleep\n"
        }),
        "the holder of {} never started",
        path.display()
    );
    child
}

/// Polls `ok` every 20 ms until it holds (`true`) or `limit` has passed (`false`).
pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Sets a file's mtime `secs` into the past.
pub fn age(p: &Path, secs: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs);
    let f = std::fs::File::options()
        .write(true)
        .open(p)
        .or_else(|_| std::fs::File::open(p))
        .unwrap();
    f.set_modified(t).unwrap();
}

pub fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Random bytes (deterministic per seed) without pulling in a RNG crate.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tmpfs of `mib` MiB mounted at `dir` (the test machines run as root); unmounted
/// when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs at {} failed: these tests need root",
            dir.display()
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn free_mib(&self) -> f64 {
        let s = rustix::fs::statvfs(&self.dir).unwrap();
        (s.f_bavail * s.f_frsize) as f64 / 1_048_576.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Makes an OpenPGP key pair with stock gpg in a throwaway GNUPGHOME under `dir`;
/// returns (GNUPGHOME, armored public key file). `algo` as gpg's quick-gen-key takes
/// it ("default", "rsa3072", …).
pub fn gpg_key(dir: &Path, algo: &str) -> (PathBuf, PathBuf) {
    let home = dir.join(format!("gnupg-{algo}"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let uid = format!("Shuttle Test {algo} <test-{algo}@example.invalid>");
    let ok = Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args([
            "--batch",
            "--quiet",
            "--passphrase",
            "",
            "--quick-gen-key",
            &uid,
            algo,
            "default",
            "never",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "gpg --quick-gen-key {algo} failed");
    let out = Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--armor", "--export", &uid])
        .output()
        .unwrap();
    assert!(out.status.success() && !out.stdout.is_empty());
    let key = dir.join(format!("hazard-{algo}.asc"));
    std::fs::write(&key, out.stdout).unwrap();
    (home, key)
}
