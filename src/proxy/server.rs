//! The request path, assembled in one place, and the listeners.
//!
//! Outer to inner: request id + access log → API-key auth → route match → key scope → rate
//! limits (key and org, three windows) → upstream credential → circuit breaker → upstream call
//! with timeout → PII on the response → metrics. Route matching happens before the limits (the
//! design lists it after) so that a route's own tier applies and unknown paths cost no quota.
//!
//! Errors are classified once, where they happen, as a [`Refusal`]; [`rescue`] is the one place
//! that turns them into HTTP statuses with a JSON body naming the problem and the request id.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use rand::RngExt;
use tokio::net::TcpListener;

use super::accesslog::{AccessLog, AccessRecord};
use super::breaker::{Admission, Transition};
use super::forward::{Forwarding, X_API_KEY, X_REQUEST_ID};
use super::keys::{ApiKey, KeyFormatError, Pepper};
use super::limiter::Limiter;
use super::metrics::{ProxyMetrics, NO_ROUTE};
use super::pii::{self, PiiKind, StreamMasker};
use super::ratelimit::Decision;
use super::state::{GatewayState, KeyRecord, Route, SharedState};
use super::upstream::{self, UpstreamBody};
use crate::crd::gateway::{KeyScope, PiiMode};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Flag mode scans bodies up to this size; larger ones pass unscanned (and say so).
const FLAG_SCAN_LIMIT: usize = 8 * 1024 * 1024;
/// `logBodies` routes log at most this much of a request body.
const LOGGED_BODY_LIMIT: usize = 4 * 1024;
/// `logBodies` routes buffer request bodies up to this size.
const LOG_BODY_BUFFER_LIMIT: usize = 1024 * 1024;

/// Milliseconds since the Unix epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// Health of an optional dependency, for /readyz.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencyStatus {
    Off,
    Ok,
    Degraded,
}

impl DependencyStatus {
    fn label(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Ok => "ok",
            Self::Degraded => "degraded",
        }
    }
}

/// The data plane.
pub struct Gateway {
    pub state: SharedState,
    pub pepper: Pepper,
    pub limiter: Limiter,
    pub metrics: ProxyMetrics,
    pub access_log: AccessLog,
    pub clock: Clock,
    /// Set by the database loader in PostgreSQL mode.
    pub database: std::sync::Mutex<DependencyStatus>,
    draining: std::sync::atomic::AtomicBool,
    /// Metric handles of requests refused before routing (resolved once).
    no_route_metrics: super::metrics::RouteMetrics,
}

/// Why a request was not served as asked. Classified where it happens.
#[derive(Debug)]
pub enum Refusal {
    MissingKey,
    BadKey(KeyFormatError),
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    GraceEnded,
    NoRoute,
    ScopeForbidden(KeyScope),
    NoTier,
    NoCredential,
    RateLimited(Decision),
    BreakerOpen { retry_after_ms: u64 },
    UpstreamTimeout(Duration),
    UpstreamUnreachable,
    UpstreamBadResponse,
    BodyTooLarge,
    Internal(&'static str),
}

impl Refusal {
    /// The caller's credentials were refused (401, counted as an auth failure).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Self::MissingKey
                | Self::BadKey(_)
                | Self::UnknownKey
                | Self::RevokedKey
                | Self::ExpiredKey
                | Self::GraceEnded
        )
    }

    /// Stable machine-readable code (also the access log's error_code).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing_api_key",
            Self::BadKey(_) => "malformed_api_key",
            Self::UnknownKey => "unknown_api_key",
            Self::RevokedKey => "revoked_api_key",
            Self::ExpiredKey => "expired_api_key",
            Self::GraceEnded => "rotated_api_key",
            Self::NoRoute => "no_route",
            Self::ScopeForbidden(_) => "scope_forbidden",
            Self::NoTier => "no_rate_limit_tier",
            Self::NoCredential => "no_upstream_credential",
            Self::RateLimited(_) => "rate_limited",
            Self::BreakerOpen { .. } => "upstream_circuit_open",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamBadResponse => "upstream_bad_response",
            Self::BodyTooLarge => "body_too_large",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The one place refusals become responses.
pub fn rescue(refusal: &Refusal, request_id: &str) -> Response<Body> {
    let (status, message): (StatusCode, String) = match refusal {
        Refusal::MissingKey => (StatusCode::UNAUTHORIZED, "an API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`".into()),
        Refusal::BadKey(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
        Refusal::UnknownKey => (StatusCode::UNAUTHORIZED, "the API key is not valid".into()),
        Refusal::RevokedKey => (StatusCode::UNAUTHORIZED, "the API key was revoked; create a new one".into()),
        Refusal::ExpiredKey => (StatusCode::UNAUTHORIZED, "the API key has expired; create a new one".into()),
        Refusal::GraceEnded => (StatusCode::UNAUTHORIZED, "the API key was rotated and its grace period has ended; use the new key".into()),
        Refusal::NoRoute => (StatusCode::NOT_FOUND, "no API is served at this path".into()),
        Refusal::ScopeForbidden(KeyScope::Test) => (StatusCode::FORBIDDEN, "this API accepts live keys only; a test key cannot call it".into()),
        Refusal::ScopeForbidden(KeyScope::Live) => (StatusCode::FORBIDDEN, "this API accepts test keys only".into()),
        Refusal::NoTier => (StatusCode::INTERNAL_SERVER_ERROR, "no rate-limit tier applies to this key; the gateway operator must set one".into()),
        Refusal::NoCredential => (StatusCode::FORBIDDEN, "this API needs an upstream credential and none is set for your org; add your own (BYOK)".into()),
        Refusal::RateLimited(d) => {
            let (s, w) = d.blocked.unwrap_or((super::ratelimit::Subject::Key, super::ratelimit::Window::Burst10s));
            (StatusCode::TOO_MANY_REQUESTS, format!("rate limit exceeded: the {} {} limit; retry after {}s", s.label(), w.label(), d.retry_after_secs))
        }
        Refusal::BreakerOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "the upstream API is failing and calls to it are paused; retry later".into()),
        Refusal::UpstreamTimeout(t) => (StatusCode::GATEWAY_TIMEOUT, format!("the upstream API did not answer within {}ms", t.as_millis())),
        Refusal::UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "the upstream API could not be reached".into()),
        Refusal::UpstreamBadResponse => (StatusCode::BAD_GATEWAY, "the upstream API sent a response that is not valid HTTP/1.1".into()),
        Refusal::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large for this API".into()),
        Refusal::Internal(what) => (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {what}")),
    };
    let body =
        serde_json::json!({"error": message, "code": refusal.code(), "request_id": request_id});
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match refusal {
        r if r.is_auth() => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apitree\""),
            );
        }
        Refusal::RateLimited(d) => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs));
            insert_str(h, RATELIMIT_POLICY, &d.policy_header());
            insert_str(h, RATELIMIT, &d.ratelimit_header());
        }
        Refusal::BreakerOpen { retry_after_ms } => {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)),
            );
        }
        _ => {}
    }
    resp
}

fn insert_str(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What the access log and metrics need to know about a request (borrowed from the state the
/// request was decided with).
#[derive(Default)]
struct Trace<'s> {
    route: Option<&'s Route>,
    key: Option<&'s KeyRecord>,
    upstream_status: Option<u16>,
    request_body: Option<String>,
}

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const X_APITREE_PII: HeaderName = HeaderName::from_static("x-apitree-pii");

/// The request id as a header value for the upstream request and the response: the client's
/// when well-formed, else 32 random hex digits. Either way its text is `[A-Za-z0-9_-]`.
fn request_id(h: &HeaderMap) -> HeaderValue {
    if let Some(v) = h.get(X_REQUEST_ID) {
        if let Ok(text) = v.to_str() {
            if !text.is_empty()
                && text.len() <= 64
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return v.clone();
            }
        }
    }
    let n: u128 = rand::rng().random();
    let mut id = [0u8; 32];
    for (i, c) in id.iter_mut().enumerate() {
        *c = b"0123456789abcdef"[(n >> ((31 - i) * 4)) as usize & 0xF];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    h.get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl Gateway {
    pub fn new(
        state: SharedState,
        pepper: Pepper,
        limiter: Limiter,
        metrics: ProxyMetrics,
        access_log: AccessLog,
        clock: Clock,
    ) -> Self {
        let no_route_metrics = metrics.for_route(NO_ROUTE);
        Self {
            no_route_metrics,
            state,
            pepper,
            limiter,
            metrics,
            access_log,
            clock,
            database: std::sync::Mutex::new(DependencyStatus::Off),
            draining: Default::default(),
        }
    }

    /// Serves one request through the whole stack. `forwarded_for` is the client's address as
    /// an `X-Forwarded-For` value (made once per connection).
    pub async fn handle(
        &self,
        req: Request<Body>,
        forwarded_for: Option<HeaderValue>,
    ) -> Response<Body> {
        let started = Instant::now();
        let now_ms = (self.clock)();
        self.metrics.in_flight.inc();
        // Step 1: request id (kept from the client when well-formed) and what the log needs.
        let request_id_value = request_id(req.headers());
        let request_id = request_id_value.to_str().unwrap_or_default().to_owned();
        let method = req.method().clone();
        let bytes_in = req.body().size_hint().exact();
        let state = self.state.load();
        let mut trace = Trace::default();
        let mut error_code = None;
        let mut resp = match self
            .serve(
                req,
                forwarded_for,
                now_ms,
                &state,
                &request_id_value,
                &mut trace,
            )
            .await
        {
            Ok(resp) => resp,
            Err(refusal) => {
                error_code = Some(refusal.code());
                if refusal.is_auth() {
                    self.metrics
                        .auth_failures
                        .with_label_values(&[refusal.code()])
                        .inc();
                }
                rescue(&refusal, &request_id)
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID, request_id_value);
        let status = resp.status().as_u16();
        let route = trace
            .route
            .as_ref()
            .map(|r| r.name.as_str())
            .unwrap_or(NO_ROUTE);
        let elapsed = started.elapsed();
        match &trace.route {
            Some(r) => r
                .metrics
                .get_or_init(|| self.metrics.for_route(&r.name))
                .observe(status, elapsed),
            None => self.no_route_metrics.observe(status, elapsed),
        }
        if self.access_log.enabled() {
            self.access_log.write(&AccessRecord {
                ts_ms: now_ms,
                request_id: &request_id,
                method: method.as_str(),
                route,
                org: trace.key.as_ref().map(|k| k.org.as_str()),
                key_prefix: trace.key.as_ref().map(|k| k.prefix.as_str()),
                status,
                upstream_status: trace.upstream_status,
                latency_us: elapsed.as_micros() as u64,
                bytes_in,
                bytes_out: resp.body().size_hint().exact(),
                error_code,
                request_body: trace.request_body.take(),
            });
        }
        self.metrics.in_flight.dec();
        resp
    }

    async fn serve<'s>(
        &self,
        req: Request<Body>,
        forwarded_for: Option<HeaderValue>,
        now: u64,
        state: &'s GatewayState,
        request_id: &HeaderValue,
        trace: &mut Trace<'s>,
    ) -> Result<Response<Body>, Refusal> {
        // Step 2: API-key auth. Shape and checksum first (no lookup for typos), then the
        // HMAC under the pepper, compared in constant time.
        let text = presented_key(req.headers()).ok_or(Refusal::MissingKey)?;
        ApiKey::check(text).map_err(Refusal::BadKey)?;
        let record: &KeyRecord = state
            .key(&self.pepper.hash_text(text))
            .ok_or(Refusal::UnknownKey)?;
        trace.key = Some(record);
        let now_i = now as i64;
        if record.revoked {
            return Err(Refusal::RevokedKey);
        }
        if record.expires_at_ms.is_some_and(|t| t <= now_i) {
            return Err(Refusal::ExpiredKey);
        }
        if record.grace_until_ms.is_some_and(|t| t <= now_i) {
            return Err(Refusal::GraceEnded);
        }

        // Step 3: route match (longest prefix) and the route's key scopes.
        let route: &Route = state.route_for(req.uri().path()).ok_or(Refusal::NoRoute)?;
        trace.route = Some(route);
        if !route.allows(record.scope) {
            return Err(Refusal::ScopeForbidden(record.scope));
        }

        // Step 4: rate limits, key and org, three windows, decided and counted together.
        let limits = state.limits_for(record, route).ok_or(Refusal::NoTier)?;
        let decision = self.limiter.check_key(record, limits, now).await;
        if !decision.allowed {
            if let Some((s, w)) = decision.blocked {
                self.metrics
                    .rate_limited
                    .with_label_values(&[s.label(), w.label()])
                    .inc();
            }
            return Err(Refusal::RateLimited(decision));
        }

        // Step 5: the upstream credential for the caller's org (BYOK first, else system).
        let credential = match &route.credential {
            Some(_) => Some(
                route
                    .credential_for(&record.org)
                    .ok_or(Refusal::NoCredential)?,
            ),
            None => None,
        };

        // Step 6: circuit breaker.
        let (admission, transition) = route.breaker.admit(now);
        self.note_breaker(route, transition);
        if let Admission::Refused { retry_after_ms } = admission {
            return Err(Refusal::BreakerOpen { retry_after_ms });
        }

        // Step 7: the upstream request. The buyer's key never leaves the gateway.
        let (parts, body) = req.into_parts();
        let target = route.upstream_path(parts.uri.path(), parts.uri.query());
        let forwarding = Forwarding {
            host: &route.host,
            request_id,
            forwarded_for,
            // Compressed bodies cannot be scanned.
            identity_encoding: route.pii != PiiMode::Off,
            credential,
        };
        let body: Body = if route.log_bodies {
            let collected = collect_limited(body, LOG_BODY_BUFFER_LIMIT)
                .await
                .ok_or(Refusal::BodyTooLarge)?;
            let shown = &collected[..collected.len().min(LOGGED_BODY_LIMIT)];
            trace.request_body = Some(String::from_utf8_lossy(shown).into_owned());
            full(collected)
        } else {
            body
        };
        let upstream_req = Request::from_parts(parts, body);
        let sent = upstream::send(
            route.scheme.clone(),
            route.authority.clone(),
            target,
            upstream_req,
            Some(&forwarding),
        );
        let result = super::timer::timeout(route.timeout, sent).await;
        let resp = match result {
            Err(_) => {
                self.upstream_failed(route, "timeout");
                return Err(Refusal::UpstreamTimeout(route.timeout));
            }
            Ok(Err(upstream::UpstreamError::Protocol(e))) => {
                tracing::warn!(route = %route.name, "upstream response refused: {e}");
                self.upstream_failed(route, "bad_response");
                return Err(Refusal::UpstreamBadResponse);
            }
            Ok(Err(_)) => {
                self.upstream_failed(route, "connect");
                return Err(Refusal::UpstreamUnreachable);
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status.is_server_error() {
            self.upstream_failed(route, "status_5xx");
        } else {
            self.note_breaker(route, route.breaker.record(true, (self.clock)()));
        }
        trace.upstream_status = Some(status.as_u16());

        // Step 8: the response, with PII handling where the route asks for it.
        let (mut parts, body) = resp.into_parts();
        // Sent on every response: the String becomes the value without a copy.
        if let Ok(v) = HeaderValue::try_from(decision.ratelimit_header()) {
            parts.headers.insert(RATELIMIT, v);
        }
        let counters = || {
            PiiKind::ALL.map(|k| {
                self.metrics
                    .pii_findings
                    .with_label_values(&[route.name.as_str(), k.label()])
            })
        };
        let body: Body = match route.pii {
            PiiMode::Off => body.map_err(|e| Box::new(e) as BoxError).boxed(),
            PiiMode::Mask => MaskingBody::new(body, counters()).boxed(),
            PiiMode::Flag => {
                let (head, rest, complete) = collect_up_to(body, FLAG_SCAN_LIMIT).await;
                if complete {
                    let all: Vec<u8> = head.iter().flat_map(|b| b.iter().copied()).collect();
                    let mut counts = pii::Counts::default();
                    counts.add(&pii::scan(&all));
                    for (i, c) in counters().iter().enumerate() {
                        c.inc_by(counts.0[i]);
                    }
                    let summary = if counts.total() == 0 {
                        "none".to_string()
                    } else {
                        counts.summary()
                    };
                    insert_str(&mut parts.headers, X_APITREE_PII, &summary);
                } else {
                    insert_str(&mut parts.headers, X_APITREE_PII, "unscanned");
                }
                PrefixedBody { head, rest }.boxed()
            }
        };
        Ok(Response::from_parts(parts, body))
    }

    fn upstream_failed(&self, route: &Route, kind: &'static str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[route.name.as_str(), kind])
            .inc();
        self.note_breaker(route, route.breaker.record(false, (self.clock)()));
    }

    fn note_breaker(&self, route: &Route, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        self.metrics
            .breaker_state
            .with_label_values(&[route.name.as_str()])
            .set(route.breaker.state() as i64);
        match t {
            Transition::Opened => {
                self.metrics
                    .breaker_opens
                    .with_label_values(&[route.name.as_str()])
                    .inc();
                tracing::warn!(route = %route.name, "circuit breaker opened: upstream calls are paused");
            }
            Transition::HalfOpened => {
                tracing::info!(route = %route.name, "circuit breaker half-open: probing the upstream")
            }
            Transition::Closed => {
                tracing::info!(route = %route.name, "circuit breaker closed: upstream recovered")
            }
        }
    }

    /// Starts refusing readiness so load balancers drain this instance.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The admin endpoints: /metrics, /healthz, /readyz.
    pub fn admin(&self, req: &Request<Incoming>) -> Response<Body> {
        let json = |status: StatusCode, v: serde_json::Value| {
            let mut r = Response::new(full(v.to_string()));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(full(self.metrics.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let state = self.state.current();
                let database = *self.database.lock().unwrap_or_else(|p| p.into_inner());
                let limiter = self.limiter.backend_status();
                let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
                let status = if draining {
                    "draining"
                } else if limiter == "degraded" || database == DependencyStatus::Degraded {
                    "degraded"
                } else {
                    "ready"
                };
                let code = if draining {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                json(
                    code,
                    serde_json::json!({
                        "status": status,
                        "config": {"source": state.source, "routes": state.routes.len(), "keys": state.keys.len()},
                        "rateLimitStore": limiter,
                        "database": database.label(),
                    }),
                )
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found; try /metrics, /healthz or /readyz", "code": "no_route"}),
            ),
        }
    }
}

/// The whole body, or None when it fails or runs past `limit` bytes. (Not `Limited`: over a
/// boxed body its error bound makes the request future impossible to prove `Send`.)
async fn collect_limited(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut all = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if all.len() + data.len() > limit {
                return None;
            }
            all.extend_from_slice(&data);
        }
    }
    Some(all.freeze())
}

/// Reads frames until `limit` bytes; returns them, the rest of the body, and whether the body
/// ended within the limit.
async fn collect_up_to(
    mut body: UpstreamBody,
    limit: usize,
) -> (VecDeque<Bytes>, Option<UpstreamBody>, bool) {
    let mut head = VecDeque::new();
    let mut size = 0;
    loop {
        match body.frame().await {
            None => return (head, None, true),
            Some(Err(_)) => return (head, None, false),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    head.push_back(data);
                    if size > limit {
                        return (head, Some(body), false);
                    }
                }
            }
        }
    }
}

/// Already-read chunks followed by the rest of a body.
struct PrefixedBody {
    head: VecDeque<Bytes>,
    rest: Option<UpstreamBody>,
}

impl HttpBody for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match self.rest.as_mut() {
            None => Poll::Ready(None),
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }
}

/// Masks PII while streaming, with bounded memory; same length in and out.
struct MaskingBody {
    inner: UpstreamBody,
    masker: StreamMasker,
    done: bool,
    counters: [IntCounter; 3],
}

impl MaskingBody {
    fn new(inner: UpstreamBody, counters: [IntCounter; 3]) -> Self {
        Self {
            inner,
            masker: StreamMasker::new(),
            done: false,
            counters,
        }
    }
}

impl HttpBody for MaskingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let out = self.masker.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let out = self.masker.finish();
                    let counts = self.masker.counts;
                    for (i, c) in self.counters.iter().enumerate() {
                        c.inc_by(counts.0[i]);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Worker threads for the public listener: `APITREE_WORKERS`, else one per CPU.
pub fn default_workers() -> usize {
    std::env::var("APITREE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// How long the public listener waits on its clients, and on in-flight requests at shutdown.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A request head must be whole this long after the connection's start (the first head)
    /// or after its first byte (later heads).
    pub header_read: Duration,
    /// A kept-alive connection idle this long between requests is closed.
    pub keep_alive: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Timeouts {
    /// The config's `headerReadTimeout`, `keepAliveTimeout` and `shutdownGrace`.
    pub fn of(cfg: &super::config::ProxyConfig) -> Self {
        Self {
            header_read: cfg.header_read_timeout.as_std(),
            keep_alive: cfg.keep_alive_timeout.as_std(),
            shutdown_grace: cfg.shutdown_grace.as_std(),
        }
    }
}

/// Runs the public and admin listeners until `shutdown` resolves, then drains in-flight
/// requests for up to `timeouts.shutdown_grace`.
pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
) {
    run_with_workers(
        gateway,
        listener,
        admin,
        shutdown,
        timeouts,
        default_workers(),
    )
    .await
}

type Accepted = (std::net::TcpStream, SocketAddr);

/// Like [`run`] with an explicit number of workers. Each worker is a thread with its own
/// single-threaded runtime and upstream connection pool (like nginx's worker processes): a
/// connection, its requests and their upstream calls stay on one thread. This task accepts
/// and hands connections out round-robin, and serves the admin port itself.
pub async fn run_with_workers(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
    workers: usize,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut senders = Vec::with_capacity(workers);
    let mut finished = Vec::with_capacity(workers);
    for i in 0..workers.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let gw = gateway.clone();
        let stop = stop_rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(gw, rx, stop, timeouts)),
                    Err(e) => tracing::error!("cannot start proxy worker {i}: {e}"),
                }
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start proxy worker thread {i}: {e}");
            continue;
        }
        senders.push(tx);
        finished.push(done_rx);
    }

    let admin_graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let http = http1_builder(timeouts.header_read);
    tokio::pin!(shutdown);
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let Ok(std_stream) = stream.into_std() else { continue };
                if senders.is_empty() {
                    continue;
                }
                let _ = senders[next % senders.len()].send((std_stream, peer));
                next = next.wrapping_add(1);
            }
            accepted = admin.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gateway.clone();
                let service = hyper::service::service_fn(move |req| {
                    let gw = gw.clone();
                    async move { Ok::<_, Infallible>(gw.admin(&req)) }
                });
                let conn = admin_graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move { let _ = conn.await; });
            }
        }
    }
    drop(listener);
    gateway.start_draining();
    tracing::info!(
        grace_secs = timeouts.shutdown_grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    drop(senders);
    for done in finished {
        let _ = done.await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), admin_graceful.shutdown()).await;
}

pub(super) fn http1_builder(header_read: Duration) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true)
        .writev(false)
        // The worker's own deadline table on worker threads; tokio's timer elsewhere.
        .timer(super::timer::WorkerTimer)
        .header_read_timeout(header_read);
    http
}

/// One worker: serves the connections it is handed until told to stop, then drains.
async fn worker(
    gateway: Arc<Gateway>,
    mut conns: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    timeouts: Timeouts,
) {
    let drain = super::drain::Drain::new();
    tokio::spawn(super::timer::install());
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            next = conns.recv() => {
                let Some((std_stream, peer)) = next else { break };
                let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else { continue };
                let forwarded_for = HeaderValue::from_str(&peer.ip().to_string()).ok();
                let conn = super::front::serve(stream, gateway.clone(), forwarded_for, drain.clone(), timeouts);
                tokio::spawn(drain.watch(conn));
            }
        }
    }
    if tokio::time::timeout(timeouts.shutdown_grace, drain.drain())
        .await
        .is_err()
    {
        tracing::warn!("drain period ended with requests still in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123_X"));
        assert_eq!(request_id(&h).to_str().unwrap(), "abc-123_X");
        for bad in ["", "has space", "quote\"d"] {
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32, "{bad:?} replaced");
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert_ne!(a, b, "made ids differ");
    }
}
