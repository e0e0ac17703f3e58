//! The Redis (or Valkey) store: tasks, waits and status changes shared by every replica on one server.
//!
//! Keys, under the prefix `mcp-asyncify:`:
//!
//! | key | what |
//! |---|---|
//! | `task:{id}` | the record (JSON), with a server-side expiry a minute after its ttl |
//! | `seq` | the counter that numbers records |
//! | `all` | zset of every id by seq (the admin listing) |
//! | `exp` | zset of every id by expiry (ms) |
//! | `owner:{owner}` / `owner-exp:{owner}` | zsets of one owner's ids by seq and by expiry |
//! | `open` | zset of the ids of unfinished tasks by seq (what the periodic takeover reads) |
//! | `open-indexed` | set once `open` holds every unfinished task (a store written before it is indexed on connect) |
//! | `secret` | the HMAC key of owner bindings (made once by whoever comes first) |
//! | `runner:{id}` | a replica's liveness mark, with a ttl it keeps refreshing |
//!
//! Inserts, transitions and removals are Lua scripts, so each is atomic on the server: the caps are
//! checked and the record numbered in one step, and a transition is a compare-and-set (two replicas
//! racing to end a task: one wins, the other sees the terminal status and leaves it). Each script
//! publishes what it changed on the `events` channel; every replica listens there, so a `tasks/result`
//! waiting on replica B wakes when replica A completes the task. The owners in key names are already
//! keyed hashes (never a credential).
//!
//! Commands go through redis-rs's `ConnectionManager` (one multiplexed connection, reconnected with
//! exponential backoff); the subscription has a connection of its own, reopened with backoff too. While
//! the server is away, operations fail at once with [`StoreError::Unavailable`] (new tasks are refused
//! with a clear error; calls that need no store keep flowing).

use super::codec::{decode, encode, ms, time};
use super::{Caps, Change, Edit, StoreError, TaskStore};
use crate::tasks::model::TaskRecord;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, oneshot};

const PREFIX: &str = "mcp-asyncify:";
/// How long the server keeps a record past its ttl (the sweep of some replica normally deletes it
/// first, cleaning the indexes; the server's expiry is the backstop when no replica is left).
const GRACE_MS: u64 = 60_000;
/// How long a replica's liveness mark lasts without a refresh.
pub const RUNNER_TTL: Duration = Duration::from_secs(10);
/// How long one command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Numbers and inserts a record within the caps. ARGV: prefix, id, owner, expiry ms, now ms, max live,
/// max per owner, body (starting `{"seq":0`), server expiry ms, publisher, grace ms (an owner's expired
/// entries older than that are dropped), "1" if the task is unfinished.
const INSERT: &str = r#"
local p, id, owner = ARGV[1], ARGV[2], ARGV[3]
local exp, now = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', p..'owner-exp:'..owner, '-inf', now - tonumber(ARGV[11]))
if redis.call('ZCARD', p..'exp') >= tonumber(ARGV[6]) then return -1 end
if redis.call('ZCARD', p..'owner-exp:'..owner) >= tonumber(ARGV[7]) then return -2 end
local seq = redis.call('INCR', p..'seq')
local body = '{"seq":'..seq..string.sub(ARGV[8], 9)
redis.call('SET', p..'task:'..id, body, 'PXAT', ARGV[9])
redis.call('ZADD', p..'all', seq, id)
redis.call('ZADD', p..'exp', exp, id)
redis.call('ZADD', p..'owner:'..owner, seq, id)
redis.call('ZADD', p..'owner-exp:'..owner, exp, id)
if ARGV[12] == '1' then redis.call('ZADD', p..'open', seq, id) end
redis.call('PUBLISH', p..'events', ARGV[10]..'\ntask\n'..id)
return seq
"#;

/// Compare-and-set of a record. ARGV: prefix, id, expected body, new body, publisher, "1" if the new
/// status is terminal.
const UPDATE: &str = r#"
local key = ARGV[1]..'task:'..ARGV[2]
if redis.call('GET', key) ~= ARGV[3] then return 0 end
redis.call('SET', key, ARGV[4], 'KEEPTTL')
if ARGV[6] == '1' then redis.call('ZREM', ARGV[1]..'open', ARGV[2]) end
redis.call('PUBLISH', ARGV[1]..'events', ARGV[5]..'\ntask\n'..ARGV[2])
return 1
"#;

/// Deletes a record and its index entries. ARGV: prefix, id, publisher. Returns the record (or false).
const REMOVE: &str = r#"
local p, id = ARGV[1], ARGV[2]
local body = redis.call('GET', p..'task:'..id)
redis.call('ZREM', p..'all', id)
redis.call('ZREM', p..'exp', id)
redis.call('ZREM', p..'open', id)
if not body then return false end
local owner = cjson.decode(body)['owner']
redis.call('DEL', p..'task:'..id)
redis.call('ZREM', p..'owner:'..owner, id)
redis.call('ZREM', p..'owner-exp:'..owner, id)
redis.call('PUBLISH', p..'events', ARGV[3]..'\nremoved\n'..id)
return body
"#;

/// Tasks in Redis or Valkey.
pub struct RedisStore {
    conn: ConnectionManager,
    describe: String,
    /// This process, as the publisher of its own changes (which it does not need to hear back).
    me: String,
    changes: broadcast::Sender<Change>,
    secret: [u8; 32],
    insert: Script,
    update: Script,
    remove: Script,
    /// Dropped with the store, which ends the event listener.
    _listening: oneshot::Sender<()>,
}

impl RedisStore {
    /// Connects to `url`. A server that does not answer is a clear error (no retry loop at start: a
    /// misconfigured URL should fail fast).
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let describe = super::redact(url);
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable {
            store: describe.clone(),
            reason: format!("cannot connect: {e} (is the server running and reachable?)"),
        };
        let client = redis::Client::open(url).map_err(|e| unavailable(&e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5));
        let mut conn = tokio::time::timeout(
            RESPONSE_TIMEOUT * 2,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| unavailable(&"no answer in 4 s"))?
        .map_err(|e| unavailable(&e))?;
        let _: () = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| unavailable(&e))?;
        let mut fresh = [0u8; 32];
        fresh[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        fresh[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let key = format!("{PREFIX}secret");
        let _: bool = conn.set_nx(&key, fresh.as_slice()).await.map_err(|e| unavailable(&e))?;
        let stored: Vec<u8> = conn.get(&key).await.map_err(|e| unavailable(&e))?;
        let secret: [u8; 32] = stored.try_into().map_err(|_| StoreError::Failed {
            store: describe.clone(),
            reason: format!("the key {key} does not hold 32 bytes; delete it to make a new one"),
        })?;
        let (changes, _) = broadcast::channel(4096);
        let me = uuid::Uuid::new_v4().simple().to_string();
        // Subscribed before the store is handed out, so no change made after that is missed.
        let mut pubsub = client.get_async_pubsub().await.map_err(|e| unavailable(&e))?;
        pubsub.subscribe(format!("{PREFIX}events")).await.map_err(|e| unavailable(&e))?;
        let (listening, dropped) = oneshot::channel();
        tokio::spawn(listen(client, changes.clone(), me.clone(), describe.clone(), dropped, pubsub));
        let store = RedisStore {
            conn,
            describe,
            me,
            changes,
            secret,
            insert: Script::new(INSERT),
            update: Script::new(UPDATE),
            remove: Script::new(REMOVE),
            _listening: listening,
        };
        store.index_unfinished().await?;
        Ok(store)
    }

    /// Fills the `open` index from the records, once per server: a store written by a build without
    /// the index still has its unfinished tasks found. Idempotent, so two replicas may both do it.
    async fn index_unfinished(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let marker = format!("{PREFIX}open-indexed");
        if conn.exists(&marker).await.map_err(|e| self.fail(e))? {
            return Ok(());
        }
        let (all, open) = (format!("{PREFIX}all"), format!("{PREFIX}open"));
        let mut after = None;
        loop {
            let page = self.scan(&all, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            let unfinished: Vec<(u64, &str)> =
                page.iter().filter(|r| !r.status.is_terminal()).map(|r| (r.seq, r.id.as_str())).collect();
            if !unfinished.is_empty() {
                let _: () = conn.zadd_multiple(&open, &unfinished).await.map_err(|e| self.fail(e))?;
            }
        }
        conn.set(&marker, 1).await.map_err(|e| self.fail(e))
    }

    /// Up to `limit` records of one index (a zset of ids by seq), from after `after_seq` on. Entries
    /// whose record the server has expired are dropped from the index on the way.
    async fn scan(
        &self,
        index: &str,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut after = after_seq.unwrap_or(0);
        let mut conn = self.conn.clone();
        while out.len() < limit {
            let want = limit - out.len();
            let page: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(index)
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .map_err(|e| self.fail(e))?;
            if page.is_empty() {
                break;
            }
            let ids: Vec<String> = page.iter().map(|(id, _)| id.clone()).collect();
            after = page.last().map_or(after, |(_, s)| *s as u64);
            for (id, record) in ids.iter().zip(self.records(&ids).await?) {
                match record {
                    Some(r) => out.push(r),
                    // Expired on the server with no replica left to sweep it: forget the entry.
                    None => {
                        let _: Result<(), _> = conn.zrem(index, id).await;
                    }
                }
            }
            if page.len() < want {
                break;
            }
        }
        Ok(out)
    }

    fn fail(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            StoreError::Unavailable { store: self.describe.clone(), reason: e.to_string() }
        } else {
            StoreError::Failed { store: self.describe.clone(), reason: e.to_string() }
        }
    }

    fn key(id: &str) -> String {
        format!("{PREFIX}task:{id}")
    }

    async fn records(&self, ids: &[String]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| Self::key(id)).collect();
        let bodies: Vec<Option<Vec<u8>>> = self.conn.clone().mget(keys).await.map_err(|e| self.fail(e))?;
        bodies
            .into_iter()
            .map(|b| {
                b.map(|b| {
                    decode(&b).map_err(|reason| StoreError::Failed { store: self.describe.clone(), reason })
                })
                .transpose()
            })
            .collect()
    }
}

/// Follows the `events` channel, reconnecting with backoff; after a reconnect, everyone looks again
/// ([`Change::Resync`]), since changes may have been missed meanwhile. Ends when the store is dropped.
async fn listen(
    client: redis::Client,
    changes: broadcast::Sender<Change>,
    me: String,
    describe: String,
    mut dropped: oneshot::Receiver<()>,
    first: redis::aio::PubSub,
) {
    let channel = format!("{PREFIX}events");
    let mut backoff = Duration::from_millis(100);
    let mut lost = false;
    let mut first = Some(first);
    loop {
        let subscribed = match first.take() {
            Some(pubsub) => Ok(Ok(pubsub)),
            None => {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                tokio::select! {
                    s = tokio::time::timeout(RESPONSE_TIMEOUT * 2, subscribed) => s,
                    _ = &mut dropped => return,
                }
            }
        };
        match subscribed {
            Ok(Ok(pubsub)) => {
                if lost {
                    tracing::info!(store = %describe, "task store reachable again");
                    let _ = changes.send(Change::Resync);
                }
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = &mut dropped => return,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    let mut parts = text.splitn(3, '\n');
                    let (Some(from), Some(kind), Some(id)) = (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    if from == me {
                        continue;
                    }
                    let change =
                        if kind == "removed" { Change::Removed(id.into()) } else { Change::Task(id.into()) };
                    let _ = changes.send(change);
                }
                tracing::warn!(store = %describe, "lost the task store's event channel; reconnecting");
            }
            Ok(Err(e)) => {
                tracing::warn!(store = %describe, error = %e, "task store events: cannot subscribe")
            }
            Err(_) => tracing::warn!(store = %describe, "task store events: no answer"),
        }
        lost = true;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut dropped => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl TaskStore for RedisStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn insert(&self, mut record: TaskRecord, caps: Caps) -> Result<TaskRecord, StoreError> {
        record.seq = 0;
        let body = encode(&record);
        debug_assert!(body.starts_with(b"{\"seq\":0,"));
        let exp = ms(record.expires_at());
        let seq: i64 = self
            .insert
            .arg(PREFIX)
            .arg(&record.id)
            .arg(&record.owner)
            .arg(exp)
            .arg(ms(SystemTime::now()))
            .arg(caps.max_live)
            .arg(caps.max_per_owner)
            .arg(body)
            .arg(exp + GRACE_MS)
            .arg(&self.me)
            .arg(GRACE_MS)
            .arg(if record.status.is_terminal() { "0" } else { "1" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.fail(e))?;
        match seq {
            -1 => Err(StoreError::Full { limit: caps.max_live }),
            -2 => Err(StoreError::OwnerFull { limit: caps.max_per_owner }),
            seq => {
                record.seq = seq as u64;
                Ok(record)
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let body: Option<Vec<u8>> = self.conn.clone().get(Self::key(id)).await.map_err(|e| self.fail(e))?;
        body.map(|b| decode(&b).map_err(|reason| StoreError::Failed { store: self.describe.clone(), reason }))
            .transpose()
    }

    async fn update(
        &self,
        id: &str,
        change: &Edit<'_>,
    ) -> Result<Option<(TaskRecord, TaskRecord)>, StoreError> {
        loop {
            let key = Self::key(id);
            let Some(body): Option<Vec<u8>> = self.conn.clone().get(&key).await.map_err(|e| self.fail(e))?
            else {
                return Ok(None);
            };
            let before = decode(&body)
                .map_err(|reason| StoreError::Failed { store: self.describe.clone(), reason })?;
            let mut after = before.clone();
            if !change(&mut after) {
                return Ok(None);
            }
            let set: i64 = self
                .update
                .arg(PREFIX)
                .arg(id)
                .arg(body)
                .arg(encode(&after))
                .arg(&self.me)
                .arg(if after.status.is_terminal() { "1" } else { "0" })
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.fail(e))?;
            if set == 1 {
                return Ok(Some((before, after)));
            }
            // Another replica wrote in between: look again.
        }
    }

    async fn list(
        &self,
        owner: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let index = match owner {
            Some(o) => format!("{PREFIX}owner:{o}"),
            None => format!("{PREFIX}all"),
        };
        self.scan(&index, after_seq, limit).await
    }

    async fn remove(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let body: Option<Vec<u8>> = self
            .remove
            .arg(PREFIX)
            .arg(id)
            .arg(&self.me)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.fail(e))?;
        body.map(|b| decode(&b).map_err(|reason| StoreError::Failed { store: self.describe.clone(), reason }))
            .transpose()
    }

    async fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<String>, StoreError> {
        redis::cmd("ZRANGE")
            .arg(format!("{PREFIX}exp"))
            .arg("-inf")
            .arg(ms(now))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.fail(e))
    }

    async fn next_expiry(&self) -> Result<Option<SystemTime>, StoreError> {
        let first: Vec<(String, f64)> = self
            .conn
            .clone()
            .zrange_withscores(format!("{PREFIX}exp"), 0, 0)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(first.first().map(|(_, at)| time(*at as u64)))
    }

    async fn len(&self) -> Result<usize, StoreError> {
        self.conn.clone().zcard(format!("{PREFIX}exp")).await.map_err(|e| self.fail(e))
    }

    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let open = format!("{PREFIX}open");
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.scan(&open, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            for r in page {
                if r.status.is_terminal() {
                    // Indexed while it ended (two replicas building the index at once): drop it.
                    let _: Result<(), _> = self.conn.clone().zrem(&open, &r.id).await;
                } else {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING").query_async::<()>(&mut self.conn.clone()).await.map_err(|e| self.fail(e))
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(self.secret)
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    async fn heartbeat(&self, runner: &str) -> Result<(), StoreError> {
        self.conn
            .clone()
            .set_ex(format!("{PREFIX}runner:{runner}"), 1, RUNNER_TTL.as_secs())
            .await
            .map_err(|e| self.fail(e))
    }

    async fn runner_alive(&self, runner: &str) -> Result<bool, StoreError> {
        self.conn.clone().exists(format!("{PREFIX}runner:{runner}")).await.map_err(|e| self.fail(e))
    }
}
