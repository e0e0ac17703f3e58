//! Durable tasks through the built binary: a wrapper killed with `kill -9` in the middle of a Notion
//! task (the simulator runs over HTTP so it outlives the proxy), a sidecar restarted on the same port,
//! two sidecars on one Redis, and the admin command.

mod common;

use common::{BIN, Peer, Served, fresh_dir, http};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TASK_CLIENT: &str = r#"{"tasks":{"list":{},"cancel":{}}}"#;

fn notion_sim(work_ms: &str) -> Served {
    Served::start(&[
        "notion-sim",
        "--log-level",
        "error",
        "--http",
        "{addr}",
        "--work-ms",
        work_ms,
        "--suggested-backoff-ms",
        "200",
        "--rate-limit",
        "0",
    ])
}

/// A stdio wrapper in front of the simulator, with its data directory (the default file store).
fn wrapper(sim: &Served, data: &std::path::Path) -> Peer {
    let mut p = Peer::start_cmd(
        Command::new(BIN)
            .args(["--log-level", "warn", "--upstream-url", &sim.url])
            .env("MCP_ASYNCIFY_DATA_DIR", data),
    );
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    p
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a Notion task through a wrapper on `data`'s store and, once Notion's task id is bound (the
/// status names it), kills the wrapper without a chance to react. Returns the task's id.
fn start_notion_task_then_kill_the_wrapper(sim: &Served, data: &std::path::Path) -> String {
    let mut p = wrapper(sim, data);
    let r = p.ok(
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let task = r["task"]["taskId"].as_str().unwrap().to_owned();
    let mut n = 2;
    wait_until("the Notion task to start", || {
        n += 1;
        let t = p.ok(n, "tasks/get", json!({"taskId": task}));
        t["statusMessage"].as_str().is_some_and(|m| m.starts_with("Notion task"))
    });
    let _ = p.child.kill();
    let _ = p.child.wait();
    task
}

#[test]
fn a_wrapper_killed_mid_notion_task_loses_nothing() {
    let sim = notion_sim("2500");
    let data = fresh_dir("e2e-data");
    let task = start_notion_task_then_kill_the_wrapper(&sim, &data);

    // A new wrapper on the same store, a new client: the task is there, resumes, and completes.
    let mut q = wrapper(&sim, &data);
    let listed = q.ok(1, "tasks/list", json!({}));
    assert!(listed["tasks"].as_array().unwrap().iter().any(|t| t["taskId"] == task.as_str()), "{listed}");
    let r = q.ok(2, "tasks/result", json!({"taskId": task}));
    let page = r
        .get("structuredContent")
        .cloned()
        .unwrap_or_else(|| serde_json::from_str(common::text_of(&r)).unwrap());
    assert_eq!(page["page"]["duplicated_from"], "roadmap", "{r}");
    let t = q.ok(3, "tasks/get", json!({"taskId": task}));
    assert_eq!(t["status"], "completed");
    q.close_stdin();
    assert!(q.wait_exit(Duration::from_secs(15)).success(), "{}", q.stderr());
}

#[test]
fn a_notion_task_resumes_for_a_2026_07_28_client_that_only_polls() {
    let sim = notion_sim("2500");
    let data = fresh_dir("e2e-data-modern");
    let task = start_notion_task_then_kill_the_wrapper(&sim, &data);

    // The new wrapper's only client speaks 2026-07-28 and only asks tasks/get: no handshake ever
    // reaches the upstream, yet the task resumes and completes.
    let mut q = Peer::start_cmd(
        Command::new(BIN)
            .args(["--log-level", "warn", "--upstream-url", &sim.url])
            .env("MCP_ASYNCIFY_DATA_DIR", &data),
    );
    let mut n = 0;
    let mut last = Value::Null;
    wait_until("the recovered task to complete", || {
        n += 1;
        last = q.ok(n, "tasks/get", modern(json!({"taskId": task})));
        last["status"] != "working"
    });
    assert_eq!(last["status"], "completed", "{last}");
    q.close_stdin();
    assert!(q.wait_exit(Duration::from_secs(15)).success(), "{}", q.stderr());
}

#[test]
fn a_call_that_died_with_the_wrapper_fails_saying_so() {
    let data = fresh_dir("e2e-local");
    let start = |data: &std::path::Path| {
        let mut p = Peer::start_cmd(
            Command::new(BIN)
                .args(["--log-level", "warn", "--", BIN, "test-server"])
                .env("MCP_ASYNCIFY_DATA_DIR", data),
        );
        p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
        p
    };
    let mut p = start(&data);
    let r = p.ok(1, "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}, "task": {}}));
    let task = r["task"]["taskId"].as_str().unwrap().to_owned();
    let _ = p.child.kill();
    let _ = p.child.wait();
    let mut q = start(&data);
    let t = q.ok(1, "tasks/get", json!({"taskId": task}));
    assert_eq!(t["status"], "failed", "{t}");
    let msg = t["statusMessage"].as_str().unwrap();
    assert!(msg.contains("stopped (crash or restart)") && msg.contains("'slow'"), "{msg}");
    let r = q.call(2, "tasks/result", json!({"taskId": task}));
    assert!(r["error"]["message"].as_str().unwrap().contains("died with it"), "{r}");
    q.close_stdin();
    assert!(q.wait_exit(Duration::from_secs(15)).success(), "{}", q.stderr());
    // The same store with --stdio-owner process: the user's tasks are not this process's.
    let mut other = Peer::start_cmd(
        Command::new(BIN)
            .args(["--log-level", "warn", "--stdio-owner", "process", "--", BIN, "test-server"])
            .env("MCP_ASYNCIFY_DATA_DIR", &data),
    );
    other.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    let r = other.call(1, "tasks/get", json!({"taskId": task}));
    assert!(r["error"].is_object(), "{r}");
    other.close_stdin();
    assert!(other.wait_exit(Duration::from_secs(15)).success(), "{}", other.stderr());
    // The admin command shows it, with the owner as a hash only.
    let file = std::fs::read_dir(data.join("tasks")).unwrap().next().unwrap().unwrap().path();
    let out = Command::new(BIN)
        .args(["tasks", "list", "--store", &format!("file:{}", file.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["taskId"], task.as_str());
    assert_eq!(line["owner"].as_str().unwrap().len(), 16);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&std::env::var("USER").unwrap_or("root".into())));
}

/// A sidecar with `args`, on `addr` (or a fresh one).
fn sidecar(addr: Option<&str>, upstream: &str, store: &str) -> (Child, String) {
    let addr = addr.map(str::to_owned).unwrap_or_else(common::free_addr);
    let mut cmd = Command::new(BIN);
    common::isolate(&mut cmd);
    let child = cmd
        .args([
            "--log-level",
            "warn",
            "--profile",
            "notion",
            "serve",
            "--listen",
            &addr,
            "--upstream-url",
            upstream,
        ])
        .args(["--store", store])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the sidecar did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

/// A 2025-11-25 session over HTTP with a bearer credential.
struct HttpClient {
    addr: String,
    auth: String,
    session: String,
}

impl HttpClient {
    fn open(addr: &str, token: &str) -> HttpClient {
        let auth = format!("Authorization: Bearer {token}");
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": serde_json::from_str::<Value>(TASK_CLIENT).unwrap(),
            "clientInfo": {"name": "t", "version": "1"}}});
        let r = http(addr, "POST", "/mcp", &HttpClient::headers(&auth, None), init.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", r.body);
        let session = r.header("mcp-session-id").expect("a session").to_owned();
        let c = HttpClient { addr: addr.into(), auth, session };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        http(
            &c.addr,
            "POST",
            "/mcp",
            &HttpClient::headers(&c.auth, Some(&c.session)),
            note.to_string().as_bytes(),
        );
        c
    }

    fn headers<'a>(auth: &'a str, session: Option<&'a str>) -> Vec<&'a str> {
        let mut h =
            vec!["Content-Type: application/json", "Accept: application/json, text/event-stream", auth];
        if let Some(s) = session {
            h.push(s);
        }
        h
    }

    fn call(&self, id: u64, method: &str, params: Value) -> Value {
        let session = format!("Mcp-Session-Id: {}", self.session);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let r = http(
            &self.addr,
            "POST",
            "/mcp",
            &HttpClient::headers(&self.auth, Some(&session)),
            msg.to_string().as_bytes(),
        );
        r.messages()
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no answer to {method}: {} {}", r.status, r.body))
    }
}

#[test]
fn a_sidecar_restarted_on_its_port_serves_the_same_credentials_tasks() {
    let sim = notion_sim("2500");
    let dir = fresh_dir("e2e-sidecar");
    let store = format!("file:{}", dir.join("tasks.redb").display());
    let (mut first, addr) = sidecar(None, &sim.url, &store);
    let c = HttpClient::open(&addr, "token-1");
    let r = c.call(
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let task = r["result"]["task"]["taskId"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    let mut n = 2;
    wait_until("the Notion task to start", || {
        n += 1;
        let t = c.call(n, "tasks/get", json!({"taskId": task}));
        t["result"]["statusMessage"].as_str().is_some_and(|m| m.starts_with("Notion task"))
    });
    let _ = first.kill();
    let _ = first.wait();
    let (mut second, _) = sidecar(Some(&addr), &sim.url, &store);
    let c = HttpClient::open(&addr, "token-1");
    let r = c.call(1, "tasks/result", json!({"taskId": task}));
    assert!(
        r["result"]["structuredContent"]["page"]["duplicated_from"] == "roadmap"
            || r.to_string().contains("roadmap"),
        "{r}"
    );
    let stranger = HttpClient::open(&addr, "token-2");
    let r = stranger.call(1, "tasks/get", json!({"taskId": task}));
    assert!(r["error"].is_object(), "another credential sees nothing: {r}");
    let _ = second.kill();
    let _ = second.wait();
}

#[test]
fn two_sidecars_on_one_redis_share_tasks_waits_and_cancels() {
    let mut redis = RedisServer::start();
    let store = redis.url.clone();
    let sim = notion_sim("1500");
    let (mut a, addr_a) = sidecar(None, &sim.url, &store);
    let (mut b, addr_b) = sidecar(None, &sim.url, &store);
    let on_a = HttpClient::open(&addr_a, "shared-token");
    let on_b = HttpClient::open(&addr_b, "shared-token");
    // Created on A, read at once and waited for on B.
    let r = on_a.call(
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let task = r["result"]["task"]["taskId"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    let t = on_b.call(2, "tasks/get", json!({"taskId": task}));
    assert_eq!(t["result"]["status"], "working", "{t}");
    let r = on_b.call(3, "tasks/result", json!({"taskId": task}));
    assert!(r.to_string().contains("roadmap"), "{r}");
    // Cancelled on B, seen cancelled on A.
    let r = on_a.call(
        4,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let second = r["result"]["task"]["taskId"].as_str().unwrap().to_owned();
    let c = on_b.call(5, "tasks/cancel", json!({"taskId": second}));
    assert_eq!(c["result"]["status"], "cancelled", "{c}");
    let t = on_a.call(6, "tasks/get", json!({"taskId": second}));
    assert_eq!(t["result"]["status"], "cancelled", "{t}");
    // Both report the store healthy.
    let h = http(&addr_a, "GET", "/healthz", &[], b"");
    assert!(h.status == 200 && h.body.trim() == "ok", "{}", h.body);
    // Redis gone: /healthz says so, new tasks are refused clearly, plain calls still flow.
    redis.kill();
    let r = on_a.call(
        7,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "y"}, "task": {}}),
    );
    let msg = r["error"]["message"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(msg.contains("task store is unavailable"), "{msg}");
    let r = on_a.call(8, "tools/call", json!({"name": "notion-search", "arguments": {"query": "Road"}}));
    assert!(r["result"].is_object(), "a plain call flows without the store: {r}");
    let h = http(&addr_a, "GET", "/healthz", &[], b"");
    assert_eq!(h.status, 503, "{}", h.body);
    assert!(h.body.contains("redis://127.0.0.1") && h.body.contains("unavailable"), "{}", h.body);
    for s in [&mut a, &mut b] {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// `tests/node/native-tasks-server.mjs --http PORT` on `addr` (a 2025-11-25 upstream that runs its
/// tool as a task of its own, declaring neither `tasks.list` nor `tasks.cancel`; over HTTP its tasks
/// outlive the proxy in front of it). Killed on drop.
struct NativeUpstream(Child);

impl NativeUpstream {
    fn start(addr: &str) -> NativeUpstream {
        common::ensure_node_packages(&["sdk"], "the native-task upstream runs on the TypeScript SDK");
        let port = addr.rsplit(':').next().unwrap();
        let child = Command::new("node")
            .arg(common::node_dir().join("native-tasks-server.mjs"))
            .args(["--http", port])
            .stdin(Stdio::null())
            .spawn()
            .expect("start node");
        wait_until("the native-task upstream to listen", || std::net::TcpStream::connect(addr).is_ok());
        NativeUpstream(child)
    }
}

impl Drop for NativeUpstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stdio wrapper in front of an HTTP upstream, on the default file store of `data`.
fn wrapper_of(url: &str, data: &std::path::Path, extra: &[&str]) -> Peer {
    let mut p = Peer::start_cmd(
        Command::new(BIN)
            .args(["--log-level", "warn", "--upstream-url", url])
            .args(extra)
            .env("MCP_ASYNCIFY_DATA_DIR", data),
    );
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    p
}

#[test]
fn an_upstreams_own_task_is_found_again_by_a_restarted_wrapper() {
    let addr = common::free_addr();
    let url = format!("http://{addr}/mcp");
    let upstream = NativeUpstream::start(&addr);
    let data = fresh_dir("e2e-native");
    let mut p = wrapper_of(&url, &data, &[]);
    p.ok(1, "tools/list", json!({}));
    let created =
        p.ok(2, "tools/call", json!({"name": "brew", "arguments": {"ms": 2000, "text": "tea"}, "task": {}}));
    let task = created["task"]["taskId"].as_str().expect("the upstream's CreateTaskResult").to_owned();
    // Killed at once, as soon as the client has its task.
    let _ = p.child.kill();
    let _ = p.child.wait();

    // A new wrapper on the same store and a new client: the upstream's task by the same id.
    let mut q = wrapper_of(&url, &data, &[]);
    let listed = q.ok(1, "tasks/list", json!({}));
    let tasks = listed["tasks"].as_array().unwrap();
    assert!(
        tasks.iter().any(|t| t["taskId"] == task.as_str() && t["status"] == "working"),
        "the upstream's task, as the upstream tells it now: {listed}"
    );
    let t = q.ok(2, "tasks/get", json!({"taskId": task}));
    assert_eq!(t["taskId"], task.as_str(), "{t}");
    // Still the upstream's: not cancelled behind its back (it declares no tasks.cancel).
    let cancel = q.call(3, "tasks/cancel", json!({"taskId": task}));
    assert_eq!(cancel["error"]["code"], -32602, "{cancel}");
    let done = q.ok(4, "tasks/result", json!({"taskId": task}));
    assert_eq!(done["content"][0]["text"], "tea", "{done}");

    q.close_stdin();
    assert!(q.wait_exit(Duration::from_secs(15)).success(), "{}", q.stderr());

    // Another owner on the same store (a wrapper with --stdio-owner process) does not reach it,
    // although the upstream would answer anyone.
    let mut other = wrapper_of(&url, &data, &["--stdio-owner", "process"]);
    for (n, method) in [(1, "tasks/get"), (2, "tasks/result")] {
        let r = other.call(n, method, json!({"taskId": task}));
        assert_eq!(r["error"]["code"], -32602, "{method} of another owner's task: {r}");
    }
    other.close_stdin();
    assert!(other.wait_exit(Duration::from_secs(15)).success(), "{}", other.stderr());

    // The store only routes to it: an operator cannot cancel it there.
    let file = std::fs::read_dir(data.join("tasks")).unwrap().next().unwrap().unwrap().path();
    let store = format!("file:{}", file.display());
    let out = Command::new(BIN).args(["tasks", "cancel", &task, "--store", &store]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run by the upstream server itself"));

    // The upstream restarts and forgets its tasks: the record goes when the upstream says so.
    drop(upstream);
    let _upstream = NativeUpstream::start(&addr);
    let mut r = wrapper_of(&url, &data, &[]);
    let gone = r.call(1, "tasks/get", json!({"taskId": task}));
    assert_eq!(gone["error"]["code"], -32602, "{gone}");
    r.close_stdin();
    assert!(r.wait_exit(Duration::from_secs(15)).success(), "{}", r.stderr());
    let out = Command::new(BIN).args(["tasks", "list", "--store", &store]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&task), "the record is gone");
}

/// `params` of a 2026-07-28 request that declares the Tasks extension.
fn modern(mut params: Value) -> Value {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "e2e", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
    });
    params
}

#[test]
fn an_upstreams_own_task_is_found_again_by_a_restarted_wrapper_for_a_2026_07_28_client() {
    let addr = common::free_addr();
    let url = format!("http://{addr}/mcp");
    let _upstream = NativeUpstream::start(&addr);
    let data = fresh_dir("e2e-native-modern");
    // A 2026-07-28 client has no handshake: the proxy initializes the upstream itself.
    let start = || {
        Peer::start_cmd(
            Command::new(BIN)
                .args(["--log-level", "warn", "--upstream-url", &url])
                .env("MCP_ASYNCIFY_DATA_DIR", &data),
        )
    };
    let mut p = start();
    let created =
        p.ok(1, "tools/call", modern(json!({"name": "brew", "arguments": {"ms": 1500, "text": "tea"}})));
    assert_eq!(created["resultType"], "task", "the upstream's task, offered as the extension's: {created}");
    let task = created["taskId"].as_str().unwrap().to_owned();
    let _ = p.child.kill();
    let _ = p.child.wait();

    // A new wrapper, whose first request is the tasks/get: the id is the upstream's task's.
    let mut q = start();
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = (2..)
        .map(|n| {
            let t = q.ok(n, "tasks/get", modern(json!({"taskId": task})));
            assert_eq!(t["taskId"], task.as_str(), "{t}");
            assert!(Instant::now() < deadline, "never ended: {t}");
            std::thread::sleep(Duration::from_millis(100));
            t
        })
        .find(|t| t["status"] != "working")
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["content"][0]["text"], "tea", "the result inline: {done}");
    q.close_stdin();
    assert!(q.wait_exit(Duration::from_secs(15)).success(), "{}", q.stderr());
}

/// A redis-server on a free port, for one test; killed on drop.
struct RedisServer {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
}

impl RedisServer {
    fn start() -> RedisServer {
        let dir = fresh_dir("e2e-redis");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is needed (apt-get install redis-server)");
        wait_until("redis", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        RedisServer { child, url: format!("redis://127.0.0.1:{port}/0"), dir }
    }

    /// The server gone, as a crash would leave it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops (`STOP`) or resumes (`CONT`) the server process: a store that does not answer.
    fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{sig} redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Resumed if a test stopped it (it may already be gone: nothing to report then).
        let _ =
            Command::new("kill").args(["-CONT", &self.child.id().to_string()]).stderr(Stdio::null()).status();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_task_create_waiting_on_the_store_does_not_hold_up_the_clients_next_calls() {
    let redis = RedisServer::start();
    let mut p = Peer::start(&["--log-level", "warn", "--store", &redis.url, "--", BIN, "test-server"]);
    p.initialize(json!({"tasks": {}}));
    redis.signal("STOP");
    // The task's create waits on the stopped store; the plain call sent after it must not.
    p.request(2, "tools/call", json!({"name": "slow", "arguments": {"ms": 10}, "task": {}}));
    p.request(3, "tools/call", json!({"name": "echo", "arguments": {"text": "not queued"}}));
    let first = p.next_matching("an answer", |v| v.get("id").is_some());
    assert_eq!(first["id"], 3, "the plain call is answered first: {first}");
    assert_eq!(first["result"]["content"][0]["text"], "not queued", "{first}");
    redis.signal("CONT");
    let created = p.response(2);
    assert!(
        created["result"]["task"]["taskId"].is_string(),
        "the task is created once the store answers: {created}"
    );
}
