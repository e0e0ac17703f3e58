//! Reading the configuration: a built-in profile, a TOML file (merged table by table over the
//! profile), then the overrides from the environment and the command line, then validation.

use super::{Config, ConfigError, LogFormat, SignInMode, StdioOwner, UpstreamAuthMode, UpstreamProtocol};
use std::path::Path;

/// The built-in Notion profile.
pub const NOTION_PROFILE: &str = include_str!("../../config/notion.toml");

/// Values given on the command line or in the environment; each one, when present, wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--log-level` / `MCP_ASYNCIFY_LOG_LEVEL` (falls back to `RUST_LOG`).
    pub log_level: Option<String>,
    /// `--log-format` / `MCP_ASYNCIFY_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--max-message-bytes` / `MCP_ASYNCIFY_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: Option<usize>,
    /// `--shutdown-grace-ms` / `MCP_ASYNCIFY_SHUTDOWN_GRACE_MS`.
    pub shutdown_grace_ms: Option<u64>,
    /// `--upstream-protocol` / `MCP_ASYNCIFY_UPSTREAM_PROTOCOL`.
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// `--sync-deadline-ms` / `MCP_ASYNCIFY_SYNC_DEADLINE_MS`.
    pub sync_deadline_ms: Option<u64>,
    /// `--task-tools` / `MCP_ASYNCIFY_TASK_TOOLS` (comma-separated).
    pub task_tools: Option<Vec<String>>,
    /// `--task-after-ms` / `MCP_ASYNCIFY_TASK_AFTER_MS`.
    pub task_after_ms: Option<u64>,
    /// `--task-required` / `MCP_ASYNCIFY_TASK_REQUIRED` (comma-separated).
    pub task_required: Option<Vec<String>>,
    /// `--no-tasks`.
    pub no_tasks: bool,
    /// `--store` / `MCP_ASYNCIFY_STORE`.
    pub store: Option<String>,
    /// `--max-tasks-per-owner` / `MCP_ASYNCIFY_MAX_TASKS_PER_OWNER`.
    pub max_tasks_per_owner: Option<usize>,
    /// `--stdio-owner` / `MCP_ASYNCIFY_STDIO_OWNER`.
    pub stdio_owner: Option<StdioOwner>,
    /// `--notion-budget` / `MCP_ASYNCIFY_NOTION_BUDGET`.
    pub notion_budget: Option<u32>,
    /// `--metrics-listen` / `MCP_ASYNCIFY_METRICS_LISTEN`.
    pub metrics_listen: Option<String>,
    /// `--profile` / `MCP_ASYNCIFY_PROFILE`: a built-in base configuration (used when no file is given).
    pub profile: Option<String>,
    /// `--upstream-auth` / `MCP_ASYNCIFY_UPSTREAM_AUTH`.
    pub upstream_auth: Option<UpstreamAuthMode>,
    /// `--sign-in` / `MCP_ASYNCIFY_SIGN_IN`.
    pub sign_in: Option<SignInMode>,
}

impl Config {
    /// Reads the optional file, applies the overrides and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match (file, overrides.profile.as_deref()) {
            (Some(path), None) => Self::from_file(path)?,
            (None, Some(profile)) => Self::profile(profile)?,
            (Some(path), Some(profile)) => Self::profile_and_file(profile, path)?,
            (None, None) => Config::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// A built-in profile by name (`notion`).
    pub fn profile(name: &str) -> Result<Config, ConfigError> {
        match name {
            "notion" => Self::from_toml(NOTION_PROFILE).map_err(|message| ConfigError::Parse {
                path: "config/notion.toml (built in)".into(),
                message,
            }),
            other => Err(ConfigError::Invalid {
                key: "profile",
                value: format!("{other:?}"),
                allowed: "allowed: notion".into(),
            }),
        }
    }

    /// A profile with a file's keys on top (tables merge key by key).
    fn profile_and_file(profile: &str, path: &Path) -> Result<Config, ConfigError> {
        let base = match profile {
            "notion" => NOTION_PROFILE,
            _ => return Self::profile(profile),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let parse_err = |message: String| ConfigError::Parse { path: path.into(), message };
        let mut merged: toml::Table = toml::from_str(base).map_err(|e| parse_err(e.to_string()))?;
        let top: toml::Table = toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        for (key, value) in top {
            match (merged.get_mut(&key), value) {
                (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
                (_, value) => {
                    merged.insert(key, value);
                }
            }
        }
        merged.try_into().map_err(|e: toml::de::Error| parse_err(e.to_string().trim_end().to_string()))
    }

    /// Parses a TOML file (no overrides, no validation).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })
    }

    /// Parses TOML text (no overrides, no validation).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = o.max_message_bytes {
            self.proxy.max_message_bytes = v;
        }
        if let Some(v) = o.shutdown_grace_ms {
            self.proxy.shutdown_grace_ms = v;
        }
        if let Some(v) = o.upstream_protocol {
            self.proxy.upstream_protocol = v;
        }
        if let Some(v) = o.sync_deadline_ms {
            self.tasks.sync_deadline_ms = v;
        }
        if let Some(v) = &o.task_tools {
            self.tasks.tools = v.clone();
        }
        if let Some(v) = o.task_after_ms {
            self.tasks.task_after_ms = v;
        }
        if let Some(v) = &o.task_required {
            self.tasks.required = v.clone();
        }
        if o.no_tasks {
            self.tasks.enabled = false;
        }
        if let Some(v) = &o.store {
            self.tasks.store = v.clone();
        }
        if let Some(v) = o.max_tasks_per_owner {
            self.tasks.max_tasks_per_owner = v;
        }
        if let Some(v) = o.stdio_owner {
            self.tasks.stdio_owner = v;
        }
        if let Some(v) = o.notion_budget {
            self.notion.budget_per_second = v;
        }
        if let Some(v) = &o.metrics_listen {
            self.telemetry.metrics_listen = v.clone();
        }
        if let Some(v) = o.upstream_auth {
            self.upstream_auth.mode = v;
        }
        if let Some(v) = o.sign_in {
            self.upstream_auth.sign_in = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NotionMode;

    #[test]
    fn the_notion_profile_is_valid() {
        let c = Config::load(None, &Overrides { profile: Some("notion".into()), ..Overrides::default() })
            .unwrap();
        assert_eq!(c.notion.mode, NotionMode::On);
        assert!(
            Config::load(None, &Overrides { profile: Some("slack".into()), ..Overrides::default() }).is_err()
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[proxy]\nmax_mesage_bytes = 3\n").unwrap_err();
        assert!(err.contains("max_mesage_bytes"), "{err}");
        assert!(err.contains("max_message_bytes"), "{err}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("asyncify-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[proxy]\nshutdown_grace_ms = 10\nmax_message_bytes = 4096\n").unwrap();
        let o = Overrides { shutdown_grace_ms: Some(20), ..Overrides::default() };
        let c = Config::load(Some(&path), &o).unwrap();
        assert_eq!(c.proxy.shutdown_grace_ms, 20);
        assert_eq!(c.proxy.max_message_bytes, 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
