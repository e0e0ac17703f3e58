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

//! The files, one job each: this one has the options, the shared state and the accept/shutdown loop;
//! `routes` the endpoint's methods; `rules` the transport's HTTP rules and responses;
//! `http_session` a session's streams; `spawn` sessions' upstreams and the idle reaper;
//! `stateless` 2026-07-28 requests.

// An HTTP error response is the natural `Err` here: it is built once per refused request and returned
// as is, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use super::era::Era;
use super::intercept::SUBSCRIPTION_ID;

mod http_session;
mod routes;
mod rules;
mod spawn;
mod stateless;

use super::session::{Router, Session};
use super::shared::{DefaultStore, Shared};
use crate::config::Config;
use crate::jsonrpc::{self, Id, Kind, Message, code};
use crate::transport::http_upstream::{self, HttpUpstream, HttpUpstreamOptions};
use crate::transport::lines::Deliver;
use crate::transport::stdio::{self, UpstreamProcess};
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use http_session::short;
use hyper::body::{Body, Frame};
use rules::*;
use stateless::subscription_of;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Options of `mcp-asyncify serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where to listen (keep it on loopback unless a trusted proxy sits in front).
    #[arg(long, env = "MCP_ASYNCIFY_LISTEN", default_value = "127.0.0.1:8931", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The most client sessions at once (each runs its own upstream process).
    #[arg(long, env = "MCP_ASYNCIFY_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// The most requests handled at once (until each one's response starts); more are refused with
    /// 503 at once rather than queued.
    #[arg(long, env = "MCP_ASYNCIFY_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    /// The threads that run the sidecar's async work. One serves a sidecar's usual load best (a
    /// message crosses several tasks, and threads that wake each other for it cost more than they
    /// share); raise it for thousands of calls per second from many busy sessions.
    #[arg(long, env = "MCP_ASYNCIFY_WORKER_THREADS", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
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
    /// Whether a client's own `Authorization` goes to the hosted upstream (`--upstream-auth
    /// passthrough`). Otherwise it only binds the client's tasks, and the proxy's own sign-in (or
    /// the configured headers) authenticates it upstream.
    #[arg(skip)]
    pub pass_client_authorization: bool,
}

/// The protocol versions whose Streamable HTTP rules the sidecar follows (`MCP-Protocol-Version`).
const SUPPORTED_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

/// A message for a client's HTTP stream.
type Out = mpsc::UnboundedSender<Message>;

/// The stream of a POST waiting for its answer.
struct Waiter {
    out: Out,
    seq: u64,
    /// The request's `progressToken` (JSON text), so its progress goes on its own stream.
    token: Option<String>,
    /// A stateless request travels under an id of the sidecar's; its answer gets this one back.
    original: Option<Id>,
    /// The task a `tasks/result` waits on: the task's questions go on this stream.
    task: Option<String>,
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
    backlog: Mutex<VecDeque<Message>>,
    last_active: Mutex<Instant>,
    gone: tokio::sync::watch::Sender<bool>,
    /// Ids given to stateless requests (unique on this connection, whoever sent them).
    next_internal: std::sync::atomic::AtomicU64,
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
    /// Requests in flight (until their answer is sent).
    in_flight: TaskTracker,
    /// Requests being handled (until their response head): `--max-concurrent-requests`.
    concurrency: Arc<tokio::sync::Semaphore>,
    /// The hosts a `Host` header may name (read as `host_of` reads one: lowercase, no port).
    allowed_hosts: Vec<String>,
}

/// How long a client may take to send a request's head, and then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A request body the sidecar can read (hyper's, a test's `Full`, or either through the layers).
pub(super) trait RequestBody:
    Body<Data = Bytes, Error: Into<tower::BoxError>> + Send + 'static
{
}
impl<B: Body<Data = Bytes, Error: Into<tower::BoxError>> + Send + 'static> RequestBody for B {}

/// The sidecar's HTTP side, as one tower service of any request body.
type HttpService<B> = tower::util::BoxCloneService<Request<B>, Response<HttpBody>, Infallible>;

/// Makes a service that answers every failure with an HTTP status infallible, as hyper wants it.
#[derive(Clone)]
struct Infallibly<S>(S);

impl<S, R> tower::Service<R> for Infallibly<S>
where
    S: tower::Service<R, Response = Response<HttpBody>, Error = tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<HttpBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // (Load shedding is ready at all times: its refusals come as 503 answers.)
        self.0.poll_ready(cx).map(|_| Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        let answer = self.0.call(req);
        Box::pin(async move {
            Ok(answer.await.unwrap_or_else(|e| {
                plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Internal Server Error: {e}"))
            }))
        })
    }
}

impl Sidecar {
    /// The HTTP side as a tower service: requests past `--max-concurrent-requests` are shed with a
    /// 503 at once (never queued), bodies over `max_message_bytes` get a 413 and a body that does not
    /// arrive within 30 s a 408, then the endpoint's own rules ([`Sidecar::handle`]).
    fn service<B: RequestBody>(self: &Arc<Self>) -> HttpService<B>
    where
        B::Data: Send,
    {
        use tower::ServiceBuilder;
        let sidecar = self.clone();
        let limit = self.config.proxy.max_message_bytes;
        let service = ServiceBuilder::new()
            .map_result(|result: Result<Response<HttpBody>, tower::BoxError>| {
                Ok::<_, tower::BoxError>(match result {
                    Ok(response) => response,
                    Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                        tracing::warn!("shed a request: the sidecar is at --max-concurrent-requests");
                        let mut r = plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "Service Unavailable: too many requests in flight (--max-concurrent-requests); retry shortly",
                        );
                        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        r
                    }
                    Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Internal Server Error: {e}")),
                })
            })
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(self.concurrency.clone()))
            .map_response(|r: Response<_>| r.map(BodyExt::boxed_unsync))
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
            .layer(tower_http::limit::RequestBodyLimitLayer::new(limit))
            .service_fn(move |req| {
                let sidecar = sidecar.clone();
                async move { Ok::<_, Infallible>(sidecar.handle(req).await) }
            });
        tower::util::BoxCloneService::new(Infallibly(service))
    }
}

impl Sidecar {
    /// The sidecar's state, serving at `bound`.
    async fn new(config: &Config, args: ServeArgs, bound: SocketAddr) -> anyhow::Result<Arc<Sidecar>> {
        // The names a Host header may give, as `host_of` reads one (an IPv6 address in brackets),
        // read once here rather than for each request.
        let bound_host = match bound.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let allowed_hosts = ["localhost", "127.0.0.1", "[::1]", bound_host.as_str()]
            .into_iter()
            .chain(args.allow_hosts.iter().map(String::as_str))
            .map(host_of)
            .collect();
        let shared = Shared::open(config, DefaultStore::Memory).await?;
        Ok(Arc::new(Sidecar {
            config: config.clone(),
            shared,
            sessions: DashMap::new(),
            stateless: DashMap::new(),
            opening: tokio::sync::Mutex::new(()),
            in_flight: TaskTracker::new(),
            concurrency: Arc::new(tokio::sync::Semaphore::new(args.max_concurrent_requests)),
            allowed_hosts,
            args,
        }))
    }
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
    anyhow::ensure!(args.max_concurrent_requests > 0, "--max-concurrent-requests must be at least 1");
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", args.listen))?;
    let bound = listener.local_addr()?;
    let sidecar = Sidecar::new(config, args, bound).await?;
    let upstream = match &sidecar.args.upstream {
        Some(o) => format!("{o:?}"),
        None => sidecar.args.command.join(" "),
    };
    tracing::info!(addr = %bound, upstream = %upstream, "sidecar listening on http://{bound}/mcp");
    sidecar.clone().spawn_reaper();

    let service = sidecar.service();
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
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        // A client that never finishes its request head is dropped.
        builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
        let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    // Let calls in flight finish (bounded), then end every session and its upstream.
    let grace = Duration::from_millis(sidecar.config.proxy.shutdown_grace_ms.max(1000)) * 10;
    tracing::info!(in_flight = sidecar.in_flight.len(), "shutting down: letting calls in flight finish");
    sidecar.in_flight.close();
    if tokio::time::timeout(grace, sidecar.in_flight.wait()).await.is_err() {
        tracing::warn!(
            in_flight = sidecar.in_flight.len(),
            ?grace,
            "calls still in flight after the grace period; ending them"
        );
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

/// An SSE body fed by a channel: every message is one `message` event; comments keep it alive. It
/// ends when its sender is gone: for a POST, the dispatcher drops the sender with the answer it
/// delivers (or when the request is cancelled or the session ends).
struct SseBody {
    rx: mpsc::UnboundedReceiver<Message>,
    first: Option<Message>,
    ping: Pin<Box<tokio::time::Sleep>>,
    _guard: Option<TaskTrackerToken>,
}

#[cfg(test)]
mod tests {
    //! The HTTP side called as a tower service, without a socket.
    use super::*;
    use tower::ServiceExt;

    async fn sidecar(max_message_bytes: usize, max_concurrent_requests: usize) -> Arc<Sidecar> {
        sidecar_at("127.0.0.1:8931", &[], max_message_bytes, max_concurrent_requests).await
    }

    async fn sidecar_at(
        bound: &str,
        allow_hosts: &[&str],
        max_message_bytes: usize,
        max_concurrent_requests: usize,
    ) -> Arc<Sidecar> {
        let mut config = Config::default();
        config.proxy.max_message_bytes = max_message_bytes;
        let args = ServeArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_sessions: 4,
            max_concurrent_requests,
            worker_threads: 1,
            session_idle_secs: 60,
            allow_origins: Vec::new(),
            allow_hosts: allow_hosts.iter().map(|h| h.to_string()).collect(),
            command: vec!["true".into()],
            upstream: None,
            pass_client_authorization: false,
        };
        Sidecar::new(&config, args, bound.parse().unwrap()).await.unwrap()
    }

    fn post(body: &'static str) -> Request<Full<Bytes>> {
        Request::post("/mcp")
            .header(header::HOST, "127.0.0.1:8931")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    async fn text(r: Response<HttpBody>) -> String {
        String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes()).into_owned()
    }

    #[tokio::test]
    async fn the_transport_rules_answer_without_a_socket() {
        let s = sidecar(1024, 8).await;
        let r = s
            .service()
            .oneshot(
                Request::put("/mcp").header(header::HOST, "localhost").body(Full::new(Bytes::new())).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, POST, DELETE");
        let mut evil = post("{}");
        evil.headers_mut().insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert_eq!(s.service().oneshot(evil).await.unwrap().status(), StatusCode::FORBIDDEN);
        let mut text_body = post("{}");
        text_body.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(
            s.service().oneshot(text_body).await.unwrap().status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let r = s.service().oneshot(post("not json")).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(text(r).await.contains("-32700"), "a parse error");
    }

    #[tokio::test]
    async fn the_host_it_is_bound_to_and_the_allowed_ones_pass_the_host_check() {
        let s = sidecar_at("[fe80::1]:8931", &["MCP.Example.com:443"], 1024, 8).await;
        let with_host = |host: &'static str| {
            let mut r = post("not json");
            r.headers_mut().insert(header::HOST, HeaderValue::from_static(host));
            r
        };
        for host in [
            "[fe80::1]:8931",
            "[FE80::1]",
            "localhost:8931",
            "[::1]:8931",
            "mcp.example.com",
            "mcp.example.COM:8443",
        ] {
            let r = s.service().oneshot(with_host(host)).await.unwrap();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{host} passes the check (then a parse error)");
        }
        for host in ["fe80", "[fe80::2]:8931", "example.com", "mcp.example.com.evil"] {
            let r = s.service().oneshot(with_host(host)).await.unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{host} is refused");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_by_the_layer() {
        let s = sidecar(16, 8).await;
        let r = s.service().oneshot(post(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)).await.unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn past_the_concurrency_limit_requests_are_shed_with_503_not_queued() {
        let s = sidecar(1024, 1).await;
        let _busy = s.concurrency.clone().acquire_owned().await.unwrap();
        let started = Instant::now();
        let r = s.service().oneshot(post("{}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
        assert!(text(r).await.contains("--max-concurrent-requests"));
        drop(_busy);
        let r = s.service().oneshot(post("not json")).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "served again once a slot is free");
    }
}
