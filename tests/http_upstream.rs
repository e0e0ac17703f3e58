//! The Streamable HTTP upstream transport, driven with raw JSON-RPC lines as a session drives it.
//!
//! The main test runs against a real Streamable HTTP MCP server (rmcp's, with its local session
//! manager) behind a small axum layer that records every request and can cut a POST's SSE stream or
//! refuse resumption. The others use a hand-written HTTP responder (401 with `WWW-Authenticate`,
//! pretty JSON bodies, batches, 500s) and a dead port. Everything is on 127.0.0.1.

mod common;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use mcp_asyncify::transport::http_upstream::{self, HttpUpstream, HttpUpstreamOptions, STREAM_BROKE};
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerInfo};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// The rmcp server

#[derive(Debug, Deserialize, JsonSchema)]
struct Echo {
    text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct Slow {
    ms: u64,
    text: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct Big {
    bytes: usize,
}

#[derive(Clone)]
struct Tools {
    tool_router: ToolRouter<Self>,
}

fn text(s: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(s.into())])
}

#[tool_router]
impl Tools {
    /// Answers its text.
    #[tool]
    async fn echo(&self, Parameters(p): Parameters<Echo>) -> CallToolResult {
        text(p.text)
    }

    /// Answers its text after `ms` milliseconds.
    #[tool]
    async fn slow(&self, Parameters(p): Parameters<Slow>) -> CallToolResult {
        tokio::time::sleep(Duration::from_millis(p.ms)).await;
        text(p.text)
    }

    /// Answers a text of `bytes` bytes.
    #[tool]
    async fn big(&self, Parameters(p): Parameters<Big>) -> CallToolResult {
        text("b".repeat(p.bytes))
    }

    /// Sends `notifications/tools/list_changed` (a server-initiated message: it travels on the GET
    /// stream), then answers.
    #[tool]
    async fn announce(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        ctx.peer
            .notify_tool_list_changed()
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        Ok(text("announced"))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
            .with_server_info(Implementation::new("http-upstream-test", "0.0.0"))
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Hit {
    method: String,
    rpc_method: Option<String>,
    rpc_id: Option<Value>,
    session: Option<String>,
    protocol: Option<String>,
    last_event_id: Option<String>,
    custom: Option<String>,
}

/// The recorder and the switches of the layer in front of the server.
#[derive(Clone, Default)]
struct Control {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Answer 405 to GETs resuming a request's stream (`Last-Event-ID` of the form `n/request`).
    refuse_resume: Arc<AtomicBool>,
}

impl Control {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&Hit) -> bool) -> Hit {
        let start = Instant::now();
        loop {
            if let Some(hit) = self.hits().into_iter().find(|h| pred(h)) {
                return hit;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the server never saw {what}: {:#?}",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header(req: &http::request::Parts, name: &str) -> Option<String> {
    req.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// Records each request; cuts the SSE answer of a POST mentioning "cut-me" after its first event (the
/// priming event), so that the client has to resume; refuses resumption when told to.
async fn layer(State(ctl): State<Control>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let message: Option<Value> = serde_json::from_slice(&bytes).ok();
    let hit = Hit {
        method: parts.method.to_string(),
        rpc_method: message.as_ref().and_then(|m| m["method"].as_str()).map(str::to_owned),
        rpc_id: message.as_ref().and_then(|m| m.get("id")).cloned(),
        session: header(&parts, "mcp-session-id"),
        protocol: header(&parts, "mcp-protocol-version"),
        last_event_id: header(&parts, "last-event-id"),
        custom: header(&parts, "x-custom"),
    };
    ctl.hits.lock().unwrap().push(hit.clone());
    if hit.method == "GET"
        && hit.last_event_id.as_deref().is_some_and(|id| id.contains('/'))
        && ctl.refuse_resume.load(Ordering::SeqCst)
    {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let cut = memchr::memmem::find(&bytes, b"cut-me").is_some();
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if !cut {
        return response;
    }
    let (parts, mut body) = response.into_parts();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!first.windows(7).any(|w| w == b"jsonrpc"), "the first event should be the priming one");
    Response::from_parts(parts, Body::from(first))
}

async fn serve_rmcp(manager: Arc<LocalSessionManager>, ctl: Control) -> SocketAddr {
    let config = StreamableHttpServerConfig::default().with_sse_retry(Some(Duration::from_millis(50)));
    let service =
        StreamableHttpService::new(|| Ok(Tools { tool_router: Tools::tool_router() }), manager, config);
    let app = axum::Router::new()
        .route_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(ctl, layer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------------
// The session's side: raw lines

struct Session {
    writer: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    lines: mpsc::UnboundedReceiver<String>,
    /// Lines read but not yet asked for.
    stash: Vec<Value>,
    /// Every line read, for the final checks.
    all: Vec<Value>,
    /// The same, as read.
    raw: Vec<String>,
    reader: tokio::task::JoinHandle<()>,
    handle: HttpUpstream,
}

impl Session {
    fn connect(url: &str, configure: impl FnOnce(&mut HttpUpstreamOptions)) -> Session {
        let mut options = HttpUpstreamOptions::new(url.parse().unwrap());
        options.connect_timeout = Duration::from_secs(2);
        options.request_timeout = Duration::from_secs(10);
        configure(&mut options);
        let (writer, reader, handle) = http_upstream::connect(options);
        let (tx, lines) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_lines(reader, tx));
        let writer: Option<Box<dyn AsyncWrite + Send + Unpin>> = Some(Box::new(writer));
        Session { writer, lines, stash: Vec::new(), all: Vec::new(), raw: Vec::new(), reader, handle }
    }

    async fn send(&mut self, message: Value) {
        let mut line = serde_json::to_vec(&message).unwrap();
        line.push(b'\n');
        self.writer.as_mut().unwrap().write_all(&line).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.as_mut().unwrap().write_all(bytes).await.unwrap();
    }

    /// The next line matching `pred` (others are kept for later).
    async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!("the reader ended while waiting for {what}; unclaimed: {:#?}", self.stash),
                Err(_) => panic!("no {what} within 10 s; unclaimed: {:#?}", self.stash),
            };
            let value: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            self.all.push(value.clone());
            self.raw.push(line);
            if pred(&value) {
                return value;
            }
            self.stash.push(value);
        }
    }

    async fn response(&mut self, id: Value) -> Value {
        let what = format!("the response to {id}");
        self.expect(&what, |v| v["id"] == id && (v.get("result").is_some() || v.get("error").is_some())).await
    }

    async fn call(&mut self, id: u64, tool: &str, arguments: Value) -> Value {
        self.send(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}}))
            .await;
        self.response(json!(id)).await
    }

    async fn initialize(&mut self) -> Value {
        self.send(json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
        }))
        .await;
        let answer = self.response(json!(1)).await;
        self.send(json!({"jsonrpc":"2.0","method":"notifications/initialized"})).await;
        answer
    }

    /// Closes the writer (the session ends) and waits for the reader's end; returns how long it took.
    async fn close(&mut self) -> Duration {
        let start = Instant::now();
        let mut writer = self.writer.take().unwrap();
        writer.shutdown().await.unwrap();
        drop(writer);
        let reader = &mut self.reader;
        tokio::time::timeout(Duration::from_secs(10), reader).await.expect("the reader never ended").unwrap();
        while let Ok(line) = self.lines.try_recv() {
            let value: Value = serde_json::from_str(&line).unwrap();
            self.all.push(value.clone());
            self.stash.push(value);
        }
        start.elapsed()
    }
}

async fn read_lines(reader: impl AsyncRead + Unpin, tx: mpsc::UnboundedSender<String>) {
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let _ = tx.send(line);
    }
}

fn tool_text(response: &Value) -> &str {
    response["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("not a tool result: {response}"))
}

// ---------------------------------------------------------------------------------------------
// Against rmcp's Streamable HTTP server

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_streamable_http_server_end_to_end() {
    // RUST_LOG=mcp_asyncify=debug shows the transport at work.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut manager = LocalSessionManager::default();
    manager.session_config.sse_retry = Some(Duration::from_millis(50));
    let manager = Arc::new(manager);
    let ctl = Control::default();
    let addr = serve_rmcp(manager.clone(), ctl.clone()).await;
    let mut s = Session::connect(&format!("http://{addr}/mcp"), |o| {
        o.headers.push(("x-custom".parse().unwrap(), HeaderValue::from_static("configured")));
    });

    // initialize: the session id is kept, the protocol version read from the answer.
    let init = s.initialize().await;
    let version = init["result"]["protocolVersion"].as_str().unwrap().to_owned();
    let first_session = s.handle.session_id().expect("the server gave a session id");
    assert_eq!(s.handle.protocol_version().as_deref(), Some(version.as_str()));
    assert!(manager.has_session(&first_session.clone().into()).await.unwrap());

    // tools/list carries the session, the version and the configured header.
    s.send(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"})).await;
    let list = s.response(json!(2)).await;
    let names: Vec<&str> =
        list["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"echo") && names.contains(&"slow"), "{names:?}");
    let hit = ctl.wait_for("tools/list", |h| h.rpc_method.as_deref() == Some("tools/list")).await;
    assert_eq!(hit.session.as_deref(), Some(first_session.as_str()));
    assert_eq!(hit.protocol.as_deref(), Some(version.as_str()));
    assert_eq!(hit.custom.as_deref(), Some("configured"));
    let init_hit = ctl.wait_for("initialize", |h| h.rpc_method.as_deref() == Some("initialize")).await;
    assert_eq!(init_hit.session, None, "initialize goes without a session id");
    assert_eq!(init_hit.protocol, None, "initialize goes without MCP-Protocol-Version");

    // After notifications/initialized, the GET stream: server-initiated messages arrive on it.
    ctl.wait_for("the GET stream", |h| h.method == "GET" && h.session.as_deref() == Some(&first_session))
        .await;
    let announced = s.call(3, "announce", json!({})).await;
    assert_eq!(tool_text(&announced), "announced");
    s.expect("tools/list_changed", |v| v["method"] == "notifications/tools/list_changed").await;

    // 20 concurrent calls of mixed durations, answered by id; the slow ones hold up nothing.
    let started = Instant::now();
    let mut expected = HashMap::new();
    for i in 0..20u64 {
        let id = 100 + i;
        let (tool, arguments, want) = match i % 4 {
            0 => ("slow", json!({"ms": 1200, "text": format!("slow {i}")}), format!("slow {i}")),
            1 => ("echo", json!({"text": format!("echo {i}")}), format!("echo {i}")),
            n => ("slow", json!({"ms": 40 * n, "text": format!("quick {i}")}), format!("quick {i}")),
        };
        expected.insert(id, want);
        let line = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool,"arguments":arguments}});
        s.send(line).await;
    }
    let mut order = Vec::new();
    for _ in 0..20 {
        let v = s
            .expect("a tools/call answer", |v| v["id"].as_u64().is_some_and(|id| (100..120).contains(&id)))
            .await;
        let id = v["id"].as_u64().unwrap();
        assert_eq!(tool_text(&v), expected[&id], "answer to {id}");
        order.push(id);
    }
    let took = started.elapsed();
    let mut unique = order.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20, "each call answered once: {order:?}");
    let first_slow = order.iter().position(|id| (id - 100) % 4 == 0).unwrap();
    assert_eq!(first_slow, 15, "the 15 quick calls are answered before the 5 slow ones: {order:?}");
    assert!(took < Duration::from_millis(3000), "the calls ran concurrently ({took:?})");

    // A POST's SSE stream cut after its priming event is resumed with GET + Last-Event-ID.
    let resumed = s.call(200, "slow", json!({"ms": 700, "text": "cut-me once"})).await;
    assert_eq!(tool_text(&resumed), "cut-me once");
    let resume = ctl
        .wait_for("a resumption", |h| {
            h.method == "GET" && h.last_event_id.as_deref().is_some_and(|id| id.contains('/'))
        })
        .await;
    assert_eq!(resume.session.as_deref(), Some(first_session.as_str()));
    assert_eq!(resume.protocol.as_deref(), Some(version.as_str()));

    // When the server will not resume (405), the request is answered with an error, not left waiting.
    ctl.refuse_resume.store(true, Ordering::SeqCst);
    let refused = s.call(201, "slow", json!({"ms": 300, "text": "cut-me twice"})).await;
    assert_eq!(refused["error"]["code"], -32000, "{refused}");
    assert_eq!(refused["error"]["message"], STREAM_BROKE, "{refused}");
    ctl.refuse_resume.store(false, Ordering::SeqCst);

    // The server drops the session: the next call re-initializes transparently and is answered.
    manager.close_session(&first_session.clone().into()).await.unwrap();
    let after = s.call(300, "echo", json!({"text": "after the drop"})).await;
    assert_eq!(tool_text(&after), "after the drop");
    let second_session = s.handle.session_id().unwrap();
    assert_ne!(second_session, first_session);
    assert!(manager.has_session(&second_session.clone().into()).await.unwrap());
    let inits: Vec<Hit> =
        ctl.hits().into_iter().filter(|h| h.rpc_method.as_deref() == Some("initialize")).collect();
    assert_eq!(inits.len(), 2, "{inits:#?}");
    assert_eq!(
        inits[1].rpc_id,
        Some(json!("mcp-asyncify-reinitialize-0")),
        "replayed with the proxy's own id"
    );
    assert!(inits[1].session.is_none());
    ctl.wait_for("notifications/initialized for the new session", |h| {
        h.rpc_method.as_deref() == Some("notifications/initialized")
            && h.session.as_deref() == Some(&second_session)
    })
    .await;
    // The GET stream follows the new session.
    ctl.wait_for("the GET stream of the new session", |h| {
        h.method == "GET" && h.session.as_deref() == Some(&second_session)
    })
    .await;
    let announced = s.call(301, "announce", json!({})).await;
    assert_eq!(tool_text(&announced), "announced");
    s.expect("tools/list_changed again", |v| v["method"] == "notifications/tools/list_changed").await;

    // The session ends: DELETE with the session id, then the reader ends.
    let took = s.close().await;
    assert!(took < Duration::from_secs(6), "closing took {took:?}");
    let delete = ctl.wait_for("DELETE", |h| h.method == "DELETE").await;
    assert_eq!(delete.session.as_deref(), Some(second_session.as_str()));
    assert!(!manager.has_session(&second_session.clone().into()).await.unwrap());

    // The client saw no answer to the proxy's own initialize, and nothing it did not ask for.
    assert!(s.all.iter().all(|v| v["id"] != "mcp-asyncify-reinitialize-0"), "{:#?}", s.all);
    assert!(s.stash.is_empty(), "unexpected lines: {:#?}", s.stash);
}

// ---------------------------------------------------------------------------------------------
// Against a hand-written HTTP responder

/// A request as the responder read it.
#[derive(Debug, Clone)]
struct Raw {
    method: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Serves HTTP/1.1 with `answer` deciding each response (raw bytes after the status line's start).
async fn responder(answer: fn(&Raw) -> String) -> (SocketAddr, Arc<Mutex<Vec<Raw>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let mut lines = head.split("\r\n");
                    let method = lines.next().unwrap().split(' ').next().unwrap().to_owned();
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    while buf.len() < end + 4 + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    buf.drain(..end + 4 + len);
                    let raw = Raw { method, headers, body };
                    log.lock().unwrap().push(raw.clone());
                    if conn.write_all(answer(&raw).as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

const METADATA: &str =
    r#"Bearer resource_metadata="http://127.0.0.1:1/.well-known/oauth-protected-resource""#;

fn http(status: &str, extra: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// 401 without the right token; with it, pretty-printed JSON, batches, 202s and 500s.
fn oauth_server(req: &Raw) -> String {
    if req.header("authorization") != Some("Bearer good") {
        return http("401 Unauthorized", &format!("WWW-Authenticate: {METADATA}\r\n"), "text/plain", "no");
    }
    let message: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let id = message["id"].clone();
    match message["method"].as_str() {
        Some("tools/list") => {
            let body = format!(
                "{{\n  \"jsonrpc\": \"2.0\",\n  \"id\": {id},\n  \"result\": {{ \"text\": \"a\\nb\", \"n\": 1.50e1 }}\n}}\n"
            );
            http("200 OK", "", "application/json; charset=utf-8", &body)
        }
        Some("batch/please") => {
            let body = format!(
                "[{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{}}}},\n {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{}}}}]"
            );
            http("200 OK", "", "application/json", &body)
        }
        Some("fail/please") => http("500 Internal Server Error", "", "text/plain", "boom"),
        _ => "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n".to_owned(),
    }
}

/// Collects log lines written during a test (on its own thread: the test runs on a current-thread
/// runtime).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sidecar in front of the recorded server: a client's session there is one session upstream,
/// its calls travel on it, and the client's DELETE ends the upstream session too (the sidecar hands
/// the session's lines to their POSTs directly, and closing that hand-off ends the session). The
/// upstream's answers reach the session as whole messages, under the same size cap as any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_ends_the_upstream_session_when_its_client_ends_its_own() {
    let ctl = Control::default();
    let addr = serve_rmcp(Arc::new(LocalSessionManager::default()), ctl.clone()).await;
    let upstream = format!("http://{addr}/mcp");
    let client = tokio::task::spawn_blocking(move || {
        let sidecar = common::Served::sidecar(&["--upstream-url", &upstream, "--max-message-bytes", "4096"]);
        let post = |session: Option<&str>, message: Value| {
            let mut headers = vec![
                "Content-Type: application/json".to_owned(),
                "Accept: application/json, text/event-stream".to_owned(),
            ];
            headers.extend(session.map(|s| format!("Mcp-Session-Id: {s}")));
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            common::http(&sidecar.addr, "POST", "/mcp", &headers, message.to_string().as_bytes())
        };
        let init = post(
            None,
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}),
        );
        assert_eq!(init.status, 200, "{}", init.body);
        let sid = init.header("mcp-session-id").expect("a session").to_owned();
        assert_eq!(
            post(Some(&sid), json!({"jsonrpc":"2.0","method":"notifications/initialized"})).status,
            202
        );
        let call = post(
            Some(&sid),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"through"}}}),
        );
        let answer = call.messages().into_iter().find(|m| m["id"] == 1).expect("the call's answer");
        assert_eq!(tool_text(&answer), "through", "{answer}");
        // An answer over the cap ends its call with an error saying so; the session goes on.
        let call = |id: u64, bytes: usize| {
            let message = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"big","arguments":{"bytes":bytes}}});
            let answer = post(Some(&sid), message);
            answer.messages().into_iter().find(|m| m["id"] == id).expect("an answer")
        };
        let over = call(2, 10_000);
        assert_eq!(over["error"]["code"], -32603, "{over}");
        let why = over["error"]["message"].as_str().unwrap_or_default();
        assert!(why.contains("upstream's response is") && why.contains("4096"), "{over}");
        assert_eq!(tool_text(&call(3, 100)).len(), 100);
        let header = format!("Mcp-Session-Id: {sid}");
        let deleted = common::http(&sidecar.addr, "DELETE", "/mcp", &[header.as_str()], b"");
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        sidecar
    });
    let sidecar = client.await.unwrap();
    let call = ctl.wait_for("the call", |h| h.rpc_method.as_deref() == Some("tools/call")).await;
    let session = call.session.expect("the call carried the upstream session");
    let ended = ctl.wait_for("the session's DELETE", |h| h.method == "DELETE").await;
    assert_eq!(ended.session.as_deref(), Some(session.as_str()));
    drop(sidecar);
}

#[tokio::test]
async fn refusals_json_bodies_batches_and_http_errors() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (addr, seen) = responder(oauth_server).await;
    let mut s = Session::connect(&format!("http://{addr}/mcp"), |_| {});

    // 401: an error answering the request, with what the client's OAuth flow needs.
    s.send(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await;
    let refused = s.response(json!(1)).await;
    assert_eq!(refused["error"]["code"], -32001, "{refused}");
    assert_eq!(refused["error"]["message"], "the upstream refused the request: HTTP 401 Unauthorized");
    assert_eq!(refused["error"]["data"], json!({"status": 401, "www_authenticate": METADATA}));

    // The client's Authorization is passed unchanged; a pretty JSON body becomes one compact line
    // with its values byte for byte.
    s.handle.set_authorization(Some(HeaderValue::from_static("Bearer good")));
    s.send(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"})).await;
    let answer = s.response(json!(2)).await;
    assert_eq!(answer["result"]["text"], "a\nb");
    let raw = s.raw.iter().find(|l| l.contains(r#""id":2"#)).unwrap();
    assert_eq!(raw, r#"{"jsonrpc":"2.0","id":2,"result":{"text":"a\nb","n":1.50e1}}"#);
    assert_eq!(seen.lock().unwrap().last().unwrap().header("authorization"), Some("Bearer good"));

    // A batch: each element its own line.
    s.send(json!({"jsonrpc":"2.0","id":3,"method":"batch/please"})).await;
    s.response(json!(3)).await;
    s.expect("the batch's notification", |v| v["method"] == "notifications/message").await;

    // A notification answered 202: nothing comes back.
    s.send(json!({"jsonrpc":"2.0","method":"notifications/roots/list_changed"})).await;

    // 500: an error naming the status.
    s.send(json!({"jsonrpc":"2.0","id":4,"method":"fail/please"})).await;
    let failed = s.response(json!(4)).await;
    assert_eq!(failed["error"]["code"], -32000, "{failed}");
    assert_eq!(failed["error"]["message"], "the upstream answered HTTP 500 Internal Server Error");
    assert_eq!(failed["error"]["data"]["status"], 500);
    assert_eq!(failed["error"]["data"]["body"], "boom");

    // A line split across writes is still one message.
    s.send_raw(br#"{"jsonrpc":"2.0","id":5,"#).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.send_raw(b"\"method\":\"tools/list\"}\n").await;
    s.response(json!(5)).await;

    // No session was given: closing sends no DELETE.
    s.close().await;
    assert!(s.stash.is_empty(), "unexpected lines: {:#?}", s.stash);
    let requests = seen.lock().unwrap().clone();
    assert!(requests.iter().all(|r| r.method == "POST"), "{requests:#?}");
    assert_eq!(requests.len(), 6);
    for r in &requests {
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("accept"), Some("application/json, text/event-stream"));
    }

    // Header values never reach the logs.
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("POST to the upstream"), "debug logs were captured: {logs}");
    assert!(!logs.contains("Bearer good"), "the Authorization value was logged: {logs}");
    assert!(!logs.contains("resource_metadata"), "a header value was logged: {logs}");
}

#[tokio::test]
async fn a_dead_port_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut s =
        Session::connect(&format!("http://{addr}/mcp"), |o| o.request_timeout = Duration::from_secs(5));
    let started = Instant::now();
    s.send(json!({"jsonrpc":"2.0","id":"a","method":"initialize","params":{}})).await;
    let failed = s.response(json!("a")).await;
    let took = started.elapsed();
    assert_eq!(failed["error"]["code"], -32000, "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("the upstream could not be reached: "), "{message}");
    // Three retries, after 100, 200 and 400 ms.
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(4), "{took:?}");
    s.close().await;
    assert!(s.stash.is_empty(), "unexpected lines: {:#?}", s.stash);
}

#[tokio::test]
async fn https_speaks_tls_offering_h2_and_http1() {
    // A listener that reads the client's first flight and hangs up: enough to see TLS and ALPN.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut hellos) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let _ = tx.send(buf[..n].to_vec());
        }
    });
    let mut s = Session::connect(&format!("https://localhost:{}/mcp", addr.port()), |_| {});
    s.send(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{}})).await;
    let failed = s.response(json!(1)).await;
    assert_eq!(failed["error"]["code"], -32000, "{failed}");
    let hello = hellos.recv().await.unwrap();
    assert_eq!(&hello[..2], &[0x16, 0x03], "a TLS handshake record");
    assert!(memchr::memmem::find(&hello, b"localhost").is_some(), "SNI names the host");
    assert!(memchr::memmem::find(&hello, b"\x02h2").is_some(), "ALPN offers h2");
    assert!(memchr::memmem::find(&hello, b"\x08http/1.1").is_some(), "ALPN offers http/1.1");
    s.close().await;
}
