//! Blocks of quota leased from Redis, per key and org: a replica spends them from memory and
//! asks Redis again only when a block is spent or its window moves on.

use super::local::Shards;
use super::redis::Grant;
use super::{decide, position, Decision, Limits, Observed, Window, COUNTERS};

/// Requests this replica may admit on one counter without asking Redis: granted for one
/// window, already counted there.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Lease {
    index: u64,
    tokens: u64,
    /// Redis's counts right after the last grant (the current count includes every grant).
    seen: Observed,
}

#[derive(Debug, Default)]
pub(super) struct Leases {
    windows: [Lease; 3],
    /// The key's last refusal by Redis: until when it stands and the counts it saw.
    refusal: Option<(u64, [Observed; COUNTERS])>,
}

/// How long a refusal by Redis is repeated locally before asking again. Short, because other
/// replicas' unused leases and a config change can free room sooner than the counts say.
pub(super) const REFUSAL_REUSE_MS: u64 = 1_000;

/// Quota leased from the shared store, per key and org.
#[derive(Default)]
pub struct LeaseTable {
    leases: Shards<Leases>,
}

/// Block size asked for per counter: 1% of the limit, at least one request.
pub fn lease_wants(limits: Limits) -> [u64; COUNTERS] {
    limits.0.map(|l| (l / 100).max(1))
}

/// What [`LeaseTable::take`] concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// Decided from leased quota, or from Redis's refusal of a moment ago.
    Decided(Decision),
    /// Redis must be asked for the counters whose lease is spent.
    Ask(Ask),
}

/// A request waiting for Redis: the blocks it asks for, and the leased requests it already
/// holds on the other counters (taken from their leases, so no one else spends them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask {
    /// Block size asked per counter; 0 where the request holds a leased request.
    pub wants: [u64; COUNTERS],
    /// The window index of the leased request held per counter.
    held: [Option<u64>; COUNTERS],
}

impl LeaseTable {
    /// Decides from leased quota alone when every counter has some, else says what to ask
    /// Redis for.
    pub fn take(&self, key_id: &str, org_id: &str, limits: Limits, now_ms: u64) -> Take {
        self.leases.with(key_id, org_id, |key, org| {
            if let Some((until, observed)) = key.refusal {
                if now_ms < until {
                    let decision = decide(limits, &observed, now_ms);
                    if !decision.allowed {
                        return Take::Decided(decision);
                    }
                }
                key.refusal = None;
            }
            let mut observed = [Observed::default(); COUNTERS];
            let mut indexes = [0; COUNTERS];
            let mut covered = [false; COUNTERS];
            for (i, w) in Window::ALL.iter().enumerate() {
                let (index, _) = position(*w, now_ms);
                for (base, leases) in [(0, &*key), (3, &*org)] {
                    let lease = leases.windows[i];
                    indexes[base + i] = index;
                    covered[base + i] = lease.index == index && lease.tokens > 0;
                    // Requests we leased and have not admitted yet are not used.
                    observed[base + i] = Observed {
                        current: lease.seen.current.saturating_sub(lease.tokens),
                        previous: lease.seen.previous,
                    };
                }
            }
            for i in 0..3 {
                for (base, leases) in [(0, &mut *key), (3, &mut *org)] {
                    if covered[base + i] {
                        leases.windows[i].tokens -= 1;
                    }
                }
            }
            if covered.iter().all(|c| *c) {
                // Within its window a lease stays valid (room only grows as the previous
                // window slides out), so this is an admission; decide() gives the headers.
                return Take::Decided(Decision {
                    allowed: true,
                    ..decide(limits, &observed, now_ms)
                });
            }
            let blocks = lease_wants(limits);
            let mut ask = Ask {
                wants: [0; COUNTERS],
                held: [None; COUNTERS],
            };
            for i in 0..COUNTERS {
                if covered[i] {
                    ask.held[i] = Some(indexes[i]);
                } else {
                    ask.wants[i] = blocks[i];
                }
            }
            Take::Ask(ask)
        })
    }

    /// Records Redis's answer to `ask`: the request takes one of each granted block and the
    /// rest is kept for the next requests; refused, it gives back what it held.
    pub fn record(
        &self,
        key_id: &str,
        org_id: &str,
        limits: Limits,
        now_ms: u64,
        ask: &Ask,
        grant: &Grant,
    ) -> Decision {
        self.leases.with(key_id, org_id, |key, org| {
            let mut observed = grant.observed;
            for (i, w) in Window::ALL.iter().enumerate() {
                let (index, _) = position(*w, now_ms);
                for (base, leases) in [(0, &mut *key), (3, &mut *org)] {
                    let c = base + i;
                    let lease = &mut leases.windows[i];
                    if let Some(held) = ask.held[c] {
                        if lease.index == held {
                            // Redis's count includes the rest of our lease and the request
                            // this one holds: neither is used yet.
                            observed[c].current =
                                observed[c].current.saturating_sub(lease.tokens + 1);
                            if !grant.allowed {
                                lease.tokens += 1;
                            }
                        }
                        continue;
                    }
                    if !grant.allowed {
                        continue;
                    }
                    if lease.index != index {
                        *lease = Lease {
                            index,
                            ..Lease::default()
                        };
                    }
                    let granted = grant.granted[c];
                    lease.tokens += granted.saturating_sub(1);
                    lease.seen = Observed {
                        current: grant.observed[c].current + granted,
                        previous: grant.observed[c].previous,
                    };
                }
            }
            let decision = decide(limits, &observed, now_ms);
            if !grant.allowed {
                let reuse = (decision.retry_after_secs * 1000).min(REFUSAL_REUSE_MS);
                key.refusal = Some((now_ms + reuse, observed));
            }
            Decision {
                allowed: grant.allowed,
                ..decision
            }
        })
    }

    /// Gives back what `ask` held when Redis could not be asked.
    pub fn release(&self, key_id: &str, org_id: &str, ask: &Ask) {
        self.leases.with(key_id, org_id, |key, org| {
            for i in 0..3 {
                for (base, leases) in [(0, &mut *key), (3, &mut *org)] {
                    let lease = &mut leases.windows[i];
                    if ask.held[base + i] == Some(lease.index) {
                        lease.tokens += 1;
                    }
                }
            }
        })
    }
}
