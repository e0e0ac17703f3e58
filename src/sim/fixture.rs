//! The test upstream: an rmcp server with no tasks of its own and tools that are slow, fail, send
//! progress, ask for input (elicitation, sampling), crash, and tell their process id.
//!
//! With `--raw` it is instead a line echo server that answers every request with its own `params`
//! bytes, for byte-exact tests: `{"jsonrpc":"2.0","id":<id as sent>,"result":<params as sent>}`.
//! Method `raw/notify` makes it send back a notification first, `raw/garbage` a line that is not JSON,
//! `raw/ask` a server→client request whose answer it then returns, and `raw/exit` exits with
//! `params.code`.

#![allow(deprecated)] // sampling is deprecated by SEP-2577 but clients still use it, so the fixture asks for it

use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResult, ContentBlock, CreateMessageRequestParams, ElicitRequestParams, Implementation,
    ProgressNotificationParam, ServerCapabilities, ServerInfo,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Options of the fixture server.
#[derive(Debug, Clone, clap::Args)]
pub struct FixtureArgs {
    /// Be a raw line echo server instead (byte-exact tests).
    #[arg(long)]
    pub raw: bool,
    /// Be the conformance suite's upstream instead (`greet`, `slow_compute`, `failing_job`, …; see
    /// `sim::conformance`).
    #[arg(long, conflicts_with = "raw")]
    pub conformance: bool,
    /// Serve Streamable HTTP at http://ADDR/mcp instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
}

/// `echo` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Echo {
    /// What to send back.
    pub text: String,
}

/// `slow` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Slow {
    /// How long to work, in ms.
    pub ms: u64,
    /// What to answer (default "slept <ms> ms").
    #[serde(default)]
    pub text: Option<String>,
}

/// `fail` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Fail {
    /// The error text of the tool result.
    pub message: String,
}

/// `rpc_error` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RpcError {
    /// JSON-RPC error code.
    pub code: i32,
    /// JSON-RPC error message.
    pub message: String,
}

/// `progress` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Progress {
    /// How many progress notifications.
    pub steps: u32,
    /// Time between them, in ms.
    pub interval_ms: u64,
}

/// `ask` and `sample` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Ask {
    /// The question (elicitation message or sampling prompt).
    pub message: String,
}

/// `crash` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Crash {
    /// Exit status.
    pub code: i32,
    /// Wait this long first, in ms.
    #[serde(default)]
    pub after_ms: u64,
}

/// `big` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Big {
    /// Length of the text answered.
    pub bytes: usize,
}

/// The fixture server.
#[derive(Clone)]
pub struct Fixture {
    cancellations: Arc<AtomicU64>,
    tool_router: ToolRouter<Self>,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture { cancellations: Arc::new(AtomicU64::new(0)), tool_router: Self::tool_router() }
    }
}

fn text(s: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(s.into())])
}

fn internal(e: impl std::fmt::Display) -> ErrorData {
    ErrorData::internal_error(e.to_string(), None)
}

#[tool_router]
impl Fixture {
    /// Answers its text.
    #[tool]
    async fn echo(&self, Parameters(p): Parameters<Echo>) -> CallToolResult {
        text(p.text)
    }

    /// Works for `ms` milliseconds; stops early when cancelled.
    #[tool]
    async fn slow(&self, Parameters(p): Parameters<Slow>, ctx: RequestContext<RoleServer>) -> CallToolResult {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(p.ms)) => {
                text(p.text.unwrap_or_else(|| format!("slept {} ms", p.ms)))
            }
            _ = ctx.ct.cancelled() => {
                self.cancellations.fetch_add(1, Ordering::SeqCst);
                CallToolResult::error(vec![ContentBlock::text("cancelled")])
            }
        }
    }

    /// Answers a tool result with `isError: true`.
    #[tool]
    async fn fail(&self, Parameters(p): Parameters<Fail>) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(p.message)])
    }

    /// Answers a JSON-RPC error.
    #[tool]
    async fn rpc_error(&self, Parameters(p): Parameters<RpcError>) -> Result<CallToolResult, ErrorData> {
        Err(ErrorData::new(rmcp::model::ErrorCode(p.code), p.message, Some(json!({ "from": "fixture" }))))
    }

    /// Sends `steps` progress notifications for the call's progressToken, then answers.
    #[tool]
    async fn progress(
        &self,
        Parameters(p): Parameters<Progress>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let token = ctx.meta.get_progress_token();
        for step in 1..=p.steps {
            tokio::time::sleep(Duration::from_millis(p.interval_ms)).await;
            if let Some(token) = &token {
                let mut param = ProgressNotificationParam::new(token.clone(), f64::from(step));
                param.total = Some(f64::from(p.steps));
                param.message = Some(format!("step {step}"));
                ctx.peer.notify_progress(param).await.map_err(internal)?;
            }
        }
        Ok(text(format!("done {} steps", p.steps)))
    }

    /// Asks the user (elicitation, a form with a required string `answer`) and answers what they said.
    #[tool]
    async fn ask(
        &self,
        Parameters(p): Parameters<Ask>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let params: ElicitRequestParams = serde_json::from_value(json!({
            "mode": "form",
            "message": p.message,
            "requestedSchema": {
                "type": "object",
                "properties": { "answer": { "type": "string" } },
                "required": ["answer"]
            }
        }))
        .map_err(internal)?;
        let answer = ctx.peer.create_elicitation(params).await.map_err(internal)?;
        let value = serde_json::to_value(&answer).map_err(internal)?;
        Ok(match value["action"].as_str() {
            Some("accept") => text(format!("answer: {}", value["content"]["answer"].as_str().unwrap_or(""))),
            Some("decline") => text("declined"),
            Some("cancel") => text("cancelled"),
            other => text(format!("unknown action {other:?}")),
        })
    }

    /// Asks the client's model (sampling) and answers what it said.
    #[tool]
    async fn sample(
        &self,
        Parameters(p): Parameters<Ask>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let params: CreateMessageRequestParams = serde_json::from_value(json!({
            "messages": [{ "role": "user", "content": { "type": "text", "text": p.message } }],
            "maxTokens": 100
        }))
        .map_err(internal)?;
        #[allow(deprecated)]
        let answer = ctx.peer.create_message(params).await.map_err(internal)?;
        let value = serde_json::to_value(&answer).map_err(internal)?;
        let said = value.pointer("/content/text").and_then(|v| v.as_str()).unwrap_or("").to_owned();
        Ok(text(format!("model said: {said}")))
    }

    /// Exits the process with `code` (after `after_ms`), mid-call.
    #[tool]
    async fn crash(&self, Parameters(p): Parameters<Crash>) -> CallToolResult {
        tokio::time::sleep(Duration::from_millis(p.after_ms)).await;
        std::process::exit(p.code)
    }

    /// Answers this process's id.
    #[tool]
    async fn pid(&self) -> CallToolResult {
        text(std::process::id().to_string())
    }

    /// Answers how many calls were cancelled (by `notifications/cancelled`) so far.
    #[tool]
    async fn cancelled(&self) -> CallToolResult {
        text(self.cancellations.load(Ordering::SeqCst).to_string())
    }

    /// Answers a text of `bytes` characters.
    #[tool]
    async fn big(&self, Parameters(p): Parameters<Big>) -> CallToolResult {
        text("x".repeat(p.bytes))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Fixture {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("asyncify-fixture", env!("CARGO_PKG_VERSION")))
    }
}

/// Runs the fixture server on stdio until the client goes away.
pub async fn run(args: FixtureArgs) -> anyhow::Result<()> {
    if args.raw {
        return raw().await;
    }
    if args.conformance {
        return super::conformance::run(args.http).await;
    }
    if let Some(addr) = args.http {
        return super::serve_http(Fixture::default(), addr).await;
    }
    let service = Fixture::default().serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}

/// The raw line echo server (see the module docs).
async fn raw() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let Ok(msg) = serde_json::from_str::<RawMsg>(&line) else {
            eprintln!("raw fixture: not JSON-RPC: {line}");
            continue;
        };
        let (Some(id), Some(method)) = (msg.id, msg.method.as_deref()) else {
            if msg.method.is_none() {
                // An answer to our `raw/ask`: send it back as the result of the request that asked.
                if let Some(pending) = msg.id {
                    let result = msg.result.as_ref().map_or("null", |r| r.get());
                    let original = pending.get().trim_start_matches("\"ask-").trim_end_matches('"');
                    let reply = format!("{{\"jsonrpc\":\"2.0\",\"id\":{original},\"result\":{result}}}\n");
                    out.write_all(reply.as_bytes()).await?;
                    out.flush().await?;
                }
            }
            continue;
        };
        let params = msg.params.as_ref().map_or("null", |p| p.get());
        let mut reply = String::new();
        match method {
            "raw/notify" => reply.push_str(&format!(
                "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{params}}}\n"
            )),
            "raw/garbage" => reply.push_str("this line is not JSON\n"),
            "raw/exit" => {
                let code = serde_json::from_str::<serde_json::Value>(params)
                    .ok()
                    .and_then(|v| v["code"].as_i64())
                    .unwrap_or(0);
                std::process::exit(code as i32);
            }
            "raw/ask" => {
                // (numeric ids only) Ask the client; the answer comes back with id "ask-<id>" and completes this request.
                let ask = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":\"ask-{}\",\"method\":\"roots/list\",\"params\":{{}}}}\n",
                    id.get()
                );
                out.write_all(ask.as_bytes()).await?;
                out.flush().await?;
                continue;
            }
            _ => {}
        }
        // Odd but valid spacing and key order, so a re-serialising proxy would show.
        reply.push_str(&format!("{{ \"result\" : {params}, \"id\":{},\"jsonrpc\":\"2.0\" }}\n", id.get()));
        out.write_all(reply.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawMsg<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
    method: Option<String>,
    #[serde(borrow)]
    params: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    result: Option<&'a serde_json::value::RawValue>,
}
