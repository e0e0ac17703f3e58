//! The in-memory task store: one struct behind a std `Mutex`.
//!
//! A std mutex rather than tokio's: every operation is a few map lookups and never awaits, so the lock
//! is held for microseconds and an async lock would only add overhead (the same reasoning as
//! mini-redis's `Db`).

use super::{Caps, Edit, StoreError, TaskStore};
use crate::tasks::model::TaskRecord;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

/// Tasks in memory, indexed by id, by owner (in creation order), by number and by expiry.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    secret: [u8; 32],
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<String, TaskRecord>,
    by_owner: HashMap<String, BTreeMap<u64, String>>,
    by_seq: BTreeMap<u64, String>,
    expiries: BTreeSet<(SystemTime, String)>,
    next_seq: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store, with a secret of its own (owners bound in it mean nothing after the process).
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        secret[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        secret[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        MemoryStore { inner: Mutex::new(Inner { next_seq: 1, ..Inner::default() }), secret }
    }

    /// The store's secret (see [`TaskStore::secret`]), without awaiting.
    pub fn secret_now(&self) -> [u8; 32] {
        self.secret
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn insert(&self, mut record: TaskRecord, caps: Caps) -> Result<TaskRecord, StoreError> {
        let mut inner = self.lock();
        if inner.tasks.len() >= caps.max_live {
            return Err(StoreError::Full { limit: caps.max_live });
        }
        if inner.by_owner.get(&record.owner).map_or(0, |ids| ids.len()) >= caps.max_per_owner {
            return Err(StoreError::OwnerFull { limit: caps.max_per_owner });
        }
        record.seq = inner.next_seq;
        inner.next_seq += 1;
        inner.by_owner.entry(record.owner.clone()).or_default().insert(record.seq, record.id.clone());
        inner.by_seq.insert(record.seq, record.id.clone());
        inner.expiries.insert((record.expires_at(), record.id.clone()));
        inner.tasks.insert(record.id.clone(), record.clone());
        Ok(record)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.lock().tasks.get(id).cloned())
    }

    async fn update(
        &self,
        id: &str,
        change: &Edit<'_>,
    ) -> Result<Option<(TaskRecord, TaskRecord)>, StoreError> {
        let mut inner = self.lock();
        let Some(record) = inner.tasks.get_mut(id) else { return Ok(None) };
        let mut next = record.clone();
        if !change(&mut next) {
            return Ok(None);
        }
        debug_assert_eq!(next.expires_at(), record.expires_at(), "ttl never changes after creation");
        let before = std::mem::replace(record, next.clone());
        Ok(Some((before, next)))
    }

    async fn list(
        &self,
        owner: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let inner = self.lock();
        let ids = match owner {
            Some(owner) => match inner.by_owner.get(owner) {
                Some(ids) => ids,
                None => return Ok(Vec::new()),
            },
            None => &inner.by_seq,
        };
        let start = after_seq.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(ids
            .range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .filter_map(|(_, id)| inner.tasks.get(id).cloned())
            .collect())
    }

    async fn remove(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut inner = self.lock();
        let Some(record) = inner.tasks.remove(id) else { return Ok(None) };
        if let Some(ids) = inner.by_owner.get_mut(&record.owner) {
            ids.remove(&record.seq);
            if ids.is_empty() {
                inner.by_owner.remove(&record.owner);
            }
        }
        inner.by_seq.remove(&record.seq);
        inner.expiries.remove(&(record.expires_at(), record.id.clone()));
        Ok(Some(record))
    }

    async fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect())
    }

    async fn next_expiry(&self) -> Result<Option<SystemTime>, StoreError> {
        Ok(self.lock().expiries.first().map(|(at, _)| *at))
    }

    async fn len(&self) -> Result<usize, StoreError> {
        Ok(self.lock().tasks.len())
    }

    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self.lock().tasks.values().filter(|r| !r.status.is_terminal()).cloned().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.secret)
    }
}
