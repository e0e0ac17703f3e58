//! The Prometheus scrape endpoint (`--metrics-listen ADDR`): `GET /metrics` and `GET /healthz`, served
//! by hyper (HTTP/1.1), with the one encoder the sidecar's `/metrics` uses too
//! ([`super::render_prometheus`]).
//!
//! Scrapes are rare and small; a header read timeout keeps a peer that never finishes its request
//! from holding a connection.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Binds `addr` and serves in the background; returns the bound address.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr} (--metrics-listen): {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(answer(&req)) });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body): (_, _, Bytes) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match super::render_prometheus() {
            Some(text) => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text.into()),
            None => {
                (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "metrics could not be encoded\n".into())
            }
        },
        (&Method::GET, "/healthz") => match crate::telemetry::health::healthz() {
            (true, text) => (StatusCode::OK, "text/plain", text.into()),
            (false, text) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", text.into()),
        },
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "try /metrics or /healthz\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into()),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("GET"));
    }
    response
}
