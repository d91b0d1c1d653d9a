//! The x86_64 guest physical memory map and the fixed addresses of boot structures.
//!
//! ```text
//! 0x0000_0000 ┌───────────────────────────────┐
//!             │ RAM: real-mode IVT/BDA, GDT   │  0x500 GDT, 0x520 IDT, 0x7000 zero page,
//!             │ (0x500), zero page, boot      │  0x8ff0 boot stack, 0x9000.. page tables,
//!             │ stack, page tables, cmdline   │  0x20000 command line
//! 0x0009_fc00 ├───────────────────────────────┤
//!             │ reserved: EBDA, VGA hole,     │  0xe0000 RSDP, then the other ACPI tables
//!             │ BIOS area (ACPI tables)       │
//! 0x0010_0000 ├───────────────────────────────┤
//!             │ RAM: kernel (vmlinux loads at │
//!             │ its ELF physical addresses,   │
//!             │ usually 16 MiB), initrd at    │
//!             │ the top of low RAM            │
//! 0xc000_0000 ├───────────────────────────────┤  MMIO_GAP_START (3 GiB)
//!             │ 32-bit MMIO gap: virtio-mmio  │  0xd000_0000 + n * 4 KiB
//!             │ windows, IOAPIC, LAPIC        │  0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000 ├─────────────────────────────┤  MMIO_GAP_END (4 GiB)
//!             │ RAM above 4 GiB (guests with  │
//!             │ more than 3 GiB)              │
//!             └───────────────────────────────┘
//! ```

use vm_memory::GuestAddress;

/// Start of the 32-bit MMIO gap (3 GiB): no RAM between here and [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap (4 GiB); RAM continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// First virtio-mmio window, inside the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Bytes per virtio-mmio window (virtio 1.2 §4.2.2: registers + config space fit in 4 KiB).
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// How many virtio-mmio windows the VMM hands out (GSIs [`VIRTIO_FIRST_GSI`]..=23).
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = IOAPIC_PINS - VIRTIO_FIRST_GSI;

/// IOAPIC MMIO base (the PC default; KVM's in-kernel IOAPIC lives here).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base (the architectural default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins of KVM's in-kernel IOAPIC, i.e. usable GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// GSI of COM1 (ISA IRQ 4, identity-mapped to IOAPIC pin 4).
pub const SERIAL_GSI: u32 = 4;
/// First GSI handed to virtio-mmio devices (5..=23 are free ISA/PCI pins).
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// Three pages KVM needs for the TSS on Intel (`KVM_SET_TSS_ADDR`), at the top of the MMIO gap,
/// below the BIOS ROM alias where QEMU and Firecracker put it too.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Boot GDT (4 entries of 8 bytes).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT (one null 8-byte entry: interrupts stay disabled until the kernel sets its own).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// `struct boot_params` (the "zero page", Linux boot protocol §"The zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial RSP/RBP of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, one PD of 2 MiB pages (maps the first 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory of the identity map (512 × 2 MiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we write, including the NUL, bytes (x86 `COMMAND_LINE_SIZE` is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the RSDP is written: inside the BIOS area the kernel scans (0xe0000..0x100000), so the
/// guest finds it even without `boot_params.acpi_rsdp_addr`.
pub const RSDP_ADDR: u64 = 0xe0000;
/// End (exclusive) of the area reserved for ACPI tables.
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// First byte of "high" memory (1 MiB): the kernel and the initrd go above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// ACPI fixed-hardware PIO registers (FADT, hardware-reduced ACPI): sleep control.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (reads 0: the guest never sleeps and wakes).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register; writing [`ACPI_RESET_VALUE`] resets the machine.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The value the FADT tells the guest to write to [`ACPI_RESET_PORT`].
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// COM1 base port (16550 UART, 8 registers).
pub const COM1_PORT: u16 = 0x3f8;
/// i8042 data port (0x60) .. command/status port (0x64): a 5-port window.
pub const I8042_PORT: u16 = 0x60;
/// CMOS RTC index (0x70) and data (0x71) ports.
pub const RTC_PORT: u16 = 0x70;

// The fixed boot structures must not overlap, and the virtio windows must sit in the MMIO gap
// below the IOAPIC; checked at compile time.
const _: () = {
    assert!(BOOT_GDT_ADDR + 4 * 8 <= BOOT_IDT_ADDR);
    assert!(BOOT_IDT_ADDR + 8 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_ADDR);
    assert!(PD_ADDR + 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START);
    assert!(
        VIRTIO_MMIO_BASE + VIRTIO_MMIO_MAX_DEVICES as u64 * VIRTIO_MMIO_WINDOW
            <= IOAPIC_ADDR as u64
    );
};

/// Guest RAM ranges for `mem_bytes` of RAM: one region below the MMIO gap, and a second one from
/// 4 GiB for what does not fit below it.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO gap for `mem_bytes` of RAM.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let four_gib = 4u64 << 30;
        assert_eq!(
            ram_ranges(four_gib),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), four_gib - MMIO_GAP_START),
            ]
        );
        assert_eq!(low_ram_end(four_gib), MMIO_GAP_START);
    }
}
