//! The upstream as a Streamable HTTP MCP server (MCP 2025-11-25, basic/transports), seen as line streams.
//!
//! [`connect`] gives the session what a child process gives it: a writer for upstream-bound lines and a
//! reader of the upstream's lines. Behind them each line becomes one `POST` (concurrent: a slow call
//! never holds up another), and whatever the server answers — `202`, one JSON message or a batch, or
//! an SSE stream — becomes lines again. The `Mcp-Session-Id` of the `initialize` answer and the
//! negotiated `MCP-Protocol-Version` go with every later request; after `notifications/initialized`
//! a `GET` stream carries the server's own messages. Broken SSE streams are resumed with
//! `Last-Event-ID`; a session the server forgot is re-initialized transparently by replaying the
//! client's `initialize`; HTTP failures of a request become JSON-RPC errors answering it, so nothing
//! waits forever. Closing the writer ends the session: in-flight calls get a moment to finish, the
//! session is `DELETE`d, and the reader ends.
//!
//! Header values (the client's `Authorization`, configured headers, session ids) are never logged.
//!
//! The files, one job each: this one has the options, the handle and the shared state; `pipe` the
//! session's lines in and out; `post` the POST exchange (a message up, its answer back, failures as JSON-RPC errors);
//! `stream` SSE streams (reading, resuming with `Last-Event-ID`, the standalone `GET` stream);
//! `session` the requests' headers, sending with connect retries, sign-in renewal, re-initializing a
//! dropped session and ending it.
mod pipe;
mod post;
mod routing;
mod session;
mod stream;

use crate::auth::UpstreamAuth;
use crate::jsonrpc::{self, Message};
use crate::transport::lines::{LineCloser, LineSink};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pipe::ToSession;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The session header.
pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The negotiated protocol version header.
pub const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// The SSE resumption header.
pub const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// JSON-RPC error code for a request the upstream refused (HTTP 401/403): a client's OAuth flow keys on it.
pub const REFUSED: i64 = -32001;
/// JSON-RPC error code for a request the upstream failed to answer (HTTP error, I/O error, timeout).
pub const FAILED: i64 = jsonrpc::code::UPSTREAM_GONE;

const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";
const ACCEPT_POST: &str = "application/json, text/event-stream";
/// An SSE stream that stays silent this long is taken as broken.
const SSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a request's SSE stream may stay open after its answer, before it is dropped.
const STREAM_END_WAIT: Duration = Duration::from_secs(2);
/// How long in-flight requests may finish once the session ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between attempts to connect, for a request that could not connect.
const CONNECT_RETRIES: [Duration; 3] =
    [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400)];
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How many resumptions in a row may bring nothing before a request's stream is given up.
const RESUME_ATTEMPTS: u32 = 5;
/// The largest message (a JSON body, an SSE event, a line from the session) we handle.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// How much of an error body is kept for the error answered to the client.
const ERROR_BODY: usize = 512;
/// How many lines may queue toward the session.
const QUEUE: usize = 1024;

/// The message answered when a request's stream ends before its answer and cannot be resumed.
pub const STREAM_BROKE: &str = "the upstream's stream broke before it answered";

/// Where and how to reach the upstream.
#[derive(Clone)]
pub struct HttpUpstreamOptions {
    /// The MCP endpoint, `http://` or `https://`.
    pub url: Uri,
    /// Headers sent with every request (values never logged).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// How long establishing a connection (TCP and TLS) may take.
    pub connect_timeout: Duration,
    /// How long a request may take, unless its answer is an SSE stream that keeps sending (those
    /// end only when silent for 5 minutes).
    pub request_timeout: Duration,
    /// The OAuth sign-in that provides `Authorization` (consulted before each request, and told of
    /// each 401); none: the configured headers and [`HttpUpstream::set_authorization`] only.
    pub oauth: Option<Arc<UpstreamAuth>>,
}

impl HttpUpstreamOptions {
    /// Options for `url` with no extra headers, a 10 s connect timeout and a 120 s request timeout.
    pub fn new(url: Uri) -> Self {
        HttpUpstreamOptions {
            url,
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            oauth: None,
        }
    }
}

impl fmt::Debug for HttpUpstreamOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: values (and the URL's query) may hold secrets.
        f.debug_struct("HttpUpstreamOptions")
            .field("url", &shown_url(&self.url))
            .field("headers", &self.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("oauth", &self.oauth.is_some())
            .finish()
    }
}

/// The URL without its query, for logs.
fn shown_url(url: &Uri) -> String {
    format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or("http"),
        url.authority().map_or("", |a| a.as_str()),
        url.path()
    )
}

/// A handle on the HTTP upstream of one session.
#[derive(Clone)]
pub struct HttpUpstream {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUpstream").field("url", &self.inner.shown_url).finish_non_exhaustive()
    }
}

impl HttpUpstream {
    /// Ends the session: stops the `GET` stream and `DELETE`s the session, if there is one (a `405`
    /// answer, servers not letting clients end sessions, is fine). Later lines are not sent; the
    /// requests among them are answered with an error. Idempotent; closing the writer does it too.
    pub async fn close(&self) {
        self.inner.close().await;
    }

    /// Sets the `Authorization` header sent with every later request: the client's own, passed
    /// unchanged. Never logged.
    pub fn set_authorization(&self, value: Option<HeaderValue>) {
        let value = value.map(|mut v| {
            v.set_sensitive(true);
            v
        });
        *self.inner.authorization.lock().expect("not poisoned") = value;
    }

    /// The current `Mcp-Session-Id`, once the server gave one.
    pub fn session_id(&self) -> Option<String> {
        self.inner.session.borrow().as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned)
    }

    /// The negotiated protocol version, once `initialize` was answered.
    pub fn protocol_version(&self) -> Option<String> {
        let version = self.inner.protocol_version.lock().expect("not poisoned");
        version.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// Connects a session to a Streamable HTTP upstream. Returns the writer the session writes
/// upstream-bound lines to, the reader it reads the upstream's lines from, and a handle. Nothing is
/// sent until the first line; must be called within a Tokio runtime.
pub fn connect(
    options: HttpUpstreamOptions,
) -> (impl AsyncWrite + Send + Unpin + 'static, impl AsyncRead + Send + Unpin + 'static, HttpUpstream) {
    open(options)
}

/// [`connect`] for a session in this process that writes and reads whole messages: its
/// upstream-bound lines go straight to their POSTs, and the upstream's messages come out of
/// [`UpstreamLines`] as they were read (no writer task, no byte stream in either direction);
/// closing the sink ends the session.
pub fn connect_lines(options: HttpUpstreamOptions) -> ((LineSink, LineCloser), UpstreamLines, HttpUpstream) {
    let (session_writer, session_reader, handle) = open(options);
    (session_writer.into_direct(), UpstreamLines(session_reader), handle)
}

/// The upstream's messages for a session in this process ([`connect_lines`]).
pub struct UpstreamLines(pipe::LinesDown);

impl UpstreamLines {
    /// The next message from the upstream, as the upstream's answer was read (its envelope with
    /// it); `None` once the session has ended and every message before its end was taken.
    pub async fn next(&mut self) -> Option<Message> {
        self.0.next().await
    }
}

fn open(options: HttpUpstreamOptions) -> (pipe::LinesUp, pipe::LinesDown, HttpUpstream) {
    let (out, session_reader, end) = pipe::to_session(QUEUE);
    let inner = Arc::new(Inner::new(options, out));
    tracing::info!(upstream = %inner.shown_url, "using an HTTP upstream");
    let session_writer = pipe::LinesUp::new(inner.clone(), end);
    (session_writer, session_reader, HttpUpstream { inner })
}

/// "HTTP 401 Unauthorized".
fn http_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    shown_url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    request_timeout: Duration,
    /// The session the server gave (watched by the `GET` stream, which waits for a new one).
    session: watch::Sender<Option<HeaderValue>>,
    protocol_version: Mutex<Option<HeaderValue>>,
    authorization: Mutex<Option<HeaderValue>>,
    oauth: Option<Arc<UpstreamAuth>>,
    /// The client's `initialize`, replayed when the server drops the session.
    initialize: Mutex<Option<Vec<u8>>>,
    reinitializing: tokio::sync::Mutex<()>,
    reinitialized: AtomicU64,
    get_stream: Mutex<Option<JoinHandle<()>>>,
    get_started: AtomicBool,
    closed: AtomicBool,
    /// Toward the session.
    out: ToSession,
}

impl Inner {
    fn new(options: HttpUpstreamOptions, out: ToSession) -> Inner {
        let https = crate::auth::http::https_connector(options.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Inner {
            client,
            shown_url: shown_url(&options.url),
            url: options.url,
            headers: options.headers,
            request_timeout: options.request_timeout,
            session: watch::Sender::new(None),
            protocol_version: Mutex::new(None),
            authorization: Mutex::new(None),
            oauth: options.oauth,
            initialize: Mutex::new(None),
            reinitializing: tokio::sync::Mutex::new(()),
            reinitialized: AtomicU64::new(0),
            get_stream: Mutex::new(None),
            get_started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            out,
        }
    }
}

/// The response's content type, lowercased ("" when absent).
fn content_type<B>(response: &Response<B>) -> String {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}
