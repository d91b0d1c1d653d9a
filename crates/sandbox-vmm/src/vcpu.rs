//! One thread per vCPU: it owns the `VcpuFd` and runs a Running/Paused/Finished state machine
//! driven by [`VcpuCommand`]s on a channel (Firecracker's `vstate/vcpu.rs` pattern).
//!
//! The host kicks a running vCPU out of `KVM_RUN` with a signal ([`crate::sys`]) after sending a
//! command. Exits are dispatched to the PIO/MMIO [`Bus`]es; the loop knows no port numbers.

use crate::seccomp::{SeccompMode, ThreadKind};
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
    seccomp: SeccompMode,
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

/// Most bytes one `KVM_EXIT_IO` carries: KVM puts the data in one page of the `kvm_run` mapping
/// (`KVM_PIO_PAGE_OFFSET`), so `count * size` never exceeds it.
pub const PIO_DATA_MAX: usize = 4096;

/// The shape of one `KVM_EXIT_IO`: `count` items of `size` bytes each, in guest order (a string
/// instruction such as `rep outsb` or `rep insw` moves several items in one exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PioAccess {
    size: usize,
    count: usize,
}

impl PioAccess {
    /// Checks the exit's `size` (1, 2 or 4 bytes) and `count` (at least 1) against the length
    /// of the data area KVM handed over (`count * size` bytes, at most [`PIO_DATA_MAX`]).
    /// `None` if they disagree: that is a KVM or kvm-ioctls bug, not something a guest can cause.
    pub fn new(size: u8, count: u32, data_len: usize) -> Option<Self> {
        let size = usize::from(size);
        let count = usize::try_from(count).ok()?;
        let total = size.checked_mul(count)?;
        (matches!(size, 1 | 2 | 4) && count >= 1 && total == data_len && total <= PIO_DATA_MAX)
            .then_some(Self { size, count })
    }

    /// Bytes per item.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of items.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Delivers an OUT exit to `bus`: each of the `count` items of `data`, in order, as one write
/// of `size` bytes to `port` (so `rep outsb` of "hello\n" reaches the device as six bytes).
/// `data.len()` must be `count * size` ([`PioAccess::new`] checked it); a shorter tail is ignored.
pub fn dispatch_pio_out(bus: &Bus, port: u16, access: PioAccess, data: &[u8]) {
    for item in data.chunks_exact(access.size).take(access.count) {
        bus.write(u64::from(port), item);
    }
}

/// Serves an IN exit from `bus`: fills each of the `count` items of `data`, in order, with one
/// read of `size` bytes from `port`.
pub fn dispatch_pio_in(bus: &Bus, port: u16, access: PioAccess, data: &mut [u8]) {
    for item in data.chunks_exact_mut(access.size).take(access.count) {
        bus.read(u64::from(port), item);
    }
}

/// Direction of a port I/O exit, with the start of its data area.
#[derive(Clone, Copy, Debug)]
enum PioData {
    /// The device fills the area (the guest reads).
    In(*mut u8),
    /// The guest wrote the area.
    Out(*const u8),
}

/// A port I/O exit whose data area is still to be served: the data slice kvm-ioctls returned,
/// kept as a raw pointer so that `kvm_run.io` (the item size and count, which `VcpuExit` does
/// not carry) can be read through the vCPU fd before the data is touched.
struct PendingPio {
    port: u16,
    data: PioData,
    len: usize,
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
            seccomp: SeccompMode::Off,
        }
    }

    /// Installs the vCPU seccomp filter (docs/jail.md) on the thread before it first runs.
    #[must_use]
    pub fn with_seccomp(mut self, mode: SeccompMode) -> Self {
        self.seccomp = mode;
        self
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
        // Before anything the guest controls runs here; a vCPU that cannot be filtered never
        // reports Paused, so the build fails.
        if let Err(err) = crate::seccomp::apply(ThreadKind::Vcpu, self.seccomp) {
            tracing::error!(vcpu = self.index, error = %err, "vCPU thread not started");
            let _ = states.send(VcpuState::Finished);
            return;
        }
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
        let mut pio = None;
        let action = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio = Some(PendingPio {
                    port,
                    data: PioData::In(data.as_mut_ptr()),
                    len: data.len(),
                });
                Action::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio = Some(PendingPio {
                    port,
                    data: PioData::Out(data.as_ptr()),
                    len: data.len(),
                });
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
        if let Some(pending) = pio {
            internal = self.complete_pio(pending);
        }
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

    /// Serves a port I/O exit item by item. Returns an internal-error description if KVM's
    /// `kvm_run.io` does not match the data area it handed over.
    fn complete_pio(&mut self, pending: PendingPio) -> Option<String> {
        // SAFETY: `complete_pio` is only called right after `run()` returned KVM_EXIT_IO, so `io`
        // is the member of the exit union that KVM filled in. The `&mut kvm_run` ends with this
        // statement (`io` is a plain copy).
        let io = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io };
        let Some(access) = PioAccess::new(io.size, io.count, pending.len) else {
            return Some(format!(
                "KVM_EXIT_IO with size {} and count {} does not match its {}-byte data area",
                io.size, io.count, pending.len
            ));
        };
        // The pointer and length are the data area kvm-ioctls sliced out of this vCPU's
        // `kvm_run` mapping for the exit just taken (at `io.data_offset`, inside the mapping).
        // The mapping is owned by `self.fd` and stays mapped while `self` lives; the slice from
        // `run()` is no longer used and no other reference to these bytes exists (the `kvm_run`
        // reference above has ended, and only this thread runs this vCPU). The length is at
        // most PIO_DATA_MAX bytes, checked by `PioAccess::new`.
        match pending.data {
            PioData::Out(ptr) => {
                // SAFETY: see above; the bytes are only read.
                let data = unsafe { std::slice::from_raw_parts(ptr, pending.len) };
                dispatch_pio_out(&self.pio, pending.port, access, data);
            }
            PioData::In(ptr) => {
                // SAFETY: see above; KVM reads the bytes back at the next KVM_RUN.
                let data = unsafe { std::slice::from_raw_parts_mut(ptr, pending.len) };
                dispatch_pio_in(&self.pio, pending.port, access, data);
            }
        }
        None
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::BusRange;
    use crate::devices::BusDevice;

    /// Records every access as (offset, bytes); reads return a running counter per byte.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<(u64, usize)>,
        next: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for b in data {
                self.next = self.next.wrapping_add(1);
                *b = self.next;
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with_recorder() -> (Bus, Arc<Mutex<Recorder>>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio");
        bus.insert(BusRange::new(0x3f8, 8).expect("range"), rec.clone())
            .expect("insert");
        (bus, rec)
    }

    #[test]
    fn rep_outsb_delivers_every_byte_in_order() {
        let (bus, rec) = bus_with_recorder();
        let data = b"hello\n";
        let access = PioAccess::new(1, 6, data.len()).expect("valid");
        dispatch_pio_out(&bus, 0x3f8, access, data);
        let writes = rec.lock().expect("lock").writes.clone();
        let expected: Vec<(u64, Vec<u8>)> = data.iter().map(|&b| (0, vec![b])).collect();
        assert_eq!(writes, expected);
    }

    #[test]
    fn rep_outsw_delivers_word_items() {
        let (bus, rec) = bus_with_recorder();
        let data = [1u8, 2, 3, 4];
        dispatch_pio_out(&bus, 0x3fa, PioAccess::new(2, 2, 4).expect("valid"), &data);
        assert_eq!(
            rec.lock().expect("lock").writes,
            vec![(2, vec![1, 2]), (2, vec![3, 4])]
        );
    }

    #[test]
    fn rep_insb_fills_every_item_in_order() {
        let (bus, rec) = bus_with_recorder();
        let mut data = [0u8; 4];
        let access = PioAccess::new(1, 4, data.len()).expect("valid");
        dispatch_pio_in(&bus, 0x3fd, access, &mut data);
        assert_eq!(data, [1, 2, 3, 4]);
        assert_eq!(rec.lock().expect("lock").reads, vec![(5, 1); 4]);
        // Four-byte items: each read sees the whole item.
        let mut data = [0u8; 8];
        dispatch_pio_in(
            &bus,
            0x3f8,
            PioAccess::new(4, 2, 8).expect("valid"),
            &mut data,
        );
        assert_eq!(data, [5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn unhandled_string_in_reads_all_ones() {
        let (bus, _) = bus_with_recorder();
        let mut data = [0u8; 6];
        dispatch_pio_in(
            &bus,
            0x80,
            PioAccess::new(2, 3, 6).expect("valid"),
            &mut data,
        );
        assert_eq!(data, [0xff; 6]);
        assert_eq!(bus.unhandled_count(), 3);
    }

    #[test]
    fn pio_geometry_is_checked() {
        assert_eq!(
            PioAccess::new(1, 1, 1).map(|a| (a.size(), a.count())),
            Some((1, 1))
        );
        assert!(PioAccess::new(4, 1024, 4096).is_some());
        for (size, count, len) in [
            (0u8, 1u32, 0usize), // no such width
            (3, 1, 3),
            (8, 1, 8),
            (1, 0, 0),       // no items
            (1, 6, 1),       // data area shorter than count * size
            (2, 3, 7),       // longer
            (4, 1025, 4100), // more than a page
            (4, u32::MAX, usize::MAX),
        ] {
            assert_eq!(
                PioAccess::new(size, count, len),
                None,
                "{size} {count} {len}"
            );
        }
    }
}
