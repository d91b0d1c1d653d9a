//! The virtio-mmio transport, modern interface (virtio 1.2 §4.2.2; version 2 only).
//!
//! Register file at offsets 0x000..0x100 (32-bit, 4-byte aligned accesses only; anything else
//! reads as zero and is ignored on write), device config space from 0x100 (any width). The
//! device status state machine follows virtio 1.2 §2.1 and §3.1.1: ACKNOWLEDGE → DRIVER →
//! FEATURES_OK → DRIVER_OK, FAILED at any time, 0 resets.
//!
//! Hardening (every value here is written by the guest):
//! - QueueSel out of range: queue register reads return 0 and writes are dropped.
//! - QueueNum of 0, not a power of two, or above QueueNumMax: QueueReady stays 0, so the device
//!   cannot activate.
//! - Ring addresses: alignment (virtio 1.2 §2.7) and the whole descriptor table, available ring
//!   and used ring are checked against guest memory when the driver sets QueueReady.
//! - Queue registers are only writable between FEATURES_OK and DRIVER_OK, while the queue is not
//!   ready (virtio 1.2 §4.2.2.2); feature registers only between DRIVER and FEATURES_OK.
//! - Status writes that clear bits (other than a full reset) or skip a step are ignored;
//!   FEATURES_OK is refused when the driver accepted unoffered features or not VERSION_1.

use std::fmt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::logging::guest_log;

use super::{
    feature, BusDevice, IrqTrigger, Result, VirtioDevice, VirtioError, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// "virt" in little endian (virtio 1.2 §4.2.2).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID we report.
pub const VENDOR_ID: u32 = 0;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The driver-programmed state of one virtqueue, before it becomes a `virtio_queue::Queue`.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    /// QueueNum as written (validated only when the driver sets QueueReady).
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// A ready `Queue` for these registers, or `None` if the size, alignment or ring placement
    /// in `mem` is invalid.
    fn to_queue<M: GuestMemory>(self, mem: &M) -> Option<Queue> {
        let size = u16::try_from(self.size).ok()?;
        let mut q = Queue::new(self.max_size).ok()?;
        // try_set_size refuses 0, non-powers of two and sizes above the maximum.
        q.try_set_size(size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_ready(true);
        // Check the whole descriptor table and both rings against guest memory here: `is_valid`
        // does the same but logs every failure at error level without a rate limit, so it only
        // runs once these checks passed (and then cannot fail).
        let fits = |addr: u64, len: u64| {
            usize::try_from(len).is_ok_and(|len| {
                addr.checked_add(len as u64).is_some()
                    && mem.check_range(GuestAddress(addr), len, Permissions::ReadWrite)
            })
        };
        let n = u64::from(size);
        let rings_fit =
            fits(self.desc, 16 * n) && fits(self.driver, 6 + 2 * n) && fits(self.device, 6 + 8 * n);
        // virtio-queue cannot iterate an available ring at address 0 (it takes 0 for "unset").
        (rings_fit && self.driver != 0 && q.is_valid(mem)).then_some(q)
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio-mmio device: registers, queues, and the device behind them.
///
/// Put it on the MMIO bus with a window of [`super::MMIO_REGION_SIZE`] bytes, typically inside
/// an `Arc<Mutex<_>>` shared with the event loop (see the module docs of [`super`]).
pub struct MmioTransport<M: GuestMemory, D: VirtioDevice<M>> {
    device: D,
    mem: M,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueRegs>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl<M: GuestMemory, D: VirtioDevice<M>> fmt::Debug for MmioTransport<M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl<M, D> MmioTransport<M, D>
where
    M: GuestMemory + Clone + Send,
    D: VirtioDevice<M>,
{
    /// A transport for `device` over guest memory `mem`, raising `irq` for interrupts. Creates
    /// one non-blocking eventfd per queue (see [`MmioTransport::queue_events`]).
    ///
    /// # Errors
    /// [`VirtioError::EventFd`] if an eventfd cannot be created.
    pub fn new(mem: M, device: D, irq: Arc<dyn IrqTrigger>) -> Result<Self> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs::new(max))
            .collect();
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// One eventfd per queue, in queue order. The VMM may register each with KVM as an
    /// ioeventfd on `base + NOTIFY_REG_OFFSET`, 4 bytes, `datamatch = index`, and poll it in its
    /// event loop; on readiness call [`MmioTransport::handle_queue_event`].
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Event-loop entry point: queue `index`'s eventfd is readable. Clears the eventfd, then
    /// processes the queue like a QueueNotify write. Out-of-range indices are ignored.
    pub fn handle_queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_events.get(index) else {
            return;
        };
        // A spurious wakeup leaves the counter at zero (EAGAIN); processing is harmless then.
        let _ = evt.read();
        self.process_queue(index);
    }

    /// Processes queue `index` if the device is active (the QueueNotify path). Device errors are
    /// logged; guest mistakes were already answered on the used ring.
    pub fn process_queue(&mut self, index: usize) {
        if !self.active || index >= self.queues.len() {
            guest_log!(
                debug,
                index,
                active = self.active,
                "virtio-mmio: notification ignored"
            );
            return;
        }
        if let Err(err) = self.device.process_queue(index) {
            guest_log!(warn, index, error = %err, "virtio-mmio: queue processing failed");
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, mutably (e.g. for host-side events of vsock).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The shared interrupt state (InterruptStatus and the line).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK with valid queues) and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device changed its config space: bumps ConfigGeneration and raises a
    /// configuration-change interrupt (virtio 1.2 §2.5.1).
    ///
    /// # Errors
    /// [`VirtioError::Interrupt`] if the interrupt cannot be raised.
    pub fn config_changed(&mut self) -> Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change()
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.selected_queue();
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length and base of a missing region read as -1
            // (virtio 1.2 §4.2.2).
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            // Write-only registers (feature selectors, QueueNum, the queue addresses, ...),
            // reserved offsets and the unimplemented SHM/QueueReset registers read as zero.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                // Only during negotiation (virtio 1.2 §3.1.1 steps 4–5).
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, value),
                    1 => set_high(&mut self.driver_features, value),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_queue_config(|q| q.size = value),
            reg::QUEUE_DESC_LOW => self.with_queue_config(|q| set_low(&mut q.desc, value)),
            reg::QUEUE_DESC_HIGH => self.with_queue_config(|q| set_high(&mut q.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.with_queue_config(|q| set_low(&mut q.driver, value)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue_config(|q| set_high(&mut q.driver, value)),
            reg::QUEUE_DEVICE_LOW => self.with_queue_config(|q| set_low(&mut q.device, value)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue_config(|q| set_high(&mut q.device, value)),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => {
                if let Ok(index) = usize::try_from(value) {
                    self.process_queue(index);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => guest_log!(
                debug,
                offset,
                value,
                "virtio-mmio: write to read-only or unknown register"
            ),
        }
    }

    /// Applies `f` to the selected queue if queue configuration is allowed now: after
    /// FEATURES_OK, before DRIVER_OK, queue not ready, QueueSel in range.
    fn with_queue_config(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            != status::FEATURES_OK
        {
            return;
        }
        let Some(q) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            return;
        };
        if !q.ready {
            f(q);
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        if self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            != status::FEATURES_OK
        {
            return;
        }
        let Some(index) = usize::try_from(self.queue_sel)
            .ok()
            .filter(|&i| i < self.queues.len())
        else {
            return;
        };
        let regs = self.queues[index];
        if value == 0 {
            self.queues[index].ready = false;
        } else if value == 1 && !regs.ready {
            if regs.to_queue(&self.mem).is_some() {
                self.queues[index].ready = true;
            } else {
                guest_log!(
                    warn,
                    index,
                    size = regs.size,
                    desc = regs.desc,
                    driver = regs.driver,
                    device = regs.device,
                    "virtio-mmio: invalid virtqueue configuration refused"
                );
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver never sets DEVICE_NEEDS_RESET; the device owns that bit.
        let value = value & !status::DEVICE_NEEDS_RESET | (old & status::DEVICE_NEEDS_RESET);
        if value & old != old {
            guest_log!(
                debug,
                old,
                value,
                "virtio-mmio: status write clearing bits ignored"
            );
            return;
        }
        let added = value & !old;
        if added & status::FAILED != 0 {
            guest_log!(
                info,
                device_type = self.device.device_type(),
                "virtio-mmio: driver set FAILED"
            );
            self.status |= status::FAILED;
            return;
        }
        let has = |bit| value & bit != 0;
        // Each step requires the previous ones (virtio 1.2 §3.1.1).
        let ordered = (!has(status::DRIVER) || has(status::ACKNOWLEDGE))
            && (!has(status::FEATURES_OK) || has(status::DRIVER))
            && (!has(status::DRIVER_OK) || has(status::FEATURES_OK));
        if !ordered || old & status::FAILED != 0 {
            guest_log!(
                debug,
                old,
                value,
                "virtio-mmio: out-of-order status write ignored"
            );
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & feature(VIRTIO_F_VERSION_1) != 0;
            if !ok {
                guest_log!(
                    warn,
                    offered,
                    accepted = self.driver_features,
                    "virtio-mmio: FEATURES_OK refused"
                );
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = value & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            match regs.ready.then(|| regs.to_queue(&self.mem)).flatten() {
                Some(q) => queues.push(q),
                None => {
                    guest_log!(warn, index, "virtio-mmio: DRIVER_OK with an unusable queue");
                    self.needs_reset();
                    return;
                }
            }
        }
        let result = self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            self.interrupt.clone(),
        );
        match result {
            Ok(()) => {
                guest_log!(
                    info,
                    device_type = self.device.device_type(),
                    features = self.driver_features,
                    "virtio-mmio: device activated"
                );
                self.active = true;
            }
            Err(err) => {
                guest_log!(warn, error = %err, "virtio-mmio: device activation failed");
                self.needs_reset();
            }
        }
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver (virtio 1.2 §2.1.2).
    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(err) = self.config_changed() {
            guest_log!(warn, error = %err, "virtio-mmio: cannot signal DEVICE_NEEDS_RESET");
        }
    }

    fn reset(&mut self) {
        guest_log!(
            debug,
            device_type = self.device.device_type(),
            "virtio-mmio: reset"
        );
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.active = false;
    }
}

impl<M, D> BusDevice for MmioTransport<M, D>
where
    M: GuestMemory + Clone + Send,
    D: VirtioDevice<M>,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            guest_log!(
                debug,
                offset,
                width = data.len(),
                "virtio-mmio: bad register read width"
            );
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(bytes)),
            _ => guest_log!(
                debug,
                offset,
                width = data.len(),
                "virtio-mmio: bad register write width"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{irq, mem, TestQueue, MEM_SIZE};
    use vm_memory::GuestMemoryMmap;

    /// A device that records what the transport did to it.
    #[derive(Debug, Default)]
    struct FakeDevice {
        sizes: Vec<u16>,
        activated: Option<Vec<(u16, u64)>>,
        processed: Vec<usize>,
        resets: usize,
        config: [u8; 8],
        fail_activate: bool,
    }

    impl VirtioDevice<GuestMemoryMmap> for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            feature(VIRTIO_F_VERSION_1) | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let (Ok(o), Some(&b)) = (usize::try_from(offset), data.first()) {
                if let Some(slot) = self.config.get_mut(o) {
                    *slot = b;
                }
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            acked: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<()> {
            if self.fail_activate {
                return Err(VirtioError::QueueCount {
                    expected: 9,
                    got: queues.len(),
                });
            }
            self.activated = Some(queues.iter().map(|q| (q.size(), acked)).collect());
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> Result<()> {
            self.processed.push(index);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    type T = MmioTransport<GuestMemoryMmap, FakeDevice>;

    fn transport(sizes: &[u16]) -> (T, Arc<crate::devices::virtio::test_utils::CountingIrq>) {
        let line = irq();
        let dev = FakeDevice {
            sizes: sizes.to_vec(),
            ..FakeDevice::default()
        };
        (
            MmioTransport::new(mem(), dev, line.clone()).expect("eventfds"),
            line,
        )
    }

    fn r(t: &mut T, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut T, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut T) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1); // VERSION_1 is bit 32.
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn program_queue(t: &mut T, index: u32, q: &TestQueue) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, u32::from(q.size));
        w(t, reg::QUEUE_DESC_LOW, q.desc as u32);
        w(t, reg::QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, q.avail as u32);
        w(t, reg::QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, q.used as u32);
        w(t, reg::QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(&[16]);
        assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::VENDOR_ID), 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_init_activates_with_valid_queues() {
        let (mut t, _) = transport(&[16, 8]);
        let m = mem();
        let q0 = TestQueue::new(&m, 0x1000, 16);
        let q1 = TestQueue::new(&m, 0x2000, 8);
        negotiate(&mut t);
        program_queue(&mut t, 0, &q0);
        program_queue(&mut t, 1, &q1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, ALL_OK);
        assert!(t.is_active());
        assert_eq!(r(&mut t, reg::STATUS), ALL_OK);
        let acked = feature(VIRTIO_F_VERSION_1) | 1;
        assert_eq!(t.device().activated, Some(vec![(16, acked), (8, acked)]));
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9); // out of range: ignored
        t.queue_events()[0].write(1).expect("eventfd");
        t.handle_queue_event(0);
        t.handle_queue_event(5); // out of range: ignored
        assert_eq!(t.device().processed, vec![1, 0]);
    }

    #[test]
    fn bad_queue_sizes_are_refused_and_block_activation() {
        let m = mem();
        for bad in [0u32, 3, 12, 32, 0x1_0010] {
            let (mut t, _) = transport(&[16]);
            let q = TestQueue::new(&m, 0x1000, 16);
            negotiate(&mut t);
            program_queue(&mut t, 0, &q);
            w(&mut t, reg::QUEUE_READY, 0);
            w(&mut t, reg::QUEUE_NUM, bad);
            w(&mut t, reg::QUEUE_READY, 1);
            assert_eq!(r(&mut t, reg::QUEUE_READY), 0, "size {bad}");
            w(&mut t, reg::STATUS, ALL_OK);
            assert!(!t.is_active(), "size {bad}");
            assert_eq!(t.device().activated, None);
            assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn rings_outside_memory_or_misaligned_are_refused() {
        let m = mem();
        let q = TestQueue::new(&m, 0x1000, 16);
        let cases: [(u64, u64, u64); 4] = [
            (MEM_SIZE - 16, q.avail, q.used), // table runs past the end
            (q.desc, q.avail, u64::MAX - 8),  // used ring wraps
            (q.desc + 8, q.avail, q.used),    // table not 16-byte aligned
            (q.desc, q.avail, q.used + 2),    // used ring not 4-byte aligned
        ];
        for (desc, avail, used) in cases {
            let (mut t, _) = transport(&[16]);
            negotiate(&mut t);
            let bad = TestQueue {
                desc,
                avail,
                used,
                ..q.clone()
            };
            program_queue(&mut t, 0, &bad);
            assert_eq!(
                r(&mut t, reg::QUEUE_READY),
                0,
                "{desc:#x} {avail:#x} {used:#x}"
            );
        }
    }

    #[test]
    fn an_available_ring_at_address_zero_is_refused() {
        // virtio-queue takes address 0 for "unset" and would fail every notification.
        let m = mem();
        let (mut t, _) = transport(&[16]);
        negotiate(&mut t);
        let q = TestQueue::new(&m, 0x1000, 16);
        program_queue(&mut t, 0, &TestQueue { avail: 0, ..q });
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn out_of_range_queue_sel_is_ignored() {
        let (mut t, _) = transport(&[16]);
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_NUM, 4);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        w(&mut t, reg::QUEUE_SEL, u32::MAX);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        assert_eq!(t.queues[0].size, 16);
    }

    #[test]
    fn wrong_widths_and_offsets_never_panic() {
        let (mut t, _) = transport(&[16]);
        for off in (0..0x1000u64).step_by(1) {
            for width in [1usize, 2, 3, 4, 8] {
                let mut buf = vec![0xaau8; width];
                t.read(off, &mut buf);
                if off < reg::CONFIG && (width != 4 || off % 4 != 0) {
                    assert!(buf.iter().all(|&b| b == 0), "{off:#x}/{width}");
                }
                if off != reg::STATUS && off != reg::QUEUE_NOTIFY {
                    t.write(off, &buf);
                }
            }
        }
        // Narrow writes to Status are ignored, not taken as partial values.
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        // Config space is readable at any width.
        t.write(reg::CONFIG + 2, &[7]);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [7, 0]);
    }

    #[test]
    fn status_state_machine_rejects_skips_and_unoffered_features() {
        let (mut t, _) = transport(&[16]);
        w(&mut t, reg::STATUS, status::DRIVER); // DRIVER without ACKNOWLEDGE
        assert_eq!(r(&mut t, reg::STATUS), 0);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Accept a feature the device never offered (bit 5): FEATURES_OK refused.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // Without VERSION_1: refused too.
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 0);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Clearing a bit without a reset is ignored.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // FAILED is accepted at any time and blocks further progress.
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn reset_on_zero_clears_everything_and_resets_the_device() {
        let (mut t, line) = transport(&[16]);
        let m = mem();
        let q = TestQueue::new(&m, 0x1000, 16);
        negotiate(&mut t);
        program_queue(&mut t, 0, &q);
        w(&mut t, reg::STATUS, ALL_OK);
        assert!(t.is_active());
        t.interrupt().signal_used_queue().expect("irq");
        assert_eq!(line.count(), 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(t.device().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // Notifications after reset do not reach the device.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(t.device().processed.is_empty());
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, line) = transport(&[16]);
        t.interrupt().signal_used_queue().expect("irq");
        t.config_changed().expect("irq");
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 3);
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(line.count(), 2);
    }

    #[test]
    fn failed_activation_sets_device_needs_reset() {
        let line = irq();
        let dev = FakeDevice {
            sizes: vec![16],
            fail_activate: true,
            ..FakeDevice::default()
        };
        let mut t = MmioTransport::new(mem(), dev, line.clone()).expect("eventfds");
        let m = mem();
        negotiate(&mut t);
        program_queue(&mut t, 0, &TestQueue::new(&m, 0x1000, 16));
        w(&mut t, reg::STATUS, ALL_OK);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(line.count(), 1);
    }

    #[test]
    fn queue_registers_are_frozen_once_ready_or_driver_ok() {
        let (mut t, _) = transport(&[16]);
        let m = mem();
        let q = TestQueue::new(&m, 0x1000, 16);
        // Before FEATURES_OK queue writes are dropped.
        w(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size, 16);
        negotiate(&mut t);
        program_queue(&mut t, 0, &q);
        w(&mut t, reg::QUEUE_NUM, 4);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x8000);
        assert_eq!(t.queues[0].size, 16);
        assert_eq!(t.queues[0].desc, q.desc);
    }

    #[test]
    fn a_guest_looping_on_bad_queue_config_cannot_flood_the_log() {
        use crate::logging::{capture, GUEST_LOG_BURST};
        let (mut t, _) = transport(&[16]);
        let m = mem();
        let q = TestQueue::new(&m, 0x1000, 16);
        negotiate(&mut t);
        const ROUNDS: usize = 5000;
        let lines = capture::log_lines(|| {
            for _ in 0..ROUNDS {
                // A bad size, refused at QueueReady (warn); a bad width and an unknown register
                // (debug); a status write that clears bits (debug).
                program_queue(
                    &mut t,
                    0,
                    &TestQueue {
                        size: 3,
                        ..q.clone()
                    },
                );
                t.write(reg::QUEUE_NUM, &[1, 2]);
                w(&mut t, 0x0f0, 1);
                w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
            }
        });
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        let refused = lines
            .iter()
            .filter(|l| l.contains("invalid virtqueue configuration refused"))
            .count();
        let total = lines.iter().filter(|l| l.contains("virtio-mmio")).count();
        // Other tests share the per-call-site limiters, and a slow run may straddle two windows:
        // at most two windows' worth (plus a "suppressed" line each) per call site, against
        // ROUNDS lines per site without the limiter.
        let per_site = 2 * (GUEST_LOG_BURST as usize + 1);
        assert!(refused <= per_site, "{refused} refusal lines");
        assert!(total <= 4 * per_site, "{total} lines: {lines:?}");
    }

    /// One guest access: (offset, width, value, is_write).
    fn arb_access() -> impl proptest::strategy::Strategy<Value = (u64, usize, u32, bool)> {
        use proptest::prelude::*;
        let offset = prop_oneof![
            4 => proptest::sample::select(vec![
                reg::DEVICE_FEATURES_SEL, reg::DRIVER_FEATURES, reg::DRIVER_FEATURES_SEL,
                reg::QUEUE_SEL, reg::QUEUE_NUM, reg::QUEUE_READY, reg::QUEUE_NOTIFY,
                reg::INTERRUPT_ACK, reg::STATUS, reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH,
                reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, reg::QUEUE_DEVICE_LOW,
                reg::QUEUE_DEVICE_HIGH,
            ]),
            1 => 0u64..0x1000,
        ];
        let width = prop_oneof![8 => Just(4usize), 1 => Just(1), 1 => Just(2), 1 => Just(8)];
        let value = prop_oneof![
            0u32..16,
            Just(0x1000u32),
            Just(0x1100),
            Just(0x1200),
            Just(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            Just(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
            any::<u32>(),
        ];
        (offset, width, value, any::<bool>())
    }

    /// The register writes of a correct driver initialisation with queues 0 (16 entries at
    /// 0x1000) and 1 (8 entries at 0x2000).
    fn init_script() -> Vec<(u64, u32)> {
        let m = mem();
        let mut script = vec![
            (reg::STATUS, status::ACKNOWLEDGE),
            (reg::STATUS, status::ACKNOWLEDGE | status::DRIVER),
            (reg::DRIVER_FEATURES_SEL, 1),
            (reg::DRIVER_FEATURES, 1),
            (reg::DRIVER_FEATURES_SEL, 0),
            (reg::DRIVER_FEATURES, 1),
            (
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            ),
        ];
        for (i, base, size) in [(0u32, 0x1000u64, 16u16), (1, 0x2000, 8)] {
            let q = TestQueue::new(&m, base, size);
            script.extend([
                (reg::QUEUE_SEL, i),
                (reg::QUEUE_NUM, u32::from(size)),
                (reg::QUEUE_DESC_LOW, q.desc as u32),
                (reg::QUEUE_DESC_HIGH, 0),
                (reg::QUEUE_DRIVER_LOW, q.avail as u32),
                (reg::QUEUE_DRIVER_HIGH, 0),
                (reg::QUEUE_DEVICE_LOW, q.used as u32),
                (reg::QUEUE_DEVICE_HIGH, 0),
                (reg::QUEUE_READY, 1),
            ]);
        }
        script.push((reg::STATUS, ALL_OK));
        script
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// A driver initialisation with random steps replaced by arbitrary accesses, then
        /// arbitrary traffic: nothing panics, a ready queue is always valid, and the device is
        /// only activated with valid queue sizes and offered features.
        #[test]
        fn arbitrary_register_traffic_never_panics_or_activates_bad_queues(
            mutations in proptest::collection::vec(
                proptest::prop_oneof![
                    24 => proptest::strategy::Just(None),
                    1 => proptest::strategy::Strategy::prop_map(arb_access(), Some),
                ],
                26,
            ),
            tail in proptest::collection::vec(arb_access(), 0..100),
        ) {
            let (mut t, _) = transport(&[16, 8]);
            let script = init_script();
            let steps = script.iter().zip(&mutations).map(|(&(off, v), m)| match m {
                Some(access) => *access,
                None => (off, 4, v, true),
            });
            for (offset, width, value, is_write) in steps.chain(tail) {
                let bytes = u64::from(value).to_le_bytes();
                if is_write {
                    t.write(offset, &bytes[..width]);
                } else {
                    let mut buf = vec![0u8; width];
                    t.read(offset, &mut buf);
                }
                // A ready queue always has a valid size and rings inside guest memory.
                for q in &t.queues {
                    if q.ready {
                        proptest::prop_assert!(q.to_queue(&t.mem).is_some());
                    }
                }
                if let Some(active) = &t.device().activated {
                    for (i, &(size, acked)) in active.iter().enumerate() {
                        proptest::prop_assert!(size.is_power_of_two());
                        proptest::prop_assert!(size <= t.device().sizes[i]);
                        proptest::prop_assert_eq!(acked & !t.device().avail_features(), 0);
                    }
                }
            }
        }
    }
}
