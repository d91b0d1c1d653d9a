//! Per-sandbox network plumbing (`docs/network.md`): a network namespace with a tap for the guest, a veth pair to
//! the host, forwarding and masquerade, nftables, exposed TCP ports. Linux only; needs
//! `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (root), `/dev/net/tun`, and the `nft` binary.
//!
//! Walkthrough (see `docs/network.md` for the topology and the reachability rules):
//!
//! 1. [`Network::new`] takes a [`NetConfig`]: name prefixes, the veth address pool, the guest's
//!    addressing (the same in every sandbox), and which netns is "the host" (the process's own
//!    in production, a test's "uplink" netns in tests).
//! 2. [`Network::install_host`] installs the shared host table (sandboxes cannot reach the host
//!    or each other; masquerade to the outside) and turns on IPv4 forwarding in the host netns.
//! 3. [`Network::reconcile`] deletes the objects of sandboxes whose owner is dead, at start-up.
//! 4. [`Network::create`] builds one sandbox's netns, tap, veth pair, addresses, routes and base
//!    ruleset, each step armed for cleanup; it returns a [`SandboxNet`] holding the tap fd for
//!    the VMM and the kernel `ip=` parameter for the guest.
//! 5. [`Network::apply_policy`] enforces an egress policy (`sandbox-policy`, `docs/policy.md`
//!    "Enforcement"): the compiled table replaces the base one, a DNS resolver for the sandbox
//!    answers only allowed names and pins their addresses before answering, and an NFLOG
//!    reader turns denied packets into [`sandbox_policy::DenyEvent`]s ([`PolicyHandle::events`]);
//!    [`PolicyHandle::replace`] swaps the policy in one transaction.
//!    [`Network::apply_ruleset`] is the raw hook (any nftables document).
//! 6. [`Network::expose`] forwards a host TCP port to a guest port; [`Network::teardown`]
//!    deletes everything (stopping the resolver), idempotently.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sandbox_net::NetError> {
//! use sandbox_net::{Egress, NetConfig, Network, SandboxNetConfig};
//! let net = Network::new(NetConfig::default())?;
//! net.install_host().await?;
//! net.reconcile(&|_id| false).await?;
//! let mut sbx = net
//!     .create("sbx-0123456789abcdef", &SandboxNetConfig::default().with_egress(Egress::Allow))
//!     .await?;
//! let tap = sbx.take_tap(); // handed to the VMM
//! let cmdline_ip = sbx.kernel_ip_param(); // "ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off:172.30.0.1"
//! let policy = sandbox_policy::Policy::from_toml("[[allow]]\ndomain = \"pypi.org\"\nports = [443]\n")
//!     .expect("valid policy");
//! let handle = net
//!     .apply_policy("sbx-0123456789abcdef", &policy, sandbox_net::PolicyOptions::default())
//!     .await?;
//! let mut denials = handle.events().expect("first call"); // DenyEvents, rate-limited
//! let addr = net.expose("sbx-0123456789abcdef", 8080).await?; // 127.0.0.1:<ephemeral>
//! net.teardown("sbx-0123456789abcdef").await?;
//! # let _ = (tap, cmdline_ip, addr, denials.try_recv());
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addressing;
mod cleanup;
mod conntrack;
mod dns;
mod enforce;
mod expose;
pub mod names;
mod netns;
mod network;
mod nflog;
mod nft;
mod pool;
mod sys;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

pub use addressing::{AddressingError, GuestAddressing};
pub use enforce::{PolicyHandle, PolicyOptions, PolicyStats};
pub use names::{NameError, NamePrefixes, Names};
pub use netns::{netns_path, NETNS_DIR};
pub use network::{Network, ReconcileReport, SandboxNet};
pub use nftables;
pub use pool::{AddressPool, PoolConfig, PoolError, Slot};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The configuration is not usable.
    #[error("network configuration is invalid: {why}")]
    Config {
        /// What is wrong.
        why: String,
    },
    /// A name or id is not usable.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The veth pool is misconfigured or exhausted.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The guest addressing is invalid.
    #[error(transparent)]
    Addressing(#[from] AddressingError),
    /// This `Network` already has a sandbox with this id.
    #[error("sandbox already has a network")]
    AlreadyExists {
        /// The sandbox id.
        id: String,
    },
    /// This `Network` has no sandbox with this id.
    #[error("sandbox has no network")]
    NotFound {
        /// The sandbox id.
        id: String,
    },
    /// The netns exists already (a leftover: run [`Network::reconcile`], or `ip netns del`).
    #[error("netns exists already")]
    NetnsExists {
        /// The netns name.
        name: String,
    },
    /// A link exists already in the host netns (a leftover, or a hash collision of two ids).
    #[error("link exists already in the host netns")]
    LinkExists {
        /// The link name.
        name: String,
    },
    /// A netns could not be opened (it does not exist, or `/run/netns` is not readable).
    #[error("cannot open netns")]
    NetnsOpen {
        /// The bind-mount file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a netlink request for lack of privilege: run as root (needs
    /// `CAP_NET_ADMIN`).
    #[error("not permitted to {what}: needs CAP_NET_ADMIN (run as root)")]
    NotPermitted {
        /// The operation.
        what: &'static str,
    },
    /// A netlink request failed.
    #[error("netlink request failed: {what}")]
    Netlink {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// The tap could not be created (no `/dev/net/tun`: `modprobe tun`; or not root).
    #[error("cannot create the tap (needs /dev/net/tun, `modprobe tun`, and CAP_NET_ADMIN)")]
    Tap(#[source] std::io::Error),
    /// A sysctl could not be written.
    #[error("cannot write sysctl")]
    Sysctl {
        /// The key under `/proc/sys`.
        key: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `nft` binary is not on `PATH` (install the `nftables` package).
    #[error("the nft binary is missing: install the nftables package")]
    NftMissing,
    /// `nft` refused a ruleset.
    #[error("nft refused the ruleset: {stderr}")]
    NftFailed {
        /// What `nft` printed on stderr.
        stderr: String,
    },
    /// A ruleset could not be encoded as JSON.
    #[error("cannot encode the ruleset")]
    NftEncode(#[source] serde_json::Error),
    /// An I/O operation failed.
    #[error("cannot {what}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Failure injected by [`SandboxNetConfig::fail_at`] (tests).
    #[error("failure injected after setup step {step:?}")]
    Injected {
        /// The step after which setup failed.
        step: SetupStep,
    },
    /// Teardown went through every step, and these failed.
    #[error("teardown left errors ({} steps failed)", errors.len())]
    Teardown {
        /// Each failed step's error.
        errors: Vec<NetError>,
    },
}

/// Result of this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Which netns plays "the host": where the veth host ends and the shared host table go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HostNetns {
    /// The process's own netns (the root netns in production).
    #[default]
    Process,
    /// A named netns under `/run/netns` (tests use an "uplink" netns).
    Named(String),
}

impl HostNetns {
    fn path(&self) -> Option<PathBuf> {
        match self {
            HostNetns::Process => None,
            HostNetns::Named(name) => Some(netns_path(name)),
        }
    }
}

/// Configuration of a [`Network`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetConfig {
    /// Name prefixes (netns, links, host table).
    pub names: NamePrefixes,
    /// The veth address pool.
    pub pool: PoolConfig,
    /// The guest side, the same in every sandbox.
    pub guest: GuestAddressing,
    /// The netns playing the host.
    pub host_netns: HostNetns,
    /// Whether [`Network::install_host`] sets `net.ipv4.ip_forward=1` in the host netns
    /// (needed for the guest to reach the outside; a host-wide setting). Default true.
    pub host_forwarding: bool,
    /// Address exposed ports listen on. Default `127.0.0.1`.
    pub expose_bind: IpAddr,
    /// Maximum concurrent connections per exposed port; further clients wait in the listen
    /// backlog. Default 64.
    pub expose_max_connections: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            names: NamePrefixes::default(),
            pool: PoolConfig::default(),
            guest: GuestAddressing::default(),
            host_netns: HostNetns::Process,
            host_forwarding: true,
            expose_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            expose_max_connections: 64,
        }
    }
}

impl NetConfig {
    pub(crate) fn host_netns_path(&self) -> Option<PathBuf> {
        self.host_netns.path()
    }

    /// Sets the name prefixes.
    pub fn with_names(mut self, names: NamePrefixes) -> Self {
        self.names = names;
        self
    }
    /// Sets the veth pool.
    pub fn with_pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }
    /// Sets the host netns.
    pub fn with_host_netns(mut self, host: HostNetns) -> Self {
        self.host_netns = host;
        self
    }
    /// Sets the address exposed ports listen on.
    pub fn with_expose_bind(mut self, addr: IpAddr) -> Self {
        self.expose_bind = addr;
        self
    }
    /// Sets the per-port connection limit.
    pub fn with_expose_max_connections(mut self, n: usize) -> Self {
        self.expose_max_connections = n;
        self
    }
}

/// What the guest side of the sandbox netns is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GuestLink {
    /// A tap named [`names::GUEST_LINK`], whose fd goes to the VMM (production).
    #[default]
    Tap,
    /// A veth pair instead: [`names::GUEST_LINK`] in the sandbox netns, and `ifname` moved into
    /// the existing named netns `netns`, which stands in for the guest (tests). The caller
    /// configures the guest end (address, route).
    Veth {
        /// The guest's netns name (under `/run/netns`).
        netns: String,
        /// The guest end's name, in that netns.
        ifname: String,
    },
}

/// The base egress rule. The egress *policy* (another crate) replaces the `egress` chain
/// through [`Network::apply_ruleset`]; this is the default before any policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Egress {
    /// Nothing leaves the sandbox but replies to connections made into it.
    #[default]
    Deny,
    /// The guest may open connections to the outside (never to the host or other sandboxes).
    Allow,
}

/// The setup steps of [`Network::create`], in order (for [`SandboxNetConfig::fail_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetupStep {
    /// A veth slot is taken from the pool.
    Slot,
    /// The netns exists.
    Netns,
    /// IPv6 is off and IPv4 forwarding on in the netns; `lo` is up.
    Sysctls,
    /// The tap (or test veth) exists with the gateway address.
    GuestLink,
    /// The veth pair exists, its host end in the host netns and its peer moved into the netns.
    Veth,
    /// The host end has its address and is up.
    HostLink,
    /// The sandbox end has its name, address and default route.
    SandboxLink,
    /// The base ruleset is applied.
    Ruleset,
}

impl SetupStep {
    /// Every step, in order.
    pub const ALL: [SetupStep; 8] = [
        SetupStep::Slot,
        SetupStep::Netns,
        SetupStep::Sysctls,
        SetupStep::GuestLink,
        SetupStep::Veth,
        SetupStep::HostLink,
        SetupStep::SandboxLink,
        SetupStep::Ruleset,
    ];
}

/// Per-sandbox options of [`Network::create`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SandboxNetConfig {
    /// Tap (production) or veth (tests).
    pub guest_link: GuestLink,
    /// The base egress rule.
    pub egress: Egress,
    /// Test hook: fail with [`NetError::Injected`] right after this step.
    pub fail_at: Option<SetupStep>,
}

impl SandboxNetConfig {
    /// Sets the guest link.
    pub fn with_guest_link(mut self, link: GuestLink) -> Self {
        self.guest_link = link;
        self
    }
    /// Sets the base egress rule.
    pub fn with_egress(mut self, egress: Egress) -> Self {
        self.egress = egress;
        self
    }
    /// Test hook: fail right after `step`.
    pub fn with_fail_at(mut self, step: SetupStep) -> Self {
        self.fail_at = Some(step);
        self
    }
}
