//! The HTTP rules of the transport: responses (JSON, SSE, errors), what a request's headers must say,
//! and the few things read from a message to route its stream.

use super::*;

pub(super) fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<HttpBody> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(content_type).expect("valid"));
    r
}

/// A 2025-11-25 request's `MCP-Protocol-Version`, when it has one, must be a session version the
/// sidecar serves (400 otherwise).
pub(super) fn check_session_version(headers: &HeaderMap) -> Result<(), Response<HttpBody>> {
    let Some(v) = headers.get("mcp-protocol-version") else { return Ok(()) };
    let v = v.to_str().unwrap_or("");
    if SUPPORTED_VERSIONS.contains(&v) {
        return Ok(());
    }
    let msg = format!(
        "Bad Request: unsupported MCP-Protocol-Version {v:?} (supported: {})",
        SUPPORTED_VERSIONS.join(", ")
    );
    Err(rpc_error(StatusCode::BAD_REQUEST, None, code::INVALID_REQUEST, &msg))
}

pub(super) fn accepted() -> Response<HttpBody> {
    let body = Full::new(Bytes::new()).boxed_unsync();
    Response::builder().status(StatusCode::ACCEPTED).body(body).expect("valid response")
}

pub(super) fn plain(status: StatusCode, text: &str) -> Response<HttpBody> {
    full(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

/// A JSON-RPC error as an HTTP error body.
pub(super) fn rpc_error(status: StatusCode, id: Option<&Id>, code: i64, message: &str) -> Response<HttpBody> {
    full(status, "application/json", jsonrpc::error_response(id, code, message, None))
}

pub(super) fn sse_event(line: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(line.len() + 24);
    out.extend_from_slice(b"event: message\ndata: ");
    out.extend_from_slice(line);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(line) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(sse_event(line.bytes())))));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => Poll::Ready(Some(Ok(Frame::data(sse_event(line.bytes()))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.ping.as_mut().poll(cx).is_ready() {
                    let next = tokio::time::Instant::now() + Duration::from_secs(15);
                    self.ping.as_mut().reset(next);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n")))));
                }
                Poll::Pending
            }
        }
    }
}

pub(super) fn sse_response(body: SseBody) -> Response<HttpBody> {
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An HTTP upstream's 401/403, as the HTTP transport reports it in an error answer (code -32001 with
/// `data.status` and `data.www_authenticate`).
pub(super) fn upstream_refusal(line: &[u8]) -> Option<(StatusCode, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let err = v.get("error")?;
    if err.get("code")?.as_i64()? != http_upstream::REFUSED {
        return None;
    }
    let status = StatusCode::from_u16(u16::try_from(err.pointer("/data/status")?.as_u64()?).ok()?).ok()?;
    let challenge = err.pointer("/data/www_authenticate").and_then(|c| c.as_str()).map(str::to_owned);
    matches!(status.as_u16(), 401 | 403).then_some((status, challenge))
}

/// The task a server request is asked for (`_meta` related-task), if any.
pub(super) fn related_task_of_line(line: &Message) -> Option<String> {
    let env = line.envelope().ok()?;
    crate::tasks::model::related_task_of(env.params?.get())
}

/// The `taskId` of a `tasks/*` request's params.
pub(super) fn task_id_param(params: Option<&serde_json::value::RawValue>) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(params?.get()).ok()?.get("taskId")?.as_str().map(str::to_owned)
}

/// The `progressToken` of a progress notification's params, as JSON text.
pub(super) fn progress_token(params: &str) -> Option<String> {
    token_at(params, &["progressToken"])
}

/// The `_meta.progressToken` of a request's params, as JSON text.
pub(super) fn request_progress_token(params: &str) -> Option<String> {
    token_at(params, &["_meta", "progressToken"])
}

/// The member at `path` of `params` as the JSON text serde_json writes for it (a client's token and
/// the upstream's copy of it compare equal however each escaped it).
fn token_at(params: &str, path: &[&str]) -> Option<String> {
    match jsonrpc::member_at(params, path) {
        Some(found) => jsonrpc::canonical(found?),
        None => {
            let v: serde_json::Value = serde_json::from_str(params).ok()?;
            let pointer: String = path.iter().map(|k| format!("/{k}")).collect();
            Some(v.pointer(&pointer)?.to_string())
        }
    }
}

pub(super) fn accepts(headers: &HeaderMap, what: &str) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(|p| p.split(';').next().unwrap_or("").trim()).any(|t| t == what || t == "*/*")
    })
}

pub(super) fn host_of(value: &str) -> String {
    let v = value.trim().to_ascii_lowercase();
    if let Some(rest) = v.strip_prefix('[') {
        return format!("[{}]", rest.split(']').next().unwrap_or(""));
    }
    v.split(':').next().unwrap_or("").to_string()
}
