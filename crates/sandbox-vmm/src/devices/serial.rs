//! The 16550A UART console on COM1 (0x3f8, IRQ 4), via `vm-superio`.
//!
//! Guest output goes through a [`LineBuffer`] to a bounded [`LineSink`]; the interrupt goes
//! through an [`IrqTrigger`] (an irqfd for GSI 4 in the VMM).

use std::io;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use super::console::{LineBuffer, LineSink};
use super::{BusDevice, IrqTrigger};
use crate::logging::guest_log;

/// Adapts our [`IrqTrigger`] to `vm-superio`'s `Trigger`.
pub struct IrqAdapter(pub Arc<dyn IrqTrigger>);

impl std::fmt::Debug for IrqAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqAdapter")
    }
}

impl Trigger for IrqAdapter {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The console output chain: line buffering in front of a boxed sink.
pub type ConsoleOut = LineBuffer<Box<dyn LineSink>>;

/// COM1: eight byte-wide registers ([`SerialDevice::PORTS`]).
pub struct SerialDevice {
    serial: Serial<IrqAdapter, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Number of ports the UART spans.
    pub const PORTS: u64 = 8;

    /// A UART writing lines to `sink` and raising `irq`.
    pub fn new(irq: Arc<dyn IrqTrigger>, sink: Box<dyn LineSink>) -> Self {
        Self {
            serial: Serial::new(IrqAdapter(irq), LineBuffer::new(sink)),
        }
    }

    /// Hands a pending partial line to the sink (at VM exit).
    pub fn flush(&mut self) {
        self.serial.writer_mut().flush_partial();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (u8::try_from(offset), data.first_mut()) {
            (Ok(off), Some(b)) if u64::from(off) < Self::PORTS => *b = self.serial.read(off),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if u64::from(off) >= Self::PORTS {
            return;
        }
        if let Err(err) = self.serial.write(off, value) {
            guest_log!(debug, ?err, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::super::console::ConsoleRing;
    use super::*;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl IrqTrigger for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_arrive_as_lines() {
        let ring = ConsoleRing::new(1 << 10);
        let irq = Arc::new(CountingIrq::default());
        let mut dev = SerialDevice::new(irq.clone(), Box::new(ring.clone()));
        // Enable the THR-empty interrupt (IER bit 1) so writes raise IRQ 4.
        dev.write(1, &[0x02]);
        for b in b"sandbox-init: ready\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(ring.lines(), vec!["sandbox-init: ready\n".to_string()]);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        assert!(ring
            .wait_for_line("ready", Duration::from_millis(1))
            .is_some());
    }

    #[test]
    fn console_flood_is_bounded() {
        let ring = ConsoleRing::new(1 << 12);
        let mut dev = SerialDevice::new(Arc::new(CountingIrq::default()), Box::new(ring.clone()));
        for _ in 0..200_000 {
            dev.write(0, b"y");
            dev.write(0, b"\n");
        }
        let held: usize = ring.lines().iter().map(String::len).sum();
        assert!(held <= 1 << 12, "ring holds {held} bytes");
    }

    #[test]
    fn out_of_range_and_empty_accesses_are_ignored() {
        let ring = ConsoleRing::new(1 << 10);
        let mut dev = SerialDevice::new(Arc::new(CountingIrq::default()), Box::new(ring.clone()));
        dev.write(8, b"x");
        dev.write(u64::MAX, b"x");
        dev.write(0, &[]);
        let mut data = [0xffu8; 2];
        dev.read(1000, &mut data);
        assert_eq!(data, [0, 0]);
        dev.flush();
        assert!(ring.lines().is_empty());
        // LSR (offset 5): transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
