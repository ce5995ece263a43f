//! Shuttle: a scanning file-transfer gateway.
//!
//! Files move from an untrusted drop directory through a quarantine, are scanned by
//! ClamAV (and/or Microsoft Defender), and clean files are delivered to a protected
//! destination. The modules are named after the steps of a run (docs/design.md §1); [`run`]
//! puts them in order.

pub mod check;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod defender_test;
pub mod deliver;
pub mod discover;
pub mod fsx;
pub mod generate;
pub mod hazard;
pub mod history;
pub mod journal;
pub mod lease;
pub mod ledger;
pub mod legacy;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod preflight;
pub mod progress;
pub mod quarantine;
pub mod recover;
pub mod report;
pub mod rescan;
pub mod run;
pub mod scan;
pub mod signals;
pub mod states;
pub mod status;
pub mod throttle;
pub mod watch;
