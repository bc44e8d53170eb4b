//! Outgoing HTTP(S) connections, shared by the proxy's upstream client and Slack delivery.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

/// A connector for `http://` and `https://` URLs: rustls with the system's CA certificates
/// (the ring provider `main` installs), TCP_NODELAY, a 5 s connect timeout.
pub fn https_or_http() -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .unwrap_or_else(|_| {
            // No system CA bundle: plain http still works; https fails verification.
            tracing::warn!(
                "no system CA certificates found; https connections will fail verification"
            );
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        })
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// An error and its sources, `: `-joined: reqwest's and hyper's own texts omit the cause (a
/// certificate that did not verify, a refused connection).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
