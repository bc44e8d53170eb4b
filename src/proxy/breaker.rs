//! A circuit breaker per upstream: a small state machine on an injected clock.
//!
//! Closed → Open after `consecutive_failures` failures in a row, or when at least `min_calls`
//! calls in the current 30-second window failed at `failure_ratio` or more. Open refuses calls
//! (fast 503) for `open_for`; then Half-open lets `half_open_probes` calls through: all succeed →
//! Closed, any fails → Open again.
//!
//! A closed breaker with no failure since its last success takes and records calls without its
//! lock: admission reads a mirror of the state, and a success only adds to this thread's slot of
//! a sharded count, which a failure sums under the lock for the ratio. Otherwise the lock's cache
//! line would pass between the worker cores twice per request. Outcomes that complete at the same
//! moment on different cores have no order, so a success racing a failure may not reset the
//! consecutive count; the counts stay exact.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::sharded::ShardedCounter;

use crate::crd::gateway::BreakerSpec;

/// Length of the window the failure ratio is computed over.
const RATIO_WINDOW_MS: u64 = 30_000;

/// Observable breaker state (also the metric value: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }
}

/// Settings in milliseconds and counts.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub consecutive_failures: u32,
    pub failure_ratio: f64,
    pub min_calls: u32,
    pub open_for_ms: u64,
    pub half_open_probes: u32,
}

impl From<&BreakerSpec> for BreakerSettings {
    fn from(s: &BreakerSpec) -> Self {
        Self {
            consecutive_failures: s.consecutive_failures,
            failure_ratio: s.failure_ratio,
            min_calls: s.min_calls,
            open_for_ms: s.open_for.as_std().as_millis() as u64,
            half_open_probes: s.half_open_probes,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive: u32,
    window_start: u64,
    /// The success count when the ratio window started: successes in the window are the
    /// sharded count minus this.
    success_base: u64,
    failures: u32,
    open_until: u64,
    probes_started: u32,
    probes_ok: u32,
    /// Counts the moves to half-open, so a probe permit given back late cannot touch a later
    /// half-open period's count.
    half_open_period: u64,
}

/// What happened on a transition, for metrics and detector events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    /// Mirrors `state == Closed`, so the common admission needs no lock.
    closed: AtomicBool,
    /// Mirrors `state == Closed && consecutive == 0`: a success then only counts.
    quiet: AtomicBool,
    /// Mirrors the end of the ratio window; a success after it rolls the window under the lock.
    window_end: AtomicU64,
    /// Successes recorded since the breaker was made, one slot per thread.
    successes: ShardedCounter,
}

/// Permission to call; report the outcome with [`Breaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    Probe,
    Refused { retry_after_ms: u64 },
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive: 0,
                window_start: 0,
                success_base: 0,
                failures: 0,
                open_until: 0,
                probes_started: 0,
                probes_ok: 0,
                half_open_period: 0,
            }),
            closed: AtomicBool::new(true),
            quiet: AtomicBool::new(true),
            window_end: AtomicU64::new(0),
            successes: ShardedCounter::new(),
        }
    }

    /// Keeps the lock-free mirrors in step; each written only when it changed.
    fn mirror(&self, s: &Inner) {
        let closed = s.state == BreakerState::Closed;
        if self.closed.load(Ordering::Relaxed) != closed {
            self.closed.store(closed, Ordering::Release);
        }
        let quiet = closed && s.consecutive == 0;
        if self.quiet.load(Ordering::Relaxed) != quiet {
            self.quiet.store(quiet, Ordering::Release);
        }
        let window_end = s.window_start.saturating_add(RATIO_WINDOW_MS);
        if self.window_end.load(Ordering::Relaxed) != window_end {
            self.window_end.store(window_end, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Closed (lock-free: the mirror), so a call would be let through without probing.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Asks to make a call at `now_ms`. May move Open → Half-open.
    pub fn admit(&self, now_ms: u64) -> (Admission, Option<Transition>) {
        if self.closed.load(Ordering::Acquire) {
            return (Admission::Allowed, None);
        }
        let mut s = self.lock();
        let decided = self.admit_locked(&mut s, now_ms);
        self.mirror(&s);
        decided
    }

    fn admit_locked(&self, s: &mut Inner, now_ms: u64) -> (Admission, Option<Transition>) {
        match s.state {
            BreakerState::Closed => (Admission::Allowed, None),
            BreakerState::Open if now_ms < s.open_until => (
                Admission::Refused {
                    retry_after_ms: s.open_until - now_ms,
                },
                None,
            ),
            BreakerState::Open => {
                s.state = BreakerState::HalfOpen;
                s.probes_started = 1;
                s.probes_ok = 0;
                s.half_open_period += 1;
                (Admission::Probe, Some(Transition::HalfOpened))
            }
            BreakerState::HalfOpen if s.probes_started < self.settings.half_open_probes => {
                s.probes_started += 1;
                (Admission::Probe, None)
            }
            BreakerState::HalfOpen => (
                Admission::Refused {
                    retry_after_ms: 1_000,
                },
                None,
            ),
        }
    }

    /// Asks to make a call at `now_ms`, as a [`Permit`] that gives a half-open probe back if it
    /// is dropped without an outcome; `Err(retry_after_ms)` when refused.
    pub fn enter(&self, now_ms: u64) -> (Result<Permit<'_>, u64>, Option<Transition>) {
        let permit = |probe| Permit {
            breaker: self,
            probe,
            done: false,
        };
        if self.closed.load(Ordering::Acquire) {
            return (Ok(permit(None)), None);
        }
        let mut s = self.lock();
        let (admission, transition) = self.admit_locked(&mut s, now_ms);
        self.mirror(&s);
        let entered = match admission {
            Admission::Allowed => Ok(permit(None)),
            Admission::Probe => Ok(permit(Some(s.half_open_period))),
            Admission::Refused { retry_after_ms } => Err(retry_after_ms),
        };
        (entered, transition)
    }

    /// A probe of half-open period `period` will not report: another call may probe instead.
    fn give_back_probe(&self, period: u64) {
        let mut s = self.lock();
        if s.state == BreakerState::HalfOpen
            && s.half_open_period == period
            && s.probes_started > s.probes_ok
        {
            s.probes_started -= 1;
        }
    }

    /// Records the outcome of an admitted call.
    pub fn record(&self, ok: bool, now_ms: u64) -> Option<Transition> {
        if ok
            && self.quiet.load(Ordering::Acquire)
            && now_ms < self.window_end.load(Ordering::Relaxed)
        {
            self.successes.inc();
            return None;
        }
        let mut s = self.lock();
        let transition = self.record_locked(&mut s, ok, now_ms);
        self.mirror(&s);
        transition
    }

    fn record_locked(&self, s: &mut Inner, ok: bool, now_ms: u64) -> Option<Transition> {
        let settings = self.settings;
        match s.state {
            BreakerState::HalfOpen => {
                if !ok {
                    return Some(open(s, now_ms, settings));
                }
                s.probes_ok += 1;
                if s.probes_ok >= settings.half_open_probes {
                    s.state = BreakerState::Closed;
                    s.consecutive = 0;
                    s.success_base = self.successes.sum();
                    s.failures = 0;
                    s.window_start = now_ms;
                    return Some(Transition::Closed);
                }
                None
            }
            BreakerState::Open => None,
            BreakerState::Closed => {
                if now_ms.saturating_sub(s.window_start) >= RATIO_WINDOW_MS {
                    s.window_start = now_ms;
                    s.success_base = self.successes.sum();
                    s.failures = 0;
                }
                if ok {
                    self.successes.inc();
                    s.consecutive = 0;
                    return None;
                }
                s.failures += 1;
                s.consecutive += 1;
                let successes = self.successes.sum().saturating_sub(s.success_base);
                let calls = s.failures as u64 + successes;
                let ratio_trip = calls >= settings.min_calls as u64
                    && s.failures as f64 / calls as f64 >= settings.failure_ratio;
                if s.consecutive >= settings.consecutive_failures || ratio_trip {
                    return Some(open(s, now_ms, settings));
                }
                None
            }
        }
    }
}

/// A call the breaker let through. Its outcome is reported with [`Permit::record`]; dropped
/// without one (the client went away, or the failure was the client's), a half-open probe is
/// given back, so half-open never waits for a probe that will not report.
#[derive(Debug)]
pub struct Permit<'b> {
    breaker: &'b Breaker,
    /// The half-open period this probe belongs to; None for a call of a closed breaker.
    probe: Option<u64>,
    done: bool,
}

impl Permit<'_> {
    /// Reports the call's outcome.
    pub fn record(mut self, ok: bool, now_ms: u64) -> Option<Transition> {
        self.done = true;
        self.breaker.record(ok, now_ms)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let (Some(period), false) = (self.probe, self.done) {
            self.breaker.give_back_probe(period);
        }
    }
}

fn open(s: &mut Inner, now_ms: u64, settings: BreakerSettings) -> Transition {
    s.state = BreakerState::Open;
    s.open_until = now_ms + settings.open_for_ms;
    s.consecutive = 0;
    s.failures = 0;
    Transition::Opened
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            consecutive_failures: 3,
            failure_ratio: 0.5,
            min_calls: 10,
            open_for_ms: 5_000,
            half_open_probes: 2,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses_fast() {
        let b = breaker();
        assert_eq!(b.record(false, 0), None);
        assert_eq!(b.record(false, 1), None);
        assert_eq!(b.record(false, 2), Some(Transition::Opened));
        assert_eq!(
            b.admit(100).0,
            Admission::Refused {
                retry_after_ms: 4_902
            }
        );
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn opens_on_failure_ratio_with_enough_calls() {
        let b = breaker();
        let mut t = None;
        for i in 0..10 {
            t = b.record(i % 2 == 0, i);
        }
        assert_eq!(
            t,
            Some(Transition::Opened),
            "5 of 10 failed, never 3 in a row"
        );
    }

    #[test]
    fn half_open_probes_close_or_reopen() {
        let b = breaker();
        for i in 0..3 {
            b.record(false, i);
        }
        assert_eq!(
            b.admit(5_002),
            (Admission::Probe, Some(Transition::HalfOpened))
        );
        assert_eq!(b.admit(5_003).0, Admission::Probe);
        assert!(
            matches!(b.admit(5_004).0, Admission::Refused { .. }),
            "only 2 probes at a time"
        );
        assert_eq!(b.record(true, 5_010), None);
        assert_eq!(b.record(true, 5_011), Some(Transition::Closed));
        assert_eq!(b.admit(5_012).0, Admission::Allowed);

        for i in 0..3 {
            b.record(false, 6_000 + i);
        }
        assert_eq!(b.admit(11_100).0, Admission::Probe);
        assert_eq!(b.record(false, 11_101), Some(Transition::Opened));
        assert!(matches!(b.admit(11_102).0, Admission::Refused { .. }));
    }

    #[test]
    fn successes_of_an_earlier_window_do_not_dilute_the_failure_ratio() {
        let b = breaker();
        for i in 0..100 {
            assert_eq!(b.record(true, i), None);
        }
        // 31 s later, a new window: S F S F ... 5 of 10 failed (never 3 in a row) opens it; the
        // 100 earlier successes would have kept the ratio at 5 of 110.
        let mut last = None;
        for i in 0..10 {
            last = b.record(i % 2 == 0, 31_000 + i);
        }
        assert_eq!(last, Some(Transition::Opened));
    }

    #[test]
    fn successes_recorded_on_many_threads_all_count_toward_the_ratio() {
        let b = std::sync::Arc::new(breaker());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for t in 1..=3 {
                        assert_eq!(b.record(true, t), None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Then F F S rounds. With the 12 successes counted, the second failure of round k
        // sees 2k failures of 3k + 11 calls: at least half from round 11 on (the first
        // failure of round k: 2k - 1 of 3k + 10, half from round 12). Had the threads'
        // successes been lost, round 4 would already have opened it (8 of 11).
        let mut opened_at = None;
        'rounds: for round in 1..=20u64 {
            for (step, ok) in [false, false, true].into_iter().enumerate() {
                if b.record(ok, 100 + round * 3 + step as u64) == Some(Transition::Opened) {
                    opened_at = Some((round, step));
                    break 'rounds;
                }
            }
        }
        assert_eq!(opened_at, Some((11, 1)));
    }

    #[test]
    fn successes_reset_the_consecutive_count_below_min_calls() {
        let b = breaker();
        // F F S, three times: never 3 failures in a row, and 9 calls is below min_calls.
        for i in 0..9 {
            assert_eq!(b.record(i % 3 == 2, i), None, "call {i}");
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_probe_dropped_without_an_outcome_is_given_back() {
        let b = Breaker::new(BreakerSettings {
            half_open_probes: 1,
            ..breaker().settings
        });
        for t in 0..3 {
            b.record(false, t);
        }
        // Half-open: the one probe goes to a call whose client then leaves.
        let (probe, t) = b.enter(6_000);
        assert_eq!(t, Some(Transition::HalfOpened));
        let probe = probe.expect("a probe");
        assert_eq!(b.enter(6_001).0.err(), Some(1_000), "one probe at a time");
        drop(probe);
        // Given back: the next call probes, and its success closes the breaker.
        let next = b.enter(6_002).0.expect("the probe was given back");
        assert_eq!(next.record(true, 6_003), Some(Transition::Closed));
        assert_eq!(b.state(), BreakerState::Closed);

        // A permit of an earlier half-open period never touches a later one's count.
        for t in 7_000..7_003 {
            b.record(false, t);
        }
        let (old, _) = b.enter(13_000);
        let old = old.unwrap();
        assert_eq!(b.record(false, 13_001), Some(Transition::Opened));
        let (new, _) = b.enter(19_000);
        let _new = new.unwrap();
        drop(old);
        assert_eq!(
            b.enter(19_001).0.err(),
            Some(1_000),
            "the new probe still counts"
        );
    }
}
