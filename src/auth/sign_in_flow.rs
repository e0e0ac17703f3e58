//! The sign-in itself: the server's challenge, discovery, a client (configured, a client ID
//! metadata document, or registered), the browser with PKCE, and the code exchange; with the
//! `oauth2` client and the reading of token answers, which a refresh uses too.

use super::discovery::{self, AuthServer, Challenge};
use super::http::AuthHttp;
use super::loopback::{self, Loopback};
use super::store::SignIn;
use super::{AuthError, OAuthOptions};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, RedirectUrl, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(super) type Oauth2Client =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

pub(super) fn oauth2_client(sign_in: &SignIn) -> Result<Oauth2Client, AuthError> {
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
pub(super) fn token_error<E: std::error::Error>(
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
pub(super) fn keep_tokens(sign_in: &mut SignIn, token: &oauth2::basic::BasicTokenResponse) {
    let now = now_ms();
    sign_in.access_token = Some(token.access_token().secret().clone());
    if let Some(refresh) = token.refresh_token() {
        sign_in.refresh_token = Some(refresh.secret().clone());
    }
    sign_in.issued_at_ms = now;
    sign_in.expires_at_ms = token.expires_in().map(|d| now + d.as_millis() as u64);
}

/// The MCP server's challenge, asked for with an unauthenticated `initialize` (for `login`, which
/// has not been refused yet). `None` when the server lets the request through.
pub(super) async fn probe(http: &AuthHttp, server_url: &str) -> Result<Option<Challenge>, AuthError> {
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
pub(super) async fn sign_in(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::store::TokenStore;
    use std::time::Duration;

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
}
