//! The id of a message too large to read whole, read from its first bytes.

use super::Id;
use serde_json::value::RawValue;

/// What can be read from the first bytes of a message too large to read whole: its top-level `id`
/// (when it came before the cut) and whether it has a top-level `method` (a request or notification
/// rather than a response). Lets the proxy answer an oversized request, or fail the request whose
/// response was oversized, instead of leaving it to wait forever.
pub fn sniff_head(head: &[u8]) -> (Option<Id>, bool) {
    let ws = |mut i: usize| {
        while head.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    // The index just past the string starting at `i`, or None if it is cut.
    let string_end = |i: usize| {
        let mut j = i + 1;
        while j < head.len() {
            match head[j] {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
        None
    };
    // The index just past the value starting at `i`, or None if it is cut.
    let value_end = |i: usize| match head.get(i)? {
        b'"' => string_end(i),
        b'{' | b'[' => {
            let (mut depth, mut j) = (0usize, i);
            while j < head.len() {
                match head[j] {
                    b'"' => {
                        j = string_end(j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let end = i + head[i..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())?;
            Some(end)
        }
    };
    let (mut id, mut method) = (None, false);
    let mut i = ws(0);
    if head.get(i) != Some(&b'{') {
        return (None, false);
    }
    i += 1;
    loop {
        i = ws(i);
        if head.get(i) != Some(&b'"') {
            break;
        }
        let Some(key_end) = string_end(i) else { break };
        let key = &head[i + 1..key_end - 1];
        // An escaped key means what the full parse unescapes it to (`"\u0069d"` is the id).
        let unescaped = match key.contains(&b'\\') {
            true => serde_json::from_slice::<String>(&head[i..key_end]).ok(),
            false => None,
        };
        let key = unescaped.as_ref().map_or(key, |k| k.as_bytes());
        i = ws(key_end);
        if head.get(i) != Some(&b':') {
            break;
        }
        i = ws(i + 1);
        if key == b"method" {
            method = true;
        }
        let Some(end) = value_end(i) else { break };
        if key == b"id"
            && let Ok(raw) = serde_json::from_slice::<&RawValue>(&head[i..end])
            && (raw.get().starts_with('"')
                || raw.get().starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']))
        {
            id = Some(Id::from_raw(raw));
        }
        i = ws(end);
        if head.get(i) != Some(&b',') {
            break;
        }
        i += 1;
    }
    (id, method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_of_a_cut_message_is_found_when_it_came_before_the_cut() {
        let (id, method) =
            sniff_head(br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"a":"xxxx"#);
        assert_eq!((id.unwrap().as_json(), method), ("42", true));
        let (id, method) =
            sniff_head(br#" { "result" : {"content":[{"text":"}]\"x"}]}, "id" : "a\"b", "jsonrpc":"2.0"#);
        assert_eq!((id.unwrap().as_json(), method), (r#""a\"b""#, false));
        assert_eq!(sniff_head(br#"{"jsonrpc":"2.0","result":{"content":"xxxxxxxx"#).0, None);
        assert_eq!(sniff_head(br#"{"id":12"#).0, None, "a number cut at the end may be longer");
        assert_eq!(sniff_head(br#"{"id":null,"x":1"#).0, None);
        assert_eq!(sniff_head(b"garbage").0, None);
        // An escaped key is the key it spells, as in the full parse.
        let (id, method) = sniff_head(br#"{"\u0069d":"a","m\u0065thod":"x","params":{"#);
        assert_eq!((id.unwrap().as_json(), method), (r#""a""#, true));
    }
}
