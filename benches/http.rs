//! HTTP load: a 1 KB `tools/call` round trip over Streamable HTTP (MCP 2025-11-25, and 2026-07-28
//! stateless through the sidecar), direct to an rmcp
//! Streamable HTTP server and through the sidecar (`mcp-asyncify serve`), measured in one run on the
//! same machine.
//!
//! The upstream is the built binary's fixture server over HTTP (`mcp-asyncify test-server --http ADDR`,
//! rmcp's server at http://ADDR/mcp); the call is `echo` with a 1,000-character text, so the request and
//! the answer are each about 1 KB. The paths: the client straight to the fixture; the client to
//! `mcp-asyncify serve --upstream-url http://ADDR/mcp` in front of it; and, for comparison, the sidecar
//! in front of the stdio fixture (`serve -- mcp-asyncify test-server`, one process per session); and
//! two floors in front of the HTTP fixture, this bench's own binary re-executed (`common::relay`): a
//! TCP relay that copies bytes (one more loopback hop, no HTTP) and an HTTP relay (hyper's server and
//! pooled client, no MCP); and the peers users would otherwise pick, in front of the same stdio
//! fixture: supergateway
//! (`--outputTransport streamableHttp --stateful`, from npm) and sparfenyuk's mcp-proxy (PyPI
//! `mcp-proxy`, stateful). The bench installs them itself when they are missing (idempotent): `npm ci
//! --prefix benches/peers` (pinned by `benches/peers/package-lock.json`, apart from the test
//! packages) and a virtualenv at `target/bench-peers/mcp-proxy` (`python3.11 -m venv` + `pip install
//! mcp-proxy==0.13.0`); a peer that cannot be installed is left out of the run.
//!
//! The client is hyper 1 (HTTP/1.1 keep-alive, a pool that grows to one connection per call in flight,
//! TCP_NODELAY) on a single-threaded tokio runtime. Each path gets fresh processes and a real MCP
//! session: `initialize` (the `Mcp-Session-Id` taken from its answer), `notifications/initialized`
//! (202), then calls carrying `Mcp-Session-Id` and `MCP-Protocol-Version`; an answer is read as JSON or
//! as an SSE stream (its `data:` lines, the message whose id matches). After a warm-up, a closed loop
//! keeps 1, 8 or 64 calls in flight (a new request as soon as one answers) for a fixed number of calls;
//! each configuration runs 3 times with the paths in rotating order and the table shows the medians.
//! The sidecar's RSS is read from /proc: idle (after initialize, one call and 300 ms) and right after
//! the 64-in-flight load. The CPU the HTTP front uses during the measured calls (the sidecar, or the
//! peer's processes, without the fixture below them; from `/proc/PID/task/*/schedstat`) is divided by
//! the calls. Nothing is asserted.
//!
//! `cargo bench --bench http` (env `HTTP_CALLS=n`: calls at 8 and at 64 in flight, default 10,000;
//! 30 % of that at 1).

mod common;

use bytes::Bytes;
use common::{comm, contains, cpu_ns, find, rss_kib};
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-asyncify");
const TEXT_LEN: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(30);
const REPS: usize = 3;
const LEVELS: [usize; 3] = [1, 8, 64];
const PROTOCOL: &str = "2025-11-25";
const MODERN: &str = "2026-07-28";
/// A measured run stops issuing calls after this long (an upstream stalling every answer would
/// otherwise make the bench take minutes); a warm-up after `WARM_UP`.
const RUN_BUDGET: Duration = Duration::from_secs(2);
const WARM_UP: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    /// One tokio process in front of the rmcp server that copies each connection's bytes both ways
    /// and reads no HTTP: the floor of any HTTP front, one more loopback hop.
    TcpRelay,
    /// One hyper server in front of the rmcp server that sends each request on with hyper's pooled
    /// client and streams the answer back, reading no MCP: the floor of an HTTP front built on hyper.
    HttpRelay,
    Sidecar,
    /// The same, the sidecar on two worker threads (`--worker-threads 2`; the default is one).
    SidecarTwoThreads,
    SidecarStdio,
    /// The sidecar in front of the stdio fixture, called the 2026-07-28 way: stateless POSTs (no
    /// session; `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` headers and the per-request `_meta`
    /// with the Tasks extension), served on the upstream connection the sidecar keeps for them.
    SidecarStdioModern,
    /// supergateway (npm) in front of the stdio fixture: `--stdio CMD --outputTransport
    /// streamableHttp --stateful`, a child process per session like ours.
    Supergateway,
    /// sparfenyuk's mcp-proxy (PyPI `mcp-proxy`) in front of the stdio fixture: its Streamable HTTP
    /// server at `/mcp`, stateful (its default).
    McpProxy,
}

impl Path {
    const ALL: [Path; 9] = [
        Path::Direct,
        Path::TcpRelay,
        Path::HttpRelay,
        Path::Sidecar,
        Path::SidecarTwoThreads,
        Path::SidecarStdio,
        Path::SidecarStdioModern,
        Path::Supergateway,
        Path::McpProxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (rmcp HTTP server)",
            Path::TcpRelay => "TCP relay (tokio, no HTTP) → rmcp HTTP server",
            Path::HttpRelay => "HTTP relay (hyper, no MCP) → rmcp HTTP server",
            Path::Sidecar => "sidecar → HTTP upstream",
            Path::SidecarTwoThreads => "sidecar --worker-threads 2 → HTTP upstream",
            Path::SidecarStdio => "sidecar → stdio upstream",
            Path::SidecarStdioModern => "sidecar → stdio upstream, 2026-07-28 stateless",
            Path::Supergateway => "supergateway --stateful → stdio upstream",
            Path::McpProxy => "mcp-proxy (Python) → stdio upstream",
        }
    }

    /// A peer: another project's HTTP front, in front of the same stdio fixture.
    fn is_peer(self) -> bool {
        matches!(self, Path::Supergateway | Path::McpProxy)
    }

    /// Whether the path's HTTP front is ours or a peer's in front of the stdio fixture (one process
    /// per session below the front).
    fn stdio_below(self) -> bool {
        matches!(self, Path::SidecarStdio | Path::SidecarStdioModern | Path::Supergateway | Path::McpProxy)
    }
}

/// Where the peers are installed: supergateway from `benches/peers/package-lock.json`, mcp-proxy into
/// a virtualenv under `target/`.
struct Peers {
    supergateway: Option<std::path::PathBuf>,
    mcp_proxy: Option<std::path::PathBuf>,
}

/// The pinned version of sparfenyuk's mcp-proxy.
const MCP_PROXY: &str = "mcp-proxy==0.13.0";

impl Peers {
    /// Installs the peers when missing (idempotent: an installed peer is used as it is). A peer that
    /// cannot be installed (no `npm`, no Python 3.11, no registry) is left out of the run, said why.
    ///
    /// The commands, by hand: `npm ci --prefix benches/peers` and
    /// `python3.11 -m venv target/bench-peers/mcp-proxy && target/bench-peers/mcp-proxy/bin/pip install mcp-proxy==0.13.0`.
    fn ensure() -> Peers {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let peers_dir = root.join("benches/peers");
        let supergateway = peers_dir.join("node_modules/supergateway/dist/index.js");
        if !supergateway.exists() {
            eprintln!("http bench: installing supergateway (npm ci --prefix benches/peers)");
            run_quietly(
                Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--prefix"]).arg(&peers_dir),
            );
        }
        let venv = root.join("target/bench-peers/mcp-proxy");
        let mcp_proxy = venv.join("bin/mcp-proxy");
        if !mcp_proxy.exists() {
            eprintln!("http bench: installing {MCP_PROXY} into {}", venv.display());
            if run_quietly(Command::new("python3.11").args(["-m", "venv"]).arg(&venv)) {
                run_quietly(Command::new(venv.join("bin/pip")).args(["install", "--quiet", MCP_PROXY]));
            }
        }
        let found = |p: std::path::PathBuf, what: &str| {
            if p.exists() {
                Some(p)
            } else {
                eprintln!("http bench: {what} is not installed; left out of this run");
                None
            }
        };
        Peers { supergateway: found(supergateway, "supergateway"), mcp_proxy: found(mcp_proxy, "mcp-proxy") }
    }

    fn has(&self, path: Path) -> bool {
        match path {
            Path::Supergateway => self.supergateway.is_some(),
            Path::McpProxy => self.mcp_proxy.is_some(),
            _ => true,
        }
    }
}

/// Runs an install step, its output on stderr; whether it succeeded.
fn run_quietly(cmd: &mut Command) -> bool {
    match cmd.stdin(Stdio::null()).stdout(Stdio::null()).status() {
        Ok(status) if status.success() => true,
        Ok(status) => {
            eprintln!("http bench: {cmd:?} failed ({status})");
            false
        }
        Err(e) => {
            eprintln!("http bench: {cmd:?} could not start: {e}");
            false
        }
    }
}

/// Aborts the bench (killing every child and its descendants) when no call answers for 30 s.
struct Watchdog {
    progress: AtomicU64,
    pids: Mutex<Vec<u32>>,
    stage: Mutex<String>,
}

impl Watchdog {
    fn start() -> Arc<Watchdog> {
        let dog = Arc::new(Watchdog {
            progress: AtomicU64::new(0),
            pids: Mutex::new(Vec::new()),
            stage: Mutex::new(String::from("start")),
        });
        let watched = dog.clone();
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            let mut since = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = watched.progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() > TIMEOUT {
                    let stage = watched.stage.lock().map(|s| s.clone()).unwrap_or_default();
                    eprintln!("http bench: no answer in {} s during {stage}; aborting", TIMEOUT.as_secs());
                    let pids = watched.pids.lock().map(|p| p.clone()).unwrap_or_default();
                    kill_trees(&pids);
                    std::process::exit(1);
                }
            }
        });
        dog
    }

    fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn stage(&self, stage: String) {
        if let Ok(mut s) = self.stage.lock() {
            *s = stage;
        }
        self.tick();
    }

    fn watch(&self, pid: u32) {
        if let Ok(mut p) = self.pids.lock() {
            p.push(pid);
        }
    }

    fn forget(&self, pid: u32) {
        if let Ok(mut p) = self.pids.lock() {
            p.retain(|&q| q != pid);
        }
    }
}

/// SIGKILL to each root's process group and to every descendant (the sidecar runs its stdio upstreams
/// in process groups of their own).
fn kill_trees(roots: &[u32]) {
    let mut doomed = Vec::new();
    for &root in roots {
        doomed.extend(descendants(root));
    }
    for &root in roots {
        // SAFETY: kill(2) has no memory-safety preconditions; the group is one we created.
        unsafe { libc::kill(-(root as libc::pid_t), libc::SIGKILL) };
    }
    for pid in doomed {
        // SAFETY: as above; the pid was a descendant of one of our children a moment ago.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// Every process below `root`, from the parent ids in /proc/*/stat.
fn descendants(root: u32) -> Vec<u32> {
    let mut tree: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            tree.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(tree.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The processes of one path, each in its own process group, listening.
struct Setup {
    children: Vec<Child>,
    url: String,
    fixture: Option<u32>,
    sidecar: Option<u32>,
    dog: Arc<Watchdog>,
}

impl Setup {
    fn start(path: Path, dog: &Arc<Watchdog>, peers: &Peers) -> Setup {
        dog.stage(format!("start of {}", path.name()));
        let mut s = Setup {
            children: Vec::new(),
            url: String::new(),
            fixture: None,
            sidecar: None,
            dog: dog.clone(),
        };
        if path.is_peer() {
            let addr = format!("127.0.0.1:{}", free_port());
            let port = addr.rsplit_once(':').map(|(_, p)| p.to_owned()).unwrap_or_default();
            let c = match path {
                Path::Supergateway => {
                    let mut c = Command::new("node");
                    c.arg(peers.supergateway.as_ref().expect("installed"))
                        .args(["--stdio", &format!("{BIN} --log-level error test-server")])
                        .args(["--outputTransport", "streamableHttp", "--stateful", "--port", &port])
                        .args(["--logLevel", "none"]);
                    c
                }
                _ => {
                    let mut c = Command::new(peers.mcp_proxy.as_ref().expect("installed"));
                    c.args(["--host", "127.0.0.1", "--port", &port, "--log-level", "WARNING", BIN, "--"])
                        .args(["--log-level", "error", "test-server"]);
                    c
                }
            };
            s.sidecar = Some(s.spawn(c, &addr, path.name()));
            s.url = format!("http://{addr}/mcp");
            return s;
        }
        let mut upstream_url = None;
        if !path.stdio_below() {
            let addr = format!("127.0.0.1:{}", free_port());
            let mut c = Command::new(BIN);
            c.args(["--log-level", "error", "test-server", "--http", &addr]);
            s.fixture = Some(s.spawn(c, &addr, "the fixture server"));
            upstream_url = Some(format!("http://{addr}/mcp"));
        }
        if path == Path::Direct {
            s.url = upstream_url.expect("the fixture's url");
            return s;
        }
        let addr = format!("127.0.0.1:{}", free_port());
        if path == Path::TcpRelay {
            let upstream = upstream_url
                .as_deref()
                .and_then(|u| u.strip_prefix("http://"))
                .and_then(|u| u.split_once('/'));
            let upstream = upstream.expect("the fixture's address").0;
            let mut c = Command::new(std::env::current_exe().expect("the bench's own path"));
            c.env(common::relay::TCP, format!("{addr},{upstream}"));
            s.sidecar = Some(s.spawn(c, &addr, "the TCP relay"));
            s.url = format!("http://{addr}/mcp");
            return s;
        }
        let mut c = Command::new(BIN);
        c.args(["serve", "--listen", &addr, "--log-level", "error"]);
        if path == Path::SidecarTwoThreads {
            c.args(["--worker-threads", "2"]);
        }
        match upstream_url {
            Some(url) => c.args(["--upstream-url", &url]),
            None => c.args(["--", BIN, "--log-level", "error", "test-server"]),
        };
        s.sidecar = Some(s.spawn(c, &addr, "the sidecar"));
        s.url = format!("http://{addr}/mcp");
        s
    }

    /// The processes of the HTTP front (the sidecar, or a peer and its helpers, such as a shell),
    /// without the fixture below it.
    fn front(&self) -> Vec<u32> {
        let Some(root) = self.sidecar else { return Vec::new() };
        let below = descendants(root).into_iter().filter(|p| comm(*p) != "mcp-asyncify");
        std::iter::once(root).chain(below).collect()
    }

    /// Starts `cmd` and waits (10 s at most) until it accepts connections on `addr`.
    fn spawn(&mut self, mut cmd: Command, addr: &str, what: &str) -> u32 {
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let pid = child.id();
        self.dog.watch(pid);
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            let child = self.children.last_mut().expect("just pushed");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("http bench: {what} exited before listening ({status})");
            }
            assert!(Instant::now() < deadline, "http bench: {what} did not listen on {addr} in 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        pid
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.children.iter().map(Child::id).collect();
        kill_trees(&pids);
        for child in &mut self.children {
            let _ = child.wait();
            self.dog.forget(child.id());
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An MCP session over Streamable HTTP.
struct McpClient {
    http: HttpClient,
    uri: Uri,
    session: Option<HeaderValue>,
    protocol: HeaderValue,
    next_id: AtomicU64,
    dog: Arc<Watchdog>,
    /// Stateless 2026-07-28 requests (no session; routing headers and `_meta` on each).
    modern: bool,
}

/// The `_meta` of a 2026-07-28 request that declares the Tasks extension.
fn modern_meta() -> serde_json::Value {
    serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "http-bench", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
    })
}

struct Reply {
    status: StatusCode,
    session: Option<HeaderValue>,
    body: Bytes,
}

impl McpClient {
    async fn open(url: &str, dog: &Arc<Watchdog>, modern: bool) -> McpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        let mut c = McpClient {
            http,
            uri: url.parse().expect("a valid url"),
            session: None,
            protocol: HeaderValue::from_static(PROTOCOL),
            next_id: AtomicU64::new(1),
            dog: dog.clone(),
            modern,
        };
        if modern {
            // No handshake: discovery (which makes the sidecar open its upstream connection).
            c.protocol = HeaderValue::from_static(MODERN);
            let discover = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "server/discover",
                "params": {"_meta": modern_meta()}});
            let r = c.post_as(Bytes::from(discover.to_string()), "server/discover", None).await;
            let text = String::from_utf8_lossy(&r.body).into_owned();
            assert!(
                r.status == StatusCode::OK && text.contains("supportedVersions"),
                "http bench: discover: {text}"
            );
            return c;
        }
        let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "http-bench", "version": "0"},
        }});
        let r = c.post(Bytes::from(init.to_string())).await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, StatusCode::OK, "http bench: initialize answered {}: {text}", r.status);
        let answer = messages(&r.body).find(|m| id_of(m) == Some(0)).unwrap_or_else(|| {
            panic!("http bench: no answer to initialize in {text}");
        });
        let answer: serde_json::Value = serde_json::from_slice(answer).expect("a JSON answer");
        assert!(answer.get("result").is_some(), "http bench: initialize failed: {answer}");
        c.session = Some(r.session.unwrap_or_else(|| panic!("http bench: no Mcp-Session-Id from {url}")));
        let r =
            c.post(Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)).await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "http bench: notifications/initialized answered {}",
            r.status
        );
        c
    }

    async fn post(&self, body: Bytes) -> Reply {
        self.post_as(body, "tools/call", Some("echo")).await
    }

    /// A POST of `body`, whose method (and name) a stateless request repeats in its headers.
    async fn post_as(&self, body: Bytes, method: &str, name: Option<&str>) -> Reply {
        let mut req = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        if self.modern {
            req = req.header("mcp-protocol-version", self.protocol.clone()).header("mcp-method", method);
            if let Some(name) = name {
                req = req.header("mcp-name", name);
            }
        }
        if let Some(session) = &self.session {
            req = req
                .header("mcp-session-id", session.clone())
                .header("mcp-protocol-version", self.protocol.clone());
        }
        let req = req.body(Full::new(body)).expect("a valid request");
        let res =
            self.http.request(req).await.unwrap_or_else(|e| panic!("http bench: POST {}: {e}", self.uri));
        let (parts, body) = res.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => panic!("http bench: reading an answer from {}: {e}", self.uri),
        };
        Reply { status: parts.status, session: parts.headers.get("mcp-session-id").cloned(), body }
    }

    /// One `tools/call` (pre-serialised as `body` with id `id`), checked for its result.
    async fn call(&self, body: Bytes, id: u64) {
        let r = self.post(body).await;
        let ok = r.status == StatusCode::OK
            && messages(&r.body)
                .any(|m| id_of(m) == Some(id) && m.len() >= TEXT_LEN && contains(m, b"\"result\""));
        if !ok {
            panic!(
                "http bench: unexpected answer to call {id} ({}): {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        self.dog.tick();
    }

    /// A closed loop of `count` echo calls with `in_flight` outstanding, no new call after `budget`;
    /// the latencies (ns) of the calls made and the elapsed time.
    async fn run(self: &Arc<Self>, count: usize, in_flight: usize, budget: Duration) -> (Vec<u64>, Duration) {
        let first = self.next_id.fetch_add(count as u64, Ordering::Relaxed);
        let text = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(TEXT_LEN / 36 + 1);
        let text = &text[..TEXT_LEN];
        let requests: Arc<Vec<Bytes>> = Arc::new(
            (0..count as u64)
                .map(|i| {
                    let mut call = serde_json::json!({"jsonrpc": "2.0", "id": first + i, "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"text": text}}});
                    if self.modern {
                        call["params"]["_meta"] = modern_meta();
                    }
                    Bytes::from(call.to_string())
                })
                .collect(),
        );
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..in_flight.min(count) {
            let (client, requests, next) = (self.clone(), requests.clone(), next.clone());
            workers.spawn(async move {
                let mut latencies = Vec::with_capacity(count / in_flight + 1);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests.len() || started.elapsed() > budget {
                        return latencies;
                    }
                    let sent = Instant::now();
                    client.call(requests[i].clone(), first + i as u64).await;
                    latencies.push(sent.elapsed().as_nanos() as u64);
                }
            });
        }
        let mut latencies = Vec::with_capacity(count);
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(l) => latencies.extend(l),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        (latencies, started.elapsed())
    }
}

/// The JSON-RPC messages of an answer: the body itself (application/json, one line) or each SSE `data:`
/// line holding an object.
fn messages(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|&b| b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = match line.strip_prefix(b"data:") {
            Some(data) => data.strip_prefix(b" ").unwrap_or(data),
            None => line,
        };
        (line.first() == Some(&b'{')).then_some(line)
    })
}

/// The numeric id of a JSON-RPC message (the first `"id":`, which leads in both servers' output).
fn id_of(msg: &[u8]) -> Option<u64> {
    let at = find(msg, b"\"id\":")?;
    let digits = &msg[at + 5..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[derive(Clone, Copy)]
struct Stats {
    calls: f64,
    p50_us: f64,
    p99_us: f64,
    rate: f64,
    /// CPU (user + system) per call of the HTTP front (the sidecar, or a peer with its helpers), µs.
    front_cpu_us: f64,
}

fn main() {
    common::relay::run_if_asked();
    let calls: usize = std::env::var("HTTP_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dog = Watchdog::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    rt.block_on(bench(calls, dog));
}

async fn bench(calls: usize, dog: Arc<Watchdog>) {
    let calls_at = |level: usize| match level {
        1 => (calls * 3 / 10).max(10),
        _ => calls.max(10),
    };
    let started = Instant::now();
    let peers = Peers::ensure();
    let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| peers.has(*p)).collect();

    // Idle RSS: initialize, one call, 300 ms.
    let mut idle: Vec<(Path, u64, u64)> = Vec::new();
    for &path in &paths {
        let setup = Setup::start(path, &dog, &peers);
        let client = Arc::new(McpClient::open(&setup.url, &dog, path == Path::SidecarStdioModern).await);
        dog.stage(format!("idle call on {}", path.name()));
        client.run(1, 1, RUN_BUDGET).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = |pid: Option<u32>| pid.map(rss_kib).unwrap_or(0);
        idle.push((path, rss(setup.sidecar), rss(setup.fixture)));
    }

    let mut results: Vec<(Path, usize, Vec<Stats>)> = Vec::new();
    for &path in &paths {
        for level in LEVELS {
            results.push((path, level, Vec::new()));
        }
    }
    let mut rss_loaded: Vec<(Path, u64)> = vec![(Path::Sidecar, 0), (Path::SidecarStdio, 0)];
    for rep in 0..REPS {
        for (li, level) in LEVELS.into_iter().enumerate() {
            for k in 0..paths.len() {
                let path = paths[(k + rep + li) % paths.len()];
                let count = calls_at(level);
                let setup = Setup::start(path, &dog, &peers);
                dog.stage(format!("initialize of {}", path.name()));
                let client =
                    Arc::new(McpClient::open(&setup.url, &dog, path == Path::SidecarStdioModern).await);
                dog.stage(format!("warm-up of {} at {level} in flight", path.name()));
                client.run((count / 10).max(200), level, WARM_UP).await;
                dog.stage(format!("run {} of {} at {level} in flight", rep + 1, path.name()));
                let front = setup.front();
                let cpu_before: u64 = front.iter().map(|p| cpu_ns(*p)).sum();
                let (mut lat, elapsed) = client.run(count, level, RUN_BUDGET).await;
                let cpu_after: u64 = front.iter().map(|p| cpu_ns(*p)).sum();
                if let (64, Some(pid)) = (level, setup.sidecar) {
                    for (p, rss) in rss_loaded.iter_mut() {
                        if *p == path {
                            *rss = (*rss).max(rss_kib(pid));
                        }
                    }
                }
                drop(client);
                drop(setup);
                lat.sort_unstable();
                let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
                let stats = Stats {
                    calls: lat.len() as f64,
                    p50_us: pct(0.50),
                    p99_us: pct(0.99),
                    rate: lat.len() as f64 / elapsed.as_secs_f64(),
                    front_cpu_us: cpu_after.saturating_sub(cpu_before) as f64 / 1e3 / lat.len() as f64,
                };
                results.iter_mut().find(|r| r.0 == path && r.1 == level).unwrap().2.push(stats);
            }
        }
    }

    let median = |path: Path, level: usize| -> Stats {
        let runs = &results.iter().find(|r| r.0 == path && r.1 == level).unwrap().2;
        let med = |f: fn(&Stats) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        Stats {
            calls: med(|s| s.calls),
            p50_us: med(|s| s.p50_us),
            p99_us: med(|s| s.p99_us),
            rate: med(|s| s.rate),
            front_cpu_us: med(|s| s.front_cpu_us),
        }
    };

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "1 KB `tools/call` (echo) over Streamable HTTP ({PROTOCOL}, HTTP/1.1 keep-alive), {cores} cores, \
         calls at 1/8/64 in flight: {}/{}/{} (a run stops early after {} s), median of {REPS} runs\n",
        calls_at(1),
        calls_at(8),
        calls_at(64),
        RUN_BUDGET.as_secs()
    );
    println!(
        "| path | in flight | calls | p50 µs | p99 µs | calls/s | p50 vs direct | calls/s vs direct | front CPU µs/call |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for level in LEVELS {
        let direct = median(Path::Direct, level);
        for &path in &paths {
            let m = median(path, level);
            let cpu = match path {
                Path::Direct => "–".to_owned(),
                _ => format!("{:.0}", m.front_cpu_us),
            };
            println!(
                "| {} | {level} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {cpu} |",
                path.name(),
                m.calls,
                m.p50_us,
                m.p99_us,
                m.rate,
                m.p50_us / direct.p50_us,
                m.rate / direct.rate
            );
        }
    }
    println!();
    let mb = |kib: u64| kib as f64 / 1024.0;
    let idle_of = |p: Path| idle.iter().find(|i| i.0 == p).map(|i| (i.1, i.2)).unwrap_or((0, 0));
    let loaded_of = |p: Path| rss_loaded.iter().find(|i| i.0 == p).map(|i| i.1).unwrap_or(0);
    println!(
        "idle RSS of the sidecar: {:.1} MB (→ HTTP upstream), {:.1} MB (→ stdio upstream, its child not \
         counted); the HTTP fixture server alone: {:.1} MB",
        mb(idle_of(Path::Sidecar).0),
        mb(idle_of(Path::SidecarStdio).0),
        mb(idle_of(Path::Direct).1)
    );
    println!(
        "RSS of the sidecar after the 64-in-flight load: {:.1} MB (→ HTTP upstream), {:.1} MB \
         (→ stdio upstream)",
        mb(loaded_of(Path::Sidecar)),
        mb(loaded_of(Path::SidecarStdio))
    );
    let p50_ratio = |p: Path| median(p, 1).p50_us / median(Path::Direct, 1).p50_us;
    let rate_ratio = |p: Path| median(p, 64).rate / median(Path::Direct, 64).rate;
    println!(
        "p50 at 1 in flight: sidecar/direct = {:.2} (→ stdio upstream: {:.2})",
        p50_ratio(Path::Sidecar),
        p50_ratio(Path::SidecarStdio)
    );
    println!(
        "throughput at 64 in flight: sidecar/direct = {:.2} (→ stdio upstream: {:.2})",
        rate_ratio(Path::Sidecar),
        rate_ratio(Path::SidecarStdio)
    );
    println!(
        "2026-07-28 stateless vs 2025-11-25 session (sidecar → stdio upstream): p50 at 1 in flight {:.2}×, \
         throughput at 64 in flight {:.2}×",
        median(Path::SidecarStdioModern, 1).p50_us / median(Path::SidecarStdio, 1).p50_us,
        median(Path::SidecarStdioModern, 64).rate / median(Path::SidecarStdio, 64).rate
    );
    let best_peer = |level: usize, better: fn(&Stats, &Stats) -> bool| {
        paths
            .iter()
            .filter(|p| p.is_peer())
            .map(|p| (*p, median(*p, level)))
            .reduce(|a, b| if better(&b.1, &a.1) { b } else { a })
    };
    match (best_peer(1, |a, b| a.p50_us < b.p50_us), best_peer(64, |a, b| a.rate > b.rate)) {
        (Some((fast, at1)), Some((strong, at64))) => {
            let ours1 = median(Path::SidecarStdio, 1);
            let ours64 = median(Path::SidecarStdio, 64);
            println!(
                "against the peers (sidecar → stdio upstream): p50 at 1 in flight {:.2}× the best peer's ({}; goal ≤ 0.3), \
                 throughput at 64 in flight {:.1}× the best peer's ({}; goal ≥ 6); front CPU per call at 64 in flight \
                 {:.0} µs against {:.0} µs",
                ours1.p50_us / at1.p50_us,
                fast.name(),
                ours64.rate / at64.rate,
                strong.name(),
                ours64.front_cpu_us,
                at64.front_cpu_us
            );
        }
        _ => println!("against the peers: none installed in this run"),
    }
    println!(
        "sidecar → HTTP upstream: p50 at 1 in flight {:.2}× direct (goal ≤ 1.5; two worker threads: {:.2}×; \
         the floors of one more hop: the TCP relay {:.2}×, the HTTP relay {:.2}×); front CPU per call {:.0} µs \
         (two worker threads: {:.0} µs; the TCP relay: {:.0} µs, the HTTP relay: {:.0} µs)",
        p50_ratio(Path::Sidecar),
        p50_ratio(Path::SidecarTwoThreads),
        p50_ratio(Path::TcpRelay),
        p50_ratio(Path::HttpRelay),
        median(Path::Sidecar, 1).front_cpu_us,
        median(Path::SidecarTwoThreads, 1).front_cpu_us,
        median(Path::TcpRelay, 1).front_cpu_us,
        median(Path::HttpRelay, 1).front_cpu_us
    );
    println!(
        "throughput at 64 in flight: sidecar/direct {:.2} (two worker threads: {:.2}; the TCP relay: {:.2}, the HTTP relay: {:.2})",
        rate_ratio(Path::Sidecar),
        rate_ratio(Path::SidecarTwoThreads),
        rate_ratio(Path::TcpRelay),
        rate_ratio(Path::HttpRelay)
    );
    for &path in &paths {
        let p50 = median(path, 1).p50_us;
        if (35_000.0..50_000.0).contains(&p50) {
            println!(
                "note: {} answers in ~40 ms at 1 in flight: the delayed-ACK timer, the mark of a server \
                 writing an answer in several segments on a socket without TCP_NODELAY (Nagle)",
                path.name()
            );
        }
    }
    println!("(bench took {:.0} s)", started.elapsed().as_secs_f64());
}
