//! Guest RAM: anonymous mappings aligned to 2 MiB in the host, advised for transparent huge pages.
//!
//! KVM maps a guest page with a 2 MiB page-table entry only when the guest physical address and
//! the host virtual address are congruent modulo 2 MiB and the host backs it with a huge page.
//! `mmap(NULL, ...)` on the kernels we run (6.1) returns addresses aligned to 4 KiB only, so a
//! plain mapping makes every 2 MiB of guest RAM cost 512 separate nested page faults: about 5,000
//! of the ~8,000 exits of a boot (docs/bench.md). So each RAM range is mapped with 2 MiB of slack,
//! the unaligned head and tail are unmapped again, and the rest gets `MADV_HUGEPAGE`.
//!
//! vm-memory does not own such a mapping (it would unmap the wrong length), so [`GuestRam`] does:
//! it unmaps on drop, and its owner must drop it only after every thread that touches guest memory
//! has been joined (`VmHandle` keeps it as its last field and leaks it if a thread could not be
//! joined).

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::sys;

/// The host alignment of every guest RAM range, bytes (an x86_64 huge page).
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Errors mapping guest RAM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A range of zero bytes, or one whose guest address is not 2 MiB-aligned.
    #[error("Guest RAM range at {gpa:#x} of {len} bytes is empty or not 2 MiB-aligned.")]
    BadRange {
        /// Guest physical address.
        gpa: u64,
        /// Length, bytes.
        len: usize,
    },
    /// `mmap` failed (out of address space, or a memory limit).
    #[error("Cannot map {len} bytes of guest RAM.")]
    Map {
        /// Length, bytes.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// vm-memory refused the mapping or the set of regions.
    #[error("Cannot describe guest RAM to vm-memory: {0}.")]
    Region(String),
}

/// Guest RAM mappings owned by us: unmapped when dropped (see the module docs for when that is
/// allowed).
#[derive(Debug)]
pub struct GuestRam {
    /// `(host address, length)` of each mapping.
    maps: Vec<(usize, usize)>,
    leak: bool,
}

impl GuestRam {
    /// Maps `ranges` (guest physical address, length in bytes; both 2 MiB-aligned, as
    /// `layout::ram_ranges` gives them) and returns them as vm-memory regions plus their owner.
    ///
    /// # Errors
    /// [`MemoryError`].
    pub fn map(
        ranges: &[(GuestAddress, usize)],
    ) -> Result<(GuestMemoryMmap, GuestRam), MemoryError> {
        let mut ram = GuestRam {
            maps: Vec::with_capacity(ranges.len()),
            leak: false,
        };
        let mut regions = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            if len == 0 || gpa.0 % HUGE_PAGE_BYTES as u64 != 0 {
                return Err(MemoryError::BadRange { gpa: gpa.0, len });
            }
            let addr = sys::map_aligned_anonymous(len, HUGE_PAGE_BYTES)
                .map_err(|source| MemoryError::Map { len, source })?;
            ram.maps.push((addr, len));
            // Only advice: without THP (or with it set to `never`) the mapping still works.
            if let Err(err) = sys::advise_huge_pages(addr, len) {
                tracing::debug!(%err, "MADV_HUGEPAGE refused; guest RAM uses 4 KiB pages");
            }
            // SAFETY: `addr..addr + len` is a live private anonymous read-write mapping that
            // `ram` owns and unmaps only when dropped, which the owner does after every user of
            // the returned `GuestMemoryMmap` is gone (module docs).
            let builder = unsafe {
                MmapRegionBuilder::new(len)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                    .with_raw_mmap_pointer(addr as *mut u8)
            };
            let region = builder
                .build()
                .map_err(|e| MemoryError::Region(e.to_string()))?;
            let region = GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| MemoryError::Region(format!("range at {:#x} overflows", gpa.0)))?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok((memory, ram))
    }

    /// Keeps the mappings when dropped: for a VM one of whose threads could not be joined and may
    /// still touch guest memory. The memory goes back to the OS when the process exits.
    pub fn leak_on_drop(&mut self) {
        self.leak = true;
    }

    /// Host address and length of each mapping (for tests and diagnostics).
    pub fn mappings(&self) -> &[(usize, usize)] {
        &self.maps
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        for &(addr, len) in &self.maps {
            // SAFETY: each mapping was made by `map` and is unmapped exactly once, here; the
            // owner drops `GuestRam` only after every thread using it was joined.
            if let Err(err) = unsafe { sys::unmap(addr, len) } {
                tracing::warn!(%err, addr, len, "munmap of guest RAM failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn mapped(addr: usize) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        maps.lines().any(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap_or(0),
                usize::from_str_radix(b, 16).unwrap_or(0),
            );
            a <= addr && addr < b
        })
    }

    #[test]
    fn ranges_are_2_mib_aligned_in_the_host_usable_and_unmapped_on_drop() {
        let ranges = [(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let (mem, ram) = GuestRam::map(&ranges).expect("map");
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress((6 << 20) - 4))
            .expect("last bytes of the first range");
        mem.write_obj(7u8, GuestAddress((1 << 32) + (2 << 20) - 1))
            .expect("last byte of the second range");
        assert!(
            mem.write_obj(1u8, GuestAddress(6 << 20)).is_err(),
            "past the range"
        );
        let addrs: Vec<usize> = ram.mappings().iter().map(|m| m.0).collect();
        assert!(addrs.iter().all(|&a| mapped(a)));
        drop(mem);
        drop(ram);
        assert!(addrs.iter().all(|&a| !mapped(a)), "unmapped on drop");
    }

    #[test]
    fn leaked_mappings_stay() {
        let (mem, mut ram) = GuestRam::map(&[(GuestAddress(0), 2 << 20)]).expect("map");
        let addr = ram.mappings()[0].0;
        ram.leak_on_drop();
        drop(ram);
        assert!(mapped(addr));
        mem.write_obj(1u8, GuestAddress(0)).expect("still usable");
    }

    #[test]
    fn unaligned_or_empty_ranges_are_refused() {
        for range in [(GuestAddress(4096), 2 << 20), (GuestAddress(0), 0)] {
            assert!(matches!(
                GuestRam::map(&[range]),
                Err(MemoryError::BadRange { .. })
            ));
        }
    }
}
