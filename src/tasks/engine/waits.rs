//! Waits and events: the waiters of `tasks/result`, the stop hooks of running work, and the follow of
//! the changes other processes make to a shared store.

use super::{StatusEvent, TaskEngine};
use crate::tasks::model::TaskRecord;
use crate::tasks::store::Change;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};

impl TaskEngine {
    pub(super) fn stop_work(&self, id: &str) {
        if let Some((_, stop)) = self.cancels.remove(id) {
            stop();
        }
    }

    pub(super) fn wake(&self, id: &str, forget: bool) {
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

    /// Follows the changes other processes make to the shared store.
    pub(super) fn follow(self: &Arc<Self>, mut changes: broadcast::Receiver<Change>) {
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
}
