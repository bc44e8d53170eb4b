//! Database mode: orgs, keys, APIs and credentials come from PostgreSQL and are served from
//! memory. A LISTEN on `apitree_config` reloads them on every change; when the database goes
//! away the last good configuration keeps serving, readiness says `degraded`, and the loader
//! retries until the database answers again (then reloads, since notifications were missed).

use std::collections::{BTreeSet, HashSet};
use std::{sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, PgPool};

use super::config::ProxyConfig;
use super::egress::EgressPolicy;
use super::server::{DependencyStatus, Gateway};
use super::state::{GatewayState, Sellers, SkippedRows};
use super::ProxyError;
use crate::db::{self, keys::DbEntities};
use crate::entities::vault::MasterKeys;
use crate::entities::CredentialKind;

/// The file's config plus the database's entities. Keys whose tier the file does not define
/// use the default tier.
pub fn merge(base: &ProxyConfig, e: DbEntities) -> ProxyConfig {
    let mut cfg = base.clone();
    let tiers: HashSet<String> = cfg.tiers.iter().map(|t| t.name.clone()).collect();
    cfg.orgs.extend(e.orgs);
    cfg.keys.extend(e.keys.into_iter().map(|mut k| {
        if k.tier.as_ref().is_some_and(|t| !tiers.contains(t)) {
            k.tier = None;
        }
        k
    }));
    cfg.routes.extend(e.routes);
    cfg.credentials.extend(e.credentials);
    cfg
}

/// Drops from `cfg` (the file's config `base` with the database's entries appended) each
/// database entry the gateway cannot serve, and says which and why: one seller's bad row must
/// not keep the whole gateway on a stale config (revocations included) or stop it starting.
/// A seller's API that would take the gateway's own routes (same name, or a prefix one path
/// could match with one of them) goes first; then entries with problems, with what hangs on
/// them (a dropped route's credentials), until none is left. Problems in the file remain the
/// file's, reported as before.
pub fn servable(
    base: &ProxyConfig,
    cfg: &mut ProxyConfig,
    master_keys: Option<&MasterKeys>,
) -> Servable {
    let mut skipped = Vec::new();
    let mut counts = SkippedRows::default();
    let mut unavailable = HashSet::new();
    let own = base.routes.len();
    let mut dropped_routes: HashSet<String> = HashSet::new();
    let mut i = own;
    while i < cfg.routes.len() {
        let r = &cfg.routes[i];
        let taken = base.routes.iter().find(|o| {
            o.name == r.name || super::config::prefixes_overlap(&o.path_prefix, &r.path_prefix)
        });
        if let Some(o) = taken {
            skipped.push(format!(
                "API {} ({}) would take the gateway's own route {} ({})",
                r.name, r.path_prefix, o.name, o.path_prefix
            ));
            dropped_routes.insert(cfg.routes.remove(i).name);
            counts.apis += 1;
        } else {
            i += 1;
        }
    }
    drop_credentials_of(cfg, &dropped_routes, base.credentials.len());
    // Per list, where the database's entries start (the file's come first).
    const LISTS: [&str; 4] = ["routes", "orgs", "keys", "credentials"];
    let first = [
        own,
        base.orgs.len(),
        base.keys.len(),
        base.credentials.len(),
    ];
    loop {
        let mut drop: [BTreeSet<usize>; 4] = Default::default();
        for p in cfg.problems_of(master_keys, super::config::Routes::MayBeNone) {
            let Some((list, rest)) = p.path.split_once('[') else {
                continue;
            };
            let (Some(l), Some(n)) = (
                LISTS.iter().position(|x| *x == list),
                rest.split(']').next().and_then(|n| n.parse::<usize>().ok()),
            ) else {
                continue;
            };
            if n < first[l] || !drop[l].insert(n) {
                continue;
            }
            let what = match l {
                0 => cfg.routes.get(n).map(|r| format!("API {}", r.name)),
                1 => cfg.orgs.get(n).map(|o| format!("org {}", o.id)),
                2 => cfg.keys.get(n).map(|k| format!("key {}", k.prefix)),
                _ => cfg
                    .credentials
                    .get(n)
                    .map(|c| format!("a credential of org {} for API {}", c.org, c.api)),
            };
            skipped.push(format!("{}: {}", what.unwrap_or_default(), p.message));
        }
        if drop.iter().all(BTreeSet::is_empty) {
            return Servable {
                skipped,
                counts,
                unavailable,
            };
        }
        for (n, d) in [
            &mut counts.apis,
            &mut counts.orgs,
            &mut counts.keys,
            &mut counts.credentials,
        ]
        .into_iter()
        .zip(&drop)
        {
            *n += d.len();
        }
        // A skipped credential's API still serves everyone else; the calls that would carry
        // it get 503 (counted as an error), never go upstream bare.
        unavailable.extend(drop[3].iter().map(|n| {
            let c = &cfg.credentials[*n];
            let org = (c.kind == CredentialKind::Byok).then(|| c.org.clone());
            (c.api.clone(), org)
        }));
        fn remove<T>(v: &mut Vec<T>, at: &BTreeSet<usize>) {
            for n in at.iter().rev() {
                v.remove(*n);
            }
        }
        dropped_routes.extend(drop[0].iter().map(|n| cfg.routes[*n].name.clone()));
        remove(&mut cfg.routes, &drop[0]);
        remove(&mut cfg.orgs, &drop[1]);
        remove(&mut cfg.keys, &drop[2]);
        remove(&mut cfg.credentials, &drop[3]);
        drop_credentials_of(cfg, &dropped_routes, first[3]);
        // A route whose credentials are all skipped no longer names one; it stays served.
        for r in &mut cfg.routes[own..] {
            if r.credential.as_ref().is_some_and(|name| {
                !cfg.credentials
                    .iter()
                    .any(|c| &c.name == name && c.api == r.name)
            }) {
                r.credential = None;
            }
        }
    }
}

/// What [`servable`] dropped.
#[derive(Debug, Default)]
pub struct Servable {
    /// Each skipped entry and why, for the log.
    pub skipped: Vec<String>,
    /// How many of each kind, for /readyz and /metrics.
    pub counts: SkippedRows,
    /// The skipped credentials, as (API, BYOK org or None for system).
    pub unavailable: HashSet<(String, Option<String>)>,
}

/// Drops the database's credentials (those after the file's `own`) bound to a dropped route:
/// they go with it, unreported (the route was).
fn drop_credentials_of(cfg: &mut ProxyConfig, routes: &HashSet<String>, own: usize) {
    let mut n = 0;
    cfg.credentials.retain(|c| {
        n += 1;
        n <= own || !routes.contains(&c.api)
    });
}

/// Loads and compiles the database's state once.
pub async fn load(
    pool: &PgPool,
    base: &ProxyConfig,
    source: &str,
    master_keys: Option<&MasterKeys>,
    egress: &Arc<EgressPolicy>,
    previous: Option<&GatewayState>,
) -> Result<GatewayState, ProxyError> {
    let entities = db::keys::load_entities(pool)
        .await
        .map_err(ProxyError::Database)?;
    let mut cfg = merge(base, entities);
    let servable = servable(base, &mut cfg, master_keys);
    for skipped in &servable.skipped {
        tracing::warn!(%skipped, "a database entry is not served");
    }
    // The database's APIs are sellers': their upstreams are held to the egress policy.
    let sellers = Sellers {
        names: cfg.routes[base.routes.len()..]
            .iter()
            .map(|r| r.name.clone())
            .collect(),
        unavailable: servable.unavailable,
        egress: egress.clone(),
    };
    // A fresh install has no API registered yet: it serves (404 for every path, /readyz counts
    // zero routes) and picks APIs up as they are registered.
    let mut state = GatewayState::build_of(
        &cfg,
        source,
        master_keys,
        previous,
        super::config::Routes::MayBeNone,
        Some(&sellers),
    )?;
    state.skipped = servable.counts;
    Ok(state)
}

/// Keeps a gateway in step with the database until the process ends.
pub async fn watch(
    gateway: Arc<Gateway>,
    pool: PgPool,
    base: ProxyConfig,
    source: String,
    master_keys: Option<MasterKeys>,
    egress: Arc<EgressPolicy>,
) {
    let set = |s: DependencyStatus| *gateway.database.lock().unwrap_or_else(|p| p.into_inner()) = s;
    let reload = || async {
        let previous = gateway.state.current();
        match load(
            &pool,
            &base,
            &source,
            master_keys.as_ref(),
            &egress,
            Some(&previous),
        )
        .await
        {
            Ok(state) => {
                gateway.state.store(state);
                gateway
                    .metrics
                    .config_reloads
                    .with_label_values(&["ok"])
                    .inc();
                true
            }
            Err(ProxyError::Config(e)) => {
                // The database answered but holds something that cannot run: keep the old config.
                gateway
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(
                    "database configuration NOT reloaded, still serving the previous one: {e}"
                );
                true
            }
            Err(e) => {
                gateway
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!("cannot reload from the database: {e}");
                false
            }
        }
    };
    let mut listener: Option<PgListener> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        if listener.is_none() {
            match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen("apitree_config").await {
                    Ok(()) => {
                        // Changes made while we were not listening were missed: reload now.
                        if reload().await {
                            set(DependencyStatus::Ok);
                            backoff = Duration::from_millis(200);
                            listener = Some(l);
                            tracing::info!("listening for configuration changes in the database");
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!("LISTEN apitree_config failed: {e}"),
                },
                Err(e) => tracing::debug!("database not reachable yet: {e}"),
            }
            set(DependencyStatus::Degraded);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        let l = listener.as_mut().expect("checked above");
        match l.try_recv().await {
            Ok(Some(_)) => {
                // Let a burst of statements settle, then reload once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), l.try_recv())
                    .await
                    .unwrap_or(Ok(None))
                {}
                if !reload().await {
                    set(DependencyStatus::Degraded);
                }
            }
            Ok(None) | Err(_) => {
                tracing::warn!("lost the database connection; serving the last good configuration");
                set(DependencyStatus::Degraded);
                listener = None;
            }
        }
    }
}
