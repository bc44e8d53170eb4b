//! The console: where buyers, sellers and admins sign in and act within their role.
//!
//! `apitree console` serves, on its own port, the REST API under `/api/v1` ([`api`]), a plain
//! web page at `/` (no build step, no third-party origin), `/metrics` and `/healthz`. Sessions
//! are HS256 JWTs from a keyring ([`jwt`]); passwords are Argon2id ([`password`]); failed
//! sign-ins are throttled per account and per address ([`throttle`]); [`authz`] is the one
//! place that decides who may do what. Every query runs in a transaction as the database role
//! `apitree_console`, which row-level security applies to, with the org opened from the
//! verified session: the application check and the database both refuse another org's rows.

pub mod api;
pub mod authz;
pub mod jwt;
pub mod password;
pub mod throttle;
pub mod users;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;

use crate::entities::keys::Pepper;
use crate::entities::vault::MasterKeys;
use crate::proxy::tls::ServerTls;

/// Longest request body the console reads.
const MAX_BODY: usize = 64 * 1024;
/// A request head must be whole this long after a connection opens or goes idle.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

const INDEX: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");

/// Content-Security-Policy of every response: this origin only, no inline script, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The console's counters.
pub struct ConsoleMetrics {
    pub registry: Registry,
    logins: IntCounterVec,
    auth_failures: IntCounterVec,
    refusals: IntCounterVec,
    responses: IntCounterVec,
}

impl ConsoleMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let logins = counter(
            "apitree_console_logins_total",
            "Sign-ins by result (ok, invalid, throttled).",
            &["result"],
        );
        let auth_failures = counter(
            "apitree_console_auth_failures_total",
            "Refused sign-ins and sessions by reason (login_invalid, login_throttled, token_*, session_revoked, no_token).",
            &["reason"],
        );
        let refusals = counter(
            "apitree_console_refusals_total",
            "Requests a signed-in user was refused, by action and answer (forbidden, not_found).",
            &["action", "answer"],
        );
        let responses = counter(
            "apitree_console_responses_total",
            "Responses by status class.",
            &["status_class"],
        );
        for r in ["ok", "invalid", "throttled"] {
            logins.with_label_values(&[r]).inc_by(0);
        }
        for r in ["login_invalid", "login_throttled"] {
            auth_failures.with_label_values(&[r]).inc_by(0);
        }
        ConsoleMetrics {
            registry,
            logins,
            auth_failures,
            refusals,
            responses,
        }
    }

    pub fn login(&self, result: &str) {
        self.logins.with_label_values(&[result]).inc();
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    pub fn refused(&self, action: &str, answer: &str) {
        self.refusals.with_label_values(&[action, answer]).inc();
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for ConsoleMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything the console serves from.
pub struct Console {
    pub pool: sqlx::PgPool,
    pub keyring: jwt::Keyring,
    pub session_ttl: Duration,
    pub throttle: throttle::Throttle,
    /// Bounds the password hashing that unauthenticated requests can start.
    pub hashing: password::Gate,
    /// Proxies whose X-Forwarded-For names the client (see [`client_address`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where sellers' upstream URLs may point.
    pub egress: crate::proxy::egress::EgressPolicy,
    /// Issues keys; without it key creation and rotation answer 503.
    pub pepper: Option<Arc<Pepper>>,
    /// Seals credentials; without it credential writes answer 503.
    pub master_keys: Option<Arc<MasterKeys>>,
    pub metrics: ConsoleMetrics,
    /// Where security reports and data protection requests go (the page's footer).
    pub contacts: Contacts,
}

/// The addresses the page's footer names.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Contacts {
    pub security: Option<Contact>,
    pub privacy: Option<Contact>,
}

/// An email address or an https:// URL people can reach someone at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Contact(String);

impl Contact {
    /// `security@example.com` or `https://example.com/security`: printable ASCII, no spaces,
    /// at most 254 characters.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let printable = !t.is_empty() && t.len() <= 254 && t.bytes().all(|b| b.is_ascii_graphic());
        let email = t.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.contains('@')
                && !t.contains(['<', '>', '"', '\\', ':', '/'])
        });
        let url = t.strip_prefix("https://").is_some_and(|rest| {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !host.contains('@')
        });
        if printable && (email || url) {
            Ok(Self(t.to_string()))
        } else {
            Err(format!(
                "{t:?} is not a contact: give an email address (security@example.com) or an https:// URL"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The console port, serving in the background.
pub struct ConsoleServer {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsoleServer {
    /// Stops accepting and waits for the accept loop to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves `console` on `listener`; over TLS (TLS 1.3, HSTS) when `tls` is given.
pub fn spawn(
    listener: TcpListener,
    console: Arc<Console>,
    tls: Option<Arc<ServerTls>>,
) -> std::io::Result<ConsoleServer> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::small_http::serve(
        listener,
        tls,
        HEADER_READ_TIMEOUT,
        async move {
            let _ = stopped.await;
        },
        move |req, peer| {
            let console = console.clone();
            async move { handle(&console, req, peer).await }
        },
    ));
    Ok(ConsoleServer { addr, stop, task })
}

type Response = http::Response<Full<bytes::Bytes>>;

fn respond(status: u16, content_type: &str, body: impl Into<bytes::Bytes>) -> Response {
    let mut r = http::Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("text/plain")),
    );
    r
}

fn error_body(e: &api::ApiError, request_id: &str) -> Response {
    let mut r = respond(
        e.status,
        "application/json",
        serde_json::json!({"error": e.message, "code": e.code, "request_id": request_id})
            .to_string(),
    );
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// A client's request id when it is short and plain, else a new one.
fn request_id(req: &http::Request<hyper::body::Incoming>) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// The client a request comes from: the TCP peer, unless the peer is a trusted proxy; then
/// X-Forwarded-For is read from the right (each proxy appends the address it saw), skipping
/// trusted proxies, and the first address that is not one is the client. An entry that does
/// not parse (an address, or an address and port) ends the walk at the last trusted hop:
/// what lies left of it is the client's own to write.
pub fn client_address(peer: IpAddr, headers: &http::HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |a: &IpAddr| trusted.iter().any(|n| n.contains(a));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|v| v.to_str().unwrap_or("?").rsplit(','));
    for entry in entries {
        // Some balancers append the port they saw.
        let entry = entry.trim();
        let Ok(addr) = entry
            .parse::<IpAddr>()
            .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        else {
            return client;
        };
        client = addr;
        if !is_trusted(&addr) {
            return addr;
        }
    }
    client
}

async fn handle(
    console: &Arc<Console>,
    req: http::Request<hyper::body::Incoming>,
    peer: IpAddr,
) -> Response {
    let peer = client_address(peer, req.headers(), &console.trusted_proxies);
    let id = request_id(&req);
    let path = req.uri().path().to_string();
    let mut resp = if let Some(rest) = path.strip_prefix("/api/v1/") {
        let mut r = api_request(console, req, rest, peer, &id).await;
        r.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        r
    } else {
        // HEAD is GET without the body (hyper leaves the body out).
        let method = if req.method() == Method::HEAD {
            &Method::GET
        } else {
            req.method()
        };
        match (method, path.as_str()) {
            (&Method::GET, "/") => respond(200, "text/html; charset=utf-8", INDEX),
            (&Method::GET, "/app.js") => respond(200, "text/javascript; charset=utf-8", APP_JS),
            (&Method::GET, "/app.css") => respond(200, "text/css; charset=utf-8", APP_CSS),
            (&Method::GET, "/healthz") => respond(200, "application/json", r#"{"status":"ok"}"#),
            (&Method::GET, "/metrics") => {
                respond(200, "text/plain; version=0.0.4", console.metrics.render())
            }
            _ => error_body(
                &api::ApiError::new(
                    404,
                    "no_route",
                    "not found; the console serves /, /api/v1/…, /metrics and /healthz",
                ),
                &id,
            ),
        }
    };
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    let class = match resp.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    console.metrics.responses.with_label_values(&[class]).inc();
    resp
}

async fn api_request(
    console: &Arc<Console>,
    req: http::Request<hyper::body::Incoming>,
    rest: &str,
    peer: IpAddr,
    id: &str,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_body(
                &api::ApiError::new(
                    413,
                    "body_too_large",
                    format!("the body is larger than {MAX_BODY} bytes, or was cut off"),
                ),
                id,
            )
        }
    };
    if !body.is_empty() {
        let json = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            })
            .unwrap_or(false);
        if !json {
            return error_body(
                &api::ApiError::new(
                    415,
                    "unsupported_media_type",
                    "send the body as JSON with Content-Type: application/json",
                ),
                id,
            );
        }
    }
    let bearer = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if query
        .iter()
        .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return error_body(
            &api::ApiError::bad("a query parameter holds a NUL character (%00); remove it"),
            id,
        );
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let r = api::Request {
        console,
        method: &parts.method,
        segments,
        query,
        body: &body,
        bearer,
        peer,
    };
    match api::dispatch(r).await {
        Ok((status, value)) => respond(status, "application/json", value.to_string()),
        Err(e) => error_body(&e, id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_rightmost_address_no_trusted_proxy_wrote() {
        let trusted: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let table: [(&str, &[&str], &str); 12] = [
            // (peer, X-Forwarded-For values, client)
            ("203.0.113.9", &["198.51.100.1"], "203.0.113.9"),
            ("10.1.1.1", &[], "10.1.1.1"),
            ("10.1.1.1", &["198.51.100.1"], "198.51.100.1"),
            ("10.1.1.1", &["1.1.1.1, 198.51.100.1"], "198.51.100.1"),
            (
                "10.1.1.1",
                &["1.1.1.1, 198.51.100.1, 10.2.2.2"],
                "198.51.100.1",
            ),
            (
                "10.1.1.1",
                &["1.1.1.1", "198.51.100.1, 10.2.2.2"],
                "198.51.100.1",
            ),
            ("10.1.1.1", &["10.3.3.3, 10.2.2.2"], "10.3.3.3"),
            ("10.1.1.1", &["1.1.1.1, garbage, 10.2.2.2"], "10.2.2.2"),
            ("10.1.1.1", &["1.1.1.1, 198.51.100.1:443"], "198.51.100.1"),
            ("10.1.1.1", &["[2001:db8::9]:443"], "2001:db8::9"),
            ("10.1.1.1", &["1.1.1.1, 198.51.100.1:x"], "10.1.1.1"),
            ("fd00::1", &["2001:db8::7"], "2001:db8::7"),
        ];
        for (peer, xff, want) in table {
            let mut h = http::HeaderMap::new();
            for v in xff {
                h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(
                client_address(ip(peer), &h, &trusted),
                ip(want),
                "{peer} {xff:?}"
            );
            assert_eq!(
                client_address(ip(peer), &h, &[]),
                ip(peer),
                "nothing trusted"
            );
        }
    }
}

#[cfg(test)]
mod contact_tests {
    use super::Contact;

    #[test]
    fn a_contact_is_an_email_or_an_https_url() {
        for good in [
            "security@example.com",
            "dpo+gdpr@corp.example.co.kr",
            "https://example.com/security",
            "https://example.com",
        ] {
            assert_eq!(Contact::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "security",
            "@example.com",
            "a@b",
            "a@b@c.com",
            "http://example.com/security",
            "javascript:alert(1)",
            "https://",
            "https://user@evil.example/",
            "mailto:a@b.com",
            "a b@c.com",
            "\"a\"@b.com",
            "a@b.com\nb@c.com",
            "ops@exämple.com",
        ] {
            let err = Contact::parse(bad).unwrap_err();
            assert!(err.contains("is not a contact"), "{bad:?}: {err}");
        }
    }
}
