//! The gateway proxy end to end: real HTTP through the stack to an in-process upstream.

mod common;

use std::time::Duration;

use apitree::crd::gateway::KeyScope;
use apitree::proxy::{limiter::Limiter, metrics::ProxyMetrics};
use common::gateway::*;
use serde_json::Value;
use std::sync::atomic::Ordering;

struct Setup {
    gw: TestGateway,
    up: Upstream,
    live: String,
    test: String,
    other_org_live: String,
}

/// Two orgs (alpha, beta), a small tier, routes for every behaviour.
async fn setup(extra_keys: &str) -> Setup {
    setup_with(extra_keys, "").await
}

/// [`setup`] with more routes (YAML list items).
async fn setup_with(extra_keys: &str, extra_routes: &str) -> Setup {
    setup_full("", extra_keys, extra_routes).await
}

/// [`setup`] with top-level settings (YAML lines).
async fn setup_top(top: &str) -> Setup {
    setup_full(top, "", "").await
}

async fn setup_full(top: &str, extra_keys: &str, extra_routes: &str) -> Setup {
    let up = start_upstream().await;
    let upstream = format!("http://{}/", up.addr.unwrap());
    let (live, live_e) = key_entry(KeyScope::Live, "alpha", "");
    let (test, test_e) = key_entry(KeyScope::Test, "alpha", "");
    let (beta, beta_e) = key_entry(KeyScope::Live, "beta", "");
    let creds = credential_entry("vendor", "alpha", "api", "system", UPSTREAM_SECRET)
        + &credential_entry("vendor", "beta", "api", "byok", BYOK_SECRET);
    let yaml = format!(
        r#"{top}
tiers:
  - name: small
    perKey: {{ burst10s: 5, perMinute: 100, perDay: 1000 }}
    perOrg: {{ burst10s: 8, perMinute: 100, perDay: 1000 }}
  - name: roomy
    perKey: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }}
    perOrg: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }}
defaultTier: roomy
orgs: [{{ id: alpha }}, {{ id: beta }}]
keys:
{live_e}{test_e}{beta_e}{extra_keys}
credentials:
{creds}
routes:
  - {{ name: api, pathPrefix: /api/, upstream: "{upstream}v1/", credential: vendor }}
  - {{ name: live-only, pathPrefix: /live-only/, upstream: "{upstream}", scopes: [live] }}
  - {{ name: limited, pathPrefix: /limited/, upstream: "{upstream}", tier: small }}
  - {{ name: masked, pathPrefix: /masked/, upstream: "{upstream}", pii: mask }}
  - {{ name: flagged, pathPrefix: /flagged/, upstream: "{upstream}", pii: flag }}
  - {{ name: fragile, pathPrefix: /fragile/, upstream: "{upstream}", timeout: 300ms,
       breaker: {{ consecutiveFailures: 3, openFor: 30s, halfOpenProbes: 1 }} }}
  - {{ name: logged, pathPrefix: /logged/, upstream: "{upstream}", logBodies: true }}
{extra_routes}"#
    );
    let gw = start_gateway(&yaml, None).await;
    Setup {
        gw,
        up,
        live: live.expose_secret().to_string(),
        test: test.expose_secret().to_string(),
        other_org_live: beta.expose_secret().to_string(),
    }
}

async fn get(url: &str, key: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client().get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn a_valid_key_reaches_the_upstream_with_the_credential_and_never_the_buyers_key() {
    let s = setup("").await;
    let (status, headers, body) =
        get(&s.gw.url("/api/weather/today?city=seoul"), Some(&s.live)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/v1/weather/today");
    assert_eq!(body["query"], "city=seoul");
    let seen = body["headers"].as_object().unwrap();
    assert_eq!(seen["authorization"], format!("Bearer {UPSTREAM_SECRET}"));
    assert!(
        !body.to_string().contains(&s.live),
        "the buyer's key was forwarded"
    );
    let rid = headers["x-request-id"].to_str().unwrap();
    assert_eq!(seen["x-request-id"], rid);
    assert!(headers.contains_key("ratelimit"));

    // X-API-Key works too, and is stripped as well.
    let resp = client()
        .get(s.gw.url("/api/x"))
        .header("x-api-key", &s.live)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["headers"].get("x-api-key").is_none());
}

/// Bodiless requests take the upstream fast path, requests with a body hyper's client: the
/// upstream must see the same fields either way.
#[tokio::test]
async fn the_upstream_sees_the_same_fields_whichever_path_carries_the_request() {
    let s = setup("").await;
    let upstream_host = s.up.addr.unwrap().to_string();
    for (route, credential) in [("api", Some(UPSTREAM_SECRET)), ("masked", None)] {
        let mut seen = Vec::new();
        for with_body in [false, true] {
            let mut req = if with_body {
                client()
                    .post(s.gw.url(&format!("/{route}/echo")))
                    .body("{}")
            } else {
                client().get(s.gw.url(&format!("/{route}/echo")))
            };
            for (name, value) in [
                ("connection", "x-hop"),
                ("x-hop", "dropped: named in Connection"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic c2VjcmV0"),
                ("te", "trailers"),
                ("x-api-key", s.live.as_str()),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "client-id-1"),
                ("accept-encoding", "gzip"),
                ("x-custom", "kept"),
            ] {
                req = req.header(name, value);
            }
            let resp = req.bearer_auth(&s.live).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{route} with_body={with_body}");
            let body: Value = resp.json().await.unwrap();
            let mut headers = body["headers"].as_object().unwrap().clone();
            assert!(
                !body.to_string().contains(&s.live),
                "the buyer's key went upstream"
            );
            for gone in [
                "x-hop",
                "keep-alive",
                "proxy-authorization",
                "te",
                "x-api-key",
            ] {
                assert!(
                    headers.get(gone).is_none(),
                    "{gone} reached the upstream: {body}"
                );
            }
            assert_eq!(headers["host"], upstream_host.as_str());
            assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
            // A plain-HTTP client claiming https is not believed.
            assert_eq!(headers["x-forwarded-proto"], "http");
            assert_eq!(headers["x-request-id"], "client-id-1");
            assert_eq!(headers["x-custom"], "kept");
            // A route that masks PII asks for a body it can read.
            let encoding = if route == "masked" {
                "identity"
            } else {
                "gzip"
            };
            assert_eq!(headers["accept-encoding"], encoding);
            match credential {
                Some(secret) => assert_eq!(headers["authorization"], format!("Bearer {secret}")),
                None => assert!(headers.get("authorization").is_none(), "{body}"),
            }
            assert_eq!(body["method"], if with_body { "POST" } else { "GET" });
            headers.remove("content-length");
            seen.push(headers);
        }
        assert_eq!(
            seen[0], seen[1],
            "{route}: the two paths forwarded different fields"
        );
    }
}

#[tokio::test]
async fn byok_orgs_get_their_own_upstream_credential() {
    let s = setup("").await;
    let (_, _, body) = get(&s.gw.url("/api/x"), Some(&s.other_org_live)).await;
    assert_eq!(
        body["headers"]["authorization"],
        format!("Bearer {BYOK_SECRET}")
    );
}

#[tokio::test]
async fn auth_failures_are_401_json_with_the_request_id() {
    let (revoked, revoked_e) = key_entry(KeyScope::Live, "alpha", ", revoked: true");
    let (expired, expired_e) = key_entry(
        KeyScope::Live,
        "alpha",
        ", expiresAt: \"2020-01-01T00:00:00Z\"",
    );
    let (rotated, rotated_e) = key_entry(
        KeyScope::Live,
        "alpha",
        ", graceUntil: \"2020-01-01T00:00:00Z\"",
    );
    let (in_grace, in_grace_e) = key_entry(
        KeyScope::Live,
        "alpha",
        ", graceUntil: \"2999-01-01T00:00:00Z\"",
    );
    let s = setup(&(revoked_e + &expired_e + &rotated_e + &in_grace_e)).await;
    let mut typo = s.live.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let unknown = apitree::entities::keys::ApiKey::generate(KeyScope::Live);
    for (key, code) in [
        (None, "missing_api_key"),
        (Some(typo.as_str()), "malformed_api_key"),
        (Some(unknown.expose_secret()), "unknown_api_key"),
        (Some(revoked.expose_secret()), "revoked_api_key"),
        (Some(expired.expose_secret()), "expired_api_key"),
        (Some(rotated.expose_secret()), "rotated_api_key"),
    ] {
        let (status, headers, body) = get(&s.gw.url("/api/x"), key).await;
        assert_eq!(status, 401, "{code}: {body}");
        assert_eq!(body["code"], code);
        assert_eq!(
            body["request_id"],
            headers["x-request-id"].to_str().unwrap()
        );
        assert!(body["error"].as_str().unwrap().len() > 10);
        assert!(headers.contains_key("www-authenticate"));
    }
    assert_eq!(
        s.up.hits.load(Ordering::SeqCst),
        0,
        "refused requests must not reach the upstream"
    );
    let (status, _, _) = get(&s.gw.url("/api/x"), Some(in_grace.expose_secret())).await;
    assert_eq!(
        status, 200,
        "a rotated key is valid during its grace period"
    );
    let metrics = s.gw.metrics_text().await;
    assert!(
        metrics.contains("apitree_proxy_auth_failures_total{reason=\"revoked_api_key\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_test_key_on_a_live_only_route_is_forbidden() {
    let s = setup("").await;
    let (status, _, body) = get(&s.gw.url("/live-only/x"), Some(&s.test)).await;
    assert_eq!(status, 403);
    assert_eq!(body["code"], "scope_forbidden");
    let (status, _, _) = get(&s.gw.url("/live-only/x"), Some(&s.live)).await;
    assert_eq!(status, 200);
    let (status, _, body) = get(&s.gw.url("/nowhere"), Some(&s.live)).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("no_route")));
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_ietf_headers() {
    let s = setup("").await;
    for i in 0..5 {
        let (status, headers, _) = get(&s.gw.url("/limited/x"), Some(&s.live)).await;
        assert_eq!(status, 200, "request {i}");
        let rl = headers["ratelimit"].to_str().unwrap();
        assert_eq!(
            rl,
            format!("\"key-burst\";r={};t=", 4 - i) + rl.rsplit_once("t=").unwrap().1
        );
    }
    let (status, headers, body) = get(&s.gw.url("/limited/x"), Some(&s.live)).await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], "rate_limited");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let policy = headers["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains("\"key-burst\";q=5;w=10") && policy.contains("\"org-day\";q=1000;w=86400"),
        "{policy}"
    );
    assert!(headers["ratelimit"].to_str().unwrap().contains(";r=0;"));
    // The org limit (8) applies across the org's keys: the test key gets 3 more, not 5.
    let mut ok = 0;
    for _ in 0..5 {
        if get(&s.gw.url("/limited/x"), Some(&s.test)).await.0 == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(s.up.hits.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn failing_upstream_opens_the_breaker_and_then_fails_fast() {
    let s = setup("").await;
    for _ in 0..3 {
        let (status, _, _) = get(&s.gw.url("/fragile/fail"), Some(&s.live)).await;
        assert_eq!(
            status, 500,
            "upstream errors pass through until the breaker opens"
        );
    }
    let hits = s.up.hits.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let (status, headers, body) = get(&s.gw.url("/fragile/anything"), Some(&s.live)).await;
    assert_eq!(status, 503);
    assert_eq!(body["code"], "upstream_circuit_open");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        s.up.hits.load(Ordering::SeqCst),
        hits,
        "an open breaker must not call the upstream"
    );
    assert!(started.elapsed() < Duration::from_millis(200));
    let metrics = s.gw.metrics_text().await;
    assert!(metrics.contains("apitree_proxy_breaker_opens_total{route=\"fragile\"} 1"));
    assert!(metrics.contains("apitree_proxy_breaker_state{route=\"fragile\"} 2"));
}

#[tokio::test]
async fn a_malformed_upstream_response_is_a_502_that_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream whose responses carry two different Content-Length values.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx";
                let _ = stream.write_all(reply).await;
            });
        }
    });
    let route = format!("  - {{ name: odd, pathPrefix: /odd/, upstream: \"http://{addr}/\" }}\n");
    let s = setup_with("", &route).await;
    let (status, headers, body) = get(&s.gw.url("/odd/x"), Some(&s.live)).await;
    assert_eq!(status, 502);
    assert_eq!(body["code"], "upstream_bad_response");
    assert_eq!(
        body["request_id"],
        headers["x-request-id"].to_str().unwrap()
    );
    let metrics = s.gw.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("apitree_proxy_upstream_errors_total")
                && l.contains("kind=\"bad_response\"")
                && l.contains("route=\"odd\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_upstreams_time_out_with_504() {
    let s = setup("").await;
    let (status, _, body) = get(&s.gw.url("/fragile/slow"), Some(&s.live)).await;
    assert_eq!(status, 504);
    assert_eq!(body["code"], "upstream_timeout");
    assert!(body["error"].as_str().unwrap().contains("300ms"));
}

#[tokio::test]
async fn pii_is_masked_in_responses_and_flagged_where_asked() {
    let s = setup("").await;
    let (status, headers, body) = get(&s.gw.url("/masked/pii"), Some(&s.live)).await;
    assert_eq!(status, 200);
    assert_eq!(body["rrn"], "900101-1******");
    assert_eq!(body["phone"], "010-****-5432");
    assert_eq!(body["note"], "계좌 ***-***-**6789");
    assert!(headers.get("x-apitree-pii").is_none());

    let (_, headers, body) = get(&s.gw.url("/flagged/pii"), Some(&s.live)).await;
    assert_eq!(body["rrn"], RRN, "flag mode leaves the body alone");
    assert_eq!(headers["x-apitree-pii"], "rrn=1, phone=1, bank_account=1");

    let (_, _, body) = get(&s.gw.url("/live-only/pii"), Some(&s.live)).await;
    assert_eq!(body["rrn"], RRN, "PII mode off");

    let metrics = s.gw.metrics_text().await;
    assert!(
        metrics.contains("apitree_proxy_pii_findings_total{kind=\"rrn\",route=\"masked\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn streaming_masking_handles_values_split_across_chunks() {
    let s = setup("").await;
    let resp = client()
        .get(s.gw.url("/masked/pii-stream"))
        .bearer_auth(&s.live)
        .send()
        .await
        .unwrap();
    let declared = resp.content_length();
    let text = resp.text().await.unwrap();
    assert_eq!(
        declared,
        Some(text.len() as u64),
        "masking keeps the length"
    );
    assert_eq!(text.lines().count(), 2000);
    assert!(
        !text.contains(RRN) && !text.contains("-1234-"),
        "unmasked value left"
    );
    assert_eq!(text.matches("900101-1******").count(), 2000);
    assert_eq!(text.matches("010-****-").count(), 2000);
}

#[tokio::test]
async fn access_log_holds_metadata_and_never_secrets() {
    let s = setup("").await;
    get(&s.gw.url("/api/x"), Some(&s.live)).await;
    let resp = client()
        .post(s.gw.url("/logged/x"))
        .bearer_auth(&s.live)
        .body("{\"order\":42}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    get(&s.gw.url("/api/x"), Some("at_live_not-a-real-key")).await;
    // The writer thread flushes on its own schedule: wait for the three lines.
    common::until("three access-log lines", || {
        s.gw.log_text().lines().count() >= 3
    })
    .await;
    let log = s.gw.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{log}");
    let first = &lines[0];
    assert_eq!(first["route"], "api");
    assert_eq!(first["org"], "alpha");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream_status"], 200);
    assert_eq!(first["key_prefix"], &s.live[..16]);
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(first.get("request_body").is_none());
    assert_eq!(
        lines[1]["request_body"], "{\"order\":42}",
        "logBodies routes log the body"
    );
    assert_eq!(lines[2]["error_code"], "malformed_api_key");
    for secret in [s.live.as_str(), UPSTREAM_SECRET, "not-a-real-key"] {
        assert!(!log.contains(secret), "secret {secret:?} in the access log");
    }
}

#[tokio::test]
async fn admin_endpoints_expose_metrics_that_promtool_accepts_and_readiness() {
    let s = setup("").await;
    get(&s.gw.url("/api/x"), Some(&s.live)).await;
    get(&s.gw.url("/limited/x"), None).await;
    let metrics = s.gw.metrics_text().await;
    for name in [
        "apitree_proxy_requests_total{route=\"api\",status_class=\"2xx\"} 1",
        "apitree_proxy_request_duration_seconds_bucket",
        "apitree_proxy_in_flight_requests",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(!metrics.contains(&s.live[8..]), "a key leaked into metrics");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let ready: Value = s.gw.readiness().await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["config"]["routes"], 7);
    assert_eq!(ready["rateLimitStore"], "off");
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let mut s = setup("").await;
    let url = s.gw.url("/live-only/slow");
    let key = s.live.clone();
    let before = s.up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let slow = tokio::spawn(async move {
        client()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // In flight once the upstream has its head (it answers /slow 2 s later).
    let hits = s.up.hits.clone();
    common::until("the slow request reached the upstream", || {
        hits.load(std::sync::atomic::Ordering::SeqCst) > before
    })
    .await;
    s.gw.shutdown().await;
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
    assert!(
        client().get(s.gw.url("/api/x")).send().await.is_err(),
        "no new connections after shutdown"
    );
}

fn redis_url() -> String {
    std::env::var("APITREE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test]
async fn two_replicas_share_limits_through_redis() {
    let up = start_upstream().await;
    let (key, entry) = key_entry(KeyScope::Live, "shared-org", "");
    let org = format!("org-{}", uuid::Uuid::new_v4().simple());
    let entry = entry.replace("shared-org", &org);
    let yaml = format!(
        "tiers:\n  - {{ name: t, perKey: {{ burst10s: 6, perMinute: 100, perDay: 1000 }}, perOrg: {{ burst10s: 100, perMinute: 100, perDay: 1000 }} }}\ndefaultTier: t\norgs: [{{ id: {org} }}]\nkeys:\n{entry}routes:\n  - {{ name: r, pathPrefix: /, upstream: \"http://{}/\" }}\n",
        up.addr.unwrap()
    );
    let m1 = ProxyMetrics::new();
    let m2 = ProxyMetrics::new();
    let a = start_gateway(&yaml, Some(Limiter::shared(&redis_url(), m1).unwrap())).await;
    let b = start_gateway(&yaml, Some(Limiter::shared(&redis_url(), m2).unwrap())).await;
    let mut ok = 0;
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if get(&gw.url("/x"), Some(key.expose_secret())).await.0 == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 6, "the burst limit of 6 holds across both replicas");
    let ready: Value = a.readiness().await;
    assert_eq!(ready["rateLimitStore"], "ok");
}

#[tokio::test]
async fn replicas_lease_quota_from_redis_and_never_admit_more_than_the_limit_together() {
    use apitree::crd::gateway::WindowLimits;
    use apitree::proxy::ratelimit::{Limits, Subject, Window};
    let big = WindowLimits {
        burst10s: 1_000_000,
        per_minute: 1_000_000,
        per_day: 10_000_000,
    };
    let per_key = WindowLimits {
        per_minute: 3_000,
        ..big.clone()
    };
    let limits = Limits::new(&per_key, &big, None);
    let key = uuid::Uuid::new_v4().to_string();
    let org = uuid::Uuid::new_v4().to_string();
    let (m1, m2) = (ProxyMetrics::new(), ProxyMetrics::new());
    let a = Limiter::shared(&redis_url(), m1.clone()).unwrap();
    let b = Limiter::shared(&redis_url(), m2.clone()).unwrap();
    // One instant, so every request falls in the same minute.
    let now = 1_767_229_230_000;
    let mut admitted = 0;
    let mut last_refusal = None;
    for i in 0..4_000 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let d = replica.check(&key, &org, limits, now).await;
        if d.allowed {
            admitted += 1;
        } else {
            last_refusal = Some(d);
        }
    }
    assert!(
        admitted <= 3_000,
        "the two replicas admitted {admitted} > 3000"
    );
    // Unused leases are lost for the window, but blocks shrink as the window fills up.
    assert!(admitted >= 2_950, "only {admitted} of 3000 admitted");
    let calls = m1.limiter_store_calls.get() + m2.limiter_store_calls.get();
    assert!(
        calls < 400,
        "{calls} Redis round trips for 4000 decisions: leases are not being reused"
    );
    let refusal = last_refusal.expect("requests over the limit were refused");
    assert_eq!(refusal.blocked, Some((Subject::Key, Window::Minute)));
    assert!(refusal.retry_after_secs >= 1);
    assert_eq!(m1.limiter_fallbacks.get() + m2.limiter_fallbacks.get(), 0);

    // Ten minutes of steady traffic under a daily quota of 10,000: the burst lease renews every
    // 10 seconds, and renewing it must not lease (and waste) another block of the day.
    let per_key = WindowLimits {
        burst10s: 1_000,
        per_minute: 100_000,
        per_day: 10_000,
    };
    let limits = Limits::new(&per_key, &big, None);
    let key = uuid::Uuid::new_v4().to_string();
    let start = 1_767_229_200_000;
    let mut refused = 0;
    for i in 0..6_000u64 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if !replica
            .check(&key, &org, limits, start + i * 100)
            .await
            .allowed
        {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 0,
        "6,000 requests of a 10,000 daily quota were refused"
    );
}

#[tokio::test]
async fn redis_down_falls_back_to_local_limits_and_reports_degraded() {
    let up = start_upstream().await;
    let (key, entry) = key_entry(KeyScope::Live, "o", "");
    let yaml = format!(
        "tiers:\n  - {{ name: t, perKey: {{ burst10s: 3, perMinute: 100, perDay: 1000 }}, perOrg: {{ burst10s: 100, perMinute: 100, perDay: 1000 }} }}\ndefaultTier: t\norgs: [{{ id: o }}]\nkeys:\n{entry}routes:\n  - {{ name: r, pathPrefix: /, upstream: \"http://{}/\" }}\n",
        up.addr.unwrap()
    );
    let metrics = ProxyMetrics::new();
    // Nothing listens on port 1.
    let gw = start_gateway(
        &yaml,
        Some(Limiter::shared("redis://127.0.0.1:1", metrics.clone()).unwrap()),
    )
    .await;
    let statuses: Vec<u16> = futures::future::join_all(
        (0..4).map(|_| async { get(&gw.url("/x"), Some(key.expose_secret())).await.0 }),
    )
    .await;
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![200, 200, 200, 429],
        "local limits still apply: {statuses:?}"
    );
    assert_eq!(metrics.limiter_fallbacks.get(), 4);
    let ready: Value = gw.readiness().await;
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["rateLimitStore"], "degraded");
}

/// Slowloris: a client that sends half a request head and stalls holds its connection for the
/// header-read timeout (`headerReadTimeout`, 3 s here; the worker's own deadline table fires
/// it), not forever, whether it stalls in its first head or in a later one on a kept-alive
/// connection; a connection that completes its request meanwhile is served.
#[tokio::test]
async fn a_stalled_request_head_is_cut_off_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup_top("headerReadTimeout: 3s").await;
    let half = b"GET /api/stalled HTTP/1.1\r\nHost: gateway\r\n";
    let mut first = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    first.write_all(half).await.unwrap();
    let mut later = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    later
        .write_all(raw_get("/api/one", &s.live, "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_raw(&mut later, &[false]).await[0].status, 200);
    later.write_all(half).await.unwrap();
    let started = std::time::Instant::now();
    let (status, _, _) = get(&s.gw.url("/api/meanwhile"), Some(&s.live)).await;
    assert_eq!(status, 200, "another connection is served while two stall");
    for (name, stalled) in [("first head", &mut first), ("later head", &mut later)] {
        let mut answer = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(15), stalled.read_to_end(&mut answer)).await;
        let held = started.elapsed();
        assert!(
            closed.is_ok(),
            "{name}: the stalled connection was still open after {held:?}"
        );
        assert!(
            held >= Duration::from_millis(2900),
            "{name}: the stalled connection was cut off after {held:?}, before the 3 s timeout"
        );
    }
}

/// A kept-alive connection idle for `keepAliveTimeout` (1 s here) between requests is closed,
/// whether the fast path or hyper (after a request with a body) serves it; a connection that
/// sends a request every 400 ms stays open, and a request in flight longer than the timeout
/// (the upstream takes 2 s) is answered on either path.
#[tokio::test]
async fn idle_kept_alive_connections_are_closed_after_the_keep_alive_timeout() {
    use tokio::io::AsyncWriteExt;
    let s = setup_top("keepAliveTimeout: 1s").await;
    let k = &s.live;
    let post = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {k}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    let (mut fast, mut hyper) = (
        tokio::net::TcpStream::connect(s.gw.addr).await.unwrap(),
        tokio::net::TcpStream::connect(s.gw.addr).await.unwrap(),
    );
    // Slower than the timeout, and answered: in flight is not idle.
    fast.write_all(raw_get("/live-only/slow", k, "").as_bytes())
        .await
        .unwrap();
    hyper
        .write_all(post("/live-only/slow").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_raw(&mut fast, &[false]).await[0].status, 200);
    assert_eq!(read_raw(&mut hyper, &[false]).await[0].status, 200);

    // Busy: a request every 400 ms for 2 s, each answered on the same connection.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        fast.write_all(raw_get("/api/busy", k, "").as_bytes())
            .await
            .unwrap();
        hyper.write_all(post("/api/busy").as_bytes()).await.unwrap();
        assert_eq!(
            read_raw(&mut fast, &[false]).await[0].status,
            200,
            "fast {i}"
        );
        assert_eq!(
            read_raw(&mut hyper, &[false]).await[0].status,
            200,
            "hyper {i}"
        );
    }

    // Idle: closed once the timeout has passed, not before.
    let idle_from = std::time::Instant::now();
    for (name, conn) in [("fast path", &mut fast), ("hyper", &mut hyper)] {
        assert!(
            closes(conn).await,
            "{name}: the idle connection stayed open"
        );
        let held = idle_from.elapsed();
        assert!(
            held >= Duration::from_millis(900) && held < Duration::from_secs(4),
            "{name}: the idle connection was closed after {held:?}, not about 1 s"
        );
    }
}

/// The client sees the upstream's end-to-end response fields only, whichever path carried the
/// call (GET: the fast path; POST with a body: hyper's client).
#[tokio::test]
async fn the_client_never_sees_the_upstreams_hop_by_hop_fields() {
    let s = setup("").await;
    for with_body in [false, true] {
        let req = if with_body {
            client().post(s.gw.url("/masked/hop-fields")).body("{}")
        } else {
            client().get(s.gw.url("/masked/hop-fields"))
        };
        let resp = req.bearer_auth(&s.live).send().await.unwrap();
        assert_eq!(resp.status(), 200, "with_body={with_body}");
        let h = resp.headers();
        assert_eq!(h["x-kept"], "end to end", "with_body={with_body}");
        for gone in ["x-up-hop", "keep-alive"] {
            assert!(
                h.get(gone).is_none(),
                "{gone} reached the client (with_body={with_body})"
            );
        }
    }
}

/// One response read off a raw connection.
struct RawResponse {
    status: u16,
    /// Lower-case names, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response per entry of `head_only` (true: the answer to a HEAD, no body follows)
/// from a raw connection; bodies are framed by Content-Length.
async fn read_raw(stream: &mut tokio::net::TcpStream, head_only: &[bool]) -> Vec<RawResponse> {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for &bodiless in head_only {
        loop {
            let parsed = {
                let mut fields = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut fields);
                match r.parse(&buf).expect("a well-formed response head") {
                    httparse::Status::Complete(n) => Some((
                        n,
                        r.code.unwrap(),
                        r.headers
                            .iter()
                            .map(|h| {
                                let v = String::from_utf8_lossy(h.value).into_owned();
                                (h.name.to_ascii_lowercase(), v)
                            })
                            .collect::<Vec<_>>(),
                    )),
                    httparse::Status::Partial => None,
                }
            };
            if let Some((n, status, headers)) = parsed {
                let len = if bodiless {
                    0
                } else {
                    let cl = headers.iter().find(|(k, _)| k == "content-length");
                    cl.expect("a Content-Length").1.parse::<usize>().unwrap()
                };
                if buf.len() >= n + len {
                    let body = String::from_utf8_lossy(&buf[n..n + len]).into_owned();
                    buf.drain(..n + len);
                    out.push(RawResponse {
                        status,
                        headers,
                        body,
                    });
                    break;
                }
            }
            let mut chunk = [0u8; 8192];
            let k = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(
                k > 0,
                "closed before answer {}; read {:?}",
                out.len() + 1,
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..k]);
        }
    }
    assert!(buf.is_empty(), "nothing after the answers: {buf:?}");
    out
}

/// True when the server closes the connection (nothing more arrives) within 5 s.
async fn closes(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await,
        Ok(Ok(0))
    )
}

fn raw_get(path: &str, key: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n{extra}\r\n")
}

/// Pipelined requests on one connection are answered in order, whichever side serves them:
/// plain GETs on the fast path, a POST with a body by hyper, which takes over the connection
/// with the bytes already read and serves what follows.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_handoff_to_hyper() {
    use tokio::io::AsyncWriteExt;
    let s = setup("").await;
    let k = &s.live;
    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let post = format!(
        "POST /api/three HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {k}\r\n\
         Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{{\"n\":3}}"
    );
    let all = raw_get("/api/one", k, "")
        + &raw_get("/api/two?x=1", k, "X-Request-Id: mine-2\r\n")
        + &post
        + &raw_get("/api/four", k, "");
    conn.write_all(all.as_bytes()).await.unwrap();
    let answers = read_raw(&mut conn, &[false; 4]).await;
    let echoed: Vec<(String, String, Value)> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{}", a.body);
            assert!(a.header("x-request-id").is_some());
            let v: Value = serde_json::from_str(&a.body).unwrap();
            (
                v["method"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
                v["query"].clone(),
            )
        })
        .collect();
    let expect = [
        ("GET", "/v1/one", Value::Null),
        ("GET", "/v1/two", Value::from("x=1")),
        ("POST", "/v1/three", Value::Null),
        ("GET", "/v1/four", Value::Null),
    ];
    for (got, want) in echoed.iter().zip(expect) {
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), &got.2),
            (want.0, want.1, &want.2)
        );
    }
    assert_eq!(answers[1].header("x-request-id"), Some("mine-2"));
    assert!(
        answers.iter().all(|a| a.header("date").is_some()),
        "every answer is dated"
    );
    // Still open after the handoff.
    conn.write_all(raw_get("/api/five", k, "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_raw(&mut conn, &[false]).await[0].status, 200);
}

/// A kept-alive connection that has gone idle (it gives its buffers back while it waits) reads
/// its next requests whole, however they come: a head split over three writes with pauses
/// between them, three pipelined heads in one write, and a head that arrives byte by byte;
/// each is answered once, in order, on the same connection.
#[tokio::test]
async fn an_idle_connection_reads_its_next_requests_whole_however_they_arrive() {
    use tokio::io::AsyncWriteExt;
    let s = setup("").await;
    let k = &s.live;
    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    let path_of = |a: &RawResponse| {
        assert_eq!(a.status, 200, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        v["path"].as_str().unwrap().to_string()
    };
    conn.write_all(raw_get("/api/first", k, "").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        path_of(&read_raw(&mut conn, &[false]).await[0]),
        "/v1/first"
    );

    // Idle, then a head in three pieces.
    let split = raw_get("/api/split", k, "X-Request-Id: split-1\r\n");
    let (a, rest) = split.split_at(7);
    let (b, c) = rest.split_at(rest.len() / 2);
    for piece in [a, b, c] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        conn.write_all(piece.as_bytes()).await.unwrap();
    }
    let answer = read_raw(&mut conn, &[false]).await;
    assert_eq!(path_of(&answer[0]), "/v1/split");
    assert_eq!(answer[0].header("x-request-id"), Some("split-1"));

    // Idle, then three heads in one write.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let three = raw_get("/api/p1", k, "") + &raw_get("/api/p2", k, "") + &raw_get("/api/p3", k, "");
    conn.write_all(three.as_bytes()).await.unwrap();
    let paths: Vec<String> = read_raw(&mut conn, &[false; 3])
        .await
        .iter()
        .map(path_of)
        .collect();
    assert_eq!(paths, ["/v1/p1", "/v1/p2", "/v1/p3"]);

    // Idle, then a head byte by byte.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for byte in raw_get("/api/slow", k, "").as_bytes() {
        conn.write_all(&[*byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(path_of(&read_raw(&mut conn, &[false]).await[0]), "/v1/slow");
}

/// HEAD answers carry the length and no body; `Connection: close` is honoured and said back;
/// a response of unknown length is sent chunked and arrives whole.
#[tokio::test]
async fn head_close_and_chunked_answers_are_framed_as_http_1_1_requires() {
    use tokio::io::AsyncWriteExt;
    let s = setup("").await;
    let k = &s.live;
    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let both = raw_get("/api/h", k, "").replacen("GET", "HEAD", 1)
        + &raw_get("/api/last", k, "Connection: keep-alive, Close\r\n");
    conn.write_all(both.as_bytes()).await.unwrap();
    let answers = read_raw(&mut conn, &[true, false]).await;
    assert_eq!(answers[0].status, 200);
    let length: usize = answers[0]
        .header("content-length")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        length > 0,
        "HEAD keeps the length of the body it does not send"
    );
    assert_eq!(answers[0].header("connection"), None);
    assert_eq!(answers[1].header("connection"), Some("close"));
    assert!(answers[1].body.contains("/v1/last"));
    assert!(
        closes(&mut conn).await,
        "closed after the answer to Connection: close"
    );

    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    conn.write_all(raw_get("/live-only/stream", k, "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut wire = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut wire)
        .await
        .unwrap();
    let wire = String::from_utf8_lossy(&wire).to_ascii_lowercase();
    assert!(wire.contains("transfer-encoding: chunked\r\n"), "{wire}");
    assert!(
        wire.ends_with("\r\n0\r\n\r\n"),
        "the last chunk ends it: {wire}"
    );
    let resp = client()
        .get(s.gw.url("/live-only/stream"))
        .bearer_auth(k)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"part\":1,\"part\":2}");
}

/// What the fast path does not take gets hyper's answer: HTTP/1.0 is served, a malformed head
/// is a 400.
#[tokio::test]
async fn http_1_0_and_malformed_requests_get_hypers_answers() {
    use tokio::io::AsyncWriteExt;
    let s = setup("").await;
    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let old = raw_get("/api/old", &s.live, "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    conn.write_all(old.as_bytes()).await.unwrap();
    let answer = read_raw(&mut conn, &[false]).await;
    assert_eq!(answer[0].status, 200);
    assert!(answer[0].body.contains("/v1/old"));

    let mut conn = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    conn.write_all(b"GET /api/x HTTP/1.1\r\nHost: gateway\r\nno colon here\r\n\r\n")
        .await
        .unwrap();
    let mut wire = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut wire),
    )
    .await;
    let wire = String::from_utf8_lossy(&wire);
    assert!(wire.starts_with("HTTP/1.1 400"), "{wire}");
}

/// On shutdown an idle keep-alive connection is closed at once and a request in flight is
/// answered, with `Connection: close`.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_answers_the_one_in_flight() {
    use tokio::io::AsyncWriteExt;
    let mut s = setup("").await;
    let k = s.live.clone();
    let mut idle = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    idle.write_all(raw_get("/api/first", &k, "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_raw(&mut idle, &[false]).await[0].status, 200);
    let before = s.up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let mut busy = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    busy.write_all(raw_get("/live-only/slow", &k, "").as_bytes())
        .await
        .unwrap();
    let hits = s.up.hits.clone();
    common::until("the slow request reached the upstream", || {
        hits.load(std::sync::atomic::Ordering::SeqCst) > before
    })
    .await;
    s.gw.shutdown().await;
    let answer = read_raw(&mut busy, &[false]).await;
    assert_eq!(answer[0].status, 200, "{}", answer[0].body);
    assert_eq!(answer[0].header("connection"), Some("close"));
    assert!(closes(&mut busy).await);
    assert!(closes(&mut idle).await, "the idle connection was closed");
}
