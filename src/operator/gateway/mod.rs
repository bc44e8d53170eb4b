//! The ApiGateway kind. `plan` computes what a gateway should run without I/O; `rollout` is its
//! control loop, shared by the cluster and this machine (validate, render, observe, step the
//! gate, act, watch); `probes` are the I/O half of gate checks 2–4; `sweep` is the periodic
//! health sweep; `controller` drives `rollout` from kube-runtime in a cluster and `apply` holds
//! its Kubernetes writes (status, Events). The children (Deployments, Services) are written by
//! the platform layer (`crate::platform::kube`).

pub mod apply;
pub mod controller;
pub mod plan;
pub mod probes;
pub mod rollout;
pub mod sweep;
