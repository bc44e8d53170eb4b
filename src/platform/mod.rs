//! Where proxies run. One trait, two implementations: `kube` (Deployments and Services in a
//! cluster) and `local` (proxies inside this process on loopback ports, behind a front listener
//! that switches color atomically). The controller and the gate do not know which one they drive.

/// Where a gateway's TLS Secret (`spec.tls.secretName`) is mounted in its proxies: outside
/// the config's directory, whose ConfigMap volume is read-only and cannot hold a mount point.
pub const TLS_DIR: &str = "/var/run/apitree/tls";

pub mod kube;
pub mod local;

use std::future::Future;

use crate::crd::gateway::{ApiGatewaySpec, Color};
use crate::gate::ColorObservation;
use crate::proxy::config::ProxyConfig;

/// One color of one gateway as the plan wants it: the proxies of one revision (a Kubernetes
/// Deployment in a cluster, processes on this machine).
#[derive(Debug, Clone)]
pub struct Workload {
    /// `name` locally, `namespace/name` in a cluster.
    pub gateway: String,
    pub revision: String,
    pub replicas: i32,
    /// The rendered proxy configuration (routes, tiers, orgs, keys, credentials).
    pub config: ProxyConfig,
    /// Container image (clusters only).
    pub image: String,
    /// The resource's spec: secret references, resources (clusters only).
    pub spec: ApiGatewaySpec,
    /// uid of the ApiGateway, for owner references (clusters only).
    pub owner_uid: Option<String>,
}

/// Why a platform call failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("cannot start {color} of gateway {gateway}: {reason}")]
    Start {
        gateway: String,
        color: &'static str,
        reason: String,
    },
    #[error("gateway {0} is not known to the platform")]
    UnknownGateway(String),
    #[error("cannot open the front listener of gateway {gateway} on {addr}: {reason}")]
    Listen {
        gateway: String,
        addr: String,
        reason: String,
    },
    #[error("cannot {verb} {kind} {name}: {source}")]
    Kube {
        verb: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: ::kube::Error,
    },
}

impl PlatformError {
    /// Stable label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Start { .. } => "StartFailed",
            Self::UnknownGateway(_) => "UnknownGateway",
            Self::Listen { .. } => "ListenFailed",
            Self::Kube { verb: "apply", .. } => "ApplyFailed",
            Self::Kube { verb: "delete", .. } => "DeleteFailed",
            Self::Kube { .. } => "KubeApiError",
        }
    }
}

/// A place where gateway colors run.
pub trait Platform: Send + Sync + 'static {
    /// What in `spec` this platform can never run, in words for `SpecValid` (None: it can).
    /// The gate treats it as a spec problem: one condition and one Event, and nothing is
    /// deployed until the spec changes, instead of a deploy that fails every pass.
    fn cannot_run(&self, _spec: &crate::crd::gateway::ApiGatewaySpec) -> Option<String> {
        None
    }

    /// Makes `color` run `d` (idempotent: the same revision is left alone).
    fn deploy(
        &self,
        color: Color,
        d: &Workload,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// What runs on `color`, and how much of it is ready; None when nothing runs. A platform
    /// that cannot tell (an API error, a timeout) says so with an error: it never passes for
    /// "nothing runs", which would restart a gate or flip traffic.
    fn observe(
        &self,
        gateway: &str,
        color: Color,
    ) -> impl Future<Output = Result<Option<ColorObservation>, PlatformError>> + Send;

    /// Sends all traffic to `to` in one step; the preview endpoint then reaches the other color.
    fn switch(
        &self,
        gateway: &str,
        to: Color,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Stops `color` (a color that does not exist is stopped).
    fn scale_down(
        &self,
        gateway: &str,
        color: Color,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Base URL of the preview endpoint (smoke probes and analysis traffic go here); `tls`:
    /// the gateway's proxies serve TLS (`spec.tls`), so the URL is https.
    fn preview_url(&self, gateway: &str, tls: bool) -> impl Future<Output = Option<String>> + Send;

    /// Base URL of the active endpoint (what clients use).
    fn active_url(&self, gateway: &str) -> impl Future<Output = Option<String>> + Send;

    /// Admin base URLs (`/metrics`, `/readyz`) of each replica of `color`; `tls`: the admin
    /// port speaks TLS (`spec.tls`), so the URLs are https.
    fn admin_urls(
        &self,
        gateway: &str,
        color: Color,
        tls: bool,
    ) -> impl Future<Output = Result<Vec<String>, PlatformError>> + Send;

    /// Removes everything of the gateway (resource deleted).
    fn remove(&self, gateway: &str) -> impl Future<Output = ()> + Send;
}
