//! Which protocol generation a request speaks, chosen per request.
//!
//! MCP 2025-11-25 (and earlier) is session-based: `initialize` opens a session, and every later
//! request belongs to it. MCP 2026-07-28 is stateless: every request carries its protocol version,
//! client info and client capabilities in `params._meta`, and the HTTP transport mirrors the method
//! and name into headers (`Mcp-Method`, `Mcp-Name`) for intermediaries. The proxy serves both: a
//! request with `_meta["io.modelcontextprotocol/protocolVersion"]` of a modern version is served
//! statelessly; `initialize` opens a legacy session as before.

use crate::jsonrpc::{self, Id, code};
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// The stateless protocol version the proxy serves.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The session-based versions the proxy serves (to clients; the upstream gets what it negotiates).
pub const LEGACY_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// `_meta` key: the request's protocol version.
pub const META_VERSION: &str = jsonrpc::META_PROTOCOL_VERSION;
/// `_meta` key: the requesting client's capabilities.
pub const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key (in results): the server's name and version.
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
/// The Tasks extension (SEP-2663).
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";

/// Every version the proxy serves, newest first (`server/discover`'s `supportedVersions`).
pub fn supported_versions() -> Vec<&'static str> {
    std::iter::once(MODERN_VERSION).chain(LEGACY_VERSIONS.iter().copied()).collect()
}

/// What a modern request says about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modern {
    /// The client declared the Tasks extension on this request.
    pub tasks: bool,
}

/// The era of one request, read from its `_meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Era {
    /// No per-request protocol version (or a session-based one): the legacy session rules.
    Legacy,
    /// A stateless 2026-07-28 request.
    Modern(Modern),
    /// A per-request version the proxy does not serve.
    Unsupported(String),
}

impl Era {
    /// Reads the era of a request from its params. Costs one substring search unless the request
    /// carries a protocol version in `_meta` (legacy traffic is never parsed here).
    pub fn of(params: Option<&RawValue>) -> Era {
        let Some(params) = params else { return Era::Legacy };
        // Built once: building a finder per message costs more than the search.
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(META_VERSION));
        // (An escape could spell the key too: `\/` or `\u`.)
        if !jsonrpc::may_contain_key(params.get().as_bytes(), &FINDER) {
            return Era::Legacy;
        }
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(rename = "_meta", borrow)]
            meta: Option<&'a RawValue>,
        }
        #[derive(serde::Deserialize)]
        struct Meta<'a> {
            #[serde(rename = "io.modelcontextprotocol/protocolVersion", borrow)]
            version: Option<&'a RawValue>,
            #[serde(rename = "io.modelcontextprotocol/clientCapabilities", borrow)]
            capabilities: Option<&'a RawValue>,
        }
        // Only what is asked (borrowed, nothing built): whether the Tasks extension is declared.
        #[derive(serde::Deserialize)]
        struct Capabilities<'a> {
            #[serde(borrow)]
            extensions: Option<Extensions<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Extensions<'a> {
            // TASKS_EXTENSION (a unit test holds them equal).
            #[serde(rename = "io.modelcontextprotocol/tasks", borrow)]
            tasks: Option<&'a RawValue>,
        }
        // `_meta` found by a walk of the params (proved valid JSON with their message: no serde pass
        // over a call's arguments); serde where the walk is not sure (an escaped key, a key twice).
        let meta = match jsonrpc::scan::object_members(params.get(), |key| (key == b"_meta").then_some(0)) {
            Some([meta]) => meta.map(jsonrpc::scan::Member::text),
            None => {
                serde_json::from_str::<Params<'_>>(params.get()).ok().and_then(|p| p.meta).map(RawValue::get)
            }
        };
        let Some(meta) = meta else { return Era::Legacy };
        // The two members by a walk of `_meta` too; serde where the walk is not sure.
        let (version, capabilities) = match jsonrpc::scan::object_members(meta, |key| match key {
            b"io.modelcontextprotocol/protocolVersion" => Some(0),
            b"io.modelcontextprotocol/clientCapabilities" => Some(1),
            _ => None,
        }) {
            Some([version, capabilities]) => {
                (version.map(jsonrpc::scan::Member::text), capabilities.map(jsonrpc::scan::Member::text))
            }
            None => match serde_json::from_str::<Meta<'_>>(meta) {
                Ok(meta) => (meta.version.map(RawValue::get), meta.capabilities.map(RawValue::get)),
                Err(_) => return Era::Legacy,
            },
        };
        let Some(raw) = version else { return Era::Legacy };
        let version = match string_value(raw) {
            Some(v) => v,
            None => return Era::Unsupported(raw.to_owned()),
        };
        if LEGACY_VERSIONS.contains(&&*version) {
            return Era::Legacy;
        }
        if version != MODERN_VERSION {
            return Era::Unsupported(version.into_owned());
        }
        // Capabilities of the wrong shape declare nothing (the request is still a 2026-07-28 one).
        let tasks =
            capabilities.is_some_and(|c| match jsonrpc::member_at(c, &["extensions", TASKS_EXTENSION]) {
                Some(tasks) => tasks.is_some_and(|t| t.starts_with('{')),
                None => serde_json::from_str::<Capabilities<'_>>(c)
                    .ok()
                    .and_then(|c| c.extensions)
                    .and_then(|e| e.tasks)
                    .is_some_and(|t| t.get().trim_start().starts_with('{')),
            });
        Era::Modern(Modern { tasks })
    }

    /// Whether this is a modern request.
    pub fn is_modern(&self) -> bool {
        matches!(self, Era::Modern(_))
    }
}

/// How long a 2026-07-28 client may cache a list the upstream gave (the upstream's changes are not
/// announced to stateless clients, so not long).
const LIST_TTL_MS: u64 = 60_000;

/// A 2026-07-28 answer to `method`, from the upstream's result: `resultType: "complete"`, and for the
/// cacheable results (lists, `resources/read`) `ttlMs` and `cacheScope` when the upstream gave none.
/// Scoped `private`: what a 2025-11-25 upstream lists may depend on who asks.
pub fn complete_result(method: &str, result: &str) -> String {
    let ttl_ms = match method {
        "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" => LIST_TTL_MS,
        // The contents of a resource may change at any time.
        "resources/read" => 0,
        _ => return jsonrpc::mark_complete(result),
    };
    let Ok(mut r) = serde_json::from_str::<serde_json::Map<String, Value>>(result) else {
        return result.to_owned();
    };
    r.entry("resultType").or_insert_with(|| json!("complete"));
    r.entry("ttlMs").or_insert_with(|| json!(ttl_ms));
    r.entry("cacheScope").or_insert_with(|| json!("private"));
    Value::Object(r).to_string()
}

/// The `_meta` the proxy sends with its own requests to a 2026-07-28 upstream (and adds to a 2025-11-25
/// client's requests it forwards there): the version, who asks, and the client capabilities a
/// 2025-11-25 upstream would have been told at `initialize` (elicitation, sampling).
pub fn proxy_meta() -> Value {
    json!({
        META_VERSION: MODERN_VERSION,
        "io.modelcontextprotocol/clientInfo": { "name": "mcp-asyncify", "version": env!("CARGO_PKG_VERSION") },
        META_CAPABILITIES: { "elicitation": {}, "sampling": {} },
    })
}

/// Raw params with the proxy's `_meta` merged in (keys already there win): how a request the proxy
/// sends or forwards reaches a 2026-07-28 upstream.
pub fn with_proxy_meta(params: Option<&str>) -> String {
    let mut p = params
        .and_then(|p| serde_json::from_str::<serde_json::Map<String, Value>>(p).ok())
        .unwrap_or_default();
    let meta = p.entry("_meta").or_insert_with(|| json!({}));
    if let (Some(meta), Value::Object(ours)) = (meta.as_object_mut(), proxy_meta()) {
        for (k, v) in ours {
            meta.entry(k).or_insert(v);
        }
    }
    Value::Object(p).to_string()
}

/// The -32022 answer to a request for a version the proxy does not serve.
pub fn unsupported_version(id: Option<&Id>, requested: &str) -> Vec<u8> {
    let data = json!({ "supported": supported_versions(), "requested": requested });
    let message = format!(
        "Unsupported protocol version {requested:?}; this server supports {}",
        supported_versions().join(", ")
    );
    jsonrpc::error_response(id, code::UNSUPPORTED_VERSION, &message, Some(&data))
}

/// The -32021 answer to a request that needs the Tasks extension and did not declare it.
pub fn missing_tasks_extension(id: &Id, what: &str) -> Vec<u8> {
    let data = json!({ "requiredCapabilities": { "extensions": { TASKS_EXTENSION: {} } } });
    let message = format!(
        "Missing required client capability: {what} needs the {TASKS_EXTENSION} extension declared in \
         params._meta[\"{META_CAPABILITIES}\"].extensions"
    );
    jsonrpc::error_response(Some(id), code::MISSING_CAPABILITY, &message, Some(&data))
}

pub use crate::jsonrpc::routing_name_field as name_field;

/// What the routing headers of a modern HTTP request say.
#[derive(Debug, Default)]
pub struct RoutingHeaders<'a> {
    /// `MCP-Protocol-Version`.
    pub version: Option<&'a str>,
    /// `Mcp-Method`.
    pub method: Option<&'a str>,
    /// `Mcp-Name`, as sent (possibly `=?base64?…?=`).
    pub name: Option<&'a str>,
}

/// Checks a modern HTTP request's headers against its body (2026-07-28 Streamable HTTP, "Server
/// Validation"): every mismatch or missing required header is a `HeaderMismatch`, with a message
/// naming the header and both values.
pub fn check_headers(
    headers: &RoutingHeaders<'_>,
    method: &str,
    params: Option<&RawValue>,
) -> Result<(), String> {
    match headers.version {
        None => return Err("Header mismatch: the MCP-Protocol-Version header is required".into()),
        Some(v) if v != MODERN_VERSION => {
            return Err(format!(
                "Header mismatch: MCP-Protocol-Version header value '{v}' does not match body value '{MODERN_VERSION}'"
            ));
        }
        Some(_) => {}
    }
    match headers.method {
        None => return Err("Header mismatch: the Mcp-Method header is required".into()),
        Some(m) if m != method => {
            return Err(format!(
                "Header mismatch: Mcp-Method header value '{m}' does not match body value '{method}'"
            ));
        }
        Some(_) => {}
    }
    let Some(field) = name_field(method) else { return Ok(()) };
    // Only the named field is read (a call's arguments may be large).
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        name: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        uri: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "taskId", borrow, default)]
        task_id: Option<std::borrow::Cow<'a, str>>,
    }
    // By a walk of the params to the one member (no serde pass over a call's arguments); serde
    // where the walk is not sure. A member that is not a string names nothing to check.
    let body = params.and_then(|p| match jsonrpc::member_at(p.get(), &[field]) {
        Some(member) => member.and_then(string_value),
        None => serde_json::from_str::<Named<'_>>(p.get()).ok().and_then(|n| match field {
            "name" => n.name,
            "uri" => n.uri,
            _ => n.task_id,
        }),
    });
    match (headers.name, body) {
        (_, None) => Ok(()),
        (None, Some(_)) => Err(format!("Header mismatch: the Mcp-Name header is required for {method}")),
        (Some(h), Some(b)) => {
            let decoded = decode_header_value(h)
                .ok_or_else(|| format!("Header mismatch: Mcp-Name header value '{h}' is not valid base64"))?;
            if decoded == *b {
                Ok(())
            } else {
                Err(format!(
                    "Header mismatch: Mcp-Name header value '{decoded}' does not match body value '{b}'"
                ))
            }
        }
    }
}

/// A JSON string's value (`raw` is one JSON value, as a member of a valid text): borrowed when it
/// has no escapes, decoded by serde when it has; `None` when it is not a string.
fn string_value(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    match jsonrpc::plain_string(raw) {
        Some(plain) => Some(std::borrow::Cow::Borrowed(plain)),
        None => serde_json::from_str::<String>(raw).ok().map(std::borrow::Cow::Owned),
    }
}

/// A header value, decoded from the `=?base64?…?=` sentinel form when it has it.
pub fn decode_header_value(value: &str) -> Option<String> {
    match value.strip_prefix("=?base64?").and_then(|v| v.strip_suffix("?=")) {
        Some(encoded) => String::from_utf8(base64_decode(encoded)?).ok(),
        None => Some(value.to_owned()),
    }
}

/// Standard base64 (padding optional): the only place the proxy needs it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn the_tasks_extension_is_read_under_its_name() {
        let params = format!(
            r#"{{"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{"extensions":{{"{TASKS_EXTENSION}":{{}}}}}}}}}}"#
        );
        assert_eq!(Era::of(Some(&raw(&params))), Era::Modern(Modern { tasks: true }));
        // Capabilities of the wrong shape: a 2026-07-28 request without the extension.
        for caps in
            [r#""x""#, r#"{"extensions":[1]}"#, r#"{"extensions":{"io.modelcontextprotocol/tasks":true}}"#]
        {
            let params = format!(
                r#"{{"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{caps}}}}}"#
            );
            assert_eq!(Era::of(Some(&raw(&params))), Era::Modern(Modern { tasks: false }), "{caps}");
        }
    }

    #[test]
    fn the_era_is_read_from_the_request_meta() {
        assert_eq!(Era::of(None), Era::Legacy);
        assert_eq!(Era::of(Some(&raw(r#"{"name":"x"}"#))), Era::Legacy);
        let modern = raw(
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}}"#,
        );
        assert_eq!(Era::of(Some(&modern)), Era::Modern(Modern { tasks: true }));
        let plain = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#);
        assert_eq!(Era::of(Some(&plain)), Era::Modern(Modern { tasks: false }));
        let old = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2025-11-25"}}"#);
        assert_eq!(Era::of(Some(&old)), Era::Legacy);
        let future = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2099-01-01"}}"#);
        assert_eq!(Era::of(Some(&future)), Era::Unsupported("2099-01-01".into()));
        // Escapes in the version or in a key: read as serde reads them.
        let escaped = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-2\u0038"}}"#);
        assert_eq!(Era::of(Some(&escaped)), Era::Modern(Modern { tasks: false }));
        let escaped_key = raw(
            r#"{"_meta":{"io.modelcontextprotocol\/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}}"#,
        );
        assert_eq!(Era::of(Some(&escaped_key)), Era::Modern(Modern { tasks: true }));
        let not_a_string = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":20260728}}"#);
        assert_eq!(Era::of(Some(&not_a_string)), Era::Unsupported("20260728".into()));
    }

    #[test]
    fn headers_must_match_the_body() {
        let params = raw(r#"{"name":"greet","arguments":{}}"#);
        let ok =
            RoutingHeaders { version: Some(MODERN_VERSION), method: Some("tools/call"), name: Some("greet") };
        assert!(check_headers(&ok, "tools/call", Some(&params)).is_ok());
        let encoded = RoutingHeaders { name: Some("=?base64?Z3JlZXQ=?="), ..ok };
        assert!(check_headers(&encoded, "tools/call", Some(&params)).is_ok());
        let wrong_method = RoutingHeaders { method: Some("tasks/get"), ..encoded };
        assert!(
            check_headers(&wrong_method, "tools/call", Some(&params)).unwrap_err().contains("Mcp-Method")
        );
        let wrong_name = RoutingHeaders { name: Some("other"), method: Some("tools/call"), ..wrong_method };
        assert!(check_headers(&wrong_name, "tools/call", Some(&params)).unwrap_err().contains("'other'"));
        let missing = RoutingHeaders { name: None, ..wrong_name };
        assert!(check_headers(&missing, "tools/call", Some(&params)).is_err());
        let no_version = RoutingHeaders { version: None, ..missing };
        assert!(check_headers(&no_version, "ping", None).unwrap_err().contains("MCP-Protocol-Version"));
        // The body's name as JSON spells it: escaped, under an escaped key (read by serde), or not a
        // string (nothing to check); a large argument before it is walked over, not read.
        let big = "y".repeat(10_000);
        for body in [
            r#"{"name":"gr\u0065et"}"#.to_owned(),
            r#"{"n\u0061me":"greet"}"#.to_owned(),
            format!(r#"{{"arguments":{{"text":"{big}"}},"name":"greet"}}"#),
        ] {
            assert!(check_headers(&ok, "tools/call", Some(&raw(&body))).is_ok(), "{body:.60}");
            let other = RoutingHeaders { name: Some("other"), ..ok };
            assert!(check_headers(&other, "tools/call", Some(&raw(&body))).is_err(), "{body:.60}");
        }
        let number = raw(r#"{"name":7}"#);
        assert!(check_headers(&ok, "tools/call", Some(&number)).is_ok(), "a number names no tool to check");
    }

    #[test]
    fn base64_values_decode() {
        assert_eq!(decode_header_value("=?base64?SGVsbG8sIOS4lueVjA==?=").unwrap(), "Hello, 世界");
        assert_eq!(decode_header_value("plain").unwrap(), "plain");
        assert!(decode_header_value("=?base64?***?=").is_none());
    }
}
