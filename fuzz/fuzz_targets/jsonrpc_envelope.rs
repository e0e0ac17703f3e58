//! The JSON-RPC envelope: whatever a peer writes on a line, `Envelope::parse` answers a message or a
//! clear error and never panics; what it accepts is consistent; the messages the proxy rebuilds from
//! it (another id, an error, `resultType`) parse again with the same content; and the head sniffer
//! used for oversized lines finds the same id as the full parse. And the one-pass scan that reads
//! messages agrees with serde_json: whatever it takes, serde takes with the same members at the same
//! places, and the envelope (or the error) is the same whoever reads the message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_asyncify::jsonrpc::{self, Envelope, Id, Kind};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// The scan against serde_json, on any input.
fn scan_agrees_with_serde(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(members) = jsonrpc::scan::top_level(text)
    {
        // Never "valid" for what serde refuses; the same text, at the same place, without whitespace.
        let serde = jsonrpc::scan::top_level_with_serde(text)
            .unwrap_or_else(|e| panic!("the scan took {text:?}, serde refused it: {e}"));
        assert_eq!(members, serde);
        for (a, b) in members.iter().zip(&serde) {
            assert_eq!(a.map(str::as_ptr), b.map(str::as_ptr));
            assert!(a.is_none_or(|t| t.trim() == t));
        }
        serde_json::from_str::<IgnoredAny>(text).expect("what the scan takes is JSON");
    }
    match (Envelope::parse(data), Envelope::parse_with_serde(data)) {
        (Ok(fast), Ok(slow)) => {
            assert_eq!(fast.kind, slow.kind);
            assert_eq!(fast.id, slow.id);
            assert_eq!(fast.method, slow.method);
            fn at(r: Option<&RawValue>) -> Option<(&str, *const u8)> {
                r.map(|r| (r.get(), r.get().as_ptr()))
            }
            assert_eq!(at(fast.params), at(slow.params));
            assert_eq!(at(fast.result), at(slow.result));
            assert_eq!(at(fast.error), at(slow.error));
            // The id's place, which `with_id` writes over.
            let other = Id::string("scan-1");
            assert_eq!(jsonrpc::with_id(&fast, &other), jsonrpc::with_id(&slow, &other));
        }
        (Err(fast), Err(slow)) => assert_eq!(fast, slow),
        (fast, slow) => panic!("the scan's path {fast:?}, serde's {slow:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    scan_agrees_with_serde(data);
    let (sniffed_id, sniffed_method) = jsonrpc::sniff_head(data);
    let env = match Envelope::parse(data) {
        Ok(env) => env,
        Err(e) => {
            assert!(matches!(e.code(), jsonrpc::code::PARSE_ERROR | jsonrpc::code::INVALID_REQUEST));
            return;
        }
    };
    match env.kind {
        Kind::Request => assert!(env.method.is_some() && env.id.is_some()),
        Kind::Notification => assert!(env.method.is_some() && env.id.is_none()),
        Kind::Response => {
            assert!(env.method.is_none());
            assert!(env.result.is_some() != env.error.is_some());
        }
    }
    // An id is a JSON string or number, kept as its text (numbers of any size: `1e400` is a valid id
    // even though no f64 holds it, so the text is checked as JSON, not as a value).
    if let Some(id) = &env.id {
        let raw: &RawValue = serde_json::from_str(id.as_json()).expect("an id is JSON");
        let first = raw.get().as_bytes()[0];
        assert!(first == b'"' || first == b'-' || first.is_ascii_digit(), "id {id}");
        assert_eq!(id.is_string(), first == b'"');
    }
    // What the sniffer reads from the first bytes of a message agrees with the full parse.
    assert_eq!(sniffed_id.as_ref(), env.id.as_ref(), "sniffed id");
    assert_eq!(sniffed_method, env.method.is_some(), "sniffed method");

    // The same message under the proxy's id, and back under the client's: nothing else of it changes.
    // A message with an `id` member gets the new id in its place, the other bytes as they came.
    if env.kind != Kind::Notification {
        let internal = Id::string("stateless-1");
        let line = jsonrpc::with_id(&env, &internal);
        let up = Envelope::parse(&line).expect("a rewritten message parses");
        assert_eq!(up.kind, env.kind);
        assert_eq!(up.method, env.method);
        // The id is written in place of the old one: every member stays as it came (a stray `params`
        // beside a `result` or `error` too).
        assert_eq!(up.params.map(RawValue::get), env.params.map(RawValue::get));
        assert_eq!(up.result.map(RawValue::get), env.result.map(RawValue::get));
        assert_eq!(up.error.map(RawValue::get), env.error.map(RawValue::get));
        if let Some(original) = &env.id {
            let back = jsonrpc::with_id(&up, original);
            let back = Envelope::parse(&back).expect("a message back under the client's id parses");
            assert_eq!(back.id.as_ref(), Some(original));
        }
    }
    // The proxy's own answers to it are valid JSON-RPC with the same id.
    let error = jsonrpc::error_response(env.id.as_ref(), jsonrpc::code::INVALID_PARAMS, "m", None);
    let error = Envelope::parse(&error).expect("an error response parses");
    assert_eq!(error.id, env.id);
    if let Some(result) = env.result {
        // Checked without `serde_json::Value`, which reads a member named
        // `$serde_json::private::RawValue` as JSON text and so refuses valid JSON.
        let marked = jsonrpc::mark_complete(result.get());
        serde_json::from_str::<IgnoredAny>(&marked).expect("resultType keeps JSON valid");
        // A key with a lone surrogate escape is valid JSON that no `String` holds (serde refuses to
        // decode it): then the keys cannot be listed, and only the validity above is checked.
        if marked.trim_start().starts_with('{')
            && let Ok(members) = serde_json::from_str::<HashMap<String, IgnoredAny>>(&marked)
        {
            assert!(members.contains_key("resultType"));
        }
    }
    if let Some(error) = env.error {
        let _ = jsonrpc::error_code_of(error.get());
    }
});
