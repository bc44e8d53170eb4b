//! Usage metering for a database-mode gateway: per key, per route (API) and per UTC day, the
//! calls the gateway admitted (past authentication, scopes and rate limits), those answered
//! with a 5xx, and the response bytes known when the answer started.
//!
//! The request path only adds into this thread's slot (a mutex no other worker takes; the
//! flusher takes it for a moment every few seconds); there is no database write per request.
//! A background task sends the sums every `flush_every` with `usage_flush(replica, seq, …)`,
//! which adds them to `usage_counters` and records `(replica, seq)` in the same transaction: a
//! batch whose commit was not confirmed is sent again with the same number and applied at most
//! once, so replicas (each adding its own deltas) never double-count. What is pending is sent
//! once more at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use sqlx::PgPool;
use uuid::Uuid;

use super::FastMap;
use crossbeam_utils::CachePadded;

use super::sharded::{slot_count, thread_slot};
use crate::db::DbError;

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// One (key, route, day)'s sums.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
}

/// (key id, route name, UTC day number since the epoch).
type Cell = (String, String, u32);

/// One thread's sums: by key id, then route, then day (found by `&str` without allocating;
/// ids and route names come from the config, so the fast unkeyed hasher is safe here).
#[derive(Default)]
struct Slot {
    cells: FastMap<String, FastMap<String, Vec<(u32, Counts)>>>,
}

/// A batch on its way to the database, with the number it is sent under until it lands.
struct Outgoing {
    seq: u64,
    cells: HashMap<Cell, Counts>,
}

pub struct UsageMeter {
    slots: Box<[CachePadded<Mutex<Slot>>]>,
    /// This process's id in `usage_flushes`.
    replica: Uuid,
    next_seq: AtomicU64,
    /// The batch not yet confirmed (sent again, as it is, until it is).
    outgoing: tokio::sync::Mutex<Option<Outgoing>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for UsageMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageMeter {
    pub fn new() -> Self {
        Self {
            slots: (0..slot_count()).map(|_| CachePadded::default()).collect(),
            replica: Uuid::new_v4(),
            next_seq: AtomicU64::new(1),
            outgoing: tokio::sync::Mutex::new(None),
        }
    }

    /// Counts one admitted call of the key `key_id` on `route` at `now_ms`.
    pub fn record(&self, key_id: &str, route: &str, now_ms: u64, error: bool, bytes: u64) {
        let day = (now_ms / DAY_MS) as u32;
        let mut slot = lock(&self.slots[thread_slot()]);
        if !slot.cells.contains_key(key_id) {
            slot.cells.insert(key_id.to_string(), FastMap::default());
        }
        let routes = slot.cells.get_mut(key_id).expect("inserted above");
        if !routes.contains_key(route) {
            routes.insert(route.to_string(), Vec::new());
        }
        let days = routes.get_mut(route).expect("inserted above");
        let c = match days.iter().position(|(d, _)| *d == day) {
            Some(i) => &mut days[i].1,
            None => {
                days.push((day, Counts::default()));
                &mut days.last_mut().expect("pushed").1
            }
        };
        c.requests = c.requests.saturating_add(1);
        c.errors = c.errors.saturating_add(u64::from(error));
        // A declared length can be anything: sums saturate, never wrap or panic.
        c.bytes = c.bytes.saturating_add(bytes);
    }

    /// Everything counted so far, taken out of the slots.
    fn take(&self) -> HashMap<Cell, Counts> {
        let mut all: HashMap<Cell, Counts> = HashMap::new();
        for slot in self.slots.iter() {
            let cells = std::mem::take(&mut lock(slot).cells);
            for (key, routes) in cells {
                for (route, days) in routes {
                    for (day, c) in days {
                        let t = all.entry((key.clone(), route.clone(), day)).or_default();
                        t.requests = t.requests.saturating_add(c.requests);
                        t.errors = t.errors.saturating_add(c.errors);
                        t.bytes = t.bytes.saturating_add(c.bytes);
                    }
                }
            }
        }
        all
    }

    /// Sends the unconfirmed batch (again) and then what was counted since; calls counted
    /// while it runs wait for the next flush. Cells whose key id is not a database key (a key
    /// from the gateway's file) are not metered.
    pub async fn flush(&self, pool: &PgPool) -> Result<u64, FlushError> {
        let mut outgoing = self.outgoing.lock().await;
        let mut sent = 0;
        // The batch whose landing was not confirmed goes first, as it was, under its number.
        if let Some(batch) = outgoing.as_ref() {
            match send(pool, self.replica, batch).await {
                Ok(()) => sent += batch.requests(),
                // The database will never take it (a value it refuses): set aside, so it
                // cannot hold up every later batch. Counted and logged by the caller.
                Err(e) if refused_for_good(&e) => {
                    *outgoing = None;
                    return Err(FlushError::Discarded(e));
                }
                Err(e) => return Err(FlushError::Kept(e)),
            }
            *outgoing = None;
        }
        let cells = self.take();
        if cells.is_empty() {
            return Ok(sent);
        }
        let batch = outgoing.insert(Outgoing {
            seq: self.next_seq.fetch_add(1, Relaxed),
            cells,
        });
        match send(pool, self.replica, batch).await {
            Ok(()) => sent += batch.requests(),
            Err(e) if refused_for_good(&e) => {
                *outgoing = None;
                return Err(FlushError::Discarded(e));
            }
            Err(e) => return Err(FlushError::Kept(e)),
        }
        *outgoing = None;
        Ok(sent)
    }

    /// Calls counted and not yet confirmed by the database.
    pub async fn pending(&self) -> u64 {
        let out = self.outgoing.lock().await;
        let slots: u64 = self
            .slots
            .iter()
            .map(|s| {
                lock(s)
                    .cells
                    .values()
                    .flat_map(|r| r.values())
                    .flatten()
                    .map(|(_, c)| c.requests)
                    .sum::<u64>()
            })
            .sum();
        slots + out.as_ref().map_or(0, Outgoing::requests)
    }
}

impl Outgoing {
    fn requests(&self) -> u64 {
        self.cells.values().map(|c| c.requests).sum()
    }
}

/// Why a flush did not land.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The database could not be reached or failed: the batch is kept and sent again.
    #[error("usage not recorded yet, kept for the next try: {0}")]
    Kept(DbError),
    /// The database refused the batch's data (it never will take it): set aside.
    #[error("usage batch refused by the database and set aside: {0}")]
    Discarded(DbError),
}

/// A refusal about the data (SQLSTATE class 22, data exception, or 23, integrity), not the
/// connection: sending the same batch again cannot succeed.
fn refused_for_good(e: &DbError) -> bool {
    let DbError::Query { source, .. } = e else {
        return false;
    };
    source
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

async fn send(pool: &PgPool, replica: Uuid, batch: &Outgoing) -> Result<(), DbError> {
    let (mut keys, mut apis, mut days) = (Vec::new(), Vec::new(), Vec::new());
    let (mut requests, mut errors, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for ((key, route, day), c) in &batch.cells {
        let Ok(key) = Uuid::parse_str(key) else {
            continue;
        };
        keys.push(key);
        apis.push(route.to_string());
        days.push(i64::from(*day));
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        requests.push(clamp(c.requests));
        errors.push(clamp(c.errors));
        bytes.push(clamp(c.bytes));
    }
    sqlx::query("SELECT usage_flush($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(replica)
        .bind(batch.seq as i64)
        .bind(keys)
        .bind(apis)
        .bind(days)
        .bind(requests)
        .bind(errors)
        .bind(bytes)
        .execute(pool)
        .await
        .map_err(DbError::query("record usage"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_key_route_and_utc_day_across_threads() {
        let meter = std::sync::Arc::new(UsageMeter::new());
        let (k1, k2, r) = ("k1".to_string(), "k2".to_string(), "maps".to_string());
        let day0 = 20_000 * DAY_MS;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (meter, k1, k2, r) = (meter.clone(), k1.clone(), k2.clone(), r.clone());
                s.spawn(move || {
                    for i in 0..1000u64 {
                        meter.record(&k1, &r, day0 + DAY_MS - 1, i % 10 == 0, 3);
                        meter.record(&k2, &r, day0 + DAY_MS + t, false, 0);
                    }
                });
            }
        });
        let all = meter.take();
        assert_eq!(
            all[&(k1.clone(), r.clone(), 20_000)],
            Counts {
                requests: 4000,
                errors: 400,
                bytes: 12_000
            }
        );
        assert_eq!(
            all[&(k2.clone(), r.clone(), 20_001)],
            Counts {
                requests: 4000,
                errors: 0,
                bytes: 0
            }
        );
        assert_eq!(all.len(), 2);
        assert!(meter.take().is_empty(), "taken once");
    }
}
