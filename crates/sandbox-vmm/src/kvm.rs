//! Opening `/dev/kvm` and checking that it can run our VMs.
//!
//! Every error names what to fix on the host: the module, the permissions, or nesting.

use std::io;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every kernel since 2.6.22 reports (`KVM_GET_API_VERSION`).
pub const KVM_API_VERSION: i32 = 12;

/// Path of the KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Errors from opening and checking `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` does not exist.
    #[error(
        "/dev/kvm does not exist: load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`), \
         enable virtualization (VT-x/AMD-V) in the firmware, or, inside a VM, enable nested \
         virtualization on its host"
    )]
    Missing(#[source] io::Error),
    /// The caller may not open `/dev/kvm`.
    #[error(
        "permission denied opening /dev/kvm: add the user to the `kvm` group \
         (`sudo usermod -aG kvm $USER`, then log in again) or `sudo chmod 0660 /dev/kvm` with group kvm"
    )]
    PermissionDenied(#[source] io::Error),
    /// Any other failure to open the device.
    #[error("cannot open /dev/kvm")]
    Open(#[source] io::Error),
    /// The kernel speaks another KVM API version.
    #[error("/dev/kvm reports KVM API version {found}, we need {KVM_API_VERSION}: upgrade the host kernel")]
    ApiVersion {
        /// What `KVM_GET_API_VERSION` returned.
        found: i32,
    },
    /// A capability we rely on is missing.
    #[error(
        "/dev/kvm lacks the {name} capability: the host kernel or nested hypervisor is too old or \
         limited (use a host kernel >= 5.10 with the in-kernel irqchip, or real VT-x/AMD-V)"
    )]
    MissingCapability {
        /// The capability's `KVM_CAP_*` name.
        name: &'static str,
    },
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, KvmError>;

/// Capabilities the VMM needs, with their `KVM_CAP_*` names for error messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    // The guest's only timer (hardware-reduced ACPI has no PIT); see boot::cpuid.
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
];

/// Opens `/dev/kvm` (close-on-exec) and checks the API version and [`REQUIRED_CAPS`].
///
/// # Errors
/// [`KvmError`] naming the host fix: missing module, permissions, API version, capability.
pub fn open_kvm() -> Result<Kvm> {
    open_kvm_at(Path::new(KVM_DEVICE))
}

/// [`open_kvm`] on an already open `/dev/kvm` fd (the jailed VMM's inherited fd): the same
/// API version and capability checks.
///
/// # Errors
/// [`KvmError::ApiVersion`], [`KvmError::MissingCapability`].
pub fn kvm_from_fd(fd: std::os::fd::OwnedFd) -> Result<Kvm> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `fd` is an open fd we own (an `OwnedFd`); `into_raw_fd` gives up that ownership,
    // so the `Kvm` is its only owner and closes it.
    let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    check_caps(|cap| kvm.check_extension(cap))?;
    Ok(kvm)
}

/// [`open_kvm`] for another device path (tests).
///
/// # Errors
/// As [`open_kvm`].
pub fn open_kvm_at(path: &Path) -> Result<Kvm> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| KvmError::Open(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        let err = io::Error::from_raw_os_error(e.errno());
        match err.kind() {
            io::ErrorKind::NotFound => KvmError::Missing(err),
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied(err),
            _ => KvmError::Open(err),
        }
    })?;
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    check_caps(|cap| kvm.check_extension(cap))?;
    Ok(kvm)
}

/// Checks [`REQUIRED_CAPS`] with `has`, returning the first missing one.
fn check_caps(has: impl Fn(Cap) -> bool) -> Result<()> {
    for (cap, name) in REQUIRED_CAPS {
        if !has(*cap) {
            return Err(KvmError::MissingCapability { name });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_names_modprobe() {
        let err = open_kvm_at(Path::new("/nonexistent/kvm")).expect_err("no such device");
        assert!(matches!(err, KvmError::Missing(_)));
        assert!(err.to_string().contains("modprobe kvm_intel"));
    }

    #[test]
    fn missing_capability_is_named() {
        let err = check_caps(|cap| !matches!(cap, Cap::Irqfd)).expect_err("irqfd missing");
        assert!(matches!(
            err,
            KvmError::MissingCapability {
                name: "KVM_CAP_IRQFD"
            }
        ));
        assert_eq!(check_caps(|_| true).ok(), Some(()));
    }

    #[test]
    fn permission_error_names_the_kvm_group() {
        let err = KvmError::PermissionDenied(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(err.to_string().contains("kvm"));
        assert!(err.to_string().contains("chmod"));
    }
}
