//! Lookups in JSON text the proxy has already validated (a member of a parsed message), by the
//! scanner's walks instead of a serde pass over the whole value. Each answers as serde_json would, or
//! says it is not sure and leaves the reading to serde.

use super::scan;

/// The text of the member at `path` (keys from the outside in) of `object`, which must be valid JSON
/// (a `RawValue`'s text). `Some(None)`: it is not there. `None`: a walk cannot be sure (an escaped
/// key, a wanted key twice, a value on the way that is not an object), so the caller reads it with
/// serde.
pub fn member_at<'a>(object: &'a str, path: &[&str]) -> Option<Option<&'a str>> {
    let mut here = object;
    for key in path {
        let [found] = scan::object_members(here, |k| (k == key.as_bytes()).then_some(0))?;
        match found {
            Some(member) => here = member.text(),
            None => return Some(None),
        }
    }
    Some(Some(here))
}

/// The content of the JSON string `raw` (one valid JSON value, as a member of a validated text)
/// when it has no escapes: the text between its quotes, borrowed, which is what serde decodes it to.
/// `None` for another value, or for a string with escapes (serde decodes those).
pub fn plain_string(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

/// The JSON text serde_json writes for the valid JSON value `raw` (what `Value::to_string` gives): the
/// text itself for a string without escapes or a plain integer, else read and written again. Values
/// that must match although two parties wrote them (a progress token) are compared by it.
pub fn canonical(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let plain_integer = !digits.is_empty()
        && digits.len() <= 18
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || (digits.len() == 1 && b.len() == 1));
    if plain_string(raw).is_some() || plain_integer {
        return Some(raw.to_owned());
    }
    serde_json::from_str::<serde_json::Value>(raw).ok().map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// What serde_json says: `Value::pointer` of the path, written as text.
    fn by_serde(object: &str, path: &[&str]) -> Option<String> {
        let v: Value = serde_json::from_str(object).unwrap();
        let pointer: String = path.iter().map(|k| format!("/{k}")).collect();
        v.pointer(&pointer).map(Value::to_string)
    }

    #[test]
    fn a_member_is_found_as_serde_finds_it() {
        let params = r#"{"name":"echo","_meta":{"progressToken":"tok-1","x":[1,{"progressToken":2}]},"arguments":{"_meta":{"progressToken":9}}}"#;
        for path in
            [&["_meta", "progressToken"][..], &["_meta"], &["name"], &["_meta", "missing"], &["nope", "x"]]
        {
            let walked = member_at(params, path).expect("sure").map(|t| canonical(t).unwrap());
            assert_eq!(walked, by_serde(params, path), "{path:?}");
        }
        // A value on the way that is not an object, an escaped key, a key twice: not sure (serde reads it).
        assert_eq!(member_at(r#"{"_meta":7}"#, &["_meta", "progressToken"]), None);
        assert_eq!(member_at(r#"{"_met\u0061":{}}"#, &["_meta"]), None);
        assert_eq!(member_at(r#"{"_meta":{},"_meta":{"progressToken":1}}"#, &["_meta"]), None);
    }

    #[test]
    fn a_plain_string_is_what_serde_decodes_it_to() {
        for raw in [r#""tok""#, r#""""#, r#""caf\u00e9""#, r#""a\"b""#, "7", "null", r#"{"a":"b"}"#] {
            // serde borrows a string only when it has no escapes.
            let serde = serde_json::from_str::<&str>(raw).ok();
            assert_eq!(plain_string(raw), serde, "{raw}");
        }
    }

    #[test]
    fn canonical_text_is_what_serde_writes() {
        for raw in [
            r#""tok""#,
            r#""""#,
            r#""caf\u00e9""#,
            r#""a\/b""#,
            "0",
            "7",
            "-12",
            "123456789012345678",
            "1234567890123456789012",
            "-0",
            "1.0",
            "1e3",
            "-1.5e-7",
            "true",
            "null",
            r#"{"a" : 1}"#,
            "[1, 2]",
        ] {
            let serde = serde_json::from_str::<Value>(raw).unwrap().to_string();
            assert_eq!(canonical(raw).as_deref(), Some(serde.as_str()), "{raw}");
        }
        assert_eq!(canonical("not json"), None);
    }
}
