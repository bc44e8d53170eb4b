//! The detector's two metric sources against real HTTP: scraping an in-process proxy, and a real
//! Prometheus server (Debian's `prometheus`, started here on loopback) scraping that proxy.

mod common;

use std::time::Duration;

use apitree::crd::gateway::KeyScope;
use apitree::detect::source::{MetricSource, PrometheusSource};
use common::gateway::*;

async fn proxy_with_traffic_source() -> (TestGateway, String) {
    let up = start_upstream().await;
    let (key, entry) = key_entry(KeyScope::Live, "o", "");
    let yaml = format!(
        "tiers:\n  - {{ name: t, perKey: {{ burst10s: 100000, perMinute: 100000, perDay: 1000000 }}, perOrg: {{ burst10s: 100000, perMinute: 100000, perDay: 1000000 }} }}\ndefaultTier: t\norgs: [{{ id: o }}]\nkeys:\n{entry}routes:\n  - {{ name: shop, pathPrefix: /shop/, upstream: \"http://{}/\", breaker: {{ consecutiveFailures: 1000, minCalls: 100000 }} }}\n",
        up.addr.unwrap()
    );
    (
        start_gateway(&yaml, None).await,
        key.expose_secret().to_string(),
    )
}

async fn traffic(gw: &TestGateway, key: &str, ok: usize, failing: usize) {
    let c = client();
    for _ in 0..ok {
        c.get(gw.url("/shop/items"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
    }
    for _ in 0..failing {
        c.get(gw.url("/shop/fail"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
    }
    for _ in 0..3 {
        c.get(gw.url("/shop/items"))
            .bearer_auth("at_live_bogus")
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn scraping_the_proxy_yields_exact_windows() {
    let (gw, key) = proxy_with_traffic_source().await;
    let spec = apitree::crd::gateway::MetricSource::default();
    let url = gw.admin_url("/metrics");
    let target = apitree::detect::source::ScrapeTarget {
        name: url.clone(),
        client: reqwest::Client::new(),
        url,
    };
    let mut source = MetricSource::from_spec(&spec, vec![target], "");
    let window = Duration::from_secs(300);
    assert!(
        source.window(window).await.unwrap().is_none(),
        "the first scrape only primes"
    );
    traffic(&gw, &key, 20, 10).await;
    let w = source.window(window).await.unwrap().unwrap();
    assert_eq!(w.routes["shop"].requests, 30);
    assert_eq!(w.routes["shop"].errors, 10);
    assert_eq!(w.auth_failures, 3);
    let p99 = w.routes["shop"]
        .p99_ms
        .expect("p99 from the latency histogram");
    assert!(p99 > 0.0 && p99 < 5_000.0, "{p99}");
    let w = source.window(window).await.unwrap().unwrap();
    assert_eq!(
        w.routes["shop"].requests, 0,
        "the next window starts from the last scrape"
    );
}

/// Kills the server (and removes its data) when the test ends.
struct Prometheus(std::process::Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy's own count of requests on route `shop`, all series summed.
fn shop_requests(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apitree_proxy_requests_total{") && l.contains("route=\"shop\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn promql_windows_from_a_real_prometheus_server() {
    let (gw, key) = proxy_with_traffic_source().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: apitree\n    static_configs:\n      - targets: ['{}']\n        labels: {{ gateway: test }}\n",
            gw.admin
        ),
    )
    .unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus must be installed (scripts/test installs Debian's prometheus)");
    let _guard = Prometheus(child, dir);
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let mut ready = false;
    for _ in 0..100 {
        if c.get(format!("{base}/-/ready"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "prometheus did not become ready");
    // Target discovery is throttled (about 5 s): wait for the first successful scrape.
    let mut scraped = false;
    for _ in 0..150 {
        let up: serde_json::Value = c
            .get(format!("{base}/api/v1/query?query=up"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if up["data"]["result"][0]["value"][1] == "1" {
            scraped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scraped, "prometheus never scraped the proxy");
    // Traffic spread over several scrapes: each batch waits until Prometheus has scraped it.
    for batch in 0..4 {
        traffic(&gw, &key, 10, 5).await;
        let sent = shop_requests(&gw.metrics_text().await);
        common::eventually(&format!("prometheus scraped batch {batch}"), || {
            let (c, base) = (c.clone(), base.clone());
            async move {
                let v: serde_json::Value = c
                    // sum(apitree_proxy_requests_total{route="shop"})
                    .get(format!(
                        "{base}/api/v1/query?query=sum(apitree_proxy_requests_total%7Broute%3D%22shop%22%7D)"
                    ))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|n| n.parse::<f64>().ok())
                    == Some(sent)
            }
        })
        .await;
    }
    let source = PrometheusSource::new(&base, "gateway=\"test\"");
    let w = source.window(Duration::from_secs(60)).await.unwrap();
    let shop = &w.routes["shop"];
    // increase() extrapolates over the range, so allow slack around the 60 / 20 sent.
    assert!((30..=90).contains(&shop.requests), "{w:?}");
    let ratio = shop.errors as f64 / shop.requests as f64;
    assert!(
        (0.2..=0.45).contains(&ratio),
        "error ratio {ratio} from {w:?}"
    );
    assert!(w.auth_failures >= 4, "{w:?}");
    assert!(shop.p99_ms.is_some_and(|p| p > 0.0), "{w:?}");
    let bad = PrometheusSource::new(&base, "gateway=~\"(\"");
    let err = bad
        .window(Duration::from_secs(60))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("answered an error"), "{err}");
}
