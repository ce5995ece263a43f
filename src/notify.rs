//! Notifications (docs/design.md §7): errors, hazards and summaries for the administrator,
//! by email over SMTP.
//!
//! Every event goes through [`Notifier::send`], which only queues the message: one
//! background thread talks to the mail server, so a slow or dead server never slows
//! the handling of files. When the notifier is dropped (end of a run) it waits for the
//! queue at most [`SMTP_TIMEOUT`]; whatever is still unsent then is logged. A mail
//! that cannot be sent is logged and never breaks a run.
//!
//! The queue is bounded: at most [`MAX_QUEUED`] mails of each kind wait for the mail
//! server. One more is counted instead of queued, and at the end of the run one
//! digest mail of that kind says how many were not mailed one by one (each is in the
//! log and the journal). A run that finds a million suspect files, or a mail server
//! that falls behind, costs a bounded amount of memory and sends a bounded number of
//! mails.
//!
//! SMTP: STARTTLS is required when `use_tls` (the default; certificates checked
//! against the system's trust store, `/etc/ssl/certs`, or `SSL_CERT_FILE`), AUTH
//! (PLAIN or LOGIN) when `username` is set. No credential ever crosses the wire in
//! clear: with `use_tls` a server that does not offer STARTTLS, or whose TLS handshake
//! fails, gets nothing more (the mail is not sent, the failure logged), and
//! `username` with `use_tls = false` is refused before any connection is made.
//! Port: `smtp_port`, else 587 with TLS, 25 without.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::message::{Mailbox, Mailboxes, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};

use crate::config::NotifyConfig;
use crate::report::Report;
use crate::states::Outcome;

/// Bound on every SMTP conversation (connect, each command) and on the wait for the
/// queue at the end of a run.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many mails of one kind may wait for the mail server (see the module doc).
pub const MAX_QUEUED: usize = 50;

/// How long a repeated notification (same kind and subject) sent with
/// [`Notifier::send_once`] is held back, so that `shuttle watch` does not mail the
/// same throttle stop or dead scanner on every pass.
pub const HOLD_DOWN: Duration = Duration::from_secs(3600);

/// The three kinds of notification, each with its own recipient (docs/design.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Error,
    Hazard,
    Summary,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Error, Kind::Hazard, Kind::Summary];

    fn index(self) -> usize {
        match self {
            Kind::Error => 0,
            Kind::Hazard => 1,
            Kind::Summary => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Error => "error",
            Kind::Hazard => "hazard",
            Kind::Summary => "summary",
        }
    }
}

/// Why a mail could not be built or sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("no recipient configured for {0} notifications")]
    NoRecipient(&'static str),
    #[error("no smtp_server / sender_email configured")]
    Incomplete,
    #[error(
        "username is set but use_tls is off: the password is never sent over an unencrypted connection"
    )]
    CleartextAuth,
    #[error("bad address {0:?}: {1}")]
    Address(String, lettre::address::AddressError),
    #[error("cannot build the message: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
}

/// Notifications already sent, shared by the passes of `shuttle watch`.
#[derive(Debug, Default)]
pub struct Memory {
    sent: Mutex<HashMap<(Kind, String), Instant>>,
}

impl Memory {
    /// True when this notification was not sent within [`HOLD_DOWN`]; records it.
    fn first_in_a_while(&self, kind: Kind, subject: &str) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match sent.get(&(kind, subject.to_string())) {
            Some(t) if now.duration_since(*t) < HOLD_DOWN => false,
            _ => {
                sent.insert((kind, subject.to_string()), now);
                true
            }
        }
    }
}

struct Mail {
    kind: Kind,
    subject: String,
    body: String,
}

/// The queue to the mail thread (absent when `notify` is off).
struct Queue {
    tx: mpsc::Sender<Mail>,
    /// Receives once when the mail thread has sent (or given up on) everything.
    done: Mutex<mpsc::Receiver<()>>,
    /// Mails of each kind ([`Kind::index`]) queued and not yet handled by the mail
    /// thread: at most [`MAX_QUEUED`] each.
    pending: Arc<[AtomicUsize; 3]>,
    /// Notifications of each kind counted instead of queued, for the digest.
    held: [AtomicUsize; 3],
}

pub struct Notifier {
    config: NotifyConfig,
    queue: Option<Queue>,
    memory: Option<Arc<Memory>>,
}

impl Notifier {
    pub fn new(config: &NotifyConfig) -> Notifier {
        Notifier::with_memory(config, None)
    }

    /// A notifier whose [`Notifier::send_once`] remembers across notifiers (passes).
    pub fn with_memory(config: &NotifyConfig, memory: Option<Arc<Memory>>) -> Notifier {
        let queue = config.notify.then(|| start(config.clone()));
        Notifier {
            config: config.clone(),
            queue,
            memory,
        }
    }

    /// Queues one notification; failures are logged, never returned.
    pub fn send(&self, kind: Kind, subject: &str, body: &str) {
        let Some(q) = &self.queue else {
            tracing::debug!(
                "{} notification not sent (notify is off): {subject}",
                kind.as_str()
            );
            return;
        };
        let i = kind.index();
        if q.pending[i]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_QUEUED).then_some(n + 1)
            })
            .is_err()
        {
            if q.held[i].fetch_add(1, Ordering::SeqCst) == 0 {
                tracing::warn!(
                    "{MAX_QUEUED} {} notifications wait for the mail server: further ones are counted, not mailed, and one mail at the end of the run says how many (each is in this log and the journal); first held back: {subject}",
                    kind.as_str()
                );
            }
            return;
        }
        queue(q, kind, subject, body);
    }

    /// Like [`Notifier::send`], but a notification with the same kind and subject
    /// already sent within [`HOLD_DOWN`] (by this or an earlier pass sharing the
    /// memory) is only logged.
    pub fn send_once(&self, kind: Kind, subject: &str, body: &str) {
        if let Some(m) = &self.memory
            && self.config.notify
            && !m.first_in_a_while(kind, subject)
        {
            tracing::info!(
                "{} notification not mailed again (sent within the last hour): {subject}",
                kind.as_str()
            );
            return;
        }
        self.send(kind, subject, body);
    }
}

/// Hands one mail (already counted in `pending`) to the mail thread.
fn queue(q: &Queue, kind: Kind, subject: &str, body: &str) {
    let mail = Mail {
        kind,
        subject: subject.to_string(),
        body: body.to_string(),
    };
    if q.tx.send(mail).is_err() {
        q.pending[kind.index()].fetch_sub(1, Ordering::SeqCst);
        tracing::error!(
            "{} notification not sent: the mail thread has stopped: {subject}",
            kind.as_str()
        );
    }
}

/// The mail that stands for `n` notifications of `kind` held back by a full queue.
fn digest(kind: Kind, n: usize) -> (String, String) {
    (
        format!(
            "Shuttle: {n} more {} notification(s) not mailed",
            kind.as_str()
        ),
        format!(
            "The mail server did not keep up with this run: {MAX_QUEUED} {kind} notifications were waiting for it, so {n} more were not mailed one by one.\n\nEach of them is in the run's log, and every file in the journal: `shuttle hazard list` lists the suspect files archived, `shuttle history <name>` tells one file's story.\n",
            kind = kind.as_str()
        ),
    )
}

impl Drop for Notifier {
    /// Queues the digests of notifications held back, then waits for the queue at
    /// most [`SMTP_TIMEOUT`]: the run never waits longer for a mail server than one
    /// SMTP timeout.
    fn drop(&mut self) {
        let Some(q) = self.queue.take() else { return };
        for kind in Kind::ALL {
            let n = q.held[kind.index()].swap(0, Ordering::SeqCst);
            if n > 0 {
                tracing::error!(
                    "{n} {} notification(s) were not mailed one by one (the mail queue was full); one mail says so",
                    kind.as_str()
                );
                let (subject, body) = digest(kind, n);
                q.pending[kind.index()].fetch_add(1, Ordering::SeqCst);
                queue(&q, kind, &subject, &body);
            }
        }
        drop(q.tx);
        let done = q.done.into_inner().unwrap_or_else(|p| p.into_inner());
        if done.recv_timeout(SMTP_TIMEOUT).is_err() {
            let left: usize = q.pending.iter().map(|p| p.load(Ordering::SeqCst)).sum();
            tracing::error!(
                "mail server did not take the notifications within {} s: {left} notification(s) not sent",
                SMTP_TIMEOUT.as_secs()
            );
        }
    }
}

/// Starts the mail thread.
fn start(config: NotifyConfig) -> Queue {
    let (tx, rx) = mpsc::channel::<Mail>();
    let (done_tx, done) = mpsc::channel();
    let pending: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let left = Arc::clone(&pending);
    let spawned = std::thread::Builder::new()
        .name("shuttle-mail".into())
        .spawn(move || {
            let transport = transport(&config);
            for mail in rx {
                let sent = transport
                    .as_ref()
                    .map_err(|e| e.to_string())
                    .and_then(|t| deliver(t, &config, &mail).map_err(|e| e.to_string()));
                match sent {
                    Ok(()) => {
                        tracing::info!("{} notification sent: {}", mail.kind.as_str(), mail.subject)
                    }
                    Err(e) => tracing::error!(
                        "{} notification not sent: {e}: {}",
                        mail.kind.as_str(),
                        mail.subject
                    ),
                }
                left[mail.kind.index()].fetch_sub(1, Ordering::SeqCst);
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the mail thread, notifications will not be sent: {e}");
    }
    Queue {
        tx,
        done: Mutex::new(done),
        pending,
        held: Default::default(),
    }
}

/// The SMTP transport described by the configuration.
pub fn transport(c: &NotifyConfig) -> Result<SmtpTransport, MailError> {
    let host = c.smtp_server.as_deref().ok_or(MailError::Incomplete)?;
    if c.username.is_some() && !c.use_tls {
        return Err(MailError::CleartextAuth);
    }
    let port = c.smtp_port.unwrap_or(if c.use_tls { 587 } else { 25 });
    let mut b = SmtpTransport::builder_dangerous(host)
        .port(port)
        .timeout(Some(SMTP_TIMEOUT));
    if c.use_tls {
        b = b.tls(Tls::Required(TlsParameters::new(host.to_string())?));
    }
    if let Some(user) = &c.username {
        b = b.credentials(Credentials::new(
            user.clone(),
            c.password.clone().unwrap_or_default(),
        ));
    }
    Ok(b.build())
}

/// Turns mail off when the settings cannot send any (no server, no recipient, a
/// password without TLS), with one error line per reason: incomplete notification
/// settings never stop files from moving.
pub fn off_when_unusable(c: &mut NotifyConfig) {
    let problems = c.problems();
    for p in &problems {
        tracing::error!("notifications off: {p}");
    }
    if !problems.is_empty() {
        c.notify = false;
    }
}

/// The recipient of `kind`, falling back to `recipient_email` (docs/design.md §7).
pub fn recipient(c: &NotifyConfig, kind: Kind) -> Option<&str> {
    let own = match kind {
        Kind::Error => &c.recipient_email_error,
        Kind::Hazard => &c.recipient_email_hazard,
        Kind::Summary => &c.recipient_email_summary,
    };
    own.as_deref().or(c.recipient_email.as_deref())
}

fn deliver(t: &SmtpTransport, c: &NotifyConfig, mail: &Mail) -> Result<(), MailError> {
    let to = recipient(c, mail.kind).ok_or(MailError::NoRecipient(mail.kind.as_str()))?;
    let from = c.sender_email.as_deref().ok_or(MailError::Incomplete)?;
    let from: Mailbox = from
        .parse()
        .map_err(|e| MailError::Address(from.to_string(), e))?;
    // A recipient setting may list several addresses, separated by commas.
    let to: Mailboxes = to
        .parse()
        .map_err(|e| MailError::Address(to.to_string(), e))?;
    let mut b = Message::builder()
        .from(from)
        .subject(&mail.subject)
        .header(ContentType::TEXT_PLAIN);
    for m in to {
        b = b.to(m);
    }
    let msg = b.body(mail.body.clone())?;
    t.send(&msg)?;
    Ok(())
}

/// The mails due at the end of a run (docs/design.md §7): one error mail listing the failed
/// files, and the summary: only for a run that handled, failed or throttled
/// something — with `notify_summary` for any of these, without it when a file failed
/// or admission was throttled. A run (or `watch` pass) that found nothing to do sends
/// no summary; a pass whose only news is the same throttle stop as before is held back.
pub fn run_end(n: &Notifier, notify_summary: bool, report: &Report) {
    let f = &report.files;
    let set_aside = f.unscannable + f.too_large;
    if f.failed > 0 || set_aside > 0 {
        let subject = match (f.failed, set_aside) {
            (0, n) => format!("Shuttle: {n} file(s) set aside (unscannable or too large)"),
            (n, 0) => format!("Shuttle: {n} file(s) failed"),
            (n, m) => format!("Shuttle: {n} file(s) failed, {m} set aside"),
        };
        n.send(Kind::Error, &subject, &failed_body(report));
    }
    let busy = f.admitted > 0 || f.failed > 0 || set_aside > 0;
    let due = f.failed > 0 || set_aside > 0 || report.throttle.stopped || (notify_summary && busy);
    if !due {
        return;
    }
    let subject = summary_subject(report);
    if busy {
        n.send(Kind::Summary, &subject, &summary_body(report));
    } else {
        n.send_once(Kind::Summary, &subject, &summary_body(report));
    }
}

fn summary_subject(r: &Report) -> String {
    let f = &r.files;
    let mut s = format!(
        "Shuttle summary: {} clean, {} suspect, {} failed",
        f.clean, f.suspect, f.failed
    );
    if f.unscannable + f.too_large > 0 {
        s.push_str(&format!(", {} set aside", f.unscannable + f.too_large));
    }
    if r.throttle.stopped {
        s.push_str(&format!(
            ", throttled ({})",
            r.throttle.reason.map_or("unknown", |r| r.as_str())
        ));
    }
    s
}

/// The summary mail's body: the run's counts and bytes, throttle, errors.
pub fn summary_body(r: &Report) -> String {
    let f = &r.files;
    let mut s = format!(
        "Run started {}, finished {}, exit code {}.\n\n\
         Files discovered: {}\n\
         Skipped this run: {}\n\
         Admitted:         {}\n\
         Clean (delivered): {} ({} bytes, {:.1} MB)\n\
         Suspect:          {} ({} bytes)\n\
         Failed:           {}\n\
         Unscannable (set aside): {}\n\
         Too large (set aside):   {}\n\
         Deferred (left in the source for the next run): {}\n",
        r.started,
        r.finished,
        r.exit_code,
        f.discovered,
        f.skipped,
        f.admitted,
        f.clean,
        r.bytes.clean,
        crate::fsx::mib(r.bytes.clean),
        f.suspect,
        r.bytes.suspect,
        f.failed,
        f.unscannable,
        f.too_large,
        f.deferred
    );
    if r.throttle.stopped {
        s.push_str(&format!(
            "\nAdmission stopped by the throttle: {}: {}\n",
            r.throttle.reason.map_or("unknown", |r| r.as_str()),
            r.throttle.message.as_deref().unwrap_or("")
        ));
        for rec in &r.throttle.recommendations {
            s.push_str(&format!("- {rec}\n"));
        }
    }
    if !r.errors.is_empty() {
        s.push_str("\nErrors:\n");
        for e in &r.errors {
            s.push_str(&format!("- {e}\n"));
        }
    }
    if !r.sources_kept.is_empty() {
        s.push_str("\nSources kept although handled:\n");
        for k in &r.sources_kept {
            s.push_str(&format!(
                "- {}: {}\n",
                crate::names::shown(&k.path),
                k.reason
            ));
        }
    }
    for e in &r.scanners {
        s.push_str(&format!("\nScanner {}: {}", e.scanner, e.version));
        if let Some(sig) = &e.signatures {
            s.push_str(&format!(
                " (signatures {}, {})",
                sig.version,
                sig.updated.as_deref().unwrap_or("undated")
            ));
        }
    }
    s.push('\n');
    s
}

/// At most this many failed files are listed in one mail (the journal has them all).
const FAILED_LISTED: usize = 200;

fn failed_body(r: &Report) -> String {
    let mut s = String::new();
    let set_aside = r
        .file_results
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Unscannable | Outcome::TooLarge));
    if r.files.unscannable + r.files.too_large > 0 {
        s.push_str(&format!(
            "{} file(s) were set aside in the run started {}: they stay untouched in the \
             drop directory and are not copied or reported again until they change, are \
             moved away, or the limits change (clamd.conf, max_file_size_mb, throttle).\n\n",
            r.files.unscannable + r.files.too_large,
            r.started
        ));
        for e in set_aside.take(FAILED_LISTED) {
            s.push_str(&format!(
                "- {} ({}): {}\n",
                e.path,
                e.outcome.as_str(),
                e.error.as_deref().unwrap_or("")
            ));
        }
        s.push('\n');
    }
    if r.files.failed == 0 {
        return s;
    }
    s.push_str(&format!(
        "{} file(s) failed in the run started {}. Their sources stay in the drop \
         directory and are tried again by the next run.\n\n",
        r.files.failed, r.started
    ));
    let failed = r
        .file_results
        .iter()
        .filter(|e| e.outcome == Outcome::Failed);
    for e in failed.clone().take(FAILED_LISTED) {
        s.push_str(&format!(
            "- {}: {}\n",
            crate::names::shown(&e.path),
            e.error.as_deref().unwrap_or("failed")
        ));
    }
    let n = failed.count();
    if n > FAILED_LISTED {
        s.push_str(&format!(
            "... and {} more (see the journal)\n",
            n - FAILED_LISTED
        ));
    }
    s
}
