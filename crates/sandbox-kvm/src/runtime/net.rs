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

use sandbox_core::{Egress, NetworkSpec, PolicyDocument, PolicyFormat};
use sandbox_net::{
    NamePrefixes, NetConfig, Network, PolicyHandle, PolicyOptions, SandboxNetConfig,
};
use sandbox_policy::{DenyEvent, Format, Policy};
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
    policy: PolicyOptions,
    network: OnceCell<Network>,
}

/// Parses and validates a spec's policy document.
pub(crate) fn parse_policy(doc: &PolicyDocument) -> Result<Policy> {
    let format = match doc.format {
        PolicyFormat::Json => Format::Json,
        PolicyFormat::Yaml => Format::Yaml,
        _ => Format::Toml,
    };
    Policy::parse(&doc.text, format).map_err(|source| RuntimeError::Policy { source })
}

impl Networks {
    pub fn new(config: NetConfig, policy: PolicyOptions) -> Self {
        Networks {
            config,
            policy,
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
    /// With a policy, the base rules deny everything and the policy's table (and its DNS
    /// resolver) replaces them before the VMM exists.
    pub async fn create(&self, id: &str, spec: &NetworkSpec) -> Result<(NetLease, Plumbing)> {
        // A bad document fails before anything is made.
        let policy = spec.policy.as_ref().map(parse_policy).transpose()?;
        let net = self.network().await?.clone();
        let egress = match (spec.egress, &policy) {
            (Egress::Allow, None) => sandbox_net::Egress::Allow,
            _ => sandbox_net::Egress::Deny,
        };
        let mut sbx = net
            .create(id, &SandboxNetConfig::default().with_egress(egress))
            .await
            .map_err(net_error)?;
        let mut lease = NetLease {
            net,
            id: id.to_string(),
            policy: None,
        };
        if let Some(policy) = &policy {
            match lease
                .net
                .apply_policy(id, policy, self.policy.clone())
                .await
            {
                Ok(handle) => lease.policy = Some(handle),
                Err(e) => {
                    lease.teardown_blocking();
                    return Err(net_error(e));
                }
            }
        }
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
    /// The enforced egress policy, if the spec had one.
    policy: Option<PolicyHandle>,
}

impl NetLease {
    /// The enforced policy's deny events (the first call takes the only receiver).
    pub fn events(&self) -> Option<tokio::sync::mpsc::Receiver<DenyEvent>> {
        self.policy.as_ref().and_then(PolicyHandle::events)
    }

    /// The enforced policy's handle, if the spec had one.
    pub fn policy(&self) -> Option<&PolicyHandle> {
        self.policy.as_ref()
    }

    /// Replaces the enforced policy in one nftables transaction.
    pub async fn replace_policy(&self, doc: &PolicyDocument) -> Result<()> {
        let policy = parse_policy(doc)?;
        match &self.policy {
            Some(h) => h.replace(&policy).await.map_err(net_error),
            None => Err(RuntimeError::Network {
                problem: "the sandbox was created without an egress policy; fix: create it with \
                          NetworkSpec::with_policy"
                    .into(),
                source: None,
            }),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_policy_document_is_an_invalid_spec_naming_its_line() {
        let doc = PolicyDocument::toml("default = \"deny\"\n[[allow]]\ncidr = \"300.0.0.0/8\"\n");
        let err = parse_policy(&doc).expect_err("a bad CIDR");
        assert_eq!(err.kind(), sandbox_core::ErrorKind::InvalidSpec);
        assert!(err.to_string().contains("line"), "{err}");
        let public = sandbox_core::Error::from(err);
        assert!(
            public
                .message()
                .contains("allow rule 1 (line 3): `cidr = \"300.0.0.0/8\"` is invalid: "),
            "the message says what is wrong with the rule: {public}"
        );
        let ok = PolicyDocument::toml(
            "default = \"deny\"\n[[allow]]\ndomain = \"pypi.org\"\nports = [443]\n",
        );
        parse_policy(&ok).expect("a valid policy");
    }

    #[test]
    fn names_are_scoped_to_the_state_directory() {
        let a = scoped_config(None, Path::new("/run/a"));
        let b = scoped_config(None, Path::new("/run/b"));
        assert_ne!(a.names, b.names);
        assert!(a.names.validate().is_ok(), "{:?}", a.names);
        assert!(a.names.link.len() <= sandbox_net::names::LINK_PREFIX_MAX);
        // A caller's own prefixes are kept.
        let mine = NetConfig::default();
        let mut custom = mine.clone();
        custom.names = NamePrefixes::new("mine-", "vmine", "mine_table");
        assert_eq!(
            scoped_config(Some(custom.clone()), Path::new("/run/a")).names,
            custom.names
        );
    }
}
