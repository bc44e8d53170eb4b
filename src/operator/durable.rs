//! Where the control plane keeps what it must not forget: incidents, the Slack outbox and the
//! detector's baselines. In PostgreSQL with `--database-url` (a restart, a `kill -9` or a
//! leader change loses nothing: the next process delivers what was accepted and takes up the
//! open incidents); in memory otherwise, which is said at start and in `/readyz`
//! (`state: memory`).

use std::sync::Arc;

use sqlx::PgPool;

use crate::db::{self, DbError};
use crate::detect::engine::IncidentStore;
use crate::notify::outbox::Outbox;

/// The control plane's state store.
pub struct Durable {
    pub store: Arc<IncidentStore>,
    pool: Option<PgPool>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("kind", &self.kind())
            .finish()
    }
}

impl Durable {
    /// Memory only: lost on restart.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(IncidentStore::memory()),
            pool: None,
        }
    }

    /// PostgreSQL at `url` (which must be at this release's latest migration), or memory with
    /// a warning when there is none.
    pub async fn open(url: Option<&str>) -> Result<Self, DbError> {
        let Some(url) = url else {
            tracing::warn!(
                "no --database-url: incidents, the Slack outbox and the detector's baselines are kept in memory and lost on restart (/readyz says state: memory)"
            );
            return Ok(Self::memory());
        };
        let pool = db::connect(url, 4).await?;
        db::require_latest(&pool, url).await?;
        Ok(Self {
            store: Arc::new(IncidentStore::Postgres(pool.clone())),
            pool: Some(pool),
        })
    }

    /// The outbox of Slack `app`: `""` for the operator's own, a gateway's `namespace/name`
    /// for the app its ApiGateway names. A new memory outbox without a database.
    pub fn outbox(&self, app: &str) -> Arc<Outbox> {
        Arc::new(match &self.pool {
            Some(pool) => Outbox::postgres_for(pool.clone(), app),
            None => Outbox::memory(),
        })
    }

    /// `postgres` or `memory`, as `/readyz` reports it.
    pub fn kind(&self) -> &'static str {
        if self.pool.is_some() {
            "postgres"
        } else {
            "memory"
        }
    }
}
