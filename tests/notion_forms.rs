//! Every form Notion answers in, end to end: the built binary as the stdio wrapper and as the HTTP
//! sidecar, in front of the Notion simulator answering in each form (`--async-shape`, text or
//! structured content, full or minimal poll answers, finished tasks expiring). Each task must end in
//! the status the simulator planned for it, with the page in its result and no async envelope left in
//! `content` or `structuredContent`.

mod common;

use common::{BIN, Peer, Served};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One way the simulator answers.
#[derive(Clone, Copy, Debug)]
struct Form {
    shape: &'static str,
    envelope: &'static str,
    minimal: bool,
}

fn every_form() -> Vec<Form> {
    let mut forms = Vec::new();
    for shape in ["published", "envelope", "hybrid"] {
        for envelope in ["text", "structured"] {
            for minimal in [false, true] {
                forms.push(Form { shape, envelope, minimal });
            }
        }
    }
    forms
}

fn sim_args(form: Form, log: &str, seed: usize) -> Vec<String> {
    let mut args: Vec<String> = [
        "notion-sim",
        "--log-level",
        "error",
        "--request-log",
        log,
        "--work-ms",
        "300",
        "--suggested-backoff-ms",
        "100",
        "--rate-limit",
        "0",
        "--failure-rate",
        "0.5",
        "--extra-fields",
        "--async-shape",
        form.shape,
        "--envelope",
        form.envelope,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--seed".to_string(), (seed + 3).to_string()]);
    if form.minimal {
        args.push("--minimal-polls".into());
    }
    args
}

fn log_path(name: &str) -> PathBuf {
    let log = common::scratch().join(format!("forms-{name}.jsonl"));
    let _ = std::fs::remove_file(&log);
    log
}

/// What the simulator planned for each Notion task: whether it fails.
fn planned(log: &PathBuf) -> HashMap<String, bool> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["outcome"] == "async_task")
        .map(|l| (l["detail"]["task_id"].as_str().unwrap().to_owned(), l["detail"]["fails"] == true))
        .collect()
}

/// A client in front of the proxy: `call` sends one request and returns its whole answer.
trait Client {
    fn call(&mut self, id: u64, method: &str, params: Value) -> Value;
}

impl Client for Peer {
    fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        Peer::call(self, id, method, params)
    }
}

/// A 2025-11-25 session with the sidecar.
struct Http {
    addr: String,
    session: String,
}

impl Http {
    fn post(&self, session: Option<&str>, msg: &Value) -> common::Reply {
        let mut headers = vec![
            "Content-Type: application/json".to_owned(),
            "Accept: application/json, text/event-stream".into(),
        ];
        if let Some(s) = session {
            headers.push(format!("Mcp-Session-Id: {s}"));
        }
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        common::http(&self.addr, "POST", "/mcp", &headers, msg.to_string().as_bytes())
    }

    fn open(addr: &str) -> Http {
        let mut http = Http { addr: addr.to_owned(), session: String::new() };
        let r = http.post(
            None,
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
                "capabilities": {"tasks": {}}, "clientInfo": {"name": "forms", "version": "1"}}}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        http.session = r.header("mcp-session-id").expect("a session id").to_owned();
        let n =
            http.post(Some(&http.session), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(n.status, 202);
        http
    }
}

impl Client for Http {
    fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let r = self.post(Some(&self.session.clone()), &msg);
        assert_eq!(r.status, 200, "{method}: {} {}", r.status, r.body);
        r.messages()
            .into_iter()
            .rev()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no answer to {method}: {}", r.body))
    }
}

fn ok(c: &mut dyn Client, id: u64, method: &str, params: Value) -> Value {
    let r = c.call(id, method, params);
    assert!(r.get("error").is_none(), "{method}: {r}");
    r["result"].clone()
}

/// Nothing of Notion's async protocol in what a model reads.
fn assert_no_envelope(form: &str, result: &Value) {
    for part in ["content", "structuredContent"] {
        let text = result.get(part).map(Value::to_string).unwrap_or_default();
        for marker in ["async_task", "status_url", "poll_after_seconds", "suggested_backoff_ms"] {
            assert!(!text.contains(marker), "{form}: {marker} in {part}: {result}");
        }
    }
}

/// Starts four tasks (two duplicates, two creations), waits for each, and checks each against what
/// the simulator planned: `completed` with its page, or `failed` with Notion's error.
fn four_tasks(c: &mut dyn Client, form: &str, log: &PathBuf) {
    let calls = [
        ("notion-duplicate-page", json!({"page_id": "roadmap"})),
        ("notion-create-pages", json!({"pages": [{"properties": {"title": "One"}}]})),
        ("notion-duplicate-page", json!({"page_id": "sprint-template"})),
        ("notion-create-pages", json!({"pages": [{"properties": {"title": "Two"}}]})),
    ];
    let mut tasks = Vec::new();
    for (i, (tool, args)) in calls.iter().enumerate() {
        let created =
            ok(c, 10 + i as u64, "tools/call", json!({"name": tool, "arguments": args, "task": {}}));
        assert_eq!(created["task"]["status"], "working", "{form}: {created}");
        tasks.push(created["task"]["taskId"].as_str().unwrap().to_owned());
    }
    for (i, task) in tasks.iter().enumerate() {
        // Bounded: tasks/get until the task ends (a task that never ends fails here, not by hanging).
        let deadline = Instant::now() + Duration::from_secs(20);
        let got = loop {
            let got = ok(c, 30 + i as u64, "tasks/get", json!({"taskId": task}));
            if matches!(got["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
                break got;
            }
            assert!(Instant::now() < deadline, "{form}: the task never ended: {got}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let result = ok(c, 20 + i as u64, "tasks/result", json!({"taskId": task}));
        let notion_task =
            result["_meta"]["io.mcp-asyncify/notion"]["task_id"].as_str().unwrap_or_else(|| {
                panic!("{form}: the result names its Notion task: {result}");
            });
        let fails = planned(log)[notion_task];
        assert_no_envelope(form, &result);
        if fails {
            assert_eq!(got["status"], "failed", "{form}: {got}");
            let message = got["statusMessage"].as_str().unwrap();
            assert!(
                message.contains("conflict_error") && message.contains("request_id"),
                "{form}: {message}"
            );
            assert_eq!(result["isError"], true, "{form}: {result}");
            assert_eq!(result["structuredContent"]["error"]["code"], "conflict_error", "{form}: {result}");
        } else {
            assert_eq!(got["status"], "completed", "{form}: {got}");
            assert_eq!(result["isError"], false, "{form}: {result}");
            let body = &result["structuredContent"];
            match calls[i].0 {
                "notion-duplicate-page" => {
                    assert_eq!(body["page"]["duplicated_from"], calls[i].1["page_id"], "{form}: {result}")
                }
                _ => assert_eq!(
                    body["pages"][0]["title"], calls[i].1["pages"][0]["properties"]["title"],
                    "{form}: {result}"
                ),
            }
            // Notion's object, unknown fields included, is kept beside the result.
            let kept = &result["_meta"]["io.mcp-asyncify/notion"]["async_task"];
            assert!(kept["estimated_ms"].is_u64(), "{form}: {result}");
        }
    }
    let plan = planned(log);
    assert_eq!(plan.len(), 4, "{form}: {plan:?}");
}

#[test]
fn every_form_through_the_stdio_wrapper() {
    let handles: Vec<_> = every_form()
        .into_iter()
        .enumerate()
        .map(|(n, form)| {
            std::thread::spawn(move || {
                let name = format!("stdio-{}-{}-{}", form.shape, form.envelope, form.minimal);
                let log = log_path(&name);
                let sim = sim_args(form, log.to_str().unwrap(), n);
                let mut args = vec!["--log-level".to_string(), "warn".into(), "--".into(), BIN.into()];
                args.extend(sim);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut p = Peer::start(&args);
                p.initialize(json!({"tasks": {"list": {}, "cancel": {}}}));
                four_tasks(&mut p, &name, &log);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn every_form_through_the_http_sidecar_in_front_of_the_simulator_over_http() {
    let handles: Vec<_> = every_form()
        .into_iter()
        .enumerate()
        .map(|(n, form)| {
            std::thread::spawn(move || {
                let name = format!("http-{}-{}-{}", form.shape, form.envelope, form.minimal);
                let log = log_path(&name);
                let mut args = sim_args(form, log.to_str().unwrap(), n);
                args.extend(["--http".into(), "{addr}".into()]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let sim = Served::start(&args);
                let sidecar = Served::sidecar(&["--upstream-url", &sim.url]);
                let mut c = Http::open(&sidecar.addr);
                four_tasks(&mut c, &name, &log);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_task_polled_after_notions_retention_fails_saying_so() {
    // The work ends at 100 ms and is forgotten 200 ms later; the first poll comes at 1.5 s.
    let log = log_path("retention");
    let sim = [
        "notion-sim",
        "--request-log",
        log.to_str().unwrap(),
        "--work-ms",
        "100",
        "--suggested-backoff-ms",
        "1500",
        "--retention-ms",
        "200",
        "--rate-limit",
        "0",
    ];
    let mut args = vec!["--log-level", "error", "--", BIN];
    args.extend(sim);
    let mut p = Peer::start(&args);
    p.initialize(json!({"tasks": {}}));
    let created = ok(
        &mut p,
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let task = created["task"]["taskId"].as_str().unwrap().to_owned();
    let result = ok(&mut p, 2, "tasks/result", json!({"taskId": task}));
    let got = ok(&mut p, 3, "tasks/get", json!({"taskId": task}));
    assert_eq!(got["status"], "failed", "{got}");
    let message = got["statusMessage"].as_str().unwrap();
    assert!(message.contains("no longer knows") && message.contains("limited time"), "{message}");
    assert!(message.contains("object_not_found"), "{message}");
    assert_eq!(result["isError"], true);
    assert_no_envelope("retention", &result);
}
