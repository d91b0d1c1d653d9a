//! The running side of a VM: start, pause, resume, stop, and wait for the exit reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::memory::GuestRam;

use super::exit::{ExitReason, ExitState};
use crate::bus::{lock, Bus};
use crate::devices::serial::SerialDevice;
use crate::event_loop::EventLoopHandle;
use crate::vcpu::{VcpuCommand, VcpuHandle, VcpuState};

/// How long a vCPU may take to acknowledge pause/resume (it is kicked out of `KVM_RUN`, so this
/// only bounds a wedged host).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Lifecycle of a VM behind its handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built or paused: no guest code runs.
    Paused,
    /// vCPUs are running.
    Running,
    /// Ended; [`VmHandle::exit_reason`] says why.
    Finished,
}

/// Errors from controlling a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    /// The call is not valid in the current state.
    #[error("cannot {op} a VM that is {state:?}")]
    InvalidState {
        /// The attempted operation.
        op: &'static str,
        /// The state it was in.
        state: VmState,
    },
    /// A vCPU did not acknowledge a command in time.
    #[error("vCPU {0} did not acknowledge the command")]
    NoAck(u8),
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, HandleError>;

/// A built VM. Dropping it stops the VM and releases everything.
///
/// Field order matters for drop: threads are stopped first, then the VM fd is closed, then guest
/// RAM is unmapped.
pub struct VmHandle {
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoopHandle,
    exit: Arc<ExitState>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    state: VmState,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    _vm: VmFd,
    _memory: GuestMemoryMmap,
    /// Owns the guest RAM mappings: dropped last, after `shutdown` joined every thread that
    /// touches guest memory (or leaked if the event loop could not be joined).
    ram: GuestRam,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vcpus", &self.vcpus.len())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        vcpus: Vec<VcpuHandle>,
        event_loop: EventLoopHandle,
        exit: Arc<ExitState>,
        serial: Option<Arc<Mutex<SerialDevice>>>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        vm: VmFd,
        memory: GuestMemoryMmap,
        ram: GuestRam,
    ) -> Self {
        Self {
            vcpus,
            event_loop,
            exit,
            serial,
            state: VmState::Paused,
            pio,
            mmio,
            _vm: vm,
            _memory: memory,
            ram,
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        if self.state != VmState::Finished && self.exit.is_set() {
            return VmState::Finished;
        }
        self.state
    }

    /// The exit reason, once the VM ended.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.get()
    }

    /// Unhandled PIO and MMIO accesses so far (diagnostics).
    pub fn unhandled_accesses(&self) -> (u64, u64) {
        (self.pio.unhandled_count(), self.mmio.unhandled_count())
    }

    /// Boots the VM (first call) or resumes it after [`Self::pause`].
    ///
    /// # Errors
    /// [`HandleError::InvalidState`] unless paused.
    pub fn start(&mut self) -> Result<()> {
        self.check("start", VmState::Paused)?;
        for v in &self.vcpus {
            v.send(VcpuCommand::Resume);
        }
        self.state = VmState::Running;
        tracing::info!("VM running");
        Ok(())
    }

    /// Stops all vCPUs from running guest code, and waits until they have.
    ///
    /// # Errors
    /// [`HandleError::InvalidState`] unless running; [`HandleError::NoAck`].
    pub fn pause(&mut self) -> Result<()> {
        self.check("pause", VmState::Running)?;
        for v in &self.vcpus {
            v.send(VcpuCommand::Pause);
        }
        for v in &self.vcpus {
            match v.wait_for(VcpuState::Paused, ACK_TIMEOUT) {
                Some(VcpuState::Paused) => {}
                Some(_) => {} // finished meanwhile: the VM ended
                None => return Err(HandleError::NoAck(v.index())),
            }
        }
        self.state = if self.exit.is_set() {
            VmState::Finished
        } else {
            VmState::Paused
        };
        tracing::info!("VM paused");
        Ok(())
    }

    /// Ends the VM (if it has not ended already) and returns the exit reason:
    /// [`ExitReason::Stopped`] unless the guest ended it first.
    pub fn stop(&mut self) -> ExitReason {
        self.exit.record(ExitReason::Stopped);
        self.shutdown()
    }

    /// Waits until the VM ends, then releases its threads and returns why it ended.
    pub fn wait(&mut self) -> ExitReason {
        self.exit.wait(None);
        self.shutdown()
    }

    /// Like [`Self::wait`], but gives up after `timeout` (the VM keeps running).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReason> {
        self.exit.wait(Some(timeout))?;
        Some(self.shutdown())
    }

    fn check(&self, op: &'static str, wanted: VmState) -> Result<()> {
        let state = self.state();
        if state == wanted {
            Ok(())
        } else {
            Err(HandleError::InvalidState { op, state })
        }
    }

    /// Stops and joins every thread; idempotent.
    fn shutdown(&mut self) -> ExitReason {
        for v in &mut self.vcpus {
            v.stop_and_join();
        }
        if !self.event_loop.stop() {
            // Its thread may still read or write guest memory: keep the mappings.
            self.ram.leak_on_drop();
        }
        if let Some(serial) = &self.serial {
            lock(serial).flush();
        }
        self.state = VmState::Finished;
        let reason = self.exit.get().unwrap_or(ExitReason::Stopped);
        tracing::info!(%reason, "VM finished");
        reason
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.state != VmState::Finished {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<VmHandle>();
    }
}
