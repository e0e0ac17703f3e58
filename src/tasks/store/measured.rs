//! Every store operation timed and its faults counted, as a wrapper around whichever store is open
//! (metrics as middleware, not calls sprinkled through three stores), and the store's health as the
//! last operations saw it, reported to `/healthz` ([`crate::telemetry::health`]).

use super::{Caps, Change, Edit, StoreError, TaskRecord, TaskStore};
use crate::telemetry;
use async_trait::async_trait;
use opentelemetry::KeyValue;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::broadcast;

use crate::telemetry::health::set_health;

/// A store, measured.
pub struct Measured {
    inner: Arc<dyn TaskStore>,
    name: String,
}

impl Measured {
    /// Wraps `inner` and marks it healthy (it was just opened).
    pub fn new(inner: Arc<dyn TaskStore>) -> Self {
        let name = inner.describe();
        set_health(&name, None);
        Measured { inner, name }
    }

    fn record<T>(&self, op: &'static str, started: Instant, out: &Result<T, StoreError>) {
        let m = telemetry::metrics();
        let kind = self.name.split(':').next().unwrap_or("memory").to_owned();
        let outcome = match out {
            Ok(_) => "ok",
            Err(e) if e.is_cap() => "ok",
            Err(StoreError::Unavailable { .. }) => "unavailable",
            Err(_) => "failed",
        };
        let attrs = [
            KeyValue::new("asyncify.store.kind", kind),
            KeyValue::new("asyncify.store.operation", op),
            KeyValue::new("asyncify.store.outcome", outcome),
        ];
        m.store_operation.record(started.elapsed().as_secs_f64(), &attrs);
        match out {
            Err(e) if !e.is_cap() => {
                m.store_errors.add(1, &attrs);
                set_health(&self.name, Some(e.to_string()));
            }
            _ => set_health(&self.name, None),
        }
    }
}

macro_rules! measured {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let out = $call.await;
        $self.record($op, started, &out);
        out
    }};
}

#[async_trait]
impl TaskStore for Measured {
    fn describe(&self) -> String {
        self.name.clone()
    }
    async fn insert(&self, record: TaskRecord, caps: Caps) -> Result<TaskRecord, StoreError> {
        measured!(self, "insert", self.inner.insert(record, caps))
    }
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        measured!(self, "get", self.inner.get(id))
    }
    async fn update(
        &self,
        id: &str,
        change: &Edit<'_>,
    ) -> Result<Option<(TaskRecord, TaskRecord)>, StoreError> {
        measured!(self, "update", self.inner.update(id, change))
    }
    async fn list(
        &self,
        owner: Option<&str>,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        measured!(self, "list", self.inner.list(owner, after_seq, limit))
    }
    async fn remove(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        measured!(self, "remove", self.inner.remove(id))
    }
    async fn expired(&self, now: SystemTime, limit: usize) -> Result<Vec<String>, StoreError> {
        measured!(self, "expired", self.inner.expired(now, limit))
    }
    async fn next_expiry(&self) -> Result<Option<SystemTime>, StoreError> {
        measured!(self, "next_expiry", self.inner.next_expiry())
    }
    async fn len(&self) -> Result<usize, StoreError> {
        measured!(self, "len", self.inner.len())
    }
    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        measured!(self, "unfinished", self.inner.unfinished())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        measured!(self, "ping", self.inner.ping())
    }
    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        self.inner.secret().await
    }
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.inner.changes()
    }
    async fn heartbeat(&self, runner: &str) -> Result<(), StoreError> {
        measured!(self, "heartbeat", self.inner.heartbeat(runner))
    }
    async fn runner_alive(&self, runner: &str) -> Result<bool, StoreError> {
        measured!(self, "runner_alive", self.inner.runner_alive(runner))
    }
}
