//! One message's bytes with, once they are read, where its envelope stands in them: a message is read
//! once, where it comes in or where its envelope is first wanted, and every later step that needs its
//! envelope (the routing, the HTTP upstream's POST, the HTTP streams, the telemetry) has it again
//! without another pass over the text.

use super::{Envelope, Id, Kind, ParseError, scan};
use bytes::Bytes;
use std::ops::Range;
use std::sync::OnceLock;

/// A message (one line, without its newline), and its envelope's place in it once it has been read
/// (or why it is not a message). The bytes never change, so what was read of them stays true.
#[derive(Clone)]
pub struct Message {
    bytes: Bytes,
    /// Boxed: a message moves through channels and waits in futures, which stay smaller so.
    shape: OnceLock<Result<Box<Shape>, ParseError>>,
}

/// Where an envelope's members stand in the text it was read from.
#[derive(Debug, Clone)]
struct Shape {
    kind: Kind,
    id: Option<Id>,
    method: Option<Range<usize>>,
    params: Option<Range<usize>>,
    result: Option<Range<usize>>,
    error: Option<Range<usize>>,
    raw_id: Option<Range<usize>>,
}

impl Message {
    /// Reads `bytes` as a JSON-RPC message and keeps what it read; `Err` says why it is not one,
    /// beside the message (which keeps that reading too).
    pub fn read(bytes: impl Into<Bytes>) -> Result<Message, (Message, ParseError)> {
        let message = Message::read_or_keep(bytes);
        match message.shape.get() {
            Some(Err(e)) => {
                let e = e.clone();
                Err((message, e))
            }
            _ => Ok(message),
        }
    }

    /// Reads `bytes` as [`Message::read`] does, keeping them (and why they are not a message) when
    /// they are not one.
    pub fn read_or_keep(bytes: impl Into<Bytes>) -> Message {
        let message = Message::from(bytes.into());
        message.reading();
        message
    }

    /// What was read of the bytes, read now if nobody read them yet.
    fn reading(&self) -> &Result<Box<Shape>, ParseError> {
        self.shape.get_or_init(|| Envelope::parse(&self.bytes).map(|env| Box::new(Shape::of(&env))))
    }

    /// The envelope: from what was read, or read now (and kept) if it was not.
    pub fn envelope(&self) -> Result<Envelope<'_>, ParseError> {
        match self.reading() {
            Ok(shape) => match shape.envelope(&self.bytes) {
                Some(env) => Ok(env),
                None => Envelope::parse(&self.bytes),
            },
            Err(e) => Err(e.clone()),
        }
    }

    /// Whether it was read, and is a message (its envelope is had again without a pass over the
    /// text).
    pub fn is_read(&self) -> bool {
        self.shape.get().is_some_and(Result::is_ok)
    }

    /// The message's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The message's bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("bytes", &String::from_utf8_lossy(&self.bytes))
            .field("read", &self.shape.get().map(|r| r.is_ok()))
            .finish()
    }
}

impl std::ops::Deref for Message {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Bytes not read yet (they are read where an envelope is first wanted).
impl From<Bytes> for Message {
    fn from(bytes: Bytes) -> Message {
        Message { bytes, shape: OnceLock::new() }
    }
}

impl From<Vec<u8>> for Message {
    fn from(bytes: Vec<u8>) -> Message {
        Message::from(Bytes::from(bytes))
    }
}

impl From<String> for Message {
    fn from(text: String) -> Message {
        Message::from(Bytes::from(text))
    }
}

impl From<&'static [u8]> for Message {
    fn from(bytes: &'static [u8]) -> Message {
        Message::from(Bytes::from_static(bytes))
    }
}

impl From<&'static str> for Message {
    fn from(text: &'static str) -> Message {
        Message::from(Bytes::from_static(text.as_bytes()))
    }
}

impl Shape {
    fn of(env: &Envelope<'_>) -> Shape {
        let text = env.text;
        let at = |part: &str| {
            let start = part.as_ptr() as usize - text.as_ptr() as usize;
            start..start + part.len()
        };
        Shape {
            kind: env.kind,
            id: env.id.clone(),
            method: env.method.map(at),
            params: env.params.map(|p| at(p.get())),
            result: env.result.map(|r| at(r.get())),
            error: env.error.map(|e| at(e.get())),
            raw_id: env.raw_id.map(at),
        }
    }

    /// The envelope again, over the bytes it was read from (only those: [`Message`] keeps the two
    /// together, and its bytes never change). `None` only if a member cannot be made a `RawValue`
    /// without reading it (see `scan::trusted_raw`): the caller reads the text again.
    fn envelope<'a>(&self, bytes: &'a [u8]) -> Option<Envelope<'a>> {
        // SAFETY: this shape was made by reading these very bytes as an envelope, which proved them
        // UTF-8 (`Envelope::parse` refuses anything else), and a `Message`'s bytes never change.
        let text = unsafe { std::str::from_utf8_unchecked(bytes) };
        let raw = |range: &Option<Range<usize>>| match range {
            Some(r) => scan::trusted_raw(text.get(r.clone())?).map(Some),
            None => Some(None),
        };
        Some(Envelope {
            kind: self.kind,
            id: self.id.clone(),
            method: match &self.method {
                Some(r) => Some(text.get(r.clone())?),
                None => None,
            },
            params: raw(&self.params)?,
            result: raw(&self.result)?,
            error: raw(&self.error)?,
            text,
            raw_id: match &self.raw_id {
                Some(r) => Some(text.get(r.clone())?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope had again is the one read, member for member.
    fn same(a: &Envelope<'_>, b: &Envelope<'_>) {
        assert_eq!(a.kind, b.kind);
        assert_eq!(a.id, b.id);
        assert_eq!(a.method, b.method);
        assert_eq!(a.params.map(|p| p.get()), b.params.map(|p| p.get()));
        assert_eq!(a.result.map(|p| p.get()), b.result.map(|p| p.get()));
        assert_eq!(a.error.map(|p| p.get()), b.error.map(|p| p.get()));
        assert_eq!(a.raw_id, b.raw_id);
        assert_eq!(a.text, b.text);
    }

    #[test]
    fn a_read_message_gives_its_envelope_again_without_reading() {
        let lines: [&[u8]; 6] = [
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#,
            br#" { "method" : "notifications/progress" , "params" : { "progressToken" : "\u00e9" }, "jsonrpc":"2.0" } "#,
            br#"{"jsonrpc":"2.0","id":"a\"b","result":{"content":[]}}"#,
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#,
            // Escapes in a key: read by serde, whose members point into the same text.
            br#"{"jsonrpc":"2.0","id":1,"m\u0065thod":"ping"}"#,
            br#"{"jsonrpc":"2.0","id":18446744073709551616,"method":"ping","params":null}"#,
        ];
        for line in lines {
            let message = Message::read(line).expect("a message");
            assert!(message.is_read());
            let shape = message.shape.get().unwrap().as_ref().unwrap();
            let again = shape.envelope(message.bytes()).expect("had again");
            same(&again, &Envelope::parse(line).unwrap());
            // A copy of the bytes is read where its envelope is first wanted, once: the same envelope.
            let copy = Message::from(line.to_vec());
            assert!(!copy.is_read());
            same(&copy.envelope().unwrap(), &message.envelope().unwrap());
            assert!(copy.is_read(), "the reading is kept");
            same(&copy.clone().envelope().unwrap(), &message.envelope().unwrap());
            // The id is written in the same place.
            let id = Id::string("new");
            assert_eq!(
                super::super::with_id(&message.envelope().unwrap(), &id),
                super::super::with_id(&Envelope::parse(line).unwrap(), &id)
            );
        }
    }

    #[test]
    fn what_is_not_a_message_is_kept_unread_and_says_why_when_asked() {
        let (kept, e) = Message::read(&b"not json"[..]).unwrap_err();
        assert_eq!(&kept.bytes()[..], b"not json");
        assert_eq!(e.code(), crate::jsonrpc::code::PARSE_ERROR);
        let kept = Message::read_or_keep(&b"[1]"[..]);
        assert!(!kept.is_read());
        assert_eq!(kept.envelope().unwrap_err(), ParseError::Batch);
        assert_eq!(kept.envelope().unwrap_err(), ParseError::Batch, "the same error, kept");
        assert_eq!(kept.into_bytes(), Bytes::from_static(b"[1]"));
    }
}
