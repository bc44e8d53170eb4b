//! The plain-HTTP listener of a TLS gateway (`tls.redirect`): every request is answered
//! `308 Permanent Redirect` to the same host and target over https, nothing is forwarded, and
//! the request's fields (an API key among them) are neither read nor logged. 308 keeps the
//! method and body, so a client that follows it repeats its call over TLS.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpListener;

/// Answers every connection accepted on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    https_port: u16,
    header_read: Duration,
    redirects: IntCounter,
) {
    let redirects = Arc::new(redirects);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                super::transport::workers::accept_failed(&e).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let redirects = redirects.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = answer(&req, https_port);
                if resp.status() == StatusCode::PERMANENT_REDIRECT {
                    redirects.inc();
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = super::transport::workers::http1_builder(header_read)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The answer to one request: 308 to `https://{host}[:{https_port}]{path}?{query}`, or 400
/// when the request names no valid host to send the client to.
pub fn answer<B>(req: &Request<B>, https_port: u16) -> Response<Full<Bytes>> {
    let host = super::inbound::check_host(http::Version::HTTP_11, req.headers())
        .ok()
        .and_then(|()| req.headers().get(HOST))
        .and_then(|h| h.to_str().ok())
        .map(strip_port);
    let Some(host) = host else {
        let body = serde_json::json!({
            "error": "this port only redirects to https, and the request names no valid Host to redirect to; call https:// directly",
            "code": "bad_host",
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return resp;
    };
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .trim_start_matches('*');
    let target = if target.starts_with('/') { target } else { "/" };
    let location = if https_port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{https_port}{target}")
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    // The host passed `check_host` and the target is what hyper parsed: both are visible ASCII.
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

/// `host[:port]` → `host` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(host: Option<&str>, target: &str, port: u16) -> (u16, Option<String>) {
        let mut b = Request::builder().uri(target);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        let resp = answer(&b.body(()).unwrap(), port);
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|v| v.to_str().unwrap().to_string());
        (resp.status().as_u16(), location)
    }

    /// Host, target, https port → status, Location.
    type Case<'a> = (Option<&'a str>, &'a str, u16, u16, Option<&'a str>);

    #[test]
    fn every_request_goes_to_the_same_host_and_target_over_https() {
        let cases: &[Case] = &[
            (
                Some("api.example.com"),
                "/v1/x?y=1",
                443,
                308,
                Some("https://api.example.com/v1/x?y=1"),
            ),
            (
                Some("api.example.com:80"),
                "/",
                443,
                308,
                Some("https://api.example.com/"),
            ),
            (
                Some("api.example.com:8080"),
                "/a",
                8443,
                308,
                Some("https://api.example.com:8443/a"),
            ),
            (
                Some("[::1]:8080"),
                "/a",
                8443,
                308,
                Some("https://[::1]:8443/a"),
            ),
            (Some("[::1]"), "/a", 443, 308, Some("https://[::1]/a")),
            (
                Some("10.0.0.1:80"),
                "/a",
                443,
                308,
                Some("https://10.0.0.1/a"),
            ),
            // An absolute-form target keeps only its path: the Host decides where to.
            (
                Some("api.example.com"),
                "http://evil.example/steal?q",
                443,
                308,
                Some("https://api.example.com/steal?q"),
            ),
            // A path that looks like an authority stays a path on the same host.
            (
                Some("api.example.com"),
                "//evil.example/x",
                443,
                308,
                Some("https://api.example.com//evil.example/x"),
            ),
            (
                Some("api.example.com"),
                "*",
                443,
                308,
                Some("https://api.example.com/"),
            ),
            // No valid host: nowhere to send the client.
            (None, "/a", 443, 400, None),
            (Some("a b"), "/a", 443, 400, None),
            (Some("user@evil.example"), "/a", 443, 400, None),
            (Some("evil.example/x"), "/a", 443, 400, None),
            (Some(""), "/a", 443, 400, None),
        ];
        for (host, target, port, status, location) in cases {
            let got = redirect(*host, target, *port);
            assert_eq!(
                got,
                (*status, location.map(String::from)),
                "Host {host:?}, target {target}"
            );
        }
    }
}
