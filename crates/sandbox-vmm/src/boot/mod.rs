//! The x86_64 Linux boot path (Linux boot protocol, `Documentation/arch/x86/boot.rst`, 64-bit
//! entry): kernel and initrd loading, the e820 map, `boot_params`, the command line, ACPI tables,
//! CPUID, and the initial vCPU state.
//!
//! Everything here is pure data construction over guest memory, so it is unit-tested without KVM;
//! [`crate::vmm::builder`] applies it to a VM in the order the boot protocol needs.

pub mod acpi;
pub mod cpuid;
pub mod image;
pub mod regs;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout;

/// Errors from building the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("cannot open the kernel image {path}")]
    OpenKernel {
        /// The kernel path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is refused before loading: not a kernel, or its headers ask for more
    /// than a kernel needs or for memory the guest does not have (see [`image`]).
    #[error("the kernel image {path} is refused")]
    KernelImage {
        /// The kernel path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: image::KernelImageError,
    },
    /// linux-loader failed on an image that passed [`image::check_kernel_image`].
    #[error("cannot load the kernel image {path} as {format}")]
    LoadKernel {
        /// The kernel path.
        path: PathBuf,
        /// "a vmlinux ELF" or "a bzImage".
        format: &'static str,
        /// The loader's error.
        #[source]
        source: loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read the initrd {path}")]
    ReadInitrd {
        /// The initrd path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is larger than [`MAX_INITRD_BYTES`].
    #[error("the initrd {path} is {size} bytes, more than the {limit}-byte limit")]
    InitrdTooLarge {
        /// The initrd path.
        path: PathBuf,
        /// Initrd size, bytes.
        size: u64,
        /// The limit, bytes.
        limit: u64,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM below {limit:#x} after the kernel"
    )]
    InitrdTooBig {
        /// Initrd size, bytes.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// The command line is too long or contains invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// A write to guest memory failed (a layout bug or too little RAM).
    #[error("cannot write {what} to guest memory")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The ACPI tables do not fit in the BIOS area.
    #[error("the ACPI tables would end at {end:#x}, past the BIOS area")]
    AcpiTooLarge {
        /// Where they would end.
        end: u64,
    },
    /// Too many e820 entries for the zero page.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, BootError>;

/// e820 entry types (ACPI 6.5 §15, "Address Range Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the OS must not use it.
    Reserved = 2,
}

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length, bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The e820 map for `mem_bytes` of guest RAM laid out by [`layout::ram_ranges`]:
/// low RAM up to the EBDA, the EBDA/VGA/BIOS area (which holds the ACPI tables) reserved, RAM from
/// 1 MiB to the MMIO gap, and RAM above 4 GiB. The MMIO gap is absent (so not RAM).
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    let low_end = layout::low_ram_end(mem_bytes);
    if low_end > layout::HIMEM_START {
        map.push(E820Entry {
            addr: layout::HIMEM_START,
            size: low_end - layout::HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if mem_bytes > layout::MMIO_GAP_START {
        map.push(E820Entry {
            addr: layout::MMIO_GAP_END,
            size: mem_bytes - layout::MMIO_GAP_START,
            kind: E820Type::Ram,
        });
    }
    map
}

/// Where the kernel landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest-physical).
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header to copy into `boot_params` (`None` for a vmlinux ELF).
    pub setup_header: Option<setup_header>,
}

/// Loads a `vmlinux` ELF, or a bzImage, into guest memory at its own physical addresses
/// (above [`layout::HIMEM_START`]).
///
/// The headers are checked first ([`image::check_kernel_image`] with [`image::ImageLimits::DEFAULT`]:
/// at most 2 GiB of file, 512 MiB of guest memory, 64 KiB of ELF notes, 64 program headers; every
/// segment in guest RAM above 1 MiB; an ELF must load something and its entry point must be in
/// what it loads), so a hostile or broken image fails in milliseconds, before linux-loader reads
/// any segment.
///
/// # Errors
/// [`BootError::OpenKernel`], [`BootError::KernelImage`], [`BootError::LoadKernel`].
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.into(),
        source,
    })?;
    load_kernel_file(mem, file, path)
}

/// [`load_kernel`] from a file already open (the jailed VMM's inherited fd); `path` names it
/// in errors.
///
/// # Errors
/// As [`load_kernel`].
pub fn load_kernel_file(
    mem: &GuestMemoryMmap,
    mut file: File,
    path: &Path,
) -> Result<LoadedKernel> {
    let open_err = |source| BootError::OpenKernel {
        path: path.into(),
        source,
    };
    let file_len = file.metadata().map_err(open_err)?.len();
    let format = image::check_kernel_image(&mut file, file_len, mem, &image::ImageLimits::DEFAULT)
        .map_err(|source| BootError::KernelImage {
            path: path.into(),
            source,
        })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    match format {
        image::KernelFormat::Elf { .. } => loader::elf::Elf::load(mem, None, &mut file, himem)
            .map(|res| LoadedKernel {
                entry: res.kernel_load,
                end: res.kernel_end,
                setup_header: None,
            })
            .map_err(|source| BootError::LoadKernel {
                path: path.into(),
                format: "a vmlinux ELF",
                source,
            }),
        // The 64-bit entry of a bzImage is 0x200 past the start of the protected-mode code
        // (boot protocol, "64-bit BOOT PROTOCOL"); the check put that code in guest RAM.
        image::KernelFormat::BzImage => loader::bzimage::BzImage::load(mem, None, &mut file, himem)
            .map(|res| LoadedKernel {
                entry: res.kernel_load.unchecked_add(0x200),
                end: res.kernel_end,
                setup_header: res.setup_header,
            })
            .map_err(|source| BootError::LoadKernel {
                path: path.into(),
                format: "a bzImage",
                source,
            }),
    }
}

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// First byte (page-aligned).
    pub addr: GuestAddress,
    /// Size, bytes.
    pub size: u64,
}

/// Largest initrd accepted, bytes (1 GiB): it is read whole into guest RAM below 4 GiB.
pub const MAX_INITRD_BYTES: u64 = 1 << 30;

/// Highest initrd address for kernels that do not say (`initrd_addr_max` before protocol 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Chooses the initrd's address: the highest page-aligned spot that ends below both the end of
/// low RAM and the kernel's `initrd_addr_max`, and starts after the kernel.
///
/// # Errors
/// [`BootError::InitrdTooBig`] if there is no such spot.
pub fn place_initrd(size: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Result<u64> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let too_big = || BootError::InitrdTooBig { size, limit };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end.max(layout::HIMEM_START) {
        return Err(too_big());
    }
    Ok(start)
}

/// Reads the initrd at `path` into guest memory above the kernel.
///
/// # Errors
/// [`BootError::ReadInitrd`], [`BootError::InitrdTooLarge`] (over [`MAX_INITRD_BYTES`], checked
/// before any read), [`BootError::InitrdTooBig`], [`BootError::GuestMemory`].
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_bytes: u64,
) -> Result<LoadedInitrd> {
    let file = File::open(path).map_err(|source| BootError::ReadInitrd {
        path: path.into(),
        source,
    })?;
    load_initrd_file(mem, file, path, kernel, mem_bytes)
}

/// [`load_initrd`] from a file already open (the jailed VMM's inherited fd); `path` names it
/// in errors.
///
/// # Errors
/// As [`load_initrd`].
pub fn load_initrd_file(
    mem: &GuestMemoryMmap,
    mut file: File,
    path: &Path,
    kernel: &LoadedKernel,
    mem_bytes: u64,
) -> Result<LoadedInitrd> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.into(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_INITRD_BYTES {
        return Err(BootError::InitrdTooLarge {
            path: path.into(),
            size,
            limit: MAX_INITRD_BYTES,
        });
    }
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let addr = place_initrd(size, kernel.end, layout::low_ram_end(mem_bytes), addr_max)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size, limit: addr })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::GuestMemory {
            what: "the initrd",
            source,
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// Builds the kernel command line: the base (console, reboot and panic behavior) followed by the
/// device entries the VMM adds and the user's extra arguments.
///
/// # Errors
/// [`BootError::Cmdline`] if the result is longer than [`layout::CMDLINE_MAX_SIZE`] - 1 bytes or
/// contains a byte outside printable ASCII.
pub fn build_cmdline(parts: &[&str]) -> Result<String> {
    let line = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if line.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            line.len(),
            layout::CMDLINE_MAX_SIZE - 1
        )));
    }
    if let Some(bad) = line.bytes().find(|b| !(0x20..0x7f).contains(b)) {
        return Err(BootError::Cmdline(format!(
            "byte {bad:#04x} is not printable ASCII"
        )));
    }
    Ok(line)
}

/// Inputs of [`build_boot_params`].
#[derive(Clone, Debug)]
pub struct BootParamsInput {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command line length without the NUL, bytes.
    pub cmdline_len: usize,
    /// The loaded initrd, if any.
    pub initrd: Option<LoadedInitrd>,
    /// bzImage setup header, if the kernel is a bzImage.
    pub setup_header: Option<setup_header>,
    /// The e820 map.
    pub e820: Vec<E820Entry>,
    /// Guest address of the ACPI RSDP.
    pub rsdp_addr: u64,
}

/// `HdrS`, the setup-header magic.
const HDR_MAGIC: u32 = 0x5372_6448;
/// The boot-sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id: we are not in the kernel's list (boot protocol, `type_of_loader`).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment we advertise (16 MiB, the x86_64 default).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `loadflags` bit 0: the protected-mode code is loaded at 0x100000 ("LOADED_HIGH").
const LOADED_HIGH: u8 = 0x1;

/// Builds the zero page (`struct boot_params`) for the 64-bit boot protocol.
///
/// # Errors
/// [`BootError::TooManyE820Entries`], [`BootError::Cmdline`] if the command line does not fit in
/// 32 bits of address.
pub fn build_boot_params(input: &BootParamsInput) -> Result<boot_params> {
    let mut params = boot_params::default();
    if let Some(hdr) = input.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH;
    if input.setup_header.is_none() {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    let too_high = || BootError::Cmdline("command line address above 4 GiB".into());
    params.hdr.cmd_line_ptr = u32::try_from(input.cmdline_addr).map_err(|_| too_high())?;
    params.hdr.cmdline_size = u32::try_from(input.cmdline_len).map_err(|_| too_high())?;
    if let Some(initrd) = input.initrd {
        // place_initrd keeps the initrd below 4 GiB; the sizes are checked again here.
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr.raw_value()).map_err(|_| BootError::InitrdTooBig {
                size: initrd.size,
                limit: 1 << 32,
            })?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| BootError::InitrdTooBig {
                size: initrd.size,
                limit: 1 << 32,
            })?;
    }
    params.acpi_rsdp_addr = input.rsdp_addr;
    if input.e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(input.e820.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&input.e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = input.e820.len() as u8; // <= 128, checked above
    Ok(params)
}

/// Writes the command line and the zero page to their fixed addresses.
///
/// # Errors
/// [`BootError::GuestMemory`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    mut input: BootParamsInput,
) -> Result<()> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "the command line",
            source,
        })?;
    input.cmdline_addr = layout::CMDLINE_ADDR;
    input.cmdline_len = cmdline.len();
    let params = build_boot_params(&input)?;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            source,
        })
}

/// Total RAM in a memory map, bytes (for sanity checks and logs).
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn e820_for_small_guest() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: 127 * MIB,
                    kind: E820Type::Ram
                },
            ]
        );
    }

    #[test]
    fn e820_for_guest_above_the_gap_skips_the_gap() {
        let map = e820_map(4096 * MIB);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x100000,
                size: 0xc000_0000 - 0x100000,
                kind: E820Type::Ram
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820Type::Ram
            }
        );
        // RAM never overlaps the MMIO gap, the ACPI tables or the EBDA.
        for e in map.iter().filter(|e| e.kind == E820Type::Ram) {
            let end = e.addr + e.size;
            assert!(end <= layout::MMIO_GAP_START || e.addr >= layout::MMIO_GAP_END);
            assert!(end <= layout::EBDA_START || e.addr >= layout::ACPI_AREA_END);
        }
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 4096 * MIB - (layout::HIMEM_START - layout::EBDA_START));
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_e820_and_rsdp() {
        let input = BootParamsInput {
            cmdline_addr: layout::CMDLINE_ADDR,
            cmdline_len: 42,
            initrd: Some(LoadedInitrd {
                addr: GuestAddress(0x700_0000),
                size: 0x1234,
            }),
            setup_header: None,
            e820: e820_map(128 * MIB),
            rsdp_addr: layout::RSDP_ADDR,
        };
        let p = build_boot_params(&input).expect("boot params");
        assert_eq!({ p.hdr.header }, HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, layout::RSDP_ADDR);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 0x100000);
        assert_eq!({ p.e820_table[1].r#type }, 2);
    }

    #[test]
    fn too_many_e820_entries_are_rejected() {
        let input = BootParamsInput {
            cmdline_addr: 0,
            cmdline_len: 0,
            initrd: None,
            setup_header: None,
            e820: vec![
                E820Entry {
                    addr: 0,
                    size: 1,
                    kind: E820Type::Ram
                };
                129
            ],
            rsdp_addr: 0,
        };
        assert!(matches!(
            build_boot_params(&input),
            Err(BootError::TooManyE820Entries(129))
        ));
    }

    #[test]
    fn cmdline_is_joined_and_validated() {
        assert_eq!(
            build_cmdline(&[
                "console=ttyS0 reboot=k",
                "",
                " virtio_mmio.device=4K@0xd0000000:5 ",
                "quiet"
            ])
            .expect("valid"),
            "console=ttyS0 reboot=k virtio_mmio.device=4K@0xd0000000:5 quiet"
        );
        assert!(matches!(
            build_cmdline(&["a\nb"]),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(build_cmdline(&["é"]), Err(BootError::Cmdline(_))));
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&[&long]),
            Err(BootError::Cmdline(_))
        ));
        let fits = "x".repeat(layout::CMDLINE_MAX_SIZE - 1);
        assert_eq!(
            build_cmdline(&[&fits]).map(|s| s.len()).ok(),
            Some(layout::CMDLINE_MAX_SIZE - 1)
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_after_the_kernel() {
        let addr =
            place_initrd(0x1800, 0x200_0000, 128 * MIB, DEFAULT_INITRD_ADDR_MAX).expect("fits");
        assert_eq!(addr, 128 * MIB - 0x2000);
        assert_eq!(addr % 4096, 0);
        // Capped by initrd_addr_max.
        let addr = place_initrd(0x1000, 0x200_0000, 2048 * MIB, 0x3fff_ffff).expect("fits");
        assert_eq!(addr, 0x4000_0000 - 0x1000);
        // Would overlap the kernel.
        assert!(matches!(
            place_initrd(127 * MIB, 0x200_0000, 128 * MIB, DEFAULT_INITRD_ADDR_MAX),
            Err(BootError::InitrdTooBig { .. })
        ));
        assert!(matches!(
            place_initrd(u64::MAX, 0, 128 * MIB, u64::MAX),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn boot_params_are_written_to_the_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
        let input = BootParamsInput {
            cmdline_addr: 0,
            cmdline_len: 0,
            initrd: None,
            setup_header: None,
            e820: e820_map(2 << 20),
            rsdp_addr: layout::RSDP_ADDR,
        };
        write_boot_params(&mem, "console=ttyS0", input).expect("write");
        let p: boot_params = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_ADDR))
            .expect("read");
        assert_eq!({ p.hdr.cmdline_size }, 13);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&buf, b"console=ttyS0\0");
        assert_eq!(ram_size(&mem), 2 << 20);
    }

    fn write_file(dir: &Path, name: &str, bytes: &[u8], len: u64) -> PathBuf {
        use std::io::Write;
        let path = dir.join(name);
        let mut f = File::create(&path).expect("create");
        f.write_all(bytes).expect("write");
        f.set_len(len).expect("set_len");
        path
    }

    fn guest(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib * MIB) as usize)]).expect("memory")
    }

    #[test]
    fn a_small_vmlinux_loads_through_linux_loader() {
        use image::test_elf::{elf, load};
        let dir = tempfile::tempdir().expect("tempdir");
        let kstart = 16 * MIB;
        let mut img = elf(kstart, &[load(0x1000, kstart, 0x10, 0x2000)], 0x1010);
        img[0x1000..0x1010].copy_from_slice(b"sandbox kernel!!");
        let path = write_file(dir.path(), "vmlinux", &img, img.len() as u64);
        let mem = guest(64);
        let k = load_kernel(&mem, &path).expect("loads");
        assert_eq!(k.entry, GuestAddress(kstart));
        assert_eq!(k.end, kstart + 0x2000);
        assert!(k.setup_header.is_none());
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(kstart))
            .expect("read");
        assert_eq!(&got, b"sandbox kernel!!");
    }

    #[test]
    fn hostile_kernel_images_are_refused_before_loading() {
        use image::test_elf::{elf, load, note};
        use image::KernelImageError as E;
        let dir = tempfile::tempdir().expect("tempdir");
        let kstart = 16 * MIB;
        let mem = guest(64);
        let refused = |name: &str, bytes: &[u8], len: u64| -> image::KernelImageError {
            let path = write_file(dir.path(), name, bytes, len);
            match load_kernel(&mem, &path) {
                Err(BootError::KernelImage { path: p, source }) => {
                    assert_eq!(p, path);
                    source
                }
                other => panic!("{name}: {other:?}"),
            }
        };
        let img = elf(kstart, &[note(0x100, 0x10)], 0x200);
        assert!(matches!(refused("no-load", &img, 0x200), E::NothingToLoad));
        let img = elf(kstart + 0x100, &[load(0x100, kstart, 0x10, 0x1000)], 0x200);
        assert!(matches!(
            refused("entry", &img, 0x200),
            E::EntryOutsideLoaded { .. }
        ));
        // A sparse 4 GiB file whose PT_NOTE claims all of it.
        let img = elf(
            kstart,
            &[load(0x1000, kstart, 0x10, 0x10), note(0x2000, 4 << 30)],
            0x2000,
        );
        assert!(matches!(
            refused("sparse", &img, 0x2000 + (4 << 30)),
            E::FileTooLarge { .. }
        ));
        // The same note in a small file.
        assert!(matches!(
            refused("note", &img, 0x2000),
            E::NoteTooLarge { .. }
        ));
        let img = elf(kstart, &[load(0x1000, kstart, 0x10, 65 * MIB)], 0x2000);
        assert!(matches!(
            refused("big-segment", &img, 0x2000),
            E::OutsideRam { .. }
        ));
        assert!(matches!(
            refused("garbage", b"not a kernel", 4096),
            E::UnknownFormat
        ));
    }

    #[test]
    fn an_initrd_over_the_cap_is_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_file(dir.path(), "initrd", b"", MAX_INITRD_BYTES + 1);
        let kernel = LoadedKernel {
            entry: GuestAddress(16 * MIB),
            end: 17 * MIB,
            setup_header: None,
        };
        let mem = guest(64);
        assert!(matches!(
            load_initrd(&mem, &path, &kernel, 64 * MIB),
            Err(BootError::InitrdTooLarge { size, .. }) if size == MAX_INITRD_BYTES + 1
        ));
    }
}
