//! The instruments, created once from the installed meter provider (no-op when none is).

use opentelemetry::KeyValue;
use opentelemetry::global;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge, UpDownCounter};
use std::sync::OnceLock;
use std::time::Duration;

/// Buckets for MCP operations: 1 ms to 2 min.
const OPERATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Buckets for tasks: calls from 100 ms to 30 min.
const TASK_BUCKETS: &[f64] =
    &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0];

/// Buckets for task store operations: 10 µs to 2.5 s.
const STORE_BUCKETS: &[f64] =
    &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5];

/// Every instrument the proxy records into.
pub struct Metrics {
    /// `mcp.server.operation.duration`: a client's request to the proxy, until answered.
    pub server_operation: Histogram<f64>,
    /// `mcp.client.operation.duration`: the proxy's request to the upstream, until answered.
    pub client_operation: Histogram<f64>,
    /// `mcp.server.session.duration`: a client session, start to end.
    pub server_session: Histogram<f64>,
    /// `asyncify.task.created`.
    pub task_created: Counter<u64>,
    /// `asyncify.task.duration`: creation to terminal status.
    pub task_duration: Histogram<f64>,
    /// `asyncify.task.state.duration`: time spent in a non-terminal status, recorded when it is left.
    pub task_state: Histogram<f64>,
    /// `asyncify.task.active`: tasks now working or input_required.
    pub task_active: UpDownCounter<i64>,
    /// `asyncify.task.expired`: tasks deleted at the end of their ttl.
    pub task_expired: Counter<u64>,
    /// `asyncify.notion.requests`: the proxy's requests to Notion (task starts and polls) by outcome.
    pub notion_requests: Counter<u64>,
    /// `asyncify.notion.rate_limit.wait`: each wait imposed by a rate_limited answer.
    pub notion_wait: Histogram<f64>,
    /// `asyncify.sync.handoffs`: plain calls answered at the sync deadline and continued as tasks.
    pub handoffs: Counter<u64>,
    /// `asyncify.sync.keepalives`: progress keep-alives sent to clients that do not speak tasks.
    pub keepalives: Counter<u64>,
    /// `asyncify.runtime.tasks`: the tokio tasks alive in the process, read when metrics are collected
    /// (a leak of tasks shows as growth; the soak bench watches it). Kept so its callback stays.
    pub runtime_tasks: ObservableGauge<u64>,
    /// `asyncify.store.operation.duration`: one task store operation.
    pub store_operation: Histogram<f64>,
    /// `asyncify.store.errors`: task store operations that failed (unavailable or refused).
    pub store_errors: Counter<u64>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The instruments (no-op ones if telemetry was never set up).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Creates the instruments from the provider just installed.
pub(super) fn install() {
    let _ = METRICS.set(Metrics::new());
}

impl Metrics {
    fn new() -> Metrics {
        let m = global::meter("mcp-asyncify");
        let seconds = |name: &'static str, description: &'static str, buckets: &[f64]| {
            m.f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        Metrics {
            server_operation: seconds(
                "mcp.server.operation.duration",
                "Duration of an MCP request a client made to the proxy, until it was answered.",
                OPERATION_BUCKETS,
            ),
            client_operation: seconds(
                "mcp.client.operation.duration",
                "Duration of an MCP request the proxy made to the upstream, until it was answered.",
                OPERATION_BUCKETS,
            ),
            server_session: seconds(
                "mcp.server.session.duration",
                "Duration of a client session with the proxy.",
                TASK_BUCKETS,
            ),
            task_created: m
                .u64_counter("asyncify.task.created")
                .with_unit("{task}")
                .with_description("Tasks created.")
                .build(),
            task_duration: seconds(
                "asyncify.task.duration",
                "Time from a task's creation to its terminal status.",
                TASK_BUCKETS,
            ),
            task_state: seconds(
                "asyncify.task.state.duration",
                "Time a task spent in a status before leaving it.",
                TASK_BUCKETS,
            ),
            task_active: m
                .i64_up_down_counter("asyncify.task.active")
                .with_unit("{task}")
                .with_description("Tasks now working or waiting for input.")
                .build(),
            task_expired: m
                .u64_counter("asyncify.task.expired")
                .with_unit("{task}")
                .with_description("Tasks deleted at the end of their ttl.")
                .build(),
            notion_requests: m
                .u64_counter("asyncify.notion.requests")
                .with_unit("{request}")
                .with_description("Requests the proxy made to Notion (task starts and polls), by outcome.")
                .build(),
            notion_wait: seconds(
                "asyncify.notion.rate_limit.wait",
                "Each wait imposed on the proxy's Notion requests by a rate_limited answer.",
                OPERATION_BUCKETS,
            ),
            handoffs: m
                .u64_counter("asyncify.sync.handoffs")
                .with_unit("{call}")
                .with_description("Plain calls answered at the sync deadline and continued as tasks.")
                .build(),
            keepalives: m
                .u64_counter("asyncify.sync.keepalives")
                .with_unit("{notification}")
                .with_description("Progress keep-alives sent to clients that do not speak tasks.")
                .build(),
            runtime_tasks: m
                .u64_observable_gauge("asyncify.runtime.tasks")
                .with_unit("{task}")
                .with_description("Tokio tasks alive in the process.")
                .with_callback(|gauge| {
                    // Collection runs on the runtime (the endpoint, the OTLP reader); elsewhere, no value.
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        gauge.observe(runtime.metrics().num_alive_tasks() as u64, &[]);
                    }
                })
                .build(),
            store_operation: seconds(
                "asyncify.store.operation.duration",
                "Duration of one task store operation (memory, file or redis).",
                STORE_BUCKETS,
            ),
            store_errors: m
                .u64_counter("asyncify.store.errors")
                .with_unit("{operation}")
                .with_description("Task store operations that failed: the store unavailable or refusing.")
                .build(),
        }
    }
}

/// Attributes of a task's metrics.
pub fn task_attrs(tool: &str, origin: &str, protocol_version: &'static str) -> [KeyValue; 3] {
    [
        KeyValue::new("gen_ai.tool.name", tool.to_owned()),
        KeyValue::new("asyncify.task.origin", origin.to_owned()),
        KeyValue::new("mcp.protocol.version", protocol_version),
    ]
}

/// Seconds as a float.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
