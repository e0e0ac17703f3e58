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

pub mod discovery;
pub mod http;
pub mod loopback;
pub mod store;

use self::discovery::{AuthServer, Challenge};
use self::http::AuthHttp;
use self::loopback::Loopback;
use self::store::{SignIn, TokenStore};
use crate::config::{SignInMode, UpstreamAuthConfig, UpstreamAuthMode};
use ::http::HeaderValue;
use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, RedirectUrl, RefreshToken, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The `Authorization` of one upstream: consulted before every request and when the upstream
/// refuses one. Shared by every session toward that upstream (one sign-in, one refresh at a time).
pub struct UpstreamAuth {
    options: OAuthOptions,
    http: AuthHttp,
    /// The header in use and when to renew it (ms since the epoch): read by every request.
    current: Mutex<Option<(HeaderValue, u64)>>,
    /// The sign-in, loaded from the store on first use. Held across a refresh or a sign-in on
    /// purpose: concurrent requests that need one wait for the one in progress instead of opening
    /// a browser each.
    state: tokio::sync::Mutex<Option<Option<SignIn>>>,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("server_url", &self.options.server_url)
            .field("interactive", &self.options.interactive)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// When a token issued at `issued` and expiring at `expires` should be renewed: a minute early, or
/// a quarter of its life early for short-lived tokens.
fn renew_at(issued: u64, expires: Option<u64>) -> u64 {
    match expires {
        Some(expires) => expires - (expires.saturating_sub(issued) / 4).min(60_000),
        None => u64::MAX,
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl UpstreamAuth {
    /// The authorization of the upstream `options.server_url`.
    pub fn new(options: OAuthOptions) -> Arc<UpstreamAuth> {
        Arc::new(UpstreamAuth {
            http: AuthHttp::new(Duration::from_secs(30)),
            options,
            current: Mutex::new(None),
            state: tokio::sync::Mutex::new(None),
        })
    }

    /// The header for the next request: the stored access token, refreshed first when it is about
    /// to expire. `None` before any sign-in: the upstream's 401 will say how to sign in.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, AuthError> {
        if let Some((header, renew)) = self.current.lock().expect("not poisoned").clone()
            && now_ms() < renew
        {
            return Ok(Some(header));
        }
        let mut state = self.state.lock().await;
        if state.is_none() {
            *state = Some(self.options.store.load(&self.options.server_url)?);
        }
        // Not signed in (or the tokens were refused): send without, and let the upstream's 401 say
        // how to sign in (the store is read again then, not on every request).
        let sign_in = state.as_ref().and_then(Option::as_ref);
        let Some(sign_in) = sign_in.filter(|s| s.access_token.is_some()) else { return Ok(None) };
        if let Some(token) = &sign_in.access_token
            && now_ms() < renew_at(sign_in.issued_at_ms, sign_in.expires_at_ms)
        {
            return Ok(self.publish(token, sign_in));
        }
        // Expiring or expired: renew now rather than be refused mid-call.
        let sign_in = sign_in.clone();
        self.renew(&mut state, sign_in, None).await
    }

    /// The upstream refused `sent` with a 401 carrying `challenge`: refresh the token, or sign in
    /// again, so the request can be sent once more.
    pub async fn refused(
        &self,
        sent: Option<&HeaderValue>,
        challenge: Option<&str>,
    ) -> Result<(), AuthError> {
        let challenge = discovery::parse_challenge(challenge.unwrap_or(""));
        let mut state = self.state.lock().await;
        let current = self.current.lock().expect("not poisoned").clone().map(|(h, _)| h);
        if current.is_some() && current.as_ref() != sent {
            return Ok(()); // renewed by another request meanwhile
        }
        let sign_in = self.loaded(&mut state)?.clone();
        // Signed in meanwhile (by `mcp-asyncify login`, say): retry with that token.
        if let Some(stored) = &sign_in
            && let Some(token) = &stored.access_token
            && bearer(token).as_ref() != sent
            && now_ms() < renew_at(stored.issued_at_ms, stored.expires_at_ms)
        {
            self.publish(token, stored);
            return Ok(());
        }
        match sign_in {
            Some(sign_in) if sent.is_some() => {
                tracing::info!(upstream = %self.options.server_url, "the upstream refused the access token; renewing it");
                self.renew(&mut state, sign_in, Some(&challenge)).await.map(|_| ())
            }
            _ => self
                .sign_in_or_fail(&mut state, &challenge, "the upstream asks for a sign-in")
                .await
                .map(|_| ()),
        }
    }

    /// The sign-in, read from the store on first use, and again while there is no token: another
    /// process (`mcp-asyncify login`, a second wrapper) may have signed in since.
    fn loaded<'a>(&self, state: &'a mut Option<Option<SignIn>>) -> Result<&'a Option<SignIn>, AuthError> {
        let signed_in = matches!(state, Some(Some(s)) if s.access_token.is_some());
        if !signed_in {
            *state = Some(self.options.store.load(&self.options.server_url)?);
        }
        Ok(state.as_ref().expect("just loaded"))
    }

    fn publish(&self, token: &str, sign_in: &SignIn) -> Option<HeaderValue> {
        let header = bearer(token)?;
        let renew = renew_at(sign_in.issued_at_ms, sign_in.expires_at_ms);
        *self.current.lock().expect("not poisoned") = Some((header.clone(), renew));
        Some(header)
    }

    /// Refreshes `sign_in`'s token; when the server refuses the refresh token (or there is none),
    /// signs in again.
    async fn renew(
        &self,
        state: &mut Option<Option<SignIn>>,
        mut sign_in: SignIn,
        challenge: Option<&Challenge>,
    ) -> Result<Option<HeaderValue>, AuthError> {
        // Another process sharing the store may have refreshed already (and rotated the refresh
        // token ours would now be refused with): take its tokens when they are newer.
        if let Ok(Some(stored)) = self.options.store.load(&self.options.server_url)
            && stored.access_token.is_some()
            && stored.access_token != sign_in.access_token
        {
            if now_ms() < renew_at(stored.issued_at_ms, stored.expires_at_ms) {
                let header = self.publish(stored.access_token.as_deref().unwrap_or(""), &stored);
                *state = Some(Some(stored));
                return Ok(header);
            }
            sign_in = stored;
        }
        let why = match sign_in.refresh_token.clone() {
            Some(refresh) => match refresh_tokens(&self.http, &mut sign_in, &refresh).await {
                Ok(()) => {
                    self.options.store.save(&sign_in)?;
                    tracing::info!(upstream = %self.options.server_url, "refreshed the access token");
                    let header = self.publish(sign_in.access_token.as_deref().unwrap_or(""), &sign_in);
                    *state = Some(Some(sign_in));
                    return Ok(header);
                }
                Err(Refresh::Rejected(why)) => {
                    format!("the sign-in to {} has expired or was revoked ({why})", self.options.server_url)
                }
                Err(Refresh::Failed(e)) => return Err(e),
            },
            None => format!("the sign-in to {} has expired (no refresh token)", self.options.server_url),
        };
        tracing::warn!(upstream = %self.options.server_url, "{why}");
        // The tokens are dead; the registered client is still good for the next sign-in.
        sign_in.access_token = None;
        sign_in.refresh_token = None;
        sign_in.expires_at_ms = None;
        self.options.store.save(&sign_in)?;
        *state = Some(Some(sign_in));
        *self.current.lock().expect("not poisoned") = None;
        let challenge = challenge.cloned().unwrap_or_default();
        self.sign_in_or_fail(state, &challenge, &why).await
    }

    async fn sign_in_or_fail(
        &self,
        state: &mut Option<Option<SignIn>>,
        challenge: &Challenge,
        why: &str,
    ) -> Result<Option<HeaderValue>, AuthError> {
        if !self.options.interactive {
            return Err(AuthError::SignInNeeded {
                server: self.options.server_url.clone(),
                why: why.to_owned(),
            });
        }
        let previous = state.as_ref().and_then(|s| s.clone());
        let sign_in = sign_in(&self.http, &self.options, challenge, previous).await?;
        let header = self.publish(sign_in.access_token.as_deref().unwrap_or(""), &sign_in);
        *state = Some(Some(sign_in));
        Ok(header)
    }
}

/// How a refresh went wrong.
enum Refresh {
    /// The server refused the refresh token (revoked, expired, rotated away): sign in again.
    Rejected(String),
    /// Anything else (the server unreachable): the sign-in may still be good.
    Failed(AuthError),
}

type Oauth2Client = BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

fn oauth2_client(sign_in: &SignIn) -> Result<Oauth2Client, AuthError> {
    let bad =
        |what: &str, url: &str| AuthError::Metadata { url: url.to_owned(), why: format!("invalid {what}") };
    let mut client = BasicClient::new(ClientId::new(sign_in.client_id.clone()))
        .set_auth_uri(
            AuthUrl::new(sign_in.authorization_endpoint.clone())
                .map_err(|_| bad("authorization_endpoint", &sign_in.authorization_endpoint))?,
        )
        .set_token_uri(
            TokenUrl::new(sign_in.token_endpoint.clone())
                .map_err(|_| bad("token_endpoint", &sign_in.token_endpoint))?,
        )
        .set_redirect_uri(
            RedirectUrl::new(sign_in.redirect_uri.clone())
                .map_err(|_| bad("redirect URI", &sign_in.redirect_uri))?,
        );
    if let Some(secret) = &sign_in.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.clone()));
        if sign_in.token_endpoint_auth_method.as_deref() == Some("client_secret_post") {
            client = client.set_auth_type(AuthType::RequestBody);
        }
    }
    Ok(client)
}

/// What the token endpoint said, for a person.
fn token_error<E: std::error::Error>(
    e: RequestTokenError<E, oauth2::basic::BasicErrorResponse>,
) -> (bool, String) {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let mut s = r.error().to_string();
            if let Some(d) = r.error_description() {
                s.push_str(&format!(": {d}"));
            }
            (true, format!("the token endpoint answered {s}"))
        }
        RequestTokenError::Request(e) => (false, e.to_string()),
        RequestTokenError::Parse(e, body) => {
            // The body helps with an HTML error page; one that may hold a token is never shown.
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            if text.contains("token") {
                (false, format!("the token endpoint's answer is not valid ({e})"))
            } else {
                (false, format!("the token endpoint's answer is not valid ({e}): {text:?}"))
            }
        }
        RequestTokenError::Other(e) => (false, format!("the token endpoint's answer is not valid: {e}")),
    }
}

/// Stores a token answer into `sign_in` (a rotated refresh token replaces the old one).
fn keep_tokens(sign_in: &mut SignIn, token: &oauth2::basic::BasicTokenResponse) {
    let now = now_ms();
    sign_in.access_token = Some(token.access_token().secret().clone());
    if let Some(refresh) = token.refresh_token() {
        sign_in.refresh_token = Some(refresh.secret().clone());
    }
    sign_in.issued_at_ms = now;
    sign_in.expires_at_ms = token.expires_in().map(|d| now + d.as_millis() as u64);
}

async fn refresh_tokens(http: &AuthHttp, sign_in: &mut SignIn, refresh: &str) -> Result<(), Refresh> {
    let client = oauth2_client(sign_in).map_err(Refresh::Failed)?;
    let refresh = RefreshToken::new(refresh.to_owned());
    let http_client = http.oauth2();
    let token = client
        .exchange_refresh_token(&refresh)
        .add_extra_param("resource", sign_in.resource.clone())
        .request_async(&http_client)
        .await
        .map_err(|e| match token_error(e) {
            (true, why) => Refresh::Rejected(why),
            (false, why) => {
                Refresh::Failed(AuthError::Unreachable(format!("refreshing the access token failed: {why}")))
            }
        })?;
    keep_tokens(sign_in, &token);
    Ok(())
}

/// The MCP server's challenge, asked for with an unauthenticated `initialize` (for `login`, which
/// has not been refused yet). `None` when the server lets the request through.
async fn probe(http: &AuthHttp, server_url: &str) -> Result<Option<Challenge>, AuthError> {
    let body = serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp-asyncify","version":env!("CARGO_PKG_VERSION")}}});
    let answer = http
        .post(server_url, "application/json", serde_json::to_vec(&body).unwrap_or_default(), &[])
        .await
        .map_err(|e| AuthError::Unreachable(e.to_string()))?;
    if answer.status != ::http::StatusCode::UNAUTHORIZED {
        return Ok(None);
    }
    let header = answer.headers.get(::http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
    Ok(Some(discovery::parse_challenge(header.unwrap_or(""))))
}

/// The full sign-in: discovery, a client, the browser, the code exchange. `previous` is what the
/// store held (its registered client is reused when its redirect port is free).
async fn sign_in(
    http: &AuthHttp,
    options: &OAuthOptions,
    challenge: &Challenge,
    previous: Option<SignIn>,
) -> Result<SignIn, AuthError> {
    let server = options.server_url.as_str();
    let resource_metadata = discovery::protected_resource(http, server, challenge).await?;
    let issuer = resource_metadata.authorization_servers[0].clone();
    let metadata = discovery::authorization_server(http, &issuer).await?;
    let scope = options.scope.clone().or_else(|| challenge.scope.clone()).or_else(|| {
        (!resource_metadata.scopes_supported.is_empty()).then(|| resource_metadata.scopes_supported.join(" "))
    });

    // A client: configured, the previous registration (on its own port), a metadata document, or a new registration.
    let reusable =
        previous.filter(|p| p.issuer == metadata.issuer && p.registered && options.client_id.is_none());
    let mut loopback = None;
    let mut sign_in = SignIn {
        server_url: server.to_owned(),
        resource: resource_metadata.resource.clone(),
        issuer: metadata.issuer.clone(),
        authorization_endpoint: metadata.authorization_endpoint.clone(),
        token_endpoint: metadata.token_endpoint.clone(),
        revocation_endpoint: metadata.revocation_endpoint.clone(),
        scope: scope.clone(),
        ..SignIn::default()
    };
    if let Some(prev) = reusable
        && let Some(port) = port_of(&prev.redirect_uri)
        && let Ok(l) = Loopback::bind(port).await
    {
        sign_in.client_id = prev.client_id;
        sign_in.client_secret = prev.client_secret;
        sign_in.token_endpoint_auth_method = prev.token_endpoint_auth_method;
        sign_in.registered = true;
        sign_in.redirect_uri = l.redirect_uri.clone();
        loopback = Some(l);
    }
    let loopback = match loopback {
        Some(l) => l,
        None => {
            let l = Loopback::bind(options.redirect_port).await.map_err(|e| {
                AuthError::Unreachable(format!(
                    "cannot listen on 127.0.0.1:{} for the sign-in redirect: {e}",
                    options.redirect_port
                ))
            })?;
            sign_in.redirect_uri = l.redirect_uri.clone();
            choose_client(http, options, &metadata, &mut sign_in).await?;
            l
        }
    };

    // The browser part: PKCE S256, state, the resource indicator.
    let client = oauth2_client(&sign_in)?;
    let (challenge_code, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge_code)
        .add_extra_param("resource", sign_in.resource.clone());
    if let Some(scope) = &scope {
        request = request.add_scopes(scope.split_whitespace().map(|s| Scope::new(s.to_owned())));
    }
    let (url, state) = request.url();
    eprintln!("mcp-asyncify: sign in to {server} in your browser (it should open by itself):\n  {url}");
    if let Err(e) = loopback::open_browser(url.as_str()) {
        eprintln!("mcp-asyncify: could not open a browser ({e}); open the link above yourself");
    }
    let redirect = loopback.wait(options.sign_in_timeout, server).await?;
    if redirect.params.get("state").map(String::as_str) != Some(state.secret().as_str()) {
        return Err(AuthError::StateMismatch { server: server.to_owned() });
    }
    if let Some(error) = redirect.params.get("error") {
        let detail = redirect.params.get("error_description").map(|d| format!(": {d}")).unwrap_or_default();
        return Err(AuthError::Refused {
            server: server.to_owned(),
            why: format!("the authorization server answered {error}{detail}"),
        });
    }
    let code = redirect.params.get("code").ok_or_else(|| AuthError::Refused {
        server: server.to_owned(),
        why: "the redirect carried no authorization code".into(),
    })?;
    let http_client = http.oauth2();
    let token = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(verifier)
        .add_extra_param("resource", sign_in.resource.clone())
        .request_async(&http_client)
        .await
        .map_err(|e| AuthError::Refused { server: server.to_owned(), why: token_error(e).1 })?;
    keep_tokens(&mut sign_in, &token);
    let path = options.store.save(&sign_in)?;
    eprintln!("mcp-asyncify: signed in to {server} (kept in {})", path.display());
    Ok(sign_in)
}

fn port_of(uri: &str) -> Option<u16> {
    uri.parse::<::http::Uri>().ok()?.port_u16()
}

/// Picks the client id: configured, a client ID metadata document, or a dynamic registration.
async fn choose_client(
    http: &AuthHttp,
    options: &OAuthOptions,
    metadata: &AuthServer,
    sign_in: &mut SignIn,
) -> Result<(), AuthError> {
    if let Some(id) = &options.client_id {
        sign_in.client_id = id.clone();
        return Ok(());
    }
    if let Some(url) = &options.client_metadata_url
        && metadata.client_id_metadata_document_supported
    {
        sign_in.client_id = url.clone();
        return Ok(());
    }
    let Some(endpoint) = &metadata.registration_endpoint else {
        return Err(AuthError::Refused {
            server: options.server_url.clone(),
            why: "its authorization server offers no dynamic registration; set upstream_auth.client_id (a client registered there) or upstream_auth.client_metadata_url".into(),
        });
    };
    let body = serde_json::json!({
        "client_name": "mcp-asyncify",
        "redirect_uris": [sign_in.redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "software_id": "mcp-asyncify",
        "software_version": env!("CARGO_PKG_VERSION"),
    });
    let answer = http.post_json(endpoint, &body).await.map_err(|e| AuthError::Unreachable(e.to_string()))?;
    let refused = |why: String| AuthError::Refused { server: options.server_url.clone(), why };
    if !answer.status.is_success() {
        let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)]).into_owned();
        return Err(refused(format!(
            "registering a client at {endpoint} was answered HTTP {}: {text}",
            answer.status.as_u16()
        )));
    }
    #[derive(serde::Deserialize)]
    struct Registered {
        client_id: String,
        #[serde(default)]
        client_secret: Option<String>,
        #[serde(default)]
        token_endpoint_auth_method: Option<String>,
    }
    let r: Registered = serde_json::from_slice(&answer.body)
        .map_err(|e| refused(format!("the registration answer from {endpoint} is not valid: {e}")))?;
    sign_in.client_id = r.client_id;
    sign_in.client_secret = r.client_secret;
    sign_in.token_endpoint_auth_method = r.token_endpoint_auth_method;
    sign_in.registered = true;
    tracing::info!(upstream = %options.server_url, "registered mcp-asyncify with the authorization server");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(client_id: Option<&str>, metadata_url: Option<&str>) -> OAuthOptions {
        OAuthOptions {
            server_url: "https://mcp.example.com/mcp".into(),
            store: TokenStore::at(std::env::temp_dir().join("asyncify-unused-store")),
            interactive: false,
            sign_in_timeout: Duration::from_secs(1),
            client_id: client_id.map(str::to_owned),
            client_metadata_url: metadata_url.map(str::to_owned),
            redirect_port: 0,
            scope: None,
        }
    }

    fn server(cimd: bool, registration: bool) -> AuthServer {
        AuthServer {
            issuer: "https://auth.example.com".into(),
            authorization_endpoint: "https://auth.example.com/authorize".into(),
            token_endpoint: "https://auth.example.com/token".into(),
            registration_endpoint: registration.then(|| "https://auth.example.com/register".into()),
            revocation_endpoint: None,
            code_challenge_methods_supported: vec!["S256".into()],
            client_id_metadata_document_supported: cimd,
        }
    }

    #[tokio::test]
    async fn the_client_id_is_the_configured_one_or_the_metadata_document_where_supported() {
        let http = AuthHttp::new(Duration::from_secs(1));
        let doc = "https://me.example.com/mcp-asyncify.json";
        let mut sign_in = SignIn::default();
        choose_client(&http, &options(Some("pre-registered"), Some(doc)), &server(true, true), &mut sign_in)
            .await
            .unwrap();
        assert_eq!((sign_in.client_id.as_str(), sign_in.registered), ("pre-registered", false));
        let mut sign_in = SignIn::default();
        choose_client(&http, &options(None, Some(doc)), &server(true, true), &mut sign_in).await.unwrap();
        assert_eq!((sign_in.client_id.as_str(), sign_in.registered), (doc, false));
        // A server without metadata documents nor registration: say what to configure.
        let err =
            choose_client(&http, &options(None, Some(doc)), &server(false, false), &mut SignIn::default())
                .await
                .unwrap_err()
                .to_string();
        assert!(err.contains("upstream_auth.client_id"), "{err}");
    }

    #[test]
    fn tokens_are_renewed_a_minute_early_or_a_quarter_of_a_short_life_early() {
        assert_eq!(renew_at(0, Some(3_600_000)), 3_540_000);
        assert_eq!(renew_at(1000, Some(3000)), 2500);
        assert_eq!(renew_at(0, None), u64::MAX);
    }
}
