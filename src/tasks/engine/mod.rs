//! The task engine: creates tasks, moves them through the spec's status machine, answers waiters, and
//! expires them.
//!
//! It knows nothing of transports or of what runs a task: a runner reports transitions through
//! [`TaskEngine::set_status`] and [`TaskEngine::finish`], and learns of cancellation through the
//! receiver [`TaskEngine::create`] hands it. Every transition is broadcast as a [`StatusEvent`] so
//! that each session can send `notifications/tasks/status` to its own client.
//!
//! Records live in a [`TaskStore`]; with a store shared by several processes (Redis), the changes
//! other processes make arrive through [`TaskStore::changes`] and wake this process's waiters, stop
//! this process's work when another cancels it, and reach this process's clients as status events.
//!
//! By job: this file holds the engine, creation, reads and paging; [`transitions`] moves a task through
//! the status machine (and cancels it); [`waits`] wakes the waiters of `tasks/result` and follows the
//! store's events; [`recovery`] expires tasks and takes over those of processes that died; [`native`]
//! remembers the tasks an upstream runs itself.

use super::model::{Generation, Origin, TaskRecord, TaskStatus};
use super::owner::owner_tag;
use super::store::{Caps, StoreError, TaskStore};
use crate::config::TasksConfig;
use crate::telemetry::{self, metrics::task_attrs};
use dashmap::DashMap;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, broadcast, oneshot, watch};

mod native;
mod recovery;
mod transitions;
mod waits;

/// The shortest retention a task gets, whatever is asked (`ttl: 0` would otherwise make a task
/// deleted before its client could read it).
pub const MIN_TTL_MS: u64 = 1000;

/// What stops a running task's work: called once, when it is cancelled or expires while running.
pub type StopHook = Box<dyn FnOnce() + Send + Sync>;

/// A transition, for the sessions to notify their clients.
#[derive(Debug, Clone)]
pub struct StatusEvent {
    /// Whose task it is.
    pub owner: String,
    /// The task after the transition.
    pub task: TaskRecord,
}

/// Why `tasks/cancel` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// No such task for this owner (or it expired).
    #[error("Failed to cancel task: Task not found")]
    NotFound,
    /// The task already ended.
    #[error("Cannot cancel task: already in terminal status '{0}'")]
    Terminal(&'static str),
    /// The store cannot be reached.
    #[error("Failed to cancel task: {0}")]
    Store(StoreError),
}

/// A `tasks/list` cursor that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// A cursor we never returned.
    #[error("Invalid cursor: {0:?} was not returned by tasks/list")]
    BadCursor(String),
    /// The store cannot be reached.
    #[error("Failed to list tasks: {0}")]
    Store(StoreError),
}

/// What recovery found for an unfinished task whose process died, for the caller to resume.
#[derive(Debug, Clone)]
pub struct Orphan {
    /// The task, now run by this process.
    pub task: TaskRecord,
}

/// The task engine. Shared (`Arc`) by every session of the process.
pub struct TaskEngine {
    config: TasksConfig,
    store: Arc<dyn TaskStore>,
    /// This process, as the runner of the tasks it creates (a random id per process).
    runner: String,
    /// Waiters of `tasks/result`, by task: created only while someone waits (most tasks never have
    /// one), woken on every transition and when the task is removed.
    watchers: DashMap<String, Arc<Notify>>,
    /// How to stop the work of a running task (called once, on cancel or expiry).
    cancels: DashMap<String, StopHook>,
    events: broadcast::Sender<StatusEvent>,
    /// Whether the store is shared with other processes (then orphans are looked for periodically).
    shared: bool,
    /// Resumable tasks (Notion's) taken over while running, waiting for a session of their owner.
    orphans: std::sync::Mutex<Vec<Orphan>>,
    /// Counts the takeovers that left tasks in `orphans`, for sessions to look.
    orphans_found: watch::Sender<u64>,
}

impl TaskEngine {
    /// An engine over `store`. With a store shared between processes, it follows the changes the
    /// others make.
    pub fn new(config: TasksConfig, store: Arc<dyn TaskStore>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let changes = store.changes();
        let engine = Arc::new(TaskEngine {
            config,
            store,
            runner: uuid::Uuid::new_v4().simple().to_string(),
            watchers: DashMap::new(),
            cancels: DashMap::new(),
            events,
            shared: changes.is_some(),
            orphans: std::sync::Mutex::new(Vec::new()),
            orphans_found: watch::Sender::new(0),
        });
        if let Some(changes) = changes {
            engine.follow(changes);
        }
        engine
    }

    /// The configuration.
    pub fn config(&self) -> &TasksConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.store
    }

    /// This process's runner id.
    pub fn runner(&self) -> &str {
        &self.runner
    }

    /// Creates a `working` task, durable when this returns. The ttl is the requested one capped at
    /// `max_ttl_ms` (the default when none is asked). Register how to stop its work with
    /// [`Self::on_stop`] or [`Self::stop_signal`].
    pub async fn create(
        &self,
        owner: &str,
        tool: &str,
        origin: Origin,
        generation: Generation,
        requested_ttl_ms: Option<u64>,
    ) -> Result<TaskRecord, StoreError> {
        let now = now_ms();
        let ttl_ms =
            requested_ttl_ms.unwrap_or(self.config.default_ttl_ms).clamp(MIN_TTL_MS, self.config.max_ttl_ms);
        let record = TaskRecord {
            id: uuid::Uuid::new_v4().to_string(),
            owner: owner.into(),
            tool: tool.into(),
            origin,
            generation,
            status: TaskStatus::Working,
            status_message: None,
            created_at: now,
            last_updated_at: now,
            state_since: now,
            ttl_ms,
            poll_interval_ms: self.config.poll_interval_ms,
            outcome: None,
            seq: 0,
            runner: Some(self.runner.clone()),
            upstream_task: None,
        };
        let caps =
            Caps { max_live: self.config.max_live_tasks, max_per_owner: self.config.max_tasks_per_owner };
        let record = self.store.insert(record, caps).await?;
        let attrs = task_attrs(tool, origin.as_str(), generation.protocol_version());
        telemetry::metrics().task_created.add(1, &attrs);
        telemetry::metrics().task_active.add(1, &[KeyValue::new("asyncify.task.status", "working")]);
        telemetry::trace::task_started(&record.id, tool, origin.as_str());
        tracing::info!(
            task_id = %record.id, tool, origin = origin.as_str(), owner = %owner_tag(owner),
            status = "working", ttl_ms, "task created"
        );
        Ok(record)
    }

    /// Registers how to stop the task's work. If the task already ended (or is gone), the hook runs now.
    pub async fn on_stop(&self, id: &str, hook: StopHook) {
        // Registered first, so that a cancel landing while we look finds it.
        self.cancels.insert(id.to_owned(), hook);
        let live = matches!(self.store.get(id).await, Ok(Some(r)) if !r.status.is_terminal());
        if !live {
            self.stop_work(id);
        }
    }

    /// A receiver that fires when the task is cancelled or expires while running.
    pub async fn stop_signal(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.on_stop(
            id,
            Box::new(move || {
                let _ = tx.send(());
            }),
        )
        .await;
        rx
    }

    /// The task, if it exists and belongs to `owner`.
    pub async fn get(&self, owner: &str, id: &str) -> Option<TaskRecord> {
        self.try_get(owner, id).await.unwrap_or_else(|e| {
            tracing::warn!(task_id = %id, error = %e, "cannot read a task");
            None
        })
    }

    /// The task, if it exists and belongs to `owner`; a store fault is an error.
    pub async fn try_get(&self, owner: &str, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.store.get(id).await?.filter(|r| r.owner == owner))
    }

    /// Deletes a task that turned out not to be needed (never seen by a client).
    pub async fn discard(&self, id: &str) {
        if let Ok(Some(r)) = self.store.remove(id).await
            && !r.status.is_terminal()
        {
            telemetry::metrics()
                .task_active
                .add(-1, &[KeyValue::new("asyncify.task.status", r.status.as_str())]);
        }
        telemetry::trace::task_ended(id, "discarded");
        self.cancels.remove(id);
        self.wake(id, true);
    }

    /// A page of the owner's tasks, oldest first, and the cursor of the next page.
    pub async fn list(
        &self,
        owner: &str,
        cursor: Option<&str>,
    ) -> Result<(Vec<TaskRecord>, Option<String>), ListError> {
        let after = match cursor {
            None => None,
            Some(c) => Some(
                c.strip_prefix("seq-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| ListError::BadCursor(c.to_string()))?,
            ),
        };
        let page = self.config.list_page_size;
        let mut tasks = self.store.list(Some(owner), after, page + 1).await.map_err(ListError::Store)?;
        let next = if tasks.len() > page {
            tasks.truncate(page);
            tasks.last().map(|t| format!("seq-{}", t.seq))
        } else {
            None
        };
        Ok((tasks, next))
    }

    /// Status events of every owner.
    pub fn subscribe(&self) -> broadcast::Receiver<StatusEvent> {
        self.events.subscribe()
    }

    /// How many tasks exist (live or retained).
    pub async fn len(&self) -> usize {
        self.store.len().await.unwrap_or(0)
    }

    /// Whether no task exists.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }
}

/// Now, to the millisecond: what the stores keep and the wire shows, so a record reads back the same.
fn now_ms() -> SystemTime {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}

#[cfg(test)]
mod tests;
