//! The Streamable HTTP sidecar: `mcp-asyncify serve --listen ADDR -- CMD…`.
//!
//! The HTTP side follows MCP 2025-11-25 (basic/transports, Streamable HTTP): one endpoint (`/mcp`) for
//! POST (one JSON-RPC message; a request is answered with `application/json`, or with an SSE stream when
//! the server has something to say before the answer), GET (the standalone SSE stream for
//! server-initiated messages) and DELETE (end the session). Each client session gets its own upstream
//! (a child process per session) and its own [`Session`]: the same lossless routing as the stdio wrapper,
//! fed one message per POST, its output dispatched to the HTTP stream waiting for it. Tasks live in one
//! engine shared by every session and are bound to the client's credential (a hash of its
//! `Authorization`), or to the session when there is none: a client that reconnects with the same
//! credential still reaches its tasks, another credential gets "not found".
//!
//! 2026-07-28 requests are stateless: a POST whose body carries its protocol version in `_meta` needs
//! no `Mcp-Session-Id`. Its routing headers (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`) are
//! checked against the body (400 + -32020), and it is served on an upstream connection the sidecar
//! keeps initialized for the caller's credential (one per credential, since tasks are bound to it;
//! one shared when there is none), under an id of the sidecar's own so that the ids of different
//! clients never collide there. Nothing about a stateless request lives only in the HTTP exchange:
//! its task is in the engine, so any later request (on any connection) finds it; a shared store
//! makes that true across replicas.
//!
//! Safety: bound to 127.0.0.1 by default; `Host` and `Origin` are checked against DNS rebinding (403);
//! bodies over `max_message_bytes` get 413; session ids are unguessable; sessions are capped and
//! expire when idle; shutdown lets in-flight calls finish.

// An HTTP error response is the natural `Err` here: it is built once per refused request and returned
// as is, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use super::era::Era;
use super::intercept::SUBSCRIPTION_ID;

mod stateless;

use super::session::{Router, Session, Shared};
use crate::config::Config;
use crate::jsonrpc::{self, Envelope, Id, Kind, code};
use crate::transport::http_upstream::{self, HttpUpstream, HttpUpstreamOptions};
use crate::transport::lines::{Line, LineReader};
use crate::transport::stdio::{self, UpstreamProcess};
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use stateless::subscription_of;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Options of `mcp-asyncify serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where to listen (keep it on loopback unless a trusted proxy sits in front).
    #[arg(long, env = "MCP_ASYNCIFY_LISTEN", default_value = "127.0.0.1:8931", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The most client sessions at once (each runs its own upstream process).
    #[arg(long, env = "MCP_ASYNCIFY_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// A session with no request and no open stream for this long is closed, in seconds.
    #[arg(long, env = "MCP_ASYNCIFY_SESSION_IDLE_SECS", default_value_t = 1800)]
    pub session_idle_secs: u64,
    /// An extra allowed `Origin` (repeatable); localhost origins are always allowed.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// An extra allowed `Host` (repeatable); loopback names and the listen address are always allowed.
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_hosts: Vec<String>,
    /// The upstream MCP server to run for each session, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    /// A hosted upstream instead (`--upstream-url`, set by the command line).
    #[arg(skip)]
    pub upstream: Option<HttpUpstreamOptions>,
}

/// The protocol versions whose Streamable HTTP rules the sidecar follows (`MCP-Protocol-Version`).
const SUPPORTED_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

/// A message for a client's HTTP stream.
type Out = mpsc::UnboundedSender<Bytes>;

/// The stream of a POST waiting for its answer.
struct Waiter {
    out: Out,
    seq: u64,
    /// The request's `progressToken` (JSON text), so its progress goes on its own stream.
    token: Option<String>,
    /// A stateless request travels under an id of the sidecar's; its answer gets this one back.
    original: Option<Id>,
}

struct HttpSession {
    id: String,
    /// Hash of the credential that created the session (None: no Authorization).
    credential: Option<String>,
    router: Arc<Router>,
    session: tokio::sync::Mutex<Option<Session>>,
    process: tokio::sync::Mutex<Option<UpstreamProcess>>,
    http: Option<HttpUpstream>,
    /// Requests waiting for their answer, by id: the stream of the POST that carried each.
    waiting: DashMap<Id, Waiter>,
    /// Orders the waiters (the newest gets server requests).
    seq: std::sync::atomic::AtomicU64,
    /// The standalone GET stream, if open.
    standalone: Mutex<Option<Out>>,
    /// Server-initiated messages with no stream to go to yet (bounded).
    backlog: Mutex<VecDeque<Bytes>>,
    last_active: Mutex<Instant>,
    gone: tokio::sync::watch::Sender<bool>,
    /// Ids given to stateless requests (unique on this connection, whoever sent them).
    next_internal: std::sync::atomic::AtomicU64,
}

impl HttpSession {
    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// A line the session wrote toward the client. An answer goes to the POST waiting for it; progress
    /// to the POST whose request carried its token; a server request (elicitation, sampling, roots:
    /// asked while the server handles a call) to the newest POST still open, as the spec relates
    /// such requests to the request being handled, else the GET stream; other notifications to the
    /// GET stream, else a POST stream, else the backlog until a stream opens.
    fn dispatch(&self, line: Vec<u8>) {
        let line = Bytes::from(line);
        let (kind, progress_token) = match Envelope::parse(&line) {
            Ok(env) => {
                if env.kind == Kind::Response
                    && let Some(id) = env.id.as_ref()
                    && let Some((_, w)) = self.waiting.remove(id)
                {
                    let line = match &w.original {
                        Some(original) => Bytes::from(jsonrpc::with_id(&env, original)),
                        None => line.clone(),
                    };
                    let _ = w.out.send(line);
                    return;
                }
                if env.kind == Kind::Notification
                    && memchr::memmem::find(&line, SUBSCRIPTION_ID.as_bytes()).is_some()
                    && let Some(subscription) = env.params.and_then(|p| subscription_of(p.get()))
                {
                    return self.to_subscriber(&subscription, &line);
                }
                let token = (env.method == Some("notifications/progress"))
                    .then(|| env.params.and_then(|p| progress_token(p.get())))
                    .flatten();
                (env.kind, token)
            }
            Err(_) => (Kind::Notification, None),
        };
        if let Some(token) = progress_token
            && let Some(w) = self.waiting.iter().find(|w| w.token.as_deref() == Some(token.as_str()))
            && w.out.send(line.clone()).is_ok()
        {
            return;
        }
        if kind == Kind::Request
            && let Some(w) = self.waiting.iter().filter(|w| !w.out.is_closed()).max_by_key(|w| w.seq)
            && w.out.send(line.clone()).is_ok()
        {
            tracing::debug!(session = %short(&self.id), "server request on the stream of the newest POST");
            return;
        }
        let mut standalone = self.standalone.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(out) = standalone.as_ref() {
            if out.send(line.clone()).is_ok() {
                tracing::debug!(session = %short(&self.id), "server message on the GET stream");
                return;
            }
            *standalone = None;
        }
        drop(standalone);
        if let Some(w) = self.waiting.iter().filter(|w| !w.out.is_closed()).max_by_key(|w| w.seq) {
            tracing::debug!(session = %short(&self.id), "server message on a POST stream");
            let _ = w.out.send(line);
            return;
        }
        tracing::debug!(session = %short(&self.id), "server message kept until a stream opens");
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if backlog.len() >= 1000 {
            backlog.pop_front();
            tracing::warn!(session = %short(&self.id), "dropped a server message: no stream open for 1000 messages");
        }
        backlog.push_back(line);
    }

    /// The client is done with the session (DELETE, or idle): its HTTP side ends now, but while tasks
    /// it started still run, their upstream stays up, so that the client (reconnecting with the same
    /// credential) finds their results; then everything closes.
    async fn retire(self: Arc<Self>, grace: Duration) {
        let _ = self.gone.send(true);
        self.waiting.clear();
        self.standalone.lock().unwrap_or_else(|e| e.into_inner()).take();
        let running = self.tasks_in_flight().await;
        if running == 0 {
            return self.close(grace).await;
        }
        tracing::info!(session = %short(&self.id), running, "session ended; its upstream stays until its tasks finish");
        tokio::spawn(async move {
            while self.tasks_in_flight().await > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tracing::info!(session = %short(&self.id), "the tasks of an ended session finished; closing its upstream");
            self.close(grace).await;
        });
    }

    async fn tasks_in_flight(&self) -> usize {
        let intercept = self.session.lock().await.as_ref().map(|s| s.intercept.clone());
        match intercept {
            Some(intercept) => intercept.tasks_in_flight().await,
            None => 0,
        }
    }

    async fn close(&self, grace: Duration) {
        let _ = self.gone.send(true);
        if let Some(mut s) = self.session.lock().await.take() {
            s.upstream_closer.close().await;
            if let Some(http) = &self.http {
                http.close().await;
                s.upstream_gone("closed its HTTP session").await;
            }
            if let Some(mut p) = self.process.lock().await.take() {
                let (status, _) = p.terminate(grace).await;
                let why = match status {
                    Ok(s) => format!("exited ({})", stdio::describe(&s)),
                    Err(e) => format!("could not be waited for ({e})"),
                };
                s.upstream_gone(&why).await;
            }
            s.client_closer.close().await;
        }
        self.waiting.clear();
        self.standalone.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

struct Sidecar {
    config: Config,
    args: ServeArgs,
    shared: Shared,
    sessions: DashMap<String, Arc<HttpSession>>,
    /// Upstream connections serving stateless (2026-07-28) requests, by credential hash ("" for none).
    stateless: DashMap<String, Arc<HttpSession>>,
    /// Serialises the opening of stateless connections, so one credential never gets two.
    opening: tokio::sync::Mutex<()>,
    in_flight: AtomicUsize,
    allowed_hosts: Vec<String>,
}

/// Runs the sidecar until SIGINT/SIGTERM; returns the exit code.
pub async fn run(config: &Config, args: ServeArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !args.command.is_empty() || args.upstream.is_some(),
        "no upstream given: put the server's command after `--` (e.g. `mcp-asyncify serve -- npx -y @notionhq/notion-mcp-server`) or give --upstream-url URL"
    );
    anyhow::ensure!(
        args.command.is_empty() || args.upstream.is_none(),
        "give either --upstream-url or a command after `--`, not both"
    );
    anyhow::ensure!(args.max_sessions > 0, "--max-sessions must be at least 1");
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", args.listen))?;
    let bound = listener.local_addr()?;
    let mut allowed_hosts: Vec<String> =
        ["localhost", "127.0.0.1", "[::1]"].iter().map(|h| h.to_string()).collect();
    allowed_hosts.push(bound.ip().to_string());
    allowed_hosts.extend(args.allow_hosts.iter().map(|h| h.to_ascii_lowercase()));
    let shared = Shared::open(config, super::session::DefaultStore::Memory).await?;
    let sidecar = Arc::new(Sidecar {
        config: config.clone(),
        shared,
        sessions: DashMap::new(),
        stateless: DashMap::new(),
        opening: tokio::sync::Mutex::new(()),
        in_flight: AtomicUsize::new(0),
        allowed_hosts,
        args,
    });
    let upstream = match &sidecar.args.upstream {
        Some(o) => format!("{o:?}"),
        None => sidecar.args.command.join(" "),
    };
    tracing::info!(addr = %bound, upstream = %upstream, "sidecar listening on http://{bound}/mcp");
    sidecar.clone().spawn_reaper();

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        // Answers are small and often streamed in pieces: never let Nagle hold the last one back.
        let _ = stream.set_nodelay(true);
        let sidecar = sidecar.clone();
        let service = hyper::service::service_fn(move |req| {
            let sidecar = sidecar.clone();
            async move { Ok::<_, Infallible>(sidecar.handle(req).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    // Let calls in flight finish (bounded), then end every session and its upstream.
    let grace = Duration::from_millis(sidecar.config.proxy.shutdown_grace_ms.max(1000)) * 10;
    tracing::info!(
        in_flight = sidecar.in_flight.load(Ordering::Relaxed),
        "shutting down: letting calls in flight finish"
    );
    let deadline = Instant::now() + grace;
    while sidecar.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sessions: Vec<Arc<HttpSession>> = sidecar.sessions.iter().map(|e| e.value().clone()).collect();
    sessions.extend(sidecar.stateless.iter().map(|e| e.value().clone()));
    sidecar.sessions.clear();
    sidecar.stateless.clear();
    for s in sessions {
        s.close(sidecar.config.shutdown_grace()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
    Ok(0)
}

type HttpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<HttpBody> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).expect("valid"));
    r
}

/// A 2025-11-25 request's `MCP-Protocol-Version`, when it has one, must be a session version the
/// sidecar serves (400 otherwise).
fn check_session_version(headers: &HeaderMap) -> Result<(), Response<HttpBody>> {
    let Some(v) = headers.get("mcp-protocol-version") else { return Ok(()) };
    let v = v.to_str().unwrap_or("");
    if SUPPORTED_VERSIONS.contains(&v) {
        return Ok(());
    }
    let msg = format!(
        "Bad Request: unsupported MCP-Protocol-Version {v:?} (supported: {})",
        SUPPORTED_VERSIONS.join(", ")
    );
    Err(rpc_error(StatusCode::BAD_REQUEST, None, code::INVALID_REQUEST, &msg))
}

fn accepted() -> Response<HttpBody> {
    let body = Full::new(Bytes::new()).boxed_unsync();
    Response::builder().status(StatusCode::ACCEPTED).body(body).expect("valid response")
}

fn plain(status: StatusCode, text: &str) -> Response<HttpBody> {
    full(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

/// A JSON-RPC error as an HTTP error body.
fn rpc_error(status: StatusCode, id: Option<&Id>, code: i64, message: &str) -> Response<HttpBody> {
    full(status, "application/json", jsonrpc::error_response(id, code, message, None))
}

/// An SSE body fed by a channel: every message is one `message` event; comments keep it alive. It
/// ends when its sender is gone: for a POST, the dispatcher drops the sender with the answer it
/// delivers (or when the request is cancelled or the session ends).
struct SseBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    first: Option<Bytes>,
    ping: Pin<Box<tokio::time::Sleep>>,
    _guard: Option<FlightGuard>,
}

fn sse_event(line: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(line.len() + 24);
    out.extend_from_slice(b"event: message\ndata: ");
    out.extend_from_slice(line);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(line) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(sse_event(&line)))));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => Poll::Ready(Some(Ok(Frame::data(sse_event(&line))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.ping.as_mut().poll(cx).is_ready() {
                    let next = tokio::time::Instant::now() + Duration::from_secs(15);
                    self.ping.as_mut().reset(next);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n")))));
                }
                Poll::Pending
            }
        }
    }
}

/// Counts a request in flight until dropped (graceful shutdown waits for them).
struct FlightGuard(Arc<Sidecar>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn sse_response(body: SseBody) -> Response<HttpBody> {
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An HTTP upstream's 401/403, as the HTTP transport reports it in an error answer (code -32001 with
/// `data.status` and `data.www_authenticate`).
fn upstream_refusal(line: &[u8]) -> Option<(StatusCode, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let err = v.get("error")?;
    if err.get("code")?.as_i64()? != http_upstream::REFUSED {
        return None;
    }
    let status = StatusCode::from_u16(u16::try_from(err.pointer("/data/status")?.as_u64()?).ok()?).ok()?;
    let challenge = err.pointer("/data/www_authenticate").and_then(|c| c.as_str()).map(str::to_owned);
    matches!(status.as_u16(), 401 | 403).then_some((status, challenge))
}

/// The `progressToken` of a progress notification's params, as JSON text.
fn progress_token(params: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(params).ok()?;
    Some(v.get("progressToken")?.to_string())
}

/// The `_meta.progressToken` of a request's params, as JSON text.
fn request_progress_token(params: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(params).ok()?;
    Some(v.pointer("/_meta/progressToken")?.to_string())
}

fn accepts(headers: &HeaderMap, what: &str) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(|p| p.split(';').next().unwrap_or("").trim()).any(|t| t == what || t == "*/*")
    })
}

fn host_of(value: &str) -> String {
    let v = value.trim().to_ascii_lowercase();
    if let Some(rest) = v.strip_prefix('[') {
        return format!("[{}]", rest.split(']').next().unwrap_or(""));
    }
    v.split(':').next().unwrap_or("").to_string()
}

impl Sidecar {
    fn spawn_reaper(self: Arc<Self>) {
        let idle = Duration::from_secs(self.args.session_idle_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(idle.min(Duration::from_secs(10))).await;
                let stale: Vec<Arc<HttpSession>> = self
                    .sessions
                    .iter()
                    .chain(self.stateless.iter())
                    .filter(|s| {
                        let s = s.value();
                        // A stream whose client vanished is closed (its keep-alive write failed).
                        let open = s
                            .standalone
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_ref()
                            .is_some_and(|o| !o.is_closed());
                        !open
                            && s.waiting.iter().all(|w| w.out.is_closed())
                            && s.last_active.lock().unwrap_or_else(|e| e.into_inner()).elapsed() > idle
                    })
                    .map(|s| s.value().clone())
                    .collect();
                for s in stale {
                    tracing::info!(session = %short(&s.id), "closing an idle session");
                    self.sessions.remove(&s.id);
                    self.stateless.retain(|_, v| !Arc::ptr_eq(v, &s));
                    s.retire(self.config.shutdown_grace()).await;
                }
            }
        });
    }

    /// Validates `Host` and `Origin` (DNS rebinding): an unknown one gets 403.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Response<HttpBody>> {
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            let h = host_of(host);
            if !self.allowed_hosts.iter().any(|a| host_of(a) == h) {
                tracing::warn!(host = %h, "refused a request for an unknown Host (DNS rebinding?)");
                return Err(plain(StatusCode::FORBIDDEN, "Forbidden: unknown Host (see --allow-host)"));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
            let host = o.split("://").nth(1).map(host_of).unwrap_or_default();
            let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]");
            let listed = self
                .args
                .allow_origins
                .iter()
                .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(&o));
            if !(local || listed) {
                tracing::warn!(origin = %o, "refused a request from an unknown Origin");
                return Err(plain(
                    StatusCode::FORBIDDEN,
                    "Forbidden: Origin not allowed (see --allow-origin)",
                ));
            }
        }
        Ok(())
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<HttpBody> {
        if let Err(r) = self.check_origin(req.headers()) {
            return r;
        }
        // A POST's version is checked once its body tells which generation it speaks. 2026-07-28 has
        // no GET stream and no session to DELETE: 405, as its transport says.
        let modern =
            req.headers().get("mcp-protocol-version").is_some_and(|v| v == super::era::MODERN_VERSION);
        if modern && req.uri().path() == "/mcp" && matches!(*req.method(), Method::GET | Method::DELETE) {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed: 2026-07-28 has no GET stream or sessions",
            );
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        if req.method() != Method::POST
            && let Err(r) = check_session_version(req.headers())
        {
            return r;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => match crate::tasks::store::measured::healthz() {
                (true, text) => plain(StatusCode::OK, text.trim_end()),
                (false, text) => plain(StatusCode::SERVICE_UNAVAILABLE, &text),
            },
            (&Method::GET, "/metrics") => match crate::telemetry::render_prometheus() {
                Some(text) => full(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
                None => plain(StatusCode::NOT_FOUND, "metrics are off (start with --metrics-listen)"),
            },
            (&Method::POST, "/mcp") => self.post(req).await,
            (&Method::GET, "/mcp") => self.get(req).await,
            (&Method::DELETE, "/mcp") => self.delete(req).await,
            (_, "/mcp") => {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
                r
            }
            _ => plain(StatusCode::NOT_FOUND, "Not Found: the MCP endpoint is /mcp"),
        }
    }

    /// The owner bound to the request's credential: an HMAC-SHA256 of its Authorization header, keyed
    /// by the store's secret (never the credential itself).
    fn credential(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get(header::AUTHORIZATION)
            .map(|v| self.shared.owners.owner("credential", &String::from_utf8_lossy(v.as_bytes())))
    }

    /// The session a request names, checked against its credential.
    fn session_of(&self, headers: &HeaderMap) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "Bad Request: Mcp-Session-Id header is required (initialize first)",
            ));
        };
        let Some(s) = self.sessions.get(id).map(|s| s.value().clone()) else {
            return Err(rpc_error(StatusCode::NOT_FOUND, None, -32001, "Session not found"));
        };
        if s.credential != self.credential(headers) {
            // Not the credential that made the session: as if it did not exist.
            return Err(rpc_error(StatusCode::NOT_FOUND, None, -32001, "Session not found"));
        }
        s.touch();
        Ok(s)
    }

    async fn post(self: Arc<Self>, req: Request<Incoming>) -> Response<HttpBody> {
        let headers = req.headers().clone();
        let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json")
        });
        if !json {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type: Content-Type must be application/json",
            );
        }
        if !(accepts(&headers, "application/json") && accepts(&headers, "text/event-stream")) {
            return plain(
                StatusCode::NOT_ACCEPTABLE,
                "Not Acceptable: Accept must list both application/json and text/event-stream",
            );
        }
        let max = self.config.proxy.max_message_bytes;
        let body = match Limited::new(req.into_body(), max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("Payload Too Large: over {max} bytes"));
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Bad Request: the body could not be read"),
        };
        let env = match Envelope::parse(&body) {
            Ok(env) => env,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, None, e.code(), &e.to_string()),
        };
        let (kind, id, method) = (env.kind, env.id.clone(), env.method.map(str::to_owned));
        // What the streams need from the params: a request's progress token (its progress goes on
        // its own stream), or the request a cancellation names.
        let token = match kind {
            Kind::Request => env.params.and_then(|p| request_progress_token(p.get())),
            _ => None,
        };
        let cancelled = match method.as_deref() {
            Some("notifications/cancelled") => super::session::cancelled_request_id(env.params),
            _ => None,
        };
        let era = match (kind, self.config.tasks.enabled) {
            (Kind::Response, _) | (_, false) => Era::Legacy,
            _ => Era::of(env.params),
        };
        let discover = method.as_deref() == Some("server/discover") && self.config.tasks.enabled;
        if era != Era::Legacy || (discover && !headers.contains_key("mcp-session-id")) {
            return self.stateless(&headers, &env, era, token).await;
        }
        drop(env);
        if let Err(r) = check_session_version(&headers) {
            return r;
        }
        let session = if method.as_deref() == Some("initialize") && !headers.contains_key("mcp-session-id") {
            match self.clone().open_session(&headers).await {
                Ok(s) => s,
                Err(r) => return r,
            }
        } else {
            match self.session_of(&headers) {
                Ok(s) => s,
                Err(r) => return r,
            }
        };
        if kind != Kind::Request {
            // A cancelled request gets no answer: end the stream of the POST that waits for it.
            if let Some(cancelled) = cancelled {
                session.waiting.remove(&cancelled);
            }
            session.router.route_client(body.to_vec()).await;
            return accepted();
        }
        let id = id.expect("a request has an id");
        let mut response = self.exchange(&session, id, body.to_vec(), token, None).await;
        if method.as_deref() == Some("initialize") {
            response
                .headers_mut()
                .insert("mcp-session-id", HeaderValue::from_str(&session.id).expect("uuid"));
        }
        response
    }

    /// Sends one request into a session and answers the POST: with JSON when the answer comes first,
    /// else with an SSE stream carrying what comes before it (progress, server requests) and then it.
    async fn exchange(
        self: Arc<Self>,
        session: &Arc<HttpSession>,
        id: Id,
        line: Vec<u8>,
        token: Option<String>,
        original: Option<Id>,
    ) -> Response<HttpBody> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = FlightGuard(self.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seq = session.seq.fetch_add(1, Ordering::Relaxed);
        let stateless = original.is_some();
        let answer_id = original.clone().unwrap_or_else(|| id.clone());
        session.waiting.insert(id, Waiter { out: tx, seq, token, original });
        session.router.route_client(line).await;
        let mut gone = session.gone.subscribe();
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = gone.wait_for(|g| *g) => None,
        };
        let Some(first) = first else {
            let why = match *session.gone.borrow() {
                true => "the session ended before this request was answered",
                false => "the request was cancelled (notifications/cancelled); it gets no answer",
            };
            return rpc_error(StatusCode::OK, Some(&answer_id), code::UPSTREAM_GONE, why);
        };
        let error_code = match Envelope::parse(&first) {
            Ok(e) if e.kind == Kind::Response && e.id.as_ref() == Some(&answer_id) => {
                e.error.map(|e| jsonrpc::error_code_of(e.get()))
            }
            _ => {
                return sse_response(SseBody {
                    rx,
                    first: Some(first),
                    ping: Box::pin(tokio::time::sleep(Duration::from_secs(15))),
                    _guard: Some(guard),
                });
            }
        };
        drop(guard);
        match (upstream_refusal(&first), error_code.flatten()) {
            // The hosted server refused the credential: the client sees the HTTP answer itself
            // (status and WWW-Authenticate), so its OAuth flow can act.
            (Some((status, challenge)), _) => {
                let mut r = full(status, "application/json", first);
                if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
                r
            }
            // 2026-07-28 errors about the request itself are HTTP 400, an unknown method is a 404.
            (None, Some(code)) if code::is_modern_client_error(code) => {
                full(StatusCode::BAD_REQUEST, "application/json", first)
            }
            (None, Some(code::METHOD_NOT_FOUND)) if stateless => {
                full(StatusCode::NOT_FOUND, "application/json", first)
            }
            _ => full(StatusCode::OK, "application/json", first),
        }
    }

    async fn get(self: Arc<Self>, req: Request<Incoming>) -> Response<HttpBody> {
        if !accepts(req.headers(), "text/event-stream") {
            return plain(StatusCode::NOT_ACCEPTABLE, "Not Acceptable: Accept must list text/event-stream");
        }
        let session = match self.session_of(req.headers()) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        for line in session.backlog.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = tx.send(line);
        }
        // A new standalone stream replaces the old one.
        *session.standalone.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        sse_response(SseBody {
            rx,
            first: None,
            ping: Box::pin(tokio::time::sleep(Duration::from_secs(15))),
            _guard: None,
        })
    }

    async fn delete(self: Arc<Self>, req: Request<Incoming>) -> Response<HttpBody> {
        let session = match self.session_of(req.headers()) {
            Ok(s) => s,
            Err(r) => return r,
        };
        self.sessions.remove(&session.id);
        tracing::info!(session = %short(&session.id), "session ended by the client");
        session.retire(self.config.shutdown_grace()).await;
        plain(StatusCode::OK, "session ended")
    }

    /// A new client session: its own upstream process and routing.
    async fn open_session(
        self: Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        let credential = self.credential(headers);
        let session_key = uuid::Uuid::new_v4().simple().to_string();
        let owner = match &credential {
            Some(c) => c.clone(),
            None => self.shared.owners.owner("session", &session_key),
        };
        let session = self.clone().spawn_session(headers, session_key, credential, owner).await?;
        self.sessions.insert(session.id.clone(), session.clone());
        tracing::info!(session = %short(&session.id), sessions = self.sessions.len(), "session opened");
        Ok(session)
    }

    /// Starts an upstream (a process, or a connection to the hosted server) and the routing of a
    /// session owned by `owner`, within the cap on sessions.
    async fn spawn_session(
        self: Arc<Self>,
        headers: &HeaderMap,
        id: String,
        credential: Option<String>,
        owner: String,
    ) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        if self.sessions.len() + self.stateless.len() >= self.args.max_sessions {
            tracing::warn!(max = self.args.max_sessions, "refused a new session: too many sessions");
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Service Unavailable: {} sessions open (--max-sessions)", self.args.max_sessions),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return Err(r);
        }
        type Input = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
        type Output = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
        let (process, http, upstream_in, upstream_out): (_, _, Input, Output) = match &self.args.upstream {
            Some(options) => {
                let (w, r, handle) = http_upstream::connect(options.clone());
                // The client's credential goes to the hosted server unchanged (never logged).
                handle.set_authorization(headers.get(header::AUTHORIZATION).cloned());
                (None, Some(handle), Box::new(w), Box::new(r))
            }
            None => match UpstreamProcess::spawn(&self.args.command) {
                Ok((p, child_in, child_out)) => (Some(p), None, Box::new(child_in), Box::new(child_out)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the upstream for a new session");
                    return Err(rpc_error(
                        StatusCode::BAD_GATEWAY,
                        None,
                        code::UPSTREAM_GONE,
                        &format!("cannot start the upstream server: {e}"),
                    ));
                }
            },
        };
        let (client_w, client_r) = tokio::io::duplex(1 << 20);
        let session = Session::new(&self.config, &self.shared, owner.clone(), client_w, upstream_in);
        self.shared.resume_orphans(&session, &owner);
        let router = session.router.clone();
        let http = Arc::new(HttpSession {
            id: id.clone(),
            credential,
            router: router.clone(),
            session: tokio::sync::Mutex::new(Some(session)),
            process: tokio::sync::Mutex::new(process),
            http,
            waiting: DashMap::new(),
            seq: std::sync::atomic::AtomicU64::new(0),
            standalone: Mutex::new(None),
            backlog: Mutex::new(VecDeque::new()),
            last_active: Mutex::new(Instant::now()),
            gone: tokio::sync::watch::channel(false).0,
            next_internal: std::sync::atomic::AtomicU64::new(1),
        });
        // What the session writes for the client goes to the HTTP streams.
        let out = Arc::downgrade(&http);
        let max = self.config.proxy.max_message_bytes;
        tokio::spawn(async move {
            let mut reader = LineReader::new(client_r, max.saturating_mul(2));
            while let Ok(Some(Line::Message(line))) = reader.next_line().await {
                match out.upgrade() {
                    Some(s) => s.dispatch(line),
                    None => break,
                }
            }
        });
        // The upstream's output, and its end.
        let this = self.clone();
        let watched = http.clone();
        tokio::spawn(async move {
            router.pump_upstream(upstream_out).await;
            let stateless =
                this.stateless.iter().find(|e| Arc::ptr_eq(e.value(), &watched)).map(|e| e.key().clone());
            if this.sessions.remove(&watched.id).is_some() || stateless.is_some() {
                tracing::warn!(session = %short(&watched.id), "the upstream of a session exited");
            }
            if let Some(key) = stateless {
                this.stateless.remove(&key);
            }
            watched.close(Duration::ZERO).await;
        });
        Ok(http)
    }
}
