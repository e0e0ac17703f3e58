//! The session's side of the upstream, as lines, without pipes or relay tasks between.
//!
//! The session writes upstream-bound lines into a [`LinesUp`]: each complete line is posted on a task
//! of its own the moment it is written (concurrent: a slow call never holds up another). The
//! sidecar's sessions hand it whole lines ([`LinesUp::into_direct`]), the stdio wrapper a byte
//! stream it splits. The upstream's lines queue in a channel that [`LinesDown`] reads, a newline
//! after each, or hands over as whole messages, read where they arrived ([`LinesDown::next`], the
//! sidecar's). A byte pipe
//! and a line-reading task in each direction did the same with two more thread hand-offs and two
//! more copies per message; on the sidecar's hop to an HTTP upstream those hand-offs were most of
//! the cost.

use super::{DRAIN_TIMEOUT, FAILED, Inner, MAX_MESSAGE};
use crate::jsonrpc::{self, Message};
use crate::transport::lines::{Deliver, HEAD_BYTES, Line, LineCloser, LineSink, OnClose, direct_line_sink};
use bytes::{Buf, Bytes};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Where the upstream's lines go: toward the session's reader ([`LinesDown`]).
#[derive(Clone)]
pub(super) struct ToSession {
    tx: mpsc::Sender<Message>,
}

impl ToSession {
    /// Queues one line (without newline), waiting while the session is behind. Returns `false` when
    /// the session no longer reads.
    pub(super) async fn send(&self, line: impl Into<Message>) -> bool {
        self.tx.send(line.into()).await.is_ok()
    }
}

/// A channel toward the session, holding at most `capacity` lines: its sending side, the reader the
/// session reads, and the switch that ends the reader once what was queued is read.
pub(super) fn to_session(capacity: usize) -> (ToSession, LinesDown, oneshot::Sender<()>) {
    let (tx, rx) = mpsc::channel(capacity);
    let (end, ended) = oneshot::channel();
    (ToSession { tx }, LinesDown { rx, ended: Some(ended), current: Bytes::new(), newline_due: false }, end)
}

/// The upstream's lines as a byte stream, each followed by `\n`; ends after the end switch is
/// flipped (or dropped) and the queue is read, or when every sender is gone.
pub(super) struct LinesDown {
    rx: mpsc::Receiver<Message>,
    ended: Option<oneshot::Receiver<()>>,
    /// What is left of the line being read out.
    current: Bytes,
    /// The line in `current` was read out but its newline was not.
    newline_due: bool,
}

impl LinesDown {
    /// The next line, for a session in this process that takes whole messages (no byte stream, no
    /// reading back into lines): what [`AsyncRead`] reads, one message at a time. `None` at the same
    /// end. Not to be mixed with reading bytes.
    pub(super) async fn next(&mut self) -> Option<Message> {
        loop {
            let Some(ended) = self.ended.as_mut() else { return self.rx.recv().await };
            tokio::select! {
                biased;
                line = self.rx.recv() => return line,
                _ = ended => {
                    // Read what was queued before the end, then end; later lines are refused.
                    self.ended = None;
                    self.rx.close();
                }
            }
        }
    }
}

impl AsyncRead for LinesDown {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        loop {
            if !this.current.is_empty() {
                let n = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current[..n]);
                this.current.advance(n);
                this.newline_due = this.current.is_empty();
            }
            if this.newline_due && buf.remaining() > 0 {
                buf.put_slice(b"\n");
                this.newline_due = false;
            }
            if buf.remaining() == 0 || !this.current.is_empty() || this.newline_due {
                return Poll::Ready(Ok(()));
            }
            // Everything queued goes out in one read, so the session reads a burst at once.
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(line)) => {
                    this.current = line.into_bytes();
                    // An empty line still gets its newline (the reader skips it, like a pipe's).
                    this.newline_due = true;
                    continue;
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {}
            }
            if let Some(ended) = this.ended.as_mut()
                && Pin::new(ended).poll(cx).is_ready()
            {
                // Read what was queued before the end, then end; later lines are refused.
                this.ended = None;
                this.rx.close();
                continue;
            }
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
    }
}

/// Splits a written byte stream into lines as [`crate::transport::lines::LineReader`] reads them: `\n`
/// or `\r\n` endings, blank lines skipped, a last line without a newline counted at the end, and a
/// line over `max` bytes discarded as it streams past, its first [`HEAD_BYTES`] kept.
struct Splitter {
    max: usize,
    /// The line being written, until its newline comes.
    partial: Vec<u8>,
    /// Bytes of a line being discarded because it is over `max`; `None` when not discarding.
    discarding: Option<usize>,
    /// The first bytes of the line being discarded (for its id).
    head: Vec<u8>,
}

impl Splitter {
    fn new(max: usize) -> Splitter {
        Splitter { max, partial: Vec::new(), discarding: None, head: Vec::new() }
    }

    /// Takes in written bytes: pushes each line they complete onto `out`, keeps the rest.
    fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Line>) {
        while let Some(at) = memchr::memchr(b'\n', bytes) {
            let (chunk, rest) = (&bytes[..at], &bytes[at + 1..]);
            bytes = rest;
            if self.discarding.is_some() {
                self.discard(chunk);
                out.push(self.too_long());
            } else if self.partial.is_empty() {
                // The usual case: the whole line is in this write; one copy.
                self.line(chunk.to_vec(), out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(chunk);
                self.line(line, out);
            }
        }
        if bytes.is_empty() {
            return;
        }
        if self.discarding.is_some() {
            self.discard(bytes);
        } else if self.partial.len() + bytes.len() > self.max.saturating_add(1) {
            // Over the maximum even if its last byte is the `\r` of a `\r\n`: discard it as it streams.
            let mut head = std::mem::take(&mut self.partial);
            let seen = head.len() + bytes.len();
            head.extend_from_slice(&bytes[..bytes.len().min(HEAD_BYTES)]);
            head.truncate(HEAD_BYTES);
            self.head = head;
            self.discarding = Some(seen);
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// The end of the stream: a last line without a newline.
    fn finish(&mut self, out: &mut Vec<Line>) {
        if self.discarding.is_some() {
            out.push(self.too_long());
        } else if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(last, out);
        }
    }

    /// More of a line being discarded: counted, and its first bytes kept.
    fn discard(&mut self, bytes: &[u8]) {
        let room = HEAD_BYTES.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if let Some(seen) = self.discarding.as_mut() {
            *seen += bytes.len();
        }
    }

    /// One complete line (without its `\n`), unless blank.
    fn line(&mut self, mut line: Vec<u8>, out: &mut Vec<Line>) {
        let content = line.len() - usize::from(line.last() == Some(&b'\r'));
        if content > self.max {
            self.discarding = Some(line.len());
            line.truncate(HEAD_BYTES);
            self.head = line;
            return out.push(self.too_long());
        }
        line.truncate(content);
        if !line.iter().all(u8::is_ascii_whitespace) {
            out.push(Line::Message(line));
        }
    }

    fn too_long(&mut self) -> Line {
        let len = self.discarding.take().unwrap_or(0);
        Line::TooLong { len, head: std::mem::take(&mut self.head) }
    }
}

/// The session's upstream-bound byte stream: each complete line is posted at once, on a task of its
/// own. Shutting it down (or dropping it) ends the session: a last line without a newline is posted
/// too, in-flight requests get [`DRAIN_TIMEOUT`] to finish, the session is closed upstream, and then
/// the reader ([`LinesDown`]) ends.
pub(super) struct LinesUp {
    inner: Arc<Inner>,
    splitter: Splitter,
    /// The lines of one write (kept for its allocation).
    lines: Vec<Line>,
    in_flight: JoinSet<()>,
    /// Flipped once the session's end has been handled; `None` after.
    end: Option<oneshot::Sender<()>>,
    runtime: tokio::runtime::Handle,
}

impl LinesUp {
    /// Must be called within a Tokio runtime.
    pub(super) fn new(inner: Arc<Inner>, end: oneshot::Sender<()>) -> LinesUp {
        LinesUp {
            inner,
            splitter: Splitter::new(MAX_MESSAGE),
            lines: Vec::new(),
            in_flight: JoinSet::new(),
            end: Some(end),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Posts one message on a task of its own (the finished ones are let go first).
    fn spawn_post(&mut self, line: Message) {
        while self.in_flight.try_join_next().is_some() {}
        self.in_flight.spawn_on(self.inner.clone().deliver(line), &self.runtime);
    }

    /// Posts each line, or answers an oversized request with an error.
    fn send(&mut self, mut lines: Vec<Line>) {
        for line in lines.drain(..) {
            match line {
                Line::Message(line) => self.spawn_post(Message::from(line)),
                Line::TooLong { len, head } => {
                    let (id, is_call) = jsonrpc::sniff_head(&head);
                    tracing::warn!(
                        bytes = len,
                        max = MAX_MESSAGE,
                        "not sending an oversized message upstream"
                    );
                    if let (Some(id), true) = (id, is_call) {
                        let msg =
                            format!("the message is {len} bytes, over the maximum of {MAX_MESSAGE} bytes");
                        let out = self.inner.out.clone();
                        let answer = async move {
                            out.send(jsonrpc::error_response(Some(&id), FAILED, &msg, None)).await;
                        };
                        self.in_flight.spawn_on(answer, &self.runtime);
                    }
                }
            }
        }
        self.lines = lines;
    }

    /// The sink a session in this process writes its upstream-bound lines to: each line is posted at
    /// once, in the sender's task, without a writer task, a byte stream and the splitting of it back
    /// into lines; closing the sink (or dropping every handle to it) ends the session as a shutdown
    /// of the stream does.
    pub(super) fn into_direct(self) -> (LineSink, LineCloser) {
        let up = Arc::new(std::sync::Mutex::new(self));
        let sending = up.clone();
        let deliver: Deliver =
            Arc::new(move |line: Message| sending.lock().unwrap_or_else(|e| e.into_inner()).post(line));
        let on_close: OnClose = Box::new(move || up.lock().unwrap_or_else(|e| e.into_inner()).finish());
        direct_line_sink(deliver, None, Some(on_close))
    }

    /// Posts one whole line, framed by the splitter's own rule for a complete line (an oversized one
    /// is answered, a blank one skipped); `false` once the session has ended. A message the session
    /// has read (a JSON object, so not blank) within the size goes as it is, with its reading.
    fn post(&mut self, line: Message) -> bool {
        if self.end.is_none() {
            return false;
        }
        if line.is_read() && line.len() <= self.splitter.max {
            self.spawn_post(line);
            return true;
        }
        let mut lines = std::mem::take(&mut self.lines);
        self.splitter.line(Vec::from(line.into_bytes()), &mut lines);
        self.send(lines);
        true
    }

    /// The session ended its side: the last line, then the drain and the close, on a task.
    fn finish(&mut self) {
        let Some(end) = self.end.take() else { return };
        let mut lines = std::mem::take(&mut self.lines);
        self.splitter.finish(&mut lines);
        self.send(lines);
        let in_flight = std::mem::take(&mut self.in_flight);
        self.runtime.spawn(end_session(self.inner.clone(), in_flight, end));
    }
}

/// Lets in-flight requests finish (for [`DRAIN_TIMEOUT`] at most), closes the upstream session, and
/// ends the session's reader once what was queued for it is read.
async fn end_session(inner: Arc<Inner>, mut in_flight: JoinSet<()>, end: oneshot::Sender<()>) {
    tracing::debug!(in_flight = in_flight.len(), "the session is ending; finishing in-flight requests");
    let drained =
        tokio::time::timeout(DRAIN_TIMEOUT, async { while in_flight.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = in_flight.len(),
            "requests still in flight {} s after the session ended; abandoning them",
            DRAIN_TIMEOUT.as_secs()
        );
        in_flight.shutdown().await;
    }
    inner.close().await;
    let _ = end.send(());
}

impl AsyncWrite for LinesUp {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.end.is_none() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the session has ended")));
        }
        let mut lines = std::mem::take(&mut self.lines);
        self.splitter.push(buf, &mut lines);
        self.send(lines);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LinesUp {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::lines::LineReader;
    use tokio::io::AsyncReadExt;

    /// What `LineReader` (the reader of a pipe) makes of `bytes`.
    async fn read_lines(bytes: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(bytes, max);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await.expect("reading a slice") {
            lines.push(line);
        }
        lines
    }

    /// What the splitter makes of `bytes` written in the pieces that `cuts` mark.
    fn split_lines(bytes: &[u8], cuts: &[usize], max: usize) -> Vec<Line> {
        let mut splitter = Splitter::new(max);
        let mut lines = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            splitter.push(&bytes[from..cut], &mut lines);
            from = cut;
        }
        splitter.finish(&mut lines);
        lines
    }

    #[tokio::test]
    async fn the_splitter_frames_written_bytes_as_a_pipes_reader_would_in_any_pieces() {
        let inputs: [&[u8]; 9] = [
            b"{\"a\":1}\n{\"b\":2}\n",
            b"{\"a\":1}\r\n\r\n  \n{\"b\":2}",
            b"0123456789\n01234567890\n0123456789\r\n01234567890\r\nok\n",
            b"a very long line indeed\nshort\nanother one far too long\r\n",
            b"\n\n\r\n",
            b"tail without newline\r",
            b"exactly10!",
            b"elevenbytes",
            b"x\r\r\n012345678\r\r\n",
        ];
        for input in inputs {
            let expected = read_lines(input, 10).await;
            assert_eq!(
                split_lines(input, &[], 10),
                expected,
                "{:?} in one write",
                String::from_utf8_lossy(input)
            );
            for a in 0..=input.len() {
                for b in a..=input.len() {
                    assert_eq!(
                        split_lines(input, &[a, b], 10),
                        expected,
                        "{:?} cut at {a} and {b}",
                        String::from_utf8_lossy(input)
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_line_keeps_only_its_head() {
        let mut line = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"x":""#.to_vec();
        line.resize(3 * HEAD_BYTES, b'x');
        line.extend_from_slice(b"\"}}\nnext\n");
        let lines = split_lines(&line, &[100, HEAD_BYTES + 5], 2 * HEAD_BYTES);
        assert_eq!(lines, read_lines(&line, 2 * HEAD_BYTES).await);
        let Line::TooLong { len, head } = &lines[0] else { panic!("not too long: {lines:?}") };
        assert_eq!((*len, head.len()), (3 * HEAD_BYTES + 3, HEAD_BYTES));
        let (id, is_call) = jsonrpc::sniff_head(head);
        assert_eq!((id.as_ref().map(|id| id.as_json()), is_call), (Some("7"), true));
        assert_eq!(lines[1], Line::Message(b"next".to_vec()));
    }

    #[tokio::test]
    async fn the_session_reads_each_line_with_its_newline_and_everything_queued_before_the_end() {
        let (to, mut down, end) = to_session(4);
        assert!(to.send(Bytes::from_static(b"{\"a\":1}")).await);
        assert!(to.send(Bytes::from_static(b"{\"b\":2}")).await);
        let mut buf = [0u8; 5];
        let n = down.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"{\"a\":");
        end.send(()).expect("the reader is there");
        assert!(to.send(Bytes::from_static(b"{\"c\":3}")).await, "queued before the reader saw the end");
        let mut rest = Vec::new();
        down.read_to_end(&mut rest).await.expect("read to the end");
        assert_eq!(rest, b"1}\n{\"b\":2}\n{\"c\":3}\n");
        assert!(!to.send(Bytes::from_static(b"{\"d\":4}")).await, "refused after the end");
    }
}
