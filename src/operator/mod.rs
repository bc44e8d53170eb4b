//! The control plane: the ApiGateway control loop (`rollout`), its pure plan (`plan`), the gate
//! probes (`probes`), and what drives it: in a cluster the kube-runtime controller
//! (`controller`, with leader election in `lease` and the binary's wiring in `serve`); on this
//! machine `local` and `demo`. `http` serves the status page, metrics and Slack interactions.

pub mod console_watch;
pub mod controller;
pub mod credentials;
pub mod demo;
pub mod durable;
pub mod http;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod probes;
pub mod rollout;
pub mod serve;
