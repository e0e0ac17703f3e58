//! The routing headers of a 2026-07-28 request over Streamable HTTP. Such a request has no session to
//! negotiate a version in: it names its protocol version in `params._meta`, and its HTTP request must
//! say the same in `MCP-Protocol-Version`, with its method in `Mcp-Method` and, for the methods that
//! name something, that name in `Mcp-Name` (in the `=?base64?…?=` form when it is not plain visible
//! ASCII). A server checks them against the body and refuses a request without them (HTTP 400).

use crate::jsonrpc::{META_PROTOCOL_VERSION, routing_name_field};
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use std::borrow::Cow;

use super::MCP_PROTOCOL_VERSION;

const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// The routing headers of one 2026-07-28 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Routing {
    version: HeaderValue,
    method: HeaderValue,
    name: Option<HeaderValue>,
}

impl Routing {
    /// The headers `method` with `params` needs; `None` for a request without a per-request protocol
    /// version (a session's request: the version negotiated by `initialize` goes with it instead).
    pub(super) fn of(method: &str, params: Option<&RawValue>) -> Option<Routing> {
        let params = params?;
        static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(META_PROTOCOL_VERSION));
        if !crate::jsonrpc::may_contain_key(params.get().as_bytes(), &KEY) {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(rename = "_meta", borrow)]
            meta: Option<Meta<'a>>,
            #[serde(borrow, default)]
            name: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            uri: Option<Cow<'a, str>>,
            #[serde(rename = "taskId", borrow, default)]
            task_id: Option<Cow<'a, str>>,
        }
        #[derive(serde::Deserialize)]
        struct Meta<'a> {
            #[serde(rename = "io.modelcontextprotocol/protocolVersion", borrow)]
            version: Option<Cow<'a, str>>,
        }
        let params: Params<'_> = serde_json::from_str(params.get()).ok()?;
        let version = HeaderValue::from_str(&params.meta?.version?).ok()?;
        let method_value = HeaderValue::from_str(method).ok()?;
        let name = match routing_name_field(method) {
            Some("name") => params.name,
            Some("uri") => params.uri,
            Some(_) => params.task_id,
            None => None,
        };
        let name = name.and_then(|n| HeaderValue::from_str(&header_text(&n)).ok());
        Some(Routing { version, method: method_value, name })
    }

    /// Sets the headers on a request (the version replaces a negotiated one).
    pub(super) fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(MCP_PROTOCOL_VERSION, self.version.clone());
        headers.insert(MCP_METHOD, self.method.clone());
        if let Some(name) = &self.name {
            headers.insert(MCP_NAME, name.clone());
        }
    }
}

/// A name as a header value: as it is when it is visible ASCII (spaces inside allowed), else the
/// `=?base64?…?=` form.
fn header_text(name: &str) -> Cow<'_, str> {
    let plain = !name.is_empty()
        && name.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !name.starts_with(' ')
        && !name.ends_with(' ')
        && !name.starts_with("=?");
    if plain {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The headers sent for `method` with `params`, as (version, method, name).
    fn sent(method: &str, params: serde_json::Value) -> Option<(String, String, Option<String>)> {
        let params = RawValue::from_string(params.to_string()).unwrap();
        let routing = Routing::of(method, Some(&params))?;
        let mut headers = HeaderMap::new();
        routing.apply(&mut headers);
        let text = |h: &str| headers.get(h).map(|v| v.to_str().unwrap().to_owned());
        Some((text("mcp-protocol-version")?, text("mcp-method")?, text("mcp-name")))
    }

    #[test]
    fn a_modern_request_carries_the_headers_its_body_says() {
        let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28"});
        let v = || "2026-07-28".to_owned();
        assert_eq!(
            sent("server/discover", json!({"_meta": meta})),
            Some((v(), "server/discover".into(), None))
        );
        let call = sent("tools/call", json!({"name": "echo", "arguments": {"name": "x"}, "_meta": meta}));
        assert_eq!(call, Some((v(), "tools/call".into(), Some("echo".into()))));
        let read = sent("resources/read", json!({"uri": "file:///a b", "_meta": meta}));
        assert_eq!(read.unwrap().2.as_deref(), Some("file:///a b"));
        let get = sent("tasks/get", json!({"taskId": "t-1", "_meta": meta}));
        assert_eq!(get.unwrap().2.as_deref(), Some("t-1"));
        // Not plain visible ASCII: the base64 form (the proxy's own front decodes and checks it).
        let name = sent("tools/call", json!({"name": "grüße", "_meta": meta})).unwrap().2.unwrap();
        assert_eq!(name, "=?base64?Z3LDvMOfZQ==?=");
        let name = sent("tools/call", json!({"name": " padded", "_meta": meta})).unwrap().2.unwrap();
        assert_eq!(name, "=?base64?IHBhZGRlZA==?=");
    }

    #[test]
    fn a_key_written_with_escapes_is_still_found() {
        // `\/` and `\u` are JSON's own spellings of the key's characters.
        for params in [
            r#"{"name":"echo","_meta":{"io.modelcontextprotocol\/protocolVersion":"2026-07-28"}}"#,
            r#"{"name":"echo","_meta":{"io.modelcontextprotocol\u002fprotocolVersion":"2026-07-28"}}"#,
        ] {
            let params = RawValue::from_string(params.to_owned()).unwrap();
            let routing = Routing::of("tools/call", Some(&params)).expect("a modern request");
            let mut headers = HeaderMap::new();
            routing.apply(&mut headers);
            assert_eq!(headers.get("mcp-protocol-version").unwrap(), "2026-07-28");
            assert_eq!(headers.get("mcp-name").unwrap(), "echo");
        }
    }

    #[test]
    fn a_session_request_gets_no_routing_headers() {
        assert_eq!(sent("tools/call", json!({"name": "echo"})), None);
        assert_eq!(Routing::of("tools/call", None), None);
        // A version that is not a string is not a modern request's.
        assert_eq!(
            sent("tools/call", json!({"_meta": {"io.modelcontextprotocol/protocolVersion": 7}})),
            None
        );
    }
}
