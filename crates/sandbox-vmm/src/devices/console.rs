//! Bounded destinations for the guest console.
//!
//! The serial device writes one byte per guest `out`; [`LineBuffer`] collects bytes into lines
//! (at most [`MAX_LINE`] bytes each) so the host sees one write per line, not per byte (per-byte
//! writes cost seconds of boot under nesting, docs/bench.md). Lines go to a [`LineSink`]:
//! [`CappedWriter`] (a file or stdout that stops growing at a byte cap) or [`ConsoleRing`] (a
//! bounded in-memory ring that tests and the SDK can wait on). Neither grows with what the guest
//! prints, so a console flood cannot exhaust host memory or disk.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::lock;
use crate::logging::guest_log;

/// Longest line kept, bytes; a longer line is cut into pieces of this size.
pub const MAX_LINE: usize = 4096;

/// Receives complete console lines (each ends with `\n`, except a final partial line or a piece
/// of an over-long line).
pub trait LineSink: Send {
    /// One line of console output.
    fn line(&mut self, line: &[u8]);
}

impl<S: LineSink + ?Sized> LineSink for Box<S> {
    fn line(&mut self, line: &[u8]) {
        (**self).line(line);
    }
}

/// Sends every line to several sinks.
pub struct Tee(pub Vec<Box<dyn LineSink>>);

impl LineSink for Tee {
    fn line(&mut self, line: &[u8]) {
        for sink in &mut self.0 {
            sink.line(line);
        }
    }
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Tee").field(&self.0.len()).finish()
    }
}

/// A `Write` that groups bytes into lines for a [`LineSink`]. `flush` does nothing: the serial
/// device flushes after every byte, and honoring that would defeat the buffering.
#[derive(Debug)]
pub struct LineBuffer<S: LineSink> {
    buf: Vec<u8>,
    sink: S,
}

impl<S: LineSink> LineBuffer<S> {
    /// An empty buffer in front of `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            buf: Vec::with_capacity(256),
            sink,
        }
    }

    /// Hands a pending partial line to the sink (at VM exit).
    pub fn flush_partial(&mut self) {
        if !self.buf.is_empty() {
            self.sink.line(&self.buf);
            self.buf.clear();
        }
    }
}

impl<S: LineSink> Write for LineBuffer<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        for &b in data {
            self.buf.push(b);
            if b == b'\n' || self.buf.len() >= MAX_LINE {
                self.sink.line(&self.buf);
                self.buf.clear();
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: LineSink> Drop for LineBuffer<S> {
    fn drop(&mut self) {
        self.flush_partial();
    }
}

/// Writes lines to `W` until `cap` bytes have been written, then drops the rest (logging once).
/// A line that does not fit whole is dropped whole, so the output ends on a line boundary.
#[derive(Debug)]
pub struct CappedWriter<W: Write + Send> {
    inner: W,
    written: u64,
    cap: u64,
    dropped: u64,
}

impl<W: Write + Send> CappedWriter<W> {
    /// A writer that accepts at most `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            written: 0,
            cap,
            dropped: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes dropped because of the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write + Send> LineSink for CappedWriter<W> {
    fn line(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.dropped == 0 && self.written.saturating_add(len) <= self.cap {
            match self.inner.write_all(line).and_then(|()| self.inner.flush()) {
                Ok(()) => self.written += len,
                // Once per line the guest prints: rate-limited.
                Err(err) => guest_log!(warn, %err, "console write failed"),
            }
        } else {
            if self.dropped == 0 {
                tracing::warn!(
                    cap = self.cap,
                    "console output reached its cap; dropping the rest"
                );
            }
            self.dropped = self.dropped.saturating_add(len);
        }
    }
}

#[derive(Debug, Default)]
struct RingState {
    lines: VecDeque<String>,
    bytes: usize,
    /// Lines ever pushed; `seen - lines.len()` were evicted.
    pushed: u64,
}

/// A bounded ring of the most recent console lines (at most `cap_bytes` of text), shared between
/// the serial device and readers; cloning shares the ring.
#[derive(Debug, Clone)]
pub struct ConsoleRing {
    inner: Arc<(Mutex<RingState>, Condvar)>,
    cap_bytes: usize,
}

impl ConsoleRing {
    /// An empty ring holding at most `cap_bytes` bytes of lines (at least one line is kept).
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            inner: Arc::new((Mutex::new(RingState::default()), Condvar::new())),
            cap_bytes,
        }
    }

    /// The lines currently held, oldest first (lossy UTF-8).
    pub fn lines(&self) -> Vec<String> {
        lock(&self.inner.0).lines.iter().cloned().collect()
    }

    /// Waits until a line containing `needle` is in the ring or `timeout` passes; returns that line.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (mutex, cond) = &*self.inner;
        let mut state = lock(mutex);
        loop {
            if let Some(line) = state.lines.iter().find(|l| l.contains(needle)) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = cond
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl LineSink for ConsoleRing {
    fn line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).into_owned();
        let (mutex, cond) = &*self.inner;
        let mut state = lock(mutex);
        state.bytes += text.len();
        state.lines.push_back(text);
        state.pushed += 1;
        while state.bytes > self.cap_bytes && state.lines.len() > 1 {
            if let Some(old) = state.lines.pop_front() {
                state.bytes -= old.len();
            }
        }
        drop(state);
        cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<Vec<u8>>>>);
    impl LineSink for Lines {
        fn line(&mut self, line: &[u8]) {
            self.0.lock().expect("lock").push(line.to_vec());
        }
    }

    #[test]
    fn bytes_are_grouped_into_lines() {
        let lines = Lines::default();
        let mut buf = LineBuffer::new(lines.clone());
        for b in b"hello\nwor" {
            buf.write_all(&[*b]).expect("write");
            buf.flush().expect("flush");
        }
        assert_eq!(*lines.0.lock().expect("lock"), vec![b"hello\n".to_vec()]);
        drop(buf);
        assert_eq!(lines.0.lock().expect("lock")[1], b"wor".to_vec());
    }

    #[test]
    fn over_long_lines_are_cut() {
        let lines = Lines::default();
        let mut buf = LineBuffer::new(lines.clone());
        buf.write_all(&vec![b'a'; MAX_LINE * 2 + 1]).expect("write");
        assert_eq!(lines.0.lock().expect("lock").len(), 2);
        assert!(lines
            .0
            .lock()
            .expect("lock")
            .iter()
            .all(|l| l.len() == MAX_LINE));
    }

    #[test]
    fn capped_writer_stops_at_the_cap() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        w.line(b"12345\n");
        w.line(b"6789\n"); // 11 bytes total: dropped whole
        w.line(b"1\n"); // would fit, but output stays cut at the first drop
        assert_eq!(w.written(), 6);
        assert_eq!(w.dropped(), 7);
        assert_eq!(w.into_inner(), b"12345\n".to_vec());
    }

    #[test]
    fn a_console_flood_stays_within_the_cap() {
        let mut w = CappedWriter::new(Vec::new(), 1000);
        let mut buf = LineBuffer::new(Lines::default());
        for _ in 0..10_000 {
            w.line(b"flood flood flood\n");
            buf.write_all(b"x").expect("write");
        }
        assert!(w.written() <= 1000);
        assert_eq!(w.into_inner().len() as u64, 1000 / 18 * 18);
    }

    #[test]
    fn ring_evicts_oldest_lines_past_its_cap() {
        let mut ring = ConsoleRing::new(10);
        for i in 0..100 {
            ring.line(format!("line{i}\n").as_bytes());
        }
        assert_eq!(ring.lines(), vec!["line99\n".to_string()]);
        assert_eq!(
            ring.wait_for_line("line99", Duration::from_millis(1)),
            Some("line99\n".into())
        );
        assert_eq!(
            ring.wait_for_line("line1\n", Duration::from_millis(1)),
            None
        );
    }

    #[test]
    fn ring_wakes_a_waiter() {
        let ring = ConsoleRing::new(1 << 16);
        let mut writer = ring.clone();
        let t = std::thread::spawn(move || writer.line(b"sandbox-init: ready\n"));
        assert_eq!(
            ring.wait_for_line("sandbox-init: ready", Duration::from_secs(60)),
            Some("sandbox-init: ready\n".into())
        );
        t.join().expect("writer thread");
    }
}
