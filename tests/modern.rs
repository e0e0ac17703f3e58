//! MCP 2026-07-28 and its Tasks extension through the built binary, on stdio and on HTTP, in front of
//! the rmcp fixture (a 2025-11-25 server with no tasks): discovery, server-directed tasks, the
//! DetailedTask, tasks/update, the removed methods, the modern errors, and the stateless HTTP rules.

mod common;

use common::{BIN, Peer, Reply, Served};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const VERSION: &str = "2026-07-28";
const EXT: &str = "io.modelcontextprotocol/tasks";

/// The `_meta` of a modern request; `tasks`: whether it declares the Tasks extension.
fn meta(tasks: bool) -> Value {
    let caps = if tasks { json!({"extensions": {EXT: {}}}) } else { json!({}) };
    json!({
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "modern-test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": caps,
    })
}

/// `params` with the modern `_meta` merged in.
fn modern(mut params: Value, tasks: bool) -> Value {
    let mut m = meta(tasks);
    if let Some(own) = params.get("_meta").and_then(Value::as_object) {
        for (k, v) in own {
            m[k] = v.clone();
        }
    }
    params["_meta"] = m;
    params
}

/// The wrapper in front of the fixture, with no handshake at all.
fn wrapper(extra: &[&str]) -> Peer {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    args.extend(["--", BIN, "test-server"]);
    Peer::start(&args)
}

/// A modern request's full answer (result or error).
fn ask(p: &mut Peer, id: impl Into<Value>, method: &str, params: Value, tasks: bool) -> Value {
    p.call(id, method, modern(params, tasks))
}

/// A modern request's result (fails on an error).
fn ok(p: &mut Peer, id: impl Into<Value>, method: &str, params: Value) -> Value {
    let r = ask(p, id, method, params, true);
    assert!(r.get("error").is_none(), "{method} failed: {r}");
    r["result"].clone()
}

/// Polls tasks/get until the task is terminal.
fn until_terminal(p: &mut Peer, id_base: u64, task_id: &str) -> Value {
    let deadline = Instant::now() + common::WAIT;
    for n in 0.. {
        let t = ok(p, id_base + n, "tasks/get", json!({"taskId": task_id}));
        if matches!(t["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            return t;
        }
        assert!(Instant::now() < deadline, "task {task_id} never ended: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!()
}

/// Polls tasks/get until the task has `status`.
fn until_status(p: &mut Peer, id_base: u64, task_id: &str, status: &str) -> Value {
    let deadline = Instant::now() + common::WAIT;
    for n in 0.. {
        let t = ok(p, id_base + n, "tasks/get", json!({"taskId": task_id}));
        if t["status"] == status {
            return t;
        }
        assert!(Instant::now() < deadline, "task {task_id} never became {status}: {t}");
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

fn assert_created(r: &Value) -> String {
    assert_eq!(r["resultType"], "task", "a flat CreateTaskResult: {r}");
    assert!(r.get("task").is_none() && r.get("content").is_none(), "{r}");
    assert!(r["ttlMs"].as_u64().is_some_and(|t| t > 0) && r.get("ttl").is_none(), "{r}");
    assert!(r["pollIntervalMs"].as_u64().is_some_and(|t| t > 0) && r.get("pollInterval").is_none(), "{r}");
    assert!(r.get("requestState").is_none());
    r["taskId"].as_str().expect("a task id").to_owned()
}

#[test]
fn a_modern_client_discovers_the_proxy_and_gets_server_directed_tasks_over_stdio() {
    let mut p = wrapper(&["--task-after-ms", "300"]);
    let d = ok(&mut p, 1, "server/discover", json!({}));
    assert_eq!(d["resultType"], "complete");
    let versions: Vec<&str> =
        d["supportedVersions"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(versions.contains(&VERSION) && versions.contains(&"2025-11-25"), "both generations: {d}");
    assert_eq!(d["capabilities"]["extensions"][EXT], json!({}));
    assert!(d["capabilities"].get("tasks").is_none(), "never the legacy capability: {d}");
    assert!(d["capabilities"]["tools"].is_object(), "the upstream's own capabilities: {d}");
    assert_eq!(d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "asyncify-fixture");
    assert!(d["ttlMs"].as_u64().is_some() && d["cacheScope"].is_string(), "{d}");

    let tools = ok(&mut p, 2, "tools/list", json!({}));
    assert_eq!(tools["resultType"], "complete");
    assert!(
        tools["tools"].as_array().unwrap().iter().all(|t| t.get("execution").is_none()),
        "no 2025-11-25 taskSupport for a modern client: {tools}"
    );

    // A fast call answers inline: no task, nothing extra.
    let fast = ok(&mut p, 3, "tools/call", json!({"name": "echo", "arguments": {"text": "hi"}}));
    assert_eq!(
        (fast["resultType"].as_str(), fast["content"][0]["text"].as_str()),
        (Some("complete"), Some("hi"))
    );
    assert!(fast.get("taskId").is_none());

    // A slow one becomes a task after the window, and tasks/get has the result inline.
    let started = Instant::now();
    let created =
        ok(&mut p, 4, "tools/call", json!({"name": "slow", "arguments": {"ms": 1200, "text": "done"}}));
    assert!(
        started.elapsed() < Duration::from_millis(1100),
        "the task is answered at the window, not the end"
    );
    let task_id = assert_created(&created);
    assert_eq!(created["status"], "working");
    let working = ok(&mut p, 5, "tasks/get", json!({"taskId": task_id}));
    assert_eq!(
        (working["resultType"].as_str(), working["status"].as_str()),
        (Some("complete"), Some("working"))
    );
    assert!(working.get("result").is_none() && working.get("error").is_none());
    let done = until_terminal(&mut p, 100, &task_id);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"]["content"][0]["text"], "done");
    assert!(done.get("error").is_none());

    // Cancel is an ack, even for an ended task; the v1 methods are gone.
    assert_eq!(ok(&mut p, 6, "tasks/cancel", json!({"taskId": task_id})), json!({"resultType": "complete"}));
    for (id, method) in [(7, "tasks/result"), (8, "tasks/list")] {
        let r = ask(&mut p, id, method, json!({"taskId": task_id}), true);
        assert_eq!(r["error"]["code"], -32601, "{method}: {r}");
    }
}

#[test]
fn tool_errors_complete_and_protocol_errors_fail() {
    let mut p = wrapper(&["--task-after-ms", "0"]);
    let created = ok(&mut p, 1, "tools/call", json!({"name": "fail", "arguments": {"message": "nope"}}));
    let t = until_terminal(&mut p, 10, &assert_created(&created));
    assert_eq!(t["status"], "completed", "isError is a completed task in 2026-07-28: {t}");
    assert_eq!(t["result"]["isError"], true);
    assert!(t.get("error").is_none());

    let created = ok(
        &mut p,
        2,
        "tools/call",
        json!({"name": "rpc_error", "arguments": {"code": -32099, "message": "boom"}}),
    );
    let t = until_terminal(&mut p, 30, &assert_created(&created));
    assert_eq!(t["status"], "failed");
    assert_eq!((t["error"]["code"].as_i64(), t["error"]["message"].as_str()), (Some(-32099), Some("boom")));
    assert!(t.get("result").is_none(), "a failed task carries no result: {t}");
}

#[test]
fn cancelling_a_running_task_cancels_it() {
    let mut p = wrapper(&["--task-after-ms", "0"]);
    let created = ok(&mut p, 1, "tools/call", json!({"name": "slow", "arguments": {"ms": 10_000}}));
    let task_id = assert_created(&created);
    assert_eq!(ok(&mut p, 2, "tasks/cancel", json!({"taskId": task_id})), json!({"resultType": "complete"}));
    let t = ok(&mut p, 3, "tasks/get", json!({"taskId": task_id}));
    assert_eq!(t["status"], "cancelled");
    assert!(t.get("result").is_none() && t.get("error").is_none());
}

#[test]
fn input_requests_are_shown_by_tasks_get_and_answered_by_tasks_update() {
    // A task from the start (no window), which then asks for input.
    let mut p = wrapper(&["--task-after-ms", "0"]);
    let created = ok(&mut p, 1, "tools/call", json!({"name": "ask", "arguments": {"message": "Your name?"}}));
    let task_id = assert_created(&created);
    let t = until_status(&mut p, 200, &task_id, "input_required");
    let requests = t["inputRequests"].as_object().expect("inputRequests").clone();
    assert_eq!(requests.len(), 1, "{t}");
    let (key, request) = requests.iter().next().unwrap();
    assert_eq!(request["method"], "elicitation/create");
    assert_eq!(request["params"]["message"], "Your name?");
    // The elicitation never reached the client as a request of its own.
    assert!(p.backlog.iter().all(|l| !l.contains("elicitation/create")), "{:?}", p.backlog);

    // Unknown keys are ignored; the answer resumes the same upstream call.
    let answer = json!({"action": "accept", "content": {"answer": "Ada"}});
    let ack =
        ok(&mut p, 3, "tasks/update", json!({"taskId": task_id, "inputResponses": {"no-such-key": answer}}));
    assert_eq!(ack, json!({"resultType": "complete"}));
    assert_eq!(ok(&mut p, 4, "tasks/get", json!({"taskId": task_id}))["status"], "input_required");
    ok(
        &mut p,
        5,
        "tasks/update",
        json!({"taskId": task_id, "inputResponses": {key.clone(): answer.clone()}}),
    );
    let done = until_terminal(&mut p, 10, &task_id);
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("Ada"), "{done}");
    // An answered key is not answered twice.
    let again =
        ok(&mut p, 6, "tasks/update", json!({"taskId": task_id, "inputResponses": {key.clone(): answer}}));
    assert_eq!(again, json!({"resultType": "complete"}));
}

#[test]
fn a_plain_call_that_asks_gets_input_required_and_resumes_on_retry() {
    let mut p = wrapper(&[]);
    // Round 1: the upstream asks (elicitation); the client gets the question as the call's answer.
    let r1 =
        ask(&mut p, 1, "tools/call", json!({"name": "ask", "arguments": {"message": "Your name?"}}), false);
    let r1 = r1["result"].clone();
    assert_eq!(r1["resultType"], "input_required", "{r1}");
    assert!(r1.get("taskId").is_none());
    let state = r1["requestState"].as_str().expect("a requestState").to_owned();
    let (key, question) =
        r1["inputRequests"].as_object().unwrap().iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
    assert_eq!(
        (question["method"].as_str(), question["params"]["message"].as_str()),
        (Some("elicitation/create"), Some("Your name?"))
    );
    assert!(
        p.backlog.iter().all(|l| !l.contains("\"method\":\"elicitation/create\"")),
        "no server request reaches a modern client"
    );

    // A state the proxy never gave is refused clearly.
    let bad = ask(
        &mut p,
        2,
        "tools/call",
        json!({"name": "ask", "arguments": {"message": "?"}, "requestState": "forged"}),
        false,
    );
    assert_eq!(bad["error"]["code"], -32602, "{bad}");

    // Round 2: the retry carries the answer; the same upstream call finishes with it.
    let answer = json!({"action": "accept", "content": {"answer": "Ada"}});
    let r2 = ask(
        &mut p,
        3,
        "tools/call",
        json!({"name": "ask", "arguments": {"message": "Your name?"}, "inputResponses": {key: answer}, "requestState": state}),
        false,
    );
    assert_eq!(r2["result"]["resultType"], "complete", "{r2}");
    assert_eq!(r2["result"]["content"][0]["text"], "answer: Ada");
    // The state is spent.
    let again =
        ask(&mut p, 4, "tools/call", json!({"name": "ask", "arguments": {}, "requestState": state}), false);
    assert_eq!(again["error"]["code"], -32602, "{again}");
}

#[test]
fn questions_that_cannot_be_attributed_end_their_calls_instead_of_hanging() {
    // Two calls ask at once: the upstream's requests say nothing of which call asked, so neither
    // can be put to its client; they are refused, and both calls end.
    let mut p = wrapper(&[]);
    for id in [1, 2] {
        p.request(id, "tools/call", modern(json!({"name": "ask", "arguments": {"message": "?"}}), false));
    }
    for id in [1, 2] {
        let r = p.response(id);
        let refused = r.get("error").is_some() || r["result"]["isError"] == true;
        let asked = r["result"]["resultType"] == "input_required";
        assert!(refused || asked, "call {id} ended with a clear answer: {r}");
    }
    assert!(p.backlog.iter().all(|l| !l.contains("\"method\":\"elicitation/create\"")));
}

#[test]
fn input_gathered_before_the_window_then_a_task() {
    // test_tool_with_task asks for a name, then works for a second: the question comes back as a
    // round of input_required; the retry runs past the window and becomes a task whose result has the
    // name (the tasks-mrtr-composition scenario).
    let mut p = Peer::start(&[
        "--log-level",
        "warn",
        "--task-after-ms",
        "300",
        "--",
        BIN,
        "test-server",
        "--conformance",
    ]);
    let r1 = ok(&mut p, 1, "tools/call", json!({"name": "test_tool_with_task", "arguments": {}}));
    assert_eq!(r1["resultType"], "input_required", "{r1}");
    assert!(r1.get("taskId").is_none());
    let key = r1["inputRequests"].as_object().unwrap().keys().next().unwrap().clone();
    let retry = json!({
        "name": "test_tool_with_task", "arguments": {},
        "inputResponses": {key: {"action": "accept", "content": {"name": "Alice"}}},
        "requestState": r1["requestState"],
    });
    let r2 = ok(&mut p, 2, "tools/call", retry);
    let task_id = assert_created(&r2);
    let done = until_terminal(&mut p, 10, &task_id);
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("Alice"), "{done}");
}

#[test]
fn subscriptions_listen_delivers_task_changes_until_cancelled() {
    let mut p = wrapper(&["--task-after-ms", "0"]);
    let a = assert_created(&ok(
        &mut p,
        1,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 300, "text": "A"}}),
    ));
    let b = assert_created(&ok(
        &mut p,
        2,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 900, "text": "B"}}),
    ));
    p.request(
        "sub-1",
        "subscriptions/listen",
        modern(json!({"notifications": {"taskIds": [a, "someone-elses"]}}), true),
    );
    let ack =
        p.next_matching("the acknowledgment", |v| v["method"] == "notifications/subscriptions/acknowledged");
    assert_eq!(ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "sub-1");
    assert_eq!(ack["params"]["notifications"]["taskIds"], json!([a]), "only the caller's own tasks: {ack}");
    let done = p.next_matching("notifications/tasks", |v| {
        v["method"] == "notifications/tasks" && v["params"]["status"] == "completed"
    });
    assert_eq!(done["params"]["taskId"], a);
    assert_eq!(done["params"]["result"]["content"][0]["text"], "A");
    assert_eq!(done["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "sub-1");
    // Cancelled: nothing more on it (task B's end is not announced; it was never asked for anyway).
    p.notify("notifications/cancelled", json!({"requestId": "sub-1"}));
    assert_eq!(until_terminal(&mut p, 10, &b)["status"], "completed");
    assert!(p.drain(Duration::from_millis(200)).iter().all(|l| !l.contains("notifications/tasks\"")));
    // Listening to tasks needs the extension.
    let r = ask(&mut p, 3, "subscriptions/listen", json!({"notifications": {"taskIds": [a]}}), false);
    assert_eq!(r["error"]["code"], -32021, "{r}");
}

#[test]
fn notion_tasks_reach_a_modern_client() {
    let mut p = Peer::start(&[
        "--log-level",
        "warn",
        "--",
        BIN,
        "notion-sim",
        "--work-ms",
        "1500",
        "--suggested-backoff-ms",
        "200",
        "--rate-limit",
        "0",
    ]);
    let created = ok(
        &mut p,
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "sprint-template"}}),
    );
    let task_id = assert_created(&created);
    let done = until_terminal(&mut p, 10, &task_id);
    assert_eq!(done["status"], "completed", "{done}");
    let result = &done["result"];
    let page = result["structuredContent"]["page"].clone();
    assert_eq!(page["duplicated_from"], "sprint-template", "{done}");
    for part in ["content", "structuredContent"] {
        assert!(!result[part].to_string().contains("async_task"), "no Notion envelope in {part}: {result}");
    }
}

#[test]
fn a_modern_client_without_tasks_still_gets_the_hand_off() {
    let mut p = wrapper(&["--sync-deadline-ms", "300"]);
    let started = Instant::now();
    let r = ask(
        &mut p,
        1,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 1500, "text": "late"}}),
        false,
    );
    assert!(started.elapsed() < Duration::from_millis(1400), "answered at the deadline");
    let r = r["result"].clone();
    assert_eq!(r["resultType"], "complete", "{r}");
    let task_id =
        r["_meta"]["io.modelcontextprotocol/related-task"]["taskId"].as_str().expect("the task").to_owned();
    let fetched = ask(
        &mut p,
        2,
        "tools/call",
        json!({"name": "asyncify_task_result", "arguments": {"taskId": task_id}}),
        false,
    );
    assert_eq!(fetched["result"]["resultType"], "complete", "{fetched}");
    assert_eq!(fetched["result"]["content"][0]["text"], "late");
}

#[test]
fn requests_without_the_extension_never_get_a_task() {
    let mut p = wrapper(&["--task-after-ms", "0", "--task-tools", "slow,fail", "--task-required", "fail"]);
    let started = Instant::now();
    let r = ask(
        &mut p,
        1,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 600, "text": "sync"}}),
        false,
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(r["result"]["resultType"], "complete");
    assert_eq!(r["result"]["content"][0]["text"], "sync");

    // A tool that must be a task tells such a client what it lacks.
    let r = ask(&mut p, 2, "tools/call", json!({"name": "fail", "arguments": {"message": "x"}}), false);
    assert_eq!(r["error"]["code"], -32021, "{r}");
    assert_eq!(r["error"]["data"]["requiredCapabilities"]["extensions"][EXT], json!({}));
    for (id, method) in [(3, "tasks/get"), (4, "tasks/update"), (5, "tasks/cancel")] {
        let r = ask(&mut p, id, method, json!({"taskId": "x", "inputResponses": {}}), false);
        assert_eq!(r["error"]["code"], -32021, "{method}: {r}");
    }

    // A 2025-11-25 hint on a modern request is ignored, not an error, and makes no task.
    let r = ok(
        &mut p,
        6,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "x"}, "task": {"ttl": 1000}}),
    );
    assert_eq!((r["resultType"].as_str(), r["content"][0]["text"].as_str()), (Some("complete"), Some("x")));
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let mut p = wrapper(&["--task-after-ms", "0", "--task-tools", "ask", "--max-message-bytes", "4096"]);
    let mut params = json!({"name": "echo", "arguments": {"text": "x"}});
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2099-01-01"});
    let r = p.call(1, "tools/call", params);
    assert_eq!(r["error"]["code"], -32022, "{r}");
    assert_eq!(r["error"]["data"]["requested"], "2099-01-01");
    assert!(r["error"]["data"]["supported"].as_array().unwrap().contains(&json!(VERSION)));

    let r = ask(&mut p, 2, "tasks/get", json!({"taskId": "no-such-task"}), true);
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let created = ok(&mut p, 3, "tools/call", json!({"name": "ask", "arguments": {"message": "?"}}));
    let task_id = assert_created(&created);
    until_status(&mut p, 300, &task_id, "input_required");
    for (id, bad) in [(4, json!("yes")), (5, json!(null)), (6, json!([1]))] {
        let r = ask(&mut p, id, "tasks/update", json!({"taskId": task_id, "inputResponses": bad}), true);
        assert_eq!(r["error"]["code"], -32602, "inputResponses {bad}: {r}");
    }
    let r = ask(&mut p, 7, "tasks/update", json!({"inputResponses": {}}), true);
    assert_eq!(r["error"]["code"], -32602, "no taskId: {r}");
    // An oversized answer is refused under its own id.
    let huge = "x".repeat(5000);
    let r = ask(&mut p, 8, "tasks/update", json!({"taskId": task_id, "inputResponses": {"k": huge}}), true);
    assert_eq!(r["error"]["code"], -32600, "{r}");
    // Nothing changed: the task still waits for its input, and calls still flow.
    let t = ok(&mut p, 9, "tasks/get", json!({"taskId": task_id}));
    assert_eq!(t["status"], "input_required");
    assert_eq!(t["inputRequests"].as_object().unwrap().len(), 1);
    assert_eq!(
        ok(&mut p, 10, "tools/call", json!({"name": "echo", "arguments": {"text": "ok"}}))["content"][0]["text"],
        "ok"
    );
}

#[test]
fn a_legacy_handshake_after_a_modern_probe_gets_the_same_upstream() {
    let mut p = wrapper(&[]);
    let d = ok(&mut p, 1, "server/discover", json!({}));
    assert!(d["capabilities"]["extensions"][EXT].is_object());
    // The client decides to speak 2025-11-25 after all: the proxy answers initialize from what the
    // upstream said (it was initialized already), with 2025-11-25 tasks.
    let init = p.initialize(json!({"tasks": {}}));
    assert!(init["capabilities"]["tasks"]["requests"]["tools"]["call"].is_object(), "{init}");
    let r = p.ok(2, "tools/call", json!({"name": "slow", "arguments": {"ms": 100}, "task": {}}));
    let task_id = r["task"]["taskId"].as_str().unwrap().to_owned();
    let result = p.ok(3, "tasks/result", json!({"taskId": task_id}));
    assert_eq!(result["content"][0]["text"], "slept 100 ms");
    assert!(result.get("resultType").is_none(), "legacy answers are unchanged: {result}");
}

/// The proxy with `--upstream-protocol GEN` in front of a 2026-07-28 upstream that runs tasks itself
/// (a second mcp-asyncify with a 200 ms task window, in front of the fixture).
fn in_front_of_a_modern_upstream(protocol: &str) -> Peer {
    Peer::start(&[
        "--log-level",
        "warn",
        "--upstream-protocol",
        protocol,
        "--",
        BIN,
        "--log-level",
        "warn",
        "--task-after-ms",
        "200",
        "--",
        BIN,
        "test-server",
    ])
}

#[test]
fn a_modern_upstreams_own_tasks_pass_through_to_modern_clients() {
    let mut p = in_front_of_a_modern_upstream("auto");
    let d = ok(&mut p, 1, "server/discover", json!({}));
    assert_eq!(d["capabilities"]["extensions"][EXT], json!({}));
    assert!(d["supportedVersions"].as_array().unwrap().contains(&json!("2025-11-25")), "{d}");
    // The upstream decides: its task (its id, its window) reaches the client untouched.
    let created =
        ok(&mut p, 2, "tools/call", json!({"name": "slow", "arguments": {"ms": 800, "text": "theirs"}}));
    let task_id = assert_created(&created);
    let done = until_terminal(&mut p, 10, &task_id);
    assert_eq!(done["result"]["content"][0]["text"], "theirs", "{done}");
    // Its input rounds too: the requestState is the upstream's, and the retry goes to it.
    let r1 = ask(&mut p, 3, "tools/call", json!({"name": "ask", "arguments": {"message": "Name?"}}), false);
    let r1 = r1["result"].clone();
    assert_eq!(r1["resultType"], "input_required", "{r1}");
    let key = r1["inputRequests"].as_object().unwrap().keys().next().unwrap().clone();
    let retry = json!({"name": "ask", "arguments": {"message": "Name?"}, "inputResponses": {key: {"action": "accept", "content": {"answer": "Lin"}}}, "requestState": r1["requestState"]});
    let r2 = ask(&mut p, 4, "tools/call", retry, false);
    assert_eq!(r2["result"]["content"][0]["text"], "answer: Lin", "{r2}");
}

#[test]
fn a_legacy_client_reaches_a_modern_upstream() {
    let mut p = in_front_of_a_modern_upstream("modern");
    // The handshake is answered from the upstream's discovery, with the proxy's 2025-11-25 tasks.
    let init = p.initialize(json!({"tasks": {}}));
    assert_eq!(init["protocolVersion"], "2025-11-25");
    assert!(init["capabilities"]["tasks"]["requests"]["tools"]["call"].is_object(), "{init}");
    assert_eq!(init["serverInfo"]["name"], "asyncify-fixture");
    // Requests reach it with the per-request metadata it needs.
    assert_eq!(
        p.ok(2, "tools/call", json!({"name": "echo", "arguments": {"text": "hi"}}))["content"][0]["text"],
        "hi"
    );
    let r = p.ok(3, "tools/call", json!({"name": "slow", "arguments": {"ms": 300}, "task": {}}));
    let task_id = r["task"]["taskId"].as_str().unwrap().to_owned();
    assert_eq!(p.ok(4, "tasks/result", json!({"taskId": task_id}))["content"][0]["text"], "slept 300 ms");
}

#[test]
fn auto_falls_back_to_initialize_when_discovery_is_not_understood() {
    // The raw fixture answers every request with its params: no supportedVersions, so 2025-11-25.
    let mut p = Peer::start(&[
        "--log-level",
        "warn",
        "--upstream-protocol",
        "auto",
        "--",
        BIN,
        "test-server",
        "--raw",
    ]);
    let d = ok(&mut p, 1, "server/discover", json!({}));
    assert_eq!(d["capabilities"]["extensions"][EXT], json!({}), "{d}");
    let r = ok(&mut p, 2, "raw/echo", json!({"x": 1}));
    assert_eq!(r["x"], 1);
    assert!(
        r["_meta"]["io.modelcontextprotocol/protocolVersion"] == VERSION,
        "the client's own request, forwarded: {r}"
    );
}

/// A header to set (`Some`) or remove (`None`).
type HeaderTweak<'a> = (&'a str, Option<&'a str>);

/// The sidecar in front of the fixture, with an HTTP client for stateless requests.
struct Stateless {
    addr: String,
    /// Kept for its drop, which stops the sidecar (None: the test runs the sidecar itself).
    _served: Option<Served>,
}

impl Stateless {
    fn start(extra: &[&str]) -> Stateless {
        let mut args = vec!["serve", "--listen", "{addr}", "--log-level", "warn"];
        args.extend_from_slice(extra);
        args.extend(["--", BIN, "test-server"]);
        let served = Served::start(&args);
        Stateless { addr: served.addr.clone(), _served: Some(served) }
    }

    /// A stateless POST with the standard headers; `tweak` changes them (None removes one).
    fn post(&self, auth: Option<&str>, msg: &Value, tweak: &[HeaderTweak]) -> Reply {
        let method = msg["method"].as_str().unwrap_or_default();
        let name =
            ["name", "uri", "taskId"].iter().find_map(|k| msg["params"][k].as_str()).map(str::to_owned);
        let mut headers: Vec<(String, String)> = vec![
            ("Content-Type".into(), "application/json".into()),
            ("Accept".into(), "application/json, text/event-stream".into()),
            ("MCP-Protocol-Version".into(), VERSION.into()),
            ("Mcp-Method".into(), method.into()),
        ];
        if let Some(n) =
            name.filter(|_| matches!(method, "tools/call" | "tasks/get" | "tasks/update" | "tasks/cancel"))
        {
            headers.push(("Mcp-Name".into(), n));
        }
        if let Some(a) = auth {
            headers.push(("Authorization".into(), a.into()));
        }
        for (k, v) in tweak {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
            if let Some(v) = v {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        let lines: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        common::http(&self.addr, "POST", "/mcp", &lines, msg.to_string().as_bytes())
    }

    /// A modern request's answer (from JSON or the SSE stream), with its HTTP status.
    fn call(&self, auth: Option<&str>, id: Value, method: &str, params: Value, tasks: bool) -> (u16, Value) {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": modern(params, tasks)});
        let r = self.post(auth, &msg, &[]);
        let answer = r.messages().into_iter().rev().find(|m| m.get("id") == Some(&id));
        (r.status, answer.unwrap_or_else(|| panic!("no answer to {method}: {} {}", r.status, r.body)))
    }

    fn ok(&self, auth: Option<&str>, id: Value, method: &str, params: Value) -> Value {
        let (status, r) = self.call(auth, id, method, params, true);
        assert_eq!(status, 200, "{method}: {r}");
        assert!(r.get("error").is_none(), "{method}: {r}");
        r["result"].clone()
    }
}

#[test]
fn stateless_http_requests_need_no_session_and_get_tasks() {
    let s = Stateless::start(&["--task-after-ms", "200"]);
    let d = s.ok(None, json!(1), "server/discover", json!({}));
    assert_eq!(d["capabilities"]["extensions"][EXT], json!({}));
    let r = s.post(
        None,
        &json!({"jsonrpc":"2.0","id":1,"method":"server/discover","params":modern(json!({}), true)}),
        &[],
    );
    assert!(r.header("mcp-session-id").is_none(), "stateless: no session is minted");

    let fast = s.ok(None, json!("a"), "tools/call", json!({"name": "echo", "arguments": {"text": "hi"}}));
    assert_eq!(
        (fast["resultType"].as_str(), fast["content"][0]["text"].as_str()),
        (Some("complete"), Some("hi"))
    );
    let created = s.ok(
        None,
        json!(2),
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 800, "text": "later"}}),
    );
    let task_id = assert_created(&created);
    // Another POST (another connection) reads the task.
    let deadline = Instant::now() + common::WAIT;
    let done = loop {
        let t = s.ok(None, json!(3), "tasks/get", json!({"taskId": task_id}));
        if t["status"] == "completed" {
            break t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(done["result"]["content"][0]["text"], "later");

    // Two clients using the same request id at the same time each get their own answer.
    let texts: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = ["first", "second"]
            .into_iter()
            .map(|text| {
                let s = &s;
                scope.spawn(move || {
                    let args = json!({"name": "slow", "arguments": {"ms": 100, "text": text}});
                    s.ok(None, json!(7), "tools/call", args)["content"][0]["text"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(texts, ["first", "second"]);

    // Removed methods are 404 with -32601 over HTTP.
    let (status, r) = s.call(None, json!(8), "tasks/list", json!({}), true);
    assert_eq!((status, r["error"]["code"].as_i64()), (404, Some(-32601)), "{r}");
}

#[test]
fn stateless_http_headers_must_match_the_body() {
    let s = Stateless::start(&[]);
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":modern(json!({"name":"echo","arguments":{"text":"x"}}), true)});
    let cases: [(&str, &[HeaderTweak]); 6] = [
        ("Mcp-Method disagrees", &[("Mcp-Method", Some("tasks/get"))]),
        ("Mcp-Name disagrees", &[("Mcp-Name", Some("other"))]),
        ("Mcp-Name missing", &[("Mcp-Name", None)]),
        ("Mcp-Method missing", &[("Mcp-Method", None)]),
        ("MCP-Protocol-Version disagrees", &[("MCP-Protocol-Version", Some("2025-11-25"))]),
        ("MCP-Protocol-Version missing", &[("MCP-Protocol-Version", None)]),
    ];
    for (what, tweak) in cases {
        let r = s.post(None, &call, tweak);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let m = &r.messages()[0];
        assert_eq!((m["id"].as_i64(), m["error"]["code"].as_i64()), (Some(1), Some(-32020)), "{what}: {m}");
    }
    // Base64-encoded names are decoded before comparing.
    let r = s.post(None, &call, &[("Mcp-Name", Some("=?base64?ZWNobw==?="))]);
    assert_eq!(r.status, 200, "{}", r.body);
    // An unsupported version in the body: 400 with -32022 and what is supported.
    let mut params = json!({"name":"echo","arguments":{"text":"x"}});
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2099-01-01"});
    let r = s.post(None, &json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":params}), &[]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.messages()[0]["error"]["code"], -32022);
    // Nothing changed: the same call with the right headers works.
    assert_eq!(s.post(None, &call, &[]).status, 200);
    // 2026-07-28 has no GET stream and no session to delete.
    for method in ["GET", "DELETE"] {
        let r = common::http(
            &s.addr,
            method,
            "/mcp",
            &[&format!("MCP-Protocol-Version: {VERSION}"), "Accept: text/event-stream"],
            b"",
        );
        assert_eq!(r.status, 405, "{method}: {}", r.body);
    }
}

#[test]
fn stateless_http_calls_take_their_input_in_rounds() {
    let s = Stateless::start(&[]);
    let (status, r1) = s.call(
        None,
        json!(1),
        "tools/call",
        json!({"name": "ask", "arguments": {"message": "Name?"}}),
        false,
    );
    assert_eq!(status, 200);
    let r1 = r1["result"].clone();
    assert_eq!(r1["resultType"], "input_required", "{r1}");
    let key = r1["inputRequests"].as_object().unwrap().keys().next().unwrap().clone();
    let retry = json!({
        "name": "ask", "arguments": {"message": "Name?"},
        "inputResponses": {key: {"action": "accept", "content": {"answer": "Grace"}}},
        "requestState": r1["requestState"],
    });
    let (status, r2) = s.call(None, json!(1), "tools/call", retry, false);
    assert_eq!(status, 200);
    assert_eq!(r2["result"]["content"][0]["text"], "answer: Grace", "{r2}");
}

#[test]
fn a_stateless_subscription_streams_on_its_own_post() {
    use std::io::{Read, Write};
    let s = Stateless::start(&["--task-after-ms", "0"]);
    let created = s.ok(
        None,
        json!(1),
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 300, "text": "streamed"}}),
    );
    let task_id = assert_created(&created);
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "subscriptions/listen", "params": modern(json!({"notifications": {"taskIds": [task_id]}}), true)}).to_string();
    let mut conn = std::net::TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: {VERSION}\r\nMcp-Method: subscriptions/listen\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body.as_bytes()).unwrap();
    let (mut seen, deadline) = (String::new(), Instant::now() + common::WAIT);
    while !(seen.contains("notifications/tasks\"") && seen.contains("\"completed\"")) {
        assert!(Instant::now() < deadline, "no notifications/tasks on the stream: {seen}");
        let mut buf = [0u8; 4096];
        if let Ok(n) = conn.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("notifications/subscriptions/acknowledged"), "{seen}");
    assert!(seen.contains("\"io.modelcontextprotocol/subscriptionId\":7"), "the client's own id: {seen}");
    assert!(seen.contains("streamed"), "the result inline: {seen}");
}

#[test]
fn stateless_tasks_are_bound_to_the_credential() {
    let s = Stateless::start(&["--task-after-ms", "0"]);
    let alice = Some("Bearer alice");
    let bob = Some("Bearer bob");
    let created = s.ok(alice, json!(1), "tools/call", json!({"name": "ask", "arguments": {"message": "?"}}));
    let task_id = assert_created(&created);
    let deadline = Instant::now() + common::WAIT;
    while s.ok(alice, json!(9), "tasks/get", json!({"taskId": task_id}))["status"] != "input_required" {
        assert!(Instant::now() < deadline, "the task never asked for input");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (id, method) in [(2, "tasks/get"), (3, "tasks/update"), (4, "tasks/cancel")] {
        let (status, r) =
            s.call(bob, json!(id), method, json!({"taskId": task_id, "inputResponses": {"k": {}}}), true);
        assert_eq!(
            (status, r["error"]["code"].as_i64()),
            (200, Some(-32602)),
            "{method} by someone else: {r}"
        );
    }
    // Alice's task is untouched by Bob's attempts.
    let t = s.ok(alice, json!(5), "tasks/get", json!({"taskId": task_id}));
    assert_eq!(t["status"], "input_required");
    assert_eq!(t["inputRequests"].as_object().unwrap().len(), 1);
    let anonymous = s.call(None, json!(6), "tasks/get", json!({"taskId": task_id}), true).1;
    assert_eq!(anonymous["error"]["code"], -32602);
}

/// The sidecar run by the test with its log on a pipe: `--session-idle-secs 1` and info lines, so
/// the test can act at the instant the idle reaper starts closing connections.
struct LoggedSidecar {
    child: std::process::Child,
}

impl Drop for LoggedSidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_stateless_request_arriving_as_the_reaper_closes_its_connection_is_served() {
    use std::io::BufRead;
    use std::sync::{Arc, Barrier, mpsc};
    // Many credentials, each with its own stateless upstream connection: the reaper closes them one
    // after another, so requests sent the moment it starts meet connections it has judged idle.
    const CREDENTIALS: usize = 40;
    const ROUNDS: usize = 2;
    let addr = common::free_addr();
    let mut command = std::process::Command::new(BIN);
    command.args(["serve", "--listen", &addr, "--log-level", "info", "--session-idle-secs", "1"]);
    command.args(["--", BIN, "test-server"]);
    common::isolate(&mut command);
    common::keep_sign_ins_apart(&mut command);
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the sidecar");
    let mut sidecar = LoggedSidecar { child };
    let stderr = sidecar.child.stderr.take().expect("piped stderr");
    let (reaping_tx, reaping) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("closing an idle session") && reaping_tx.send(()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the sidecar did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = Arc::new(Stateless { addr, _served: None });
    let echo = |s: &Stateless, k: usize, id: String| {
        let auth = format!("Bearer credential-{k}");
        let text = format!("{id} of credential {k}");
        let (status, r) = s.call(
            Some(&auth),
            json!(id),
            "tools/call",
            json!({"name": "echo", "arguments": {"text": text}}),
            true,
        );
        (status == 200 && r["result"]["content"][0]["text"] == json!(text))
            .then_some(())
            .ok_or(format!("{status} {r}"))
    };
    for round in 0..ROUNDS {
        // Every credential gets its connection at once, so they all turn idle together.
        let opened: Vec<_> = (0..CREDENTIALS)
            .map(|k| {
                let s = s.clone();
                std::thread::spawn(move || echo(&s, k, format!("open-{round}")))
            })
            .collect();
        for (k, t) in opened.into_iter().enumerate() {
            t.join().unwrap().unwrap_or_else(|e| panic!("opening credential {k}'s connection: {e}"));
        }
        while reaping.try_recv().is_ok() {}
        // Ready to fire, then the reaper's first close (within two of its 1 s rounds).
        let go = Arc::new(Barrier::new(CREDENTIALS + 1));
        let probes: Vec<_> = (0..CREDENTIALS)
            .map(|k| {
                let (s, go) = (s.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    echo(&s, k, format!("probe-{round}"))
                })
            })
            .collect();
        reaping.recv_timeout(Duration::from_secs(10)).expect("the reaper closes idle connections");
        go.wait();
        let failed: Vec<String> = probes
            .into_iter()
            .enumerate()
            .filter_map(|(k, t)| t.join().unwrap().err().map(|e| format!("credential {k}: {e}")))
            .collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} of {CREDENTIALS} requests sent as the reaper closed idle connections failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
}
