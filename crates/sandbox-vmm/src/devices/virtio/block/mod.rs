//! virtio-blk (virtio 1.2 §5.2) over a [`BlockBackend`].
//!
//! One request queue of up to [`QUEUE_SIZE`] entries. Requests: IN, OUT, FLUSH, GET_ID; anything
//! else gets VIRTIO_BLK_S_UNSUPP. Every chain popped from the available ring is put on the used
//! ring, with a status byte whenever the chain has room for one (see [`request`] for the rules).
//! Data moves between guest memory and the backend through one fixed 64 KiB bounce buffer, so no
//! allocation depends on a guest-declared length.
//!
//! Features offered: VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX
//! (`QUEUE_SIZE - 2` segments), and either VIRTIO_BLK_F_RO on a read-only disk, where OUT
//! requests fail with VIRTIO_BLK_S_IOERR, or VIRTIO_BLK_F_DISCARD and
//! VIRTIO_BLK_F_WRITE_ZEROES on a writable one (§5.2.6.2: up to [`request::MAX_SEGMENTS`]
//! segments of up to 32 MiB each; the backend gives freed space back to the host).

pub mod request;

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use request::{
    Parsed, Request, RequestKind, ID_LEN, MAX_SEGMENTS, MAX_SEGMENT_SECTORS, SECTOR_SIZE,
    SEGMENT_LEN, S_IOERR, S_OK, S_UNSUPP,
};
pub use sandbox_fs::{BackendError, BlockBackend, RawFile};

use super::chain::{self, ChainDesc};
use super::{
    complete, feature, pop_chain, read_config_bytes, Result, VirtioDevice, VirtioError,
    VirtioInterrupt, DEVICE_ID_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::logging::guest_log;

/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// VIRTIO_BLK_F_SEG_MAX: config `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// VIRTIO_BLK_F_RO: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// VIRTIO_BLK_F_FLUSH: FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// VIRTIO_BLK_F_DISCARD: DISCARD is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// VIRTIO_BLK_F_WRITE_ZEROES: WRITE_ZEROES is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Length of the config space we expose: `struct virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` and its padding (§5.2.4).
const CONFIG_LEN: usize = 60;

/// Size of the bounce buffer between guest memory and the backend, in bytes.
const CHUNK: usize = 64 * 1024;

/// How a virtio-blk device is set up (plain data; the backend is passed separately).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockConfig {
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// The GET_ID string; truncated to 20 bytes, NUL-padded.
    pub id: String,
    /// The granularity, in bytes, at which the backend can give space back (config
    /// `discard_sector_alignment`): 4 KiB for a raw file, the cluster size for qcow2. A
    /// multiple of 512.
    pub discard_alignment: u32,
}

impl BlockConfig {
    /// A config with the given mode and the ID `sandbox-disk`.
    pub fn new(read_only: bool) -> Self {
        Self {
            read_only,
            id: "sandbox-disk".to_owned(),
            discard_alignment: 4096,
        }
    }

    /// Sets the discard granularity in bytes (rounded down to whole sectors, at least one).
    #[must_use]
    pub fn with_discard_alignment(mut self, bytes: u32) -> Self {
        self.discard_alignment = bytes;
        self
    }

    /// Sets the GET_ID string.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

struct Active<M> {
    mem: M,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device.
pub struct Block<M> {
    backend: Box<dyn BlockBackend>,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    config_space: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    active: Option<Active<M>>,
    descs: Vec<ChainDesc>,
    bounce: Box<[u8]>,
    /// Writes the backend refused with `StorageFull` (a cap or a full host disk).
    full_writes: u64,
    /// Told the new count whenever `full_writes` grows.
    on_full: Option<Box<dyn FnMut(u64) + Send>>,
}

impl<M> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> Block<M> {
    /// A device exposing `backend` (`size / 512` sectors).
    pub fn new(backend: Box<dyn BlockBackend>, config: &BlockConfig) -> Self {
        let capacity = backend.size() / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        let src = config.id.as_bytes();
        let n = src.len().min(ID_LEN);
        id[..n].copy_from_slice(&src[..n]);
        // struct virtio_blk_config (§5.2.4): le64 capacity @0, le32 size_max @8, le32 seg_max
        // @12, geometry @16, blk_size @20, topology @24, writeback @32, num_queues @34,
        // le32 max_discard_sectors @36, le32 max_discard_seg @40, le32
        // discard_sector_alignment @44, le32 max_write_zeroes_sectors @48, le32
        // max_write_zeroes_seg @52, u8 write_zeroes_may_unmap @56.
        let mut config_space = [0u8; CONFIG_LEN];
        let mut put =
            |at: usize, v: u32| config_space[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(12, u32::from(QUEUE_SIZE - 2));
        if !config.read_only {
            let align = (config.discard_alignment / 512).max(1);
            put(36, MAX_SEGMENT_SECTORS);
            put(40, MAX_SEGMENTS);
            put(44, align);
            put(48, MAX_SEGMENT_SECTORS);
            put(52, MAX_SEGMENTS);
            config_space[56] = 1;
        }
        config_space[..8].copy_from_slice(&capacity.to_le_bytes());
        Self {
            backend,
            read_only: config.read_only,
            capacity,
            id,
            config_space,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            bounce: vec![0u8; CHUNK].into_boxed_slice(),
            full_writes: 0,
            on_full: None,
        }
    }

    /// Calls `report` with the running count of writes the backend refused with
    /// [`std::io::ErrorKind::StorageFull`] (the disk's host-space cap, or a full host file
    /// system), after each queue pass that added some. The guest got VIRTIO_BLK_S_IOERR for
    /// each.
    #[must_use]
    pub fn with_full_report(mut self, report: Box<dyn FnMut(u64) + Send>) -> Self {
        self.on_full = Some(report);
        self
    }

    /// Writes refused with `StorageFull` so far.
    pub fn full_writes(&self) -> u64 {
        self.full_writes
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= feature(VIRTIO_BLK_F_RO);
        } else {
            f |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, not offered.
        guest_log!(debug, offset, "virtio-blk: config write ignored");
    }

    fn activate(
        &mut self,
        mem: M,
        _acked_features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<()> {
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if index != 0 {
            return Ok(());
        }
        let full_before = self.full_writes;
        let mut used = 0usize;
        // One pass over at most `size` chains; later chains come with a new notification.
        for _ in 0..active.queue.size() {
            let Some(desc_chain) = pop_chain(&mut active.queue, &active.mem) else {
                break;
            };
            let head = desc_chain.head_index();
            let max = usize::from(active.queue.size());
            let len = match chain::collect(desc_chain, max, &mut self.descs) {
                Ok(()) => execute(
                    &active.mem,
                    &self.descs,
                    Target {
                        backend: self.backend.as_mut(),
                        bounce: &mut self.bounce,
                        capacity: self.capacity,
                        read_only: self.read_only,
                        id: &self.id,
                        full_writes: &mut self.full_writes,
                    },
                ),
                Err(err) => {
                    // The true last descriptor is unknown, so no status can be written safely.
                    guest_log!(warn, error = %err, "virtio-blk: request dropped");
                    0
                }
            };
            if complete(&mut active.queue, &active.mem, head, len) {
                used += 1;
            }
        }
        if used > 0 {
            active.interrupt.signal_used_queue()?;
        }
        if self.full_writes != full_before {
            if let Some(report) = self.on_full.as_mut() {
                report(self.full_writes);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// What one request acts on: the device's disk state, borrowed for the request.
struct Target<'a> {
    backend: &'a mut dyn BlockBackend,
    bounce: &'a mut [u8],
    capacity: u64,
    read_only: bool,
    id: &'a [u8; ID_LEN],
    full_writes: &'a mut u64,
}

/// Parses and executes one request; returns the used length (bytes written to the chain).
fn execute<M: GuestMemory>(mem: &M, descs: &[ChainDesc], t: Target<'_>) -> u32 {
    let Target {
        backend,
        bounce,
        capacity,
        read_only,
        id,
        full_writes,
    } = t;
    let req = match request::parse(mem, descs, capacity) {
        Parsed::Request(req) => req,
        Parsed::Malformed { status, reason } => {
            guest_log!(debug, reason, "virtio-blk: malformed request");
            return match status {
                Some(at) if request::write_status(mem, at, S_IOERR) => 1,
                _ => 0,
            };
        }
    };
    let (status, written) = match req.kind {
        RequestKind::In => match do_in(mem, descs, &req, backend, bounce) {
            Ok(()) => (S_OK, req.data_len),
            Err(()) => (S_IOERR, 0),
        },
        RequestKind::Out if read_only => (S_IOERR, 0),
        RequestKind::Out => match do_out(mem, descs, &req, backend, bounce) {
            Ok(()) => (S_OK, 0),
            Err(full) => {
                *full_writes += u64::from(full);
                (S_IOERR, 0)
            }
        },
        RequestKind::Discard | RequestKind::WriteZeroes if read_only => (S_IOERR, 0),
        RequestKind::Discard | RequestKind::WriteZeroes => {
            let (status, full) = do_segments(mem, descs, &req, backend, capacity);
            *full_writes += u64::from(full);
            (status, 0)
        }
        RequestKind::Flush => match backend.flush() {
            Ok(()) => (S_OK, 0),
            Err(err) => {
                guest_log!(warn, error = %err, "virtio-blk: flush failed");
                (S_IOERR, 0)
            }
        },
        RequestKind::GetId => {
            let n = usize::try_from(req.data_len).unwrap_or(ID_LEN).min(ID_LEN);
            match chain::write_at(mem, &descs[req.split..], 0, &id[..n]) {
                Ok(done) => (S_OK, done as u64),
                Err(_) => (S_IOERR, 0),
            }
        }
        RequestKind::Unsupported(ty) => {
            guest_log!(debug, ty, "virtio-blk: unsupported request type");
            (S_UNSUPP, 0)
        }
    };
    if !request::write_status(mem, req.status, status) {
        return 0;
    }
    // written <= total writable length, which virtio-queue keeps below 2^32.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Disk → guest, in bounce-buffer-sized chunks.
fn do_in<M: GuestMemory>(
    mem: &M,
    descs: &[ChainDesc],
    req: &Request,
    backend: &mut dyn BlockBackend,
    bounce: &mut [u8],
) -> std::result::Result<(), ()> {
    let writable = &descs[req.split..];
    let mut done = 0u64;
    while done < req.data_len {
        let n = usize::try_from(req.data_len - done)
            .unwrap_or(usize::MAX)
            .min(bounce.len());
        let disk_off = req.sector * SECTOR_SIZE + done;
        backend
            .read_at(disk_off, &mut bounce[..n])
            .map_err(|err| guest_log!(warn, error = %err, disk_off, "virtio-blk: read failed"))?;
        match chain::write_at(mem, writable, req.data_offset + done, &bounce[..n]) {
            Ok(w) if w == n => {}
            _ => return Err(()),
        }
        done += n as u64;
    }
    Ok(())
}

/// DISCARD / WRITE_ZEROES: reads and checks every segment first (so a bad one fails the
/// request before any range is touched), then applies them in order. Returns the status and
/// whether the backend refused with `StorageFull`.
fn do_segments<M: GuestMemory>(
    mem: &M,
    descs: &[ChainDesc],
    req: &Request,
    backend: &mut dyn BlockBackend,
    capacity: u64,
) -> (u8, bool) {
    let readable = &descs[..req.split];
    let mut segments = [request::Segment {
        offset: 0,
        len: 0,
        unmap: false,
    }; MAX_SEGMENTS as usize];
    // The parser bounded data_len to MAX_SEGMENTS whole segments.
    let count = usize::try_from(req.data_len / SEGMENT_LEN)
        .unwrap_or(0)
        .min(segments.len());
    for (i, slot) in segments[..count].iter_mut().enumerate() {
        let mut raw = [0u8; SEGMENT_LEN as usize];
        let at = req.data_offset + i as u64 * SEGMENT_LEN;
        match chain::read_at(mem, readable, at, &mut raw) {
            Ok(n) if n == raw.len() => {}
            _ => return (S_IOERR, false),
        }
        match request::parse_segment(&raw, req.kind, capacity) {
            Ok(seg) => *slot = seg,
            Err(status) => {
                guest_log!(
                    debug,
                    status,
                    "virtio-blk: bad discard/write-zeroes segment"
                );
                return (status, false);
            }
        }
    }
    for seg in &segments[..count] {
        let result = if req.kind == RequestKind::Discard {
            backend.discard(seg.offset, seg.len)
        } else {
            backend.write_zeroes(seg.offset, seg.len, seg.unmap)
        };
        if let Err(err) = result {
            guest_log!(warn, error = %err, offset = seg.offset, "virtio-blk: discard/write-zeroes failed");
            return (S_IOERR, err.kind() == std::io::ErrorKind::StorageFull);
        }
    }
    (S_OK, false)
}

/// Guest → disk, in bounce-buffer-sized chunks. The error says whether the backend refused
/// the write with `StorageFull`.
fn do_out<M: GuestMemory>(
    mem: &M,
    descs: &[ChainDesc],
    req: &Request,
    backend: &mut dyn BlockBackend,
    bounce: &mut [u8],
) -> std::result::Result<(), bool> {
    let readable = &descs[..req.split];
    let mut done = 0u64;
    while done < req.data_len {
        let n = usize::try_from(req.data_len - done)
            .unwrap_or(usize::MAX)
            .min(bounce.len());
        match chain::read_at(mem, readable, req.data_offset + done, &mut bounce[..n]) {
            Ok(r) if r == n => {}
            _ => return Err(false),
        }
        let disk_off = req.sector * SECTOR_SIZE + done;
        backend.write_at(disk_off, &bounce[..n]).map_err(|err| {
            guest_log!(warn, error = %err, disk_off, "virtio-blk: write failed");
            err.kind() == std::io::ErrorKind::StorageFull
        })?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::request::{FLAG_UNMAP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES};
    use super::*;
    use crate::devices::virtio::test_utils::{irq, mem, CountingIrq, TestQueue, MEM_SIZE};
    use proptest::prelude::*;
    use std::io;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const DISK: usize = 64 * 1024;

    /// A disk in a `Vec`, with an optional I/O failure.
    struct MemDisk {
        bytes: Arc<std::sync::Mutex<Vec<u8>>>,
        fail: bool,
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.bytes.lock().expect("lock").len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let b = self.bytes.lock().expect("lock");
            let o = offset as usize;
            buf.copy_from_slice(&b[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let mut b = self.bytes.lock().expect("lock");
            let o = offset as usize;
            b[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            Ok(())
        }
        /// Marks discarded bytes with 0xdd, so a test sees which ranges were discarded.
        /// WRITE_ZEROES uses the trait's default (zero-filled writes).
        fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let mut b = self.bytes.lock().expect("lock");
            b[offset as usize..(offset + len) as usize].fill(0xdd);
            Ok(())
        }
    }

    struct Fixture {
        dev: Block<GuestMemoryMmap>,
        m: GuestMemoryMmap,
        q: TestQueue,
        line: Arc<CountingIrq>,
        disk: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    fn fixture(read_only: bool, fail: bool) -> Fixture {
        let m = mem();
        let disk = Arc::new(std::sync::Mutex::new(vec![0u8; DISK]));
        let backend = MemDisk {
            bytes: disk.clone(),
            fail,
        };
        let mut dev = Block::new(
            Box::new(backend),
            &BlockConfig::new(read_only).with_id("disk-under-test-with-a-long-name"),
        );
        let q = TestQueue::new(&m, 0x1000, 16);
        let line = irq();
        dev.activate(
            m.clone(),
            feature(VIRTIO_F_VERSION_1),
            vec![q.queue()],
            Arc::new(VirtioInterrupt::new(line.clone())),
        )
        .expect("activate");
        Fixture {
            dev,
            m,
            q,
            line,
            disk,
        }
    }

    fn header(m: &GuestMemoryMmap, ty: u32, sector: u64) {
        m.write_obj(ty.to_le(), GuestAddress(HDR)).expect("type");
        m.write_obj(0u32, GuestAddress(HDR + 4)).expect("reserved");
        m.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .expect("sector");
    }

    impl Fixture {
        /// Submits one chain and returns (status byte, used length).
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
            self.m
                .write_obj(0xffu8, GuestAddress(STATUS))
                .expect("status");
            let before = self.q.used_idx(&self.m);
            self.q.add_chain(&self.m, bufs);
            self.dev.process_queue(0).expect("process");
            assert_eq!(
                self.q.used_idx(&self.m),
                before.wrapping_add(1),
                "completed"
            );
            let (_, len) = self.q.used_elem(&self.m, before);
            let status: u8 = self.m.read_obj(GuestAddress(STATUS)).expect("status");
            (status, len)
        }
    }

    #[test]
    fn write_then_read_back() {
        let mut f = fixture(false, false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        f.m.write_slice(&pattern, GuestAddress(DATA)).expect("data");
        header(&f.m, T_OUT, 3);
        let out = f.submit(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
        assert_eq!(out, (S_OK, 1));
        assert_eq!(
            &f.disk.lock().expect("lock")[3 * 512..3 * 512 + 1024],
            &pattern[..]
        );

        f.m.write_slice(&[0u8; 1024], GuestAddress(DATA))
            .expect("clear");
        header(&f.m, T_IN, 3);
        // Data split over two descriptors of 512 bytes.
        let res = f.submit(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 512, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(res, (S_OK, 1025));
        let mut back = vec![0u8; 1024];
        f.m.read_slice(&mut back, GuestAddress(DATA)).expect("read");
        assert_eq!(back, pattern);
        assert_eq!(f.line.count(), 2);
    }

    #[test]
    fn large_request_crosses_the_bounce_buffer() {
        let mut f = fixture(false, false);
        let pattern: Vec<u8> = (0..DISK as u32).map(|i| (i % 253) as u8).collect();
        f.disk.lock().expect("lock").copy_from_slice(&pattern);
        header(&f.m, T_IN, 0);
        let res = f.submit(&[
            (HDR, 16, false),
            (0x4_0000, DISK as u32, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(res, (S_OK, DISK as u32 + 1));
        let mut back = vec![0u8; DISK];
        f.m.read_slice(&mut back, GuestAddress(0x4_0000))
            .expect("read");
        assert_eq!(back, pattern);
    }

    #[test]
    fn flush_and_get_id() {
        let mut f = fixture(false, false);
        header(&f.m, T_FLUSH, 0);
        assert_eq!(f.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (S_OK, 1));
        header(&f.m, T_GET_ID, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 21));
        let mut id = [0u8; 20];
        f.m.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"disk-under-test-with");
        // A short ID buffer gets a truncated ID, never an overrun.
        f.m.write_slice(&[0xee; 16], GuestAddress(DATA))
            .expect("fill");
        let res = f.submit(&[(HDR, 16, false), (DATA, 8, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 9));
        let mut id = [0u8; 9];
        f.m.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id, b"disk-und\xee");
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr() {
        let mut f = fixture(true, false);
        assert_ne!(f.dev.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
        f.m.write_slice(&[0xab; 512], GuestAddress(DATA))
            .expect("data");
        header(&f.m, T_OUT, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        assert!(f.disk.lock().expect("lock").iter().all(|&b| b == 0));
        // Reads still work.
        header(&f.m, T_IN, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 513));
    }

    #[test]
    fn unsupported_type_is_unsupp() {
        let mut f = fixture(false, false);
        header(&f.m, 14, 0); // SECURE_ERASE, not offered
        assert_eq!(
            f.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
            (S_UNSUPP, 1)
        );
    }

    #[test]
    fn sector_ranges_are_checked_against_capacity() {
        let mut f = fixture(false, false);
        let last = (DISK / 512) as u64;
        header(&f.m, T_IN, last - 1);
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 513));
        header(&f.m, T_IN, last - 1);
        let res = f.submit(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_OUT, u64::MAX); // sector + count overflows
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_IN, u64::MAX / 512 + 1); // sector * 512 would overflow
        let res = f.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn data_not_a_multiple_of_512_is_ioerr() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 500, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn short_header_is_ioerr() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0);
        let res = f.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        // No readable part at all.
        let res = f.submit(&[(DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn missing_status_descriptor_is_completed_without_status() {
        let mut f = fixture(false, false);
        header(&f.m, T_OUT, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, false)]);
        assert_eq!(res, (0xff, 0));
        // A zero-length "status" buffer is no status either.
        let res = f.submit(&[(HDR, 16, false), (STATUS, 0, true)]);
        assert_eq!(res, (0xff, 0));
        // A status byte outside guest memory cannot be written.
        let res = f.submit(&[(HDR, 16, false), (MEM_SIZE, 1, true)]);
        assert_eq!(res.1, 0);
    }

    #[test]
    fn wrong_direction_flags_are_ioerr() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0); // IN with a device-readable data buffer
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_OUT, 0); // OUT with a device-writable data buffer
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_IN, 0); // a writable header
        let res = f.submit(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        assert!(f.disk.lock().expect("lock").iter().all(|&b| b == 0));
    }

    /// Writes discard/write-zeroes segments `(sector, num_sectors, flags)` at DATA.
    fn segments(m: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            let at = DATA + i as u64 * SEGMENT_LEN;
            m.write_obj(sector.to_le(), GuestAddress(at))
                .expect("sector");
            m.write_obj(num.to_le(), GuestAddress(at + 8)).expect("num");
            m.write_obj(flags.to_le(), GuestAddress(at + 12))
                .expect("flags");
        }
        segs.len() as u32 * SEGMENT_LEN as u32
    }

    #[test]
    fn write_zeroes_and_discard_apply_every_segment() {
        let mut f = fixture(false, false);
        f.disk.lock().expect("lock").fill(0xa5);
        header(&f.m, T_WRITE_ZEROES, 0);
        let len = segments(&f.m, &[(0, 2, 0), (8, 1, FLAG_UNMAP)]);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 1));
        header(&f.m, T_DISCARD, 0);
        let len = segments(&f.m, &[(16, 1, 0)]);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_OK, 1));
        let d = f.disk.lock().expect("lock");
        assert!(d[..1024].iter().all(|&b| b == 0), "sectors 0-1 zeroed");
        assert!(
            d[1024..4096].iter().all(|&b| b == 0xa5),
            "untouched between"
        );
        assert!(d[4096..4608].iter().all(|&b| b == 0), "sector 8 zeroed");
        assert!(
            d[8192..8704].iter().all(|&b| b == 0xdd),
            "sector 16 discarded"
        );
        assert!(d[8704..].iter().all(|&b| b == 0xa5), "the rest untouched");
    }

    #[test]
    fn bad_segments_fail_the_request_before_any_range_is_touched() {
        const SECTORS: u64 = (DISK / 512) as u64;
        type Case = (u32, &'static [(u64, u32, u32)], u8);
        let cases: &[Case] = &[
            // The unmap flag is only for WRITE_ZEROES (§5.2.6.2).
            (T_DISCARD, &[(0, 1, 0), (1, 1, FLAG_UNMAP)], S_UNSUPP),
            // Reserved flag bits.
            (T_WRITE_ZEROES, &[(0, 1, 0), (1, 1, 2)], S_UNSUPP),
            // Beyond the disk, and overflowing.
            (T_WRITE_ZEROES, &[(0, 1, 0), (SECTORS - 1, 2, 0)], S_IOERR),
            (T_DISCARD, &[(0, 1, 0), (u64::MAX - 1, 4, 0)], S_IOERR),
            // Longer than max_discard_sectors.
            (
                T_WRITE_ZEROES,
                &[(0, 1, 0), (0, MAX_SEGMENT_SECTORS + 1, 0)],
                S_IOERR,
            ),
        ];
        for &(ty, segs, want) in cases {
            let mut f = fixture(false, false);
            f.disk.lock().expect("lock").fill(0xa5);
            header(&f.m, ty, 0);
            let len = segments(&f.m, segs);
            let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
            assert_eq!(res, (want, 1), "{ty} {segs:?}");
            assert!(
                f.disk.lock().expect("lock").iter().all(|&b| b == 0xa5),
                "nothing applied for {ty} {segs:?}"
            );
        }
    }

    #[test]
    fn segment_counts_and_shapes_are_checked() {
        let mut f = fixture(false, false);
        header(&f.m, T_DISCARD, 0);
        // No segment at all.
        let res = f.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        // A partial segment.
        let res = f.submit(&[(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        // One segment more than max_discard_seg.
        let many = vec![(0u64, 1u32, 0u32); MAX_SEGMENTS as usize + 1];
        let len = segments(&f.m, &many);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        // A writable data buffer.
        let len = segments(&f.m, &[(0, 1, 0)]);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn read_only_disks_offer_no_discard_and_refuse_it() {
        let mut f = fixture(true, false);
        let feats = f.dev.avail_features();
        assert_eq!(feats & feature(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(feats & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        header(&f.m, T_WRITE_ZEROES, 0);
        let len = segments(&f.m, &[(0, 1, 0)]);
        f.disk.lock().expect("lock").fill(0xa5);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        assert!(f.disk.lock().expect("lock").iter().all(|&b| b == 0xa5));
        let rw = fixture(false, false);
        let feats = rw.dev.avail_features();
        assert_ne!(feats & feature(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(feats & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    /// A disk whose host space is used up: reads work, writes fail with `StorageFull`.
    struct FullDisk;

    impl BlockBackend for FullDisk {
        fn size(&self) -> u64 {
            DISK as u64
        }
        fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        }
    }

    #[test]
    fn writes_refused_for_space_are_ioerr_counted_and_reported() {
        let m = mem();
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let mut dev: Block<GuestMemoryMmap> =
            Block::new(Box::new(FullDisk), &BlockConfig::new(false))
                .with_full_report(Box::new(move |n| seen.lock().expect("lock").push(n)));
        let mut q = TestQueue::new(&m, 0x1000, 16);
        dev.activate(
            m.clone(),
            feature(VIRTIO_F_VERSION_1),
            vec![q.queue()],
            Arc::new(VirtioInterrupt::new(irq())),
        )
        .expect("activate");
        header(&m, T_OUT, 0);
        q.add_chain(
            &m,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        dev.process_queue(0).expect("process");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            S_IOERR
        );
        header(&m, T_WRITE_ZEROES, 0);
        let len = segments(&m, &[(0, 1, 0)]);
        q.add_chain(
            &m,
            &[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)],
        );
        dev.process_queue(0).expect("process");
        // A read still works and is not counted.
        header(&m, T_IN, 0);
        q.add_chain(
            &m,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        dev.process_queue(0).expect("process");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            S_OK
        );
        assert_eq!(dev.full_writes(), 2);
        assert_eq!(
            *reports.lock().expect("lock"),
            vec![1, 2],
            "one report per pass that added"
        );
    }

    #[test]
    fn backend_errors_on_discard_are_ioerr() {
        let mut f = fixture(false, true);
        header(&f.m, T_DISCARD, 0);
        let len = segments(&f.m, &[(0, 1, 0)]);
        let res = f.submit(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn buffers_outside_guest_memory_are_ioerr() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0);
        let res = f.submit(&[
            (HDR, 16, false),
            (MEM_SIZE - 256, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_OUT, 0);
        let res = f.submit(&[
            (HDR, 16, false),
            (u64::MAX - 100, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(res, (S_IOERR, 1));
    }

    #[test]
    fn total_length_overflow_is_completed() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0);
        // 16 + (2^32 - 512) + 1024 bytes overflows the 32-bit chain length: virtio-queue stops
        // yielding descriptors, and the request is completed without touching the disk.
        let res = f.submit(&[
            (HDR, 16, false),
            (DATA, u32::MAX - 511, true),
            (DATA, 1024, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(res.0, 0xff);
    }

    #[test]
    fn backend_errors_are_ioerr() {
        let mut f = fixture(false, true);
        header(&f.m, T_IN, 0);
        let res = f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(res, (S_IOERR, 1));
        header(&f.m, T_FLUSH, 0);
        assert_eq!(
            f.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
            (S_IOERR, 1)
        );
    }

    #[test]
    fn looping_chain_is_completed() {
        let mut f = fixture(false, false);
        header(&f.m, T_IN, 0);
        // Descriptor 0 links to itself: the walk stops after the queue size.
        f.q.write_desc(
            &f.m,
            0,
            HDR,
            16,
            crate::devices::virtio::test_utils::F_NEXT,
            0,
        );
        f.q.push_avail(&f.m, 0);
        f.dev.process_queue(0).expect("process");
        assert_eq!(f.q.used_idx(&f.m), 1);
        assert_eq!(f.q.used_elem(&f.m, 0), (0, 0));
    }

    #[test]
    fn out_of_range_head_index_does_not_stall_the_ring() {
        let mut f = fixture(false, false);
        header(&f.m, T_FLUSH, 0);
        // A head index beyond the queue size, then a good request in the same pass.
        f.q.push_avail(&f.m, 999);
        f.q.add_chain(&f.m, &[(HDR, 16, false), (STATUS, 1, true)]);
        f.m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        f.dev.process_queue(0).expect("process");
        assert_eq!(f.q.used_idx(&f.m), 1);
        assert_eq!(f.q.used_elem(&f.m, 0), (0, 1));
        assert_eq!(
            f.m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            S_OK
        );
    }

    #[test]
    fn config_space_reports_capacity_and_seg_max() {
        let f = fixture(false, false);
        let mut cap = [0u8; 8];
        f.dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (DISK / 512) as u64);
        let mut seg = [0u8; 4];
        f.dev.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut past = [0xffu8; 4];
        f.dev.read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(f.dev.capacity_sectors(), 128);
        let word = |at: u64| {
            let mut w = [0u8; 4];
            f.dev.read_config(at, &mut w);
            u32::from_le_bytes(w)
        };
        assert_eq!(word(36), MAX_SEGMENT_SECTORS, "max_discard_sectors");
        assert_eq!(word(40), MAX_SEGMENTS, "max_discard_seg");
        assert_eq!(word(44), 8, "discard_sector_alignment: 4 KiB");
        assert_eq!(word(48), MAX_SEGMENT_SECTORS, "max_write_zeroes_sectors");
        assert_eq!(word(52), MAX_SEGMENTS, "max_write_zeroes_seg");
        assert_eq!(word(56) & 0xff, 1, "write_zeroes_may_unmap");
    }

    #[test]
    fn through_the_mmio_transport() {
        use crate::devices::virtio::mmio::{status, MmioTransport};
        use crate::devices::virtio::BusDevice;
        let m = mem();
        let disk = Arc::new(std::sync::Mutex::new(vec![7u8; DISK]));
        let dev = Block::new(
            Box::new(MemDisk {
                bytes: disk,
                fail: false,
            }),
            &BlockConfig::new(false),
        );
        let line = irq();
        let mut t = MmioTransport::new(m.clone(), dev, line.clone()).expect("transport");
        let w = |t: &mut MmioTransport<_, _>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let mut q = TestQueue::new(&m, 0x1000, 16);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, q.desc as u32);
        w(&mut t, 0x90, q.avail as u32);
        w(&mut t, 0xa0, q.used as u32);
        w(&mut t, 0x44, 1);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut t, 0x70, all);
        assert!(t.is_active());
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        header(&m, T_IN, 1);
        q.add_chain(
            &m,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        // Through the ioeventfd path.
        t.queue_events()[0].write(1).expect("kick");
        t.handle_queue_event(0);
        assert_eq!(q.used_idx(&m), 1);
        assert_eq!(q.used_elem(&m, 0).1, 513);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            S_OK
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(DATA + 511)).expect("data"), 7);
        assert_eq!(line.count(), 1);
        let mut isr = [0u8; 4];
        t.read(0x60, &mut isr);
        assert_eq!(u32::from_le_bytes(isr), 1);
    }

    /// One arbitrary descriptor: an address (often near interesting places), a length, flags.
    fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
        let addr = prop_oneof![
            Just(HDR),
            Just(DATA),
            Just(STATUS),
            Just(MEM_SIZE - 1),
            Just(u64::MAX - 8),
            // Above the test rings (0x1000..0x1200), so a hostile IN cannot scribble on them.
            0x1_0000u64..MEM_SIZE + 0x1000,
        ];
        let len = prop_oneof![
            Just(0u32),
            Just(1),
            Just(16),
            Just(512),
            Just(1024),
            Just(u32::MAX),
            0u32..70_000,
        ];
        (addr, len, any::<bool>())
    }

    /// Where the device must put the status byte of a chain, if anywhere: the last byte of the
    /// last non-empty descriptor, if that one is device-writable and inside guest memory. Only
    /// the descriptors that virtio-queue yields count (it stops when the chain passes 2^32 bytes).
    fn expected_status(bufs: &[(u64, u32, bool)]) -> Option<u64> {
        let mut total = 0u32;
        let yielded: Vec<_> = bufs
            .iter()
            .take_while(|d| match total.checked_add(d.1) {
                Some(t) => {
                    total = t;
                    true
                }
                None => false,
            })
            .collect();
        let last = yielded.iter().rev().find(|d| d.1 > 0)?;
        let at = last.0.checked_add(u64::from(last.1) - 1)?;
        (last.2 && at < MEM_SIZE).then_some(at)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn arbitrary_chains_never_panic_and_always_complete(
            chains in proptest::collection::vec(proptest::collection::vec(arb_desc(), 0..7), 1..6),
            ty in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), Just(T_WRITE_ZEROES), any::<u32>()],
            sector in prop_oneof![Just(0u64), Just(127), Just(u64::MAX), any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let mut f = fixture(read_only, false);
            for (i, bufs) in chains.iter().filter(|c| !c.is_empty()).enumerate() {
                header(&f.m, ty, sector);
                let status_at = expected_status(bufs);
                if let Some(at) = status_at {
                    f.m.write_obj(0xffu8, GuestAddress(at)).expect("in memory");
                }
                f.q.add_chain(&f.m, bufs);
                f.dev.process_queue(0).expect("process");
                // Every chain is completed, exactly once.
                prop_assert_eq!(usize::from(f.q.used_idx(&f.m)), i + 1);
                let (_, len) = f.q.used_elem(&f.m, i as u16);
                let writable: u64 = bufs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
                // The used length never exceeds what the chain offered to write...
                prop_assert!(u64::from(len) <= writable);
                // ...it is non-zero exactly when a status byte was written, and that byte is a
                // valid status.
                prop_assert_eq!(len > 0, status_at.is_some());
                if let Some(at) = status_at {
                    let st: u8 = f.m.read_obj(GuestAddress(at)).expect("status");
                    prop_assert!(st <= S_UNSUPP, "status {}", st);
                }
            }
            if read_only {
                prop_assert!(f.disk.lock().expect("lock").iter().all(|&b| b == 0));
            }
        }
    }
}
