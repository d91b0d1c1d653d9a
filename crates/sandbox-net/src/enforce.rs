//! Enforcing an egress policy (`sandbox-policy`) on a sandbox: the compiled table, the
//! per-sandbox DNS resolver, the NFLOG reader and the deny-event stream (`docs/policy.md`,
//! "Enforcement").
//!
//! [`Network::apply_policy`] lists the host's addresses, opens the resolver's UDP and TCP
//! sockets on the gateway's port 53 and an NFLOG socket inside the sandbox netns, installs the
//! compiled table (it replaces the base table `inet sandbox` whole, in one transaction), and
//! starts three tasks: UDP resolver, TCP resolver, NFLOG reader. [`PolicyHandle::replace`]
//! swaps the policy in one transaction; [`Network::teardown`] stops the tasks.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, Query, ResponseCode};
use nftables::schema::{NfObject, Nftables};
use sandbox_policy::{
    DefaultAction, DenyEvent, LearnLog, LogClass, NameVerdict, NetParams, Oracle, Pins, Policy,
    Protocol, Reason, ReservedKind, Ruleset, Verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use crate::conntrack::{self, Conntrack, ReplyTuple};
use crate::dns::{self, Step};
use crate::names::{GUEST_LINK, SANDBOX_TABLE};
use crate::netns::{in_netns, netns_path};
use crate::nflog;
use crate::nft;
use crate::{NetError, Network, Result};

/// Options of [`Network::apply_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyOptions {
    /// The upstream resolver, reached from the host netns. `None`: the first `nameserver` of
    /// the host's `/etc/resolv.conf` (port 53).
    pub upstream: Option<SocketAddr>,
    /// How long to wait for the upstream answer (UDP, then TCP if truncated). Default 3 s.
    pub upstream_timeout: Duration,
    /// Queries (UDP) and connections (TCP) the resolver serves at once for this sandbox;
    /// more are dropped (UDP, the guest retries) or closed (TCP). Default 64.
    pub max_in_flight: usize,
    /// Capacity of the deny-event channel; events are dropped (and counted) when it is full.
    /// Default 1024.
    pub events_capacity: usize,
    /// Deny events per second (token bucket, burst twice that) delivered to the channel and
    /// to `tracing`; the rest are counted. Default 50.
    pub events_per_second: u32,
    /// NFLOG group of the sandbox table's `log` statements (per netns, so every sandbox can
    /// use the same one). Default 1.
    pub log_group: u16,
    /// Pin timeouts are the answer's smallest TTL clamped into `pin_min_secs..=pin_max_secs`.
    /// Defaults 300 and 3600 (5 min, 1 h).
    pub pin_min_secs: u32,
    /// See [`Self::pin_min_secs`].
    pub pin_max_secs: u32,
    /// Most (address, name) pins held at once; an answer that would pin more is answered
    /// SERVFAIL until pins expire. Default 4096.
    pub max_pins: usize,
    /// Learn mode (`default = "learn"`): most flows and most names the learn record holds
    /// (each; [`LearnLog`]), and most answered addresses it remembers the name of. Beyond
    /// that, observations are dropped and counted. Default 1024.
    pub learn_capacity: usize,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            upstream: None,
            upstream_timeout: Duration::from_secs(3),
            max_in_flight: 64,
            events_capacity: 1024,
            events_per_second: 50,
            log_group: 1,
            pin_min_secs: 300,
            pin_max_secs: 3600,
            max_pins: 4096,
            learn_capacity: 1024,
        }
    }
}

impl PolicyOptions {
    /// Sets the upstream resolver.
    pub fn with_upstream(mut self, upstream: SocketAddr) -> Self {
        self.upstream = Some(upstream);
        self
    }
    /// Sets the upstream timeout.
    pub fn with_upstream_timeout(mut self, t: Duration) -> Self {
        self.upstream_timeout = t;
        self
    }
    /// Sets the per-sandbox resolver concurrency.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }
    /// Sets the deny-event channel capacity.
    pub fn with_events_capacity(mut self, n: usize) -> Self {
        self.events_capacity = n;
        self
    }
    /// Sets the deny-event rate.
    pub fn with_events_per_second(mut self, n: u32) -> Self {
        self.events_per_second = n;
        self
    }
    /// Sets the pin limit.
    pub fn with_max_pins(mut self, n: usize) -> Self {
        self.max_pins = n;
        self
    }
    /// Sets the learn-mode record's capacity.
    pub fn with_learn_capacity(mut self, n: usize) -> Self {
        self.learn_capacity = n;
        self
    }
    /// Sets the pin timeout clamp, in seconds.
    pub fn with_pin_secs(mut self, min: u32, max: u32) -> Self {
        self.pin_min_secs = min;
        self.pin_max_secs = max;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: &str| {
            Err(NetError::Config {
                why: why.to_string(),
            })
        };
        if self.max_in_flight == 0
            || self.events_capacity == 0
            || self.events_per_second == 0
            || self.max_pins == 0
            || self.learn_capacity == 0
        {
            return bad(
                "max_in_flight, events_capacity, events_per_second, max_pins and learn_capacity \
                 must be at least 1",
            );
        }
        if self.pin_min_secs == 0 || self.pin_min_secs > self.pin_max_secs {
            return bad("pin timeouts need 1 <= pin_min_secs <= pin_max_secs");
        }
        if self.upstream_timeout.is_zero() {
            return bad("upstream_timeout must not be zero");
        }
        Ok(())
    }
}

/// Counters of one sandbox's enforcement (monotonic since [`Network::apply_policy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyStats {
    /// Guest DNS queries read (UDP datagrams and TCP messages).
    pub queries: u64,
    /// Queries answered REFUSED by policy (names, ANY/AXFR/IXFR).
    pub refused: u64,
    /// Queries forwarded upstream.
    pub forwarded: u64,
    /// Upstream failures (timeouts, errors): answered SERVFAIL.
    pub upstream_failures: u64,
    /// Queries dropped or connections closed because `max_in_flight` was reached.
    pub busy: u64,
    /// Pin batches applied with `nft`.
    pub pin_batches: u64,
    /// Answer addresses removed because the policy refuses to pin them.
    pub stripped: u64,
    /// Packets read from NFLOG.
    pub logged_packets: u64,
    /// Deny events delivered to the channel.
    pub events_sent: u64,
    /// Deny events dropped (rate limit or full channel).
    pub events_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    upstream_failures: AtomicU64,
    busy: AtomicU64,
    pin_batches: AtomicU64,
    stripped: AtomicU64,
    logged_packets: AtomicU64,
    events_sent: AtomicU64,
    events_dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A token bucket: `rate` per second, `burst` at most.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Bucket {
            tokens: rate * 2.0,
            last: Instant::now(),
            rate,
            burst: rate * 2.0,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The compiled policy and the pins the resolver installed (address, name) → deadline.
#[derive(Debug)]
struct State {
    ruleset: Ruleset,
    /// (address, name) → the earliest expiry of its set elements: what the oracle and a swap
    /// carry.
    pins: HashMap<(IpAddr, String), Instant>,
    /// (pin set, address) → when the kernel's element expires. Exact whatever the kernel's
    /// behaviour on re-adding an element (6.18 refreshes its timeout, older kernels may not):
    /// elements are only ever added when absent, or deleted and re-added in one batch.
    kernel: HashMap<(String, IpAddr), Instant>,
}

/// Seconds left until `deadline`, as an element timeout (0 when past).
fn secs_left(deadline: Instant, now: Instant) -> u32 {
    u32::try_from(deadline.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX)
}

impl State {
    fn live_pins(&self, now: Instant) -> Pins {
        let mut p = Pins::new();
        for ((ip, name), deadline) in &self.pins {
            let left = secs_left(*deadline, now);
            if left >= 1 {
                // Names were normalised when pinned.
                let _ = p.insert_with_timeout(name, *ip, left);
            }
        }
        p
    }

    /// The pins to carry over a swap: every (address, name) with the smallest remaining time
    /// among the names of that address, so that repeated elements in the batch agree and the
    /// kernel's timeout is known exactly.
    fn carry(&self, now: Instant) -> (Pins, HashMap<IpAddr, u32>) {
        let mut per_ip: HashMap<IpAddr, u32> = HashMap::new();
        for ((ip, _), d) in &self.pins {
            let left = secs_left(*d, now);
            if left >= 1 {
                per_ip
                    .entry(*ip)
                    .and_modify(|t| *t = (*t).min(left))
                    .or_insert(left);
            }
        }
        let mut p = Pins::new();
        for (ip, name) in self.pins.keys() {
            if let Some(t) = per_ip.get(ip) {
                let _ = p.insert_with_timeout(name, *ip, *t);
            }
        }
        (p, per_ip)
    }
}

/// Learn mode's record: the [`LearnLog`] and the names of the addresses the resolver answered
/// for names only learn mode allowed (no allow rule pins them, so [`State::pins`] does not
/// know them), so that a learn-mode NFLOG entry for such an address is recorded under its name.
#[derive(Debug)]
struct LearnState {
    log: LearnLog,
    /// address → (the name last answered with it, until when). At most `capacity` entries.
    names: HashMap<IpAddr, (String, Instant)>,
    capacity: usize,
    /// Addresses not remembered because `names` was full of live entries.
    unnamed: u64,
}

impl LearnState {
    fn new(capacity: usize) -> Self {
        LearnState {
            log: LearnLog::new(capacity),
            names: HashMap::new(),
            capacity,
            unnamed: 0,
        }
    }

    /// Remembers that `name` (normalised) answered with `ip` until `until`; when the map is
    /// full, expired entries go first, and if none has expired the address is not remembered
    /// (its flows are then recorded by address).
    fn remember(&mut self, ip: IpAddr, name: &str, until: Instant, now: Instant) {
        if !self.names.contains_key(&ip) && self.names.len() >= self.capacity {
            self.names.retain(|_, (_, d)| *d > now);
            if self.names.len() >= self.capacity {
                self.unnamed = self.unnamed.saturating_add(1);
                return;
            }
        }
        self.names.insert(ip, (name.to_string(), until));
    }

    /// The name `ip` was last answered for, while that answer is live.
    fn name_of(&self, ip: IpAddr, now: Instant) -> Option<&str> {
        self.names
            .get(&ip)
            .filter(|(_, d)| *d > now)
            .map(|(n, _)| n.as_str())
    }
}

/// Most pin-latency samples kept (the newest).
const LATENCY_SAMPLES: usize = 4096;

/// The newest [`LATENCY_SAMPLES`] times from an upstream answer's arrival to the kernel's
/// acknowledgement of its pin batch.
#[derive(Debug, Default)]
struct Latencies {
    samples: std::collections::VecDeque<Duration>,
}

impl Latencies {
    fn push(&mut self, d: Duration) {
        if self.samples.len() >= LATENCY_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(d);
    }
}

/// The pin elements `(set, address, timeout)` added by a batch.
fn pin_elements(b: &Nftables<'_>) -> Vec<(String, IpAddr, u32)> {
    let Ok(v) = serde_json::to_value(b) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for cmd in v["nftables"].as_array().into_iter().flatten() {
        let e = &cmd["add"]["element"];
        let Some(set) = e["name"].as_str().filter(|n| n.starts_with("pinned")) else {
            continue;
        };
        for el in e["elem"].as_array().into_iter().flatten() {
            let ip = el["elem"]["val"].as_str().and_then(|a| a.parse().ok());
            let t = el["elem"]["timeout"]
                .as_u64()
                .and_then(|t| u32::try_from(t).ok());
            if let (Some(ip), Some(t)) = (ip, t) {
                out.push((set.to_string(), ip, t));
            }
        }
    }
    out
}

/// `add element` (with `timeout`) or `delete element` (without) of one address in `set`.
fn element_cmd(table: &str, set: &str, ip: IpAddr, timeout: Option<u32>) -> NfObject<'static> {
    let v = match timeout {
        Some(t) => serde_json::json!({"add": {"element": {"family": "inet", "table": table,
            "name": set, "elem": [{"elem": {"val": ip.to_string(), "timeout": t}}]}}}),
        None => serde_json::json!({"delete": {"element": {"family": "inet", "table": table,
            "name": set, "elem": [ip.to_string()]}}}),
    };
    serde_json::from_value(v).expect("element commands match the nftables schema (tested)")
}

/// An element this close to its expiry is left to expire before it is added again (a delete
/// racing the expiry would fail the batch).
const PIN_MARGIN: Duration = Duration::from_secs(2);

/// One sandbox's enforcement state, shared by its tasks and its [`PolicyHandle`]s.
#[derive(Debug)]
pub(crate) struct Enforcer {
    id: String,
    netns: PathBuf,
    host_netns: Option<PathBuf>,
    upstream: SocketAddr,
    opts: PolicyOptions,
    net: NetParams,
    /// The veth pool, never reachable from the guest.
    pool: (Ipv4Addr, u8),
    /// Serialises table swaps and pin batches (so a pin never lands in a table being
    /// replaced, and carried pins are exact).
    state: tokio::sync::Mutex<State>,
    /// The current policy for screening without waiting on `state`.
    policy: RwLock<Arc<Policy>>,
    tx: mpsc::Sender<DenyEvent>,
    rx: Mutex<Option<mpsc::Receiver<DenyEvent>>>,
    bucket: Mutex<Bucket>,
    limit: Arc<Semaphore>,
    stats: Counters,
    /// Learn mode's record (empty unless the policy is, or was, `default = "learn"`).
    learn: Mutex<LearnState>,
    /// Answer-to-pin times, for the benchmark.
    latencies: Mutex<Latencies>,
    /// Conntrack lookups in the sandbox netns (the address a refused query was sent to).
    /// Closed at teardown: an open socket would keep the netns alive while handles exist.
    conntrack: Mutex<Option<Conntrack>>,
    /// Set when the sandbox's enforcement stops (teardown): a handle that outlives it must
    /// not touch a later sandbox with the same id.
    stopped: std::sync::atomic::AtomicBool,
}

/// The running tasks of an [`Enforcer`]; dropping this stops them (and closes their sockets).
#[derive(Debug)]
pub(crate) struct Running {
    enforcer: Arc<Enforcer>,
    tasks: Vec<AbortHandle>,
}

impl Running {
    pub(crate) fn enforcer(&self) -> Arc<Enforcer> {
        self.enforcer.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.enforcer.stopped.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
        // Closes the socket: nothing of the sandbox's netns stays open.
        self.enforcer
            .conntrack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// A handle on the egress policy enforced for one sandbox. Cheap to clone; the enforcement
/// itself runs until [`Network::teardown`], whether or not handles exist.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    enforcer: Arc<Enforcer>,
}

impl PolicyHandle {
    /// The sandbox id.
    pub fn sandbox(&self) -> &str {
        &self.enforcer.id
    }

    /// Replaces the policy: one `nft` transaction swaps the whole table (with the pins the new
    /// policy still allows, with their remaining timeouts), so no packet sees more than either
    /// policy allows. The resolver uses the new policy for every answer it has not yet pinned.
    /// Errors: [`NetError::NftFailed`] (nothing changed), [`NetError::NotFound`] after the
    /// sandbox's teardown.
    pub async fn replace(&self, policy: &Policy) -> Result<()> {
        self.enforcer.replace(policy).await
    }

    /// The deny-event stream: DNS refusals from the resolver and packet denials from NFLOG,
    /// rate-limited ([`PolicyOptions::events_per_second`]) and bounded
    /// ([`PolicyOptions::events_capacity`]). There is one receiver per sandbox: the first call
    /// takes it, later calls get `None`.
    pub fn events(&self) -> Option<mpsc::Receiver<DenyEvent>> {
        self.enforcer
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Learn mode's record so far (a copy): the flows a `deny` policy would have refused,
    /// with the name the guest resolved when known, and the names the resolver answered that
    /// `deny` would have refused (`docs/policy.md`, "Learn mode"). Bounded by
    /// [`PolicyOptions::learn_capacity`]; [`LearnLog::dropped`] counts the overflow. Empty
    /// unless the policy is, or was, `default = "learn"`; kept across [`Self::replace`].
    pub fn learned(&self) -> LearnLog {
        self.enforcer.learn_state().log.clone()
    }

    /// The policy learn mode suggests (TOML text, [`LearnLog::suggest_toml`] over the current
    /// policy): `default = "deny"`, the current policy's rules, and an allow rule per name
    /// (or bare address) and protocol seen, with the ports seen.
    pub fn suggested_policy(&self) -> String {
        self.learned().suggest_toml(&self.enforcer.policy())
    }

    /// The newest (at most 4096) times from an upstream DNS answer's arrival to the kernel's
    /// acknowledgement of the `nft` batch that put its addresses into the pin sets, in the
    /// order measured. Answers that needed no new element add no sample.
    pub fn pin_latencies(&self) -> Vec<Duration> {
        self.enforcer
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .samples
            .iter()
            .copied()
            .collect()
    }

    /// The pins in force now, with their remaining timeouts.
    pub async fn pins(&self) -> Pins {
        self.enforcer.state.lock().await.live_pins(Instant::now())
    }

    /// The network parameters the policy was compiled for (host addresses, log group).
    pub fn net_params(&self) -> &NetParams {
        &self.enforcer.net
    }

    /// The upstream resolver in use.
    pub fn upstream(&self) -> SocketAddr {
        self.enforcer.upstream
    }

    /// Counters since the policy was applied.
    pub fn stats(&self) -> PolicyStats {
        let c = &self.enforcer.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PolicyStats {
            queries: g(&c.queries),
            refused: g(&c.refused),
            forwarded: g(&c.forwarded),
            upstream_failures: g(&c.upstream_failures),
            busy: g(&c.busy),
            pin_batches: g(&c.pin_batches),
            stripped: g(&c.stripped),
            logged_packets: g(&c.logged_packets),
            events_sent: g(&c.events_sent),
            events_dropped: g(&c.events_dropped),
        }
    }
}

/// The first `nameserver` line of a resolv.conf text, as `addr:53`.
pub(crate) fn resolv_conf_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        if w.next()? != "nameserver" {
            return None;
        }
        // A scoped IPv6 address (`fe80::1%eth0`) is not usable from another netns anyway.
        let ip: IpAddr = w.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn random_u16() -> u16 {
    // RandomState is seeded from the OS per instance; good enough for a query id (the
    // upstream socket's random port carries most of the entropy, RFC 5452 §10).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() & 0xffff) as u16
}

fn name_key(qname: &str) -> String {
    qname.trim_end_matches('.').to_ascii_lowercase()
}

/// The rule of ours added at the head of `forward` after every install or swap: the guest
/// never reaches the veth pool (other sandboxes' links), even through an allow rule naming a
/// block around it; such packets are reported as reserved.
fn pool_rule(rs: &Ruleset, pool: (Ipv4Addr, u8)) -> NfObject<'static> {
    let rule = serde_json::json!({"insert": {"rule": {
    "family": "inet", "table": rs.net().table, "chain": "forward",
    "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": rs.net().tap}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": {"prefix": {"addr": pool.0.to_string(), "len": pool.1}}}},
        {"goto": {"target": LogClass::Reserved.chain()}},
    ]}}});
    serde_json::from_value(rule).expect("the pool rule matches the nftables schema (tested)")
}

/// The batch installing `rs` (replacing the base table whole), or, with `previous`, swapping
/// the running table to it in place ([`Ruleset::swap_batch`]: the base chains stay
/// registered, so NAT never misses a new connection during the swap); plus [`pool_rule`].
fn table_batch(
    rs: &Ruleset,
    previous: Option<&Ruleset>,
    carry: &Pins,
    pool: (Ipv4Addr, u8),
) -> Nftables<'static> {
    let mut b = match previous {
        None => rs.batch(carry),
        Some(prev) => rs.swap_batch(prev, carry),
    };
    b.objects.to_mut().push(pool_rule(rs, pool));
    b
}

impl Enforcer {
    fn learn_state(&self) -> std::sync::MutexGuard<'_, LearnState> {
        self.learn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the rate limit admits one more deny event (counted as dropped if not).
    fn admit(&self) -> bool {
        let allowed = self
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now());
        if !allowed {
            bump(&self.stats.events_dropped);
        }
        allowed
    }

    /// Emits a deny event to `tracing` and the channel, within the rate limit.
    fn deny(
        &self,
        protocol: Protocol,
        destination: IpAddr,
        port: u16,
        name: Option<String>,
        reason: Reason,
    ) {
        if self.admit() {
            self.emit(protocol, destination, port, name, reason);
        }
    }

    /// A refused DNS query's deny event: `name` and `reason`, and as destination the address
    /// and port the guest sent the query to (conntrack's original tuple of the redirected
    /// query from `peer`), or the resolver's own address when conntrack does not say.
    fn deny_dns(&self, protocol: Protocol, peer: SocketAddr, name: Option<String>, reason: Reason) {
        if !self.admit() {
            return;
        }
        let resolver = SocketAddrV4::new(self.net.gateway4, 53);
        let ct = self.conntrack.lock().unwrap_or_else(|p| p.into_inner());
        let asked = match (peer, ct.as_ref()) {
            (SocketAddr::V4(client), Some(ct)) => ct.original_destination(&ReplyTuple {
                proto: if protocol == Protocol::Tcp {
                    conntrack::IPPROTO_TCP
                } else {
                    conntrack::IPPROTO_UDP
                },
                resolver,
                client,
            }),
            _ => None,
        }
        .unwrap_or(resolver);
        drop(ct);
        self.emit(
            protocol,
            IpAddr::V4(*asked.ip()),
            asked.port(),
            name,
            reason,
        );
    }

    fn emit(
        &self,
        protocol: Protocol,
        destination: IpAddr,
        port: u16,
        name: Option<String>,
        reason: Reason,
    ) {
        // Names as the policy writes them: lowercase, without the root's trailing dot.
        let name = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let ev = DenyEvent::new(
            self.id.clone(),
            now_ms(),
            protocol,
            destination,
            port,
            name,
            reason,
        );
        tracing::info!(
            sandbox = %ev.sandbox,
            protocol = ?ev.protocol,
            destination = %ev.destination,
            port = ev.port,
            name = ev.name.as_deref().unwrap_or(""),
            reason = ?ev.reason,
            "egress denied"
        );
        match self.tx.try_send(ev) {
            Ok(()) => bump(&self.stats.events_sent),
            Err(_) => bump(&self.stats.events_dropped),
        }
    }

    async fn replace(&self, policy: &Policy) -> Result<()> {
        let mut st = self.state.lock().await;
        if self.stopped.load(Ordering::SeqCst) {
            return Err(NetError::NotFound {
                id: self.id.clone(),
            });
        }
        let rs = Ruleset::compile(policy, &self.net);
        let now = Instant::now();
        let (carry, per_ip) = st.carry(now);
        let batch = table_batch(&rs, Some(&st.ruleset), &carry, self.pool);
        let elements = pin_elements(&batch);
        nft::apply_in(Some(self.netns.clone()), batch).await?;
        st.pins.retain(|(ip, name), _| {
            per_ip.contains_key(ip) && !rs.pin_batch(name, &[*ip], 1).pinned.is_empty()
        });
        for ((ip, _), d) in st.pins.iter_mut() {
            if let Some(t) = per_ip.get(ip) {
                *d = now + Duration::from_secs(u64::from(*t));
            }
        }
        st.kernel = elements
            .into_iter()
            .map(|(set, ip, t)| ((set, ip), now + Duration::from_secs(u64::from(t))))
            .collect();
        st.ruleset = rs;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy.clone());
        tracing::info!(sandbox = %self.id, "egress policy replaced");
        Ok(())
    }

    /// Runs `f` in the host netns: inline when that is the process's own, else on a netns
    /// thread.
    async fn in_host<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        match &self.host_netns {
            None => f(),
            Some(p) => in_netns(Some(p.clone()), move || {
                f().map_err(|source| NetError::Io {
                    what: "open an upstream socket",
                    source,
                })
            })
            .await
            .map_err(std::io::Error::other),
        }
    }

    async fn upstream_udp(
        &self,
        request: &[u8],
        id: u16,
        query: &Query,
    ) -> std::io::Result<Message> {
        let up = self.upstream;
        let std_sock = self
            .in_host(move || {
                let any: SocketAddr = if up.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = std::net::UdpSocket::bind(any)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .await?;
        let sock = tokio::net::UdpSocket::from_std(std_sock)?;
        sock.connect(up).await?;
        sock.send(request).await?;
        let mut buf = vec![0u8; dns::MAX_UDP_ANSWER as usize * 4];
        // Wrong ids or questions are ignored (spoofing attempts); the timeout bounds the loop.
        loop {
            let n = sock.recv(&mut buf).await?;
            if let Ok(m) = Message::from_vec(&buf[..n]) {
                if dns::matches_request(&m, id, query) {
                    return Ok(m);
                }
            }
        }
    }

    async fn upstream_tcp(
        &self,
        request: &[u8],
        id: u16,
        query: &Query,
    ) -> std::io::Result<Message> {
        let up = self.upstream;
        // The socket is made in the host netns (never blocking: no connect there) and
        // connected by tokio; the caller's timeout bounds the connect.
        let socket = self
            .in_host(move || {
                if up.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
            })
            .await?;
        let mut s = socket.connect(up).await?;
        let len = u16::try_from(request.len()).map_err(std::io::Error::other)?;
        let mut framed = Vec::with_capacity(request.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(request);
        s.write_all(&framed).await?;
        let n = usize::from(s.read_u16().await?);
        let mut buf = vec![0u8; n.min(dns::MAX_UPSTREAM_LEN)];
        s.read_exact(&mut buf).await?;
        let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
        if dns::matches_request(&m, id, query) {
            Ok(m)
        } else {
            Err(std::io::Error::other(
                "upstream answer does not match the query",
            ))
        }
    }

    async fn ask_upstream(&self, query: &Query) -> std::io::Result<Message> {
        let id = random_u16();
        let request = dns::upstream_request(query, id)
            .to_vec()
            .map_err(std::io::Error::other)?;
        let t = self.opts.upstream_timeout;
        let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
        let m = tokio::time::timeout(t, self.upstream_udp(&request, id, query))
            .await
            .map_err(|_| timed_out())??;
        if !m.truncated() {
            return Ok(m);
        }
        tokio::time::timeout(t, self.upstream_tcp(&request, id, query))
            .await
            .map_err(|_| timed_out())?
    }

    /// Answers one guest query (`bytes`, from `peer`); `None` means no answer at all.
    async fn handle(&self, bytes: &[u8], protocol: Protocol, peer: SocketAddr) -> Option<Vec<u8>> {
        bump(&self.stats.queries);
        let udp = protocol == Protocol::Udp;
        let (request, query, qname) = match dns::screen(bytes, &self.policy()) {
            Step::Drop => return None,
            Step::Reply { msg, denied } => {
                if let Some((name, reason)) = denied {
                    bump(&self.stats.refused);
                    self.deny_dns(protocol, peer, name, reason);
                }
                return dns::encode(Some(&msg), &msg, udp);
            }
            Step::Forward {
                request,
                query,
                qname,
            } => (request, query, qname),
        };
        bump(&self.stats.forwarded);
        // Learn mode records every name only the default allowed, whatever upstream says.
        let d = self.policy().decide_name(&qname);
        if d.reason == Reason::Default(DefaultAction::Learn) {
            self.learn_state().log.observe_name(&d, &qname);
        }
        let answered;
        let fail = |code| {
            let mut m = Message::error_msg(request.id(), request.op_code(), code);
            m.add_query(query.clone());
            dns::encode(Some(&request), &m, udp)
        };
        let reply = match self.ask_upstream(&query).await {
            Ok(r) => {
                answered = Instant::now();
                r
            }
            Err(e) => {
                bump(&self.stats.upstream_failures);
                tracing::debug!(sandbox = %self.id, name = %qname, error = %e, "upstream DNS failed");
                return fail(ResponseCode::ServFail);
            }
        };
        let (addrs, ttl) = dns::addresses(&reply);
        let timeout = ttl
            .unwrap_or(self.opts.pin_min_secs)
            .clamp(self.opts.pin_min_secs, self.opts.pin_max_secs);
        let key = name_key(&qname);
        let pinned_now;
        let refused;
        let learned;
        // The answer's TTLs never exceed what is left of its pins, so a guest's cache never
        // outlives them.
        let ttl_cap;
        {
            let mut st = self.state.lock().await;
            // The policy may have been replaced while upstream answered.
            let d = st.ruleset.policy().decide_name(&qname);
            if d.verdict == NameVerdict::Refused {
                drop(st);
                bump(&self.stats.refused);
                self.deny_dns(protocol, peer, Some(qname), d.reason);
                return fail(ResponseCode::Refused);
            }
            learned = d.reason == Reason::Default(DefaultAction::Learn);
            let pb = st.ruleset.pin_batch(&qname, &addrs, timeout);
            let elements = pb.batch.as_ref().map(pin_elements).unwrap_or_default();
            let mut now = Instant::now();
            // Elements in their last moments expire first (bounded wait: PIN_MARGIN).
            let dying = elements
                .iter()
                .filter_map(|(set, ip, _)| st.kernel.get(&(set.clone(), *ip)).copied())
                .filter(|d| *d <= now + PIN_MARGIN)
                .max();
            if let Some(d) = dying {
                tokio::time::sleep_until((d + Duration::from_millis(50)).into()).await;
                now = Instant::now();
            }
            // Forget expired pins so the maps stay bounded by what the kernel holds.
            st.pins.retain(|_, d| *d > now);
            st.kernel.retain(|_, d| *d > now);
            let fresh_until = now + Duration::from_secs(u64::from(timeout / 2));
            let table = self.net.table.clone();
            let mut cmds = Vec::new();
            let mut touched = Vec::new();
            for (set, ip, t) in &elements {
                match st.kernel.get(&(set.clone(), *ip)) {
                    Some(d) if *d >= fresh_until => {}
                    Some(_) => {
                        // Refresh: delete and add in one batch, so the timeout is exact on
                        // every kernel and the address is never out of the set.
                        cmds.push(element_cmd(&table, set, *ip, None));
                        cmds.push(element_cmd(&table, set, *ip, Some(*t)));
                        touched.push((set.clone(), *ip));
                    }
                    None => {
                        cmds.push(element_cmd(&table, set, *ip, Some(*t)));
                        touched.push((set.clone(), *ip));
                    }
                }
            }
            if !cmds.is_empty() {
                let new = touched
                    .iter()
                    .filter(|k| !st.kernel.contains_key(*k))
                    .count();
                if st.kernel.len().saturating_add(new) > self.opts.max_pins {
                    tracing::warn!(sandbox = %self.id, name = %qname, "pin limit reached");
                    return fail(ResponseCode::ServFail);
                }
                let batch = Nftables {
                    objects: cmds.into(),
                };
                if let Err(e) = nft::apply_in(Some(self.netns.clone()), batch).await {
                    // Never answer with addresses the table does not allow.
                    tracing::warn!(sandbox = %self.id, error = %e, "pin batch failed");
                    return fail(ResponseCode::ServFail);
                }
                bump(&self.stats.pin_batches);
                self.latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(answered.elapsed());
                let deadline = now + Duration::from_secs(u64::from(timeout));
                for k in touched {
                    st.kernel.insert(k, deadline);
                }
            }
            // Each pinned address lives as long as its shortest-lived element.
            for ip in &pb.pinned {
                let d = elements
                    .iter()
                    .filter(|(_, a, _)| a == ip)
                    .filter_map(|(set, a, _)| st.kernel.get(&(set.clone(), *a)).copied())
                    .min();
                if let Some(d) = d {
                    st.pins.insert((*ip, key.clone()), d);
                }
            }
            ttl_cap = pb
                .pinned
                .iter()
                .filter_map(|ip| st.pins.get(&(*ip, key.clone())))
                .map(|d| secs_left(*d, now))
                .min()
                .map_or(timeout, |s| s.min(timeout));
            pinned_now = pb.pinned;
            refused = pb.refused;
        }
        let keep = |ip: IpAddr| !refused.contains(&ip.to_canonical());
        if learned {
            // Before the answer leaves: the guest's first packet to an address finds its name.
            let now = Instant::now();
            let until = now + Duration::from_secs(u64::from(timeout));
            let mut learn = self.learn_state();
            for ip in addrs.iter().map(|a| a.to_canonical()).filter(|a| keep(*a)) {
                learn.remember(ip, &key, until, now);
            }
        }
        let stripped = addrs.iter().filter(|ip| !keep(**ip)).count();
        self.stats
            .stripped
            .fetch_add(stripped as u64, Ordering::Relaxed);
        tracing::debug!(sandbox = %self.id, name = %qname, pinned = ?pinned_now, stripped, ttl_cap, "DNS answer");
        dns::encode(
            Some(&request),
            &dns::answer(&request, &reply, &keep, ttl_cap),
            udp,
        )
    }

    /// Records one learn-mode NFLOG entry (a new connection that `deny` would have refused)
    /// in the learn log, under the name the resolver last answered with its address (learn's
    /// own map, else a pin), decided again against the current policy and pins.
    async fn learned_packet(&self, destination: IpAddr, port: u16, protocol: Protocol) {
        let st = self.state.lock().await;
        let now = Instant::now();
        let pins = st.live_pins(now);
        let dst = destination.to_canonical();
        let mut learn = self.learn_state();
        let name = learn
            .name_of(dst, now)
            .map(str::to_owned)
            .or_else(|| pins.names(dst).next().map(|(n, _)| n.to_owned()));
        let d = Oracle::new(st.ruleset.policy(), &self.net, &pins).decide(
            dst,
            port,
            protocol,
            name.as_deref(),
        );
        learn.log.observe(&d, dst, port, protocol, name.as_deref());
    }

    /// Turns one NFLOG entry into a deny event.
    async fn logged(&self, p: nflog::LoggedPacket) {
        bump(&self.stats.logged_packets);
        let Some(class) = LogClass::from_prefix(&p.prefix) else {
            return;
        };
        let Some(protocol) = p.protocol else {
            tracing::debug!(sandbox = %self.id, destination = %p.destination, class = ?class, "logged packet of an unmodelled protocol");
            return;
        };
        if class == LogClass::Learn {
            self.learned_packet(p.destination, p.port, protocol).await;
            return;
        }
        let reason = match class.reason() {
            Some(r) => r,
            None => {
                let st = self.state.lock().await;
                let pins = st.live_pins(Instant::now());
                let d = Oracle::new(st.ruleset.policy(), &self.net, &pins).decide(
                    p.destination,
                    p.port,
                    protocol,
                    None,
                );
                match (d.verdict, class) {
                    (Verdict::Deny, _) => d.reason,
                    // A race with a swap or an expiry: keep the class.
                    (_, LogClass::Reserved) => Reason::Reserved(ReservedKind::Range),
                    _ => Reason::Default(sandbox_policy::DefaultAction::Deny),
                }
            }
        };
        self.deny(protocol, p.destination, p.port, None, reason);
    }
}

async fn serve_udp(enf: Arc<Enforcer>, sock: tokio::net::UdpSocket) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 2 * dns::MAX_QUERY_LEN];
    let mut tasks = JoinSet::new();
    let guest = IpAddr::V4(enf.net.guest4);
    loop {
        while tasks.try_join_next().is_some() {}
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(sandbox = %enf.id, error = %e, "resolver UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Only the guest asks (a spoofed source would make us reflect answers).
        if peer.ip() != guest {
            continue;
        }
        let Ok(permit) = enf.limit.clone().try_acquire_owned() else {
            bump(&enf.stats.busy);
            continue;
        };
        let bytes = buf[..n].to_vec();
        let (enf, sock) = (enf.clone(), sock.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Some(answer) = enf.handle(&bytes, Protocol::Udp, peer).await {
                let _ = sock.send_to(&answer, peer).await;
            }
        });
    }
}

/// Queries per TCP connection before the resolver closes it.
const TCP_QUERIES_PER_CONNECTION: usize = 64;
/// Idle time after which the resolver closes a TCP connection.
const TCP_IDLE: Duration = Duration::from_secs(10);

async fn serve_tcp(enf: Arc<Enforcer>, listener: tokio::net::TcpListener) {
    let mut tasks = JoinSet::new();
    let guest = IpAddr::V4(enf.net.guest4);
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(sandbox = %enf.id, error = %e, "resolver TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if peer.ip() != guest {
            continue;
        }
        let Ok(permit) = enf.limit.clone().try_acquire_owned() else {
            bump(&enf.stats.busy);
            continue;
        };
        let enf = enf.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let _ = tcp_connection(&enf, stream, peer).await;
        });
    }
}

async fn tcp_connection(
    enf: &Enforcer,
    mut s: tokio::net::TcpStream,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; dns::MAX_QUERY_LEN];
    for _ in 0..TCP_QUERIES_PER_CONNECTION {
        let n = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
            Ok(r) => usize::from(r?),
            Err(_) => return Ok(()),
        };
        if n > dns::MAX_QUERY_LEN {
            return Ok(());
        }
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf[..n]))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(answer) = enf.handle(&buf[..n], Protocol::Tcp, peer).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        s.write_all(&framed).await?;
    }
    Ok(())
}

async fn read_nflog(enf: Arc<Enforcer>, sock: netlink_sys::Socket) {
    // `AsyncFd::new` is deprecated because a `T: AsRawFd` need not own its fd; ours does
    // (`netlink_sys::Socket` closes it on drop and nothing else holds it), which is the
    // ownership the unsafe `AsyncFd::register` asks callers to promise.
    #[allow(deprecated)]
    let fd = match tokio::io::unix::AsyncFd::new(sock) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(sandbox = %enf.id, error = %e, "NFLOG socket not pollable; no packet deny events");
            return;
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        buf.clear();
        match guard.try_io(|s| s.get_ref().recv(&mut buf, 0)) {
            Ok(Ok(_)) => {
                let batch = nflog::parse_datagram(&buf);
                for p in batch.packets {
                    enf.logged(p).await;
                }
                if !batch.errors.is_empty() || batch.malformed > 0 {
                    tracing::debug!(sandbox = %enf.id, errors = ?batch.errors, malformed = batch.malformed, "NFLOG messages skipped");
                }
            }
            Ok(Err(e)) => {
                // ENOBUFS: the kernel dropped entries (a flood); go on reading.
                tracing::debug!(sandbox = %enf.id, error = %e, "NFLOG receive failed");
            }
            Err(_would_block) => {}
        }
    }
}

/// Opens an NFLOG socket bound to `group` in the calling thread's netns, non-blocking.
fn open_nflog(group: u16) -> std::io::Result<netlink_sys::Socket> {
    let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.send(&nflog::bind_request(group, 1), 0)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    s.recv(&mut buf, 0)?;
    let b = nflog::parse_datagram(&buf);
    if let Some(e) = b.errors.first() {
        return Err(std::io::Error::from_raw_os_error(-e));
    }
    s.set_non_blocking(true)?;
    Ok(s)
}

impl Network {
    /// Enforces `policy` on sandbox `id` (`docs/policy.md`, "Enforcement"): installs the
    /// compiled table (replacing the base table whole, in one transaction), and starts the
    /// sandbox's DNS resolver (UDP and TCP on the gateway's port 53 inside the sandbox netns;
    /// upstream queries leave from the host netns to [`PolicyOptions::upstream`]) and its NFLOG
    /// reader. The host's addresses (every address in the host netns, read now) are always
    /// denied. Calling it again for the same sandbox replaces the policy
    /// ([`PolicyHandle::replace`]) and returns a handle to the same enforcement (options are
    /// kept). [`Network::teardown`] stops everything. The work runs on its own task: dropping
    /// this future never leaves the table installed without its resolver.
    ///
    /// Errors: [`NetError::NotFound`] (no such sandbox), [`NetError::Config`] (bad options,
    /// or no usable `nameserver` in `/etc/resolv.conf`), [`NetError::Io`] (sockets, e.g. port
    /// 53 taken), [`NetError::NftFailed`].
    pub async fn apply_policy(
        &self,
        id: &str,
        policy: &Policy,
        opts: PolicyOptions,
    ) -> Result<PolicyHandle> {
        // On its own task, like `create`: dropping this future never leaves a table installed
        // without its resolver.
        let (this, id, policy) = (self.clone(), id.to_string(), policy.clone());
        tokio::spawn(async move { this.start_policy(&id, &policy, opts).await })
            .await
            .map_err(|_| NetError::Io {
                what: "apply the egress policy",
                source: std::io::Error::other("the policy task panicked"),
            })?
    }

    async fn start_policy(
        &self,
        id: &str,
        policy: &Policy,
        opts: PolicyOptions,
    ) -> Result<PolicyHandle> {
        opts.validate()?;
        if let Some(enforcer) = self.enforcer_of(id)? {
            enforcer.replace(policy).await?;
            return Ok(PolicyHandle { enforcer });
        }
        let slot = self.slot_of(id)?;
        let names = self.names(id)?;
        let upstream = match opts.upstream {
            Some(u) => u,
            None => {
                let text =
                    std::fs::read_to_string("/etc/resolv.conf").map_err(|source| NetError::Io {
                        what: "read /etc/resolv.conf",
                        source,
                    })?;
                resolv_conf_nameserver(&text).ok_or_else(|| NetError::Config {
                    why: "no nameserver in /etc/resolv.conf: set PolicyOptions::upstream".into(),
                })?
            }
        };
        let cfg = self.config();
        let mut host = self.host_addresses().await?;
        host.extend([IpAddr::V4(slot.host), IpAddr::V4(slot.sandbox)]);
        let net = NetParams::new(GUEST_LINK, cfg.guest.guest, cfg.guest.gateway)
            .with_table(SANDBOX_TABLE)
            .with_host_addrs(host)
            .with_log_group(opts.log_group);
        let netns = netns_path(&names.netns);
        let gw = SocketAddr::new(IpAddr::V4(cfg.guest.gateway), 53);
        let group = opts.log_group;
        let (udp, tcp, nflog_sock, conntrack) = in_netns(Some(netns.clone()), move || {
            let io = |what| move |source| NetError::Io { what, source };
            let nflog_sock = open_nflog(group)
                .map_err(io("open the NFLOG socket (needs the nfnetlink_log module)"))?;
            // Optional: without it, DNS deny events name the resolver as the destination.
            let conntrack = Conntrack::open()
                .map_err(|e| {
                    tracing::warn!(error = %e, "no conntrack lookups (nf_conntrack_netlink): DNS deny events name the resolver, not the address asked");
                })
                .ok();
            let udp = std::net::UdpSocket::bind(gw).map_err(io("bind the resolver (UDP)"))?;
            udp.set_nonblocking(true)
                .map_err(io("bind the resolver (UDP)"))?;
            let tcp = std::net::TcpListener::bind(gw).map_err(io("bind the resolver (TCP)"))?;
            tcp.set_nonblocking(true)
                .map_err(io("bind the resolver (TCP)"))?;
            Ok((udp, tcp, nflog_sock, conntrack))
        })
        .await?;
        let io = |what| move |source| NetError::Io { what, source };
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(io("register the resolver"))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(io("register the resolver"))?;

        let ruleset = Ruleset::compile(policy, &net);
        for w in ruleset.warnings() {
            tracing::warn!(sandbox = id, warning = ?w, "egress policy warning");
        }
        let pool = (cfg.pool.network, cfg.pool.prefix_len);
        nft::apply_in(
            Some(netns.clone()),
            table_batch(&ruleset, None, &Pins::new(), pool),
        )
        .await?;
        let (tx, rx) = mpsc::channel(opts.events_capacity);
        let enforcer = Arc::new(Enforcer {
            id: id.to_string(),
            netns,
            host_netns: cfg.host_netns_path(),
            upstream,
            net,
            pool,
            state: tokio::sync::Mutex::new(State {
                ruleset,
                pins: HashMap::new(),
                kernel: HashMap::new(),
            }),
            policy: RwLock::new(Arc::new(policy.clone())),
            tx,
            rx: Mutex::new(Some(rx)),
            bucket: Mutex::new(Bucket::new(opts.events_per_second)),
            limit: Arc::new(Semaphore::new(opts.max_in_flight)),
            stats: Counters::default(),
            learn: Mutex::new(LearnState::new(opts.learn_capacity)),
            conntrack: Mutex::new(conntrack),
            latencies: Mutex::default(),
            stopped: Default::default(),
            opts,
        });
        let tasks = vec![
            tokio::spawn(serve_udp(enforcer.clone(), udp)).abort_handle(),
            tokio::spawn(serve_tcp(enforcer.clone(), tcp)).abort_handle(),
            tokio::spawn(read_nflog(enforcer.clone(), nflog_sock)).abort_handle(),
        ];
        let running = Running {
            enforcer: enforcer.clone(),
            tasks,
        };
        let enforcer = self.set_running(id, running)?;
        tracing::info!(sandbox = id, upstream = %enforcer.upstream, "egress policy enforced");
        Ok(PolicyHandle { enforcer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_first_usable_nameserver() {
        let t = "# comment\nsearch example\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(
            resolv_conf_nameserver(t),
            Some("192.0.2.53:53".parse().expect("addr"))
        );
        assert_eq!(resolv_conf_nameserver("search x\n"), None);
    }

    #[test]
    fn bucket_limits_bursts_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10);
        let first = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(first, 20, "burst is twice the rate");
        assert!(!b.take(t0));
        assert!(
            b.take(t0 + Duration::from_millis(150)),
            "refills at the rate"
        );
    }

    #[test]
    fn pool_rule_heads_forward() {
        let p = Policy::from_toml("[[allow]]\ncidr = \"10.0.0.0/8\"\n").expect("valid");
        let net = NetParams::new(GUEST_LINK, [172, 30, 0, 2].into(), [172, 30, 0, 1].into());
        let rs = Ruleset::compile(&p, &net);
        let pool = ([10, 200, 0, 0].into(), 16);
        let b = table_batch(&rs, None, &Pins::new(), pool);
        let j = serde_json::to_value(&b).expect("json");
        let last = j["nftables"]
            .as_array()
            .expect("array")
            .last()
            .expect("rule")
            .clone();
        let swap =
            serde_json::to_value(table_batch(&rs, Some(&rs), &Pins::new(), pool)).expect("json");
        assert_eq!(
            swap["nftables"].as_array().expect("array").last(),
            Some(&last)
        );
        assert_eq!(swap["nftables"][1]["flush"]["table"]["name"], "sandbox");
        assert_eq!(last["insert"]["rule"]["chain"], "forward");
        assert_eq!(
            last["insert"]["rule"]["expr"][2],
            serde_json::json!({"goto": {"target": "deny_reserved"}})
        );
        assert!(last.to_string().contains(r#""addr":"10.200.0.0","len":16"#));
    }

    #[test]
    fn pin_elements_and_element_commands() {
        let p = Policy::from_toml(
            "[[allow]]\ndomain = \"a.test\"\nports = [443]\n[[allow]]\ndomain = \"a.test\"\nports = [80]\n",
        )
        .expect("valid");
        let net = NetParams::new(GUEST_LINK, [172, 30, 0, 2].into(), [172, 30, 0, 1].into());
        let rs = Ruleset::compile(&p, &net);
        let ip: IpAddr = "203.0.113.10".parse().expect("ip");
        let b = rs.pin_batch("a.test", &[ip], 300).batch.expect("pinned");
        let mut got = pin_elements(&b);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("pinned4_0".to_string(), ip, 300),
                ("pinned4_1".to_string(), ip, 300)
            ]
        );
        let doc = Nftables {
            objects: vec![
                element_cmd("sandbox", "pinned4_0", ip, None),
                element_cmd("sandbox", "pinned4_0", ip, Some(60)),
            ]
            .into(),
        };
        assert_eq!(pin_elements(&doc), vec![("pinned4_0".to_string(), ip, 60)]);
        let j = serde_json::to_string(&doc).expect("json");
        assert!(j.contains(r#"{"delete":{"element":{"family":"inet","table":"sandbox","name":"pinned4_0","elem":["203.0.113.10"]}}}"#), "{j}");
    }

    #[test]
    fn carry_uses_the_shortest_time_per_address() {
        let p = Policy::from_toml("[[allow]]\ndomain = \"*.test\"\n").expect("valid");
        let net = NetParams::new(GUEST_LINK, [172, 30, 0, 2].into(), [172, 30, 0, 1].into());
        let now = Instant::now();
        let ip: IpAddr = "203.0.113.10".parse().expect("ip");
        let mut st = State {
            ruleset: Ruleset::compile(&p, &net),
            pins: HashMap::new(),
            kernel: HashMap::new(),
        };
        st.pins
            .insert((ip, "a.test".into()), now + Duration::from_secs(100));
        st.pins
            .insert((ip, "b.test".into()), now + Duration::from_secs(50));
        st.pins.insert(
            ("203.0.113.11".parse().expect("ip"), "c.test".into()),
            now - Duration::from_secs(1),
        );
        let (carry, per_ip) = st.carry(now);
        assert_eq!(per_ip.len(), 1);
        let t: Vec<u32> = carry.names(ip).map(|(_, t)| t).collect();
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| (49..=50).contains(t)), "{t:?}");
    }

    #[test]
    fn learn_names_are_bounded_and_expire() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let mut l = LearnState::new(2);
        l.remember(
            ip("203.0.113.1"),
            "a.test",
            now + Duration::from_secs(5),
            now,
        );
        l.remember(
            ip("203.0.113.2"),
            "b.test",
            now + Duration::from_secs(60),
            now,
        );
        // Full of live entries: not remembered, counted.
        l.remember(ip("203.0.113.3"), "c.test", later, now);
        assert_eq!(l.name_of(ip("203.0.113.3"), now), None);
        assert_eq!(l.unnamed, 1);
        // A known address is renamed in place even when full.
        l.remember(
            ip("203.0.113.2"),
            "b2.test",
            later + Duration::from_secs(60),
            now,
        );
        assert_eq!(l.name_of(ip("203.0.113.2"), now), Some("b2.test"));
        // Once the first expires, its room is reused.
        assert_eq!(l.name_of(ip("203.0.113.1"), later), None);
        l.remember(
            ip("203.0.113.3"),
            "c.test",
            later + Duration::from_secs(60),
            later,
        );
        assert_eq!(l.name_of(ip("203.0.113.3"), later), Some("c.test"));
        assert_eq!(l.names.len(), 2);
    }

    #[test]
    fn latency_samples_keep_the_newest() {
        let mut l = Latencies::default();
        for i in 0..(LATENCY_SAMPLES as u64 + 10) {
            l.push(Duration::from_micros(i));
        }
        assert_eq!(l.samples.len(), LATENCY_SAMPLES);
        assert_eq!(l.samples.front(), Some(&Duration::from_micros(10)));
    }

    #[test]
    fn options_are_validated() {
        assert!(PolicyOptions::default().validate().is_ok());
        assert!(PolicyOptions::default()
            .with_max_in_flight(0)
            .validate()
            .is_err());
        assert!(PolicyOptions::default()
            .with_learn_capacity(0)
            .validate()
            .is_err());
        assert!(PolicyOptions::default()
            .with_pin_secs(600, 300)
            .validate()
            .is_err());
    }
}
