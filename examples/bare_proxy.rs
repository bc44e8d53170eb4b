//! The floor under apitree's proxy in `benches/proxy-vs-nginx.sh`: apitree's hyper server,
//! worker model and connection settings (`src/proxy/server.rs`) and nothing else — no auth,
//! limits, metrics, access log or header rewriting beyond the upstream URL. Upstream calls go
//! through hyper-util's pooled client (what apitree used before `src/proxy/upstream.rs`), or with
//! `BARE_POOL=worker` through apitree's own pool, which makes it apitree's transport without the
//! policies. The bench runs both beside nginx and apitree, so the ratios separate what hyper
//! costs from what the pool and the policies cost.
//!
//! Usage: `bare-proxy LISTEN UPSTREAM PREFIX`, e.g. `bare-proxy 127.0.0.1:18084 127.0.0.1:18080
//! /bench/`: requests under PREFIX go to `http://UPSTREAM/` + the rest of the path.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

// The same allocator as the apitree binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, BoxError>;
type BoxError = apitree::proxy::server::BoxError;
type Upstream = Client<HttpConnector, Body>;

thread_local! {
    static UPSTREAM: std::cell::OnceCell<Upstream> = const { std::cell::OnceCell::new() };
}

fn upstream() -> Upstream {
    UPSTREAM.with(|c| {
        c.get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .http1_writev(false)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(1024)
                .pool_timer(TokioTimer::new())
                .build(HttpConnector::new())
        })
        .clone()
    })
}

/// Sends the request under PREFIX to the upstream: through hyper-util's pooled client, or
/// with `worker_pool` through apitree's.
async fn forward(
    req: Request<Incoming>,
    upstream_authority: &'static str,
    prefix: &'static str,
    worker_pool: bool,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let rest = parts.uri.path().strip_prefix(prefix).unwrap_or("");
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(upstream_authority)
        .path_and_query(format!("/{rest}"))
        .build()
    else {
        return reply(400);
    };
    parts.uri = uri;
    let body: Body = body.map_err(|e| Box::new(e) as BoxError).boxed();
    let resp = if worker_pool {
        apitree::proxy::transport::upstream::request(Request::from_parts(parts, body))
            .await
            .map(|r| r.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
            .ok()
    } else {
        upstream()
            .request(Request::from_parts(parts, body))
            .await
            .map(|r| r.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
            .ok()
    };
    resp.unwrap_or_else(|| reply(502))
}

fn reply(status: u16) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream_authority, prefix] = args.as_slice() else {
        eprintln!("usage: bare-proxy LISTEN UPSTREAM PREFIX");
        std::process::exit(2);
    };
    let upstream_authority: &'static str = Box::leak(upstream_authority.clone().into_boxed_str());
    let prefix: &'static str = Box::leak(prefix.clone().into_boxed_str());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let worker_pool = std::env::var("BARE_POOL").is_ok_and(|v| v == "worker");
    let mut senders = Vec::new();
    for _ in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        senders.push(tx);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                http.keep_alive(true)
                    .writev(false)
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30));
                while let Some(stream) = rx.recv().await {
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                        continue;
                    };
                    let service = hyper::service::service_fn(move |req| async move {
                        Ok::<_, Infallible>(
                            forward(req, upstream_authority, prefix, worker_pool).await,
                        )
                    });
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
        let mut next = 0usize;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let _ = senders[next % senders.len()].send(stream);
            next = next.wrapping_add(1);
        }
    });
}
