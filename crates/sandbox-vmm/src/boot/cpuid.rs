//! Per-vCPU CPUID, derived from `KVM_GET_SUPPORTED_CPUID`.
//!
//! What we change, leaf by leaf (Intel SDM vol. 2A "CPUID"; AMD APM vol. 3 appendix E):
//! - leaf 0x1: initial APIC id (`EBX[31:24]`), logical processor count (`EBX[23:16]`) with HTT
//!   (`EDX[28]`) when there is more than one vCPU, the hypervisor bit (`ECX[31]`) and the TSC-deadline
//!   timer (`ECX[24]`; KVM emulates it in its LAPIC but leaves the bit to the VMM, and with
//!   hardware-reduced ACPI there is no PIT to calibrate the LAPIC timer against);
//! - leaf 0x4: cores per package (`EAX[31:26]`) and threads sharing each cache (`EAX[25:14]`);
//! - leaves 0xB and 0x1F: the x2APIC topology, one thread per core and `n` cores in one package;
//! - leaf 0x8000_0008: AMD core count (`ECX[7:0]`) and APIC id size (`ECX[15:12]`);
//! - leaf 0x8000_001E: AMD extended APIC id;
//! - leaves 0x4000_0000/0x4000_0001: the KVM signature and feature leaves are kept, or added if
//!   the host did not report them. Without them Linux finds no kvm-clock and boots about 3×
//!   slower (docs/bench.md).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: TSC-deadline mode of the LAPIC timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX bit 28: the logical-processor count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// The KVM CPUID signature leaf and its "KVMKVMKVM\0\0\0" value in EBX, ECX, EDX.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The KVM paravirtual feature leaf.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// KVM_FEATURE_CLOCKSOURCE (bit 0) and KVM_FEATURE_CLOCKSOURCE2 (bit 3): what any KVM since 2.6.35
/// offers; used only if the host did not report leaf 0x4000_0001 itself.
const KVM_FALLBACK_FEATURES: u32 = (1 << 0) | (1 << 3);
/// x2APIC topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` items (`ceil(log2(n))`, 0 for n <= 1).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Filters the host's supported CPUID entries for vCPU `cpu_index` of `cpu_count` (APIC id =
/// index). `supported` is what `KVM_GET_SUPPORTED_CPUID` returned.
pub fn filter_cpuid(
    supported: &[kvm_cpuid_entry2],
    cpu_index: u8,
    cpu_count: u8,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count.max(1));
    let core_bits = id_bits(count);
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        // The topology leaves are rebuilt below.
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();

    for e in &mut out {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                let cores = (count - 1).min(63);
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (cores << 26);
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((count - 1) & 0xff);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff); // one thread per core: core id = APIC id
                e.ecx &= !0xff; // node 0
            }
            KVM_SIGNATURE_LEAF => {
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
                e.eax = e.eax.max(KVM_FEATURES_LEAF);
            }
            _ => {}
        }
    }

    for leaf in [0xb, 0x1f] {
        if max_basic < leaf {
            continue;
        }
        let flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        out.push(entry(
            leaf,
            0,
            flags,
            [0, 1, (LEVEL_TYPE_SMT << 8), apic_id],
        ));
        out.push(entry(
            leaf,
            1,
            flags,
            [core_bits, count, 1 | (LEVEL_TYPE_CORE << 8), apic_id],
        ));
        out.push(entry(leaf, 2, flags, [0, 0, 2, apic_id]));
    }

    if !out.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        let [b, c, d] = KVM_SIGNATURE;
        out.push(entry(
            KVM_SIGNATURE_LEAF,
            0,
            0,
            [KVM_FEATURES_LEAF, b, c, d],
        ));
    }
    if !out.iter().any(|e| e.function == KVM_FEATURES_LEAF) {
        out.push(entry(
            KVM_FEATURES_LEAF,
            0,
            0,
            [KVM_FALLBACK_FEATURES, 0, 0, 0],
        ));
    }
    out
}

/// [`filter_cpuid`] over a `CpuId` wrapper.
///
/// # Errors
/// The FAM wrapper's error if the result has more entries than `KVM_MAX_CPUID_ENTRIES`.
pub fn vcpu_cpuid(
    supported: &CpuId,
    cpu_index: u8,
    cpu_count: u8,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    CpuId::from_entries(&filter_cpuid(supported.as_slice(), cpu_index, cpu_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(
                1,
                0,
                0,
                [0x906ea, 0x0010_0800 | (7 << 24), 0x7ffa_3203, 0x178b_fbff],
            ),
            entry(4, 0, 1, [0x1c00_4121, 0, 0, 0]), // L1d
            entry(4, 3, 1, [0x1c03_c163, 0, 0, 0]), // L3
            entry(0xb, 0, 1, [1, 2, 0x100, 7]),
            entry(0x8000_0008, 0, 0, [0x3030, 0, 0x7007, 0]),
            entry(0x8000_001e, 0, 0, [9, 0x0109, 0x0303, 0]),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let v = filter_cpuid(&host(), 2, 4);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(
            l1.ebx & 0xffff,
            0x0800,
            "CLFLUSH size and brand index are kept"
        );
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let single = find(&filter_cpuid(&host(), 0, 1), 1, 0);
        assert_eq!(single.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(single.ebx >> 24, 0);
    }

    #[test]
    fn x2apic_topology_is_rebuilt_per_vcpu() {
        let v = filter_cpuid(&host(), 3, 4);
        for leaf in [0xb, 0x1f] {
            assert_eq!(v.iter().filter(|e| e.function == leaf).count(), 3);
            let smt = find(&v, leaf, 0);
            let core = find(&v, leaf, 1);
            let end = find(&v, leaf, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        }
    }

    #[test]
    fn cache_leaves_report_the_core_count() {
        let v = filter_cpuid(&host(), 0, 2);
        assert_eq!(find(&v, 4, 0).eax >> 26, 1);
        assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&v, 4, 3).eax >> 14) & 0xfff, 1);
        assert_eq!(find(&v, 4, 3).eax & 0x3fff, 0x0163 & 0x3fff);
    }

    #[test]
    fn amd_leaves_report_count_and_apic_id() {
        let v = filter_cpuid(&host(), 1, 2);
        assert_eq!(find(&v, 0x8000_0008, 0).ecx & 0xf0ff, (1 << 12) | 1);
        let ext = find(&v, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx & 0xffff, ext.ecx & 0xff), (1, 1, 0));
    }

    #[test]
    fn kvm_signature_leaves_are_added_when_missing() {
        let v = filter_cpuid(&host(), 0, 1);
        let sig = find(&v, KVM_SIGNATURE_LEAF, 0);
        let text: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&text, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_FEATURES_LEAF);
        assert_eq!(find(&v, KVM_FEATURES_LEAF, 0).eax, KVM_FALLBACK_FEATURES);
    }

    #[test]
    fn host_kvm_feature_leaf_is_kept() {
        let mut h = host();
        h.push(entry(KVM_SIGNATURE_LEAF, 0, 0, [0x4000_0001, 0, 0, 0]));
        h.push(entry(KVM_FEATURES_LEAF, 0, 0, [0x0100_7afb, 0, 0, 0]));
        let v = filter_cpuid(&h, 0, 1);
        assert_eq!(
            v.iter().filter(|e| e.function == KVM_FEATURES_LEAF).count(),
            1
        );
        assert_eq!(find(&v, KVM_FEATURES_LEAF, 0).eax, 0x0100_7afb);
        assert_eq!(find(&v, KVM_SIGNATURE_LEAF, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn topology_leaves_are_skipped_when_the_host_max_leaf_is_low() {
        let mut h = host();
        h[0].eax = 0xd;
        let v = filter_cpuid(&h, 0, 2);
        assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(v.iter().filter(|e| e.function == 0x1f).count(), 0);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
