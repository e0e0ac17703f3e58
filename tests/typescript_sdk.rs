//! End-to-end tests with the official TypeScript MCP SDK client (`@modelcontextprotocol/sdk`) and the
//! third-party `@modelcontextprotocol/server-everything`, both pinned in `tests/node/package.json`.
//!
//! Each test runs `node tests/node/client.mjs <scenario> <command...>`, which prints one JSON line
//! of observations (and exits 1 on a failed expectation, saying why on stderr). The tests assert on
//! that JSON. Needs `node` and `npm` on PATH; `tests/node/node_modules` is installed with `npm ci`
//! on first use. Nothing reaches the network except that install.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{BIN, Served};

/// Longest a scenario may run before the test kills it (client.mjs has its own 50 s watchdog).
const SCENARIO_LIMIT: Duration = Duration::from_secs(90);

/// Installs `tests/node/node_modules` (once per test binary) if it is missing.
fn ensure_node_modules() {
    common::ensure_node_packages(
        &["sdk", "server-everything"],
        "these tests drive mcp-asyncify with the official TypeScript MCP SDK and server-everything",
    );
}

/// The command line of server-everything on stdio.
fn everything_cmd() -> Vec<String> {
    let entry = common::node_dir()
        .join("node_modules")
        .join("@modelcontextprotocol")
        .join("server-everything")
        .join("dist")
        .join("index.js");
    vec!["node".into(), entry.display().to_string(), "stdio".into()]
}

/// `mcp-asyncify --log-level warn -- <upstream...>`.
fn proxied(upstream: &[String]) -> Vec<String> {
    let mut cmd = vec![BIN.to_string(), "--log-level".into(), "warn".into(), "--".into()];
    cmd.extend(upstream.iter().cloned());
    cmd
}

/// Runs one scenario of client.mjs against `cmd`; returns its JSON observations. Panics (showing
/// node's stderr, which includes the proxy's and the server's) when it fails.
fn run_scenario(scenario: &str, cmd: &[String]) -> Value {
    ensure_node_modules();
    // stderr goes to a file, not a pipe: a grandchild that outlives node cannot then block us.
    let stderr_path =
        common::scratch().join(format!("ts-{scenario}-{:?}.stderr", std::thread::current().id()));
    let stderr_file = File::create(&stderr_path).expect("create the stderr file");
    let stdout_path = stderr_path.with_extension("stdout");
    let stdout_file = File::create(&stdout_path).expect("create the stdout file");
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg("client.mjs")
        .arg(scenario)
        .args(cmd)
        .current_dir(common::node_dir())
        // The client's data dirs for the proxies it starts go under this test run's scratch dir.
        .env("TMPDIR", common::scratch())
        .stdin(Stdio::null())
        .stdout(stdout_file)
        .stderr(stderr_file)
        .spawn()
        .expect("spawn node (is node installed?)");
    let status = common::wait_with_limit(&mut child, started, SCENARIO_LIMIT);
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stdout_path);
    let _ = std::fs::remove_file(&stderr_path);
    // Shown by the test harness only when the test fails.
    eprintln!(
        "--- node client.mjs {scenario} {} ({:?}, {:?}) stderr:\n{stderr}--- end stderr",
        cmd.join(" "),
        status,
        started.elapsed()
    );
    match status {
        None => panic!("scenario {scenario} ran over {SCENARIO_LIMIT:?} and was killed\nstderr:\n{stderr}"),
        Some(s) if !s.success() => {
            panic!("scenario {scenario} failed ({s})\nstderr:\n{stderr}\nstdout:\n{stdout}")
        }
        Some(_) => {}
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("scenario {scenario} printed nothing on stdout\nstderr:\n{stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("scenario {scenario} printed invalid JSON ({e}): {line}\nstderr:\n{stderr}")
    })
}

fn text_of(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|c| c.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""))
        .unwrap_or_default()
}

#[test]
fn everything_direct_and_through_the_proxy_agree() {
    let direct_cmd = everything_cmd();
    let proxied_cmd = proxied(&direct_cmd);
    let direct = std::thread::spawn(move || run_scenario("everything", &direct_cmd));
    let through = run_scenario("everything", &proxied_cmd);
    let direct = direct.join().unwrap_or_else(|e| std::panic::resume_unwind(e));

    // The tool lists are the same once `execution` is removed (client.mjs removes it).
    let names = |v: &Value| -> Vec<String> {
        v["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names(&direct), names(&through), "tool names differ");
    assert_eq!(direct["tools"], through["tools"], "tool definitions differ (besides execution)");
    assert!(names(&direct).len() >= 10, "server-everything lists only {:?}", names(&direct));

    // Every call answered the same through the proxy.
    let direct_calls = direct["calls"].as_object().unwrap();
    let through_calls = through["calls"].as_object().unwrap();
    assert_eq!(
        direct_calls.keys().collect::<Vec<_>>(),
        through_calls.keys().collect::<Vec<_>>(),
        "different tools were called"
    );
    for (name, result) in direct_calls {
        assert_eq!(result, &through_calls[name], "tool {name} answered differently through the proxy");
    }
    assert!(direct_calls.len() >= 10, "only {} tools called", direct_calls.len());
    assert_eq!(text_of(&through_calls["echo"]), "Echo: hello from the TypeScript SDK");
    assert!(text_of(&through_calls["get-sum"]).contains("42"));
    assert_eq!(through_calls["trigger-long-running-operation"]["progressSeen"].as_array().unwrap().len(), 3);
    assert!(text_of(&through_calls["trigger-sampling-request"]).contains("stub reply to"));
    assert_eq!(direct["skipped"], through["skipped"]);

    // The proxy offers tasks: every tool optional (the default `--task-tools *`), except the one
    // server-everything runs as a task itself, which keeps its own `required`.
    for (tool, support) in through["taskSupport"].as_object().unwrap() {
        let expected = if tool == "simulate-research-query" { "required" } else { "optional" };
        assert_eq!(support, expected, "taskSupport of {tool} through the proxy");
    }
    assert_eq!(direct["taskSupport"]["simulate-research-query"], "required");
    // The SDK's McpServer marks plain tools `forbidden`; the proxy runs them as tasks itself.
    assert_eq!(direct["taskSupport"]["echo"], "forbidden");
    assert!(through["serverCapabilities"]["tasks"]["requests"]["tools"]["call"].is_object());
}

#[test]
fn everything_native_tasks_pass_through_the_proxy() {
    let obs = run_scenario("everything-tasks", &proxied(&everything_cmd()));
    assert_eq!(obs["nativeTaskTools"], serde_json::json!(["simulate-research-query"]));
    for run in ["plain", "ambiguous"] {
        let r = &obs[run];
        let types: Vec<&str> = r["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(types.first(), Some(&"taskCreated"), "{run}: {r}");
        assert_eq!(types.last(), Some(&"result"), "{run}: {r}");
        let id = r["taskId"].as_str().unwrap();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{run}: task id {id} is not server-everything's (32 hex digits)"
        );
    }
    assert_eq!(obs["plain"]["text"], "# Research Report: rust async");
    assert_eq!(obs["ambiguous"]["text"], "# Research Report: python (programming)");
    assert!(obs["ambiguous"]["statuses"].as_array().unwrap().iter().any(|s| s == "input_required"));
    assert_eq!(obs["getTask"]["status"], "completed");
    assert!(obs["listedTaskIds"].as_array().unwrap().contains(&obs["plain"]["taskId"]));
}

#[test]
fn fixture_tasks_through_the_proxy() {
    let fixture = vec![BIN.to_string(), "test-server".into(), "--log-level".into(), "warn".into()];
    let obs = run_scenario("fixture-tasks", &proxied(&fixture));
    assert!(
        obs["capabilitiesTasks"]["requests"]["tools"]["call"].is_object(),
        "{}",
        obs["capabilitiesTasks"]
    );
    for (tool, support) in obs["taskSupport"].as_object().unwrap() {
        assert_eq!(support, "optional", "taskSupport of {tool}");
    }
    assert_eq!(obs["slow"]["text"], "slept 300 ms");
    assert_eq!(obs["slow"]["types"][0], "taskCreated");
    assert_eq!(obs["fail"]["status"], "failed");
    assert_eq!(obs["fail"]["result"]["isError"], true);
    assert_eq!(obs["cancel"]["reply"], "cancelled");
    assert_eq!(obs["cancel"]["after"], "cancelled");
    assert!(obs["cancel"]["upstreamCancellationsAfter"].as_i64().unwrap() >= 1);
    assert_eq!(obs["cancelCompleted"]["code"], -32602);
    assert_eq!(obs["getUnknown"]["code"], -32602);
    assert_eq!(obs["ask"]["text"], "answer: yes");
    assert_eq!(obs["concurrent"]["count"], 20);
    assert_eq!(obs["concurrent"]["distinctTaskIds"], 20);
    for (i, text) in obs["concurrent"]["texts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(text.as_str().unwrap(), format!("task {i} ({} ms)", 100 + i * 100));
    }
    assert_eq!(obs["progress"]["text"], "done 3 steps");
    assert_eq!(obs["progress"]["onWire"].as_array().unwrap().len(), 3);
}

#[test]
fn notion_tasks_through_the_proxy() {
    let sim = vec![
        BIN.to_string(),
        "notion-sim".into(),
        "--log-level".into(),
        "warn".into(),
        "--work-ms".into(),
        "1500".into(),
        "--rate-limit".into(),
        "0".into(),
    ];
    let obs = run_scenario("notion-tasks", &proxied(&sim));
    let dup = &obs["duplicate"];
    assert_eq!(dup["types"][0], "taskCreated", "{dup}");
    assert!(
        dup["statusMessages"].as_array().unwrap().iter().any(|m| {
            let m = m.as_str().unwrap_or_default();
            m.contains("queued") || m.contains("running")
        }),
        "no statusMessage with Notion's status: {dup}"
    );
    assert!(dup["payload"]["page"]["id"].is_string(), "{dup}");
    // The simulator reports it inside `page`; the top level would do as well.
    let from = match &dup["payload"]["duplicated_from"] {
        Value::Null => &dup["payload"]["page"]["duplicated_from"],
        v => v,
    };
    assert_eq!(from, "sprint-template", "{dup}");
    assert!(dup["payload"].get("async_task").is_none(), "{dup}");
    assert_eq!(obs["createTooLong"]["status"], "failed");
    assert!(obs["createTooLong"]["result"].to_string().contains("validation_error"));
    assert!(obs["search"]["isError"] != true);
}

/// The sidecar (`mcp-asyncify serve`) on a free port with `args` (upstream after `--`, or a URL).
fn sidecar(args: &[&str]) -> Served {
    let mut all = vec!["serve", "--listen", "{addr}", "--log-level", "warn"];
    all.extend_from_slice(args);
    Served::start(&all)
}

#[test]
fn fixture_tasks_over_streamable_http_through_the_sidecar() {
    let sidecar = sidecar(&["--", BIN, "test-server"]);
    let obs = run_scenario("fixture-tasks", std::slice::from_ref(&sidecar.url));
    assert!(obs["capabilitiesTasks"]["requests"]["tools"]["call"].is_object(), "{obs}");
    assert_eq!(obs["slow"]["text"], "slept 300 ms");
    assert_eq!(obs["fail"]["status"], "failed");
    assert_eq!(obs["cancel"]["after"], "cancelled");
    assert!(obs["cancel"]["upstreamCancellationsAfter"].as_i64().unwrap() >= 1);
    assert_eq!(obs["ask"]["text"], "answer: yes");
    assert_eq!(obs["concurrent"]["distinctTaskIds"], 20);
    assert_eq!(obs["progress"]["text"], "done 3 steps");
}

#[test]
fn notion_tasks_over_streamable_http_through_the_sidecar() {
    let sidecar =
        sidecar(&["--", BIN, "notion-sim", "--log-level", "warn", "--work-ms", "1500", "--rate-limit", "0"]);
    let obs = run_scenario("notion-tasks", std::slice::from_ref(&sidecar.url));
    let dup = &obs["duplicate"];
    assert!(dup["payload"]["page"]["id"].is_string(), "{dup}");
    assert!(dup["payload"].get("async_task").is_none(), "{dup}");
    assert_eq!(obs["createTooLong"]["status"], "failed");
}

#[test]
fn notion_tasks_over_http_end_to_end_sidecar_to_a_hosted_simulator() {
    let sim = Served::start(&[
        "notion-sim",
        "--log-level",
        "error",
        "--http",
        "{addr}",
        "--work-ms",
        "1500",
        "--rate-limit",
        "0",
    ]);
    let sidecar = sidecar(&["--upstream-url", &sim.url]);
    let obs = run_scenario("notion-tasks", std::slice::from_ref(&sidecar.url));
    let dup = &obs["duplicate"];
    assert!(dup["payload"]["page"]["id"].is_string(), "{dup}");
    assert!(dup["payload"].get("async_task").is_none(), "{dup}");
    assert_eq!(obs["createTooLong"]["status"], "failed");
}

/// A 2026-07-28 client in front of server-everything, whose `simulate-research-query` is a
/// 2025-11-25 task of its own (taskSupport "required"): the proxy asks for it the 2025-11-25 way and
/// offers it as the Tasks extension's (flat CreateTaskResult, DetailedTask with the result inline).
#[test]
fn a_modern_client_gets_server_everythings_own_tasks_as_extension_tasks() {
    ensure_node_modules();
    let cmd = proxied(&everything_cmd());
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let mut p = common::Peer::start(&args);
    let meta = serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "modern", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
    });
    let call = serde_json::json!({"name": "simulate-research-query", "arguments": {"topic": "rust async", "ambiguous": false}, "_meta": meta});
    let created = p.call(1, "tools/call", call)["result"].clone();
    assert_eq!(created["resultType"], "task", "{created}");
    assert!(created.get("task").is_none() && created["ttlMs"].is_u64(), "flat, 2026-07-28 names: {created}");
    let task_id = created["taskId"].as_str().unwrap().to_owned();
    assert_eq!(task_id.len(), 32, "server-everything's own task id (the proxy's are uuids): {task_id}");
    let deadline = std::time::Instant::now() + common::WAIT;
    let done = loop {
        let got = p.call(2, "tasks/get", serde_json::json!({"taskId": task_id, "_meta": meta}));
        let t = got["result"].clone();
        assert_eq!(t["resultType"], "complete", "{got}");
        if t["status"] == "completed" || t["status"] == "failed" {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "never ended: {t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert!(!text_of(&done["result"]).is_empty(), "the result inline: {done}");
    let ack = p.call(3, "tasks/cancel", serde_json::json!({"taskId": task_id, "_meta": meta}));
    assert_eq!(ack["result"]["resultType"], "complete", "cancelling an ended task is an ack: {ack}");
}

/// A 2025-11-25 upstream that runs its tool as a task of its own but declares neither `tasks.list`
/// nor `tasks.cancel` (tests/node/native-tasks-server.mjs, on the official SDK). The proxy declares
/// both for its own tasks; for the upstream's it must not send what the upstream did not declare, and
/// a task `tasks/get` knows is also in `tasks/list`.
#[test]
fn an_upstreams_own_tasks_are_listed_and_never_cancelled_behind_its_back() {
    use common::{Peer, text_of};
    use serde_json::json;
    ensure_node_modules();
    let server = common::node_dir().join("native-tasks-server.mjs").display().to_string();
    let mut p = Peer::start(&["--log-level", "warn", "--", "node", &server]);
    let init = p.initialize(json!({"tasks": {}}));
    assert!(init["capabilities"]["tasks"]["cancel"].is_object(), "the proxy's own tasks cancel: {init}");
    p.ok(1, "tools/list", json!({}));
    let created =
        p.ok(2, "tools/call", json!({"name": "brew", "arguments": {"ms": 1500, "text": "tea"}, "task": {}}));
    let task = created["task"]["taskId"].as_str().expect("the upstream's CreateTaskResult").to_owned();
    assert!(uuid_like(&task).is_none(), "a task of the upstream's own: {task}");

    let listed = p.ok(3, "tasks/list", json!({}));
    let tasks = listed["tasks"].as_array().unwrap();
    assert!(tasks.iter().any(|t| t["taskId"] == task.as_str() && t["status"] == "working"), "{listed}");

    let cancel = p.call(4, "tasks/cancel", json!({"taskId": task}));
    assert_eq!(cancel["error"]["code"], -32602, "{cancel}");
    let message = cancel["error"]["message"].as_str().unwrap();
    assert!(message.contains("cancel") && message.contains("upstream"), "{message}");
    let seen = p.tool(5, "seen", json!({}));
    let seen: Vec<String> = serde_json::from_str(text_of(&seen["result"])).unwrap();
    assert!(!seen.iter().any(|m| m == "tasks/cancel" || m == "tasks/list"), "forwarded: {seen:?}");

    let done = p.ok(6, "tasks/result", json!({"taskId": task}));
    assert_eq!(done["content"][0]["text"], "tea", "the task ran to its end: {done}");
    let listed = p.ok(7, "tasks/list", json!({}));
    let tasks = listed["tasks"].as_array().unwrap();
    assert!(tasks.iter().any(|t| t["taskId"] == task.as_str() && t["status"] == "completed"), "{listed}");
}

/// `Some` when the id has the shape of the proxy's own task ids (uuids with dashes).
fn uuid_like(id: &str) -> Option<()> {
    (id.len() == 36 && id.matches('-').count() == 4).then_some(())
}
