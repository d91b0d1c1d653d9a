//! Virtio devices over the virtio-mmio transport (virtio 1.2 §4.2.2, modern interface only).
//!
//! What lives here:
//! 1. [`mmio::MmioTransport`]: the register file of one virtio-mmio device (a 0x1000-byte MMIO
//!    window, [`MMIO_REGION_SIZE`]), the device status state machine, feature negotiation and the
//!    split virtqueues (via the `virtio-queue` crate). It is a [`BusDevice`].
//! 2. [`VirtioDevice`]: what a device type implements (ID, features, queue sizes, config space,
//!    activation, queue processing, reset).
//! 3. [`block::Block`]: virtio-blk (virtio 1.2 §5.2) over a [`block::BlockBackend`].
//! 4. [`vsock::Vsock`]: virtio-vsock (virtio 1.2 §5.10) whose host side is a Unix socket.
//! 5. [`net::Net`]: virtio-net (virtio 1.2 §5.1) over a tap.
//!
//! # How the VMM core wires a device
//!
//! ```text
//!  let irq = EventFd::new(EFD_NONBLOCK)?;               // one per device
//!  vm_fd.register_irqfd(&irq, gsi)?;                    // KVM injects `gsi` when irq is written
//!  let transport = MmioTransport::new(mem.clone(), device, Arc::new(irq))?;
//!  let transport = Arc::new(Mutex::new(transport));
//!  bus.insert(base, MMIO_REGION_SIZE, transport.clone());   // as a BusDevice
//!  for (i, evt) in transport.lock().queue_events().iter().enumerate() {
//!      // Optional fast path: KVM signals the eventfd on a 4-byte write of `i` to QueueNotify
//!      // and the vCPU never exits to user space for that notification.
//!      vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//!      epoll.add(evt.as_raw_fd(), token(device, i));
//!  }
//!  dsdt.push(lnro0005(base, MMIO_REGION_SIZE, gsi)); // or `virtio_mmio.device=` for acpi=off
//!
//!  // event-loop thread, on readiness of queue `i`'s eventfd:
//!  transport.lock().handle_queue_event(i);              // reads the eventfd, then processes
//! ```
//!
//! - Both notification paths work: a QueueNotify write that reaches [`BusDevice::write`] (no
//!   ioeventfd registered) is processed inline on the vCPU thread; with ioeventfds registered, KVM
//!   consumes the write and the event loop calls [`mmio::MmioTransport::handle_queue_event`].
//!   Use one path or the other per device, not both at once.
//! - The same `Mutex` serializes vCPU register accesses and event-loop processing, so a device
//!   never sees two callers at once.
//! - Interrupts: the device sets InterruptStatus bit 0 (used buffer) or bit 1 (configuration
//!   change) and then calls [`IrqTrigger::trigger`] (an irqfd in the VMM, edge-triggered). The guest
//!   clears bits through InterruptACK.
//! - Devices with host-side file descriptors (vsock) expose one extra fd for the event loop:
//!   [`vsock::Vsock::backend_fd`] is an epoll fd that becomes readable when any host-side socket
//!   is ready; on readiness the event loop calls
//!   `transport.lock().device_mut().handle_backend_event()`. See the [`vsock`] module.
//!
//! Device IDs (virtio 1.2 §5): [`DEVICE_ID_NET`] = 1, [`DEVICE_ID_BLOCK`] = 2, [`DEVICE_ID_VSOCK`] = 19.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemory;

pub use super::{BusDevice, IrqTrigger};

/// Size in bytes of one virtio-mmio register window (registers plus config space).
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM registers per-queue ioeventfds with
/// `datamatch = queue index` (4-byte writes).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

/// virtio-net device ID (virtio 1.2 §5).
pub const DEVICE_ID_NET: u32 = 1;
/// virtio-blk device ID (virtio 1.2 §5).
pub const DEVICE_ID_BLOCK: u32 = 2;
/// virtio-vsock device ID (virtio 1.2 §5).
pub const DEVICE_ID_VSOCK: u32 = 19;

/// Feature bit: the device complies with virtio 1.0+ (virtio 1.2 §6). Mandatory for virtio-mmio
/// version 2; a driver that does not accept it cannot reach FEATURES_OK.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// InterruptStatus bit 0: the device used a buffer in at least one virtqueue (virtio 1.2 §4.2.2).
pub const INTERRUPT_STATUS_USED_RING: u32 = 0x1;
/// InterruptStatus bit 1: the device configuration changed (virtio 1.2 §4.2.2).
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 0x2;

/// Errors of virtio device activation and processing.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The device was given a different number of queues than it declared.
    #[error("the device expects {expected} queues but got {got}.")]
    QueueCount {
        /// Queues the device declared.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd.")]
    EventFd(#[source] io::Error),
    /// Raising the interrupt failed.
    #[error("cannot raise the device interrupt.")]
    Interrupt(#[source] io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, VirtioError>;

/// The interrupt state shared by a transport and its device: the InterruptStatus register and
/// the line to raise (virtio 1.2 §4.2.2, InterruptStatus/InterruptACK).
pub struct VirtioInterrupt {
    status: AtomicU32,
    trigger: Arc<dyn IrqTrigger>,
}

impl fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// An interrupt with a clear status that raises `trigger`.
    pub fn new(trigger: Arc<dyn IrqTrigger>) -> Self {
        Self {
            status: AtomicU32::new(0),
            trigger,
        }
    }

    /// Sets InterruptStatus bit 0 and raises the line (the device used buffers).
    ///
    /// # Errors
    /// [`VirtioError::Interrupt`] if the trigger (irqfd write) failed.
    pub fn signal_used_queue(&self) -> Result<()> {
        self.signal(INTERRUPT_STATUS_USED_RING)
    }

    /// Sets InterruptStatus bit 1 and raises the line (configuration change, or
    /// DEVICE_NEEDS_RESET; virtio 1.2 §2.1.2).
    ///
    /// # Errors
    /// [`VirtioError::Interrupt`] if the trigger (irqfd write) failed.
    pub fn signal_config_change(&self) -> Result<()> {
        self.signal(INTERRUPT_STATUS_CONFIG_CHANGED)
    }

    fn signal(&self, bit: u32) -> Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.trigger.trigger().map_err(VirtioError::Interrupt)
    }

    /// The current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the bits set in `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// A virtio device type behind a transport.
///
/// The transport calls these methods with its lock held, from a vCPU thread or the event-loop
/// thread. Implementations must never panic on guest input and must bound the work of one call
/// (at most one pass over a queue's available ring per [`VirtioDevice::process_queue`]).
pub trait VirtioDevice<M: GuestMemory>: Send {
    /// The virtio device ID (virtio 1.2 §5), e.g. [`DEVICE_ID_BLOCK`].
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The maximum size of each virtqueue; the slice's length is the number of queues. Each size
    /// is a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of device config space at `offset` (relative to config start).
    /// Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to config space; devices whose config is read-only ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called once the driver set DRIVER_OK and every queue is valid. `queues` are ready, with
    /// their sizes and ring addresses checked against `mem`; `acked_features` is what the driver
    /// accepted (a subset of [`VirtioDevice::avail_features`]).
    ///
    /// # Errors
    /// When the device cannot start; the transport then sets DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<()>;
    /// The driver notified queue `index` (always `< queue_max_sizes().len()`, and only after a
    /// successful activation). Processes what is available and raises the interrupt if needed.
    ///
    /// # Errors
    /// On a device-internal failure; guest mistakes are answered on the ring, not returned.
    fn process_queue(&mut self, index: usize) -> Result<()>;
    /// The driver reset the device (wrote 0 to Status): drop queues, memory and interrupt, and
    /// forget all per-driver state.
    fn reset(&mut self);
}

/// Pops the next available descriptor chain, like `QueueT::pop_descriptor_chain`, but a bad
/// available ring (an avail index more than a queue size ahead, a ring at address 0) is logged
/// through the rate limiter instead of by `virtio-queue` itself (which logs every failure at
/// error level, once per notification a guest sends). `None` when nothing is available or the
/// ring is unusable.
pub(crate) fn pop_chain<M>(queue: &mut Queue, mem: M) -> Option<virtio_queue::DescriptorChain<M>>
where
    M: Clone + std::ops::Deref,
    M::Target: GuestMemory,
{
    match virtio_queue::QueueOwnedT::iter(queue, mem) {
        Ok(mut iter) => iter.next(),
        Err(err) => {
            crate::logging::guest_log!(
                warn,
                error = %err,
                "virtio: cannot read the available ring"
            );
            None
        }
    }
}

/// Puts chain `head` on the used ring with `len` bytes written. A failure (a head index the
/// guest put out of range, which walks as an empty chain) is logged and skipped so the rest of
/// the ring is still served. Returns whether the element was added. An out-of-range head is
/// caught here, before `virtio-queue` would log it without a rate limit.
pub(crate) fn complete<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32) -> bool {
    if head >= virtio_queue::QueueT::size(queue) {
        crate::logging::guest_log!(debug, head, "virtio: chain head out of range");
        return false;
    }
    match virtio_queue::QueueT::add_used(queue, mem, head, len) {
        Ok(()) => true,
        Err(err) => {
            crate::logging::guest_log!(
                debug,
                head,
                error = %err,
                "virtio: cannot complete a chain"
            );
            false
        }
    }
}

/// Feature bit `bit` as a mask.
pub(crate) const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Copies bytes of a little config structure into `data` for a guest read at `offset`. Bytes
/// past the end of `config` read as zero; never panics.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::test_utils::{mem, TestQueue};
    use super::*;
    use crate::logging::{capture, GUEST_LOG_BURST};

    #[test]
    fn a_bad_avail_index_yields_nothing_and_logs_boundedly() {
        let m = mem();
        let mut tq = TestQueue::new(&m, 0x1000, 16);
        tq.add_chain(&m, &[(0x8000, 16, false)]);
        let mut q = tq.queue();
        // The driver claims 16 + 5 new entries in a 16-entry ring.
        m.write_obj(21u16.to_le(), GuestAddress(tq.avail + 2))
            .expect("avail idx");
        let lines = capture::log_lines(|| {
            for _ in 0..5000 {
                assert!(pop_chain(&mut q, &m).is_none());
            }
        });
        let n = lines
            .iter()
            .filter(|l| l.contains("cannot read the available ring"))
            .count();
        assert!(n <= 2 * (GUEST_LOG_BURST as usize + 1), "{n} lines");
        // A sane index again: the chain is there.
        m.write_obj(1u16.to_le(), GuestAddress(tq.avail + 2))
            .expect("avail idx");
        let chain = pop_chain(&mut q, &m).expect("chain");
        assert_eq!(chain.head_index(), 0);
    }

    #[test]
    fn an_out_of_range_head_is_not_completed() {
        let m = mem();
        let tq = TestQueue::new(&m, 0x1000, 16);
        let mut q = tq.queue();
        assert!(!complete(&mut q, &m, 16, 0));
        assert!(!complete(&mut q, &m, u16::MAX, 0));
        assert_eq!(tq.used_idx(&m), 0);
        assert!(complete(&mut q, &m, 15, 4));
        assert_eq!(tq.used_idx(&m), 1);
        assert_eq!(tq.used_elem(&m, 0), (15, 4));
    }
}
