//! The host ↔ guest-agent wire protocol (see `docs/protocol.md` for the full description).
//!
//! 1. **Handshake.** Over a fresh byte stream (vsock in the guest; on the host a Unix socket after
//!    the VMM's `CONNECT <port>` exchange), the host sends an 8-byte [`Hello`] and the agent answers
//!    with its own. Both check [`MAGIC`] and [`PROTOCOL_VERSION`]; a mismatch is a typed
//!    [`ProtocolError`] and the connection is closed. The agent still sends its hello on a version
//!    mismatch, so the host can report both versions.
//! 2. **Frames.** Then each message is a frame: a `u32` big-endian payload length followed by that
//!    many bytes of [postcard](https://docs.rs/postcard)-encoded [`HostFrame`] or [`AgentFrame`].
//!    Lengths above [`MAX_FRAME_BYTES`] (1 MiB) are refused *before* any buffer is allocated, and the
//!    connection is closed.
//! 3. **Exchanges.** One request is in flight per connection; every frame carries the `id` of the
//!    request it belongs to. Concurrency comes from opening more connections.
//!
//! Framing is provided twice: [`blocking`] over `std::io::{Read, Write}` (the agent uses threads)
//! and, with the `host` feature, [`asynch`] over tokio's `AsyncRead`/`AsyncWrite`.

use std::time::Duration;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::exec::ExitStatus;
use crate::file::{FileOptions, Listing};

/// The vsock port the agent listens on in every guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// First four bytes of each [`Hello`]: "SBXA" (sandbox agent).
pub const MAGIC: [u8; 4] = *b"SBXA";
/// The protocol version both sides must speak. Bumped on any incompatible message change
/// (2: `ExitStatus::oom_killed`).
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of a [`Hello`] on the wire, in bytes.
pub const HELLO_BYTES: usize = 8;
/// Size of the frame length prefix, in bytes.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Largest frame payload either side accepts or sends, in bytes (1 MiB).
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// Result of protocol operations.
pub type Result<T> = std::result::Result<T, ProtocolError>;

/// Why a handshake or frame failed. After any of these the connection must be closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Reading or writing the stream failed.
    #[error("The agent connection failed.")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a hello or a frame.
    #[error("The stream ended inside a frame ({got} of {expected} bytes).")]
    Truncated {
        /// Bytes expected.
        expected: usize,
        /// Bytes received before the end.
        got: usize,
    },
    /// A frame declared a length above [`MAX_FRAME_BYTES`] (or zero).
    #[error("A frame of {len} bytes is outside 1..={max}.")]
    FrameSize {
        /// Declared or encoded length in bytes.
        len: u64,
        /// [`MAX_FRAME_BYTES`].
        max: u32,
    },
    /// The peer's hello does not start with [`MAGIC`].
    #[error("The peer is not a sandbox agent (bad magic {got:02x?}).")]
    BadMagic {
        /// The four bytes received.
        got: [u8; 4],
    },
    /// The peer's hello says it is not the role we expected.
    #[error("The peer sent a hello with role {got}, expected {expected}.")]
    BadRole {
        /// Role byte received.
        got: u8,
        /// Role byte expected.
        expected: u8,
    },
    /// The peer speaks another protocol version.
    #[error("Protocol version mismatch: we speak {ours}, the peer speaks {theirs}.")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame payload is not a valid message.
    #[error("A frame could not be decoded.")]
    Decode(#[source] postcard::Error),
    /// A frame payload decoded but left bytes over.
    #[error("A frame has {0} trailing bytes.")]
    TrailingBytes(usize),
    /// A message could not be encoded.
    #[error("A message could not be encoded.")]
    Encode(#[source] postcard::Error),
}

impl From<ProtocolError> for crate::Error {
    fn from(e: ProtocolError) -> Self {
        use crate::ErrorKind;
        let (kind, msg) = match &e {
            ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                (ErrorKind::Timeout, "The agent connection timed out.")
            }
            ProtocolError::Io(_) => (ErrorKind::Io, "The agent connection failed."),
            _ => (ErrorKind::Protocol, "The agent broke the wire protocol."),
        };
        crate::Error::with_source(kind, msg, e)
    }
}

/// Who sent a [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The host side (SDK, `AgentClient`).
    Host = 1,
    /// The guest agent.
    Agent = 2,
}

/// The fixed 8-byte greeting: `MAGIC` (4) · version (`u16` BE) · role (1) · reserved zero (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Sender's protocol version.
    pub version: u16,
    /// Sender's role.
    pub role: Role,
}

impl Hello {
    /// Our hello for `role` at [`PROTOCOL_VERSION`].
    pub fn ours(role: Role) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            role,
        }
    }

    /// Wire bytes.
    pub fn encode(self) -> [u8; HELLO_BYTES] {
        let v = self.version.to_be_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            v[0],
            v[1],
            self.role as u8,
            0,
        ]
    }

    /// Parses a peer's hello and checks magic, role and version, in that order (so garbage is
    /// reported as bad magic, not as a version).
    ///
    /// # Errors
    /// [`ProtocolError::BadMagic`], [`ProtocolError::BadRole`] or
    /// [`ProtocolError::VersionMismatch`].
    pub fn check(bytes: [u8; HELLO_BYTES], expected: Role) -> Result<Hello> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: magic });
        }
        let role = match bytes[6] {
            1 => Role::Host,
            2 => Role::Agent,
            got => {
                return Err(ProtocolError::BadRole {
                    got,
                    expected: expected as u8,
                })
            }
        };
        if role != expected {
            return Err(ProtocolError::BadRole {
                got: bytes[6],
                expected: expected as u8,
            });
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Ok(Hello { version, role })
    }
}

/// A frame from the host: the request id and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFrame {
    /// Id of the request this frame starts or belongs to (chosen by the host, increasing).
    pub id: u64,
    /// The message.
    pub body: HostMessage,
}

/// What the host asks. Variants are only ever appended; reordering is a version bump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMessage {
    /// Liveness check; answered by [`AgentMessage::Pong`].
    Ping,
    /// Run a command; answered by `Started`, output chunks, then `Exited` (or `Error`).
    Exec(ExecStart),
    /// Send a signal to the running command's process group (same id as its `Exec`). No answer.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Read a file; answered by `FileStart`, `FileData`*, `Done` (or `Error`).
    ReadFile {
        /// Guest path.
        path: String,
        /// Confinement options.
        opts: FileOptions,
    },
    /// Write a file of `size` bytes; answered by `Ready` (or `Error`), after which the host sends
    /// `FileData` frames totalling exactly `size` bytes, answered by `Done` (or `Error`).
    WriteFile {
        /// Guest path.
        path: String,
        /// Mode, confinement, parent creation.
        opts: FileOptions,
        /// Total bytes that will follow, at most [`MAX_FILE_BYTES`](crate::file::MAX_FILE_BYTES).
        size: u64,
    },
    /// A chunk of a file being written (at most [`FILE_CHUNK_BYTES`](crate::file::FILE_CHUNK_BYTES)).
    FileData(Bytes),
    /// Remove a file, symlink or empty directory; answered by `Done` (or `Error`).
    Remove {
        /// Guest path.
        path: String,
        /// Confinement options.
        opts: FileOptions,
    },
    /// List a directory; answered by `Listing` (or `Error`).
    List {
        /// Guest path.
        path: String,
        /// Confinement options.
        opts: FileOptions,
    },
    /// Sync disks and power the VM off; answered by `Done` just before.
    PowerOff,
}

/// The `Exec` request as it travels (an [`ExecRequest`](crate::ExecRequest) with the spec env
/// merged in by the backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment additions, in order.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// All of stdin (at most [`MAX_STDIN_BYTES`](crate::exec::MAX_STDIN_BYTES)).
    pub stdin: Bytes,
    /// Timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// User name or numeric uid.
    pub user: Option<String>,
}

impl ExecStart {
    /// The wire form of `req`, with `extra_env` (for example the spec's env) underneath the
    /// request's own variables.
    pub fn from_request(
        req: &crate::ExecRequest,
        extra_env: &std::collections::BTreeMap<String, String>,
    ) -> Self {
        let mut env: Vec<(String, String)> = extra_env
            .iter()
            .filter(|(k, _)| !req.env.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        ExecStart {
            argv: req.argv.clone(),
            env,
            cwd: req.cwd.clone(),
            stdin: req.stdin.clone(),
            timeout_ms: req
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            user: req.user.clone(),
        }
    }

    /// The timeout as a `Duration`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

/// A frame from the agent: the id of the request it answers and the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFrame {
    /// The request id being answered.
    pub id: u64,
    /// The message.
    pub body: AgentMessage,
}

/// What the agent answers. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Answer to `Ping`.
    Pong(AgentInfo),
    /// The command was spawned with this pid (also its process-group id).
    Started {
        /// Guest pid.
        pid: u32,
    },
    /// Stdout chunk (at most [`MAX_OUTPUT_CHUNK_BYTES`](crate::exec::MAX_OUTPUT_CHUNK_BYTES)).
    Stdout(Bytes),
    /// Stderr chunk.
    Stderr(Bytes),
    /// The command ended; last frame of an `Exec`.
    Exited(ExitStatus),
    /// A file read starts; `size` bytes of `FileData` follow.
    FileStart {
        /// File size in bytes.
        size: u64,
    },
    /// A chunk of a file being read.
    FileData(Bytes),
    /// The agent is ready for the `FileData` of a `WriteFile`.
    Ready,
    /// The request succeeded (end of a read, write, remove, power-off).
    Done,
    /// Answer to `List`.
    Listing(Listing),
    /// The request failed; last frame of the request.
    Error(AgentError),
}

/// Who the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent crate version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// The agent's pid (1 inside a guest).
    pub pid: u32,
    /// The guest's hostname.
    pub hostname: String,
}

/// A request failure reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    /// What kind of failure.
    pub kind: AgentErrorKind,
    /// A short sentence from the agent.
    pub message: String,
}

impl AgentError {
    /// An error.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// Kinds of agent-side failures. Only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentErrorKind {
    /// No such file or directory.
    NotFound,
    /// Access refused by the guest.
    PermissionDenied,
    /// The path would leave the confined root (`..` or a symlink).
    Escape,
    /// Over a size cap.
    TooLarge,
    /// The request is malformed or not allowed now (unknown user, not a directory...).
    InvalidRequest,
    /// The peer broke the protocol (unexpected frame).
    Protocol,
    /// Any other guest I/O error.
    Io,
}

impl From<AgentError> for crate::Error {
    fn from(e: AgentError) -> Self {
        use crate::ErrorKind;
        let kind = match e.kind {
            AgentErrorKind::NotFound => ErrorKind::NotFound,
            AgentErrorKind::PermissionDenied | AgentErrorKind::Escape => {
                ErrorKind::PermissionDenied
            }
            AgentErrorKind::TooLarge => ErrorKind::TooLarge,
            AgentErrorKind::InvalidRequest => ErrorKind::InvalidRequest,
            AgentErrorKind::Protocol => ErrorKind::Protocol,
            AgentErrorKind::Io => ErrorKind::Io,
        };
        let message = e.message.clone();
        crate::Error::with_source(kind, message, e)
    }
}

/// Encodes `msg` as one frame (length prefix included).
///
/// # Errors
/// [`ProtocolError::Encode`], or [`ProtocolError::FrameSize`] when the payload would exceed
/// [`MAX_FRAME_BYTES`] (nothing is written then).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut buf =
        postcard::to_extend(msg, vec![0u8; FRAME_HEADER_BYTES]).map_err(ProtocolError::Encode)?;
    let len = buf.len() - FRAME_HEADER_BYTES;
    let len32 = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_BYTES)
        .ok_or(ProtocolError::FrameSize {
            len: len as u64,
            max: MAX_FRAME_BYTES,
        })?;
    buf[..FRAME_HEADER_BYTES].copy_from_slice(&len32.to_be_bytes());
    Ok(buf)
}

/// Checks a declared payload length before anything is allocated for it.
///
/// # Errors
/// [`ProtocolError::FrameSize`] for 0 or more than [`MAX_FRAME_BYTES`].
pub fn check_frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize> {
    let len = u32::from_be_bytes(header);
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameSize {
            len: u64::from(len),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(len as usize)
}

/// Decodes one payload, refusing trailing bytes.
///
/// # Errors
/// [`ProtocolError::Decode`] or [`ProtocolError::TrailingBytes`].
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtocolError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Blocking framing over `std::io::{Read, Write}` (used by the agent's threads).
pub mod blocking {
    use std::io::{ErrorKind, Read, Write};

    use super::*;

    /// Reads into `buf` until full or end of stream; returns bytes read.
    fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(got)
    }

    /// Writes our hello.
    ///
    /// # Errors
    /// [`ProtocolError::Io`].
    pub fn write_hello<W: Write + ?Sized>(w: &mut W, role: Role) -> Result<()> {
        w.write_all(&Hello::ours(role).encode())?;
        w.flush()?;
        Ok(())
    }

    /// Reads the 8 hello bytes without checking them (see [`Hello::check`]).
    ///
    /// # Errors
    /// [`ProtocolError::Io`] or [`ProtocolError::Truncated`].
    pub fn read_hello_bytes<R: Read + ?Sized>(r: &mut R) -> Result<[u8; HELLO_BYTES]> {
        let mut b = [0u8; HELLO_BYTES];
        let got = read_full(r, &mut b)?;
        if got != HELLO_BYTES {
            return Err(ProtocolError::Truncated {
                expected: HELLO_BYTES,
                got,
            });
        }
        Ok(b)
    }

    /// Reads one frame. `Ok(None)` means the peer closed the stream cleanly between frames.
    ///
    /// # Errors
    /// [`ProtocolError::FrameSize`] (checked before allocating), [`ProtocolError::Truncated`],
    /// [`ProtocolError::Decode`], [`ProtocolError::Io`].
    pub fn read_frame<T: DeserializeOwned, R: Read + ?Sized>(r: &mut R) -> Result<Option<T>> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        match read_full(r, &mut header)? {
            0 => return Ok(None),
            FRAME_HEADER_BYTES => {}
            got => {
                return Err(ProtocolError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    got,
                })
            }
        }
        let len = check_frame_len(header)?;
        let mut payload = vec![0u8; len];
        let got = read_full(r, &mut payload)?;
        if got != len {
            return Err(ProtocolError::Truncated { expected: len, got });
        }
        decode_payload(&payload).map(Some)
    }

    /// Encodes and writes one frame, then flushes.
    ///
    /// # Errors
    /// As [`encode_frame`], or [`ProtocolError::Io`].
    pub fn write_frame<T: Serialize, W: Write + ?Sized>(w: &mut W, msg: &T) -> Result<()> {
        let buf = encode_frame(msg)?;
        w.write_all(&buf)?;
        w.flush()?;
        Ok(())
    }
}

/// Async framing over tokio's `AsyncRead`/`AsyncWrite` (used by the host-side client).
#[cfg(feature = "host")]
pub mod asynch {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    async fn read_full<R: AsyncRead + Unpin + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(got)
    }

    /// Writes our hello.
    ///
    /// # Errors
    /// [`ProtocolError::Io`].
    pub async fn write_hello<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, role: Role) -> Result<()> {
        w.write_all(&Hello::ours(role).encode()).await?;
        w.flush().await?;
        Ok(())
    }

    /// Reads the 8 hello bytes without checking them (see [`Hello::check`]).
    ///
    /// # Errors
    /// [`ProtocolError::Io`] or [`ProtocolError::Truncated`].
    pub async fn read_hello_bytes<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> Result<[u8; HELLO_BYTES]> {
        let mut b = [0u8; HELLO_BYTES];
        let got = read_full(r, &mut b).await?;
        if got != HELLO_BYTES {
            return Err(ProtocolError::Truncated {
                expected: HELLO_BYTES,
                got,
            });
        }
        Ok(b)
    }

    /// Reads one frame. `Ok(None)` means the peer closed the stream cleanly between frames.
    ///
    /// # Errors
    /// As [`blocking::read_frame`].
    pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> Result<Option<T>> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        match read_full(r, &mut header).await? {
            0 => return Ok(None),
            FRAME_HEADER_BYTES => {}
            got => {
                return Err(ProtocolError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    got,
                })
            }
        }
        let len = check_frame_len(header)?;
        let mut payload = vec![0u8; len];
        let got = read_full(r, &mut payload).await?;
        if got != len {
            return Err(ProtocolError::Truncated { expected: len, got });
        }
        decode_payload(&payload).map(Some)
    }

    /// A cancel-safe frame reader: partial frames are kept in its buffer, so a `read_frame`
    /// future dropped by `tokio::select!` or a timeout loses nothing. The buffer never holds more
    /// than one maximal frame plus a small read-ahead.
    #[derive(Debug, Default)]
    pub struct FrameReader {
        buf: bytes::BytesMut,
    }

    impl FrameReader {
        /// An empty reader.
        pub fn new() -> Self {
            Self::default()
        }

        /// Reads one frame, as [`read_frame`], but cancel-safe.
        ///
        /// # Errors
        /// As [`blocking::read_frame`].
        pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin + ?Sized>(
            &mut self,
            r: &mut R,
        ) -> Result<Option<T>> {
            loop {
                let need = if self.buf.len() >= FRAME_HEADER_BYTES {
                    let mut header = [0u8; FRAME_HEADER_BYTES];
                    header.copy_from_slice(&self.buf[..FRAME_HEADER_BYTES]);
                    // Checked before any payload-sized reservation.
                    let len = check_frame_len(header)?;
                    let total = FRAME_HEADER_BYTES + len;
                    if self.buf.len() >= total {
                        let frame = self.buf.split_to(total);
                        return decode_payload(&frame[FRAME_HEADER_BYTES..]).map(Some);
                    }
                    total
                } else {
                    FRAME_HEADER_BYTES
                };
                self.buf.reserve(need - self.buf.len());
                // `read_buf` is cancel-safe: a dropped future has read nothing.
                let n = match r.read_buf(&mut self.buf).await {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(ProtocolError::Truncated {
                        expected: need,
                        got: self.buf.len(),
                    });
                }
            }
        }
    }

    /// Encodes and writes one frame, then flushes.
    ///
    /// # Errors
    /// As [`encode_frame`], or [`ProtocolError::Io`].
    pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        msg: &T,
    ) -> Result<()> {
        let buf = encode_frame(msg)?;
        w.write_all(&buf).await?;
        w.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Read};

    use proptest::prelude::*;

    use super::*;
    use crate::file::{DirEntry, FileKind};

    #[test]
    fn hello_round_trip_and_refusals() {
        let h = Hello::ours(Role::Agent).encode();
        assert_eq!(&h[..4], b"SBXA");
        assert_eq!(
            Hello::check(h, Role::Agent).expect("valid").version,
            PROTOCOL_VERSION
        );
        assert!(matches!(
            Hello::check(h, Role::Host),
            Err(ProtocolError::BadRole {
                got: 2,
                expected: 1
            })
        ));
        let mut bad = h;
        bad[0] = b'X';
        assert!(matches!(
            Hello::check(bad, Role::Agent),
            Err(ProtocolError::BadMagic { .. })
        ));
        let newer = Hello {
            version: PROTOCOL_VERSION + 1,
            role: Role::Agent,
        }
        .encode();
        assert!(matches!(
            Hello::check(newer, Role::Agent),
            Err(ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, theirs }) if theirs == PROTOCOL_VERSION + 1
        ));
    }

    #[test]
    fn exec_start_puts_request_env_over_extra_env() {
        let req = crate::ExecRequest::shell("true")
            .env("A", "req")
            .stdin(&b"in"[..])
            .timeout(Duration::from_millis(1500));
        let extra: std::collections::BTreeMap<String, String> = [
            ("A".to_owned(), "spec".to_owned()),
            ("B".to_owned(), "spec".to_owned()),
        ]
        .into();
        let s = ExecStart::from_request(&req, &extra);
        assert_eq!(
            s.env,
            [
                ("B".to_owned(), "spec".to_owned()),
                ("A".to_owned(), "req".to_owned())
            ]
        );
        assert_eq!(
            (s.timeout_ms, s.timeout()),
            (Some(1500), Some(Duration::from_millis(1500)))
        );
        assert_eq!((s.argv.len(), &s.stdin[..]), (3, &b"in"[..]));
    }

    #[test]
    fn truncated_hello_is_typed() {
        let h = Hello::ours(Role::Host).encode();
        for cut in 0..HELLO_BYTES {
            let r = blocking::read_hello_bytes(&mut Cursor::new(&h[..cut]));
            assert!(matches!(r, Err(ProtocolError::Truncated { expected: 8, got }) if got == cut));
        }
    }

    /// A reader that yields `header` and then fails the test if anyone reads the payload.
    struct HeaderOnly {
        header: Cursor<Vec<u8>>,
    }
    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.header.read(buf)?;
            assert!(
                n > 0 || buf.is_empty(),
                "the payload of an oversized frame was read"
            );
            Ok(n)
        }
    }

    #[test]
    fn oversized_frame_refused_before_reading_payload() {
        for len in [MAX_FRAME_BYTES + 1, u32::MAX, 0] {
            let mut r = HeaderOnly {
                header: Cursor::new(len.to_be_bytes().to_vec()),
            };
            let res = blocking::read_frame::<HostFrame, _>(&mut r);
            assert!(
                matches!(res, Err(ProtocolError::FrameSize { len: l, max: MAX_FRAME_BYTES }) if l == u64::from(len)),
                "{len}: {res:?}"
            );
        }
    }

    #[test]
    fn oversized_message_not_encoded() {
        let big = HostFrame {
            id: 1,
            body: HostMessage::FileData(Bytes::from(vec![0u8; MAX_FRAME_BYTES as usize])),
        };
        assert!(matches!(
            encode_frame(&big),
            Err(ProtocolError::FrameSize { .. })
        ));
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        let f = HostFrame {
            id: 7,
            body: HostMessage::Ping,
        };
        let mut c = Cursor::new(encode_frame(&f).expect("encodes"));
        assert_eq!(
            blocking::read_frame::<HostFrame, _>(&mut c).expect("frame"),
            Some(f)
        );
        assert_eq!(
            blocking::read_frame::<HostFrame, _>(&mut c).expect("eof"),
            None
        );
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut payload = postcard::to_stdvec(&HostFrame {
            id: 1,
            body: HostMessage::Ping,
        })
        .expect("enc");
        payload.push(0);
        let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&payload);
        assert!(matches!(
            blocking::read_frame::<HostFrame, _>(&mut Cursor::new(wire)),
            Err(ProtocolError::TrailingBytes(1))
        ));
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn arb_opts() -> impl Strategy<Value = FileOptions> {
        (
            proptest::option::of("/[a-z/]{0,20}"),
            proptest::option::of(0u32..0o7777),
            any::<bool>(),
        )
            .prop_map(|(root, mode, create_parents)| FileOptions {
                root,
                mode,
                create_parents,
            })
    }

    fn arb_host_frame() -> impl Strategy<Value = HostFrame> {
        let body = prop_oneof![
            Just(HostMessage::Ping),
            Just(HostMessage::PowerOff),
            (
                proptest::collection::vec(".{0,12}", 1..6),
                proptest::collection::vec(("[A-Z_]{1,8}", ".{0,12}"), 0..4),
                proptest::option::of(".{0,20}"),
                arb_bytes(2048),
                proptest::option::of(any::<u64>()),
                proptest::option::of("[a-z0-9]{1,8}"),
            )
                .prop_map(|(argv, env, cwd, stdin, timeout_ms, user)| {
                    HostMessage::Exec(ExecStart {
                        argv,
                        env,
                        cwd,
                        stdin,
                        timeout_ms,
                        user,
                    })
                }),
            any::<i32>().prop_map(|signal| HostMessage::Signal { signal }),
            (".{0,40}", arb_opts()).prop_map(|(path, opts)| HostMessage::ReadFile { path, opts }),
            (".{0,40}", arb_opts(), any::<u64>())
                .prop_map(|(path, opts, size)| HostMessage::WriteFile { path, opts, size }),
            arb_bytes(4096).prop_map(HostMessage::FileData),
            (".{0,40}", arb_opts()).prop_map(|(path, opts)| HostMessage::Remove { path, opts }),
            (".{0,40}", arb_opts()).prop_map(|(path, opts)| HostMessage::List { path, opts }),
        ];
        (any::<u64>(), body).prop_map(|(id, body)| HostFrame { id, body })
    }

    fn arb_agent_frame() -> impl Strategy<Value = AgentFrame> {
        let kind = proptest::sample::select(vec![
            AgentErrorKind::NotFound,
            AgentErrorKind::PermissionDenied,
            AgentErrorKind::Escape,
            AgentErrorKind::TooLarge,
            AgentErrorKind::InvalidRequest,
            AgentErrorKind::Protocol,
            AgentErrorKind::Io,
        ]);
        let entry = (
            ".{0,20}",
            proptest::sample::select(vec![
                FileKind::File,
                FileKind::Dir,
                FileKind::Symlink,
                FileKind::Other,
            ]),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(n, k, s, m)| DirEntry::new(n, k, s, m));
        let body = prop_oneof![
            (".{0,10}", any::<u32>(), ".{0,10}").prop_map(|(agent_version, pid, hostname)| {
                AgentMessage::Pong(AgentInfo {
                    agent_version,
                    pid,
                    hostname,
                })
            }),
            any::<u32>().prop_map(|pid| AgentMessage::Started { pid }),
            arb_bytes(4096).prop_map(AgentMessage::Stdout),
            arb_bytes(4096).prop_map(AgentMessage::Stderr),
            (
                proptest::option::of(any::<i32>()),
                proptest::option::of(any::<i32>()),
                any::<bool>(),
                any::<bool>(),
                any::<u64>(),
                0u32..1_000_000_000
            )
                .prop_map(|(code, signal, timed_out, oom_killed, s, n)| {
                    AgentMessage::Exited(ExitStatus {
                        code,
                        signal,
                        timed_out,
                        oom_killed,
                        duration: Duration::new(s, n),
                    })
                }),
            any::<u64>().prop_map(|size| AgentMessage::FileStart { size }),
            arb_bytes(4096).prop_map(AgentMessage::FileData),
            Just(AgentMessage::Ready),
            Just(AgentMessage::Done),
            (proptest::collection::vec(entry, 0..8), any::<bool>())
                .prop_map(|(e, t)| AgentMessage::Listing(Listing::new(e, t))),
            (kind, ".{0,30}").prop_map(|(k, m)| AgentMessage::Error(AgentError::new(k, m))),
        ];
        (any::<u64>(), body).prop_map(|(id, body)| AgentFrame { id, body })
    }

    proptest! {
        #[test]
        fn host_frames_round_trip(f in arb_host_frame()) {
            let wire = encode_frame(&f).expect("encodes");
            let back = blocking::read_frame::<HostFrame, _>(&mut Cursor::new(&wire)).expect("decodes");
            prop_assert_eq!(back, Some(f));
        }

        #[test]
        fn agent_frames_round_trip(f in arb_agent_frame()) {
            let wire = encode_frame(&f).expect("encodes");
            let back = blocking::read_frame::<AgentFrame, _>(&mut Cursor::new(&wire)).expect("decodes");
            prop_assert_eq!(back, Some(f));
        }

        /// Every strict prefix of a valid frame is an error (or a clean EOF when empty).
        #[test]
        fn truncated_frames_error(f in arb_agent_frame(), cut in any::<prop::sample::Index>()) {
            let wire = encode_frame(&f).expect("encodes");
            let cut = cut.index(wire.len());
            let r = blocking::read_frame::<AgentFrame, _>(&mut Cursor::new(&wire[..cut]));
            if cut == 0 {
                prop_assert!(matches!(r, Ok(None)));
            } else {
                prop_assert!(matches!(r, Err(ProtocolError::Truncated { .. })), "{:?}", r);
            }
        }

        /// Arbitrary bytes never panic and never produce more frames than their length allows.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut c = Cursor::new(&data);
            let mut frames = 0usize;
            while let Ok(Some(_)) = blocking::read_frame::<HostFrame, _>(&mut c) {
                frames += 1;
                prop_assert!(frames <= data.len() / (FRAME_HEADER_BYTES + 1));
            }
            let mut c = Cursor::new(&data);
            while let Ok(Some(_)) = blocking::read_frame::<AgentFrame, _>(&mut c) {}
            let _ = Hello::check(data.get(..8).and_then(|s| s.try_into().ok()).unwrap_or([0; 8]), Role::Agent);
        }

        /// Arbitrary payloads behind a valid length prefix never panic either.
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(&payload);
            let _ = blocking::read_frame::<HostFrame, _>(&mut Cursor::new(&wire));
            let _ = blocking::read_frame::<AgentFrame, _>(&mut Cursor::new(&wire));
        }
    }

    #[cfg(feature = "host")]
    #[tokio::test]
    async fn frame_reader_handles_split_and_oversized_input() {
        let a = AgentFrame {
            id: 1,
            body: AgentMessage::Stdout(Bytes::from(vec![7u8; 100_000])),
        };
        let b = AgentFrame {
            id: 2,
            body: AgentMessage::Done,
        };
        let mut wire = encode_frame(&a).expect("enc");
        wire.extend(encode_frame(&b).expect("enc"));
        // Feed it through a pipe in small pieces.
        let (mut tx, mut rx) = tokio::io::duplex(333);
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in wire.chunks(1000) {
                tx.write_all(c).await.expect("write");
            }
        });
        let mut fr = asynch::FrameReader::new();
        assert_eq!(
            fr.read_frame::<AgentFrame, _>(&mut rx).await.expect("a"),
            Some(a)
        );
        assert_eq!(
            fr.read_frame::<AgentFrame, _>(&mut rx).await.expect("b"),
            Some(b)
        );
        feeder.await.expect("feeder");
        assert_eq!(
            fr.read_frame::<AgentFrame, _>(&mut rx).await.expect("eof"),
            None
        );
        let mut huge = &(MAX_FRAME_BYTES + 1).to_be_bytes()[..];
        assert!(matches!(
            asynch::FrameReader::new()
                .read_frame::<AgentFrame, _>(&mut huge)
                .await,
            Err(ProtocolError::FrameSize { .. })
        ));
        let mut cut = &encode_frame(&AgentFrame {
            id: 3,
            body: AgentMessage::Ready,
        })
        .expect("enc")[..5];
        assert!(matches!(
            asynch::FrameReader::new()
                .read_frame::<AgentFrame, _>(&mut cut)
                .await,
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[cfg(feature = "host")]
    #[tokio::test]
    async fn async_and_blocking_framing_agree() {
        let f = AgentFrame {
            id: 3,
            body: AgentMessage::Stdout(Bytes::from_static(b"hi")),
        };
        let mut wire = Vec::new();
        asynch::write_frame(&mut wire, &f).await.expect("writes");
        assert_eq!(wire, encode_frame(&f).expect("encodes"));
        let mut r = &wire[..];
        assert_eq!(
            asynch::read_frame::<AgentFrame, _>(&mut r)
                .await
                .expect("reads"),
            Some(f)
        );
        let mut huge = &(MAX_FRAME_BYTES + 1).to_be_bytes()[..];
        assert!(matches!(
            asynch::read_frame::<AgentFrame, _>(&mut huge).await,
            Err(ProtocolError::FrameSize { .. })
        ));
    }
}
