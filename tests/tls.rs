//! TLS on the gateway's public listener, with real certificates made by openssl: TLS 1.3 by
//! default, HTTP/2 and HTTP/1.1 through the same policies, HSTS on every response, and a
//! certificate renewed in place without a restart.

mod common;

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use apitree::crd::gateway::KeyScope;
use common::gateway::*;
use common::pki::Pki;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};

const HSTS: &str = "max-age=31536000; includeSubDomains";

struct TlsGateway {
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    live: String,
    /// The upstream's `/big` bodies being sent now.
    big_open: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests the upstream has received.
    hits: Arc<std::sync::atomic::AtomicUsize>,
    /// Two more keys, each used on the rate-limited route by one protocol only.
    spare: [String; 2],
}

/// A gateway from a config file in the PKI's directory (`tls:` names tls.crt and tls.key),
/// with `tls_extra` added to its `tls:` block.
async fn start(pki: &Pki, tls_extra: &str) -> TlsGateway {
    start_with_redis(pki, tls_extra, None).await
}

/// [`start`] with rate limits shared through Redis at a URL, verified against a CA file.
async fn start_with_redis(
    pki: &Pki,
    tls_extra: &str,
    redis: Option<(String, Option<PathBuf>)>,
) -> TlsGateway {
    start_full(pki, tls_extra, "", redis).await
}

/// [`start_with_redis`] with top-level settings `top` (YAML lines).
async fn start_full(
    pki: &Pki,
    tls_extra: &str,
    top: &str,
    redis: Option<(String, Option<PathBuf>)>,
) -> TlsGateway {
    install_crypto();
    let up = start_upstream().await;
    let (upstream, big_open, hits) = (up.addr.unwrap(), up.big_open.clone(), up.hits.clone());
    let (live, live_entry) = key_entry(KeyScope::Live, "acme", "");
    let (spare_a, spare_a_entry) = key_entry(KeyScope::Live, "acme", "");
    let (spare_b, spare_b_entry) = key_entry(KeyScope::Live, "acme", "");
    std::fs::write(pki.path("pepper"), PEPPER).unwrap();
    let yaml = format!(
        "secrets: {{ pepperFile: pepper }}
{top}
tls: {{ certFile: tls.crt, keyFile: tls.key{tls_extra} }}
tiers:
  - {{ name: std, perKey: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }}, perOrg: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }} }}
  - {{ name: small, perKey: {{ burst10s: 2, perMinute: 100, perDay: 1000 }}, perOrg: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }} }}
defaultTier: std
orgs: [{{ id: acme }}]
keys:
{live_entry}{spare_a_entry}{spare_b_entry}routes:
  - {{ name: api, pathPrefix: /api/, upstream: \"http://{upstream}/\" }}
  - {{ name: limited, pathPrefix: /limited/, upstream: \"http://{upstream}/\", tier: small }}
  - {{ name: masked, pathPrefix: /masked/, upstream: \"http://{upstream}/\", pii: mask }}
"
    );
    let cfg = pki.path("proxy.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let (redis_url, redis_ca_file) = redis.unzip();
    let opts = apitree::proxy::ProxyOptions {
        redis_url,
        redis_ca_file: redis_ca_file.flatten(),
        ..proxy_options(cfg)
    };
    let p = apitree::proxy::prepare(&opts)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, admin) = (
        p.listener.local_addr().unwrap(),
        p.admin.local_addr().unwrap(),
    );
    tokio::spawn(apitree::proxy::transport::workers::run(
        p.gateway,
        p.listener,
        p.admin,
        std::future::pending(),
        p.settings,
    ));
    TlsGateway {
        addr,
        admin,
        live: live.expose_secret().to_string(),
        big_open,
        hits,
        spare: [spare_a, spare_b].map(|k| k.expose_secret().to_string()),
    }
}

/// An https client that trusts the test CA; `h2`: HTTP/2 by ALPN, else HTTP/1.1 only.
fn https_client(pki: &Pki, h2: bool) -> reqwest::Client {
    install_crypto();
    let ca = reqwest::Certificate::from_pem(&pki.ca()).unwrap();
    let b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_idle_timeout(Duration::from_secs(60));
    let b = if h2 { b } else { b.http1_only() };
    b.build().unwrap()
}

/// A raw TLS handshake offering only `versions`: the certificate the gateway presented and the
/// version agreed, or the handshake's error.
async fn handshake(
    pki: &Pki,
    addr: std::net::SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(Vec<u8>, rustls::ProtocolVersion), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let session = tls.get_ref().1;
    Ok((
        session.peer_certificates().unwrap()[0].to_vec(),
        session.protocol_version().unwrap(),
    ))
}

/// GET `path` on the gateway's admin port.
async fn admin(gw: &TlsGateway, path: &str) -> reqwest::Response {
    client()
        .get(format!("http://{}{path}", gw.admin))
        .send()
        .await
        .unwrap()
}

async fn metrics(gw: &TlsGateway) -> String {
    admin(gw, "/metrics").await.text().await.unwrap()
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

async fn readiness(gw: &TlsGateway) -> serde_json::Value {
    admin(gw, "/readyz").await.json().await.unwrap()
}

/// HTTP/2 and HTTP/1.1 over TLS 1.3 get the same answers from the same policies (auth, rate
/// limits, PII masking), and every response — the upstream's and the gateway's own refusals —
/// carries HSTS.
#[tokio::test]
async fn http2_and_http1_over_tls_pass_the_same_policies_and_every_response_carries_hsts() {
    let pki = Pki::serving();
    let gw = start(&pki, "").await;
    for h2 in [true, false] {
        let c = https_client(&pki, h2);
        let want = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        let url = |path: &str| format!("https://127.0.0.1:{}{path}", gw.addr.port());
        let checks: Vec<(&str, Option<&str>, u16)> = vec![
            ("/api/hello", Some(gw.live.as_str()), 200),
            ("/api/hello", None, 401),
            (
                "/api/hello",
                Some("at_live_notakeyatall0000000000000000000000"),
                401,
            ),
            ("/nowhere/", Some(gw.live.as_str()), 404),
            ("/api/a%2Fb", Some(gw.live.as_str()), 400),
        ];
        for (path, key, status) in checks {
            let mut req = c.get(url(path));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.version(), want);
            assert_eq!(resp.status().as_u16(), status, "{path} over {want:?}");
            assert_eq!(
                resp.headers()
                    .get("strict-transport-security")
                    .map(|v| v.to_str().unwrap()),
                Some(HSTS),
                "{path} ({status}) over {want:?}"
            );
        }
        // The upstream gets the request as HTTP/1.1 with the route's host, never the key.
        let seen: serde_json::Value = c
            .get(url("/api/echo?q=1"))
            .bearer_auth(&gw.live)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
        let seen = seen.to_string();
        assert!(
            !seen.contains(&gw.live),
            "the buyer's key reached the upstream: {seen}"
        );
        // A request body goes through (hyper's upstream client, HTTP/1.1 upstream-side).
        let echoed: serde_json::Value = c
            .post(url("/api/echo-body"))
            .bearer_auth(&gw.live)
            .body("hello over tls")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echoed["method"], "POST");
        assert_eq!(echoed["body"], "hello over tls", "over {want:?}");
        // A body of unknown length (HTTP/2 DATA frames without content-length; chunked over
        // HTTP/1.1) arrives whole.
        let chunks: Vec<Result<&'static str, std::io::Error>> =
            vec![Ok("streamed "), Ok("in "), Ok("pieces")];
        let echoed: serde_json::Value = c
            .post(url("/api/echo-body"))
            .bearer_auth(&gw.live)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echoed["body"], "streamed in pieces", "over {want:?}");
        if h2 {
            // HTTP/2 may split cookies into fields; HTTP/1.1 servers read one Cookie line.
            let seen: serde_json::Value = c
                .get(url("/api/echo"))
                .bearer_auth(&gw.live)
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(seen["headers"]["cookie"], "a=1; b=2");
        }
        // PII is masked the same way.
        let body = c
            .get(url("/masked/pii"))
            .bearer_auth(&gw.live)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(RRN), "{body}");
        assert!(body.contains("900101-1******"), "{body}");
        // The rate limit counts requests whatever the protocol: 2 per 10 s on `limited`.
        let key = &gw.spare[usize::from(h2)];
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let resp = c
                .get(url("/limited/x"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert!(resp.headers().contains_key("strict-transport-security"));
            statuses.push(resp.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 429], "over {want:?}");
    }
    // Plain HTTP on the TLS port gets nothing served.
    let plain = client()
        .get(format!("http://{}/api/hello", gw.addr))
        .bearer_auth(&gw.live)
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

/// Reads one HTTP/1.1 response (a `content-length` body, or one that ends with the
/// connection): its head and body.
async fn read_h1_response(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    head_request: bool,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            let len = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().unwrap())
                })
                .filter(|_| !head_request && !head.starts_with("HTTP/1.1 204"));
            let want = end + 4 + len.unwrap_or(0);
            if len.is_some() || head.starts_with("HTTP/1.1 204") || head_request {
                while buf.len() < want {
                    let n = io.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the connection ended inside a body: {head}");
                    buf.extend_from_slice(&chunk[..n]);
                }
                return (head, buf[end + 4..want].to_vec());
            }
        }
        let n = io.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
            return (format!("{head}\r\n\r\n"), body.as_bytes().to_vec());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How many `Strict-Transport-Security` fields a head carries, and whether each says `HSTS`.
fn hsts_fields(head: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("strict-transport-security"))
        .map(|(_, value)| value.trim().to_string())
        .collect()
}

/// The answers hyper makes itself over HTTP/1.1 (a head it cannot parse: 400; a head too big:
/// 431), before or after a served request on the same connection, carry HSTS like every other
/// answer, once; and the gateway's own responses are never touched on the way: one field on an
/// empty 204 and on a HEAD answer, and a body that itself reads like a response head, sent
/// after its head, arrives byte for byte.
#[tokio::test]
async fn the_answers_hyper_makes_itself_carry_hsts_and_nothing_else_is_altered() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::serving();
    let gw = start(&pki, "").await;
    let huge = "x".repeat(80 * 1024);
    let malformed = "GET /api/echo HTTP/1.1\r\nHost: gw\r\nno colon here\r\n\r\n".to_string();
    let too_big = format!("GET /api/echo HTTP/1.1\r\nHost: gw\r\nX-Big: {huge}\r\n\r\n");
    for (bad, status) in [(&malformed, "400"), (&too_big, "431")] {
        for after_a_request in [false, true] {
            let mut io = tls_connect(&pki, gw.addr, b"http/1.1", false).await;
            if after_a_request {
                let ok = format!(
                    "GET /api/hello HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
                    gw.live
                );
                io.write_all(ok.as_bytes()).await.unwrap();
                let (head, _) = read_h1_response(&mut io, false).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                assert_eq!(hsts_fields(&head), [HSTS], "{head}");
            }
            io.write_all(bad.as_bytes()).await.unwrap();
            let (head, _) = read_h1_response(&mut io, false).await;
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}")),
                "{status} expected (after a request: {after_a_request}): {head}"
            );
            assert_eq!(hsts_fields(&head), [HSTS], "{head}");
        }
    }
    // The gateway's own answers, several on one connection: untouched.
    let mut io = tls_connect(&pki, gw.addr, b"http/1.1", false).await;
    let mimic = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let requests = [
        ("GET", "/api/no-content", "", "204"),
        ("HEAD", "/api/hello", "", "200"),
        ("POST", "/api/raw-late", mimic, "200"),
        ("GET", "/nowhere/", "", "404"),
        ("POST", "/api/raw-late", mimic, "200"),
    ];
    for (method, path, body, status) in requests {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
            gw.live,
            body.len()
        );
        io.write_all(req.as_bytes()).await.unwrap();
        let (head, got) = read_h1_response(&mut io, method == "HEAD").await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{method} {path}: {head}"
        );
        assert_eq!(hsts_fields(&head), [HSTS], "{method} {path}: {head}");
        if path == "/api/raw-late" {
            assert_eq!(String::from_utf8_lossy(&got), mimic, "{head}");
        }
    }
}

/// TLS 1.3 only by default: a client offering only TLS 1.2 is refused and counted;
/// `minVersion: "1.2"` lets it in.
#[tokio::test]
async fn tls_12_clients_are_refused_unless_min_version_allows_them() {
    let pki = Pki::serving();
    let strict = start(&pki, "").await;
    // A TCP health check (connect, close) is not a failed handshake. The gateway has dealt with
    // it once it closes its end too.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut probe = tokio::net::TcpStream::connect(strict.addr).await.unwrap();
        probe.shutdown().await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), probe.read(&mut [0u8; 1])).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the gateway closed the probe: {read:?}"
        );
    }
    let old_client = handshake(&pki, strict.addr, &[&rustls::version::TLS12]).await;
    assert!(old_client.is_err(), "TLS 1.2 accepted by default");
    let (_, version) = handshake(&pki, strict.addr, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    let failures = "apitree_proxy_tls_handshake_failures_total ";
    common::eventually("the refused handshake counted", || {
        let strict = &strict;
        async move { metric(&metrics(strict).await, failures) == Some(1.0) }
    })
    .await;
    let m = metrics(&strict).await;
    assert_eq!(
        metric(&m, "apitree_proxy_tls_handshake_failures_total "),
        Some(1.0),
        "{m}"
    );

    let lenient = start(&pki, ", minVersion: \"1.2\"").await;
    let (_, version) = handshake(&pki, lenient.addr, &[&rustls::version::TLS12])
        .await
        .unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    let (_, version) = handshake(
        &pki,
        lenient.addr,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
    .await
    .unwrap();
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
}

/// A TLS connection to the gateway trusting the test CA, offering `alpn`; with a small
/// receive buffer when `small_window`.
async fn tls_connect(
    pki: &Pki,
    addr: std::net::SocketAddr,
    alpn: &[u8],
    small_window: bool,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if small_window {
        socket.set_recv_buffer_size(8 * 1024).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// An HTTP/2 client connection over [`tls_connect`]; `ping`: PINGs every 200 ms, idle or not.
/// The connection's task ends with the connection (Ok: closed with a GOAWAY).
async fn h2_connect(
    pki: &Pki,
    addr: std::net::SocketAddr,
    ping: bool,
    window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let io = hyper_util::rt::TokioIo::new(tls_connect(pki, addr, b"h2", false).await);
    let mut b = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new());
    if ping {
        b.keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true);
    }
    if let Some(window) = window {
        b.initial_stream_window_size(window);
    }
    let (send, conn) = b.handshake(io).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_get(path: &str, key: &str) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    hyper::Request::get(format!("https://127.0.0.1{path}"))
        .header("authorization", format!("Bearer {key}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Over TLS, a client that stops taking a big response is cut off `sendTimeout` after it last
/// took a byte, so it cannot hold upstream connections: on HTTP/1.1 (a full socket) and on
/// HTTP/2 (streams whose flow-control window the client never opens, several on one
/// connection, also when the body comes after the head), while an HTTP/2 client that reads
/// steadily for longer keeps its response. An idle HTTP/2 connection closes with a GOAWAY at
/// `keepAliveTimeout` after its last request: PINGs neither cut it at `headerReadTimeout` nor
/// keep it open.
#[tokio::test]
async fn stalled_readers_are_cut_off_on_both_protocols_and_pings_do_not_keep_a_connection() {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::serving();
    let top = "sendTimeout: 1s\nheaderReadTimeout: 1s\nkeepAliveTimeout: 3s";
    let gw = start_full(&pki, "", top, None).await;

    // HTTP/1.1: a request, then nothing read.
    let mut h1 = tls_connect(&pki, gw.addr, b"http/1.1", true).await;
    let head = format!(
        "GET /api/big HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
        gw.live
    );
    h1.write_all(head.as_bytes()).await.unwrap();
    // HTTP/2: four streams whose bodies are never read, so their windows never reopen.
    let (mut stalled, stalled_conn) = h2_connect(&pki, gw.addr, false, None).await;
    let mut held = Vec::new();
    // Four responses on `conn`, held unread.
    let hold =
        async |conn: &mut hyper::client::conn::http2::SendRequest<_>, path, held: &mut Vec<_>| {
            for _ in 0..4 {
                let resp = conn.send_request(h2_get(path, &gw.live)).await.unwrap();
                assert_eq!(resp.status(), 200);
                held.push(resp);
            }
        };
    hold(&mut stalled, "/api/big", &mut held).await;
    // HTTP/2 with every stream window closed from the start, and bodies that begin 300 ms
    // after their heads: the piece that cannot be sent turns up in the stream's own task while
    // the connection's task has nothing to do.
    let (mut shut, shut_conn) = h2_connect(&pki, gw.addr, false, Some(0)).await;
    hold(&mut shut, "/api/late-big", &mut held).await;
    // HTTP/2: one stream read steadily.
    let (mut steady, _steady_conn) = h2_connect(&pki, gw.addr, false, None).await;
    let mut body = steady
        .send_request(h2_get("/api/big", &gw.live))
        .await
        .unwrap()
        .into_body();
    assert_eq!(gw.big_open.load(SeqCst), 10, "every body is being sent");

    let started = std::time::Instant::now();
    let mut steady_got = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("the steady stream gets data")
            .unwrap_or_else(|| panic!("steady stream ended after {steady_got} bytes"))
            .unwrap_or_else(|e| panic!("steady stream cut off after {steady_got} bytes: {e}"));
        steady_got += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        gw.big_open.load(SeqCst),
        1,
        "only the steady stream's upstream body is still being sent"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), stalled_conn)
        .await
        .expect("the stalled HTTP/2 connection is closed");
    assert!(ended.is_ok());
    let ended = tokio::time::timeout(Duration::from_secs(5), shut_conn)
        .await
        .expect("the HTTP/2 connection with late bodies is closed");
    assert!(ended.is_ok());
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), h1.read_to_end(&mut got))
        .await
        .expect("the stalled HTTP/1.1 connection is closed");
    assert!(
        got.len() < BIG_BODY,
        "the HTTP/1.1 client got {} bytes",
        got.len()
    );
    drop((held, body));

    // Idle HTTP/2 with PINGs every 200 ms: open past headerReadTimeout (1 s), closed with a
    // GOAWAY near keepAliveTimeout (3 s) after its only request.
    let (mut pinging, conn) = h2_connect(&pki, gw.addr, true, None).await;
    let resp = pinging
        .send_request(h2_get("/api/x", &gw.live))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("an idle connection is closed however often the client PINGs")
        .unwrap();
    let lasted = idle.elapsed();
    assert!(
        lasted >= Duration::from_millis(2500) && lasted < Duration::from_millis(5500),
        "closed after {lasted:?}"
    );
    assert!(closed.is_ok(), "closed with a GOAWAY, not cut: {closed:?}");
}

/// `tls.redirect`, run as `apitree proxy` runs it: a plain-HTTP listener beside the TLS one
/// answers every request 308 to https, same host and target, at `httpsPort`; nothing reaches
/// the upstream, a request without a valid Host gets a JSON 400, and redirects are counted.
#[tokio::test]
async fn plain_http_is_redirected_to_https_and_never_served() {
    let pki = Pki::serving();
    install_crypto();
    let up = start_upstream().await;
    let (live, live_entry) = key_entry(KeyScope::Live, "acme", "");
    std::fs::write(pki.path("pepper"), PEPPER).unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (tls_addr, admin, plain) = (free(), free(), free());
    let yaml = format!(
        "listen: \"{tls_addr}\"
admin: \"{admin}\"
secrets: {{ pepperFile: pepper }}
tls: {{ certFile: tls.crt, keyFile: tls.key, redirect: {{ listen: \"{plain}\", httpsPort: 8443 }} }}
tiers:
  - {{ name: std, perKey: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }}, perOrg: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }} }}
defaultTier: std
orgs: [{{ id: acme }}]
keys:
{live_entry}routes:
  - {{ name: api, pathPrefix: /api/, upstream: \"http://{}/\" }}
",
        up.addr.unwrap()
    );
    std::fs::write(pki.path("proxy.yaml"), yaml).unwrap();
    let opts = apitree::proxy::ProxyOptions {
        listen: None,
        admin: None,
        ..proxy_options(pki.path("proxy.yaml"))
    };
    tokio::spawn(async move {
        apitree::proxy::serve(opts, std::future::pending())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let plain_client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut answered = None;
    for _ in 0..50 {
        let sent = plain_client
            .post(format!("http://{plain}/api/orders?id=7"))
            .header("host", "api.example.com:80")
            .header("authorization", format!("Bearer {}", live.expose_secret()))
            .body("{}")
            .send()
            .await;
        if let Ok(r) = sent {
            answered = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = answered.expect("the redirect listener answers");
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        "https://api.example.com:8443/api/orders?id=7"
    );
    assert!(
        r.headers().get("strict-transport-security").is_none(),
        "HSTS only over TLS"
    );

    // No valid Host: nowhere to send the client.
    let mut raw = tokio::net::TcpStream::connect(plain).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET /api/x HTTP/1.1\r\nHost: a b\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"code\":\"bad_host\""), "{text}");

    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was served"
    );
    let text = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "apitree_proxy_https_redirects_total "),
        Some(1.0)
    );
    // The TLS listener serves as before.
    let r = https_client(&pki, false)
        .get(format!("https://127.0.0.1:{}/api/x", tls_addr.port()))
        .bearer_auth(live.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The gate's smoke probes call a gateway with `spec.tls` over https, trusting only the CA in
/// the gateway's Secret and verifying `serverName` (default: the preview endpoint's host);
/// a name not on the certificate, another CA, or a Secret without the CA fails the check with
/// a reason that says what to fix. Verification cannot be turned off.
#[tokio::test]
async fn smoke_probes_reach_a_tls_gateway_verified_against_its_ca_only() {
    use apitree::crd::gateway::{ApiGatewaySpec, CheckPhase};
    use apitree::gate::GateCheck;
    use apitree::operator::gateway::probes::{run, ProbeTarget, SecretResolver};
    let pki = Pki::serving();
    let other = Pki::new();
    let gw = start(&pki, "").await;
    let probe = |tls: serde_json::Value, ca: Option<Vec<u8>>| {
        let live = gw.live.clone();
        let base = format!("https://127.0.0.1:{}", gw.addr.port());
        async move {
            let spec: ApiGatewaySpec = serde_json::from_value(serde_json::json!({
                "proxy": {"routes": [{"name": "api", "pathPrefix": "/api/", "upstream": "http://127.0.0.1:9/"}]},
                "gate": {"smoke": [{"name": "orders", "path": "/api/x", "apiKey": {"name": "keys", "key": "live"}}]},
                "tls": tls,
            }))
            .unwrap();
            let secrets: Arc<SecretResolver> =
                Arc::new(move |r| match (r.name.as_str(), r.key.as_str()) {
                    ("keys", "live") => Some(live.clone()),
                    ("gw-tls", "ca.crt") => ca.clone().map(|c| String::from_utf8(c).unwrap()),
                    _ => None,
                });
            run(
                GateCheck::Smoke,
                &ProbeTarget {
                    http: &reqwest::Client::new(),
                    spec: &spec,
                    revision: "rev",
                    preview_url: Some(base),
                    admin_urls: Vec::new(),
                    secrets: secrets.as_ref(),
                },
            )
            .await
        }
    };
    let ca = Some(pki.ca());
    // The preview endpoint's own host (an IP on the certificate), then a DNS name on it.
    for tls in [
        serde_json::json!({"secretName": "gw-tls"}),
        serde_json::json!({"secretName": "gw-tls", "serverName": "localhost"}),
    ] {
        let r = probe(tls.clone(), ca.clone()).await;
        assert_eq!(r.phase, CheckPhase::Passed, "{tls}: {}", r.reason);
        assert_eq!(r.observed.as_deref(), Some("2/2 probes passed"));
    }
    let wrong_name = probe(
        serde_json::json!({"secretName": "gw-tls", "serverName": "gw.example.com"}),
        ca.clone(),
    )
    .await;
    assert_eq!(wrong_name.phase, CheckPhase::Failed);
    assert!(
        wrong_name.reason.contains("certificate")
            && wrong_name.reason.contains("spec.tls.serverName"),
        "{}",
        wrong_name.reason
    );
    let wrong_ca = probe(
        serde_json::json!({"secretName": "gw-tls"}),
        Some(other.ca()),
    )
    .await;
    assert_eq!(wrong_ca.phase, CheckPhase::Failed);
    assert!(
        wrong_ca.reason.contains("certificate") && wrong_ca.reason.contains("spec.tls.caKey"),
        "{}",
        wrong_ca.reason
    );
    let no_ca = probe(serde_json::json!({"secretName": "gw-tls"}), None).await;
    assert_eq!(no_ca.phase, CheckPhase::Failed);
    assert!(
        no_ca.reason.contains("Secret gw-tls has no key \"ca.crt\""),
        "{}",
        no_ca.reason
    );
}

/// With `spec.tls` the operator calls each replica's admin port over https as it calls the
/// preview endpoint: the gate's health check and the metric scrape (analysis, detector) trust
/// only the CA in the gateway's Secret and verify `serverName` (default: the preview endpoint's
/// host) while connecting to the replica's own address; another CA fails both, saying what to
/// check.
#[tokio::test]
async fn health_checks_and_scrapes_reach_tls_admin_ports_verified_against_the_ca() {
    use apitree::crd::gateway::{ApiGatewaySpec, CheckPhase};
    use apitree::detect::source::ScrapeSource;
    use apitree::gate::GateCheck;
    use apitree::operator::gateway::probes::{metric_targets, run, ProbeTarget, SecretResolver};
    let pki = Pki::serving();
    let other = Pki::new();
    let gw = start_full(&pki, "", "adminTls: true", None).await;
    let admin = format!("https://127.0.0.1:{}", gw.admin.port());
    let http = reqwest::Client::new();
    // The gate's health check of one replica.
    let health =
        async |spec: &ApiGatewaySpec, preview_url, admin: &str, secrets: &SecretResolver| {
            let target = ProbeTarget {
                http: &http,
                spec,
                revision: "rev",
                preview_url,
                admin_urls: vec![admin.to_string()],
                secrets,
            };
            run(GateCheck::Health, &target).await
        };
    // (spec.tls, preview URL, CA in the Secret): passes?
    let cases = [
        (json_tls(None), "127.0.0.1", pki.ca(), true),
        // The preview's host is the name verified, at the replica's address.
        (json_tls(None), "localhost", pki.ca(), true),
        (json_tls(Some("localhost")), "127.0.0.1", pki.ca(), true),
        (
            json_tls(Some("gw.example.com")),
            "127.0.0.1",
            pki.ca(),
            false,
        ),
        (json_tls(None), "127.0.0.1", other.ca(), false),
    ];
    for (tls, preview_host, ca, passes) in cases {
        let spec: ApiGatewaySpec = serde_json::from_value(serde_json::json!({
            "proxy": {"routes": [{"name": "api", "pathPrefix": "/api/", "upstream": "http://127.0.0.1:9/"}]},
            "tls": tls,
        }))
        .unwrap();
        let ca = String::from_utf8(ca).unwrap();
        let secrets: Arc<SecretResolver> =
            Arc::new(move |r| (r.name == "gw-tls" && r.key == "ca.crt").then(|| ca.clone()));
        let preview = format!("https://{preview_host}:{}", gw.addr.port());
        let health = health(&spec, Some(preview.clone()), &admin, secrets.as_ref()).await;
        let scrape = ScrapeSource::with_targets(
            metric_targets(
                &http,
                &spec,
                secrets.as_ref(),
                std::slice::from_ref(&admin),
                Some(&preview),
            )
            .await
            .unwrap(),
        )
        .snapshot()
        .await;
        let case = format!("{tls} via {preview_host}");
        if passes {
            assert_eq!(
                health.phase,
                CheckPhase::Passed,
                "{case}: {}",
                health.reason
            );
            assert_eq!(health.observed.as_deref(), Some("1/1 replicas ready"));
            assert!(scrape.is_ok(), "{case}: {:?}", scrape.err());
        } else {
            assert_eq!(health.phase, CheckPhase::Failed, "{case}");
            assert!(
                health.reason.contains(&admin)
                    && health.reason.contains("certificate")
                    && health.reason.contains("spec.tls.caKey"),
                "{case}: {}",
                health.reason
            );
            let err = scrape.expect_err(&case).to_string();
            assert!(
                err.contains(&format!("{admin}/metrics")) && err.contains("certificate"),
                "{case}: {err}"
            );
        }
    }
    // Without spec.tls the operator would speak plain HTTP: the TLS admin port serves nothing.
    let spec: ApiGatewaySpec = serde_json::from_value(serde_json::json!({
        "proxy": {"routes": [{"name": "api", "pathPrefix": "/api/", "upstream": "http://127.0.0.1:9/"}]},
    }))
    .unwrap();
    let plain = format!("http://127.0.0.1:{}", gw.admin.port());
    let health = health(&spec, None, &plain, &|_| None).await;
    assert_eq!(health.phase, CheckPhase::Failed);
}

fn json_tls(server_name: Option<&str>) -> serde_json::Value {
    match server_name {
        Some(n) => serde_json::json!({"secretName": "gw-tls", "serverName": n}),
        None => serde_json::json!({"secretName": "gw-tls"}),
    }
}

/// `adminTls: true`: `/readyz` and `/metrics` over TLS with the listener's certificate and
/// HSTS; plain HTTP to the admin port gets nothing; `adminTls` without `tls` is refused.
#[tokio::test]
async fn the_admin_port_serves_over_tls_when_asked() {
    let pki = Pki::serving();
    let gw = start_full(&pki, "", "adminTls: true", None).await;
    let https = https_client(&pki, false);
    for path in ["/readyz", "/metrics"] {
        let r = https
            .get(format!("https://127.0.0.1:{}{path}", gw.admin.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["strict-transport-security"], HSTS, "{path}");
    }
    assert!(
        client()
            .get(format!("http://{}/readyz", gw.admin))
            .send()
            .await
            .is_err(),
        "plain HTTP to a TLS admin port gets no answer"
    );
    std::fs::write(
        pki.path("plain.yaml"),
        "adminTls: true\nsecrets: { pepperFile: pepper }\n",
    )
    .unwrap();
    let err = apitree::proxy::prepare(&proxy_options(pki.path("plain.yaml")))
        .await
        .err()
        .expect("adminTls without tls is refused")
        .to_string();
    assert!(
        err.contains("adminTls") && err.contains("needs tls"),
        "{err}"
    );
}

/// A renewed certificate written over the files reaches new connections within seconds, with
/// no restart, while a request in flight on an old connection completes; the expiry metric
/// follows. A pair that does not fit (the key of another certificate) is refused: the
/// previous certificate keeps serving, and the log, the metric and /readyz say why.
#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_and_a_bad_one_never_replaces_it() {
    let pki = Pki::new();
    pki.issue("a", 10);
    pki.issue("b", 20);
    pki.install("a.crt", "a.key");
    let gw = start(&pki, "").await;
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    assert_eq!(
        handshake(&pki, gw.addr, tls13).await.unwrap().0,
        pki.der("a")
    );
    let expiry = "apitree_proxy_tls_cert_expiry_timestamp_seconds ";
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, expiry), Some(pki.not_after("a") as f64), "{m}");
    let refused = "apitree_proxy_tls_certificate_reloads_total{result=\"error\"} ";
    assert_eq!(metric(&m, refused), Some(0.0), "{m}");
    assert_eq!(
        readiness(&gw).await["tls"]["notAfter"],
        chrono::DateTime::from_timestamp(pki.not_after("a"), 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );

    // A slow request in flight on a connection made with the old certificate.
    let hits_before = gw.hits.load(std::sync::atomic::Ordering::SeqCst);
    let c = https_client(&pki, false);
    let url = format!("https://127.0.0.1:{}/api/slow", gw.addr.port());
    let in_flight = tokio::spawn({
        let (c, url, key) = (c.clone(), url.clone(), gw.live.clone());
        async move {
            c.get(url)
                .bearer_auth(key)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let hits = gw.hits.clone();
    common::until("the slow request reached the upstream", || {
        hits.load(std::sync::atomic::Ordering::SeqCst) > hits_before
    })
    .await;
    pki.install("b.crt", "b.key");
    let mut served = Vec::new();
    for _ in 0..50 {
        served = handshake(&pki, gw.addr, tls13).await.unwrap().0;
        if served == pki.der("b") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, pki.der("b"), "the renewed certificate never served");
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, expiry), Some(pki.not_after("b") as f64), "{m}");
    assert_eq!(
        metric(
            &m,
            "apitree_proxy_tls_certificate_reloads_total{result=\"ok\"} "
        ),
        Some(1.0)
    );

    // Certificate a with key b: refused, b keeps serving.
    pki.install("a.crt", "b.key");
    let mut why = serde_json::Value::Null;
    for _ in 0..50 {
        why = readiness(&gw).await["tls"]["lastError"].clone();
        if !why.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = why
        .as_str()
        .expect("/readyz names the refused pair")
        .to_string();
    assert!(
        why.contains("does not belong to certFile's first certificate"),
        "{why}"
    );
    assert!(!why.contains("PRIVATE KEY"), "{why}");
    assert_eq!(
        handshake(&pki, gw.addr, tls13).await.unwrap().0,
        pki.der("b")
    );
    let m = metrics(&gw).await;
    assert_eq!(
        metric(
            &m,
            "apitree_proxy_tls_certificate_reloads_total{result=\"error\"} "
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, expiry), Some(pki.not_after("b") as f64));
    // Putting the serving pair back clears the complaint.
    pki.install("b.crt", "b.key");
    let mut cleared = false;
    for _ in 0..50 {
        if readiness(&gw).await["tls"]["lastError"].is_null() {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cleared, "/readyz still reports the refused pair");
    // Requests keep being served.
    let resp = c
        .get(format!("https://127.0.0.1:{}/api/hello", gw.addr.port()))
        .bearer_auth(&gw.live)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A pair that cannot serve stops the start with a message that says which file and why.
#[tokio::test]
async fn an_unusable_pair_stops_the_start_and_says_why() {
    install_crypto();
    let pki = Pki::new();
    pki.issue("a", 10);
    pki.issue("b", 10);
    std::fs::write(pki.path("pepper"), PEPPER).unwrap();
    std::fs::write(pki.path("junk"), "not a certificate\n").unwrap();
    // A private key pasted on one line into the certificate file: the error must not quote it.
    let key_b64: String = std::fs::read_to_string(pki.path("a.key"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    std::fs::write(
        pki.path("pasted"),
        format!("-----BEGIN PRIVATE KEY-----{key_b64}-----END PRIVATE KEY-----"),
    )
    .unwrap();
    let cases = [
        ("pasted", "a.key", "certFile is not a PEM certificate chain"),
        (
            "a.crt",
            "b.key",
            "does not belong to certFile's first certificate",
        ),
        ("junk", "a.key", "certFile holds no CERTIFICATE block"),
        ("a.crt", "junk", "keyFile holds no PEM private key"),
        ("missing.crt", "a.key", "tls.certFile"),
    ];
    for (cert, key, want) in cases {
        let cfg = pki.path("proxy.yaml");
        std::fs::write(
            &cfg,
            format!("secrets: {{ pepperFile: pepper }}\ntls: {{ certFile: {cert}, keyFile: {key} }}\nroutes:\n  - {{ name: api, pathPrefix: /api/, upstream: \"http://127.0.0.1:9/\" }}\n"),
        )
        .unwrap();
        let opts = proxy_options(cfg);
        let err = match apitree::proxy::prepare(&opts).await {
            Ok(_) => panic!("{cert} + {key} started"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "{cert} + {key}: {err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        assert!(!err.contains(&key_b64[20..40]), "{err}");
        assert!(
            err.len() < 400,
            "an error this long may quote the file: {err}"
        );
    }
}

/// `--tls-cert` / `--tls-key` put the operator's (and `local`'s) HTTP port on TLS 1.3 with
/// HSTS on every response; its certificate's expiry is a metric of its own, and a client that
/// offers HTTP/2 still gets the HTTP/1.1 the port speaks.
#[tokio::test]
async fn the_operator_port_serves_over_tls_with_hsts() {
    use apitree::operator::{http, metrics::OperatorMetrics};
    let pki = Pki::serving();
    install_crypto();
    let metrics = Arc::new(OperatorMetrics::new());
    let tls = http::tls(&pki.path("tls.crt"), &pki.path("tls.key"), &metrics).unwrap();
    let state = Arc::new(http::HttpState::new(metrics.clone(), None));
    state.set_role(http::Role::Local);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = http::spawn(listener, state, Some(tls));
    let c = https_client(&pki, true);
    for (path, status) in [("/healthz", 200), ("/api/gateways", 200), ("/nowhere", 404)] {
        let resp = c
            .get(format!("https://127.0.0.1:{}{path}", addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        assert_eq!(
            resp.headers()
                .get("strict-transport-security")
                .map(|v| v.to_str().unwrap()),
            Some(HSTS),
            "{path}"
        );
    }
    let m = c
        .get(format!("https://127.0.0.1:{}/metrics", addr.port()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, "apitree_operator_tls_cert_expiry_timestamp_seconds "),
        Some(pki.not_after("a") as f64),
        "{m}"
    );
    let plain = client().get(format!("http://{addr}/healthz")).send().await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plain HTTP was served"
    );
    server.stop().await;
}

/// A redis-server speaking only TLS on a free port, stopped on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(pki: &Pki) -> TlsRedis {
    pki.issue("redis", 10);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .current_dir(pki.dir.path())
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "redis.crt",
            "--tls-key-file",
            "redis.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--dir", "."])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/test installs it)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsRedis { child, port }
}

/// `rediss://` shares the limits through a Redis that speaks only TLS, its certificate
/// verified against `--redis-ca-file`; with another CA the connection is refused (the replica
/// limits locally and reports `degraded`), never made unverified.
#[tokio::test]
async fn rate_limits_are_shared_through_redis_over_tls_and_a_wrong_ca_is_refused() {
    let pki = Pki::serving();
    let redis = start_tls_redis(&pki);
    let url = format!("rediss://127.0.0.1:{}/15", redis.port);
    let gw = start_with_redis(&pki, "", Some((url.clone(), Some(pki.path("ca.crt"))))).await;
    let c = https_client(&pki, true);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = c
            .get(format!("https://127.0.0.1:{}/limited/x", gw.addr.port()))
            .bearer_auth(&gw.spare[0])
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(readiness(&gw).await["rateLimitStore"], "ok");
    // The counters are in Redis.
    let keys = Command::new("redis-cli")
        .current_dir(pki.dir.path())
        .args(["--tls", "--cacert", "ca.crt", "-h", "127.0.0.1", "-p"])
        .arg(redis.port.to_string())
        .args(["-n", "15", "dbsize"])
        .output()
        .unwrap();
    let keys: u64 = String::from_utf8_lossy(&keys.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(keys > 0, "no counters in Redis");

    // A CA that did not sign Redis's certificate.
    let other = Pki::new();
    let gw = start_with_redis(&pki, "", Some((url, Some(other.path("ca.crt"))))).await;
    let resp = c
        .get(format!("https://127.0.0.1:{}/limited/x", gw.addr.port()))
        .bearer_auth(&gw.spare[0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "limits fall back to the replica");
    assert_eq!(readiness(&gw).await["rateLimitStore"], "degraded");
}
