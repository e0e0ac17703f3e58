//! Task creation latency and memory with 100,000 live tasks, through the built binary.
//!
//! The proxy wraps an upstream that reads and never answers (`cat > /dev/null`), so every task stays
//! `working`: this measures what the proxy itself keeps per live task (the record, its runner, the
//! in-flight entry). The client sends one task-augmented `tools/call` at a time and times the
//! `CreateTaskResult`, then reads the proxy's RSS from /proc.
//!
//! Then the disk's own floor (`fdatasync` of a small append; one small redb commit with each durability
//! option) and each task store (memory, a redb file, a redis-server started for the run) in process,
//! through the engine: create latency with one creator, create + complete throughput and create latency
//! with 64 creators at once, `tasks/get` p50/p99, RSS (the bench's own for memory and file, the
//! server's for Redis), and the file's size after the tasks and after their ttl (swept, then compacted
//! by the idle store).
//!
//! `cargo bench --bench tasks` (env `TASKS=n` for the proxy part, `STORE_TASKS=n` for the stores part,
//! `ONLY=proxy|stores` to run one part).

mod common;

use common::rss_kib;
use mcp_asyncify::config::TasksConfig;
use mcp_asyncify::tasks::engine::TaskEngine;
use mcp_asyncify::tasks::model::{Generation, Origin, Outcome, TaskStatus};
use mcp_asyncify::tasks::store::{self, StoreUrl};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn main() {
    let only = std::env::var("ONLY").unwrap_or_default();
    if only != "stores" {
        proxy_bench();
    }
    if only != "proxy" {
        stores_bench();
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn stores_bench() {
    let count: usize = std::env::var("STORE_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("asyncify-stores-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    disk_floor(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is needed by the stores bench");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = dir.join("tasks.redb");
    println!();
    println!(
        "| store | tasks | create+complete/s ({CREATORS} creators) | create p50 / p99 (1 creator) | create p50 / p99 ({CREATORS} creators) | tasks/get p50 / p99 | RSS before → after | file after tasks → after ttl |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for (name, url) in [
        ("memory", StoreUrl::Memory),
        ("file (redb)", StoreUrl::File(file.clone())),
        ("redis (localhost)", StoreUrl::Redis(format!("redis://127.0.0.1:{port}/0"))),
    ] {
        let redis_pid = redis.id();
        rt.block_on(async {
            let rss_pid = if matches!(url, StoreUrl::Redis(_)) { redis_pid } else { std::process::id() };
            let rss_before = rss_kib(rss_pid);
            let s = store::open(&url).await.unwrap();
            let config = TasksConfig {
                max_live_tasks: count + SINGLE + 10,
                max_tasks_per_owner: count + SINGLE + 10,
                ..TasksConfig::default()
            };
            let e = TaskEngine::new(config, s);
            let result = serde_json::value::RawValue::from_string(
                r#"{"content":[{"type":"text","text":"a result of about a hundred bytes, as small tool results are"}]}"#.into(),
            )
            .unwrap();
            // One creator: each create waits for its own commit (for the file, its own fsync).
            let mut single = Vec::with_capacity(SINGLE);
            for _ in 0..SINGLE {
                let t = Instant::now();
                let r = e.create("owner", "tool", Origin::Local, Generation::Legacy, Some(1000)).await.unwrap();
                single.push(t.elapsed());
                e.finish(&r.id, TaskStatus::Completed, None, Some(Outcome::Result(result.clone()))).await;
            }
            // Many creators at once: the file store commits what is queued together.
            let started = Instant::now();
            let workers: Vec<_> = (0..CREATORS)
                .map(|w| {
                    let (e, result) = (e.clone(), result.clone());
                    tokio::spawn(async move {
                        let mut creates = Vec::new();
                        let mut ids = Vec::new();
                        for _ in (w..count).step_by(CREATORS) {
                            let t = Instant::now();
                            let r = e
                                .create("owner", "tool", Origin::Local, Generation::Legacy, Some(1000))
                                .await
                                .unwrap();
                            creates.push(t.elapsed());
                            e.finish(&r.id, TaskStatus::Completed, None, Some(Outcome::Result(result.clone())))
                                .await;
                            ids.push(r.id);
                        }
                        (creates, ids)
                    })
                })
                .collect();
            let mut creates = Vec::with_capacity(count);
            let mut ids = Vec::with_capacity(count);
            for w in workers {
                let (c, i) = w.await.unwrap();
                creates.extend(c);
                ids.extend(i);
            }
            let rate = count as f64 / started.elapsed().as_secs_f64();
            let mut gets = Vec::with_capacity(10_000);
            for i in 0..10_000usize {
                let id = &ids[(i * 7919) % ids.len()];
                let t = Instant::now();
                assert!(e.get("owner", id).await.is_some());
                gets.push(t.elapsed());
            }
            let rss_after = rss_kib(rss_pid);
            let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
            let size_full = size(&file);
            // Past their ttl: the sweep deletes them all, then the idle store compacts its file.
            let later = SystemTime::now() + Duration::from_secs(3600);
            let swept_at = Instant::now();
            while e.sweep(later).await > 0 {}
            let sweep_s = swept_at.elapsed().as_secs_f64();
            // Until the file has kept one size for 2 s, a read every 10 ms: the longest one is how long
            // a compaction after the sweep held readers (and the writer) back. (A compaction can also
            // run inside the sweep, every 20,000 deletions; then the file is small when the sweep ends.)
            let (mut stall, mut last_shrink) = (Duration::ZERO, None);
            if matches!(url, StoreUrl::File(_)) {
                let (mut seen, mut stable_since) = (size(&file), Instant::now());
                let deadline = Instant::now() + Duration::from_secs(30);
                while stable_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
                    let t = Instant::now();
                    let _ = e.get("owner", &ids[0]).await;
                    stall = stall.max(t.elapsed());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let now = size(&file);
                    if now != seen {
                        (seen, stable_since) = (now, Instant::now());
                        last_shrink = Some(swept_at.elapsed());
                    }
                }
            }
            let size_swept = size(&file);
            single.sort();
            creates.sort();
            gets.sort();
            let file_cell = match url {
                StoreUrl::File(_) => format!(
                    "{size_full:.1} MB → {size_swept:.1} MB (sweep {sweep_s:.1} s; {}; longest read after the sweep {:.0} ms)",
                    match last_shrink {
                        Some(t) => format!("last shrink {:.1} s after the sweep began", t.as_secs_f64()),
                        None => "compacted within the sweep".into(),
                    },
                    stall.as_secs_f64() * 1e3
                ),
                _ => "–".into(),
            };
            println!(
                "| {name} | {count} | {rate:.0} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.1} MB → {:.1} MB | {file_cell} |",
                pct(&single, 0.5),
                pct(&single, 0.99),
                pct(&creates, 0.5),
                pct(&creates, 0.99),
                pct(&gets, 0.5),
                pct(&gets, 0.99),
                rss_before as f64 / 1024.0,
                rss_after as f64 / 1024.0,
            );
        });
    }
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Creators at once in the stores part.
const CREATORS: usize = 64;
/// Creates timed one at a time in the stores part.
const SINGLE: usize = 1000;

/// The disk's own floor, in the directory the file store uses: `fdatasync` after a small append, then
/// one small redb commit with each durability option (redb's default one-phase commit, two-phase
/// commit, and `Durability::None`).
fn disk_floor(dir: &std::path::Path) {
    const N: usize = 1000;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let mut syncs = Vec::with_capacity(N);
    for _ in 0..N {
        f.write_all(&[b'x'; 100]).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        syncs.push(t.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    syncs.sort();
    println!();
    println!("| on this disk ({N} each) | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| fdatasync after a 100-byte append | {:.0} µs | {:.0} µs |",
        pct(&syncs, 0.5),
        pct(&syncs, 0.99)
    );
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    for (label, durability, two_phase) in [
        (
            "redb commit of one 300-byte insert, Immediate (one-phase, the store's)",
            redb::Durability::Immediate,
            false,
        ),
        (
            "redb commit of one 300-byte insert, Immediate + two-phase commit",
            redb::Durability::Immediate,
            true,
        ),
        ("redb commit of one 300-byte insert, Durability::None", redb::Durability::None, false),
    ] {
        let path = dir.join("options.redb");
        let db = redb::Database::create(&path).unwrap();
        let mut commits = Vec::with_capacity(N);
        for i in 0..N as u64 {
            let t = Instant::now();
            let mut tx = db.begin_write().unwrap();
            tx.set_durability(durability).unwrap();
            tx.set_two_phase_commit(two_phase);
            tx.open_table(T).unwrap().insert(i, [7u8; 300].as_slice()).unwrap();
            tx.commit().unwrap();
            commits.push(t.elapsed());
        }
        drop(db);
        let _ = std::fs::remove_file(&path);
        commits.sort();
        println!("| {label} | {:.0} µs | {:.0} µs |", pct(&commits, 0.5), pct(&commits, 0.99));
    }
}

fn proxy_bench() {
    let count: usize = std::env::var("TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("asyncify-tasks-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bench.toml");
    std::fs::write(&config, format!("[tasks]\nmax_live_tasks = {}\n", count + 10)).unwrap();

    let mut proxy = Command::new(env!("CARGO_BIN_EXE_mcp-asyncify"))
        .args(["--config", config.to_str().unwrap(), "--log-level", "error", "--shutdown-grace-ms", "100"])
        .args(["--store", "memory"])
        .args(["--", "sh", "-c", "cat > /dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the proxy");
    let pid = proxy.id();
    let mut input = proxy.stdin.take().unwrap();
    let mut output = BufReader::new(proxy.stdout.take().unwrap());
    // Idle: after the proxy has started and answered one request.
    input.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":\"warm\",\"method\":\"tasks/list\"}\n").unwrap();
    input.flush().unwrap();
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid);

    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let msg = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"tools/call\",\"params\":{{\"name\":\"slow\",\"arguments\":{{\"n\":{i}}},\"task\":{{\"ttl\":3600000}}}}}}\n"
        );
        let t = Instant::now();
        input.write_all(msg.as_bytes()).unwrap();
        input.flush().unwrap();
        line.clear();
        output.read_line(&mut line).unwrap();
        latencies.push(t.elapsed());
        assert!(line.contains("\"status\":\"working\""), "unexpected answer: {line}");
    }
    let total = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(pid);

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "| live tasks | creation p50 | creation p99 | creation max | rate | proxy RSS idle → with tasks |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {count} | {:.0} µs | {:.0} µs | {:.1} ms | {:.0}/s | {:.1} MB → {:.1} MB |",
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        count as f64 / total.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
    drop(input);
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
