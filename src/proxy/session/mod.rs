//! One proxied MCP session: the routing between a client and an upstream.
//!
//! Two independent loops move messages: client → upstream and upstream → client. Neither ever waits
//! for an answer, so a slow call delays nothing else, and server-initiated requests (sampling,
//! elicitation, roots), progress and cancellation flow while calls are in flight. Each line is
//! classified by a light envelope parse; what is not intercepted is forwarded as its original bytes.
//! `pump` reads the two inputs into messages; this file routes them.

mod pump;

use super::era::{self, Era};
use super::intercept::{ClientAnswer, Decision, Interceptor, ResponseFate, Rewrite, ServerRequestRoute};
use super::pending::Pending;
use super::shared::Shared;
use crate::config::Config;
use crate::jsonrpc::Outcome;
use crate::jsonrpc::{self, Id, Kind, Message, code};
use crate::notion::adapter::NotionAdapter;
use crate::telemetry::trace::Operations;
use crate::transport::lines::{
    Deliver, LineCloser, LineSink, direct_line_sink, spawn_line_writer, spawn_observed_line_writer,
};
use crate::upstream::Upstream;
use crate::upstream::own::OwnWaiter;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::io::AsyncWrite;

/// How many messages may queue toward one side before the other side's reader waits.
const QUEUE: usize = 1024;

/// One session, wired: a router between a client and an upstream, with its writers and interceptor.
pub struct Session {
    /// The routing state; run [`Router::pump_client`] and [`Router::pump_upstream`] (or
    /// [`Router::pump_upstream_messages`]) on the two inputs.
    pub router: Arc<Router>,
    /// Flushes and closes the output toward the client.
    pub client_closer: LineCloser,
    /// Flushes and closes the output toward the upstream (its stdin).
    pub upstream_closer: LineCloser,
    /// The interceptor (for the demo's and the tests' eyes).
    pub intercept: Arc<Interceptor>,
    exit: tokio::sync::watch::Sender<Option<String>>,
    /// The task that tells this session's client about its tasks' transitions. It waits on the
    /// engine's events, which are shared by every session: without an end of its own it would wait
    /// for the next task event after the session ended (forever, on a server whose clients use no
    /// tasks), so it ends with the session.
    status_notifier: tokio::task::AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.status_notifier.abort();
    }
}

impl Session {
    /// Wires a session writing to `client_out` and `upstream_in`, owned by `owner` (its auth context).
    pub fn new<C, U>(
        config: &Config,
        shared: &Shared,
        owner: String,
        client_out: C,
        upstream_in: U,
    ) -> Session
    where
        C: AsyncWrite + Unpin + Send + 'static,
        U: AsyncWrite + Unpin + Send + 'static,
    {
        let (ops, observer) = Self::telemetry();
        let client = spawn_observed_line_writer(client_out, QUEUE, observer);
        Self::wire(config, shared, owner, client, ops, Self::upstream_writer(upstream_in))
    }

    /// [`Session::new`] for a client in this process: each line for the client goes to `deliver` at
    /// once (the sidecar's HTTP streams), without a writer task or a byte stream between; the
    /// upstream's side is `upstream` ([`Session::upstream_writer`] for a process's stdin, or a
    /// transport's own sink).
    pub fn with_client(
        config: &Config,
        shared: &Shared,
        owner: String,
        deliver: Deliver,
        upstream: (LineSink, LineCloser),
    ) -> Session {
        let (ops, observer) = Self::telemetry();
        let client = direct_line_sink(deliver, observer, None);
        Self::wire(config, shared, owner, client, ops, upstream)
    }

    /// A writer task for the upstream's input, as [`Session::with_client`] takes it.
    pub fn upstream_writer<U: AsyncWrite + Unpin + Send + 'static>(upstream_in: U) -> (LineSink, LineCloser) {
        spawn_line_writer(upstream_in, QUEUE)
    }

    /// With telemetry on, the answers going to the client end their requests' measurements.
    fn telemetry() -> (Option<Arc<Operations>>, Option<crate::transport::lines::Observer>) {
        let ops = Operations::active().then(|| Arc::new(Operations::default()));
        let observer = ops.clone().map(|ops| {
            Arc::new(move |line: &Message| ops.observe_client_line(line)) as crate::transport::lines::Observer
        });
        (ops, observer)
    }

    fn wire(
        config: &Config,
        shared: &Shared,
        owner: String,
        (client_sink, client_closer): (LineSink, LineCloser),
        ops: Option<Arc<Operations>>,
        (upstream_sink, upstream_closer): (LineSink, LineCloser),
    ) -> Session {
        let pending = Arc::new(Pending::new());
        let (exit, exit_rx) = tokio::sync::watch::channel::<Option<String>>(None);
        let upstream = Upstream::new(upstream_sink.clone(), pending.own.clone(), exit_rx);
        let notion = Arc::new(NotionAdapter::new(config.notion.clone(), shared.scheduler.clone()));
        let intercept = Interceptor::new(
            shared.engine.clone(),
            owner,
            client_sink.clone(),
            upstream,
            pending.clone(),
            notion,
            config.proxy.upstream_protocol,
        );
        let status_notifier = intercept.spawn_status_notifier().abort_handle();
        let router = Arc::new(Router::new(
            client_sink,
            upstream_sink,
            pending,
            intercept.clone(),
            config.proxy.max_message_bytes,
            ops,
        ));
        Session { router, client_closer, upstream_closer, intercept, exit, status_notifier }
    }

    /// The upstream is gone: our own requests fail, every waiting client request is answered with an
    /// error saying `why`, and tasks still running end `failed`.
    pub async fn upstream_gone(&self, why: &str) {
        let _ = self.exit.send(Some(why.to_string()));
        self.router.fail_pending(why).await;
    }
}

/// The routing state shared by both directions of one session.
pub struct Router {
    client: LineSink,
    upstream: LineSink,
    pending: Arc<Pending>,
    intercept: Arc<Interceptor>,
    max_message_bytes: usize,
    ops: Option<Arc<Operations>>,
}

impl Router {
    /// A router writing to the client through `client` and to the upstream through `upstream`, with
    /// `intercept` deciding what changes.
    pub fn new(
        client: LineSink,
        upstream: LineSink,
        pending: Arc<Pending>,
        intercept: Arc<Interceptor>,
        max_message_bytes: usize,
        ops: Option<Arc<Operations>>,
    ) -> Self {
        Router { client, upstream, pending, intercept, max_message_bytes, ops }
    }

    /// Routes one message from the client (the HTTP sidecar feeds its POST bodies here, read).
    pub async fn route_client(&self, line: Message) {
        let env = match line.envelope() {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(error = %e, "refused a malformed message from the client");
                self.client.send(jsonrpc::error_response(None, e.code(), &e.to_string(), None)).await;
                return;
            }
        };
        match env.kind {
            Kind::Request => {
                let id = env.id.clone().expect("a request has an id");
                let method = env.method.unwrap_or_default();
                if self.intercept.is_parked(&id) {
                    // The upstream still works on a call under this id (waiting for the client's
                    // answers): a second request with it would be mistaken for it.
                    let msg = format!(
                        "invalid request: id {id} is still in use by a call waiting for your answers (retry it with its requestState), use another id"
                    );
                    self.client
                        .send(jsonrpc::error_response(Some(&id), code::INVALID_REQUEST, &msg, None))
                        .await;
                    return;
                }
                if let Some(ops) = &self.ops {
                    ops.started(&id, method, env.params);
                }
                // The generation is chosen per request (with tasks off, the proxy is a pure passthrough).
                let era = match self.intercept.enabled() {
                    true => Era::of(env.params),
                    false => Era::Legacy,
                };
                if let Era::Unsupported(version) = &era {
                    tracing::warn!(%id, method, version, "refused a request for an unsupported protocol version");
                    self.client.send(era::unsupported_version(Some(&id), version)).await;
                    return;
                }
                let (rewrite, replaced) =
                    match self.intercept.on_client_request(&id, method, env.params, &era).await {
                        Decision::Forward(rewrite) => (rewrite, None),
                        Decision::ForwardAs(line, rewrite) => (rewrite, Some(line)),
                        Decision::Handled => return,
                    };
                if !self.pending.track_client(id.clone(), method, rewrite, era.is_modern()) {
                    tracing::warn!(%id, method, "the client reused the id of a request still in flight");
                }
                // A 2025-11-25 client's request to a 2026-07-28 upstream gets the per-request `_meta`.
                let replaced = replaced
                    .or_else(|| (!era.is_modern()).then(|| self.intercept.to_upstream_line(&env)).flatten());
                if let Some(line) = replaced {
                    drop(env);
                    self.upstream.send(line).await;
                    return;
                }
                // With traces on, the request carries our CLIENT span's traceparent upstream.
                if let Some(traced) =
                    self.ops.as_ref().and_then(|ops| ops.forwarded(&id, line.bytes(), env.params))
                {
                    drop(env);
                    self.upstream.send(traced).await;
                    return;
                }
            }
            Kind::Notification if env.method == Some("notifications/cancelled") => {
                // The upstream may never answer a cancelled request, so stop waiting for it. A call
                // already handed off as a task is not cancelled this way (the spec keeps
                // notifications/cancelled away from tasks): its response still completes the task.
                let cancelled = cancelled_request_id(env.params);
                if cancelled.as_ref().is_some_and(|id| self.intercept.end_subscription(id)) {
                    return; // a subscription the proxy served; the upstream never saw it
                }
                if let Some(id) = &cancelled
                    && let Some(req) = self.pending.finish_client(id)
                {
                    if let Rewrite::HandedOff { task_id } = &req.rewrite {
                        tracing::debug!(%id, task_id, "ignored notifications/cancelled for a handed-off call");
                        self.pending.track_client(id.clone(), &req.method, req.rewrite.clone(), req.modern);
                        return;
                    }
                    // No answer will be measured for it either.
                    if let Some(ops) = &self.ops {
                        ops.forget(id);
                    }
                }
            }
            Kind::Response => {
                if let Some(id) = &env.id {
                    match self.intercept.on_client_answer(id, env.result, env.error) {
                        ClientAnswer::NotOurs => self.intercept.on_client_response(id).await,
                        ClientAnswer::Taken => return,
                        ClientAnswer::Retry(line) => {
                            drop(env);
                            self.upstream.send(line).await;
                            return;
                        }
                    }
                }
            }
            Kind::Notification if env.method == Some("notifications/initialized") => {
                drop(env);
                if self.intercept.take_swallow_initialized() {
                    return; // the proxy initialized the upstream already
                }
                self.upstream.send(line).await;
                self.intercept.on_initialized();
                return;
            }
            Kind::Notification => {}
        }
        drop(env);
        self.upstream.send(line).await;
    }

    async fn route_upstream(&self, line: Message) {
        let env = match line.envelope() {
            Ok(env) => env,
            Err(e) => {
                let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                tracing::warn!(error = %e, line = %shown, "skipped a line from the upstream that is not JSON-RPC");
                return;
            }
        };
        match env.kind {
            Kind::Response => {
                let Some(id) = &env.id else {
                    drop(env);
                    self.client.send(line).await;
                    return;
                };
                if self.pending.own.is_own(id) {
                    let reply = match (env.result, env.error) {
                        (Some(r), _) => Outcome::Result(r.to_owned()),
                        (None, Some(e)) => Outcome::Error(e.to_owned()),
                        (None, None) => unreachable!("a response has a result or an error"),
                    };
                    match self.pending.own.take(id) {
                        Some(OwnWaiter::Caller(tx)) => {
                            let _ = tx.send(reply);
                        }
                        Some(OwnWaiter::Task(task_id, sent)) => {
                            self.intercept.task_call_answered(&task_id, reply, sent).await
                        }
                        None => {
                            tracing::debug!(%id, "a response to one of our requests came after its caller gave up")
                        }
                    }
                    return;
                }
                if let Some(ops) = &self.ops {
                    ops.upstream_answered(id, env.error.map(crate::telemetry::trace::error_code));
                }
                let req = self.pending.finish_client(id);
                if req.is_none() && self.pending.take_abandoned(id) {
                    tracing::debug!(%id, "dropped the answer to a call whose task was cancelled");
                    return;
                }
                if let Some(req) = req {
                    let modern = req.modern;
                    // A 2026-07-28 upstream asks a 2025-11-25 client's call something: the client is
                    // asked the 2025-11-25 way, and the call waits for the retry.
                    if !modern && let Some(asks) = self.intercept.legacy_round(id, env.result) {
                        self.pending.track_client(id.clone(), &req.method, req.rewrite, false);
                        drop(env);
                        for ask in asks {
                            self.client.send(ask).await;
                        }
                        return;
                    }
                    match self
                        .intercept
                        .on_upstream_response(id, req.rewrite, modern, env.result, env.error)
                        .await
                    {
                        ResponseFate::AsIs => {}
                        ResponseFate::Rewritten(line) => {
                            self.client.send(line).await;
                            return;
                        }
                        ResponseFate::Withheld => return,
                    }
                    // A 2026-07-28 answer says it is complete (not a task, not a request for input).
                    if modern && let Some(result) = env.result {
                        let line =
                            jsonrpc::result_response(id, &era::complete_result(&req.method, result.get()));
                        drop(env);
                        self.client.send(line).await;
                        return;
                    }
                }
                // Forwarded as it came: its measurement ends here, from this reading of it.
                if let Some(ops) = &self.ops {
                    ops.answered(id, env.result, env.error);
                }
                drop(env);
                self.client.send_unobserved(line).await;
                return;
            }
            Kind::Request => {
                let id = env.id.clone().expect("a request has an id");
                match self.intercept.on_server_request(&id, env.method.unwrap_or_default(), env.params).await
                {
                    ServerRequestRoute::Forward => {}
                    ServerRequestRoute::Send(tagged) => {
                        self.client.send(tagged).await;
                        return;
                    }
                    ServerRequestRoute::Held => return,
                }
            }
            Kind::Notification => {
                let method = env.method.unwrap_or_default();
                if method == "notifications/progress" {
                    self.intercept.on_upstream_progress(env.params);
                    if let Some(tagged) = self.intercept.tag_task_progress(env.params) {
                        drop(env);
                        self.client.send(tagged).await;
                        return;
                    }
                } else if let Some(lines) = self.intercept.on_upstream_notification(method, env.params) {
                    drop(env);
                    for line in lines {
                        self.client.send(line).await;
                    }
                    return;
                }
            }
        }
        drop(env);
        self.client.send(line).await;
    }

    /// Answers every client request still waiting with an error saying why the upstream is gone.
    pub async fn fail_pending(&self, why: &str) {
        let mut orphaned: Vec<String> = self.pending.own.fail_all().into_iter().map(String::from).collect();
        for (id, req) in self.pending.drain_client() {
            let id = match req.rewrite {
                Rewrite::HandedOff { task_id } => {
                    orphaned.push(task_id);
                    continue;
                }
                // A parked call's client waits (if at all) on its retry.
                Rewrite::Parked { state } => match self.intercept.parked_failed(&state) {
                    Some(retry) => retry,
                    None => continue,
                },
                _ => id,
            };
            let msg = format!("the upstream server {why} before answering this `{}` request", req.method);
            let data = serde_json::json!({ "upstream": why });
            self.client
                .send(jsonrpc::error_response(Some(&id), code::UPSTREAM_GONE, &msg, Some(&data)))
                .await;
        }
        // Tasks whose call was in flight end `failed`; their waiters and status notices go out first.
        self.intercept.settle(orphaned, why).await;
    }

    /// How many client requests wait for the upstream.
    pub fn in_flight(&self) -> usize {
        self.pending.client_len()
    }
}

/// The request a `notifications/cancelled` names.
pub fn cancelled_request_id(params: Option<&RawValue>) -> Option<Id> {
    #[derive(serde::Deserialize)]
    struct Cancelled<'a> {
        #[serde(rename = "requestId", borrow)]
        request_id: &'a RawValue,
    }
    let p: Cancelled<'_> = serde_json::from_str(params?.get()).ok()?;
    Some(Id::from_raw(p.request_id))
}
