//! The upstream for the official conformance suite's tasks scenarios
//! (`@modelcontextprotocol/conformance`, SEP-2663 `tasks-*`): an rmcp server with the tools those
//! scenarios call, by the names, arguments, texts and timings they expect.
//!
//! It is a plain 2025-11-25 server with no tasks of its own: every tool simply runs (and asks its
//! client when it needs input) as a synchronous `tools/call`. The proxy in front of it makes the slow
//! ones tasks (`--task-tools`), so the suite tests what the proxy adds. Reachable as
//! `mcp-asyncify test-server --conformance` (stdio, or `--http ADDR`).
//!
//! * `greet {name}` → `Hello, {name}!` at once.
//! * `slow_compute {seconds = 3, label?}` → sleeps, then `Computed {label} in {seconds}s`; `seconds: 0`
//!   answers at once. Stops when the call is cancelled.
//! * `failing_job` → after 1 s, a tool result with `isError: true`.
//! * `protocol_error_job` → after 200 ms, a JSON-RPC internal error (-32603).
//! * `confirm_delete {filename}` → one form elicitation (boolean `confirm`), then `Deleted {filename}`
//!   or `Kept {filename} (…)`.
//! * `multi_input` → two form elicitations at once (string `name`, boolean `confirm`), then a text
//!   with both answers.
//! * `test_tool_with_task` → one form elicitation (string `name`, the user's name), then 1 s of work,
//!   then `Hello, {name}! Your task is done.`

use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResult, ContentBlock, ElicitRequestParams, Implementation, ServerCapabilities, ServerInfo,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// `greet` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Greet {
    /// Who to greet.
    pub name: String,
}

fn default_seconds() -> f64 {
    3.0
}

/// `slow_compute` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SlowCompute {
    /// How long to work, in seconds (default 3; 0 answers at once).
    #[serde(default = "default_seconds")]
    pub seconds: f64,
    /// A name for this computation, repeated in the result.
    #[serde(default)]
    pub label: Option<String>,
}

/// `confirm_delete` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ConfirmDelete {
    /// The file to delete (nothing is deleted: the answer is only reported).
    pub filename: String,
}

/// The conformance fixture server.
#[derive(Clone)]
pub struct Conformance {
    tool_router: ToolRouter<Self>,
}

impl Default for Conformance {
    fn default() -> Self {
        Conformance { tool_router: Self::tool_router() }
    }
}

fn text(s: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(s.into())])
}

fn internal(e: impl std::fmt::Display) -> ErrorData {
    ErrorData::internal_error(e.to_string(), None)
}

fn cancelled() -> ErrorData {
    ErrorData::internal_error("cancelled", None)
}

/// A form elicitation with one required property `field` of JSON type `kind`.
fn form(message: String, field: &str, kind: &str) -> Result<ElicitRequestParams, ErrorData> {
    serde_json::from_value(json!({
        "mode": "form",
        "message": message,
        "requestedSchema": {
            "type": "object",
            "properties": { field: { "type": kind } },
            "required": [field]
        }
    }))
    .map_err(internal)
}

/// Asks the client (elicitation/create) and returns its answer as JSON (`{action, content?}`), or
/// an error when the call is cancelled meanwhile.
async fn elicit(ctx: &RequestContext<RoleServer>, params: ElicitRequestParams) -> Result<Value, ErrorData> {
    tokio::select! {
        answer = ctx.peer.create_elicitation(params) => serde_json::to_value(answer.map_err(internal)?).map_err(internal),
        _ = ctx.ct.cancelled() => Err(cancelled()),
    }
}

/// Sleeps, or fails when the call is cancelled meanwhile.
async fn work(ctx: &RequestContext<RoleServer>, how_long: Duration) -> Result<(), ErrorData> {
    tokio::select! {
        _ = tokio::time::sleep(how_long) => Ok(()),
        _ = ctx.ct.cancelled() => Err(cancelled()),
    }
}

/// The answer's action, and its content's `field` as text when it was accepted.
fn answered(answer: &Value, field: &str) -> (String, Option<String>) {
    let action = answer["action"].as_str().unwrap_or("?").to_owned();
    let value = (action == "accept")
        .then(|| answer.pointer(&format!("/content/{field}")))
        .flatten()
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    (action, value)
}

#[tool_router]
impl Conformance {
    /// Greets someone: answers "Hello, {name}!" at once.
    #[tool]
    async fn greet(&self, Parameters(p): Parameters<Greet>) -> CallToolResult {
        text(format!("Hello, {}!", p.name))
    }

    /// Works for `seconds` seconds (default 3), then reports; `seconds: 0` answers at once.
    #[tool]
    async fn slow_compute(
        &self,
        Parameters(p): Parameters<SlowCompute>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let seconds = if p.seconds.is_finite() { p.seconds.clamp(0.0, 3600.0) } else { 0.0 };
        if seconds > 0.0 {
            work(&ctx, Duration::from_secs_f64(seconds)).await?;
        }
        let label = p.label.as_deref().unwrap_or("slow_compute");
        Ok(text(format!("Computed {label} in {seconds}s")))
    }

    /// Fails as a tool after about a second: a result with `isError: true`.
    #[tool]
    async fn failing_job(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        work(&ctx, Duration::from_secs(1)).await?;
        Ok(CallToolResult::error(vec![ContentBlock::text(
            "failing_job failed: the job hit a simulated error",
        )]))
    }

    /// Fails at the protocol level after a moment: a JSON-RPC internal error.
    #[tool]
    async fn protocol_error_job(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        work(&ctx, Duration::from_millis(200)).await?;
        Err(ErrorData::internal_error("protocol_error_job: simulated internal failure", None))
    }

    /// Asks the user to confirm deleting `filename`, then reports their answer.
    #[tool]
    async fn confirm_delete(
        &self,
        Parameters(p): Parameters<ConfirmDelete>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let question = form(format!("Delete {}?", p.filename), "confirm", "boolean")?;
        let answer = elicit(&ctx, question).await?;
        let confirmed =
            answer["action"] == "accept" && answer.pointer("/content/confirm") == Some(&json!(true));
        Ok(text(if confirmed {
            format!("Deleted {}", p.filename)
        } else {
            format!("Kept {} ({})", p.filename, answer["action"].as_str().unwrap_or("no answer"))
        }))
    }

    /// Asks two questions at once (a name, a confirmation), then reports both answers.
    #[tool]
    async fn multi_input(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        let name = form("multi_input: what name should be used?".into(), "name", "string")?;
        let confirm = form("multi_input: proceed?".into(), "confirm", "boolean")?;
        let (name, confirm) = tokio::join!(elicit(&ctx, name), elicit(&ctx, confirm));
        let (name_action, name) = answered(&name?, "name");
        let (confirm_action, confirm) = answered(&confirm?, "confirm");
        Ok(text(format!(
            "multi_input: name={} ({name_action}), confirm={} ({confirm_action})",
            name.as_deref().unwrap_or("-"),
            confirm.as_deref().unwrap_or("-"),
        )))
    }

    /// Asks the user's name, then works for a second, then greets them.
    #[tool]
    async fn test_tool_with_task(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let answer = elicit(&ctx, form("What is your name?".into(), "name", "string")?).await?;
        let (action, name) = answered(&answer, "name");
        let Some(name) = name.or_else(|| answered(&answer, "user_name").1) else {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "test_tool_with_task: no name given ({action})"
            ))]));
        };
        work(&ctx, Duration::from_secs(1)).await?;
        Ok(text(format!("Hello, {name}! Your task is done.")))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Conformance {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("asyncify-conformance-fixture", env!("CARGO_PKG_VERSION")))
    }
}

/// Runs the conformance fixture on stdio until the client goes away, or over Streamable HTTP at
/// http://ADDR/mcp.
pub async fn run(http: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    if let Some(addr) = http {
        return super::serve_http(Conformance::default(), addr).await;
    }
    let service = Conformance::default().serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
