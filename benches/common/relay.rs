//! The floors the benches measure the proxy against: relays that forward bytes and read nothing of
//! MCP, on the same I/O as the proxy (one tokio runtime, epoll), run as a re-executed bench binary so
//! their CPU is measured per process like the proxy's.
//!
//! * a **line relay** (`LINE_RELAY=1 <bench> CMD ARGS…`): one single-threaded process that spawns CMD
//!   and copies newline-delimited messages both ways, a line read and written whole, as the stdio
//!   wrapper does (its pipes through the event loop, no JSON);
//! * a **TCP relay** (`TCP_RELAY=LISTEN,UPSTREAM <bench>`): one single-threaded process that accepts
//!   on LISTEN and copies each connection's bytes to and from a connection of its own to UPSTREAM
//!   (`copy_bidirectional`, `TCP_NODELAY` both sides): what one more loopback hop costs, without HTTP;
//! * an **HTTP relay** (`HTTP_RELAY=LISTEN,UPSTREAM <bench>`): one single-threaded hyper server that
//!   sends each request on to UPSTREAM with hyper's pooled client (HTTP/1.1 keep-alive) and streams
//!   the answer back, reading no MCP: what any HTTP front built on hyper costs.

use std::os::fd::AsFd;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The variables that make a bench binary a relay.
pub const LINE: &str = "LINE_RELAY";
pub const TCP: &str = "TCP_RELAY";
pub const HTTP: &str = "HTTP_RELAY";

/// Runs as a relay and exits if this process was started as one; returns otherwise.
pub fn run_if_asked() {
    let line = std::env::var_os(LINE).is_some();
    let (tcp, http) = (std::env::var(TCP).ok(), std::env::var(HTTP).ok());
    if !line && tcp.is_none() && http.is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    match (tcp, http) {
        (Some(spec), _) => runtime.block_on(tcp_relay(spec)),
        (_, Some(spec)) => runtime.block_on(http_relay(spec)),
        _ => runtime.block_on(line_relay(std::env::args().skip(1).filter(|a| a != "--bench").collect())),
    }
    std::process::exit(0);
}

async fn line_relay(command: Vec<String>) {
    let (program, args) = command.split_first().expect("line relay: no command");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("line relay: cannot start the upstream");
    let to_upstream = child.stdin.take().expect("piped");
    let from_upstream = child.stdout.take().expect("piped");
    let pipe_in = tokio::net::unix::pipe::Receiver::from_owned_fd(
        std::io::stdin().as_fd().try_clone_to_owned().expect("stdin"),
    )
    .expect("line relay: stdin must be a pipe");
    let to_client = tokio::net::unix::pipe::Sender::from_owned_fd(
        std::io::stdout().as_fd().try_clone_to_owned().expect("stdout"),
    )
    .expect("line relay: stdout must be a pipe");
    // The client's end of input closes the upstream's; the upstream's end of output ends the relay.
    tokio::join!(copy_lines(pipe_in, to_upstream), copy_lines(from_upstream, to_client));
}

/// Copies whole lines from `from` to `to`, each read and then written, until either side ends.
async fn copy_lines(from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut from = BufReader::with_capacity(64 * 1024, from);
    let mut line = Vec::new();
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 || to.write_all(&line).await.is_err() {
            return;
        }
    }
}

async fn tcp_relay(spec: String) {
    let (listen, upstream) = spec.split_once(',').expect("TCP_RELAY=LISTEN,UPSTREAM");
    let listener = tokio::net::TcpListener::bind(listen).await.expect("tcp relay: cannot listen");
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

async fn http_relay(spec: String) {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (listen, upstream) = spec.split_once(',').expect("HTTP_RELAY=LISTEN,UPSTREAM");
    let upstream = upstream.to_owned();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, hyper::body::Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(listen).await.expect("http relay: cannot listen");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let (client, upstream) = (client.clone(), upstream.clone());
                    async move {
                        let path =
                            req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                        *req.uri_mut() = format!("http://{upstream}{path}").parse().expect("a uri");
                        match client.request(req).await {
                            Ok(response) => Ok::<_, std::convert::Infallible>(response.map(|b| b.boxed())),
                            Err(e) => {
                                let mut r = hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(e.to_string()))
                                        .map_err(|never| match never {})
                                        .boxed(),
                                );
                                *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                                Ok(r)
                            }
                        }
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
