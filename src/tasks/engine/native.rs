//! Tasks the upstream runs itself (MCP Tasks of its own): the proxy keeps a record of each (origin
//! `native`: the upstream's task id, its owner, ttl and creation time; no result, the upstream keeps
//! it), so that after a restart their `tasks/*` still reach the upstream, owner-checked, and
//! `tasks/list` still shows them. Nothing runs them here: the record has no runner, never moves
//! through the status machine, and goes when the upstream says the task is gone or at its ttl.

use super::{MIN_TTL_MS, TaskEngine, now_ms};
use crate::tasks::model::{Generation, Origin, TaskRecord, TaskStatus};
use crate::tasks::owner::owner_tag;
use crate::tasks::store::{Caps, StoreError};
use serde_json::{Map, Value};
use std::time::SystemTime;

impl TaskEngine {
    /// Remembers the upstream's task `task` (a `Task` of 2025-11-25, or the flat task of a 2026-07-28
    /// `CreateTaskResult`) as `owner`'s, durable when this returns. `None` if `task` has no `taskId`,
    /// or the id is already one of the proxy's own tasks.
    pub async fn adopt_native(
        &self,
        owner: &str,
        tool: &str,
        task: &Map<String, Value>,
        generation: Generation,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let Some(id) = task.get("taskId").and_then(Value::as_str) else { return Ok(None) };
        let now = now_ms();
        // The upstream's ttl (`ttl`, or 2026-07-28's `ttlMs`), within ours; none (unlimited) is ours.
        let ttl_ms = ["ttl", "ttlMs"]
            .iter()
            .find_map(|k| task.get(*k).and_then(Value::as_f64))
            .map_or(self.config.max_ttl_ms, |ms| {
                (ms.max(0.0).round() as u64).clamp(MIN_TTL_MS, self.config.max_ttl_ms)
            });
        let poll_interval_ms = ["pollInterval", "pollIntervalMs"]
            .iter()
            .find_map(|k| task.get(*k).and_then(Value::as_f64))
            .map_or(self.config.poll_interval_ms, |ms| ms.max(1.0).round() as u64);
        let created_at = task
            .get("createdAt")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .map_or(now, truncate_ms)
            .min(now);
        let record = TaskRecord {
            id: id.to_owned(),
            owner: owner.into(),
            tool: tool.into(),
            origin: Origin::Native,
            generation,
            // Its status is the upstream's to tell; the record only stays unfinished.
            status: TaskStatus::Working,
            status_message: None,
            created_at,
            last_updated_at: now,
            state_since: now,
            ttl_ms,
            poll_interval_ms,
            outcome: None,
            seq: 0,
            runner: None,
            upstream_task: Some(id.to_owned()),
        };
        // An id seen before (an upstream that numbers its tasks and restarted): the new task replaces
        // the record of the old one; a task of the proxy's own keeps its id.
        match self.store.get(id).await? {
            Some(old) if old.origin == Origin::Native => {
                self.store.remove(id).await?;
            }
            Some(_) => {
                tracing::warn!(task_id = %id, "the upstream's task has the id of one of the proxy's tasks; not recorded");
                return Ok(None);
            }
            None => {}
        }
        // The upstream made the task already: the proxy's caps, which limit the tasks it runs, do not
        // refuse a record of it.
        let caps = Caps { max_live: usize::MAX, max_per_owner: usize::MAX };
        let record = self.store.insert(record, caps).await?;
        tracing::info!(
            task_id = %record.id, tool, origin = "native", owner = %owner_tag(owner), ttl_ms,
            "upstream task recorded"
        );
        Ok(Some(record))
    }

    /// The record of the upstream's task `id`, if it is `owner`'s.
    pub async fn native(&self, owner: &str, id: &str) -> Option<TaskRecord> {
        self.get(owner, id).await.filter(|r| r.origin == Origin::Native)
    }

    /// Whether `id` is a task (of the proxy's, or a recorded one of the upstream's) of an owner other
    /// than `owner`: its `tasks/*` must not reach the upstream on `owner`'s behalf.
    pub async fn owned_by_another(&self, owner: &str, id: &str) -> bool {
        matches!(self.store.get(id).await, Ok(Some(r)) if r.owner != owner)
    }

    /// Forgets the record of an upstream's task the upstream no longer knows.
    pub async fn forget_native(&self, id: &str) {
        match self.store.get(id).await {
            Ok(Some(r)) if r.origin == Origin::Native => {
                if let Ok(Some(_)) = self.store.remove(id).await {
                    tracing::info!(task_id = %id, "the upstream no longer knows its task: record removed");
                }
                self.wake(id, true);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(task_id = %id, error = %e, "cannot forget an upstream task's record"),
        }
    }
}

/// A time to the millisecond (what the stores keep).
fn truncate_ms(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(since.as_millis() as u64)
}
