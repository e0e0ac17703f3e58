//! The simulator's own OAuth authorization server, for `notion-sim --http ADDR --oauth`: like
//! Notion's hosted server, `/mcp` then answers 401 without a valid bearer token, with a challenge
//! that leads to protected-resource metadata (RFC 9728) and authorization-server metadata
//! (RFC 8414). It registers clients (RFC 7591), approves every authorization at once (a 302 back to
//! the client's loopback redirect: no login page, so tests and CI sign in with a `$BROWSER` that only
//! fetches the URL), checks PKCE S256 and the `resource` indicator (RFC 8707) strictly, issues
//! short-lived access tokens if asked, rotates refresh tokens, and revokes tokens (RFC 7009).
//! `GET /oauth-sim/stats` counts what happened, for tests.

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The simulator's OAuth options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OAuthSimArgs {
    /// Over --http: require OAuth on /mcp, with a built-in authorization server that approves every
    /// sign-in at once (registration, PKCE, resource indicator, refresh, revocation).
    #[arg(long = "oauth", env = "MCP_NOTION_SIM_OAUTH")]
    pub oauth: bool,
    /// Lifetime of the access tokens it issues, in seconds.
    #[arg(
        long = "oauth-token-ttl-secs",
        env = "MCP_NOTION_SIM_OAUTH_TOKEN_TTL_SECS",
        default_value_t = 3600
    )]
    pub oauth_token_ttl_secs: u64,
    /// A fault to inject (tests of the client's errors).
    #[arg(long = "oauth-fault", value_enum, hide = true)]
    pub oauth_fault: Option<OAuthFault>,
}

/// Faults the authorization server can be told to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OAuthFault {
    /// Its metadata document is not valid JSON.
    BadMetadata,
    /// The redirect carries another `state` than the one sent.
    WrongState,
    /// The token endpoint refuses every request (`invalid_request`).
    TokenError,
    /// The 401 challenge names no `resource_metadata` (clients must try the well-known URIs).
    NoResourceMetadata,
}

/// The body type of every answer (rmcp's, so both kinds of answer share it).
pub type Body = BoxBody<Bytes, Infallible>;

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    expires: Instant,
}

#[derive(Default)]
struct State {
    /// client id → its redirect URIs.
    clients: HashMap<String, Vec<String>>,
    codes: HashMap<String, Grant>,
    /// access token → when it expires.
    access: HashMap<String, Instant>,
    /// refresh token → its client id.
    refresh: HashMap<String, String>,
    stats: HashMap<&'static str, u64>,
}

/// The authorization server, and the guard of `/mcp`.
pub struct AuthServer {
    base: String,
    resource: String,
    ttl: Duration,
    fault: Option<OAuthFault>,
    state: Mutex<State>,
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    respond(status, "application/json", serde_json::to_vec(value).unwrap_or_default())
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json_response(status, &json!({"error": error, "error_description": description}))
}

fn form(body: &[u8]) -> HashMap<String, String> {
    oauth2::url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// `http://127.0.0.1:PORT/path` → `http://127.0.0.1/path`.
fn without_port(uri: &str) -> String {
    match oauth2::url::Url::parse(uri) {
        Ok(mut url) => {
            let _ = url.set_port(None);
            url.to_string()
        }
        Err(_) => uri.to_owned(),
    }
}

fn is_loopback_redirect(uri: &str) -> bool {
    oauth2::url::Url::parse(uri).is_ok_and(|u| {
        u.scheme() == "http" && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"))
    })
}

impl AuthServer {
    /// The server for a simulator listening at `addr`.
    pub fn new(args: &OAuthSimArgs, addr: std::net::SocketAddr) -> AuthServer {
        let base = format!("http://{addr}");
        AuthServer {
            resource: format!("{base}/mcp"),
            base,
            ttl: Duration::from_secs(args.oauth_token_ttl_secs.max(1)),
            fault: args.oauth_fault,
            state: Mutex::new(State::default()),
        }
    }

    fn count(&self, what: &'static str) {
        *self.state.lock().expect("not poisoned").stats.entry(what).or_default() += 1;
    }

    /// Whether `path` is one of the authorization server's (answered by [`AuthServer::handle`]).
    pub fn owns(&self, path: &str) -> bool {
        path.starts_with("/.well-known/") || path.starts_with("/oauth/") || path.starts_with("/oauth-sim/")
    }

    /// `None` when `headers` carry a valid access token for `/mcp`; else the 401 to answer.
    pub fn guard(&self, headers: &HeaderMap) -> Option<Response<Body>> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let valid = token.is_some_and(|t| {
            let state = self.state.lock().expect("not poisoned");
            state.access.get(t).is_some_and(|expires| Instant::now() < *expires)
        });
        if valid {
            return None;
        }
        self.count("rejected_requests");
        let mut challenge = String::from("Bearer");
        if self.fault != Some(OAuthFault::NoResourceMetadata) {
            challenge.push_str(&format!(
                " resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp\"",
                self.base
            ));
        }
        if token.is_some() {
            challenge.push_str(if challenge.len() > 6 { ", " } else { " " });
            challenge
                .push_str("error=\"invalid_token\", error_description=\"the access token is not valid\"");
        }
        let mut r = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "unauthorized", "message": "sign in to use this server"}),
        );
        r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge.parse().expect("ASCII"));
        Some(r)
    }

    /// Answers one request to the authorization server.
    pub async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, 1 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "the body is too large");
            }
        };
        let path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        match (&parts.method, path) {
            (
                &Method::GET,
                "/.well-known/oauth-protected-resource/mcp" | "/.well-known/oauth-protected-resource",
            ) => json_response(
                StatusCode::OK,
                &json!({
                    "resource": self.resource,
                    "authorization_servers": [self.base],
                    "scopes_supported": ["notion"],
                    "bearer_methods_supported": ["header"],
                    "resource_name": "notion-sim",
                }),
            ),
            (&Method::GET, "/.well-known/oauth-authorization-server") => {
                if self.fault == Some(OAuthFault::BadMetadata) {
                    let text = format!("{{\"issuer\": \"{}\", \"authorization_endpoint\": ", self.base);
                    return respond(StatusCode::OK, "application/json", text);
                }
                json_response(
                    StatusCode::OK,
                    &json!({
                        "issuer": self.base,
                        "authorization_endpoint": format!("{}/oauth/authorize", self.base),
                        "token_endpoint": format!("{}/oauth/token", self.base),
                        "registration_endpoint": format!("{}/oauth/register", self.base),
                        "revocation_endpoint": format!("{}/oauth/revoke", self.base),
                        "response_types_supported": ["code"],
                        "grant_types_supported": ["authorization_code", "refresh_token"],
                        "code_challenge_methods_supported": ["S256"],
                        "token_endpoint_auth_methods_supported": ["none"],
                        "client_id_metadata_document_supported": true,
                        "scopes_supported": ["notion"],
                    }),
                )
            }
            (&Method::POST, "/oauth/register") => self.register(&body),
            (&Method::GET, "/oauth/authorize") => self.authorize(query).await,
            (&Method::POST, "/oauth/token") => self.token(&body),
            (&Method::POST, "/oauth/revoke") => {
                let params = form(&body);
                if let Some(token) = params.get("token") {
                    let mut state = self.state.lock().expect("not poisoned");
                    state.access.remove(token);
                    state.refresh.remove(token);
                    *state.stats.entry("revocations").or_default() += 1;
                }
                respond(StatusCode::OK, "application/json", "{}")
            }
            (&Method::GET, "/oauth-sim/stats") => {
                let state = self.state.lock().expect("not poisoned");
                json_response(StatusCode::OK, &json!(state.stats))
            }
            _ => oauth_error(StatusCode::NOT_FOUND, "not_found", &format!("no {} {path} here", parts.method)),
        }
    }

    fn register(&self, body: &[u8]) -> Response<Body> {
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", "the body is not JSON");
        };
        let redirects: Vec<String> = request["redirect_uris"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if redirects.is_empty() || !redirects.iter().all(|u| is_loopback_redirect(u)) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_redirect_uri",
                "redirect_uris must be loopback http URIs",
            );
        }
        let client_id = format!("sim-client-{}", uuid::Uuid::new_v4().simple());
        let mut state = self.state.lock().expect("not poisoned");
        state.clients.insert(client_id.clone(), redirects.clone());
        *state.stats.entry("registrations").or_default() += 1;
        json_response(
            StatusCode::CREATED,
            &json!({
                "client_id": client_id,
                "client_id_issued_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                "redirect_uris": redirects,
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "client_name": request["client_name"],
            }),
        )
    }

    /// The redirect URIs of a client whose id is the URL of its metadata document (fetched, and
    /// checked to name itself).
    async fn metadata_document(&self, url: &str) -> Result<Vec<String>, String> {
        let http = crate::auth::http::AuthHttp::new(Duration::from_secs(5));
        let answer = http.get_json(url).await.map_err(|e| e.to_string())?;
        let doc: Value = serde_json::from_slice(&answer.body).map_err(|e| format!("not JSON: {e}"))?;
        if !answer.status.is_success() || doc["client_id"] != url {
            return Err("the document does not name itself as client_id".into());
        }
        self.count("metadata_documents");
        Ok(doc["redirect_uris"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }

    async fn authorize(&self, query: &str) -> Response<Body> {
        let params = form(query.as_bytes());
        let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
        let (client_id, redirect_uri) = (get("client_id"), get("redirect_uri"));
        let registered = self.state.lock().expect("not poisoned").clients.get(client_id).cloned();
        let allowed = match registered {
            // A registered client: its redirect URIs exactly.
            Some(redirects) => redirects.iter().any(|r| r == redirect_uri),
            // A client ID metadata document: a loopback redirect may use any port (RFC 8252 §7.3).
            None if client_id.starts_with("http://") || client_id.starts_with("https://") => {
                match self.metadata_document(client_id).await {
                    Ok(redirects) => redirects.iter().any(|r| {
                        r == redirect_uri
                            || (is_loopback_redirect(r) && without_port(r) == without_port(redirect_uri))
                    }),
                    Err(why) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", &why),
                }
            }
            None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", "unknown client_id"),
        };
        if !allowed {
            // Never redirect to an unregistered URI (RFC 6749 §4.1.2.1).
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "redirect_uri is not registered");
        }
        let back = |pairs: &[(&str, &str)]| {
            let mut url = oauth2::url::Url::parse(redirect_uri).expect("registered URIs are URLs");
            url.query_pairs_mut().extend_pairs(pairs).append_pair("iss", &self.base);
            let mut r = respond(StatusCode::FOUND, "text/plain", "");
            r.headers_mut().insert(header::LOCATION, url.as_str().parse().expect("a URL"));
            r
        };
        let state_param = get("state");
        let fail = |error: &str, why: &str| {
            back(&[("error", error), ("error_description", why), ("state", state_param)])
        };
        if get("response_type") != "code" {
            return fail("unsupported_response_type", "only code");
        }
        if get("code_challenge").is_empty() || get("code_challenge_method") != "S256" {
            return fail("invalid_request", "PKCE with S256 is required");
        }
        if get("resource") != self.resource {
            return fail("invalid_target", &format!("resource must be {}", self.resource));
        }
        let code = format!("sim-code-{}", uuid::Uuid::new_v4().simple());
        let mut state = self.state.lock().expect("not poisoned");
        state.codes.insert(
            code.clone(),
            Grant {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                challenge: get("code_challenge").to_owned(),
                expires: Instant::now() + Duration::from_secs(60),
            },
        );
        *state.stats.entry("authorizations").or_default() += 1;
        drop(state);
        let sent_state = if self.fault == Some(OAuthFault::WrongState) {
            format!("forged-{state_param}")
        } else {
            state_param.to_owned()
        };
        back(&[("code", &code), ("state", &sent_state)])
    }

    fn issue(&self, state: &mut State, client_id: &str) -> Response<Body> {
        let access = format!("sim-at-{}", uuid::Uuid::new_v4().simple());
        let refresh = format!("sim-rt-{}", uuid::Uuid::new_v4().simple());
        state.access.insert(access.clone(), Instant::now() + self.ttl);
        state.refresh.insert(refresh.clone(), client_id.to_owned());
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": self.ttl.as_secs(),
                "refresh_token": refresh,
                "scope": "notion",
            }),
        )
    }

    fn token(&self, body: &[u8]) -> Response<Body> {
        if self.fault == Some(OAuthFault::TokenError) {
            self.count("token_errors");
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the simulator was told to refuse every token request",
            );
        }
        let params = form(body);
        let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
        if get("resource") != self.resource {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                &format!("resource must be {}", self.resource),
            );
        }
        let mut state = self.state.lock().expect("not poisoned");
        match get("grant_type") {
            "authorization_code" => {
                let Some(grant) = state.codes.remove(get("code")) else {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown or used code");
                };
                if grant.expires < Instant::now()
                    || grant.client_id != get("client_id")
                    || grant.redirect_uri != get("redirect_uri")
                {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "the code was not issued for this",
                    );
                }
                let digest = sha2::Sha256::digest(get("code_verifier").as_bytes());
                if base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) != grant.challenge {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "PKCE verification failed");
                }
                *state.stats.entry("code_exchanges").or_default() += 1;
                self.issue(&mut state, &grant.client_id)
            }
            "refresh_token" => {
                // Rotation: a refresh token is good once.
                match state.refresh.remove(get("refresh_token")) {
                    Some(client) if client == get("client_id") => {
                        *state.stats.entry("refreshes").or_default() += 1;
                        self.issue(&mut state, &client)
                    }
                    _ => {
                        *state.stats.entry("refused_refreshes").or_default() += 1;
                        oauth_error(
                            StatusCode::BAD_REQUEST,
                            "invalid_grant",
                            "the refresh token is not valid",
                        )
                    }
                }
            }
            other => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", &format!("{other:?}")),
        }
    }
}
