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

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, Mutex},
};

use crate::crd::gateway::WindowLimits;

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
        let (s, w, _, remaining, reset) = self.tightest;
        format!(
            "\"{}-{}\";r={};t={}",
            s.label(),
            w.label(),
            remaining,
            reset
        )
    }
}

/// Position of `now_ms` in a window: (window index, ms elapsed in it).
fn position(window: Window, now_ms: u64) -> (u64, u64) {
    let len = window.length_ms();
    (now_ms / len, now_ms % len)
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
        let remaining = (limit as f64 - after).floor().max(0.0) as u64;
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

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    index: u64,
    current: u64,
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

const SHARDS: usize = 64;
type Shard = Mutex<HashMap<Arc<str>, [Counter; 3]>>;

/// Counters held in this process.
pub struct LocalLimiter {
    keys: Vec<Shard>,
    orgs: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        let shards = || (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Self {
            keys: shards(),
            orgs: shards(),
            hasher: Default::default(),
        }
    }
}

impl LocalLimiter {
    fn shard<'a>(&self, shards: &'a [Shard], id: &str) -> &'a Shard {
        &shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    /// Decides and, when allowed, counts the request against all six counters at once.
    pub fn check(&self, key_id: &str, org_id: &str, limits: Limits, now_ms: u64) -> Decision {
        // Lock order is always key shard, then org shard: no deadlock.
        let mut keys = self
            .shard(&self.keys, key_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut orgs = self
            .shard(&self.orgs, org_id)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key_counters = entry(&mut keys, key_id);
        let org_counters = entry(&mut orgs, org_id);
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

fn entry<'a>(map: &'a mut HashMap<Arc<str>, [Counter; 3]>, id: &str) -> &'a mut [Counter; 3] {
    if !map.contains_key(id) {
        map.insert(Arc::from(id), [Counter::default(); 3]);
    }
    map.get_mut(id).expect("inserted above")
}

/// The Redis script: reads six (current, previous) pairs, decides with the same rule as
/// [`decide`], and increments all six current counters only when every one allows.
/// KEYS: 12 keys, (current, previous) per counter. ARGV: 6 limits, 6 weights of the previous
/// window (0 for the day window), 6 TTLs in ms.
pub const REDIS_SCRIPT: &str = r#"
local vals = redis.call('MGET', unpack(KEYS))
local allowed = 1
for i = 1, 6 do
  local cur = tonumber(vals[2*i-1]) or 0
  local prev = tonumber(vals[2*i]) or 0
  local est = prev * tonumber(ARGV[6+i]) + cur
  if est + 1 > tonumber(ARGV[i]) then allowed = 0 end
end
if allowed == 1 then
  for i = 1, 6 do
    redis.call('INCR', KEYS[2*i-1])
    redis.call('PEXPIRE', KEYS[2*i-1], ARGV[12+i])
  end
end
local out = {allowed}
for i = 1, 12 do out[i+1] = tonumber(vals[i]) or 0 end
return out
"#;

/// Builds the script's KEYS and ARGV for one request.
pub fn redis_call(
    key_id: &str,
    org_id: &str,
    limits: Limits,
    now_ms: u64,
) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::with_capacity(12);
    let mut weights = Vec::with_capacity(6);
    let mut ttls = Vec::with_capacity(6);
    for i in 0..COUNTERS {
        let (subject, window) = slot(i);
        let id = if subject == Subject::Key {
            key_id
        } else {
            org_id
        };
        let (index, elapsed) = position(window, now_ms);
        let base = format!("apitree:rl:{}:{}:{}", subject.label(), id, window.label());
        keys.push(format!("{base}:{index}"));
        keys.push(format!("{base}:{}", index.saturating_sub(1)));
        let w = if window.sliding() {
            1.0 - elapsed as f64 / window.length_ms() as f64
        } else {
            0.0
        };
        weights.push(format!("{w:.6}"));
        ttls.push((2 * window.length_ms()).to_string());
    }
    let mut argv: Vec<String> = limits.0.iter().map(u64::to_string).collect();
    argv.extend(weights);
    argv.extend(ttls);
    (keys, argv)
}

/// Turns the script's reply into the observed counts.
pub fn redis_observed(reply: &[i64]) -> Option<[Observed; COUNTERS]> {
    if reply.len() != 13 {
        return None;
    }
    let mut out = [Observed::default(); COUNTERS];
    for (i, o) in out.iter_mut().enumerate() {
        *o = Observed {
            current: reply[1 + 2 * i].max(0) as u64,
            previous: reply[2 + 2 * i].max(0) as u64,
        };
    }
    Some(out)
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
        let mut obs = [Observed::default(); COUNTERS];
        {
            let keys = rl.shard(&rl.keys, "k").lock().unwrap();
            for i in 0..3 {
                obs[i].current = keys["k"][i].current;
            }
        }
        assert_eq!(obs[0].current, 3);
        assert_eq!(obs[2].current, 3);
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
        let (keys, argv) = redis_call("k", "o", limits(5, 100, 1000), T0);
        assert_eq!(keys.len(), 12);
        assert_eq!(argv.len(), 18);
        assert!(keys[0].starts_with("apitree:rl:key:k:burst:"));
        let reply = [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let obs = redis_observed(&reply).unwrap();
        assert_eq!(
            obs[0],
            Observed {
                current: 2,
                previous: 3
            }
        );
        assert!(redis_observed(&[1]).is_none());
    }
}
