//! Newline-delimited framing for stdio transports, with a hard cap on a message's size.
//!
//! MCP's stdio transport is one JSON-RPC message per line. [`LineReader`] yields each line as bytes
//! (so the proxy can forward them unchanged) and, when a line is longer than the configured maximum,
//! discards it as it streams past instead of buffering it: a peer cannot exhaust our memory.
//! [`spawn_line_writer`] owns one output stream and writes whole lines, flushing when it runs out of
//! queued work so that bursts go out in one write. A consumer in this process takes lines through a
//! [`direct_line_sink`] instead, in the sender's task, with no stream between.

use crate::jsonrpc::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

/// One framed item read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its `\n` (or `\r\n`).
    Message(Vec<u8>),
    /// A line longer than the maximum (not counting its line ending); its bytes were discarded but the
    /// first [`HEAD_BYTES`], kept so the message's id can still be answered. `len` is its length.
    TooLong {
        /// How many bytes the line had.
        len: usize,
        /// Its first bytes (at most [`HEAD_BYTES`]).
        head: Vec<u8>,
    },
}

/// How much of an oversized line is kept (enough for `jsonrpc`, `id` and `method`).
pub const HEAD_BYTES: usize = 4096;

/// Reads newline-delimited messages of at most `max` bytes.
pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
    /// Bytes seen of a line being discarded because it is too long; `None` when not discarding.
    discarding: Option<usize>,
    /// The first bytes of the line being discarded.
    head: Vec<u8>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Wraps a reader; lines over `max` bytes are reported as [`Line::TooLong`].
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
            max,
            discarding: None,
            head: Vec::new(),
        }
    }

    /// The next non-empty line, or `None` at end of stream. A last line without a newline counts.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if let Some(len) = self.discarding.take() {
                    return Ok(Some(Line::TooLong { len, head: std::mem::take(&mut self.head) }));
                }
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    self.buf.clear();
                    return Ok(None);
                }
                return Ok(Some(Line::Message(std::mem::take(&mut self.buf))));
            }
            let (chunk, found) = match memchr::memchr(b'\n', available) {
                Some(i) => (i, true),
                None => (available.len(), false),
            };
            // A `\r` at the end of what is read so far may be the first half of a `\r\n`: it does not
            // count against the maximum (until more of the line follows it).
            let last = if chunk > 0 { available.get(chunk - 1) } else { self.buf.last() };
            let content = self.buf.len() + chunk - usize::from(last == Some(&b'\r'));
            match self.discarding.as_mut() {
                Some(seen) => {
                    *seen += chunk;
                    let room = HEAD_BYTES - self.head.len();
                    self.head.extend_from_slice(&available[..chunk.min(room)]);
                }
                None if content > self.max => {
                    self.discarding = Some(self.buf.len() + chunk);
                    let mut head = std::mem::take(&mut self.buf);
                    head.extend_from_slice(&available[..chunk.min(HEAD_BYTES)]);
                    head.truncate(HEAD_BYTES);
                    self.head = head;
                }
                None => self.buf.extend_from_slice(&available[..chunk]),
            }
            self.inner.consume(chunk + usize::from(found));
            if !found {
                continue;
            }
            if let Some(len) = self.discarding.take() {
                return Ok(Some(Line::TooLong { len, head: std::mem::take(&mut self.head) }));
            }
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                self.buf.clear();
                continue;
            }
            return Ok(Some(Line::Message(std::mem::take(&mut self.buf))));
        }
    }
}

/// One queued line, and whether the writer's [`Observer`] is to see it.
struct Outgoing {
    line: Message,
    observe: bool,
}

/// A handle to a line writer task (send lines, then close to flush and end the stream), or to a
/// consumer in this process that takes each line at once ([`direct_line_sink`]).
#[derive(Clone)]
pub struct LineSink {
    to: To,
}

#[derive(Clone)]
enum To {
    Writer(mpsc::Sender<Outgoing>),
    Direct(Arc<Direct>),
}

/// A consumer that takes each line at once, in the sender's task.
struct Direct {
    deliver: Deliver,
    observer: Option<Observer>,
    closed: AtomicBool,
    /// What closing it does besides refusing later lines (once).
    on_close: std::sync::Mutex<Option<OnClose>>,
}

/// Run once when a [`direct_line_sink`] is closed.
pub type OnClose = Box<dyn FnOnce() + Send>;

impl LineSink {
    /// Queues one message (without newline). Returns `false` when the stream is closed. A message
    /// already read ([`Message::read`]) reaches a direct consumer with its reading.
    pub async fn send(&self, line: impl Into<Message>) -> bool {
        self.send_as(Outgoing { line: line.into(), observe: true }).await
    }

    /// Queues one message the writer's observer does not need to see: its sender has already done
    /// what the observer would (telemetry measured the answer it forwards), so it is not read twice.
    pub async fn send_unobserved(&self, line: impl Into<Message>) -> bool {
        self.send_as(Outgoing { line: line.into(), observe: false }).await
    }

    async fn send_as(&self, out: Outgoing) -> bool {
        match &self.to {
            To::Writer(tx) => tx.send(out).await.is_ok(),
            To::Direct(direct) => {
                if direct.closed.load(Ordering::Acquire) {
                    return false;
                }
                if let Some(observe) = direct.observer.as_ref().filter(|_| out.observe) {
                    observe(&out.line);
                }
                (direct.deliver)(out.line)
            }
        }
    }
}

/// Closes a writer: the queued lines are written and flushed, then the stream is shut down. (A
/// direct sink is closed at once: later lines are refused.)
pub struct LineCloser {
    close: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
    direct: Option<Arc<Direct>>,
}

impl LineCloser {
    /// Asks the writer to finish after what is queued, and waits until it has.
    pub async fn close(&mut self) {
        if let Some(direct) = &self.direct {
            direct.closed.store(true, Ordering::Release);
            let on_close = direct.on_close.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(on_close) = on_close {
                on_close();
            }
        }
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        if let Some(done) = self.done.as_mut() {
            let _ = done.await;
        }
    }
}

/// Takes one line (without newline) for a [`direct_line_sink`]; `false` when its consumer is gone.
pub type Deliver = Arc<dyn Fn(Message) -> bool + Send + Sync>;

/// A sink whose lines go straight to `deliver`, in the sending task, with `observer` seeing each one
/// first: for a consumer in this process that only hands them on (the sidecar's HTTP streams, an
/// HTTP upstream's requests), so a line needs no writer task, no byte stream and no reading back
/// into lines. Closing it refuses later lines and runs `on_close`.
pub fn direct_line_sink(
    deliver: Deliver,
    observer: Option<Observer>,
    on_close: Option<OnClose>,
) -> (LineSink, LineCloser) {
    let on_close = std::sync::Mutex::new(on_close);
    let direct = Arc::new(Direct { deliver, observer, closed: AtomicBool::new(false), on_close });
    (
        LineSink { to: To::Direct(direct.clone()) },
        LineCloser { close: None, done: None, direct: Some(direct) },
    )
}

/// Sees each line just before it is written (telemetry watches the answers going to the client).
pub type Observer = std::sync::Arc<dyn Fn(&Message) + Send + Sync>;

/// Starts a task that writes lines to `out`; `capacity` bounds the queue so a slow reader pushes back.
pub fn spawn_line_writer<W>(out: W, capacity: usize) -> (LineSink, LineCloser)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    spawn_observed_line_writer(out, capacity, None)
}

/// [`spawn_line_writer`], with an observer called on the writer's task for every line.
pub fn spawn_observed_line_writer<W>(
    out: W,
    capacity: usize,
    observer: Option<Observer>,
) -> (LineSink, LineCloser)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(capacity);
    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut out = BufWriter::with_capacity(64 * 1024, out);
        let result: std::io::Result<()> = async {
            // Dropping the closer without closing leaves the writer to end with its last sink.
            let mut closer_alive = true;
            loop {
                let line = tokio::select! {
                    biased;
                    line = rx.recv() => line,
                    closed = &mut close_rx, if closer_alive => {
                        if closed.is_err() {
                            closer_alive = false;
                            continue;
                        }
                        // Drain what was queued before the close, then stop.
                        while let Ok(line) = rx.try_recv() {
                            write_line(&mut out, &line, observer.as_ref()).await?;
                        }
                        break;
                    }
                };
                let Some(line) = line else { break };
                write_line(&mut out, &line, observer.as_ref()).await?;
                // Coalesce a burst into one flush.
                while let Ok(line) = rx.try_recv() {
                    write_line(&mut out, &line, observer.as_ref()).await?;
                }
                out.flush().await?;
            }
            out.flush().await?;
            out.shutdown().await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "output stream closed");
        }
        let _ = done_tx.send(());
    });
    (LineSink { to: To::Writer(tx) }, LineCloser { close: Some(close_tx), done: Some(done_rx), direct: None })
}

async fn write_line<W: AsyncWrite + Unpin>(
    out: &mut W,
    line: &Outgoing,
    observer: Option<&Observer>,
) -> std::io::Result<()> {
    if let Some(observe) = observer.filter(|_| line.observe) {
        observe(&line.line);
    }
    out.write_all(line.line.bytes()).await?;
    out.write_all(b"\n").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_direct_sink_hands_each_line_on_in_order_until_closed() {
        let got = Arc::new(std::sync::Mutex::new(Vec::<bytes::Bytes>::new()));
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let into = got.clone();
        let deliver: Deliver = Arc::new(move |line| {
            into.lock().unwrap().push(line.into_bytes());
            true
        });
        let watched = seen.clone();
        let observer: Observer =
            Arc::new(move |line: &Message| watched.lock().unwrap().push(line.bytes().to_vec()));
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let on_close: OnClose = Box::new(move || flag.store(true, Ordering::SeqCst));
        let (sink, mut closer) = direct_line_sink(deliver, Some(observer), Some(on_close));
        assert!(sink.send(&b"one"[..]).await);
        assert!(sink.clone().send_unobserved(&b"two"[..]).await);
        assert!(sink.send(&b"three"[..]).await);
        assert_eq!(*got.lock().unwrap(), [&b"one"[..], b"two", b"three"]);
        // The observer sees what it is meant to, before the line goes on.
        assert_eq!(*seen.lock().unwrap(), [b"one".to_vec(), b"three".to_vec()]);
        assert!(!closed.load(Ordering::SeqCst));
        closer.close().await;
        assert!(closed.load(Ordering::SeqCst), "closing runs its hook");
        closer.close().await;
        assert!(!sink.send(&b"late"[..]).await, "a closed sink refuses lines");
        assert_eq!(got.lock().unwrap().len(), 3);
        // A consumer that is gone refuses them too.
        let (gone, _closer) = direct_line_sink(Arc::new(|_| false), None, None);
        assert!(!gone.send(&b"x"[..]).await);
    }

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_and_skips_blank_ones() {
        let got = lines(b"a\r\n\n  \nbb\ncc", 10).await;
        assert_eq!(
            got,
            vec![Line::Message(b"a".to_vec()), Line::Message(b"bb".to_vec()), Line::Message(b"cc".to_vec())]
        );
    }

    #[tokio::test]
    async fn too_long_lines_are_discarded_and_reading_goes_on() {
        let mut input = vec![b'x'; 200_000];
        input.extend_from_slice(b"\nok\n");
        input.extend(vec![b'y'; 11]);
        let got = lines(&input, 10).await;
        assert_eq!(
            got,
            vec![
                Line::TooLong { len: 200_000, head: vec![b'x'; HEAD_BYTES] },
                Line::Message(b"ok".to_vec()),
                Line::TooLong { len: 11, head: vec![b'y'; 11] }
            ]
        );
    }

    /// Reads `input` handed over in pieces of `size` bytes (a pipe delivers what each write held).
    async fn lines_in_pieces(input: &[u8], size: usize, max: usize) -> Vec<Line> {
        let (mut w, r) = tokio::io::duplex(size);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(size) {
                w.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut reader = LineReader::new(r, max);
        let mut out = Vec::new();
        while let Some(l) = reader.next_line().await.unwrap() {
            out.push(l);
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_maximum_passes_with_either_line_ending() {
        for input in [&b"abcd\nok\n"[..], b"abcd\r\nok\r\n", b"abcd\r\nok\r"] {
            for size in [1, 2, 5, 64] {
                let got = lines_in_pieces(input, size, 4).await;
                let want = vec![Line::Message(b"abcd".to_vec()), Line::Message(b"ok".to_vec())];
                assert_eq!(got, want, "{:?} in pieces of {size}", String::from_utf8_lossy(input));
            }
        }
        // A \r inside the line counts.
        assert!(matches!(lines(b"abcd\rx\n", 5).await[..], [Line::TooLong { len: 6, .. }]));
    }

    #[tokio::test]
    async fn the_head_of_a_too_long_line_does_not_depend_on_how_it_arrives() {
        let line = b"{\"jsonrpc\":\"2.0\",\"id\":42,\"method\":\"tools/call\"}\n";
        for size in [1, 3, 7, line.len()] {
            let got = lines_in_pieces(line, size, 8).await;
            let want = vec![Line::TooLong { len: line.len() - 1, head: line[..line.len() - 1].to_vec() }];
            assert_eq!(got, want, "in pieces of {size}");
        }
    }

    #[tokio::test]
    async fn writer_flushes_everything_on_close() {
        let (client, mut server) = tokio::io::duplex(1024);
        let (sink, mut closer) = spawn_line_writer(client, 4);
        for i in 0..100 {
            assert!(sink.send(format!("m{i}")).await);
        }
        let reader = tokio::spawn(async move {
            let mut s = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut server, &mut s).await.unwrap();
            s
        });
        closer.close().await;
        drop(sink);
        let text = reader.await.unwrap();
        assert_eq!(text.lines().count(), 100);
        assert!(text.ends_with("m99\n"));
    }
}
