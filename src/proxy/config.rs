//! The proxy's declarative configuration (DB-less mode) and its validation.
//!
//! Validation collects every problem with its YAML path before anything starts, so a bad file
//! is fixed in one round instead of one error per restart. Routes, tiers and breaker settings use
//! the same types as the `ApiGateway` resource, so what the operator renders is what runs.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::crd::duration::KubeDuration;
use crate::crd::gateway::{KeyScope, RouteSpec, TierSpec};
use crate::entities::keys::KeyHash;
use crate::entities::vault::{MasterKeys, Sealed};
use crate::entities::{CredentialEntry, CredentialKind, KeyEntry, OrgEntry};

/// The YAML file `apitree proxy --config FILE` reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the public listener.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Where secrets come from. Never the secrets themselves.
    #[serde(default)]
    pub secrets: SecretSources,
    /// Rate-limit tiers.
    #[serde(default)]
    pub tiers: Vec<TierSpec>,
    /// Tier of keys that name none.
    #[serde(default)]
    pub default_tier: Option<String>,
    /// Upstream timeout of routes that set none.
    #[serde(default = "default_timeout")]
    pub default_timeout: KubeDuration,
    /// Orgs (tenants).
    #[serde(default)]
    pub orgs: Vec<OrgEntry>,
    /// API keys in stored form (prefix and HMAC hash; `apitree keys hash KEY` prints one).
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// Encrypted upstream credentials (`apitree credentials encrypt` prints one).
    #[serde(default)]
    pub credentials: Vec<CredentialEntry>,
    /// Routes, matched by longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// How long shutdown waits for in-flight requests.
    #[serde(default = "default_drain")]
    pub shutdown_grace: KubeDuration,
    /// How long a client has to send a whole request head: the first one from the connection's
    /// start, a later one from its first byte.
    #[serde(default = "default_header_read")]
    pub header_read_timeout: KubeDuration,
    /// How long a kept-alive client connection may sit idle between requests before it is
    /// closed.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_timeout: KubeDuration,
    /// How long a client's request body may pause between two pieces before the request is
    /// answered 408 (nginx's `client_body_timeout`). Separate from a route's upstream timeout.
    #[serde(default = "default_body_read")]
    pub body_read_timeout: KubeDuration,
    /// How long a response may wait for the client to take more of it (nginx's
    /// `send_timeout`): a client that stops reading, or an HTTP/2 client that opens no flow
    /// control window, has its connection closed, so it cannot hold upstream connections.
    #[serde(default = "default_send")]
    pub send_timeout: KubeDuration,
    /// Serve the admin port (`/metrics`, `/readyz`, `/healthz`) over TLS too, with the
    /// listener's certificate (HTTP/1.1, HSTS); needs `tls`.
    #[serde(default)]
    pub admin_tls: bool,
    /// Serve plain bodiless requests on the gateway's own HTTP/1.1 loop (the fast path, on by
    /// default); `false` serves every client connection through hyper's server only.
    #[serde(default = "default_true")]
    pub client_fast_path: bool,
    /// Accepted connections waiting for each worker thread; beyond it new connections are
    /// answered 503 with `Retry-After` and closed (`apitree_proxy_connections_shed_total`).
    #[serde(default = "default_accept_queue")]
    pub accept_queue: usize,
    /// Whether each worker thread is bound to a CPU of its own (`auto`, the default) or placed
    /// by the kernel (`off`). See [`CpuAffinity`].
    #[serde(default)]
    pub worker_cpu_affinity: CpuAffinity,
    /// TLS on the public listener. Absent: plain HTTP (put the gateway behind something that
    /// terminates TLS).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// Where the proxy's worker threads run (`workerCpuAffinity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuAffinity {
    /// When there are exactly as many workers as CPUs the process may run on (its affinity
    /// mask; with the default worker count: a whole machine or VM, a container without a CPU
    /// limit, a pod with exclusive CPUs), worker i is bound to the i-th of those CPUs, as
    /// nginx's `worker_cpu_affinity auto` does for one worker per CPU; otherwise (fewer
    /// workers than CPUs, as under a CPU limit on a larger node) nothing is bound. Left to the
    /// kernel, two workers can end up taking turns on one core while the other runs something
    /// else, and every connection of the waiting worker waits out the other's time slice.
    #[default]
    Auto,
    /// The kernel places the workers (they may share a core and move between cores): for
    /// machines where a busy neighbour may take a core, which a bound worker cannot leave.
    Off,
}

/// The public listener's TLS: a certificate chain and its key, as PEM files (relative to the
/// config file), reloaded when they change and on SIGHUP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM): cert-manager's and Kubernetes' `tls.crt`.
    pub cert_file: PathBuf,
    /// The private key (PEM; PKCS#8, PKCS#1 or SEC1): `tls.key`.
    pub key_file: PathBuf,
    /// The oldest TLS version clients may use: "1.3" (the default) or "1.2" for old clients.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// The `Strict-Transport-Security` header every response over TLS carries.
    #[serde(default)]
    pub hsts: HstsConfig,
    /// A plain-HTTP listener that answers every request 308 to https (nothing is served on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectConfig>,
}

/// `tls.redirect`: where plain HTTP is answered with a redirect to https.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectConfig {
    /// Address of the plain-HTTP listener, like 0.0.0.0:8080.
    pub listen: String,
    /// The https port clients are sent to (default 443, left out of the URL): the port the TLS
    /// listener is reached on from outside, which behind a Service may differ from `listen`'s.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
}

fn default_https_port() -> u16 {
    443
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[default]
    #[serde(rename = "1.3")]
    V1_3,
}

/// `Strict-Transport-Security`: browsers that saw it use https only for `maxAgeSeconds`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HstsConfig {
    /// `max-age`, in seconds (default one year). 0 tells browsers to forget the policy.
    #[serde(default = "default_hsts_max_age")]
    pub max_age_seconds: u64,
    /// `includeSubDomains` (default true).
    #[serde(default = "default_true")]
    pub include_sub_domains: bool,
    /// `preload` (default false): only once the domain is meant for browsers' preload lists.
    #[serde(default)]
    pub preload: bool,
}

impl Default for HstsConfig {
    fn default() -> Self {
        Self {
            max_age_seconds: default_hsts_max_age(),
            include_sub_domains: true,
            preload: false,
        }
    }
}

impl HstsConfig {
    /// The header's value.
    pub fn header_value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age_seconds);
        if self.include_sub_domains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

fn default_hsts_max_age() -> u64 {
    31_536_000
}

/// Unknown fields in a config file's `routes` and `tiers`, against the ApiGateway CRD schema.
fn unknown_route_fields(doc: &serde_json::Value) -> Vec<Problem> {
    use kube::CustomResourceExt;
    let schema = crate::crd::validate::schema_of(&crate::crd::ApiGateway::crd());
    let proxy = &schema["properties"]["spec"]["properties"]["proxy"]["properties"];
    let mut out = Vec::new();
    for list in ["routes", "tiers"] {
        let items = &proxy[list]["items"];
        for (i, item) in doc[list].as_array().into_iter().flatten().enumerate() {
            for found in crate::crd::validate::unknown_fields_in(items, item) {
                out.push(Problem {
                    path: format!("{list}[{i}]{}", found.trim_end_matches(": unknown field")),
                    message: "unknown field; check its spelling against examples/proxy.yaml and docs/configuration.md"
                        .into(),
                });
            }
        }
    }
    out
}

/// The default `bodyReadTimeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for ProxyConfig {
    /// Nothing configured: every field at its documented default.
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin: default_admin(),
            secrets: SecretSources::default(),
            tiers: Vec::new(),
            default_tier: None,
            default_timeout: default_timeout(),
            orgs: Vec::new(),
            keys: Vec::new(),
            credentials: Vec::new(),
            routes: Vec::new(),
            shutdown_grace: default_drain(),
            header_read_timeout: default_header_read(),
            keep_alive_timeout: default_keep_alive(),
            body_read_timeout: default_body_read(),
            send_timeout: default_send(),
            admin_tls: false,
            client_fast_path: true,
            accept_queue: default_accept_queue(),
            worker_cpu_affinity: CpuAffinity::default(),
            tls: None,
        }
    }
}

fn default_body_read() -> KubeDuration {
    KubeDuration::from_millis(DEFAULT_BODY_READ_TIMEOUT.as_millis() as u64)
}
fn default_true() -> bool {
    true
}
fn default_accept_queue() -> usize {
    1024
}

pub(crate) fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
pub(crate) fn default_admin() -> String {
    "127.0.0.1:9090".into()
}
fn default_timeout() -> KubeDuration {
    KubeDuration::from_secs(30)
}
fn default_drain() -> KubeDuration {
    KubeDuration::from_secs(30)
}
fn default_header_read() -> KubeDuration {
    KubeDuration::from_secs(30)
}
/// nginx's `send_timeout`.
fn default_send() -> KubeDuration {
    KubeDuration::from_secs(60)
}
/// nginx's `keepalive_timeout`.
fn default_keep_alive() -> KubeDuration {
    KubeDuration::from_secs(75)
}

/// Files holding secrets, relative to the config file. Environment variables win over them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSources {
    /// File with the key-hashing pepper (≥ 32 bytes). Env: `APITREE_KEY_PEPPER`.
    pub pepper_file: Option<PathBuf>,
    /// File of `version:base64` master keys. Env: `APITREE_MASTER_KEY` + `APITREE_MASTER_KEY_VERSION`.
    pub master_key_file: Option<PathBuf>,
}

/// The origin of an upstream URL as the gateway dials it: scheme, host (lower case) and port
/// (the scheme's default when none is written). Two URLs with the same origin reach the same
/// server; a BYOK credential goes only to the origin it was written for.
pub fn upstream_origin(upstream: &str) -> Result<Origin, String> {
    let uri = upstream_uri(upstream)?;
    let https = uri
        .scheme_str()
        .unwrap_or_default()
        .eq_ignore_ascii_case("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    Ok(Origin { https, host, port })
}

/// Where an upstream URL's calls go: see [`upstream_origin`]. Shown as `https://host` (the
/// port only when it is not the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.host)?;
        if self.port != if self.https { 443 } else { 80 } {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// An upstream URL as the gateway reads it: `http` or `https`, a host, no user name or
/// password, printable ASCII only. The console saves only what passes this (its own URL
/// parser is more lenient than the gateway's).
pub fn upstream_uri(upstream: &str) -> Result<http::Uri, String> {
    let bad = || format!("{upstream:?} is not an http(s) URL like http://10.0.0.5:8080/");
    if !upstream.bytes().all(|b| b.is_ascii_graphic()) || upstream.contains('\\') {
        return Err(bad());
    }
    let uri: http::Uri = upstream.parse().map_err(|_| bad())?;
    match uri.authority() {
        Some(a) if matches!(uri.scheme_str(), Some("http" | "https")) && !a.host().is_empty() => {
            if a.as_str().contains('@') {
                return Err(format!(
                    "{upstream:?} carries a user name or password; store credentials as credentials"
                ));
            }
            // The port as written, digit by digit: the URI parser drops one it cannot read
            // (`:99999`, `:+80`) and the gateway would dial the scheme's default instead.
            if let Some(port) = a.as_str()[a.host().len()..].strip_prefix(':') {
                let ok = (1..=5).contains(&port.len())
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && port.parse::<u16>().is_ok_and(|p| p != 0);
                if !ok {
                    return Err(format!(
                        "{upstream:?} has port {port:?}; write a port from 1 to 65535, or none for the scheme's default"
                    ));
                }
            }
            if uri.query().is_some() {
                return Err(format!(
                    "{upstream:?} has a query; an upstream URL is a base (scheme, host, port, path): the caller's query is forwarded"
                ));
            }
            // The URI parser drops a fragment; one would be saved and never sent.
            if upstream.contains('#') {
                return Err(format!(
                    "{upstream:?} has a fragment ('#'); an upstream URL is a base (scheme, host, port, path)"
                ));
            }
            Ok(uri)
        }
        _ => Err(bad()),
    }
}

/// Does `path` fall under a route with `prefix`? `/demo` matches `/demo` and `/demo/x`, not
/// `/demox`; `/demo/` matches everything after it.
#[inline]
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// Whether one request path could match both prefixes (by [`prefix_matches`]): exactly when
/// one prefix, as a path, matches the other's route. The console's registration check
/// (`console_prefix_overlaps` in the migrations) is this rule in SQL.
pub fn prefixes_overlap(a: &str, b: &str) -> bool {
    prefix_matches(a, b) || prefix_matches(b, a)
}

/// Headers a stored credential may set: authentication headers only, never one that frames
/// the request (content-length, transfer-encoding), routes it (host) or that the gateway
/// vouches for (x-forwarded-*, x-request-id).
pub const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "proxy-authorization",
];

/// What is wrong with a credential's header, if anything: it may set an authentication header
/// only ([`CREDENTIAL_HEADERS`]). The one rule at save (console, CLI) and at load.
pub fn credential_header_problem(header: &str) -> Option<String> {
    (!CREDENTIAL_HEADERS.contains(&header.to_ascii_lowercase().as_str())).then(|| {
        format!(
            "{header:?} is not an authentication header; use one of {}",
            CREDENTIAL_HEADERS.join(", ")
        )
    })
}

/// What is wrong with a credential's value prefix, if anything: it goes into a header as
/// written, so visible ASCII, spaces and tabs, and not starting with a space or tab (a parser
/// drops those). The one rule at save (console, CLI, database) and at load.
pub fn value_prefix_problem(prefix: &str) -> Option<&'static str> {
    if !header_text(prefix) {
        Some("must be visible ASCII characters and spaces: it goes into a header as written")
    } else if prefix.starts_with([' ', '\t']) {
        Some("must not start with a space or tab: the upstream would drop it")
    } else {
        None
    }
}

/// What is wrong with a credential's secret sent after `prefix`, if anything: there is one,
/// it is visible ASCII, spaces and tabs, and the value does not end (or, without a prefix,
/// start) with a space or tab, which a parser would drop: the upstream would read another
/// credential, or none.
pub fn secret_problem(prefix: &str, secret: &str) -> Option<&'static str> {
    if secret.is_empty() {
        Some("is empty: the call would go upstream without a credential")
    } else if !header_text(secret) {
        Some("must be visible ASCII characters and spaces: it goes into a header as written")
    } else if secret.ends_with([' ', '\t'])
        || (prefix.is_empty() && secret.starts_with([' ', '\t']))
    {
        Some("must not start or end with a space or tab: the upstream would drop it")
    } else {
        None
    }
}

/// Visible ASCII, spaces and tabs: stricter than `HeaderValue`, which also takes bytes above
/// 0x7F (an upstream reads those as it likes).
fn header_text(text: &str) -> bool {
    text.bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// One validation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A config that cannot run, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{} has {} problem(s):\n{}", .file, .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct InvalidConfig {
    pub file: String,
    pub problems: Vec<Problem>,
}

/// The lists of a config file whose entries a parse error can be pinned to, with where each
/// entry starts.
#[derive(Deserialize)]
struct Outline {
    #[serde(default)]
    tiers: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    orgs: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    keys: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    credentials: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    #[serde(default)]
    routes: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
}

/// Every parse problem of a file that does not parse, not only the first: the parser stops at
/// one, so the entry (a route, a key, …) holding it is blanked out line for line (every other
/// line keeps its number) and the file parsed again, until it parses or a problem lies outside
/// any entry. An entry that shares a line with another (a one-line `[{…}, {…}]`) cannot be cut
/// out alone: the search stops there, having named the first problem.
/// A YAML file read and parsed, with its text; a file that cannot be read or parsed is an
/// [`InvalidConfig`] whose problems say where.
pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, String), InvalidConfig> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| InvalidConfig {
        file: file.clone(),
        problems: vec![Problem {
            path: "(file)".into(),
            message: format!("cannot read it: {e}"),
        }],
    })?;
    match serde_saphyr::from_str(&text) {
        Ok(v) => Ok((v, text)),
        Err(e) => Err(InvalidConfig {
            file,
            problems: parse_problems(&text, &e),
        }),
    }
}

fn parse_problems(text: &str, first: &serde_saphyr::Error) -> Vec<Problem> {
    const MAX: usize = 100;
    let line_of = |e: &serde_saphyr::Error| e.location().map(|l| l.line() as usize);
    let entries: Vec<(String, usize)> = match serde_saphyr::from_str::<Outline>(text) {
        Ok(o) => [
            ("tiers", o.tiers),
            ("orgs", o.orgs),
            ("keys", o.keys),
            ("credentials", o.credentials),
            ("routes", o.routes),
        ]
        .into_iter()
        .flat_map(|(list, items)| {
            items
                .into_iter()
                .enumerate()
                .map(move |(i, s)| (format!("{list}[{i}]"), s.referenced.line() as usize))
        })
        .collect(),
        Err(_) => Vec::new(),
    };
    let mut lines: Vec<&str> = text.lines().collect();
    // Where an entry ends: the next entry's first line, or the next line at the left margin
    // (the next top-level key), or the end of the file.
    let end_of = |start: usize, lines: &[&str]| -> usize {
        let next_entry = entries.iter().map(|(_, l)| *l).filter(|l| *l > start).min();
        let next_key = (start..lines.len())
            .find(|i| {
                let l = lines[*i];
                !l.is_empty() && !l.starts_with([' ', '\t', '#', '-'])
            })
            .map(|i| i + 1);
        [next_entry, next_key]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(lines.len() + 1)
    };
    let mut problems = Vec::new();
    let mut later: Option<serde_saphyr::Error> = None;
    let mut cut: Vec<String> = Vec::new();
    let path_of = |entry: Option<&(String, usize)>| {
        entry.map_or_else(|| "(yaml)".to_string(), |(p, _)| p.clone())
    };
    for round in 0..MAX {
        let error = later.as_ref().unwrap_or(first);
        let line = line_of(error);
        let entry = line.and_then(|line| {
            entries
                .iter()
                .filter(|(_, start)| *start <= line && line < end_of(*start, &lines))
                .max_by_key(|(_, start)| *start)
        });
        let shared_line =
            entry.is_some_and(|(_, start)| entries.iter().filter(|(_, l)| l == start).count() > 1);
        // The first problem is shown with the lines around it; later ones are read from a
        // file with entries blanked out, so only their line is named.
        let message = if round == 0 {
            error.to_string()
        } else {
            error.without_snippet().to_string()
        };
        problems.push(Problem {
            path: path_of(entry),
            message,
        });
        let Some((_, start)) = entry.filter(|_| !shared_line) else {
            break;
        };
        let (path, start, end) = (path_of(entry), *start, end_of(*start, &lines));
        for l in &mut lines[start - 1..end - 1] {
            *l = "";
        }
        // A list whose every entry is cut out would read as `null`, not as empty.
        let list = &path[..path.find('[').unwrap_or(path.len())];
        cut.push(path.clone());
        let all_cut = entries
            .iter()
            .filter(|(p, _)| p.starts_with(&format!("{list}[")))
            .all(|(p, _)| cut.contains(p));
        if all_cut {
            if let Some(key) = lines
                .iter_mut()
                .find(|l| l.starts_with(&format!("{list}:")))
            {
                *key = empty_list(list);
            }
        }
        match serde_saphyr::from_str::<ProxyConfig>(&lines.join("\n")) {
            Ok(_) => break,
            Err(e) => later = Some(e),
        }
    }
    problems
}

/// The line that stands for a list once all its entries are cut out.
fn empty_list(list: &str) -> &'static str {
    match list {
        "tiers" => "tiers: []",
        "orgs" => "orgs: []",
        "keys" => "keys: []",
        "credentials" => "credentials: []",
        _ => "routes: []",
    }
}

/// Parses a timestamp into unix milliseconds.
pub fn parse_time_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Whether a config must have routes: a file does (nothing else would serve), a database-mode
/// proxy need not (a fresh install serves 404s until an API is registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    Required,
    MayBeNone,
}

impl ProxyConfig {
    /// Reads and parses a file; YAML errors become a problem with the line.
    pub fn load(path: &Path) -> Result<Self, InvalidConfig> {
        let file = path.display().to_string();
        let (cfg, text): (Self, String) = read_yaml(path)?;
        // Routes and tiers are the ApiGateway's types, which take what the API server has
        // already pruned; a file has no API server, so unknown fields (a typo like `timout:`)
        // are looked for here, against the same schema.
        let unknown = serde_saphyr::from_str::<serde_json::Value>(&text)
            .map(|doc| unknown_route_fields(&doc))
            .unwrap_or_default();
        if unknown.is_empty() {
            Ok(cfg)
        } else {
            Err(InvalidConfig {
                file,
                problems: unknown,
            })
        }
    }

    /// What the running process cannot change without a restart, named as in the file, where
    /// `self` (the config it started with) and `new` differ.
    pub fn restart_only_changes(&self, new: &ProxyConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut differ = |field: &'static str, changed: bool| {
            if changed {
                out.push(field);
            }
        };
        differ("listen", self.listen != new.listen);
        differ("admin", self.admin != new.admin);
        differ(
            "secrets.pepperFile",
            self.secrets.pepper_file != new.secrets.pepper_file,
        );
        differ("shutdownGrace", self.shutdown_grace != new.shutdown_grace);
        differ(
            "headerReadTimeout",
            self.header_read_timeout != new.header_read_timeout,
        );
        differ(
            "keepAliveTimeout",
            self.keep_alive_timeout != new.keep_alive_timeout,
        );
        differ(
            "bodyReadTimeout",
            self.body_read_timeout != new.body_read_timeout,
        );
        differ("sendTimeout", self.send_timeout != new.send_timeout);
        differ(
            "clientFastPath",
            self.client_fast_path != new.client_fast_path,
        );
        differ("acceptQueue", self.accept_queue != new.accept_queue);
        differ(
            "workerCpuAffinity",
            self.worker_cpu_affinity != new.worker_cpu_affinity,
        );
        differ("adminTls", self.admin_tls != new.admin_tls);
        // The certificate and key files are re-read when they change; which files, the
        // version floor and HSTS are fixed at start.
        differ("tls", self.tls != new.tls);
        out
    }

    /// Every problem that would keep this config from running as written. `master_keys` is
    /// used to prove each credential decrypts for its org and API.
    pub fn problems(&self, master_keys: Option<&MasterKeys>) -> Vec<Problem> {
        self.problems_of(master_keys, Routes::Required)
    }

    /// [`ProxyConfig::problems`]; with [`Routes::MayBeNone`] (a database-mode proxy, whose APIs
    /// are registered later) a config without routes is not one.
    pub fn problems_of(&self, master_keys: Option<&MasterKeys>, routes: Routes) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut push = |path: String, message: String| out.push(Problem { path, message });

        for (field, value) in [("listen", &self.listen), ("admin", &self.admin)] {
            if value.parse::<SocketAddr>().is_err() {
                push(
                    field.into(),
                    format!("{value:?} is not an address like 127.0.0.1:8080"),
                );
            }
        }
        if self.admin_tls && self.tls.is_none() {
            push(
                "adminTls".into(),
                "needs tls: the admin port uses the listener's certificate".into(),
            );
        }
        if let Some(r) = self.tls.as_ref().and_then(|t| t.redirect.as_ref()) {
            if r.listen.parse::<SocketAddr>().is_err() {
                push(
                    "tls.redirect.listen".into(),
                    format!("{:?} is not an address like 0.0.0.0:8080", r.listen),
                );
            } else if !r.listen.ends_with(":0")
                && (r.listen == self.listen || r.listen == self.admin)
            {
                push(
                    "tls.redirect.listen".into(),
                    "must differ from listen and admin".into(),
                );
            }
            if r.https_port == 0 {
                push(
                    "tls.redirect.httpsPort".into(),
                    "must be a port from 1 to 65535".into(),
                );
            }
        }
        if let Some(tls) = &self.tls {
            if tls.hsts.preload
                && (tls.hsts.max_age_seconds < 31_536_000 || !tls.hsts.include_sub_domains)
            {
                push(
                    "tls.hsts.preload".into(),
                    "browsers' preload lists require maxAgeSeconds of at least 31536000 and includeSubDomains: true".into(),
                );
            }
        }
        if self.accept_queue == 0 {
            push(
                "acceptQueue".into(),
                "must be at least 1: with no room every connection is refused".into(),
            );
        }
        if self.listen == self.admin && !self.listen.ends_with(":0") {
            push("admin".into(), "must differ from listen".into());
        }
        for (field, value) in [
            ("headerReadTimeout", &self.header_read_timeout),
            ("keepAliveTimeout", &self.keep_alive_timeout),
            ("bodyReadTimeout", &self.body_read_timeout),
            ("sendTimeout", &self.send_timeout),
            ("defaultTimeout", &self.default_timeout),
        ] {
            if value.as_std().is_zero() {
                push(
                    field.into(),
                    "must be longer than 0s: a client needs time to send a request".into(),
                );
            }
        }

        let tiers: HashSet<&str> = self.tiers.iter().map(|t| t.name.as_str()).collect();
        let mut seen = HashSet::new();
        for (i, t) in self.tiers.iter().enumerate() {
            if !seen.insert(t.name.as_str()) {
                push(
                    format!("tiers[{i}].name"),
                    format!("duplicate tier {:?}", t.name),
                );
            }
            for (who, l) in [("perKey", &t.per_key), ("perOrg", &t.per_org)] {
                if l.burst10s == 0 || l.per_minute == 0 || l.per_day == 0 {
                    push(
                        format!("tiers[{i}].{who}"),
                        "limits must be at least 1".into(),
                    );
                } else if !(l.burst10s <= l.per_minute && l.per_minute <= l.per_day) {
                    push(
                        format!("tiers[{i}].{who}"),
                        "limits must not shrink as windows grow: burst10s <= perMinute <= perDay"
                            .into(),
                    );
                }
            }
        }
        if let Some(d) = &self.default_tier {
            if !tiers.contains(d.as_str()) {
                push(
                    "defaultTier".into(),
                    format!("tier {d:?} is not defined in tiers"),
                );
            }
        }

        let orgs: HashSet<&str> = self.orgs.iter().map(|o| o.id.as_str()).collect();
        let mut seen = HashSet::new();
        for (i, o) in self.orgs.iter().enumerate() {
            if o.id.is_empty() {
                push(format!("orgs[{i}].id"), "must not be empty".into());
            } else if !seen.insert(o.id.as_str()) {
                push(format!("orgs[{i}].id"), format!("duplicate org {:?}", o.id));
            }
        }

        if self.routes.is_empty() && routes == Routes::Required {
            push("routes".into(), "at least one route is needed".into());
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = |f: &str| format!("routes[{i}].{f}");
            if !names.insert(r.name.as_str()) {
                push(p("name"), format!("duplicate route {:?}", r.name));
            }
            let normal = super::inbound::normalize(&r.path_prefix);
            if !r.path_prefix.starts_with('/') {
                push(p("pathPrefix"), "must start with /".into());
            } else if !normal.as_ref().is_ok_and(|t| t.path == r.path_prefix) {
                // Requests are matched in normal form: any other spelling would match nothing.
                let hint = match &normal {
                    Ok(t) => format!("; write it as {:?}", t.path),
                    Err(e) => format!(": {e}"),
                };
                push(
                    p("pathPrefix"),
                    format!("{:?} is not a normalised path{hint}", r.path_prefix),
                );
            } else if !prefixes.insert(r.path_prefix.as_str()) {
                push(
                    p("pathPrefix"),
                    format!("{:?} is used by another route", r.path_prefix),
                );
            }
            if r.timeout.as_ref().is_some_and(|t| t.as_std().is_zero()) {
                push(
                    p("timeout"),
                    "must be longer than 0s: every call would time out (504)".into(),
                );
            }
            if let Err(e) = upstream_uri(&r.upstream) {
                push(p("upstream"), e);
            }
            if r.scopes.is_empty() {
                push(p("scopes"), "allow at least one of live, test".into());
            }
            if let Some(t) = &r.tier {
                if !tiers.contains(t.as_str()) {
                    push(p("tier"), format!("tier {t:?} is not defined in tiers"));
                }
            }
            if let Some(c) = &r.credential {
                if !self
                    .credentials
                    .iter()
                    .any(|e| &e.name == c && e.api == r.name)
                {
                    push(
                        p("credential"),
                        format!("no credential named {c:?} is bound to route {:?}", r.name),
                    );
                }
            }
        }

        let mut ids = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let p = |f: &str| format!("keys[{i}].{f}");
            let tag = match k.scope {
                KeyScope::Live => "at_live_",
                KeyScope::Test => "at_test_",
            };
            if !k.prefix.starts_with(tag) {
                push(
                    p("prefix"),
                    format!(
                        "a {} key's prefix starts with {tag}",
                        tag.trim_matches('_').trim_start_matches("at_")
                    ),
                );
            }
            if KeyHash::from_hex(&k.hash).is_none() {
                push(
                    p("hash"),
                    "must be 64 hex characters (HMAC-SHA256); get it from `apitree keys hash KEY`"
                        .into(),
                );
            } else if !hashes.insert(k.hash.to_ascii_lowercase()) {
                push(p("hash"), "the same key is listed twice".into());
            }
            if !ids.insert(k.id.clone().unwrap_or_else(|| k.prefix.clone())) {
                push(p("id"), "duplicate key id".into());
            }
            if !orgs.contains(k.org.as_str()) {
                push(p("org"), format!("org {:?} is not defined in orgs", k.org));
            }
            match &k.tier {
                Some(t) if !tiers.contains(t.as_str()) => {
                    push(p("tier"), format!("tier {t:?} is not defined in tiers"))
                }
                None if self.default_tier.is_none() => {
                    push(p("tier"), "set a tier here or defaultTier".into())
                }
                _ => {}
            }
            for (f, v) in [("expiresAt", &k.expires_at), ("graceUntil", &k.grace_until)] {
                if let Some(v) = v {
                    if parse_time_ms(v).is_none() {
                        push(
                            p(f),
                            format!("{v:?} is not an RFC 3339 time like 2026-12-31T00:00:00Z"),
                        );
                    }
                }
            }
            if k.daily_quota == Some(0) {
                push(
                    p("dailyQuota"),
                    "must be at least 1 (revoke the key to block it)".into(),
                );
            }
        }

        let route_names: HashSet<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
        let mut bound = HashSet::new();
        for (i, c) in self.credentials.iter().enumerate() {
            let p = |f: &str| format!("credentials[{i}].{f}");
            if !orgs.contains(c.org.as_str()) {
                push(p("org"), format!("org {:?} is not defined in orgs", c.org));
            }
            if !route_names.contains(c.api.as_str()) {
                push(
                    p("api"),
                    format!("route {:?} is not defined in routes", c.api),
                );
            }
            // A call carries its org's BYOK credential, else the route's one system
            // credential: two of either would make the choice depend on the file's order.
            let owner = match c.kind {
                CredentialKind::Byok => c.org.as_str(),
                CredentialKind::System => "",
            };
            if !bound.insert((c.name.as_str(), owner, c.api.as_str())) {
                push(
                    p("name"),
                    match c.kind {
                        CredentialKind::Byok => {
                            "this org has another BYOK credential of this name for this route"
                        }
                        CredentialKind::System => {
                            "this route has another system credential of this name"
                        }
                    }
                    .into(),
                );
            }
            if let Some(e) = credential_header_problem(&c.header) {
                push(p("header"), e);
            }
            // The value goes into a request head as written: a byte a header cannot carry (a
            // control character, a line break) would frame the upstream request wrongly.
            if let Some(e) = value_prefix_problem(&c.value_prefix) {
                push(p("valuePrefix"), e.into());
            }
            // A buyer's secret goes only to the server it was written for, never to wherever
            // the seller points the API later.
            if let (Some(bound), Some(route)) = (
                &c.bound_upstream,
                self.routes.iter().find(|r| r.name == c.api),
            ) {
                if c.kind == CredentialKind::System {
                    push(
                        p("boundUpstream"),
                        "only a BYOK credential is bound to an upstream".into(),
                    );
                } else {
                    match (upstream_origin(bound), upstream_origin(&route.upstream)) {
                        (Ok(was), Ok(now)) if was != now => push(
                            p("boundUpstream"),
                            format!(
                                "was written for {was}, and the API now goes to {now}: it is not sent there until its org writes it again"
                            ),
                        ),
                        (Err(e), _) => push(
                            p("boundUpstream"),
                            format!("{e}; write the credential again"),
                        ),
                        _ => {}
                    }
                }
            }
            match (Sealed::from_base64(&c.name, c.key_version, &c.nonce, &c.ciphertext), master_keys) {
                (Err(e), _) => push(p("ciphertext"), e.to_string()),
                (Ok(sealed), Some(keys)) => match keys.decrypt(&c.name, &c.org, &c.api, &sealed) {
                    Err(e) => push(p("ciphertext"), e.to_string()),
                    Ok(secret) => {
                        if let Some(e) = secret_problem(&c.value_prefix, secret.expose()) {
                            push(p("ciphertext"), format!("the decrypted secret {e}; write it again"));
                        }
                    }
                },
                (Ok(_), None) => push(p("keyVersion"), "no master key is loaded to decrypt it; set APITREE_MASTER_KEY or secrets.masterKeyFile".into()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(yaml: &str) -> ProxyConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let cfg = parse(
            r#"
listen: "nonsense"
headerReadTimeout: 0s
sendTimeout: 0s
tls: { certFile: c, keyFile: k, redirect: { listen: "also nonsense", httpsPort: 0 } }
tiers:
  - name: small
    perKey: { burst10s: 50, perMinute: 10, perDay: 100 }
    perOrg: { burst10s: 5, perMinute: 10, perDay: 100 }
orgs: [{ id: acme }]
keys:
  - prefix: at_test_abcdefgh
    hash: "zz"
    org: ghost
    scope: live
routes:
  - name: demo
    pathPrefix: /demo/
    upstream: "ftp://x"
    tier: gold
  - name: demo
    pathPrefix: /demo/
    upstream: http://127.0.0.1:1/
"#,
        );
        let paths: Vec<String> = cfg.problems(None).into_iter().map(|p| p.path).collect();
        for want in [
            "listen",
            "headerReadTimeout",
            "sendTimeout",
            "tls.redirect.listen",
            "tls.redirect.httpsPort",
            "tiers[0].perKey",
            "keys[0].prefix",
            "keys[0].hash",
            "keys[0].org",
            "keys[0].tier",
            "routes[0].upstream",
            "routes[0].tier",
            "routes[1].name",
            "routes[1].pathPrefix",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "missing {want} in {paths:?}"
            );
        }
    }

    /// Which credential a call carries must not depend on the file's order, and a credential
    /// sets an authentication header only: each (first, second) pair is judged as a file
    /// holding both.
    #[test]
    fn credentials_that_would_make_the_choice_ambiguous_or_set_other_headers_are_problems() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = MasterKeys::single(1, &b64.encode([7u8; 32])).unwrap();
        let entry = |name: &str, org: &str, kind: &str, header: &str| {
            let sealed = keys.encrypt(org, "api", "s3cret");
            format!(
                "  - {{ name: {name}, org: {org}, api: api, kind: {kind}, keyVersion: 1, nonce: {}, ciphertext: {}, header: {header:?} }}\n",
                b64.encode(&sealed.nonce),
                b64.encode(&sealed.ciphertext)
            )
        };
        let table = [
            // (first, second, problem on credentials[1])
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "x-api-key"),
                None,
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "a", "system", "authorization"),
                None,
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "a", "byok", "api-key"),
                Some("name"),
            ),
            (
                ("vendor", "a", "system", "authorization"),
                ("vendor", "b", "system", "authorization"),
                Some("name"),
            ),
            (
                ("vendor", "a", "system", "authorization"),
                ("other", "b", "system", "authorization"),
                None,
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "Proxy-Authorization"),
                None,
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "host"),
                Some("header"),
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "content-length"),
                Some("header"),
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "x-forwarded-for"),
                Some("header"),
            ),
            (
                ("vendor", "a", "byok", "authorization"),
                ("vendor", "b", "byok", "x-request-id"),
                Some("header"),
            ),
        ];
        for (first, second, want) in table {
            let yaml = format!(
                "orgs: [{{ id: a }}, {{ id: b }}]\ncredentials:\n{}{}routes:\n  - {{ name: api, pathPrefix: /api/, upstream: \"http://u/\", credential: vendor }}\n",
                entry(first.0, first.1, first.2, first.3),
                entry(second.0, second.1, second.2, second.3),
            );
            let problems: Vec<String> = parse(&yaml)
                .problems(Some(&keys))
                .into_iter()
                .map(|p| p.path)
                .collect();
            let want: Vec<String> = want.iter().map(|f| format!("credentials[1].{f}")).collect();
            assert_eq!(problems, want, "{first:?} then {second:?}");
        }
    }

    /// Every character in a credential's value prefix and in its secret: the validator
    /// refuses exactly what a header cannot carry, and whatever it passes compiles (a
    /// database-mode gateway skips what it refuses instead of failing to load).
    #[test]
    fn a_credential_passes_exactly_when_its_header_value_can_be_sent() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = MasterKeys::single(1, &b64.encode([7u8; 32])).unwrap();
        let chars = (0u32..=0x7F).chain([0x80, 0xA0, 0xE9, 0x2028, 0xAC00, 0x1F600]);
        let mut cases = Vec::new();
        for c in chars.filter_map(char::from_u32) {
            let sendable = c == '\t' || (' '..='~').contains(&c);
            cases.push(("Bearer ".to_string(), format!("s3{c}cret"), sendable));
            cases.push((format!("Bearer{c}"), "s3cret".to_string(), sendable));
        }
        // What a parser would trim, and no secret at all.
        for (prefix, secret, sendable) in [
            ("Bearer ", "", false),
            ("", "", false),
            ("Bearer ", "tok ", false),
            ("Bearer ", "tok\t", false),
            (" Bearer ", "tok", false),
            ("\tBearer ", "tok", false),
            ("", " tok", false),
            ("", "tok", true),
            ("Bearer ", " tok", true),
            ("Bearer\t", "tok", true),
        ] {
            cases.push((prefix.to_string(), secret.to_string(), sendable));
        }
        for (prefix, secret, sendable) in cases {
            {
                let sealed = keys.encrypt("a", "api", &secret);
                let mut cfg = parse("orgs: [{ id: a }]\nroutes:\n  - { name: api, pathPrefix: /api/, upstream: \"http://u/\", credential: vendor }\n");
                cfg.credentials.push(CredentialEntry {
                    name: "vendor".into(),
                    org: "a".into(),
                    api: "api".into(),
                    kind: CredentialKind::System,
                    key_version: 1,
                    nonce: b64.encode(&sealed.nonce),
                    ciphertext: b64.encode(&sealed.ciphertext),
                    header: "authorization".into(),
                    value_prefix: prefix.clone(),
                    bound_upstream: None,
                });
                let problems = cfg.problems(Some(&keys));
                let built = super::super::state::GatewayState::build(&cfg, "t", Some(&keys), None);
                let what = format!("prefix {prefix:?}, secret {secret:?}");
                assert_eq!(problems.is_empty(), sendable, "{what}: {problems:?}");
                assert_eq!(built.is_ok(), sendable, "{what}");
            }
        }
    }

    /// A BYOK credential written for one upstream is sent exactly when the route's compiled
    /// upstream reaches the same server: every pair of spellings below, compared with what
    /// the gateway dials (scheme, host, port), not with the text.
    #[test]
    fn a_byok_credential_is_sent_only_to_the_server_it_was_written_for() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let keys = MasterKeys::single(1, &b64.encode([7u8; 32])).unwrap();
        let urls = [
            "http://u/",
            "http://u",
            "http://u:80/",
            "http://U/other/path",
            "HTTP://u/x/",
            "http://u:8080/",
            "http://u:08080/",
            "https://u/",
            "https://u:443/v1/",
            "https://u:80/",
            "http://v/",
            "http://u.example/",
            "http://10.0.0.5/",
            "http://10.0.0.5:80/",
            "http://[::1]/",
            "http://[::1]:8080/",
            "not a url",
        ];
        let sealed = keys.encrypt("a", "api", "s3cret");
        let config = |upstream: &str, bound: &str| {
            let mut cfg = parse(&format!("orgs: [{{ id: a }}]\nroutes:\n  - {{ name: api, pathPrefix: /api/, upstream: \"{upstream}\", credential: vendor }}\n"));
            cfg.credentials.push(CredentialEntry {
                name: "vendor".into(),
                org: "a".into(),
                api: "api".into(),
                kind: CredentialKind::Byok,
                key_version: 1,
                nonce: b64.encode(&sealed.nonce),
                ciphertext: b64.encode(&sealed.ciphertext),
                header: "authorization".into(),
                value_prefix: "Bearer ".into(),
                bound_upstream: Some(bound.into()),
            });
            cfg
        };
        let dialled = |upstream: &str| {
            let state = super::super::state::GatewayState::build(
                &config(upstream, upstream),
                "t",
                Some(&keys),
                None,
            )
            .ok()?;
            let r = &state.routes[0];
            let https = r.scheme == http::uri::Scheme::HTTPS;
            let port = r
                .authority
                .port_u16()
                .unwrap_or(if https { 443 } else { 80 });
            Some((https, r.authority.host().to_ascii_lowercase(), port))
        };
        let mut sent = 0;
        for now in urls.iter().filter(|u| dialled(u).is_some()) {
            for was in urls {
                let problems = config(now, was).problems(Some(&keys));
                let same = dialled(was).is_some() && dialled(was) == dialled(now);
                let flagged = problems
                    .iter()
                    .any(|p| p.path == "credentials[0].boundUpstream");
                assert_eq!(
                    flagged, !same,
                    "written for {was:?}, route now {now:?}: {problems:?}"
                );
                assert_eq!(problems.len(), usize::from(flagged), "{problems:?}");
                sent += usize::from(same);
            }
        }
        // Spellings of one server do pass (the table is not all mismatches).
        assert!(sent > urls.len(), "{sent}");
        // A system credential is the seller's own: it is never bound.
        let mut cfg = config("http://u/", "http://u/");
        cfg.credentials[0].kind = CredentialKind::System;
        assert!(cfg
            .problems(Some(&keys))
            .iter()
            .any(|p| p.path == "credentials[0].boundUpstream"));
    }

    /// Differential over every prefix and path of up to five characters from `/`, `a`, `b`:
    /// two prefixes overlap exactly when some path matches both.
    #[test]
    fn prefixes_overlap_exactly_when_a_path_matches_both() {
        fn all(max: usize) -> Vec<String> {
            let mut out = vec!["/".to_string()];
            let mut frontier = out.clone();
            for _ in 1..max {
                let next: Vec<String> = frontier
                    .iter()
                    .flat_map(|s| ['/', 'a', 'b'].map(|c| format!("{s}{c}")))
                    .collect();
                out.extend(next.iter().cloned());
                frontier = next;
            }
            out
        }
        let prefixes = all(4);
        let paths = all(6);
        for a in &prefixes {
            for b in &prefixes {
                let witness = paths
                    .iter()
                    .any(|p| prefix_matches(a, p) && prefix_matches(b, p));
                assert_eq!(prefixes_overlap(a, b), witness, "{a} {b}");
            }
        }
    }

    #[test]
    fn upstream_urls_are_what_the_gateway_can_dial() {
        for ok in [
            "http://10.0.0.5:8080/",
            "https://api.example.com/v1/",
            "http://[2001:db8::1]:80/",
        ] {
            assert!(upstream_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://203.0.113.9/a b",
            "http://1.1.1.1\\@127.0.0.1/",
            "http://1.1.1.1/\tx",
            "http://user:pw@example.com/",
            "http://@example.com/",
            "ftp://example.com/",
            "http:///x",
            "example.com",
            "http://exämple.com/",
            "",
            "http://example.com:/",
            "http://example.com:+80/",
            "http://example.com:080/x?",
            "http://example.com/?k=v",
            "http://[::1]:99999/",
            "http://example.com/#frag",
            "http://example.com#@10.0.0.5/",
            "http://example.com/v1/#",
        ] {
            assert!(upstream_uri(bad).is_err(), "{bad:?}");
        }
    }

    /// Every accepted URL is dialled at the port it names, whatever is written after the
    /// colon: the URI parser alone would drop a port it cannot read and dial 80.
    #[test]
    fn an_accepted_upstream_is_dialled_at_the_port_it_names() {
        let spellings = |n: u32| {
            [
                format!("{n}"),
                format!("0{n}"),
                format!("+{n}"),
                format!("{n}0"),
            ]
        };
        for host in ["example.com", "10.0.0.5", "[2001:db8::1]"] {
            for n in (0..=70_000u32)
                .step_by(7)
                .chain([0, 1, 80, 443, 65_535, 65_536, 99_999])
            {
                for port in spellings(n) {
                    let url = format!("http://{host}:{port}/");
                    let want = port
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| port.parse::<u32>().ok())
                        .flatten()
                        .filter(|p| (1..=65_535).contains(p) && port.len() <= 5);
                    match (upstream_uri(&url), want) {
                        (Ok(uri), Some(p)) => {
                            assert_eq!(uri.port_u16().map(u32::from), Some(p), "{url}");
                            assert_eq!(uri.host(), Some(host), "{url}");
                        }
                        (Err(_), None) => {}
                        (got, want) => panic!("{url}: accepted={} expected={want:?}", got.is_ok()),
                    }
                }
            }
        }
    }

    #[test]
    fn client_timeouts_default_to_30s_for_heads_and_75s_idle() {
        let cfg = parse("listen: 127.0.0.1:1\n");
        assert_eq!(cfg.header_read_timeout.as_std(), Duration::from_secs(30));
        assert_eq!(cfg.keep_alive_timeout.as_std(), Duration::from_secs(75));
        let cfg = parse("keepAliveTimeout: 2m\nheaderReadTimeout: 500ms\n");
        assert_eq!(cfg.keep_alive_timeout.as_std(), Duration::from_secs(120));
        assert_eq!(cfg.header_read_timeout.as_std(), Duration::from_millis(500));
        let timeouts = cfg
            .problems(None)
            .into_iter()
            .filter(|p| p.path.ends_with("Timeout"));
        assert_eq!(timeouts.count(), 0);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_saphyr::from_str::<ProxyConfig>("listen: 127.0.0.1:1\nlisten_port: 3\n")
            .unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    /// Routes and tiers are the CRD's types: a typo there is refused by `load` with its path,
    /// nested ones too.
    #[test]
    fn unknown_route_and_tier_fields_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.yaml");
        std::fs::write(
            &file,
            "routes:\n  - { name: a, pathPrefix: /a/, upstream: \"http://u/\", timout: 5s,\n      breaker: { consecutiveFailure: 3 } }\ntiers:\n  - { name: t, perKey: { burst10s: 1, perMinute: 1, perDay: 1, perHour: 1 },\n      perOrg: { burst10s: 1, perMinute: 1, perDay: 1 } }\n",
        )
        .unwrap();
        let err = ProxyConfig::load(&file).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].breaker.consecutiveFailure",
                "routes[0].timout",
                "tiers[0].perKey.perHour"
            ]
        );
        std::fs::write(
            &file,
            "routes:\n  - { name: a, pathPrefix: /a/, upstream: \"http://u/\", timeout: 5s }\n",
        )
        .unwrap();
        assert!(ProxyConfig::load(&file).is_ok());
    }

    /// A file that does not parse names every entry that holds a problem, each once, in file
    /// order, with its line: every subset of five broken entries (block and flow style, three
    /// kinds of fault, in two lists), and a fault outside any list stops the search after
    /// naming itself.
    #[test]
    fn a_file_that_does_not_parse_names_every_broken_entry() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.yaml");
        // (list, good entry, broken entry, what the message names)
        let entries: [(&str, &str, &str, &str); 5] = [
            (
                "tiers",
                "  - { name: t0, perKey: { burst10s: 1, perMinute: 1, perDay: 1 },\n      perOrg: { burst10s: 1, perMinute: 1, perDay: 1 } }\n",
                "  - { name: t0, perKey: { burst10s: x, perMinute: 1, perDay: 1 },\n      perOrg: { burst10s: 1, perMinute: 1, perDay: 1 } }\n",
                "x",
            ),
            (
                "tiers",
                "  - name: t1\n    perKey: { burst10s: 1, perMinute: 1, perDay: 1 }\n    perOrg: { burst10s: 1, perMinute: 1, perDay: 1 }\n",
                "  - name: t1\n    perOrg: { burst10s: 1, perMinute: 1, perDay: 1 }\n",
                "perKey",
            ),
            (
                "routes",
                "  - name: a\n    pathPrefix: /a/\n    upstream: http://u/\n    timeout: 5s\n",
                "  - name: a\n    pathPrefix: /a/\n    upstream: http://u/\n    timeout: 5\n",
                "no unit",
            ),
            (
                "routes",
                "  # the second route\n  - name: b\n    pathPrefix: /b/\n    upstream: http://u/\n",
                "  # the second route\n  - name: b\n    pathPrefix: /b/\n",
                "upstream",
            ),
            (
                "routes",
                "  - { name: c, pathPrefix: /c/, upstream: \"http://u/\" }\n",
                "  - { name: c, pathPrefix: /c/, upstream: [1] }\n",
                "string",
            ),
        ];
        for broken in 0u32..32 {
            for trailer in ["", "adminTls: true\n"] {
                let mut text = String::from("listen: 127.0.0.1:1\n");
                let mut expected = Vec::new();
                let mut list = "";
                for (i, (name, good, bad, says)) in entries.iter().enumerate() {
                    if *name != list {
                        text.push_str(&format!("{name}:\n"));
                        list = name;
                    }
                    let index = entries[..i].iter().filter(|e| e.0 == *name).count();
                    if broken & (1 << i) != 0 {
                        let line = text.lines().count() + 1;
                        expected.push((format!("{name}[{index}]"), line, *says));
                        text.push_str(bad);
                    } else {
                        text.push_str(good);
                    }
                }
                text.push_str(trailer);
                std::fs::write(&file, &text).unwrap();
                let result = ProxyConfig::load(&file);
                if expected.is_empty() {
                    assert!(result.is_ok(), "{text}\n{result:?}");
                    continue;
                }
                let err = result.unwrap_err();
                let got: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
                let want: Vec<&str> = expected.iter().map(|e| e.0.as_str()).collect();
                assert_eq!(got, want, "{text}\n{err}");
                for (p, (_, first_line, says)) in err.problems.iter().zip(&expected) {
                    assert!(p.message.contains(says), "{text}\n{err}");
                    let line = p.message.split("line ").nth(1).unwrap();
                    let line: usize = line
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(
                        line >= *first_line && line < first_line + 4,
                        "{text}\n{err}: problem of {} on line {line}, entry starts at {first_line}",
                        p.path
                    );
                }
            }
        }
        // A fault outside any list: named, and the search stops (nothing to cut out).
        std::fs::write(
            &file,
            "listen: [1]\nroutes:\n  - { name: c, pathPrefix: /c/, upstream: [1] }\n",
        )
        .unwrap();
        let err = ProxyConfig::load(&file).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].path, "(yaml)");
        // Entries sharing a line cannot be cut out alone: the first problem is still named.
        std::fs::write(
            &file,
            "routes: [{ name: c, pathPrefix: /c/, upstream: [1] }, { name: d, pathPrefix: /d/ }]\n",
        )
        .unwrap();
        let err = ProxyConfig::load(&file).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].message.contains("line 1"), "{err}");
    }

    #[test]
    fn a_zero_route_timeout_is_a_problem() {
        let cfg = parse(
            "routes:\n  - { name: a, pathPrefix: /a/, upstream: \"http://u/\", timeout: 0s }\ndefaultTimeout: 0s\n",
        );
        let paths: Vec<String> = cfg.problems(None).into_iter().map(|p| p.path).collect();
        assert!(
            paths.contains(&"routes[0].timeout".to_string()),
            "{paths:?}"
        );
        assert!(paths.contains(&"defaultTimeout".to_string()), "{paths:?}");
    }

    #[test]
    fn settings_only_a_restart_applies_are_named() {
        let started = parse("listen: 127.0.0.1:1\n");
        let same = parse("listen: 127.0.0.1:1\nroutes: []\n");
        assert!(started.restart_only_changes(&same).is_empty());
        let moved = parse(
            "listen: 127.0.0.1:2\nsecrets: { pepperFile: p }\nclientFastPath: false\nbodyReadTimeout: 5s\nworkerCpuAffinity: off\n",
        );
        assert_eq!(
            started.restart_only_changes(&moved),
            [
                "listen",
                "secrets.pepperFile",
                "bodyReadTimeout",
                "clientFastPath",
                "workerCpuAffinity"
            ]
        );
    }

    #[test]
    fn worker_cpu_affinity_is_auto_unless_turned_off_and_a_typo_says_what_is_allowed() {
        assert_eq!(parse("{}").worker_cpu_affinity, CpuAffinity::Auto);
        assert_eq!(
            parse("workerCpuAffinity: off\n").worker_cpu_affinity,
            CpuAffinity::Off
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.yaml");
        std::fs::write(&file, "workerCpuAffinity: pinned\n").unwrap();
        let err = ProxyConfig::load(&file).unwrap_err().to_string();
        assert!(err.contains("pinned"), "{err}");
        assert!(err.contains("auto") && err.contains("off"), "{err}");
    }
}
