//! virtio-vsock (virtio 1.2 §5.10) with a Unix-socket host side.
//!
//! Queues: 0 = rx (device → guest), 1 = tx (guest → device), 2 = event (unused: we never
//! migrate, so no TRANSPORT_RESET is ever sent). Config space: `le64 guest_cid`. Stream sockets
//! only; packets are 44-byte [`packet::Header`]s plus payload, with credit-based flow control
//! (virtio 1.2 §5.10.6.3) in both directions.
//!
//! The host side ([`muxer::Muxer`]) follows the established Unix-socket scheme: a host process
//! connects to `uds_path`, writes `CONNECT <guest_port>\n`, reads `OK <host_port>\n` once the
//! guest accepted, then talks. Guest-initiated connections are refused with an RST. A host that
//! writes and closes at once still gets every byte to the guest before the SHUTDOWN; clients that
//! never complete the CONNECT line, or whose REQUEST the guest never answers, are closed after
//! [`VsockConfig::connect_line_timeout`] / [`VsockConfig::response_timeout`] (see [`muxer`]).
//!
//! # Wiring in the VMM's event loop
//!
//! Besides the queue eventfds of the transport (see [`super`]), register
//! [`Vsock::backend_fd`] for `EPOLLIN` (level-triggered). When it is readable call
//! `transport.lock().device_mut().handle_backend_event()`: it accepts connections, reads
//! CONNECT lines, moves host bytes into the guest's rx buffers (raising the interrupt) and
//! writes guest bytes to the host, all without blocking and with bounded work per call. The fd
//! is stable for the device's lifetime; connection sockets and the deadline timer live behind it
//! in a private epoll instance, so deadlines need no other wiring. The listener exists from [`Vsock::new`] on, so the host may connect before the
//! guest driver is up; the REQUEST is delivered once the driver posts rx buffers.
//!
//! Hardening: a packet with a short header is dropped (no reply possible); one whose declared
//! length exceeds 64 KiB or the bytes in its buffers, whose type is not stream, whose
//! destination CID is not the host, whose op is unknown, or that targets no connection gets an
//! RST; one with a spoofed source CID is dropped. A guest sending more than its credit is
//! reset. Buffers are checked against guest memory before use.

pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::chain::{self, ChainDesc};
use super::{
    complete, feature, read_config_bytes, VirtioDevice, VirtioError, VirtioInterrupt,
    DEVICE_ID_VSOCK, VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use packet::{Header, HEADER_LEN, MAX_PAYLOAD};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Default bound on host connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default bytes buffered per connection towards the host (our `buf_alloc`), 256 KiB.
pub const DEFAULT_MAX_BUFFERED_BYTES: u32 = 256 * 1024;
/// Default bound on host connections not yet established (reading the CONNECT line or waiting
/// for the guest's answer). While that many are pending, new clients wait in the listen backlog.
pub const DEFAULT_MAX_PENDING: usize = 16;
/// Default time a host client has to send its whole `CONNECT <port>\n` line, counted from the
/// accept; a client that sends nothing, a partial line or a bad one is closed by then.
pub const DEFAULT_CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time the guest has to answer a connection REQUEST (RESPONSE or RST), counted from when
/// the REQUEST is put in its rx queue. Linux answers at once; the margin is for a loaded host.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2, `u32::MAX`) or does not fit in 32 bits.
    #[error("guest CID {cid} is reserved or out of range; use 3 to 4294967294.")]
    InvalidCid {
        /// The refused CID.
        cid: u64,
    },
    /// The Unix listener cannot be bound.
    #[error("cannot listen on the vsock socket {path}.")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The private epoll instance or the deadline timer cannot be set up.
    #[error("cannot set up the vsock epoll instance.")]
    Epoll(#[source] io::Error),
    /// A bound in [`VsockConfig`] is zero, which would make the device unusable.
    #[error("vsock setting {name} must not be zero.")]
    ZeroLimit {
        /// The [`VsockConfig`] field.
        name: &'static str,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VsockError>;

/// How a vsock device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VsockConfig {
    /// The guest's context ID (3 to 2^32 − 2).
    pub guest_cid: u64,
    /// Where the host-side Unix listener is bound; must not exist yet. Removed on drop.
    pub uds_path: PathBuf,
    /// Most simultaneous host connections.
    pub max_connections: usize,
    /// Most bytes buffered per connection from the guest towards the host (advertised to the
    /// guest as `buf_alloc`).
    pub max_buffered_bytes: u32,
    /// Most host connections not yet established (part of `max_connections`; at least 1).
    pub max_pending: usize,
    /// Time a host client has to complete its `CONNECT` line (non-zero).
    pub connect_line_timeout: Duration,
    /// Time the guest has to answer a delivered REQUEST (non-zero).
    pub response_timeout: Duration,
}

impl VsockConfig {
    /// A config with default bounds.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_pending: DEFAULT_MAX_PENDING,
            connect_line_timeout: DEFAULT_CONNECT_LINE_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        }
    }

    /// Sets the connection bound.
    #[must_use]
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the per-connection buffer bound, in bytes.
    #[must_use]
    pub fn with_max_buffered_bytes(mut self, n: u32) -> Self {
        self.max_buffered_bytes = n;
        self
    }

    /// Sets the bound on connections not yet established.
    #[must_use]
    pub fn with_max_pending(mut self, n: usize) -> Self {
        self.max_pending = n;
        self
    }

    /// Sets the time a host client has to complete its `CONNECT` line.
    #[must_use]
    pub fn with_connect_line_timeout(mut self, t: Duration) -> Self {
        self.connect_line_timeout = t;
        self
    }

    /// Sets the time the guest has to answer a delivered REQUEST.
    #[must_use]
    pub fn with_response_timeout(mut self, t: Duration) -> Self {
        self.response_timeout = t;
        self
    }
}

struct Active<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    // Held so the driver's event buffers stay owned by the device; never used.
    _event: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-vsock device.
pub struct Vsock<M> {
    guest_cid: u64,
    muxer: Muxer,
    queue_sizes: [u16; 3],
    active: Option<Active<M>>,
    descs: Vec<ChainDesc>,
    bounce: Box<[u8]>,
}

impl<M> std::fmt::Debug for Vsock<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("connections", &self.muxer.connection_count())
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> Vsock<M> {
    fn check(config: &VsockConfig) -> Result<()> {
        let cid = config.guest_cid;
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid { cid });
        }
        let zero = [
            ("max_pending", config.max_pending == 0),
            (
                "connect_line_timeout",
                config.connect_line_timeout.is_zero(),
            ),
            ("response_timeout", config.response_timeout.is_zero()),
        ];
        if let Some(&(name, _)) = zero.iter().find(|(_, z)| *z) {
            return Err(VsockError::ZeroLimit { name });
        }
        Ok(())
    }

    /// A device for `config`; binds the Unix listener now.
    ///
    /// # Errors
    /// [`VsockError::InvalidCid`], [`VsockError::ZeroLimit`] (`max_pending` or a timeout is
    /// zero), [`VsockError::Bind`] (e.g. the path exists), or [`VsockError::Epoll`].
    pub fn new(config: &VsockConfig) -> Result<Self> {
        Self::check(config)?;
        let muxer = Muxer::new(config)?;
        Ok(Self::on(config.guest_cid, muxer))
    }

    /// A device for `config` on `listener`, a listening Unix stream socket someone else made
    /// (the jailed VMM inherits it); `config.uds_path` only names it in logs, and the socket
    /// file is left alone on drop.
    ///
    /// # Errors
    /// As [`Vsock::new`], without `Bind`.
    pub fn with_listener(config: &VsockConfig, listener: UnixListener) -> Result<Self> {
        Self::check(config)?;
        let muxer = Muxer::with_listener(config, listener, None)?;
        Ok(Self::on(config.guest_cid, muxer))
    }

    fn on(cid: u64, muxer: Muxer) -> Self {
        Self {
            guest_cid: cid,
            muxer,
            queue_sizes: [QUEUE_SIZE; 3],
            active: None,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            bounce: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
        }
    }

    /// The fd the VMM's event loop watches for `EPOLLIN`; see the module docs.
    pub fn backend_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    /// Number of host connections (any state).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Event-loop entry point for [`Vsock::backend_fd`] readiness: services host sockets, then
    /// fills the guest's rx queue if the device is active.
    ///
    /// # Errors
    /// [`VirtioError::Interrupt`] if the interrupt cannot be raised.
    pub fn handle_backend_event(&mut self) -> std::result::Result<(), VirtioError> {
        self.muxer.process_events();
        self.process_rx()
    }

    /// Moves packets from the muxer into the rx queue, one pass at most.
    fn process_rx(&mut self) -> std::result::Result<(), VirtioError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = 0usize;
        for _ in 0..active.rx.size() {
            let Some(desc_chain) = super::pop_chain(&mut active.rx, &active.mem) else {
                break;
            };
            let head = desc_chain.head_index();
            let max = usize::from(active.rx.size());
            let usable = chain::collect(desc_chain, max, &mut self.descs).is_ok()
                && self.descs.iter().all(|d| d.write_only)
                && chain::check_ranges(&active.mem, &self.descs).is_ok()
                && chain::total_len(&self.descs) >= HEADER_LEN as u64;
            if !usable {
                crate::logging::guest_log!(debug, "vsock: unusable rx buffer returned empty");
                if complete(&mut active.rx, &active.mem, head, 0) {
                    used += 1;
                }
                continue;
            }
            let room = chain::total_len(&self.descs) - HEADER_LEN as u64;
            let cap = usize::try_from(room)
                .unwrap_or(usize::MAX)
                .min(self.bounce.len());
            let Some((hdr, n)) = self.muxer.next_rx(&mut self.bounce[..cap]) else {
                // Nothing to send: give the buffer back for later.
                active.rx.go_to_previous_position();
                break;
            };
            let mut len = 0;
            let wrote =
                chain::write_at(&active.mem, &self.descs, 0, &hdr.to_bytes()).and_then(|h| {
                    len += h;
                    chain::write_at(
                        &active.mem,
                        &self.descs,
                        HEADER_LEN as u64,
                        &self.bounce[..n],
                    )
                });
            match wrote {
                Ok(p) => len += p,
                Err(err) => {
                    crate::logging::guest_log!(debug, error = %err, "vsock: rx write failed")
                }
            }
            // len <= HEADER_LEN + 64 KiB.
            let len = u32::try_from(len).unwrap_or(0);
            if complete(&mut active.rx, &active.mem, head, len) {
                used += 1;
            }
        }
        if used > 0 {
            active.interrupt.signal_used_queue()?;
        }
        Ok(())
    }

    /// Takes packets from the tx queue and hands them to the muxer, one pass at most.
    fn process_tx(&mut self) -> std::result::Result<(), VirtioError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = 0usize;
        for _ in 0..active.tx.size() {
            let Some(desc_chain) = super::pop_chain(&mut active.tx, &active.mem) else {
                break;
            };
            let head = desc_chain.head_index();
            let max = usize::from(active.tx.size());
            if chain::collect(desc_chain, max, &mut self.descs).is_ok() {
                let split = self
                    .descs
                    .iter()
                    .position(|d| d.write_only)
                    .unwrap_or(self.descs.len());
                tx_packet(
                    &active.mem,
                    &self.descs[..split],
                    &mut self.muxer,
                    &mut self.bounce,
                );
            } else {
                crate::logging::guest_log!(debug, "vsock: over-long tx chain dropped");
            }
            if complete(&mut active.tx, &active.mem, head, 0) {
                used += 1;
            }
        }
        if used > 0 {
            active.interrupt.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Decodes one tx packet from its readable buffers and hands it to the muxer.
fn tx_packet<M: GuestMemory>(
    mem: &M,
    readable: &[ChainDesc],
    muxer: &mut Muxer,
    bounce: &mut [u8],
) {
    if chain::check_ranges(mem, readable).is_err() {
        crate::logging::guest_log!(debug, "vsock: tx buffer outside guest memory dropped");
        return;
    }
    let mut raw = [0u8; HEADER_LEN];
    match chain::read_at(mem, readable, 0, &mut raw) {
        Ok(n) if n == HEADER_LEN => {}
        _ => {
            crate::logging::guest_log!(debug, "vsock: short tx header dropped");
            return;
        }
    }
    let hdr = Header::from_bytes(&raw);
    let avail = chain::total_len(readable) - HEADER_LEN as u64;
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD || u64::from(hdr.len) > avail || len > bounce.len() {
        crate::logging::guest_log!(
            debug,
            len = hdr.len,
            avail,
            "vsock: tx packet with a bad length"
        );
        muxer.handle_malformed(&hdr);
        return;
    }
    match chain::read_at(mem, readable, HEADER_LEN as u64, &mut bounce[..len]) {
        Ok(n) if n == len => muxer.handle_guest_packet(&hdr, &bounce[..len]),
        _ => muxer.handle_malformed(&hdr),
    }
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Vsock<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::logging::guest_log!(debug, offset, "vsock: config write ignored");
    }

    fn activate(
        &mut self,
        mem: M,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::result::Result<(), VirtioError> {
        let got = queues.len();
        let Ok([rx, tx, event]) = <[Queue; 3]>::try_from(queues) else {
            return Err(VirtioError::QueueCount { expected: 3, got });
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            _event: event,
            interrupt,
        });
        // Connections may have been requested before the driver was ready.
        self.process_rx()
    }

    fn process_queue(&mut self, index: usize) -> std::result::Result<(), VirtioError> {
        match index {
            0 => self.process_rx(),
            1 => {
                self.process_tx()?;
                // Tx may have produced replies (RST, credit) or freed credit for host data.
                self.process_rx()
            }
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::packet::{op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
    use super::*;
    use crate::devices::virtio::test_utils::{irq, mem, CountingIrq, TestQueue};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const CID: u64 = 3;
    const RX_BUF: u64 = 0x1_0000;
    const RX_STRIDE: u64 = 0x2000;
    const RX_DATA: u32 = 4096;
    const TX_BUF: u64 = 0x5_0000;

    /// A fake guest driver: rx/tx/event queues in guest memory and a view of the packets.
    struct Guest {
        m: GuestMemoryMmap,
        rxq: TestQueue,
        txq: TestQueue,
        dev: Vsock<GuestMemoryMmap>,
        line: Arc<CountingIrq>,
        rx_seen: u16,
        rx_addr: HashMap<u16, u64>,
        next_rx: u64,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn guest(config: impl FnOnce(VsockConfig) -> VsockConfig) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vsock.sock");
        let dev = Vsock::new(&config(VsockConfig::new(CID, &path))).expect("vsock");
        let m = mem();
        let rxq = TestQueue::new(&m, 0x1000, 32);
        let txq = TestQueue::new(&m, 0x2000, 16);
        let evq = TestQueue::new(&m, 0x3000, 16);
        let line = irq();
        let mut g = Guest {
            m,
            rxq,
            txq,
            dev,
            line,
            rx_seen: 0,
            rx_addr: HashMap::new(),
            next_rx: 0,
            path,
            _dir: dir,
        };
        let queues = vec![g.rxq.queue(), g.txq.queue(), evq.queue()];
        let interrupt = Arc::new(VirtioInterrupt::new(g.line.clone()));
        g.dev
            .activate(g.m.clone(), feature(VIRTIO_F_VERSION_1), queues, interrupt)
            .expect("activate");
        g
    }

    fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Header::default()
        }
    }

    impl Guest {
        /// Posts `n` rx buffers (44-byte header descriptor + 4 KiB data descriptor, as Linux 6.1).
        fn post_rx(&mut self, n: usize) {
            for _ in 0..n {
                let addr = RX_BUF + (self.next_rx % 16) * RX_STRIDE;
                self.next_rx += 1;
                let head = self.rxq.add_chain(
                    &self.m,
                    &[
                        (addr, HEADER_LEN as u32, true),
                        (addr + HEADER_LEN as u64, RX_DATA, true),
                    ],
                );
                self.rx_addr.insert(head, addr);
            }
        }

        /// Packets the device put on the rx ring since last time; their buffers are reposted.
        fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            while self.rx_seen != self.rxq.used_idx(&self.m) {
                let (id, len) = self.rxq.used_elem(&self.m, self.rx_seen);
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let addr = self.rx_addr[&(id as u16)];
                let mut raw = [0u8; HEADER_LEN];
                self.m
                    .read_slice(&mut raw, GuestAddress(addr))
                    .expect("hdr");
                let h = Header::from_bytes(&raw);
                assert_eq!(len as usize, HEADER_LEN + h.len as usize, "used length");
                let mut payload = vec![0u8; h.len as usize];
                self.m
                    .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                    .expect("payload");
                out.push((h, payload));
                self.post_rx(1);
            }
            out
        }

        /// Puts one packet on the tx queue (header and payload in separate descriptors, with
        /// `payload_room` bytes of payload buffer) and notifies the device.
        fn send_raw(&mut self, h: &Header, payload: &[u8], payload_room: u32) {
            self.m
                .write_slice(&h.to_bytes(), GuestAddress(TX_BUF))
                .expect("hdr");
            self.m
                .write_slice(payload, GuestAddress(TX_BUF + 0x100))
                .expect("payload");
            let before = self.txq.used_idx(&self.m);
            if payload_room == 0 {
                self.txq
                    .add_chain(&self.m, &[(TX_BUF, HEADER_LEN as u32, false)]);
            } else {
                self.txq.add_chain(
                    &self.m,
                    &[
                        (TX_BUF, HEADER_LEN as u32, false),
                        (TX_BUF + 0x100, payload_room, false),
                    ],
                );
            }
            self.dev.process_queue(1).expect("tx");
            assert_eq!(
                self.txq.used_idx(&self.m),
                before.wrapping_add(1),
                "tx completed"
            );
        }

        fn send(&mut self, mut h: Header, payload: &[u8]) {
            h.len = payload.len() as u32;
            self.send_raw(&h, payload, payload.len() as u32);
        }

        fn pump(&mut self) {
            for _ in 0..4 {
                self.dev.handle_backend_event().expect("backend");
            }
        }

        fn connect_host(&mut self, port: u32) -> UnixStream {
            let mut s = UnixStream::connect(&self.path).expect("connect");
            // A safety net against a hang, not a timing assertion.
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .expect("connect line");
            s
        }

        /// Host connects to guest port `port`; the guest accepts with `buf_alloc`.
        /// Returns the host stream and the host port.
        fn establish(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
            let mut host = self.connect_host(port);
            self.pump();
            let pkts = self.recv();
            assert_eq!(pkts.len(), 1, "{pkts:?}");
            let req = pkts[0].0;
            assert_eq!(req.op, op::REQUEST);
            let mut resp = hdr(op::RESPONSE, port, req.src_port);
            resp.buf_alloc = buf_alloc;
            self.send(resp, &[]);
            assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
            (host, req.src_port)
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            assert_eq!(s.read(&mut b).expect("read"), 1, "EOF before newline");
            line.push(b[0]);
        }
        String::from_utf8(line).expect("utf8")
    }

    fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).expect("read");
        buf
    }

    /// The device closed its end: EOF, or ECONNRESET when it closed with our bytes unread.
    fn assert_eof(s: &mut UnixStream) {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "expected EOF"),
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }

    fn payload_of(pkts: &[(Header, Vec<u8>)]) -> Vec<u8> {
        pkts.iter()
            .filter(|(h, _)| h.op == op::RW)
            .flat_map(|(_, p)| p.clone())
            .collect()
    }

    #[test]
    fn connect_handshake_and_data_both_ways() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let mut host = g.connect_host(1234);
        g.pump();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (op::REQUEST, HOST_CID, CID, 1234, TYPE_STREAM)
        );
        assert_eq!(req.buf_alloc, DEFAULT_MAX_BUFFERED_BYTES);
        g.send(hdr(op::RESPONSE, 1234, req.src_port), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));

        host.write_all(b"ping").expect("write");
        g.pump();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RW, 1234));
        assert_eq!(pkts[0].1, b"ping");

        g.send(hdr(op::RW, 1234, req.src_port), b"pong");
        assert_eq!(read_exact(&mut host, 4), b"pong");
        assert!(g.line.count() > 0);
        assert_eq!(g.dev.connection_count(), 1);
    }

    #[test]
    fn host_bytes_sent_right_after_connect_are_delivered() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let mut host = UnixStream::connect(&g.path).expect("connect");
        host.write_all(b"CONNECT 7\nearly").expect("write");
        g.pump();
        let req = g.recv()[0].0;
        g.send(hdr(op::RESPONSE, 7, req.src_port), &[]);
        g.pump();
        assert_eq!(payload_of(&g.recv()), b"early");
    }

    #[test]
    fn host_to_guest_respects_guest_credit() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let (mut host, hp) = g.establish(80, 8);
        host.write_all(b"abcdefghijklmnopqrst").expect("write");
        g.pump();
        assert_eq!(payload_of(&g.recv()), b"abcdefgh");
        g.pump();
        assert!(g.recv().is_empty(), "no credit, no data");
        let mut upd = hdr(op::CREDIT_UPDATE, 80, hp);
        upd.buf_alloc = 8;
        upd.fwd_cnt = 8;
        g.send(upd, &[]);
        assert_eq!(payload_of(&g.recv()), b"ijklmnop");
        upd.fwd_cnt = 16;
        g.send(upd, &[]);
        assert_eq!(payload_of(&g.recv()), b"qrst");
    }

    #[test]
    fn guest_to_host_credit_is_advertised_and_enforced() {
        let mut g = guest(|c| c.with_max_buffered_bytes(16));
        g.post_rx(8);
        let (mut host, hp) = g.establish(80, 4096);
        g.send(hdr(op::CREDIT_REQUEST, 80, hp), &[]);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.buf_alloc, pkts[0].0.fwd_cnt),
            (op::CREDIT_UPDATE, 16, 0)
        );
        g.send(hdr(op::RW, 80, hp), b"0123456789");
        assert_eq!(read_exact(&mut host, 10), b"0123456789");
        // Forwarding a quarter of the window or more triggers an unsolicited update.
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!((pkts[0].0.op, pkts[0].0.fwd_cnt), (op::CREDIT_UPDATE, 10));
        // More than the whole window in one packet: the guest ignored its credit.
        g.send(hdr(op::RW, 80, hp), &[b'x'; 17]);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RST, 80));
        assert_eof(&mut host);
        assert_eq!(g.dev.connection_count(), 0);
    }

    #[test]
    fn malformed_packets_get_rst_or_are_dropped() {
        let mut g = guest(|c| c);
        g.post_rx(16);
        let (mut host, hp) = g.establish(80, 4096);

        // Wrong destination CID.
        let mut h = hdr(op::REQUEST, 99, 5);
        h.dst_cid = 7;
        g.send(h, &[]);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (
                pkts[0].0.op,
                pkts[0].0.src_cid,
                pkts[0].0.dst_cid,
                pkts[0].0.dst_port
            ),
            (op::RST, 7, CID, 99)
        );
        // Not a stream socket.
        let mut h = hdr(op::REQUEST, 99, 5);
        h.type_ = 2;
        g.send(h, &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        // Guest-initiated connection: refused.
        g.send(hdr(op::REQUEST, 99, 5), &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        // Data for a connection that does not exist.
        g.send(hdr(op::RW, 99, 5), b"zz");
        assert_eq!(g.recv()[0].0.op, op::RST);
        // An RST for an unknown connection is not answered.
        g.send(hdr(op::RST, 99, 5), &[]);
        assert!(g.recv().is_empty());
        // Spoofed source CID: dropped without a reply.
        let mut h = hdr(op::REQUEST, 99, 5);
        h.src_cid = 9;
        g.send(h, &[]);
        assert!(g.recv().is_empty());
        // Header shorter than 44 bytes: dropped, but the chain is completed.
        g.m.write_slice(&[0u8; 20], GuestAddress(TX_BUF))
            .expect("hdr");
        g.txq.add_chain(&g.m, &[(TX_BUF, 20, false)]);
        g.dev.process_queue(1).expect("tx");
        assert!(g.recv().is_empty());
        // Declared length larger than the buffer: RST, and the connection is gone.
        let mut h = hdr(op::RW, 80, hp);
        h.len = 100;
        g.send_raw(&h, b"0123456789", 10);
        let pkts = g.recv();
        assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::RST, 80));
        assert_eof(&mut host);

        // Oversized and unknown-op packets on fresh connections reset them too.
        let (mut host, hp) = g.establish(81, 4096);
        let mut h = hdr(op::RW, 81, hp);
        h.len = 70_000;
        g.send_raw(&h, b"", 10);
        assert_eq!(g.recv()[0].0.op, op::RST);
        assert_eof(&mut host);
        let (mut host, hp) = g.establish(82, 4096);
        g.send(hdr(99, 82, hp), &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        assert_eof(&mut host);
        // A second RESPONSE on an established connection is a protocol error.
        let (mut host, hp) = g.establish(83, 4096);
        g.send(hdr(op::RESPONSE, 83, hp), &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        assert_eof(&mut host);
        assert_eq!(g.dev.connection_count(), 0);
    }

    #[test]
    fn connection_limit_closes_extra_host_connections() {
        let mut g = guest(|c| c.with_max_connections(2));
        g.post_rx(8);
        let _a = g.connect_host(1);
        let _b = g.connect_host(2);
        g.pump();
        let mut c = g.connect_host(3);
        g.pump();
        let reqs: Vec<u32> = g.recv().iter().map(|(h, _)| h.dst_port).collect();
        assert_eq!(reqs, vec![1, 2]);
        assert_eof(&mut c);
        assert_eq!(g.dev.connection_count(), 2);
    }

    #[test]
    fn guest_close_flushes_data_then_resets() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let (mut host, hp) = g.establish(80, 4096);
        g.send(hdr(op::RW, 80, hp), b"bye");
        let mut shut = hdr(op::SHUTDOWN, 80, hp);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(shut, &[]);
        assert_eq!(read_exact(&mut host, 3), b"bye");
        assert_eof(&mut host);
        let ops: Vec<u16> = g.recv().iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops.last(), Some(&op::RST));
        assert_eq!(g.dev.connection_count(), 0);
    }

    #[test]
    fn guest_half_close_shuts_the_host_write_side() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let (mut host, hp) = g.establish(80, 4096);
        let mut shut = hdr(op::SHUTDOWN, 80, hp);
        shut.flags = SHUTDOWN_SEND;
        g.send(shut, &[]);
        assert_eof(&mut host);
        // The other direction still works.
        host.write_all(b"still here").expect("write");
        g.pump();
        assert_eq!(payload_of(&g.recv()), b"still here");
    }

    #[test]
    fn host_close_sends_shutdown_and_forgets_the_connection() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let (host, hp) = g.establish(80, 4096);
        drop(host);
        g.pump();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        // The host is gone both ways: it sends and receives no more.
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.flags),
            (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        assert!(g.dev.muxer.is_idle());
        // The guest's close finds no connection: answered with RST, its RST with nothing.
        let mut shut = hdr(op::SHUTDOWN, 80, hp);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(shut, &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        g.send(hdr(op::RST, 80, hp), &[]);
        assert!(g.recv().is_empty());
        assert!(g.dev.muxer.is_idle());
    }

    /// Host data written with the CONNECT line, then a close: the guest accepts, gets every
    /// byte in order as it grants credit, and only then the SHUTDOWN.
    #[test]
    fn host_bytes_sent_before_a_close_arrive_before_the_shutdown() {
        for close_before_request in [true, false] {
            let mut g = guest(|c| c);
            g.post_rx(8);
            let mut host = UnixStream::connect(&g.path).expect("connect");
            host.write_all(b"CONNECT 1024\nhello").expect("write");
            if close_before_request {
                drop(host);
                g.pump();
            } else {
                g.pump();
                host.shutdown(std::net::Shutdown::Both).expect("shutdown");
                drop(host);
            }
            let mut pkts = g.recv();
            g.pump();
            pkts.extend(g.recv());
            assert_eq!(pkts.len(), 1, "{pkts:?}");
            let req = pkts[0].0;
            assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));
            g.pump();
            assert_eq!(g.dev.connection_count(), 1, "the request stands");
            // The guest accepts with a 2-byte window, smaller than the data.
            let mut resp = hdr(op::RESPONSE, 1024, req.src_port);
            resp.buf_alloc = 2;
            g.send(resp, &[]);
            let mut seen = g.recv();
            let mut consumed = 0u32;
            for _ in 0..10 {
                g.pump();
                seen.extend(g.recv());
                if seen.iter().any(|(h, _)| h.op == op::SHUTDOWN) {
                    break;
                }
                // Nothing beyond the window is in flight.
                let got = payload_of(&seen).len() as u32;
                assert!(got - consumed <= 2, "credit exceeded");
                consumed = got;
                let mut upd = hdr(op::CREDIT_UPDATE, 1024, req.src_port);
                upd.buf_alloc = 2;
                upd.fwd_cnt = consumed;
                g.send(upd, &[]);
                seen.extend(g.recv());
            }
            assert_eq!(payload_of(&seen), b"hello");
            let ops: Vec<u16> = seen.iter().map(|(h, _)| h.op).collect();
            assert_eq!(ops, [op::RW, op::RW, op::RW, op::SHUTDOWN], "{seen:?}");
            let last = seen[seen.len() - 1].0;
            assert_eq!(last.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
            assert!(g.dev.muxer.is_idle());
        }
    }

    #[test]
    fn host_half_close_still_gets_the_guest_reply() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let mut host = UnixStream::connect(&g.path).expect("connect");
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        host.write_all(b"CONNECT 80\nquestion").expect("write");
        host.shutdown(std::net::Shutdown::Write).expect("shutdown");
        g.pump();
        let req = g.recv()[0].0;
        g.send(hdr(op::RESPONSE, 80, req.src_port), &[]);
        g.pump();
        let pkts = g.recv();
        assert_eq!(payload_of(&pkts), b"question");
        let last = pkts.last().expect("packets").0;
        assert_eq!((last.op, last.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        // The host still reads: the OK line, then the guest's answer, then EOF.
        g.send(hdr(op::RW, 80, req.src_port), b"answer");
        let mut shut = hdr(op::SHUTDOWN, 80, req.src_port);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(shut, &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
        assert_eq!(read_exact(&mut host, 6), b"answer");
        assert_eof(&mut host);
        assert_eq!(g.recv().last().map(|(h, _)| h.op), Some(op::RST));
        assert!(g.dev.muxer.is_idle());
    }

    #[test]
    fn guest_bytes_after_the_host_closed_are_dropped_but_host_bytes_still_arrive() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        // No credit: the host's bytes wait in its socket.
        let (mut host, hp) = g.establish(80, 0);
        host.write_all(b"abc").expect("write");
        g.pump();
        assert!(g.recv().is_empty());
        // The host closes with guest bytes unread (the peer sees ECONNRESET after the data).
        let mut rw = hdr(op::RW, 80, hp);
        rw.buf_alloc = 0;
        g.send(rw, b"unread");
        drop(host);
        // More guest bytes, before the hang-up was seen: the write fails (EPIPE), nobody reads
        // them, but they count as consumed and nothing is reset.
        g.send(rw, b"zz");
        let pkts = g.recv();
        assert!(
            pkts.is_empty(),
            "no credit, no data, no SHUTDOWN yet: {pkts:?}"
        );
        g.pump();
        assert!(g.recv().is_empty());
        assert_eq!(g.dev.connection_count(), 1);
        let mut upd = hdr(op::CREDIT_UPDATE, 80, hp);
        upd.buf_alloc = 16;
        g.send(upd, &[]);
        let pkts = g.recv();
        assert_eq!(payload_of(&pkts), b"abc");
        let ops: Vec<u16> = pkts.iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, [op::RW, op::SHUTDOWN]);
        assert_eq!(pkts[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(
            pkts[1].0.fwd_cnt, 8,
            "unread and dropped bytes count as consumed"
        );
        assert!(g.dev.muxer.is_idle());
    }

    /// Runs the backend until `done` holds, for at most 10 s (a hang guard).
    fn pump_until(g: &mut Guest, mut done: impl FnMut(&mut Guest) -> bool) {
        let start = std::time::Instant::now();
        while !done(g) {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(10));
            g.dev.handle_backend_event().expect("backend");
        }
    }

    #[test]
    fn clients_without_a_connect_line_are_closed_after_the_deadline() {
        const LINE: Duration = Duration::from_millis(300);
        let mut g = guest(|c| c.with_connect_line_timeout(LINE).with_max_connections(3));
        g.post_rx(8);
        let start = std::time::Instant::now();
        let mut silent = UnixStream::connect(&g.path).expect("connect");
        let mut partial = UnixStream::connect(&g.path).expect("connect");
        partial.write_all(b"CONNECT 1").expect("write");
        let mut slow = UnixStream::connect(&g.path).expect("connect");
        g.pump();
        if start.elapsed() < LINE {
            assert_eq!(g.dev.connection_count(), 3, "closed before the deadline");
        }
        // A line completed in time counts, even after a pause (unless this machine stalled
        // for the whole window before the write).
        slow.write_all(b"CONNECT 9\n").expect("write");
        let slow_in_time = start.elapsed() < LINE;
        // One expiry pass takes every due client; the silent two are due first.
        pump_until(&mut g, |g| g.dev.connection_count() <= 1);
        assert!(start.elapsed() >= LINE, "closed before the deadline");
        if slow_in_time {
            assert_eq!(g.dev.connection_count(), 1, "a timely line was dropped");
        }
        for s in [&mut silent, &mut partial] {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            assert_eof(s);
        }
        let reqs: Vec<u32> = g.recv().iter().map(|(h, _)| h.dst_port).collect();
        if slow_in_time {
            assert_eq!(reqs, [9]);
        }
        // The freed slots take new clients.
        let _a = g.connect_host(10);
        let _b = g.connect_host(11);
        g.pump();
        let reqs: Vec<u32> = g.recv().iter().map(|(h, _)| h.dst_port).collect();
        assert_eq!(reqs, [10, 11]);
        drop(slow);
    }

    #[test]
    fn unanswered_requests_are_reset_after_the_deadline() {
        const ANSWER: Duration = Duration::from_millis(100);
        let mut g = guest(|c| c.with_response_timeout(ANSWER));
        // No rx buffers yet: an undelivered REQUEST has no deadline.
        let mut host = g.connect_host(7);
        g.pump();
        std::thread::sleep(ANSWER * 2);
        g.pump();
        assert_eq!(g.dev.connection_count(), 1);
        g.post_rx(8);
        // Taken before the REQUEST goes out, so the deadline is at least ANSWER after it.
        let sent = std::time::Instant::now();
        g.dev.process_queue(0).expect("rx");
        let req = g.recv()[0].0;
        assert_eq!(req.op, op::REQUEST);
        // Nothing else happens: only the deadline timer can wake the event loop.
        let outer = vmm_sys_util::epoll::Epoll::new().expect("epoll");
        let ev = vmm_sys_util::epoll::EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0);
        outer
            .ctl(
                vmm_sys_util::epoll::ControlOperation::Add,
                g.dev.backend_fd(),
                ev,
            )
            .expect("add");
        let mut evs = [vmm_sys_util::epoll::EpollEvent::default(); 1];
        assert_eq!(
            outer.wait(10_000, &mut evs).expect("wait"),
            1,
            "timer never fired"
        );
        assert!(sent.elapsed() >= ANSWER, "timer fired early");
        pump_until(&mut g, |g| g.dev.connection_count() == 0);
        assert!(sent.elapsed() >= ANSWER, "closed before the deadline");
        assert_eof(&mut host);
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
            (op::RST, req.src_port, 7)
        );
        assert!(g.dev.muxer.is_idle());
        // A late answer finds nothing.
        g.send(hdr(op::RESPONSE, 7, req.src_port), &[]);
        assert_eq!(g.recv()[0].0.op, op::RST);
        assert!(g.dev.muxer.is_idle());
    }

    #[test]
    fn a_host_that_gives_up_withdraws_its_request() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let host = g.connect_host(7);
        g.pump();
        let req = g.recv()[0].0;
        drop(host);
        g.pump();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
            (op::RST, req.src_port, 7),
            "the guest forgets the request"
        );
        assert!(g.dev.muxer.is_idle());
    }

    #[test]
    fn pending_connections_are_bounded() {
        let mut g = guest(|c| c.with_max_pending(2));
        g.post_rx(8);
        let _a = g.connect_host(1);
        let _b = g.connect_host(2);
        g.pump();
        let mut c = g.connect_host(3);
        g.pump();
        assert_eq!(g.dev.muxer.pending_count(), 2);
        let reqs: Vec<Header> = g.recv().into_iter().map(|(h, _)| h).collect();
        assert_eq!(reqs.iter().map(|h| h.dst_port).collect::<Vec<_>>(), [1, 2]);
        // The third client waits in the backlog: not closed.
        c.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        let err = c.read(&mut b).expect_err("no EOF while waiting");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        // One is accepted by the guest: the third gets its REQUEST.
        g.send(hdr(op::RESPONSE, 1, reqs[0].src_port), &[]);
        g.pump();
        let reqs: Vec<u32> = g.recv().iter().map(|(h, _)| h.dst_port).collect();
        assert_eq!(reqs, [3]);
        assert_eq!(g.dev.connection_count(), 3);
    }

    #[test]
    fn guest_refusal_closes_the_host_stream() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let mut host = g.connect_host(5);
        g.pump();
        let req = g.recv()[0].0;
        g.send(hdr(op::RST, 5, req.src_port), &[]);
        assert_eof(&mut host);
        assert_eq!(g.dev.connection_count(), 0);
    }

    #[test]
    fn bad_connect_lines_close_the_stream() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'9'; 40]] {
            let mut s = UnixStream::connect(&g.path).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(line).expect("write");
            g.pump();
            assert_eof(&mut s);
        }
        assert!(g.recv().is_empty());
        assert_eq!(g.dev.connection_count(), 0);
    }

    #[test]
    fn packets_wait_for_rx_buffers() {
        let mut g = guest(|c| c);
        let _host = g.connect_host(9);
        g.pump();
        assert!(g.recv().is_empty());
        g.post_rx(2);
        g.dev.process_queue(0).expect("rx");
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::REQUEST);
    }

    #[test]
    fn unusable_rx_buffers_are_returned_empty() {
        let mut g = guest(|c| c);
        let _host = g.connect_host(9);
        g.pump();
        // Too small for a header, then a device-readable one, then a good one.
        let small = g.rxq.add_chain(&g.m, &[(RX_BUF, 20, true)]);
        let readable = g.rxq.add_chain(&g.m, &[(RX_BUF, 4096, false)]);
        g.post_rx(1);
        g.dev.process_queue(0).expect("rx");
        assert_eq!(g.rxq.used_idx(&g.m), 3);
        assert_eq!(g.rxq.used_elem(&g.m, 0), (u32::from(small), 0));
        assert_eq!(g.rxq.used_elem(&g.m, 1), (u32::from(readable), 0));
        assert_eq!(g.rxq.used_elem(&g.m, 2).1, HEADER_LEN as u32);
    }

    #[test]
    fn config_cid_and_setup_errors() {
        let g = guest(|c| c);
        let mut cid = [0u8; 8];
        g.dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
        assert_eq!(g.dev.device_type(), 19);
        // The path is taken: binding again fails and names it.
        let err = Vsock::<GuestMemoryMmap>::new(&VsockConfig::new(4, &g.path)).expect_err("taken");
        assert!(matches!(err, VsockError::Bind { ref path, .. } if *path == g.path));
        for cid in [0u64, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let err = Vsock::<GuestMemoryMmap>::new(&VsockConfig::new(cid, "/nonexistent/x"))
                .expect_err("bad cid");
            assert!(matches!(err, VsockError::InvalidCid { .. }));
        }
        for (config, name) in [
            (
                VsockConfig::new(4, "/nonexistent/x").with_max_pending(0),
                "max_pending",
            ),
            (
                VsockConfig::new(4, "/nonexistent/x").with_connect_line_timeout(Duration::ZERO),
                "connect_line_timeout",
            ),
            (
                VsockConfig::new(4, "/nonexistent/x").with_response_timeout(Duration::ZERO),
                "response_timeout",
            ),
        ] {
            let err = Vsock::<GuestMemoryMmap>::new(&config).expect_err("zero");
            assert!(matches!(err, VsockError::ZeroLimit { name: n } if n == name));
        }
        // The socket file is removed with the device.
        let path = g.path.clone();
        drop(g);
        assert!(!path.exists());
    }

    #[test]
    fn host_connections_made_before_the_driver_survive_its_probe_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let mut dev = Vsock::<GuestMemoryMmap>::new(&VsockConfig::new(CID, &path)).expect("vsock");
        let _early = UnixStream::connect(&path)
            .and_then(|mut s| s.write_all(b"CONNECT 52\n").map(|()| s))
            .expect("connect");
        dev.handle_backend_event().expect("backend");
        assert_eq!(dev.connection_count(), 1);
        // Linux writes 0 to Status when it probes the device.
        dev.reset();
        assert_eq!(dev.connection_count(), 1);
        let m = mem();
        let mut g = Guest {
            rxq: TestQueue::new(&m, 0x1000, 32),
            txq: TestQueue::new(&m, 0x2000, 16),
            m,
            dev,
            line: irq(),
            rx_seen: 0,
            rx_addr: HashMap::new(),
            next_rx: 0,
            path,
            _dir: dir,
        };
        for _round in 0..2 {
            // (Re)start the driver: fresh rings, rx buffers, activation.
            g.rxq = TestQueue::new(&g.m, 0x1000, 32);
            g.rx_seen = 0;
            g.rx_addr.clear();
            g.post_rx(4);
            let evq = TestQueue::new(&g.m, 0x3000, 16);
            let queues = vec![g.rxq.queue(), g.txq.queue(), evq.queue()];
            let interrupt = Arc::new(VirtioInterrupt::new(g.line.clone()));
            g.dev
                .activate(g.m.clone(), feature(VIRTIO_F_VERSION_1), queues, interrupt)
                .expect("activate");
            let pkts = g.recv();
            assert_eq!(pkts.len(), 1);
            assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (op::REQUEST, 52));
            // A reset before the guest answered: the REQUEST goes out again next round.
            g.dev.reset();
        }
        assert_eq!(g.dev.connection_count(), 1);
    }

    #[test]
    fn a_mebibyte_each_way_arrives_intact_under_flow_control() {
        const N: usize = 1 << 20;
        let pattern = |seed: usize| (0..N).map(move |i| ((i * 31 + seed) % 251) as u8);
        let mut g = guest(|c| c.with_max_buffered_bytes(32 * 1024));
        g.post_rx(16);
        let (host, hp) = g.establish(80, 64 * 1024);
        let mut host_w = host.try_clone().expect("clone");
        let mut host_r = host;
        let to_guest: Vec<u8> = pattern(1).collect();
        let writer = std::thread::spawn(move || {
            host_w.write_all(&to_guest).expect("host write");
            host_w
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            host_r.read_to_end(&mut got).expect("host read");
            got
        });
        let to_host: Vec<u8> = pattern(2).collect();
        let (mut got, mut sent, mut told) = (Vec::new(), 0usize, 0usize);
        let (mut peer_alloc, mut peer_fwd) = (0u32, 0u32);
        let (mut host_done, mut shut_sent) = (false, false);
        let mut turns = 0u64;
        while !(host_done && shut_sent) {
            turns += 1;
            assert!(turns < 10_000_000, "no progress");
            g.pump();
            for (h, p) in g.recv() {
                peer_alloc = h.buf_alloc;
                peer_fwd = h.fwd_cnt;
                match h.op {
                    op::RW => got.extend_from_slice(&p),
                    op::SHUTDOWN => host_done = true,
                    op::CREDIT_UPDATE => {}
                    other => panic!("unexpected op {other}"),
                }
            }
            if got.len() != told {
                // The fake guest consumes at once and tells the device.
                let mut upd = hdr(op::CREDIT_UPDATE, 80, hp);
                upd.fwd_cnt = got.len() as u32;
                g.send(upd, &[]);
                told = got.len();
            }
            let credit = peer_alloc.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
            let n = credit.min(RX_DATA as usize).min(N - sent);
            if n > 0 {
                let mut rw = hdr(op::RW, 80, hp);
                rw.fwd_cnt = got.len() as u32;
                g.send(rw, &to_host[sent..sent + n]);
                sent += n;
            } else if sent == N && !shut_sent {
                let mut shut = hdr(op::SHUTDOWN, 80, hp);
                shut.flags = SHUTDOWN_SEND;
                g.send(shut, &[]);
                shut_sent = true;
            }
        }
        writer.join().expect("writer");
        assert!(
            got == pattern(1).collect::<Vec<u8>>(),
            "host to guest bytes differ"
        );
        let at_host = reader.join().expect("reader");
        assert!(at_host == to_host, "guest to host bytes differ");
    }

    #[test]
    fn reset_drops_connections() {
        let mut g = guest(|c| c);
        g.post_rx(8);
        let (mut host, _) = g.establish(80, 4096);
        g.dev.reset();
        assert_eof(&mut host);
        assert_eq!(g.dev.connection_count(), 0);
    }

    /// A guest packet header with fields drawn around the interesting values.
    fn arb_packet() -> impl proptest::strategy::Strategy<Value = (Header, bool, usize, u32)> {
        use proptest::prelude::*;
        let header = (
            prop_oneof![Just(CID), Just(9u64)],
            prop_oneof![Just(HOST_CID), Just(7u64)],
            0u16..10,
            prop_oneof![Just(TYPE_STREAM), Just(2u16)],
            0u32..4,
            any::<u32>(),
            any::<u32>(),
        );
        let len = prop_oneof![
            Just(None),
            Just(Some(70_000u32)),
            Just(Some(u32::MAX)),
            (0u32..300).prop_map(Some)
        ];
        (header, any::<bool>(), len, 0usize..200, 0u32..300).prop_map(
            |((src_cid, dst_cid, op, type_, flags, buf_alloc, fwd_cnt), live, len, n, room)| {
                let h = Header {
                    src_cid,
                    dst_cid,
                    src_port: 80,
                    dst_port: 5,
                    len: len.unwrap_or(n.min(room as usize) as u32),
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                (h, live, n, room)
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        #[test]
        fn arbitrary_tx_packets_are_completed_and_bounded(
            pkts in proptest::collection::vec(arb_packet(), 1..8),
        ) {
            let mut g = guest(|c| c.with_max_buffered_bytes(1024));
            g.post_rx(16);
            let (_host, hp) = g.establish(80, 4096);
            for (mut h, live, n, room) in pkts {
                if live {
                    h.dst_port = hp;
                }
                let payload = vec![0xabu8; n.min(room as usize)];
                // send_raw asserts that the tx chain is completed.
                g.send_raw(&h, &payload, room);
                for (r, p) in g.recv() {
                    proptest::prop_assert_eq!(r.dst_cid, CID);
                    proptest::prop_assert_eq!(r.type_, TYPE_STREAM);
                    proptest::prop_assert_eq!(p.len(), r.len as usize);
                    proptest::prop_assert!(p.len() <= RX_DATA as usize);
                }
                proptest::prop_assert!(g.dev.connection_count() <= 1);
            }
        }

        /// Whatever the guest's window and pace, and whether the host writes before or after
        /// the guest accepted and then shuts its write side or closes (even before the guest
        /// answered): the guest gets every host byte in order, never more than its credit, and
        /// the SHUTDOWN only after the last one.
        #[test]
        fn host_bytes_precede_the_shutdown_under_any_credit(
            len in 0usize..20_000,
            early in 0usize..20_000,
            close in 0u8..3,
            window in 1u32..6000,
            paces in proptest::collection::vec(0u32..6000, 1..20),
        ) {
            // close: 0 = shutdown(SHUT_WR) after the answer, 1 = close after it, 2 = close
            // before it (with at least one byte: with none the host gave up).
            let len = if close == 2 { len.max(1) } else { len };
            let early = if close == 2 { len } else { early.min(len) };
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut g = guest(|c| c);
            g.post_rx(8);
            let mut host = UnixStream::connect(&g.path).expect("connect");
            let mut first = b"CONNECT 5\n".to_vec();
            first.extend_from_slice(&data[..early]);
            host.write_all(&first).expect("write");
            let mut host = if close == 2 {
                drop(host);
                None
            } else {
                Some(host)
            };
            g.pump();
            let req = g.recv()[0].0;
            proptest::prop_assert_eq!(req.op, op::REQUEST);
            let mut resp = hdr(op::RESPONSE, 5, req.src_port);
            resp.buf_alloc = window;
            g.send(resp, &[]);
            if let Some(mut h) = host.take() {
                h.write_all(&data[early..]).expect("write");
                if close == 0 {
                    // Still open for reading (the OK line waits there, unread).
                    h.shutdown(std::net::Shutdown::Write).expect("shutdown");
                    host = Some(h);
                }
            }
            let (mut got, mut consumed, mut shut) = (Vec::new(), 0usize, None);
            for turn in 0..10_000usize {
                g.pump();
                for (h, p) in g.recv() {
                    proptest::prop_assert!(shut.is_none(), "packet after the SHUTDOWN: {:?}", h);
                    match h.op {
                        op::RW => got.extend_from_slice(&p),
                        op::SHUTDOWN => shut = Some(h.flags),
                        op::CREDIT_UPDATE => {}
                        other => proptest::prop_assert!(false, "unexpected op {}", other),
                    }
                    proptest::prop_assert!(got.len() - consumed <= window as usize, "credit exceeded");
                }
                if shut.is_some() {
                    break;
                }
                // The guest consumes at its pace, then all it has once the paces run out.
                let pace = paces.get(turn).map_or(usize::MAX, |&p| p as usize);
                consumed += pace.min(got.len() - consumed);
                let mut upd = hdr(op::CREDIT_UPDATE, 5, req.src_port);
                upd.buf_alloc = window;
                upd.fwd_cnt = consumed as u32;
                g.send(upd, &[]);
            }
            proptest::prop_assert!(got == data, "got {} of {} bytes", got.len(), data.len());
            if close == 0 {
                proptest::prop_assert_eq!(shut, Some(SHUTDOWN_SEND));
                proptest::prop_assert_eq!(g.dev.connection_count(), 1);
            } else {
                proptest::prop_assert_eq!(shut, Some(SHUTDOWN_RCV | SHUTDOWN_SEND));
                proptest::prop_assert!(g.dev.muxer.is_idle());
            }
            drop(host);
        }
    }
}

/// KVM tier: a real Linux guest (from `cargo xtask guest`) talks to the host through this
/// device. Needs `SANDBOX_KERNEL` and `SANDBOX_ROOTFS`, set by `cargo xtask test`.
#[cfg(all(test, sandbox_kvm))]
mod kvm_tier {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use crate::devices::console::ConsoleRing;
    use crate::vmm::{
        build, DiskConfig, ExitReason, VmConfig, VmHandle, VmResources, VsockDeviceConfig,
    };

    /// Upper bound for a boot plus the exchange, even under nested TCG (a hang guard only).
    const TIMEOUT: Duration = Duration::from_secs(600);
    const N: usize = 1 << 20;

    fn env_path(name: &str) -> PathBuf {
        std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
            panic!("{name} is not set: run the KVM tier with `cargo xtask test`, which builds the guest artifacts")
        })
    }

    /// Boots the guest with a vsock device at `dir/v.sock` running the Python one-liner
    /// `script` as its test program, and waits until the script printed `VSOCK-LISTENING`.
    ///
    /// The kernel command line cannot nest quotes, so the script travels in its own parameter
    /// (Linux hands unknown `key=value` parameters to init as environment variables) and is
    /// written without spaces or glob characters, to survive the shell's expansion unquoted. The
    /// marker is built at run time in the script so that the echoed command line cannot match it.
    fn boot_listening(dir: &Path, script: &str) -> (VmHandle, ConsoleRing, PathBuf) {
        assert!(!script.contains([' ', '"', '*', '?', '[']));
        let uds = dir.join("v.sock");
        // The rootfs cache entry is opened read-only, so no copy is needed.
        let config = VmConfig::new(env_path("SANDBOX_KERNEL"))
            .memory_mib(256)
            .disk(DiskConfig::new(env_path("SANDBOX_ROOTFS"), true))
            .vsock(VsockDeviceConfig::new(3, &uds))
            .cmdline_extra(format!(
                "root=/dev/vda ro init=/sbin/sandbox-test-init vsock_script={script} \
                 sandbox_run=\"python3 -c $vsock_script\""
            ))
            .console_file(dir.join("console.log"), 1 << 20);
        let ring = ConsoleRing::new(1 << 20);
        let resources = VmResources::try_from(config)
            .expect("valid config")
            .with_console_ring(ring.clone());
        let mut vm = build(resources).expect("build the VM");
        vm.start().expect("start the VM");
        let listening = ring.wait_for_line("VSOCK-LISTENING", TIMEOUT);
        assert!(
            listening.is_some(),
            "guest never listened; console:\n{}",
            ring.lines().concat()
        );
        (vm, ring, uds)
    }

    /// Reads the `OK <port>\n` line.
    fn read_ok_line(host: &mut UnixStream) {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            assert_eq!(
                host.read(&mut b).expect("read OK line"),
                1,
                "EOF before OK line"
            );
            line.push(b[0]);
        }
        assert!(
            line.starts_with(b"OK "),
            "{:?}",
            String::from_utf8_lossy(&line)
        );
    }

    /// Waits for the guest's own poweroff and checks that its script succeeded.
    fn expect_clean_exit(mut vm: VmHandle, ring: &ConsoleRing) {
        let reason = vm.wait_timeout(TIMEOUT).unwrap_or_else(|| vm.stop());
        let console = ring.lines().concat();
        assert_eq!(reason, ExitReason::Poweroff, "console:\n{console}");
        assert!(
            console.contains("sandbox-init: exit=0"),
            "console:\n{console}"
        );
    }

    #[test]
    fn linux_guest_echoes_a_mebibyte_over_vsock() {
        let dir = tempfile::tempdir().expect("temp dir");
        // The guest reads 1 MiB, sends it back reversed, then waits for the host to close.
        let script = "s=__import__('socket');l=s.socket(s.AF_VSOCK,s.SOCK_STREAM);\
            l.bind((s.VMADDR_CID_ANY,5000));l.listen(1);print('VSOCK'+'-LISTENING',flush=True);\
            c,a=l.accept();d=c.makefile('rb').read(1048576);c.sendall(bytes(reversed(d)));\
            c.shutdown(s.SHUT_WR);c.recv(1)";
        let (vm, ring, uds) = boot_listening(dir.path(), script);

        let mut host = UnixStream::connect(&uds).expect("connect to the vsock socket");
        host.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        host.write_all(b"CONNECT 5000\n").expect("CONNECT");
        read_ok_line(&mut host);

        let data: Vec<u8> = (0..N).map(|i| ((i * 7 + i / 4096) % 256) as u8).collect();
        host.write_all(&data).expect("send 1 MiB");
        let mut back = vec![0u8; N];
        host.read_exact(&mut back).expect("receive 1 MiB");
        back.reverse();
        assert!(back == data, "the echoed bytes differ");
        let mut b = [0u8; 1];
        assert_eq!(
            host.read(&mut b).expect("read EOF"),
            0,
            "guest shut its write side"
        );
        drop(host);
        expect_clean_exit(vm, &ring);
    }

    /// Host clients that write with their CONNECT line and stop at once: one shuts its write
    /// side (1 MiB, more than the guest's 256 KiB window, then reads the reply), one closes
    /// completely. Linux must see every byte, then EOF.
    #[test]
    fn linux_guest_gets_every_byte_before_a_host_half_close() {
        let dir = tempfile::tempdir().expect("temp dir");
        // First connection: read to EOF, send it back reversed, close. Second: read to EOF and
        // print its length and byte sum.
        let script = "s=__import__('socket');l=s.socket(s.AF_VSOCK,s.SOCK_STREAM);\
            l.bind((s.VMADDR_CID_ANY,5000));l.listen(2);print('VSOCK'+'-LISTENING',flush=True);\
            c,a=l.accept();d=c.makefile('rb').read();c.sendall(bytes(reversed(d)));\
            c.shutdown(s.SHUT_WR);c.close();\
            c,a=l.accept();d=c.makefile('rb').read();\
            print('HALF'+'CLOSE-'+str(len(d))+'-'+str(sum(d)),flush=True);c.close()";
        let (vm, ring, uds) = boot_listening(dir.path(), script);

        // Everything is written before the guest even answered, then the write side is shut.
        let data: Vec<u8> = (0..N).map(|i| ((i * 13 + i / 999) % 256) as u8).collect();
        let mut host = UnixStream::connect(&uds).expect("connect to the vsock socket");
        host.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut first = b"CONNECT 5000\n".to_vec();
        first.extend_from_slice(&data);
        host.write_all(&first).expect("CONNECT and 1 MiB");
        host.shutdown(std::net::Shutdown::Write).expect("shutdown");
        read_ok_line(&mut host);
        let mut back = Vec::new();
        host.read_to_end(&mut back).expect("receive the reply");
        back.reverse();
        assert!(
            back == data,
            "the guest saw other bytes ({} back)",
            back.len()
        );
        drop(host);

        // A client that writes and closes at once.
        let tail = b"hello after a close";
        let mut host = UnixStream::connect(&uds).expect("connect to the vsock socket");
        let mut second = b"CONNECT 5000\n".to_vec();
        second.extend_from_slice(tail);
        host.write_all(&second).expect("CONNECT and bytes");
        drop(host);
        let sum: u32 = tail.iter().map(|&b| u32::from(b)).sum();
        let marker = format!("HALFCLOSE-{}-{sum}", tail.len());
        let seen = ring.wait_for_line(&marker, TIMEOUT);
        assert!(
            seen.is_some(),
            "guest did not get the bytes; console:\n{}",
            ring.lines().concat()
        );
        expect_clean_exit(vm, &ring);
    }
}
