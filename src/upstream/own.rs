//! The proxy's own requests to the upstream, waiting for their answers.
//!
//! Their ids come from a namespace of their own (a per-process random prefix), so their responses are
//! recognised and never reach the client, and a client id can never be mistaken for one of ours.

use crate::jsonrpc::{Id, Outcome};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

/// Who waits for the answer to one of the proxy's requests.
#[derive(Debug)]
pub enum OwnWaiter {
    /// A caller awaiting it.
    Caller(oneshot::Sender<Outcome>),
    /// A task whose call it is: the answer completes the task directly, so a running task costs no
    /// waiting future of its own (100,000 live tasks stay cheap).
    Task(Box<str>, std::time::Instant),
}

/// The proxy's requests in flight on one upstream connection, by id.
pub struct OwnRequests {
    own: DashMap<Id, OwnWaiter>,
    prefix: String,
    next: AtomicU64,
}

impl OwnRequests {
    /// An empty table with a fresh random id namespace.
    pub fn new() -> Self {
        OwnRequests {
            own: DashMap::new(),
            prefix: format!("mcp-asyncify-{}-", uuid::Uuid::new_v4().simple()),
            next: AtomicU64::new(1),
        }
    }

    fn next_id(&self) -> Id {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Id::string(&format!("{}{n}", self.prefix))
    }

    /// Allocates an id in the proxy's namespace and registers a waiter for its response.
    pub fn register(&self) -> (Id, oneshot::Receiver<Outcome>) {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.own.insert(id.clone(), OwnWaiter::Caller(tx));
        (id, rx)
    }

    /// Allocates an id whose answer belongs to the task `task_id`.
    pub fn register_task(&self, task_id: &str) -> Id {
        let id = self.next_id();
        self.own.insert(id.clone(), OwnWaiter::Task(task_id.into(), std::time::Instant::now()));
        id
    }

    /// Whether an id belongs to the proxy's namespace (whether or not it is still waited for).
    pub fn is_own(&self, id: &Id) -> bool {
        // The prefix is inside the JSON string quotes.
        id.is_string() && id.as_json()[1..].starts_with(&self.prefix)
    }

    /// Takes the waiter of one of our requests (when its answer comes).
    pub fn take(&self, id: &Id) -> Option<OwnWaiter> {
        self.own.remove(id).map(|(_, w)| w)
    }

    /// Forgets one of the proxy's requests (its caller gave up).
    pub fn forget(&self, id: &Id) {
        self.own.remove(id);
    }

    /// Drops every waiter of the proxy's own requests, which wakes callers with "upstream gone", and
    /// returns the tasks whose calls will never be answered.
    pub fn fail_all(&self) -> Vec<Box<str>> {
        let ids: Vec<Id> = self.own.iter().map(|e| e.key().clone()).collect();
        ids.iter()
            .filter_map(|id| match self.own.remove(id) {
                Some((_, OwnWaiter::Task(task, _))) => Some(task),
                _ => None,
            })
            .collect()
    }
}

impl Default for OwnRequests {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn own_ids_never_look_like_client_ids() {
        let p = OwnRequests::new();
        let (id, _rx) = p.register();
        assert!(p.is_own(&id));
        for raw in ["1", "0", "\"1\"", "\"mcp-asyncify-1\""] {
            let client = Id::from_raw(&serde_json::from_str::<Box<RawValue>>(raw).unwrap());
            assert!(!p.is_own(&client), "{raw}");
        }
        // Two processes never share a namespace.
        let other = OwnRequests::new();
        assert!(!other.is_own(&id));
    }
}
