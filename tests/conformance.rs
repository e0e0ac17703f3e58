//! The official MCP conformance suite (`@modelcontextprotocol/conformance`, pinned in
//! `tests/node/package.json`) runs its SEP-2663 tasks scenarios against the sidecar, at protocol
//! 2026-07-28, with the conformance fixture (`test-server --conformance`, a plain 2025-11-25 server
//! with no tasks) behind it: the tasks the suite sees are the proxy's.
//!
//! Each scenario is its own test with its own sidecar (the scenarios run in parallel and cannot see
//! each other's tasks or elicitations). A test runs
//! `node tests/node/conformance.mjs server --url … --scenario NAME --spec-version 2026-07-28 --force -o DIR`
//! (`--force`: the tasks scenarios belong to an extension, which the CLI otherwise skips at a dated
//! spec version; conformance.mjs lets the CLI run on node 20), reads the `checks.json` it writes and
//! prints every check. Every scenario but one must pass: no check may have status `FAILURE`.
//! `tasks-status-notifications` only has to run to the end (the suite skips it until it can listen
//! on `subscriptions/listen`). `tasks-mrtr-composition` runs against a sidecar with a 300 ms task
//! window (input gathered in rounds before the call becomes a task); the others against one where
//! every task tool's call is a task at once.
//!
//! Needs `node` (20+) and `npm`; `tests/node/node_modules` is installed with `npm ci` on first use,
//! the only network access. Everything else talks to 127.0.0.1 only.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{BIN, Served};

/// Longest one scenario may run before the test kills it (the slowest takes a few seconds).
const SCENARIO_LIMIT: Duration = Duration::from_secs(90);

/// The tools the proxy runs as tasks: every fixture tool but `greet`.
const TASK_TOOLS: &str =
    "slow_compute,failing_job,protocol_error_job,confirm_delete,multi_input,test_tool_with_task";

/// Fails the test with a clear message when node is missing, and installs `tests/node/node_modules`
/// (once per test binary) when the pinned conformance package is not there.
fn ensure_node_modules() {
    common::ensure_node_packages(
        &["conformance"],
        "the conformance tests run the official MCP conformance suite (@modelcontextprotocol/conformance)",
    );
}

/// The sidecar in front of the conformance fixture, as the scenarios need it: the slow tools become
/// tasks after `task_after_ms` (0: at once), and `failing_job` must be one (`--task-required`).
fn sidecar(task_after_ms: &str) -> Served {
    Served::sidecar(&[
        "--task-tools",
        TASK_TOOLS,
        "--task-after-ms",
        task_after_ms,
        "--task-required",
        "failing_job",
        "--",
        BIN,
        "--log-level",
        "error",
        "test-server",
        "--conformance",
    ])
}

/// One check of `checks.json`.
struct Check {
    id: String,
    status: String,
    error: String,
}

/// What one run of the CLI left.
struct Run {
    checks: Vec<Check>,
    /// The CLI's stdout and stderr, for failure messages.
    output: String,
    elapsed: Duration,
}

/// Runs one scenario of the conformance CLI against `url`; panics when the CLI does not finish in
/// time or writes no `checks.json`.
fn run_scenario(scenario: &str, url: &str) -> Run {
    ensure_node_modules();
    let out_dir = common::scratch().join(format!("conformance-{scenario}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).expect("create the results directory");
    // Output goes to a file, not a pipe: a grandchild that outlives node cannot then block us.
    let log_path = out_dir.join("cli.log");
    let log = File::create(&log_path).expect("create the log file");
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg("conformance.mjs")
        .args([
            "server",
            "--url",
            url,
            "--scenario",
            scenario,
            "--spec-version",
            "2026-07-28",
            "--force",
            "-o",
        ])
        .arg(&out_dir)
        .current_dir(common::node_dir())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log file"))
        .stderr(log)
        .spawn()
        .expect("spawn node");
    let status = common::wait_with_limit(&mut child, started, SCENARIO_LIMIT);
    let elapsed = started.elapsed();
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "conformance scenario {scenario} ran over {SCENARIO_LIMIT:?} and was killed; its output:\n{output}"
        );
    };
    // The CLI writes <out_dir>/server-<scenario>-<timestamp>/checks.json (and exits 1 when a check failed).
    let checks_path = std::fs::read_dir(&out_dir)
        .expect("read the results directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("checks.json"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "conformance scenario {scenario} wrote no checks.json (the CLI exited {status} after \
                 {elapsed:.1?}: it crashed before the end); its output:\n{output}"
            )
        });
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&checks_path).expect("read checks.json"))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", checks_path.display()));
    let checks = json
        .as_array()
        .unwrap_or_else(|| panic!("{} is not an array: {json}", checks_path.display()))
        .iter()
        .map(|c| Check {
            id: c["id"].as_str().unwrap_or("?").to_owned(),
            status: c["status"].as_str().unwrap_or("?").to_owned(),
            error: c["errorMessage"].as_str().unwrap_or("").to_owned(),
        })
        .collect();
    let _ = std::fs::remove_dir_all(&out_dir);
    Run { checks, output, elapsed }
}

/// A table of the run's checks: status, id, error message.
fn table(scenario: &str, run: &Run) -> String {
    let width = run.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
    let count = |s: &str| run.checks.iter().filter(|c| c.status == s).count();
    let mut out = format!(
        "conformance {scenario} ({:.1?}): SUCCESS {} / FAILURE {} / other {}\n",
        run.elapsed,
        count("SUCCESS"),
        count("FAILURE"),
        run.checks.len() - count("SUCCESS") - count("FAILURE"),
    );
    for c in &run.checks {
        out.push_str(&format!("  {:<8} {:<width$}  {}\n", c.status, c.id, c.error));
    }
    out
}

/// Runs a scenario the proxy must pass, in front of a sidecar whose tasks start after
/// `task_after_ms`: no check may fail.
fn must_pass_after(scenario: &str, task_after_ms: &str) {
    let run = run_to_the_end(scenario, task_after_ms);
    let failed: Vec<String> = run
        .checks
        .iter()
        .filter(|c| c.status == "FAILURE")
        .map(|c| format!("  {}: {}", c.id, c.error))
        .collect();
    assert!(
        failed.is_empty(),
        "conformance scenario {scenario}: {} check(s) FAILED (every check is listed above):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Runs a scenario the proxy must pass, with every task tool's call a task at once.
fn must_pass(scenario: &str) {
    must_pass_after(scenario, "0");
}

/// Runs a scenario as far as the suite allows: it has to run to the end; its checks are printed.
fn runs_to_the_end(scenario: &str) {
    run_to_the_end(scenario, "0");
}

/// Runs a scenario against a fresh sidecar (tasks after `task_after_ms`) and prints its checks; it
/// must report some.
fn run_to_the_end(scenario: &str, task_after_ms: &str) -> Run {
    let served = sidecar(task_after_ms);
    let run = run_scenario(scenario, &served.url);
    println!("{}", table(scenario, &run));
    assert!(
        !run.checks.is_empty(),
        "conformance scenario {scenario} reported no checks; its output:\n{}",
        run.output
    );
    run
}

#[test]
fn tasks_lifecycle() {
    must_pass("tasks-lifecycle");
}

#[test]
fn tasks_capability_negotiation() {
    must_pass("tasks-capability-negotiation");
}

#[test]
fn tasks_wire_fields() {
    must_pass("tasks-wire-fields");
}

#[test]
fn tasks_request_state_removal() {
    must_pass("tasks-request-state-removal");
}

#[test]
fn tasks_mrtr_input() {
    must_pass("tasks-mrtr-input");
}

#[test]
fn tasks_request_headers() {
    must_pass("tasks-request-headers");
}

#[test]
fn tasks_dispatch_and_envelope() {
    must_pass("tasks-dispatch-and-envelope");
}

#[test]
fn tasks_required_task_error() {
    must_pass("tasks-required-task-error");
}

#[test]
fn tasks_status_notifications_as_far_as_the_suite_allows() {
    runs_to_the_end("tasks-status-notifications");
}

/// Input gathered in rounds before a call becomes a task needs a window to gather it in: with
/// `--task-after-ms 0` every call of a task tool is a task at once, and its questions go to the
/// task's `inputRequests` (which is what `tasks-mrtr-input` checks). With a window, the question
/// asked inside it comes back as `input_required`, and the retry becomes a task after the window.
#[test]
fn tasks_mrtr_composition() {
    must_pass_after("tasks-mrtr-composition", "300");
}
