//! Notion's async protocol as standard MCP Tasks.
//!
//! A task-run call of `notion-create-pages` or `notion-duplicate-page` goes upstream with
//! `allow_async: true`. Notion answers either with the operation's result (it finished at once: the
//! task completes) or with `{"async_task": {"task_id", "suggested_backoff_ms", …}}`; then the adapter
//! polls `notion-get-async-task` through the shared [`PollScheduler`] and maps Notion's statuses onto
//! the task: `queued|running|retrying` → `working`, `succeeded` → `completed` with the operation's
//! result, `failed` → `failed` with Notion's error. The envelope's schema is undocumented, so parsing
//! is tolerant: structured or text content, unknown fields kept, unreadable answers retried.

use super::poll::{Backoff, PollScheduler};
use crate::config::NotionConfig;
use crate::proxy::pending::Reply;
use crate::proxy::upstream::{Upstream, UpstreamError};
use crate::tasks::engine::TaskEngine;
use crate::tasks::model::{Outcome, TaskStatus};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// What one Notion answer says, once read.
#[derive(Debug, Clone, PartialEq)]
pub enum NotionAnswer {
    /// `rate_limited` (HTTP 429): wait this long, then retry.
    RateLimited(Duration),
    /// The operation runs asynchronously as this Notion task.
    AsyncTask {
        /// Notion's task id.
        task_id: String,
        /// How long Notion suggests waiting before the first poll.
        backoff: Option<Duration>,
        /// The whole envelope, unknown fields included.
        envelope: Map<String, Value>,
    },
    /// A `notion-get-async-task` status.
    Status {
        /// `queued`, `running`, `retrying`, `succeeded`, `failed` (or something new).
        status: String,
        /// The attempt number, when given.
        attempt: Option<u64>,
        /// The operation's result (on success).
        result: Option<Value>,
        /// Notion's error (on failure).
        error: Option<Value>,
    },
    /// Anything else: a final tool result as it stands.
    Final,
}

/// Reads a `CallToolResult` from Notion: the structured content if any, else the first text content
/// that is a JSON object.
pub fn payload(result: &RawValue) -> Option<Map<String, Value>> {
    let r: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
    if let Some(Value::Object(s)) = r.get("structuredContent") {
        return Some(s.clone());
    }
    r.get("content")?.as_array()?.iter().find_map(|c| {
        let text = c.get("text")?.as_str()?;
        match serde_json::from_str::<Value>(text.trim()).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    })
}

/// Classifies a tool result from Notion (`default_wait` when a rate limit names no retry-after).
pub fn classify(result: &RawValue, default_wait: Duration) -> NotionAnswer {
    let Some(p) = payload(result) else {
        return match rate_limit_in_text(result.get()) {
            true => NotionAnswer::RateLimited(default_wait),
            false => NotionAnswer::Final,
        };
    };
    if let Some(wait) = rate_limit(&p, default_wait) {
        return NotionAnswer::RateLimited(wait);
    }
    if let Some(Value::Object(envelope)) = p.get("async_task")
        && let Some(task_id) = envelope.get("task_id").and_then(Value::as_str)
    {
        let backoff = envelope
            .get("suggested_backoff_ms")
            .and_then(Value::as_f64)
            .map(|ms| Duration::from_millis(ms.max(0.0) as u64));
        return NotionAnswer::AsyncTask { task_id: task_id.to_owned(), backoff, envelope: envelope.clone() };
    }
    if let Some(status) = p.get("status").and_then(Value::as_str)
        && p.contains_key("task_id")
    {
        return NotionAnswer::Status {
            status: status.to_owned(),
            attempt: p.get("attempt").and_then(Value::as_u64),
            result: p.get("result").cloned(),
            error: p.get("error").cloned(),
        };
    }
    NotionAnswer::Final
}

fn rate_limit(p: &Map<String, Value>, default_wait: Duration) -> Option<Duration> {
    let error = p.get("error").and_then(Value::as_object).unwrap_or(p);
    let limited = error.get("code").and_then(Value::as_str) == Some("rate_limited")
        || error.get("status").and_then(Value::as_u64) == Some(429);
    if !limited {
        return None;
    }
    let secs = ["retry_after", "retry_after_seconds", "retryAfter"]
        .iter()
        .find_map(|k| error.get(*k).or_else(|| p.get(*k)).and_then(Value::as_f64));
    let ms = ["retry_after_ms", "retryAfterMs"]
        .iter()
        .find_map(|k| error.get(*k).or_else(|| p.get(*k)).and_then(Value::as_f64));
    Some(match (ms, secs) {
        (Some(ms), _) => Duration::from_millis(ms.max(0.0) as u64),
        (None, Some(s)) => Duration::from_secs_f64(s.max(0.0)),
        (None, None) => default_wait,
    })
}

fn rate_limit_in_text(raw: &str) -> bool {
    raw.contains("rate_limited") && raw.contains("\"isError\":true")
}

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
        let default_wait = Duration::from_millis(self.config.default_retry_after_ms);
        // Start the operation (retrying while Notion says rate_limited).
        let (notion_id, backoff, envelope) = loop {
            let reply = tokio::select! {
                r = self.call(upstream, task_id, &params, true) => r,
                _ = stopped(&mut stop) => return,
            };
            let answer = match &reply {
                Ok(Reply::Result(raw)) => Some(classify(raw, default_wait)),
                _ => None,
            };
            count_request(task_id, "start", start_outcome(answer.as_ref()));
            match reply {
                Ok(Reply::Result(raw)) => match answer.expect("classified above") {
                    NotionAnswer::RateLimited(wait) => {
                        tracing::info!(
                            task_id,
                            wait_ms = wait.as_millis() as u64,
                            "Notion rate limited the start of a task; retrying after the wait"
                        );
                        self.scheduler.pause_for(wait);
                    }
                    NotionAnswer::AsyncTask { task_id: notion_id, backoff, envelope } => {
                        break (notion_id, backoff, envelope);
                    }
                    // Notion answered synchronously: the task is done at once.
                    _ => return finish_result(engine, task_id, raw).await,
                },
                other => return finish_other(engine, task_id, other).await,
            }
        };
        let unknown: Vec<&String> =
            envelope.keys().filter(|k| !matches!(k.as_str(), "task_id" | "suggested_backoff_ms")).collect();
        if !unknown.is_empty() {
            tracing::debug!(task_id, notion_task = %notion_id, ?unknown, "async_task carries fields we do not use; kept");
        }
        // Persisted before polling, so that a restarted proxy resumes this Notion task.
        engine.bind_upstream(task_id, &notion_id).await;
        self.poll_task(engine, upstream, task_id, notion_id, backoff, envelope, stop).await;
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
        self.poll_task(engine, upstream, task_id, notion_id, None, Map::new(), stop).await;
    }

    /// Polls Notion's task `notion_id` until it ends, and records how it ended.
    #[allow(clippy::too_many_arguments)]
    async fn poll_task(
        &self,
        engine: &TaskEngine,
        upstream: &Upstream,
        task_id: &str,
        notion_id: String,
        backoff: Option<Duration>,
        envelope: Map<String, Value>,
        stop: oneshot::Receiver<()>,
    ) {
        let mut stop = stop;
        let default_wait = Duration::from_millis(self.config.default_retry_after_ms);
        let first = backoff.unwrap_or(Duration::from_millis(self.config.default_backoff_ms));
        let mut backoff = Backoff::new(
            first,
            self.config.backoff_factor,
            Duration::from_millis(self.config.max_backoff_ms),
        );
        engine
            .update_working(
                task_id,
                Some(format!("Notion task {notion_id}: queued")),
                Some(self.cadence(&backoff)),
            )
            .await;
        let poll_params =
            json!({ "name": self.config.poll_tool, "arguments": { "task_id": notion_id } }).to_string();
        let mut unreadable = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.step()) => {}
                _ = stopped(&mut stop) => {
                    tracing::info!(task_id, notion_task = %notion_id, "stopped polling; Notion has no cancel, so its operation may still finish");
                    return;
                }
            }
            let reply = tokio::select! {
                r = self.call(upstream, task_id, &poll_params, false) => r,
                _ = stopped(&mut stop) => return,
            };
            let raw = match reply {
                Ok(Reply::Result(raw)) => raw,
                other => {
                    count_request(task_id, "poll", "error");
                    return finish_other(engine, task_id, other).await;
                }
            };
            let answer = classify(&raw, default_wait);
            count_request(task_id, "poll", poll_outcome(&answer));
            match answer {
                NotionAnswer::RateLimited(wait) => {
                    tracing::info!(
                        task_id,
                        wait_ms = wait.as_millis() as u64,
                        "Notion rate limited a poll; every poll waits"
                    );
                    self.scheduler.pause_for(wait);
                }
                NotionAnswer::Status { status, attempt, result, error } => match status.as_str() {
                    "succeeded" => {
                        let meta = json!({ "io.mcp-asyncify/notion": { "task_id": notion_id, "async_task": envelope } });
                        let body = succeeded_result(result, meta);
                        let raw = RawValue::from_string(body.to_string()).expect("valid JSON");
                        engine.finish(task_id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await;
                        return;
                    }
                    "failed" => {
                        let error =
                            error.unwrap_or_else(|| json!({ "message": "Notion reported the task failed" }));
                        let message = error.get("message").and_then(Value::as_str).map(str::to_owned);
                        let body = json!({
                            "content": [{ "type": "text", "text": json!({ "error": error }).to_string() }],
                            "structuredContent": { "error": error },
                            "isError": true,
                            "_meta": { "io.mcp-asyncify/notion": { "task_id": notion_id, "async_task": envelope } },
                        });
                        let raw = RawValue::from_string(body.to_string()).expect("valid JSON");
                        let message = Some(format!("Notion task failed: {}", message.unwrap_or_default()));
                        engine.finish(task_id, TaskStatus::Failed, message, Some(Outcome::Result(raw))).await;
                        return;
                    }
                    other => {
                        let mut message = format!("Notion task {notion_id}: {other}");
                        if let Some(a) = attempt {
                            message.push_str(&format!(" (attempt {a})"));
                        }
                        engine.update_working(task_id, Some(message), Some(self.cadence(&backoff))).await;
                    }
                },
                NotionAnswer::AsyncTask { .. } | NotionAnswer::Final => {
                    unreadable += 1;
                    let shown: String = raw.get().chars().take(300).collect();
                    tracing::warn!(task_id, notion_task = %notion_id, answer = %shown, unreadable, "could not read Notion's poll answer; polling again");
                }
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
    ) -> Result<Reply, UpstreamError> {
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
        let reply = upstream.request("tools/call", Some(&params), None).await;
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

fn start_outcome(answer: Option<&NotionAnswer>) -> &'static str {
    match answer {
        None => "error",
        Some(NotionAnswer::RateLimited(_)) => "rate_limited",
        Some(NotionAnswer::AsyncTask { .. }) => "async_task",
        Some(_) => "sync",
    }
}

fn poll_outcome(answer: &NotionAnswer) -> &'static str {
    match answer {
        NotionAnswer::RateLimited(_) => "rate_limited",
        NotionAnswer::Status { status, .. } => match status.as_str() {
            "queued" => "queued",
            "running" => "running",
            "retrying" => "retrying",
            "succeeded" => "succeeded",
            "failed" => "failed",
            _ => "other",
        },
        _ => "unreadable",
    }
}

async fn stopped(stop: &mut oneshot::Receiver<()>) {
    if stop.await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn finish_result(engine: &TaskEngine, task_id: &str, raw: Box<RawValue>) {
    let failed = serde_json::from_str::<Map<String, Value>>(raw.get())
        .ok()
        .and_then(|m| m.get("isError").and_then(Value::as_bool))
        .unwrap_or(false);
    let (status, message) = match failed {
        true => {
            let error =
                payload(&raw).map(|p| p.get("error").and_then(Value::as_object).cloned().unwrap_or(p));
            let message = match error {
                Some(e) => format!(
                    "Notion error {}: {}",
                    e.get("code").and_then(Value::as_str).unwrap_or("unknown"),
                    e.get("message").and_then(Value::as_str).unwrap_or("")
                ),
                None => "The tool returned an error result (isError: true).".to_owned(),
            };
            (TaskStatus::Failed, Some(message))
        }
        false => (TaskStatus::Completed, None),
    };
    engine.finish(task_id, status, message, Some(Outcome::Result(raw))).await;
}

async fn finish_other(engine: &TaskEngine, task_id: &str, reply: Result<Reply, UpstreamError>) {
    match reply {
        Ok(Reply::Result(raw)) => finish_result(engine, task_id, raw).await,
        Ok(Reply::Error(raw)) => {
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
/// `structuredContent` when it is an object (the only shape `structuredContent` may have). A success
/// with no result still says so, never `structuredContent: null`.
fn succeeded_result(result: Option<Value>, meta: Value) -> Value {
    let mut body = match result {
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
    body["_meta"] = meta;
    body
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_success_without_a_result_is_still_a_valid_tool_result() {
        for result in [None, Some(Value::Null), Some(json!([1, 2]))] {
            let body = succeeded_result(result.clone(), json!({}));
            assert!(body.get("structuredContent").is_none(), "{result:?}: {body}");
            assert!(!body["content"][0]["text"].as_str().unwrap().is_empty(), "{body}");
            assert_eq!(body["isError"], false);
        }
        let body = succeeded_result(Some(json!({"page": {"id": "p"}})), json!({}));
        assert_eq!(body["structuredContent"]["page"]["id"], "p");
    }
    use super::*;

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn reads_the_envelope_from_text_or_structured_content_keeping_unknown_fields() {
        let env = json!({"async_task": {"task_id": "n1", "suggested_backoff_ms": 800, "estimated_ms": 5}});
        let text = raw(json!({"content": [{"type": "text", "text": env.to_string()}]}));
        let structured = raw(json!({"content": [], "structuredContent": env}));
        for r in [text, structured] {
            match classify(&r, Duration::from_secs(1)) {
                NotionAnswer::AsyncTask { task_id, backoff, envelope } => {
                    assert_eq!(task_id, "n1");
                    assert_eq!(backoff, Some(Duration::from_millis(800)));
                    assert_eq!(envelope["estimated_ms"], 5);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn reads_statuses_and_rate_limits() {
        let s = raw(json!({"structuredContent": {"task_id": "n1", "status": "retrying", "attempt": 2}}));
        assert_eq!(
            classify(&s, Duration::ZERO),
            NotionAnswer::Status { status: "retrying".into(), attempt: Some(2), result: None, error: None }
        );
        let limited = raw(json!({"isError": true, "content": [{"type": "text",
            "text": json!({"object": "error", "status": 429, "code": "rate_limited", "retry_after": 2}).to_string()}]}));
        assert_eq!(classify(&limited, Duration::ZERO), NotionAnswer::RateLimited(Duration::from_secs(2)));
        let plain = raw(json!({"content": [{"type": "text", "text": "page created"}]}));
        assert_eq!(classify(&plain, Duration::ZERO), NotionAnswer::Final);
    }
}
