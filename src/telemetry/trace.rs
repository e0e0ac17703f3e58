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
    pub fn forwarded(&self, id: &Id, line: &[u8]) -> Option<Vec<u8>> {
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
        with_traceparent(line, &tp)
    }

    /// The upstream answered a forwarded request (`error`: its error code, if any).
    pub fn upstream_answered(&self, id: &Id, error: Option<String>) {
        let Some(mut op) = self.open.get_mut(id) else { return };
        let method = op.method.clone();
        let tool = op.tool.clone();
        let (at, cx) = match op.client.take() {
            Some(c) => (c.0, Some(c.1)),
            None => (op.started, None),
        };
        drop(op);
        record_client_operation(at, &method, tool.as_deref(), error.as_deref());
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
        let Some((_, op)) = self.open.remove(id) else { return };
        let error = match (env.error, env.result) {
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
    #[derive(serde::Deserialize)]
    struct R {
        #[serde(rename = "isError", default)]
        is_error: Option<bool>,
    }
    serde_json::from_str::<R>(result.get()).ok().and_then(|r| r.is_error).unwrap_or(false)
}

/// The line with `params._meta.traceparent` set (the rest of the message re-serialised as parsed).
pub fn with_traceparent(line: &[u8], tp: &str) -> Option<Vec<u8>> {
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
