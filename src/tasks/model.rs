//! The task as the 2025-11-25 spec defines it: status machine, record, and wire shape.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime};

/// `_meta` key tying a message to a task.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// A task's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    /// Accepted and running.
    Working,
    /// Waiting for the requestor to answer a request (elicitation, sampling).
    InputRequired,
    /// Finished with a result.
    Completed,
    /// Finished with an error (a JSON-RPC error, or a tool result with `isError: true`).
    Failed,
    /// Cancelled by request (or expired while running).
    Cancelled,
}

impl TaskStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Working => "working",
            TaskStatus::InputRequired => "input_required",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// `completed`, `failed` and `cancelled` never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled)
    }

    /// Whether the spec allows moving from `self` to `next`.
    pub fn can_become(self, next: TaskStatus) -> bool {
        use TaskStatus::*;
        match self {
            Working => next != Working,
            InputRequired => next != InputRequired,
            Completed | Failed | Cancelled => false,
        }
    }
}

/// Where a task's work happens (a low-cardinality label for telemetry and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A plain upstream `tools/call` run by the proxy.
    Local,
    /// A Notion async task polled by the proxy.
    Notion,
}

impl Origin {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Notion => "notion",
        }
    }
}

/// The final payload of a task: exactly what the underlying request returned.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The `result` object, raw.
    Result(Box<RawValue>),
    /// The JSON-RPC `error` object, raw.
    Error(Box<RawValue>),
}

/// Everything the proxy keeps about one task.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    /// Unguessable id (uuid v4).
    pub id: String,
    /// The auth context that created it; other contexts never see it.
    pub owner: String,
    /// The tool it runs.
    pub tool: String,
    /// Local call or Notion task.
    pub origin: Origin,
    /// Current status.
    pub status: TaskStatus,
    /// Human-readable detail.
    pub status_message: Option<String>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When anything about it last changed.
    pub last_updated_at: SystemTime,
    /// When it entered its current status (for the time-per-state metric).
    pub state_since: SystemTime,
    /// Retention from creation, in milliseconds.
    pub ttl_ms: u64,
    /// Suggested polling interval, in milliseconds.
    pub poll_interval_ms: u64,
    /// The final payload, once terminal (none for a cancelled task).
    pub outcome: Option<Outcome>,
    /// Creation order, for stable `tasks/list` paging.
    pub seq: u64,
}

impl TaskRecord {
    /// When the record may be deleted.
    pub fn expires_at(&self) -> SystemTime {
        self.created_at + Duration::from_millis(self.ttl_ms)
    }

    /// The `Task` object of the wire format (also the flat body of `tasks/get` and `tasks/cancel`).
    pub fn to_wire(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("taskId".into(), Value::String(self.id.clone()));
        m.insert("status".into(), Value::String(self.status.as_str().into()));
        if let Some(msg) = &self.status_message {
            m.insert("statusMessage".into(), Value::String(msg.clone()));
        }
        m.insert("createdAt".into(), Value::String(rfc3339(self.created_at)));
        m.insert("lastUpdatedAt".into(), Value::String(rfc3339(self.last_updated_at)));
        m.insert("ttl".into(), Value::from(self.ttl_ms));
        m.insert("pollInterval".into(), Value::from(self.poll_interval_ms));
        m
    }
}

/// RFC 3339 UTC time with milliseconds, e.g. `2025-11-25T10:30:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Adds `_meta[RELATED_TASK] = {taskId}` to a JSON object (a result or params), keeping every other
/// field and any existing `_meta` entries.
pub fn with_related_task(raw: &str, task_id: &str) -> Result<String, serde_json::Error> {
    let mut obj: Map<String, Value> = serde_json::from_str(raw)?;
    let meta = obj.entry("_meta").or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
        .expect("just made an object")
        .insert(RELATED_TASK.into(), serde_json::json!({ "taskId": task_id }));
    serde_json::to_string(&obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        use TaskStatus::*;
        for t in [Completed, Failed, Cancelled] {
            for n in [Working, InputRequired, Completed, Failed, Cancelled] {
                assert!(!t.can_become(n));
            }
        }
        assert!(Working.can_become(InputRequired));
        assert!(InputRequired.can_become(Working));
        assert!(Working.can_become(Cancelled));
        assert!(!Working.can_become(Working));
    }

    #[test]
    fn wire_shape_has_every_required_field() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_066_600_123);
        let rec = TaskRecord {
            id: "t1".into(),
            owner: "o".into(),
            tool: "slow".into(),
            origin: Origin::Local,
            status: TaskStatus::Working,
            status_message: None,
            created_at: t,
            last_updated_at: t,
            state_since: t,
            ttl_ms: 60_000,
            poll_interval_ms: 1000,
            outcome: None,
            seq: 1,
        };
        let w = Value::Object(rec.to_wire());
        assert_eq!(w["createdAt"], "2025-11-25T10:30:00.123Z");
        assert_eq!(w["ttl"], 60_000);
        assert_eq!(w["pollInterval"], 1000);
        assert!(w.get("statusMessage").is_none());
    }

    #[test]
    fn related_task_meta_keeps_other_fields() {
        let out = with_related_task(r#"{"content":[],"_meta":{"a":1}}"#, "t9").unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["_meta"]["a"], 1);
        assert_eq!(v["_meta"][RELATED_TASK]["taskId"], "t9");
        assert_eq!(v["content"], serde_json::json!([]));
    }
}
