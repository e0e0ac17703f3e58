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
//! [`routes`] the endpoint's methods; [`rules`] the transport's HTTP rules and responses;
//! [`http_session`] a session's streams; [`spawn`] sessions' upstreams and the idle reaper;
//! [`stateless`] 2026-07-28 requests.

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

use super::session::{Router, Session, Shared};
use crate::config::Config;
use crate::jsonrpc::{self, Envelope, Id, Kind, code};
use crate::tasks::engine::owner_hash;
use crate::transport::http_upstream::{self, HttpUpstream, HttpUpstreamOptions};
use crate::transport::lines::{Line, LineReader};
use crate::transport::stdio::{self, UpstreamProcess};
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use http_session::short;
use hyper::body::{Body, Frame, Incoming};
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
    backlog: Mutex<VecDeque<Bytes>>,
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
    let sidecar = Arc::new(Sidecar {
        config: config.clone(),
        shared: Shared::new(config),
        sessions: DashMap::new(),
        stateless: DashMap::new(),
        opening: tokio::sync::Mutex::new(()),
        in_flight: TaskTracker::new(),
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
    rx: mpsc::UnboundedReceiver<Bytes>,
    first: Option<Bytes>,
    ping: Pin<Box<tokio::time::Sleep>>,
    _guard: Option<TaskTrackerToken>,
}
