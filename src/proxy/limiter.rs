//! Where rate-limit counters live: in this process, or shared through Redis.
//!
//! With Redis, a decision is at most one script call (one round trip), and usually none: each
//! call leases this replica a block of every counter (see [`super::ratelimit`]). When Redis fails
//! or is slow, the request is decided by the local counters instead, the fallback is counted, and
//! readiness reports `degraded` until Redis answers again.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::metrics::ProxyMetrics;
use super::ratelimit::{
    redis_call, redis_grant, Decision, LeaseTable, Limits, LocalLimiter, Take, REDIS_SCRIPT,
};
use super::state::KeyRecord;

/// How long a shared decision may take before the local counters decide instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

pub struct Limiter {
    local: LocalLimiter,
    redis: Option<SharedCounters>,
    metrics: ProxyMetrics,
}

struct SharedCounters {
    id: usize,
    client: redis::Client,
    config: ConnectionManagerConfig,
    script: redis::Script,
    leases: LeaseTable,
    healthy: AtomicBool,
}

static NEXT_LIMITER_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    // One Redis connection per worker thread and limiter, so a decision's round trip is
    // driven on the thread that waits for it.
    static CONNECTIONS: std::cell::RefCell<std::collections::HashMap<usize, ConnectionManager>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

impl SharedCounters {
    fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        CONNECTIONS.with(|c| {
            let mut map = c.borrow_mut();
            if let Some(conn) = map.get(&self.id) {
                return Ok(conn.clone());
            }
            let conn =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())?;
            map.insert(self.id, conn.clone());
            Ok(conn)
        })
    }
}

/// Why Redis could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL: {0}; expected redis://HOST[:PORT][/DB] or rediss://… for TLS")]
pub struct RedisUrlError(String);

impl Limiter {
    pub fn local(metrics: ProxyMetrics) -> Self {
        Self {
            local: LocalLimiter::default(),
            redis: None,
            metrics,
        }
    }

    /// Shares counters through Redis at `url`. Connects lazily: a Redis that is down at start
    /// only degrades readiness.
    pub fn shared(url: &str, metrics: ProxyMetrics) -> Result<Self, RedisUrlError> {
        Self::shared_with_ca(url, None, metrics)
    }

    /// [`Limiter::shared`]; a `rediss://` URL is verified against `ca_pem` (PEM certificates)
    /// instead of the system's roots when given.
    pub fn shared_with_ca(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        metrics: ProxyMetrics,
    ) -> Result<Self, RedisUrlError> {
        let client = match ca_pem {
            None => redis::Client::open(url),
            Some(root_cert) => {
                if !url.starts_with("rediss://") {
                    return Err(RedisUrlError(
                        "a CA file is given but the URL is not rediss:// (TLS)".into(),
                    ));
                }
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .map_err(|e| RedisUrlError(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        Ok(Self {
            local: LocalLimiter::default(),
            redis: Some(SharedCounters {
                id: NEXT_LIMITER_ID.fetch_add(1, Ordering::Relaxed),
                client,
                config,
                script: redis::Script::new(REDIS_SCRIPT),
                leases: LeaseTable::default(),
                healthy: AtomicBool::new(true),
            }),
            metrics,
        })
    }

    /// `off`, `ok` or `degraded`, for /readyz.
    pub fn backend_status(&self) -> &'static str {
        match &self.redis {
            None => "off",
            Some(r) if r.healthy.load(Ordering::Relaxed) => "ok",
            Some(_) => "degraded",
        }
    }

    /// Decides and counts one request by `key`, keeping the key's counters with the record so
    /// the next decision looks nothing up.
    pub async fn check_key(&self, key: &KeyRecord, limits: Limits, now_ms: u64) -> Decision {
        if self.redis.is_some() {
            return self.check(&key.id, &key.org, limits, now_ms).await;
        }
        let cached = key.limit_cells.get().filter(|cells| self.local.owns(cells));
        match cached {
            Some(cells) => self.local.check_cells(cells, limits, now_ms),
            None => {
                let cells = self.local.cells(&key.id, &key.org);
                let decision = self.local.check_cells(&cells, limits, now_ms);
                let _ = key.limit_cells.set(cells);
                decision
            }
        }
    }

    /// Decides and counts one request.
    pub async fn check(&self, key_id: &str, org_id: &str, limits: Limits, now_ms: u64) -> Decision {
        if let Some(shared) = &self.redis {
            let ask = match shared.leases.take(key_id, org_id, limits, now_ms) {
                Take::Decided(decision) => return decision,
                Take::Ask(ask) => ask,
            };
            self.metrics.limiter_store_calls.inc();
            let (keys, argv) = redis_call(key_id, org_id, limits, now_ms, &ask.wants);
            let mut inv = shared.script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &argv {
                inv.arg(a);
            }
            let reply = match shared.connection() {
                Ok(mut conn) => {
                    tokio::time::timeout(REDIS_TIMEOUT, inv.invoke_async::<Vec<i64>>(&mut conn))
                        .await
                }
                Err(e) => Ok(Err(e)),
            };
            match reply {
                Ok(Ok(values)) => {
                    if let Some(grant) = redis_grant(&values) {
                        shared.healthy.store(true, Ordering::Relaxed);
                        return shared
                            .leases
                            .record(key_id, org_id, limits, now_ms, &ask, &grant);
                    }
                    tracing::warn!(
                        "unexpected reply from the Redis rate-limit script; deciding locally"
                    );
                }
                Ok(Err(e)) => {
                    if shared.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "Redis rate-limit store failed; deciding locally until it answers");
                    }
                }
                Err(_) => {
                    if shared.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "Redis rate-limit store timed out; deciding locally until it answers"
                        );
                    }
                }
            }
            shared.leases.release(key_id, org_id, &ask);
            self.metrics.limiter_fallbacks.inc();
        }
        self.local.check(key_id, org_id, limits, now_ms)
    }
}
