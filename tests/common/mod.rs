//! A line-level JSON-RPC peer that drives the built binary: what a client writes and reads, byte for
//! byte, with timeouts everywhere so a failing test never hangs.
#![allow(dead_code)] // each test binary uses a different part of it

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-asyncify");

/// Gives a spawned proxy a fresh, empty data directory (its default task store lives there), unless the
/// test set `MCP_ASYNCIFY_DATA_DIR` itself: tests never share tasks by accident and never touch the real
/// user's data directory.
pub fn isolate(cmd: &mut Command) {
    if cmd.get_envs().any(|(k, _)| k == "MCP_ASYNCIFY_DATA_DIR") {
        return;
    }
    cmd.env("MCP_ASYNCIFY_DATA_DIR", fresh_dir("data"));
}

/// Where this test process keeps its files: `$TMPDIR/asyncify-run-<pid>`. The first call removes the
/// directories of earlier test processes that are gone, so test runs do not pile up files in the temp
/// dir (a process still running keeps its own).
pub fn scratch() -> std::path::PathBuf {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid =
                name.to_str().and_then(|n| n.strip_prefix("asyncify-run-")).and_then(|p| p.parse().ok());
            if pid.is_some_and(|pid| pid != std::process::id() && !alive(pid)) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let root = tmp.join(format!("asyncify-run-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create the test scratch dir");
        root
    })
    .clone()
}

/// A new empty directory under this process's [`scratch`] dir.
pub fn fresh_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch().join(format!("{what}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running `mcp-asyncify` (or any stdio MCP process) and the lines it wrote.
pub struct Peer {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines read but not yet claimed by `response`/`next_matching`.
    pub backlog: VecDeque<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Peer {
    /// Starts `BIN args…` with piped stdio.
    pub fn start(args: &[&str]) -> Peer {
        Self::start_cmd(Command::new(BIN).args(args))
    }

    /// Starts any command with piped stdio (a proxy gets a fresh data directory of its own, unless the
    /// test chose one).
    pub fn start_cmd(cmd: &mut Command) -> Peer {
        keep_sign_ins_apart(cmd);
        isolate(cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the binary under test");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&line).trim_end_matches('\n').to_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stderr_done.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
                if std::env::var_os("ASYNCIFY_TEST_STDERR").is_some() {
                    eprint!("{chunk}");
                }
                sink.lock().unwrap().push_str(&chunk);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Peer { stdin: child.stdin.take(), child, lines: rx, backlog: VecDeque::new(), stderr, stderr_done }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Writes one line (a newline is added).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Writes a JSON value as one line.
    pub fn send_json(&mut self, v: &Value) {
        self.send(&v.to_string());
    }

    /// Sends a request.
    pub fn request(&mut self, id: impl Into<Value>, method: &str, params: Value) {
        self.send_json(&json!({"jsonrpc": "2.0", "id": id.into(), "method": method, "params": params}));
    }

    /// Sends a notification.
    pub fn notify(&mut self, method: &str, params: Value) {
        self.send_json(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Closes our end of its stdin (client EOF).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// The next line written (from the backlog first), or None after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        if let Some(l) = self.backlog.pop_front() {
            return Some(l);
        }
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The first line (raw) for which `pred` holds on its JSON, keeping the others in the backlog.
    pub fn next_matching_raw(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> String {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|l| serde_json::from_str::<Value>(l).map(|v| pred(&v)).unwrap_or(false))
        {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if serde_json::from_str::<Value>(&l).map(|v| pred(&v)).unwrap_or(false) {
                        return l;
                    }
                    self.backlog.push_back(l);
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; seen meanwhile: {:?}\nstderr:\n{}",
                    self.backlog,
                    self.stderr()
                ),
            }
        }
    }

    /// The first message for which `pred` holds.
    pub fn next_matching(&mut self, what: &str, pred: impl FnMut(&Value) -> bool) -> Value {
        serde_json::from_str(&self.next_matching_raw(what, pred)).unwrap()
    }

    /// The response to request `id` (raw line).
    pub fn response_raw(&mut self, id: &Value) -> String {
        let id = id.clone();
        self.next_matching_raw(&format!("the response to id {id}"), |v| {
            v.get("method").is_none() && v.get("id") == Some(&id)
        })
    }

    /// The response to request `id`.
    pub fn response(&mut self, id: impl Into<Value>) -> Value {
        serde_json::from_str(&self.response_raw(&id.into())).unwrap()
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, id: impl Into<Value>, method: &str, params: Value) -> Value {
        let id = id.into();
        self.request(id.clone(), method, params);
        self.response(id)
    }

    /// The result of a request, failing the test on a JSON-RPC error.
    pub fn ok(&mut self, id: impl Into<Value>, method: &str, params: Value) -> Value {
        let r = self.call(id, method, params);
        assert!(r.get("error").is_none(), "{method} failed: {r}");
        r["result"].clone()
    }

    /// `initialize` + `notifications/initialized`, as a client with the given capabilities.
    pub fn initialize(&mut self, capabilities: Value) -> Value {
        let r = self.ok(
            "init",
            "initialize",
            json!({
                "protocolVersion": "2025-11-25",
                "capabilities": capabilities,
                "clientInfo": {"name": "asyncify-tests", "version": "1"}
            }),
        );
        self.notify("notifications/initialized", json!({}));
        r
    }

    /// A plain `tools/call`.
    pub fn tool(&mut self, id: impl Into<Value>, name: &str, args: Value) -> Value {
        self.call(id, "tools/call", json!({"name": name, "arguments": args}))
    }

    /// Waits for the process to exit, failing after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader catch up with what it wrote last (bounded: a child may hold stderr).
                let until = Instant::now() + Duration::from_secs(2);
                while !self.stderr_done.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line still to come until the process closes stdout (bounded by `timeout`).
    pub fn drain(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut out: Vec<String> = self.backlog.drain(..).collect();
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            out.push(l);
        }
        out
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points the OAuth token store at a temporary directory unless the test chose one: a test never
/// reads or writes the user's own sign-ins.
pub fn keep_sign_ins_apart(cmd: &mut Command) {
    if !cmd.get_envs().any(|(k, _)| k == "MCP_ASYNCIFY_AUTH_DIR") {
        let dir = scratch().join("auth");
        cmd.env("MCP_ASYNCIFY_AUTH_DIR", dir);
    }
}

/// The text of the first content block of a tool result.
pub fn text_of(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text content in {result}"))
}

/// Whether a process id is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

/// Writes a TOML configuration file for one test and returns its path.
pub fn config_file(name: &str, toml: &str) -> std::path::PathBuf {
    let path = scratch().join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// A free port on 127.0.0.1 (bound and released: good enough for tests).
/// Never the same port twice in one test binary: tests run in parallel, and the kernel may hand a
/// just-released port out again before the server meant for it has bound it.
pub fn free_addr() -> String {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return format!("127.0.0.1:{port}");
        }
    }
}

/// `BIN` serving HTTP (the sidecar, or a server with `--http`) on a free address, killed on drop.
pub struct Served {
    child: Child,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// `http://127.0.0.1:port/mcp`.
    pub url: String,
}

impl Served {
    /// Starts `BIN args…` where `{addr}` in an argument is replaced by the address; waits until it
    /// accepts connections.
    pub fn start(args: &[&str]) -> Served {
        Self::start_with_env(args, &[])
    }

    /// The sidecar (`serve`) on a free address, logging warnings, with `rest` after those options
    /// (its own options, then `-- CMD…` or `--upstream-url URL`).
    pub fn sidecar(rest: &[&str]) -> Served {
        let mut args = vec!["serve", "--listen", "{addr}", "--log-level", "warn"];
        args.extend_from_slice(rest);
        Self::start(&args)
    }

    /// [`Served::start`] with environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Served {
        let addr = free_addr();
        let args: Vec<String> = args.iter().map(|a| a.replace("{addr}", &addr)).collect();
        let mut command = Command::new(BIN);
        command.envs(env.iter().copied());
        isolate(&mut command);
        keep_sign_ins_apart(command.args(&args));
        let mut child = command.stdin(Stdio::null()).spawn().expect("start the server");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "`{}` did not listen on {addr}", args.join(" "));
            std::thread::sleep(Duration::from_millis(20));
        }
        // Someone else's server on that port would answer too: make sure ours is the one running.
        std::thread::sleep(Duration::from_millis(20));
        assert!(child.try_wait().unwrap().is_none(), "`{}` exited (is {addr} taken?)", args.join(" "));
        Served { child, url: format!("http://{addr}/mcp"), addr }
    }
}

impl Served {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange with `addr` (Connection: close); `headers` as "Name: value" lines.
pub fn http(addr: &str, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Reply {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer before it has read the whole body (a 413 on Content-Length) and stop
    // reading: the answer is still there to read.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Reply::parse(&raw)
}

/// An HTTP answer, read whole.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: String,
}

impl Reply {
    /// Parses a raw HTTP/1.1 response.
    pub fn parse(raw: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut reply = Reply { status, headers, body: body.to_owned() };
        if reply.header("transfer-encoding") == Some("chunked") {
            reply.body = dechunk(body);
        }
        reply
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The JSON-RPC messages in the body (one JSON document, or SSE `data:` lines).
    pub fn messages(&self) -> Vec<Value> {
        if self.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
            self.body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect()
        } else {
            serde_json::from_str(&self.body).into_iter().collect()
        }
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// `tests/node`, where the pinned npm packages of the end-to-end tests live.
pub fn node_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("node")
}

/// Fails the test with a clear message when node is missing, and installs `tests/node/node_modules`
/// with `npm ci` (once per test binary) when one of `packages` (names under `@modelcontextprotocol/`)
/// is not there. `purpose` says what the tests need node for.
pub fn ensure_node_packages(packages: &[&str], purpose: &str) {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        match Command::new("node").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return Err(format!("`node --version` failed ({}): {purpose}, with node 20+", out.status));
            }
            Err(e) => {
                return Err(format!(
                    "node is not installed or not on PATH ({e}): {purpose}, with node 20+ and npm"
                ));
            }
        }
        let dir = node_dir();
        let missing = || {
            packages
                .iter()
                .filter(|p| {
                    !dir.join("node_modules/@modelcontextprotocol").join(p).join("package.json").exists()
                })
                .map(|p| format!("@modelcontextprotocol/{p}"))
                .collect::<Vec<_>>()
        };
        if missing().is_empty() {
            return Ok(());
        }
        let out =
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir).output().map_err(
                |e| format!("could not run `npm ci` in {} (is npm installed?): {e}", dir.display()),
            )?;
        if !out.status.success() {
            return Err(format!(
                "`npm ci` in {} failed ({}):\n{}\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        match missing().as_slice() {
            [] => Ok(()),
            gone => Err(format!(
                "`npm ci` in {} did not install {} (are they in package.json?)",
                dir.display(),
                gone.join(", ")
            )),
        }
    });
    if let Err(e) = ready {
        panic!("{e}");
    }
}

/// Waits for `child` to exit, at most `limit` (from `started`); past it the child is killed and
/// `None` is returned.
pub fn wait_with_limit(child: &mut Child, started: Instant, limit: Duration) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
