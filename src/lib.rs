//! mcp-asyncify: a transparent MCP proxy that turns slow tool calls into MCP Tasks.
//!
//! Read this map first; each module owns one concept.
//!
//! * [`config`] — every option: defaults, the TOML file, environment variables and flags merged and
//!   validated, with errors that name the key, the bad value and what is allowed.
//! * [`jsonrpc`] — the light envelope the data path reads (`id`, `method`, raw payloads), ids of any
//!   JSON type kept as their original text, and the builders for the few messages the proxy writes.
//! * [`transport`] — framing (newline-delimited, size-capped) and the upstream child process.
//! * [`upstream`] — the proxy's own requests to the upstream ("ask the upstream" and await the
//!   answer), used by the proxy and the Notion adapter alike.
//! * [`proxy`] — the routing loop of a session, the client's in-flight requests, the interceptor (tasks,
//!   both protocol generations), the stdio wrapper's lifecycle (EOF, signals, upstream exit, no
//!   orphans) and the Streamable HTTP sidecar.
//! * [`auth`] — the OAuth client toward a hosted upstream (`--upstream-url`): discovery, registration,
//!   PKCE sign-in through the browser, the 0600 token store, refresh; `login` and `logout`.
//! * [`sim`] — MCP servers we run ourselves: the test fixture server used by the end-to-end tests and
//!   benches, and the Notion simulator.
//! * [`demo`] — `mcp-asyncify demo`: the proxy, the Notion simulator and a scripted client in one run.
//! * [`notion`] — Notion's async protocol (`allow_async` → `async_task` → polling) as standard tasks,
//!   within one shared request budget per upstream.
//! * [`tasks`] — the Tasks engine: model, store, lifecycle (creation, waits, cancel, paging, expiry).
//! * [`telemetry`] — OpenTelemetry metrics and traces of every request and every task's life, exported
//!   as Prometheus text (`--metrics-listen`) and OTLP (the standard `OTEL_*` variables).
//! * [`logging`] — logs to stderr, text or JSON; stdout is reserved for JSON-RPC.

pub mod auth;
pub mod config;
pub mod demo;
pub mod jsonrpc;
pub mod logging;
pub mod notion;
pub mod proxy;
pub mod sim;
pub mod tasks;
pub mod telemetry;
pub mod transport;
pub mod upstream;
