//! The adapter's loop against a scripted Notion: each test gives the answers Notion sends (captured
//! forms, failures, silence) and checks how the task ends and how the polls were paced.

use super::*;
use crate::config::{NotionMode, TasksConfig};
use crate::jsonrpc::Id;
use crate::jsonrpc::Outcome;
use crate::tasks::model::{Generation, Origin, TaskRecord};
use crate::tasks::store::memory::MemoryStore;
use crate::upstream::own::{OwnRequests, OwnWaiter};
use std::collections::VecDeque;
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

/// One answer of the scripted Notion.
enum Answer {
    /// A tool result (a `CallToolResult` as JSON).
    Result(Value),
    /// A JSON-RPC error.
    Error(Value),
    /// No answer at all (the poll times out).
    Silent,
}

fn tool(v: Value) -> Answer {
    Answer::Result(json!({ "content": [{ "type": "text", "text": v.to_string() }], "structuredContent": v }))
}

struct Run {
    record: TaskRecord,
    /// When each poll was sent, since the start was answered.
    polls: Vec<Duration>,
}

fn config() -> NotionConfig {
    NotionConfig {
        mode: NotionMode::On,
        budget_per_second: 1000,
        default_backoff_ms: 10,
        max_backoff_ms: 40,
        poll_timeout_ms: 200,
        ..NotionConfig::default()
    }
}

/// Runs one task whose start gets `start` and whose polls get `polls` in order (then `Silent`).
async fn run(config: NotionConfig, start: Answer, polls: Vec<Answer>) -> Run {
    let own = Arc::new(OwnRequests::new());
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (sink, _closer) = crate::transport::lines::spawn_line_writer(ours, 64);
    let (_exit_tx, exit) = tokio::sync::watch::channel(None);
    let upstream = Upstream::new(sink, own.clone(), exit);
    let engine = TaskEngine::new(TasksConfig::default(), Arc::new(MemoryStore::new()));
    let record = engine
        .create("test", "notion-duplicate-page", Origin::Notion, Generation::Legacy, None)
        .await
        .unwrap();
    let adapter = NotionAdapter::new(config, Arc::new(PollScheduler::new(1000)));

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake = {
        let own = own.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(theirs).lines();
            let mut answers: VecDeque<Answer> = std::iter::once(start).chain(polls).collect();
            let mut started: Option<Instant> = None;
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                match request["params"]["name"].as_str() {
                    Some("notion-get-async-task") => {
                        let t = started.expect("a poll comes after the start");
                        seen.lock().unwrap().push(t.elapsed());
                    }
                    _ => {
                        assert_eq!(request["params"]["arguments"]["allow_async"], true, "{request}");
                        started = Some(Instant::now());
                    }
                }
                let id = Id::from_raw(&RawValue::from_string(request["id"].to_string()).unwrap());
                let reply = match answers.pop_front().unwrap_or(Answer::Silent) {
                    Answer::Result(v) => Outcome::Result(RawValue::from_string(v.to_string()).unwrap()),
                    Answer::Error(e) => Outcome::Error(RawValue::from_string(e.to_string()).unwrap()),
                    Answer::Silent => continue,
                };
                if let Some(OwnWaiter::Caller(tx)) = own.take(&id) {
                    let _ = tx.send(reply);
                }
            }
        })
    };
    let (_stop_tx, stop) = oneshot::channel();
    let call = json!({ "name": "notion-duplicate-page", "arguments": { "page_id": "p" } });
    let call = call.as_object().unwrap().clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        adapter.run_task(&engine, &upstream, &record.id, call, stop),
    )
    .await
    .expect("the task ends: never polls forever");
    drop(upstream);
    drop(adapter);
    let record = engine.get("test", &record.id).await.unwrap();
    fake.abort();
    let polls = seen.lock().unwrap().clone();
    Run { record, polls }
}

fn result_of(r: &TaskRecord) -> Value {
    match &r.outcome {
        Some(Outcome::Result(raw)) => serde_json::from_str(raw.get()).unwrap(),
        other => panic!("no result: {other:?}"),
    }
}

const PAGE: &str = r#"{"page": {"id": "page-1", "title": "Sprint (copy)"}}"#;

fn published(status: &str) -> Value {
    json!({"object": "async_task", "id": "nt-1", "status": status, "status_url": "https://api.notion.com/v1/async_tasks/nt-1",
        "created_time": "2026-07-02T10:00:00.000Z", "operation": {"surface": "mcp", "name": "duplicate-page"},
        "poll_after_seconds": 0.01, "future_field": 1})
}

#[tokio::test]
async fn the_published_form_is_polled_to_its_result_not_taken_for_it() {
    let mut done = published("succeeded");
    done["result"] = serde_json::from_str(PAGE).unwrap();
    let r = run(config(), tool(published("queued")), vec![tool(published("running")), tool(done)]).await;
    assert_eq!(r.record.status, TaskStatus::Completed, "{:?}", r.record);
    let body = result_of(&r.record);
    assert_eq!(body["structuredContent"]["page"]["id"], "page-1", "{body}");
    assert!(!body["content"].to_string().contains("async_task"), "{body}");
    let kept = &body["_meta"]["io.mcp-asyncify/notion"];
    assert_eq!(kept["async_task"]["future_field"], 1, "unknown fields kept: {body}");
    assert_eq!(kept["status"]["status"], "succeeded");
    assert_eq!(r.polls.len(), 2);
}

#[tokio::test]
async fn minimal_poll_answers_with_only_a_status_end_the_task() {
    let accepted = json!({"async_task": {"task_id": "nt-2", "suggested_backoff_ms": 10}});
    let polls = vec![
        tool(json!({"status": "queued"})),
        tool(json!({"status": "succeeded", "result": {"page": {"id": "p2"}}})),
    ];
    let r = run(config(), tool(accepted), polls).await;
    assert_eq!(r.record.status, TaskStatus::Completed);
    assert_eq!(result_of(&r.record)["structuredContent"]["page"]["id"], "p2");
    let failed = vec![tool(json!({"status": "failed", "error": {"object": "error", "status": 409,
        "code": "conflict_error", "message": "Conflict occurred while saving.", "request_id": "req-9"}}))];
    let r = run(config(), tool(json!({"async_task": {"task_id": "nt-3"}})), failed).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    assert_eq!(
        r.record.status_message.as_deref(),
        Some(
            "Notion task failed: conflict_error (HTTP 409): Conflict occurred while saving. (request_id req-9)"
        )
    );
    assert_eq!(result_of(&r.record)["structuredContent"]["error"]["request_id"], "req-9");
}

#[tokio::test]
async fn an_accepted_answer_that_already_ended_needs_no_poll() {
    let mut done = published("succeeded");
    done["result"] = serde_json::from_str(PAGE).unwrap();
    let r = run(config(), tool(done), vec![]).await;
    assert_eq!(r.record.status, TaskStatus::Completed);
    assert!(r.polls.is_empty());
    let r = run(config(), tool(json!({"object": "async_task", "status": "queued"})), vec![]).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    assert!(r.record.status_message.unwrap().contains("named no task id"));
}

#[tokio::test]
async fn unreadable_answers_fail_the_task_after_a_few_showing_the_answer() {
    let garbage =
        || Answer::Result(json!({"content": [{"type": "text", "text": "Task nt-4 is doing fine"}]}));
    let r = run(config(), tool(published("queued")), vec![garbage(), garbage(), garbage(), garbage()]).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    let message = r.record.status_message.unwrap();
    assert!(
        message.contains("failed 3 times in a row") && message.contains("Task nt-4 is doing fine"),
        "{message}"
    );
    assert_eq!(r.polls.len(), 3, "no fourth poll");
    // Truncated sensibly.
    let huge = || Answer::Result(json!({"content": [{"type": "text", "text": "x".repeat(100_000)}]}));
    let r = run(config(), tool(published("queued")), vec![huge(), huge(), huge()]).await;
    let message = r.record.status_message.unwrap();
    assert!(message.len() < 1000 && message.contains("bytes in all"), "{}", message.len());
}

#[tokio::test]
async fn a_failed_or_silent_poll_is_retried_with_backoff_before_the_task_fails() {
    let error = || Answer::Error(json!({"code": -32603, "message": "Internal error"}));
    let mut done = published("succeeded");
    done["result"] = serde_json::from_str(PAGE).unwrap();
    let r = run(config(), tool(published("queued")), vec![error(), Answer::Silent, tool(done)]).await;
    assert_eq!(r.record.status, TaskStatus::Completed, "{:?}", r.record);
    assert_eq!(r.polls.len(), 3);
    // The silent poll waited its 200 ms timeout before the next one.
    assert!(r.polls[2] - r.polls[1] >= Duration::from_millis(200), "{:?}", r.polls);
    let r = run(config(), tool(published("queued")), vec![error(), error(), error()]).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    assert!(r.record.status_message.unwrap().contains("the poll failed: Internal error"));
    let r = run(config(), tool(published("queued")), vec![]).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    assert!(r.record.status_message.unwrap().contains("no answer within 200 ms"));
}

#[tokio::test]
async fn a_task_past_notions_retention_fails_saying_so() {
    let gone = Answer::Result(
        json!({"isError": true, "content": [{"type": "text", "text": json!({"object": "error",
        "status": 404, "code": "object_not_found", "message": "Could not find async task with ID: nt-1."}).to_string()}]}),
    );
    let r = run(config(), tool(published("queued")), vec![gone]).await;
    assert_eq!(r.record.status, TaskStatus::Failed);
    let message = r.record.status_message.unwrap();
    assert!(message.contains("no longer knows task nt-1") && message.contains("limited time"), "{message}");
}

#[tokio::test]
async fn poll_after_seconds_is_a_floor_and_a_zero_backoff_still_grows() {
    // Notion asks for 150 ms between polls; the backoff (10 ms) alone would poll sooner.
    let mut slow = published("running");
    slow["poll_after_seconds"] = json!(0.15);
    let mut done = published("succeeded");
    done["result"] = serde_json::from_str(PAGE).unwrap();
    let r = run(config(), tool(published("queued")), vec![tool(slow), tool(done)]).await;
    assert!(r.polls[1] - r.polls[0] >= Duration::from_millis(150), "{:?}", r.polls);
    // A suggested backoff of 0: polls at 0, 100, 150+ ms apart, never a busy loop.
    let accepted = json!({"async_task": {"task_id": "nt-0", "suggested_backoff_ms": 0}});
    let running = || tool(json!({"status": "running"}));
    let mut cfg = config();
    cfg.max_backoff_ms = 10_000;
    let r = run(cfg, tool(accepted), vec![running(), running(), tool(json!({"status": "succeeded"}))]).await;
    assert_eq!(r.record.status, TaskStatus::Completed);
    assert!(r.polls[1] - r.polls[0] >= Duration::from_millis(100), "{:?}", r.polls);
    assert!(r.polls[2] - r.polls[1] >= Duration::from_millis(150), "{:?}", r.polls);
}

#[tokio::test]
async fn a_rate_limited_start_is_retried_and_a_sync_answer_completes_at_once() {
    let limited =
        Answer::Result(json!({"isError": true, "structuredContent": {"object": "error", "status": 429,
        "code": "rate_limited", "message": "Slow down", "retry_after_ms": 20}}));
    let sync = tool(serde_json::from_str(PAGE).unwrap());
    let r = run(config(), limited, vec![sync]).await;
    assert_eq!(r.record.status, TaskStatus::Completed, "{:?}", r.record);
    assert_eq!(result_of(&r.record)["structuredContent"]["page"]["id"], "page-1");
}

#[test]
fn a_success_without_a_result_is_still_a_valid_tool_result() {
    for result in [None, Some(Value::Null), Some(json!([1, 2]))] {
        let body = succeeded_result(result.clone(), json!({}));
        assert!(body.get("structuredContent").is_none(), "{result:?}: {body}");
        assert!(!body["content"][0]["text"].as_str().unwrap().is_empty(), "{body}");
        assert_eq!(body["isError"], false);
    }
    let body = succeeded_result(Some(json!({"page": {"id": "p"}})), json!({}));
    assert_eq!(body["structuredContent"]["page"]["id"], "p");
    // An MCP operation's result that is itself a tool result is used as it is.
    let tool_result = json!({"content": [{"type": "text", "text": "Created"}], "_meta": {"x": 1}});
    let body = succeeded_result(Some(tool_result), json!({"ours": 2}));
    assert_eq!(body["content"][0]["text"], "Created");
    assert_eq!((body["_meta"]["x"].clone(), body["_meta"]["ours"].clone()), (json!(1), json!(2)));
}
