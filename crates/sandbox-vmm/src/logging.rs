//! Bounded logging for everything a guest can cause.
//!
//! A guest that loops on a bad register write, a broken virtqueue or an unknown port must not be
//! able to flood the host log. Two mechanisms, used together:
//!
//! 1. `guest_log!` — a `tracing` event behind a per-call-site
//!    [`RateLimit`]: at most [`GUEST_LOG_BURST`] events per [`GUEST_LOG_INTERVAL`] from one call
//!    site; the rest are counted, and the first event let through after that carries one extra
//!    line, "`K` messages from this call site were suppressed". Every log line a guest action
//!    can trigger (devices, bus, vCPU exits) goes through it.
//! 2. [`CappedLog`] — a `Write` that stops writing after a byte cap and writes one
//!    [`LOG_TRUNCATED_MARKER`] line instead; `sandbox-vmm` puts its tracing output behind one
//!    (`--log-cap-bytes`, default [`DEFAULT_LOG_CAP_BYTES`]).
//!
//! ```
//! use std::io::Write;
//! use sandbox_vmm::logging::{CappedLog, LOG_TRUNCATED_MARKER};
//!
//! let mut log = CappedLog::new(Vec::new(), 8);
//! log.write_all(b"line 1\n")?;
//! log.write_all(b"line 2\n")?; // past the cap: dropped, the marker is written once
//! log.write_all(b"line 3\n")?;
//! assert_eq!(log.into_inner(), [&b"line 1\n"[..], LOG_TRUNCATED_MARKER.as_bytes()].concat());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::lock;

/// Events one call site may log per [`GUEST_LOG_INTERVAL`].
pub const GUEST_LOG_BURST: u32 = 10;
/// The rate limiter's window.
pub const GUEST_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Default cap of `sandbox-vmm`'s log (its stderr), bytes: 16 MiB.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 16 << 20;
/// The line [`CappedLog`] writes, once, when it reaches its cap.
pub const LOG_TRUNCATED_MARKER: &str =
    "sandbox-vmm: the log reached its size cap (--log-cap-bytes); later messages are dropped\n";

/// What [`RateLimit::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Log this event. `suppressed` events from this site were dropped since the last one that
    /// was logged (report them once, now).
    Log {
        /// Events dropped before this one.
        suppressed: u64,
    },
    /// Drop this event (it is counted).
    Suppress,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

/// A fixed-window rate limiter: `burst` admissions per `interval`, then everything is counted
/// and dropped until the window ends. `const`-constructible, so each call site of
/// `guest_log!` owns one in a `static`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    window: Mutex<Window>,
}

impl RateLimit {
    /// A limiter letting `burst` events through per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            window: Mutex::new(Window {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// The limiter `guest_log!` uses: [`GUEST_LOG_BURST`] per
    /// [`GUEST_LOG_INTERVAL`].
    pub const fn guest() -> Self {
        Self::new(GUEST_LOG_BURST, GUEST_LOG_INTERVAL)
    }

    /// Decides about one event happening now.
    pub fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    /// Decides about one event happening at `now` (monotonic; an earlier `now` than the window
    /// start counts as inside the window).
    pub fn admit_at(&self, now: Instant) -> Admission {
        let mut w = lock(&self.window);
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            w.start = Some(now);
            w.used = 0;
        }
        if w.used < self.burst {
            w.used += 1;
            Admission::Log {
                suppressed: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed = w.suppressed.saturating_add(1);
            Admission::Suppress
        }
    }

    /// Events dropped since the last admitted one.
    pub fn suppressed(&self) -> u64 {
        lock(&self.window).suppressed
    }
}

/// A `tracing` event at `$level` (`debug`, `info`, `warn`, `error`) that a guest can cause,
/// rate-limited per call site ([`RateLimit::guest`]). Same arguments as the `tracing` macro.
///
/// ```text
/// guest_log!(warn, index, "virtio-mmio: invalid virtqueue configuration refused");
/// ```
macro_rules! guest_log {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::guest();
        if let $crate::logging::Admission::Log { suppressed } = LIMIT.admit() {
            if suppressed > 0 {
                ::tracing::$level!(
                    suppressed,
                    "messages from this call site were suppressed (rate limit)"
                );
            }
            ::tracing::$level!($($arg)+);
        }
    }};
}
pub(crate) use guest_log;

/// A `Write` that passes whole writes through until `cap` bytes have been written, then drops
/// every later write and writes [`LOG_TRUNCATED_MARKER`] once. A write that does not fit is
/// dropped whole (a `tracing` event is one write, so the log ends on a line boundary); the output
/// never exceeds `cap + LOG_TRUNCATED_MARKER.len()` bytes. Dropped writes report success, so the
/// logger keeps running.
#[derive(Debug)]
pub struct CappedLog<W: Write> {
    inner: W,
    cap: u64,
    written: u64,
    truncated: bool,
}

impl<W: Write> CappedLog<W> {
    /// A writer that passes at most `cap` bytes to `inner`.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            cap,
            written: 0,
            truncated: false,
        }
    }

    /// Bytes passed through so far (without the marker).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the cap was reached.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for CappedLog<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.truncated {
            return Ok(buf.len());
        }
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        match self.written.checked_add(len) {
            Some(end) if end <= self.cap => {
                self.inner.write_all(buf)?;
                self.written = end;
            }
            _ => {
                self.truncated = true;
                self.inner.write_all(LOG_TRUNCATED_MARKER.as_bytes())?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Test support: runs code under a thread-local `tracing` subscriber that keeps every event.
#[cfg(test)]
pub(crate) mod capture {
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            crate::bus::lock(&self.0).extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` with every event of this thread (all levels) formatted one per line; returns
    /// the lines.
    pub(crate) fn log_lines(f: impl FnOnce()) -> Vec<String> {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = crate::bus::lock(&buf.0).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_log_limits_one_call_site() {
        let lines = capture::log_lines(|| {
            for i in 0..1000 {
                guest_log!(warn, i, "guest_log test line");
            }
        });
        let n = lines
            .iter()
            .filter(|l| l.contains("guest_log test line"))
            .count();
        // One window, or two if this test straddles a window boundary on a slow machine.
        assert!(
            (GUEST_LOG_BURST as usize..=2 * GUEST_LOG_BURST as usize).contains(&n),
            "{n} lines: {lines:?}"
        );
    }

    #[test]
    fn limiter_admits_the_burst_then_counts_and_reports_once() {
        let limit = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.admit_at(t0), Admission::Log { suppressed: 0 });
        }
        for i in 1..=50 {
            assert_eq!(
                limit.admit_at(t0 + Duration::from_secs(9)),
                Admission::Suppress
            );
            assert_eq!(limit.suppressed(), i);
        }
        // A new window: the first event carries the count, once.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limit.admit_at(t1), Admission::Log { suppressed: 50 });
        assert_eq!(limit.admit_at(t1), Admission::Log { suppressed: 0 });
        assert_eq!(limit.admit_at(t1), Admission::Log { suppressed: 0 });
        assert_eq!(limit.admit_at(t1), Admission::Suppress);
        // Time going backwards stays inside the window.
        assert_eq!(limit.admit_at(t0), Admission::Suppress);
        assert_eq!(limit.suppressed(), 2);
    }

    #[test]
    fn a_zero_burst_suppresses_everything() {
        let limit = RateLimit::new(0, Duration::from_secs(1));
        assert_eq!(limit.admit(), Admission::Suppress);
        assert_eq!(limit.admit(), Admission::Suppress);
        assert_eq!(limit.suppressed(), 2);
    }

    #[test]
    fn capped_log_drops_past_the_cap_and_marks_once() {
        let mut log = CappedLog::new(Vec::new(), 20);
        for _ in 0..1000 {
            assert_eq!(log.write(b"0123456\n").expect("write"), 8);
        }
        assert!(log.truncated());
        assert_eq!(log.written(), 16);
        let out = log.into_inner();
        assert_eq!(
            out,
            [&b"0123456\n0123456\n"[..], LOG_TRUNCATED_MARKER.as_bytes()].concat()
        );
        assert!(out.len() as u64 <= 20 + LOG_TRUNCATED_MARKER.len() as u64);
    }

    #[test]
    fn capped_log_of_zero_writes_only_the_marker() {
        let mut log = CappedLog::new(Vec::new(), 0);
        log.write_all(b"x").expect("write");
        log.write_all(b"").expect("write"); // an empty write fits and passes
        log.write_all(b"y").expect("write");
        assert_eq!(log.into_inner(), LOG_TRUNCATED_MARKER.as_bytes());
    }

    proptest::proptest! {
        /// Whatever the write sizes, the output is a prefix of whole writes (at most `cap`
        /// bytes), then at most one marker.
        #[test]
        fn capped_log_never_exceeds_cap_plus_marker(
            cap in 0u64..200,
            writes in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..50), 0..40),
        ) {
            let mut log = CappedLog::new(Vec::new(), cap);
            for w in &writes {
                log.write_all(w).expect("write");
            }
            let truncated = log.truncated();
            let written = log.written();
            let out = log.into_inner();
            let marker = LOG_TRUNCATED_MARKER.len() as u64;
            proptest::prop_assert!(written <= cap);
            proptest::prop_assert_eq!(out.len() as u64, written + if truncated { marker } else { 0 });
            let body = &out[..written as usize];
            proptest::prop_assert!(writes.concat().starts_with(body));
        }
    }
}
