//! What crosses the proxy besides the body: which header fields go on to the upstream.
//!
//! Hop-by-hop fields (RFC 9110 7.6.1) describe one connection and never cross, in either
//! direction. Toward the upstream, [`Forwarding`] is the request-header policy: the buyer's key
//! never leaves the gateway, `Host` names the upstream, the request id and the client's address
//! go along, a route may ask for an uncompressed body and inject its upstream credential. The
//! policy is applied in one of two ways with the same result on the wire: to the request's
//! header map, for requests hyper's client sends ([`Forwarding::apply`]), or while the fast path
//! writes the request head, leaving the map as it came ([`Forwarding::encode`]; no field is
//! hashed, removed or inserted).

use http::header::{ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::state::Injected;
use super::transport::h1::{self, is_hop_by_hop, HOP_BY_HOP};

pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Proto` values: how the client reached the gateway.
pub static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
pub static PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");
static IDENTITY: HeaderValue = HeaderValue::from_static("identity");
const CLOSE: HeaderName = HeaderName::from_static("close");
// The names the policy sets, as statics: [`Forwarding::sets`] lends them out.
static SET_HOST: HeaderName = HOST;
static SET_REQUEST_ID: HeaderName = X_REQUEST_ID;
static SET_FORWARDED_FOR: HeaderName = X_FORWARDED_FOR;
static SET_FORWARDED_PROTO: HeaderName = X_FORWARDED_PROTO;
static SET_ACCEPT_ENCODING: HeaderName = ACCEPT_ENCODING;

/// The names a message's `Connection` fields list beyond the fixed set (`Connection: close,
/// x-trace` makes `x-trace` hop-by-hop for that message). Empty, without allocating, for the
/// usual single `keep-alive` or `close`.
fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    let mut connection = h.get_all(CONNECTION).iter();
    let only_fixed = match (connection.next(), connection.next()) {
        (None, _) => true,
        (Some(v), None) => {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive")
                // `close` names a field too (RFC 9110 7.6.1); one called that is rare.
                || (v.eq_ignore_ascii_case(b"close") && !h.contains_key(CLOSE))
        }
        _ => false,
    };
    if only_fixed {
        return Vec::new();
    }
    h.get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(h1::listed_field)
        .collect()
}

/// Removes the hop-by-hop fields: the fixed set, and any the message names in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in connection_listed(h) {
        h.remove(name);
    }
    // Most messages carry none of the fixed set, or only `connection`: remove just the names
    // present (each removal hashes its name).
    let mut found: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    for (slot, name) in found.iter_mut().zip(h.keys().filter(|n| is_hop_by_hop(n))) {
        *slot = Some(name.clone());
    }
    for name in found.into_iter().flatten() {
        h.remove(name);
    }
}

/// How one request's header fields are rewritten for its upstream.
pub struct Forwarding<'a> {
    /// The upstream's `Host`.
    pub host: &'a HeaderValue,
    pub request_id: &'a HeaderValue,
    /// The client's address, appended to any `X-Forwarded-For` the client sent.
    pub forwarded_for: Option<HeaderValue>,
    /// `http` or `https` ([`PROTO_HTTP`], [`PROTO_HTTPS`]): replaces any `X-Forwarded-Proto`
    /// the client sent, so a plain-HTTP client cannot pass itself off as a TLS one.
    pub proto: &'a HeaderValue,
    /// Ask for an uncompressed body (`Accept-Encoding: identity`): the route scans it for PII.
    pub identity_encoding: bool,
    /// The route's upstream credential (BYOK or system key).
    pub credential: Option<&'a Injected>,
}

/// One field the proxy sets: its name, value, and whether it replaces the request's own lines
/// of that name (else it is appended after them).
type Set<'s> = (&'s HeaderName, &'s HeaderValue, bool);

impl Forwarding<'_> {
    /// The fields set, in the order they are set (a later replacing field wins over an earlier
    /// one of the same name).
    fn sets(&self) -> [Option<Set<'_>>; 6] {
        [
            Some((&SET_HOST, self.host, true)),
            Some((&SET_REQUEST_ID, self.request_id, true)),
            self.forwarded_for
                .as_ref()
                .map(|v| (&SET_FORWARDED_FOR, v, false)),
            Some((&SET_FORWARDED_PROTO, self.proto, true)),
            self.identity_encoding
                .then_some((&SET_ACCEPT_ENCODING, &IDENTITY, true)),
            self.credential.map(|c| (&c.header, &c.value, true)),
        ]
    }

    /// Rewrites `h` for the upstream.
    pub fn apply(&self, h: &mut HeaderMap) {
        strip_hop_by_hop(h);
        h.remove(AUTHORIZATION);
        h.remove(X_API_KEY);
        for (name, value, replace) in self.sets().into_iter().flatten() {
            if replace {
                h.insert(name.clone(), value.clone());
            } else {
                h.append(name.clone(), value.clone());
            }
        }
    }

    /// Writes the request head for the upstream: `h`'s fields as [`Self::apply`] would leave
    /// them, with `h` untouched.
    pub fn encode(&self, method: &Method, target: &str, h: &HeaderMap, out: &mut Vec<u8>) {
        let listed = connection_listed(h);
        let sets = self.sets();
        let replaced = |name: &HeaderName, from: usize| {
            sets[from..]
                .iter()
                .flatten()
                .any(|&(n, _, replace)| replace && n == name)
        };
        let kept = h.iter().filter(|&(name, _)| {
            !(is_hop_by_hop(name)
                || name == AUTHORIZATION
                || name == X_API_KEY
                || replaced(name, 0)
                || listed.contains(name))
        });
        let set = sets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.filter(|&(name, _, _)| !replaced(name, i + 1)))
            .map(|(name, value, _)| (name, value));
        h1::encode_request(method, target, kept.chain(set), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_and_end_to_end_ones_kept() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "expires"),
            ("content-type", "application/json"),
            ("x-custom", "1"),
            ("content-length", "10"),
        ] {
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        h.append(CONNECTION, HeaderValue::from_static("upgrade"));
        // Named in Connection: hop-by-hop for this message, whatever the name.
        h.append(CONNECTION, HeaderValue::from_static("close, X-Trace ,,"));
        h.append(
            HeaderName::from_static("x-trace"),
            HeaderValue::from_static("a"),
        );
        h.append(
            HeaderName::from_static("x-trace"),
            HeaderValue::from_static("b"),
        );
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "content-type", "x-custom"]);
        // Nothing to strip: the map is left as it was.
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
