//! A simulator of Notion's hosted MCP server, for tests, benches and the demo.
//!
//! It follows the sources we have (Notion's async-tools announcement, Notion's MCP guide, and the
//! published async task object of Notion's API reference): `notion-create-pages` and
//! `notion-duplicate-page` block for the whole operation unless called with `allow_async: true`, then
//! answer at once with an async task in the form `--async-shape` picks (the published `{"object":
//! "async_task", "id", "status", "poll_after_seconds", …}`, the seed's `{"async_task": {"task_id",
//! "suggested_backoff_ms"}}`, or the published object nested under `async_task` with the seed's
//! names); `notion-get-async-task` reports `queued`, `running`, `retrying`, `succeeded` (with the
//! created or duplicated page ids) or `failed` (with a Notion error), in the same form or, with
//! `--minimal-polls`, as nothing but `status` and `result`/`error`. A finished task is forgotten
//! `--retention-ms` after it ended (then a poll gets `object_not_found`, as Notion answers once its
//! bounded retention has passed). Every tool call counts against a limit of
//! `--rate-limit` requests per second; over it, the call gets Notion's `rate_limited` error (HTTP 429)
//! with a `retry_after`. Errors are tool results with `isError: true` whose text (and structured
//! content) is Notion's error object, which is how Notion's MCP server surfaces API errors.

use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerInfo};
use rmcp::{ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the async envelope is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Envelope {
    /// As JSON text content only.
    Text,
    /// As structured content (with the same JSON as text, as MCP asks).
    Structured,
    /// Both (the default).
    Both,
}

/// The form of async task answers (the accepted answer and full poll answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AsyncShape {
    /// The published object: `{"object": "async_task", "id", "status", "status_url", "created_time",
    /// "operation", "poll_after_seconds", "result" | "error"}`.
    Published,
    /// The seed's envelope: `{"async_task": {"task_id", "suggested_backoff_ms"}}`, polls as
    /// `{"task_id", "status", "attempt", "result" | "error"}`.
    Envelope,
    /// The published object nested under `async_task`, named with the seed's `task_id` and
    /// `suggested_backoff_ms`.
    Hybrid,
}

/// Options of the simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct NotionSimArgs {
    /// How long an operation (create or duplicate) takes, in ms.
    #[arg(long, env = "MCP_NOTION_SIM_WORK_MS", default_value_t = 3000)]
    pub work_ms: u64,
    /// Random extra time per operation, 0 to this many ms.
    #[arg(long, env = "MCP_NOTION_SIM_WORK_JITTER_MS", default_value_t = 0)]
    pub work_jitter_ms: u64,
    /// Share of async operations that end `failed` (0 to 1).
    #[arg(long, env = "MCP_NOTION_SIM_FAILURE_RATE", default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Share of async operations that pass through `retrying` (attempt 2) before they end (0 to 1).
    #[arg(long, env = "MCP_NOTION_SIM_RETRYING_RATE", default_value_t = 0.0)]
    pub retrying_rate: f64,
    /// Seed of the pseudo-random choices (same seed, same outcomes in the same order).
    #[arg(long, env = "MCP_NOTION_SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Add fields Notion does not document to `async_task` (`estimated_ms`, `kind`).
    #[arg(long, env = "MCP_NOTION_SIM_EXTRA_FIELDS")]
    pub extra_fields: bool,
    /// The `suggested_backoff_ms` of async answers.
    #[arg(long, env = "MCP_NOTION_SIM_SUGGESTED_BACKOFF_MS", default_value_t = 1000)]
    pub suggested_backoff_ms: u64,
    /// Tool calls allowed per second (any 1-second window); 0 turns the limit off.
    #[arg(long, env = "MCP_NOTION_SIM_RATE_LIMIT", default_value_t = 3)]
    pub rate_limit: u32,
    /// The `retry_after` (seconds) of rate_limited errors.
    #[arg(long, env = "MCP_NOTION_SIM_RETRY_AFTER", default_value_t = 1.0)]
    pub retry_after: f64,
    /// Append one JSON line per tool call to this file.
    #[arg(long, env = "MCP_NOTION_SIM_REQUEST_LOG", value_name = "FILE")]
    pub request_log: Option<PathBuf>,
    /// How the async envelope is returned.
    #[arg(long, env = "MCP_NOTION_SIM_ENVELOPE", value_enum, default_value_t = Envelope::Both)]
    pub envelope: Envelope,
    /// The form of async task answers.
    #[arg(long, env = "MCP_NOTION_SIM_ASYNC_SHAPE", value_enum, default_value_t = AsyncShape::Published)]
    pub async_shape: AsyncShape,
    /// Poll answers carry only `status` (and `result` or `error` once the task ended).
    #[arg(long, env = "MCP_NOTION_SIM_MINIMAL_POLLS")]
    pub minimal_polls: bool,
    /// Forget a finished task this many ms after it ended (a poll then gets `object_not_found`); 0
    /// keeps finished tasks for the simulator's life.
    #[arg(long, env = "MCP_NOTION_SIM_RETENTION_MS", default_value_t = 0)]
    pub retention_ms: u64,
    /// Serve Streamable HTTP at http://ADDR/mcp instead of stdio (one workspace and one rate limit for
    /// every session, like the hosted server).
    #[arg(long, env = "MCP_NOTION_SIM_HTTP", value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// OAuth on `/mcp` over `--http` (`--oauth` and its options).
    #[command(flatten)]
    pub oauth: super::oauth::OAuthSimArgs,
}

/// Notion's limits on a request (from the API's documented limits): text content of a rich-text
/// object, and elements of an array.
const MAX_TEXT: usize = 2000;
const MAX_ARRAY: usize = 100;

/// `notion-create-pages` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreatePages {
    /// The pages to create: `{"properties": {"title": "…"}, "content": "…"}`.
    pub pages: Vec<Value>,
    /// Where to create them: `{"page_id": "…"}` (the workspace when absent).
    #[serde(default)]
    pub parent: Option<Value>,
    /// Answer at once with an `async_task` to poll with `notion-get-async-task`.
    #[serde(default)]
    pub allow_async: Option<bool>,
}

/// `notion-duplicate-page` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct DuplicatePage {
    /// The page to duplicate.
    pub page_id: String,
    /// Answer at once with an `async_task` to poll with `notion-get-async-task`.
    #[serde(default)]
    pub allow_async: Option<bool>,
}

/// `notion-get-async-task` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct GetAsyncTask {
    /// The `task_id` of an `async_task`.
    pub task_id: String,
}

/// `notion-search` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Search {
    /// Words to look for in page titles.
    pub query: String,
}

/// `notion-fetch` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Fetch {
    /// A page id.
    pub id: String,
}

struct Operation {
    tool: String,
    created: SystemTime,
    started: Instant,
    work: Duration,
    fails: bool,
    retries: bool,
    result: Value,
}

impl Operation {
    /// Whether it ended more than `retention` ago (never, with a zero retention).
    fn expired(&self, retention: Duration) -> bool {
        !retention.is_zero() && self.started.elapsed() >= self.work + retention
    }
}

struct State {
    args: NotionSimArgs,
    rng: Mutex<u64>,
    calls: Mutex<VecDeque<Instant>>,
    operations: Mutex<HashMap<String, Operation>>,
    pages: Mutex<HashMap<String, String>>,
    next_id: Mutex<u64>,
    log: Option<Mutex<std::fs::File>>,
}

/// The simulated Notion MCP server.
#[derive(Clone)]
pub struct NotionSim {
    state: Arc<State>,
    tool_router: ToolRouter<Self>,
}

impl NotionSim {
    /// A simulator with a small workspace (a sprint template, a roadmap, meeting notes).
    pub fn new(args: NotionSimArgs) -> anyhow::Result<Self> {
        let log =
            match &args.request_log {
                Some(path) => Some(Mutex::new(
                    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                        anyhow::anyhow!("cannot open the request log {}: {e}", path.display())
                    })?,
                )),
                None => None,
            };
        let pages = [
            ("sprint-template", "Sprint template"),
            ("roadmap", "Roadmap 2026"),
            ("meeting-notes", "Meeting notes"),
        ]
        .into_iter()
        .map(|(id, title)| (id.to_string(), title.to_string()))
        .collect();
        let seed = args.seed.max(1);
        Ok(NotionSim {
            state: Arc::new(State {
                args,
                rng: Mutex::new(seed),
                calls: Mutex::new(VecDeque::new()),
                operations: Mutex::new(HashMap::new()),
                pages: Mutex::new(pages),
                next_id: Mutex::new(1),
                log,
            }),
            tool_router: Self::tool_router(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// A number in [0, 1) from a xorshift generator: deterministic for a seed, no dependency.
    fn random(&self) -> f64 {
        let mut x = lock(&self.rng);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn new_id(&self, prefix: &str) -> String {
        let mut n = lock(&self.next_id);
        *n += 1;
        format!("{prefix}-{:08x}-{:04x}", *n, (self.random() * 65536.0) as u32)
    }

    /// Counts a call against the limit; `false` when it is over (the call is then refused).
    fn admit(&self) -> bool {
        let limit = self.args.rate_limit as usize;
        if limit == 0 {
            return true;
        }
        let now = Instant::now();
        let mut calls = lock(&self.calls);
        while calls.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
            calls.pop_front();
        }
        if calls.len() >= limit {
            return false;
        }
        calls.push_back(now);
        true
    }

    fn log(&self, tool: &str, args: Value, outcome: &str, extra: Value) {
        let Some(log) = &self.log else { return };
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let line = json!({ "ts_ms": ms, "tool": tool, "args": args, "outcome": outcome, "detail": extra });
        let _ = writeln!(lock(log), "{line}");
    }

    fn work(&self) -> Duration {
        let jitter = (self.random() * self.args.work_jitter_ms as f64) as u64;
        Duration::from_millis(self.args.work_ms + jitter)
    }

    /// The status of an operation now: queued for the first tenth of its time, then running (with a
    /// retry in the middle when it retries), then its end.
    fn status(&self, op: &Operation) -> (&'static str, u64) {
        let elapsed = op.started.elapsed();
        let frac = elapsed.as_secs_f64() / op.work.as_secs_f64().max(0.001);
        match frac {
            f if f >= 1.0 && op.fails => ("failed", 1 + u64::from(op.retries)),
            f if f >= 1.0 => ("succeeded", 1 + u64::from(op.retries)),
            f if f < 0.1 => ("queued", 1),
            f if op.retries && (0.4..0.6).contains(&f) => ("retrying", 2),
            f if op.retries && f >= 0.6 => ("running", 2),
            _ => ("running", 1),
        }
    }
}

impl State {
    /// The published async task object (`Hybrid`: with the seed's `task_id` and
    /// `suggested_backoff_ms` in place of `id` and `poll_after_seconds`).
    fn published(&self, id: &str, op: &Operation, status: &str, shape: AsyncShape) -> Map<String, Value> {
        let backoff_ms = self.args.suggested_backoff_ms;
        let mut task = Map::new();
        task.insert("object".into(), json!("async_task"));
        match shape {
            AsyncShape::Hybrid => task.insert("task_id".into(), json!(id)),
            _ => task.insert("id".into(), json!(id)),
        };
        task.insert("status".into(), json!(status));
        task.insert("status_url".into(), json!(format!("https://api.notion.com/v1/async_tasks/{id}")));
        task.insert("created_time".into(), json!(humantime::format_rfc3339_millis(op.created).to_string()));
        task.insert(
            "operation".into(),
            json!({ "surface": "mcp", "name": op.tool.trim_start_matches("notion-") }),
        );
        match shape {
            AsyncShape::Hybrid => task.insert("suggested_backoff_ms".into(), json!(backoff_ms)),
            // Whole seconds as an integer, as the API reference shows them.
            _ if backoff_ms.is_multiple_of(1000) => {
                task.insert("poll_after_seconds".into(), json!(backoff_ms / 1000))
            }
            _ => task.insert("poll_after_seconds".into(), json!(backoff_ms as f64 / 1000.0)),
        };
        task
    }
}

/// A Notion API error object, as Notion returns it.
fn notion_error(status: u16, code: &str, message: &str) -> Value {
    json!({ "object": "error", "status": status, "code": code, "message": message })
}

fn error_result(error: Value) -> CallToolResult {
    CallToolResult::structured_error(error)
}

#[tool_router]
impl NotionSim {
    /// Creates one or more pages. Blocks until they exist, unless `allow_async` is true: then it
    /// answers at once with an `async_task` to poll with `notion-get-async-task`.
    #[tool(name = "notion-create-pages")]
    async fn create_pages(&self, Parameters(p): Parameters<CreatePages>) -> CallToolResult {
        let args = json!({ "pages": p.pages.len(), "allow_async": p.allow_async });
        if let Some(limited) = self.refuse_if_limited("notion-create-pages", &args) {
            return limited;
        }
        if p.pages.is_empty() || p.pages.len() > MAX_ARRAY {
            let msg = format!(
                "body.pages should have between 1 and {MAX_ARRAY} items, instead was {}",
                p.pages.len()
            );
            return self.refuse("notion-create-pages", &args, notion_error(400, "validation_error", &msg));
        }
        let mut titles = Vec::new();
        for page in &p.pages {
            let title =
                page.pointer("/properties/title").and_then(Value::as_str).unwrap_or("Untitled").to_owned();
            let content_len = page.get("content").and_then(Value::as_str).map_or(0, str::len);
            if title.chars().count() > MAX_TEXT || content_len > MAX_TEXT * MAX_ARRAY {
                let msg = format!(
                    "body.pages[{}].properties.title.text.content.length should be ≤ {MAX_TEXT}, instead was {}",
                    titles.len(),
                    title.chars().count()
                );
                return self.refuse(
                    "notion-create-pages",
                    &args,
                    notion_error(400, "validation_error", &msg),
                );
            }
            titles.push(title);
        }
        if let Some(parent) = p.parent.as_ref().and_then(|v| v.get("page_id")).and_then(Value::as_str)
            && !lock(&self.state.pages).contains_key(parent)
        {
            let msg = format!(
                "Could not find page with ID: {parent}. Make sure the relevant pages and databases are shared with your integration."
            );
            return self.refuse("notion-create-pages", &args, notion_error(404, "object_not_found", &msg));
        }
        let ids: Vec<String> = titles.iter().map(|_| self.state.new_id("page")).collect();
        let result = json!({ "pages": ids.iter().zip(&titles).map(|(id, t)| json!({ "id": id, "title": t, "url": format!("https://www.notion.so/{id}") })).collect::<Vec<_>>() });
        {
            let mut pages = lock(&self.state.pages);
            for (id, title) in ids.iter().zip(&titles) {
                pages.insert(id.clone(), title.clone());
            }
        }
        self.run("notion-create-pages", args, p.allow_async.unwrap_or(false), result).await
    }

    /// Duplicates a page and everything under it. Blocks until the copy exists, unless `allow_async`
    /// is true: then it answers at once with an `async_task` to poll with `notion-get-async-task`.
    #[tool(name = "notion-duplicate-page")]
    async fn duplicate_page(&self, Parameters(p): Parameters<DuplicatePage>) -> CallToolResult {
        let args = json!({ "page_id": p.page_id, "allow_async": p.allow_async });
        if let Some(limited) = self.refuse_if_limited("notion-duplicate-page", &args) {
            return limited;
        }
        let Some(title) = lock(&self.state.pages).get(&p.page_id).cloned() else {
            let msg = format!(
                "Could not find page with ID: {}. Make sure the relevant pages and databases are shared with your integration.",
                p.page_id
            );
            return self.refuse("notion-duplicate-page", &args, notion_error(404, "object_not_found", &msg));
        };
        let id = self.state.new_id("page");
        let copy = format!("{title} (copy)");
        lock(&self.state.pages).insert(id.clone(), copy.clone());
        let result = json!({ "page": { "id": id, "title": copy, "url": format!("https://www.notion.so/{id}"), "duplicated_from": p.page_id } });
        self.run("notion-duplicate-page", args, p.allow_async.unwrap_or(false), result).await
    }

    /// Reports the status of an async task: queued, running, retrying, succeeded (with its result) or
    /// failed (with its error).
    #[tool(name = "notion-get-async-task")]
    async fn get_async_task(&self, Parameters(p): Parameters<GetAsyncTask>) -> CallToolResult {
        let args = json!({ "task_id": p.task_id });
        if let Some(limited) = self.refuse_if_limited("notion-get-async-task", &args) {
            return limited;
        }
        let mut ops = lock(&self.state.operations);
        let retention = Duration::from_millis(self.state.args.retention_ms);
        if ops.get(&p.task_id).is_some_and(|op| op.expired(retention)) {
            ops.remove(&p.task_id);
        }
        let Some(op) = ops.get(&p.task_id) else {
            drop(ops);
            let msg = format!("Could not find async task with ID: {}.", p.task_id);
            return self.refuse("notion-get-async-task", &args, notion_error(404, "object_not_found", &msg));
        };
        let (status, attempt) = self.state.status(op);
        let mut body = match (self.state.args.minimal_polls, self.state.args.async_shape) {
            (true, _) => json!({ "status": status }),
            (false, AsyncShape::Envelope) => {
                json!({ "task_id": p.task_id, "status": status, "attempt": attempt })
            }
            (false, shape) => Value::Object(self.state.published(&p.task_id, op, status, shape)),
        };
        match status {
            "succeeded" => body["result"] = op.result.clone(),
            "failed" => {
                let mut error =
                    notion_error(409, "conflict_error", "Conflict occurred while saving. Please try again.");
                error["request_id"] = json!(format!("req-{}", p.task_id));
                body["error"] = error;
            }
            _ => {}
        }
        drop(ops);
        self.state.log("notion-get-async-task", args, "ok", json!({ "status": status }));
        CallToolResult::structured(body)
    }

    /// Searches page titles.
    #[tool(name = "notion-search")]
    async fn search(&self, Parameters(p): Parameters<Search>) -> CallToolResult {
        let args = json!({ "query": p.query });
        if let Some(limited) = self.refuse_if_limited("notion-search", &args) {
            return limited;
        }
        let q = p.query.to_lowercase();
        let mut results: Vec<Value> = lock(&self.state.pages)
            .iter()
            .filter(|(_, t)| q.is_empty() || t.to_lowercase().contains(&q))
            .map(|(id, t)| json!({ "id": id, "title": t }))
            .collect();
        results.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        results.truncate(MAX_ARRAY);
        self.state.log("notion-search", args, "ok", json!({ "results": results.len() }));
        CallToolResult::structured(json!({ "results": results, "has_more": false }))
    }

    /// Fetches a page by id.
    #[tool(name = "notion-fetch")]
    async fn fetch(&self, Parameters(p): Parameters<Fetch>) -> CallToolResult {
        let args = json!({ "id": p.id });
        if let Some(limited) = self.refuse_if_limited("notion-fetch", &args) {
            return limited;
        }
        let Some(title) = lock(&self.state.pages).get(&p.id).cloned() else {
            let msg = format!(
                "Could not find page with ID: {}. Make sure the relevant pages and databases are shared with your integration.",
                p.id
            );
            return self.refuse("notion-fetch", &args, notion_error(404, "object_not_found", &msg));
        };
        self.state.log("notion-fetch", args, "ok", json!({}));
        CallToolResult::structured(json!({ "object": "page", "id": p.id, "title": title }))
    }
}

impl NotionSim {
    fn refuse_if_limited(&self, tool: &str, args: &Value) -> Option<CallToolResult> {
        if self.state.admit() {
            return None;
        }
        let retry = self.state.args.retry_after;
        let mut error = notion_error(
            429,
            "rate_limited",
            "This request exceeds the number of requests allowed. Slow down and try again.",
        );
        error["retry_after"] = json!(retry);
        self.state.log(tool, args.clone(), "rate_limited", json!({ "retry_after": retry }));
        Some(error_result(error))
    }

    fn refuse(&self, tool: &str, args: &Value, error: Value) -> CallToolResult {
        let code = error["code"].as_str().unwrap_or("error").to_owned();
        self.state.log(tool, args.clone(), &code, json!({}));
        error_result(error)
    }

    async fn run(&self, tool: &str, args: Value, allow_async: bool, result: Value) -> CallToolResult {
        let work = self.state.work();
        if !allow_async {
            // Notion's default: the call blocks for the whole operation.
            tokio::time::sleep(work).await;
            self.state.log(tool, args, "ok", json!({ "blocking_ms": work.as_millis() as u64 }));
            return CallToolResult::structured(result);
        }
        let fails = self.state.random() < self.state.args.failure_rate;
        let retries = self.state.random() < self.state.args.retrying_rate;
        let task_id = self.state.new_id("task");
        let op = Operation {
            tool: tool.to_owned(),
            created: SystemTime::now(),
            started: Instant::now(),
            work,
            fails,
            retries,
            result,
        };
        let mut task = match self.state.args.async_shape {
            AsyncShape::Envelope => {
                let mut envelope = Map::new();
                envelope.insert("task_id".into(), json!(task_id));
                envelope.insert("suggested_backoff_ms".into(), json!(self.state.args.suggested_backoff_ms));
                envelope
            }
            shape => self.state.published(&task_id, &op, "queued", shape),
        };
        if self.state.args.extra_fields {
            task.insert("estimated_ms".into(), json!(work.as_millis() as u64));
            task.insert("kind".into(), json!(tool.trim_start_matches("notion-")));
        }
        let body = match self.state.args.async_shape {
            AsyncShape::Published => Value::Object(task),
            AsyncShape::Envelope | AsyncShape::Hybrid => json!({ "async_task": task }),
        };
        {
            let mut ops = lock(&self.state.operations);
            let retention = Duration::from_millis(self.state.args.retention_ms);
            ops.retain(|_, op| !op.expired(retention));
            ops.insert(task_id.clone(), op);
        }
        self.state.log(
            tool,
            args,
            "async_task",
            json!({ "task_id": task_id, "fails": fails, "retries": retries, "work_ms": work.as_millis() as u64 }),
        );
        match self.state.args.envelope {
            Envelope::Both => CallToolResult::structured(body),
            Envelope::Text => {
                CallToolResult::success(vec![rmcp::model::ContentBlock::text(body.to_string())])
            }
            Envelope::Structured => {
                let mut r = CallToolResult::structured(body);
                r.content.clear();
                r
            }
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for NotionSim {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("notion-sim", env!("CARGO_PKG_VERSION")))
            .with_instructions("A local simulator of Notion's hosted MCP server (mcp-asyncify).")
    }
}

/// Serves the simulator on stdio until the client goes away.
pub async fn run(args: NotionSimArgs) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.failure_rate), "--failure-rate must be between 0 and 1");
    anyhow::ensure!((0.0..=1.0).contains(&args.retrying_rate), "--retrying-rate must be between 0 and 1");
    let http = args.http;
    let oauth = args.oauth.clone();
    anyhow::ensure!(
        !oauth.oauth || http.is_some(),
        "--oauth needs --http ADDR (OAuth protects an HTTP server)"
    );
    let sim = NotionSim::new(args)?;
    if let Some(addr) = http {
        return super::serve_http_guarded(sim, addr, Some(&oauth)).await;
    }
    let service = sim.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
