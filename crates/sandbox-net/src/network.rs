//! [`Network`]: sandbox setup, teardown, reconciliation, and the ruleset hook.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::cleanup::{run_all, CleanupStack, Undo, UndoOps};
use crate::expose::Exposure;
use crate::names::{Names, GUEST_LINK, SANDBOX_UPLINK};
use crate::netns::{self, in_netns, netns_path, write_sysctl};
use crate::nft::{self, SandboxRules};
use crate::pool::{AddressPool, Slot};
use crate::{
    sys, GuestAddressing, GuestLink, NetConfig, NetError, Result, SandboxNetConfig, SetupStep,
};

/// One sandbox's network, as [`Network::create`] returns it.
#[derive(Debug)]
pub struct SandboxNet {
    /// The sandbox id.
    pub id: String,
    /// The names of its objects.
    pub names: Names,
    /// Its veth slot (host and sandbox end addresses).
    pub slot: Slot,
    /// The guest's address, gateway and resolver.
    pub guest: GuestAddressing,
    tap: Option<OwnedFd>,
}

impl SandboxNet {
    /// The tap fd (`O_NONBLOCK`, 12-byte vnet header), to hand to the VMM; `None` after the
    /// first call, and with [`GuestLink::Veth`]. The tap disappears when its last fd closes.
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// The kernel `ip=` parameter for the guest's `eth0` ([`GuestAddressing::kernel_ip_param`]).
    pub fn kernel_ip_param(&self) -> String {
        self.guest.kernel_ip_param("eth0")
    }
}

/// What [`Network::reconcile`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Sandbox ids whose objects were deleted (owner dead).
    pub removed: Vec<String>,
    /// Host links deleted because no live sandbox owns them.
    pub removed_links: Vec<String>,
    /// Live sandboxes this `Network` did not know, now tracked (their veth slot is reserved).
    pub adopted: Vec<String>,
    /// Steps that failed; reconciliation went on past them.
    pub errors: Vec<NetError>,
}

#[derive(Debug)]
struct Record {
    slot: Slot,
    exposures: HashMap<u16, Exposure>,
    /// The enforced egress policy (resolver and NFLOG reader tasks), if any.
    policy: Option<crate::enforce::Running>,
}

#[derive(Debug)]
struct State {
    pool: AddressPool,
    sandboxes: HashMap<String, Record>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: NetConfig,
    state: Mutex<State>,
}

/// The network side of every sandbox of one runtime. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

fn nl(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |source| match errno(&source) {
        Some(libc::EPERM) | Some(libc::EACCES) => NetError::NotPermitted { what },
        _ => NetError::Netlink { what, source },
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A netlink handle whose socket lives in `netns` (created on a netns thread), driven by a
/// task on the current tokio runtime until the handle is dropped.
async fn rtnl(netns: Option<PathBuf>) -> Result<Handle> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = in_netns(netns, move || {
        let _entered = rt.enter();
        rtnetlink::new_connection().map_err(|source| NetError::Io {
            what: "open a netlink socket",
            source,
        })
    })
    .await?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl("look up a link")(e)),
    }
}

async fn need_index(h: &Handle, name: &str) -> Result<u32> {
    link_index(h, name).await?.ok_or(NetError::Netlink {
        what: "find a link just created",
        source: rtnetlink::Error::RequestFailed,
    })
}

async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("set a link up"))
}

async fn add_addr(h: &Handle, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
    h.address()
        .add(index, IpAddr::V4(addr), prefix_len)
        .execute()
        .await
        .map_err(nl("add an address"))
}

async fn move_link(h: &Handle, name: &str, netns: &std::path::Path) -> Result<()> {
    let file = File::open(netns).map_err(|source| NetError::NetnsOpen {
        path: netns.to_path_buf(),
        source,
    })?;
    h.link()
        .set(
            LinkUnspec::new_with_name(name)
                .setns_by_fd(file.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("move a link into a netns"))
}

fn sysctls(
    netns: Option<PathBuf>,
    kv: Vec<(String, &'static str)>,
) -> impl std::future::Future<Output = Result<()>> {
    in_netns(netns, move || {
        kv.iter().try_for_each(|(k, v)| write_sysctl(k, v))
    })
}

impl UndoOps for Inner {
    async fn undo(&self, undo: &Undo) -> Result<()> {
        match undo {
            Undo::Forget { id, slot } => {
                let mut st = self.lock();
                if st.sandboxes.get(id).is_some_and(|r| r.slot.index == *slot) {
                    st.sandboxes.remove(id);
                }
                st.pool.release(*slot);
                Ok(())
            }
            Undo::DeleteNetns(name) => {
                let name = name.clone();
                in_netns(None, move || netns::delete_named(&name)).await
            }
            Undo::DeleteHostLink(name) => {
                let h = rtnl(self.cfg.host_netns.path()).await?;
                let Some(index) = link_index(&h, name).await? else {
                    return Ok(());
                };
                match h.link().del(index).execute().await {
                    Ok(()) => Ok(()),
                    Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
                    Err(e) => Err(nl("delete a host link")(e)),
                }
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data (a bitmap and a map) consistent
        // enough to go on: every critical section is a few infallible updates.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the armed cleanup if the setup task unwinds (a panic) or is cancelled (runtime
/// shutdown) half-way.
struct SetupGuard {
    stack: CleanupStack,
    inner: Arc<Inner>,
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        if self.stack.is_empty() {
            return;
        }
        let undos = self.stack.take();
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    run_all(&*inner, &undos).await;
                });
            }
            Err(_) => tracing::warn!(
                ?undos,
                "sandbox network setup abandoned outside a runtime; run reconcile"
            ),
        }
    }
}

impl Network {
    /// A network with `cfg`, checked here. Nothing is created until [`Self::install_host`] or
    /// [`Self::create`].
    pub fn new(cfg: NetConfig) -> Result<Self> {
        cfg.names.validate()?;
        cfg.guest.validate()?;
        let pool = AddressPool::new(cfg.pool)?;
        if cfg.expose_max_connections == 0 {
            return Err(NetError::Config {
                why: "expose_max_connections must be at least 1".into(),
            });
        }
        if let crate::HostNetns::Named(name) = &cfg.host_netns {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(NetError::Config {
                    why: format!("host netns name {name:?} is not a file name"),
                });
            }
        }
        Ok(Network {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State {
                    pool,
                    sandboxes: HashMap::new(),
                }),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.inner.cfg
    }

    /// The names of sandbox `id`'s objects.
    pub fn names(&self, id: &str) -> Result<Names> {
        Ok(self.inner.cfg.names.derive(id)?)
    }

    /// Installs (or replaces, atomically) the shared table in the host netns and, if
    /// [`NetConfig::host_forwarding`], sets `net.ipv4.ip_forward=1` there. Idempotent.
    pub async fn install_host(&self) -> Result<()> {
        let cfg = &self.inner.cfg;
        let host = cfg.host_netns.path();
        if cfg.host_forwarding {
            sysctls(host.clone(), vec![("net/ipv4/ip_forward".into(), "1")]).await?;
        }
        let block = (cfg.pool.network, cfg.pool.prefix_len);
        nft::apply_in(
            host,
            nft::host_ruleset(&cfg.names.host_table, &cfg.names.link, block),
        )
        .await
    }

    /// Deletes the shared host table (forwarding is left as it is). Idempotent.
    pub async fn uninstall_host(&self) -> Result<()> {
        let cfg = &self.inner.cfg;
        nft::apply_in(
            cfg.host_netns.path(),
            nft::delete_table(&cfg.names.host_table),
        )
        .await
    }

    /// Builds sandbox `id`'s network. Each step arms its cleanup as it goes: on error
    /// everything created so far is deleted and the slot released. The steps run on their own
    /// task, so dropping this future never abandons a step half-done: the setup finishes, and
    /// if nobody is waiting for it any more, it is torn down again.
    ///
    /// Errors: [`NetError::AlreadyExists`], [`NetError::Pool`] (exhausted),
    /// [`NetError::NetnsExists`]/[`NetError::LinkExists`] (leftovers: run [`Self::reconcile`]),
    /// [`NetError::NotPermitted`], [`NetError::Tap`], [`NetError::NftMissing`], and
    /// [`NetError::Injected`] from the test hook.
    pub async fn create(&self, id: &str, spec: &SandboxNetConfig) -> Result<SandboxNet> {
        let names = self.names(id)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (this, id, spec) = (self.clone(), id.to_string(), spec.clone());
        tokio::spawn(async move {
            // The guard only matters if this task panics or the runtime shuts down mid-setup.
            let mut guard = SetupGuard {
                stack: CleanupStack::new(),
                inner: this.inner.clone(),
            };
            let result = match this.setup(&id, &names, &spec, &mut guard.stack).await {
                Ok(net) => {
                    guard.stack.disarm();
                    tracing::info!(sandbox = %id, netns = %names.netns, host_link = %names.host_link, "sandbox network created");
                    Ok(net)
                }
                Err(e) => {
                    let undos = guard.stack.take();
                    let errors = run_all(&*this.inner, &undos).await;
                    tracing::debug!(sandbox = %id, error = %e, cleanup_errors = errors.len(), "sandbox network setup failed");
                    Err(e)
                }
            };
            if let Err(Ok(net)) = tx.send(result) {
                // The caller went away: undo the whole sandbox (the tap closes with `net`).
                drop(net);
                if let Err(e) = this.teardown(&id).await {
                    tracing::warn!(sandbox = %id, error = %e, "teardown of an abandoned sandbox network failed");
                }
            }
        });
        rx.await.map_err(|_| NetError::Io {
            what: "create the sandbox network",
            source: std::io::Error::other("the setup task panicked"),
        })?
    }

    async fn setup(
        &self,
        id: &str,
        names: &Names,
        spec: &SandboxNetConfig,
        stack: &mut CleanupStack,
    ) -> Result<SandboxNet> {
        let cfg = &self.inner.cfg;
        let check = |step: SetupStep| match spec.fail_at {
            Some(s) if s == step => Err(NetError::Injected { step }),
            _ => Ok(()),
        };

        // 1. A veth slot; the id is taken in this Network from here on.
        let slot = {
            let mut st = self.inner.lock();
            if st.sandboxes.contains_key(id) {
                return Err(NetError::AlreadyExists { id: id.to_string() });
            }
            let slot = st.pool.allocate()?;
            st.sandboxes.insert(
                id.to_string(),
                Record {
                    slot,
                    exposures: HashMap::new(),
                    policy: None,
                },
            );
            slot
        };
        stack.push(Undo::Forget {
            id: id.to_string(),
            slot: slot.index,
        });
        check(SetupStep::Slot)?;

        // 2. The netns. Armed only once it is ours (it may exist already, owned by someone).
        let nsname = names.netns.clone();
        in_netns(None, move || netns::create_named(&nsname)).await?;
        stack.push(Undo::DeleteNetns(names.netns.clone()));
        check(SetupStep::Netns)?;
        let sns = netns_path(&names.netns);

        // 3. IPv6 off on every interface (the defaults apply to links created or moved in
        //    later), forwarding on, lo up.
        let off = |i: &str| (format!("net/ipv6/conf/{i}/disable_ipv6"), "1");
        sysctls(
            Some(sns.clone()),
            vec![
                off("all"),
                off("default"),
                off("lo"),
                ("net/ipv4/ip_forward".into(), "1"),
            ],
        )
        .await?;
        let sh = rtnl(Some(sns.clone())).await?;
        let lo = need_index(&sh, "lo").await?;
        set_up(&sh, lo).await?;
        check(SetupStep::Sysctls)?;

        // 4. The guest link: the tap (its fd is the only reference) or the test veth.
        let tap = match &spec.guest_link {
            GuestLink::Tap => Some(
                in_netns(Some(sns.clone()), || {
                    sys::open_tap(GUEST_LINK).map_err(NetError::Tap)
                })
                .await?,
            ),
            GuestLink::Veth { netns: gns, ifname } => {
                sh.link()
                    .add(LinkVeth::new(GUEST_LINK, ifname).build())
                    .execute()
                    .await
                    .map_err(nl("create the guest veth"))?;
                move_link(&sh, ifname, &netns_path(gns)).await?;
                None
            }
        };
        sysctls(Some(sns.clone()), vec![off(GUEST_LINK)]).await?;
        let gl = need_index(&sh, GUEST_LINK).await?;
        add_addr(&sh, gl, cfg.guest.gateway, cfg.guest.prefix_len).await?;
        set_up(&sh, gl).await?;
        check(SetupStep::GuestLink)?;

        // 5. The veth pair, created in the host netns; the peer moves into the sandbox netns.
        let host = cfg.host_netns.path();
        let hh = rtnl(host.clone()).await?;
        match hh
            .link()
            .add(LinkVeth::new(&names.host_link, &names.peer_link).build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                return Err(NetError::LinkExists {
                    name: names.host_link.clone(),
                })
            }
            Err(e) => return Err(nl("create the veth pair")(e)),
        }
        stack.push(Undo::DeleteHostLink(names.host_link.clone()));
        let hl = names.host_link.as_str();
        sysctls(
            host,
            vec![
                (format!("net/ipv6/conf/{hl}/disable_ipv6"), "1"),
                (format!("net/ipv6/conf/{hl}/accept_ra"), "0"),
            ],
        )
        .await?;
        move_link(&hh, &names.peer_link, &sns).await?;
        check(SetupStep::Veth)?;

        // 6. The host end.
        let hi = need_index(&hh, &names.host_link).await?;
        add_addr(&hh, hi, slot.host, slot.prefix_len).await?;
        set_up(&hh, hi).await?;
        check(SetupStep::HostLink)?;

        // 7. The sandbox end: a fixed name, so every sandbox netns looks the same inside.
        let pi = need_index(&sh, &names.peer_link).await?;
        sh.link()
            .set(LinkUnspec::new_with_index(pi).name(SANDBOX_UPLINK).build())
            .execute()
            .await
            .map_err(nl("rename the sandbox veth end"))?;
        sysctls(
            Some(sns.clone()),
            vec![
                off(SANDBOX_UPLINK),
                (format!("net/ipv6/conf/{SANDBOX_UPLINK}/accept_ra"), "0"),
            ],
        )
        .await?;
        add_addr(&sh, pi, slot.sandbox, slot.prefix_len).await?;
        set_up(&sh, pi).await?;
        sh.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(slot.host)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("add the default route"))?;
        check(SetupStep::SandboxLink)?;

        // 8. The base ruleset.
        let rules = SandboxRules {
            guest: cfg.guest.guest,
            gateway: cfg.guest.gateway,
            pool: (cfg.pool.network, cfg.pool.prefix_len),
            egress: spec.egress,
        };
        nft::apply_in(Some(sns), nft::sandbox_ruleset(&rules)).await?;
        check(SetupStep::Ruleset)?;

        Ok(SandboxNet {
            id: id.to_string(),
            names: names.clone(),
            slot,
            guest: cfg.guest,
            tap,
        })
    }

    /// Deletes sandbox `id`'s network: stops its exposed ports, deletes the host link (and so
    /// the pair) and the netns (and so the tap, rules and conntrack), releases its slot. Goes on
    /// past errors and reports them all ([`NetError::Teardown`]); deleting what is already gone
    /// is success, so teardown is idempotent and also works for ids this `Network` never saw.
    pub async fn teardown(&self, id: &str) -> Result<()> {
        let names = self.names(id)?;
        let slot = {
            let mut st = self.inner.lock();
            st.sandboxes.get_mut(id).map(|r| {
                r.exposures.clear();
                // Stops the resolver and the NFLOG reader, closing their sockets.
                r.policy = None;
                r.slot.index
            })
        };
        let mut undos = vec![
            Undo::DeleteHostLink(names.host_link.clone()),
            Undo::DeleteNetns(names.netns.clone()),
        ];
        if let Some(slot) = slot {
            undos.push(Undo::Forget {
                id: id.to_string(),
                slot,
            });
        }
        let errors = run_all(&*self.inner, &undos).await;
        if errors.is_empty() {
            tracing::info!(sandbox = id, "sandbox network deleted");
            Ok(())
        } else {
            Err(NetError::Teardown { errors })
        }
    }

    /// Start-up reconciliation: finds objects by name prefix (netns `<netns prefix>*` under
    /// `/run/netns`, links `<link prefix>*` in the host netns) and deletes those whose owner is
    /// dead: a sandbox whose `alive(id)` is false and that this `Network` does not track. A live
    /// sandbox this `Network` does not track is adopted (its slot is reserved, read back from
    /// its host link's address) so that it is neither reused nor leaked.
    pub async fn reconcile(
        &self,
        alive: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<ReconcileReport> {
        let cfg = &self.inner.cfg;
        let mut report = ReconcileReport::default();
        let prefix = cfg.names.netns.clone();
        let found = in_netns(None, move || netns::list_named(&prefix)).await?;
        let (mut keep, mut dead) = (Vec::new(), Vec::new());
        {
            let st = self.inner.lock();
            for ns in &found {
                let Some(id) = cfg.names.id_of_netns(ns) else {
                    continue;
                };
                if st.sandboxes.contains_key(id) || alive(id) {
                    keep.push(id.to_string());
                } else {
                    dead.push(id.to_string());
                }
            }
        }
        for id in &dead {
            match self.teardown(id).await {
                Ok(()) => report.removed.push(id.clone()),
                Err(NetError::Teardown { errors }) => report.errors.extend(errors),
                Err(e) => report.errors.push(e),
            }
        }

        // Links with no live owner (e.g. setup died between the veth and the netns delete).
        let mut owned = HashSet::new();
        let tracked: Vec<String> = self.inner.lock().sandboxes.keys().cloned().collect();
        for id in keep.iter().chain(&tracked) {
            if let Ok(n) = cfg.names.derive(id) {
                owned.insert(n.host_link);
                owned.insert(n.peer_link);
            }
        }
        let hh = rtnl(cfg.host_netns.path()).await?;
        let mut ours = Vec::new();
        let mut links = hh.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(nl("list links"))? {
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name.filter(|n| cfg.names.is_our_link(n)) {
                ours.push((name, m.header.index));
            }
        }
        for (name, _) in ours.iter().filter(|(n, _)| !owned.contains(n)) {
            match self.inner.undo(&Undo::DeleteHostLink(name.clone())).await {
                Ok(()) => report.removed_links.push(name.clone()),
                Err(e) => report.errors.push(e),
            }
        }

        // Adopt live sandboxes we do not track: reserve their slot.
        for id in keep.iter().filter(|id| !tracked.contains(id)) {
            let Ok(n) = cfg.names.derive(id) else {
                continue;
            };
            let Some(&(_, index)) = ours.iter().find(|(name, _)| *name == n.host_link) else {
                continue;
            };
            let mut addrs = hh.address().get().set_link_index_filter(index).execute();
            let mut host_addr = None;
            while let Some(m) = addrs.try_next().await.map_err(nl("list addresses"))? {
                for a in &m.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(v4)) = a {
                        host_addr = Some(*v4);
                    }
                }
            }
            let mut st = self.inner.lock();
            let Some(slot) = host_addr.and_then(|a| st.pool.slot_of_host(a)) else {
                continue;
            };
            if st.pool.reserve(slot.index) {
                st.sandboxes.insert(
                    id.clone(),
                    Record {
                        slot,
                        exposures: HashMap::new(),
                        policy: None,
                    },
                );
                report.adopted.push(id.clone());
            }
        }
        tracing::info!(
            removed = report.removed.len(),
            removed_links = report.removed_links.len(),
            adopted = report.adopted.len(),
            errors = report.errors.len(),
            "network reconciled"
        );
        Ok(report)
    }

    /// Applies an nftables JSON document atomically (`nft -j -f -`, one transaction) inside
    /// sandbox `id`'s netns: the raw hook under [`Self::apply_policy`] (which replaces the base
    /// table `inet sandbox` whole with a compiled policy). Errors: [`NetError::NetnsOpen`] if the sandbox has no netns,
    /// [`NetError::NftFailed`] if `nft` refuses the document (then nothing changed).
    pub async fn apply_ruleset(
        &self,
        id: &str,
        ruleset: nftables::schema::Nftables<'static>,
    ) -> Result<()> {
        let names = self.names(id)?;
        nft::apply_in(Some(netns_path(&names.netns)), ruleset).await
    }

    /// Forwards TCP connections to `<expose_bind>:<ephemeral port>` to the guest's `guest_port`,
    /// until [`Self::unexpose`] or [`Self::teardown`]. The upstream socket is created inside the
    /// sandbox netns, then driven by tokio; at most [`NetConfig::expose_max_connections`]
    /// connections run at once. Exposing a port twice returns the same address.
    pub async fn expose(&self, id: &str, guest_port: u16) -> Result<std::net::SocketAddr> {
        let names = self.names(id)?;
        {
            let st = self.inner.lock();
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| NetError::NotFound { id: id.to_string() })?;
            if let Some(e) = rec.exposures.get(&guest_port) {
                return Ok(e.addr());
            }
        }
        let cfg = &self.inner.cfg;
        let exposure = Exposure::start(
            cfg.expose_bind,
            netns_path(&names.netns),
            std::net::SocketAddr::new(IpAddr::V4(cfg.guest.guest), guest_port),
            cfg.expose_max_connections,
        )
        .await?;
        let mut st = self.inner.lock();
        let rec = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound { id: id.to_string() })?;
        // A concurrent expose of the same port may have won; keep the first one.
        Ok(rec.exposures.entry(guest_port).or_insert(exposure).addr())
    }

    /// Runs `f` on a fresh OS thread inside sandbox `id`'s netns and returns its result: the
    /// way to create sockets that must live there (the DNS resolver's UDP/TCP sockets on the
    /// gateway's port 53, for example). The calling thread never changes netns; sockets keep
    /// the netns they were created in, so tokio can drive them afterwards.
    pub async fn run_in_netns<T, F>(&self, id: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let names = self.names(id)?;
        in_netns(Some(netns_path(&names.netns)), move || {
            f().map_err(|source| NetError::Io {
                what: "run work in the sandbox netns",
                source,
            })
        })
        .await
    }

    /// The veth slot of tracked sandbox `id`.
    pub(crate) fn slot_of(&self, id: &str) -> Result<Slot> {
        self.inner
            .lock()
            .sandboxes
            .get(id)
            .map(|r| r.slot)
            .ok_or_else(|| NetError::NotFound { id: id.to_string() })
    }

    /// The enforcer of sandbox `id`, if a policy is enforced.
    pub(crate) fn enforcer_of(&self, id: &str) -> Result<Option<Arc<crate::enforce::Enforcer>>> {
        let st = self.inner.lock();
        let rec = st
            .sandboxes
            .get(id)
            .ok_or_else(|| NetError::NotFound { id: id.to_string() })?;
        Ok(rec.policy.as_ref().map(|r| r.enforcer()))
    }

    /// Records `running` as sandbox `id`'s enforcement; if one is there already (a concurrent
    /// apply won), `running` is stopped and the existing enforcer returned.
    pub(crate) fn set_running(
        &self,
        id: &str,
        running: crate::enforce::Running,
    ) -> Result<Arc<crate::enforce::Enforcer>> {
        let mut st = self.inner.lock();
        let rec = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| NetError::NotFound { id: id.to_string() })?;
        Ok(rec.policy.get_or_insert(running).enforcer())
    }

    /// Every address of every link in the host netns (what a sandbox must never reach).
    pub(crate) async fn host_addresses(&self) -> Result<Vec<IpAddr>> {
        let h = rtnl(self.inner.cfg.host_netns.path()).await?;
        let mut out = Vec::new();
        let mut addrs = h.address().get().execute();
        while let Some(m) = addrs.try_next().await.map_err(nl("list addresses"))? {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a {
                    out.push(*ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Stops forwarding `guest_port` of sandbox `id`; open connections are closed. Returns
    /// whether the port was exposed.
    pub fn unexpose(&self, id: &str, guest_port: u16) -> bool {
        let mut st = self.inner.lock();
        st.sandboxes
            .get_mut(id)
            .and_then(|r| r.exposures.remove(&guest_port))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// The runtime spawns these futures on a multi-threaded runtime: they must be `Send`.
    #[test]
    fn futures_are_send() {
        let net = Network::new(NetConfig::default()).expect("default config is valid");
        let spec = SandboxNetConfig::default();
        let alive = |_: &str| true;
        assert_send(&net.create("a", &spec));
        assert_send(&net.teardown("a"));
        assert_send(&net.reconcile(&alive));
        assert_send(&net.expose("a", 80));
        assert_send(&net.install_host());
        assert_send(&net.run_in_netns("a", || Ok(())));
        let policy = sandbox_policy::Policy::from_toml("").expect("empty policy is valid");
        assert_send(&net.apply_policy("a", &policy, crate::PolicyOptions::default()));
    }

    #[test]
    fn rejects_bad_configs() {
        let mut c = NetConfig::default().with_expose_max_connections(0);
        assert!(matches!(
            Network::new(c.clone()),
            Err(NetError::Config { .. })
        ));
        c = NetConfig::default().with_host_netns(crate::HostNetns::Named("a/b".into()));
        assert!(matches!(Network::new(c), Err(NetError::Config { .. })));
        let names = crate::NamePrefixes::new("sbx-", "waytoolong", "t");
        assert!(matches!(
            Network::new(NetConfig::default().with_names(names)),
            Err(NetError::Name(_))
        ));
        let net = Network::new(NetConfig::default()).expect("valid");
        assert!(matches!(net.names("a/b"), Err(NetError::Name(_))));
        assert!(!net.unexpose("nobody", 80));
    }
}
