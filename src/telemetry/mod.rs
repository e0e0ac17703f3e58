//! OpenTelemetry: every task's life and every request, as metrics and traces.
//!
//! Names follow the OpenTelemetry semantic conventions for MCP where they define one
//! (`mcp.server.operation.duration` for what clients ask of the proxy, `mcp.client.operation.duration`
//! for what the proxy asks upstream, `mcp.server.session.duration`; attributes `mcp.method.name`,
//! `gen_ai.tool.name`, `error.type`, `network.transport`) and live under `asyncify.` where they define
//! nothing (tasks, Notion polling, hand-offs). Attributes are low-cardinality only: never a task id,
//! a session id or an argument.
//!
//! Export: a Prometheus text endpoint (`--metrics-listen ADDR`, `GET /metrics`, `GET /healthz`) and
//! OTLP (gRPC or HTTP/protobuf) from the standard `OTEL_EXPORTER_OTLP_*` variables, both at once if
//! asked, neither required. Exporting runs on its own tasks: the data path only records into
//! in-memory aggregates, and a dead collector costs a warning.

mod endpoint;
pub mod health;
pub mod metrics;
pub mod trace;

pub use metrics::{Metrics, metrics};

use opentelemetry::global;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

static METRICS_ON: AtomicBool = AtomicBool::new(false);

/// Whether metrics are exported anywhere (when not, the data path skips measuring).
pub fn metrics_on() -> bool {
    METRICS_ON.load(Ordering::Relaxed)
}

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct TelemetryOptions {
    /// Serve Prometheus text on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// Keep Prometheus text ready for [`render_prometheus`] even without an address (the sidecar
    /// serves it at its own `/metrics`).
    pub prometheus: bool,
}

static REGISTRY: std::sync::OnceLock<prometheus::Registry> = std::sync::OnceLock::new();

/// The metrics as Prometheus text, if the Prometheus export is on.
pub fn render_prometheus() -> Option<Vec<u8>> {
    use prometheus::Encoder;
    let registry = REGISTRY.get()?;
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).ok()?;
    Some(out)
}

/// The installed providers; [`Telemetry::shutdown`] flushes what is pending (at exit).
pub struct Telemetry {
    meters: Option<SdkMeterProvider>,
    tracer: Option<SdkTracerProvider>,
    /// The address the Prometheus endpoint is bound to.
    pub metrics_addr: Option<SocketAddr>,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn otlp_protocol(signal: &str) -> String {
    std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "http/protobuf".into())
        .trim()
        .to_ascii_lowercase()
}

/// Whether OTLP export of `signal` (METRICS or TRACES) is configured and not turned off.
fn otlp_wanted(signal: &str) -> bool {
    let exporter_var = match signal {
        "METRICS" => "OTEL_METRICS_EXPORTER",
        _ => "OTEL_TRACES_EXPORTER",
    };
    if std::env::var(exporter_var).is_ok_and(|v| v.trim() == "none") {
        return false;
    }
    env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
}

/// Builds an OTLP exporter (metric or span: their builders share the shape, not a trait) for the
/// protocol asked.
macro_rules! otlp_exporter {
    ($builder:expr, $protocol:expr, $what:literal) => {{
        use opentelemetry_otlp::WithExportConfig;
        match $protocol.as_str() {
            "grpc" => $builder.with_tonic().with_protocol(opentelemetry_otlp::Protocol::Grpc).build(),
            "http/protobuf" => {
                $builder.with_http().with_protocol(opentelemetry_otlp::Protocol::HttpBinary).build()
            }
            other => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (allowed: grpc, http/protobuf)"
            ),
        }
        .map_err(|e| anyhow::anyhow!(concat!("cannot set up the OTLP ", $what, " exporter: {}"), e))?
    }};
}

fn resource() -> Resource {
    // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without a name we give ours.
    let builder = Resource::builder();
    let named = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = if named { builder } else { builder.with_service_name("mcp-asyncify") };
    builder.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build()
}

impl Telemetry {
    /// Installs the exporters asked for (call once, inside the tokio runtime, before any session).
    pub async fn init(options: &TelemetryOptions) -> anyhow::Result<Telemetry> {
        let resource = resource();
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        let mut any_metrics = false;
        let mut metrics_addr = None;
        if options.metrics_listen.is_some() || options.prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .scope_info_enabled(false)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot set up the Prometheus exporter: {e}"))?;
            meters = meters.with_reader(exporter);
            // Set before the endpoint serves, so its first scrape finds it.
            let _ = REGISTRY.set(registry);
            if let Some(addr) = options.metrics_listen {
                let bound = endpoint::serve(addr).await?;
                tracing::info!(addr = %bound, "metrics endpoint listening (GET /metrics, /healthz)");
                metrics_addr = Some(bound);
            }
            any_metrics = true;
        }
        if otlp_wanted("METRICS") {
            let protocol = otlp_protocol("METRICS");
            let exporter = otlp_exporter!(opentelemetry_otlp::MetricExporter::builder(), protocol, "metric");
            let reader =
                opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            meters = meters.with_reader(reader);
            tracing::info!(protocol, "exporting metrics over OTLP");
            any_metrics = true;
        }
        let meters = any_metrics.then(|| meters.build());
        if let Some(provider) = &meters {
            global::set_meter_provider(provider.clone());
            METRICS_ON.store(true, Ordering::Relaxed);
        }
        metrics::install();

        let tracer = if otlp_wanted("TRACES") {
            let protocol = otlp_protocol("TRACES");
            let exporter = otlp_exporter!(opentelemetry_otlp::SpanExporter::builder(), protocol, "span");
            let processor =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            let provider =
                SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build();
            global::set_tracer_provider(provider.clone());
            trace::enable();
            tracing::info!(protocol, "exporting traces over OTLP");
            Some(provider)
        } else {
            None
        };
        Ok(Telemetry { meters, tracer, metrics_addr })
    }

    /// Flushes and stops the exporters (bounded: a dead collector does not hold the exit).
    pub async fn shutdown(self) {
        let work = tokio::task::spawn_blocking(move || {
            if let Some(t) = &self.tracer {
                let _ = t.force_flush();
                let _ = t.shutdown();
            }
            if let Some(m) = &self.meters {
                let _ = m.force_flush();
                let _ = m.shutdown();
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(5), work).await.is_err() {
            tracing::warn!("telemetry export did not finish within 5 s at exit; the rest is dropped");
        }
    }
}
