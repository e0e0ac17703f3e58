//! The Notion classifier (`notion::forms::{read_accepted, read_poll}`): whatever Notion answers, as
//! the whole tool result, as its `structuredContent`, or as the JSON text in its content (the three
//! ways it reaches us), is read as one answer without a panic; a rate-limit wait is one the adapter can
//! add to the clock, and a poll's status is always known when it says so.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_asyncify::notion::forms::{Accepted, Poll, read_accepted, read_poll};
use serde_json::Value;
use std::time::{Duration, Instant};

fn wait_fits(wait: Option<Duration>) {
    if let Some(wait) = wait {
        assert!(Instant::now().checked_add(wait).is_some(), "a wait of {wait:?} overflows the clock");
    }
}

fn check(result: &Value) {
    match read_accepted(result) {
        Accepted::RateLimited(wait) => wait_fits(wait),
        Accepted::Task(_) | Accepted::Final => {}
    }
    match read_poll(result) {
        Poll::RateLimited(wait) => wait_fits(wait),
        Poll::Status(task) => assert!(task.status.is_some(), "a poll answer is read by its status"),
        Poll::NotFound(_) | Poll::Error(_) | Poll::Unreadable => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        check(&value);
        check(&serde_json::json!({ "content": [], "structuredContent": value }));
    }
    check(&serde_json::json!({ "content": [{ "type": "text", "text": text }] }));
});
