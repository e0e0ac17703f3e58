//! Soak: a long mixed workload through the built binary, checking that nothing leaks and nothing is
//! lost.
//!
//! Two sidecars (`mcp-asyncify serve`) run for the whole soak, one in front of the fixture server and
//! one in front of the Notion simulator (with a rate limit below the proxy's budget, so Notion answers
//! `rate_limited` and the proxy must wait). Worker threads loop over scenarios until the time is up:
//! plain calls in 2025-11-25 sessions; 2025-11-25 tasks polled to their result; tasks cancelled;
//! tasks whose session the client dropped, fetched from a new session; calls whose client hung up
//! mid-call; upstream crashes with calls in flight; 2026-07-28 stateless calls, tasks and cancels;
//! Notion tasks from both generations. Sessions end by `DELETE` or are left to the idle reaper.
//!
//! Every call must get its answer or a clear error (a JSON-RPC error or an HTTP error with a body);
//! a call with neither is lost. Every few seconds each sidecar's RSS, open file descriptors
//! (`/proc/<pid>/fd`), threads, child processes and, from its `/metrics`, its live tokio tasks
//! (`asyncify_runtime_tasks`), running tasks and tasks created and expired are sampled. After the load
//! stops, the soak waits for the idle sessions to be reaped and every task's ttl to pass, then checks
//! that each sidecar is back where it started: no upstream process left, the file descriptors and
//! tokio tasks of an idle sidecar, every task created also expired (the store is empty), and a
//! `tasks/list` that is empty. It prints a report and exits non-zero on a loss or a leak.
//!
//! `cargo bench --bench soak` runs 30 minutes; `SOAK_SECS=120 cargo bench --bench soak` for a short
//! check (also `SOAK_WORKERS`, default 8, and `SOAK_ONLY=crash,hangs` to run only the scenarios whose
//! names contain one of the words; `SOAK_SETTLE_SECS`, how long to wait at most for the sidecars to
//! be idle again, default 80). Not part of `cargo test` nor CI.

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use common::rss_kib;
use harness::{BIN, Reply, Served};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every task's ttl: short, so that "the store is empty after ttl" can be checked at the end.
const TTL_MS: u64 = 10_000;
/// Sessions left without `DELETE` are closed after this long idle.
const IDLE_SECS: u64 = 10;
/// The longest any one HTTP exchange may take before it counts as lost.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a task may take to end.
const TASK_TIMEOUT: Duration = Duration::from_secs(90);
const MODERN: &str = "2026-07-28";
const EXT: &str = "io.modelcontextprotocol/tasks";

// ---------------------------------------------------------------------------------------------------
// HTTP

/// One HTTP/1.1 exchange (Connection: close), or why there was none.
fn exchange(addr: &str, method: &str, headers: &[String], body: &[u8]) -> Result<Reply, String> {
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

fn base_headers(auth: &str) -> Vec<String> {
    vec![
        "Content-Type: application/json".into(),
        "Accept: application/json, text/event-stream".into(),
        format!("Authorization: Bearer {auth}"),
    ]
}

/// How one call ended.
enum Outcome {
    /// Its answer.
    Answer(Value),
    /// A clear error: a JSON-RPC error, or an HTTP error status with a body that says why.
    Clear(String),
    /// Nothing, or nothing readable.
    Lost(String),
}

/// Reads the answer to request `id` from an HTTP reply.
fn answer_of(reply: Result<Reply, String>, id: &Value) -> Outcome {
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
struct Session<'a> {
    addr: &'a str,
    auth: String,
    id: String,
    next: u64,
}

impl<'a> Session<'a> {
    fn open(addr: &'a str, auth: &str) -> Result<Session<'a>, String> {
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

    fn headers(&self) -> Vec<String> {
        let mut h = base_headers(&self.auth);
        h.push(format!("Mcp-Session-Id: {}", self.id));
        h.push("MCP-Protocol-Version: 2025-11-25".into());
        h
    }

    fn request_line(&mut self, method: &str, params: Value) -> (Value, Vec<u8>) {
        let id = json!(self.next);
        self.next += 1;
        let line = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string().into_bytes();
        (id, line)
    }

    fn call(&mut self, method: &str, params: Value) -> Outcome {
        let (id, line) = self.request_line(method, params);
        answer_of(exchange(self.addr, "POST", &self.headers(), &line), &id)
    }

    fn delete(&self) {
        let _ = exchange(self.addr, "DELETE", &self.headers(), b"");
    }
}

/// A 2026-07-28 stateless request (no session), with the Tasks extension declared.
fn modern_call(addr: &str, auth: &str, id: u64, method: &str, mut params: Value) -> Outcome {
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

// ---------------------------------------------------------------------------------------------------
// Scenarios

/// The tally of one scenario.
#[derive(Default, Clone)]
struct Tally {
    runs: u64,
    calls: u64,
    answered: u64,
    clear_errors: u64,
    lost: u64,
    examples: Vec<String>,
}

/// What a scenario reports for each call it made.
struct Run<'a> {
    tally: Tally,
    name: &'a str,
}

impl Run<'_> {
    /// Counts a call that must be answered; returns its answer.
    fn expect(&mut self, what: &str, outcome: Outcome) -> Option<Value> {
        self.tally.calls += 1;
        match outcome {
            Outcome::Answer(v) => {
                self.tally.answered += 1;
                Some(v)
            }
            Outcome::Clear(e) => {
                self.tally.clear_errors += 1;
                self.note(format!("{what}: error {e}"));
                None
            }
            Outcome::Lost(e) => self.lose(format!("{what}: {e}")),
        }
    }

    /// Counts a call where a clear error is a right answer (the upstream crashed under it).
    fn expect_answer_or_error(&mut self, outcome: Outcome) {
        self.tally.calls += 1;
        match outcome {
            Outcome::Answer(_) => self.tally.answered += 1,
            Outcome::Clear(_) => self.tally.clear_errors += 1,
            Outcome::Lost(e) => {
                self.lose(e);
            }
        }
    }

    /// A call whose answer was wrong or never came.
    fn lose(&mut self, why: String) -> Option<Value> {
        self.tally.lost += 1;
        self.note(why);
        None
    }

    fn note(&mut self, why: String) {
        if self.tally.examples.len() < 3 {
            self.tally.examples.push(format!("{}: {why}", self.name));
        }
    }

    /// Whether a tool result's text is `want`.
    fn check_text(&mut self, what: &str, result: Option<Value>, want: &str) {
        if let Some(r) = result {
            let text = r["content"][0]["text"].as_str().unwrap_or_default();
            if text != want {
                self.tally.answered -= 1;
                self.lose(format!("{what}: wrong answer {r}"));
            }
        }
    }
}

/// Polls a 2025-11-25 task until it ends; its final status.
fn wait_legacy_task(run: &mut Run, s: &mut Session, task_id: &str) -> Option<String> {
    let deadline = Instant::now() + TASK_TIMEOUT;
    loop {
        let got = run.expect("tasks/get", s.call("tasks/get", json!({"taskId": task_id})))?;
        let status = got["status"].as_str().unwrap_or_default().to_owned();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return Some(status);
        }
        if Instant::now() > deadline {
            run.lose(format!("task {task_id} still {status} after {} s", TASK_TIMEOUT.as_secs()));
            return None;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// Polls a 2026-07-28 task until it ends; its DetailedTask.
fn wait_modern_task(run: &mut Run, addr: &str, auth: &str, task_id: &str) -> Option<Value> {
    let deadline = Instant::now() + TASK_TIMEOUT;
    let mut id = 100;
    loop {
        id += 1;
        let got =
            run.expect("tasks/get", modern_call(addr, auth, id, "tasks/get", json!({"taskId": task_id})))?;
        if matches!(got["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            return Some(got);
        }
        if Instant::now() > deadline {
            run.lose(format!("task {task_id} still {} after {} s", got["status"], TASK_TIMEOUT.as_secs()));
            return None;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

fn task_id_of(result: &Option<Value>) -> Option<String> {
    let r = result.as_ref()?;
    r["task"]["taskId"].as_str().or(r["taskId"].as_str()).map(str::to_owned)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    LegacyPlain,
    LegacyTask,
    LegacyCancel,
    SessionDropped,
    ClientHangsUp,
    UpstreamCrash,
    ModernPlain,
    ModernTask,
    ModernCancel,
    NotionLegacy,
    NotionModern,
}

impl Scenario {
    const ALL: [Scenario; 11] = [
        Scenario::LegacyPlain,
        Scenario::LegacyTask,
        Scenario::LegacyCancel,
        Scenario::SessionDropped,
        Scenario::ClientHangsUp,
        Scenario::UpstreamCrash,
        Scenario::ModernPlain,
        Scenario::ModernTask,
        Scenario::ModernCancel,
        Scenario::NotionLegacy,
        Scenario::NotionModern,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::LegacyPlain => "2025-11-25 plain calls",
            Scenario::LegacyTask => "2025-11-25 task",
            Scenario::LegacyCancel => "2025-11-25 task cancelled",
            Scenario::SessionDropped => "task, session dropped, fetched later",
            Scenario::ClientHangsUp => "client hangs up mid-call",
            Scenario::UpstreamCrash => "upstream crash, calls in flight",
            Scenario::ModernPlain => "2026-07-28 plain call",
            Scenario::ModernTask => "2026-07-28 task",
            Scenario::ModernCancel => "2026-07-28 task cancelled",
            Scenario::NotionLegacy => "Notion task, 2025-11-25",
            Scenario::NotionModern => "Notion task, 2026-07-28",
        }
    }
}

struct Sidecars {
    fixture: String,
    notion: String,
}

fn run_scenario(which: Scenario, sc: &Sidecars, worker: usize, n: u64) -> Tally {
    let mut run = Run { tally: Tally { runs: 1, ..Tally::default() }, name: which.name() };
    let auth = format!("soak-{worker}");
    let text = format!("w{worker}-{n}");
    let r = &mut run;
    match which {
        Scenario::LegacyPlain => match Session::open(&sc.fixture, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                for i in 0..5 {
                    let want = format!("{text}-{i}");
                    let got = r.expect(
                        "echo",
                        s.call("tools/call", json!({"name":"echo","arguments":{"text":want}})),
                    );
                    r.check_text("echo", got, &want);
                }
                let got = r.expect(
                    "slow",
                    s.call("tools/call", json!({"name":"slow","arguments":{"ms":100,"text":text}})),
                );
                r.check_text("slow", got, &text);
                // Half the sessions end with DELETE, half are left to the idle reaper.
                if n.is_multiple_of(2) {
                    s.delete();
                }
            }
        },
        Scenario::LegacyTask | Scenario::SessionDropped => match Session::open(&sc.fixture, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                let created = r.expect(
                    "task call",
                    s.call(
                        "tools/call",
                        json!({"name":"slow","arguments":{"ms":400,"text":text},"task":{"ttl":TTL_MS}}),
                    ),
                );
                let Some(task_id) = task_id_of(&created) else {
                    if created.is_some() {
                        r.lose(format!("no task in {created:?}"));
                    }
                    return run.tally;
                };
                let mut s = if which == Scenario::SessionDropped {
                    // The client goes away without a word; it comes back with the same credential.
                    drop(s);
                    match Session::open(&sc.fixture, &auth) {
                        Ok(s) => s,
                        Err(e) => {
                            r.lose(format!("reopen: {e}"));
                            return run.tally;
                        }
                    }
                } else {
                    s
                };
                if let Some(status) = wait_legacy_task(r, &mut s, &task_id) {
                    if status != "completed" {
                        r.lose(format!("task ended {status}"));
                    }
                    let result = r.expect("tasks/result", s.call("tasks/result", json!({"taskId": task_id})));
                    r.check_text("tasks/result", result, &text);
                }
                s.delete();
            }
        },
        Scenario::LegacyCancel => match Session::open(&sc.fixture, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                let created = r.expect(
                    "task call",
                    s.call(
                        "tools/call",
                        json!({"name":"slow","arguments":{"ms":20_000},"task":{"ttl":TTL_MS}}),
                    ),
                );
                if let Some(task_id) = task_id_of(&created) {
                    std::thread::sleep(Duration::from_millis(100));
                    let cancelled =
                        r.expect("tasks/cancel", s.call("tasks/cancel", json!({"taskId": task_id})));
                    if let Some(c) = cancelled
                        && c["status"] != "cancelled"
                    {
                        r.lose(format!("tasks/cancel answered {c}"));
                    }
                    let got = r.expect("tasks/get", s.call("tasks/get", json!({"taskId": task_id})));
                    if let Some(g) = got
                        && g["status"] != "cancelled"
                    {
                        r.lose(format!("a cancelled task reads {g}"));
                    }
                }
                s.delete();
            }
        },
        Scenario::ClientHangsUp => match Session::open(&sc.fixture, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                // A call whose client closes the connection before the answer: no one is there to
                // lose it, but the session and the sidecar must go on unharmed.
                let (_, line) = s.request_line("tools/call", json!({"name":"slow","arguments":{"ms":1500}}));
                if let Ok(mut conn) = TcpStream::connect(&sc.fixture) {
                    let mut req = format!(
                        "POST /mcp HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
                        sc.fixture,
                        line.len()
                    );
                    for h in s.headers() {
                        req.push_str(&h);
                        req.push_str("\r\n");
                    }
                    req.push_str("\r\n");
                    let _ = conn.write_all(req.as_bytes()).and_then(|_| conn.write_all(&line));
                    std::thread::sleep(Duration::from_millis(100));
                }
                let got = r.expect(
                    "echo after",
                    s.call("tools/call", json!({"name":"echo","arguments":{"text":text}})),
                );
                r.check_text("echo after a hang-up", got, &text);
                if n.is_multiple_of(2) {
                    s.delete();
                }
            }
        },
        Scenario::UpstreamCrash => match Session::open(&sc.fixture, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                let (slow_id, slow) =
                    s.request_line("tools/call", json!({"name":"slow","arguments":{"ms":3000}}));
                let (task_id_req, task) = s.request_line(
                    "tools/call",
                    json!({"name":"slow","arguments":{"ms":3000},"task":{"ttl":TTL_MS}}),
                );
                let headers = s.headers();
                let addr = sc.fixture.clone();
                let in_flight = std::thread::spawn(move || {
                    let a = std::thread::spawn({
                        let (addr, headers) = (addr.clone(), headers.clone());
                        move || answer_of(exchange(&addr, "POST", &headers, &slow), &slow_id)
                    });
                    let t = answer_of(exchange(&addr, "POST", &headers, &task), &task_id_req);
                    (a.join().unwrap(), t)
                });
                std::thread::sleep(Duration::from_millis(200));
                let crash =
                    s.call("tools/call", json!({"name":"crash","arguments":{"code":3,"after_ms":50}}));
                r.expect_answer_or_error(crash);
                let (slow, task) = in_flight.join().unwrap();
                // The plain call in flight gets an error naming the exit; the task call got its
                // CreateTaskResult before the crash, and the task must end (failed) rather than hang.
                r.expect_answer_or_error(slow);
                if let Outcome::Answer(created) = &task
                    && let Some(task_id) = task_id_of(&Some(created.clone()))
                {
                    r.tally.calls += 1;
                    r.tally.answered += 1;
                    // Its session is gone with its upstream: the task is read from a new session.
                    match Session::open(&sc.fixture, &auth) {
                        Ok(mut again) => {
                            if let Some(status) = wait_legacy_task(r, &mut again, &task_id)
                                && status != "failed"
                            {
                                r.lose(format!("a task whose upstream crashed ended {status}"));
                            }
                            again.delete();
                        }
                        Err(e) => {
                            r.lose(format!("reopen: {e}"));
                        }
                    }
                } else {
                    r.expect_answer_or_error(task);
                }
                // The crashed session answers clearly from now on.
                let after = s.call("tools/call", json!({"name":"echo","arguments":{"text":"x"}}));
                r.expect_answer_or_error(after);
            }
        },
        Scenario::ModernPlain => {
            let got = r.expect(
                "echo",
                modern_call(
                    &sc.fixture,
                    &auth,
                    1,
                    "tools/call",
                    json!({"name":"echo","arguments":{"text":text}}),
                ),
            );
            r.check_text("echo", got, &text);
        }
        Scenario::ModernTask | Scenario::ModernCancel => {
            let ms = if which == Scenario::ModernTask { 800 } else { 20_000 };
            let created = r.expect(
                "task call",
                modern_call(
                    &sc.fixture,
                    &auth,
                    1,
                    "tools/call",
                    json!({"name":"slow","arguments":{"ms":ms,"text":text}}),
                ),
            );
            let Some(task_id) = task_id_of(&created) else {
                if created.is_some() {
                    r.lose(format!("no task in {created:?}"));
                }
                return run.tally;
            };
            if which == Scenario::ModernCancel {
                r.expect(
                    "tasks/cancel",
                    modern_call(&sc.fixture, &auth, 2, "tasks/cancel", json!({"taskId": task_id})),
                );
            }
            if let Some(done) = wait_modern_task(r, &sc.fixture, &auth, &task_id) {
                match which {
                    Scenario::ModernTask => {
                        r.check_text("the task's result", Some(done["result"].clone()), &text)
                    }
                    _ if done["status"] != "cancelled" => {
                        r.lose(format!("a cancelled task reads {done}"));
                    }
                    _ => {}
                }
            }
        }
        Scenario::NotionLegacy => match Session::open(&sc.notion, &auth) {
            Err(e) => {
                r.lose(format!("open: {e}"));
            }
            Ok(mut s) => {
                let args = json!({"pages":[{"properties":{"title":text}}]});
                let created = r.expect(
                    "task call",
                    s.call(
                        "tools/call",
                        json!({"name":"notion-create-pages","arguments":args,"task":{"ttl":TTL_MS}}),
                    ),
                );
                if let Some(task_id) = task_id_of(&created)
                    && let Some(status) = wait_legacy_task(r, &mut s, &task_id)
                {
                    // The simulator fails some operations on purpose: failed, with Notion's error,
                    // is an answer too.
                    let result = r.expect("tasks/result", s.call("tasks/result", json!({"taskId": task_id})));
                    if let Some(result) = result
                        && (status == "completed") == (result["isError"] == true)
                    {
                        r.lose(format!("task {status} with result {result}"));
                    }
                }
                s.delete();
            }
        },
        Scenario::NotionModern => {
            let args = json!({"pages":[{"properties":{"title":text}}]});
            let created = r.expect(
                "task call",
                modern_call(
                    &sc.notion,
                    &auth,
                    1,
                    "tools/call",
                    json!({"name":"notion-create-pages","arguments":args}),
                ),
            );
            if let Some(task_id) = task_id_of(&created)
                && let Some(done) = wait_modern_task(r, &sc.notion, &auth, &task_id)
                && done["status"] != "completed"
            {
                r.lose(format!("a Notion task reads {done}"));
            } else if let Some(c) = &created
                && c["resultType"] == "complete"
                && c["content"].is_null()
            {
                r.lose(format!("an inline answer without content: {c}"));
            }
        }
    }
    run.tally
}

// ---------------------------------------------------------------------------------------------------
// Sampling

#[derive(Clone, Default)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    children: u64,
    runtime_tasks: f64,
    active_tasks: f64,
    created: f64,
    expired: f64,
    rate_limited: f64,
    notion_requests: f64,
}

impl Sample {
    fn stored(&self) -> f64 {
        self.created - self.expired
    }
}

fn count_dir(path: &str) -> u64 {
    std::fs::read_dir(path).map(|d| d.count() as u64).unwrap_or(0)
}

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // "pid (comm) state ppid …": comm may hold spaces, so read after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                == Some(pid)
        })
        .count() as u64
}

/// The sum over every series of a metric in a Prometheus text page (`filter`: a label that must appear).
fn metric(page: &str, name: &str, filter: Option<&str>) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter(|l| filter.is_none_or(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

fn sample(pid: u32, addr: &str, start: Instant) -> Sample {
    let page = TcpStream::connect(addr)
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok(Reply::parse(&raw).body)
        })
        .unwrap_or_default();
    Sample {
        at: start.elapsed(),
        rss_kib: rss_kib(pid),
        fds: count_dir(&format!("/proc/{pid}/fd")),
        threads: threads(pid),
        children: children(pid),
        runtime_tasks: metric(&page, "asyncify_runtime_tasks", None),
        active_tasks: metric(&page, "asyncify_task_active", None),
        created: metric(&page, "asyncify_task_created_total", None),
        expired: metric(&page, "asyncify_task_expired_total", None),
        rate_limited: metric(&page, "asyncify_notion_requests_total", Some("rate_limited")),
        notion_requests: metric(&page, "asyncify_notion_requests_total", None),
    }
}

// ---------------------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let secs = env_u64("SOAK_SECS", 1800);
    let workers = env_u64("SOAK_WORKERS", 8).max(1) as usize;
    // SOAK_ONLY=crash,hang…: only the scenarios whose name contains one of these words.
    let only: Vec<String> =
        std::env::var("SOAK_ONLY").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default();
    let scenarios: Arc<Vec<Scenario>> = Arc::new(
        Scenario::ALL
            .into_iter()
            .filter(|s| only.is_empty() || only.iter().any(|o| s.name().contains(o.as_str())))
            .collect(),
    );
    assert!(!scenarios.is_empty(), "SOAK_ONLY={only:?} matches no scenario");
    let dir = std::env::temp_dir().join(format!("asyncify-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks]\ndefault_ttl_ms = {TTL_MS}\nmax_ttl_ms = {TTL_MS}\ntask_after_ms = 200\n\n[notion]\nbudget_per_second = 12\ndefault_backoff_ms = 300\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let idle = IDLE_SECS.to_string();
    let fixture = Served::start(&[
        "serve",
        "--listen",
        "{addr}",
        "--log-level",
        "error",
        "--config",
        &config,
        "--session-idle-secs",
        &idle,
        "--",
        BIN,
        "test-server",
    ]);
    // The simulator allows 1 request/s per session and the proxy's budget is 12/s: Notion answers
    // rate_limited (429) and every poll must wait its retry-after.
    let notion = Served::start(&[
        "serve",
        "--listen",
        "{addr}",
        "--log-level",
        "error",
        "--profile",
        "notion",
        "--config",
        &config,
        "--session-idle-secs",
        &idle,
        "--",
        BIN,
        "notion-sim",
        "--rate-limit",
        "1",
        "--retry-after",
        "0.5",
        "--work-ms",
        "700",
        "--work-jitter-ms",
        "600",
        "--suggested-backoff-ms",
        "300",
        "--failure-rate",
        "0.1",
        "--retrying-rate",
        "0.2",
    ]);
    let sidecars = Arc::new(Sidecars { fixture: fixture.addr.clone(), notion: notion.addr.clone() });
    let procs = [
        ("fixture sidecar", fixture.pid(), fixture.addr.clone()),
        ("Notion sidecar", notion.pid(), notion.addr.clone()),
    ];
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let idle_before: Vec<Sample> = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();

    eprintln!(
        "soak: {secs} s, {workers} workers, two sidecars (pids {} and {}); task ttl {} s, sessions idle after {IDLE_SECS} s",
        fixture.pid(),
        notion.pid(),
        TTL_MS / 1000
    );
    let deadline = start + Duration::from_secs(secs);
    let tallies: Arc<Mutex<BTreeMap<Scenario, Tally>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Vec<Sample>>>> = Arc::new(Mutex::new(vec![Vec::new(); procs.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_secs((secs / 60).clamp(2, 30));
    let sampler = {
        let (samples, stop, procs) = (samples.clone(), stop.clone(), procs.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (i, (_, pid, addr)) in procs.iter().enumerate() {
                    let s = sample(*pid, addr, start);
                    samples.lock().unwrap()[i].push(s);
                }
                let next = Instant::now() + every;
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let progress = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (sidecars, tallies, progress) = (sidecars.clone(), tallies.clone(), progress.clone());
            let scenarios = scenarios.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let which = scenarios[(w + n as usize) % scenarios.len()];
                    let t = run_scenario(which, &sidecars, w, n);
                    let mut all = tallies.lock().unwrap();
                    let e = all.entry(which).or_default();
                    e.runs += t.runs;
                    e.calls += t.calls;
                    e.answered += t.answered;
                    e.clear_errors += t.clear_errors;
                    e.lost += t.lost;
                    for x in t.examples {
                        if e.examples.len() < 3 {
                            e.examples.push(x);
                        }
                    }
                    n += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut last_report = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:>5} s, {} scenarios run",
                start.elapsed().as_secs(),
                progress.load(Ordering::Relaxed)
            );
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    let load_ended = start.elapsed();
    // Quiesce: idle sessions are reaped, every task's ttl passes and the sweep deletes it.
    let settle = env_u64("SOAK_SETTLE_SECS", IDLE_SECS + TTL_MS / 1000 + 60);
    let quiet_deadline = Instant::now() + Duration::from_secs(settle);
    let mut settled: Vec<Sample>;
    loop {
        settled = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();
        let done = settled.iter().zip(&idle_before).all(|(s, before)| {
            s.children == 0
                && s.active_tasks == 0.0
                && s.stored() == 0.0
                && s.runtime_tasks <= before.runtime_tasks + 4.0
        });
        if done || Instant::now() > quiet_deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let quiet_after = start.elapsed() - load_ended;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    // What each credential still sees in tasks/list.
    let mut listed = 0;
    for w in 0..workers {
        if let Ok(mut s) = Session::open(&sidecars.fixture, &format!("soak-{w}")) {
            if let Outcome::Answer(l) = s.call("tasks/list", json!({})) {
                listed += l["tasks"].as_array().map_or(0, Vec::len);
            }
            s.delete();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after_list: Vec<Sample> = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();

    // Report.
    let tallies = tallies.lock().unwrap();
    let samples = samples.lock().unwrap();
    println!(
        "\n## Soak: {} s of load, {workers} workers, then {} s to settle\n",
        load_ended.as_secs(),
        quiet_after.as_secs()
    );
    println!("| scenario | runs | calls | answered | clear errors | lost |");
    println!("|---|---|---|---|---|---|");
    let mut total = Tally::default();
    for (which, t) in tallies.iter() {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            which.name(),
            t.runs,
            t.calls,
            t.answered,
            t.clear_errors,
            t.lost
        );
        total.runs += t.runs;
        total.calls += t.calls;
        total.answered += t.answered;
        total.clear_errors += t.clear_errors;
        total.lost += t.lost;
    }
    println!(
        "| **all** | {} | {} | {} | {} | {} |",
        total.runs, total.calls, total.answered, total.clear_errors, total.lost
    );
    let examples: Vec<&String> = tallies.values().flat_map(|t| t.examples.iter()).collect();
    if !examples.is_empty() {
        println!("\nErrors and losses (first of each kind):");
        for e in examples {
            println!("* {e}");
        }
    }
    let mut leaks = Vec::new();
    println!(
        "\n| process | when | RSS MiB | fds | threads | upstreams | tokio tasks | tasks running | tasks stored | Notion 429s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (name, _, _)) in procs.iter().enumerate() {
        let series = &samples[i];
        let during: Vec<&Sample> = series.iter().filter(|s| s.at <= load_ended).collect();
        let peak = |f: fn(&Sample) -> f64| during.iter().map(|s| f(s)).fold(0.0, f64::max);
        // RSS flatness: the highest in the first and in the last quarter of the load.
        let quarter = |from: f64, to: f64| {
            during
                .iter()
                .filter(|s| {
                    let at = s.at.as_secs_f64() / load_ended.as_secs_f64();
                    at >= from && at <= to
                })
                .map(|s| s.rss_kib)
                .max()
                .unwrap_or(0)
        };
        let row = |when: &str, s: &Sample| {
            println!(
                "| {name} | {when} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.threads,
                s.children,
                s.runtime_tasks,
                s.active_tasks,
                s.stored(),
                s.rate_limited
            );
        };
        row("idle, before", &idle_before[i]);
        println!(
            "| {name} | peak under load | {:.1} | {} | {} | {} | {} | {} | {} | |",
            peak(|s| s.rss_kib as f64) / 1024.0,
            peak(|s| s.fds as f64),
            peak(|s| s.threads as f64),
            peak(|s| s.children as f64),
            peak(|s| s.runtime_tasks),
            peak(|s| s.active_tasks),
            peak(|s| s.stored())
        );
        row("settled after ttl", &settled[i]);
        row("after tasks/list", &after_list[i]);
        let (first, last) = (quarter(0.0, 0.25), quarter(0.75, 1.0));
        println!(
            "\n{name}: RSS peak in the first quarter of the load {:.1} MiB, in the last {:.1} MiB ({:+.1} %); {} tasks created, {} expired",
            first as f64 / 1024.0,
            last as f64 / 1024.0,
            if first > 0 { (last as f64 / first as f64 - 1.0) * 100.0 } else { 0.0 },
            settled[i].created,
            settled[i].expired
        );
        let (before, after) = (&idle_before[i], &settled[i]);
        if after.children > 0 {
            leaks.push(format!("{name}: {} upstream processes left", after.children));
        }
        if after.stored() > 0.0 || after.active_tasks > 0.0 {
            leaks.push(format!(
                "{name}: {} tasks still stored, {} running",
                after.stored(),
                after.active_tasks
            ));
        }
        if after.fds > before.fds + 4 {
            leaks.push(format!("{name}: {} open fds, {} when idle before", after.fds, before.fds));
        }
        if after.runtime_tasks > before.runtime_tasks + 4.0 {
            leaks.push(format!(
                "{name}: {} tokio tasks, {} when idle before",
                after.runtime_tasks, before.runtime_tasks
            ));
        }
        if first > 0 && last as f64 > first as f64 * 1.5 + 8192.0 {
            leaks.push(format!("{name}: RSS grew from {first} KiB to {last} KiB under the same load"));
        }
    }
    println!("\ntasks/list after ttl, every credential: {listed} tasks");
    if listed > 0 {
        leaks.push(format!("tasks/list still lists {listed} tasks after their ttl"));
    }
    let notion_429 = settled[1].rate_limited;
    println!(
        "Notion: {} requests by the proxy (task starts and polls), {notion_429} of them answered rate_limited and waited out",
        settled[1].notion_requests
    );
    if notion_429 == 0.0 && load_ended > Duration::from_secs(30) {
        println!("(no 429 happened: the rate-limit path was not exercised)");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // `exit` runs no destructors: stop the sidecars (and, with them, their upstreams) first.
    drop(fixture);
    drop(notion);
    if total.lost > 0 || !leaks.is_empty() {
        println!(
            "\nFAILED: {} calls lost; {}",
            total.lost,
            if leaks.is_empty() { "no leak".into() } else { leaks.join("; ") }
        );
        std::process::exit(1);
    }
    println!("\nOK: every call answered or clearly refused; nothing left behind");
}
