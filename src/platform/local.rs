//! The local platform: each color is a set of in-process proxies on loopback ports; each
//! gateway has a front listener (what clients use) and a preview listener (what the gate probes),
//! both HTTP forwarders that pick their color per request, so a switch is one atomic store and
//! takes effect on the very next request, keep-alive connections included.
//!
//! "Ready" means what it means for a pod: the replica listens and its `/readyz` says ready.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{Platform, PlatformError, Workload};
use crate::crd::gateway::Color;
use crate::entities::keys::Pepper;
use crate::entities::vault::MasterKeys;
use crate::gate::ColorObservation;
use crate::proxy::Embedded;

/// Secrets every local proxy uses (the local stand-in for the gateway's Secrets).
#[derive(Clone)]
pub struct LocalSecrets {
    pub pepper: Pepper,
    pub master_keys: Option<MasterKeys>,
}

type FrontBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP forwarder to the replicas of whichever color it currently points at.
struct Front {
    targets: RwLock<Vec<SocketAddr>>,
    next: AtomicUsize,
    client: Client<HttpConnector, Incoming>,
    label: &'static str,
}

fn json_reply(status: u16, code: &str, message: &str) -> hyper::Response<FrontBody> {
    let body = serde_json::json!({"error": message, "code": code}).to_string();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed())
        .unwrap_or_default()
}

impl Front {
    fn new(label: &'static str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            targets: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            label,
        }
    }

    fn point_at(&self, targets: Vec<SocketAddr>) {
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    fn pick(&self) -> Option<SocketAddr> {
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        if targets.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % targets.len();
        Some(targets[i])
    }

    async fn forward(&self, mut req: hyper::Request<Incoming>) -> hyper::Response<FrontBody> {
        let Some(target) = self.pick() else {
            return json_reply(
                503,
                "no_backend",
                &format!("the {} endpoint has no color behind it yet", self.label),
            );
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let Ok(uri) = format!("http://{target}{path}").parse() else {
            return json_reply(400, "bad_request", "the request target is not a valid URI");
        };
        *req.uri_mut() = uri;
        match self.client.request(req).await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => json_reply(
                502,
                "backend_unreachable",
                &format!("the {} replica at {target} did not answer: {e}", self.label),
            ),
        }
    }
}

async fn serve_front(
    front: Arc<Front>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        crate::proxy::transport::workers::accept_failed(&e).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let front = front.clone();
                let service = hyper::service::service_fn(move |req| {
                    let front = front.clone();
                    async move { Ok::<_, Infallible>(front.forward(req).await) }
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        }
    }
}

struct LocalColor {
    revision: String,
    instance: String,
    replicas: Vec<Embedded>,
}

struct LocalGateway {
    front: Arc<Front>,
    preview: Arc<Front>,
    front_addr: SocketAddr,
    preview_addr: SocketAddr,
    colors: HashMap<Color, LocalColor>,
    active: Option<Color>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl LocalGateway {
    fn addrs(&self, color: Color) -> Vec<SocketAddr> {
        self.colors
            .get(&color)
            .map(|c| c.replicas.iter().map(|r| r.addr).collect())
            .unwrap_or_default()
    }

    /// Points the front at the active color and the preview at the other one.
    fn repoint(&self) {
        match self.active {
            Some(active) => {
                self.front.point_at(self.addrs(active));
                self.preview.point_at(self.addrs(active.other()));
            }
            None => {
                self.front.point_at(Vec::new());
                self.preview.point_at(self.addrs(Color::Blue));
            }
        }
    }
}

/// Proxies in this process.
pub struct LocalPlatform {
    secrets: LocalSecrets,
    /// Front and preview ports of the n-th gateway are `base + 2n` and `base + 2n + 1`;
    /// ephemeral when None.
    base_port: Option<u16>,
    gateways: tokio::sync::Mutex<HashMap<String, LocalGateway>>,
    http: reqwest::Client,
    started: AtomicUsize,
}

impl LocalPlatform {
    pub fn new(secrets: LocalSecrets, base_port: Option<u16>) -> Self {
        Self {
            secrets,
            base_port,
            gateways: tokio::sync::Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            started: AtomicUsize::new(0),
        }
    }

    async fn open_gateway(&self, name: &str, index: usize) -> Result<LocalGateway, PlatformError> {
        let bind = |port: u16| async move {
            let addr = format!("127.0.0.1:{port}");
            TcpListener::bind(&addr)
                .await
                .map_err(|e| PlatformError::Listen {
                    gateway: name.to_string(),
                    addr,
                    reason: format!("{e}; pick another port with --port"),
                })
        };
        let (front_l, preview_l) = match self.base_port {
            Some(base) => {
                let port = base.saturating_add((index * 2) as u16);
                (bind(port).await?, bind(port.saturating_add(1)).await?)
            }
            None => (bind(0).await?, bind(0).await?),
        };
        let addr = |l: &TcpListener| {
            l.local_addr().map_err(|e| PlatformError::Listen {
                gateway: name.to_string(),
                addr: "127.0.0.1".into(),
                reason: e.to_string(),
            })
        };
        let (front_addr, preview_addr) = (addr(&front_l)?, addr(&preview_l)?);
        tracing::info!(
            gateway = name,
            front = %format!("http://{front_addr}"),
            preview = %format!("http://{preview_addr}"),
            "gateway listening: clients call the front, the gate probes the preview"
        );
        let (stop, rx) = tokio::sync::watch::channel(false);
        let front = Arc::new(Front::new("active"));
        let preview = Arc::new(Front::new("preview"));
        tokio::spawn(serve_front(front.clone(), front_l, rx.clone()));
        tokio::spawn(serve_front(preview.clone(), preview_l, rx));
        Ok(LocalGateway {
            front,
            preview,
            front_addr,
            preview_addr,
            colors: HashMap::new(),
            active: None,
            stop,
        })
    }

    /// Stops everything (end of `demo` / `local`).
    pub async fn shutdown(&self) {
        let names: Vec<String> = self.gateways.lock().await.keys().cloned().collect();
        for name in names {
            self.remove(&name).await;
        }
    }
}

/// Why the local platform refuses a spec with `spec.tls`.
const TLS_NEEDS_A_CLUSTER: &str = "spec.tls needs a cluster: the local platform's front and preview listeners speak plain HTTP; remove spec.tls to run it locally";

impl Platform for LocalPlatform {
    fn cannot_run(&self, spec: &crate::crd::gateway::ApiGatewaySpec) -> Option<String> {
        // Serving it as plain HTTP would pass the gate with a promise it does not keep.
        spec.tls.is_some().then(|| TLS_NEEDS_A_CLUSTER.to_string())
    }

    async fn deploy(&self, color: Color, d: &Workload) -> Result<(), PlatformError> {
        if let Some(reason) = self.cannot_run(&d.spec) {
            // The gate never asks (it refuses the spec first); a direct caller is refused too.
            return Err(PlatformError::Start {
                gateway: d.gateway.clone(),
                color: color.as_str(),
                reason,
            });
        }
        let mut gateways = self.gateways.lock().await;
        if !gateways.contains_key(&d.gateway) {
            let index = gateways.len();
            let gw = self.open_gateway(&d.gateway, index).await?;
            gateways.insert(d.gateway.clone(), gw);
        }
        let Some(gw) = gateways.get_mut(&d.gateway) else {
            return Err(PlatformError::UnknownGateway(d.gateway.clone()));
        };
        if let Some(running) = gw.colors.get(&color) {
            if running.revision == d.revision && running.replicas.len() == d.replicas as usize {
                return Ok(());
            }
        }
        if let Some(old) = gw.colors.remove(&color) {
            gw.repoint();
            for r in old.replicas {
                r.stop().await;
            }
        }
        let source = format!("gateway {} revision {}", d.gateway, d.revision);
        let mut replicas = Vec::new();
        for _ in 0..d.replicas.max(1) {
            match crate::proxy::start_embedded(
                &d.config,
                &source,
                self.secrets.pepper.clone(),
                self.secrets.master_keys.as_ref(),
            )
            .await
            {
                Ok(r) => replicas.push(r),
                Err(e) => {
                    for r in replicas {
                        r.stop().await;
                    }
                    return Err(PlatformError::Start {
                        gateway: d.gateway.clone(),
                        color: color.as_str(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        gw.colors.insert(
            color,
            LocalColor {
                revision: d.revision.clone(),
                instance: format!("local-{n}"),
                replicas,
            },
        );
        gw.repoint();
        Ok(())
    }

    /// In-process replicas: what runs is always known.
    async fn observe(
        &self,
        gateway: &str,
        color: Color,
    ) -> Result<Option<ColorObservation>, PlatformError> {
        let (revision, instance, admins) = {
            let gateways = self.gateways.lock().await;
            let Some(c) = gateways.get(gateway).and_then(|g| g.colors.get(&color)) else {
                return Ok(None);
            };
            let admins: Vec<SocketAddr> = c.replicas.iter().map(|r| r.admin).collect();
            (c.revision.clone(), c.instance.clone(), admins)
        };
        let mut ready = 0;
        for admin in &admins {
            let ok = self
                .http
                .get(format!("http://{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            ready += i32::from(ok);
        }
        Ok(Some(ColorObservation {
            revision,
            ready,
            replicas: admins.len() as i32,
            instance,
        }))
    }

    async fn switch(&self, gateway: &str, to: Color) -> Result<(), PlatformError> {
        let mut gateways = self.gateways.lock().await;
        let gw = gateways
            .get_mut(gateway)
            .ok_or_else(|| PlatformError::UnknownGateway(gateway.to_string()))?;
        gw.active = Some(to);
        gw.repoint();
        Ok(())
    }

    async fn scale_down(&self, gateway: &str, color: Color) -> Result<(), PlatformError> {
        let old = {
            let mut gateways = self.gateways.lock().await;
            let Some(gw) = gateways.get_mut(gateway) else {
                return Ok(());
            };
            let old = gw.colors.remove(&color);
            gw.repoint();
            old
        };
        if let Some(old) = old {
            for r in old.replicas {
                r.stop().await;
            }
        }
        Ok(())
    }

    /// `tls` is never true here: [`Platform::deploy`] refuses `spec.tls`.
    async fn preview_url(&self, gateway: &str, _tls: bool) -> Option<String> {
        let gateways = self.gateways.lock().await;
        gateways
            .get(gateway)
            .map(|g| format!("http://{}", g.preview_addr))
    }

    async fn active_url(&self, gateway: &str) -> Option<String> {
        let gateways = self.gateways.lock().await;
        gateways
            .get(gateway)
            .map(|g| format!("http://{}", g.front_addr))
    }

    /// `tls` is never true here (see [`LocalPlatform::preview_url`]).
    async fn admin_urls(
        &self,
        gateway: &str,
        color: Color,
        _tls: bool,
    ) -> Result<Vec<String>, PlatformError> {
        let gateways = self.gateways.lock().await;
        Ok(gateways
            .get(gateway)
            .and_then(|g| g.colors.get(&color))
            .map(|c| {
                c.replicas
                    .iter()
                    .map(|r| format!("http://{}", r.admin))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn remove(&self, gateway: &str) {
        let gw = self.gateways.lock().await.remove(gateway);
        if let Some(gw) = gw {
            let _ = gw.stop.send(true);
            for (_, c) in gw.colors {
                for r in c.replicas {
                    r.stop().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entities::keys::Pepper;

    /// A gateway with `spec.tls` is refused, saying why, instead of being served in clear.
    #[tokio::test]
    async fn a_tls_gateway_is_refused_not_served_in_clear() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let platform = LocalPlatform::new(
            LocalSecrets {
                pepper: Pepper::new(vec![7; 32]).unwrap(),
                master_keys: None,
            },
            None,
        );
        let spec: crate::crd::gateway::ApiGatewaySpec = serde_saphyr::from_str(
            "proxy:\n  routes:\n  - name: r\n    pathPrefix: /r/\n    upstream: http://127.0.0.1:9/\ntls:\n  secretName: t\n",
        )
        .unwrap();
        let d = Workload {
            gateway: "shop".into(),
            revision: "abc".into(),
            replicas: 1,
            config: crate::operator::gateway::plan::render(&spec, &Default::default()),
            image: String::new(),
            spec,
            owner_uid: None,
        };
        let err = platform.deploy(Color::Blue, &d).await.unwrap_err();
        assert_eq!(err.category(), "StartFailed");
        assert!(
            err.to_string().contains("spec.tls needs a cluster"),
            "{err}"
        );
        assert!(
            platform.preview_url("shop", true).await.is_none(),
            "nothing started"
        );
    }
}
