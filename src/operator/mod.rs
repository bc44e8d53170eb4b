//! The control plane. Each resource kind has the same shape: `plan` (pure: what should run),
//! a controller (kube-runtime wiring and the reconcile pass) and `apply` (its Kubernetes writes:
//! status, Events, Secret annotations). `gateway` is the ApiGateway kind, with its
//! platform-independent loop (`rollout`), the gate's probes and the periodic health `sweep`;
//! `credentials` is the CredentialPolicy kind, with its pure `rotation` rules. Around them:
//! leader election (`lease`), the binary's cluster wiring (`serve`), the HTTP port (`http`:
//! status page, metrics, Slack interactions), what must survive a restart (`durable`), the
//! console's watch (`console_watch`) and the loop on this machine (`local`).

pub mod console_watch;
pub mod credentials;
pub mod durable;
pub mod gateway;
pub mod http;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod serve;
