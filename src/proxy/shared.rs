//! What the sessions of one process share: the task engine over the opened store (and the tasks a
//! previous process left unfinished), the owner key, and the Notion request budget.

use super::session::Session;
use crate::config::Config;
use crate::notion::poll::PollScheduler;
use crate::tasks::engine::{Orphan, TaskEngine};
use crate::tasks::owner::OwnerKey;
use crate::tasks::store::memory::MemoryStore;
use crate::tasks::store::{self, StoreUrl, TaskStore};
use std::sync::Arc;

/// What sessions toward one upstream share: the task engine, the owner key and the Notion request
/// budget.
#[derive(Clone)]
pub struct Shared {
    /// Tasks of every session (each sees only its owner's).
    pub engine: Arc<TaskEngine>,
    /// Binds auth contexts to owners (keyed by the store's secret).
    pub owners: OwnerKey,
    /// Notion's shared poll budget.
    pub scheduler: Arc<PollScheduler>,
    /// Tasks recovered on start that a session with an upstream should resume.
    pub orphans: Arc<std::sync::Mutex<Vec<Orphan>>>,
}

/// The store a mode gets when `tasks.store` is empty.
#[derive(Debug, Clone)]
pub enum DefaultStore {
    /// Memory (the sidecar, the demo).
    Memory,
    /// A file per upstream under the data directory (the stdio wrapper); the string names the
    /// upstream (its command line or URL).
    PerUpstreamFile(String),
}

impl Shared {
    /// A memory-backed engine (with its expiry sweeper) and a scheduler, as configured.
    pub fn new(config: &Config) -> Self {
        let memory = MemoryStore::new();
        let secret = memory.secret_now();
        Self::with_store(config, Arc::new(memory), OwnerKey::new(secret), Vec::new())
    }

    fn with_store(
        config: &Config,
        store: Arc<dyn TaskStore>,
        owners: OwnerKey,
        orphans: Vec<Orphan>,
    ) -> Self {
        let engine = TaskEngine::new(config.tasks.clone(), store);
        engine.spawn_sweeper(std::time::Duration::from_secs(1));
        Shared {
            engine,
            owners,
            scheduler: Arc::new(PollScheduler::new(config.notion.budget_per_second)),
            orphans: Arc::new(std::sync::Mutex::new(orphans)),
        }
    }

    /// Opens the configured store (or the mode's default), recovers the tasks a previous process left
    /// unfinished, and builds the engine. An explicit store that cannot be opened is an error; the
    /// default file falls back to memory with a warning (a second wrapper of the same upstream, say).
    pub async fn open(config: &Config, default: DefaultStore) -> anyhow::Result<Self> {
        let explicit = !config.tasks.store.trim().is_empty();
        let url = if explicit {
            StoreUrl::parse(&config.tasks.store).map_err(|e| anyhow::anyhow!("--store: {e}"))?
        } else {
            match &default {
                DefaultStore::Memory => StoreUrl::Memory,
                DefaultStore::PerUpstreamFile(identity) => match store::default_file(identity) {
                    Some(path) => StoreUrl::File(path),
                    None => {
                        tracing::warn!(
                            "no data directory (set MCP_ASYNCIFY_DATA_DIR or HOME): tasks stay in memory"
                        );
                        StoreUrl::Memory
                    }
                },
            }
        };
        let opened = match store::open(&url).await {
            Ok(s) => s,
            Err(e) if !explicit => {
                tracing::warn!(error = %e, "the default task store cannot be opened; tasks stay in memory this time");
                store::open(&StoreUrl::Memory).await?
            }
            Err(e) => return Err(anyhow::anyhow!("{e}")),
        };
        tracing::info!(store = %opened.describe(), "task store open");
        let owners = OwnerKey::new(opened.secret().await.map_err(|e| anyhow::anyhow!("{e}"))?);
        let shared = Self::with_store(config, opened, owners, Vec::new());
        let orphans = shared.engine.recover().await.map_err(|e| anyhow::anyhow!("recovering tasks: {e}"))?;
        *shared.orphans.lock().unwrap_or_else(|e| e.into_inner()) = orphans;
        Ok(shared)
    }

    /// The owner of tasks created over stdio, as configured (`tasks.stdio_owner`).
    pub fn stdio_owner(&self, config: &Config) -> String {
        match config.tasks.stdio_owner {
            crate::config::StdioOwner::User => self.owners.owner("user", &crate::tasks::owner::local_user()),
            crate::config::StdioOwner::Process => {
                self.owners.owner("process", &uuid::Uuid::new_v4().to_string())
            }
        }
    }

    /// Hands the recovered tasks of `owner` to a session of that owner, once: it resumes them on its
    /// upstream (reached with that owner's credential, never another's).
    pub fn resume_orphans(&self, session: &Session, owner: &str) {
        let mut mine: Vec<Orphan> = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, others) =
                std::mem::take(&mut *orphans).into_iter().partition(|o| o.task.owner == owner);
            *orphans = others;
            mine
        };
        // And those taken over since, from replicas that stopped (on a shared store).
        mine.extend(self.engine.take_orphans(owner));
        if !mine.is_empty() {
            session.intercept.resume(mine);
        }
    }
}
