//! The guest's side of the link: the same in every sandbox, so a fork needs no re-addressing.

use std::net::Ipv4Addr;

/// Errors of [`GuestAddressing::validate`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressingError {
    /// The guest subnet is not usable.
    #[error("guest addressing is invalid: {why}")]
    Invalid {
        /// What is wrong.
        why: &'static str,
    },
}

/// Guest address, gateway and resolver on the tap. Default: guest `172.30.0.2/30`, gateway and
/// resolver `172.30.0.1` (the tap's address in the sandbox netns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GuestAddressing {
    /// The guest's `eth0` address.
    pub guest: Ipv4Addr,
    /// The tap's address in the sandbox netns, the guest's default gateway.
    pub gateway: Ipv4Addr,
    /// Prefix length of the tap subnet, 1..=30.
    pub prefix_len: u8,
    /// Resolver the guest is told about (the gateway's port 53 is the one port it may reach in
    /// the sandbox netns); `None` tells it none.
    pub nameserver: Option<Ipv4Addr>,
}

impl Default for GuestAddressing {
    fn default() -> Self {
        GuestAddressing {
            guest: Ipv4Addr::new(172, 30, 0, 2),
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            prefix_len: 30,
            nameserver: Some(Ipv4Addr::new(172, 30, 0, 1)),
        }
    }
}

impl GuestAddressing {
    /// Checks that guest and gateway are two distinct host addresses of one subnet.
    pub fn validate(&self) -> Result<(), AddressingError> {
        let bad = |why| Err(AddressingError::Invalid { why });
        if !(1..=30).contains(&self.prefix_len) {
            return bad("the prefix length must be 1..=30");
        }
        let mask = u32::from(self.netmask());
        let (g, w) = (u32::from(self.guest), u32::from(self.gateway));
        if g & mask != w & mask {
            return bad("guest and gateway must be in one subnet");
        }
        if g == w {
            return bad("guest and gateway must differ");
        }
        for a in [g, w] {
            let host = a & !mask;
            if host == 0 || host == !mask {
                return bad(
                    "neither guest nor gateway may be the subnet's network or broadcast address",
                );
            }
        }
        Ok(())
    }

    /// The netmask (`255.255.255.252` for `/30`).
    pub fn netmask(&self) -> Ipv4Addr {
        let p = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
    }

    /// The kernel's `ip=` parameter for static configuration of `device` (usually `eth0`), per
    /// the kernel's `Documentation/admin-guide/nfs/nfsroot.rst`:
    /// `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>`, e.g.
    /// `ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off:172.30.0.1`. The guest kernel needs
    /// `CONFIG_IP_PNP`; the resolver ends up in `/proc/net/pnp`, which the guest links or copies
    /// to `/etc/resolv.conf`.
    pub fn kernel_ip_param(&self, device: &str) -> String {
        let mut s = format!(
            "ip={}::{}:{}::{}:off",
            self.guest,
            self.gateway,
            self.netmask(),
            device
        );
        if let Some(ns) = self.nameserver {
            s.push_str(&format!(":{ns}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_kernel_parameter() {
        let a = GuestAddressing::default();
        assert!(a.validate().is_ok());
        assert_eq!(
            a.kernel_ip_param("eth0"),
            "ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off:172.30.0.1"
        );
        let b = GuestAddressing {
            nameserver: None,
            ..a
        };
        assert_eq!(
            b.kernel_ip_param("eth1"),
            "ip=172.30.0.2::172.30.0.1:255.255.255.252::eth1:off"
        );
        let c = GuestAddressing {
            guest: [10, 1, 2, 3].into(),
            gateway: [10, 1, 0, 1].into(),
            prefix_len: 16,
            nameserver: Some([10, 1, 0, 53].into()),
        };
        assert_eq!(
            c.kernel_ip_param("eth0"),
            "ip=10.1.2.3::10.1.0.1:255.255.0.0::eth0:off:10.1.0.53"
        );
    }

    #[test]
    fn rejects_bad_subnets() {
        let a = GuestAddressing::default();
        for bad in [
            GuestAddressing {
                prefix_len: 31,
                ..a
            },
            GuestAddressing { prefix_len: 0, ..a },
            GuestAddressing {
                gateway: a.guest,
                ..a
            },
            GuestAddressing {
                guest: [172, 30, 0, 6].into(),
                ..a
            },
            GuestAddressing {
                guest: [172, 30, 0, 3].into(),
                ..a
            },
            GuestAddressing {
                gateway: [172, 30, 0, 0].into(),
                ..a
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
