//! Configuration: defaults, then a TOML file, then environment variables, then command-line flags.
//!
//! Every key lives in `config/default.toml` with its default and a comment; [`Config::default`] and
//! that file must agree (a test checks it). Errors name the key, the bad value and what is allowed,
//! so a person can fix them without reading the source.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The full configuration of one mcp-asyncify process.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The data path: framing limits and shutdown.
    pub proxy: ProxyConfig,
    /// Logging (always to stderr).
    pub log: LogConfig,
}

/// `[proxy]`: the data path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// The largest message accepted from either side, in bytes. Longer lines are refused (client) or
    /// dropped with an error log (upstream) without being buffered.
    pub max_message_bytes: usize,
    /// After the client goes away (or on SIGINT/SIGTERM), how long the upstream gets to exit by itself
    /// once its stdin is closed, before it is sent SIGTERM (and SIGKILL after the same time again).
    pub shutdown_grace_ms: u64,
}

/// `[log]`: logging to stderr.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a full `RUST_LOG`-style filter.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig { max_message_bytes: 16 * 1024 * 1024, shutdown_grace_ms: 3000 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

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
}

/// A configuration a person has to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid value for `{key}`: {value} ({allowed})")]
    Invalid {
        /// The config key, e.g. `proxy.max_message_bytes`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
}

impl Config {
    /// Reads the optional file, applies the overrides and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
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
    }

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
        if let Err(e) = parsed {
            return Err(ConfigError::Invalid {
                key: "log.level",
                value: format!("{:?}", self.log.level),
                allowed: format!(
                    "allowed: error, warn, info, debug, trace, or a RUST_LOG filter such as `mcp_asyncify=debug` ({e})"
                ),
            });
        }
        Ok(())
    }

    /// The shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.proxy.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_documents_the_defaults() {
        let text = include_str!("../config/default.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[proxy]\nmax_mesage_bytes = 3\n").unwrap_err();
        assert!(err.contains("max_mesage_bytes"), "{err}");
        assert!(err.contains("max_message_bytes"), "{err}");
    }

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
    }
}
