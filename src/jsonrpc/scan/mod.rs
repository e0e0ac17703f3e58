//! Reading a message's top level in one pass, without serde.
//!
//! [`envelope_members`] walks a whole message once and hands back the text of its top-level members
//! (`jsonrpc`, `id`, `method`, `params`, `result`, `error`) only when it has proved that the whole text
//! is JSON that serde_json (1.0.154, the version in Cargo.lock) reads into the envelope's `Wire` with
//! the same members. Whatever it is not sure of — an escape in a top-level key, a known key twice,
//! nesting deeper than it tracks, any invalid input at all — is "don't know" (`None`), and the caller
//! reads the message with serde, which also words every error. So the scanner never has to produce an
//! error, only "valid, here are the members" or "don't know".
//!
//! What serde_json accepts in a value it does not build (a `RawValue` or an ignored member, both read
//! by its `ignore_value`), and what the scanner therefore checks:
//! - strings: no byte below 0x20 unescaped; escapes `\" \\ \/ \b \f \n \r \t` and `\u` with four hex
//!   digits, any code point (a lone surrogate is accepted in a string serde_json does not decode);
//! - numbers by JSON's grammar (`-`? `0` | `[1-9][0-9]*`, then `.` digits, then `e`/`E` sign? digits),
//!   of any size (`1e400` is valid text);
//! - `true`, `false`, `null`; arrays and objects without trailing commas, object keys strings;
//! - whitespace is space, tab, line feed and carriage return only (no BOM);
//! - nesting: `ignore_value` keeps its own stack and sets no depth limit (the 128 of
//!   `remaining_depth` counts only the values serde builds, here the top-level object), so the
//!   scanner tracks 128 levels inside a member and answers "don't know" below that.
//!
//! UTF-8 has been checked by `str::from_utf8` before the scan.
//!
//! [`object_members`] walks an object already proved valid (a member the scan returned) to find its
//! own top-level members; it only looks for boundaries.
//!
//! This file is what the walks hand back (the members, as text and as `RawValue`); the grammar they
//! walk by is in `grammar.rs`.

mod grammar;

use grammar::Walk;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The top level of a message as either reader finds it: `jsonrpc`, `id` and `method` as their JSON
/// text (only read here), the payloads raw.
pub(super) struct Members<'a> {
    pub(super) jsonrpc: Option<&'a str>,
    pub(super) id: Option<&'a str>,
    pub(super) method: Option<&'a str>,
    pub(super) params: Option<&'a RawValue>,
    pub(super) result: Option<&'a RawValue>,
    pub(super) error: Option<&'a RawValue>,
}

impl<'a> From<Wire<'a>> for Members<'a> {
    fn from(wire: Wire<'a>) -> Self {
        Members {
            jsonrpc: wire.jsonrpc.map(RawValue::get),
            id: wire.id.map(RawValue::get),
            method: wire.method.map(RawValue::get),
            params: wire.params,
            result: wire.result,
            error: wire.error,
        }
    }
}

/// The top level of a message as serde_json reads it. Each field is `Some` whenever the key is present, even with a `null`
/// value (plain `Option` would turn `"id": null` into "no id").
#[derive(Deserialize)]
pub(super) struct Wire<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The top-level members of a message (see the module's docs), as serde_json's `Wire` has them.
pub(super) fn envelope_members(text: &str) -> Option<Members<'_>> {
    let [jsonrpc, id, method, params, result, error] = members::<true, 6>(text, |key| match key {
        b"jsonrpc" => Some(0),
        b"id" => Some(1),
        b"method" => Some(2),
        b"params" => Some(3),
        b"result" => Some(4),
        b"error" => Some(5),
        _ => None,
    })?;
    Some(Members {
        jsonrpc: jsonrpc.map(Member::text),
        id: id.map(Member::text),
        method: method.map(Member::text),
        params: raw(params)?,
        result: raw(result)?,
        error: raw(error)?,
    })
}

/// A member as a `RawValue`. Outer `None`: the conversion failed; inner: the member is absent.
fn raw(member: Option<Member<'_>>) -> Option<Option<&RawValue>> {
    match member {
        Some(member) => member.raw().map(Some),
        None => Some(None),
    }
}

/// The top-level members of a message as the scan reads them: `Some` only when the whole text was
/// proved valid (see the module's docs), each member's value as its text without the whitespace
/// around it (as a `RawValue` has it). For tests and the fuzz target, which compare it with serde's
/// reading; the proxy uses `Envelope::parse`.
#[doc(hidden)]
pub fn top_level(text: &str) -> Option<[Option<&str>; 6]> {
    let m = envelope_members(text)?;
    Some([
        m.jsonrpc,
        m.id,
        m.method,
        m.params.map(RawValue::get),
        m.result.map(RawValue::get),
        m.error.map(RawValue::get),
    ])
}

/// The value of a member this module found in a valid text: one JSON value, without whitespace
/// around it. Only this module makes one, so only such text becomes a [`RawValue`] without being
/// read again.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a>(&'a str);

impl<'a> Member<'a> {
    /// The value's JSON text.
    pub fn text(self) -> &'a str {
        self.0
    }

    /// The value as a `RawValue` (`None` only if serde_json stopped taking its text as it is, see
    /// [`trusted_raw`]; the caller then reads with serde).
    pub fn raw(self) -> Option<&'a RawValue> {
        trusted_raw(self.0)
    }
}

/// The members of `object` named by `slot` (which gives each wanted key its index). `object` must be
/// valid JSON (a `RawValue`'s text): this walk only finds boundaries. `None` when it is not an
/// object, a top-level key has an escape, or a wanted key comes twice (serde refuses a duplicate
/// field, a parsed object keeps the last): the caller then reads it with serde.
pub fn object_members<const N: usize>(
    object: &str,
    slot: impl Fn(&[u8]) -> Option<usize>,
) -> Option<[Option<Member<'_>>; N]> {
    members::<false, N>(object, slot)
}

/// `text` as a `&RawValue` without reading it again, for text this module has proved to be one JSON
/// value with no whitespace around it. Safe code: serde_json builds a borrowed `RawValue` from a map
/// with its private key and the text as a borrowed string (what its own deserializer hands over), and
/// checks nothing else. Should a later serde_json change that, the conversion fails (`None`, a unit
/// test says so) and the message is read with serde; nothing wrong can come out of it.
pub(in crate::jsonrpc) fn trusted_raw(text: &str) -> Option<&RawValue> {
    use serde::de::value::{BorrowedStrDeserializer, Error, MapDeserializer};
    const TOKEN: &str = "$serde_json::private::RawValue";
    let map = MapDeserializer::<_, Error>::new(std::iter::once((TOKEN, BorrowedStrDeserializer::new(text))));
    <&RawValue>::deserialize(map).ok()
}

/// The one walk behind both readers: `VALIDATE` proves the text is JSON (the envelope), without it
/// the text is trusted and only boundaries are found (a member of a validated message).
fn members<const VALIDATE: bool, const N: usize>(
    text: &str,
    slot: impl Fn(&[u8]) -> Option<usize>,
) -> Option<[Option<Member<'_>>; N]> {
    let mut w = Walk { b: text.as_bytes(), i: 0 };
    let mut out: [Option<Member<'_>>; N] = [None; N];
    w.ws();
    if w.peek()? != b'{' {
        return None;
    }
    w.i += 1;
    w.ws();
    if w.peek()? == b'}' {
        w.i += 1;
    } else {
        loop {
            if w.peek()? != b'"' {
                return None;
            }
            w.i += 1;
            let key = w.plain_key::<VALIDATE>()?;
            w.colon()?;
            let start = w.i;
            w.value::<VALIDATE>()?;
            if let Some(k) = slot(key) {
                if out[k].is_some() {
                    return None;
                }
                out[k] = Some(Member(text.get(start..w.i)?));
            }
            w.ws();
            match w.peek()? {
                b',' => {
                    w.i += 1;
                    w.ws();
                }
                b'}' => {
                    w.i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    w.ws();
    (w.i == w.b.len()).then_some(out)
}

/// The top-level members of a message as serde_json reads them (the reference for [`top_level`]).
#[doc(hidden)]
pub fn top_level_with_serde(text: &str) -> Result<[Option<&str>; 6], serde_json::Error> {
    let wire: Wire<'_> = serde_json::from_str(text)?;
    Ok([wire.jsonrpc, wire.id, wire.method, wire.params, wire.result, wire.error]
        .map(|m| m.map(RawValue::get)))
}

#[cfg(test)]
mod tests {
    use super::super::{Envelope, ParseError};
    use super::*;

    /// The scan's answer for `text`, after checking it against serde_json's: when the scan knows, serde
    /// reads the same members (the same text at the same place), and `Envelope::parse` answers exactly
    /// what the serde path answers, whoever reads the message.
    fn agree(text: &str) -> bool {
        let scanned = top_level(text);
        if let Some(members) = scanned {
            let serde =
                top_level_with_serde(text).unwrap_or_else(|e| panic!("scan took {text:?}, serde: {e}"));
            assert_eq!(members, serde, "{text:?}");
            for (a, b) in members.iter().zip(&serde) {
                assert_eq!(a.map(str::as_ptr), b.map(str::as_ptr), "the same place in {text:?}");
            }
        }
        let (fast, slow) = (Envelope::parse(text.as_bytes()), Envelope::parse_with_serde(text.as_bytes()));
        match (&fast, &slow) {
            (Ok(f), Ok(s)) => {
                assert_eq!(f.kind, s.kind);
                assert_eq!(f.id, s.id);
                assert_eq!(f.method, s.method);
                let text = |r: Option<&RawValue>| r.map(|r| (r.get().to_owned(), r.get().as_ptr()));
                assert_eq!(text(f.params), text(s.params));
                assert_eq!(text(f.result), text(s.result));
                assert_eq!(text(f.error), text(s.error));
                assert_eq!(f.raw_id.map(|r| (r, r.as_ptr())), s.raw_id.map(|r| (r, r.as_ptr())));
            }
            (Err(f), Err(s)) => assert_eq!(f, s),
            _ => panic!("{text:?}: scan path {fast:?}, serde path {slow:?}"),
        }
        scanned.is_some()
    }

    fn request(params: &str) -> String {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
    }

    #[test]
    fn valid_messages_are_read_in_one_pass_with_serdes_members() {
        for text in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"xx"}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":"a\"b","result":{"content":[{"type":"text","text":"}]{[\\"}]}}"#,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"m"}}"#,
            // Whitespace of every kind JSON has, around everything; a RawValue excludes it.
            " \t\r\n{ \"jsonrpc\" : \"2.0\" ,\n\"id\"\t:\r7 , \"method\" : \"m\" , \"params\" : [ 1 , { } , [ ] ] }\n\r \t",
            // Members serde does not read, even twice; an empty key; `__proto__`.
            r#"{"x":1,"x":[2],"":3,"__proto__":{"__proto__":null},"jsonrpc":"2.0","method":"m"}"#,
            // Nested keys with escapes are plain strings to both.
            r#"{"jsonrpc":"2.0","id":1,"result":{"\u0069d":1,"\"":2,"a\\b":3}}"#,
            "{}",
            r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#,
            r#"{"jsonrpc":"2.1","id":1,"method":"m"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"m\u0041"}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":1,"error":2}"#,
        ] {
            assert!(agree(text), "the scan reads {text:?}");
        }
    }

    #[test]
    fn strings_are_read_as_serde_reads_a_string_it_does_not_decode() {
        let known = [
            r#""\ud800""#,       // a lone high surrogate
            r#""\udc00\ud800""#, // surrogates the wrong way round
            r#""\ud83d\ude00""#, // a pair
            r#""\u0000""#,       // NUL, escaped
            r#""\uABCD\uabcd""#, // hex of either case
            r#""\"\\\/\b\f\n\r\t""#,
            "\"é中😀\u{7f}\u{80}\"", // multi-byte UTF-8 and DEL, raw
            r#""\\""#,
            r#""""#,
            r#""}]""#,
        ];
        for s in known {
            assert!(agree(&request(&format!(r#"{{"text":{s},{s}:1}}"#))), "{s}");
        }
        let refused = [
            "\"a\u{1}b\"",     // a control character, raw
            "\"tab\there\"",   // a raw tab
            "\"line\nbreak\"", // a raw newline
            "\"\u{1f}\"",
            r#""\x41""#,   // not an escape
            r#""\u12G4""#, // not hex
            r#""\u123""#,  // short
            r#""\'""#,
            r#""open"#, // no closing quote
            r#""\"#,
        ];
        for s in refused {
            let text = request(&format!(r#"{{"text":{s}}}"#));
            assert!(!agree(&text), "{s}");
            assert!(Envelope::parse(text.as_bytes()).is_err(), "{s}");
        }
        // Past the first bytes a string is searched with memchr2, and checked for control characters
        // apart: the same answers there.
        let long = "x".repeat(40);
        for s in [format!("\"{long}\u{1}{long}\""), format!("\"{long}\t\""), format!("\"{long}\\q\"")] {
            assert!(!agree(&request(&format!(r#"{{"text":{s}}}"#))), "{s:?}");
        }
        for s in [format!(r#""{long}\ud800{long}\"{long}""#), format!("\"{long}é\u{7f}\"")] {
            assert!(agree(&request(&format!(r#"{{"text":{s}}}"#))), "{s:?}");
        }
        // A control character raw in a top-level key.
        assert!(!agree("{\"jsonrpc\":\"2.0\",\"a\u{1}\":1,\"method\":\"m\"}"));
    }

    #[test]
    fn numbers_follow_jsons_grammar_of_any_size() {
        for n in [
            "0",
            "-0",
            "1e400",
            "-1E-400",
            "1.5e+3",
            "0.0",
            "123456789012345678901234567890",
            "1E2",
            "-0.0e0",
        ] {
            assert!(agree(&request(&format!("[{n}]"))), "{n}");
            assert!(agree(&format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"m"}}"#)), "id {n}");
        }
        for n in [
            "01", "-01", "00", "1.", "-", "+1", ".5", "1e", "1e+", "1.e3", "0x10", "1.5.3", "--1",
            "Infinity", "NaN",
        ] {
            let text = request(&format!("[{n}]"));
            assert!(!agree(&text), "{n}");
            assert!(Envelope::parse(text.as_bytes()).is_err(), "{n}");
        }
    }

    #[test]
    fn structure_errors_are_left_to_serde() {
        for text in [
            request("[1,]"),
            request(r#"{"a":1,}"#),
            request("[,1]"),
            request(r#"{,"a":1}"#),
            request(r#"{"a" 1}"#),
            request(r#"{1:2}"#),
            request("[1 2]"),
            request("[1}"),
            request(r#"{"a":1]"#),
            request("[tru]"),
            request("[nulll]"),
            request("[True]"),
            request(""),
            r#"{"jsonrpc":"2.0","method":"m",}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m""#.to_owned(),
            r#"{"jsonrpc":"2.0" "method":"m"}"#.to_owned(),
            // A BOM, a non-breaking space, a second value, a batch, not an object.
            "\u{feff}{\"jsonrpc\":\"2.0\",\"method\":\"m\"}".to_owned(),
            "\u{a0}{\"jsonrpc\":\"2.0\",\"method\":\"m\"}".to_owned(),
            r#"{"jsonrpc":"2.0","method":"m"}{"jsonrpc":"2.0","method":"m"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m"} x"#.to_owned(),
            r#"[{"jsonrpc":"2.0","method":"m"}]"#.to_owned(),
            "42".to_owned(),
            "\"x\"".to_owned(),
            "".to_owned(),
            "   ".to_owned(),
        ] {
            assert!(!agree(&text), "{text:?}");
            assert!(Envelope::parse(text.as_bytes()).is_err(), "{text:?}");
        }
    }

    #[test]
    fn what_the_scan_does_not_know_serde_reads() {
        // An escaped top-level key is unescaped by serde: the id is found, and written over in place.
        let escaped = r#"{"jsonrpc":"2.0","\u0069d":3,"result":{}}"#;
        assert!(!agree(escaped));
        assert_eq!(Envelope::parse(escaped.as_bytes()).unwrap().id.unwrap().as_json(), "3");
        // A known key twice is serde's "duplicate field" error, worded by serde.
        let twice = r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"m"}"#;
        assert!(!agree(twice));
        assert!(
            matches!(Envelope::parse(twice.as_bytes()), Err(ParseError::NotJsonRpc(e)) if e.contains("duplicate"))
        );
    }

    #[test]
    fn nesting_is_followed_to_128_levels_then_left_to_serde() {
        let nested = |depth: usize| request(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
        assert!(agree(&nested(128)));
        // serde_json's `ignore_value` sets no depth limit: deeper nesting is valid, read by serde.
        for depth in [129, 1000] {
            assert!(!agree(&nested(depth)));
            assert!(Envelope::parse(nested(depth).as_bytes()).is_ok());
        }
        let objects = |depth: usize| request(&format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth)));
        assert!(agree(&objects(128)));
        assert!(!agree(&objects(129)));
        // Unbalanced at depth.
        assert!(!agree(&request(&format!("{}{}", "[".repeat(100), "]".repeat(99)))));
    }

    #[test]
    fn a_member_of_a_valid_object_is_found_without_serde() {
        let slot = |key: &[u8]| match key {
            b"name" => Some(0),
            b"task" => Some(1),
            _ => None,
        };
        fn text(m: Option<Member<'_>>) -> Option<&str> {
            m.map(Member::text)
        }
        let params = r#" { "arguments" : {"name":"no","s":"}\"{"} , "name" : "echo" ,"x":[1,{"task":2}], "task":{"ttl":1e3}} "#;
        let [name, task] = object_members(params, slot).unwrap();
        assert_eq!((text(name), text(task)), (Some(r#""echo""#), Some(r#"{"ttl":1e3}"#)));
        let [name, task] = object_members("{}", slot).unwrap();
        assert_eq!((name.is_none(), task.is_none()), (true, true));
        let [name, task] = object_members(r#"{"name":null,"other":-1.5E-3}"#, slot).unwrap();
        assert_eq!((text(name), text(task)), (Some("null"), None));
        // Not sure: an escaped key, a wanted key twice; not an object.
        assert!(object_members::<2>(r#"{"n\u0061me":"a"}"#, slot).is_none());
        assert!(object_members::<2>(r#"{"name":"a","name":"b"}"#, slot).is_none());
        assert!(object_members::<2>(r#"[1]"#, slot).is_none());
        assert!(object_members::<2>(r#""name""#, slot).is_none());
        // Broken text (never handed to it) gives no answer rather than a panic.
        for broken in [r#"{"name":"a"#, r#"{"name":"\u12"#, r#"{"name""#, "{", r#"{"a":[}"#, r#"{"a":"\"#] {
            assert!(object_members::<2>(broken, slot).is_none(), "{broken}");
        }
    }

    #[test]
    fn serde_json_makes_a_raw_value_of_the_text_as_it_is() {
        let [params] = object_members(r#"{"params": [1] }"#, |k| (k == b"params").then_some(0)).unwrap();
        assert_eq!(params.unwrap().raw().unwrap().get(), "[1]");
        for text in ["1", r#""a""#, "{}", "[1, 2]", "null"] {
            let raw = trusted_raw(text).expect("serde_json 1.0.154 hands over a borrowed raw value");
            assert_eq!(raw.get(), text);
            assert_eq!(raw.get().as_ptr(), text.as_ptr(), "borrowed, not copied");
        }
    }
}
