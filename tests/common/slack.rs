//! A stand-in for the Slack Web API on a loopback port: it records every call (method, JSON
//! body, Authorization header), answers like Slack (a `ts` per posted message), and can be told
//! to fail: a list of status codes to answer first, or an outage until an instant (500 and 429
//! with `Retry-After: 1` in turn).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use apitree::detect::IncidentNotice;
use apitree::detect::{IncidentEvent, Severity};
use apitree::notify::{slack::SlackConfig, Channels};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use uuid::Uuid;
pub const TOKEN: &str = "xoxb-test-token-never-in-payloads";

#[derive(Default)]
pub struct StandIn {
    /// (method, body, authorization header)
    pub calls: Vec<(String, Value, String)>,
    /// Status codes to answer before answering normally.
    pub failures: Vec<u16>,
    /// Until then every call fails, 500 and 429 in turn (and is recorded in `failed`).
    pub outage_until: Option<Instant>,
    /// Calls answered with an error, (method, body, status).
    pub failed: Vec<(String, Value, u16)>,
    /// Calls answered `ok`, (method, body).
    pub answered: Vec<(String, Value)>,
    pub next_ts: u32,
}

pub async fn start_stand_in() -> (SocketAddr, Arc<Mutex<StandIn>>) {
    super::gateway::install_crypto();
    let state = Arc::new(Mutex::new(StandIn::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        async move {
                            let method = req.uri().path().trim_start_matches("/api/").to_string();
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut s = st.lock().unwrap();
                            let outage = s.outage_until.is_some_and(|u| Instant::now() < u);
                            let failure = if outage {
                                Some(if s.failed.len() % 2 == 0 { 500 } else { 429 })
                            } else if !s.failures.is_empty() {
                                Some(s.failures.remove(0))
                            } else {
                                None
                            };
                            let resp = if let Some(code) = failure {
                                s.failed.push((method.clone(), json.clone(), code));
                                let mut r = hyper::Response::builder().status(code);
                                if code == 429 {
                                    r = r.header("retry-after", "1");
                                }
                                r.body(Full::new(Bytes::from_static(
                                    b"{\"ok\":false,\"error\":\"ratelimited\"}",
                                )))
                                .unwrap()
                            } else {
                                s.next_ts += 1;
                                let ts = json
                                    .get("ts")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                                    .unwrap_or_else(|| format!("1700000000.{:06}", s.next_ts));
                                let reply =
                                    json!({"ok": true, "channel": json["channel"], "ts": ts});
                                s.answered.push((method.clone(), json.clone()));

                                hyper::Response::builder()
                                    .status(200)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(reply.to_string())))
                                    .unwrap()
                            };
                            s.calls.push((method, json, auth));
                            Ok::<_, Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

pub fn config(addr: SocketAddr) -> SlackConfig {
    SlackConfig {
        token: TOKEN.into(),
        signing_secret: Some("signing-secret".into()),
        api_url: format!("http://{addr}/api"),
    }
}

pub fn channels() -> Channels {
    Channels {
        warning: "C-WARN".into(),
        high: None,
        critical: Some("C-CRIT".into()),
    }
}

pub fn notice(
    id: Uuid,
    seq: u32,
    event: IncidentEvent,
    severity: Severity,
    ratio: f64,
) -> IncidentNotice {
    IncidentNotice {
        incident_id: id,
        seq,
        gateway: "apis/marketplace".into(),
        route: "payments".into(),
        signal: "error ratio".into(),
        severity,
        event,
        ratio,
        current: ratio * 0.01,
        baseline: 0.01,
        p_value: 1e-9,
        window_secs: 300,
        at: "2026-11-29T07:00:00Z".into(),
        runbook_url: Some("https://runbooks.example/apitree".into()),
        status_url: None,
        rollout_revision: None,
        acknowledged_by: None,
        remark: None,
        critical_mention: Some("S0ONCALL".into()),
        related_changes: vec![],
    }
}

/// What the stand-in has been asked, (method, text), in order.
pub fn slack_calls(stand_in: &Mutex<StandIn>) -> Vec<(String, String)> {
    stand_in
        .lock()
        .unwrap()
        .calls
        .iter()
        .map(|(m, b, _)| (m.clone(), b["text"].as_str().unwrap_or("").to_string()))
        .collect()
}
