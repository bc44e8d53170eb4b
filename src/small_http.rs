//! The HTTP/1.1 server behind the operator's port and the console's: a request head must be
//! whole within a header-read timeout (a client that sends half a request or idles cannot hold
//! a connection), heads over 64 KiB are answered 431, and with a certificate the port speaks
//! TLS 1.3 only, with HSTS on every response and the pair re-read when its files change.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::tls::ServerTls;

/// Request heads longer than this are answered 431 (the proxy's limit).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A port's TLS from a certificate and key file (TLS 1.3, HTTP/1.1, HSTS, reloaded when the
/// files change), with its metrics `{prefix}_tls_*` in `registry`.
pub fn tls(
    cert: &Path,
    key: &Path,
    registry: &prometheus::Registry,
    prefix: &str,
) -> Result<Arc<ServerTls>, String> {
    let cfg = crate::proxy::config::TlsConfig {
        cert_file: cert.to_path_buf(),
        key_file: key.to_path_buf(),
        min_version: Default::default(),
        hsts: Default::default(),
        redirect: None,
    };
    let tls = ServerTls::new(&cfg, Path::new(""), registry, prefix, &[b"http/1.1"])?;
    tokio::spawn(tls.certificates.clone().watch());
    Ok(tls)
}

/// Serves `handler` (a request and the client's address) on `listener` until `stop`
/// resolves; over TLS when `tls` is given.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    header_read: Duration,
    stop: impl Future<Output = ()>,
    handler: H,
) where
    H: Fn(http::Request<Incoming>, IpAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        crate::proxy::transport::workers::accept_failed(&e).await;
                        continue;
                    }
                };
                let tls = tls.clone();
                let hsts = tls.as_ref().map(|t| t.hsts.clone());
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |req| {
                    let (handler, hsts) = (handler.clone(), hsts.clone());
                    async move {
                        let mut resp = handler(req, peer.ip()).await;
                        if let Some(hsts) = hsts {
                            resp.headers_mut().insert(http::header::STRICT_TRANSPORT_SECURITY, hsts);
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(header_read)
                        .max_header_size(MAX_HEAD_BYTES);
                    let Some(tls) = tls else {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        return;
                    };
                    let handshake = tokio::time::timeout(header_read, tls.acceptor.accept(stream)).await;
                    if let Some(stream) = tls.accepted(handshake) {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                });
            }
        }
    }
}
