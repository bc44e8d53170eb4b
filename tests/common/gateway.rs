//! Test support for the proxy: an in-process upstream on 127.0.0.1:0 and a gateway wired to it.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use apitree::crd::gateway::KeyScope;
use apitree::entities::keys::{ApiKey, Pepper};
use apitree::entities::vault::MasterKeys;
use apitree::proxy::transport::workers;
use apitree::proxy::{
    accesslog::AccessLog,
    config::ProxyConfig,
    limiter::Limiter,
    metrics::ProxyMetrics,
    server::{self, Gateway},
    state::{GatewayState, SharedState},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const PEPPER: &[u8] = b"test-pepper-0123456789-0123456789-abcdef";
pub const MASTER_KEY_B64: &str = "dGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGVzLWxvbmchISE=";
pub const UPSTREAM_SECRET: &str = "upstream-system-secret-42";
pub const BYOK_SECRET: &str = "beta-own-vendor-key-7";
pub const RRN: &str = "900101-1234568";

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An upstream that records what it saw.
#[derive(Clone, Default)]
pub struct Upstream {
    pub addr: Option<SocketAddr>,
    pub hits: Arc<AtomicUsize>,
    /// `/big` bodies being sent now: a body the gateway stops taking (its client went away)
    /// is over when the gateway closes the upstream connection.
    pub big_open: Arc<AtomicUsize>,
}

/// Counts a `/big` body in [`Upstream::big_open`] while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the upstream. Paths: `/fail` → 500, `/echo-body` → the method and the request body
/// as JSON, `/slow` → 2 s delay, `/big` → [`BIG_BODY`] bytes (`/late-big`: from 300 ms
/// after the head), `/pii` → a body with PII,
/// `/pii-stream` → 200 KiB of chunks with PII across chunk boundaries; anything else echoes the
/// request as JSON (method, path, query, headers).
pub async fn start_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let big_open = Arc::new(AtomicUsize::new(0));
    let open = big_open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (counter, open) = (counter.clone(), open.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let open = open.clone();
                        async move { Ok::<_, Infallible>(upstream_response(req, open).await) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr: Some(addr),
        hits,
        big_open,
    }
}

/// [`BIG_BODY`] bytes in 64 KiB pieces, made as they are taken (more than every socket buffer
/// on the way holds), the first `late` after the head; counted in `open` while it lives.
fn big(open: Arc<AtomicUsize>, late: Duration) -> hyper::Response<UpBody> {
    let piece = Bytes::from(vec![b'x'; 64 * 1024]);
    open.fetch_add(1, Ordering::SeqCst);
    let open = Open(open);
    let pieces = futures::stream::unfold((0, open), move |(sent, open)| {
        let piece = piece.clone();
        async move {
            if sent == 0 {
                tokio::time::sleep(late).await;
            }
            let frame = Ok::<_, Infallible>(Frame::data(piece));
            (sent < BIG_BODY).then(|| (frame, (sent + 64 * 1024, open)))
        }
    });
    hyper::Response::builder()
        .status(200)
        .header("content-length", BIG_BODY)
        .body(StreamBody::new(pieces).boxed())
        .unwrap()
}

/// The length of the upstream's `/big` body.
pub const BIG_BODY: usize = 64 * 1024 * 1024;

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_response(
    req: hyper::Request<hyper::body::Incoming>,
    big_open: Arc<AtomicUsize>,
) -> hyper::Response<UpBody> {
    let path = req.uri().path().to_string();
    let full = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    };
    match path.as_str() {
        "/fail" => full(500, "{\"upstream\":\"broken\"}".into()),
        // The request body as it arrived, with the method.
        "/echo-body" => {
            let method = req.method().to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body = body.map_or_else(
                |e| format!("<body failed: {e}>"),
                |b| String::from_utf8_lossy(&b).into_owned(),
            );
            full(
                200,
                serde_json::json!({"method": method, "body": body}).to_string(),
            )
        }
        // The request body verbatim, with its length, 100 ms after the head: the gateway
        // sends the head before the body, whatever the body holds.
        "/raw-late" => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body = body.unwrap_or_default();
            let len = body.len();
            let late = futures::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, Infallible>(Frame::data(body))
            });
            hyper::Response::builder()
                .status(200)
                .header("content-type", "text/plain")
                .header("content-length", len)
                .body(StreamBody::new(late).boxed())
                .unwrap()
        }
        "/no-content" => hyper::Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        // Fields about the upstream's own connection, one of them named in `Connection`.
        "/hop-fields" => hyper::Response::builder()
            .status(200)
            .header("connection", "x-up-hop")
            .header("x-up-hop", "named in Connection")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "end to end")
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .unwrap(),
        // A body of unknown length: hyper's upstream server sends it chunked.
        "/stream" => {
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = ["{\"part\":1,", "\"part\":2}"]
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect();
            hyper::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
                .unwrap()
        }
        // 64 MiB in 64 KiB pieces, made as they are taken: more than every socket buffer on
        // the way holds.
        "/big" => big(big_open, Duration::ZERO),
        "/late-big" => big(big_open, Duration::from_millis(300)),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            full(200, "{\"slow\":true}".into())
        }
        "/pii" => full(
            200,
            format!(
                r#"{{"name":"홍길동","rrn":"{RRN}","phone":"010-9876-5432","note":"계좌 110-123-456789"}}"#
            ),
        ),
        "/pii-stream" => {
            // 2,000 records in 7-byte chunks: every PII value is split somewhere.
            let mut text = String::new();
            for i in 0..2000 {
                text.push_str(&format!(
                    "{{\"i\":{i},\"tel\":\"010-1234-{:04}\",\"rrn\":\"{RRN}\"}}\n",
                    i % 10000
                ));
            }
            let bytes = Bytes::from(text);
            let len = bytes.len();
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..len)
                .step_by(7)
                .map(|s| Ok(Frame::data(bytes.slice(s..(s + 7).min(len)))))
                .collect();
            hyper::Response::builder()
                .status(200)
                .header("content-length", len)
                .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
                .unwrap()
        }
        _ => {
            // Repeated fields as one comma-joined value, in the order they came.
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .keys()
                .map(|k| {
                    let values: Vec<&str> = req
                        .headers()
                        .get_all(k)
                        .iter()
                        .map(|v| v.to_str().unwrap_or(""))
                        .collect();
                    (k.to_string(), values.join(", ").into())
                })
                .collect();
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "path": path,
                "query": req.uri().query(),
                "headers": headers,
            });
            full(200, body.to_string())
        }
    }
}

/// A running gateway.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub log: Arc<Mutex<Vec<u8>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
    /// Stops accepting and drains; resolves when the server task ends.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
    /// The admin port's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    /// The admin port's `/readyz` document.
    pub async fn readiness(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    /// Access-log lines written so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Options for `apitree proxy --config FILE` on ephemeral loopback ports, with no Redis, no
/// database and no access log (callers set what they need on top).
pub fn proxy_options(config: std::path::PathBuf) -> apitree::proxy::ProxyOptions {
    apitree::proxy::ProxyOptions {
        config,
        redis_url: None,
        redis_ca_file: None,
        database_url: None,
        // The tests' upstreams listen on loopback.
        upstream_allow: vec!["127.0.0.0/8".parse().unwrap()],
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        access_log: false,
        usage_metering: true,
    }
}

pub fn pepper() -> Pepper {
    Pepper::new(PEPPER.to_vec()).unwrap()
}

pub fn master_keys() -> MasterKeys {
    MasterKeys::single(1, MASTER_KEY_B64).unwrap()
}

/// A key and its `keys:` YAML entry.
pub fn key_entry(scope: KeyScope, org: &str, extra: &str) -> (ApiKey, String) {
    let key = ApiKey::generate(scope);
    let scope_s = if scope == KeyScope::Live {
        "live"
    } else {
        "test"
    };
    let entry = format!(
        "  - {{ prefix: {}, hash: {}, org: {org}, scope: {scope_s}{extra} }}\n",
        key.prefix(),
        pepper().hash(&key).to_hex()
    );
    (key, entry)
}

/// A `credentials:` YAML entry.
pub fn credential_entry(name: &str, org: &str, api: &str, kind: &str, secret: &str) -> String {
    let sealed = master_keys().encrypt(org, api, secret);
    format!(
        "  - {{ name: {name}, org: {org}, api: {api}, kind: {kind}, keyVersion: {}, nonce: \"{}\", ciphertext: \"{}\", valuePrefix: \"Bearer \" }}\n",
        sealed.key_version,
        sealed.nonce_b64(),
        sealed.ciphertext_b64()
    )
}

/// Starts a gateway from YAML (secrets are supplied here, not from files).
pub async fn start_gateway(yaml: &str, limiter: Option<Limiter>) -> TestGateway {
    start_gateway_with_workers(yaml, limiter, workers::default_workers()).await
}

/// [`start_gateway`] with `workers` worker threads.
pub async fn start_gateway_with_workers(
    yaml: &str,
    limiter: Option<Limiter>,
    workers: usize,
) -> TestGateway {
    install_crypto();
    let cfg: ProxyConfig =
        serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"));
    let keys = master_keys();
    let state =
        GatewayState::build(&cfg, "test.yaml", Some(&keys), None).unwrap_or_else(|e| panic!("{e}"));
    let metrics = ProxyMetrics::new();
    let limiter = limiter.unwrap_or_else(|| Limiter::local(metrics.clone()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let access_log = AccessLog::to_writer(
        Box::new(SharedWriter(log.clone())),
        metrics.access_log_dropped.clone(),
    );
    let gateway = Arc::new(
        Gateway::new(
            SharedState::new(state),
            pepper(),
            limiter,
            metrics,
            access_log,
            server::system_clock(),
        )
        .with_body_read_timeout(cfg.body_read_timeout.as_std()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let gw = gateway.clone();
    let settings = workers::ServerSettings::of(&cfg);
    let settings = workers::ServerSettings {
        // At most 5 s in tests (the default is 30 s).
        shutdown_grace: settings.shutdown_grace.min(Duration::from_secs(5)),
        ..settings
    };
    let done = tokio::spawn(async move {
        workers::run_with_workers(
            gw,
            listener,
            admin,
            async {
                let _ = rx.await;
            },
            settings,
            workers,
        )
        .await;
    });
    TestGateway {
        addr,
        admin: admin_addr,
        gateway,
        log,
        shutdown: Some(tx),
        done: Some(done),
    }
}

pub fn client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder().build().unwrap()
}
