//! The drop-in stdio wrapper: our stdin/stdout on one side, a child process on the other.
//!
//! Lifecycle, as the MCP stdio transport expects: when the client closes our stdin (or we get SIGINT or
//! SIGTERM), the upstream's stdin is closed, it gets a grace period to exit, then SIGTERM, then
//! SIGKILL, and we keep relaying its last answers meanwhile. When the upstream exits on its own, every
//! request still waiting gets an error naming its exit status, and we exit with the same status.

use super::session::Session;
use super::shared::{DefaultStore, Shared};
use crate::config::Config;
use crate::transport::http_upstream::HttpUpstreamOptions;
use crate::transport::stdio::{self, UpstreamProcess};
use tokio::signal::unix::{SignalKind, signal};

/// Runs the wrapper until the session ends; returns the process exit code.
pub async fn run(config: &Config, command: &[String]) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let (mut process, child_in, child_out) = UpstreamProcess::spawn(command)?;
    tracing::info!(upstream = %process.description(), pid = process.pid(), "upstream started");

    // Over stdio the owner is the local user (or the process, as configured); the default store is a
    // file of this upstream's own, so a restarted wrapper serves the tasks of the previous one.
    let shared =
        Shared::open(config, DefaultStore::PerUpstreamFile(format!("command:{}", command.join("\u{0}"))))
            .await?;
    let owner = shared.stdio_owner(config);
    let mut session = Session::new(config, &shared, owner.clone(), stdio::client_output(), child_in);
    shared.resume_orphans(&session, &owner);
    let router = session.router.clone();
    let mut upstream_pump = tokio::spawn({
        let router = router.clone();
        async move { router.pump_upstream(child_out).await }
    });
    let mut client_pump = tokio::spawn({
        let router = router.clone();
        async move { router.pump_client(stdio::client_input()).await }
    });
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    enum End {
        ClientGone,
        Signal(i32),
        UpstreamGone,
    }
    let end = tokio::select! {
        _ = &mut client_pump => End::ClientGone,
        _ = sigint.recv() => End::Signal(libc::SIGINT),
        _ = sigterm.recv() => End::Signal(libc::SIGTERM),
        _ = &mut upstream_pump => End::UpstreamGone,
    };

    let code = match end {
        End::ClientGone | End::Signal(_) => {
            match end {
                End::Signal(sig) => tracing::info!(signal = sig, "shutting down on signal"),
                _ => tracing::info!(
                    in_flight = router.in_flight(),
                    "client closed its input; shutting down the upstream"
                ),
            }
            client_pump.abort();
            session.upstream_closer.close().await;
            // Keep relaying what the upstream still says while it winds down.
            let (status, signalled) = process.terminate(config.shutdown_grace()).await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut upstream_pump).await;
            let why = match &status {
                Ok(s) => format!("exited ({})", stdio::describe(s)),
                Err(e) => format!("could not be waited for ({e})"),
            };
            session.upstream_gone(&why).await;
            match end {
                End::Signal(sig) => 128 + sig,
                _ if signalled => 0,
                _ => status.as_ref().map(stdio::exit_code).unwrap_or(1),
            }
        }
        End::UpstreamGone => {
            // stdout closed: the upstream is exiting (or closed stdout and lingers; then make it go).
            let status = match tokio::time::timeout(config.shutdown_grace(), process.wait()).await {
                Ok(status) => status,
                Err(_) => process.terminate(std::time::Duration::ZERO).await.0,
            };
            let (why, code) = match &status {
                Ok(s) => (format!("exited ({})", stdio::describe(s)), stdio::exit_code(s)),
                Err(e) => (format!("could not be waited for ({e})"), 1),
            };
            if code == 0 {
                tracing::info!(upstream = %process.description(), "upstream {why}");
            } else {
                tracing::error!(upstream = %process.description(), in_flight = router.in_flight(), "upstream {why}");
            }
            session.upstream_gone(&why).await;
            client_pump.abort();
            session.upstream_closer.close().await;
            code
        }
    };
    session.client_closer.close().await;
    crate::telemetry::metrics().server_session.record(
        started.elapsed().as_secs_f64(),
        &[opentelemetry::KeyValue::new("network.transport", "pipe")],
    );
    Ok(code)
}

/// Options for `--upstream-url` and its `--header`s: the URL checked, each header parsed, `${VAR}`
/// in values taken from the environment. Errors name what is wrong (never a header's value).
pub fn http_options(url: &str, headers: &[String]) -> anyhow::Result<HttpUpstreamOptions> {
    let uri: http::Uri = url.parse().map_err(|e| {
        anyhow::anyhow!("invalid --upstream-url {url:?}: {e} (expected http://… or https://…)")
    })?;
    anyhow::ensure!(
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some(),
        "invalid --upstream-url {url:?}: expected http://host[:port]/path or https://…"
    );
    let mut options = HttpUpstreamOptions::new(uri);
    for h in headers.iter().filter(|h| !h.trim().is_empty()) {
        let (name, value) = h.split_once(':').ok_or_else(|| {
            anyhow::anyhow!(
                "invalid --header {:?}: expected \"Name: value\"",
                h.split(':').next().unwrap_or("")
            )
        })?;
        let name: http::HeaderName =
            name.trim().parse().map_err(|_| anyhow::anyhow!("invalid --header name {:?}", name.trim()))?;
        let value = expand_env(value.trim())?;
        let mut value = http::HeaderValue::from_str(&value).map_err(|_| {
            anyhow::anyhow!("invalid value for --header {name}: control characters are not allowed")
        })?;
        value.set_sensitive(true);
        options.headers.push((name, value));
    }
    Ok(options)
}

/// `${VAR}` replaced by the variable's value (a missing variable is an error naming it).
fn expand_env(value: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| anyhow::anyhow!("unclosed ${{ in a --header value"))?;
        let var = &after[..end];
        let v =
            std::env::var(var).map_err(|_| anyhow::anyhow!("--header uses ${{{var}}}, which is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The stdio wrapper in front of a hosted server: our stdin/stdout on one side, Streamable HTTP on
/// the other. Client EOF or a signal ends the HTTP session (DELETE) after the calls in flight.
pub async fn run_http(config: &Config, options: HttpUpstreamOptions) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let identity = format!("url:{}", options.url);
    let shared = Shared::open(config, DefaultStore::PerUpstreamFile(identity)).await?;
    let (upstream_in, upstream_out, http) = crate::transport::http_upstream::connect(options);
    let owner = shared.stdio_owner(config);
    let mut session = Session::new(config, &shared, owner.clone(), stdio::client_output(), upstream_in);
    shared.resume_orphans(&session, &owner);
    let router = session.router.clone();
    let mut upstream_pump = tokio::spawn({
        let router = router.clone();
        async move { router.pump_upstream(upstream_out).await }
    });
    let mut client_pump = tokio::spawn({
        let router = router.clone();
        async move { router.pump_client(stdio::client_input()).await }
    });
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let code = tokio::select! {
        _ = &mut client_pump => 0,
        _ = sigint.recv() => 128 + libc::SIGINT,
        _ = sigterm.recv() => 128 + libc::SIGTERM,
        _ = &mut upstream_pump => {
            tracing::error!("the HTTP upstream connection ended");
            1
        }
    };
    client_pump.abort();
    // Closing our side lets the transport finish the calls in flight, then DELETE the session.
    session.upstream_closer.close().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(6), &mut upstream_pump).await;
    http.close().await;
    session.upstream_gone("closed its HTTP session").await;
    session.client_closer.close().await;
    crate::telemetry::metrics().server_session.record(
        started.elapsed().as_secs_f64(),
        &[opentelemetry::KeyValue::new("network.transport", "pipe")],
    );
    Ok(code)
}
