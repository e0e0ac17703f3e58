//! JSON-RPC 2.0 as the proxy sees it: a light envelope over the original bytes.
//!
//! The proxy must forward what it does not change byte for byte, so a message is only ever parsed into
//! an [`Envelope`] that borrows the `id`, `method` and payload as raw JSON text. Nothing is
//! re-serialised unless an interceptor decides to rewrite the message.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;

mod message;
pub mod scan;
mod sniff;
mod walk;

pub use message::Message;
use scan::{Members, Wire};
pub use sniff::sniff_head;
pub use walk::{canonical, member_at, plain_string};

/// An answer to a request, raw: its `result` object, or its JSON-RPC `error` object as it was sent.
/// What the proxy's own requests get back, and what a task ends with.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The `result` object, raw.
    Result(Box<RawValue>),
    /// The JSON-RPC `error` object, raw.
    Error(Box<RawValue>),
}

/// JSON-RPC error codes used by the proxy itself.
pub mod code {
    /// The line is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The JSON is not a valid JSON-RPC 2.0 message (or it is too large to read).
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist (or, for tasks, the tool forbids task augmentation).
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters (unknown task id, bad cursor, …).
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The upstream server went away before answering (implementation-defined server error range).
    pub const UPSTREAM_GONE: i64 = -32000;
    /// 2026-07-28: the HTTP headers do not match the body (`MCP-Protocol-Version`, `Mcp-Method`,
    /// `Mcp-Name`), or a required one is missing.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// 2026-07-28: the request lacks a client capability the server needs (e.g. the tasks extension).
    pub const MISSING_CAPABILITY: i64 = -32021;
    /// 2026-07-28: the requested protocol version is not served.
    pub const UNSUPPORTED_VERSION: i64 = -32022;

    /// Whether a code is one of the 2026-07-28 errors answered with HTTP 400.
    pub fn is_modern_client_error(code: i64) -> bool {
        matches!(code, HEADER_MISMATCH | MISSING_CAPABILITY | UNSUPPORTED_VERSION)
    }
}

/// A JSON-RPC request id, kept as the exact JSON text the peer sent (`0`, `-7`, `"abc"`,
/// `18446744073709551616`…), so that it can be echoed back with its value and type unchanged.
/// Short ids (most are) are held inline: reading, copying and tracking one allocates nothing.
#[derive(Clone)]
pub struct Id(IdText);

/// How many bytes of id text are held inline.
const INLINE_ID: usize = 22;

#[derive(Clone)]
enum IdText {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<str>),
}

impl Id {
    fn new(text: &str) -> Self {
        if text.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Id(IdText::Inline { len: text.len() as u8, bytes })
        } else {
            Id(IdText::Heap(text.into()))
        }
    }

    /// Wraps raw JSON text (already validated as a JSON string or number).
    pub fn from_raw(raw: &RawValue) -> Self {
        Id::new(raw.get().trim())
    }

    /// An id from a string, encoded as a JSON string.
    pub fn string(s: &str) -> Self {
        Id::new(&serde_json::to_string(s).expect("a string always serialises"))
    }

    /// The id as JSON text, ready to splice into a message.
    pub fn as_json(&self) -> &str {
        match &self.0 {
            // SAFETY: the bytes were copied whole from a `&str` in `new`: valid UTF-8.
            IdText::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..*len as usize])
            },
            IdText::Heap(text) => text,
        }
    }

    /// Whether the id is a JSON string (as opposed to a number).
    pub fn is_string(&self) -> bool {
        self.as_json().starts_with('"')
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Eq for Id {}

impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_json().hash(state)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

/// What a line holds, once classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result` or `error`.
    Response,
}

/// A borrowed view of one JSON-RPC message. Payloads stay raw JSON text.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// Request, notification or response.
    pub kind: Kind,
    /// The id (requests and responses). `None` for notifications and for responses with `id: null`.
    pub id: Option<Id>,
    /// The method (requests and notifications).
    pub method: Option<&'a str>,
    /// `params`, raw.
    pub params: Option<&'a RawValue>,
    /// `result`, raw.
    pub result: Option<&'a RawValue>,
    /// `error`, raw.
    pub error: Option<&'a RawValue>,
    /// The whole message's text, and its `id` value as it stands in it (also `null`), so that
    /// [`with_id`] can write another id in its place and leave every other byte as it came.
    text: &'a str,
    raw_id: Option<&'a str>,
}

fn utf8(line: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(line).map_err(|e| ParseError::NotJson(format!("invalid UTF-8: {e}")))
}

/// Why a line could not be read as JSON-RPC.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// Not JSON at all.
    #[error("parse error: the message is not valid JSON ({0})")]
    NotJson(String),
    /// JSON, but not a JSON-RPC 2.0 message.
    #[error("invalid request: {0}")]
    NotJsonRpc(String),
    /// A JSON-RPC batch (an array): removed from MCP in 2025-06-18.
    #[error(
        "invalid request: JSON-RPC batches (arrays) are not supported by MCP since 2025-06-18; send one message per line"
    )]
    Batch,
}

impl ParseError {
    /// The JSON-RPC error code to answer with.
    pub fn code(&self) -> i64 {
        match self {
            ParseError::NotJson(_) => code::PARSE_ERROR,
            ParseError::NotJsonRpc(_) | ParseError::Batch => code::INVALID_REQUEST,
        }
    }
}

impl<'a> Envelope<'a> {
    /// Classifies one message. Only the top level is looked at; payloads are left raw. The message is
    /// read in one pass by [`scan`]; what the scan is not sure of is read with serde_json, which gives
    /// the same envelope or words the error.
    pub fn parse(line: &'a [u8]) -> Result<Envelope<'a>, ParseError> {
        let text = utf8(line)?;
        match scan::envelope_members(text) {
            Some(wire) => Self::from_wire(text, wire),
            None => Self::read_with_serde(text),
        }
    }

    /// [`Envelope::parse`] without the scan: serde_json reads every message. The reference the scan is
    /// checked against (tests, the fuzz target).
    #[doc(hidden)]
    pub fn parse_with_serde(line: &'a [u8]) -> Result<Envelope<'a>, ParseError> {
        Self::read_with_serde(utf8(line)?)
    }

    fn read_with_serde(text: &'a str) -> Result<Envelope<'a>, ParseError> {
        let first = text.trim_start().as_bytes().first().copied();
        if first == Some(b'[') {
            // Distinguish a batch from broken JSON: a batch must at least be valid JSON.
            return match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => Err(ParseError::Batch),
                Err(e) => Err(ParseError::NotJson(e.to_string())),
            };
        }
        if first != Some(b'{') {
            return match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => Err(ParseError::NotJsonRpc("a message must be a JSON object".into())),
                Err(e) => Err(ParseError::NotJson(e.to_string())),
            };
        }
        let wire: Wire<'a> = serde_json::from_str(text).map_err(|e| {
            // A syntax error is a parse error; a type error in a known field is an invalid request.
            if e.is_syntax() || e.is_eof() {
                ParseError::NotJson(e.to_string())
            } else {
                ParseError::NotJsonRpc(e.to_string())
            }
        })?;
        Self::from_wire(text, wire.into())
    }

    /// The envelope from its top-level members, read by either reader.
    fn from_wire(text: &'a str, wire: Members<'a>) -> Result<Envelope<'a>, ParseError> {
        match wire.jsonrpc.map(str::trim) {
            Some("\"2.0\"") => {}
            Some(other) => {
                return Err(ParseError::NotJsonRpc(format!("\"jsonrpc\" must be \"2.0\", got {other}")));
            }
            None => {
                return Err(ParseError::NotJsonRpc("missing \"jsonrpc\": \"2.0\"".into()));
            }
        }
        let id = match wire.id {
            None => None,
            Some(raw) => match raw.trim().as_bytes().first() {
                Some(b'"') | Some(b'-') | Some(b'0'..=b'9') => Some(Id::new(raw.trim())),
                Some(b'n') => None,
                _ => {
                    return Err(ParseError::NotJsonRpc(format!(
                        "\"id\" must be a string or a number, got {}",
                        raw.trim()
                    )));
                }
            },
        };
        let id_is_null = wire.id.is_some() && id.is_none();
        let method = match wire.method.map(str::trim) {
            None => None,
            // A method name with escapes is legal JSON but never a real MCP method; refusing it keeps
            // the envelope borrowed.
            Some(m) if m.len() >= 2 && m.starts_with('"') && !m.contains('\\') => Some(&m[1..m.len() - 1]),
            Some(m) if m.starts_with('"') => {
                return Err(ParseError::NotJsonRpc("\"method\" must not contain escape sequences".into()));
            }
            Some(m) => {
                return Err(ParseError::NotJsonRpc(format!("\"method\" must be a string, got {m}")));
            }
        };
        let kind = match (method.is_some(), wire.result.is_some() || wire.error.is_some()) {
            (true, false) if id_is_null => {
                return Err(ParseError::NotJsonRpc("a request's \"id\" must not be null".into()));
            }
            (true, false) if id.is_some() => Kind::Request,
            (true, false) => Kind::Notification,
            (false, true) if wire.result.is_some() && wire.error.is_some() => {
                return Err(ParseError::NotJsonRpc(
                    "a response has \"result\" or \"error\", not both".into(),
                ));
            }
            (false, true) if id.is_some() || id_is_null => Kind::Response,
            (false, true) => {
                return Err(ParseError::NotJsonRpc("a response must have an \"id\"".into()));
            }
            (true, true) => {
                return Err(ParseError::NotJsonRpc(
                    "a message has \"method\" or \"result\"/\"error\", not both".into(),
                ));
            }
            (false, false) => {
                return Err(ParseError::NotJsonRpc(
                    "a message needs \"method\" (request) or \"result\"/\"error\" (response)".into(),
                ));
            }
        };
        Ok(Envelope {
            kind,
            id,
            method,
            params: wire.params,
            result: wire.result,
            error: wire.error,
            text,
            raw_id: wire.id,
        })
    }
}

/// Whether the JSON text `json` may hold the key that `key` finds (plain ASCII): its text is there,
/// or an escape that could spell one of its characters (`\u`, or `\/` for a key with a slash).
/// `false` is certain, so most messages are answered without parsing. The finder is built once by the
/// caller (building one costs more than a search).
pub fn may_contain_key(json: &[u8], key: &memchr::memmem::Finder<'_>) -> bool {
    let slash = key.needle().contains(&b'/');
    memchr::memchr_iter(b'\\', json).any(|i| match json.get(i + 1) {
        Some(b'u') => true,
        Some(b'/') => slash,
        _ => false,
    }) || key.find(json).is_some()
}

/// Builds a JSON-RPC error response line (without the trailing newline). `id: None` gives `id: null`.
pub fn error_response(
    id: Option<&Id>,
    code: i64,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + message.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.map_or("null", Id::as_json).as_bytes());
    out.extend_from_slice(b",\"error\":{\"code\":");
    out.extend_from_slice(code.to_string().as_bytes());
    out.extend_from_slice(b",\"message\":");
    serde_json::to_writer(&mut out, message).expect("writing to a Vec cannot fail");
    if let Some(data) = data {
        out.extend_from_slice(b",\"data\":");
        serde_json::to_writer(&mut out, data).expect("writing to a Vec cannot fail");
    }
    out.extend_from_slice(b"}}");
    out
}

/// Builds a JSON-RPC success response line whose `result` is the given raw JSON.
pub fn result_response(id: &Id, result: &str) -> Vec<u8> {
    response_with(id, "result", result)
}

/// Builds an error response whose `error` is the given raw JSON object (kept exactly as received).
pub fn error_object_response(id: &Id, error: &str) -> Vec<u8> {
    response_with(id, "error", error)
}

fn response_with(id: &Id, key: &str, raw: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + raw.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.as_json().as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(raw.as_bytes());
    out.push(b'}');
    out
}

/// The same message under another id: a request keeps its method and params, a response its result
/// or error. Used where one upstream connection serves requests of several clients, whose ids may
/// collide. The new id is written where the old one stands, so every other byte of the message (key
/// order, whitespace, members the proxy does not know) stays as the peer sent it; a message without
/// an `id` member is rebuilt ([`rebuilt_with_id`]).
pub fn with_id(env: &Envelope<'_>, id: &Id) -> Vec<u8> {
    spliced_id(env, id).unwrap_or_else(|| rebuilt_with_id(env, id))
}

/// [`with_id`] by writing `id` over the `id` value in the message's own text (`None`: it has none).
/// The envelope's parse refused duplicate keys, so the one `id` it read is the message's.
fn spliced_id(env: &Envelope<'_>, id: &Id) -> Option<Vec<u8>> {
    let old = env.raw_id?;
    let start = (old.as_ptr() as usize).checked_sub(env.text.as_ptr() as usize)?;
    let end = start + old.len();
    if end > env.text.len() {
        return None; // not read from this text (cannot happen: both come from one parse)
    }
    let text = env.text.as_bytes();
    let mut out = Vec::with_capacity(text.len() + id.as_json().len());
    out.extend_from_slice(&text[..start]);
    out.extend_from_slice(id.as_json().as_bytes());
    out.extend_from_slice(&text[end..]);
    Some(out)
}

/// The message under another id, rebuilt from its envelope: `jsonrpc`, `id`, then `method` and
/// `params` (a request) or `result` or `error` (a response), payloads as they came. Members a message
/// of its kind does not have are left out. [`with_id`] falls back to it.
pub fn rebuilt_with_id(env: &Envelope<'_>, id: &Id) -> Vec<u8> {
    match (env.method, env.result, env.error) {
        (Some(method), _, _) => request(id, method, env.params.map(RawValue::get)),
        (None, Some(result), _) => result_response(id, result.get()),
        (None, None, Some(error)) => error_object_response(id, error.get()),
        (None, None, None) => unreachable!("an envelope is a request, a notification or a response"),
    }
}

/// The `_meta` key of a 2026-07-28 request's protocol version.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// Where a 2026-07-28 request's `Mcp-Name` HTTP header comes from: `params.name` (tools/call,
/// prompts/get), `params.uri` (resources/read), `params.taskId` (the Tasks extension's methods).
pub fn routing_name_field(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    }
}

/// A 2026-07-28 result object with `resultType: "complete"` when it has no `resultType` of its own.
/// Spliced into the text, so every other byte stays as the upstream sent it.
pub fn mark_complete(result: &str) -> String {
    let trimmed = result.trim_start();
    if !trimmed.starts_with('{') {
        return result.to_owned();
    }
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new("resultType"));
    if may_contain_key(result.as_bytes(), &KEY)
        // Keys only: a `Value` would read a member named `$serde_json::private::RawValue` as JSON text.
        && serde_json::from_str::<HashMap<String, IgnoredAny>>(result)
            .is_ok_and(|m| m.contains_key("resultType"))
    {
        return result.to_owned();
    }
    let body = trimmed[1..].trim_start();
    let sep = if body.starts_with('}') { "" } else { "," };
    format!("{{\"resultType\":\"complete\"{sep}{body}")
}

/// The `code` of a raw JSON-RPC error object, if it has one.
pub fn error_code_of(error: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Code {
        code: Option<i64>,
    }
    serde_json::from_str::<Code>(error).ok().and_then(|c| c.code)
}

/// Builds a request line with the given id, method and raw params.
pub fn request(id: &Id, method: &str, params: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + params.map_or(0, str::len));
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.as_json().as_bytes());
    out.push(b',');
    method_and_params(out, method, params)
}

/// Builds a notification line with the given method and raw params.
pub fn notification(method: &str, params: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + params.map_or(0, str::len));
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",");
    method_and_params(out, method, params)
}

/// Ends a request or notification line: its method, its params if any, and the closing brace.
fn method_and_params(mut out: Vec<u8>, method: &str, params: Option<&str>) -> Vec<u8> {
    out.extend_from_slice(b"\"method\":");
    serde_json::to_writer(&mut out, method).expect("writing to a Vec cannot fail");
    if let Some(params) = params {
        out.extend_from_slice(b",\"params\":");
        out.extend_from_slice(params.as_bytes());
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_notifications_are_built_as_written() {
        assert_eq!(
            request(&Id::string("a"), "tools/call", Some(r#"{"name":"x"}"#)),
            br#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}"#
        );
        assert_eq!(request(&Id::string("b"), "ping", None), br#"{"jsonrpc":"2.0","id":"b","method":"ping"}"#);
        assert_eq!(
            notification("notifications/progress", Some("{}")),
            br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#
        );
        assert_eq!(notification("n/\"q", None), br#"{"jsonrpc":"2.0","method":"n/\"q"}"#);
    }

    #[test]
    fn ids_of_every_json_type_keep_their_text() {
        let long = format!("\"{}\"", "é".repeat(INLINE_ID));
        let edge = format!("\"{}\"", "x".repeat(INLINE_ID - 2));
        for raw in ["0", "-1", "18446744073709551616", "1.5e3", "\"abc\"", "\"\"", &long, &edge] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{raw},"method":"ping"}}"#);
            let env = Envelope::parse(line.as_bytes()).unwrap();
            assert_eq!(env.kind, Kind::Request);
            assert_eq!(env.id.unwrap().as_json(), raw);
        }
    }

    #[test]
    fn classifies_messages() {
        let n = Envelope::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(n.kind, Kind::Notification);
        let r = Envelope::parse(br#"{"jsonrpc":"2.0","id":3,"result":{}}"#).unwrap();
        assert_eq!(r.kind, Kind::Response);
        assert_eq!(r.result.unwrap().get(), "{}");
        let e =
            Envelope::parse(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#).unwrap();
        assert_eq!(e.kind, Kind::Response);
        assert!(e.id.is_none());
    }

    #[test]
    fn bad_input_gets_the_right_code() {
        let cases: [(&[u8], i64); 9] = [
            (b"not json", code::PARSE_ERROR),
            (b"{\"jsonrpc\":\"2.0\",", code::PARSE_ERROR),
            (b"\xff\xfe", code::PARSE_ERROR),
            (b"42", code::INVALID_REQUEST),
            (b"[{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}]", code::INVALID_REQUEST),
            (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, code::INVALID_REQUEST),
            (br#"{"id":1,"method":"ping"}"#, code::INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#, code::INVALID_REQUEST),
            (br#"{"jsonrpc":"2.0","id":1}"#, code::INVALID_REQUEST),
        ];
        for (line, want) in cases {
            let err = Envelope::parse(line).unwrap_err();
            assert_eq!(err.code(), want, "{:?} → {err}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn complete_is_spliced_in_once() {
        assert_eq!(mark_complete("{}"), r#"{"resultType":"complete"}"#);
        assert_eq!(mark_complete(r#" {"content":[]}"#), r#"{"resultType":"complete","content":[]}"#);
        let task = r#"{"resultType":"task","taskId":"t"}"#;
        assert_eq!(mark_complete(task), task);
        // A nested resultType is not the result's own.
        let nested = r#"{"content":[{"type":"text","text":"\"resultType\""}]}"#;
        assert!(mark_complete(nested).starts_with(r#"{"resultType":"complete","#));
        // serde_json reads a `Value` under this key as raw JSON text, so a string that is not JSON
        // fails to parse as a `Value` (the fuzzer found it); the result's own resultType is still
        // seen, and not written twice.
        let quirk = r#"{"resultType":"complete","content":[{"$serde_json::private::RawValue":"text"}]}"#;
        assert_eq!(mark_complete(quirk), quirk);
        // Its own resultType spelled with an escape is still its own: not written a second time.
        let escaped = r#"{"result\u0054ype":"task","taskId":"t"}"#;
        assert_eq!(mark_complete(escaped), escaped);
    }

    #[test]
    fn another_id_is_written_where_the_old_one_stands() {
        let id = Id::string("up-1");
        let line =
            br#"{ "params" : {"b":1, "a":[2]}, "id" :  7 ,"x":{"id":8}, "method":"m","jsonrpc":"2.0"}"#;
        let got = with_id(&Envelope::parse(line).unwrap(), &id);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            r#"{ "params" : {"b":1, "a":[2]}, "id" :  "up-1" ,"x":{"id":8}, "method":"m","jsonrpc":"2.0"}"#
        );
        // A response with id null gets one; an escaped key is still the id.
        let got =
            with_id(&Envelope::parse(br#"{"jsonrpc":"2.0","id":null,"error":{"code":1}}"#).unwrap(), &id);
        assert_eq!(got, br#"{"jsonrpc":"2.0","id":"up-1","error":{"code":1}}"#);
        let got = with_id(&Envelope::parse(br#"{"jsonrpc":"2.0","\u0069d":3,"result":{}}"#).unwrap(), &id);
        assert_eq!(got, br#"{"jsonrpc":"2.0","\u0069d":"up-1","result":{}}"#);
        // Two ids: the message is refused before anything is written into it.
        assert!(Envelope::parse(br#"{"jsonrpc":"2.0","id":1,"id":2,"method":"m"}"#).is_err());
        // No id member (a notification): rebuilt.
        let env = Envelope::parse(br#"{"method":"m", "jsonrpc":"2.0"}"#).unwrap();
        assert_eq!(with_id(&env, &id), br#"{"jsonrpc":"2.0","id":"up-1","method":"m"}"#);
    }

    #[test]
    fn builds_error_responses() {
        let id = Id::string("a\"b");
        let line = error_response(Some(&id), -32600, "bad \"x\"", None);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["id"], "a\"b");
        assert_eq!(v["error"]["message"], "bad \"x\"");
        let line = error_response(None, -32700, "m", Some(&serde_json::json!({"k":1})));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v["id"].is_null());
        assert_eq!(v["error"]["data"]["k"], 1);
    }
}
