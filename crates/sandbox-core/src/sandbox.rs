//! The `Runtime` and `Sandbox` traits every backend implements, and the bounded [`ExecStream`].

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::exec::{ExecEvent, ExecOutput, ExecRequest, OutputCollector};
use crate::file::{FileOptions, Listing};
use crate::spec::SandboxSpec;
use crate::state::SandboxState;

/// A sandbox's id, unique within its runtime (backends pick the format).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// An id.
    pub fn new(id: impl Into<String>) -> Self {
        SandboxId(id.into())
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Creates sandboxes. One per process is typical; it is shared across tasks.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// Boots a sandbox for `spec` and returns once its agent has answered the handshake.
    ///
    /// # Errors
    /// [`ErrorKind::HostSetup`] (naming the fix) when the host cannot run sandboxes,
    /// [`ErrorKind::AgentUnreachable`] when the agent does not answer before the backend's
    /// deadline, [`ErrorKind::GuestExited`] when the guest dies while booting.
    async fn create(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>>;
}

/// One live sandbox. All methods take `&self`: a sandbox may be used from several tasks at once
/// (backends open one agent connection per concurrent call).
///
/// Every operation but `id`/`state`/`destroy` needs [`SandboxState::Running`] and otherwise fails
/// with [`ErrorKind::InvalidState`].
#[async_trait]
pub trait Sandbox: Send + Sync + fmt::Debug {
    /// The sandbox's id.
    fn id(&self) -> &crate::SandboxId;

    /// The current lifecycle state.
    fn state(&self) -> SandboxState;

    /// Starts a command and returns its events as they come, through a bounded buffer: a slow
    /// reader slows the command down instead of growing memory. Dropping the stream kills the
    /// command's process group.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidRequest`]/[`ErrorKind::TooLarge`] for a bad request; connection
    /// failures as [`ErrorKind::AgentUnreachable`], [`ErrorKind::GuestExited`] or
    /// [`ErrorKind::Protocol`]. A command that fails or times out is *not* an error: see
    /// [`ExitStatus`](crate::ExitStatus).
    async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream>;

    /// Runs a command to completion and collects its output (each stream capped at
    /// [`MAX_COLLECTED_OUTPUT_BYTES`](crate::exec::MAX_COLLECTED_OUTPUT_BYTES)).
    ///
    /// # Errors
    /// As [`Sandbox::exec_stream`].
    async fn exec(&self, req: ExecRequest) -> Result<ExecOutput> {
        self.exec_stream(req).await?.collect().await
    }

    /// Writes `data` to `path`, at most [`MAX_FILE_BYTES`](crate::file::MAX_FILE_BYTES).
    ///
    /// The file is replaced atomically: the data goes to a temporary file in the same directory
    /// which is renamed over `path` once complete, so an interrupted write leaves the old
    /// content (docs/agent.md). An existing file keeps its mode; a new one gets the requested
    /// mode.
    ///
    /// # Errors
    /// [`ErrorKind::TooLarge`], [`ErrorKind::NotFound`] (missing parent without
    /// `create_parents`), [`ErrorKind::PermissionDenied`] (including escapes from a confined
    /// root), [`ErrorKind::InvalidRequest`] (including a FIFO, socket, device or directory at
    /// `path`, refused before anything is opened), connection errors.
    async fn write_file(&self, path: &str, data: &[u8], opts: &FileOptions) -> Result<()>;

    /// Reads the whole file at `path`, at most [`MAX_FILE_BYTES`](crate::file::MAX_FILE_BYTES).
    ///
    /// # Errors
    /// As [`Sandbox::write_file`]; a larger file is [`ErrorKind::TooLarge`].
    async fn read_file(&self, path: &str, opts: &FileOptions) -> Result<Vec<u8>>;

    /// Removes a file, a symlink (not its target) or an empty directory.
    ///
    /// # Errors
    /// As [`Sandbox::write_file`].
    async fn remove(&self, path: &str, opts: &FileOptions) -> Result<()>;

    /// Lists a directory (at most [`MAX_LIST_ENTRIES`](crate::file::MAX_LIST_ENTRIES) entries).
    ///
    /// # Errors
    /// As [`Sandbox::write_file`].
    async fn list(&self, path: &str, opts: &FileOptions) -> Result<Listing>;

    /// Stops the sandbox and releases everything it holds (processes, files, sockets). Calling it
    /// again after success returns `Ok(())`.
    ///
    /// # Errors
    /// Cleanup failures; the sandbox is then [`SandboxState::Failed`] and `destroy` may be retried.
    async fn destroy(&self) -> Result<()>;
}

/// The sending half of an [`ExecStream`], for backends.
pub type ExecEventSender = mpsc::Sender<Result<ExecEvent>>;

/// A bounded channel for one command's events: the backend sends, the caller receives.
pub fn exec_channel(capacity: usize) -> (ExecEventSender, ExecStream) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        tx,
        ExecStream {
            rx,
            finished: false,
        },
    )
}

/// The events of one running command, in order, ending with [`ExecEvent::Exit`] (or an error).
#[derive(Debug)]
pub struct ExecStream {
    rx: mpsc::Receiver<Result<ExecEvent>>,
    finished: bool,
}

impl ExecStream {
    /// The next event; `None` after `Exit` or after an error was returned.
    ///
    /// If the backend goes away before sending `Exit`, this returns one
    /// [`ErrorKind::AgentUnreachable`] error.
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        if self.finished {
            return None;
        }
        let ev = match self.rx.recv().await {
            Some(ev) => ev,
            None => Err(Error::new(
                ErrorKind::AgentUnreachable,
                "The command's event stream ended before its exit status.",
            )),
        };
        if matches!(ev, Ok(ExecEvent::Exit(_)) | Err(_)) {
            self.finished = true;
        }
        Some(ev)
    }

    /// Reads every remaining event and collects the output.
    ///
    /// # Errors
    /// The first error the stream yields.
    pub async fn collect(mut self) -> Result<ExecOutput> {
        let mut c = OutputCollector::new();
        while let Some(ev) = self.next().await {
            c.push(ev?);
        }
        c.finish().ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                "The exec stream finished without an exit status.",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::ExitStatus;

    #[tokio::test]
    async fn stream_collects_in_order_and_stops_after_exit() {
        let (tx, mut s) = exec_channel(4);
        tokio::spawn(async move {
            for ev in [
                ExecEvent::Stdout(Bytes::from_static(b"a")),
                ExecEvent::Stderr(Bytes::from_static(b"x")),
                ExecEvent::Stdout(Bytes::from_static(b"b")),
                ExecEvent::Exit(ExitStatus::exited(3, Duration::ZERO)),
            ] {
                tx.send(Ok(ev)).await.expect("receiver alive");
            }
        });
        assert_eq!(
            s.next().await.map(|r| r.ok()),
            Some(Some(ExecEvent::Stdout(Bytes::from_static(b"a"))))
        );
        let out = s.collect().await.expect("collects");
        assert_eq!(
            (
                out.stdout.as_slice(),
                out.stderr.as_slice(),
                out.status.code
            ),
            (&b"b"[..], &b"x"[..], Some(3))
        );
    }

    #[tokio::test]
    async fn stream_without_exit_is_an_error() {
        let (tx, s) = exec_channel(1);
        drop(tx);
        let err = s.collect().await.expect_err("no exit");
        assert_eq!(err.kind(), ErrorKind::AgentUnreachable);
    }
}
