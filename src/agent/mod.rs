//! The on-premises Connector Agent: the proxy running inside a bank, configured from outside.
//!
//! The agent dials out to the control plane (no inbound port besides its own listener for the
//! bank's clients) over TLS 1.3 with the control plane's CA pinned, and authenticates with a
//! per-agent token the control plane can revoke. What crosses the line is fixed by types:
//! - inwards, [`bundle::AgentConfig`]: routes as policy, tiers, orgs and key hashes, inside a
//!   [`envelope::Envelope`] signed with the control plane's Ed25519 key, which the agent pins;
//! - outwards, [`report::Report`]: version, generation, refusals and metadata metrics only.
//!
//! The bank's upstream addresses, credentials, pepper and master keys stay in its local file
//! ([`bundle::AgentLocal`]). The last applied configuration is cached on disk ([`cache`]) and
//! served after a restart without the control plane.
//!
//! - [`run`]: the agent (`apitree agent`);
//! - [`hub`]: the control plane's endpoint the agents dial.

pub mod bundle;
pub mod cache;
pub mod envelope;
pub mod hub;
pub mod report;
pub mod run;
