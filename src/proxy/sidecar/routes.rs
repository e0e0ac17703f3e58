//! The endpoint's methods: origin checks, then POST (one message in, its answer as JSON or an SSE
//! stream), GET (the standalone stream) and DELETE (the session's end).

use super::*;

impl Sidecar {
    /// Validates `Host` and `Origin` (DNS rebinding): an unknown one gets 403.
    pub(super) fn check_origin(&self, headers: &HeaderMap) -> Result<(), Response<HttpBody>> {
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            let h = host_of(host);
            if !self.allowed_hosts.contains(&h) {
                tracing::warn!(host = %h, "refused a request for an unknown Host (DNS rebinding?)");
                return Err(plain(StatusCode::FORBIDDEN, "Forbidden: unknown Host (see --allow-host)"));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
            let host = o.split("://").nth(1).map(host_of).unwrap_or_default();
            let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]");
            let listed = self
                .args
                .allow_origins
                .iter()
                .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(&o));
            if !(local || listed) {
                tracing::warn!(origin = %o, "refused a request from an unknown Origin");
                return Err(plain(
                    StatusCode::FORBIDDEN,
                    "Forbidden: Origin not allowed (see --allow-origin)",
                ));
            }
        }
        Ok(())
    }

    pub(super) async fn handle<B: RequestBody>(self: Arc<Self>, req: Request<B>) -> Response<HttpBody> {
        if let Err(r) = self.check_origin(req.headers()) {
            return r;
        }
        // A POST's version is checked once its body tells which generation it speaks. 2026-07-28 has
        // no GET stream and no session to DELETE: 405, as its transport says.
        let modern =
            req.headers().get("mcp-protocol-version").is_some_and(|v| v == crate::proxy::era::MODERN_VERSION);
        if modern && req.uri().path() == "/mcp" && matches!(*req.method(), Method::GET | Method::DELETE) {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed: 2026-07-28 has no GET stream or sessions",
            );
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        if req.method() != Method::POST
            && let Err(r) = check_session_version(req.headers())
        {
            return r;
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => match crate::telemetry::health::healthz() {
                (true, text) => plain(StatusCode::OK, text.trim_end()),
                (false, text) => plain(StatusCode::SERVICE_UNAVAILABLE, &text),
            },
            (&Method::GET, "/metrics") => match crate::telemetry::render_prometheus() {
                Some(text) => full(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
                None => plain(StatusCode::NOT_FOUND, "metrics are off (start with --metrics-listen)"),
            },
            (&Method::POST, "/mcp") => self.post(req).await,
            (&Method::GET, "/mcp") => self.get(req).await,
            (&Method::DELETE, "/mcp") => self.delete(req).await,
            (_, "/mcp") => {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
                r
            }
            _ => plain(StatusCode::NOT_FOUND, "Not Found: the MCP endpoint is /mcp"),
        }
    }

    /// The owner bound to the request's credential: an HMAC-SHA256 of its Authorization header, keyed
    /// by the store's secret (never the credential itself).
    pub(super) fn credential(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get(header::AUTHORIZATION)
            .map(|v| self.shared.owners.owner("credential", &String::from_utf8_lossy(v.as_bytes())))
    }

    /// The session a request names, checked against its credential.
    pub(super) fn session_of(&self, headers: &HeaderMap) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        let Some(id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "Bad Request: Mcp-Session-Id header is required (initialize first)",
            ));
        };
        let credential = self.credential(headers);
        // Touched while the map's entry is held: the reaper re-checks idleness under the same lock
        // (`remove_if`), so it never retires a session a request has just taken.
        let s = self.sessions.get(id).filter(|s| s.credential == credential).map(|s| {
            s.touch();
            s.value().clone()
        });
        // Not there, or not the credential that made the session: as if it did not exist.
        s.ok_or_else(|| rpc_error(StatusCode::NOT_FOUND, None, -32001, "Session not found"))
    }

    pub(super) async fn post<B: RequestBody>(self: Arc<Self>, req: Request<B>) -> Response<HttpBody> {
        let (parts, body) = req.into_parts();
        let headers = parts.headers;
        let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json")
        });
        if !json {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type: Content-Type must be application/json",
            );
        }
        if !(accepts(&headers, "application/json") && accepts(&headers, "text/event-stream")) {
            return plain(
                StatusCode::NOT_ACCEPTABLE,
                "Not Acceptable: Accept must list both application/json and text/event-stream",
            );
        }
        let max = self.config.proxy.max_message_bytes;
        let body = match Limited::new(body, max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("Payload Too Large: over {max} bytes"));
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Bad Request: the body could not be read"),
        };
        // Read once: the session's routing and the upstream's POST have this reading again.
        let message = Message::read_or_keep(body);
        let env = match message.envelope() {
            Ok(env) => env,
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, None, e.code(), &e.to_string()),
        };
        let (kind, id, method) = (env.kind, env.id.clone(), env.method.map(str::to_owned));
        // What the streams need from the params: a request's progress token (its progress goes on
        // its own stream), or the request a cancellation names.
        let token = match kind {
            Kind::Request => env.params.and_then(|p| request_progress_token(p.get())),
            _ => None,
        };
        let cancelled = match method.as_deref() {
            Some("notifications/cancelled") => crate::proxy::session::cancelled_request_id(env.params),
            _ => None,
        };
        let era = match (kind, self.config.tasks.enabled) {
            (Kind::Response, _) | (_, false) => Era::Legacy,
            _ => Era::of(env.params),
        };
        let discover = method.as_deref() == Some("server/discover") && self.config.tasks.enabled;
        if era != Era::Legacy || (discover && !headers.contains_key("mcp-session-id")) {
            return self.stateless(&headers, &env, era, token).await;
        }
        let task = match method.as_deref() {
            Some("tasks/result") => task_id_param(env.params),
            _ => None,
        };
        drop(env);
        if let Err(r) = check_session_version(&headers) {
            return r;
        }
        let session = if method.as_deref() == Some("initialize") && !headers.contains_key("mcp-session-id") {
            match self.clone().open_session(&headers).await {
                Ok(s) => s,
                Err(r) => return r,
            }
        } else {
            match self.session_of(&headers) {
                Ok(s) => s,
                Err(r) => return r,
            }
        };
        if kind != Kind::Request {
            // A cancelled request gets no answer: end the stream of the POST that waits for it.
            if let Some(cancelled) = cancelled {
                session.waiting.remove(&cancelled);
            }
            session.router.route_client(message).await;
            return accepted();
        }
        let id = id.expect("a request has an id");
        let mut response = self.exchange(&session, id, message, token, None, task).await;
        if method.as_deref() == Some("initialize") {
            response
                .headers_mut()
                .insert("mcp-session-id", HeaderValue::from_str(&session.id).expect("uuid"));
        }
        response
    }

    /// Sends one request into a session and answers the POST: with JSON when the answer comes first,
    /// else with an SSE stream carrying what comes before it (progress, server requests) and then it.
    pub(super) async fn exchange(
        self: Arc<Self>,
        session: &Arc<HttpSession>,
        id: Id,
        line: Message,
        token: Option<String>,
        original: Option<Id>,
        task: Option<String>,
    ) -> Response<HttpBody> {
        // Counts the request in flight until its answer is sent (graceful shutdown waits for them).
        let guard = self.in_flight.token();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seq = session.seq.fetch_add(1, Ordering::Relaxed);
        let stateless = original.is_some();
        let answer_id = original.clone().unwrap_or_else(|| id.clone());
        if let Some(task) = &task {
            // The task's questions asked while no stream was open go first on this one.
            let mut backlog = session.backlog.lock().unwrap_or_else(|e| e.into_inner());
            backlog.retain(|line| match related_task_of_line(line) {
                Some(t) if t == *task => tx.send(line.clone()).is_err(),
                _ => true,
            });
        }
        session.waiting.insert(id, Waiter { out: tx, seq, token, original, task });
        session.router.route_client(line).await;
        let mut gone = session.gone.subscribe();
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = gone.wait_for(|g| *g) => None,
        };
        let Some(first) = first else {
            let why = match *session.gone.borrow() {
                true => "the session ended before this request was answered",
                false => "the request was cancelled (notifications/cancelled); it gets no answer",
            };
            return rpc_error(StatusCode::OK, Some(&answer_id), code::UPSTREAM_GONE, why);
        };
        let error_code = match first.envelope() {
            Ok(e) if e.kind == Kind::Response && e.id.as_ref() == Some(&answer_id) => {
                e.error.map(|e| jsonrpc::error_code_of(e.get()))
            }
            _ => {
                return sse_response(SseBody {
                    rx,
                    first: Some(first),
                    ping: Box::pin(tokio::time::sleep(Duration::from_secs(15))),
                    _guard: Some(guard),
                });
            }
        };
        drop(guard);
        let error_code = error_code.flatten();
        // (Read further only when the code says it is the HTTP transport's refusal.)
        let refusal = match error_code {
            Some(http_upstream::REFUSED) => upstream_refusal(first.bytes()),
            _ => None,
        };
        match (refusal, error_code) {
            // The hosted server refused the credential: the client sees the HTTP answer itself
            // (status and WWW-Authenticate), so its OAuth flow can act.
            (Some((status, challenge)), _) => {
                let mut r = full(status, "application/json", first.into_bytes());
                if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
                r
            }
            // 2026-07-28 errors about the request itself are HTTP 400, an unknown method is a 404.
            (None, Some(code)) if code::is_modern_client_error(code) => {
                full(StatusCode::BAD_REQUEST, "application/json", first.into_bytes())
            }
            (None, Some(code::METHOD_NOT_FOUND)) if stateless => {
                full(StatusCode::NOT_FOUND, "application/json", first.into_bytes())
            }
            _ => full(StatusCode::OK, "application/json", first.into_bytes()),
        }
    }

    pub(super) async fn get<B>(self: Arc<Self>, req: Request<B>) -> Response<HttpBody> {
        if !accepts(req.headers(), "text/event-stream") {
            return plain(StatusCode::NOT_ACCEPTABLE, "Not Acceptable: Accept must list text/event-stream");
        }
        let session = match self.session_of(req.headers()) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        for line in session.backlog.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = tx.send(line);
        }
        // A new standalone stream replaces the old one.
        *session.standalone.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        sse_response(SseBody {
            rx,
            first: None,
            ping: Box::pin(tokio::time::sleep(Duration::from_secs(15))),
            _guard: None,
        })
    }

    pub(super) async fn delete<B>(self: Arc<Self>, req: Request<B>) -> Response<HttpBody> {
        let session = match self.session_of(req.headers()) {
            Ok(s) => s,
            Err(r) => return r,
        };
        self.sessions.remove(&session.id);
        tracing::info!(session = %short(&session.id), "session ended by the client");
        session.retire(self.config.shutdown_grace()).await;
        plain(StatusCode::OK, "session ended")
    }
}
