//! Server-Sent Events (`text/event-stream`, the WHATWG rules) as the Streamable HTTP upstream reads
//! them: an incremental [`SseParser`] fed whatever chunks the body arrives in, and [`SeenIds`], the
//! ids already relayed on a stream, so that a resumption that replays an event does not relay it twice.
//!
//! Both are plain data with no I/O, so they are tested (and fuzzed) on their own.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

/// The largest event (its `data` lines together, or one line) kept; a larger one is skipped. The same
/// bound as the HTTP upstream's largest message.
pub const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;
/// The UTF-8 byte order mark, which a stream may start with.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// The longest `retry:` hint of a server we honour.
const RETRY_HINT_MAX: Duration = Duration::from_secs(60);

/// One dispatched SSE event.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id` field of the event's own block, if it had one.
    pub id: Option<String>,
    /// The `data` lines, joined with `\n`.
    pub data: Vec<u8>,
}

/// An incremental parser of `text/event-stream` (the WHATWG rules): events end at a blank line,
/// `data:` lines join with `\n`, comments are skipped, and the last event id and `retry:` persist
/// across reconnections. Only `message` events (the default type) are dispatched.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    /// The first bytes of a stream while they may still be a byte order mark that came in pieces.
    start: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    oversized: bool,
    event: Vec<u8>,
    block_id: Option<String>,
    block_has_fields: bool,
    id_buffer: Option<String>,
    /// The id to resume from (`Last-Event-ID`).
    pub last_event_id: Option<String>,
    /// The server's reconnection delay.
    pub retry: Option<Duration>,
    /// How many blocks with fields were complete (progress, for resumption).
    pub blocks: u64,
}

impl SseParser {
    /// Forgets a partial event: a new connection starts clean (the last event id stays).
    pub fn new_connection(&mut self) {
        self.line.clear();
        self.after_cr = false;
        self.started = false;
        self.start.clear();
        self.data.clear();
        self.has_data = false;
        self.oversized = false;
        self.event.clear();
        self.block_id = None;
        self.block_has_fields = false;
        self.id_buffer = self.last_event_id.clone();
    }

    /// Feeds bytes; complete events are pushed onto `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        if self.started {
            return self.feed_started(chunk, out);
        }
        // A stream may begin with a byte order mark, to be skipped, and its three bytes may come in
        // different chunks: hold the first bytes until they are known to be one or not.
        let mut start = std::mem::take(&mut self.start);
        start.extend_from_slice(chunk);
        if start.len() < BOM.len() && BOM.starts_with(&start) {
            self.start = start;
            return;
        }
        self.started = true;
        self.feed_started(start.strip_prefix(BOM).unwrap_or(&start), out);
    }

    fn feed_started(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) {
        while !chunk.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', chunk) {
                // The usual case: the whole line is in this chunk, read where it stands.
                Some(i) if self.line.is_empty() && i <= MAX_EVENT_BYTES => {
                    self.after_cr = chunk[i] == b'\r';
                    self.field(&chunk[..i], out);
                    chunk = &chunk[i + 1..];
                }
                Some(i) => {
                    self.push_line_bytes(&chunk[..i]);
                    self.after_cr = chunk[i] == b'\r';
                    chunk = &chunk[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.field(&line, out);
                    self.line = line;
                    self.line.clear();
                }
                None => {
                    self.push_line_bytes(chunk);
                    chunk = &[];
                }
            }
        }
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            self.oversized = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// One complete line (without its ending).
    fn field(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return; // a comment (keep-alive)
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                self.block_has_fields = true;
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.oversized = true;
                } else {
                    // Sized for this line and its "\n" at once (most events have one data line).
                    self.data.reserve(value.len() + 1);
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                }
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"id" if !value.contains(&0) => {
                self.block_has_fields = true;
                let id = String::from_utf8_lossy(value);
                // The buffer keeps its allocation from one event to the next.
                let buffer = self.id_buffer.get_or_insert_with(String::new);
                buffer.clear();
                buffer.push_str(&id);
                self.block_id = Some(id.into_owned());
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()) {
                    self.retry = Some(Duration::from_millis(ms).min(RETRY_HINT_MAX));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        self.last_event_id.clone_from(&self.id_buffer);
        if self.block_has_fields {
            self.blocks += 1;
        }
        let id = self.block_id.take();
        let mut data = std::mem::take(&mut self.data);
        let (has_data, oversized) = (self.has_data, self.oversized);
        self.has_data = false;
        self.oversized = false;
        self.block_has_fields = false;
        // (The type's buffer is kept for the next event.)
        let other_type = (!self.event.is_empty() && self.event != b"message")
            .then(|| String::from_utf8_lossy(&self.event).into_owned());
        self.event.clear();
        if oversized {
            tracing::warn!(
                max = MAX_EVENT_BYTES,
                "skipped an SSE event from the upstream over the maximum size"
            );
            return;
        }
        if !has_data || data.len() <= 1 {
            return; // no data (a priming event, say): nothing to dispatch
        }
        data.pop(); // the last "\n"
        if let Some(event) = other_type {
            tracing::debug!(event, "skipped an SSE event of another type");
            return;
        }
        out.push(SseEvent { id, data });
    }
}

/// The ids of the events already relayed on one stream, so that a resumption replaying one is not
/// relayed twice. Bounded.
#[derive(Default)]
pub struct SeenIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl SeenIds {
    const MAX: usize = 4096;

    /// Records `id`; false if it was seen before.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == Self::MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> (Vec<SseEvent>, SseParser) {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        (out, parser)
    }

    #[test]
    fn sse_events_data_ids_comments_and_retry() {
        let (events, parser) = parse(&[
            b": keep-alive\n\nid: 0\nretry: 250\ndata:\n\n",
            b"id: 1\ndata: {\"a\":\ndata: 1}\n\n",
            b"event: other\ndata: x\n\ndata:{\"b\":2}\r\n\r",
            b"\nid: 7\n",
        ]);
        assert_eq!(
            events,
            vec![
                SseEvent { id: Some("1".into()), data: b"{\"a\":\n1}".to_vec() },
                SseEvent { id: None, data: b"{\"b\":2}".to_vec() },
            ]
        );
        // The unfinished block's id is not the last event id until its blank line.
        assert_eq!(parser.last_event_id.as_deref(), Some("1"));
        assert_eq!(parser.retry, Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_byte_order_mark_in_pieces_is_still_skipped() {
        let text = b"\xEF\xBB\xBFdata: {\"x\":1}\n\n";
        for cut in 0..text.len() {
            let (events, _) = parse(&[&text[..cut], &text[cut..]]);
            assert_eq!(events, vec![SseEvent { id: None, data: b"{\"x\":1}".to_vec() }], "cut at {cut}");
        }
        let one_by_one: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse(&one_by_one).0.len(), 1);
        // Bytes that only begin like one are the stream's own.
        let (events, _) = parse(&[b"\xEF", b"data: y\n\n"]);
        assert!(events.is_empty(), "\\xEFdata is not a data field");
        let (events, _) = parse(&[b"d", b"ata: y\n\n"]);
        assert_eq!(events, vec![SseEvent { id: None, data: b"y".to_vec() }]);
    }

    #[test]
    fn sse_split_anywhere() {
        let text = b"id: 3/9\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        for cut in 0..text.len() {
            let (events, parser) = parse(&[&text[..cut], &text[cut..]]);
            assert_eq!(events.len(), 1, "cut at {cut}");
            assert_eq!(parser.last_event_id.as_deref(), Some("3/9"));
        }
    }
}
