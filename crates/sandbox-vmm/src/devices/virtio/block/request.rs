//! The virtio-blk request parser (virtio 1.2 §5.2.6).
//!
//! A request is one descriptor chain: the device-readable part starts with the 16-byte header
//! `{ le32 type, le32 reserved, le64 sector }`; OUT data follows it; the device-writable part
//! holds IN/GET_ID data and ends with the 1-byte status. Buffers are located by offset in the
//! concatenation of each part, so any descriptor layout is accepted (VIRTIO_F_VERSION_1 implies
//! ANY_LAYOUT), while the rules below catch the hostile ones.
//!
//! Rules (a violation yields [`Parsed::Malformed`]):
//! - every device-readable descriptor precedes every device-writable one;
//! - the readable part holds at least the 16-byte header;
//! - the writable part holds at least the status byte, else no status can be written and the
//!   chain is completed with a used length of 0 (a clean drop);
//! - IN and GET_ID carry no readable bytes beyond the header; OUT and FLUSH carry no writable
//!   bytes beyond the status (so a data buffer with the wrong direction flag is refused);
//! - every buffer lies entirely inside guest memory;
//! - IN/OUT data is a multiple of 512 bytes and `sector + len / 512 <= capacity`, with checked
//!   arithmetic;
//! - DISCARD and WRITE_ZEROES carry 1 to [`MAX_SEGMENTS`] whole 16-byte segments
//!   (`struct virtio_blk_discard_write_zeroes`, §5.2.6) and no writable bytes beyond the status;
//!   the segments themselves are checked by [`parse_segment`] before anything is executed.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::devices::virtio::chain::{self, ChainDesc};

/// Sector size in bytes (virtio 1.2 §5.2.6: sectors are always 512 bytes).
pub const SECTOR_SIZE: u64 = 512;
/// Header length in bytes.
pub const HEADER_LEN: u64 = 16;
/// Length of the GET_ID string in bytes.
pub const ID_LEN: usize = 20;

/// VIRTIO_BLK_T_IN: read sectors.
pub const T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write sectors.
pub const T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH: make writes durable.
pub const T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: return the device ID string.
pub const T_GET_ID: u32 = 8;
/// VIRTIO_BLK_T_DISCARD: the driver no longer needs some sectors.
pub const T_DISCARD: u32 = 11;
/// VIRTIO_BLK_T_WRITE_ZEROES: some sectors must read as zeroes.
pub const T_WRITE_ZEROES: u32 = 13;

/// Length of one discard/write-zeroes segment in bytes: `{ le64 sector, le32 num_sectors,
/// le32 flags }`.
pub const SEGMENT_LEN: u64 = 16;
/// The most segments one DISCARD or WRITE_ZEROES request may carry (config `max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_SEGMENTS: u32 = 16;
/// The most sectors one segment may cover (config `max_discard_sectors`,
/// `max_write_zeroes_sectors`): 32 MiB, which bounds the work of one request.
pub const MAX_SEGMENT_SECTORS: u32 = 65_536;
/// Segment flag: the device may deallocate the zeroed range (WRITE_ZEROES only).
pub const FLAG_UNMAP: u32 = 1;

/// Status byte: success.
pub const S_OK: u8 = 0;
/// Status byte: I/O or request error.
pub const S_IOERR: u8 = 1;
/// Status byte: unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into the writable data buffers.
    In,
    /// Write `len` bytes from the readable data buffers to `sector`.
    Out,
    /// Flush.
    Flush,
    /// Write up to 20 bytes of device ID.
    GetId,
    /// Deallocate the ranges named by the segments in the readable data.
    Discard,
    /// Zero the ranges named by the segments in the readable data.
    WriteZeroes,
    /// Any other type: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

/// A well-formed request; data lives at `data_offset..data_offset + data_len` of the readable
/// part (OUT) or writable part (IN, GET_ID) of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: RequestKind,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Data offset in bytes within its part.
    pub data_offset: u64,
    /// Data length in bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// Index of the first device-writable descriptor in the chain.
    pub split: usize,
}

/// The outcome of parsing one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A request to execute.
    Request(Request),
    /// A broken request; answer `VIRTIO_BLK_S_IOERR` at `status` if there is one.
    Malformed {
        /// Where the status byte goes, if the chain has a usable one.
        status: Option<GuestAddress>,
        /// Why it was refused (for logs).
        reason: &'static str,
    },
}

/// Parses the descriptors of one chain against a disk of `capacity` sectors.
pub fn parse<M: GuestMemory>(mem: &M, descs: &[ChainDesc], capacity: u64) -> Parsed {
    let split = descs
        .iter()
        .position(|d| d.write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    let status = status_byte(mem, writable);
    let bad = |reason| Parsed::Malformed { status, reason };
    let Some(status_addr) = status else {
        return bad("no writable status byte");
    };
    if writable.iter().any(|d| !d.write_only) {
        return bad("a readable descriptor follows a writable one");
    }
    if chain::check_ranges(mem, descs).is_err() {
        return bad("a buffer lies outside guest memory");
    }
    let readable_len = chain::total_len(readable);
    // The status byte is the last writable byte; data may use the rest.
    let writable_data = chain::total_len(writable) - 1;
    if readable_len < HEADER_LEN {
        return bad("short header");
    }
    let mut header = [0u8; HEADER_LEN as usize];
    match chain::read_at(mem, readable, 0, &mut header) {
        Ok(n) if n == header.len() => {}
        _ => return bad("unreadable header"),
    }
    let (ty, sector) = split_header(&header);
    let extra_readable = readable_len - HEADER_LEN;
    let (kind, data_offset, data_len) = match ty {
        T_IN => (RequestKind::In, 0, writable_data),
        T_OUT => (RequestKind::Out, HEADER_LEN, extra_readable),
        T_FLUSH => (RequestKind::Flush, 0, 0),
        T_GET_ID => (RequestKind::GetId, 0, writable_data),
        T_DISCARD => (RequestKind::Discard, HEADER_LEN, extra_readable),
        T_WRITE_ZEROES => (RequestKind::WriteZeroes, HEADER_LEN, extra_readable),
        other => (RequestKind::Unsupported(other), 0, 0),
    };
    match kind {
        RequestKind::In | RequestKind::GetId if extra_readable != 0 => {
            return bad("readable data in a device-to-driver request")
        }
        RequestKind::Out | RequestKind::Flush | RequestKind::Discard | RequestKind::WriteZeroes
            if writable_data != 0 =>
        {
            return bad("writable data in a driver-to-device request")
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if data_len == 0 || data_len % SEGMENT_LEN != 0 {
                return bad("segment data is not a whole number of 16-byte segments");
            }
            if data_len / SEGMENT_LEN > u64::from(MAX_SEGMENTS) {
                return bad("more segments than max_discard_seg");
            }
        }
        RequestKind::In | RequestKind::Out => {
            if data_len % SECTOR_SIZE != 0 {
                return bad("data length is not a multiple of 512 bytes");
            }
            let end = sector.checked_add(data_len / SECTOR_SIZE);
            if !matches!(end, Some(end) if end <= capacity) {
                return bad("sector range beyond the disk");
            }
        }
        _ => {}
    }
    Parsed::Request(Request {
        kind,
        sector,
        data_offset,
        data_len,
        status: status_addr,
        split,
    })
}

/// One checked discard/write-zeroes segment: a byte range inside the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (at most [`MAX_SEGMENT_SECTORS`] sectors).
    pub len: u64,
    /// The unmap flag (only ever set on WRITE_ZEROES).
    pub unmap: bool,
}

/// Checks one raw segment of a `kind` request against a disk of `capacity` sectors. The error is
/// the status to answer: VIRTIO_BLK_S_UNSUPP for reserved flag bits, or the unmap flag on a
/// DISCARD (§5.2.6.2); VIRTIO_BLK_S_IOERR for a range that is too long or beyond the disk.
pub fn parse_segment(
    raw: &[u8; SEGMENT_LEN as usize],
    kind: RequestKind,
    capacity: u64,
) -> Result<Segment, u8> {
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    if flags & !FLAG_UNMAP != 0 || (kind == RequestKind::Discard && flags & FLAG_UNMAP != 0) {
        return Err(S_UNSUPP);
    }
    if num > MAX_SEGMENT_SECTORS {
        return Err(S_IOERR);
    }
    match sector.checked_add(u64::from(num)) {
        Some(end) if end <= capacity => {}
        _ => return Err(S_IOERR),
    }
    Ok(Segment {
        // sector < capacity <= u64::MAX / 512, so these cannot overflow.
        offset: sector * SECTOR_SIZE,
        len: u64::from(num) * SECTOR_SIZE,
        unmap: flags & FLAG_UNMAP != 0,
    })
}

/// The type and sector of a raw header.
fn split_header(h: &[u8; HEADER_LEN as usize]) -> (u32, u64) {
    let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    (ty, sector)
}

/// The address of the last byte of the writable part, if the chain ends with a non-empty,
/// device-writable buffer inside guest memory.
fn status_byte<M: GuestMemory>(mem: &M, writable: &[ChainDesc]) -> Option<GuestAddress> {
    let last = writable.iter().rev().find(|d| d.len > 0)?;
    if !last.write_only {
        return None;
    }
    let addr = last.addr.0.checked_add(u64::from(last.len) - 1)?;
    mem.check_range(GuestAddress(addr), 1, Permissions::Write)
        .then_some(GuestAddress(addr))
}

/// Writes `status` at `addr`; returns whether it reached guest memory.
pub fn write_status<M: GuestMemory>(mem: &M, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}
