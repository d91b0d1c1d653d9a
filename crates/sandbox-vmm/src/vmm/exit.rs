//! Why a VM ended, and the shared slot where the first reason is recorded.

use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::lock;
use crate::devices::power::{PowerEvent, PowerEventSink};

/// Details of a VM that ended on an error KVM reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalErrorInfo {
    /// The vCPU that hit it.
    pub vcpu: u8,
    /// What KVM said (`KVM_EXIT_INTERNAL_ERROR` suberror, entry failure reason, errno...).
    pub description: String,
    /// The guest RIP, if the registers could be read.
    pub rip: Option<u64>,
    /// Up to 16 code bytes at RIP, read from guest memory after a checked translation of RIP
    /// (empty if RIP does not translate to guest RAM).
    pub code: Vec<u8>,
}

impl fmt::Display for InternalErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.description)?;
        if let Some(rip) = self.rip {
            write!(f, "; RIP {rip:#x}")?;
        }
        if !self.code.is_empty() {
            write!(f, "; code:")?;
            for b in &self.code {
                write!(f, " {b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest reset (i8042 reset line or ACPI reset register).
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault {
        /// The vCPU index.
        vcpu: u8,
    },
    /// KVM reported an error it could not handle (emulation failure, entry failure...).
    InternalError(Box<InternalErrorInfo>),
    /// The host stopped the VM (`VmHandle::stop`).
    Stopped,
}

impl ExitReason {
    /// The `sandbox-vmm` exit status for this reason (see docs/vmm.md):
    /// 0 poweroff, 3 reset, 4 triple fault, 5 internal error, 6 stopped by the host.
    /// (1 is a VMM error before or during the run, 2 a usage error.)
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Poweroff => 0,
            ExitReason::Reset => 3,
            ExitReason::TripleFault { .. } => 4,
            ExitReason::InternalError(_) => 5,
            ExitReason::Stopped => 6,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Poweroff => write!(f, "guest poweroff"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            ExitReason::InternalError(info) => write!(f, "KVM internal error: {info}"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// The first exit reason of a VM, set once by whoever sees it first (a vCPU, a device, the host)
/// and awaited by the VM handle.
#[derive(Debug, Default)]
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
}

impl ExitState {
    /// Records `reason` unless one is already recorded; returns whether it was recorded.
    pub fn record(&self, reason: ExitReason) -> bool {
        let mut slot = lock(&self.reason);
        if slot.is_some() {
            return false;
        }
        tracing::info!(%reason, "VM exit requested");
        *slot = Some(reason);
        drop(slot);
        self.cond.notify_all();
        true
    }

    /// The recorded reason, if any.
    pub fn get(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Whether a reason is recorded.
    pub fn is_set(&self) -> bool {
        lock(&self.reason).is_some()
    }

    /// Waits for a reason, at most `timeout` (forever with `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slot = lock(&self.reason);
        loop {
            if let Some(reason) = slot.as_ref() {
                return Some(reason.clone());
            }
            slot = match deadline {
                None => self
                    .cond
                    .wait(slot)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.cond
                        .wait_timeout(slot, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

impl PowerEventSink for ExitState {
    fn power_event(&self, event: PowerEvent) {
        self.record(match event {
            PowerEvent::Poweroff => ExitReason::Poweroff,
            PowerEvent::Reset => ExitReason::Reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::default();
        assert_eq!(s.wait(Some(Duration::from_millis(1))), None);
        s.power_event(PowerEvent::Reset);
        assert!(!s.record(ExitReason::Poweroff));
        assert_eq!(s.get(), Some(ExitReason::Reset));
        assert_eq!(s.wait(None), Some(ExitReason::Reset));
    }

    #[test]
    fn waiter_is_woken() {
        let s = Arc::new(ExitState::default());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.record(ExitReason::TripleFault { vcpu: 1 }));
        assert_eq!(s.wait(None), Some(ExitReason::TripleFault { vcpu: 1 }));
        assert!(t.join().expect("join"));
    }

    #[test]
    fn exit_codes_are_distinct_and_documented() {
        let info = InternalErrorInfo {
            vcpu: 0,
            description: "emulation failure".into(),
            rip: Some(0x1000),
            code: vec![0x0f, 0x0b],
        };
        let reasons = [
            ExitReason::Poweroff,
            ExitReason::Reset,
            ExitReason::TripleFault { vcpu: 0 },
            ExitReason::InternalError(Box::new(info)),
            ExitReason::Stopped,
        ];
        let codes: Vec<u8> = reasons.iter().map(ExitReason::exit_code).collect();
        assert_eq!(codes, vec![0, 3, 4, 5, 6]);
        assert_eq!(
            reasons[3].to_string(),
            "KVM internal error: vCPU 0: emulation failure; RIP 0x1000; code: 0f 0b"
        );
    }
}
