//! Graceful shutdown of one worker's client connections.
//!
//! hyper-util's `GracefulShutdown` polls a watch channel every time a connection is polled,
//! which is several hundred instructions per request on the proxy's hot path. Here a
//! connection registers its task's waker once; polling costs one flag load. On
//! [`Drain::drain`] every registered connection is woken, sees the flag and finishes its
//! in-flight request and closes (a hyper connection through [`graceful`], the fast path in
//! `front.rs` by itself); `drain` returns when the last one has ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

use crate::proxy::FastMap;

/// One worker's open connections and whether they are being drained.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    conns: Mutex<Conns>,
    /// Signalled when the last connection ends while draining.
    empty: Notify,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Each open connection's waker, once it has been polled.
    wakers: FastMap<u64, Option<Waker>>,
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wraps a connection; it counts as open from now until the wrapper is dropped, and its
    /// task is woken when draining starts. The connection itself sees [`Drain::draining`]
    /// and closes ([`graceful`] does that for a hyper connection).
    pub fn watch<C: Future>(self: &Arc<Self>, conn: C) -> Watched<C> {
        let mut conns = self.lock();
        let id = conns.next_id;
        conns.next_id += 1;
        conns.wakers.insert(id, None);
        Watched {
            conn: Box::pin(conn),
            drain: self.clone(),
            id,
            registered: false,
        }
    }

    /// Whether the worker is draining: connections finish what is in flight and close.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.lock().wakers.len()
    }

    /// Tells every connection to finish its in-flight request and close, and waits until all
    /// have ended. New connections watched after this close at their first poll.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        for waker in self.lock().wakers.values().flatten() {
            waker.wake_by_ref();
        }
        loop {
            let empty = self.empty.notified();
            tokio::pin!(empty);
            empty.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            empty.await;
        }
    }
}

/// A connection counted by its [`Drain`].
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    drain: Arc<Drain>,
    id: u64,
    registered: bool,
}

impl<C: Future> Future for Watched<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.registered {
            // A spawned task keeps its waker: registering once is enough.
            this.registered = true;
            if let Some(slot) = this.drain.lock().wakers.get_mut(&this.id) {
                *slot = Some(cx.waker().clone());
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

/// A hyper connection that is asked to finish its in-flight request and close once its
/// drain drains (its task is woken then when it is [`Drain::watch`]ed).
pub struct Graceful<C> {
    conn: Pin<Box<C>>,
    drain: Arc<Drain>,
    closing: bool,
}

/// Wraps a hyper connection in [`Graceful`].
pub fn graceful<C: GracefulConnection>(drain: Arc<Drain>, conn: C) -> Graceful<C> {
    Graceful {
        conn: Box::pin(conn),
        drain,
        closing: false,
    }
}

impl<C: GracefulConnection> Graceful<C> {
    /// Asks the connection to finish what is in flight and close now, draining or not (an
    /// HTTP/2 GOAWAY, so a client knows which of its requests were not taken).
    pub fn close_gracefully(self: Pin<&mut Self>) {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.conn.as_mut().graceful_shutdown();
        }
    }
}

impl<C: GracefulConnection> Future for Graceful<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.closing && this.drain.draining() {
            this.closing = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> Drop for Watched<C> {
    fn drop(&mut self) {
        let mut conns = self.drain.lock();
        conns.wakers.remove(&self.id);
        if conns.wakers.is_empty() && self.drain.draining.load(Ordering::Acquire) {
            self.drain.empty.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server whose handler takes 200 ms; returns its address, its drain, and a channel
    /// that says each time a request has reached the handler.
    async fn slow_server() -> (
        std::net::SocketAddr,
        Arc<Drain>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let d = drain.clone();
        let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let arrived = arrived.clone();
                let svc = hyper::service::service_fn(move |_req| {
                    let _ = arrived.send(());
                    async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"done"),
                        )))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::spawn(d.watch(graceful(d.clone(), conn)));
            }
        });
        (addr, drain, arrivals)
    }

    #[tokio::test]
    async fn draining_finishes_the_request_in_flight_and_closes_idle_connections() {
        let (addr, drain, mut arrivals) = slow_server().await;
        // One idle keep-alive connection (answered once), then one with a request in flight.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 1024];
        let n = idle.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).ends_with("done"));
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Both requests reached the handler: the second one is in flight, not merely accepted.
        arrivals.recv().await.unwrap();
        arrivals.recv().await.unwrap();
        assert_eq!(drain.open(), 2);

        tokio::time::timeout(Duration::from_secs(2), drain.drain())
            .await
            .expect("drain ends once the in-flight request is answered");
        assert_eq!(drain.open(), 0);
        let mut answer = Vec::new();
        busy.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("done"),
            "in-flight answer completed: {answer}"
        );
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the idle connection was closed");
    }

    #[tokio::test]
    async fn draining_with_no_connections_returns_at_once() {
        let drain = Drain::new();
        tokio::time::timeout(Duration::from_millis(100), drain.drain())
            .await
            .unwrap();
    }
}
