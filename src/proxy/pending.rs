//! The in-flight tables of a session: client requests waiting for the upstream (here), and the
//! proxy's own requests ([`crate::upstream::own`]).
//!
//! Client requests are remembered so that, if the upstream dies, each one still gets an answer (an
//! error naming the exit status) instead of hanging.

use crate::jsonrpc::Id;
use crate::upstream::own::OwnRequests;
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Instant;

/// What to do with the upstream's response to a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Forward it unchanged.
    None,
    /// Add `capabilities.tasks` to the `initialize` result.
    Initialize,
    /// Mark taskified tools in a `tools/list` result.
    ToolsList {
        /// Whether this is the first page (our own tools are added there).
        first_page: bool,
    },
    /// A call the upstream may run as its own task: its task (if it made one) is recorded.
    NativeTaskCall {
        /// The tool called.
        tool: String,
    },
    /// A 2026-07-28 call the 2025-11-25 upstream runs as its own task (sent with `params.task`): its
    /// `CreateTaskResult` is recorded and rendered flat, as the Tasks extension's.
    NativeTaskForModern {
        /// The tool called.
        tool: String,
    },
    /// `tasks/get` or `tasks/result` of a task the upstream runs itself: when the upstream no longer
    /// knows it, its record goes.
    NativeTask {
        /// The task.
        task_id: String,
    },
    /// A plain `tools/call`, watched for keep-alives and the sync deadline.
    PlainCall,
    /// A plain call answered at the sync deadline: its response completes this task instead.
    HandedOff {
        /// The task now holding the work.
        task_id: String,
    },
    /// A 2026-07-28 call waiting for its client's answers to the upstream's questions (multi
    /// round-trip requests): its answer goes to the client's retry.
    Parked {
        /// The `requestState` the client retries with.
        state: String,
    },
    /// A 2026-07-28 call of a client that declared the Tasks extension, on a task tool: answered as
    /// it is if it ends within `task_after_ms`, else it becomes a task (then [`Rewrite::HandedOff`]).
    TaskWindow {
        /// The tool called.
        tool: String,
        /// When the call was forwarded.
        started: Instant,
    },
}

/// A client request forwarded upstream and not answered yet.
#[derive(Debug)]
pub struct ClientRequest {
    /// The request's method, for logs and for rewriting its response.
    pub method: Box<str>,
    /// When it was forwarded.
    pub started: Instant,
    /// What to do with its response.
    pub rewrite: Rewrite,
    /// A stateless 2026-07-28 request: its result gets `resultType: "complete"`.
    pub modern: bool,
}

/// The client's requests in flight on one session (the proxy's own are in [`OwnRequests`]).
pub struct Pending {
    client: DashMap<Id, ClientRequest>,
    /// Client requests given up while the upstream still had them (their task was cancelled): a late
    /// answer is dropped rather than sent to a client that no longer waits for it.
    abandoned: DashMap<Id, ()>,
    /// The proxy's own requests on this session.
    pub own: Arc<OwnRequests>,
}

impl Pending {
    /// Empty tables, the proxy's with a fresh random id namespace.
    pub fn new() -> Self {
        Pending { client: DashMap::new(), abandoned: DashMap::new(), own: Arc::new(OwnRequests::new()) }
    }

    /// Remembers a client request on its way upstream. Returns `false` if a request with the same id
    /// was already in flight (the client broke the "ids are unique" rule; both are still forwarded).
    pub fn track_client(&self, id: Id, method: &str, rewrite: Rewrite, modern: bool) -> bool {
        self.client
            .insert(id, ClientRequest { method: method.into(), started: Instant::now(), rewrite, modern })
            .is_none()
    }

    /// The client's requests in flight that may make the upstream ask the client something
    /// (`tools/call`, `prompts/get`, `resources/read`): id, rewrite, and whether it is a 2026-07-28
    /// request.
    pub fn client_calls(&self) -> Vec<(Id, Rewrite, bool)> {
        self.client
            .iter()
            .filter(|e| matches!(e.value().method.as_ref(), "tools/call" | "prompts/get" | "resources/read"))
            .map(|e| (e.key().clone(), e.value().rewrite.clone(), e.value().modern))
            .collect()
    }

    /// Changes what to do with a pending request's response. Returns `false` if it is no longer
    /// pending (answered meanwhile): the check and the change are one atomic step.
    pub fn set_rewrite(&self, id: &Id, rewrite: Rewrite) -> bool {
        match self.client.get_mut(id) {
            Some(mut entry) => {
                entry.rewrite = rewrite;
                true
            }
            None => false,
        }
    }

    /// What will be done with a pending request's response (`None`: it is not pending).
    pub fn rewrite_of(&self, id: &Id) -> Option<Rewrite> {
        self.client.get(id).map(|r| r.rewrite.clone())
    }

    /// Whether a client request is still waiting for the upstream.
    pub fn is_client_pending(&self, id: &Id) -> bool {
        self.client.contains_key(id)
    }

    /// Forgets a client request (answered, or cancelled by the client).
    pub fn finish_client(&self, id: &Id) -> Option<ClientRequest> {
        self.client.remove(id).map(|(_, r)| r)
    }

    /// Gives up a client request the upstream still works on: it no longer counts as in flight, and
    /// its answer, if one still comes, is dropped.
    pub fn abandon_client(&self, id: &Id) {
        if self.client.remove(id).is_some() {
            if self.abandoned.len() >= 10_000 {
                self.abandoned.clear(); // upstreams that never answer cancelled calls: stay bounded
            }
            self.abandoned.insert(id.clone(), ());
        }
    }

    /// Whether an answer is for a request given up (and forgets it).
    pub fn take_abandoned(&self, id: &Id) -> bool {
        self.abandoned.remove(id).is_some()
    }

    /// Takes every client request still waiting (used when the upstream is gone).
    pub fn drain_client(&self) -> Vec<(Id, ClientRequest)> {
        let ids: Vec<Id> = self.client.iter().map(|e| e.key().clone()).collect();
        ids.into_iter().filter_map(|id| self.client.remove(&id)).collect()
    }

    /// How many client requests in flight match `pred`.
    pub fn count_client(&self, pred: impl Fn(&ClientRequest) -> bool) -> usize {
        self.client.iter().filter(|e| pred(e.value())).count()
    }

    /// How many client requests are in flight.
    pub fn client_len(&self) -> usize {
        self.client.len()
    }
}

impl Default for Pending {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_returns_every_waiting_request() {
        let p = Pending::new();
        assert!(p.track_client(Id::string("a"), "tools/call", Rewrite::None, false));
        assert!(!p.track_client(Id::string("a"), "tools/call", Rewrite::None, false));
        p.track_client(Id::string("b"), "ping", Rewrite::None, true);
        assert!(p.finish_client(&Id::string("b")).is_some());
        let left = p.drain_client();
        assert_eq!(left.len(), 1);
        assert_eq!(p.client_len(), 0);
    }
}
