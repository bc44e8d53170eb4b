//! Database mode: orgs, keys, APIs and credentials come from PostgreSQL and are served from
//! memory. A LISTEN on `apitree_config` reloads them on every change; when the database goes
//! away the last good configuration keeps serving, readiness says `degraded`, and the loader
//! retries until the database answers again (then reloads, since notifications were missed).

use std::{sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, PgPool};

use std::collections::HashSet;

use super::config::ProxyConfig;
use super::egress::EgressPolicy;
use super::server::{DependencyStatus, Gateway};
use super::state::GatewayState;
use super::vault::MasterKeys;
use super::ProxyError;
use crate::db::{self, keys::DbEntities};

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
    // The database's APIs are sellers': their upstreams are held to the egress policy.
    let sellers: HashSet<String> = entities.routes.iter().map(|r| r.name.clone()).collect();
    let cfg = merge(base, entities);
    // A fresh install has no API registered yet: it serves (404 for every path, /readyz counts
    // zero routes) and picks APIs up as they are registered.
    Ok(GatewayState::build_of(
        &cfg,
        source,
        master_keys,
        previous,
        super::config::Routes::MayBeNone,
        Some((&sellers, egress)),
    )?)
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
