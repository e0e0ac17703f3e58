//! Telemetry end to end, against real backends: a real Prometheus scraping `--metrics-listen` and queried
//! through its HTTP API, real OTLP receivers (gRPC from the official opentelemetry-proto service
//! definitions, and HTTP/protobuf) collecting what the proxy exports, and W3C trace context carried from
//! the client through the proxy to the upstream.

mod common;
mod otlp_receiver;

use common::{BIN, Peer, WAIT, free_addr};
use otlp_receiver::{CLIENT, INTERNAL, Kind, OtlpReceiver, Point, Protocol, SERVER, SpanRec, current, total};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TASK_CLIENT: &str = r#"{"tasks":{"list":{},"cancel":{}}}"#;

// ---------------------------------------------------------------------------------------------------
// Plumbing: free ports, a tiny HTTP/1.1 GET client, the proxy with a clean OTEL_* environment.

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A bounded HTTP/1.1 GET: (status, lower-cased headers, body). Handles Content-Length, chunked and
/// read-to-close bodies.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, HashMap<String, String>, String)> {
    let sock: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n")?;
    s.flush()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
        std::io::Error::other(format!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)))
    })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
            rest = &rest[eol + 2..];
            if size == 0 || rest.len() < size {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        body = out;
    } else if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.truncate(len);
    }
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes a query-string value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The proxy (`proxy_args`, then `-- upstream…`) with no OTEL_* variable inherited from the test's
/// environment, plus `env`.
fn proxy_cmd(proxy_args: &[&str], upstream: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    // A data directory of its own, never the real user's.
    cmd.env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"));
    cmd.args(proxy_args).arg("--").args(upstream);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits until the proxy's metrics endpoint answers `GET /healthz` with 200 "ok".
fn wait_healthz(addr: &str, p: &Peer) {
    let deadline = Instant::now() + WAIT;
    loop {
        match http_get(addr, "/healthz") {
            Ok((200, _, body)) => {
                assert_eq!(body.trim(), "ok", "GET /healthz body");
                return;
            }
            other => assert!(
                Instant::now() < deadline,
                "the metrics endpoint on {addr} never answered /healthz (last: {other:?}); stderr:\n{}",
                p.stderr()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the values of the samples of `name` in a Prometheus text exposition whose labels include
/// every `label="value"` of `with`.
fn exposition_sum(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| with.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

// ---------------------------------------------------------------------------------------------------
// A real Prometheus.

/// The Prometheus binary, or None (with a notice) when it is missing and we are not in CI.
fn prometheus_binary() -> Option<PathBuf> {
    let standard = PathBuf::from("/usr/bin/prometheus");
    if standard.exists() {
        return Some(standard);
    }
    if let Some(found) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.exists())
    {
        return Some(found);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but /usr/bin/prometheus is missing: .ci/run installs it (apt-get install prometheus)"
    );
    eprintln!(
        "NOTICE: skipping prometheus_scrapes_the_task_metrics: /usr/bin/prometheus is missing \
         (apt-get install prometheus); in CI this test fails instead"
    );
    None
}

/// A Prometheus server scraping the given jobs every second, on its own port and storage (killed and
/// cleaned up on drop).
struct Prometheus {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, jobs: &[(&str, &str)]) -> Prometheus {
        let dir = common::scratch().join(format!("prometheus-{}", now_unix()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut yml = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, target) in jobs {
            yml.push_str(&format!(
                "  - job_name: {job}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, yml).unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut prom = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _, _)) = http_get(&prom.addr, "/-/ready") {
                break;
            }
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited ({status}) before it was ready; its log:\n{}", prom.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready within 30 s; its log:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prom
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: every sample as (labels, value).
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (status, _, body) =
            http_get(&self.addr, &path).unwrap_or_else(|e| panic!("query {promql:?} on prometheus: {e}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {status} with non-JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "query {promql:?}: {v}");
        let data = &v["data"];
        let value = |pair: &Value| -> f64 {
            let text = pair[1].as_str().unwrap_or_else(|| panic!("bad sample value in {v}"));
            match text {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                t => t.parse().unwrap_or(f64::NAN),
            }
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect();
                    (labels, value(&s["value"]))
                })
                .collect(),
            Some("scalar") => vec![(BTreeMap::new(), value(&data["result"]))],
            other => panic!("unexpected result type {other:?} for {promql:?}: {v}"),
        }
    }

    /// The value of a query expected to give at most one sample (None when it gives none).
    fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql);
        assert!(samples.len() <= 1, "{promql:?} gave more than one sample: {samples:?}");
        samples.first().map(|(_, v)| *v)
    }

    /// `sum by (labels) (expr)` as a map from the joined label values to the value.
    fn by(&self, labels: &[&str], expr: &str) -> BTreeMap<String, f64> {
        let q = format!("sum by ({}) ({expr})", labels.join(", "));
        self.query(&q)
            .into_iter()
            .map(|(l, v)| {
                let key: Vec<&str> =
                    labels.iter().map(|n| l.get(*n).map(String::as_str).unwrap_or("")).collect();
                (key.join("/"), v)
            })
            .collect()
    }

    /// Waits until `job` was scraped successfully at or after `after` (unix seconds).
    fn wait_scraped(&self, job: &str, after: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.query(&format!("up{{job=\"{job}\"}}"));
            let ts = self.value(&format!("timestamp(up{{job=\"{job}\"}})"));
            if up.first().is_some_and(|(_, v)| *v == 1.0) && ts.is_some_and(|t| t >= after) {
                return;
            }
            let last = (up, ts);
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape job {job} successfully after {after} within 30 s (up, timestamp: \
                 {last:?}); targets: {}\nits log:\n{}",
                http_get(&self.addr, "/api/v1/targets").map(|r| r.2).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------------
// Workloads.

/// Sends a task-augmented tools/call and returns the task id.
fn start_task(p: &mut Peer, id: impl Into<Value>, tool: &str, args: Value) -> String {
    let r = p.ok(id, "tools/call", json!({"name": tool, "arguments": args, "task": {}}));
    assert_eq!(r["task"]["status"], "working", "a created task: {r}");
    r["task"]["taskId"].as_str().unwrap().to_owned()
}

/// Reads the simulator's request log (complete lines only: it may be writing one right now).
fn sim_log(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad request log line {l:?}: {e}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// 1. Prometheus.

#[test]
fn prometheus_scrapes_the_task_metrics() {
    let Some(prometheus) = prometheus_binary() else { return };

    // Two proxies with a metrics endpoint each: one in front of the fixture, one in front of the
    // Notion simulator (with a request log to compare the Notion counters with).
    let fixture_addr = free_addr();
    let notion_addr = free_addr();
    let log = common::scratch().join("telemetry-notion.jsonl");
    let _ = std::fs::remove_file(&log);
    let log_s = log.to_str().unwrap().to_owned();
    let mut fixture = Peer::start_cmd(&mut proxy_cmd(
        &["--metrics-listen", &fixture_addr, "--log-level", "info"],
        &[BIN, "test-server"],
        &[],
    ));
    let mut notion = Peer::start_cmd(&mut proxy_cmd(
        &["--metrics-listen", &notion_addr, "--log-level", "info"],
        &[
            BIN,
            "notion-sim",
            "--work-ms",
            "800",
            "--suggested-backoff-ms",
            "200",
            "--rate-limit",
            "3",
            "--failure-rate",
            "0",
            "--seed",
            "1",
            "--request-log",
            &log_s,
        ],
        &[],
    ));
    wait_healthz(&fixture_addr, &fixture);
    wait_healthz(&notion_addr, &notion);
    let prom = Prometheus::start(&prometheus, &[("fixture", &fixture_addr), ("notion", &notion_addr)]);
    let started = now_unix();
    prom.wait_scraped("fixture", started);
    prom.wait_scraped("notion", started);

    // Workload 1 (fixture): 5 tasks that complete, 2 that fail, 1 cancelled, 3 plain calls.
    let p = &mut fixture;
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    let completed: Vec<String> =
        (0..5).map(|i| start_task(p, 10 + i, "slow", json!({"ms": 200, "text": format!("t{i}")}))).collect();
    let failed: Vec<String> =
        (0..2).map(|i| start_task(p, 20 + i, "fail", json!({"message": format!("boom {i}")}))).collect();
    let long = start_task(p, 30, "slow", json!({"ms": 30_000}));
    for (i, t) in completed.iter().enumerate() {
        let r = p.ok(40 + i as i64, "tasks/result", json!({"taskId": t}));
        assert_ne!(r["isError"], true, "slow completes: {r}");
    }
    for (i, t) in failed.iter().enumerate() {
        let r = p.call(50 + i as i64, "tasks/result", json!({"taskId": t}));
        let failed_ok = r["result"]["isError"] == true || r.get("error").is_some();
        assert!(failed_ok, "fail fails: {r}");
        let got = p.ok(55 + i as i64, "tasks/get", json!({"taskId": t}));
        assert_eq!(got["status"], "failed", "{got}");
    }
    // While the long task runs, the endpoint shows exactly one working task.
    let (status, headers, text) = http_get(&fixture_addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    assert!(
        headers.get("content-type").is_some_and(|c| c.starts_with("text/plain")),
        "Prometheus text format: {headers:?}"
    );
    assert_eq!(
        exposition_sum(&text, "asyncify_task_active", &[("asyncify_task_status", "working")]),
        1.0,
        "one task working while the long one runs:\n{text}"
    );
    let cancel = p.ok(60, "tasks/cancel", json!({"taskId": long}));
    assert_eq!(cancel["status"], "cancelled", "{cancel}");
    for i in 0..3 {
        let r = p.tool(70 + i, "echo", json!({"text": format!("plain {i}")}));
        assert!(r.get("error").is_none(), "{r}");
    }

    // Workload 2 (Notion): duplicate tasks polling Notion; once each has started (so that no start
    // can be refused: every refusal then hits a poll), small bursts of plain searches keep Notion's
    // 3 requests/s window full until a poll gets refused (rate_limited) and the proxy must wait.
    let n = &mut notion;
    n.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    let pages = ["sprint-template", "roadmap"];
    let mut dups: Vec<String> = Vec::new();
    let started = |log: &[Value]| log.iter().filter(|l| l["outcome"] == "async_task").count();
    let refused_poll = |log: &[Value]| {
        log.iter().any(|l| l["tool"] == "notion-get-async-task" && l["outcome"] == "rate_limited")
    };
    // A duplicate whose start Notion has answered before any burst, so that bursts meet its polls.
    let duplicate = |n: &mut Peer, dups: &mut Vec<String>| {
        let id = 1 + dups.len() as i64;
        let page = pages[dups.len() % pages.len()];
        dups.push(start_task(n, id, "notion-duplicate-page", json!({ "page_id": page })));
        let deadline = Instant::now() + WAIT;
        while started(&sim_log(&log)) < dups.len() {
            assert!(Instant::now() < deadline, "the duplicates never started: {:?}", sim_log(&log));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    duplicate(n, &mut dups);
    duplicate(n, &mut dups);
    // The bursts meet a poll in the first second or so, but a loaded machine can make them miss a
    // pair's polls until both duplicates end; so the wait is on the refused poll itself, with a
    // generous bound, and each further second without one starts another duplicate to poll.
    let mut next_id = 100;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut bursts = 0;
    while !refused_poll(&sim_log(&log)) {
        assert!(
            Instant::now() < deadline,
            "the workload must get a poll refused (rate_limited) within 60 s ({} duplicates); its log:\n{}",
            dups.len(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if bursts > 0 && bursts % 10 == 0 {
            duplicate(n, &mut dups);
        }
        let ids: Vec<i64> = (0..4).map(|i| next_id + i).collect();
        next_id += 4;
        for id in &ids {
            n.request(*id, "tools/call", json!({"name": "notion-search", "arguments": {"query": "roadmap"}}));
        }
        for id in &ids {
            n.response(*id);
        }
        bursts += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, t) in dups.iter().enumerate() {
        let r = n.ok(200 + i as i64, "tasks/result", json!({"taskId": t}));
        assert_ne!(r["isError"], true, "the duplicate succeeds: {r}");
    }
    let done = now_unix();

    // Prometheus has scraped both endpoints after the workloads.
    prom.wait_scraped("fixture", done + 0.5);
    prom.wait_scraped("notion", done + 0.5);

    let f = r#"job="fixture""#;
    let by_status =
        prom.by(&["asyncify_task_status"], &format!("asyncify_task_duration_seconds_count{{{f}}}"));
    let expected: BTreeMap<String, f64> =
        [("cancelled".into(), 1.0), ("completed".into(), 5.0), ("failed".into(), 2.0)].into();
    assert_eq!(by_status, expected, "tasks by final status");
    let by_tool = prom.by(
        &["gen_ai_tool_name", "asyncify_task_status", "asyncify_task_origin"],
        &format!("asyncify_task_duration_seconds_count{{{f}}}"),
    );
    let expected: BTreeMap<String, f64> = [
        ("fail/failed/local".into(), 2.0),
        ("slow/cancelled/local".into(), 1.0),
        ("slow/completed/local".into(), 5.0),
    ]
    .into();
    assert_eq!(by_tool, expected, "tasks by tool, status and origin");
    let buckets = prom
        .by(&["asyncify_task_status"], &format!("asyncify_task_duration_seconds_bucket{{{f}, le=\"+Inf\"}}"));
    assert_eq!(buckets, by_status, "the +Inf bucket holds every task");
    assert_eq!(prom.value(&format!("sum(asyncify_task_created_total{{{f}}})")), Some(8.0), "tasks created");
    assert_eq!(
        prom.by(&["asyncify_task_origin"], &format!("asyncify_task_created_total{{{f}}}")),
        [("local".into(), 8.0)].into(),
        "fixture tasks are local"
    );
    let completed_sum = prom
        .value(&format!("sum(asyncify_task_duration_seconds_sum{{{f}, asyncify_task_status=\"completed\"}})"))
        .expect("a duration sum for completed tasks");
    assert!(completed_sum >= 5.0 * 0.2, "5 tasks of 200 ms take at least 1 s in all: {completed_sum}");
    assert!(completed_sum < 5.0 * 0.2 + 10.0, "and not absurdly more: {completed_sum}");
    let cancelled_sum = prom
        .value(&format!("sum(asyncify_task_duration_seconds_sum{{{f}, asyncify_task_status=\"cancelled\"}})"))
        .unwrap();
    assert!(cancelled_sum < 30.0, "the cancelled task did not run its 30 s: {cancelled_sum}");
    let working = prom
        .value(&format!(
            "sum(asyncify_task_state_duration_seconds_count{{{f}, asyncify_task_state=\"working\"}})"
        ))
        .expect("state durations");
    assert_eq!(working, 8.0, "each of the 8 tasks left `working` once");
    let still_working = prom
        .value(&format!("sum(asyncify_task_active{{{f}, asyncify_task_status=~\"working|input_required\"}})"))
        .unwrap_or(0.0);
    assert_eq!(still_working, 0.0, "no task is active at the end");
    let calls = prom
        .value(&format!(
            "sum(mcp_server_operation_duration_seconds_count{{{f}, mcp_method_name=\"tools/call\"}})"
        ))
        .expect("server operation durations for tools/call");
    assert!(calls >= 11.0, "8 task calls and 3 plain calls: {calls}");
    let echo = prom
        .value(&format!(
            "sum(mcp_server_operation_duration_seconds_count{{{f}, mcp_method_name=\"tools/call\", gen_ai_tool_name=\"echo\", network_transport=\"pipe\"}})"
        ))
        .expect("echo calls with gen_ai_tool_name and network_transport labels");
    assert_eq!(echo, 3.0, "the plain echo calls");
    let results = prom
        .value(&format!(
            "sum(mcp_server_operation_duration_seconds_count{{{f}, mcp_method_name=\"tasks/result\"}})"
        ))
        .expect("tasks/result operations");
    assert_eq!(results, 7.0, "7 tasks/result requests");
    let upstream = prom
        .value(&format!(
            "sum(mcp_client_operation_duration_seconds_count{{{f}, mcp_method_name=\"tools/call\"}})"
        ))
        .expect("proxy→upstream operation durations");
    assert!(upstream >= 11.0, "every tools/call reached the upstream: {upstream}");

    // Notion: compare the proxy's counters with what the simulator logged.
    let entries = sim_log(&log);
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    let mut refused = 0.0;
    for l in &entries {
        let key = match l["tool"].as_str().unwrap() {
            "notion-duplicate-page" => format!("start/{}", l["outcome"].as_str().unwrap()),
            "notion-get-async-task" if l["outcome"] == "ok" => {
                format!("poll/{}", l["detail"]["status"].as_str().unwrap())
            }
            "notion-get-async-task" => format!("poll/{}", l["outcome"].as_str().unwrap()),
            _ => continue,
        };
        if key.ends_with("/rate_limited") {
            refused += 1.0;
        }
        *expected.entry(key).or_default() += 1.0;
    }
    assert!(
        refused_poll(&entries),
        "the workload must get a poll refused (rate_limited) by the simulator; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let mut counted = prom.by(
        &["asyncify_notion_request", "asyncify_notion_outcome"],
        r#"asyncify_notion_requests_total{job="notion"}"#,
    );
    counted.retain(|_, v| *v != 0.0);
    assert_eq!(counted, expected, "Notion requests by kind and outcome, as the simulator saw them");
    let polls = prom
        .value(r#"sum(asyncify_notion_requests_total{job="notion", asyncify_notion_request="poll"})"#)
        .unwrap_or(0.0);
    assert!(polls > 0.0, "polls counted");
    let waits = prom
        .value(r#"sum(asyncify_notion_rate_limit_wait_seconds_count{job="notion"})"#)
        .expect("rate-limit waits counted");
    assert_eq!(waits, refused, "one wait per rate_limited answer to a start or a poll");
    let waited = prom.value(r#"sum(asyncify_notion_rate_limit_wait_seconds_sum{job="notion"})"#).unwrap();
    // The simulator's retry_after is 1 s.
    assert!(
        waited >= refused * 1.0 - 0.01 && waited <= refused * 1.5,
        "each wait is the simulator's retry_after of 1 s: {waited} s for {refused} refusals"
    );
    assert_eq!(
        prom.by(
            &["asyncify_task_origin", "asyncify_task_status"],
            r#"asyncify_task_duration_seconds_count{job="notion"}"#
        ),
        [("notion/completed".into(), dups.len() as f64)].into(),
        "every duplicate is a Notion task that completed"
    );

    // Every query of the shipped dashboard and alert rules runs on this real Prometheus, and the
    // dashboard's task panels show data for this workload.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("config/grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut with_data = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            if !prom.query(expr).is_empty() {
                with_data += 1;
            }
        }
    }
    assert!(with_data >= 10, "dashboard queries with data: {with_data}");
    let rules = std::fs::read_to_string(root.join("config/alerts.yml")).unwrap();
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let mut expr = rest.trim().trim_start_matches('|').trim().to_owned();
        while let Some(next) = lines.peek() {
            if next.trim_start().starts_with(|c: char| c.is_ascii_lowercase()) && next.contains(':') {
                break;
            }
            expr.push(' ');
            expr.push_str(lines.next().unwrap().trim());
        }
        exprs.push(expr);
    }
    assert_eq!(exprs.len(), 8, "{exprs:?}");
    for expr in exprs {
        prom.query(&expr); // asserts the query is valid
    }
    let promtool =
        Command::new("promtool").args(["check", "rules"]).arg(root.join("config/alerts.yml")).output();
    if let Ok(out) = promtool {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let _ = std::fs::remove_file(&log);
}

/// Port 0: the bound address is logged, and the endpoint serves /healthz, /metrics and 404s.
#[test]
fn metrics_endpoint_on_port_zero_logs_its_address() {
    let mut p = Peer::start_cmd(&mut proxy_cmd(
        &["--metrics-listen", "127.0.0.1:0", "--log-level", "info"],
        &[BIN, "test-server"],
        &[],
    ));
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        let err = p.stderr();
        if let Some(line) = err.lines().find(|l| l.contains("metrics endpoint listening")) {
            let at = line.find("addr=").unwrap_or_else(|| panic!("no addr= in {line:?}")) + 5;
            let addr: String = line[at..]
                .chars()
                .skip_while(|c| *c == '"')
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            break addr;
        }
        assert!(Instant::now() < deadline, "no `metrics endpoint listening` line; stderr:\n{err}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "a real port: {addr}");
    wait_healthz(&addr, &p);
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    let r = p.tool(1, "echo", json!({"text": "hi"}));
    assert!(r.get("error").is_none(), "{r}");
    let (status, _, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        exposition_sum(
            &text,
            "mcp_server_operation_duration_seconds_count",
            &[("mcp_method_name", "tools/call"), ("gen_ai_tool_name", "echo")]
        ) >= 1.0,
        "the echo call is on /metrics:\n{text}"
    );
    let (status, _, _) = http_get(&addr, "/no-such-path").unwrap();
    assert_eq!(status, 404, "unknown paths are 404");
}

// ---------------------------------------------------------------------------------------------------
// 2. OTLP over gRPC and HTTP/protobuf.

fn otlp_env(rx: &OtlpReceiver, service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol.env_value().to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=e2e,test.case=otlp".to_owned()),
    ]
}

fn names(spans: &[SpanRec]) -> Vec<String> {
    spans.iter().map(|s| format!("{} (kind {})", s.name, s.kind)).collect()
}

fn point_summary(points: &[Point]) -> Vec<String> {
    let mut seen: Vec<String> =
        points.iter().map(|p| format!("{} [{:?}, {}]", p.metric, p.kind, p.unit)).collect();
    seen.sort();
    seen.dedup();
    seen
}

fn otlp_round(protocol: Protocol) {
    let rx = OtlpReceiver::start(protocol);
    let service = format!("asyncify-e2e-{}", protocol.env_value().replace('/', "-"));
    let mut p = Peer::start_cmd(&mut proxy_cmd(
        &["--log-level", "info"],
        &[BIN, "test-server"],
        &otlp_env(&rx, &service),
    ));
    p.initialize(serde_json::from_str(TASK_CLIENT).unwrap());
    let done = [
        start_task(&mut p, 1, "slow", json!({"ms": 100, "text": "a"})),
        start_task(&mut p, 2, "slow", json!({"ms": 100, "text": "b"})),
    ];
    let bad = start_task(&mut p, 3, "fail", json!({"message": "boom"}));
    for (i, t) in done.iter().enumerate() {
        p.ok(10 + i as i64, "tasks/result", json!({"taskId": t}));
    }
    p.call(20, "tasks/result", json!({"taskId": bad}));

    // Metrics are exported periodically (every 500 ms), not only at exit.
    let periodic = rx.wait_until(Duration::from_secs(10), |r| {
        otlp_receiver::points(&r.metrics).iter().any(|p| p.metric == "asyncify.task.duration")
    });
    assert!(
        periodic,
        "[{protocol:?}] no periodic metrics export with asyncify.task.duration while the proxy runs; \
         received: {:?}; http: {:?}\nstderr:\n{}",
        point_summary(&rx.points()),
        rx.received().http,
        p.stderr()
    );

    // Client EOF: the proxy exits, flushing its spans and a last metrics export.
    p.close_stdin();
    let status = p.wait_exit(WAIT);
    assert!(status.success(), "[{protocol:?}] the proxy exits cleanly: {status:?}\n{}", p.stderr());
    let got_spans = rx.wait_until(Duration::from_secs(5), |r| {
        otlp_receiver::spans(&r.traces).iter().filter(|s| s.name == "task slow").count() >= 2
    });
    let spans = rx.spans();
    let points = rx.points();
    assert!(
        got_spans,
        "[{protocol:?}] the task spans arrived by exit; spans: {:?}\nstderr:\n{}",
        names(&spans),
        p.stderr()
    );

    // Transport details.
    if protocol == Protocol::HttpProtobuf {
        let http = rx.received().http;
        assert!(!http.is_empty());
        for h in &http {
            assert_eq!(h.method, "POST", "{h:?}");
            assert!(h.path == "/v1/metrics" || h.path == "/v1/traces", "{h:?}");
            assert!(h.content_type.starts_with("application/x-protobuf"), "{h:?}");
            assert_eq!(h.status, 200, "{h:?}");
        }
        assert!(http.iter().any(|h| h.path == "/v1/metrics") && http.iter().any(|h| h.path == "/v1/traces"));
    } else {
        assert!(rx.received().http.is_empty());
    }

    // Resource: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, on metrics and spans.
    for r in points.iter().map(|p| &p.resource).chain(spans.iter().map(|s| &s.resource)) {
        assert_eq!(r.get("service.name"), Some(&service), "[{protocol:?}] resource {r:?}");
        assert_eq!(r.get("test.case").map(String::as_str), Some("otlp"), "[{protocol:?}] resource {r:?}");
    }

    // Metrics.
    let metric_names = point_summary(&points);
    for name in [
        "mcp.server.operation.duration",
        "mcp.client.operation.duration",
        "asyncify.task.created",
        "asyncify.task.duration",
        "asyncify.task.state.duration",
        "asyncify.task.active",
    ] {
        assert!(
            points.iter().any(|p| p.metric == name),
            "[{protocol:?}] metric {name} exported; got {metric_names:?}"
        );
    }
    for name in ["mcp.server.operation.duration", "mcp.client.operation.duration", "asyncify.task.duration"] {
        for p in points.iter().filter(|p| p.metric == name) {
            assert_eq!((p.kind, p.unit.as_str()), (Kind::Histogram, "s"), "[{protocol:?}] {name}: {p:?}");
        }
    }
    let durations = current(&points, "asyncify.task.duration");
    let count: f64 = durations.iter().map(|p| p.value).sum();
    assert_eq!(count, 3.0, "[{protocol:?}] 3 tasks ended: {durations:#?}");
    assert_eq!(
        total(
            &points,
            "asyncify.task.duration",
            &[
                ("asyncify.task.status", "completed"),
                ("gen_ai.tool.name", "slow"),
                ("asyncify.task.origin", "local")
            ]
        ),
        2.0,
        "[{protocol:?}] {durations:#?}"
    );
    assert_eq!(
        total(
            &points,
            "asyncify.task.duration",
            &[("asyncify.task.status", "failed"), ("gen_ai.tool.name", "fail")]
        ),
        1.0,
        "[{protocol:?}] {durations:#?}"
    );
    let completed_sum: f64 = durations
        .iter()
        .filter(|p| p.attrs.get("asyncify.task.status").map(String::as_str) == Some("completed"))
        .map(|p| p.sum)
        .sum();
    assert!(completed_sum >= 0.2, "[{protocol:?}] two 100 ms tasks: {completed_sum}");
    for p in points.iter().filter(|p| p.metric == "asyncify.task.created") {
        assert!(p.kind == Kind::Sum && p.monotonic, "[{protocol:?}] a counter: {p:?}");
    }
    assert_eq!(total(&points, "asyncify.task.created", &[]), 3.0, "[{protocol:?}] 3 tasks created");
    let slow_calls = total(
        &points,
        "mcp.server.operation.duration",
        &[("mcp.method.name", "tools/call"), ("gen_ai.tool.name", "slow"), ("network.transport", "pipe")],
    );
    assert_eq!(slow_calls, 2.0, "[{protocol:?}] {:#?}", current(&points, "mcp.server.operation.duration"));
    assert_eq!(
        total(&points, "mcp.server.operation.duration", &[("mcp.method.name", "tasks/result")]),
        3.0,
        "[{protocol:?}] {:#?}",
        current(&points, "mcp.server.operation.duration")
    );

    // Spans.
    let server = |name: &str| spans.iter().filter(|s| s.kind == SERVER && s.name == name).count();
    assert_eq!(server("tools/call slow"), 2, "[{protocol:?}] SERVER spans: {:?}", names(&spans));
    assert_eq!(server("tools/call fail"), 1, "[{protocol:?}] SERVER spans: {:?}", names(&spans));
    assert_eq!(server("tasks/result"), 3, "[{protocol:?}] SERVER spans: {:?}", names(&spans));
    for s in spans.iter().filter(|s| s.kind == SERVER && s.name == "tools/call slow") {
        assert_eq!(s.attrs.get("mcp.method.name").map(String::as_str), Some("tools/call"), "{s:?}");
        assert_eq!(s.attrs.get("gen_ai.tool.name").map(String::as_str), Some("slow"), "{s:?}");
    }
    let client = spans.iter().filter(|s| s.kind == CLIENT && s.name.starts_with("tools/call")).count();
    assert!(client >= 3, "[{protocol:?}] a CLIENT span per upstream tools/call: {:?}", names(&spans));
    let tasks: Vec<&SpanRec> = spans.iter().filter(|s| s.name == "task slow").collect();
    assert_eq!(tasks.len(), 2, "[{protocol:?}] {:?}", names(&spans));
    for t in &tasks {
        assert_eq!(t.kind, INTERNAL, "{t:?}");
        assert!(!t.events.is_empty(), "[{protocol:?}] task spans carry an event per transition: {t:?}");
    }
    assert_eq!(
        spans.iter().filter(|s| s.name == "task fail" && s.kind == INTERNAL).count(),
        1,
        "[{protocol:?}] {:?}",
        names(&spans)
    );
    for s in &spans {
        assert_eq!(s.trace_id.len(), 32, "{s:?}");
        assert!(s.end >= s.start, "{s:?}");
    }
}

#[test]
fn otlp_grpc_and_http_receive_metrics_and_spans() {
    otlp_round(Protocol::Grpc);
    otlp_round(Protocol::HttpProtobuf);
}

// ---------------------------------------------------------------------------------------------------
// 3. W3C trace context.

/// (trace id, parent id, flags) of a traceparent.
fn parse_traceparent(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    assert_eq!(parts[0], "00", "version of {tp:?}");
    assert!(parts[1].len() == 32 && parts[1].bytes().all(|b| b.is_ascii_hexdigit()), "{tp:?}");
    assert!(parts[2].len() == 16 && parts[2].bytes().all(|b| b.is_ascii_hexdigit()), "{tp:?}");
    assert!(parts[1] != "0".repeat(32) && parts[2] != "0".repeat(16), "{tp:?}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

#[test]
fn trace_context_flows_from_client_through_proxy_to_upstream() {
    let rx = OtlpReceiver::start(Protocol::Grpc);
    let mut p = Peer::start_cmd(&mut proxy_cmd(
        &["--log-level", "info"],
        &[BIN, "test-server", "--raw"],
        &otlp_env(&rx, "asyncify-e2e-tracecontext"),
    ));
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace_id}-{client_span}-01");

    // The raw upstream answers with the params it received.
    let r = p.call(
        1,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "hi"},
               "_meta": {"traceparent": tp, "io.example/keep": "yes"}}),
    );
    let got = &r["result"];
    assert_eq!(got["name"], "echo", "{r}");
    assert_eq!(got["arguments"], json!({"text": "hi"}), "arguments untouched: {r}");
    assert_eq!(got["_meta"]["io.example/keep"], "yes", "other _meta fields kept: {r}");
    let upstream_tp = got["_meta"]["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent: {r}"));
    let (up_trace, up_parent, up_flags) = parse_traceparent(upstream_tp);
    assert_eq!(up_trace, trace_id, "the upstream continues the client's trace");
    assert_ne!(up_parent, client_span, "the upstream's parent is the proxy's CLIENT span");
    assert_eq!(up_flags, "01", "sampled");

    // Without a traceparent, the proxy starts a trace of its own and still propagates it.
    let r = p.call(2, "tools/call", json!({"name": "echo", "arguments": {"text": "fresh"}}));
    let fresh_tp = r["result"]["_meta"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent for a request that had none: {r}"))
        .to_owned();
    let (fresh_trace, fresh_parent, _) = parse_traceparent(&fresh_tp);
    assert_ne!(fresh_trace, trace_id);

    p.close_stdin();
    let status = p.wait_exit(WAIT);
    assert!(status.success(), "{status:?}\n{}", p.stderr());
    let arrived = rx.wait_until(Duration::from_secs(5), |r| {
        let spans = otlp_receiver::spans(&r.traces);
        [&up_parent, &fresh_parent].iter().all(|id| spans.iter().any(|s| &&s.span_id == id))
            && spans.iter().filter(|s| s.kind == SERVER).count() >= 2
    });
    let spans = rx.spans();
    assert!(arrived, "both requests' spans arrived: {spans:#?}\nstderr:\n{}", p.stderr());

    // The proxy's SERVER span continues the client's trace under the client's span…
    let server: Vec<&SpanRec> = spans.iter().filter(|s| s.kind == SERVER && s.trace_id == trace_id).collect();
    assert_eq!(server.len(), 1, "one SERVER span in the client's trace: {spans:#?}");
    let server = server[0];
    assert_eq!(server.parent_span_id, client_span, "parented by the client's span: {server:?}");
    assert_eq!(server.name, "tools/call echo", "{server:?}");
    // …and its CLIENT span, the upstream's parent, is the SERVER span's child in the same trace.
    let client = spans.iter().find(|s| s.span_id == up_parent).expect("the span the upstream saw as parent");
    assert_eq!(client.kind, CLIENT, "{client:?}");
    assert_eq!(client.trace_id, trace_id, "{client:?}");
    assert_eq!(client.parent_span_id, server.span_id, "{client:?}");

    // The second request: a root SERVER span of a fresh trace, with its CLIENT span under it.
    let fresh_client = spans.iter().find(|s| s.span_id == fresh_parent).expect("the fresh CLIENT span");
    assert_eq!(fresh_client.kind, CLIENT);
    assert_eq!(fresh_client.trace_id, fresh_trace);
    let fresh_server = spans
        .iter()
        .find(|s| s.span_id == fresh_client.parent_span_id)
        .unwrap_or_else(|| panic!("the parent of the fresh CLIENT span: {spans:#?}"));
    assert_eq!(fresh_server.kind, SERVER);
    assert_eq!(fresh_server.trace_id, fresh_trace);
    assert!(fresh_server.parent_span_id.is_empty(), "a root span: {fresh_server:?}");
}
