//! The rmcp 3.x client (crates.io `rmcp` =3.11.0, renamed `rmcp3`: MCP 2026-07-28, the Tasks
//! extension, multi round-trip requests) through the built binary in front of the 2025-11-25 fixture
//! (`test-server`), over stdio (the client spawns the wrapper) and over HTTP (the sidecar): the era it
//! negotiates, the tool list, an inline call, a task polled to its result, a cancelled task, and a
//! question answered through MRTR rounds. And the modern upstream fixture
//! (`examples/modern_upstream.rs`): driven directly, so what it claims to speak stays true, and
//! behind the wrapper (`--upstream-protocol`), its own tasks and rounds reaching the client.
//!
//! rmcp 3's `serve()` still opens with `initialize`; only `serve_with_lifecycle(Auto | Discover)`
//! probes `server/discover`.
//!
//! `RMCP3_PROXY_LOG=debug cargo test --test rmcp3_client` shows the proxy's log (its stderr is
//! inherited).

mod common;

use common::{BIN, WAIT, free_addr};
use rmcp3::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ClientCapabilities,
    ClientConfig, ElicitRequestParams, ElicitResult, ElicitationAction, GetTaskParams, GetTaskResult,
    Implementation, ProtocolVersion, TaskPayload, TaskStatus,
};
use rmcp3::service::{RequestContext, RunningService};
use rmcp3::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp3::{ClientHandler, ClientLifecycleMode, ClientServiceExt, ErrorData, RoleClient, ServiceExt};
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// The path of an example built beside this test: target/<profile>/examples/<name>, from
/// target/<profile>/deps/<this test>. A plain `cargo test` builds the examples, but
/// `cargo test --test rmcp3_client` does not, so it is built here (once per run; a no-op when fresh).
fn example_bin(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    const SET_BY_CARGO_TEST: &[&str] = &[
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_BIN_",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let target_dir = profile_dir.parent().expect("target/");
    let path = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--example", name, "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        // What `cargo test` sets for the tests it runs would reach build scripts that watch it (ring
        // reruns on CARGO_MANIFEST_DIR) and make the next build from a shell rebuild the world.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if SET_BY_CARGO_TEST.iter().any(|p| key.starts_with(p)) {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo.status().expect("run cargo");
        assert!(status.success(), "cargo build --example {name}: {status}");
        built.push(name.to_owned());
    }
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The proxy's log level (`RMCP3_PROXY_LOG`, default warn).
fn log_level() -> String {
    std::env::var("RMCP3_PROXY_LOG").unwrap_or_else(|_| "warn".into())
}

/// An rmcp 3 client that declares the Tasks extension and elicitation, and answers every question.
#[derive(Clone, Default)]
struct Client {
    asked: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::builder().enable_elicitation().enable_tasks().build(),
            Implementation::new("rmcp3-e2e", "1"),
        )
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        let v = serde_json::to_value(&request).unwrap();
        self.asked.lock().unwrap().push(v["message"].as_str().unwrap_or_default().to_owned());
        let mut r = ElicitResult::new(ElicitationAction::Accept);
        r.content = Some(json!({"answer": "from rmcp3"}));
        Ok(r)
    }
}

type Service = RunningService<RoleClient, Client>;

/// Probe `server/discover`, fall back to `initialize` (what a dual-era rmcp 3 client does).
fn auto() -> ClientLifecycleMode {
    ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: None,
    }
}

/// The wrapper in front of `upstream`, spawned by the client (its stderr inherited).
fn wrapper(upstream: &[&str]) -> TokioChildProcess {
    let mut cmd = Command::new(BIN);
    // A data directory of its own, never the real user's.
    cmd.env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"));
    cmd.args(["--log-level", &log_level(), "--"]).args(upstream);
    let (transport, _) =
        TokioChildProcess::builder(cmd).stderr(Stdio::inherit()).spawn().expect("spawn the proxy");
    transport
}

/// The sidecar in front of the fixture on a free 127.0.0.1 port; killed on drop.
struct Sidecar {
    child: Child,
    url: String,
}

impl Sidecar {
    fn start() -> Sidecar {
        let addr = free_addr();
        let child = std::process::Command::new(BIN)
            .env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"))
            .args(["serve", "--listen", &addr, "--log-level", &log_level(), "--", BIN, "test-server"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the sidecar");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "the sidecar did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sidecar { child, url: format!("http://{addr}/mcp") }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

fn call(name: &str, a: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(name.to_owned()).with_arguments(args(a))
}

fn text(r: &CallToolResult) -> String {
    let v = serde_json::to_value(r).unwrap();
    v["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {v}")).to_owned()
}

/// The negotiated protocol version.
fn era(service: &Service) -> String {
    service.peer().peer_info().expect("the server's info").protocol_version.to_string()
}

/// A `tools/call` that must become a task: its id.
async fn start_task(service: &Service, params: CallToolRequestParams) -> String {
    match service.call_tool_once(params).await.expect("tools/call") {
        CallToolResponse::Task(created) => {
            assert_eq!(created.task.status, TaskStatus::Working, "{created:?}");
            assert!(created.task.poll_interval_ms.is_some_and(|p| p > 0), "{created:?}");
            created.task.task_id
        }
        other => panic!("expected a CreateTaskResult, got {other:?}"),
    }
}

/// Polls `tasks/get` until the task is terminal.
async fn until_terminal(service: &Service, task_id: &str) -> GetTaskResult {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = service.peer().get_task(GetTaskParams::new(task_id)).await.expect("tasks/get");
        if got.task.status().is_terminal() {
            return got;
        }
        assert!(Instant::now() < deadline, "task {task_id} never ended: {got:?}");
        let wait = got.task.task.poll_interval_ms.unwrap_or(100).clamp(20, 500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// The CallToolResult of a completed task.
fn completed(got: &GetTaskResult) -> CallToolResult {
    match &got.task.payload {
        TaskPayload::Completed { result } => serde_json::from_value(Value::Object(result.clone())).unwrap(),
        other => panic!("expected a completed task, got {other:?}"),
    }
}

/// The stories, on any transport, through the proxy in front of the 2025-11-25 fixture.
async fn stories(service: &Service, client: &Client) {
    assert_eq!(era(service), "2026-07-28", "rmcp 3 with Auto discovers the proxy's modern face");
    let info = service.peer().peer_info().unwrap();
    assert!(info.capabilities.supports_tasks(), "the proxy declares the Tasks extension: {info:?}");

    let tools = service.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert!(names.contains(&"echo") && names.contains(&"slow"), "{names:?}");

    // A fast call answers inline, even though the client declares the extension.
    match service.call_tool_once(call("echo", json!({"text": "hi"}))).await.expect("echo") {
        CallToolResponse::Complete(r) => assert_eq!(text(&r), "hi"),
        other => panic!("echo should answer inline, got {other:?}"),
    }

    // A slow call becomes a task; polled to completion, its result is inline in tasks/get.
    let started = Instant::now();
    let id = start_task(service, call("slow", json!({"ms": 3000}))).await;
    assert!(started.elapsed() < Duration::from_millis(2900), "the task came before the work ended");
    let done = until_terminal(service, &id).await;
    assert_eq!(done.task.status(), TaskStatus::Completed, "{done:?}");
    assert_eq!(text(&completed(&done)), "slept 3000 ms");
    assert!(started.elapsed() >= Duration::from_millis(3000));

    // A second one, cancelled: the ack, then `cancelled`.
    let id = start_task(service, call("slow", json!({"ms": 30000}))).await;
    service.peer().cancel_task(CancelTaskParams::new(id.clone())).await.expect("tasks/cancel ack");
    let ended = until_terminal(service, &id).await;
    assert_eq!(ended.task.status(), TaskStatus::Cancelled, "{ended:?}");
    // Cancelling a terminal task is acked again.
    service.peer().cancel_task(CancelTaskParams::new(id)).await.expect("tasks/cancel of a terminal task");

    // The fixture's elicitation reaches the client as an MRTR round, which rmcp 3's call_tool drives.
    let r = service.call_tool(call("ask", json!({"message": "Your name?"}))).await.expect("ask");
    assert_eq!(text(&r), "answer: from rmcp3");
    assert_eq!(client.asked.lock().unwrap().as_slice(), ["Your name?"]);
}

#[tokio::test]
async fn rmcp3_client_through_the_stdio_wrapper() {
    let client = Client::default();
    let service = client
        .clone()
        .serve_with_lifecycle(wrapper(&[BIN, "test-server"]), auto())
        .await
        .expect("connect through the wrapper");
    stories(&service, &client).await;
    service.cancel().await.unwrap();
}

#[tokio::test]
async fn rmcp3_client_through_the_sidecar() {
    let sidecar = Sidecar::start();
    let client = Client::default();
    let service = client
        .clone()
        .serve_with_lifecycle(StreamableHttpClientTransport::from_uri(sidecar.url.as_str()), auto())
        .await
        .expect("connect to the sidecar");
    stories(&service, &client).await;
    service.cancel().await.unwrap();
}

/// The same client, pinned to the 2025-11-25 handshake.
fn legacy_client() -> Client2025 {
    Client2025(Client::default())
}

/// [`Client`] whose `initialize` names 2025-11-25 (rmcp 3's default names 2026-07-28).
#[derive(Clone)]
struct Client2025(Client);

impl ClientHandler for Client2025 {
    fn get_info(&self) -> ClientConfig {
        let mut info = self.0.get_info();
        info.protocol_version = ProtocolVersion::V_2025_11_25;
        info
    }
}

#[tokio::test]
async fn rmcp3_client_with_the_2025_11_25_handshake_stays_legacy() {
    let service = legacy_client().serve(wrapper(&[BIN, "test-server"])).await.expect("initialize");
    assert_eq!(service.peer().peer_info().unwrap().protocol_version, ProtocolVersion::V_2025_11_25);
    let r = service.call_tool(call("echo", json!({"text": "legacy"}))).await.expect("echo");
    assert_eq!(text(&r), "legacy");
    // The extension declared in a 2025-11-25 initialize means nothing: a slow call stays inline.
    match service.call_tool_once(call("slow", json!({"ms": 1500}))).await.expect("slow") {
        CallToolResponse::Complete(r) => assert_eq!(text(&r), "slept 1500 ms"),
        other => panic!("no task for a 2025-11-25 call without params.task: {other:?}"),
    }
    service.cancel().await.unwrap();
}

/// rmcp 3's plain `serve()` sends `initialize` naming 2026-07-28, a version with no handshake. The
/// answer should be a version that has one (2025-11-25: what rmcp 3's own servers answer), and never
/// 2026-07-28 beside the legacy `capabilities.tasks`.
#[tokio::test]
async fn rmcp3_client_with_plain_serve_is_answered_a_handshake_version() {
    let service = Client::default().serve(wrapper(&[BIN, "test-server"])).await.expect("initialize");
    let info = service.peer().peer_info().unwrap();
    assert_eq!(info.protocol_version, ProtocolVersion::V_2025_11_25, "{info:?}");
    service.cancel().await.unwrap();
}

/// The modern upstream fixture, spawned directly.
fn modern_upstream() -> TokioChildProcess {
    let (transport, _) = TokioChildProcess::builder(Command::new(example_bin("modern_upstream")))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn modern_upstream");
    transport
}

#[tokio::test]
async fn the_modern_upstream_fixture_speaks_2026_07_28_with_its_own_tasks() {
    let client = Client::default();
    let service = client.clone().serve_with_lifecycle(modern_upstream(), auto()).await.expect("discover");
    assert_eq!(era(&service), "2026-07-28");
    assert!(service.peer().peer_info().unwrap().capabilities.supports_tasks());
    let names: Vec<String> =
        service.list_all_tools().await.unwrap().iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, ["echo", "native_slow", "ask"]);

    match service.call_tool_once(call("echo", json!({"text": "hi"}))).await.unwrap() {
        CallToolResponse::Complete(r) => assert_eq!(text(&r), "hi"),
        other => panic!("{other:?}"),
    }
    // The server's own task, at once.
    let started = Instant::now();
    let id = start_task(&service, call("native_slow", json!({"ms": 400}))).await;
    assert!(started.elapsed() < Duration::from_millis(300));
    let done = until_terminal(&service, &id).await;
    assert_eq!(text(&completed(&done)), "slept 400 ms");
    // Cancelled.
    let id = start_task(&service, call("native_slow", json!({"ms": 60000}))).await;
    service.peer().cancel_task(CancelTaskParams::new(id.clone())).await.unwrap();
    assert_eq!(until_terminal(&service, &id).await.task.status(), TaskStatus::Cancelled);
    // A task that asks: input_required with inputRequests.confirm, answered by tasks/update.
    let id = start_task(&service, call("native_slow", json!({"ms": 10, "question": "Proceed?"}))).await;
    let deadline = Instant::now() + WAIT;
    let requests = loop {
        let got = service.peer().get_task(GetTaskParams::new(id.clone())).await.unwrap();
        if let TaskPayload::InputRequired { input_requests } = got.task.payload {
            break input_requests;
        }
        assert!(Instant::now() < deadline, "never asked: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(requests.keys().collect::<Vec<_>>(), ["confirm"]);
    let answer = json!({"action": "accept", "content": {"answer": "yes"}});
    let update = rmcp3::model::UpdateTaskParams::new(id.clone(), [("confirm".to_owned(), answer)].into());
    service.peer().update_task(update).await.unwrap();
    assert_eq!(text(&completed(&until_terminal(&service, &id).await)), "slept 10 ms, answer: yes");
    // MRTR, driven by call_tool.
    let r = service.call_tool(call("ask", json!({"message": "Name?"}))).await.unwrap();
    assert_eq!(text(&r), "answer: from rmcp3");
    assert_eq!(client.asked.lock().unwrap().as_slice(), ["Name?"]);
    service.cancel().await.unwrap();
}

#[tokio::test]
async fn the_modern_upstream_fixture_also_speaks_2025_11_25() {
    let client = Client::default();
    let service = client.clone().serve(modern_upstream()).await.expect("initialize");
    assert_eq!(era(&service), "2025-11-25");
    // No task under 2025-11-25 even though the client's initialize declared the extension.
    let r = service.call_tool(call("native_slow", json!({"ms": 50}))).await.expect("inline");
    assert_eq!(text(&r), "slept 50 ms");
    // The question is a plain elicitation/create request on the session.
    let r = service.call_tool(call("ask", json!({"message": "Legacy?"}))).await.expect("ask");
    assert_eq!(text(&r), "answer: from rmcp3");
    assert_eq!(client.asked.lock().unwrap().as_slice(), ["Legacy?"]);
    service.cancel().await.unwrap();
}

#[tokio::test]
async fn rmcp3_client_through_the_wrapper_in_front_of_the_modern_upstream() {
    let upstream = example_bin("modern_upstream");
    modern_upstream_stories(&["--upstream-protocol", "auto", "--", upstream.to_str().unwrap()]).await;
}

/// The same over Streamable HTTP: a 2026-07-28 request to the upstream carries the headers that
/// generation requires (`MCP-Protocol-Version` from its `_meta`, `Mcp-Method`, `Mcp-Name`), with no
/// `initialize` before it to learn a version from.
#[tokio::test]
async fn rmcp3_client_through_the_wrapper_in_front_of_the_modern_upstream_over_http() {
    let upstream = example_bin("modern_upstream");
    let addr = free_addr();
    let server = std::process::Command::new(&upstream)
        .args(["--http", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start modern_upstream --http");
    let _server = KillOnDrop(server);
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "modern_upstream did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://{addr}/mcp");
    for protocol in ["modern", "auto"] {
        modern_upstream_stories(&["--upstream-protocol", protocol, "--upstream-url", &url]).await;
    }
}

/// A child process killed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The upstream's own tasks and MRTR rounds reach a 2026-07-28 client untouched, through the wrapper
/// started with `proxy_args`.
async fn modern_upstream_stories(proxy_args: &[&str]) {
    let mut cmd = Command::new(BIN);
    // A data directory of its own, never the real user's.
    cmd.env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"));
    cmd.args(["--log-level", &log_level()]).args(proxy_args);
    let (transport, _) =
        TokioChildProcess::builder(cmd).stderr(Stdio::inherit()).spawn().expect("spawn the proxy");
    let client = Client::default();
    let service = client.clone().serve_with_lifecycle(transport, auto()).await.expect("discover");
    assert_eq!(era(&service), "2026-07-28", "{proxy_args:?}");
    assert_eq!(service.peer().peer_info().unwrap().server_info.as_ref().unwrap().name, "modern-upstream");

    let id = start_task(&service, call("native_slow", json!({"ms": 300}))).await;
    assert_eq!(text(&completed(&until_terminal(&service, &id).await)), "slept 300 ms");
    let id = start_task(&service, call("native_slow", json!({"ms": 60000}))).await;
    service.peer().cancel_task(CancelTaskParams::new(id.clone())).await.expect("tasks/cancel");
    assert_eq!(until_terminal(&service, &id).await.task.status(), TaskStatus::Cancelled);
    let r = service.call_tool(call("ask", json!({"message": "Through?"}))).await.expect("ask");
    assert_eq!(text(&r), "answer: from rmcp3");
    service.cancel().await.unwrap();
}

/// A 2025-11-25 client of the proxy cannot answer an MRTR round: the proxy should ask it the
/// question as a plain `elicitation/create` request and retry the upstream with the answer.
#[test]

fn a_2025_11_25_client_is_asked_a_modern_upstreams_question_as_an_elicitation() {
    let upstream = example_bin("modern_upstream");
    let mut p = common::Peer::start(&[
        "--log-level",
        "warn",
        "--upstream-protocol",
        "modern",
        "--",
        upstream.to_str().unwrap(),
    ]);
    p.initialize(json!({"elicitation": {}}));
    p.request(2, "tools/call", json!({"name": "ask", "arguments": {"message": "Legacy?"}}));
    let asked = p.next_matching("an elicitation/create request, or the call's answer", |v| {
        v.get("method").is_some_and(|m| m == "elicitation/create") || v.get("id") == Some(&json!(2))
    });
    assert_eq!(asked["method"], "elicitation/create", "{asked}");
    let id = asked["id"].clone();
    p.send_json(
        &json!({"jsonrpc": "2.0", "id": id, "result": {"action": "accept", "content": {"answer": "old"}}}),
    );
    let r = p.response(2);
    assert_eq!(common::text_of(&r["result"]), "answer: old", "{r}");
}
