//! The host side of virtio-vsock: a Unix listener and one Unix stream per connection.
//!
//! Protocol (host-initiated connections only): a host process connects to the listener, writes
//! `CONNECT <port>\n` (decimal guest port, at most 32 bytes before the newline); the muxer gives
//! the connection a host port, sends the guest a REQUEST, and on the guest's RESPONSE writes
//! `OK <host_port>\n` to the stream. From then on bytes flow both ways. A refused connection
//! (guest RST) closes the stream; so does a malformed CONNECT line.
//!
//! Closing (virtio 1.2 §5.10.6.5). Host bytes are read into the guest's rx buffers only as far as
//! its credit allows; the rest waits in the host socket, so nothing is lost when the host stops
//! writing. The host's EOF (`shutdown(SHUT_WR)` or `close`) becomes a SHUTDOWN with the SEND flag,
//! sent after the last RW packet because EOF is only seen by reading past the last byte. A host
//! that closed completely (hang-up, or `EPIPE`/`ECONNRESET` on a write) takes no more guest bytes:
//! they are dropped and counted as consumed, the final SHUTDOWN also carries RCV, and the muxer
//! forgets the connection once it went out (the guest's answering RST finds nothing to reset). A
//! host that only shut its write side keeps receiving the guest's bytes. A host that closes while
//! its REQUEST is pending keeps its place if it wrote bytes after the CONNECT line (they are
//! delivered once the guest accepts); with none, it gave up and the request is withdrawn.
//!
//! Deadlines: a new connection must complete its CONNECT line within `connect_line_timeout`;
//! once the REQUEST is in the guest's rx queue, the guest must answer (RESPONSE or RST) within
//! `response_timeout`. Either miss closes the host stream (an unanswered REQUEST is also reset
//! towards the guest) and frees the slot and the host port. A REQUEST that cannot be delivered
//! yet (no driver, no rx buffers) has no deadline: the host may connect before the guest boots.
//! One timerfd in the private epoll set, armed for the earliest deadline, wakes the event loop.
//!
//! All sockets are non-blocking and registered in one private epoll instance, whose fd the VMM's
//! event loop watches. Interest follows what the muxer can act on, so a level-triggered loop
//! never spins: a stream is watched for input only while the muxer does not already know it is
//! readable (it is read when the guest has credit and rx buffers), and for output only while
//! guest bytes wait to be written; a stream that hung up leaves the set.
//!
//! Bounds: at most `max_connections` streams (accepted ones beyond that are closed at once, so
//! the host sees EOF); at most `max_pending` of them not yet established (while that many are
//! pending the listener leaves the epoll set, so new clients wait in the kernel's backlog); at
//! most `buf_alloc` bytes buffered per connection towards the host (a guest that sends more than
//! its credit is reset); at most 256 queued RST replies; a fixed number of events and accepts per
//! call.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::ops::Bound;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Result, VsockConfig, VsockError};

/// Epoll token of the listener; connections use their host port (never 0).
const LISTENER_TOKEN: u64 = 0;
/// Epoll token of the deadline timer (above every `u32` port).
const TIMER_TOKEN: u64 = u64::MAX;
/// First host port handed out (well away from the ports guests usually listen on).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest accepted `CONNECT <port>` line, in bytes, not counting the newline.
const CONNECT_LINE_MAX: usize = 32;
/// Most RST replies queued for the guest; beyond that, replies are dropped.
const MAX_PENDING_RST: usize = 256;
/// Epoll events handled per call.
const EVENTS_PER_CALL: usize = 32;
/// Connections accepted per listener event.
const ACCEPTS_PER_CALL: usize = 16;
/// Shortest timer arming: a zero duration would disarm the timerfd instead.
const MIN_TIMER: Duration = Duration::from_millis(1);
/// Both SHUTDOWN flags: the connection is finished in both directions.
const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

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
    /// When a pending connection is dropped: the end of its CONNECT-line window (handshake) or
    /// of the guest's answer window (REQUEST sent). `None` otherwise.
    deadline: Option<Instant>,
    /// Bytes waiting to be written to the host stream: the `OK` line, then guest data.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are our `OK` line, not guest data.
    ok_line_len: usize,
    /// Guest bytes written to the host stream (or dropped because the host is gone).
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
    /// The host sends no more (its EOF was read).
    host_eof: bool,
    /// The host receives no more (it hung up, or a write failed with EPIPE/ECONNRESET).
    host_closed: bool,
    guest_shut_recv: bool,
    guest_shut_send: bool,
    host_write_shut: bool,
    want_credit_update: bool,
    /// SHUTDOWN flags already sent to the guest.
    shut_told: u32,
    /// What is registered in epoll (`None`: not registered).
    interest: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, deadline: Instant) -> Self {
        Self {
            stream,
            state: State::Handshake {
                line: [0; CONNECT_LINE_MAX],
                len: 0,
            },
            local_port,
            peer_port: 0,
            deadline: Some(deadline),
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
            host_closed: false,
            guest_shut_recv: false,
            guest_shut_send: false,
            host_write_shut: false,
            want_credit_update: false,
            shut_told: 0,
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

    /// Not yet established: counted against `max_pending`.
    fn is_pending(&self) -> bool {
        matches!(
            self.state,
            State::Handshake { .. } | State::Requesting { .. }
        )
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

    /// SHUTDOWN flags the guest still has to hear: SEND once the host's EOF was read (so after
    /// its last byte), with RCV if the host is gone too. `None` if nothing new.
    fn shutdown_owed(&self) -> Option<u32> {
        if !self.host_eof {
            return None;
        }
        let want = if self.host_closed {
            SHUTDOWN_BOTH
        } else {
            SHUTDOWN_SEND
        };
        (want & !self.shut_told != 0).then_some(want)
    }

    /// The host takes no more bytes: guest bytes waiting for it are dropped and counted as
    /// consumed, so the guest's view of our credit stays consistent.
    fn mark_host_closed(&mut self) {
        self.host_closed = true;
        let dropped = self.guest_bytes_buffered();
        self.to_host.clear();
        self.ok_line_len = 0;
        // dropped <= buf_alloc, a u32.
        self.fwd_cnt += Wrapping(u32::try_from(dropped).unwrap_or(u32::MAX));
    }

    /// Asks for a CREDIT_UPDATE once a quarter of our window was consumed since the guest last
    /// heard our `fwd_cnt`, so a sender blocked on credit always gets one.
    fn note_consumed(&mut self, buf_alloc: u32) {
        let unreported = (self.fwd_cnt - self.last_fwd_sent).0;
        if unreported > 0 && unreported >= buf_alloc / 4 {
            self.want_credit_update = true;
        }
    }

    fn desired_interest(&self) -> Option<EventSet> {
        if self.hup {
            return None;
        }
        Some(match self.state {
            State::Handshake { .. } => EventSet::IN,
            // Registered with no interest: hang-ups and errors are still reported.
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

/// Whether a stream that hung up still holds bytes to read (peeked, nothing consumed). After a
/// hang-up a Unix stream never blocks: it has bytes, or reports EOF (or the peer's reset).
fn has_unread_bytes(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    loop {
        match recv(
            stream.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => return n > 0,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return true,
            Err(_) => return false,
        }
    }
}

/// The host side of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    epoll: Epoll,
    listener: UnixListener,
    /// The socket file this muxer bound and removes on drop (none for an inherited listener).
    path: Option<PathBuf>,
    guest_cid: u64,
    max_connections: usize,
    max_pending: usize,
    connect_line_timeout: Duration,
    response_timeout: Duration,
    buf_alloc: u32,
    conns: BTreeMap<u32, Conn>,
    rst_queue: VecDeque<Header>,
    next_port: u32,
    /// Round-robin cursor over connections for rx fairness.
    cursor: u32,
    /// Wakes the event loop at the earliest connection deadline.
    timer: TimerFd,
    /// The instant the timer is armed for (`None`: disarmed).
    timer_at: Option<Instant>,
    /// Accepting stopped after an accept error (e.g. EMFILE), so a level-triggered loop does not
    /// spin on the listener; cleared when a connection closes.
    accept_failed: bool,
    /// The listener is in the epoll set (out of it after an accept error or while `max_pending`
    /// connections are pending).
    listening: bool,
}

impl Muxer {
    /// Binds the listener at `config.uds_path` (which must not exist) and creates the epoll
    /// instance and the deadline timer. The config is taken as validated by
    /// [`super::Vsock::new`].
    ///
    /// # Errors
    /// [`VsockError::Bind`] naming the path, or [`VsockError::Epoll`].
    pub fn new(config: &VsockConfig) -> Result<Self> {
        let path = &config.uds_path;
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Self::with_listener(config, listener, Some(path.to_owned()))
    }

    /// [`Muxer::new`] on a listening socket made by someone else (the jailed VMM inherits it);
    /// `remove` is the socket file to remove on drop, if this muxer owns it.
    ///
    /// # Errors
    /// [`VsockError::Epoll`].
    pub fn with_listener(
        config: &VsockConfig,
        listener: UnixListener,
        remove: Option<PathBuf>,
    ) -> Result<Self> {
        let muxer = Self {
            epoll: Epoll::new().map_err(VsockError::Epoll)?,
            listener,
            path: remove,
            guest_cid: config.guest_cid,
            max_connections: config.max_connections,
            max_pending: config.max_pending,
            connect_line_timeout: config.connect_line_timeout,
            response_timeout: config.response_timeout,
            buf_alloc: config.max_buffered_bytes,
            conns: BTreeMap::new(),
            rst_queue: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            cursor: 0,
            timer: TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?,
            timer_at: None,
            accept_failed: false,
            listening: true,
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
        muxer
            .epoll
            .ctl(
                ControlOperation::Add,
                muxer.timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(muxer)
    }

    /// The epoll fd: readable whenever a host-side socket or the deadline timer needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of connections not yet established (reading the CONNECT line, or waiting for the
    /// guest's answer).
    pub fn pending_count(&self) -> usize {
        self.conns.values().filter(|c| c.is_pending()).count()
    }

    /// Handles the ready host-side sockets and due deadlines without blocking (at most 32 events
    /// per call).
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
        let mut timer_fired = false;
        for ev in &events[..n] {
            let set = EventSet::from_bits_truncate(ev.events());
            match ev.data() {
                LISTENER_TOKEN => self.accept_some(),
                TIMER_TOKEN => timer_fired = true,
                token => {
                    if let Ok(port) = u32::try_from(token) {
                        self.conn_event(port, set);
                    }
                }
            }
        }
        // Deadlines last, so a line or an answer that arrived in this batch counts.
        if timer_fired || self.timer_at.is_some_and(|at| Instant::now() >= at) {
            self.expire_deadlines();
        }
    }

    /// The driver reset the device: connections the guest knew are closed (its side is gone);
    /// connections still waiting for their REQUEST to go out are kept, and a REQUEST already
    /// sent will be sent again (its answer deadline restarts then), so host connections made
    /// before the guest driver started (Linux resets the device when it probes it) survive. The
    /// listener stays.
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
                    conn.deadline = None;
                }
                State::Established | State::Closing => self.teardown(port, false),
            }
        }
        self.rst_queue.clear();
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPTS_PER_CALL {
            if self.pending_count() >= self.max_pending {
                // New clients wait in the listen backlog until a pending one settles.
                self.update_listener();
                return;
            }
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
                    self.accept_failed = true;
                    self.update_listener();
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
            // On the devices thread: fcntl, not std's ioctl(FIONBIO), which seccomp forbids.
            if let Err(err) = crate::sys::set_nonblocking(std::os::fd::AsFd::as_fd(&stream)) {
                warn!(error = %err, "vsock: cannot make a stream non-blocking");
                continue;
            }
            let port = self.alloc_port();
            let deadline = Instant::now() + self.connect_line_timeout;
            self.conns.insert(port, Conn::new(stream, port, deadline));
            self.arm_timer_by(deadline);
            self.refresh(port);
            // The CONNECT line is often already there.
            self.read_handshake(port);
        }
    }

    /// Puts the listener in or out of the epoll set: out after an accept error (until a
    /// connection closes) and while `max_pending` connections are pending.
    fn update_listener(&mut self) {
        let want = !self.accept_failed && self.pending_count() < self.max_pending;
        if want == self.listening {
            return;
        }
        let fd = self.listener.as_raw_fd();
        let res = if want {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match res {
            Ok(()) => self.listening = want,
            Err(err) => warn!(error = %err, listen = want, "vsock: cannot update the listener"),
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

    /// Arms the timer for `at` unless it already fires no later.
    fn arm_timer_by(&mut self, at: Instant) {
        if self.timer_at.is_none_or(|t| at < t) {
            self.set_timer(Some(at));
        }
    }

    /// Arms the timer for `at`, or disarms it. Either resets its expiry count, so a fired timer
    /// stops being readable without a read.
    fn set_timer(&mut self, at: Option<Instant>) {
        let res = match at {
            Some(at) => {
                let after = at.saturating_duration_since(Instant::now()).max(MIN_TIMER);
                self.timer.reset(after, None)
            }
            None => self.timer.clear(),
        };
        if let Err(err) = res {
            // Deadlines are still checked whenever the muxer runs.
            warn!(error = %err, "vsock: cannot set the deadline timer");
        }
        self.timer_at = at;
    }

    /// Drops the pending connections whose deadline passed, then re-arms the timer for the
    /// earliest remaining deadline.
    fn expire_deadlines(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(port, _)| *port)
            .collect();
        for port in due {
            // A line that arrived while the loop was busy still counts.
            self.read_handshake(port);
            let Some(conn) = self.conns.get_mut(&port) else {
                continue;
            };
            if conn.deadline.is_none_or(|d| d > now) {
                continue;
            }
            match conn.state {
                State::Handshake { .. } => {
                    debug!(host_port = port, "vsock: no CONNECT line in time; closing");
                    self.teardown(port, false);
                }
                State::Requesting { sent: true } => {
                    debug!(
                        host_port = port,
                        peer_port = conn.peer_port,
                        "vsock: the guest did not answer the connection request in time; closing"
                    );
                    self.teardown(port, true);
                }
                State::Requesting { sent: false } | State::Established | State::Closing => {
                    conn.deadline = None;
                }
            }
        }
        let next = self.conns.values().filter_map(|c| c.deadline).min();
        self.set_timer(next);
    }

    fn conn_event(&mut self, port: u32, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        let hung_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        match conn.state {
            State::Handshake { .. } => {
                self.read_handshake(port);
                return;
            }
            State::Requesting { sent } => {
                if hung_up {
                    if has_unread_bytes(&conn.stream) {
                        // Bytes after the CONNECT line are owed to the guest once it accepts.
                        conn.hup = true;
                        conn.mark_host_closed();
                    } else {
                        debug!(
                            host_port = port,
                            "vsock: host closed before the guest answered; request withdrawn"
                        );
                        self.teardown(port, sent);
                        return;
                    }
                }
            }
            State::Established | State::Closing => {
                if set.contains(EventSet::IN) || hung_up {
                    conn.readable = true;
                }
                if hung_up {
                    // Unread host bytes stay readable (then EOF); the host takes no more.
                    conn.hup = true;
                    conn.mark_host_closed();
                }
                if set.contains(EventSet::OUT) || hung_up {
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
                        // The answer deadline starts when the REQUEST goes out.
                        conn.deadline = None;
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
        if conn.interest.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        // A freed fd may be what a failed accept was missing; a freed pending slot lets the
        // next client in.
        self.accept_failed = false;
        self.update_listener();
        if self.conns.is_empty() && self.timer_at.is_some() {
            // No deadline is left: keep an idle device quiet.
            self.set_timer(None);
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
        let buf_alloc = self.buf_alloc;
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
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(Errno::EPIPE | Errno::ECONNRESET) => {
                    // The host closed its end. Its unread bytes may still be owed to the guest,
                    // so the connection stays until they are delivered.
                    debug!(host_port = port, "vsock: host stopped receiving");
                    conn.mark_host_closed();
                }
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
            if conn.guest_shut_send && !conn.host_write_shut && !conn.host_closed {
                let _ = conn.stream.shutdown(Shutdown::Write);
                conn.host_write_shut = true;
            }
        }
        conn.note_consumed(buf_alloc);
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
        let buf_alloc = self.buf_alloc;
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
                conn.deadline = None;
                if !conn.host_closed {
                    let line = format!("OK {port}\n");
                    conn.ok_line_len = line.len();
                    conn.to_host.extend(line.as_bytes());
                }
                // The host may have written data right after its CONNECT line.
                conn.readable = true;
                self.flush_to_host(port);
                self.update_listener();
            }
            op::RW => {
                let room = (buf_alloc as usize).saturating_sub(conn.guest_bytes_buffered());
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
                if conn.host_closed {
                    // Nobody reads any more: drop the bytes, but keep the guest's credit
                    // moving until it hears our SHUTDOWN.
                    // payload.len() <= room <= buf_alloc, a u32.
                    conn.fwd_cnt += Wrapping(u32::try_from(payload.len()).unwrap_or(u32::MAX));
                    conn.note_consumed(buf_alloc);
                } else {
                    conn.to_host.extend(payload);
                    self.flush_to_host(port);
                }
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
    /// only). A REQUEST handed out here starts its answer deadline.
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
        let response_timeout = self.response_timeout;
        let conn = self.conns.get_mut(&port)?;
        let mut request_deadline = None;
        let mut flags = 0;
        let op = if matches!(conn.state, State::Requesting { sent: false }) {
            conn.state = State::Requesting { sent: true };
            let at = Instant::now() + response_timeout;
            conn.deadline = Some(at);
            request_deadline = Some(at);
            op::REQUEST
        } else if let Some(owed) = conn.shutdown_owed() {
            flags = owed;
            op::SHUTDOWN
        } else if conn.want_credit_update {
            conn.want_credit_update = false;
            op::CREDIT_UPDATE
        } else if conn.readable && conn.wants_data_to_guest() && !buf.is_empty() {
            let n = buf.len().min(conn.peer_credit() as usize);
            let reset = match (&conn.stream).read(&mut buf[..n]) {
                Ok(0) => false,
                Ok(n) => {
                    conn.tx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    let mut hdr = header(guest_cid, buf_alloc, conn, op::RW);
                    hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                    conn.last_fwd_sent = conn.fwd_cnt;
                    self.refresh(port);
                    return Some((hdr, n));
                }
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => true,
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
            };
            // EOF, read after the last byte. A host that closed with bytes of ours unread
            // reports ECONNRESET once instead (also after its last byte).
            conn.host_eof = true;
            conn.readable = false;
            if reset {
                conn.mark_host_closed();
            }
            flags = conn.shutdown_owed().unwrap_or(SHUTDOWN_SEND);
            op::SHUTDOWN
        } else {
            return None;
        };
        let mut hdr = header(guest_cid, buf_alloc, conn, op);
        hdr.flags = flags;
        conn.shut_told |= flags;
        conn.last_fwd_sent = conn.fwd_cnt;
        let finished = conn.shut_told == SHUTDOWN_BOTH;
        if let Some(at) = request_deadline {
            self.arm_timer_by(at);
        }
        if finished {
            // The host is gone and the guest got every byte and both SHUTDOWN flags: nothing is
            // left to carry. The guest's answering RST (§5.10.6.5) finds no connection.
            debug!(
                host_port = port,
                "vsock: host closed and its bytes were delivered"
            );
            self.teardown(port, false);
        } else {
            self.refresh(port);
        }
        Some((hdr, 0))
    }

    /// Whether no connection, queued RST or armed deadline is left (tests check that expired
    /// connections leave nothing behind).
    #[cfg(test)]
    pub(super) fn is_idle(&self) -> bool {
        self.conns.is_empty() && self.rst_queue.is_empty() && self.timer_at.is_none()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours: remove it so nothing is left behind.
        if let Some(path) = &self.path {
            if let Err(err) = std::fs::remove_file(path) {
                debug!(path = %path.display(), error = %err, "vsock: cannot remove the socket file");
            }
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
