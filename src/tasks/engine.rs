//! The task engine: creates tasks, moves them through the spec's status machine, answers waiters, and
//! expires them.
//!
//! It knows nothing of transports or of what runs a task: a runner reports transitions through
//! [`TaskEngine::set_status`] and [`TaskEngine::finish`], and learns of cancellation through the
//! receiver [`TaskEngine::create`] hands it. Every transition is broadcast as a [`StatusEvent`] so
//! that each session can send `notifications/tasks/status` to its own client.

use super::model::{Generation, Origin, Outcome, TaskRecord, TaskStatus};
use super::store::{StoreError, TaskStore};
use crate::config::TasksConfig;
use crate::telemetry::{self, metrics::task_attrs};
use dashmap::DashMap;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// A `tasks/list` cursor that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid cursor: {0:?} was not returned by tasks/list")]
pub struct BadCursor(pub String);

/// The task engine. Shared (`Arc`) by every session of the process.
pub struct TaskEngine {
    config: TasksConfig,
    store: Arc<dyn TaskStore>,
    seq: AtomicU64,
    /// Waiters of `tasks/result`, by task: created only while someone waits (most tasks never have
    /// one), woken on every transition and when the task is removed.
    watchers: DashMap<String, Arc<Notify>>,
    /// How to stop the work of a running task (called once, on cancel or expiry).
    cancels: DashMap<String, StopHook>,
    events: broadcast::Sender<StatusEvent>,
}

impl TaskEngine {
    /// An engine over `store`.
    pub fn new(config: TasksConfig, store: Arc<dyn TaskStore>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(TaskEngine {
            config,
            store,
            seq: AtomicU64::new(1),
            watchers: DashMap::new(),
            cancels: DashMap::new(),
            events,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TasksConfig {
        &self.config
    }

    /// Creates a `working` task. The ttl is the requested one capped at `max_ttl_ms` (the default when
    /// none is asked). Register how to stop its work with [`Self::on_stop`] or [`Self::stop_signal`].
    pub fn create(
        &self,
        owner: &str,
        tool: &str,
        origin: Origin,
        generation: Generation,
        requested_ttl_ms: Option<u64>,
    ) -> Result<TaskRecord, StoreError> {
        let now = SystemTime::now();
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
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        self.store.insert(record.clone(), self.config.max_live_tasks)?;
        let attrs = task_attrs(tool, origin.as_str(), generation.protocol_version());
        telemetry::metrics().task_created.add(1, &attrs);
        telemetry::metrics().task_active.add(1, &[KeyValue::new("asyncify.task.status", "working")]);
        telemetry::trace::task_started(&record.id, tool, origin.as_str());
        tracing::info!(
            task_id = %record.id, tool, origin = origin.as_str(), owner = %owner_hash(owner),
            status = "working", ttl_ms, "task created"
        );
        Ok(record)
    }

    /// Registers how to stop the task's work. If the task already ended (or is gone), the hook runs now.
    pub fn on_stop(&self, id: &str, hook: StopHook) {
        match self.store.get(id) {
            Some(r) if !r.status.is_terminal() => {
                self.cancels.insert(id.to_owned(), hook);
            }
            _ => hook(),
        }
    }

    /// A receiver that fires when the task is cancelled or expires while running.
    pub fn stop_signal(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.on_stop(
            id,
            Box::new(move || {
                let _ = tx.send(());
            }),
        );
        rx
    }

    /// The task, if it exists and belongs to `owner`.
    pub fn get(&self, owner: &str, id: &str) -> Option<TaskRecord> {
        self.store.get(id).filter(|r| r.owner == owner)
    }

    /// The task stands for work that began at `began` (a call handed off after it had run a while):
    /// its `createdAt`, age and duration count from there. Only moves `createdAt` earlier; the expiry
    /// does not move.
    pub fn backdate(&self, id: &str, began: SystemTime) -> Option<TaskRecord> {
        self.store.update(id, &mut |r| {
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
    }

    /// Moves a live task between `working` and `input_required`, with an optional message.
    pub fn set_status(&self, id: &str, status: TaskStatus, message: Option<String>) -> Option<TaskRecord> {
        debug_assert!(!status.is_terminal());
        self.transition(id, status, message, None)
    }

    /// Updates what a working task says about itself (its message and the real polling cadence); a new
    /// message is announced like a transition.
    pub fn update_working(
        &self,
        id: &str,
        message: Option<String>,
        poll_interval_ms: Option<u64>,
    ) -> Option<TaskRecord> {
        let mut announce = false;
        let record = self.store.update(id, &mut |r| {
            if r.status.is_terminal() {
                return false;
            }
            announce = r.status_message != message;
            r.status_message = message.clone();
            if let Some(ms) = poll_interval_ms {
                r.poll_interval_ms = ms;
            }
            r.last_updated_at = SystemTime::now().max(r.created_at);
            true
        })?;
        if announce {
            tracing::info!(
                task_id = %record.id, tool = %record.tool, origin = record.origin.as_str(),
                owner = %owner_hash(&record.owner), status = record.status.as_str(),
                message = record.status_message.as_deref().unwrap_or(""), "task progress"
            );
            let _ = self.events.send(StatusEvent { owner: record.owner.clone(), task: record.clone() });
        }
        Some(record)
    }

    /// Ends a task with its outcome. Does nothing if it already ended (a cancelled task stays cancelled
    /// even if its work completes).
    pub fn finish(
        &self,
        id: &str,
        status: TaskStatus,
        message: Option<String>,
        outcome: Option<Outcome>,
    ) -> Option<TaskRecord> {
        debug_assert!(status.is_terminal());
        let record = self.transition(id, status, message, outcome)?;
        self.cancels.remove(id);
        Some(record)
    }

    fn transition(
        &self,
        id: &str,
        status: TaskStatus,
        message: Option<String>,
        outcome: Option<Outcome>,
    ) -> Option<TaskRecord> {
        let mut outcome = outcome;
        let mut left: Option<(TaskStatus, SystemTime)> = None;
        let now = SystemTime::now();
        let record = self.store.update(id, &mut |r| {
            if !r.status.can_become(status) {
                return false;
            }
            if r.status != status {
                left = Some((r.status, r.state_since));
                r.state_since = now.max(r.created_at);
            }
            r.status = status;
            r.status_message = message.clone();
            r.last_updated_at = now.max(r.created_at);
            if status.is_terminal() {
                r.outcome = outcome.take();
            }
            true
        })?;
        let elapsed_ms =
            record.last_updated_at.duration_since(record.created_at).unwrap_or_default().as_millis() as u64;
        let in_state_ms =
            left.map_or(0, |(_, since)| now.duration_since(since).unwrap_or_default().as_millis() as u64);
        // The audit line: one per transition, with the task, its tool, its owner's hash and the timing.
        tracing::info!(
            target: "mcp_asyncify::audit",
            task_id = %record.id, tool = %record.tool, origin = record.origin.as_str(),
            owner = %owner_hash(&record.owner),
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
    pub fn discard(&self, id: &str) {
        if let Some(r) = self.store.get(id)
            && !r.status.is_terminal()
        {
            telemetry::metrics()
                .task_active
                .add(-1, &[KeyValue::new("asyncify.task.status", r.status.as_str())]);
        }
        telemetry::trace::task_ended(id, "discarded");
        self.store.remove(id);
        self.cancels.remove(id);
        self.wake(id, true);
    }

    /// `tasks/cancel`: marks the task cancelled (before answering, as the spec requires) and stops its
    /// work.
    pub fn cancel(&self, owner: &str, id: &str) -> Result<TaskRecord, CancelError> {
        let current = self.get(owner, id).ok_or(CancelError::NotFound)?;
        if current.status.is_terminal() {
            return Err(CancelError::Terminal(current.status.as_str()));
        }
        // Take the stop signal first: finishing the task drops it.
        let stop = self.cancels.remove(id).map(|(_, stop)| stop);
        match self.finish(id, TaskStatus::Cancelled, Some("The task was cancelled by request.".into()), None)
        {
            Some(record) => {
                if let Some(stop) = stop {
                    stop();
                }
                Ok(record)
            }
            // It ended between the two looks.
            None => match self.get(owner, id) {
                Some(r) => Err(CancelError::Terminal(r.status.as_str())),
                None => Err(CancelError::NotFound),
            },
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
            let Some(record) = self.get(owner, id) else {
                self.forget_watchers(id, &notify);
                return None;
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
    pub fn list(
        &self,
        owner: &str,
        cursor: Option<&str>,
    ) -> Result<(Vec<TaskRecord>, Option<String>), BadCursor> {
        let after = match cursor {
            None => None,
            Some(c) => Some(
                c.strip_prefix("seq-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| BadCursor(c.to_string()))?,
            ),
        };
        let page = self.config.list_page_size;
        let mut tasks = self.store.list(owner, after, page + 1);
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
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether no task exists.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Deletes every task whose ttl has elapsed, stopping the work of those still running. Returns how
    /// many were removed.
    pub fn sweep(&self, now: SystemTime) -> usize {
        let expired = self.store.expired(now);
        for id in &expired {
            if let Some(record) = self.store.remove(id) {
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
                    task_id = %record.id, tool = %record.tool, owner = %owner_hash(&record.owner),
                    status = record.status.as_str(), "task expired (ttl {} ms) and was deleted", record.ttl_ms
                );
            }
            self.cancels.remove(id);
            // Every waiter wakes and finds the task gone.
            self.wake(id, true);
        }
        expired.len()
    }

    /// Runs [`Self::sweep`] whenever the next task expires (checking at least every `max_sleep`).
    pub fn spawn_sweeper(self: &Arc<Self>, max_sleep: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { return };
                let now = SystemTime::now();
                e.sweep(now);
                let wait = e
                    .store
                    .next_expiry()
                    .map(|at| at.duration_since(now).unwrap_or_default())
                    .unwrap_or(max_sleep)
                    .clamp(Duration::from_millis(5), max_sleep);
                drop(e);
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// A short, stable, non-reversible tag of an owner for logs (never the credential itself).
pub fn owner_hash(owner: &str) -> String {
    // FNV-1a: stable across runs and platforms, unlike std's SipHash with random keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

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
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (e, id) = (e.clone(), t.id.clone());
                tokio::spawn(async move { e.wait_terminal("me", &id).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
        e.finish(&t.id, TaskStatus::Completed, None, Some(Outcome::Result(raw)));
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
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).unwrap();
        let first = {
            let (e, id) = (e.clone(), t.id.clone());
            tokio::spawn(async move { e.wait_terminal("me", &id).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // What `transition` does first: store the terminal status…
        e.store.update(&t.id, &mut |r| {
            r.status = TaskStatus::Completed;
            true
        });
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
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(5000)).unwrap();
        let stop = e.stop_signal(&t.id);
        assert_eq!(e.cancel("someone else", &t.id).unwrap_err(), CancelError::NotFound);
        let c = e.cancel("me", &t.id).unwrap();
        assert_eq!(c.status, TaskStatus::Cancelled);
        assert!(stop.await.is_ok(), "the runner is told to stop");
        assert_eq!(e.cancel("me", &t.id).unwrap_err(), CancelError::Terminal("cancelled"));
        // Work that completes after the cancel does not change the status.
        assert!(e.finish(&t.id, TaskStatus::Completed, None, None).is_none());
    }

    #[tokio::test]
    async fn ttl_is_capped_and_expiry_deletes() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(u64::MAX)).unwrap();
        assert_eq!(t.ttl_ms, TasksConfig::default().max_ttl_ms);
        let short = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(1)).unwrap();
        let stop = e.stop_signal(&short.id);
        let waiter = {
            let (e, id) = (e.clone(), short.id.clone());
            tokio::spawn(async move { e.wait_terminal("me", &id).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Asked 1 ms, it gets the floor; the sweep at the end of that deletes it.
        assert_eq!(e.sweep(SystemTime::now() + Duration::from_millis(MIN_TTL_MS)), 1);
        assert!(e.get("me", &short.id).is_none());
        assert!(stop.await.is_ok(), "running work is stopped at expiry");
        assert!(waiter.await.unwrap().is_none(), "a waiter learns the task is gone");
    }

    #[tokio::test]
    async fn a_zero_ttl_gets_a_floor_not_a_task_deleted_at_once() {
        let e = engine(10);
        let t = e.create("me", "slow", Origin::Local, Generation::Legacy, Some(0)).unwrap();
        assert!(t.ttl_ms >= MIN_TTL_MS, "ttl {} ms", t.ttl_ms);
        assert_eq!(e.sweep(SystemTime::now() + Duration::from_millis(100)), 0, "still there 100 ms later");
    }

    #[tokio::test]
    async fn list_pages_with_opaque_cursors() {
        let e = engine(2);
        for _ in 0..5 {
            e.create("me", "t", Origin::Local, Generation::Legacy, None).unwrap();
        }
        e.create("other", "t", Origin::Local, Generation::Legacy, None).unwrap();
        let (p1, c1) = e.list("me", None).unwrap();
        let (p2, c2) = e.list("me", c1.as_deref()).unwrap();
        let (p3, c3) = e.list("me", c2.as_deref()).unwrap();
        assert_eq!((p1.len(), p2.len(), p3.len()), (2, 2, 1));
        assert!(c3.is_none());
        assert!(e.list("me", Some("garbage")).is_err());
    }
}
