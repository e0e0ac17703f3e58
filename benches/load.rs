//! Load: a 1 KB `tools/call` round trip direct to the upstream, through a plain byte relay, and through
//! mcp-asyncify (tasks on, and `--no-tasks`), measured in one run on the same machine.
//!
//! The upstream is the built binary's fixture server (`mcp-asyncify test-server`); the call is `echo`
//! with a 1,000-character text, so the request and the answer are each about 1 KB. The relay is
//! `sh -c 'cat | <upstream> | cat'`: the floor any stdio proxy pays for two extra pipes and processes.
//! The line relay is this bench's own binary re-executed as one tokio process that copies whole lines
//! both ways on the proxy's I/O and reads none of them (`common::relay`): the floor of an event-loop
//! proxy, so the proxy's CPU over it is what reading and routing the messages costs.
//! Each path gets a fresh process, an MCP `initialize`, a warm-up, then a closed loop keeping 1, 8 or 64
//! calls in flight (a new request as soon as one answers, matched by id, requests serialised up front)
//! for a fixed number of calls; each configuration runs 3 times with the paths in rotating order and
//! the table shows the medians. The proxy's RSS is read from /proc: idle (after initialize, one call
//! and 300 ms) and right after the 64-in-flight load. The CPU each path's processes use during the
//! measured calls (user + system, summed over their threads from `/proc/PID/task/*/schedstat`) is
//! divided by the calls: the relaying processes' (the proxy; the relay's `cat`s) and the upstream's.
//! CPU per call is steadier than latency on a shared machine. Goals are reported, never asserted.
//!
//! `cargo bench --bench load` (env `LOAD_CALLS=n`: calls at 64 in flight, default 20,000; half that at
//! 8, a quarter at 1).

mod common;

use common::{comm, contains, cpu_ns, descendants, find, rss_kib};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-asyncify");
const TEXT_LEN: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(30);
const REPS: usize = 3;
const LEVELS: [usize; 3] = [1, 8, 64];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Relay,
    /// One tokio process on the proxy's I/O (its pipes through the event loop) that copies whole lines
    /// both ways and reads nothing of them: the floor of an event-loop stdio proxy.
    LineRelay,
    Proxy,
    ProxyNoTasks,
    ProxyTelemetry,
    /// The same calls as a 2026-07-28 client sends them: no handshake, the protocol version and the
    /// Tasks extension in every request's `_meta` (answered inline: echo finishes inside the window).
    ProxyModern,
}

impl Path {
    const ALL: [Path; 7] = [
        Path::Direct,
        Path::Relay,
        Path::LineRelay,
        Path::Proxy,
        Path::ProxyNoTasks,
        Path::ProxyTelemetry,
        Path::ProxyModern,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "byte relay (2× cat)",
            Path::LineRelay => "line relay (tokio, no JSON)",
            Path::Proxy => "mcp-asyncify",
            Path::ProxyNoTasks => "mcp-asyncify --no-tasks",
            Path::ProxyTelemetry => "mcp-asyncify + telemetry",
            Path::ProxyModern => "mcp-asyncify, 2026-07-28 stateless",
        }
    }

    fn command(self) -> Command {
        let upstream = [BIN, "--log-level", "error", "test-server"];
        match self {
            Path::Direct => {
                let mut c = Command::new(BIN);
                c.args(&upstream[1..]);
                c
            }
            Path::Relay => {
                let mut c = Command::new("sh");
                c.args(["-c", "cat | \"$0\" --log-level error test-server | cat", BIN]);
                c
            }
            Path::LineRelay => {
                let mut c = Command::new(std::env::current_exe().expect("the bench's own path"));
                c.env(common::relay::LINE, "1").args(upstream);
                c
            }
            Path::Proxy | Path::ProxyNoTasks | Path::ProxyTelemetry | Path::ProxyModern => {
                let mut c = Command::new(BIN);
                c.args(["--log-level", "error"]);
                if self == Path::ProxyNoTasks {
                    c.arg("--no-tasks");
                }
                if self == Path::ProxyTelemetry {
                    // Everything on: the Prometheus endpoint, and metrics and traces over OTLP to a
                    // collector that is not there (what a dead collector costs is part of the price).
                    c.args(["--metrics-listen", "127.0.0.1:0"])
                        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
                        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
                }
                c.arg("--").args(upstream);
                c
            }
        }
    }
}

/// Aborts the bench (killing the current child's process group) when nothing is read for 30 s.
struct Watchdog {
    progress: AtomicU64,
    pgid: AtomicU64,
    stage: Mutex<String>,
}

impl Watchdog {
    fn start() -> Arc<Watchdog> {
        let dog = Arc::new(Watchdog {
            progress: AtomicU64::new(0),
            pgid: AtomicU64::new(0),
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
                    eprintln!("load bench: no answer in {} s during {stage}; aborting", TIMEOUT.as_secs());
                    kill_group(watched.pgid.load(Ordering::Relaxed));
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
}

fn kill_group(pgid: u64) {
    if pgid != 0 {
        let _ =
            Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
    }
}

/// One spawned path (in its own process group), initialized.
struct Session {
    child: Child,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
    line: Vec<u8>,
    next_id: u64,
    dog: Arc<Watchdog>,
    /// Requests carry the 2026-07-28 `_meta` (and there was no handshake).
    modern: bool,
}

/// The `_meta` of a 2026-07-28 request that declares the Tasks extension.
const MODERN_META: &str = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"load-bench","version":"0"},"io.modelcontextprotocol/clientCapabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}}}"#;

impl Session {
    fn start(path: Path, dog: &Arc<Watchdog>) -> Session {
        dog.stage(format!("start of {}", path.name()));
        let mut child = path
            .command()
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.name()));
        dog.pgid.store(u64::from(child.id()), Ordering::Relaxed);
        let input = child.stdin.take();
        let output = BufReader::with_capacity(256 * 1024, child.stdout.take().unwrap());
        let modern = path == Path::ProxyModern;
        let mut s = Session { child, input, output, line: Vec::new(), next_id: 1, dog: dog.clone(), modern };
        if modern {
            // No handshake: the first request (discovery) makes the proxy initialize the upstream.
            s.write(format!("{{\"jsonrpc\":\"2.0\",\"id\":\"init\",\"method\":\"server/discover\",\"params\":{{{MODERN_META}}}}}\n").as_bytes());
            loop {
                s.read_line();
                if contains(&s.line, br#""id":"init""#) {
                    break;
                }
            }
            assert!(
                contains(&s.line, b"supportedVersions"),
                "discover failed: {}",
                String::from_utf8_lossy(&s.line)
            );
            return s;
        }
        s.write(
            br#"{"jsonrpc":"2.0","id":"init","method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"load-bench","version":"0"}}}
"#,
        );
        loop {
            s.read_line();
            if contains(&s.line, br#""id":"init""#) {
                break;
            }
        }
        assert!(contains(&s.line, b"\"result\""), "initialize failed: {}", String::from_utf8_lossy(&s.line));
        s.write(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n");
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The processes of this path that relay (the proxy, or the relay's `cat`s and their `sh`) and
    /// those that serve (the upstream), by pid.
    fn roles(&self, path: Path) -> (Vec<u32>, Vec<u32>) {
        let pid = self.pid();
        match path {
            Path::Direct => (Vec::new(), vec![pid]),
            Path::Relay => {
                let (cats, upstream): (Vec<u32>, Vec<u32>) =
                    descendants(pid).into_iter().partition(|p| comm(*p) == "cat");
                (std::iter::once(pid).chain(cats).collect(), upstream)
            }
            _ => (vec![pid], descendants(pid)),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let input = self.input.as_mut().expect("stdin open");
        if let Err(e) = input.write_all(bytes) {
            panic!("load bench: writing to the path failed: {e}");
        }
    }

    fn read_line(&mut self) {
        self.line.clear();
        match self.output.read_until(b'\n', &mut self.line) {
            Ok(0) => panic!("load bench: the path closed its output (exited?)"),
            Ok(_) => self.dog.tick(),
            Err(e) => panic!("load bench: reading from the path failed: {e}"),
        }
    }

    /// Reads until a response with a numeric id; returns the id.
    fn read_response(&mut self) -> u64 {
        loop {
            self.read_line();
            let Some(at) = find(&self.line, b"\"id\":") else { continue };
            let digits = &self.line[at + 5..];
            let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
            if end == 0 {
                continue; // a string id: a request from the server, not ours
            }
            if self.line.len() < TEXT_LEN || !contains(&self.line, b"\"result\"") {
                if contains(&self.line, b"\"method\"") {
                    continue;
                }
                panic!("load bench: unexpected answer: {}", String::from_utf8_lossy(&self.line));
            }
            return std::str::from_utf8(&digits[..end]).unwrap().parse().unwrap();
        }
    }

    /// A closed loop of `count` echo calls with `in_flight` outstanding; latencies (ns) and elapsed.
    fn run(&mut self, count: usize, in_flight: usize) -> (Vec<u64>, Duration) {
        let first = self.next_id;
        self.next_id += count as u64;
        let text = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(TEXT_LEN / 36 + 1);
        let text = &text[..TEXT_LEN];
        let meta = if self.modern { format!(",{MODERN_META}") } else { String::new() };
        let requests: Vec<Vec<u8>> = (0..count as u64)
            .map(|i| {
                format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\"arguments\":{{\"text\":\"{text}\"}}{meta}}}}}\n",
                    first + i
                )
                .into_bytes()
            })
            .collect();
        let started = Instant::now();
        let mut sent_at = vec![started; count];
        let mut latencies = Vec::with_capacity(count);
        let mut out = Vec::with_capacity(in_flight * (TEXT_LEN + 200));
        let mut next = 0;
        while next < count.min(in_flight) {
            sent_at[next] = Instant::now();
            out.extend_from_slice(&requests[next]);
            next += 1;
        }
        self.write(&out);
        out.clear();
        while latencies.len() < count {
            // Every answer already buffered, then one write for the requests they free.
            loop {
                let id = self.read_response();
                let now = Instant::now();
                let idx = id.checked_sub(first).filter(|i| *i < count as u64).expect("id in range") as usize;
                latencies.push((now - sent_at[idx]).as_nanos() as u64);
                if next < count {
                    sent_at[next] = now;
                    out.extend_from_slice(&requests[next]);
                    next += 1;
                }
                if latencies.len() == count || !self.output.buffer().contains(&b'\n') {
                    break;
                }
            }
            if !out.is_empty() {
                self.write(&out);
                out.clear();
            }
        }
        (latencies, started.elapsed())
    }

    /// Closes stdin and waits (5 s at most) for the path to exit.
    fn finish(&mut self) {
        self.dog.stage("shutdown".into());
        drop(self.input.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.input.take());
        kill_group(u64::from(self.child.id()));
        let _ = self.child.wait();
        self.dog.pgid.store(0, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy)]
struct Stats {
    p50_us: f64,
    p99_us: f64,
    rate: f64,
    /// CPU (user + system) per call of the relaying processes (the proxy; the relay's `cat`s), µs.
    relay_cpu_us: f64,
    /// CPU per call of the upstream, µs.
    upstream_cpu_us: f64,
}

/// The CPU time (ns) the processes have used so far, together.
fn cpu_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ns(*p)).sum()
}

fn main() {
    common::relay::run_if_asked();
    let calls64: usize = std::env::var("LOAD_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let calls_at = |level: usize| match level {
        1 => (calls64 / 4).max(10),
        8 => (calls64 / 2).max(10),
        _ => calls64.max(10),
    };
    let dog = Watchdog::start();
    let started = Instant::now();

    // Idle RSS: initialize, one call, 300 ms.
    let mut idle = Vec::new();
    for path in [Path::Direct, Path::Proxy, Path::ProxyNoTasks] {
        let mut s = Session::start(path, &dog);
        dog.stage(format!("idle call on {}", path.name()));
        s.run(1, 1);
        std::thread::sleep(Duration::from_millis(300));
        idle.push((path, rss_kib(s.pid())));
        s.finish();
    }

    let mut results: Vec<(Path, usize, Vec<Stats>)> = Vec::new();
    for path in Path::ALL {
        for level in LEVELS {
            results.push((path, level, Vec::new()));
        }
    }
    let mut rss_loaded: Vec<(Path, u64)> = vec![(Path::Proxy, 0), (Path::ProxyNoTasks, 0)];
    for rep in 0..REPS {
        for (li, level) in LEVELS.into_iter().enumerate() {
            for k in 0..Path::ALL.len() {
                let path = Path::ALL[(k + rep + li) % Path::ALL.len()];
                let count = calls_at(level);
                let mut s = Session::start(path, &dog);
                dog.stage(format!("warm-up of {} at {level} in flight", path.name()));
                s.run((count / 10).max(200), level);
                dog.stage(format!("run {} of {} at {level} in flight", rep + 1, path.name()));
                let (relays, upstreams) = s.roles(path);
                let cpu_before = (cpu_of(&relays), cpu_of(&upstreams));
                let (mut lat, elapsed) = s.run(count, level);
                let cpu_after = (cpu_of(&relays), cpu_of(&upstreams));
                let per_call =
                    |before: u64, after: u64| after.saturating_sub(before) as f64 / 1e3 / count as f64;
                if level == 64 {
                    for (p, rss) in rss_loaded.iter_mut() {
                        if *p == path {
                            *rss = (*rss).max(rss_kib(s.pid()));
                        }
                    }
                }
                s.finish();
                drop(s);
                lat.sort_unstable();
                let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
                let stats = Stats {
                    p50_us: pct(0.50),
                    p99_us: pct(0.99),
                    rate: count as f64 / elapsed.as_secs_f64(),
                    relay_cpu_us: per_call(cpu_before.0, cpu_after.0),
                    upstream_cpu_us: per_call(cpu_before.1, cpu_after.1),
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
            p50_us: med(|s| s.p50_us),
            p99_us: med(|s| s.p99_us),
            rate: med(|s| s.rate),
            relay_cpu_us: med(|s| s.relay_cpu_us),
            upstream_cpu_us: med(|s| s.upstream_cpu_us),
        }
    };

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "1 KB `tools/call` (echo), {cores} cores, calls at 1/8/64 in flight: {}/{}/{}, median of {REPS} runs\n",
        calls_at(1),
        calls_at(8),
        calls_at(64)
    );
    println!(
        "| path | in flight | p50 µs | p99 µs | calls/s | p50 vs direct | calls/s vs direct | relay CPU µs/call | upstream CPU µs/call |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for level in LEVELS {
        let direct = median(Path::Direct, level);
        for path in Path::ALL {
            let m = median(path, level);
            let relay_cpu = match path {
                Path::Direct => "–".to_owned(),
                _ => format!("{:.1}", m.relay_cpu_us),
            };
            println!(
                "| {} | {level} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {relay_cpu} | {:.1} |",
                path.name(),
                m.p50_us,
                m.p99_us,
                m.rate,
                m.p50_us / direct.p50_us,
                m.rate / direct.rate,
                m.upstream_cpu_us
            );
        }
    }
    println!();
    let mb = |kib: u64| kib as f64 / 1024.0;
    let idle_of = |p: Path| idle.iter().find(|i| i.0 == p).map(|i| i.1).unwrap_or(0);
    let loaded_of = |p: Path| rss_loaded.iter().find(|i| i.0 == p).map(|i| i.1).unwrap_or(0);
    println!(
        "idle RSS of mcp-asyncify: {:.1} MB (--no-tasks: {:.1} MB; the upstream alone: {:.1} MB)",
        mb(idle_of(Path::Proxy)),
        mb(idle_of(Path::ProxyNoTasks)),
        mb(idle_of(Path::Direct))
    );
    println!(
        "RSS of mcp-asyncify after the 64-in-flight load: {:.1} MB (--no-tasks: {:.1} MB)",
        mb(loaded_of(Path::Proxy)),
        mb(loaded_of(Path::ProxyNoTasks))
    );
    let p50_ratio = |p: Path| median(p, 1).p50_us / median(Path::Direct, 1).p50_us;
    let rate_ratio = |p: Path| median(p, 64).rate / median(Path::Direct, 64).rate;
    println!(
        "p50 at 1 in flight: proxy/direct = {:.2} (goal ≤ 1.10) (--no-tasks: {:.2}; the floors: byte relay {:.2}, line relay {:.2})",
        p50_ratio(Path::Proxy),
        p50_ratio(Path::ProxyNoTasks),
        p50_ratio(Path::Relay),
        p50_ratio(Path::LineRelay)
    );
    println!(
        "throughput at 64 in flight: proxy/direct = {:.2} (goal ≥ 0.90) (--no-tasks: {:.2}; the floors: byte relay {:.2}, line relay {:.2})",
        rate_ratio(Path::Proxy),
        rate_ratio(Path::ProxyNoTasks),
        rate_ratio(Path::Relay),
        rate_ratio(Path::LineRelay)
    );
    let cpu = |p: Path, level: usize| median(p, level).relay_cpu_us;
    println!(
        "proxy CPU per relayed call at 64 in flight: {:.1} µs (goal ≤ 6) (--no-tasks: {:.1} µs; the floors: the byte relay's two cats {:.1} µs, the line relay {:.1} µs; the upstream's own: {:.1} µs); at 1 in flight: {:.1} µs (the floors: {:.1} and {:.1} µs)",
        cpu(Path::Proxy, 64),
        cpu(Path::ProxyNoTasks, 64),
        cpu(Path::Relay, 64),
        cpu(Path::LineRelay, 64),
        median(Path::Direct, 64).upstream_cpu_us,
        cpu(Path::Proxy, 1),
        cpu(Path::Relay, 1),
        cpu(Path::LineRelay, 1)
    );
    println!(
        "the proxy's own CPU per call over the line relay's (what it adds to the floor of an event-loop relay): {:.1} µs at 1 in flight, {:.1} µs at 64",
        cpu(Path::Proxy, 1) - cpu(Path::LineRelay, 1),
        cpu(Path::Proxy, 64) - cpu(Path::LineRelay, 64)
    );
    let p50_of = |p: Path| median(p, 1).p50_us;
    println!(
        "telemetry on (Prometheus + OTLP metrics and traces) vs off: p50 at 1 in flight {:.2}×, throughput at 64 in flight {:.2}× (goal: cost under 2 %)",
        p50_of(Path::ProxyTelemetry) / p50_of(Path::Proxy),
        median(Path::ProxyTelemetry, 64).rate / median(Path::Proxy, 64).rate
    );
    println!(
        "2026-07-28 stateless vs 2025-11-25 session through the proxy: p50 at 1 in flight {:.2}×, throughput at 64 in flight {:.2}× (vs direct: p50 {:.2}×, throughput {:.2}×)",
        p50_of(Path::ProxyModern) / p50_of(Path::Proxy),
        median(Path::ProxyModern, 64).rate / median(Path::Proxy, 64).rate,
        p50_of(Path::ProxyModern) / p50_of(Path::Direct),
        median(Path::ProxyModern, 64).rate / median(Path::Direct, 64).rate
    );
    println!("(bench took {:.0} s)", started.elapsed().as_secs_f64());
}
