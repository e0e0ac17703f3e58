//! The file store: an embedded redb database, so tasks survive a restart or a `kill -9`.
//!
//! redb commits are copy-on-write with a checksummed commit slot: a crash at any moment leaves either
//! the previous or the new state, never a torn one. Writes go through one writer thread that commits
//! whatever is queued in one transaction (group commit, see `file/writer.rs`); a create or any change that
//! recovery depends on is fsynced before its caller is answered, a soft change (a status message,
//! `working` ⇄ `input_required`, deleting an expired task) within [`FLUSH_AFTER`]. Reads run on
//! tokio's blocking pool, each in its own read transaction, alongside the writer. The file holds
//! results, so it is created `0600`; redb locks it, so one process at a time opens it (a second gets a
//! clear error naming the file).

mod writer;

use super::codec::{decode, encode, ms, time};
use super::{Caps, Edit, StoreError, TaskStore};
use crate::tasks::model::TaskRecord;
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use writer::{Op, Writer};

pub use writer::{COMPACT_MIN_BYTES, FLUSH_AFTER};

/// Records by id.
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Ids by (owner, seq): one owner's tasks in creation order.
const BY_OWNER: TableDefinition<(&str, u64), &str> = TableDefinition::new("by_owner");
/// How many records each owner has (for the per-owner cap without a scan).
const OWNER_COUNT: TableDefinition<&str, u64> = TableDefinition::new("owner_count");
/// Ids by seq: every task in creation order (the admin listing).
const BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("by_seq");
/// Ids by (expiry in ms, id).
const EXPIRIES: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiries");
/// `next_seq` (u64, little endian) and `secret` (32 bytes).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// How long opening waits for a file another process still holds (a restart overlapping its
/// predecessor's exit).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Tasks in a redb file.
pub struct FileStore {
    /// Shared by readers and the writer; compaction alone takes it exclusively.
    db: Arc<RwLock<Database>>,
    path: PathBuf,
    secret: [u8; 32],
    /// The writer thread's queue; `None` once closing.
    writes: Option<mpsc::Sender<Op>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl FileStore {
    /// Opens (or creates, with its directory) the file at `path`.
    pub async fn open(path: &Path) -> Result<FileStore, StoreError> {
        let path = path.to_path_buf();
        let describe = format!("file:{}", path.display());
        let fail = |reason: String| StoreError::Failed { store: describe.clone(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create the directory {}: {e}", dir.display())))?;
        }
        let started = std::time::Instant::now();
        let db = loop {
            let p = path.clone();
            let opened = tokio::task::spawn_blocking(move || Database::create(&p))
                .await
                .map_err(|e| fail(e.to_string()))?;
            match opened {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(fail(
                        "the file is in use by another mcp-asyncify process (one process per task file: give \
                         each its own --store file, or share tasks with --store redis://…)"
                            .into(),
                    ));
                }
                Err(e) => {
                    return Err(fail(format!("cannot open the task file: {}", io_hint(&e.to_string()))));
                }
            }
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Best effort: a file we cannot chmod (not ours) was still opened for writing.
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        let db = Arc::new(RwLock::new(db));
        let secret = blocking(db.clone(), describe.clone(), move |db| {
            let tx = db.begin_write()?;
            let secret = {
                // Every table exists from the first open on, so readers never meet a missing one.
                tx.open_table(TASKS)?;
                tx.open_table(BY_OWNER)?;
                tx.open_table(OWNER_COUNT)?;
                tx.open_table(BY_SEQ)?;
                tx.open_table(EXPIRIES)?;
                let mut meta = tx.open_table(META)?;
                let existing = meta.get("secret")?.map(|v| v.value().to_vec());
                match existing {
                    Some(s) if s.len() == 32 => s.try_into().expect("32 bytes"),
                    _ => {
                        let mut s = [0u8; 32];
                        s[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                        s[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                        meta.insert("secret", s.as_slice())?;
                        s
                    }
                }
            };
            tx.commit()?;
            Ok(secret)
        })
        .await?;
        let (writes, queue) = mpsc::channel();
        let writer = Writer::new(db.clone(), path.clone(), describe.clone());
        let writer = std::thread::Builder::new()
            .name("task-file-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        tracing::debug!(store = %describe, "task file open");
        Ok(FileStore { db, path, secret, writes: Some(writes), writer: Some(writer) })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        blocking(self.db.clone(), self.describe(), f).await
    }

    /// Hands a write to the writer thread and waits for its answer.
    async fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::Failed {
            store: self.describe(),
            reason: "the task file's writer has stopped (the store is closing)".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.writes.as_ref().ok_or_else(stopped)?.send(op(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for FileStore {
    /// Closes the queue and waits for the writer to make everything durable and let go of the file, so
    /// that the file can be opened again as soon as the store is gone.
    fn drop(&mut self) {
        self.writes = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Runs a redb read on the blocking pool, turning its errors into a [`StoreError`] a person can act on.
async fn blocking<T, F>(db: Arc<RwLock<Database>>, store: String, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
{
    let read = move || f(&db.read().unwrap_or_else(|e| e.into_inner()));
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Failed { store, reason: io_hint(&e.to_string()) }),
        Err(e) => Err(StoreError::Failed { store, reason: format!("the store operation panicked: {e}") }),
    }
}

/// Adds what to do to the common I/O failures.
fn io_hint(error: &str) -> String {
    let lower = error.to_lowercase();
    if lower.contains("no space left") {
        format!("{error} (the disk is full: free space, or lower tasks.max_ttl_ms so tasks expire sooner)")
    } else if lower.contains("read-only") || lower.contains("permission denied") {
        format!("{error} (the task file cannot be written: check its permissions, or choose another --store)")
    } else {
        error.to_string()
    }
}

fn read_seq(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64, redb::Error> {
    Ok(meta.get("next_seq")?.and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes)).unwrap_or(1))
}

fn decoded(bytes: &[u8]) -> Result<TaskRecord, redb::Error> {
    decode(bytes).map_err(|e| redb::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[async_trait]
impl TaskStore for FileStore {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn insert(&self, record: TaskRecord, caps: Caps) -> Result<TaskRecord, StoreError> {
        self.write(|reply| Op::Insert { record, caps, reply }).await
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |db| {
            let tx = db.begin_read()?;
            let tasks = tx.open_table(TASKS)?;
            let found = tasks.get(id.as_str())?;
            found.map(|v| decoded(v.value())).transpose()
        })
        .await
    }

    async fn update(
        &self,
        id: &str,
        change: &Edit<'_>,
    ) -> Result<Option<(TaskRecord, TaskRecord)>, StoreError> {
        // The change runs here, not on the writer (it borrows), between a read and a compare-and-write
        // the writer applies in its transaction.
        loop {
            let Some(before) = self.get(id).await? else { return Ok(None) };
            let mut after = before.clone();
            if !change(&mut after) {
                return Ok(None);
            }
            let durable = writer::needs_durability(&before, &after);
            let (expected, next) = (encode(&before), encode(&after));
            let id = id.to_owned();
            if self.write(|reply| Op::Replace { id, expected, next, durable, reply }).await? {
                return Ok(Some((before, after)));
            }
            // Another writer changed it between the read and the write: look again.
        }
    }

    async fn list(
        &self,
        owner: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let owner = owner.map(str::to_owned);
        self.run(move |db| {
            let tx = db.begin_read()?;
            let tasks = tx.open_table(TASKS)?;
            let from = after_seq.map_or(0, |s| s.saturating_add(1));
            let mut ids = Vec::new();
            match &owner {
                Some(owner) => {
                    let index = tx.open_table(BY_OWNER)?;
                    for entry in index.range((owner.as_str(), from)..=(owner.as_str(), u64::MAX))?.take(limit)
                    {
                        ids.push(entry?.1.value().to_owned());
                    }
                }
                None => {
                    let index = tx.open_table(BY_SEQ)?;
                    for entry in index.range(from..)?.take(limit) {
                        ids.push(entry?.1.value().to_owned());
                    }
                }
            }
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(v) = tasks.get(id.as_str())? {
                    out.push(decoded(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn remove(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.to_owned();
        self.write(|reply| Op::Remove { id, reply }).await
    }

    async fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let now = ms(now);
        self.run(move |db| {
            let tx = db.begin_read()?;
            let index = tx.open_table(EXPIRIES)?;
            let mut out = Vec::new();
            for entry in index.iter()?.take(limit) {
                let (key, _) = entry?;
                let (at, id) = key.value();
                if at > now {
                    break;
                }
                out.push(id.to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn next_expiry(&self) -> Result<Option<SystemTime>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read()?;
            let index = tx.open_table(EXPIRIES)?;
            let first = index.first()?.map(|(k, _)| time(k.value().0));
            Ok(first)
        })
        .await
    }

    async fn len(&self) -> Result<usize, StoreError> {
        self.run(|db| Ok(db.begin_read()?.open_table(TASKS)?.len()? as usize)).await
    }

    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read()?;
            let tasks = tx.open_table(TASKS)?;
            let mut out = Vec::new();
            for entry in tasks.iter()? {
                let record = decoded(entry?.1.value())?;
                if !record.status.is_terminal() {
                    out.push(record);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|db| {
            db.begin_read()?.open_table(META)?;
            Ok(())
        })
        .await
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.secret)
    }
}
