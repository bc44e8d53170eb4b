//! Response body adapters of the request path: reading a body whole up to a limit, reading a
//! prefix (to scan it) and handing on the prefix and the rest as one body, and masking PII in a
//! response as it streams.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use prometheus::IntCounter;

use super::pii::StreamMasker;
use super::server::{Body, BoxError};
use super::transport::upstream::{self, UpstreamBody};

/// The whole body, or None when it fails or runs past `limit` bytes. (Not `Limited`: over a
/// boxed body its error bound makes the request future impossible to prove `Send`.)
pub(crate) async fn collect_limited(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut all = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if all.len() + data.len() > limit {
                return None;
            }
            all.extend_from_slice(&data);
        }
    }
    Some(all.freeze())
}

/// Reads frames until `limit` bytes: what was read, and how the body goes on.
pub(crate) async fn collect_up_to(mut body: UpstreamBody, limit: usize) -> PrefixedBody {
    let mut head = VecDeque::new();
    let mut size = 0;
    loop {
        let rest = match body.frame().await {
            None => Rest::Ended,
            Some(Err(e)) => Rest::Failed(Some(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    head.push_back(data);
                }
                if size <= limit {
                    continue;
                }
                Rest::Body(body)
            }
        };
        return PrefixedBody { head, rest };
    }
}

/// Already-read chunks followed by the rest of a body: more of it, its end, or its failure,
/// which reaches the client as a failure (a cut-off body must never look whole).
pub(crate) struct PrefixedBody {
    pub(crate) head: VecDeque<Bytes>,
    rest: Rest,
}

pub(crate) enum Rest {
    Body(UpstreamBody),
    Ended,
    /// Taken when it is passed on.
    Failed(Option<upstream::UpstreamError>),
}

impl PrefixedBody {
    /// The whole body was read without failing.
    pub(crate) fn complete(&self) -> bool {
        matches!(self.rest, Rest::Ended)
    }
}

impl HttpBody for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match &mut self.rest {
            Rest::Ended => Poll::Ready(None),
            Rest::Failed(e) => match e.take() {
                Some(e) => Poll::Ready(Some(Err(Box::new(e)))),
                None => Poll::Ready(None),
            },
            Rest::Body(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }
}

/// Masks PII while streaming, with bounded memory; same length in and out.
pub(crate) struct MaskingBody {
    inner: UpstreamBody,
    masker: StreamMasker,
    done: bool,
    counters: [IntCounter; 3],
}

impl MaskingBody {
    pub(crate) fn new(inner: UpstreamBody, counters: [IntCounter; 3]) -> Self {
        Self {
            inner,
            masker: StreamMasker::new(),
            done: false,
            counters,
        }
    }
}

impl HttpBody for MaskingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let out = self.masker.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let out = self.masker.finish();
                    let counts = self.masker.counts;
                    for (i, c) in self.counters.iter().enumerate() {
                        c.inc_by(counts.0[i]);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
