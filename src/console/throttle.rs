//! Sign-in throttling: failed sign-ins are counted per account (email) and per client address
//! in a fixed window; past the limit, sign-ins are refused (429 with Retry-After) until the
//! window ends, before any password is checked. A successful sign-in clears its account's
//! count. Counts live in this console's memory: each replica throttles on its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits of the throttle.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_account: u32,
    pub per_address: u32,
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_account: 5,
            per_address: 20,
            window: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Clone, Copy)]
struct Count {
    since: Instant,
    failures: u32,
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

struct Counts<K> {
    map: HashMap<K, Count>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts {
            map: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Counts<K> {
    fn current(&mut self, key: &K, now: Instant, window: Duration) -> Option<Count> {
        match self.map.get(key) {
            Some(c) if now.duration_since(c.since) < window => Some(*c),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    fn fail(&mut self, key: &K, now: Instant, window: Duration) {
        if self.map.len() >= SWEEP_AT {
            self.map.retain(|_, c| now.duration_since(c.since) < window);
        }
        let c = self.current(key, now, window).unwrap_or(Count {
            since: now,
            failures: 0,
        });
        self.map.insert(
            key.clone(),
            Count {
                failures: c.failures.saturating_add(1),
                ..c
            },
        );
    }
}

/// Which limit refused a sign-in, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub by: &'static str,
    pub retry_after: Duration,
}

pub struct Throttle {
    limits: Limits,
    inner: Mutex<(Counts<String>, Counts<IpAddr>)>,
}

impl Throttle {
    pub fn new(limits: Limits) -> Self {
        Throttle {
            limits,
            inner: Mutex::new((Counts::default(), Counts::default())),
        }
    }

    fn account_key(email: &str) -> String {
        email.trim().to_lowercase()
    }

    /// Whether a sign-in for `email` from `addr` may be tried now.
    pub fn check(&self, email: &str, addr: IpAddr, now: Instant) -> Result<(), Throttled> {
        let w = self.limits.window;
        let mut g = self.inner.lock().unwrap();
        let left = |c: Count| {
            w.saturating_sub(now.duration_since(c.since))
                .max(Duration::from_secs(1))
        };
        if let Some(c) = g.1.current(&addr, now, w) {
            if c.failures >= self.limits.per_address {
                return Err(Throttled {
                    by: "address",
                    retry_after: left(c),
                });
            }
        }
        if let Some(c) = g.0.current(&Self::account_key(email), now, w) {
            if c.failures >= self.limits.per_account {
                return Err(Throttled {
                    by: "account",
                    retry_after: left(c),
                });
            }
        }
        Ok(())
    }

    /// Counts a failed sign-in.
    pub fn failed(&self, email: &str, addr: IpAddr, now: Instant) {
        let w = self.limits.window;
        let mut g = self.inner.lock().unwrap();
        g.0.fail(&Self::account_key(email), now, w);
        g.1.fail(&addr, now, w);
    }

    /// A successful sign-in clears the account's count (not the address's).
    pub fn succeeded(&self, email: &str) {
        self.inner
            .lock()
            .unwrap()
            .0
            .map
            .remove(&Self::account_key(email));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn an_account_locks_after_its_limit_from_any_address_until_the_window_ends() {
        let t = Throttle::new(Limits {
            per_account: 3,
            per_address: 100,
            window: Duration::from_secs(60),
        });
        let start = Instant::now();
        for n in 0..3 {
            assert!(t.check("A@x.io", ip(n), start).is_ok());
            t.failed("A@x.io", ip(n), start);
        }
        // Case and spaces do not make another account.
        let refused = t
            .check(" a@X.io", ip(9), start + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(refused.by, "account");
        assert_eq!(refused.retry_after, Duration::from_secs(50));
        // Another account from the same addresses is fine.
        assert!(t.check("b@x.io", ip(0), start).is_ok());
        // The window ends.
        assert!(t
            .check("a@x.io", ip(9), start + Duration::from_secs(60))
            .is_ok());
    }

    #[test]
    fn an_address_locks_across_accounts_and_success_clears_only_the_account() {
        let t = Throttle::new(Limits {
            per_account: 100,
            per_address: 4,
            window: Duration::from_secs(60),
        });
        let now = Instant::now();
        for n in 0..4 {
            t.failed(&format!("user{n}@x.io"), ip(1), now);
        }
        assert_eq!(t.check("new@x.io", ip(1), now).unwrap_err().by, "address");
        assert!(t.check("new@x.io", ip(2), now).is_ok());
        t.succeeded("user0@x.io");
        assert_eq!(t.check("user0@x.io", ip(1), now).unwrap_err().by, "address");
    }

    #[test]
    fn success_resets_an_accounts_count() {
        let t = Throttle::new(Limits {
            per_account: 2,
            per_address: 100,
            window: Duration::from_secs(60),
        });
        let now = Instant::now();
        t.failed("a@x.io", ip(1), now);
        t.succeeded("a@x.io");
        t.failed("a@x.io", ip(1), now);
        assert!(t.check("a@x.io", ip(1), now).is_ok());
        t.failed("a@x.io", ip(1), now);
        assert!(t.check("a@x.io", ip(1), now).is_err());
    }
}
