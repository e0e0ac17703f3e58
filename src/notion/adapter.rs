//! Notion's async protocol as standard MCP Tasks.
//!
//! A task-run call of `notion-create-pages` or `notion-duplicate-page` goes upstream with
//! `allow_async: true`. Notion answers either with the operation's result (it finished at once: the
//! task completes) or with an async task (in any of the forms [`forms`] reads); then the adapter polls
//! `notion-get-async-task` through the shared [`PollScheduler`] and maps Notion's statuses onto the
//! task: `queued|running|retrying` → `working` (Notion's status in `statusMessage`), `succeeded` →
//! `completed` with the operation's result, `failed` → `failed` with Notion's error. It never polls
//! forever: a task Notion no longer knows, and answers it cannot read or polls that fail
//! `max_poll_failures` times in a row, fail the task with a message that says why.
//!
//! [`NotionAdapter::poll_task`] is the polling loop alone, so a task can also be followed from a
//! known Notion task id.

use super::forms::{self, Accepted, AsyncTask, NotionStatus, Poll};
use super::poll::{Backoff, PollScheduler};
use crate::config::NotionConfig;
use crate::tasks::engine::TaskEngine;
use crate::tasks::model::{Outcome, TaskStatus};
use crate::upstream::{Upstream, UpstreamError};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// The Notion adapter of one upstream.
pub struct NotionAdapter {
    config: NotionConfig,
    scheduler: Arc<PollScheduler>,
    active: AtomicBool,
}

impl NotionAdapter {
    /// An adapter; active from the start when the profile forces it, else once detected.
    pub fn new(config: NotionConfig, scheduler: Arc<PollScheduler>) -> Self {
        let active = config.mode == crate::config::NotionMode::On;
        NotionAdapter { config, scheduler, active: AtomicBool::new(active) }
    }

    /// Whether Notion's protocol is in use on this upstream.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Looks at the upstream's tool names: `notion-get-async-task` among them turns the adapter on
    /// (unless it is off).
    pub fn detect<'a>(&self, mut tools: impl Iterator<Item = &'a str>) {
        if self.config.mode == crate::config::NotionMode::Auto
            && !self.is_active()
            && tools.any(|t| t == self.config.poll_tool)
        {
            tracing::info!(poll_tool = %self.config.poll_tool, "Notion async protocol detected; its tasks become MCP tasks");
            self.active.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a task-run call of `tool` uses Notion's async protocol.
    pub fn handles(&self, tool: &str) -> bool {
        self.is_active() && self.config.async_tools.iter().any(|t| t == tool)
    }

    /// Whether `tools/list` hides `allow_async` from the tools the adapter handles.
    pub fn hides_allow_async(&self) -> bool {
        self.config.hide_allow_async
    }

    /// The name of Notion's polling tool.
    pub fn poll_tool(&self) -> &str {
        &self.config.poll_tool
    }

    /// The shared budget.
    pub fn scheduler(&self) -> &Arc<PollScheduler> {
        &self.scheduler
    }

    /// A client call passes through to this upstream: it counts against the budget.
    pub fn note_client_call(&self) {
        if self.is_active() {
            self.scheduler.note_client_call();
        }
    }

    /// Runs one task: starts the operation asynchronously, polls it, records how it ended. `call` is
    /// the client's `tools/call` params without `task`. Stops (leaving Notion's operation to finish on
    /// its own: Notion has no cancel) when `stop` fires.
    pub async fn run_task(
        &self,
        engine: &TaskEngine,
        upstream: &Upstream,
        task_id: &str,
        mut call: Map<String, Value>,
        stop: oneshot::Receiver<()>,
    ) {
        let mut stop = stop;
        let args = call.entry("arguments").or_insert_with(|| json!({}));
        if let Some(args) = args.as_object_mut() {
            args.insert("allow_async".into(), Value::Bool(true));
        }
        let params = Value::Object(call).to_string();
        // Start the operation (retrying while Notion says rate_limited).
        let notion = loop {
            let reply = tokio::select! {
                r = self.call(upstream, task_id, &params, true, None) => r,
                _ = stopped(&mut stop) => return,
            };
            let raw = match reply {
                Ok(Outcome::Result(raw)) => raw,
                other => {
                    count_request(task_id, "start", "error");
                    return finish_other(engine, task_id, other).await;
                }
            };
            let answer = forms::read_accepted(&serde_json::from_str(raw.get()).unwrap_or(Value::Null));
            count_request(task_id, "start", start_outcome(&answer));
            match answer {
                Accepted::RateLimited(wait) => {
                    let wait = wait.unwrap_or(Duration::from_millis(self.config.default_retry_after_ms));
                    tracing::info!(
                        task_id,
                        wait_ms = wait.as_millis() as u64,
                        "Notion rate limited the start of a task; retrying after the wait"
                    );
                    self.scheduler.pause_for(wait);
                }
                Accepted::Task(notion) => break *notion,
                // Notion answered synchronously (or refused the call): the task is done at once.
                Accepted::Final => return finish_result(engine, task_id, raw).await,
            }
        };
        let Some(notion_id) = notion.id.clone() else {
            // An async task with nothing to poll it by: done if it says so, else unusable.
            if notion.status.as_ref().is_some_and(NotionStatus::is_terminal) {
                let answer = notion.clone();
                return finish_ended(engine, task_id, "(no id)", &notion, answer).await;
            }
            let shown = forms::shown(&Value::Object(notion.object.clone()).to_string(), SHOWN_CHARS);
            tracing::warn!(task_id, answer = %shown, "Notion accepted the call as an async task but named no task id");
            let message =
                format!("Notion accepted the call as an async task but named no task id to poll: {shown}");
            return finish_unreadable(engine, task_id, message).await;
        };
        let unknown: Vec<&String> =
            notion.object.keys().filter(|k| !KNOWN_FIELDS.contains(&k.as_str())).collect();
        if !unknown.is_empty() {
            tracing::debug!(task_id, notion_task = %notion_id, ?unknown, "async_task carries fields we do not use; kept");
        }
        if notion.status.as_ref().is_some_and(NotionStatus::is_terminal) {
            // Finished by the time Notion answered (the published object carries its result).
            let answer = notion.clone();
            return finish_ended(engine, task_id, &notion_id, &notion, answer).await;
        }
        // Persisted before polling, so that a restarted proxy resumes this Notion task.
        engine.bind_upstream(task_id, &notion_id).await;
        self.poll_task(engine, upstream, task_id, notion, stop).await;
    }

    /// Resumes a task whose Notion task was started by a proxy that is gone (crash or restart): polls
    /// Notion's task by its persisted id until it ends, as [`Self::run_task`] would have.
    pub async fn resume_task(
        &self,
        engine: &TaskEngine,
        upstream: &Upstream,
        task_id: &str,
        notion_id: String,
        stop: oneshot::Receiver<()>,
    ) {
        tracing::info!(task_id, notion_task = %notion_id, "resuming the polls of a Notion task after a restart");
        self.poll_task(engine, upstream, task_id, AsyncTask::known(&notion_id), stop).await;
    }

    /// Polls the Notion task `notion` (as accepted, or [`AsyncTask::known`] by its id alone) until it
    /// ends, and ends the MCP task `task_id` with its outcome. The first poll waits Notion's hint (or
    /// `default_backoff_ms`); then the wait grows by `backoff_factor` up to `max_backoff_ms`, and never
    /// undercuts a `poll_after_seconds` Notion gives. Each poll is bounded by `poll_timeout_ms`; answers
    /// that cannot be read, polls that fail and polls that time out are tried again with that backoff,
    /// and the task fails once `max_poll_failures` of them come in a row. Stops when `stop` fires.
    pub async fn poll_task(
        &self,
        engine: &TaskEngine,
        upstream: &Upstream,
        task_id: &str,
        notion: AsyncTask,
        mut stop: oneshot::Receiver<()>,
    ) {
        let Some(notion_id) = notion.id.clone() else {
            return finish_unreadable(
                engine,
                task_id,
                "A Notion task without an id cannot be polled.".into(),
            )
            .await;
        };
        let first = notion.poll_after.unwrap_or(Duration::from_millis(self.config.default_backoff_ms));
        let mut backoff = Backoff::new(
            first,
            self.config.backoff_factor,
            Duration::from_millis(self.config.max_backoff_ms),
        );
        let status = notion.status.as_ref().map_or("queued", NotionStatus::as_str);
        engine
            .update_working(
                task_id,
                Some(format!("Notion task {notion_id}: {status}")),
                Some(self.cadence(&backoff)),
            )
            .await;
        let poll_params =
            json!({ "name": self.config.poll_tool, "arguments": { "task_id": notion_id } }).to_string();
        let poll_timeout = Duration::from_millis(self.config.poll_timeout_ms);
        let max_failures = self.config.max_poll_failures;
        // Notion's floor for the next wait (poll_after_seconds of the last answer).
        let mut floor = Duration::ZERO;
        let mut failures = 0u32;
        loop {
            let wait = backoff.step().max(floor);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped(&mut stop) => {
                    tracing::info!(task_id, notion_task = %notion_id, "stopped polling; Notion has no cancel, so its operation may still finish");
                    return;
                }
            }
            let reply = tokio::select! {
                r = self.call(upstream, task_id, &poll_params, false, Some(poll_timeout)) => r,
                _ = stopped(&mut stop) => return,
            };
            // A poll that failed: tried again (the backoff grows) until too many fail in a row.
            let failed = match reply {
                Ok(Outcome::Result(raw)) => {
                    let answer = forms::read_poll(&serde_json::from_str(raw.get()).unwrap_or(Value::Null));
                    count_request(task_id, "poll", poll_outcome(&answer));
                    match answer {
                        Poll::RateLimited(wait) => {
                            let wait =
                                wait.unwrap_or(Duration::from_millis(self.config.default_retry_after_ms));
                            tracing::info!(
                                task_id,
                                wait_ms = wait.as_millis() as u64,
                                "Notion rate limited a poll; every poll waits"
                            );
                            self.scheduler.pause_for(wait);
                            None
                        }
                        Poll::Status(answer) => {
                            failures = 0;
                            floor = answer.poll_after.unwrap_or(Duration::ZERO);
                            let status = answer.status.clone().expect("a poll answer has a status");
                            if status.is_terminal() {
                                return finish_ended(engine, task_id, &notion_id, &notion, *answer).await;
                            }
                            let mut message = format!("Notion task {notion_id}: {}", status.as_str());
                            if let Some(a) = answer.attempt {
                                message.push_str(&format!(" (attempt {a})"));
                            }
                            engine.update_working(task_id, Some(message), Some(self.cadence(&backoff))).await;
                            None
                        }
                        Poll::NotFound(error) => {
                            let message = format!(
                                "Notion no longer knows task {notion_id} ({}). Notion keeps finished tasks only \
                                 for a limited time, so its outcome can no longer be read; check the workspace \
                                 for the page.",
                                forms::error_text(&error)
                            );
                            tracing::warn!(task_id, notion_task = %notion_id, %message, "Notion task not found");
                            return finish_failed(engine, task_id, &notion_id, &notion, error, message).await;
                        }
                        Poll::Error(error) => Some((
                            format!("Notion answered with an error: {}", forms::error_text(&error)),
                            Some(error),
                        )),
                        Poll::Unreadable => {
                            let shown = forms::shown(raw.get(), SHOWN_CHARS);
                            Some((format!("could not read Notion's answer: {shown}"), None))
                        }
                    }
                }
                Ok(Outcome::Error(raw)) => {
                    count_request(task_id, "poll", "error");
                    let message = serde_json::from_str::<Value>(raw.get())
                        .ok()
                        .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_owned))
                        .unwrap_or_else(|| forms::shown(raw.get(), SHOWN_CHARS));
                    Some((format!("the poll failed: {message}"), None))
                }
                Err(UpstreamError::Timeout(t)) => {
                    count_request(task_id, "poll", "timeout");
                    Some((format!("the poll got no answer within {} ms", t.as_millis()), None))
                }
                Err(gone) => {
                    count_request(task_id, "poll", "error");
                    return finish_other(engine, task_id, Err(gone)).await;
                }
            };
            let Some((why, error)) = failed else { continue };
            failures += 1;
            if failures < max_failures {
                tracing::warn!(task_id, notion_task = %notion_id, failures, max_failures, "polling Notion: {why}; polling again");
                continue;
            }
            let message =
                format!("Polling Notion task {notion_id} failed {failures} times in a row; last: {why}");
            tracing::error!(task_id, notion_task = %notion_id, "{message}");
            match error {
                Some(error) => {
                    return finish_failed(engine, task_id, &notion_id, &notion, error, message).await;
                }
                None => return finish_unreadable(engine, task_id, message).await,
            }
        }
    }

    fn cadence(&self, backoff: &Backoff) -> u64 {
        self.scheduler.cadence(backoff.current()).as_millis() as u64
    }

    async fn call(
        &self,
        upstream: &Upstream,
        task_id: &str,
        params: &str,
        start: bool,
        timeout: Option<Duration>,
    ) -> Result<Outcome, UpstreamError> {
        match start {
            true => self.scheduler.acquire_start().await,
            false => self.scheduler.acquire().await,
        }
        // With traces on, each request to Notion is a CLIENT span under the task's span.
        let traced = crate::telemetry::trace::trace_on()
            .then(|| {
                let tool = if start { None } else { Some(self.config.poll_tool.as_str()) };
                crate::telemetry::trace::task_request(task_id, "tools/call", tool)
            })
            .flatten();
        let params = match &traced {
            Some((tp, _)) => crate::telemetry::trace::params_with_traceparent(params, tp),
            None => params.to_owned(),
        };
        let reply = upstream.request("tools/call", Some(&params), timeout).await;
        if let Some((_, cx)) = traced {
            use opentelemetry::trace::TraceContextExt;
            cx.span().end();
        }
        reply
    }
}

/// Counts one of the proxy's requests to Notion, and marks it on the task's span.
fn count_request(task_id: &str, request: &'static str, outcome: &'static str) {
    let attrs = [
        opentelemetry::KeyValue::new("asyncify.notion.request", request),
        opentelemetry::KeyValue::new("asyncify.notion.outcome", outcome),
    ];
    crate::telemetry::metrics().notion_requests.add(1, &attrs);
    crate::telemetry::trace::task_event(
        task_id,
        if request == "poll" { "poll" } else { "start" },
        attrs.to_vec(),
    );
}

fn start_outcome(answer: &Accepted) -> &'static str {
    match answer {
        Accepted::RateLimited(_) => "rate_limited",
        Accepted::Task(_) => "async_task",
        Accepted::Final => "sync",
    }
}

fn poll_outcome(answer: &Poll) -> &'static str {
    match answer {
        Poll::RateLimited(_) => "rate_limited",
        Poll::Status(t) => match t.status {
            Some(NotionStatus::Queued) => "queued",
            Some(NotionStatus::Running) => "running",
            Some(NotionStatus::Retrying) => "retrying",
            Some(NotionStatus::Succeeded) => "succeeded",
            Some(NotionStatus::Failed) => "failed",
            _ => "other",
        },
        Poll::NotFound(_) => "not_found",
        Poll::Error(_) => "error",
        Poll::Unreadable => "unreadable",
    }
}

async fn stopped(stop: &mut oneshot::Receiver<()>) {
    if stop.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Fields of an async task object the adapter reads (the rest is kept and passed on in `_meta`).
const KNOWN_FIELDS: &[&str] = &[
    "object",
    "id",
    "task_id",
    "status",
    "status_url",
    "created_time",
    "operation",
    "poll_after_seconds",
    "suggested_backoff_ms",
    "attempt",
    "result",
    "error",
];

/// How much of an answer the adapter cannot read is shown in a status message and the log.
const SHOWN_CHARS: usize = 500;

/// What the adapter keeps of Notion's task beside the result: the accepted object (unknown fields
/// included) and the last status answer without its result (which is the tool result itself).
fn notion_meta(notion_id: &str, accepted: &AsyncTask, last: &AsyncTask) -> Value {
    let mut status = last.object.clone();
    status.remove("result");
    json!({ "io.mcp-asyncify/notion": { "task_id": notion_id, "async_task": accepted.object, "status": status } })
}

/// Ends the task as Notion's task ended (`last` has a terminal status).
async fn finish_ended(
    engine: &TaskEngine,
    task_id: &str,
    notion_id: &str,
    accepted: &AsyncTask,
    last: AsyncTask,
) {
    let meta = notion_meta(notion_id, accepted, &last);
    match last.status {
        Some(NotionStatus::Succeeded) => {
            let body = succeeded_result(last.result, meta);
            let raw = RawValue::from_string(body.to_string()).expect("valid JSON");
            engine.finish(task_id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await;
        }
        _ => {
            let error = last.error.unwrap_or_else(|| json!({ "message": "Notion reported the task failed" }));
            let message = format!("Notion task failed: {}", forms::error_text(&error));
            finish_error_result(engine, task_id, error, message, meta).await;
        }
    }
}

/// Fails the task with Notion's error object (a failed task, or one Notion no longer knows).
async fn finish_failed(
    engine: &TaskEngine,
    task_id: &str,
    notion_id: &str,
    accepted: &AsyncTask,
    error: Value,
    message: String,
) {
    let meta = json!({ "io.mcp-asyncify/notion": { "task_id": notion_id, "async_task": accepted.object } });
    finish_error_result(engine, task_id, error, message, meta).await;
}

/// A tool result with `isError`: `message` as text (what a model reads), Notion's error structured.
async fn finish_error_result(engine: &TaskEngine, task_id: &str, error: Value, message: String, meta: Value) {
    let body = json!({
        "content": [{ "type": "text", "text": message }],
        "structuredContent": { "error": error },
        "isError": true,
        "_meta": meta,
    });
    let raw = RawValue::from_string(body.to_string()).expect("valid JSON");
    engine.finish(task_id, TaskStatus::Failed, Some(message), Some(Outcome::Result(raw))).await;
}

/// Fails the task because Notion's answers could not be used; `message` says why and shows them.
async fn finish_unreadable(engine: &TaskEngine, task_id: &str, message: String) {
    let body = json!({ "content": [{ "type": "text", "text": message }], "isError": true });
    let raw = RawValue::from_string(body.to_string()).expect("valid JSON");
    engine.finish(task_id, TaskStatus::Failed, Some(message), Some(Outcome::Result(raw))).await;
}

async fn finish_result(engine: &TaskEngine, task_id: &str, raw: Box<RawValue>) {
    let result = serde_json::from_str::<Map<String, Value>>(raw.get()).unwrap_or_default();
    let failed = result.get("isError").and_then(Value::as_bool).unwrap_or(false);
    let (status, message) = match failed {
        true => {
            let error = forms::read_poll(&Value::Object(result));
            let message = match error {
                Poll::NotFound(e) | Poll::Error(e) => format!("Notion error {}", forms::error_text(&e)),
                _ => "The tool returned an error result (isError: true).".to_owned(),
            };
            (TaskStatus::Failed, Some(message))
        }
        false => (TaskStatus::Completed, None),
    };
    engine.finish(task_id, status, message, Some(Outcome::Result(raw))).await;
}

async fn finish_other(engine: &TaskEngine, task_id: &str, reply: Result<Outcome, UpstreamError>) {
    match reply {
        Ok(Outcome::Result(raw)) => finish_result(engine, task_id, raw).await,
        Ok(Outcome::Error(raw)) => {
            let message = serde_json::from_str::<Map<String, Value>>(raw.get())
                .ok()
                .and_then(|m| m.get("message").and_then(Value::as_str).map(str::to_owned));
            engine.finish(task_id, TaskStatus::Failed, message, Some(Outcome::Error(raw))).await;
        }
        Err(e) => {
            let message = format!("The task could not finish: {e}.");
            let error = json!({ "code": crate::jsonrpc::code::UPSTREAM_GONE, "message": message });
            let raw = RawValue::from_string(error.to_string()).expect("valid JSON");
            engine.finish(task_id, TaskStatus::Failed, Some(message), Some(Outcome::Error(raw))).await;
        }
    }
}

/// The `CallToolResult` of a Notion task that succeeded: Notion's result as text, and as
/// `structuredContent` when it is an object (the only shape `structuredContent` may have); a result
/// that is itself a `CallToolResult` (an MCP operation's) is used as it is. A success with no result
/// still says so, never `structuredContent: null`.
fn succeeded_result(result: Option<Value>, meta: Value) -> Value {
    let mut body = match result {
        Some(Value::Object(r)) if is_tool_result(&r) => Value::Object(r),
        Some(Value::Object(r)) => json!({
            "content": [{ "type": "text", "text": Value::Object(r.clone()).to_string() }],
            "structuredContent": r,
        }),
        Some(Value::Null) | None => json!({
            "content": [{ "type": "text", "text": "Notion reported the operation succeeded (it returned no result)." }],
        }),
        Some(other) => json!({ "content": [{ "type": "text", "text": other.to_string() }] }),
    };
    body["isError"] = Value::Bool(false);
    match body.get_mut("_meta").and_then(Value::as_object_mut) {
        Some(m) => {
            if let Value::Object(ours) = meta {
                m.extend(ours);
            }
        }
        None => body["_meta"] = meta,
    }
    body
}

/// `{"content": [{"type": …}, …]}` and nothing a page would have: a `CallToolResult`.
fn is_tool_result(r: &Map<String, Value>) -> bool {
    r.get("content")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty() && c.iter().all(|b| b.get("type").is_some_and(Value::is_string)))
        && r.keys().all(|k| matches!(k.as_str(), "content" | "structuredContent" | "isError" | "_meta"))
}

#[cfg(test)]
mod tests;
