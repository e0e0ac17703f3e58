//! A real rmcp client (pinned, =2.2.0) through the built binary in front of the rmcp fixture: the
//! calls, progress, elicitation and tasks as an rmcp user would drive them.

mod common;

use common::BIN;
use rmcp::model::{
    CallToolRequestParams, ClientInfo, ClientRequest, ElicitRequestParams, ElicitResult, ElicitationAction,
    ProgressNotificationParam,
};
use rmcp::service::{NotificationContext, RequestContext, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, ErrorData, RoleClient, ServiceExt};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;

#[derive(Clone, Default)]
struct Client {
    progress: Arc<Mutex<Vec<f64>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientInfo {
        serde_json::from_value(json!({
            "protocolVersion": "2025-11-25",
            "capabilities": {"elicitation": {}, "tasks": {"list": {}, "cancel": {}}},
            "clientInfo": {"name": "rmcp-e2e", "version": "1"}
        }))
        .unwrap()
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        let v = serde_json::to_value(&request).unwrap();
        self.asked.lock().unwrap().push(v["message"].as_str().unwrap_or_default().to_owned());
        let mut r = ElicitResult::new(ElicitationAction::Accept);
        r.content = Some(json!({"answer": "from rmcp"}));
        Ok(r)
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params.progress);
    }
}

async fn connect(client: Client) -> RunningService<RoleClient, Client> {
    let mut cmd = Command::new(BIN);
    // A data directory of its own, never the real user's.
    cmd.env("MCP_ASYNCIFY_DATA_DIR", common::fresh_dir("data"));
    cmd.args(["--log-level", "warn", "--", BIN, "test-server"]);
    let transport = TokioChildProcess::new(cmd).expect("spawn the proxy");
    client.serve(transport).await.expect("initialize through the proxy")
}

fn args(v: Value) -> Option<serde_json::Map<String, Value>> {
    v.as_object().cloned()
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {result}"))
}

async fn raw(
    service: &RunningService<RoleClient, Client>,
    method: &str,
    params: Value,
) -> Result<Value, String> {
    let request: ClientRequest = serde_json::from_value(json!({"method": method, "params": params})).unwrap();
    match service.send_request(request).await {
        Ok(result) => Ok(serde_json::to_value(result).unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn calls_progress_and_elicitation_work_through_the_proxy() {
    let client = Client::default();
    let service = connect(client.clone()).await;
    let info = service.peer_info().expect("server info");
    let caps = serde_json::to_value(&info.capabilities).unwrap();
    assert!(caps["tasks"]["requests"]["tools"]["call"].is_object(), "{caps}");

    let tools = service.list_all_tools().await.unwrap();
    assert!(tools.len() >= 9);
    for t in &tools {
        let v = serde_json::to_value(t).unwrap();
        assert_eq!(v["execution"]["taskSupport"], "optional", "{v}");
    }

    let r = service
        .call_tool(CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "hi"})).unwrap()))
        .await;
    assert_eq!(text(&serde_json::to_value(r.unwrap()).unwrap()), "hi");

    // Concurrent calls of mixed duration: the whole batch takes as long as the slowest.
    let started = Instant::now();
    let calls = (0..20u64).map(|i| {
        let peer = service.peer().clone();
        async move {
            let ms = 100 + (i * 53) % 900;
            let p = CallToolRequestParams::new("slow")
                .with_arguments(args(json!({"ms": ms, "text": i.to_string()})).unwrap());
            serde_json::to_value(peer.call_tool(p).await.unwrap()).unwrap()
        }
    });
    let results = futures_join_all(calls.collect()).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(text(r), i.to_string());
    }
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());

    // A tool error result and a JSON-RPC error keep their meaning.
    let r = service
        .call_tool(CallToolRequestParams::new("fail").with_arguments(args(json!({"message": "no"})).unwrap()))
        .await
        .unwrap();
    assert_eq!(r.is_error, Some(true));
    let e = service
        .call_tool(
            CallToolRequestParams::new("rpc_error")
                .with_arguments(args(json!({"code": -32099, "message": "nope"})).unwrap()),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // Progress for the call's token reaches the client's handler.
    let request: ClientRequest = serde_json::from_value(json!({"method": "tools/call", "params": {
        "name": "progress", "arguments": {"steps": 3, "interval_ms": 30}, "_meta": {"progressToken": "rmcp-1"}
    }}))
    .unwrap();
    let done = serde_json::to_value(service.send_request(request).await.unwrap()).unwrap();
    assert_eq!(text(&done), "done 3 steps");
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.progress.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.progress.lock().unwrap().as_slice(), [1.0, 2.0, 3.0]);

    // Elicitation from the upstream is answered by this client's handler.
    let r = service
        .call_tool(CallToolRequestParams::new("ask").with_arguments(args(json!({"message": "Go?"})).unwrap()))
        .await
        .unwrap();
    assert_eq!(text(&serde_json::to_value(r).unwrap()), "answer: from rmcp");
    assert_eq!(client.asked.lock().unwrap().as_slice(), ["Go?"]);
    service.cancel().await.unwrap();
}

#[tokio::test]
async fn tasks_through_the_proxy_with_the_rmcp_client() {
    let service = connect(Client::default()).await;
    let created = raw(
        &service,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 300, "text": "later"}, "task": {"ttl": 30000}}),
    )
    .await
    .unwrap();
    let task = created["task"].clone();
    assert_eq!(task["status"], "working", "{created}");
    assert_eq!(task["ttl"], 30000);
    let id = task["taskId"].as_str().unwrap().to_owned();

    let got = raw(&service, "tasks/get", json!({"taskId": id})).await.unwrap();
    assert_eq!(got["status"], "working", "{got}");
    let result = raw(&service, "tasks/result", json!({"taskId": id})).await.unwrap();
    assert_eq!(text(&result), "later", "{result}");
    let got = raw(&service, "tasks/get", json!({"taskId": id})).await.unwrap();
    assert_eq!(got["status"], "completed");
    let list = raw(&service, "tasks/list", json!({})).await.unwrap();
    assert!(list["tasks"].as_array().unwrap().iter().any(|t| t["taskId"] == id.as_str()), "{list}");

    let running =
        raw(&service, "tools/call", json!({"name": "slow", "arguments": {"ms": 30000}, "task": {}}))
            .await
            .unwrap();
    let rid = running["task"]["taskId"].as_str().unwrap().to_owned();
    let cancelled = raw(&service, "tasks/cancel", json!({"taskId": rid})).await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let e = raw(&service, "tasks/cancel", json!({"taskId": rid})).await.unwrap_err();
    assert!(e.contains("cancelled") || e.contains("terminal"), "{e}");
    let e = raw(&service, "tasks/get", json!({"taskId": "nope"})).await.unwrap_err();
    assert!(e.contains("not found"), "{e}");
    service.cancel().await.unwrap();
}

/// Joins futures without an extra dependency.
async fn futures_join_all<F: std::future::Future<Output = Value> + Send + 'static>(
    futs: Vec<F>,
) -> Vec<Value> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn the_rmcp_http_client_through_the_sidecar() {
    use rmcp::transport::StreamableHttpClientTransport;
    let sidecar = common::Served::sidecar(&["--", BIN, "test-server"]);
    let transport = StreamableHttpClientTransport::from_uri(sidecar.url.clone());
    let client = Client::default();
    let service = client.clone().serve(transport).await.expect("initialize over HTTP");
    let caps = serde_json::to_value(&service.peer_info().unwrap().capabilities).unwrap();
    assert!(caps["tasks"]["requests"]["tools"]["call"].is_object(), "{caps}");
    let r = service
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "over http"})).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(text(&serde_json::to_value(r).unwrap()), "over http");
    let created = raw(
        &service,
        "tools/call",
        json!({"name": "slow", "arguments": {"ms": 200, "text": "http task"}, "task": {}}),
    )
    .await
    .unwrap();
    let id = created["task"]["taskId"].as_str().unwrap().to_owned();
    let result = raw(&service, "tasks/result", json!({"taskId": id})).await.unwrap();
    assert_eq!(text(&result), "http task");
    // Elicitation from the upstream reaches this client over the HTTP streams and the answer goes back.
    let ask =
        CallToolRequestParams::new("ask").with_arguments(args(json!({"message": "Over HTTP?"})).unwrap());
    let r = tokio::time::timeout(Duration::from_secs(10), service.call_tool(ask))
        .await
        .unwrap_or_else(|_| {
            panic!("ask not answered; the client was asked {:?}", client.asked.lock().unwrap())
        })
        .unwrap();
    assert_eq!(text(&serde_json::to_value(r).unwrap()), "answer: from rmcp");
    service.cancel().await.unwrap();
}
