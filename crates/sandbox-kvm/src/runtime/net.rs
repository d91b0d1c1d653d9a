//! Sandbox networks (docs/network.md): the runtime's [`sandbox_net::Network`], set up the first
//! time a spec asks for a network, and one [`NetLease`] per networked sandbox.
//!
//! Names: every object carries a prefix derived from the runtime's state directory (the same
//! key as its cgroups), so two runtimes on one host never reconcile each other's networks:
//! netns `sbxnet-<key>-<sandbox id>`, host links `v<5 hex of key><8 hex>`, host table
//! `sandbox_sdk_<key>`.
//!
//! Teardown runs on a thread of its own with its own tokio runtime, so it works from any
//! context: a `Drop`, the cleanup thread, or while the caller's runtime shuts down.

use sandbox_core::{Egress, NetworkSpec};
use sandbox_net::{NamePrefixes, NetConfig, Network, SandboxNetConfig};
use std::path::Path;
use tokio::sync::OnceCell;

use super::jail::state_key;
use super::{Result, RuntimeError};

/// The guest's MAC address, the same in every sandbox (each has its own netns and tap).
pub(crate) const GUEST_MAC: &str = "02:53:42:00:00:02";

/// `config` with its name prefixes made unique to the runtime on `state_dir`, unless the caller
/// set their own.
pub(crate) fn scoped_config(config: Option<NetConfig>, state_dir: &Path) -> NetConfig {
    match config {
        Some(c) if c.names != NamePrefixes::default() => c,
        other => {
            let key = state_key(state_dir);
            let mut c = other.unwrap_or_default();
            c.names = NamePrefixes::new(
                &format!("sbxnet-{key}-"),
                &format!("v{}", &key[..5]),
                &format!("sandbox_sdk_{key}"),
            );
            c
        }
    }
}

/// The runtime's network, made on first use.
#[derive(Debug)]
pub(crate) struct Networks {
    config: NetConfig,
    network: OnceCell<Network>,
}

impl Networks {
    pub fn new(config: NetConfig) -> Self {
        Networks {
            config,
            network: OnceCell::new(),
        }
    }

    /// The network, with its host table installed (first call only).
    async fn network(&self) -> Result<&Network> {
        self.network
            .get_or_try_init(|| async {
                let net = Network::new(self.config.clone()).map_err(net_error)?;
                net.install_host().await.map_err(net_error)?;
                Ok(net)
            })
            .await
    }

    /// Creates sandbox `id`'s network: its netns, tap, veth pair and base rules.
    pub async fn create(&self, id: &str, spec: &NetworkSpec) -> Result<(NetLease, Plumbing)> {
        let net = self.network().await?.clone();
        let egress = match spec.egress {
            Egress::Allow => sandbox_net::Egress::Allow,
            _ => sandbox_net::Egress::Deny,
        };
        let mut sbx = net
            .create(id, &SandboxNetConfig::default().with_egress(egress))
            .await
            .map_err(net_error)?;
        let lease = NetLease {
            net,
            id: id.to_string(),
        };
        let Some(tap) = sbx.take_tap() else {
            lease.teardown_blocking();
            return Err(RuntimeError::Network {
                problem: "the sandbox network came without its tap".into(),
                source: None,
            });
        };
        let plumbing = Plumbing {
            tap,
            ip_param: sbx.kernel_ip_param(),
        };
        Ok((lease, plumbing))
    }

    /// Deletes the network objects of this runtime's sandboxes whose directory is gone (their
    /// runtime died). Blocking; a no-op without root (nothing could have been made).
    pub fn reconcile_blocking(&self, state_dir: &Path) {
        if !super::sys::is_root() {
            return;
        }
        let config = self.config.clone();
        let state_dir = state_dir.to_path_buf();
        let run = move || -> std::result::Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let net = Network::new(config).map_err(|e| e.to_string())?;
                let alive = move |id: &str| state_dir.join(id).exists();
                let report = net.reconcile(&alive).await.map_err(|e| e.to_string())?;
                if !report.removed.is_empty() {
                    tracing::info!(removed = ?report.removed, "removed networks of dead sandboxes");
                }
                Ok(())
            })
        };
        match std::thread::spawn(run).join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "network reconciliation failed"),
            Err(_) => tracing::warn!("network reconciliation panicked"),
        }
    }
}

/// What the VMM gets of a sandbox network.
#[derive(Debug)]
pub(crate) struct Plumbing {
    /// The tap, inherited by the VMM.
    pub tap: std::os::fd::OwnedFd,
    /// The kernel's `ip=` parameter for the guest.
    pub ip_param: String,
}

/// One sandbox's network; [`NetLease::teardown_blocking`] deletes it.
#[derive(Debug, Clone)]
pub(crate) struct NetLease {
    net: Network,
    id: String,
}

impl NetLease {
    /// Forwards a host TCP port to `guest_port`; returns the host address.
    pub async fn expose(&self, guest_port: u16) -> Result<std::net::SocketAddr> {
        self.net
            .expose(&self.id, guest_port)
            .await
            .map_err(net_error)
    }

    /// Stops forwarding to `guest_port`; whether it was forwarded.
    pub fn unexpose(&self, guest_port: u16) -> bool {
        self.net.unexpose(&self.id, guest_port)
    }

    /// Deletes the sandbox's netns, links and rules (idempotent). Blocking: runs on a thread of
    /// its own with its own runtime, so it works in a `Drop` and on any thread.
    pub fn teardown_blocking(&self) {
        let (net, id) = (self.net.clone(), self.id.clone());
        let run = move || -> std::result::Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(net.teardown(&id)).map_err(|e| e.to_string())
        };
        match std::thread::spawn(run).join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(id = %self.id, error = %e, "sandbox network teardown failed")
            }
            Err(_) => tracing::warn!(id = %self.id, "sandbox network teardown panicked"),
        }
    }
}

fn net_error(source: sandbox_net::NetError) -> RuntimeError {
    RuntimeError::Network {
        problem: source.to_string(),
        source: Some(Box::new(source)),
    }
}
