//! What a gateway should run, computed without I/O: the rendered proxy configuration of a spec
//! and the revision that names it.

use sha2::{Digest, Sha256};

use std::path::Path;

use crate::crd::gateway::{ApiGatewaySpec, MinTlsVersion};
use crate::proxy::config::{ProxyConfig, TlsConfig, TlsVersion};
use crate::proxy::vault::MasterKeys;

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

/// Where a gateway's TLS Secret (`spec.tls.secretName`) is mounted in its proxies: outside
/// the config's directory, whose ConfigMap volume is read-only and cannot hold a mount point.
pub const TLS_DIR: &str = "/var/run/apitree/tls";

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
