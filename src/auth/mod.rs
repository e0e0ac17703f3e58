//! Signing in to a hosted upstream with OAuth 2.1, as the MCP authorization specification
//! (2025-11-25) asks of a client: the proxy is the OAuth client toward `--upstream-url`.
//!
//! On a 401 the upstream's challenge leads to its protected-resource metadata (RFC 9728) and its
//! authorization server's metadata (RFC 8414, [`discovery`]); the proxy registers itself (RFC 7591),
//! or uses a configured client id or client ID metadata document; the browser signs the user in
//! (authorization code + PKCE S256, the `resource` indicator of RFC 8707, a redirect back to a
//! [`loopback`] listener on 127.0.0.1); the tokens go to the [`store`] (0600 files). Access tokens
//! are refreshed before they expire and when the upstream refuses one, rotated refresh tokens are
//! kept, and a refresh the server refuses leads to a new sign-in (or, where no browser may be
//! opened, an error telling how to sign in again). The `oauth2` crate does the protocol's
//! requests, over the project's own hyper client ([`http`]).
//!
//! Tokens never reach a log line: [`store::SignIn`]'s `Debug` leaves them out and header values
//! are marked sensitive.
//!
//! This file holds the entry points (the options, `for_upstream`, `login`, `logout`) and the
//! errors; [`sign_in_flow`] is the sign-in itself (discovery to code exchange) and [`tokens`] the
//! life of the tokens it yields (renewal before expiry, after a 401, and the store).

pub mod discovery;
pub mod http;
pub mod loopback;
pub mod sign_in_flow;
pub mod store;
pub mod tokens;

pub use self::tokens::UpstreamAuth;

use self::http::AuthHttp;
use self::sign_in_flow::{probe, sign_in};
use self::store::TokenStore;
use crate::config::{SignInMode, UpstreamAuthConfig, UpstreamAuthMode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why signing in, or staying signed in, failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A metadata document is missing, unreadable or wrong.
    #[error("cannot sign in: {why} ({url})")]
    Metadata {
        /// The document's URL (or the URLs tried).
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The authorization server could not be reached.
    #[error("cannot sign in: {0}")]
    Unreachable(String),
    /// Registration, authorization or the token endpoint said no.
    #[error("cannot sign in to {server}: {why}")]
    Refused {
        /// The MCP server.
        server: String,
        /// What the authorization server said.
        why: String,
    },
    /// The redirect's `state` is not the one sent: a stale or forged redirect.
    #[error(
        "cannot sign in to {server}: the redirect's state does not match the one sent (a stale or forged redirect); nothing was accepted, sign in again"
    )]
    StateMismatch {
        /// The MCP server.
        server: String,
    },
    /// The user did not finish in the browser in time.
    #[error("the sign-in was not finished in the browser within {secs} s; start it again")]
    SignInTimedOut {
        /// The limit.
        secs: u64,
    },
    /// A sign-in is needed where no browser may be opened.
    #[error("{why}; sign in again with `mcp-asyncify login {server}`")]
    SignInNeeded {
        /// The MCP server.
        server: String,
        /// Why (no stored sign-in, or it was refused).
        why: String,
    },
    /// The token store could not be used.
    #[error("the token store {path} cannot be used: {why}")]
    Store {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The OAuth sign-in for the upstream `url`, when `config.mode` is `oauth` and no `Authorization`
/// header is configured (a header is for headless use and wins): what `HttpUpstreamOptions::oauth`
/// takes. `interactive_by_default` is what `sign_in = "auto"` means here (the stdio wrapper: yes; the
/// sidecar: no).
pub fn for_upstream(
    config: &UpstreamAuthConfig,
    url: &str,
    has_authorization_header: bool,
    interactive_by_default: bool,
) -> Result<Option<Arc<UpstreamAuth>>, AuthError> {
    if config.mode != UpstreamAuthMode::Oauth {
        return Ok(None);
    }
    if has_authorization_header {
        tracing::info!("an Authorization header is configured: OAuth sign-in is off");
        return Ok(None);
    }
    Ok(Some(UpstreamAuth::new(OAuthOptions::from_config(config, url, interactive_by_default)?)))
}

/// How the proxy behaves toward one OAuth-protected upstream.
#[derive(Debug, Clone)]
pub struct OAuthOptions {
    /// The MCP server URL.
    pub server_url: String,
    /// Where sign-ins are kept.
    pub store: TokenStore,
    /// Whether a browser may be opened for a sign-in.
    pub interactive: bool,
    /// How long the user has to finish in the browser.
    pub sign_in_timeout: Duration,
    /// A pre-registered client id.
    pub client_id: Option<String>,
    /// A client ID metadata document URL, used where the server supports them.
    pub client_metadata_url: Option<String>,
    /// A fixed loopback port (0: any).
    pub redirect_port: u16,
    /// Scopes to ask for instead of the server's.
    pub scope: Option<String>,
}

impl OAuthOptions {
    /// The options of `config` for `server_url`; `interactive_by_default` says what `sign_in = "auto"` means.
    pub fn from_config(
        config: &UpstreamAuthConfig,
        server_url: &str,
        interactive_by_default: bool,
    ) -> Result<OAuthOptions, AuthError> {
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        Ok(OAuthOptions {
            server_url: server_url.to_owned(),
            store: TokenStore::locate(&config.store_dir)?,
            interactive: match config.sign_in {
                SignInMode::Auto => interactive_by_default,
                SignInMode::Browser => true,
                SignInMode::Never => false,
            },
            sign_in_timeout: Duration::from_millis(config.sign_in_timeout_ms),
            client_id: some(&config.client_id),
            client_metadata_url: some(&config.client_metadata_url),
            redirect_port: config.redirect_port,
            scope: some(&config.scope),
        })
    }
}

/// `mcp-asyncify login URL`: signs in now (a browser opens), replacing what was stored. The file
/// kept, or `None` when the server lets requests through without a sign-in.
pub async fn login(options: OAuthOptions) -> Result<Option<PathBuf>, AuthError> {
    let http = AuthHttp::new(Duration::from_secs(30));
    let previous = options.store.load(&options.server_url).unwrap_or(None);
    let Some(challenge) = probe(&http, &options.server_url).await? else { return Ok(None) };
    let options = OAuthOptions { interactive: true, ..options };
    sign_in(&http, &options, &challenge, previous).await?;
    Ok(Some(options.store.path_for(&options.server_url)))
}

/// `mcp-asyncify logout URL`: revokes the tokens where the server lets us (RFC 7009) and removes
/// the stored sign-in. Whether there was one.
pub async fn logout(options: &OAuthOptions) -> Result<bool, AuthError> {
    let stored = match options.store.load(&options.server_url) {
        Ok(s) => s,
        Err(e) => {
            // An unreadable file is still removed: that is what signing out asks for.
            tracing::warn!(error = %e, "removing an unreadable sign-in");
            None
        }
    };
    if let Some(sign_in) = &stored
        && let Some(endpoint) = &sign_in.revocation_endpoint
    {
        let http = AuthHttp::new(Duration::from_secs(10));
        for (token, hint) in
            [(&sign_in.refresh_token, "refresh_token"), (&sign_in.access_token, "access_token")]
        {
            let Some(token) = token else { continue };
            let form: String = oauth2::url::form_urlencoded::Serializer::new(String::new())
                .append_pair("token", token)
                .append_pair("token_type_hint", hint)
                .append_pair("client_id", &sign_in.client_id)
                .finish();
            match http.post(endpoint, "application/x-www-form-urlencoded", form.into_bytes(), &[]).await {
                Ok(a) if a.status.is_success() => {}
                Ok(a) => tracing::warn!(
                    status = a.status.as_u16(),
                    "the authorization server did not revoke the {hint}"
                ),
                Err(e) => tracing::warn!(error = %e, "the {hint} could not be revoked"),
            }
        }
    }
    options.store.remove(&options.server_url)
}
