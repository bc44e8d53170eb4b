//! Where sellers' upstreams may point. An API registered in the console names its upstream
//! URL; left alone, a seller could name the gateway's own admin port, the cloud's metadata
//! service or any service on the cluster network, and the gateway would call it with buyers'
//! requests (server-side request forgery). An [`EgressPolicy`] refuses such addresses twice:
//! when the URL is saved (its host resolved and every address checked) and whenever the
//! gateway opens a connection for a seller's route (the addresses resolved at that moment, so
//! a name that later resolves elsewhere, DNS rebinding, is caught too). Routes from the
//! gateway's own file or `ApiGateway` resource are the SRE's and are not restricted.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Address ranges no seller upstream may reach unless allowed: loopback, unspecified,
/// link-local (the cloud metadata services live there), private and unique-local networks,
/// carrier-grade NAT, IETF protocol assignments, documentation and benchmarking ranges,
/// multicast and broadcast, and the IPv6 forms that carry an IPv4 address a gateway's network
/// may translate (IPv4-compatible, IPv4-translated, NAT64, 6to4, Teredo).
pub const DENIED: [&str; 28] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2001:2::/48",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    "::1/128",
];

/// Host names resolved at once under one policy. Each lookup holds a thread of the blocking
/// pool until the resolver answers; sellers' names that resolve slowly wait for one another
/// here instead of taking the threads other lookups (the gateway's own routes) need.
pub const LOOKUPS: usize = 32;

/// The ranges sellers' upstreams may not reach, less the CIDRs an operator allows.
#[derive(Debug)]
pub struct EgressPolicy {
    denied: Vec<IpNet>,
    allowed: Vec<IpNet>,
    lookups: tokio::sync::Semaphore,
}

/// An upstream the policy refuses, or whose host does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("upstream host {host} resolves to {addr}, an address sellers' upstreams may not reach (loopback, link-local, private or reserved); use a public address, or ask the operator to allow the network (--upstream-allow)")]
    Denied { host: String, addr: IpAddr },
    #[error("upstream host {host} does not resolve: {reason}")]
    Unresolved { host: String, reason: String },
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self::allowing(Vec::new())
    }
}

impl EgressPolicy {
    /// The default ranges denied, except inside `allowed`.
    pub fn allowing(allowed: Vec<IpNet>) -> Self {
        EgressPolicy {
            denied: DENIED
                .iter()
                .map(|n| n.parse().expect("a valid CIDR"))
                .collect(),
            allowed,
            lookups: tokio::sync::Semaphore::new(LOOKUPS),
        }
    }

    /// Whether `addr` lies in a network the operator allowed (not merely outside the denied
    /// ones).
    pub fn allowed(&self, addr: IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&addr))
    }

    /// Whether a seller's upstream may be reached at `addr`. An IPv4 address written as IPv6
    /// (`::ffff:a.b.c.d`, or NAT64's `64:ff9b::a.b.c.d`, denied as a whole unless allowed) is
    /// judged as the IPv4 address it stands for.
    pub fn permits(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.allowed.iter().any(|n| n.contains(&addr))
            || !self.denied.iter().any(|n| n.contains(&addr))
    }

    /// The addresses of `host:port` this policy permits: all of them, or an error naming the
    /// first refused one. Any refused address refuses the host: a name that resolves to a
    /// public and a private address would otherwise reach the private one on some connects.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let _turn = self
                    .lookups
                    .acquire()
                    .await
                    .map_err(|_| EgressError::Unresolved {
                        host: host.to_string(),
                        reason: "shutting down".into(),
                    })?;
                tokio::net::lookup_host((bare, port))
                    .await
                    .map_err(|e| EgressError::Unresolved {
                        host: host.to_string(),
                        reason: e.to_string(),
                    })?
                    .collect()
            }
        };
        if addrs.is_empty() {
            return Err(EgressError::Unresolved {
                host: host.to_string(),
                reason: "no addresses".into(),
            });
        }
        if let Some(a) = addrs.iter().find(|a| !self.permits(a.ip())) {
            return Err(EgressError::Denied {
                host: host.to_string(),
                addr: a.ip(),
            });
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Every denied range, at its first and last address and just outside, in both forms an
    /// IPv4 address can take.
    #[test]
    fn each_denied_range_is_refused_to_its_edges_and_nothing_beside_it() {
        let p = EgressPolicy::default();
        for cidr in DENIED {
            let net: IpNet = cidr.parse().unwrap();
            for inside in [net.network(), net.broadcast()] {
                assert!(!p.permits(inside), "{inside} in {cidr}");
                if let IpAddr::V4(v4) = inside {
                    assert!(
                        !p.permits(IpAddr::V6(v4.to_ipv6_mapped())),
                        "mapped {inside}"
                    );
                }
            }
        }
        for public in [
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.permits(ip(public)), "{public}");
        }
        // The metadata services by name of address.
        for metadata in [
            "169.254.169.254",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:0:127.0.0.1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::",
            "2001::",
        ] {
            assert!(!p.permits(ip(metadata)), "{metadata}");
        }
    }

    #[test]
    fn an_allowed_network_opens_only_itself() {
        let p = EgressPolicy::allowing(vec!["10.20.0.0/16".parse().unwrap()]);
        assert!(p.permits(ip("10.20.3.4")));
        assert!(!p.permits(ip("10.21.3.4")));
        assert!(!p.permits(ip("127.0.0.1")));
    }

    #[tokio::test]
    async fn a_host_is_refused_when_any_of_its_addresses_is() {
        let p = EgressPolicy::default();
        let e = p.resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(e, EgressError::Denied { .. }), "{e}");
        assert!(e.to_string().contains("--upstream-allow"), "{e}");
        assert!(matches!(
            p.resolve("[::1]", 80).await,
            Err(EgressError::Denied { .. })
        ));
        assert_eq!(
            p.resolve("93.184.215.14", 8080).await.unwrap(),
            vec!["93.184.215.14:8080".parse().unwrap()]
        );
        assert!(matches!(
            p.resolve("no-such-host.invalid", 80).await,
            Err(EgressError::Unresolved { .. })
        ));
        let open = EgressPolicy::allowing(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(open.resolve("127.0.0.1", 80).await.is_ok());
    }
}
