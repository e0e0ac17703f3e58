//! The browser's way back: a one-shot HTTP listener on 127.0.0.1 that takes the authorization
//! server's redirect (RFC 8252 §7.3), and the opener that sends the browser to the sign-in page.

use super::AuthError;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The path the redirect comes back to.
pub const CALLBACK_PATH: &str = "/callback";

/// What the redirect carried.
#[derive(Debug, Default)]
pub struct Redirect {
    /// The query's parameters.
    pub params: HashMap<String, String>,
}

/// A listener bound and waiting for the redirect.
pub struct Loopback {
    listener: TcpListener,
    /// `http://127.0.0.1:PORT/callback`.
    pub redirect_uri: String,
    /// The port.
    pub port: u16,
}

impl Loopback {
    /// Binds 127.0.0.1 on `port` (0: any free one).
    pub async fn bind(port: u16) -> std::io::Result<Loopback> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        Ok(Loopback { listener, redirect_uri: format!("http://127.0.0.1:{port}{CALLBACK_PATH}"), port })
    }

    /// Waits (at most `timeout`) for the redirect to the callback path, answering the browser with a
    /// page that says whether to go on; other paths (a favicon) get 404.
    pub async fn wait(self, timeout: Duration, server: &str) -> Result<Redirect, AuthError> {
        let (tx, rx) = oneshot::channel::<Redirect>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let server = Arc::new(server.to_owned());
        let accept = async {
            loop {
                let Ok((stream, _)) = self.listener.accept().await else {
                    // Out of descriptors, say: wait a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let tx = tx.clone();
                let server = server.clone();
                let service =
                    hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        let server = server.clone();
                        async move {
                            if request.uri().path() != CALLBACK_PATH {
                                return Ok::<_, std::convert::Infallible>(page(
                                    StatusCode::NOT_FOUND,
                                    "Not found.",
                                ));
                            }
                            let params = parse_query(request.uri().query().unwrap_or(""));
                            let text = match params.get("error") {
                                Some(e) => format!(
                                    "The sign-in to {server} was refused ({e}). You can close this tab."
                                ),
                                None => format!(
                                    "Signed in to {server}. You can close this tab and return to your app."
                                ),
                            };
                            if let Some(tx) = tx.lock().expect("not poisoned").take() {
                                let _ = tx.send(Redirect { params });
                            }
                            Ok(page(StatusCode::OK, &text))
                        }
                    });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        };
        tokio::select! {
            redirect = rx => redirect.map_err(|_| AuthError::SignInTimedOut { secs: timeout.as_secs() }),
            _ = accept => unreachable!("the accept loop never ends"),
            _ = tokio::time::sleep(timeout) => Err(AuthError::SignInTimedOut { secs: timeout.as_secs() }),
        }
    }
}

fn page(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let escaped = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>mcp-asyncify</title><p style=\"font:16px sans-serif;margin:3em\">{escaped}</p>"
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

/// `a=1&b=x%20y` as a map (later duplicates win).
pub fn parse_query(query: &str) -> HashMap<String, String> {
    url_pairs(query).collect()
}

fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    oauth2::url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// Sends the user's browser to `url`: `$BROWSER` when set (a command, `%s` standing for the URL, or
/// the URL appended), else `open` (macOS) or `xdg-open`. Its output never reaches our stdout, which
/// carries JSON-RPC. Not waited for.
pub fn open_browser(url: &str) -> Result<(), String> {
    let mut command = match std::env::var("BROWSER").ok().filter(|b| !b.trim().is_empty()) {
        Some(browser) => {
            // `$BROWSER` may list several, separated by ':'; the first is used. The URL goes in as
            // "$1", so the shell never reads it as code.
            let first = browser.split(':').next().unwrap_or(&browser).trim().to_owned();
            let script =
                if first.contains("%s") { first.replace("%s", "\"$1\"") } else { format!("{first} \"$1\"") };
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(script).arg("mcp-asyncify-browser").arg(url);
            c
        }
        None => {
            let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
            let mut c = tokio::process::Command::new(opener);
            c.arg(url);
            c
        }
    };
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}
