//! Address-range dispatch of vCPU PIO and MMIO exits to devices.
//!
//! A [`Bus`] maps non-overlapping, non-empty [`BusRange`]s to [`BusDevice`]s. The vCPU loop
//! calls [`Bus::read`]/[`Bus::write`] with the exit's address; it never matches port numbers
//! itself. Accesses that hit no device (or straddle a device's end) are "unhandled": reads return
//! all-ones, writes are dropped, and they are logged at debug level through the per-call-site
//! rate limiter of [`crate::logging`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;
use crate::logging::guest_log;

/// A bus address: a port number on the PIO bus, a guest-physical address on the MMIO bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusAddress(pub u64);

/// A non-zero size of a bus range, bytes (or ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusSize(u64);

impl BusSize {
    /// A size; `None` for 0.
    pub fn new(size: u64) -> Option<Self> {
        (size != 0).then_some(Self(size))
    }

    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A non-empty range `[base, base + size)` that does not wrap around `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    base: BusAddress,
    size: BusSize,
}

impl BusRange {
    /// A range of `size` bytes from `base`.
    ///
    /// # Errors
    /// [`BusError::EmptyRange`] for size 0, [`BusError::RangeOverflow`] if the range wraps.
    pub fn new(base: u64, size: u64) -> Result<Self> {
        let size = BusSize::new(size).ok_or(BusError::EmptyRange { base })?;
        base.checked_add(size.get() - 1)
            .ok_or(BusError::RangeOverflow {
                base,
                size: size.get(),
            })?;
        Ok(Self {
            base: BusAddress(base),
            size,
        })
    }

    /// First address of the range.
    pub fn base(&self) -> BusAddress {
        self.base
    }

    /// Size of the range, bytes.
    pub fn size(&self) -> BusSize {
        self.size
    }

    /// Last address inside the range (inclusive; cannot overflow by construction).
    pub fn last(&self) -> u64 {
        self.base.0 + (self.size.0 - 1)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base.0 <= other.last() && other.base.0 <= self.last()
    }

    /// Offset of the access `[addr, addr + len)` inside this range, if it lies wholly inside.
    pub fn offset_of(&self, addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(self.base.0)?;
        let len = u64::try_from(len).ok()?;
        let end = offset.checked_add(len)?;
        (len != 0 && end <= self.size.0).then_some(offset)
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.base.0, self.last())
    }
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device range of size 0.
    #[error("bus range at {base:#x} is empty")]
    EmptyRange {
        /// Requested base.
        base: u64,
    },
    /// A range that wraps around the address space.
    #[error("bus range at {base:#x} of {size:#x} bytes wraps around the address space")]
    RangeOverflow {
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
    },
    /// The new range overlaps a registered one.
    #[error("bus range {new} overlaps the registered range {existing}")]
    Overlap {
        /// The rejected range.
        new: String,
        /// The range already on the bus.
        existing: String,
    },
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, BusError>;

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address-range → device map. Built before the vCPUs start, then shared read-only
/// (`Arc<Bus>`); each device serializes its own accesses with its `Mutex`.
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<BusAddress, (BusRange, SharedDevice)>,
    unhandled: AtomicU64,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field(
                "ranges",
                &self
                    .devices
                    .values()
                    .map(|(r, _)| r.to_string())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus; `name` ("pio", "mmio") appears in logs.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            devices: BTreeMap::new(),
            unhandled: AtomicU64::new(0),
        }
    }

    /// Maps `range` to `device`.
    ///
    /// # Errors
    /// [`BusError::Overlap`] if `range` shares an address with a registered range.
    pub fn insert(&mut self, range: BusRange, device: SharedDevice) -> Result<()> {
        // Only the nearest range below and the nearest at-or-above can overlap, because the
        // registered ranges are disjoint and sorted by base.
        let below = self.devices.range(..range.base).next_back();
        let above = self.devices.range(range.base..).next();
        for (existing, _) in below.into_iter().chain(above).map(|(_, v)| v) {
            if existing.overlaps(&range) {
                return Err(BusError::Overlap {
                    new: range.to_string(),
                    existing: existing.to_string(),
                });
            }
        }
        self.devices.insert(range.base, (range, device));
        Ok(())
    }

    /// The device whose range wholly contains `[addr, addr + len)`, with the access's offset.
    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let (_, (range, device)) = self.devices.range(..=BusAddress(addr)).next_back()?;
        range.offset_of(addr, len).map(|offset| (device, offset))
    }

    /// Dispatches a read. Returns `false` (and fills `data` with 0xff) if no device handles it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.log_unhandled("read", addr, data.len());
                false
            }
        }
    }

    /// Dispatches a write. Returns `false` (and drops it) if no device handles it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => {
                self.log_unhandled("write", addr, data.len());
                false
            }
        }
    }

    /// How many accesses hit no device so far.
    pub fn unhandled_count(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn log_unhandled(&self, kind: &'static str, addr: u64, len: usize) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        // A guest probing ports must not flood the host log.
        guest_log!(
            debug,
            bus = self.name,
            kind,
            addr = format_args!("{addr:#x}"),
            len,
            "unhandled guest access"
        );
    }
}

/// Locks a device, recovering from a poisoned lock: a device that panicked once keeps serving
/// (its state is plain data), and the VMM does not cascade the panic into every vCPU.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let shared: SharedDevice = p.clone();
        (p, shared)
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        assert_eq!(
            BusRange::new(0x10, 0),
            Err(BusError::EmptyRange { base: 0x10 })
        );
        assert_eq!(
            BusRange::new(u64::MAX, 2),
            Err(BusError::RangeOverflow {
                base: u64::MAX,
                size: 2
            })
        );
        assert_eq!(BusRange::new(u64::MAX, 1).map(|r| r.last()), Ok(u64::MAX));
    }

    #[test]
    fn overlapping_inserts_are_rejected() {
        let mut bus = Bus::new("test");
        bus.insert(BusRange::new(0x100, 0x10).expect("range"), probe().1)
            .expect("first insert");
        for (base, size) in [
            (0x100, 1),
            (0xf8, 0x9),
            (0x10f, 1),
            (0x0, 0x1000),
            (0x108, 0x100),
        ] {
            let err = bus.insert(BusRange::new(base, size).expect("range"), probe().1);
            assert!(
                matches!(err, Err(BusError::Overlap { .. })),
                "{base:#x}+{size:#x}"
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(BusRange::new(0xf0, 0x10).expect("range"), probe().1)
            .expect("below");
        bus.insert(BusRange::new(0x110, 0x10).expect("range"), probe().1)
            .expect("above");
    }

    #[test]
    fn accesses_dispatch_by_range_with_offsets() {
        let mut bus = Bus::new("test");
        let (a, shared_a) = probe();
        bus.insert(BusRange::new(0x3f8, 8).expect("range"), shared_a)
            .expect("insert");
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(a.lock().expect("lock").writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unhandled_reads_are_all_ones_and_straddling_is_unhandled() {
        let mut bus = Bus::new("test");
        let (a, shared_a) = probe();
        bus.insert(BusRange::new(0x1000, 0x10).expect("range"), shared_a)
            .expect("insert");
        let mut data = [0u8; 4];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0xff; 4]);
        // Starts inside, ends outside.
        assert!(!bus.read(0x100e, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x100e, &[1, 2, 3, 4]));
        assert!(a.lock().expect("lock").writes.is_empty());
        assert_eq!(bus.unhandled_count(), 3);
    }

    #[test]
    fn unhandled_count_keeps_counting_past_the_log_limit() {
        let bus = Bus::new("test");
        let n = u64::from(crate::logging::GUEST_LOG_BURST) * 3;
        for _ in 0..n {
            assert!(!bus.write(0x80, &[0]));
        }
        assert_eq!(bus.unhandled_count(), n);
    }

    #[test]
    fn unhandled_access_logging_is_rate_limited() {
        let bus = Bus::new("test");
        let lines = crate::logging::capture::log_lines(|| {
            for port in 0..10_000u64 {
                let _ = bus.write(port, &[0]);
            }
        });
        let n = lines
            .iter()
            .filter(|l| l.contains("unhandled guest access"))
            .count();
        assert!(
            n <= 2 * crate::logging::GUEST_LOG_BURST as usize,
            "{n} lines"
        );
        assert_eq!(bus.unhandled_count(), 10_000);
    }
}
