//! Help for clients that do not speak tasks: progress keep-alives, and the sync-deadline hand-off with
//! the two tools that fetch handed-off work.

use super::{Interceptor, Rewrite, lookup};
use crate::jsonrpc::{self, Id};
use crate::tasks::model::{Generation, Origin, Outcome, RELATED_TASK, TaskStatus, with_related_task};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a call is answered when it is handed off to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    /// A normal tool result saying the work goes on as task T (clients that do not speak tasks; a
    /// 2026-07-28 one gets `resultType: "complete"` on it).
    Text {
        /// The call is a 2026-07-28 request.
        modern: bool,
    },
    /// A 2026-07-28 `CreateTaskResult` (`resultType: "task"`), for a client that declared the Tasks
    /// extension.
    Task,
}

/// The tool a model calls to check on work handed off at the sync deadline.
pub const STATUS_TOOL: &str = "asyncify_task_status";
/// The tool a model calls to fetch the result of work handed off at the sync deadline.
pub const RESULT_TOOL: &str = "asyncify_task_result";

impl Interceptor {
    /// Notes the progress an upstream reported, so keep-alives for the same token keep increasing.
    pub fn on_upstream_progress(&self, params: Option<&RawValue>) {
        if self.tasks.progress_seen.is_empty() {
            return;
        }
        let Some(params) = params else { return };
        let (Some(token), Some(progress)) = (
            lookup(params.get(), &["progressToken"]),
            lookup(params.get(), &["progress"]).and_then(|p| p.as_f64()),
        ) else {
            return;
        };
        if let Some(mut seen) = self.tasks.progress_seen.get_mut(&token.to_string()) {
            *seen = seen.max(progress);
        }
    }

    pub(super) fn watch_plain_call(
        self: &Arc<Self>,
        id: Id,
        tool: String,
        token: Option<String>,
        style: HandOff,
    ) {
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
            self.tasks.progress_seen.insert(token.clone(), 0.0);
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
                    this.hand_off(&id, &tool, start.into_std(), style).await;
                    break;
                }
                if let (Some((token, _, every)), Some(k)) = (&keepalive, next_keepalive.as_mut()) {
                    this.send_keepalive(token, &tool, start.elapsed()).await;
                    *k += *every;
                }
            }
            if let Some((token, _, _)) = &keepalive {
                this.tasks.progress_seen.remove(token);
            }
        });
    }

    async fn send_keepalive(&self, token: &str, tool: &str, elapsed: Duration) {
        // Progress must increase; stay just above the last value the upstream reported.
        let value = match self.tasks.progress_seen.get_mut(token) {
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
        crate::telemetry::metrics()
            .keepalives
            .add(1, &[opentelemetry::KeyValue::new("gen_ai.tool.name", tool.to_owned())]);
        self.client.send(jsonrpc::notification("notifications/progress", Some(&params))).await;
    }

    /// The sync deadline (or a 2026-07-28 task window) passed: answer the client now and let the work go
    /// on as a task. Returns the task, unless the answer came first (or no task could be made).
    pub(super) async fn hand_off(
        self: &Arc<Self>,
        id: &Id,
        tool: &str,
        started: Instant,
        style: HandOff,
    ) -> Option<String> {
        self.hand_off_as(id, id, tool, started, style).await
    }

    /// Hands off the upstream call `id`, answering the client's request `reply_to`: the call itself,
    /// or a 2026-07-28 retry of it after a round of questions.
    pub(super) async fn hand_off_as(
        self: &Arc<Self>,
        id: &Id,
        reply_to: &Id,
        tool: &str,
        started: Instant,
        style: HandOff,
    ) -> Option<String> {
        let generation = match style {
            HandOff::Text { modern: false } => Generation::Legacy,
            _ => Generation::Modern,
        };
        let record = match self.engine.create(&self.owner, tool, Origin::Local, generation, None).await {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(%id, tool, error = %e, "cannot hand off a call past the sync deadline; it stays synchronous");
                return None;
            }
        };
        if style == HandOff::Task {
            self.tasks.modern_tasks.insert(record.id.clone(), Default::default());
        }
        // The task is the call, which began before the deadline: its age counts from there.
        let began = std::time::SystemTime::now().checked_sub(started.elapsed());
        let record = match began {
            Some(b) => self.engine.backdate(&record.id, b).await.unwrap_or(record),
            None => record,
        };
        self.tasks.started.insert(record.id.clone(), ());
        if !self.pending.set_rewrite(id, Rewrite::HandedOff { task_id: record.id.clone() }) {
            // The answer came in the meantime: no task needed.
            self.tasks.modern_tasks.remove(&record.id);
            self.engine.discard(&record.id).await;
            return None;
        }
        self.stop_upstream_call_with_task(id, &record.id).await;
        if style == HandOff::Task {
            tracing::info!(%id, tool, task_id = %record.id, waited_ms = started.elapsed().as_millis() as u64, "a 2026-07-28 call became a task");
            self.client
                .send(jsonrpc::result_response(reply_to, &Value::Object(record.to_created()).to_string()))
                .await;
            return Some(record.id);
        }
        crate::telemetry::metrics()
            .handoffs
            .add(1, &[opentelemetry::KeyValue::new("gen_ai.tool.name", tool.to_owned())]);
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
        let body = match style {
            HandOff::Text { modern: true } => jsonrpc::mark_complete(&result.to_string()),
            _ => result.to_string(),
        };
        self.client.send(jsonrpc::result_response(reply_to, &body)).await;
        Some(record.id)
    }

    /// Cancelling a handed-off task cancels its call upstream, which knows it by the client's id.
    async fn stop_upstream_call_with_task(self: &Arc<Self>, id: &Id, task_id: &str) {
        let this = Arc::downgrade(self);
        let id = id.clone();
        self.engine
            .on_stop(
                task_id,
                Box::new(move || {
                    let Some(this) = this.upgrade() else { return };
                    // The call no longer counts as in flight (nor asks anything of anyone).
                    this.pending.abandon_client(&id);
                    tokio::spawn(async move { this.cancel_upstream(&id, "the task was cancelled").await });
                }),
            )
            .await;
    }

    pub(super) async fn run_handoff_tool(
        &self,
        id: &Id,
        tool: &str,
        arguments: Option<&Value>,
        modern: bool,
    ) {
        let Some(task_id) =
            arguments.and_then(|a| a.get("taskId")).and_then(Value::as_str).map(str::to_owned)
        else {
            // An input error the model can correct: name the argument it needs.
            let got = arguments.map_or_else(|| "no arguments".to_owned(), Value::to_string);
            let text = format!(
                "Invalid arguments for {tool}: it needs \"taskId\" (a string, the id given when the call was handed off), e.g. {{\"taskId\": \"…\"}}; got {got}."
            );
            self.client.send(era_result(id, &tool_text(&text, true).to_string(), modern)).await;
            return;
        };
        let Some(record) = self.engine.get(&self.owner, &task_id).await else {
            let text = format!(
                "No task with id {task_id:?}: the id is wrong, or the task expired and its result is gone."
            );
            self.client.send(era_result(id, &tool_text(&text, true).to_string(), modern)).await;
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
                Err(_) => self.engine.get(&self.owner, &task_id).await.unwrap_or(record),
            }
        } else {
            record
        };
        let line = match (tool, record.status, &record.outcome) {
            (RESULT_TOOL, TaskStatus::Completed | TaskStatus::Failed, Some(Outcome::Result(raw))) => {
                let body = with_related_task(raw.get(), &record.id).unwrap_or_else(|_| raw.get().to_owned());
                era_result(id, &body, modern)
            }
            (RESULT_TOOL, TaskStatus::Failed, Some(Outcome::Error(raw))) => {
                let text = format!("Task {} failed: {}", record.id, raw.get());
                era_result(id, &tool_text(&text, true).to_string(), modern)
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
                era_result(id, &result.to_string(), modern)
            }
        };
        self.client.send(line).await;
    }
}

/// A result line, with `resultType: "complete"` for a 2026-07-28 request.
pub(super) fn era_result(id: &Id, result: &str, modern: bool) -> Vec<u8> {
    match modern {
        true => jsonrpc::result_response(id, &jsonrpc::mark_complete(result)),
        false => jsonrpc::result_response(id, result),
    }
}

fn tool_text(text: &str, is_error: bool) -> Value {
    json!({ "content": [{ "type": "text", "text": text }], "isError": is_error })
}

pub(super) fn handoff_tools() -> [Value; 2] {
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
