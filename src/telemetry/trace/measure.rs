//! Per-request measurement: what is known of a client request while it is answered, the durations
//! recorded through histograms bound to each request's attribute set, and the spans of a request that
//! goes upstream (its `traceparent` found while its params are read).

use super::*;
use crate::jsonrpc::Message;

/// What is known of a client request while it is answered.
struct Operation {
    started: Instant,
    /// `tools/call` (its result may say `isError`).
    is_call: bool,
    /// The spans' name: the method, and the tool of a `tools/call`.
    name: String,
    /// `mcp.method.name`, `network.transport` and `gen_ai.tool.name` (a `tools/call`'s): built once,
    /// for both spans and both durations (their values are static or shared, so copies allocate
    /// nothing).
    attrs: Vec<KeyValue>,
    server: Option<Context>,
    client: Option<(Instant, Context)>,
    /// `mcp.protocol.version`: the request's own (2026-07-28) or its session's.
    version: Option<StringValue>,
    /// Where the CLIENT span's `traceparent` goes in the forwarded params (traces on).
    slot: Option<TraceSlot>,
}

/// The client requests of one session being answered, for their durations and spans.
#[derive(Default)]
pub struct Operations {
    open: DashMap<Id, Operation>,
    /// The protocol version the client's `initialize` asked for (its session's generation).
    session_version: std::sync::OnceLock<StringValue>,
    /// The durations of this session's requests, bound to their attribute sets as they are first
    /// recorded (a bound record skips hashing the attributes in the SDK).
    bound: std::sync::Mutex<Bound>,
}

/// Histograms bound to attribute sets, by the text of the attributes' keys and values.
#[derive(Default)]
struct Bound {
    /// The key being looked up (kept to reuse its buffer).
    key: String,
    server: HashMap<Box<str>, BoundHistogram<f64>>,
    client: HashMap<Box<str>, BoundHistogram<f64>>,
}

/// Attribute sets bound per session and direction at most; more are recorded unbound (they cost
/// the SDK's lookup, and a session cannot grow this table without end with made-up tool names).
const MAX_BOUND: usize = 64;

impl Bound {
    /// Records `seconds` into `histogram` with `attrs`, through the handle bound to them (bound now
    /// if new: a set is bound only when something is recorded with it, so no series appears empty).
    fn record(&mut self, server: bool, histogram: &Histogram<f64>, attrs: &[KeyValue], seconds: f64) {
        self.key.clear();
        for kv in attrs {
            self.key.push_str(kv.key.as_str());
            self.key.push('\u{0}');
            self.key.push_str(&kv.value.as_str());
            self.key.push('\u{0}');
        }
        let table = if server { &mut self.server } else { &mut self.client };
        if let Some(bound) = table.get(self.key.as_str()) {
            bound.record(seconds);
        } else if table.len() < MAX_BOUND {
            let bound = histogram.bind(attrs);
            bound.record(seconds);
            table.insert(self.key.as_str().into(), bound);
        } else {
            histogram.record(seconds, attrs);
        }
    }
}

/// The methods of MCP, as static text (an attribute with a static value is copied without allocating).
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/call",
    "tools/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
];

/// The protocol versions, as static text.
const VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];

/// `text` as an attribute value: static when it is one of `known`, else shared.
fn attr_value(text: &str, known: &[&'static str]) -> StringValue {
    match known.iter().find(|k| **k == text) {
        Some(k) => StringValue::from(*k),
        None => StringValue::from(std::sync::Arc::<str>::from(text)),
    }
}

pub(super) fn op_attrs(method: &str, tool: Option<&str>) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(5);
    attrs.push(KeyValue::new("mcp.method.name", attr_value(method, METHODS)));
    attrs.push(KeyValue::new("network.transport", "pipe"));
    if let Some(t) = tool {
        attrs.push(KeyValue::new("gen_ai.tool.name", std::sync::Arc::<str>::from(t)));
    }
    attrs
}

pub(super) fn span_name(method: &str, tool: Option<&str>) -> String {
    match tool {
        Some(t) => format!("{method} {t}"),
        None => method.to_owned(),
    }
}

/// Records a request the proxy made upstream (`mcp.client.operation.duration`), answered now.
pub fn record_client_operation(started: Instant, method: &str, tool: Option<&str>, error: Option<&str>) {
    let mut attrs = op_attrs(method, tool);
    if let Some(e) = error {
        attrs.push(KeyValue::new("error.type", e.to_owned()));
    }
    metrics().client_operation.record(started.elapsed().as_secs_f64(), &attrs);
}

#[derive(serde::Deserialize)]
pub(super) struct CallParams<'a> {
    #[serde(borrow, default)]
    pub(super) name: Option<&'a str>,
    #[serde(rename = "protocolVersion", borrow, default)]
    pub(super) initialize_version: Option<&'a str>,
    #[serde(rename = "_meta", borrow, default, deserialize_with = "present")]
    pub(super) meta: Option<&'a RawValue>,
}

impl<'a> CallParams<'a> {
    /// A request's params, for the measurement. The params were proved valid JSON with their
    /// message, so a walk of their top level finds the members without a serde pass over the rest
    /// (a call's arguments); where the walk is not sure (an escaped key or value, a key twice, a
    /// value that is not a plain string) serde reads them, as it always did.
    pub(super) fn read(params: &'a str) -> Option<CallParams<'a>> {
        Self::walk(params).or_else(|| serde_json::from_str(params).ok())
    }

    fn walk(params: &'a str) -> Option<CallParams<'a>> {
        let [name, version, meta] = crate::jsonrpc::scan::object_members(params, |key| match key {
            b"name" => Some(0),
            b"protocolVersion" => Some(1),
            b"_meta" => Some(2),
            _ => None,
        })?;
        // What `Option<&str>` takes: a string without escapes, or null.
        let plain = |m: Option<crate::jsonrpc::scan::Member<'a>>| match m.map(|m| m.text()) {
            None | Some("null") => Some(None),
            Some(t) => crate::jsonrpc::plain_string(t).map(Some),
        };
        Some(CallParams {
            name: plain(name)?,
            initialize_version: plain(version)?,
            meta: match meta {
                Some(meta) => Some(meta.raw()?),
                None => None,
            },
        })
    }
}

#[derive(serde::Deserialize)]
pub(super) struct TraceMeta<'a> {
    #[serde(rename = "io.modelcontextprotocol/protocolVersion", borrow, default)]
    version: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "present")]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tracestate: Option<&'a str>,
}

impl<'a> TraceMeta<'a> {
    /// `_meta` read (`None`: absent, not an object, or unreadable).
    pub(super) fn read(meta: Option<&'a RawValue>) -> Option<TraceMeta<'a>> {
        meta.filter(|m| m.get().starts_with('{')).and_then(|m| serde_json::from_str(m.get()).ok())
    }

    /// The `traceparent`, when it is a string without escapes (as every valid one is).
    fn traceparent(&self) -> Option<&'a str> {
        crate::jsonrpc::plain_string(self.traceparent?.get())
    }
}

/// Where a `traceparent` goes in a request's params object, found while its params are read for
/// the measurement (so the forwarded request is not read again): offsets in the params' text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TraceSlot {
    /// The params' length (the slot is only used on the same text).
    len: usize,
    /// Where the text goes, and how many bytes it replaces there.
    at: usize,
    replaced: usize,
    what: SlotKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    /// `"_meta":{"traceparent":…}` added at the end of the params (after a comma unless empty).
    NewMeta { comma: bool },
    /// `"traceparent":…` added at the end of `_meta` (after a comma unless empty).
    NewMember { comma: bool },
    /// The value of the `traceparent` already there, replaced.
    Value,
}

impl TraceSlot {
    /// The slot in `params` (an object's text) whose `_meta` is `meta` and `_meta.traceparent`
    /// is `traceparent`, both read from it. `None`: params or `_meta` are not objects.
    pub(super) fn find(
        params: &str,
        meta: Option<&RawValue>,
        traceparent: Option<&RawValue>,
    ) -> Option<TraceSlot> {
        if !params.starts_with('{') {
            return None;
        }
        let offset = |inner: &str| (inner.as_ptr() as usize).checked_sub(params.as_ptr() as usize);
        let not_empty = |object: &str| !object[1..object.len() - 1].trim().is_empty();
        let (at, replaced, what) = match (meta.map(RawValue::get), traceparent.map(RawValue::get)) {
            (None, _) => (params.len() - 1, 0, SlotKind::NewMeta { comma: not_empty(params) }),
            (Some(meta), _) if !meta.starts_with('{') => return None,
            (Some(_), Some(old)) => (offset(old)?, old.len(), SlotKind::Value),
            (Some(meta), None) => {
                (offset(meta)? + meta.len() - 1, 0, SlotKind::NewMember { comma: not_empty(meta) })
            }
        };
        (at + replaced <= params.len()).then_some(TraceSlot { len: params.len(), at, replaced, what })
    }

    /// The slot in `params`, from their reading for the measurement (a `_meta` that could not be read
    /// leaves it to the fallbacks).
    pub(super) fn read(
        params: &RawValue,
        parsed: &CallParams<'_>,
        meta: Option<&TraceMeta<'_>>,
    ) -> Option<TraceSlot> {
        if parsed.meta.is_some() && meta.is_none() {
            return None;
        }
        TraceSlot::find(params.get(), parsed.meta, meta.and_then(|m| m.traceparent))
    }

    /// `line` with the `traceparent` written at this slot of its `params` (read from `line`).
    pub(super) fn write(&self, line: &[u8], params: &RawValue, tp: &str) -> Option<Vec<u8>> {
        let params = params.get();
        let start = (params.as_ptr() as usize).checked_sub(line.as_ptr() as usize)?;
        if params.len() != self.len || start + params.len() > line.len() {
            return None; // not the params the slot was found in, or not read from this line
        }
        let at = start + self.at;
        let mut out = Vec::with_capacity(line.len() + tp.len() + 40);
        out.extend_from_slice(&line[..at]);
        let comma = |out: &mut Vec<u8>, comma: bool| {
            if comma {
                out.push(b',');
            }
        };
        match self.what {
            SlotKind::NewMeta { comma: c } => {
                comma(&mut out, c);
                out.extend_from_slice(b"\"_meta\":{\"traceparent\":\"");
                out.extend_from_slice(tp.as_bytes());
                out.extend_from_slice(b"\"}");
            }
            SlotKind::NewMember { comma: c } => {
                comma(&mut out, c);
                out.extend_from_slice(b"\"traceparent\":\"");
                out.extend_from_slice(tp.as_bytes());
                out.push(b'"');
            }
            SlotKind::Value => {
                out.push(b'"');
                out.extend_from_slice(tp.as_bytes());
                out.push(b'"');
            }
        }
        out.extend_from_slice(&line[at + self.replaced..]);
        Some(out)
    }
}

impl Operations {
    /// Whether anything is measured at all.
    pub fn active() -> bool {
        super::super::metrics_on() || trace_on()
    }

    fn bound(&self) -> std::sync::MutexGuard<'_, Bound> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client request arrived: start measuring it (and its SERVER span).
    pub fn started(&self, id: &Id, method: &str, params: Option<&RawValue>) {
        let parsed = params.and_then(|p| CallParams::read(p.get()));
        let meta = TraceMeta::read(parsed.as_ref().and_then(|p| p.meta));
        let is_call = method == "tools/call";
        let tool = parsed.as_ref().and_then(|p| p.name).filter(|_| is_call);
        if method == "initialize"
            && let Some(v) = parsed.as_ref().and_then(|p| p.initialize_version)
        {
            let _ = self.session_version.set(attr_value(v, VERSIONS));
        }
        let version = match meta.as_ref().and_then(|m| m.version) {
            Some(v) => Some(attr_value(v, VERSIONS)),
            None => self.session_version.get().cloned(),
        };
        let attrs = op_attrs(method, tool);
        // The spans' name (nothing to make without traces).
        let name = if trace_on() { span_name(method, tool) } else { String::new() };
        let mut slot = None;
        let server = trace_on().then(|| {
            // Where the CLIENT span's traceparent will go, from this reading of the params (a `_meta`
            // that could not be read leaves it to the re-serialising fallback).
            slot =
                params.zip(parsed.as_ref()).and_then(|(params, p)| TraceSlot::read(params, p, meta.as_ref()));
            let meta = meta.as_ref();
            let parent = extract(meta.and_then(TraceMeta::traceparent), meta.and_then(|m| m.tracestate));
            let span = tracer()
                .span_builder(name.clone())
                .with_kind(SpanKind::Server)
                .with_attributes(attrs.clone())
                .start_with_context(tracer(), &parent);
            parent.with_span(span)
        });
        self.open.insert(
            id.clone(),
            Operation { started: Instant::now(), is_call, name, attrs, server, client: None, version, slot },
        );
    }

    /// The request goes upstream: with traces on, returns the line with the CLIENT span's
    /// `traceparent` written into `params._meta` (None: forward the original bytes).
    /// `params` are the request's own, read from `line` by the caller (so it is not read again).
    pub fn forwarded(&self, id: &Id, line: &[u8], params: Option<&RawValue>) -> Option<Vec<u8>> {
        let mut op = self.open.get_mut(id)?;
        let parent = op.server.clone()?;
        let tp = if parent.span().is_recording() {
            let span = tracer()
                .span_builder(op.name.clone())
                .with_kind(SpanKind::Client)
                .with_attributes(op.attrs.clone())
                .start_with_context(tracer(), &parent);
            let cx = parent.with_span(span);
            let tp = traceparent(&cx)?;
            op.client = Some((Instant::now(), cx));
            tp
        } else {
            // Not sampled (`OTEL_TRACES_SAMPLER`): a CLIENT span would not be recorded either, so none
            // is made; the upstream continues the trace from the SERVER span, told it is not sampled.
            traceparent(&parent)?
        };
        let slot = op.slot;
        drop(op);
        slot.zip(params)
            .and_then(|(slot, params)| slot.write(line, params, &tp))
            .or_else(|| spliced_traceparent(line, params, &tp))
            .or_else(|| reserialised_with_traceparent(line, &tp))
    }

    /// The upstream answered a forwarded request (`error`: its error code, if any).
    pub fn upstream_answered(&self, id: &Id, error: Option<String>) {
        let Some(mut op) = self.open.get_mut(id) else { return };
        let (at, cx) = match op.client.take() {
            Some(c) => (c.0, Some(c.1)),
            None => (op.started, None),
        };
        let seconds = at.elapsed().as_secs_f64();
        match &error {
            None => self.bound().record(false, &metrics().client_operation, &op.attrs, seconds),
            Some(e) => {
                let mut attrs = op.attrs.clone();
                attrs.push(KeyValue::new("error.type", e.clone()));
                metrics().client_operation.record(seconds, &attrs);
            }
        }
        drop(op);
        if let Some(cx) = cx {
            if let Some(e) = error {
                cx.span().set_status(Status::error(e));
            }
            cx.span().end();
        }
    }

    /// A line is about to be written to the client: a response ends its request's measurement.
    pub fn observe_client_line(&self, line: &Message) {
        if self.open.is_empty() {
            return;
        }
        let Ok(env) = line.envelope() else { return };
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
        let Some((_, mut op)) = self.open.remove(id) else { return };
        let error = match (error, result) {
            (Some(e), _) => Some(error_code(e)),
            (None, Some(r)) if op.is_call && is_tool_error(r) => Some("tool_error".to_owned()),
            _ => None,
        };
        let seconds = op.started.elapsed().as_secs_f64();
        if let Some(v) = op.version.take() {
            op.attrs.push(KeyValue::new("mcp.protocol.version", v));
        }
        if let Some(e) = &error {
            op.attrs.push(KeyValue::new("error.type", e.clone()));
        }
        match &error {
            None => self.bound().record(true, &metrics().server_operation, &op.attrs, seconds),
            Some(_) => metrics().server_operation.record(seconds, &op.attrs),
        }
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

pub(super) fn is_tool_error(result: &RawValue) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_reads_the_params_serde_reads() {
        type Read<'a> = (Option<&'a str>, Option<&'a str>, Option<(&'a str, *const u8)>);
        fn parts<'a>(p: &CallParams<'a>) -> Read<'a> {
            (p.name, p.initialize_version, p.meta.map(|m| (m.get(), m.get().as_ptr())))
        }
        for params in [
            r#"{"name":"echo","arguments":{"text":"x","name":"no"},"_meta":{"traceparent":"00-a-b-01"}}"#,
            r#"{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"c"}}"#,
            r#" { "name" : null , "_meta" : [1] } "#,
            r#"{}"#,
            // Left to serde (which refuses a borrowed string with escapes, or a number).
            r#"{"name":"a\u0041"}"#,
            r#"{"name":7}"#,
            r#"{"n\u0061me":"echo"}"#,
            r#"{"name":"a","name":"b"}"#,
        ] {
            let serde = serde_json::from_str::<CallParams<'_>>(params).ok();
            let read = CallParams::read(params);
            assert_eq!(read.as_ref().map(parts), serde.as_ref().map(parts), "{params}");
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
    fn a_request_not_sampled_gets_no_client_span_and_passes_the_server_spans_context_on() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        // A SERVER span that is not recording (the sampler said no): its context, unsampled.
        let sc = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        let ops = Operations::default();
        let id = Id::string("a");
        let line =
            br#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
        let params = Envelope::parse(line).unwrap().params;
        let p: CallParams<'_> = serde_json::from_str(params.unwrap().get()).unwrap();
        ops.open.insert(
            id.clone(),
            Operation {
                started: Instant::now(),
                is_call: true,
                name: "tools/call echo".into(),
                attrs: op_attrs("tools/call", Some("echo")),
                server: Some(Context::new().with_remote_span_context(sc)),
                client: None,
                version: None,
                slot: TraceSlot::read(params.unwrap(), &p, None),
            },
        );
        let out = ops.forwarded(&id, line, params).expect("the traceparent is written");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["params"]["_meta"]["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        assert!(ops.open.get(&id).unwrap().client.is_none(), "no CLIENT span");
    }

    #[test]
    fn a_bound_set_is_found_by_its_keys_and_values() {
        let histogram = opentelemetry::global::meter("test").f64_histogram("t").build();
        let mut bound = Bound::default();
        let call = |tool: &str| op_attrs("tools/call", Some(tool));
        let mut with_version = op_attrs("tools/call", None);
        with_version.push(KeyValue::new("mcp.protocol.version", "2025-11-25"));
        bound.record(true, &histogram, &call("echo"), 0.1);
        bound.record(true, &histogram, &call("echo"), 0.2);
        // A tool named like a version is not the set with that version.
        bound.record(true, &histogram, &call("2025-11-25"), 0.1);
        bound.record(true, &histogram, &with_version, 0.1);
        bound.record(false, &histogram, &call("echo"), 0.1);
        assert_eq!((bound.server.len(), bound.client.len()), (3, 1));
        // Past the cap, records go unbound.
        for i in 0..2 * MAX_BOUND {
            bound.record(false, &histogram, &call(&format!("t{i}")), 0.1);
        }
        assert_eq!(bound.client.len(), MAX_BOUND);
    }
}
