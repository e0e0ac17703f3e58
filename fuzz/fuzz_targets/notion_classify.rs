//! The Notion classifier (today `notion::adapter::{classify, payload}`): whatever Notion answers, as
//! the whole tool result, as its `structuredContent`, or as the JSON text in its content (the three
//! ways it reaches us), is read as one answer without a panic, and a rate-limit wait is one the
//! adapter can add to the clock.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_asyncify::notion::adapter::{NotionAnswer, classify, payload};
use serde_json::value::RawValue;
use std::time::{Duration, Instant};

fn check(result: &RawValue) {
    let _ = payload(result);
    match classify(result, Duration::from_secs(1)) {
        NotionAnswer::RateLimited(wait) => {
            assert!(Instant::now().checked_add(wait).is_some(), "a wait of {wait:?} overflows the clock");
        }
        NotionAnswer::AsyncTask { task_id, envelope, .. } => {
            assert_eq!(envelope.get("task_id").and_then(|v| v.as_str()), Some(task_id.as_str()));
        }
        NotionAnswer::Status { .. } | NotionAnswer::Final => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        check(raw);
        let structured = format!(r#"{{"content":[],"structuredContent":{}}}"#, raw.get());
        check(&RawValue::from_string(structured).expect("valid JSON"));
    }
    let as_text = serde_json::json!({ "content": [{ "type": "text", "text": text }] }).to_string();
    check(&RawValue::from_string(as_text).expect("valid JSON"));
});
