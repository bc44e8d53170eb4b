//! Metrics the request path updates on every request, in per-thread slots summed at scrape
//! time.
//!
//! The prometheus crate keeps one set of atomics per series, so every proxied request wrote the
//! same few cache lines from every worker core (request counter, three histogram fields, the
//! in-flight gauge twice), and each write had to take the line from the other core first. Here
//! each thread adds into its own cache-line-sized slot; `/metrics` adds the slots up. A scrape
//! sees every completed update (relaxed atomic adds, no staleness window). Threads beyond the
//! slot count share slots, which stays correct (the adds are atomic) and only costs speed.

use crossbeam_utils::CachePadded;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

/// Upper bounds of the latency histogram, in seconds.
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKETS_NS: [u64; 13] = {
    let mut ns = [0u64; 13];
    let mut i = 0;
    while i < 13 {
        ns[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Histogram slots: one per bound, and one for latencies above the largest.
const BUCKET_SLOTS: usize = BUCKETS.len() + 1;

/// One `T` per thread slot, each on its own cache lines.
struct PerThread<T>(Box<[CachePadded<T>]>);

impl<T: Default> PerThread<T> {
    fn new() -> Self {
        Self((0..slot_count()).map(|_| CachePadded::default()).collect())
    }
}

impl<T> PerThread<T> {
    /// This thread's slot.
    fn mine(&self) -> &T {
        &self.0[thread_slot()]
    }

    fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|slot| &**slot)
    }
}

/// Slots per metric: the CPU count rounded up to a power of two, 4 to 64.
pub(crate) fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .next_power_of_two()
            .clamp(4, 64)
    })
}

/// This thread's slot number (taken on first use, in thread start order).
pub(crate) fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Relaxed);
    }
    SLOT.with(|s| *s) & (slot_count() - 1)
}

/// One thread's counts for one route.
#[derive(Default)]
struct RouteSlot {
    classes: [AtomicU64; 5],
    /// Not cumulative: `buckets[i]` counts latencies in (BUCKETS[i-1], BUCKETS[i]]; the last
    /// one those above the largest bound.
    buckets: [AtomicU64; BUCKET_SLOTS],
    sum_ns: AtomicU64,
}

/// A route's request counters (by status class) and latency histogram.
#[derive(Clone)]
pub struct RouteMetrics(Arc<PerThread<RouteSlot>>);

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}

impl RouteMetrics {
    fn new() -> Self {
        Self(Arc::new(PerThread::new()))
    }

    /// Counts one response: its status class and the time to its headers.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let slot = self.0.mine();
        let class = (status / 100).clamp(1, 5) as usize - 1;
        slot.classes[class].fetch_add(1, Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(BUCKETS_NS.len());
        slot.buckets[bucket].fetch_add(1, Relaxed);
        slot.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Sums of all slots: (per class, per bucket, sum in ns).
    fn totals(&self) -> ([u64; 5], [u64; BUCKET_SLOTS], u64) {
        let (mut classes, mut buckets, mut sum) = ([0u64; 5], [0u64; BUCKET_SLOTS], 0u64);
        for slot in self.0.all() {
            for (t, c) in classes.iter_mut().zip(&slot.classes) {
                *t += c.load(Relaxed);
            }
            for (t, b) in buckets.iter_mut().zip(&slot.buckets) {
                *t += b.load(Relaxed);
            }
            sum = sum.wrapping_add(slot.sum_ns.load(Relaxed));
        }
        (classes, buckets, sum)
    }
}

/// `apitree_proxy_requests_total` and `apitree_proxy_request_duration_seconds` for every
/// route that has served a request, one [`RouteMetrics`] per route name (kept across reloads).
#[derive(Clone)]
pub struct RouteStats {
    routes: Arc<Mutex<BTreeMap<String, RouteMetrics>>>,
    descs: Arc<[Desc; 2]>,
}

pub const REQUESTS: &str = "apitree_proxy_requests_total";
const REQUESTS_HELP: &str = "Requests by route and status class (2xx..5xx).";
pub const DURATION: &str = "apitree_proxy_request_duration_seconds";
const DURATION_HELP: &str = "Time from request to response headers, by route.";

impl RouteStats {
    pub fn new() -> Self {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .expect("valid metric")
        };
        Self {
            routes: Arc::default(),
            descs: Arc::new([
                desc(REQUESTS, REQUESTS_HELP, &["route", "status_class"]),
                desc(DURATION, DURATION_HELP, &["route"]),
            ]),
        }
    }

    /// The route's metrics, shared by every caller asking for the same name.
    pub fn route(&self, name: &str) -> RouteMetrics {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(name.to_owned())
            .or_insert_with(RouteMetrics::new)
            .clone()
    }
}

impl Default for RouteStats {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut l = LabelPair::default();
            l.set_name((*name).into());
            l.set_value((*value).into());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl Collector for RouteStats {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let routes: Vec<(String, RouteMetrics)> = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes.iter().map(|(n, m)| (n.clone(), m.clone())).collect()
        };
        let (mut requests, mut durations) = (Vec::new(), Vec::new());
        for (route, m) in &routes {
            let (classes, buckets, sum_ns) = m.totals();
            for (class, count) in CLASSES.iter().zip(classes) {
                let mut c = proto::Counter::default();
                c.set_value(count as f64);
                let mut metric =
                    proto::Metric::from_label(labels(&[("route", route), ("status_class", class)]));
                metric.set_counter(c);
                requests.push(metric);
            }
            let mut cumulative = 0;
            let mut h = proto::Histogram::default();
            h.set_bucket(
                BUCKETS
                    .iter()
                    .zip(buckets)
                    .map(|(&bound, count)| {
                        cumulative += count;
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(bound);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect(),
            );
            h.set_sample_count(buckets.iter().sum());
            h.set_sample_sum(sum_ns as f64 / 1e9);
            let mut metric = proto::Metric::from_label(labels(&[("route", route)]));
            metric.set_histogram(h);
            durations.push(metric);
        }
        vec![
            family(REQUESTS, REQUESTS_HELP, MetricType::COUNTER, requests),
            family(DURATION, DURATION_HELP, MetricType::HISTOGRAM, durations),
        ]
    }
}

/// A count many threads add to, each in its own slot.
pub struct ShardedCounter(PerThread<AtomicU64>);

impl ShardedCounter {
    pub fn new() -> Self {
        Self(PerThread::new())
    }

    pub fn inc(&self) {
        self.0.mine().fetch_add(1, Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.0.all().map(|n| n.load(Relaxed)).sum()
    }
}

impl Default for ShardedCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardedCounter({})", self.sum())
    }
}

/// A gauge moved up and down by many threads (`apitree_proxy_in_flight_requests`): each
/// thread moves its own slot; the value is their sum, whichever thread moved it down.
#[derive(Clone)]
pub struct ShardedGauge {
    slots: Arc<PerThread<AtomicI64>>,
    desc: Arc<Desc>,
}

impl ShardedGauge {
    pub fn new(name: &str, help: &str) -> Self {
        Self {
            slots: Arc::new(PerThread::new()),
            desc: Arc::new(
                Desc::new(name.into(), help.into(), Vec::new(), Default::default())
                    .expect("valid metric"),
            ),
        }
    }

    pub fn inc(&self) {
        self.slots.mine().fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.slots.mine().fetch_sub(1, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.slots.all().map(|n| n.load(Relaxed)).sum()
    }
}

impl Collector for ShardedGauge {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut g = proto::Gauge::default();
        g.set_value(self.get() as f64);
        vec![family(
            &self.desc.fq_name,
            &self.desc.help,
            MetricType::GAUGE,
            vec![proto::Metric::from_gauge(g)],
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
    }

    fn render(r: &prometheus::Registry) -> String {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn route_counts_from_many_threads_add_up_at_scrape() {
        let stats = RouteStats::new();
        let registry = prometheus::Registry::new();
        registry.register(Box::new(stats.clone())).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                // Every thread resolves the route itself: one set of counts per name.
                let stats = stats.clone();
                std::thread::spawn(move || {
                    let m = stats.route("api");
                    for i in 0..1000u64 {
                        let status = if i % 10 == 0 { 503 } else { 200 };
                        m.observe(status, Duration::from_micros(300 + t * 1_000_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        stats.route("other").observe(404, Duration::from_secs(60));
        let text = render(&registry);
        let r = |s: &str| value(&text, s);
        for (route, class, count) in [
            ("api", "2xx", 7200.0),
            ("api", "5xx", 800.0),
            ("api", "4xx", 0.0),
            ("other", "4xx", 1.0),
        ] {
            let series = format!(
                "apitree_proxy_requests_total{{route=\"{route}\",status_class=\"{class}\"}}"
            );
            assert_eq!(r(&series), count, "{series}");
        }
        // Thread t waited t seconds + 300 µs: thread 0 in the first bucket, threads 1..=2 at
        // most 2.5 s, 3..=4 at most 5 s, 5..=7 at most 10 s.
        let bucket = |le: &str| {
            r(&format!(
                "apitree_proxy_request_duration_seconds_bucket{{route=\"api\",le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.001"), 1000.0);
        assert_eq!(bucket("1"), 1000.0);
        assert_eq!(bucket("2.5"), 3000.0);
        assert_eq!(bucket("5"), 5000.0);
        assert_eq!(bucket("10"), 8000.0);
        assert_eq!(bucket("+Inf"), 8000.0);
        assert_eq!(
            r(r#"apitree_proxy_request_duration_seconds_count{route="api"}"#),
            8000.0
        );
        let sum = r(r#"apitree_proxy_request_duration_seconds_sum{route="api"}"#);
        assert!(
            (sum - (28_000.0 + 8000.0 * 0.0003)).abs() < 1e-6,
            "sum {sum}"
        );
        // Above the largest bound: only in +Inf.
        assert_eq!(
            r(r#"apitree_proxy_request_duration_seconds_bucket{route="other",le="10"}"#),
            0.0
        );
        assert_eq!(
            r(r#"apitree_proxy_request_duration_seconds_bucket{route="other",le="+Inf"}"#),
            1.0
        );
    }

    #[test]
    fn a_gauge_moved_down_on_another_thread_sums_to_its_value() {
        let g = ShardedGauge::new("apitree_test_in_flight", "Test.");
        let registry = prometheus::Registry::new();
        registry.register(Box::new(g.clone())).unwrap();
        for _ in 0..5 {
            g.inc();
        }
        let g2 = g.clone();
        std::thread::spawn(move || {
            g2.dec();
            g2.dec();
        })
        .join()
        .unwrap();
        assert_eq!(g.get(), 3);
        assert_eq!(value(&render(&registry), "apitree_test_in_flight"), 3.0);
    }
}
