//! What the upstream offers, learnt and shown: its `initialize` result (2025-11-25 tasks added), its
//! tools (taskified ones marked `taskSupport`, the hand-off tools added), and the proxy's own listing
//! of its tools after the handshake (which tools run tasks of their own, whether it speaks Notion's
//! protocol), so that a task-run call is routed right even if the client never lists tools.

use super::{Interceptor, lookup_value, sync_clients};
use crate::jsonrpc::Outcome;
use crate::jsonrpc::{self, Id};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Interceptor {
    /// Notes what the upstream's `initialize` result says about it.
    pub(super) fn learn_initialize(&self, result: &Map<String, Value>) {
        let caps = result.get("capabilities").and_then(Value::as_object).cloned().unwrap_or_default();
        let mut facts = self.facts();
        facts.tools_call = lookup_value(&caps, &["tasks", "requests", "tools", "call"]).is_some();
        facts.list = lookup_value(&caps, &["tasks", "list"]).is_some();
        facts.cancel = lookup_value(&caps, &["tasks", "cancel"]).is_some();
        facts.has_tools = caps.contains_key("tools");
        facts.initialized = Some(result.clone());
        drop(facts);
        self.peers.upstream_ready.send_replace(true);
    }

    pub(super) fn rewrite_initialize(&self, id: &Id, result: &RawValue) -> Option<Vec<u8>> {
        let mut r: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
        self.learn_initialize(&r);
        // A handshake is 2025-11-25 at the newest: an upstream that echoes a later version asked for
        // in `initialize` would have the client believe in a session 2026-07-28 does not have.
        if r.get("protocolVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v > crate::proxy::era::LEGACY_VERSIONS[0])
        {
            r.insert("protocolVersion".into(), json!(crate::proxy::era::LEGACY_VERSIONS[0]));
        }
        let caps = r.entry("capabilities").or_insert_with(|| json!({}));
        let caps = caps.as_object_mut()?;
        let tasks = caps.entry("tasks").or_insert_with(|| json!({}));
        let tasks = tasks.as_object_mut()?;
        // Tasks bound to nothing but their ids (an HTTP session without a credential) are not listed:
        // the spec says SHOULD NOT declare tasks/list then.
        if !self.owner.starts_with("session:") {
            tasks.entry("list").or_insert_with(|| json!({}));
        }
        tasks.entry("cancel").or_insert_with(|| json!({}));
        let requests = tasks.entry("requests").or_insert_with(|| json!({})).as_object_mut()?;
        let tools = requests.entry("tools").or_insert_with(|| json!({})).as_object_mut()?;
        tools.entry("call").or_insert_with(|| json!({}));
        Some(jsonrpc::result_response(id, &Value::Object(r).to_string()))
    }

    /// Marks the tools that may run as tasks (2025-11-25: `execution.taskSupport`; 2026-07-28 has no
    /// such field, the server decides), and adds the hand-off tools to the first page.
    pub(super) fn rewrite_tools_list(
        &self,
        id: &Id,
        result: &RawValue,
        first_page: bool,
        modern: bool,
    ) -> Option<Vec<u8>> {
        let mut r: Map<String, Value> = serde_json::from_str(result.get()).ok()?;
        let tools = r.get_mut("tools")?.as_array_mut()?;
        self.learn_tools(tools);
        if self.notion.hides_allow_async() {
            for tool in tools.iter_mut() {
                let name = tool.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                if self.notion.handles(&name) {
                    hide_allow_async(tool);
                }
            }
        }
        let facts = self.facts();
        for tool in tools.iter_mut().filter(|_| !modern) {
            let Some(tool) = tool.as_object_mut() else { continue };
            let Some(name) = tool.get("name").and_then(Value::as_str) else { continue };
            if facts.native_tools.contains(name) {
                continue;
            }
            let support = match self.engine.config().requires_task(name) {
                true => "required",
                false if self.engine.config().taskifies(name) || self.notion.handles(name) => "optional",
                false => continue,
            };
            let execution = tool.entry("execution").or_insert_with(|| json!({}));
            if let Some(execution) = execution.as_object_mut() {
                execution.insert("taskSupport".into(), Value::String(support.into()));
            }
        }
        if first_page && self.engine.config().sync_deadline_ms > 0 {
            tools.extend(sync_clients::handoff_tools());
        }
        drop(facts);
        let body = Value::Object(r).to_string();
        let body = if modern { crate::proxy::era::complete_result("tools/list", &body) } else { body };
        Some(jsonrpc::result_response(id, &body))
    }

    /// Notes what a page of the upstream's tools tells: Notion's protocol, tools with tasks of their own.
    fn learn_tools(&self, tools: &[Value]) {
        self.notion.detect(tools.iter().filter_map(|t| t.get("name").and_then(Value::as_str)));
        let mut facts = self.facts();
        for tool in tools {
            let Some(name) = tool.get("name").and_then(Value::as_str) else { continue };
            let native = tool
                .pointer("/execution/taskSupport")
                .and_then(Value::as_str)
                .is_some_and(|s| s == "optional" || s == "required");
            if native && facts.tools_call {
                facts.native_tools.insert(name.to_owned());
            }
        }
    }

    /// The client finished the handshake: list the upstream's tools on our own behalf (every page).
    pub fn on_initialized(self: &Arc<Self>) {
        if !self.enabled() || !self.facts().has_tools {
            self.peers.tools_known.send_replace(true);
            return;
        }
        self.peers.discovering.store(true, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            let mut cursor: Option<String> = None;
            for _ in 0..100 {
                let params =
                    cursor.as_ref().map_or_else(|| "{}".to_owned(), |c| json!({ "cursor": c }).to_string());
                let params = this.for_upstream(&params);
                let page = match this
                    .upstream
                    .request("tools/list", Some(&params), Some(Duration::from_secs(30)))
                    .await
                {
                    Ok(Outcome::Result(raw)) => {
                        serde_json::from_str::<Map<String, Value>>(raw.get()).unwrap_or_default()
                    }
                    Ok(Outcome::Error(e)) => {
                        tracing::warn!(error = %e.get(), "the upstream refused to list its tools to the proxy");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not list the upstream's tools");
                        break;
                    }
                };
                if let Some(Value::Array(tools)) = page.get("tools") {
                    this.learn_tools(tools);
                }
                match page.get("nextCursor") {
                    Some(Value::String(next)) => cursor = Some(next.clone()),
                    _ => break,
                }
            }
            this.peers.tools_known.send_replace(true);
        });
    }

    /// Waits (a bounded time) until the upstream's tools are known, so a task-run call made right after
    /// the handshake is routed as well as a later one.
    pub(super) async fn tools_known(&self) {
        if !self.peers.discovering.load(Ordering::Relaxed) {
            return; // no handshake seen (a bare client): nothing to wait for
        }
        let mut known = self.peers.tools_known.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), known.wait_for(|k| *k)).await;
    }
}

/// Removes `allow_async` from a tool's input schema (its property, and its place in `required`).
fn hide_allow_async(tool: &mut Value) {
    let Some(schema) = tool.get_mut("inputSchema").and_then(Value::as_object_mut) else { return };
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.remove("allow_async");
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|r| r != "allow_async");
    }
}
