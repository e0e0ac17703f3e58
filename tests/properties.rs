//! Properties that must hold for every input, not just the examples the other tests pick: framing
//! gives the same messages however the byte stream is cut, ids of any JSON type come back exactly as
//! the client sent them through every id rewriting the proxy does, and the proxy's own ids never
//! collide with a client's, and the one-pass reading of a message agrees with serde_json's.

mod common;

use common::{BIN, Peer, WAIT};
use mcp_asyncify::jsonrpc::{self, Envelope, Id, Kind};
use mcp_asyncify::proxy::intercept::Rewrite;
use mcp_asyncify::proxy::pending::Pending;
use mcp_asyncify::transport::lines::{HEAD_BYTES, Line, LineReader};
use proptest::prelude::*;
use serde_json::value::RawValue;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// `cases` random cases per property; a failure is shrunk and printed (copy it into a unit test) rather
/// than saved to a file beside the sources.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------------
// Framing

/// A reader that hands out the stream in the given pieces, one piece (at most) per read, the way a
/// pipe delivers whatever the writer's last write held.
struct Pieces(VecDeque<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(mut piece) = self.0.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Cuts `stream` at the given points (any order, repeats and out-of-range points allowed).
fn cut(stream: &[u8], points: &[usize]) -> VecDeque<Vec<u8>> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (stream.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces = VecDeque::new();
    let mut start = 0;
    for p in points.into_iter().chain([stream.len()]) {
        if p > start {
            pieces.push_back(stream[start..p].to_vec());
            start = p;
        }
    }
    pieces
}

fn read_all(pieces: VecDeque<Vec<u8>>, max: usize) -> Vec<Line> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut reader = LineReader::new(Pieces(pieces), max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        out
    })
}

/// What the framing must give, written the plain way: lines end at `\n`, a `\r` before it (or before
/// the end of the stream) belongs to the line ending, blank and whitespace-only lines are skipped, and
/// a line whose content is longer than `max` is reported too long with its first bytes.
fn expected(stream: &[u8], max: usize) -> Vec<Line> {
    let mut out = Vec::new();
    for raw in stream.split(|&b| b == b'\n') {
        let content = raw.strip_suffix(b"\r").unwrap_or(raw);
        if content.len() > max {
            out.push(Line::TooLong { len: raw.len(), head: raw[..raw.len().min(HEAD_BYTES)].to_vec() });
        } else if !content.iter().all(u8::is_ascii_whitespace) {
            out.push(Line::Message(content.to_vec()));
        }
    }
    out
}

/// One line of a stream: some message bytes (never `\n`), then an ending.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let body = prop_oneof![
        // JSON-ish text
        proptest::collection::vec(
            prop_oneof![Just(b'{'), Just(b'"'), Just(b'a'), Just(b':'), Just(b'1')],
            0..40
        ),
        // anything but a newline, \r and whitespace included
        proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40),
        // blank-looking
        proptest::collection::vec(prop_oneof![Just(b' '), Just(b'\t'), Just(b'\r')], 0..4),
    ];
    let ending =
        prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b"\n\n"[..]), Just(&b"\r\n\r\n"[..])];
    (body, ending).prop_map(|(mut body, ending)| {
        body.extend_from_slice(ending);
        body
    })
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    (proptest::collection::vec(line(), 0..12), proptest::collection::vec(any::<u8>(), 0..8)).prop_map(
        |(lines, tail)| {
            // The last line may lack its newline.
            let mut s = lines.concat();
            s.extend(tail.into_iter().filter(|b| *b != b'\n'));
            s
        },
    )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_cut_of_the_stream_gives_the_same_messages(
        stream in stream(),
        points in proptest::collection::vec(any::<usize>(), 0..16),
        max in 1usize..48,
    ) {
        let whole = read_all(VecDeque::from([stream.clone()]), max);
        prop_assert_eq!(&whole, &expected(&stream, max));
        prop_assert_eq!(&read_all(cut(&stream, &points), max), &whole);
        // Byte by byte too: the worst a pipe can do.
        let bytes: VecDeque<Vec<u8>> = stream.iter().map(|b| vec![*b]).collect();
        prop_assert_eq!(read_all(bytes, max), whole);
    }

    #[test]
    fn a_message_of_exactly_the_maximum_passes_with_either_line_ending(
        len in 1usize..64,
        crlf in any::<bool>(),
        points in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut stream = vec![b'x'; len];
        stream.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        stream.extend_from_slice(b"y\n");
        let got = read_all(cut(&stream, &points), len);
        prop_assert_eq!(got, vec![Line::Message(vec![b'x'; len]), Line::Message(b"y".to_vec())]);
        let got = read_all(cut(&stream, &points), len - 1);
        prop_assert!(matches!(got[0], Line::TooLong { .. }), "one byte over the maximum is too long");
    }
}

// ---------------------------------------------------------------------------------------------------
// Ids

/// JSON-RPC ids of every kind a client may send, as JSON text: small and huge integers, negative,
/// float-looking numbers, strings with escapes and any Unicode, written escaped or not.
fn client_id() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        // Beyond 64 bits, and beyond a double's exact integers.
        ("[1-9]", proptest::collection::vec(0u8..10, 17..40)).prop_map(|(first, digits)| {
            let digits: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            format!("-{first}{digits}")
        }),
        (any::<i32>(), 0u32..1000, -30i32..30).prop_map(|(i, f, e)| format!("{i}.{f}e{e}")),
        Just("-0".to_owned()),
        Just("0.0".to_owned()),
        Just("1E+2".to_owned()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        // The same strings written with every character escaped (\uXXXX, surrogate pairs for the rest).
        any::<String>().prop_map(|s| {
            let mut out = String::from("\"");
            for unit in s.encode_utf16() {
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
            out
        }),
        Just(r#""\"\\\/\b\f\n\r\t""#.to_owned()),
        Just(r#""mcp-asyncify-1""#.to_owned()),
        "[a-z0-9-]{0,12}".prop_map(|s| format!("\"mcp-asyncify-{s}\"")),
    ]
}

/// Any JSON value as payload, written with arbitrary spacing.
fn payload() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_flat_map(|v| {
        let compact = v.to_string();
        let pretty = serde_json::to_string_pretty(&v).unwrap().replace('\n', " ");
        prop_oneof![Just(compact), Just(pretty)]
    })
}

fn id_of(raw: &str) -> Id {
    Id::from_raw(&serde_json::from_str::<Box<RawValue>>(raw).unwrap())
}

proptest! {
    #![proptest_config(config(512))]

    /// The sidecar serves a stateless request under an id of its own and answers the client under the
    /// client's (`jsonrpc::with_id` both ways): the client's id comes back as the same JSON text, the
    /// method, params and result byte for byte.
    #[test]
    fn a_client_id_survives_the_rewriting_both_ways(
        raw in client_id(),
        params in payload(),
        result in payload(),
        spaced in any::<bool>(),
        n in any::<u64>(),
    ) {
        let sp = if spaced { " " } else { "" };
        let line = format!(r#"{{{sp}"jsonrpc"{sp}:{sp}"2.0",{sp}"id"{sp}:{sp}{raw}{sp},"method":"tools/call","params":{sp}{params}{sp}}}"#);
        let env = Envelope::parse(line.as_bytes()).unwrap();
        prop_assert_eq!(env.kind, Kind::Request);
        let original = env.id.clone().unwrap();
        prop_assert_eq!(original.as_json(), raw.as_str());
        prop_assert_eq!(original.is_string(), raw.starts_with('"'));

        let internal = Id::string(&format!("stateless-{n}"));
        let upstream_line = jsonrpc::with_id(&env, &internal);
        let up = Envelope::parse(&upstream_line).unwrap();
        prop_assert_eq!(up.kind, Kind::Request);
        prop_assert_eq!(up.id.as_ref(), Some(&internal));
        prop_assert_eq!(up.method, Some("tools/call"));
        prop_assert_eq!(up.params.map(RawValue::get), Some(params.as_str()));

        for answer in [
            format!(r#"{{"jsonrpc":"2.0","id":{},"result":{result}}}"#, internal.as_json()),
            format!(r#"{{"error":{{"code":-1,"message":"m","data":{result}}}, "id" :{} ,"jsonrpc":"2.0"}}"#, internal.as_json()),
        ] {
            let answer = Envelope::parse(answer.as_bytes()).unwrap();
            prop_assert_eq!(answer.kind, Kind::Response);
            let back = jsonrpc::with_id(&answer, &original);
            let back = Envelope::parse(&back).unwrap();
            prop_assert_eq!(back.id.as_ref().map(Id::as_json), Some(raw.as_str()));
            prop_assert_eq!(back.result.map(RawValue::get), answer.result.map(RawValue::get));
            prop_assert_eq!(back.error.map(RawValue::get), answer.error.map(RawValue::get));
        }

        // The errors the proxy writes itself carry the id unchanged, as valid JSON.
        let error = jsonrpc::error_response(Some(&original), -32600, "m", None);
        let error_env = Envelope::parse(&error).unwrap();
        prop_assert_eq!(error_env.id.map(|i| i.as_json().to_owned()), Some(raw.clone()));
        // And an oversized request's id is found in its first bytes.
        let (sniffed, method) = jsonrpc::sniff_head(&line.as_bytes()[..line.len() - 2]);
        prop_assert_eq!(sniffed.map(|i| i.as_json().to_owned()), Some(raw.clone()));
        prop_assert!(method);
    }

    /// `jsonrpc::with_id` writes the new id where the old one stands: every other byte of the message
    /// (key order, spacing, members the proxy does not know) stays as sent, and it means what the
    /// rebuilt message means, plus those members.
    #[test]
    fn another_id_is_written_in_place_of_the_old(
        raw in client_id(),
        new_raw in client_id(),
        kind in 0u8..3,
        null_id in any::<bool>(),
        payload_a in payload(),
        extras in proptest::collection::vec((0usize..3, payload()), 0..3),
        order in Just((0..8).collect::<Vec<usize>>()).prop_shuffle(),
        spaces in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("\t "), Just("\r\n")], 24),
    ) {
        // A response may answer with id null (a parse error); a request may not.
        let id_text = if null_id && kind != 0 { "null".to_owned() } else { raw.clone() };
        let mut members: Vec<(String, String)> = vec![
            ("jsonrpc".into(), "\"2.0\"".into()),
            ("id".into(), "\u{1}".into()), // where the id goes
        ];
        match kind {
            0 => {
                members.push(("method".into(), "\"tools/call\"".into()));
                members.push(("params".into(), payload_a));
            }
            1 => members.push(("result".into(), payload_a)),
            _ => members.push(("error".into(), format!(r#"{{"code":-1,"message":"m","data":{payload_a}}}"#))),
        }
        // Members the envelope does not read (a response's stray params among them), once each.
        let mut names = HashSet::new();
        for (which, value) in &extras {
            let name = match (which, kind) {
                (0, _) => "x",
                (1, _) => "_unknown",
                (_, 0) => "y",
                _ => "params",
            };
            if names.insert(name) {
                members.push((name.to_owned(), value.clone()));
            }
        }
        let shuffled: Vec<&(String, String)> = order.iter().filter_map(|&i| members.get(i)).collect();
        let mut sp = spaces.iter().cycle();
        let mut text = String::from("{");
        for (i, (k, v)) in shuffled.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&format!("{}\"{k}\"{}:{}{v}{}", sp.next().unwrap(), sp.next().unwrap(), sp.next().unwrap(), sp.next().unwrap()));
        }
        text.push('}');
        let line = text.replace('\u{1}', &id_text);
        let env = Envelope::parse(line.as_bytes()).unwrap();
        let new_id = id_of(&new_raw);

        let spliced = jsonrpc::with_id(&env, &new_id);
        // Byte for byte the message as sent, the id's text replaced.
        prop_assert_eq!(String::from_utf8(spliced.clone()).unwrap(), text.replace('\u{1}', &new_raw));
        let again = Envelope::parse(&spliced).unwrap();
        prop_assert_eq!(again.kind, env.kind);
        prop_assert_eq!(again.id.as_ref(), Some(&new_id));
        prop_assert_eq!(again.method, env.method);
        prop_assert_eq!(again.params.map(RawValue::get), env.params.map(RawValue::get));
        prop_assert_eq!(again.result.map(RawValue::get), env.result.map(RawValue::get));
        prop_assert_eq!(again.error.map(RawValue::get), env.error.map(RawValue::get));
        // The same meaning as the rebuilt message, with the members it leaves out.
        let mut rebuilt: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&jsonrpc::rebuilt_with_id(&env, &new_id)).unwrap();
        let original: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line).unwrap();
        for (k, v) in &original {
            rebuilt.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let spliced: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&spliced).unwrap();
        prop_assert_eq!(spliced, rebuilt);
    }

    /// Whatever ids the client picks, even ones made to look like the proxy's, the proxy's own ids are
    /// told apart, are all distinct, and find their waiter when answered.
    #[test]
    fn own_ids_never_collide_with_client_ids(
        clients in proptest::collection::vec(client_id(), 1..40),
        own in 1usize..40,
    ) {
        let pending = Pending::new();
        let mut seen = HashSet::new();
        let mut receivers = Vec::new();
        for _ in 0..own {
            let (id, rx) = pending.own.register();
            prop_assert!(pending.own.is_own(&id));
            prop_assert!(seen.insert(id.clone()), "own ids are distinct");
            receivers.push((id, rx));
        }
        for raw in &clients {
            let id = id_of(raw);
            prop_assert!(!pending.own.is_own(&id), "{} taken for one of ours", raw);
            prop_assert!(!seen.contains(&id));
            // The client's request is tracked under its own id, apart from ours.
            pending.track_client(id.clone(), "tools/call", Rewrite::None, false);
            prop_assert!(pending.is_client_pending(&id));
        }
        // Another session's ids are not this one's.
        let (theirs, _rx) = Pending::new().own.register();
        prop_assert!(!pending.own.is_own(&theirs));
        // An answer to each own id, read off the wire, finds its waiter.
        for (id, _rx) in &receivers {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#, id.as_json());
            let env = Envelope::parse(line.as_bytes()).unwrap();
            let read = env.id.unwrap();
            prop_assert!(pending.own.is_own(&read));
            prop_assert!(pending.own.take(&read).is_some());
        }
        let distinct: HashSet<&String> = clients.iter().collect();
        prop_assert_eq!(pending.drain_client().len(), distinct.len());
    }
}

// ---------------------------------------------------------------------------------------------------
// The one-pass reading of a message

/// JSON whitespace, mostly none.
fn json_ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just(""), 1 => Just(" "), 1 => Just("\t"), 1 => Just("\n  "), 1 => Just("\r\n")]
}

/// A JSON string's text: any Unicode raw (but `"`, `\` and control characters), every escape JSON
/// has, `\u` escapes of any code unit in either case (lone and reversed surrogates among them).
fn json_string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[^\"\\\\\\x00-\\x1f]{1,6}",
        // Long runs, searched with memchr2 past the first 16 bytes.
        1 => "[^\"\\\\\\x00-\\x1f]{16,80}",
        1 => Just(r#"\""#.to_owned()),
        1 => Just(r"\\".to_owned()),
        1 => Just(r"\/".to_owned()),
        1 => "\\\\[bfnrt]",
        1 => (any::<u16>(), any::<bool>()).prop_map(|(u, upper)| {
            if upper { format!("\\u{u:04X}") } else { format!("\\u{u:04x}") }
        }),
        1 => Just(r"\ud800".to_owned()),
        1 => Just(r"\udc00\ud800".to_owned()),
        1 => Just(r"\ud83d\ude00".to_owned()),
        1 => Just(r"\u0000".to_owned()),
    ];
    proptest::collection::vec(piece, 0..5).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

/// A JSON number by its grammar, of any size.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,6})?([eE][+-]?[0-9]{1,4})?",
        Just("1e400".to_owned()),
        Just("-0".to_owned()),
    ]
}

/// Any JSON value, nested, spaced anyhow.
fn json_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        json_string(),
        json_number(),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            proptest::collection::vec((json_ws(), inner.clone(), json_ws()), 0..5).prop_map(|items| {
                let items: Vec<String> = items.iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                format!("[{}]", items.join(","))
            }),
            proptest::collection::vec(
                (json_ws(), json_string(), json_ws(), json_ws(), inner, json_ws()),
                0..5
            )
            .prop_map(|members| {
                let members: Vec<String> =
                    members.iter().map(|(a, k, b, c, v, d)| format!("{a}{k}{b}:{c}{v}{d}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
    .boxed()
}

const TOP_KEYS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

/// A JSON-RPC-like message and whether the scan must know it: its top-level members in any order
/// (each known member maybe, with likely and unlikely values), unknown members, spacing; then, now
/// and then, something the scan leaves to serde (a top-level key escaped or twice, nesting too deep
/// for it) or something no JSON reader takes (a byte changed, inserted or removed, a BOM, a second
/// value, a trailing comma).
fn scan_message() -> impl Strategy<Value = (String, bool)> {
    let known = (
        proptest::option::weighted(0.9, prop_oneof![3 => Just("\"2.0\"".to_owned()), 1 => json_value()]),
        proptest::option::weighted(
            0.7,
            prop_oneof![json_number(), json_string(), Just("null".to_owned()), json_value()],
        ),
        proptest::option::weighted(
            0.6,
            prop_oneof![Just("\"tools/call\"".to_owned()), json_string(), json_value()],
        ),
        proptest::option::of(json_value()),
        proptest::option::weighted(0.3, json_value()),
        proptest::option::weighted(0.2, json_value()),
    );
    let extras = proptest::collection::vec((prop_oneof!["x_[a-z]{0,4}", json_string()], json_value()), 0..3);
    (
        known,
        extras,
        proptest::collection::vec(json_ws(), 48),
        any::<proptest::sample::Index>(),
        0u8..13,
        any::<proptest::sample::Index>(),
        any::<u8>(),
    )
        .prop_map(|((j, i, m, p, r, e), extras, spaces, order, twist, at, byte)| {
            let mut clean = true;
            let mut members: Vec<(String, String)> = [j, i, m, p, r, e]
                .into_iter()
                .zip(TOP_KEYS)
                .filter_map(|(v, k)| v.map(|v| (format!("\"{k}\""), v)))
                .collect();
            for (key, value) in extras {
                let key = if key.starts_with('"') { key } else { format!("\"{key}\"") };
                let inner = &key[1..key.len() - 1];
                clean &= !inner.contains('\\') && !TOP_KEYS.contains(&inner);
                members.push((key, value));
            }
            if !members.is_empty() {
                let n = order.index(members.len());
                members.rotate_left(n);
            }
            match twist {
                // A top-level key escaped, or one twice.
                0 if members.first().is_some_and(|(k, _)| k.len() > 2) => {
                    let (key, _) = &mut members[0];
                    let first = key[1..].chars().next().unwrap();
                    let escaped: String =
                        first.encode_utf16(&mut [0; 2]).iter().map(|u| format!("\\u{u:04x}")).collect();
                    *key = format!("\"{escaped}{}", &key[1 + first.len_utf8()..]);
                    clean = false;
                }
                1 if !members.is_empty() => {
                    let first = members[0].clone();
                    clean &= !TOP_KEYS.contains(&&first.0[1..first.0.len() - 1]);
                    members.push(first);
                }
                // Deeper than the scan follows (serde reads it).
                2 => {
                    members.push(("\"deep\"".into(), format!("{}{}", "[".repeat(129), "]".repeat(129))));
                    clean = false;
                }
                _ => {}
            }
            let mut sp = spaces.iter().cycle();
            let mut text = sp.next().unwrap().to_string() + "{";
            for (n, (k, v)) in members.iter().enumerate() {
                if n > 0 {
                    text.push(',');
                }
                text.push_str(&format!(
                    "{}{k}{}:{}{v}{}",
                    sp.next().unwrap(),
                    sp.next().unwrap(),
                    sp.next().unwrap(),
                    sp.next().unwrap()
                ));
            }
            text.push('}');
            text.push_str(sp.next().unwrap());
            let mut bytes = text.into_bytes();
            match twist {
                // A byte changed, inserted, removed: mostly not JSON any more.
                3..=5 | 9 => {
                    let i = at.index(bytes.len() + 1);
                    match twist {
                        3 if i < bytes.len() => bytes[i] = byte & 0x7f,
                        // A control character, most often inside a string.
                        9 if i < bytes.len() => bytes[i] = byte % 0x20,
                        4 => bytes.insert(i, byte & 0x7f),
                        5 if i < bytes.len() => drop(bytes.remove(i)),
                        _ => {}
                    }
                    clean = false;
                }
                6 => {
                    bytes.splice(0..0, "\u{feff}".bytes());
                    clean = false;
                }
                7 => {
                    bytes.extend_from_slice(b"{}");
                    clean = false;
                }
                8 => {
                    let close = bytes.iter().rposition(|&b| b == b'}').unwrap();
                    bytes.insert(close, b',');
                    clean = false;
                }
                _ => {}
            }
            // An edit inside a multi-byte character: replaced, still some text to read.
            (String::from_utf8_lossy(&bytes).into_owned(), clean)
        })
}

proptest! {
    #![proptest_config(config(1024))]

    /// The one-pass reading of a message and serde_json's agree: when the scan knows, serde reads the
    /// same members (the same text at the same place, without the whitespace around it), and the
    /// envelope (kind, id, method, payloads, the id's place `with_id` writes over, every error) is the
    /// same whoever reads the message. The scan knows every valid message whose top-level keys are
    /// plain and distinct; it never takes what serde refuses.
    #[test]
    fn the_scan_reads_what_serde_reads((text, clean) in scan_message()) {
        let scanned = jsonrpc::scan::top_level(&text);
        if let Some(members) = scanned {
            let serde = jsonrpc::scan::top_level_with_serde(&text);
            prop_assert!(serde.is_ok(), "the scan took {:?}, serde refused it: {:?}", text, serde);
            let serde = serde.unwrap();
            prop_assert_eq!(members, serde);
            for (a, b) in members.iter().zip(&serde) {
                prop_assert_eq!(a.map(str::as_ptr), b.map(str::as_ptr));
                prop_assert!(a.is_none_or(|t| t.trim() == t));
            }
        }
        if clean {
            prop_assert!(scanned.is_some(), "the scan did not know {:?}", text);
        }
        let fast = Envelope::parse(text.as_bytes());
        let slow = Envelope::parse_with_serde(text.as_bytes());
        match (&fast, &slow) {
            (Ok(f), Ok(s)) => {
                prop_assert_eq!(f.kind, s.kind);
                prop_assert_eq!(&f.id, &s.id);
                prop_assert_eq!(f.method, s.method);
                let at = |r: Option<&RawValue>| r.map(|r| (r.get().to_owned(), r.get().as_ptr()));
                prop_assert_eq!(at(f.params), at(s.params));
                prop_assert_eq!(at(f.result), at(s.result));
                prop_assert_eq!(at(f.error), at(s.error));
                let other = Id::string("up-1");
                prop_assert_eq!(jsonrpc::with_id(f, &other), jsonrpc::with_id(s, &other));
            }
            (Err(f), Err(s)) => prop_assert_eq!(f, s),
            _ => prop_assert!(false, "{:?}: the scan's path {:?}, serde's {:?}", text, fast, slow),
        }
        // A message read once gives the same envelope again from that reading (the sidecar's steps
        // each take it), members at the same places, or the same error.
        match (jsonrpc::Message::read(text.as_bytes().to_vec()), &fast) {
            (Ok(message), Ok(f)) => {
                let again = message.envelope().expect("a read message has its envelope");
                let base = message.as_ptr() as usize;
                let at = |r: Option<&RawValue>| r.map(|r| (r.get().to_owned(), r.get().as_ptr() as usize - base));
                let was = |r: Option<&RawValue>| {
                    r.map(|r| (r.get().to_owned(), r.get().as_ptr() as usize - text.as_ptr() as usize))
                };
                prop_assert_eq!(again.kind, f.kind);
                prop_assert_eq!(&again.id, &f.id);
                prop_assert_eq!(again.method, f.method);
                prop_assert_eq!(at(again.params), was(f.params));
                prop_assert_eq!(at(again.result), was(f.result));
                prop_assert_eq!(at(again.error), was(f.error));
                let other = Id::string("up-1");
                prop_assert_eq!(jsonrpc::with_id(&again, &other), jsonrpc::with_id(f, &other));
            }
            (Err((_, e)), Err(f)) => prop_assert_eq!(&e, f),
            (read, _) => prop_assert!(false, "{:?}: read {:?}, parsed {:?}", text, read.map(|m| m.len()), fast),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Through the binary

thread_local! {
    static RAW_PROXY: RefCell<Option<Peer>> = const { RefCell::new(None) };
}

proptest! {
    #![proptest_config(config(128))]

    /// The same through the built proxy (tasks on) in front of an echo server: the answer carries the
    /// client's id exactly as sent, for ids of every kind, and the proxy's bookkeeping of the request
    /// does not change a byte.
    #[test]
    fn ids_of_every_kind_come_back_through_the_proxy(raw in client_id(), params in payload()) {
        RAW_PROXY.with(|cell| {
            let mut cell = cell.borrow_mut();
            let peer = cell.get_or_insert_with(|| {
                Peer::start(&["--log-level", "warn", "--", BIN, "test-server", "--raw"])
            });
            peer.send(&format!(r#"{{"jsonrpc":"2.0","id":{raw},"method":"raw/echo","params":{params}}}"#));
            let got = peer.next_line(WAIT).expect("an answer");
            prop_assert_eq!(got, format!("{{ \"result\" : {params}, \"id\":{raw},\"jsonrpc\":\"2.0\" }}"));
            Ok(())
        })?;
    }
}
