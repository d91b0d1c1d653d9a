//! Running commands: [`ExecRequest`] in, [`ExecEvent`]s or a collected [`ExecOutput`] out.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Most argv entries in one request.
pub const MAX_ARGV: usize = 4096;
/// Most bytes of argv, env, cwd and user together in one request (256 KiB).
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// Most bytes of stdin sent with one request (512 KiB); it travels inside the `Exec` frame.
pub const MAX_STDIN_BYTES: usize = 512 * 1024;
/// Most bytes of stdout and of stderr that a collected [`ExecOutput`] keeps (64 MiB each); more
/// is counted and dropped, and the `*_truncated` flag is set. Streams are not capped.
pub const MAX_COLLECTED_OUTPUT_BYTES: usize = 64 * 1024 * 1024;
/// Largest stdout/stderr chunk the agent sends in one frame (64 KiB).
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 64 * 1024;
/// Default capacity, in events, of the bounded buffer behind an [`ExecStream`](crate::ExecStream).
/// With 64 KiB chunks this bounds buffered output at 4 MiB per command.
pub const DEFAULT_EXEC_BUFFER: usize = 64;
/// Longest exec timeout accepted (24 h).
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Result of request validation.
pub type Result<T> = std::result::Result<T, ExecError>;

/// Why an [`ExecRequest`] was refused before being sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// argv is empty or its first entry is empty.
    #[error("argv must have a non-empty first entry.")]
    EmptyArgv,
    /// A string field contains a NUL byte, which the guest's `execve` cannot carry.
    #[error("{field} contains a NUL byte.")]
    Nul {
        /// Which field.
        field: &'static str,
    },
    /// An environment variable name is empty or contains `=`.
    #[error("Environment variable name {name:?} is empty or contains '='.")]
    EnvName {
        /// The name (possibly truncated).
        name: String,
    },
    /// The command (argv, env, cwd, user) or stdin is larger than its cap.
    #[error("{what} is {got} bytes, over the {max}-byte cap.")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size in bytes (or entries for argv).
        got: usize,
        /// The cap.
        max: usize,
    },
    /// The timeout is zero or above [`MAX_EXEC_TIMEOUT`].
    #[error("The timeout must be between 1 ms and 24 h.")]
    Timeout,
}

impl From<ExecError> for crate::Error {
    fn from(e: ExecError) -> Self {
        let kind = match e {
            ExecError::TooLarge { .. } => crate::ErrorKind::TooLarge,
            _ => crate::ErrorKind::InvalidRequest,
        };
        // The specific reason is the message (the kind already says "invalid request").
        crate::Error::new(kind, e.to_string())
    }
}

/// One command to run in the guest.
///
/// The command is executed directly (no shell): wrap it as `["sh", "-c", "..."]` for shell syntax.
/// It runs in its own process group; on timeout the whole group gets `SIGKILL`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment, on top of the agent's base (`PATH`, `HOME`, `TERM`...) and the spec's.
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` means `/` (or the user's home when `user` is set).
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, after which stdin is closed.
    pub stdin: Bytes,
    /// Wall-clock limit; on expiry the process group is killed and `timed_out` is set.
    pub timeout: Option<Duration>,
    /// User name or numeric uid to run as; `None` runs as the agent's user (root in a guest).
    pub user: Option<String>,
}

impl ExecRequest {
    /// A request for `argv` with empty stdin, no timeout and the default user.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: Bytes::new(),
            timeout: None,
            user: None,
        }
    }

    /// `["sh", "-c", script]`.
    pub fn shell(script: impl Into<String>) -> Self {
        ExecRequest::new(["sh".to_owned(), "-c".to_owned(), script.into()])
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }
    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }
    /// Sets stdin (at most [`MAX_STDIN_BYTES`]).
    pub fn stdin(mut self, data: impl Into<Bytes>) -> Self {
        self.stdin = data.into();
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Runs as this user (name or numeric uid).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Checks the request against the caps and the guest's `execve` rules.
    ///
    /// # Errors
    /// An [`ExecError`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        if self.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(ExecError::EmptyArgv);
        }
        if self.argv.len() > MAX_ARGV {
            return Err(ExecError::TooLarge {
                what: "argv",
                got: self.argv.len(),
                max: MAX_ARGV,
            });
        }
        let mut total = 0usize;
        for a in &self.argv {
            if a.contains('\0') {
                return Err(ExecError::Nul { field: "argv" });
            }
            total = total.saturating_add(a.len() + 1);
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') {
                return Err(ExecError::EnvName {
                    name: k.chars().take(64).collect(),
                });
            }
            if k.contains('\0') || v.contains('\0') {
                return Err(ExecError::Nul { field: "env" });
            }
            total = total.saturating_add(k.len() + v.len() + 2);
        }
        for (field, s) in [("cwd", &self.cwd), ("user", &self.user)] {
            if let Some(s) = s {
                if s.contains('\0') {
                    return Err(ExecError::Nul { field });
                }
                total = total.saturating_add(s.len());
            }
        }
        if total > MAX_COMMAND_BYTES {
            return Err(ExecError::TooLarge {
                what: "the command",
                got: total,
                max: MAX_COMMAND_BYTES,
            });
        }
        if self.stdin.len() > MAX_STDIN_BYTES {
            return Err(ExecError::TooLarge {
                what: "stdin",
                got: self.stdin.len(),
                max: MAX_STDIN_BYTES,
            });
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > MAX_EXEC_TIMEOUT {
                return Err(ExecError::Timeout);
            }
        }
        Ok(())
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExitStatus {
    /// Exit code when it exited normally. 127: command not found; 126: found but not runnable.
    pub code: Option<i32>,
    /// Signal number when a signal killed it (9 after a timeout).
    pub signal: Option<i32>,
    /// The agent killed the process group because the timeout expired.
    pub timed_out: bool,
    /// The guest kernel's OOM killer ended it: it died of `SIGKILL`, or exited with 137 (a
    /// shell's report of a child killed by `SIGKILL`), while the guest's `oom_kill` count
    /// (`/proc/vmstat`) grew. The guest ran out of memory (its RAM is the spec's
    /// `memory_mib`). When commands run concurrently, one that was `SIGKILL`ed for another
    /// reason during another's OOM kill may be marked too.
    pub oom_killed: bool,
    /// From spawn to reaping the process, measured in the guest.
    pub duration: Duration,
}

impl ExitStatus {
    /// Normal exit with `code`.
    pub fn exited(code: i32, duration: Duration) -> Self {
        ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
            oom_killed: false,
            duration,
        }
    }
    /// Killed by `signal`.
    pub fn signaled(signal: i32, timed_out: bool, duration: Duration) -> Self {
        ExitStatus {
            code: None,
            signal: Some(signal),
            timed_out,
            oom_killed: false,
            duration,
        }
    }
    /// Exited with code 0 and did not time out.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// One event of a running command. Stdout chunks are in order among themselves, as are stderr
/// chunks; `Exit` is always last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout (at most [`MAX_OUTPUT_CHUNK_BYTES`] per event).
    Stdout(Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(Bytes),
    /// The command ended; no more events follow.
    Exit(ExitStatus),
}

/// A finished command with its output collected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Stdout, at most [`MAX_COLLECTED_OUTPUT_BYTES`].
    pub stdout: Vec<u8>,
    /// Stderr, at most [`MAX_COLLECTED_OUTPUT_BYTES`].
    pub stderr: Vec<u8>,
    /// Stdout went over the cap; the tail was dropped.
    pub stdout_truncated: bool,
    /// Stderr went over the cap; the tail was dropped.
    pub stderr_truncated: bool,
}

impl ExecOutput {
    /// Stdout as UTF-8, lossily.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Stderr as UTF-8, lossily.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Folds [`ExecEvent`]s into an [`ExecOutput`], applying [`MAX_COLLECTED_OUTPUT_BYTES`].
#[derive(Debug, Default)]
pub struct OutputCollector {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    status: Option<ExitStatus>,
}

impl OutputCollector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one event.
    pub fn push(&mut self, event: ExecEvent) {
        fn append(buf: &mut Vec<u8>, truncated: &mut bool, data: &[u8]) {
            let room = MAX_COLLECTED_OUTPUT_BYTES.saturating_sub(buf.len());
            if data.len() > room {
                *truncated = true;
            }
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
        match event {
            ExecEvent::Stdout(b) => append(&mut self.stdout, &mut self.stdout_truncated, &b),
            ExecEvent::Stderr(b) => append(&mut self.stderr, &mut self.stderr_truncated, &b),
            ExecEvent::Exit(s) => self.status = Some(s),
        }
    }

    /// The output, or `None` if no `Exit` event was pushed.
    pub fn finish(self) -> Option<ExecOutput> {
        Some(ExecOutput {
            status: self.status?,
            stdout: self.stdout,
            stderr: self.stderr,
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_bad_requests() {
        assert_eq!(
            ExecRequest::new(Vec::<String>::new()).validate(),
            Err(ExecError::EmptyArgv)
        );
        assert_eq!(ExecRequest::new([""]).validate(), Err(ExecError::EmptyArgv));
        assert_eq!(
            ExecRequest::new(["a\0b"]).validate(),
            Err(ExecError::Nul { field: "argv" })
        );
        assert!(matches!(
            ExecRequest::new(["x"]).env("A=B", "1").validate(),
            Err(ExecError::EnvName { .. })
        ));
        assert!(matches!(
            ExecRequest::new(["x"])
                .stdin(vec![0u8; MAX_STDIN_BYTES + 1])
                .validate(),
            Err(ExecError::TooLarge { what: "stdin", .. })
        ));
        assert_eq!(
            ExecRequest::new(["x"]).timeout(Duration::ZERO).validate(),
            Err(ExecError::Timeout)
        );
        assert_eq!(
            ExecRequest::shell("true").cwd("/").user("0").validate(),
            Ok(())
        );
    }

    #[test]
    fn collector_caps_and_flags() {
        let mut c = OutputCollector::new();
        c.push(ExecEvent::Stdout(Bytes::from(vec![
            1u8;
            MAX_COLLECTED_OUTPUT_BYTES
                - 1
        ])));
        c.push(ExecEvent::Stdout(Bytes::from_static(b"ab")));
        c.push(ExecEvent::Stderr(Bytes::from_static(b"e")));
        assert!(OutputCollector::new().finish().is_none());
        c.push(ExecEvent::Exit(ExitStatus::exited(0, Duration::ZERO)));
        let out = c.finish().expect("has exit");
        assert_eq!(out.stdout.len(), MAX_COLLECTED_OUTPUT_BYTES);
        assert_eq!(out.stdout.last(), Some(&b'a'));
        assert!(out.stdout_truncated && !out.stderr_truncated);
        assert_eq!(out.stderr, b"e");
    }
}
