//! The ApiGateway controller against a mocked API server (tower-test): every call a pass makes
//! is asserted — method, path and what the body carries — in order, and a call that is missing
//! or extra fails the test. Pods' admin ports and the preview Service are stub HTTP servers on
//! loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apitree::crd::gateway::{
    ApiGateway, ApiGatewaySpec, ApiGatewayStatus, CheckPhase, Color, GateCheckStatus, GateStatus,
    GatewayPhase,
};
use apitree::notify::Notifier;
use apitree::operator::gateway::controller::{reconcile, Operator};
use apitree::operator::gateway::plan;
use apitree::operator::http::HttpState;
use apitree::operator::metrics::OperatorMetrics;
use apitree::platform::kube::{KubePlatform, Target};
use apitree::proxy::config::ProxyConfig;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};

mod common;

const NS: &str = "shop-ns";
const IMAGE: &str = "ghcr.io/apitree/apitree:test";
/// The revision blue serves in the gate scenarios.
const OLD: &str = "0ld0ld0ld0";

// ---------------------------------------------------------------------------------------------
// Stub pods: /readyz, /metrics with counters that grow on every scrape, and a gateway that
// refuses keyless requests unless told to be broken.

#[derive(Default)]
struct Pods {
    scrapes: AtomicU64,
    /// Green errors per scrape (of 500 requests).
    errors_per_scrape: AtomicU64,
    /// The gateway forgets to ask for keys.
    open_door: AtomicBool,
    /// `/readyz` says not ready (its database is down).
    not_ready: AtomicBool,
}

/// Serves HTTP/1 on a loopback port, answering each request with `answer`'s (status, body);
/// returns the base URL.
async fn serve_stub(
    answer: impl Fn(&Request<hyper::body::Incoming>) -> (u16, String) + Send + Sync + 'static,
) -> String {
    let answer = Arc::new(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (status, body) = answer(&req);
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
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
    url
}

async fn start_pods() -> (String, Arc<Pods>) {
    let pods = Arc::new(Pods::default());
    let p = pods.clone();
    let url = serve_stub(move |req| match req.uri().path() {
        "/readyz" if p.not_ready.load(Ordering::SeqCst) => (503, json!({"status": "not ready", "database": "down", "rateLimitStore": "local"}).to_string()),
        "/readyz" => (200, json!({"status": "ready", "database": "off", "rateLimitStore": "local"}).to_string()),
        "/metrics" => {
            let n = p.scrapes.fetch_add(1, Ordering::SeqCst) + 1;
            let errors = n * p.errors_per_scrape.load(Ordering::SeqCst);
            (200, format!(
                "# TYPE apitree_proxy_requests_total counter\napitree_proxy_requests_total{{route=\"r\",status_class=\"2xx\"}} {}\napitree_proxy_requests_total{{route=\"r\",status_class=\"5xx\"}} {errors}\n",
                n * 500 - errors
            ))
        }
        _ if req.headers().contains_key("authorization") || p.open_door.load(Ordering::SeqCst) => (200, "{}".into()),
        _ => (401, json!({"error": "missing key", "code": "missing_key"}).to_string()),
    })
    .await;
    (url, pods)
}

// ---------------------------------------------------------------------------------------------
// The scenario runner.

/// One expected API call and the answer to it.
struct Call {
    method: &'static str,
    /// Path and query must start with this.
    path: String,
    /// Strings the request body must contain.
    body_has: Vec<String>,
    reply: Reply,
}

enum Reply {
    Json(u16, Value),
    /// The object the request carried (what an apply returns).
    Echo,
    /// The body of the last apply to the same path, as the object now stored.
    Stored(Box<dyn Fn(Value) -> Value + Send>),
}

fn call(method: &'static str, path: &str) -> Call {
    Call {
        method,
        path: path.to_string(),
        body_has: Vec::new(),
        reply: Reply::Echo,
    }
}

impl Call {
    fn has(mut self, s: &str) -> Self {
        self.body_has.push(s.to_string());
        self
    }
    fn reply(mut self, status: u16, v: Value) -> Self {
        self.reply = Reply::Json(status, v);
        self
    }
    fn stored(mut self, f: impl Fn(Value) -> Value + Send + 'static) -> Self {
        self.reply = Reply::Stored(Box::new(f));
        self
    }
    fn not_found(self) -> Self {
        self.reply(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers the calls in order; panics (failing the test) on a call that does not match.
fn run_scenario(
    handle: Arc<tokio::sync::Mutex<Handle>>,
    calls: Vec<Call>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut handle = handle.lock().await;
        let mut stored: HashMap<String, Value> = HashMap::new();
        let mut bodies = Vec::new();
        for (i, c) in calls.into_iter().enumerate() {
            let next = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await;
            let Ok(Some((req, send))) = next else {
                panic!("call {i} ({} {}) never came", c.method, c.path);
            };
            let method = req.method().to_string();
            let path = req.uri().path_and_query().unwrap().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&body).to_string();
            assert_eq!(
                (method.as_str(), path.starts_with(&c.path)),
                (c.method, true),
                "call {i}: expected {} {}, got {method} {path}",
                c.method,
                c.path
            );
            for s in &c.body_has {
                assert!(
                    text.contains(s.as_str()),
                    "call {i} {method} {path}: body lacks {s:?}:\n{text}"
                );
            }
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let bare = path.split('?').next().unwrap().to_string();
            if method == "PATCH" {
                stored.insert(bare.clone(), value.clone());
            }
            let (status, reply) = match c.reply {
                Reply::Json(s, v) => (s, v),
                Reply::Echo => (200, value.clone()),
                Reply::Stored(f) => (
                    200,
                    f(stored
                        .get(&bare)
                        .cloned()
                        .unwrap_or_else(|| panic!("nothing applied at {bare}"))),
                ),
            };
            bodies.push(value);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        // Nothing more may come.
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
        {
            panic!("unexpected extra call {} {}", req.method(), req.uri());
        }
        bodies
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn spec() -> ApiGatewaySpec {
    serde_json::from_value(json!({
        "image": IMAGE,
        "replicas": 2,
        "proxy": {"routes": [{"name": "r", "pathPrefix": "/r/", "upstream": "http://upstream.shop-ns.svc/"}]},
        "gate": {"observationWindow": "60s", "minSamples": 100, "autoPromote": true, "rollbackWindow": "10m"},
        "detection": {"window": "30s"}
    }))
    .unwrap()
}

fn revision_of(spec: &ApiGatewaySpec) -> String {
    plan::revision(IMAGE, &plan::render(spec, &ProxyConfig::default()), &[])
}

struct Fixture {
    gw: ApiGateway,
}

impl Fixture {
    fn new() -> Self {
        let mut gw = ApiGateway::new("shop", spec());
        gw.metadata.namespace = Some(NS.into());
        gw.metadata.uid = Some("uid-1".into());
        gw.metadata.generation = Some(1);
        gw.metadata.resource_version = Some("7".into());
        gw.metadata.finalizers = Some(vec!["apitree.io/cleanup".into()]);
        Self { gw }
    }
    fn with_status(mut self, s: ApiGatewayStatus) -> Self {
        self.gw.status = Some(s);
        self
    }
    fn annotate(mut self, k: &str, v: &str) -> Self {
        self.gw
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(k.into(), v.into());
        self
    }
}

fn check(name: &str, phase: CheckPhase, started: Timestamp) -> GateCheckStatus {
    GateCheckStatus {
        name: name.into(),
        phase,
        observed: None,
        threshold: None,
        samples: None,
        p_value: None,
        reason: None,
        started_at: Some(started.to_string()),
        finished_at: None,
    }
}

/// Blue serves `old`; a gate for `new` is at the given check phases.
fn gating(old: &str, new: &str, phases: [CheckPhase; 5], at: Timestamp) -> ApiGatewayStatus {
    let names = ["rollout", "health", "schema", "smoke", "analysis"];
    ApiGatewayStatus {
        phase: Some(GatewayPhase::Gating),
        active_color: Some(Color::Blue),
        active_revision: Some(old.into()),
        preview_revision: Some(new.into()),
        gate: Some(GateStatus {
            revision: new.into(),
            progress: String::new(),
            started_at: Some(at.to_string()),
            instance: None,
            checks: names
                .iter()
                .zip(phases)
                .map(|(n, p)| check(n, p, at))
                .collect(),
        }),
        ..ApiGatewayStatus::default()
    }
}

struct Harness {
    client: Client,
    op: Arc<Operator>,
    clock: Arc<Mutex<Timestamp>>,
    pods: Arc<Pods>,
    handle: Arc<tokio::sync::Mutex<Handle>>,
}

impl Harness {
    async fn new() -> Self {
        Self::keeping_state(None).await
    }

    /// A harness whose operator keeps its state in `state` (memory when None).
    async fn keeping_state(state: Option<Arc<apitree::operator::durable::Durable>>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, NS);
        let client_for_tests = client.clone();
        let (pods_url, pods) = start_pods().await;
        let resolver = Arc::new(move |_t: Target<'_>| pods_url.clone());
        let clock = Arc::new(Mutex::new(Timestamp::from_second(1_900_000_000).unwrap()));
        let c = clock.clone();
        let metrics = Arc::new(OperatorMetrics::new());
        let mut op = Operator::new(
            client.clone(),
            Arc::new(KubePlatform::new(client, resolver)),
            metrics.clone(),
            Arc::new(Notifier::recording()),
            "apitree:dev".into(),
            None,
            Arc::new(move || *c.lock().unwrap()),
            Arc::new(HttpState::new(metrics, None)),
        );
        if let Some(state) = state {
            op.set_durable(state);
        }
        let op = Arc::new(op);
        Self {
            client: client_for_tests,
            op,
            clock,
            pods,
            handle: Arc::new(tokio::sync::Mutex::new(handle)),
        }
    }

    /// One reconcile pass that must make exactly `calls`; returns the request bodies.
    async fn pass(&self, gw: &ApiGateway, calls: Vec<Call>) -> (Action, Vec<Value>) {
        let (result, bodies) = self.try_pass(gw, calls).await;
        (
            result.unwrap_or_else(|e| panic!("reconcile failed: {e}")),
            bodies,
        )
    }

    /// [`Harness::pass`] that may fail.
    async fn try_pass(
        &self,
        gw: &ApiGateway,
        calls: Vec<Call>,
    ) -> (
        Result<Action, apitree::operator::gateway::controller::ControllerError>,
        Vec<Value>,
    ) {
        let scenario = run_scenario(self.handle.clone(), calls);
        let result = tokio::time::timeout(
            Duration::from_secs(20),
            reconcile(Arc::new(gw.clone()), self.op.clone()),
        )
        .await
        .expect("reconcile finished");
        (
            result,
            scenario
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        )
    }

    /// The fixture gating its spec's revision against [`OLD`] on blue, at `phases`, now.
    fn gating(&self, phases: [CheckPhase; 5]) -> (Fixture, String) {
        let fx = Fixture::new();
        let new = revision_of(&fx.gw.spec);
        let t0 = *self.clock.lock().unwrap();
        (fx.with_status(gating(OLD, &new, phases, t0)), new)
    }

    fn advance(&self, secs: i64) {
        let mut c = self.clock.lock().unwrap();
        *c = c
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .unwrap();
    }
}

/// A Stable gateway on blue whose `spec.database` names Secret `shop-db` (at
/// `secret_version`, or "missing"), and its revision.
fn stable_with_database(secret_version: &str) -> (Fixture, String) {
    let mut fx = Fixture::new();
    fx.gw.spec.database =
        Some(serde_json::from_value(json!({"name": "shop-db", "key": "url"})).unwrap());
    let rev = plan::revision(
        IMAGE,
        &plan::render(&fx.gw.spec, &ProxyConfig::default()),
        &[("shop-db".into(), secret_version.into())],
    );
    let fx = fx.with_status(ApiGatewayStatus {
        phase: Some(GatewayPhase::Stable),
        active_color: Some(Color::Blue),
        active_revision: Some(rev.clone()),
        ..ApiGatewayStatus::default()
    });
    (fx, rev)
}

/// The calls of a quiet pass over [`stable_with_database`]'s gateway: its database Secret is
/// read (`db_secret`), both colors are observed, then `extra`.
fn stable_pass(db_secret: Call, rev: &str, extra: Vec<Call>) -> Vec<Call> {
    let mut calls = vec![db_secret];
    calls.extend(observe_both(Some(rev), None));
    calls.extend(extra);
    calls
}

/// A quiet pass of [`stable_with_database`]`("missing")`'s gateway (its database Secret is not
/// found), then `extra`.
fn quiet_without_secret(rev: &str, extra: Vec<Call>) -> Vec<Call> {
    let secret = format!("/api/v1/namespaces/{NS}/secrets/shop-db");
    stable_pass(call("GET", &secret).not_found(), rev, extra)
}

/// The first pass over that gateway: it becomes known and the detector primes on blue.
async fn prime_without_secret(h: &Harness, gw: &ApiGateway, rev: &str) {
    let calls = quiet_without_secret(
        rev,
        vec![
            call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
            status_patch(),
        ],
    );
    h.pass(gw, calls).await;
}

/// The read of [`stable_with_database`]'s Secret (at version 42), holding `url`.
fn database_secret(url: &str) -> Call {
    use base64::Engine;
    call("GET", &format!("/api/v1/namespaces/{NS}/secrets/shop-db")).reply(
        200,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "shop-db", "namespace": NS, "resourceVersion": "42"},
            "data": {"url": base64::engine::general_purpose::STANDARD.encode(url)}
        }),
    )
}

/// A quiet pass of [`stable_with_database`]`("42")`'s gateway whose database is at `url`.
fn quiet_pass_reading(url: &str, rev: &str) -> Vec<Call> {
    stable_pass(
        database_secret(url),
        rev,
        vec![
            call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
            status_patch(),
        ],
    )
}

fn deployments(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/{name}")
}
fn services(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/services/{name}")
}
fn pods_of(color: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods?&labelSelector=apitree.io%2Fgateway%3Dshop%2Capitree.io%2Fcolor%3D{color}")
}
fn status_path() -> String {
    format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/apigateways/shop/status?")
}
/// The status apply; answered with the object as stored.
fn status_patch() -> Call {
    call("PATCH", &status_path()).stored(|mut v| {
        v["metadata"] = json!({"name": "shop", "namespace": NS});
        v["spec"] = serde_json::to_value(spec()).unwrap();
        v
    })
}

fn events_path() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
}

/// A Deployment running `revision` with all replicas ready.
fn ready_deployment(name: &str, revision: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "generation": 1,
                     "annotations": {"apitree.io/revision": revision},
                     "ownerReferences": [{"apiVersion": "apitree.io/v1alpha1", "kind": "ApiGateway", "name": "shop", "uid": "uid-1"}]},
        "spec": {"replicas": 2, "selector": {}, "template": {}},
        "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}
    })
}

fn pod_list(color: &str) -> Value {
    let ids = [0, 1];
    json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {},
        "items": ids.iter().map(|i| json!({
            "metadata": {"name": format!("shop-{color}-{i}")},
            "status": {"podIP": format!("10.0.0.{i}"), "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "proxy", "restartCount": 0, "ready": true, "image": IMAGE, "imageID": "", "started": true}]}
        })).collect::<Vec<_>>()
    })
}

fn observe_both(blue: Option<&str>, green: Option<&str>) -> Vec<Call> {
    let mut calls = Vec::new();
    for (color, rev) in [("blue", blue), ("green", green)] {
        let name = format!("shop-{color}");
        match rev {
            Some(r) => {
                calls.push(call("GET", &deployments(&name)).reply(200, ready_deployment(&name, r)));
                calls.push(call("GET", &pods_of(color)).reply(200, pod_list(color)));
            }
            None => calls.push(call("GET", &deployments(&name)).not_found()),
        }
    }
    calls
}

/// A pass that starts the analysis of `new` (green) against `old` (blue): both colors
/// observed, both scraped (their pods listed), the detector's scrape of blue, then `status`.
fn analysis_start_pass(old: &str, new: &str, status: Call) -> Vec<Call> {
    let mut calls = observe_both(Some(old), Some(new));
    calls.extend([
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        call("GET", &pods_of("green")).reply(200, pod_list("green")),
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        status,
    ]);
    calls
}

/// The switch: the target Deployment is read (for its owner), then the active Service is
/// applied selecting `color` and the preview Service the other one.
fn switch_to(color: &str, revision: &str) -> Vec<Call> {
    let other = if color == "blue" { "green" } else { "blue" };
    let name = format!("shop-{color}");
    vec![
        call("GET", &deployments(&name)).reply(200, ready_deployment(&name, revision)),
        call("PATCH", &services("shop?"))
            .has(&format!("\"apitree.io/color\":\"{color}\""))
            .has("\"uid\":\"uid-1\""),
        call("PATCH", &services("shop-preview")).has(&format!("\"apitree.io/color\":\"{other}\"")),
    ]
}

/// A fresh health sweep's probe of the gateway's endpoints: blue's pods are listed (their
/// `/readyz` is then asked).
fn endpoints_probe() -> Call {
    call("GET", &pods_of("blue")).reply(200, pod_list("blue"))
}

fn event(reason: &str) -> Call {
    call("POST", &events_path()).has(&format!("\"reason\":\"{reason}\""))
}

fn status_of(bodies: &[Value]) -> ApiGatewayStatus {
    let last = bodies.last().unwrap();
    serde_json::from_value(last["status"].clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------

fn empty_pods() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
}

#[tokio::test]
async fn first_deploy_applies_the_children_then_serves_blue_once_ready() {
    let h = Harness::new().await;
    let fx = Fixture::new();
    let rev = revision_of(&fx.gw.spec);
    let mut calls = observe_both(None, None);
    calls.extend(first_deploy_writes(&rev));
    calls.extend(deploy_in_progress());
    let (action, bodies) = h.pass(&fx.gw, calls).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let status = status_of(&bodies);
    assert_eq!(status.phase, Some(GatewayPhase::Progressing));
    assert_eq!(status.active_revision, None);

    // Second pass: blue is ready → the active Service points at it.
    let fx = fx.with_status(status);
    let mut calls = observe_both(Some(&rev), None);
    calls.extend(switch_to("blue", &rev));
    calls.extend([
        // (The detector's next window is not due yet: no scrape.)
        event("Switched"),
        event("Deployed"),
        status_patch()
            .has("\"phase\":\"Stable\"")
            .has(&format!("\"activeRevision\":\"{rev}\""))
            .has("\"type\":\"Ready\""),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.active_color, Some(Color::Blue));
    assert_eq!(status.observed_generation, Some(1));
}

/// The writes of a first deploy to blue, in order: ServiceAccount, ConfigMap, Deployment,
/// PodDisruptionBudget, preview Service.
fn first_deploy_writes(rev: &str) -> Vec<Call> {
    vec![
        call("PATCH", &format!("/api/v1/namespaces/{NS}/serviceaccounts/shop?&force=true&fieldManager=apitree-operator"))
            .has("\"uid\":\"uid-1\"")
            .has("\"app.kubernetes.io/managed-by\":\"apitree-operator\""),
        call("PATCH", &format!("/api/v1/namespaces/{NS}/configmaps/shop-blue?"))
            .has("proxy.yaml")
            .has("pathPrefix: /r/")
            .has("listen: 0.0.0.0:8080"),
        call("PATCH", &deployments("shop-blue"))
            .has(&format!("\"apitree.io/revision\":\"{rev}\""))
            .has("\"replicas\":2")
            .has(IMAGE)
            .has("\"readinessProbe\""),
        call("PATCH", &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/shop-blue?"))
            .has("\"maxUnavailable\":1"),
        call("PATCH", &services("shop-preview")).has("\"apitree.io/color\":\"blue\""),
    ]
}

/// What follows [`first_deploy_writes`] in its pass: blue is observed again at once (applied,
/// not ready yet), its pods listed, green observed, the status written as Progressing.
fn deploy_in_progress() -> Vec<Call> {
    vec![
        call("GET", &deployments("shop-blue")).stored(|mut d| {
            d["status"] = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0});
            d["metadata"]["generation"] = json!(1);
            d
        }),
        call("GET", &pods_of("blue")).reply(200, empty_pods()),
        call("GET", &deployments("shop-green")).not_found(),
        status_patch().has("\"phase\":\"Progressing\""),
    ]
}

/// A Kubernetes API fault at any write of a deploy (each of its five applies; a 500, a 409, a
/// 429 or a 504 timeout) stops the deploy there, says why in one warning Event, and leaves the
/// status as a deploy in progress; the next pass applies everything again (nothing is taken as
/// deployed, nothing is refused for it).
#[tokio::test]
async fn api_faults_at_any_write_of_a_deploy_are_retried_by_the_next_pass() {
    let faults = [
        (500, "InternalError"),
        (409, "Conflict"),
        (429, "TooManyRequests"),
        (504, "Timeout"),
    ];
    let fx = Fixture::new();
    let rev = revision_of(&fx.gw.spec);
    for at in 0..first_deploy_writes(&rev).len() {
        for (code, reason) in faults {
            let h = Harness::new().await;
            let mut calls = observe_both(None, None);
            let mut writes = first_deploy_writes(&rev);
            writes.truncate(at + 1);
            let failing = writes.pop().unwrap().reply(code, api_error(code, reason));
            calls.extend(writes);
            calls.extend([
                failing,
                event("ApplyFailed").has(&format!("injected {code}")),
                status_patch(),
            ]);
            let (_, bodies) = h.pass(&fx.gw, calls).await;
            let status = status_of(&bodies);
            assert_eq!(status.active_revision, None, "write {at}, {code}");
            assert_eq!(
                status.phase,
                Some(GatewayPhase::Progressing),
                "write {at}, {code}"
            );
            // The next pass, with the API back, applies every child again.
            let fx = Fixture::new().with_status(status);
            let mut calls = observe_both(None, None);
            calls.extend(first_deploy_writes(&rev));
            calls.extend(deploy_in_progress());
            h.pass(&fx.gw, calls).await;
        }
    }
}

#[tokio::test]
async fn a_new_revision_passes_the_analysis_and_the_active_service_switches_to_green() {
    use CheckPhase::*;
    let h = Harness::new().await;
    let old = OLD;
    let (fx, new) = h.gating([Passed, Passed, Skipped, Passed, Running]);
    // Pass 1: a fresh operator has no analysis counters: the window starts now.
    let calls = analysis_start_pass(
        old,
        &new,
        status_patch()
            .has("\"phase\":\"Gating\"")
            .has("\"progress\":\"4/5\""),
    );
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.gate.as_ref().unwrap().checks[4].phase, Running);

    // Pass 2, a window later: green served thousands of clean requests → promote.
    h.advance(61);
    let fx = fx.with_status(status);
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend(switch_to("green", &new));
    calls.extend([
        call("GET", &pods_of("green")).reply(200, pod_list("green")),
        event("Switched"),
        event("Promoted"),
        status_patch()
            .has("\"phase\":\"Promoting\"")
            .has("\"progress\":\"5/5\"")
            .has(&format!("\"previousRevision\":\"{old}\"")),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.active_color, Some(Color::Green));
    let analysis = &status.gate.unwrap().checks[4];
    assert_eq!(analysis.phase, Passed);
    assert!(analysis.samples.unwrap() >= 1000, "{analysis:?}");
}

/// A switch the API refuses (the active Service's apply fails) is not a switch: no
/// "Switched" or "Promoted", no scale-down, the status still says blue takes traffic (gate at
/// 4/5, analysis running), one warning Event says why; the next pass promotes for real.
#[tokio::test]
async fn a_switch_the_api_refuses_is_undone_and_the_next_pass_makes_it() {
    use CheckPhase::*;
    let h = Harness::new().await;
    let old = OLD;
    let (fx, new) = h.gating([Passed, Passed, Skipped, Passed, Running]);
    let calls = analysis_start_pass(old, &new, status_patch());
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let started = status_of(&bodies);
    h.advance(61);
    let fx = fx.with_status(started.clone());
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend([
        call("GET", &deployments("shop-green")).reply(200, ready_deployment("shop-green", &new)),
        call("PATCH", &services("shop?")).reply(500, api_error(500, "InternalError")),
        event("ApplyFailed").has("did not happen"),
        status_patch(),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.active_color, Some(Color::Blue));
    assert_eq!(status.active_revision.as_deref(), Some(old));
    assert_eq!(status.phase, started.phase);
    assert_eq!(status.gate, started.gate, "the gate stays where it was");
    // The next pass switches for real.
    let fx = fx.with_status(status);
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend(switch_to("green", &new));
    calls.extend([
        call("GET", &pods_of("green")).reply(200, pod_list("green")),
        event("Switched"),
        event("Promoted"),
        status_patch().has("\"phase\":\"Promoting\""),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    assert_eq!(status_of(&bodies).active_color, Some(Color::Green));
}

/// A status the API will not take after a switch (500, 429, 500: retried within the pass,
/// then the pass fails) is not forgotten: the next pass starts from the status it decided —
/// green takes traffic, gate at 5/5 — not from the object's older one, so traffic is not
/// switched again and "Switched" / "Promoted" are not announced twice.
#[tokio::test]
async fn a_status_the_api_refuses_after_a_switch_is_written_later_without_switching_twice() {
    use CheckPhase::*;
    let h = Harness::new().await;
    let (fx, new) = h.gating([Passed, Passed, Skipped, Passed, Running]);
    let (_, bodies) = h
        .pass(&fx.gw, analysis_start_pass(OLD, &new, status_patch()))
        .await;
    let started = status_of(&bodies);
    h.advance(61);
    let fx = fx.with_status(started.clone());
    let refused = |code: u16, reason: &str| {
        call("PATCH", &status_path()).reply(code, api_error(code, reason))
    };
    let mut calls = observe_both(Some(OLD), Some(&new));
    calls.extend(switch_to("green", &new));
    calls.extend([
        call("GET", &pods_of("green")).reply(200, pod_list("green")),
        event("Switched"),
        event("Promoted"),
        refused(500, "InternalError"),
        refused(429, "TooManyRequests"),
        refused(500, "InternalError"),
    ]);
    let (result, bodies) = h.try_pass(&fx.gw, calls).await;
    assert!(
        result.is_err(),
        "the pass fails once its status cannot be written"
    );
    let attempts: Vec<&Value> = bodies.iter().rev().take(3).collect();
    assert!(
        attempts.windows(2).all(|w| w[0] == w[1]),
        "every attempt writes the same status"
    );
    let decided = status_of(&bodies);
    assert_eq!(decided.active_color, Some(Color::Green));
    // The object still says blue and gating; the next pass writes what was decided.
    let mut calls = observe_both(Some(OLD), Some(&new));
    calls.push(status_patch());
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let written = status_of(&bodies);
    assert_eq!(written.active_color, Some(Color::Green));
    assert_eq!(written.gate, decided.gate);
    assert_eq!(written.phase, decided.phase);
}

/// One gateway never waits for another: while a pass of `cart` hangs on a slow API call
/// (holding only its own gateway's state), a pass of `shop` runs its gate to the end.
#[tokio::test]
async fn a_pass_stuck_on_one_gateway_does_not_hold_up_another() {
    use CheckPhase::*;
    let h = Harness::new().await;
    let (fx, new) = h.gating([Passed, Passed, Skipped, Passed, Running]);
    let mut cart = fx.gw.clone();
    cart.metadata.name = Some("cart".into());
    cart.metadata.uid = Some("uid-cart".into());
    let stuck = tokio::spawn(reconcile(Arc::new(cart), h.op.clone()));
    // cart's first call arrives and is never answered while shop's pass runs.
    let (first, _held) = {
        let mut handle = h.handle.lock().await;
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("cart's pass calls the API")
            .unwrap();
        (req.uri().path().to_string(), send)
    };
    assert!(first.contains("cart"), "{first}");
    let calls = analysis_start_pass(OLD, &new, status_patch().has("\"phase\":\"Gating\""));
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    assert_eq!(status_of(&bodies).gate.unwrap().checks[4].phase, Running);
    assert!(
        !stuck.is_finished(),
        "cart's pass is still waiting for its answer"
    );
    stuck.abort();
}

/// A Kubernetes API error status, as the API server sends it.
fn api_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "code": code, "message": format!("injected {code}")})
}

/// A Kubernetes API fault mid-gate on a read the gate decides on (the Deployments, the pods;
/// a 5xx, a 429, a 504 timeout) is not "nothing runs": the pass decides nothing (no probe, no
/// switch, no scale-down, no check restarted), writes back the status it read unchanged
/// (compared as parsed JSON), says so in one warning Event, and the next pass resumes the
/// gate where it was.
#[tokio::test]
async fn api_faults_while_observing_never_move_the_gate_and_the_next_pass_resumes_it() {
    use CheckPhase::*;
    let faults: Vec<(&str, u16, &str)> = vec![
        ("blue Deployment", 500, "InternalError"),
        ("green Deployment", 503, "ServiceUnavailable"),
        ("green pods", 429, "TooManyRequests"),
        ("blue pods", 504, "Timeout"),
    ];
    for (what, code, reason) in faults {
        let h = Harness::new().await;
        let (fx, new) = h.gating([Passed, Passed, Skipped, Passed, Running]);
        let before = serde_json::to_value(fx.gw.status.as_ref().unwrap()).unwrap();
        let fail = |c: Call| c.reply(code, api_error(code, reason));
        let mut calls = Vec::new();
        match what {
            "blue Deployment" => calls.push(fail(call("GET", &deployments("shop-blue")))),
            "blue pods" => {
                calls.push(
                    call("GET", &deployments("shop-blue"))
                        .reply(200, ready_deployment("shop-blue", OLD)),
                );
                calls.push(fail(call("GET", &pods_of("blue"))));
            }
            "green Deployment" => {
                calls.extend(observe_both(Some(OLD), None).into_iter().take(2));
                calls.push(fail(call("GET", &deployments("shop-green"))));
            }
            _ => {
                calls.extend(observe_both(Some(OLD), None).into_iter().take(2));
                calls.push(
                    call("GET", &deployments("shop-green"))
                        .reply(200, ready_deployment("shop-green", &new)),
                );
                calls.push(fail(call("GET", &pods_of("green"))));
            }
        }
        calls.push(event("KubeApiError").has(&format!("injected {code}")));
        calls.push(status_patch());
        let (_, bodies) = h.pass(&fx.gw, calls).await;
        // (The spec's own validity is not the API's to change; everything else stays.)
        let mut written = bodies.last().unwrap()["status"].clone();
        written.as_object_mut().unwrap().remove("conditions");
        assert_eq!(written, before, "{what} {code}: the status moved");
        // The next pass sees everything: the gate resumes at check 5 (nothing restarted).
        let calls = analysis_start_pass(OLD, &new, status_patch());
        let (_, bodies) = h.pass(&fx.gw, calls).await;
        let after = status_of(&bodies);
        let checks = &after.gate.as_ref().unwrap().checks;
        let was: ApiGatewayStatus = serde_json::from_value(before.clone()).unwrap();
        for (i, check) in checks.iter().enumerate().take(4) {
            assert_eq!(
                check,
                &was.gate.as_ref().unwrap().checks[i],
                "{what} {code}: check {i} changed"
            );
        }
        assert_eq!(checks[4].phase, Running, "{what} {code}");
        assert_eq!(after.active_color, was.active_color);
    }
}

#[tokio::test]
async fn a_gateway_that_lets_keyless_requests_through_fails_smoke_and_green_is_scaled_down() {
    use CheckPhase::*;
    let h = Harness::new().await;
    h.pods.open_door.store(true, Ordering::SeqCst);
    let old = OLD;
    let (fx, new) = h.gating([Passed, Passed, Skipped, Pending, Pending]);
    let mut calls = observe_both(Some(old), Some(&new));
    // The smoke probe goes through the preview Service (no pod list); with its result the gate
    // steps again on a fresh observation.
    calls.extend(observe_both(Some(old), Some(&new)));
    calls.extend([
        call("PATCH", &deployments("shop-green"))
            .has("\"replicas\":0")
            .has("\"name\":\"shop-green\""),
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        event("Rejected"),
        status_patch()
            .has("\"phase\":\"Rejected\"")
            .has("no-key-is-refused: GET /r/ → 200, expected 401")
            .has("\"reason\":\"RevisionRejected\""),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.active_revision.as_deref(), Some(old));
    assert_eq!(status.rejected_revision.unwrap().revision, new);
    assert_eq!(status.gate.unwrap().checks[3].phase, Failed);
}

/// A scale-down the API refuses (any of 500, 409, 429, 504) leaves the refused revision's
/// replicas running only until the next pass: the decision stands (Rejected, blue serving),
/// one warning Event says green keeps running, and the next pass, seeing green still up with
/// no gate to run, scales it down.
#[tokio::test]
async fn a_scale_down_the_api_refuses_is_asked_for_again_by_the_next_pass() {
    use CheckPhase::*;
    for (code, reason) in [
        (500, "InternalError"),
        (409, "Conflict"),
        (429, "TooManyRequests"),
        (504, "Timeout"),
    ] {
        let h = Harness::new().await;
        h.pods.open_door.store(true, Ordering::SeqCst);
        let (fx, new) = h.gating([Passed, Passed, Skipped, Pending, Pending]);
        let mut calls = observe_both(Some(OLD), Some(&new));
        calls.extend(observe_both(Some(OLD), Some(&new)));
        calls.extend([
            call("PATCH", &deployments("shop-green")).reply(code, api_error(code, reason)),
            call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
            event("KubeApiError").has("green keeps running"),
            event("Rejected"),
            status_patch().has("\"phase\":\"Rejected\""),
        ]);
        let (_, bodies) = h.pass(&fx.gw, calls).await;
        let status = status_of(&bodies);
        assert_eq!(status.active_revision.as_deref(), Some(OLD), "{code}");
        // Green still runs; the next pass scales it down, and nothing else.
        let fx = fx.with_status(status.clone());
        let mut calls = observe_both(Some(OLD), Some(&new));
        calls.extend([
            call("PATCH", &deployments("shop-green")).has("\"replicas\":0"),
            status_patch(),
        ]);
        let (_, bodies) = h.pass(&fx.gw, calls).await;
        let after = status_of(&bodies);
        assert_eq!(after.phase, status.phase, "{code}");
        assert_eq!(after.rejected_revision, status.rejected_revision, "{code}");
        // Once green is gone, nothing more is asked.
        let mut calls = observe_both(Some(OLD), None);
        calls.push(status_patch());
        h.pass(&fx.with_status(after).gw, calls).await;
    }
}

#[tokio::test]
async fn the_promote_annotation_switches_a_revision_awaiting_approval() {
    use CheckPhase::*;
    let h = Harness::new().await;
    let old = "0ld0ld0ld0";
    let fx = Fixture::new();
    let new = revision_of(&fx.gw.spec);
    let t0 = *h.clock.lock().unwrap();
    let mut status = gating(old, &new, [Passed, Passed, Skipped, Passed, Passed], t0);
    status.phase = Some(GatewayPhase::AwaitingApproval);
    // Without the annotation nothing moves.
    let fx = fx.with_status(status);
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend([
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        status_patch().has("\"phase\":\"AwaitingApproval\""),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    let fx = fx.with_status(status).annotate("apitree.io/promote", &new);
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend(switch_to("green", &new));
    calls.extend([
        event("Switched"),
        event("Promoted").has("promoted by annotation apitree.io/promote"),
        status_patch().has("\"phase\":\"Promoting\""),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    assert_eq!(
        status_of(&bodies).active_revision.as_deref(),
        Some(new.as_str())
    );
}

#[tokio::test]
async fn the_rollback_annotation_inside_the_window_switches_back_to_blue() {
    let h = Harness::new().await;
    let old = "0ld0ld0ld0";
    let fx = Fixture::new();
    let new = revision_of(&fx.gw.spec);
    let t0 = *h.clock.lock().unwrap();
    let status = ApiGatewayStatus {
        phase: Some(GatewayPhase::Promoting),
        active_color: Some(Color::Green),
        active_revision: Some(new.clone()),
        previous_revision: Some(old.into()),
        switched_at: Some(t0.to_string()),
        ..ApiGatewayStatus::default()
    };
    h.advance(120);
    let fx = fx.with_status(status).annotate("apitree.io/rollback", &new);
    let mut calls = observe_both(Some(old), Some(&new));
    calls.extend(switch_to("blue", old));
    calls.extend([
        call("PATCH", &deployments("shop-green")).has("\"replicas\":0"),
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        event("Switched"),
        event("RolledBack").has("rolled back by annotation apitree.io/rollback"),
        status_patch()
            .has("\"phase\":\"RolledBack\"")
            .has(&format!("\"activeRevision\":\"{old}\"")),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert_eq!(status.active_color, Some(Color::Blue));
    assert_eq!(status.rejected_revision.unwrap().revision, new);
}

#[tokio::test]
async fn deletion_removes_every_labelled_child_then_the_finalizer() {
    let h = Harness::new().await;
    let mut fx = Fixture::new();
    fx.gw.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        *h.clock.lock().unwrap(),
    ));
    let selector = "labelSelector=apitree.io%2Fgateway%3Dshop%2Capp.kubernetes.io%2Fmanaged-by%3Dapitree-operator";
    let list = |kind: &str, names: &[&str]| {
        json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {},
               "items": names.iter().map(|n| json!({"metadata": {"name": n, "namespace": NS}})).collect::<Vec<_>>()})
    };
    let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
    let calls = vec![
        call(
            "GET",
            &format!("/apis/apps/v1/namespaces/{NS}/deployments?&{selector}"),
        )
        .reply(200, list("Deployment", &["shop-blue", "shop-green"])),
        call("DELETE", &deployments("shop-blue")).reply(200, ok.clone()),
        call("DELETE", &deployments("shop-green")).reply(200, ok.clone()),
        call(
            "GET",
            &format!("/api/v1/namespaces/{NS}/services?&{selector}"),
        )
        .reply(200, list("Service", &["shop", "shop-preview"])),
        call("DELETE", &services("shop")).reply(200, ok.clone()),
        call("DELETE", &services("shop-preview")).reply(200, ok.clone()),
        call(
            "GET",
            &format!("/api/v1/namespaces/{NS}/configmaps?&{selector}"),
        )
        .reply(200, list("ConfigMap", &["shop-blue"])),
        call(
            "DELETE",
            &format!("/api/v1/namespaces/{NS}/configmaps/shop-blue"),
        )
        .reply(200, ok.clone()),
        call(
            "GET",
            &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets?&{selector}"),
        )
        .reply(200, list("PodDisruptionBudget", &[])),
        call(
            "GET",
            &format!("/api/v1/namespaces/{NS}/serviceaccounts?&{selector}"),
        )
        .reply(200, list("ServiceAccount", &["shop"])),
        call(
            "DELETE",
            &format!("/api/v1/namespaces/{NS}/serviceaccounts/shop"),
        )
        .reply(200, ok.clone()),
        // The finalizer comes off only after the children are gone.
        call(
            "PATCH",
            &format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/apigateways/shop?"),
        )
        .has("\"op\":\"remove\"")
        .has("/metadata/finalizers/0")
        .reply(200, serde_json::to_value(&fx.gw).unwrap()),
    ];
    let (action, _) = h.pass(&fx.gw, calls).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_slack_token_that_does_not_resolve_is_one_warning_event_not_one_per_pass() {
    let h = Harness::new().await;
    let mut fx = Fixture::new();
    fx.gw.spec.escalation.slack = Some(
        serde_json::from_value(json!({
            "channels": {"warning": "C0WARN"},
            "token": {"name": "slack-app", "key": "bot-token"},
            "signingSecret": {"name": "slack-app", "key": "signing-secret"}
        }))
        .unwrap(),
    );
    let rev = revision_of(&fx.gw.spec);
    let fx = fx.with_status(ApiGatewayStatus {
        phase: Some(GatewayPhase::Stable),
        active_color: Some(Color::Blue),
        active_revision: Some(rev.clone()),
        ..ApiGatewayStatus::default()
    });
    let secret = format!("/api/v1/namespaces/{NS}/secrets/slack-app");
    let mut calls = vec![call("GET", &secret).not_found()];
    calls.extend(observe_both(Some(&rev), None));
    calls.extend([
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        event("SlackNotConfigured").has("Secret slack-app has no key \\\"bot-token\\\""),
        status_patch().has("\"phase\":\"Stable\""),
    ]);
    h.pass(&fx.gw, calls).await;
    // The same problem on the next pass: no second Event.
    let mut calls = vec![call("GET", &secret).not_found()];
    calls.extend(observe_both(Some(&rev), None));
    calls.push(status_patch());
    h.pass(&fx.gw, calls).await;
}

#[tokio::test]
async fn a_credential_policy_counts_secret_ages_and_reminds_once_per_offset() {
    use apitree::crd::credential_policy::CredentialPolicy;
    use apitree::operator::credentials::controller::{reconcile as reconcile_policy, Rotations};
    let h = Harness::new().await;
    let clock = h.clock.clone();
    let notifier = Arc::new(Notifier::recording());
    let metrics = Arc::new(OperatorMetrics::new());
    let rotations = Arc::new(Rotations::new(
        h.client.clone(),
        metrics.clone(),
        notifier.clone(),
        Arc::new(move || *clock.lock().unwrap()),
    ));
    let spec =
        serde_json::from_value(json!({"secretSelector": {"matchLabels": {"rotate": "yes"}}}))
            .unwrap();
    let mut policy = CredentialPolicy::new("vendor-secrets", spec);
    policy.metadata.namespace = Some(NS.into());
    policy.metadata.generation = Some(1);
    let now = *h.clock.lock().unwrap();
    let days_ago = |d: i64| {
        now.checked_sub(k8s_openapi::jiff::SignedDuration::from_hours(24 * d))
            .unwrap()
            .to_string()
    };
    let secrets_of = |rotated_at: &str| {
        json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
            "items": [
                {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                 "metadata": {"name": "fresh", "namespace": NS, "creationTimestamp": days_ago(10)}},
                {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                 "metadata": {"name": "vendor-token", "namespace": NS, "creationTimestamp": days_ago(400),
                              "annotations": {"apitree.io/rotated-at": rotated_at}}}
            ]
        })
    };
    let secrets = secrets_of(&days_ago(95));
    let list = format!("/api/v1/namespaces/{NS}/secrets?&labelSelector=rotate%3Dyes");
    let status = format!(
        "/apis/apitree.io/v1alpha1/namespaces/{NS}/credentialpolicies/vendor-secrets/status?"
    );
    let stored = |mut v: Value| {
        v["metadata"] = json!({"name": "vendor-secrets", "namespace": NS});
        v["spec"] = json!({"secretSelector": {"matchLabels": {"rotate": "yes"}}});
        v
    };
    let calls = vec![
        call("GET", &list).reply(200, secrets.clone()),
        event("CredentialOverdue").has("secret vendor-token is OVERDUE"),
        call("PATCH", &status)
            .has("\"tracked\":2")
            .has("\"overdue\":1")
            .has("\"name\":\"vendor-token\"")
            .stored(stored),
    ];
    let scenario = run_scenario(h.handle.clone(), calls);
    let action = reconcile_policy(Arc::new(policy.clone()), rotations.clone())
        .await
        .unwrap();
    scenario.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(3600)));
    // An hour later nothing new has happened: no second reminder.
    h.advance(3600);
    let calls = vec![
        call("GET", &list).reply(200, secrets),
        call("PATCH", &status).has("\"overdue\":1").stored(stored),
    ];
    let scenario = run_scenario(h.handle.clone(), calls);
    reconcile_policy(Arc::new(policy.clone()), rotations.clone())
        .await
        .unwrap();
    scenario.await.unwrap();
    // Overdue is a warning incident, opened once.
    let incidents = notifier.recorded();
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].signal, "credentials overdue");
    assert_eq!(incidents[0].severity, apitree::detect::Severity::Warning);
    assert_eq!(
        incidents[0].gateway,
        format!("CredentialPolicy {NS}/vendor-secrets")
    );
    // On-call acknowledges it from Slack.
    let press = apitree::notify::slack::Interaction {
        action: apitree::notify::slack::Action::Acknowledge,
        incident: incidents[0].incident_id,
        revision: None,
        rotate: None,
        message: None,
        user_id: "U9".into(),
        user_name: "mina".into(),
    };
    assert!(rotations.respond(&press).await);
    assert_eq!(
        notifier.recorded()[1].acknowledged_by.as_deref(),
        Some("U9")
    );
    // The reminder also went to the notifier (Slack when configured), once, as urgent.
    let notes = notifier.recorded_notes();
    assert_eq!(notes.len(), 1);
    assert!(notes[0].urgent);
    assert!(
        notes[0].text.contains("vendor-token is OVERDUE"),
        "{}",
        notes[0].text
    );
    // The chart's ApitreeCredentialOverdue alert reads this.
    assert!(metrics
        .render()
        .contains("apitree_operator_credentials{state=\"overdue\"} 1"));
    // Rotated: nothing is overdue and the incident resolves.
    let calls = vec![
        call("GET", &list).reply(200, secrets_of(&days_ago(0))),
        call("PATCH", &status).has("\"overdue\":0").stored(stored),
    ];
    let scenario = run_scenario(h.handle.clone(), calls);
    reconcile_policy(Arc::new(policy), rotations).await.unwrap();
    scenario.await.unwrap();
    let last = notifier.recorded().pop().unwrap();
    assert_eq!(last.event, apitree::detect::IncidentEvent::Resolve);
    assert_eq!(last.signal, "credentials overdue");
}

#[tokio::test]
async fn a_promotion_is_written_to_the_gateway_databases_audit_log() {
    use CheckPhase::*;
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let h = Harness::new().await;
    let old = "0ld0ld0ld0";
    let mut fx = Fixture::new();
    fx.gw.spec.database =
        Some(serde_json::from_value(json!({"name": "shop-db", "key": "url"})).unwrap());
    let new = plan::revision(
        IMAGE,
        &plan::render(&fx.gw.spec, &ProxyConfig::default()),
        &[("shop-db".into(), "42".into())],
    );
    let t0 = *h.clock.lock().unwrap();
    let mut status = gating(old, &new, [Passed, Passed, Passed, Passed, Passed], t0);
    status.phase = Some(GatewayPhase::AwaitingApproval);
    let fx = fx.with_status(status).annotate("apitree.io/promote", &new);
    let mut calls = vec![database_secret(&db.url)];
    calls.extend(observe_both(Some(old), Some(&new)));
    calls.extend(switch_to("green", &new));
    calls.extend([
        call("GET", &pods_of("green")).reply(200, pod_list("green")),
        event("Switched"),
        event("Promoted"),
        status_patch().has("\"phase\":\"Promoting\""),
    ]);
    h.pass(&fx.gw, calls).await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, target FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [(
            "apitree-operator".to_string(),
            "rollout.promoted".to_string(),
            "shop-ns/shop".to_string()
        )]
    );
}

/// The operator reads each gateway database's audit log once per detection window: a
/// credential change made there becomes a notice in the gateway's channel (changes from
/// before the operator started are not announced again).
#[tokio::test]
async fn credential_changes_in_the_gateway_database_reach_the_gateways_channel() {
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let detail = json!({});
    apitree::db::audit::append(
        &pool,
        "cli",
        "key.create",
        "at_live_Old00000",
        None,
        &detail,
    )
    .await
    .unwrap();
    let h = Harness::new().await;
    let (fx, rev) = stable_with_database("42");
    let quiet = || quiet_pass_reading(&db.url, &rev);
    h.pass(&fx.gw, quiet()).await;
    apitree::db::audit::append(
        &pool,
        "jiwoo@example.com",
        "key.rotate",
        "at_live_Xy3kQ9ab",
        None,
        &detail,
    )
    .await
    .unwrap();
    h.advance(301);
    h.pass(&fx.gw, quiet()).await;
    let notes: Vec<String> =
        h.op.notifier
            .recorded_notes()
            .into_iter()
            .map(|n| n.text)
            .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("key.rotate at_live_Xy3kQ9ab by jiwoo@example.com"),
        "{notes:?}"
    );
}

/// With a state database, a credential change made while the operator was down is announced
/// by the next operator (it reads on from where the last one stopped), once.
#[tokio::test]
async fn credential_changes_made_while_the_operator_was_down_are_announced_after_it_restarts() {
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let state = Arc::new(
        apitree::operator::durable::Durable::open(Some(&db.url))
            .await
            .unwrap(),
    );
    let detail = json!({});
    let (fx, rev) = stable_with_database("42");
    let quiet = || quiet_pass_reading(&db.url, &rev);
    let first = Harness::keeping_state(Some(state.clone())).await;
    first.pass(&fx.gw, quiet()).await;
    drop(first);
    // Down: a key is revoked meanwhile.
    apitree::db::audit::append(
        &pool,
        "cli",
        "key.revoke",
        "at_live_Gone0000",
        None,
        &detail,
    )
    .await
    .unwrap();
    let second = Harness::keeping_state(Some(state)).await;
    second.pass(&fx.gw, quiet()).await;
    let notes: Vec<String> = second
        .op
        .notifier
        .recorded_notes()
        .into_iter()
        .map(|n| n.text)
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("key.revoke at_live_Gone0000 by cli"),
        "{notes:?}"
    );
    second.advance(301);
    second.pass(&fx.gw, quiet()).await;
    assert_eq!(
        second.op.notifier.recorded_notes().len(),
        1,
        "announced once"
    );
}

#[tokio::test]
async fn security_drift_found_by_the_sweep_is_a_critical_incident_until_it_is_gone() {
    use apitree::crd::gateway::DriftSummary;
    use apitree::operator::gateway::sweep::SweepOutcome;
    let h = Harness::new().await;
    let (fx, rev) = stable_with_database("missing");
    let quiet = |extra: Vec<Call>| quiet_without_secret(&rev, extra);
    // First pass: the gateway is known; the detector primes on blue.
    prime_without_secret(&h, &fx.gw, &rev).await;
    let sweep = |security: u32| SweepOutcome {
        gateway: "shop-ns/shop".into(),
        at: chrono::Utc::now(),
        drift: Some(DriftSummary {
            checked_at: "now".into(),
            missing: 0,
            extra: 0,
            changed: security,
            security,
            message: Some(format!("{security} weakening security")),
        }),
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        purged: Default::default(),
        probed: Vec::new(),
        problems: Vec::new(),
    };
    h.op.record_sweep(vec![sweep(2)]).await;
    let (_, bodies) = h
        .pass(
            &fx.gw,
            quiet(vec![
                endpoints_probe(),
                event("SchemaDrift"),
                status_patch()
                    .has("\"signal\":\"security drift\"")
                    .has("\"severity\":\"critical\"")
                    .has("\"drift\":{\"changed\":2")
                    .has("\"id\":\"security drift\""),
            ]),
        )
        .await;
    assert_eq!(status_of(&bodies).open_incidents, 1);
    let opened = h.op.notifier.recorded();
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].signal, "security drift");
    assert_eq!(opened[0].severity, apitree::detect::Severity::Critical);
    // The same sweep result on the next pass: no second incident, no second Event.
    h.pass(&fx.gw, quiet(vec![status_patch()])).await;
    assert_eq!(h.op.notifier.recorded().len(), 1);
    // Fixed: the incident resolves.
    h.op.record_sweep(vec![sweep(0)]).await;
    let (_, bodies) = h
        .pass(&fx.gw, quiet(vec![endpoints_probe(), status_patch()]))
        .await;
    assert_eq!(status_of(&bodies).open_incidents, 0);
    let all = h.op.notifier.recorded();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].event, apitree::detect::IncidentEvent::Resolve);
}

/// The health sweep looks at every gateway, with a database or without: each route's upstream
/// (its `probe`, which is not part of the revision: adding one starts no gate) and, in the
/// gateway's next pass, its serving replicas' `/readyz`. An upstream that does not answer is
/// an `upstream down` incident on its route, replicas that are not ready an `endpoints down`
/// one (one Event, `status.probes`, Slack), until a sweep finds them up; a pass that sees the
/// same sweep again changes nothing.
#[tokio::test]
async fn what_the_sweep_finds_down_is_an_incident_until_a_sweep_finds_it_up() {
    use apitree::detect::{IncidentEvent, Severity};
    use apitree::operator::gateway::sweep::{Probed, SweepOutcome, Upstream};
    let h = Harness::new().await;
    let (mut fx, rev) = stable_with_database("missing");
    fx.gw.spec.proxy.routes[0].probe =
        Some(serde_json::from_value(json!({"path": "/health"})).unwrap());
    let quiet = |extra: Vec<Call>| quiet_without_secret(&rev, extra);
    prime_without_secret(&h, &fx.gw, &rev).await;
    let targets = h.op.sweep_targets().await;
    assert_eq!(
        targets.len(),
        1,
        "a gateway whose database is unknown is swept too"
    );
    assert_eq!(targets[0].database_url, None);
    // …and the sweep says why it skips the database (it is not taken for one without).
    let unresolved = targets[0].unresolved.as_deref().unwrap_or_default();
    assert!(unresolved.contains("Secret shop-db"), "{unresolved}");
    assert_eq!(
        targets[0].upstreams,
        [Upstream {
            route: "r".into(),
            url: "http://upstream.shop-ns.svc/".into(),
            probe: fx.gw.spec.proxy.routes[0].probe.clone(),
        }]
    );
    let sweep = |down: Option<&str>| SweepOutcome {
        gateway: "shop-ns/shop".into(),
        at: chrono::Utc::now(),
        drift: None,
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        purged: Default::default(),
        probed: vec![Probed {
            route: Some("r".into()),
            target: "http://upstream.shop-ns.svc/health".into(),
            down: down.map(str::to_string),
        }],
        problems: Vec::new(),
    };
    let answered_503 = "GET http://upstream.shop-ns.svc/health answered 503, expected 200";
    h.op.record_sweep(vec![sweep(Some(answered_503))]).await;
    h.pods.not_ready.store(true, Ordering::SeqCst);
    let (_, bodies) = h
        .pass(
            &fx.gw,
            quiet(vec![
                endpoints_probe(),
                event("ProbeFailed")
                    .has(&format!("route r: {answered_503}"))
                    .has("endpoints: 0/2 replicas ready"),
                status_patch(),
            ]),
        )
        .await;
    let probes = status_of(&bodies).probes.expect("status.probes");
    assert_eq!(probes.probed, 2);
    assert_eq!(probes.down.len(), 2, "{probes:?}");
    let told: Vec<_> =
        h.op.notifier
            .recorded()
            .iter()
            .map(|n| (n.signal.clone(), n.route.clone(), n.event, n.severity))
            .collect();
    assert_eq!(
        told,
        [
            (
                "upstream down".to_string(),
                "r".to_string(),
                IncidentEvent::Open,
                Severity::High
            ),
            (
                "endpoints down".to_string(),
                String::new(),
                IncidentEvent::Open,
                Severity::High
            ),
        ]
    );
    assert_eq!(status_of(&bodies).open_incidents, 2);
    // The same sweep seen again: no probe, no Event, no notice.
    h.pass(&fx.gw, quiet(vec![status_patch()])).await;
    assert_eq!(h.op.notifier.recorded().len(), 2);
    // Up again.
    h.pods.not_ready.store(false, Ordering::SeqCst);
    h.op.record_sweep(vec![sweep(None)]).await;
    let (_, bodies) = h
        .pass(&fx.gw, quiet(vec![endpoints_probe(), status_patch()]))
        .await;
    let status = status_of(&bodies);
    assert_eq!(status.open_incidents, 0);
    assert!(status.probes.unwrap().down.is_empty());
    let resolved: Vec<_> = h.op.notifier.recorded()[2..]
        .iter()
        .map(|n| (n.signal.clone(), n.event))
        .collect();
    assert_eq!(
        resolved,
        [
            ("upstream down".to_string(), IncidentEvent::Resolve),
            ("endpoints down".to_string(), IncidentEvent::Resolve),
        ]
    );
}

#[tokio::test]
async fn a_slack_acknowledgement_reaches_the_incident_the_status_and_the_audit_log() {
    use apitree::crd::gateway::DriftSummary;
    use apitree::notify::slack::{Action as Button, Interaction};
    use apitree::operator::gateway::sweep::SweepOutcome;
    use base64::Engine;
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let h = Harness::new().await;
    let (fx, rev) = stable_with_database("42");
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "shop-db", "namespace": NS, "resourceVersion": "42"},
        "data": {"url": base64::engine::general_purpose::STANDARD.encode(&db.url)}
    });
    let quiet = |extra: Vec<Call>| {
        let db_secret = call("GET", &format!("/api/v1/namespaces/{NS}/secrets/shop-db"))
            .reply(200, secret.clone());
        stable_pass(db_secret, &rev, extra)
    };
    h.pass(
        &fx.gw,
        quiet(vec![
            call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
            status_patch(),
        ]),
    )
    .await;
    h.op.record_sweep(vec![SweepOutcome {
        gateway: "shop-ns/shop".into(),
        at: chrono::Utc::now(),
        drift: Some(DriftSummary {
            checked_at: "now".into(),
            security: 1,
            changed: 1,
            ..DriftSummary::default()
        }),
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        purged: Default::default(),
        probed: Vec::new(),
        problems: Vec::new(),
    }])
    .await;
    h.pass(
        &fx.gw,
        quiet(vec![
            endpoints_probe(),
            event("SchemaDrift"),
            status_patch(),
        ]),
    )
    .await;
    let incident = h.op.notifier.recorded()[0].incident_id;

    let press = |action| Interaction {
        action,
        incident,
        revision: None,
        rotate: None,
        message: None,
        user_id: "U7".into(),
        user_name: "jiwoo".into(),
    };
    h.op.press(press(Button::Acknowledge)).await;
    // Slack shows it at once; the Event, status and audit row follow at the next pass.
    let update = h.op.notifier.recorded().pop().unwrap();
    assert_eq!(update.incident_id, incident);
    assert_eq!(update.remark.as_deref(), Some("acknowledged by <@U7>"));
    // A press for an incident no gateway holds waits, and is not audited.
    h.op.press(Interaction {
        incident: uuid::Uuid::new_v4(),
        ..press(Button::Silence1h)
    })
    .await;
    let (_, bodies) = h
        .pass(
            &fx.gw,
            quiet(vec![
                event("IncidentAcknowledged"),
                status_patch().has("\"acknowledgedBy\":\"U7\""),
            ]),
        )
        .await;
    assert_eq!(status_of(&bodies).open_incidents, 1);
    let rows = common::audit_named(&pool).await;
    assert_eq!(
        rows,
        [(
            "slack:jiwoo (U7)".to_string(),
            "slack.acknowledge".to_string(),
            "shop-ns/shop".to_string()
        )]
    );
}

#[tokio::test]
async fn a_credential_policy_reencrypts_to_the_new_master_key_once_the_gateway_runs_it() {
    use apitree::crd::credential_policy::{CredentialPolicy, CredentialPolicyStatus};
    use apitree::entities::vault::MasterKeys;
    use apitree::operator::credentials::controller::{reconcile as reconcile_policy, Rotations};
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (k1, k2) = (b64.encode([7u8; 32]), b64.encode([9u8; 32]));
    let v1 = MasterKeys::single(1, &k1).unwrap();
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let org = common::seed_upstream_credentials(&pool, &v1, 30).await;

    let h = Harness::new().await;
    // The credentials were written just now: none is due yet.
    *h.clock.lock().unwrap() = k8s_openapi::jiff::Timestamp::now();
    let clock = h.clock.clone();
    let rotations = Arc::new(Rotations::new(
        h.client.clone(),
        Arc::new(OperatorMetrics::new()),
        Arc::new(Notifier::recording()),
        Arc::new(move || *clock.lock().unwrap()),
    ));
    let spec = json!({"database": {"gatewayRef": "shop"}});
    let mut policy =
        CredentialPolicy::new("vendor-db", serde_json::from_value(spec.clone()).unwrap());
    policy.metadata.namespace = Some(NS.into());
    policy.metadata.generation = Some(1);
    // The gateway's master key is now a keyring with v2; its proxies hold `holding`.
    let gateway = |holding: Vec<u32>| {
        let mut gw = serde_json::to_value(&Fixture::new().gw).unwrap();
        gw["spec"]["database"] = json!({"name": "shop-db", "key": "url"});
        gw["spec"]["secrets"] = json!({"keyPepper": {"name": "pepper", "key": "pepper"}, "masterKey": {"name": "master-keys", "key": "keys"}});
        gw["status"] = json!({"masterKeyVersions": holding});
        gw
    };
    let secret = |name: &str, key: &str, value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
               "data": {key: b64.encode(value)}})
    };
    let reads = |holding: Vec<u32>| {
        vec![
            call(
                "GET",
                &format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/apigateways/shop"),
            )
            .reply(200, gateway(holding)),
            call("GET", &format!("/api/v1/namespaces/{NS}/secrets/shop-db"))
                .reply(200, secret("shop-db", "url", &db.url)),
            call(
                "GET",
                &format!("/api/v1/namespaces/{NS}/secrets/master-keys"),
            )
            .reply(
                200,
                secret("master-keys", "keys", &format!("1:{k1}\n2:{k2}\n")),
            ),
        ]
    };
    let status =
        format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/credentialpolicies/vendor-db/status?");
    let stored = |mut v: Value| {
        v["metadata"] = json!({"name": "vendor-db", "namespace": NS});
        v["spec"] = json!({"database": {"gatewayRef": "shop"}});
        v
    };
    // The proxies still hold only v1: re-encrypting now would break them. It waits.
    let mut calls = reads(vec![1]);
    calls.push(
        call("PATCH", &status)
            .has("\"targetVersion\":2")
            .has("\"done\":0")
            .has("\"total\":30")
            .has("do not hold master key v2 yet")
            .stored(stored),
    );
    let scenario = run_scenario(h.handle.clone(), calls);
    let action = tokio::time::timeout(
        Duration::from_secs(30),
        reconcile_policy(Arc::new(policy.clone()), rotations.clone()),
    )
    .await;
    let bodies = scenario.await.unwrap();
    let action = action.expect("the pass finished").unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT key_version FROM upstream_credentials")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [1]);

    // The gateway switched to a revision holding v1 and v2: everything moves to v2.
    policy.status = Some(
        serde_json::from_value::<CredentialPolicyStatus>(bodies.last().unwrap()["status"].clone())
            .unwrap(),
    );
    let mut calls = reads(vec![1, 2]);
    calls.push(event("Reencrypted").has("master key v2"));
    calls.push(
        call("PATCH", &status)
            .has("\"done\":30")
            .has("\"total\":30")
            .stored(stored),
    );
    let scenario = run_scenario(h.handle.clone(), calls);
    let action = reconcile_policy(Arc::new(policy), rotations).await.unwrap();
    let bodies = scenario.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(3600)));
    let progress = &bodies.last().unwrap()["status"]["reencryption"];
    assert!(progress.get("waiting").is_none(), "{progress}");
    assert!(
        progress.get("versionsInUse").is_none(),
        "v1 can retire: {progress}"
    );
    let v2_only = MasterKeys::single(2, &k2).unwrap();
    common::assert_seeded_credentials_decrypt(&pool, &v2_only, org).await;
}

#[tokio::test]
async fn the_master_key_versions_of_the_revision_taking_traffic_are_in_status() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let h = Harness::new().await;
    let mut fx = Fixture::new();
    fx.gw.spec.secrets = Some(
        serde_json::from_value(json!({
            "keyPepper": {"name": "pepper", "key": "pepper"},
            "masterKey": {"name": "master-keys", "key": "keys"}
        }))
        .unwrap(),
    );
    let keyring = format!("1:{}\n2:{}\n", b64.encode([1u8; 32]), b64.encode([2u8; 32]));
    let secret = |name: &str, key: &str, value: &str, version: &str| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": NS, "resourceVersion": version},
               "data": {key: b64.encode(value)}})
    };
    let reads = || {
        vec![
            call("GET", &format!("/api/v1/namespaces/{NS}/secrets/pepper"))
                .reply(200, secret("pepper", "pepper", &"p".repeat(32), "7")),
            call(
                "GET",
                &format!("/api/v1/namespaces/{NS}/secrets/master-keys"),
            )
            .reply(200, secret("master-keys", "keys", &keyring, "8")),
        ]
    };
    let rev = plan::revision(
        IMAGE,
        &plan::render(&fx.gw.spec, &ProxyConfig::default()),
        &[
            ("pepper".into(), "7".into()),
            ("master-keys".into(), "8".into()),
        ],
    );
    let mut calls = reads();
    calls.extend(observe_both(None, None));
    calls.extend([
        call("PATCH", &format!("/api/v1/namespaces/{NS}/serviceaccounts/shop?&force=true&fieldManager=apitree-operator")),
        call("PATCH", &format!("/api/v1/namespaces/{NS}/configmaps/shop-blue?")),
        call("PATCH", &deployments("shop-blue")).has(&rev).has("APITREE_MASTER_KEY"),
        call("PATCH", &format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/shop-blue?")),
        call("PATCH", &services("shop-preview")),
        call("GET", &deployments("shop-blue")).stored(|mut d| {
            d["status"] = json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0});
            d["metadata"]["generation"] = json!(1);
            d
        }),
        call("GET", &pods_of("blue")).reply(200, empty_pods()),
        call("GET", &deployments("shop-green")).not_found(),
        status_patch(),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    let status = status_of(&bodies);
    assert!(
        status.master_key_versions.is_empty(),
        "nothing takes traffic yet"
    );
    let fx = fx.with_status(status);
    let mut calls = reads();
    calls.extend(observe_both(Some(&rev), None));
    calls.extend(switch_to("blue", &rev));
    calls.extend([
        event("Switched"),
        event("Deployed"),
        status_patch().has("\"masterKeyVersions\":[1,2]"),
    ]);
    let (_, bodies) = h.pass(&fx.gw, calls).await;
    assert_eq!(status_of(&bodies).master_key_versions, [1, 2]);
}

#[tokio::test]
async fn a_smoke_probe_retries_an_upstream_error_but_not_a_wrong_answer() {
    use apitree::crd::gateway::CheckPhase;
    use apitree::gate::GateCheck;
    use apitree::operator::gateway::probes::{run, ProbeTarget, SecretResolver};
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A preview endpoint whose /flaky answers 500 once, /down always 502, /gone 404.
    let calls = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = calls.clone();
    let base = serve_stub(move |req| {
        let path = req.uri().path().to_string();
        let n = {
            let mut c = seen.lock().unwrap();
            let n = c.entry(path.clone()).or_default();
            *n += 1;
            *n
        };
        let status = match path.as_str() {
            _ if !req.headers().contains_key("authorization") => 401,
            "/flaky" if n == 1 => 500,
            "/down" => 502,
            "/gone" => 404,
            _ => 200,
        };
        (status, "{}".into())
    })
    .await;
    async fn probe(base: &str, path: &str) -> apitree::gate::ProbeResult {
        let mut spec = spec();
        spec.gate.smoke = serde_json::from_value(json!([
            {"name": "p", "path": path, "apiKey": {"name": "s", "key": "k"}}
        ]))
        .unwrap();
        let secrets: Arc<SecretResolver> = Arc::new(|_| Some("at_live_key".to_string()));
        run(
            GateCheck::Smoke,
            &ProbeTarget {
                http: &reqwest::Client::new(),
                spec: &spec,
                revision: "rev",
                preview_url: Some(base.to_string()),
                admin_urls: Vec::new(),
                secrets: secrets.as_ref(),
            },
        )
        .await
    }
    let flaky = probe(&base, "/flaky").await;
    assert_eq!(flaky.phase, CheckPhase::Passed, "{}", flaky.reason);
    let down = probe(&base, "/down").await;
    assert_eq!(down.phase, CheckPhase::Failed);
    assert!(down.reason.contains("→ 502"), "{}", down.reason);
    let gone = probe(&base, "/gone").await;
    assert_eq!(gone.phase, CheckPhase::Failed);
    let calls = calls.lock().unwrap();
    assert_eq!((calls["/flaky"], calls["/down"], calls["/gone"]), (2, 3, 1));
}

#[tokio::test]
async fn rotate_now_from_slack_puts_the_new_key_in_the_secret_and_keeps_the_old_one_in_grace() {
    use apitree::crd::credential_policy::CredentialPolicy;
    use apitree::entities::keys::{ApiKey, Pepper};
    use apitree::notify::slack::{Action as Button, Interaction, RotateTarget};
    use apitree::operator::credentials::controller::{reconcile as reconcile_policy, Rotations};
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    const PEPPER: &str = "rotate-now-test-pepper-0123456789-abcdef";
    let pepper = Pepper::new(PEPPER.as_bytes().to_vec()).unwrap();
    let db = common::TestDb::new().await;
    let pool = db.migrated_pool().await;
    let old = common::seed_live_key(&pool, &pepper, "checkout").await;
    // 80 days old: inside the 14-day reminder of a 90-day maximum age.
    sqlx::query("UPDATE api_keys SET created_at = now() - interval '80 days'")
        .execute(&pool)
        .await
        .unwrap();

    let h = Harness::new().await;
    *h.clock.lock().unwrap() = k8s_openapi::jiff::Timestamp::now();
    let clock = h.clock.clone();
    let notifier = Arc::new(Notifier::recording());
    let rotations = Arc::new(Rotations::new(
        h.client.clone(),
        Arc::new(OperatorMetrics::new()),
        notifier.clone(),
        Arc::new(move || *clock.lock().unwrap()),
    ));
    let spec = |allow: bool| {
        json!({"database": {"gatewayRef": "shop", "upstreamCredentials": false},
               "notify": {"allowRotateFromSlack": allow}, "gracePeriod": "12h"})
    };
    let policy_path = format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/credentialpolicies/keys");
    let policy_json = |allow: bool| {
        json!({"apiVersion": "apitree.io/v1alpha1", "kind": "CredentialPolicy",
               "metadata": {"name": "keys", "namespace": NS, "generation": 1}, "spec": spec(allow)})
    };
    let mut gateway = serde_json::to_value(&Fixture::new().gw).unwrap();
    gateway["spec"]["database"] = json!({"name": "shop-db", "key": "url"});
    gateway["spec"]["secrets"] = json!({"keyPepper": {"name": "pepper", "key": "pepper"}});
    let secret = |name: &str, key: &str, value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
               "data": {key: b64.encode(value)}})
    };
    let gateway_reads = || {
        vec![
            call(
                "GET",
                &format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/apigateways/shop"),
            )
            .reply(200, gateway.clone()),
            call("GET", &format!("/api/v1/namespaces/{NS}/secrets/shop-db"))
                .reply(200, secret("shop-db", "url", &db.url)),
        ]
    };
    let target = format!("/api/v1/namespaces/{NS}/secrets/apitree-rotated-keys");
    let target_exists = || {
        call("GET", &target).reply(
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": "apitree-rotated-keys", "namespace": NS}}),
        )
    };

    // The reminder carries a Rotate now button naming the key and the policy.
    let mut policy: CredentialPolicy = serde_json::from_value(policy_json(true)).unwrap();
    let mut calls = gateway_reads();
    calls.push(event("CredentialDue").has(old.key.prefix()));
    calls.push(
        call(
            "PATCH",
            &format!("/apis/apitree.io/v1alpha1/namespaces/{NS}/credentialpolicies/keys/status?"),
        )
        .has("\"due\":1")
        .stored(|mut v| {
            v["metadata"] = json!({"name": "keys", "namespace": NS});
            v["spec"] = json!({});
            v
        }),
    );
    let scenario = run_scenario(h.handle.clone(), calls);
    reconcile_policy(Arc::new(policy.clone()), rotations.clone())
        .await
        .unwrap();
    scenario.await.unwrap();
    let reminder = notifier.recorded_notes().pop().unwrap();
    let button = reminder.rotate.clone().expect("a Rotate now button");
    assert_eq!(button.key_id, old.id);
    assert_eq!(button.key_prefix, old.key.prefix());
    assert_eq!(button.grace, "12h");
    let press = Interaction {
        action: Button::RotateKey,
        incident: reminder.id,
        revision: None,
        rotate: Some(RotateTarget {
            key_id: old.id,
            namespace: NS.into(),
            policy: "keys".into(),
        }),
        message: None,
        user_id: "U9".into(),
        user_name: "mina".into(),
    };
    let press_with = |calls: Vec<Call>| {
        let scenario = run_scenario(h.handle.clone(), calls);
        let rotations = rotations.clone();
        let press = press.clone();
        async move {
            assert!(rotations.rotate_from_slack(&press).await);
            scenario
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        }
    };
    let keys_in_db = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    };
    let last_reply = || notifier.recorded_notes().pop().unwrap().text;

    // 1. The Secret the key would go to does not exist: nothing is rotated, the reply says
    //    how to create it.
    press_with(vec![
        call("GET", &policy_path).reply(200, policy_json(true)),
        call("GET", &target).not_found(),
        event("KeyRotationFailed").has("does not exist"),
    ])
    .await;
    assert!(last_reply().contains("kubectl -n shop-ns create secret generic apitree-rotated-keys"));
    assert_eq!(keys_in_db().await, 1);

    // 2. Writing the Secret fails: the rotation is rolled back, the old key untouched.
    let reads = || {
        let mut calls = vec![
            call("GET", &policy_path).reply(200, policy_json(true)),
            target_exists(),
        ];
        calls.extend(gateway_reads());
        calls.push(
            call("GET", &format!("/api/v1/namespaces/{NS}/secrets/pepper"))
                .reply(200, secret("pepper", "pepper", PEPPER)),
        );
        calls
    };
    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                           "message": "secrets \"apitree-rotated-keys\" is forbidden: cannot patch"});
    let mut failing = reads();
    failing.push(call("PATCH", &target).reply(403, forbidden));
    failing.push(event("KeyRotationFailed").has("rolled back"));
    press_with(failing).await;
    assert!(
        last_reply().contains("the old key is unchanged"),
        "{}",
        last_reply()
    );
    assert_eq!(keys_in_db().await, 1);
    let grace: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT grace_until FROM api_keys WHERE id = $1")
            .bind(old.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(grace, None);

    // 3. It works: the new key is in the Secret (only there), the old one valid for 12 hours.
    let mut calls = reads();
    calls.push(
        call("PATCH", &target)
            .has("\"data\"")
            .has("rotated from Slack by slack:mina (U9)"),
    );
    calls.push(event("KeyRotated").has(old.key.prefix()));
    let bodies = press_with(calls).await;
    let patch = bodies.iter().find(|b| b.get("data").is_some()).unwrap();
    let (new_prefix, encoded) = patch["data"].as_object().unwrap().iter().next().unwrap();
    let new_key = String::from_utf8(b64.decode(encoded.as_str().unwrap()).unwrap()).unwrap();
    let new_key = ApiKey::parse(&new_key).unwrap();
    assert_eq!(new_key.prefix(), new_prefix);
    let (scope, tier, hash): (String, String, Vec<u8>) = sqlx::query_as(
        "SELECT scope::text, tier, key_hash FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(new_prefix)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((scope.as_str(), tier.as_str()), ("live", "gold"));
    assert_eq!(
        hash,
        pepper.hash(&new_key).0.to_vec(),
        "hashed with the gateway's pepper"
    );
    let grace: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT grace_until FROM api_keys WHERE id = $1")
            .bind(old.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let hours = (grace - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((11.9..=12.0).contains(&hours), "grace ends in {hours} h");
    let named = common::audit_named(&pool).await;
    let actor = &named.iter().find(|r| r.1 == "key.rotate").unwrap().0;
    assert_eq!(actor, "slack:mina (U9)");
    // Slack hears where the key is, never the key; the reminder loses its button.
    let reply = last_reply();
    assert!(
        reply.contains(&format!(
            "the new key {new_prefix} is in Secret shop-ns/apitree-rotated-keys"
        )),
        "{reply}"
    );
    for n in notifier.recorded_notes() {
        assert!(
            !n.text.contains(new_key.expose_secret()),
            "the key reached Slack: {}",
            n.text
        );
    }

    // 4. A second press of the same button changes nothing.
    let mut calls = reads();
    calls.push(event("KeyRotationFailed").has("already rotated"));
    press_with(calls).await;
    assert_eq!(keys_in_db().await, 2);

    // 5. The policy no longer allows it: refused before anything is read.
    policy.spec.notify.allow_rotate_from_slack = false;
    press_with(vec![
        call("GET", &policy_path).reply(200, serde_json::to_value(&policy).unwrap()),
        event("KeyRotationFailed").has("allowRotateFromSlack is false"),
    ])
    .await;
    assert_eq!(keys_in_db().await, 2);
}

/// A pass that stops on an API fault says so: the controller looks again in 2 s, as during a
/// gate, not after the steady state's detection window (the status and an Event already say
/// what failed).
#[tokio::test]
async fn a_pass_stopped_by_an_api_fault_is_retried_sooner_than_a_quiet_one() {
    let h = Harness::new().await;
    let fx = Fixture::new();
    let rev = revision_of(&fx.gw.spec);
    let fx = fx.with_status(ApiGatewayStatus {
        phase: Some(GatewayPhase::Stable),
        active_color: Some(Color::Blue),
        active_revision: Some(rev.clone()),
        ..ApiGatewayStatus::default()
    });
    let mut calls = observe_both(Some(&rev), None);
    calls.extend([
        call("GET", &pods_of("blue")).reply(200, pod_list("blue")),
        status_patch().has("\"phase\":\"Stable\""),
    ]);
    let (quiet, _) = h.pass(&fx.gw, calls).await;
    assert!(
        quiet != Action::requeue(Duration::from_secs(2)),
        "a quiet steady pass waits for its detection window: {quiet:?}"
    );
    let calls = vec![
        call("GET", &deployments("shop-blue")).reply(500, api_error(500, "InternalError")),
        event("KubeApiError").has("injected 500"),
        status_patch(),
    ];
    let (action, _) = h.pass(&fx.gw, calls).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
}
