//! The Tasks extension's methods for a 2026-07-28 client: `tasks/get` (the `DetailedTask` with its
//! result, error or input requests inline), `tasks/update` (answers to the upstream's held
//! requests), `tasks/cancel` (an ack); on the proxy's own tasks and on those a 2025-11-25 upstream
//! runs itself.

use crate::jsonrpc::{self, Id, code};
use crate::proxy::intercept::{Decision, Interceptor, Rewrite};
use crate::tasks::engine::CancelError;
use crate::tasks::model::{Origin, Outcome, TaskStatus};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The requests a 2026-07-28 task waits on, by key (`inputRequests` in `tasks/get`).
pub(in crate::proxy::intercept) type InputRequests = BTreeMap<String, HeldRequest>;

/// An upstream request held for a 2026-07-28 client (in a task's `inputRequests`, or a plain call's
/// `input_required` answer).
pub(in crate::proxy::intercept) struct HeldRequest {
    /// The upstream's id for it (its answer goes back under this id).
    pub(in crate::proxy::intercept) upstream_id: Id,
    /// `{method, params}`, as the client is shown it.
    pub(in crate::proxy::intercept) request: Value,
}

impl HeldRequest {
    /// The upstream's request `id`, shown as `{method, params}`.
    pub(in crate::proxy::intercept) fn new(id: &Id, method: &str, params: Option<&RawValue>) -> Self {
        let mut params =
            params.and_then(|p| serde_json::from_str::<Value>(p.get()).ok()).unwrap_or_else(|| json!({}));
        // The upstream's progress token for its own request means nothing to the client.
        if let Some(meta) = params.get_mut("_meta").and_then(Value::as_object_mut) {
            meta.remove("progressToken");
            if meta.is_empty() {
                params.as_object_mut().map(|p| p.remove("_meta"));
            }
        }
        HeldRequest { upstream_id: id.clone(), request: json!({ "method": method, "params": params }) }
    }
}

/// Keys of input requests: never reused, in any task or call, for the life of the process.
static INPUT_KEYS: AtomicU64 = AtomicU64::new(1);

/// A fresh input request key.
pub(in crate::proxy::intercept) fn input_key() -> String {
    format!("input-{}", INPUT_KEYS.fetch_add(1, Ordering::Relaxed))
}

impl Interceptor {
    /// `tasks/get`, `tasks/update` and `tasks/cancel` of a client that declared the extension.
    pub(super) async fn on_modern_tasks_method(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
    ) -> Decision {
        let params =
            params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok()).unwrap_or_default();
        let Some(task_id) = params.get("taskId").and_then(Value::as_str) else {
            return self
                .reply_error(id, code::INVALID_PARAMS, &format!("{method} needs params.taskId (a string)"))
                .await;
        };
        let not_found = || format!("Task not found: {task_id:?} is unknown or expired");
        let record = self.engine.get(&self.owner, task_id).await;
        let Some(record) = record.filter(|r| r.origin != Origin::Native) else {
            // The upstream's own task (seen by this session, or recorded by an earlier process), or an
            // id we do not know, which a 2026-07-28 upstream with tasks may.
            let native = self.tasks.native_tasks.contains_key(task_id)
                || self.engine.native(&self.owner, task_id).await.is_some();
            if native && let Err(why) = self.ensure_initialized().await {
                let msg = format!("The upstream server could not be initialized: {why}");
                return self.reply_error(id, code::INTERNAL_ERROR, &msg).await;
            }
            if self.upstream_runs_tasks()
                && (native || !self.engine.owned_by_another(&self.owner, task_id).await)
            {
                let rewrite = match method {
                    "tasks/get" => Rewrite::NativeTask { task_id: task_id.to_owned() },
                    _ => Rewrite::None,
                };
                return Decision::Forward(rewrite); // the upstream's own task
            }
            if native {
                let this = self.clone();
                let (id, method, task_id) = (id.clone(), method.to_owned(), task_id.to_owned());
                tokio::spawn(async move { this.on_native_task(&id, &method, &task_id).await });
                return Decision::Handled;
            }
            return self.reply_error(id, code::INVALID_PARAMS, &not_found()).await;
        };
        // A Notion task taken over from a stopped proxy resumes once the upstream is initialized; a
        // 2026-07-28 client has no handshake, so its look at the task initializes it.
        if record.origin == Origin::Notion
            && !record.status.is_terminal()
            && let Err(why) = self.ensure_initialized().await
        {
            tracing::warn!(task_id, why, "cannot initialize the upstream to resume a Notion task");
        }
        let ack = json!({ "resultType": "complete" });
        match method {
            "tasks/get" => {
                let detailed = record.to_detailed(self.input_requests_of(task_id));
                self.reply_result(id, &Value::Object(detailed)).await
            }
            "tasks/cancel" => match self.engine.cancel(&self.owner, task_id).await {
                // Cancelling an ended task is acknowledged all the same (it is idempotent in 2026-07-28).
                Ok(_) | Err(CancelError::Terminal(_)) => {
                    self.refuse_held_requests(task_id, "the task was cancelled").await;
                    self.reply_result(id, &ack).await
                }
                Err(CancelError::NotFound) => self.reply_error(id, code::INVALID_PARAMS, &not_found()).await,
                Err(e @ CancelError::Store(_)) => {
                    self.reply_error(id, code::INTERNAL_ERROR, &e.to_string()).await
                }
            },
            _ => {
                let responses = match params.get("inputResponses") {
                    Some(Value::Object(r)) => r,
                    other => {
                        let msg = format!(
                            "tasks/update needs params.inputResponses, an object of answers by input request key; got {}",
                            other.map_or("nothing".to_owned(), Value::to_string)
                        );
                        return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
                    }
                };
                self.answer_held_requests(task_id, responses).await;
                self.reply_result(id, &ack).await
            }
        }
    }

    /// The input requests a task waits on, as `tasks/get` shows them.
    pub(in crate::proxy::intercept) fn input_requests_of(&self, task_id: &str) -> Option<Value> {
        let held = self.tasks.modern_tasks.get(task_id)?;
        Some(Value::Object(held.iter().map(|(k, h)| (k.clone(), h.request.clone())).collect()))
    }

    /// Holds an upstream request for a 2026-07-28 task: the task shows it under a fresh key until its
    /// client answers it with `tasks/update`.
    pub(in crate::proxy::intercept) fn hold_input_request(
        &self,
        task_id: &str,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
    ) {
        let key = input_key();
        if let Some(mut held) = self.tasks.modern_tasks.get_mut(task_id) {
            held.insert(key.clone(), HeldRequest::new(id, method, params));
        }
        tracing::info!(task_id, key, method, "a 2026-07-28 task waits for input");
        let message = format!("Waiting for the client to answer {method} (tasks/update).");
        // Called on the routing path, which does not wait for the store: the status follows.
        let (engine, task_id) = (self.engine.clone(), task_id.to_owned());
        tokio::spawn(
            async move { engine.set_status(&task_id, TaskStatus::InputRequired, Some(message)).await },
        );
    }

    /// `tasks/update`: each answer whose key is still outstanding goes upstream; unknown and already
    /// answered keys are ignored. The task resumes once nothing is outstanding.
    async fn answer_held_requests(&self, task_id: &str, responses: &Map<String, Value>) {
        let answered: Vec<(Id, String)> = match self.tasks.modern_tasks.get_mut(task_id) {
            Some(mut held) => responses
                .iter()
                .filter_map(|(key, answer)| held.remove(key).map(|h| (h.upstream_id, answer.to_string())))
                .collect(),
            None => Vec::new(),
        };
        for (upstream_id, answer) in &answered {
            self.upstream.answer(upstream_id, answer).await;
        }
        let outstanding = self.tasks.modern_tasks.get(task_id).is_some_and(|held| !held.is_empty());
        if !answered.is_empty() && !outstanding {
            self.engine.set_status(task_id, TaskStatus::Working, None).await;
        }
    }

    /// Refuses what a task's upstream call still waits on (its task was cancelled).
    async fn refuse_held_requests(&self, task_id: &str, why: &str) {
        let held: Vec<HeldRequest> = match self.tasks.modern_tasks.get_mut(task_id) {
            Some(mut held) => std::mem::take(&mut *held).into_values().collect(),
            None => return,
        };
        for h in held {
            self.upstream.refuse(&h.upstream_id, code::INTERNAL_ERROR, why).await;
        }
    }

    /// The 2025-11-25 upstream's `CreateTaskResult` (`{task: Task}`) for a 2026-07-28 client: flat,
    /// with the extension's field names.
    pub(in crate::proxy::intercept) fn native_created(&self, id: &Id, result: &RawValue) -> Option<Vec<u8>> {
        let created: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
        let task = created.get("task")?.as_object()?;
        let task_id = task.get("taskId")?.as_str()?;
        self.tasks.native_tasks.insert(task_id.to_owned(), ());
        let mut flat = modern_task(task);
        flat.insert("resultType".into(), json!("task"));
        Some(jsonrpc::result_response(id, &Value::Object(flat).to_string()))
    }

    /// `tasks/get`, `tasks/update` or `tasks/cancel` of a 2026-07-28 client on a task the 2025-11-25
    /// upstream runs itself: asked the 2025-11-25 way (`tasks/get`, then `tasks/result` once it
    /// ended, so the result is inline; `tasks/cancel`), answered the 2026-07-28 way.
    async fn on_native_task(&self, id: &Id, method: &str, task_id: &str) {
        let params = json!({ "taskId": task_id }).to_string();
        let ask = |method: &'static str| {
            self.upstream.request(method, Some(&params), Some(Duration::from_secs(30)))
        };
        let ack = jsonrpc::result_response(id, r#"{"resultType":"complete"}"#);
        let line = match method {
            // Its input goes through the 2025-11-25 flow (requests tagged with the task); nothing to
            // update here.
            "tasks/update" => ack,
            // The upstream does not cancel its tasks (no `tasks.cancel`): acknowledged, never sent.
            "tasks/cancel" if !self.facts().cancel => {
                tracing::info!(
                    task_id,
                    "tasks/cancel of an upstream task acknowledged; the upstream cannot cancel its tasks, so it runs to its end"
                );
                ack
            }
            "tasks/cancel" => match ask("tasks/cancel").await {
                Ok(Outcome::Error(e)) if jsonrpc::error_code_of(e.get()) != Some(code::INVALID_PARAMS) => {
                    jsonrpc::error_object_response(id, e.get())
                }
                // Cancelled, or already ended (a 2025-11-25 "terminal" -32602): both an ack now.
                Ok(_) => ack,
                Err(e) => jsonrpc::error_response(Some(id), code::INTERNAL_ERROR, &e.to_string(), None),
            },
            _ => match ask("tasks/get").await {
                Ok(Outcome::Result(raw)) => {
                    let task: Map<String, Value> = serde_json::from_str(raw.get()).unwrap_or_default();
                    let mut detailed = modern_task(&task);
                    detailed.insert("resultType".into(), json!("complete"));
                    if matches!(task.get("status").and_then(Value::as_str), Some("completed" | "failed")) {
                        match ask("tasks/result").await {
                            // A tool result, even with isError, is `completed` in 2026-07-28.
                            Ok(Outcome::Result(r)) => {
                                let mut result: Value = serde_json::from_str(r.get()).unwrap_or(Value::Null);
                                if let Value::Object(m) = &mut result {
                                    m.entry("resultType").or_insert_with(|| json!("complete"));
                                }
                                detailed.insert("status".into(), json!("completed"));
                                detailed.insert("result".into(), result);
                            }
                            Ok(Outcome::Error(e)) => {
                                detailed.insert("status".into(), json!("failed"));
                                detailed.insert(
                                    "error".into(),
                                    serde_json::from_str(e.get()).unwrap_or(Value::Null),
                                );
                            }
                            Err(e) => {
                                let line = jsonrpc::error_response(
                                    Some(id),
                                    code::INTERNAL_ERROR,
                                    &e.to_string(),
                                    None,
                                );
                                self.client.send(line).await;
                                return;
                            }
                        }
                    }
                    jsonrpc::result_response(id, &Value::Object(detailed).to_string())
                }
                Ok(Outcome::Error(e)) => {
                    if jsonrpc::error_code_of(e.get()) == Some(code::INVALID_PARAMS) {
                        // The upstream no longer knows it (expired, or the upstream restarted).
                        self.tasks.native_tasks.remove(task_id);
                        self.engine.forget_native(task_id).await;
                    }
                    jsonrpc::error_object_response(id, e.get())
                }
                Err(e) => jsonrpc::error_response(Some(id), code::INTERNAL_ERROR, &e.to_string(), None),
            },
        };
        self.client.send(line).await;
    }
}

/// A 2025-11-25 `Task` with the 2026-07-28 field names (`ttl` → `ttlMs`, `pollInterval` →
/// `pollIntervalMs`, as integers); every other field kept.
fn modern_task(task: &Map<String, Value>) -> Map<String, Value> {
    task.iter()
        .filter(|(k, _)| k.as_str() != "_meta")
        .map(|(k, v)| match k.as_str() {
            "ttl" => ("ttlMs".to_owned(), v.as_f64().map_or(Value::Null, |ms| json!(ms.round() as u64))),
            "pollInterval" => (
                "pollIntervalMs".to_owned(),
                v.as_f64().map_or(v.clone(), |ms| json!((ms.round() as u64).max(1))),
            ),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}
