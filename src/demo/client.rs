//! A minimal JSON-RPC client over a line stream, for the demo's scripted client.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::transport::lines::{Line, LineReader, LineSink, spawn_line_writer};

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// Sends requests and matches responses by id; notifications arrive on a channel.
pub struct RpcClient {
    sink: LineSink,
    waiters: Waiters,
    next: AtomicU64,
}

impl RpcClient {
    /// Starts reading `input`; returns the client and the stream of notifications.
    pub fn start<R, W>(input: R, output: W) -> (Arc<RpcClient>, mpsc::UnboundedReceiver<Value>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, _closer) = spawn_line_writer(output, 256);
        let waiters: Waiters = Arc::default();
        let (notes_tx, notes_rx) = mpsc::unbounded_channel();
        let reader_waiters = waiters.clone();
        tokio::spawn(async move {
            let mut reader = LineReader::new(input, 64 * 1024 * 1024);
            while let Ok(Some(Line::Message(line))) = reader.next_line().await {
                let Ok(msg) = serde_json::from_slice::<Value>(&line) else { continue };
                match msg.get("id").and_then(Value::as_u64) {
                    Some(id) if msg.get("method").is_none() => {
                        let waiter = reader_waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send(msg);
                        }
                    }
                    _ => {
                        let _ = notes_tx.send(msg);
                    }
                }
            }
        });
        (Arc::new(RpcClient { sink, waiters, next: AtomicU64::new(1) }), notes_rx)
    }

    /// Sends a request and waits (at most `timeout`) for its whole response message.
    pub async fn call(&self, method: &str, params: Value, timeout: Duration) -> anyhow::Result<Value> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let msg = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        self.sink.send(msg.to_string()).await;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => anyhow::bail!("{method}: the connection closed"),
            Err(_) => anyhow::bail!("{method}: no answer within {timeout:?}"),
        }
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Value) {
        let msg = json!({ "jsonrpc": "2.0", "method": method, "params": params });
        self.sink.send(msg.to_string()).await;
    }
}
