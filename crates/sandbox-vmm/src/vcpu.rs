//! One thread per vCPU: it owns the `VcpuFd` and runs a Running/Paused/Finished state machine
//! driven by [`VcpuCommand`]s on a channel (Firecracker's `vstate/vcpu.rs` pattern).
//!
//! The host kicks a running vCPU out of `KVM_RUN` with a signal ([`crate::sys`]) after sending a
//! command. Exits are dispatched to the PIO/MMIO [`Bus`]es; the loop knows no port numbers.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Bus;
use crate::sys;
use crate::vmm::exit::{ExitReason, ExitState, InternalErrorInfo};

/// What the host asks a vCPU thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Run (from Paused).
    Resume,
    /// Stop running guest code until resumed.
    Pause,
    /// Leave the loop; the thread ends.
    Stop,
}

/// A vCPU thread's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Not running guest code; waiting for a command.
    Paused,
    /// In the `KVM_RUN` loop.
    Running,
    /// The thread is done (stopped, or the VM ended).
    Finished,
}

/// How long a paused vCPU blocks on its channel before re-checking the VM's exit state.
const PAUSED_POLL: Duration = Duration::from_millis(100);
/// Code bytes read at RIP for an internal-error report.
const CODE_BYTES: usize = 16;

/// Everything a vCPU thread owns.
pub struct Vcpu {
    index: u8,
    // Field order matters: `fd` must drop before `memory` (KVM uses the mapping until the last
    // vCPU and VM fds are closed).
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitState>,
    memory: GuestMemoryMmap,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// The host side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuCommand>,
    states: Receiver<VcpuState>,
    thread: Option<JoinHandle<()>>,
}

/// What one exit asks the loop to do.
enum Action {
    Continue,
    Exit(ExitReason),
}

impl Vcpu {
    /// A configured vCPU (registers, CPUID, MSRs already set).
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitState>,
        memory: GuestMemoryMmap,
    ) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            exit,
            memory,
        }
    }

    /// Starts the thread in [`VcpuState::Paused`].
    ///
    /// # Errors
    /// Thread creation or kick-handler installation failures.
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        sys::install_kick_handler()?;
        let index = self.index;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (state_tx, state_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(cmd_rx, state_tx))?;
        Ok(VcpuHandle {
            index,
            commands: cmd_tx,
            states: state_rx,
            thread: Some(thread),
        })
    }

    fn run(mut self, commands: Receiver<VcpuCommand>, states: Sender<VcpuState>) {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: the pointer targets this vCPU's kvm_run mapping, owned by `self.fd`, which lives
        // until the end of this function; the target is cleared before returning.
        unsafe { sys::set_immediate_exit_target(immediate_exit) };
        let mut state = VcpuState::Paused;
        let _ = states.send(state);
        while state != VcpuState::Finished {
            let before = state;
            state = match state {
                VcpuState::Paused => match commands.recv_timeout(PAUSED_POLL) {
                    Ok(VcpuCommand::Resume) => VcpuState::Running,
                    Ok(VcpuCommand::Pause) => VcpuState::Paused,
                    Ok(VcpuCommand::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        VcpuState::Finished
                    }
                    Err(RecvTimeoutError::Timeout) => VcpuState::Paused,
                },
                VcpuState::Running => match commands.try_recv() {
                    Ok(VcpuCommand::Pause) => VcpuState::Paused,
                    Ok(VcpuCommand::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        VcpuState::Finished
                    }
                    Ok(VcpuCommand::Resume) | Err(mpsc::TryRecvError::Empty) => {
                        if self.exit.is_set() {
                            VcpuState::Finished
                        } else {
                            match self.run_once() {
                                Action::Continue => VcpuState::Running,
                                Action::Exit(reason) => {
                                    self.exit.record(reason);
                                    VcpuState::Finished
                                }
                            }
                        }
                    }
                },
                VcpuState::Finished => VcpuState::Finished,
            };
            // Report changes only: a paused vCPU wakes every PAUSED_POLL, and the channel must
            // not grow while it waits.
            if state != before && state != VcpuState::Running {
                let _ = states.send(state);
            }
        }
        sys::clear_immediate_exit_target();
        tracing::debug!(vcpu = self.index, "vCPU thread finished");
    }

    /// One `KVM_RUN` and its exit.
    fn run_once(&mut self) -> Action {
        let mut internal = None;
        let action = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(u64::from(port), data);
                Action::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                Action::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                Action::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                Action::Continue
            }
            Ok(VcpuExit::Shutdown) => Action::Exit(ExitReason::TripleFault { vcpu: self.index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Action::Exit(ExitReason::Poweroff),
                KVM_SYSTEM_EVENT_RESET => Action::Exit(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    internal = Some("guest crash (KVM_SYSTEM_EVENT_CRASH)".to_string());
                    Action::Continue
                }
                other => {
                    internal = Some(format!("unknown KVM system event {other}"));
                    Action::Continue
                }
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                internal = Some(format!("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"));
                Action::Continue
            }
            Ok(VcpuExit::InternalError) => {
                internal = Some(String::new()); // filled in below from kvm_run
                Action::Continue
            }
            Ok(VcpuExit::Hlt) => {
                internal = Some(
                    "the vCPU halted with interrupts it can never receive (KVM_EXIT_HLT)".into(),
                );
                Action::Continue
            }
            Ok(VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Action::Continue,
            Ok(other) => {
                internal = Some(format!("unexpected exit {other:?}"));
                Action::Continue
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear immediate_exit so the next KVM_RUN enters the guest; the loop
                // looks at its commands first.
                self.fd.set_kvm_immediate_exit(0);
                Action::Continue
            }
            Err(e) => {
                internal = Some(format!("KVM_RUN failed: {e}"));
                Action::Continue
            }
        };
        match internal {
            None => {
                // A device (i8042, ACPI) may have ended the VM during this exit.
                if self.exit.is_set() {
                    Action::Exit(ExitReason::Stopped)
                } else {
                    action
                }
            }
            Some(description) => Action::Exit(ExitReason::InternalError(Box::new(
                self.internal_error(description),
            ))),
        }
    }

    /// Collects RIP and the code bytes at RIP for an internal-error report.
    fn internal_error(&mut self, mut description: String) -> InternalErrorInfo {
        if description.is_empty() {
            // SAFETY: KVM_EXIT_INTERNAL_ERROR means the `internal` member of the exit union is
            // the one KVM filled in.
            let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            description = format!(
                "KVM_EXIT_INTERNAL_ERROR suberror {} ({}), data {:x?}",
                internal.suberror,
                match internal.suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event",
                    _ => "other",
                },
                &internal.data[..n]
            );
        }
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let rip = regs.map(|r| r.rip);
        let linear = rip
            .zip(sregs)
            .and_then(|(rip, s)| rip.checked_add(s.cs.base));
        let code = linear
            .and_then(|gva| self.fd.translate_gva(gva).ok())
            .filter(|t| t.valid != 0)
            .map(|t| self.read_code(t.physical_address))
            .unwrap_or_default();
        InternalErrorInfo {
            vcpu: self.index,
            description,
            rip,
            code,
        }
    }

    /// Reads up to [`CODE_BYTES`] bytes at `gpa`, stopping at the end of guest RAM.
    fn read_code(&self, gpa: u64) -> Vec<u8> {
        let mut code = Vec::with_capacity(CODE_BYTES);
        for i in 0..CODE_BYTES as u64 {
            let Some(addr) = gpa.checked_add(i) else {
                break;
            };
            match self.memory.read_obj::<u8>(GuestAddress(addr)) {
                Ok(b) => code.push(b),
                Err(_) => break,
            }
        }
        code
    }
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends `cmd` and kicks the thread out of `KVM_RUN`. A finished thread ignores it.
    pub fn send(&self, cmd: VcpuCommand) {
        if self.commands.send(cmd).is_err() {
            return; // the thread is gone
        }
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                if let Err(err) = sys::kick_thread(t.as_pthread_t()) {
                    tracing::debug!(vcpu = self.index, %err, "kick failed");
                }
            }
        }
    }

    /// Waits up to `timeout` for the thread to report `wanted` (or Finished); returns the last
    /// state seen.
    pub fn wait_for(&self, wanted: VcpuState, timeout: Duration) -> Option<VcpuState> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            match self.states.recv_timeout(left) {
                Ok(s) if s == wanted || s == VcpuState::Finished => return Some(s),
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => return Some(VcpuState::Finished),
                Err(RecvTimeoutError::Timeout) => return None,
            }
        }
    }

    /// Stops the thread and joins it.
    pub fn stop_and_join(&mut self) {
        self.send(VcpuCommand::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!(vcpu = self.index, "vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
