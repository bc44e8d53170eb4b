//! The ApiGateway loop end to end on the local platform: real in-process proxies behind real
//! front listeners, a real upstream, synthetic clients over HTTP, and the gate and detector
//! deciding. Also `apitree demo` itself, run as a user would.
//!
//! Tests here share two cores with real traffic and latency checks, so they take turns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apitree::crd::duration::KubeDuration;
use apitree::crd::gateway::{ApiGatewaySpec, CheckPhase, Color, GatewayPhase};
use apitree::demo::{self, SampleApi, Tour};
use apitree::entities::keys::ApiKey;
use apitree::notify::Notifier;
use apitree::operator::gateway::rollout::Managed;
use apitree::platform::Platform;

mod common;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Run {
    tour: Tour,
    api: SampleApi,
    key: ApiKey,
    notifier: Arc<Notifier>,
    stop: Arc<AtomicBool>,
    traffic: Vec<tokio::task::JoinHandle<()>>,
    upstream: String,
}

/// The demo's spec with fast windows, tweaked by `f`.
fn fast_spec(upstream: &str, f: impl FnOnce(&mut ApiGatewaySpec)) -> ApiGatewaySpec {
    let mut spec = demo::spec(&format!("{upstream}/weather/"), &format!("{upstream}/fx/"));
    spec.gate.observation_window = KubeDuration::from_secs(2);
    spec.gate.min_samples = 50;
    spec.gate.rollback_window = KubeDuration::from_secs(60);
    spec.detection.window = KubeDuration::from_secs(1);
    spec.detection.min_requests = 50;
    f(&mut spec);
    spec
}

impl Run {
    async fn start(f: impl FnOnce(&mut ApiGatewaySpec)) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = demo::start_sample_api().await.unwrap();
        api.weather_failure_per_mille.store(0, Ordering::Relaxed);
        let upstream = format!("http://{}", api.addr);
        let notifier = Arc::new(Notifier::recording());
        let (ctx, key) = demo::local_context(notifier.clone(), None).unwrap();
        let m = Managed::new(
            "shop",
            fast_spec(&upstream, f),
            1,
            notifier.clone(),
            ctx.store.clone(),
            None,
        );
        Self {
            tour: Tour::new(m, ctx),
            api,
            key,
            notifier,
            stop: Arc::new(AtomicBool::new(false)),
            traffic: Vec::new(),
            upstream,
        }
    }

    /// First deploy, then synthetic clients on the active endpoint.
    async fn serving(f: impl FnOnce(&mut ApiGatewaySpec)) -> Self {
        let mut run = Self::start(f).await;
        run.until("first deploy", 20, |m| {
            m.status.phase == Some(GatewayPhase::Stable)
        })
        .await;
        let active = run.active_url().await;
        run.traffic = demo::start_traffic(
            active,
            run.tour.preview.clone(),
            run.key.expose_secret().to_string(),
            run.stop.clone(),
        );
        run
    }

    async fn until(&mut self, what: &'static str, secs: u64, done: impl Fn(&Managed) -> bool) {
        if let Err(e) = self.tour.until(what, Duration::from_secs(secs), done).await {
            panic!(
                "{e}\nstatus: {}\nevents: {:#?}",
                serde_json::to_string_pretty(&self.tour.m.status).unwrap(),
                self.tour.m.runtime.events
            );
        }
    }

    async fn active_url(&self) -> String {
        self.tour.ctx.platform.active_url("shop").await.unwrap()
    }

    /// GET through the active endpoint with the valid key.
    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.active_url().await))
            .bearer_auth(self.key.expose_secret())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    fn edit(&mut self, f: impl FnOnce(&mut ApiGatewaySpec)) {
        let mut spec = self.tour.m.spec.clone();
        f(&mut spec);
        self.tour.set_spec(spec);
    }

    fn notice_kinds(&self) -> Vec<String> {
        self.notifier
            .recorded_rollouts()
            .into_iter()
            .map(|n| n.kind)
            .collect()
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.traffic {
            let _ = t.await;
        }
        self.tour.ctx.platform.shutdown().await;
        drop(self.api);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_revision_passes_five_checks_and_takes_traffic_while_blue_stays_warm() {
    let _turn = TURN.lock().await;
    let mut run = Run::serving(|_| {}).await;
    let first = run.tour.m.status.active_revision.clone().unwrap();
    assert_eq!(run.tour.m.status.active_color, Some(Color::Blue));
    // The new revision adds a route: before the switch the gateway does not know it.
    assert_eq!(run.get("/geo/seoul").await.0, 404);
    let upstream = run.upstream.clone();
    run.edit(|s| {
        let mut geo = s.proxy.routes[1].clone();
        geo.name = "geo".into();
        geo.path_prefix = "/geo/".into();
        geo.upstream = format!("{upstream}/fx/");
        s.proxy.routes.push(geo);
    });
    run.until("promotion", 30, |m| {
        m.status.phase == Some(GatewayPhase::Promoting)
    })
    .await;
    let status = run.tour.m.status.clone();
    assert_ne!(status.active_revision.as_deref(), Some(first.as_str()));
    assert_eq!(status.active_color, Some(Color::Green));
    assert_eq!(status.previous_revision.as_deref(), Some(first.as_str()));
    let gate = status.gate.unwrap();
    assert_eq!(gate.progress, "5/5");
    let phases: Vec<CheckPhase> = gate.checks.iter().map(|c| c.phase).collect();
    assert_eq!(
        phases,
        [
            CheckPhase::Passed,
            CheckPhase::Passed,
            CheckPhase::Skipped,
            CheckPhase::Passed,
            CheckPhase::Passed
        ]
    );
    let analysis = &gate.checks[4];
    assert!(analysis.samples.unwrap() >= 50, "{analysis:?}");
    assert!(analysis.p_value.is_some());
    assert_eq!(
        gate.checks[3].observed.as_deref(),
        Some("2/2 probes passed")
    );
    // Traffic switched: the new route answers through the same front listener.
    assert_eq!(run.get("/geo/seoul").await.0, 200);
    // Blue is kept warm for the rollback window.
    let blue = run
        .tour
        .ctx
        .platform
        .admin_urls("shop", Color::Blue, false)
        .await
        .unwrap();
    assert_eq!(blue.len(), 2);
    let kinds = run.notice_kinds();
    assert_eq!(kinds, ["Deployed", "GateStarted", "Promoted"]);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_with_a_broken_upstream_is_refused_and_blue_keeps_serving() {
    let _turn = TURN.lock().await;
    let mut run = Run::serving(|_| {}).await;
    let first = run.tour.m.status.active_revision.clone().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    run.edit(|s| s.proxy.routes[0].upstream = format!("http://127.0.0.1:{dead}/weather/"));
    run.until("refusal", 30, |m| {
        m.status.phase == Some(GatewayPhase::Rejected)
    })
    .await;
    let status = run.tour.m.status.clone();
    assert_eq!(status.active_revision.as_deref(), Some(first.as_str()));
    let rejected = status.rejected_revision.unwrap();
    assert!(
        rejected
            .reason
            .starts_with("smoke check failed: weather-today: GET /weather/today → 502"),
        "{}",
        rejected.reason
    );
    assert!(run
        .tour
        .ctx
        .platform
        .admin_urls("shop", Color::Green, false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(run.get("/weather/today").await.0, 200);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "RevisionRejected");
    // The refused revision is not retried while the spec still asks for it.
    for _ in 0..6 {
        run.tour.tick().await;
    }
    let started = run
        .notice_kinds()
        .iter()
        .filter(|k| *k == "GateStarted")
        .count();
    assert_eq!(started, 1);
    assert_eq!(run.tour.m.runtime.runs.len(), 1);
    assert_eq!(run.tour.m.runtime.runs[0].outcome.as_str(), "rejected");
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_incident_inside_the_rollback_window_switches_back_to_blue() {
    let _turn = TURN.lock().await;
    let mut run = Run::serving(|_| {}).await;
    let first = run.tour.m.status.active_revision.clone().unwrap();
    // Let the detector learn what normal looks like on blue.
    run.until("baseline", 30, |m| m.runtime.error_ratios.len() >= 5)
        .await;
    let upstream = run.upstream.clone();
    run.edit(|s| s.proxy.routes[0].upstream = format!("{upstream}/v2/weather/"));
    run.until("promotion", 30, |m| {
        m.status.phase == Some(GatewayPhase::Promoting)
    })
    .await;
    // The new revision's upstream starts failing half its calls after the switch.
    run.api.v2_failure_per_mille.store(500, Ordering::Relaxed);
    run.until("automatic rollback", 30, |m| {
        m.status.phase == Some(GatewayPhase::RolledBack)
    })
    .await;
    let status = run.tour.m.status.clone();
    assert_eq!(status.active_revision.as_deref(), Some(first.as_str()));
    assert_eq!(status.active_color, Some(Color::Blue));
    let rejected = status.rejected_revision.unwrap();
    assert!(
        rejected
            .reason
            .starts_with("critical incident inside the rollback window"),
        "{}",
        rejected.reason
    );
    assert!(
        rejected.reason.contains("route weather"),
        "{}",
        rejected.reason
    );
    // Blue serves again; the bad green is gone.
    for _ in 0..20 {
        assert_eq!(run.get("/weather/today").await.0, 200);
    }
    assert!(run
        .tour
        .ctx
        .platform
        .admin_urls("shop", Color::Green, false)
        .await
        .unwrap()
        .is_empty());
    let outcomes: Vec<&str> = run
        .tour
        .m
        .runtime
        .runs
        .iter()
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["promoted", "rolled_back"]);
    assert!(run.notice_kinds().contains(&"RolledBack".to_string()));
    run.finish().await;
}

/// A spec that cannot run, whether the spec itself is wrong or the platform cannot run what it
/// asks for: `SpecValid=False` with every problem, one Event per bad generation (not one per
/// pass), nothing deployed; fixing the spec deploys.
async fn refused_with_one_event(
    brk: impl FnOnce(&mut ApiGatewaySpec),
    fix: impl FnOnce(&mut ApiGatewaySpec),
    expected: &str,
) {
    let _turn = TURN.lock().await;
    let mut run = Run::start(brk).await;
    for _ in 0..3 {
        run.tour.tick().await;
    }
    let status = &run.tour.m.status;
    assert_eq!(status.phase, Some(GatewayPhase::Degraded));
    let spec_valid = status
        .conditions
        .iter()
        .find(|c| c.type_ == "SpecValid")
        .unwrap();
    assert_eq!(spec_valid.status, "False");
    assert!(
        spec_valid.message.contains(expected),
        "{}",
        spec_valid.message
    );
    let events: Vec<_> = run.tour.m.runtime.events.iter().collect();
    assert_eq!(
        events.len(),
        1,
        "one Event per bad generation, not per pass: {events:#?}"
    );
    assert_eq!(events[0].reason, "InvalidSpec");
    assert!(events[0].warning);
    assert!(run.tour.ctx.platform.active_url("shop").await.is_none());
    run.edit(fix);
    run.until("first deploy after the fix", 20, |m| {
        m.status.phase == Some(GatewayPhase::Stable)
    })
    .await;
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_gets_a_condition_and_one_event_and_deploys_nothing() {
    refused_with_one_event(
        |s| s.proxy.routes[1].tier = Some("gold".into()),
        |s| s.proxy.routes[1].tier = None,
        "spec.proxy.routes[1].tier: tier \"gold\" is not defined",
    )
    .await;
}

/// `apitree local` cannot serve TLS: a spec asking for it is refused like any bad spec, not
/// retried (and warned about) every pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_platform_cannot_run_is_refused_once_not_retried_every_pass() {
    refused_with_one_event(
        |s| s.tls = Some(serde_json::from_value(serde_json::json!({"secretName": "t"})).unwrap()),
        |s| s.tls = None,
        "spec.tls needs a cluster",
    )
    .await;
}

/// `apitree demo --format json ARGS` without Slack or a database from the environment:
/// (exit status, stdout, stderr).
async fn run_demo(args: &[&str]) -> (std::process::ExitStatus, Vec<u8>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_apitree"))
            .args(["demo", "--format", "json"])
            .args(args)
            .env_remove("SLACK_BOT_TOKEN")
            .env_remove("DATABASE_URL")
            .env_remove("APITREE_DATABASE_URL")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes in under 3 minutes")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status, out.stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_one_json_summary_of_its_tour() {
    let _turn = TURN.lock().await;
    let (status, stdout, stderr) = run_demo(&[]).await;
    assert!(status.success(), "demo failed:\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("stdout must be exactly one JSON document: {e}"));
    let runs = summary["gate_runs"].as_array().unwrap();
    assert_eq!(
        runs[0]["checks"][2]["phase"], "Skipped",
        "no database, no schema check"
    );
    let outcomes: Vec<&str> = runs
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["promoted", "rejected", "rejected"]);
    let check = |run: usize, name: &str| -> serde_json::Value {
        runs[run]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(check(0, "analysis")["phase"], "Passed");
    assert_eq!(check(1, "smoke")["phase"], "Failed");
    assert!(runs[1]["reason"]
        .as_str()
        .unwrap()
        .contains("upstream_unreachable"));
    assert_eq!(check(2, "smoke")["phase"], "Passed");
    assert_eq!(check(2, "analysis")["phase"], "Failed");
    let incidents = summary["incidents"].as_array().unwrap();
    let weather = incidents
        .iter()
        .find(|i| i["route"] == "weather" && i["signal"] == "error ratio")
        .expect("an error-ratio incident on route weather");
    assert_eq!(weather["max_severity"], "critical");
    assert_eq!(weather["resolved"], true);
    // Deployed, 3 × (GateStarted + outcome), settled, and the incident's open, two
    // escalations and resolve at least.
    assert!(
        summary["notifications"].as_u64().unwrap() >= 12,
        "{summary}"
    );
    // Progress went to stderr, readable without Slack markup.
    assert!(
        stderr.contains("rollout demo: Promoted revision"),
        "{stderr}"
    );
    assert!(stderr.contains("escalated to critical"), "{stderr}");
    assert!(!stderr.contains(":red_circle:"), "{stderr}");
}

/// The manifest `apitree local` reads in the test: route `/status/` forwards to the runner's own
/// status API, so nothing else has to run.
/// With a database the demo runs all five checks for real (schema: at the latest migration,
/// no drift), keeps incidents in it, and adds the drift step: tenant isolation switched off,
/// a critical security-drift incident, fixed by the health sweep (an audit row) and resolved;
/// the database ends with row-level security back on. A database with tables the demo did not
/// make is refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_a_database_runs_the_schema_check_and_a_drift_step() {
    let foreign = common::TestDb::new().await;
    drop(foreign.migrated_pool().await);
    let (status, _, stderr) = run_demo(&["--database-url", &foreign.url]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("give it an empty one of its own"),
        "{stderr}"
    );

    let _turn = TURN.lock().await;
    let db = common::TestDb::new().await;
    let (status, stdout, stderr) = run_demo(&["--database-url", &db.url]).await;
    assert!(status.success(), "demo failed:\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let runs = summary["gate_runs"].as_array().unwrap();
    let outcomes: Vec<&str> = runs
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["promoted", "rejected", "rejected"]);
    let checks = runs[0]["checks"].as_array().unwrap();
    assert!(
        checks.iter().all(|c| c["phase"] == "Passed"),
        "5/5: {checks:?}"
    );
    assert!(checks[2]["observed"]
        .as_str()
        .unwrap()
        .ends_with("no drift"));
    let drift = summary["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["signal"] == "security drift")
        .unwrap_or_else(|| panic!("a security-drift incident: {summary}"));
    assert_eq!(drift["max_severity"], "critical");
    assert_eq!(drift["resolved"], true);
    assert_eq!(summary["drift"]["security"], 0);
    assert!(stderr.contains("4/6 security drift"), "{stderr}");
    assert!(stderr.contains("audit: drift.fix"), "{stderr}");

    let pool = db.pool().await;
    let rls: bool =
        sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE relname = 'api_keys'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(rls, "tenant isolation is back on");
    let kept: Vec<String> = sqlx::query_scalar("SELECT DISTINCT signal FROM incidents ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        kept,
        ["error ratio", "security drift"],
        "incidents kept in the database"
    );
    let fixes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'drift.fix' AND actor LIKE 'apitree health sweep%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(fixes >= 1);
    pool.close().await;
    // Run again on the same database: it is the demo's own.
    let (status, _, stderr) = run_demo(&["--database-url", &db.url]).await;
    assert!(
        status.success(),
        "a second demo on its own database:\n{stderr}"
    );
}

fn local_manifest(http: u16, timeout: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: apitree.io/v1alpha1
kind: ApiGateway
metadata:
  name: shop
{annotations}spec:
  replicas: 1
  proxy:
    routes:
      - name: demo
        pathPrefix: /status/
        upstream: http://127.0.0.1:{http}/api/
        timeout: {timeout}
        credential: demo-upstream
    tiers:
      - name: trial
        perKey: {{ burst10s: 100, perMinute: 600, perDay: 10000 }}
        perOrg: {{ burst10s: 100, perMinute: 600, perDay: 10000 }}
    defaultTier: trial
  gate:
    observationWindow: 2s
    minSamples: 50
    rollbackWindow: 1m
    smoke:
      - name: gateways
        path: /status/gateways
        apiKey: {{ name: shop-keys, key: live }}
---
apiVersion: v1
kind: Secret
metadata:
  name: shop-keys
stringData:
  live: at_live_V2ETpgMyz46TvDL0DjSKtIxy76bWL04e4hAc
"#
    )
}

async fn gateways(http: u16) -> Option<serde_json::Value> {
    let r = reqwest::get(format!("http://127.0.0.1:{http}/api/gateways"))
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v.as_array()?.first().cloned()
}

async fn wait_for(
    http: u16,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    for _ in 0..120 {
        if let Some(g) = gateways(http).await {
            if done(&g) {
                return g;
            }
            last = Some(g);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("apitree local never reached {what}; last view: {last:#?}");
}

/// `apitree local -f DIR` with the example proxy config, its status page on 127.0.0.1:`http`,
/// no Slack and the example's secret files (not the environment's).
fn spawn_local(dir: &std::path::Path, http: u16) -> tokio::process::Child {
    let proxy_config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/proxy.yaml");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["local", "-f"])
        .arg(dir)
        .args(["--proxy-config", proxy_config, "--http"])
        .arg(format!("127.0.0.1:{http}"))
        .env_remove("SLACK_BOT_TOKEN")
        .env_remove("APITREE_KEY_PEPPER")
        .env_remove("APITREE_MASTER_KEY")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apitree_local_runs_files_and_an_edited_file_goes_through_the_gate() {
    let _turn = TURN.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.yaml");
    std::fs::write(&file, local_manifest(http, "5s", "")).unwrap();
    let mut child = spawn_local(dir.path(), http);

    let g = wait_for(http, "Stable", |g| g["phase"] == "Stable").await;
    let first = g["activeRevision"].as_str().unwrap().to_string();
    // Through the gateway (the example key) to the runner's own status API.
    let front = g["url"].as_str().unwrap().to_string();
    let r = reqwest::Client::new()
        .get(format!("{front}/status/gateways"))
        .bearer_auth("at_live_V2ETpgMyz46TvDL0DjSKtIxy76bWL04e4hAc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        reqwest::get(format!("{front}/status/gateways"))
            .await
            .unwrap()
            .status(),
        401
    );
    let page = reqwest::get(format!("http://127.0.0.1:{http}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<title>apitree status</title>"));
    let metrics = reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("apitree_operator_reconciles_total{result=\"ok\"}"));
    assert!(metrics.contains("apitree_operator_gateways{phase=\"Stable\"} 1"));

    // Editing the file starts a gate; nobody sends traffic to the preview, so the analysis is
    // inconclusive and the gateway waits for a human.
    std::fs::write(&file, local_manifest(http, "6s", "")).unwrap();
    let g = wait_for(http, "AwaitingApproval", |g| {
        g["phase"] == "AwaitingApproval"
    })
    .await;
    let revision = g["gateRevision"].as_str().unwrap().to_string();
    assert_ne!(revision, first);
    assert_eq!(g["checks"][4]["phase"], "Inconclusive");
    assert_eq!(g["activeRevision"], first.as_str());

    // The promote annotation in the file approves it.
    let annotations = format!("  annotations:\n    apitree.io/promote: \"{revision}\"\n");
    std::fs::write(&file, local_manifest(http, "6s", &annotations)).unwrap();
    let g = wait_for(http, "Promoting", |g| g["phase"] == "Promoting").await;
    assert_eq!(g["activeRevision"], revision.as_str());

    // A file that no longer parses keeps the last good spec serving, with a warning Event.
    std::fs::write(
        &file,
        "kind: ApiGateway\nmetadata:\n  name: shop\nspec:\n  proxy: {}\n",
    )
    .unwrap();
    let g = wait_for(http, "an InvalidManifest event", |g| {
        g["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "InvalidManifest"))
    })
    .await;
    assert_eq!(g["activeRevision"], revision.as_str());
    child.kill().await.unwrap();
}

/// A bad save in `apitree local` never takes traffic down or skips the gate: a truncated file,
/// a wrong kind, a field the schema does not know, a negative replica count and a name taken by
/// a second file each keep the last good spec serving (with an `InvalidManifest` event); the
/// next valid revision, one with a dead upstream, still goes through the gate and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apitree_local_keeps_serving_through_bad_saves_and_gates_what_follows() {
    let _turn = TURN.lock().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.yaml");
    let good = local_manifest(http, "5s", "");
    std::fs::write(&file, &good).unwrap();
    let mut child = spawn_local(dir.path(), http);
    let g = wait_for(http, "Stable", |g| g["phase"] == "Stable").await;
    let first = g["activeRevision"].as_str().unwrap().to_string();
    let front = g["url"].as_str().unwrap().to_string();

    // A client calls the gateway every 200 ms throughout (within the tier's 100 per 10 s);
    // every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = {
        let (stop, failures, calls, front) =
            (stop.clone(), failures.clone(), calls.clone(), front.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .get(format!("{front}/status/gateways"))
                    .bearer_auth("at_live_V2ETpgMyz46TvDL0DjSKtIxy76bWL04e4hAc")
                    .send()
                    .await;
                calls.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let truncated = &good[..good.find("  gate:").unwrap() - 40];
    let negative = good.replace("replicas: 1", "replicas: -2");
    let unknown = good.replace("  replicas: 1\n", "  replicas: 1\n  replicaz: 2\n");
    let wrong_kind = good.replacen("kind: ApiGateway", "kind: ApiGatway", 1);
    let wrong_version = good.replacen("apitree.io/v1alpha1", "apitree.io/v2", 1);
    let bad_saves: [(&str, &str); 5] = [
        (truncated, "not valid YAML"),
        (&wrong_kind, "ApiGatway"),
        (&wrong_version, "apiVersion"),
        (&unknown, "replicaz: unknown field"),
        (&negative, "/spec/replicas"),
    ];
    for (text, says) in bad_saves {
        std::fs::write(&file, text).unwrap();
        let g = wait_for(
            http,
            &format!("an InvalidManifest event saying {says}"),
            |g| {
                g["events"].as_array().is_some_and(|e| {
                    e.iter().any(|e| {
                        e["reason"] == "InvalidManifest"
                            && e["message"].as_str().is_some_and(|m| m.contains(says))
                    })
                })
            },
        )
        .await;
        assert_eq!(g["activeRevision"], first.as_str(), "after {says}");
        assert_eq!(g["phase"], "Stable", "after {says}");
    }
    // The same name in a second file: a conflict, reported, and the gateway keeps running.
    std::fs::write(&file, &good).unwrap();
    let twin = dir.path().join("twin.yaml");
    std::fs::write(&twin, local_manifest(http, "7s", "")).unwrap();
    let g = wait_for(http, "a conflict event", |g| {
        g["events"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("defined in both"))
            })
        })
    })
    .await;
    assert_eq!(g["activeRevision"], first.as_str());
    std::fs::remove_file(&twin).unwrap();

    // Then a valid revision that cannot work (its upstream is dead): the gate, not a first
    // deploy, decides, and refuses it.
    let dead = good.replace(&format!("127.0.0.1:{http}/api/"), "127.0.0.1:9/api/");
    std::fs::write(&file, &dead).unwrap();
    let g = wait_for(http, "the dead revision refused", |g| {
        g["rejected"].is_string() && g["rejected"] != first.as_str()
    })
    .await;
    assert_eq!(g["activeRevision"], first.as_str(), "blue kept the traffic");
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(calls.load(Ordering::Relaxed) > 20);
    assert!(failures.is_empty(), "traffic failed: {failures:?}");
    child.kill().await.unwrap();
}
