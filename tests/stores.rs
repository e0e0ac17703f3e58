//! One contract, three stores: every test here runs against the memory store, a redb file in a temp
//! dir, and a real `redis-server` started for the test on a free 127.0.0.1 port (never skipped: a
//! missing redis-server fails the test with the command to install it).

mod common;

use mcp_asyncify::config::TasksConfig;
use mcp_asyncify::tasks::engine::TaskEngine;
use mcp_asyncify::tasks::model::{Generation, Origin, Outcome, TaskRecord, TaskStatus};
use mcp_asyncify::tasks::store::{self, Caps, Change, StoreError, StoreUrl, TaskStore};
use proptest::prelude::*;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A redis-server of the test's own, killed when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = common::fresh_dir("redis");
        Self::start_on(free_port(), dir)
    }

    fn start_on(port: u16, dir: std::path::PathBuf) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed by the store tests (apt-get install redis-server; .ci/run installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (kill -9) and starts a new one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Self::start_on(self.port, self.dir.clone());
        let old = std::mem::replace(self, fresh);
        std::mem::forget(old);
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The three stores, each fresh.
enum Kind {
    Memory,
    File,
    Redis,
}

struct Fixture {
    url: StoreUrl,
    _redis: Option<Redis>,
    _dir: Option<std::path::PathBuf>,
}

impl Fixture {
    fn new(kind: Kind) -> Fixture {
        match kind {
            Kind::Memory => Fixture { url: StoreUrl::Memory, _redis: None, _dir: None },
            Kind::File => {
                let dir = common::fresh_dir("store");
                Fixture { url: StoreUrl::File(dir.join("tasks.redb")), _redis: None, _dir: Some(dir) }
            }
            Kind::Redis => {
                let r = Redis::start();
                Fixture { url: StoreUrl::Redis(r.url()), _redis: Some(r), _dir: None }
            }
        }
    }

    async fn open(&self) -> Arc<dyn TaskStore> {
        store::open(&self.url).await.expect("open the store")
    }
}

fn record(id: &str, owner: &str, ttl_ms: u64) -> TaskRecord {
    let now = SystemTime::now();
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
        ttl_ms,
        poll_interval_ms: 1000,
        outcome: None,
        seq: 0,
        runner: Some("r1".into()),
        upstream_task: None,
    }
}

const CAPS: Caps = Caps { max_live: 1000, max_per_owner: 1000 };

fn ids(records: &[TaskRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

async fn lists_per_owner_in_creation_order_with_cursors_that_survive_deletes(s: Arc<dyn TaskStore>) {
    for i in 0..5 {
        s.insert(record(&format!("a{i}"), "alice", 60_000), CAPS).await.unwrap();
    }
    s.insert(record("b0", "bob", 60_000), CAPS).await.unwrap();
    let page1 = s.list(Some("alice"), None, 2).await.unwrap();
    assert_eq!(ids(&page1), ["a0", "a1"]);
    assert!(page1[0].seq < page1[1].seq, "numbered in creation order");
    s.remove("a2").await.unwrap();
    s.remove("a1").await.unwrap();
    let page2 = s.list(Some("alice"), Some(page1[1].seq), 2).await.unwrap();
    assert_eq!(ids(&page2), ["a3", "a4"], "a cursor past a deleted task stays valid");
    assert_eq!(ids(&s.list(Some("bob"), None, 10).await.unwrap()), ["b0"]);
    assert!(s.list(Some("carol"), None, 10).await.unwrap().is_empty());
    assert_eq!(ids(&s.list(None, None, 10).await.unwrap()), ["a0", "a3", "a4", "b0"], "the admin listing");
    assert_eq!(s.len().await.unwrap(), 4);
}

async fn caps_are_global_and_per_owner(s: Arc<dyn TaskStore>) {
    let caps = Caps { max_live: 3, max_per_owner: 2 };
    s.insert(record("a", "alice", 60_000), caps).await.unwrap();
    s.insert(record("b", "alice", 60_000), caps).await.unwrap();
    assert_eq!(
        s.insert(record("c", "alice", 60_000), caps).await.unwrap_err(),
        StoreError::OwnerFull { limit: 2 }
    );
    s.insert(record("d", "bob", 60_000), caps).await.unwrap();
    assert_eq!(
        s.insert(record("e", "carol", 60_000), caps).await.unwrap_err(),
        StoreError::Full { limit: 3 }
    );
    assert!(
        s.get("c").await.unwrap().is_none() && s.get("e").await.unwrap().is_none(),
        "refused = not stored"
    );
    s.remove("a").await.unwrap();
    s.insert(record("f", "alice", 60_000), caps).await.expect("a freed slot is usable again");
}

async fn terminal_states_never_change_even_when_writers_race(s: Arc<dyn TaskStore>) {
    s.insert(record("t", "o", 60_000), CAPS).await.unwrap();
    let racers: Vec<_> = [TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Cancelled]
        .into_iter()
        .cycle()
        .take(12)
        .map(|status| {
            let s = s.clone();
            tokio::spawn(async move {
                s.update("t", &|r| {
                    if !r.status.can_become(status) {
                        return false;
                    }
                    r.status = status;
                    true
                })
                .await
                .unwrap()
                .map(|(_, after)| after.status)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for r in racers {
        if let Some(status) = r.await.unwrap() {
            winners.push(status);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer ends the task: {winners:?}");
    assert_eq!(s.get("t").await.unwrap().unwrap().status, winners[0]);
    let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
    let (before, after) = s
        .update("t", &|r| {
            r.status_message = Some("note".into());
            r.outcome = Some(Outcome::Result(raw.clone()));
            true
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((before.status_message, after.status_message.as_deref()), (None, Some("note")));
    assert!(s.update("missing", &|_| true).await.unwrap().is_none());
}

async fn expiry_is_indexed_and_removal_happens_once(s: Arc<dyn TaskStore>) {
    let short = s.insert(record("short", "o", 1000), CAPS).await.unwrap();
    s.insert(record("long", "o", 3_600_000), CAPS).await.unwrap();
    let next = s.next_expiry().await.unwrap().unwrap();
    let diff = next.duration_since(short.expires_at()).unwrap_or_else(|e| e.duration());
    assert!(diff < Duration::from_millis(2), "next expiry is the short task's");
    let later = SystemTime::now() + Duration::from_secs(2);
    assert_eq!(s.expired(later, 100).await.unwrap(), vec!["short".to_string()]);
    assert!(s.remove("short").await.unwrap().is_some());
    assert!(s.remove("short").await.unwrap().is_none(), "two removers: only one gets it");
    assert!(s.expired(later, 100).await.unwrap().is_empty());
    assert_eq!(s.len().await.unwrap(), 1);
}

async fn records_keep_everything_and_unfinished_ones_are_found(s: Arc<dyn TaskStore>) {
    let mut r = record("n", "o", 60_000);
    r.origin = Origin::Notion;
    r.upstream_task = Some("notion-42".into());
    r.status_message = Some("Notion task notion-42: running \"quoted\" ünïcode".into());
    let stored = s.insert(r.clone(), CAPS).await.unwrap();
    s.insert(record("done", "o", 60_000), CAPS).await.unwrap();
    s.update("done", &|r| {
        r.status = TaskStatus::Completed;
        true
    })
    .await
    .unwrap();
    let back = s.get("n").await.unwrap().unwrap();
    assert_eq!(back.status_message, r.status_message);
    assert_eq!(back.upstream_task.as_deref(), Some("notion-42"));
    assert_eq!((back.origin, back.seq, back.ttl_ms), (Origin::Notion, stored.seq, 60_000));
    let unfinished = s.unfinished().await.unwrap();
    assert_eq!(ids(&unfinished), ["n"]);
    s.ping().await.unwrap();
    assert_eq!(s.secret().await.unwrap(), s.secret().await.unwrap());
}

async fn an_engine_wakes_waiters_and_numbers_cursors(s: Arc<dyn TaskStore>) {
    let config = TasksConfig { list_page_size: 2, ..TasksConfig::default() };
    let e = TaskEngine::new(config, s);
    let t = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let waiter = {
        let (e, id) = (e.clone(), t.id.clone());
        tokio::spawn(async move { e.wait_terminal("me", &id).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
    e.finish(&t.id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert!(e.get("someone else", &t.id).await.is_none(), "bound to its owner");
    for _ in 0..3 {
        e.create("me", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
    }
    let (p1, c1) = e.list("me", None).await.unwrap();
    let (p2, c2) = e.list("me", c1.as_deref()).await.unwrap();
    assert_eq!((p1.len(), p2.len(), c2), (2, 2, None));
}

async fn concurrent_inserts_race_for_the_last_slots(s: Arc<dyn TaskStore>) {
    // 200 creates at once for 50 places (at most 30 each for alice and bob): a store that batches them
    // still counts each against the ones before it in the same batch.
    let caps = Caps { max_live: 50, max_per_owner: 30 };
    let racers: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            let owner = if i % 2 == 0 { "alice" } else { "bob" };
            tokio::spawn(
                async move { (owner, s.insert(record(&format!("r{i}"), owner, 60_000), caps).await) },
            )
        })
        .collect();
    let mut stored = Vec::new();
    let mut per_owner = std::collections::HashMap::new();
    for r in racers {
        match r.await.unwrap() {
            (owner, Ok(record)) => {
                *per_owner.entry(owner).or_insert(0) += 1;
                stored.push(record);
            }
            (_, Err(e)) => assert!(e.is_cap(), "only the caps refuse: {e}"),
        }
    }
    assert_eq!(stored.len(), 50, "exactly the global cap is admitted");
    assert!(per_owner.values().all(|&n| n <= 30), "{per_owner:?}");
    let mut seqs: Vec<u64> = stored.iter().map(|r| r.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 50, "every admitted task has its own number");
    assert_eq!(s.len().await.unwrap(), 50);
    let listed = s.list(None, None, 100).await.unwrap();
    assert_eq!(listed.len(), 50);
    assert!(listed.windows(2).all(|w| w[0].seq < w[1].seq), "listed in numbering order");
}

async fn a_refused_write_among_concurrent_ones_fails_only_its_caller(s: Arc<dyn TaskStore>) {
    s.insert(record("shared", "carol", 60_000), CAPS).await.unwrap();
    let caps = Caps { max_live: 1000, max_per_owner: 1 };
    let mut inserts = Vec::new();
    for i in 0..20 {
        // Twenty creates by one owner allowed one task, and twenty by owners of their own.
        let s1 = s.clone();
        inserts.push(tokio::spawn(async move {
            s1.insert(record(&format!("a{i}"), "alice", 60_000), caps).await
        }));
        let s2 = s.clone();
        inserts.push(tokio::spawn(async move {
            s2.insert(record(&format!("o{i}"), &format!("owner{i}"), 60_000), caps).await
        }));
    }
    let editors: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.update("shared", &move |r| {
                    r.status_message =
                        Some(format!("{} edit {i}", r.status_message.as_deref().unwrap_or("")));
                    true
                })
                .await
            })
        })
        .collect();
    let (mut alice, mut others, mut refused) = (0, 0, 0);
    for r in inserts {
        match r.await.unwrap() {
            Ok(t) if t.owner == "alice" => alice += 1,
            Ok(_) => others += 1,
            Err(StoreError::OwnerFull { limit: 1 }) => refused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((alice, others, refused), (1, 20, 19), "only alice's extra creates fail");
    for e in editors {
        assert!(e.await.unwrap().unwrap().is_some(), "every compare-and-set edit lands, retried if it raced");
    }
    let edits = s.get("shared").await.unwrap().unwrap().status_message.unwrap();
    assert_eq!(edits.matches("edit").count(), 20, "no edit lost: {edits}");
}

macro_rules! contract {
    ($($name:ident),*) => {
        mod memory {
            $(#[tokio::test] async fn $name() { let f = super::Fixture::new(super::Kind::Memory); super::$name(f.open().await).await; })*
        }
        mod file {
            $(#[tokio::test] async fn $name() { let f = super::Fixture::new(super::Kind::File); super::$name(f.open().await).await; })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() { let f = super::Fixture::new(super::Kind::Redis); super::$name(f.open().await).await; })*
        }
    };
}

contract!(
    lists_per_owner_in_creation_order_with_cursors_that_survive_deletes,
    caps_are_global_and_per_owner,
    terminal_states_never_change_even_when_writers_race,
    expiry_is_indexed_and_removal_happens_once,
    records_keep_everything_and_unfinished_ones_are_found,
    an_engine_wakes_waiters_and_numbers_cursors,
    concurrent_inserts_race_for_the_last_slots,
    a_refused_write_among_concurrent_ones_fails_only_its_caller
);

#[test]
fn what_a_client_was_told_survives_kill_9_of_the_wrapper() {
    // A task created (CreateTaskResult received) and a task whose result the client read are on disk
    // when the answers leave: a kill -9 right after them loses neither.
    let f = Fixture::new(Kind::File);
    let StoreUrl::File(path) = &f.url else { unreachable!() };
    let store = format!("file:{}", path.display());
    let mut p =
        common::Peer::start(&["--log-level", "warn", "--store", &store, "--", common::BIN, "test-server"]);
    p.initialize(serde_json::json!({"tasks": {"list": {}, "cancel": {}}}));
    let slow =
        p.ok(1, "tools/call", serde_json::json!({"name": "slow", "arguments": {"ms": 60_000}, "task": {}}));
    let slow = slow["task"]["taskId"].as_str().unwrap().to_owned();
    let quick = p.ok(
        2,
        "tools/call",
        serde_json::json!({"name": "slow", "arguments": {"ms": 0, "text": "kept"}, "task": {}}),
    );
    let quick = quick["task"]["taskId"].as_str().unwrap().to_owned();
    let read = p.ok(3, "tasks/result", serde_json::json!({"taskId": quick}));
    assert_eq!(common::text_of(&read), "kept");
    let _ = p.child.kill();
    let _ = p.child.wait();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let s = f.open().await;
        let quick = s.get(&quick).await.unwrap().expect("the task whose result was read");
        assert_eq!(quick.status, TaskStatus::Completed);
        let Some(Outcome::Result(raw)) = &quick.outcome else { panic!("{:?}", quick.outcome) };
        assert!(raw.get().contains("kept"), "{}", raw.get());
        assert!(s.get(&slow).await.unwrap().is_some(), "the task whose creation was answered");
    });
}

#[tokio::test]
async fn the_task_file_shrinks_once_its_tasks_have_expired() {
    let f = Fixture::new(Kind::File);
    let StoreUrl::File(path) = &f.url else { unreachable!() };
    let s = f.open().await;
    let caps = Caps { max_live: 100_000, max_per_owner: 100_000 };
    // Few tasks with big results keep the test quick in a debug build; the bench does 100k small ones.
    let raw = serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(6000))).unwrap();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (s, raw) = (s.clone(), raw.clone());
            tokio::spawn(async move {
                for i in 0..100 {
                    let mut r = record(&format!("t{w}-{i}"), "o", 1000);
                    r.status = TaskStatus::Completed;
                    r.outcome = Some(Outcome::Result(raw.clone()));
                    s.insert(r, caps).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let full = std::fs::metadata(path).unwrap().len();
    assert!(full > store::file::COMPACT_MIN_BYTES, "{full} bytes");
    let e = TaskEngine::new(TasksConfig::default(), s.clone());
    assert_eq!(e.sweep(SystemTime::now() + Duration::from_secs(2)).await, 1600);
    // The sweep's deletions leave the store idle: it compacts the file by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut now = full;
    while now * 4 > full {
        assert!(std::time::Instant::now() < deadline, "the file stayed at {now} bytes (was {full})");
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = std::fs::metadata(path).unwrap().len();
    }
    // Still a working store.
    s.insert(record("after", "o", 60_000), CAPS).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 1);
}

#[tokio::test]
async fn a_file_store_keeps_tasks_numbering_and_secret_across_reopens() {
    let f = Fixture::new(Kind::File);
    let (seq, secret) = {
        let s = f.open().await;
        let r = s.insert(record("kept", "o", 60_000), CAPS).await.unwrap();
        (r.seq, s.secret().await.unwrap())
    };
    let s = f.open().await;
    assert_eq!(s.get("kept").await.unwrap().unwrap().seq, seq);
    assert_eq!(s.secret().await.unwrap(), secret, "owners bound before the restart stay bound");
    assert!(s.insert(record("next", "o", 60_000), CAPS).await.unwrap().seq > seq, "numbering goes on");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let StoreUrl::File(path) = &f.url else { unreachable!() };
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the task file holds results: owner-only");
    }
}

#[tokio::test]
async fn a_file_store_in_use_or_unwritable_is_a_clear_error() {
    let f = Fixture::new(Kind::File);
    let _held = f.open().await;
    let err = match store::open(&f.url).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a second opener of one file must be refused"),
    };
    assert!(err.contains("in use by another mcp-asyncify process"), "{err}");
    let dir = common::fresh_dir("ro");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        let url = StoreUrl::File(dir.join("sub/tasks.redb"));
        // root ignores directory permissions; the test means something only for other users.
        if unsafe { libc::geteuid() } != 0 {
            let err = store::open(&url).await.err().expect("a read-only directory").to_string();
            assert!(err.contains("cannot"), "{err}");
        }
        let ro_file = dir.join("tasks.redb");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        drop(store::open(&StoreUrl::File(ro_file.clone())).await.unwrap());
        std::fs::set_permissions(&ro_file, std::fs::Permissions::from_mode(0o400)).unwrap();
        if unsafe { libc::geteuid() } != 0 {
            let err =
                store::open(&StoreUrl::File(ro_file)).await.err().expect("a read-only file").to_string();
            assert!(err.contains("task file"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_not_a_panic() {
    // /dev/full answers every write with ENOSPC: the store must say so, and keep answering.
    if !std::path::Path::new("/dev/full").exists() {
        panic!("/dev/full is needed by this test (Linux)");
    }
    let err = match store::open(&StoreUrl::File("/dev/full".into())).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("/dev/full cannot hold a store"),
    };
    assert!(err.contains("task store failed"), "{err}");
}

#[tokio::test]
async fn redis_down_at_start_is_a_clear_error() {
    let url = StoreUrl::Redis(format!("redis://127.0.0.1:{}/0", free_port()));
    let err = match store::open(&url).await {
        Err(e) => e,
        Ok(_) => panic!("nothing listens there"),
    };
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("is the server running"), "{err}");
}

#[tokio::test]
async fn redis_lost_while_running_fails_operations_clearly_then_reconnects() {
    let mut redis = Redis::start();
    let s = store::open(&StoreUrl::Redis(redis.url())).await.unwrap();
    s.insert(record("before", "o", 60_000), CAPS).await.unwrap();
    redis.stop();
    let err = s.insert(record("during", "o", 60_000), CAPS).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    redis.restart();
    // The connection manager reconnects with backoff: the store answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match s.insert(record("after", "o", 60_000), CAPS).await {
            Ok(_) => break,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "never reconnected: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(s.get("after").await.unwrap().is_some());
}

#[tokio::test]
async fn two_replicas_share_tasks_waits_and_cancels() {
    let redis = Redis::start();
    let url = StoreUrl::Redis(redis.url());
    let a = TaskEngine::new(TasksConfig::default(), store::open(&url).await.unwrap());
    let b = TaskEngine::new(TasksConfig::default(), store::open(&url).await.unwrap());
    // Created on A, seen at once on B (durable before the creation returned).
    let t = a.create("me", "slow", Origin::Local, Generation::Modern, None).await.unwrap();
    assert_eq!(b.get("me", &t.id).await.unwrap().status, TaskStatus::Working);
    // B waits; A completes; B wakes.
    let waiter = {
        let (b, id) = (b.clone(), t.id.clone());
        tokio::spawn(async move { b.wait_terminal("me", &id).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let raw = serde_json::value::RawValue::from_string("{\"content\":[]}".into()).unwrap();
    a.finish(&t.id, TaskStatus::Completed, None, Some(Outcome::Result(raw))).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("B woke").unwrap().unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    // Cancel on B stops the work running on A.
    let u = a.create("me", "slow", Origin::Local, Generation::Modern, None).await.unwrap();
    let stop = a.stop_signal(&u.id).await;
    let mut events = a.subscribe();
    b.cancel("me", &u.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), stop).await.expect("A's work was told to stop").unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.task.id == u.id && e.task.status == TaskStatus::Cancelled {
                return e;
            }
        }
    })
    .await
    .expect("A's clients hear of the cancel");
    assert_eq!(seen.owner, "me");
    // A store's changes feed says who changed what, never echoing one's own.
    let s = store::open(&url).await.unwrap();
    let mut feed = s.changes().expect("redis shares changes");
    a.set_status(&t.id, TaskStatus::Working, None).await; // refused: terminal, so no change
    let v = a.create("me", "x", Origin::Local, Generation::Legacy, None).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), feed.recv()).await.unwrap().unwrap();
    assert_eq!(change, Change::Task(v.id.clone()));
}

#[tokio::test]
async fn recovery_fails_lost_calls_and_hands_back_notion_tasks() {
    let f = Fixture::new(Kind::File);
    let (lost, notion) = {
        let e = TaskEngine::new(TasksConfig::default(), f.open().await);
        let lost = e.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
        let notion =
            e.create("me", "notion-create-pages", Origin::Notion, Generation::Legacy, None).await.unwrap();
        e.bind_upstream(&notion.id, "notion-task-7").await.unwrap();
        (lost, notion)
    };
    // The process "died"; a new one opens the same file.
    let e = TaskEngine::new(TasksConfig::default(), f.open().await);
    let resume = e.recover().await.unwrap();
    assert_eq!(resume.len(), 1);
    assert_eq!(resume[0].task.id, notion.id);
    assert_eq!(resume[0].task.upstream_task.as_deref(), Some("notion-task-7"));
    let failed = e.get("me", &lost.id).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    let msg = failed.status_message.unwrap();
    assert!(msg.contains("stopped (crash or restart)") && msg.contains("died with it"), "{msg}");
    assert_eq!(failed.created_at, lost.created_at, "timestamps kept");
    assert!(e.recover().await.unwrap().is_empty(), "taken over once");
}

#[tokio::test]
async fn a_live_replica_takes_over_the_tasks_of_one_that_died() {
    let redis = Redis::start();
    let url = StoreUrl::Redis(redis.url());
    let replica = || async {
        let e = TaskEngine::new(TasksConfig::default(), store::open(&url).await.unwrap());
        e.spawn_sweeper(Duration::from_secs(1));
        e.recover().await.unwrap();
        e
    };
    let (a, b, c) = (replica().await, replica().await, replica().await);
    let lost = a.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let notion =
        a.create("me", "notion-create-pages", Origin::Notion, Generation::Legacy, None).await.unwrap();
    a.bind_upstream(&notion.id, "notion-task-9").await.unwrap();
    let mine = b.create("me", "slow", Origin::Local, Generation::Legacy, None).await.unwrap();
    let (mut found_b, mut found_c) = (b.orphans_found(), c.orphans_found());
    // A dies (its heartbeat stops); B and C live on.
    let died = std::time::Instant::now();
    drop(a);
    let failed = tokio::time::timeout(Duration::from_secs(30), b.wait_terminal("me", &lost.id))
        .await
        .expect("the lost call failed within the bound")
        .unwrap();
    let took = died.elapsed();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert!(failed.status_message.unwrap().contains("stopped (crash or restart)"));
    // The Notion task goes to exactly one of the live replicas, to resume.
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! { _ = found_b.changed() => {}, _ = found_c.changed() => {} }
    })
    .await
    .expect("a replica took the Notion task");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ob, oc) = (b.take_orphans("me"), c.take_orphans("me"));
    let taken: Vec<_> = ob.iter().chain(&oc).map(|o| o.task.id.clone()).collect();
    assert_eq!(taken, vec![notion.id.clone()], "taken over once, by one replica");
    let resumed = b.store().get(&notion.id).await.unwrap().unwrap();
    assert_eq!(resumed.status, TaskStatus::Working);
    assert!(resumed.runner.as_deref() == Some(b.runner()) || resumed.runner.as_deref() == Some(c.runner()));
    // A live replica's own task is never taken.
    assert_eq!(b.get("me", &mine.id).await.unwrap().runner.as_deref(), Some(b.runner()));
    eprintln!("a dead replica's tasks were taken over {took:?} after it stopped");
}

/// The periodic takeover asks every replica's store for its unfinished tasks every few seconds: on
/// Redis they are read from an index of them, not found by reading every record. A store written
/// without the index (an older build) gets it on the next connect.
#[tokio::test]
async fn redis_reads_unfinished_tasks_from_an_index_of_them() {
    let redis = Redis::start();
    let url = StoreUrl::Redis(redis.url());
    let s = store::open(&url).await.unwrap();
    let caps = Caps { max_live: 10_000, max_per_owner: 10_000 };
    for i in 0..300 {
        s.insert(record(&format!("t{i}"), "o", 60_000), caps).await.unwrap();
        if i % 100 != 7 {
            s.update(&format!("t{i}"), &|r| {
                r.status = if i % 2 == 0 { TaskStatus::Completed } else { TaskStatus::Failed };
                true
            })
            .await
            .unwrap();
        }
    }
    s.update("t107", &|r| {
        r.status = TaskStatus::InputRequired;
        true
    })
    .await
    .unwrap();
    s.remove("t207").await.unwrap();
    let open = |s: Arc<dyn TaskStore>| async move {
        let mut found: Vec<String> = s.unfinished().await.unwrap().into_iter().map(|r| r.id).collect();
        found.sort();
        found
    };
    assert_eq!(open(s.clone()).await, ["t107", "t7"]);
    let mut conn =
        ::redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let indexed: usize = ::redis::cmd("ZCARD").arg("mcp-asyncify:open").query_async(&mut conn).await.unwrap();
    assert_eq!(indexed, 2, "only unfinished tasks are indexed");

    // As if written by a build without the index: the next store to connect builds it.
    let _: () = ::redis::cmd("DEL")
        .arg("mcp-asyncify:open")
        .arg("mcp-asyncify:open-indexed")
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(s);
    let s = store::open(&url).await.unwrap();
    assert_eq!(open(s.clone()).await, ["t107", "t7"]);
    let indexed: usize = ::redis::cmd("ZCARD").arg("mcp-asyncify:open").query_async(&mut conn).await.unwrap();
    assert_eq!(indexed, 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any sequence of requested transitions keeps the spec's machine: once terminal, nothing changes,
    /// and every change the engine accepted was one `can_become` allows.
    #[test]
    fn the_status_machine_holds_for_any_sequence(steps in proptest::collection::vec(0usize..5, 1..20)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let e = TaskEngine::new(TasksConfig::default(), store::open(&StoreUrl::Memory).await.unwrap());
            let t = e.create("me", "t", Origin::Local, Generation::Legacy, None).await.unwrap();
            let all = [TaskStatus::Working, TaskStatus::InputRequired, TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Cancelled];
            let mut current = TaskStatus::Working;
            for step in steps {
                let next = all[step];
                let changed = if next.is_terminal() {
                    e.finish(&t.id, next, None, None).await
                } else {
                    e.set_status(&t.id, next, None).await
                };
                let stored = e.get("me", &t.id).await.unwrap().status;
                if current.can_become(next) {
                    prop_assert!(changed.is_some());
                    prop_assert_eq!(stored, next);
                    current = next;
                } else {
                    prop_assert!(changed.is_none());
                    prop_assert_eq!(stored, current);
                }
            }
            Ok(())
        })?;
    }

    /// Paging through tasks/list while tasks are deleted between pages: no task is shown twice, order
    /// is creation order, and every task that lived through the whole listing is shown.
    #[test]
    fn list_cursors_hold_under_concurrent_deletes(
        count in 1usize..40,
        page in 1usize..7,
        deletes in proptest::collection::vec(0usize..40, 0..30),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let config = TasksConfig { list_page_size: page, ..TasksConfig::default() };
            let e = TaskEngine::new(config, store::open(&StoreUrl::Memory).await.unwrap());
            let mut created = Vec::new();
            for _ in 0..count {
                created.push(e.create("me", "t", Origin::Local, Generation::Legacy, None).await.unwrap().id);
            }
            let mut deleted = std::collections::HashSet::new();
            let mut deletes = deletes.into_iter();
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let (tasks, next) = e.list("me", cursor.as_deref()).await.unwrap();
                seen.extend(tasks.into_iter().map(|t| t.id));
                // A delete lands between two pages.
                if let Some(d) = deletes.next() {
                    let id = &created[d % count];
                    e.discard(id).await;
                    deleted.insert(id.clone());
                }
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
            prop_assert_eq!(unique.len(), seen.len(), "a task shown twice");
            let order: Vec<usize> = seen.iter().map(|id| created.iter().position(|c| c == id).unwrap()).collect();
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "creation order");
            for id in created.iter().filter(|id| !deleted.contains(*id)) {
                prop_assert!(unique.contains(id), "a task that lived throughout was skipped");
            }
            Ok(())
        })?;
    }
}
