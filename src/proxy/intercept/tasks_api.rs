//! The `tasks/*` methods, each answered from the engine (or passed to an upstream with tasks of its own).

use super::{Decision, Interceptor, Rewrite, lookup};
use crate::jsonrpc::{self, Id, code};
use crate::tasks::engine::CancelError;
use crate::tasks::model::{Generation, Origin, Outcome, RELATED_TASK, TaskRecord, with_related_task};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// `tasks/result` of a cancelled task: it has no result (the spec leaves the payload open).
const CANCELLED_CODE: i64 = -32800;

impl Interceptor {
    pub(super) async fn on_tasks_method(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
    ) -> Decision {
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
        let local = self.engine.get(&self.owner, &task_id).await;
        // The upstream's own task: seen by this session, recorded (by this process or an earlier one),
        // or an id we do not know, which an upstream with tasks may (unless it is another owner's).
        let native = match &local {
            Some(record) => record.origin == Origin::Native,
            None => {
                self.tasks.native_tasks.contains_key(&task_id)
                    || (self.facts().tools_call && !self.engine.owned_by_another(&self.owner, &task_id).await)
            }
        };
        if native {
            if method == "tasks/cancel" && !self.facts().cancel {
                // The proxy declares `cancel` for its own tasks; the upstream did not for its own.
                let msg = format!(
                    "Task {task_id} is run by the upstream server, which cannot cancel its tasks (it does not declare tasks.cancel); it runs to its end"
                );
                return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
            }
            let rewrite = match method {
                "tasks/cancel" => Rewrite::None,
                _ => Rewrite::NativeTask { task_id },
            };
            return Decision::Forward(rewrite);
        }
        let not_found =
            |verb: &str| format!("Failed to {verb} task: Task not found (unknown id, or it expired)");
        match method {
            "tasks/get" => match local {
                Some(record) => self.reply_result(id, &Value::Object(record.to_wire())).await,
                None => self.reply_error(id, code::INVALID_PARAMS, &not_found("retrieve")).await,
            },
            "tasks/cancel" => match self.engine.cancel(&self.owner, &task_id).await {
                Ok(record) => self.reply_result(id, &Value::Object(record.to_wire())).await,
                Err(e @ CancelError::Terminal(_)) => {
                    self.reply_error(id, code::INVALID_PARAMS, &e.to_string()).await
                }
                Err(CancelError::NotFound) => {
                    self.reply_error(id, code::INVALID_PARAMS, &not_found("cancel")).await
                }
                Err(e @ CancelError::Store(_)) => {
                    self.reply_error(id, code::INTERNAL_ERROR, &e.to_string()).await
                }
            },
            _ => {
                if local.is_none() {
                    return self.reply_error(id, code::INVALID_PARAMS, &not_found("retrieve")).await;
                }
                // tasks/result blocks until the task ends: wait off the routing loop.
                let this = self.clone();
                let id = id.clone();
                self.tasks.answering.spawn(async move {
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
                    Ok(Outcome::Result(raw)) => {
                        let mut page: Map<String, Value> =
                            serde_json::from_str(raw.get()).unwrap_or_default();
                        if let Some(Value::String(next)) = page.get("nextCursor") {
                            let next = format!("upstream:{next}");
                            page.insert("nextCursor".into(), Value::String(next));
                        }
                        jsonrpc::result_response(&id, &Value::Object(page).to_string())
                    }
                    Ok(Outcome::Error(raw)) => jsonrpc::error_object_response(&id, raw.get()),
                    Err(e) => jsonrpc::error_response(Some(&id), code::INTERNAL_ERROR, &e.to_string(), None),
                };
                this.client.send(line).await;
            });
            return Decision::Handled;
        }
        let (tasks, next) = match self.engine.list(&self.owner, cursor.as_deref()).await {
            Ok(page) => page,
            Err(e) => return self.reply_error(id, code::INVALID_PARAMS, &e.to_string()).await,
        };
        let natives: Vec<String> =
            tasks.iter().filter(|t| t.origin == Origin::Native).map(|t| t.id.clone()).collect();
        // The upstream's own tasks among ours: an upstream that lists its tasks shows them on its pages
        // (they are left out of ours); else each is shown as its `tasks/get` tells it now (those it no
        // longer knows are gone).
        let page = move |mut views: HashMap<String, Value>| {
            let tasks: Vec<Value> = tasks
                .into_iter()
                .filter_map(|t| match t.origin {
                    Origin::Native => views.remove(&t.id),
                    _ => Some(Value::Object(t.to_wire())),
                })
                .collect();
            let mut result = json!({ "tasks": tasks });
            match (next, upstream_lists) {
                (Some(next), _) => result["nextCursor"] = Value::String(next),
                (None, true) => result["nextCursor"] = Value::String("upstream:".into()),
                (None, false) => {}
            }
            result
        };
        if natives.is_empty() || upstream_lists {
            return self.reply_result(id, &page(HashMap::new())).await;
        }
        let this = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let result = page(this.native_tasks_now(natives).await);
            this.client.send(jsonrpc::result_response(&id, &result.to_string())).await;
        });
        Decision::Handled
    }

    /// Records the upstream's task if `result` is a `CreateTaskResult` (2025-11-25 `{task}`, or
    /// 2026-07-28's flat `resultType: "task"`): durable before the client sees it, so a restarted
    /// proxy still routes its `tasks/*` to the upstream and lists it.
    pub(super) async fn record_native(&self, tool: &str, result: &RawValue, generation: Generation) {
        let Ok(created) = serde_json::from_str::<Map<String, Value>>(result.get()) else { return };
        let task = match created.get("task") {
            Some(Value::Object(task)) => task,
            _ if created.get("resultType").and_then(Value::as_str) == Some("task") => &created,
            _ => return,
        };
        let Some(task_id) = task.get("taskId").and_then(Value::as_str) else { return };
        self.tasks.native_tasks.insert(task_id.to_owned(), ());
        if let Err(e) = self.engine.adopt_native(&self.owner, tool, task, generation).await {
            tracing::warn!(
                task_id, error = %e,
                "cannot record the upstream's task in the store: this session still routes it, a restarted proxy will not"
            );
        }
    }
}

impl Interceptor {
    /// The upstream's own tasks `ids`, each as the upstream's `tasks/get` gives it now, by id; a task
    /// the upstream no longer knows is forgotten (and left out).
    async fn native_tasks_now(self: &Arc<Self>, ids: Vec<String>) -> HashMap<String, Value> {
        let mut asks = tokio::task::JoinSet::new();
        for task_id in ids {
            let this = self.clone();
            asks.spawn(async move {
                let params = json!({ "taskId": task_id }).to_string();
                let got =
                    this.upstream.request("tasks/get", Some(&params), Some(Duration::from_secs(10))).await;
                (task_id, got)
            });
        }
        let mut found = HashMap::new();
        while let Some(Ok((task_id, got))) = asks.join_next().await {
            let task_id = task_id.as_str();
            match got {
                Ok(Outcome::Result(raw)) => match serde_json::from_str::<Value>(raw.get()) {
                    Ok(task) if task.get("taskId").is_some() => {
                        found.insert(task_id.to_owned(), task);
                    }
                    _ => tracing::warn!(
                        task_id,
                        "the upstream's tasks/get gave no task; left out of tasks/list"
                    ),
                },
                Ok(Outcome::Error(e)) if jsonrpc::error_code_of(e.get()) == Some(code::INVALID_PARAMS) => {
                    self.tasks.native_tasks.remove(task_id);
                    self.engine.forget_native(task_id).await;
                }
                Ok(Outcome::Error(e)) => {
                    tracing::warn!(task_id, error = %e.get(), "the upstream's tasks/get failed; left out of tasks/list")
                }
                Err(e) => {
                    tracing::warn!(task_id, error = %e, "the upstream's tasks/get failed; left out of tasks/list")
                }
            }
        }
        found
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
