//! The token store: one JSON file per upstream URL in the user's config directory.
//!
//! The directory is `$MCP_ASYNCIFY_AUTH_DIR` when set, else `upstream_auth.store_dir`, else
//! `$XDG_CONFIG_HOME/mcp-asyncify/auth` (`~/.config/…` when unset; `~/Library/Application
//! Support/mcp-asyncify/auth` on macOS). It is created `0700`; each file is written `0600` through a
//! temporary file and a rename, so a crash never leaves half a token behind.

use super::AuthError;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable that moves the store (tests always set it).
pub const AUTH_DIR_ENV: &str = "MCP_ASYNCIFY_AUTH_DIR";

/// Everything kept about the sign-in to one upstream: where to renew it, the client we registered,
/// and the tokens.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SignIn {
    /// The MCP server URL this sign-in is for (the store's key).
    pub server_url: String,
    /// The resource indicator (RFC 8707) sent on authorize and token requests.
    pub resource: String,
    /// The authorization server's issuer.
    pub issuer: String,
    /// Its authorization endpoint.
    pub authorization_endpoint: String,
    /// Its token endpoint.
    pub token_endpoint: String,
    /// Its revocation endpoint (RFC 7009), if it has one.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// The client id (registered, configured, or a client ID metadata document URL).
    pub client_id: String,
    /// A client secret, if registration gave one.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// How the client authenticates at the token endpoint (`none`, `client_secret_post`, `client_secret_basic`).
    #[serde(default)]
    pub token_endpoint_auth_method: Option<String>,
    /// The redirect URI the client was registered with (its port is reused when free).
    pub redirect_uri: String,
    /// Whether the client was registered dynamically (a new one may be registered when its port is taken).
    #[serde(default)]
    pub registered: bool,
    /// The scopes asked for, space-separated.
    #[serde(default)]
    pub scope: Option<String>,
    /// The access token.
    #[serde(default)]
    pub access_token: Option<String>,
    /// The refresh token (rotated ones replace it).
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// When the access token was issued, ms since the epoch.
    #[serde(default)]
    pub issued_at_ms: u64,
    /// When it expires, ms since the epoch (none: the server did not say).
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

impl fmt::Debug for SignIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens or the secret: whether they are there is all a log may say.
        f.debug_struct("SignIn")
            .field("server_url", &self.server_url)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("has_access_token", &self.access_token.is_some())
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// The directory of sign-ins.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// The store at `$MCP_ASYNCIFY_AUTH_DIR`, else `configured` (when not empty), else the default.
    pub fn locate(configured: &str) -> Result<TokenStore, AuthError> {
        if let Some(dir) = std::env::var_os(AUTH_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(TokenStore { dir: dir.into() });
        }
        if !configured.trim().is_empty() {
            return Ok(TokenStore { dir: configured.trim().into() });
        }
        let config_home = if cfg!(target_os = "macos") {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join("Library/Application Support"))
        } else {
            std::env::var_os("XDG_CONFIG_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        };
        let base = config_home.ok_or_else(|| AuthError::Store {
            path: PathBuf::new(),
            why: format!("no home directory: set {AUTH_DIR_ENV} to where sign-ins may be kept"),
        })?;
        Ok(TokenStore { dir: base.join("mcp-asyncify").join("auth") })
    }

    /// A store in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> TokenStore {
        TokenStore { dir: dir.into() }
    }

    /// The file of `server_url`'s sign-in: its host, for people, and a hash of the whole URL.
    pub fn path_for(&self, server_url: &str) -> PathBuf {
        let host: String = server_url
            .split("://")
            .nth(1)
            .unwrap_or(server_url)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        let hash = sha2::Sha256::digest(server_url.as_bytes());
        let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{host}-{hex}.json"))
    }

    /// The stored sign-in of `server_url`, if any. A file that cannot be read is an error naming it.
    pub fn load(&self, server_url: &str) -> Result<Option<SignIn>, AuthError> {
        let path = self.path_for(server_url);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AuthError::Store { path, why: e.to_string() }),
        };
        let sign_in: SignIn = serde_json::from_slice(&text).map_err(|e| AuthError::Store {
            path: path.clone(),
            why: format!("not a sign-in this version can read ({e}); remove it or run `mcp-asyncify logout`"),
        })?;
        // Another URL hashing to the same name is next to impossible; a copied file is not.
        Ok((sign_in.server_url == server_url).then_some(sign_in))
    }

    /// Writes `sign_in` (0600, in a 0700 directory), replacing what was there.
    pub fn save(&self, sign_in: &SignIn) -> Result<PathBuf, AuthError> {
        let path = self.path_for(&sign_in.server_url);
        let fail = |why: String| AuthError::Store { path: path.clone(), why };
        self.ensure_dir().map_err(|e| AuthError::Store { path: self.dir.clone(), why: e.to_string() })?;
        let text = serde_json::to_vec_pretty(sign_in).map_err(|e| fail(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let written = (|| {
            let mut file =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e.to_string()));
        }
        Ok(path)
    }

    /// Removes `server_url`'s sign-in; whether there was one.
    pub fn remove(&self, server_url: &str) -> Result<bool, AuthError> {
        let path = self.path_for(server_url);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(AuthError::Store { path, why: e.to_string() }),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_dir(&self) -> std::io::Result<()> {
        if self.dir.is_dir() {
            return Ok(());
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sign_in_is_kept_private_and_keyed_by_its_url() {
        let dir = std::env::temp_dir().join(format!("asyncify-store-{}", uuid::Uuid::new_v4()));
        let store = TokenStore::at(dir.join("auth"));
        let url = "https://mcp.example.com/mcp";
        assert!(store.load(url).unwrap().is_none());
        let sign_in = SignIn {
            server_url: url.into(),
            access_token: Some("secret-access".into()),
            refresh_token: Some("secret-refresh".into()),
            ..SignIn::default()
        };
        let path = store.save(&sign_in).unwrap();
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("mcp.example.com-"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("auth")), 0o700);
        let back = store.load(url).unwrap().unwrap();
        assert_eq!(back.refresh_token.as_deref(), Some("secret-refresh"));
        assert!(store.load("https://mcp.example.com/other").unwrap().is_none());
        let shown = format!("{back:?}");
        assert!(!shown.contains("secret"), "{shown}");
        std::fs::write(&path, b"{not json").unwrap();
        let err = store.load(url).unwrap_err().to_string();
        assert!(err.contains(path.to_str().unwrap()) && err.contains("logout"), "{err}");
        assert!(store.remove(url).unwrap());
        assert!(!store.remove(url).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
