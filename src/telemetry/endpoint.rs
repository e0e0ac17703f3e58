//! The Prometheus scrape endpoint: a minimal HTTP/1.1 server for `GET /metrics` and `GET /healthz`.
//!
//! Scrapes are rare and small, so one short-lived connection per request is plenty; a bounded request
//! head and a read timeout keep a misbehaving peer from holding anything.

use prometheus::{Encoder, TextEncoder};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MAX_HEAD: usize = 8192;

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn serve(addr: SocketAddr, registry: prometheus::Registry) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr} (--metrics-listen): {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                })
                .await;
                if !matches!(read, Ok(true)) {
                    return;
                }
                let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
                let mut parts = line.split(|b| *b == b' ');
                let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                let path = path.split(|b| *b == b'?').next().unwrap_or_default();
                let (status, content_type, body) = match (method, path) {
                    (b"GET", b"/metrics") => {
                        let mut body = Vec::new();
                        match TextEncoder::new().encode(&registry.gather(), &mut body) {
                            Ok(()) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                            Err(e) => ("500 Internal Server Error", "text/plain", e.to_string().into_bytes()),
                        }
                    }
                    (b"GET", b"/healthz") => match crate::tasks::store::measured::healthz() {
                        (true, text) => ("200 OK", "text/plain", text.into_bytes()),
                        (false, text) => ("503 Service Unavailable", "text/plain", text.into_bytes()),
                    },
                    (b"GET", _) => ("404 Not Found", "text/plain", b"try /metrics or /healthz\n".to_vec()),
                    _ => ("405 Method Not Allowed", "text/plain", b"GET only\n".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(bound)
}
