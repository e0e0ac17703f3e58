//! The life of a sign-in's tokens: the `Authorization` of every request, renewed before it
//! expires and when the upstream refuses it (a refresh, or a new sign-in), kept in the store.

use super::discovery::{self, Challenge};
use super::http::AuthHttp;
use super::sign_in_flow::{keep_tokens, now_ms, oauth2_client, sign_in, token_error};
use super::store::SignIn;
use super::{AuthError, OAuthOptions};
use ::http::HeaderValue;
use oauth2::RefreshToken;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_renewed_a_minute_early_or_a_quarter_of_a_short_life_early() {
        assert_eq!(renew_at(0, Some(3_600_000)), 3_540_000);
        assert_eq!(renew_at(1000, Some(3000)), 2500);
        assert_eq!(renew_at(0, None), u64::MAX);
    }
}
