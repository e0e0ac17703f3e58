//! Requests the upstream sends the client (elicitation, sampling, roots) and whose they are.
//!
//! The upstream's requests carry no link to the call that caused them, so one is attributed only
//! when exactly one call that could ask is in flight: a task's question goes to its task (tagged
//! with it for a 2025-11-25 client, held in `inputRequests` for a 2026-07-28 one), a 2026-07-28
//! call's to its client's next round, a 2025-11-25 plain call's is forwarded as it is. What cannot
//! be attributed is forwarded to a client that can answer it, and refused for one that cannot.

use super::{Interceptor, Rewrite, ServerRequestRoute, lookup};
use crate::jsonrpc::{self, Id, code};
use crate::tasks::model::{RELATED_TASK, TaskStatus, with_related_task};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Interceptor {
    /// An upstream request to the client. When it is made on behalf of a task, the task becomes
    /// `input_required`: a 2025-11-25 task's request is tagged with it and forwarded, a 2026-07-28
    /// task's is held for its client to read from `tasks/get` and answer with `tasks/update`.
    pub async fn on_server_request(
        self: &Arc<Self>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
    ) -> ServerRequestRoute {
        if !matches!(method, "elicitation/create" | "sampling/createMessage" | "roots/list")
            || !self.enabled()
        {
            return ServerRequestRoute::Forward;
        }
        if params.and_then(|p| lookup(p.get(), &["_meta", RELATED_TASK])).is_some() {
            return ServerRequestRoute::Forward; // the upstream's own task
        }
        let task_id = match self.asking_call() {
            Some(AskingCall::Task(task_id)) => task_id,
            // A 2026-07-28 call that is not a task (yet) asks: its client answers through a retry.
            Some(AskingCall::Modern { id: call, window }) => {
                self.park_question(&call, window, id, method, params);
                return ServerRequestRoute::Held;
            }
            // A client that opened a session, or that never said which generation it speaks (a bare
            // client), gets the request as it is.
            None if self.peers.legacy_client.load(Ordering::Relaxed)
                || !self.peers.modern_client.load(Ordering::Relaxed) =>
            {
                return ServerRequestRoute::Forward;
            }
            None => {
                // Only 2026-07-28 clients here, and they cannot receive requests: refuse it, so that
                // the call that asked ends instead of waiting forever.
                let calls = self.pending.client_calls().len() + self.tasks.running.len();
                tracing::warn!(
                    method,
                    calls,
                    "refused a request from the upstream: it cannot be told which call asked (several are in flight), and a 2026-07-28 client cannot be asked directly"
                );
                let msg = format!(
                    "{method} refused by mcp-asyncify: {calls} calls are in flight and the proxy cannot tell which one asked; a 2026-07-28 client can only be asked on behalf of one call at a time"
                );
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move { this.upstream.refuse(&id, code::INTERNAL_ERROR, &msg).await });
                return ServerRequestRoute::Held;
            }
        };
        if self.tasks.modern_tasks.contains_key(&task_id) {
            self.hold_input_request(&task_id, id, method, params);
            return ServerRequestRoute::Held;
        }
        if method == "roots/list" {
            return ServerRequestRoute::Forward; // 2025-11-25 tasks tag only elicitation and sampling
        }
        let Some(tagged) = params.and_then(|p| with_related_task(p.get(), &task_id).ok()) else {
            return ServerRequestRoute::Forward;
        };
        self.tasks.input_requests.insert(id.clone(), task_id.clone());
        let message = format!("Waiting for the client to answer {method}.");
        self.engine.set_status(&task_id, TaskStatus::InputRequired, Some(message)).await;
        ServerRequestRoute::Send(jsonrpc::request(id, method, Some(&tagged)))
    }

    /// Which call a server request belongs to, when that is unambiguous (the upstream's requests carry
    /// no link to the call that caused them): exactly one call that could ask is in flight. A task's
    /// question goes to its task; a 2026-07-28 call's to its client's next round; a 2025-11-25 plain
    /// call's is forwarded as it is.
    fn asking_call(&self) -> Option<AskingCall> {
        let calls = self.pending.client_calls();
        match (self.tasks.running.len(), calls.as_slice()) {
            (1, []) => self.tasks.running.iter().next().map(|e| AskingCall::Task(e.key().clone())),
            (0, [(_, Rewrite::HandedOff { task_id }, _)])
                if self.tasks.modern_tasks.contains_key(task_id) =>
            {
                Some(AskingCall::Task(task_id.clone()))
            }
            (0, [(id, Rewrite::TaskWindow { tool, .. }, _)]) => {
                Some(AskingCall::Modern { id: id.clone(), window: Some(tool.clone()) })
            }
            (0, [(id, Rewrite::Parked { state }, _)]) => {
                let window = self.trips.parked.get(state).and_then(|p| p.window());
                Some(AskingCall::Modern { id: id.clone(), window })
            }
            (0, [(id, Rewrite::None | Rewrite::PlainCall, true)]) => {
                Some(AskingCall::Modern { id: id.clone(), window: None })
            }
            _ => None,
        }
    }
}

/// The call a server request belongs to.
enum AskingCall {
    /// A running task's call.
    Task(String),
    /// A 2026-07-28 call that is not a task.
    Modern {
        /// The call's id (as the upstream knows it).
        id: Id,
        /// The tool, for a declared-task call in its window (its retries keep the window).
        window: Option<String>,
    },
}
