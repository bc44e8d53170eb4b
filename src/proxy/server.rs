//! The request path (the policy stack), assembled in one place. The transport that feeds it
//! and calls upstreams is `super::transport`.
//!
//! Outer to inner: request id + access log → API-key auth → route match → key scope → rate
//! limits (key and org, three windows) → upstream credential → circuit breaker → upstream call
//! with timeout → PII on the response → metrics. Route matching happens before the limits (the
//! design lists it after) so that a route's own tier applies and unknown paths cost no quota.
//!
//! Errors are classified once, where they happen, as a [`Refusal`]; [`rescue`] (in
//! `super::rescue`) is the one place
//! that turns them into HTTP statuses with a JSON body naming the problem and the request id.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::{combinators::BoxBody, BodyExt};
use rand::RngExt;

use super::accesslog::{AccessLog, AccessRecord};
use super::body::{collect_limited, collect_up_to, MaskingBody};
use super::breaker::{Permit, Transition};
use super::forward::{Forwarding, X_API_KEY, X_REQUEST_ID};
use super::inbound::{self, TargetError};
use super::limiter::Limiter;
use super::metrics::{ProxyMetrics, NO_ROUTE};
use super::pii::{self, PiiKind};
use super::request_body::{BodyFault, BodyWatch, WatchedBody};
use super::rescue::{full, insert_str, rescue, Refusal};
use super::state::{GatewayState, KeyRecord, NoCredential, Route, SharedState};
use super::transport::upstream::{self};
use crate::crd::gateway::PiiMode;
use crate::entities::keys::{ApiKey, Pepper};

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
    pub(crate) fn label(self) -> &'static str {
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
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Metric handles of requests refused before routing (resolved once).
    no_route_metrics: super::metrics::RouteMetrics,
    /// How long a client's request body may pause between two pieces (`bodyReadTimeout`).
    body_read_timeout: Duration,
}

/// nginx's code for a request whose client went away before it was answered (logged only).
pub(crate) const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
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

pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
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
        let result = super::transport::timer::timeout(route.timeout, sent).await;
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
