//! Initial vCPU state for the Linux 64-bit boot protocol: a flat GDT, identity page tables,
//! long-mode segment and control registers, general registers, FPU, MSRs and LAPIC LINT pins.
//!
//! The boot protocol's 64-bit entry expects (boot.rst, "64-bit BOOT PROTOCOL"): long mode with
//! paging, an identity map covering the kernel, boot_params and command line; `__BOOT_CS` (0x10
//! in Linux's numbering; any flat 64-bit code segment works) and flat data segments; interrupts
//! disabled; `%rsi` = address of `boot_params`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, Result};
use crate::layout;

/// CR0: protection enable.
const X86_CR0_PE: u64 = 0x1;
/// CR0: paging.
const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4: physical address extension (required for long mode).
const X86_CR4_PAE: u64 = 0x20;
/// EFER: long mode enable.
const EFER_LME: u64 = 0x100;
/// EFER: long mode active.
const EFER_LMA: u64 = 0x400;

/// Page-table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags: present, writable, 2 MiB page.
const PDE_2M_PAGE: u64 = 0x83;

/// A GDT descriptor from its flags/access word (as in Linux's `GDT_ENTRY(flags, base, limit)`),
/// base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` KVM needs for the descriptor `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With the granularity bit the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32, // at most 0xffff_ffff by construction
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS (all flat).
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, exec/read, accessed, L=1, G=1
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, accessed, D/B=1, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 32-bit TSS, G=1
    ]
}

/// The identity page tables, as (guest address, bytes) to write: one PML4 entry → one PDPT entry
/// → 512 2-MiB pages, mapping guest-physical 0..1 GiB one to one (enough for the kernel, which
/// builds its own tables early in `startup_64`).
pub fn identity_page_tables() -> [(u64, Vec<u8>); 3] {
    let entry = |v: u64| v.to_le_bytes();
    let pml4 = entry(layout::PDPT_ADDR | PTE_PRESENT_RW).to_vec();
    let pdpt = entry(layout::PD_ADDR | PTE_PRESENT_RW).to_vec();
    let pd = (0..512u64)
        .flat_map(|i| entry((i << 21) | PDE_2M_PAGE))
        .collect();
    [
        (layout::PML4_ADDR, pml4),
        (layout::PDPT_ADDR, pdpt),
        (layout::PD_ADDR, pd),
    ]
}

/// Writes the GDT, a null IDT and the identity page tables to guest memory.
///
/// # Errors
/// [`BootError::GuestMemory`].
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let gdt: Vec<u8> = boot_gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    let err = |what| move |source| BootError::GuestMemory { what, source };
    mem.write_slice(&gdt, GuestAddress(layout::BOOT_GDT_ADDR))
        .map_err(err("the boot GDT"))?;
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_ADDR))
        .map_err(err("the boot IDT"))?;
    for (addr, bytes) in identity_page_tables() {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(err("the boot page tables"))?;
    }
    Ok(())
}

/// Long-mode special registers, applied on top of the vCPU's current `sregs`.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the 64-bit entry point.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; IF clear
        rip: entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// The FPU after `FNINIT` (control word 0x37f) with default SSE state (MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 0x1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs set at boot: syscall/sysenter state cleared, TSC 0, fast strings on, and MTRRs
/// enabled with write-back default (without it Linux maps all RAM uncached).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// [`boot_msr_entries`] as the `Msrs` FAM wrapper `KVM_SET_MSRS` takes.
///
/// # Panics
/// Never: the list is far below the wrapper's capacity.
pub fn boot_msrs() -> Msrs {
    Msrs::from_entries(&boot_msr_entries()).expect("11 MSR entries fit in a kvm_msrs")
}

/// LAPIC register offsets of the local vector table entries LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 8..10).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
        *dst = *src as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (dst, src) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = src as std::os::raw::c_char;
    }
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a PC BIOS leaves them.
pub fn configure_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = boot_gdt();
        let code = segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (code.base, code.limit, code.selector),
            (0, 0xffff_ffff, 0x8)
        );
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s, code.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        let data = segment_from_gdt(gdt[2], 2);
        assert_eq!(
            (data.selector, data.db, data.l, data.type_),
            (0x10, 1, 0, 0x3)
        );
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn gdt_entry_packs_base_and_limit() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
        assert_eq!(s.selector, 40);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let [(pml4_addr, pml4), (pdpt_addr, pdpt), (pd_addr, pd)] = identity_page_tables();
        assert_eq!(pml4_addr, layout::PML4_ADDR);
        let word = |b: &[u8], i: usize| {
            u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        assert_eq!(word(&pml4, 0), pdpt_addr | 3);
        assert_eq!(word(&pdpt, 0), pd_addr | 3);
        assert_eq!(pd.len(), 4096);
        for i in 0..512 {
            assert_eq!(word(&pd, i), ((i as u64) << 21) | 0x83);
        }
    }

    #[test]
    fn boot_tables_land_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        write_boot_tables(&mem).expect("write");
        let code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_ADDR + 8))
            .expect("read");
        assert_eq!(code, boot_gdt()[1]);
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 8))
            .expect("read");
        assert_eq!(pde, (1 << 21) | 0x83);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn regs_point_rsi_at_the_zero_page() {
        let r = boot_regs(GuestAddress(0x100_0000));
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100_0000, layout::ZERO_PAGE_ADDR, 2)
        );
    }

    #[test]
    fn msrs_enable_mtrrs_and_fast_strings() {
        let msrs = boot_msr_entries();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(boot_msrs().as_slice().len(), msrs.len());
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[APIC_LVT0 + 1] = 0x7f; // garbage in the mode bits and above
        configure_lint(&mut lapic);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x7f & !0x7 | 0x7);
        assert_eq!(lapic.regs[APIC_LVT1 + 1] as u8, 0x4);
    }
}
