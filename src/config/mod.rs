//! Configuration: defaults, then a TOML file, then environment variables, then command-line flags.
//!
//! Every key lives in `config/default.toml` with its default and a comment; [`Config::default`] and
//! that file must agree (a test checks it). Errors name the key, the bad value and what is allowed,
//! so a person can fix them without reading the source.
//!
//! This file holds the shape of the configuration (its tables, their defaults and the helpers that
//! read them); `load` reads and merges the sources, `validate` judges the result, and `urls` parses
//! and redacts the URLs a configuration names.

mod load;
mod urls;
mod validate;

pub use load::{NOTION_PROFILE, Overrides};
pub use urls::{StoreUrl, redact, secure_enough};

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The full configuration of one mcp-asyncify process.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The data path: framing limits and shutdown.
    pub proxy: ProxyConfig,
    /// Logging (always to stderr).
    pub log: LogConfig,
    /// MCP Tasks: which tools, lifetimes, limits, help for clients that do not speak tasks.
    pub tasks: TasksConfig,
    /// Notion's async protocol (`allow_async` → `async_task` → `notion-get-async-task`).
    pub notion: NotionConfig,
    /// OpenTelemetry export (OTLP itself is configured by the standard `OTEL_*` variables).
    pub telemetry: TelemetryConfig,
    /// How the proxy authenticates to an `--upstream-url` (OAuth sign-in, the client's own token, none).
    pub upstream_auth: UpstreamAuthConfig,
}

/// Who provides the `Authorization` sent to an `--upstream-url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuthMode {
    /// The proxy signs in with OAuth when the upstream answers 401, and keeps the tokens.
    #[default]
    Oauth,
    /// The sidecar's client's own `Authorization` goes to the upstream unchanged (its 401 and
    /// challenge come back to the client). In the stdio wrapper: no header, as `none`.
    Passthrough,
    /// No `Authorization` but the configured `--header`s.
    None,
}

/// Whether a sign-in may open a browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignInMode {
    /// The stdio wrapper (and `login`) open the browser; the sidecar does not (it uses the sign-in
    /// stored by `mcp-asyncify login`, and says so when there is none).
    #[default]
    Auto,
    /// Always open the browser when a sign-in is needed.
    Browser,
    /// Never: a needed sign-in is an error that says to run `mcp-asyncify login URL`.
    Never,
}

/// `[upstream_auth]`: signing in to a hosted upstream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamAuthConfig {
    /// `oauth`, `passthrough` or `none`. A configured `Authorization` header always wins.
    pub mode: UpstreamAuthMode,
    /// `auto`, `browser` or `never`.
    pub sign_in: SignInMode,
    /// How long the user has to finish signing in, in ms.
    pub sign_in_timeout_ms: u64,
    /// Where sign-ins are kept (empty: the user's config directory; `MCP_ASYNCIFY_AUTH_DIR` wins).
    pub store_dir: String,
    /// A client id registered with the authorization server beforehand (empty: register dynamically).
    pub client_id: String,
    /// An https URL of a client ID metadata document, used where the server supports them.
    pub client_metadata_url: String,
    /// The loopback port of the redirect (0: any free port).
    pub redirect_port: u16,
    /// Scopes to ask for, space-separated (empty: those the server names).
    pub scope: String,
}

impl Default for UpstreamAuthConfig {
    fn default() -> Self {
        UpstreamAuthConfig {
            mode: UpstreamAuthMode::Oauth,
            sign_in: SignInMode::Auto,
            sign_in_timeout_ms: 300_000,
            store_dir: String::new(),
            client_id: String::new(),
            client_metadata_url: String::new(),
            redirect_port: 0,
            scope: String::new(),
        }
    }
}

/// `[telemetry]`: where metrics are served.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Serve Prometheus text at `http://ADDR/metrics` (and `/healthz`); empty: off.
    pub metrics_listen: String,
}

impl TelemetryConfig {
    /// The parsed address, if any.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_listen.trim().parse().ok()
    }
}

/// Whether the Notion adapter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotionMode {
    /// On when the upstream lists the poll tool.
    Auto,
    /// Always on (the `notion` profile).
    On,
    /// Never: Notion's tools are plain tools.
    Off,
}

/// `[notion]`: Notion's async tasks as MCP tasks, polled within Notion's rate limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotionConfig {
    /// `auto`, `on` or `off`.
    pub mode: NotionMode,
    /// Tools that accept `allow_async: true`.
    pub async_tools: Vec<String>,
    /// The polling tool.
    pub poll_tool: String,
    /// Requests per second the proxy allows itself toward one Notion upstream (polls, task starts, and
    /// the client's own calls, which are counted but never delayed).
    pub budget_per_second: u32,
    /// First poll delay when Notion suggests none, in ms.
    pub default_backoff_ms: u64,
    /// Growth of the delay between polls of one task.
    pub backoff_factor: f64,
    /// The longest delay between polls of one task, in ms.
    pub max_backoff_ms: u64,
    /// How long to hold back after a rate_limited answer that names no retry-after, in ms.
    pub default_retry_after_ms: u64,
    /// How long one poll may wait for its answer, in ms.
    pub poll_timeout_ms: u64,
    /// Polls in a row that fail (an answer that cannot be read, a JSON-RPC error, a timeout, a Notion
    /// error) before the task fails.
    pub max_poll_failures: u32,
    /// Remove `allow_async` from the input schema of the async tools in `tools/list` (the proxy does
    /// the async work; the `notion` profile sets it).
    pub hide_allow_async: bool,
}

impl Default for NotionConfig {
    fn default() -> Self {
        NotionConfig {
            mode: NotionMode::Auto,
            async_tools: vec!["notion-create-pages".into(), "notion-duplicate-page".into()],
            poll_tool: "notion-get-async-task".into(),
            budget_per_second: 3,
            default_backoff_ms: 1000,
            backoff_factor: 1.5,
            max_backoff_ms: 10_000,
            default_retry_after_ms: 1000,
            poll_timeout_ms: 30_000,
            max_poll_failures: 3,
            hide_allow_async: false,
        }
    }
}

/// `[tasks]`: turning slow tool calls into MCP Tasks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Whether the proxy offers tasks at all. Off: a pure passthrough.
    pub enabled: bool,
    /// Tools to taskify, by exact name or glob (`*` any run, `?` one character).
    pub tools: Vec<String>,
    /// Tools never to taskify (wins over `tools`).
    pub exclude: Vec<String>,
    /// Retention of a task when the client asks for none (`task: {}`), in ms from creation.
    pub default_ttl_ms: u64,
    /// The longest retention granted, whatever the client asks.
    pub max_ttl_ms: u64,
    /// The `pollInterval` suggested to clients, in ms.
    pub poll_interval_ms: u64,
    /// The most tasks kept at once (live or retained); past it, new tasks are refused with a clear error.
    pub max_live_tasks: usize,
    /// The most tasks one owner (a credential, a session, the local user) keeps at once; past it, that
    /// owner's new tasks are refused with a clear error while others' go on.
    pub max_tasks_per_owner: usize,
    /// Tasks per `tasks/list` page.
    pub list_page_size: usize,
    /// Where tasks live: `memory`, `file:PATH` or `redis://…` (`rediss://` for TLS). Empty: the default
    /// of the mode (see the README's "Task stores").
    pub store: String,
    /// Over stdio, who owns the tasks: `user` (the local user: a restarted wrapper serves the tasks of
    /// the previous one) or `process` (each wrapper process sees only its own).
    pub stdio_owner: StdioOwner,
    /// For plain (non-task) calls with a `progressToken`: start sending progress keep-alives after this
    /// many ms (0: never).
    pub keepalive_after_ms: u64,
    /// Interval between keep-alives.
    pub keepalive_interval_ms: u64,
    /// For plain calls still running after this many ms, answer with a normal tool result saying the work
    /// goes on as a task, and offer tools to fetch it later (0: never).
    pub sync_deadline_ms: u64,
    /// 2026-07-28 clients that declare the tasks extension: a call of a task tool still running after
    /// this many ms becomes a task (`resultType: "task"`); one that ends sooner answers inline. 0: a
    /// task at once.
    pub task_after_ms: u64,
    /// Tools that must run as tasks, by name or glob: advertised `taskSupport: "required"` to 2025-11-25
    /// clients (a plain call gets -32601), and refused with -32021 to 2026-07-28 clients that do not
    /// declare the tasks extension.
    pub required: Vec<String>,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            enabled: true,
            tools: vec!["*".into()],
            exclude: Vec::new(),
            default_ttl_ms: 3_600_000,
            max_ttl_ms: 86_400_000,
            poll_interval_ms: 1000,
            max_live_tasks: 10_000,
            max_tasks_per_owner: 1000,
            list_page_size: 50,
            store: String::new(),
            stdio_owner: StdioOwner::User,
            keepalive_after_ms: 5000,
            keepalive_interval_ms: 10_000,
            sync_deadline_ms: 0,
            task_after_ms: 1000,
            required: Vec::new(),
        }
    }
}

impl TasksConfig {
    /// Whether calls of `tool` may become tasks run by the proxy.
    pub fn taskifies(&self, tool: &str) -> bool {
        self.enabled
            && ((self.tools.iter().any(|p| glob_match(p, tool))
                && !self.exclude.iter().any(|p| glob_match(p, tool)))
                || self.requires_task(tool))
    }

    /// Whether calls of `tool` must run as tasks (`--task-required`).
    pub fn requires_task(&self, tool: &str) -> bool {
        self.enabled && self.required.iter().any(|p| glob_match(p, tool))
    }
}

/// Who owns the tasks created over stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StdioOwner {
    /// The local user: every wrapper of that user (and a restarted one) sees the tasks.
    User,
    /// The wrapper process: tasks are seen only by the client that created them.
    Process,
}

/// Matches `*` (any run, possibly empty) and `?` (exactly one character); everything else literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    // The usual patterns answer at once (this runs for every tool call).
    if pattern == "*" {
        return true;
    }
    if !pattern.contains(['*', '?']) {
        return pattern == name;
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if let Some((bp, bn)) = backtrack {
            pi = bp + 1;
            ni = bn + 1;
            backtrack = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// `[proxy]`: the data path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The largest message accepted from either side, in bytes. Longer lines are refused (client) or
    /// dropped with an error log (upstream) without being buffered.
    pub max_message_bytes: usize,
    /// After the client goes away (or on SIGINT/SIGTERM), how long the upstream gets to exit by itself
    /// once its stdin is closed, before it is sent SIGTERM (and SIGKILL after the same time again).
    pub shutdown_grace_ms: u64,
    /// Which generation the upstream speaks: 2025-11-25 (`legacy`), 2026-07-28 (`modern`), or found
    /// out with `server/discover` when the proxy opens the conversation (`auto`).
    pub upstream_protocol: UpstreamProtocol,
}

/// How the proxy speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// 2025-11-25: one `initialize`d session (the client's, or the proxy's own for a 2026-07-28
    /// client).
    #[default]
    Legacy,
    /// 2026-07-28: stateless requests with per-request `_meta`; never `initialize`.
    Modern,
    /// `server/discover` first when the proxy opens the conversation; `initialize` on an error or no
    /// answer. (Some 2025-11-25 stdio servers exit when the first message is not `initialize`.)
    Auto,
}

/// `[log]`: logging to stderr.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a full `RUST_LOG`-style filter.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_message_bytes: 16 * 1024 * 1024,
            shutdown_grace_ms: 3000,
            upstream_protocol: UpstreamProtocol::Legacy,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// A configuration a person has to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid value for `{key}`: {value} ({allowed})")]
    Invalid {
        /// The config key, e.g. `proxy.max_message_bytes`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
}

impl Config {
    /// The shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.proxy.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_documents_the_defaults() {
        let text = include_str!("../../config/default.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn globs_pick_tools() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("notion-*", "notion-create-pages"));
        assert!(!glob_match("notion-*", "search"));
        assert!(glob_match("s?ow", "slow"));
        assert!(glob_match("*-pages", "notion-create-pages"));
        assert!(!glob_match("slow", "slower"));
        let t =
            TasksConfig { tools: vec!["*".into()], exclude: vec!["echo".into()], ..TasksConfig::default() };
        assert!(t.taskifies("slow") && !t.taskifies("echo"));
    }
}
