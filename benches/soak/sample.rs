//! What the soak samples of a sidecar: RSS, file descriptors, threads, child processes, and from
//! its `/metrics` its live tokio tasks, running tasks, and tasks created and expired.

use crate::common::rss_kib;
use crate::harness::Reply;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub(crate) struct Sample {
    pub(crate) at: Duration,
    pub(crate) rss_kib: u64,
    pub(crate) fds: u64,
    pub(crate) threads: u64,
    pub(crate) children: u64,
    pub(crate) runtime_tasks: f64,
    pub(crate) active_tasks: f64,
    pub(crate) created: f64,
    pub(crate) expired: f64,
    pub(crate) rate_limited: f64,
    pub(crate) notion_requests: f64,
}

impl Sample {
    pub(crate) fn stored(&self) -> f64 {
        self.created - self.expired
    }
}

pub(crate) fn count_dir(path: &str) -> u64 {
    std::fs::read_dir(path).map(|d| d.count() as u64).unwrap_or(0)
}

pub(crate) fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Processes whose parent is `pid`.
pub(crate) fn children(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // "pid (comm) state ppid …": comm may hold spaces, so read after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                == Some(pid)
        })
        .count() as u64
}

/// The sum over every series of a metric in a Prometheus text page (`filter`: a label that must appear).
pub(crate) fn metric(page: &str, name: &str, filter: Option<&str>) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter(|l| filter.is_none_or(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

pub(crate) fn sample(pid: u32, addr: &str, start: Instant) -> Sample {
    let page = TcpStream::connect(addr)
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok(Reply::parse(&raw).body)
        })
        .unwrap_or_default();
    Sample {
        at: start.elapsed(),
        rss_kib: rss_kib(pid),
        fds: count_dir(&format!("/proc/{pid}/fd")),
        threads: threads(pid),
        children: children(pid),
        runtime_tasks: metric(&page, "asyncify_runtime_tasks", None),
        active_tasks: metric(&page, "asyncify_task_active", None),
        created: metric(&page, "asyncify_task_created_total", None),
        expired: metric(&page, "asyncify_task_expired_total", None),
        rate_limited: metric(&page, "asyncify_notion_requests_total", Some("rate_limited")),
        notion_requests: metric(&page, "asyncify_notion_requests_total", None),
    }
}
