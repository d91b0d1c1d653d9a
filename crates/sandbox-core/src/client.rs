//! The host-side agent client: one handshaken connection to a guest agent over any async byte
//! stream (a Unix socket to the VMM's vsock device after `CONNECT 1024`, a test socket...).
//!
//! One request is in flight per connection (see `docs/protocol.md`); open several connections
//! for concurrency. Any transport or protocol failure marks the client broken: later calls fail
//! fast with [`ClientError::Broken`] and the caller should open a new connection.
//!
//! Deadlines: connecting ([`connect_vsock_unix`], [`wait_for_agent`]: socket connect, the
//! `CONNECT` reply, the hello) is bounded as a whole by the caller's deadline. Every non-exec
//! request is bounded as a whole, sends included, by the request timeout
//! ([`DEFAULT_REQUEST_TIMEOUT`], [`AgentClient::set_request_timeout`]): an agent that stops reading
//! cannot block a `write_file` forever. An exec's sends are bounded by the request timeout; its
//! answers by its own timeout plus [`EXEC_GRACE`] (without a timeout the command may run, and
//! the stream stay silent, as long as it likes). Timeout errors carry the time actually waited.
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::UnixStream) -> Result<(), sandbox_core::client::ClientError> {
//! use std::time::Duration;
//! use sandbox_core::{client::AgentClient, ExecRequest};
//! let mut agent = AgentClient::handshake(stream, Duration::from_secs(5)).await?;
//! let out = agent.exec(&ExecRequest::shell("echo hi")).await?;
//! assert_eq!(out.stdout, b"hi\n");
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::exec::{ExecError, ExecEvent, ExecOutput, ExecRequest, OutputCollector};
use crate::file::{self, FileError, FileOptions, Listing, FILE_CHUNK_BYTES, MAX_FILE_BYTES};
use crate::protocol::{
    asynch, AgentError, AgentFrame, AgentInfo, AgentMessage, ExecStart, Hello, HostFrame,
    HostMessage, ProtocolError, Role,
};
use crate::sandbox::ExecEventSender;

/// Default bound on one whole non-exec request (every send and every answer frame of it), and on
/// each send of an exec.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time the client waits past an exec's own timeout before giving up on the agent.
pub const EXEC_GRACE: Duration = Duration::from_secs(30);
/// `SIGKILL`, sent to a command's group when its stream is abandoned.
const SIGKILL: i32 = 9;

/// Result of client operations.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The agent (or the VMM's vsock socket) did not complete the connection before the
    /// deadline.
    #[error("The agent connection did not complete: no progress at the {stage} after {after:?}.")]
    HandshakeTimeout {
        /// Where it stalled: `socket connect`, `vsock CONNECT reply`, `protocol hello`.
        stage: &'static str,
        /// How long the connection attempt had run when it was given up (the time actually
        /// waited, not the configured bound).
        after: Duration,
    },
    /// The handshake failed (closed stream, bad magic, version mismatch).
    #[error("The agent handshake failed.")]
    Handshake(#[source] ProtocolError),
    /// Framing or transport failed mid-request.
    #[error("The agent connection failed.")]
    Protocol(#[from] ProtocolError),
    /// The agent closed the connection in the middle of a request.
    #[error("The agent closed the connection.")]
    Closed,
    /// A request did not finish before its deadline: the agent neither answered nor read what
    /// was sent (a send blocked on a full socket counts too).
    #[error("The agent did not finish {what} in time: gave up after {after:?}.")]
    Timeout {
        /// The request kind.
        what: &'static str,
        /// How long the request had run when it was given up (the time actually waited).
        after: Duration,
    },
    /// The agent sent a frame that does not fit the exchange.
    #[error("The agent sent an unexpected {got} frame (id {id}) during {what}.")]
    Unexpected {
        /// The request kind.
        what: &'static str,
        /// Frame id received.
        id: u64,
        /// Frame kind received.
        got: &'static str,
    },
    /// The agent reported a request failure (the connection stays usable).
    #[error("The agent refused the request.")]
    Agent(#[from] AgentError),
    /// The exec request is invalid (the message is the reason).
    #[error("Invalid exec request: {0}")]
    Exec(#[from] ExecError),
    /// The file request is invalid (the message is the reason).
    #[error("Invalid file request: {0}")]
    File(#[from] FileError),
    /// The VMM's vsock socket did not accept `CONNECT <port>` (no listener yet, or a bad reply).
    #[error("The vsock CONNECT to port {port} failed: {reply:?}.")]
    VsockConnect {
        /// The guest port.
        port: u32,
        /// What came back instead of `OK <n>` (truncated), or the I/O error text.
        reply: String,
    },
    /// An earlier failure left the connection unusable.
    #[error("The agent connection is broken by an earlier error; open a new one.")]
    Broken,
}

impl ClientError {
    /// The public kind for this error.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            ClientError::HandshakeTimeout { .. }
            | ClientError::Closed
            | ClientError::VsockConnect { .. } => K::AgentUnreachable,
            ClientError::Handshake(ProtocolError::Io(_) | ProtocolError::Truncated { .. }) => {
                K::AgentUnreachable
            }
            ClientError::Handshake(_) | ClientError::Unexpected { .. } => K::Protocol,
            ClientError::Protocol(e) => crate::Error::from_protocol_kind(e),
            ClientError::Timeout { .. } => K::Timeout,
            ClientError::Agent(e) => crate::Error::from(e.clone()).kind(),
            ClientError::Exec(e) => crate::Error::from(e.clone()).kind(),
            ClientError::File(e) => crate::Error::from(e.clone()).kind(),
            ClientError::Broken => K::InvalidState,
        }
    }

    /// Whether the connection is unusable after this error.
    fn breaks_connection(&self) -> bool {
        !matches!(
            self,
            ClientError::Agent(_) | ClientError::Exec(_) | ClientError::File(_)
        )
    }
}

impl crate::Error {
    fn from_protocol_kind(e: &ProtocolError) -> crate::ErrorKind {
        match e {
            ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                crate::ErrorKind::Timeout
            }
            ProtocolError::Io(_) => crate::ErrorKind::AgentUnreachable,
            _ => crate::ErrorKind::Protocol,
        }
    }
}

impl ClientError {
    /// The sentence for people: the agent's own reason for [`ClientError::Agent`] (it names the
    /// directory, the user, the errno...), this error's text otherwise.
    fn public_message(&self) -> String {
        match self {
            ClientError::Agent(a) => a.message.clone(),
            ClientError::Exec(e) => e.to_string(),
            ClientError::File(e) => e.to_string(),
            other => other.to_string(),
        }
    }

    /// The public form of a borrowed error: the same kind and message as the `From` conversion,
    /// with the cause chain kept as text (the error itself stays with the caller).
    fn to_public(&self) -> crate::Error {
        let mut chain = String::new();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            if !chain.is_empty() {
                chain.push_str(": ");
            }
            chain.push_str(&c.to_string());
            cause = c.source();
        }
        if chain.is_empty() {
            crate::Error::new(self.kind(), self.public_message())
        } else {
            crate::Error::with_source(self.kind(), self.public_message(), chain)
        }
    }
}

impl From<ClientError> for crate::Error {
    fn from(e: ClientError) -> Self {
        crate::Error::with_source(e.kind(), e.public_message(), e)
    }
}

fn frame_name(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Pong(_) => "Pong",
        AgentMessage::Started { .. } => "Started",
        AgentMessage::Stdout(_) => "Stdout",
        AgentMessage::Stderr(_) => "Stderr",
        AgentMessage::Exited(_) => "Exited",
        AgentMessage::FileStart { .. } => "FileStart",
        AgentMessage::FileData(_) => "FileData",
        AgentMessage::Ready => "Ready",
        AgentMessage::Done => "Done",
        AgentMessage::Listing(_) => "Listing",
        AgentMessage::Error(_) => "Error",
    }
}

/// Longest reply line accepted from the VMM's vsock socket (`OK <n>\n`).
const MAX_CONNECT_REPLY: usize = 64;

/// The host side of the VMM's vsock Unix-socket scheme: writes `CONNECT <port>\n` and reads the
/// `OK <n>\n` line, one byte at a time so no byte of the following stream is consumed.
///
/// # Errors
/// [`ClientError::VsockConnect`] when the reply is not `OK ...` (for example the connection is
/// closed because nothing listens on `port` in the guest yet).
pub async fn vsock_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| ClientError::VsockConnect {
        port,
        reply: e.to_string(),
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let b = stream.read_u8().await.map_err(io)?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_CONNECT_REPLY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(ClientError::VsockConnect { port, reply: text }),
    }
}

/// Connects to a VMM's vsock Unix socket at `path`, asks for guest `port`, and completes the agent
/// handshake, all within `deadline`. One attempt; see [`wait_for_agent`] for boot-time polling.
///
/// # Errors
/// [`ClientError::VsockConnect`], [`ClientError::Handshake`], [`ClientError::HandshakeTimeout`].
pub async fn connect_vsock_unix(
    path: &std::path::Path,
    port: u32,
    deadline: Duration,
) -> Result<AgentClient<tokio::net::UnixStream>> {
    let started = Instant::now();
    let end = started + deadline;
    let timed_out = |stage| ClientError::HandshakeTimeout {
        stage,
        after: started.elapsed(),
    };
    let connect = tokio::net::UnixStream::connect(path);
    let mut s = match tokio::time::timeout_at(end, connect).await {
        Err(_) => return Err(timed_out(STAGE_SOCKET)),
        Ok(r) => r.map_err(|e| ClientError::VsockConnect {
            port,
            reply: e.to_string(),
        })?,
    };
    match tokio::time::timeout_at(end, vsock_connect(&mut s, port)).await {
        Err(_) => return Err(timed_out(STAGE_CONNECT_REPLY)),
        Ok(r) => r?,
    }
    AgentClient::handshake_inner(s, end, started).await
}

/// [`ClientError::HandshakeTimeout`] stages.
const STAGE_SOCKET: &str = "socket connect";
const STAGE_CONNECT_REPLY: &str = "vsock CONNECT reply";
const STAGE_HELLO: &str = "protocol hello";

/// Polls [`connect_vsock_unix`] every 50 ms until the agent answers or `deadline` passes (the
/// guest is booting: the socket may not exist yet, or nothing listens on the port yet).
///
/// # Errors
/// [`ClientError::HandshakeTimeout`] (kind `AgentUnreachable`) after `deadline`, or a
/// [`ClientError::Handshake`] protocol mismatch at once (retrying cannot fix it).
pub async fn wait_for_agent(
    path: &std::path::Path,
    port: u32,
    deadline: Duration,
) -> Result<AgentClient<tokio::net::UnixStream>> {
    let started = Instant::now();
    let end = started + deadline;
    // The stage of the last attempt that failed without timing out (a refused socket or a
    // refused CONNECT): the socket is not ready yet.
    let stage = STAGE_SOCKET;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::HandshakeTimeout {
                stage,
                after: started.elapsed(),
            });
        }
        match connect_vsock_unix(path, port, left).await {
            Ok(c) => return Ok(c),
            Err(ClientError::HandshakeTimeout { stage: s, .. }) => {
                return Err(ClientError::HandshakeTimeout {
                    stage: s,
                    after: started.elapsed(),
                })
            }
            Err(
                e @ ClientError::Handshake(
                    ProtocolError::BadMagic { .. }
                    | ProtocolError::BadRole { .. }
                    | ProtocolError::VersionMismatch { .. },
                ),
            ) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50).min(left)).await,
        }
    }
}

/// A handshaken connection to one guest agent.
#[derive(Debug)]
pub struct AgentClient<S> {
    stream: S,
    reader: asynch::FrameReader,
    next_id: u64,
    request_timeout: Duration,
    /// When the current call began (the `after` of its timeout errors).
    call_started: Instant,
    /// An exec whose session was dropped before `Exited`; settled before the next request.
    pending_exec: Option<u64>,
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> AgentClient<S> {
    /// Exchanges hellos over `stream` (host first), within `deadline`.
    ///
    /// # Errors
    /// [`ClientError::HandshakeTimeout`] (kind `AgentUnreachable`), or
    /// [`ClientError::Handshake`] with the typed cause (`VersionMismatch`, `BadMagic`...).
    pub async fn handshake(stream: S, deadline: Duration) -> Result<Self> {
        let started = Instant::now();
        Self::handshake_inner(stream, started + deadline, started).await
    }

    async fn handshake_inner(mut stream: S, end: Instant, started: Instant) -> Result<Self> {
        let exchange = async {
            asynch::write_hello(&mut stream, Role::Host).await?;
            let bytes = asynch::read_hello_bytes(&mut stream).await?;
            Hello::check(bytes, Role::Agent)
        };
        match tokio::time::timeout_at(end, exchange).await {
            Err(_) => Err(ClientError::HandshakeTimeout {
                stage: STAGE_HELLO,
                after: started.elapsed(),
            }),
            Ok(Err(e)) => Err(ClientError::Handshake(e)),
            Ok(Ok(_)) => Ok(AgentClient {
                stream,
                reader: asynch::FrameReader::new(),
                next_id: 1,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                call_started: Instant::now(),
                pending_exec: None,
                broken: false,
            }),
        }
    }

    /// Sets the bound on each whole non-exec request and on each send of an exec (default
    /// [`DEFAULT_REQUEST_TIMEOUT`]).
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Whether an earlier failure made this connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The underlying stream (for example to shut it down).
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn fail(&mut self, e: ClientError) -> ClientError {
        if e.breaks_connection() {
            self.broken = true;
        }
        e
    }

    /// Sends one frame, giving up at `deadline` (an agent that stops reading fills the socket
    /// and would block the write forever). A timeout breaks the connection: the frame may be
    /// half written.
    async fn send(
        &mut self,
        id: u64,
        body: HostMessage,
        what: &'static str,
        deadline: Instant,
    ) -> Result<()> {
        let frame = HostFrame { id, body };
        let write = asynch::write_frame(&mut self.stream, &frame);
        match tokio::time::timeout_at(deadline, write).await {
            Ok(r) => r.map_err(|e| self.fail(e.into())),
            Err(_) => {
                let after = self.call_started.elapsed();
                Err(self.fail(ClientError::Timeout { what, after }))
            }
        }
    }

    /// Waits for the next frame of request `id`, until `deadline` (`None`: forever).
    async fn recv(
        &mut self,
        id: u64,
        what: &'static str,
        deadline: Option<Instant>,
    ) -> Result<AgentMessage> {
        let read = self.reader.read_frame::<AgentFrame, _>(&mut self.stream);
        let r = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => {
                    // The time the call actually ran, not the time left (zero by now).
                    let after = self.call_started.elapsed();
                    return Err(self.fail(ClientError::Timeout { what, after }));
                }
            },
            None => read.await,
        };
        match r {
            Ok(Some(AgentFrame { id: got, body })) if got == id => Ok(body),
            // The agent reports connection-level protocol errors with id 0 before closing.
            Ok(Some(AgentFrame {
                id: 0,
                body: AgentMessage::Error(_),
            })) => Err(self.fail(ClientError::Unexpected {
                what,
                id: 0,
                got: "connection Error",
            })),
            Ok(Some(f)) => {
                let got = frame_name(&f.body);
                Err(self.fail(ClientError::Unexpected {
                    what,
                    id: f.id,
                    got,
                }))
            }
            Ok(None) => Err(self.fail(ClientError::Closed)),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// Starts request `body` of kind `what`: checks the connection, settles any abandoned exec,
    /// picks an id and sends the request. Returns the id and the call's deadline (now plus the
    /// request timeout), which bounds every later send and answer of a non-exec call.
    async fn begin(&mut self, body: HostMessage, what: &'static str) -> Result<(u64, Instant)> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if let Some(old) = self.pending_exec.take() {
            // Kill the abandoned command and read up to its Exited, so frames stay in step.
            const WHAT: &str = "an abandoned exec";
            self.call_started = Instant::now();
            let deadline = self.call_started + self.request_timeout + EXEC_GRACE;
            self.send(old, HostMessage::Signal { signal: SIGKILL }, WHAT, deadline)
                .await?;
            loop {
                match self.recv(old, WHAT, Some(deadline)).await? {
                    AgentMessage::Exited(_) | AgentMessage::Error(_) => break,
                    _ => {}
                }
            }
        }
        self.call_started = Instant::now();
        let deadline = self.call_started + self.request_timeout;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.send(id, body, what, deadline).await?;
        Ok((id, deadline))
    }

    /// Checks the agent is alive.
    ///
    /// # Errors
    /// Connection errors, [`ClientError::Timeout`].
    pub async fn ping(&mut self) -> Result<AgentInfo> {
        let (id, deadline) = self.begin(HostMessage::Ping, "ping").await?;
        match self.recv(id, "ping", Some(deadline)).await? {
            AgentMessage::Pong(info) => Ok(info),
            other => Err(self.unexpected("ping", id, &other)),
        }
    }

    fn unexpected(&mut self, what: &'static str, id: u64, m: &AgentMessage) -> ClientError {
        if let AgentMessage::Error(e) = m {
            return ClientError::Agent(e.clone());
        }
        self.fail(ClientError::Unexpected {
            what,
            id,
            got: frame_name(m),
        })
    }

    /// Starts a command; read its events from the returned session.
    ///
    /// # Errors
    /// [`ClientError::Exec`] for an invalid request (nothing sent), [`ClientError::Agent`] when
    /// the agent refuses it (unknown user...), connection errors.
    pub async fn exec_start(&mut self, req: &ExecRequest) -> Result<ExecSession<'_, S>> {
        req.validate()?;
        let start = ExecStart::from_request(req, &Default::default());
        let (id, send_deadline) = self.begin(HostMessage::Exec(start), "exec").await?;
        let deadline = req.timeout.map(|t| self.call_started + t + EXEC_GRACE);
        let first = self
            .recv(id, "exec", deadline.or(Some(send_deadline)))
            .await?;
        match first {
            AgentMessage::Started { pid } => {
                self.pending_exec = Some(id);
                Ok(ExecSession {
                    client: self,
                    id,
                    pid,
                    deadline,
                    done: false,
                })
            }
            other => Err(self.unexpected("exec", id, &other)),
        }
    }

    /// Runs a command to completion and collects its output.
    ///
    /// # Errors
    /// As [`AgentClient::exec_start`], plus [`ClientError::Timeout`] if the agent stays silent
    /// [`EXEC_GRACE`] past the command's own timeout.
    pub async fn exec(&mut self, req: &ExecRequest) -> Result<ExecOutput> {
        let mut s = self.exec_start(req).await?;
        let mut c = OutputCollector::new();
        while let Some(ev) = s.next_event().await? {
            c.push(ev);
        }
        c.finish().ok_or(ClientError::Closed)
    }

    /// Runs a command and forwards its events into `tx` (the sending half of an
    /// [`ExecStream`](crate::ExecStream)); a failure is also sent as the stream's last item. If the
    /// receiver goes away, the command's process group is killed.
    ///
    /// # Errors
    /// The failure that ended the exchange (already forwarded to `tx`).
    pub async fn exec_to_channel(&mut self, req: &ExecRequest, tx: ExecEventSender) -> Result<()> {
        let r = self.exec_forward(req, &tx).await;
        if let Err(e) = &r {
            let _ = tx.send(Err(e.to_public())).await;
        }
        r
    }

    async fn exec_forward(&mut self, req: &ExecRequest, tx: &ExecEventSender) -> Result<()> {
        let mut s = self.exec_start(req).await?;
        loop {
            // Watch for the receiver going away even while the command is silent; reading is
            // cancel-safe (`FrameReader`), so losing the race loses no bytes.
            let ev = tokio::select! {
                biased;
                _ = tx.closed() => None,
                ev = s.next_event() => Some(ev?),
            };
            let delivered = match ev {
                Some(None) => return Ok(()),
                Some(Some(ev)) => tx.send(Ok(ev)).await.is_ok(),
                None => false,
            };
            if !delivered {
                s.signal(SIGKILL).await?;
                while s.next_event().await?.is_some() {}
                return Ok(());
            }
        }
    }

    /// Reads a whole file (at most [`MAX_FILE_BYTES`]).
    ///
    /// # Errors
    /// [`ClientError::File`] for a bad path, [`ClientError::Agent`] (not found, escape, too
    /// large...), connection errors.
    pub async fn read_file(&mut self, path: &str, opts: &FileOptions) -> Result<Vec<u8>> {
        file::validate_path(path, opts)?;
        let (id, deadline) = self
            .begin(
                HostMessage::ReadFile {
                    path: path.to_owned(),
                    opts: opts.clone(),
                },
                "read_file",
            )
            .await?;
        let size = match self.recv(id, "read_file", Some(deadline)).await? {
            AgentMessage::FileStart { size } if size <= MAX_FILE_BYTES => size,
            AgentMessage::FileStart { .. } => {
                return Err(self.fail(ClientError::Unexpected {
                    what: "read_file",
                    id,
                    got: "oversized FileStart",
                }))
            }
            other => return Err(self.unexpected("read_file", id, &other)),
        };
        // `size` comes from the guest: allocate as data arrives, not up front.
        let mut data = Vec::with_capacity(FILE_CHUNK_BYTES.min(size as usize));
        loop {
            match self.recv(id, "read_file", Some(deadline)).await? {
                AgentMessage::FileData(chunk) if (data.len() + chunk.len()) as u64 <= size => {
                    data.extend_from_slice(&chunk)
                }
                AgentMessage::Done if data.len() as u64 == size => return Ok(data),
                AgentMessage::Error(e) => return Err(ClientError::Agent(e)),
                other => {
                    return Err(self.fail(ClientError::Unexpected {
                        what: "read_file",
                        id,
                        got: frame_name(&other),
                    }))
                }
            }
        }
    }

    /// Writes a whole file (at most [`MAX_FILE_BYTES`]), in [`FILE_CHUNK_BYTES`] frames.
    ///
    /// # Errors
    /// [`ClientError::File`] (bad path, too large: nothing sent), [`ClientError::Agent`],
    /// connection errors.
    pub async fn write_file(&mut self, path: &str, data: &[u8], opts: &FileOptions) -> Result<()> {
        file::validate_path(path, opts)?;
        let size = data.len() as u64;
        if size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                got: size,
                max: MAX_FILE_BYTES,
            }
            .into());
        }
        let body = HostMessage::WriteFile {
            path: path.to_owned(),
            opts: opts.clone(),
            size,
        };
        const WHAT: &str = "write_file";
        let (id, deadline) = self.begin(body, WHAT).await?;
        match self.recv(id, WHAT, Some(deadline)).await? {
            AgentMessage::Ready => {}
            other => return Err(self.unexpected(WHAT, id, &other)),
        }
        for chunk in data.chunks(FILE_CHUNK_BYTES) {
            let frame = HostMessage::FileData(Bytes::copy_from_slice(chunk));
            self.send(id, frame, WHAT, deadline).await?;
        }
        match self.recv(id, WHAT, Some(deadline)).await? {
            AgentMessage::Done => Ok(()),
            other => Err(self.unexpected("write_file", id, &other)),
        }
    }

    /// Removes a file, symlink or empty directory.
    ///
    /// # Errors
    /// As [`AgentClient::read_file`].
    pub async fn remove(&mut self, path: &str, opts: &FileOptions) -> Result<()> {
        file::validate_path(path, opts)?;
        let (id, deadline) = self
            .begin(
                HostMessage::Remove {
                    path: path.to_owned(),
                    opts: opts.clone(),
                },
                "remove",
            )
            .await?;
        match self.recv(id, "remove", Some(deadline)).await? {
            AgentMessage::Done => Ok(()),
            other => Err(self.unexpected("remove", id, &other)),
        }
    }

    /// Lists a directory.
    ///
    /// # Errors
    /// As [`AgentClient::read_file`].
    pub async fn list(&mut self, path: &str, opts: &FileOptions) -> Result<Listing> {
        file::validate_path(path, opts)?;
        let (id, deadline) = self
            .begin(
                HostMessage::List {
                    path: path.to_owned(),
                    opts: opts.clone(),
                },
                "list",
            )
            .await?;
        match self.recv(id, "list", Some(deadline)).await? {
            AgentMessage::Listing(l) => Ok(l),
            other => Err(self.unexpected("list", id, &other)),
        }
    }

    /// Asks the agent to sync and power the VM off. A connection closed before the answer
    /// counts as success (the guest went down first).
    ///
    /// # Errors
    /// Connection errors before the request was sent, [`ClientError::Agent`].
    pub async fn power_off(&mut self) -> Result<()> {
        let (id, deadline) = self.begin(HostMessage::PowerOff, "power_off").await?;
        match self.recv(id, "power_off", Some(deadline)).await {
            Ok(AgentMessage::Done) | Err(ClientError::Closed) => Ok(()),
            Err(ClientError::Protocol(ProtocolError::Io(_))) => Ok(()),
            Ok(other) => Err(self.unexpected("power_off", id, &other)),
            Err(e) => Err(e),
        }
    }
}

/// A running command on an [`AgentClient`]. Dropping it early is allowed: the client kills the
/// command's process group before its next request.
#[derive(Debug)]
pub struct ExecSession<'a, S> {
    client: &'a mut AgentClient<S>,
    id: u64,
    pid: u32,
    deadline: Option<Instant>,
    done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ExecSession<'_, S> {
    /// The command's guest pid (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; `Ok(None)` after [`ExecEvent::Exit`].
    ///
    /// # Errors
    /// Connection errors; [`ClientError::Timeout`] when nothing arrives [`EXEC_GRACE`] past the
    /// command's timeout.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        if self.done {
            return Ok(None);
        }
        let m = self.client.recv(self.id, "exec", self.deadline).await?;
        Ok(Some(match m {
            AgentMessage::Stdout(b) => ExecEvent::Stdout(b),
            AgentMessage::Stderr(b) => ExecEvent::Stderr(b),
            AgentMessage::Exited(s) => {
                self.done = true;
                self.client.pending_exec = None;
                ExecEvent::Exit(s)
            }
            other => {
                let e = self.client.unexpected("exec", self.id, &other);
                return Err(self.client.fail(match e {
                    // An agent error mid-command cannot be resynchronised: treat as protocol.
                    ClientError::Agent(_) => ClientError::Unexpected {
                        what: "exec",
                        id: self.id,
                        got: "Error",
                    },
                    e => e,
                }));
            }
        }))
    }

    /// Sends `signal` to the command's whole process group.
    ///
    /// # Errors
    /// Connection errors; [`ClientError::Timeout`] when the agent does not read the request
    /// within the client's request timeout.
    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let deadline = Instant::now() + self.client.request_timeout;
        self.client
            .send(self.id, HostMessage::Signal { signal }, "exec", deadline)
            .await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn vsock_connect_reads_exactly_the_ok_line() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let vmm_side = tokio::spawn(async move {
            let mut req = [0u8; 13];
            vmm.read_exact(&mut req).await.expect("request");
            assert_eq!(&req, b"CONNECT 1024\n");
            // The reply line and the first protocol bytes arrive together.
            vmm.write_all(b"OK 1073741824\nSBXA").await.expect("reply");
            vmm
        });
        vsock_connect(&mut host, 1024).await.expect("connected");
        let mut next = [0u8; 4];
        host.read_exact(&mut next).await.expect("stream bytes");
        assert_eq!(&next, b"SBXA", "no byte after the OK line was consumed");
        drop(vmm_side.await.expect("vmm"));
    }

    #[tokio::test]
    async fn vsock_connect_refusals_are_typed() {
        for reply in [&b"NO\n"[..], b"", b"OK notanumber\n", &[b'x'; 200]] {
            let (mut host, mut vmm) = tokio::io::duplex(512);
            vmm.write_all(reply).await.expect("reply");
            drop(vmm);
            let err = vsock_connect(&mut host, 1024).await.expect_err("refused");
            assert!(
                matches!(err, ClientError::VsockConnect { port: 1024, .. }),
                "{err:?}"
            );
            assert_eq!(err.kind(), crate::ErrorKind::AgentUnreachable);
        }
    }

    /// A fake agent on `stream`: completes the handshake, answers the first request with
    /// `reply`, then never reads again (but keeps the stream open).
    async fn stalling_agent(
        mut stream: tokio::io::DuplexStream,
        reply: AgentMessage,
    ) -> tokio::io::DuplexStream {
        let mut hello = [0u8; crate::protocol::HELLO_BYTES];
        stream.read_exact(&mut hello).await.expect("host hello");
        asynch::write_hello(&mut stream, Role::Agent)
            .await
            .expect("agent hello");
        let mut reader = asynch::FrameReader::new();
        let req: HostFrame = reader
            .read_frame(&mut stream)
            .await
            .expect("request")
            .expect("a frame");
        asynch::write_frame(
            &mut stream,
            &AgentFrame {
                id: req.id,
                body: reply,
            },
        )
        .await
        .expect("reply");
        stream
    }

    #[tokio::test]
    async fn an_exec_refusal_carries_the_agents_reason() {
        let reason = "The working directory /nonexistent does not exist.";
        let (host, agent) = tokio::io::duplex(64 * 1024);
        let agent = tokio::spawn(stalling_agent(
            agent,
            AgentMessage::Error(AgentError::new(
                crate::protocol::AgentErrorKind::NotFound,
                reason,
            )),
        ));
        let mut c = AgentClient::handshake(host, Duration::from_secs(5))
            .await
            .expect("handshake");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let req = ExecRequest::shell("pwd").cwd("/nonexistent");
        let err = c.exec_to_channel(&req, tx).await.expect_err("refused");
        assert!(!c.is_broken(), "a refusal keeps the connection");
        let streamed = rx
            .recv()
            .await
            .expect("an item")
            .expect_err("the stream's last item is the error");
        assert_eq!(streamed.kind(), crate::ErrorKind::NotFound);
        assert_eq!(streamed.message(), reason);
        let public = crate::Error::from(err);
        assert_eq!(public.kind(), crate::ErrorKind::NotFound);
        assert_eq!(public.message(), reason);
        drop(agent.await.expect("agent"));
    }

    #[test]
    fn a_borrowed_error_keeps_its_cause_as_text() {
        let e = ClientError::Protocol(ProtocolError::Io(std::io::Error::other("reset")));
        let public = e.to_public();
        assert_eq!(public.message(), "The agent connection failed.");
        let cause = std::error::Error::source(&public).map(|c| c.to_string());
        assert!(cause.is_some_and(|c| c.contains("reset")), "{public:?}");
    }

    #[tokio::test]
    async fn write_file_to_an_agent_that_stops_reading_times_out() {
        // A small pipe: the first data frames fill it and the next send blocks.
        let (host, agent) = tokio::io::duplex(16 * 1024);
        let agent = tokio::spawn(stalling_agent(agent, AgentMessage::Ready));
        let mut c = AgentClient::handshake(host, Duration::from_secs(5))
            .await
            .expect("handshake");
        let bound = Duration::from_millis(300);
        c.set_request_timeout(bound);
        let started = std::time::Instant::now();
        let data = vec![7u8; 4 * FILE_CHUNK_BYTES];
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.write_file("/tmp/x", &data, &FileOptions::default()),
        )
        .await
        .expect("write_file is bounded by its own deadline");
        let waited = started.elapsed();
        let err = r.expect_err("the agent never reads");
        match &err {
            ClientError::Timeout { what, after } => {
                assert_eq!(*what, "write_file");
                assert!(
                    *after >= bound && *after <= waited,
                    "{after:?} vs {waited:?}"
                );
            }
            other => panic!("not a timeout: {other:?}"),
        }
        assert_eq!(err.kind(), crate::ErrorKind::Timeout);
        assert!(!err.to_string().contains("0ns"), "{err}");
        assert!(waited < Duration::from_secs(3), "took {waited:?}");
        assert!(c.is_broken(), "a half-sent frame breaks the connection");
        drop(agent.await.expect("agent"));
    }

    #[tokio::test]
    async fn a_silent_answer_reports_the_time_actually_waited() {
        let (host, agent) = tokio::io::duplex(64 * 1024);
        // The agent reads the ping and never answers it (it answers with a frame for another id
        // only after the test is over).
        let agent = tokio::spawn(async move {
            let mut stream = agent;
            let mut hello = [0u8; crate::protocol::HELLO_BYTES];
            stream.read_exact(&mut hello).await.expect("host hello");
            asynch::write_hello(&mut stream, Role::Agent)
                .await
                .expect("agent hello");
            let mut buf = vec![0u8; 1024];
            let _ = stream.read(&mut buf).await;
            stream
        });
        let mut c = AgentClient::handshake(host, Duration::from_secs(5))
            .await
            .expect("handshake");
        c.set_request_timeout(Duration::from_millis(200));
        let err = c.ping().await.expect_err("no pong");
        let ClientError::Timeout {
            what: "ping",
            after,
        } = err
        else {
            panic!("{err:?}");
        };
        assert!(after >= Duration::from_millis(200), "{after:?}");
        assert!(err_text_has_duration(&ClientError::Timeout {
            what: "ping",
            after
        }));
        drop(agent.await.expect("agent"));
    }

    fn err_text_has_duration(e: &ClientError) -> bool {
        let t = e.to_string();
        !t.contains("0ns") && t.contains("ms")
    }

    #[tokio::test]
    async fn a_vmm_socket_that_never_answers_connect_is_bounded() {
        let dir = std::env::temp_dir().join(format!("sbx-mute-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        // Accept, read the CONNECT line, never answer.
        let vmm = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                held.push(s);
            }
        });
        let bound = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), wait_for_agent(&path, 1024, bound))
            .await
            .expect("bounded")
            .expect_err("no OK ever");
        let waited = started.elapsed();
        match &err {
            ClientError::HandshakeTimeout { stage, after } => {
                assert_eq!(*stage, STAGE_CONNECT_REPLY);
                assert!(
                    *after >= bound && *after <= waited,
                    "{after:?} vs {waited:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(err_text_has_duration(&err), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::AgentUnreachable);
        assert!(waited < Duration::from_secs(3), "took {waited:?}");
        vmm.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn wait_for_agent_gives_up_at_the_deadline() {
        let dir = std::env::temp_dir().join(format!("sbx-wait-{}", std::process::id()));
        let err = wait_for_agent(&dir.join("missing.sock"), 1024, Duration::from_millis(200))
            .await
            .expect_err("nothing there");
        match &err {
            ClientError::HandshakeTimeout { stage, after } => {
                assert_eq!(*stage, STAGE_SOCKET);
                assert!(*after >= Duration::from_millis(200), "{after:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.kind(), crate::ErrorKind::AgentUnreachable);
    }
}
