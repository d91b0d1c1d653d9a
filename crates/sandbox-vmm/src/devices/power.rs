//! Guest power events (poweroff, reset) and the ACPI fixed-hardware registers that raise them.
//!
//! The FADT we build declares hardware-reduced ACPI (ACPI 6.5 §4.1) with a sleep control, a sleep
//! status and a reset register in PIO space ([`crate::layout::ACPI_SLEEP_CONTROL_PORT`] ..).
//! Linux powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep control register (ACPI 6.5
//! §4.8.3.7), with `SLP_TYP` taken from the DSDT's `\_S5_` package ([`S5_SLEEP_TYPE`]), and
//! resets through the FADT reset register when it reboots with `reboot=acpi`.

use std::sync::Arc;

use super::BusDevice;
use crate::layout::ACPI_RESET_VALUE;

/// A guest request that ends the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    Reset,
}

/// Receives power events from devices. The VMM's implementation stops the vCPUs; tests record.
pub trait PowerEventSink: Send + Sync {
    /// The guest asked for `event`.
    fn power_event(&self, event: PowerEvent);
}

/// The `SLP_TYP` value in `\_S5_` (any value works as long as the DSDT and this device agree).
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN`: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// The ACPI sleep control (offset 0), sleep status (offset 1) and reset (offset 2) registers,
/// one byte each.
pub struct AcpiPower {
    sink: Arc<dyn PowerEventSink>,
}

impl std::fmt::Debug for AcpiPower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPower").finish_non_exhaustive()
    }
}

impl AcpiPower {
    /// Number of ports the device spans.
    pub const PORTS: u64 = 3;

    /// The registers, reporting to `sink`.
    pub fn new(sink: Arc<dyn PowerEventSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set (the guest never wakes from S5); the others are
        // write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.sink.power_event(PowerEvent::Poweroff);
            }
            2 if value == ACPI_RESET_VALUE => self.sink.power_event(PowerEvent::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::Mutex;

    use super::*;

    /// Records power events.
    #[derive(Default)]
    pub(crate) struct RecordingSink(pub(crate) Mutex<Vec<PowerEvent>>);

    impl PowerEventSink for RecordingSink {
        fn power_event(&self, event: PowerEvent) {
            self.0.lock().expect("lock").push(event);
        }
    }

    impl RecordingSink {
        pub(crate) fn events(&self) -> Vec<PowerEvent> {
            self.0.lock().expect("lock").clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::RecordingSink;
    use super::*;

    #[test]
    fn s5_sleep_powers_off_and_other_values_do_not() {
        let sink = Arc::new(RecordingSink::default());
        let mut dev = AcpiPower::new(sink.clone());
        dev.write(0, &[S5_SLEEP_TYPE << 2]); // SLP_EN clear
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3
        dev.write(1, &[0x80]); // clearing WAK_STS
        assert!(sink.events().is_empty());
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(sink.events(), vec![PowerEvent::Poweroff]);
    }

    #[test]
    fn reset_register_resets() {
        let sink = Arc::new(RecordingSink::default());
        let mut dev = AcpiPower::new(sink.clone());
        dev.write(2, &[0]);
        dev.write(2, &[]);
        dev.write(7, &[ACPI_RESET_VALUE]);
        assert!(sink.events().is_empty());
        dev.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(sink.events(), vec![PowerEvent::Reset]);
        let mut status = [0xffu8; 1];
        dev.read(1, &mut status);
        assert_eq!(status, [0]);
    }
}
