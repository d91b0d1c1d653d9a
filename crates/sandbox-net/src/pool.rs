//! The pool of veth subnets: one `/31` (or `/30`) per sandbox, carved from a configured
//! block (default `10.200.0.0/16`, 32768 `/31`s).
//!
//! A `/31` ([RFC 3021]) holds the host end (even address) and the sandbox end (odd address); a
//! `/30` holds them at `+1` and `+2`. The guest's own address is the same in every sandbox
//! ([`crate::GuestAddressing`]); the pool is the only place where sandboxes differ.
//!
//! [RFC 3021]: https://www.rfc-editor.org/rfc/rfc3021

use std::net::Ipv4Addr;

/// Errors of the pool.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The configuration does not describe a usable block.
    #[error("veth address pool is misconfigured: {why}")]
    Config {
        /// What is wrong.
        why: &'static str,
    },
    /// Every slot is taken; tear down a sandbox or configure a larger block.
    #[error("veth address pool is exhausted ({capacity} slots in use)")]
    Exhausted {
        /// Number of slots in the pool.
        capacity: u32,
    },
}

/// The block the slots come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// First address of the block; aligned to `prefix_len`.
    pub network: Ipv4Addr,
    /// Prefix length of the block, 12..=30.
    pub prefix_len: u8,
    /// Prefix length of one slot: 31 or 30, and at least `prefix_len`.
    pub slot_prefix_len: u8,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            network: Ipv4Addr::new(10, 200, 0, 0),
            prefix_len: 16,
            slot_prefix_len: 31,
        }
    }
}

impl PoolConfig {
    /// A block `network/prefix_len` cut into slots of `/slot_prefix_len`.
    pub fn new(network: Ipv4Addr, prefix_len: u8, slot_prefix_len: u8) -> Self {
        PoolConfig {
            network,
            prefix_len,
            slot_prefix_len,
        }
    }

    /// Checks the block and returns its number of slots.
    pub fn capacity(&self) -> Result<u32, PoolError> {
        let err = |why| Err(PoolError::Config { why });
        if !(12..=30).contains(&self.prefix_len) {
            return err("the block's prefix length must be 12..=30");
        }
        if !(self.slot_prefix_len == 31 || self.slot_prefix_len == 30) {
            return err("the slot prefix length must be 31 or 30");
        }
        if self.slot_prefix_len < self.prefix_len {
            return err("the slot must not be larger than the block");
        }
        let host_bits = 32 - u32::from(self.prefix_len);
        if u32::from(self.network) & ((1u32 << host_bits) - 1) != 0 {
            return err("the block's address must be aligned to its prefix length");
        }
        Ok(1u32 << (self.slot_prefix_len - self.prefix_len))
    }
}

/// One sandbox's veth subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index in the pool, `0..capacity`.
    pub index: u32,
    /// Address of the veth end in the host netns.
    pub host: Ipv4Addr,
    /// Address of the veth end in the sandbox netns (the source of its masqueraded traffic).
    pub sandbox: Ipv4Addr,
    /// Prefix length of both addresses (31 or 30).
    pub prefix_len: u8,
}

/// Slot allocator: lowest free index first, a bitmap of `capacity` bits.
#[derive(Debug)]
pub struct AddressPool {
    cfg: PoolConfig,
    capacity: u32,
    used: Vec<u64>,
    in_use: u32,
}

impl AddressPool {
    /// An empty pool over `cfg`'s block.
    pub fn new(cfg: PoolConfig) -> Result<Self, PoolError> {
        let capacity = cfg.capacity()?;
        Ok(AddressPool {
            cfg,
            capacity,
            used: vec![0; capacity.div_ceil(64) as usize],
            in_use: 0,
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Number of slots taken.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Takes the lowest free slot.
    pub fn allocate(&mut self) -> Result<Slot, PoolError> {
        let (w, word) = self
            .used
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .ok_or(PoolError::Exhausted {
                capacity: self.capacity,
            })?;
        let index = (w as u32) * 64 + word.trailing_ones();
        if index >= self.capacity {
            return Err(PoolError::Exhausted {
                capacity: self.capacity,
            });
        }
        self.mark(index, true);
        Ok(self.slot(index).expect("index is below capacity"))
    }

    /// Takes slot `index` (a sandbox adopted at reconciliation). False if taken or out of range.
    pub fn reserve(&mut self, index: u32) -> bool {
        if index >= self.capacity || self.is_used(index) {
            return false;
        }
        self.mark(index, true);
        true
    }

    /// Gives slot `index` back. False if it was free or out of range.
    pub fn release(&mut self, index: u32) -> bool {
        if index >= self.capacity || !self.is_used(index) {
            return false;
        }
        self.mark(index, false);
        true
    }

    /// Slot `index`'s addresses, taken or not.
    pub fn slot(&self, index: u32) -> Option<Slot> {
        if index >= self.capacity {
            return None;
        }
        let size = 1u32 << (32 - u32::from(self.cfg.slot_prefix_len));
        let base = u32::from(self.cfg.network) + index * size;
        let (host, sandbox) = if self.cfg.slot_prefix_len == 31 {
            (base, base + 1)
        } else {
            (base + 1, base + 2)
        };
        Some(Slot {
            index,
            host: host.into(),
            sandbox: sandbox.into(),
            prefix_len: self.cfg.slot_prefix_len,
        })
    }

    /// The slot whose host-end address is `host`, if any.
    pub fn slot_of_host(&self, host: Ipv4Addr) -> Option<Slot> {
        let off = u32::from(host).checked_sub(u32::from(self.cfg.network))?;
        let index = off >> (32 - u32::from(self.cfg.slot_prefix_len));
        self.slot(index).filter(|s| s.host == host)
    }

    /// The block, for rules that match every sandbox (`10.200.0.0/16`).
    pub fn block(&self) -> (Ipv4Addr, u8) {
        (self.cfg.network, self.cfg.prefix_len)
    }

    fn is_used(&self, index: u32) -> bool {
        self.used[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    fn mark(&mut self, index: u32, used: bool) {
        let w = &mut self.used[(index / 64) as usize];
        if used {
            *w |= 1 << (index % 64);
            self.in_use += 1;
        } else {
            *w &= !(1 << (index % 64));
            self.in_use -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(slot: u8) -> AddressPool {
        AddressPool::new(PoolConfig::new(Ipv4Addr::new(10, 9, 0, 0), 28, slot)).expect("valid")
    }

    #[test]
    fn slots_of_a_31_and_a_30() {
        let mut p = small(31);
        assert_eq!(p.capacity(), 8);
        let s = p.allocate().expect("free");
        assert_eq!(
            (s.index, s.host, s.sandbox),
            (0, [10, 9, 0, 0].into(), [10, 9, 0, 1].into())
        );
        let s = p.allocate().expect("free");
        assert_eq!(
            (s.host, s.sandbox),
            ([10, 9, 0, 2].into(), [10, 9, 0, 3].into())
        );
        let mut p = small(30);
        assert_eq!(p.capacity(), 4);
        p.allocate().expect("free");
        let s = p.allocate().expect("free");
        assert_eq!(
            (s.host, s.sandbox, s.prefix_len),
            ([10, 9, 0, 5].into(), [10, 9, 0, 6].into(), 30)
        );
        assert_eq!(p.slot_of_host([10, 9, 0, 5].into()), Some(s));
        assert_eq!(p.slot_of_host([10, 9, 0, 6].into()), None);
        assert_eq!(p.slot_of_host([10, 9, 1, 1].into()), None);
        assert_eq!(p.slot_of_host([10, 8, 0, 1].into()), None);
    }

    #[test]
    fn exhaustion_release_and_reuse() {
        let mut p = small(30);
        let all: Vec<_> = (0..4).map(|_| p.allocate().expect("free")).collect();
        assert_eq!(p.allocate(), Err(PoolError::Exhausted { capacity: 4 }));
        assert!(p.release(all[2].index));
        assert!(!p.release(all[2].index), "double release");
        assert_eq!(
            p.allocate().expect("one free").index,
            2,
            "lowest free reused"
        );
        assert!(!p.reserve(2));
        assert!(p.release(0));
        assert!(p.reserve(0));
        assert!(!p.reserve(99));
        assert_eq!(p.in_use(), 4);
    }

    #[test]
    fn large_pool_crosses_words() {
        let mut p = AddressPool::new(PoolConfig::default()).expect("valid");
        assert_eq!(p.capacity(), 32768);
        for i in 0..200 {
            assert_eq!(p.allocate().expect("free").index, i);
        }
        assert!(p.release(70));
        assert_eq!(p.allocate().expect("free").index, 70);
        let last = p.slot(32767).expect("in range");
        assert_eq!(last.sandbox, Ipv4Addr::new(10, 200, 255, 255));
    }

    #[test]
    fn bad_configs() {
        for c in [
            PoolConfig::new([10, 0, 0, 1].into(), 16, 31),
            PoolConfig::new([10, 0, 0, 0].into(), 8, 31),
            PoolConfig::new([10, 0, 0, 0].into(), 16, 29),
            PoolConfig::new([10, 0, 0, 0].into(), 31, 31),
        ] {
            assert!(
                matches!(AddressPool::new(c), Err(PoolError::Config { .. })),
                "{c:?}"
            );
        }
    }
}
