//! One host connection: handshake, a reader thread that turns frames into [`Event`]s, and a worker
//! (the connection's own thread) that serves one request at a time.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use sandbox_core::protocol::{
    blocking, AgentError, AgentErrorKind, AgentFrame, AgentInfo, AgentMessage, Hello, HostFrame,
    HostMessage, ProtocolError, Role,
};

use crate::reaper::Reaper;
use crate::{exec, files, Agent};

/// How long a new connection may take to send its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection's worker waits for.
#[derive(Debug)]
pub enum Event {
    /// A frame from the host.
    Frame(HostFrame),
    /// The host closed the connection (`None`) or broke the protocol.
    Closed(Option<ProtocolError>),
    /// A registered command was reaped.
    Exited(WaitStatus),
    /// An output pump of exec `id` reached end of file.
    PipeDone(u64),
}

/// A connected stream. Vsock fds are wrapped in `UnixStream` too: the agent only uses
/// `read`/`write`/`shutdown`/`SO_RCVTIMEO` on it, which behave the same for any stream socket.
pub type Stream = UnixStream;

/// The write half, shared by the worker and the output pumps of the running command.
#[derive(Debug)]
pub struct Writer {
    inner: Mutex<WriterState>,
    /// Another handle on the same socket, outside the lock: shutting down must not wait for a
    /// pump blocked in a write (it unblocks that write instead).
    control: Stream,
}

#[derive(Debug)]
struct WriterState {
    stream: Stream,
    /// The exec whose output may still be sent; pumps of finished execs are silenced.
    open_exec: Option<u64>,
    failed: bool,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one frame. Failures are remembered; the reader thread notices the closed stream.
    pub fn send(&self, id: u64, body: AgentMessage) {
        let mut w = self.lock();
        Self::write(&mut w, id, body);
    }

    fn write(w: &mut WriterState, id: u64, body: AgentMessage) {
        if w.failed {
            return;
        }
        if let Err(e) = blocking::write_frame(&mut w.stream, &AgentFrame { id, body }) {
            crate::debug!("write failed: {e}");
            w.failed = true;
        }
    }

    /// Sends a request failure.
    pub fn error(&self, id: u64, kind: AgentErrorKind, message: impl Into<String>) {
        self.send(id, AgentMessage::Error(AgentError::new(kind, message)));
    }

    /// Allows output frames of exec `id` (`None`: of no exec).
    pub fn set_open_exec(&self, id: Option<u64>) {
        self.lock().open_exec = id;
    }

    /// Sends output of exec `id`, unless that exec already reported its exit.
    pub fn send_output(&self, id: u64, body: AgentMessage) {
        let mut w = self.lock();
        if w.open_exec == Some(id) {
            Self::write(&mut w, id, body);
        }
    }

    fn shutdown(&self) {
        let _ = self.control.shutdown(std::net::Shutdown::Both);
    }
}

/// What a worker needs.
pub struct Ctx {
    /// Agent-wide state.
    pub agent: Arc<Agent>,
    /// The reaper to register commands with.
    pub reaper: Arc<Reaper>,
    /// Frames out.
    pub writer: Arc<Writer>,
    /// Events in.
    pub rx: Receiver<Event>,
    /// A sender for this connection's events (for the reaper and pumps).
    pub tx: Sender<Event>,
}

/// Whether the worker goes on after a request.
pub enum Next {
    /// Serve the next request.
    Continue,
    /// Close the connection.
    Close,
}

/// Serves one connection until it closes. Runs on its own thread.
pub fn serve(agent: Arc<Agent>, reaper: Arc<Reaper>, stream: Stream) {
    if let Err(e) = serve_inner(agent, reaper, stream) {
        crate::debug!("connection ended: {e}");
    }
}

fn serve_inner(agent: Arc<Agent>, reaper: Arc<Reaper>, mut stream: Stream) -> io::Result<()> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let hello = match blocking::read_hello_bytes(&mut stream) {
        Ok(h) => h,
        Err(e) => return Err(io::Error::other(e)),
    };
    match Hello::check(hello, Role::Host) {
        Ok(_) => blocking::write_hello(&mut stream, Role::Agent).map_err(io::Error::other)?,
        Err(e @ ProtocolError::VersionMismatch { .. }) => {
            // Tell the host our version so it can report both, then refuse.
            let _ = blocking::write_hello(&mut stream, Role::Agent);
            return Err(io::Error::other(e));
        }
        // Not one of ours: say nothing.
        Err(e) => return Err(io::Error::other(e)),
    }
    stream.set_read_timeout(None)?;

    let (tx, rx) = mpsc::channel();
    let mut read_half = stream.try_clone()?;
    let control = stream.try_clone()?;
    let writer = Arc::new(Writer {
        inner: Mutex::new(WriterState {
            stream,
            open_exec: None,
            failed: false,
        }),
        control,
    });
    let reader_tx = tx.clone();
    std::thread::Builder::new()
        .name("conn-reader".into())
        .spawn(move || {
            reader(&mut read_half, &reader_tx);
        })?;

    // Shut the socket down however the worker ends (a panicking handler included): the reader
    // thread then sees end of file and exits, and the host is not left waiting for an answer.
    let _shutdown = ShutdownOnDrop(writer.clone());
    let ctx = Ctx {
        agent,
        reaper,
        writer,
        rx,
        tx,
    };
    worker(&ctx);
    Ok(())
}

/// Shuts the connection down when dropped.
struct ShutdownOnDrop(Arc<Writer>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Host frames in order; hosts are trusted, so the channel is not bounded (see docs/agent.md).
fn reader(stream: &mut impl Read, tx: &Sender<Event>) {
    loop {
        match blocking::read_frame::<HostFrame, _>(stream) {
            Ok(Some(f)) => {
                if tx.send(Event::Frame(f)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Event::Closed(None));
                return;
            }
            Err(e) => {
                let _ = tx.send(Event::Closed(Some(e)));
                return;
            }
        }
    }
}

fn worker(ctx: &Ctx) {
    while let Ok(ev) = ctx.rx.recv() {
        let next = match ev {
            Event::Frame(f) => handle(ctx, f),
            Event::Closed(None) => Next::Close,
            Event::Closed(Some(e)) => {
                protocol_error(ctx, 0, &e.to_string());
                Next::Close
            }
            // Late events of an exec that already reported.
            Event::Exited(_) | Event::PipeDone(_) => Next::Continue,
        };
        if matches!(next, Next::Close) {
            return;
        }
    }
}

/// Reports a protocol violation (oversized or undecodable frame, unexpected message) and asks
/// for the connection to be closed: after one, frames may be out of step.
pub fn protocol_error(ctx: &Ctx, id: u64, message: &str) {
    crate::debug!("protocol error: {message}");
    ctx.writer.error(id, AgentErrorKind::Protocol, message);
}

fn handle(ctx: &Ctx, f: HostFrame) -> Next {
    let id = f.id;
    match f.body {
        HostMessage::Ping => {
            ctx.writer.send(
                id,
                AgentMessage::Pong(AgentInfo {
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    pid: std::process::id(),
                    hostname: ctx.agent.hostname.clone(),
                }),
            );
            Next::Continue
        }
        HostMessage::Exec(start) => exec::run(ctx, id, start),
        // A signal for a command that already finished: nothing to do.
        HostMessage::Signal { .. } => Next::Continue,
        HostMessage::ReadFile { path, opts } => {
            files::read(ctx, id, &path, &opts);
            Next::Continue
        }
        HostMessage::WriteFile { path, opts, size } => files::write(ctx, id, &path, &opts, size),
        HostMessage::Remove { path, opts } => {
            match files::remove(&path, &opts) {
                Ok(()) => ctx.writer.send(id, AgentMessage::Done),
                Err(e) => ctx.writer.send(id, AgentMessage::Error(e)),
            }
            Next::Continue
        }
        HostMessage::List { path, opts } => {
            match files::list(&path, &opts) {
                Ok(l) => ctx.writer.send(id, AgentMessage::Listing(l)),
                Err(e) => ctx.writer.send(id, AgentMessage::Error(e)),
            }
            Next::Continue
        }
        HostMessage::FileData(_) => {
            protocol_error(ctx, id, "FileData outside a WriteFile.");
            Next::Close
        }
        HostMessage::PowerOff => {
            ctx.writer.send(id, AgentMessage::Done);
            ctx.reaper.kill_all_groups();
            ctx.agent.power_off();
        }
    }
}
