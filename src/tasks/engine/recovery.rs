//! Expiry and recovery: the sweep of tasks past their ttl, the sweeper loop (which also keeps this
//! process marked alive), and the take-over of tasks whose process died.

use super::{Orphan, TaskEngine};
use crate::tasks::model::{Outcome, TaskStatus};
use crate::tasks::owner::owner_tag;
use crate::tasks::store::StoreError;
use crate::telemetry::{self, metrics::task_attrs};
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

impl TaskEngine {
    /// Deletes every task whose ttl has elapsed, stopping the work of those still running. Returns how
    /// many were removed.
    pub async fn sweep(&self, now: SystemTime) -> usize {
        let expired = match self.store.expired(now, 10_000).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep expired tasks now; will retry");
                return 0;
            }
        };
        for id in &expired {
            if let Ok(Some(record)) = self.store.remove(id).await {
                let m = telemetry::metrics();
                let attrs =
                    task_attrs(&record.tool, record.origin.as_str(), record.generation.protocol_version());
                m.task_expired.add(1, &attrs);
                if !record.status.is_terminal() {
                    self.stop_work(id);
                    m.task_active.add(-1, &[KeyValue::new("asyncify.task.status", record.status.as_str())]);
                    telemetry::trace::task_ended(id, "expired");
                }
                tracing::info!(
                    task_id = %record.id, tool = %record.tool, owner = %owner_tag(&record.owner),
                    status = record.status.as_str(), "task expired (ttl {} ms) and was deleted", record.ttl_ms
                );
            }
            self.cancels.remove(id);
            // Every waiter wakes and finds the task gone.
            self.wake(id, true);
        }
        expired.len()
    }

    /// Runs [`Self::sweep`] whenever the next task expires (checking at least every `max_sleep`), and
    /// keeps this process marked alive in a shared store.
    pub fn spawn_sweeper(self: &Arc<Self>, max_sleep: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut beat = tokio::time::Instant::now();
            loop {
                let Some(e) = engine.upgrade() else { return };
                let now = SystemTime::now();
                e.sweep(now).await;
                if beat.elapsed() >= HEARTBEAT {
                    beat = tokio::time::Instant::now();
                    // A failed heartbeat is a store fault (reported by the store's health).
                    let _ = e.store.heartbeat(&e.runner).await;
                }
                let wait = match e.store.next_expiry().await {
                    Ok(Some(at)) => at.duration_since(now).unwrap_or_default(),
                    _ => max_sleep,
                }
                .clamp(Duration::from_millis(5), max_sleep.min(HEARTBEAT));
                drop(e);
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// Recovery on start: every unfinished task whose runner is gone (a process that crashed or was
    /// restarted) is taken over by this process. A task with an upstream id of its own (a Notion task)
    /// is returned for the caller to resume; any other lost its upstream call with the process and ends
    /// `failed`, saying so. Returns the tasks to resume.
    pub async fn recover(&self) -> Result<Vec<Orphan>, StoreError> {
        let mut resume = Vec::new();
        for task in self.store.unfinished().await? {
            let Some(runner) = task.runner.clone() else { continue };
            if runner == self.runner || self.store.runner_alive(&runner).await? {
                continue;
            }
            // Take it over, unless another process just did.
            let me = self.runner.clone();
            let claimed = self
                .store
                .update(&task.id, &|r| {
                    if r.status.is_terminal() || r.runner.as_deref() != Some(runner.as_str()) {
                        return false;
                    }
                    r.runner = Some(me.clone());
                    true
                })
                .await?;
            let Some((_, task)) = claimed else { continue };
            telemetry::metrics()
                .task_active
                .add(1, &[KeyValue::new("asyncify.task.status", task.status.as_str())]);
            if task.upstream_task.is_some() {
                tracing::info!(
                    task_id = %task.id, tool = %task.tool, upstream_task = task.upstream_task.as_deref().unwrap_or(""),
                    "recovered a task whose process ended: resuming it"
                );
                resume.push(Orphan { task });
            } else {
                let message = format!(
                    "The proxy that ran this task stopped (crash or restart) while the upstream call of \
                     '{}' was in flight; that call died with it, and its outcome is unknown. Run the tool \
                     again if that is safe.",
                    task.tool
                );
                tracing::warn!(task_id = %task.id, tool = %task.tool, "recovered a task whose upstream call died");
                let error =
                    serde_json::json!({ "code": crate::jsonrpc::code::UPSTREAM_GONE, "message": message });
                let raw = serde_json::value::RawValue::from_string(error.to_string()).expect("valid JSON");
                self.finish(&task.id, TaskStatus::Failed, Some(message), Some(Outcome::Error(raw))).await;
            }
        }
        Ok(resume)
    }
}

/// How often this process marks itself alive in a shared store.
const HEARTBEAT: Duration = Duration::from_secs(3);
