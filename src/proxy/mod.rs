//! The proxy proper: sessions, in-flight tables, and the stdio wrapper.
//!
//! [`session::Router`] moves messages between a client and an upstream without ever waiting on a
//! call; [`pending`] remembers what is in flight on each side; [`upstream::Upstream`] is the API the
//! tasks engine uses to send requests of its own; [`wrapper`] runs the drop-in stdio mode; [`era`]
//! tells a 2026-07-28 (stateless) request from a 2025-11-25 (session) one; [`sidecar`] serves both
//! over Streamable HTTP.

pub mod era;
pub mod intercept;
pub mod pending;
pub mod session;
pub mod sidecar;
pub mod upstream;
pub mod wrapper;
