//! A client's `tools/call`: decided from the top level of its params read in place when it is plain
//! (the common case, the hot path), else from a full reading: a task of ours, a hand-off tool, Notion's
//! protocol driven by the client, a tool that requires a task.

use super::*;
use crate::jsonrpc::scan::Member;

impl Interceptor {
    pub(super) async fn on_tools_call(self: &Arc<Self>, id: &Id, params: Option<&RawValue>) -> Decision {
        if let Some(decision) = self.plain_call_fast(id, params) {
            return decision;
        }
        let Some(mut call) = params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok())
        else {
            return Decision::Forward(Rewrite::PlainCall); // let the upstream judge malformed calls
        };
        let Some(tool) = call.get("name").and_then(Value::as_str).map(str::to_owned) else {
            return Decision::Forward(Rewrite::PlainCall);
        };
        let own_async = call.get("arguments").and_then(|a| a.get("allow_async")).is_some();
        if (own_async || tool == self.notion.poll_tool()) && !call.contains_key("task") {
            // The client drives Notion's protocol itself: hands off, but it spends the same budget.
            // (With `params.task` it asked for one of our tasks: that goes on below, and `params.task`
            // never reaches an upstream that has no tasks.)
            self.notion.note_client_call();
            return Decision::Forward(Rewrite::None);
        }
        let sync_deadline = self.engine.config().sync_deadline_ms;
        if sync_deadline > 0
            && (tool == STATUS_TOOL || tool == RESULT_TOOL)
            && !self.facts().native_tools.contains(&tool)
        {
            let this = self.clone();
            let id = id.clone();
            self.tasks
                .answering
                .spawn(async move { this.run_handoff_tool(&id, &tool, call.get("arguments"), false).await });
            return Decision::Handled;
        }
        let Some(task) = call.remove("task") else {
            if self.engine.config().requires_task(&tool) && !self.facts().native_tools.contains(&tool) {
                let msg = format!(
                    "Tool '{tool}' requires task-augmented execution (taskSupport is required); call it with params.task"
                );
                return self.reply_error(id, code::METHOD_NOT_FOUND, &msg).await;
            }
            self.notion.note_client_call();
            if self.engine.config().taskifies(&tool) {
                let token = call.get("_meta").and_then(|m| m.get("progressToken")).map(Value::to_string);
                self.watch_plain_call(id.clone(), tool, token, sync_clients::HandOff::Text { modern: false });
            }
            return Decision::Forward(Rewrite::PlainCall);
        };
        self.peers.client_speaks_tasks.store(true, Ordering::Relaxed);
        self.tools_known().await;
        if self.facts().native_tools.contains(&tool) {
            return Decision::Forward(Rewrite::NativeTaskCall { tool });
        }
        // A client's own `allow_async` beside `params.task`: the adapter drives Notion's protocol when
        // it runs, else the call runs as a plain task without it (so its result is the page, not an
        // async task the client would have to poll itself).
        let notion = self.notion.handles(&tool) || (own_async && self.notion.is_active());
        if own_async && !notion {
            without_allow_async(&mut call);
        }
        if !notion && !self.engine.config().taskifies(&tool) {
            let msg = format!(
                "Tool '{tool}' does not support task-augmented execution (taskSupport is forbidden); call it without params.task"
            );
            return self.reply_error(id, code::METHOD_NOT_FOUND, &msg).await;
        }
        let ttl = match &task {
            Value::Object(t) => match t.get("ttl") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(ms) => Some(ms),
                    None => {
                        let msg =
                            format!("params.task.ttl must be a non-negative integer (milliseconds), got {v}");
                        return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
                    }
                },
            },
            other => {
                let msg = format!("params.task must be an object such as {{\"ttl\": 60000}}, got {other}");
                return self.reply_error(id, code::INVALID_PARAMS, &msg).await;
            }
        };
        // The create waits for the store (an fsync on the file store, a round trip on Redis): it runs
        // beside the session, so the client's next requests are not queued behind it.
        let this = self.clone();
        let id = id.clone();
        self.tasks.answering.spawn(async move { this.start_legacy_task(&id, tool, call, notion, ttl).await });
        Decision::Handled
    }

    /// Creates the task of a 2025-11-25 task call, answers its `CreateTaskResult` once the task is
    /// durable, then starts the work.
    async fn start_legacy_task(
        self: &Arc<Self>,
        id: &Id,
        tool: String,
        call: Map<String, Value>,
        notion: bool,
        ttl: Option<u64>,
    ) {
        let origin = if notion { Origin::Notion } else { Origin::Local };
        let record = match self.engine.create(&self.owner, &tool, origin, Generation::Legacy, ttl).await {
            Ok(created) => created,
            Err(e) => {
                self.reply_error(id, code::INTERNAL_ERROR, &e.to_string()).await;
                return;
            }
        };
        self.tasks.started.insert(record.id.clone(), ());
        let mut result = Map::new();
        result.insert("task".into(), Value::Object(record.to_wire()));
        result.insert(
            "_meta".into(),
            json!({ "io.modelcontextprotocol/model-immediate-response":
                format!("Started `{tool}` as task {}; its result will be available when it finishes.", record.id) }),
        );
        // The answer goes out before the work starts, so no status notification can overtake it.
        self.reply_result(id, &Value::Object(result)).await;
        if notion {
            let stop = self.engine.stop_signal(&record.id).await;
            let this = self.clone();
            tokio::spawn(async move {
                this.notion.run_task(&this.engine, &this.upstream, &record.id, call, stop).await;
            });
        } else {
            self.start_local_task(&record.id, &Value::Object(call).to_string()).await;
        }
    }

    /// The common `tools/call`, decided from the top level of its params read in place (the arguments
    /// are skipped, never built): a plain call of an ordinary tool is forwarded as it came. `None`: the
    /// call needs [`Self::on_tools_call`]'s full reading (a task, a hand-off tool, Notion, a required
    /// task tool, or params this reading does not take, such as duplicate keys); the decision is the
    /// same either way.
    pub(super) fn plain_call_fast(self: &Arc<Self>, id: &Id, params: Option<&RawValue>) -> Option<Decision> {
        let params = params?;
        if !params.get().starts_with('{') {
            return None;
        }
        let head = Head::read(params.get())?;
        let tool = head.name?;
        if head.task || has_allow_async(head.arguments) || tool == self.notion.poll_tool() {
            return None;
        }
        let config = self.engine.config();
        if (config.sync_deadline_ms > 0 && (tool == STATUS_TOOL || tool == RESULT_TOOL))
            || config.requires_task(&tool)
        {
            return None;
        }
        self.notion.note_client_call();
        if config.taskifies(&tool) {
            let token = match head.meta {
                Some(meta) => {
                    serde_json::from_str::<Value>(meta).ok()?.get("progressToken").map(Value::to_string)
                }
                None => None,
            };
            self.watch_plain_call(
                id.clone(),
                tool.into_owned(),
                token,
                sync_clients::HandOff::Text { modern: false },
            );
        }
        Some(Decision::Forward(Rewrite::PlainCall))
    }
}

/// The top level of a `tools/call`'s params, borrowed from the message: what routes the call. A key
/// present with `null` counts as present, as it does in a parsed object.
#[derive(serde::Deserialize)]
pub(super) struct CallHead<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    task: Option<&'a RawValue>,
    #[serde(rename = "_meta", borrow, default, deserialize_with = "present")]
    meta: Option<&'a RawValue>,
}

/// The head of a call as [`Interceptor::plain_call_fast`] uses it: the tool, whether `task` is there
/// (`null` too), the `arguments` and `_meta` as their JSON text.
pub(super) struct Head<'a> {
    pub(super) name: Option<std::borrow::Cow<'a, str>>,
    pub(super) arguments: Option<&'a str>,
    pub(super) task: bool,
    pub(super) meta: Option<&'a str>,
}

impl<'a> Head<'a> {
    /// The head of a call's params. The params were proved valid JSON with their message, so a walk of
    /// their top level finds the members (no serde pass over the arguments); where the walk is not
    /// sure (an escaped key or name, a key twice, a name that is not a plain string) serde reads them
    /// as a [`CallHead`]. `None`: params serde does not read as a head either.
    pub(super) fn read(params: &'a str) -> Option<Self> {
        Self::walk(params).or_else(|| {
            let head: CallHead<'a> = serde_json::from_str(params).ok()?;
            Some(Head {
                name: head.name,
                arguments: head.arguments.map(RawValue::get),
                task: head.task.is_some(),
                meta: head.meta.map(RawValue::get),
            })
        })
    }

    fn walk(params: &'a str) -> Option<Self> {
        let [name, arguments, task, meta] = jsonrpc::scan::object_members(params, |key| match key {
            b"name" => Some(0),
            b"arguments" => Some(1),
            b"task" => Some(2),
            b"_meta" => Some(3),
            _ => None,
        })?;
        let name = match name.map(Member::text) {
            None => None,
            Some(text) => Some(std::borrow::Cow::Borrowed(crate::jsonrpc::plain_string(text)?)),
        };
        Some(Head {
            name,
            arguments: arguments.map(Member::text),
            task: task.is_some(),
            meta: meta.map(Member::text),
        })
    }
}

pub(super) fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// Whether a call's raw `arguments` have the top-level key `allow_async` (Notion's own async
/// protocol), as `Value::get` has it: `false` for arguments that are not an object. A walk of the
/// arguments' top level answers (they were proved valid with their message); an escaped key or a key
/// twice is left to the reading below it, which answers most calls without parsing: the key can only
/// be there if its text is, or an escape that could spell it.
pub(super) fn has_allow_async(arguments: Option<&str>) -> bool {
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new("allow_async"));
    let Some(raw) = arguments else { return false };
    if !raw.starts_with('{') {
        return false;
    }
    if let Some([found]) = jsonrpc::scan::object_members(raw, |key| (key == b"allow_async").then_some(0)) {
        return found.is_some();
    }
    if !jsonrpc::may_contain_key(raw.as_bytes(), &KEY) {
        return false;
    }
    serde_json::from_str::<std::collections::HashMap<std::borrow::Cow<'_, str>, serde::de::IgnoredAny>>(raw)
        .is_ok_and(|keys| keys.contains_key("allow_async"))
}

/// Removes a client's `allow_async` from a call's arguments.
pub(super) fn without_allow_async(call: &mut Map<String, Value>) {
    if let Some(Value::Object(args)) = call.get_mut("arguments") {
        args.remove("allow_async");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_async_is_read_as_a_parsed_object_has_it() {
        for args in [
            r#"{}"#,
            r#""allow_async""#,
            r#"[{"allow_async":1}]"#,
            r#"{"allow_async":null}"#,
            r#"{"\u0061llow_async":true}"#,
            r#"{"text":"allow_async"}"#,
            r#"{"text":"\u0041","nested":{"allow_async":1}}"#,
            r#"{"a":1,"allow_async":false,"allow_async":true}"#,
        ] {
            let parsed: Value = serde_json::from_str(args).unwrap();
            assert_eq!(has_allow_async(Some(args)), parsed.get("allow_async").is_some(), "{args}");
        }
        assert!(!has_allow_async(None));
    }

    #[test]
    fn the_call_head_counts_a_null_as_present_and_refuses_duplicates() {
        let head: CallHead<'_> =
            serde_json::from_str(r#"{"name":"echo","task":null,"arguments":{"x":1}}"#).unwrap();
        assert_eq!(head.name.as_deref(), Some("echo"));
        assert!(head.task.is_some(), "task: null is a task field, refused later as not an object");
        assert!(head.meta.is_none());
        // Duplicate keys: left to the full reading (the last one wins there).
        assert!(serde_json::from_str::<CallHead<'_>>(r#"{"name":"a","name":"b"}"#).is_err());
    }

    #[test]
    fn the_walk_reads_the_head_serde_reads_or_leaves_it_to_serde() {
        fn parts<'a>(h: &Head<'a>) -> (Option<String>, Option<&'a str>, bool, Option<&'a str>) {
            (h.name.as_deref().map(str::to_owned), h.arguments, h.task, h.meta)
        }
        let cases = [
            (r#"{"name":"echo","arguments":{"text":"x"}}"#, true),
            (
                r#" { "_meta" : {"progressToken":1} , "arguments":{"name":"no","task":1}, "name" : "é\u0000" }"#,
                false,
            ),
            (
                r#" { "_meta" : {"progressToken":1} , "arguments":{"name":"no","task":1}, "name" : "é" }"#,
                true,
            ),
            (r#"{"name":"echo","task":{"ttl":60000},"x":[{"_meta":1}]}"#, true),
            (r#"{"name":"echo","task":null}"#, true),
            (r#"{"arguments":{}}"#, true),
            (r#"{}"#, true),
            // Left to serde: an escaped name or key, a name that is not a string, a key twice.
            (r#"{"name":"a\"b"}"#, false),
            (r#"{"n\u0061me":"echo"}"#, false),
            (r#"{"name":null}"#, false),
            (r#"{"name":7}"#, false),
            (r#"{"name":"a","name":"b"}"#, false),
        ];
        for (params, walked) in cases {
            assert_eq!(Head::walk(params).is_some(), walked, "{params}");
            let serde = serde_json::from_str::<CallHead<'_>>(params).ok().map(|h| {
                (
                    h.name.as_deref().map(str::to_owned),
                    h.arguments.map(RawValue::get),
                    h.task.is_some(),
                    h.meta.map(RawValue::get),
                )
            });
            assert_eq!(Head::read(params).as_ref().map(parts), serde, "{params}");
        }
    }
}
