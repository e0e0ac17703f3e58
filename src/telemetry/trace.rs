//! Spans and per-request measurement.
//!
//! A client request gets a SERVER span (continuing the client's trace when its `params._meta` carries a
//! W3C `traceparent`) and, when it goes upstream, a CLIENT span whose `traceparent` is written into the
//! forwarded request's `params._meta`, so the trace continues to the upstream. Each task has a span
//! covering its whole life, with an event at each transition and each Notion poll. When traces are off
//! nothing is rewritten: passthrough stays byte-exact.

use super::metrics::metrics;
use crate::jsonrpc::{Envelope, Id, Kind};
use dashmap::DashMap;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, global};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static TRACE_ON: AtomicBool = AtomicBool::new(false);

pub(super) fn enable() {
    TRACE_ON.store(true, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn trace_on() -> bool {
    TRACE_ON.load(Ordering::Relaxed)
}

fn tracer() -> global::BoxedTracer {
    global::tracer("mcp-asyncify")
}

/// The `traceparent` of a span context.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// A context continuing `traceparent` (and `tracestate`), or the empty context.
pub fn extract(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    use opentelemetry::propagation::TextMapPropagator;
    let Some(tp) = traceparent else { return Context::new() };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), tp.to_string());
    if let Some(ts) = tracestate {
        carrier.insert("tracestate".to_string(), ts.to_string());
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier)
}

/// What is known of a client request while it is answered.
struct Operation {
    started: Instant,
    method: String,
    tool: Option<String>,
    server: Option<Context>,
    client: Option<(Instant, Context)>,
    /// `mcp.protocol.version`: the request's own (2026-07-28) or its session's.
    version: Option<String>,
}

/// The client requests of one session being answered, for their durations and spans.
#[derive(Default)]
pub struct Operations {
    open: DashMap<Id, Operation>,
    /// The protocol version the client's `initialize` asked for (its session's generation).
    session_version: std::sync::OnceLock<String>,
}

fn op_attrs(method: &str, tool: Option<&str>) -> Vec<KeyValue> {
    let mut attrs =
        vec![KeyValue::new("mcp.method.name", method.to_owned()), KeyValue::new("network.transport", "pipe")];
    if let Some(t) = tool {
        attrs.push(KeyValue::new("gen_ai.tool.name", t.to_owned()));
    }
    attrs
}

/// Records the duration of one MCP request into `histogram`, with the semconv attributes.
fn record_operation(
    histogram: &opentelemetry::metrics::Histogram<f64>,
    started: Instant,
    method: &str,
    tool: Option<&str>,
    error: Option<&str>,
    version: Option<&str>,
) {
    let mut attrs = op_attrs(method, tool);
    if let Some(v) = version {
        attrs.push(KeyValue::new("mcp.protocol.version", v.to_owned()));
    }
    if let Some(e) = error {
        attrs.push(KeyValue::new("error.type", e.to_owned()));
    }
    histogram.record(started.elapsed().as_secs_f64(), &attrs);
}

/// Records a request the proxy made upstream (`mcp.client.operation.duration`), answered now.
pub fn record_client_operation(started: Instant, method: &str, tool: Option<&str>, error: Option<&str>) {
    record_operation(&metrics().client_operation, started, method, tool, error, None);
}

#[derive(serde::Deserialize)]
struct CallParams<'a> {
    #[serde(borrow, default)]
    name: Option<&'a str>,
    #[serde(rename = "protocolVersion", borrow, default)]
    initialize_version: Option<&'a str>,
    #[serde(rename = "_meta", borrow, default)]
    meta: Option<TraceMeta<'a>>,
}

#[derive(serde::Deserialize)]
struct TraceMeta<'a> {
    #[serde(rename = "io.modelcontextprotocol/protocolVersion", borrow, default)]
    version: Option<&'a str>,
    #[serde(borrow, default)]
    traceparent: Option<&'a str>,
    #[serde(borrow, default)]
    tracestate: Option<&'a str>,
}

impl Operations {
    /// Whether anything is measured at all.
    pub fn active() -> bool {
        super::metrics_on() || trace_on()
    }

    /// A client request arrived: start measuring it (and its SERVER span).
    pub fn started(&self, id: &Id, method: &str, params: Option<&RawValue>) {
        let parsed: Option<CallParams<'_>> = params.and_then(|p| serde_json::from_str(p.get()).ok());
        let tool = parsed.as_ref().and_then(|p| p.name).filter(|_| method == "tools/call").map(str::to_owned);
        if method == "initialize"
            && let Some(v) = parsed.as_ref().and_then(|p| p.initialize_version)
        {
            let _ = self.session_version.set(v.to_owned());
        }
        let version = parsed
            .as_ref()
            .and_then(|p| p.meta.as_ref())
            .and_then(|m| m.version)
            .map(str::to_owned)
            .or_else(|| self.session_version.get().cloned());
        let server = trace_on().then(|| {
            let meta = parsed.as_ref().and_then(|p| p.meta.as_ref());
            let parent = extract(meta.and_then(|m| m.traceparent), meta.and_then(|m| m.tracestate));
            let name = match &tool {
                Some(t) => format!("{method} {t}"),
                None => method.to_owned(),
            };
            let span = tracer()
                .span_builder(name)
                .with_kind(SpanKind::Server)
                .with_attributes(op_attrs(method, tool.as_deref()))
                .start_with_context(&tracer(), &parent);
            parent.with_span(span)
        });
        self.open.insert(
            id.clone(),
            Operation {
                started: Instant::now(),
                method: method.to_owned(),
                tool,
                server,
                client: None,
                version,
            },
        );
    }

    /// The request goes upstream: with traces on, returns the line with the CLIENT span's
    /// `traceparent` written into `params._meta` (None: forward the original bytes).
    /// `params` are the request's own, read from `line` by the caller (so it is not read again).
    pub fn forwarded(&self, id: &Id, line: &[u8], params: Option<&RawValue>) -> Option<Vec<u8>> {
        let mut op = self.open.get_mut(id)?;
        let parent = op.server.clone()?;
        let name = match &op.tool {
            Some(t) => format!("{} {t}", op.method),
            None => op.method.clone(),
        };
        let span = tracer()
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(op_attrs(&op.method, op.tool.as_deref()))
            .start_with_context(&tracer(), &parent);
        let cx = parent.with_span(span);
        let tp = traceparent(&cx)?;
        op.client = Some((Instant::now(), cx));
        drop(op);
        spliced_traceparent(line, params, &tp).or_else(|| reserialised_with_traceparent(line, &tp))
    }

    /// The upstream answered a forwarded request (`error`: its error code, if any).
    pub fn upstream_answered(&self, id: &Id, error: Option<String>) {
        let Some(mut op) = self.open.get_mut(id) else { return };
        let (at, cx) = match op.client.take() {
            Some(c) => (c.0, Some(c.1)),
            None => (op.started, None),
        };
        record_client_operation(at, &op.method, op.tool.as_deref(), error.as_deref());
        drop(op);
        if let Some(cx) = cx {
            if let Some(e) = error {
                cx.span().set_status(Status::error(e));
            }
            cx.span().end();
        }
    }

    /// A line is about to be written to the client: a response ends its request's measurement.
    pub fn observe_client_line(&self, line: &[u8]) {
        if self.open.is_empty() {
            return;
        }
        let Ok(env) = Envelope::parse(line) else { return };
        if env.kind != Kind::Response {
            return;
        }
        let Some(id) = env.id.as_ref() else { return };
        self.answered(id, env.result, env.error);
    }

    /// The response to request `id` goes to the client (with its `result` or `error`): its
    /// measurement ends. The router calls this for the answers it forwards as they came, from the
    /// envelope it already read; every other line to the client is seen by
    /// [`Self::observe_client_line`].
    pub fn answered(&self, id: &Id, result: Option<&RawValue>, error: Option<&RawValue>) {
        let Some((_, op)) = self.open.remove(id) else { return };
        let error = match (error, result) {
            (Some(e), _) => Some(error_code(e)),
            (None, Some(r)) if op.method == "tools/call" && is_tool_error(r) => Some("tool_error".to_owned()),
            _ => None,
        };
        record_operation(
            &metrics().server_operation,
            op.started,
            &op.method,
            op.tool.as_deref(),
            error.as_deref(),
            op.version.as_deref(),
        );
        if let Some((_, cx)) = op.client {
            cx.span().end();
        }
        if let Some(cx) = op.server {
            if let Some(e) = error {
                cx.span().set_status(Status::error(e));
            }
            cx.span().end();
        }
    }

    /// The client cancelled a request: it will get no answer, so its measurement is dropped.
    pub fn forget(&self, id: &Id) {
        self.open.remove(id);
    }

    /// The session ended: whatever is still open ends now.
    pub fn close(&self) {
        self.open.clear();
    }
}

/// A JSON-RPC error's code, as `error.type`.
pub fn error_code(error: &RawValue) -> String {
    crate::jsonrpc::error_code_of(error.get()).map_or_else(|| "_OTHER".to_owned(), |c| c.to_string())
}

fn is_tool_error(result: &RawValue) -> bool {
    // The key's text must be there, or an escape that could spell it; most results are not read.
    // Only `"isError"` followed by `: true` can make it one (or an escape that could spell the key),
    // so most results are not read again.
    static KEY: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new("\"isError\""));
    let bytes = result.get().as_bytes();
    let escaped = memchr::memchr_iter(b'\\', bytes).any(|i| bytes.get(i + 1) == Some(&b'u'));
    let set = || {
        KEY.find_iter(bytes).any(|at| {
            let rest = bytes[at + 9..].trim_ascii_start();
            rest.strip_prefix(b":").is_some_and(|v| v.trim_ascii_start().starts_with(b"true"))
        })
    };
    if !escaped && !set() {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct R {
        #[serde(rename = "isError", default)]
        is_error: Option<bool>,
    }
    serde_json::from_str::<R>(result.get()).ok().and_then(|r| r.is_error).unwrap_or(false)
}

/// The line with `params._meta.traceparent` set (`None`: its params are not an object). The value is
/// written into the original bytes, the rest of the message left as it came; a message that cannot be
/// read that way (no params, duplicate keys) is re-serialised as parsed, with the same meaning.
pub fn with_traceparent(line: &[u8], tp: &str) -> Option<Vec<u8>> {
    let params = Envelope::parse(line).ok().and_then(|env| env.params);
    spliced_traceparent(line, params, tp).or_else(|| reserialised_with_traceparent(line, tp))
}

/// [`with_traceparent`] by splicing into `line`, whose `params` are given (read from it): `_meta` (or
/// its `traceparent`) is added at the end of its object, or the `traceparent` value replaced where it
/// stands, as a parsed object would have it. `None`: not done this way.
fn spliced_traceparent(line: &[u8], params: Option<&RawValue>, tp: &str) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Params<'a> {
        #[serde(rename = "_meta", borrow, default, deserialize_with = "present")]
        meta: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        traceparent: Option<&'a RawValue>,
    }
    let params = params?.get();
    let start = (params.as_ptr() as usize).checked_sub(line.as_ptr() as usize)?;
    if !params.starts_with('{') || start + params.len() > line.len() {
        return None; // not an object, or not read from this line
    }
    let offset = |inner: &str| inner.as_ptr() as usize - line.as_ptr() as usize;
    let value = format!("\"{tp}\"");
    // (where, how many bytes it replaces, what goes there)
    let (at, replaced, text) = match serde_json::from_str::<Params<'_>>(params).ok()?.meta {
        None => (
            offset(params) + params.len() - 1,
            0,
            member(params, "_meta", &format!("{{\"traceparent\":{value}}}")),
        ),
        Some(meta) if meta.get().starts_with('{') => {
            let meta = meta.get();
            match serde_json::from_str::<Meta<'_>>(meta).ok()?.traceparent {
                Some(old) => (offset(old.get()), old.get().len(), value),
                None => (offset(meta) + meta.len() - 1, 0, member(meta, "traceparent", &value)),
            }
        }
        Some(_) => return None,
    };
    let mut out = Vec::with_capacity(line.len() + text.len());
    out.extend_from_slice(&line[..at]);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&line[at + replaced..]);
    Some(out)
}

/// `"key":value` to add at the end of the object `object` (JSON text), after a comma unless it is empty.
fn member(object: &str, key: &str, value: &str) -> String {
    let empty = object[1..object.len() - 1].trim().is_empty();
    format!("{}\"{key}\":{value}", if empty { "" } else { "," })
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

fn reserialised_with_traceparent(line: &[u8], tp: &str) -> Option<Vec<u8>> {
    let mut msg: Map<String, Value> = serde_json::from_slice(line).ok()?;
    let params = msg.entry("params").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
    set_traceparent(params, tp)?;
    serde_json::to_vec(&msg).ok()
}

/// Request params (JSON text) with `_meta.traceparent` set; unchanged if they are not an object.
pub fn params_with_traceparent(params: &str, tp: &str) -> String {
    let Ok(mut p) = serde_json::from_str::<Map<String, Value>>(params) else { return params.to_owned() };
    match set_traceparent(&mut p, tp) {
        Some(()) => Value::Object(p).to_string(),
        None => params.to_owned(),
    }
}

fn set_traceparent(params: &mut Map<String, Value>, tp: &str) -> Option<()> {
    let meta = params.entry("_meta").or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
    meta.insert("traceparent".into(), Value::String(tp.to_owned()));
    Some(())
}

/// The span of each live task, by task id.
static TASKS: LazyLock<DashMap<String, Context>> = LazyLock::new(DashMap::new);

/// A task was created: its span starts.
pub fn task_started(task_id: &str, tool: &str, origin: &str) {
    if !trace_on() {
        return;
    }
    let span = tracer()
        .span_builder(format!("task {tool}"))
        .with_kind(SpanKind::Internal)
        .with_attributes([
            KeyValue::new("gen_ai.tool.name", tool.to_owned()),
            KeyValue::new("asyncify.task.origin", origin.to_owned()),
            KeyValue::new("asyncify.task.id", task_id.to_owned()),
        ])
        .start(&tracer());
    TASKS.insert(task_id.to_owned(), Context::new().with_span(span));
}

/// Something happened to a task (a transition, a poll).
pub fn task_event(task_id: &str, name: &'static str, attrs: Vec<KeyValue>) {
    if let Some(cx) = TASKS.get(task_id) {
        cx.span().add_event(name, attrs);
    }
}

/// The CLIENT span of each local task's upstream call, ended with the task.
static TASK_CALLS: LazyLock<DashMap<String, Context>> = LazyLock::new(DashMap::new);

/// A task's call goes upstream: returns the `traceparent` of its CLIENT span (ended with the task).
pub fn task_call(task_id: &str, method: &str, params: &str) -> Option<String> {
    if !trace_on() {
        return None;
    }
    let tool = serde_json::from_str::<CallParams<'_>>(params).ok().and_then(|p| p.name.map(str::to_owned));
    let (tp, cx) = task_request(task_id, method, tool.as_deref())?;
    TASK_CALLS.insert(task_id.to_owned(), cx);
    Some(tp)
}

/// A task ended (or expired): its span ends.
pub fn task_ended(task_id: &str, status: &str) {
    if let Some((_, cx)) = TASK_CALLS.remove(task_id) {
        cx.span().end();
    }
    if let Some((_, cx)) = TASKS.remove(task_id) {
        let span = cx.span();
        span.set_attribute(KeyValue::new("asyncify.task.status", status.to_owned()));
        if status == "failed" {
            span.set_status(Status::error("task failed"));
        }
        span.end();
    }
}

/// The `traceparent` to put on a request the proxy makes for a task (a CLIENT span under the task's).
pub fn task_request(task_id: &str, method: &str, tool: Option<&str>) -> Option<(String, Context)> {
    let parent = TASKS.get(task_id)?.clone();
    let span = tracer()
        .span_builder(match tool {
            Some(t) => format!("{method} {t}"),
            None => method.to_owned(),
        })
        .with_kind(SpanKind::Client)
        .with_attributes(op_attrs(method, tool))
        .start_with_context(&tracer(), &parent);
    let cx = parent.with_span(span);
    Some((traceparent(&cx)?, cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// The spliced line means what the re-serialised one means, and keeps the rest of the bytes.
    fn same_meaning(line: &str) -> String {
        let params = Envelope::parse(line.as_bytes()).unwrap().params;
        let spliced = spliced_traceparent(line.as_bytes(), params, TP).expect("spliced");
        let parsed = reserialised_with_traceparent(line.as_bytes(), TP).expect("re-serialised");
        let a: Value = serde_json::from_slice(&spliced).expect("valid JSON");
        let b: Value = serde_json::from_slice(&parsed).expect("valid JSON");
        assert_eq!(a, b, "{line}");
        // Key order too: `_meta` and `traceparent` stand where a parsed object puts them.
        assert_eq!(a.to_string(), b.to_string(), "{line}");
        String::from_utf8(spliced).expect("UTF-8")
    }

    #[test]
    fn traceparent_is_written_into_the_original_bytes() {
        let got = same_meaning(
            r#"{"jsonrpc":"2.0", "id":1,"method":"tools/call","params":{"name":"echo", "arguments":{"text":"a\u00e9"}}}"#,
        );
        assert_eq!(
            got,
            format!(
                r#"{{"jsonrpc":"2.0", "id":1,"method":"tools/call","params":{{"name":"echo", "arguments":{{"text":"a\u00e9"}},"_meta":{{"traceparent":"{TP}"}}}}}}"#
            )
        );
        same_meaning(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{ }}"#);
        same_meaning(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{}}}"#);
        same_meaning(
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{"progressToken":7}, "a":[1,{"_meta":2}]}}"#,
        );
        let replaced = same_meaning(
            r#"{"jsonrpc":"2.0","id":"q","method":"x","params":{"_meta":{"traceparent":"00-old-old-00","tracestate":"k=v"},"n":1}}"#,
        );
        assert!(replaced.contains(&format!(r#"{{"traceparent":"{TP}","tracestate":"k=v"}}"#)), "{replaced}");
    }

    #[test]
    fn what_cannot_be_spliced_is_reserialised_or_left_alone() {
        // No params, duplicate keys: re-serialised, with the same meaning as before.
        for line in [
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{},"_meta":{"a":1}}}"#,
        ] {
            let params = Envelope::parse(line.as_bytes()).unwrap().params;
            assert!(spliced_traceparent(line.as_bytes(), params, TP).is_none(), "{line}");
            let out = with_traceparent(line.as_bytes(), TP).expect("re-serialised");
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["params"]["_meta"]["traceparent"], TP, "{line}");
        }
        // Params or `_meta` that are not objects: nothing can be written.
        for line in [
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":"no"}}"#,
        ] {
            assert_eq!(with_traceparent(line.as_bytes(), TP), None, "{line}");
        }
    }

    #[test]
    fn a_tool_error_is_found_whatever_the_spelling() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert!(is_tool_error(&raw(r#"{"content":[],"isError":true}"#)));
        assert!(is_tool_error(&raw(r#"{"content":[],"\u0069sError":true}"#)));
        assert!(!is_tool_error(&raw(r#"{"content":[{"type":"text","text":"isError"}],"isError":false}"#)));
        assert!(!is_tool_error(&raw(r#"{"content":[{"type":"text","text":"fine"}]}"#)));
        assert!(is_tool_error(&raw(r#"{"content":[], "isError" :  true }"#)));
        assert!(!is_tool_error(&raw(r#"{"content":[{"type":"text","text":"\"isError\": true"}]}"#)));
    }

    #[test]
    fn params_read_from_another_buffer_are_not_spliced() {
        let line = br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{}}"#;
        let copy = line.to_vec();
        let other = Envelope::parse(&copy).unwrap().params;
        assert!(spliced_traceparent(line, other, TP).is_none());
    }
}
