//! The status page in a real browser (Debian's headless Chromium, which `scripts/test` installs):
//! it loads, lists the gateways with their gate checks and sparkline, and shows a change on its
//! 10-second refresh without reloading the page.

use std::convert::Infallible;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use apitree::crd::gateway::{CheckPhase, GateCheckStatus, IncidentSummary};
use apitree::dashboard::{GatewayView, PAGE};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

fn chromium() -> String {
    std::env::var("APITREE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn check(name: &str, phase: CheckPhase, observed: &str) -> GateCheckStatus {
    GateCheckStatus {
        name: name.into(),
        phase,
        observed: Some(observed.into()),
        threshold: None,
        samples: None,
        p_value: None,
        reason: None,
        started_at: None,
        finished_at: None,
    }
}

/// The gateway before and after: gating at 4/5, then promoted with a critical incident open.
fn view(later: bool) -> GatewayView {
    let mut checks = vec![
        check("rollout", CheckPhase::Passed, "2/2 ready"),
        check("health", CheckPhase::Passed, "2/2 replicas ready"),
        check("schema", CheckPhase::Skipped, "no database"),
        check("smoke", CheckPhase::Passed, "2/2 probes passed"),
        check(
            "analysis",
            CheckPhase::Running,
            "green 0.10% errors (1/1000)",
        ),
    ];
    if later {
        checks[4] = check(
            "analysis",
            CheckPhase::Passed,
            "green 0.12% errors (3/2500)",
        );
    }
    GatewayView {
        name: "shop<script>".into(),
        phase: if later { "Promoting" } else { "Gating" }.into(),
        active_color: Some(if later { "green" } else { "blue" }.into()),
        active_revision: Some(if later { "bbbbbbbbbb" } else { "aaaaaaaaaa" }.into()),
        preview_revision: (!later).then(|| "bbbbbbbbbb".into()),
        previous_revision: later.then(|| "aaaaaaaaaa".into()),
        gate_revision: Some("bbbbbbbbbb".into()),
        gate_progress: Some(if later { "5/5" } else { "4/5" }.into()),
        checks,
        rejected: None,
        incidents: if later {
            vec![IncidentSummary {
                id: "weather/error ratio".into(),
                signal: "error ratio".into(),
                route: "weather".into(),
                severity: "critical".into(),
                ratio: Some(12.5),
                opened_at: "2026-11-29T10:00:00Z".into(),
                acknowledged_by: Some("U123".into()),
            }]
        } else {
            Vec::new()
        },
        error_ratios: vec![0.01, 0.012, 0.011, 0.05, 0.09, 0.13],
        runs: Vec::new(),
        events: Vec::new(),
        url: None,
        connectors: Vec::new(),
    }
}

#[tokio::test]
async fn the_page_lists_gateways_and_redraws_a_change_without_reloading() {
    let chromium = chromium();
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} not found: scripts/test installs Debian's chromium (or set APITREE_CHROMIUM)"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pages = Arc::new(AtomicUsize::new(0));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (p, f) = (pages.clone(), fetches.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (p, f) = (p.clone(), f.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (p, f) = (p.clone(), f.clone());
                        async move {
                            let (ctype, body) = match req.uri().path() {
                                "/" => {
                                    p.fetch_add(1, Ordering::SeqCst);
                                    ("text/html", PAGE.to_string())
                                }
                                "/api/gateways" => {
                                    // The first answer is the gate in progress; later ones the switch.
                                    let n = f.fetch_add(1, Ordering::SeqCst);
                                    (
                                        "application/json",
                                        serde_json::to_string(&vec![view(n > 0)]).unwrap(),
                                    )
                                }
                                _ => ("text/plain", String::new()),
                            };
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", ctype)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let url = format!("http://{addr}/");
    // Virtual time runs the page's 10 s refresh timer without waiting for it.
    let dom = tokio::task::spawn_blocking(move || {
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=15000",
                "--dump-dom",
            ])
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(
        fetches.load(Ordering::SeqCst) >= 2,
        "the page never refreshed:\n{html}"
    );
    assert_eq!(pages.load(Ordering::SeqCst), 1, "the page reloaded itself");
    // The redrawn state: promoted, 5/5, the incident, the sparkline.
    assert!(html.contains("Promoting"), "{html}");
    assert!(!html.contains(">Gating<"), "{html}");
    assert!(html.contains("gate 5/5 for "), "{html}");
    assert!(html.contains("green 0.12% errors (3/2500)"), "{html}");
    assert!(html.contains("sev-critical"), "{html}");
    assert!(html.contains("12.5x"), "{html}");
    assert!(html.contains("by U123"), "{html}");
    assert!(html.contains("<polyline"), "{html}");
    // Names are text, never markup.
    assert!(html.contains("shop&lt;script&gt;"), "{html}");
}
