//! Transitions: the status machine's moves, the task's own updates (message, cadence, upstream id,
//! backdating), cancellation, and what each transition records (audit line, metrics, span).

use super::{CancelError, StatusEvent, TaskEngine, now_ms};
use crate::tasks::model::{Outcome, TaskRecord, TaskStatus};
use crate::tasks::owner::owner_tag;
use crate::tasks::store::StoreError;
use crate::telemetry::{self, metrics::task_attrs};
use opentelemetry::KeyValue;
use std::time::{Duration, SystemTime};

impl TaskEngine {
    /// The task stands for work that began at `began` (a call handed off after it had run a while):
    /// its `createdAt`, age and duration count from there. Only moves `createdAt` earlier; the expiry
    /// does not move.
    pub async fn backdate(&self, id: &str, began: SystemTime) -> Option<TaskRecord> {
        let changed = self
            .store
            .update(id, &|r| {
                if began >= r.created_at {
                    return false;
                }
                // The expiry stays where it was promised: the ttl grows by what createdAt moved.
                // (In whole milliseconds, the ttl's unit.)
                let moved = r.created_at.duration_since(began).unwrap_or_default().as_millis() as u64;
                r.ttl_ms += moved;
                r.created_at -= Duration::from_millis(moved);
                true
            })
            .await;
        self.ok_or_log(id, changed).map(|(_, record)| record)
    }

    /// Moves a live task between `working` and `input_required`, with an optional message.
    pub async fn set_status(
        &self,
        id: &str,
        status: TaskStatus,
        message: Option<String>,
    ) -> Option<TaskRecord> {
        debug_assert!(!status.is_terminal());
        self.transition(id, status, message, None).await
    }

    /// Updates what a working task says about itself (its message and the real polling cadence); a new
    /// message is announced like a transition.
    pub async fn update_working(
        &self,
        id: &str,
        message: Option<String>,
        poll_interval_ms: Option<u64>,
    ) -> Option<TaskRecord> {
        let now = now_ms();
        let changed = self
            .store
            .update(id, &|r| {
                if r.status.is_terminal() {
                    return false;
                }
                r.status_message = message.clone();
                if let Some(ms) = poll_interval_ms {
                    r.poll_interval_ms = ms;
                }
                r.last_updated_at = now.max(r.created_at);
                true
            })
            .await;
        let (before, record) = self.ok_or_log(id, changed)?;
        if before.status_message != record.status_message {
            tracing::info!(
                task_id = %record.id, tool = %record.tool, origin = record.origin.as_str(),
                owner = %owner_tag(&record.owner), status = record.status.as_str(),
                message = record.status_message.as_deref().unwrap_or(""), "task progress"
            );
            let _ = self.events.send(StatusEvent { owner: record.owner.clone(), task: record.clone() });
        }
        Some(record)
    }

    /// Remembers the upstream's own id of the task's work (Notion's async task id), so that a
    /// restarted proxy resumes polling it.
    pub async fn bind_upstream(&self, id: &str, upstream_task: &str) -> Option<TaskRecord> {
        let changed = self
            .store
            .update(id, &|r| {
                if r.status.is_terminal() || r.upstream_task.as_deref() == Some(upstream_task) {
                    return false;
                }
                r.upstream_task = Some(upstream_task.to_owned());
                true
            })
            .await;
        self.ok_or_log(id, changed).map(|(_, after)| after)
    }

    fn ok_or_log(
        &self,
        id: &str,
        changed: Result<Option<(TaskRecord, TaskRecord)>, StoreError>,
    ) -> Option<(TaskRecord, TaskRecord)> {
        changed.unwrap_or_else(|e| {
            tracing::error!(task_id = %id, error = %e, "cannot change a task in the store");
            None
        })
    }

    /// Ends a task with its outcome. Does nothing if it already ended (a cancelled task stays cancelled
    /// even if its work completes).
    pub async fn finish(
        &self,
        id: &str,
        status: TaskStatus,
        message: Option<String>,
        outcome: Option<Outcome>,
    ) -> Option<TaskRecord> {
        debug_assert!(status.is_terminal());
        let record = self.transition(id, status, message, outcome).await?;
        self.cancels.remove(id);
        Some(record)
    }

    async fn transition(
        &self,
        id: &str,
        status: TaskStatus,
        message: Option<String>,
        outcome: Option<Outcome>,
    ) -> Option<TaskRecord> {
        let now = now_ms();
        let changed = self
            .store
            .update(id, &|r| {
                if !r.status.can_become(status) {
                    return false;
                }
                if r.status != status {
                    r.state_since = now.max(r.created_at);
                }
                r.status = status;
                r.status_message = message.clone();
                r.last_updated_at = now.max(r.created_at);
                if status.is_terminal() {
                    r.outcome = outcome.clone();
                    r.runner = None;
                }
                true
            })
            .await;
        let (before, record) = self.ok_or_log(id, changed)?;
        let left = (before.status != record.status).then_some((before.status, before.state_since));
        let elapsed_ms =
            record.last_updated_at.duration_since(record.created_at).unwrap_or_default().as_millis() as u64;
        let in_state_ms =
            left.map_or(0, |(_, since)| now.duration_since(since).unwrap_or_default().as_millis() as u64);
        // The audit line: one per transition, with the task, its tool, its owner's hash and the timing.
        tracing::info!(
            target: "mcp_asyncify::audit",
            task_id = %record.id, tool = %record.tool, origin = record.origin.as_str(),
            owner = %owner_tag(&record.owner),
            from = left.map_or(status.as_str(), |(s, _)| s.as_str()), status = status.as_str(),
            in_state_ms, elapsed_ms,
            message = record.status_message.as_deref().unwrap_or(""), "task status"
        );
        self.measure_transition(&record, left);
        self.wake(id, status.is_terminal());
        let _ = self.events.send(StatusEvent { owner: record.owner.clone(), task: record.clone() });
        Some(record)
    }

    /// Records a transition in the task metrics and the task's span.
    fn measure_transition(&self, record: &TaskRecord, left: Option<(TaskStatus, SystemTime)>) {
        let m = telemetry::metrics();
        let [tool, origin, version] =
            task_attrs(&record.tool, record.origin.as_str(), record.generation.protocol_version());
        if let Some((old, since)) = left {
            let spent = record.state_since.duration_since(since).unwrap_or_default();
            let state = KeyValue::new("asyncify.task.state", old.as_str());
            m.task_state.record(spent.as_secs_f64(), &[tool.clone(), origin.clone(), version.clone(), state]);
            m.task_active.add(-1, &[KeyValue::new("asyncify.task.status", old.as_str())]);
            if !record.status.is_terminal() {
                m.task_active.add(1, &[KeyValue::new("asyncify.task.status", record.status.as_str())]);
            }
        }
        let mut event = vec![KeyValue::new("asyncify.task.status", record.status.as_str())];
        if let Some(msg) = &record.status_message {
            event.push(KeyValue::new("asyncify.task.status_message", msg.clone()));
        }
        telemetry::trace::task_event(&record.id, "status", event);
        if record.status.is_terminal() && left.is_some() {
            let total = record.last_updated_at.duration_since(record.created_at).unwrap_or_default();
            let status = KeyValue::new("asyncify.task.status", record.status.as_str());
            m.task_duration.record(total.as_secs_f64(), &[tool, origin, version, status]);
            telemetry::trace::task_ended(&record.id, record.status.as_str());
        }
    }

    /// `tasks/cancel`: marks the task cancelled (before answering, as the spec requires) and stops its
    /// work (here, or through the store on the replica that runs it).
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<TaskRecord, CancelError> {
        let current =
            self.try_get(owner, id).await.map_err(CancelError::Store)?.ok_or(CancelError::NotFound)?;
        if current.status.is_terminal() {
            return Err(CancelError::Terminal(current.status.as_str()));
        }
        // Take the stop signal first: finishing the task drops it.
        let stop = self.cancels.remove(id).map(|(_, stop)| stop);
        match self
            .finish(id, TaskStatus::Cancelled, Some("The task was cancelled by request.".into()), None)
            .await
        {
            Some(record) => {
                if let Some(stop) = stop {
                    stop();
                }
                Ok(record)
            }
            // It ended between the two looks (or the store failed).
            None => {
                if let Some(stop) = stop {
                    self.cancels.insert(id.to_owned(), stop);
                }
                match self.try_get(owner, id).await.map_err(CancelError::Store)? {
                    Some(r) if r.status.is_terminal() => Err(CancelError::Terminal(r.status.as_str())),
                    Some(_) => Err(CancelError::Store(StoreError::Unavailable {
                        store: self.store.describe(),
                        reason: "the cancellation could not be stored".into(),
                    })),
                    None => Err(CancelError::NotFound),
                }
            }
        }
    }
}
