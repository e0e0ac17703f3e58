//! MCP servers we run ourselves, built with rmcp.
//!
//! [`fixture`] is the test upstream (slow, failing, progress-sending, elicitation-asking and crashing
//! tools) used by the end-to-end tests and the benches; it is reachable as the hidden
//! `mcp-asyncify test-server` command so tests need only the one binary.

pub mod fixture;

/// The Notion simulator: Notion's hosted tools with their async protocol and rate limit.
pub mod notion;
