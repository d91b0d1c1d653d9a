//! Minimal ACPI tables (ACPI 6.5): RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! Why ACPI and not an MP table (see docs/vmm.md): the MADT lists every vCPU's local APIC, so
//! Linux brings up all of them, and the FADT's hardware-reduced sleep control register gives the
//! guest a real poweroff that ends the VM with a distinct exit reason (an MP-table guest can only
//! halt forever on poweroff). The tables:
//! - FADT: hardware-reduced ACPI (§5.2.9, flag `HW_REDUCED_ACPI`), no VGA/MSI/ASPM, no i8042
//!   (so the keyboard driver does not probe), sleep control/status and reset registers in PIO
//!   space (handled by [`crate::devices::power::AcpiPower`]);
//! - DSDT: the `\_S5_` package (§7.4.2), which tells the guest the S5 `SLP_TYP` value, COM1
//!   (`PNP0501`) and every virtio-mmio device (`LNRO0005`, the id Linux's virtio_mmio driver
//!   matches) with their interrupts. Declaring the interrupts matters: with hardware-reduced ACPI
//!   Linux has no legacy PIC, so it maps no ISA IRQ by itself, and a GSI becomes a usable Linux IRQ
//!   only once a `_CRS` names it (the devices are not also put on the kernel command line, which
//!   would register each window twice; see `VmBuilder::cmdline`);
//! - MADT: one enabled local APIC per vCPU (APIC id = vCPU index) and the IOAPIC (GSI base 0).
//!
//! The tables live in the reserved BIOS area from [`layout::RSDP_ADDR`]; `boot_params` also
//! carries the RSDP address.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, Result};
use crate::devices::power::S5_SLEEP_TYPE;
use crate::layout;

const OEM_ID: [u8; 6] = *b"SBXVMM";
const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity" (ACPI 6.5 §5.2.9): our name.
const HYPERVISOR_VENDOR: [u8; 8] = *b"SANDBOXK";

/// IA-PC boot architecture flags (ACPI 6.5 §5.2.9.3): VGA not present (bit 2), MSI not supported
/// (bit 3), PCIe ASPM controls (bit 4). Bit 1 (8042 present) stays clear: no keyboard to probe.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn pio_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// A virtio-mmio device to declare in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceDesc {
    /// First byte of the register window (below 4 GiB).
    pub base: u32,
    /// Window size, bytes.
    pub size: u32,
    /// The device's GSI.
    pub gsi: u32,
}

/// COM1's GSI and ports, for its DSDT entry.
const COM1_GSI: u32 = layout::SERIAL_GSI;

/// The DSDT body: `\_S5_`, COM1 and the virtio-mmio devices.
fn dsdt_body(mmio: &[MmioDeviceDesc]) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        aml::Path::new("_S5_"),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    // Edge-triggered, active-high, exclusive: how KVM's irqfds deliver.
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let com1_hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        aml::Path::new("\\_SB_.COM1"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &com1_hid),
            &aml::Name::new(aml::Path::new("_UID"), &0u8),
            &aml::Name::new(aml::Path::new("_CRS"), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, dev) in mmio.iter().enumerate() {
        let uid = i as u8; // at most VIRTIO_MMIO_MAX_DEVICES (19)
        let mem = aml::Memory32Fixed::new(true, dev.base, dev.size);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let path = format!("\\_SB_.V{:03}", uid);
        aml::Device::new(
            aml::Path::new(&path),
            vec![
                &aml::Name::new(aml::Path::new("_HID"), &"LNRO0005"),
                &aml::Name::new(aml::Path::new("_UID"), &uid),
                &aml::Name::new(aml::Path::new("_CRS"), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    body
}

/// The tables as (guest address, bytes), for `cpu_count` vCPUs and the virtio-mmio devices `mmio`. The first is the RSDP at
/// [`layout::RSDP_ADDR`]; the rest follow it, 16-byte aligned, below [`layout::ACPI_AREA_END`].
///
/// # Errors
/// [`BootError::AcpiTooLarge`] if the tables do not fit below [`layout::ACPI_AREA_END`].
pub fn build_tables(cpu_count: u8, mmio: &[MmioDeviceDesc]) -> Result<Vec<(u64, Vec<u8>)>> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_len = Rsdp::len() as u64;

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"SBXDSDT ", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(mmio));
    let dsdt = dsdt.as_slice().to_vec();
    let dsdt_addr = align(layout::RSDP_ADDR + rsdp_len);

    let mut fadt = FADTBuilder::new(OEM_ID, *b"SBXFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.sleep_control_reg = pio_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = pio_register(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = pio_register(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt = to_bytes(&fadt.finalize());
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);

    let mut madt = MADT::new(
        OEM_ID,
        *b"SBXMADT ",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for cpu in 0..cpu_count {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    let madt = to_bytes(&madt);
    let madt_addr = align(fadt_addr + fadt.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, *b"SBXXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = align(madt_addr + madt.len() as u64);

    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_AREA_END {
        return Err(BootError::AcpiTooLarge { end });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (layout::RSDP_ADDR, rsdp),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ])
}

/// Builds the tables and writes them to guest memory; returns the RSDP address.
///
/// # Errors
/// [`BootError::AcpiTooLarge`], [`BootError::GuestMemory`].
pub fn write_tables(mem: &GuestMemoryMmap, cpu_count: u8, mmio: &[MmioDeviceDesc]) -> Result<u64> {
    for (addr, bytes) in build_tables(cpu_count, mmio)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| BootError::GuestMemory {
                what: "the ACPI tables",
                source,
            })?;
    }
    Ok(layout::RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn tables_checksum_and_link_up() {
        let tables = build_tables(2, &[]).expect("tables");
        let [(rsdp_addr, rsdp), (dsdt_addr, dsdt), (fadt_addr, fadt), (madt_addr, madt), (xsdt_addr, xsdt)] =
            <[_; 5]>::try_from(tables).expect("five tables");
        assert_eq!(rsdp_addr, layout::RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(u64_at(&rsdp, 24), xsdt_addr);
        for (sig, t) in [
            (b"DSDT", &dsdt),
            (b"FACP", &fadt),
            (b"APIC", &madt),
            (b"XSDT", &xsdt),
        ] {
            assert_eq!(&t[..4], sig);
            assert_eq!(u32_at(t, 4) as usize, t.len(), "{sig:?} length");
            assert_eq!(sum(t), 0, "{sig:?} checksum");
        }
        assert_eq!(
            (u64_at(&xsdt, 36), u64_at(&xsdt, 44)),
            (fadt_addr, madt_addr)
        );
        // FADT: X_DSDT at offset 140, flags at 112.
        assert_eq!(u64_at(&fadt, 140), dsdt_addr);
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced ACPI");
        // No table overlaps the next.
        let addrs = [rsdp_addr, dsdt_addr, fadt_addr, madt_addr, xsdt_addr];
        let lens = [rsdp.len(), dsdt.len(), fadt.len(), madt.len(), xsdt.len()];
        for i in 0..4 {
            assert!(addrs[i] + lens[i] as u64 <= addrs[i + 1]);
        }
        assert!(xsdt_addr + xsdt.len() as u64 <= layout::ACPI_AREA_END);
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let tables = build_tables(3, &[]).expect("tables");
        let madt = &tables[3].1;
        // Header (36) + LAPIC address + flags (8), then 3 × 8-byte LAPICs and a 12-byte IOAPIC.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
        for cpu in 0..3usize {
            let e = &madt[44 + cpu * 8..44 + cpu * 8 + 8];
            assert_eq!(
                (e[0], e[1], e[2], e[3], e[4]),
                (0, 8, cpu as u8, cpu as u8, 1)
            );
        }
        assert_eq!(madt[44 + 24], 1, "IOAPIC entry type");
        assert_eq!(u32_at(madt, 44 + 24 + 4), layout::IOAPIC_ADDR);
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_declares_s5_com1_and_virtio_devices() {
        let mmio = [
            MmioDeviceDesc {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            MmioDeviceDesc {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let dsdt = &build_tables(1, &mmio).expect("tables")[1].1;
        let body = &dsdt[36..];
        assert!(contains(body, b"_S5_"));
        assert!(contains(body, b"COM1"));
        assert!(contains(body, b"V000") && contains(body, b"V001"));
        assert!(contains(body, b"LNRO0005\0"));
        // Extended IRQ descriptors (0x89, length 6, flags consumer|edge, one IRQ) for GSIs 4, 5, 6.
        for gsi in [4u8, 5, 6] {
            assert!(
                contains(body, &[0x89, 6, 0, 0x3, 1, gsi, 0, 0, 0]),
                "GSI {gsi}"
            );
        }
        // Memory32Fixed (0x86, length 9, read-write) for the second window.
        assert!(contains(
            body,
            &[0x86, 9, 0, 1, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0, 0]
        ));
        assert_eq!(sum(dsdt), 0);
        let without = &build_tables(1, &[]).expect("tables")[1].1;
        assert!(!contains(without, b"V000"));
    }

    #[test]
    fn fadt_points_at_the_power_registers() {
        let fadt = &build_tables(1, &[]).expect("tables")[2].1;
        // SLEEP_CONTROL_REG at offset 244, SLEEP_STATUS_REG at 256, RESET_REG at 116 (GAS:
        // space id, width, offset, access size, then the 64-bit address at +4).
        assert_eq!(fadt[244], 1, "system I/O space");
        assert_eq!(
            u64_at(fadt, 248),
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
        );
        assert_eq!(u64_at(fadt, 260), u64::from(layout::ACPI_SLEEP_STATUS_PORT));
        assert_eq!(u64_at(fadt, 120), u64::from(layout::ACPI_RESET_PORT));
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
    }

    #[test]
    fn tables_fit_for_the_largest_vm() {
        let mmio: Vec<MmioDeviceDesc> = (0..layout::VIRTIO_MMIO_MAX_DEVICES)
            .map(|i| MmioDeviceDesc {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i,
            })
            .collect();
        assert!(build_tables(u8::MAX, &mmio).is_ok());
    }
}
