//! The proxy's upstream connections: per worker thread, a pool of HTTP/1 connections to each
//! upstream, used without locks (a worker's requests and their upstream calls stay on its
//! thread, see `server::run_with_workers`).
//!
//! A connection goes back to its pool when its response body has been read to the end; one
//! whose body is dropped half-read is closed. Idle connections are reused newest first, dropped
//! after [`IDLE_TIMEOUT`], and at most [`MAX_IDLE_PER_UPSTREAM`] wait per upstream. A request an
//! idle connection could not take (the upstream closed it meanwhile) goes out again on another
//! connection; a request already written is never sent twice.
//!
//! Measured against hyper-util's pooled client in `benches/proxy-vs-nginx.sh` (the bare proxy,
//! `bare-workerpool` against `bare-hyper`): 6–13% less CPU per request in the same run.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use super::fasthash::FastMap;
use super::server::Body;

/// Idle connections older than this are closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and worker; more are closed.
pub const MAX_IDLE_PER_UPSTREAM: usize = 1024;

type Key = (Scheme, Authority);

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

struct Pool {
    idle: RefCell<FastMap<Key, VecDeque<Idle>>>,
    connector: HttpsConnector<HttpConnector>,
}

thread_local! {
    static POOL: Pool = Pool {
        idle: RefCell::new(FastMap::default()),
        connector: crate::tls::https_or_http(),
    };
}

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URL {0} has no scheme or host")]
    NotAbsolute(Uri),
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// A connection that was idle, newest first; None when none is left.
fn checkout(key: &Key) -> Option<SendRequest<Body>> {
    POOL.with(|p| {
        let mut idle = p.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop_back() {
            if i.since.elapsed() >= IDLE_TIMEOUT {
                // The rest are older still.
                list.clear();
                return None;
            }
            if !i.sender.is_closed() {
                return Some(i.sender);
            }
        }
        None
    })
}

fn checkin(key: Key, sender: SendRequest<Body>) {
    if sender.is_closed() {
        return;
    }
    POOL.with(|p| {
        let mut idle = p.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        while list
            .front()
            .is_some_and(|i| i.since.elapsed() >= IDLE_TIMEOUT || i.sender.is_closed())
        {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE_PER_UPSTREAM {
            list.pop_front();
        }
        list.push_back(Idle {
            sender,
            since: Instant::now(),
        });
    })
}

/// Idle connections this worker holds to `scheme://authority`.
pub fn idle_count(scheme: &Scheme, authority: &Authority) -> usize {
    POOL.with(|p| {
        p.idle
            .borrow()
            .get(&(scheme.clone(), authority.clone()))
            .map_or(0, |l| l.iter().filter(|i| !i.sender.is_closed()).count())
    })
}

/// How long a TCP connect to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(key: &Key) -> Result<SendRequest<Body>, UpstreamError> {
    if key.0 == Scheme::HTTP {
        // Plain TCP without the TLS connector's stream wrapper in every read and write.
        let addr = key.1.as_str();
        let addr = if key.1.port().is_some() {
            addr.to_string()
        } else {
            format!("{addr}:80")
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| UpstreamError::Connect(format!("{addr}: timed out after 5s")))?
            .map_err(|e| UpstreamError::Connect(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        return handshake(hyper_util::rt::TokioIo::new(stream)).await;
    }
    let uri = Uri::builder()
        .scheme(key.0.clone())
        .authority(key.1.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let mut connector = POOL.with(|p| p.connector.clone());
    let io = connector
        .call(uri)
        .await
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    handshake(io).await
}

async fn handshake<T>(io: T) -> Result<SendRequest<Body>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        // Small requests: one flattened write beats writev (measured in benches/).
        .writev(false)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Sends `req` (absolute URI, Host header set) on a pooled connection to its upstream, or a
/// new one.
pub async fn request(mut req: Request<Body>) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (Some(scheme), Some(authority)) = (req.uri().scheme(), req.uri().authority()) else {
        return Err(UpstreamError::NotAbsolute(req.uri().clone()));
    };
    let key: Key = (scheme.clone(), authority.clone());
    // On the wire an HTTP/1 request names the path only.
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    loop {
        let (mut sender, reused) = match checkout(&key) {
            Some(s) => (s, true),
            None => (connect(&key).await?, false),
        };
        if let Err(e) = sender.ready().await {
            if reused {
                continue;
            }
            return Err(e.into());
        }
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(resp.map(|b| UpstreamBody::new(b, key, sender))),
            Err(mut e) => match e.take_message() {
                // Not written: the connection closed before it could take the request.
                Some(unsent) if reused => req = unsent,
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// A response body that hands its connection back to the pool once read to the end.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<(Key, SendRequest<Body>)>,
}

impl UpstreamBody {
    fn new(inner: Incoming, key: Key, sender: SendRequest<Body>) -> Self {
        let mut body = Self {
            inner,
            back: Some((key, sender)),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((key, sender)) = self.back.take() {
            checkin(key, sender);
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            // The last frame: the server may not poll again.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An upstream on loopback that counts the connections it accepted; `keep_alive` false
    /// closes each after one response, `close_after` closes each that long after it opened.
    async fn upstream(
        keep_alive: bool,
        close_after: Option<Duration>,
    ) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("you asked for {}", req.uri());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.keep_alive(keep_alive);
                    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    match close_after {
                        Some(after) => {
                            let _ = tokio::time::timeout(after, conn).await;
                        }
                        None => {
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn get(authority: &Authority, path: &str) -> Request<Body> {
        Request::builder()
            .uri(format!("http://{authority}{path}"))
            .header(http::header::HOST, authority.as_str())
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap()
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sequential_requests_share_one_connection_and_send_the_path_only() {
        let (up, accepted) = upstream(true, None).await;
        for i in 0..5 {
            let resp = request(get(&up, &format!("/items/{i}?x=1"))).await.unwrap();
            assert_eq!(text(resp).await, format!("you asked for /items/{i}?x=1"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_half_read_response_does_not_hand_its_connection_back() {
        let (up, accepted) = upstream(true, None).await;
        let resp = request(get(&up, "/a")).await.unwrap();
        drop(resp);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 0);
        let resp = request(get(&up, "/b")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_closes_connections_is_still_served() {
        // Closes after every response.
        let (up, accepted) = upstream(false, None).await;
        for i in 0..3 {
            let resp = request(get(&up, &format!("/{i}"))).await.unwrap();
            assert_eq!(text(resp).await, format!("you asked for /{i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // Closes each connection 50 ms after it opened: the pooled one is gone by the next
        // request, which goes out on a new one.
        let (up, accepted) = upstream(true, Some(Duration::from_millis(50))).await;
        let resp = request(get(&up, "/first")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /first");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let resp = request(get(&up, "/second")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_stream_both_ways_and_the_connection_is_reused() {
        // An upstream that streams each request body back as the response body.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(req.into_body()))
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        // 4 MiB in 64 KiB chunks, far more than the socket buffers hold: the request is still
        // being written while the response is already coming back.
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        for round in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxErr>>(4);
            let body = http_body_util::StreamBody::new(tokio_stream(rx)).boxed();
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://{up}/echo"))
                .header(http::header::HOST, up.as_str())
                .body(body)
                .unwrap();
            let sending = chunk.clone();
            let feeder = tokio::spawn(async move {
                for _ in 0..64 {
                    let frame = Frame::data(Bytes::from(sending.clone()));
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            });
            let resp = request(req).await.unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            feeder.await.unwrap();
            assert_eq!(got.len(), 64 * chunk.len(), "round {round}");
            assert!(got.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused it"
        );
        assert_eq!(idle_count(&Scheme::HTTP, &up), 1);
    }

    type BoxErr = Box<dyn std::error::Error + Send + Sync>;

    /// A stream of a channel's items.
    fn tokio_stream<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + Sync + 'static
    where
        T: Send + 'static,
    {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let err = request(get(&addr, "/")).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect(_)), "{err}");
    }
}
