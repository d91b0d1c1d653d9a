//! The public SDK error: a stable kind, a short message and an optional boxed cause.
//!
//! Every backend maps its module errors into [`Error`] at the trait boundary, so callers match on
//! [`ErrorKind`] and never on backend types. New kinds may be added (`#[non_exhaustive]`); existing
//! kinds keep their meaning.

use std::fmt;

/// A boxed, thread-safe cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the public [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, stable across releases. Match on this, not on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The spec given to `Runtime::create` failed validation.
    InvalidSpec,
    /// A request (exec, file operation) is malformed: empty argv, bad path, NUL byte...
    InvalidRequest,
    /// The host is not set up to run sandboxes; the message names the fix (for example
    /// `/dev/kvm` permissions or `cargo xtask guest` for missing guest artifacts).
    HostSetup,
    /// The guest agent did not answer the handshake or a request before its deadline.
    AgentUnreachable,
    /// The guest (or the VMM running it) exited while the sandbox was in use.
    GuestExited,
    /// An operation ran past its deadline (exec timeouts are reported in `ExitStatus`, not here).
    Timeout,
    /// The peer broke the wire protocol: bad magic, version mismatch, oversized or malformed frame.
    Protocol,
    /// A host or guest I/O operation failed.
    Io,
    /// The file or directory does not exist.
    NotFound,
    /// The guest refused access, or a path tried to leave its confined root.
    PermissionDenied,
    /// Data exceeds a documented size cap.
    TooLarge,
    /// The call is not allowed in the sandbox's current state (for example exec after destroy).
    InvalidState,
    /// The backend or agent does not support this operation.
    Unsupported,
    /// A bug: an invariant did not hold. Please report it.
    Internal,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidSpec => "invalid spec",
            ErrorKind::InvalidRequest => "invalid request",
            ErrorKind::HostSetup => "host setup",
            ErrorKind::AgentUnreachable => "agent unreachable",
            ErrorKind::GuestExited => "guest exited",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Io => "io",
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::TooLarge => "too large",
            ErrorKind::InvalidState => "invalid state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The public SDK error: `kind` for matching, `message` for people, `source` for the chain.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a short sentence describing it.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A [`ErrorKind::HostSetup`] error whose message says what is wrong and how to fix it.
    pub fn host_setup(problem: impl fmt::Display, fix: impl fmt::Display) -> Self {
        Error::new(ErrorKind::HostSetup, format!("{problem}; fix: {fix}"))
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind or the cause.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// `{e}` prints `kind: message`; `{e:#}` also appends `: cause` for each error of the source
/// chain, outermost first.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if f.alternate() {
            let mut cause = std::error::Error::source(self);
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, "I/O failed.", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_has_kind_and_message_and_chains_source() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::with_source(ErrorKind::Io, "Could not write the overlay.", io);
        assert_eq!(e.to_string(), "io: Could not write the overlay.");
        assert_eq!(
            e.source().map(|s| s.to_string()),
            Some("disk on fire".to_owned())
        );
    }

    #[test]
    fn alternate_display_appends_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open the overlay")]
        struct Mid(#[source] std::io::Error);
        let e = Error::with_source(
            ErrorKind::Io,
            "Could not create the sandbox.",
            Mid(std::io::Error::other("disk on fire")),
        );
        assert_eq!(e.to_string(), "io: Could not create the sandbox.");
        assert_eq!(
            format!("{e:#}"),
            "io: Could not create the sandbox.: cannot open the overlay: disk on fire"
        );
        let plain = Error::new(ErrorKind::Timeout, "Gave up after 2s.");
        assert_eq!(format!("{plain:#}"), "timeout: Gave up after 2s.");
    }

    #[test]
    fn public_errors_do_not_restate_their_kind() {
        let spec: Error = crate::spec::SpecError::Vcpus { got: 0, max: 8 }.into();
        let req: Error = crate::exec::ExecError::EmptyArgv.into();
        for e in [spec, req] {
            let text = e.to_string().to_lowercase();
            let kind = e.kind().as_str();
            assert_eq!(text.matches(kind).count(), 1, "{e}");
        }
    }

    #[test]
    fn host_setup_names_the_fix() {
        let e = Error::host_setup("/dev/kvm is not writable", "add your user to the kvm group");
        assert_eq!(e.kind(), ErrorKind::HostSetup);
        assert!(
            e.message().contains("fix: add your user to the kvm group"),
            "{e}"
        );
    }

    #[test]
    fn io_not_found_maps_to_not_found() {
        let e: Error = std::io::Error::from(std::io::ErrorKind::NotFound).into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
