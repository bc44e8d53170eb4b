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
use super::breaker::{Permit, Transition};
use super::forward::{Forwarding, X_API_KEY, X_REQUEST_ID};
use super::inbound::{self, HostError, TargetError};
use super::limiter::Limiter;
use super::metrics::{ProxyMetrics, NO_ROUTE};
use super::pii::{self, PiiKind, StreamMasker};
use super::ratelimit::Decision;
use super::request_body::{BodyFault, BodyWatch, WatchedBody};
use super::state::{GatewayState, KeyRecord, NoCredential, Route, SharedState};
use super::upstream::{self, UpstreamBody};
use crate::crd::gateway::{KeyScope, PiiMode};
use crate::entities::keys::{ApiKey, KeyFormatError, Pepper};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Flag mode scans bodies up to this size; larger ones pass unscanned (and say so).
const FLAG_SCAN_LIMIT: usize = 8 * 1024 * 1024;
/// `logBodies` routes log at most this much of a request body.
const LOGGED_BODY_LIMIT: usize = 4 * 1024;
/// `logBodies` routes buffer request bodies up to this size.
const LOG_BODY_BUFFER_LIMIT: usize = 1024 * 1024;
/// While a route's breaker is not closed, request bodies are read whole before a call is let
/// through, up to this size; larger ones wait (503) until the breaker has closed.
const PROBE_BODY_LIMIT: usize = 1024 * 1024;

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
    /// The public listener's certificate, when it speaks TLS (for /readyz and SIGHUP).
    pub tls: std::sync::Mutex<Option<Arc<super::tls::Certificates>>>,
    /// Usage metering, in database mode.
    pub usage: Option<Arc<super::usage::UsageMeter>>,
    draining: std::sync::atomic::AtomicBool,
    /// Metric handles of requests refused before routing (resolved once).
    no_route_metrics: super::metrics::RouteMetrics,
    /// How long a client's request body may pause between two pieces (`bodyReadTimeout`).
    body_read_timeout: Duration,
}

/// Why a request was not served as asked. Classified where it happens.
#[derive(Debug)]
pub enum Refusal {
    MissingKey,
    /// Different keys (in two fields, or a bearer token and an `X-API-Key`): which one counts
    /// would depend on who reads the request.
    SeveralKeys,
    BadKey(KeyFormatError),
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    GraceEnded,
    NoRoute,
    ScopeForbidden(KeyScope),
    NoTier,
    NoCredential,
    CredentialUnavailable {
        byok: bool,
    },
    RateLimited(Decision),
    BreakerOpen {
        retry_after_ms: u64,
    },
    UpstreamTimeout(Duration),
    UpstreamUnreachable,
    UpstreamBadResponse,
    BodyTooLarge,
    /// A method the gateway or the route does not forward; the value is the `Allow` field.
    MethodNotAllowed(HeaderValue),
    BadTarget(TargetError),
    BadHost(HostError),
    /// The client's request body failed: never the upstream's failure.
    ClientBody(BodyFault),
    Internal(&'static str),
}

impl Refusal {
    /// The caller's credentials were refused (401, counted as an auth failure).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Self::MissingKey
                | Self::SeveralKeys
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
            Self::SeveralKeys => "several_api_keys",
            Self::BadKey(_) => "malformed_api_key",
            Self::UnknownKey => "unknown_api_key",
            Self::RevokedKey => "revoked_api_key",
            Self::ExpiredKey => "expired_api_key",
            Self::GraceEnded => "rotated_api_key",
            Self::NoRoute => "no_route",
            Self::ScopeForbidden(_) => "scope_forbidden",
            Self::NoTier => "no_rate_limit_tier",
            Self::NoCredential => "no_upstream_credential",
            Self::CredentialUnavailable { .. } => "upstream_credential_unavailable",
            Self::RateLimited(_) => "rate_limited",
            Self::BreakerOpen { .. } => "upstream_circuit_open",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamBadResponse => "upstream_bad_response",
            Self::BodyTooLarge => "body_too_large",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BadTarget(_) => "invalid_request_target",
            Self::BadHost(_) => "invalid_host",
            Self::ClientBody(BodyFault::Malformed) => "malformed_request_body",
            Self::ClientBody(BodyFault::TimedOut) => "request_body_timeout",
            Self::ClientBody(BodyFault::Closed) => "client_closed_request",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The one place refusals become responses.
pub fn rescue(refusal: &Refusal, request_id: &str) -> Response<Body> {
    let (status, message): (StatusCode, String) = match refusal {
        Refusal::MissingKey => (StatusCode::UNAUTHORIZED, "an API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`".into()),
        Refusal::SeveralKeys => (StatusCode::UNAUTHORIZED, "send one API key: this request carries different ones (in Authorization and X-API-Key, or one of them twice)".into()),
        Refusal::BadKey(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
        Refusal::UnknownKey => (StatusCode::UNAUTHORIZED, "the API key is not valid".into()),
        Refusal::RevokedKey => (StatusCode::UNAUTHORIZED, "the API key was revoked; create a new one".into()),
        Refusal::ExpiredKey => (StatusCode::UNAUTHORIZED, "the API key has expired; create a new one".into()),
        Refusal::GraceEnded => (StatusCode::UNAUTHORIZED, "the API key was rotated and its grace period has ended; use the new key".into()),
        Refusal::NoRoute => (StatusCode::NOT_FOUND, "no API is served at this path".into()),
        Refusal::ScopeForbidden(KeyScope::Test) => (StatusCode::FORBIDDEN, "this API accepts live keys only; a test key cannot call it".into()),
        Refusal::ScopeForbidden(KeyScope::Live) => (StatusCode::FORBIDDEN, "this API accepts test keys only".into()),
        Refusal::NoTier => (StatusCode::INTERNAL_SERVER_ERROR, "no rate-limit tier applies to this key; the gateway operator must set one".into()),
        Refusal::CredentialUnavailable { byok: true } => (StatusCode::SERVICE_UNAVAILABLE, "your org's own upstream credential (BYOK) for this API cannot be used: it could not be read, or the API's upstream moved to another server since it was written; write it again in the console, which shows where it will be sent".into()),
        Refusal::CredentialUnavailable { byok: false } => (StatusCode::SERVICE_UNAVAILABLE, "this API's upstream credential cannot be loaded; its seller must write it again (the gateway's log says why)".into()),
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
        Refusal::MethodNotAllowed(allow) => (StatusCode::METHOD_NOT_ALLOWED, format!("this method is not forwarded here; use one of: {}", allow.to_str().unwrap_or_default())),
        Refusal::BadTarget(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Refusal::BadHost(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Refusal::ClientBody(BodyFault::Malformed) => (StatusCode::BAD_REQUEST, "the request body is not validly framed (chunked encoding)".into()),
        Refusal::ClientBody(BodyFault::TimedOut) => (StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving; send it without long pauses".into()),
        Refusal::ClientBody(BodyFault::Closed) => (CLIENT_CLOSED_REQUEST, "the client closed the connection before the request body ended".into()),
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
        Refusal::MethodNotAllowed(allow) => {
            h.insert(header::ALLOW, allow.clone());
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

/// nginx's code for a request whose client went away before it was answered (logged only).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// The methods a route without a `methods` list forwards, as its `Allow` field.
pub const ALLOW_DEFAULT: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");

/// What the access log and metrics need to know about a request (borrowed from the state the
/// request was decided with), and the breaker permit of its upstream call.
#[derive(Default)]
struct Trace<'s> {
    route: Option<&'s Route>,
    key: Option<&'s KeyRecord>,
    upstream_status: Option<u16>,
    request_body: Option<String>,
    permit: Option<Permit<'s>>,
    /// Past authentication, scopes, rate limits, credentials and the breaker, on its way
    /// upstream: a call that counts as usage.
    admitted: bool,
}

/// One request's bookkeeping in one guard: the in-flight gauge, the breaker permit (in
/// `trace`) and the access-log record. However the request ends — answered, or its future
/// dropped because the client went away — the gauge comes down, a probe permit without an
/// outcome is given back, and the request is counted and logged once (a dropped one as 499).
struct Exchange<'s> {
    gateway: &'s Gateway,
    started: Instant,
    now_ms: u64,
    request_id: String,
    method: Method,
    bytes_in: Option<u64>,
    trace: Trace<'s>,
    answered: bool,
}

impl<'s> Exchange<'s> {
    fn new(gateway: &'s Gateway, req: &Request<Body>, request_id: String) -> Self {
        gateway.metrics.in_flight.inc();
        Self {
            gateway,
            started: Instant::now(),
            now_ms: (gateway.clock)(),
            request_id,
            method: req.method().clone(),
            bytes_in: req.body().size_hint().exact(),
            trace: Trace::default(),
            answered: false,
        }
    }

    /// Counts and logs the answer.
    fn answer(&mut self, status: u16, error_code: Option<&'static str>, bytes_out: Option<u64>) {
        self.answered = true;
        let gw = self.gateway;
        let elapsed = self.started.elapsed();
        match &self.trace.route {
            Some(r) => r
                .metrics
                .get_or_init(|| gw.metrics.for_route(&r.name))
                .observe(status, elapsed),
            None => gw.no_route_metrics.observe(status, elapsed),
        }
        if let (Some(usage), Some(key), Some(route), true) = (
            &gw.usage,
            self.trace.key,
            self.trace.route,
            self.trace.admitted,
        ) {
            usage.record(
                &key.id,
                &route.name,
                self.now_ms,
                status >= 500,
                bytes_out.unwrap_or(0),
            );
        }
        if gw.access_log.enabled() {
            gw.access_log.write(&AccessRecord {
                ts_ms: self.now_ms,
                request_id: &self.request_id,
                method: self.method.as_str(),
                route: self.trace.route.map_or(NO_ROUTE, |r| r.name.as_str()),
                org: self.trace.key.map(|k| k.org.as_str()),
                key_prefix: self.trace.key.map(|k| k.prefix.as_str()),
                status,
                upstream_status: self.trace.upstream_status,
                latency_us: elapsed.as_micros() as u64,
                bytes_in: self.bytes_in,
                bytes_out,
                error_code,
                request_body: self.trace.request_body.take(),
            });
        }
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.answer(499, Some("client_closed_request"), None);
        }
        self.gateway.metrics.in_flight.dec();
    }
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

/// Marks a request that reached the gateway over TLS (a request extension the TLS listener
/// sets): the upstream is told `X-Forwarded-Proto: https`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// An HTTP/2 request's head as the HTTP/1.1 request it becomes upstream: its version (hyper's
/// HTTP/1 client treats any other version as 1.0 and would send a body of unknown length as
/// none), and its `cookie` fields joined with "; " into one (RFC 9113 §8.2.3; HTTP/1.1 servers
/// read one `Cookie` line).
fn from_http2(parts: &mut http::request::Parts) {
    parts.version = http::Version::HTTP_11;
    if let header::Entry::Occupied(mut cookies) = parts.headers.entry(header::COOKIE) {
        if cookies.iter().nth(1).is_some() {
            let mut joined = Vec::new();
            for v in cookies.iter() {
                if !joined.is_empty() {
                    joined.extend_from_slice(b"; ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                cookies.insert(v);
            }
        }
    }
}

/// The one API key the request presents; Err when it presents different keys (in two fields,
/// or a bearer token and an `X-API-Key`). The same key twice is not ambiguous. One pass over
/// the fields: cheaper than a hashed lookup per name on the few fields a request carries.
fn presented_key(h: &HeaderMap) -> Result<Option<&str>, Refusal> {
    let mut first: Option<&str> = None;
    for (name, value) in h {
        let key = if name == header::AUTHORIZATION {
            bearer_token(value)
        } else if name == X_API_KEY {
            value.to_str().ok().map(str::trim)
        } else {
            continue;
        };
        match (first, key) {
            (_, None) => {}
            (None, key) => first = key,
            (Some(seen), Some(key)) if seen != key => return Err(Refusal::SeveralKeys),
            (Some(_), Some(_)) => {}
        }
    }
    Ok(first)
}

/// The token of an `Authorization: Bearer …` value (scheme in any case), trimmed.
fn bearer_token(v: &HeaderValue) -> Option<&str> {
    let v = v.to_str().ok()?.trim();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ")).then(|| v[7..].trim())
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
            tls: Default::default(),
            usage: None,
            draining: Default::default(),
            body_read_timeout: super::config::DEFAULT_BODY_READ_TIMEOUT,
        }
    }

    /// The gateway metering usage (database mode).
    pub fn with_usage(mut self, meter: Arc<super::usage::UsageMeter>) -> Self {
        self.usage = Some(meter);
        self
    }

    /// The gateway with its `bodyReadTimeout`.
    pub fn with_body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Serves one request through the whole stack. `forwarded_for` is the client's address as
    /// an `X-Forwarded-For` value (made once per connection).
    pub async fn handle(
        &self,
        req: Request<Body>,
        forwarded_for: Option<HeaderValue>,
    ) -> Response<Body> {
        // Step 1: request id (kept from the client when well-formed) and the request's guard.
        let request_id_value = request_id(req.headers());
        let request_id = request_id_value.to_str().unwrap_or_default().to_owned();
        let state = self.state.load();
        let mut exchange = Exchange::new(self, &req, request_id);
        let now_ms = exchange.now_ms;
        let mut error_code = None;
        let mut resp = match self
            .serve(
                req,
                forwarded_for,
                now_ms,
                &state,
                &request_id_value,
                &mut exchange.trace,
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
                rescue(&refusal, &exchange.request_id)
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID, request_id_value);
        let bytes_out = resp.body().size_hint().exact();
        exchange.answer(resp.status().as_u16(), error_code, bytes_out);
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
        // Step 1b: the request's shape: a method some route forwards, one valid Host, a target
        // with one meaning (normalised; see `inbound`). No key is looked up for these.
        if inbound::is_forbidden_method(req.method()) {
            return Err(Refusal::MethodNotAllowed(ALLOW_DEFAULT));
        }
        inbound::check_host(req.version(), req.headers()).map_err(Refusal::BadHost)?;
        let target = inbound::normalize(req.uri().path()).map_err(Refusal::BadTarget)?;

        // Step 2: API-key auth. Shape and checksum first (no lookup for typos), then the
        // HMAC under the pepper, compared in constant time.
        let text = presented_key(req.headers())?.ok_or(Refusal::MissingKey)?;
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

        // Step 3: route match (longest prefix, on the normalised path), the route's methods and
        // key scopes, and the upstream target under the route's base path.
        let route: &Route = state.route_for(&target.path).ok_or(Refusal::NoRoute)?;
        trace.route = Some(route);
        if target.encoded_slash && !route.allow_encoded_slashes {
            return Err(Refusal::BadTarget(TargetError::EncodedSlash));
        }
        if let Some(allow) = route.refuses(req.method()) {
            return Err(Refusal::MethodNotAllowed(allow.clone()));
        }
        let upstream_target = route.upstream_path(&target.path, req.uri().query());
        drop(target);
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
        let credential = route.credential_for(&record.org).map_err(|e| match e {
            NoCredential::Required => Refusal::NoCredential,
            NoCredential::YoursUnavailable => Refusal::CredentialUnavailable { byok: true },
            NoCredential::SystemUnavailable => Refusal::CredentialUnavailable { byok: false },
        })?;

        // The client's body is watched from here on, so its failures are the client's.
        let (mut parts, body) = req.into_parts();
        if parts.version == http::Version::HTTP_2 {
            from_http2(&mut parts);
        }
        let over_tls = parts.extensions.get::<OverTls>().is_some();
        let (mut body, watch): (Body, Option<Arc<BodyWatch>>) = if body.is_end_stream() {
            (body, None)
        } else {
            let (watched, watch) = WatchedBody::new(body, self.body_read_timeout);
            (watched.boxed(), Some(watch))
        };
        let client_fault = || watch.as_ref().and_then(|w| w.fault());

        // Step 6: circuit breaker; the permit lives in the request's guard. A breaker that is
        // not closed hands out its few probes only to requests already in hand: a body is read
        // first (up to PROBE_BODY_LIMIT), so a client that sends it slowly cannot hold the
        // probe, and the breaker open, for everyone.
        if !route.breaker.is_closed() && !body.is_end_stream() {
            let Some(whole) = collect_limited(body, PROBE_BODY_LIMIT).await else {
                return Err(match client_fault() {
                    Some(fault) => Refusal::ClientBody(fault),
                    None => Refusal::BreakerOpen {
                        retry_after_ms: 1_000,
                    },
                });
            };
            body = full(whole);
        }
        let (entered, transition) = route.breaker.enter(now);
        self.note_breaker(route, transition);
        trace.permit =
            Some(entered.map_err(|retry_after_ms| Refusal::BreakerOpen { retry_after_ms })?);
        // From here the call goes upstream: it is usage (its failures too), refusals before
        // it are not.
        trace.admitted = true;

        // Step 7: the upstream request. The buyer's key never leaves the gateway.
        let forwarding = Forwarding {
            host: &route.host,
            request_id,
            forwarded_for,
            proto: if over_tls {
                &super::forward::PROTO_HTTPS
            } else {
                &super::forward::PROTO_HTTP
            },
            // Compressed bodies cannot be scanned.
            identity_encoding: route.pii != PiiMode::Off,
            credential,
        };
        let body: Body = if route.log_bodies {
            let Some(collected) = collect_limited(body, LOG_BODY_BUFFER_LIMIT).await else {
                return Err(client_fault().map_or(Refusal::BodyTooLarge, Refusal::ClientBody));
            };
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
            upstream_target,
            upstream_req,
            Some(&forwarding),
            route.egress.as_ref(),
        );
        let result = super::timer::timeout(route.timeout, sent).await;
        // Whatever the upstream did, a failed client body makes this the client's request to
        // answer for: the permit goes back unreported.
        if let Some(fault) = client_fault() {
            return Err(Refusal::ClientBody(fault));
        }
        let resp = match result {
            Err(_) if watch.as_ref().is_some_and(|w| w.waiting_on_client()) => {
                // The upstream could not answer a request the client is still sending.
                return Err(Refusal::ClientBody(BodyFault::TimedOut));
            }
            Err(_) => {
                self.upstream_failed(route, trace, "timeout");
                return Err(Refusal::UpstreamTimeout(route.timeout));
            }
            Ok(Err(upstream::UpstreamError::Protocol(e))) => {
                tracing::warn!(route = %route.name, "upstream response refused: {e}");
                self.upstream_failed(route, trace, "bad_response");
                return Err(Refusal::UpstreamBadResponse);
            }
            Ok(Err(_)) => {
                self.upstream_failed(route, trace, "connect");
                return Err(Refusal::UpstreamUnreachable);
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status.is_server_error() {
            self.upstream_failed(route, trace, "status_5xx");
        } else if let Some(permit) = trace.permit.take() {
            self.note_breaker(route, permit.record(true, (self.clock)()));
        }
        trace.upstream_status = Some(status.as_u16());

        // Step 8: the response, with PII handling where the route asks for it.
        let (mut parts, body) = resp.into_parts();
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            // Bodiless by status: a length would describe nothing that is sent.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
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
                let prefixed = collect_up_to(body, FLAG_SCAN_LIMIT).await;
                if prefixed.complete() {
                    let all: Vec<u8> = prefixed
                        .head
                        .iter()
                        .flat_map(|b| b.iter().copied())
                        .collect();
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
                prefixed.boxed()
            }
        };
        Ok(Response::from_parts(parts, body))
    }

    fn upstream_failed(&self, route: &Route, trace: &mut Trace<'_>, kind: &'static str) {
        self.metrics
            .upstream_errors
            .with_label_values(&[route.name.as_str(), kind])
            .inc();
        if let Some(permit) = trace.permit.take() {
            self.note_breaker(route, permit.record(false, (self.clock)()));
        }
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
                let skipped = self.state.current().skipped;
                for (kind, n) in skipped.by_kind() {
                    self.metrics
                        .database_rows_skipped
                        .with_label_values(&[kind])
                        .set(n as i64);
                }
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
                let tls = self
                    .tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|c| c.status());
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
                        "config": {"source": state.source, "routes": state.routes.len(), "keys": state.keys.len(), "skipped": state.skipped},
                        "rateLimitStore": limiter,
                        "database": database.label(),
                        "tls": tls,
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

/// What a caller makes of a proxy's `/readyz` answer (`code` and its JSON `doc`): ready, or
/// what it says instead, e.g. `degraded (database ok, rate-limit store degraded)`.
pub fn readyz_verdict(code: u16, doc: &serde_json::Value) -> Result<(), String> {
    let status = doc["status"].as_str().unwrap_or("unknown");
    if (200..300).contains(&code) && status == "ready" {
        Ok(())
    } else {
        Err(format!(
            "{status} (database {}, rate-limit store {})",
            doc["database"].as_str().unwrap_or("?"),
            doc["rateLimitStore"].as_str().unwrap_or("?")
        ))
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

/// Reads frames until `limit` bytes: what was read, and how the body goes on.
async fn collect_up_to(mut body: UpstreamBody, limit: usize) -> PrefixedBody {
    let mut head = VecDeque::new();
    let mut size = 0;
    loop {
        let rest = match body.frame().await {
            None => Rest::Ended,
            Some(Err(e)) => Rest::Failed(Some(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    head.push_back(data);
                }
                if size <= limit {
                    continue;
                }
                Rest::Body(body)
            }
        };
        return PrefixedBody { head, rest };
    }
}

/// Already-read chunks followed by the rest of a body: more of it, its end, or its failure,
/// which reaches the client as a failure (a cut-off body must never look whole).
struct PrefixedBody {
    head: VecDeque<Bytes>,
    rest: Rest,
}

enum Rest {
    Body(UpstreamBody),
    Ended,
    /// Taken when it is passed on.
    Failed(Option<upstream::UpstreamError>),
}

impl PrefixedBody {
    /// The whole body was read without failing.
    fn complete(&self) -> bool {
        matches!(self.rest, Rest::Ended)
    }
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
        match &mut self.rest {
            Rest::Ended => Poll::Ready(None),
            Rest::Failed(e) => match e.take() {
                Some(e) => Poll::Ready(Some(Err(Box::new(e)))),
                None => Poll::Ready(None),
            },
            Rest::Body(rest) => Pin::new(rest)
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

/// How the public listener treats its clients: how long it waits on them (and on in-flight
/// requests at shutdown), which HTTP/1.1 loop serves them, how many accepted connections may
/// wait for a worker.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// A request head must be whole this long after the connection's start (the first head)
    /// or after its first byte (later heads).
    pub header_read: Duration,
    /// A kept-alive connection idle this long between requests is closed.
    pub keep_alive: Duration,
    /// A response the client takes nothing of for this long closes its connection.
    pub send: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Plain requests on the gateway's own loop (`front`); false: hyper's server only.
    pub client_fast_path: bool,
    /// Accepted connections that may wait for each worker; more are shed with a 503.
    pub accept_queue: usize,
    /// Whether workers are bound to CPUs of their own (`workerCpuAffinity`).
    pub cpu_affinity: super::config::CpuAffinity,
    /// TLS on the public listener (`tls:`); None: plain HTTP.
    pub tls: Option<Arc<super::tls::ServerTls>>,
    /// TLS on the admin port (`adminTls`): HTTP/1.1 with the listener's certificate.
    pub admin_tls: bool,
}

impl ServerSettings {
    /// The config's `headerReadTimeout`, `keepAliveTimeout`, `sendTimeout`, `shutdownGrace`,
    /// `clientFastPath` and `acceptQueue`.
    pub fn of(cfg: &super::config::ProxyConfig) -> Self {
        Self {
            header_read: cfg.header_read_timeout.as_std(),
            keep_alive: cfg.keep_alive_timeout.as_std(),
            send: cfg.send_timeout.as_std(),
            shutdown_grace: cfg.shutdown_grace.as_std(),
            client_fast_path: cfg.client_fast_path,
            accept_queue: cfg.accept_queue.max(1),
            cpu_affinity: cfg.worker_cpu_affinity,
            tls: None,
            admin_tls: cfg.admin_tls,
        }
    }
}

/// Hands accepted connections to the workers, round-robin, through bounded queues. When every
/// worker's queue is full the connection is shed: answered 503 with `Retry-After` and closed,
/// and counted, instead of queued without limit (linkerd2-proxy's load shedding).
pub struct Dispatch {
    queues: Vec<tokio::sync::mpsc::Sender<Accepted>>,
    next: usize,
    shed: IntCounter,
    /// Plain HTTP: a shed connection is told 503 (over TLS it is only closed: a plaintext
    /// answer would reach the client as a broken handshake).
    answer_shed: bool,
}

/// What a shed connection is told. Written without reading the request: nothing was read.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 94\r\n\r\n{\"error\":\"the gateway is overloaded; retry in a second\",\"code\":\"overloaded\",\"request_id\":null}";

impl Dispatch {
    pub fn new(queues: Vec<tokio::sync::mpsc::Sender<Accepted>>, shed: IntCounter) -> Self {
        Self {
            queues,
            next: 0,
            shed,
            answer_shed: true,
        }
    }

    /// Sheds by closing only (the listener speaks TLS).
    pub fn closing_only(mut self) -> Self {
        self.answer_shed = false;
        self
    }

    /// Queues the connection for the next worker with room; sheds it when none has any.
    pub fn hand_out(&mut self, mut conn: Accepted) {
        let n = self.queues.len();
        for i in 0..n {
            let queue = &self.queues[(self.next + i) % n];
            match queue.try_send(conn) {
                Ok(()) => {
                    self.next = (self.next + i + 1) % n;
                    return;
                }
                Err(e) => conn = e.into_inner(),
            }
        }
        self.shed.inc();
        if self.answer_shed {
            // Best effort on a non-blocking socket: a full send buffer only loses the courtesy.
            let _ = std::io::Write::write(&mut conn.0, SHED_RESPONSE);
        }
        let _ = conn.0.shutdown(std::net::Shutdown::Write);
    }
}

/// Runs the public and admin listeners until `shutdown` resolves, then drains in-flight
/// requests for up to `settings.shutdown_grace`.
/// What every accept loop does when `accept` fails: the process is out of file descriptors
/// (or memory, or the kernel's connection table is full), and the listener stays readable, so
/// trying again at once would spin a core and starve everything else. It waits a little,
/// and says so — once per [`ACCEPT_FAILED_LOG_EVERY`].
pub async fn accept_failed(e: &std::io::Error) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= ACCEPT_FAILED_LOG_EVERY) {
            tracing::error!("cannot accept connections: {e}; waiting {ACCEPT_PAUSE:?} between tries (raise the open-files limit if it is too low)");
            *last = Some(std::time::Instant::now());
        }
    }
    tokio::time::sleep(ACCEPT_PAUSE).await;
}

/// How long an accept loop waits after `accept` failed.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line per this long about failed accepts.
const ACCEPT_FAILED_LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    settings: ServerSettings,
) {
    run_with_workers(
        gateway,
        listener,
        admin,
        shutdown,
        settings,
        default_workers(),
    )
    .await
}

pub type Accepted = (std::net::TcpStream, SocketAddr);

/// Like [`run`] with an explicit number of workers. Each worker is a thread with its own
/// single-threaded runtime and upstream connection pool (like nginx's worker processes): a
/// connection, its requests and their upstream calls stay on one thread, bound to a CPU of its
/// own when [`super::affinity::plan`] says so. This task accepts and hands connections out
/// round-robin, and serves the admin port itself.
pub async fn run_with_workers(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    settings: ServerSettings,
    workers: usize,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = workers.max(1);
    let mut senders = Vec::with_capacity(workers);
    let mut finished = Vec::with_capacity(workers);
    let cpus = super::affinity::plan(
        settings.cpu_affinity,
        &super::affinity::allowed_cpus(),
        workers,
    );
    match &cpus {
        Some(cpus) => tracing::info!(?cpus, "proxy workers bound one per CPU"),
        None => tracing::info!(
            workers,
            "proxy workers placed by the kernel (workerCpuAffinity off, or not one worker per CPU the process may use)"
        ),
    }
    for i in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::channel::<Accepted>(settings.accept_queue.max(1));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let gw = gateway.clone();
        let stop = stop_rx.clone();
        let settings = settings.clone();
        let cpu = cpus.as_ref().map(|cpus| cpus[i]);
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = super::affinity::bind_current_thread(cpu) {
                        tracing::warn!(
                            "proxy worker {i} stays unbound: cannot bind it to CPU {cpu}: {e}"
                        );
                    }
                }
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(gw, rx, stop, settings)),
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
    let admin_tls = settings
        .tls
        .clone()
        .filter(|_| settings.admin_tls)
        .map(|tls| (tls.http1_acceptor(), tls));
    let http = http1_builder(settings.header_read);
    tokio::pin!(shutdown);
    let has_workers = !senders.is_empty();
    let mut dispatch = Dispatch::new(senders, gateway.metrics.connections_shed.clone());
    if settings.tls.is_some() {
        dispatch = dispatch.closing_only();
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(std_stream) = stream.into_std() else { continue };
                if has_workers {
                    dispatch.hand_out((std_stream, peer));
                }
            }
            accepted = admin.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                };
                let gw = gateway.clone();
                let hsts = admin_tls.as_ref().map(|(_, tls)| tls.hsts.clone());
                let service = hyper::service::service_fn(move |req| {
                    let gw = gw.clone();
                    let mut resp = gw.admin(&req);
                    if let Some(hsts) = &hsts {
                        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                match admin_tls.clone() {
                    None => {
                        let conn = admin_graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                        tokio::spawn(async move { let _ = conn.await; });
                    }
                    Some((acceptor, tls)) => {
                        let (http, header_read) = (http.clone(), settings.header_read);
                        tokio::spawn(async move {
                            let handshake = tokio::time::timeout(header_read, acceptor.accept(stream)).await;
                            if let Some(stream) = tls.accepted(handshake) {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        });
                    }
                }
            }
        }
    }
    drop(listener);
    gateway.start_draining();
    tracing::info!(
        grace_secs = settings.shutdown_grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    drop(dispatch);
    for done in finished {
        let _ = done.await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), admin_graceful.shutdown()).await;
}

/// hyper's HTTP/1 server as the gateway's listeners use it; `header_read`: hyper's own
/// header-read timeout (None where the caller keeps that deadline itself).
pub(super) fn http1_builder(
    header_read: impl Into<Option<Duration>>,
) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true)
        .writev(false)
        // The worker's own deadline table on worker threads; tokio's timer elsewhere.
        .timer(super::timer::WorkerTimer)
        .header_read_timeout(header_read)
        // One head-size limit on both client paths: the fast path hands longer heads here,
        // and hyper answers them 431 (its buffer limit alone lets a head that arrives in a
        // few large reads through).
        .max_header_size(super::front::MAX_HEAD_BYTES)
        // A client that half-closes after its request still gets the response.
        .half_close(true);
    http
}

/// One worker: serves the connections it is handed until told to stop, then drains.
async fn worker(
    gateway: Arc<Gateway>,
    mut conns: tokio::sync::mpsc::Receiver<Accepted>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    settings: ServerSettings,
) {
    let drain = super::drain::Drain::new();
    tokio::spawn(super::timer::install());
    tokio::spawn(super::upstream::close_idle_periodically());
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
                let settings = settings.clone();
                match settings.tls.clone() {
                    Some(tls) => {
                        let conn = super::front::serve_tls(stream, tls, gateway.clone(), forwarded_for, drain.clone(), settings);
                        tokio::spawn(drain.watch(conn));
                    }
                    None => {
                        let conn = super::front::serve(stream, gateway.clone(), forwarded_for, drain.clone(), settings);
                        tokio::spawn(drain.watch(conn));
                    }
                }
            }
        }
    }
    if tokio::time::timeout(settings.shutdown_grace, drain.drain())
        .await
        .is_err()
    {
        tracing::warn!("drain period ended with requests still in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key a request presents, as first written (a hashed lookup per field name), for
    /// the differential test below.
    fn presented_key_by_lookup(h: &HeaderMap) -> Result<Option<&str>, ()> {
        let bearer = h
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(bearer_token);
        let api_key = h
            .get_all(X_API_KEY)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::trim));
        let mut keys = bearer.chain(api_key);
        let first = keys.next();
        if let Some(key) = first {
            if keys.any(|other| other != key) {
                return Err(());
            }
        }
        Ok(first)
    }

    /// Every request carrying up to three of these fields, in every order, is read the same
    /// way as by per-name lookups: the same key, or refused as several keys.
    #[test]
    fn presented_key_agrees_with_per_name_lookups_on_every_combination() {
        let fields: &[(&str, &[u8])] = &[
            ("authorization", b"Bearer k1"),
            ("authorization", b"bearer   k1 "),
            ("authorization", b"BEARER k2"),
            ("authorization", b"Basic k1"),
            ("authorization", b"Bearer "),
            ("authorization", b"Bearer k\xff"),
            ("x-api-key", b"k1"),
            ("x-api-key", b" k2"),
            ("x-api-key", b""),
            ("x-api-key", b"k\xfe"),
            ("x-other", b"Bearer k3"),
            ("host", b"gw"),
        ];
        let mut cases = 0;
        let n = fields.len();
        for a in 0..=n {
            for b in 0..=n {
                for c in 0..=n {
                    let mut h = HeaderMap::new();
                    for i in [a, b, c].into_iter().filter(|i| *i < n) {
                        let (name, value) = fields[i];
                        h.append(
                            HeaderName::from_static(name),
                            HeaderValue::from_bytes(value).unwrap(),
                        );
                    }
                    let got = presented_key(&h).map_err(|e| {
                        assert!(matches!(e, Refusal::SeveralKeys));
                    });
                    assert_eq!(got, presented_key_by_lookup(&h), "{h:?}");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, (n + 1).pow(3));
    }

    /// A connected pair: the gateway's accepted end and the client's end.
    fn pair(listener: &std::net::TcpListener) -> (Accepted, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        ((server, peer), client)
    }

    #[test]
    fn connections_wait_in_bounded_queues_and_are_shed_with_503_when_all_are_full() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx_a, mut rx_a) = tokio::sync::mpsc::channel::<Accepted>(1);
        let (tx_b, rx_b) = tokio::sync::mpsc::channel::<Accepted>(2);
        let shed = IntCounter::new("shed", "shed").unwrap();
        let mut dispatch = Dispatch::new(vec![tx_a, tx_b], shed.clone());
        // Round-robin while there is room: a, b, then b again (a is full), then b is full.
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (conn, client) = pair(&listener);
            dispatch.hand_out(conn);
            clients.push(client);
        }
        assert_eq!(shed.get(), 0);
        assert_eq!(rx_a.len(), 1);
        assert_eq!(rx_b.len(), 2);
        // Every queue full: the fourth is answered 503 and closed, not queued.
        let (conn, mut client) = pair(&listener);
        dispatch.hand_out(conn);
        assert_eq!(shed.get(), 1);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 1"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "overloaded");
        // A worker takes one: room again, no shedding.
        assert!(rx_a.try_recv().is_ok());
        let (conn, _client) = pair(&listener);
        dispatch.hand_out(conn);
        assert_eq!(shed.get(), 1);
        assert_eq!(rx_a.len(), 1);
    }

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
