//! apitree: a self-healing operator and gateway for API marketplaces.
//!
//! The binary (`src/bin/apitree/`) only parses the command line and dispatches here.
//! Dependencies run one way, from the operator down to `crd`, which depends on nothing of ours;
//! Kubernetes writes happen only in `platform::kube` (a gateway's children), in each
//! controller's `apply` module (status, Events, Secrets), in `operator::lease`, and through
//! kube-runtime's finalizer helper, which the gateway controller wraps each pass in.
//! `docs/architecture.md` draws the parts and lists every direction.
//!
//! No `unsafe` anywhere in the crate: the proxy parses untrusted bytes, and the few places
//! that would have wanted it (buffers, timers) are written without.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod console;
pub mod crd;
pub mod dashboard;
pub mod db;
pub mod demo;
pub mod detect;
pub mod drift;
pub mod entities;
pub mod gate;
pub mod notify;
pub mod operator;
pub mod platform;
pub mod proxy;
pub mod small_http;
pub mod telemetry;
pub mod tls;
