//! Rate limits per API key and per org over three windows: a 10-second burst, a minute and a
//! (UTC calendar) day.
//!
//! All six counters are decided together and counted only when every one allows the request, so
//! a request is never refused by one window yet counted in another. The 10-second and minute
//! windows are sliding-window counters (the previous window's count weighted by how much of it
//! still overlaps), which avoids the 2x burst a fixed window allows at its boundary; the day is
//! a fixed UTC day because quotas are sold that way.
//!
//! The decision is a pure function of the observed counts and the clock; the in-memory and Redis
//! backends only fetch and bump counts. Redis does both in one script call, so replicas share
//! limits in one round trip.
//!
//! With Redis, a replica does not make that round trip for every request: each call leases a
//! block of each counter (1% of its limit, at most an eighth of what is left in the window, at
//! least one), counted in Redis at once, and the replica spends the block from memory until it
//! runs out or the window moves on. Replicas therefore never admit more than the limit between
//! them; what a replica leased and did not use is lost for that window, at most about two
//! blocks per counter and replica. Limits under 100 lease one request at a time (exact), and as
//! a window fills up the blocks shrink to one, so the last requests before a limit are decided
//! one by one by Redis.
//!
//! Here: the pure decision. `local` keeps counters in this process, `lease` the blocks leased
//! from Redis, `redis` the script and its call and reply; `super::limiter` picks between them.

use crate::crd::gateway::WindowLimits;

mod lease;
mod local;
mod redis;

pub use lease::{lease_wants, Ask, LeaseTable, Take};
pub use local::{CounterCell, LimitCells, LocalLimiter};
pub use redis::{redis_call, redis_grant, Grant, REDIS_SCRIPT};

/// Counters per decision: (key, org) × (burst, minute, day).
pub const COUNTERS: usize = 6;

/// A limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Burst10s,
    Minute,
    Day,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Burst10s, Window::Minute, Window::Day];

    pub fn length_ms(self) -> u64 {
        match self {
            Window::Burst10s => 10_000,
            Window::Minute => 60_000,
            Window::Day => 86_400_000,
        }
    }

    fn sliding(self) -> bool {
        !matches!(self, Window::Day)
    }

    /// Metric label and policy-name suffix.
    pub fn label(self) -> &'static str {
        match self {
            Window::Burst10s => "burst",
            Window::Minute => "minute",
            Window::Day => "day",
        }
    }
}

/// Whose counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Key,
    Org,
}

impl Subject {
    pub fn label(self) -> &'static str {
        match self {
            Subject::Key => "key",
            Subject::Org => "org",
        }
    }
}

fn slot(i: usize) -> (Subject, Window) {
    let subject = if i < 3 { Subject::Key } else { Subject::Org };
    (subject, Window::ALL[i % 3])
}

/// The six limits of one request, in slot order (key burst, minute, day; org burst, minute, day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits(pub [u64; COUNTERS]);

impl Limits {
    /// Key and org limits of a tier; `daily_quota` overrides the key's per-day limit.
    pub fn new(per_key: &WindowLimits, per_org: &WindowLimits, daily_quota: Option<u64>) -> Self {
        Self([
            per_key.burst10s,
            per_key.per_minute,
            daily_quota.unwrap_or(per_key.per_day),
            per_org.burst10s,
            per_org.per_minute,
            per_org.per_day,
        ])
    }
}

/// Counts seen for one counter: this window's and the previous one's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    pub current: u64,
    pub previous: u64,
}

/// The verdict and what the client is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The first window that refused, when not allowed.
    pub blocked: Option<(Subject, Window)>,
    /// Seconds until a retry can succeed (when blocked).
    pub retry_after_secs: u64,
    /// The most restrictive counter after this request: (subject, window, limit, remaining, reset).
    pub tightest: (Subject, Window, u64, u64, u64),
    pub limits: Limits,
}

impl Decision {
    /// `RateLimit-Policy` value (IETF draft-ietf-httpapi-ratelimit-headers): all six policies.
    pub fn policy_header(&self) -> String {
        let mut out = String::with_capacity(160);
        for (i, q) in self.limits.0.iter().enumerate() {
            let (s, w) = slot(i);
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!(
                "\"{}-{}\";q={};w={}",
                s.label(),
                w.label(),
                q,
                w.length_ms() / 1000
            ));
        }
        out
    }

    /// `RateLimit` value: the policy closest to refusing.
    pub fn ratelimit_header(&self) -> String {
        // Sent on every response: built by hand, without the formatting machinery.
        let (s, w, _, remaining, reset) = self.tightest;
        let mut numbers = itoa::Buffer::new();
        let mut out = String::with_capacity(48);
        out.push('"');
        out.push_str(s.label());
        out.push('-');
        out.push_str(w.label());
        out.push_str("\";r=");
        out.push_str(numbers.format(remaining));
        out.push_str(";t=");
        out.push_str(numbers.format(reset));
        out
    }
}

/// Position of `now_ms` in a window: (window index, ms elapsed in it).
fn position(window: Window, now_ms: u64) -> (u64, u64) {
    // One arm per window: each divides by a constant, which compiles to a multiplication.
    match window {
        Window::Burst10s => (now_ms / 10_000, now_ms % 10_000),
        Window::Minute => (now_ms / 60_000, now_ms % 60_000),
        Window::Day => (now_ms / 86_400_000, now_ms % 86_400_000),
    }
}

fn estimate(window: Window, obs: Observed, elapsed_ms: u64) -> f64 {
    if window.sliding() {
        let weight = 1.0 - elapsed_ms as f64 / window.length_ms() as f64;
        obs.previous as f64 * weight + obs.current as f64
    } else {
        obs.current as f64
    }
}

/// Milliseconds until one more request fits under `limit`.
fn wait_ms(window: Window, obs: Observed, elapsed_ms: u64, limit: u64) -> u64 {
    let len = window.length_ms() as f64;
    let e = elapsed_ms as f64;
    let (p, c, l) = (obs.previous as f64, obs.current as f64, limit as f64);
    if !window.sliding() {
        return window.length_ms() - elapsed_ms;
    }
    if c + 1.0 <= l {
        // Wait until enough of the previous window has slid out.
        if p <= 0.0 {
            return 0;
        }
        let t = len * (1.0 - (l - 1.0 - c) / p) - e;
        t.max(0.0).ceil() as u64
    } else {
        // This window alone is full: wait into the next one until this one's weight is low enough.
        let x = if c > 0.0 {
            len * (1.0 - (l - 1.0) / c)
        } else {
            0.0
        };
        ((len - e) + x.max(0.0)).ceil() as u64
    }
}

/// Decides one request from the observed counts (before counting it).
pub fn decide(limits: Limits, observed: &[Observed; COUNTERS], now_ms: u64) -> Decision {
    let mut blocked = None;
    let mut retry_ms = 0;
    let mut tightest: Option<(Subject, Window, u64, u64, u64)> = None;
    for (i, obs) in observed.iter().enumerate() {
        let (subject, window) = slot(i);
        let (_, elapsed) = position(window, now_ms);
        let limit = limits.0[i];
        let est = estimate(window, *obs, elapsed);
        let fits = est + 1.0 <= limit as f64;
        if !fits && blocked.is_none() {
            blocked = Some((subject, window));
        }
        if !fits {
            retry_ms = retry_ms.max(wait_ms(window, *obs, elapsed, limit));
        }
        let after = if fits { est + 1.0 } else { est };
        // Truncation is the floor for the positive case (and needs no libm call).
        let room = limit as f64 - after;
        let remaining = if room > 0.0 { room as u64 } else { 0 };
        let reset = (window.length_ms() - elapsed).div_ceil(1000);
        if tightest.is_none_or(|t| remaining < t.3) {
            tightest = Some((subject, window, limit, remaining, reset));
        }
    }
    let allowed = blocked.is_none();
    Decision {
        allowed,
        blocked,
        retry_after_secs: if allowed {
            0
        } else {
            retry_ms.div_ceil(1000).max(1)
        },
        tightest: tightest.unwrap_or((Subject::Key, Window::Burst10s, 0, 0, 0)),
        limits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(burst: u64, minute: u64, day: u64) -> Limits {
        let k = WindowLimits {
            burst10s: burst,
            per_minute: minute,
            per_day: day,
        };
        let o = WindowLimits {
            burst10s: 1000,
            per_minute: 1000,
            per_day: 100_000,
        };
        Limits::new(&k, &o, None)
    }

    // A fixed instant on a day boundary + 1h, so windows start cleanly.
    const T0: u64 = 1_767_229_200_000;

    #[test]
    fn burst_window_refuses_the_request_over_the_limit_and_says_when_to_retry() {
        let rl = LocalLimiter::default();
        let l = limits(5, 100, 1000);
        for _ in 0..5 {
            assert!(rl.check("k1", "o1", l, T0).allowed);
        }
        let d = rl.check("k1", "o1", l, T0 + 1);
        assert!(!d.allowed);
        assert_eq!(d.blocked, Some((Subject::Key, Window::Burst10s)));
        assert!(d.retry_after_secs >= 1 && d.retry_after_secs <= 20, "{d:?}");
        // After the previous window has fully slid out, requests pass again.
        assert!(rl.check("k1", "o1", l, T0 + 20_000).allowed);
    }

    #[test]
    fn a_refused_request_is_counted_in_no_window() {
        let rl = LocalLimiter::default();
        let l = limits(100, 3, 1000);
        for _ in 0..3 {
            assert!(rl.check("k", "o", l, T0).allowed);
        }
        for _ in 0..10 {
            assert!(!rl.check("k", "o", l, T0 + 100).allowed);
        }
        // The burst and day counters saw exactly the 3 allowed requests.
        let d = rl.check("k", "o", l, T0 + 200);
        assert_eq!(d.tightest.1, Window::Minute);
        let counts = rl.cells("k", "o").key.lock().map(|c| c.current);
        assert_eq!(counts, [3, 3, 3]);
    }

    #[test]
    fn cells_kept_with_a_key_count_with_every_other_way_to_the_same_counters() {
        let rl = LocalLimiter::default();
        let l = limits(100, 5, 1000);
        // A key record built before a reload, one built after, and a lookup by id: one count.
        let (before, after) = (rl.cells("k", "o"), rl.cells("k", "o"));
        assert!(rl.check_cells(&before, l, T0).allowed);
        assert!(rl.check_cells(&after, l, T0).allowed);
        assert!(rl.check("k", "o", l, T0).allowed);
        assert!(rl.check_cells(&rl.cells("k2", "o"), l, T0).allowed);
        assert!(rl.check_cells(&before, l, T0).allowed);
        assert!(rl.check_cells(&after, l, T0).allowed);
        let d = rl.check("k", "o", l, T0);
        assert!(!d.allowed, "5 a minute for the key: the 5th was the last");
        assert_eq!(
            rl.cells("o", "k").key.lock()[0].current,
            0,
            "key and org ids apart"
        );
        assert!(!LocalLimiter::default().owns(&before));
    }

    #[test]
    fn org_limit_applies_across_keys() {
        let rl = LocalLimiter::default();
        let k = WindowLimits {
            burst10s: 100,
            per_minute: 100,
            per_day: 100,
        };
        let o = WindowLimits {
            burst10s: 4,
            per_minute: 100,
            per_day: 100,
        };
        let l = Limits::new(&k, &o, None);
        for i in 0..4 {
            assert!(rl.check(&format!("key{i}"), "org", l, T0).allowed);
        }
        let d = rl.check("key9", "org", l, T0);
        assert_eq!(d.blocked, Some((Subject::Org, Window::Burst10s)));
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let l = limits(10, 1000, 100_000);
        let mut obs = [Observed::default(); COUNTERS];
        obs[0] = Observed {
            current: 0,
            previous: 10,
        };
        // 1s into the new window, 90% of the previous 10 still count: 9 + 1 = 10 fits.
        let at = (T0 / 10_000) * 10_000 + 1_000;
        assert!(decide(l, &obs, at).allowed);
        obs[0].current = 1;
        let d = decide(l, &obs, at);
        assert!(!d.allowed);
        // 2s in: 8 + 1 + 1 = 10 fits; the retry hint points about there.
        assert!(d.retry_after_secs >= 1 && d.retry_after_secs <= 2, "{d:?}");
        assert!(decide(l, &obs, at + 1_000).allowed);
    }

    #[test]
    fn daily_quota_resets_at_utc_midnight_and_overrides_the_tier() {
        let k = WindowLimits {
            burst10s: 100,
            per_minute: 100,
            per_day: 1000,
        };
        let o = k.clone();
        let l = Limits::new(&k, &o, Some(2));
        let rl = LocalLimiter::default();
        let late = (T0 / 86_400_000 + 1) * 86_400_000 - 30_000; // 23:59:30
        assert!(rl.check("k", "o", l, late).allowed);
        assert!(rl.check("k", "o", l, late + 11_000).allowed);
        let d = rl.check("k", "o", l, late + 22_000);
        assert_eq!(d.blocked, Some((Subject::Key, Window::Day)));
        assert_eq!(d.retry_after_secs, 8);
        assert!(rl.check("k", "o", l, late + 31_000).allowed);
    }

    #[test]
    fn headers_follow_the_ietf_draft_syntax() {
        let l = limits(5, 100, 1000);
        let d = decide(l, &[Observed::default(); COUNTERS], T0);
        assert!(d
            .policy_header()
            .starts_with("\"key-burst\";q=5;w=10, \"key-minute\";q=100;w=60"));
        assert_eq!(d.ratelimit_header(), "\"key-burst\";r=4;t=10");
    }

    #[test]
    fn redis_call_and_reply_round_trip() {
        let l = limits(5, 100, 1000);
        let (keys, argv) = redis_call("k", "o", l, T0, &lease_wants(l));
        assert_eq!(keys.len(), 12);
        assert_eq!(argv.len(), 24);
        assert!(keys[0].starts_with("apitree:rl:key:k:burst:"));
        // Blocks asked: 1% of each limit, at least one.
        assert_eq!(argv[18..], ["1", "1", "10", "10", "10", "1000"]);
        let reply = [
            1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 10, 10, 10, 1000,
        ];
        let grant = redis_grant(&reply).unwrap();
        assert!(grant.allowed);
        assert_eq!(
            grant.observed[0],
            Observed {
                current: 2,
                previous: 3
            }
        );
        assert_eq!(grant.granted[5], 1000);
        assert!(redis_grant(&[1]).is_none());
    }

    fn ask(table: &LeaseTable, key: &str, l: Limits, now: u64) -> Ask {
        match table.take(key, "o", l, now) {
            Take::Ask(ask) => ask,
            Take::Decided(d) => panic!("decided without Redis: {d:?}"),
        }
    }

    fn admitted(table: &LeaseTable, key: &str, l: Limits, now: u64) -> Decision {
        match table.take(key, "o", l, now) {
            Take::Decided(d) => d,
            Take::Ask(a) => panic!("asked Redis for {:?}", a.wants),
        }
    }

    fn granted(observed: [Observed; COUNTERS], granted: [u64; COUNTERS]) -> Grant {
        Grant {
            allowed: true,
            observed,
            granted,
        }
    }

    const BIG: (u64, u64, u64) = (10_000, 100_000, 1_000_000);

    #[test]
    fn a_leased_block_admits_requests_without_asking_again_until_it_is_spent() {
        let table = LeaseTable::default();
        let l = limits(BIG.0, BIG.1, BIG.2);
        let a = ask(&table, "k", l, T0);
        assert_eq!(
            a.wants,
            lease_wants(l),
            "nothing leased yet: every counter asks"
        );
        let d = table.record(
            "k",
            "o",
            l,
            T0,
            &a,
            &granted(Default::default(), [3, 4, 5, 6, 7, 8]),
        );
        assert!(d.allowed);
        // The smallest block (3) held two more requests after the one that asked.
        let d = admitted(&table, "k", l, T0 + 1);
        assert!(d.allowed);
        // Headers count leased-but-unadmitted requests as free: the org's burst window (limit
        // 1000) has admitted 2 requests of the 6 it leased.
        assert_eq!(d.tightest.0, Subject::Org);
        assert_eq!(d.tightest.3, 998);
        assert!(admitted(&table, "k", l, T0 + 2).allowed);
        // Only the spent counter asks again; the others hold a leased request for this one.
        let a = ask(&table, "k", l, T0 + 3);
        assert_eq!(a.wants, [100, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_new_burst_window_asks_for_the_burst_counters_only() {
        let table = LeaseTable::default();
        let l = limits(BIG.0, BIG.1, BIG.2);
        let start = (T0 / 60_000) * 60_000 + 9_000;
        let a = ask(&table, "k", l, start);
        table.record(
            "k",
            "o",
            l,
            start,
            &a,
            &granted(Default::default(), [50; 6]),
        );
        assert!(admitted(&table, "k", l, start + 999).allowed);
        // A new 10-second window needs a new burst lease; the minute and day leases go on
        // (asking for them again would waste a block of each every 10 seconds).
        let a = ask(&table, "k", l, start + 1_000);
        assert_eq!(a.wants, [100, 0, 0, 10, 0, 0]);
    }

    #[test]
    fn a_refused_ask_gives_back_the_leased_requests_it_held() {
        let table = LeaseTable::default();
        let l = limits(BIG.0, BIG.1, BIG.2);
        let a = ask(&table, "k", l, T0);
        table.record(
            "k",
            "o",
            l,
            T0,
            &a,
            &granted(Default::default(), [1, 3, 3, 3, 3, 3]),
        );
        let a = ask(&table, "k", l, T0 + 1);
        assert_eq!(a.wants[0], 100);
        let mut full = [Observed::default(); COUNTERS];
        full[0].current = BIG.0;
        let refused = Grant {
            allowed: false,
            observed: full,
            granted: [0; COUNTERS],
        };
        let d = table.record("k", "o", l, T0 + 1, &a, &refused);
        assert_eq!(d.blocked, Some((Subject::Key, Window::Burst10s)));
        // The held requests went back to their leases: the next ask holds them again.
        let a = ask(&table, "k", l, T0 + 2_000);
        assert_eq!(a.wants, [100, 0, 0, 0, 0, 0]);
        table.release("k", "o", &a);
        let a = ask(&table, "k", l, T0 + 2_000);
        table.record(
            "k",
            "o",
            l,
            T0 + 2_000,
            &a,
            &granted(Default::default(), [5, 0, 0, 0, 0, 0]),
        );
        assert!(admitted(&table, "k", l, T0 + 2_001).allowed);
    }

    #[test]
    fn org_leases_are_shared_by_the_org_s_keys() {
        let table = LeaseTable::default();
        let l = limits(BIG.0, BIG.1, BIG.2);
        let blocks = [10, 10, 10, 2, 10, 10];
        let a = ask(&table, "k1", l, T0);
        table.record("k1", "o", l, T0, &a, &granted(Default::default(), blocks));
        // k2 finds the org's leases and asks for its own key counters only.
        let a = ask(&table, "k2", l, T0);
        assert_eq!(a.wants, [100, 1_000, 10_000, 0, 0, 0]);
        table.record(
            "k2",
            "o",
            l,
            T0,
            &a,
            &granted(Default::default(), [10, 10, 10, 0, 0, 0]),
        );
        // The org burst lease (2) went to k1's asking request and k2's: nothing left.
        assert_eq!(ask(&table, "k1", l, T0).wants, [0, 0, 0, 10, 0, 0]);
    }

    #[test]
    fn a_refusal_by_redis_is_repeated_locally_for_a_second_at_most() {
        let table = LeaseTable::default();
        let l = limits(5, 100, 1000);
        let mut full = [Observed::default(); COUNTERS];
        full[1].current = 100; // the key's minute is used up
        let refused = Grant {
            allowed: false,
            observed: full,
            granted: [0; COUNTERS],
        };
        let a = ask(&table, "k", l, T0);
        let d = table.record("k", "o", l, T0, &a, &refused);
        assert_eq!(d.blocked, Some((Subject::Key, Window::Minute)));
        let again = admitted(&table, "k", l, T0 + 500);
        assert!(!again.allowed);
        assert!(again.retry_after_secs >= 1);
        ask(&table, "k", l, T0 + 1_000);
    }
}
