//! Configuration: defaults, then a TOML file, then environment variables, then command-line flags.
//!
//! Every key lives in `config/default.toml` with its default and a comment; [`Config::default`] and
//! that file must agree (a test checks it). Errors name the key, the bad value and what is allowed,
//! so a person can fix them without reading the source.

use serde::Deserialize;
use std::path::{Path, PathBuf};
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

/// The built-in Notion profile.
pub const NOTION_PROFILE: &str = include_str!("../config/notion.toml");

/// Values given on the command line or in the environment; each one, when present, wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--log-level` / `MCP_ASYNCIFY_LOG_LEVEL` (falls back to `RUST_LOG`).
    pub log_level: Option<String>,
    /// `--log-format` / `MCP_ASYNCIFY_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--max-message-bytes` / `MCP_ASYNCIFY_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: Option<usize>,
    /// `--shutdown-grace-ms` / `MCP_ASYNCIFY_SHUTDOWN_GRACE_MS`.
    pub shutdown_grace_ms: Option<u64>,
    /// `--upstream-protocol` / `MCP_ASYNCIFY_UPSTREAM_PROTOCOL`.
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// `--sync-deadline-ms` / `MCP_ASYNCIFY_SYNC_DEADLINE_MS`.
    pub sync_deadline_ms: Option<u64>,
    /// `--task-tools` / `MCP_ASYNCIFY_TASK_TOOLS` (comma-separated).
    pub task_tools: Option<Vec<String>>,
    /// `--task-after-ms` / `MCP_ASYNCIFY_TASK_AFTER_MS`.
    pub task_after_ms: Option<u64>,
    /// `--task-required` / `MCP_ASYNCIFY_TASK_REQUIRED` (comma-separated).
    pub task_required: Option<Vec<String>>,
    /// `--no-tasks`.
    pub no_tasks: bool,
    /// `--store` / `MCP_ASYNCIFY_STORE`.
    pub store: Option<String>,
    /// `--max-tasks-per-owner` / `MCP_ASYNCIFY_MAX_TASKS_PER_OWNER`.
    pub max_tasks_per_owner: Option<usize>,
    /// `--stdio-owner` / `MCP_ASYNCIFY_STDIO_OWNER`.
    pub stdio_owner: Option<StdioOwner>,
    /// `--notion-budget` / `MCP_ASYNCIFY_NOTION_BUDGET`.
    pub notion_budget: Option<u32>,
    /// `--metrics-listen` / `MCP_ASYNCIFY_METRICS_LISTEN`.
    pub metrics_listen: Option<String>,
    /// `--profile` / `MCP_ASYNCIFY_PROFILE`: a built-in base configuration (used when no file is given).
    pub profile: Option<String>,
    /// `--upstream-auth` / `MCP_ASYNCIFY_UPSTREAM_AUTH`.
    pub upstream_auth: Option<UpstreamAuthMode>,
    /// `--sign-in` / `MCP_ASYNCIFY_SIGN_IN`.
    pub sign_in: Option<SignInMode>,
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
    /// Reads the optional file, applies the overrides and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match (file, overrides.profile.as_deref()) {
            (Some(path), None) => Self::from_file(path)?,
            (None, Some(profile)) => Self::profile(profile)?,
            (Some(path), Some(profile)) => Self::profile_and_file(profile, path)?,
            (None, None) => Config::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// A built-in profile by name (`notion`).
    pub fn profile(name: &str) -> Result<Config, ConfigError> {
        match name {
            "notion" => Self::from_toml(NOTION_PROFILE).map_err(|message| ConfigError::Parse {
                path: "config/notion.toml (built in)".into(),
                message,
            }),
            other => Err(ConfigError::Invalid {
                key: "profile",
                value: format!("{other:?}"),
                allowed: "allowed: notion".into(),
            }),
        }
    }

    /// A profile with a file's keys on top (tables merge key by key).
    fn profile_and_file(profile: &str, path: &Path) -> Result<Config, ConfigError> {
        let base = match profile {
            "notion" => NOTION_PROFILE,
            _ => return Self::profile(profile),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let parse_err = |message: String| ConfigError::Parse { path: path.into(), message };
        let mut merged: toml::Table = toml::from_str(base).map_err(|e| parse_err(e.to_string()))?;
        let top: toml::Table = toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        for (key, value) in top {
            match (merged.get_mut(&key), value) {
                (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
                (_, value) => {
                    merged.insert(key, value);
                }
            }
        }
        merged.try_into().map_err(|e: toml::de::Error| parse_err(e.to_string().trim_end().to_string()))
    }

    /// Parses a TOML file (no overrides, no validation).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })
    }

    /// Parses TOML text (no overrides, no validation).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = o.max_message_bytes {
            self.proxy.max_message_bytes = v;
        }
        if let Some(v) = o.shutdown_grace_ms {
            self.proxy.shutdown_grace_ms = v;
        }
        if let Some(v) = o.upstream_protocol {
            self.proxy.upstream_protocol = v;
        }
        if let Some(v) = o.sync_deadline_ms {
            self.tasks.sync_deadline_ms = v;
        }
        if let Some(v) = &o.task_tools {
            self.tasks.tools = v.clone();
        }
        if let Some(v) = o.task_after_ms {
            self.tasks.task_after_ms = v;
        }
        if let Some(v) = &o.task_required {
            self.tasks.required = v.clone();
        }
        if o.no_tasks {
            self.tasks.enabled = false;
        }
        if let Some(v) = &o.store {
            self.tasks.store = v.clone();
        }
        if let Some(v) = o.max_tasks_per_owner {
            self.tasks.max_tasks_per_owner = v;
        }
        if let Some(v) = o.stdio_owner {
            self.tasks.stdio_owner = v;
        }
        if let Some(v) = o.notion_budget {
            self.notion.budget_per_second = v;
        }
        if let Some(v) = &o.metrics_listen {
            self.telemetry.metrics_listen = v.clone();
        }
        if let Some(v) = o.upstream_auth {
            self.upstream_auth.mode = v;
        }
        if let Some(v) = o.sign_in {
            self.upstream_auth.sign_in = v;
        }
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const MIN_MESSAGE: usize = 1024;
        const MAX_MESSAGE: usize = 1024 * 1024 * 1024;
        if !(MIN_MESSAGE..=MAX_MESSAGE).contains(&self.proxy.max_message_bytes) {
            return Err(ConfigError::Invalid {
                key: "proxy.max_message_bytes",
                value: self.proxy.max_message_bytes.to_string(),
                allowed: format!("allowed: {MIN_MESSAGE} to {MAX_MESSAGE} bytes"),
            });
        }
        if self.proxy.shutdown_grace_ms > 600_000 {
            return Err(ConfigError::Invalid {
                key: "proxy.shutdown_grace_ms",
                value: self.proxy.shutdown_grace_ms.to_string(),
                allowed: "allowed: 0 to 600000 milliseconds".into(),
            });
        }
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let level = self.log.level.trim();
        // A bare word is a level; anything with `=` or `,` is a full filter for EnvFilter to judge.
        let bare_word_ok =
            level.contains(['=', ',']) || LEVELS.contains(&level.to_ascii_lowercase().as_str());
        let parsed = if bare_word_ok {
            tracing_subscriber::EnvFilter::builder().parse(level).map(|_| ()).map_err(|e| e.to_string())
        } else {
            Err("not a level".to_string())
        };
        let t = &self.tasks;
        let ranges: [(&'static str, u64, u64, u64); 10] = [
            ("tasks.default_ttl_ms", t.default_ttl_ms, 1000, t.max_ttl_ms),
            ("tasks.max_ttl_ms", t.max_ttl_ms, 1000, 30 * 86_400_000),
            ("tasks.poll_interval_ms", t.poll_interval_ms, 10, 600_000),
            ("tasks.max_live_tasks", t.max_live_tasks as u64, 1, 10_000_000),
            ("tasks.max_tasks_per_owner", t.max_tasks_per_owner as u64, 1, 10_000_000),
            ("tasks.list_page_size", t.list_page_size as u64, 1, 10_000),
            ("tasks.keepalive_after_ms", t.keepalive_after_ms, 0, 3_600_000),
            ("tasks.keepalive_interval_ms", t.keepalive_interval_ms, 100, 3_600_000),
            ("tasks.sync_deadline_ms", t.sync_deadline_ms, 0, 3_600_000),
            ("tasks.task_after_ms", t.task_after_ms, 0, 3_600_000),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                let allowed = if key == "tasks.default_ttl_ms" {
                    format!("allowed: {min} to tasks.max_ttl_ms = {max}")
                } else {
                    format!("allowed: {min} to {max}")
                };
                return Err(ConfigError::Invalid { key, value: value.to_string(), allowed });
            }
        }
        if !t.store.trim().is_empty() {
            StoreUrl::parse(&t.store).map_err(|allowed| ConfigError::Invalid {
                key: "tasks.store",
                value: format!("{:?}", redact(&t.store)),
                allowed,
            })?;
        }
        if t.sync_deadline_ms != 0 && t.sync_deadline_ms < 100 {
            return Err(ConfigError::Invalid {
                key: "tasks.sync_deadline_ms",
                value: t.sync_deadline_ms.to_string(),
                allowed: "allowed: 0 (off) or 100 to 3600000".into(),
            });
        }
        if let Some(bad) = t.tools.iter().chain(&t.exclude).find(|p| p.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                key: "tasks.tools",
                value: format!("{bad:?}"),
                allowed: "allowed: tool names or globs such as \"notion-*\"; an empty name matches nothing"
                    .into(),
            });
        }
        let n = &self.notion;
        if !(1..=1000).contains(&n.budget_per_second) {
            return Err(ConfigError::Invalid {
                key: "notion.budget_per_second",
                value: n.budget_per_second.to_string(),
                allowed: "allowed: 1 to 1000 requests per second (Notion allows 3)".into(),
            });
        }
        if !(1.0..=10.0).contains(&n.backoff_factor) {
            return Err(ConfigError::Invalid {
                key: "notion.backoff_factor",
                value: n.backoff_factor.to_string(),
                allowed: "allowed: 1.0 to 10.0".into(),
            });
        }
        for (key, value) in [
            ("notion.default_backoff_ms", n.default_backoff_ms),
            ("notion.max_backoff_ms", n.max_backoff_ms),
            ("notion.default_retry_after_ms", n.default_retry_after_ms),
            ("notion.poll_timeout_ms", n.poll_timeout_ms),
        ] {
            if !(10..=600_000).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    value: value.to_string(),
                    allowed: "allowed: 10 to 600000".into(),
                });
            }
        }
        if !(1..=100).contains(&n.max_poll_failures) {
            return Err(ConfigError::Invalid {
                key: "notion.max_poll_failures",
                value: n.max_poll_failures.to_string(),
                allowed: "allowed: 1 to 100 polls in a row".into(),
            });
        }
        if n.poll_tool.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "notion.poll_tool",
                value: "\"\"".into(),
                allowed: "allowed: a tool name such as \"notion-get-async-task\"".into(),
            });
        }
        if let Err(e) = parsed {
            return Err(ConfigError::Invalid {
                key: "log.level",
                value: format!("{:?}", self.log.level),
                allowed: format!(
                    "allowed: error, warn, info, debug, trace, or a RUST_LOG filter such as `mcp_asyncify=debug` ({e})"
                ),
            });
        }
        let a = &self.upstream_auth;
        if !(1000..=3_600_000).contains(&a.sign_in_timeout_ms) {
            return Err(ConfigError::Invalid {
                key: "upstream_auth.sign_in_timeout_ms",
                value: a.sign_in_timeout_ms.to_string(),
                allowed: "allowed: 1000 to 3600000".into(),
            });
        }
        let metadata_url = a.client_metadata_url.trim();
        if !metadata_url.is_empty() && !secure_enough(metadata_url) {
            return Err(ConfigError::Invalid {
                key: "upstream_auth.client_metadata_url",
                value: format!("{metadata_url:?}"),
                allowed:
                    "allowed: an https URL of a client ID metadata document (http only on loopback), or empty"
                        .into(),
            });
        }
        let listen = self.telemetry.metrics_listen.trim();
        if !listen.is_empty() && self.telemetry.metrics_addr().is_none() {
            return Err(ConfigError::Invalid {
                key: "telemetry.metrics_listen",
                value: listen.to_string(),
                allowed:
                    "allowed: an IP address and port such as 127.0.0.1:9464 or [::1]:9464, or empty for off"
                        .into(),
            });
        }
        Ok(())
    }

    /// The shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.proxy.shutdown_grace_ms)
    }
}

/// Which store to open, parsed from `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`.
    Memory,
    /// `file:PATH` (a redb file).
    File(std::path::PathBuf),
    /// `redis://…` or `rediss://…`.
    Redis(String),
}

impl StoreUrl {
    /// Parses `memory`, `file:PATH` or `redis[s]://HOST[:PORT][/DB]`.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let text = text.trim();
        if text == "memory" {
            Ok(StoreUrl::Memory)
        } else if let Some(path) = text.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("store \"file:\" needs a path, e.g. file:/var/lib/mcp-asyncify/tasks.redb".into());
            }
            Ok(StoreUrl::File(path.into()))
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            ::redis::Client::open(text)
                .map_err(|e| format!("store {:?} is not a valid Redis URL: {e}", redact(text)))?;
            Ok(StoreUrl::Redis(text.into()))
        } else {
            Err(format!(
                "unknown store {:?}: use memory, file:PATH or redis://HOST:PORT[/DB] (rediss:// for TLS)",
                redact(text)
            ))
        }
    }

    /// The URL without any password, for logs.
    pub fn describe(&self) -> String {
        match self {
            StoreUrl::Memory => "memory".into(),
            StoreUrl::File(p) => format!("file:{}", p.display()),
            StoreUrl::Redis(u) => redact(u),
        }
    }
}

/// A URL with its password (if any) replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

/// Whether a URL is fit to fetch sign-in metadata or documents from: `https`, or `http` on loopback.
pub fn secure_enough(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => true,
        (Some("http"), Some(host)) => matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_documents_the_defaults() {
        let text = include_str!("../config/default.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn the_notion_profile_is_valid() {
        let c = Config::load(None, &Overrides { profile: Some("notion".into()), ..Overrides::default() })
            .unwrap();
        assert_eq!(c.notion.mode, NotionMode::On);
        assert!(
            Config::load(None, &Overrides { profile: Some("slack".into()), ..Overrides::default() }).is_err()
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[proxy]\nmax_mesage_bytes = 3\n").unwrap_err();
        assert!(err.contains("max_mesage_bytes"), "{err}");
        assert!(err.contains("max_message_bytes"), "{err}");
    }

    #[test]
    fn out_of_range_values_say_what_is_allowed() {
        let o = Overrides { max_message_bytes: Some(10), ..Overrides::default() };
        let err = Config::load(None, &o).unwrap_err().to_string();
        assert!(
            err.contains("proxy.max_message_bytes") && err.contains("10") && err.contains("1024"),
            "{err}"
        );
        let o = Overrides { log_level: Some("loud".into()), ..Overrides::default() };
        let err = Config::load(None, &o).unwrap_err().to_string();
        assert!(err.contains("log.level") && err.contains("loud"), "{err}");
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

    #[test]
    fn overrides_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("asyncify-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[proxy]\nshutdown_grace_ms = 10\nmax_message_bytes = 4096\n").unwrap();
        let o = Overrides { shutdown_grace_ms: Some(20), ..Overrides::default() };
        let c = Config::load(Some(&path), &o).unwrap();
        assert_eq!(c.proxy.shutdown_grace_ms, 20);
        assert_eq!(c.proxy.max_message_bytes, 4096);
    }
}
