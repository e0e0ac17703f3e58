//! Sessions come and go: a new client session gets its own upstream (a child process, or a
//! connection to the hosted server) and routing; the reaper closes idle ones.

use super::*;

impl Sidecar {
    /// Closes sessions idle for `--session-idle-secs`. Each one is taken out of its map with its
    /// idleness checked again under the map's lock, the lock a stateless request holds while it
    /// marks its connection in use: a connection that has just admitted a request is never retired
    /// under it (the request would be answered "the session ended"), and one the reaper took out is
    /// never handed to a request (a fresh one is opened).
    pub(super) fn spawn_reaper(self: Arc<Self>) {
        let idle = Duration::from_secs(self.args.session_idle_secs.max(1));
        tokio::spawn(async move {
            let is_idle = |s: &HttpSession| {
                // A stream whose client vanished is closed (its keep-alive write failed).
                let open = s
                    .standalone
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|o| !o.is_closed());
                !open
                    && s.waiting.iter().all(|w| w.out.is_closed())
                    && s.last_active.lock().unwrap_or_else(|e| e.into_inner()).elapsed() > idle
            };
            loop {
                tokio::time::sleep(idle.min(Duration::from_secs(10))).await;
                let mut stale = Vec::new();
                for map in [&self.sessions, &self.stateless] {
                    let keys: Vec<String> =
                        map.iter().filter(|e| is_idle(e.value())).map(|e| e.key().clone()).collect();
                    stale.extend(keys.iter().filter_map(|k| map.remove_if(k, |_, s| is_idle(s))));
                }
                for (_, s) in stale {
                    tracing::info!(session = %short(&s.id), "closing an idle session");
                    s.retire(self.config.shutdown_grace()).await;
                }
            }
        });
    }

    /// A new client session: its own upstream process and routing.
    pub(super) async fn open_session(
        self: Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        let credential = self.credential(headers);
        let session_key = uuid::Uuid::new_v4().simple().to_string();
        let owner = match &credential {
            Some(c) => c.clone(),
            None => self.shared.owners.owner("session", &session_key),
        };
        let session = self.clone().spawn_session(headers, session_key, credential, owner).await?;
        self.sessions.insert(session.id.clone(), session.clone());
        tracing::info!(session = %short(&session.id), sessions = self.sessions.len(), "session opened");
        Ok(session)
    }

    /// Starts an upstream (a process, or a connection to the hosted server) and the routing of a
    /// session owned by `owner`, within the cap on sessions.
    pub(super) async fn spawn_session(
        self: Arc<Self>,
        headers: &HeaderMap,
        id: String,
        credential: Option<String>,
        owner: String,
    ) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        if self.sessions.len() + self.stateless.len() >= self.args.max_sessions {
            tracing::warn!(max = self.args.max_sessions, "refused a new session: too many sessions");
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Service Unavailable: {} sessions open (--max-sessions)", self.args.max_sessions),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return Err(r);
        }
        let (process, http, upstream_in, upstream_out) = match &self.args.upstream {
            Some(options) => {
                // The session's requests go straight to their POSTs, the answers come back read.
                let (sink, lines, handle) = http_upstream::connect_lines(options.clone());
                if self.args.pass_client_authorization {
                    // The client's credential goes to the hosted server unchanged (never logged).
                    handle.set_authorization(headers.get(header::AUTHORIZATION).cloned());
                }
                (None, Some(handle), sink, UpstreamOut::Messages(lines))
            }
            None => match UpstreamProcess::spawn(&self.args.command) {
                Ok((p, child_in, child_out)) => (
                    Some(p),
                    None,
                    Session::upstream_writer(child_in),
                    UpstreamOut::Bytes(Box::new(child_out)),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the upstream for a new session");
                    return Err(rpc_error(
                        StatusCode::BAD_GATEWAY,
                        None,
                        code::UPSTREAM_GONE,
                        &format!("cannot start the upstream server: {e}"),
                    ));
                }
            },
        };
        // What the session writes for the client goes straight to the HTTP streams. Lines written
        // before the session below exists (its task notifier starts with it) wait, in order, until
        // it does.
        let early: Arc<Mutex<Option<Vec<Message>>>> = Arc::new(Mutex::new(Some(Vec::new())));
        let http = Arc::new_cyclic(|me: &std::sync::Weak<HttpSession>| {
            let (me, early) = (me.clone(), early.clone());
            let deliver: Deliver = Arc::new(move |line: Message| {
                let mut waiting = early.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(queue) = waiting.as_mut() {
                    queue.push(line);
                    return true;
                }
                drop(waiting);
                match me.upgrade() {
                    Some(s) => {
                        s.dispatch(line);
                        true
                    }
                    None => false,
                }
            });
            let session =
                Session::with_client(&self.config, &self.shared, owner.clone(), deliver, upstream_in);
            self.shared.resume_orphans(&session, &owner);
            HttpSession {
                id: id.clone(),
                credential,
                router: session.router.clone(),
                session: tokio::sync::Mutex::new(Some(session)),
                process: tokio::sync::Mutex::new(process),
                http,
                waiting: DashMap::new(),
                seq: std::sync::atomic::AtomicU64::new(0),
                standalone: Mutex::new(None),
                backlog: Mutex::new(VecDeque::new()),
                last_active: Mutex::new(Instant::now()),
                gone: tokio::sync::watch::channel(false).0,
                next_internal: std::sync::atomic::AtomicU64::new(1),
            }
        });
        {
            // Held while the early lines go out, so a line written meanwhile comes after them.
            let mut waiting = early.lock().unwrap_or_else(|e| e.into_inner());
            for line in waiting.take().unwrap_or_default() {
                http.dispatch(line);
            }
        }
        let router = http.router.clone();
        // The upstream's output, and its end.
        let this = self.clone();
        let watched = http.clone();
        tokio::spawn(async move {
            match upstream_out {
                UpstreamOut::Bytes(output) => router.pump_upstream(output).await,
                UpstreamOut::Messages(mut lines) => router.pump_upstream_messages(&mut lines).await,
            }
            let stateless =
                this.stateless.iter().find(|e| Arc::ptr_eq(e.value(), &watched)).map(|e| e.key().clone());
            if this.sessions.remove(&watched.id).is_some() || stateless.is_some() {
                tracing::warn!(session = %short(&watched.id), "the upstream of a session exited");
            }
            if let Some(key) = stateless {
                this.stateless.remove(&key);
            }
            watched.close(Duration::ZERO).await;
        });
        Ok(http)
    }
}

/// What a session's upstream writes: a child's stdout, or an HTTP upstream's messages.
enum UpstreamOut {
    Bytes(Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    Messages(http_upstream::UpstreamLines),
}
