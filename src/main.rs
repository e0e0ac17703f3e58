//! The `mcp-asyncify` command: parse the command line, build the configuration, run one mode.

use clap::{Parser, Subcommand};
use mcp_asyncify::config::{Config, LogFormat, Overrides};
use mcp_asyncify::telemetry::{Telemetry, TelemetryOptions};
use std::path::PathBuf;

/// A transparent MCP proxy that turns slow tool calls into MCP Tasks.
///
/// Wrap a stdio MCP server: `mcp-asyncify [OPTIONS] -- <command> [args…]`. Everything passes through
/// unchanged except what the proxy is asked to change.
#[derive(Parser, Debug)]
#[command(name = "mcp-asyncify", version, about, long_about = None)]
#[command(after_help = "Example:\n  mcp-asyncify -- npx -y @modelcontextprotocol/server-everything")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    #[command(subcommand)]
    mode: Option<Mode>,

    /// The upstream MCP server to run, after `--`: `mcp-asyncify -- npx -y @notionhq/notion-mcp-server`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Options shared by every mode.
#[derive(clap::Args, Debug)]
struct CommonArgs {
    /// A TOML configuration file (see config/default.toml for every key).
    #[arg(long, global = true, env = "MCP_ASYNCIFY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// A built-in profile to start from: `notion` (see config/notion.toml); a --config file goes on top.
    #[arg(long, global = true, env = "MCP_ASYNCIFY_PROFILE", value_name = "NAME")]
    profile: Option<String>,

    /// Log level or RUST_LOG-style filter (logs go to stderr). Default: $RUST_LOG, else `info`.
    #[arg(long, global = true, env = "MCP_ASYNCIFY_LOG_LEVEL", value_name = "LEVEL")]
    log_level: Option<String>,

    /// Log format.
    #[arg(long, global = true, env = "MCP_ASYNCIFY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,

    /// The largest message accepted from either side, in bytes [default: 16777216].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    max_message_bytes: Option<usize>,

    /// How long the upstream gets to exit after its stdin closes, before SIGTERM/SIGKILL [default: 3000].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_SHUTDOWN_GRACE_MS", value_name = "MS")]
    shutdown_grace_ms: Option<u64>,

    /// Which protocol generation the upstream speaks: legacy (2025-11-25), modern (2026-07-28), or auto
    /// (probe with server/discover) [default: legacy].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_UPSTREAM_PROTOCOL", value_enum, value_name = "GEN")]
    upstream_protocol: Option<mcp_asyncify::config::UpstreamProtocol>,

    /// Tools that may run as tasks, by name or glob, comma-separated [default: *].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_TASK_TOOLS", value_name = "GLOBS", value_delimiter = ',')]
    task_tools: Option<Vec<String>>,

    /// Answer plain tool calls still running after this many ms with a hand-off result; the work goes
    /// on as a task (0: never) [default: 0].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_SYNC_DEADLINE_MS", value_name = "MS")]
    sync_deadline_ms: Option<u64>,

    /// 2026-07-28 clients with the tasks extension: a task tool's call still running after this many ms
    /// becomes a task; a faster one answers inline (0: a task at once) [default: 1000].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_TASK_AFTER_MS", value_name = "MS")]
    task_after_ms: Option<u64>,

    /// Tools that must run as tasks, by name or glob, comma-separated: -32021 for 2026-07-28 clients
    /// without the tasks extension, -32601 for 2025-11-25 calls without params.task [default: none].
    #[arg(
        long,
        global = true,
        env = "MCP_ASYNCIFY_TASK_REQUIRED",
        value_name = "GLOBS",
        value_delimiter = ','
    )]
    task_required: Option<Vec<String>>,

    /// Requests per second toward the Notion upstream, shared by polls, task starts and the client's own
    /// calls (Notion allows 3) [default: 3].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_NOTION_BUDGET", value_name = "N")]
    notion_budget: Option<u32>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). OTLP export is set by the
    /// standard OTEL_EXPORTER_OTLP_* variables.
    #[arg(long, global = true, env = "MCP_ASYNCIFY_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,

    /// A hosted MCP server to reach over Streamable HTTP instead of running a command (http or https).
    #[arg(long, global = true, env = "MCP_ASYNCIFY_UPSTREAM_URL", value_name = "URL")]
    upstream_url: Option<String>,

    /// A header sent with every request to --upstream-url, "Name: value" (repeatable; `${VAR}` in the
    /// value is taken from the environment, so secrets stay out of the command line).
    #[arg(
        long = "header",
        global = true,
        env = "MCP_ASYNCIFY_HEADERS",
        value_delimiter = '\n',
        value_name = "HEADER"
    )]
    headers: Vec<String>,

    /// Who provides the Authorization sent to --upstream-url: oauth (the proxy signs in when the
    /// upstream asks), passthrough (the sidecar's client's own), none [default: oauth].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_UPSTREAM_AUTH", value_enum, value_name = "MODE")]
    upstream_auth: Option<mcp_asyncify::config::UpstreamAuthMode>,

    /// Whether an OAuth sign-in may open the browser: auto (the stdio wrapper and login do, the
    /// sidecar does not), browser, never [default: auto].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_SIGN_IN", value_enum, value_name = "WHEN")]
    sign_in: Option<mcp_asyncify::config::SignInMode>,

    /// Do not offer tasks at all: a pure passthrough.
    #[arg(long, global = true)]
    no_tasks: bool,

    /// Where tasks live: memory, file:PATH (redb) or redis://HOST:PORT[/DB] (rediss:// for TLS)
    /// [default: a file per upstream under the data directory for the stdio wrapper, memory for serve].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_STORE", value_name = "URL")]
    store: Option<String>,

    /// The most tasks one owner (credential, session, local user) keeps at once [default: 1000].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_MAX_TASKS_PER_OWNER", value_name = "N")]
    max_tasks_per_owner: Option<usize>,

    /// Over stdio, who owns the tasks: the local user (a restarted wrapper sees them) or the process
    /// [default: user].
    #[arg(long, global = true, env = "MCP_ASYNCIFY_STDIO_OWNER", value_enum, value_name = "WHO")]
    stdio_owner: Option<mcp_asyncify::config::StdioOwner>,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Proxy + Notion simulator + a scripted client: a slow call becoming a task, its polls, its metrics.
    Demo(mcp_asyncify::demo::DemoArgs),

    /// The test fixture MCP server (slow, failing, progress and elicitation tools) on stdio.
    #[command(hide = true)]
    TestServer(mcp_asyncify::sim::fixture::FixtureArgs),

    /// Streamable HTTP sidecar: serve MCP at http://ADDR/mcp in front of a stdio server (one per session).
    Serve(mcp_asyncify::proxy::sidecar::ServeArgs),

    /// Inspect or cancel the tasks of a store (owners shown as hashes only).
    Tasks(mcp_asyncify::tasks::admin::TasksArgs),

    /// A simulator of Notion's hosted MCP server (async tasks, statuses, 3 requests/s limit) on stdio.
    NotionSim(mcp_asyncify::sim::notion::NotionSimArgs),

    /// Sign in to a hosted MCP server now (OAuth in the browser) and keep the tokens for later runs.
    Login(AuthArgs),

    /// Forget the sign-in to a hosted MCP server (revoking its tokens where the server allows).
    Logout(AuthArgs),
}

/// The server of `login` and `logout`.
#[derive(clap::Args, Debug)]
struct AuthArgs {
    /// The MCP server URL, as given to --upstream-url (default: --upstream-url).
    #[arg(value_name = "URL")]
    url: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let overrides = Overrides {
        log_level: cli
            .common
            .log_level
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty())),
        log_format: cli.common.log_format,
        max_message_bytes: cli.common.max_message_bytes,
        shutdown_grace_ms: cli.common.shutdown_grace_ms,
        upstream_protocol: cli.common.upstream_protocol,
        sync_deadline_ms: cli.common.sync_deadline_ms,
        task_tools: cli.common.task_tools.clone(),
        task_after_ms: cli.common.task_after_ms,
        task_required: cli.common.task_required.clone(),
        no_tasks: cli.common.no_tasks,
        store: cli.common.store.clone(),
        max_tasks_per_owner: cli.common.max_tasks_per_owner,
        stdio_owner: cli.common.stdio_owner,
        notion_budget: cli.common.notion_budget,
        metrics_listen: cli.common.metrics_listen.clone(),
        profile: cli.common.profile.clone(),
        upstream_auth: cli.common.upstream_auth,
        sign_in: cli.common.sign_in,
    };
    let mut overrides = overrides;
    if matches!(cli.mode, Some(Mode::Demo(_) | Mode::TestServer(_) | Mode::Tasks(_)))
        && cli.common.log_level.is_none()
    {
        // The demo's own output tells the story; logs only for trouble unless asked.
        overrides.log_level = Some("warn".into());
    }
    let config = match Config::load(cli.common.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => fail(&e.to_string(), 2),
    };
    mcp_asyncify::logging::init(&config.log);

    // The wrapper runs on one thread: a message then crosses the proxy without a single thread
    // hand-off (the upstream and the client have the other cores). The sidecar runs on
    // `--worker-threads` (one by default, for the same reason); the other modes use every core.
    let mut builder = match &cli.mode {
        None => tokio::runtime::Builder::new_current_thread(),
        Some(Mode::Serve(args)) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.worker_threads.into());
            b
        }
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    let code = runtime.block_on(async move {
        match cli.mode {
            Some(Mode::TestServer(args)) => match mcp_asyncify::sim::fixture::run(args).await {
                Ok(()) => 0,
                Err(e) => fail(&format!("{e:#}"), 1),
            },
            Some(Mode::Demo(args)) => {
                // The demo's summary shows the exported metrics, so keep the Prometheus text ready.
                let demo = async { mcp_asyncify::demo::run(args).await.map(|()| 0).map_err(|e| e.context("demo failed")) };
                with_telemetry(&config, true, demo).await
            }
            Some(Mode::Tasks(args)) => match mcp_asyncify::tasks::admin::run(args, &config.tasks.store).await {
                Ok(code) => code,
                Err(e) => fail(&format!("{e:#}"), 1),
            },
            Some(Mode::NotionSim(args)) => match mcp_asyncify::sim::notion::run(args).await {
                Ok(()) => 0,
                Err(e) => fail(&format!("{e:#}"), 1),
            },
            Some(Mode::Login(args)) => login(&config, args.url.or(cli.common.upstream_url)).await,
            Some(Mode::Logout(args)) => logout(&config, args.url.or(cli.common.upstream_url)).await,
            Some(Mode::Serve(mut args)) => {
                if let Some(url) = &cli.common.upstream_url {
                    match upstream_options(&config, url, &cli.common.headers, false) {
                        Ok(o) => args.upstream = Some(o),
                        Err(e) => fail(&format!("{e:#}"), 2),
                    }
                    args.pass_client_authorization =
                        config.upstream_auth.mode == mcp_asyncify::config::UpstreamAuthMode::Passthrough;
                }
                with_telemetry(&config, true, mcp_asyncify::proxy::sidecar::run(&config, args)).await
            }
            None if !cli.command.is_empty() && cli.common.upstream_url.is_some() => {
                fail("give either --upstream-url or a command after `--`, not both", 2)
            }
            None if cli.common.upstream_url.is_some() => {
                let url = cli.common.upstream_url.as_deref().unwrap_or_default();
                let options = match upstream_options(&config, url, &cli.common.headers, true) {
                    Ok(o) => o,
                    Err(e) => fail(&format!("{e:#}"), 2),
                };
                with_telemetry(&config, false, mcp_asyncify::proxy::wrapper::run_http(&config, options)).await
            }
            None if cli.command.is_empty() => fail(
                "no upstream server given: put its command after `--` (e.g. `mcp-asyncify -- npx -y @modelcontextprotocol/server-everything`) or give --upstream-url URL (see --help)",
                2,
            ),
            None => with_telemetry(&config, false, mcp_asyncify::proxy::wrapper::run(&config, &cli.command)).await,
        }
    });
    // Exit at once: the runtime would otherwise wait on the blocking read of stdin.
    std::process::exit(code);
}

/// The `--upstream-url` options, with the OAuth sign-in attached when it is on.
fn upstream_options(
    config: &Config,
    url: &str,
    headers: &[String],
    interactive_by_default: bool,
) -> anyhow::Result<mcp_asyncify::transport::http_upstream::HttpUpstreamOptions> {
    let mut options = mcp_asyncify::proxy::wrapper::http_options(url, headers)?;
    let has_authorization = options.headers.iter().any(|(name, _)| name == http::header::AUTHORIZATION);
    options.oauth = mcp_asyncify::auth::for_upstream(
        &config.upstream_auth,
        &options.url.to_string(),
        has_authorization,
        interactive_by_default,
    )?;
    Ok(options)
}

/// The OAuth options of `login`/`logout` for `url` (checked like --upstream-url).
fn auth_options(config: &Config, url: Option<String>, verb: &str) -> mcp_asyncify::auth::OAuthOptions {
    let Some(url) = url else {
        fail(
            &format!(
                "`mcp-asyncify {verb}` needs the server's URL: `mcp-asyncify {verb} https://mcp.notion.com/mcp`"
            ),
            2,
        )
    };
    let options = match mcp_asyncify::proxy::wrapper::http_options(&url, &[]) {
        Ok(o) => o,
        Err(e) => fail(&format!("{e:#}"), 2),
    };
    match mcp_asyncify::auth::OAuthOptions::from_config(&config.upstream_auth, &options.url.to_string(), true)
    {
        Ok(o) => o,
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// `mcp-asyncify login URL`.
async fn login(config: &Config, url: Option<String>) -> i32 {
    let options = auth_options(config, url, "login");
    let server = options.server_url.clone();
    match mcp_asyncify::auth::login(options).await {
        Ok(Some(_)) => 0,
        Ok(None) => {
            eprintln!("mcp-asyncify: {server} lets requests through without a sign-in; nothing to do");
            0
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// `mcp-asyncify logout URL`.
async fn logout(config: &Config, url: Option<String>) -> i32 {
    let options = auth_options(config, url, "logout");
    match mcp_asyncify::auth::logout(&options).await {
        Ok(true) => {
            eprintln!(
                "mcp-asyncify: signed out of {} (removed {})",
                options.server_url,
                options.store.path_for(&options.server_url).display()
            );
            0
        }
        Ok(false) => {
            eprintln!(
                "mcp-asyncify: no sign-in to {} is stored (in {})",
                options.server_url,
                options.store.dir().display()
            );
            0
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// Runs `work` with telemetry installed (the Prometheus text kept for `/metrics` when `prometheus`),
/// flushing it at the end; returns the exit code.
async fn with_telemetry(
    config: &Config,
    prometheus: bool,
    work: impl std::future::Future<Output = anyhow::Result<i32>>,
) -> i32 {
    let options = TelemetryOptions { metrics_listen: config.telemetry.metrics_addr(), prometheus };
    let telemetry = match Telemetry::init(&options).await {
        Ok(t) => t,
        Err(e) => fail(&format!("{e:#}"), 2),
    };
    let code = match work.await {
        Ok(code) => code,
        Err(e) => fail(&format!("{e:#}"), 1),
    };
    telemetry.shutdown().await;
    code
}

fn fail(message: &str, code: i32) -> ! {
    eprintln!("mcp-asyncify: error: {message}");
    std::process::exit(code)
}
