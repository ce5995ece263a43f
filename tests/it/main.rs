//! The integration tests, one binary: each module drives the built `shuttle` binary
//! against the real things it meets in the field (a private clamd with the test
//! signatures, gpg, an SMTP server on 127.0.0.1, tmpfs mounts, dpkg, systemd-analyze,
//! PostgreSQL clusters of its own).
//! One binary instead of one per file: the shared fixtures (`common`) compile and link
//! once, which is most of the suite's build time.

mod common;

mod bad_input;
#[cfg(feature = "crashpoints")]
mod crash;
mod defender;
mod faults;
mod field;
mod fleet;
mod fuzz;
mod hazard;
mod migrate;
mod notify;
mod package;
mod pipeline;
mod pool;
mod rescan;
mod throttle;
mod verdicts;
mod watch;
