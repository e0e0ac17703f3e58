//! Transports: how messages get in and out.
//!
//! [`lines`] frames newline-delimited JSON-RPC with a size cap; [`stdio`] runs the upstream as a child
//! process. The Streamable HTTP client and server come next to them.

pub mod http_upstream;
pub mod lines;
pub mod stdio;
