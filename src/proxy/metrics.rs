//! The proxy's Prometheus metrics (`apitree_proxy_*`). Labels come from closed sets only: route
//! names from the config, status classes, reasons, windows, PII kinds. Never keys, paths or
//! error text.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub use super::sharded::RouteMetrics;
use super::sharded::{RouteStats, ShardedGauge};

/// Label used for requests that matched no route (or were refused before routing).
pub const NO_ROUTE: &str = "none";

/// Every metric the proxy exports.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub registry: Registry,
    /// Requests by route and status class, and their latency histogram: per-thread slots.
    pub routes: RouteStats,
    pub auth_failures: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_opens: IntCounterVec,
    pub pii_findings: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub limiter_fallbacks: IntCounter,
    pub limiter_store_calls: IntCounter,
    pub in_flight: ShardedGauge,
    pub config_reloads: IntCounterVec,
    /// Usage batches sent to the database, by result (ok, failed: kept and sent again).
    pub usage_flushes: IntCounterVec,
    /// Database rows the serving configuration skips, by kind (set at each scrape).
    pub database_rows_skipped: IntGaugeVec,
    pub access_log_dropped: IntCounter,
    pub connections_shed: IntCounter,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let routes = RouteStats::new();
        r.register(Box::new(routes.clone())).expect("unique metric");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "apitree_proxy_breaker_state",
                "Circuit breaker state by route: 0 closed, 1 half-open, 2 open.",
            ),
            &["route"],
        )
        .expect("valid metric");
        r.register(Box::new(breaker_state.clone()))
            .expect("unique metric");
        let database_rows_skipped = IntGaugeVec::new(
            Opts::new(
                "apitree_proxy_database_rows_skipped",
                "Database rows the serving configuration skips, by kind (api, org, key, credential); the log names each and why.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(database_rows_skipped.clone()))
            .expect("unique metric");
        let in_flight = ShardedGauge::new(
            "apitree_proxy_in_flight_requests",
            "Requests being served now.",
        );
        r.register(Box::new(in_flight.clone()))
            .expect("unique metric");
        let limiter_fallbacks = IntCounter::new(
            "apitree_proxy_ratelimit_fallbacks_total",
            "Rate-limit decisions made locally because the shared Redis store failed.",
        )
        .expect("valid metric");
        r.register(Box::new(limiter_fallbacks.clone()))
            .expect("unique metric");
        let limiter_store_calls = IntCounter::new(
            "apitree_proxy_ratelimit_store_calls_total",
            "Round trips to the shared Redis store: decisions this replica's leased quota did not cover.",
        )
        .expect("valid metric");
        r.register(Box::new(limiter_store_calls.clone()))
            .expect("unique metric");
        let access_log_dropped = IntCounter::new(
            "apitree_proxy_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind.",
        )
        .expect("valid metric");
        r.register(Box::new(access_log_dropped.clone()))
            .expect("unique metric");
        let connections_shed = IntCounter::new(
            "apitree_proxy_connections_shed_total",
            "Client connections answered 503 and closed because every worker's accept queue was full.",
        )
        .expect("valid metric");
        r.register(Box::new(connections_shed.clone()))
            .expect("unique metric");
        Self {
            auth_failures: counter_vec(
                &r,
                "apitree_proxy_auth_failures_total",
                "Refused credentials by reason.",
                &["reason"],
            ),
            rate_limited: counter_vec(
                &r,
                "apitree_proxy_rate_limited_total",
                "Requests refused by a rate limit, by subject (key, org) and window.",
                &["subject", "window"],
            ),
            breaker_opens: counter_vec(
                &r,
                "apitree_proxy_breaker_opens_total",
                "Times a route's circuit breaker opened.",
                &["route"],
            ),
            pii_findings: counter_vec(
                &r,
                "apitree_proxy_pii_findings_total",
                "PII found in responses, by route and kind.",
                &["route", "kind"],
            ),
            upstream_errors: counter_vec(
                &r,
                "apitree_proxy_upstream_errors_total",
                "Failed upstream calls by route and kind (connect, timeout, bad_response, status_5xx).",
                &["route", "kind"],
            ),
            config_reloads: counter_vec(
                &r,
                "apitree_proxy_config_reloads_total",
                "Configuration loads by result (ok, error).",
                &["result"],
            ),
            usage_flushes: counter_vec(
                &r,
                "apitree_proxy_usage_flushes_total",
                "Usage batches sent to the database (database mode), by result (ok; failed: kept and sent again; discarded: refused by the database for good).",
                &["result"],
            ),
            routes,
            breaker_state,
            database_rows_skipped,
            in_flight,
            limiter_fallbacks,
            limiter_store_calls,
            access_log_dropped,
            connections_shed,
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl ProxyMetrics {
    /// The route's request counters and latency histogram, resolved once so the request path
    /// does no label lookups.
    pub fn for_route(&self, route: &str) -> RouteMetrics {
        self.routes.route(route)
    }
}
