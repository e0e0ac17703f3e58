//! The tasks engine on the wire, through the built binary in front of the rmcp fixture (a server with no
//! tasks of its own): every message of spec 2025-11-25, every status transition, every error code.

mod common;

use common::{BIN, Peer, WAIT, alive, config_file, text_of, wait_gone};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const TASK_CLIENT: &str = r#"{"tasks":{"list":{},"cancel":{},"requests":{"elicitation":{"create":{}},"sampling":{"createMessage":{}}}},"elicitation":{},"sampling":{}}"#;

fn proxy(extra: &[&str]) -> Peer {
    let mut args = extra.to_vec();
    args.extend(["--log-level", "warn", "--", BIN, "test-server"]);
    let mut p = Peer::start(&args);
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    p
}

/// Sends a task-augmented tools/call and returns the created task.
fn start_task(p: &mut Peer, id: impl Into<Value>, tool: &str, args: Value, task: Value) -> Value {
    let r = p.ok(id, "tools/call", json!({"name": tool, "arguments": args, "task": task}));
    assert!(r.get("content").is_none(), "CreateTaskResult, not a tool result: {r}");
    r["task"].clone()
}

/// Waits for `notifications/tasks/status` of `task_id` with `status`.
fn status_note(p: &mut Peer, task_id: &str, status: &str) -> Value {
    p.next_matching(&format!("status {status} of {task_id}"), |v| {
        v["method"] == "notifications/tasks/status"
            && v["params"]["taskId"] == task_id
            && v["params"]["status"] == status
    })["params"]
        .clone()
}

fn related(result: &Value) -> &Value {
    &result["_meta"]["io.modelcontextprotocol/related-task"]["taskId"]
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() >= 20 && s.as_bytes()[10] == b'T' && (s.ends_with('Z') || s.contains('+')))
}

#[test]
fn capabilities_and_tools_are_advertised_and_nothing_else_changes() {
    let mut p = proxy(&[]);
    // initialize was answered in `proxy`; ask again on a fresh proxy to see the result.
    let mut q = Peer::start(&["--log-level", "warn", "--", BIN, "test-server"]);
    let init = q.initialize(json!({}));
    assert_eq!(
        init["capabilities"]["tasks"],
        json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}})
    );
    assert!(init["capabilities"]["tools"].is_object(), "the upstream's own capabilities stay: {init}");
    assert_eq!(init["serverInfo"]["name"], "asyncify-fixture");

    let tools = p.ok(1, "tools/list", json!({}))["tools"].as_array().unwrap().clone();
    let mut plain = Peer::start(&["--no-tasks", "--log-level", "warn", "--", BIN, "test-server"]);
    plain.initialize(json!({}));
    let direct = plain.ok(1, "tools/list", json!({}))["tools"].as_array().unwrap().clone();
    assert_eq!(tools.len(), direct.len());
    for (ours, theirs) in tools.iter().zip(&direct) {
        assert_eq!(ours["execution"], json!({"taskSupport": "optional"}), "{ours}");
        let mut stripped = ours.clone();
        stripped.as_object_mut().unwrap().remove("execution");
        assert_eq!(&stripped, theirs, "every other field kept");
    }
    assert!(!tools.iter().any(|t| t["name"].as_str().unwrap().starts_with("asyncify_")));

    // Only the configured tools (by name or glob) are offered as tasks; others refuse params.task.
    let mut only = proxy(&["--task-tools", "sl*,ask"]);
    let tools = only.ok(2, "tools/list", json!({}))["tools"].as_array().unwrap().clone();
    let offered: HashSet<&str> = tools
        .iter()
        .filter(|t| t["execution"]["taskSupport"] == "optional")
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, HashSet::from(["slow", "ask"]));
    let r = only.call(3, "tools/call", json!({"name": "echo", "arguments": {"text": "x"}, "task": {}}));
    assert_eq!(r["error"]["code"], -32601, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("echo"), "{r}");
    // ...and a plain call of it still works.
    assert_eq!(text_of(&only.tool(4, "echo", json!({"text": "x"}))["result"]), "x");
}

#[test]
fn a_task_runs_to_completion_with_every_message_of_the_spec() {
    let mut p = proxy(&[]);
    let before = std::time::SystemTime::now();
    let task = start_task(&mut p, 1, "slow", json!({"ms": 400, "text": "done!"}), json!({"ttl": 60000}));
    let id = task["taskId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "uuid-grade id: {id}");
    assert_eq!(task["status"], "working");
    assert_eq!(task["ttl"], 60000);
    assert!(task["pollInterval"].is_u64());
    assert!(is_rfc3339(&task["createdAt"]) && is_rfc3339(&task["lastUpdatedAt"]), "{task}");

    let got = p.ok(2, "tasks/get", json!({"taskId": id}));
    assert_eq!(got["status"], "working");
    assert_eq!(got["taskId"], id.as_str());

    // tasks/result blocks while it works.
    p.request(3, "tasks/result", json!({"taskId": id}));
    let note = status_note(&mut p, &id, "completed");
    assert_eq!(note["ttl"], 60000);
    let result = p.response(3);
    assert_eq!(text_of(&result["result"]), "done!");
    assert_eq!(related(&result["result"]), id.as_str());
    assert!(before.elapsed().unwrap() >= Duration::from_millis(400));

    let got = p.ok(4, "tasks/get", json!({"taskId": id}));
    assert_eq!(got["status"], "completed");
    assert_ne!(got["lastUpdatedAt"], task["lastUpdatedAt"]);
    // The result stays available (retention) and is the same every time.
    let again = p.ok(5, "tasks/result", json!({"taskId": id}));
    assert_eq!(again, result["result"]);
    // The upstream's response to the proxy's own request never reached the client.
    let stray: Vec<_> = p.backlog.iter().filter(|l| !l.contains("notifications/")).collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn ttl_is_honoured_up_to_the_maximum_and_defaults_apply() {
    let cfg =
        config_file("ttl", "[tasks]\ndefault_ttl_ms = 120000\nmax_ttl_ms = 600000\npoll_interval_ms = 250\n");
    let mut p = proxy(&["--config", cfg.to_str().unwrap()]);
    let t = start_task(&mut p, 1, "echo", json!({"text": "a"}), json!({}));
    assert_eq!((t["ttl"].clone(), t["pollInterval"].clone()), (json!(120000), json!(250)));
    let t = start_task(&mut p, 2, "echo", json!({"text": "a"}), json!({"ttl": 999_999_999}));
    assert_eq!(t["ttl"], 600000);
    let t = start_task(&mut p, 3, "echo", json!({"text": "a"}), json!({"ttl": 5000}));
    assert_eq!(t["ttl"], 5000);
}

#[test]
fn failures_keep_the_upstreams_result_or_error_exactly() {
    let mut p = proxy(&[]);
    let t = start_task(&mut p, 1, "fail", json!({"message": "disk full"}), json!({}));
    let id = t["taskId"].as_str().unwrap();
    status_note(&mut p, id, "failed");
    let r = p.ok(2, "tasks/result", json!({"taskId": id}));
    assert_eq!((r["isError"].clone(), text_of(&r)), (json!(true), "disk full"));
    assert_eq!(related(&r), id);

    let t =
        start_task(&mut p, 3, "rpc_error", json!({"code": -32042, "message": "quota exceeded"}), json!({}));
    let id = t["taskId"].as_str().unwrap();
    let note = status_note(&mut p, id, "failed");
    assert!(note["statusMessage"].as_str().is_some_and(|m| m.contains("quota exceeded")), "{note}");
    let r = p.call(4, "tasks/result", json!({"taskId": id}));
    assert_eq!(r["error"], json!({"code": -32042, "message": "quota exceeded", "data": {"from": "fixture"}}));
}

#[test]
fn every_error_code_is_the_one_the_spec_names() {
    let mut p = proxy(&[]);
    let unknown = "00000000-0000-0000-0000-000000000000";
    for (i, method) in ["tasks/get", "tasks/result", "tasks/cancel"].into_iter().enumerate() {
        let r = p.call(i as u64, method, json!({"taskId": unknown}));
        assert_eq!(r["error"]["code"], -32602, "{method}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("not found"), "{r}");
        let r = p.call(10 + i as u64, method, json!({}));
        assert_eq!(r["error"]["code"], -32602, "{method} without taskId: {r}");
        let r = p.call(20 + i as u64, method, json!({"taskId": 7}));
        assert_eq!(r["error"]["code"], -32602, "{method} with a number: {r}");
    }
    let r = p.call(30, "tasks/list", json!({"cursor": "no-such-cursor"}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = p.call(31, "tasks/list", json!({"cursor": 5}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // A terminal task cannot be cancelled.
    let t = start_task(&mut p, 40, "echo", json!({"text": "x"}), json!({}));
    let id = t["taskId"].as_str().unwrap();
    status_note(&mut p, id, "completed");
    let r = p.call(41, "tasks/cancel", json!({"taskId": id}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("completed"), "{r}");
}

#[test]
fn cancel_while_running_stops_the_upstream_call_and_after_the_end_is_refused() {
    let mut p = proxy(&[]);
    // Right after creation (before the upstream could answer) and while running.
    for (i, delay) in [(0u64, 0u64), (1, 300)] {
        let t = start_task(&mut p, 100 + i, "slow", json!({"ms": 30_000}), json!({}));
        let id = t["taskId"].as_str().unwrap().to_owned();
        std::thread::sleep(Duration::from_millis(delay));
        let r = p.ok(200 + i, "tasks/cancel", json!({"taskId": id}));
        assert_eq!(r["status"], "cancelled", "{r}");
        status_note(&mut p, &id, "cancelled");
        let r = p.call(300 + i, "tasks/result", json!({"taskId": id}));
        assert_eq!(r["error"]["code"], -32800, "{r}");
        assert_eq!(p.ok(400 + i, "tasks/get", json!({"taskId": id}))["status"], "cancelled");
        let r = p.call(500 + i, "tasks/cancel", json!({"taskId": id}));
        assert_eq!(r["error"]["code"], -32602, "cancelling twice: {r}");
    }
    // The upstream was told (notifications/cancelled) and stopped both calls.
    let deadline = Instant::now() + WAIT;
    loop {
        let n: u64 = text_of(&p.tool(600, "cancelled", json!({}))["result"]).parse().unwrap();
        if n >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the upstream saw {n} cancellations");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A late answer never revives a cancelled task: nothing else arrives for it.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!p.backlog.iter().any(|l| l.contains("\"completed\"")), "{:?}", p.backlog);
}

#[test]
fn several_waiters_get_the_same_result_and_many_tasks_run_at_once() {
    let mut p = proxy(&[]);
    let t = start_task(&mut p, "w", "slow", json!({"ms": 500, "text": "shared"}), json!({}));
    let id = t["taskId"].as_str().unwrap().to_owned();
    for w in 0..5 {
        p.request(format!("waiter-{w}"), "tasks/result", json!({"taskId": id}));
    }
    for w in 0..5 {
        let r = p.response(format!("waiter-{w}"));
        assert_eq!(text_of(&r["result"]), "shared");
    }

    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..100u64 {
        let ms = 100 + (i * 7919) % 900;
        let t = start_task(&mut p, i, "slow", json!({"ms": ms, "text": format!("task {i}")}), json!({}));
        ids.push(t["taskId"].as_str().unwrap().to_owned());
    }
    for (i, id) in ids.iter().enumerate() {
        let r = p.ok(1000 + i as u64, "tasks/result", json!({"taskId": id}));
        assert_eq!(text_of(&r), format!("task {i}"));
    }
    assert!(started.elapsed() < Duration::from_secs(6), "100 tasks took {:?}", started.elapsed());

    // tasks/list pages through all of them exactly once (page size 50), with stable cursors.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let params = cursor.as_ref().map_or(json!({}), |c| json!({"cursor": c}));
        let r = p.ok(5000 + page, "tasks/list", params);
        let tasks = r["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 50);
        seen.extend(tasks.iter().map(|t| t["taskId"].as_str().unwrap().to_owned()));
        match r["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (101, 101));
    assert!(ids.iter().all(|i| unique.contains(i)));
}

#[test]
fn input_required_elicitation_and_sampling_go_through_the_client_and_the_task_resumes() {
    let mut p = proxy(&[]);
    let t = start_task(&mut p, 1, "ask", json!({"message": "Proceed?"}), json!({}));
    let id = t["taskId"].as_str().unwrap().to_owned();
    p.request(2, "tasks/result", json!({"taskId": id}));
    let ask = p.next_matching("elicitation/create", |v| v["method"] == "elicitation/create");
    assert_eq!(ask["params"]["message"], "Proceed?");
    assert_eq!(related(&ask["params"]), id.as_str(), "{ask}");
    status_note(&mut p, &id, "input_required");
    assert_eq!(p.ok(3, "tasks/get", json!({"taskId": id}))["status"], "input_required");
    p.send_json(&json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "accept", "content": {"answer": "yes"}}}));
    status_note(&mut p, &id, "working");
    let r = p.response(2);
    assert_eq!(text_of(&r["result"]), "answer: yes");

    let t = start_task(&mut p, 4, "sample", json!({"message": "Say hi"}), json!({}));
    let id = t["taskId"].as_str().unwrap().to_owned();
    let ask = p.next_matching("sampling/createMessage", |v| v["method"] == "sampling/createMessage");
    assert_eq!(related(&ask["params"]), id.as_str());
    p.send_json(&json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"role": "assistant", "model": "m", "content": {"type": "text", "text": "hi"}}}));
    assert_eq!(text_of(&p.ok(5, "tasks/result", json!({"taskId": id}))), "model said: hi");
}

#[test]
fn an_upstream_crash_mid_task_fails_its_tasks_with_a_clear_message() {
    let mut p = proxy(&[]);
    let a = start_task(&mut p, 1, "slow", json!({"ms": 60_000}), json!({}))["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = start_task(&mut p, 2, "slow", json!({"ms": 60_000}), json!({}))["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    p.request(3, "tasks/result", json!({"taskId": a}));
    p.request(4, "tools/call", json!({"name": "crash", "arguments": {"code": 9, "after_ms": 100}}));
    for id in [&a, &b] {
        let note = status_note(&mut p, id, "failed");
        let msg = note["statusMessage"].as_str().unwrap();
        assert!(msg.contains("upstream") && msg.contains("status 9"), "{msg}");
    }
    let r = p.response(3);
    assert!(r["error"]["message"].as_str().unwrap().contains("status 9"), "{r}");
    assert_eq!(p.wait_exit(WAIT).code(), Some(9));
}

#[test]
fn the_client_going_away_while_tasks_run_leaves_nothing_behind() {
    let mut p = proxy(&["--shutdown-grace-ms", "300"]);
    let pid = text_of(&p.tool(1, "pid", json!({}))["result"]).parse::<u32>().unwrap();
    for i in 0..5 {
        start_task(&mut p, 10 + i, "slow", json!({"ms": 60_000}), json!({}));
    }
    p.close_stdin();
    assert!(p.wait_exit(WAIT).success());
    assert!(wait_gone(pid, Duration::from_secs(3)));
    assert!(!alive(pid));
}

#[test]
fn expired_tasks_are_gone_and_running_ones_are_cancelled_upstream() {
    let mut p = proxy(&[]);
    let done = start_task(&mut p, 1, "echo", json!({"text": "x"}), json!({"ttl": 1000}));
    let running = start_task(&mut p, 2, "slow", json!({"ms": 60_000}), json!({"ttl": 1000}));
    let keep = start_task(&mut p, 3, "echo", json!({"text": "kept"}), json!({"ttl": 60_000}));
    std::thread::sleep(Duration::from_millis(2500));
    for (i, t) in [&done, &running].into_iter().enumerate() {
        let r = p.call(10 + i as u64, "tasks/get", json!({"taskId": t["taskId"]}));
        assert_eq!(r["error"]["code"], -32602, "{r}");
        let r = p.call(20 + i as u64, "tasks/result", json!({"taskId": t["taskId"]}));
        assert!(r["error"]["message"].as_str().unwrap().contains("expired"), "{r}");
    }
    assert_eq!(text_of(&p.ok(30, "tasks/result", json!({"taskId": keep["taskId"]}))), "kept");
    let n: u64 = text_of(&p.tool(31, "cancelled", json!({}))["result"]).parse().unwrap();
    assert_eq!(n, 1, "the expired running call was cancelled upstream");
}

#[test]
fn the_live_task_cap_refuses_new_tasks_clearly() {
    let cfg = config_file("cap", "[tasks]\nmax_live_tasks = 3\n");
    let mut p = proxy(&["--config", cfg.to_str().unwrap()]);
    for i in 0..3 {
        start_task(&mut p, i, "slow", json!({"ms": 60_000}), json!({}));
    }
    let r = p.call(9, "tools/call", json!({"name": "slow", "arguments": {"ms": 1}, "task": {}}));
    let msg = r["error"]["message"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(msg.contains('3') && msg.contains("max_live_tasks"), "{msg}");
    // Plain calls still work.
    assert_eq!(text_of(&p.tool(10, "echo", json!({"text": "ok"}))["result"]), "ok");
}

#[test]
fn sync_clients_get_keepalives_that_keep_increasing() {
    let cfg = config_file("keepalive", "[tasks]\nkeepalive_after_ms = 200\nkeepalive_interval_ms = 200\n");
    let mut p =
        Peer::start(&["--config", cfg.to_str().unwrap(), "--log-level", "warn", "--", BIN, "test-server"]);
    p.initialize(json!({}));
    p.request(1, "tools/call", json!({"name": "progress", "arguments": {"steps": 2, "interval_ms": 50}, "_meta": {"progressToken": "pt"}}));
    p.response(1);
    p.request(
        2,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 1300}, "_meta": {"progressToken": 77}}),
    );
    let r = p.response(2);
    assert_eq!(text_of(&r["result"]), "slept 1300 ms");
    let notes: Vec<Value> = p
        .backlog
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["method"] == "notifications/progress" && v["params"]["progressToken"] == 77)
        .collect();
    assert!(notes.len() >= 3, "keep-alives: {notes:?}");
    let values: Vec<f64> = notes.iter().map(|n| n["params"]["progress"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[1] > w[0]), "{values:?}");
    assert!(notes[0]["params"]["message"].as_str().unwrap().contains("slow"));
    // The upstream's own progress passed through untouched; no keep-alive for a call that was fast.
    let upstream: Vec<&String> = p.backlog.iter().filter(|l| l.contains("\"pt\"")).collect();
    assert_eq!(upstream.len(), 2, "{upstream:?}");
}

#[test]
fn a_plain_call_past_the_sync_deadline_is_handed_off_and_nothing_is_lost() {
    let mut p = Peer::start(&["--sync-deadline-ms", "300", "--log-level", "warn", "--", BIN, "test-server"]);
    p.initialize(json!({}));
    let tools = p.ok(1, "tools/list", json!({}))["tools"].as_array().unwrap().clone();
    let names: HashSet<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains("asyncify_task_status") && names.contains("asyncify_task_result"));

    // A fast call is untouched.
    assert_eq!(text_of(&p.tool(2, "echo", json!({"text": "quick"}))["result"]), "quick");
    let started = Instant::now();
    let r = p.tool(3, "slow", json!({"ms": 1500, "text": "the real answer"}));
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1200), "answered at the deadline, not the end: {waited:?}");
    let text = text_of(&r["result"]).to_owned();
    let task = related(&r["result"]).as_str().unwrap().to_owned();
    assert!(text.contains(&task) && text.contains("asyncify_task_result"), "{text}");

    let status = p.tool(4, "asyncify_task_status", json!({"taskId": task}));
    assert_eq!(status["result"]["structuredContent"]["status"], "working", "{status}");
    let done = p.tool(5, "asyncify_task_result", json!({"taskId": task, "waitSeconds": 10}));
    assert_eq!(text_of(&done["result"]), "the real answer");
    let gone = p.tool(6, "asyncify_task_result", json!({"taskId": "nope"}));
    assert_eq!(gone["result"]["isError"], true);
    // A wrong argument name is named in the answer (the model can correct itself).
    for (id, args) in [(7, json!({"task_id": task})), (8, json!({})), (9, json!({"taskId": 42}))] {
        let wrong = p.tool(id, "asyncify_task_result", args.clone());
        assert_eq!(wrong["result"]["isError"], true, "{args}: {wrong}");
        let text = text_of(&wrong["result"]).to_owned();
        assert!(text.contains("taskId") && text.contains("string"), "{args}: {text}");
    }
    // The late upstream answer to id 3 was not sent to the client a second time.
    assert!(!p.backlog.iter().any(|l| l.contains("\"id\":3")), "{:?}", p.backlog);
}

#[test]
fn a_handed_off_call_counts_its_age_from_the_call_not_the_hand_off() {
    let mut p = Peer::start(&["--sync-deadline-ms", "1300", "--log-level", "warn", "--", BIN, "test-server"]);
    p.initialize(json!({}));
    let r = p.tool(2, "slow", json!({"ms": 4000, "text": "late"}));
    let task = related(&r["result"]).as_str().unwrap().to_owned();
    let status = p.tool(3, "asyncify_task_status", json!({"taskId": task}));
    let text = text_of(&status["result"]).to_owned();
    assert!(text.contains("started 1 s ago"), "the call began 1.3 s before the hand-off: {text}");
    // The task's createdAt is the call's start too: a client computing its age agrees with the text.
    let created = status["result"]["structuredContent"]["createdAt"].as_str().unwrap().to_owned();
    let updated = status["result"]["structuredContent"]["lastUpdatedAt"].as_str().unwrap().to_owned();
    assert!(created < updated, "createdAt {created} is before the hand-off {updated}");
}

#[test]
fn status_notifications_are_only_sent_to_clients_that_speak_tasks() {
    let mut p = Peer::start(&["--sync-deadline-ms", "200", "--log-level", "warn", "--", BIN, "test-server"]);
    p.initialize(json!({}));
    let r = p.tool(1, "slow", json!({"ms": 600}));
    let task = related(&r["result"]).clone();
    let done = p.tool(2, "asyncify_task_result", json!({"taskId": task}));
    assert_eq!(text_of(&done["result"]), "slept 600 ms");
    assert!(!p.backlog.iter().any(|l| l.contains("notifications/tasks/status")), "{:?}", p.backlog);
}

#[test]
fn a_tasks_progress_reaches_the_client_tagged_with_the_task() {
    // The original request's progressToken stays valid for the task's life (2025-11-25 §Task
    // Progress Notifications); its progress is related to the task, so it carries related-task.
    let mut p = proxy(&[]);
    let args = json!({"steps": 2, "interval_ms": 50});
    let r = p.ok(
        1,
        "tools/call",
        json!({"name": "progress", "arguments": args, "task": {}, "_meta": {"progressToken": "tok-1"}}),
    );
    let task_id = r["task"]["taskId"].as_str().unwrap().to_owned();
    let note = p.next_matching("progress of the task", |v| v["method"] == "notifications/progress");
    assert_eq!(note["params"]["progressToken"], "tok-1");
    assert_eq!(related(&note["params"]), &json!(task_id), "{note}");
}
