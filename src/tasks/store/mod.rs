//! Where tasks live. The engine talks to a [`TaskStore`] and never knows which one it is.
//!
//! [`memory::MemoryStore`] is the default. An embedded file store and a shared Redis store come later
//! behind the same trait, which is why records are plain data and every method is a short, synchronous
//! step that never holds anything across an `.await`.

pub mod memory;

use super::model::TaskRecord;
use std::time::SystemTime;

/// Why a task could not be stored.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The cap on live tasks is reached.
    #[error(
        "too many live tasks (the limit is {limit}); wait for some to finish or expire, or raise tasks.max_live_tasks"
    )]
    Full {
        /// The cap.
        limit: usize,
    },
}

/// Storage of task records.
pub trait TaskStore: Send + Sync + 'static {
    /// Adds a new record, unless `max_live` records already exist.
    fn insert(&self, record: TaskRecord, max_live: usize) -> Result<(), StoreError>;
    /// The record with this id, if any.
    fn get(&self, id: &str) -> Option<TaskRecord>;
    /// Applies `change` to the record; when it returns `true` the change is kept and the new record
    /// returned, otherwise nothing changes and `None` is returned.
    fn update(&self, id: &str, change: &mut dyn FnMut(&mut TaskRecord) -> bool) -> Option<TaskRecord>;
    /// Up to `limit` records of `owner` created after the record numbered `after_seq`, oldest first.
    fn list(&self, owner: &str, after_seq: Option<u64>, limit: usize) -> Vec<TaskRecord>;
    /// Deletes a record.
    fn remove(&self, id: &str) -> Option<TaskRecord>;
    /// Ids of records whose ttl has elapsed at `now`.
    fn expired(&self, now: SystemTime) -> Vec<String>;
    /// The earliest expiry time, if any record exists.
    fn next_expiry(&self) -> Option<SystemTime>;
    /// How many records exist.
    fn len(&self) -> usize;
    /// Whether there is no record.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
