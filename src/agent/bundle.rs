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
use crate::entities::{CredentialEntry, KeyEntry, OrgEntry};
use crate::proxy::config::{InvalidConfig, Problem, ProxyConfig, SecretSources, TlsConfig};

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
    /// Where a candidate configuration the control plane's gate is checking listens (plain
    /// HTTP, so a loopback address only): the agent's smoke probes go there, and so may the
    /// partner's synthetic monitors or canary clients on this host, whose traffic the gate's
    /// analysis compares with the serving configuration's. Default: a free loopback port.
    #[serde(default = "default_preview_listen")]
    pub preview_listen: String,
    /// Requests the agent sends through a candidate before it reports it good, beside the one
    /// it always sends (each route's path without a key must get 401).
    #[serde(default)]
    pub smoke: Vec<LocalSmoke>,
}

fn default_preview_listen() -> String {
    "127.0.0.1:0".into()
}

/// One smoke request an agent sends through a candidate configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalSmoke {
    /// Its name in the gate's report (lower-case letters, digits, `-`).
    pub name: String,
    /// Request path, e.g. `/accounts/health`.
    pub path: String,
    #[serde(default = "default_smoke_method")]
    pub method: String,
    /// Status it must get back.
    #[serde(default = "default_smoke_status")]
    pub expect_status: u16,
    /// A file holding the API key it sends (a test key of the partner's; it never leaves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
}

fn default_smoke_method() -> String {
    "GET".into()
}
fn default_smoke_status() -> u16 {
    200
}

/// Smoke probes a report may name (the control plane takes no more).
const MAX_LOCAL_SMOKE: usize = 31;

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
        let problems = local.problems();
        if !problems.is_empty() {
            return Err(InvalidConfig {
                file: path.display().to_string(),
                problems,
            });
        }
        let base = path.parent().map(PathBuf::from).unwrap_or_default();
        local.rebase(&base);
        Ok(local)
    }

    /// What is wrong with the preview listener and the smoke probes.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |path: String, message: String| out.push(Problem { path, message });
        match self.preview_listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => {}
            _ => problem(
                "previewListen".into(),
                format!("{:?} is not a loopback address and port (like 127.0.0.1:8081): a candidate configuration is served over plain HTTP, to this host only", self.preview_listen),
            ),
        }
        if self.smoke.len() > MAX_LOCAL_SMOKE {
            problem(
                "smoke".into(),
                format!("{} probes; at most {MAX_LOCAL_SMOKE}", self.smoke.len()),
            );
        }
        for (i, p) in self.smoke.iter().enumerate() {
            let at = |f: &str| format!("smoke[{i}].{f}");
            let plain_name = !p.name.is_empty()
                && p.name.len() <= 63
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !plain_name {
                problem(at("name"), "use lower-case letters, digits and `-` (at most 63): the name is reported to the control plane".into());
            }
            if self.smoke[..i].iter().any(|q| q.name == p.name)
                || p.name == super::run::NO_KEY_PROBE
            {
                problem(
                    at("name"),
                    format!("{:?} is taken; give each probe its own name", p.name),
                );
            }
            if !p.path.starts_with('/') || p.path.bytes().any(|b| b.is_ascii_control() || b == b' ')
            {
                problem(
                    at("path"),
                    "a path starting with `/`, without spaces or control characters".into(),
                );
            }
            if !matches!(
                p.method.as_str(),
                "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS"
            ) {
                problem(
                    at("method"),
                    "one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS".into(),
                );
            }
            if !(100..=599).contains(&p.expect_status) {
                problem(at("expectStatus"), "an HTTP status from 100 to 599".into());
            }
        }
        out
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
        for p in &mut self.smoke {
            if let Some(f) = &mut p.api_key_file {
                *f = base.join(&*f);
            }
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

    /// Every field of the preview listener and the smoke probes that can be wrong is refused
    /// at its path, and a good file passes.
    #[test]
    fn the_preview_listener_and_smoke_probes_are_checked() {
        let good: AgentLocal = serde_saphyr::from_str(
            "previewListen: '[::1]:8081'\nsmoke:\n  - { name: balance, path: /accounts/ping, apiKeyFile: k }\n",
        )
        .unwrap();
        assert_eq!(good.problems(), vec![]);
        assert_eq!(good.smoke[0].expect_status, 200);
        for (yaml, path) in [
            ("previewListen: 0.0.0.0:8081", "previewListen"),
            ("previewListen: 10.0.0.1:8081", "previewListen"),
            ("previewListen: localhost:8081", "previewListen"),
            ("smoke: [{name: Bad_Name, path: /a}]", "smoke[0].name"),
            ("smoke: [{name: '', path: /a}]", "smoke[0].name"),
            (
                "smoke: [{name: no-key-is-refused, path: /a}]",
                "smoke[0].name",
            ),
            (
                "smoke: [{name: a, path: /a}, {name: a, path: /b}]",
                "smoke[1].name",
            ),
            ("smoke: [{name: a, path: a}]", "smoke[0].path"),
            ("smoke: [{name: a, path: '/a b'}]", "smoke[0].path"),
            (
                "smoke: [{name: a, path: /a, method: TRACE}]",
                "smoke[0].method",
            ),
            (
                "smoke: [{name: a, path: /a, expectStatus: 600}]",
                "smoke[0].expectStatus",
            ),
        ] {
            let local: AgentLocal = serde_saphyr::from_str(yaml).unwrap();
            let problems = local.problems();
            assert!(
                problems.iter().any(|p| p.path == path),
                "{yaml}: {problems:?}"
            );
        }
        let many = format!(
            "smoke: [{}]",
            (0..32)
                .map(|i| format!("{{name: p{i}, path: /}}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let local: AgentLocal = serde_saphyr::from_str(&many).unwrap();
        assert!(local.problems().iter().any(|p| p.path == "smoke"));
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
