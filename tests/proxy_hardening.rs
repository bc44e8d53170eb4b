//! The gateway against a hostile or careless buyer, with raw sockets: route crossing through
//! dot-segments, client-caused failures blamed on the upstream, stalled uploads holding pooled
//! connections, methods that leak credentials, bad upstream framing, malformed requests, and
//! overload. Every test runs on both client paths: the fast path and hyper's server only
//! (`clientFastPath: false`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use apitree::crd::gateway::KeyScope;
use apitree::proxy::breaker::BreakerState;
use common::gateway::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BOTH_PATHS: [bool; 2] = [true, false];

struct Hardened {
    gw: TestGateway,
    live: String,
    test: String,
}

/// A gateway in front of `upstream` with `routes` (YAML list items; `{up}` is replaced by the
/// upstream's base URL) and top-level settings `top`.
async fn hardened(fast_path: bool, top: &str, routes: &str, upstream: SocketAddr) -> Hardened {
    hardened_with_workers(fast_path, top, routes, upstream, 2).await
}

async fn hardened_with_workers(
    fast_path: bool,
    top: &str,
    routes: &str,
    upstream: SocketAddr,
    workers: usize,
) -> Hardened {
    let (live, live_e) = key_entry(KeyScope::Live, "alpha", "");
    let (test, test_e) = key_entry(KeyScope::Test, "alpha", "");
    let routes = routes.replace("{up}", &format!("http://{upstream}"));
    let yaml = format!(
        r#"clientFastPath: {fast_path}
{top}
tiers:
  - name: roomy
    perKey: {{ burst10s: 10000, perMinute: 100000, perDay: 1000000 }}
    perOrg: {{ burst10s: 10000, perMinute: 100000, perDay: 1000000 }}
defaultTier: roomy
orgs: [{{ id: alpha }}]
keys:
{live_e}{test_e}
routes:
{routes}"#
    );
    Hardened {
        gw: start_gateway_with_workers(&yaml, None, workers).await,
        live: live.expose_secret().to_string(),
        test: test.expose_secret().to_string(),
    }
}

/// A raw response: status, lower-cased header fields, the body bytes after the head (framed
/// by nothing: everything until the connection closed), and whether the read ended in a reset.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    reset: bool,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "status {}: not JSON: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Writes `request` and reads until the server closes (at most 10 s).
async fn send_raw(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

/// [`send_raw`], or None when the server closes without sending a byte.
async fn send_raw_or_nothing(addr: SocketAddr, request: &[u8]) -> Option<Raw> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first))
        .await
        .expect("an answer or a close within 10 s")
        .unwrap_or(0);
    if n == 0 {
        return None;
    }
    Some(read_to_close(&mut stream).await)
}

async fn read_to_close(stream: &mut TcpStream) -> Raw {
    let mut buf = Vec::new();
    let mut reset = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut chunk = [0u8; 16384];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "no close within 10 s; read {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => {
                reset = true;
                break;
            }
        }
    }
    parse_raw(&buf, reset)
}

fn parse_raw(buf: &[u8], reset: bool) -> Raw {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut fields);
    let n = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "no whole response head ({other:?}, reset: {reset}): {:?}",
            String::from_utf8_lossy(buf)
        ),
    };
    Raw {
        status: r.code.unwrap(),
        headers: r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: buf[n..].to_vec(),
        reset,
    }
}

fn get(path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
}

fn post_head(path: &str, key: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n{extra}\r\n")
}

/// The value of metric `name` with these labels (in any order) from the text format; 0 when
/// absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .find_map(|rest| {
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None => ("", rest),
            };
            let mut have: Vec<(&str, &str)> = set
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            let mut want = labels.to_vec();
            have.sort_unstable();
            want.sort_unstable();
            (have == want).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

// --- 1. Route crossing ----------------------------------------------------------------------

/// With `/pub/` → `/public/` (test and live) and `/priv/` → `/private/` (live only), a test key
/// never reaches `/private/` however the traversal is spelled; ambiguous targets are 400.
#[tokio::test]
async fn no_spelling_of_a_path_crosses_from_one_route_into_another() {
    let up = start_upstream().await;
    let routes = "  - { name: pub, pathPrefix: /pub/, upstream: \"{up}/public/\" }
  - { name: priv, pathPrefix: /priv/, upstream: \"{up}/private/\", scopes: [live] }
  - { name: files, pathPrefix: /files/, upstream: \"{up}/store/\", allowEncodedSlashes: true }
";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        // Served, and under the route's base path whatever the spelling.
        let served = [
            ("/pub/../private/x", None),
            ("/pub/%2e%2e/private/x", None),
            ("/pub/.%2E/private/x", None),
            ("/pub//../private/x", None),
            ("/pub/a/../../private/x", None),
            ("/pub/./%2e/x", Some("/public/x")),
            ("/pub/a/b/../c", Some("/public/a/c")),
            ("/p%75b/x", Some("/public/x")),
            ("/pub/%7Eu", Some("/public/~u")),
        ];
        for (path, want) in served {
            let r = send_raw(h.gw.addr, get(path, &h.test).as_bytes()).await;
            match want {
                // Normalised to /private/x, which no route serves.
                None => assert_eq!(r.status, 404, "{path} (fast path {fast}): {r:?}"),
                Some(want) => {
                    assert_eq!(r.status, 200, "{path} (fast path {fast}): {r:?}");
                    assert_eq!(r.json()["path"], want, "{path}");
                }
            }
        }
        // Into the live-only route by traversal: its own scope rule applies.
        for path in ["/pub/../priv/x", "/pub/%2E%2E/priv/x"] {
            let r = send_raw(h.gw.addr, get(path, &h.test).as_bytes()).await;
            assert_eq!(r.status, 403, "{path}");
            let r = send_raw(h.gw.addr, get(path, &h.live).as_bytes()).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.json()["path"], "/private/x");
        }
        // Ambiguous: refused with the reason, before any key is looked up.
        let refused = [
            "/pub/..%2fprivate/x",
            "/pub/%2e%2e%2Fprivate/x",
            "/pub/..;/private/x",
            "/pub/.;a/x",
            "/pub/%5c..%5cprivate",
            "/pub/%00/x",
            "/pub/%0d%0aX-Injected:%20yes",
            "/pub/%zz",
            "/pub/%4",
            "/pub/%2e%2e%3b/priv",
            "/files/..%2f..%2fprivate/x",
            "/files/a%2F.%2E%2Fb",
        ];
        for path in refused {
            let r = send_raw(h.gw.addr, get(path, &h.test).as_bytes()).await;
            assert_eq!(r.status, 400, "{path} (fast path {fast}): {r:?}");
            assert_eq!(r.json()["code"], "invalid_request_target", "{path}");
            assert!(r.json()["request_id"].is_string());
        }
        // A route that allows encoded slashes passes them on encoded, inside the segment.
        let r = send_raw(h.gw.addr, get("/files/a%2fb/../c", &h.test).as_bytes()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/store/c");
        let r = send_raw(h.gw.addr, get("/files/a%2Fb", &h.test).as_bytes()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/store/a%2Fb");
    }
}

// --- 2. Client-caused failures ----------------------------------------------------------------

/// Malformed chunked bodies, uploads cut off by the client and stalled uploads are the
/// client's: 400, 499 (logged), 408. None counts as an upstream failure, opens the breaker,
/// or shows as a 5xx; other buyers are served throughout.
#[tokio::test]
async fn client_body_failures_never_count_against_the_upstream() {
    let up = start_upstream().await;
    let routes = "  - { name: fragile, pathPrefix: /fragile/, upstream: \"{up}/\", timeout: 300ms,
       breaker: { consecutiveFailures: 2, openFor: 30s, halfOpenProbes: 1 } }
";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "bodyReadTimeout: 700ms", routes, up.addr.unwrap()).await;
        for _ in 0..3 {
            // Not a chunk size.
            let req = post_head(
                "/fragile/echo-body",
                &h.live,
                "Transfer-Encoding: chunked\r\n",
            ) + "zz\r\nhello\r\n0\r\n\r\n";
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 400, "fast path {fast}: {r:?}");
            assert_eq!(r.json()["code"], "malformed_request_body");

            // Stalls after 10 of 100 bytes: answered 408 once the body or route timeout
            // passes, whichever comes first; the upstream is not blamed.
            let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
            let req = post_head("/fragile/echo-body", &h.live, "Content-Length: 100\r\n");
            stream.write_all(req.as_bytes()).await.unwrap();
            stream.write_all(b"0123456789").await.unwrap();
            let r = read_to_close(&mut stream).await;
            assert_eq!(r.status, 408, "fast path {fast}: {r:?}");
            assert_eq!(r.json()["code"], "request_body_timeout");

            // Cut off by the client.
            let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
            stream.write_all(req.as_bytes()).await.unwrap();
            stream.write_all(b"0123456789").await.unwrap();
            drop(stream);
        }
        // Another buyer is served: the breaker never opened.
        let r = send_raw(h.gw.addr, get("/fragile/ok", &h.live).as_bytes()).await;
        assert_eq!(r.status, 200, "fast path {fast}: {r:?}");
        // The cut-off uploads are logged as the client's (499) once the gateway notices.
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.gw.log_text().matches("\"status\":499").count() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = h.gw.log_text();
        assert_eq!(log.matches("\"status\":499").count(), 3, "{log}");
        assert_eq!(log.matches("client_closed_request").count(), 3);
        let text = h.gw.metrics_text().await;
        let fragile = ("route", "fragile");
        let requests = |class| {
            metric(
                &text,
                "apitree_proxy_requests_total",
                &[fragile, ("status_class", class)],
            )
        };
        // 400, 408 and the logged 499 of each round.
        assert_eq!(requests("4xx"), 9.0, "{text}");
        assert_eq!(requests("5xx"), 0.0, "{text}");
        for kind in ["connect", "timeout", "bad_response", "status_5xx"] {
            let errors = [fragile, ("kind", kind)];
            let n = metric(&text, "apitree_proxy_upstream_errors_total", &errors);
            assert_eq!(n, 0.0, "{kind}\n{text}");
        }
        let opens = metric(&text, "apitree_proxy_breaker_opens_total", &[fragile]);
        assert_eq!(opens, 0.0);
        // A real upstream failure still counts.
        let r = send_raw(h.gw.addr, get("/fragile/fail", &h.live).as_bytes()).await;
        assert_eq!(r.status, 500);
        let text = h.gw.metrics_text().await;
        let errors = [("route", "fragile"), ("kind", "status_5xx")];
        let n = metric(&text, "apitree_proxy_upstream_errors_total", &errors);
        assert_eq!(n, 1.0, "{text}");
    }
}

/// A half-open probe whose request is dropped before its outcome (here: shutdown gives up on it
/// after the grace period) gives its permit back, lowers the in-flight gauge and is logged.
#[tokio::test]
async fn a_cancelled_probe_gives_its_permit_back() {
    let up = start_upstream().await;
    let routes = "  - { name: fragile, pathPrefix: /fragile/, upstream: \"{up}/\", timeout: 5s,
       breaker: { consecutiveFailures: 2, openFor: 1s, halfOpenProbes: 1 } }
";
    for fast in BOTH_PATHS {
        let mut h = hardened(fast, "shutdownGrace: 300ms", routes, up.addr.unwrap()).await;
        for _ in 0..2 {
            let r = send_raw(h.gw.addr, get("/fragile/fail", &h.live).as_bytes()).await;
            assert_eq!(r.status, 500);
        }
        let r = send_raw(h.gw.addr, get("/fragile/ok", &h.live).as_bytes()).await;
        assert_eq!(r.status, 503, "open");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The probe: a call the upstream answers after 2 s, cut off by shutdown at 300 ms.
        let before = up.hits.load(std::sync::atomic::Ordering::SeqCst);
        let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
        stream
            .write_all(get("/fragile/slow", &h.live).as_bytes())
            .await
            .unwrap();
        common::until("the probe reached the upstream", || {
            up.hits.load(std::sync::atomic::Ordering::SeqCst) > before
        })
        .await;
        let state = h.gw.gateway.state.current();
        let route = state.routes.iter().find(|r| r.name == "fragile").unwrap();
        let gateway = h.gw.gateway.clone();
        let in_flight = || {
            let text = gateway.metrics.render();
            metric(&text, "apitree_proxy_in_flight_requests", &[])
        };
        assert_eq!(in_flight(), 1.0, "the probe is in flight");
        assert_eq!(route.breaker.state(), BreakerState::HalfOpen);
        assert!(route.breaker.enter(0).0.is_err(), "one probe at a time");
        h.gw.shutdown().await;
        assert_eq!(route.breaker.state(), BreakerState::HalfOpen);
        let (probe, _) = route.breaker.enter(0);
        assert!(probe.is_ok(), "fast path {fast}: the probe was given back");
        assert_eq!(in_flight(), 0.0);
        // The access-log writer is a thread of its own: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.gw.log_text().contains("\"status\":499") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = h.gw.log_text();
        assert!(log.contains("\"status\":499"), "{log}");
    }
}

/// While a breaker is half-open, a client that sends its body slowly cannot take the probe and
/// hold the breaker open for everyone: bodies are read before a probe is handed out, and a
/// bodiless call probes (and closes the breaker) meanwhile.
#[tokio::test]
async fn a_slow_body_cannot_hold_a_half_open_breaker() {
    let up = start_upstream().await;
    let routes = "  - { name: fragile, pathPrefix: /fragile/, upstream: \"{up}/\", timeout: 500ms,
       breaker: { consecutiveFailures: 2, openFor: 1s, halfOpenProbes: 1 } }
";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "bodyReadTimeout: 5s", routes, up.addr.unwrap()).await;
        for _ in 0..2 {
            let r = send_raw(h.gw.addr, get("/fragile/fail", &h.live).as_bytes()).await;
            assert_eq!(r.status, 500);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The attacker: a POST whose body never comes, sent first, to an upstream path that
        // waits for the whole body.
        let mut slow = TcpStream::connect(h.gw.addr).await.unwrap();
        let head = post_head("/fragile/echo-body", &h.live, "Content-Length: 100\r\n");
        slow.write_all(head.as_bytes()).await.unwrap();
        slow.write_all(b"0").await.unwrap();
        // The attacker's request is in the gateway (its head parsed) before anyone else's.
        let gateway = h.gw.gateway.clone();
        common::until("the slow request is in flight", || {
            metric(
                &gateway.metrics.render(),
                "apitree_proxy_in_flight_requests",
                &[],
            ) == 1.0
        })
        .await;
        // Everyone else: served, and the breaker closes.
        for _ in 0..3 {
            let r = send_raw(h.gw.addr, get("/fragile/ok", &h.live).as_bytes()).await;
            assert_eq!(r.status, 200, "fast path {fast}: {r:?}");
        }
        drop(slow);
    }
}

/// A request with different API keys is refused: which one counts would depend on who reads
/// it.
#[tokio::test]
async fn a_request_with_several_keys_is_refused() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        for keys in [
            format!(
                "Authorization: Bearer {}\r\nX-API-Key: {}\r\n",
                h.live, h.test
            ),
            format!("X-API-Key: {}\r\nX-API-Key: {}\r\n", h.test, h.live),
            format!(
                "Authorization: Bearer {}\r\nAuthorization: Bearer {}\r\n",
                h.test, h.live
            ),
        ] {
            let req = format!("GET /api/x HTTP/1.1\r\nHost: g\r\n{keys}Connection: close\r\n\r\n");
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 401, "fast path {fast}: {keys:?}");
            assert_eq!(r.json()["code"], "several_api_keys");
        }
        // The same key in both places is one key.
        let req = format!(
            "GET /api/x HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {k}\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n",
            k = h.live
        );
        assert_eq!(send_raw(h.gw.addr, req.as_bytes()).await.status, 200);
    }
}

// --- 3. Pooled connections and stalled uploads ----------------------------------------------

/// The path and the whole length (head plus `Content-Length` body) of the request at the
/// front of `buf`, once its head is complete.
fn request_at_front(buf: &[u8]) -> Option<(String, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(head)) = req.parse(buf) else {
        return None;
    };
    let length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .unwrap_or(0usize);
    Some((req.path.unwrap_or("/").to_string(), head + length))
}

/// An upstream that answers each request as soon as its head arrives and then reads its body
/// (`Content-Length` framed) before the next request on the same connection, as many APIs do.
async fn answers_before_reading_the_body() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    if let Some((_, whole)) = request_at_front(&buf) {
                        let answer =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"early\":true}\n";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                        while buf.len() < whole {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..whole);
                        continue;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// A client that keeps its socket full of requests (pipelined, each refused at once for want of
/// a key, its answers read as fast as they come) never holds its worker: another client on the
/// same single worker is answered promptly all the while, and the flood's connection is served
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_lets_its_socket_empty_cannot_hold_its_worker() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened_with_workers(fast, "", routes, up.addr.unwrap(), 1).await;
        let flood = TcpStream::connect(h.gw.addr).await.unwrap();
        flood.set_nodelay(true).unwrap();
        let (mut reader, mut writer) = flood.into_split();
        let stop = Arc::new(AtomicBool::new(false));
        let batch = "GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n".repeat(500);
        let writing = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if writer.write_all(batch.as_bytes()).await.is_err() {
                        break;
                    }
                }
            })
        };
        let answered = Arc::new(AtomicUsize::new(0));
        let reading = {
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut sink = vec![0u8; 256 * 1024];
                while let Ok(n) = reader.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                    answered.fetch_add(n, Ordering::Relaxed);
                }
            })
        };
        // The flood is being answered on the single worker.
        common::until("the flood is being answered", || {
            answered.load(Ordering::Relaxed) > 64 * 1024
        })
        .await;
        for i in 0..5 {
            let started = Instant::now();
            let req = format!(
                "GET /api/ok HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
                 Connection: close\r\n\r\n",
                h.live
            );
            let r =
                tokio::time::timeout(Duration::from_secs(5), send_raw(h.gw.addr, req.as_bytes()))
                    .await
                    .unwrap_or_else(|_| panic!("fast path {fast}: request {i} starved for 5 s"));
            assert_eq!(r.status, 200, "fast path {fast}: {r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "fast path {fast}: request {i} took {:?} beside the flood",
                started.elapsed()
            );
        }
        stop.store(true, Ordering::Relaxed);
        writing.abort();
        reading.abort();
        assert!(
            answered.load(Ordering::Relaxed) > 0,
            "fast path {fast}: the flood was never answered"
        );
        drop(h);
    }
}

/// A connection whose request body is still being sent is not handed to the next request.
#[tokio::test]
async fn a_stalled_upload_never_holds_up_another_clients_request() {
    let up = answers_before_reading_the_body().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\", timeout: 2s }\n";
    for fast in BOTH_PATHS {
        // One worker: one upstream pool for both clients.
        let h = hardened_with_workers(fast, "bodyReadTimeout: 20s", routes, up, 1).await;
        // A: answered (the echo upstream does not wait for bodies) while its body stalls.
        let mut a = TcpStream::connect(h.gw.addr).await.unwrap();
        let head = post_head("/api/x", &h.live, "Content-Length: 1000\r\n");
        a.write_all(head.as_bytes()).await.unwrap();
        a.write_all(&[b'a'; 10]).await.unwrap();
        let mut first = [0u8; 12];
        a.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        // B: a body request of its own, answered at once rather than after A's upload.
        let started = Instant::now();
        let req = post_head(
            "/api/y",
            &h.live,
            "Content-Length: 2\r\nConnection: close\r\n",
        ) + "hi";
        let r = send_raw(h.gw.addr, req.as_bytes()).await;
        assert_eq!(r.status, 200, "fast path {fast}: {r:?}");
        assert_eq!(r.json()["early"], true);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        drop(a);
    }
}

// --- 4. Methods -----------------------------------------------------------------------------

/// TRACE and CONNECT are refused for every route (TRACE would echo the injected credential);
/// a route's `methods` list is enforced with 405 and `Allow`, GET bringing HEAD.
#[tokio::test]
async fn trace_connect_and_unlisted_methods_get_405_with_allow() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }
  - { name: ro, pathPrefix: /ro/, upstream: \"{up}/\", methods: [GET, POST] }
";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
        for method in ["TRACE", "CONNECT", "trace", "TRACK"] {
            let req = format!(
                "{method} /api/x HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                h.live
            );
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 405, "{method} (fast path {fast}): {r:?}");
            assert_eq!(r.json()["code"], "method_not_allowed");
            assert_eq!(
                r.header("allow"),
                Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
            );
        }
        assert_eq!(
            up.hits.load(std::sync::atomic::Ordering::SeqCst),
            hits,
            "nothing reached the upstream"
        );
        for (method, want) in [
            ("GET", 200),
            ("HEAD", 200),
            ("POST", 200),
            ("DELETE", 405),
            ("PUT", 405),
            ("OPTIONS", 405),
        ] {
            let req = format!(
                "{method} /ro/x HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                h.live
            );
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, want, "{method} (fast path {fast})");
            if want == 405 {
                assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
            }
        }
    }
}

// --- 5. Upstream responses ------------------------------------------------------------------

/// An upstream on loopback that answers every request with the bytes `script` gives for its
/// path, then closes the connection.
async fn scripted_upstream(script: fn(&str) -> Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (path, wanted) = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(found) = request_at_front(&buf) {
                        break found;
                    }
                };
                // The declared body too, so closing leaves nothing unread.
                while buf.len() < wanted {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(&script(&path)).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

fn misbehaving(path: &str) -> Vec<u8> {
    let text: &str = match path {
        // Both framings: chunked wins, and the stale length must not reach the client.
        "/te-and-cl" => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        "/http10-te" => "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // A chunk-size line ending in a bare LF.
        "/bare-lf" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x\nhello\r\n0\r\n\r\n",
        // Cut off inside a chunk.
        "/cut" => "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n20\r\nonly part of it",
        "/no-content" => "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        "/not-modified" => "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\n",
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    };
    text.as_bytes().to_vec()
}

/// Decodes a chunked body; None when it does not end with the last chunk.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).ok()?, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return body.starts_with(b"\r\n").then_some(out);
        }
        if body.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[tokio::test]
async fn bad_upstream_framing_never_reaches_the_client_as_a_whole_message() {
    let up = scripted_upstream(misbehaving).await;
    let routes = "  - { name: raw, pathPrefix: /raw/, upstream: \"{up}/\" }
  - { name: flagged, pathPrefix: /flagged/, upstream: \"{up}/\", pii: flag }
";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up).await;
        for prefix in ["/raw", "/flagged"] {
            // The body of both framings arrives whole, framed anew, without the stale length,
            // whichever upstream path carried it (a bodiless GET: the fast path; a POST with a
            // body: hyper's client).
            let post = post_head(
                &format!("{prefix}/te-and-cl"),
                &h.live,
                "Content-Length: 2\r\nConnection: close\r\n",
            ) + "hi";
            for req in [get(&format!("{prefix}/te-and-cl"), &h.live), post] {
                let r = send_raw(h.gw.addr, req.as_bytes()).await;
                assert_eq!(r.status, 200, "{prefix} (fast path {fast}): {r:?}");
                assert_ne!(r.header("content-length"), Some("5"), "{prefix}: {r:?}");
                let body = match r.header("transfer-encoding") {
                    Some(_) => dechunk(&r.body).expect("a whole chunked body"),
                    None => r.body.clone(),
                };
                assert_eq!(body, b"hello, world", "{prefix}");
            }

            let r = send_raw(
                h.gw.addr,
                get(&format!("{prefix}/http10-te"), &h.live).as_bytes(),
            )
            .await;
            assert_eq!(r.status, 502, "{prefix}: {r:?}");

            // Cut off (or broken framing) midway: the client sees it cut off, never whole. (A
            // body that fails before its first byte leaves hyper's server nothing to send: the
            // connection closes without an answer.)
            for path in ["cut", "bare-lf"] {
                let req = get(&format!("{prefix}/{path}"), &h.live);
                let Some(r) = send_raw_or_nothing(h.gw.addr, req.as_bytes()).await else {
                    continue;
                };
                if r.status == 502 {
                    continue; // refused before the head went out: also never whole
                }
                assert_eq!(r.status, 200, "{prefix}/{path}: {r:?}");
                let whole = match r.header("content-length") {
                    Some(n) => r.body.len() == n.parse::<usize>().unwrap(),
                    None => dechunk(&r.body).is_some(),
                };
                assert!(
                    !whole,
                    "{prefix}/{path} (fast path {fast}) looked whole: {r:?}"
                );
            }

            for path in ["no-content", "not-modified"] {
                let r = send_raw(
                    h.gw.addr,
                    get(&format!("{prefix}/{path}"), &h.live).as_bytes(),
                )
                .await;
                assert!(matches!(r.status, 204 | 304), "{r:?}");
                assert_eq!(r.header("content-length"), None, "{prefix}/{path}: {r:?}");
                assert!(r.body.is_empty());
            }
        }
    }
}

// --- 6. Requests ----------------------------------------------------------------------------

#[tokio::test]
async fn requests_without_exactly_one_valid_host_are_400() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        let auth = format!("Authorization: Bearer {}\r\nConnection: close\r\n", h.live);
        for (host_lines, want) in [
            ("", 400),
            ("Host: a\r\nHost: b\r\n", 400),
            ("Host: a\r\nHost: a\r\n", 400),
            ("Host: user@gateway\r\n", 400),
            ("Host: gateway:port\r\n", 400),
            ("Host: \r\n", 400),
            ("Host: gateway:8080\r\n", 200),
        ] {
            let req = format!("GET /api/x HTTP/1.1\r\n{host_lines}{auth}\r\n");
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, want, "{host_lines:?} (fast path {fast}): {r:?}");
            if want == 400 && r.header("content-type") == Some("application/json") {
                assert_eq!(r.json()["code"], "invalid_host");
            }
        }
        // HTTP/1.0 needs none.
        let req = format!("GET /api/x HTTP/1.0\r\n{auth}\r\n");
        let r = send_raw(h.gw.addr, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
}

/// A GET, HEAD or DELETE with a chunked body keeps its body on the way up.
#[tokio::test]
async fn bodies_of_get_and_delete_are_forwarded_not_dropped() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        for method in ["GET", "DELETE", "POST"] {
            let req = format!(
                "{method} /api/echo-body HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                h.live
            );
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            assert_eq!(r.status, 200, "{method} (fast path {fast}): {r:?}");
            assert_eq!(r.json()["body"], "hello", "{method} (fast path {fast})");
            assert_eq!(r.json()["method"], method);
        }
    }
}

/// One head-size limit on both client paths: 60 KiB of fields pass, 70 KiB get 431.
#[tokio::test]
async fn request_heads_have_one_size_limit_on_both_paths() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        for (size, want) in [(60 * 1024, 200), (70 * 1024, 431)] {
            for method in ["GET", "POST"] {
                let req = format!(
                    "{method} /api/x HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nX-Big: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    h.live,
                    "a".repeat(size)
                );
                let r = send_raw(h.gw.addr, req.as_bytes()).await;
                assert_eq!(r.status, want, "{method} {size} (fast path {fast})");
            }
        }
    }
}

/// `Connection: close` with bytes still coming from the client: the whole response arrives,
/// no reset (the gateway half-closes and drains briefly, like nginx's lingering close).
#[tokio::test]
async fn a_closing_connection_delivers_the_whole_response_despite_unread_bytes() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        for _ in 0..5 {
            let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
            // 200 KiB of PII records: the response is still in flight when the gateway closes.
            let mut req = get("/api/pii-stream", &h.live).into_bytes();
            req.extend_from_slice(&vec![b'x'; 256 * 1024]);
            let (mut rd, mut wr) = stream.split();
            let writing = async {
                let _ = wr.write_all(&req).await;
            };
            let reading = async {
                let mut buf = Vec::new();
                let res = rd.read_to_end(&mut buf).await;
                (buf, res.is_err())
            };
            let ((), (buf, reset)) = tokio::join!(writing, reading);
            let r = parse_raw(&buf, reset);
            assert_eq!(r.status, 200, "fast path {fast}");
            assert!(
                !r.reset,
                "fast path {fast}: reset after {} bytes",
                r.body.len()
            );
            let len: usize = r.header("content-length").unwrap().parse().unwrap();
            assert_eq!(r.body.len(), len, "fast path {fast}: the whole body");
        }
    }
}

/// On hyper's path an idle kept-alive connection lasts `keepAliveTimeout` (not
/// `headerReadTimeout`), a started head must be whole within `headerReadTimeout`, and a POST
/// followed by a half-close is answered.
#[tokio::test]
async fn hyper_path_connections_follow_the_keep_alive_and_header_read_rules() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    let top = "headerReadTimeout: 1s\nkeepAliveTimeout: 3s";
    for fast in BOTH_PATHS {
        let h = hardened(fast, top, routes, up.addr.unwrap()).await;
        let post = post_head("/api/echo-body", &h.live, "Content-Length: 2\r\n") + "hi";
        let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
        stream.write_all(post.as_bytes()).await.unwrap();
        answered(&mut stream).await;
        // Idle for 2 s: longer than headerReadTimeout, shorter than keepAliveTimeout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stream.write_all(post.as_bytes()).await.unwrap();
        answered(&mut stream).await;
        // A head begun and stalled: cut at headerReadTimeout (1 s), long before keep-alive.
        stream
            .write_all(b"POST /api/x HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(800) && waited < Duration::from_millis(2500),
            "fast path {fast}: closed after {waited:?}"
        );

        // Half-closed after the request: still answered.
        let mut stream = TcpStream::connect(h.gw.addr).await.unwrap();
        stream.write_all(post.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let r = read_to_close(&mut stream).await;
        assert_eq!(r.status, 200, "fast path {fast}: {r:?}");
    }
}

/// A client that stops reading a big response has its connection closed `sendTimeout` after
/// it last took a byte, so it cannot hold the request's upstream connection for as long as it
/// likes; a client that reads slowly but steadily for longer than that gets its response.
/// (Over TLS, HTTP/1.1 and HTTP/2: tests/tls.rs.)
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/\" }\n";
    for fast in BOTH_PATHS {
        let h = hardened(fast, "sendTimeout: 1s", routes, up.addr.unwrap()).await;
        let request = get("/api/big", &h.live);
        let mut steady = TcpStream::connect(h.gw.addr).await.unwrap();
        steady.write_all(request.as_bytes()).await.unwrap();
        let mut stalled = small_window(h.gw.addr).await;
        stalled.write_all(request.as_bytes()).await.unwrap();

        // 3 s of a steady reader (256 KiB, then a 50 ms pause), three times the send timeout.
        let started = Instant::now();
        let mut steady_got = 0;
        let mut chunk = vec![0; 256 * 1024];
        while started.elapsed() < Duration::from_secs(3) {
            tokio::time::timeout(Duration::from_secs(2), steady.read_exact(&mut chunk))
                .await
                .expect("the steady reader gets data")
                .unwrap_or_else(|e| {
                    panic!("fast path {fast}: steady reader cut off after {steady_got} bytes: {e}")
                });
            steady_got += chunk.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // By now the stalled request is over: only the steady one holds an upstream body.
        assert_eq!(
            up.big_open.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "fast path {fast}: upstream bodies being sent"
        );
        // The stalled client finds its response cut off, short of the body.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut got))
            .await
            .expect("the stalled connection is closed");
        assert!(
            got.len() < BIG_BODY,
            "fast path {fast}: the stalled client got {} bytes",
            got.len()
        );
        drop(steady);
    }
}

/// A connection whose receive buffer is small, so the sender's writes block soon.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the `/echo-body` answer to a POST has arrived whole.
async fn answered(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    while !buf.ends_with(b"\"method\":\"POST\"}") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

// --- 7. Overload ----------------------------------------------------------------------------
// (The bounded accept queue and its 503 are tested beside `workers::Dispatch`.)

/// With the fast path off the gateway answers the same requests the same way: a smoke check of
/// the switch over the ordinary cases (the tests above run both ways too).
#[tokio::test]
async fn the_fast_path_switch_changes_no_answer() {
    let up = start_upstream().await;
    let routes = "  - { name: api, pathPrefix: /api/, upstream: \"{up}/v1/\", scopes: [live] }\n";
    let mut answers = Vec::new();
    for fast in BOTH_PATHS {
        let h = hardened(fast, "", routes, up.addr.unwrap()).await;
        let mut seen = Vec::new();
        for req in [
            get("/api/x?q=1", &h.live),
            get("/api/x", &h.test),
            get("/api/x", "at_live_nope"),
            get("/nowhere", &h.live),
            format!(
                "HEAD /api/x HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                h.live
            ),
        ] {
            let r = send_raw(h.gw.addr, req.as_bytes()).await;
            let code = serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v.get("code").cloned());
            let path = serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v.get("path").cloned());
            seen.push((r.status, code, path));
        }
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0][0].0, 200);
    assert_eq!(answers[0][1].0, 403);
    assert_eq!(answers[0][2].0, 401);
    assert_eq!(answers[0][3].0, 404);
}
