//! Stateless (2026-07-28) requests on the sidecar: checked against their routing headers, served on
//! the upstream connection kept for their credential under ids of the sidecar's own, and
//! `subscriptions/listen` streams that carry only their own subscription's messages.

use super::{HttpBody, HttpSession, Sidecar, accepted, full, short};
use crate::jsonrpc::{self, Envelope, Id, Kind, Message, code};
use crate::proxy::era::{self, Era};
use crate::proxy::intercept::SUBSCRIPTION_ID;
use http::{HeaderMap, Response, StatusCode};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Sidecar {
    /// A stateless (2026-07-28) message: its headers checked against its body, then served on the
    /// upstream connection kept for its credential, under an id of the sidecar's own.
    pub(super) async fn stateless(
        self: Arc<Self>,
        headers: &HeaderMap,
        env: &Envelope<'_>,
        era: Era,
        token: Option<String>,
    ) -> Response<HttpBody> {
        let method = env.method.unwrap_or_default();
        match &era {
            Era::Unsupported(version) => {
                let line = era::unsupported_version(env.id.as_ref(), version);
                return full(StatusCode::BAD_REQUEST, "application/json", line);
            }
            Era::Modern(_) => {
                let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let routing = era::RoutingHeaders {
                    version: text("mcp-protocol-version"),
                    method: text("mcp-method"),
                    name: text("mcp-name"),
                };
                if let Err(why) = era::check_headers(&routing, method, env.params) {
                    tracing::debug!(
                        method,
                        why,
                        "refused a stateless request whose headers do not match its body"
                    );
                    let line = jsonrpc::error_response(env.id.as_ref(), code::HEADER_MISMATCH, &why, None);
                    return full(StatusCode::BAD_REQUEST, "application/json", line);
                }
            }
            Era::Legacy => {} // a bare server/discover probe
        }
        let session = match self.clone().stateless_session(headers).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        session.touch();
        let Some(original) = env.id.clone().filter(|_| env.kind == Kind::Request) else {
            session
                .router
                .route_client(jsonrpc::notification(method, env.params.map(|p| p.get())).into())
                .await;
            return accepted();
        };
        let n = session.next_internal.fetch_add(1, Ordering::Relaxed);
        let internal = Id::string(&format!("stateless-{n}"));
        let line = jsonrpc::with_id(env, &internal);
        self.exchange(&session, internal, line.into(), token, Some(original), None).await
    }

    /// The upstream connection that serves stateless requests of this credential, opened (and
    /// initialized by the proxy, on its first request) when there is none.
    async fn stateless_session(
        self: Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Arc<HttpSession>, Response<HttpBody>> {
        let credential = self.credential(headers);
        let key = credential.clone().unwrap_or_default();
        if let Some(s) = self.in_use(&key) {
            return Ok(s);
        }
        let _opening = self.opening.lock().await;
        if let Some(s) = self.in_use(&key) {
            return Ok(s);
        }
        let owner = match &credential {
            Some(c) => c.clone(),
            // Without a credential, task ids (unguessable) are what binds a task to its client.
            None => "stateless".to_owned(),
        };
        let id = format!("stateless-{}", uuid::Uuid::new_v4().simple());
        let session = self.clone().spawn_session(headers, id, credential, owner).await?;
        self.stateless.insert(key, session.clone());
        tracing::info!(session = %short(&session.id), "opened an upstream connection for stateless requests");
        Ok(session)
    }

    /// The stateless connection kept for `key`, marked in use while the map's lock is held: the idle
    /// reaper checks idleness again under that lock before it takes a connection out, so it never
    /// retires one that has just admitted a request.
    fn in_use(&self, key: &str) -> Option<Arc<HttpSession>> {
        let entry = self.stateless.get(key)?;
        entry.touch();
        Some(entry.value().clone())
    }
}

impl HttpSession {
    /// A message of a `subscriptions/listen` goes on that request's stream, and nowhere else. When
    /// the stream is gone, so is the subscription: it is cancelled as if the client had.
    pub(super) fn to_subscriber(&self, subscription: &Id, line: &Message) {
        if let Some(w) = self.waiting.get(subscription) {
            let line = match &w.original {
                Some(original) => Message::from(with_subscription_id(line.bytes(), original)),
                None => line.clone(),
            };
            if w.out.send(line).is_ok() {
                return;
            }
        }
        self.waiting.remove(subscription);
        let params = format!("{{\"requestId\":{},\"reason\":\"the stream closed\"}}", subscription.as_json());
        let cancel = jsonrpc::notification("notifications/cancelled", Some(&params));
        let router = self.router.clone();
        tokio::spawn(async move { router.route_client(cancel.into()).await });
    }
}

/// The subscription a notification belongs to (`_meta["io.modelcontextprotocol/subscriptionId"]`).
pub(super) fn subscription_of(params: &str) -> Option<Id> {
    let v: serde_json::Value = serde_json::from_str(params).ok()?;
    let raw = v.pointer("/_meta")?.get(SUBSCRIPTION_ID)?;
    let raw = serde_json::value::RawValue::from_string(raw.to_string()).ok()?;
    Some(Id::from_raw(&raw))
}

/// A subscription's message with the client's own id for it (stateless requests travel under ours).
fn with_subscription_id(line: &[u8], original: &Id) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line) else { return line.to_vec() };
    if let Some(meta) = v.pointer_mut("/params/_meta").and_then(|m| m.as_object_mut()) {
        let id = serde_json::from_str(original.as_json()).unwrap_or(serde_json::Value::Null);
        meta.insert(SUBSCRIPTION_ID.into(), id);
    }
    serde_json::to_vec(&v).unwrap_or_else(|_| line.to_vec())
}
