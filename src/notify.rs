//! Notifications (DESIGN §7): errors, hazards and summaries for the administrator.
//!
//! Every event goes through [`Notifier::send`]. A notification that cannot be sent is
//! logged and never breaks a run.

use crate::config::NotifyConfig;

/// The three kinds of notification, each with its own recipient (DESIGN §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Error,
    Hazard,
    Summary,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Error => "error",
            Kind::Hazard => "hazard",
            Kind::Summary => "summary",
        }
    }
}

pub struct Notifier {
    config: NotifyConfig,
}

impl Notifier {
    pub fn new(config: &NotifyConfig) -> Notifier {
        Notifier {
            config: config.clone(),
        }
    }

    /// Sends one notification; failures are logged, never returned.
    pub fn send(&self, kind: Kind, subject: &str, body: &str) {
        if !self.config.notify {
            tracing::debug!(
                "{} notification not sent (notify is off): {subject}",
                kind.as_str()
            );
            return;
        }
        tracing::warn!(
            "{} notification not sent: email delivery is not available in this build: {subject}\n{body}",
            kind.as_str()
        );
    }
}
