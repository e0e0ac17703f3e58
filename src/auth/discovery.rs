//! Finding the authorization server of an MCP server (MCP 2025-11-25, basic/authorization):
//! the `WWW-Authenticate` challenge of a 401, protected-resource metadata (RFC 9728), then
//! authorization-server metadata (RFC 8414, with the OpenID Connect discovery fallbacks the MCP
//! specification lists).

use super::AuthError;
use super::http::AuthHttp;
use serde::Deserialize;

/// What a `Bearer` challenge says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `resource_metadata`: where the protected-resource metadata is.
    pub resource_metadata: Option<String>,
    /// `scope`: the scopes the request needs.
    pub scope: Option<String>,
    /// `error`, e.g. `invalid_token`.
    pub error: Option<String>,
}

/// Reads the auth-params of a `WWW-Authenticate` value (`Bearer k="v", k2=token`); tolerant of
/// spacing, unquoted values and other schemes around it.
pub fn parse_challenge(header: &str) -> Challenge {
    let mut challenge = Challenge::default();
    let mut rest = header.trim();
    if rest.len() >= 6 && rest[..6].eq_ignore_ascii_case("bearer") {
        rest = &rest[6..];
    }
    while !rest.is_empty() {
        rest = rest.trim_start_matches([' ', ',', '\t']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            out.push(next);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            value = out;
            rest = &quoted[end.min(quoted.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        match key.rsplit(' ').next().unwrap_or(&key) {
            "resource_metadata" => challenge.resource_metadata = Some(value),
            "scope" => challenge.scope = Some(value),
            "error" => challenge.error = Some(value),
            _ => {}
        }
    }
    challenge
}

/// Protected-resource metadata (RFC 9728), the fields used.
#[derive(Debug, Clone, Deserialize)]
pub struct ProtectedResource {
    /// The resource identifier: the `resource` indicator to send.
    pub resource: String,
    /// Issuers of the authorization servers that protect it.
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// Scopes it knows.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
}

/// Authorization-server metadata (RFC 8414), the fields used.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthServer {
    /// Its issuer identifier.
    pub issuer: String,
    /// Where the browser goes.
    pub authorization_endpoint: String,
    /// Where codes and refresh tokens are exchanged.
    pub token_endpoint: String,
    /// Dynamic client registration (RFC 7591), if offered.
    #[serde(default)]
    pub registration_endpoint: Option<String>,
    /// Token revocation (RFC 7009), if offered.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// PKCE methods; the MCP specification requires `S256` to be listed.
    #[serde(default)]
    pub code_challenge_methods_supported: Vec<String>,
    /// Whether a client ID metadata document URL may serve as `client_id`.
    #[serde(default)]
    pub client_id_metadata_document_supported: bool,
}

/// The origin (`scheme://authority`) and path of an absolute URL.
fn split_url(url: &str) -> Result<(String, String), AuthError> {
    let uri: http::Uri =
        url.parse().map_err(|_| AuthError::Metadata { url: url.to_owned(), why: "not a URL".into() })?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(AuthError::Metadata { url: url.to_owned(), why: "not an absolute URL".into() });
    };
    let path = uri.path().trim_end_matches('/').to_owned();
    Ok((format!("{scheme}://{authority}"), path))
}

pub use crate::config::secure_enough;

/// Fetches and checks one metadata document; `Ok(None)` when it is not there (404 and the like),
/// so the next candidate is tried.
async fn fetch<T: for<'de> Deserialize<'de>>(
    http: &AuthHttp,
    url: &str,
    what: &str,
) -> Result<Option<T>, AuthError> {
    if !secure_enough(url) {
        return Err(AuthError::Metadata {
            url: url.to_owned(),
            why: format!("{what} must be served over https"),
        });
    }
    let answer = http.get_json(url).await.map_err(|e| AuthError::Unreachable(e.to_string()))?;
    if answer.status.is_client_error() {
        tracing::debug!(url, status = answer.status.as_u16(), "no {what} here");
        return Ok(None);
    }
    if !answer.status.is_success() {
        return Err(AuthError::Metadata {
            url: url.to_owned(),
            why: format!("{what} was answered with HTTP {}", answer.status.as_u16()),
        });
    }
    serde_json::from_slice(&answer.body).map(Some).map_err(|e| AuthError::Metadata {
        url: url.to_owned(),
        why: format!("the {what} is not valid: {e}"),
    })
}

/// The protected-resource metadata of `server_url`: at the challenge's `resource_metadata`, else at
/// the well-known URIs (path-specific first, then the root).
pub async fn protected_resource(
    http: &AuthHttp,
    server_url: &str,
    challenge: &Challenge,
) -> Result<ProtectedResource, AuthError> {
    let (origin, path) = split_url(server_url)?;
    let mut candidates = Vec::new();
    if let Some(url) = &challenge.resource_metadata {
        candidates.push(url.clone());
    } else {
        if !path.is_empty() {
            candidates.push(format!("{origin}/.well-known/oauth-protected-resource{path}"));
        }
        candidates.push(format!("{origin}/.well-known/oauth-protected-resource"));
    }
    for url in &candidates {
        let Some(metadata) = fetch::<ProtectedResource>(http, url, "protected-resource metadata").await?
        else {
            continue;
        };
        // RFC 9728 §3.3: the metadata must be about this server (or a part of its URL above it).
        let resource = metadata.resource.trim_end_matches('/');
        let same = server_url.trim_end_matches('/');
        if !(same == resource || same.starts_with(&format!("{resource}/"))) {
            return Err(AuthError::Metadata {
                url: url.clone(),
                why: format!("it describes the resource {resource}, not {server_url}"),
            });
        }
        if metadata.authorization_servers.is_empty() {
            return Err(AuthError::Metadata {
                url: url.clone(),
                why: "it names no authorization server".into(),
            });
        }
        return Ok(metadata);
    }
    Err(AuthError::Metadata {
        url: candidates.join(", "),
        why: "the server asks for a sign-in but publishes no protected-resource metadata".into(),
    })
}

/// The metadata of the authorization server `issuer`, from the first of the well-known URIs the
/// MCP specification lists that answers.
pub async fn authorization_server(http: &AuthHttp, issuer: &str) -> Result<AuthServer, AuthError> {
    let (origin, path) = split_url(issuer)?;
    let candidates = if path.is_empty() {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server"),
            format!("{origin}/.well-known/openid-configuration"),
        ]
    } else {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!("{origin}/.well-known/openid-configuration{path}"),
            format!("{origin}{path}/.well-known/openid-configuration"),
        ]
    };
    for url in &candidates {
        let Some(metadata) = fetch::<AuthServer>(http, url, "authorization server metadata").await? else {
            continue;
        };
        let bad = |why: String| AuthError::Metadata { url: url.clone(), why };
        if metadata.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(bad(format!("its issuer is {}, not {issuer}", metadata.issuer)));
        }
        for (name, endpoint) in [
            ("authorization_endpoint", &metadata.authorization_endpoint),
            ("token_endpoint", &metadata.token_endpoint),
        ] {
            if !secure_enough(endpoint) {
                return Err(bad(format!("its {name} {endpoint:?} is not an https URL")));
            }
        }
        if !metadata.code_challenge_methods_supported.iter().any(|m| m == "S256") {
            return Err(bad(
                "it does not list PKCE S256 in code_challenge_methods_supported, which MCP requires".into(),
            ));
        }
        return Ok(metadata);
    }
    Err(AuthError::Metadata {
        url: candidates.join(", "),
        why: "no authorization server metadata was found".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_in_their_usual_forms() {
        let c = parse_challenge(
            r#"Bearer resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp", scope="read write", error="invalid_token""#,
        );
        assert_eq!(
            c.resource_metadata.as_deref(),
            Some("https://mcp.example.com/.well-known/oauth-protected-resource/mcp")
        );
        assert_eq!(c.scope.as_deref(), Some("read write"));
        assert_eq!(c.error.as_deref(), Some("invalid_token"));
        let c = parse_challenge("bearer error=invalid_token,resource_metadata=https://x/y");
        assert_eq!(c.resource_metadata.as_deref(), Some("https://x/y"));
        assert_eq!(c.error.as_deref(), Some("invalid_token"));
        assert_eq!(parse_challenge("Bearer"), Challenge::default());
        assert_eq!(parse_challenge(r#"Bearer realm="a \"q\" b""#), Challenge::default());
    }

    #[test]
    fn only_https_or_this_machine_carries_oauth() {
        assert!(secure_enough("https://mcp.notion.com/mcp"));
        assert!(secure_enough("http://127.0.0.1:8080/token"));
        assert!(secure_enough("http://localhost/token"));
        assert!(!secure_enough("http://example.com/token"));
        assert!(!secure_enough("ftp://example.com"));
    }
}
