//! The control plane: the ApiGateway control loop (`rollout`), its pure plan (`plan`), the gate
//! probes (`probes`), and the runners that drive it on the local platform (`local`, `demo`).

pub mod controller;
pub mod demo;
pub mod http;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod probes;
pub mod rollout;
