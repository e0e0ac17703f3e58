//! 2026-07-28 requests and the Tasks extension (SEP-2663), on the same engine as 2025-11-25 tasks.
//!
//! A modern client has no handshake: the proxy initializes the upstream itself (declaring the client
//! capabilities an upstream may use: elicitation, sampling) on the first modern request, answers
//! `server/discover` from what the upstream said, and forwards everything else on that session with
//! `resultType: "complete"` added to the answer.
//!
//! Tasks are server-directed: a call of a task tool from a request that declares the extension runs
//! as a plain call for up to `task_after_ms`, and becomes a task only if it is still running then
//! (so a fast call costs nothing extra). `tasks/get` answers the `DetailedTask` with the result,
//! error or input requests inline; `tasks/update` answers the upstream's held requests;
//! `tasks/cancel` is an ack; `tasks/result` and `tasks/list` no longer exist.
//!
//! This file holds the requests and the calls that may become tasks; [`tasks`] holds the
//! `tasks/*` methods and the input requests a task holds for its client.

mod tasks;

pub(super) use tasks::{HeldRequest, InputRequests, input_key};

use super::sync_clients::{HandOff, RESULT_TOOL, STATUS_TOOL, era_result};
use super::tools_call::{Head, has_allow_async};
use super::{Decision, Interceptor, Rewrite, lookup};
use crate::config::UpstreamProtocol;
use crate::jsonrpc::{self, Id, code};
use crate::proxy::era::{self, Modern};
use crate::tasks::model::{Generation, Origin, Outcome};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a DiscoverResult may be cached by the client.
const DISCOVER_TTL_MS: u64 = 300_000;
/// How long the probe of a possibly 2026-07-28 upstream waits for `server/discover` (the spec's
/// fallback: no answer means 2025-11-25).
const DISCOVER_PROBE: Duration = Duration::from_secs(3);

/// The 2025-11-25 `initialize` result a 2026-07-28 upstream would have given, from its
/// `server/discover` result: the client's version when the proxy serves it, the upstream's
/// capabilities, server info and instructions.
fn legacy_initialize_result(
    discovered: &Map<String, Value>,
    params: Option<&RawValue>,
) -> Map<String, Value> {
    let requested = params
        .and_then(|p| lookup(p.get(), &["protocolVersion"]))
        .and_then(|v| v.as_str().map(str::to_owned));
    let version = requested
        .filter(|v| era::LEGACY_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| era::LEGACY_VERSIONS[0].to_owned());
    let mut caps = discovered.get("capabilities").and_then(Value::as_object).cloned().unwrap_or_default();
    caps.remove("extensions");
    let mut result = Map::new();
    result.insert("protocolVersion".into(), json!(version));
    result.insert("capabilities".into(), Value::Object(caps));
    let info = discovered.get("_meta").and_then(|m| m.get(era::META_SERVER_INFO)).cloned();
    result.insert(
        "serverInfo".into(),
        info.unwrap_or_else(|| json!({ "name": "mcp-asyncify", "version": env!("CARGO_PKG_VERSION") })),
    );
    if let Some(instructions) = discovered.get("instructions") {
        result.insert("instructions".into(), instructions.clone());
    }
    result
}

impl Interceptor {
    /// A request of a 2026-07-28 client.
    pub(super) async fn on_modern_request(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
        modern: &Modern,
    ) -> Decision {
        match method {
            "tasks/result" | "tasks/list" => {
                let msg = format!(
                    "Method not found: {method} does not exist in protocol version {} (tasks/get returns a task's result inline)",
                    era::MODERN_VERSION
                );
                return self.reply_error(id, code::METHOD_NOT_FOUND, &msg).await;
            }
            "tasks/get" | "tasks/update" | "tasks/cancel" if !modern.tasks => {
                self.client.send(era::missing_tasks_extension(id, method)).await;
                return Decision::Handled;
            }
            "tasks/get" | "tasks/update" | "tasks/cancel" => {
                return self.on_modern_tasks_method(id, method, params).await;
            }
            "tools/call" | "prompts/get" | "resources/read" => {
                // A retry with answers to a parked call's questions (multi round-trip requests).
                if let Some(p) = params.filter(|p| p.get().contains("\"requestState\""))
                    && let Ok(p) = serde_json::from_str::<Map<String, Value>>(p.get())
                    && let Some(state) = p.get("requestState").and_then(Value::as_str)
                    // A 2026-07-28 upstream's own rounds are its business.
                    && (!self.peers.modern_upstream.load(Ordering::Relaxed) || self.trips.parked.contains_key(state))
                {
                    let this = self.clone();
                    let (id, state, modern) = (id.clone(), state.to_owned(), modern.clone());
                    tokio::spawn(async move { this.on_retry(&id, &state, &p, &modern).await });
                    return Decision::Handled;
                }
            }
            _ => {}
        }
        if let Err(why) = self.ensure_initialized().await {
            let msg = format!("The upstream server could not be initialized: {why}");
            return self.reply_error(id, code::INTERNAL_ERROR, &msg).await;
        }
        match method {
            "server/discover" => {
                // A 2026-07-28 upstream's answer is reused for its ttlMs, then asked again.
                let stale = self.facts().discovered_until.is_some_and(|until| Instant::now() >= until);
                if stale && let Err(why) = self.discover_upstream().await {
                    tracing::warn!(
                        why,
                        "could not refresh the upstream's server/discover; answering from the last one"
                    );
                }
                let result = self.discover_result();
                self.reply_result(id, &result).await
            }
            "subscriptions/listen" => self.on_listen(id, params, modern).await,
            "tools/list" => {
                let first_page = params.and_then(|p| lookup(p.get(), &["cursor"])).is_none();
                Decision::Forward(Rewrite::ToolsList { first_page })
            }
            "tools/call" => self.on_modern_call(id, params, modern).await,
            _ => Decision::Forward(Rewrite::None),
        }
    }

    /// Initializes the upstream on the proxy's own behalf, once, unless a client's `initialize` did.
    pub(super) async fn ensure_initialized(self: &Arc<Self>) -> Result<(), String> {
        if self.facts().initialized.is_some() && !self.peers.own_init.initialized() {
            return Ok(()); // a legacy client initialized it on this session
        }
        self.peers
            .own_init
            .get_or_try_init(|| async {
                if self.upstream_protocol != UpstreamProtocol::Legacy {
                    match self.discover_upstream().await {
                        Ok(()) => return Ok(()),
                        Err(why) if self.upstream_protocol == UpstreamProtocol::Modern => {
                            return Err(format!(
                                "it does not answer server/discover as a 2026-07-28 server: {why}"
                            ));
                        }
                        Err(why) => {
                            tracing::info!(
                                why,
                                "the upstream does not speak 2026-07-28; initializing it as 2025-11-25"
                            );
                        }
                    }
                }
                let params = json!({
                    "protocolVersion": era::LEGACY_VERSIONS[0],
                    "capabilities": { "elicitation": {}, "sampling": {} },
                    "clientInfo": { "name": "mcp-asyncify", "version": env!("CARGO_PKG_VERSION") },
                });
                let reply = self
                    .upstream
                    .request("initialize", Some(&params.to_string()), Some(Duration::from_secs(30)))
                    .await
                    .map_err(|e| e.to_string())?;
                let result = match reply {
                    Outcome::Result(raw) => serde_json::from_str::<Map<String, Value>>(raw.get())
                        .map_err(|e| format!("its initialize result is not an object ({e})"))?,
                    Outcome::Error(e) => return Err(format!("it refused initialize: {}", e.get())),
                };
                self.learn_initialize(&result);
                self.upstream.notify("notifications/initialized", None).await;
                tracing::info!("initialized the upstream for a 2026-07-28 client");
                self.on_initialized();
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Asks the upstream `server/discover`: a 2026-07-28 upstream answers with the versions it
    /// supports, and is then spoken to statelessly (its own requests and the forwarded ones carry the
    /// per-request `_meta`; it is never sent `initialize`).
    async fn discover_upstream(self: &Arc<Self>) -> Result<(), String> {
        let params = json!({ "_meta": era::proxy_meta() }).to_string();
        let reply = self
            .upstream
            .request("server/discover", Some(&params), Some(DISCOVER_PROBE))
            .await
            .map_err(|e| e.to_string())?;
        let result = match reply {
            Outcome::Result(raw) => serde_json::from_str::<Map<String, Value>>(raw.get())
                .map_err(|e| format!("its answer is not an object ({e})"))?,
            Outcome::Error(e) => return Err(format!("it answered {}", e.get())),
        };
        let versions = result.get("supportedVersions").and_then(Value::as_array);
        if !versions.is_some_and(|v| v.iter().any(|v| v == era::MODERN_VERSION)) {
            return Err(format!("its supportedVersions do not include {}", era::MODERN_VERSION));
        }
        let caps = result.get("capabilities").and_then(Value::as_object).cloned().unwrap_or_default();
        let ttl = Duration::from_millis(result.get("ttlMs").and_then(Value::as_u64).unwrap_or(0));
        {
            let mut facts = self.facts();
            facts.discovered_until = Some(Instant::now() + ttl);
            facts.has_tools = caps.contains_key("tools");
            facts.upstream_tasks = caps
                .get("extensions")
                .and_then(|e| e.get(era::TASKS_EXTENSION))
                .is_some_and(Value::is_object);
            facts.discovered = Some(result);
        }
        if !self.peers.modern_upstream.swap(true, Ordering::Relaxed) {
            tracing::info!("the upstream speaks 2026-07-28; its requests go statelessly");
            self.on_initialized();
        }
        Ok(())
    }

    /// Whether the upstream speaks 2026-07-28 (found by discovery).
    pub fn upstream_is_modern(&self) -> bool {
        self.peers.modern_upstream.load(Ordering::Relaxed)
    }

    /// Whether a 2026-07-28 upstream runs tasks itself: then its tasks, not the proxy's, reach
    /// 2026-07-28 clients.
    pub(super) fn upstream_runs_tasks(&self) -> bool {
        let facts = self.facts();
        facts.discovered.is_some() && facts.upstream_tasks
    }

    /// Params for a request to the upstream: with the per-request `_meta` of 2026-07-28 when the
    /// upstream speaks it and they have none.
    pub(super) fn for_upstream(&self, params: &str) -> String {
        if !self.upstream_is_modern() || params.contains(era::META_VERSION) {
            return params.to_owned();
        }
        era::with_proxy_meta(Some(params))
    }

    /// A 2025-11-25 client's request on its way to a 2026-07-28 upstream, with the `_meta` it needs
    /// (`None`: send it as it is).
    pub fn to_upstream_line(&self, env: &jsonrpc::Envelope<'_>) -> Option<Vec<u8>> {
        let id = env.id.as_ref()?;
        if !self.upstream_is_modern() || env.params.is_some_and(|p| p.get().contains(era::META_VERSION)) {
            return None;
        }
        let params = era::with_proxy_meta(env.params.map(RawValue::get));
        self.remember_for_retry(id, env.method?, &params);
        Some(jsonrpc::request(id, env.method?, Some(&params)))
    }

    /// A 2025-11-25 `initialize` when the proxy has opened the conversation with the upstream itself
    /// (for a 2026-07-28 client, or to find out what it speaks): answered from what the upstream said
    /// (its `initialize` result, or its `server/discover` result), with tasks added as usual; the
    /// client's `notifications/initialized` is kept back, so the upstream sees one handshake.
    pub(super) async fn reinitialize(&self, id: &Id, params: Option<&RawValue>) -> Decision {
        let result = {
            let facts = self.facts();
            match (&facts.initialized, &facts.discovered) {
                (Some(init), _) => init.clone(),
                (None, Some(discovered)) => legacy_initialize_result(discovered, params),
                (None, None) => return Decision::Forward(Rewrite::Initialize),
            }
        };
        let raw = RawValue::from_string(Value::Object(result).to_string()).expect("valid JSON");
        self.peers.swallow_initialized.store(true, Ordering::Relaxed);
        match self.rewrite_initialize(id, &raw) {
            Some(line) => self.client.send(line).await,
            None => self.client.send(jsonrpc::result_response(id, raw.get())).await,
        };
        Decision::Handled
    }

    /// Whether the client's `notifications/initialized` must not reach the upstream (it was sent).
    pub fn take_swallow_initialized(&self) -> bool {
        self.peers.swallow_initialized.swap(false, Ordering::Relaxed)
    }

    /// `server/discover`: the upstream's capabilities (never the legacy `tasks`), plus the Tasks
    /// extension, its server info and instructions, and every version the proxy serves.
    fn discover_result(&self) -> Value {
        if let Some(discovered) = self.facts().discovered.clone() {
            // A 2026-07-28 upstream's own answer, with the Tasks extension the proxy offers and every
            // version it serves.
            let mut result = Value::Object(discovered);
            result["supportedVersions"] = json!(era::supported_versions());
            result["resultType"] = json!("complete");
            if !result["capabilities"].is_object() {
                result["capabilities"] = json!({});
            }
            if !result["capabilities"]["extensions"].is_object() {
                result["capabilities"]["extensions"] = json!({});
            }
            result["capabilities"]["extensions"][era::TASKS_EXTENSION] = json!({});
            return result;
        }
        let init = self.facts().initialized.clone().unwrap_or_default();
        let mut caps = init.get("capabilities").and_then(Value::as_object).cloned().unwrap_or_default();
        caps.remove("tasks");
        let extensions = caps.entry("extensions").or_insert_with(|| json!({}));
        if let Some(extensions) = extensions.as_object_mut() {
            extensions.insert(era::TASKS_EXTENSION.into(), json!({}));
        }
        let mut result = json!({
            "resultType": "complete",
            "supportedVersions": era::supported_versions(),
            "capabilities": caps,
            "ttlMs": DISCOVER_TTL_MS,
            // What the upstream offers can depend on the credential it was reached with.
            "cacheScope": if self.owner.starts_with("credential:") { "private" } else { "public" },
        });
        if let Some(info) = init.get("serverInfo") {
            result["_meta"] = json!({ era::META_SERVER_INFO: info });
        }
        if let Some(instructions) = init.get("instructions") {
            result["instructions"] = instructions.clone();
        }
        result
    }

    /// A 2026-07-28 `tools/call`.
    async fn on_modern_call(
        self: &Arc<Self>,
        id: &Id,
        params: Option<&RawValue>,
        modern: &Modern,
    ) -> Decision {
        // Only the head is read (name, task, whether the arguments hold allow_async, _meta); the call
        // is parsed whole only when the proxy changes it or runs it itself.
        let Some(params) = params else { return Decision::Forward(Rewrite::None) };
        let Some(head) = Head::read(params.get()) else {
            return Decision::Forward(Rewrite::None); // let the upstream judge malformed calls
        };
        let Some(tool) = head.name.as_deref().map(str::to_owned) else {
            return Decision::Forward(Rewrite::None);
        };
        // A 2025-11-25 `task` hint means nothing in 2026-07-28 (the server decides), and must not reach
        // the upstream, which would take it for its own.
        let strip_task = head.task;
        let config = self.engine.config();
        let own_async = has_allow_async(head.arguments);
        // A client's own `allow_async` stays its protocol, unless it came with a task hint from a
        // client that declared the Tasks extension: then the call is one of our tasks, as in 2025-11-25.
        let ours = own_async && strip_task && modern.tasks;
        // The call as the proxy passes it on.
        let edited = |strip_async: bool| {
            let mut call = serde_json::from_str::<Map<String, Value>>(params.get()).ok()?;
            if strip_task {
                call.remove("task");
            }
            if strip_async {
                super::without_allow_async(&mut call);
            }
            Some(call)
        };
        let forward = |rewrite: Rewrite, strip_async: bool| {
            if !strip_task && !strip_async {
                return Decision::Forward(rewrite); // as the client sent it
            }
            match edited(strip_async) {
                Some(call) => Decision::ForwardAs(
                    jsonrpc::request(id, "tools/call", Some(&Value::Object(call).to_string())),
                    rewrite,
                ),
                None => Decision::Forward(rewrite),
            }
        };
        if (own_async && !ours) || tool == self.notion.poll_tool() {
            self.notion.note_client_call();
            return forward(Rewrite::None, false);
        }
        let notion = self.notion.handles(&tool) || (ours && self.notion.is_active());
        // Run as a plain task: the result is then the page, not an async task to poll by hand.
        let strip_async =
            ours && !notion && config.taskifies(&tool) && !self.facts().native_tools.contains(&tool);
        if config.sync_deadline_ms > 0 && (tool == STATUS_TOOL || tool == RESULT_TOOL) {
            let arguments = head.arguments.and_then(|a| serde_json::from_str::<Value>(a).ok());
            let this = self.clone();
            let id = id.clone();
            self.tasks
                .answering
                .spawn(async move { this.run_handoff_tool(&id, &tool, arguments.as_ref(), true).await });
            return Decision::Handled;
        }
        if self.upstream_runs_tasks() {
            // A 2026-07-28 upstream with tasks of its own decides itself; its tasks pass untouched.
            self.notion.note_client_call();
            return forward(Rewrite::NativeTaskCall { tool }, strip_async);
        }
        self.tools_known().await;
        let native = self.facts().native_tools.contains(&tool);
        if native && modern.tasks {
            // The 2025-11-25 upstream runs this tool as its own task: asked the 2025-11-25 way, and
            // its task is offered as the Tasks extension's.
            self.notion.note_client_call();
            let Some(mut call) = edited(strip_async) else { return Decision::Forward(Rewrite::None) };
            call.insert("task".into(), json!({}));
            let line = jsonrpc::request(id, "tools/call", Some(&Value::Object(call).to_string()));
            return Decision::ForwardAs(line, Rewrite::NativeTaskForModern { tool });
        }
        if !native && config.requires_task(&tool) && !modern.tasks {
            self.client.send(era::missing_tasks_extension(id, &format!("tool '{tool}'"))).await;
            return Decision::Handled;
        }
        if native || !(notion || config.taskifies(&tool)) {
            self.notion.note_client_call();
            return forward(Rewrite::None, strip_async);
        }
        if !modern.tasks {
            // No task for a request that did not ask for them; the sync-client help still applies.
            self.notion.note_client_call();
            let token = head
                .meta
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .and_then(|m| m.get("progressToken").map(Value::to_string));
            self.watch_plain_call(id.clone(), tool, token, HandOff::Text { modern: true });
            return forward(Rewrite::PlainCall, strip_async);
        }
        if notion || config.task_after_ms == 0 {
            let Some(call) = edited(strip_async) else { return Decision::Forward(Rewrite::None) };
            let this = self.clone();
            let id = id.clone();
            let origin = if notion { Origin::Notion } else { Origin::Local };
            tokio::spawn(async move { this.run_engine_task(&id, &tool, call, origin).await });
            return Decision::Handled;
        }
        self.notion.note_client_call();
        self.watch_task_window(id.clone(), tool.clone());
        forward(Rewrite::TaskWindow { tool, started: Instant::now() }, strip_async)
    }

    /// A call in its task window: still running after `task_after_ms`, it becomes a task.
    fn watch_task_window(self: &Arc<Self>, id: Id, tool: String) {
        let window = Duration::from_millis(self.engine.config().task_after_ms);
        let this = self.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let in_window = matches!(this.pending.rewrite_of(&id), Some(Rewrite::TaskWindow { .. }));
            if in_window {
                this.hand_off(&id, &tool, started, HandOff::Task).await;
            }
        });
    }

    /// A task run by the engine from the start (a Notion task, or any task when `task_after_ms` is 0):
    /// answered inline if it ends within `task_after_ms`, else as a `CreateTaskResult`.
    async fn run_engine_task(
        self: &Arc<Self>,
        id: &Id,
        tool: &str,
        call: Map<String, Value>,
        origin: Origin,
    ) {
        let record = match self.engine.create(&self.owner, tool, origin, Generation::Modern, None).await {
            Ok(created) => created,
            Err(e) => {
                let line = jsonrpc::error_response(Some(id), code::INTERNAL_ERROR, &e.to_string(), None);
                self.client.send(line).await;
                return;
            }
        };
        self.tasks.started.insert(record.id.clone(), ());
        self.tasks.modern_tasks.insert(record.id.clone(), InputRequests::new());
        if origin == Origin::Notion {
            let stop = self.engine.stop_signal(&record.id).await;
            let this = self.clone();
            let task_id = record.id.clone();
            tokio::spawn(async move {
                this.notion.run_task(&this.engine, &this.upstream, &task_id, call, stop).await
            });
        } else {
            self.start_local_task(&record.id, &Value::Object(call).to_string()).await;
        }
        let window = Duration::from_millis(self.engine.config().task_after_ms);
        if !window.is_zero()
            && let Ok(Some(done)) =
                tokio::time::timeout(window, self.engine.wait_terminal(&self.owner, &record.id)).await
        {
            let line = match &done.outcome {
                Some(Outcome::Result(raw)) => Some(era_result(id, raw.get(), true)),
                Some(Outcome::Error(raw)) => Some(jsonrpc::error_object_response(id, raw.get())),
                None => None,
            };
            if let Some(line) = line {
                // Finished inside the window: the client never learns of the task.
                self.tasks.modern_tasks.remove(&record.id);
                self.engine.discard(&record.id).await;
                self.client.send(line).await;
                return;
            }
        }
        let current = self.engine.get(&self.owner, &record.id).await.unwrap_or(record);
        self.client
            .send(jsonrpc::result_response(id, &Value::Object(current.to_created()).to_string()))
            .await;
    }
}
