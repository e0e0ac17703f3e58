//! MCP Tasks (2025-11-25) for upstreams that have none.
//!
//! [`model`] is the wire shape and the status machine; [`store`] keeps records (memory, a redb file or
//! Redis, behind one trait); [`owner`] binds tasks to keyed hashes of their auth context; [`engine`] owns the lifecycle: creation with a capped ttl, transitions,
//! blocking waits for `tasks/result`, cancellation, paging, expiry. The proxy's interceptor
//! (`proxy::intercept`) turns client messages into engine calls and runs the work upstream.

pub mod admin;
pub mod engine;
pub mod model;
pub mod owner;
pub mod store;
