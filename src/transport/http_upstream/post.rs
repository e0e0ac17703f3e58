//! The POST exchange: one message from the session goes up as one `POST`, and what the server
//! answers (`202`, a JSON message or batch, or an SSE stream) comes back as lines; a failure becomes
//! the JSON-RPC error answering the request.

use super::routing::Routing;
use super::stream::StreamEnd;
use super::{
    ACCEPT_POST, ERROR_BODY, EVENT_STREAM, FAILED, Inner, JSON, MAX_MESSAGE, MCP_SESSION_ID, REFUSED,
    STREAM_BROKE, content_type, http_status,
};
use crate::jsonrpc::{self, Id, Kind, Message, ParseError};
use crate::transport::sse::{SeenIds, SseParser};
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// What a request went out for, and what to do with its answer.
pub(super) struct Expect {
    /// The request's id (`None` for notifications and responses, which get no answer).
    pub(super) id: Option<Id>,
    /// It is an `initialize`: keep the session id and the protocol version it brings.
    pub(super) initialize: bool,
    /// Our own request: its answer is not the session's to see.
    pub(super) swallow: bool,
    /// A 2026-07-28 request's routing headers (its protocol version, method and name).
    pub(super) routing: Option<Routing>,
}

/// How a request was answered.
#[derive(Debug)]
pub(super) enum Answer {
    Result,
    Error(String),
}

/// Why a request failed; each becomes the JSON-RPC error answering it.
#[derive(Debug)]
pub(super) enum Failure {
    /// HTTP 401 or 403.
    Refused { status: StatusCode, www_authenticate: Option<String> },
    /// Another HTTP error status.
    Status { status: StatusCode, body: String },
    /// The server could not be reached.
    Unreachable(String),
    /// The connection failed during the request.
    Io(String),
    /// No answer within the request timeout.
    Timeout(Duration),
    /// An SSE stream ended before the answer and could not be resumed.
    StreamBroke(String),
    /// The server dropped the session and a new one could not be made.
    Reinitialize(String),
    /// The server's answer is not JSON, or not an answer.
    Invalid(String),
    /// The upstream was closed.
    Closed,
    /// The OAuth sign-in failed or is needed (the message says what to do).
    SignIn(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { status, .. } => {
                write!(f, "the upstream refused the request: {}", http_status(*status))
            }
            Failure::Status { status, .. } => write!(f, "the upstream answered {}", http_status(*status)),
            Failure::Unreachable(e) => write!(f, "the upstream could not be reached: {e}"),
            Failure::Io(e) => write!(f, "the request to the upstream failed: {e}"),
            Failure::Timeout(t) => write!(f, "the upstream did not answer within {} ms", t.as_millis()),
            Failure::StreamBroke(_) => f.write_str(STREAM_BROKE),
            Failure::Reinitialize(e) => {
                write!(f, "the upstream dropped the session and a new one could not be initialized: {e}")
            }
            Failure::Invalid(e) => write!(f, "the upstream's answer is not valid: {e}"),
            Failure::Closed => f.write_str("the HTTP upstream is closed"),
            Failure::SignIn(e) => f.write_str(e),
        }
    }
}

impl Failure {
    /// The JSON-RPC error response answering request `id`.
    pub(super) fn response(&self, id: &Id) -> Vec<u8> {
        let msg = self.to_string();
        let (code, data) = match self {
            Failure::Refused { status, www_authenticate } => (
                REFUSED,
                serde_json::json!({ "status": status.as_u16(), "www_authenticate": www_authenticate }),
            ),
            Failure::Status { status, body } => {
                (FAILED, serde_json::json!({ "status": status.as_u16(), "body": body }))
            }
            Failure::StreamBroke(reason) => (FAILED, serde_json::json!({ "reason": reason })),
            _ => (FAILED, serde_json::json!({ "reason": msg })),
        };
        jsonrpc::error_response(Some(id), code, &msg, Some(&data))
    }
}

/// What one POST came to.
pub(super) enum Posted {
    /// Relayed; the awaited answer, if it came.
    Done(Option<Answer>),
    /// HTTP 404 for this session id: the server dropped the session.
    SessionGone(HeaderValue),
    /// HTTP 401 with the OAuth sign-in on: the header sent, and the challenge.
    Unauthorized(Option<HeaderValue>, Option<String>),
}

impl Inner {
    /// Sends one line from the session upstream, and its answer (or an error answering it) back.
    pub(super) async fn deliver(self: Arc<Self>, line: Message) {
        let (kind, id, method, routing) = match line.envelope() {
            Ok(env) => {
                let routing = env.method.and_then(|m| Routing::of(m, env.params));
                (Some(env.kind), env.id, env.method.map(str::to_owned), routing)
            }
            Err(_) => (None, None, None, None),
        };
        let id = id.filter(|_| kind == Some(Kind::Request));
        let method = method.as_deref();
        let initialize = kind == Some(Kind::Request) && method == Some("initialize");
        if self.closed.load(Ordering::SeqCst) {
            tracing::warn!(?id, method, "not sending a message: the HTTP upstream is closed");
            if let Some(id) = &id {
                self.out.send(Failure::Closed.response(id)).await;
            }
            return;
        }
        tracing::debug!(?kind, ?id, method, bytes = line.len(), "POST to the upstream");
        if initialize {
            *self.initialize.lock().expect("not poisoned") = Some(line.bytes().to_vec());
        }
        let expect = Expect { id, initialize, swallow: false, routing };
        match self.post(line.into_bytes(), &expect).await {
            Ok(_) => {
                if kind == Some(Kind::Notification) && method == Some("notifications/initialized") {
                    self.start_get_stream();
                }
            }
            Err(failure) => {
                let id = &expect.id;
                tracing::warn!(?id, method, error = %failure, "the upstream did not take a message");
                if let Some(id) = &expect.id {
                    self.out.send(failure.response(id)).await;
                }
            }
        }
    }

    /// POSTs one message and relays what comes back; when the server no longer knows the session,
    /// re-initializes it and retries once.
    pub(super) async fn post(&self, body: Bytes, expect: &Expect) -> Result<Option<Answer>, Failure> {
        let mut retried = false;
        let mut renewed = false;
        loop {
            match self.post_once(&body, expect).await? {
                Posted::Done(answer) => return Ok(answer),
                Posted::Unauthorized(sent, challenge) if !renewed => {
                    self.renew_authorization(sent, challenge).await?;
                    renewed = true;
                }
                Posted::Unauthorized(..) => {
                    return Err(Failure::SignIn(
                        "the upstream refused the access token it was just given; sign out and in again (mcp-asyncify logout URL, then login URL)".into(),
                    ));
                }
                Posted::SessionGone(stale) if !retried => {
                    let id = &expect.id;
                    tracing::warn!(?id, "the upstream no longer knows the session; initializing a new one");
                    self.reinitialize(stale).await.map_err(Failure::Reinitialize)?;
                    retried = true;
                }
                Posted::SessionGone(_) => {
                    let body = "the new session was not known either".to_owned();
                    return Err(Failure::Status { status: StatusCode::NOT_FOUND, body });
                }
            }
        }
    }

    /// POSTs one message and relays what comes back.
    pub(super) async fn post_once(&self, body: &Bytes, expect: &Expect) -> Result<Posted, Failure> {
        let sent = self.use_current_authorization().await?;
        let deadline = Instant::now() + self.request_timeout;
        let session = if expect.initialize { None } else { self.session_id() };
        let response = self
            .send_by(deadline, || {
                let mut request = self.request(Method::POST, body.clone(), ACCEPT_POST, session.as_ref());
                if !expect.initialize {
                    self.add_protocol_version(&mut request);
                }
                // A stateless upstream's routing headers; an upstream that negotiated a session version
                // (a 2025-11-25 one, which a 2026-07-28 client's forwarded `_meta` means nothing to) keeps
                // that version's header.
                if let Some(routing) = &expect.routing
                    && !self.negotiated()
                {
                    routing.apply(request.headers_mut());
                }
                request
            })
            .await?;
        let status = response.status();
        tracing::debug!(id = ?expect.id, status = status.as_u16(), "the upstream answered the POST");
        if let (StatusCode::NOT_FOUND, Some(session)) = (status, session) {
            return Ok(Posted::SessionGone(session));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let www_authenticate = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            if status == StatusCode::UNAUTHORIZED && self.oauth.is_some() {
                return Ok(Posted::Unauthorized(sent, www_authenticate));
            }
            if self.oauth.is_some() {
                // The proxy's own sign-in lacks a permission: the client cannot fix that with a
                // challenge of its own, so say what to do instead.
                let scope = www_authenticate
                    .as_deref()
                    .map(crate::auth::discovery::parse_challenge)
                    .and_then(|c| c.scope);
                let needs = scope.map(|s| format!(" (it asks for the scope \"{s}\")")).unwrap_or_default();
                return Err(Failure::SignIn(format!(
                    "the upstream refused the request: {}{needs}; set upstream_auth.scope and sign in again with `mcp-asyncify login {}`",
                    http_status(status),
                    self.shown_url
                )));
            }
            return Err(Failure::Refused { status, www_authenticate });
        }
        if !status.is_success() {
            let body = error_body(response, deadline).await;
            return Err(Failure::Status { status, body });
        }
        if expect.initialize {
            let id = response.headers().get(MCP_SESSION_ID).cloned().map(|mut v| {
                v.set_sensitive(true);
                v
            });
            tracing::debug!(has_session = id.is_some(), "the upstream answered initialize");
            self.session.send_replace(id);
        }
        self.consume(response, expect, deadline).await.map(Posted::Done)
    }

    /// Relays the body of a successful POST: nothing, one JSON message or a batch, or an SSE stream
    /// (resumed if it breaks before the answer).
    pub(super) async fn consume(
        &self,
        response: Response<Incoming>,
        expect: &Expect,
        deadline: Instant,
    ) -> Result<Option<Answer>, Failure> {
        if response.status() == StatusCode::ACCEPTED {
            return Ok(None);
        }
        let content_type = content_type(&response);
        if content_type.starts_with(EVENT_STREAM) {
            let mut parser = SseParser::default();
            let mut seen = SeenIds::default();
            let mut body = response.into_body();
            let end = self.read_sse(&mut body, &mut parser, &mut seen, expect).await;
            let why = match end {
                StreamEnd::Answered(answer) => {
                    // Boxed, like the resumption below: inline, their futures would make every
                    // request's task several times larger, copied on each spawn (callgrind: memcpy
                    // went from 12 % to 27 % of the sidecar's instructions).
                    Box::pin(self.finish_stream(&mut body, &mut parser, &mut seen)).await;
                    return Ok(Some(answer));
                }
                _ if expect.id.is_none() => return Ok(None),
                StreamEnd::Ended => "the server ended the stream".to_owned(),
                StreamEnd::Broke(why) => why,
            };
            tracing::debug!(id = ?expect.id, reason = %why, "a request's stream ended before its answer");
            return Box::pin(self.resume(parser, seen, expect, why)).await.map(Some);
        }
        let body = match tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), MAX_MESSAGE).collect(),
        )
        .await
        {
            Err(_) => return Err(Failure::Timeout(self.request_timeout)),
            Ok(Err(e)) => return Err(Failure::Io(crate::logging::error_chain(&*e))),
            Ok(Ok(body)) => body.to_bytes(),
        };
        if !body.iter().all(u8::is_ascii_whitespace) && !content_type.starts_with(JSON) {
            tracing::warn!(content_type, "the upstream answered a POST with an unexpected content type");
        }
        let answer = self.relay(body, expect).await.map_err(Failure::Invalid)?;
        if answer.is_none() && expect.id.is_some() {
            // A request's POST must be answered in its body (JSON) or stream (SSE): nothing will come.
            return Err(Failure::Invalid("its body holds no answer to the request".into()));
        }
        Ok(answer)
    }

    /// Relays one JSON body or event (a message or a batch) to the session as lines; returns the
    /// answer to the awaited request if it was among them. A message on one line goes on in the
    /// bytes it came in, without a copy.
    pub(super) async fn relay(&self, data: Bytes, expect: &Expect) -> Result<Option<Answer>, String> {
        let start = data.len() - data.trim_ascii_start().len();
        let end = start + data[start..].trim_ascii_end().len();
        let data = data.slice(start..end);
        if data.is_empty() {
            return Ok(None);
        }
        if data.first() == Some(&b'[') {
            let value: &RawValue = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
            let batch: Vec<&RawValue> = serde_json::from_str(value.get()).map_err(|e| e.to_string())?;
            let mut answer = None;
            for message in batch {
                if let Some(a) = self.relay_message(message.get().as_bytes(), expect).await {
                    answer = Some(a);
                }
            }
            return Ok(answer);
        }
        // One message: reading its envelope proves it JSON, so it is read once (and the session has
        // that reading). What is not JSON is refused in serde_json's words, as before.
        let line = match compact(&data) {
            Cow::Borrowed(_) => data.clone(),
            Cow::Owned(line) => Bytes::from(line),
        };
        let message = match Message::read(line) {
            Err((message, ParseError::NotJson(_))) => {
                serde_json::from_slice::<&RawValue>(&data).map_err(|e| e.to_string())?;
                message
            }
            Err((message, _)) => message,
            Ok(message) => message,
        };
        Ok(self.relay_read(message, expect).await)
    }

    /// Relays one message as one line (unless it is the answer to our own request).
    pub(super) async fn relay_message(&self, message: &[u8], expect: &Expect) -> Option<Answer> {
        self.relay_read(Message::read_or_keep(compact(message).into_owned()), expect).await
    }

    /// Relays `line` unless it is the answer to our own request.
    async fn relay_read(&self, line: Message, expect: &Expect) -> Option<Answer> {
        let env = line.envelope().ok();
        let answer = match &env {
            Some(env) if env.kind == Kind::Response && env.id.is_some() && env.id == expect.id => {
                Some(match env.error {
                    Some(error) => Answer::Error(error.get().to_owned()),
                    None => Answer::Result,
                })
            }
            _ => None,
        };
        if let (Some(Answer::Result), true, Some(env)) = (&answer, expect.initialize, &env) {
            self.keep_protocol_version(env.result);
        }
        let swallowed = expect.swallow && answer.is_some();
        if let Some(env) = &env {
            let (kind, id, method) = (env.kind, &env.id, env.method);
            tracing::debug!(?kind, ?id, method, swallowed, "message from the upstream");
        }
        drop(env);
        if !swallowed {
            self.out.send(line).await;
        }
        answer
    }

    /// Keeps `protocolVersion` of an `initialize` result for the `MCP-Protocol-Version` header.
    pub(super) fn keep_protocol_version(&self, result: Option<&RawValue>) {
        #[derive(serde::Deserialize)]
        struct Init {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
        }
        let Some(init) = result.and_then(|r| serde_json::from_str::<Init>(r.get()).ok()) else { return };
        match HeaderValue::from_str(&init.protocol_version) {
            Ok(version) => {
                tracing::debug!(version = %init.protocol_version, "negotiated protocol version");
                *self.protocol_version.lock().expect("not poisoned") = Some(version);
            }
            Err(_) => tracing::warn!("the upstream's protocolVersion cannot be sent as a header"),
        }
    }
}

/// The start of an error response's body, as text.
pub(super) async fn error_body(response: Response<Incoming>, deadline: Instant) -> String {
    let limited = Limited::new(response.into_body(), 64 * 1024);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(body)) => {
            let bytes = body.to_bytes();
            let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY)]).into_owned();
            if bytes.len() > ERROR_BODY {
                text.push('…');
            }
            text.trim().to_owned()
        }
        _ => String::new(),
    }
}

/// One JSON text as one line: unchanged when it has no line breaks, else without the whitespace
/// between its tokens (valid JSON has line breaks nowhere else), its values byte for byte.
pub(super) fn compact(json: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr2(b'\n', b'\r', json).is_none() {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    in_string = true;
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_bytes_without_line_breaks() {
        let one = br#"{"a": 1.0e2, "b": "x y"}"#;
        assert!(matches!(compact(one), Cow::Borrowed(_)));
        let pretty = b"{\n  \"a\": 1.0e2,\n  \"b\": \"x \\\" y\\n\"\n}";
        assert_eq!(&*compact(pretty), br#"{"a":1.0e2,"b":"x \" y\n"}"#);
    }
}
