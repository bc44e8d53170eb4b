//! Rate-limit counters held in this process: per key and per org, in mutex-guarded shards,
//! each key's and org's three counters alone on their cache lines.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::CachePadded;

use super::{decide, position, Decision, Limits, Observed, Window, COUNTERS};
use crate::proxy::FastMap;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counter {
    index: u64,
    pub(super) current: u64,
    previous: u64,
}

impl Counter {
    fn roll(&mut self, index: u64) {
        if index == self.index {
            return;
        }
        self.previous = if index == self.index + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.index = index;
    }
}

pub(super) const SHARDS: usize = 64;

/// A shard, alone on its cache lines: neighbours locked by other cores do not slow it.
pub(super) type Shard<V> = CachePadded<Mutex<FastMap<Arc<str>, V>>>;

/// Per-key and per-org state in 64 mutex-guarded shards each.
pub(super) struct Shards<V> {
    keys: Vec<Shard<V>>,
    orgs: Vec<Shard<V>>,
}

impl<V: Default> Default for Shards<V> {
    fn default() -> Self {
        let shards = || (0..SHARDS).map(|_| Shard::default()).collect();
        Self {
            keys: shards(),
            orgs: shards(),
        }
    }
}

impl<V: Default> Shards<V> {
    /// Runs `f` on the key's and the org's entries, both locked.
    pub(super) fn with<R>(
        &self,
        key_id: &str,
        org_id: &str,
        f: impl FnOnce(&mut V, &mut V) -> R,
    ) -> R {
        // Lock order is always key shard, then org shard: no deadlock.
        let mut keys = self.keys[shard_of(key_id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut orgs = self.orgs[shard_of(org_id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(entry(&mut keys, key_id), entry(&mut orgs, org_id))
    }
}

/// The shard of an id: the map's hash of it, from its high bits (the map uses the low ones).
fn shard_of(id: &str) -> usize {
    let hash = foldhash::fast::FixedState::default().hash_one(id);
    ((hash >> 32) as usize) % SHARDS
}

pub(super) fn entry<'a, V: Default>(map: &'a mut FastMap<Arc<str>, V>, id: &str) -> &'a mut V {
    if !map.contains_key(id) {
        map.insert(Arc::from(id), V::default());
    }
    map.get_mut(id).expect("inserted above")
}

/// One key's or org's three counters behind their own lock, alone on their cache lines.
#[derive(Debug, Default)]
pub struct CounterCell(CachePadded<Mutex<[Counter; 3]>>);

impl CounterCell {
    pub(super) fn lock(&self) -> MutexGuard<'_, [Counter; 3]> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A key's and its org's counters, looked up once and kept with the key (see
/// [`LocalLimiter::cells`]), so a decision takes two locks and looks nothing up.
#[derive(Debug, Clone)]
pub struct LimitCells {
    limiter: usize,
    pub(super) key: Arc<CounterCell>,
    org: Arc<CounterCell>,
}

static NEXT_LOCAL_LIMITER: AtomicUsize = AtomicUsize::new(0);

/// Counters held in this process.
pub struct LocalLimiter {
    id: usize,
    counters: Shards<Arc<CounterCell>>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self {
            id: NEXT_LOCAL_LIMITER.fetch_add(1, Ordering::Relaxed),
            counters: Shards::default(),
        }
    }
}

impl LocalLimiter {
    /// Decides and, when allowed, counts the request against all six counters at once.
    pub fn check(&self, key_id: &str, org_id: &str, limits: Limits, now_ms: u64) -> Decision {
        self.check_cells(&self.cells(key_id, org_id), limits, now_ms)
    }

    /// The key's and org's counters, created on first use. The same cells for the same ids
    /// whoever asks, so a key record built by a config reload counts on where the last left off.
    pub fn cells(&self, key_id: &str, org_id: &str) -> LimitCells {
        self.counters.with(key_id, org_id, |key, org| LimitCells {
            limiter: self.id,
            key: key.clone(),
            org: org.clone(),
        })
    }

    /// Whether `cells` came from this limiter.
    pub fn owns(&self, cells: &LimitCells) -> bool {
        cells.limiter == self.id
    }

    /// [`Self::check`] on cells from [`Self::cells`].
    pub fn check_cells(&self, cells: &LimitCells, limits: Limits, now_ms: u64) -> Decision {
        debug_assert!(self.owns(cells));
        // Lock order is always key, then org: no deadlock.
        let mut key_counters = cells.key.lock();
        let mut org_counters = cells.org.lock();
        let mut observed = [Observed::default(); COUNTERS];
        for (i, w) in Window::ALL.iter().enumerate() {
            let (index, _) = position(*w, now_ms);
            for (base, counters) in [(0, &mut *key_counters), (3, &mut *org_counters)] {
                counters[i].roll(index);
                observed[base + i] = Observed {
                    current: counters[i].current,
                    previous: counters[i].previous,
                };
            }
        }
        let decision = decide(limits, &observed, now_ms);
        if decision.allowed {
            for i in 0..3 {
                key_counters[i].current += 1;
                org_counters[i].current += 1;
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards are picked from the map hash's high bits: distinct ids spread over all of them,
    /// and the same id always lands on the same one.
    #[test]
    fn ids_spread_over_every_shard_and_an_id_keeps_its_shard() {
        let mut counts = [0usize; SHARDS];
        for i in 0..10_000 {
            counts[shard_of(&format!("org-{i}"))] += 1;
        }
        // 10,000 ids over 64 shards: about 156 each; none empty, none holding a double share.
        assert!(
            counts.iter().all(|&n| n > 0 && n < 2 * 10_000 / SHARDS),
            "{counts:?}"
        );
        assert_eq!(shard_of("org-7"), shard_of(&String::from("org-7")));
        let build = foldhash::fast::FixedState::default();
        let ids: std::collections::HashSet<u64> = (0..10_000)
            .map(|i| build.hash_one(format!("key-{i}")))
            .collect();
        assert_eq!(ids.len(), 10_000, "no two ids hash alike");
    }
}
