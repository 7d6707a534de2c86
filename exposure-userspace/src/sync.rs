//! The reconciler: desired state -> the fewest map writes, in an order with no window where a frontend
//! points at a missing or half-written backend set (Cilium's `bpf_reconciler` order: backends, then
//! the Maglev table, then the service, then frontends; deletions last).
//!
//! A changed backend set gets a new Maglev table written into free space of the `MAGLEV` array; it
//! goes live when the service entry (offset + size) is replaced in one map update, so no packet sees a
//! mix. The old region is reused only a sync later, long after any packet that read the old entry.
//! IDs are stable and restored from the pinned maps at start, so a restarted agent rewrites nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use exposure_common::{
    self as common, Addr, Backend, Frontend, FrontendKey, Service, BACKEND_LOCAL,
    FRONTEND_CLUSTER_IP, FRONTEND_DRAINING, FRONTEND_EXTERNAL_IP, FRONTEND_LOADBALANCER,
    FRONTEND_NODEPORT, NO_SERVICE, SERVICE_DROP_WHEN_EMPTY, SERVICE_IN_USE, SERVICE_SOURCE_RANGES,
};

use crate::maglev;
use crate::metrics::FrontendLabel;
use crate::model::{
    AddrPort, BackendAddr, Changed, DesiredService, DesiredState, FrontendAddr, FrontendKind,
    Protocol, Scope, ServicePortName, WhenEmpty,
};

/// Everything the datapath maps hold that the reconciler owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Only ids in use (non-default entries).
    pub services: BTreeMap<u32, Service>,
    /// Each service's Maglev table, read from its region.
    pub tables: BTreeMap<u32, TableRead>,
    /// Only ids in use (non-zero address).
    pub backends: BTreeMap<u32, Backend>,
    /// `loadBalancerSourceRanges` entries: (service id, network address, prefix length).
    pub source_ranges: BTreeSet<(u32, Addr, u8)>,
    /// `FRONTEND_PORTS`: only words with a bit set.
    pub frontend_ports: BTreeMap<u32, u64>,
}

/// A Maglev table as read from the maps: its entries (backend ids), or only their digest, which
/// is all a maps check needs to compare them (the entries of 10,000 tables take 41 MB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableRead {
    Entries(Vec<u32>),
    Digest(u64),
}

impl TableRead {
    /// The entries (none for a digest).
    pub fn entries(&self) -> &[u32] {
        match self {
            TableRead::Entries(ids) => ids,
            TableRead::Digest(_) => &[],
        }
    }

    /// A digest of `ids`: the same for the same entries in the same order, and different for
    /// any others but by a chance of about one in 2^64.
    pub fn digest_of(ids: impl Iterator<Item = u32>) -> u64 {
        // A 64-bit multiply-xorshift mix per entry (so each entry, of id 0 too, changes it):
        // cheap next to reading them.
        ids.fold(0x243f_6a88_85a3_08d3, |h: u64, id| {
            let h = (h ^ u64::from(id)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^ (h >> 29)
        })
    }
}

impl Snapshot {
    /// The distinct backends a service's Maglev table selects from (none when only its digest
    /// was read).
    pub fn backends_of(&self, service_id: u32) -> Vec<&Backend> {
        let ids: BTreeSet<u32> = self
            .tables
            .get(&service_id)
            .map(TableRead::entries)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        ids.iter().filter_map(|id| self.backends.get(id)).collect()
    }

    /// Every (frontend, endpoint) pair of the UDP frontends in the maps (an earlier run's, at
    /// start), as [`crate::model::udp_pairs`] gives them for a desired state.
    pub fn udp_pairs(&self) -> BTreeSet<(AddrPort, AddrPort)> {
        let mut pairs = BTreeSet::new();
        for (key, fe) in &self.frontends {
            let frontend = FrontendAddr {
                ip: IpAddr::from(key.addr),
                port: common::port_host(key.port),
                protocol: match Protocol::from_number(key.proto) {
                    Some(p) => p,
                    None => continue,
                },
                scope: Scope::from_number(key.scope),
            };
            if !crate::model::is_udp_peer(&frontend) {
                continue;
            }
            for b in self.backends_of(fe.service_id) {
                let endpoint = (IpAddr::from(b.addr), common::port_host(b.port));
                pairs.insert(((frontend.ip, frontend.port), endpoint));
            }
        }
        pairs
    }
}

/// [`differ`] for an expected map: `(expected, actual)`.
fn differ_maps<K: Ord, V: PartialEq>(
    out: &mut Vec<String>,
    what: &str,
    (expected, actual): (&BTreeMap<K, V>, &BTreeMap<K, V>),
    show: impl Fn(&K) -> String,
) {
    differ(
        out,
        what,
        expected.keys(),
        |k| expected.get(k).map(Same),
        actual,
        show,
    );
}

/// An expected value compared with an actual one by `==` ([`differ`] takes any `E: PartialEq<V>`).
struct Same<'a, V>(&'a V);

impl<V: PartialEq> PartialEq<V> for Same<'_, V> {
    fn eq(&self, other: &V) -> bool {
        self.0 == other
    }
}

/// Restores `s`'s Maglev state from `snapshot`: its backends (ids in address order), the digest of
/// its table, and whether that table is one this build would not write.
fn restore_table(id: &u32, s: &mut ServiceSlots, snapshot: &Snapshot, maglev_table_max: u32) {
    // (A check's read, with digests only, never restores.)
    let table: &[u32] = snapshot.tables.get(id).map_or(&[], TableRead::entries);
    let mut live: Vec<u32> = table
        .iter()
        .copied()
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect();
    let addr_of = |id: &u32| {
        snapshot
            .backends
            .get(id)
            .map(|b| (IpAddr::from(b.addr), common::port_host(b.port)))
    };
    live.sort_by_key(addr_of);
    // Kept only if it is the table this build writes (so a restart rewrites nothing);
    // else written anew, as after a change of its backends.
    let addrs: Option<Vec<(IpAddr, u16)>> = live.iter().map(addr_of).collect();
    s.foreign_table = addrs.is_none_or(|addrs| {
        let ours = maglev_ids(&live, &addrs, maglev_table_max);
        ours != table
    });
    s.table = TableRead::digest_of(table.iter().copied());
    s.live = live;
}

/// A service's table (the digest of its ids), compared with a table read from the maps.
struct TableIds<'a>(&'a ServiceSlots);

impl PartialEq<TableRead> for TableIds<'_> {
    fn eq(&self, actual: &TableRead) -> bool {
        let digest = match actual {
            TableRead::Entries(ids) => TableRead::digest_of(ids.iter().copied()),
            TableRead::Digest(digest) => *digest,
        };
        self.0.table == digest
    }
}

/// The ids of the Maglev table this build writes for backends `live` (ids in address order,
/// `addrs` their addresses in the same order).
fn maglev_ids(live: &[u32], addrs: &[(IpAddr, u16)], max_size: u32) -> Vec<u32> {
    if live.is_empty() {
        return Vec::new();
    }
    let m = maglev::table_size(live.len(), max_size);
    maglev::build(addrs, m)
        .into_iter()
        .map(|i| live[i as usize])
        .collect()
}

/// Appends to `out` how `actual` differs from what `expected` gives for each of `keys` (all it
/// holds): entries missing, changed and extra, with counts and the first few keys.
fn differ<'a, K: Ord + 'a, V: 'a, E: PartialEq<V>>(
    out: &mut Vec<String>,
    what: &str,
    keys: impl Iterator<Item = &'a K>,
    expected: impl Fn(&K) -> Option<E>,
    actual: &BTreeMap<K, V>,
    show: impl Fn(&K) -> String,
) {
    let mut missing = Vec::new();
    let mut changed = Vec::new();
    for k in keys {
        match (expected(k), actual.get(k)) {
            (_, None) => missing.push(show(k)),
            (Some(want), Some(have)) if want != *have => changed.push(show(k)),
            _ => {}
        }
    }
    let extra: Vec<String> = actual
        .keys()
        .filter(|k| expected(k).is_none())
        .map(&show)
        .collect();
    let mut parts = Vec::new();
    for (how, keys) in [("missing", missing), ("changed", changed), ("extra", extra)] {
        if keys.is_empty() {
            continue;
        }
        let mut shown: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
        if keys.len() > 3 {
            shown.push("...");
        }
        parts.push(format!("{} {how} ({})", keys.len(), shown.join(", ")));
    }
    if !parts.is_empty() {
        out.push(format!("{what}: {}", parts.join("; ")));
    }
}

/// The writes the reconciler needs; the kernel maps implement it, and so does [`FakeMaps`] for tests.
pub trait DatapathMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()>;
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()>;
    /// Writes `entries` at `MAGLEV[offset..]`, before anything points there.
    fn write_table(&mut self, offset: u32, entries: &[u32]) -> anyhow::Result<()>;
    fn write_service(&mut self, id: u32, service: &Service) -> anyhow::Result<()>;
    fn write_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> anyhow::Result<()>;
    fn remove_frontend(&mut self, key: &FrontendKey) -> anyhow::Result<()>;
    /// Writes word `word` of `FRONTEND_PORTS` (ports' bits by [`common::port_bit`]).
    fn write_frontend_ports(&mut self, word: u32, bits: u64) -> anyhow::Result<()>;
    fn add_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()>;
    fn remove_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()>;
    /// Forgets every session affinity entry that does not stick a client of a service in `live`
    /// (the services with affinity, by id, and their backend ids) to one of that service's
    /// backends; returns how many it forgot.
    fn sweep_affinity(&mut self, live: &BTreeMap<u32, BTreeSet<u32>>) -> anyhow::Result<usize>;
    /// Forgets a UDP service's flows to `backends`, which left it but serve another service (the
    /// datapath itself moves flows whose backend is gone altogether).
    fn purge_udp_flows(&mut self, service_id: u32, backends: &[u32]) -> anyhow::Result<()>;
    /// Zeroes a frontend id's traffic counters before the id is given to a new frontend.
    fn reset_frontend_stats(&mut self, id: u32) -> anyhow::Result<()>;
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
}

/// Capacity limits; exceeding one is an error for that object, never a corrupt map.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries of the `MAGLEV` array (all services' tables together).
    pub maglev_entries: u32,
    /// Largest Maglev table for one service (a prime from `maglev::TABLE_SIZES`).
    pub maglev_table_max: u32,
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub backends_per_service: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            maglev_entries: common::MAX_MAGLEV_ENTRIES,
            maglev_table_max: 65_521,
            frontends: common::MAX_FRONTENDS,
            services: common::MAX_SERVICES,
            backends: common::MAX_BACKENDS,
            backends_per_service: common::MAX_BACKENDS_PER_SERVICE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "{service}: no free service id (limit {limit}); not programmed (raise --max-services)"
    )]
    ServiceLimit {
        service: ServicePortName,
        limit: u32,
    },
    #[error("{service}: {count} backends exceed the per-service limit of {limit}; not programmed (raise --max-backends-per-service)")]
    BackendsPerServiceLimit {
        service: ServicePortName,
        count: usize,
        limit: u32,
    },
    #[error(
        "{service}: no free backend id (limit {limit}); not programmed (raise --max-backends)"
    )]
    BackendLimit {
        service: ServicePortName,
        limit: u32,
    },
    #[error("{service}: its Maglev table ({entries} entries) does not fit the free space of {capacity}; not programmed (raise --max-maglev-entries)")]
    MaglevCapacity {
        service: ServicePortName,
        entries: u32,
        capacity: u32,
    },
    #[error("frontend {frontend}: no free frontend id (limit {limit}); not programmed (raise --max-frontends)")]
    FrontendLimit { frontend: String, limit: u32 },
    #[error("{service}: map write failed: {source:#}")]
    Write {
        service: String,
        source: anyhow::Error,
    },
}

trait FrontendIdError {
    fn for_frontend(self, display: &str, limit: u32) -> SyncError;
}

impl FrontendIdError for Option<anyhow::Error> {
    /// `None`: the pool is exhausted; `Some`: zeroing the counters failed.
    fn for_frontend(self, display: &str, limit: u32) -> SyncError {
        match self {
            None => SyncError::FrontendLimit {
                frontend: display.to_string(),
                limit,
            },
            Some(source) => SyncError::Write {
                service: format!("frontend {display}"),
                source,
            },
        }
    }
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub errors: Vec<SyncError>,
    /// A frontend was added, changed or removed (then `FRONTEND_PORTS` is brought up to date).
    pub frontends_changed: bool,
    /// Frontends that left their Service and now drain (as displayed).
    pub draining: Vec<String>,
}

/// Free space in the `MAGLEV` array: first fit over free regions, then the untouched tail. Freed
/// regions wait one sync in quarantine before reuse.
#[derive(Debug)]
struct Regions {
    capacity: u32,
    end: u32,
    free: BTreeMap<u32, u32>,
    quarantine: Vec<(u32, u32)>,
}

impl Regions {
    fn new(capacity: u32) -> Self {
        Regions {
            capacity,
            end: 0,
            free: BTreeMap::new(),
            quarantine: Vec::new(),
        }
    }

    /// Marks a restored table's region as used; gaps before it become free (so regions are
    /// reserved in offset order).
    fn reserve(&mut self, offset: u32, size: u32) {
        if size == 0 {
            return;
        }
        if offset > self.end {
            self.free.insert(self.end, offset - self.end);
        }
        self.end = self.end.max(offset + size);
    }

    fn alloc(&mut self, size: u32) -> Option<u32> {
        if let Some((&offset, &len)) = self.free.iter().find(|(_, len)| **len >= size) {
            self.free.remove(&offset);
            if len > size {
                self.free.insert(offset + size, len - size);
            }
            return Some(offset);
        }
        (self.end.checked_add(size)? <= self.capacity).then(|| {
            self.end += size;
            self.end - size
        })
    }

    fn free_now(&mut self, offset: u32, size: u32) {
        if size == 0 {
            return;
        }
        self.free.insert(offset, size);
        // Coalesce with neighbours so large tables find room again.
        let merged: Vec<(u32, u32)> = self.free.iter().map(|(o, l)| (*o, *l)).collect();
        self.free.clear();
        for (o, l) in merged {
            match self.free.iter_mut().next_back() {
                Some((po, pl)) if *po + *pl == o => *pl += l,
                _ => {
                    self.free.insert(o, l);
                }
            }
        }
    }

    fn free_later(&mut self, offset: u32, size: u32) {
        if size > 0 {
            self.quarantine.push((offset, size));
        }
    }

    fn release_quarantine(&mut self) {
        for (o, l) in std::mem::take(&mut self.quarantine) {
            self.free_now(o, l);
        }
    }
}

/// Hands out small dense ids, reusing freed ones.
#[derive(Debug)]
struct IdPool {
    next: u32,
    limit: u32,
    free: Vec<u32>,
}

impl IdPool {
    fn new(limit: u32) -> Self {
        IdPool {
            next: 1,
            limit,
            free: Vec::new(),
        }
    }
    fn alloc(&mut self, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        while let Some(id) = self.free.pop() {
            if !in_use(id) {
                return Some(id);
            }
        }
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if !in_use(id) {
                return Some(id);
            }
        }
        None
    }
    fn release(&mut self, id: u32) {
        self.free.push(id);
    }
}

/// What one service id currently holds in the maps.
#[derive(Clone, Debug, Default)]
struct ServiceSlots {
    service: Service,
    /// Its backend ids, in address order (the order the Maglev table indexes).
    live: Vec<u32>,
    /// Ids of its endpoints that still serve but take no new flow (`still_serving`): kept in
    /// `BACKENDS`, so UDP flows to them go on.
    kept: Vec<u32>,
    /// The digest of its Maglev table's ids as the maps hold it ([`TableRead::digest_of`]): what
    /// a maps check compares. The table itself is a function of `live`'s addresses, built again
    /// only when they change (at 10,000 Services of 1,021 entries the tables would take 20 MB).
    table: u64,
    /// Restored from maps whose table is not the one this build writes for `live` (an earlier
    /// build's, or changed by something else): written anew at the Service's next apply.
    foreign_table: bool,
    /// Its `loadBalancerSourceRanges` entries: (network address, prefix length).
    ranges: BTreeSet<(Addr, u8)>,
}

pub struct Reconciler {
    limits: Limits,
    service_ids: BTreeMap<ServicePortName, u32>,
    backend_ids: HashMap<(IpAddr, u16), u32>,
    service_pool: IdPool,
    frontend_pool: IdPool,
    /// The ids in `frontends`, for O(1) "is this id taken".
    frontend_ids: HashSet<u32>,
    /// The ids in `service_ids`, with their names: "is this id taken", and whose it is.
    claimed: HashMap<u32, ServicePortName>,
    /// What each Service port was last successfully programmed with.
    applied: HashMap<ServicePortName, Arc<DesiredService>>,
    backend_pool: IdPool,
    /// Free space in the `MAGLEV` array.
    regions: Regions,
    // What the maps hold now (as written by us or restored at start).
    frontends: BTreeMap<FrontendKey, Frontend>,
    services: BTreeMap<u32, ServiceSlots>,
    backends: BTreeMap<u32, Backend>,
    /// How many services' live sets hold each backend id (ids held by none are absent): a change
    /// then finds the backends it freed without walking every backend.
    backend_refs: HashMap<u32, u32>,
    /// Ids that may have lost their last service, or were handed out and perhaps never written
    /// (with the address they were handed out for): settled at the end of a reconcile.
    maybe_unused: BTreeMap<u32, (IpAddr, u16)>,
    /// `FRONTEND_PORTS` as written: words with a bit set.
    frontend_ports: BTreeMap<u32, u64>,
    /// `FRONTEND_PORTS` may not match the frontends though none changed: just restored (a pin of
    /// an earlier build may lack it), or a write failed.
    frontend_ports_stale: bool,
    /// Session affinity may stick clients to a backend that left their service, or hold entries
    /// of a service that went or turned affinity off: swept before any id they name is reused.
    affinity_sweep_due: bool,
    /// Removed services' ids, handed back to the pool once their affinity entries are swept.
    unswept_service_ids: BTreeSet<u32>,
    /// How many service ports of the last desired state want each `FRONTENDS` key.
    claims: HashMap<FrontendKey, u32>,
    /// The last reconcile looked at every service port or at all that changed, and wrote all
    /// it had to: `applied` is the desired state it was given, every port is programmed.
    clean: bool,
    /// What changed since [`Reconciler::update_frontend_labels`] last ran; `None`: everything
    /// (it never ran).
    relabel: Option<Relabel>,
}

/// What metrics labels depend on that changed: frontends written or removed, and service ids
/// that were given to a Service port or lost theirs (whose frontends may be left as they were).
#[derive(Default)]
struct Relabel {
    frontends: BTreeSet<FrontendKey>,
    service_ids: BTreeSet<u32>,
}

fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr: Addr::from(f.ip),
        port: common::port(f.port),
        proto: f.protocol.number(),
        scope: f.scope.number(),
    }
}

/// `address:port/PROTOCOL`, as status and metrics show a frontend.
pub fn frontend_display(key: &FrontendKey) -> String {
    let proto = crate::model::Protocol::from_number(key.proto)
        .map_or_else(|| key.proto.to_string(), |p| p.to_string());
    let at = crate::model::display_addr_port(IpAddr::from(key.addr), common::port_host(key.port));
    let scope = match crate::model::Scope::from_number(key.scope) {
        crate::model::Scope::External => "",
        crate::model::Scope::NodeSockets => " (node sockets)",
    };
    format!("{at}/{proto}{scope}")
}

/// The backend ids a service's `current` slots have or keep that `live` and `kept` do not.
fn left_service(current: &ServiceSlots, live: &[u32], kept: &[u32]) -> Vec<u32> {
    let now: BTreeSet<&u32> = live.iter().chain(kept).collect();
    let before = current.live.iter().chain(&current.kept);
    let left: BTreeSet<u32> = before.filter(|b| !now.contains(b)).copied().collect();
    left.into_iter().collect()
}

fn frontend_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::NodePort => FRONTEND_NODEPORT,
        FrontendKind::LoadBalancer => FRONTEND_LOADBALANCER,
        FrontendKind::ExternalIp => FRONTEND_EXTERNAL_IP,
        FrontendKind::ClusterIp => FRONTEND_CLUSTER_IP,
    }
}

fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: Addr::from(b.ip),
        port: common::port(b.port),
        flags: if b.local { BACKEND_LOCAL } else { 0 },
    }
}

impl Reconciler {
    /// Starts from what the (possibly pinned, possibly non-empty) maps already hold.
    pub fn restore(snapshot: Snapshot, limits: Limits) -> Self {
        let mut services: BTreeMap<u32, ServiceSlots> = snapshot
            .services
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    ServiceSlots {
                        service: *s,
                        live: Vec::new(),
                        // Not in the maps: claimed again by the first sync.
                        kept: Vec::new(),
                        table: TableRead::digest_of(std::iter::empty()),
                        foreign_table: false,
                        ranges: snapshot
                            .source_ranges
                            .iter()
                            .filter(|(sid, _, _)| sid == id)
                            .map(|(_, a, p)| (*a, *p))
                            .collect(),
                    },
                )
            })
            .collect();
        // Each Service's table is built again (about 20 µs): on all CPUs, as a restart at 10,000
        // Services builds 10,000.
        let mut restoring: Vec<(&u32, &mut ServiceSlots)> = services.iter_mut().collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = restoring.len().div_ceil(threads).max(256);
        std::thread::scope(|scope| {
            for chunk in restoring.chunks_mut(per_thread) {
                scope.spawn(|| {
                    for (id, s) in chunk.iter_mut() {
                        restore_table(id, s, &snapshot, limits.maglev_table_max);
                    }
                });
            }
        });
        let mut regions = Regions::new(limits.maglev_entries);
        // In offset order: `reserve` frees the gap before each region it is given.
        let mut used: Vec<(u32, u32)> = services
            .values()
            .map(|s| (s.service.table_offset, s.service.table_size))
            .collect();
        used.sort_unstable();
        for (offset, size) in used {
            regions.reserve(offset, size);
        }
        let backend_ids = snapshot
            .backends
            .iter()
            .map(|(id, b)| ((IpAddr::from(b.addr), common::port_host(b.port)), *id))
            .collect();
        let mut backend_refs: HashMap<u32, u32> = HashMap::new();
        for id in services.values().flat_map(|s| s.live.iter()) {
            *backend_refs.entry(*id).or_default() += 1;
        }
        // Backends no restored service uses go at the first reconcile.
        let maybe_unused = snapshot
            .backends
            .iter()
            .filter(|(id, _)| !backend_refs.contains_key(id))
            .map(|(id, b)| (*id, (IpAddr::from(b.addr), common::port_host(b.port))))
            .collect();
        Reconciler {
            limits,
            service_ids: BTreeMap::new(),
            backend_ids,
            service_pool: IdPool::new(limits.services),
            backend_pool: IdPool::new(limits.backends),
            claimed: HashMap::new(),
            applied: HashMap::new(),
            frontend_pool: IdPool::new(limits.frontends),
            frontend_ids: snapshot.frontends.values().map(|fe| fe.id).collect(),
            frontends: snapshot.frontends,
            regions,
            services,
            backends: snapshot.backends,
            backend_refs,
            maybe_unused,
            frontend_ports: snapshot.frontend_ports,
            frontend_ports_stale: true,
            // Whatever a previous agent left: it may have stopped before its sweep.
            affinity_sweep_due: true,
            unswept_service_ids: BTreeSet::new(),
            claims: HashMap::new(),
            clean: false,
            relabel: None,
        }
    }

    /// How the maps (`actual`) differ from what this reconciler wrote since it was restored: one
    /// line per kind of entry that differs, empty when they agree. `FRONTEND_PORTS` is compared
    /// only once this reconciler has written it.
    pub fn differences(&self, actual: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let id = |id: &u32| format!("id {id}");
        let frontends = (&self.frontends, &actual.frontends);
        differ_maps(&mut out, "frontends", frontends, frontend_display);
        let services = &self.services;
        differ(
            &mut out,
            "services",
            services.keys(),
            |k| services.get(k).map(|s| Same(&s.service)),
            &actual.services,
            id,
        );
        differ(
            &mut out,
            "Maglev tables",
            services.keys(),
            |k| services.get(k).map(TableIds),
            &actual.tables,
            id,
        );
        differ_maps(&mut out, "backends", (&self.backends, &actual.backends), id);
        let ranges: BTreeMap<(u32, Addr, u8), ()> = services
            .iter()
            .flat_map(|(id, s)| s.ranges.iter().map(|(addr, len)| ((*id, *addr, *len), ())))
            .collect();
        let actual_ranges: BTreeMap<(u32, Addr, u8), ()> =
            actual.source_ranges.iter().map(|r| (*r, ())).collect();
        differ_maps(
            &mut out,
            "source ranges",
            (&ranges, &actual_ranges),
            |(id, addr, len)| format!("{}/{len} of id {id}", IpAddr::from(*addr)),
        );
        if !self.frontend_ports_stale {
            let words = (&self.frontend_ports, &actual.frontend_ports);
            differ_maps(&mut out, "frontend ports", words, |w| format!("word {w}"));
        }
        out
    }

    /// One past the highest service and backend ids this reconciler uses: how much of the
    /// `SERVICES` and `BACKENDS` arrays a check with [`Reconciler::differences`] must read.
    pub fn ids_in_use(&self) -> (u32, u32) {
        let past = |max: Option<&u32>| max.map_or(0, |id| id + 1);
        (
            past(self.services.keys().next_back()),
            past(self.backends.keys().next_back()),
        )
    }

    /// Metrics labels for every programmed frontend that packets reach.
    pub fn frontend_labels(&self) -> BTreeMap<FrontendKey, FrontendLabel> {
        self.frontends
            .keys()
            .filter_map(|k| Some((*k, self.frontend_label(k)?)))
            .collect()
    }

    /// A frontend's metrics labels, if it is programmed and packets reach it. (Frontends of the
    /// socket hooks, twins and localhost NodePorts, see no packets; draining ones have no Service.)
    fn frontend_label(&self, key: &FrontendKey) -> Option<FrontendLabel> {
        let fe = self.frontends.get(key)?;
        if key.scope != common::SCOPE_EXTERNAL || fe.is_draining() {
            return None;
        }
        let service = self
            .claimed
            .get(&fe.service_id)
            .map_or_else(|| format!("id {}", fe.service_id), ToString::to_string);
        Some(FrontendLabel {
            id: fe.id,
            frontend: frontend_display(key),
            service,
        })
    }

    /// Brings `labels` to [`Reconciler::frontend_labels`], looking only at the frontends written
    /// or removed since the last call, and those of service ids given or taken (all, the first
    /// time): formatting every label takes milliseconds at 10,000 frontends.
    pub fn update_frontend_labels(&mut self, labels: &mut BTreeMap<FrontendKey, FrontendLabel>) {
        match self.relabel.replace(Relabel::default()) {
            None => *labels = self.frontend_labels(),
            Some(Relabel {
                frontends: mut keys,
                service_ids,
            }) => {
                if !service_ids.is_empty() {
                    // A walk, but no formatting: tens of microseconds at 10,000 frontends.
                    let theirs = self.frontends.iter();
                    keys.extend(
                        theirs
                            .filter(|(_, fe)| service_ids.contains(&fe.service_id))
                            .map(|(k, _)| *k),
                    );
                }
                for key in keys {
                    match self.frontend_label(&key) {
                        Some(label) => labels.insert(key, label),
                        None => labels.remove(&key),
                    };
                }
            }
        }
    }

    /// Notes a frontend written or removed, for [`Reconciler::update_frontend_labels`].
    fn relabel_later(&mut self, key: FrontendKey) {
        if let Some(r) = &mut self.relabel {
            r.frontends.insert(key);
        }
    }

    /// Notes a service id given to a Service port or taken from one, likewise.
    fn relabel_service_later(&mut self, id: u32) {
        if let Some(r) = &mut self.relabel {
            r.service_ids.insert(id);
        }
    }

    /// Service ports and backends currently programmed.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.backends.len())
    }

    /// Brings the maps to `desired` with the fewest writes.
    pub fn reconcile(&mut self, desired: &DesiredState, maps: &mut dyn DatapathMaps) -> SyncReport {
        self.reconcile_in(desired, None, maps)
    }

    /// [`Reconciler::reconcile`], given what changed since the state of the previous call (see
    /// [`Changed`]): it then looks at those service ports only, so a change costs what it
    /// changes, not the cluster's size. Every port is looked at when the last call did not end
    /// cleanly (a failure is retried), and when a changed port's frontends share map entries with
    /// others' (an IPv4-mapped address, see [`Addr`]).
    pub fn reconcile_changed(
        &mut self,
        desired: &DesiredState,
        changed: &Changed,
        maps: &mut dyn DatapathMaps,
    ) -> SyncReport {
        let mut mine: HashMap<FrontendKey, u32> = HashMap::new();
        for (name, was) in changed {
            for key in was
                .iter()
                .flat_map(|s| s.frontends.keys().map(frontend_key))
            {
                if let Some(n) = self.claims.get_mut(&key) {
                    *n = n.saturating_sub(1);
                }
                mine.entry(key).or_default();
            }
            let now = desired.services.get(name).into_iter();
            for key in now.flat_map(|s| s.frontends.keys().map(frontend_key)) {
                *self.claims.entry(key).or_default() += 1;
                *mine.entry(key).or_default() += 1;
            }
        }
        // A map entry another port also wants (an IPv4-mapped address) needs every port's look.
        let their_own = mine
            .iter()
            .all(|(key, n)| self.claims.get(key).copied().unwrap_or(0) == *n);
        self.claims.retain(|_, n| *n > 0);
        let only_changed = self.clean && their_own;
        self.reconcile_in(desired, only_changed.then_some(changed), maps)
    }

    /// Reconciles every service port, or only those in `changed` (see
    /// [`Reconciler::reconcile_changed`]).
    fn reconcile_in(
        &mut self,
        desired: &DesiredState,
        changed: Option<&Changed>,
        maps: &mut dyn DatapathMaps,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // Regions retired by the previous sync: no packet can still be reading them.
        self.regions.release_quarantine();
        // One that failed last time, before ids are handed out again.
        self.sweep_affinity(maps, &mut report);
        // Frontend key -> (service id, kind flags).
        let mut wanted_frontends: BTreeMap<FrontendKey, (u32, u16)> = BTreeMap::new();
        let mut live_services: HashSet<u32> = HashSet::with_capacity(desired.services.len());
        // Frontends of Services whose apply failed: kept as they are, unless wanted elsewhere.
        let mut kept_frontends: Vec<(FrontendKey, (u32, u16))> = Vec::new();
        // The changed ports' frontends as they were: what may have gone stale.
        let mut had_frontends: Vec<FrontendKey> = Vec::new();
        let names: Box<dyn Iterator<Item = (&ServicePortName, &Arc<DesiredService>)>> =
            match changed {
                None => {
                    self.claims.clear();
                    let all = desired.services.values().flat_map(|s| s.frontends.keys());
                    for key in all.map(frontend_key) {
                        *self.claims.entry(key).or_default() += 1;
                    }
                    Box::new(desired.services.iter())
                }
                Some(changed) => {
                    for name in changed.keys() {
                        let had = self.applied.get(name).into_iter();
                        had_frontends
                            .extend(had.flat_map(|s| s.frontends.keys().map(frontend_key)));
                    }
                    // In the maps' order, as a look at every port writes them.
                    had_frontends.sort_unstable();
                    had_frontends.dedup();
                    Box::new(
                        changed
                            .keys()
                            .filter_map(|k| desired.services.get_key_value(k)),
                    )
                }
            };

        for (name, want) in names {
            // Unchanged since it was last applied: nothing to write (the common case per event).
            let unchanged = match (self.service_ids.get(name), self.applied.get(name)) {
                (Some(id), Some(prev))
                    if (Arc::ptr_eq(prev, want) || prev == want)
                        && self.services.contains_key(id) =>
                {
                    Some(*id)
                }
                _ => None,
            };
            let id = match unchanged {
                Some(id) => id,
                None => match self.apply_service(name, want, maps, &mut report) {
                    Ok(Some(id)) => {
                        self.applied.insert(name.clone(), want.clone());
                        id
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        self.applied.remove(name);
                        report.errors.push(e);
                        // A Service that was serving goes on as it was: a failed apply leaves its
                        // entry whole (the old one, or the new one written whole). Only the
                        // change waits for the next sync.
                        let serving = self.service_ids.get(name).copied();
                        if let Some(id) = serving.filter(|id| self.services.contains_key(id)) {
                            live_services.insert(id);
                            kept_frontends.extend(
                                self.frontends
                                    .iter()
                                    .filter(|(_, fe)| fe.service_id == id)
                                    .map(|(key, fe)| (*key, (id, fe.flags))),
                            );
                        }
                        continue;
                    }
                },
            };
            live_services.insert(id);
            for (addr, kind) in &want.frontends {
                wanted_frontends.insert(frontend_key(addr), (id, frontend_flags(*kind)));
            }
        }
        for (key, wanted) in kept_frontends {
            wanted_frontends.entry(key).or_insert(wanted);
        }
        match changed {
            None => self
                .applied
                .retain(|name, _| desired.services.contains_key(name)),
            Some(changed) => {
                for name in changed
                    .keys()
                    .filter(|k| !desired.services.contains_key(*k))
                {
                    self.applied.remove(name);
                }
            }
        }

        // Frontends last on the way in: their service is complete by now.
        for (key, (service_id, flags)) in &wanted_frontends {
            let display = || frontend_display(key);
            let id = match self.frontends.get(key) {
                Some(fe) if fe.service_id == *service_id && fe.flags == *flags => continue,
                Some(fe) => fe.id,
                None => match self.new_frontend_id(maps) {
                    Ok(id) => id,
                    Err(e) => {
                        report
                            .errors
                            .push(e.for_frontend(&display(), self.limits.frontends));
                        continue;
                    }
                },
            };
            let fe = Frontend {
                service_id: *service_id,
                flags: *flags,
                id,
                _pad: 0,
            };
            match maps.write_frontend(key, &fe) {
                Ok(()) => {
                    self.frontends.insert(*key, fe);
                    self.frontend_ids.insert(fe.id);
                    self.relabel_later(*key);
                    report.writes += 1;
                    report.frontends_changed = true;
                }
                Err(e) => report.errors.push(SyncError::Write {
                    service: format!("frontend {}", display()),
                    source: e,
                }),
            }
        }
        // Deletions after everything new is in place. A TCP frontend packets reach drains first:
        // its connections go on (draining frontends go in `end_drains`, once they have none).
        let stale: Vec<(FrontendKey, Frontend)> = match changed {
            None => self
                .frontends
                .iter()
                .filter(|(k, fe)| !wanted_frontends.contains_key(k) && !fe.is_draining())
                .map(|(k, fe)| (*k, *fe))
                .collect(),
            Some(_) => had_frontends
                .iter()
                .filter_map(|k| self.frontends.get(k).map(|fe| (*k, *fe)))
                .filter(|(k, fe)| !wanted_frontends.contains_key(k) && !fe.is_draining())
                .collect(),
        };
        for (key, fe) in stale {
            if key.scope == common::SCOPE_EXTERNAL && key.proto == common::PROTO_TCP {
                let drained = Frontend {
                    service_id: NO_SERVICE,
                    flags: fe.flags | FRONTEND_DRAINING,
                    ..fe
                };
                match maps.write_frontend(&key, &drained) {
                    Ok(()) => {
                        self.frontends.insert(key, drained);
                        self.relabel_later(key);
                        report.writes += 1;
                        report.frontends_changed = true;
                        report.draining.push(frontend_display(&key));
                    }
                    Err(e) => report.errors.push(SyncError::Write {
                        service: format!("frontend {}", frontend_display(&key)),
                        source: e,
                    }),
                }
                continue;
            }
            match maps.remove_frontend(&key) {
                Ok(()) => {
                    if let Some(fe) = self.frontends.remove(&key) {
                        self.frontend_ids.remove(&fe.id);
                        self.frontend_pool.release(fe.id);
                    }
                    self.relabel_later(key);
                    report.writes += 1;
                    report.frontends_changed = true;
                }
                Err(e) => report.errors.push(SyncError::Write {
                    service: format!("frontend {key:?}"),
                    source: e,
                }),
            }
        }
        // Ids held by changed ports (new ones' too, claimed above) may go; only theirs.
        let dropped: Vec<u32> = match changed {
            None => self.service_ids.values().copied().collect(),
            Some(changed) => changed
                .keys()
                .filter_map(|name| self.service_ids.get(name).copied())
                .collect(),
        };
        let dropped: Vec<u32> = dropped
            .into_iter()
            .filter(|id| !live_services.contains(id))
            .collect();
        match changed {
            None => self.service_ids.retain(|_, id| live_services.contains(id)),
            Some(changed) => {
                for name in changed.keys() {
                    if self
                        .service_ids
                        .get(name)
                        .is_some_and(|id| !live_services.contains(id))
                    {
                        self.service_ids.remove(name);
                    }
                }
            }
        }
        for &id in &dropped {
            self.claimed.remove(&id);
            self.relabel_service_later(id);
            // Claimed but never written (its apply failed): hand the id back.
            if !self.services.contains_key(&id) {
                self.service_pool.release(id);
            }
        }
        // Every service not live is a candidate; with only the changed ports looked at, the others
        // are live (the last call ended cleanly), so the candidates are the ids they dropped.
        let candidates: Vec<u32> = match changed {
            None => self.services.keys().copied().collect(),
            Some(_) => {
                let mut ids = dropped;
                ids.sort_unstable();
                ids
            }
        };
        let referenced: HashSet<u32> = if candidates.is_empty() {
            HashSet::new()
        } else {
            self.frontends.values().map(|f| f.service_id).collect()
        };
        let unused: Vec<u32> = candidates
            .into_iter()
            .filter(|id| {
                self.services.contains_key(id)
                    && !live_services.contains(id)
                    && !referenced.contains(id)
            })
            .collect();
        for id in unused {
            if let Err(e) = self.remove_service(id, maps, &mut report) {
                report.errors.push(SyncError::Write {
                    service: format!("service id {id}"),
                    source: e,
                });
            }
        }
        self.sweep_affinity(maps, &mut report);
        self.settle_unused_backends(maps, &mut report);
        if report.frontends_changed || self.frontend_ports_stale {
            self.sync_frontend_ports(maps, &mut report);
        }
        self.clean = report.errors.is_empty();
        report
    }

    /// How many frontends are draining (see [`FRONTEND_DRAINING`]).
    pub fn draining(&self) -> usize {
        self.frontends
            .values()
            .filter(|fe| fe.is_draining())
            .count()
    }

    /// Removes the draining frontends no live flow uses any more: `in_use` holds the (address,
    /// port) of every live TCP flow's frontend. Returns the frontends removed, as displayed.
    pub fn end_drains(
        &mut self,
        in_use: &BTreeSet<(Addr, u16)>,
        maps: &mut dyn DatapathMaps,
    ) -> (Vec<String>, Vec<SyncError>) {
        let done: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(k, fe)| fe.is_draining() && !in_use.contains(&(k.addr, k.port)))
            .map(|(k, _)| *k)
            .collect();
        let (mut ended, mut report) = (Vec::new(), SyncReport::default());
        for key in done {
            match maps.remove_frontend(&key) {
                Ok(()) => {
                    if let Some(fe) = self.frontends.remove(&key) {
                        self.frontend_ids.remove(&fe.id);
                        self.frontend_pool.release(fe.id);
                    }
                    self.relabel_later(key);
                    ended.push(frontend_display(&key));
                }
                Err(e) => report.errors.push(SyncError::Write {
                    service: format!("frontend {}", frontend_display(&key)),
                    source: e,
                }),
            }
        }
        if !ended.is_empty() || self.frontend_ports_stale {
            self.sync_frontend_ports(maps, &mut report);
        }
        (ended, report.errors)
    }

    /// Brings `FRONTEND_PORTS` to the ports of the external frontends in the maps (XDP looks up a
    /// frontend only for a packet to one of those ports, and tc egress the node's connections
    /// only from one; the node sockets' frontends, ClusterIPs among them, are never looked for
    /// there). Called after the frontends are written and removed: a port's bit is set only once
    /// its first frontend is there, and cleared only once its last is gone.
    fn sync_frontend_ports(&mut self, maps: &mut dyn DatapathMaps, report: &mut SyncReport) {
        let mut wanted: BTreeMap<u32, u64> = BTreeMap::new();
        // Draining frontends' too: XDP still takes their flows' packets.
        for key in self
            .frontends
            .keys()
            .filter(|k| k.scope == common::SCOPE_EXTERNAL)
        {
            let (word, bit) = common::port_bit(common::port_host(key.port));
            *wanted.entry(word).or_default() |= bit;
        }
        let words: BTreeSet<u32> = wanted
            .keys()
            .chain(self.frontend_ports.keys())
            .copied()
            .collect();
        self.frontend_ports_stale = false;
        for word in words {
            let bits = wanted.get(&word).copied().unwrap_or(0);
            if self.frontend_ports.get(&word).copied().unwrap_or(0) == bits {
                continue;
            }
            match maps.write_frontend_ports(word, bits) {
                Ok(()) => {
                    if bits == 0 {
                        self.frontend_ports.remove(&word);
                    } else {
                        self.frontend_ports.insert(word, bits);
                    }
                    report.writes += 1;
                }
                Err(e) => {
                    self.frontend_ports_stale = true;
                    report.errors.push(SyncError::Write {
                        service: format!("frontend ports (word {word})"),
                        source: e,
                    });
                }
            }
        }
    }

    /// Forgets session affinity that no longer holds (see [`DatapathMaps::sweep_affinity`]), when
    /// a change may have left some; then the ids it named may be reused.
    fn sweep_affinity(&mut self, maps: &mut dyn DatapathMaps, report: &mut SyncReport) {
        if !self.affinity_sweep_due {
            return;
        }
        let live: BTreeMap<u32, BTreeSet<u32>> = self
            .services
            .iter()
            .filter(|(_, s)| s.service.affinity_timeout_s != 0)
            .map(|(id, s)| (*id, s.live.iter().copied().collect()))
            .collect();
        match maps.sweep_affinity(&live) {
            Ok(forgotten) => {
                report.writes += forgotten;
                self.affinity_sweep_due = false;
                for id in std::mem::take(&mut self.unswept_service_ids) {
                    self.service_pool.release(id);
                }
            }
            Err(source) => report.errors.push(SyncError::Write {
                service: "session affinity".into(),
                source,
            }),
        }
    }

    /// Clears the backends no service uses any more, and hands back ids given out for backends
    /// whose write failed. Only the candidates a change produced are looked at. Not while
    /// session affinity may still stick clients to them: they keep the backend they had until
    /// then, rather than none or another's under a reused id.
    fn settle_unused_backends(&mut self, maps: &mut dyn DatapathMaps, report: &mut SyncReport) {
        if self.affinity_sweep_due {
            return;
        }
        for (id, addr) in std::mem::take(&mut self.maybe_unused) {
            if self.backend_refs.contains_key(&id) {
                continue;
            }
            if self.backends.contains_key(&id) {
                if let Err(e) = maps.clear_backend(id) {
                    self.maybe_unused.insert(id, addr);
                    report.errors.push(SyncError::Write {
                        service: format!("backend id {id}"),
                        source: e,
                    });
                    continue;
                }
                self.backends.remove(&id);
                report.writes += 1;
            }
            if self.backend_ids.get(&addr) == Some(&id) {
                self.backend_ids.remove(&addr);
            }
            self.backend_pool.release(id);
        }
    }

    /// Records a service's slots (or their removal), keeping the backends' reference counts.
    fn set_slots(&mut self, id: u32, slots: Option<ServiceSlots>) {
        for bid in slots.iter().flat_map(|s| s.live.iter().chain(&s.kept)) {
            *self.backend_refs.entry(*bid).or_default() += 1;
        }
        let old = match slots {
            Some(slots) => self.services.insert(id, slots),
            None => self.services.remove(&id),
        };
        let old_ids = old.map(|s| [s.live, s.kept].concat()).unwrap_or_default();
        for bid in old_ids {
            let Some(n) = self.backend_refs.get_mut(&bid) else {
                continue;
            };
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&bid);
                if let Some(b) = self.backends.get(&bid) {
                    let addr = (IpAddr::from(b.addr), common::port_host(b.port));
                    self.maybe_unused.insert(bid, addr);
                }
            }
        }
    }

    /// Picks the id for a Service port: the one it had (found through its frontends in restored maps),
    /// else a fresh one.
    fn claim_service_id(&mut self, name: &ServicePortName, want: &DesiredService) -> Option<u32> {
        if let Some(id) = self.service_ids.get(name) {
            return Some(*id);
        }
        let claimed = &self.claimed;
        let restored = want
            .frontends
            .keys()
            .filter_map(|f| self.frontends.get(&frontend_key(f)).map(|fe| fe.service_id))
            .find(|id| self.services.contains_key(id) && !claimed.contains_key(id));
        let id = match restored {
            Some(id) => id,
            None => {
                let services = &self.services;
                self.service_pool
                    .alloc(|id| services.contains_key(&id) || claimed.contains_key(&id))?
            }
        };
        self.service_ids.insert(name.clone(), id);
        self.claimed.insert(id, name.clone());
        self.relabel_service_later(id);
        Some(id)
    }

    /// A frontend id not in use, with its counters zeroed.
    fn new_frontend_id(
        &mut self,
        maps: &mut dyn DatapathMaps,
    ) -> Result<u32, Option<anyhow::Error>> {
        let taken = &self.frontend_ids;
        let id = self
            .frontend_pool
            .alloc(|id| taken.contains(&id))
            .ok_or(None)?;
        if let Err(e) = maps.reset_frontend_stats(id) {
            self.frontend_pool.release(id);
            return Err(Some(e));
        }
        Ok(id)
    }

    fn backend_id(&mut self, b: &BackendAddr) -> Option<u32> {
        if let Some(id) = self.backend_ids.get(&(b.ip, b.port)) {
            return Some(*id);
        }
        let backends = &self.backends;
        let id = self.backend_pool.alloc(|id| backends.contains_key(&id))?;
        self.backend_ids.insert((b.ip, b.port), id);
        // Unused until a service's slots take it (its write may yet fail).
        self.maybe_unused.insert(id, (b.ip, b.port));
        Some(id)
    }

    fn apply_service(
        &mut self,
        name: &ServicePortName,
        want: &DesiredService,
        maps: &mut dyn DatapathMaps,
        report: &mut SyncReport,
    ) -> Result<Option<u32>, SyncError> {
        if want.backends.len() > self.limits.backends_per_service as usize {
            return Err(SyncError::BackendsPerServiceLimit {
                service: name.clone(),
                count: want.backends.len(),
                limit: self.limits.backends_per_service,
            });
        }
        let Some(id) = self.claim_service_id(name, want) else {
            return Err(SyncError::ServiceLimit {
                service: name.clone(),
                limit: self.limits.services,
            });
        };
        let write_err = |source| SyncError::Write {
            service: name.to_string(),
            source,
        };

        // 1. Backends.
        let mut ids = Vec::with_capacity(want.backends.len());
        for b in &want.backends {
            let Some(bid) = self.backend_id(b) else {
                return Err(SyncError::BackendLimit {
                    service: name.clone(),
                    limit: self.limits.backends,
                });
            };
            self.write_backend(bid, b, maps, report)
                .map_err(write_err)?;
            ids.push(bid);
        }
        // Endpoints that still serve: their entries stay for the flows they have. Best effort:
        // with no id left for one, its UDP flows move, and the Service's change still applies.
        let mut kept = Vec::with_capacity(want.still_serving.len());
        for b in &want.still_serving {
            let Some(bid) = self.backend_id(b) else {
                continue;
            };
            self.write_backend(bid, b, maps, report)
                .map_err(write_err)?;
            kept.push(bid);
        }
        kept.sort_unstable();
        kept.dedup();

        let mut flags = SERVICE_IN_USE;
        if want.when_empty == WhenEmpty::Drop {
            flags |= SERVICE_DROP_WHEN_EMPTY;
        }
        if want.source_ranges.is_some() {
            flags |= SERVICE_SOURCE_RANGES;
        }
        let ranges: BTreeSet<(Addr, u8)> = want
            .source_ranges
            .iter()
            .flatten()
            .map(|(net, len)| (Addr::from(*net), *len))
            .collect();
        // Ids in address order: the order the Maglev table indexes, whatever order they came in.
        let mut addrs: Vec<(IpAddr, u16)> = want.backends.iter().map(|b| (b.ip, b.port)).collect();
        let mut by_addr: Vec<((IpAddr, u16), u32)> =
            addrs.iter().copied().zip(ids.iter().copied()).collect();
        by_addr.sort();
        by_addr.dedup();
        let ids: Vec<u32> = by_addr.iter().map(|(_, id)| *id).collect();
        addrs.sort();
        addrs.dedup();
        let current = self.services.get(&id).cloned().unwrap_or_default();
        let known = self.services.contains_key(&id);
        let affinity = want.affinity_timeout_s;
        // The Maglev table: a function of the backends' addresses only, so every node agrees.
        let same_table = known && current.live == ids && !current.foreign_table;
        if same_table
            && current.service.flags == flags
            && current.service.affinity_timeout_s == affinity
            && current.ranges == ranges
        {
            if current.kept != kept {
                let left = left_service(&current, &ids, &kept);
                self.set_slots(id, Some(ServiceSlots { kept, ..current }));
                self.purge_udp_flows_left(name, id, left, maps, report);
            }
            return Ok(Some(id));
        }
        // 2. The table into free space, 3. one service update makes it live.
        let (entries, table) = if same_table {
            (Vec::new(), current.table)
        } else {
            let entries = maglev_ids(&ids, &addrs, self.limits.maglev_table_max);
            let digest = TableRead::digest_of(entries.iter().copied());
            (entries, digest)
        };
        let (offset, size) = if same_table {
            (current.service.table_offset, current.service.table_size)
        } else if entries.is_empty() {
            (0, 0)
        } else {
            let size = entries.len() as u32;
            let Some(offset) = self.regions.alloc(size) else {
                return Err(SyncError::MaglevCapacity {
                    service: name.clone(),
                    entries: size,
                    capacity: self.limits.maglev_entries,
                });
            };
            if let Err(e) = maps.write_table(offset, &entries) {
                self.regions.free_now(offset, size);
                return Err(write_err(e));
            }
            report.writes += 1;
            (offset, size)
        };
        let new_region = (offset, size)
            != (current.service.table_offset, current.service.table_size)
            && size > 0;
        // Allowed sources go in before the flag that makes them required; stale ones leave after.
        let mut added = Vec::new();
        for (addr, len) in ranges.difference(&current.ranges) {
            if let Err(e) = maps.add_source_range(id, *addr, *len) {
                if new_region {
                    self.regions.free_now(offset, size);
                }
                self.keep_added_ranges(id, &added, maps);
                return Err(write_err(e));
            }
            added.push((*addr, *len));
            report.writes += 1;
        }
        let service = Service {
            table_offset: offset,
            table_size: size,
            backend_count: ids.len() as u32,
            flags,
            affinity_timeout_s: affinity,
            _pad: 0,
        };
        if let Err(e) = maps.write_service(id, &service) {
            if new_region {
                self.regions.free_now(offset, size);
            }
            self.keep_added_ranges(id, &added, maps);
            return Err(write_err(e));
        }
        report.writes += 1;
        if (offset, size) != (current.service.table_offset, current.service.table_size) {
            self.regions
                .free_later(current.service.table_offset, current.service.table_size);
        }
        let gone: Vec<u32> = current
            .live
            .iter()
            .filter(|b| !ids.contains(*b))
            .copied()
            .collect();
        // The new entry is live: recorded now, so a failure below leaves this view the maps'
        // (the stale ranges listed until each is removed). Recorded later, the old region would
        // be freed twice when the Service then goes, and handed to two tables.
        let stale: Vec<(Addr, u8)> = current.ranges.difference(&ranges).copied().collect();
        let left = left_service(&current, &ids, &kept);
        self.set_slots(
            id,
            Some(ServiceSlots {
                service,
                live: ids,
                kept,
                table,
                foreign_table: false,
                ranges: ranges.union(&current.ranges).copied().collect(),
            }),
        );
        // Clients stuck to a backend that left must get a new one on their next flow; with
        // affinity off, entries kept would stick clients again once it is back on.
        if current.service.affinity_timeout_s != 0 && (affinity == 0 || !gone.is_empty()) {
            self.affinity_sweep_due = true;
        }
        for range in stale {
            self.remove_range(id, range, maps, report)
                .map_err(write_err)?;
        }
        self.purge_udp_flows_left(name, id, left, maps, report);
        Ok(Some(id))
    }

    /// Writes backend `bid`'s entry for endpoint `b`, unless it already holds it.
    fn write_backend(
        &mut self,
        bid: u32,
        b: &BackendAddr,
        maps: &mut dyn DatapathMaps,
        report: &mut SyncReport,
    ) -> anyhow::Result<()> {
        let value = backend_value(b);
        if self.backends.get(&bid) != Some(&value) {
            maps.write_backend(bid, &value)?;
            self.backends.insert(bid, value);
            report.writes += 1;
        }
        Ok(())
    }

    /// UDP flows follow their endpoint out of the service (`left`: ids it neither has nor keeps),
    /// as kube-proxy clears their conntrack entries once it stops serving. The datapath sees a
    /// backend that is gone altogether; one that another service still has is only gone from
    /// this one, which the maps must say.
    fn purge_udp_flows_left(
        &mut self,
        name: &ServicePortName,
        id: u32,
        left: Vec<u32>,
        maps: &mut dyn DatapathMaps,
        report: &mut SyncReport,
    ) {
        let still_elsewhere: Vec<u32> = left
            .into_iter()
            .filter(|b| self.backend_refs.contains_key(b))
            .collect();
        if name.protocol == crate::model::Protocol::Udp && !still_elsewhere.is_empty() {
            match maps.purge_udp_flows(id, &still_elsewhere) {
                Ok(()) => report.writes += 1,
                // Best effort, like an LRU: the flows then end when they go quiet.
                Err(e) => report.errors.push(SyncError::Write {
                    service: name.to_string(),
                    source: e,
                }),
            }
        }
    }

    /// After a failed apply: source ranges it added are recorded for a Service already in the
    /// maps, and taken out again for one that is not (its id may go to another Service).
    fn keep_added_ranges(&mut self, id: u32, added: &[(Addr, u8)], maps: &mut dyn DatapathMaps) {
        match self.services.get_mut(&id) {
            Some(slots) => slots.ranges.extend(added.iter().copied()),
            None => {
                for (addr, len) in added {
                    // Best effort: a failure here leaves the entry, unused until the id is.
                    let _ = maps.remove_source_range(id, *addr, *len);
                }
            }
        }
    }

    /// Removes one of a recorded service's source ranges, from the maps and then from its slots
    /// (so a failure part way leaves the rest listed, as they are in the maps).
    fn remove_range(
        &mut self,
        id: u32,
        (addr, len): (Addr, u8),
        maps: &mut dyn DatapathMaps,
        report: &mut SyncReport,
    ) -> anyhow::Result<()> {
        maps.remove_source_range(id, addr, len)?;
        if let Some(slots) = self.services.get_mut(&id) {
            slots.ranges.remove(&(addr, len));
        }
        report.writes += 1;
        Ok(())
    }

    fn remove_service(
        &mut self,
        id: u32,
        maps: &mut dyn DatapathMaps,
        report: &mut SyncReport,
    ) -> anyhow::Result<()> {
        let Some(s) = self.services.get(&id).cloned() else {
            return Ok(());
        };
        // No frontend leads here any more. What goes with the id goes first, the entry last: a
        // failure leaves this view the maps' (the ranges listed until each is removed), and the
        // removal is tried again next sync.
        for range in &s.ranges {
            self.remove_range(id, *range, maps, report)?;
        }
        maps.write_service(id, &Service::default())?;
        report.writes += 1;
        self.regions
            .free_later(s.service.table_offset, s.service.table_size);
        self.set_slots(id, None);
        if s.service.affinity_timeout_s != 0 {
            // The id will be reused by another Service: no stale stickiness may carry over.
            self.affinity_sweep_due = true;
            self.unswept_service_ids.insert(id);
        } else {
            self.service_pool.release(id);
        }
        Ok(())
    }
}

/// In-memory maps for tests. With `check_every_write`, asserts after each single write that every
/// frontend leads to a complete slot table of existing backends: the "no bad window" rule.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub state: Snapshot,
    pub writes: usize,
    pub check_every_write: bool,
    /// Fail the write with this number (1-based), to test partial failure.
    pub fail_at_write: Option<usize>,
    /// Fail every session affinity sweep.
    pub fail_sweeps: bool,
    pub stats_resets: Vec<u32>,
    /// (service id, backend id) pairs session affinity may hold: every backend of a service's
    /// table once the service is written with affinity (any client may have been given any).
    pub affinity: BTreeSet<(u32, u32)>,
    pub udp_flow_purges: Vec<(u32, Vec<u32>)>,
    /// The `MAGLEV` array, sparse.
    pub maglev: BTreeMap<u32, u32>,
}

impl FakeMaps {
    /// Maps that check the "no bad window" rule after every write.
    pub fn checked() -> Self {
        FakeMaps {
            check_every_write: true,
            ..Default::default()
        }
    }

    fn write(&mut self) -> anyhow::Result<()> {
        self.writes += 1;
        if self.fail_at_write == Some(self.writes) {
            anyhow::bail!("injected failure at write {}", self.writes);
        }
        Ok(())
    }

    fn check(&self) {
        if !self.check_every_write {
            return;
        }
        for (key, fe) in &self.state.frontends {
            let s = self
                .state
                .services
                .get(&fe.service_id)
                .copied()
                .unwrap_or_default();
            assert_eq!(
                s.backend_count == 0,
                s.table_size == 0,
                "{key:?}: table size vs backends"
            );
            for i in 0..s.table_size {
                let bid = self
                    .maglev
                    .get(&(s.table_offset + i))
                    .unwrap_or_else(|| panic!("{key:?}: table entry {i} of {s:?} not written"));
                assert!(
                    self.state.backends.contains_key(bid),
                    "{key:?}: table entry {i} -> missing backend {bid}"
                );
            }
        }
    }
}

impl DatapathMaps for FakeMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.write()?;
        self.state.backends.insert(id, *backend);
        self.check();
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.write()?;
        self.state.backends.remove(&id);
        self.check();
        Ok(())
    }
    fn write_table(&mut self, offset: u32, entries: &[u32]) -> anyhow::Result<()> {
        self.write()?;
        for (i, id) in entries.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        self.check();
        Ok(())
    }
    fn write_service(&mut self, id: u32, service: &Service) -> anyhow::Result<()> {
        self.write()?;
        if service.affinity_timeout_s != 0 {
            let table = service.table_offset..service.table_offset + service.table_size;
            let backends: Vec<u32> = table.map(|i| self.maglev[&i]).collect();
            self.affinity.extend(backends.into_iter().map(|b| (id, b)));
        }
        if *service == Service::default() {
            self.state.services.remove(&id);
        } else {
            self.state.services.insert(id, *service);
        }
        self.check();
        Ok(())
    }
    fn write_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> anyhow::Result<()> {
        self.write()?;
        self.state.frontends.insert(*key, *frontend);
        self.check();
        Ok(())
    }
    fn remove_frontend(&mut self, key: &FrontendKey) -> anyhow::Result<()> {
        self.write()?;
        self.state.frontends.remove(key);
        self.check();
        Ok(())
    }
    fn write_frontend_ports(&mut self, word: u32, bits: u64) -> anyhow::Result<()> {
        self.write()?;
        if bits == 0 {
            self.state.frontend_ports.remove(&word);
        } else {
            self.state.frontend_ports.insert(word, bits);
        }
        Ok(())
    }
    fn reset_frontend_stats(&mut self, id: u32) -> anyhow::Result<()> {
        self.write()?;
        self.stats_resets.push(id);
        Ok(())
    }
    fn add_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()> {
        self.write()?;
        self.state
            .source_ranges
            .insert((service_id, addr, prefix_len));
        self.check();
        Ok(())
    }
    fn remove_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()> {
        self.write()?;
        self.state
            .source_ranges
            .remove(&(service_id, addr, prefix_len));
        self.check();
        Ok(())
    }
    fn sweep_affinity(&mut self, live: &BTreeMap<u32, BTreeSet<u32>>) -> anyhow::Result<usize> {
        self.write()?;
        if self.fail_sweeps {
            anyhow::bail!("injected sweep failure");
        }
        let before = self.affinity.len();
        self.affinity
            .retain(|(s, b)| live.get(s).is_some_and(|backends| backends.contains(b)));
        Ok(before - self.affinity.len())
    }
    fn purge_udp_flows(&mut self, service_id: u32, backends: &[u32]) -> anyhow::Result<()> {
        self.write()?;
        self.udp_flow_purges.push((service_id, backends.to_vec()));
        Ok(())
    }
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut s = self.state.clone();
        s.tables = s
            .services
            .iter()
            .map(|(id, svc)| {
                (
                    *id,
                    TableRead::Entries(
                        (0..svc.table_size)
                            .map(|i| self.maglev[&(svc.table_offset + i)])
                            .collect(),
                    ),
                )
            })
            .collect();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::model::Scope;
    use exposure_lab::rng::Rng;

    fn name(n: &str) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: n.into(),
            port: String::new(),
            protocol: Protocol::Tcp,
            family: crate::model::IpFamily::V4,
            scope: Scope::External,
        }
    }

    fn service(node_port: u16, backends: &[(u8, bool)]) -> DesiredService {
        let mut s = DesiredService::default();
        for node in [10u8, 11] {
            s.frontends.insert(
                FrontendAddr {
                    ip: IpAddr::from([198, 18, 0, node]),
                    port: node_port,
                    protocol: Protocol::Tcp,
                    scope: Scope::External,
                },
                FrontendKind::NodePort,
            );
        }
        s.backends = backends
            .iter()
            .map(|(last, local)| BackendAddr {
                ip: IpAddr::from([198, 19, 1, *last]),
                port: 8080,
                local: *local,
            })
            .collect();
        s
    }

    /// Empty checked maps and a reconciler with nothing restored.
    fn checked_from_scratch() -> (FakeMaps, Reconciler) {
        let r = Reconciler::restore(Snapshot::default(), Limits::default());
        (FakeMaps::checked(), r)
    }

    /// `s` with each frontend changed by `change`.
    fn with_frontends(
        mut s: DesiredService,
        change: impl Fn(FrontendAddr) -> FrontendAddr,
    ) -> DesiredService {
        s.frontends = s
            .frontends
            .into_iter()
            .map(|(f, kind)| (change(f), kind))
            .collect();
        s
    }

    fn state(services: &[(&str, DesiredService)]) -> DesiredState {
        DesiredState {
            services: services
                .iter()
                .map(|(n, s)| (name(n), Arc::new(s.clone())))
                .collect(),
            ..Default::default()
        }
    }

    /// The distinct backends a frontend's Maglev table selects from, by address.
    fn live_backends(maps: &FakeMaps, fe: &FrontendAddr) -> Vec<IpAddr> {
        let fe = maps.state.frontends[&frontend_key(fe)];
        let s = maps.state.services[&fe.service_id];
        let ids: BTreeSet<u32> = (0..s.table_size)
            .map(|i| maps.maglev[&(s.table_offset + i)])
            .collect();
        let mut ips: Vec<IpAddr> = ids
            .iter()
            .map(|id| IpAddr::from(maps.state.backends[id].addr))
            .collect();
        ips.sort();
        ips
    }

    fn fe(node: u8, port: u16) -> FrontendAddr {
        FrontendAddr {
            ip: IpAddr::from([198, 18, 0, node]),
            port,
            protocol: Protocol::Tcp,
            scope: Scope::External,
        }
    }

    #[test]
    fn a_twin_for_the_nodes_own_sockets_has_its_own_keys_table_and_no_metrics_series() {
        let (mut maps, mut r) = checked_from_scratch();
        let external = service(30601, &[(2, true)]);
        let twin = with_frontends(service(30601, &[(2, true), (3, false)]), |f| FrontendAddr {
            scope: Scope::NodeSockets,
            ..f
        });
        let mut desired = state(&[("local", external)]);
        let twin_name = ServicePortName {
            scope: Scope::NodeSockets,
            ..name("local")
        };
        desired.services.insert(twin_name, Arc::new(twin));
        let report = r.reconcile(&desired, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            live_backends(&maps, &fe(10, 30601)),
            [IpAddr::from([198, 19, 1, 2])]
        );
        let node_sockets = FrontendAddr {
            scope: Scope::NodeSockets,
            ..fe(10, 30601)
        };
        assert_eq!(
            live_backends(&maps, &node_sockets),
            [IpAddr::from([198, 19, 1, 2]), IpAddr::from([198, 19, 1, 3])]
        );
        assert_eq!(
            frontend_key(&node_sockets).scope,
            common::SCOPE_NODE_SOCKETS
        );
        let labels: Vec<String> = r
            .frontend_labels()
            .into_values()
            .map(|l| l.frontend)
            .collect();
        assert_eq!(labels, ["198.18.0.10:30601/TCP", "198.18.0.11:30601/TCP"]);
        assert_eq!(
            frontend_display(&frontend_key(&node_sockets)),
            "198.18.0.10:30601/TCP (node sockets)"
        );
    }

    #[test]
    fn programs_then_converges_with_no_writes() {
        let (mut maps, mut r) = checked_from_scratch();
        let want = state(&[
            ("a", service(30001, &[(1, true), (2, false)])),
            ("b", service(30002, &[])),
        ]);
        let report = r.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(maps.state.frontends.len(), 4);
        assert_eq!(
            live_backends(&maps, &fe(10, 30001)),
            [IpAddr::from([198, 19, 1, 1]), IpAddr::from([198, 19, 1, 2])]
        );
        assert!(live_backends(&maps, &fe(11, 30002)).is_empty());
        let again = r.reconcile(&want, &mut maps);
        assert_eq!(again.writes, 0, "idempotent");
    }

    #[test]
    fn backend_changes_swap_tables_without_a_bad_window() {
        let (mut maps, mut r) = checked_from_scratch();
        r.reconcile(
            &state(&[("a", service(30001, &[(1, false), (2, false), (3, false)]))]),
            &mut maps,
        );
        let before = *maps.state.services.values().next().unwrap();
        assert_eq!(before.table_size, 509, "prime >= 100 x 3 backends");
        let report = r.reconcile(
            &state(&[("a", service(30001, &[(1, false), (3, false), (4, true)]))]),
            &mut maps,
        );
        assert!(report.errors.is_empty());
        let after = *maps.state.services.values().next().unwrap();
        assert_ne!(
            after.table_offset, before.table_offset,
            "a new table, not an overwrite of the live one"
        );
        assert_eq!(
            live_backends(&maps, &fe(11, 30001)),
            [
                IpAddr::from([198, 19, 1, 1]),
                IpAddr::from([198, 19, 1, 3]),
                IpAddr::from([198, 19, 1, 4])
            ]
        );
        assert_eq!(maps.state.backends.len(), 3, "removed backend cleared");
        // The old region is reused only after a sync in quarantine.
        r.reconcile(
            &state(&[
                ("a", service(30001, &[(1, false), (3, false), (4, true)])),
                ("b", service(30002, &[(9, false)])),
            ]),
            &mut maps,
        );
        let b = maps
            .state
            .services
            .values()
            .find(|s| s.backend_count == 1)
            .unwrap();
        assert_eq!(
            b.table_offset, before.table_offset,
            "freed region reused once quarantine passed"
        );
    }

    #[test]
    fn removing_a_service_removes_everything_it_owned() {
        let (mut maps, mut r) = checked_from_scratch();
        r.reconcile(
            &state(&[
                ("a", service(30001, &[(1, false)])),
                ("b", service(30002, &[(2, false)])),
            ]),
            &mut maps,
        );
        r.reconcile(&state(&[("b", service(30002, &[(2, false)]))]), &mut maps);
        // a's frontends drain (TCP: connections through them go on), with no service behind them.
        let draining: Vec<&Frontend> = maps
            .state
            .frontends
            .values()
            .filter(|f| f.is_draining())
            .collect();
        assert_eq!(draining.len(), 2);
        assert!(draining.iter().all(|f| f.service_id == NO_SERVICE));
        assert_eq!(r.draining(), 2);
        end_all_drains(&mut r, &mut maps);
        assert_eq!(maps.state.frontends.len(), 2);
        assert_eq!(maps.state.services.len(), 1);
        assert_eq!(
            maps.state
                .services
                .values()
                .map(|s| s.table_size)
                .sum::<u32>(),
            251,
            "only b's table is live"
        );
        assert_eq!(maps.state.backends.len(), 1);
        r.reconcile(&DesiredState::default(), &mut maps);
        end_all_drains(&mut r, &mut maps);
        assert_eq!(maps.state, Snapshot::default());
    }

    #[test]
    fn restart_restores_ids_and_writes_nothing() {
        let mut maps = FakeMaps::default();
        let want = state(&[
            ("a", service(30001, &[(1, true), (2, false)])),
            ("b", service(30002, &[(3, false)])),
        ]);
        Reconciler::restore(Snapshot::default(), Limits::default()).reconcile(&want, &mut maps);
        let before = maps.state.clone();
        let mut restarted = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = restarted.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty());
        assert_eq!(report.writes, 0, "a restart must not disturb the datapath");
        assert_eq!(maps.state, before);
    }

    /// How the maps differ from what `r` wrote.
    /// Ends every drain, as when no flow uses the draining frontends any more.
    fn end_all_drains(r: &mut Reconciler, maps: &mut FakeMaps) {
        let (_, errors) = r.end_drains(&BTreeSet::new(), maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(r.draining(), 0);
    }

    /// How the maps differ from what `r` wrote; the same read with table digests only (as the
    /// agent's checks read) must give the same.
    fn drift(r: &Reconciler, maps: &FakeMaps) -> Vec<String> {
        let mut read = maps.snapshot().unwrap();
        let found = r.differences(&read);
        for table in read.tables.values_mut() {
            *table = TableRead::Digest(TableRead::digest_of(table.entries().iter().copied()));
        }
        assert_eq!(r.differences(&read), found, "with digests");
        found
    }

    #[test]
    fn tables_are_kept_as_digests_and_compare_with_the_entries_or_the_digest_read() {
        let ids = [7, 7, 99, 40, 99, 7];
        let slots = ServiceSlots {
            table: TableRead::digest_of(ids.iter().copied()),
            ..ServiceSlots::default()
        };
        let read = |ids: &[u32]| {
            let digest = TableRead::digest_of(ids.iter().copied());
            [TableRead::Entries(ids.to_vec()), TableRead::Digest(digest)]
        };
        for same in read(&ids) {
            assert!(TableIds(&slots) == same);
        }
        for changed in read(&[7, 7, 99, 40, 99, 40]) {
            assert!(TableIds(&slots) != changed, "an entry changed");
        }
        for short in read(&ids[..5]) {
            assert!(TableIds(&slots) != short, "one entry short");
        }
        for swapped in read(&[7, 99, 7, 40, 99, 7]) {
            assert!(TableIds(&slots) != swapped, "two entries swapped");
        }
        for longer in read(&[ids.as_slice(), &[0]].concat()) {
            assert!(TableIds(&slots) != longer, "an entry more (of id 0)");
        }
        assert_ne!(
            TableRead::digest_of([0].into_iter()),
            TableRead::digest_of(std::iter::empty()),
            "an entry of id 0 against none"
        );
    }

    /// The backend addresses of a frontend's Maglev table, entry by entry.
    fn table_addrs(maps: &FakeMaps, fe: &FrontendAddr) -> Vec<IpAddr> {
        let fe = maps.state.frontends[&frontend_key(fe)];
        let s = maps.state.services[&fe.service_id];
        (0..s.table_size)
            .map(|i| maps.maglev[&(s.table_offset + i)])
            .map(|id| IpAddr::from(maps.state.backends[&id].addr))
            .collect()
    }

    /// Makes the first entry of `fe`'s table name another of its Service's own backends: the same
    /// backends, another table (as something else, or another build, might have written it).
    /// Returns the Service's id.
    fn retable(maps: &mut FakeMaps, fe: &FrontendAddr) -> u32 {
        let id = maps.state.frontends[&frontend_key(fe)].service_id;
        let svc = maps.state.services[&id];
        let first = maps.maglev[&svc.table_offset];
        let other = (0..svc.table_size)
            .map(|i| maps.maglev[&(svc.table_offset + i)])
            .find(|b| *b != first)
            .unwrap();
        maps.maglev.insert(svc.table_offset, other);
        id
    }

    #[test]
    fn a_table_this_build_would_not_write_is_written_anew_after_a_restore() {
        let (mut maps, mut r) = checked_from_scratch();
        let want = state(&[("a", service(30001, &[(1, true), (2, false), (3, false)]))]);
        r.reconcile(&want, &mut maps);
        let fe = fe(10, 30001);
        let written = table_addrs(&maps, &fe);
        let id = retable(&mut maps, &fe);
        assert_eq!(
            drift(&r, &maps),
            vec![format!("Maglev tables: 1 changed (id {id})")]
        );
        // Restored from those maps, the reconciler writes the table anew at its next sync.
        let mut r = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = r.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            report.writes, 2,
            "the table, then the service pointing at it"
        );
        assert_eq!(table_addrs(&maps, &fe), written);
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
        // The table this build writes is kept: a restart now writes nothing.
        let mut again = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        assert_eq!(again.reconcile(&want, &mut maps).writes, 0);
    }

    /// A restore checks its tables on several threads (enough Services for each to get some):
    /// every table is checked, whichever thread's share it is in.
    #[test]
    fn every_restored_table_is_checked_however_the_work_is_shared() {
        // Unchecked maps: checking 1,200 Services' invariants after every write takes a minute.
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let count = 1200u16;
        let names: Vec<String> = (0..count).map(|i| format!("s{i}")).collect();
        let services: Vec<(&str, DesiredService)> = (names.iter().zip(0u16..))
            .map(|(n, i)| {
                (
                    n.as_str(),
                    service(30000 + i, &[(1 + (i % 200) as u8, true), (201, false)]),
                )
            })
            .collect();
        let want = state(&services);
        r.reconcile(&want, &mut maps);
        // Tables changed in the first, middle and last Services, each to other entries of its own.
        let tampered = [30000, 30000 + count / 2, 30000 + count - 1];
        for port in tampered {
            retable(&mut maps, &fe(10, port));
        }
        let written: Vec<Vec<IpAddr>> = (0..count)
            .map(|i| table_addrs(&maps, &fe(10, 30000 + i)))
            .collect();
        let mut r = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = r.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            report.writes,
            2 * tampered.len(),
            "each changed table and its service, nothing else"
        );
        for i in 0..count {
            let addrs = table_addrs(&maps, &fe(10, 30000 + i));
            if tampered.contains(&(30000 + i)) {
                assert_ne!(addrs, written[i as usize], "rewritten");
            } else {
                assert_eq!(addrs, written[i as usize], "kept");
            }
        }
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
    }

    #[test]
    fn maps_changed_behind_the_reconcilers_back_are_found_and_repaired() {
        let (mut maps, mut r) = checked_from_scratch();
        let want = state(&[
            ("a", service(30001, &[(1, true), (2, false)])),
            ("b", service(30002, &[(3, false)])),
            ("c", service(30003, &[(4, false)])),
        ]);
        r.reconcile(&want, &mut maps);
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
        // Tables swapped, a service and a backend gone: still what it wrote.
        let want = state(&[
            ("a", service(30001, &[(1, true), (2, false), (5, false)])),
            ("b", service(30002, &[(3, false)])),
        ]);
        r.reconcile(&want, &mut maps);
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
        let (services, backends) = r.ids_in_use();
        assert_eq!(
            maps.state.services.keys().next_back(),
            Some(&(services - 1))
        );
        assert_eq!(
            maps.state.backends.keys().next_back(),
            Some(&(backends - 1))
        );

        // Written by someone else: a frontend deleted, a backend readdressed, a table entry
        // changed, a stray frontend added.
        maps.state.frontends.remove(&frontend_key(&fe(10, 30001)));
        let two = *r
            .backend_ids
            .get(&(IpAddr::from([198, 19, 1, 2]), 8080))
            .unwrap();
        maps.state.backends.get_mut(&two).unwrap().addr = Addr::from(IpAddr::from([198, 19, 9, 9]));
        let b = maps.state.frontends[&frontend_key(&fe(10, 30002))];
        let offset = maps.state.services[&b.service_id].table_offset;
        maps.maglev.insert(offset, two);
        maps.state.frontends.insert(frontend_key(&fe(12, 30009)), b);
        assert_eq!(
            drift(&r, &maps),
            vec![
                "frontends: 1 missing (198.18.0.10:30001/TCP); 1 extra (198.18.0.12:30009/TCP)"
                    .to_string(),
                format!("Maglev tables: 1 changed (id {})", b.service_id),
                format!("backends: 1 changed (id {two})"),
            ]
        );

        // Repaired as a restart does: from what the maps hold, to the desired state.
        let mut r = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = r.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
        let ips = |last: &[u8]| {
            last.iter()
                .map(|l| IpAddr::from([198, 19, 1, *l]))
                .collect::<Vec<_>>()
        };
        assert_eq!(live_backends(&maps, &fe(10, 30001)), ips(&[1, 2, 5]));
        assert_eq!(live_backends(&maps, &fe(11, 30001)), ips(&[1, 2, 5]));
        assert_eq!(live_backends(&maps, &fe(10, 30002)), ips(&[3]));
        // The extra frontend drains like any other that left: it serves no new flow.
        let extra = frontend_key(&fe(12, 30009));
        assert!(maps.state.frontends[&extra].is_draining());
        end_all_drains(&mut r, &mut maps);
        assert!(!maps.state.frontends.contains_key(&extra));
        assert_eq!(drift(&r, &maps), Vec::<String>::new());
    }

    #[test]
    fn restart_with_changes_cleans_up_stale_entries() {
        let mut maps = FakeMaps::checked();
        let old = state(&[
            ("a", service(30001, &[(1, true)])),
            ("gone", service(30009, &[(9, false)])),
        ]);
        Reconciler::restore(Snapshot::default(), Limits::default()).reconcile(&old, &mut maps);
        let new = state(&[("a", service(30001, &[(1, true), (2, false)]))]);
        let mut restarted = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = restarted.reconcile(&new, &mut maps);
        assert!(report.errors.is_empty());
        end_all_drains(&mut restarted, &mut maps);
        assert_eq!(maps.state.frontends.len(), 2);
        assert_eq!(maps.state.services.len(), 1);
        assert_eq!(maps.state.backends.len(), 2);
        assert_eq!(live_backends(&maps, &fe(10, 30001)).len(), 2);
    }

    /// The ports `FRONTEND_PORTS` holds a bit for.
    fn frontend_ports(maps: &FakeMaps) -> Vec<u16> {
        (0..=u16::MAX)
            .filter(|port| {
                let (word, bit) = common::port_bit(*port);
                maps.state
                    .frontend_ports
                    .get(&word)
                    .is_some_and(|w| w & bit != 0)
            })
            .collect()
    }

    /// A restarted agent finds the UDP endpoints that left while it was down against the pairs
    /// the maps hold: the same pairs the model gave the state that programmed them.
    #[test]
    fn udp_pairs_read_back_from_the_maps_are_those_the_model_gives() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let mut dns = with_frontends(service(30053, &[(1, true), (2, false)]), |f| FrontendAddr {
            protocol: Protocol::Udp,
            ..f
        });
        let cluster_ip = |port, protocol| FrontendAddr {
            ip: IpAddr::from([198, 18, 50, 10]),
            port,
            protocol,
            scope: Scope::NodeSockets,
        };
        for f in [
            cluster_ip(53, Protocol::Udp),
            cluster_ip(crate::model::OTHER_PORTS, Protocol::Udp),
            cluster_ip(crate::model::OTHER_PORTS, Protocol::Tcp),
        ] {
            dns.frontends.insert(f, FrontendKind::ClusterIp);
        }
        let mut desired = state(&[("web", service(30001, &[(3, false)]))]);
        let dns_name = ServicePortName {
            protocol: Protocol::Udp,
            ..name("dns")
        };
        desired.services.insert(dns_name, Arc::new(dns));
        let report = r.reconcile(&desired, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let pairs = maps.snapshot().unwrap().udp_pairs();
        assert_eq!(pairs, crate::model::udp_pairs(&desired));
        assert_eq!(
            pairs.len(),
            6,
            "2 NodePorts and the ClusterIP's port, 2 endpoints each"
        );
        assert!(pairs.contains(&(
            (IpAddr::from([198, 18, 50, 10]), 53),
            (IpAddr::from([198, 19, 1, 2]), 8080)
        )));
    }

    #[test]
    fn frontend_ports_hold_the_ports_of_the_frontends_in_the_maps() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let mut with_lb = service(30002, &[(2, false)]);
        with_lb.frontends.insert(
            FrontendAddr {
                ip: IpAddr::from([198, 18, 0, 10]),
                port: 443,
                protocol: Protocol::Tcp,
                scope: Scope::External,
            },
            FrontendKind::LoadBalancer,
        );
        // Not the node sockets' frontends: tc egress never looks for them.
        with_lb.frontends.insert(
            FrontendAddr {
                ip: IpAddr::from([198, 18, 50, 10]),
                port: 53,
                protocol: Protocol::Udp,
                scope: Scope::NodeSockets,
            },
            FrontendKind::ClusterIp,
        );
        let a = ("a", service(30001, &[(1, false)]));
        r.reconcile(&state(&[a.clone(), ("b", with_lb)]), &mut maps);
        assert_eq!(frontend_ports(&maps), [443, 30001, 30002]);
        // A port stays while any frontend is on it.
        let mut one_node = service(30001, &[(1, false)]);
        one_node
            .frontends
            .retain(|f, _| f.ip == IpAddr::from([198, 18, 0, 11]));
        let report = r.reconcile(&state(&[("a", one_node)]), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // Draining frontends keep theirs (XDP still takes their flows' packets) until they go.
        assert_eq!(frontend_ports(&maps), [443, 30001, 30002]);
        end_all_drains(&mut r, &mut maps);
        assert_eq!(frontend_ports(&maps), [30001]);
        // Pins of a build without the map: the restarted agent fills it in.
        let only_a = state(&[a]);
        r.reconcile(&only_a, &mut maps);
        maps.state.frontend_ports.clear();
        let mut restarted = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report = restarted.reconcile(&only_a, &mut maps);
        assert_eq!(report.writes, 1, "the port's word, nothing else");
        assert_eq!(frontend_ports(&maps), [30001]);
        // A failed write is retried at the next sync, though nothing else changed.
        let mut failing = maps;
        failing.state.frontend_ports.clear();
        // After the restart's affinity sweep.
        failing.fail_at_write = Some(failing.writes + 2);
        let mut restarted = Reconciler::restore(failing.snapshot().unwrap(), Limits::default());
        let report = restarted.reconcile(&only_a, &mut failing);
        assert_eq!(report.errors.len(), 1);
        assert!(frontend_ports(&failing).is_empty());
        let report = restarted.reconcile(&only_a, &mut failing);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(frontend_ports(&failing), [30001]);
    }

    #[test]
    fn limits_are_errors_for_that_service_only() {
        let mut maps = FakeMaps::checked();
        let limits = Limits {
            frontends: 100,
            services: 2,
            backends: 100,
            backends_per_service: 2,
            ..Default::default()
        };
        let mut r = Reconciler::restore(Snapshot::default(), limits);
        let want = state(&[
            ("a", service(30001, &[(1, false)])),
            ("b", service(30002, &[(1, false), (2, false), (3, false)])),
            ("c", service(30003, &[(4, false)])),
        ]);
        let report = r.reconcile(&want, &mut maps);
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(matches!(
            report.errors[0],
            SyncError::BackendsPerServiceLimit { count: 3, .. }
        ));
        assert!(matches!(
            report.errors[1],
            SyncError::ServiceLimit { limit: 2, .. }
        ));
        // Each says which flag raises the limit.
        for (error, flag) in report
            .errors
            .iter()
            .zip(["--max-backends-per-service", "--max-services"])
        {
            assert!(error.to_string().contains(flag), "{error}");
        }
        assert_eq!(
            live_backends(&maps, &fe(10, 30001)),
            [IpAddr::from([198, 19, 1, 1])]
        );
        assert!(!maps
            .state
            .frontends
            .contains_key(&frontend_key(&fe(10, 30002))));
    }

    #[test]
    fn frontend_ids_are_stable_unique_and_reused_with_fresh_counters() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        r.reconcile(
            &state(&[
                ("a", service(30001, &[(1, false)])),
                ("b", service(30002, &[(2, false)])),
            ]),
            &mut maps,
        );
        let ids: std::collections::BTreeSet<u32> =
            maps.state.frontends.values().map(|f| f.id).collect();
        assert_eq!(ids.len(), 4, "unique per frontend");
        assert_eq!(
            maps.stats_resets.len(),
            4,
            "counters zeroed before first use"
        );
        let before = maps.state.frontends.clone();
        // Changing a backend set keeps every frontend (and its counters) as it was.
        r.reconcile(
            &state(&[
                ("a", service(30001, &[(3, false)])),
                ("b", service(30002, &[(2, false)])),
            ]),
            &mut maps,
        );
        assert_eq!(maps.state.frontends, before);
        // Removed frontends free their ids after the new ones are in (deletions last); the next new
        // frontends get them, with counters reset again.
        let ids_of = |maps: &FakeMaps, port: u16| -> Vec<u32> {
            maps.state
                .frontends
                .iter()
                .filter(|(k, _)| k.port == common::port(port))
                .map(|(_, f)| f.id)
                .collect()
        };
        let a_ids = ids_of(&maps, 30001);
        let b = || ("b", service(30002, &[(2, false)]));
        r.reconcile(
            &state(&[b(), ("c", service(30003, &[(2, false)]))]),
            &mut maps,
        );
        assert!(
            ids_of(&maps, 30003).iter().all(|id| !ids.contains(id)),
            "fresh while a's are still live"
        );
        // a's frontends drain, keeping their ids (and counters) until no flow uses them.
        assert_eq!(ids_of(&maps, 30001), a_ids);
        let (ended, errors) = r.end_drains(&BTreeSet::new(), &mut maps);
        assert_eq!((ended.len(), errors.len()), (a_ids.len(), 0));
        r.reconcile(
            &state(&[
                b(),
                ("c", service(30003, &[(2, false)])),
                ("d", service(30004, &[(2, false)])),
            ]),
            &mut maps,
        );
        let mut d_ids = ids_of(&maps, 30004);
        d_ids.sort();
        let mut a_sorted = a_ids.clone();
        a_sorted.sort();
        assert_eq!(d_ids, a_sorted, "freed ids reused");
        assert_eq!(maps.stats_resets.len(), 8);
    }

    #[test]
    fn a_change_to_one_service_writes_only_that_service() {
        let (mut maps, mut r) = checked_from_scratch();
        let many: Vec<(String, DesiredService)> = (0..50u16)
            .map(|i| (format!("s{i}"), service(30000 + i, &[(1 + i as u8, false)])))
            .collect();
        let as_state = |v: &[(String, DesiredService)]| DesiredState {
            services: v
                .iter()
                .map(|(n, s)| (name(n), Arc::new(s.clone())))
                .collect(),
            ..Default::default()
        };
        r.reconcile(&as_state(&many), &mut maps);
        let before = maps.writes;
        let mut changed = many.clone();
        changed[7].1 = service(30007, &[(200, false)]);
        let report = r.reconcile(&as_state(&changed), &mut maps);
        assert!(report.errors.is_empty());
        // The new backend, s7's new table, the service flip, the old backend.
        assert_eq!(report.writes, 4, "only s7's entries");
        assert_eq!(maps.writes - before, 4);
        assert!(!report.frontends_changed, "FRONTEND_PORTS need no look");
        changed.pop();
        let report = r.reconcile(&as_state(&changed), &mut maps);
        assert!(report.frontends_changed, "a Service's frontends went");
    }

    #[test]
    fn affinity_is_forgotten_for_backends_that_leave_and_for_removed_services() {
        let (mut maps, mut r) = checked_from_scratch();
        let sticky = |backends: &[(u8, bool)]| DesiredService {
            affinity_timeout_s: 60,
            ..service(30001, backends)
        };
        let id_of =
            |r: &Reconciler, last: u8| r.backend_ids[&(IpAddr::from([198, 19, 1, last]), 8080)];
        r.reconcile(
            &state(&[("a", sticky(&[(1, false), (2, false)]))]),
            &mut maps,
        );
        let id = maps.state.frontends.values().next().unwrap().service_id;
        assert_eq!(maps.state.services[&id].affinity_timeout_s, 60);
        let (one, two) = (id_of(&r, 1), id_of(&r, 2));
        assert_eq!(maps.affinity, [(id, one), (id, two)].into());
        // A backend leaves: clients stuck to it are forgotten, and only then is it cleared.
        r.reconcile(&state(&[("a", sticky(&[(2, false)]))]), &mut maps);
        assert_eq!(maps.affinity, [(id, two)].into());
        assert!(!maps.state.backends.contains_key(&one));
        // Affinity turned off: nothing of it may stick clients once it is back on.
        r.reconcile(&state(&[("a", service(30001, &[(2, false)]))]), &mut maps);
        assert_eq!(maps.affinity, BTreeSet::new());
        r.reconcile(&state(&[("a", sticky(&[(2, false)]))]), &mut maps);
        r.reconcile(&DesiredState::default(), &mut maps);
        assert_eq!(maps.affinity, BTreeSet::new());
    }

    /// A sweep that fails keeps what it would have freed: the backend stays (clients stuck to it
    /// keep it, rather than getting none), and the removed service's id is not reused, until a
    /// later sync sweeps.
    #[test]
    fn a_failed_affinity_sweep_holds_back_the_ids_it_concerns() {
        let (mut maps, mut r) = checked_from_scratch();
        let sticky = |port: u16, backends: &[(u8, bool)]| DesiredService {
            affinity_timeout_s: 60,
            ..service(port, backends)
        };
        r.reconcile(
            &state(&[("a", sticky(30001, &[(1, false), (2, false)]))]),
            &mut maps,
        );
        let id = maps.state.frontends.values().next().unwrap().service_id;
        let one = r.backend_ids[&(IpAddr::from([198, 19, 1, 1]), 8080)];
        maps.fail_sweeps = true;
        let report = r.reconcile(&DesiredState::default(), &mut maps);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert!(report.errors[0].to_string().contains("session affinity"));
        assert!(
            maps.state.backends.contains_key(&one),
            "cleared before the sweep"
        );
        assert!(maps.affinity.contains(&(id, one)));
        // A new service while sweeps still fail gets another id.
        let b_only = state(&[("b", sticky(30002, &[(3, false)]))]);
        r.reconcile(&b_only, &mut maps);
        let b = maps
            .state
            .frontends
            .values()
            .find(|f| !f.is_draining())
            .unwrap()
            .service_id;
        assert_ne!(b, id, "id reused before its affinity was swept");
        assert!(maps.state.backends.contains_key(&one));
        // The next sweep frees it all.
        maps.fail_sweeps = false;
        let report = r.reconcile(&b_only, &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!maps.state.backends.contains_key(&one));
        assert!(
            maps.affinity.iter().all(|(s, _)| *s == b),
            "{:?}",
            maps.affinity
        );
    }

    #[test]
    fn backends_go_with_their_last_service_and_only_then() {
        let (mut maps, mut r) = checked_from_scratch();
        // Backend 2 is shared; 1 and 3 belong to one service each.
        r.reconcile(
            &state(&[
                ("a", service(30001, &[(1, false), (2, false)])),
                ("b", service(30002, &[(2, false), (3, false)])),
            ]),
            &mut maps,
        );
        assert_eq!(maps.state.backends.len(), 3);
        r.reconcile(
            &state(&[("b", service(30002, &[(2, false), (3, false)]))]),
            &mut maps,
        );
        assert_eq!(
            maps.state.backends.len(),
            2,
            "a's own backend went, the shared one stayed"
        );
        r.reconcile(&state(&[("b", service(30002, &[(3, false)]))]), &mut maps);
        assert_eq!(maps.state.backends.len(), 1);
        assert_eq!(r.backend_ids.len(), 1);
        assert!(r.maybe_unused.is_empty());

        // A backend left in the maps that no service uses (an earlier run's) goes at the first
        // reconcile after a restart, even one that changes nothing else.
        let orphan = Backend {
            addr: Addr::from(IpAddr::from([198, 19, 9, 9])),
            port: common::port(8080),
            ..Default::default()
        };
        maps.state.backends.insert(77, orphan);
        let mut restarted = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let report =
            restarted.reconcile(&state(&[("b", service(30002, &[(3, false)]))]), &mut maps);
        assert_eq!(report.writes, 1, "only the orphan's removal");
        assert!(!maps.state.backends.contains_key(&77));
    }

    #[test]
    fn udp_flows_are_purged_for_a_backend_only_another_service_keeps() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let udp = |n: &str, node_port: u16, backends: &[(u8, bool)]| {
            let mut s = service(node_port, backends);
            s.frontends = s
                .frontends
                .into_iter()
                .map(|(f, kind)| {
                    (
                        FrontendAddr {
                            protocol: Protocol::Udp,
                            ..f
                        },
                        kind,
                    )
                })
                .collect();
            let name = ServicePortName {
                protocol: Protocol::Udp,
                ..name(n)
            };
            (name, Arc::new(s))
        };
        let udp_state = |services: Vec<(ServicePortName, Arc<DesiredService>)>| DesiredState {
            services: services.into_iter().collect(),
            ..Default::default()
        };
        // Backend 2 serves both a and b; 1 and 3 one each.
        r.reconcile(
            &udp_state(vec![
                udp("a", 30001, &[(1, false), (2, false)]),
                udp("b", 30002, &[(2, false), (3, false)]),
            ]),
            &mut maps,
        );
        let id_of = |maps: &FakeMaps, port: u16| {
            let key = frontend_key(&FrontendAddr {
                protocol: Protocol::Udp,
                ..fe(10, port)
            });
            maps.state.frontends[&key].service_id
        };
        let (a, shared) = (
            id_of(&maps, 30001),
            r.backend_ids[&(IpAddr::from([198, 19, 1, 2]), 8080)],
        );
        // 2 stops taking a's new flows but still serves (terminating): a's flows to it go on,
        // so its entry stays and nothing is purged; once it stops serving, they go.
        let (name_a, a_of) = udp("a", 30001, &[(1, false)]);
        let mut still = (*a_of).clone();
        still.still_serving = vec![BackendAddr {
            ip: IpAddr::from([198, 19, 1, 2]),
            port: 8080,
            local: false,
        }];
        let report = r.reconcile(
            &udp_state(vec![
                (name_a, Arc::new(still)),
                udp("b", 30002, &[(2, false), (3, false)]),
            ]),
            &mut maps,
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(
            maps.udp_flow_purges.is_empty(),
            "{:?}",
            maps.udp_flow_purges
        );
        assert!(maps.state.backends.contains_key(&shared));
        // 2 leaves a (b keeps it): a's flows to it must go; the datapath can't tell on its own.
        r.reconcile(
            &udp_state(vec![
                udp("a", 30001, &[(1, false)]),
                udp("b", 30002, &[(2, false), (3, false)]),
            ]),
            &mut maps,
        );
        assert_eq!(maps.udp_flow_purges, [(a, vec![shared])]);
        // 3 leaves b and every service: the datapath sees that itself, nothing to purge.
        r.reconcile(
            &udp_state(vec![
                udp("a", 30001, &[(1, false)]),
                udp("b", 30002, &[(2, false)]),
            ]),
            &mut maps,
        );
        assert_eq!(maps.udp_flow_purges.len(), 1);
        // TCP flows keep their backend: no purge for a TCP service either.
        r.reconcile(
            &state(&[
                ("t1", service(30003, &[(5, false), (6, false)])),
                ("t2", service(30004, &[(5, false)])),
            ]),
            &mut maps,
        );
        r.reconcile(
            &state(&[
                ("t1", service(30003, &[(6, false)])),
                ("t2", service(30004, &[(5, false)])),
            ]),
            &mut maps,
        );
        assert_eq!(maps.udp_flow_purges.len(), 1);
    }

    #[test]
    fn an_id_handed_out_for_a_failed_backend_write_is_given_back() {
        let mut maps = FakeMaps {
            fail_at_write: Some(1),
            ..Default::default()
        };
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let first = r.reconcile(&state(&[("a", service(30001, &[(1, false)]))]), &mut maps);
        assert_eq!(first.errors.len(), 1);
        // The backend is no longer wanted: its id and address are forgotten.
        let second = r.reconcile(&state(&[("a", service(30001, &[(2, false)]))]), &mut maps);
        assert!(second.errors.is_empty(), "{:?}", second.errors);
        assert_eq!(r.backend_ids.len(), 1, "{:?}", r.backend_ids);
        assert!(r.maybe_unused.is_empty());
        assert_eq!(maps.state.backends.len(), 1);
    }

    #[test]
    fn failed_write_is_reported_and_retried_next_time() {
        let mut maps = FakeMaps {
            fail_at_write: Some(2),
            ..FakeMaps::checked()
        };
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let want = state(&[("a", service(30001, &[(1, false), (2, false)]))]);
        let first = r.reconcile(&want, &mut maps);
        assert_eq!(first.errors.len(), 1);
        let second = r.reconcile(&want, &mut maps);
        assert!(second.errors.is_empty(), "{:?}", second.errors);
        assert_eq!(live_backends(&maps, &fe(10, 30001)).len(), 2);
    }

    /// What a frontend serves, as the datapath reads it: its kind, and its service's backends
    /// (address, port, flags, from the Maglev table), flags, affinity and source ranges.
    type Served = (
        u16,
        BTreeSet<(Addr, u16, u16)>,
        u32,
        u32,
        BTreeSet<(Addr, u8)>,
    );

    fn served(maps: &FakeMaps) -> BTreeMap<FrontendKey, Served> {
        let services = &maps.state.services;
        maps.state
            .frontends
            .iter()
            .filter(|(_, fe)| !fe.is_draining())
            .map(|(key, fe)| {
                let s = services.get(&fe.service_id).copied().unwrap_or_default();
                let backends = (0..s.table_size)
                    .map(|i| maps.state.backends[&maps.maglev[&(s.table_offset + i)]])
                    .map(|b| (b.addr, b.port, b.flags))
                    .collect();
                let ranges = maps
                    .state
                    .source_ranges
                    .iter()
                    .filter(|(id, _, _)| *id == fe.service_id)
                    .map(|(_, addr, len)| (*addr, *len))
                    .collect();
                let served = (fe.flags, backends, s.flags, s.affinity_timeout_s, ranges);
                (*key, served)
            })
            .collect()
    }

    /// [`served`] as `want` asks for it.
    fn expected(want: &DesiredState) -> BTreeMap<FrontendKey, Served> {
        let mut all = BTreeMap::new();
        for s in want.services.values() {
            let backends = s
                .backends
                .iter()
                .map(backend_value)
                .map(|b| (b.addr, b.port, b.flags))
                .collect::<BTreeSet<_>>();
            let mut flags = SERVICE_IN_USE;
            if s.when_empty == WhenEmpty::Drop {
                flags |= SERVICE_DROP_WHEN_EMPTY;
            }
            if s.source_ranges.is_some() {
                flags |= SERVICE_SOURCE_RANGES;
            }
            let ranges = s.source_ranges.iter().flatten();
            let ranges: BTreeSet<_> = ranges.map(|(n, len)| (Addr::from(*n), *len)).collect();
            for (fe, kind) in &s.frontends {
                let served = (
                    frontend_flags(*kind),
                    backends.clone(),
                    flags,
                    s.affinity_timeout_s,
                    ranges.clone(),
                );
                all.insert(frontend_key(fe), served);
            }
        }
        all
    }

    /// Endpoints that still serve (`still_serving`) with no `BACKENDS` entry: UDP flows to them
    /// would move.
    fn unkept(want: &DesiredState, maps: &FakeMaps) -> Vec<String> {
        let held: HashSet<Backend> = maps.state.backends.values().copied().collect();
        let all = want.services.values().flat_map(|s| &s.still_serving);
        let missing: BTreeSet<String> = all
            .filter(|b| !held.contains(&backend_value(b)))
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect();
        missing.into_iter().collect()
    }

    /// The frontends that serve new flows.
    fn serving(maps: &FakeMaps) -> BTreeSet<FrontendKey> {
        let frontends = maps.state.frontends.iter();
        frontends
            .filter(|(_, fe)| !fe.is_draining())
            .map(|(k, _)| *k)
            .collect()
    }

    /// Draining frontends that should not be: each must be an external TCP one that `want` does
    /// not have, with no service behind it.
    fn misdrained(want: &DesiredState, maps: &FakeMaps) -> Vec<String> {
        let wanted = expected(want);
        maps.state
            .frontends
            .iter()
            .filter(|(k, fe)| {
                fe.is_draining()
                    && (wanted.contains_key(k)
                        || fe.service_id != NO_SERVICE
                        || k.proto != common::PROTO_TCP
                        || k.scope != common::SCOPE_EXTERNAL)
            })
            .map(|(k, _)| frontend_display(k))
            .collect()
    }

    /// Ends the drains of a random half of the draining frontends (the others still have live
    /// flows): exactly those go.
    fn end_some_drains(rng: &mut Rng, r: &mut Reconciler, maps: &mut FakeMaps, step: usize) {
        let draining = |maps: &FakeMaps| -> BTreeSet<(Addr, u16)> {
            let frontends = maps.state.frontends.iter();
            let keys = frontends.filter(|(_, fe)| fe.is_draining());
            keys.map(|(k, _)| (k.addr, k.port)).collect()
        };
        let before = draining(maps);
        let in_use: BTreeSet<(Addr, u16)> = before
            .iter()
            .filter(|_| rng.below(2) == 0)
            .copied()
            .collect();
        let (ended, errors) = r.end_drains(&in_use, maps);
        assert!(errors.is_empty(), "step {step}: {errors:?}");
        let left = draining(maps);
        assert!(left.is_subset(&in_use), "step {step}");
        assert_eq!(ended.len() + left.len(), before.len(), "step {step}");
    }

    /// Frontends in `serving` that `want` still has but the maps no longer do. One that served
    /// goes on serving through a failed write (with what it had, if its own change failed).
    fn went_dark(
        were_serving: &BTreeSet<FrontendKey>,
        want: &DesiredState,
        maps: &FakeMaps,
    ) -> Vec<String> {
        let (wanted, now) = (expected(want), serving(maps));
        were_serving
            .iter()
            .filter(|k| wanted.contains_key(k) && !now.contains(k))
            .map(frontend_display)
            .collect()
    }

    /// Session affinity the maps may hold that leads a client elsewhere than a backend of its
    /// service: to a backend that left it, or of a service it no longer is (its id reused).
    fn stale_affinity(maps: &FakeMaps) -> Vec<String> {
        let services = &maps.state.services;
        maps.affinity
            .iter()
            .filter(|(id, backend)| {
                !services.get(id).is_some_and(|s| {
                    let mut table = s.table_offset..s.table_offset + s.table_size;
                    s.affinity_timeout_s != 0 && table.any(|i| maps.maglev[&i] == *backend)
                })
            })
            .map(|(id, backend)| format!("service {id} -> backend {backend}"))
            .collect()
    }

    /// The services' table regions in the maps, where two overlap.
    fn overlapping_tables(maps: &FakeMaps) -> Vec<String> {
        let mut regions: Vec<(u32, u32, u32)> = maps
            .state
            .services
            .iter()
            .filter(|(_, s)| s.table_size > 0)
            .map(|(id, s)| (s.table_offset, s.table_offset + s.table_size, *id))
            .collect();
        regions.sort();
        regions
            .windows(2)
            .filter(|w| w[1].0 < w[0].1)
            .map(|w| {
                format!(
                    "service {} {:?} overlaps service {} {:?}",
                    w[0].2,
                    w[0].0..w[0].1,
                    w[1].2,
                    w[1].0..w[1].1
                )
            })
            .collect()
    }

    /// After churn a Service's id and its table's place need not be in the same order; a restart
    /// must still count every table's region as used.
    #[test]
    fn a_restart_frees_only_the_space_between_tables() {
        let (mut maps, mut r) = checked_from_scratch();
        // Tables of 251 (a) and 509 (b) entries, in that order.
        let b = service(30002, &[(2, false), (3, false), (4, false)]);
        r.reconcile(
            &state(&[("a", service(30001, &[(1, true)])), ("b", b.clone())]),
            &mut maps,
        );
        // a's table grows and moves past b's.
        let many: Vec<(u8, bool)> = (1..=40).map(|i| (i, false)).collect();
        let a = service(30001, &many);
        r.reconcile(&state(&[("a", a.clone()), ("b", b.clone())]), &mut maps);
        let mut r = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        // 509 entries: they fit in the space before a's new table only where b's is.
        let c = service(30003, &[(50, false), (51, false), (52, false)]);
        let report = r.reconcile(&state(&[("a", a), ("b", b), ("c", c)]), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(overlapping_tables(&maps), Vec::<String>::new());
    }

    /// Service port `i` of a dozen: even ones TCP, odd ones UDP.
    fn random_name(i: u8) -> ServicePortName {
        ServicePortName {
            protocol: protocol_of(i),
            ..name(&format!("svc-{i}"))
        }
    }

    fn protocol_of(i: u8) -> Protocol {
        if i.is_multiple_of(2) {
            Protocol::Tcp
        } else {
            Protocol::Udp
        }
    }

    /// One of a dozen Service ports removed (one time in `remove_one_in`) or set anew.
    fn change_one(rng: &mut Rng, want: &mut DesiredState, remove_one_in: usize) {
        let i = rng.below(12) as u8;
        if rng.below(remove_one_in) == 0 {
            want.services.remove(&random_name(i));
        } else {
            let s = random_service(rng, i);
            want.services.insert(random_name(i), Arc::new(s));
        }
    }

    /// A random Service port `i` (its own frontends: NodePorts on two node addresses, perhaps an
    /// LB IP and a twin for the node's sockets) over some of ten shared endpoints.
    fn random_service(rng: &mut Rng, i: u8) -> DesiredService {
        let protocol = protocol_of(i);
        let fe = |ip: [u8; 4], port: u16, scope: Scope| FrontendAddr {
            ip: IpAddr::from(ip),
            port,
            protocol,
            scope,
        };
        let mut s = DesiredService::default();
        for node in [10, 11] {
            let node_port = fe([198, 18, 0, node], 30000 + i as u16, Scope::External);
            s.frontends.insert(node_port, FrontendKind::NodePort);
        }
        if rng.below(2) == 0 {
            let lb = fe([198, 18, 100, i], 80, Scope::External);
            s.frontends.insert(lb, FrontendKind::LoadBalancer);
        }
        if rng.below(4) == 0 {
            let twin = fe([198, 18, 0, 10], 30000 + i as u16, Scope::NodeSockets);
            s.frontends.insert(twin, FrontendKind::NodePort);
        }
        let mut backends: Vec<BackendAddr> = (1..=10u8)
            .filter(|_| rng.below(3) == 0)
            .map(|last| BackendAddr {
                ip: IpAddr::from([198, 19, 1, last]),
                port: 8080 + (last % 2) as u16,
                // Whether an endpoint is on this node is the endpoint's, whichever Service has it.
                local: last % 3 == 0,
            })
            .collect();
        backends.sort();
        // Some of the others still serve (terminating, or elsewhere under a Local policy).
        s.still_serving = (1..=10u8)
            .map(|last| BackendAddr {
                ip: IpAddr::from([198, 19, 1, last]),
                port: 8080 + (last % 2) as u16,
                local: last % 3 == 0,
            })
            .filter(|b| !backends.contains(b) && rng.below(4) == 0)
            .collect();
        s.backends = backends;
        s.affinity_timeout_s = [0, 0, 10800][rng.below(3)];
        s.when_empty = [WhenEmpty::Reject, WhenEmpty::Drop][rng.below(2)];
        s.source_ranges = match rng.below(3) {
            0 => None,
            1 => Some(vec![(IpAddr::from([198, 18, 0, 0]), 16)]),
            _ => Some(vec![
                (IpAddr::from([198, 18, 0, 0]), 24),
                (IpAddr::from([198, 18, 7, 0]), 24),
            ]),
        };
        s
    }

    /// Random changes to a dozen Service ports, some syncs with a write failing: after every sync
    /// without one, the maps serve exactly the desired state, match what the reconciler believes
    /// it wrote, a second sync writes nothing, and a restart from the maps writes nothing either.
    /// And after every single write, no frontend leads to a missing table entry or backend. TCP
    /// frontends that left drain (and only they), and drains end when their flows do.
    #[test]
    fn random_changes_and_failed_writes_converge_on_the_desired_state() {
        let (mut maps, mut r) = checked_from_scratch();
        let mut rng = Rng::from_env("EXPOSURE_RECONCILE_SEED", 0x9e37_79b9_7f4a_7c15);
        let mut want = DesiredState::default();
        let (mut failed, mut clean, mut drained) = (0, 0, 0);
        for step in 0..400 {
            for _ in 0..1 + rng.below(3) {
                change_one(&mut rng, &mut want, 4);
            }
            if rng.below(4) == 0 {
                maps.fail_at_write = Some(maps.writes + 1 + rng.below(12));
                let serving = serving(&maps);
                let report = r.reconcile(&want, &mut maps);
                maps.fail_at_write = None;
                assert_eq!(
                    went_dark(&serving, &want, &maps),
                    Vec::<String>::new(),
                    "step {step}: {:?}",
                    report.errors
                );
                assert_eq!(
                    overlapping_tables(&maps),
                    Vec::<String>::new(),
                    "step {step}"
                );
                failed += usize::from(!report.errors.is_empty());
                // What it believes it wrote is what the maps hold, failed write or not.
                assert_eq!(
                    drift(&r, &maps),
                    Vec::<String>::new(),
                    "step {step}: {:?}",
                    report.errors
                );
                continue;
            }
            let report = r.reconcile(&want, &mut maps);
            assert!(report.errors.is_empty(), "step {step}: {:?}", report.errors);
            assert_eq!(
                overlapping_tables(&maps),
                Vec::<String>::new(),
                "step {step}"
            );
            let (got, wanted) = (served(&maps), expected(&want));
            let differ: Vec<String> = got
                .keys()
                .chain(wanted.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| got.get(k) != wanted.get(k))
                .map(|k| {
                    format!(
                        "{}: {:?} wanted {:?}",
                        frontend_display(k),
                        got.get(k),
                        wanted.get(k)
                    )
                })
                .collect();
            assert_eq!(differ, Vec::<String>::new(), "step {step}");
            assert_eq!(drift(&r, &maps), Vec::<String>::new(), "step {step}");
            assert_eq!(stale_affinity(&maps), Vec::<String>::new(), "step {step}");
            assert_eq!(
                misdrained(&want, &maps),
                Vec::<String>::new(),
                "step {step}"
            );
            assert_eq!(unkept(&want, &maps), Vec::<String>::new(), "step {step}");
            drained += r.draining();
            if rng.below(3) == 0 {
                end_some_drains(&mut rng, &mut r, &mut maps, step);
                assert_eq!(drift(&r, &maps), Vec::<String>::new(), "step {step}");
            }
            let again = r.reconcile(&want, &mut maps);
            assert_eq!((again.writes, again.errors.len()), (0, 0), "step {step}");
            if step % 10 == 0 {
                let mut restarted =
                    Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
                let report = restarted.reconcile(&want, &mut maps);
                assert_eq!((report.writes, report.errors.len()), (0, 0), "step {step}");
                // Go on from the restored one: its free space is the maps'.
                r = restarted;
            }
            clean += 1;
        }
        assert!(
            failed > 20 && clean > 200 && drained > 100,
            "{failed} failed syncs, {clean} clean, {drained} frontends seen draining"
        );
    }

    /// One Service port's frontend goes to another (as when Services that claimed the same one
    /// change), or, one time in three, the other also gets the frontend's IPv4-mapped IPv6 twin,
    /// which is the same key in the maps. Whether anything moved.
    fn move_a_frontend(rng: &mut Rng, want: &mut DesiredState) -> bool {
        let names: Vec<ServicePortName> = want.services.keys().cloned().collect();
        if names.len() < 2 {
            return false;
        }
        let (from, to) = (rng.pick(&names), rng.pick(&names));
        if from == to {
            return false;
        }
        let mut giver = (*want.services[&from]).clone();
        let mut taker = (*want.services[&to]).clone();
        let addrs: Vec<FrontendAddr> = giver.frontends.keys().copied().collect();
        let addr = rng.pick(&addrs);
        let kind = giver.frontends[&addr];
        if let (0, IpAddr::V4(v4)) = (rng.below(3), addr.ip) {
            let twin = IpAddr::V6(v4.to_ipv6_mapped());
            taker
                .frontends
                .insert(FrontendAddr { ip: twin, ..addr }, kind);
        } else {
            giver.frontends.remove(&addr);
            taker.frontends.insert(addr, kind);
        }
        if giver.frontends.is_empty() {
            want.services.remove(&from);
        } else {
            want.services.insert(from, Arc::new(giver));
        }
        want.services.insert(to, Arc::new(taker));
        true
    }

    /// Reconciling only what changed does exactly what a look at every Service port does: the
    /// same writes (so a write fails at the same point), reports and maps, through random changes,
    /// failed writes (after which every port is looked at again), tight limits and ended drains.
    #[test]
    fn reconciling_what_changed_writes_what_a_full_look_writes() {
        // Tight enough that a change now and then finds no room for its table, or no id.
        let limits = Limits {
            maglev_entries: 7_000,
            services: 12,
            backends: 11,
            ..Limits::default()
        };
        let mut rng = Rng::from_env("EXPOSURE_RECONCILE_SEED", 0x6a09_e667_f3bc_c908);
        let (mut full_maps, mut changed_maps) = (FakeMaps::default(), FakeMaps::default());
        let mut full = Reconciler::restore(Snapshot::default(), limits);
        let mut by_change = Reconciler::restore(Snapshot::default(), limits);
        let mut want = DesiredState::default();
        let (mut only_changed, mut refused, mut moved) = (0, 0, 0);
        // Metrics labels, brought up to date now and then (several syncs' changes at once).
        let mut labels = BTreeMap::new();
        for step in 0..600 {
            let before = want.clone();
            for _ in 0..1 + rng.below(3) {
                change_one(&mut rng, &mut want, 3);
            }
            if rng.below(4) == 0 {
                moved += usize::from(move_a_frontend(&mut rng, &mut want));
            }
            if rng.below(6) == 0 {
                let at = full_maps.writes + 1 + rng.below(12);
                full_maps.fail_at_write = Some(at);
                changed_maps.fail_at_write = Some(at - full_maps.writes + changed_maps.writes);
            }
            let changed = crate::model::changed_between(&before, &want);
            only_changed += usize::from(by_change.clean);
            let a = full.reconcile(&want, &mut full_maps);
            let b = by_change.reconcile_changed(&want, &changed, &mut changed_maps);
            (full_maps.fail_at_write, changed_maps.fail_at_write) = (None, None);
            let text = |r: &SyncReport| -> Vec<String> {
                r.errors.iter().map(ToString::to_string).collect()
            };
            assert_eq!((a.writes, text(&a)), (b.writes, text(&b)), "step {step}");
            refused += text(&a)
                .iter()
                .filter(|e| e.contains("raise --max"))
                .count();
            assert_eq!(full_maps.state, changed_maps.state, "step {step}");
            assert_eq!(full_maps.writes, changed_maps.writes, "step {step}");
            assert_eq!(
                drift(&by_change, &changed_maps),
                Vec::<String>::new(),
                "step {step}"
            );
            if rng.below(4) == 0 {
                let in_use = BTreeSet::new();
                assert_eq!(
                    full.end_drains(&in_use, &mut full_maps).0.len(),
                    by_change.end_drains(&in_use, &mut changed_maps).0.len(),
                    "step {step}"
                );
            }
            if rng.below(3) == 0 {
                by_change.update_frontend_labels(&mut labels);
                assert_eq!(labels, by_change.frontend_labels(), "step {step}");
            }
        }
        assert!(
            only_changed > 300 && refused > 20 && moved > 50,
            "{only_changed} syncs of only what changed, {refused} refusals, {moved} moves"
        );
    }

    /// [`random_changes_and_failed_writes_converge_on_the_desired_state`] within tight limits
    /// (ids, backends per Service, Maglev space), so syncs also fail on them: still no two tables
    /// share space, the view stays the maps', Services that were serving keep serving, those
    /// without an error are served exactly; and once all are gone, nothing is left and the whole
    /// Maglev space is free again.
    #[test]
    fn random_changes_within_tight_limits_leave_nothing_behind() {
        let limits = Limits {
            maglev_entries: 4093,
            services: 8,
            backends: 8,
            backends_per_service: 6,
            ..Limits::default()
        };
        let mut maps = FakeMaps::checked();
        let mut r = Reconciler::restore(Snapshot::default(), limits);
        let mut rng = Rng::from_env("EXPOSURE_RECONCILE_SEED", 0x2545_f491_4f6c_dd1d);
        let mut want = DesiredState::default();
        let mut refused = 0;
        for step in 0..400 {
            change_one(&mut rng, &mut want, 3);
            if rng.below(5) == 0 {
                maps.fail_at_write = Some(maps.writes + 1 + rng.below(12));
            }
            let serving = serving(&maps);
            let report = r.reconcile(&want, &mut maps);
            maps.fail_at_write = None;
            let errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
            refused += errors.iter().filter(|e| e.contains("raise --max")).count();
            assert_eq!(
                overlapping_tables(&maps),
                Vec::<String>::new(),
                "step {step}"
            );
            assert_eq!(
                drift(&r, &maps),
                Vec::<String>::new(),
                "step {step}: {errors:?}"
            );
            assert_eq!(
                went_dark(&serving, &want, &maps),
                Vec::<String>::new(),
                "step {step}: {errors:?}"
            );
            if errors.is_empty() {
                assert_eq!(stale_affinity(&maps), Vec::<String>::new(), "step {step}");
                // (A Service refused for a limit keeps draining what it had before.)
                assert_eq!(
                    misdrained(&want, &maps),
                    Vec::<String>::new(),
                    "step {step}"
                );
            }
            if rng.below(3) == 0 {
                end_some_drains(&mut rng, &mut r, &mut maps, step);
            }
            let wanted = expected(&want);
            let got = served(&maps);
            for (name, s) in &want.services {
                let named = name.to_string();
                // A Service with an error of its own keeps what it had; after an injected write
                // failure the frontends' phase may not have run whole.
                let own = errors.iter().any(|e| e.starts_with(&format!("{named}:")));
                if own || errors.iter().any(|e| e.contains("injected")) {
                    continue;
                }
                for fe in s.frontends.keys() {
                    let k = frontend_key(fe);
                    assert_eq!(
                        got.get(&k),
                        wanted.get(&k),
                        "step {step}: {}",
                        frontend_display(&k)
                    );
                }
            }
        }
        assert!(refused > 20, "{refused} refusals for limits");
        want.services.clear();
        for _ in 0..2 {
            let report = r.reconcile(&want, &mut maps);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
        }
        end_all_drains(&mut r, &mut maps);
        assert_eq!(maps.state.frontends, BTreeMap::new());
        assert_eq!(maps.state.services, BTreeMap::new());
        assert_eq!(maps.state.backends, BTreeMap::new());
        assert_eq!(maps.state.source_ranges, BTreeSet::new());
        assert_eq!(maps.affinity, BTreeSet::new());
        // All Maglev space is free again, in one piece.
        let free: Vec<(u32, u32)> = r.regions.free.iter().map(|(o, l)| (*o, *l)).collect();
        assert!(r.regions.quarantine.is_empty());
        assert!(
            r.regions.end == 0 || free == [(0, r.regions.end)],
            "{free:?} of {}",
            r.regions.end
        );
    }
}
