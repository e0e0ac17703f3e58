//! The proxy proper: sessions, in-flight tables, and the stdio wrapper.
//!
//! [`session::Router`] moves messages between a client and an upstream without ever waiting on a
//! call; [`pending`] remembers the client's requests in flight (the proxy's own, and the API to send
//! them, are [`crate::upstream`]); [`intercept`] is where the proxy acts on what passes (tasks, both
//! protocol generations, Notion); [`wrapper`] runs the drop-in stdio mode; [`era`]
//! tells a 2026-07-28 (stateless) request from a 2025-11-25 (session) one; [`shared`] is what the
//! sessions of one process share (the task engine and store, the owner key, Notion's budget);
//! [`sidecar`] serves both over Streamable HTTP.

pub mod era;
pub mod intercept;
pub mod pending;
pub mod session;
pub mod shared;
pub mod sidecar;
pub mod wrapper;
