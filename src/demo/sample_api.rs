//! The demo's sample upstream API: a small HTTP server on loopback whose failure shares the
//! tour sets, so the gate and the detector have something real to judge.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::DemoError;

/// The sample upstream API: `/weather/*` and `/fx/*` answer JSON after ~10 ms; a share of
/// `/weather/*` calls fails with 500 (spread evenly, set by the demo); `/flaky/*` fails 40%;
/// `/v2/*` answers like the rest but fails the share `v2_failure_per_mille` says (0 at first).
pub struct SampleApi {
    pub addr: SocketAddr,
    pub weather_failure_per_mille: Arc<AtomicU64>,
    pub v2_failure_per_mille: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SampleApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// True for `share_per_mille` of the calls numbered `n`, spread evenly.
fn fails(n: u64, share_per_mille: u64) -> bool {
    (n + 1) * share_per_mille / 1000 > n * share_per_mille / 1000
}

#[derive(Default)]
struct SampleState {
    weather_share: Arc<AtomicU64>,
    v2_share: Arc<AtomicU64>,
    weather_calls: AtomicU64,
    flaky_calls: AtomicU64,
    v2_calls: AtomicU64,
}

impl SampleState {
    fn answer(&self, path: &str) -> (u16, Value) {
        let next = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
        let failed = if path.starts_with("/v2/") {
            fails(next(&self.v2_calls), self.v2_share.load(Ordering::Relaxed))
        } else if path.starts_with("/weather/") {
            fails(
                next(&self.weather_calls),
                self.weather_share.load(Ordering::Relaxed),
            )
        } else if path.starts_with("/flaky/") {
            fails(next(&self.flaky_calls), 400)
        } else {
            false
        };
        if failed {
            (500, json!({"error": "sample API failure"}))
        } else if path.contains("weather") {
            (200, json!({"city": "Seoul", "tempC": 3.5, "sky": "clear"}))
        } else {
            (200, json!({"pair": "USD/KRW", "rate": 1391.2}))
        }
    }
}

/// Starts the sample API on a loopback port; it stops when dropped.
pub async fn start_sample_api() -> Result<SampleApi, DemoError> {
    let fail = |e: std::io::Error| DemoError::Start {
        what: "sample API",
        reason: e.to_string(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    let state = Arc::new(SampleState::default());
    state.weather_share.store(15, Ordering::Relaxed);
    let (weather, v2) = (state.weather_share.clone(), state.v2_share.clone());
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    crate::proxy::transport::workers::accept_failed(&e).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            let (status, body) = state.answer(req.uri().path());
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .unwrap_or_default(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(SampleApi {
        addr,
        weather_failure_per_mille: weather,
        v2_failure_per_mille: v2,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_shares_are_exact_over_a_thousand_calls() {
        for share in [0, 15, 50, 85, 180, 400, 1000] {
            let n = (0..1000).filter(|&n| fails(n, share)).count() as u64;
            assert_eq!(n, share);
        }
    }
}
