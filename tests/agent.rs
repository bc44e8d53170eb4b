//! The Connector Agent end to end on loopback: a control plane (the agent hub over TLS 1.3 with
//! a certificate from a test CA) and agents that dial it, each with its own cache and local
//! file, in front of a real upstream.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apitree::agent::bundle::{AgentConfig, ConnectorRoute};
use apitree::agent::envelope::Signer;
use apitree::agent::hub::{new_token, AgentRecord, AgentsFile, Hub, PoolBinding};
use apitree::agent::run::{start, AgentOptions, RunningAgent};
use apitree::crd::gateway::KeyScope;
use apitree::entities::KeyEntry;
use common::gateway::*;
use common::pki::Pki;
use common::until;
use http_body_util::BodyExt;

/// The gateway the agents file binds pool `bank-a` to.
const GATEWAY: &str = "bank-gw";

/// The control plane's agent endpoint, restartable on the same port.
struct ControlPlane {
    hub: Arc<Hub>,
    addr: SocketAddr,
    pki: Pki,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    /// Every request the agents sent: method, path and query, headers, body.
    seen: Arc<Mutex<Vec<String>>>,
    /// While set, every request is answered 503 (a control plane that cannot be heard).
    unavailable: Arc<std::sync::atomic::AtomicBool>,
    tokens: Vec<(String, AgentRecord)>,
    signer_public: String,
}

impl ControlPlane {
    async fn start(agents: &[&str]) -> Self {
        install_crypto();
        if std::env::var_os("AGENT_TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        }
        let pki = Pki::serving();
        let signer = Signer::parse(&Signer::generate_text()).unwrap();
        let signer_public = signer.public_key().to_string();
        let tokens: Vec<_> = agents
            .iter()
            .map(|n| new_token(n, "bank-a").unwrap())
            .collect();
        let hub = Hub::new(
            signer,
            AgentsFile {
                pools: vec![PoolBinding {
                    name: "bank-a".into(),
                    gateway: GATEWAY.into(),
                }],
                agents: tokens.iter().map(|(_, r)| r.clone()).collect(),
            },
            &prometheus::Registry::new(),
        )
        .with_long_poll(Duration::from_millis(500));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cp = Self {
            hub,
            addr,
            pki,
            stop: None,
            done: None,
            seen: Arc::default(),
            unavailable: Arc::default(),
            tokens,
            signer_public,
        };
        cp.serve(listener);
        cp
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let tls = apitree::small_http::tls(
            &self.pki.path("tls.crt"),
            &self.pki.path("tls.key"),
            &prometheus::Registry::new(),
            "test_hub",
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (hub, seen) = (self.hub.clone(), self.seen.clone());
        let unavailable = self.unavailable.clone();
        self.done = Some(tokio::spawn(apitree::small_http::serve(
            listener,
            Some(tls),
            Duration::from_secs(5),
            async {
                let _ = rx.await;
            },
            move |req: http::Request<hyper::body::Incoming>, _| {
                let (hub, seen) = (hub.clone(), seen.clone());
                let unavailable = unavailable.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if unavailable {
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{\"error\":\"unavailable\"}"),
                        ));
                        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        return resp;
                    }
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let mut text = format!("{} {}\n", parts.method, parts.uri);
                    for (k, v) in &parts.headers {
                        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
                    }
                    text.push_str(&String::from_utf8_lossy(&body));
                    seen.lock().unwrap().push(text);
                    let req = http::Request::from_parts(parts, http_body_util::Full::new(body));
                    hub.handle(req).await
                }
            },
        )));
        self.stop = Some(tx);
    }

    /// Stops answering: the port refuses connections.
    async fn down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn token(&self, name: &str) -> String {
        self.tokens
            .iter()
            .find(|(_, r)| r.name == name)
            .unwrap()
            .0
            .clone()
    }

    /// Agent `name`'s options: its own directory with the local file, pepper, token.
    fn agent(&self, name: &str, dir: &Path, upstream: &str, routes: &[&str]) -> AgentOptions {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("pepper"), PEPPER).unwrap();
        let mut local = String::from(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nsecrets: { pepperFile: pepper }\nupstreams:\n",
        );
        for r in routes {
            local.push_str(&format!("  - {{ route: {r}, upstream: '{upstream}' }}\n"));
        }
        std::fs::write(dir.join("local.yaml"), local).unwrap();
        std::fs::write(dir.join("ca.crt"), self.pki.ca()).unwrap();
        let url = format!("https://localhost:{}/", self.addr.port())
            .parse()
            .unwrap();
        let mut opts = AgentOptions::new(
            url,
            self.token(name),
            apitree::agent::envelope::PublicKey::parse(&self.signer_public).unwrap(),
            "bank-a".into(),
            dir.join("cache"),
            dir.join("local.yaml"),
        );
        opts.ca_pem = Some(self.pki.ca());
        opts.report_every = Duration::from_millis(100);
        opts.retry_min = Duration::from_millis(50);
        opts.retry_max = Duration::from_millis(400);
        opts.workers = Some(1);
        opts
    }
}

/// What most tests start from: a bank upstream, a control plane knowing `agents` (pool
/// `bank-a`), a live key, generation `g1` of the pool (route `accounts`) published, and a
/// directory for the agents.
struct Setup {
    upstream: Upstream,
    up: String,
    cp: ControlPlane,
    key: apitree::entities::keys::ApiKey,
    entry: KeyEntry,
    g1: u64,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(agents: &[&str]) -> Self {
        let upstream = start_upstream().await;
        let up = format!("http://{}/", upstream.addr.unwrap());
        let cp = ControlPlane::start(agents).await;
        let (key, entry) = live_key();
        let g1 = cp
            .hub
            .publish(GATEWAY, "bank-a", config(&["accounts"], &entry))
            .unwrap();
        Self {
            upstream,
            up,
            cp,
            key,
            entry,
            g1,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Setup {
    /// Agent bank-a-1 with `extra` added to its local file, started, and offered a candidate
    /// (revision `rev-2`, the same routes).
    async fn agent_with_candidate(&self, extra: &str) -> RunningAgent {
        let opts = self
            .cp
            .agent("bank-a-1", self.dir.path(), &self.up, &["accounts"]);
        let mut local = std::fs::read_to_string(&opts.config).unwrap();
        local.push_str(extra);
        std::fs::write(&opts.config, local).unwrap();
        let a = start(opts).await.unwrap();
        self.cp
            .hub
            .publish_preview(
                GATEWAY,
                "bank-a",
                "rev-2",
                config(&["accounts"], &self.entry),
            )
            .unwrap();
        a
    }
}

/// A pool configuration: `routes` under `/NAME/`, one live key of org `bank-a-org`.
fn config(routes: &[&str], key: &KeyEntry) -> AgentConfig {
    AgentConfig {
        tiers: vec![serde_json::from_str(
            r#"{"name":"standard","perKey":{"burst10s":1000,"perMinute":6000,"perDay":100000},
                "perOrg":{"burst10s":1000,"perMinute":6000,"perDay":100000}}"#,
        )
        .unwrap()],
        default_tier: Some("standard".into()),
        orgs: vec![serde_json::from_str(r#"{"id":"bank-a-org"}"#).unwrap()],
        keys: vec![key.clone()],
        routes: routes
            .iter()
            .map(|r| {
                serde_json::from_value::<ConnectorRoute>(serde_json::json!({
                    "name": r, "pathPrefix": format!("/{r}/"), "pii": "mask"
                }))
                .unwrap()
            })
            .collect(),
        ..Default::default()
    }
}

fn live_key() -> (apitree::entities::keys::ApiKey, KeyEntry) {
    let (key, yaml) = key_entry(KeyScope::Live, "bank-a-org", "");
    let entry = serde_saphyr::from_str(yaml.trim().trim_start_matches("- ")).unwrap();
    (key, entry)
}

async fn get(agent: &RunningAgent, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = client().get(format!("http://{}{path}", agent.addr));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn agents_serve_the_pools_configuration_and_keep_serving_without_the_control_plane() {
    let Setup {
        upstream: _upstream,
        up,
        mut cp,
        key,
        entry,
        g1,
        dir,
    } = Setup::new(&["bank-a-1", "bank-a-2"]).await;
    let a1 = start(cp.agent(
        "bank-a-1",
        &dir.path().join("a1"),
        &up,
        &["accounts", "cards"],
    ))
    .await
    .unwrap();
    let a2 = start(cp.agent(
        "bank-a-2",
        &dir.path().join("a2"),
        &up,
        &["accounts", "cards"],
    ))
    .await
    .unwrap();
    for a in [&a1, &a2] {
        assert_eq!(a.generation(), Some(g1));
        let (status, body) = get(a, "/accounts/balance", Some(key.expose_secret())).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("/balance"), "{body}");
        assert_eq!(get(a, "/accounts/balance", None).await.0, 401);
        assert_eq!(get(a, "/cards/x", Some(key.expose_secret())).await.0, 404);
    }

    // A new generation reaches both agents through their long polls.
    let g2 = cp
        .hub
        .publish(GATEWAY, "bank-a", config(&["accounts", "cards"], &entry))
        .unwrap();
    assert!(g2 > g1);
    until("both agents run g2", || {
        a1.generation() == Some(g2) && a2.generation() == Some(g2)
    })
    .await;
    assert_eq!(get(&a1, "/cards/x", Some(key.expose_secret())).await.0, 200);
    until("the hub has both agents' reports of g2", || {
        let s = cp.hub.agents();
        s.len() == 2
            && s.iter()
                .all(|a| a.generation == Some(g2) && a.version.is_some())
    })
    .await;

    // The control plane goes away: the agents keep serving what they have.
    cp.down().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for a in [&a1, &a2] {
        assert_eq!(get(a, "/cards/x", Some(key.expose_secret())).await.0, 200);
    }
    // A change made meanwhile arrives once it is back (the agents retry with back-off).
    let g3 = cp
        .hub
        .publish(GATEWAY, "bank-a", config(&["accounts"], &entry))
        .unwrap();
    cp.up().await;
    until("both agents run g3 after the outage", || {
        a1.generation() == Some(g3) && a2.generation() == Some(g3)
    })
    .await;
    assert_eq!(get(&a1, "/cards/x", Some(key.expose_secret())).await.0, 404);
    a1.stop().await;
    a2.stop().await;
}

#[tokio::test]
async fn a_restart_without_the_control_plane_serves_the_cache_and_a_tampered_cache_is_refused() {
    let Setup {
        upstream: _upstream,
        up,
        mut cp,
        key,
        entry: _,
        g1,
        dir,
    } = Setup::new(&["bank-a-1"]).await;
    let opts = cp.agent("bank-a-1", dir.path(), &up, &["accounts", "cards"]);
    let a = start(opts.clone()).await.unwrap();
    a.stop().await;
    cp.down().await;

    // Restarted with the control plane away: the cached generation serves.
    let a = tokio::time::timeout(Duration::from_secs(5), start(opts.clone()))
        .await
        .expect("a cached configuration serves without the control plane")
        .unwrap();
    assert_eq!(a.generation(), Some(g1));
    assert_eq!(
        get(&a, "/accounts/x", Some(key.expose_secret())).await.0,
        200
    );
    a.stop().await;

    // Someone with access to the disk widens the cached routes: the signature no longer holds,
    // and the agent does not serve it.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cache = dir.path().join("cache").join(apitree::agent::cache::FILE);
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
    let forged = String::from_utf8(payload)
        .unwrap()
        .replace("/accounts/", "/");
    env["payload"] = b64.encode(forged).into();
    std::fs::write(&cache, env.to_string()).unwrap();
    let starting = tokio::spawn(start(opts.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!starting.is_finished(), "an agent served a tampered cache");
    // The control plane comes back: its configuration replaces the forged one.
    cp.up().await;
    let a = tokio::time::timeout(Duration::from_secs(5), starting)
        .await
        .expect("the agent starts once the control plane answers")
        .unwrap()
        .unwrap();
    assert_eq!(a.generation(), Some(g1));
    assert_eq!(get(&a, "/other", Some(key.expose_secret())).await.0, 404);
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_ne!(cached, env, "the forged cache was replaced");
    a.stop().await;
}

#[tokio::test]
async fn a_revoked_agent_gets_nothing_and_a_configuration_it_cannot_apply_is_reported() {
    let Setup {
        upstream: _upstream,
        up,
        cp,
        key,
        entry,
        g1,
        dir,
    } = Setup::new(&["bank-a-1", "bank-a-2"]).await;
    let opts = cp.agent("bank-a-1", &dir.path().join("a1"), &up, &["accounts"]);
    let a = start(opts.clone()).await.unwrap();

    // `loans` has no upstream in the bank's file: refused, reported, the old one serves.
    let g2 = cp
        .hub
        .publish(GATEWAY, "bank-a", config(&["accounts", "loans"], &entry))
        .unwrap();
    until("the agent refuses g2", || a.refused().is_some()).await;
    assert_eq!(a.generation(), Some(g1));
    assert_eq!(
        get(&a, "/accounts/x", Some(key.expose_secret())).await.0,
        200
    );
    until("the hub shows the refusal", || {
        cp.hub.agents()[0]
            .refused
            .as_ref()
            .is_some_and(|r| r.generation == Some(g2) && r.reason.contains("loans"))
    })
    .await;
    // The bank adds the upstream and reloads its file: g2 applies.
    let local = dir.path().join("a1").join("local.yaml");
    let mut text = std::fs::read_to_string(&local).unwrap();
    text.push_str(&format!("  - {{ route: loans, upstream: '{up}' }}\n"));
    std::fs::write(&local, text).unwrap();
    assert!(a.reload_local().unwrap().is_empty());
    until("the agent applies g2", || a.generation() == Some(g2)).await;
    // Settings a running agent cannot change are named, not silently taken as applied.
    let text = std::fs::read_to_string(&local)
        .unwrap()
        .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1")
        .replace("pepperFile: pepper", "pepperFile: other-pepper");
    std::fs::write(dir.path().join("a1").join("other-pepper"), PEPPER).unwrap();
    std::fs::write(&local, text).unwrap();
    assert_eq!(a.reload_local().unwrap(), ["listen", "secrets.pepperFile"]);
    assert!(a.refused().is_none());
    assert_eq!(get(&a, "/loans/x", Some(key.expose_secret())).await.0, 200);

    // Revoked: its own requests are refused; a fresh agent with that token gets nothing.
    let mut agents: Vec<_> = cp.tokens.iter().map(|(_, r)| r.clone()).collect();
    agents[0].revoked = true;
    cp.hub.set_agents(AgentsFile {
        pools: vec![PoolBinding {
            name: "bank-a".into(),
            gateway: GATEWAY.into(),
        }],
        agents,
    });
    until("the hub lists bank-a-1 as revoked", || {
        cp.hub.agents()[0].revoked
    })
    .await;
    let fresh = cp.agent(
        "bank-a-1",
        &dir.path().join("fresh"),
        &up,
        &["accounts", "loans"],
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), start(fresh))
            .await
            .is_err(),
        "a revoked agent received a configuration"
    );
    let seen = cp.seen.lock().unwrap().len();
    until("the revoked agent keeps trying", || {
        cp.seen.lock().unwrap().len() > seen
    })
    .await;
    a.stop().await;
}

/// Everything the agent sends the control plane, captured at the hub: its requests' lines,
/// headers and bodies hold no key, no body, no PII, no client or upstream address and no
/// secret — while the counts the detector needs are there.
#[tokio::test]
async fn everything_an_agent_sends_is_metadata() {
    let setup = Setup::new(&["bank-a-1"]).await;
    // A candidate is offered too, and the agent sends a probe of its own through it with the
    // key: what it reports about the candidate is captured as well.
    std::fs::write(
        setup.dir.path().join("smoke.key"),
        setup.key.expose_secret(),
    )
    .unwrap();
    let a = setup
        .agent_with_candidate(
            "smoke:\n  - { name: pii, path: /accounts/pii, apiKeyFile: smoke.key }\n",
        )
        .await;
    let Setup {
        upstream,
        up: _,
        cp,
        key,
        entry: _,
        g1: _,
        dir,
    } = setup;
    let marker = "body-marker-7f3a";
    // First: the wait below ends at the first report holding the last request.
    let _ = get(
        &a,
        "/accounts/x",
        Some("at_live_wrongwrongwrongwrongwrongwrong"),
    )
    .await;
    for path in ["/accounts/pii", "/accounts/echo-body", "/accounts/fail"] {
        let resp = client()
            .post(format!("http://{}{path}?q={marker}", a.addr))
            .header("x-api-key", key.expose_secret())
            .header("x-forwarded-for", "203.0.113.9")
            .body(format!("{{\"note\":\"{marker}\",\"rrn\":\"{RRN}\"}}"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().as_u16() < 600);
    }
    until("a report with the requests reached the hub", || {
        cp.hub
            .agent_metrics("bank-a-1")
            .is_some_and(|m| m.contains(r#"route="accounts",status_class="5xx""#))
    })
    .await;
    until("a report on the probed candidate reached the hub", || {
        cp.hub.agents().iter().any(|s| {
            s.preview
                .as_ref()
                .is_some_and(|p| p.smoke.iter().any(|p| p.name == "pii" && p.passed))
        })
    })
    .await;
    a.stop().await;
    let seen = cp.seen.lock().unwrap().join("\n-----\n");
    assert!(
        seen.contains(r#""preview":{"#),
        "the candidate's report is in the capture"
    );
    let upstream_port = upstream.addr.unwrap().port().to_string();
    let token = cp.token("bank-a-1");
    // The secret is everything after `agt_NAME_`: base64url may itself hold `_`, and a
    // fragment of it (one split off at such a `_`) can be as short as one letter.
    let token_secret = token.strip_prefix("agt_bank-a-1_").unwrap();
    assert_eq!(token_secret.len(), 43, "a 32-byte secret, base64url");
    for (what, needle) in [
        ("the API key", key.expose_secret()),
        (
            "the key's secret part",
            &key.expose_secret()[key.prefix().len()..],
        ),
        ("a request body", marker),
        ("PII", RRN),
        ("a client address", "203.0.113.9"),
        ("a loopback address (client or upstream)", "127.0.0.1"),
        ("the upstream's port", &format!(":{upstream_port}")),
        ("the pepper", std::str::from_utf8(PEPPER).unwrap()),
        ("the local file's path", dir.path().to_str().unwrap()),
    ] {
        assert!(!seen.contains(needle), "the agent sent {what}:\n{seen}");
    }
    // The token is sent as the agent's credential, in the Authorization header only.
    for line in seen.lines().filter(|l| l.contains(token_secret)) {
        assert!(
            line.starts_with("authorization: Bearer "),
            "token outside its header: {line}"
        );
    }
    assert!(seen.contains("apitree_proxy_request_duration_seconds_bucket"));
    assert!(seen.contains(r#"apitree_proxy_auth_failures_total{reason="#));
}

/// The control loop with agents: a gateway with `spec.connectors` publishes its active
/// revision's configuration to the pool, lists the pool's agents in its status, reads their
/// reported metadata into the detector — an agent's failing upstream escalates to (a stand-in)
/// Slack like a cluster route — and an agent that goes silent is an `agent lost` incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_publishes_to_its_pool_lists_its_agents_and_escalates_their_failures() {
    use apitree::crd::gateway::GatewayPhase;
    use apitree::notify::{outbox::Outbox, slack::SlackDelivery, Notifier};
    use common::slack::{channels, config as slack_config, start_stand_in};

    // bank-a-3 runs no agent: its token is used below to send reports of a compromised agent.
    let cp = ControlPlane::start(&["bank-a-1", "bank-a-2", "bank-a-3"]).await;
    let bank_up = start_upstream().await;
    let bank_url = format!("http://{}/", bank_up.addr.unwrap());

    let (slack_addr, stand_in) = start_stand_in().await;
    let outbox = Arc::new(Outbox::memory());
    let notifier = Arc::new(Notifier::Slack {
        outbox: outbox.clone(),
        channels: channels(),
    });
    let delivery = SlackDelivery::new(&slack_config(slack_addr), outbox);
    // A key the agents check with their own pepper (the bank holds the same one as the
    // control plane; the demo's cluster proxies use a random one).
    let (key, entry) = live_key();
    let (mut tour, _api, _) = pool_gateway(&cp, notifier.clone(), Some(entry)).await;
    let limit = Duration::from_secs(40);
    tour.until("first deploy", limit, |m| {
        m.status.phase == Some(GatewayPhase::Stable)
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let a1 = start(cp.agent("bank-a-1", &dir.path().join("a1"), &bank_url, &["accounts"]))
        .await
        .unwrap();
    let a2 = start(cp.agent("bank-a-2", &dir.path().join("a2"), &bank_url, &["accounts"]))
        .await
        .unwrap();
    assert_eq!(
        get(&a1, "/accounts/x", Some(key.expose_secret())).await.0,
        200
    );
    tour.until("both agents listed and in sync", limit, |m| {
        let in_sync = m
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "ConnectorsInSync" && c.status == "True");
        m.status.connectors.len() == 2
            && m.status.connectors.iter().all(|c| {
                c.state == "Connected"
                    && c.generation.is_some()
                    && c.generation == c.published_generation
            })
            && in_sync
    })
    .await
    .unwrap();

    // Traffic through the agents: a baseline of successes, then the bank's upstream fails.
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Meanwhile an agent of the pool reports the same story about the cluster's route
    // `weather`, which it does not serve: it must not reach the detector.
    let rogue = tokio::spawn({
        let (hub, token) = (cp.hub.clone(), cp.token("bank-a-3"));
        let (failing, stop) = (failing.clone(), stop.clone());
        async move {
            let (mut ok, mut bad) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ok += 40;
                if failing.load(std::sync::atomic::Ordering::Relaxed) {
                    bad += 40;
                }
                let metrics = format!(
                    "apitree_proxy_requests_total{{route=\"weather\",status_class=\"2xx\"}} {ok}\n\
                     apitree_proxy_requests_total{{route=\"weather\",status_class=\"5xx\"}} {bad}\n"
                );
                let body =
                    serde_json::json!({"version": "0.1.0", "generation": null, "metrics": metrics});
                let req = http::Request::post("/agent/v1/report")
                    .header("authorization", format!("Bearer {token}"))
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_string(),
                    )))
                    .unwrap();
                assert_eq!(hub.handle(req).await.status(), 204);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let traffic = agent_traffic(
        vec![a1.addr, a2.addr],
        key.expose_secret(),
        failing.clone(),
        stop.clone(),
    );
    tour.until("a baseline of agent traffic", limit, |m| {
        m.runtime.error_ratios.len() >= 6
    })
    .await
    .unwrap();
    failing.store(true, std::sync::atomic::Ordering::Relaxed);
    tour.until("an incident on the agents' route", limit, |m| {
        m.runtime
            .incidents
            .iter()
            .any(|i| i.route == "accounts" && i.signal == "error ratio")
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = traffic.await;
    rogue.await.unwrap();
    assert!(
        !tour
            .m
            .runtime
            .incidents
            .iter()
            .any(|i| i.route == "weather"),
        "an agent's report raised an incident on a route it does not serve: {:?}",
        tour.m.runtime.incidents
    );

    // Someone saves a spec that cannot run; then agent 2 goes silent: lost, an incident,
    // shown in status all the same.
    let mut broken = tour.m.spec.clone();
    broken.connectors[0].routes[0].tier = Some("no-such-tier".into());
    tour.set_spec(broken);
    a2.stop().await;
    tour.until("agent 2 lost", limit, |m| {
        m.status
            .connectors
            .iter()
            .any(|c| c.name == "bank-a-2" && c.state == "Lost")
            && m.runtime
                .incidents
                .iter()
                .any(|i| i.signal == "agent lost" && i.route == "bank-a-2")
    })
    .await
    .unwrap();
    assert!(
        tour.m
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "SpecValid" && c.status == "False"),
        "the spec was meant to be invalid: {:?}",
        tour.m.status.conditions
    );
    for _ in 0..20 {
        let r = delivery.deliver_due().await.unwrap();
        if r.delivered == 0 && r.failed == 0 {
            break;
        }
    }
    let posted: Vec<String> = stand_in
        .lock()
        .unwrap()
        .answered
        .iter()
        .map(|(_, body)| body.to_string())
        .collect();
    assert!(
        posted
            .iter()
            .any(|b| b.contains("error ratio") && b.contains("route accounts")),
        "no Slack message for the agents' failing route: {posted:#?}"
    );
    assert!(
        posted
            .iter()
            .any(|b| b.contains("agent lost") && b.contains("agent bank-a-2")),
        "no Slack message for the lost agent: {posted:#?}"
    );
    a1.stop().await;
    tour.ctx.platform.shutdown().await;
}

/// A gateway `bank-gw` on the local platform whose pool `bank-a` serves `/accounts/` (agents
/// lost after 2 s), with `key` among its keys, deployed: the loop a control plane runs; and
/// a key the cluster's proxies take.
async fn pool_gateway(
    cp: &ControlPlane,
    notifier: Arc<apitree::notify::Notifier>,
    key: Option<KeyEntry>,
) -> (
    apitree::demo::Tour,
    apitree::demo::SampleApi,
    apitree::entities::keys::ApiKey,
) {
    use apitree::crd::duration::KubeDuration;
    use apitree::crd::gateway::{ConnectorSpec, GatewayPhase};
    use apitree::demo;
    let api = demo::start_sample_api().await.unwrap();
    api.weather_failure_per_mille
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let cluster_up = format!("http://{}", api.addr);
    let (mut ctx, cluster_key) = demo::local_context(notifier.clone(), None).unwrap();
    ctx.agents = Some(cp.hub.clone());
    if let Some(entry) = key {
        ctx.base.keys.push(KeyEntry {
            org: "acme".into(),
            ..entry
        });
    }
    let mut spec = demo::spec(
        &format!("{cluster_up}/weather/"),
        &format!("{cluster_up}/fx/"),
    );
    spec.gate.observation_window = KubeDuration::from_secs(2);
    spec.gate.min_samples = 1;
    spec.detection.window = KubeDuration::from_secs(1);
    spec.detection.min_requests = 20;
    spec.connectors = vec![serde_json::from_value::<ConnectorSpec>(serde_json::json!({
        "pool": "bank-a", "lostAfter": "2s",
        "routes": [{"name": "accounts", "pathPrefix": "/accounts/"}]
    }))
    .unwrap()];
    let m = apitree::operator::gateway::rollout::Managed::new(
        GATEWAY,
        spec,
        1,
        notifier,
        ctx.store.clone(),
        None,
    );
    let mut tour = demo::Tour::new(m, ctx);
    tour.until("first deploy", Duration::from_secs(40), |m| {
        m.status.phase == Some(GatewayPhase::Stable)
    })
    .await
    .unwrap();
    (tour, api, cluster_key)
}

/// With a gateway database, the agents receive its orgs and keys (hashes): a key issued there
/// works at the agents, and revoking it there shuts it out at the agents within a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_take_the_gateway_databases_keys_and_their_revocation() {
    let cp = ControlPlane::start(&["bank-a-1"]).await;
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let issued = common::seed_live_key(&pool, &pepper(), "bank app").await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let (mut tour, _api, _) = pool_gateway(&cp, notifier, None).await;
    tour.m.database_url = Some(tdb.url.clone());
    let bank_up = start_upstream().await;
    let bank_url = format!("http://{}/", bank_up.addr.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let starting = tokio::spawn(start(cp.agent(
        "bank-a-1",
        dir.path(),
        &bank_url,
        &["accounts"],
    )));
    let limit = Duration::from_secs(30);
    tour.until("the agent is connected", limit, |m| {
        m.status
            .connectors
            .iter()
            .any(|c| c.generation.is_some() && c.generation == c.published_generation)
    })
    .await
    .unwrap();
    let a = starting.await.unwrap().unwrap();
    let secret = issued.key.expose_secret().to_string();
    assert_eq!(get(&a, "/accounts/x", Some(&secret)).await.0, 200);
    apitree::db::keys::revoke_key(&pool, issued.id, "test")
        .await
        .unwrap();
    let before = a.generation();
    tour.until("the revocation is published", limit, |_| {
        a.generation() != before
    })
    .await
    .unwrap();
    assert_eq!(get(&a, "/accounts/x", Some(&secret)).await.0, 401);
    a.stop().await;
    tour.ctx.platform.shutdown().await;
}

/// A revision that changes what the pool receives reaches the agents when it takes traffic, and
/// when the agents' traffic turns critical inside the rollback window the gateway rolls back —
/// and the agents are given the previous configuration again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_inside_the_window_rolls_the_agents_back_too() {
    use apitree::crd::duration::KubeDuration;
    use apitree::crd::gateway::GatewayPhase;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cp = ControlPlane::start(&["bank-a-1"]).await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let (key, entry) = live_key();
    let (mut tour, _api, cluster_key) = pool_gateway(&cp, notifier, Some(entry)).await;
    let bank_up = start_upstream().await;
    let bank_url = format!("http://{}/", bank_up.addr.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let a = start(cp.agent("bank-a-1", dir.path(), &bank_url, &["accounts"]))
        .await
        .unwrap();
    let first = a.generation();
    let failing = Arc::new(AtomicBool::new(false));
    let mut traffic = Traffic::to_gateway(&tour, &cluster_key).await;
    traffic.tasks.push(agent_traffic(
        vec![a.addr],
        key.expose_secret(),
        failing.clone(),
        traffic.stop.clone(),
    ));
    let limit = Duration::from_secs(60);
    tour.until("a baseline", limit, |m| m.runtime.error_ratios.len() >= 6)
        .await
        .unwrap();
    let old_revision = tour.m.status.active_revision.clone();
    let mut spec = tour.m.spec.clone();
    spec.gate.rollback_window = KubeDuration::from_secs(60);
    spec.connectors[0].routes[0].timeout = Some(KubeDuration::from_secs(3));
    tour.set_spec(spec);
    tour.until("the new revision takes traffic", limit, |m| {
        m.status.phase == Some(GatewayPhase::Promoting) && m.status.active_revision != old_revision
    })
    .await
    .unwrap();
    let promoted = tour.m.status.connectors[0].published_generation;
    tour.until(
        "the agent runs the new revision's configuration",
        limit,
        |_| a.generation() == promoted && promoted != first,
    )
    .await
    .unwrap();
    failing.store(true, Ordering::Relaxed);
    tour.until("automatic rollback", limit, |m| {
        m.status.phase == Some(GatewayPhase::RolledBack)
    })
    .await
    .unwrap();
    assert_eq!(tour.m.status.active_revision, old_revision);
    tour.until(
        "the agent is given the previous configuration again",
        limit,
        |m| {
            let published = m.status.connectors[0].published_generation;
            published > promoted && a.generation() == published
        },
    )
    .await
    .unwrap();
    traffic.stop().await;
    a.stop().await;
    tour.ctx.platform.shutdown().await;
}

/// Clients sending traffic until stopped.
struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// The demo's clients of the gateway's active and preview endpoints, with `key`.
    async fn to_gateway(tour: &apitree::demo::Tour, key: &apitree::entities::keys::ApiKey) -> Self {
        use apitree::platform::Platform;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let active = tour.ctx.platform.active_url(GATEWAY).await.unwrap();
        let tasks = apitree::demo::start_traffic(
            active,
            tour.preview.clone(),
            key.expose_secret().to_string(),
            stop.clone(),
        );
        Self { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Clients of the agents at `addrs` (in turn) with `key`: every other request goes to the
/// bank upstream's `/fail` (500) while `failing` is set, the rest succeed; until `stop`.
fn agent_traffic(
    addrs: Vec<SocketAddr>,
    key: &str,
    failing: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let key = key.to_string();
    tokio::spawn(async move {
        let c = client();
        let mut i = 0usize;
        while !stop.load(Relaxed) {
            i += 1;
            let path = if failing.load(Relaxed) && i.is_multiple_of(2) {
                "/accounts/fail"
            } else {
                "/accounts/ok"
            };
            let _ = c
                .get(format!("http://{}{path}", addrs[i % addrs.len()]))
                .header("x-api-key", &key)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// An agent pinned to the wrong signing key refuses every configuration, and asks again with
/// back-off, not in a loop as fast as the control plane answers.
#[tokio::test]
async fn an_agent_that_cannot_verify_backs_off() {
    let Setup {
        upstream: _upstream,
        up,
        cp,
        key: _,
        entry: _,
        g1: _,
        dir,
    } = Setup::new(&["bank-a-1"]).await;
    let mut opts = cp.agent("bank-a-1", dir.path(), &up, &["accounts"]);
    let other = Signer::parse(&Signer::generate_text()).unwrap();
    opts.config_key = *other.public_key();
    let asked = || {
        cp.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with("GET /agent/v1/config"))
            .count()
    };
    let started = std::time::Instant::now();
    let starting = tokio::spawn(start(opts));
    common::until_within("six asks", Duration::from_secs(10), || asked() >= 6).await;
    let took = started.elapsed();
    assert!(
        !starting.is_finished(),
        "an agent served what it could not verify"
    );
    starting.abort();
    // Waits of 50 ms doubling to 400 ms, each at least half its size: five of them take at
    // least 25 + 50 + 100 + 200 + 200 ms. Without back-off, six asks take a few milliseconds.
    assert!(
        took >= Duration::from_millis(575),
        "six asks in {took:?}: no back-off"
    );
}

/// A revision that changes what the agents serve is checked on them before traffic switches:
/// each connected agent runs it as a candidate beside what it serves. One that cannot build
/// it (no upstream for a new route) fails the rollout check, the revision is refused and the
/// agents keep serving what they had; a revision every agent runs, whose smoke probes pass
/// through the candidates (bank-a-2 sends one of its own, with a key only it holds), switches
/// and only then reaches the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_for_the_agents_is_checked_on_them_before_traffic_switches() {
    use apitree::crd::duration::KubeDuration;
    use apitree::crd::gateway::{CheckPhase, GatewayPhase};
    let cp = ControlPlane::start(&["bank-a-1", "bank-a-2"]).await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let (key, entry) = live_key();
    let (mut tour, _api, cluster_key) = pool_gateway(&cp, notifier, Some(entry)).await;
    let bank_up = start_upstream().await;
    let bank_url = format!("http://{}/", bank_up.addr.unwrap());
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o1 = cp.agent("bank-a-1", d1.path(), &bank_url, &["accounts", "cards"]);
    let o2 = cp.agent("bank-a-2", d2.path(), &bank_url, &["accounts"]);
    std::fs::write(d2.path().join("smoke.key"), key.expose_secret()).unwrap();
    let mut local = std::fs::read_to_string(&o2.config).unwrap();
    local.push_str("smoke:\n  - { name: balance, path: /accounts/ok, apiKeyFile: smoke.key }\n");
    std::fs::write(&o2.config, local).unwrap();
    let (a1, a2) = (start(o1).await.unwrap(), start(o2).await.unwrap());
    let limit = Duration::from_secs(60);
    tour.until("both agents serve the pool's configuration", limit, |m| {
        m.status.connectors.len() == 2
            && m.status
                .connectors
                .iter()
                .all(|c| c.generation.is_some() && c.generation == c.published_generation)
    })
    .await
    .unwrap();
    let first = a1.generation();
    let serving = tour.m.status.active_revision.clone();
    let original = tour.m.spec.clone();
    let traffic = Traffic::to_gateway(&tour, &cluster_key).await;

    // 1. A route bank-a-2 has no upstream for.
    let mut spec = original.clone();
    spec.connectors[0].routes.push(
        serde_json::from_value(serde_json::json!({"name": "cards", "pathPrefix": "/cards/"}))
            .unwrap(),
    );
    tour.set_spec(spec);
    tour.until("the revision is refused", limit, |m| {
        m.status.phase == Some(GatewayPhase::Rejected)
    })
    .await
    .unwrap();
    let rollout = tour.m.status.gate.as_ref().unwrap().checks[0].clone();
    assert_eq!(rollout.phase, CheckPhase::Failed);
    let why = rollout.reason.unwrap();
    assert!(
        why.contains("agent bank-a-2 refused the candidate configuration") && why.contains("cards"),
        "{why}"
    );
    assert_eq!(tour.m.status.active_revision, serving);
    assert_eq!((a1.generation(), a2.generation()), (first, first));
    tour.until("the candidate is withdrawn", limit, |_| {
        a1.preview().is_none() && a2.preview().is_none()
    })
    .await
    .unwrap();

    // 2. A change both agents can run.
    let mut spec = original.clone();
    spec.connectors[0].routes[0].timeout = Some(KubeDuration::from_secs(3));
    spec.gate.rollback_window = KubeDuration::from_secs(2);
    tour.set_spec(spec);
    tour.until(
        "bank-a-2 reports its candidate ready and probed",
        limit,
        |m| {
            m.status.connectors.iter().any(|c| {
                c.name == "bank-a-2"
                    && c.candidate
                        .as_deref()
                        .is_some_and(|s| s.contains("running, ready, smoke 2/2 passed"))
            })
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (a1.generation(), a2.generation()),
        (first, first),
        "nothing reaches the pool before the switch"
    );
    let probed = a2.preview().unwrap();
    assert!(
        probed.smoke.iter().any(|s| s.name == "balance" && s.passed),
        "{probed:?}"
    );
    tour.until("the new revision takes traffic", limit, |m| {
        m.status.phase == Some(GatewayPhase::Promoting) && m.status.active_revision != serving
    })
    .await
    .unwrap();
    let gate = tour.m.status.gate.clone().unwrap();
    let observed = |i: usize| gate.checks[i].observed.clone().unwrap_or_default();
    assert!(
        observed(0).contains("2/2 agent(s) run the candidate"),
        "{:?}",
        gate.checks[0]
    );
    assert!(
        observed(1).contains("2/2 agent(s)' candidates ready"),
        "{:?}",
        gate.checks[1]
    );
    assert!(
        observed(3).contains("2/2 agent(s)' smoke probes passed"),
        "{:?}",
        gate.checks[3]
    );
    let promoted = tour.m.status.connectors[0].published_generation;
    tour.until(
        "the pool runs the new revision's configuration",
        limit,
        |_| a1.generation() == promoted && a2.generation() == promoted && promoted != first,
    )
    .await
    .unwrap();

    // 3. A candidate does not outlive its gate: a pool the spec drops mid-gate has its
    // candidate withdrawn, and the agents stop it.
    tour.until("the rollback window ends", limit, |m| {
        m.status.phase == Some(GatewayPhase::Stable)
    })
    .await
    .unwrap();
    let mut spec = tour.m.spec.clone();
    spec.gate.auto_promote = false;
    spec.connectors[0].routes[0].timeout = Some(KubeDuration::from_secs(4));
    tour.set_spec(spec.clone());
    tour.until("both agents run the candidate", limit, |_| {
        a1.preview().is_some_and(|p| p.refused.is_none())
            && a2.preview().is_some_and(|p| p.refused.is_none())
    })
    .await
    .unwrap();
    spec.connectors.clear();
    tour.set_spec(spec);
    tour.until("the candidate is withdrawn and stopped", limit, |_| {
        a1.preview().is_none() && a2.preview().is_none()
    })
    .await
    .unwrap();
    traffic.stop().await;
    a1.stop().await;
    a2.stop().await;
    tour.ctx.platform.shutdown().await;
}

/// When the gateway database's keys cannot be read, no candidate can be offered to the
/// agents: the gate does not pass them unasked, and refuses the revision at the rollout
/// deadline, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_could_not_be_offered_a_candidate_are_not_passed() {
    use apitree::crd::duration::KubeDuration;
    use apitree::crd::gateway::{CheckPhase, GatewayPhase};
    let cp = ControlPlane::start(&["bank-a-1"]).await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let (mut tour, _api, _) = pool_gateway(&cp, notifier, None).await;
    let serving = tour.m.status.active_revision.clone();
    // Nothing listens on port 9: every read of the database fails.
    tour.m.database_url = Some("postgres://postgres@127.0.0.1:9/test?connect_timeout=1".into());
    let mut spec = tour.m.spec.clone();
    spec.gate.rollout_deadline = KubeDuration::from_secs(3);
    spec.connectors[0].routes[0].timeout = Some(KubeDuration::from_secs(3));
    tour.set_spec(spec);
    tour.until("the revision is refused", Duration::from_secs(60), |m| {
        m.status.phase == Some(GatewayPhase::Rejected)
    })
    .await
    .unwrap();
    let rollout = tour.m.status.gate.as_ref().unwrap().checks[0].clone();
    assert_eq!(rollout.phase, CheckPhase::Failed);
    let why = rollout.reason.unwrap();
    assert!(
        why.contains(
            "pool bank-a (no candidate offered: the gateway database's keys cannot be read)"
        ),
        "{why}"
    );
    assert_eq!(tour.m.status.active_revision, serving);
    tour.ctx.platform.shutdown().await;
}

/// With `--redis-url` to the Redis the cloud's replicas use, an agent and a cloud replica
/// count one key against one limit: a burst of 6 per key holds across both.
#[tokio::test]
async fn an_agent_and_a_cloud_replica_share_a_keys_limits_through_redis() {
    use apitree::proxy::limiter::Limiter;
    use apitree::proxy::metrics::ProxyMetrics;
    let redis =
        std::env::var("APITREE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let upstream = start_upstream().await;
    let up = format!("http://{}/", upstream.addr.unwrap());
    let cp = ControlPlane::start(&["bank-a-1"]).await;
    // A new key each run: its counters in Redis are this test's alone.
    let (key, entry_yaml) = key_entry(KeyScope::Live, "bank-a-org", "");
    let entry: KeyEntry =
        serde_saphyr::from_str(entry_yaml.trim().trim_start_matches("- ")).unwrap();
    let tier = r#"{ "name": "standard", "perKey": {"burst10s": 6, "perMinute": 100, "perDay": 1000},
        "perOrg": {"burst10s": 1000000, "perMinute": 1000000, "perDay": 10000000} }"#;
    let mut cfg = config(&["accounts"], &entry);
    cfg.tiers = vec![serde_json::from_str(tier).unwrap()];
    cp.hub.publish(GATEWAY, "bank-a", cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = cp.agent("bank-a-1", dir.path(), &up, &["accounts"]);
    opts.redis_url = Some(redis.clone());
    let a = start(opts).await.unwrap();
    let yaml = format!(
        "tiers:\n  - {tier}\ndefaultTier: standard\norgs: [{{ id: bank-a-org }}]\nkeys:\n{entry_yaml}routes:\n  - {{ name: accounts, pathPrefix: /accounts/, upstream: \"{up}\" }}\n",
        tier = tier.replace('\n', " ")
    );
    let cloud = start_gateway(
        &yaml,
        Some(Limiter::shared(&redis, ProxyMetrics::new()).unwrap()),
    )
    .await;
    let mut admitted = 0;
    for i in 0..10 {
        let at = if i % 2 == 0 { a.addr } else { cloud.addr };
        let status = client()
            .get(format!("http://{at}/accounts/ok"))
            .header("x-api-key", key.expose_secret())
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 6,
        "the key's burst of 6 holds across the agent and the cloud"
    );
    a.stop().await;
}

/// A candidate the agent cannot start (its `previewListen` port is taken) is reported refused
/// in words that hold none of the local file's values: not the address, not the port.
#[tokio::test]
async fn a_candidate_that_cannot_start_is_refused_without_the_local_values() {
    let setup = Setup::new(&["bank-a-1"]).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let a = setup
        .agent_with_candidate(&format!("previewListen: 127.0.0.1:{port}\n"))
        .await;
    let cp = &setup.cp;
    until("the hub hears the candidate refused", || {
        cp.hub
            .agents()
            .iter()
            .any(|s| s.preview.as_ref().is_some_and(|p| p.refused.is_some()))
    })
    .await;
    let status = cp.hub.agents().remove(0);
    let refused = status.preview.unwrap().refused.unwrap();
    assert!(
        refused.contains("previewListen cannot be bound"),
        "{refused}"
    );
    assert!(
        !refused.contains("127.0.0.1") && !refused.contains(&port.to_string()),
        "{refused}"
    );
    a.stop().await;
}

/// A candidate does not outlive the control plane that offered it: when the agent's reports
/// fail in a row (the control plane is gone), it stops the candidate; when the control plane
/// answers again with the candidate, the agent runs it again.
#[tokio::test]
async fn an_agent_stops_its_candidate_when_the_control_plane_is_gone() {
    let setup = Setup::new(&["bank-a-1"]).await;
    let a = setup.agent_with_candidate("").await;
    let cp = &setup.cp;
    until("the agent runs the candidate", || {
        a.preview().is_some_and(|p| p.refused.is_none())
    })
    .await;
    cp.unavailable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    until("the agent stops the candidate", || a.preview().is_none()).await;
    cp.unavailable
        .store(false, std::sync::atomic::Ordering::Relaxed);
    until("the agent runs the candidate again", || {
        a.preview().is_some_and(|p| p.refused.is_none())
    })
    .await;
    a.stop().await;
}

/// Every agent the agents file gives a pool is asked: one that never answers (here bank-a-2,
/// never started since the control plane started) is awaited, not passed, and the revision is
/// refused at the rollout deadline naming it; the agent that answered cannot carry the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_answer_is_awaited_not_passed() {
    use apitree::crd::duration::KubeDuration;
    use apitree::crd::gateway::{CheckPhase, GatewayPhase};
    let cp = ControlPlane::start(&["bank-a-1", "bank-a-2"]).await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let (mut tour, _api, _) = pool_gateway(&cp, notifier, None).await;
    let bank_up = start_upstream().await;
    let bank_url = format!("http://{}/", bank_up.addr.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let a1 = start(cp.agent("bank-a-1", dir.path(), &bank_url, &["accounts"]))
        .await
        .unwrap();
    let serving = tour.m.status.active_revision.clone();
    let mut spec = tour.m.spec.clone();
    spec.gate.rollout_deadline = KubeDuration::from_secs(3);
    spec.connectors[0].routes[0].timeout = Some(KubeDuration::from_secs(3));
    tour.set_spec(spec);
    tour.until("the revision is refused", Duration::from_secs(60), |m| {
        m.status.phase == Some(GatewayPhase::Rejected)
    })
    .await
    .unwrap();
    let rollout = tour.m.status.gate.as_ref().unwrap().checks[0].clone();
    assert_eq!(rollout.phase, CheckPhase::Failed);
    let why = rollout.reason.unwrap();
    assert!(
        why.contains("1/2 agent(s) awaited")
            && why.contains("bank-a-2 (not heard from since this control plane started)"),
        "{why}"
    );
    assert_eq!(tour.m.status.active_revision, serving);
    a1.stop().await;
    tour.ctx.platform.shutdown().await;
}
