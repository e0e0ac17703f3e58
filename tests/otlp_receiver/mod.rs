//! Real OTLP receivers for the end-to-end telemetry tests: a gRPC collector built from the official
//! opentelemetry-proto service definitions (served by tonic), and an HTTP/1.1 `http/protobuf` collector
//! (POST /v1/metrics and /v1/traces, protobuf bodies decoded with prost). Both keep every request they
//! receive; helpers flatten them into data points and spans the tests can assert on.
#![allow(dead_code)] // each test uses a different part of it

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The OTLP transport a receiver speaks (the value of `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn env_value(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// One HTTP request the http/protobuf receiver saw.
#[derive(Debug, Clone)]
pub struct HttpSeen {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub status: u16,
}

/// Everything a receiver got.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub metrics: Vec<ExportMetricsServiceRequest>,
    pub traces: Vec<ExportTraceServiceRequest>,
    pub http: Vec<HttpSeen>,
}

type Store = Arc<Mutex<Received>>;

/// A running OTLP receiver on 127.0.0.1 (stopped on drop).
pub struct OtlpReceiver {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    store: Store,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Starts a receiver speaking `protocol` on a free port of 127.0.0.1.
    pub fn start(protocol: Protocol) -> OtlpReceiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the OTLP receiver");
        let store = Store::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the OTLP receiver on 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        match protocol {
            Protocol::Grpc => {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let metrics = MetricsServiceServer::new(GrpcCollector(store.clone()));
                let traces = TraceServiceServer::new(GrpcCollector(store.clone()));
                runtime.spawn(async move {
                    let served = tonic::transport::Server::builder()
                        .add_service(metrics)
                        .add_service(traces)
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        eprintln!("OTLP gRPC receiver stopped: {e}");
                    }
                });
            }
            Protocol::HttpProtobuf => {
                let store = store.clone();
                runtime.spawn(async move {
                    let accept = async {
                        loop {
                            let Ok((sock, _)) = listener.accept().await else { return };
                            let store = store.clone();
                            tokio::spawn(async move {
                                if let Err(e) = http_connection(sock, store).await {
                                    eprintln!("OTLP HTTP receiver: connection error: {e}");
                                }
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = rx => {}
                    }
                });
            }
        }
        OtlpReceiver { protocol, addr, store, runtime: Some(runtime), shutdown: Some(tx) }
    }

    /// The value of `OTEL_EXPORTER_OTLP_ENDPOINT` for this receiver.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of everything received so far.
    pub fn received(&self) -> Received {
        self.store.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds on what was received; returns whether it did.
    pub fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&Received) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.store.lock().unwrap()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every metric data point received, flattened.
    pub fn points(&self) -> Vec<Point> {
        points(&self.received().metrics)
    }

    /// Every span received, flattened.
    pub fn spans(&self) -> Vec<SpanRec> {
        spans(&self.received().traces)
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The gRPC services: keep the request, answer with an empty (full success) response.
struct GrpcCollector(Store);

#[tonic::async_trait]
impl MetricsService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().traces.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `buf` holds at least `n` bytes; false on EOF.
async fn fill(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, n: usize) -> std::io::Result<bool> {
    while buf.len() < n {
        if sock.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One HTTP/1.1 connection of the http/protobuf receiver (keep-alive, Content-Length or chunked bodies).
async fn http_connection(mut sock: tokio::net::TcpStream, store: Store) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("").to_owned();
        let path = request_line.next().unwrap_or("").to_owned();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if headers.get("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body: Vec<u8> = if let Some(len) = headers.get("content-length") {
            let len: usize = len.parse().map_err(|_| std::io::Error::other("bad content-length"))?;
            if !fill(&mut sock, &mut buf, len).await? {
                return Ok(());
            }
            buf.drain(..len).collect()
        } else if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&buf, b"\r\n") {
                        break i;
                    }
                    if sock.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers (none expected), then the final CRLF.
                    loop {
                        let end = loop {
                            if let Some(i) = find(&buf, b"\r\n") {
                                break i;
                            }
                            if sock.read_buf(&mut buf).await? == 0 {
                                return Ok(());
                            }
                        };
                        buf.drain(..end + 2);
                        if end == 0 {
                            break;
                        }
                    }
                    break body;
                }
                if !fill(&mut sock, &mut buf, size + 2).await? {
                    return Ok(());
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
            }
        } else {
            Vec::new()
        };
        let content_type = headers.get("content-type").cloned().unwrap_or_default();
        let encoded = headers.get("content-encoding").cloned().unwrap_or_default();
        let protobuf = content_type.starts_with("application/x-protobuf");
        let (status, reply): (u16, Vec<u8>) = if method != "POST" {
            (405, Vec::new())
        } else if !protobuf || !(encoded.is_empty() || encoded == "identity") {
            (415, Vec::new())
        } else {
            match path.as_str() {
                "/v1/metrics" => match ExportMetricsServiceRequest::decode(body.as_slice()) {
                    Ok(req) => {
                        store.lock().unwrap().metrics.push(req);
                        (200, ExportMetricsServiceResponse::default().encode_to_vec())
                    }
                    Err(_) => (400, Vec::new()),
                },
                "/v1/traces" => match ExportTraceServiceRequest::decode(body.as_slice()) {
                    Ok(req) => {
                        store.lock().unwrap().traces.push(req);
                        (200, ExportTraceServiceResponse::default().encode_to_vec())
                    }
                    Err(_) => (400, Vec::new()),
                },
                _ => (404, Vec::new()),
            }
        };
        store.lock().unwrap().http.push(HttpSeen { method, path, content_type, status });
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Unsupported Media Type",
        };
        let close = headers.get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n{}\r\n",
            reply.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        sock.write_all(head.as_bytes()).await?;
        sock.write_all(&reply).await?;
        sock.flush().await?;
        if close {
            return Ok(());
        }
    }
}

/// An attribute value as text (arrays and maps as a debug rendering).
pub fn any_to_string(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Attributes as a sorted map.
pub fn attr_map(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), any_to_string(&kv.value))).collect()
}

/// The shape of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Sum,
    Histogram,
    ExponentialHistogram,
    Summary,
}

/// `AggregationTemporality::Delta` in the proto.
pub const DELTA: i32 = 1;
/// `AggregationTemporality::Cumulative` in the proto.
pub const CUMULATIVE: i32 = 2;

/// One data point of one metric, with where it came from.
#[derive(Debug, Clone)]
pub struct Point {
    pub resource: BTreeMap<String, String>,
    pub scope: String,
    pub metric: String,
    pub unit: String,
    pub kind: Kind,
    pub temporality: i32,
    pub monotonic: bool,
    pub attrs: BTreeMap<String, String>,
    pub time: u64,
    /// The value of a gauge or sum, the count of a histogram or summary.
    pub value: f64,
    /// The sum of a histogram or summary.
    pub sum: f64,
}

/// Every data point of every request, in arrival order.
pub fn points(requests: &[ExportMetricsServiceRequest]) -> Vec<Point> {
    let mut out = Vec::new();
    for req in requests {
        for rm in &req.resource_metrics {
            let resource = rm.resource.as_ref().map(|r| attr_map(&r.attributes)).unwrap_or_default();
            for sm in &rm.scope_metrics {
                let scope = sm.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                for m in &sm.metrics {
                    let base = |kind, temporality, monotonic, attrs: &[KeyValue], time, value, sum| Point {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        kind,
                        temporality,
                        monotonic,
                        attrs: attr_map(attrs),
                        time,
                        value,
                        sum,
                    };
                    let number = |v: &Option<number_data_point::Value>| match v {
                        Some(number_data_point::Value::AsDouble(d)) => *d,
                        Some(number_data_point::Value::AsInt(i)) => *i as f64,
                        None => f64::NAN,
                    };
                    match &m.data {
                        Some(metric::Data::Gauge(g)) => {
                            for p in &g.data_points {
                                out.push(base(
                                    Kind::Gauge,
                                    0,
                                    false,
                                    &p.attributes,
                                    p.time_unix_nano,
                                    number(&p.value),
                                    0.0,
                                ));
                            }
                        }
                        Some(metric::Data::Sum(s)) => {
                            for p in &s.data_points {
                                out.push(base(
                                    Kind::Sum,
                                    s.aggregation_temporality,
                                    s.is_monotonic,
                                    &p.attributes,
                                    p.time_unix_nano,
                                    number(&p.value),
                                    0.0,
                                ));
                            }
                        }
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                out.push(base(
                                    Kind::Histogram,
                                    h.aggregation_temporality,
                                    false,
                                    &p.attributes,
                                    p.time_unix_nano,
                                    p.count as f64,
                                    p.sum.unwrap_or(f64::NAN),
                                ));
                            }
                        }
                        Some(metric::Data::ExponentialHistogram(h)) => {
                            for p in &h.data_points {
                                out.push(base(
                                    Kind::ExponentialHistogram,
                                    h.aggregation_temporality,
                                    false,
                                    &p.attributes,
                                    p.time_unix_nano,
                                    p.count as f64,
                                    p.sum.unwrap_or(f64::NAN),
                                ));
                            }
                        }
                        Some(metric::Data::Summary(s)) => {
                            for p in &s.data_points {
                                out.push(base(
                                    Kind::Summary,
                                    0,
                                    false,
                                    &p.attributes,
                                    p.time_unix_nano,
                                    p.count as f64,
                                    p.sum,
                                ));
                            }
                        }
                        None => {}
                    }
                }
            }
        }
    }
    out
}

/// The current value of `metric` per attribute set: for cumulative (and gauge) points the latest one,
/// for delta points the total of all of them.
pub fn current(points: &[Point], metric: &str) -> Vec<Point> {
    let mut by_attrs: BTreeMap<BTreeMap<String, String>, Point> = BTreeMap::new();
    for p in points.iter().filter(|p| p.metric == metric) {
        match by_attrs.get_mut(&p.attrs) {
            None => {
                by_attrs.insert(p.attrs.clone(), p.clone());
            }
            Some(acc) if p.temporality == DELTA => {
                acc.value += p.value;
                acc.sum += p.sum;
                acc.time = acc.time.max(p.time);
            }
            Some(acc) => {
                if p.time >= acc.time {
                    *acc = p.clone();
                }
            }
        }
    }
    by_attrs.into_values().collect()
}

/// The sum of the current values (counts, for histograms) of the points of `metric` whose attributes
/// include every pair of `with`.
pub fn total(points: &[Point], metric: &str, with: &[(&str, &str)]) -> f64 {
    current(points, metric)
        .iter()
        .filter(|p| with.iter().all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v)))
        .map(|p| p.value)
        .sum()
}

/// One span, flattened.
#[derive(Debug, Clone)]
pub struct SpanRec {
    pub resource: BTreeMap<String, String>,
    pub scope: String,
    pub name: String,
    /// The proto's SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attrs: BTreeMap<String, String>,
    pub events: Vec<String>,
    /// The proto's Status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub start: u64,
    pub end: u64,
}

pub const INTERNAL: i32 = 1;
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span of every request, in arrival order.
pub fn spans(requests: &[ExportTraceServiceRequest]) -> Vec<SpanRec> {
    let mut out = Vec::new();
    for req in requests {
        for rs in &req.resource_spans {
            let resource = rs.resource.as_ref().map(|r| attr_map(&r.attributes)).unwrap_or_default();
            for ss in &rs.scope_spans {
                let scope = ss.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                for s in &ss.spans {
                    out.push(SpanRec {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        name: s.name.clone(),
                        kind: s.kind,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attrs: attr_map(&s.attributes),
                        events: s.events.iter().map(|e| e.name.clone()).collect(),
                        status_code: s.status.as_ref().map_or(0, |st| st.code),
                        start: s.start_time_unix_nano,
                        end: s.end_time_unix_nano,
                    });
                }
            }
        }
    }
    out
}
