//! Where tasks live. The engine talks to a [`TaskStore`] and never knows which one it is.
//!
//! Three stores keep one contract (proved by one test suite, `tests/stores.rs`):
//! [`memory::MemoryStore`] (a process's own tasks, gone with it), [`file::FileStore`] (an embedded redb
//! file: tasks survive a restart or a `kill -9`) and [`redis::RedisStore`] (Redis or Valkey: tasks,
//! waits and status changes shared by replicas). An insert and every change recovery or a client's
//! result depends on are durable when the call returns, which is what lets the proxy answer
//! `CreateTaskResult` only for a task that survives a crash; the file store lets soft changes (a status
//! message, `working` ⇄ `input_required`, deletions) become durable up to a second later (see
//! [`file::FileStore`]).
//!
//! [`measured::Measured`] wraps whichever store is open to time every operation, count its errors and
//! keep the health that `/healthz` reports.

mod codec;
pub mod file;
pub mod measured;
pub mod memory;
pub mod redis;

use super::model::TaskRecord;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::broadcast;

/// Why a store operation failed.
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
    /// The owner's own cap on live tasks is reached.
    #[error(
        "too many live tasks for this client (the limit per client is {limit}); wait for some of yours to finish or expire, or raise tasks.max_tasks_per_owner"
    )]
    OwnerFull {
        /// The cap.
        limit: usize,
    },
    /// The store cannot be reached (Redis down, a connection lost); the store retries by itself.
    #[error("the task store is unavailable ({store}): {reason}")]
    Unavailable {
        /// Which store (never with a password).
        store: String,
        /// What went wrong.
        reason: String,
    },
    /// The store refused a write or a read (a full disk, a read-only file, a damaged file).
    #[error("the task store failed ({store}): {reason}")]
    Failed {
        /// Which store.
        store: String,
        /// What went wrong.
        reason: String,
    },
}

impl StoreError {
    /// Whether the error is a cap (the client's to act on) rather than a store fault.
    pub fn is_cap(&self) -> bool {
        matches!(self, StoreError::Full { .. } | StoreError::OwnerFull { .. })
    }
}

/// The caps checked when a task is inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// The most records in the store.
    pub max_live: usize,
    /// The most records of one owner.
    pub max_per_owner: usize,
}

/// A change made to a task by another process sharing the store (another replica on one Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The task changed (or was created); read it again.
    Task(String),
    /// The task was deleted.
    Removed(String),
    /// Changes may have been missed (the connection to the store was lost and is back): every waiter
    /// should look again.
    Resync,
}

/// A change to a record: edits it and says whether to keep the edit.
pub type Edit<'a> = dyn for<'r> Fn(&'r mut TaskRecord) -> bool + Send + Sync + 'a;

/// Storage of task records. Inserts, terminal transitions and the fields recovery reads are durable
/// when the call returns (soft changes may follow shortly after, see [`file::FileStore`]).
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// What the store is, for logs and errors (`memory`, `file:/path`, `redis://host:port/0`; never a
    /// password).
    fn describe(&self) -> String;

    /// Adds a new record within `caps`, numbering it (`seq`, increasing across the store's whole life,
    /// so that `tasks/list` cursors stay valid across restarts and replicas). Returns the record as
    /// stored.
    async fn insert(&self, record: TaskRecord, caps: Caps) -> Result<TaskRecord, StoreError>;

    /// The record with this id, if any (and not expired).
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// Applies `change` atomically: when it returns `true` the change is kept and `(before, after)`
    /// returned; otherwise nothing changes and `None` is returned. `change` may run more than once
    /// (optimistic stores retry on a concurrent write), so it must depend only on the record it is given.
    async fn update(
        &self,
        id: &str,
        change: &Edit<'_>,
    ) -> Result<Option<(TaskRecord, TaskRecord)>, StoreError>;

    /// Up to `limit` records of `owner` (every owner's with `None`) numbered after `after_seq`, oldest
    /// first.
    async fn list(
        &self,
        owner: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError>;

    /// Deletes a record; `None` if it was not there (so of two racing removers only one gets it).
    async fn remove(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// Ids of up to `limit` records whose ttl has elapsed at `now`.
    async fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<String>, StoreError>;

    /// The earliest expiry time, if any record exists.
    async fn next_expiry(&self) -> Result<Option<SystemTime>, StoreError>;

    /// How many records exist.
    async fn len(&self) -> Result<usize, StoreError>;

    /// Whether no record exists.
    async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len().await? == 0)
    }

    /// Records that are not terminal (for recovery on start).
    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The 32-byte secret of this store, made once and kept with it (HMAC key of owner bindings): every
    /// process that opens the store derives the same owners from the same credential.
    async fn secret(&self) -> Result<[u8; 32], StoreError>;

    /// Changes made by other processes, for stores shared between processes; `None` for a store only
    /// this process uses.
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        None
    }

    /// Marks `runner` (a process) alive for a while; shared stores keep the mark with a ttl, so a dead
    /// process's tasks can be told apart from a living replica's.
    async fn heartbeat(&self, _runner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether `runner` (another process) is alive. A store only one process opens at a time knows that
    /// any other runner is dead.
    async fn runner_alive(&self, _runner: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
}

pub use crate::config::{StoreUrl, redact};

/// The directory where the proxy keeps its data: `$MCP_ASYNCIFY_DATA_DIR`, else
/// `$XDG_DATA_HOME/mcp-asyncify`, else `~/.local/share/mcp-asyncify`.
pub fn data_dir() -> Option<std::path::PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    var("MCP_ASYNCIFY_DATA_DIR")
        .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("mcp-asyncify")))
        .or_else(|| var("HOME").map(|h| h.join(".local/share/mcp-asyncify")))
}

/// The default task file of an upstream (named by its command line or URL): one file per upstream
/// identity under [`data_dir`], so two different servers never share tasks and a restarted wrapper of
/// the same one finds its own.
pub fn default_file(identity: &str) -> Option<std::path::PathBuf> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(identity.as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(data_dir()?.join("tasks").join(format!("{name}.redb")))
}

/// Opens the store `url` names, measured (see [`measured`]). A store that cannot be opened is a clear
/// error: Redis down at start, a file that cannot be created or is locked by another process.
pub async fn open(url: &StoreUrl) -> Result<Arc<dyn TaskStore>, StoreError> {
    let store: Arc<dyn TaskStore> = match url {
        StoreUrl::Memory => Arc::new(memory::MemoryStore::new()),
        StoreUrl::File(path) => Arc::new(file::FileStore::open(path).await?),
        StoreUrl::Redis(u) => Arc::new(redis::RedisStore::connect(u).await?),
    };
    Ok(Arc::new(measured::Measured::new(store)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_or_say_what_is_allowed() {
        assert_eq!(StoreUrl::parse("memory"), Ok(StoreUrl::Memory));
        assert_eq!(StoreUrl::parse("file:/tmp/t.redb"), Ok(StoreUrl::File("/tmp/t.redb".into())));
        assert_eq!(StoreUrl::parse("file:rel.redb"), Ok(StoreUrl::File("rel.redb".into())));
        assert!(matches!(StoreUrl::parse("redis://127.0.0.1:6379/2"), Ok(StoreUrl::Redis(_))));
        assert!(matches!(StoreUrl::parse("rediss://h:6380"), Ok(StoreUrl::Redis(_))));
        assert!(StoreUrl::parse("file:").unwrap_err().contains("needs a path"));
        let e = StoreUrl::parse("postgres://u:secret@h/db").unwrap_err();
        assert!(e.contains("memory, file:PATH or redis://") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://user:pw@h:1"), "redis://user:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(StoreUrl::Redis("rediss://a:b@h".into()).describe(), "rediss://a:***@h");
    }
}
