//! The file store's one writer: group commit, the durability rule, and compaction.
//!
//! Every write goes to one thread through a channel. The thread takes whatever is queued, applies it all
//! in one redb write transaction and commits once, so a burst of creates costs one fsync rather than one
//! each; then it answers each caller with its own result. An op is checked on its own inside the
//! transaction (caps, compare-and-set), so a refused op changes nothing and fails only its caller; an op
//! that fails mid-way (a damaged record, a write error) is taken out and the rest are applied again in a
//! fresh transaction; a failed commit fails the callers of that batch, with the store's error.
//!
//! Durability: a batch is fsynced (`Durability::Immediate`) before anyone in it is answered when it holds
//! a create or a change that must survive a crash (see [`needs_durability`]). A batch of only soft
//! changes (a status message, `working` ⇄ `input_required`, the deletion of an expired or discarded
//! task) commits with `Durability::None`: it is visible at once, and durable with the next fsynced
//! commit, which comes at the latest [`FLUSH_AFTER`] later (an idle writer commits an empty durable
//! transaction then, and so does a closing one). A crash in that window brings back the previous state of
//! those tasks, never a torn one.
//!
//! Compaction: redb files do not shrink when records are deleted. When the writer has deleted records
//! and then has nothing queued for [`IDLE`] (or after every [`COMPACT_CHECK_EVERY`] deletions), it
//! compares the pages in use with the file's length; a file of at least [`COMPACT_MIN_BYTES`] that is
//! at least three-quarters free is compacted in place. Compaction needs the database to itself, so
//! readers and the writer wait for it; it moves only the live pages, which are few by then.

use super::{BY_OWNER, BY_SEQ, EXPIRIES, META, OWNER_COUNT, TASKS};
use super::{decoded, io_hint, read_seq};
use crate::tasks::model::TaskRecord;
use crate::tasks::store::codec::{encode, ms};
use crate::tasks::store::{Caps, StoreError};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, WriteTransaction};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The longest a soft change stays non-durable.
pub const FLUSH_AFTER: Duration = Duration::from_millis(1000);
/// How long the writer waits with nothing queued before it looks at compaction.
pub const IDLE: Duration = Duration::from_millis(300);
/// Deletions after which a busy writer looks at compaction anyway.
pub const COMPACT_CHECK_EVERY: u64 = 20_000;
/// Smaller files are never compacted (redb's own layout takes about a megabyte).
pub const COMPACT_MIN_BYTES: u64 = 4 << 20;
/// The least time between two compactions that did not shrink the file.
const COMPACT_RETRY: Duration = Duration::from_secs(60);
/// The most ops in one transaction (a bound on a batch's work, not a queue limit).
const MAX_BATCH: usize = 4096;

/// A write, with where its answer goes.
pub enum Op {
    /// Adds a record within caps, numbering it.
    Insert { record: TaskRecord, caps: Caps, reply: oneshot::Sender<Result<TaskRecord, StoreError>> },
    /// Replaces the record's bytes with `next` if they are still `expected`; answers whether it did.
    Replace {
        id: String,
        expected: Vec<u8>,
        next: Vec<u8>,
        durable: bool,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Deletes a record and its index entries; answers the record if it was there.
    Remove { id: String, reply: oneshot::Sender<Result<Option<TaskRecord>, StoreError>> },
}

/// What an op produced inside a transaction, sent once the transaction committed.
enum Done {
    Inserted(Result<TaskRecord, StoreError>),
    Replaced(bool),
    Removed(Option<TaskRecord>),
}

impl Op {
    /// Whether the op must be on disk before its caller is answered.
    fn durable(&self) -> bool {
        match self {
            Op::Insert { .. } => true,
            Op::Replace { durable, .. } => *durable,
            Op::Remove { .. } => false,
        }
    }

    fn answer(self, done: Done) {
        // A caller that went away (its future dropped) does not need the answer.
        match (self, done) {
            (Op::Insert { reply, .. }, Done::Inserted(r)) => drop(reply.send(r)),
            (Op::Replace { reply, .. }, Done::Replaced(r)) => drop(reply.send(Ok(r))),
            (Op::Remove { reply, .. }, Done::Removed(r)) => drop(reply.send(Ok(r))),
            (op, _) => op.fail(StoreError::Failed {
                store: String::new(),
                reason: "internal error: an answer of the wrong kind".into(),
            }),
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Op::Insert { reply, .. } => drop(reply.send(Err(e))),
            Op::Replace { reply, .. } => drop(reply.send(Err(e))),
            Op::Remove { reply, .. } => drop(reply.send(Err(e))),
        }
    }

    fn apply(&self, tx: &WriteTransaction) -> Result<Done, redb::Error> {
        match self {
            Op::Insert { record, caps, .. } => insert(tx, record, *caps).map(Done::Inserted),
            Op::Replace { id, expected, next, .. } => {
                let mut tasks = tx.open_table(TASKS)?;
                let same = tasks.get(id.as_str())?.is_some_and(|v| v.value() == expected.as_slice());
                if same {
                    tasks.insert(id.as_str(), next.as_slice())?;
                }
                Ok(Done::Replaced(same))
            }
            Op::Remove { id, .. } => remove(tx, id).map(Done::Removed),
        }
    }
}

/// Whether a change from `before` to `after` must be fsynced before it is acknowledged: anything but a
/// soft change. Soft: the status moving between `working` and `input_required`, its message, and the
/// times that go with them. A terminal status, the result, the runner or the upstream task id (what
/// recovery after a crash reads) are never soft.
pub fn needs_durability(before: &TaskRecord, after: &TaskRecord) -> bool {
    if before.status.is_terminal() || after.status.is_terminal() {
        return true;
    }
    let mut hard_part = after.clone();
    hard_part.status = before.status;
    hard_part.status_message.clone_from(&before.status_message);
    hard_part.last_updated_at = before.last_updated_at;
    hard_part.state_since = before.state_since;
    encode(&hard_part) != encode(before)
}

fn insert(
    tx: &WriteTransaction,
    record: &TaskRecord,
    caps: Caps,
) -> Result<Result<TaskRecord, StoreError>, redb::Error> {
    let mut record = record.clone();
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
    Ok(Ok(record))
}

fn remove(tx: &WriteTransaction, id: &str) -> Result<Option<TaskRecord>, redb::Error> {
    let mut tasks = tx.open_table(TASKS)?;
    let record = match tasks.remove(id)? {
        Some(v) => decoded(v.value())?,
        None => return Ok(None),
    };
    tx.open_table(BY_OWNER)?.remove((record.owner.as_str(), record.seq))?;
    tx.open_table(BY_SEQ)?.remove(record.seq)?;
    tx.open_table(EXPIRIES)?.remove((ms(record.expires_at()), record.id.as_str()))?;
    let mut counts = tx.open_table(OWNER_COUNT)?;
    let owned = counts.get(record.owner.as_str())?.map_or(0, |v| v.value());
    if owned <= 1 {
        counts.remove(record.owner.as_str())?;
    } else {
        counts.insert(record.owner.as_str(), owned - 1)?;
    }
    Ok(Some(record))
}

/// The writer thread's state.
pub struct Writer {
    pub db: Arc<RwLock<Database>>,
    pub path: PathBuf,
    pub store: String,
    /// When the oldest commit not yet fsynced was made.
    dirty_since: Option<Instant>,
    /// Deletions since compaction was last looked at.
    removed: u64,
    /// When a compaction last ran, and whether it shrank the file.
    last_compaction: Option<(Instant, bool)>,
    /// Whether the last fsync of soft changes failed (a full disk): the next try waits a while.
    flush_failing: bool,
}

impl Writer {
    /// A writer for `db` (at `path`, described as `store` in errors).
    pub fn new(db: Arc<RwLock<Database>>, path: PathBuf, store: String) -> Writer {
        Writer { db, path, store, dirty_since: None, removed: 0, last_compaction: None, flush_failing: false }
    }

    /// Serves `ops` until every sender is gone, then makes everything durable.
    pub fn run(mut self, ops: Receiver<Op>) {
        loop {
            let wait = match (self.dirty_since, self.removed > 0) {
                // A failing disk is tried again once a second, not in a loop.
                (Some(_), _) if self.flush_failing => Some(FLUSH_AFTER),
                (Some(since), _) => Some(FLUSH_AFTER.saturating_sub(since.elapsed()).min(IDLE)),
                (None, true) => Some(IDLE),
                (None, false) => None,
            };
            let first = match wait {
                None => ops.recv().ok(),
                Some(wait) => match ops.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => {
                        self.idle();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.removed += batch.iter().filter(|op| matches!(op, Op::Remove { .. })).count() as u64;
            self.commit(batch);
            if self.removed >= COMPACT_CHECK_EVERY {
                self.maybe_compact();
            }
        }
        self.flush();
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Failed { store: self.store.clone(), reason: io_hint(&e.to_string()) }
    }

    /// Applies `batch` in one transaction and answers each op.
    fn commit(&mut self, mut batch: Vec<Op>) {
        let db = Arc::clone(&self.db);
        let db = db.read().unwrap_or_else(|e| e.into_inner());
        while !batch.is_empty() {
            let overdue = self.dirty_since.is_some_and(|since| since.elapsed() >= FLUSH_AFTER);
            let durable = overdue || batch.iter().any(Op::durable);
            let mut tx = match db.begin_write() {
                Ok(tx) => tx,
                Err(e) => {
                    let e = self.error(e);
                    batch.into_iter().for_each(|op| op.fail(e.clone()));
                    return;
                }
            };
            if !durable {
                // Refused only for a database shared between processes, which this one never is.
                let _ = tx.set_durability(Durability::None);
            }
            let mut done = Vec::with_capacity(batch.len());
            let mut broken = None;
            for (i, op) in batch.iter().enumerate() {
                match op.apply(&tx) {
                    Ok(d) => done.push(d),
                    Err(e) => {
                        broken = Some((i, e));
                        break;
                    }
                }
            }
            if let Some((i, e)) = broken {
                // Only this op fails; the others are applied again, without it, in a new transaction.
                let _ = tx.abort();
                let e = self.error(e);
                batch.remove(i).fail(e);
                continue;
            }
            match tx.commit() {
                Ok(()) => {
                    if durable {
                        (self.dirty_since, self.flush_failing) = (None, false);
                    } else {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    batch.into_iter().zip(done).for_each(|(op, d)| op.answer(d));
                }
                Err(e) => {
                    let e = self.error(e);
                    batch.into_iter().for_each(|op| op.fail(e.clone()));
                }
            }
            return;
        }
    }

    /// Nothing queued for a while: fsync what is not yet durable, then look at compaction.
    fn idle(&mut self) {
        self.flush();
        if self.removed > 0 && self.dirty_since.is_none() {
            self.maybe_compact();
        }
    }

    /// Makes every commit so far durable (an empty fsynced commit).
    fn flush(&mut self) {
        if self.dirty_since.is_none() {
            return;
        }
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        let flushed = db.begin_write().map_err(redb::Error::from).and_then(|tx| Ok(tx.commit()?));
        drop(db);
        match flushed {
            Ok(()) => (self.dirty_since, self.flush_failing) = (None, false),
            // Kept dirty: the next durable commit, or the next idle moment, tries again.
            Err(e) if !self.flush_failing => {
                self.flush_failing = true;
                tracing::warn!(store = %self.store, error = %self.error(e), "cannot fsync the task file now; will retry");
            }
            Err(e) => {
                tracing::debug!(store = %self.store, error = %self.error(e), "the task file still cannot be fsynced")
            }
        }
    }

    /// Compacts the file when it is big and mostly free.
    fn maybe_compact(&mut self) {
        self.removed = 0;
        if let Some((at, shrank)) = self.last_compaction
            && !shrank
            && at.elapsed() < COMPACT_RETRY
        {
            return;
        }
        let Ok(len) = std::fs::metadata(&self.path).map(|m| m.len()) else { return };
        if len < COMPACT_MIN_BYTES {
            return;
        }
        // redb releases the pages a transaction freed only after a later commit: when the file does
        // not look mostly free yet, measure again after one empty durable commit.
        let mut used = None;
        for look in 0..2 {
            let db = self.db.read().unwrap_or_else(|e| e.into_inner());
            let measured = db.begin_write().map_err(redb::Error::from).and_then(|tx| {
                if look == 1 {
                    tx.commit()?;
                    let tx = db.begin_write()?;
                    let stats = tx.stats()?;
                    tx.abort()?;
                    return Ok(stats.allocated_pages() * stats.page_size() as u64);
                }
                let stats = tx.stats()?;
                tx.abort()?;
                Ok(stats.allocated_pages() * stats.page_size() as u64)
            });
            match measured {
                Ok(u) if u.saturating_mul(4) <= len => {
                    used = Some(u);
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(store = %self.store, error = %self.error(e), "cannot measure the task file");
                    return;
                }
            }
        }
        let Some(used) = used else { return };
        let started = Instant::now();
        let compacted = {
            let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
            db.compact()
        };
        let after = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(len);
        self.last_compaction = Some((Instant::now(), after < len));
        match compacted {
            Ok(_) => tracing::info!(
                store = %self.store, before_bytes = len, after_bytes = after, in_use_bytes = used,
                took_ms = started.elapsed().as_millis() as u64, "task file compacted"
            ),
            Err(e) => tracing::warn!(store = %self.store, error = %e, "cannot compact the task file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::model::{Generation, Origin, TaskStatus};
    use redb::ReadableDatabase;
    use std::time::SystemTime;

    fn record(id: &str, owner: &str) -> TaskRecord {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        TaskRecord {
            id: id.into(),
            owner: owner.into(),
            tool: "t".into(),
            origin: Origin::Local,
            generation: Generation::Legacy,
            status: TaskStatus::Working,
            status_message: None,
            created_at: now,
            last_updated_at: now,
            state_since: now,
            ttl_ms: 60_000,
            poll_interval_ms: 1000,
            outcome: None,
            seq: 0,
            runner: Some("r1".into()),
            upstream_task: None,
        }
    }

    /// A writer on a fresh file with every table, and the file's directory (removed by the caller).
    fn writer(name: &str) -> (Writer, PathBuf) {
        let dir = std::env::temp_dir().join(format!("asyncify-writer-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tasks.redb");
        let db = Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(TASKS).unwrap();
        tx.open_table(BY_OWNER).unwrap();
        tx.open_table(OWNER_COUNT).unwrap();
        tx.open_table(BY_SEQ).unwrap();
        tx.open_table(EXPIRIES).unwrap();
        tx.open_table(META).unwrap();
        tx.commit().unwrap();
        (Writer::new(Arc::new(RwLock::new(db)), path, "file:test".into()), dir)
    }

    const CAPS: Caps = Caps { max_live: 100, max_per_owner: 2 };

    fn insert_op(r: TaskRecord) -> (Op, oneshot::Receiver<Result<TaskRecord, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (Op::Insert { record: r, caps: CAPS, reply }, answer)
    }

    #[test]
    fn one_failing_op_in_a_batch_fails_only_its_caller() {
        let (mut w, dir) = writer("batch");
        let (op, _) = insert_op(record("kept", "alice"));
        w.commit(vec![op]);
        // A record whose bytes do not decode: removing it fails mid-transaction.
        {
            let db = w.db.read().unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(TASKS).unwrap().insert("damaged", b"not a record".as_slice()).unwrap();
            tx.commit().unwrap();
        }
        let kept = record("kept", "alice");
        let mut kept_stored = kept.clone();
        kept_stored.seq = 1;
        let mut edited = kept_stored.clone();
        edited.status_message = Some("halfway".into());

        let (a, a_answer) = insert_op(record("a", "alice"));
        let (bad_remove, bad_answer) = oneshot::channel();
        let bad = Op::Remove { id: "damaged".into(), reply: bad_remove };
        let (over, over_answer) = insert_op(record("b", "alice"));
        let (stale_reply, stale_answer) = oneshot::channel();
        let stale = Op::Replace {
            id: "kept".into(),
            expected: encode(&kept),
            next: encode(&edited),
            durable: false,
            reply: stale_reply,
        };
        let (fresh_reply, fresh_answer) = oneshot::channel();
        let fresh = Op::Replace {
            id: "kept".into(),
            expected: encode(&kept_stored),
            next: encode(&edited),
            durable: false,
            reply: fresh_reply,
        };
        let (c, c_answer) = insert_op(record("c", "bob"));
        w.commit(vec![a, bad, over, stale, fresh, c]);

        let a = a_answer.blocking_recv().unwrap().expect("alice's second task fits her cap");
        let bad = bad_answer.blocking_recv().unwrap().expect_err("the damaged record cannot be read");
        assert!(matches!(bad, StoreError::Failed { .. }), "{bad:?}");
        assert_eq!(
            over_answer.blocking_recv().unwrap().unwrap_err(),
            StoreError::OwnerFull { limit: 2 },
            "alice's third is over her cap, counted with the second in the same batch"
        );
        assert!(!stale_answer.blocking_recv().unwrap().unwrap(), "compare-and-set against old bytes");
        assert!(fresh_answer.blocking_recv().unwrap().unwrap(), "compare-and-set against the stored bytes");
        let c = c_answer.blocking_recv().unwrap().expect("bob is within his cap");
        assert_eq!((a.seq, c.seq), (2, 3), "numbered in the order queued, without gaps");
        assert!(w.dirty_since.is_none(), "a batch with a create is fsynced");

        let db = w.db.read().unwrap();
        let tx = db.begin_read().unwrap();
        let tasks = tx.open_table(TASKS).unwrap();
        assert_eq!(tasks.len().unwrap(), 4, "kept, damaged (still there), a, c");
        let stored = decoded(tasks.get("kept").unwrap().unwrap().value()).unwrap();
        assert_eq!(stored.status_message.as_deref(), Some("halfway"));
        assert!(tasks.get("b").unwrap().is_none(), "refused = not stored");
        drop((tasks, tx, db));
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn soft_changes_wait_for_the_next_fsync_and_hard_ones_do_not() {
        let (mut w, dir) = writer("durability");
        let (op, answer) = insert_op(record("t", "alice"));
        w.commit(vec![op]);
        let before = answer.blocking_recv().unwrap().unwrap();
        let mut soft = before.clone();
        soft.status = TaskStatus::InputRequired;
        soft.status_message = Some("waiting for your answer".into());
        soft.last_updated_at += Duration::from_millis(5);
        soft.state_since = soft.last_updated_at;
        assert!(!needs_durability(&before, &soft));
        let (reply, answer) = oneshot::channel();
        let replace = Op::Replace {
            id: "t".into(),
            expected: encode(&before),
            next: encode(&soft),
            durable: false,
            reply,
        };
        w.commit(vec![replace]);
        assert!(answer.blocking_recv().unwrap().unwrap());
        assert!(w.dirty_since.is_some(), "a soft change alone is not fsynced");
        w.flush();
        assert!(w.dirty_since.is_none(), "the idle flush makes it durable");

        for hard in [
            |r: &mut TaskRecord| r.status = TaskStatus::Completed,
            |r: &mut TaskRecord| r.upstream_task = Some("notion-1".into()),
            |r: &mut TaskRecord| r.runner = Some("another process".into()),
            |r: &mut TaskRecord| r.ttl_ms += 1,
        ] {
            let mut after = soft.clone();
            hard(&mut after);
            assert!(needs_durability(&soft, &after), "{after:?}");
        }
        let mut done = soft.clone();
        done.status = TaskStatus::Completed;
        let mut noted = done.clone();
        noted.status_message = Some("a note on a finished task".into());
        assert!(needs_durability(&done, &noted), "a terminal record's every change is durable");
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_mostly_free_file_is_compacted_and_shrinks() {
        let (mut w, dir) = writer("compact");
        let caps = Caps { max_live: 100_000, max_per_owner: 100_000 };
        // Few records with big results keep the test quick in a debug build: the file grows past the
        // floor all the same.
        let big = "x".repeat(6000);
        for chunk in 0..3 {
            let mut ops = Vec::new();
            for i in 0..500 {
                let mut r = record(&format!("t{chunk}-{i}"), "alice");
                r.status_message = Some(big.clone());
                let (reply, _) = oneshot::channel();
                ops.push(Op::Insert { record: r, caps, reply });
            }
            w.commit(ops);
        }
        let full = std::fs::metadata(&w.path).unwrap().len();
        assert!(full > COMPACT_MIN_BYTES, "{full} bytes");
        let mut ops = Vec::new();
        for chunk in 0..3 {
            for i in 0..500 {
                let (reply, _) = oneshot::channel();
                ops.push(Op::Remove { id: format!("t{chunk}-{i}"), reply });
            }
        }
        w.removed = ops.len() as u64;
        w.commit(ops);
        assert!(w.dirty_since.is_some(), "deletions are soft");
        w.idle();
        let after = std::fs::metadata(&w.path).unwrap().len();
        assert!(after * 4 < full, "the file shrank from {full} to {after} bytes");
        assert_eq!(w.removed, 0);
        drop(w);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
