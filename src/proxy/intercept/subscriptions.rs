//! `subscriptions/listen` (2026-07-28): a long-lived request on which the client hears what it asked
//! for. The proxy serves the Tasks extension's part itself: `taskIds` subscribes to
//! `notifications/tasks` (the full DetailedTask on every change of those tasks). The list-changed
//! kinds are relayed from the upstream's own `notifications/*/list_changed`.
//!
//! Every message on a subscription carries `_meta["io.modelcontextprotocol/subscriptionId"]`, the id
//! of the `subscriptions/listen` request; it ends when the client cancels that request (or goes away).

use super::{Decision, Interceptor};
use crate::jsonrpc::{self, Id, code};
use crate::proxy::era::{self, Modern};
use crate::tasks::model::TaskRecord;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::HashSet;
use std::sync::Arc;

/// `_meta` key naming the subscription a message belongs to.
pub const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// The upstream notifications a subscription may ask for, by filter field.
const LIST_CHANGED: [(&str, &str); 3] = [
    ("toolsListChanged", "notifications/tools/list_changed"),
    ("promptsListChanged", "notifications/prompts/list_changed"),
    ("resourcesListChanged", "notifications/resources/list_changed"),
];

/// What one open `subscriptions/listen` asked for (and was granted).
#[derive(Default)]
pub(super) struct Subscription {
    /// Tasks whose changes it hears.
    task_ids: HashSet<String>,
    /// Upstream notification methods it hears.
    methods: HashSet<&'static str>,
}

impl Interceptor {
    /// Opens a subscription: acknowledged with what the proxy honours; it stays open (no answer) until
    /// cancelled.
    pub(super) async fn on_listen(&self, id: &Id, params: Option<&RawValue>, modern: &Modern) -> Decision {
        let params =
            params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok()).unwrap_or_default();
        let filter = params.get("notifications").and_then(Value::as_object).cloned().unwrap_or_default();
        let mut granted = Map::new();
        let mut subscription = Subscription::default();
        if let Some(ids) = filter.get("taskIds") {
            if !modern.tasks {
                self.client.send(era::missing_tasks_extension(id, "subscriptions/listen with taskIds")).await;
                return Decision::Handled;
            }
            let Some(ids) = ids.as_array() else {
                let msg = "params.notifications.taskIds must be an array of task ids";
                return self.reply_error(id, code::INVALID_PARAMS, msg).await;
            };
            // Only the caller's own tasks can be listened to; others are left out of the grant.
            let mut mine: Vec<String> = Vec::new();
            for t in ids.iter().filter_map(Value::as_str) {
                if self.engine.get(&self.owner, t).await.is_some() {
                    mine.push(t.to_owned());
                }
            }
            if mine.is_empty() && self.upstream_runs_tasks() {
                return Decision::Forward(super::Rewrite::None); // the upstream's own tasks
            }
            granted.insert("taskIds".into(), json!(mine));
            subscription.task_ids = mine.into_iter().collect();
        }
        for (field, method) in LIST_CHANGED {
            if filter.get(field) == Some(&Value::Bool(true)) {
                granted.insert(field.into(), Value::Bool(true));
                subscription.methods.insert(method);
            }
        }
        self.subscriptions.insert(id.clone(), subscription);
        let ack = json!({ "_meta": { SUBSCRIPTION_ID: subscription_id(id) }, "notifications": granted });
        self.client
            .send(jsonrpc::notification("notifications/subscriptions/acknowledged", Some(&ack.to_string())))
            .await;
        Decision::Handled
    }

    /// The client cancelled a request: if it was a subscription, it ends. Returns whether it was one.
    pub fn end_subscription(&self, id: &Id) -> bool {
        self.subscriptions.remove(id).is_some()
    }

    /// Sends `notifications/tasks` for a changed task to every subscription listening to it.
    pub(super) async fn notify_task_subscribers(&self, task: &TaskRecord) {
        if self.subscriptions.is_empty() {
            return;
        }
        let listening: Vec<Id> = self
            .subscriptions
            .iter()
            .filter(|s| s.task_ids.contains(&task.id))
            .map(|s| s.key().clone())
            .collect();
        if listening.is_empty() {
            return;
        }
        let detailed = task.to_detailed(self.input_requests_of(&task.id));
        for id in listening {
            let mut params = detailed.clone();
            params.remove("resultType");
            params.insert("_meta".into(), json!({ SUBSCRIPTION_ID: subscription_id(&id) }));
            let line = jsonrpc::notification("notifications/tasks", Some(&Value::Object(params).to_string()));
            self.client.send(line).await;
        }
    }

    /// An upstream notification a subscription asked for: sent on each such subscription (tagged);
    /// `None` when no subscription wants it (forward it as it is).
    pub fn on_upstream_notification(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
    ) -> Option<Vec<Vec<u8>>> {
        if self.subscriptions.is_empty() || !LIST_CHANGED.iter().any(|(_, m)| *m == method) {
            return None;
        }
        let listening: Vec<Id> = self
            .subscriptions
            .iter()
            .filter(|s| s.methods.contains(method))
            .map(|s| s.key().clone())
            .collect();
        if listening.is_empty() {
            return None;
        }
        let base =
            params.and_then(|p| serde_json::from_str::<Map<String, Value>>(p.get()).ok()).unwrap_or_default();
        Some(
            listening
                .iter()
                .map(|id| {
                    let mut p = base.clone();
                    let meta = p.entry("_meta").or_insert_with(|| json!({}));
                    if let Some(meta) = meta.as_object_mut() {
                        meta.insert(SUBSCRIPTION_ID.into(), subscription_id(id));
                    }
                    jsonrpc::notification(method, Some(&Value::Object(p).to_string()))
                })
                .collect(),
        )
    }
}

/// The subscription id: the JSON-RPC id of the `subscriptions/listen` request, as JSON.
fn subscription_id(id: &Id) -> Value {
    serde_json::from_str(id.as_json()).unwrap_or(Value::Null)
}
