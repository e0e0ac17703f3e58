//! The persisted form of a task record: JSON, with times in milliseconds since the Unix epoch (the
//! wire shows milliseconds too) and the outcome kept as the raw JSON the upstream sent.

use crate::tasks::model::{Generation, Origin, Outcome, TaskRecord, TaskStatus};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::time::{Duration, SystemTime};

#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    // First, so that a store can number a record without parsing it (see the Redis insert script).
    seq: u64,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    owner: Cow<'a, str>,
    #[serde(borrow)]
    tool: Cow<'a, str>,
    #[serde(borrow)]
    origin: Cow<'a, str>,
    #[serde(borrow)]
    generation: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    message: Option<Cow<'a, str>>,
    created_ms: u64,
    updated_ms: u64,
    since_ms: u64,
    ttl_ms: u64,
    poll_ms: u64,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    runner: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    upstream_task: Option<Cow<'a, str>>,
}

/// Milliseconds since the epoch.
pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The time `ms` milliseconds after the epoch.
pub fn time(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Encodes a record.
pub fn encode(r: &TaskRecord) -> Vec<u8> {
    let (result, error) = match &r.outcome {
        Some(Outcome::Result(raw)) => (Some(raw.as_ref()), None),
        Some(Outcome::Error(raw)) => (None, Some(raw.as_ref())),
        None => (None, None),
    };
    let stored = Stored {
        seq: r.seq,
        id: Cow::Borrowed(&r.id),
        owner: Cow::Borrowed(&r.owner),
        tool: Cow::Borrowed(&r.tool),
        origin: Cow::Borrowed(r.origin.as_str()),
        generation: Cow::Borrowed(match r.generation {
            Generation::Legacy => "legacy",
            Generation::Modern => "modern",
        }),
        status: Cow::Borrowed(r.status.as_str()),
        message: r.status_message.as_deref().map(Cow::Borrowed),
        created_ms: ms(r.created_at),
        updated_ms: ms(r.last_updated_at),
        since_ms: ms(r.state_since),
        ttl_ms: r.ttl_ms,
        poll_ms: r.poll_interval_ms,
        result,
        error,
        runner: r.runner.as_deref().map(Cow::Borrowed),
        upstream_task: r.upstream_task.as_deref().map(Cow::Borrowed),
    };
    serde_json::to_vec(&stored).expect("a task record always serializes")
}

/// Decodes a record; a damaged one is an error naming what is wrong.
pub fn decode(bytes: &[u8]) -> Result<TaskRecord, String> {
    let s: Stored<'_> = serde_json::from_slice(bytes).map_err(|e| format!("unreadable task record: {e}"))?;
    let status = match s.status.as_ref() {
        "working" => TaskStatus::Working,
        "input_required" => TaskStatus::InputRequired,
        "completed" => TaskStatus::Completed,
        "failed" => TaskStatus::Failed,
        "cancelled" => TaskStatus::Cancelled,
        other => return Err(format!("task {}: unknown status {other:?}", s.id)),
    };
    let origin = match s.origin.as_ref() {
        "notion" => Origin::Notion,
        "native" => Origin::Native,
        _ => Origin::Local,
    };
    let generation = match s.generation.as_ref() {
        "modern" => Generation::Modern,
        _ => Generation::Legacy,
    };
    let outcome = match (s.result, s.error) {
        (Some(r), _) => Some(Outcome::Result(r.to_owned())),
        (None, Some(e)) => Some(Outcome::Error(e.to_owned())),
        (None, None) => None,
    };
    Ok(TaskRecord {
        id: s.id.into_owned(),
        owner: s.owner.into_owned(),
        tool: s.tool.into_owned(),
        origin,
        generation,
        status,
        status_message: s.message.map(Cow::into_owned),
        created_at: time(s.created_ms),
        last_updated_at: time(s.updated_ms),
        state_since: time(s.since_ms),
        ttl_ms: s.ttl_ms,
        poll_interval_ms: s.poll_ms,
        outcome,
        seq: s.seq,
        runner: s.runner.map(Cow::into_owned),
        upstream_task: s.upstream_task.map(Cow::into_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_its_raw_outcome() {
        let t = time(1_764_066_600_123);
        let r = TaskRecord {
            id: "t1".into(),
            owner: "o".into(),
            tool: "slow".into(),
            origin: Origin::Notion,
            generation: Generation::Modern,
            status: TaskStatus::Completed,
            status_message: Some("done \"quoted\"".into()),
            created_at: t,
            last_updated_at: t + Duration::from_millis(5),
            state_since: t + Duration::from_millis(5),
            ttl_ms: 60_000,
            poll_interval_ms: 1000,
            outcome: Some(Outcome::Result(RawValue::from_string(r#"{"content": [ 1 ]}"#.into()).unwrap())),
            seq: 7,
            runner: Some("p1".into()),
            upstream_task: Some("notion-9".into()),
        };
        let back = decode(&encode(&r)).unwrap();
        assert_eq!(back.status_message, r.status_message);
        assert_eq!((back.created_at, back.last_updated_at, back.seq), (r.created_at, r.last_updated_at, 7));
        assert_eq!((back.origin, back.generation), (Origin::Notion, Generation::Modern));
        assert_eq!(back.upstream_task.as_deref(), Some("notion-9"));
        match back.outcome {
            Some(Outcome::Result(raw)) => assert_eq!(raw.get(), r#"{"content": [ 1 ]}"#, "byte for byte"),
            other => panic!("{other:?}"),
        }
        assert!(decode(b"{\"id\":1}").unwrap_err().contains("unreadable"));
    }
}
