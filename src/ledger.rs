//! The ledger of tested Microsoft Defender versions (docs/design.md §1.8, §6).
//!
//! Defender's scan output is plain text whose format Microsoft may change with any
//! update. `shuttle defender-test` proves a version still prints what
//! [`crate::scan::defender::parse_scan`] expects and records the result here; with
//! `ledger_file_path` set, `run` and `check` refuse a Defender version not recorded
//! as passed.
//!
//! The file is YAML, as the earlier Python implementation wrote it:
//!
//! ```yaml
//! defender:
//!   tested_versions:
//!   - version: 101.24092.0002
//!     test_time: '2025-01-31T10:00:00.123456'
//!     test_result: pass
//!     test_details: ...
//! ```
//!
//! It is read and written as a generic YAML tree, so other top-level keys and fields
//! Shuttle does not know survive a rewrite (comments do not). One entry per version,
//! as the Python implementation kept it: a new test of a recorded version updates
//! that entry, other entries are kept as they are.

use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot read ledger_file_path {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger_file_path {path} is not valid YAML: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("ledger_file_path {path}: {problem}")]
    Shape { path: PathBuf, problem: String },
    #[error("cannot write ledger_file_path {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One test of one Defender version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRecord {
    pub version: String,
    pub test_time: String,
    /// "pass" or "fail".
    pub test_result: String,
    pub test_details: String,
}

/// A loaded ledger: the whole YAML document.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
    doc: Value,
}

impl Ledger {
    /// Reads the ledger; a missing file is an error (the gate must not pass on it).
    pub fn load(path: &Path) -> Result<Ledger, LedgerError> {
        let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ledger::parse(path, &text)
    }

    /// Reads the ledger if it exists; a missing file is an empty ledger (for writing
    /// the first record). An unreadable or garbled file is still an error: it is
    /// never overwritten.
    pub fn load_or_empty(path: &Path) -> Result<Ledger, LedgerError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ledger::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger {
                path: path.to_path_buf(),
                doc: Value::Mapping(Mapping::new()),
            }),
            Err(source) => Err(LedgerError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Ledger, LedgerError> {
        let doc: Value = serde_norway::from_str(text).map_err(|source| LedgerError::Syntax {
            path: path.to_path_buf(),
            source,
        })?;
        let doc = match doc {
            // An empty file.
            Value::Null => Value::Mapping(Mapping::new()),
            Value::Mapping(_) => doc,
            _ => {
                return Err(LedgerError::Shape {
                    path: path.to_path_buf(),
                    problem: "the top level is not a mapping".into(),
                });
            }
        };
        let ledger = Ledger {
            path: path.to_path_buf(),
            doc,
        };
        ledger.tested_versions()?;
        Ok(ledger)
    }

    fn shape(&self, problem: impl Into<String>) -> LedgerError {
        LedgerError::Shape {
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    /// Every recorded test, in file order. Fields missing from an entry read as "".
    pub fn tested_versions(&self) -> Result<Vec<TestRecord>, LedgerError> {
        let Some(defender) = self.doc.get("defender") else {
            return Ok(Vec::new());
        };
        if defender.is_null() {
            return Ok(Vec::new());
        }
        if !defender.is_mapping() {
            return Err(self.shape("`defender` is not a mapping"));
        }
        let list = match defender.get("tested_versions") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Sequence(s)) => s,
            Some(_) => return Err(self.shape("`defender.tested_versions` is not a list")),
        };
        let mut out = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            if !entry.is_mapping() {
                return Err(self.shape(format!(
                    "entry {} of `defender.tested_versions` is not a mapping",
                    i + 1
                )));
            }
            let field = |k: &str| entry.get(k).map(scalar_text).unwrap_or_default();
            out.push(TestRecord {
                version: field("version"),
                test_time: field("test_time"),
                test_result: field("test_result"),
                test_details: field("test_details"),
            });
        }
        Ok(out)
    }

    /// The latest record for `version`, if any.
    pub fn record_for(&self, version: &str) -> Result<Option<TestRecord>, LedgerError> {
        Ok(self
            .tested_versions()?
            .into_iter()
            .rev()
            .find(|r| r.version == version))
    }

    /// Adds `rec`, or updates the entry with its version in place; every other key
    /// and entry is kept.
    pub fn upsert(&mut self, rec: &TestRecord) -> Result<(), LedgerError> {
        self.tested_versions()?;
        let shape = self.shape("unexpected structure");
        let Value::Mapping(top) = &mut self.doc else {
            return Err(shape);
        };
        let defender = top
            .entry(Value::from("defender"))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if defender.is_null() {
            *defender = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(defender) = defender else {
            return Err(shape);
        };
        let list = defender
            .entry(Value::from("tested_versions"))
            .or_insert_with(|| Value::Sequence(Vec::new()));
        if list.is_null() {
            *list = Value::Sequence(Vec::new());
        }
        let Value::Sequence(list) = list else {
            return Err(shape);
        };
        let existing = list.iter_mut().rev().find(|e| {
            e.get("version")
                .is_some_and(|v| scalar_text(v) == rec.version)
        });
        match existing {
            Some(Value::Mapping(entry)) => {
                entry.insert("test_time".into(), rec.test_time.clone().into());
                entry.insert("test_result".into(), rec.test_result.clone().into());
                entry.insert("test_details".into(), rec.test_details.clone().into());
            }
            _ => {
                let mut entry = Mapping::new();
                entry.insert("version".into(), rec.version.clone().into());
                entry.insert("test_time".into(), rec.test_time.clone().into());
                entry.insert("test_result".into(), rec.test_result.clone().into());
                entry.insert("test_details".into(), rec.test_details.clone().into());
                list.push(Value::Mapping(entry));
            }
        }
        Ok(())
    }

    /// Writes the ledger atomically: a temp file in the same directory, fsynced,
    /// renamed over the ledger, directory fsynced. An existing ledger's permission
    /// bits are kept.
    pub fn save(&self) -> Result<(), LedgerError> {
        let err = |source| LedgerError::Write {
            path: self.path.clone(),
            source,
        };
        let text = serde_norway::to_string(&self.doc)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let mode = std::fs::metadata(&self.path).ok().map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o7777
        });
        crate::fsx::write_atomic(&self.path, text.as_bytes(), mode).map_err(err)?;
        Ok(())
    }
}

/// A scalar as text (`version: 101.5` is a float to YAML; it is still a version).
fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Why the gate refuses to run Defender.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "Microsoft Defender {version} is not recorded as tested in ledger_file_path {path}: run `shuttle defender-test` for this version"
    )]
    NotListed { version: String, path: PathBuf },
    #[error(
        "Microsoft Defender {version} failed its test in ledger_file_path {path} ({details}): Shuttle will not use it"
    )]
    Failed {
        version: String,
        path: PathBuf,
        details: String,
    },
    #[error("cannot check Microsoft Defender {version} against the ledger: {source}")]
    Ledger {
        version: String,
        source: LedgerError,
    },
}

/// The gate of `run` and `check` (docs/design.md §1.8): with Defender on and
/// `ledger_file_path` set, the installed Defender (`mdatp version`) must be recorded
/// as passed. Returns the problem as one line naming the ledger and the version.
pub fn gate(cfg: &crate::config::Config) -> Result<(), String> {
    let (true, Some(path)) = (cfg.scanning.defender, cfg.ledger_file_path.as_deref()) else {
        return Ok(());
    };
    let defender = crate::scan::defender::Defender::new(&cfg.scanning.mdatp_command);
    let version = defender.product_version().map_err(|e| {
        format!(
            "cannot check the installed Microsoft Defender against ledger_file_path {}: its version is unknown: {e}",
            path.display()
        )
    })?;
    require_passed(path, &version).map_err(|e| e.to_string())?;
    tracing::info!(
        "Microsoft Defender {version} is recorded as tested in {}",
        path.display()
    );
    Ok(())
}

/// Passes only if the latest ledger record for `version` says `test_result: pass`.
pub fn require_passed(path: &Path, version: &str) -> Result<(), GateError> {
    let rec = Ledger::load(path)
        .and_then(|l| l.record_for(version))
        .map_err(|source| GateError::Ledger {
            version: version.to_string(),
            source,
        })?;
    match rec {
        None => Err(GateError::NotListed {
            version: version.to_string(),
            path: path.to_path_buf(),
        }),
        Some(r) if r.test_result.trim().eq_ignore_ascii_case("pass") => Ok(()),
        Some(r) => Err(GateError::Failed {
            version: version.to_string(),
            path: path.to_path_buf(),
            details: format!(
                "test_result {:?} at {:?}{}",
                r.test_result,
                r.test_time,
                if r.test_details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.test_details)
                }
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As PyYAML's `yaml.dump(data, default_flow_style=False, sort_keys=False)` wrote it.
    const PYTHON_ERA: &str = "defender:\n  tested_versions:\n  - version: 101.24092.0002\n    test_time: '2024-11-02T09:15:27.483920'\n    test_result: pass\n    test_details: All tests passed\n  - version: 101.24082.0004\n    test_time: '2024-10-01T08:00:00.000001'\n    test_result: fail\n    test_details: 'EICAR detected: False, clean file clean: True'\nsite: lab-3\n";

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ledger.yaml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn reads_python_era_ledgers() {
        let (_d, p) = write(PYTHON_ERA);
        assert!(require_passed(&p, "101.24092.0002").is_ok());
        assert!(matches!(
            require_passed(&p, "101.24082.0004"),
            Err(GateError::Failed { .. })
        ));
        let e = require_passed(&p, "101.99999.0001").unwrap_err();
        assert!(matches!(e, GateError::NotListed { .. }));
        assert!(e.to_string().contains("101.99999.0001"), "{e}");
    }

    #[test]
    fn missing_garbled_and_misshapen_ledgers_refuse() {
        let d = tempfile::tempdir().unwrap();
        let e = require_passed(&d.path().join("nope.yaml"), "1.2.3").unwrap_err();
        assert!(e.to_string().contains("nope.yaml") && e.to_string().contains("1.2.3"));
        for bad in [
            "defender: [1, 2\n",
            "- a\n- b\n",
            "defender: 5\n",
            "defender:\n  tested_versions: 7\n",
        ] {
            let (_d, p) = write(bad);
            assert!(
                matches!(require_passed(&p, "1"), Err(GateError::Ledger { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn numeric_versions_are_read_as_text() {
        let (_d, p) =
            write("defender:\n  tested_versions:\n  - version: 101.5\n    test_result: pass\n");
        assert!(require_passed(&p, "101.5").is_ok());
    }

    #[test]
    fn upsert_keeps_other_keys_and_entries() {
        let (_d, p) = write(PYTHON_ERA);
        let mut l = Ledger::load_or_empty(&p).unwrap();
        l.upsert(&TestRecord {
            version: "101.24082.0004".into(),
            test_time: "2025-01-01T00:00:00+00:00".into(),
            test_result: "pass".into(),
            test_details: "retested".into(),
        })
        .unwrap();
        l.upsert(&TestRecord {
            version: "101.25000.0001".into(),
            test_time: "2025-01-02T00:00:00+00:00".into(),
            test_result: "fail".into(),
            test_details: "x".into(),
        })
        .unwrap();
        l.save().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("site: lab-3"), "{text}");
        let again = Ledger::load(&p).unwrap().tested_versions().unwrap();
        let versions: Vec<_> = again.iter().map(|r| r.version.as_str()).collect();
        assert_eq!(
            versions,
            ["101.24092.0002", "101.24082.0004", "101.25000.0001"]
        );
        assert_eq!(again[1].test_details, "retested");
        assert!(require_passed(&p, "101.24082.0004").is_ok());
        assert!(require_passed(&p, "101.24092.0002").is_ok());
    }

    #[test]
    fn first_record_creates_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("new.yaml");
        let mut l = Ledger::load_or_empty(&p).unwrap();
        l.upsert(&TestRecord {
            version: "1.2.3".into(),
            test_time: "t".into(),
            test_result: "pass".into(),
            test_details: "d".into(),
        })
        .unwrap();
        l.save().unwrap();
        assert!(require_passed(&p, "1.2.3").is_ok());
        let leftovers: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left");
    }
}
