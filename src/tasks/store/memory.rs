//! The in-memory task store: one struct behind a std `Mutex`.
//!
//! A std mutex rather than tokio's: every operation is a few map lookups and never awaits, so the lock
//! is held for microseconds and an async lock would only add overhead (the same reasoning as
//! mini-redis's `Db`).

use super::{StoreError, TaskStore};
use crate::tasks::model::TaskRecord;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

/// Tasks in memory, indexed by id, by owner (in creation order) and by expiry.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tasks: HashMap<String, TaskRecord>,
    by_owner: HashMap<String, BTreeMap<u64, String>>,
    expiries: BTreeSet<(SystemTime, String)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TaskStore for MemoryStore {
    fn insert(&self, record: TaskRecord, max_live: usize) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.tasks.len() >= max_live {
            return Err(StoreError::Full { limit: max_live });
        }
        inner.by_owner.entry(record.owner.clone()).or_default().insert(record.seq, record.id.clone());
        inner.expiries.insert((record.expires_at(), record.id.clone()));
        inner.tasks.insert(record.id.clone(), record);
        Ok(())
    }

    fn get(&self, id: &str) -> Option<TaskRecord> {
        self.lock().tasks.get(id).cloned()
    }

    fn update(&self, id: &str, change: &mut dyn FnMut(&mut TaskRecord) -> bool) -> Option<TaskRecord> {
        let mut inner = self.lock();
        let record = inner.tasks.get_mut(id)?;
        let mut next = record.clone();
        if !change(&mut next) {
            return None;
        }
        debug_assert_eq!(next.expires_at(), record.expires_at(), "ttl never changes after creation");
        *record = next.clone();
        Some(next)
    }

    fn list(&self, owner: &str, after_seq: Option<u64>, limit: usize) -> Vec<TaskRecord> {
        let inner = self.lock();
        let Some(ids) = inner.by_owner.get(owner) else { return Vec::new() };
        let start = after_seq.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        ids.range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .filter_map(|(_, id)| inner.tasks.get(id).cloned())
            .collect()
    }

    fn remove(&self, id: &str) -> Option<TaskRecord> {
        let mut inner = self.lock();
        let record = inner.tasks.remove(id)?;
        if let Some(ids) = inner.by_owner.get_mut(&record.owner) {
            ids.remove(&record.seq);
            if ids.is_empty() {
                inner.by_owner.remove(&record.owner);
            }
        }
        inner.expiries.remove(&(record.expires_at(), record.id.clone()));
        Some(record)
    }

    fn expired(&self, now: SystemTime) -> Vec<String> {
        let inner = self.lock();
        inner.expiries.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| id.clone()).collect()
    }

    fn next_expiry(&self) -> Option<SystemTime> {
        self.lock().expiries.first().map(|(at, _)| *at)
    }

    fn len(&self) -> usize {
        self.lock().tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::model::{Origin, TaskStatus};
    use std::time::Duration;

    fn record(id: &str, owner: &str, seq: u64, ttl_ms: u64) -> TaskRecord {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        TaskRecord {
            id: id.into(),
            owner: owner.into(),
            tool: "t".into(),
            origin: Origin::Local,
            generation: crate::tasks::model::Generation::Legacy,
            status: TaskStatus::Working,
            status_message: None,
            created_at: now,
            last_updated_at: now,
            state_since: now,
            ttl_ms,
            poll_interval_ms: 1000,
            outcome: None,
            seq,
        }
    }

    #[test]
    fn lists_per_owner_in_creation_order_with_stable_paging() {
        let s = MemoryStore::new();
        for i in 0..5 {
            s.insert(record(&format!("a{i}"), "alice", i, 1000), 100).unwrap();
        }
        s.insert(record("b0", "bob", 10, 1000), 100).unwrap();
        let page1 = s.list("alice", None, 2);
        assert_eq!(page1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a0", "a1"]);
        s.remove("a2");
        let page2 = s.list("alice", Some(page1[1].seq), 2);
        assert_eq!(page2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a3", "a4"]);
        assert_eq!(s.list("bob", None, 10).len(), 1);
        assert!(s.list("carol", None, 10).is_empty());
    }

    #[test]
    fn the_cap_is_enforced() {
        let s = MemoryStore::new();
        s.insert(record("a", "o", 1, 10), 1).unwrap();
        assert_eq!(s.insert(record("b", "o", 2, 10), 1), Err(StoreError::Full { limit: 1 }));
    }

    #[test]
    fn expiry_is_indexed() {
        let s = MemoryStore::new();
        s.insert(record("short", "o", 1, 10), 10).unwrap();
        s.insert(record("long", "o", 2, 10_000), 10).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(s.next_expiry(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(s.expired(t0 + Duration::from_secs(1)), vec!["short".to_string()]);
        s.remove("short");
        assert_eq!(s.len(), 1);
        assert!(s.expired(t0 + Duration::from_secs(1)).is_empty());
    }
}
