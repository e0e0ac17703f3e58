//! SSE streams: reading one (each event relayed, events seen before a resumption skipped), resuming
//! a request's broken stream with `Last-Event-ID`, and the standalone `GET` stream that carries the
//! server's own requests and notifications, reconnected with backoff.

use super::post::{Answer, Expect, Failure};
use super::{
    BACKOFF_MAX, BACKOFF_START, EVENT_STREAM, Inner, LAST_EVENT_ID, RESUME_ATTEMPTS, SSE_IDLE_TIMEOUT,
    STREAM_END_WAIT, content_type, http_status,
};
use crate::transport::sse::{SeenIds, SseParser};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// How an SSE stream stopped.
pub(super) enum StreamEnd {
    /// The awaited answer came.
    Answered(Answer),
    /// The server ended the stream.
    Ended,
    /// The connection failed, or went silent.
    Broke(String),
}

impl Inner {
    /// Opens the `GET` stream for the server's own messages (once).
    pub(super) fn start_get_stream(self: &Arc<Self>) {
        if self.get_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = tokio::spawn(self.clone().get_stream());
        *self.get_stream.lock().expect("not poisoned") = Some(task);
    }

    /// Keeps the `GET` stream open: reconnects with backoff and `Last-Event-ID`, waits for a new
    /// session when the server forgot this one, and stops for good on `405`.
    pub(super) async fn get_stream(self: Arc<Self>) {
        let mut sessions = self.session.subscribe();
        let mut parser = SseParser::default();
        let mut seen = SeenIds::default();
        let mut stream_session: Option<HeaderValue> = None;
        let mut backoff = BACKOFF_START;
        let mut last_problem = String::new();
        let expect = Expect { id: None, initialize: false, swallow: false, routing: None };
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let session = sessions.borrow_and_update().clone();
            let Some(session) = session else {
                if sessions.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if stream_session.as_ref() != Some(&session) {
                parser = SseParser::default();
                seen = SeenIds::default();
                stream_session = Some(session.clone());
            }
            let last = parser.last_event_id.clone().filter(|id| !id.is_empty());
            let sent = match self.use_current_authorization().await {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::debug!(error = %e, "the GET stream has no valid sign-in yet");
                    None
                }
            };
            let deadline = Instant::now() + self.request_timeout;
            let response = self
                .send_by(deadline, || {
                    let mut request = self.request(Method::GET, Bytes::new(), EVENT_STREAM, Some(&session));
                    self.add_protocol_version(&mut request);
                    if let Some(value) = last.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
                        request.headers_mut().insert(LAST_EVENT_ID, value);
                    }
                    request
                })
                .await;
            let mut delivered = false;
            let problem = match response {
                Ok(response) if response.status() == StatusCode::METHOD_NOT_ALLOWED => {
                    tracing::info!("the upstream offers no stream of its own messages (GET answered 405)");
                    return;
                }
                Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                    tracing::debug!(
                        "the upstream no longer knows the session; the GET stream waits for a new one"
                    );
                    if sessions.wait_for(|s| s.as_ref() != Some(&session)).await.is_err() {
                        return;
                    }
                    backoff = BACKOFF_START;
                    continue;
                }
                Ok(response)
                    if response.status().is_success()
                        && content_type(&response).starts_with(EVENT_STREAM) =>
                {
                    tracing::debug!(resumed = last.is_some(), "the GET stream is open");
                    let before = parser.blocks;
                    parser.new_connection();
                    let end = self.read_sse(&mut response.into_body(), &mut parser, &mut seen, &expect).await;
                    delivered = parser.blocks > before;
                    if !delivered && last.is_some() {
                        // The server would not resume from there: start afresh next time.
                        parser.last_event_id = None;
                    }
                    match end {
                        StreamEnd::Broke(why) => format!("the GET stream broke: {why}"),
                        _ => String::new(),
                    }
                }
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED && self.oauth.is_some() => {
                    // The token was refused (revoked, say): renew it for the next attempt.
                    let challenge = response
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    match self.renew_authorization(sent, challenge).await {
                        Ok(()) => "the GET stream's access token was refused; renewed it".to_owned(),
                        Err(e) => format!("the GET stream was refused: {e}"),
                    }
                }
                Ok(response) => format!("the GET stream was answered {}", http_status(response.status())),
                Err(e) => format!("the GET stream could not be opened: {e}"),
            };
            if !problem.is_empty() && problem != last_problem {
                tracing::warn!(problem = %problem, "reconnecting the upstream's GET stream");
            } else {
                tracing::debug!(problem = %problem, "reconnecting the upstream's GET stream");
            }
            last_problem = problem;
            if delivered {
                backoff = BACKOFF_START;
            }
            tokio::time::sleep(parser.retry.unwrap_or(backoff).max(backoff)).await;
            if !delivered {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Resumes a request's broken SSE stream with `GET` and `Last-Event-ID` until its answer comes.
    pub(super) async fn resume(
        &self,
        mut parser: SseParser,
        mut seen: SeenIds,
        expect: &Expect,
        mut why: String,
    ) -> Result<Answer, Failure> {
        let mut backoff = BACKOFF_START;
        let mut fruitless = 0;
        loop {
            let Some(last) = parser.last_event_id.clone().filter(|id| !id.is_empty()) else {
                return Err(Failure::StreamBroke(format!(
                    "{why}; the server gave no event id to resume from"
                )));
            };
            if fruitless >= RESUME_ATTEMPTS {
                return Err(Failure::StreamBroke(format!(
                    "{why}; {RESUME_ATTEMPTS} resumptions brought nothing"
                )));
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(Failure::Closed);
            }
            tokio::time::sleep(parser.retry.unwrap_or(backoff).max(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            fruitless += 1;
            let session = self.session_id();
            tracing::debug!(id = ?expect.id, "resuming a request's stream");
            self.use_current_authorization().await?;
            let deadline = Instant::now() + self.request_timeout;
            let response = self
                .send_by(deadline, || {
                    let mut request = self.request(Method::GET, Bytes::new(), EVENT_STREAM, session.as_ref());
                    self.add_protocol_version(&mut request);
                    if let Ok(value) = HeaderValue::from_str(&last) {
                        request.headers_mut().insert(LAST_EVENT_ID, value);
                    }
                    request
                })
                .await;
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    why = e.to_string();
                    continue;
                }
            };
            let status = response.status();
            match status {
                StatusCode::METHOD_NOT_ALLOWED => {
                    return Err(Failure::StreamBroke(format!(
                        "{why}; the server does not resume streams (GET answered {})",
                        http_status(status)
                    )));
                }
                StatusCode::NOT_FOUND => {
                    return Err(Failure::StreamBroke(format!(
                        "{why}; the server no longer knows the session"
                    )));
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let www_authenticate = response
                        .headers()
                        .get(header::WWW_AUTHENTICATE)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    return Err(Failure::Refused { status, www_authenticate });
                }
                _ if status.is_success() && content_type(&response).starts_with(EVENT_STREAM) => {
                    let before = parser.blocks;
                    let mut body = response.into_body();
                    parser.new_connection();
                    match self.read_sse(&mut body, &mut parser, &mut seen, expect).await {
                        StreamEnd::Answered(answer) => {
                            Box::pin(self.finish_stream(&mut body, &mut parser, &mut seen)).await;
                            return Ok(answer);
                        }
                        StreamEnd::Ended => why = "the server ended the resumed stream".to_owned(),
                        StreamEnd::Broke(e) => why = e,
                    }
                    if parser.blocks > before {
                        fruitless = 0;
                        backoff = BACKOFF_START;
                    }
                }
                _ => why = format!("resuming answered {}", http_status(status)),
            }
        }
    }

    /// Reads an SSE body, relaying each event's data, until the awaited answer (if any) came or the
    /// stream ends. A new connection's body starts with `parser.new_connection()`.
    pub(super) async fn read_sse(
        &self,
        body: &mut Incoming,
        parser: &mut SseParser,
        seen: &mut SeenIds,
        expect: &Expect,
    ) -> StreamEnd {
        let mut events = Vec::new();
        // One timer for the stream's silence, moved on only when it fires before the silence is
        // long enough (a timer for each frame cost more than reading the frame).
        let mut heard = Instant::now();
        let silence = tokio::time::sleep_until(heard + SSE_IDLE_TIMEOUT);
        tokio::pin!(silence);
        loop {
            let frame = tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = &mut silence => {
                    if heard.elapsed() < SSE_IDLE_TIMEOUT {
                        silence.as_mut().reset(heard + SSE_IDLE_TIMEOUT);
                        continue;
                    }
                    return StreamEnd::Broke(format!(
                        "the stream was silent for {} s",
                        SSE_IDLE_TIMEOUT.as_secs()
                    ));
                }
            };
            heard = Instant::now();
            let frame = match frame {
                None => return StreamEnd::Ended,
                Some(Err(e)) => return StreamEnd::Broke(crate::logging::error_chain(&e)),
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            parser.feed(&data, &mut events);
            let mut answered = None;
            for event in events.drain(..) {
                if let Some(id) = &event.id
                    && !seen.insert(id)
                {
                    tracing::debug!("skipped an SSE event seen before the stream was resumed");
                    continue;
                }
                match self.relay(Bytes::from(event.data), expect).await {
                    Ok(Some(answer)) => answered = Some(answer),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "skipped an SSE event from the upstream that is not JSON")
                    }
                }
            }
            // The answer ends the request's stream (the server closes it next).
            if let Some(answer) = answered {
                return StreamEnd::Answered(answer);
            }
        }
    }

    /// Reads a request's stream on after its answer, until the server ends it (as it should right
    /// after the answer), relaying whatever else comes; gives up after [`STREAM_END_WAIT`]. A stream
    /// read to its end leaves the connection reusable: dropped before, hyper closes the connection
    /// unless the end had already arrived, and the next request pays for a new one.
    pub(super) async fn finish_stream(
        &self,
        body: &mut Incoming,
        parser: &mut SseParser,
        seen: &mut SeenIds,
    ) {
        let after = Expect { id: None, initialize: false, swallow: false, routing: None };
        let end = tokio::time::timeout(STREAM_END_WAIT, self.read_sse(body, parser, seen, &after)).await;
        if end.is_err() {
            tracing::debug!("a request's stream stayed open after its answer; closing it");
        }
    }
}
