//! Sign-in throttling: sign-ins are counted per account (email) and per client address (an
//! IPv6 client's /64) in a fixed window as they start, and a success takes its count back;
//! past the limit, sign-ins are refused (429 with Retry-After) until the window ends, before
//! any password is checked. A successful sign-in clears its account's count. Counts live in
//! this console's memory: each replica throttles on its own.

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

/// Entries kept at most, per map: many client networks each trying many emails cannot grow a
/// console's memory past some tens of MiB. Past it, the tenth with the fewest failures (the
/// oldest among equals) goes first, so the counts that are refusing sign-ins now stay.
const MAX_ENTRIES: usize = 50_000;

struct Counts<K> {
    map: HashMap<K, Count>,
    /// The size at which expired entries are swept next: twice what the last sweep left, so
    /// a map of many live entries is not scanned on every attempt.
    sweep_at: usize,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts {
            map: HashMap::new(),
            sweep_at: SWEEP_AT,
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

    fn take_back(&mut self, key: &K, now: Instant, window: Duration) {
        if let Some(c) = self.current(key, now, window) {
            self.map.insert(
                key.clone(),
                Count {
                    failures: c.failures.saturating_sub(1),
                    ..c
                },
            );
        }
    }

    fn fail(&mut self, key: &K, now: Instant, window: Duration) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, c| now.duration_since(c.since) < window);
            self.sweep_at = SWEEP_AT.max(self.map.len() * 2);
        }
        if self.map.len() >= MAX_ENTRIES && !self.map.contains_key(key) {
            let mut by_weight: Vec<(u32, Instant, K)> = self
                .map
                .iter()
                .map(|(k, c)| (c.failures, c.since, k.clone()))
                .collect();
            let cut = MAX_ENTRIES / 10;
            by_weight.select_nth_unstable_by(cut, |a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            for (_, _, k) in &by_weight[..cut] {
                self.map.remove(k);
            }
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

    /// ASCII lower case, as the database compares emails (accounts are ASCII); any other
    /// character is kept as it is, so `İ` is not `i` here and matches no account there.
    fn account_key(email: &str) -> String {
        email.trim().to_ascii_lowercase()
    }

    /// The address a count belongs to: an IPv6 client owns its whole /64 (one host can pick
    /// any address in it), an IPv4-mapped address is its IPv4 one.
    fn address_key(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut s = v6.segments();
                    s[4..].fill(0);
                    IpAddr::from(s)
                }
            },
        }
    }

    /// Starts a sign-in for `account` (if it names one) from `addr`: refused when either has
    /// used its attempts in this window, else counted as failed until [`Throttle::succeeded`]
    /// says otherwise. Counting before the password is checked means concurrent attempts
    /// cannot all pass one check.
    pub fn begin(
        &self,
        account: Option<&str>,
        addr: IpAddr,
        now: Instant,
    ) -> Result<(), Throttled> {
        let w = self.limits.window;
        let addr = Self::address_key(addr);
        let account = account.map(Self::account_key);
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
        if let Some(key) = &account {
            if let Some(c) = g.0.current(key, now, w) {
                if c.failures >= self.limits.per_account {
                    return Err(Throttled {
                        by: "account",
                        retry_after: left(c),
                    });
                }
            }
            g.0.fail(key, now, w);
        }
        g.1.fail(&addr, now, w);
        Ok(())
    }

    /// A sign-in that [`Throttle::begin`] counted succeeded: the account's count is cleared
    /// and the address gets its attempt back.
    pub fn succeeded(&self, account: Option<&str>, addr: IpAddr, now: Instant) {
        let w = self.limits.window;
        let mut g = self.inner.lock().unwrap();
        if let Some(account) = account {
            g.0.map.remove(&Self::account_key(account));
        }
        g.1.take_back(&Self::address_key(addr), now, w);
    }

    /// A sign-in that [`Throttle::begin`] counted was never tried (the console was too busy
    /// to check it): the account and the address both get the attempt back.
    pub fn not_tried(&self, account: Option<&str>, addr: IpAddr, now: Instant) {
        let w = self.limits.window;
        let mut g = self.inner.lock().unwrap();
        if let Some(account) = account {
            g.0.take_back(&Self::account_key(account), now, w);
        }
        g.1.take_back(&Self::address_key(addr), now, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn limits(per_account: u32, per_address: u32) -> Limits {
        Limits {
            per_account,
            per_address,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn an_account_locks_after_its_limit_from_any_address_until_the_window_ends() {
        let t = Throttle::new(limits(3, 100));
        let start = Instant::now();
        for n in 0..3 {
            assert!(t.begin(Some("A@x.io"), ip(n), start).is_ok());
        }
        // Case and spaces do not make another account.
        let refused = t
            .begin(Some(" a@X.io"), ip(9), start + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(refused.by, "account");
        assert_eq!(refused.retry_after, Duration::from_secs(50));
        // Another account from the same addresses is fine.
        assert!(t.begin(Some("b@x.io"), ip(0), start).is_ok());
        // The window ends.
        assert!(t
            .begin(Some("a@x.io"), ip(9), start + Duration::from_secs(60))
            .is_ok());
    }

    #[test]
    fn attempts_in_flight_count_so_a_burst_gets_no_more_than_the_limit() {
        let t = Throttle::new(limits(5, 100));
        let now = Instant::now();
        // Fifty sign-ins start before any finishes: five get to check a password.
        let started = (0..50)
            .filter(|n| t.begin(Some("a@x.io"), ip(*n as u8), now).is_ok())
            .count();
        assert_eq!(started, 5);
    }

    #[test]
    fn an_address_locks_across_accounts_and_success_clears_only_the_account() {
        let t = Throttle::new(limits(100, 4));
        let now = Instant::now();
        for n in 0..4 {
            t.begin(Some(&format!("user{n}@x.io")), ip(1), now).unwrap();
        }
        assert_eq!(
            t.begin(Some("new@x.io"), ip(1), now).unwrap_err().by,
            "address"
        );
        assert!(t.begin(Some("new@x.io"), ip(2), now).is_ok());
        // One of the four succeeded after all: the address gets that attempt back.
        t.succeeded(Some("user0@x.io"), ip(1), now);
        assert!(t.begin(None, ip(1), now).is_ok());
        assert_eq!(t.begin(None, ip(1), now).unwrap_err().by, "address");
    }

    #[test]
    fn an_attempt_never_tried_is_given_back_to_the_account_and_the_address() {
        let t = Throttle::new(limits(1, 1));
        let now = Instant::now();
        t.begin(Some("a@x.io"), ip(1), now).unwrap();
        t.not_tried(Some("a@x.io"), ip(1), now);
        assert!(t.begin(Some("a@x.io"), ip(1), now).is_ok());
    }

    #[test]
    fn success_resets_an_accounts_count() {
        let t = Throttle::new(limits(2, 100));
        let now = Instant::now();
        t.begin(Some("a@x.io"), ip(1), now).unwrap();
        t.begin(Some("a@x.io"), ip(1), now).unwrap();
        t.succeeded(Some("a@x.io"), ip(1), now);
        t.begin(Some("a@x.io"), ip(1), now).unwrap();
        t.begin(Some("a@x.io"), ip(1), now).unwrap();
        assert!(t.begin(Some("a@x.io"), ip(1), now).is_err());
    }

    /// Sign-ins from ever new networks for ever new emails within one window: the counts stay
    /// bounded, and an account being guessed at (and the address guessing) stays refused.
    #[test]
    fn many_networks_and_emails_cannot_grow_the_counts_or_wash_out_a_lock() {
        let t = Throttle::new(limits(3, 3));
        let now = Instant::now();
        for n in 0..3 {
            t.begin(Some("target@x.io"), ip(200), now + Duration::from_millis(n))
                .unwrap();
        }
        for n in 0..(MAX_ENTRIES as u32 * 2) {
            let net = IpAddr::from(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                (n >> 16) as u16,
                n as u16,
                0,
                0,
                0,
                1,
            ));
            t.begin(
                Some(&format!("filler{n}@x.io")),
                net,
                now + Duration::from_secs(1),
            )
            .unwrap();
        }
        let g = t.inner.lock().unwrap();
        assert!(g.0.map.len() <= MAX_ENTRIES && g.1.map.len() <= MAX_ENTRIES);
        drop(g);
        let later = now + Duration::from_secs(2);
        assert_eq!(
            t.begin(Some("target@x.io"), ip(9), later).unwrap_err().by,
            "account"
        );
        assert_eq!(t.begin(None, ip(200), later).unwrap_err().by, "address");
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_client_is_its_ipv4_address() {
        let t = Throttle::new(limits(100, 2));
        let now = Instant::now();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        t.begin(None, v6("2001:db8:1:2::1"), now).unwrap();
        t.begin(None, v6("2001:db8:1:2:ffff:1:2:3"), now).unwrap();
        assert!(t.begin(None, v6("2001:db8:1:2:dead::beef"), now).is_err());
        assert!(
            t.begin(None, v6("2001:db8:1:3::1"), now).is_ok(),
            "another /64"
        );
        t.begin(None, ip(7), now).unwrap();
        t.begin(None, v6("::ffff:10.0.0.7"), now).unwrap();
        assert!(t.begin(None, ip(7), now).is_err());
    }
}
