//! A modern upstream for the proxy's tests: an rmcp 3.x server (crates.io `rmcp` =3.11.0, renamed
//! `rmcp3`) that speaks MCP 2026-07-28 and, on the same binary, 2025-11-25, and declares the Tasks
//! extension (SEP-2663).
//!
//! `modern_upstream [--http 127.0.0.1:PORT]`: stdio by default; with `--http`, Streamable HTTP at
//! `/mcp` (2026-07-28 requests served statelessly, 2025-11-25 clients in sessions).
//!
//! Tools:
//! - `echo {text}`: answers `text` at once.
//! - `native_slow {ms, question?}`: on a 2026-07-28 request that declares the Tasks extension, the
//!   server itself answers a `CreateTaskResult` and runs the work as a task of its own
//!   (rmcp's `TaskManager`: `tasks/get`, `tasks/update`, `tasks/cancel`); with `question`, the task
//!   first asks it (an `inputRequests` entry `"confirm"`, answered by `tasks/update`). Without the
//!   extension (or under 2025-11-25) it runs inline and answers when done. Answers
//!   `"slept {ms} ms"` (or `"slept {ms} ms, answer: …"`); a cancelled task ends `cancelled`.
//! - `ask {message}`: needs the user's answer. Under 2026-07-28 the first round answers
//!   `resultType: "input_required"` with `inputRequests.answer` (an `elicitation/create` form with a
//!   required string `answer`) and `requestState: "ask-1"`; the retry carrying `inputResponses.answer`
//!   and that `requestState` answers `"answer: …"` (`"declined"`, `"cancelled"`). Under 2025-11-25
//!   it sends a plain `elicitation/create` request to the client instead.

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ClientResult, ContentBlock,
    CreateTaskResult, GetTaskParams, GetTaskResult, Implementation, InputRequest, InputRequests,
    InputRequiredResult, ListToolsResult, PaginatedRequestParams, ProtocolVersion, ServerCapabilities,
    ServerConfig, ServerRequest, Tool, UpdateTaskParams,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::task_manager::{TaskExit, TaskManager, TaskOptions};
use rmcp::{ErrorData, ServerHandler, ServiceExt};
use rmcp3 as rmcp;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The `requestState` of `ask`'s first round.
const ASK_STATE: &str = "ask-1";

#[derive(Clone, Default)]
struct Upstream {
    /// Shared by every handler instance (the HTTP service makes one per session or request).
    tasks: TaskManager,
}

fn text(s: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(s.into())])
}

fn tool(name: &str, description: &str, schema: Value) -> Tool {
    let Value::Object(schema) = schema else { unreachable!() };
    Tool::new(name.to_owned(), description.to_owned(), Arc::new(schema))
}

fn bad_args(e: impl std::fmt::Display) -> ErrorData {
    ErrorData::invalid_params(format!("invalid arguments: {e}"), None)
}

/// The elicitation form every question here uses: one required string, `answer`.
fn form(message: &str) -> Value {
    json!({
        "mode": "form",
        "message": message,
        "requestedSchema": {
            "type": "object",
            "properties": { "answer": { "type": "string" } },
            "required": ["answer"]
        }
    })
}

/// What an `ElicitResult` (as JSON) says, as text.
fn answered(elicit: &Value) -> String {
    match elicit["action"].as_str() {
        Some("accept") => format!("answer: {}", elicit["content"]["answer"].as_str().unwrap_or("")),
        Some("decline") => "declined".into(),
        Some("cancel") => "cancelled".into(),
        other => format!("unknown action {other:?}"),
    }
}

/// Whether the request is served under 2026-07-28 (its own `_meta` version, or its session's).
fn modern(context: &RequestContext<RoleServer>) -> bool {
    context.protocol_version().is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str())
}

impl Upstream {
    async fn native_slow(
        &self,
        args: &Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let ms =
            args.get("ms").and_then(Value::as_u64).ok_or_else(|| bad_args("`ms` (integer) is required"))?;
        let question = args.get("question").and_then(Value::as_str).map(str::to_owned);
        // The extension counts only under 2026-07-28 (it MUST be ignored under 2025-11-25; rmcp
        // itself would also honour one declared in a 2025-11-25 `initialize`).
        let declared = modern(context) && context.client_capabilities().is_some_and(|c| c.supports_tasks());
        if !declared {
            if question.is_some() {
                return Err(bad_args("`question` needs a task (declare the Tasks extension)"));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = context.ct.cancelled() => return Ok(text("cancelled").into()),
            }
            return Ok(text(format!("slept {ms} ms")).into());
        }
        let options = TaskOptions::new().with_ttl_ms(600_000u64).with_poll_interval_ms(100);
        let task = self.tasks.spawn(options, move |ctx| {
            Box::pin(async move {
                let mut said = String::new();
                if let Some(q) = question {
                    let request: InputRequest =
                        serde_json::from_value(json!({ "method": "elicitation/create", "params": form(&q) }))
                            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                    let answer = ctx.request_input("confirm", request).await?;
                    said = format!(", {}", answered(&answer));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(text(format!("slept {ms} ms{said}"))),
                    _ = ctx.cancelled() => Err(TaskExit::Cancelled),
                }
            })
        });
        Ok(CallToolResponse::Task(CreateTaskResult::new(task)))
    }

    async fn ask(
        &self,
        request: &CallToolRequestParams,
        args: &Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let message = args
            .get("message")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_args("`message` (string) is required"))?;
        if !modern(context) {
            // 2025-11-25: a server-to-client request on the session.
            let req: ServerRequest =
                serde_json::from_value(json!({ "method": "elicitation/create", "params": form(message) }))
                    .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
            let answer = context
                .peer
                .send_request(req)
                .await
                .map_err(|e| ErrorData::internal_error(format!("elicitation failed: {e}"), None))?;
            let answer = match answer {
                ClientResult::ElicitResult(r) => serde_json::to_value(r).unwrap_or_default(),
                other => serde_json::to_value(other).unwrap_or_default(),
            };
            return Ok(text(answered(&answer)).into());
        }
        // 2026-07-28: multi round-trip. Round 2 carries the answer and the state of round 1.
        match request.request_state.as_deref() {
            None => {
                let input: InputRequest = serde_json::from_value(
                    json!({ "method": "elicitation/create", "params": form(message) }),
                )
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                let mut requests = InputRequests::new();
                requests.insert("answer".into(), input);
                Ok(InputRequiredResult::new(Some(requests), Some(ASK_STATE.into())).into())
            }
            Some(ASK_STATE) => {
                let answer = request
                    .input_responses
                    .as_ref()
                    .and_then(|r| r.get("answer"))
                    .ok_or_else(|| bad_args("the retry carries no inputResponses.answer"))?;
                Ok(text(answered(answer)).into())
            }
            Some(other) => Err(bad_args(format!("unknown requestState {other:?}"))),
        }
    }
}

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tasks().build())
            .with_server_info(Implementation::new("modern-upstream", "1.0.0"))
            .with_instructions("A 2026-07-28 test upstream: echo, native_slow (its own tasks), ask (MRTR).")
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(vec![
            tool(
                "echo",
                "Answers its text.",
                json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
            ),
            tool(
                "native_slow",
                "Works for ms milliseconds: as a task of the server's own when the request declares the \
                 Tasks extension (asking `question` first, if given), inline otherwise.",
                json!({"type": "object", "properties": {
                    "ms": {"type": "integer", "minimum": 0},
                    "question": {"type": "string"}
                }, "required": ["ms"]}),
            ),
            tool(
                "ask",
                "Asks the user (an elicitation form with a required string `answer`) and answers what they said.",
                json!({"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}),
            ),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.clone().unwrap_or_default();
        match request.name.as_ref() {
            "echo" => {
                let t =
                    args.get("text").and_then(Value::as_str).ok_or_else(|| bad_args("`text` is required"))?;
                Ok(text(t).into())
            }
            "native_slow" => self.native_slow(&args, &context).await,
            "ask" => self.ask(&request, &args, &context).await,
            other => Err(ErrorData::invalid_params(format!("unknown tool {other:?}"), None)),
        }
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.tasks.update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.tasks.cancel_task(&request.task_id)
    }
}

async fn serve_http(addr: &str, upstream: Upstream) -> anyhow::Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let service = StreamableHttpService::new(
        move || Ok(upstream.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("modern_upstream: Streamable HTTP on http://{}/mcp", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let upstream = Upstream::default();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => {
            let running = upstream.serve(rmcp::transport::stdio()).await?;
            running.waiting().await?;
            Ok(())
        }
        ["--http", addr] => serve_http(addr, upstream).await,
        _ => anyhow::bail!("usage: modern_upstream [--http 127.0.0.1:PORT]"),
    }
}
