//! What the proxy changes, and only that: Tasks for an upstream that has none.
//!
//! * `initialize` result: `capabilities.tasks` (list, cancel, requests.tools.call) is added.
//! * `tools/list` result: taskified tools get `execution.taskSupport: "optional"`; with a sync deadline,
//!   two tools to fetch handed-off work are added.
//! * After `notifications/initialized`, the proxy lists the upstream's tools itself (its own requests,
//!   never seen by the client) to learn which tools already have tasks and whether the upstream speaks
//!   Notion's async protocol, so a task-run call is right even if the client never lists tools.
//! * `tools/call` with `params.task`: a task is created and answered at once (`CreateTaskResult`); the
//!   call runs upstream without `params.task`. Tools the upstream runs as tasks itself pass through.
//! * `tasks/*`: answered from the [`TaskEngine`]; ids the engine does not know go to an upstream that
//!   has tasks of its own.
//! * Plain `tools/call`s (clients that do not speak tasks) get progress keep-alives and, past the sync
//!   deadline, a hand-off result; their work goes on as a task.
//! * An upstream `elicitation/create` or `sampling/createMessage` made while a task's call runs moves
//!   the task to `input_required` and reaches the client tagged with the task; the answer resumes it.
//! * Requests of 2026-07-28 clients (per-request `_meta`, no session) are served by [`modern`]: the
//!   proxy answers `server/discover`, initializes the upstream itself, and speaks the Tasks extension
//!   (server-directed tasks, `DetailedTask`, `tasks/update`) from the same engine.

use super::era::Era;
use super::pending::Pending;
pub use super::pending::Rewrite;
use crate::config::UpstreamProtocol;
use crate::jsonrpc::{self, Id, code};
use crate::notion::adapter::NotionAdapter;
use crate::tasks::engine::TaskEngine;
use crate::tasks::model::{Generation, Origin, Outcome, TaskStatus, with_related_task};
use crate::transport::lines::LineSink;
use crate::upstream::{Upstream, UpstreamError};
use dashmap::DashMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod modern;
mod mrtr;
mod questions;
mod subscriptions;
mod sync_clients;
mod tasks_api;
mod upstream_offer;

pub use mrtr::ClientAnswer;
pub use subscriptions::SUBSCRIPTION_ID;
pub use sync_clients::{RESULT_TOOL, STATUS_TOOL};

/// What the router should do with a client request.
pub enum Decision {
    /// Forward the original bytes, and treat the response as said.
    Forward(Rewrite),
    /// Forward these bytes instead of the original (a field the upstream must not see was removed).
    ForwardAs(Vec<u8>, Rewrite),
    /// The proxy answered (or will answer) it; nothing goes upstream.
    Handled,
}

/// What becomes of the upstream's response to a client request.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseFate {
    /// Forward it as the upstream sent it (a 2026-07-28 result is marked complete on the way).
    AsIs,
    /// Send this line instead.
    Rewritten(Vec<u8>),
    /// Send nothing now: the proxy keeps it (a handed-off call's result completes its task; a parked
    /// call's answer waits for the client's retry).
    Withheld,
}

/// What to do with a request the upstream sent to the client.
pub enum ServerRequestRoute {
    /// Forward the original bytes.
    Forward,
    /// Send these bytes instead (tagged with the task it belongs to).
    Send(Vec<u8>),
    /// Hold it: a 2026-07-28 task's input request, which its client reads from `tasks/get` and
    /// answers with `tasks/update`.
    Held,
}

/// What the upstream told us about itself.
#[derive(Default)]
struct UpstreamFacts {
    /// `capabilities.tasks.requests.tools.call` present.
    tools_call: bool,
    /// `capabilities.tasks.list` present.
    list: bool,
    /// `capabilities.tasks.cancel` present.
    cancel: bool,
    /// Tools the upstream runs as tasks itself (`taskSupport` optional or required).
    native_tools: HashSet<String>,
    /// `capabilities.tools` present (the upstream has tools to list).
    has_tools: bool,
    /// The upstream's `initialize` result (whoever initialized it), for `server/discover`.
    initialized: Option<Map<String, Value>>,
    /// A 2026-07-28 upstream: its `server/discover` result, and until when it may be reused (its
    /// `ttlMs`).
    discovered: Option<Map<String, Value>>,
    discovered_until: Option<Instant>,
    /// The 2026-07-28 upstream runs tasks itself (declares the Tasks extension).
    upstream_tasks: bool,
}

/// The tasks a session started and the calls that run them.
#[derive(Default)]
struct SessionTasks {
    /// Ids of tasks the upstream created itself (their `tasks/*` go upstream).
    native_tasks: DashMap<String, ()>,
    /// Upstream requests to the client made on behalf of a task, by the upstream's request id.
    input_requests: DashMap<Id, String>,
    /// Local tasks whose upstream call is in flight.
    running: DashMap<String, Option<String>>,
    /// The progress tokens (JSON text) of those calls, to their tasks: their progress is the task's.
    task_tokens: DashMap<String, String>,
    /// Every task this session started (local, Notion, handed off), to know whether its upstream
    /// is still needed when the client goes.
    started: DashMap<String, ()>,
    /// Last progress value seen per progress token (JSON text), so keep-alives keep increasing.
    progress_seen: DashMap<String, f64>,
    /// 2026-07-28 tasks of this session, with the input requests they wait on.
    modern_tasks: DashMap<String, modern::InputRequests>,
    /// Woken whenever a task's call leaves `running`.
    calls_ended: tokio::sync::Notify,
    /// Answers that wait for a task's end (`tasks/result`, the hand-off result tool), so that the
    /// session sends them before it closes.
    answering: tokio_util::task::TaskTracker,
}

/// What the client and the upstream are, and what they said.
#[derive(Default)]
struct Peers {
    /// Whether the client speaks tasks (declared them, or used them): then it gets status notifications.
    client_speaks_tasks: AtomicBool,
    /// Becomes true once the upstream's tools are known (listed by the proxy itself, or it gave up).
    tools_known: tokio::sync::watch::Sender<bool>,
    /// Set once the upstream answered `initialize` (recovered tasks resume their polls then).
    upstream_ready: tokio::sync::watch::Sender<bool>,
    /// Whether the proxy is listing the upstream's tools (it started after the handshake).
    discovering: AtomicBool,
    /// Set once the proxy initialized the upstream itself (for a 2026-07-28 client, which has no
    /// handshake).
    own_init: tokio::sync::OnceCell<()>,
    /// The client's own `notifications/initialized` is not forwarded (the proxy sent one already).
    swallow_initialized: AtomicBool,
    /// The client opened a 2025-11-25 session (`initialize`): it can answer requests from the
    /// upstream. A 2026-07-28 client never can.
    legacy_client: AtomicBool,
    /// The client sent 2026-07-28 requests.
    modern_client: AtomicBool,
    /// The upstream speaks 2026-07-28 (found by discovery).
    modern_upstream: AtomicBool,
}

/// Calls waiting for answers to the upstream's questions: a 2026-07-28 client's parked calls, a
/// 2025-11-25 client's rounds on a 2026-07-28 upstream.
#[derive(Default)]
struct RoundTrips {
    /// 2026-07-28 calls waiting for their client's answers, by `requestState`.
    parked: DashMap<String, mrtr::Parked>,
    /// The `requestState` of each parked call, by the call's id.
    parked_calls: DashMap<Id, String>,
    /// A 2025-11-25 client's calls on a 2026-07-28 upstream (method, params), to send again with
    /// answers when the upstream asks something.
    retries: DashMap<Id, (String, String)>,
    /// The proxy's questions to a 2025-11-25 client: the call and the upstream's key, by request id.
    asks: DashMap<Id, (Id, String)>,
    /// Rounds of questions in progress, by call.
    legacy_rounds: DashMap<Id, mrtr::LegacyRound>,
}

/// The task-aware interception of one session.
pub struct Interceptor {
    /// What the upstream speaks (as configured; `Auto` is settled by the probe, in `facts`).
    upstream_protocol: UpstreamProtocol,
    engine: Arc<TaskEngine>,
    owner: String,
    client: LineSink,
    upstream: Upstream,
    pending: Arc<Pending>,
    facts: Mutex<UpstreamFacts>,
    /// Notion's async protocol on this upstream.
    notion: Arc<NotionAdapter>,
    /// Open `subscriptions/listen` requests, by id.
    subscriptions: DashMap<Id, subscriptions::Subscription>,
    /// The session's tasks and the calls that run them.
    tasks: SessionTasks,
    /// What each side is and has said.
    peers: Peers,
    /// Calls waiting for answers to the upstream's questions (multi round-trip requests).
    trips: RoundTrips,
}

impl Interceptor {
    /// The interceptor of a session owned by `owner` (its auth context).
    pub fn new(
        engine: Arc<TaskEngine>,
        owner: String,
        client: LineSink,
        upstream: Upstream,
        pending: Arc<Pending>,
        notion: Arc<NotionAdapter>,
        upstream_protocol: UpstreamProtocol,
    ) -> Arc<Self> {
        Arc::new(Interceptor {
            upstream_protocol,
            engine,
            owner,
            client,
            upstream,
            pending,
            facts: Mutex::new(UpstreamFacts::default()),
            tasks: SessionTasks::default(),
            peers: Peers::default(),
            trips: RoundTrips::default(),
            notion,
            subscriptions: DashMap::new(),
        })
    }

    /// How many of the tasks this session started still run (their work needs this upstream).
    pub async fn tasks_in_flight(&self) -> usize {
        let started: Vec<String> = self.tasks.started.iter().map(|e| e.key().clone()).collect();
        for id in started {
            if self.engine.get(&self.owner, &id).await.is_none_or(|r| r.status.is_terminal()) {
                self.tasks.started.remove(&id);
            }
        }
        self.tasks.started.len()
    }

    /// Returns once none of the tasks this session started still runs: re-checked when one of them
    /// ends (and every few seconds, in case an event was missed).
    pub async fn until_tasks_done(&self) {
        let mut events = self.engine.subscribe();
        while self.tasks_in_flight().await > 0 {
            // Only an end of one of this session's tasks is worth a look at the store (every
            // session's events come here).
            loop {
                match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                    Ok(Ok(event))
                        if !event.task.status.is_terminal()
                            || !self.tasks.started.contains_key(&event.task.id) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Resumes tasks recovered from the store (their process died): each Notion task polls its
    /// persisted Notion task id on this session's upstream, once the upstream is initialized.
    pub fn resume(self: &Arc<Self>, orphans: Vec<crate::tasks::engine::Orphan>) {
        for orphan in orphans {
            let (Origin::Notion, Some(notion_id)) = (orphan.task.origin, orphan.task.upstream_task.clone())
            else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let task_id = orphan.task.id;
                let stop = this.engine.stop_signal(&task_id).await;
                let mut ready = this.peers.upstream_ready.subscribe();
                if ready.wait_for(|r| *r).await.is_err() {
                    return;
                }
                this.tasks.started.insert(task_id.clone(), ());
                this.notion.resume_task(&this.engine, &this.upstream, &task_id, notion_id, stop).await;
            });
        }
    }

    /// Whether the proxy offers tasks (off: a pure passthrough, for either generation).
    pub fn enabled(&self) -> bool {
        self.engine.config().enabled
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, UpstreamFacts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides about a client request. May answer it itself.
    pub async fn on_client_request(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
        era: &Era,
    ) -> Decision {
        if !self.enabled() {
            return Decision::Forward(Rewrite::None);
        }
        if let Era::Modern(modern) = era {
            self.peers.modern_client.store(true, Ordering::Relaxed);
            return self.on_modern_request(id, method, params, modern).await;
        }
        match method {
            "initialize" => {
                self.peers.legacy_client.store(true, Ordering::Relaxed);
                if params.and_then(|p| lookup(p.get(), &["capabilities", "tasks"])).is_some() {
                    self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
                }
                if self.upstream_protocol != UpstreamProtocol::Legacy {
                    // The proxy opens the conversation itself, to learn what the upstream speaks.
                    if let Err(why) = self.ensure_initialized().await {
                        let msg = format!("The upstream server could not be initialized: {why}");
                        return self.reply_error(id, code::INTERNAL_ERROR, &msg).await;
                    }
                }
                if self.peers.own_init.initialized() {
                    // The proxy already opened the conversation with the upstream (for a 2026-07-28
                    // request, or to find out what it speaks): answer from what it said, rather than
                    // initializing it twice.
                    return self.reinitialize(id, params).await;
                }
                Decision::Forward(Rewrite::Initialize)
            }
            "tools/list" => {
                let first_page = params.and_then(|p| lookup(p.get(), &["cursor"])).is_none();
                Decision::Forward(Rewrite::ToolsList { first_page })
            }
            "tools/call" => self.on_tools_call(id, params).await,
            // A probe without a per-request version: answered all the same (a dual-era server has it).
            "server/discover" => {
                self.on_modern_request(id, method, params, &super::era::Modern { tasks: false }).await
            }
            "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/list" => {
                self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
                self.on_tasks_method(id, method, params).await
            }
            _ => Decision::Forward(Rewrite::None),
        }
    }

    async fn reply_error(&self, id: &Id, code: i64, message: &str) -> Decision {
        self.client.send(jsonrpc::error_response(Some(id), code, message, None)).await;
        Decision::Handled
    }

    async fn reply_result(&self, id: &Id, result: &Value) -> Decision {
        self.client.send(jsonrpc::result_response(id, &result.to_string())).await;
        Decision::Handled
    }

    async fn on_tools_call(self: &Arc<Self>, id: &Id, params: Option<&RawValue>) -> Decision {
        if let Some(decision) = self.plain_call_fast(id, params) {
            return decision;
        }
        let Some(mut call) = params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok())
        else {
            return Decision::Forward(Rewrite::PlainCall); // let the upstream judge malformed calls
        };
        let Some(tool) = call.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return Decision::Forward(Rewrite::PlainCall);
        };
        let own_async = call.get("arguments").and_then(|a| a.get("allow_async")).is_some();
        if (own_async || tool == self.notion.poll_tool()) && !call.contains_key("task") {
            // The client drives Notion's protocol itself: hands off, but it spends the same budget.
            // (With `params.task` it asked for one of our tasks: that goes on below, and `params.task`
            // never reaches an upstream that has no tasks.)
            self.notion.note_client_call();
            return Decision::Forward(Rewrite::None);
        }
        let sync_deadline = self.engine.config().sync_deadline_ms;
        if sync_deadline > 0
            && (tool == STATUS_TOOL || tool == RESULT_TOOL)
            && !self.facts().native_tools.contains(&tool)
        {
            let this = self.clone();
            let id = id.clone();
            self.tasks
                .answering
                .spawn(async move { this.run_handoff_tool(&id, &tool, call.get("arguments"), false).await });
            return Decision::Handled;
        }
        let Some(task) = call.remove("task") else {
            if self.engine.config().requires_task(&tool) && !self.facts().native_tools.contains(&tool) {
                let msg = format!(
                    "Tool '{tool}' requires task-augmented execution (taskSupport is required); call it with params.task"
                );
                return self.reply_error(id, code::METHOD_NOT_FOUND, &msg).await;
            }
            self.notion.note_client_call();
            if self.engine.config().taskifies(&tool) {
                let token = call.get("_meta").and_then(|m| m.get("progressToken")).map(Value::to_string);
                self.watch_plain_call(id.clone(), tool, token, sync_clients::HandOff::Text { modern: false });
            }
            return Decision::Forward(Rewrite::PlainCall);
        };
        self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
        self.tools_known().await;
        if self.facts().native_tools.contains(&tool) {
            return Decision::Forward(Rewrite::NativeTaskCall);
        }
        // A client's own `allow_async` beside `params.task`: the adapter drives Notion's protocol when
        // it runs, else the call runs as a plain task without it (so its result is the page, not an
        // async task the client would have to poll itself).
        let notion = self.notion.handles(&tool) || (own_async && self.notion.is_active());
        if own_async && !notion {
            without_allow_async(&mut call);
        }
        if !notion && !self.engine.config().taskifies(&tool) {
            let msg = format!(
                "Tool '{tool}' does not support task-augmented execution (taskSupport is forbidden); call it without params.task"
            );
            return self.reply_error(id, code::METHOD_NOT_FOUND, &msg).await;
        }
        let ttl = match &task {
            Value::Object(t) => match t.get("ttl") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(ms) => Some(ms),
                    None => {
                        let msg =
                            format!("params.task.ttl must be a non-negative integer (milliseconds), got {v}");
                        return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
                    }
                },
            },
            other => {
                let msg = format!("params.task must be an object such as {{\"ttl\": 60000}}, got {other}");
                return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
            }
        };
        let origin = if notion { Origin::Notion } else { Origin::Local };
        let record = match self.engine.create(&self.owner, &tool, origin, Generation::Legacy, ttl).await {
            Ok(created) => created,
            Err(e) => return self.reply_error(id, code::INTERNAL_ERROR, &e.to_string()).await,
        };
        self.tasks.started.insert(record.id.clone(), ());
        let mut result = Map::new();
        result.insert("task".into(), Value::Object(record.to_wire()));
        result.insert(
            "_meta".into(),
            json!({ "io.modelcontextprotocol/model-immediate-response":
                format!("Started `{tool}` as task {}; its result will be available when it finishes.", record.id) }),
        );
        // The answer goes out before the work starts, so no status notification can overtake it.
        self.reply_result(id, &Value::Object(result)).await;
        if notion {
            let stop = self.engine.stop_signal(&record.id).await;
            let this = self.clone();
            tokio::spawn(async move {
                this.notion.run_task(&this.engine, &this.upstream, &record.id, call, stop).await;
            });
        } else {
            self.start_local_task(&record.id, &Value::Object(call).to_string()).await;
        }
        Decision::Handled
    }

    /// The common `tools/call`, decided from the top level of its params read in place (the arguments
    /// are skipped, never built): a plain call of an ordinary tool is forwarded as it came. `None`: the
    /// call needs [`Self::on_tools_call`]'s full reading (a task, a hand-off tool, Notion, a required
    /// task tool, or params this reading does not take, such as duplicate keys); the decision is the
    /// same either way.
    fn plain_call_fast(self: &Arc<Self>, id: &Id, params: Option<&RawValue>) -> Option<Decision> {
        let params = params?;
        if !params.get().starts_with('{') {
            return None;
        }
        let head: CallHead<'_> = serde_json::from_str(params.get()).ok()?;
        let tool = head.name?;
        if head.task.is_some() || has_allow_async(head.arguments) || tool == self.notion.poll_tool() {
            return None;
        }
        let config = self.engine.config();
        if (config.sync_deadline_ms > 0 && (tool == STATUS_TOOL || tool == RESULT_TOOL))
            || config.requires_task(&tool)
        {
            return None;
        }
        self.notion.note_client_call();
        if config.taskifies(&tool) {
            let token = match head.meta {
                Some(meta) => {
                    serde_json::from_str::<Value>(meta.get()).ok()?.get("progressToken").map(Value::to_string)
                }
                None => None,
            };
            self.watch_plain_call(
                id.clone(),
                tool.into_owned(),
                token,
                sync_clients::HandOff::Text { modern: false },
            );
        }
        Some(Decision::Forward(Rewrite::PlainCall))
    }

    /// Sends a task's call upstream. No future waits for it: the router hands the answer to
    /// [`Self::task_call_answered`], and cancelling the task cancels the call upstream.
    async fn start_local_task(self: &Arc<Self>, task_id: &str, params: &str) {
        let token = lookup(params, &["_meta", "progressToken"]).map(|t| t.to_string());
        if let Some(token) = &token {
            self.tasks.task_tokens.insert(token.clone(), task_id.to_owned());
        }
        self.tasks.running.insert(task_id.to_owned(), token);
        let params = &self.for_upstream(params);
        match self.upstream.send_for_task("tools/call", params, task_id).await {
            Ok(request_id) => {
                let this = Arc::downgrade(self);
                let task = task_id.to_owned();
                self.engine
                    .on_stop(
                        task_id,
                        Box::new(move || {
                            let Some(this) = this.upgrade() else { return };
                            this.call_ended(&task);
                            // The call will get no answer: its duration ends here, as cancelled.
                            let sent = match this.pending.own.take(&request_id) {
                                Some(crate::upstream::own::OwnWaiter::Task(_, sent))
                                    if crate::telemetry::metrics_on() =>
                                {
                                    Some(sent)
                                }
                                _ => None,
                            };
                            this.upstream.forget(&request_id);
                            tokio::spawn(async move {
                                if let Some(sent) = sent {
                                    let tool = this.engine.get(&this.owner, &task).await.map(|r| r.tool);
                                    crate::telemetry::trace::record_client_operation(
                                        sent,
                                        "tools/call",
                                        tool.as_deref(),
                                        Some("cancelled"),
                                    );
                                }
                                this.cancel_upstream(&request_id, "the task was cancelled").await
                            });
                        }),
                    )
                    .await;
            }
            Err(e) => self.task_call_failed(task_id, e).await,
        }
    }

    /// The upstream answered a task's call.
    pub async fn task_call_answered(&self, task_id: &str, reply: Outcome, sent: Instant) {
        if crate::telemetry::metrics_on() {
            let tool = self.engine.get(&self.owner, task_id).await.map(|r| r.tool);
            let error = match &reply {
                Outcome::Error(e) => Some(crate::telemetry::trace::error_code(e)),
                Outcome::Result(_) => None,
            };
            crate::telemetry::trace::record_client_operation(
                sent,
                "tools/call",
                tool.as_deref(),
                error.as_deref(),
            );
        }
        self.call_ended(task_id);
        self.finish_with_reply(task_id, Ok(reply)).await;
    }

    async fn task_call_failed(&self, task_id: &str, error: UpstreamError) {
        self.call_ended(task_id);
        self.finish_with_reply(task_id, Err(error)).await;
    }

    /// A task's call is no longer in flight (answered, failed, or cancelled).
    fn call_ended(&self, task_id: &str) {
        if let Some((_, token)) = self.tasks.running.remove(task_id) {
            if let Some(token) = token {
                self.tasks.task_tokens.remove(&token);
            }
            self.tasks.calls_ended.notify_waiters();
        }
    }

    /// Progress the upstream reports for a task's call: tagged with the task (2025-11-25 says every
    /// message related to a task carries `related-task`). `None`: not a task's; forward it as it is.
    pub fn tag_task_progress(&self, params: Option<&RawValue>) -> Option<Vec<u8>> {
        if self.tasks.task_tokens.is_empty() {
            return None;
        }
        let params = params?;
        let token = lookup(params.get(), &["progressToken"])?.to_string();
        let task_id = self.tasks.task_tokens.get(&token)?.clone();
        let tagged = with_related_task(params.get(), &task_id).ok()?;
        Some(jsonrpc::notification("notifications/progress", Some(&tagged)))
    }

    async fn cancel_upstream(&self, request_id: &Id, reason: &str) {
        let params = format!(
            "{{\"requestId\":{},\"reason\":{}}}",
            request_id.as_json(),
            serde_json::to_string(reason).expect("a string serialises")
        );
        self.upstream.notify("notifications/cancelled", Some(&params)).await;
    }

    /// Ends a task with the upstream's answer: results as `completed` (or `failed` when `isError`),
    /// JSON-RPC errors and a vanished upstream as `failed`.
    async fn finish_with_reply(&self, task_id: &str, reply: Result<Outcome, UpstreamError>) {
        let (status, message, outcome) = match reply {
            Ok(Outcome::Result(raw)) if lookup(raw.get(), &["isError"]) == Some(Value::Bool(true)) => (
                TaskStatus::Failed,
                Some("The tool returned an error result (isError: true).".into()),
                Outcome::Result(raw),
            ),
            Ok(Outcome::Result(raw)) => (TaskStatus::Completed, None, Outcome::Result(raw)),
            Ok(Outcome::Error(raw)) => {
                let message = lookup(raw.get(), &["message"]).and_then(|m| m.as_str().map(str::to_owned));
                (TaskStatus::Failed, message, Outcome::Error(raw))
            }
            Err(e) => {
                let message = format!("The task could not finish: {e}.");
                let error = json!({ "code": code::UPSTREAM_GONE, "message": message });
                let raw = RawValue::from_string(error.to_string()).expect("valid JSON");
                (TaskStatus::Failed, Some(message), Outcome::Error(raw))
            }
        };
        self.engine.finish(task_id, status, message, Some(outcome)).await;
    }

    /// What becomes of the upstream's response to a client request.
    pub async fn on_upstream_response(
        &self,
        id: &Id,
        rewrite: Rewrite,
        modern: bool,
        result: Option<&RawValue>,
        error: Option<&RawValue>,
    ) -> ResponseFate {
        // An error (or a result we cannot read) passes through as the upstream sent it.
        let rewritten = |line: Option<Vec<u8>>| line.map_or(ResponseFate::AsIs, ResponseFate::Rewritten);
        match rewrite {
            Rewrite::None | Rewrite::PlainCall | Rewrite::TaskWindow { .. } => ResponseFate::AsIs,
            Rewrite::Initialize => rewritten(result.and_then(|r| self.rewrite_initialize(id, r))),
            Rewrite::ToolsList { first_page } => {
                rewritten(result.and_then(|r| self.rewrite_tools_list(id, r, first_page, modern)))
            }
            Rewrite::NativeTaskCall => {
                if let Some(Value::String(t)) = result.and_then(|r| lookup(r.get(), &["task", "taskId"])) {
                    self.tasks.native_tasks.insert(t, ());
                }
                ResponseFate::AsIs
            }
            Rewrite::NativeTaskForModern => rewritten(result.and_then(|r| self.native_created(id, r))),
            // The answer goes to the client's retry, now or when it comes.
            Rewrite::Parked { state } => match self.parked_answered(&state, result, error) {
                Some(line) => ResponseFate::Rewritten(line),
                None => ResponseFate::Withheld,
            },
            Rewrite::HandedOff { task_id } => {
                let reply = match (result, error) {
                    (Some(r), _) => Outcome::Result(r.to_owned()),
                    (None, Some(e)) => Outcome::Error(e.to_owned()),
                    (None, None) => return ResponseFate::Withheld,
                };
                self.finish_with_reply(&task_id, Ok(reply)).await;
                ResponseFate::Withheld
            }
        }
    }

    /// The client answered an upstream request: a task waiting on it resumes.
    pub async fn on_client_response(&self, id: &Id) {
        if let Some((_, task_id)) = self.tasks.input_requests.remove(id)
            && !self.tasks.input_requests.iter().any(|e| *e.value() == task_id)
        {
            self.engine.set_status(&task_id, TaskStatus::Working, None).await;
        }
    }

    /// Sends `notifications/tasks/status` to this session's client on every transition of its tasks.
    pub fn spawn_status_notifier(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut events = self.engine.subscribe();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(
                            skipped = n,
                            "status notifications lagged; clients poll tasks/get anyway"
                        );
                        continue;
                    }
                    Err(_) => return,
                };
                let Some(this) = this.upgrade() else { return };
                if event.task.status.is_terminal() {
                    // A 2026-07-28 task that ended waits on nothing any more.
                    this.tasks.modern_tasks.remove(&event.task.id);
                }
                if event.owner == this.owner {
                    this.notify_task_subscribers(&event.task).await;
                }
                if event.owner != this.owner || !this.peers.client_speaks_tasks.load(Ordering::Relaxed) {
                    continue;
                }
                let params = Value::Object(event.task.to_wire()).to_string();
                this.client.send(jsonrpc::notification("notifications/tasks/status", Some(&params))).await;
            }
        })
    }

    /// The upstream is gone: handed-off calls end `failed`; then wait (briefly) until every running task
    /// has recorded its end, so waiters get their answers before the session closes.
    pub async fn settle(&self, orphaned: Vec<String>, why: &str) {
        for task_id in orphaned {
            self.task_call_failed(&task_id, UpstreamError::Gone(why.to_string())).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let ended = self.tasks.calls_ended.notified();
            if self.tasks.running.is_empty() || tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        // The woken tasks/result waiters send their answers before the session closes (a waiter on a
        // task of another session's upstream is not waited for long).
        self.tasks.answering.close();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.tasks.answering.wait()).await;
    }
}

/// The top level of a `tools/call`'s params, borrowed from the message: what routes the call. A key
/// present with `null` counts as present, as it does in a parsed object.
#[derive(serde::Deserialize)]
struct CallHead<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    task: Option<&'a RawValue>,
    #[serde(rename = "_meta", borrow, default, deserialize_with = "present")]
    meta: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// Whether a call's raw `arguments` have the top-level key `allow_async` (Notion's own async
/// protocol), as `Value::get` has it: `false` for arguments that are not an object. The key can only
/// be there if its text is, or an escape that could spell it, so most calls are answered without
/// parsing.
fn has_allow_async(arguments: Option<&RawValue>) -> bool {
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new("allow_async"));
    let Some(raw) = arguments.map(RawValue::get) else { return false };
    if !raw.starts_with('{') || !jsonrpc::may_contain_key(raw.as_bytes(), &KEY) {
        return false;
    }
    serde_json::from_str::<std::collections::HashMap<std::borrow::Cow<'_, str>, serde::de::IgnoredAny>>(raw)
        .is_ok_and(|keys| keys.contains_key("allow_async"))
}

/// Removes a client's `allow_async` from a call's arguments.
fn without_allow_async(call: &mut Map<String, Value>) {
    if let Some(Value::Object(args)) = call.get_mut("arguments") {
        args.remove("allow_async");
    }
}

/// Reads a nested value out of raw JSON text (`None` if absent or the text is not an object).
fn lookup(raw: &str, path: &[&str]) -> Option<Value> {
    let v: Map<String, Value> = serde_json::from_str(raw).ok()?;
    lookup_value(&v, path).cloned()
}

fn lookup_value<'a>(map: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = map.get(*first)?;
    for key in rest {
        v = v.get(*key)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_async_is_read_as_a_parsed_object_has_it() {
        for args in [
            r#"{}"#,
            r#""allow_async""#,
            r#"[{"allow_async":1}]"#,
            r#"{"allow_async":null}"#,
            r#"{"\u0061llow_async":true}"#,
            r#"{"text":"allow_async"}"#,
            r#"{"text":"\u0041","nested":{"allow_async":1}}"#,
            r#"{"a":1,"allow_async":false,"allow_async":true}"#,
        ] {
            let raw = RawValue::from_string(args.to_owned()).unwrap();
            let parsed: Value = serde_json::from_str(args).unwrap();
            assert_eq!(has_allow_async(Some(&raw)), parsed.get("allow_async").is_some(), "{args}");
        }
        assert!(!has_allow_async(None));
    }

    #[test]
    fn the_call_head_counts_a_null_as_present_and_refuses_duplicates() {
        let head: CallHead<'_> =
            serde_json::from_str(r#"{"name":"echo","task":null,"arguments":{"x":1}}"#).unwrap();
        assert_eq!(head.name.as_deref(), Some("echo"));
        assert!(head.task.is_some(), "task: null is a task field, refused later as not an object");
        assert!(head.meta.is_none());
        // Duplicate keys: left to the full reading (the last one wins there).
        assert!(serde_json::from_str::<CallHead<'_>>(r#"{"name":"a","name":"b"}"#).is_err());
    }
}
