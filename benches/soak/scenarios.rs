//! The soak's scenarios: each one a short story of use against the two sidecars, tallying every
//! call it made as answered, a clear error, or lost.

use crate::client::{Outcome, Session, answer_of, exchange, modern_call};
use crate::{TASK_TIMEOUT, TTL_MS};
use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The tally of one scenario.
#[derive(Default, Clone)]
pub(crate) struct Tally {
    pub(crate) runs: u64,
    pub(crate) calls: u64,
    pub(crate) answered: u64,
    pub(crate) clear_errors: u64,
    pub(crate) lost: u64,
    pub(crate) examples: Vec<String>,
}

/// What a scenario reports for each call it made.
pub(crate) struct Run<'a> {
    pub(crate) tally: Tally,
    pub(crate) name: &'a str,
}

impl Run<'_> {
    /// Counts a call that must be answered; returns its answer.
    pub(crate) fn expect(&mut self, what: &str, outcome: Outcome) -> Option<Value> {
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
    pub(crate) fn expect_answer_or_error(&mut self, outcome: Outcome) {
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
    pub(crate) fn lose(&mut self, why: String) -> Option<Value> {
        self.tally.lost += 1;
        self.note(why);
        None
    }

    pub(crate) fn note(&mut self, why: String) {
        if self.tally.examples.len() < 3 {
            self.tally.examples.push(format!("{}: {why}", self.name));
        }
    }

    /// Whether a tool result's text is `want`.
    pub(crate) fn check_text(&mut self, what: &str, result: Option<Value>, want: &str) {
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
pub(crate) fn wait_legacy_task(run: &mut Run, s: &mut Session, task_id: &str) -> Option<String> {
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
pub(crate) fn wait_modern_task(run: &mut Run, addr: &str, auth: &str, task_id: &str) -> Option<Value> {
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

pub(crate) fn task_id_of(result: &Option<Value>) -> Option<String> {
    let r = result.as_ref()?;
    r["task"]["taskId"].as_str().or(r["taskId"].as_str()).map(str::to_owned)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scenario {
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
    pub(crate) const ALL: [Scenario; 11] = [
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

    pub(crate) fn name(self) -> &'static str {
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

pub(crate) struct Sidecars {
    pub(crate) fixture: String,
    pub(crate) notion: String,
}

pub(crate) fn run_scenario(which: Scenario, sc: &Sidecars, worker: usize, n: u64) -> Tally {
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
