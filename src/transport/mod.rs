//! Transports: how messages get in and out.
//!
//! [`lines`] frames newline-delimited JSON-RPC with a size cap; [`stdio`] runs the upstream as a child
//! process; [`http_upstream`] is the Streamable HTTP client toward a hosted upstream (`--upstream-url`),
//! presenting it to the session as lines like a child process, which reads SSE with [`sse`]. The
//! Streamable HTTP server side is the sidecar (`proxy::sidecar`).

pub mod http_upstream;
pub mod lines;
pub mod sse;
pub mod stdio;
