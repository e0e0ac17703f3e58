//! Expiry and recovery: the sweep of tasks past their ttl, the sweeper loop (which also keeps this
//! process marked alive), and the take-over of tasks whose process died.

use super::{Orphan, TaskEngine};
use crate::tasks::model::{Origin, Outcome, TaskStatus};
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
                // An upstream's own task (a record only) was never counted as running here.
                if !record.status.is_terminal() && record.origin != Origin::Native {
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
    /// keeps this process marked alive in a shared store. On a shared store it also takes over, every
    /// [`ORPHAN_SCAN`], the unfinished tasks of processes that stopped beating (see [`Self::recover`]):
    /// their lost calls fail at once, and their Notion tasks wait in [`Self::take_orphans`] for a
    /// session of their owner.
    pub fn spawn_sweeper(self: &Arc<Self>, max_sleep: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            // Beat at once: a replica that just started must not look dead to the others.
            let mut beat: Option<tokio::time::Instant> = None;
            let mut scan = tokio::time::Instant::now();
            loop {
                let Some(e) = engine.upgrade() else { return };
                let now = SystemTime::now();
                e.sweep(now).await;
                if beat.is_none_or(|b| b.elapsed() >= HEARTBEAT) {
                    beat = Some(tokio::time::Instant::now());
                    // A failed heartbeat is a store fault (reported by the store's health).
                    let _ = e.store.heartbeat(&e.runner).await;
                }
                if e.shared && scan.elapsed() >= ORPHAN_SCAN {
                    scan = tokio::time::Instant::now();
                    e.claim_orphans().await;
                }
                let mut wait = match e.store.next_expiry().await {
                    Ok(Some(at)) => at.duration_since(now).unwrap_or_default(),
                    _ => max_sleep,
                }
                .clamp(Duration::from_millis(5), max_sleep.min(HEARTBEAT));
                if e.shared {
                    wait = wait.min(ORPHAN_SCAN.saturating_sub(scan.elapsed()).max(Duration::from_millis(5)));
                }
                drop(e);
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// The periodic takeover on a shared store: resumable tasks found are kept for a session of their
    /// owner, and the sessions are told.
    async fn claim_orphans(&self) {
        match self.take_over().await {
            Ok(found) if found.is_empty() => {}
            Ok(found) => {
                tracing::info!(tasks = found.len(), "took over running Notion tasks of a stopped process");
                self.orphans.lock().unwrap_or_else(|e| e.into_inner()).extend(found);
                self.orphans_found.send_modify(|n| *n += 1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for tasks of stopped processes now; will retry")
            }
        }
    }

    /// The resumable tasks of `owner` taken over while running (removed: each goes to one session).
    pub fn take_orphans(&self, owner: &str) -> Vec<Orphan> {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, others) = std::mem::take(&mut *orphans).into_iter().partition(|o| o.task.owner == owner);
        *orphans = others;
        mine
    }

    /// Changes whenever a takeover leaves resumable tasks for [`Self::take_orphans`].
    pub fn orphans_found(&self) -> tokio::sync::watch::Receiver<u64> {
        self.orphans_found.subscribe()
    }

    /// Recovery on start: every unfinished task whose runner is gone (a process that crashed or was
    /// restarted) is taken over by this process. A task with an upstream id of its own (a Notion task)
    /// is returned for the caller to resume; any other lost its upstream call with the process and ends
    /// `failed`, saying so. Returns the tasks to resume.
    pub async fn recover(&self) -> Result<Vec<Orphan>, StoreError> {
        // Marked alive first, so that no live replica takes over what this process starts now.
        self.store.heartbeat(&self.runner).await?;
        self.take_over().await
    }

    /// Takes over every unfinished task whose runner stopped beating; see [`Self::recover`].
    async fn take_over(&self) -> Result<Vec<Orphan>, StoreError> {
        let mut resume = Vec::new();
        for task in self.store.unfinished().await? {
            // (An upstream's own task has no runner: nothing of it ran here.)
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

/// How often a process on a shared store looks for tasks of processes that stopped beating. With the
/// store's runner ttl (10 s on Redis), a dead replica's tasks are taken over within about 15 s.
pub const ORPHAN_SCAN: Duration = Duration::from_secs(5);
