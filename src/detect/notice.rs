//! What the detector tells people, and the seam it tells it through: an [`IncidentNotice`] for
//! every change of an incident, a note for a credential change. The detector knows only
//! [`IncidentSink`]; `crate::notify` implements it (Slack through the outbox, the console, or a
//! recording for tests), so notifications depend on the detector and never the reverse.

use futures::future::BoxFuture;
use uuid::Uuid;

use super::{IncidentEvent, Severity};

/// Why a notice could not be handed on (the detector logs it; the incident itself is kept).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where the detector's notices go.
pub trait IncidentSink: Send + Sync {
    /// One change of one incident.
    fn incident<'a>(&'a self, n: &'a IncidentNotice) -> BoxFuture<'a, Result<(), SinkError>>;
    /// A plain note, delivered once per `id`.
    fn note<'a>(&'a self, id: Uuid, text: String) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// One change of one incident, with everything a message needs (and nothing secret). Stored
/// with the incident (its last notice), so a restarted detector updates the same message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IncidentNotice {
    pub incident_id: Uuid,
    /// Increases with every change of this incident; makes delivery idempotent.
    pub seq: u32,
    pub gateway: String,
    pub route: String,
    pub signal: String,
    pub severity: Severity,
    pub event: IncidentEvent,
    /// Current value / baseline.
    pub ratio: f64,
    /// Current error ratio.
    pub current: f64,
    pub baseline: f64,
    pub p_value: f64,
    pub window_secs: u64,
    /// RFC 3339 end of the window.
    pub at: String,
    pub runbook_url: Option<String>,
    pub status_url: Option<String>,
    /// Set when the incident concerns a rollout: adds Promote / Roll back buttons.
    pub rollout_revision: Option<String>,
    pub acknowledged_by: Option<String>,
    /// Set when a person changed the incident (acknowledged, silenced): the message is updated
    /// in place and the thread reply says this instead of a severity change.
    pub remark: Option<String>,
    /// Slack user-group id mentioned on critical incidents.
    pub critical_mention: Option<String>,
    /// Credential changes shortly before this change (key rotations, revocations, credential
    /// writes), e.g. `key.rotate at_live_Xy3kQ9ab at 07:01:12Z`: the first thing to suspect
    /// when auth failures jump.
    pub related_changes: Vec<String>,
}
