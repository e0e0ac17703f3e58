//! The soak's HTTP client: one exchange per connection, 2025-11-25 sessions and 2026-07-28 stateless
//! requests, and how each call ended (answered, a clear error, or lost).

use crate::harness::Reply;
use crate::{EXCHANGE_TIMEOUT, EXT, MODERN};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;

/// One HTTP/1.1 exchange (Connection: close), or why there was none.
pub(crate) fn exchange(addr: &str, method: &str, headers: &[String], body: &[u8]) -> Result<Reply, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} /mcp HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).and_then(|_| s.write_all(body)).map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    if raw.is_empty() {
        return Err("the connection closed without an answer".into());
    }
    Ok(Reply::parse(&raw))
}

pub(crate) fn base_headers(auth: &str) -> Vec<String> {
    vec![
        "Content-Type: application/json".into(),
        "Accept: application/json, text/event-stream".into(),
        format!("Authorization: Bearer {auth}"),
    ]
}

/// How one call ended.
pub(crate) enum Outcome {
    /// Its answer.
    Answer(Value),
    /// A clear error: a JSON-RPC error, or an HTTP error status with a body that says why.
    Clear(String),
    /// Nothing, or nothing readable.
    Lost(String),
}

/// Reads the answer to request `id` from an HTTP reply.
pub(crate) fn answer_of(reply: Result<Reply, String>, id: &Value) -> Outcome {
    let reply = match reply {
        Ok(r) => r,
        Err(e) => return Outcome::Lost(e),
    };
    let found = reply.messages().into_iter().rev().find(|m| m.get("id") == Some(id));
    match found {
        Some(m) if m.get("error").is_some() => Outcome::Clear(format!("{} {}", reply.status, m["error"])),
        Some(m) => Outcome::Answer(m["result"].clone()),
        None if reply.status >= 400 && !reply.body.trim().is_empty() => {
            Outcome::Clear(format!("HTTP {}: {}", reply.status, reply.body.trim()))
        }
        None => Outcome::Lost(format!("HTTP {} without an answer: {:?}", reply.status, reply.body)),
    }
}

/// A 2025-11-25 session on a sidecar.
pub(crate) struct Session<'a> {
    pub(crate) addr: &'a str,
    pub(crate) auth: String,
    pub(crate) id: String,
    pub(crate) next: u64,
}

impl<'a> Session<'a> {
    pub(crate) fn open(addr: &'a str, auth: &str) -> Result<Session<'a>, String> {
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"tasks":{}},"clientInfo":{"name":"soak","version":"1"}}});
        let r = exchange(addr, "POST", &base_headers(auth), init.to_string().as_bytes())?;
        let id =
            r.header("mcp-session-id").ok_or(format!("initialize: HTTP {} {}", r.status, r.body))?.to_owned();
        let s = Session { addr, auth: auth.to_owned(), id, next: 1 };
        let n = exchange(
            addr,
            "POST",
            &s.headers(),
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )?;
        if n.status != 202 {
            return Err(format!("initialized: HTTP {}", n.status));
        }
        Ok(s)
    }

    pub(crate) fn headers(&self) -> Vec<String> {
        let mut h = base_headers(&self.auth);
        h.push(format!("Mcp-Session-Id: {}", self.id));
        h.push("MCP-Protocol-Version: 2025-11-25".into());
        h
    }

    pub(crate) fn request_line(&mut self, method: &str, params: Value) -> (Value, Vec<u8>) {
        let id = json!(self.next);
        self.next += 1;
        let line = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string().into_bytes();
        (id, line)
    }

    pub(crate) fn call(&mut self, method: &str, params: Value) -> Outcome {
        let (id, line) = self.request_line(method, params);
        answer_of(exchange(self.addr, "POST", &self.headers(), &line), &id)
    }

    pub(crate) fn delete(&self) {
        let _ = exchange(self.addr, "DELETE", &self.headers(), b"");
    }
}

/// A 2026-07-28 stateless request (no session), with the Tasks extension declared.
pub(crate) fn modern_call(addr: &str, auth: &str, id: u64, method: &str, mut params: Value) -> Outcome {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "soak", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {EXT: {}}},
    });
    let mut headers = base_headers(auth);
    headers.push(format!("MCP-Protocol-Version: {MODERN}"));
    headers.push(format!("Mcp-Method: {method}"));
    if let Some(name) = ["name", "taskId"].iter().find_map(|k| params[k].as_str()) {
        headers.push(format!("Mcp-Name: {name}"));
    }
    let id = json!(id);
    let line = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string();
    answer_of(exchange(addr, "POST", &headers, line.as_bytes()), &id)
}
