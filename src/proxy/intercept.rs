//! What the proxy changes, and only that: Tasks for an upstream that has none.
//!
//! * `initialize` result: `capabilities.tasks` (list, cancel, requests.tools.call) is added.
//! * `tools/list` result: taskified tools get `execution.taskSupport: "optional"`; with a sync deadline,
//!   two tools to fetch handed-off work are added.
//! * `tools/call` with `params.task`: a task is created and answered at once (`CreateTaskResult`); the
//!   call runs upstream without `params.task`. Tools the upstream runs as tasks itself pass through.
//! * `tasks/*`: answered from the [`TaskEngine`]; ids the engine does not know go to an upstream that
//!   has tasks of its own.
//! * Plain `tools/call`s (clients that do not speak tasks) get progress keep-alives and, past the sync
//!   deadline, a hand-off result; their work goes on as a task.
//! * An upstream `elicitation/create` or `sampling/createMessage` made while a task's call runs moves
//!   the task to `input_required` and reaches the client tagged with the task; the answer resumes it.

use super::pending::{Pending, Reply};
use super::upstream::{Upstream, UpstreamError};
use crate::jsonrpc::{self, Id, code};
use crate::notion::adapter::NotionAdapter;
use crate::tasks::engine::{CancelError, TaskEngine};
use crate::tasks::model::{Origin, Outcome, RELATED_TASK, TaskRecord, TaskStatus, with_related_task};
use crate::transport::lines::LineSink;
use dashmap::DashMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tool a model calls to check on work handed off at the sync deadline.
pub const STATUS_TOOL: &str = "asyncify_task_status";
/// The tool a model calls to fetch the result of work handed off at the sync deadline.
pub const RESULT_TOOL: &str = "asyncify_task_result";
const CANCELLED_CODE: i64 = -32800;

/// What to do with the upstream's response to a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Forward it unchanged.
    None,
    /// Add `capabilities.tasks` to the `initialize` result.
    Initialize,
    /// Mark taskified tools in a `tools/list` result.
    ToolsList {
        /// Whether this is the first page (our own tools are added there).
        first_page: bool,
    },
    /// A task-augmented call the upstream runs as its own task: observe the task id.
    NativeTaskCall,
    /// A plain `tools/call`, watched for keep-alives and the sync deadline.
    PlainCall,
    /// A plain call answered at the sync deadline: its response completes this task instead.
    HandedOff {
        /// The task now holding the work.
        task_id: String,
    },
}

/// What the router should do with a client request.
pub enum Decision {
    /// Forward the original bytes, and treat the response as said.
    Forward(Rewrite),
    /// The proxy answered (or will answer) it; nothing goes upstream.
    Handled,
}

/// What the upstream told us about itself.
#[derive(Default)]
struct UpstreamFacts {
    /// `capabilities.tasks.requests.tools.call` present.
    tools_call: bool,
    /// `capabilities.tasks.list` present.
    list: bool,
    /// Tools the upstream runs as tasks itself (`taskSupport` optional or required).
    native_tools: HashSet<String>,
}

/// The task-aware interception of one session.
pub struct Interceptor {
    engine: Arc<TaskEngine>,
    owner: String,
    client: LineSink,
    upstream: Upstream,
    pending: Arc<Pending>,
    facts: Mutex<UpstreamFacts>,
    /// Ids of tasks the upstream created itself (their `tasks/*` go upstream).
    native_tasks: DashMap<String, ()>,
    /// Upstream requests to the client made on behalf of a task, by the upstream's request id.
    input_requests: DashMap<Id, String>,
    /// Local tasks whose upstream call is in flight.
    running: DashMap<String, ()>,
    /// Last progress value seen per progress token (JSON text), so keep-alives keep increasing.
    progress_seen: DashMap<String, f64>,
    /// Whether the client speaks tasks (declared them, or used them): then it gets status notifications.
    client_speaks_tasks: AtomicBool,
    /// Notion's async protocol on this upstream.
    notion: Arc<NotionAdapter>,
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
    ) -> Arc<Self> {
        Arc::new(Interceptor {
            engine,
            owner,
            client,
            upstream,
            pending,
            facts: Mutex::new(UpstreamFacts::default()),
            native_tasks: DashMap::new(),
            input_requests: DashMap::new(),
            running: DashMap::new(),
            progress_seen: DashMap::new(),
            client_speaks_tasks: AtomicBool::new(false),
            notion,
        })
    }

    fn enabled(&self) -> bool {
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
    ) -> Decision {
        if !self.enabled() {
            return Decision::Forward(Rewrite::None);
        }
        match method {
            "initialize" => {
                if params.and_then(|p| lookup(p.get(), &["capabilities", "tasks"])).is_some() {
                    self.client_speaks_tasks.store(true, Ordering::Relaxed);
                }
                Decision::Forward(Rewrite::Initialize)
            }
            "tools/list" => {
                let first_page = params.and_then(|p| lookup(p.get(), &["cursor"])).is_none();
                Decision::Forward(Rewrite::ToolsList { first_page })
            }
            "tools/call" => self.on_tools_call(id, params).await,
            "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/list" => {
                self.client_speaks_tasks.store(true, Ordering::Relaxed);
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
        let Some(mut call) = params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok())
        else {
            return Decision::Forward(Rewrite::PlainCall); // let the upstream judge malformed calls
        };
        let Some(tool) = call.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return Decision::Forward(Rewrite::PlainCall);
        };
        let own_async = call.get("arguments").and_then(|a| a.get("allow_async")).is_some();
        if own_async || tool == self.notion.poll_tool() {
            // The client drives Notion's protocol itself: hands off, but it spends the same budget.
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
            tokio::spawn(async move { this.run_handoff_tool(&id, &tool, call.get("arguments")).await });
            return Decision::Handled;
        }
        let Some(task) = call.remove("task") else {
            self.notion.note_client_call();
            if self.engine.config().taskifies(&tool) {
                let token = call.get("_meta").and_then(|m| m.get("progressToken")).map(Value::to_string);
                self.watch_plain_call(id.clone(), tool, token);
            }
            return Decision::Forward(Rewrite::PlainCall);
        };
        self.client_speaks_tasks.store(true, Ordering::Relaxed);
        if self.facts().native_tools.contains(&tool) {
            return Decision::Forward(Rewrite::NativeTaskCall);
        }
        let notion = self.notion.handles(&tool);
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
        let record = match self.engine.create(&self.owner, &tool, origin, ttl) {
            Ok(created) => created,
            Err(e) => return self.reply_error(id, code::INTERNAL_ERROR, &e.to_string()).await,
        };
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
            let stop = self.engine.stop_signal(&record.id);
            let this = self.clone();
            tokio::spawn(async move {
                this.notion.run_task(&this.engine, &this.upstream, &record.id, call, stop).await;
            });
        } else {
            self.start_local_task(&record.id, &Value::Object(call).to_string()).await;
        }
        Decision::Handled
    }

    /// Sends a task's call upstream. No future waits for it: the router hands the answer to
    /// [`Self::task_call_answered`], and cancelling the task cancels the call upstream.
    async fn start_local_task(self: &Arc<Self>, task_id: &str, params: &str) {
        self.running.insert(task_id.to_owned(), ());
        match self.upstream.send_for_task("tools/call", params, task_id).await {
            Ok(request_id) => {
                let this = Arc::downgrade(self);
                let task = task_id.to_owned();
                self.engine.on_stop(
                    task_id,
                    Box::new(move || {
                        let Some(this) = this.upgrade() else { return };
                        this.running.remove(&task);
                        this.upstream.forget(&request_id);
                        tokio::spawn(async move {
                            this.cancel_upstream(&request_id, "the task was cancelled").await
                        });
                    }),
                );
            }
            Err(e) => self.task_call_failed(task_id, e),
        }
    }

    /// The upstream answered a task's call.
    pub fn task_call_answered(&self, task_id: &str, reply: Reply) {
        self.running.remove(task_id);
        self.finish_with_reply(task_id, Ok(reply));
    }

    fn task_call_failed(&self, task_id: &str, error: UpstreamError) {
        self.running.remove(task_id);
        self.finish_with_reply(task_id, Err(error));
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
    fn finish_with_reply(&self, task_id: &str, reply: Result<Reply, UpstreamError>) {
        let (status, message, outcome) = match reply {
            Ok(Reply::Result(raw)) if lookup(raw.get(), &["isError"]) == Some(Value::Bool(true)) => (
                TaskStatus::Failed,
                Some("The tool returned an error result (isError: true).".into()),
                Outcome::Result(raw),
            ),
            Ok(Reply::Result(raw)) => (TaskStatus::Completed, None, Outcome::Result(raw)),
            Ok(Reply::Error(raw)) => {
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
        self.engine.finish(task_id, status, message, Some(outcome));
    }

    async fn on_tasks_method(self: &Arc<Self>, id: &Id, method: &str, params: Option<&RawValue>) -> Decision {
        if method == "tasks/list" {
            return self.on_tasks_list(id, params).await;
        }
        let task_id = match params.and_then(|p| lookup(p.get(), &["taskId"])) {
            Some(Value::String(t)) => t,
            _ => {
                return self
                    .reply_error(
                        id,
                        code::INVALID_PARAMS,
                        &format!("{method} needs params.taskId (a string)"),
                    )
                    .await;
            }
        };
        let local = self.engine.get(&self.owner, &task_id);
        if local.is_none() && (self.native_tasks.contains_key(&task_id) || self.facts().tools_call) {
            return Decision::Forward(Rewrite::None);
        }
        let not_found =
            |verb: &str| format!("Failed to {verb} task: Task not found (unknown id, or it expired)");
        match method {
            "tasks/get" => match local {
                Some(record) => self.reply_result(id, &Value::Object(record.to_wire())).await,
                None => self.reply_error(id, code::INVALID_PARAMS, &not_found("retrieve")).await,
            },
            "tasks/cancel" => match self.engine.cancel(&self.owner, &task_id) {
                Ok(record) => self.reply_result(id, &Value::Object(record.to_wire())).await,
                Err(e @ CancelError::Terminal(_)) => {
                    self.reply_error(id, code::INVALID_PARAMS, &e.to_string()).await
                }
                Err(CancelError::NotFound) => {
                    self.reply_error(id, code::INVALID_PARAMS, &not_found("cancel")).await
                }
            },
            _ => {
                if local.is_none() {
                    return self.reply_error(id, code::INVALID_PARAMS, &not_found("retrieve")).await;
                }
                // tasks/result blocks until the task ends: wait off the routing loop.
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let line = match this.engine.wait_terminal(&this.owner, &task_id).await {
                        Some(record) => task_payload(&id, &record),
                        None => jsonrpc::error_response(
                            Some(&id),
                            code::INVALID_PARAMS,
                            &not_found("retrieve"),
                            None,
                        ),
                    };
                    this.client.send(line).await;
                });
                Decision::Handled
            }
        }
    }

    async fn on_tasks_list(self: &Arc<Self>, id: &Id, params: Option<&RawValue>) -> Decision {
        let cursor = match params.and_then(|p| lookup(p.get(), &["cursor"])) {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) => Some(c),
            Some(other) => {
                return self
                    .reply_error(
                        id,
                        code::INVALID_PARAMS,
                        &format!("params.cursor must be a string, got {other}"),
                    )
                    .await;
            }
        };
        let upstream_lists = self.facts().list;
        // Our tasks first, then the upstream's own (cursors prefixed so we know whose page is next).
        if let Some(upstream_cursor) = cursor.as_deref().and_then(|c| c.strip_prefix("upstream:")) {
            let params = match upstream_cursor {
                "" => "{}".to_string(),
                c => json!({ "cursor": c }).to_string(),
            };
            let this = self.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let line = match this
                    .upstream
                    .request("tasks/list", Some(&params), Some(Duration::from_secs(30)))
                    .await
                {
                    Ok(Reply::Result(raw)) => {
                        let mut page: Map<String, Value> =
                            serde_json::from_str(raw.get()).unwrap_or_default();
                        if let Some(Value::String(next)) = page.get("nextCursor") {
                            let next = format!("upstream:{next}");
                            page.insert("nextCursor".into(), Value::String(next));
                        }
                        jsonrpc::result_response(&id, &Value::Object(page).to_string())
                    }
                    Ok(Reply::Error(raw)) => jsonrpc::error_object_response(&id, raw.get()),
                    Err(e) => jsonrpc::error_response(Some(&id), code::INTERNAL_ERROR, &e.to_string(), None),
                };
                this.client.send(line).await;
            });
            return Decision::Handled;
        }
        match self.engine.list(&self.owner, cursor.as_deref()) {
            Ok((tasks, next)) => {
                let tasks: Vec<Value> = tasks.into_iter().map(|t| Value::Object(t.to_wire())).collect();
                let mut result = json!({ "tasks": tasks });
                match (next, upstream_lists) {
                    (Some(next), _) => result["nextCursor"] = Value::String(next),
                    (None, true) => result["nextCursor"] = Value::String("upstream:".into()),
                    (None, false) => {}
                }
                self.reply_result(id, &result).await
            }
            Err(e) => self.reply_error(id, code::INVALID_PARAMS, &e.to_string()).await,
        }
    }

    /// Rewrites (or withholds) the upstream's response to a client request. `None`: do not forward.
    pub fn on_upstream_response(
        &self,
        id: &Id,
        rewrite: Rewrite,
        result: Option<&RawValue>,
        error: Option<&RawValue>,
    ) -> Option<Option<Vec<u8>>> {
        match rewrite {
            Rewrite::None | Rewrite::PlainCall => None,
            Rewrite::Initialize => Some(result.and_then(|r| self.rewrite_initialize(id, r))),
            Rewrite::ToolsList { first_page } => {
                Some(result.and_then(|r| self.rewrite_tools_list(id, r, first_page)))
            }
            Rewrite::NativeTaskCall => {
                if let Some(Value::String(t)) = result.and_then(|r| lookup(r.get(), &["task", "taskId"])) {
                    self.native_tasks.insert(t, ());
                }
                None
            }
            Rewrite::HandedOff { task_id } => {
                let reply = match (result, error) {
                    (Some(r), _) => Reply::Result(r.to_owned()),
                    (None, Some(e)) => Reply::Error(e.to_owned()),
                    (None, None) => return Some(Option::None),
                };
                self.finish_with_reply(&task_id, Ok(reply));
                Some(Option::None)
            }
        }
    }

    fn rewrite_initialize(&self, id: &Id, result: &RawValue) -> Option<Vec<u8>> {
        let mut r: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
        let caps = r.entry("capabilities").or_insert_with(|| json!({}));
        let caps = caps.as_object_mut()?;
        {
            let mut facts = self.facts();
            facts.tools_call = lookup_value(caps, &["tasks", "requests", "tools", "call"]).is_some();
            facts.list = lookup_value(caps, &["tasks", "list"]).is_some();
        }
        let tasks = caps.entry("tasks").or_insert_with(|| json!({}));
        let tasks = tasks.as_object_mut()?;
        tasks.entry("list").or_insert_with(|| json!({}));
        tasks.entry("cancel").or_insert_with(|| json!({}));
        let requests = tasks.entry("requests").or_insert_with(|| json!({})).as_object_mut()?;
        let tools = requests.entry("tools").or_insert_with(|| json!({})).as_object_mut()?;
        tools.entry("call").or_insert_with(|| json!({}));
        Some(jsonrpc::result_response(id, &Value::Object(r).to_string()))
    }

    fn rewrite_tools_list(&self, id: &Id, result: &RawValue, first_page: bool) -> Option<Vec<u8>> {
        let mut r: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
        let tools = r.get_mut("tools")?.as_array_mut()?;
        self.notion.detect(tools.iter().filter_map(|t| t.get("name").and_then(Value::as_str)));
        let mut facts = self.facts();
        for tool in tools.iter_mut() {
            let Some(tool) = tool.as_object_mut() else { continue };
            let Some(name) = tool.get("name").and_then(Value::as_str).map(str::to_owned) else { continue };
            let native = lookup_value(tool, &["execution", "taskSupport"])
                .and_then(Value::as_str)
                .is_some_and(|s| s == "optional" || s == "required");
            if native && facts.tools_call {
                facts.native_tools.insert(name);
            } else if self.engine.config().taskifies(&name) || self.notion.handles(&name) {
                let execution = tool.entry("execution").or_insert_with(|| json!({}));
                if let Some(execution) = execution.as_object_mut() {
                    execution.insert("taskSupport".into(), Value::String("optional".into()));
                }
            }
        }
        if first_page && self.engine.config().sync_deadline_ms > 0 {
            tools.extend(handoff_tools());
        }
        drop(facts);
        Some(jsonrpc::result_response(id, &Value::Object(r).to_string()))
    }

    /// An upstream request to the client. When it is made on behalf of a task, the task becomes
    /// `input_required` and the request is tagged with it: the tagged line is returned. `None`: forward
    /// the original.
    pub fn on_server_request(&self, id: &Id, method: &str, params: Option<&RawValue>) -> Option<Vec<u8>> {
        if !matches!(method, "elicitation/create" | "sampling/createMessage") || !self.enabled() {
            return None;
        }
        if lookup(params?.get(), &["_meta", RELATED_TASK]).is_some() {
            return None; // the upstream's own task
        }
        let task_id = self.sole_running_task()?;
        let tagged = with_related_task(params?.get(), &task_id).ok()?;
        self.input_requests.insert(id.clone(), task_id.clone());
        let message = format!("Waiting for the client to answer {method}.");
        self.engine.set_status(&task_id, TaskStatus::InputRequired, Some(message));
        Some(jsonrpc::request(id, method, Some(&tagged)))
    }

    /// Which task a server request belongs to, when that is unambiguous over stdio: exactly one task's
    /// call is in flight and no plain call could have asked instead.
    fn sole_running_task(&self) -> Option<String> {
        if self.running.len() != 1 || self.pending.count_client(|r| r.method.as_ref() == "tools/call") > 0 {
            return None;
        }
        self.running.iter().next().map(|e| e.key().clone())
    }

    /// The client answered an upstream request: a task waiting on it resumes.
    pub fn on_client_response(&self, id: &Id) {
        if let Some((_, task_id)) = self.input_requests.remove(id)
            && !self.input_requests.iter().any(|e| *e.value() == task_id)
        {
            self.engine.set_status(&task_id, TaskStatus::Working, None);
        }
    }

    /// Notes the progress an upstream reported, so keep-alives for the same token keep increasing.
    pub fn on_upstream_progress(&self, params: Option<&RawValue>) {
        if self.progress_seen.is_empty() {
            return;
        }
        let Some(params) = params else { return };
        let (Some(token), Some(progress)) = (
            lookup(params.get(), &["progressToken"]),
            lookup(params.get(), &["progress"]).and_then(|p| p.as_f64()),
        ) else {
            return;
        };
        if let Some(mut seen) = self.progress_seen.get_mut(&token.to_string()) {
            *seen = seen.max(progress);
        }
    }

    fn watch_plain_call(self: &Arc<Self>, id: Id, tool: String, token: Option<String>) {
        let config = self.engine.config();
        let deadline = (config.sync_deadline_ms > 0).then(|| Duration::from_millis(config.sync_deadline_ms));
        let keepalive = token.filter(|_| config.keepalive_after_ms > 0).map(|t| {
            (
                t,
                Duration::from_millis(config.keepalive_after_ms),
                Duration::from_millis(config.keepalive_interval_ms),
            )
        });
        if deadline.is_none() && keepalive.is_none() {
            return;
        }
        if let Some((token, _, _)) = &keepalive {
            self.progress_seen.insert(token.clone(), 0.0);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let deadline = deadline.map(|d| start + d);
            let mut next_keepalive = keepalive.as_ref().map(|(_, after, _)| start + *after);
            loop {
                let wake = match (deadline, next_keepalive) {
                    (Some(d), Some(k)) => d.min(k),
                    (Some(d), None) => d,
                    (None, Some(k)) => k,
                    (None, None) => break,
                };
                tokio::time::sleep_until(wake).await;
                if !this.pending.is_client_pending(&id) {
                    break;
                }
                if Some(wake) == deadline {
                    this.hand_off(&id, &tool, start.into_std()).await;
                    break;
                }
                if let (Some((token, _, every)), Some(k)) = (&keepalive, next_keepalive.as_mut()) {
                    this.send_keepalive(token, &tool, start.elapsed()).await;
                    *k += *every;
                }
            }
            if let Some((token, _, _)) = &keepalive {
                this.progress_seen.remove(token);
            }
        });
    }

    async fn send_keepalive(&self, token: &str, tool: &str, elapsed: Duration) {
        // Progress must increase; stay just above the last value the upstream reported.
        let value = match self.progress_seen.get_mut(token) {
            Some(mut seen) => {
                *seen += 0.001;
                *seen
            }
            None => return,
        };
        let params = format!(
            "{{\"progressToken\":{token},\"progress\":{value},\"message\":{}}}",
            serde_json::to_string(&format!("`{tool}` is still running ({} s)", elapsed.as_secs()))
                .expect("string")
        );
        self.client.send(jsonrpc::notification("notifications/progress", Some(&params))).await;
    }

    /// The sync deadline passed: answer the client now and let the work go on as a task.
    async fn hand_off(self: &Arc<Self>, id: &Id, tool: &str, started: Instant) {
        let record = match self.engine.create(&self.owner, tool, Origin::Local, None) {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(%id, tool, error = %e, "cannot hand off a call past the sync deadline; it stays synchronous");
                return;
            }
        };
        if !self.pending.set_rewrite(id, Rewrite::HandedOff { task_id: record.id.clone() }) {
            // The answer came in the meantime: no task needed.
            self.engine.discard(&record.id);
            return;
        }
        tracing::info!(%id, tool, task_id = %record.id, waited_ms = started.elapsed().as_millis() as u64, "handed off a slow call as a task");
        let text = format!(
            "`{tool}` is taking longer than {:.0} s, so it goes on in the background as task {id_}. Nothing is lost: \
             call `{RESULT_TOOL}` with {{\"taskId\": \"{id_}\"}} to get its result when it is done (or `{STATUS_TOOL}` to check on it).",
            started.elapsed().as_secs_f64(),
            id_ = record.id
        );
        let result = json!({
            "content": [{ "type": "text", "text": text }],
            "isError": false,
            "_meta": { RELATED_TASK: { "taskId": record.id } },
        });
        self.client.send(jsonrpc::result_response(id, &result.to_string())).await;
        // Cancelling the task cancels the call upstream, which knows it by the client's id.
        let this = Arc::downgrade(self);
        let id = id.clone();
        self.engine.on_stop(
            &record.id,
            Box::new(move || {
                let Some(this) = this.upgrade() else { return };
                tokio::spawn(async move { this.cancel_upstream(&id, "the task was cancelled").await });
            }),
        );
    }

    async fn run_handoff_tool(&self, id: &Id, tool: &str, arguments: Option<&Value>) {
        let task_id =
            arguments.and_then(|a| a.get("taskId")).and_then(Value::as_str).unwrap_or_default().to_owned();
        let Some(record) = self.engine.get(&self.owner, &task_id) else {
            let text = format!(
                "No task with id {task_id:?}: the id is wrong, or the task expired and its result is gone."
            );
            self.client.send(jsonrpc::result_response(id, &tool_text(&text, true).to_string())).await;
            return;
        };
        let record = if tool == RESULT_TOOL {
            let wait = arguments
                .and_then(|a| a.get("waitSeconds"))
                .and_then(Value::as_f64)
                .unwrap_or(20.0)
                .clamp(0.0, 50.0);
            let waited = tokio::time::timeout(
                Duration::from_secs_f64(wait),
                self.engine.wait_terminal(&self.owner, &task_id),
            )
            .await;
            match waited {
                Ok(Some(done)) => done,
                Ok(None) => record,
                Err(_) => self.engine.get(&self.owner, &task_id).unwrap_or(record),
            }
        } else {
            record
        };
        let line = match (tool, record.status, &record.outcome) {
            (RESULT_TOOL, TaskStatus::Completed | TaskStatus::Failed, Some(Outcome::Result(raw))) => {
                let body = with_related_task(raw.get(), &record.id).unwrap_or_else(|_| raw.get().to_owned());
                jsonrpc::result_response(id, &body)
            }
            (RESULT_TOOL, TaskStatus::Failed, Some(Outcome::Error(raw))) => {
                let text = format!("Task {} failed: {}", record.id, raw.get());
                jsonrpc::result_response(id, &tool_text(&text, true).to_string())
            }
            _ => {
                let secs =
                    record.last_updated_at.duration_since(record.created_at).unwrap_or_default().as_secs();
                let mut text =
                    format!("Task {} (`{}`) is {}", record.id, record.tool, record.status.as_str());
                if !record.status.is_terminal() {
                    text.push_str(&format!(
                        "; started {} s ago. Call `{RESULT_TOOL}` again to wait for its result.",
                        record.created_at.elapsed().unwrap_or_default().as_secs()
                    ));
                } else {
                    text.push_str(&format!(" after {secs} s."));
                }
                if let Some(m) = &record.status_message {
                    text.push_str(&format!(" {m}"));
                }
                let mut result = tool_text(&text, record.status == TaskStatus::Cancelled);
                result["structuredContent"] = Value::Object(record.to_wire());
                jsonrpc::result_response(id, &result.to_string())
            }
        };
        self.client.send(line).await;
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
                if event.owner != this.owner || !this.client_speaks_tasks.load(Ordering::Relaxed) {
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
            self.task_call_failed(&task_id, UpstreamError::Gone(why.to_string()));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.running.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the woken tasks/result waiters queue their answers.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The payload of `tasks/result` for a terminal task.
fn task_payload(id: &Id, record: &TaskRecord) -> Vec<u8> {
    match &record.outcome {
        Some(Outcome::Result(raw)) => match with_related_task(raw.get(), &record.id) {
            Ok(body) => jsonrpc::result_response(id, &body),
            Err(_) => jsonrpc::result_response(id, raw.get()),
        },
        Some(Outcome::Error(raw)) => jsonrpc::error_object_response(id, raw.get()),
        None => {
            let msg = format!("Task {} was cancelled; it has no result.", record.id);
            let data = json!({ RELATED_TASK: { "taskId": record.id } });
            jsonrpc::error_response(Some(id), CANCELLED_CODE, &msg, Some(&data))
        }
    }
}

fn tool_text(text: &str, is_error: bool) -> Value {
    json!({ "content": [{ "type": "text", "text": text }], "isError": is_error })
}

fn handoff_tools() -> [Value; 2] {
    let schema = |wait: bool| {
        let mut props = json!({ "taskId": { "type": "string", "description": "The task id given when the call was handed off." } });
        if wait {
            props["waitSeconds"] = json!({ "type": "number", "description": "How long to wait for the result (0 to 50 s, default 20)." });
        }
        json!({ "type": "object", "properties": props, "required": ["taskId"] })
    };
    [
        json!({
            "name": STATUS_TOOL,
            "description": "Check on a tool call that was still running at the proxy's deadline and goes on in the background as a task.",
            "inputSchema": schema(false),
        }),
        json!({
            "name": RESULT_TOOL,
            "description": "Get the result of a tool call that goes on in the background as a task (waits up to waitSeconds for it to finish).",
            "inputSchema": schema(true),
        }),
    ]
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
