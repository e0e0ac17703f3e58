//! The foundation's promise, checked on the wire through the built binary: bytes pass unchanged, ids
//! keep their value and type, calls run concurrently, bad input gets a clear answer, and the process
//! lifecycle leaves nothing behind.

mod common;

use common::{BIN, Peer, WAIT, alive, text_of, wait_gone};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn raw_upstream(extra: &[&str]) -> Peer {
    let mut args = extra.to_vec();
    args.extend(["--log-level", "warn", "--", BIN, "test-server", "--raw"]);
    Peer::start(&args)
}

fn fixture(extra: &[&str]) -> Peer {
    let mut args = extra.to_vec();
    args.extend(["--log-level", "warn", "--", BIN, "test-server"]);
    let mut p = Peer::start(&args);
    p.initialize(json!({}));
    p
}

/// What the raw upstream answers to a request: its id and params exactly as sent, in its odd layout.
fn raw_answer(id: &str, params: &str) -> String {
    format!("{{ \"result\" : {params}, \"id\":{id},\"jsonrpc\":\"2.0\" }}")
}

#[test]
fn messages_pass_byte_for_byte_and_ids_keep_their_value_and_type() {
    for flags in [&["--no-tasks"][..], &[][..]] {
        let mut p = raw_upstream(flags);
        let params =
            r#"{ "b" :1,"a":[1.50, 2e3,-0, "\u00e9\n", {"z":null}] ,"big":123456789012345678901234567890}"#;
        for id in ["0", "-7", "9007199254740993", "18446744073709551616", r#""abc""#, r#""""#, r#""\u0041""#]
        {
            p.send(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"raw/echo","params":{params}}}"#));
            let got = p.next_line(WAIT).expect("an answer");
            assert_eq!(got, raw_answer(id, params), "with flags {flags:?}");
        }
        // A server notification passes as sent, before the answer to the request that caused it.
        p.send(r#"{"jsonrpc":"2.0","id":1,"method":"raw/notify","params":{"level" : "info","data":"x"}}"#);
        assert_eq!(
            p.next_line(WAIT).unwrap(),
            r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level" : "info","data":"x"}}"#
        );
        assert_eq!(p.next_line(WAIT).unwrap(), raw_answer("1", r#"{"level" : "info","data":"x"}"#));
    }
}

#[test]
fn server_requests_reach_the_client_and_its_answers_go_back() {
    let mut p = raw_upstream(&[]);
    p.send(r#"{"jsonrpc":"2.0","id":7,"method":"raw/ask","params":{}}"#);
    let ask = p.next_line(WAIT).unwrap();
    assert_eq!(ask, r#"{"jsonrpc":"2.0","id":"ask-7","method":"roots/list","params":{}}"#);
    p.send(r#"{"jsonrpc":"2.0","id":"ask-7","result":{"roots":[{"uri":"file:///tmp","name" : "t"}]}}"#);
    assert_eq!(
        p.next_line(WAIT).unwrap(),
        r#"{"jsonrpc":"2.0","id":7,"result":{"roots":[{"uri":"file:///tmp","name" : "t"}]}}"#
    );
}

#[test]
fn forty_calls_of_mixed_duration_finish_in_the_time_of_the_slowest() {
    let mut p = fixture(&[]);
    let started = Instant::now();
    for i in 0..40u64 {
        let ms = 50 + ((i * 739) % 40) * 49; // 50 ms to 1961 ms, each once, in mixed order
        p.request(
            i,
            "tools/call",
            json!({"name": "slow", "arguments": {"ms": ms, "text": format!("call {i}")}}),
        );
    }
    let mut order = Vec::new();
    for _ in 0..40 {
        let v = p.next_matching("a tools/call answer", |v| v.get("id").is_some_and(Value::is_u64));
        let i = v["id"].as_u64().unwrap();
        assert_eq!(text_of(&v["result"]), format!("call {i}"));
        order.push(i);
    }
    let took = started.elapsed();
    let slowest = Duration::from_millis(50 + 39 * 49);
    assert!(
        took < slowest + Duration::from_millis(1500),
        "40 calls took {took:?}; the slowest alone takes {slowest:?}"
    );
    // Answers came as each finished, not in the order asked: a slow call never delays another.
    assert_ne!(order, (0..40).collect::<Vec<_>>());
    assert_eq!(order[0], 0, "the 50 ms call answers first");
    assert_eq!(
        *order.last().unwrap(),
        (0..40).find(|i| (i * 739) % 40 == 39).unwrap(),
        "the slowest answers last"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_the_session_goes_on() {
    let mut p = fixture(&[]);
    let cases = [
        ("this is not json", -32700),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/list""#, -32700),
        (r#"{"foo":1}"#, -32600),
        (r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":{"a":1},"method":"x"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":1,"method":42}"#, -32600),
        ("[1,2,3]", -32600),
        ("42", -32600),
    ];
    for (line, code) in cases {
        p.send(line);
        let v: Value = serde_json::from_str(&p.next_line(WAIT).expect("an error answer")).unwrap();
        assert_eq!(v["error"]["code"], code, "for {line}: {v}");
        assert_eq!(v["id"], Value::Null, "for {line}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 10, "a message a person can act on: {v}");
    }
    // Blank lines are ignored; the session still works.
    p.send("");
    p.send("   ");
    assert_eq!(text_of(&p.tool(2, "echo", json!({"text": "still here"}))["result"]), "still here");
}

#[test]
fn oversized_messages_are_refused_without_exhausting_memory_and_nothing_hangs() {
    let mut p = fixture(&["--max-message-bytes", "4096"]);
    // A request over the cap is answered under its own id.
    let big = "y".repeat(50_000);
    p.send(&json!({"jsonrpc":"2.0","id":"too-big","method":"tools/call","params":{"name":"echo","arguments":{"text":big}}}).to_string());
    let v = p.response("too-big");
    assert_eq!(v["error"]["code"], -32600, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("over the maximum of 4096 bytes"), "{v}");
    // A 20 MB line with no id in its head: id null.
    let huge =
        format!(r#"{{"params":{{"x":"{}"}},"jsonrpc":"2.0","id":5,"method":"x"}}"#, "z".repeat(20 << 20));
    p.send(&huge);
    let v: Value = serde_json::from_str(&p.next_line(WAIT).unwrap()).unwrap();
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (Value::Null, json!(-32600)), "{v}");
    // An upstream answer over the cap ends its request with an error instead of leaving it waiting.
    let v = p.tool(3, "big", json!({"bytes": 10_000}));
    assert_eq!(v["error"]["code"], -32603, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("upstream's response is"), "{v}");
    assert_eq!(text_of(&p.tool(4, "big", json!({"bytes": 100}))["result"]).len(), 100);
}

#[test]
fn garbage_from_the_upstream_is_logged_and_skipped() {
    let mut p = raw_upstream(&[]);
    p.send(r#"{"jsonrpc":"2.0","id":3,"method":"raw/garbage","params":{"k":1}}"#);
    assert_eq!(p.next_line(WAIT).unwrap(), raw_answer("3", r#"{"k":1}"#));
    let deadline = Instant::now() + WAIT;
    while !p.stderr().contains("this line is not JSON") {
        assert!(Instant::now() < deadline, "garbage not logged: {}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_upstream_inherits_environment_and_directory_and_its_stderr_is_ours() {
    let dir = std::env::temp_dir();
    let script = format!(
        r#"printf '{{"jsonrpc":"2.0","method":"hello","params":{{"v":"%s","cwd":"%s"}}}}\n' "$ASYNCIFY_TEST_VAR" "$PWD"; echo upstream-speaks-on-stderr >&2; exec {BIN} test-server --raw"#
    );
    let mut p = Peer::start_cmd(
        std::process::Command::new(BIN)
            .env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"))
            .args(["--log-level", "warn", "--", "sh", "-c", &script])
            .env("ASYNCIFY_TEST_VAR", "inherited value")
            .current_dir(&dir),
    );
    let v: Value = serde_json::from_str(&p.next_line(WAIT).unwrap()).unwrap();
    assert_eq!(v["params"]["v"], "inherited value");
    assert_eq!(
        std::fs::canonicalize(v["params"]["cwd"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&dir).unwrap()
    );
    let deadline = Instant::now() + WAIT;
    while !p.stderr().contains("upstream-speaks-on-stderr") {
        assert!(Instant::now() < deadline, "{}", p.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_upstream_crash_mid_call_fails_every_pending_request_and_the_proxy_exits_with_its_status() {
    let mut p = fixture(&[]);
    let upstream = text_of(&p.tool("pid", "pid", json!({}))["result"]).parse::<u32>().unwrap();
    p.request(1, "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}}));
    p.request("s", "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}}));
    p.request(2, "tools/call", json!({"name": "crash", "arguments": {"code": 3, "after_ms": 200}}));
    for id in [json!(1), json!("s"), json!(2)] {
        let v = p.response(id.clone());
        assert_eq!(v["error"]["code"], -32000, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("exited") && msg.contains("status 3"), "{msg}");
    }
    assert_eq!(p.wait_exit(WAIT).code(), Some(3));
    assert!(!alive(upstream));
}

#[test]
fn an_upstream_killed_by_a_signal_gives_128_plus_n() {
    let mut p = fixture(&[]);
    let upstream = text_of(&p.tool("pid", "pid", json!({}))["result"]).parse::<i32>().unwrap();
    p.request(1, "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}}));
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::kill(upstream, libc::SIGKILL) };
    let v = p.response(1);
    assert!(v["error"]["message"].as_str().unwrap().contains("signal 9"), "{v}");
    assert_eq!(p.wait_exit(WAIT).code(), Some(128 + 9));
}

#[test]
fn client_eof_mid_call_shuts_the_upstream_down_and_leaves_no_process() {
    let mut p = fixture(&["--shutdown-grace-ms", "500"]);
    let upstream = text_of(&p.tool("pid", "pid", json!({}))["result"]).parse::<u32>().unwrap();
    p.request(1, "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}}));
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    p.close_stdin();
    let status = p.wait_exit(WAIT);
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    assert!(status.success(), "{status:?}\n{}", p.stderr());
    assert!(wait_gone(upstream, Duration::from_secs(2)), "upstream {upstream} still alive");
    // The call still waiting got its answer before stdout closed: nothing is left unanswered.
    let rest = p.drain(Duration::from_secs(2));
    assert!(rest.iter().any(|l| l.contains("\"id\":1")), "{rest:?}");
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly_and_sigkill_leaves_no_orphan() {
    for (sig, code) in [(libc::SIGTERM, Some(128 + 15)), (libc::SIGINT, Some(128 + 2)), (libc::SIGKILL, None)]
    {
        let mut p = fixture(&["--shutdown-grace-ms", "300"]);
        let upstream = text_of(&p.tool("pid", "pid", json!({}))["result"]).parse::<u32>().unwrap();
        p.request(1, "tools/call", json!({"name": "slow", "arguments": {"ms": 60_000}}));
        std::thread::sleep(Duration::from_millis(100));
        unsafe { libc::kill(p.child.id() as i32, sig) };
        let status = p.wait_exit(WAIT);
        assert_eq!(status.code(), code, "signal {sig}: {status:?}");
        assert!(wait_gone(upstream, Duration::from_secs(5)), "signal {sig}: upstream {upstream} orphaned");
    }
}

#[test]
fn a_command_that_cannot_be_spawned_fails_at_start_with_the_reason() {
    let mut p = Peer::start(&["--", "/nonexistent/mcp-server", "--flag"]);
    let status = p.wait_exit(WAIT);
    assert!(!status.success());
    let err = p.stderr();
    assert!(err.contains("/nonexistent/mcp-server") && err.contains("No such file"), "{err}");
    let mut p = Peer::start(&[]);
    assert_eq!(p.wait_exit(WAIT).code(), Some(2), "no command: usage error");
    assert!(p.stderr().contains("--"), "{}", p.stderr());
}

#[test]
fn configuration_errors_name_the_key_the_value_and_what_is_allowed() {
    let dir = common::scratch().join("wire");
    std::fs::create_dir_all(&dir).unwrap();
    let bad_key = dir.join("bad-key.toml");
    std::fs::write(&bad_key, "[proxy]\nmax_mesage_bytes = 10\n").unwrap();
    let bad_value = dir.join("bad-value.toml");
    std::fs::write(&bad_value, "[log]\nformat = \"xml\"\n").unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["--config".into(), bad_key.display().to_string()], vec!["max_mesage_bytes"]),
        (vec!["--config".into(), bad_value.display().to_string()], vec!["xml", "json"]),
        (vec!["--config".into(), "/nonexistent.toml".into()], vec!["/nonexistent.toml"]),
        (vec!["--profile".into(), "nope".into()], vec!["nope", "notion"]),
        (vec!["--max-message-bytes".into(), "0".into()], vec!["max_message_bytes", "0"]),
    ];
    for (args, needles) in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--", BIN, "test-server"]);
        let mut p = Peer::start(&all);
        let status = p.wait_exit(WAIT);
        assert!(!status.success(), "{args:?} accepted");
        let err = p.stderr();
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
        }
    }
}
