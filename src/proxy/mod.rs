//! The gateway data plane.

pub mod breaker;
pub mod keys;
pub mod pii;
pub mod ratelimit;
pub mod vault;
