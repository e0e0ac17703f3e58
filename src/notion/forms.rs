//! The forms Notion answers in, read tolerantly.
//!
//! Notion's async protocol has been described in more than one shape, and the MCP tool's exact schema
//! is still undocumented, so this module reads every shape seen so far and keeps whatever else comes
//! with it:
//!
//! * the seed's envelope: `{"async_task": {"task_id", "suggested_backoff_ms"}}`;
//! * the published object of the API reference and `@notionhq/client` 5.26: `{"object":
//!   "async_task", "id", "status", "status_url", "created_time", "operation", "poll_after_seconds",
//!   "result" | "error"}`, at the top level or nested (under `async_task` or deeper), named by `id` or
//!   `task_id`, paced by `poll_after_seconds` or `suggested_backoff_ms`;
//! * each of them in `structuredContent` or as JSON in a text content block;
//! * poll answers recognised by `status` alone (`{"status": "running"}` is a poll answer);
//! * Notion's error objects (`{"object": "error", "status", "code", "message", "request_id"}`):
//!   `rate_limited`, `object_not_found` (a finished task past Notion's retention), and the rest.
//!
//! Two entry points, [`read_accepted`] for the answer to an `allow_async` call and [`read_poll`] for
//! the answer to a poll, take the `CallToolResult` as JSON and never panic on any input (a fuzz target
//! calls them).

use serde_json::{Map, Value};
use std::time::Duration;

/// How deep an async task object is looked for inside an answer.
const MAX_DEPTH: usize = 4;
/// The longest pause Notion can ask for that is taken as it is (a larger one is capped).
const MAX_HINT: Duration = Duration::from_secs(600);

/// The status of a Notion async task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotionStatus {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Running again after a failed attempt.
    Retrying,
    /// Done: `result` holds the operation's result.
    Succeeded,
    /// Done: `error` holds Notion's error.
    Failed,
    /// A status Notion did not document (taken as still running).
    Other(String),
}

impl NotionStatus {
    fn parse(s: &str) -> Self {
        match s {
            "queued" => NotionStatus::Queued,
            "running" => NotionStatus::Running,
            "retrying" => NotionStatus::Retrying,
            "succeeded" => NotionStatus::Succeeded,
            "failed" => NotionStatus::Failed,
            other => NotionStatus::Other(other.to_owned()),
        }
    }

    /// The status as Notion writes it.
    pub fn as_str(&self) -> &str {
        match self {
            NotionStatus::Queued => "queued",
            NotionStatus::Running => "running",
            NotionStatus::Retrying => "retrying",
            NotionStatus::Succeeded => "succeeded",
            NotionStatus::Failed => "failed",
            NotionStatus::Other(s) => s,
        }
    }

    /// `succeeded` or `failed`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, NotionStatus::Succeeded | NotionStatus::Failed)
    }

    fn is_documented(s: &str) -> bool {
        matches!(s, "queued" | "running" | "retrying" | "succeeded" | "failed")
    }
}

/// A Notion async task as one answer describes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AsyncTask {
    /// Notion's task id (`id` or `task_id`); a poll answer may omit it.
    pub id: Option<String>,
    /// Its status, when given.
    pub status: Option<NotionStatus>,
    /// How long to wait before the next poll (`poll_after_seconds` or `suggested_backoff_ms`).
    pub poll_after: Option<Duration>,
    /// The attempt number, when given.
    pub attempt: Option<u64>,
    /// The operation's result (on `succeeded`).
    pub result: Option<Value>,
    /// Notion's error (on `failed`).
    pub error: Option<Value>,
    /// The whole object as Notion sent it, unknown fields included.
    pub object: Map<String, Value>,
}

impl AsyncTask {
    /// A task known only by its Notion id (e.g. read back from a store to resume polling it).
    pub fn known(id: &str) -> Self {
        let mut object = Map::new();
        object.insert("id".into(), Value::String(id.to_owned()));
        AsyncTask { id: Some(id.to_owned()), object, ..AsyncTask::default() }
    }

    fn from_object(object: &Map<String, Value>) -> Self {
        let id = ["id", "task_id"].iter().find_map(|k| match object.get(*k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        });
        let poll_after = match (object.get("poll_after_seconds"), object.get("suggested_backoff_ms")) {
            (Some(s), _) if number(s).is_some() => number(s).map(seconds),
            (_, Some(ms)) => number(ms).map(|ms| seconds(ms / 1000.0)),
            _ => None,
        };
        AsyncTask {
            id,
            status: object.get("status").and_then(Value::as_str).map(NotionStatus::parse),
            poll_after,
            attempt: object.get("attempt").and_then(Value::as_u64),
            result: object.get("result").filter(|r| !r.is_null()).cloned(),
            error: object.get("error").filter(|e| !e.is_null()).cloned(),
            object: object.clone(),
        }
    }
}

/// What the answer to an `allow_async` call says.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// The operation runs (or ran) as a Notion async task.
    Task(Box<AsyncTask>),
    /// `rate_limited`: try again after this long (Notion's retry-after, when it named one).
    RateLimited(Option<Duration>),
    /// Anything else: the operation's final result as it stands (Notion answered synchronously, or
    /// refused the call).
    Final,
}

/// What the answer to a poll says.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// The task's status (and its result or error once it ended).
    Status(Box<AsyncTask>),
    /// `rate_limited`: poll again after this long (Notion's retry-after, when it named one).
    RateLimited(Option<Duration>),
    /// Notion does not know the task (`object_not_found`): finished tasks are kept only for a bounded
    /// period. Holds Notion's error object.
    NotFound(Value),
    /// Another Notion error object (e.g. a passing `internal_server_error`).
    Error(Value),
    /// Nothing this module can read.
    Unreadable,
}

/// Reads the answer to an `allow_async` call (a `CallToolResult` as JSON).
pub fn read_accepted(result: &Value) -> Accepted {
    let payloads = payloads(result);
    for p in &payloads {
        if let Some(task) = find_task(p, false) {
            return Accepted::Task(Box::new(AsyncTask::from_object(task)));
        }
    }
    for p in &payloads {
        if let Some(wait) = rate_limit(p) {
            return Accepted::RateLimited(wait);
        }
    }
    if payloads.is_empty() && rate_limit_in_text(result) {
        return Accepted::RateLimited(None);
    }
    Accepted::Final
}

/// Reads the answer to a `notion-get-async-task` poll (a `CallToolResult` as JSON).
pub fn read_poll(result: &Value) -> Poll {
    let payloads = payloads(result);
    for p in &payloads {
        if let Some(task) = find_task(p, true) {
            return Poll::Status(Box::new(AsyncTask::from_object(task)));
        }
    }
    for p in &payloads {
        if let Some(wait) = rate_limit(p) {
            return Poll::RateLimited(wait);
        }
        if let Some(error) = notion_error(p, result) {
            let code = error.get("code").and_then(Value::as_str);
            let status = error.get("status").and_then(Value::as_u64);
            return match code == Some("object_not_found") || status == Some(404) {
                true => Poll::NotFound(Value::Object(error.clone())),
                false => Poll::Error(Value::Object(error.clone())),
            };
        }
    }
    if payloads.is_empty() && rate_limit_in_text(result) {
        return Poll::RateLimited(None);
    }
    Poll::Unreadable
}

/// One line saying what a Notion error is: code, HTTP status, message and request id, as given.
pub fn error_text(error: &Value) -> String {
    let Some(e) = error.as_object() else {
        return match error {
            Value::String(s) => s.clone(),
            other => shown(&other.to_string(), 300),
        };
    };
    let mut text = String::new();
    if let Some(code) = e.get("code").and_then(|c| c.as_str().map(str::to_owned).or_else(|| number_text(c))) {
        text.push_str(&code);
    }
    if let Some(status) = e.get("status").and_then(Value::as_u64) {
        text.push_str(&format!(" (HTTP {status})"));
    }
    if let Some(message) = e.get("message").and_then(Value::as_str) {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(message);
    }
    if text.is_empty() {
        text = shown(&error.to_string(), 300);
    }
    if let Some(id) = e.get("request_id").and_then(Value::as_str) {
        text.push_str(&format!(" (request_id {id})"));
    }
    text
}

/// At most `max` characters of `raw`, saying how much was left out.
pub fn shown(raw: &str, max: usize) -> String {
    match raw.char_indices().nth(max) {
        None => raw.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &raw[..cut], raw.len()),
    }
}

/// The JSON objects an answer may carry: its `structuredContent`, then each text block that is (or
/// holds) a JSON object. A bare object that is not a `CallToolResult` is read as it is.
fn payloads(result: &Value) -> Vec<Map<String, Value>> {
    let Some(r) = result.as_object() else { return Vec::new() };
    let mut found = Vec::new();
    if let Some(Value::Object(s)) = r.get("structuredContent") {
        found.push(s.clone());
    }
    if let Some(Value::Array(blocks)) = r.get("content") {
        for text in blocks.iter().filter_map(|b| b.get("text")?.as_str()) {
            if let Some(m) = json_object_in(text) {
                found.push(m);
            }
        }
    }
    if !r.contains_key("content") && !r.contains_key("structuredContent") {
        found.push(r.clone());
    }
    found
}

/// A JSON object in a text: the whole text, or the part from its first `{` to its last `}` (a line
/// of prose around the JSON).
fn json_object_in(text: &str) -> Option<Map<String, Value>> {
    let text = text.trim();
    if let Ok(Value::Object(m)) = serde_json::from_str(text) {
        return Some(m);
    }
    let (start, end) = (text.find('{')?, text.rfind('}')?);
    match serde_json::from_str(text.get(start..=end)?) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The async task object in a payload. An object counts when it says `"object": "async_task"`, sits
/// under an `async_task` key, or, at the top level, looks like one: a poll answer with a `status`
/// string (`poll`), or an accepted answer naming a task id beside a documented status or a poll hint.
fn find_task(p: &Map<String, Value>, poll: bool) -> Option<&Map<String, Value>> {
    let has_status = |m: &Map<String, Value>| m.get("status").is_some_and(Value::is_string);
    if marked(p) && (!poll || has_status(p)) {
        return Some(p);
    }
    if let Some(Value::Object(inner)) = p.get("async_task")
        && (!poll || has_status(inner))
    {
        return Some(inner);
    }
    if let Some(found) = nested_marked(p, poll, 1) {
        return Some(found);
    }
    let top_level = match poll {
        true => has_status(p),
        false => {
            let documented = p.get("status").and_then(Value::as_str).is_some_and(NotionStatus::is_documented);
            let hint = p.contains_key("poll_after_seconds")
                || p.contains_key("suggested_backoff_ms")
                || p.contains_key("status_url");
            (p.get("task_id").is_some_and(Value::is_string) && (documented || hint))
                || (p.get("id").is_some_and(Value::is_string) && hint && documented)
        }
    };
    top_level.then_some(p)
}

fn marked(m: &Map<String, Value>) -> bool {
    m.get("object").and_then(Value::as_str) == Some("async_task")
}

fn nested_marked(m: &Map<String, Value>, poll: bool, depth: usize) -> Option<&Map<String, Value>> {
    if depth > MAX_DEPTH {
        return None;
    }
    for (key, v) in m {
        let Value::Object(child) = v else { continue };
        if (marked(child) || key == "async_task")
            && (!poll || child.get("status").is_some_and(Value::is_string))
        {
            return Some(child);
        }
        if let Some(found) = nested_marked(child, poll, depth + 1) {
            return Some(found);
        }
    }
    None
}

/// A Notion error object in a payload: the payload itself (`"object": "error"`, or a `code` in an
/// `isError` result) or its `error` member.
fn notion_error<'a>(p: &'a Map<String, Value>, result: &Value) -> Option<&'a Map<String, Value>> {
    let is_error = result.get("isError").and_then(Value::as_bool) == Some(true);
    if p.get("object").and_then(Value::as_str) == Some("error") || (is_error && p.contains_key("code")) {
        return Some(p);
    }
    match p.get("error") {
        Some(Value::Object(e)) if e.contains_key("code") || e.contains_key("message") => Some(e),
        _ => None,
    }
}

/// `Some(wait)` when the payload is Notion's `rate_limited` error (HTTP 429).
fn rate_limit(p: &Map<String, Value>) -> Option<Option<Duration>> {
    let error = p.get("error").and_then(Value::as_object).unwrap_or(p);
    let limited = error.get("code").and_then(Value::as_str) == Some("rate_limited")
        || error.get("status").and_then(Value::as_u64) == Some(429);
    if !limited {
        return None;
    }
    let find = |keys: &[&str]| keys.iter().find_map(|k| error.get(*k).or_else(|| p.get(*k)).and_then(number));
    let ms = find(&["retry_after_ms", "retryAfterMs"]);
    let secs = find(&["retry_after", "retry_after_seconds", "retryAfter"]);
    Some(match (ms, secs) {
        (Some(ms), _) => Some(seconds(ms / 1000.0)),
        (None, Some(s)) => Some(seconds(s)),
        (None, None) => None,
    })
}

fn rate_limit_in_text(result: &Value) -> bool {
    result.get("isError").and_then(Value::as_bool) == Some(true)
        && result.to_string().contains("rate_limited")
}

/// A number, or a string holding one.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
}

fn number_text(v: &Value) -> Option<String> {
    v.as_number().map(ToString::to_string)
}

/// Seconds as a duration: negative is zero, beyond [`MAX_HINT`] is capped.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(MAX_HINT).min(MAX_HINT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: Value) -> Value {
        json!({"content": [{"type": "text", "text": v.to_string()}]})
    }
    fn structured(v: Value) -> Value {
        json!({"content": [{"type": "text", "text": v.to_string()}], "structuredContent": v})
    }
    fn task(a: Accepted) -> AsyncTask {
        match a {
            Accepted::Task(t) => *t,
            other => panic!("not a task: {other:?}"),
        }
    }
    fn status(p: Poll) -> AsyncTask {
        match p {
            Poll::Status(t) => *t,
            other => panic!("not a status: {other:?}"),
        }
    }

    /// The seed's form, as the announcement shows it.
    const SEED: &str = r#"{"async_task": {"task_id": "a1b2c3d4-5678", "suggested_backoff_ms": 1000}}"#;
    /// The published form, as the API reference and @notionhq/client 5.26 describe it.
    const PUBLISHED: &str = r#"{"object": "async_task", "id": "59833787-2cf9-4fdf-8782-e53db20768a5",
        "status": "queued", "status_url": "https://api.notion.com/v1/async_tasks/59833787-2cf9-4fdf-8782-e53db20768a5",
        "created_time": "2026-07-02T10:00:00.000Z", "operation": {"surface": "mcp", "name": "duplicate-page"},
        "poll_after_seconds": 2}"#;

    #[test]
    fn the_seed_envelope_in_text_or_structured_content() {
        let seed: Value = serde_json::from_str(SEED).unwrap();
        for answer in [text(seed.clone()), structured(seed.clone())] {
            let t = task(read_accepted(&answer));
            assert_eq!(t.id.as_deref(), Some("a1b2c3d4-5678"));
            assert_eq!(t.poll_after, Some(Duration::from_secs(1)));
            assert_eq!(t.status, None);
        }
    }

    #[test]
    fn the_published_object_at_the_top_level_keeps_every_field() {
        let published: Value = serde_json::from_str(PUBLISHED).unwrap();
        for answer in [text(published.clone()), structured(published.clone())] {
            let t = task(read_accepted(&answer));
            assert_eq!(t.id.as_deref(), Some("59833787-2cf9-4fdf-8782-e53db20768a5"));
            assert_eq!(t.status, Some(NotionStatus::Queued));
            assert_eq!(t.poll_after, Some(Duration::from_secs(2)));
            assert_eq!(t.object["operation"]["name"], "duplicate-page");
            assert_eq!(t.object["status_url"], published["status_url"]);
        }
    }

    #[test]
    fn the_published_object_nested_with_either_id_or_pacing_name() {
        let hybrid = json!({"async_task": {"object": "async_task", "task_id": "t-1", "status": "running",
            "suggested_backoff_ms": 250, "kind": "duplicate"}});
        let t = task(read_accepted(&structured(hybrid)));
        assert_eq!((t.id.as_deref(), t.poll_after), (Some("t-1"), Some(Duration::from_millis(250))));
        assert_eq!(t.object["kind"], "duplicate");
        let deep =
            json!({"data": {"task": {"object": "async_task", "id": "t-2", "poll_after_seconds": 0.5}}});
        let t = task(read_accepted(&text(deep)));
        assert_eq!((t.id.as_deref(), t.poll_after), (Some("t-2"), Some(Duration::from_millis(500))));
        // Both pacing names: the published one wins.
        let both =
            json!({"object": "async_task", "id": "t-3", "poll_after_seconds": 3, "suggested_backoff_ms": 10});
        assert_eq!(task(read_accepted(&structured(both))).poll_after, Some(Duration::from_secs(3)));
        // An unmarked top-level object naming a task id and a documented status.
        let bare = json!({"task_id": "t-4", "status": "queued"});
        assert_eq!(task(read_accepted(&text(bare))).id.as_deref(), Some("t-4"));
    }

    #[test]
    fn json_inside_a_sentence_of_text_is_found() {
        let answer = json!({"content": [{"type": "text", "text": format!("Started an async task:\n{SEED}\nPoll it.")}]});
        assert_eq!(task(read_accepted(&answer)).id.as_deref(), Some("a1b2c3d4-5678"));
    }

    #[test]
    fn a_synchronous_result_is_final_even_with_ids_and_statuses_inside() {
        for page in [
            json!({"page": {"id": "p-1", "title": "Sprint", "status": "Done"}}),
            json!({"object": "page", "id": "p-2", "properties": {"Status": {"status": {"name": "Done"}}}}),
            json!({"pages": [{"id": "p-3"}]}),
        ] {
            assert_eq!(read_accepted(&structured(page.clone())), Accepted::Final, "{page}");
        }
        assert_eq!(
            read_accepted(&json!({"content": [{"type": "text", "text": "page created"}]})),
            Accepted::Final
        );
        assert_eq!(read_accepted(&json!(null)), Accepted::Final);
    }

    #[test]
    fn a_poll_answer_is_recognised_by_its_status_alone() {
        let t = status(read_poll(&structured(json!({"status": "running"}))));
        assert_eq!((t.status, t.id), (Some(NotionStatus::Running), None));
        let t = status(read_poll(&text(json!({"status": "succeeded", "result": {"page": {"id": "p"}}}))));
        assert_eq!(t.status, Some(NotionStatus::Succeeded));
        assert_eq!(t.result.unwrap()["page"]["id"], "p");
        let t =
            status(read_poll(&structured(json!({"status": "failed", "error": {"code": "conflict_error"}}))));
        assert_eq!(t.error.unwrap()["code"], "conflict_error");
    }

    #[test]
    fn poll_answers_in_the_seed_and_published_forms() {
        let seed = json!({"task_id": "n1", "status": "retrying", "attempt": 2});
        let t = status(read_poll(&structured(seed)));
        assert_eq!((t.status, t.attempt), (Some(NotionStatus::Retrying), Some(2)));
        let mut published: Value = serde_json::from_str(PUBLISHED).unwrap();
        published["status"] = json!("succeeded");
        published["result"] = json!({"page": {"id": "p-9"}});
        published["poll_after_seconds"] = json!(5);
        let t = status(read_poll(&text(published.clone())));
        assert_eq!(t.status, Some(NotionStatus::Succeeded));
        assert_eq!(t.poll_after, Some(Duration::from_secs(5)));
        assert_eq!(t.object["created_time"], published["created_time"]);
        let nested = status(read_poll(&structured(json!({"async_task": {"status": "queued"}}))));
        assert_eq!(nested.status, Some(NotionStatus::Queued));
        let new = status(read_poll(&structured(json!({"status": "paused"}))));
        assert_eq!(new.status, Some(NotionStatus::Other("paused".into())));
        assert!(!new.status.unwrap().is_terminal());
    }

    #[test]
    fn notions_errors_on_a_poll() {
        let limited = json!({"isError": true, "content": [{"type": "text", "text": json!({"object": "error",
            "status": 429, "code": "rate_limited", "message": "Slow down", "retry_after": 2}).to_string()}]});
        assert_eq!(read_poll(&limited), Poll::RateLimited(Some(Duration::from_secs(2))));
        assert_eq!(read_accepted(&limited), Accepted::RateLimited(Some(Duration::from_secs(2))));
        let unparsable =
            json!({"isError": true, "content": [{"type": "text", "text": "rate_limited: slow down"}]});
        assert_eq!(read_poll(&unparsable), Poll::RateLimited(None));
        let gone = json!({"isError": true, "structuredContent": {"object": "error", "status": 404,
            "code": "object_not_found", "message": "Could not find async task", "request_id": "r-1"}});
        let Poll::NotFound(e) = read_poll(&gone) else { panic!() };
        assert_eq!(error_text(&e), "object_not_found (HTTP 404): Could not find async task (request_id r-1)");
        let busy = json!({"isError": true, "structuredContent": {"object": "error", "status": 503,
            "code": "service_unavailable", "message": "Try again"}});
        assert!(matches!(read_poll(&busy), Poll::Error(_)));
        // A failed task whose error is a rate limit is a failed task, not a pause.
        let failed =
            structured(json!({"status": "failed", "error": {"code": "rate_limited", "status": 429}}));
        assert_eq!(status(read_poll(&failed)).status, Some(NotionStatus::Failed));
    }

    #[test]
    fn what_cannot_be_read_says_so() {
        for answer in [
            json!({"content": [{"type": "text", "text": "Task is still going"}]}),
            json!({"content": [], "structuredContent": {"state": "running"}}),
            json!({"content": [{"type": "image", "data": "…"}]}),
            json!("a string"),
            json!({"status": 7}),
        ] {
            assert_eq!(read_poll(&answer), Poll::Unreadable, "{answer}");
        }
    }

    #[test]
    fn odd_numbers_never_panic() {
        for v in [json!(-3), json!(1e300), json!("2.5"), json!("soon"), json!(u64::MAX)] {
            let answer = structured(json!({"object": "async_task", "id": "x", "poll_after_seconds": v}));
            let t = task(read_accepted(&answer));
            assert!(t.poll_after.is_none_or(|d| d <= MAX_HINT), "{v}");
        }
        let answer = structured(json!({"async_task": {"task_id": "x", "suggested_backoff_ms": 0}}));
        assert_eq!(task(read_accepted(&answer)).poll_after, Some(Duration::ZERO));
    }

    #[test]
    fn error_texts_and_truncation() {
        assert_eq!(error_text(&json!("boom")), "boom");
        assert_eq!(error_text(&json!({"message": "only a message"})), "only a message");
        assert_eq!(error_text(&json!({"code": 7})), "7");
        let long = "é".repeat(400);
        let s = shown(&long, 10);
        assert!(s.starts_with(&"é".repeat(10)) && s.ends_with("(800 bytes in all)"), "{s}");
        assert_eq!(shown("short", 10), "short");
    }
}
