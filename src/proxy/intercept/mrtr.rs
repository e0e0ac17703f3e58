//! Multi round-trip requests (2026-07-28): how a modern client answers what the upstream asks during
//! a plain call.
//!
//! A 2025-11-25 upstream asks by sending the client a request (`elicitation/create`,
//! `sampling/createMessage`, `roots/list`) while it works on the call. A 2026-07-28 client cannot
//! receive server requests: it gets the call's answer as `resultType: "input_required"` with the
//! questions in `inputRequests` and an opaque `requestState`, and retries the call with
//! `inputResponses` and that `requestState`. The proxy bridges the two without ever restarting the
//! upstream call: the call is *parked* under a fresh `requestState`, the questions are held, the
//! retry's answers go upstream as the answers to the upstream's own requests, and the upstream's
//! eventual answer to the original call becomes the answer to the retry.
//!
//! A retry of a call from a client that declared the Tasks extension keeps its task window: still
//! running `task_after_ms` after the retry, the call becomes a task (`resultType: "task"`, with no
//! `requestState`).

use super::modern::HeldRequest;
use super::{Interceptor, Rewrite};
use crate::jsonrpc::{self, Id, code};
use crate::proxy::era::Modern;
use crate::proxy::intercept::sync_clients::HandOff;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Parallel questions of one call are gathered this long before the client is asked, so that it
/// answers them in one round.
const GATHER: Duration = Duration::from_millis(25);
/// A parked call whose client never retries is cancelled upstream after this long.
const PARKED_FOR: Duration = Duration::from_secs(600);

/// A call waiting for its client's answers.
pub(super) struct Parked {
    /// The call's id as the upstream knows it (the client's id of the first round).
    call: Id,
    /// The tool, when it is a declared-task call (its retries keep the task window).
    window: Option<String>,
    /// The upstream's questions not yet answered, by key.
    held: BTreeMap<String, HeldRequest>,
    /// The client request waiting for the outcome (the first round, then each retry).
    waiting: Option<Id>,
    /// The upstream's answer, when it came while no request was waiting.
    answer: Option<Vec<u8>>,
    /// Whether a gather of questions is already scheduled.
    gathering: bool,
}

impl Parked {
    /// The tool, for a declared-task call (its retries keep the task window).
    pub(super) fn window(&self) -> Option<String> {
        self.window.clone()
    }
}

/// What a `requestState` names: a parked call (the token is unguessable, like a task id).
fn new_state() -> String {
    format!("mcp-asyncify-rs-{}", uuid::Uuid::new_v4().simple())
}

impl Interceptor {
    /// The upstream asked a question during a modern plain call (or a declared-task call still in its
    /// window): the call is parked, and its client is asked through `input_required`.
    pub(super) fn park_question(
        self: &Arc<Self>,
        call: &Id,
        window: Option<String>,
        id: &Id,
        method: &str,
        params: Option<&RawValue>,
    ) {
        let state = match self.trips.parked_calls.get(call) {
            Some(state) => state.clone(),
            None => {
                let state = new_state();
                if !self.pending.set_rewrite(call, Rewrite::Parked { state: state.clone() }) {
                    return; // answered meanwhile; the question goes unanswered by design of the race
                }
                let parked = Parked {
                    call: call.clone(),
                    window,
                    held: BTreeMap::new(),
                    waiting: Some(call.clone()),
                    answer: None,
                    gathering: false,
                };
                self.trips.parked.insert(state.clone(), parked);
                self.trips.parked_calls.insert(call.clone(), state.clone());
                self.expire_parked(state.clone());
                state
            }
        };
        let gather = match self.trips.parked.get_mut(&state) {
            Some(mut p) => {
                p.held.insert(super::modern::input_key(), HeldRequest::new(id, method, params));
                let gather = p.waiting.is_some() && !p.gathering;
                p.gathering |= gather;
                gather
            }
            None => false,
        };
        tracing::debug!(%call, method, "a modern call asks its client for input");
        if gather {
            self.spawn_ask(state);
        }
    }

    /// After a short gathering, asks the waiting request with every open question.
    fn spawn_ask(self: &Arc<Self>, state: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(GATHER).await;
            let line = {
                let Some(mut p) = this.trips.parked.get_mut(&state) else { return };
                p.gathering = false;
                let Some(waiting) = p.waiting.take() else { return };
                input_required(&waiting, &p.held, &state)
            };
            this.client.send(line).await;
        });
    }

    /// A modern request carrying `requestState`: a retry of a parked call, with answers.
    pub(super) async fn on_retry(
        self: &Arc<Self>,
        id: &Id,
        state: &str,
        params: &Map<String, Value>,
        modern: &Modern,
    ) {
        let responses = match params.get("inputResponses") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(r)) => r.clone(),
            Some(other) => {
                let msg = format!("params.inputResponses must be an object of answers by key, got {other}");
                let line = jsonrpc::error_response(Some(id), code::INVALID_PARAMS, &msg, None);
                self.client.send(line).await;
                return;
            }
        };
        let (answers, now) = {
            let Some(mut p) = self.trips.parked.get_mut(state) else {
                let msg =
                    "Invalid params: requestState is unknown or expired; send the request again without it";
                let line = jsonrpc::error_response(Some(id), code::INVALID_PARAMS, msg, None);
                self.client.send(line).await;
                return;
            };
            let answers: Vec<(Id, String)> = responses
                .iter()
                .filter_map(|(k, v)| p.held.remove(k).map(|h| (h.upstream_id, v.to_string())))
                .collect();
            // What the retry gets now: the upstream's answer if it came, else the questions still open,
            // else nothing yet (it waits for the upstream, in its task window if it has one).
            let now = if let Some(answer) = p.answer.take() {
                Some(Ok(answer))
            } else if !p.held.is_empty() {
                Some(Err(input_required(id, &p.held, state)))
            } else {
                p.waiting = Some(id.clone());
                None
            };
            (answers, now)
        };
        for (upstream_id, answer) in &answers {
            self.upstream.answer(upstream_id, answer).await;
        }
        match now {
            Some(Ok(answer)) => {
                self.forget_parked(state);
                self.client.send(with_id(&answer, id)).await;
            }
            Some(Err(line)) => {
                self.client.send(line).await;
            }
            None => {
                let window = self.trips.parked.get(state).and_then(|p| p.window.clone());
                if let (Some(tool), true) = (window, modern.tasks) {
                    self.watch_retry_window(id.clone(), state.to_owned(), tool);
                }
            }
        }
    }

    /// A retry of a declared-task call still running after `task_after_ms` becomes a task.
    fn watch_retry_window(self: &Arc<Self>, retry: Id, state: String, tool: String) {
        let window = Duration::from_millis(self.engine.config().task_after_ms);
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let call = match this.trips.parked.get(&state) {
                Some(p) if p.waiting.as_ref() == Some(&retry) && p.answer.is_none() && p.held.is_empty() => {
                    p.call.clone()
                }
                _ => return,
            };
            // The upstream's answer to the call now completes the task; the retry gets the task. (If the
            // answer wins the race, it has gone to the retry already and no task is made.)
            if this.hand_off_as(&call, &retry, &tool, Instant::now(), HandOff::Task).await.is_some() {
                this.forget_parked(&state);
            }
        });
    }

    /// The upstream answered a parked call: the waiting request gets the answer, or it is kept for
    /// the retry. Returns the line to send, if any.
    pub(super) fn parked_answered(
        &self,
        state: &str,
        result: Option<&RawValue>,
        error: Option<&RawValue>,
    ) -> Option<Vec<u8>> {
        let placeholder = Id::string("parked");
        let answer = match (result, error) {
            (Some(r), _) => jsonrpc::result_response(&placeholder, &jsonrpc::mark_complete(r.get())),
            (None, Some(e)) => jsonrpc::error_object_response(&placeholder, e.get()),
            (None, None) => return None,
        };
        let waiting = {
            let mut p = self.trips.parked.get_mut(state)?;
            match p.waiting.take() {
                Some(w) => Some(w),
                None => {
                    p.answer = Some(answer.clone());
                    None
                }
            }
        };
        let waiting = waiting?;
        self.forget_parked(state);
        Some(with_id(&answer, &waiting))
    }

    /// The upstream is gone with a parked call: the request waiting for it (if any) must be told.
    pub fn parked_failed(&self, state: &str) -> Option<Id> {
        let (_, p) = self.trips.parked.remove(state)?;
        self.trips.parked_calls.remove(&p.call);
        p.waiting
    }

    /// Whether `id` is a parked call's (the upstream still works on it under that id).
    pub fn is_parked(&self, id: &Id) -> bool {
        self.trips.parked_calls.contains_key(id)
    }

    fn forget_parked(&self, state: &str) {
        if let Some((_, p)) = self.trips.parked.remove(state) {
            self.trips.parked_calls.remove(&p.call);
        }
    }

    /// A parked call never retried is given up: cancelled upstream, its questions refused.
    fn expire_parked(self: &Arc<Self>, state: String) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(PARKED_FOR).await;
            let Some(this) = this.upgrade() else { return };
            let Some((_, p)) = this.trips.parked.remove(&state) else { return };
            this.trips.parked_calls.remove(&p.call);
            tracing::info!(call = %p.call, "a call waiting for its client's answers was given up (no retry)");
            this.pending.finish_client(&p.call);
            for h in p.held.into_values() {
                this.upstream.refuse(&h.upstream_id, code::INTERNAL_ERROR, "the client never answered").await;
            }
            this.cancel_upstream(&p.call, "the client never answered its input requests").await;
        });
    }
}

/// `resultType: "input_required"` for `id`, with every open question and the state to retry with.
fn input_required(id: &Id, held: &BTreeMap<String, HeldRequest>, state: &str) -> Vec<u8> {
    let requests: Map<String, Value> = held.iter().map(|(k, h)| (k.clone(), h.request.clone())).collect();
    let result = json!({ "resultType": "input_required", "inputRequests": requests, "requestState": state });
    jsonrpc::result_response(id, &result.to_string())
}

/// A response line under another id.
fn with_id(line: &[u8], id: &Id) -> Vec<u8> {
    match jsonrpc::Envelope::parse(line) {
        Ok(env) => jsonrpc::with_id(&env, id),
        Err(_) => line.to_vec(),
    }
}

/// What became of a client's answer to a request the proxy sent it.
pub enum ClientAnswer {
    /// Not one of the proxy's: forward it upstream.
    NotOurs,
    /// Kept (more answers are awaited).
    Taken,
    /// Every question is answered: send this retry of the call upstream.
    Retry(Vec<u8>),
}

/// A 2025-11-25 client's call that a 2026-07-28 upstream answered with questions: asked one
/// `elicitation/create` (or sampling, roots) request each, then retried with the answers.
pub(super) struct LegacyRound {
    /// The upstream's `requestState`, sent back with the retry.
    state: Option<Value>,
    /// Questions not answered yet.
    waiting: usize,
    /// Answers by key.
    answers: Map<String, Value>,
}

/// Ids of the requests the proxy sends a 2025-11-25 client on a 2026-07-28 upstream's behalf.
static ASK_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Interceptor {
    /// Remembers what a 2025-11-25 client asked a 2026-07-28 upstream, in case the upstream answers
    /// with questions and the call must be sent again with the answers.
    pub(super) fn remember_for_retry(&self, id: &Id, method: &str, params: &str) {
        if matches!(method, "tools/call" | "prompts/get" | "resources/read") {
            self.trips.retries.insert(id.clone(), (method.to_owned(), params.to_owned()));
        }
    }

    /// The answer to a 2025-11-25 client's call from a 2026-07-28 upstream: when it is questions
    /// (`input_required`), returns the requests to ask the client instead (the call stays pending).
    pub fn legacy_round(&self, call: &Id, result: Option<&RawValue>) -> Option<Vec<Vec<u8>>> {
        if self.trips.retries.is_empty() {
            return None;
        }
        let asks = result
            .filter(|r| {
                static WORD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
                    std::sync::LazyLock::new(|| memchr::memmem::Finder::new("input_required"));
                jsonrpc::may_contain_key(r.get().as_bytes(), &WORD)
            })
            .and_then(|r| serde_json::from_str::<Map<String, Value>>(r.get()).ok())
            .filter(|r| r.get("resultType").and_then(Value::as_str) == Some("input_required"));
        let Some(answer) = asks else {
            self.trips.retries.remove(call);
            return None;
        };
        let requests = answer.get("inputRequests").and_then(Value::as_object).cloned().unwrap_or_default();
        if requests.is_empty() || !self.trips.retries.contains_key(call) {
            self.trips.retries.remove(call);
            return None;
        }
        let round = LegacyRound {
            state: answer.get("requestState").cloned(),
            waiting: requests.len(),
            answers: Map::new(),
        };
        self.trips.legacy_rounds.insert(call.clone(), round);
        let lines = requests
            .into_iter()
            .map(|(key, request)| {
                let ask = Id::string(&format!(
                    "mcp-asyncify-ask-{}",
                    ASK_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                self.trips.asks.insert(ask.clone(), (call.clone(), key));
                let method =
                    request.get("method").and_then(Value::as_str).unwrap_or("elicitation/create").to_owned();
                let params = request.get("params").map(Value::to_string);
                jsonrpc::request(&ask, &method, params.as_deref())
            })
            .collect();
        tracing::debug!(%call, "a 2026-07-28 upstream asked a 2025-11-25 client's call something: asking the client");
        Some(lines)
    }

    /// A client's answer: to one of the proxy's questions (kept, and once all are in, the call is
    /// retried upstream with them), or to the upstream's own request.
    pub fn on_client_answer(
        &self,
        id: &Id,
        result: Option<&RawValue>,
        error: Option<&RawValue>,
    ) -> ClientAnswer {
        if self.trips.asks.is_empty() {
            return ClientAnswer::NotOurs;
        }
        let Some((_, (call, key))) = self.trips.asks.remove(id) else { return ClientAnswer::NotOurs };
        // A refusal is answered as a declined elicitation (the one answer every question type has).
        let answer = match (result, error) {
            (Some(r), _) => serde_json::from_str(r.get()).unwrap_or(Value::Null),
            _ => json!({ "action": "decline" }),
        };
        let done = match self.trips.legacy_rounds.get_mut(&call) {
            Some(mut round) => {
                round.answers.insert(key, answer);
                round.waiting = round.waiting.saturating_sub(1);
                round.waiting == 0
            }
            None => return ClientAnswer::Taken,
        };
        if !done {
            return ClientAnswer::Taken;
        }
        let (Some((_, round)), Some(retry)) =
            (self.trips.legacy_rounds.remove(&call), self.trips.retries.get(&call).map(|r| r.clone()))
        else {
            return ClientAnswer::Taken;
        };
        let (method, params) = retry;
        let mut params = serde_json::from_str::<Map<String, Value>>(&params).unwrap_or_default();
        params.insert("inputResponses".into(), Value::Object(round.answers));
        match round.state {
            Some(state) => params.insert("requestState".into(), state),
            None => params.remove("requestState"),
        };
        ClientAnswer::Retry(jsonrpc::request(&call, &method, Some(&Value::Object(params).to_string())))
    }
}
