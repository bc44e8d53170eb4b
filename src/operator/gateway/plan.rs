//! What a gateway should run, computed without I/O: the rendered proxy configuration of a spec
//! and the revision that names it.

use sha2::{Digest, Sha256};

use std::path::Path;

use std::collections::BTreeMap;

use crate::agent::bundle::{merge, AgentConfig, AgentLocal, LocalUpstream};
use crate::crd::gateway::{ApiGatewaySpec, MinTlsVersion};
use crate::entities::vault::MasterKeys;
use crate::platform::TLS_DIR;
use crate::proxy::config::{ProxyConfig, TlsConfig, TlsVersion};

/// The proxy configuration a spec asks for: the spec's routes, tiers and defaults over `base`
/// (orgs, keys, credentials and secret sources, which live outside the resource).
pub fn render(spec: &ApiGatewaySpec, base: &ProxyConfig) -> ProxyConfig {
    let mut cfg = base.clone();
    cfg.routes = spec.proxy.routes.clone();
    // Probes are the operator's (health sweep): not the proxy's config, not the revision.
    for r in &mut cfg.routes {
        r.probe = None;
    }
    cfg.tiers = spec.proxy.tiers.clone();
    cfg.default_tier = spec.proxy.default_tier.clone();
    cfg.default_timeout = spec.proxy.default_timeout.clone();
    cfg.tls = spec.tls.as_ref().map(|t| TlsConfig {
        cert_file: Path::new(TLS_DIR).join("tls.crt"),
        key_file: Path::new(TLS_DIR).join("tls.key"),
        min_version: match t.min_version {
            MinTlsVersion::V1_2 => TlsVersion::V1_2,
            MinTlsVersion::V1_3 => TlsVersion::V1_3,
        },
        hsts: Default::default(),
        redirect: None,
    });
    // The admin port (`/readyz`, `/metrics`) speaks TLS with the same certificate: the
    // operator's health checks and scrapes reach it over https, the kubelet's probes too.
    cfg.admin_tls = spec.tls.is_some();
    // Replicas listen where the platform puts them.
    cfg.listen = "127.0.0.1:0".into();
    cfg.admin = "127.0.0.1:0".into();
    cfg
}

/// The revision: a short hash of everything that changes the proxy's behaviour — image,
/// rendered config and the versions of the secrets it uses — so a config-only or credential
/// change goes through the gate too. Secret *versions* (resourceVersions, file digests), never
/// secret values, go in.
pub fn revision(image: &str, cfg: &ProxyConfig, secret_versions: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    h.update(image.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(cfg).unwrap_or_default());
    for (name, version) in secret_versions {
        h.update([0]);
        h.update(name.as_bytes());
        h.update([b'=']);
        h.update(version.as_bytes());
    }
    hex::encode(&h.finalize()[..5])
}

/// What each agent pool of the spec receives: its routes (`spec.connectors`) with the rendered
/// configuration's tiers, defaults, orgs and keys (hashes). Never a credential or an upstream.
pub fn agent_configs(
    spec: &ApiGatewaySpec,
    rendered: &ProxyConfig,
) -> BTreeMap<String, AgentConfig> {
    spec.connectors
        .iter()
        .map(|c| {
            let cfg = AgentConfig {
                tiers: rendered.tiers.clone(),
                default_tier: rendered.default_tier.clone(),
                default_timeout: Some(rendered.default_timeout.clone()),
                orgs: rendered.orgs.clone(),
                keys: rendered.keys.clone(),
                routes: c.routes.clone(),
            };
            (c.pool.clone(), cfg)
        })
        .collect()
}

/// The revision of a spec with connectors: [`revision`] with the pools' routes in it too, so
/// a change for agents goes through the gate. Without connectors, exactly [`revision`].
pub fn revision_with_agents(
    image: &str,
    cfg: &ProxyConfig,
    secret_versions: &[(String, String)],
    spec: &ApiGatewaySpec,
) -> String {
    if spec.connectors.is_empty() {
        return revision(image, cfg, secret_versions);
    }
    let mut versions = secret_versions.to_vec();
    let connectors = serde_json::to_vec(&spec.connectors).unwrap_or_default();
    versions.push(("connectors".into(), hex::encode(Sha256::digest(connectors))));
    revision(image, cfg, &versions)
}

/// What a pool's agents would refuse whatever their local file says, checked with a stand-in
/// upstream for every route: duplicate path prefixes, unknown tiers, bad limits.
fn agent_problems(spec: &ApiGatewaySpec, rendered: &ProxyConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (c, (pool, cfg)) in agent_configs(spec, rendered).iter().enumerate() {
        let local = AgentLocal {
            upstreams: cfg
                .routes
                .iter()
                .map(|r| LocalUpstream {
                    route: r.name.clone(),
                    upstream: "http://agent-local.invalid/".into(),
                    credential: None,
                })
                .collect(),
            ..serde_json::from_value(serde_json::json!({})).expect("a local file has defaults")
        };
        let Ok(merged) = merge(cfg, &local) else {
            continue;
        };
        for p in merged.problems(None) {
            if let Some(rest) = p.path.strip_prefix("routes") {
                out.push(format!(
                    "spec.connectors[{c}].routes{rest}: {} (pool {pool})",
                    p.message
                ));
            }
        }
    }
    out
}

/// Everything wrong with a spec, as `path: message` lines: the cross-field rules of the CRD and
/// what the proxy would refuse at start-up.
pub fn problems(
    spec: &ApiGatewaySpec,
    rendered: &ProxyConfig,
    master_keys: Option<&MasterKeys>,
) -> Vec<String> {
    let mut out: Vec<String> = spec
        .problems()
        .into_iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    for p in rendered.problems(master_keys) {
        // With a database the credentials live there, not in the rendered config.
        if spec.database.is_some() && p.path.ends_with(".credential") {
            continue;
        }
        let path = if p.path.starts_with("routes") || p.path.starts_with("tiers") {
            format!("spec.proxy.{}", p.path)
        } else {
            p.path
        };
        out.push(format!("{path}: {}", p.message));
    }
    out.extend(agent_problems(spec, rendered));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ApiGatewaySpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const SPEC: &str = "proxy:\n  routes:\n  - name: weather\n    pathPrefix: /weather/\n    upstream: http://127.0.0.1:9/\n";

    #[test]
    fn any_proxy_change_is_a_new_revision_and_the_same_spec_is_the_same_one() {
        let base = ProxyConfig::default();
        let a = render(&spec(SPEC), &base);
        let r1 = revision("img:1", &a, &[]);
        assert_eq!(r1, revision("img:1", &render(&spec(SPEC), &base), &[]));
        assert_eq!(r1.len(), 10);
        let mut b = spec(SPEC);
        b.proxy.routes[0].upstream = "http://127.0.0.1:10/".into();
        assert_ne!(r1, revision("img:1", &render(&b, &base), &[]));
        assert_ne!(r1, revision("img:2", &a, &[]));
        assert_ne!(r1, revision("img:1", &a, &[("pepper".into(), "v2".into())]));
        // Replica count is not behaviour: scaling is not a rollout.
        let mut c = spec(SPEC);
        c.replicas = 5;
        assert_eq!(r1, revision("img:1", &render(&c, &base), &[]));
        // Nor is how long the database keeps what it holds.
        let mut d = spec(SPEC);
        d.retention.usage = "30d".parse().unwrap();
        assert_eq!(r1, revision("img:1", &render(&d, &base), &[]));
    }

    /// Every retention rule is at least a day (a typo like `1h` would delete today's usage),
    /// and each one is named by its path.
    #[test]
    fn a_retention_shorter_than_a_day_is_a_problem() {
        let base = ProxyConfig::default();
        let ok = spec(&format!(
            "{SPEC}retention:\n  usage: 1d\n  endedKeys: 24h\n"
        ));
        assert!(problems(&ok, &render(&ok, &base), None).is_empty());
        for field in [
            "usage",
            "resolvedIncidents",
            "deliveredNotifications",
            "endedKeys",
            "dataRequests",
        ] {
            let s = spec(&format!("{SPEC}retention:\n  {field}: 23h59m\n"));
            let problems = problems(&s, &render(&s, &base), None);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].starts_with(&format!(
                    "spec.retention.{field}: 23h59m is shorter than a day"
                )),
                "{problems:?}"
            );
        }
    }

    const CONNECTORS: &str =
        "connectors:\n- pool: bank-a\n  routes:\n  - { name: accounts, pathPrefix: /accounts/ }\n";

    /// A change for agents is a new revision; a spec without connectors keeps the revision it
    /// always had (no rollout on upgrade).
    #[test]
    fn connectors_are_part_of_the_revision() {
        let base = ProxyConfig::default();
        let plain = spec(SPEC);
        let r = |s: &ApiGatewaySpec| revision_with_agents("img:1", &render(s, &base), &[], s);
        assert_eq!(r(&plain), revision("img:1", &render(&plain, &base), &[]));
        let with = spec(&format!("{SPEC}{CONNECTORS}"));
        assert_ne!(r(&with), r(&plain));
        let mut moved = with.clone();
        moved.connectors[0].routes[0].path_prefix = "/acct/".into();
        assert_ne!(r(&moved), r(&with));
    }

    /// What a pool receives: its routes and the gateway's tiers, orgs and key hashes; the
    /// gateway's credentials and cluster routes (with their upstreams) are not in it.
    #[test]
    fn a_pool_receives_its_routes_and_the_key_hashes_only() {
        let base: ProxyConfig = serde_saphyr::from_str(
            "orgs: [{ id: acme }]\nkeys: [{ prefix: at_live_aaaaaaaa, hash: abcd, org: acme, scope: live }]\ncredentials: [{ name: c, org: acme, api: weather, kind: system, keyVersion: 1, nonce: n, ciphertext: SEALED }]\n",
        )
        .unwrap();
        let s = spec(&format!("{SPEC}{CONNECTORS}"));
        let configs = agent_configs(&s, &render(&s, &base));
        let cfg = &configs["bank-a"];
        assert_eq!(cfg.routes.len(), 1);
        assert_eq!(cfg.keys.len(), 1);
        let text = serde_json::to_string(cfg).unwrap();
        for absent in ["127.0.0.1:9", "SEALED", "weather", "upstream", "credential"] {
            assert!(!text.contains(absent), "{absent} sent to agents: {text}");
        }
    }

    /// Every rule a pool's routes must keep, each named by its path.
    #[test]
    fn connector_problems_name_their_path() {
        let cases = [
            // A route name of the cluster's.
            ("- pool: a\n  routes: [{ name: weather, pathPrefix: /w/ }]\n", "spec.connectors[0].routes[0].name"),
            // The same route name in two pools.
            ("- pool: a\n  routes: [{ name: x, pathPrefix: /x/ }]\n- pool: b\n  routes: [{ name: x, pathPrefix: /y/ }]\n", "spec.connectors[1].routes[0].name"),
            // A pool listed twice.
            ("- pool: a\n  routes: []\n- pool: a\n  routes: []\n", "spec.connectors[1].pool"),
            // An unknown tier.
            ("- pool: a\n  routes: [{ name: x, pathPrefix: /x/, tier: gold }]\n", "spec.connectors[0].routes[0].tier"),
            // Two routes of one pool on the same prefix (what the agent would refuse).
            ("- pool: a\n  routes: [{ name: x, pathPrefix: /x/ }, { name: y, pathPrefix: /x/ }]\n", "spec.connectors[0].routes[1]"),
        ];
        let base = ProxyConfig::default();
        for (connectors, path) in cases {
            let s = spec(&format!("{SPEC}connectors:\n{connectors}"));
            let found = problems(&s, &render(&s, &base), None);
            assert!(
                found.iter().any(|p| p.starts_with(path)),
                "{path}: {found:?}"
            );
        }
        let ok = spec(&format!("{SPEC}{CONNECTORS}"));
        assert!(problems(&ok, &render(&ok, &base), None).is_empty());
    }

    #[test]
    fn problems_name_the_spec_path() {
        let mut s = spec(SPEC);
        s.proxy.routes[0].tier = Some("gold".into());
        let base = ProxyConfig::default();
        let problems = problems(&s, &render(&s, &base), None);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.proxy.routes[0].tier:")),
            "{problems:?}"
        );
    }
}
