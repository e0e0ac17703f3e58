//! `mcp-asyncify demo`: the proxy, the Notion simulator and a scripted client, in about 20 seconds.
//!
//! The proxy runs in this process (the same [`Session`] the stdio wrapper uses) between an in-memory
//! client and the simulator, which runs as a child process of this same binary (`notion-sim`) so that
//! it is exactly what a user can run by hand. The script shows a fast call passing through, slow Notion
//! operations becoming tasks, their polls and status changes, a failure, a rate limit absorbed, and a
//! summary. On a terminal the tasks are drawn as live progress bars; otherwise it prints plain lines.

mod client;

use crate::config::Config;
use crate::proxy::session::Session;
use crate::proxy::shared::Shared;
use crate::tasks::model::TaskStatus;
use crate::transport::stdio::UpstreamProcess;
use client::RpcClient;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long each simulated Notion operation takes, in ms.
    #[arg(long, default_value_t = 4000)]
    pub work_ms: u64,
    /// Plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo; returns an error if any step does not behave as shown.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let live = !args.plain && std::io::stdout().is_terminal();
    let mut out =
        Printer { start, live, tasks: BTreeMap::new(), drawn: 0, work: Duration::from_millis(args.work_ms) };
    out.line("mcp-asyncify demo: proxy + Notion simulator + a scripted client, all on this machine");

    let exe = std::env::current_exe()?;
    let work = args.work_ms.to_string();
    let sim: Vec<String> = [
        exe.to_str().unwrap_or("mcp-asyncify"),
        "notion-sim",
        "--log-level",
        "warn",
        "--work-ms",
        &work,
        "--rate-limit",
        "3",
        "--suggested-backoff-ms",
        "800",
        "--retrying-rate",
        "0.5",
        "--seed",
        "7",
        "--extra-fields",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut process, upstream_in, upstream_out) = UpstreamProcess::spawn(&sim)?;

    let mut config = Config::profile("notion")?;
    config.log.level = "warn".into();
    config.tasks.keepalive_after_ms = 0;
    let shared = Shared::new(&config);
    let (client_side, proxy_side) = tokio::io::duplex(1 << 20);
    let (proxy_read, proxy_write) = tokio::io::split(proxy_side);
    let session = Session::new(&config, &shared, "demo".into(), proxy_write, upstream_in);
    let router = session.router.clone();
    tokio::spawn({
        let router = router.clone();
        async move { router.pump_client(proxy_read).await }
    });
    tokio::spawn(async move { router.pump_upstream(upstream_out).await });
    let (client_read, client_write) = tokio::io::split(client_side);
    let (client, mut notes) = RpcClient::start(client_read, client_write);

    // 1. Handshake: the proxy adds tasks to what the simulator offers.
    let init = client
        .call(
            "initialize",
            json!({ "protocolVersion": "2025-11-25", "capabilities": { "tasks": {} },
                    "clientInfo": { "name": "asyncify-demo", "version": env!("CARGO_PKG_VERSION") } }),
            TIMEOUT,
        )
        .await?;
    client.notify("notifications/initialized", json!({})).await;
    let server = init["result"]["serverInfo"]["name"].as_str().unwrap_or("?").to_owned();
    let tasks_cap = !init["result"]["capabilities"]["tasks"].is_null();
    out.line(&format!("initialize → server `{server}`; capabilities.tasks added by the proxy: {tasks_cap}"));
    let tools = client.call("tools/list", json!({}), TIMEOUT).await?;
    let taskified: Vec<String> = tools["result"]["tools"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["execution"]["taskSupport"] == "optional")
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.line(&format!("tools/list → taskSupport \"optional\" on {}", taskified.join(", ")));

    // 2. A fast call passes through untouched.
    let t = Instant::now();
    let search =
        client.call("tools/call", tool("notion-search", json!({ "query": "sprint" })), TIMEOUT).await?;
    anyhow::ensure!(search.get("result").is_some(), "notion-search failed: {search}");
    out.line(&format!("fast call notion-search passed straight through in {:.1} ms", ms(t.elapsed())));

    // 3. Slow operations become tasks, answered at once.
    let mut task_ids = Vec::new();
    let calls = [
        (
            "duplicate the sprint template",
            tool("notion-duplicate-page", json!({ "page_id": "sprint-template" })),
        ),
        (
            "create 2 pages",
            tool("notion-create-pages", json!({ "pages": [page("Sprint goal"), page("Retro notes")] })),
        ),
        (
            "create a page with an oversized title",
            tool("notion-create-pages", json!({ "pages": [page(&"x".repeat(2001))] })),
        ),
    ];
    for (what, mut params) in calls {
        params["task"] = json!({ "ttl": 600_000 });
        let t = Instant::now();
        let created = client.call("tools/call", params, TIMEOUT).await?;
        let task = &created["result"]["task"];
        let id = task["taskId"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no task for {what}: {created}"))?
            .to_owned();
        out.line(&format!(
            "{what}: task {} created in {:.1} ms (status {})",
            short(&id),
            ms(t.elapsed()),
            task["status"]
        ));
        out.track(&id, what);
        task_ids.push(id);
    }

    // 4. The client bursts calls of its own: Notion's 3 requests/s runs out, the proxy's polls wait.
    let burst: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .call("tools/call", tool("notion-search", json!({ "query": format!("q{i}") })), TIMEOUT)
                    .await
            })
        })
        .collect();
    let mut limited = 0;
    for b in burst {
        let answer = b.await??;
        if answer.to_string().contains("rate_limited") {
            limited += 1;
        }
    }
    out.line(&format!("the client burst 6 searches: Notion rate limited {limited} of them (the client's own calls are never delayed)"));

    // 5. Watch the tasks until they end (status notifications drive the view; tasks/result confirms).
    let waiters: Vec<_> = task_ids
        .iter()
        .map(|id| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { client.call("tasks/result", json!({ "taskId": id }), TIMEOUT).await })
        })
        .collect();
    let mut remaining = task_ids.len();
    let deadline = Instant::now() + TIMEOUT;
    while remaining > 0 && Instant::now() < deadline {
        tokio::select! {
            note = notes.recv() => {
                let Some(note) = note else { break };
                if note["method"] == "notifications/tasks/status" {
                    let p = &note["params"];
                    let id = p["taskId"].as_str().unwrap_or_default();
                    let status = p["status"].as_str().unwrap_or_default();
                    let message = p["statusMessage"].as_str().unwrap_or_default();
                    if out.update(id, status, message) && matches!(status, "completed" | "failed" | "cancelled") {
                        remaining -= 1;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => out.redraw(),
        }
    }
    out.finish_live();
    for (id, w) in task_ids.iter().zip(waiters) {
        let answer = w.await??;
        let body = answer.get("result").or_else(|| answer.get("error")).cloned().unwrap_or(Value::Null);
        let shown = body.get("structuredContent").cloned().unwrap_or(body);
        let mut text = shown.to_string();
        if text.len() > 140 {
            text.truncate(140);
            text.push('…');
        }
        out.line(&format!("tasks/result {} → {text}", short(id)));
    }

    // 6. Summary.
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut durations = Vec::new();
    for id in &task_ids {
        if let Some(r) = shared.engine.get("demo", id).await {
            *by_status.entry(r.status.as_str()).or_default() += 1;
            if r.status.is_terminal() {
                durations.push(r.last_updated_at.duration_since(r.created_at).unwrap_or_default());
            }
            anyhow::ensure!(r.status != TaskStatus::Working, "task {id} did not finish");
        }
    }
    let stats = shared.scheduler.stats();
    durations.sort();
    out.line("summary:");
    out.line(&format!("  tasks: {} created, {by_status:?}", task_ids.len()));
    if let (Some(min), Some(max)) = (durations.first(), durations.last()) {
        out.line(&format!("  task duration: {:.1} s to {:.1} s", min.as_secs_f64(), max.as_secs_f64()));
    }
    out.line(&format!(
        "  requests to Notion from the proxy: {} (task starts and polls), client calls counted: {}",
        stats.requests, stats.client_calls
    ));
    out.line(&format!(
        "  rate-limited answers absorbed: {} (polls held back {:.1} s in all); budget 3 requests/s",
        stats.rate_limited,
        stats.paused_ms as f64 / 1000.0
    ));
    // The same numbers as the exported OpenTelemetry metrics (what Prometheus would scrape).
    if let Some(text) = crate::telemetry::render_prometheus() {
        out.line("  exported metrics (Prometheus names):");
        for line in metric_summary(&String::from_utf8_lossy(&text)) {
            out.line(&format!("    {line}"));
        }
    }
    out.line(&format!("  finished in {:.1} s", start.elapsed().as_secs_f64()));

    drop(client);
    let mut session = session;
    session.upstream_closer.close().await;
    let _ = process.terminate(Duration::from_secs(1)).await;
    Ok(())
}

/// The task and Notion series of a Prometheus text exposition, one line each (buckets left out).
fn metric_summary(text: &str) -> Vec<String> {
    const SHOWN: &[&str] = &[
        "asyncify_task_created_total",
        "asyncify_task_duration_seconds_count",
        "asyncify_task_duration_seconds_sum",
        "asyncify_task_state_duration_seconds_sum",
        "asyncify_notion_requests_total",
        "asyncify_notion_rate_limit_wait_seconds_count",
        "asyncify_notion_rate_limit_wait_seconds_sum",
    ];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| SHOWN.iter().any(|m| l.starts_with(m) && l[m.len()..].starts_with(['{', ' '])))
        .map(|l| match l.rsplit_once(' ') {
            Some((series, value)) => match value.parse::<f64>() {
                Ok(v) if v.fract() != 0.0 => format!("{series} {v:.3}"),
                _ => l.to_owned(),
            },
            None => l.to_owned(),
        })
        .collect()
}

fn tool(name: &str, arguments: Value) -> Value {
    json!({ "name": name, "arguments": arguments })
}

fn page(title: &str) -> Value {
    json!({ "properties": { "title": title } })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// Prints plain lines, or a live block of progress bars on a terminal.
struct Printer {
    start: Instant,
    live: bool,
    tasks: BTreeMap<String, (usize, String, String, String, Instant)>,
    drawn: usize,
    work: Duration,
}

impl Printer {
    fn line(&mut self, text: &str) {
        self.clear_live();
        println!("[{:>5.1}s] {text}", self.start.elapsed().as_secs_f64());
        self.redraw();
    }

    fn track(&mut self, id: &str, what: &str) {
        let n = self.tasks.len();
        self.tasks.insert(id.into(), (n, what.into(), "working".into(), String::new(), Instant::now()));
    }

    /// Records a status; returns whether it is new.
    fn update(&mut self, id: &str, status: &str, message: &str) -> bool {
        let Some(t) = self.tasks.get_mut(id) else { return false };
        if t.2 == status && t.3 == message {
            return false;
        }
        let newly = t.2 != status;
        t.2 = status.into();
        t.3 = message.into();
        if !self.live {
            let what = t.1.clone();
            let text = format!(
                "task {} ({what}): {status}{}",
                short(id),
                if message.is_empty() { String::new() } else { format!(" — {message}") }
            );
            self.line(&text);
        } else {
            self.redraw();
        }
        newly
    }

    fn clear_live(&mut self) {
        if self.live && self.drawn > 0 {
            print!("\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn redraw(&mut self) {
        if !self.live || self.tasks.is_empty() {
            return;
        }
        self.clear_live();
        let mut rows: Vec<_> = self.tasks.values().collect();
        rows.sort_by_key(|t| t.0);
        for (_, what, status, message, since) in rows {
            let done = matches!(status.as_str(), "completed" | "failed" | "cancelled");
            let frac =
                if done { 1.0 } else { (since.elapsed().as_secs_f64() / self.work.as_secs_f64()).min(0.95) };
            let filled = (frac * 24.0) as usize;
            let bar: String = "█".repeat(filled) + &"░".repeat(24 - filled);
            println!("  {bar} {status:<10} {what:<38} {message}");
        }
        self.drawn = self.tasks.len();
        let _ = std::io::stdout().flush();
    }

    fn finish_live(&mut self) {
        self.redraw();
        self.drawn = 0;
    }
}
