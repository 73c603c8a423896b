//! Reading a write's request body **before** anything is reserved: the body is
//! collected within a size limit and a read timeout, then handed to the inner service
//! as a body of the same type.
//!
//! # Why
//!
//! A write that reserves its resource (a lease in store mode, a transaction with the
//! version row locked in [transactional mode](crate::transactional)) and only then lets
//! the handler read the body gives a client that sends the headers and stalls a lock
//! on the resource: everyone else gets `409` (or waits on the row lock) until the lease
//! or the deadline runs out, and in transactional mode the stalled write also pins a
//! pooled connection with an open transaction. Reading the body first means a stall
//! costs only the stalled client's own socket and buffer: nothing shared is held until
//! the whole body is in hand.
//!
//! Buffering is also what makes a cut-off upload harmless: a body that fails, ends
//! before its `Content-Length`, or runs over it, is refused with `400` before anything
//! is reserved, so no handler sees half a body and no version changes.
//!
//! # Defaults ([`RequestBodyConfig::new`])
//!
//! | setting | default | refusal |
//! | --- | --- | --- |
//! | size limit | 2 MiB ([`DEFAULT_LIMIT`](RequestBodyConfig::DEFAULT_LIMIT)) | `413`, up front when `Content-Length` says so (nothing is read) |
//! | read timeout, for the whole body | 10 s ([`DEFAULT_READ_TIMEOUT`](RequestBodyConfig::DEFAULT_READ_TIMEOUT)) | `408` |
//! | body errors, or ends short of / past its `Content-Length` | | `400` |
//!
//! The limit matches axum's `DefaultBodyLimit` (2 MB), so putting a layer in front of an
//! axum app does not refuse bodies the app's extractors would accept, and it bounds
//! what a write can buffer. The memory cost is one body per write being read at once;
//! a server that accepts many slow uploads at once should lower the limit or bound
//! its connections. The timeout covers the whole body, not the gap between two reads,
//! so a client dripping one byte at a time is cut off too; at the defaults, a
//! full-size body needs about 210 KB/s. Every setting saturates: `usize::MAX` and
//! `Duration::MAX` mean "no limit" and "no timeout".
//!
//! Trailers of a buffered body are dropped (the rebuilt body has the data only).
//!
//! # Streaming (opt-in)
//!
//! [`RequestBodyConfig::streaming`] passes the body through unread, as it arrives: for
//! uploads too large to hold in memory. The cost is the one above: the reservation is
//! taken before the first byte, so a client that stalls holds it until the handler's
//! deadline (each layer documents what that holds in its mode).
//!
//! # Body types
//!
//! The inner service receives the body type it was given, rebuilt from the collected
//! bytes through [`BufferableBody`]. It is implemented for axum's body (feature `axum`),
//! [`Full<Bytes>`](http_body_util::Full), [`BoxBody`],
//! [`UnsyncBoxBody`] and `String`. A hyper
//! server's [`Incoming`](https://docs.rs/hyper/1/hyper/body/struct.Incoming.html) cannot
//! be rebuilt from bytes; box it before the layer:
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::{combinators::BoxBody, BodyExt};
//! use tower::ServiceBuilder;
//!
//! # fn wrap<S>(service: S) {
//! // `S: Service<Request<BoxBody<Bytes, hyper::Error>>>`, the layer inside.
//! let service = ServiceBuilder::new()
//!     .map_request(|request: Request<hyper::body::Incoming>| request.map(|body| body.boxed()))
//!     .service(service);
//! # let _ = service;
//! # }
//! ```

use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body::Body;
use http_body_util::{
    combinators::{BoxBody, UnsyncBoxBody},
    BodyExt, Full, LengthLimitError,
};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::response::Problem;

/// The error type a buffered body's error must convert into.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A request body type a layer can collect and then rebuild from the collected bytes,
/// so the inner service receives the same body type it would have without the layer
/// (axum's `Router::layer` requires exactly that).
///
/// Implemented for axum's `Body` (feature `axum`), [`Full<Bytes>`], [`BoxBody`],
/// [`UnsyncBoxBody`] and `String`; see the [module docs](self) for hyper's `Incoming`.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_precondition::BufferableBody;
///
/// let body = <Full<Bytes> as BufferableBody>::from_bytes(Bytes::from_static(b"hello"));
/// # let _ = body;
/// ```
pub trait BufferableBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Sized + Send + 'static
{
    /// A body that yields `bytes` (in one frame, or none if empty) and then ends.
    fn from_bytes(bytes: Bytes) -> Self;

    /// `body`, made to record in `failed` that it failed while the handler read it
    /// (used when the body is [streamed](RequestBodyConfig::streaming), so that a body
    /// cut off mid-upload gives the resource a fresh version whatever the handler
    /// answers). The default hands `body` back unwatched: right for bodies that cannot
    /// fail (`Full`, `String`).
    fn watched(body: Self, failed: WatchFlag) -> Self {
        let _ = failed;
        body
    }
}

/// Set by a [watched](BufferableBody::watched) body when it yields an error.
#[derive(Clone, Debug, Default)]
pub struct WatchFlag(Arc<AtomicBool>);

impl WatchFlag {
    /// Whether the body failed.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

pin_project! {
    /// A body that records its failure in a [`WatchFlag`] and is otherwise `B`.
    #[derive(Debug)]
    pub struct WatchedBody<B> {
        #[pin]
        inner: B,
        failed: WatchFlag,
    }
}

impl<B> WatchedBody<B> {
    /// `inner`, recording its failure in `failed`.
    pub fn new(inner: B, failed: WatchFlag) -> Self {
        Self { inner, failed }
    }
}

impl<B: Body> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Err(_)) = &frame {
            this.failed.set();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(feature = "axum")]
impl BufferableBody for axum_core::body::Body {
    fn from_bytes(bytes: Bytes) -> Self {
        Self::from(bytes)
    }

    fn watched(body: Self, failed: WatchFlag) -> Self {
        Self::new(WatchedBody::new(body, failed))
    }
}

impl BufferableBody for Full<Bytes> {
    fn from_bytes(bytes: Bytes) -> Self {
        Self::new(bytes)
    }
}

impl<E> BufferableBody for BoxBody<Bytes, E>
where
    E: Into<BoxError> + 'static,
{
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes).map_err(|never| match never {}).boxed()
    }

    fn watched(body: Self, failed: WatchFlag) -> Self {
        WatchedBody::new(body, failed).boxed()
    }
}

impl<E> BufferableBody for UnsyncBoxBody<Bytes, E>
where
    E: Into<BoxError> + 'static,
{
    fn from_bytes(bytes: Bytes) -> Self {
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn watched(body: Self, failed: WatchFlag) -> Self {
        WatchedBody::new(body, failed).boxed_unsync()
    }
}

impl BufferableBody for String {
    fn from_bytes(bytes: Bytes) -> Self {
        // `String` bodies carry text only; bytes that are not UTF-8 are kept readable
        // rather than refused, since the layer does not judge the body's content.
        match String::from_utf8(bytes.into()) {
            Ok(text) => text,
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        }
    }
}

/// How a layer reads a write's request body: buffered within a size limit and a read
/// timeout (the default), or streamed through unread. See the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower_precondition::RequestBodyConfig;
///
/// let config = RequestBodyConfig::new()
///     .limit(256 * 1024)
///     .read_timeout(Duration::from_secs(5));
/// assert_eq!(config.get_limit(), 256 * 1024);
/// assert!(!config.is_streaming());
/// assert!(RequestBodyConfig::streaming().is_streaming());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct RequestBodyConfig {
    limit: usize,
    read_timeout: Duration,
    streaming: bool,
}

impl Default for RequestBodyConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestBodyConfig {
    /// The default size limit: 2 MiB, as axum's `DefaultBodyLimit`.
    pub const DEFAULT_LIMIT: usize = 2 * 1024 * 1024;

    /// The default time allowed to read the whole body: 10 s.
    pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

    /// Buffered, with [`DEFAULT_LIMIT`](Self::DEFAULT_LIMIT) and
    /// [`DEFAULT_READ_TIMEOUT`](Self::DEFAULT_READ_TIMEOUT).
    pub const fn new() -> Self {
        Self {
            limit: Self::DEFAULT_LIMIT,
            read_timeout: Self::DEFAULT_READ_TIMEOUT,
            streaming: false,
        }
    }

    /// Bodies passed through unread (the reservation is taken before the first byte;
    /// see the [module docs](self) for the cost). Limit and timeout do not apply.
    pub const fn streaming() -> Self {
        Self {
            streaming: true,
            ..Self::new()
        }
    }

    /// The largest body accepted, in bytes; larger ones get `413`. `usize::MAX` is
    /// no limit. Also switches streaming off.
    pub const fn limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self.streaming = false;
        self
    }

    /// The time allowed to read the whole body; a slower one gets `408`.
    /// `Duration::MAX` is no timeout. Also switches streaming off.
    pub const fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self.streaming = false;
        self
    }

    /// The size limit in bytes.
    pub const fn get_limit(&self) -> usize {
        self.limit
    }

    /// The time allowed to read the whole body.
    pub const fn get_read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Whether bodies are streamed through unread.
    pub const fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// Collects `body` within the limit and the timeout, judging it against the
    /// `Content-Length` in `headers`. Refuses at once, without reading, a
    /// `Content-Length` over the limit (or one that does not parse).
    ///
    /// Works the same when [streaming](Self::is_streaming) is on: whether to call it is
    /// the caller's choice.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use bytes::Bytes;
    /// use http::{header, HeaderMap};
    /// use http_body_util::Full;
    /// use tower_precondition::{request_body::BodyRefusal, RequestBodyConfig};
    ///
    /// let config = RequestBodyConfig::new().limit(4);
    /// let body = Full::new(Bytes::from_static(b"abc"));
    /// let bytes = config.collect(&HeaderMap::new(), body).await.unwrap();
    /// assert_eq!(bytes, "abc");
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
    /// let refused = config.collect(&headers, Full::new(Bytes::from_static(b"abcde"))).await;
    /// assert!(matches!(refused, Err(BodyRefusal::TooLarge { limit: 4 })));
    /// # }
    /// ```
    pub fn collect<B: BufferableBody>(&self, headers: &HeaderMap, body: B) -> CollectBody<B> {
        let declared = match content_length(headers) {
            Ok(declared) => declared,
            Err(()) => return CollectBody::refused(BodyRefusal::InvalidContentLength),
        };
        let limit = self.limit;
        let over = |len: u64| usize::try_from(len).map_or(true, |len| len > limit);
        // A body that says it is too large is refused before a byte is read (hyper
        // then never sends `100 Continue`).
        if declared.is_some_and(over) || over(body.size_hint().lower()) {
            return CollectBody::refused(BodyRefusal::TooLarge { limit });
        }
        CollectBody {
            state: CollectState::Reading {
                body,
                collected: Collected::Empty,
                declared,
                limit,
                timeout: self.read_timeout,
                deadline: None,
            },
        }
    }
}

/// The bytes read so far: the common body of one frame is kept as it came, without a
/// copy; a second frame starts one buffer for all.
enum Collected {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl Collected {
    fn len(&self) -> usize {
        match self {
            Collected::Empty => 0,
            Collected::One(bytes) => bytes.len(),
            Collected::Many(buffer) => buffer.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Collected::Empty) {
            Collected::Empty => Collected::One(data),
            Collected::One(first) => {
                let mut buffer = Vec::with_capacity(first.len() + data.len());
                buffer.extend_from_slice(&first);
                buffer.extend_from_slice(&data);
                Collected::Many(buffer)
            }
            Collected::Many(mut buffer) => {
                buffer.extend_from_slice(&data);
                Collected::Many(buffer)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Collected::Empty => Bytes::new(),
            Collected::One(bytes) => bytes,
            Collected::Many(buffer) => Bytes::from(buffer),
        }
    }
}

/// The `Content-Length` of a request: `None` if absent, `Err` if it does not parse or
/// several values disagree (RFC 9112 section 6.3: an unrecoverable error).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        // A list (`5, 5`) is allowed if every member is the same number.
        let text = value.to_str().map_err(|_| ())?;
        for member in text.split(',') {
            let member = member.trim();
            if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let len: u64 = member.parse().map_err(|_| ())?;
            match found {
                Some(seen) if seen != len => return Err(()),
                _ => found = Some(len),
            }
        }
    }
    Ok(found)
}

pin_project! {
    /// The future of [`RequestBodyConfig::collect`]: the body's bytes, or why it was
    /// refused.
    #[must_use = "futures do nothing unless polled"]
    pub struct CollectBody<B>
    where
        B: BufferableBody,
    {
        #[pin]
        state: CollectState<B>,
    }
}

pin_project! {
    #[project = CollectProj]
    enum CollectState<B>
    where
        B: BufferableBody,
    {
        Refused { refusal: Option<BodyRefusal> },
        Reading {
            #[pin]
            body: B,
            collected: Collected,
            declared: Option<u64>,
            limit: usize,
            timeout: Duration,
            // Armed the first time the body is not ready: a body already in hand (the
            // common case) costs no timer.
            #[pin]
            deadline: Option<Sleep>,
        },
    }
}

impl<B: BufferableBody> CollectBody<B> {
    fn refused(refusal: BodyRefusal) -> Self {
        Self {
            state: CollectState::Refused {
                refusal: Some(refusal),
            },
        }
    }
}

impl<B: BufferableBody> fmt::Debug for CollectBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollectBody").finish_non_exhaustive()
    }
}

impl<B: BufferableBody> Future for CollectBody<B> {
    type Output = Result<Bytes, BodyRefusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            CollectProj::Refused { refusal } => Poll::Ready(Err(refusal
                .take()
                .unwrap_or(BodyRefusal::Failed { source: None }))),
            CollectProj::Reading {
                mut body,
                collected,
                declared,
                limit,
                timeout,
                mut deadline,
            } => loop {
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are not part of the bytes.
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        if data.len() > *limit - collected.len() {
                            return Poll::Ready(Err(BodyRefusal::TooLarge { limit: *limit }));
                        }
                        collected.push(data);
                    }
                    Poll::Ready(Some(Err(error))) => {
                        let error: BoxError = error.into();
                        return Poll::Ready(Err(if is_length_limit(&*error) {
                            BodyRefusal::TooLarge { limit: *limit }
                        } else {
                            BodyRefusal::Failed {
                                source: Some(error),
                            }
                        }));
                    }
                    Poll::Ready(None) => {
                        let collected = std::mem::replace(collected, Collected::Empty);
                        let received = collected.len() as u64;
                        return Poll::Ready(match *declared {
                            Some(expected) if expected != received => {
                                Err(BodyRefusal::LengthMismatch { expected, received })
                            }
                            _ => Ok(collected.into_bytes()),
                        });
                    }
                    Poll::Pending => {
                        if deadline.is_none() {
                            deadline.set(Some(tokio::time::sleep(*timeout)));
                        }
                        let expired = deadline
                            .as_pin_mut()
                            .is_some_and(|deadline| deadline.poll(cx).is_ready());
                        if expired {
                            return Poll::Ready(Err(BodyRefusal::TimedOut { after: *timeout }));
                        }
                        return Poll::Pending;
                    }
                }
            },
        }
    }
}

/// Whether `error`, or an error it wraps (axum's body limit wraps it), is the size limit.
fn is_length_limit(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<LengthLimitError>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// Why a request body was refused; each becomes a problem+json response (see
/// [`status`](Self::status) and [`code`](Self::code)).
#[derive(Debug)]
#[non_exhaustive]
pub enum BodyRefusal {
    /// The body (or its `Content-Length`) is over the limit: `413`.
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body was not in hand within the read timeout: `408`.
    TimedOut {
        /// The read timeout.
        after: Duration,
    },
    /// The body failed while being read (the client went away mid-upload, a broken
    /// chunked encoding): `400`.
    Failed {
        /// The body's error.
        source: Option<BoxError>,
    },
    /// The body ended short of, or ran past, its `Content-Length`: `400`.
    LengthMismatch {
        /// The declared length.
        expected: u64,
        /// The bytes received.
        received: u64,
    },
    /// The `Content-Length` does not parse, or several values disagree: `400`.
    InvalidContentLength,
}

impl BodyRefusal {
    /// The status of the response: `413`, `408` or `400`.
    pub fn status(&self) -> http::StatusCode {
        Problem::from(self).status()
    }

    /// The stable `code` member of the problem+json response.
    pub fn code(&self) -> &'static str {
        Problem::from(self).code()
    }

    /// The problem+json response for this refusal.
    pub fn into_response<B>(self) -> http::Response<crate::ResponseBody<B>> {
        Problem::from(&self).into_response()
    }
}

impl From<&BodyRefusal> for Problem {
    fn from(refusal: &BodyRefusal) -> Self {
        match refusal {
            BodyRefusal::TooLarge { limit } => Problem::body_too_large(*limit),
            BodyRefusal::TimedOut { after } => Problem::body_timed_out(*after),
            BodyRefusal::Failed { .. } => Problem::body_incomplete(
                "The request body could not be read to its end (the upload failed or \
                 was cut off), so the write was not attempted. Resend the whole body."
                    .into(),
            ),
            BodyRefusal::LengthMismatch { expected, received } => {
                Problem::body_incomplete(format!(
                    "The request body has {received} bytes, but its Content-Length says \
                     {expected}, so the write was not attempted. Resend the whole body."
                ))
            }
            BodyRefusal::InvalidContentLength => Problem::invalid_content_length(),
        }
    }
}

impl fmt::Display for BodyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "request body over the limit of {limit} bytes"),
            Self::TimedOut { after } => write!(f, "request body not read within {after:?}"),
            Self::Failed { source: Some(e) } => write!(f, "request body failed: {e}"),
            Self::Failed { source: None } => f.write_str("request body failed"),
            Self::LengthMismatch { expected, received } => write!(
                f,
                "request body has {received} bytes, Content-Length says {expected}"
            ),
            Self::InvalidContentLength => f.write_str("invalid Content-Length"),
        }
    }
}

impl StdError for BodyRefusal {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Failed { source: Some(e) } => Some(&**e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, StatusCode};
    use http_body::Frame;
    use http_body_util::{Limited, StreamBody};

    use super::*;

    fn with_length(len: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from_str(len).expect("value"),
        );
        headers
    }

    /// A body that yields `chunks`, then ends, fails, or never ends.
    fn chunks(chunks: &[&'static [u8]], then: Then) -> BoxBody<Bytes, std::io::Error> {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if let Then::Fail = then {
            frames.push(Err(std::io::Error::other("connection reset")));
        }
        let stream = futures_util::stream::iter(frames);
        match then {
            Then::Stall => {
                let stalled =
                    futures_util::StreamExt::chain(stream, futures_util::stream::pending());
                StreamBody::new(stalled).boxed()
            }
            _ => StreamBody::new(stream).boxed(),
        }
    }

    enum Then {
        End,
        Fail,
        Stall,
    }

    #[tokio::test]
    async fn a_whole_body_is_collected() {
        let body = chunks(&[b"ab", b"cd"], Then::End);
        let bytes = RequestBodyConfig::new()
            .collect(&with_length("4"), body)
            .await
            .expect("collected");
        assert_eq!(bytes, "abcd");
    }

    #[tokio::test]
    async fn frames_are_joined_up_to_the_limit_and_trailers_left_out() {
        let collect = |chunks_in: &[&'static [u8]], limit| {
            RequestBodyConfig::new()
                .limit(limit)
                .collect(&HeaderMap::new(), chunks(chunks_in, Then::End))
        };
        // One frame is handed on as it came; empty frames and none at all are fine.
        assert_eq!(collect(&[b"abc"], 3).await.unwrap(), "abc");
        assert_eq!(collect(&[], 3).await.unwrap(), "");
        assert_eq!(collect(&[b"", b"ab", b"", b"c"], 3).await.unwrap(), "abc");
        assert_eq!(collect(&[b"a", b"b", b"c"], 3).await.unwrap(), "abc");
        // One byte past the limit, in any frame, is too large.
        for over in [&[b"abcd" as &[u8]][..], &[b"ab", b"cd"], &[b"abc", b"d"]] {
            let refused = collect(over, 3).await;
            assert!(
                matches!(refused, Err(BodyRefusal::TooLarge { limit: 3 })),
                "{over:?}"
            );
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let bytes = RequestBodyConfig::new()
            .collect(&with_length("2"), body)
            .await
            .expect("collected");
        assert_eq!(bytes, "ab");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_without_reading() {
        // The body would stall forever: refusing it must not poll it.
        let body = chunks(&[], Then::Stall);
        let refused = RequestBodyConfig::new()
            .limit(10)
            .collect(&with_length("11"), body)
            .await;
        assert!(matches!(refused, Err(BodyRefusal::TooLarge { limit: 10 })));
        let refusal = refused.unwrap_err();
        assert_eq!(refusal.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(refusal.code(), "request_body_too_large");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_without_a_length_is_refused() {
        let body = chunks(&[b"12345", b"678"], Then::Stall);
        let refused = RequestBodyConfig::new()
            .limit(6)
            .collect(&HeaderMap::new(), body)
            .await;
        assert!(matches!(refused, Err(BodyRefusal::TooLarge { limit: 6 })));
    }

    #[tokio::test]
    async fn a_huge_content_length_is_too_large_not_a_panic() {
        let body = chunks(&[], Then::End);
        let refused = RequestBodyConfig::new()
            .collect(&with_length("99999999999999999999"), body)
            .await;
        // Past u64: does not parse.
        assert!(matches!(refused, Err(BodyRefusal::InvalidContentLength)));
        let refused = RequestBodyConfig::new()
            .collect(&with_length(&u64::MAX.to_string()), chunks(&[], Then::End))
            .await;
        assert!(matches!(refused, Err(BodyRefusal::TooLarge { .. })));
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let body = chunks(&[b"abc"], Then::Stall);
        let refused = RequestBodyConfig::new()
            .read_timeout(Duration::from_millis(50))
            .collect(&with_length("10"), body)
            .await;
        let refusal = refused.unwrap_err();
        assert!(matches!(refusal, BodyRefusal::TimedOut { .. }));
        assert_eq!(refusal.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(refusal.code(), "request_body_timeout");
    }

    #[tokio::test]
    async fn a_failing_body_is_refused() {
        let body = chunks(&[b"abc"], Then::Fail);
        let refusal = RequestBodyConfig::new()
            .collect(&with_length("10"), body)
            .await
            .unwrap_err();
        assert!(matches!(refusal, BodyRefusal::Failed { source: Some(_) }));
        assert!(refusal.source().is_some());
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        assert_eq!(refusal.code(), "request_body_incomplete");
    }

    #[tokio::test]
    async fn a_body_shorter_or_longer_than_its_content_length_is_refused() {
        for (declared, body) in [("10", &b"abc"[..]), ("2", &b"abc"[..])] {
            let refusal = RequestBodyConfig::new()
                .collect(&with_length(declared), Full::new(Bytes::from_static(body)))
                .await
                .unwrap_err();
            assert!(
                matches!(refusal, BodyRefusal::LengthMismatch { received: 3, .. }),
                "{refusal:?}"
            );
            assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[tokio::test]
    async fn content_length_lists_and_garbage() {
        let ok = |h: &str| content_length(&with_length(h));
        assert_eq!(ok("5"), Ok(Some(5)));
        assert_eq!(ok("5, 5"), Ok(Some(5)));
        assert_eq!(ok("5, 6"), Err(()));
        assert_eq!(ok("+5"), Err(()));
        assert_eq!(ok("-1"), Err(()));
        assert_eq!(ok(""), Err(()));
        assert_eq!(ok("0x10"), Err(()));
        assert_eq!(content_length(&HeaderMap::new()), Ok(None));
        let refusal = RequestBodyConfig::new()
            .collect(&with_length("five"), Full::new(Bytes::new()))
            .await
            .unwrap_err();
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        assert_eq!(refusal.code(), "invalid_content_length");
    }

    #[tokio::test]
    async fn settings_saturate() {
        let config = RequestBodyConfig::new()
            .limit(usize::MAX)
            .read_timeout(Duration::MAX);
        let bytes = config
            .collect(&with_length("3"), Full::new(Bytes::from_static(b"abc")))
            .await
            .expect("no limit, no timeout");
        assert_eq!(bytes, "abc");
        let none = RequestBodyConfig::new()
            .limit(0)
            .read_timeout(Duration::ZERO)
            .collect(&HeaderMap::new(), Full::new(Bytes::new()))
            .await;
        // A body that is ready on the first poll is in hand before a zero timeout
        // is looked at.
        assert!(matches!(none, Ok(ref b) if b.is_empty()), "{none:?}");
    }

    #[tokio::test]
    async fn every_body_type_is_rebuilt() {
        async fn round_trip<B: BufferableBody>() {
            let body = B::from_bytes(Bytes::from_static(b"xyz"));
            let bytes = RequestBodyConfig::new()
                .collect(&with_length("3"), body)
                .await
                .expect("collected");
            assert_eq!(bytes, "xyz");
        }
        round_trip::<Full<Bytes>>().await;
        round_trip::<BoxBody<Bytes, Infallible>>().await;
        round_trip::<UnsyncBoxBody<Bytes, std::io::Error>>().await;
        round_trip::<String>().await;
        #[cfg(feature = "axum")]
        round_trip::<axum_core::body::Body>().await;
    }

    #[tokio::test]
    async fn axums_own_body_limit_counts_as_too_large() {
        // An error that wraps the limit error (as axum's does) is still "too large".
        #[derive(Debug)]
        struct Wrapper(LengthLimitError);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let inner = Limited::new(Full::new(Bytes::from_static(b"abcdef")), 2);
        let body: BoxBody<Bytes, Wrapper> = inner
            .map_err(|e| Wrapper(*e.downcast::<LengthLimitError>().expect("the limit error")))
            .boxed();
        let refusal = RequestBodyConfig::new()
            .collect(&HeaderMap::new(), body)
            .await
            .unwrap_err();
        assert!(
            matches!(refusal, BodyRefusal::TooLarge { .. }),
            "{refusal:?}"
        );
    }
}
