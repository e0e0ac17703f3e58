//! What `/healthz` says (the metrics listener's and the sidecar's): the health of the process's task
//! store, as its last operations saw it. The store reports here; this module knows no store.

use std::sync::Mutex;

/// The health of the process's task store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Which store.
    pub store: String,
    /// The last fault, while it lasts (`None`: healthy).
    pub fault: Option<String>,
}

static HEALTH: Mutex<Option<StoreHealth>> = Mutex::new(None);

/// The health of the task store this process opened (`None` before one is opened). Both `/healthz`
/// endpoints (the metrics listener and the sidecar) report it.
pub fn health() -> Option<StoreHealth> {
    HEALTH.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The `/healthz` answer: whether it is healthy, and the text.
pub fn healthz() -> (bool, String) {
    match health() {
        None => (true, "ok\n".into()),
        // Healthy is a plain "ok" (what probes and the existing checks expect).
        Some(StoreHealth { fault: None, .. }) => (true, "ok\n".into()),
        Some(StoreHealth { store, fault: Some(f) }) => (
            false,
            format!("unhealthy\nstore {store}: {f}\n(plain calls still flow; new tasks are refused)\n"),
        ),
    }
}

pub fn set_health(store: &str, fault: Option<String>) {
    let mut h = HEALTH.lock().unwrap_or_else(|e| e.into_inner());
    let changed = h.as_ref().is_none_or(|h| h.fault != fault);
    if changed {
        match &fault {
            Some(f) => tracing::error!(store, fault = %f, "task store unhealthy"),
            None if h.is_some() => tracing::info!(store, "task store healthy"),
            None => {}
        }
    }
    *h = Some(StoreHealth { store: store.to_owned(), fault });
}
