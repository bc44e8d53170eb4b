//! The gateway's live configuration: routes, keys, tiers and decrypted credentials, compiled
//! from a validated config for fast lookups. Swapped as a whole on reload.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use super::FastMap;
use http::{uri::Authority, uri::Scheme, HeaderName, HeaderValue};

use super::breaker::{Breaker, BreakerSettings};
use super::config::{parse_time_ms, InvalidConfig, ProxyConfig};
use super::ratelimit::Limits;
use crate::crd::gateway::{KeyScope, PiiMode, RouteMethod, TierSpec};
use crate::entities::keys::{KeyHash, Pepper};
use crate::entities::vault::MasterKeys;
use crate::entities::CredentialKind;

/// A key as the gateway knows it (never the key itself).
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: String,
    pub prefix: String,
    pub hash: KeyHash,
    pub org: String,
    pub scope: KeyScope,
    pub tier: Option<String>,
    pub daily_quota: Option<u64>,
    pub expires_at_ms: Option<i64>,
    pub grace_until_ms: Option<i64>,
    pub revoked: bool,
    /// This key's and its org's in-memory rate-limit counters, found on the first request.
    pub limit_cells: std::sync::OnceLock<super::ratelimit::LimitCells>,
}

/// A header to inject upstream; the value is marked sensitive so it is never logged by hyper.
#[derive(Clone)]
pub struct Injected {
    pub header: HeaderName,
    pub value: HeaderValue,
}

impl std::fmt::Debug for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Injected({}: ****)", self.header)
    }
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `authority` as the upstream request's Host header.
    pub host: HeaderValue,
    pub base_path: String,
    pub timeout: Duration,
    pub allow_live: bool,
    pub allow_test: bool,
    pub tier: Option<String>,
    pub credential: Option<String>,
    /// Where this route's upstream may be reached (sellers' routes in database mode); `None`
    /// for the operator's own routes.
    pub egress: Option<Arc<super::egress::EgressPolicy>>,
    /// BYOK credentials by org.
    pub byok: HashMap<String, Injected>,
    pub system: Option<Injected>,
    /// Whether a call with no credential for its org is refused (`no_upstream_credential`).
    /// A seller's API without a system credential passes such calls on bare: a buyer's BYOK
    /// credential is that buyer's, and must not turn the API off for everyone else.
    pub credential_required: bool,
    /// Orgs whose BYOK credential for this route exists but could not be loaded (see
    /// `dbmode::servable`): their calls get 503 until it is written again, never go bare.
    pub byok_unavailable: HashSet<String>,
    /// Likewise the route's system credential, for calls that would carry it.
    pub system_unavailable: bool,
    pub pii: PiiMode,
    pub log_bodies: bool,
    /// The methods this route forwards and their `Allow` field; None: every method but TRACE
    /// and CONNECT.
    pub methods: Option<(Vec<http::Method>, HeaderValue)>,
    pub allow_encoded_slashes: bool,
    pub breaker: Arc<Breaker>,
    breaker_settings: (u32, u64, u32, u64, u32),
    /// This route's metric handles, resolved on first use.
    pub metrics: std::sync::OnceLock<super::metrics::RouteMetrics>,
}

/// The Host header for an upstream authority: host and port, never any userinfo.
fn host_header(authority: &Authority) -> HeaderValue {
    let host = match authority.port() {
        Some(port) => format!("{}:{}", authority.host(), port.as_str()),
        None => authority.host().to_string(),
    };
    match interned(&host) {
        // A parsed host and port are a valid header value.
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from_str(&host).expect("a parsed host and port are header text"),
    }
}

/// The upstream authority a route's requests go to, `'static` unless it carries userinfo.
fn upstream_authority(authority: &Authority) -> Authority {
    if authority.as_str().contains('@') {
        // Userinfo may be a secret: not kept for the life of the process.
        return authority.clone();
    }
    match interned(authority.as_str()) {
        Some(text) => Authority::from_static(text),
        None => authority.clone(),
    }
}

static INTERNED: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// How many distinct upstream texts are kept for the life of the process. In database mode
/// sellers change upstreams at will; past this (some 4,000 upstreams and Host values, a few
/// hundred KiB) new ones are ordinary shared copies, so memory stays bounded however often
/// they change.
const INTERN_CAP: usize = 4096;

/// Upstream authorities and Host values as `'static` text: one copy per distinct value for the
/// life of the process, at most [`INTERN_CAP`] of them (None past that). Every request clones
/// them (upstream URI, pool key, Host header); a clone of `'static` text touches no reference
/// count, while a clone of a heap copy wrote the same count from every worker core.
fn interned(text: &str) -> Option<&'static str> {
    let mut seen = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = seen.get(text) {
        return Some(known);
    }
    if seen.len() >= INTERN_CAP {
        return None;
    }
    let text: &'static str = Box::leak(text.into());
    seen.insert(text);
    Some(text)
}

/// A route's `methods` list as methods and an `Allow` field; `GET` brings `HEAD` along.
fn route_methods(listed: &[RouteMethod]) -> Option<(Vec<http::Method>, HeaderValue)> {
    if listed.is_empty() {
        return None;
    }
    let mut methods: Vec<http::Method> = Vec::new();
    for m in listed {
        let implied = (*m == RouteMethod::Get).then_some(RouteMethod::Head);
        for m in std::iter::once(*m).chain(implied) {
            let m = m.as_method();
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
    }
    let allow = methods
        .iter()
        .map(http::Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let allow = HeaderValue::from_str(&allow).expect("method names are valid header text");
    Some((methods, allow))
}

impl Route {
    /// Does `path` fall under this route? `/demo` matches `/demo` and `/demo/x`, not `/demox`.
    pub fn matches(&self, path: &str) -> bool {
        super::config::prefix_matches(&self.prefix, path)
    }

    /// The upstream path and query for a request path under this route.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let rest = path[self.prefix.len()..].trim_start_matches('/');
        let mut out = String::with_capacity(self.base_path.len() + rest.len() + 16);
        out.push_str(self.base_path.trim_end_matches('/'));
        out.push('/');
        out.push_str(rest);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// The `Allow` field when this route does not forward `method`.
    pub fn refuses(&self, method: &http::Method) -> Option<&HeaderValue> {
        let (methods, allow) = self.methods.as_ref()?;
        (!methods.contains(method)).then_some(allow)
    }

    pub fn allows(&self, scope: KeyScope) -> bool {
        match scope {
            KeyScope::Live => self.allow_live,
            KeyScope::Test => self.allow_test,
        }
    }

    /// The credential a call from `org` carries: its org's own (BYOK) first, else the route's
    /// system one, else none when the route may be called bare.
    pub fn credential_for(&self, org: &str) -> Result<Option<&Injected>, NoCredential> {
        if self.credential.is_none() {
            return Ok(None);
        }
        if let Some(c) = self.byok.get(org) {
            return Ok(Some(c));
        }
        if self.byok_unavailable.contains(org) {
            return Err(NoCredential::YoursUnavailable);
        }
        match &self.system {
            Some(c) => Ok(Some(c)),
            None if self.system_unavailable => Err(NoCredential::SystemUnavailable),
            None if self.credential_required => Err(NoCredential::Required),
            None => Ok(None),
        }
    }
}

/// Why a call has no credential to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCredential {
    /// The route needs one and the caller's org has none.
    Required,
    /// The caller's org's own (BYOK) credential exists but cannot be used: it could not be
    /// read, or the API's upstream moved to another server since it was written.
    YoursUnavailable,
    /// The route's system credential exists but could not be loaded.
    SystemUnavailable,
}

/// Everything a request needs to be decided.
#[derive(Debug)]
pub struct GatewayState {
    /// Longest prefix first.
    pub routes: Vec<Arc<Route>>,
    pub keys: FastMap<KeyHash, Arc<KeyRecord>>,
    pub tiers: FastMap<String, TierSpec>,
    pub default_tier: Option<String>,
    /// Where this state came from, for /readyz.
    pub source: String,
    /// Database rows this state does not serve (database mode), for /readyz and /metrics.
    pub skipped: SkippedRows,
}

/// How many database rows of each kind a database-mode gateway skips (each named, with why,
/// in its log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SkippedRows {
    pub apis: usize,
    pub orgs: usize,
    pub keys: usize,
    pub credentials: usize,
}

impl SkippedRows {
    pub fn by_kind(&self) -> [(&'static str, usize); 4] {
        [
            ("api", self.apis),
            ("org", self.orgs),
            ("key", self.keys),
            ("credential", self.credentials),
        ]
    }
}

/// The database's APIs (sellers'), which a gateway holds to its egress policy.
pub struct Sellers {
    pub names: HashSet<String>,
    /// Credentials skipped by `dbmode::servable`, as (API, BYOK org or None for system).
    pub unavailable: HashSet<(String, Option<String>)>,
    pub egress: Arc<super::egress::EgressPolicy>,
}

impl GatewayState {
    /// Compiles a config. Breakers of unchanged routes are carried over from `previous`, so a
    /// reload does not close an open breaker.
    pub fn build(
        cfg: &ProxyConfig,
        file: &str,
        master_keys: Option<&MasterKeys>,
        previous: Option<&GatewayState>,
    ) -> Result<Self, InvalidConfig> {
        Self::build_of(
            cfg,
            file,
            master_keys,
            previous,
            super::config::Routes::Required,
            None,
        )
    }

    /// [`GatewayState::build`], with or without routes required, and the routes named in
    /// `sellers` (sellers' routes) held to an egress policy.
    pub fn build_of(
        cfg: &ProxyConfig,
        file: &str,
        master_keys: Option<&MasterKeys>,
        previous: Option<&GatewayState>,
        routes: super::config::Routes,
        sellers: Option<&Sellers>,
    ) -> Result<Self, InvalidConfig> {
        let problems = cfg.problems_of(master_keys, routes);
        if !problems.is_empty() {
            return Err(InvalidConfig {
                file: file.to_string(),
                problems,
            });
        }
        let default_timeout = cfg.default_timeout.as_std();
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for r in &cfg.routes {
            let uri: http::Uri = r.upstream.parse().expect("validated");
            let settings = BreakerSettings::from(&r.breaker);
            let fingerprint = (
                settings.consecutive_failures,
                settings.failure_ratio.to_bits(),
                settings.min_calls,
                settings.open_for_ms,
                settings.half_open_probes,
            );
            let breaker = previous
                .and_then(|p| {
                    p.routes
                        .iter()
                        .find(|o| o.name == r.name && o.breaker_settings == fingerprint)
                })
                .map(|o| o.breaker.clone())
                .unwrap_or_else(|| Arc::new(Breaker::new(settings)));
            let seller = sellers.filter(|s| s.names.contains(&r.name));
            let skipped = seller.iter().flat_map(|s| &s.unavailable);
            let skipped = skipped.filter(|(api, _)| api == &r.name);
            let system_unavailable = skipped.clone().any(|(_, org)| org.is_none());
            let byok_unavailable: HashSet<String> =
                skipped.filter_map(|(_, org)| org.clone()).collect();
            let mut byok = HashMap::new();
            let mut system = None;
            if let (Some(name), Some(keys)) = (&r.credential, master_keys) {
                for c in cfg
                    .credentials
                    .iter()
                    .filter(|c| &c.name == name && c.api == r.name)
                {
                    let sealed = crate::entities::vault::Sealed::from_base64(
                        &c.name,
                        c.key_version,
                        &c.nonce,
                        &c.ciphertext,
                    )
                    .expect("validated");
                    let secret = keys
                        .decrypt(&c.name, &c.org, &c.api, &sealed)
                        .expect("validated");
                    let mut value =
                        HeaderValue::from_str(&format!("{}{}", c.value_prefix, secret.expose()))
                            .expect("validated: both parts are header values");
                    value.set_sensitive(true);
                    let injected = Injected {
                        header: HeaderName::from_bytes(c.header.as_bytes()).expect("validated"),
                        value,
                    };
                    match c.kind {
                        CredentialKind::Byok => {
                            byok.insert(c.org.clone(), injected);
                        }
                        CredentialKind::System => system = Some(injected),
                    }
                }
            }
            routes.push(Arc::new(Route {
                name: r.name.clone(),
                prefix: r.path_prefix.clone(),
                scheme: uri.scheme().cloned().unwrap_or(Scheme::HTTP),
                authority: upstream_authority(uri.authority().expect("validated")),
                host: host_header(uri.authority().expect("validated")),
                base_path: uri.path().to_string(),
                timeout: r
                    .timeout
                    .as_ref()
                    .map(|t| t.as_std())
                    .unwrap_or(default_timeout),
                allow_live: r.scopes.contains(&KeyScope::Live),
                allow_test: r.scopes.contains(&KeyScope::Test),
                tier: r.tier.clone(),
                credential: r.credential.clone().or_else(|| {
                    (system_unavailable || !byok_unavailable.is_empty()).then(|| r.name.clone())
                }),
                egress: seller.map(|s| s.egress.clone()),
                credential_required: system.is_some() || seller.is_none(),
                system_unavailable,
                byok_unavailable,
                byok,
                system,
                pii: r.pii,
                log_bodies: r.log_bodies,
                methods: route_methods(&r.methods),
                allow_encoded_slashes: r.allow_encoded_slashes,
                breaker,
                breaker_settings: fingerprint,
                metrics: std::sync::OnceLock::new(),
            }));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        let keys = cfg
            .keys
            .iter()
            .map(|k| {
                let hash = KeyHash::from_hex(&k.hash).expect("validated");
                let rec = KeyRecord {
                    id: k.id.clone().unwrap_or_else(|| k.prefix.clone()),
                    prefix: k.prefix.clone(),
                    hash,
                    org: k.org.clone(),
                    scope: k.scope,
                    tier: k.tier.clone(),
                    daily_quota: k.daily_quota,
                    expires_at_ms: k.expires_at.as_deref().and_then(parse_time_ms),
                    grace_until_ms: k.grace_until.as_deref().and_then(parse_time_ms),
                    revoked: k.revoked,
                    limit_cells: Default::default(),
                };
                (hash, Arc::new(rec))
            })
            .collect();
        Ok(Self {
            routes,
            keys,
            tiers: cfg
                .tiers
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            default_tier: cfg.default_tier.clone(),
            source: file.to_string(),
            skipped: SkippedRows::default(),
        })
    }

    pub fn route_for(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(path))
    }

    /// Looks a key up by its hash, comparing in constant time.
    pub fn key(&self, hash: &KeyHash) -> Option<&Arc<KeyRecord>> {
        self.keys.get(hash).filter(|k| k.hash.ct_eq(hash))
    }

    /// The limits for a key on a route: the route's tier, else the key's, else the default.
    pub fn limits_for(&self, key: &KeyRecord, route: &Route) -> Option<Limits> {
        let name = route
            .tier
            .as_ref()
            .or(key.tier.as_ref())
            .or(self.default_tier.as_ref())?;
        let tier = self
            .tiers
            .get(name)
            .or_else(|| self.default_tier.as_ref().and_then(|d| self.tiers.get(d)))?;
        Some(Limits::new(&tier.per_key, &tier.per_org, key.daily_quota))
    }
}

/// The current state, swapped atomically on reload.
///
/// Requests read it through a per-thread copy of the `Arc` that is refreshed when the
/// generation changes: the lock and the shared reference count are touched once per reload
/// and thread, not on every request (where two worker cores would pass their cache lines back
/// and forth).
///
/// Kept hand-made rather than `arc_swap::Cache`: a request holds the state across awaits, so
/// it needs an owned `Arc`, and cloning the one a `Cache` hands out is exactly the shared
/// count this avoids; the per-thread `Arc<LoadedState>` would still be needed on top.
#[derive(Debug)]
pub struct SharedState {
    id: u64,
    generation: AtomicU64,
    current: RwLock<Arc<GatewayState>>,
}

/// A thread's hold on one generation of the state; derefs to it.
#[derive(Debug)]
pub struct LoadedState(Arc<GatewayState>);

impl std::ops::Deref for LoadedState {
    type Target = GatewayState;
    fn deref(&self) -> &GatewayState {
        &self.0
    }
}

/// Per thread: (state id, generation, this thread's hold). A handful at most: one per gateway
/// in the process.
type StateCache = Vec<(u64, u64, Arc<LoadedState>)>;

thread_local! {
    static LOADED: RefCell<StateCache> = const { RefCell::new(Vec::new()) };
}

/// Gateways (one per process, more in tests) kept in a thread's cache before the oldest goes.
const CACHED_STATES: usize = 8;

impl SharedState {
    pub fn new(state: GatewayState) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            current: RwLock::new(Arc::new(state)),
        }
    }

    /// The current state, straight from the lock: for reloads and the admin port, which run
    /// on other threads than requests and should not keep a per-thread hold on an old state.
    pub fn current(&self) -> Arc<GatewayState> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The state for a request: this thread's hold, refreshed when the generation changed.
    pub fn load(&self) -> Arc<LoadedState> {
        let generation = self.generation.load(Ordering::Acquire);
        LOADED.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(i) = cache.iter().position(|(id, _, _)| *id == self.id) {
                if cache[i].1 == generation {
                    return cache[i].2.clone();
                }
                cache.remove(i);
            }
            let loaded = Arc::new(LoadedState(self.current()));
            if cache.len() >= CACHED_STATES {
                cache.remove(0);
            }
            cache.push((self.id, generation, loaded.clone()));
            loaded
        })
    }

    pub fn store(&self, state: GatewayState) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        // After the swap: a reader that sees the new generation finds the new state.
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Loads the pepper from `APITREE_KEY_PEPPER` or the config's pepper file.
pub fn load_pepper(cfg: &ProxyConfig, base: &std::path::Path) -> Result<Pepper, String> {
    let bytes = if let Ok(v) = std::env::var("APITREE_KEY_PEPPER") {
        v.into_bytes()
    } else if let Some(f) = &cfg.secrets.pepper_file {
        let path = base.join(f);
        std::fs::read(&path)
            .map_err(|e| format!("cannot read the pepper file {}: {e}", path.display()))?
    } else {
        return Err(
            "no key pepper: set APITREE_KEY_PEPPER or secrets.pepperFile (at least 32 bytes)"
                .into(),
        );
    };
    let trimmed = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
    Pepper::new(trimmed).map_err(|e| e.to_string())
}

/// Loads master keys from `APITREE_MASTER_KEY(_VERSION)` (one key, or a keyring of
/// `version:base64` lines) or the config's key file; None when neither is set (then no route
/// may use a credential).
pub fn load_master_keys(
    cfg: &ProxyConfig,
    base: &std::path::Path,
) -> Result<Option<MasterKeys>, String> {
    if let Ok(key) = std::env::var("APITREE_MASTER_KEY") {
        let version = std::env::var("APITREE_MASTER_KEY_VERSION")
            .ok()
            .map(|v| {
                v.parse::<u32>().map_err(|_| {
                    format!("APITREE_MASTER_KEY_VERSION {v:?} is not a positive integer")
                })
            })
            .transpose()?
            .unwrap_or(1);
        return MasterKeys::from_value(&key, version)
            .map(Some)
            .map_err(|e| e.to_string());
    }
    if let Some(f) = &cfg.secrets.master_key_file {
        let path = base.join(f);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the master-key file {}: {e}", path.display()))?;
        return MasterKeys::parse_file(&text)
            .map(Some)
            .map_err(|e| e.to_string());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_text_is_kept_once_and_userinfo_not_at_all() {
        let _one_at_a_time = KEPT_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let a = interned("orders.internal:8443").unwrap();
        assert!(std::ptr::eq(
            a,
            interned(&String::from("orders.internal:8443")).unwrap()
        ));
        let plain: Authority = "orders.internal:8443".parse().unwrap();
        assert!(std::ptr::eq(upstream_authority(&plain).as_str(), a));
        let secret: Authority = "svc:hunter2@orders.internal".parse().unwrap();
        assert_eq!(upstream_authority(&secret), secret);
        let kept = INTERNED.lock().unwrap();
        assert!(!kept.iter().any(|t| t.contains("hunter2")), "{kept:?}");
    }

    /// A seller who keeps moving their API grows the kept texts only up to the cap; the
    /// routes built past it still reach the right upstream with the right Host.
    #[test]
    fn kept_upstream_text_is_bounded_however_often_upstreams_change() {
        let _one_at_a_time = KEPT_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        for n in 0..INTERN_CAP + 100 {
            let a: Authority = format!("moving-{n}.example:8080").parse().unwrap();
            let built = upstream_authority(&a);
            assert_eq!(built, a);
            assert_eq!(host_header(&a), format!("moving-{n}.example:8080").as_str());
        }
        let mut kept = INTERNED.lock().unwrap();
        assert!(kept.len() <= INTERN_CAP);
        // Room again for the other tests in this process.
        kept.retain(|t| !t.starts_with("moving-"));
    }

    /// The tests that fill or rely on the process-wide set of kept texts.
    static KEPT_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_upstream_host_header_is_host_and_port_without_userinfo() {
        for (authority, host) in [
            ("up.example:8443", "up.example:8443"),
            ("up.example", "up.example"),
            ("user:secret@up.example:8080", "up.example:8080"),
            ("127.0.0.1:18080", "127.0.0.1:18080"),
        ] {
            let a: Authority = authority.parse().unwrap();
            assert_eq!(host_header(&a), host, "{authority}");
        }
    }
}
