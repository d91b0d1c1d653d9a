//! Bounded walking of split-virtqueue descriptor chains (virtio 1.2 §2.7.5).
//!
//! `virtio-queue` follows `next` links and indirect tables; this module caps how many descriptors
//! a device accepts from one chain (the queue size, so a looping or huge indirect chain cannot make
//! a device spin or allocate), checks every buffer as a whole against guest memory with checked
//! arithmetic, and copies bytes in and out across descriptor boundaries.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Errors of descriptor-chain walking.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain has more descriptors than the device accepts.
    #[error("descriptor chain longer than {max} descriptors.")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A buffer does not lie entirely in guest memory (or its end overflows).
    #[error("descriptor buffer at {addr:#x} of {len} bytes is outside guest memory.")]
    OutOfRange {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Guest memory access failed.
    #[error("guest memory access failed.")]
    Memory(#[source] GuestMemoryError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ChainError>;

/// One descriptor of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDesc {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Buffer length in bytes.
    pub len: u32,
    /// The device may write (and must not read) this buffer (VIRTQ_DESC_F_WRITE).
    pub write_only: bool,
}

/// Collects the descriptors of `chain` into `out` (cleared first), at most `max` of them.
///
/// # Errors
/// [`ChainError::TooLong`] if the chain has more than `max` descriptors; `out` then holds the
/// first `max`. The walk itself never loops forever: `virtio-queue` bounds it too.
pub fn collect<M>(chain: DescriptorChain<M>, max: usize, out: &mut Vec<ChainDesc>) -> Result<()>
where
    M: Deref,
    M::Target: GuestMemory,
{
    out.clear();
    for desc in chain {
        if out.len() == max {
            return Err(ChainError::TooLong { max });
        }
        out.push(ChainDesc {
            addr: desc.addr(),
            len: desc.len(),
            write_only: desc.is_write_only(),
        });
    }
    Ok(())
}

/// Checks that every buffer in `descs` lies entirely inside guest memory.
///
/// # Errors
/// [`ChainError::OutOfRange`] naming the first bad buffer.
pub fn check_ranges<M: GuestMemory>(mem: &M, descs: &[ChainDesc]) -> Result<()> {
    for d in descs {
        let perm = if d.write_only {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let ok = d.addr.0.checked_add(u64::from(d.len)).is_some()
            && (d.len == 0 || mem.check_range(d.addr, d.len as usize, perm));
        if !ok {
            return Err(ChainError::OutOfRange {
                addr: d.addr.0,
                len: d.len,
            });
        }
    }
    Ok(())
}

/// Sum of the lengths of `descs`, in bytes (cannot overflow a u64: at most 65536 × u32::MAX).
pub fn total_len(descs: &[ChainDesc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

/// Reads up to `buf.len()` bytes from the concatenation of `descs`, starting `offset` bytes in.
/// Returns how many bytes were copied (fewer when the buffers end first).
///
/// # Errors
/// [`ChainError::Memory`] if guest memory cannot be read.
pub fn read_at<M: GuestMemory>(
    mem: &M,
    descs: &[ChainDesc],
    offset: u64,
    buf: &mut [u8],
) -> Result<usize> {
    let mut done = 0usize;
    for_each_span(descs, offset, buf.len(), |addr, start, len| {
        mem.read_slice(&mut buf[start..start + len], addr)
            .map_err(ChainError::Memory)?;
        done = start + len;
        Ok(())
    })?;
    Ok(done)
}

/// Writes up to `buf.len()` bytes into the concatenation of `descs`, starting `offset` bytes in.
/// Returns how many bytes were copied.
///
/// # Errors
/// [`ChainError::Memory`] if guest memory cannot be written.
pub fn write_at<M: GuestMemory>(
    mem: &M,
    descs: &[ChainDesc],
    offset: u64,
    buf: &[u8],
) -> Result<usize> {
    let mut done = 0usize;
    for_each_span(descs, offset, buf.len(), |addr, start, len| {
        mem.write_slice(&buf[start..start + len], addr)
            .map_err(ChainError::Memory)?;
        done = start + len;
        Ok(())
    })?;
    Ok(done)
}

/// Calls `f(guest_addr, buf_start, len)` for each piece of `[offset, offset + count)` of the
/// concatenated buffers, in order.
fn for_each_span<F>(descs: &[ChainDesc], offset: u64, count: usize, mut f: F) -> Result<()>
where
    F: FnMut(GuestAddress, usize, usize) -> Result<()>,
{
    let mut skip = offset;
    let mut copied = 0usize;
    for d in descs {
        if copied == count {
            break;
        }
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = len - skip;
        let n = usize::try_from(avail)
            .unwrap_or(usize::MAX)
            .min(count - copied);
        let addr = d.addr.checked_add(skip).ok_or(ChainError::OutOfRange {
            addr: d.addr.0,
            len: d.len,
        })?;
        f(addr, copied, n)?;
        copied += n;
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{mem, TestQueue};

    #[test]
    fn reads_and_writes_across_descriptor_boundaries() {
        let m = mem();
        let descs = [
            ChainDesc {
                addr: GuestAddress(0x1_0000),
                len: 3,
                write_only: true,
            },
            ChainDesc {
                addr: GuestAddress(0x2_0000),
                len: 5,
                write_only: true,
            },
        ];
        assert_eq!(write_at(&m, &descs, 1, b"abcdefghij").expect("write"), 7);
        let mut out = [0u8; 8];
        assert_eq!(read_at(&m, &descs, 0, &mut out).expect("read"), 8);
        assert_eq!(&out, b"\0abcdefg");
        assert_eq!(total_len(&descs), 8);
    }

    #[test]
    fn ranges_outside_memory_or_overflowing_are_refused() {
        let m = mem();
        let end = ChainDesc {
            addr: GuestAddress(0x10_0000 - 4),
            len: 8,
            write_only: false,
        };
        assert!(matches!(
            check_ranges(&m, &[end]),
            Err(ChainError::OutOfRange { .. })
        ));
        let wrap = ChainDesc {
            addr: GuestAddress(u64::MAX - 2),
            len: 8,
            write_only: true,
        };
        assert!(matches!(
            check_ranges(&m, &[wrap]),
            Err(ChainError::OutOfRange { .. })
        ));
        let ok = ChainDesc {
            addr: GuestAddress(0x1000),
            len: 8,
            write_only: true,
        };
        assert!(matches!(check_ranges(&m, &[ok]), Ok(())));
    }

    #[test]
    fn a_looping_chain_is_bounded() {
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 8);
        // Descriptor 0 points at itself forever.
        q.write_desc(
            &m,
            0,
            0x4_0000,
            16,
            crate::devices::virtio::test_utils::F_NEXT,
            0,
        );
        q.push_avail(&m, 0);
        let mut queue = q.queue();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &m).expect("chain");
        let mut out = Vec::new();
        // virtio-queue stops after `size` descriptors; our cap of 4 stops earlier.
        assert!(matches!(
            collect(chain.clone(), 4, &mut out),
            Err(ChainError::TooLong { max: 4 })
        ));
        assert_eq!(out.len(), 4);
        collect(chain, 64, &mut out).expect("bounded by the queue size");
        assert_eq!(out.len(), 8);
    }

    #[test]
    fn a_huge_indirect_table_is_capped() {
        use crate::devices::virtio::test_utils::{F_INDIRECT, F_NEXT};
        let m = mem();
        let mut q = TestQueue::new(&m, 0, 8);
        // An indirect table of 1000 linked descriptors (we never offer INDIRECT_DESC, but
        // virtio-queue follows the flag anyway).
        let table = TestQueue::new(&m, 0x4_0000, 1024);
        for i in 0..1000u16 {
            table.write_desc(&m, i, 0x8_0000, 4, F_NEXT, i + 1);
        }
        q.write_desc(&m, 0, 0x4_0000, 16 * 1000, F_INDIRECT, 0);
        q.push_avail(&m, 0);
        let mut queue = q.queue();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut queue, &m).expect("chain");
        let mut out = Vec::new();
        assert!(matches!(
            collect(chain, 8, &mut out),
            Err(ChainError::TooLong { max: 8 })
        ));
        assert_eq!(out.len(), 8);
    }
}
