//! The session's two inputs read as messages: a client's or an upstream's byte stream split into
//! lines under the size cap (an oversized line is answered or turned into the error that ends its
//! request), or an HTTP upstream's messages, already read, under the same cap.

use super::Router;
use crate::jsonrpc::{self, code};
use crate::transport::http_upstream::UpstreamLines;
use crate::transport::lines::{HEAD_BYTES, Line, LineReader};
use tokio::io::AsyncRead;

impl Router {
    /// Reads client messages until the client's stream ends.
    pub async fn pump_client<R: AsyncRead + Unpin>(&self, input: R) {
        let mut reader = LineReader::new(input, self.max_message_bytes);
        loop {
            match reader.next_line().await {
                Ok(Some(Line::Message(line))) => self.route_client(line.into()).await,
                Ok(Some(Line::TooLong { len, head })) => {
                    let (id, is_call) = jsonrpc::sniff_head(&head);
                    tracing::warn!(
                        bytes = len,
                        max = self.max_message_bytes,
                        id = ?id,
                        "refused an oversized message from the client"
                    );
                    // A request gets its answer under its own id, so it does not wait forever; a
                    // notification or a response (or an id past the cut) gets one with id null.
                    let msg = format!(
                        "invalid request: the message is {len} bytes, over the maximum of {} bytes (proxy.max_message_bytes)",
                        self.max_message_bytes
                    );
                    let id = id.filter(|_| is_call);
                    self.client
                        .send(jsonrpc::error_response(id.as_ref(), code::INVALID_REQUEST, &msg, None))
                        .await;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading from the client failed");
                    break;
                }
            }
        }
    }

    /// Reads upstream messages until the upstream's stream ends.
    pub async fn pump_upstream<R: AsyncRead + Unpin>(&self, input: R) {
        let mut reader = LineReader::new(input, self.max_message_bytes);
        loop {
            match reader.next_line().await {
                Ok(Some(Line::Message(line))) => self.route_upstream(line.into()).await,
                Ok(Some(Line::TooLong { len, head })) => self.upstream_too_long(len, &head).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading from the upstream failed");
                    break;
                }
            }
        }
    }

    /// [`Router::pump_upstream`] for an upstream in this process that hands over whole messages
    /// (an HTTP upstream's, read once where they arrived), with the same cap on their size.
    pub async fn pump_upstream_messages(&self, lines: &mut UpstreamLines) {
        while let Some(line) = lines.next().await {
            match line.len() > self.max_message_bytes {
                true => self.upstream_too_long(line.len(), &line[..HEAD_BYTES.min(line.len())]).await,
                false => self.route_upstream(line).await,
            }
        }
    }

    /// A message from the upstream over the size cap, of which `head` is the start, is dropped.
    async fn upstream_too_long(&self, len: usize, head: &[u8]) {
        let (id, is_call) = jsonrpc::sniff_head(head);
        tracing::error!(
            bytes = len,
            max = self.max_message_bytes,
            id = ?id,
            "dropped an oversized message from the upstream; raise proxy.max_message_bytes if it was legitimate"
        );
        // A response too large to relay still ends its request: the upstream's answer becomes an
        // error saying so, routed like any answer (to the client or a task).
        if let (Some(id), false) = (id, is_call) {
            let msg = format!(
                "the upstream's response is {len} bytes, over the maximum of {} bytes (proxy.max_message_bytes)",
                self.max_message_bytes
            );
            let data = serde_json::json!({ "bytes": len, "max": self.max_message_bytes });
            let line = jsonrpc::error_response(Some(&id), code::INTERNAL_ERROR, &msg, Some(&data));
            self.route_upstream(line.into()).await;
        }
    }
}
