//! The task: status machine, record, and its two wire shapes.
//!
//! One record, two renderers: [`TaskRecord::to_wire`] is the 2025-11-25 `Task` (`ttl`,
//! `pollInterval`; a tool result with `isError` is `failed`), [`TaskRecord::to_created`] and
//! [`TaskRecord::to_detailed`] are the 2026-07-28 Tasks extension's `CreateTaskResult` and
//! `DetailedTask` (`ttlMs`, `pollIntervalMs`; a tool result with `isError` is `completed`, only a
//! JSON-RPC error is `failed`; the result, error or pending input requests inline).

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
    /// A task the upstream runs itself (MCP Tasks of its own): the proxy keeps only its id, owner and
    /// ttl, to route its `tasks/*` to the upstream again after a restart and to list it.
    Native,
}

impl Origin {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Notion => "notion",
            Origin::Native => "native",
        }
    }
}

/// The protocol generation of the client that asked for a task (a low-cardinality label too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// MCP 2025-11-25 (`params.task`, `tasks/result`, `tasks/list`).
    Legacy,
    /// MCP 2026-07-28 with the Tasks extension (server-directed, `tasks/update`).
    Modern,
}

impl Generation {
    /// The protocol version, as `mcp.protocol.version`.
    pub fn protocol_version(self) -> &'static str {
        match self {
            Generation::Legacy => "2025-11-25",
            Generation::Modern => "2026-07-28",
        }
    }
}

/// The final payload of a task: exactly what the underlying request returned.
pub use crate::jsonrpc::Outcome;

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
    /// The generation of the client that asked for it.
    pub generation: Generation,
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
    /// Creation order, for stable `tasks/list` paging (numbered by the store).
    pub seq: u64,
    /// The process whose work runs the task (a random id per process), so that a restarted proxy
    /// knows which unfinished tasks lost their runner.
    pub runner: Option<String>,
    /// The upstream's own id of the work (Notion's async task id), so that polling resumes after a
    /// restart.
    pub upstream_task: Option<String>,
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

impl TaskRecord {
    /// The status a 2026-07-28 client sees: a tool result (even with `isError: true`) is `completed`;
    /// only a JSON-RPC error is `failed`.
    pub fn modern_status(&self) -> TaskStatus {
        match (self.status, &self.outcome) {
            (TaskStatus::Failed, Some(Outcome::Result(_))) => TaskStatus::Completed,
            (status, _) => status,
        }
    }

    /// The 2026-07-28 `Task` fields.
    fn to_modern(&self, result_type: &str) -> Map<String, Value> {
        let status = self.modern_status();
        let mut m = Map::new();
        m.insert("resultType".into(), Value::String(result_type.into()));
        m.insert("taskId".into(), Value::String(self.id.clone()));
        m.insert("status".into(), Value::String(status.as_str().into()));
        // The legacy message of an isError result ("the tool returned an error result") would
        // contradict `completed`.
        if let Some(msg) = self.status_message.as_ref().filter(|_| status == self.status) {
            m.insert("statusMessage".into(), Value::String(msg.clone()));
        }
        m.insert("createdAt".into(), Value::String(rfc3339(self.created_at)));
        m.insert("lastUpdatedAt".into(), Value::String(rfc3339(self.last_updated_at)));
        m.insert("ttlMs".into(), Value::from(self.ttl_ms));
        m.insert("pollIntervalMs".into(), Value::from(self.poll_interval_ms.max(1)));
        m
    }

    /// The 2026-07-28 `CreateTaskResult`: the task, flat, with `resultType: "task"`.
    pub fn to_created(&self) -> Map<String, Value> {
        self.to_modern("task")
    }

    /// The 2026-07-28 `DetailedTask` answered by `tasks/get` (and sent in `notifications/tasks`): the
    /// result of a completed task, the error of a failed one, or `input_requests` (the outstanding
    /// requests of an `input_required` one) inline.
    pub fn to_detailed(&self, input_requests: Option<Value>) -> Map<String, Value> {
        let mut m = self.to_modern("complete");
        match (self.modern_status(), &self.outcome) {
            (TaskStatus::Completed, Some(Outcome::Result(raw))) => {
                // The original result, as a 2026-07-28 result: it says it is complete.
                let mut result = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                if let Value::Object(r) = &mut result {
                    r.entry("resultType").or_insert_with(|| Value::String("complete".into()));
                }
                m.insert("result".into(), result);
            }
            (TaskStatus::Failed, Some(Outcome::Error(raw))) => {
                let error = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                m.insert("error".into(), error);
            }
            (TaskStatus::InputRequired, _) => {
                m.insert("inputRequests".into(), input_requests.unwrap_or_else(|| Value::Object(Map::new())));
            }
            _ => {}
        }
        m
    }
}

/// RFC 3339 UTC time with milliseconds, e.g. `2025-11-25T10:30:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The task a message's params (or result) name in `_meta[RELATED_TASK]`, if any.
pub fn related_task_of(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Related {
        #[serde(rename = "taskId")]
        task_id: String,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "io.modelcontextprotocol/related-task")]
        related: Option<Related>,
    }
    #[derive(serde::Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<Meta>,
    }
    serde_json::from_str::<Params>(raw).ok()?.meta?.related.map(|r| r.task_id)
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
    use serde_json::value::RawValue;

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
            generation: Generation::Legacy,
            status: TaskStatus::Working,
            status_message: None,
            created_at: t,
            last_updated_at: t,
            state_since: t,
            ttl_ms: 60_000,
            poll_interval_ms: 1000,
            outcome: None,
            seq: 1,
            runner: None,
            upstream_task: None,
        };
        let w = Value::Object(rec.to_wire());
        assert_eq!(w["createdAt"], "2025-11-25T10:30:00.123Z");
        assert_eq!(w["ttl"], 60_000);
        assert_eq!(w["pollInterval"], 1000);
        assert!(w.get("statusMessage").is_none());
    }

    #[test]
    fn the_modern_shape_inlines_the_outcome() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_066_600_123);
        let raw = |s: &str| RawValue::from_string(s.into()).unwrap();
        let mut rec = TaskRecord {
            id: "t1".into(),
            owner: "o".into(),
            tool: "slow".into(),
            origin: Origin::Local,
            generation: Generation::Modern,
            status: TaskStatus::Failed,
            status_message: Some("The tool returned an error result (isError: true).".into()),
            created_at: t,
            last_updated_at: t,
            state_since: t,
            ttl_ms: 60_000,
            poll_interval_ms: 1000,
            outcome: Some(Outcome::Result(raw(r#"{"content":[],"isError":true}"#))),
            seq: 1,
            runner: None,
            upstream_task: None,
        };
        let d = Value::Object(rec.to_detailed(None));
        assert_eq!(d["status"], "completed", "isError is completed in 2026-07-28");
        assert_eq!(d["resultType"], "complete");
        assert_eq!(d["result"]["isError"], true);
        assert!(d.get("statusMessage").is_none() && d.get("ttl").is_none() && d.get("error").is_none());
        assert_eq!((d["ttlMs"].as_u64(), d["pollIntervalMs"].as_u64()), (Some(60_000), Some(1000)));
        rec.outcome = Some(Outcome::Error(raw(r#"{"code":-32603,"message":"boom"}"#)));
        let d = Value::Object(rec.to_detailed(None));
        assert_eq!(d["status"], "failed");
        assert_eq!(d["error"]["message"], "boom");
        assert!(d.get("result").is_none());
        let c = Value::Object(rec.to_created());
        assert_eq!(c["resultType"], "task");
        assert!(c.get("task").is_none() && c.get("error").is_none());
    }

    #[test]
    fn related_task_is_read_back() {
        let tagged = with_related_task(r#"{"mode":"form","_meta":{"x":1}}"#, "t-1").unwrap();
        assert_eq!(related_task_of(&tagged).as_deref(), Some("t-1"));
        assert_eq!(related_task_of(r#"{"_meta":{"x":1}}"#), None);
        assert_eq!(related_task_of(r#"{"_meta":{"io.modelcontextprotocol/related-task":7}}"#), None);
        assert_eq!(related_task_of("[]"), None);
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
