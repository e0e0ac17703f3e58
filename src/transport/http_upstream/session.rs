//! The session around the exchanges: the requests' headers (configured ones, authorization,
//! `Mcp-Session-Id`, `MCP-Protocol-Version`), sending with connect retries, the OAuth header's
//! renewal, re-initializing a session the server dropped, and ending the session.

use super::post::{Answer, Expect, Failure, Posted};
use super::{ACCEPT_POST, CONNECT_RETRIES, DRAIN_TIMEOUT, Inner, JSON, MCP_PROTOCOL_VERSION, MCP_SESSION_ID};
use crate::jsonrpc::{self, Envelope, Id};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

impl Inner {
    pub(super) fn session_id(&self) -> Option<HeaderValue> {
        self.session.borrow().clone()
    }

    /// With the OAuth sign-in on: takes its current header (refreshed first if about to expire) for
    /// the requests built from now on, and returns it.
    pub(super) async fn use_current_authorization(&self) -> Result<Option<HeaderValue>, Failure> {
        let Some(oauth) = &self.oauth else { return Ok(None) };
        let header = oauth.authorization().await.map_err(|e| Failure::SignIn(e.to_string()))?;
        *self.authorization.lock().expect("not poisoned") = header.clone();
        Ok(header)
    }

    /// The upstream refused `sent` (HTTP 401): the sign-in refreshes it, or signs in again.
    pub(super) async fn renew_authorization(
        &self,
        sent: Option<HeaderValue>,
        challenge: Option<String>,
    ) -> Result<(), Failure> {
        let Some(oauth) = &self.oauth else { return Ok(()) };
        oauth.refused(sent.as_ref(), challenge.as_deref()).await.map_err(|e| Failure::SignIn(e.to_string()))
    }

    /// Makes a new session after the server dropped `stale`: replays the client's `initialize` (with
    /// our own id, its answer swallowed) and `notifications/initialized`. Concurrent callers wait for
    /// the first one's new session.
    pub(super) async fn reinitialize(&self, stale: HeaderValue) -> Result<(), String> {
        let _one_at_a_time = self.reinitializing.lock().await;
        if self.session_id().as_ref() != Some(&stale) {
            return Ok(()); // another request already made a new session
        }
        let original = self.initialize.lock().expect("not poisoned").clone();
        let original = original.ok_or("the client's initialize request is not known")?;
        let env = Envelope::parse(&original).map_err(|e| e.to_string())?;
        let n = self.reinitialized.fetch_add(1, Ordering::SeqCst);
        let id = Id::string(&format!("mcp-asyncify-reinitialize-{n}"));
        let request = jsonrpc::request(&id, "initialize", env.params.map(RawValue::get));
        drop(env);
        let expect = Expect { id: Some(id), initialize: true, swallow: true, routing: None };
        match self.post_once(&Bytes::from(request), &expect).await {
            Ok(Posted::Done(Some(Answer::Result))) => {}
            Ok(Posted::Done(Some(Answer::Error(e)))) => {
                return Err(format!("initialize was answered with an error: {e}"));
            }
            Ok(_) => return Err("initialize was not answered".into()),
            Err(e) => return Err(e.to_string()),
        }
        let initialized = jsonrpc::notification("notifications/initialized", None);
        let expect = Expect { id: None, initialize: false, swallow: true, routing: None };
        match self.post_once(&Bytes::from(initialized), &expect).await {
            Ok(Posted::Done(_)) => {}
            Ok(Posted::SessionGone(_)) => return Err("the new session was dropped at once".into()),
            Ok(Posted::Unauthorized(..)) => {
                return Err("notifications/initialized was refused (HTTP 401)".into());
            }
            Err(e) => return Err(format!("notifications/initialized failed: {e}")),
        }
        tracing::info!("initialized a new upstream session in place of the dropped one");
        Ok(())
    }

    pub(super) async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(task) = self.get_stream.lock().expect("not poisoned").take() {
            task.abort();
        }
        let Some(session) = self.session.send_replace(None) else { return };
        let deadline = Instant::now() + self.request_timeout.min(DRAIN_TIMEOUT);
        let response = self
            .send_by(deadline, || {
                let mut request = self.request(Method::DELETE, Bytes::new(), ACCEPT_POST, Some(&session));
                self.add_protocol_version(&mut request);
                request
            })
            .await;
        match response {
            Ok(r) if r.status().is_success() => tracing::debug!("ended the upstream session"),
            Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => {
                tracing::debug!("the upstream does not let clients end sessions (DELETE answered 405)")
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                tracing::debug!("the upstream session was already gone")
            }
            Ok(r) => tracing::warn!(status = r.status().as_u16(), "ending the upstream session failed"),
            Err(e) => tracing::warn!(error = %e, "ending the upstream session failed"),
        }
    }

    /// A request with the configured headers, the client's authorization and the session id.
    pub(super) fn request(
        &self,
        method: Method,
        body: Bytes,
        accept: &'static str,
        session: Option<&HeaderValue>,
    ) -> Request<Full<Bytes>> {
        let is_post = method == Method::POST;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        if let Some(auth) = self.authorization.lock().expect("not poisoned").clone() {
            headers.insert(header::AUTHORIZATION, auth);
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        if is_post {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        }
        if let Some(session) = session {
            headers.insert(MCP_SESSION_ID, session.clone());
        }
        request
    }

    /// Whether an `initialize` negotiated the session's protocol version.
    pub(super) fn negotiated(&self) -> bool {
        self.protocol_version.lock().expect("not poisoned").is_some()
    }

    pub(super) fn add_protocol_version(&self, request: &mut Request<Full<Bytes>>) {
        if let Some(version) = self.protocol_version.lock().expect("not poisoned").clone() {
            request.headers_mut().insert(MCP_PROTOCOL_VERSION, version);
        }
    }

    /// Sends a request (built anew for each attempt), retrying failed connections (3 times, after
    /// 100, 200 and 400 ms), until its response headers come or `deadline` passes.
    pub(super) async fn send_by(
        &self,
        deadline: Instant,
        make: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Failure> {
        let attempts = async {
            let mut waits = CONNECT_RETRIES.iter();
            loop {
                match self.client.request(make()).await {
                    Ok(response) => return Ok(response),
                    Err(e) if e.is_connect() => match waits.next() {
                        Some(wait) => {
                            let (error, retry_in_ms) =
                                (crate::logging::error_chain(&e), wait.as_millis() as u64);
                            tracing::debug!(error, retry_in_ms, "connecting to the upstream failed");
                            tokio::time::sleep(*wait).await;
                        }
                        None => return Err(Failure::Unreachable(crate::logging::error_chain(&e))),
                    },
                    Err(e) => return Err(Failure::Io(crate::logging::error_chain(&e))),
                }
            }
        };
        match tokio::time::timeout_at(deadline, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout(self.request_timeout)),
        }
    }
}
