//! The HTTP client of the sign-in: metadata documents, registration, and the token endpoint (through
//! `oauth2`'s [`oauth2::AsyncHttpClient`]), on the same hyper + rustls stack as the upstream client.
//!
//! Redirects are never followed (an authorization server that redirects its token endpoint is
//! misconfigured, and following would send a code to another host); every exchange has a deadline
//! and a bounded body.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The largest metadata or token answer read.
const MAX_BODY: usize = 1024 * 1024;

/// Why an exchange with the authorization server failed at the HTTP level.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL cannot be used.
    #[error("invalid URL {0}")]
    Url(String),
    /// No connection, or the connection failed.
    #[error("{url} could not be reached: {why}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        why: String,
    },
    /// No answer in time.
    #[error("{url} did not answer within {secs} s")]
    Timeout {
        /// Where.
        url: String,
        /// The deadline.
        secs: u64,
    },
    /// The answer's body was too large or broke off.
    #[error("the answer from {url} could not be read: {why}")]
    Body {
        /// Where.
        url: String,
        /// Why.
        why: String,
    },
}

/// A small HTTP client for the authorization server.
#[derive(Clone)]
pub struct AuthHttp {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for AuthHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthHttp").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// One answer: its status, content type and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// The connector of every outgoing HTTP client (the OAuth exchanges, the HTTP upstream): `http` or
/// TLS on ring (no C toolchain needed) with the Mozilla roots, http/1.1 and h2 by ALPN, Nagle off,
/// connections given up after `connect_timeout`.
pub fn https_connector(connect_timeout: Duration) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring supports the default TLS versions")
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

impl AuthHttp {
    /// A client whose exchanges each take at most `timeout`.
    pub fn new(timeout: Duration) -> AuthHttp {
        AuthHttp { client: Client::builder(TokioExecutor::new()).build(https_connector(timeout)), timeout }
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&self, request: Request<Vec<u8>>) -> Result<http::Response<Vec<u8>>, HttpError> {
        let url = request.uri().to_string();
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, Full::new(Bytes::from(body)));
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| HttpError::Unreachable {
                url: url.clone(),
                why: crate::logging::error_chain(&e),
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| HttpError::Body { url: url.clone(), why: e.to_string() })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout { url, secs: self.timeout.as_secs() }),
        }
    }

    /// `GET url` with `Accept: application/json`.
    pub async fn get_json(&self, url: &str) -> Result<Answer, HttpError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .header("MCP-Protocol-Version", "2025-11-25")
            .body(Vec::new())
            .map_err(|_| HttpError::Url(url.to_owned()))?;
        let r = self.send(request).await?;
        let (parts, body) = r.into_parts();
        Ok(Answer { status: parts.status, headers: parts.headers, body: Bytes::from(body) })
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<Answer, HttpError> {
        self.post(url, "application/json", serde_json::to_vec(body).unwrap_or_default(), &[]).await
    }

    /// `POST url` with `body` of type `content_type` and extra headers.
    pub async fn post(
        &self,
        url: &str,
        content_type: &'static str,
        body: Vec<u8>,
        headers: &[(&'static str, HeaderValue)],
    ) -> Result<Answer, HttpError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json, text/event-stream")
            .body(body)
            .map_err(|_| HttpError::Url(url.to_owned()))?;
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.clone());
        }
        let r = self.send(request).await?;
        let (parts, body) = r.into_parts();
        Ok(Answer { status: parts.status, headers: parts.headers, body: Bytes::from(body) })
    }

    /// The `oauth2` crate's view of this client.
    pub fn oauth2(
        &self,
    ) -> impl Fn(
        oauth2::HttpRequest,
    )
        -> std::pin::Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send>>
    + Send
    + Sync
    + '_ {
        move |request| {
            let this = self.clone();
            Box::pin(async move { this.send(request).await })
        }
    }
}
