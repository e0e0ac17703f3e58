//! The Streamable HTTP sidecar (`mcp-asyncify serve`) on the wire: sessions, credentials, the HTTP
//! rules of the transport, hostile requests, and many sessions at once.

mod common;

use common::{BIN, Reply, Served};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The sidecar on a free address, with an HTTP/1.1 client for the tests.
struct Sidecar {
    /// Kept for its drop, which stops the sidecar (None: a second handle on the same one).
    _served: Option<Served>,
    addr: String,
}

impl Sidecar {
    fn start(extra: &[&str], upstream: &[&str]) -> Sidecar {
        let mut args = extra.to_vec();
        if !upstream.is_empty() {
            args.push("--");
            args.extend_from_slice(upstream);
        }
        let served = Served::sidecar(&args);
        let addr = served.addr.clone();
        Sidecar { _served: Some(served), addr }
    }

    fn fixture(extra: &[&str]) -> Sidecar {
        Self::start(extra, &[BIN, "test-server"])
    }

    /// One HTTP/1.1 exchange (Connection: close); `headers` as "Name: value" lines.
    fn http(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Reply {
        common::http(&self.addr, method, path, headers, body)
    }

    /// A POST of one JSON-RPC message to /mcp.
    fn post(&self, session: Option<&str>, auth: Option<&str>, msg: &Value) -> Reply {
        let mut headers = vec![
            "Content-Type: application/json".to_string(),
            "Accept: application/json, text/event-stream".to_string(),
        ];
        if let Some(s) = session {
            headers.push(format!("Mcp-Session-Id: {s}"));
        }
        if let Some(a) = auth {
            headers.push(format!("Authorization: {a}"));
        }
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        self.http("POST", "/mcp", &headers, msg.to_string().as_bytes())
    }

    /// initialize + initialized; returns the session id.
    fn open(&self, auth: Option<&str>) -> String {
        let r = self.post(
            None,
            auth,
            &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"tasks":{}},"clientInfo":{"name":"t","version":"1"}}}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let sid = r.header("mcp-session-id").expect("a session id").to_owned();
        let n = self.post(Some(&sid), auth, &json!({"jsonrpc":"2.0","method":"notifications/initialized"}));
        assert_eq!(n.status, 202);
        sid
    }

    /// A request's answer (from JSON or the last SSE event).
    fn call(&self, session: &str, auth: Option<&str>, id: Value, method: &str, params: Value) -> Value {
        let r =
            self.post(Some(session), auth, &json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}));
        assert_eq!(r.status, 200, "{method}: {} {}", r.status, r.body);
        r.messages()
            .into_iter()
            .rev()
            .find(|m| m.get("id") == Some(&id))
            .unwrap_or_else(|| panic!("no answer: {}", r.body))
    }
}

#[test]
fn the_transport_rules_hold() {
    let s = Sidecar::fixture(&[]);
    let sid = s.open(None);
    // A plain call answered as JSON; one with progress as SSE ending with the answer.
    let r = s.call(&sid, None, json!(1), "tools/call", json!({"name":"echo","arguments":{"text":"hi"}}));
    assert_eq!(r["result"]["content"][0]["text"], "hi");
    let r = s.post(
        Some(&sid),
        None,
        &json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2,"interval_ms":20},"_meta":{"progressToken":"p"}}}),
    );
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"), "{:?}", r.headers);
    let msgs = r.messages();
    assert_eq!(msgs.len(), 3, "{}", r.body);
    assert_eq!(msgs[2]["result"]["content"][0]["text"], "done 2 steps");

    let json = "Content-Type: application/json";
    let both = "Accept: application/json, text/event-stream";
    let sid_h = format!("Mcp-Session-Id: {sid}");
    let list = br#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    type Case<'a> = (&'a str, &'a str, Vec<&'a str>, &'a [u8], u16);
    let cases: Vec<Case> = vec![
        ("no session id", "POST", vec![json, both], list, 400),
        ("unknown session id", "POST", vec![json, both, "Mcp-Session-Id: 0123456789abcdef"], list, 404),
        ("not JSON", "POST", vec![json, both, &sid_h], b"{not json", 400),
        ("wrong content type", "POST", vec!["Content-Type: text/plain", both, &sid_h], list, 415),
        ("Accept without SSE", "POST", vec![json, "Accept: application/json", &sid_h], list, 406),
        ("GET without SSE", "GET", vec!["Accept: application/json", &sid_h], b"", 406),
        ("PUT", "PUT", vec![json, both, &sid_h], list, 405),
        (
            "unsupported protocol version",
            "POST",
            vec![json, both, &sid_h, "MCP-Protocol-Version: 1999-01-01"],
            list,
            400,
        ),
        ("other path", "POST", vec![json, both], list, 404),
    ];
    for (what, method, headers, body, status) in cases {
        let path = if what == "other path" { "/other" } else { "/mcp" };
        let r = s.http(method, path, &headers, body);
        assert_eq!(r.status, status, "{what}: {}", r.body);
    }
    assert_eq!(s.http("GET", "/healthz", &[], b"").status, 200);
    // A cancelled request's POST ends instead of waiting for an answer that will not come.
    let pending = {
        let (addr, sid) = (s.addr.clone(), sid.clone());
        std::thread::spawn(move || {
            let probe = Sidecar { _served: None, addr };
            probe.post(
                Some(&sid),
                None,
                &json!({"jsonrpc":"2.0","id":"long","method":"tools/call","params":{"name":"slow","arguments":{"ms":30000}}}),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let n = s.post(
        Some(&sid),
        None,
        &json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"long","reason":"user"}}),
    );
    assert_eq!(n.status, 202);
    let started = Instant::now();
    let r = pending.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "{r:?}", r = r.body);
    assert!(r.body.contains("cancelled"), "{}", r.body);
    // DELETE ends the session; it is then unknown.
    assert_eq!(s.http("DELETE", "/mcp", &[&sid_h], b"").status, 200);
    assert_eq!(s.post(Some(&sid), None, &json!({"jsonrpc":"2.0","id":9,"method":"tools/list"})).status, 404);
}

#[test]
fn hostile_requests_are_refused_and_the_service_stays_healthy() {
    let s = Sidecar::fixture(&["--allow-origin", "https://app.example"]);
    let json = "Content-Type: application/json";
    let both = "Accept: application/json, text/event-stream";
    let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    // DNS rebinding: a foreign Host or Origin is refused before anything else.
    assert_eq!(s.http("POST", "/mcp", &[json, both, "Host: evil.example"], init).status, 403);
    assert_eq!(s.http("POST", "/mcp", &[json, both, "Origin: http://evil.example"], init).status, 403);
    assert_eq!(s.http("POST", "/mcp", &[json, both, "Origin: https://app.example"], init).status, 200);
    assert_eq!(s.http("POST", "/mcp", &[json, both, "Origin: http://localhost:3000"], init).status, 200);
    // Oversized bodies: 413 without reading them whole.
    let big =
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"p":"{}"}}}}"#, "z".repeat(17 << 20));
    assert_eq!(s.http("POST", "/mcp", &[json, both], big.as_bytes()).status, 413);
    // Header injection: a session id smuggling a header is just an unknown session.
    let r = s.http("POST", "/mcp", &[json, both, "Mcp-Session-Id: abc%0d%0aX-Injected: 1"], init);
    assert_eq!(r.status, 404);
    assert!(r.header("x-injected").is_none());
    // 1,000 bad requests in a row, then a real session works.
    let started = Instant::now();
    for i in 0..1000 {
        let r = match i % 4 {
            0 => s.http("POST", "/mcp", &[json, both], b"garbage"),
            1 => s.http("POST", "/mcp", &[json, both, "Mcp-Session-Id: nope"], b"{}"),
            2 => s.http("PATCH", "/mcp", &[], b""),
            _ => s.http("POST", "/mcp", &["Content-Type: text/html", both], b"<html>"),
        };
        assert!((400..500).contains(&r.status), "request {i}: {}", r.status);
    }
    assert_eq!(s.http("GET", "/healthz", &[], b"").status, 200);
    let sid = s.open(None);
    let r =
        s.call(&sid, None, json!(1), "tools/call", json!({"name":"echo","arguments":{"text":"still fine"}}));
    assert_eq!(r["result"]["content"][0]["text"], "still fine");
    eprintln!("1,000 bad requests took {:?}", started.elapsed());
}

#[test]
fn tasks_are_bound_to_the_credential_and_survive_the_session() {
    let s = Sidecar::fixture(&[]);
    let alice = Some("Bearer alice-token");
    let bob = Some("Bearer bob-token");
    let a1 = s.open(alice);
    let created = s.call(
        &a1,
        alice,
        json!(1),
        "tools/call",
        json!({"name":"slow","arguments":{"ms":200,"text":"alice's"},"task":{}}),
    );
    let task = created["result"]["task"]["taskId"].as_str().unwrap().to_owned();
    let done = s.call(&a1, alice, json!(2), "tasks/result", json!({"taskId": task}));
    assert_eq!(done["result"]["content"][0]["text"], "alice's");
    // The session belongs to Alice's credential: Bob cannot use it.
    let r = s.post(
        Some(&a1),
        bob,
        &json!({"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{"taskId": task}}),
    );
    assert_eq!(r.status, 404);
    // Alice ends her session and comes back: her task's result is still hers.
    assert_eq!(
        s.http(
            "DELETE",
            "/mcp",
            &[&format!("Mcp-Session-Id: {a1}"), "Authorization: Bearer alice-token"],
            b""
        )
        .status,
        200
    );
    let a2 = s.open(alice);
    let again = s.call(&a2, alice, json!(4), "tasks/result", json!({"taskId": task}));
    assert_eq!(again["result"]["content"][0]["text"], "alice's");
    let listed = s.call(&a2, alice, json!(5), "tasks/list", json!({}));
    assert!(listed["result"]["tasks"].as_array().unwrap().iter().any(|t| t["taskId"] == task.as_str()));
    // A task still running when its session ends keeps going; its result waits for Alice.
    let running = s.call(
        &a2,
        alice,
        json!(8),
        "tools/call",
        json!({"name":"slow","arguments":{"ms":1000,"text":"finished later"},"task":{}}),
    );
    let later = running["result"]["task"]["taskId"].as_str().unwrap().to_owned();
    assert_eq!(
        s.http(
            "DELETE",
            "/mcp",
            &[&format!("Mcp-Session-Id: {a2}"), "Authorization: Bearer alice-token"],
            b""
        )
        .status,
        200
    );
    let a3 = s.open(alice);
    let r = s.call(&a3, alice, json!(9), "tasks/result", json!({"taskId": later}));
    assert_eq!(r["result"]["content"][0]["text"], "finished later", "{r}");
    // Bob, in his own session, gets "not found" and an empty list.
    let b1 = s.open(bob);
    let r = s.call(&b1, bob, json!(6), "tasks/get", json!({"taskId": task}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = s.call(&b1, bob, json!(7), "tasks/list", json!({}));
    assert!(r["result"]["tasks"].as_array().unwrap().is_empty(), "{r}");
}

#[test]
fn two_hundred_sessions_with_calls_in_flight_lose_nothing() {
    let s = std::sync::Arc::new(Sidecar::fixture(&[]));
    let started = Instant::now();
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let sid = s.open(None);
                let mut texts = Vec::new();
                let calls: Vec<_> = (0..3)
                    .map(|k| {
                        let s = s.clone();
                        let sid = sid.clone();
                        std::thread::spawn(move || {
                            let text = format!("session {i} call {k}");
                            let r = s.call(
                                &sid,
                                None,
                                json!(k),
                                "tools/call",
                                json!({"name":"slow","arguments":{"ms": 200 + k * 100, "text": text}}),
                            );
                            r["result"]["content"][0]["text"].as_str().unwrap().to_owned()
                        })
                    })
                    .collect();
                for c in calls {
                    texts.push(c.join().unwrap());
                }
                assert_eq!(texts, (0..3).map(|k| format!("session {i} call {k}")).collect::<Vec<_>>());
                s.http("DELETE", "/mcp", &[&format!("Mcp-Session-Id: {sid}")], b"").status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    eprintln!("200 sessions × 3 calls in {:?}", started.elapsed());
}

#[test]
fn the_session_cap_refuses_clearly() {
    let s = Sidecar::fixture(&["--max-sessions", "2"]);
    s.open(None);
    s.open(None);
    let r = s.post(
        None,
        None,
        &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}),
    );
    assert_eq!(r.status, 503);
    assert!(r.body.contains("--max-sessions"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
}

#[test]
fn the_sidecar_runs_on_the_worker_threads_it_is_given() {
    // Every other test runs on the default, one worker thread; more serve sessions and calls the same.
    let s = Sidecar::fixture(&["--worker-threads", "3"]);
    let sid = s.open(None);
    let r = s.call(&sid, None, json!(1), "tools/call", json!({"name": "echo", "arguments": {"text": "one"}}));
    assert_eq!(r["result"]["content"][0]["text"], "one", "{r}");
    // Zero threads is refused at start, naming the option.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--worker-threads", "0", "--", BIN, "test-server"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--worker-threads"), "{err}");
}

#[test]
fn with_passthrough_a_hosted_upstreams_401_reaches_the_client_with_its_challenge_and_the_credential_passes_unchanged()
 {
    // A hosted server that refuses everything, recording the Authorization it was sent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}/mcp", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = vec![0u8; 65536];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(auth) = req.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:")) {
                record.lock().unwrap().push(auth.split_once(':').unwrap().1.trim().to_owned());
            }
            let body = "unauthorized";
            let _ = write!(
                conn,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer resource_metadata=\"http://127.0.0.1/.well-known/oauth-protected-resource\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let s = Sidecar::start(&["--upstream-url", &upstream, "--upstream-auth", "passthrough"], &[]);
    let r = s.post(
        None,
        Some("Bearer client-token"),
        &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let challenge = r.header("www-authenticate").expect("the upstream's challenge");
    assert!(challenge.contains("resource_metadata"), "{challenge}");
    assert_eq!(seen.lock().unwrap().as_slice(), ["Bearer client-token"]);
}

#[test]
fn shutdown_lets_calls_in_flight_finish() {
    let s = std::sync::Arc::new(Sidecar::fixture(&[]));
    let sid = s.open(None);
    let call = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.call(
                &sid,
                None,
                json!(1),
                "tools/call",
                json!({"name":"slow","arguments":{"ms": 1500, "text": "finished"}}),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid = s._served.as_ref().unwrap().pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let r = call.join().unwrap();
    assert_eq!(r["result"]["content"][0]["text"], "finished");
    // New connections are refused once it stopped accepting.
    std::thread::sleep(Duration::from_millis(300));
    assert!(TcpStream::connect(&s.addr).is_err());
}

#[test]
fn idle_sessions_expire() {
    let s = Sidecar::fixture(&["--session-idle-secs", "1"]);
    let sid = s.open(None);
    let r = s.call(&sid, None, json!(1), "tools/call", json!({"name":"echo","arguments":{"text":"hi"}}));
    assert_eq!(r["result"]["content"][0]["text"], "hi");
    std::thread::sleep(Duration::from_millis(3000));
    let r = s.post(Some(&sid), None, &json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}));
    assert_eq!(r.status, 404, "{}", r.body);
}

/// The sidecar's live tokio tasks, from its own metric.
fn runtime_tasks(s: &Sidecar) -> f64 {
    let page = s.http("GET", "/metrics", &[], b"").body;
    page.lines()
        .find_map(|l| {
            l.strip_prefix("asyncify_runtime_tasks").and_then(|rest| rest.split_whitespace().last())
        })
        .and_then(|v| v.parse().ok())
        .expect("asyncify_runtime_tasks in /metrics")
}

#[test]
fn ended_sessions_leave_no_task_behind() {
    let s = Sidecar::fixture(&[]);
    let before = runtime_tasks(&s);
    for i in 0..20 {
        let sid = s.open(None);
        let r = s.call(&sid, None, json!(1), "tools/call", json!({"name":"echo","arguments":{"text":"hi"}}));
        assert_eq!(r["result"]["content"][0]["text"], "hi", "session {i}");
        let sid_h = format!("Mcp-Session-Id: {sid}");
        assert_eq!(s.http("DELETE", "/mcp", &[&sid_h], b"").status, 200);
    }
    // Every session's tasks end with it (no task event ever comes to wake a forgotten one).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = runtime_tasks(&s);
    while now > before + 3.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now = runtime_tasks(&s);
    }
    assert!(now <= before + 3.0, "{now} tokio tasks after 20 ended sessions, {before} before");
}

#[test]
fn tasks_list_is_declared_only_where_tasks_are_bound_to_a_credential() {
    // Without a credential a session's tasks are bound to nothing but their unguessable ids, and the
    // spec says such a server SHOULD NOT declare tasks/list.
    let s = Sidecar::fixture(&[]);
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"tasks":{}},"clientInfo":{"name":"t","version":"1"}}});
    let anonymous = s.post(None, None, &init).messages()[0].clone();
    let tasks = &anonymous["result"]["capabilities"]["tasks"];
    assert!(tasks["requests"]["tools"]["call"].is_object(), "{anonymous}");
    assert!(tasks.get("list").is_none(), "no tasks/list without a credential: {anonymous}");
    let bound = s.post(None, Some("Bearer alice"), &init).messages()[0].clone();
    assert!(bound["result"]["capabilities"]["tasks"]["list"].is_object(), "{bound}");
}

/// Reads an open HTTP response until `needle` shows up in it (or the stream ends, or 8 s pass).
fn read_until(s: &mut TcpStream, raw: &mut Vec<u8>, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(raw).contains(needle) {
        if Instant::now() > deadline {
            return false;
        }
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(raw).contains(needle),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    true
}

#[test]
fn a_tasks_question_reaches_a_client_that_waits_on_tasks_result_without_a_get_stream() {
    // The task asks its question after its tools/call was answered, while no stream is open: the
    // question must not wait for a GET stream the client never opens; it goes on the stream of the
    // client's tasks/result for that task, as the Tasks spec says.
    let s = Sidecar::fixture(&[]);
    let sid = s.open(None);
    let created = s.call(
        &sid,
        None,
        json!(1),
        "tools/call",
        json!({"name":"ask","arguments":{"message":"colour?"},"task":{}}),
    );
    let task = created["result"]["task"]["taskId"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(300));

    let mut waiting = TcpStream::connect(&s.addr).unwrap();
    let body = json!({"jsonrpc":"2.0","id":2,"method":"tasks/result","params":{"taskId": task}}).to_string();
    write!(
        waiting,
        "POST /mcp HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: {sid}\r\nContent-Length: {}\r\n\r\n{body}",
        s.addr,
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    assert!(
        read_until(&mut waiting, &mut raw, "elicitation/create"),
        "the question never reached the tasks/result stream: {}",
        String::from_utf8_lossy(&raw)
    );
    let question = Reply::parse(&raw)
        .messages()
        .into_iter()
        .find(|m| m["method"] == "elicitation/create")
        .expect("the question, as an SSE event");
    assert_eq!(question["params"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"], task.as_str());
    let answered = s.post(
        Some(&sid),
        None,
        &json!({"jsonrpc":"2.0","id":question["id"],"result":{"action":"accept","content":{"answer":"blue"}}}),
    );
    assert_eq!(answered.status, 202, "{}", answered.body);
    assert!(read_until(&mut waiting, &mut raw, "answer: blue"), "{}", String::from_utf8_lossy(&raw));
}
