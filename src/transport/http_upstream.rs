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

use crate::auth::UpstreamAuth;
use crate::jsonrpc::{self, Envelope, Id, Kind};
use crate::transport::lines::{Line, LineCloser, LineReader, LineSink, spawn_line_writer};
use crate::transport::sse::{SeenIds, SseParser};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

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
/// The pipes between the session and us.
const PIPE: usize = 64 * 1024;
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
    let (session_writer, input) = tokio::io::duplex(PIPE);
    let (output, session_reader) = tokio::io::duplex(PIPE);
    let (out, out_closer) = spawn_line_writer(output, QUEUE);
    let inner = Arc::new(Inner::new(options, out));
    tracing::info!(upstream = %inner.shown_url, "using an HTTP upstream");
    tokio::spawn(run(inner.clone(), input, out_closer));
    (session_writer, session_reader, HttpUpstream { inner })
}

/// Reads the session's lines, posting each, until the session closes its writer; then ends.
async fn run(inner: Arc<Inner>, input: DuplexStream, mut out_closer: LineCloser) {
    let mut reader = LineReader::new(input, MAX_MESSAGE);
    let mut in_flight = JoinSet::new();
    loop {
        match reader.next_line().await {
            Ok(Some(Line::Message(line))) => {
                in_flight.spawn(inner.clone().deliver(line));
            }
            Ok(Some(Line::TooLong { len, head })) => {
                let (id, is_call) = jsonrpc::sniff_head(&head);
                tracing::warn!(bytes = len, max = MAX_MESSAGE, "not sending an oversized message upstream");
                if let (Some(id), true) = (id, is_call) {
                    let msg = format!("the message is {len} bytes, over the maximum of {MAX_MESSAGE} bytes");
                    inner.out.send(jsonrpc::error_response(Some(&id), FAILED, &msg, None)).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading the session's messages for the upstream failed");
                break;
            }
        }
        while in_flight.try_join_next().is_some() {}
    }
    tracing::debug!(in_flight = in_flight.len(), "the session is ending; finishing in-flight requests");
    let drained =
        tokio::time::timeout(DRAIN_TIMEOUT, async { while in_flight.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = in_flight.len(),
            "requests still in flight {} s after the session ended; abandoning them",
            DRAIN_TIMEOUT.as_secs()
        );
        in_flight.shutdown().await;
    }
    inner.close().await;
    out_closer.close().await;
}

/// What a request went out for, and what to do with its answer.
struct Expect {
    /// The request's id (`None` for notifications and responses, which get no answer).
    id: Option<Id>,
    /// It is an `initialize`: keep the session id and the protocol version it brings.
    initialize: bool,
    /// Our own request: its answer is not the session's to see.
    swallow: bool,
}

/// How a request was answered.
#[derive(Debug)]
enum Answer {
    Result,
    Error(String),
}

/// Why a request failed; each becomes the JSON-RPC error answering it.
#[derive(Debug)]
enum Failure {
    /// HTTP 401 or 403.
    Refused { status: StatusCode, www_authenticate: Option<String> },
    /// Another HTTP error status.
    Status { status: StatusCode, body: String },
    /// The server could not be reached.
    Unreachable(String),
    /// The connection failed during the request.
    Io(String),
    /// No answer within the request timeout.
    Timeout(Duration),
    /// An SSE stream ended before the answer and could not be resumed.
    StreamBroke(String),
    /// The server dropped the session and a new one could not be made.
    Reinitialize(String),
    /// The server's answer is not JSON, or not an answer.
    Invalid(String),
    /// The upstream was closed.
    Closed,
    /// The OAuth sign-in failed or is needed (the message says what to do).
    SignIn(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { status, .. } => {
                write!(f, "the upstream refused the request: {}", http_status(*status))
            }
            Failure::Status { status, .. } => write!(f, "the upstream answered {}", http_status(*status)),
            Failure::Unreachable(e) => write!(f, "the upstream could not be reached: {e}"),
            Failure::Io(e) => write!(f, "the request to the upstream failed: {e}"),
            Failure::Timeout(t) => write!(f, "the upstream did not answer within {} ms", t.as_millis()),
            Failure::StreamBroke(_) => f.write_str(STREAM_BROKE),
            Failure::Reinitialize(e) => {
                write!(f, "the upstream dropped the session and a new one could not be initialized: {e}")
            }
            Failure::Invalid(e) => write!(f, "the upstream's answer is not valid: {e}"),
            Failure::Closed => f.write_str("the HTTP upstream is closed"),
            Failure::SignIn(e) => f.write_str(e),
        }
    }
}

impl Failure {
    /// The JSON-RPC error response answering request `id`.
    fn response(&self, id: &Id) -> Vec<u8> {
        let msg = self.to_string();
        let (code, data) = match self {
            Failure::Refused { status, www_authenticate } => (
                REFUSED,
                serde_json::json!({ "status": status.as_u16(), "www_authenticate": www_authenticate }),
            ),
            Failure::Status { status, body } => {
                (FAILED, serde_json::json!({ "status": status.as_u16(), "body": body }))
            }
            Failure::StreamBroke(reason) => (FAILED, serde_json::json!({ "reason": reason })),
            _ => (FAILED, serde_json::json!({ "reason": msg })),
        };
        jsonrpc::error_response(Some(id), code, &msg, Some(&data))
    }
}

/// "HTTP 401 Unauthorized".
fn http_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// What one POST came to.
enum Posted {
    /// Relayed; the awaited answer, if it came.
    Done(Option<Answer>),
    /// HTTP 404 for this session id: the server dropped the session.
    SessionGone(HeaderValue),
    /// HTTP 401 with the OAuth sign-in on: the header sent, and the challenge.
    Unauthorized(Option<HeaderValue>, Option<String>),
}

/// How an SSE stream stopped.
enum StreamEnd {
    /// The awaited answer came.
    Answered(Answer),
    /// The server ended the stream.
    Ended,
    /// The connection failed, or went silent.
    Broke(String),
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
    out: LineSink,
}

impl Inner {
    fn new(options: HttpUpstreamOptions, out: LineSink) -> Inner {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(options.connect_timeout));
        // TLS on ring (no C toolchain needed), the Mozilla roots, http/1.1 and h2 by ALPN.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .expect("ring supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
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

    fn session_id(&self) -> Option<HeaderValue> {
        self.session.borrow().clone()
    }

    /// With the OAuth sign-in on: takes its current header (refreshed first if about to expire) for
    /// the requests built from now on, and returns it.
    async fn use_current_authorization(&self) -> Result<Option<HeaderValue>, Failure> {
        let Some(oauth) = &self.oauth else { return Ok(None) };
        let header = oauth.authorization().await.map_err(|e| Failure::SignIn(e.to_string()))?;
        *self.authorization.lock().expect("not poisoned") = header.clone();
        Ok(header)
    }

    /// The upstream refused `sent` (HTTP 401): the sign-in refreshes it, or signs in again.
    async fn renew_authorization(
        &self,
        sent: Option<HeaderValue>,
        challenge: Option<String>,
    ) -> Result<(), Failure> {
        let Some(oauth) = &self.oauth else { return Ok(()) };
        oauth.refused(sent.as_ref(), challenge.as_deref()).await.map_err(|e| Failure::SignIn(e.to_string()))
    }

    /// Sends one line from the session upstream, and its answer (or an error answering it) back.
    async fn deliver(self: Arc<Self>, line: Vec<u8>) {
        let (kind, id, method) = match Envelope::parse(&line) {
            Ok(env) => (Some(env.kind), env.id, env.method.map(str::to_owned)),
            Err(_) => (None, None, None),
        };
        let id = id.filter(|_| kind == Some(Kind::Request));
        let method = method.as_deref();
        let initialize = kind == Some(Kind::Request) && method == Some("initialize");
        if self.closed.load(Ordering::SeqCst) {
            tracing::warn!(?id, method, "not sending a message: the HTTP upstream is closed");
            if let Some(id) = &id {
                self.out.send(Failure::Closed.response(id)).await;
            }
            return;
        }
        tracing::debug!(?kind, ?id, method, bytes = line.len(), "POST to the upstream");
        if initialize {
            *self.initialize.lock().expect("not poisoned") = Some(line.clone());
        }
        let expect = Expect { id, initialize, swallow: false };
        match self.post(Bytes::from(line), &expect).await {
            Ok(_) => {
                if kind == Some(Kind::Notification) && method == Some("notifications/initialized") {
                    self.start_get_stream();
                }
            }
            Err(failure) => {
                let id = &expect.id;
                tracing::warn!(?id, method, error = %failure, "the upstream did not take a message");
                if let Some(id) = &expect.id {
                    self.out.send(failure.response(id)).await;
                }
            }
        }
    }

    /// POSTs one message and relays what comes back; when the server no longer knows the session,
    /// re-initializes it and retries once.
    async fn post(&self, body: Bytes, expect: &Expect) -> Result<Option<Answer>, Failure> {
        let mut retried = false;
        let mut renewed = false;
        loop {
            match self.post_once(&body, expect).await? {
                Posted::Done(answer) => return Ok(answer),
                Posted::Unauthorized(sent, challenge) if !renewed => {
                    self.renew_authorization(sent, challenge).await?;
                    renewed = true;
                }
                Posted::Unauthorized(..) => {
                    return Err(Failure::SignIn(
                        "the upstream refused the access token it was just given; sign out and in again (mcp-asyncify logout URL, then login URL)".into(),
                    ));
                }
                Posted::SessionGone(stale) if !retried => {
                    let id = &expect.id;
                    tracing::warn!(?id, "the upstream no longer knows the session; initializing a new one");
                    self.reinitialize(stale).await.map_err(Failure::Reinitialize)?;
                    retried = true;
                }
                Posted::SessionGone(_) => {
                    let body = "the new session was not known either".to_owned();
                    return Err(Failure::Status { status: StatusCode::NOT_FOUND, body });
                }
            }
        }
    }

    /// POSTs one message and relays what comes back.
    async fn post_once(&self, body: &Bytes, expect: &Expect) -> Result<Posted, Failure> {
        let sent = self.use_current_authorization().await?;
        let deadline = Instant::now() + self.request_timeout;
        let session = if expect.initialize { None } else { self.session_id() };
        let response = self
            .send_by(deadline, || {
                let mut request = self.request(Method::POST, body.clone(), ACCEPT_POST, session.as_ref());
                if !expect.initialize {
                    self.add_protocol_version(&mut request);
                }
                request
            })
            .await?;
        let status = response.status();
        tracing::debug!(id = ?expect.id, status = status.as_u16(), "the upstream answered the POST");
        if let (StatusCode::NOT_FOUND, Some(session)) = (status, session) {
            return Ok(Posted::SessionGone(session));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let www_authenticate = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            if status == StatusCode::UNAUTHORIZED && self.oauth.is_some() {
                return Ok(Posted::Unauthorized(sent, www_authenticate));
            }
            if self.oauth.is_some() {
                // The proxy's own sign-in lacks a permission: the client cannot fix that with a
                // challenge of its own, so say what to do instead.
                let scope = www_authenticate
                    .as_deref()
                    .map(crate::auth::discovery::parse_challenge)
                    .and_then(|c| c.scope);
                let needs = scope.map(|s| format!(" (it asks for the scope \"{s}\")")).unwrap_or_default();
                return Err(Failure::SignIn(format!(
                    "the upstream refused the request: {}{needs}; set upstream_auth.scope and sign in again with `mcp-asyncify login {}`",
                    http_status(status),
                    self.shown_url
                )));
            }
            return Err(Failure::Refused { status, www_authenticate });
        }
        if !status.is_success() {
            let body = error_body(response, deadline).await;
            return Err(Failure::Status { status, body });
        }
        if expect.initialize {
            let id = response.headers().get(MCP_SESSION_ID).cloned().map(|mut v| {
                v.set_sensitive(true);
                v
            });
            tracing::debug!(has_session = id.is_some(), "the upstream answered initialize");
            self.session.send_replace(id);
        }
        self.consume(response, expect, deadline).await.map(Posted::Done)
    }

    /// Relays the body of a successful POST: nothing, one JSON message or a batch, or an SSE stream
    /// (resumed if it breaks before the answer).
    async fn consume(
        &self,
        response: Response<Incoming>,
        expect: &Expect,
        deadline: Instant,
    ) -> Result<Option<Answer>, Failure> {
        if response.status() == StatusCode::ACCEPTED {
            return Ok(None);
        }
        let content_type = content_type(&response);
        if content_type.starts_with(EVENT_STREAM) {
            let mut parser = SseParser::default();
            let mut seen = SeenIds::default();
            let end = self.read_sse(response.into_body(), &mut parser, &mut seen, expect).await;
            let why = match end {
                StreamEnd::Answered(answer) => return Ok(Some(answer)),
                _ if expect.id.is_none() => return Ok(None),
                StreamEnd::Ended => "the server ended the stream".to_owned(),
                StreamEnd::Broke(why) => why,
            };
            tracing::debug!(id = ?expect.id, reason = %why, "a request's stream ended before its answer");
            return self.resume(parser, seen, expect, why).await.map(Some);
        }
        let body = match tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), MAX_MESSAGE).collect(),
        )
        .await
        {
            Err(_) => return Err(Failure::Timeout(self.request_timeout)),
            Ok(Err(e)) => return Err(Failure::Io(crate::logging::error_chain(&*e))),
            Ok(Ok(body)) => body.to_bytes(),
        };
        if !body.iter().all(u8::is_ascii_whitespace) && !content_type.starts_with(JSON) {
            tracing::warn!(content_type, "the upstream answered a POST with an unexpected content type");
        }
        let answer = self.relay(&body, expect).await.map_err(Failure::Invalid)?;
        if answer.is_none() && expect.id.is_some() {
            // A request's POST must be answered in its body (JSON) or stream (SSE): nothing will come.
            return Err(Failure::Invalid("its body holds no answer to the request".into()));
        }
        Ok(answer)
    }

    /// Resumes a request's broken SSE stream with `GET` and `Last-Event-ID` until its answer comes.
    async fn resume(
        &self,
        mut parser: SseParser,
        mut seen: SeenIds,
        expect: &Expect,
        mut why: String,
    ) -> Result<Answer, Failure> {
        let mut backoff = BACKOFF_START;
        let mut fruitless = 0;
        loop {
            let Some(last) = parser.last_event_id.clone().filter(|id| !id.is_empty()) else {
                return Err(Failure::StreamBroke(format!(
                    "{why}; the server gave no event id to resume from"
                )));
            };
            if fruitless >= RESUME_ATTEMPTS {
                return Err(Failure::StreamBroke(format!(
                    "{why}; {RESUME_ATTEMPTS} resumptions brought nothing"
                )));
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(Failure::Closed);
            }
            tokio::time::sleep(parser.retry.unwrap_or(backoff).max(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            fruitless += 1;
            let session = self.session_id();
            tracing::debug!(id = ?expect.id, "resuming a request's stream");
            self.use_current_authorization().await?;
            let deadline = Instant::now() + self.request_timeout;
            let response = self
                .send_by(deadline, || {
                    let mut request = self.request(Method::GET, Bytes::new(), EVENT_STREAM, session.as_ref());
                    self.add_protocol_version(&mut request);
                    if let Ok(value) = HeaderValue::from_str(&last) {
                        request.headers_mut().insert(LAST_EVENT_ID, value);
                    }
                    request
                })
                .await;
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    why = e.to_string();
                    continue;
                }
            };
            let status = response.status();
            match status {
                StatusCode::METHOD_NOT_ALLOWED => {
                    return Err(Failure::StreamBroke(format!(
                        "{why}; the server does not resume streams (GET answered {})",
                        http_status(status)
                    )));
                }
                StatusCode::NOT_FOUND => {
                    return Err(Failure::StreamBroke(format!(
                        "{why}; the server no longer knows the session"
                    )));
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let www_authenticate = response
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    return Err(Failure::Refused { status, www_authenticate });
                }
                _ if status.is_success() && content_type(&response).starts_with(EVENT_STREAM) => {
                    let before = parser.blocks;
                    match self.read_sse(response.into_body(), &mut parser, &mut seen, expect).await {
                        StreamEnd::Answered(answer) => return Ok(answer),
                        StreamEnd::Ended => why = "the server ended the resumed stream".to_owned(),
                        StreamEnd::Broke(e) => why = e,
                    }
                    if parser.blocks > before {
                        fruitless = 0;
                        backoff = BACKOFF_START;
                    }
                }
                _ => why = format!("resuming answered {}", http_status(status)),
            }
        }
    }

    /// Reads an SSE body, relaying each event's data, until the awaited answer (if any) came or the
    /// stream ends.
    async fn read_sse(
        &self,
        mut body: Incoming,
        parser: &mut SseParser,
        seen: &mut SeenIds,
        expect: &Expect,
    ) -> StreamEnd {
        parser.new_connection();
        let mut events = Vec::new();
        loop {
            let frame = match tokio::time::timeout(SSE_IDLE_TIMEOUT, body.frame()).await {
                Err(_) => {
                    return StreamEnd::Broke(format!(
                        "the stream was silent for {} s",
                        SSE_IDLE_TIMEOUT.as_secs()
                    ));
                }
                Ok(None) => return StreamEnd::Ended,
                Ok(Some(Err(e))) => return StreamEnd::Broke(crate::logging::error_chain(&e)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            parser.feed(&data, &mut events);
            let mut answered = None;
            for event in events.drain(..) {
                if let Some(id) = &event.id
                    && !seen.insert(id)
                {
                    tracing::debug!("skipped an SSE event seen before the stream was resumed");
                    continue;
                }
                match self.relay(&event.data, expect).await {
                    Ok(Some(answer)) => answered = Some(answer),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "skipped an SSE event from the upstream that is not JSON")
                    }
                }
            }
            // The answer ends the request's stream (the server closes it next).
            if let Some(answer) = answered {
                return StreamEnd::Answered(answer);
            }
        }
    }

    /// Relays one JSON body or event (a message or a batch) to the session as lines; returns the
    /// answer to the awaited request if it was among them.
    async fn relay(&self, data: &[u8], expect: &Expect) -> Result<Option<Answer>, String> {
        let data = data.trim_ascii();
        if data.is_empty() {
            return Ok(None);
        }
        let value: &RawValue = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if data.first() == Some(&b'[') {
            let batch: Vec<&RawValue> = serde_json::from_str(value.get()).map_err(|e| e.to_string())?;
            let mut answer = None;
            for message in batch {
                if let Some(a) = self.relay_message(message.get().as_bytes(), expect).await {
                    answer = Some(a);
                }
            }
            return Ok(answer);
        }
        Ok(self.relay_message(data, expect).await)
    }

    /// Relays one message as one line (unless it is the answer to our own request).
    async fn relay_message(&self, message: &[u8], expect: &Expect) -> Option<Answer> {
        let line = compact(message);
        let env = Envelope::parse(&line).ok();
        let answer = match &env {
            Some(env) if env.kind == Kind::Response && env.id.is_some() && env.id == expect.id => {
                Some(match env.error {
                    Some(error) => Answer::Error(error.get().to_owned()),
                    None => Answer::Result,
                })
            }
            _ => None,
        };
        if let (Some(Answer::Result), true, Some(env)) = (&answer, expect.initialize, &env) {
            self.keep_protocol_version(env.result);
        }
        let swallowed = expect.swallow && answer.is_some();
        if let Some(env) = &env {
            let (kind, id, method) = (env.kind, &env.id, env.method);
            tracing::debug!(?kind, ?id, method, swallowed, "message from the upstream");
        }
        drop(env);
        if !swallowed {
            self.out.send(line.into_owned()).await;
        }
        answer
    }

    /// Keeps `protocolVersion` of an `initialize` result for the `MCP-Protocol-Version` header.
    fn keep_protocol_version(&self, result: Option<&RawValue>) {
        #[derive(serde::Deserialize)]
        struct Init {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
        }
        let Some(init) = result.and_then(|r| serde_json::from_str::<Init>(r.get()).ok()) else { return };
        match HeaderValue::from_str(&init.protocol_version) {
            Ok(version) => {
                tracing::debug!(version = %init.protocol_version, "negotiated protocol version");
                *self.protocol_version.lock().expect("not poisoned") = Some(version);
            }
            Err(_) => tracing::warn!("the upstream's protocolVersion cannot be sent as a header"),
        }
    }

    /// Makes a new session after the server dropped `stale`: replays the client's `initialize` (with
    /// our own id, its answer swallowed) and `notifications/initialized`. Concurrent callers wait for
    /// the first one's new session.
    async fn reinitialize(&self, stale: HeaderValue) -> Result<(), String> {
        let _one_at_a_time = self.reinitializing.lock().await;
        if self.session_id().as_ref() != Some(&stale) {
            return Ok(()); // another request already made a new session
        }
        let original = self.initialize.lock().expect("not poisoned").clone();
        let original = original.ok_or("the client's initialize request is not known")?;
        let env = Envelope::parse(&original).map_err(|e| e.to_string())?;
        let n = self.reinitialized.fetch_add(1, Ordering::SeqCst);
        let id = Id::string(&format!("mcp-asyncify-reinitialize-{n}"));
        let request = jsonrpc::request(&id, "initialize", env.params.map(RawValue::get));
        drop(env);
        let expect = Expect { id: Some(id), initialize: true, swallow: true };
        match self.post_once(&Bytes::from(request), &expect).await {
            Ok(Posted::Done(Some(Answer::Result))) => {}
            Ok(Posted::Done(Some(Answer::Error(e)))) => {
                return Err(format!("initialize was answered with an error: {e}"));
            }
            Ok(_) => return Err("initialize was not answered".into()),
            Err(e) => return Err(e.to_string()),
        }
        let initialized = jsonrpc::notification("notifications/initialized", None);
        let expect = Expect { id: None, initialize: false, swallow: true };
        match self.post_once(&Bytes::from(initialized), &expect).await {
            Ok(Posted::Done(_)) => {}
            Ok(Posted::SessionGone(_)) => return Err("the new session was dropped at once".into()),
            Ok(Posted::Unauthorized(..)) => {
                return Err("notifications/initialized was refused (HTTP 401)".into());
            }
            Err(e) => return Err(format!("notifications/initialized failed: {e}")),
        }
        tracing::info!("initialized a new upstream session in place of the dropped one");
        Ok(())
    }

    /// Opens the `GET` stream for the server's own messages (once).
    fn start_get_stream(self: &Arc<Self>) {
        if self.get_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = tokio::spawn(self.clone().get_stream());
        *self.get_stream.lock().expect("not poisoned") = Some(task);
    }

    /// Keeps the `GET` stream open: reconnects with backoff and `Last-Event-ID`, waits for a new
    /// session when the server forgot this one, and stops for good on `405`.
    async fn get_stream(self: Arc<Self>) {
        let mut sessions = self.session.subscribe();
        let mut parser = SseParser::default();
        let mut seen = SeenIds::default();
        let mut stream_session: Option<HeaderValue> = None;
        let mut backoff = BACKOFF_START;
        let mut last_problem = String::new();
        let expect = Expect { id: None, initialize: false, swallow: false };
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let session = sessions.borrow_and_update().clone();
            let Some(session) = session else {
                if sessions.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if stream_session.as_ref() != Some(&session) {
                parser = SseParser::default();
                seen = SeenIds::default();
                stream_session = Some(session.clone());
            }
            let last = parser.last_event_id.clone().filter(|id| !id.is_empty());
            let sent = match self.use_current_authorization().await {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::debug!(error = %e, "the GET stream has no valid sign-in yet");
                    None
                }
            };
            let deadline = Instant::now() + self.request_timeout;
            let response = self
                .send_by(deadline, || {
                    let mut request = self.request(Method::GET, Bytes::new(), EVENT_STREAM, Some(&session));
                    self.add_protocol_version(&mut request);
                    if let Some(value) = last.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
                        request.headers_mut().insert(LAST_EVENT_ID, value);
                    }
                    request
                })
                .await;
            let mut delivered = false;
            let problem = match response {
                Ok(response) if response.status() == StatusCode::METHOD_NOT_ALLOWED => {
                    tracing::info!("the upstream offers no stream of its own messages (GET answered 405)");
                    return;
                }
                Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                    tracing::debug!(
                        "the upstream no longer knows the session; the GET stream waits for a new one"
                    );
                    if sessions.wait_for(|s| s.as_ref() != Some(&session)).await.is_err() {
                        return;
                    }
                    backoff = BACKOFF_START;
                    continue;
                }
                Ok(response)
                    if response.status().is_success()
                        && content_type(&response).starts_with(EVENT_STREAM) =>
                {
                    tracing::debug!(resumed = last.is_some(), "the GET stream is open");
                    let before = parser.blocks;
                    let end = self.read_sse(response.into_body(), &mut parser, &mut seen, &expect).await;
                    delivered = parser.blocks > before;
                    if !delivered && last.is_some() {
                        // The server would not resume from there: start afresh next time.
                        parser.last_event_id = None;
                    }
                    match end {
                        StreamEnd::Broke(why) => format!("the GET stream broke: {why}"),
                        _ => String::new(),
                    }
                }
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED && self.oauth.is_some() => {
                    // The token was refused (revoked, say): renew it for the next attempt.
                    let challenge = response
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    match self.renew_authorization(sent, challenge).await {
                        Ok(()) => "the GET stream's access token was refused; renewed it".to_owned(),
                        Err(e) => format!("the GET stream was refused: {e}"),
                    }
                }
                Ok(response) => format!("the GET stream was answered {}", http_status(response.status())),
                Err(e) => format!("the GET stream could not be opened: {e}"),
            };
            if !problem.is_empty() && problem != last_problem {
                tracing::warn!(problem = %problem, "reconnecting the upstream's GET stream");
            } else {
                tracing::debug!(problem = %problem, "reconnecting the upstream's GET stream");
            }
            last_problem = problem;
            if delivered {
                backoff = BACKOFF_START;
            }
            tokio::time::sleep(parser.retry.unwrap_or(backoff).max(backoff)).await;
            if !delivered {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(task) = self.get_stream.lock().expect("not poisoned").take() {
            task.abort();
        }
        let Some(session) = self.session.send_replace(None) else { return };
        let deadline = Instant::now() + self.request_timeout.min(DRAIN_TIMEOUT);
        let response = self
            .send_by(deadline, || {
                let mut request = self.request(Method::DELETE, Bytes::new(), ACCEPT_POST, Some(&session));
                self.add_protocol_version(&mut request);
                request
            })
            .await;
        match response {
            Ok(r) if r.status().is_success() => tracing::debug!("ended the upstream session"),
            Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => {
                tracing::debug!("the upstream does not let clients end sessions (DELETE answered 405)")
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                tracing::debug!("the upstream session was already gone")
            }
            Ok(r) => tracing::warn!(status = r.status().as_u16(), "ending the upstream session failed"),
            Err(e) => tracing::warn!(error = %e, "ending the upstream session failed"),
        }
    }

    /// A request with the configured headers, the client's authorization and the session id.
    fn request(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
        session: Option<&HeaderValue>,
    ) -> Request<Full<Bytes>> {
        let is_post = method == Method::POST;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        if let Some(auth) = self.authorization.lock().expect("not poisoned").clone() {
            headers.insert(header::AUTHORIZATION, auth);
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        if is_post {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        }
        if let Some(session) = session {
            headers.insert(MCP_SESSION_ID, session.clone());
        }
        request
    }

    fn add_protocol_version(&self, request: &mut Request<Full<Bytes>>) {
        if let Some(version) = self.protocol_version.lock().expect("not poisoned").clone() {
            request.headers_mut().insert(MCP_PROTOCOL_VERSION, version);
        }
    }

    /// Sends a request (built anew for each attempt), retrying failed connections (3 times, after
    /// 100, 200 and 400 ms), until its response headers come or `deadline` passes.
    async fn send_by(
        &self,
        deadline: Instant,
        make: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Failure> {
        let attempts = async {
            let mut waits = CONNECT_RETRIES.iter();
            loop {
                match self.client.request(make()).await {
                    Ok(response) => return Ok(response),
                    Err(e) if e.is_connect() => match waits.next() {
                        Some(wait) => {
                            let (error, retry_in_ms) =
                                (crate::logging::error_chain(&e), wait.as_millis() as u64);
                            tracing::debug!(error, retry_in_ms, "connecting to the upstream failed");
                            tokio::time::sleep(*wait).await;
                        }
                        None => return Err(Failure::Unreachable(crate::logging::error_chain(&e))),
                    },
                    Err(e) => return Err(Failure::Io(crate::logging::error_chain(&e))),
                }
            }
        };
        match tokio::time::timeout_at(deadline, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout(self.request_timeout)),
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

/// The start of an error response's body, as text.
async fn error_body(response: Response<Incoming>, deadline: Instant) -> String {
    let limited = Limited::new(response.into_body(), 64 * 1024);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(body)) => {
            let bytes = body.to_bytes();
            let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY)]).into_owned();
            if bytes.len() > ERROR_BODY {
                text.push('…');
            }
            text.trim().to_owned()
        }
        _ => String::new(),
    }
}

/// One JSON text as one line: unchanged when it has no line breaks, else without the whitespace
/// between its tokens (valid JSON has line breaks nowhere else), its values byte for byte.
fn compact(json: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr2(b'\n', b'\r', json).is_none() {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    in_string = true;
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_bytes_without_line_breaks() {
        let one = br#"{"a": 1.0e2, "b": "x y"}"#;
        assert!(matches!(compact(one), Cow::Borrowed(_)));
        let pretty = b"{\n  \"a\": 1.0e2,\n  \"b\": \"x \\\" y\\n\"\n}";
        assert_eq!(&*compact(pretty), br#"{"a":1.0e2,"b":"x \" y\n"}"#);
    }
}
