//! Where window metrics come from: the proxies' `/metrics` (scraped and parsed with
//! prometheus-parse) or a Prometheus server (PromQL over its HTTP API). Both produce the same
//! per-route windows: requests, errors (5xx, which includes upstream failures: 502/503/504) and
//! the gateway's auth failures.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

/// One route's window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteWindow {
    pub requests: u64,
    pub errors: u64,
    /// 99th-percentile latency over the window, in milliseconds (when requests were seen).
    pub p99_ms: Option<f64>,
    /// Times the route's circuit breaker opened in the window.
    pub breaker_opens: u64,
    /// Whether the breaker was open (or half-open) at the end of the window.
    pub breaker_open: bool,
}

/// The `q` quantile of a cumulative histogram (upper bound, cumulative count), interpolated
/// linearly inside the bucket the way PromQL's `histogram_quantile` does.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = count;
    }
    Some(lower)
}

/// One window of a gateway: per route, plus gateway-wide auth failures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayWindow {
    pub routes: BTreeMap<String, RouteWindow>,
    pub auth_failures: u64,
    /// Requests of `routes` that Connector Agents reported: counted per route, but not in the
    /// gateway-wide auth-failure ratio (an agent speaks for its own routes only).
    pub agent_requests: u64,
}

/// Why a window could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("cannot parse the metrics from {url}: {reason}")]
    Parse { url: String, reason: String },
    #[error("Prometheus at {url} answered an error for {query:?}: {reason}")]
    Query {
        url: String,
        query: String,
        reason: String,
    },
}

/// The route a console's answers are counted under.
pub const CONSOLE_ROUTE: &str = "console";

/// Cumulative counters of one proxy.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    requests: HashMap<String, f64>,
    errors: HashMap<String, f64>,
    auth_failures: f64,
    breaker_opens: HashMap<String, f64>,
    breaker_state: HashMap<String, f64>,
    /// Cumulative latency buckets per route: (upper bound in seconds, count).
    latency: HashMap<String, Vec<(f64, f64)>>,
}

/// Parses a `/metrics` exposition into cumulative totals.
fn totals(text: &str, url: &str) -> Result<Totals, SourceError> {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).map_err(|e| {
            SourceError::Parse {
                url: url.to_string(),
                reason: e.to_string(),
            }
        })?;
    let mut t = Totals::default();
    for s in scrape.samples {
        let route = s.labels.get("route").unwrap_or("none").to_string();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Histogram(h)
                if s.metric == "apitree_proxy_request_duration_seconds" =>
            {
                t.latency
                    .insert(route, h.iter().map(|c| (c.less_than, c.count)).collect());
                continue;
            }
            _ => continue,
        };
        match s.metric.as_str() {
            "apitree_proxy_requests_total" => {
                *t.requests.entry(route.clone()).or_default() += value;
                if s.labels.get("status_class") == Some("5xx") {
                    *t.errors.entry(route).or_default() += value;
                }
            }
            "apitree_proxy_auth_failures_total" => t.auth_failures += value,
            // The console, watched like a gateway with one route: its answers, its 5xx, and
            // its refused sign-ins and sessions.
            "apitree_console_responses_total" => {
                *t.requests.entry(CONSOLE_ROUTE.into()).or_default() += value;
                if s.labels.get("status_class") == Some("5xx") {
                    *t.errors.entry(CONSOLE_ROUTE.into()).or_default() += value;
                }
            }
            "apitree_console_auth_failures_total" => t.auth_failures += value,
            "apitree_proxy_breaker_opens_total" => {
                *t.breaker_opens.entry(route).or_default() += value
            }
            "apitree_proxy_breaker_state" => {
                let e = t.breaker_state.entry(route).or_default();
                *e = e.max(value);
            }
            _ => {}
        }
    }
    Ok(t)
}

/// Counter increase, treating a drop as a restart (the new value is all new).
fn increase(now: f64, before: Option<f64>) -> u64 {
    let d = match before {
        Some(b) if now >= b => now - b,
        _ => now,
    };
    d.max(0.0).round() as u64
}

impl Snapshot {
    /// Counters from metrics texts already at hand, by name: what Connector Agents reported to
    /// the control plane.
    pub fn from_texts(
        texts: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SourceError> {
        let mut out = HashMap::new();
        for (name, text) in texts {
            let t = totals(&text, &name)?;
            out.insert(name, t);
        }
        Ok(Snapshot(out))
    }
}

impl GatewayWindow {
    /// Adds what Connector Agents served (another set of proxies of the same gateway): per
    /// route, counts add up (saturating), a route's p99 is the larger of the two, a breaker is
    /// open if either is. Their requests are remembered in `agent_requests`, and their auth
    /// failures are left out: the gateway-wide auth-failure ratio is the cluster's own, which
    /// an agent can neither raise nor dilute.
    pub fn absorb_agents(&mut self, other: GatewayWindow) {
        for (route, o) in other.routes {
            self.agent_requests = self.agent_requests.saturating_add(o.requests);
            let w = self.routes.entry(route).or_default();
            w.requests = w.requests.saturating_add(o.requests);
            w.errors = w.errors.saturating_add(o.errors);
            w.breaker_opens = w.breaker_opens.saturating_add(o.breaker_opens);
            w.breaker_open |= o.breaker_open;
            w.p99_ms = match (w.p99_ms, o.p99_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
    }
}

/// Scrapes proxies directly; windows are differences between consecutive scrapes.
pub struct ScrapeSource {
    targets: Vec<ScrapeTarget>,
    last: Option<Snapshot>,
}

/// One proxy's `/metrics`: the URL it is known by (in snapshots and errors), and the client
/// and URL that reach it (for a proxy that speaks TLS: a client that trusts its CA, and the
/// name its certificate carries).
pub struct ScrapeTarget {
    pub name: String,
    pub client: reqwest::Client,
    pub url: String,
}

/// Cumulative counters of a set of proxies at one moment, by `/metrics` URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot(HashMap<String, Totals>);

impl ScrapeSource {
    /// `targets` are `/metrics` URLs, one per proxy replica, over plain HTTP.
    pub fn new(targets: Vec<String>) -> Self {
        let client = http_client();
        Self::with_targets(
            targets
                .into_iter()
                .map(|url| ScrapeTarget {
                    name: url.clone(),
                    client: client.clone(),
                    url,
                })
                .collect(),
        )
    }

    /// One target per proxy replica, each with its own client.
    pub fn with_targets(targets: Vec<ScrapeTarget>) -> Self {
        Self {
            targets,
            last: None,
        }
    }

    /// Reads every target's counters now.
    pub async fn snapshot(&self) -> Result<Snapshot, SourceError> {
        let mut out = HashMap::new();
        for t in &self.targets {
            let fetch_error = |e: reqwest::Error| SourceError::Fetch {
                url: t.name.clone(),
                reason: crate::tls::error_chain(&e),
            };
            let text = t
                .client
                .get(&t.url)
                .timeout(SCRAPE_TIMEOUT)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(fetch_error)?
                .text()
                .await
                .map_err(fetch_error)?;
            out.insert(t.name.clone(), totals(&text, &t.name)?);
        }
        Ok(Snapshot(out))
    }

    /// The window since the previous call. The first call only primes the counters and
    /// returns None.
    pub async fn window(&mut self) -> Result<Option<GatewayWindow>, SourceError> {
        let now = self.snapshot().await?;
        let out = self
            .last
            .as_ref()
            .map(|before| window_between(before, &now));
        self.last = Some(now);
        Ok(out)
    }
}

/// What happened between two snapshots of the same targets. A target missing from `before`
/// (a replica that appeared since) counts from zero.
pub fn window_between(before: &Snapshot, now: &Snapshot) -> GatewayWindow {
    let mut out = GatewayWindow::default();
    for (url, now) in &now.0 {
        let before = before.0.get(url);
        let prior = |m: fn(&Totals) -> &HashMap<String, f64>, route: &str| {
            before.and_then(|b| m(b).get(route).copied())
        };
        for (route, req) in &now.requests {
            let w = out.routes.entry(route.clone()).or_default();
            w.requests = w
                .requests
                .saturating_add(increase(*req, prior(|t| &t.requests, route)));
            w.errors = w.errors.saturating_add(increase(
                now.errors.get(route).copied().unwrap_or(0.0),
                prior(|t| &t.errors, route),
            ));
            w.breaker_opens = w.breaker_opens.saturating_add(increase(
                now.breaker_opens.get(route).copied().unwrap_or(0.0),
                prior(|t| &t.breaker_opens, route),
            ));
            w.breaker_open |= now.breaker_state.get(route).copied().unwrap_or(0.0) > 0.0;
            if let Some(buckets) = now.latency.get(route) {
                let prev = before.and_then(|b| b.latency.get(route));
                let delta: Vec<(f64, f64)> = buckets
                    .iter()
                    .map(|(le, c)| {
                        let p = prev
                            .and_then(|p| p.iter().find(|(l, _)| l == le))
                            .map(|x| x.1);
                        (*le, increase(*c, p) as f64)
                    })
                    .collect();
                // Several replicas: keep the worst p99.
                if let Some(q) = histogram_quantile(0.99, &delta) {
                    w.p99_ms = Some(w.p99_ms.unwrap_or(0.0).max(q * 1000.0));
                }
            }
        }
        out.auth_failures = out
            .auth_failures
            .saturating_add(increase(now.auth_failures, before.map(|b| b.auth_failures)));
    }
    out
}

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .build()
        .unwrap_or_default()
}

/// Queries a Prometheus server that scrapes the proxies.
pub struct PrometheusSource {
    client: reqwest::Client,
    base: String,
    /// Label matchers selecting this gateway's series, e.g. `namespace="apis",gateway="m"`.
    selector: String,
}

impl PrometheusSource {
    pub fn new(base: &str, selector: &str) -> Self {
        Self {
            client: http_client(),
            base: base.trim_end_matches('/').to_string(),
            selector: selector.to_string(),
        }
    }

    fn matchers(&self, extra: &str) -> String {
        let parts: Vec<&str> = [self.selector.as_str(), extra]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    async fn query(
        &self,
        promql: &str,
    ) -> Result<Vec<(BTreeMap<String, String>, f64)>, SourceError> {
        let url = format!("{}/api/v1/query", self.base);
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let resp: Value = self
            .client
            .get(format!("{url}?{query}"))
            .send()
            .await
            .map_err(|e| SourceError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?
            .json()
            .await
            .map_err(|e| SourceError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if resp["status"] != "success" {
            return Err(SourceError::Query {
                url,
                query: promql.to_string(),
                reason: resp["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_string(),
            });
        }
        let mut out = Vec::new();
        for r in resp["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            out.push((labels, value));
        }
        Ok(out)
    }

    /// The window of `window` ending now.
    pub async fn window(&self, window: Duration) -> Result<GatewayWindow, SourceError> {
        let range = format!("{}s", window.as_secs().max(1));
        let requests = self
            .query(&format!(
                "sum by (route) (increase(apitree_proxy_requests_total{}[{range}]))",
                self.matchers("")
            ))
            .await?;
        let errors = self
            .query(&format!(
                "sum by (route) (increase(apitree_proxy_requests_total{}[{range}]))",
                self.matchers("status_class=\"5xx\"")
            ))
            .await?;
        let auth = self
            .query(&format!(
                "sum(increase(apitree_proxy_auth_failures_total{}[{range}]))",
                self.matchers("")
            ))
            .await?;
        let mut out = GatewayWindow::default();
        for (labels, v) in requests {
            let route = labels.get("route").cloned().unwrap_or_default();
            out.routes.entry(route).or_default().requests = v.round() as u64;
        }
        for (labels, v) in errors {
            let route = labels.get("route").cloned().unwrap_or_default();
            out.routes.entry(route).or_default().errors = v.round() as u64;
        }
        out.auth_failures = auth.first().map(|(_, v)| v.round() as u64).unwrap_or(0);
        let opens = self
            .query(&format!(
                "sum by (route) (increase(apitree_proxy_breaker_opens_total{}[{range}]))",
                self.matchers("")
            ))
            .await?;
        for (labels, v) in opens {
            out.routes
                .entry(labels.get("route").cloned().unwrap_or_default())
                .or_default()
                .breaker_opens = v.round() as u64;
        }
        let state = self
            .query(&format!(
                "max by (route) (apitree_proxy_breaker_state{})",
                self.matchers("")
            ))
            .await?;
        for (labels, v) in state {
            out.routes
                .entry(labels.get("route").cloned().unwrap_or_default())
                .or_default()
                .breaker_open = v > 0.0;
        }
        let p99 = self
            .query(&format!(
                "histogram_quantile(0.99, sum by (route, le) (increase(apitree_proxy_request_duration_seconds_bucket{}[{range}])))",
                self.matchers("")
            ))
            .await?;
        for (labels, v) in p99 {
            if v.is_finite() {
                out.routes
                    .entry(labels.get("route").cloned().unwrap_or_default())
                    .or_default()
                    .p99_ms = Some(v * 1000.0);
            }
        }
        Ok(out)
    }
}

/// Either source, behind one interface: what the detector loop holds.
pub enum MetricSource {
    Scrape(ScrapeSource),
    Prometheus(PrometheusSource),
}

impl MetricSource {
    /// From an `ApiGateway`'s `spec.detection.source`: `targets` are the proxies' `/metrics`
    /// (scrape), `selector` the label matchers of this gateway's series (Prometheus).
    pub fn from_spec(
        spec: &crate::crd::gateway::MetricSource,
        targets: Vec<ScrapeTarget>,
        selector: &str,
    ) -> Self {
        match (spec.type_, &spec.prometheus_url) {
            (crate::crd::gateway::MetricSourceType::Prometheus, Some(url)) => {
                Self::Prometheus(PrometheusSource::new(url, selector))
            }
            _ => Self::Scrape(ScrapeSource::with_targets(targets)),
        }
    }

    /// The window of length `window` ending now; None while a scrape source is priming.
    pub async fn window(&mut self, window: Duration) -> Result<Option<GatewayWindow>, SourceError> {
        match self {
            Self::Scrape(s) => s.window().await,
            Self::Prometheus(p) => p.window(window).await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_totals_split_errors_by_route_and_survive_restarts() {
        let text = "# TYPE apitree_proxy_requests_total counter\n\
apitree_proxy_requests_total{route=\"a\",status_class=\"2xx\"} 90\n\
apitree_proxy_requests_total{route=\"a\",status_class=\"5xx\"} 10\n\
apitree_proxy_requests_total{route=\"b\",status_class=\"4xx\"} 5\n\
# TYPE apitree_proxy_auth_failures_total counter\n\
apitree_proxy_auth_failures_total{reason=\"unknown_api_key\"} 3\n";
        let t = totals(text, "x").unwrap();
        assert_eq!(t.requests["a"], 100.0);
        assert_eq!(t.errors["a"], 10.0);
        assert_eq!(t.requests["b"], 5.0);
        assert_eq!(t.auth_failures, 3.0);
        assert_eq!(increase(150.0, Some(100.0)), 50);
        assert_eq!(
            increase(20.0, Some(100.0)),
            20,
            "a counter reset counts from zero"
        );
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_promql() {
        let b = [
            (0.01, 50.0),
            (0.1, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((histogram_quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        assert!((histogram_quantile(0.99, &b).unwrap() - 0.91).abs() < 1e-9);
        assert_eq!(
            histogram_quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
    }
}

#[cfg(test)]
mod agent_window_tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::from_texts([("agent".to_string(), text.to_string())]).unwrap()
    }

    /// Counts from outside (agents' reports) cannot overflow a window: any value sums
    /// saturating, with no panic in a debug build and no wrap in a release one.
    #[test]
    fn huge_counts_saturate() {
        let before = snapshot("apitree_proxy_requests_total{route=\"a\",status_class=\"5xx\"} 0\n");
        let now = snapshot(
            "apitree_proxy_requests_total{route=\"a\",status_class=\"5xx\"} 1e30\n\
             apitree_proxy_auth_failures_total{reason=\"x\"} 1e30\n",
        );
        let mut w = window_between(&before, &now);
        assert_eq!(w.routes["a"].requests, u64::MAX);
        w.absorb_agents(window_between(&before, &now));
        assert_eq!(w.routes["a"].requests, u64::MAX);
        assert_eq!(w.routes["a"].errors, u64::MAX);
    }

    /// What agents report adds to their routes, but neither their auth failures nor their
    /// requests enter the gateway-wide auth-failure ratio.
    #[test]
    fn agents_count_per_route_and_stay_out_of_the_gateway_wide_ratio() {
        let mut w = GatewayWindow {
            auth_failures: 3,
            ..Default::default()
        };
        w.routes.insert(
            "cluster".into(),
            RouteWindow {
                requests: 100,
                ..Default::default()
            },
        );
        let mut agents = GatewayWindow {
            auth_failures: 1000,
            ..Default::default()
        };
        agents.routes.insert(
            "accounts".into(),
            RouteWindow {
                requests: 5000,
                errors: 10,
                ..Default::default()
            },
        );
        w.absorb_agents(agents);
        assert_eq!(w.auth_failures, 3);
        assert_eq!(w.agent_requests, 5000);
        assert_eq!(w.routes["accounts"].errors, 10);
        assert_eq!(w.routes["cluster"].requests, 100);
    }
}
