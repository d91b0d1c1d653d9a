//! Test fixtures: plain anonymous guest memory, a hand-written driver side of a split virtqueue,
//! and a counting interrupt line.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::IrqTrigger;

/// VIRTQ_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
pub const F_INDIRECT: u16 = 4;

/// Guest memory size used by the tests: 1 MiB at address 0.
pub const MEM_SIZE: u64 = 0x10_0000;

/// 1 MiB of zeroed anonymous guest memory at guest address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("anonymous mmap")
}

/// An interrupt line that counts how often it was raised.
#[derive(Debug, Default)]
pub struct CountingIrq(pub AtomicUsize);

impl CountingIrq {
    /// How many times the line was raised.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqTrigger for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A new counting line, shared.
pub fn irq() -> Arc<CountingIrq> {
    Arc::new(CountingIrq::default())
}

/// The driver side of one split virtqueue laid out at `base`: descriptor table, then the
/// available ring, then the used ring (4-byte aligned).
#[derive(Debug, Clone)]
pub struct TestQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    pub(crate) next_desc: u16,
    pub(crate) avail_idx: u16,
}

impl TestQueue {
    /// Lays out a queue of `size` entries at `base` and zeroes its rings.
    pub fn new(m: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (end - base) as usize];
        m.write_slice(&zeros, GuestAddress(base))
            .expect("rings in memory");
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `idx`.
    pub fn write_desc(
        &self,
        m: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(idx));
        m.write_obj(addr.to_le(), at).expect("desc addr");
        m.write_obj(len.to_le(), at.unchecked_add(8))
            .expect("desc len");
        m.write_obj(flags.to_le(), at.unchecked_add(12))
            .expect("desc flags");
        m.write_obj(next.to_le(), at.unchecked_add(14))
            .expect("desc next");
    }

    /// Publishes `head` on the available ring.
    pub fn push_avail(&mut self, m: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        m.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers into consecutive descriptors and
    /// publishes it. Returns the head index.
    pub fn add_chain(&mut self, m: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(m, idx, addr, len, flags, next);
            self.next_desc = next;
        }
        self.push_avail(m, head);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        u16::from_le(m.read_obj(GuestAddress(self.used + 2)).expect("used idx"))
    }

    /// Used ring element `i`: (descriptor head id, bytes written).
    pub fn used_elem(&self, m: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(i % self.size));
        let id: u32 = m.read_obj(at).expect("used id");
        let len: u32 = m.read_obj(at.unchecked_add(4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// A ready device-side `Queue` for these rings (bypassing the transport).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }
}
