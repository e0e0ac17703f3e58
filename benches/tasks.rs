//! Task creation latency and memory with 100,000 live tasks, through the built binary.
//!
//! The proxy wraps an upstream that reads and never answers (`cat > /dev/null`), so every task stays
//! `working`: this measures what the proxy itself keeps per live task (the record, its runner, the
//! in-flight entry). The client sends one task-augmented `tools/call` at a time and times the
//! `CreateTaskResult`, then reads the proxy's RSS from /proc.
//!
//! `cargo bench --bench tasks` (env `TASKS=n` to change the count).

mod common;

use common::rss_kib;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let count: usize = std::env::var("TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("asyncify-tasks-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bench.toml");
    std::fs::write(&config, format!("[tasks]\nmax_live_tasks = {}\n", count + 10)).unwrap();

    let mut proxy = Command::new(env!("CARGO_BIN_EXE_mcp-asyncify"))
        .args(["--config", config.to_str().unwrap(), "--log-level", "error", "--shutdown-grace-ms", "100"])
        .args(["--", "sh", "-c", "cat > /dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the proxy");
    let pid = proxy.id();
    let mut input = proxy.stdin.take().unwrap();
    let mut output = BufReader::new(proxy.stdout.take().unwrap());
    // Idle: after the proxy has started and answered one request.
    input.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"warm\",\"method\":\"tasks/list\"}\n").unwrap();
    input.flush().unwrap();
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid);

    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let msg = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"tools/call\",\"params\":{{\"name\":\"slow\",\"arguments\":{{\"n\":{i}}},\"task\":{{\"ttl\":3600000}}}}}}\n"
        );
        let t = Instant::now();
        input.write_all(msg.as_bytes()).unwrap();
        input.flush().unwrap();
        line.clear();
        output.read_line(&mut line).unwrap();
        latencies.push(t.elapsed());
        assert!(line.contains("\"status\":\"working\""), "unexpected answer: {line}");
    }
    let total = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(pid);

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "| live tasks | creation p50 | creation p99 | creation max | rate | proxy RSS idle → with tasks |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {count} | {:.0} µs | {:.0} µs | {:.1} ms | {:.0}/s | {:.1} MB → {:.1} MB |",
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        count as f64 / total.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
    drop(input);
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
