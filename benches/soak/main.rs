//! Soak: a long mixed workload through the built binary, checking that nothing leaks and nothing is
//! lost.
//!
//! Two sidecars (`mcp-asyncify serve`) run for the whole soak, one in front of the fixture server and
//! one in front of the Notion simulator (with a rate limit below the proxy's budget, so Notion answers
//! `rate_limited` and the proxy must wait). Worker threads loop over scenarios until the time is up:
//! plain calls in 2025-11-25 sessions; 2025-11-25 tasks polled to their result; tasks cancelled;
//! tasks whose session the client dropped, fetched from a new session; calls whose client hung up
//! mid-call; upstream crashes with calls in flight; 2026-07-28 stateless calls, tasks and cancels;
//! Notion tasks from both generations. Sessions end by `DELETE` or are left to the idle reaper.
//!
//! Every call must get its answer or a clear error (a JSON-RPC error or an HTTP error with a body);
//! a call with neither is lost. Every few seconds each sidecar's RSS, open file descriptors
//! (`/proc/<pid>/fd`), threads, child processes and, from its `/metrics`, its live tokio tasks
//! (`asyncify_runtime_tasks`), running tasks and tasks created and expired are sampled. After the load
//! stops, the soak waits for the idle sessions to be reaped and every task's ttl to pass, then checks
//! that each sidecar is back where it started: no upstream process left, the file descriptors and
//! tokio tasks of an idle sidecar, every task created also expired (the store is empty), and a
//! `tasks/list` that is empty. It prints a report and exits non-zero on a loss or a leak.
//!
//! `cargo bench --bench soak` runs 30 minutes; `SOAK_SECS=120 cargo bench --bench soak` for a short
//! check (also `SOAK_WORKERS`, default 8, and `SOAK_ONLY=crash,hangs` to run only the scenarios whose
//! names contain one of the words; `SOAK_SETTLE_SECS`, how long to wait at most for the sidecars to
//! be idle again, default 80). Not part of `cargo test` nor CI.
//!
//! This file runs the soak and reports; `client` is its HTTP client, `scenarios` the stories it
//! runs, `sample` what it measures of each sidecar.

#[path = "../common/mod.rs"]
mod common;
#[path = "../../tests/common/mod.rs"]
mod harness;

mod client;
mod sample;
mod scenarios;

use client::{Outcome, Session};
use harness::{BIN, Served};
use sample::{Sample, sample};
use scenarios::{Scenario, Sidecars, Tally, run_scenario};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every task's ttl: short, so that "the store is empty after ttl" can be checked at the end.
const TTL_MS: u64 = 10_000;
/// Sessions left without `DELETE` are closed after this long idle.
const IDLE_SECS: u64 = 10;
/// The longest any one HTTP exchange may take before it counts as lost.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a task may take to end.
const TASK_TIMEOUT: Duration = Duration::from_secs(90);
const MODERN: &str = "2026-07-28";
const EXT: &str = "io.modelcontextprotocol/tasks";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let secs = env_u64("SOAK_SECS", 1800);
    let workers = env_u64("SOAK_WORKERS", 8).max(1) as usize;
    // SOAK_ONLY=crash,hang…: only the scenarios whose name contains one of these words.
    let only: Vec<String> =
        std::env::var("SOAK_ONLY").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default();
    let scenarios: Arc<Vec<Scenario>> = Arc::new(
        Scenario::ALL
            .into_iter()
            .filter(|s| only.is_empty() || only.iter().any(|o| s.name().contains(o.as_str())))
            .collect(),
    );
    assert!(!scenarios.is_empty(), "SOAK_ONLY={only:?} matches no scenario");
    let dir = std::env::temp_dir().join(format!("asyncify-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[tasks]\ndefault_ttl_ms = {TTL_MS}\nmax_ttl_ms = {TTL_MS}\ntask_after_ms = 200\n\n[notion]\nbudget_per_second = 12\ndefault_backoff_ms = 300\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let idle = IDLE_SECS.to_string();
    let fixture = Served::start(&[
        "serve",
        "--listen",
        "{addr}",
        "--log-level",
        "error",
        "--config",
        &config,
        "--session-idle-secs",
        &idle,
        "--",
        BIN,
        "test-server",
    ]);
    // The simulator allows 1 request/s per session and the proxy's budget is 12/s: Notion answers
    // rate_limited (429) and every poll must wait its retry-after.
    let notion = Served::start(&[
        "serve",
        "--listen",
        "{addr}",
        "--log-level",
        "error",
        "--profile",
        "notion",
        "--config",
        &config,
        "--session-idle-secs",
        &idle,
        "--",
        BIN,
        "notion-sim",
        "--rate-limit",
        "1",
        "--retry-after",
        "0.5",
        "--work-ms",
        "700",
        "--work-jitter-ms",
        "600",
        "--suggested-backoff-ms",
        "300",
        "--failure-rate",
        "0.1",
        "--retrying-rate",
        "0.2",
    ]);
    let sidecars = Arc::new(Sidecars { fixture: fixture.addr.clone(), notion: notion.addr.clone() });
    let procs = [
        ("fixture sidecar", fixture.pid(), fixture.addr.clone()),
        ("Notion sidecar", notion.pid(), notion.addr.clone()),
    ];
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let idle_before: Vec<Sample> = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();

    eprintln!(
        "soak: {secs} s, {workers} workers, two sidecars (pids {} and {}); task ttl {} s, sessions idle after {IDLE_SECS} s",
        fixture.pid(),
        notion.pid(),
        TTL_MS / 1000
    );
    let deadline = start + Duration::from_secs(secs);
    let tallies: Arc<Mutex<BTreeMap<Scenario, Tally>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Vec<Sample>>>> = Arc::new(Mutex::new(vec![Vec::new(); procs.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_secs((secs / 60).clamp(2, 30));
    let sampler = {
        let (samples, stop, procs) = (samples.clone(), stop.clone(), procs.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (i, (_, pid, addr)) in procs.iter().enumerate() {
                    let s = sample(*pid, addr, start);
                    samples.lock().unwrap()[i].push(s);
                }
                let next = Instant::now() + every;
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let progress = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (sidecars, tallies, progress) = (sidecars.clone(), tallies.clone(), progress.clone());
            let scenarios = scenarios.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let which = scenarios[(w + n as usize) % scenarios.len()];
                    let t = run_scenario(which, &sidecars, w, n);
                    let mut all = tallies.lock().unwrap();
                    let e = all.entry(which).or_default();
                    e.runs += t.runs;
                    e.calls += t.calls;
                    e.answered += t.answered;
                    e.clear_errors += t.clear_errors;
                    e.lost += t.lost;
                    for x in t.examples {
                        if e.examples.len() < 3 {
                            e.examples.push(x);
                        }
                    }
                    n += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut last_report = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:>5} s, {} scenarios run",
                start.elapsed().as_secs(),
                progress.load(Ordering::Relaxed)
            );
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    let load_ended = start.elapsed();
    // Quiesce: idle sessions are reaped, every task's ttl passes and the sweep deletes it.
    let settle = env_u64("SOAK_SETTLE_SECS", IDLE_SECS + TTL_MS / 1000 + 60);
    let quiet_deadline = Instant::now() + Duration::from_secs(settle);
    let mut settled: Vec<Sample>;
    loop {
        settled = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();
        let done = settled.iter().zip(&idle_before).all(|(s, before)| {
            s.children == 0
                && s.active_tasks == 0.0
                && s.stored() == 0.0
                && s.runtime_tasks <= before.runtime_tasks + 4.0
        });
        if done || Instant::now() > quiet_deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let quiet_after = start.elapsed() - load_ended;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    // What each credential still sees in tasks/list.
    let mut listed = 0;
    for w in 0..workers {
        if let Ok(mut s) = Session::open(&sidecars.fixture, &format!("soak-{w}")) {
            if let Outcome::Answer(l) = s.call("tasks/list", json!({})) {
                listed += l["tasks"].as_array().map_or(0, Vec::len);
            }
            s.delete();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after_list: Vec<Sample> = procs.iter().map(|(_, pid, addr)| sample(*pid, addr, start)).collect();

    // Report.
    let tallies = tallies.lock().unwrap();
    let samples = samples.lock().unwrap();
    println!(
        "\n## Soak: {} s of load, {workers} workers, then {} s to settle\n",
        load_ended.as_secs(),
        quiet_after.as_secs()
    );
    println!("| scenario | runs | calls | answered | clear errors | lost |");
    println!("|---|---|---|---|---|---|");
    let mut total = Tally::default();
    for (which, t) in tallies.iter() {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            which.name(),
            t.runs,
            t.calls,
            t.answered,
            t.clear_errors,
            t.lost
        );
        total.runs += t.runs;
        total.calls += t.calls;
        total.answered += t.answered;
        total.clear_errors += t.clear_errors;
        total.lost += t.lost;
    }
    println!(
        "| **all** | {} | {} | {} | {} | {} |",
        total.runs, total.calls, total.answered, total.clear_errors, total.lost
    );
    let examples: Vec<&String> = tallies.values().flat_map(|t| t.examples.iter()).collect();
    if !examples.is_empty() {
        println!("\nErrors and losses (first of each kind):");
        for e in examples {
            println!("* {e}");
        }
    }
    let mut leaks = Vec::new();
    println!(
        "\n| process | when | RSS MiB | fds | threads | upstreams | tokio tasks | tasks running | tasks stored | Notion 429s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (name, _, _)) in procs.iter().enumerate() {
        let series = &samples[i];
        let during: Vec<&Sample> = series.iter().filter(|s| s.at <= load_ended).collect();
        let peak = |f: fn(&Sample) -> f64| during.iter().map(|s| f(s)).fold(0.0, f64::max);
        // RSS flatness: the highest in the first and in the last quarter of the load.
        let quarter = |from: f64, to: f64| {
            during
                .iter()
                .filter(|s| {
                    let at = s.at.as_secs_f64() / load_ended.as_secs_f64();
                    at >= from && at <= to
                })
                .map(|s| s.rss_kib)
                .max()
                .unwrap_or(0)
        };
        let row = |when: &str, s: &Sample| {
            println!(
                "| {name} | {when} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.threads,
                s.children,
                s.runtime_tasks,
                s.active_tasks,
                s.stored(),
                s.rate_limited
            );
        };
        row("idle, before", &idle_before[i]);
        println!(
            "| {name} | peak under load | {:.1} | {} | {} | {} | {} | {} | {} | |",
            peak(|s| s.rss_kib as f64) / 1024.0,
            peak(|s| s.fds as f64),
            peak(|s| s.threads as f64),
            peak(|s| s.children as f64),
            peak(|s| s.runtime_tasks),
            peak(|s| s.active_tasks),
            peak(|s| s.stored())
        );
        row("settled after ttl", &settled[i]);
        row("after tasks/list", &after_list[i]);
        let (first, last) = (quarter(0.0, 0.25), quarter(0.75, 1.0));
        println!(
            "\n{name}: RSS peak in the first quarter of the load {:.1} MiB, in the last {:.1} MiB ({:+.1} %); {} tasks created, {} expired",
            first as f64 / 1024.0,
            last as f64 / 1024.0,
            if first > 0 { (last as f64 / first as f64 - 1.0) * 100.0 } else { 0.0 },
            settled[i].created,
            settled[i].expired
        );
        let (before, after) = (&idle_before[i], &settled[i]);
        if after.children > 0 {
            leaks.push(format!("{name}: {} upstream processes left", after.children));
        }
        if after.stored() > 0.0 || after.active_tasks > 0.0 {
            leaks.push(format!(
                "{name}: {} tasks still stored, {} running",
                after.stored(),
                after.active_tasks
            ));
        }
        if after.fds > before.fds + 4 {
            leaks.push(format!("{name}: {} open fds, {} when idle before", after.fds, before.fds));
        }
        if after.runtime_tasks > before.runtime_tasks + 4.0 {
            leaks.push(format!(
                "{name}: {} tokio tasks, {} when idle before",
                after.runtime_tasks, before.runtime_tasks
            ));
        }
        if first > 0 && last as f64 > first as f64 * 1.5 + 8192.0 {
            leaks.push(format!("{name}: RSS grew from {first} KiB to {last} KiB under the same load"));
        }
    }
    println!("\ntasks/list after ttl, every credential: {listed} tasks");
    if listed > 0 {
        leaks.push(format!("tasks/list still lists {listed} tasks after their ttl"));
    }
    let notion_429 = settled[1].rate_limited;
    println!(
        "Notion: {} requests by the proxy (task starts and polls), {notion_429} of them answered rate_limited and waited out",
        settled[1].notion_requests
    );
    if notion_429 == 0.0 && load_ended > Duration::from_secs(30) {
        println!("(no 429 happened: the rate-limit path was not exercised)");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // `exit` runs no destructors: stop the sidecars (and, with them, their upstreams) first.
    drop(fixture);
    drop(notion);
    if total.lost > 0 || !leaks.is_empty() {
        println!(
            "\nFAILED: {} calls lost; {}",
            total.lost,
            if leaks.is_empty() { "no leak".into() } else { leaks.join("; ") }
        );
        std::process::exit(1);
    }
    println!("\nOK: every call answered or clearly refused; nothing left behind");
}
