//! Fault injection: what apitree loses when a dependency goes away under it. Expected, in each
//! test: nothing. Slack answering 500 and 429 for a minute; PostgreSQL going away at every point
//! of a Slack delivery pass and of a health sweep (a pass-through in front of the real server
//! drops its connections, as a restart does); Redis stopping under load.
//! The operator killed mid-gate is in `tests/controller.rs` (a restarted operator resumes
//! from status); killed with undelivered Slack messages, in `tests/slack.rs`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apitree::crd::gateway::{DriftPolicy, KeyScope};
use apitree::detect::{IncidentEvent, Severity};
use apitree::notify::outbox::Outbox;
use apitree::notify::slack::SlackDelivery;
use apitree::notify::Notifier;
use apitree::operator::gateway::sweep::{sweep_gateway, SweepTarget};
use apitree::proxy::limiter::Limiter;
use apitree::proxy::metrics::ProxyMetrics;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use common::faults::FaultProxy;
use common::gateway::{client, key_entry, start_gateway, start_upstream};
use common::slack::{channels, config, notice, start_stand_in, StandIn, TOKEN};

/// The real PostgreSQL server's address (from `APITREE_TEST_PG`, default 127.0.0.1:5432).
fn postgres_addr() -> SocketAddr {
    let url = common::server_url();
    let host = url.rsplit('@').next().unwrap_or(&url);
    let host = host.trim_start_matches("postgres://").trim_end_matches('/');
    std::net::ToSocketAddrs::to_socket_addrs(host)
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| "127.0.0.1:5432".parse().unwrap())
}

/// The test database's URL with the connection going through `proxy`.
fn through(proxy: &FaultProxy, db: &common::TestDb) -> String {
    format!("postgres://postgres@{}/{}", proxy.addr, db.name)
}

/// Open → escalate → resolve for `incidents` incidents, with texts unique per notice.
async fn notify_lifecycles(notifier: &Notifier, incidents: &[Uuid], step: usize) {
    let (event, severity) = [
        (IncidentEvent::Open, Severity::Warning),
        (IncidentEvent::Escalate, Severity::Critical),
        (IncidentEvent::Resolve, Severity::Warning),
    ][step];
    for (i, id) in incidents.iter().enumerate() {
        let ratio = 3.0 + i as f64 * 0.1 + step as f64 * 2.0;
        let mut n = notice(*id, step as u32 + 1, event, severity, ratio);
        n.gateway = format!("apis/gw-{i}");
        notifier.notify(&n).await.unwrap();
    }
}

/// Every outbox row, in order: (incident, method it is sent with, text, delivered ts).
async fn outbox_rows(pool: &PgPool) -> Vec<(Uuid, &'static str, String, Option<String>, bool)> {
    let rows: Vec<(Uuid, String, Value, Option<String>, bool)> = sqlx::query_as(
        "SELECT incident_id, kind, payload, slack_ts, delivered_at IS NOT NULL
         FROM notification_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, kind, body, ts, delivered)| {
            let method = if kind == "update" {
                "chat.update"
            } else {
                "chat.postMessage"
            };
            let text = body["text"].as_str().unwrap_or("").to_string();
            (id, method, text, ts, delivered)
        })
        .collect()
}

/// Each outbox row reached Slack exactly once (a successful call with its method and text),
/// each incident's rows in the order they were accepted, and every update and thread reply
/// names the incident's one posted message.
fn assert_each_row_answered_once_in_order(
    rows: &[(Uuid, &'static str, String, Option<String>, bool)],
    stand_in: &Mutex<StandIn>,
) {
    let s = stand_in.lock().unwrap();
    let mut last_call_of: std::collections::HashMap<Uuid, usize> = Default::default();
    let mut main_ts: std::collections::HashMap<Uuid, String> = Default::default();
    for (id, method, text, ts, delivered) in rows {
        assert!(delivered, "a row was never delivered: {text}");
        let calls: Vec<usize> = s
            .answered
            .iter()
            .enumerate()
            .filter(|(_, (m, b))| m == method && b["text"].as_str() == Some(text))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            calls.len(),
            1,
            "{method} {text:?} sent {} times",
            calls.len()
        );
        let at = calls[0];
        if let Some(before) = last_call_of.insert(*id, at) {
            assert!(
                before < at,
                "incident {id}: {text:?} overtook an earlier row"
            );
        }
        let body = &s.answered[at].1;
        match (*method, body.get("ts"), body.get("thread_ts")) {
            ("chat.postMessage", None, None) if !main_ts.contains_key(id) => {
                main_ts.insert(*id, ts.clone().expect("a posted main row keeps its ts"));
            }
            ("chat.update", Some(t), _) | ("chat.postMessage", _, Some(t)) => {
                assert_eq!(t.as_str(), main_ts.get(id).map(String::as_str));
            }
            // A cross-post to another channel stands alone.
            ("chat.postMessage", None, None) => assert!(text.contains("escalated")),
            other => panic!("unexpected call shape {other:?}"),
        }
    }
    for (_, body, auth) in &s.calls {
        assert!(!body.to_string().contains(TOKEN));
        assert_eq!(auth, &format!("Bearer {TOKEN}"));
    }
}

/// Slack answers every call with 500 or 429 (Retry-After: 1) for a minute while incidents
/// open, escalate and resolve; the delivery loop runs as in the operator. Lost: nothing — every
/// notification reaches Slack once after the outage, each incident's messages in order, its
/// updates and replies on its one message. (After the outage the rows' remaining back-off is
/// skipped; the back-off itself is tested in `tests/slack.rs`.)
#[tokio::test]
async fn slack_failing_for_a_minute_loses_nothing_and_keeps_each_incidents_order() {
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let (addr, stand_in) = start_stand_in().await;
    let outage = Duration::from_secs(60);
    stand_in.lock().unwrap().outage_until = Some(Instant::now() + outage);
    let outbox = Arc::new(Outbox::postgres(pool.clone()));
    let notifier = Notifier::Slack {
        outbox: outbox.clone(),
        channels: channels(),
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let delivery = tokio::spawn(SlackDelivery::new(&config(addr), outbox.clone()).run(
        Duration::from_millis(200),
        async move { s.notified().await },
    ));
    let incidents: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for step in 0..3 {
        notify_lifecycles(&notifier, &incidents, step).await;
        tokio::time::sleep(outage / 4).await;
    }
    tokio::time::sleep(outage / 4 + Duration::from_millis(500)).await;
    let failed: Vec<u16> = stand_in
        .lock()
        .unwrap()
        .failed
        .iter()
        .map(|f| f.2)
        .collect();
    assert!(
        failed.contains(&500) && failed.contains(&429),
        "the outage was hit: {failed:?}"
    );
    let mut pending = i64::MAX;
    for _ in 0..100 {
        sqlx::query("UPDATE notification_outbox SET next_attempt_at = now() WHERE delivered_at IS NULL AND attempts > 0")
            .execute(&pool)
            .await
            .unwrap();
        pending = outbox.pending_count().await.unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.notify_one();
    delivery.await.unwrap();
    assert_eq!(
        pending, 0,
        "notifications still undelivered after the outage"
    );
    let rows = outbox_rows(&pool).await;
    assert_eq!(
        rows.len(),
        3 * (2 + 3 + 2),
        "open, escalate (+ cross-post), resolve"
    );
    assert_each_row_answered_once_in_order(&rows, &stand_in);
}

/// PostgreSQL goes away at every point of a delivery pass in turn — while rows are claimed,
/// between Slack's answer and the outbox's record of it, while a failure is recorded — and
/// comes back. Lost: nothing, and nothing is sent twice: what Slack accepted while the outbox
/// could not record it is recorded first when the database is back (never posted again), and
/// rows the pass did not get to are given back at once instead of after their claim lapses.
#[tokio::test]
async fn postgres_going_away_at_any_point_of_a_delivery_sends_nothing_twice_and_loses_nothing() {
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let proxy = FaultProxy::start(postgres_addr()).await;
    let (addr, stand_in) = start_stand_in().await;
    let mut point = 1;
    let mut answered_unrecorded = 0;
    loop {
        sqlx::query("TRUNCATE notification_outbox")
            .execute(&pool)
            .await
            .unwrap();
        {
            let mut s = stand_in.lock().unwrap();
            s.calls.clear();
            s.answered.clear();
            // The first call fails, so a failure's record is on the way too.
            s.failures = vec![500];
        }
        let notifier = Notifier::Slack {
            outbox: Arc::new(Outbox::postgres(pool.clone())),
            channels: channels(),
        };
        let incidents: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        notify_lifecycles(&notifier, &incidents, 0).await;
        // The deliverer's own pool goes through the pass-through.
        let via = apitree::db::connect(&through(&proxy, &db), 2)
            .await
            .unwrap();
        let delivery = SlackDelivery::new(&config(addr), Arc::new(Outbox::postgres(via.clone())));
        proxy.down_at_write(point);
        let cut = delivery.deliver_due().await.is_err() || proxy.is_down();
        let writes = proxy.writes();
        let sent = stand_in.lock().unwrap().answered.len();
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notification_outbox WHERE delivered_at IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if sent as i64 > recorded {
            answered_unrecorded += 1;
        }
        proxy.up();
        // The same deliverer carries on once the database is back. Rows it never took are
        // due again at once; only a failed attempt's back-off is skipped here. Should rows
        // still wait, their claims are then let lapse (as a minute would), which would send
        // again anything Slack accepted but this deliverer forgot.
        let pending = || async {
            Outbox::postgres(pool.clone())
                .pending_count()
                .await
                .unwrap()
        };
        let mut waited_for_claims = false;
        for round in 0..60 {
            if delivery.deliver_due().await.is_ok() && pending().await == 0 {
                break;
            }
            waited_for_claims |= round >= 30;
            let lapse = if round >= 30 { "TRUE" } else { "attempts > 0" };
            common::exec(&pool, format!("UPDATE notification_outbox SET next_attempt_at = now() WHERE delivered_at IS NULL AND {lapse}"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        via.close().await;
        let rows = outbox_rows(&pool).await;
        assert_eq!(rows.len(), 4);
        assert_each_row_answered_once_in_order(&rows, &stand_in);
        assert!(
            !waited_for_claims,
            "cut at write {point}: rows waited for their claims to lapse"
        );
        if !cut {
            // The pass finished before the cut point: every point has been tried.
            assert!(writes < point);
            break;
        }
        point += 1;
    }
    assert!(point > 4, "the pass was cut at {point} points only");
    assert!(
        answered_unrecorded > 0,
        "no cut fell between Slack's answer and the outbox's record of it"
    );
}

/// A gateway database with tenant isolation switched off (security drift).
async fn switch_off_tenant_isolation(pool: &PgPool) {
    sqlx::query("ALTER TABLE api_keys DISABLE ROW LEVEL SECURITY")
        .execute(pool)
        .await
        .unwrap();
}

/// PostgreSQL goes away at every point of a health sweep in turn (under `driftPolicy: auto`
/// and `report`). The sweep never reports what it did not see: it either completes with the
/// database's true drift or says it failed, and a gateway keeps its last completed check in
/// status (and its security-drift incident open) through a failed sweep; once the database is
/// back the next sweep fixes the drift (auto) and the incident resolves.
#[tokio::test]
async fn postgres_going_away_at_any_point_of_a_sweep_never_reports_a_false_state() {
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let proxy = FaultProxy::start(postgres_addr()).await;
    common::gateway::install_crypto();
    let http = reqwest::Client::new();
    for policy in [DriftPolicy::Report, DriftPolicy::Auto] {
        let target = SweepTarget {
            gateway: "shop".into(),
            database_url: Some(through(&proxy, &db)),
            policy,
            upstreams: Vec::new(),
            unresolved: None,
            retention: Default::default(),
        };
        let mut point = 1;
        let mut failed = 0;
        loop {
            switch_off_tenant_isolation(&pool).await;
            proxy.down_at_write(point);
            let o = sweep_gateway(&target, &http, chrono::Utc::now()).await;
            let went_down = proxy.is_down();
            proxy.up();
            let truth = apitree::drift::fix::check(&pool, false).await.unwrap();
            match &o.drift {
                Some(d) => assert_eq!(
                    d.security,
                    truth.summary(String::new()).security,
                    "{policy:?}, cut at {point}: the sweep reported drift the database does not have"
                ),
                None => assert!(
                    !o.problems.is_empty(),
                    "{policy:?}, cut at {point}: no drift result and no problem"
                ),
            }
            if !o.problems.is_empty() {
                failed += 1;
                assert!(went_down, "a problem without a fault: {:?}", o.problems);
            }
            if !went_down {
                break;
            }
            point += 1;
        }
        assert!(
            failed >= 3,
            "{policy:?}: only {failed} of {point} cuts failed the sweep"
        );
    }

    // Through a gateway: a completed sweep with security drift, a failed one, a fixing one.
    let notifier = Notifier::recording();
    let mut m = apitree::operator::gateway::rollout::Managed::new(
        "shop",
        serde_json::from_value(serde_json::json!({"replicas": 1, "proxy": {"routes": []}}))
            .unwrap(),
        1,
        Arc::new(notifier),
        Arc::new(apitree::detect::engine::IncidentStore::memory()),
        None,
    );
    let target = SweepTarget {
        gateway: "shop".into(),
        database_url: Some(through(&proxy, &db)),
        policy: DriftPolicy::Report,
        upstreams: Vec::new(),
        unresolved: None,
        retention: Default::default(),
    };
    switch_off_tenant_isolation(&pool).await;
    m.runtime.sweep = Some(sweep_gateway(&target, &http, chrono::Utc::now()).await);
    m.apply_sweep(k8s_openapi::jiff::Timestamp::now()).await;
    let seen = m
        .status
        .drift
        .clone()
        .expect("a completed check is in status");
    assert!(seen.security > 0);
    let open = |m: &apitree::operator::gateway::rollout::Managed| {
        m.runtime.incidents.iter().filter(|i| !i.resolved).count()
    };
    assert_eq!(open(&m), 1, "security drift is an incident");
    proxy.down();
    m.runtime.sweep = Some(sweep_gateway(&target, &http, chrono::Utc::now()).await);
    m.apply_sweep(k8s_openapi::jiff::Timestamp::now()).await;
    assert_eq!(
        m.status.drift.as_ref(),
        Some(&seen),
        "the last completed check stays"
    );
    assert_eq!(open(&m), 1, "a failed sweep resolves nothing");
    assert!(m
        .runtime
        .events
        .iter()
        .any(|e| e.reason == "HealthSweepFailed"));
    proxy.up();
    let fixing = SweepTarget {
        policy: DriftPolicy::Auto,
        ..target
    };
    m.runtime.sweep = Some(sweep_gateway(&fixing, &http, chrono::Utc::now()).await);
    m.apply_sweep(k8s_openapi::jiff::Timestamp::now()).await;
    assert_eq!(m.status.drift.as_ref().map(|d| d.security), Some(0));
    assert_eq!(open(&m), 0, "fixed drift resolves the incident");

    // Found and fixed by one sweep (auto) still pages: the incident opens and resolves at
    // once, and only once however many passes see that sweep.
    let notifier = Arc::new(Notifier::recording());
    let mut fresh = apitree::operator::gateway::rollout::Managed::new(
        "cart",
        serde_json::from_value(serde_json::json!({"replicas": 1, "proxy": {"routes": []}}))
            .unwrap(),
        1,
        notifier.clone(),
        Arc::new(apitree::detect::engine::IncidentStore::memory()),
        None,
    );
    switch_off_tenant_isolation(&pool).await;
    fresh.runtime.sweep = Some(sweep_gateway(&fixing, &http, chrono::Utc::now()).await);
    for _ in 0..2 {
        fresh.apply_sweep(k8s_openapi::jiff::Timestamp::now()).await;
    }
    let told: Vec<_> = notifier
        .recorded()
        .iter()
        .map(|n| (n.event, n.severity))
        .collect();
    assert_eq!(
        told,
        [
            (IncidentEvent::Open, Severity::Critical),
            (IncidentEvent::Resolve, Severity::None)
        ]
    );
    assert_eq!(fresh.status.drift.as_ref().map(|d| d.security), Some(0));
}

/// Redis stops under load and comes back: every request is still answered (no 5xx, no
/// dropped connection) with limits decided locally, the fallback is counted (the chart's
/// `ApitreeRateLimitStoreDown` alert fires on it) and readiness says `degraded`; once Redis
/// is back, decisions are shared again (the fallback count stops) and readiness says `ok`.
#[tokio::test]
async fn redis_stopping_under_load_falls_back_alerts_and_recovers() {
    let redis: SocketAddr = std::env::var("APITREE_TEST_REDIS")
        .ok()
        .and_then(|u| u.trim_start_matches("redis://").parse().ok())
        .unwrap_or_else(|| "127.0.0.1:6379".parse().unwrap());
    let proxy = FaultProxy::start(redis).await;
    let up = start_upstream().await;
    let (key, entry) = key_entry(KeyScope::Live, "o", "");
    let org = format!("org-{}", Uuid::new_v4().simple());
    let entry = entry.replace("org: o", &format!("org: {org}"));
    let yaml = format!(
        "tiers:\n  - {{ name: t, perKey: {{ burst10s: 100000, perMinute: 100000, perDay: 1000000 }}, perOrg: {{ burst10s: 100000, perMinute: 100000, perDay: 1000000 }} }}\ndefaultTier: t\norgs: [{{ id: {org} }}]\nkeys:\n{entry}routes:\n  - {{ name: r, pathPrefix: /, upstream: \"http://{}/\" }}\n",
        up.addr.unwrap()
    );
    let metrics = ProxyMetrics::new();
    let limiter = Limiter::shared(&format!("redis://{}", proxy.addr), metrics.clone()).unwrap();
    let gw = Arc::new(start_gateway(&yaml, Some(limiter)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (gw, stop, answered, bad) =
                (gw.clone(), stop.clone(), answered.clone(), bad.clone());
            let key = key.expose_secret().to_string();
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    match c.get(gw.url("/x")).bearer_auth(&key).send().await {
                        Ok(r) if r.status() == 200 => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => bad.lock().unwrap().push(r.status().to_string()),
                        Err(e) => bad.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let wait_for = |want: &'static str| {
        let gw = gw.clone();
        async move {
            for _ in 0..100 {
                if gw.readiness().await["rateLimitStore"] == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(wait_for("ok").await, "shared limits before the outage");
    // A hundred decisions with Redis up: none falls back.
    let start = answered.load(Ordering::Relaxed);
    common::until_within("100 requests answered", Duration::from_secs(10), || {
        answered.load(Ordering::Relaxed) >= start + 100
    })
    .await;
    assert_eq!(metrics.limiter_fallbacks.get(), 0);
    let before = answered.load(Ordering::Relaxed);

    proxy.down();
    assert!(
        wait_for("degraded").await,
        "readiness says degraded while Redis is down"
    );
    common::until_within(
        "requests served and fallbacks counted during the outage",
        Duration::from_secs(10),
        || answered.load(Ordering::Relaxed) > before + 20 && metrics.limiter_fallbacks.get() > 0,
    )
    .await;
    let during = answered.load(Ordering::Relaxed);
    assert!(
        during > before + 20,
        "requests kept being served: {before} → {during}"
    );
    assert!(
        metrics.limiter_fallbacks.get() > 0,
        "the fallback is counted"
    );

    proxy.up();
    assert!(
        wait_for("ok").await,
        "readiness recovers once Redis is back"
    );
    // Decisions that were waiting on Redis when it came back may still fall back: settled once
    // 200 more requests are answered without a new fallback.
    let mut rounds = 0;
    let settled = loop {
        rounds += 1;
        assert!(
            rounds <= 10,
            "decisions kept falling back after Redis came back"
        );
        let (fallbacks, at) = (
            metrics.limiter_fallbacks.get(),
            answered.load(Ordering::Relaxed),
        );
        common::until_within(
            "200 more requests answered",
            Duration::from_secs(10),
            || answered.load(Ordering::Relaxed) >= at + 200,
        )
        .await;
        if metrics.limiter_fallbacks.get() == fallbacks {
            break fallbacks;
        }
    };
    let at = answered.load(Ordering::Relaxed);
    common::until_within(
        "200 more requests answered",
        Duration::from_secs(10),
        || answered.load(Ordering::Relaxed) >= at + 200,
    )
    .await;
    let after = answered.load(Ordering::Relaxed);
    assert_eq!(
        metrics.limiter_fallbacks.get(),
        settled,
        "decisions are shared again after the outage"
    );
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert!(
        after > during,
        "requests kept being served after the outage"
    );
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "requests failed: {:?}",
        &bad[..bad.len().min(5)]
    );
}
