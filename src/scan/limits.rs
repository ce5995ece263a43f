//! What the engines can scan whole, decided before a file is copied or scanned.
//!
//! clamd answers `OK` for whatever it did not scan because of a limit unless
//! `AlertExceedsMax` is on, and even then skips over-size archive members silently.
//! Shuttle therefore never relies on clamd saying so, and fails closed:
//!
//! - **Sizes.** A file larger than clamd's `MaxFileSize` or `MaxScanSize`, than clamd's
//!   hard limit of 2 GiB, than `StreamMaxLength` (clamd over TCP), or than
//!   `max_file_size_mb`, is never copied: it is `unscannable` (or `too large` for
//!   Shuttle's own limit) and stays in the source.
//! - **Archives.** [`super::archive`] reads zip, gzip and tar directories against
//!   `MaxFileSize`, `MaxScanSize`, `MaxRecursion`, `MaxFiles` and encryption; other
//!   archive formats are accepted only when clamd's configuration says
//!   `AlertExceedsMax yes`.
//! - **Where the limits come from.** `clamd_config` (default `/etc/clamav/clamd.conf`),
//!   with clamd's compiled-in defaults for unset keys. When that file cannot be read,
//!   or describes another clamd than the one configured (a remote clamd over TCP, a
//!   second instance), Shuttle assumes the smaller of clamd's compiled-in defaults and
//!   Debian's shipped `clamd.conf` ([`ASSUMED`]) with `AlertExceedsMax` off, and says
//!   so at the start of every run and in `shuttle check`.
//!
//! There is no start-up probe of clamd's behaviour: a probe could only show that one
//! crafted file crossed one limit, not that every limit is reported, and the checks
//! above hold whatever clamd reports. A limit hit clamd does report
//! (`Heuristics.Limits.Exceeded`) makes the file unscannable too.

use std::path::PathBuf;

use super::archive::ArchiveLimits;
use super::clamav::ClamdLimits;
use crate::config::{ClamdEndpoint, Config};

/// clamd never scans more than this of one file, whatever its configuration says.
pub const CLAMD_HARD_LIMIT: u64 = (2 << 30) - 1;

/// The limits assumed for a clamd whose configuration Shuttle cannot read: the
/// smaller of clamd's compiled-in defaults and Debian's shipped clamd.conf.
pub const ASSUMED: ClamdLimits = ClamdLimits {
    local_socket: None,
    alert_exceeds_max: false,
    max_file_size: 25 << 20,
    max_scan_size: 100 << 20,
    max_recursion: 16,
    max_files: 10_000,
    stream_max_length: 25 << 20,
};

/// Where clamd's limits came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitsSource {
    Read(PathBuf),
    /// Not readable; the reason. [`ASSUMED`] applies.
    Assumed(String),
}

/// The run's limits.
#[derive(Debug, Clone)]
pub struct ScanLimits {
    /// clamd's limits, when ClamAV is enabled.
    pub clamd: Option<(ClamdLimits, LimitsSource)>,
    /// clamd is reached over TCP (INSTREAM: `StreamMaxLength` applies).
    pub tcp: bool,
    /// `max_file_size_mb` in bytes, 0: none.
    pub own_max: u64,
    pub block_encrypted: bool,
}

/// Why a file is not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeRefusal {
    /// Beyond what an engine scans: unscannable.
    Unscannable(String),
    /// Beyond `max_file_size_mb`: too large.
    TooLarge(String),
}

pub fn mib_label(b: u64) -> String {
    if b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{:.1} MiB", b as f64 / 1_048_576.0)
    }
}

impl ScanLimits {
    pub fn for_config(cfg: &Config) -> ScanLimits {
        let s = &cfg.scanning;
        let clamd = s.clam_av.then(|| read_clamd(cfg));
        ScanLimits {
            clamd,
            tcp: s.clamd.iter().any(|e| matches!(e, ClamdEndpoint::Tcp(_))),
            own_max: s.max_file_size_mb.saturating_mul(1 << 20),
            block_encrypted: s.block_encrypted_archives,
        }
    }

    /// Whether a file of `size` bytes can be scanned whole (checked before copying).
    pub fn refuse_size(&self, size: u64) -> Option<SizeRefusal> {
        if self.own_max > 0 && size > self.own_max {
            return Some(SizeRefusal::TooLarge(format!(
                "{} exceeds max_file_size_mb ({})",
                mib_label(size),
                mib_label(self.own_max)
            )));
        }
        let (l, source) = self.clamd.as_ref()?;
        let assumed = match source {
            LimitsSource::Read(_) => String::new(),
            LimitsSource::Assumed(_) => " (assumed: clamd's configuration is not readable)".into(),
        };
        if size > CLAMD_HARD_LIMIT {
            return Some(SizeRefusal::Unscannable(format!(
                "beyond scanner size limit ({} > clamd's 2 GiB)",
                mib_label(size)
            )));
        }
        let checks = [
            ("MaxFileSize", l.max_file_size),
            ("MaxScanSize", l.max_scan_size),
            (
                "StreamMaxLength",
                if self.tcp { l.stream_max_length } else { 0 },
            ),
        ];
        for (key, max) in checks {
            if max > 0 && size > max {
                return Some(SizeRefusal::Unscannable(format!(
                    "exceeds {key} {}{assumed}",
                    mib_label(max)
                )));
            }
        }
        None
    }

    /// What an archive must stay within.
    pub fn archive(&self) -> ArchiveLimits {
        match &self.clamd {
            Some((l, source)) => ArchiveLimits {
                max_file_size: l.max_file_size,
                max_scan_size: l.max_scan_size,
                max_recursion: l.max_recursion,
                max_files: l.max_files,
                block_encrypted: self.block_encrypted,
                engine_reports_limits: matches!(source, LimitsSource::Read(_))
                    && l.alert_exceeds_max,
            },
            // Defender alone: no known limits, only encryption is judged.
            None => ArchiveLimits {
                max_file_size: 0,
                max_scan_size: 0,
                max_recursion: 0,
                max_files: 0,
                block_encrypted: self.block_encrypted,
                engine_reports_limits: true,
            },
        }
    }

    /// A summary of every limit; a file set aside under other limits is tried again.
    pub fn fingerprint(&self) -> String {
        let mut s = format!(
            "own_max={};block_encrypted={};tcp={}",
            self.own_max, self.block_encrypted, self.tcp
        );
        if let Some((l, source)) = &self.clamd {
            s.push_str(&format!(
                ";clamd:file={},scan={},rec={},files={},stream={},alert={},read={}",
                l.max_file_size,
                l.max_scan_size,
                l.max_recursion,
                l.max_files,
                l.stream_max_length,
                l.alert_exceeds_max,
                matches!(source, LimitsSource::Read(_))
            ));
        }
        s
    }

    /// One line for the log and `check`.
    pub fn describe(&self) -> Option<String> {
        let (l, source) = self.clamd.as_ref()?;
        let from = match source {
            LimitsSource::Read(p) => format!("read from {}", p.display()),
            LimitsSource::Assumed(why) => format!("ASSUMED ({why})"),
        };
        Some(format!(
            "clamd limits {from}: MaxFileSize {}, MaxScanSize {}, MaxRecursion {}, MaxFiles {}{}, AlertExceedsMax {}; larger files and archives beyond them are set aside as unscannable",
            mib_label(l.max_file_size),
            mib_label(l.max_scan_size),
            l.max_recursion,
            l.max_files,
            if self.tcp {
                format!(", StreamMaxLength {}", mib_label(l.stream_max_length))
            } else {
                String::new()
            },
            if l.alert_exceeds_max { "yes" } else { "no" }
        ))
    }

    /// The clamd.conf lines an administrator should set, with the reason; empty when
    /// all are set.
    pub fn recommendations(&self) -> Vec<String> {
        let Some((l, source)) = &self.clamd else {
            return Vec::new();
        };
        let mut v = Vec::new();
        if let LimitsSource::Assumed(why) = source {
            v.push(format!(
                "clamd's configuration cannot be read ({why}): Shuttle assumes MaxFileSize 25 MiB, MaxScanSize 100 MiB, MaxRecursion 16, MaxFiles 10000 and AlertExceedsMax off, and sets aside as unscannable every file beyond them and every 7z/RAR/CAB/bzip2/xz/ARJ/cpio archive. Point clamd_config at a readable copy of that clamd's clamd.conf to use its real limits"
            ));
        } else if !l.alert_exceeds_max {
            v.push(
                "set `AlertExceedsMax yes` in clamd.conf: clamd then reports what it could not scan whole instead of answering OK, and Shuttle accepts 7z/RAR/CAB/bzip2/xz/ARJ/cpio archives (it cannot check those against clamd's limits itself; until then they are set aside as unscannable)".to_string(),
            );
        }
        v
    }
}

fn read_clamd(cfg: &Config) -> (ClamdLimits, LimitsSource) {
    let conf = &cfg.scanning.clamd_config;
    let assumed = |why: String| (ASSUMED, LimitsSource::Assumed(why));
    let limits = match ClamdLimits::read(conf) {
        Ok(l) => l,
        Err(e) => return assumed(format!("{}: {e}", conf.display())),
    };
    // With a pool, clamd_config stands for every endpoint (they are to share their
    // limits); it must describe one of them, and a TCP endpoint may be another host's:
    // its clamd.conf is only trusted when it names the same port.
    let describes = |e: &ClamdEndpoint| match (e, &limits.local_socket) {
        (ClamdEndpoint::Tcp(addr), _) => {
            clamd_conf_has_tcp_port(conf, addr.rsplit(':').next().unwrap_or(""))
        }
        (ClamdEndpoint::Unix(sock), Some(local)) => sock == local,
        (ClamdEndpoint::Unix(_), None) => true,
    };
    let endpoints = &cfg.scanning.clamd;
    if !endpoints.is_empty() && !endpoints.iter().any(describes) {
        let names: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        return assumed(format!(
            "{} describes none of the configured clamd endpoints ({})",
            conf.display(),
            names.join(", ")
        ));
    }
    (limits, LimitsSource::Read(conf.clone()))
}

fn clamd_conf_has_tcp_port(conf: &std::path::Path, port: &str) -> bool {
    std::fs::read_to_string(conf).is_ok_and(|t| {
        t.lines().any(|l| {
            let mut p = l.split_whitespace();
            p.next() == Some("TCPSocket") && p.next() == Some(port)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(l: ClamdLimits, read: bool, tcp: bool) -> ScanLimits {
        ScanLimits {
            clamd: Some((
                l,
                if read {
                    LimitsSource::Read("/x".into())
                } else {
                    LimitsSource::Assumed("test".into())
                },
            )),
            tcp,
            own_max: 0,
            block_encrypted: true,
        }
    }

    #[test]
    fn sizes_beyond_any_limit_are_refused() {
        let l = limits(ClamdLimits::COMPILED_IN, true, false);
        assert_eq!(l.refuse_size(100 << 20), None);
        assert_eq!(
            l.refuse_size((100 << 20) + 1),
            Some(SizeRefusal::Unscannable(
                "exceeds MaxFileSize 100 MiB".into()
            ))
        );
        let unlimited = ClamdLimits {
            max_file_size: 0,
            max_scan_size: 0,
            ..ClamdLimits::COMPILED_IN
        };
        let l = limits(unlimited, true, false);
        assert!(matches!(
            l.refuse_size(3 << 30),
            Some(SizeRefusal::Unscannable(r)) if r.starts_with("beyond scanner size limit")
        ));
        let l = limits(ASSUMED, false, true);
        assert!(matches!(
            l.refuse_size(26 << 20),
            Some(SizeRefusal::Unscannable(r)) if r.contains("assumed")
        ));
        let own = ScanLimits {
            own_max: 1 << 20,
            ..limits(ClamdLimits::COMPILED_IN, true, false)
        };
        assert!(matches!(
            own.refuse_size(2 << 20),
            Some(SizeRefusal::TooLarge(_))
        ));
    }
}
