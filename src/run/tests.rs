//! The run core under faults no integration test can cause on demand: a fake scanner
//! (no clamd), one that changes the disk while it scans, and settling's `syncfs` and
//! journal batch failing or panicking through [`Hooks`]. Each test asserts what a user
//! sees: which sources are kept, what the destination holds (never a duplicate), and
//! each file's outcome in the report and the journal; most then run again with
//! working hooks and check the file arrives exactly once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::context::{self, Hooks, Roots, Run};
use super::pipeline;
use crate::config::{self, CommandLine, Config};
use crate::discover::{self, OpenFiles, Rules};
use crate::journal::{Finished, Journal, JournalError, SqliteJournal};
use crate::notify::Notifier;
use crate::report::Report;
use crate::scan::{self, ScanError, Scanner, Scanners, Signatures, Verdict};
use crate::throttle::Admission;

/// An engine that answers the same for every file.
struct Fake {
    name: &'static str,
    answer: Result<Verdict, ScanError>,
}

impl Scanner for Fake {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> Result<String, ScanError> {
        Ok(format!("{} 1", self.name))
    }
    fn signatures(&self, _: &str) -> Result<Signatures, ScanError> {
        Ok(Signatures {
            version: "1".into(),
            updated: Some(chrono::Utc::now().to_rfc3339()),
        })
    }
    fn scan(&self, _: &File, _: &Path, _: u64, _: Option<Duration>) -> Result<Verdict, ScanError> {
        self.answer.clone()
    }
}

/// An engine that answers clean after doing something to the disk while it "scans"
/// (given the quarantine copy's path): what another process could do at that moment.
struct Meddler(Box<dyn Fn(&Path) + Send + Sync>);

impl Scanner for Meddler {
    fn name(&self) -> &'static str {
        "clamav"
    }
    fn version(&self) -> Result<String, ScanError> {
        Ok("clamav 1".into())
    }
    fn signatures(&self, v: &str) -> Result<Signatures, ScanError> {
        clean().signatures(v)
    }
    fn scan(
        &self,
        _: &File,
        path: &Path,
        _: u64,
        _: Option<Duration>,
    ) -> Result<Verdict, ScanError> {
        (self.0)(path);
        Ok(Verdict::Clean)
    }
}

fn clean() -> Box<dyn Scanner> {
    Box::new(Fake {
        name: "clamav",
        answer: Ok(Verdict::Clean),
    })
}

/// A drop directory, quarantine, destination and journal in a temporary directory.
struct World {
    _dir: tempfile::TempDir,
    cfg: Config,
}

impl World {
    fn new(files: &[&str]) -> World {
        World::with_threads(files, 2)
    }

    /// [`World::new`] with `threads` workers (one: files handled one after another).
    fn with_threads(files: &[&str], threads: u32) -> World {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        for d in ["src", "q", "dst", "state"] {
            std::fs::create_dir(p(d)).unwrap();
        }
        for f in files {
            let path = p("src").join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("contents of {f}")).unwrap();
        }
        let text = format!(
            "[paths]\nsource_path={}\nquarantine_path={}\ndestination_path={}\ntracking_data_path={}\nlock_path={}\n[scanning]\non_demand_clam_av=false\non_demand_defender=false\ncanary=false\n[settings]\nskip_stability_check=true\nmax_scan_threads={}\ndelete_source_files_after_copying=true\n",
            p("src").display(),
            p("q").display(),
            p("dst").display(),
            p("state").display(),
            p("state/lock").display(),
            threads,
        );
        std::fs::write(p("shuttle.conf"), text).unwrap();
        let cli = CommandLine {
            config_file: Some(p("shuttle.conf")),
            flags: vec![],
        };
        let cfg = config::load_for(&cli, config::Needs::KeysOnly)
            .unwrap()
            .config;
        World { _dir: dir, cfg }
    }

    fn path(&self, which: &Path, rel: &str) -> PathBuf {
        which.join(rel)
    }

    fn source(&self, rel: &str) -> PathBuf {
        self.path(&self.cfg.source_path, rel)
    }

    /// The names in the destination (temp files included: there must be none).
    fn destination(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.cfg.destination_path)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// One pass over the drop directory (recovery first, as a run does) with
    /// `engines` and `hooks`: the report and whether the pass stopped.
    fn pass(&self, engines: Vec<Box<dyn Scanner>>, hooks: Hooks) -> (Report, Result<(), String>) {
        let cfg = &self.cfg;
        let journal: crate::journal::Shared = Mutex::new(Box::new(
            SqliteJournal::open(&cfg.tracking_data_path).unwrap(),
        ));
        let mut report = Report::default();
        let run_id = context::lock(&journal).begin_run("now").unwrap();
        crate::recover::reconcile(&**context::lock(&journal), cfg, run_id).unwrap();
        let scanners =
            Scanners::start(engines, scan::Policy::from_config(&cfg.scanning), false).unwrap();
        let notifier = Notifier::new(&cfg.notifications);
        let writers = crate::lease::WriterCheck::new(true);
        let roots = Roots::open(cfg, writers).unwrap();
        let limits = scan::limits::ScanLimits::for_config(cfg);
        let set_aside = context::lock(&journal).set_aside_all().unwrap();
        let rules = Rules {
            stability: None,
            priority: cfg.priority,
            priority_paths: Vec::new(),
            names: cfg.name_rules,
            spill_dir: None,
            allow_hard_links: false,
        };
        let found = discover::discover(&cfg.source_path, &rules, &OpenFiles::default());
        let run = Run {
            cfg,
            journal: &journal,
            run_id,
            scanners: &scanners,
            notifier: &notifier,
            hazard: None,
            stop: None,
            roots: &roots,
            limits: &limits,
            set_aside: &set_aside,
            limits_fingerprint: "test",
            policy: context::FilePolicy::of(cfg),
            hooks,
            fleet: None,
            day_limits: crate::journal::DayLimits::of(cfg),
        };
        let done = pipeline::process(
            &run,
            Admission::new(cfg, (0, 0)),
            found.candidates.into_queue(),
            &mut report,
            &pipeline::Buffers::default(),
        )
        .map_err(|e| e.to_string());
        context::lock(&journal)
            .finish_run(run_id, "now", 0, &serde_json::json!({}))
            .unwrap();
        (report, done)
    }

    /// The journal's (state, outcome) of every file, in admission order.
    fn journal(&self) -> Vec<(String, Option<String>)> {
        let j = SqliteJournal::open(&self.cfg.tracking_data_path).unwrap();
        (1..=20)
            .filter_map(|id| j.file_outcome(id).unwrap())
            .collect()
    }
}

fn failing_syncfs(_: &dyn crate::deliver::Destination) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(
        rustix::io::Errno::IO.raw_os_error(),
    ))
}

fn panicking_syncfs(_: &dyn crate::deliver::Destination) -> std::io::Result<()> {
    panic!("syncfs exploded (test)")
}

fn failing_batch(_: &dyn Journal, _: &[Finished]) -> Result<Vec<i64>, JournalError> {
    Err(JournalError::Sqlite {
        path: PathBuf::from("journal (test)"),
        source: rusqlite::Error::InvalidQuery,
    })
}

/// The report's entry for the file at `path`.
fn entry<'a>(r: &'a Report, path: &str) -> &'a crate::report::FileEntry {
    r.file_results
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no report entry for {path}"))
}

fn outcomes(r: &Report) -> Vec<(&str, &str)> {
    r.file_results
        .iter()
        .map(|f| (f.path.as_str(), f.outcome.as_str()))
        .collect()
}

#[test]
fn a_failing_syncfs_keeps_the_sources_and_a_rerun_delivers_once() {
    let w = World::new(&["a.txt", "b.txt"]);
    let hooks = Hooks {
        syncfs: failing_syncfs,
        ..Hooks::REAL
    };
    let (report, done) = w.pass(vec![clean()], hooks);
    let stop = done.unwrap_err();
    assert!(stop.contains("cannot make deliveries durable"), "{stop}");
    assert_eq!(report.files.failed, 2);
    assert_eq!(report.files.clean, 0);
    let mut o = outcomes(&report);
    o.sort();
    assert_eq!(o, [("a.txt", "failed"), ("b.txt", "failed")]);
    assert!(w.source("a.txt").exists() && w.source("b.txt").exists());
    // The journal never leads the disk: neither file is recorded as finished.
    assert!(w.journal().iter().all(|(_, outcome)| outcome.is_none()));

    let (report, done) = w.pass(vec![clean()], Hooks::REAL);
    done.unwrap();
    assert_eq!(report.files.clean, 2);
    assert!(!w.source("a.txt").exists() && !w.source("b.txt").exists());
    assert_eq!(w.destination(), ["a.txt", "b.txt"]);
}

#[test]
fn a_failing_journal_batch_keeps_the_sources_and_a_rerun_delivers_once() {
    let w = World::new(&["a.txt"]);
    let hooks = Hooks {
        record_batch: failing_batch,
        ..Hooks::REAL
    };
    let (report, done) = w.pass(vec![clean()], hooks);
    let stop = done.unwrap_err();
    assert!(stop.contains("journal write failed"), "{stop}");
    assert!(stop.contains("sources of 1 file(s) kept"), "{stop}");
    assert!(w.source("a.txt").exists(), "source kept");
    assert_eq!(w.destination(), ["a.txt"]);
    assert_eq!(outcomes(&report), [("a.txt", "clean")]);
    assert_eq!(w.journal(), [("admitted".to_string(), None)]);

    let (report, done) = w.pass(vec![clean()], Hooks::REAL);
    done.unwrap();
    assert_eq!(outcomes(&report), [("a.txt", "clean")]);
    assert!(!w.source("a.txt").exists());
    assert_eq!(w.destination(), ["a.txt"], "delivered once, not twice");
}

#[test]
fn a_failing_journal_keeps_a_suspects_source_too() {
    let w = World::new(&["bad.exe"]);
    let hooks = Hooks {
        record_batch: failing_batch,
        ..Hooks::REAL
    };
    let engine = Box::new(Fake {
        name: "clamav",
        answer: Ok(Verdict::Suspect(vec!["Test.Sig".into()])),
    });
    let (report, done) = w.pass(vec![engine], hooks);
    assert!(done.unwrap_err().contains("journal write failed"));
    assert_eq!(outcomes(&report), [("bad.exe", "suspect")]);
    assert!(w.source("bad.exe").exists(), "source kept");
    assert!(w.destination().is_empty(), "nothing delivered");
}

#[test]
fn a_panicking_committer_keeps_the_sources_and_recovery_hands_them_on() {
    let w = World::new(&["a.txt"]);
    let hooks = Hooks {
        syncfs: panicking_syncfs,
        ..Hooks::REAL
    };
    let (report, done) = w.pass(vec![clean()], hooks);
    let stop = done.unwrap_err();
    assert!(stop.contains("the commit thread panicked"), "{stop}");
    assert!(w.source("a.txt").exists(), "source kept");
    assert_eq!(report.files.admitted, 1);
    assert_eq!(report.files.clean, 0, "not counted as delivered");
    assert_eq!(w.journal(), [("admitted".to_string(), None)]);

    // The next run's recovery marks it interrupted; the source is handled again and
    // the bytes already in the destination are recognised, not duplicated.
    let (report, done) = w.pass(vec![clean()], Hooks::REAL);
    done.unwrap();
    assert_eq!(outcomes(&report), [("a.txt", "clean")]);
    let journal = w.journal();
    assert_eq!(journal[0].1.as_deref(), Some("interrupted"));
    assert_eq!(journal[1].1.as_deref(), Some("clean"));
    assert!(!w.source("a.txt").exists());
    assert_eq!(w.destination(), ["a.txt"]);
}

#[test]
fn a_detection_beside_another_engines_failure_is_suspect() {
    let w = World::new(&["bad.exe"]);
    let detecting = Box::new(Fake {
        name: "clamav",
        answer: Ok(Verdict::Suspect(vec!["Test.Sig".into()])),
    });
    let failing = Box::new(Fake {
        name: "defender",
        answer: Err(ScanError::Failed("engine broke (test)".into())),
    });
    let (report, done) = w.pass(vec![detecting, failing], Hooks::REAL);
    done.unwrap();
    assert_eq!(outcomes(&report), [("bad.exe", "suspect")]);
    assert_eq!(report.file_results[0].detections, ["Test.Sig"]);
    assert_eq!(report.files.suspect, 1);
    assert_eq!(report.files.failed, 0);
    assert!(w.destination().is_empty(), "nothing delivered");
    // No hazard archive: the copy is deleted and the source removed.
    assert!(!w.source("bad.exe").exists(), "{:?}", report.sources_kept);
    assert_eq!(
        w.journal(),
        [("finished".to_string(), Some("suspect".to_string()))]
    );
}

#[test]
fn a_quarantine_copy_replaced_or_changed_after_its_scan_is_not_delivered() {
    let w = World::new(&["swapped.txt", "grown.txt"]);
    // While each copy is "scanned": one is replaced by another file under its name,
    // the other has bytes appended (the descriptor the scan was given stays on the
    // scanned inode; what is delivered must be that inode, unchanged).
    let meddler = Meddler(Box::new(|copy: &Path| {
        if copy.ends_with("swapped.txt") {
            std::fs::remove_file(copy).unwrap();
            std::fs::write(copy, "contents of swapped.txx").unwrap();
        } else {
            let mut f = std::fs::OpenOptions::new().append(true).open(copy).unwrap();
            std::io::Write::write_all(&mut f, b" and more").unwrap();
        }
    }));
    let (report, done) = w.pass(vec![Box::new(meddler)], Hooks::REAL);
    done.unwrap();
    let mut o = outcomes(&report);
    o.sort();
    assert_eq!(o, [("grown.txt", "failed"), ("swapped.txt", "failed")]);
    for f in &report.file_results {
        let error = f.error.as_deref().unwrap_or_default();
        assert!(error.contains("changed after it was scanned"), "{error}");
    }
    assert!(w.destination().is_empty(), "nothing delivered");
    assert!(w.source("swapped.txt").exists() && w.source("grown.txt").exists());

    // A run with nobody meddling delivers both, with their own bytes.
    let (report, done) = w.pass(vec![clean()], Hooks::REAL);
    done.unwrap();
    assert_eq!(report.files.clean, 2);
    let dst = &w.cfg.destination_path;
    assert_eq!(
        std::fs::read_to_string(dst.join("swapped.txt")).unwrap(),
        "contents of swapped.txt"
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("grown.txt")).unwrap(),
        "contents of grown.txt"
    );
}

#[test]
fn a_destination_directory_moved_away_mid_run_is_made_again_for_the_next_file() {
    // One worker: "a/1.txt" is delivered before "a/2.txt" is scanned.
    let w = World::with_threads(&["a/1.txt", "a/2.txt"], 1);
    let dst = w.cfg.destination_path.clone();
    // While the second file is scanned, whoever takes files from the destination
    // moves the directory the first went to.
    let taker = dst.clone();
    let meddler = Meddler(Box::new(move |copy: &Path| {
        if copy.ends_with("a/2.txt") {
            std::fs::rename(taker.join("a"), taker.join("taken")).unwrap();
        }
    }));
    let (report, done) = w.pass(vec![Box::new(meddler)], Hooks::REAL);
    done.unwrap();
    assert_eq!(report.files.clean, 2);
    assert_eq!(
        std::fs::read_to_string(dst.join("taken/1.txt")).unwrap(),
        "contents of a/1.txt"
    );
    // The second file is where the report says, under its own path, not in the
    // directory that was moved away.
    assert_eq!(
        std::fs::read_to_string(dst.join("a/2.txt")).unwrap(),
        "contents of a/2.txt"
    );
    assert!(!dst.join("taken/2.txt").exists());
    let second = entry(&report, "a/2.txt");
    assert_eq!(
        second.destination.as_deref(),
        Some(dst.join("a/2.txt").to_str().unwrap())
    );
    assert!(!w.source("a/1.txt").exists() && !w.source("a/2.txt").exists());
}

#[test]
fn a_destination_directory_swapped_for_a_symlink_mid_run_receives_nothing() {
    // One worker: "a/b/1.txt" is delivered before "a/b/2.txt" is scanned.
    let w = World::with_threads(&["a/b/1.txt", "a/b/2.txt"], 1);
    let dst = w.cfg.destination_path.clone();
    let outside = dst.parent().unwrap().join("outside");
    // While the second file is scanned, `dst/a` is moved out of the destination and
    // a symlink to it put in its place.
    let (d, o) = (dst.clone(), outside.clone());
    let meddler = Meddler(Box::new(move |copy: &Path| {
        if copy.ends_with("a/b/2.txt") {
            std::fs::rename(d.join("a"), &o).unwrap();
            std::os::unix::fs::symlink(&o, d.join("a")).unwrap();
        }
    }));
    let (report, done) = w.pass(vec![Box::new(meddler)], Hooks::REAL);
    done.unwrap();
    let mut o = outcomes(&report);
    o.sort();
    assert_eq!(o, [("a/b/1.txt", "clean"), ("a/b/2.txt", "failed")]);
    let second = entry(&report, "a/b/2.txt");
    let error = second.error.as_deref().unwrap_or_default();
    assert!(error.contains("symlinks are never followed"), "{error}");
    // Nothing went through the symlink out of the destination; the source stays.
    assert!(!outside.join("b/2.txt").exists());
    assert_eq!(
        std::fs::read_to_string(w.source("a/b/2.txt")).unwrap(),
        "contents of a/b/2.txt"
    );
}
