//! The URLs a configuration names: the task store (`--store`), and whether a sign-in URL is safe
//! to fetch; with the redaction that keeps passwords out of logs and errors.

/// Which store to open, parsed from `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory`.
    Memory,
    /// `file:PATH` (a redb file).
    File(std::path::PathBuf),
    /// `redis://…` or `rediss://…`.
    Redis(String),
}

impl StoreUrl {
    /// Parses `memory`, `file:PATH` or `redis[s]://HOST[:PORT][/DB]`.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let text = text.trim();
        if text == "memory" {
            Ok(StoreUrl::Memory)
        } else if let Some(path) = text.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("store \"file:\" needs a path, e.g. file:/var/lib/mcp-asyncify/tasks.redb".into());
            }
            Ok(StoreUrl::File(path.into()))
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            ::redis::Client::open(text)
                .map_err(|e| format!("store {:?} is not a valid Redis URL: {e}", redact(text)))?;
            Ok(StoreUrl::Redis(text.into()))
        } else {
            Err(format!(
                "unknown store {:?}: use memory, file:PATH or redis://HOST:PORT[/DB] (rediss:// for TLS)",
                redact(text)
            ))
        }
    }

    /// The URL without any password, for logs.
    pub fn describe(&self) -> String {
        match self {
            StoreUrl::Memory => "memory".into(),
            StoreUrl::File(p) => format!("file:{}", p.display()),
            StoreUrl::Redis(u) => redact(u),
        }
    }
}

/// A URL with its password (if any) replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

/// Whether a URL is fit to fetch sign-in metadata or documents from: `https`, or `http` on loopback.
pub fn secure_enough(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => true,
        (Some("http"), Some(host)) => matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1"),
        _ => false,
    }
}
