//! The upstream as a child process speaking MCP over its stdin/stdout.
//!
//! The child inherits our environment, working directory and stderr. It runs in its own process
//! group so that shutdown reaches whatever it spawned (`npx` starts `node`, which may start more), and
//! on Linux it is told to die with us, so that even a `kill -9` of the proxy leaves no orphan.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A running upstream server process.
pub struct UpstreamProcess {
    child: Child,
    pid: Option<u32>,
    description: String,
}

/// Why the upstream could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the upstream server `{command}`: {source}")]
pub struct SpawnError {
    command: String,
    source: std::io::Error,
}

impl UpstreamProcess {
    /// Spawns `command args…` with piped stdin/stdout and inherited stderr.
    pub fn spawn(command: &[String]) -> Result<(UpstreamProcess, ChildStdin, ChildStdout), SpawnError> {
        let description = command.join(" ");
        let (program, args) = command.split_first().ok_or_else(|| SpawnError {
            command: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| SpawnError { command: description.clone(), source })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let pid = child.id();
        Ok((UpstreamProcess { child, pid, description }, stdin, stdout))
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The command line, for logs.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Waits up to `grace` for a voluntary exit, then SIGTERMs the process group, then SIGKILLs it
    /// after `grace` again. Returns the exit status and whether the child had to be signalled.
    pub async fn terminate(&mut self, grace: Duration) -> (std::io::Result<ExitStatus>, bool) {
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            self.signal_group(libc::SIGTERM); // reap whatever the child left behind in its group
            return (status, false);
        }
        tracing::info!(upstream = %self.description, grace_ms = grace.as_millis() as u64, "upstream still running after the grace period; sending SIGTERM");
        self.signal_group(libc::SIGTERM);
        if let Ok(status) =
            tokio::time::timeout(grace.max(Duration::from_millis(100)), self.child.wait()).await
        {
            return (status, true);
        }
        tracing::warn!(upstream = %self.description, "upstream ignored SIGTERM; sending SIGKILL");
        self.signal_group(libc::SIGKILL);
        (self.child.wait().await, true)
    }

    /// Signals the child's whole process group (the child leads it).
    pub fn signal_group(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
            unsafe {
                libc::kill(-(pid as libc::pid_t), signal);
            }
        }
    }
}

impl Drop for UpstreamProcess {
    fn drop(&mut self) {
        // Whatever path we leave by, nothing of the upstream's group outlives us.
        self.signal_group(libc::SIGKILL);
    }
}

/// The exit code the proxy should use for an upstream exit status: the same code, or 128 + signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}

/// Describes an exit status for people: "exit status 3" or "killed by signal 9 (SIGKILL)".
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        _ => "unknown exit status".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// Our own stdin as an async reader. A pipe or a socket (what MCP hosts give a stdio server) is read
/// through the runtime's event loop; anything else (a terminal, a file) through tokio's blocking
/// reader. The event loop saves a thread hand-off per message, which is most of the proxy's latency.
pub fn client_input() -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    match own_fd(libc::STDIN_FILENO) {
        Some(Fd::Pipe(f)) => match tokio::net::unix::pipe::Receiver::from_file(f) {
            Ok(r) => return Box::new(r),
            Err(e) => tracing::debug!(error = %e, "stdin: falling back to the blocking reader"),
        },
        Some(Fd::Socket(s)) => match tokio::net::UnixStream::from_std(s) {
            Ok(s) => return Box::new(s),
            Err(e) => tracing::debug!(error = %e, "stdin: falling back to the blocking reader"),
        },
        None => {}
    }
    Box::new(tokio::io::stdin())
}

/// Our own stdout as an async writer (see [`client_input`]).
pub fn client_output() -> Box<dyn tokio::io::AsyncWrite + Unpin + Send> {
    match own_fd(libc::STDOUT_FILENO) {
        Some(Fd::Pipe(f)) => match tokio::net::unix::pipe::Sender::from_file(f) {
            Ok(w) => return Box::new(w),
            Err(e) => tracing::debug!(error = %e, "stdout: falling back to the blocking writer"),
        },
        Some(Fd::Socket(s)) => match tokio::net::UnixStream::from_std(s) {
            Ok(s) => return Box::new(s),
            Err(e) => tracing::debug!(error = %e, "stdout: falling back to the blocking writer"),
        },
        None => {}
    }
    Box::new(tokio::io::stdout())
}

enum Fd {
    Pipe(std::fs::File),
    Socket(std::os::unix::net::UnixStream),
}

/// A duplicate of `fd` if it is a pipe or a Unix socket (non-blocking, as the event loop needs).
fn own_fd(fd: i32) -> Option<Fd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: fstat only writes into the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: dup returns a new descriptor we own (or -1).
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a valid descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    if kind == libc::S_IFIFO {
        return Some(Fd::Pipe(std::fs::File::from(owned)));
    }
    let sock = std::os::unix::net::UnixStream::from(owned);
    sock.set_nonblocking(true).ok()?;
    Some(Fd::Socket(sock))
}
