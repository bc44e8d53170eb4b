//! What crosses the line between the control plane and a bank, and what never does.
//!
//! [`AgentConfig`] is everything the control plane sends: routes as policy ([`ConnectorRoute`]:
//! path, scopes, tier, PII handling, breaker, methods), tiers, orgs and keys in stored form (prefix and
//! HMAC hash). Its types have no field for an upstream address, a credential or a key's
//! plaintext, and unknown fields are refused, so a control plane cannot send one even by
//! mistake.
//!
//! [`AgentLocal`] is the bank's own file: its listeners, its TLS, the key pepper and master
//! key sources, its encrypted upstream credentials and the upstream address of every route it
//! serves. [`merge`] joins the two into the configuration the proxy runs; a route the bank has
//! not given an upstream makes the whole configuration refused (and reported), so the agent
//! never guesses where a bank's traffic goes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crd::duration::KubeDuration;
pub use crate::crd::gateway::ConnectorRoute;
use crate::crd::gateway::TierSpec;
use crate::proxy::config::{
    CredentialEntry, InvalidConfig, KeyEntry, OrgEntry, Problem, ProxyConfig, SecretSources,
    TlsConfig,
};

/// The policy of one agent pool, as the control plane sends it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub tiers: Vec<TierSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_tier: Option<String>,
    /// Upstream timeout of routes that set none (the proxy's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<KubeDuration>,
    #[serde(default)]
    pub orgs: Vec<OrgEntry>,
    /// Keys in stored form: prefix and HMAC hash, never the key.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// The pool's routes (`spec.connectors[].routes` of the gateway).
    #[serde(default)]
    pub routes: Vec<ConnectorRoute>,
}

/// The agent's local file (`apitree agent --config FILE`): what stays in the bank.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentLocal {
    /// Address of the listener for the bank's clients.
    #[serde(default = "crate::proxy::config::default_listen")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "crate::proxy::config::default_admin")]
    pub admin: String,
    /// Where the key pepper (the same as the control plane's, so key hashes match) and the
    /// master keys of the credentials below come from. Paths are relative to this file.
    #[serde(default)]
    pub secrets: SecretSources,
    /// TLS on the client listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The bank's encrypted upstream credentials (`apitree credentials encrypt`).
    #[serde(default)]
    pub credentials: Vec<CredentialEntry>,
    /// Where each route the control plane sends goes.
    #[serde(default)]
    pub upstreams: Vec<LocalUpstream>,
}

/// The bank's upstream for one route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalUpstream {
    /// The route's name, as the control plane sends it.
    pub route: String,
    /// Upstream base URL inside the bank.
    pub upstream: String,
    /// A credential of `credentials` injected into this route's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl AgentLocal {
    /// Reads the local file; paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, InvalidConfig> {
        let (mut local, _): (Self, _) = crate::proxy::config::read_yaml(path)?;
        let base = path.parent().map(PathBuf::from).unwrap_or_default();
        local.rebase(&base);
        Ok(local)
    }

    /// Makes the file paths in it relative to `base` (the directory of the file).
    fn rebase(&mut self, base: &Path) {
        for p in [
            &mut self.secrets.pepper_file,
            &mut self.secrets.master_key_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = base.join(&*p);
        }
        if let Some(tls) = &mut self.tls {
            tls.cert_file = base.join(&tls.cert_file);
            tls.key_file = base.join(&tls.key_file);
        }
    }
}

/// The configuration the agent's proxy runs: the control plane's policy, the bank's listeners,
/// secrets, credentials and upstreams. Fails, naming each route, when the bank has no upstream
/// for a route the control plane sends.
pub fn merge(remote: &AgentConfig, local: &AgentLocal) -> Result<ProxyConfig, Vec<Problem>> {
    let mut cfg = ProxyConfig {
        listen: local.listen.clone(),
        admin: local.admin.clone(),
        secrets: local.secrets.clone(),
        tls: local.tls.clone(),
        credentials: local.credentials.clone(),
        tiers: remote.tiers.clone(),
        default_tier: remote.default_tier.clone(),
        orgs: remote.orgs.clone(),
        keys: remote.keys.clone(),
        ..ProxyConfig::default()
    };
    if let Some(t) = &remote.default_timeout {
        cfg.default_timeout = t.clone();
    }
    let mut problems = Vec::new();
    for (i, r) in remote.routes.iter().enumerate() {
        let Some(up) = local.upstreams.iter().find(|u| u.route == r.name) else {
            problems.push(Problem {
                path: format!("routes[{i}] ({})", r.name),
                message: "the agent's local file has no upstream for this route; add `upstreams: [{route: NAME, upstream: URL}]` there and send the agent SIGHUP".into(),
            });
            continue;
        };
        cfg.routes
            .push(r.to_route(up.upstream.clone(), up.credential.clone()));
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> AgentLocal {
        serde_saphyr::from_str(
            "upstreams:\n  - { route: accounts, upstream: 'http://10.1.2.3:8443/core/', credential: core-token }\n",
        )
        .unwrap()
    }

    #[test]
    fn the_bank_supplies_where_a_route_goes() {
        let remote: AgentConfig = serde_json::from_str(
            r#"{"routes":[{"name":"accounts","pathPrefix":"/accounts/","tier":"gold"}],
                "tiers":[{"name":"gold","perKey":{"burst10s":5,"perMinute":10,"perDay":100},
                          "perOrg":{"burst10s":5,"perMinute":10,"perDay":100}}]}"#,
        )
        .unwrap();
        let cfg = merge(&remote, &local()).unwrap();
        assert_eq!(cfg.routes[0].upstream, "http://10.1.2.3:8443/core/");
        assert_eq!(cfg.routes[0].credential.as_deref(), Some("core-token"));
        assert_eq!(cfg.routes[0].tier.as_deref(), Some("gold"));
        assert!(!cfg.routes[0].log_bodies);
        assert_eq!(cfg.tiers.len(), 1);
    }

    #[test]
    fn a_route_without_a_local_upstream_refuses_the_configuration() {
        let remote: AgentConfig = serde_json::from_str(
            r#"{"routes":[{"name":"accounts","pathPrefix":"/a/"},{"name":"cards","pathPrefix":"/c/"}]}"#,
        )
        .unwrap();
        let problems = merge(&remote, &local()).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].path.contains("cards"), "{problems:?}");
        assert!(problems[0].message.contains("upstreams"));
    }

    /// Whatever names a control plane might use for where traffic goes or a secret, the
    /// bundle has no field to carry it.
    #[test]
    fn the_control_plane_cannot_send_an_upstream_or_a_secret() {
        for field in [
            r#""upstream":"http://evil/""#,
            r#""credential":"x""#,
            r#""logBodies":true"#,
            r#""probe":{"path":"/"}"#,
        ] {
            let route = format!(r#"{{"routes":[{{"name":"a","pathPrefix":"/a/",{field}}}]}}"#);
            assert!(
                serde_json::from_str::<AgentConfig>(&route).is_err(),
                "{field} accepted in a route"
            );
        }
        for field in [
            r#""credentials":[]"#,
            r#""secrets":{}"#,
            r#""listen":"0.0.0.0:1""#,
            r#""tls":null"#,
            r#""upstreams":[]"#,
        ] {
            let top = format!("{{{field}}}");
            assert!(
                serde_json::from_str::<AgentConfig>(&top).is_err(),
                "{field} accepted at the top"
            );
        }
    }
}
