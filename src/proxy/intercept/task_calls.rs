//! The upstream calls that run the proxy's own tasks: started, answered, failed, cancelled, their
//! progress tagged with their task, and the task finished with what the call gave.

use super::*;

impl Interceptor {
    /// Sends a task's call upstream. No future waits for it: the router hands the answer to
    /// [`Self::task_call_answered`], and cancelling the task cancels the call upstream.
    pub(super) async fn start_local_task(self: &Arc<Self>, task_id: &str, params: &str) {
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

    pub(super) async fn task_call_failed(&self, task_id: &str, error: UpstreamError) {
        self.call_ended(task_id);
        self.finish_with_reply(task_id, Err(error)).await;
    }

    /// A task's call is no longer in flight (answered, failed, or cancelled).
    pub(super) fn call_ended(&self, task_id: &str) {
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

    pub(super) async fn cancel_upstream(&self, request_id: &Id, reason: &str) {
        let params = format!(
            "{{\"requestId\":{},\"reason\":{}}}",
            request_id.as_json(),
            serde_json::to_string(reason).expect("a string serialises")
        );
        self.upstream.notify("notifications/cancelled", Some(&params)).await;
    }

    /// Ends a task with the upstream's answer: results as `completed` (or `failed` when `isError`),
    /// JSON-RPC errors and a vanished upstream as `failed`.
    pub(super) async fn finish_with_reply(&self, task_id: &str, reply: Result<Outcome, UpstreamError>) {
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
}
