//! `mcp-asyncify tasks list|get|cancel --store URL`: an operator's look into a task store.
//!
//! Owners are shown only as short hashes (the stored owner is already a keyed hash of a credential;
//! the tag is a hash of that). A cancel here marks the task cancelled in the store; on a shared store
//! (Redis) the replica running it hears of it and stops the work; a file store is opened by one process
//! at a time, so cancel a file store's task while its proxy is stopped.

use super::model::{TaskRecord, TaskStatus};
use super::owner::owner_tag;
use super::store::{self, StoreUrl};
use serde_json::{Value, json};

/// The admin command's arguments.
#[derive(clap::Args, Debug)]
pub struct TasksArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: TasksAction,
}

/// `tasks` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TasksAction {
    /// List tasks, oldest first, one JSON object per line.
    List {
        /// Only the tasks of this owner (its hash, as listed).
        #[arg(long)]
        owner: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one task, with its result or error.
    Get {
        /// The task id.
        task_id: String,
    },
    /// Cancel a running task.
    Cancel {
        /// The task id.
        task_id: String,
    },
}

/// One task as the admin command prints it.
pub fn describe(r: &TaskRecord, with_outcome: bool) -> Value {
    let mut v = json!({
        "taskId": r.id,
        "owner": owner_tag(&r.owner),
        "tool": r.tool,
        "origin": r.origin.as_str(),
        "status": r.status.as_str(),
        "createdAt": super::model::rfc3339(r.created_at),
        "lastUpdatedAt": super::model::rfc3339(r.last_updated_at),
        "ttlMs": r.ttl_ms,
    });
    if let Some(m) = &r.status_message {
        v["statusMessage"] = json!(m);
    }
    if let Some(u) = &r.upstream_task {
        v["upstreamTask"] = json!(u);
    }
    if with_outcome {
        match &r.outcome {
            Some(super::model::Outcome::Result(raw)) => {
                v["result"] = serde_json::from_str(raw.get()).unwrap_or(Value::Null)
            }
            Some(super::model::Outcome::Error(raw)) => {
                v["error"] = serde_json::from_str(raw.get()).unwrap_or(Value::Null)
            }
            None => {}
        }
    }
    v
}

/// Runs the command on the store `url` (`--store`, required here), printing to stdout; returns the
/// exit code.
pub async fn run(args: TasksArgs, url: &str) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !url.trim().is_empty(),
        "give the store to look into: --store file:PATH or --store redis://…"
    );
    let open = |url: &str| -> anyhow::Result<StoreUrl> {
        StoreUrl::parse(url).map_err(|e| anyhow::anyhow!("--store: {e}"))
    };
    match args.action {
        TasksAction::List { owner, limit } => {
            let s = store::open(&open(url)?).await?;
            let mut after = None;
            let mut shown = 0;
            while shown < limit {
                let page = s.list(None, after, 500.min(limit - shown + 1).max(1)).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.seq);
                for r in page.iter().filter(|r| owner.as_deref().is_none_or(|o| owner_tag(&r.owner) == o)) {
                    if shown == limit {
                        break;
                    }
                    println!("{}", describe(r, false));
                    shown += 1;
                }
            }
            Ok(0)
        }
        TasksAction::Get { task_id } => {
            let s = store::open(&open(url)?).await?;
            match s.get(&task_id).await? {
                Some(r) => {
                    println!("{}", serde_json::to_string_pretty(&describe(&r, true))?);
                    Ok(0)
                }
                None => {
                    eprintln!("mcp-asyncify: no task {task_id} in {}", s.describe());
                    Ok(1)
                }
            }
        }
        TasksAction::Cancel { task_id } => {
            let s = store::open(&open(url)?).await?;
            if s.get(&task_id).await?.is_some_and(|r| r.origin == crate::tasks::model::Origin::Native) {
                eprintln!(
                    "mcp-asyncify: task {task_id} is run by the upstream server itself (the store only \
                     records it to route its requests): cancel it with tasks/cancel through the proxy, \
                     or on the upstream"
                );
                return Ok(1);
            }
            let now = std::time::SystemTime::now();
            let changed = s
                .update(&task_id, &|r| {
                    if r.status.is_terminal() {
                        return false;
                    }
                    r.status = TaskStatus::Cancelled;
                    r.status_message =
                        Some("The task was cancelled by an operator (mcp-asyncify tasks cancel).".into());
                    r.last_updated_at = now.max(r.created_at);
                    r.state_since = r.last_updated_at;
                    r.outcome = None;
                    true
                })
                .await?;
            match changed {
                Some((_, r)) => {
                    println!("{}", describe(&r, false));
                    Ok(0)
                }
                None => match s.get(&task_id).await? {
                    Some(r) => {
                        eprintln!("mcp-asyncify: task {task_id} already ended: {}", r.status.as_str());
                        Ok(1)
                    }
                    None => {
                        eprintln!("mcp-asyncify: no task {task_id} in {}", s.describe());
                        Ok(1)
                    }
                },
            }
        }
    }
}
