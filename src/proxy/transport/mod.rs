//! The proxy's transport, behind one seam: everything that moves bytes between clients, the
//! gateway and upstreams, so the policy stack (`crate::proxy::server`) reads without it.
//!
//! - `workers`: the accept loop and the worker pool (one single-threaded runtime per worker);
//! - `front`: the client-facing HTTP/1.1 fast path (hyper's server for everything else);
//! - `upstream` and `h1`: per-worker upstream connection pools and the bodiless HTTP/1.1 fast
//!   path to upstreams (hyper's client for everything else);
//! - `timer`: the per-worker deadline table; `drain`: graceful shutdown of client connections;
//! - `affinity`: binding workers to CPUs.
//!
//! The stack hands a request to [`upstream`] and gets a response back; the workers hand each
//! request to `Gateway::handle`. Nothing else crosses.

pub mod affinity;
pub mod drain;
pub mod front;
pub mod h1;
pub mod timer;
pub mod upstream;
pub mod workers;
