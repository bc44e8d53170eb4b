//! The operator's HTTP port: the status page (`/`, `/api/gateways`), `/metrics`, `/healthz`,
//! `/readyz` and, when a signing secret is configured, Slack's `POST /slack/interactions`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;

use super::gateway::rollout::Press;
use super::metrics::OperatorMetrics;
use crate::dashboard::{GatewayView, PAGE};
use crate::notify::slack::InteractionEndpoint;
use crate::notify::Notifier;
use crate::proxy::tls::ServerTls;

/// This replica's part in the control plane, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `apitree local` or `apitree demo`: alone, no election.
    Local,
    /// Holds the leader Lease: reconciles, sweeps and delivers Slack messages.
    Leader,
    /// Waits to take over; serves `/healthz` and `/readyz` only.
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Leader => "leader",
            Self::Standby => "standby",
        }
    }
}

/// What the HTTP port serves from.
pub struct HttpState {
    /// The gateways as of the last pass of the loop.
    pub views: RwLock<Vec<GatewayView>>,
    pub metrics: Arc<OperatorMetrics>,
    /// True once the loop has completed a pass, or (in a cluster) the replica knows whether it
    /// leads or stands by; a standby is ready to take over.
    pub ready: AtomicBool,
    pub role: RwLock<Role>,
    /// Where incidents, the Slack outbox and baselines live: `postgres` or `memory`.
    pub state: RwLock<&'static str>,
    pub interactions: Option<InteractionEndpoint>,
    /// Console sessions that may read `/api/gateways` (admins and super_admins); `None`:
    /// only this machine (loopback, which includes `kubectl port-forward`).
    pub viewers: Option<Viewers>,
}

/// How long the console's answer about a session is kept.
const CONFIRM_FOR: Duration = Duration::from_secs(10);
/// Sessions whose answer is kept at once (all are forgotten when full).
const CONFIRMED_MAX: usize = 1024;

/// Console sessions that may read the status data: tokens signed with the console's keyring
/// (`APITREE_JWT_SECRETS`) whose user the console (`APITREE_CONSOLE_URL`) confirms is an
/// enabled admin or super_admin now, so a disabled admin or a changed role loses access within
/// [`CONFIRM_FOR`]. Without a console URL the token's role claim is believed until the token
/// expires (a session lifetime, 15 minutes by default).
pub struct Viewers {
    pub keyring: crate::console::jwt::Keyring,
    /// The console to ask.
    console: Option<ConsoleLink>,
    confirm_for: Duration,
    confirmed: std::sync::Mutex<std::collections::HashMap<[u8; 32], (std::time::Instant, bool)>>,
}

/// Key ids and the console's URL only: never a secret.
impl std::fmt::Debug for Viewers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewers")
            .field("kids", &self.keyring.kids())
            .field("console", &self.console.as_ref().map(|c| c.url.as_str()))
            .finish()
    }
}

/// The console the operator asks (sessions, `/metrics`): its base URL and a client that
/// trusts its certificate.
#[derive(Clone)]
pub struct ConsoleLink {
    pub url: reqwest::Url,
    pub client: reqwest::Client,
}

impl ConsoleLink {
    /// `url` is the console's base URL; `ca_pem`, the CA that signed its certificate when the
    /// system CAs do not (a private CA): then that CA alone is trusted.
    pub fn new(mut url: reqwest::Url, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        // The console's paths are below this one, whether or not it ends in '/'.
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or("holds no PEM certificate")?;
            builder = builder.tls_certs_only(roots);
        }
        let client = builder.build().map_err(|e| crate::tls::error_chain(&e))?;
        Ok(ConsoleLink { url, client })
    }

    /// From `APITREE_CONSOLE_URL` and `APITREE_CONSOLE_CA_FILE`; `None` without a URL.
    pub fn from_env() -> Result<Option<Self>, String> {
        let u = match std::env::var("APITREE_CONSOLE_URL") {
            Ok(u) if !u.trim().is_empty() => u,
            _ => return Ok(None),
        };
        let url = reqwest::Url::parse(u.trim()).map_err(|e| {
            format!("APITREE_CONSOLE_URL {u:?} is not a URL like http://apitree-console:8090/: {e}")
        })?;
        let ca = match std::env::var("APITREE_CONSOLE_CA_FILE") {
            Ok(f) if !f.trim().is_empty() => Some(
                std::fs::read(f.trim())
                    .map_err(|e| format!("APITREE_CONSOLE_CA_FILE {f:?}: {e}"))
                    .map(|pem| (f, pem))?,
            ),
            _ => None,
        };
        match ca {
            Some((f, pem)) => Self::new(url, Some(&pem))
                .map_err(|e| format!("APITREE_CONSOLE_CA_FILE {f:?}: {e}")),
            None => Self::new(url, None).map_err(|e| format!("APITREE_CONSOLE_URL: {e}")),
        }
        .map(Some)
    }
}

impl Viewers {
    pub fn new(keyring: crate::console::jwt::Keyring, console: Option<ConsoleLink>) -> Self {
        Viewers {
            keyring,
            console,
            confirm_for: CONFIRM_FOR,
            confirmed: Default::default(),
        }
    }

    /// Without caching the console's answers (tests).
    pub fn uncached(mut self) -> Self {
        self.confirm_for = Duration::ZERO;
        self
    }

    /// From `APITREE_JWT_SECRETS`, `APITREE_CONSOLE_URL` and `APITREE_CONSOLE_CA_FILE`; `None`
    /// without a keyring.
    pub fn from_env() -> Result<Option<Self>, String> {
        let Some(keyring) = crate::console::jwt::Keyring::from_env()
            .map_err(|e| format!("APITREE_JWT_SECRETS: {e}"))?
        else {
            return Ok(None);
        };
        Ok(Some(Self::new(keyring, ConsoleLink::from_env()?)))
    }

    /// The console, if sessions are confirmed there.
    pub fn console(&self) -> Option<&ConsoleLink> {
        self.console.as_ref()
    }

    /// Whether the console says `token`'s user is an enabled admin or super_admin now.
    async fn confirm(&self, token: &str) -> Result<bool, String> {
        use sha2::Digest;
        let Some(ConsoleLink {
            url: console,
            client: http,
        }) = &self.console
        else {
            return Ok(true);
        };
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = std::time::Instant::now();
        if let Some((at, staff)) = self
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if now.duration_since(*at) < self.confirm_for {
                return Ok(*staff);
            }
        }
        let url = console.join("api/v1/me").map_err(|e| e.to_string())?;
        let resp = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| crate::tls::error_chain(&e))?;
        let staff = match resp.status().as_u16() {
            200 => {
                let me: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
                me["user"]["role"]
                    .as_str()
                    .and_then(crate::console::authz::Role::parse)
                    .is_some_and(|r| r.is_staff())
            }
            401 | 403 | 404 => false,
            other => return Err(format!("the console answered {other}")),
        };
        let mut cache = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CONFIRMED_MAX {
            cache.clear();
        }
        cache.insert(key, (now, staff));
        Ok(staff)
    }
}

impl HttpState {
    pub fn new(metrics: Arc<OperatorMetrics>, interactions: Option<InteractionEndpoint>) -> Self {
        Self {
            views: RwLock::new(Vec::new()),
            metrics,
            ready: AtomicBool::new(false),
            role: RwLock::new(Role::Local),
            state: RwLock::new("memory"),
            interactions,
            viewers: None,
        }
    }

    /// Who may read the gateways' status besides this machine (see [`Viewers::from_env`]).
    pub fn with_viewers(mut self, viewers: Option<Viewers>) -> Self {
        self.viewers = viewers;
        self
    }

    /// Records whether this replica leads; either way it is ready.
    pub fn set_role(&self, role: Role) {
        *self.role.write().unwrap_or_else(|p| p.into_inner()) = role;
        self.ready.store(true, Ordering::Relaxed);
    }

    /// This replica's part.
    pub fn role(&self) -> Role {
        *self.role.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this replica leads (or runs alone): it delivers Slack messages then.
    pub fn delivers(&self) -> bool {
        matches!(self.role(), Role::Leader | Role::Local)
    }

    /// Records where state lives (`/readyz` reports it).
    pub fn set_state(&self, state: &'static str) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    pub fn publish(&self, views: Vec<GatewayView>) {
        *self.views.write().unwrap_or_else(|p| p.into_inner()) = views;
        self.ready.store(true, Ordering::Relaxed);
    }
}

/// The Slack interaction endpoint of an HTTP port: every verified press goes to `on_press`,
/// which finds the gateway it concerns (the loop applies it, updates the message and audits it
/// in that gateway's database).
pub fn button_endpoint(
    signing_secret: Option<String>,
    extra_secrets: Arc<RwLock<Vec<String>>>,
    notifier: Arc<Notifier>,
    on_press: impl Fn(Press) + Send + Sync + 'static,
) -> InteractionEndpoint {
    InteractionEndpoint {
        signing_secret,
        extra_secrets,
        audit: None,
        notifier,
        apply: Arc::new(move |i| {
            on_press(i.clone());
            None
        }),
    }
}

fn reply(status: u16, content_type: &str, body: String) -> http::Response<String> {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_default()
}

fn json_error(status: u16, code: &str, message: &str) -> http::Response<String> {
    reply(
        status,
        "application/json",
        serde_json::json!({"error": message, "code": code}).to_string(),
    )
}

/// Whether this request may read the gateways' status: see [`HttpState::viewers`].
async fn may_view(
    state: &HttpState,
    headers: &http::HeaderMap,
    peer: std::net::IpAddr,
) -> Result<(), Box<http::Response<String>>> {
    let Some(viewers) = &state.viewers else {
        if peer.is_loopback() {
            return Ok(());
        }
        return Err(Box::new(json_error(
            403,
            "local_only",
            "the gateways' status is served to this machine only (try kubectl port-forward); \
             set APITREE_JWT_SECRETS to the console's keyring to serve it to signed-in admins",
        )));
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let Some(token) = token else {
        return Err(Box::new(json_error(
            401,
            "unauthenticated",
            "sign in to the console and paste its session token here",
        )));
    };
    let forbidden = || {
        Box::new(json_error(
            403,
            "forbidden",
            "the gateways' status is for admins and super_admins",
        ))
    };
    match viewers
        .keyring
        .verify(token, chrono::Utc::now().timestamp())
    {
        Ok(claims) if claims.role.is_staff() => match viewers.confirm(token).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(forbidden()),
            Err(e) => {
                tracing::warn!(error = %e, "could not confirm a console session");
                Err(Box::new(json_error(
                    503,
                    "console_unavailable",
                    "the console that confirms sessions did not answer; retry shortly",
                )))
            }
        },
        Ok(_) => Err(forbidden()),
        Err(e) => Err(Box::new(json_error(401, e.code(), &e.to_string()))),
    }
}

async fn route(
    state: Arc<HttpState>,
    req: http::Request<hyper::body::Incoming>,
    peer: std::net::IpAddr,
) -> http::Response<String> {
    use http::Method;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => reply(200, "text/html; charset=utf-8", PAGE.to_string()),
        (&Method::GET, "/api/gateways") => {
            if let Err(refusal) = may_view(&state, req.headers(), peer).await {
                return *refusal;
            }
            let views = state.views.read().unwrap_or_else(|p| p.into_inner());
            reply(
                200,
                "application/json",
                serde_json::to_string(&*views).unwrap_or_else(|_| "[]".into()),
            )
        }
        (&Method::GET, "/metrics") => {
            reply(200, "text/plain; version=0.0.4", state.metrics.render())
        }
        (&Method::GET, "/healthz") => reply(200, "application/json", r#"{"status":"ok"}"#.into()),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Relaxed) {
                let role = state.role().as_str();
                let kept = *state.state.read().unwrap_or_else(|p| p.into_inner());
                reply(
                    200,
                    "application/json",
                    serde_json::json!({"status": "ready", "role": role, "state": kept}).to_string(),
                )
            } else {
                json_error(
                    503,
                    "not_ready",
                    "the control loop has not completed a pass yet",
                )
            }
        }
        (_, "/slack/interactions") => match &state.interactions {
            Some(endpoint) => endpoint.serve(req).await,
            None => json_error(
                404,
                "not_configured",
                "Slack interactivity is off: set SLACK_SIGNING_SECRET to enable the buttons",
            ),
        },
        _ => json_error(
            404,
            "no_route",
            "not found; try /, /api/gateways, /metrics, /healthz, /readyz or /slack/interactions",
        ),
    }
}

/// The HTTP port, serving in the background.
pub struct HttpServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Stops accepting and waits for the accept loop to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A request head must be whole this long after a connection opens or after its previous
/// response, or the connection is closed (the proxy's `headerReadTimeout` default): a client
/// that sends half a request, or keeps a connection idle, cannot hold it open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `state` on `listener` until [`HttpServer::stop`]; over TLS when `tls` is given.
pub fn spawn(
    listener: TcpListener,
    state: Arc<HttpState>,
    tls: Option<Arc<ServerTls>>,
) -> HttpServer {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state, tls, HEADER_READ_TIMEOUT, async {
        let _ = stopped.await;
    }));
    HttpServer { stop, task }
}

/// The port's TLS from `--tls-cert` / `--tls-key`: TLS 1.3, HTTP/1.1, HSTS, the pair re-read
/// when the files change (the gateway listener's rules), metrics `apitree_operator_tls_*`.
pub fn tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    metrics: &OperatorMetrics,
) -> Result<Arc<ServerTls>, String> {
    crate::small_http::tls(cert, key, &metrics.registry, "apitree_operator")
}

async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    tls: Option<Arc<ServerTls>>,
    header_read: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    crate::small_http::serve(listener, tls, header_read, stop, move |req, peer| {
        route(state.clone(), req, peer)
    })
    .await
}

#[cfg(test)]
mod status_access {
    use super::*;
    use crate::console::authz::Role;
    use crate::console::jwt::{Claims, Keyring, AUDIENCE, ISSUER};

    fn token(keyring: &Keyring, role: Role) -> String {
        let now = chrono::Utc::now().timestamp();
        keyring.sign(&Claims {
            sub: uuid::Uuid::new_v4(),
            role,
            iat: now,
            exp: now + 60,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        })
    }

    fn status(state: &HttpState, bearer: Option<&str>, peer: &str) -> u16 {
        let mut headers = http::HeaderMap::new();
        if let Some(b) = bearer {
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {b}").parse().unwrap(),
            );
        }
        let view = may_view(state, &headers, peer.parse().unwrap());
        let answer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(view);
        match answer {
            Ok(()) => 200,
            Err(r) => r.status().as_u16(),
        }
    }

    /// Without a keyring only loopback peers read the status; with one, only a verified
    /// admin or super_admin session, from anywhere.
    #[test]
    fn the_status_data_needs_loopback_or_a_staff_session() {
        let mut state = HttpState::new(Arc::new(OperatorMetrics::new()), None);
        state.viewers = None;
        for (peer, want) in [
            ("127.0.0.1", 200),
            ("::1", 200),
            ("10.0.0.7", 403),
            ("192.0.2.2", 403),
        ] {
            assert_eq!(status(&state, None, peer), want, "{peer}");
        }
        let keyring = Keyring::parse("k:a-secret-of-at-least-thirty-two-bytes-0001").unwrap();
        let other = Keyring::parse("k:another-secret-of-at-least-32-bytes-0002").unwrap();
        state.viewers = Some(Viewers::new(keyring.clone(), None));
        let cases = [
            (None, 401),
            (Some(token(&keyring, Role::Buyer)), 403),
            (Some(token(&keyring, Role::Seller)), 403),
            (Some(token(&keyring, Role::Admin)), 200),
            (Some(token(&keyring, Role::SuperAdmin)), 200),
            (Some(token(&other, Role::Admin)), 401),
            (Some("garbage".to_string()), 401),
        ];
        for (bearer, want) in cases {
            for peer in ["127.0.0.1", "10.0.0.7"] {
                assert_eq!(
                    status(&state, bearer.as_deref(), peer),
                    want,
                    "{bearer:?} from {peer}"
                );
            }
        }
    }
}

#[cfg(test)]
mod slow_clients {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A half-sent request and an idle connection are both closed after the header-read
    /// timeout; a whole request is answered.
    #[tokio::test]
    async fn half_sent_requests_and_idle_connections_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HttpState::new(Arc::new(OperatorMetrics::new()), None));
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            state,
            None,
            Duration::from_millis(300),
            async {
                let _ = stopped.await;
            },
        ));
        for sent in [&b"GET /healthz HTTP/1.1\r\nHo"[..], b""] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(sent).await.unwrap();
            let started = std::time::Instant::now();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
                .await
                .expect("closed within 5 s")
                .ok();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
