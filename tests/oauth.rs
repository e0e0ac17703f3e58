//! Signing in to a hosted upstream with OAuth, end to end: the built binary (stdio wrapper, sidecar,
//! `login`, `logout`) against the Notion simulator's own authorization server (`notion-sim --http
//! --oauth`), with `$BROWSER` a script that only fetches the sign-in URL (the simulator approves at
//! once). Every test keeps its tokens in a directory of its own (`MCP_ASYNCIFY_AUTH_DIR`).

mod common;

use common::{BIN, Peer, Served};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TASK_CLIENT: &str = r#"{"tasks":{"list":{},"cancel":{}}}"#;

/// A directory for one test: its token store (`auth/`) and its browsers.
struct Home {
    dir: PathBuf,
}

impl Home {
    fn new(name: &str) -> Home {
        let dir = common::scratch().join(format!("oauth-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The browser: fetch the URL and follow the redirect to our loopback listener, as a browser
        // would after the user approved. It records each URL it was given.
        let opened = dir.join("opened.txt");
        Self::script(
            &dir.join("browser.sh"),
            &format!(
                "echo \"$1\" >> '{}'\nexec curl -sS -L --max-time 10 -o /dev/null \"$1\"",
                opened.display()
            ),
        );
        // A browser that must never be opened.
        Self::script(&dir.join("no-browser.sh"), &format!("echo \"$1\" >> '{}'\nexit 1", opened.display()));
        Home { dir }
    }

    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn auth(&self) -> PathBuf {
        self.dir.join("auth")
    }

    /// The URLs the browsers were sent to.
    fn opened(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("opened.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `BIN args…` with this home's store and the fetching browser (or the one that must not run).
    fn command(&self, args: &[&str], browser: bool) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("MCP_ASYNCIFY_AUTH_DIR", self.auth())
            .env("BROWSER", self.dir.join(if browser { "browser.sh" } else { "no-browser.sh" }));
        c
    }

    /// Runs `BIN args…` to its end (bounded); its exit code and stderr.
    fn run(&self, args: &[&str], browser: bool) -> (i32, String) {
        let mut p = Peer::start_cmd(&mut self.command(args, browser));
        let status = p.wait_exit(Duration::from_secs(30));
        (status.code().unwrap_or(-1), p.stderr())
    }

    /// The one stored sign-in.
    fn stored(&self) -> (PathBuf, Value) {
        let files: Vec<PathBuf> = std::fs::read_dir(self.auth())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let v = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        (files[0].clone(), v)
    }
}

/// The Notion simulator over HTTP with OAuth on `/mcp`.
fn sim(extra: &[&str]) -> Served {
    let mut args =
        vec!["notion-sim", "--log-level", "error", "--http", "{addr}", "--oauth", "--rate-limit", "0"];
    args.extend_from_slice(extra);
    Served::start(&args)
}

/// What the simulator's authorization server counted.
fn stats(sim: &Served) -> Value {
    let r = common::http(&sim.addr, "GET", "/oauth-sim/stats", &[], b"");
    serde_json::from_str(&r.body).unwrap()
}

fn count(stats: &Value, what: &str) -> u64 {
    stats[what].as_u64().unwrap_or(0)
}

/// Revokes `token` at the simulator (RFC 7009), as a user would from the server's settings.
fn revoke(sim: &Server, token: &str) {
    let body = format!("token={token}");
    let r = common::http(
        &sim.addr,
        "POST",
        "/oauth/revoke",
        &["Content-Type: application/x-www-form-urlencoded"],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

type Server = Served;

fn initialize(p: &mut Peer) -> Value {
    p.call(
        0,
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": serde_json::from_str::<Value>(TASK_CLIENT).unwrap(), "clientInfo": {"name": "t", "version": "1"}}),
    )
}

#[test]
fn the_wrapper_signs_in_refreshes_mid_task_and_a_second_run_needs_no_browser() {
    let home = Home::new("wrapper");
    // Access tokens live 2 s; the Notion task takes 4 s: it outlives its first token.
    let sim = sim(&["--oauth-token-ttl-secs", "2", "--work-ms", "4000", "--suggested-backoff-ms", "300"]);
    let mut p =
        Peer::start_cmd(&mut home.command(&["--log-level", "warn", "--upstream-url", &sim.url], true));
    let r = initialize(&mut p);
    assert!(r["result"]["serverInfo"].is_object(), "{r}\n{}", p.stderr());
    p.notify("notifications/initialized", json!({}));

    // The sign-in: the URL on stderr, the browser sent there with PKCE S256 and the resource.
    let opened = home.opened();
    assert_eq!(opened.len(), 1, "{opened:?}");
    let url = &opened[0];
    assert!(p.stderr().contains(url.as_str()), "the URL is printed too: {}", p.stderr());
    assert!(url.contains("code_challenge_method=S256") && url.contains("code_challenge="), "{url}");
    let resource = format!("resource={}", sim.url.replace(':', "%3A").replace('/', "%2F"));
    assert!(url.contains(&resource), "{url}");
    let s = stats(&sim);
    assert_eq!((count(&s, "registrations"), count(&s, "code_exchanges")), (1, 1), "{s}");

    // A Notion task that outlives the access token: refreshed on the way, never refused.
    let r = p.ok(
        1,
        "tools/call",
        json!({"name": "notion-duplicate-page", "arguments": {"page_id": "roadmap"}, "task": {}}),
    );
    let task = r["task"]["taskId"].as_str().unwrap().to_owned();
    let r = p.ok(2, "tasks/result", json!({"taskId": task}));
    assert_eq!(r["structuredContent"]["page"]["duplicated_from"], "roadmap", "{r}");
    let s = stats(&sim);
    assert!(count(&s, "refreshes") >= 1, "{s}");
    assert_eq!(count(&s, "refused_refreshes"), 0, "{s}");

    // The store: one 0600 file in a 0700 directory, and no token in any log line.
    let (file, stored) = home.stored();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(home.auth()).unwrap().permissions().mode() & 0o777, 0o700);
    let access = stored["access_token"].as_str().unwrap();
    let refresh = stored["refresh_token"].as_str().unwrap();
    p.close_stdin();
    assert!(p.wait_exit(Duration::from_secs(15)).success(), "{}", p.stderr());
    let stderr = p.stderr();
    assert!(!stderr.contains(access) && !stderr.contains(refresh) && !stderr.contains("sim-rt-"), "{stderr}");

    // A second run: the stored sign-in, no browser, no new registration.
    let mut p =
        Peer::start_cmd(&mut home.command(&["--log-level", "warn", "--upstream-url", &sim.url], false));
    let r = initialize(&mut p);
    assert!(r["result"]["serverInfo"].is_object(), "{r}\n{}", p.stderr());
    p.notify("notifications/initialized", json!({}));
    let r = p.tool(3, "notion-search", json!({"query": "Road"}));
    assert!(r["result"]["isError"] != true && r["result"].is_object(), "{r}");
    assert_eq!(home.opened().len(), 1, "no browser the second time");
    let s = stats(&sim);
    assert_eq!((count(&s, "registrations"), count(&s, "authorizations")), (1, 1), "{s}");
}

#[test]
fn a_token_refused_mid_session_is_refreshed_and_the_rotated_refresh_token_is_kept() {
    let home = Home::new("refused");
    let sim = sim(&["--work-ms", "300"]);
    let (code, stderr) = home.run(&["login", &sim.url], true);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("signed in to"), "{stderr}");
    let (_, before) = home.stored();

    // --sign-in never: this run may refresh but must not open a browser.
    let mut p = Peer::start_cmd(
        &mut home.command(&["--log-level", "warn", "--upstream-url", &sim.url, "--sign-in", "never"], false),
    );
    assert!(initialize(&mut p)["result"].is_object(), "{}", p.stderr());
    p.notify("notifications/initialized", json!({}));
    // The server forgets the access token (revoked): the next request gets a 401, the proxy refreshes
    // and sends it again; the client sees only the answer.
    revoke(&sim, before["access_token"].as_str().unwrap());
    let r = p.tool(1, "notion-search", json!({"query": "Road"}));
    assert!(r["result"].is_object(), "{r}\n{}", p.stderr());
    let s = stats(&sim);
    assert_eq!(count(&s, "refreshes"), 1, "{s}");
    assert!(count(&s, "rejected_requests") >= 2, "the first 401, then the revoked token: {s}");
    let (_, after) = home.stored();
    assert_ne!(after["refresh_token"], before["refresh_token"], "the rotated refresh token is stored");
    assert_ne!(after["access_token"], before["access_token"]);
    assert!(home.opened().len() == 1, "only login opened a browser");

    // Headless: an Authorization header is used as it is, and OAuth stays off.
    let header = format!("Authorization: Bearer {}", after["access_token"].as_str().unwrap());
    std::fs::remove_dir_all(home.auth()).unwrap();
    let mut p = Peer::start_cmd(
        &mut home.command(&["--log-level", "warn", "--upstream-url", &sim.url, "--header", &header], false),
    );
    assert!(initialize(&mut p)["result"].is_object(), "{}", p.stderr());
    assert!(!home.auth().exists(), "nothing stored with a header");
}

#[test]
fn a_revoked_refresh_token_asks_to_sign_in_again_and_logout_forgets_the_sign_in() {
    let home = Home::new("revoked");
    let sim = sim(&[]);
    // Nothing stored, and no browser allowed: a clear error at once.
    let mut p = Peer::start_cmd(
        &mut home.command(&["--log-level", "error", "--upstream-url", &sim.url, "--sign-in", "never"], false),
    );
    let r = initialize(&mut p);
    let msg = r["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains(&format!("sign in again with `mcp-asyncify login {}`", sim.url)), "{r}");
    drop(p);

    let (code, stderr) = home.run(&["login", &sim.url], true);
    assert_eq!(code, 0, "{stderr}");
    let (_, stored) = home.stored();
    revoke(&sim, stored["refresh_token"].as_str().unwrap());
    revoke(&sim, stored["access_token"].as_str().unwrap());
    let started = std::time::Instant::now();
    let mut p = Peer::start_cmd(
        &mut home.command(&["--log-level", "error", "--upstream-url", &sim.url, "--sign-in", "never"], false),
    );
    let r = initialize(&mut p);
    let msg = r["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("expired or was revoked") && msg.contains("invalid_grant"), "{r}");
    assert!(msg.contains(&format!("sign in again with `mcp-asyncify login {}`", sim.url)), "{r}");
    assert!(started.elapsed() < Duration::from_secs(10), "no hang: {:?}", started.elapsed());
    // Asked again, the same advice (the dead tokens are not tried twice).
    let r = initialize(&mut p);
    let msg = r["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains(&format!("sign in again with `mcp-asyncify login {}`", sim.url)), "{r}");
    assert_eq!(count(&stats(&sim), "refused_refreshes"), 1);
    assert_eq!(home.opened().len(), 1, "only login opened a browser");
    drop(p);

    // Logging out revokes what is left and removes the file; a second logout has nothing to do.
    let (code, stderr) = home.run(&["logout", &sim.url], false);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("signed out of"), "{stderr}");
    assert_eq!(std::fs::read_dir(home.auth()).unwrap().count(), 0);
    let (code, stderr) = home.run(&["logout", &sim.url], false);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("no sign-in"), "{stderr}");
}

#[test]
fn a_broken_authorization_server_gets_a_clear_error() {
    for (fault, needle) in [
        ("bad-metadata", "the authorization server metadata is not valid"),
        ("wrong-state", "state does not match"),
        ("token-error", "the token endpoint answered invalid_request: the simulator was told to refuse"),
    ] {
        let home = Home::new(fault);
        let sim = sim(&["--oauth-fault", fault]);
        let (code, stderr) = home.run(&["login", &sim.url], true);
        assert_eq!(code, 1, "{fault}: {stderr}");
        assert!(stderr.contains(needle), "{fault}: {stderr}");
        assert!(!home.auth().exists() || home.stored().1["access_token"].is_null(), "{fault}: no token kept");
    }
    // Metadata found at the well-known URI when the challenge does not name it.
    let home = Home::new("no-resource-metadata");
    let sim = sim(&["--oauth-fault", "no-resource-metadata"]);
    let (code, stderr) = home.run(&["login", &sim.url], true);
    assert_eq!(code, 0, "{stderr}");
    // A server that asks for nothing: nothing to do.
    let open = Served::start(&["notion-sim", "--log-level", "error", "--http", "{addr}"]);
    let (code, stderr) = home.run(&["login", &open.url], true);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("without a sign-in"), "{stderr}");
    let (code, stderr) = home.run(&["login"], true);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("needs the server's URL"), "{stderr}");
}

#[test]
fn a_client_id_metadata_document_replaces_registration_where_the_server_supports_it() {
    use std::io::{Read, Write};
    // The document, served from this machine (a real one would be https): it names itself.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let doc_url = format!("http://{}/mcp-asyncify.json", listener.local_addr().unwrap());
    let doc = json!({
        "client_id": doc_url, "client_name": "mcp-asyncify", "redirect_uris": ["http://127.0.0.1/callback"],
        "grant_types": ["authorization_code", "refresh_token"], "token_endpoint_auth_method": "none",
    })
    .to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = conn.read(&mut [0u8; 4096]);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
                doc.len()
            );
        }
    });
    let home = Home::new("cimd");
    let config =
        common::config_file("oauth-cimd", &format!("[upstream_auth]\nclient_metadata_url = \"{doc_url}\"\n"));
    let sim = sim(&[]);
    let (code, stderr) = home.run(&["--config", config.to_str().unwrap(), "login", &sim.url], true);
    assert_eq!(code, 0, "{stderr}");
    let s = stats(&sim);
    assert_eq!(
        (count(&s, "registrations"), count(&s, "metadata_documents"), count(&s, "code_exchanges")),
        (0, 1, 1),
        "{s}"
    );
    assert_eq!(home.stored().1["client_id"], doc_url.as_str());
    // The stored sign-in works.
    let mut p =
        Peer::start_cmd(&mut home.command(&["--log-level", "warn", "--upstream-url", &sim.url], false));
    assert!(initialize(&mut p)["result"].is_object(), "{}", p.stderr());
}

#[test]
fn the_sidecar_uses_its_own_sign_in_and_never_forwards_a_clients_token() {
    let home = Home::new("sidecar");
    let sim = sim(&["--work-ms", "300"]);
    let auth = home.auth();
    let env = [("MCP_ASYNCIFY_AUTH_DIR", auth.to_str().unwrap()), ("BROWSER", "false")];
    let sidecar = Served::start_with_env(
        &["serve", "--listen", "{addr}", "--log-level", "error", "--upstream-url", &sim.url],
        &env,
    );
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let post = |auth: &str, body: &Value| {
        common::http(
            &sidecar.addr,
            "POST",
            "/mcp",
            &["Content-Type: application/json", "Accept: application/json, text/event-stream", auth],
            body.to_string().as_bytes(),
        )
    };
    // Not signed in: the sidecar opens no browser, and says how to sign in (not a 401 the client
    // would take as its own to solve).
    let r = post("Authorization: Bearer client-token", &init);
    assert_ne!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("mcp-asyncify login"), "{}", r.body);

    let (code, stderr) = home.run(&["login", &sim.url], true);
    assert_eq!(code, 0, "{stderr}");
    // Signed in: a client's own token (which the simulator would refuse) stays with the sidecar.
    let r = post("Authorization: Bearer client-token", &init);
    assert_eq!(r.status, 200, "{}", r.body);
    let messages = r.messages();
    assert!(messages[0]["result"]["serverInfo"].is_object(), "{}", r.body);
    let s = stats(&sim);
    assert_eq!(count(&s, "registrations"), 1, "{s}");
}
