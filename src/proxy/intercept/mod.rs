//! What the proxy changes, and only that: Tasks for an upstream that has none.
//!
//! * `initialize` result: `capabilities.tasks` (list, cancel, requests.tools.call) is added.
//! * `tools/list` result: taskified tools get `execution.taskSupport: "optional"`; with a sync deadline,
//!   two tools to fetch handed-off work are added.
//! * After `notifications/initialized`, the proxy lists the upstream's tools itself (its own requests,
//!   never seen by the client) to learn which tools already have tasks and whether the upstream speaks
//!   Notion's async protocol, so a task-run call is right even if the client never lists tools.
//! * `tools/call` with `params.task`: a task is created and answered at once (`CreateTaskResult`); the
//!   call runs upstream without `params.task`. Tools the upstream runs as tasks itself pass through.
//! * `tasks/*`: answered from the [`TaskEngine`]; ids the engine does not know go to an upstream that
//!   has tasks of its own.
//! * Plain `tools/call`s (clients that do not speak tasks) get progress keep-alives and, past the sync
//!   deadline, a hand-off result; their work goes on as a task.
//! * An upstream `elicitation/create` or `sampling/createMessage` made while a task's call runs moves
//!   the task to `input_required` and reaches the client tagged with the task; the answer resumes it.
//! * Requests of 2026-07-28 clients (per-request `_meta`, no session) are served by [`modern`]: the
//!   proxy answers `server/discover`, initializes the upstream itself, and speaks the Tasks extension
//!   (server-directed tasks, `DetailedTask`, `tasks/update`) from the same engine.
//!
//! One file per job: `tools_call` decides a client's `tools/call`; `task_calls` runs the upstream calls
//! of the proxy's own tasks; `tasks_api` answers `tasks/*`; `sync_clients` keeps clients that do not
//! speak tasks alive (keep-alives, the hand-off); `questions` routes the upstream's requests;
//! `upstream_offer` rewrites what the upstream offers; `modern`, `mrtr` and `subscriptions` serve
//! 2026-07-28 clients.

use super::era::Era;
use super::pending::Pending;
pub use super::pending::Rewrite;
use crate::config::UpstreamProtocol;
use crate::jsonrpc::{self, Id, code};
use crate::notion::adapter::NotionAdapter;
use crate::tasks::engine::TaskEngine;
use crate::tasks::model::{Generation, Origin, Outcome, TaskStatus, with_related_task};
use crate::transport::lines::LineSink;
use crate::upstream::{Upstream, UpstreamError};
use dashmap::DashMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod modern;
mod mrtr;
mod questions;
mod subscriptions;
mod sync_clients;
mod task_calls;
mod tasks_api;
mod tools_call;
mod upstream_offer;

use tools_call::without_allow_async;

pub use mrtr::ClientAnswer;
pub use subscriptions::SUBSCRIPTION_ID;
pub use sync_clients::{RESULT_TOOL, STATUS_TOOL};

/// What the router should do with a client request.
pub enum Decision {
    /// Forward the original bytes, and treat the response as said.
    Forward(Rewrite),
    /// Forward these bytes instead of the original (a field the upstream must not see was removed).
    ForwardAs(Vec<u8>, Rewrite),
    /// The proxy answered (or will answer) it; nothing goes upstream.
    Handled,
}

/// What becomes of the upstream's response to a client request.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseFate {
    /// Forward it as the upstream sent it (a 2026-07-28 result is marked complete on the way).
    AsIs,
    /// Send this line instead.
    Rewritten(Vec<u8>),
    /// Send nothing now: the proxy keeps it (a handed-off call's result completes its task; a parked
    /// call's answer waits for the client's retry).
    Withheld,
}

/// What to do with a request the upstream sent to the client.
pub enum ServerRequestRoute {
    /// Forward the original bytes.
    Forward,
    /// Send these bytes instead (tagged with the task it belongs to).
    Send(Vec<u8>),
    /// Hold it: a 2026-07-28 task's input request, which its client reads from `tasks/get` and
    /// answers with `tasks/update`.
    Held,
}

/// What the upstream told us about itself.
#[derive(Default)]
struct UpstreamFacts {
    /// `capabilities.tasks.requests.tools.call` present.
    tools_call: bool,
    /// `capabilities.tasks.list` present.
    list: bool,
    /// `capabilities.tasks.cancel` present.
    cancel: bool,
    /// Tools the upstream runs as tasks itself (`taskSupport` optional or required).
    native_tools: HashSet<String>,
    /// `capabilities.tools` present (the upstream has tools to list).
    has_tools: bool,
    /// The upstream's `initialize` result (whoever initialized it), for `server/discover`.
    initialized: Option<Map<String, Value>>,
    /// A 2026-07-28 upstream: its `server/discover` result, and until when it may be reused (its
    /// `ttlMs`).
    discovered: Option<Map<String, Value>>,
    discovered_until: Option<Instant>,
    /// The 2026-07-28 upstream runs tasks itself (declares the Tasks extension).
    upstream_tasks: bool,
}

/// The tasks a session started and the calls that run them.
#[derive(Default)]
struct SessionTasks {
    /// Ids of tasks the upstream created itself (their `tasks/*` go upstream).
    native_tasks: DashMap<String, ()>,
    /// Upstream requests to the client made on behalf of a task, by the upstream's request id.
    input_requests: DashMap<Id, String>,
    /// Local tasks whose upstream call is in flight.
    running: DashMap<String, Option<String>>,
    /// The progress tokens (JSON text) of those calls, to their tasks: their progress is the task's.
    task_tokens: DashMap<String, String>,
    /// Every task this session started (local, Notion, handed off), to know whether its upstream
    /// is still needed when the client goes.
    started: DashMap<String, ()>,
    /// Last progress value seen per progress token (JSON text), so keep-alives keep increasing.
    progress_seen: DashMap<String, f64>,
    /// 2026-07-28 tasks of this session, with the input requests they wait on.
    modern_tasks: DashMap<String, modern::InputRequests>,
    /// Woken whenever a task's call leaves `running`.
    calls_ended: tokio::sync::Notify,
    /// Answers that wait for a task's end (`tasks/result`, the hand-off result tool), so that the
    /// session sends them before it closes.
    answering: tokio_util::task::TaskTracker,
}

/// What the client and the upstream are, and what they said.
#[derive(Default)]
struct Peers {
    /// Whether the client speaks tasks (declared them, or used them): then it gets status notifications.
    client_speaks_tasks: AtomicBool,
    /// Becomes true once the upstream's tools are known (listed by the proxy itself, or it gave up).
    tools_known: tokio::sync::watch::Sender<bool>,
    /// Set once the upstream answered `initialize` (recovered tasks resume their polls then).
    upstream_ready: tokio::sync::watch::Sender<bool>,
    /// Whether the proxy is listing the upstream's tools (it started after the handshake).
    discovering: AtomicBool,
    /// Set once the proxy initialized the upstream itself (for a 2026-07-28 client, which has no
    /// handshake).
    own_init: tokio::sync::OnceCell<()>,
    /// The client's own `notifications/initialized` is not forwarded (the proxy sent one already).
    swallow_initialized: AtomicBool,
    /// The client opened a 2025-11-25 session (`initialize`): it can answer requests from the
    /// upstream. A 2026-07-28 client never can.
    legacy_client: AtomicBool,
    /// The client sent 2026-07-28 requests.
    modern_client: AtomicBool,
    /// The upstream speaks 2026-07-28 (found by discovery).
    modern_upstream: AtomicBool,
}

/// Calls waiting for answers to the upstream's questions: a 2026-07-28 client's parked calls, a
/// 2025-11-25 client's rounds on a 2026-07-28 upstream.
#[derive(Default)]
struct RoundTrips {
    /// 2026-07-28 calls waiting for their client's answers, by `requestState`.
    parked: DashMap<String, mrtr::Parked>,
    /// The `requestState` of each parked call, by the call's id.
    parked_calls: DashMap<Id, String>,
    /// A 2025-11-25 client's calls on a 2026-07-28 upstream (method, params), to send again with
    /// answers when the upstream asks something.
    retries: DashMap<Id, (String, String)>,
    /// The proxy's questions to a 2025-11-25 client: the call and the upstream's key, by request id.
    asks: DashMap<Id, (Id, String)>,
    /// Rounds of questions in progress, by call.
    legacy_rounds: DashMap<Id, mrtr::LegacyRound>,
}

/// The task-aware interception of one session.
pub struct Interceptor {
    /// What the upstream speaks (as configured; `Auto` is settled by the probe, in `facts`).
    upstream_protocol: UpstreamProtocol,
    engine: Arc<TaskEngine>,
    owner: String,
    client: LineSink,
    upstream: Upstream,
    pending: Arc<Pending>,
    facts: Mutex<UpstreamFacts>,
    /// Notion's async protocol on this upstream.
    notion: Arc<NotionAdapter>,
    /// Open `subscriptions/listen` requests, by id.
    subscriptions: DashMap<Id, subscriptions::Subscription>,
    /// The session's tasks and the calls that run them.
    tasks: SessionTasks,
    /// What each side is and has said.
    peers: Peers,
    /// Calls waiting for answers to the upstream's questions (multi round-trip requests).
    trips: RoundTrips,
}

impl Interceptor {
    /// The interceptor of a session owned by `owner` (its auth context).
    pub fn new(
        engine: Arc<TaskEngine>,
        owner: String,
        client: LineSink,
        upstream: Upstream,
        pending: Arc<Pending>,
        notion: Arc<NotionAdapter>,
        upstream_protocol: UpstreamProtocol,
    ) -> Arc<Self> {
        Arc::new(Interceptor {
            upstream_protocol,
            engine,
            owner,
            client,
            upstream,
            pending,
            facts: Mutex::new(UpstreamFacts::default()),
            tasks: SessionTasks::default(),
            peers: Peers::default(),
            trips: RoundTrips::default(),
            notion,
            subscriptions: DashMap::new(),
        })
    }

    /// How many of the tasks this session started still run (their work needs this upstream).
    pub async fn tasks_in_flight(&self) -> usize {
        let started: Vec<String> = self.tasks.started.iter().map(|e| e.key().clone()).collect();
        for id in started {
            if self.engine.get(&self.owner, &id).await.is_none_or(|r| r.status.is_terminal()) {
                self.tasks.started.remove(&id);
            }
        }
        self.tasks.started.len()
    }

    /// Returns once none of the tasks this session started still runs: re-checked when one of them
    /// ends (and every few seconds, in case an event was missed).
    pub async fn until_tasks_done(&self) {
        let mut events = self.engine.subscribe();
        while self.tasks_in_flight().await > 0 {
            // Only an end of one of this session's tasks is worth a look at the store (every
            // session's events come here).
            loop {
                match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                    Ok(Ok(event))
                        if !event.task.status.is_terminal()
                            || !self.tasks.started.contains_key(&event.task.id) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Resumes tasks recovered from the store (their process died): each Notion task polls its
    /// persisted Notion task id on this session's upstream, once the upstream is initialized.
    pub fn resume(self: &Arc<Self>, orphans: Vec<crate::tasks::engine::Orphan>) {
        for orphan in orphans {
            let (Origin::Notion, Some(notion_id)) = (orphan.task.origin, orphan.task.upstream_task.clone())
            else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let task_id = orphan.task.id;
                let stop = this.engine.stop_signal(&task_id).await;
                let mut ready = this.peers.upstream_ready.subscribe();
                if ready.wait_for(|r| *r).await.is_err() {
                    return;
                }
                this.tasks.started.insert(task_id.clone(), ());
                this.notion.resume_task(&this.engine, &this.upstream, &task_id, notion_id, stop).await;
            });
        }
    }

    /// Whether the proxy offers tasks (off: a pure passthrough, for either generation).
    pub fn enabled(&self) -> bool {
        self.engine.config().enabled
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, UpstreamFacts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides about a client request. May answer it itself.
    pub async fn on_client_request(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
        era: &Era,
    ) -> Decision {
        if !self.enabled() {
            return Decision::Forward(Rewrite::None);
        }
        if let Era::Modern(modern) = era {
            self.peers.modern_client.store(true, Ordering::Relaxed);
            return self.on_modern_request(id, method, params, modern).await;
        }
        match method {
            "initialize" => {
                self.peers.legacy_client.store(true, Ordering::Relaxed);
                if params.and_then(|p| lookup(p.get(), &["capabilities", "tasks"])).is_some() {
                    self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
                }
                if self.upstream_protocol != UpstreamProtocol::Legacy {
                    // The proxy opens the conversation itself, to learn what the upstream speaks.
                    if let Err(why) = self.ensure_initialized().await {
                        let msg = format!("The upstream server could not be initialized: {why}");
                        return self.reply_error(id, code::INTERNAL_ERROR, &msg).await;
                    }
                }
                if self.peers.own_init.initialized() {
                    // The proxy already opened the conversation with the upstream (for a 2026-07-28
                    // request, or to find out what it speaks): answer from what it said, rather than
                    // initializing it twice.
                    return self.reinitialize(id, params).await;
                }
                Decision::Forward(Rewrite::Initialize)
            }
            "tools/list" => {
                let first_page = params.and_then(|p| lookup(p.get(), &["cursor"])).is_none();
                Decision::Forward(Rewrite::ToolsList { first_page })
            }
            "tools/call" => self.on_tools_call(id, params).await,
            // A probe without a per-request version: answered all the same (a dual-era server has it).
            "server/discover" => {
                self.on_modern_request(id, method, params, &super::era::Modern { tasks: false }).await
            }
            "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/list" => {
                self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
                self.on_tasks_method(id, method, params).await
            }
            _ => Decision::Forward(Rewrite::None),
        }
    }

    async fn reply_error(&self, id: &Id, code: i64, message: &str) -> Decision {
        self.client.send(jsonrpc::error_response(Some(id), code, message, None)).await;
        Decision::Handled
    }

    async fn reply_result(&self, id: &Id, result: &Value) -> Decision {
        self.client.send(jsonrpc::result_response(id, &result.to_string())).await;
        Decision::Handled
    }

    /// What becomes of the upstream's response to a client request.
    pub async fn on_upstream_response(
        &self,
        id: &Id,
        rewrite: Rewrite,
        modern: bool,
        result: Option<&RawValue>,
        error: Option<&RawValue>,
    ) -> ResponseFate {
        // An error (or a result we cannot read) passes through as the upstream sent it.
        let rewritten = |line: Option<Vec<u8>>| line.map_or(ResponseFate::AsIs, ResponseFate::Rewritten);
        match rewrite {
            Rewrite::None | Rewrite::PlainCall | Rewrite::TaskWindow { .. } => ResponseFate::AsIs,
            Rewrite::Initialize => rewritten(result.and_then(|r| self.rewrite_initialize(id, r))),
            Rewrite::ToolsList { first_page } => {
                rewritten(result.and_then(|r| self.rewrite_tools_list(id, r, first_page, modern)))
            }
            Rewrite::NativeTaskCall { tool } => {
                let generation = if modern { Generation::Modern } else { Generation::Legacy };
                if let Some(r) = result {
                    self.record_native(&tool, r, generation).await;
                }
                ResponseFate::AsIs
            }
            Rewrite::NativeTaskForModern { tool } => {
                if let Some(r) = result {
                    self.record_native(&tool, r, Generation::Modern).await;
                }
                rewritten(result.and_then(|r| self.native_created(id, r)))
            }
            Rewrite::NativeTask { task_id } => {
                if error.is_some_and(|e| jsonrpc::error_code_of(e.get()) == Some(code::INVALID_PARAMS)) {
                    // The upstream no longer knows it (expired, or the upstream restarted).
                    self.tasks.native_tasks.remove(&task_id);
                    self.engine.forget_native(&task_id).await;
                }
                ResponseFate::AsIs
            }
            // The answer goes to the client's retry, now or when it comes.
            Rewrite::Parked { state } => match self.parked_answered(&state, result, error) {
                Some(line) => ResponseFate::Rewritten(line),
                None => ResponseFate::Withheld,
            },
            Rewrite::HandedOff { task_id } => {
                let reply = match (result, error) {
                    (Some(r), _) => Outcome::Result(r.to_owned()),
                    (None, Some(e)) => Outcome::Error(e.to_owned()),
                    (None, None) => return ResponseFate::Withheld,
                };
                self.finish_with_reply(&task_id, Ok(reply)).await;
                ResponseFate::Withheld
            }
        }
    }

    /// The client answered an upstream request: a task waiting on it resumes.
    pub async fn on_client_response(&self, id: &Id) {
        if let Some((_, task_id)) = self.tasks.input_requests.remove(id)
            && !self.tasks.input_requests.iter().any(|e| *e.value() == task_id)
        {
            self.engine.set_status(&task_id, TaskStatus::Working, None).await;
        }
    }

    /// Sends `notifications/tasks/status` to this session's client on every transition of its tasks,
    /// and resumes the owner's Notion tasks the engine takes over from a replica that stopped.
    pub fn spawn_status_notifier(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut events = self.engine.subscribe();
        let mut orphans = self.engine.orphans_found();
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    e = events.recv() => e,
                    found = orphans.changed() => {
                        let (Ok(()), Some(this)) = (found, this.upgrade()) else { return };
                        this.resume(this.engine.take_orphans(&this.owner));
                        continue;
                    }
                };
                let event = match received {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(
                            skipped = n,
                            "status notifications lagged; clients poll tasks/get anyway"
                        );
                        continue;
                    }
                    Err(_) => return,
                };
                let Some(this) = this.upgrade() else { return };
                if event.task.status.is_terminal() {
                    // A 2026-07-28 task that ended waits on nothing any more.
                    this.tasks.modern_tasks.remove(&event.task.id);
                }
                if event.owner == this.owner {
                    this.notify_task_subscribers(&event.task).await;
                }
                if event.owner != this.owner || !this.peers.client_speaks_tasks.load(Ordering::Relaxed) {
                    continue;
                }
                let params = Value::Object(event.task.to_wire()).to_string();
                this.client.send(jsonrpc::notification("notifications/tasks/status", Some(&params))).await;
            }
        })
    }

    /// The upstream is gone: handed-off calls end `failed`; then wait (briefly) until every running task
    /// has recorded its end, so waiters get their answers before the session closes.
    pub async fn settle(&self, orphaned: Vec<String>, why: &str) {
        for task_id in orphaned {
            self.task_call_failed(&task_id, UpstreamError::Gone(why.to_string())).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let ended = self.tasks.calls_ended.notified();
            if self.tasks.running.is_empty() || tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        // The woken tasks/result waiters send their answers before the session closes (a waiter on a
        // task of another session's upstream is not waited for long).
        self.tasks.answering.close();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.tasks.answering.wait()).await;
    }
}

/// Reads a nested value out of raw JSON text (`None` if absent or the text is not an object).
fn lookup(raw: &str, path: &[&str]) -> Option<Value> {
    let v: Map<String, Value> = serde_json::from_str(raw).ok()?;
    lookup_value(&v, path).cloned()
}

fn lookup_value<'a>(map: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = map.get(*first)?;
    for key in rest {
        v = v.get(*key)?;
    }
    Some(v)
}
