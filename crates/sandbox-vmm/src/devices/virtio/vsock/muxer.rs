//! The host side of virtio-vsock: a Unix listener and one Unix stream per connection.
//!
//! Protocol (host-initiated connections only): a host process connects to the listener, writes
//! `CONNECT <port>\n` (decimal guest port, at most 32 bytes including the newline); the muxer
//! gives the connection a host port, sends the guest a REQUEST, and on the guest's RESPONSE
//! writes `OK <host_port>\n` to the stream. From then on bytes flow both ways. A refused
//! connection (guest RST) closes the stream; so does a malformed CONNECT line.
//!
//! All sockets are non-blocking and registered in one private epoll instance, whose fd the VMM's
//! event loop watches. Interest follows what the muxer can act on, so a level-triggered loop
//! never spins: a stream is watched for input only while the muxer does not already know it is
//! readable (it is read when the guest has credit and rx buffers), and for output only while
//! guest bytes wait to be written.
//!
//! Bounds: at most `max_connections` streams (accepted ones beyond that are closed at once, so
//! the host sees EOF); at most `buf_alloc` bytes buffered per connection towards the host (a
//! guest that sends more than its credit is reset); at most 256 queued RST replies; a fixed
//! number of events and accepts per call.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::ops::Bound;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{send, MsgFlags};
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Result, VsockError};

/// Epoll token of the listener; connections use their host port (never 0).
const LISTENER_TOKEN: u64 = 0;
/// First host port handed out (well away from the ports guests usually listen on).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest accepted `CONNECT <port>\n` line, in bytes.
const CONNECT_LINE_MAX: usize = 32;
/// Most RST replies queued for the guest; beyond that, replies are dropped.
const MAX_PENDING_RST: usize = 256;
/// Epoll events handled per call.
const EVENTS_PER_CALL: usize = 32;
/// Connections accepted per listener event.
const ACCEPTS_PER_CALL: usize = 16;

#[derive(Debug)]
enum State {
    /// Reading the `CONNECT <port>\n` line.
    Handshake {
        line: [u8; CONNECT_LINE_MAX],
        len: usize,
    },
    /// Waiting for the guest's RESPONSE; `sent` once the REQUEST went out.
    Requesting { sent: bool },
    /// Bytes flow.
    Established,
    /// The guest shut down both directions: drain what it sent, then reset.
    Closing,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    /// Bytes waiting to be written to the host stream: the `OK` line, then guest data.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are our `OK` line, not guest data.
    ok_line_len: usize,
    /// Guest bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The guest's receive buffer size and consumption, from its last packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream may have bytes to read (known from epoll, cleared on EAGAIN).
    readable: bool,
    /// The host stream hung up: no more epoll registration.
    hup: bool,
    host_eof: bool,
    guest_shut_recv: bool,
    guest_shut_send: bool,
    host_write_shut: bool,
    want_credit_update: bool,
    want_shutdown: bool,
    /// What is registered in epoll (`None`: not registered).
    interest: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32) -> Self {
        Self {
            stream,
            state: State::Handshake {
                line: [0; CONNECT_LINE_MAX],
                len: 0,
            },
            local_port,
            peer_port: 0,
            to_host: VecDeque::new(),
            ok_line_len: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            hup: false,
            host_eof: false,
            guest_shut_recv: false,
            guest_shut_send: false,
            host_write_shut: false,
            want_credit_update: false,
            want_shutdown: false,
            interest: None,
        }
    }

    /// Bytes the guest can still receive (its credit), per virtio 1.2 §5.10.6.3. A guest that
    /// reports nonsense (more in flight than its buffer) gets no credit.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes buffered towards the host.
    fn guest_bytes_buffered(&self) -> usize {
        self.to_host.len() - self.ok_line_len
    }

    /// Whether the guest knows this connection (so it should get an RST when it dies).
    fn guest_knows(&self) -> bool {
        matches!(
            self.state,
            State::Requesting { sent: true } | State::Established | State::Closing
        )
    }

    fn wants_data_to_guest(&self) -> bool {
        matches!(self.state, State::Established)
            && !self.host_eof
            && !self.guest_shut_recv
            && self.peer_credit() > 0
    }

    fn desired_interest(&self) -> Option<EventSet> {
        if self.hup {
            return None;
        }
        Some(match self.state {
            State::Handshake { .. } => EventSet::IN,
            State::Requesting { .. } => EventSet::empty(),
            State::Established | State::Closing => {
                let mut set = EventSet::empty();
                let can_read = matches!(self.state, State::Established)
                    && !self.readable
                    && !self.host_eof
                    && !self.guest_shut_recv;
                if can_read {
                    set |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    set |= EventSet::OUT;
                }
                set
            }
        })
    }
}

/// The host side of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    epoll: Epoll,
    listener: UnixListener,
    path: PathBuf,
    guest_cid: u64,
    max_connections: usize,
    buf_alloc: u32,
    conns: BTreeMap<u32, Conn>,
    rst_queue: VecDeque<Header>,
    next_port: u32,
    /// Round-robin cursor over connections for rx fairness.
    cursor: u32,
    /// The listener is out of the epoll set after an accept error (e.g. EMFILE), so a
    /// level-triggered loop does not spin on it; it comes back when a connection closes.
    listener_paused: bool,
}

impl Muxer {
    /// Binds the listener at `path` (which must not exist) and creates the epoll instance.
    ///
    /// # Errors
    /// [`VsockError::Bind`] naming the path, or [`VsockError::Epoll`].
    pub fn new(
        guest_cid: u64,
        path: &Path,
        max_connections: usize,
        buf_alloc: u32,
    ) -> Result<Self> {
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let muxer = Self {
            epoll: Epoll::new().map_err(VsockError::Epoll)?,
            listener,
            path: path.to_owned(),
            guest_cid,
            max_connections,
            buf_alloc,
            conns: BTreeMap::new(),
            rst_queue: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            cursor: 0,
            listener_paused: false,
        };
        muxer
            .listener
            .set_nonblocking(true)
            .map_err(VsockError::Epoll)?;
        muxer
            .epoll
            .ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(muxer)
    }

    /// The epoll fd: readable whenever a host-side socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Handles the ready host-side sockets without blocking (at most 32 events per call).
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_CALL];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return,
            Err(err) => {
                warn!(error = %err, "vsock: epoll_wait failed");
                return;
            }
        };
        for ev in &events[..n] {
            let set = EventSet::from_bits_truncate(ev.events());
            if ev.data() == LISTENER_TOKEN {
                self.accept_some();
            } else if let Ok(port) = u32::try_from(ev.data()) {
                self.conn_event(port, set);
            }
        }
    }

    /// The driver reset the device: connections the guest knew are closed (its side is gone);
    /// connections still waiting for their REQUEST to go out are kept, and a REQUEST already
    /// sent will be sent again, so host connections made before the guest driver started
    /// (Linux resets the device when it probes it) survive. The listener stays.
    pub fn reset(&mut self) {
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for port in ports {
            let Some(conn) = self.conns.get_mut(&port) else {
                continue;
            };
            match conn.state {
                State::Handshake { .. } | State::Requesting { sent: false } => {}
                State::Requesting { sent: true } => {
                    conn.state = State::Requesting { sent: false };
                }
                State::Established | State::Closing => self.teardown(port, false),
            }
        }
        self.rst_queue.clear();
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPTS_PER_CALL {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(err) => {
                    warn!(error = %err, "vsock: accept failed; pausing the listener");
                    self.pause_listener();
                    return;
                }
            };
            if self.conns.len() >= self.max_connections {
                warn!(
                    max = self.max_connections,
                    "vsock: connection limit reached; closing"
                );
                continue;
            }
            if let Err(err) = stream.set_nonblocking(true) {
                warn!(error = %err, "vsock: cannot make a stream non-blocking");
                continue;
            }
            let port = self.alloc_port();
            self.conns.insert(port, Conn::new(stream, port));
            self.refresh(port);
            // The CONNECT line is often already there.
            self.read_handshake(port);
        }
    }

    fn pause_listener(&mut self) {
        if !self.listener_paused {
            let fd = self.listener.as_raw_fd();
            if self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                .is_ok()
            {
                self.listener_paused = true;
            }
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            let fd = self.listener.as_raw_fd();
            let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                Ok(()) => self.listener_paused = false,
                Err(err) => warn!(error = %err, "vsock: cannot resume the listener"),
            }
        }
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(p) => p,
                None => FIRST_HOST_PORT,
            };
            // Terminates: there are at most `max_connections` ports in use.
            if !self.conns.contains_key(&port) {
                return port;
            }
        }
    }

    fn conn_event(&mut self, port: u32, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            self.teardown(port, true);
            return;
        }
        match conn.state {
            State::Handshake { .. } => {
                self.read_handshake(port);
                return;
            }
            State::Requesting { sent } => {
                if set.contains(EventSet::HANG_UP) {
                    self.teardown(port, sent);
                    return;
                }
            }
            State::Established | State::Closing => {
                if set.intersects(EventSet::IN | EventSet::HANG_UP) {
                    conn.readable = true;
                }
                if set.contains(EventSet::HANG_UP) {
                    conn.hup = true;
                }
                if set.contains(EventSet::OUT) {
                    self.flush_to_host(port);
                }
            }
        }
        self.refresh(port);
    }

    fn read_handshake(&mut self, port: u32) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        let State::Handshake { line, len } = &mut conn.state else {
            return;
        };
        // One byte at a time, so bytes after the newline stay in the socket for the guest.
        loop {
            let mut b = [0u8; 1];
            match (&conn.stream).read(&mut b) {
                Ok(0) => break,
                Ok(_) if b[0] == b'\n' => match parse_connect(&line[..*len]) {
                    Some(peer_port) => {
                        debug!(host_port = port, peer_port, "vsock: host connect request");
                        conn.peer_port = peer_port;
                        conn.state = State::Requesting { sent: false };
                        self.refresh(port);
                        return;
                    }
                    None => break,
                },
                Ok(_) => {
                    if *len == CONNECT_LINE_MAX {
                        break;
                    }
                    line[*len] = b[0];
                    *len += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        debug!(
            host_port = port,
            "vsock: bad or missing CONNECT line; closing"
        );
        self.teardown(port, false);
    }

    /// Applies the connection's desired epoll interest.
    fn refresh(&mut self, port: u32) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        let want = conn.desired_interest();
        if want == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let res = match (conn.interest, want) {
            (None, Some(set)) => self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(set, u64::from(port)),
            ),
            (Some(_), Some(set)) => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, u64::from(port)),
            ),
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match res {
            Ok(()) => conn.interest = want,
            Err(err) => {
                warn!(error = %err, "vsock: epoll_ctl failed; resetting the connection");
                self.teardown(port, true);
            }
        }
    }

    /// Removes a connection, closes its stream, and queues an RST for the guest if asked and
    /// the guest knows the connection.
    fn teardown(&mut self, port: u32, rst: bool) {
        let Some(conn) = self.conns.remove(&port) else {
            return;
        };
        // A freed fd may be what a failed accept was missing.
        self.resume_listener();
        if conn.interest.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if rst && conn.guest_knows() {
            let hdr = header(self.guest_cid, self.buf_alloc, &conn, op::RST);
            self.push_rst(hdr);
        }
        debug!(
            host_port = port,
            peer_port = conn.peer_port,
            rst,
            "vsock: connection closed"
        );
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(hdr);
        }
    }

    /// Writes what the guest sent to the host stream, without blocking.
    fn flush_to_host(&mut self, port: u32) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        while !conn.to_host.is_empty() {
            let (chunk, _) = conn.to_host.as_slices();
            match send(conn.stream.as_raw_fd(), chunk, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    conn.to_host.drain(..n);
                    let ok = n.min(conn.ok_line_len);
                    conn.ok_line_len -= ok;
                    // n - ok <= one chunk <= buf_alloc, so it fits in a u32.
                    conn.fwd_cnt += Wrapping(u32::try_from(n - ok).unwrap_or(u32::MAX));
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(err) => {
                    debug!(host_port = port, error = %err, "vsock: host write failed");
                    self.teardown(port, true);
                    return;
                }
            }
        }
        if conn.to_host.is_empty() {
            if matches!(conn.state, State::Closing) {
                self.teardown(port, true);
                return;
            }
            if conn.guest_shut_send && !conn.host_write_shut {
                let _ = conn.stream.shutdown(Shutdown::Write);
                conn.host_write_shut = true;
            }
        }
        // Tell the guest about freed space once a quarter of its window was consumed, so a
        // sender blocked on credit always gets an update.
        let unreported = (conn.fwd_cnt - conn.last_fwd_sent).0;
        if unreported > 0 && unreported >= self.buf_alloc / 4 {
            conn.want_credit_update = true;
        }
    }

    /// A well-formed packet from the guest's tx queue; `payload.len() == hdr.len`.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            debug!(
                src_cid = hdr.src_cid,
                "vsock: packet with a spoofed source CID dropped"
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let port = hdr.dst_port;
        let known = self
            .conns
            .get(&port)
            .is_some_and(|c| c.peer_port == hdr.src_port && c.guest_knows());
        if !known {
            // Includes guest-initiated REQUESTs, which we do not serve.
            self.reply_rst(hdr);
            return;
        }
        let buf_alloc = self.buf_alloc as usize;
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            op::RESPONSE => {
                if !matches!(conn.state, State::Requesting { sent: true }) {
                    self.teardown(port, true);
                    return;
                }
                info!(
                    host_port = port,
                    peer_port = conn.peer_port,
                    "vsock: connection established"
                );
                conn.state = State::Established;
                let line = format!("OK {port}\n");
                conn.ok_line_len = line.len();
                conn.to_host.extend(line.as_bytes());
                // The host may have written data right after its CONNECT line.
                conn.readable = true;
                self.flush_to_host(port);
            }
            op::RW => {
                let room = buf_alloc.saturating_sub(conn.guest_bytes_buffered());
                if !matches!(conn.state, State::Established)
                    || conn.guest_shut_send
                    || payload.len() > room
                {
                    debug!(
                        host_port = port,
                        len = payload.len(),
                        room,
                        "vsock: RW refused"
                    );
                    self.teardown(port, true);
                    return;
                }
                conn.to_host.extend(payload);
                self.flush_to_host(port);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.want_credit_update = true,
            op::SHUTDOWN => {
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    conn.guest_shut_recv = true;
                }
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_shut_send = true;
                }
                if conn.guest_shut_recv && conn.guest_shut_send {
                    conn.state = State::Closing;
                }
                self.flush_to_host(port);
            }
            op::RST => {
                self.flush_to_host(port);
                self.teardown(port, false);
                return;
            }
            _ => {
                self.teardown(port, true);
                return;
            }
        }
        self.refresh(port);
    }

    /// A packet from the guest that could not be taken as is (bad length, oversized): reset the
    /// connection it names, or answer with an RST.
    pub fn handle_malformed(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let port = hdr.dst_port;
        let known = self
            .conns
            .get(&port)
            .is_some_and(|c| c.peer_port == hdr.src_port && c.guest_knows());
        if known && hdr.dst_cid == HOST_CID {
            self.teardown(port, true);
        } else {
            self.reply_rst(hdr);
        }
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if let Some(rst) = hdr.rst_reply() {
            debug!(
                op = hdr.op,
                dst_port = hdr.dst_port,
                "vsock: answering with RST"
            );
            self.push_rst(rst);
        }
    }

    /// The next packet for the guest, if any: header plus `n` payload bytes written to
    /// `buf[..n]`. `buf.len()` is the room in the guest's rx buffer (0 allows control packets
    /// only).
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(rst) = self.rst_queue.pop_front() {
            return Some((rst, 0));
        }
        let mut visited = 0;
        while visited < self.conns.len() {
            visited += 1;
            let port = self
                .conns
                .range((Bound::Excluded(self.cursor), Bound::Unbounded))
                .next()
                .or_else(|| self.conns.iter().next())
                .map(|(p, _)| *p)?;
            self.cursor = port;
            if let Some(pkt) = self.rx_for(port, buf) {
                return Some(pkt);
            }
            if let Some(rst) = self.rst_queue.pop_front() {
                return Some((rst, 0));
            }
        }
        None
    }

    fn rx_for(&mut self, port: u32, buf: &mut [u8]) -> Option<(Header, usize)> {
        let (guest_cid, buf_alloc) = (self.guest_cid, self.buf_alloc);
        let conn = self.conns.get_mut(&port)?;
        let op = if matches!(conn.state, State::Requesting { sent: false }) {
            conn.state = State::Requesting { sent: true };
            op::REQUEST
        } else if conn.want_shutdown {
            conn.want_shutdown = false;
            op::SHUTDOWN
        } else if conn.want_credit_update {
            conn.want_credit_update = false;
            op::CREDIT_UPDATE
        } else if conn.readable && conn.wants_data_to_guest() && !buf.is_empty() {
            let n = buf.len().min(conn.peer_credit() as usize);
            match (&conn.stream).read(&mut buf[..n]) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.readable = false;
                    op::SHUTDOWN
                }
                Ok(n) => {
                    conn.tx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    let mut hdr = header(guest_cid, buf_alloc, conn, op::RW);
                    hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                    conn.last_fwd_sent = conn.fwd_cnt;
                    self.refresh(port);
                    return Some((hdr, n));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                    self.refresh(port);
                    return None;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => return None,
                Err(_) => {
                    self.teardown(port, true);
                    return None;
                }
            }
        } else {
            return None;
        };
        let mut hdr = header(guest_cid, buf_alloc, conn, op);
        if op == op::SHUTDOWN {
            // The host stream reached EOF: the host will send no more.
            hdr.flags = SHUTDOWN_SEND;
        }
        conn.last_fwd_sent = conn.fwd_cnt;
        self.refresh(port);
        Some((hdr, 0))
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours: remove it so nothing is left behind.
        if let Err(err) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), error = %err, "vsock: cannot remove the socket file");
        }
    }
}

/// A packet header from the host end of `conn`, carrying our credit (`buf_alloc`, `fwd_cnt`).
fn header(guest_cid: u64, buf_alloc: u32, conn: &Conn, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: conn.local_port,
        dst_port: conn.peer_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc,
        fwd_cnt: conn.fwd_cnt.0,
        ..Header::default()
    }
}

/// Parses `CONNECT <port>` (decimal u32, single spaces, no trailing bytes).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect(b"\xffCONNECT 5"), None);
    }
}
