//! Slack delivery (slack-morphism) from the outbox, and the interaction endpoint for buttons.
//!
//! Configuration comes from the environment: `SLACK_BOT_TOKEN`, `SLACK_SIGNING_SECRET`, and
//! `SLACK_API_URL` (base URL of the Web API, default Slack's; plain http works, for proxies and
//! local stand-ins). A 429 is retried after its `Retry-After`; 5xx and network errors back off
//! exponentially (1 s doubling to 5 min); nothing is dropped. Tokens and signing secrets appear
//! only in the Authorization header and the HMAC, never in a payload or a log line.

use std::{fmt, sync::Arc, time::Duration};

use serde_json::{json, Value};
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

use super::outbox::{Kind, Outbox, Pending};
use crate::db::DbError;

/// The Slack settings from the environment. Debug output hides the secrets.
#[derive(Clone)]
pub struct SlackConfig {
    pub token: String,
    pub signing_secret: Option<String>,
    pub api_url: String,
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SlackConfig(api_url: {}, token: ****, signing_secret: {})",
            self.api_url,
            if self.signing_secret.is_some() {
                "****"
            } else {
                "unset"
            }
        )
    }
}

impl SlackConfig {
    /// `SLACK_API_URL`, else Slack's own.
    pub fn api_url_from_env() -> String {
        std::env::var("SLACK_API_URL")
            .unwrap_or_else(|_| "https://slack.com/api".into())
            .trim_end_matches('/')
            .to_string()
    }

    /// From `SLACK_BOT_TOKEN`, `SLACK_SIGNING_SECRET`, `SLACK_API_URL`; None without a token.
    pub fn from_env() -> Option<Self> {
        let token = std::env::var("SLACK_BOT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())?;
        Some(Self {
            token,
            signing_secret: std::env::var("SLACK_SIGNING_SECRET")
                .ok()
                .filter(|s| !s.is_empty()),
            api_url: Self::api_url_from_env(),
        })
    }
}

/// A [`SlackDelivery`] running in the background.
pub struct DeliveryTask {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl DeliveryTask {
    /// Delivers what is due once more, then stops.
    pub async fn finish(self) {
        tokio::time::sleep(Duration::from_millis(600)).await;
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Whether this process delivers now (in a cluster: while it leads).
pub type Active = Arc<dyn Fn() -> bool + Send + Sync>;

/// Slack through `outbox` when `SLACK_BOT_TOKEN` is set (every severity to `channel`),
/// otherwise the console. The outbox is in memory where no database is given (`demo`, and
/// `local` / `operator` without `--database-url`).
pub fn console_or_slack(
    channel: &str,
    outbox: Arc<Outbox>,
    active: Active,
) -> (super::Notifier, Option<DeliveryTask>) {
    let Some(config) = SlackConfig::from_env() else {
        return (super::Notifier::Console, None);
    };
    let (notifier, task) = slack_notifier(
        &config,
        super::Channels {
            warning: channel.to_string(),
            high: None,
            critical: None,
        },
        outbox,
        active,
    );
    (notifier, Some(task))
}

/// Slack through `outbox`, drained in the background while `active` says so.
pub fn slack_notifier(
    config: &SlackConfig,
    channels: super::Channels,
    outbox: Arc<Outbox>,
    active: Active,
) -> (super::Notifier, DeliveryTask) {
    let delivery = SlackDelivery::new(config, outbox.clone());
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let task = tokio::spawn(
        delivery.run_while(Duration::from_millis(500), active, async move {
            s.notified().await
        }),
    );
    let notifier = super::Notifier::Slack { outbox, channels };
    (notifier, DeliveryTask { stop, task })
}

type Connector = SlackClientHyperConnector<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

/// Drains the outbox into Slack.
pub struct SlackDelivery {
    client: SlackClient<Connector>,
    token: SlackApiToken,
    outbox: Arc<Outbox>,
    /// What the outbox could not record because its database went away mid-pass: rows Slack
    /// accepted (with their message ts) and rows claimed but not sent. Written back before
    /// the next pass claims anything, so a row Slack accepted is never sent again by this
    /// deliverer, and rows it did not get to wait no longer than the database's outage.
    unrecorded: std::sync::Mutex<Unrecorded>,
}

#[derive(Default)]
struct Unrecorded {
    delivered: Vec<(i64, Option<String>)>,
    unsent: Vec<i64>,
}

/// What one delivery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub delivered: usize,
    pub failed: usize,
}

fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 8)).min(Duration::from_secs(300))
}

impl SlackDelivery {
    pub fn new(config: &SlackConfig, outbox: Arc<Outbox>) -> Self {
        let https = crate::tls::https_or_http();
        let connector = Connector::from(https).with_slack_api_url(&config.api_url);
        Self {
            client: SlackClient::new(connector),
            token: SlackApiToken::new(SlackApiTokenValue::new(config.token.clone())),
            outbox,
            unrecorded: Default::default(),
        }
    }

    /// Delivers every row that is due now, once.
    pub async fn deliver_due(&self) -> Result<PassReport, DbError> {
        self.record_leftovers().await?;
        let mut report = PassReport::default();
        let mut rows = self.outbox.due(100).await?.into_iter();
        while let Some(row) = rows.next() {
            let recorded = match self.send(&row).await {
                Ok(ts) => match self.outbox.delivered(row.id, ts.as_deref()).await {
                    Ok(()) => {
                        report.delivered += 1;
                        Ok(())
                    }
                    Err(e) => {
                        self.unrecorded().delivered.push((row.id, ts));
                        Err(e)
                    }
                },
                Err((reason, retry_in)) => {
                    tracing::warn!(
                        row = row.id,
                        attempt = row.attempts + 1,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "Slack delivery failed, will retry: {reason}"
                    );
                    report.failed += 1;
                    let recorded = self.outbox.failed(row.id, &reason, retry_in).await;
                    if recorded.is_err() {
                        self.unrecorded().unsent.push(row.id);
                    }
                    recorded
                }
            };
            if let Err(e) = recorded {
                self.unrecorded().unsent.extend(rows.map(|r| r.id));
                return Err(e);
            }
        }
        Ok(report)
    }

    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Unrecorded> {
        self.unrecorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what an earlier pass could not; an error leaves the rest for the next pass.
    async fn record_leftovers(&self) -> Result<(), DbError> {
        let (delivered, unsent) = {
            let mut u = self.unrecorded();
            (
                std::mem::take(&mut u.delivered),
                std::mem::take(&mut u.unsent),
            )
        };
        let mut delivered = delivered.into_iter();
        while let Some((id, ts)) = delivered.next() {
            if let Err(e) = self.outbox.delivered(id, ts.as_deref()).await {
                let mut u = self.unrecorded();
                u.delivered.push((id, ts));
                u.delivered.extend(delivered);
                u.unsent.extend(unsent);
                return Err(e);
            }
        }
        if !unsent.is_empty() {
            if let Err(e) = self.outbox.release(&unsent).await {
                self.unrecorded().unsent.extend(unsent);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Delivers until `stop` resolves, polling every `every`.
    pub async fn run(self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        self.run_while(every, Arc::new(|| true), stop).await
    }

    /// [`SlackDelivery::run`], delivering only while `active` says so (the leader delivers;
    /// a standby's notices wait in the shared outbox for it).
    pub async fn run_while(
        self,
        every: Duration,
        active: Active,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            if active() {
                if let Err(e) = self.deliver_due().await {
                    tracing::warn!("cannot read the notification outbox: {e}");
                }
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        // What Slack accepted but the outbox did not record yet: one last try, so a deliverer
        // that is replaced does not leave it to be sent again.
        if let Err(e) = self.record_leftovers().await {
            tracing::warn!("stopping with deliveries the outbox could not record: {e}");
        }
    }

    /// One Slack call; Ok(message ts) or Err((reason, retry after)).
    async fn send(&self, row: &Pending) -> Result<Option<String>, (String, Duration)> {
        let mut body = row.body.clone();
        let standalone = body
            .get("standalone")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(obj) = body.as_object_mut() {
            obj.remove("standalone");
        }
        let (method, request) = match (row.kind, &row.main) {
            (Kind::Main, _) => (
                "chat.postMessage",
                merge(body, json!({"channel": row.channel})),
            ),
            (Kind::Reply, _) if standalone => (
                "chat.postMessage",
                merge(body, json!({"channel": row.channel})),
            ),
            (Kind::Reply, Some((channel, ts))) => (
                "chat.postMessage",
                merge(body, json!({"channel": channel, "thread_ts": ts})),
            ),
            (Kind::Update, Some((channel, ts))) => (
                "chat.update",
                merge(body, json!({"channel": channel, "ts": ts})),
            ),
            // A row that names its message itself (a button press says where it was) needs
            // no main row: its message may predate this outbox.
            (Kind::Update, None) if body.get("ts").is_some() => {
                ("chat.update", merge(body, json!({"channel": row.channel})))
            }
            (Kind::Reply, None) if body.get("thread_ts").is_some() => (
                "chat.postMessage",
                merge(body, json!({"channel": row.channel})),
            ),
            (_, None) => {
                return Err((
                    "the incident's main message has not been posted yet".into(),
                    Duration::from_secs(1),
                ))
            }
        };
        let session = self.client.open_session(&self.token);
        let result: Result<Value, SlackClientError> = session
            .http_session_api
            .http_post(method, &request, None)
            .await;
        match result {
            Ok(v) if v.get("ok").and_then(Value::as_bool) == Some(false) => {
                let code = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown_error");
                Err((
                    format!("{method}: Slack answered {code}"),
                    backoff(row.attempts).max(Duration::from_secs(30)),
                ))
            }
            Ok(v) => Ok(v.get("ts").and_then(Value::as_str).map(str::to_string)),
            Err(SlackClientError::RateLimitError(e)) => {
                let wait = e.retry_after.unwrap_or(Duration::from_secs(1));
                Err((format!("{method}: rate limited by Slack"), wait))
            }
            Err(SlackClientError::ApiError(e)) => Err((
                format!("{method}: Slack answered {}", e.code),
                backoff(row.attempts).max(Duration::from_secs(30)),
            )),
            Err(e) => Err((
                format!("{method}: {}", redact(&e.to_string())),
                backoff(row.attempts),
            )),
        }
    }
}

fn merge(mut body: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    body
}

/// Error texts from the HTTP layer can echo request details; keep anything token-shaped out.
fn redact(text: &str) -> String {
    text.split_whitespace()
        .map(|w| if w.contains("xox") { "****" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A button a person pressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Acknowledge,
    Silence1h,
    Promote,
    Rollback,
    /// "Rotate now" on an API-key reminder.
    RotateKey,
}

impl Action {
    /// What Acknowledge and Silence 1h (pressed at `now`, unix seconds) do to an incident;
    /// `None` for the rollout buttons.
    pub fn response(self, now: i64) -> Option<crate::detect::engine::Response> {
        use crate::detect::engine::{Response, SILENCE_SECS};
        match self {
            Self::Acknowledge => Some(Response::Acknowledge),
            Self::Silence1h => Some(Response::Silence {
                until: now + SILENCE_SECS,
            }),
            Self::Promote | Self::Rollback | Self::RotateKey => None,
        }
    }

    pub fn audit_name(self) -> &'static str {
        match self {
            Self::Acknowledge => "slack.acknowledge",
            Self::Silence1h => "slack.silence",
            Self::Promote => "slack.promote",
            Self::Rollback => "slack.rollback",
            Self::RotateKey => "slack.rotate_key",
        }
    }
}

/// A verified button press.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interaction {
    pub action: Action,
    /// The message's subject: the incident, the rollout notice or (Rotate now) the reminder.
    pub incident: uuid::Uuid,
    pub revision: Option<String>,
    /// What Rotate now names.
    pub rotate: Option<RotateTarget>,
    /// Where the pressed message is: (channel id, message ts), from the payload.
    pub message: Option<(String, String)>,
    pub user_id: String,
    pub user_name: String,
}

/// The API key a "Rotate now" press names, and the policy that allowed the button.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateTarget {
    pub key_id: uuid::Uuid,
    pub namespace: String,
    pub policy: String,
}

impl Interaction {
    /// Who pressed, as the audit log's actor.
    pub fn actor(&self) -> String {
        format!("slack:{} ({})", self.user_name, self.user_id)
    }
}

/// Why an interaction was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InteractionError {
    #[error("missing X-Slack-Signature or X-Slack-Request-Timestamp header")]
    MissingHeaders,
    #[error("the request signature does not verify, or its timestamp is older than 5 minutes")]
    BadSignature,
    #[error("the interaction payload is malformed: {0}")]
    Malformed(String),
    #[error("no signing secret configured; set SLACK_SIGNING_SECRET")]
    NoSecret,
}

/// Verifies a Slack interaction request (signature over `v0:<ts>:<body>`, timestamp within five
/// minutes) and parses the pressed button.
pub fn verify_interaction(
    signing_secret: Option<&str>,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &str,
) -> Result<Interaction, InteractionError> {
    let secret = signing_secret.ok_or(InteractionError::NoSecret)?;
    let (sig, ts) = signature
        .zip(timestamp)
        .ok_or(InteractionError::MissingHeaders)?;
    SlackEventSignatureVerifier::new(&SlackSigningSecret::new(secret.to_string()))
        .verify(sig, body, ts)
        .map_err(|_| InteractionError::BadSignature)?;
    let payload = form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| InteractionError::Malformed("no payload field".into()))?;
    let v: Value =
        serde_json::from_str(&payload).map_err(|e| InteractionError::Malformed(e.to_string()))?;
    let action = &v["actions"][0];
    let value = action["value"].as_str().unwrap_or_default();
    let (id, revision) = match value.split_once(':') {
        Some((id, rev)) => (id, Some(rev.to_string())),
        None => (value, None),
    };
    let action = match action["action_id"].as_str() {
        Some("ack") => Action::Acknowledge,
        Some("silence_1h") => Action::Silence1h,
        Some("promote") => Action::Promote,
        Some("rollback") => Action::Rollback,
        Some("rotate_key") => Action::RotateKey,
        other => {
            return Err(InteractionError::Malformed(format!(
                "unknown action {other:?}"
            )))
        }
    };
    // Rotate now carries `key id:namespace/policy` after the reminder's id.
    let (revision, rotate) = match (action, revision) {
        (Action::RotateKey, Some(rest)) => (None, Some(rotate_target(&rest)?)),
        (Action::RotateKey, None) => {
            return Err(InteractionError::Malformed(
                "the Rotate now button names no key".into(),
            ))
        }
        (_, revision) => (revision, None),
    };
    Ok(Interaction {
        action,
        incident: uuid::Uuid::parse_str(id).map_err(|_| {
            InteractionError::Malformed("the button value is not an incident id".into())
        })?,
        revision,
        rotate,
        message: message_location(&v),
        user_id: v["user"]["id"].as_str().unwrap_or("unknown").to_string(),
        user_name: v["user"]["username"]
            .as_str()
            .or(v["user"]["name"].as_str())
            .unwrap_or("unknown")
            .to_string(),
    })
}

/// The pressed message's channel and ts (`container`, else `channel` and `message`).
fn message_location(v: &Value) -> Option<(String, String)> {
    let channel = v["container"]["channel_id"]
        .as_str()
        .or(v["channel"]["id"].as_str())?;
    let ts = v["container"]["message_ts"]
        .as_str()
        .or(v["message"]["ts"].as_str())?;
    Some((channel.to_string(), ts.to_string()))
}

fn rotate_target(value: &str) -> Result<RotateTarget, InteractionError> {
    let bad = || {
        InteractionError::Malformed(
            "the Rotate now button value is not `key id:namespace/policy`".into(),
        )
    };
    let (key, policy) = value.split_once(':').ok_or_else(bad)?;
    let (namespace, policy) = policy.split_once('/').ok_or_else(bad)?;
    if namespace.is_empty() || policy.is_empty() {
        return Err(bad());
    }
    Ok(RotateTarget {
        key_id: uuid::Uuid::parse_str(key).map_err(|_| bad())?,
        namespace: namespace.to_string(),
        policy: policy.to_string(),
    })
}

/// Computes the `X-Slack-Signature` for a body (used by tests and local stand-ins).
pub fn sign(signing_secret: &str, timestamp: &str, body: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(signing_secret.as_bytes())
        .expect("HMAC takes any key");
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// What the interaction endpoint does with a verified button press: records who did what in
/// the audit log (when a database is configured), lets `apply` act on it (acknowledge, silence,
/// promote, roll back) and, when `apply` returns the incident's new state, updates its message.
pub async fn handle_interaction(
    signing_secret: Option<&str>,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: &str,
    audit: Option<&sqlx::PgPool>,
    notifier: &super::Notifier,
    apply: impl FnOnce(&Interaction) -> Option<super::IncidentNotice>,
) -> Result<Interaction, InteractionError> {
    let interaction = verify_interaction(signing_secret, signature, timestamp, body)?;
    if let Some(pool) = audit {
        let actor = interaction.actor();
        let detail = json!({"revision": interaction.revision});
        if let Err(e) = crate::db::audit::append(
            pool,
            &actor,
            interaction.action.audit_name(),
            &interaction.incident.to_string(),
            None,
            &detail,
        )
        .await
        {
            tracing::error!("cannot audit a Slack action: {e}");
        }
    }
    if let Some(notice) = apply(&interaction) {
        if let Err(e) = notifier.notify(&notice).await {
            tracing::error!("cannot queue the Slack update: {e}");
        }
    }
    Ok(interaction)
}

/// What the interaction endpoint needs: the signing secret, the audit pool, the notifier and
/// what to do with a press.
pub struct InteractionEndpoint {
    pub signing_secret: Option<String>,
    /// More signing secrets a press may be signed with (the gateways' own Slack apps); the
    /// operator keeps this current.
    pub extra_secrets: Arc<std::sync::RwLock<Vec<String>>>,
    pub audit: Option<sqlx::PgPool>,
    pub notifier: Arc<super::Notifier>,
    #[allow(clippy::type_complexity)]
    pub apply: Arc<dyn Fn(&Interaction) -> Option<super::IncidentNotice> + Send + Sync>,
}

/// Largest interaction body accepted (Slack's are a few KiB).
const MAX_INTERACTION_BODY: usize = 64 * 1024;

impl InteractionEndpoint {
    /// Serves `POST /slack/interactions`: 200 on a verified press, 401 on a bad or stale
    /// signature, 400 on a malformed payload; bodies are JSON `{"error", "code"}`.
    pub async fn serve(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<String> {
        use http_body_util::BodyExt;
        let reply = |status: u16, v: Value| {
            http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(v.to_string())
                .unwrap_or_default()
        };
        if req.method() != http::Method::POST {
            return reply(
                405,
                json!({"error": "use POST", "code": "method_not_allowed"}),
            );
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (sig, ts) = (
            header("x-slack-signature"),
            header("x-slack-request-timestamp"),
        );
        let body = match http_body_util::Limited::new(req.into_body(), MAX_INTERACTION_BODY)
            .collect()
            .await
        {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => {
                return reply(
                    413,
                    json!({"error": "the interaction body is too large", "code": "body_too_large"}),
                )
            }
        };
        let apply = self.apply.clone();
        // The first secret the request verifies with; else the primary one, whose refusal is
        // then reported.
        let extra = self
            .extra_secrets
            .read()
            .map(|v| v.clone())
            .unwrap_or_default();
        let secret = self
            .signing_secret
            .iter()
            .chain(extra.iter())
            .find(|s| verify_interaction(Some(s), sig.as_deref(), ts.as_deref(), &body).is_ok())
            .or(self.signing_secret.as_ref())
            .or(extra.first())
            .cloned();
        match handle_interaction(
            secret.as_deref(),
            sig.as_deref(),
            ts.as_deref(),
            &body,
            self.audit.as_ref(),
            &self.notifier,
            |i| apply(i),
        )
        .await
        {
            Ok(i) => {
                tracing::info!(action = i.action.audit_name(), incident = %i.incident, user = %i.user_id, "Slack action");
                reply(200, json!({}))
            }
            Err(e @ (InteractionError::BadSignature | InteractionError::MissingHeaders)) => {
                tracing::warn!("refused a Slack interaction: {e}");
                reply(
                    401,
                    json!({"error": e.to_string(), "code": "bad_signature"}),
                )
            }
            Err(e @ InteractionError::NoSecret) => reply(
                503,
                json!({"error": e.to_string(), "code": "not_configured"}),
            ),
            Err(e) => reply(
                400,
                json!({"error": e.to_string(), "code": "malformed_interaction"}),
            ),
        }
    }
}
