//! End-to-end tests of the MCP 2026-07-28 ("modern") generation with the official TypeScript SDK v2
//! client (`@modelcontextprotocol/client`, automatic era negotiation) and the Tasks extension's
//! requester API (`@modelcontextprotocol/ext-tasks`), both pinned in `tests/node/package.json`.
//!
//! Every scenario of `tests/node/client-v2.mjs` runs over both transports:
//! - stdio: the client spawns `mcp-asyncify --log-level debug [opts] -- mcp-asyncify test-server`;
//! - Streamable HTTP: the client talks to `mcp-asyncify serve --listen 127.0.0.1:PORT` (a sidecar of
//!   its own per test, so no state leaks between tests).
//!
//! client-v2.mjs prints one JSON line of observations (and exits 1 on a failed expectation, saying
//! why on stderr, followed by every JSON-RPC message and HTTP exchange it saw). The tests assert on
//! that JSON; a failure shows the client's stderr and the proxy's debug log. The 2025-11-25 side is
//! covered by tests/typescript_sdk.rs (the v1 SDK client). Needs `node` (20+) and `npm` on PATH;
//! `tests/node/node_modules` is installed with `npm ci` on first use.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{BIN, free_addr};

/// Longest a scenario may run before the test kills it (client-v2.mjs has its own 50 s watchdog).
const SCENARIO_LIMIT: Duration = Duration::from_secs(90);

/// Fails the test with a clear message when node is missing, and installs `tests/node/node_modules`
/// (once per test binary) when the pinned SDK v2 packages are not there.
fn ensure_node_modules() {
    common::ensure_node_packages(
        &["client", "ext-tasks"],
        "these tests drive mcp-asyncify with the official TypeScript MCP SDK v2 client \
         (@modelcontextprotocol/client, @modelcontextprotocol/ext-tasks)",
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Stdio,
    Http,
}

/// A file in the temp dir, unique to this process, test thread and purpose.
fn temp_file(what: &str) -> PathBuf {
    common::scratch()
        .join(format!("modern-{what}-{:?}.log", std::thread::current().id()))
        .to_string_lossy()
        .replace(['(', ')'], "")
        .into()
}

/// `mcp-asyncify serve` with its stderr (the debug log) in a file; killed on drop.
struct Sidecar {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Sidecar {
    fn start(proxy_args: &[&str]) -> Sidecar {
        let addr = free_addr();
        let log = temp_file("sidecar");
        let mut child = Command::new(BIN)
            .env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"))
            .args(["serve", "--listen", &addr, "--log-level", "debug"])
            .args(proxy_args)
            .args(["--", BIN, "test-server"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the sidecar log"))
            .spawn()
            .expect("start the sidecar");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the sidecar exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the sidecar did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(child.try_wait().unwrap().is_none(), "the sidecar exited (is {addr} taken?)");
        Sidecar { child, url: format!("http://{addr}/mcp"), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs one scenario of client-v2.mjs over `transport`, the proxy started with `proxy_args`; returns
/// its JSON observations. Panics (showing the client's stderr, with its wire log, and the proxy's
/// debug log) when it fails.
fn run(scenario: &str, transport: Transport, proxy_args: &[&str]) -> Value {
    ensure_node_modules();
    let sidecar = (transport == Transport::Http).then(|| Sidecar::start(proxy_args));
    let target: Vec<String> = match &sidecar {
        Some(s) => vec![s.url.clone()],
        None => {
            let mut cmd = vec![BIN.to_string(), "--log-level".into(), "debug".into()];
            cmd.extend(proxy_args.iter().map(|a| a.to_string()));
            cmd.extend(["--".into(), BIN.to_string(), "test-server".into()]);
            cmd
        }
    };
    // Files, not pipes: a grandchild that outlives node cannot then block us.
    let stderr_path = temp_file(&format!("{scenario}-stderr"));
    let stdout_path = temp_file(&format!("{scenario}-stdout"));
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg("client-v2.mjs")
        .arg(scenario)
        .args(&target)
        .current_dir(common::node_dir())
        // The client's data dirs for the proxies it starts go under this test run's scratch dir.
        .env("TMPDIR", common::scratch())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("create the stdout file"))
        .stderr(File::create(&stderr_path).expect("create the stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn node (is node installed and on PATH?): {e}"));
    let status = common::wait_with_limit(&mut child, started, SCENARIO_LIMIT);
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stdout_path);
    let _ = std::fs::remove_file(&stderr_path);
    let proxy_log = match &sidecar {
        Some(s) => format!("--- sidecar debug log:\n{}--- end sidecar log\n", s.log()),
        None => String::from("(stdio: the proxy's debug log is in the client's stderr above)\n"),
    };
    let what = format!("client-v2.mjs {scenario} over {transport:?} (proxy args {proxy_args:?})");
    // Shown by the test harness only when the test fails.
    eprintln!(
        "--- {what} ({status:?}, {:?}) stderr:\n{stderr}--- end stderr\n{proxy_log}",
        started.elapsed()
    );
    match status {
        None => panic!("{what} ran over {SCENARIO_LIMIT:?} and was killed\nstderr:\n{stderr}\n{proxy_log}"),
        Some(s) if !s.success() => {
            let reason = stderr.lines().find(|l| l.starts_with("FAIL")).unwrap_or("(no FAIL line)");
            let reason: String = reason.chars().take(4000).collect();
            panic!("{what} failed ({s}):\n{reason}\n(full client stderr, wire log and proxy log above)")
        }
        Some(_) => {}
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{what} printed nothing on stdout\nstderr:\n{stderr}"));
    let obs: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what} printed invalid JSON ({e}): {line}\nstderr:\n{stderr}"));
    let expected = if transport == Transport::Http { "http" } else { "stdio" };
    assert_eq!(obs["transport"], expected, "{what}: ran over the wrong transport");
    obs
}

fn statuses(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Checks per scenario (client-v2.mjs has checked the essentials already; these pin the details).

fn check_negotiate(obs: &Value, transport: Transport) {
    assert_eq!(obs["era"], "modern", "{obs}");
    assert_eq!(obs["protocolVersion"], "2026-07-28", "{obs}");
    assert_eq!(obs["generation"], "v2", "ext-tasks must see the Tasks extension: {obs}");
    assert_eq!(obs["tasksExtension"], json!({}), "{obs}");
    assert!(obs["legacyTasksCapability"].is_null(), "server/discover must not carry legacy tasks: {obs}");
    assert!(statuses(&obs["supportedVersions"]).contains(&"2026-07-28"), "{obs}");
    assert_eq!(obs["serverInfo"]["name"], "asyncify-fixture", "{obs}");
    if transport == Transport::Http {
        assert_eq!(obs["probe"]["status"], 200, "the server/discover probe: {obs}");
        assert_eq!(obs["probe"]["headers"]["mcp-protocol-version"], "2026-07-28", "{obs}");
    }
}

fn check_list(obs: &Value) {
    assert!(obs["toolsListError"].is_null(), "tools/list failed: {obs}");
    let tools = statuses(&obs["tools"]);
    for tool in ["echo", "slow", "ask"] {
        assert!(tools.contains(&tool), "tools/list lacks {tool}: {obs}");
    }
    assert_eq!(obs["requestMeta"]["io.modelcontextprotocol/protocolVersion"], "2026-07-28", "{obs}");
    assert_eq!(obs["resultWithoutTools"]["resultType"], "complete", "{obs}");
}

fn check_fast(obs: &Value) {
    assert_eq!(obs["kind"], "immediate", "{obs}");
    assert_eq!(obs["text"], "hello modern", "{obs}");
    assert_eq!(obs["wireResultType"], "complete", "{obs}");
    assert!(obs["wireTaskId"].is_null(), "{obs}");
    assert_eq!(obs["declaredExtension"], json!({}), "ext-tasks declares the extension per request: {obs}");
    assert_eq!(obs["tasksGets"], 0, "{obs}");
    assert_eq!(obs["sdkCallTool"]["text"], "plain sdk", "{obs}");
    assert!(obs["elapsedMs"].as_u64().unwrap() < 1000, "echo took the task window: {obs}");
}

fn check_task(obs: &Value, transport: Transport) {
    assert_eq!(obs["kind"], "task", "{obs}");
    let created = &obs["created"];
    assert_eq!(created["resultType"], "task", "{obs}");
    assert_eq!(created["taskId"], obs["taskId"], "{obs}");
    assert_eq!(created["status"], "working", "{obs}");
    assert!(created["ttlMs"].is_u64() && created["pollIntervalMs"].is_u64(), "{obs}");
    assert!(created.get("task").is_none() && created.get("ttl").is_none(), "flat v2 fields only: {obs}");
    // Became a task after the 1 s window, not at once and not at the end.
    let after = obs["answeredAfterMs"].as_u64().unwrap();
    assert!((900..2900).contains(&after), "CreateTaskResult after {after} ms: {obs}");
    assert_eq!(statuses(&obs["polledStatuses"]).last(), Some(&"completed"), "{obs}");
    assert_eq!(statuses(&obs["statuses"]).last(), Some(&"completed"), "{obs}");
    assert_eq!(obs["outcome"], "completed", "{obs}");
    assert_eq!(obs["text"], "slow done", "{obs}");
    assert_eq!(obs["lastGetResult"]["resultType"], "complete", "{obs}");
    assert!(obs["backgroundErrors"].as_array().unwrap().is_empty(), "{obs}");
    if transport == Transport::Http {
        let h = &obs["tasksGetHeaders"];
        assert_eq!(h["mcp-method"], "tasks/get", "{obs}");
        assert_eq!(h["mcp-name"], obs["taskId"], "{obs}");
        assert_eq!(h["status"], 200, "{obs}");
    }
}

fn check_cancel(obs: &Value, transport: Transport) {
    assert_eq!(obs["kind"], "task", "{obs}");
    assert!(obs["cancelError"].is_null(), "{obs}");
    assert_eq!(obs["cancelResponse"]["result"], json!({"resultType": "complete"}), "{obs}");
    assert_eq!(obs["outcome"], "cancelled", "{obs}");
    assert_eq!(obs["snapshotStatus"], "cancelled", "{obs}");
    let before = obs["upstreamCancellationsBefore"].as_u64().unwrap();
    let after = obs["upstreamCancellationsAfter"].as_u64().unwrap();
    assert!(after > before, "the upstream call was not cancelled: {obs}");
    if transport == Transport::Http {
        let h = &obs["tasksCancelHeaders"];
        assert_eq!(h["mcp-method"], "tasks/cancel", "{obs}");
        assert_eq!(h["mcp-name"], obs["taskId"], "{obs}");
    }
}

fn check_ask_answered(ask: &Value) {
    assert!(
        ask["serverRequests"].as_array().unwrap().is_empty(),
        "a server request reached the client: {ask}"
    );
    assert_eq!(ask["handled"].as_array().unwrap().len(), 1, "{ask}");
    assert_eq!(ask["handled"][0]["kind"], "elicitation", "{ask}");
    assert_eq!(ask["handled"][0]["params"]["message"], "Continue?", "{ask}");
    assert_eq!(ask["outcome"], "completed", "{ask}");
    assert_eq!(ask["text"], "answer: yes", "{ask}");
}

fn check_input(obs: &Value, transport: Transport) {
    check_ask_answered(obs);
    assert_eq!(obs["kind"], "task", "{obs}");
    let polled = statuses(&obs["polledStatuses"]);
    assert!(polled.contains(&"input_required"), "{obs}");
    assert_eq!(polled.last(), Some(&"completed"), "{obs}");
    let requests = obs["inputRequestsOnWire"].as_object().expect("inputRequests on the wire");
    assert_eq!(requests.len(), 1, "{obs}");
    let (key, request) = requests.iter().next().unwrap();
    assert_eq!(request["method"], "elicitation/create", "{obs}");
    assert_eq!(obs["handled"][0]["delivery"], "task-update", "{obs}");
    assert_eq!(obs["handled"][0]["inputId"], key.as_str(), "{obs}");
    assert_eq!(obs["update"]["params"]["inputResponses"][key]["content"]["answer"], "yes", "{obs}");
    assert_eq!(obs["update"]["response"]["result"], json!({"resultType": "complete"}), "{obs}");
    if transport == Transport::Http {
        assert_eq!(obs["tasksUpdateHeaders"]["mcp-method"], "tasks/update", "{obs}");
        assert_eq!(obs["tasksUpdateHeaders"]["mcp-name"], obs["taskId"], "{obs}");
    }
}

fn check_input_mrtr(obs: &Value) {
    check_ask_answered(obs);
    assert_eq!(obs["kind"], "immediate", "{obs}");
    let calls = obs["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{obs}");
    assert_eq!(calls[0]["result"]["resultType"], "input_required", "{obs}");
    assert!(calls[0]["result"]["requestState"].is_string(), "{obs}");
    assert_eq!(calls[1]["extra"]["requestState"], calls[0]["result"]["requestState"], "{obs}");
    assert_eq!(calls[1]["result"]["resultType"], "complete", "{obs}");
    assert_eq!(obs["handled"][0]["delivery"], "request-retry", "{obs}");
}

fn check_cancel_input(obs: &Value) {
    assert_eq!(obs["cancelled"]["outcome"], "cancelled", "{obs}");
    check_ask_answered(&obs["ask"]);
}

fn check_undeclared(obs: &Value) {
    assert_eq!(obs["text"], "inline slow", "{obs}");
    assert!(obs["declaredExtension"].is_null(), "the SDK's own callTool declares no extension: {obs}");
    assert_eq!(obs["wireResultType"], "complete", "{obs}");
    assert!(obs["elapsedMs"].as_u64().unwrap() >= 1400, "{obs}");
}

// ---------------------------------------------------------------------------------------------

/// `input` needs the call to be a task before it asks: with the default window (1 s) `ask` asks at
/// once and is answered inline (that is `input-mrtr`).
const TASK_AT_ONCE: &[&str] = &["--task-after-ms", "0"];

macro_rules! both_transports {
    ($($stdio:ident, $http:ident => $scenario:literal, $args:expr, |$obs:ident, $t:ident| $check:expr;)*) => {$(
        #[test]
        fn $stdio() {
            let $t = Transport::Stdio;
            let $obs = run($scenario, $t, $args);
            $check
        }
        #[test]
        fn $http() {
            let $t = Transport::Http;
            let $obs = run($scenario, $t, $args);
            $check
        }
    )*};
}

both_transports! {
    stdio_negotiate, http_negotiate => "negotiate", &[], |obs, t| check_negotiate(&obs, t);
    stdio_list, http_list => "list", &[], |obs, _t| check_list(&obs);
    stdio_fast, http_fast => "fast", &[], |obs, _t| check_fast(&obs);
    stdio_task, http_task => "task", &[], |obs, t| check_task(&obs, t);
    stdio_cancel, http_cancel => "cancel", &[], |obs, t| check_cancel(&obs, t);
    stdio_input, http_input => "input", TASK_AT_ONCE, |obs, t| check_input(&obs, t);
    stdio_input_mrtr, http_input_mrtr => "input-mrtr", &[], |obs, _t| check_input_mrtr(&obs);
    stdio_cancel_then_input, http_cancel_then_input => "cancel-input", &[], |obs, _t| check_cancel_input(&obs);
    stdio_undeclared, http_undeclared => "undeclared", &[], |obs, _t| check_undeclared(&obs);
}
