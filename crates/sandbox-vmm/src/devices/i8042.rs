//! The part of the i8042 keyboard controller a VM needs: the CPU reset line.
//!
//! Linux with `reboot=k` waits for the controller's input buffer to be empty (status bit 1 clear
//! on port 0x64) and then writes the "pulse reset line" command 0xfe to port 0x64. We answer every
//! status read with "empty" and turn 0xfe into [`PowerEvent::Reset`]. There is no keyboard: data
//! reads return 0, and the FADT tells the guest there is no 8042, so its driver does not probe.

use std::sync::Arc;

use super::power::{PowerEvent, PowerEventSink};
use super::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0 low": resets the CPU.
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 at ports 0x60..=0x64 (the bus range is [`I8042::PORTS`] ports from 0x60).
pub struct I8042 {
    sink: Arc<dyn PowerEventSink>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Number of ports the device spans (0x60..=0x64).
    pub const PORTS: u64 = 5;

    /// The controller, reporting resets to `sink`.
    pub fn new(sink: Arc<dyn PowerEventSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Data port: no scancodes. Status port: output and input buffers empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.sink.power_event(PowerEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::power::test_utils::RecordingSink;
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_resets() {
        let sink = Arc::new(RecordingSink::default());
        let mut dev = I8042::new(sink.clone());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer must read empty");
        dev.write(0, &[CMD_RESET_CPU]); // data port: not a command
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert!(sink.events().is_empty());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(sink.events(), vec![PowerEvent::Reset]);
    }
}
