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

use super::model::{Generation, Origin, Outcome, TaskRecord, TaskStatus};
use super::owner::owner_tag;
use super::store::{Caps, Change, StoreError, TaskStore};
use crate::config::TasksConfig;
use crate::telemetry::{self, metrics::task_attrs};
use dashmap::DashMap;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, broadcast, oneshot};

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
}

impl TaskEngine {
    /// An engine over `store`. With a store shared between processes, it follows the changes the
    /// others make.
    pub fn new(config: TasksConfig, store: Arc<dyn TaskStore>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let engine = Arc::new(TaskEngine {
            config,
            store,
            runner: uuid::Uuid::new_v4().simple().to_string(),
            watchers: DashMap::new(),
            cancels: DashMap::new(),
            events,
        });
        if let Some(changes) = engine.store.changes() {
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

    fn stop_work(&self, id: &str) {
        if let Some((_, stop)) = self.cancels.remove(id) {
            stop();
        }
    }

    fn wake(&self, id: &str, forget: bool) {
        let notify = if forget {
            self.watchers.remove(id).map(|(_, n)| n)
        } else {
            self.watchers.get(id).map(|n| n.clone())
        };
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    /// Waits until the task is terminal and returns it; `None` if it does not exist for `owner` or
    /// expires meanwhile.
    pub async fn wait_terminal(&self, owner: &str, id: &str) -> Option<TaskRecord> {
        loop {
            let notify = self.watchers.entry(id.to_owned()).or_default().clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a transition between the look and the wait is not missed.
            notified.as_mut().enable();
            let record = match self.try_get(owner, id).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    self.forget_watchers(id, &notify);
                    return None;
                }
                Err(e) => {
                    // The store is away: look again a little later (a reconnect also wakes us).
                    tracing::warn!(task_id = %id, error = %e, "waiting for a task: the store does not answer");
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                    continue;
                }
            };
            if record.status.is_terminal() {
                // No transition will come any more; nobody needs the entry.
                self.forget_watchers(id, &notify);
                return Some(record);
            }
            notified.await;
        }
    }

    /// Removes a task's watchers once it ended, waking whoever still waits on them: the end may have
    /// been stored but not yet announced (`transition` stores, then wakes), and a waiter that came
    /// before would otherwise sleep on an entry the announcement no longer finds.
    fn forget_watchers(&self, id: &str, notify: &Notify) {
        notify.notify_waiters();
        self.watchers.remove(id);
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

    /// Follows the changes other processes make to the shared store.
    fn follow(self: &Arc<Self>, mut changes: broadcast::Receiver<Change>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let change = match changes.recv().await {
                    Ok(c) => c,
                    Err(broadcast::error::RecvError::Lagged(_)) => Change::Resync,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(e) = engine.upgrade() else { return };
                match change {
                    Change::Task(id) => {
                        if let Ok(Some(record)) = e.store.get(&id).await {
                            if record.status.is_terminal() {
                                // Cancelled (or ended) elsewhere: stop our work on it, if any.
                                e.stop_work(&id);
                            }
                            e.wake(&id, record.status.is_terminal());
                            let _ = e.events.send(StatusEvent { owner: record.owner.clone(), task: record });
                        }
                    }
                    Change::Removed(id) => {
                        e.stop_work(&id);
                        e.wake(&id, true);
                    }
                    Change::Resync => {
                        let ids: Vec<String> = e.watchers.iter().map(|w| w.key().clone()).collect();
                        for id in ids {
                            e.wake(&id, false);
                        }
                    }
                }
            }
        });
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

/// Now, to the millisecond: what the stores keep and the wire shows, so a record reads back the same.
fn now_ms() -> SystemTime {
    let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}

/// How often this process marks itself alive in a shared store.
const HEARTBEAT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::store::memory::MemoryStore;

    fn engine(page: usize) -> Arc<TaskEngine> {
        let config = TasksConfig { list_page_size: page, ..TasksConfig::default() };
        TaskEngine::new(config, Arc::new(MemoryStore::new()))
    }

    #[tokio::test]
    async fn several_waiters_all_get_the_result() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (e, id) = (e.clone(), t.id.clone());
                tokio::spawn(async move { e.wait_terminal("me", &id).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
        e.finish(&t.id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await;
        for w in waiters {
            let r = w.await.unwrap().unwrap();
            assert_eq!(r.status, TaskStatus::Completed);
        }
    }

    #[tokio::test]
    async fn a_waiter_is_woken_even_when_another_one_sees_the_end_first() {
        // The window between a transition storing its terminal status and waking the waiters: a
        // second waiter arriving there sees the end at once. The first must still be woken.
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
        let first = {
            let (e, id) = (e.clone(), t.id.clone());
            tokio::spawn(async move { e.wait_terminal("me", &id).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // What `transition` does first: store the terminal status…
        e.store
            .update(&t.id, &|r| {
                r.status = TaskStatus::Completed;
                true
            })
            .await
            .unwrap();
        // …a second waiter comes now…
        let second = e.wait_terminal("me", &t.id).await.expect("the task");
        assert_eq!(second.status, TaskStatus::Completed);
        // …and then the wake.
        e.wake(&t.id, true);
        let first = tokio::time::timeout(Duration::from_secs(2), first).await;
        assert!(first.is_ok(), "the first waiter was never woken");
    }

    #[tokio::test]
    async fn cancel_is_refused_for_terminal_tasks_and_strangers() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(5000)).await.unwrap();
        let stop = e.stop_signal(&t.id).await;
        assert_eq!(e.cancel("someone else", &t.id).await.unwrap_err(), CancelError::NotFound);
        let c = e.cancel("me", &t.id).await.unwrap();
        assert_eq!(c.status, TaskStatus::Cancelled);
        assert!(stop.await.is_ok(), "the runner is told to stop");
        assert_eq!(e.cancel("me", &t.id).await.unwrap_err(), CancelError::Terminal("cancelled"));
        // Work that completes after the cancel does not change the status.
        assert!(e.finish(&t.id, TaskStatus::Completed, None, None).await.is_none());
    }

    #[tokio::test]
    async fn ttl_is_capped_and_expiry_deletes() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(u64::MAX)).await.unwrap();
        assert_eq!(t.ttl_ms, TasksConfig::default().max_ttl_ms);
        let short = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(1)).await.unwrap();
        let stop = e.stop_signal(&short.id).await;
        let waiter = {
            let (e, id) = (e.clone(), short.id.clone());
            tokio::spawn(async move { e.wait_terminal("me", &id).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Asked 1 ms, it gets the floor; the sweep at the end of that deletes it.
        assert_eq!(e.sweep(SystemTime::now() + Duration::from_millis(MIN_TTL_MS)).await, 1);
        assert!(e.get("me", &short.id).await.is_none());
        assert!(stop.await.is_ok(), "running work is stopped at expiry");
        assert!(waiter.await.unwrap().is_none(), "a waiter learns the task is gone");
    }

    #[tokio::test]
    async fn a_zero_ttl_gets_a_floor_not_a_task_deleted_at_once() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(0)).await.unwrap();
        assert!(t.ttl_ms >= MIN_TTL_MS, "ttl {} ms", t.ttl_ms);
        assert_eq!(
            e.sweep(SystemTime::now() + Duration::from_millis(100)).await,
            0,
            "still there 100 ms later"
        );
    }

    #[tokio::test]
    async fn list_pages_with_opaque_cursors() {
        let e = engine(2);
        for _ in 0..5 {
            e.create("me", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
        }
        e.create("other", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
        let (p1, c1) = e.list("me", None).await.unwrap();
        let (p2, c2) = e.list("me", c1.as_deref()).await.unwrap();
        let (p3, c3) = e.list("me", c2.as_deref()).await.unwrap();
        assert_eq!((p1.len(), p2.len(), p3.len()), (2, 2, 1));
        assert!(c3.is_none());
        assert!(e.list("me", Some("garbage")).await.is_err());
    }
}
