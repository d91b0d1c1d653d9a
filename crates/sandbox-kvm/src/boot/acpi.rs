//! Minimal ACPI tables (ACPI 6.5): RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! Why ACPI and not an MP table (see docs/vmm.md): the MADT lists every vCPU's local APIC, so
//! Linux brings up all of them, and the FADT's hardware-reduced sleep control register gives the
//! guest a real poweroff that ends the VM with a distinct exit reason (an MP-table guest can only
//! halt forever on poweroff). The tables:
//! - FADT: hardware-reduced ACPI (§5.2.9, flag `HW_REDUCED_ACPI`), no VGA/MSI/ASPM, no i8042
//!   (so the keyboard driver does not probe), sleep control/status and reset registers in PIO
//!   space (handled by [`crate::devices::power::AcpiPower`]);
//! - DSDT: only the `\_S5_` package (§7.4.2), which tells the guest the S5 `SLP_TYP` value;
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

/// The tables as (guest address, bytes), for `cpu_count` vCPUs. The first is the RSDP at
/// [`layout::RSDP_ADDR`]; the rest follow it, 16-byte aligned, below [`layout::ACPI_AREA_END`].
///
/// # Errors
/// [`BootError::AcpiTooLarge`] if the tables do not fit below [`layout::ACPI_AREA_END`].
pub fn build_tables(cpu_count: u8) -> Result<Vec<(u64, Vec<u8>)>> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_len = Rsdp::len() as u64;

    // DSDT: Name (_S5_, Package () { 5, 5, 0, 0 }).
    let s5 = aml::Name::new(
        aml::Path::new("_S5_"),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"SBXDSDT ", OEM_REVISION);
    dsdt.append_slice(&to_bytes(&s5));
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
pub fn write_tables(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<u64> {
    for (addr, bytes) in build_tables(cpu_count)? {
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
        let tables = build_tables(2).expect("tables");
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
        let tables = build_tables(3).expect("tables");
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

    #[test]
    fn dsdt_declares_s5() {
        let dsdt = &build_tables(1).expect("tables")[1].1;
        let body = &dsdt[36..];
        assert!(body.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn fadt_points_at_the_power_registers() {
        let fadt = &build_tables(1).expect("tables")[2].1;
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
        assert!(build_tables(u8::MAX).is_ok());
    }
}
