//! Notifications: what an incident change says and where it goes.
//!
//! Slack (`slack`) goes through a durable outbox (`outbox`: PostgreSQL, or memory when no
//! database is configured) so a failed post is retried, never dropped; each incident is one
//! message updated in place with its history in a thread. The console notifier serves `demo` and
//! `local` when no Slack token is set; the recording notifier serves tests.

pub mod message;
pub mod outbox;
pub mod slack;

use std::io::IsTerminal;
use std::sync::Mutex;

use uuid::Uuid;

use crate::detect::{IncidentEvent, IncidentNotice, IncidentSink, Severity};
use outbox::{Kind, Outbox};

/// Slack markup made readable on a console: no `*bold*` stars, no `:emoji:` codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.replace('*', "").split(' ') {
        let emoji = word.len() > 2
            && word.starts_with(':')
            && word.ends_with(':')
            && word[1..word.len() - 1]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_');
        if !emoji {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    out
}

/// Slack channel ids by severity; a missing one falls back to the next lower.
#[derive(Debug, Clone)]
pub struct Channels {
    pub warning: String,
    pub high: Option<String>,
    pub critical: Option<String>,
}

impl Channels {
    pub fn for_severity(&self, s: Severity) -> &str {
        let high = self.high.as_deref().unwrap_or(&self.warning);
        match s {
            Severity::Critical => self.critical.as_deref().unwrap_or(high),
            Severity::High => high,
            _ => &self.warning,
        }
    }
}

/// Where notices go.
pub enum Notifier {
    /// Readable lines on stderr, coloured on a terminal.
    Console,
    /// Slack through the outbox; a [`slack::SlackDelivery`] drains it.
    Slack {
        outbox: std::sync::Arc<Outbox>,
        channels: Channels,
    },
    /// Kept in memory, for tests.
    Recording(
        Mutex<Vec<IncidentNotice>>,
        Mutex<Vec<RolloutNotice>>,
        Mutex<Vec<Note>>,
    ),
}

/// A standalone message: a credential-rotation reminder and the like.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// Distinguishes the message (and makes its delivery idempotent).
    pub id: Uuid,
    pub text: String,
    /// Slack channel; the warning channel (critical when urgent) when None.
    pub channel: Option<String>,
    /// Goes to the critical channel (when no channel is given) and is shown as urgent.
    pub urgent: bool,
    /// Offer a "Rotate now" button (API-key reminders of a policy that allows it).
    pub rotate: Option<RotateButton>,
}

/// A "Rotate now" button on an API-key reminder. Slack asks for confirmation first; the press
/// goes to the CredentialPolicy controller, which rotates the key and puts the new one in the
/// policy namespace's [`crate::crd::credential_policy::ROTATED_KEYS_SECRET`] Secret (never in Slack).
#[derive(Debug, Clone, PartialEq)]
pub struct RotateButton {
    /// The key's row id in the gateway database.
    pub key_id: Uuid,
    pub key_prefix: String,
    /// `namespace/name` of the CredentialPolicy that allows it.
    pub policy: String,
    /// How long the old key keeps working, e.g. `24h`.
    pub grace: String,
}

impl RotateButton {
    /// The button's value, which the press carries back: `note id:key id:namespace/policy`.
    pub fn value(&self, note: Uuid) -> String {
        format!("{note}:{}:{}", self.key_id, self.policy)
    }
}

/// A step of a rollout people should hear about: a gate started, passed, waits for approval,
/// refused a revision, promoted it or rolled it back.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutNotice {
    /// Distinguishes this message; button presses carry it back.
    pub id: Uuid,
    pub gateway: String,
    /// Event reason: GateStarted, AwaitingApproval, Promoted, Rejected, RolledBack, …
    pub kind: String,
    pub revision: String,
    pub reason: String,
    /// Gate progress, e.g. `4/5`.
    pub progress: String,
    /// Offer Promote (while awaiting approval) and Roll back buttons.
    pub promote_button: bool,
    pub rollback_button: bool,
}

impl RolloutNotice {
    /// One line for consoles and as the Slack fallback text.
    pub fn line(&self) -> String {
        format!(
            "rollout {}: {} revision {} (gate {}): {}",
            self.gateway, self.kind, self.revision, self.progress, self.reason
        )
    }
}

/// Why a notice could not be recorded for delivery.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("storing a notification in the outbox failed: {0}")]
    Outbox(#[from] crate::db::DbError),
}

impl Notifier {
    pub fn recording() -> Self {
        Self::Recording(
            Mutex::new(Vec::new()),
            Mutex::new(Vec::new()),
            Mutex::new(Vec::new()),
        )
    }

    /// Notes a recording notifier saw.
    pub fn recorded_notes(&self) -> Vec<Note> {
        match self {
            Self::Recording(_, _, v) => v.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    /// Records one standalone message for delivery.
    pub async fn note(&self, n: &Note) -> Result<(), NotifyError> {
        match self {
            Self::Console => {
                if std::io::stderr().is_terminal() && n.urgent {
                    eprintln!("\x1b[1;31m{}\x1b[0m", n.text);
                } else {
                    eprintln!("{}", n.text);
                }
                Ok(())
            }
            Self::Recording(_, _, v) => {
                v.lock().unwrap_or_else(|p| p.into_inner()).push(n.clone());
                Ok(())
            }
            Self::Slack { outbox, channels } => {
                let severity = if n.urgent {
                    Severity::Critical
                } else {
                    Severity::Warning
                };
                let channel = n
                    .channel
                    .clone()
                    .unwrap_or_else(|| channels.for_severity(severity).to_string());
                let emoji = if n.urgent { ":red_circle:" } else { ":key:" };
                let text = format!("{emoji} {}", n.text);
                let mut body = serde_json::json!({"text": text});
                if n.rotate.is_some() {
                    body["blocks"] = message::note_blocks(n, &text);
                }
                outbox
                    .enqueue(n.id, Kind::Main, &channel, body, &format!("note:{}", n.id))
                    .await?;
                Ok(())
            }
        }
    }

    /// Follows up on note `id`: a thread reply, and with `replace` the message itself is
    /// replaced by `text` (which removes its buttons). `at` is where the message is (channel id,
    /// ts) when a button press said so; it is needed when the note was posted before this
    /// process started (its outbox does not know the message then).
    pub async fn note_reply(
        &self,
        id: Uuid,
        at: Option<&(String, String)>,
        text: &str,
        replace: bool,
    ) -> Result<(), NotifyError> {
        match self {
            Self::Console => {
                eprintln!("{text}");
                Ok(())
            }
            Self::Recording(_, _, v) => {
                v.lock().unwrap_or_else(|p| p.into_inner()).push(Note {
                    id,
                    text: text.to_string(),
                    channel: None,
                    urgent: false,
                    rotate: None,
                });
                Ok(())
            }
            Self::Slack { outbox, channels } => {
                // Without `at`, replies and updates go to the note's message as this outbox
                // posted it.
                let channel = at.map_or(channels.warning.as_str(), |(c, _)| c.as_str());
                let step = Uuid::new_v4();
                let (mut update, mut reply) = (
                    serde_json::json!({"text": text, "blocks": [
                        {"type": "section", "text": {"type": "mrkdwn", "text": text}}
                    ]}),
                    serde_json::json!({"text": text}),
                );
                if let Some((_, ts)) = at {
                    update["ts"] = ts.as_str().into();
                    reply["thread_ts"] = ts.as_str().into();
                }
                if replace {
                    let body = update;
                    outbox
                        .enqueue(
                            id,
                            Kind::Update,
                            channel,
                            body,
                            &format!("note:{id}:{step}:update"),
                        )
                        .await?;
                }
                let body = reply;
                outbox
                    .enqueue(
                        id,
                        Kind::Reply,
                        channel,
                        body,
                        &format!("note:{id}:{step}:reply"),
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// What a recording notifier saw.
    pub fn recorded(&self) -> Vec<IncidentNotice> {
        match self {
            Self::Recording(v, _, _) => v.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    /// Rollout notices a recording notifier saw.
    pub fn recorded_rollouts(&self) -> Vec<RolloutNotice> {
        match self {
            Self::Recording(_, v, _) => v.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    /// Records one rollout step for delivery.
    pub async fn rollout(&self, n: &RolloutNotice) -> Result<(), NotifyError> {
        match self {
            Self::Console => {
                let line = n.line();
                if std::io::stderr().is_terminal() {
                    let colour = match n.kind.as_str() {
                        "Rejected" | "RolledBack" => "1;31",
                        "Promoted" | "Deployed" | "RolloutSettled" => "32",
                        _ => "36",
                    };
                    eprintln!("\x1b[{colour}m{line}\x1b[0m");
                } else {
                    eprintln!("{line}");
                }
                Ok(())
            }
            Self::Recording(_, v, _) => {
                v.lock().unwrap_or_else(|p| p.into_inner()).push(n.clone());
                Ok(())
            }
            Self::Slack { outbox, channels } => {
                let body = serde_json::json!({"text": message::rollout_text(n), "blocks": message::rollout_blocks(n)});
                let key = format!("rollout:{}:{}:{}", n.gateway, n.revision, n.kind);
                outbox
                    .enqueue(n.id, Kind::Main, &channels.warning, body, &key)
                    .await?;
                Ok(())
            }
        }
    }

    /// Records one incident change for delivery.
    pub async fn notify(&self, n: &IncidentNotice) -> Result<(), NotifyError> {
        match self {
            Self::Console => {
                let line = format!("[{}] {}", n.at, plain(&message::change_text(n)));
                if std::io::stderr().is_terminal() {
                    let colour = match (n.event, n.severity) {
                        (IncidentEvent::Resolve, _) => "32",
                        (_, Severity::Critical) => "1;31",
                        (_, Severity::High) => "33",
                        _ => "36",
                    };
                    eprintln!(
                        "\x1b[{colour}m{line}\x1b[0m  {}",
                        plain(&message::summary(n))
                    );
                } else {
                    eprintln!("{line}  {}", plain(&message::summary(n)));
                }
                Ok(())
            }
            Self::Recording(v, _, _) => {
                v.lock().unwrap_or_else(|p| p.into_inner()).push(n.clone());
                Ok(())
            }
            Self::Slack { outbox, channels } => {
                let channel = channels.for_severity(n.severity).to_string();
                let blocks = message::incident_blocks(n);
                let text = message::summary(n);
                let key = |kind: &str| format!("{}:{}:{kind}", n.incident_id, n.seq);
                if n.event == IncidentEvent::Open && n.remark.is_none() {
                    let body = serde_json::json!({"text": text, "blocks": blocks});
                    outbox
                        .enqueue(n.incident_id, Kind::Main, &channel, body, &key("main"))
                        .await?;
                } else {
                    let body = serde_json::json!({"text": text, "blocks": blocks});
                    outbox
                        .enqueue(n.incident_id, Kind::Update, &channel, body, &key("update"))
                        .await?;
                }
                let reply = serde_json::json!({"text": message::change_text(n)});
                outbox
                    .enqueue(n.incident_id, Kind::Reply, &channel, reply, &key("reply"))
                    .await?;
                // An escalation into a severity routed elsewhere is also posted there.
                if matches!(n.event, IncidentEvent::Escalate)
                    && n.remark.is_none()
                    && channels.for_severity(n.severity) != channels.for_severity(Severity::Warning)
                {
                    let body = serde_json::json!({"text": format!("{} {}", message::change_text(n), message::summary(n)), "standalone": true});
                    outbox
                        .enqueue(
                            n.incident_id,
                            Kind::Reply,
                            channels.for_severity(n.severity),
                            body,
                            &key("crosspost"),
                        )
                        .await?;
                }
                Ok(())
            }
        }
    }
}

/// The detector's incident changes and notes reach people through the notifier.
impl IncidentSink for Notifier {
    fn incident<'a>(
        &'a self,
        n: &'a IncidentNotice,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::detect::SinkError>> {
        Box::pin(async move { self.notify(n).await.map_err(Into::into) })
    }

    fn note<'a>(
        &'a self,
        id: Uuid,
        text: String,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::detect::SinkError>> {
        Box::pin(async move {
            let note = Note {
                id,
                text,
                channel: None,
                urgent: false,
                rotate: None,
            };
            self.note(&note).await.map_err(Into::into)
        })
    }
}
