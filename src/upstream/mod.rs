//! The proxy's own voice toward the upstream: send a request and await its answer, or notify.
//!
//! The proxy (its tasks, its own listing and handshake) and the Notion adapter use [`Upstream`] to run
//! calls and polls. Each request gets an id from the session's private namespace ([`own`]), and its
//! response is routed back here instead of to the client. This module sits below both the proxy and
//! the Notion adapter: neither imports the other through it.

pub mod own;

use crate::jsonrpc;
use crate::jsonrpc::Outcome;
use crate::transport::lines::LineSink;
use own::OwnRequests;
use std::sync::Arc;
use std::time::Duration;

/// Why one of the proxy's own requests got no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    /// The upstream went away (exited, or its stream closed) before answering.
    #[error("the upstream server is gone: {0}")]
    Gone(String),
    /// No answer within the given time.
    #[error("the upstream server did not answer within {0:?}")]
    Timeout(Duration),
}

/// A clonable handle to send messages upstream on the proxy's own behalf.
#[derive(Clone)]
pub struct Upstream {
    sink: LineSink,
    own: Arc<OwnRequests>,
    exit: tokio::sync::watch::Receiver<Option<String>>,
}

impl Upstream {
    /// A handle writing to `sink`, routing answers through `own`; `exit` carries why the upstream
    /// ended once it has.
    pub fn new(
        sink: LineSink,
        own: Arc<OwnRequests>,
        exit: tokio::sync::watch::Receiver<Option<String>>,
    ) -> Self {
        Upstream { sink, own, exit }
    }

    /// Sends `method` with raw JSON `params` and waits for the answer (optionally bounded by `timeout`).
    pub async fn request(
        &self,
        method: &str,
        params: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Outcome, UpstreamError> {
        self.send(method, params).await?.reply(timeout).await
    }

    /// Sends `method` and returns the request in flight: its id (to cancel it) and its future answer.
    pub async fn send(&self, method: &str, params: Option<&str>) -> Result<InFlight, UpstreamError> {
        if let Some(why) = self.exit.borrow().clone() {
            return Err(UpstreamError::Gone(why));
        }
        let (id, rx) = self.own.register();
        // The session marks the upstream gone before it drops the waiters; checking again after
        // registering closes the window where a waiter could be added after that sweep.
        if let Some(why) = self.exit.borrow().clone() {
            self.own.forget(&id);
            return Err(UpstreamError::Gone(why));
        }
        let line = jsonrpc::request(&id, method, params);
        if !self.sink.send(line).await {
            self.own.forget(&id);
            return Err(UpstreamError::Gone(self.gone_reason()));
        }
        Ok(InFlight {
            id,
            rx,
            upstream: self.clone(),
            method: method.to_owned(),
            sent: std::time::Instant::now(),
        })
    }

    /// Sends `method` on behalf of a task: its answer completes the task (through the router) instead of
    /// waking a caller. Returns the request's id, e.g. to cancel it.
    pub async fn send_for_task(
        &self,
        method: &str,
        params: &str,
        task_id: &str,
    ) -> Result<jsonrpc::Id, UpstreamError> {
        if let Some(why) = self.exit.borrow().clone() {
            return Err(UpstreamError::Gone(why));
        }
        let id = self.own.register_task(task_id);
        if let Some(why) = self.exit.borrow().clone() {
            self.own.forget(&id);
            return Err(UpstreamError::Gone(why));
        }
        let mut line = jsonrpc::request(&id, method, Some(params));
        // With traces on, the call carries a CLIENT span under the task's span.
        if let Some(tp) = crate::telemetry::trace::task_call(task_id, method, params)
            && let Some(traced) = crate::telemetry::trace::with_traceparent(&line, &tp)
        {
            line = traced;
        }
        if !self.sink.send(line).await {
            self.own.forget(&id);
            return Err(UpstreamError::Gone(self.gone_reason()));
        }
        Ok(id)
    }

    /// Sends a notification upstream. Returns `false` if the upstream is gone.
    pub async fn notify(&self, method: &str, params: Option<&str>) -> bool {
        self.sink.send(jsonrpc::notification(method, params)).await
    }

    /// Answers a request the upstream sent (e.g. an elicitation a 2026-07-28 client answered through
    /// `tasks/update`) with the raw `result`. Returns `false` if the upstream is gone.
    pub async fn answer(&self, id: &jsonrpc::Id, result: &str) -> bool {
        self.sink.send(jsonrpc::result_response(id, result)).await
    }

    /// Refuses a request the upstream sent, with a JSON-RPC error.
    pub async fn refuse(&self, id: &jsonrpc::Id, code: i64, message: &str) -> bool {
        self.sink.send(jsonrpc::error_response(Some(id), code, message, None)).await
    }

    /// Stops waiting for the answer to one of our requests (it will be dropped when it comes).
    pub fn forget(&self, id: &jsonrpc::Id) {
        self.own.forget(id);
    }

    /// Why the upstream is gone, once it is.
    pub fn gone_reason(&self) -> String {
        self.exit.borrow().clone().unwrap_or_else(|| "its connection closed".into())
    }
}

/// One of the proxy's requests, sent and not yet answered.
pub struct InFlight {
    id: jsonrpc::Id,
    rx: tokio::sync::oneshot::Receiver<Outcome>,
    upstream: Upstream,
    method: String,
    sent: std::time::Instant,
}

impl InFlight {
    /// The request's id (in the proxy's namespace), e.g. for `notifications/cancelled`.
    pub fn id(&self) -> &jsonrpc::Id {
        &self.id
    }

    /// Waits for the answer (optionally bounded by `timeout`).
    pub async fn reply(self, timeout: Option<Duration>) -> Result<Outcome, UpstreamError> {
        let InFlight { id, rx, upstream, method, sent } = self;
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    upstream.own.forget(&id);
                    return Err(UpstreamError::Timeout(t));
                }
            },
            None => rx.await,
        };
        let answer = answer.map_err(|_| UpstreamError::Gone(upstream.gone_reason()));
        if crate::telemetry::metrics_on() {
            let error = match &answer {
                Ok(Outcome::Error(e)) => Some(crate::telemetry::trace::error_code(e)),
                Err(_) => Some("upstream_gone".to_owned()),
                Ok(_) => None,
            };
            crate::telemetry::trace::record_client_operation(sent, &method, None, error.as_deref());
        }
        answer
    }

    /// Gives up on the answer (it will be dropped when it comes).
    pub fn abandon(self) {
        self.upstream.own.forget(&self.id);
    }
}
