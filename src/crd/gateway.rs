//! `ApiGateway`: one gateway deployment, how its revisions roll out, how it is watched and where
//! its escalations go.

// Each `printcolumn(...)` repeats `type_ = ...`; clippy reads them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::KubeDuration;

/// One Connector Agent as the control plane last heard from it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    pub name: String,
    pub pool: String,
    /// `Connected`, `Lost` (silent for longer than the pool's `lostAfter`) or `Revoked`.
    pub state: String,
    /// The agent's apitree version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The configuration generation the agent serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The generation the control plane publishes for its pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_generation: Option<u64>,
    /// RFC 3339: the agent's last call.
    pub last_seen: String,
    /// Why the agent refused the newest configuration, if it did (paths, never the partner's
    /// values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// While the gate checks a revision that changes its pool: what the agent made of that
    /// revision's candidate configuration, e.g. `generation 17: running, ready, smoke 2/2
    /// passed` or `generation 17: refused: …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

/// Desired state of one API gateway: what runs, how new revisions are gated, how it is watched.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "apitree.io",
    version = "v1alpha1",
    kind = "ApiGateway",
    namespaced,
    status = "ApiGatewayStatus",
    shortname = "agw",
    category = "apitree",
    doc = "An API gateway that apitree deploys with a 5-check Blue/Green gate, watches for error-rate anomalies and heals.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the gateway is in its lifecycle"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.activeRevision",
        description = "Revision that takes traffic"
    ),
    printcolumn(
        name = "Gate",
        type_ = "string",
        json_path = ".status.gate.progress",
        description = "Gate checks passed for the preview revision, e.g. 3/5"
    ),
    printcolumn(
        name = "Incidents",
        type_ = "integer",
        json_path = ".status.openIncidents",
        description = "Open incidents"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ApiGatewaySpec {
    /// Container image of the proxy. Empty means the operator's own image, so operator and data
    /// plane upgrade together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Proxy replicas per color (blue and green each run this many while both are up).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,

    /// Compute resources of each proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// What the proxy does: routes, rate-limit tiers and defaults. Any change here is a new
    /// revision and goes through the gate.
    pub proxy: ProxySpec,

    /// PostgreSQL holding keys, orgs, credentials and incidents. Without it the proxy runs
    /// DB-less from the rendered config and drift checks are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<SecretKeyRef>,

    /// Redis for rate-limit counters shared across replicas. Without it each replica limits on
    /// its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<SecretKeyRef>,

    /// Secrets the proxy needs: the key-hashing pepper and the versioned master key that
    /// decrypts upstream credentials. Their versions are part of the revision hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<ProxySecrets>,

    /// TLS on the proxies' public port (the Services then listen on 443). Without it the
    /// proxies speak plain HTTP and TLS is left to whatever is in front of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GatewayTls>,

    /// How a new revision rolls out.
    #[serde(default)]
    pub gate: GateSpec,

    /// How the running gateway is watched for anomalies.
    #[serde(default)]
    pub detection: DetectionSpec,

    /// Where escalations go.
    #[serde(default)]
    pub escalation: EscalationSpec,

    /// What to do when the gateway database's schema drifts from what this release expects:
    /// `auto` fixes additive and security drift at once, `prompt` waits for `apitree drift fix`,
    /// `report` only records it, `off` does not check. Unfixed drift fails gate check 3.
    #[serde(default)]
    pub drift_policy: DriftPolicy,

    /// How long the gateway database keeps each kind of data before the health sweep deletes
    /// it (in batches, each run that deletes audited with its counts). The audit log is never
    /// deleted. Only used with `database`; not part of the revision. Each at least 1d.
    #[serde(default)]
    pub retention: RetentionSpec,
    /// Routes served inside partners' networks by Connector Agents (`apitree agent`), by agent
    /// pool. Their upstreams and credentials are in each agent's local file, never here; the
    /// tiers, orgs and key hashes are this gateway's. Part of the revision: a change goes
    /// through the gate like any other, and each pool receives the configuration of the
    /// revision that takes traffic (a rollback rolls the agents back too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub connectors: Vec<ConnectorSpec>,
}

/// The routes one pool of Connector Agents serves.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The agent pool, as the control plane's agents file assigns agents to it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pool: String,
    /// Routes the pool's agents serve, matched by longest path prefix. Route names are unique
    /// across the gateway (cluster routes and every pool's).
    #[schemars(length(max = 64))]
    pub routes: Vec<ConnectorRoute>,
    /// An agent of the pool that has not called the control plane for this long is lost: an
    /// `agent lost` incident (high), resolved when it calls again.
    #[serde(default = "default_lost_after")]
    pub lost_after: KubeDuration,
}

fn default_lost_after() -> KubeDuration {
    KubeDuration::from_secs(60)
}

/// A route served by Connector Agents: a cluster route's policy without its upstream, its
/// credential, its probe and body logging, which are the partner's (in the agent's local file).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectorRoute {
    /// Route name, used in metrics, incidents and access logs; the agent's local file gives
    /// its upstream under the same name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Path prefix that selects this route, e.g. `/accounts/`.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub path_prefix: String,
    /// Upstream call timeout; defaults to `proxy.defaultTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<KubeDuration>,
    /// Key scopes allowed on this route.
    #[serde(default = "default_scopes")]
    #[schemars(length(min = 1, max = 2))]
    pub scopes: Vec<KeyScope>,
    /// Rate-limit tier for this route's traffic; defaults to the key's own tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Korean PII handling on responses: `off`, `flag` or `mask`.
    #[serde(default)]
    pub pii: PiiMode,
    /// Circuit breaker of this route's upstream.
    #[serde(default)]
    pub breaker: BreakerSpec,
    /// Methods this route forwards (empty: every method except TRACE and CONNECT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub methods: Vec<RouteMethod>,
    /// Accept an encoded slash (`%2F`) in the path and pass it on encoded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_encoded_slashes: bool,
}

impl ConnectorRoute {
    /// The route as a proxy runs it, going to `upstream` with `credential` (the partner's).
    pub fn to_route(&self, upstream: String, credential: Option<String>) -> RouteSpec {
        RouteSpec {
            name: self.name.clone(),
            path_prefix: self.path_prefix.clone(),
            upstream,
            timeout: self.timeout.clone(),
            scopes: self.scopes.clone(),
            tier: self.tier.clone(),
            credential,
            pii: self.pii,
            breaker: self.breaker.clone(),
            log_bodies: false,
            methods: self.methods.clone(),
            allow_encoded_slashes: self.allow_encoded_slashes,
            probe: None,
        }
    }
}

/// How long each kind of data is kept (durations such as `400d`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Usage counters (per key, API and day), by the day they count: 400d, a year of billing
    /// history and a month to settle the last invoice.
    #[serde(default = "default_keep_usage")]
    pub usage: KubeDuration,
    /// Incidents, from when they were resolved: 180d, two quarters of reviews and trends.
    #[serde(default = "default_keep_incidents")]
    pub resolved_incidents: KubeDuration,
    /// Slack messages the outbox delivered, from delivery: 30d (the incident keeps its state;
    /// undelivered messages are never deleted).
    #[serde(default = "default_keep_delivered")]
    pub delivered_notifications: KubeDuration,
    /// API keys, from their revocation or expiry: 90d, long enough to answer "why is my key
    /// refused". A key goes only once no usage row and no newer key refer to it.
    #[serde(default = "default_keep_ended_keys")]
    pub ended_keys: KubeDuration,
    /// Records of data subject requests (exports, erasures), from the request: 1095d, the
    /// proof that requests were answered.
    #[serde(default = "default_keep_requests")]
    pub data_requests: KubeDuration,
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self {
            usage: default_keep_usage(),
            resolved_incidents: default_keep_incidents(),
            delivered_notifications: default_keep_delivered(),
            ended_keys: default_keep_ended_keys(),
            data_requests: default_keep_requests(),
        }
    }
}

const DAY: u64 = 86_400;
fn default_keep_usage() -> KubeDuration {
    KubeDuration::from_secs(400 * DAY)
}
fn default_keep_incidents() -> KubeDuration {
    KubeDuration::from_secs(180 * DAY)
}
fn default_keep_delivered() -> KubeDuration {
    KubeDuration::from_secs(30 * DAY)
}
fn default_keep_ended_keys() -> KubeDuration {
    KubeDuration::from_secs(90 * DAY)
}
fn default_keep_requests() -> KubeDuration {
    KubeDuration::from_secs(1095 * DAY)
}

impl RetentionSpec {
    /// Each kind with its field name in the spec and how long it is kept.
    pub fn kinds(&self) -> [(&'static str, &KubeDuration); 5] {
        [
            ("usage", &self.usage),
            ("resolvedIncidents", &self.resolved_incidents),
            ("deliveredNotifications", &self.delivered_notifications),
            ("endedKeys", &self.ended_keys),
            ("dataRequests", &self.data_requests),
        ]
    }
}

fn default_replicas() -> i32 {
    2
}

/// A key inside a Secret in the resource's namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret whose value is used (for databases and Redis: the URL).
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_url_key() -> String {
    "url".to_string()
}

/// TLS of a gateway's proxies.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTls {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) in the resource's namespace, such as
    /// a cert-manager Certificate's. It is mounted into the proxies, which serve it on their
    /// public port and on their admin port (`/readyz`, `/metrics`: the operator's health checks
    /// and scrapes, the kubelet's probes) and read a renewed pair without a restart; a renewal
    /// is not a new revision.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The name the operator verifies the proxies' certificate against when it calls them
    /// (smoke probes through the preview Service; health checks and scrapes at each pod's
    /// address): a DNS name on the certificate. Default: the preview Service's
    /// `<name>-preview.<namespace>.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The CA certificate (PEM) the operator trusts for the probes: a key of the same Secret
    /// (cert-manager's CA and Vault issuers write `ca.crt`).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_key: String,
    /// The oldest TLS version clients may use: "1.3" (default) or "1.2" for old clients.
    #[serde(default)]
    pub min_version: MinTlsVersion,
}

fn default_ca_key() -> String {
    "ca.crt".to_string()
}

/// The oldest TLS version a gateway accepts.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum MinTlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[default]
    #[serde(rename = "1.3")]
    V1_3,
}

/// Secrets of the data plane.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxySecrets {
    /// Pepper for HMAC-SHA256 API-key hashes. Changing it invalidates every stored key hash.
    pub key_pepper: SecretKeyRef,
    /// Master key (32 bytes, base64) for AES-256-GCM upstream credentials, or a keyring: one
    /// `version:base64` per line, the highest version encrypts. To rotate, add the new version
    /// to the keyring; once the gateway runs it, a CredentialPolicy with `database.gatewayRef`
    /// re-encrypts every credential to it and says when the old versions can be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key: Option<SecretKeyRef>,
    /// Version id of a single master key (ignored for a keyring); stored with every
    /// ciphertext so keys can rotate.
    #[serde(default = "default_master_key_version")]
    #[schemars(range(min = 1))]
    pub master_key_version: i32,
}

fn default_master_key_version() -> i32 {
    1
}

/// The proxy's behaviour.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.routes.all(r, self.routes.exists_one(o, o.name == r.name))", "message": "route names must be unique"},
    {"rule": "self.routes.all(r, !has(r.tier) || self.tiers.exists(t, t.name == r.tier))", "message": "a route names a tier that is not defined in proxy.tiers"},
    {"rule": "!has(self.defaultTier) || self.tiers.exists(t, t.name == self.defaultTier)", "message": "defaultTier names a tier that is not defined in proxy.tiers"}
]))]
pub struct ProxySpec {
    /// Routes, matched by longest path prefix.
    #[schemars(length(min = 1, max = 128))]
    pub routes: Vec<RouteSpec>,
    /// Rate-limit tiers that API keys and routes refer to by name.
    #[serde(default)]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(t, self.exists_one(o, o.name == t.name))", "message": "tier names must be unique"}
    ]))]
    pub tiers: Vec<TierSpec>,
    /// Tier of keys that name none (or a tier that no longer exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tier: Option<String>,
    /// Upstream timeout of routes that set none.
    #[serde(default = "default_route_timeout")]
    pub default_timeout: KubeDuration,
}

fn default_route_timeout() -> KubeDuration {
    KubeDuration::from_secs(30)
}

/// One route of the gateway.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Route name, used in metrics, incidents and access logs.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Path prefix that selects this route, e.g. `/weather/`.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub path_prefix: String,
    /// Upstream base URL; the path after the prefix is appended. `http` or `https`, a host, a
    /// port from 1 to 65535 or none, a base path; no query (the caller's is forwarded) or
    /// fragment, no user name or password.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub upstream: String,
    /// Upstream call timeout; defaults to `proxy.defaultTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<KubeDuration>,
    /// Key scopes allowed on this route. A `test` key on a `live`-only route gets 403.
    #[serde(default = "default_scopes")]
    #[schemars(length(min = 1, max = 2))]
    pub scopes: Vec<KeyScope>,
    /// Rate-limit tier for this route's traffic; defaults to the key's own tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Name of the upstream credential injected into calls (BYOK or system), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Korean PII handling on responses: `off`, `flag` (header and metric) or `mask` (rewrite).
    #[serde(default)]
    pub pii: PiiMode,
    /// Circuit breaker of this route's upstream.
    #[serde(default)]
    pub breaker: BreakerSpec,
    /// Log request and response bodies. Off by default: access logs hold metadata only.
    #[serde(default)]
    pub log_bodies: bool,
    /// Methods this route forwards; others get 405 with an `Allow` header. Empty (the
    /// default): every method except TRACE and CONNECT, which no route forwards. `GET` allows
    /// `HEAD` too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub methods: Vec<RouteMethod>,
    /// Accept an encoded slash (`%2F`) in the path and pass it on encoded. Off by default: such
    /// a path gets 400, because servers disagree on whether it separates segments.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_encoded_slashes: bool,
    /// How the operator's health sweep checks this route's upstream (the proxy ignores it, and
    /// changing it starts no gate). Without it the sweep only asks whether the upstream answers
    /// HTTP at all (any status); an upstream that does not answer is a `upstream down` incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<UpstreamProbe>,
}

/// The health sweep's probe of a route's upstream: `GET path` must answer `expectStatus`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamProbe {
    /// Resolved against the upstream URL as a link would be: `health` is below the upstream's
    /// path (`http://weather/v1/` → `http://weather/v1/health`), `/health` is from the host.
    #[schemars(length(min = 1, max = 512))]
    pub path: String,
    /// The status a healthy upstream answers.
    #[serde(default = "default_probe_status")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: u16,
    /// How long the probe waits for the answer (at most 60s).
    #[serde(default = "default_probe_timeout")]
    pub timeout: KubeDuration,
}

/// The URL the sweep probes for `path` on `upstream`, or why there is none.
pub fn probe_url(upstream: &str, path: &str) -> Result<String, String> {
    let base = reqwest::Url::parse(upstream)
        .map_err(|e| format!("the route's upstream is not a URL: {e}"))?;
    let url = base
        .join(path)
        .map_err(|e| format!("{path:?} is not a path: {e}"))?;
    if url.scheme() != base.scheme() || url.host() != base.host() || url.port() != base.port() {
        return Err(format!(
            "{path:?} leaves the upstream's host: give a path (`health` or `/health`), not a URL"
        ));
    }
    Ok(url.to_string())
}

fn default_probe_status() -> u16 {
    200
}

fn default_probe_timeout() -> KubeDuration {
    KubeDuration::from_secs(5)
}

/// The health sweep's probes of a gateway's upstreams and endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbesSummary {
    /// RFC 3339 time of the sweep.
    pub checked_at: String,
    /// How many upstreams and endpoint sets were probed.
    pub probed: u32,
    /// Those that are down, and why (`route weather: GET … answered 503, expected 200`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

/// A method a route can be limited to.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum RouteMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl RouteMethod {
    pub fn as_method(self) -> http::Method {
        match self {
            Self::Get => http::Method::GET,
            Self::Head => http::Method::HEAD,
            Self::Post => http::Method::POST,
            Self::Put => http::Method::PUT,
            Self::Patch => http::Method::PATCH,
            Self::Delete => http::Method::DELETE,
            Self::Options => http::Method::OPTIONS,
        }
    }
}

pub(crate) fn default_scopes() -> Vec<KeyScope> {
    vec![KeyScope::Live, KeyScope::Test]
}

/// API key scope (also a command-line value: `--scope live|test`).
#[derive(
    Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, clap::ValueEnum,
)]
#[serde(rename_all = "camelCase")]
pub enum KeyScope {
    /// Production keys (`at_live_…`).
    Live,
    /// Sandbox keys (`at_test_…`).
    Test,
}

impl KeyScope {
    /// The name in configuration files, the database and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    /// A scope as the database stores it (a check constraint allows `live` and `test`);
    /// anything else is taken as the sandbox scope, never as production.
    pub fn from_stored(text: &str) -> Self {
        if text == "live" {
            Self::Live
        } else {
            Self::Test
        }
    }
}

/// PII handling of a route.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PiiMode {
    /// No scanning.
    #[default]
    Off,
    /// Scan; report findings in a response header and a metric; do not change the body.
    Flag,
    /// Scan and replace findings in the response body.
    Mask,
}

/// Circuit-breaker settings of an upstream.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BreakerSpec {
    /// Open after this many consecutive failures.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: u32,
    /// Or open when this share of calls in the rolling window failed (0 < ratio ≤ 1)…
    #[serde(default = "default_failure_ratio")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub failure_ratio: f64,
    /// …and the window holds at least this many calls.
    #[serde(default = "default_min_calls")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_calls: u32,
    /// How long the breaker stays open before half-open probes.
    #[serde(default = "default_open_for")]
    pub open_for: KubeDuration,
    /// Probes let through while half-open; all must succeed to close.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            failure_ratio: default_failure_ratio(),
            min_calls: default_min_calls(),
            open_for: default_open_for(),
            half_open_probes: default_half_open_probes(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_failure_ratio() -> f64 {
    0.5
}
fn default_min_calls() -> u32 {
    20
}
fn default_open_for() -> KubeDuration {
    KubeDuration::from_secs(30)
}
fn default_half_open_probes() -> u32 {
    3
}

/// A rate-limit tier: limits per key and per org over a 10-second burst, a minute and a day.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TierSpec {
    /// Tier name, referenced by keys and routes.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Limits of each API key.
    pub per_key: WindowLimits,
    /// Limits of all keys of one org together.
    pub per_org: WindowLimits,
}

/// Request limits over the three windows; all are checked and counted together.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.burst10s <= self.perMinute && self.perMinute <= self.perDay", "message": "limits must not shrink as windows grow: burst10s <= perMinute <= perDay"}
]))]
pub struct WindowLimits {
    /// Requests per 10 seconds.
    #[schemars(range(min = 1))]
    pub burst10s: u64,
    /// Requests per minute.
    #[schemars(range(min = 1))]
    pub per_minute: u64,
    /// Requests per day (the daily quota).
    #[schemars(range(min = 1))]
    pub per_day: u64,
}

/// How a new revision is gated before it takes traffic.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GateSpec {
    /// Time every green replica has to become ready (check 1, rollout).
    #[serde(default = "default_rollout_deadline")]
    pub rollout_deadline: KubeDuration,
    /// How long green's traffic is observed before the analysis check decides (check 5).
    #[serde(default = "default_observation_window")]
    pub observation_window: KubeDuration,
    /// Requests green must have served in the window; fewer makes the analysis Inconclusive,
    /// never Passed.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 1))]
    pub min_samples: u64,
    /// Green fails when its error ratio exceeds blue's by more than this (absolute, 0.01 = one
    /// percentage point) and the difference is significant.
    #[serde(default = "default_max_error_ratio_increase")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_ratio_increase: f64,
    /// Green fails when its p99 latency exceeds blue's by this factor (and by more than 10 ms).
    /// Judged once both colors served at least 1,000 requests in the window, so each p99 rests
    /// on ten or more slow requests.
    #[serde(default = "default_max_latency_ratio")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_latency_ratio: f64,
    /// Significance level of the analysis test.
    #[serde(default = "default_gate_alpha")]
    #[schemars(range(min = 0.0001, max = 0.5))]
    pub alpha: f64,
    /// Requests sent through the preview endpoint (check 4). A probe without a key that must be
    /// refused is always added. A probe answered with a 5xx, or not at all, is tried up to 3
    /// times 200 ms apart (one upstream error is the analysis check's business); any other
    /// wrong status fails it at once.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub smoke: Vec<SmokeProbe>,
    /// Switch traffic as soon as 5/5 checks pass; otherwise wait in AwaitingApproval for the
    /// `apitree.io/promote=<revision>` annotation or the Slack Promote button.
    #[serde(default)]
    pub auto_promote: bool,
    /// How long blue stays warm after the switch; a critical incident on green inside it rolls
    /// back automatically.
    #[serde(default = "default_rollback_window")]
    pub rollback_window: KubeDuration,
}

impl Default for GateSpec {
    fn default() -> Self {
        Self {
            rollout_deadline: default_rollout_deadline(),
            observation_window: default_observation_window(),
            min_samples: default_min_samples(),
            max_error_ratio_increase: default_max_error_ratio_increase(),
            max_latency_ratio: default_max_latency_ratio(),
            alpha: default_gate_alpha(),
            smoke: Vec::new(),
            auto_promote: false,
            rollback_window: default_rollback_window(),
        }
    }
}

fn default_rollout_deadline() -> KubeDuration {
    KubeDuration::from_secs(600)
}
fn default_observation_window() -> KubeDuration {
    KubeDuration::from_secs(300)
}
fn default_min_samples() -> u64 {
    200
}
fn default_max_error_ratio_increase() -> f64 {
    0.01
}
fn default_max_latency_ratio() -> f64 {
    1.5
}
fn default_gate_alpha() -> f64 {
    0.05
}
fn default_rollback_window() -> KubeDuration {
    KubeDuration::from_secs(1_800)
}

/// One smoke request sent to the preview revision.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SmokeProbe {
    /// Probe name shown in the gate's check detail.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Request path, e.g. `/weather/today`.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    /// HTTP method.
    #[serde(default = "default_method")]
    #[schemars(regex(pattern = r"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS)$"))]
    pub method: String,
    /// Status the probe must get back.
    #[serde(default = "default_expect_status")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: u16,
    /// Secret key holding the API key the probe sends; none sends no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretKeyRef>,
}

fn default_method() -> String {
    "GET".to_string()
}
fn default_expect_status() -> u16 {
    200
}

/// How the running gateway is watched.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.thresholds.warning < self.thresholds.high && self.thresholds.high < self.thresholds.critical", "message": "thresholds must be ordered: warning < high < critical"},
    {"rule": "self.source.type != 'prometheus' || has(self.source.prometheusUrl)", "message": "source.prometheusUrl is required when source.type is prometheus"}
]))]
pub struct DetectionSpec {
    /// Length of one scoring window.
    #[serde(default = "default_detection_window")]
    pub window: KubeDuration,
    /// How the baseline is computed from past windows.
    #[serde(default)]
    pub baseline: BaselineMethod,
    /// Floor of the baseline error ratio, so a near-zero baseline cannot turn one error into "10x".
    #[serde(default = "default_baseline_floor")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub baseline_floor: f64,
    /// Score multiples (current ratio / baseline) for each severity.
    #[serde(default)]
    pub thresholds: SeverityThresholds,
    /// Significance level: a severity is raised only when the excess has a p-value below this.
    #[serde(default = "default_detection_alpha")]
    #[schemars(range(min = 0.000001, max = 0.5))]
    pub alpha: f64,
    /// Requests a window must hold before it can raise anything.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: u64,
    /// Consecutive quiet windows before an incident de-escalates or resolves.
    #[serde(default = "default_resolve_after")]
    #[schemars(range(min = 1, max = 100))]
    pub resolve_after_windows: u32,
    /// Where window metrics come from.
    #[serde(default)]
    pub source: MetricSource,
}

impl Default for DetectionSpec {
    fn default() -> Self {
        Self {
            window: default_detection_window(),
            baseline: BaselineMethod::default(),
            baseline_floor: default_baseline_floor(),
            thresholds: SeverityThresholds::default(),
            alpha: default_detection_alpha(),
            min_requests: default_min_requests(),
            resolve_after_windows: default_resolve_after(),
            source: MetricSource::default(),
        }
    }
}

fn default_detection_window() -> KubeDuration {
    KubeDuration::from_secs(300)
}
fn default_baseline_floor() -> f64 {
    0.001
}
fn default_detection_alpha() -> f64 {
    0.01
}
fn default_min_requests() -> u64 {
    100
}
fn default_resolve_after() -> u32 {
    3
}

/// Baseline method.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BaselineMethod {
    /// Same time last week when a week of history exists, else the recent median.
    #[default]
    Auto,
    /// Always the median of recent windows.
    RecentMedian,
    /// Always the same time of day one week earlier (Inconclusive until history exists).
    SameTimeLastWeek,
}

/// Severity multiples of the baseline.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SeverityThresholds {
    /// Warning at this multiple.
    #[serde(default = "default_warning")]
    #[schemars(range(min = 1.0))]
    pub warning: f64,
    /// High at this multiple.
    #[serde(default = "default_high")]
    #[schemars(range(min = 1.0))]
    pub high: f64,
    /// Critical at this multiple.
    #[serde(default = "default_critical")]
    #[schemars(range(min = 1.0))]
    pub critical: f64,
}

impl Default for SeverityThresholds {
    fn default() -> Self {
        Self {
            warning: default_warning(),
            high: default_high(),
            critical: default_critical(),
        }
    }
}

fn default_warning() -> f64 {
    3.0
}
fn default_high() -> f64 {
    5.0
}
fn default_critical() -> f64 {
    10.0
}

/// Where the detector reads window metrics.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MetricSource {
    /// `scrape` reads each proxy's `/metrics`; `prometheus` queries a Prometheus server.
    #[serde(default, rename = "type")]
    pub type_: MetricSourceType,
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub prometheus_url: Option<String>,
}

/// Metric source kind.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum MetricSourceType {
    /// Scrape the proxies directly.
    #[default]
    Scrape,
    /// Query PromQL over HTTP.
    Prometheus,
}

/// Where escalations go.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EscalationSpec {
    /// Slack delivery. Without it notifications go to Events and the operator log only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackSpec>,
    /// Link to the runbook shown in every escalation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runbook_url: Option<String>,
}

/// Slack delivery settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SlackSpec {
    /// Channel per severity; a missing severity falls back to the next lower one that is set.
    pub channels: SlackChannels,
    /// User group mentioned on critical incidents, e.g. `S0123ABCD` for @oncall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_mention: Option<String>,
    /// Secret key holding the bot token (`xoxb-…`).
    pub token: SecretKeyRef,
    /// Secret key holding the signing secret that verifies button clicks.
    pub signing_secret: SecretKeyRef,
}

/// Slack channel ids by severity.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SlackChannels {
    /// Channel for warnings and rollout notices.
    pub warning: String,
    /// Channel for high severity; defaults to the warning channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<String>,
    /// Channel for critical severity; defaults to the high channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<String>,
}

/// Schema-drift policy.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DriftPolicy {
    /// Fix additive and security drift at once; destructive changes still wait for approval.
    Auto,
    /// Fix nothing automatically: the schema check fails, naming the drift, until someone runs
    /// `apitree drift fix`.
    #[default]
    Prompt,
    /// Only report drift: the schema gate check fails on it, naming every drifted object.
    Report,
    /// Do not check drift (the schema check still compares the migration version).
    Off,
}

/// Observed state of an ApiGateway.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiGatewayStatus {
    /// Master-key versions the proxies taking traffic hold (set when traffic switches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub master_key_versions: Vec<u32>,
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<GatewayPhase>,
    /// Color that takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_color: Option<Color>,
    /// Revision that takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_revision: Option<String>,
    /// Revision under test behind the preview Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_revision: Option<String>,
    /// Revision kept warm on the other color after a switch, until the rollback window ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<String>,
    /// RFC 3339 time traffic last switched colors; the rollback window counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<String>,
    /// The gate of the preview revision (or of the last one gated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
    /// Last revision the gate refused or rolled back; not retried until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_revision: Option<RejectedRevision>,
    /// Number of open incidents.
    #[serde(default)]
    pub open_incidents: i32,
    /// Open incidents, most severe first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incidents: Vec<IncidentSummary>,
    /// Result of the last completed schema-drift check (`checkedAt` says when); a sweep that
    /// cannot reach the database leaves it and says so in a `HealthSweepFailed` Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftSummary>,
    /// What the last health sweep probed: each route's upstream and the serving replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbesSummary>,
    /// Conditions: `Ready`, `Progressing`, `Degraded`, `SpecValid`.
    /// Connector Agents of this gateway's pools that have called the control plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connectors: Vec<ConnectorStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Lifecycle phase of a gateway.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum GatewayPhase {
    /// One revision serves; nothing in flight.
    Stable,
    /// A new revision is being deployed.
    Progressing,
    /// The gate is checking the preview revision.
    Gating,
    /// 5/5 passed; waiting for a human to promote.
    AwaitingApproval,
    /// Traffic switched; blue kept warm inside the rollback window.
    Promoting,
    /// The newest revision was refused by the gate before any traffic reached it; the previous
    /// one serves (nothing was rolled back).
    Rejected,
    /// The newest revision took traffic and was switched back (by hand or by a critical
    /// incident inside the rollback window); the previous one serves.
    RolledBack,
    /// The spec is invalid or the gateway cannot serve as asked.
    Degraded,
}

/// Deployment color.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    /// The color that is not this one.
    pub fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }
}

/// The gate run of one revision.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// Revision the checks ran against; results never carry over to another revision.
    pub revision: String,
    /// Checks passed out of five, e.g. `3/5`.
    pub progress: String,
    /// When the gate started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Identity of the green instances the checks ran against (pod names and restarts, or the
    /// local process); when it changes mid-gate the checks start over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The five checks in order.
    #[serde(default)]
    pub checks: Vec<GateCheckStatus>,
}

/// One recorded check verdict.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GateCheckStatus {
    /// Check name: rollout, health, schema, smoke, analysis.
    pub name: String,
    /// Verdict.
    pub phase: CheckPhase,
    /// Observed value, e.g. `0.8%` or `3/3 ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
    /// Threshold it was compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
    /// Samples the verdict rests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// p-value of the significance test, where one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// Why the check is in this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339 start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 finish time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// Verdict of one gate check.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum CheckPhase {
    Pending,
    Running,
    Passed,
    Failed,
    Inconclusive,
    /// Does not apply to this gateway (e.g. schema without a database); counts as done.
    Skipped,
    /// Abandoned with its gate because the spec moved on; never counts as done.
    Cancelled,
}

/// A revision the gate refused or rolled back.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RejectedRevision {
    /// The revision hash.
    pub revision: String,
    /// Failed check or rollback trigger, in words.
    pub reason: String,
    /// RFC 3339 time of the decision.
    pub at: String,
}

/// An open incident in brief.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IncidentSummary {
    /// Incident id.
    pub id: String,
    /// Signal: errorRatio, authFailures, latency, breakerOpen, credentialChange.
    pub signal: String,
    /// Route, or empty for gateway-wide signals.
    #[serde(default)]
    pub route: String,
    /// warning, high or critical.
    pub severity: String,
    /// Score: current ratio / baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// RFC 3339 time it opened.
    pub opened_at: String,
    /// Slack user id of the on-call engineer who acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
}

/// Result of the last drift check.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DriftSummary {
    /// RFC 3339 time of the check.
    pub checked_at: String,
    /// Objects the migrations create that the database lacks.
    #[serde(default)]
    pub missing: u32,
    /// Objects in the database the migrations do not create.
    #[serde(default)]
    pub extra: u32,
    /// Objects that differ.
    #[serde(default)]
    pub changed: u32,
    /// Of those, items that weaken security (RLS off, policy or audit trigger gone).
    #[serde(default)]
    pub security: u32,
    /// Short human summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A problem with a spec that the schema cannot express.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    /// JSON path of the field, e.g. `spec.proxy.routes[1].tier`.
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl SeverityThresholds {
    /// What is wrong when the thresholds are not ordered warning < high < critical.
    pub fn order_problem(&self) -> Option<String> {
        (!(self.warning < self.high && self.high < self.critical)).then(|| {
            format!(
                "thresholds must be ordered warning < high < critical, got {} / {} / {}",
                self.warning, self.high, self.critical
            )
        })
    }
}

impl DetectionSpec {
    /// The detection rules that span fields, with paths relative to the detection spec. The
    /// one place they are checked: `ApiGatewaySpec::problems` asks here, and `apitree detect
    /// replay` asks the thresholds' own check (the CRD's CEL rules say the same to an API
    /// server).
    pub fn problems(&self) -> Vec<SpecProblem> {
        let mut out = Vec::new();
        if let Some(message) = self.thresholds.order_problem() {
            out.push(SpecProblem {
                path: "thresholds".into(),
                message,
            });
        }
        if self.source.type_ == MetricSourceType::Prometheus && self.source.prometheus_url.is_none()
        {
            out.push(SpecProblem {
                path: "source.prometheusUrl".into(),
                message: "required when source.type is prometheus".into(),
            });
        }
        out
    }
}

impl ApiGatewaySpec {
    /// Checks the rules that span fields. The same rules are CEL validations in the CRD, so a
    /// cluster refuses such a spec at admission; this catches them where no API server runs
    /// (`apitree local`) and in resources applied before the CRD was upgraded.
    pub fn problems(&self) -> Vec<SpecProblem> {
        let mut out = Vec::new();
        let mut push = |path: String, message: String| out.push(SpecProblem { path, message });
        for p in self.detection.problems() {
            push(format!("spec.detection.{}", p.path), p.message);
        }
        for (field, keep) in self.retention.kinds() {
            if keep.as_std() < std::time::Duration::from_secs(DAY) {
                push(
                    format!("spec.retention.{field}"),
                    format!("{keep} is shorter than a day: give at least 1d (the health sweep deletes what is older)"),
                );
            }
        }
        let mut route_names = BTreeMap::new();
        for (i, r) in self.proxy.routes.iter().enumerate() {
            if let Some(p) = &r.probe {
                if let Err(e) = probe_url(&r.upstream, &p.path) {
                    push(format!("spec.proxy.routes[{i}].probe.path"), e);
                }
                let t = p.timeout.as_std();
                if t.is_zero() || t > std::time::Duration::from_secs(60) {
                    push(
                        format!("spec.proxy.routes[{i}].probe.timeout"),
                        format!("{} is out of range: give 1ms to 60s", p.timeout),
                    );
                }
            }
            if let Some(first) = route_names.insert(r.name.as_str(), i) {
                push(
                    format!("spec.proxy.routes[{i}].name"),
                    format!("route name {:?} is already used by routes[{first}]", r.name),
                );
            }
            if let Some(tier) = &r.tier {
                if !self.proxy.tiers.iter().any(|t| &t.name == tier) {
                    push(
                        format!("spec.proxy.routes[{i}].tier"),
                        format!("tier {tier:?} is not defined in spec.proxy.tiers"),
                    );
                }
            }
        }
        let mut pools = BTreeMap::new();
        for (c, connector) in self.connectors.iter().enumerate() {
            if let Some(first) = pools.insert(connector.pool.as_str(), c) {
                push(
                    format!("spec.connectors[{c}].pool"),
                    format!("pool {:?} is already listed at connectors[{first}]; give each pool one entry", connector.pool),
                );
            }
            for (i, r) in connector.routes.iter().enumerate() {
                let path = format!("spec.connectors[{c}].routes[{i}]");
                if self.proxy.routes.iter().any(|p| p.name == r.name) {
                    push(
                        format!("{path}.name"),
                        format!("route name {:?} is already a cluster route (spec.proxy.routes); route names are unique across the gateway", r.name),
                    );
                }
                let earlier = self.connectors[..=c]
                    .iter()
                    .enumerate()
                    .flat_map(|(pc, p)| {
                        p.routes
                            .iter()
                            .enumerate()
                            .map(move |(pi, pr)| (pc, pi, pr))
                    });
                if let Some((pc, pi, _)) = earlier
                    .filter(|(pc, pi, _)| (*pc, *pi) < (c, i))
                    .find(|(_, _, pr)| pr.name == r.name)
                {
                    push(
                        format!("{path}.name"),
                        format!(
                            "route name {:?} is already used by connectors[{pc}].routes[{pi}]",
                            r.name
                        ),
                    );
                }
                if let Some(tier) = &r.tier {
                    if !self.proxy.tiers.iter().any(|t| &t.name == tier) {
                        push(
                            format!("{path}.tier"),
                            format!("tier {tier:?} is not defined in spec.proxy.tiers"),
                        );
                    }
                }
            }
        }
        if let Some(tier) = &self.proxy.default_tier {
            if !self.proxy.tiers.iter().any(|t| &t.name == tier) {
                push(
                    "spec.proxy.defaultTier".into(),
                    format!("tier {tier:?} is not defined in spec.proxy.tiers"),
                );
            }
        }
        let mut tier_names = BTreeMap::new();
        for (i, tier) in self.proxy.tiers.iter().enumerate() {
            if let Some(first) = tier_names.insert(tier.name.as_str(), i) {
                push(
                    format!("spec.proxy.tiers[{i}].name"),
                    format!(
                        "tier name {:?} is already used by tiers[{first}]",
                        tier.name
                    ),
                );
            }
            for (who, l) in [("perKey", &tier.per_key), ("perOrg", &tier.per_org)] {
                if !(l.burst10s <= l.per_minute && l.per_minute <= l.per_day) {
                    push(
                        format!("spec.proxy.tiers[{i}].{who}"),
                        "limits must not shrink as windows grow: burst10s <= perMinute <= perDay"
                            .into(),
                    );
                }
            }
        }
        out
    }
}
