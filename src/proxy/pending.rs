//! The in-flight tables: client requests waiting for the upstream, and the proxy's own requests.
//!
//! Client requests are remembered so that, if the upstream dies, each one still gets an answer (an
//! error naming the exit status) instead of hanging. The proxy's own requests use ids from a namespace
//! of their own (a per-process random prefix), so their responses are recognised and never reach the
//! client, and a client id can never be mistaken for one of ours.

use super::intercept::Rewrite;
use crate::jsonrpc::Id;
use dashmap::DashMap;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::oneshot;

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

/// The upstream's answer to one of the proxy's own requests.
#[derive(Debug)]
pub enum Reply {
    /// `result`, raw.
    Result(Box<RawValue>),
    /// `error`, raw (the JSON-RPC error object as the upstream sent it).
    Error(Box<RawValue>),
}

/// Who waits for the answer to one of the proxy's requests.
#[derive(Debug)]
pub enum OwnWaiter {
    /// A caller awaiting it.
    Caller(oneshot::Sender<Reply>),
    /// A task whose call it is: the answer completes the task directly, so a running task costs no
    /// waiting future of its own (100,000 live tasks stay cheap).
    Task(Box<str>, std::time::Instant),
}

/// Both in-flight tables of one session.
pub struct Pending {
    client: DashMap<Id, ClientRequest>,
    /// Client requests given up while the upstream still had them (their task was cancelled): a late
    /// answer is dropped rather than sent to a client that no longer waits for it.
    abandoned: DashMap<Id, ()>,
    own: DashMap<Id, OwnWaiter>,
    prefix: String,
    next: AtomicU64,
}

impl Pending {
    /// Empty tables with a fresh random id namespace.
    pub fn new() -> Self {
        Pending {
            client: DashMap::new(),
            abandoned: DashMap::new(),
            own: DashMap::new(),
            prefix: format!("mcp-asyncify-{}-", uuid::Uuid::new_v4().simple()),
            next: AtomicU64::new(1),
        }
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

    fn next_own_id(&self) -> Id {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Id::string(&format!("{}{n}", self.prefix))
    }

    /// Allocates an id in the proxy's namespace and registers a waiter for its response.
    pub fn register_own(&self) -> (Id, oneshot::Receiver<Reply>) {
        let id = self.next_own_id();
        let (tx, rx) = oneshot::channel();
        self.own.insert(id.clone(), OwnWaiter::Caller(tx));
        (id, rx)
    }

    /// Allocates an id whose answer belongs to the task `task_id`.
    pub fn register_own_task(&self, task_id: &str) -> Id {
        let id = self.next_own_id();
        self.own.insert(id.clone(), OwnWaiter::Task(task_id.into(), std::time::Instant::now()));
        id
    }

    /// Whether an id belongs to the proxy's namespace (whether or not it is still waited for).
    pub fn is_own(&self, id: &Id) -> bool {
        // The prefix is inside the JSON string quotes.
        id.is_string() && id.as_json()[1..].starts_with(&self.prefix)
    }

    /// Takes the waiter of one of our requests (when its answer comes).
    pub fn take_own(&self, id: &Id) -> Option<OwnWaiter> {
        self.own.remove(id).map(|(_, w)| w)
    }

    /// Forgets one of the proxy's requests (its caller gave up).
    pub fn forget_own(&self, id: &Id) {
        self.own.remove(id);
    }

    /// Drops every waiter of the proxy's own requests, which wakes callers with "upstream gone", and
    /// returns the tasks whose calls will never be answered.
    pub fn fail_own(&self) -> Vec<Box<str>> {
        let ids: Vec<Id> = self.own.iter().map(|e| e.key().clone()).collect();
        ids.iter()
            .filter_map(|id| match self.own.remove(id) {
                Some((_, OwnWaiter::Task(task, _))) => Some(task),
                _ => None,
            })
            .collect()
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
    fn own_ids_never_look_like_client_ids() {
        let p = Pending::new();
        let (id, _rx) = p.register_own();
        assert!(p.is_own(&id));
        for raw in ["1", "0", "\"1\"", "\"mcp-asyncify-1\""] {
            let client = Id::from_raw(&serde_json::from_str::<Box<RawValue>>(raw).unwrap());
            assert!(!p.is_own(&client), "{raw}");
        }
        // Two processes never share a namespace.
        let other = Pending::new();
        assert!(!other.is_own(&id));
    }

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
