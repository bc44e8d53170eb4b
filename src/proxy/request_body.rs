//! The client's request body on its way to the upstream: a read timeout of its own (between
//! two pieces of body, like nginx's `client_body_timeout`), and a record of how it ended, so a
//! failure the client caused — a malformed chunked body, an upload that stops or disconnects —
//! is answered as the client's (400, 408, or a logged 499) and never counted against the
//! upstream, its breaker, the error-ratio metrics or the detector.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::server::{Body, BoxError};
use super::transport::timer::{self, Sleep};

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Not valid HTTP framing (a bad chunk size, a bad chunk end).
    Malformed,
    /// No byte of it arrived for the body read timeout.
    TimedOut,
    /// The client closed or reset the connection before the body ended.
    Closed,
}

const READING: u8 = 0;
const ENDED: u8 = 1;
const MALFORMED: u8 = 2;
const TIMED_OUT: u8 = 3;
const CLOSED: u8 = 4;

/// What became of a body, shared between the body (in the upstream connection's task) and the
/// request that sent it.
#[derive(Debug, Default)]
pub struct BodyWatch {
    state: AtomicU8,
    /// The body was last asked for data the client had not sent yet (as opposed to having
    /// handed data on that the upstream side has not taken).
    waiting: AtomicBool,
}

impl BodyWatch {
    /// The client's fault, if the body failed.
    pub fn fault(&self) -> Option<BodyFault> {
        match self.state.load(Ordering::Acquire) {
            MALFORMED => Some(BodyFault::Malformed),
            TIMED_OUT => Some(BodyFault::TimedOut),
            CLOSED => Some(BodyFault::Closed),
            _ => None,
        }
    }

    /// The body has been read to its end.
    pub fn ended(&self) -> bool {
        self.state.load(Ordering::Acquire) == ENDED
    }

    /// Still being sent, and waiting for the client rather than for the upstream to read it.
    pub fn waiting_on_client(&self) -> bool {
        self.state.load(Ordering::Acquire) == READING && self.waiting.load(Ordering::Acquire)
    }

    fn set(&self, state: u8) {
        // The first outcome stays.
        let _ = self
            .state
            .compare_exchange(READING, state, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The body read timeout fired.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?}")]
pub struct BodyTimeout(Duration);

/// A client body that notes in its [`BodyWatch`] how it ended.
pub struct WatchedBody {
    inner: Body,
    watch: Arc<BodyWatch>,
    idle: Duration,
    /// Armed while the body waits for the client.
    deadline: Option<Sleep>,
}

impl WatchedBody {
    pub fn new(inner: Body, idle: Duration) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        let body = Self {
            inner,
            watch: watch.clone(),
            idle,
            deadline: None,
        };
        (body, watch)
    }
}

/// Which fault an error from the client-side body is.
fn classify(e: &BoxError) -> BodyFault {
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
            return BodyFault::Closed;
        }
        if h.is_timeout() {
            return BodyFault::TimedOut;
        }
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return BodyFault::Closed;
            }
        }
        source = s.source();
    }
    BodyFault::Malformed
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.deadline = None;
                this.watch.waiting.store(false, Ordering::Release);
                if this.inner.is_end_stream() {
                    this.watch.set(ENDED);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let state = match classify(&e) {
                    BodyFault::Malformed => MALFORMED,
                    BodyFault::TimedOut => TIMED_OUT,
                    BodyFault::Closed => CLOSED,
                };
                this.watch.set(state);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.watch.set(ENDED);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.watch.waiting.store(true, Ordering::Release);
                let idle = this.idle;
                // tokio's clock (the same as std's outside paused tests).
                let deadline = this.deadline.get_or_insert_with(|| {
                    timer::sleep_until(tokio::time::Instant::now().into_std() + idle)
                });
                match Pin::new(deadline).poll(cx) {
                    Poll::Ready(()) => {
                        this.watch.set(TIMED_OUT);
                        Poll::Ready(Some(Err(Box::new(BodyTimeout(idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
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
    use http_body_util::{BodyExt, StreamBody};

    fn streamed(parts: Vec<Result<Bytes, BoxError>>) -> Body {
        let frames = futures::stream::iter(parts.into_iter().map(|p| p.map(Frame::data)));
        StreamBody::new(frames).boxed()
    }

    #[tokio::test]
    async fn a_whole_body_ends_the_watch_without_fault() {
        let inner = streamed(vec![
            Ok(Bytes::from_static(b"ab")),
            Ok(Bytes::from_static(b"c")),
        ]);
        let (body, watch) = WatchedBody::new(inner, Duration::from_secs(5));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abc");
        assert!(watch.ended());
        assert_eq!(watch.fault(), None);
    }

    #[tokio::test]
    async fn a_failing_body_is_the_clients_fault_by_kind() {
        let reset: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let inner = streamed(vec![Ok(Bytes::from_static(b"ab")), Err(reset)]);
        let (body, watch) = WatchedBody::new(inner, Duration::from_secs(5));
        assert!(body.collect().await.is_err());
        assert_eq!(watch.fault(), Some(BodyFault::Closed));

        let bad: BoxError = "invalid chunk size line".into();
        let (body, watch) = WatchedBody::new(streamed(vec![Err(bad)]), Duration::from_secs(5));
        assert!(body.collect().await.is_err());
        assert_eq!(watch.fault(), Some(BodyFault::Malformed));
        assert!(!watch.ended());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_between_pieces_not_overall() {
        // A piece every 3 s with a 5 s idle timeout passes however long the whole takes.
        let slow = futures::stream::unfold(0, |n| async move {
            if n == 4 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let (body, watch) = WatchedBody::new(StreamBody::new(slow).boxed(), Duration::from_secs(5));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 4);
        assert!(watch.ended());

        // Then silence: the body fails with the timeout after 5 s.
        let stalled = futures::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let (body, watch) =
            WatchedBody::new(StreamBody::new(stalled).boxed(), Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(60), body.collect()).await;
        assert!(ended.expect("the body ends within 60 s").is_err());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert_eq!(watch.fault(), Some(BodyFault::TimedOut));
    }
}
