//! MCP servers we run ourselves, built with rmcp.
//!
//! [`fixture`] is the test upstream (slow, failing, progress-sending, elicitation-asking and crashing
//! tools) used by the end-to-end tests and the benches; it is reachable as the hidden
//! `mcp-asyncify test-server` command so tests need only the one binary. [`conformance`] is the
//! upstream for the official conformance suite's tasks scenarios (`test-server --conformance`).

pub mod fixture;

pub mod conformance;

/// The Notion simulator: Notion's hosted tools with their async protocol and rate limit.
pub mod notion;

/// The simulator's OAuth authorization server (`notion-sim --http ADDR --oauth`).
pub mod oauth;

/// Serves an rmcp server over Streamable HTTP at http://ADDR/mcp (rmcp's own server side; every
/// session shares `server`'s state) until SIGINT/SIGTERM.
pub async fn serve_http<S>(server: S, addr: std::net::SocketAddr) -> anyhow::Result<()>
where
    S: rmcp::ServerHandler + Clone + Send + Sync + 'static,
{
    serve_http_guarded(server, addr, None).await
}

/// [`serve_http`], with `/mcp` behind the simulator's OAuth authorization server when `oauth` asks.
pub async fn serve_http_guarded<S>(
    server: S,
    addr: std::net::SocketAddr,
    oauth: Option<&oauth::OAuthSimArgs>,
) -> anyhow::Result<()>
where
    S: rmcp::ServerHandler + Clone + Send + Sync + 'static,
{
    use hyper::service::Service as _;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        std::sync::Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--http): {e}"))?;
    let bound = listener.local_addr()?;
    tracing::warn!(addr = %bound, "serving Streamable HTTP at http://{bound}/mcp");
    let guard = oauth.filter(|o| o.oauth).map(|o| std::sync::Arc::new(oauth::AuthServer::new(o, bound)));
    if guard.is_some() {
        tracing::warn!("/mcp requires OAuth (authorization server at http://{bound})");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => a?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true); // SSE answers come in pieces: no Nagle delay on the last
        let mcp = hyper_util::service::TowerToHyperService::new(service.clone());
        let guard = guard.clone();
        let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let (mcp, guard) = (mcp.clone(), guard.clone());
            async move {
                if let Some(guard) = &guard {
                    if guard.owns(request.uri().path()) {
                        return Ok(guard.handle(request).await);
                    }
                    if let Some(refused) = guard.guard(request.headers()) {
                        return Ok(refused);
                    }
                }
                mcp.call(request).await
            }
        });
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        });
    }
}
