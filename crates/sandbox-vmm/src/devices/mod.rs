//! Emulated devices. Device logic never depends on KVM: devices see a [`BusDevice`] access, an
//! [`IrqTrigger`] and guest memory through `vm_memory::GuestMemory`, so they are unit-tested on any
//! machine (the rust-vmm `vm-superio` `Trigger` pattern).

pub mod console;
pub mod i8042;
pub mod power;
pub mod rtc;
pub mod serial;
pub mod virtio;

use std::io;

/// A device mapped on a PIO or MMIO bus.
///
/// `offset` is relative to the start of the device's range; the bus has already checked that
/// `offset + data.len()` lies inside that range. `data.len()` is the access width (1, 2, 4 or 8
/// bytes for a vCPU access). A device must never panic on any offset or width: unknown registers
/// read as zero (or all-ones where the hardware does that) and writes to them are ignored.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises a device's interrupt line (edge-triggered). In the VMM this writes an irqfd registered
/// with KVM for the device's GSI; in tests it counts.
pub trait IrqTrigger: Send + Sync {
    /// Signals the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

impl IrqTrigger for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}
