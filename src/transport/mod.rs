//! Transports: how messages get in and out.
//!
//! [`lines`] frames newline-delimited JSON-RPC with a size cap; [`stdio`] runs the upstream as a child
//! process; [`http_upstream`] is the Streamable HTTP client, which reads SSE with [`sse`]. The sidecar
//! (the Streamable HTTP server) lives in `proxy::sidecar`.

pub mod http_upstream;
pub mod lines;
pub mod sse;
pub mod stdio;
