//! Judging a configuration: every value against its allowed range, with an error that names the
//! key, the value and what is allowed.

use super::{Config, ConfigError, StoreUrl, redact, secure_enough};

impl Config {
    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const MIN_MESSAGE: usize = 1024;
        const MAX_MESSAGE: usize = 1024 * 1024 * 1024;
        if !(MIN_MESSAGE..=MAX_MESSAGE).contains(&self.proxy.max_message_bytes) {
            return Err(ConfigError::Invalid {
                key: "proxy.max_message_bytes",
                value: self.proxy.max_message_bytes.to_string(),
                allowed: format!("allowed: {MIN_MESSAGE} to {MAX_MESSAGE} bytes"),
            });
        }
        if self.proxy.shutdown_grace_ms > 600_000 {
            return Err(ConfigError::Invalid {
                key: "proxy.shutdown_grace_ms",
                value: self.proxy.shutdown_grace_ms.to_string(),
                allowed: "allowed: 0 to 600000 milliseconds".into(),
            });
        }
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let level = self.log.level.trim();
        // A bare word is a level; anything with `=` or `,` is a full filter for EnvFilter to judge.
        let bare_word_ok =
            level.contains(['=', ',']) || LEVELS.contains(&level.to_ascii_lowercase().as_str());
        let parsed = if bare_word_ok {
            tracing_subscriber::EnvFilter::builder().parse(level).map(|_| ()).map_err(|e| e.to_string())
        } else {
            Err("not a level".to_string())
        };
        let t = &self.tasks;
        let ranges: [(&'static str, u64, u64, u64); 10] = [
            ("tasks.default_ttl_ms", t.default_ttl_ms, 1000, t.max_ttl_ms),
            ("tasks.max_ttl_ms", t.max_ttl_ms, 1000, 30 * 86_400_000),
            ("tasks.poll_interval_ms", t.poll_interval_ms, 10, 600_000),
            ("tasks.max_live_tasks", t.max_live_tasks as u64, 1, 10_000_000),
            ("tasks.max_tasks_per_owner", t.max_tasks_per_owner as u64, 1, 10_000_000),
            ("tasks.list_page_size", t.list_page_size as u64, 1, 10_000),
            ("tasks.keepalive_after_ms", t.keepalive_after_ms, 0, 3_600_000),
            ("tasks.keepalive_interval_ms", t.keepalive_interval_ms, 100, 3_600_000),
            ("tasks.sync_deadline_ms", t.sync_deadline_ms, 0, 3_600_000),
            ("tasks.task_after_ms", t.task_after_ms, 0, 3_600_000),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                let allowed = if key == "tasks.default_ttl_ms" {
                    format!("allowed: {min} to tasks.max_ttl_ms = {max}")
                } else {
                    format!("allowed: {min} to {max}")
                };
                return Err(ConfigError::Invalid { key, value: value.to_string(), allowed });
            }
        }
        if !t.store.trim().is_empty() {
            StoreUrl::parse(&t.store).map_err(|allowed| ConfigError::Invalid {
                key: "tasks.store",
                value: format!("{:?}", redact(&t.store)),
                allowed,
            })?;
        }
        if t.sync_deadline_ms != 0 && t.sync_deadline_ms < 100 {
            return Err(ConfigError::Invalid {
                key: "tasks.sync_deadline_ms",
                value: t.sync_deadline_ms.to_string(),
                allowed: "allowed: 0 (off) or 100 to 3600000".into(),
            });
        }
        if let Some(bad) = t.tools.iter().chain(&t.exclude).find(|p| p.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                key: "tasks.tools",
                value: format!("{bad:?}"),
                allowed: "allowed: tool names or globs such as \"notion-*\"; an empty name matches nothing"
                    .into(),
            });
        }
        let n = &self.notion;
        if !(1..=1000).contains(&n.budget_per_second) {
            return Err(ConfigError::Invalid {
                key: "notion.budget_per_second",
                value: n.budget_per_second.to_string(),
                allowed: "allowed: 1 to 1000 requests per second (Notion allows 3)".into(),
            });
        }
        if !(1.0..=10.0).contains(&n.backoff_factor) {
            return Err(ConfigError::Invalid {
                key: "notion.backoff_factor",
                value: n.backoff_factor.to_string(),
                allowed: "allowed: 1.0 to 10.0".into(),
            });
        }
        for (key, value) in [
            ("notion.default_backoff_ms", n.default_backoff_ms),
            ("notion.max_backoff_ms", n.max_backoff_ms),
            ("notion.default_retry_after_ms", n.default_retry_after_ms),
            ("notion.poll_timeout_ms", n.poll_timeout_ms),
        ] {
            if !(10..=600_000).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    value: value.to_string(),
                    allowed: "allowed: 10 to 600000".into(),
                });
            }
        }
        if !(1..=100).contains(&n.max_poll_failures) {
            return Err(ConfigError::Invalid {
                key: "notion.max_poll_failures",
                value: n.max_poll_failures.to_string(),
                allowed: "allowed: 1 to 100 polls in a row".into(),
            });
        }
        if n.poll_tool.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "notion.poll_tool",
                value: "\"\"".into(),
                allowed: "allowed: a tool name such as \"notion-get-async-task\"".into(),
            });
        }
        if let Err(e) = parsed {
            return Err(ConfigError::Invalid {
                key: "log.level",
                value: format!("{:?}", self.log.level),
                allowed: format!(
                    "allowed: error, warn, info, debug, trace, or a RUST_LOG filter such as `mcp_asyncify=debug` ({e})"
                ),
            });
        }
        let a = &self.upstream_auth;
        if !(1000..=3_600_000).contains(&a.sign_in_timeout_ms) {
            return Err(ConfigError::Invalid {
                key: "upstream_auth.sign_in_timeout_ms",
                value: a.sign_in_timeout_ms.to_string(),
                allowed: "allowed: 1000 to 3600000".into(),
            });
        }
        let metadata_url = a.client_metadata_url.trim();
        if !metadata_url.is_empty() && !secure_enough(metadata_url) {
            return Err(ConfigError::Invalid {
                key: "upstream_auth.client_metadata_url",
                value: format!("{metadata_url:?}"),
                allowed:
                    "allowed: an https URL of a client ID metadata document (http only on loopback), or empty"
                        .into(),
            });
        }
        let listen = self.telemetry.metrics_listen.trim();
        if !listen.is_empty() && self.telemetry.metrics_addr().is_none() {
            return Err(ConfigError::Invalid {
                key: "telemetry.metrics_listen",
                value: listen.to_string(),
                allowed:
                    "allowed: an IP address and port such as 127.0.0.1:9464 or [::1]:9464, or empty for off"
                        .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overrides};

    #[test]
    fn out_of_range_values_say_what_is_allowed() {
        let o = Overrides { max_message_bytes: Some(10), ..Overrides::default() };
        let err = Config::load(None, &o).unwrap_err().to_string();
        assert!(
            err.contains("proxy.max_message_bytes") && err.contains("10") && err.contains("1024"),
            "{err}"
        );
        let o = Overrides { log_level: Some("loud".into()), ..Overrides::default() };
        let err = Config::load(None, &o).unwrap_err().to_string();
        assert!(err.contains("log.level") && err.contains("loud"), "{err}");
    }
}
