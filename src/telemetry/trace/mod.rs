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
use opentelemetry::metrics::{BoundHistogram, Histogram};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, StringValue, global};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static TRACE_ON: AtomicBool = AtomicBool::new(false);

/// The tracer, taken once from the provider [`enable`] found installed (taking it from the global
/// provider locks and clones; a request starts two spans).
static TRACER: std::sync::OnceLock<global::BoxedTracer> = std::sync::OnceLock::new();

pub(super) fn enable() {
    let _ = TRACER.set(global::tracer("mcp-asyncify"));
    TRACE_ON.store(true, Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn trace_on() -> bool {
    TRACE_ON.load(Ordering::Relaxed)
}

fn tracer() -> &'static global::BoxedTracer {
    TRACER.get_or_init(|| global::tracer("mcp-asyncify"))
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

mod measure;
#[cfg(test)]
use measure::TraceMeta;
use measure::{CallParams, TraceSlot, op_attrs, span_name};
pub use measure::{Operations, error_code, record_client_operation};

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
    let params = params?;
    if !params.get().starts_with('{') {
        return None;
    }
    let meta = serde_json::from_str::<Params<'_>>(params.get()).ok()?.meta;
    let old = match meta.map(RawValue::get) {
        Some(m) if m.starts_with('{') => serde_json::from_str::<Meta<'_>>(m).ok()?.traceparent,
        _ => None,
    };
    TraceSlot::find(params.get(), meta, old)?.write(line, params, tp)
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
        .start(tracer());
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
        .span_builder(span_name(method, tool))
        .with_kind(SpanKind::Client)
        .with_attributes(op_attrs(method, tool))
        .start_with_context(tracer(), &parent);
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
        // The slot found while the request is measured writes the same bytes.
        let parsed: CallParams<'_> = serde_json::from_str(params.unwrap().get()).unwrap();
        let meta = TraceMeta::read(parsed.meta);
        let slot = TraceSlot::read(params.unwrap(), &parsed, meta.as_ref()).expect("a slot");
        assert_eq!(slot.write(line.as_bytes(), params.unwrap(), TP).as_deref(), Some(&spliced[..]), "{line}");
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
    fn params_read_from_another_buffer_are_not_spliced() {
        let line = br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{}}"#;
        let copy = line.to_vec();
        let other = Envelope::parse(&copy).unwrap().params;
        assert!(spliced_traceparent(line, other, TP).is_none());
    }
}
