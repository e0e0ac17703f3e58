//! One client session over HTTP: the lines its upstream session writes go to the HTTP stream waiting
//! for them (a POST's, the GET stream, or a backlog until one opens); ending it keeps the upstream
//! while its tasks run.

use super::*;

/// Finds the subscription key in a notification's text (built once).
static SUBSCRIPTION_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(SUBSCRIPTION_ID));

impl HttpSession {
    pub(super) fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// A line the session wrote toward the client. An answer goes to the POST waiting for it; progress
    /// to the POST whose request carried its token; a server request (elicitation, sampling, roots:
    /// asked while the server handles a call) to the newest POST still open, as the spec relates
    /// such requests to the request being handled, else the GET stream; other notifications to the
    /// GET stream, else a POST stream, else the backlog until a stream opens.
    pub(super) fn dispatch(&self, line: Message) {
        let (kind, progress_token) = match line.envelope() {
            Ok(env) => {
                if env.kind == Kind::Response
                    && let Some(id) = env.id.as_ref()
                    && let Some((_, w)) = self.waiting.remove(id)
                {
                    let line = match &w.original {
                        Some(original) => Message::from(jsonrpc::with_id(&env, original)),
                        None => line.clone(),
                    };
                    let _ = w.out.send(line);
                    return;
                }
                if env.kind == Kind::Notification
                    && jsonrpc::may_contain_key(line.bytes(), &SUBSCRIPTION_KEY)
                    && let Some(subscription) = env.params.and_then(|p| subscription_of(p.get()))
                {
                    return self.to_subscriber(&subscription, &line);
                }
                let token = (env.method == Some("notifications/progress"))
                    .then(|| env.params.and_then(|p| progress_token(p.get())))
                    .flatten();
                (env.kind, token)
            }
            Err(_) => (Kind::Notification, None),
        };
        if let Some(token) = progress_token
            && let Some(w) = self.waiting.iter().find(|w| w.token.as_deref() == Some(token.as_str()))
            && w.out.send(line.clone()).is_ok()
        {
            return;
        }
        if kind == Kind::Request
            && let Some(task) = related_task_of_line(&line)
            && let Some(w) = self.waiting.iter().find(|w| w.task.as_deref() == Some(task.as_str()))
            && w.out.send(line.clone()).is_ok()
        {
            tracing::debug!(session = %short(&self.id), "a task's question on the stream of its tasks/result");
            return;
        }
        if kind == Kind::Request
            && let Some(w) = self.waiting.iter().filter(|w| !w.out.is_closed()).max_by_key(|w| w.seq)
            && w.out.send(line.clone()).is_ok()
        {
            tracing::debug!(session = %short(&self.id), "server request on the stream of the newest POST");
            return;
        }
        let mut standalone = self.standalone.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(out) = standalone.as_ref() {
            if out.send(line.clone()).is_ok() {
                tracing::debug!(session = %short(&self.id), "server message on the GET stream");
                return;
            }
            *standalone = None;
        }
        drop(standalone);
        if let Some(w) = self.waiting.iter().filter(|w| !w.out.is_closed()).max_by_key(|w| w.seq) {
            tracing::debug!(session = %short(&self.id), "server message on a POST stream");
            let _ = w.out.send(line);
            return;
        }
        tracing::debug!(session = %short(&self.id), "server message kept until a stream opens");
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if backlog.len() >= 1000 {
            backlog.pop_front();
            tracing::warn!(session = %short(&self.id), "dropped a server message: no stream open for 1000 messages");
        }
        backlog.push_back(line);
    }

    /// The client is done with the session (DELETE, or idle): its HTTP side ends now, but while tasks
    /// it started still run, their upstream stays up, so that the client (reconnecting with the same
    /// credential) finds their results; then everything closes.
    pub(super) async fn retire(self: Arc<Self>, grace: Duration) {
        let _ = self.gone.send(true);
        self.waiting.clear();
        self.standalone.lock().unwrap_or_else(|e| e.into_inner()).take();
        let intercept = self.session.lock().await.as_ref().map(|s| s.intercept.clone());
        let running = match &intercept {
            Some(i) => i.tasks_in_flight().await,
            None => 0,
        };
        let Some(intercept) = intercept.filter(|_| running > 0) else {
            return self.close(grace).await;
        };
        tracing::info!(session = %short(&self.id), running, "session ended; its upstream stays until its tasks finish");
        tokio::spawn(async move {
            intercept.until_tasks_done().await;
            tracing::info!(session = %short(&self.id), "the tasks of an ended session finished; closing its upstream");
            self.close(grace).await;
        });
    }

    pub(super) async fn close(&self, grace: Duration) {
        let _ = self.gone.send(true);
        // Taken out in a statement of its own: an `if let` would hold the lock's guard (a temporary of
        // its scrutinee) across every await of its block, up to the grace period.
        let session = self.session.lock().await.take();
        if let Some(mut s) = session {
            s.upstream_closer.close().await;
            if let Some(http) = &self.http {
                http.close().await;
                s.upstream_gone("closed its HTTP session").await;
            }
            let process = self.process.lock().await.take();
            if let Some(mut p) = process {
                let (status, _) = p.terminate(grace).await;
                let why = match status {
                    Ok(s) => format!("exited ({})", stdio::describe(&s)),
                    Err(e) => format!("could not be waited for ({e})"),
                };
                s.upstream_gone(&why).await;
            }
            s.client_closer.close().await;
        }
        self.waiting.clear();
        self.standalone.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

pub(super) fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}
