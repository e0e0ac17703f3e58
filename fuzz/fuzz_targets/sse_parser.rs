//! The SSE parser: any bytes, cut into pieces of any size (the first input byte picks it), give the
//! same events, last event id, retry hint and progress as the whole stream at once, without a panic;
//! and the seen-ids set never lets an id through twice.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_asyncify::transport::sse::{SeenIds, SseParser};

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else { return };
    let mut whole = SseParser::default();
    let mut events = Vec::new();
    whole.feed(stream, &mut events);

    let mut pieces = SseParser::default();
    let mut again = Vec::new();
    for piece in stream.chunks(usize::from(control % 16) + 1) {
        pieces.feed(piece, &mut again);
    }
    assert_eq!(events, again);
    assert_eq!(whole.last_event_id, pieces.last_event_id);
    assert_eq!(whole.retry, pieces.retry);
    assert_eq!(whole.blocks, pieces.blocks);

    // A reconnection in the middle forgets the partial event and keeps the last id.
    let last = pieces.last_event_id.clone();
    pieces.new_connection();
    assert_eq!(pieces.last_event_id, last);
    pieces.feed(stream, &mut again);

    let mut seen = SeenIds::default();
    for event in &events {
        assert!(!event.data.is_empty(), "an event without data is not dispatched");
        if let Some(id) = &event.id {
            seen.insert(id);
            assert!(!seen.insert(id), "an id seen once is seen");
        }
    }
});
