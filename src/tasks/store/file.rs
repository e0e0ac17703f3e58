//! The file store: an embedded redb database, so tasks survive a restart or a `kill -9`.
//!
//! redb commits are copy-on-write with a checksummed commit slot, fsynced before `commit` returns: a
//! crash at any moment leaves either the previous or the new state, never a torn one, and everything
//! a call returned `Ok` for is on disk. redb's calls block, so each operation runs on tokio's blocking
//! pool; redb serializes writers itself. The file holds results, so it is created `0600`; redb locks it,
//! so one process at a time opens it (a second gets a clear error naming the file).

use super::codec::{decode, encode, ms, time};
use super::{Caps, Edit, StoreError, TaskStore};
use crate::tasks::model::TaskRecord;
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    db: Arc<Database>,
    path: PathBuf,
    secret: [u8; 32],
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
        let db = Arc::new(db);
        let store_name = describe.clone();
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
        tracing::debug!(store = %store_name, "task file open");
        Ok(FileStore { db, path, secret })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        blocking(self.db.clone(), self.describe(), f).await
    }
}

/// Runs a redb operation on the blocking pool, turning its errors into a [`StoreError`] a person can
/// act on.
async fn blocking<T, F>(db: Arc<Database>, store: String, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&db)).await {
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
        self.run(move |db| {
            let mut record = record;
            let tx = db.begin_write()?;
            {
                let mut tasks = tx.open_table(TASKS)?;
                if tasks.len()? >= caps.max_live as u64 {
                    return Ok(Err(StoreError::Full { limit: caps.max_live }));
                }
                let mut counts = tx.open_table(OWNER_COUNT)?;
                let owned = counts.get(record.owner.as_str())?.map_or(0, |v| v.value());
                if owned >= caps.max_per_owner as u64 {
                    return Ok(Err(StoreError::OwnerFull { limit: caps.max_per_owner }));
                }
                let mut meta = tx.open_table(META)?;
                record.seq = read_seq(&meta)?;
                meta.insert("next_seq", (record.seq + 1).to_le_bytes().as_slice())?;
                counts.insert(record.owner.as_str(), owned + 1)?;
                tasks.insert(record.id.as_str(), encode(&record).as_slice())?;
                tx.open_table(BY_OWNER)?.insert((record.owner.as_str(), record.seq), record.id.as_str())?;
                tx.open_table(BY_SEQ)?.insert(record.seq, record.id.as_str())?;
                tx.open_table(EXPIRIES)?.insert((ms(record.expires_at()), record.id.as_str()), ())?;
            }
            tx.commit()?;
            Ok(Ok(record))
        })
        .await?
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
        // redb's transactions are serialized: read, change and write in one is atomic. The change
        // runs here, not on the blocking pool (it borrows), between a read and a compare-and-write.
        loop {
            let Some(before) = self.get(id).await? else { return Ok(None) };
            let mut after = before.clone();
            if !change(&mut after) {
                return Ok(None);
            }
            let (expected, next) = (encode(&before), encode(&after));
            let id = id.to_owned();
            let written = self
                .run(move |db| {
                    let tx = db.begin_write()?;
                    let written = {
                        let mut tasks = tx.open_table(TASKS)?;
                        let same = tasks.get(id.as_str())?.is_some_and(|v| v.value() == expected.as_slice());
                        if same {
                            tasks.insert(id.as_str(), next.as_slice())?;
                        }
                        same
                    };
                    if written {
                        tx.commit()?;
                    } else {
                        tx.abort()?;
                    }
                    Ok(written)
                })
                .await?;
            if written {
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
        self.run(move |db| {
            let tx = db.begin_write()?;
            let removed = {
                let mut tasks = tx.open_table(TASKS)?;
                let record = match tasks.remove(id.as_str())? {
                    Some(v) => Some(decoded(v.value())?),
                    None => None,
                };
                if let Some(r) = &record {
                    tx.open_table(BY_OWNER)?.remove((r.owner.as_str(), r.seq))?;
                    tx.open_table(BY_SEQ)?.remove(r.seq)?;
                    tx.open_table(EXPIRIES)?.remove((ms(r.expires_at()), r.id.as_str()))?;
                    let mut counts = tx.open_table(OWNER_COUNT)?;
                    let owned = counts.get(r.owner.as_str())?.map_or(0, |v| v.value());
                    if owned <= 1 {
                        counts.remove(r.owner.as_str())?;
                    } else {
                        counts.insert(r.owner.as_str(), owned - 1)?;
                    }
                }
                record
            };
            if removed.is_some() {
                tx.commit()?;
            } else {
                tx.abort()?;
            }
            Ok(removed)
        })
        .await
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
