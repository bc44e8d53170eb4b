//! The proxy's admin port: `/metrics`, `/healthz` and `/readyz` (ready, degraded or draining,
//! with the configuration's source and counts, the rate-limit store, the database and TLS),
//! and [`readyz_verdict`], how a caller reads a `/readyz` answer.

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::rescue::full;
use super::server::{Body, DependencyStatus, Gateway};

impl Gateway {
    /// The admin endpoints: /metrics, /healthz, /readyz.
    pub fn admin(&self, req: &Request<Incoming>) -> Response<Body> {
        let json = |status: StatusCode, v: serde_json::Value| {
            let mut r = Response::new(full(v.to_string()));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let skipped = self.state.current().skipped;
                for (kind, n) in skipped.by_kind() {
                    self.metrics
                        .database_rows_skipped
                        .with_label_values(&[kind])
                        .set(n as i64);
                }
                let mut r = Response::new(full(self.metrics.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                let state = self.state.current();
                let database = *self.database.lock().unwrap_or_else(|p| p.into_inner());
                let limiter = self.limiter.backend_status();
                let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
                let tls = self
                    .tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|c| c.status());
                let status = if draining {
                    "draining"
                } else if limiter == "degraded" || database == DependencyStatus::Degraded {
                    "degraded"
                } else {
                    "ready"
                };
                let code = if draining {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                json(
                    code,
                    serde_json::json!({
                        "status": status,
                        "config": {"source": state.source, "routes": state.routes.len(), "keys": state.keys.len(), "skipped": state.skipped},
                        "rateLimitStore": limiter,
                        "database": database.label(),
                        "tls": tls,
                    }),
                )
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found; try /metrics, /healthz or /readyz", "code": "no_route"}),
            ),
        }
    }
}

/// What a caller makes of a proxy's `/readyz` answer (`code` and its JSON `doc`): ready, or
/// what it says instead, e.g. `degraded (database ok, rate-limit store degraded)`.
pub fn readyz_verdict(code: u16, doc: &serde_json::Value) -> Result<(), String> {
    let status = doc["status"].as_str().unwrap_or("unknown");
    if (200..300).contains(&code) && status == "ready" {
        Ok(())
    } else {
        Err(format!(
            "{status} (database {}, rate-limit store {})",
            doc["database"].as_str().unwrap_or("?"),
            doc["rateLimitStore"].as_str().unwrap_or("?")
        ))
    }
}
