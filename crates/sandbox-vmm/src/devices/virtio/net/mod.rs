//! virtio-net (virtio 1.2 §5.1) over a frame backend (a tap).
//!
//! Two queues, receiveq (0) and transmitq (1), of up to [`QUEUE_SIZE`] entries. Features
//! offered: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC (the configured MAC in config space) and
//! VIRTIO_NET_F_STATUS (link always up). No offloads: every frame carries the 12-byte
//! `struct virtio_net_hdr_v1` with no checksum or GSO request, in both directions, and the
//! device clears those fields whatever the guest writes, so a guest cannot ask the host kernel
//! for segmentation it never negotiated.
//!
//! Data path, bounded per turn:
//! - **transmitq**: each chain (device-readable buffers only, 14..=[`MAX_FRAME`] bytes including
//!   the header) is gathered into one bounce buffer and written to the backend as one frame;
//!   anything else is dropped and counted. At most one queue's worth of chains per notification.
//! - **receiveq**: frames are read from the backend into one bounce buffer and copied into one
//!   chain each (VIRTIO_NET_F_MRG_RXBUF is not offered, §5.1.6.3.1). A frame larger than the
//!   chain the guest offered is dropped and counted, and the chain goes back to the ring for the
//!   next frame. When the guest has no buffer, the frame waits in the bounce buffer and the
//!   backend fd leaves the device's epoll set (so the level-triggered event loop does not spin);
//!   the guest's next receiveq notification delivers it and puts the fd back. At most
//!   [`RX_FRAMES_PER_TURN`] frames per call.
//!
//! The VMM's event loop polls [`Net::backend_fd`] (the device's own epoll fd, which holds the
//! backend fd while frames are wanted) for `EPOLLIN` and calls [`Net::handle_backend_event`].

pub mod backend;

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use backend::{FdBackend, NetBackend, NetBackendError};

use super::chain::{self, ChainDesc};
use super::{
    complete, feature, pop_chain, read_config_bytes, Result, VirtioDevice, VirtioError,
    VirtioInterrupt, DEVICE_ID_NET, VIRTIO_F_VERSION_1,
};
use crate::logging::guest_log;

/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// VIRTIO_NET_F_MAC: config `mac` is valid.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// VIRTIO_NET_F_STATUS: config `status` is valid.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// VIRTIO_NET_S_LINK_UP.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Length of `struct virtio_net_hdr_v1` in bytes (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame the device moves, header included: the header plus 65,535 bytes (the
/// most a tap without offloads produces, and far above a 1500-byte MTU).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535;
/// The smallest transmitted frame, header included: the header plus an Ethernet header.
pub const MIN_TX_FRAME: usize = VNET_HDR_LEN + 14;
/// Frames moved from the backend to the guest per call, bounding one loop turn.
pub const RX_FRAMES_PER_TURN: usize = 64;
/// Epoll token of the backend fd in the device's epoll set.
const BACKEND_TOKEN: u64 = 1;

/// Errors of creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device's epoll set cannot be created.
    #[error("cannot create the virtio-net epoll set.")]
    Epoll(#[source] std::io::Error),
}

/// How a virtio-net device is set up (plain data; the backend is passed separately).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl NetConfig {
    /// A config with the given MAC address.
    pub fn new(mac: [u8; 6]) -> Self {
        Self { mac }
    }
}

/// Frame and drop counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames dropped because they were larger than the guest's buffer.
    pub rx_too_big: u64,
    /// receiveq chains refused (not device-writable, outside guest memory, too long).
    pub rx_bad_chains: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// transmitq chains dropped (device-writable buffers, outside memory, too short or long).
    pub tx_bad_chains: u64,
    /// Frames the backend refused or failed to take.
    pub tx_backend_errors: u64,
}

struct Active<M> {
    mem: M,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device.
pub struct Net<M> {
    backend: Box<dyn NetBackend>,
    epoll: Epoll,
    /// The backend fd is in `epoll` (frames are wanted).
    watching: bool,
    config_space: [u8; 8],
    queue_sizes: [u16; 2],
    active: Option<Active<M>>,
    descs: Vec<ChainDesc>,
    rx_frame: Box<[u8]>,
    /// Length of a received frame waiting in `rx_frame` for a guest buffer.
    rx_pending: Option<usize>,
    tx_frame: Box<[u8]>,
    stats: NetStats,
}

impl<M> std::fmt::Debug for Net<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("active", &self.active.is_some())
            .field("watching", &self.watching)
            .field("rx_pending", &self.rx_pending)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What happened to one received frame.
enum Delivery {
    Delivered,
    /// Dropped (too big for the chain, which went back to the ring).
    Dropped,
    /// No usable chain: the frame must wait.
    NoBuffer,
}

impl<M: GuestMemory> Net<M> {
    /// A device that moves frames between the guest and `backend`.
    ///
    /// # Errors
    /// [`NetError::Epoll`].
    pub fn new(
        backend: Box<dyn NetBackend>,
        config: &NetConfig,
    ) -> std::result::Result<Self, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        // struct virtio_net_config (§5.1.4): u8 mac[6] @0, le16 status @6.
        let mut config_space = [0u8; 8];
        config_space[..6].copy_from_slice(&config.mac);
        config_space[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Ok(Self {
            backend,
            epoll,
            watching: false,
            config_space,
            queue_sizes: [QUEUE_SIZE; 2],
            active: None,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            rx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            rx_pending: None,
            tx_frame: vec![0u8; MAX_FRAME].into_boxed_slice(),
            stats: NetStats::default(),
        })
    }

    /// The fd the VMM's event loop watches for `EPOLLIN`; see the module docs.
    pub fn backend_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.epoll.as_raw_fd()
    }

    /// The frame and drop counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Event-loop entry point for [`Net::backend_fd`] readiness: moves waiting frames to the
    /// guest.
    ///
    /// # Errors
    /// [`VirtioError::Interrupt`] if the interrupt cannot be raised.
    pub fn handle_backend_event(&mut self) -> Result<()> {
        self.process_rx()
    }

    /// Puts the backend fd in or out of the device's epoll set.
    fn watch(&mut self, on: bool) {
        if self.watching == on {
            return;
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let event = EpollEvent::new(EventSet::IN, BACKEND_TOKEN);
        match self.epoll.ctl(op, self.backend.raw_fd(), event) {
            Ok(()) => self.watching = on,
            Err(err) => tracing::warn!(%err, on, "virtio-net: cannot change the backend watch"),
        }
    }

    /// Delivers the waiting frame, then reads and delivers up to [`RX_FRAMES_PER_TURN`] more.
    fn process_rx(&mut self) -> Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = 0usize;
        let mut stalled = false;
        for _ in 0..RX_FRAMES_PER_TURN {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_frame) {
                    Ok(len) => len,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        tracing::warn!(%err, "virtio-net: backend read failed");
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue; // nothing a guest could use
            }
            // No offload was negotiated: no checksum or GSO request reaches the guest.
            // num_buffers is 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.4).
            let frame = &mut self.rx_frame[..len];
            frame[..10].fill(0);
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match deliver(active, &mut self.descs, frame, &mut self.stats) {
                Delivery::Delivered => {
                    used += 1;
                    self.stats.rx_frames += 1;
                }
                Delivery::Dropped => self.stats.rx_too_big += 1,
                Delivery::NoBuffer => {
                    self.rx_pending = Some(len);
                    stalled = true;
                    break;
                }
            }
        }
        // Wait for the guest's receiveq notification while a frame waits; otherwise watch the
        // backend again.
        self.watch(!stalled);
        if used > 0 {
            if let Some(active) = self.active.as_ref() {
                active.interrupt.signal_used_queue()?;
            }
        }
        Ok(())
    }

    /// Sends the guest's frames, one queue's worth at most.
    fn process_tx(&mut self) -> Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = 0usize;
        for _ in 0..active.tx.size() {
            let Some(desc_chain) = pop_chain(&mut active.tx, &active.mem) else {
                break;
            };
            let head = desc_chain.head_index();
            let max = usize::from(active.tx.size());
            match gather(
                &active.mem,
                desc_chain,
                max,
                &mut self.descs,
                &mut self.tx_frame,
            ) {
                Some(len) => {
                    let frame = &mut self.tx_frame[..len];
                    // The guest may not ask for checksum or GSO work it never negotiated.
                    frame[..10].fill(0);
                    match self.backend.send(frame) {
                        Ok(()) => self.stats.tx_frames += 1,
                        Err(err) => {
                            self.stats.tx_backend_errors += 1;
                            guest_log!(debug, error = %err, "virtio-net: frame not sent");
                        }
                    }
                }
                None => self.stats.tx_bad_chains += 1,
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

/// Copies one transmitq chain into `frame`; returns its length, or `None` (logged) if the
/// chain is not a frame the device sends.
fn gather<M: GuestMemory>(
    mem: &M,
    desc_chain: virtio_queue::DescriptorChain<&M>,
    max: usize,
    descs: &mut Vec<ChainDesc>,
    frame: &mut [u8],
) -> Option<usize> {
    if let Err(err) = chain::collect(desc_chain, max, descs) {
        guest_log!(debug, error = %err, "virtio-net: bad transmitq chain");
        return None;
    }
    if descs.iter().any(|d| d.write_only) {
        guest_log!(debug, "virtio-net: device-writable buffer on the transmitq");
        return None;
    }
    let total = chain::total_len(descs);
    let Ok(len) = usize::try_from(total) else {
        return None;
    };
    if !(MIN_TX_FRAME..=frame.len()).contains(&len) {
        guest_log!(
            debug,
            len,
            "virtio-net: transmitted frame too short or too long"
        );
        return None;
    }
    if chain::check_ranges(mem, descs).is_err() {
        guest_log!(debug, "virtio-net: transmitq buffer outside guest memory");
        return None;
    }
    match chain::read_at(mem, descs, 0, &mut frame[..len]) {
        Ok(n) if n == len => Some(len),
        _ => None,
    }
}

/// Copies `frame` into the next usable receiveq chain.
fn deliver<M: GuestMemory>(
    active: &mut Active<M>,
    descs: &mut Vec<ChainDesc>,
    frame: &[u8],
    stats: &mut NetStats,
) -> Delivery {
    // Skip (and complete) unusable chains, one queue's worth at most.
    for _ in 0..active.rx.size() {
        let Some(desc_chain) = pop_chain(&mut active.rx, &active.mem) else {
            return Delivery::NoBuffer;
        };
        let head = desc_chain.head_index();
        let max = usize::from(active.rx.size());
        let usable = chain::collect(desc_chain, max, descs).is_ok()
            && descs.iter().all(|d| d.write_only)
            && chain::check_ranges(&active.mem, descs).is_ok();
        if !usable {
            guest_log!(debug, "virtio-net: unusable receiveq chain");
            stats.rx_bad_chains += 1;
            complete(&mut active.rx, &active.mem, head, 0);
            continue;
        }
        if chain::total_len(descs) < frame.len() as u64 {
            // Keep the buffer for a frame that fits.
            active.rx.go_to_previous_position();
            return Delivery::Dropped;
        }
        return match chain::write_at(&active.mem, descs, 0, frame) {
            Ok(n) if n == frame.len() => {
                // n <= MAX_FRAME < 2^32.
                complete(&mut active.rx, &active.mem, head, n as u32);
                Delivery::Delivered
            }
            _ => {
                stats.rx_bad_chains += 1;
                complete(&mut active.rx, &active.mem, head, 0);
                Delivery::Dropped
            }
        };
    }
    Delivery::NoBuffer
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Net<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MAC) | feature(VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-less legacy drivers; we are
        // VERSION_1 only (§5.1.4.2: the driver MUST NOT write to the config space).
        guest_log!(debug, offset, "virtio-net: config write ignored");
    }

    fn activate(
        &mut self,
        mem: M,
        _acked_features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<()> {
        if queues.len() != 2 {
            return Err(VirtioError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let tx = queues.remove(1);
        let rx = queues.remove(0);
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        self.rx_pending = None;
        self.watch(true);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<()> {
        match index {
            0 => self.process_rx(),
            1 => self.process_tx(),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        // Frames arriving while the driver is away stay in the tap's queue (the kernel drops
        // the oldest past its length).
        self.watch(false);
    }
}

#[cfg(test)]
mod tests;
