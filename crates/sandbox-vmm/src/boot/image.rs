//! Checks a kernel image before linux-loader reads it.
//!
//! linux-loader trusts the image: an ELF without a `PT_LOAD` segment "loads" and the VM runs
//! zeroed memory; a `PT_NOTE` of gigabytes (a sparse file costs nothing on disk) is walked twelve
//! bytes at a time for minutes; a segment larger than guest RAM is read until it runs off the end.
//! [`check_kernel_image`] reads only the headers (at most [`MAX_HEADER_READ`] bytes), checks them
//! with checked arithmetic against [`ImageLimits`] and guest memory, and names what is wrong in a
//! [`KernelImageError`]. Only an image that passes is handed to linux-loader, whose work is then
//! bounded by the limits.
//!
//! ELF layout: System V gABI, "ELF Header" and "Program Header"; bzImage: the Linux boot protocol
//! (`Documentation/arch/x86/boot.rst`, "The Real-Mode Kernel Header").

use std::io::{self, Read, Seek, SeekFrom};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout;

/// Bounds on what a kernel image may ask the loader to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest image file, bytes.
    pub max_file: u64,
    /// Most bytes the image may occupy in guest memory: the sum of the ELF `PT_LOAD` memory sizes,
    /// or a bzImage's protected-mode code.
    pub max_load: u64,
    /// Largest `PT_NOTE` segment, bytes (linux-loader walks it note by note).
    pub max_note: u64,
    /// Most ELF program headers.
    pub max_program_headers: u16,
}

impl ImageLimits {
    /// The limits [`super::load_kernel`] uses. A `vmlinux` has about five program headers, a few
    /// KiB of notes and tens of MiB of segments; even one with full debug info is far below 2 GiB.
    pub const DEFAULT: Self = Self {
        max_file: 2 << 30,
        max_load: 512 << 20,
        max_note: 64 << 10,
        max_program_headers: 64,
    };
}

/// Size of the ELF64 file header, bytes.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header, bytes.
const PHDR_SIZE: usize = 56;
/// `PT_LOAD`: a segment to load.
const PT_LOAD: u32 = 1;
/// `PT_NOTE`: auxiliary notes (linux-loader looks for the PVH entry note there).
const PT_NOTE: u32 = 4;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// Offset of the bzImage setup header fields we read (`setup_sects`), and their end.
const BZ_HEADER_START: u64 = 0x1f1;
const BZ_HEADER_END: u64 = 0x218;

/// The most bytes [`check_kernel_image`] reads with [`ImageLimits::DEFAULT`]: the ELF header and
/// up to 64 program headers (a bzImage needs less).
pub const MAX_HEADER_READ: u64 = EHDR_SIZE as u64 + 64 * PHDR_SIZE as u64;

/// Why a kernel image is refused.
#[derive(Debug, thiserror::Error)]
pub enum KernelImageError {
    /// The image file cannot be read.
    #[error("cannot read the image headers")]
    Read(#[source] io::Error),
    /// The file is larger than [`ImageLimits::max_file`].
    #[error("the image is {size} bytes, more than the {limit}-byte limit for a kernel")]
    FileTooLarge {
        /// File size, bytes.
        size: u64,
        /// The limit, bytes.
        limit: u64,
    },
    /// Neither an ELF file nor a bzImage (no `HdrS` magic at 0x202).
    #[error("not a vmlinux ELF file nor a bzImage")]
    UnknownFormat,
    /// The ELF file header is unusable.
    #[error("invalid ELF header: {0}")]
    BadElfHeader(&'static str),
    /// More program headers than [`ImageLimits::max_program_headers`].
    #[error("the ELF file has {count} program headers, more than {limit}")]
    TooManyProgramHeaders {
        /// `e_phnum`.
        count: u16,
        /// The limit.
        limit: u16,
    },
    /// The program header table runs past the end of the file.
    #[error(
        "the program header table at {offset:#x} runs past the end of the {file_len}-byte file"
    )]
    ProgramHeadersOutsideFile {
        /// `e_phoff`.
        offset: u64,
        /// File size, bytes.
        file_len: u64,
    },
    /// A segment's file contents run past the end of the file.
    #[error("program header {index}: {size:#x} bytes at file offset {offset:#x} run past the end of the {file_len}-byte file")]
    SegmentOutsideFile {
        /// Program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
        /// File size, bytes.
        file_len: u64,
    },
    /// A `PT_NOTE` larger than [`ImageLimits::max_note`].
    #[error("program header {index}: a {size}-byte PT_NOTE, more than the {limit}-byte limit")]
    NoteTooLarge {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        size: u64,
        /// The limit, bytes.
        limit: u64,
    },
    /// A `PT_LOAD` whose file size exceeds its memory size.
    #[error("program header {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSizeAboveMemSize {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// The image would occupy more guest memory than [`ImageLimits::max_load`].
    #[error("the kernel needs {size} bytes of guest memory, more than the {limit}-byte limit")]
    LoadTooLarge {
        /// Bytes (sum of `p_memsz`, or the bzImage payload).
        size: u64,
        /// The limit, bytes.
        limit: u64,
    },
    /// A segment (or a bzImage's code) would land below 1 MiB, in the MMIO gap, past the end of
    /// guest RAM, or wrap around.
    #[error("the kernel range {start:#x} + {size:#x} bytes is not guest RAM at or above 1 MiB")]
    OutsideRam {
        /// First guest-physical byte.
        start: u64,
        /// Size, bytes.
        size: u64,
    },
    /// No `PT_LOAD` segment has file contents: the VM would run zeroed memory.
    #[error("the ELF file has no PT_LOAD segment with contents: nothing to run")]
    NothingToLoad,
    /// The entry point is not inside the loaded contents of any `PT_LOAD` segment.
    #[error("the entry point {entry:#x} is outside every loaded segment")]
    EntryOutsideLoaded {
        /// `e_entry`.
        entry: u64,
    },
    /// The bzImage setup area is larger than the file.
    #[error("the bzImage setup area ({setup} bytes) is not smaller than the {file_len}-byte file")]
    BzImageTruncated {
        /// Setup size, bytes.
        setup: u64,
        /// File size, bytes.
        file_len: u64,
    },
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, KernelImageError>;

/// What kind of kernel passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A `vmlinux` ELF, loaded at its segments' physical addresses.
    Elf {
        /// `e_entry`, inside a loaded segment.
        entry: u64,
    },
    /// A bzImage, loaded at `code32_start`.
    BzImage,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads `buf.len()` bytes at `offset`.
fn read_at<R: Read + Seek>(image: &mut R, offset: u64, buf: &mut [u8]) -> Result<()> {
    image
        .seek(SeekFrom::Start(offset))
        .and_then(|_| image.read_exact(buf))
        .map_err(KernelImageError::Read)
}

/// Whether `[start, start + size)` is guest RAM at or above [`layout::HIMEM_START`].
fn in_ram<M: GuestMemoryBackend>(mem: &M, start: u64, size: u64) -> Result<()> {
    let ok = start >= layout::HIMEM_START
        && start.checked_add(size).is_some()
        && usize::try_from(size).is_ok_and(|len| mem.check_range(GuestAddress(start), len));
    if ok {
        Ok(())
    } else {
        Err(KernelImageError::OutsideRam { start, size })
    }
}

/// Checks the kernel image `image` of `file_len` bytes against `limits` and guest memory `mem`
/// and says how to load it. Reads only headers: the first 64 bytes, then either the ELF program
/// header table (at most `max_program_headers` × 56 bytes) or the bzImage setup header fields
/// (0x1f1..0x218). Nothing is written to guest memory.
///
/// # Errors
/// A [`KernelImageError`] naming the first problem found.
pub fn check_kernel_image<R: Read + Seek, M: GuestMemoryBackend>(
    image: &mut R,
    file_len: u64,
    mem: &M,
    limits: &ImageLimits,
) -> Result<KernelFormat> {
    if file_len > limits.max_file {
        return Err(KernelImageError::FileTooLarge {
            size: file_len,
            limit: limits.max_file,
        });
    }
    let mut ident = [0u8; 4];
    if file_len >= 4 {
        read_at(image, 0, &mut ident)?;
    }
    if ident == *b"\x7fELF" {
        check_elf(image, file_len, mem, limits)
    } else {
        check_bzimage(image, file_len, mem, limits)
    }
}

fn check_elf<R: Read + Seek, M: GuestMemoryBackend>(
    image: &mut R,
    file_len: u64,
    mem: &M,
    limits: &ImageLimits,
) -> Result<KernelFormat> {
    use KernelImageError as E;
    if file_len < EHDR_SIZE as u64 {
        return Err(E::BadElfHeader("the file is shorter than an ELF64 header"));
    }
    let mut ehdr = [0u8; EHDR_SIZE];
    read_at(image, 0, &mut ehdr)?;
    if ehdr[4] != 2 {
        return Err(E::BadElfHeader("not a 64-bit ELF file"));
    }
    if ehdr[5] != 1 {
        return Err(E::BadElfHeader("not a little-endian ELF file"));
    }
    if u16_at(&ehdr, 0x12) != EM_X86_64 {
        return Err(E::BadElfHeader("not an x86_64 ELF file"));
    }
    let entry = u64_at(&ehdr, 0x18);
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36);
    let phnum = u16_at(&ehdr, 0x38);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(E::BadElfHeader("program header size is not 56 bytes"));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(E::BadElfHeader("program headers overlap the ELF header"));
    }
    if phnum > limits.max_program_headers {
        return Err(E::TooManyProgramHeaders {
            count: phnum,
            limit: limits.max_program_headers,
        });
    }
    let table_len = usize::from(phnum) * PHDR_SIZE; // <= 65535 * 56, no overflow
    if phoff
        .checked_add(table_len as u64)
        .is_none_or(|end| end > file_len)
    {
        return Err(E::ProgramHeadersOutsideFile {
            offset: phoff,
            file_len,
        });
    }
    let mut table = vec![0u8; table_len];
    read_at(image, phoff, &mut table)?;

    let mut loaded = 0u64;
    let mut any_loaded = false;
    let mut entry_loaded = false;
    for (index, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let p_type = u32_at(ph, 0);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        let outside_file = || E::SegmentOutsideFile {
            index,
            offset,
            size: filesz,
            file_len,
        };
        match p_type {
            PT_NOTE => {
                if filesz > limits.max_note {
                    return Err(E::NoteTooLarge {
                        index,
                        size: filesz,
                        limit: limits.max_note,
                    });
                }
                if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
                    return Err(outside_file());
                }
            }
            // linux-loader skips a PT_LOAD without file contents (and so do we).
            PT_LOAD if filesz > 0 => {
                if filesz > memsz {
                    return Err(E::FileSizeAboveMemSize {
                        index,
                        filesz,
                        memsz,
                    });
                }
                loaded = loaded.saturating_add(memsz);
                if loaded > limits.max_load {
                    return Err(E::LoadTooLarge {
                        size: loaded,
                        limit: limits.max_load,
                    });
                }
                if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
                    return Err(outside_file());
                }
                in_ram(mem, paddr, memsz)?;
                any_loaded = true;
                // paddr + filesz cannot overflow: in_ram checked paddr + memsz.
                entry_loaded |= (paddr..paddr + filesz).contains(&entry);
            }
            _ => {}
        }
    }
    if !any_loaded {
        return Err(E::NothingToLoad);
    }
    if !entry_loaded {
        return Err(E::EntryOutsideLoaded { entry });
    }
    Ok(KernelFormat::Elf { entry })
}

fn check_bzimage<R: Read + Seek, M: GuestMemoryBackend>(
    image: &mut R,
    file_len: u64,
    mem: &M,
    limits: &ImageLimits,
) -> Result<KernelFormat> {
    use KernelImageError as E;
    if file_len < BZ_HEADER_END {
        return Err(E::UnknownFormat);
    }
    let mut hdr = [0u8; (BZ_HEADER_END - BZ_HEADER_START) as usize];
    read_at(image, BZ_HEADER_START, &mut hdr)?;
    let at = |offset: u64| (offset - BZ_HEADER_START) as usize;
    if u32_at(&hdr, at(0x202)) != 0x5372_6448 {
        return Err(E::UnknownFormat);
    }
    // setup_sects of 0 means 4 (boot protocol); the setup area is that many sectors after the
    // boot sector, and the protected-mode code is the rest of the file (as linux-loader reads it).
    let setup_sects = match hdr[at(0x1f1)] {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (setup_sects + 1) * 512;
    let payload = file_len
        .checked_sub(setup)
        .filter(|&p| p > 0)
        .ok_or(E::BzImageTruncated { setup, file_len })?;
    if payload > limits.max_load {
        return Err(E::LoadTooLarge {
            size: payload,
            limit: limits.max_load,
        });
    }
    let code32_start = u64::from(u32_at(&hdr, at(0x214)));
    in_ram(mem, code32_start, payload)?;
    Ok(KernelFormat::BzImage)
}

/// Test support: hand-built ELF images.
#[cfg(test)]
pub(crate) mod test_elf {
    use super::{EHDR_SIZE, EM_X86_64, PHDR_SIZE, PT_LOAD, PT_NOTE};

    #[derive(Clone, Copy)]
    pub(crate) struct Phdr {
        pub(crate) p_type: u32,
        pub(crate) offset: u64,
        pub(crate) paddr: u64,
        pub(crate) filesz: u64,
        pub(crate) memsz: u64,
    }

    pub(crate) fn load(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Phdr {
        Phdr {
            p_type: PT_LOAD,
            offset,
            paddr,
            filesz,
            memsz,
        }
    }

    pub(crate) fn note(offset: u64, filesz: u64) -> Phdr {
        Phdr {
            p_type: PT_NOTE,
            offset,
            paddr: 0,
            filesz,
            memsz: 0,
        }
    }

    /// An ELF64 x86_64 header and program header table (at offset 64), then zeros up to `len`.
    pub(crate) fn elf(entry: u64, phdrs: &[Phdr], len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(EHDR_SIZE + phdrs.len() * PHDR_SIZE)];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // ELFDATA2LSB
        b[6] = 1; // EV_CURRENT
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, p) in phdrs.iter().enumerate() {
            let o = EHDR_SIZE + i * PHDR_SIZE;
            b[o..o + 4].copy_from_slice(&p.p_type.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&p.offset.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&p.paddr.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&p.paddr.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&p.filesz.to_le_bytes());
            b[o + 40..o + 48].copy_from_slice(&p.memsz.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Cursor, Write};

    use vm_memory::GuestMemoryMmap;

    use super::test_elf::{elf, load, note, Phdr};
    use super::*;

    const MIB: u64 = 1 << 20;

    /// 64 MiB of guest RAM at 0 (the kernel loads at 16 MiB).
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory")
    }

    /// A reader that records the furthest byte it was asked to read.
    struct Tracking<R> {
        inner: R,
        pos: u64,
        furthest: u64,
    }

    impl<R> Tracking<R> {
        fn new(inner: R) -> Self {
            Self {
                inner,
                pos: 0,
                furthest: 0,
            }
        }
    }

    impl<R: Read> Read for Tracking<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.pos += n as u64;
            self.furthest = self.furthest.max(self.pos);
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Tracking<R> {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.pos = self.inner.seek(to)?;
            Ok(self.pos)
        }
    }

    fn check(bytes: &[u8]) -> Result<KernelFormat> {
        let mut r = Tracking::new(Cursor::new(bytes));
        let res = check_kernel_image(&mut r, bytes.len() as u64, &mem(), &ImageLimits::DEFAULT);
        assert!(r.furthest <= MAX_HEADER_READ, "read {} bytes", r.furthest);
        res
    }

    const KSTART: u64 = 16 * MIB;

    #[test]
    fn a_plausible_vmlinux_passes() {
        let img = elf(
            KSTART,
            &[
                load(0x1000, KSTART, 0x2000, 0x2000),
                note(0x3000, 0x100),
                load(0x3000, KSTART + 0x2000, 0x100, 0x10_0000), // with bss
                load(0x3000, 0, 0, 0x1000), // no contents: skipped, like linux-loader does
            ],
            0x4000,
        );
        assert_eq!(
            check(&img).expect("valid"),
            KernelFormat::Elf { entry: KSTART }
        );
    }

    #[test]
    fn an_elf_without_load_segments_is_refused() {
        let img = elf(KSTART, &[note(0x1000, 0x10)], 0x2000);
        assert!(matches!(check(&img), Err(KernelImageError::NothingToLoad)));
        let img = elf(KSTART, &[], 0x100);
        assert!(matches!(check(&img), Err(KernelImageError::NothingToLoad)));
        // A PT_LOAD with no file contents loads nothing either.
        let img = elf(KSTART, &[load(0x1000, KSTART, 0, 0x1000)], 0x2000);
        assert!(matches!(check(&img), Err(KernelImageError::NothingToLoad)));
    }

    #[test]
    fn an_entry_outside_the_loaded_bytes_is_refused() {
        for entry in [KSTART - 1, KSTART + 0x1000, KSTART + 0x2000, 0] {
            // memsz covers KSTART + 0x1000.. (bss), but only filesz bytes are loaded.
            let img = elf(entry, &[load(0x1000, KSTART, 0x1000, 0x3000)], 0x2000);
            assert!(
                matches!(check(&img), Err(KernelImageError::EntryOutsideLoaded { entry: e }) if e == entry),
                "{entry:#x}"
            );
        }
    }

    #[test]
    fn a_segment_larger_than_guest_ram_is_refused_before_any_read() {
        let img = elf(KSTART, &[load(0x1000, KSTART, 0x1000, 128 * MIB)], 0x2000);
        assert!(matches!(
            check(&img),
            Err(KernelImageError::OutsideRam { start: KSTART, size }) if size == 128 * MIB
        ));
        // Past the load limit: refused on size alone.
        let img = elf(KSTART, &[load(0x1000, KSTART, 0x1000, 4 << 30)], 0x2000);
        assert!(matches!(
            check(&img),
            Err(KernelImageError::LoadTooLarge { .. })
        ));
        // Wrapping around the address space.
        let img = elf(
            KSTART,
            &[
                load(0x1000, KSTART, 0x1000, 0x1000),
                load(0x1000, u64::MAX - 0x10, 0x100, 0x100),
            ],
            0x2000,
        );
        assert!(matches!(
            check(&img),
            Err(KernelImageError::OutsideRam { .. })
        ));
        // File contents past the end of the file.
        let img = elf(
            KSTART,
            &[load(0x1000, KSTART, 0x10_0000, 0x10_0000)],
            0x2000,
        );
        assert!(matches!(
            check(&img),
            Err(KernelImageError::SegmentOutsideFile { index: 0, .. })
        ));
        let img = elf(KSTART, &[load(0x1000, KSTART, 0x2000, 0x1000)], 0x4000);
        assert!(matches!(
            check(&img),
            Err(KernelImageError::FileSizeAboveMemSize { .. })
        ));
    }

    #[test]
    fn segments_below_1_mib_or_in_the_mmio_gap_are_refused() {
        let img = elf(0x8000, &[load(0x1000, 0x7000, 0x1000, 0x1000)], 0x2000);
        assert!(matches!(
            check(&img),
            Err(KernelImageError::OutsideRam { start: 0x7000, .. })
        ));
        // A guest with RAM on both sides of the gap: a segment inside it, or across its start.
        let big: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), layout::MMIO_GAP_START as usize),
            (GuestAddress(layout::MMIO_GAP_END), 0x10_0000),
        ])
        .expect("memory");
        for (paddr, memsz) in [
            (layout::MMIO_GAP_START, 0x1000),
            (layout::MMIO_GAP_START - 0x1000, 0x2000),
        ] {
            let img = elf(paddr, &[load(0x1000, paddr, 0x1000, memsz)], 0x2000);
            let res = check_kernel_image(
                &mut Cursor::new(&img),
                img.len() as u64,
                &big,
                &ImageLimits::DEFAULT,
            );
            assert!(
                matches!(res, Err(KernelImageError::OutsideRam { .. })),
                "{paddr:#x}: {res:?}"
            );
        }
    }

    #[test]
    fn a_huge_note_is_refused_before_linux_loader_walks_it() {
        let img = elf(
            KSTART,
            &[load(0x1000, KSTART, 0x1000, 0x1000), note(0x1000, 4 << 30)],
            0x2000,
        );
        assert!(matches!(
            check(&img),
            Err(KernelImageError::NoteTooLarge { index: 1, size, .. }) if size == 4 << 30
        ));
    }

    #[test]
    fn a_sparse_4_gib_file_is_refused_from_its_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinux");
        let mut f = File::create(&path).expect("create");
        let img = elf(
            KSTART,
            &[load(0x1000, KSTART, 0x1000, 0x1000), note(0x2000, 4 << 30)],
            0x2000,
        );
        f.write_all(&img).expect("write");
        f.set_len(0x2000 + (4 << 30)).expect("sparse length");
        drop(f);
        let len = std::fs::metadata(&path).expect("metadata").len();
        // With the default limits, the file size alone refuses it.
        let mut r = Tracking::new(File::open(&path).expect("open"));
        let res = check_kernel_image(&mut r, len, &mem(), &ImageLimits::DEFAULT);
        assert!(matches!(res, Err(KernelImageError::FileTooLarge { size, .. }) if size == len));
        assert_eq!(r.furthest, 0);
        // Without a file limit, the 4 GiB note is refused after reading the headers only.
        let limits = ImageLimits {
            max_file: u64::MAX,
            ..ImageLimits::DEFAULT
        };
        let mut r = Tracking::new(File::open(&path).expect("open"));
        let res = check_kernel_image(&mut r, len, &mem(), &limits);
        assert!(
            matches!(res, Err(KernelImageError::NoteTooLarge { .. })),
            "{res:?}"
        );
        assert!(r.furthest <= (EHDR_SIZE + 2 * PHDR_SIZE) as u64);
    }

    #[test]
    fn bad_elf_headers_are_refused() {
        let good = elf(KSTART, &[load(0x1000, KSTART, 0x1000, 0x1000)], 0x2000);
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut b = good.clone();
        b[4] = 1;
        cases.push((b, "64-bit"));
        let mut b = good.clone();
        b[5] = 2;
        cases.push((b, "little-endian"));
        let mut b = good.clone();
        b[0x12] = 3;
        cases.push((b, "x86_64"));
        let mut b = good.clone();
        b[0x36] = 32;
        cases.push((b, "56 bytes"));
        let mut b = good.clone();
        b[0x20..0x28].copy_from_slice(&8u64.to_le_bytes());
        cases.push((b, "overlap"));
        cases.push((good[..40].to_vec(), "shorter"));
        for (img, what) in cases {
            match check(&img) {
                Err(KernelImageError::BadElfHeader(msg)) => assert!(msg.contains(what), "{msg}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        let mut b = good.clone();
        b[0x20..0x28].copy_from_slice(&0x1fe0u64.to_le_bytes());
        assert!(matches!(
            check(&b),
            Err(KernelImageError::ProgramHeadersOutsideFile { .. })
        ));
        let mut b = good;
        b[0x38..0x3a].copy_from_slice(&65u16.to_le_bytes());
        assert!(matches!(
            check(&b),
            Err(KernelImageError::TooManyProgramHeaders { count: 65, .. })
        ));
    }

    /// A bzImage header: `setup_sects`, `HdrS`, `code32_start`, then zeros up to `len`.
    fn bzimage(setup_sects: u8, code32_start: u32, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0x1f1] = setup_sects;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
        b
    }

    #[test]
    fn bzimages_are_checked_for_size_and_placement() {
        assert_eq!(
            check(&bzimage(4, 0x10_0000, 0x4000)).expect("valid"),
            KernelFormat::BzImage
        );
        assert!(matches!(
            check(&bzimage(60, 0x10_0000, 0x4000)),
            Err(KernelImageError::BzImageTruncated { setup, .. }) if setup == 61 * 512
        ));
        assert!(matches!(
            check(&bzimage(4, 0x1000, 0x4000)),
            Err(KernelImageError::OutsideRam { start: 0x1000, .. })
        ));
        assert!(matches!(
            check(&bzimage(4, 0xffff_f000, 0x4000)),
            Err(KernelImageError::OutsideRam { .. })
        ));
        let mut not_hdrs = bzimage(4, 0x10_0000, 0x4000);
        not_hdrs[0x202] = b'X';
        assert!(matches!(
            check(&not_hdrs),
            Err(KernelImageError::UnknownFormat)
        ));
        assert!(matches!(
            check(b"\x7fEL"),
            Err(KernelImageError::UnknownFormat)
        ));
        assert!(matches!(check(&[]), Err(KernelImageError::UnknownFormat)));
    }

    proptest::proptest! {
        /// Arbitrary headers never panic, never read past the header bound, and whatever passes
        /// has every loaded segment in guest RAM above 1 MiB with the entry inside one.
        #[test]
        fn arbitrary_elf_headers_are_checked_without_panics(
            entry in proptest::prop_oneof![0u64..0x400_0000, proptest::num::u64::ANY],
            phdrs in proptest::collection::vec(
                (
                    proptest::prop_oneof![proptest::strategy::Just(PT_LOAD), proptest::strategy::Just(PT_NOTE), 0u32..8],
                    proptest::prop_oneof![0u64..0x3000, proptest::num::u64::ANY],
                    proptest::prop_oneof![0u64..0x400_0000, proptest::num::u64::ANY],
                    proptest::prop_oneof![0u64..0x3000, proptest::num::u64::ANY],
                    proptest::prop_oneof![0u64..0x10_0000, proptest::num::u64::ANY],
                ),
                0..8,
            ),
            len in 0usize..0x3000,
        ) {
            let phdrs: Vec<Phdr> = phdrs
                .into_iter()
                .map(|(p_type, offset, paddr, filesz, memsz)| Phdr { p_type, offset, paddr, filesz, memsz })
                .collect();
            let img = elf(entry, &phdrs, len);
            if let Ok(KernelFormat::Elf { entry }) = check(&img) {
                let m = mem();
                let mut entry_in = false;
                for p in phdrs.iter().filter(|p| p.p_type == PT_LOAD && p.filesz > 0) {
                    proptest::prop_assert!(p.paddr >= layout::HIMEM_START);
                    proptest::prop_assert!(m.check_range(GuestAddress(p.paddr), p.memsz as usize));
                    proptest::prop_assert!(p.filesz <= p.memsz);
                    proptest::prop_assert!(p.offset + p.filesz <= img.len() as u64);
                    entry_in |= entry >= p.paddr && entry - p.paddr < p.filesz;
                }
                proptest::prop_assert!(entry_in);
            }
        }
    }
}
