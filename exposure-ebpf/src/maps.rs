//! The maps, named by what they hold. All pinned by name under the agent's pin directory, so a
//! restarted agent finds the same state and established flows keep their backends.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use exposure_common::*;

#[map]
pub static FRONTENDS4: HashMap<FrontendKey4, Frontend> = HashMap::pinned(MAX_FRONTENDS, 0);
#[map]
pub static FRONTENDS6: HashMap<FrontendKey, Frontend> = HashMap::pinned(MAX_FRONTENDS, 0);
#[map]
pub static SERVICES: Array<Service> = Array::pinned(MAX_SERVICES, 0);
/// Every service's Maglev table (backend ids), in regions the agent allocates; two entries per
/// element ([`MAGLEV_ENTRIES_PER_ELEMENT`]).
#[map]
pub static MAGLEV: Array<u64> = Array::pinned(
    MAX_MAGLEV_ENTRIES / MAGLEV_ENTRIES_PER_ELEMENT,
    BPF_F_MMAPABLE,
);
#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);
/// Flows by the client's 5-tuple ([`lookup_flow`], [`insert_flow`] pick the family's map).
/// One LRU list for all CPUs (as Cilium's conntrack): per-CPU lists (`BPF_F_NO_COMMON_LRU`) would
/// split the capacity among CPUs, which NICs rarely feed evenly, and measured ~20% slower per new
/// flow (they rotate on every insert; the common list refills a CPU's free nodes in batches).
#[map]
pub static FLOWS4: LruHashMap<FlowKey4, Flow> = LruHashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static FLOWS6: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(MAX_FLOWS, 0);
/// Replies' translations by the reply's 5-tuple ([`lookup_reply`], [`insert_reply`]).
#[map]
pub static REPLIES4: LruHashMap<FlowKey4, Reply> = LruHashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static REPLIES6: LruHashMap<FlowKey, Reply> = LruHashMap::pinned(MAX_FLOWS, 0);
/// (ifindex, family) -> the node address used as SNAT source on that interface.
#[map]
pub static NODE_ADDRS: HashMap<NodeAddrKey, Addr> = HashMap::pinned(256, 0);
/// Next hops the FIB had no neighbour entry for (address -> ifindex): the agent asks the kernel to
/// resolve them, since XDP cannot.
#[map]
pub static NEIGH_MISSES: HashMap<Addr, u32> = HashMap::pinned(1024, 0);
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(MAX_FLOWS, 0);
/// `loadBalancerSourceRanges`, per service.
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);
#[map]
pub static FRONTEND_STATS: PerCpuArray<Traffic> = PerCpuArray::pinned(MAX_FRONTENDS, 0);
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);
/// Pods' interfaces (ifindex -> ifindex) that local flows may be sent to past the node's stack:
/// filled by the agent from `--redirect-to-pods` / `--xdp-redirect-to-pods` name prefixes, else empty.
#[map]
pub static POD_IFACES: DevMapHash = DevMapHash::pinned(MAX_POD_IFACES, 0);
/// Interfaces the agent attached XDP to (ifindex -> `XDP_MODE_*`). Generic ones are marked before
/// their program runs: a packet sent on from there keeps its skb, and with it a checksum its sender
/// left to the device. Native ones once it runs: only then may frames be redirected there.
#[map]
pub static XDP_IFACES: HashMap<u32, u8> = HashMap::pinned(MAX_XDP_IFACES, 0);

/// The mode the agent attached XDP to interface `ifindex` in (`XDP_MODE_*`), 0 if it did not.
#[inline(always)]
pub fn xdp_mode(ifindex: u32) -> u8 {
    unsafe { XDP_IFACES.get(&ifindex) }.copied().unwrap_or(0)
}
/// One bit for each port some external frontend is on ([`port_bit`]): XDP looks up the frontends
/// only for packets to these ports, and tc egress the node's own connections only from them.
#[map]
pub static FRONTEND_PORTS: Array<u64> = Array::pinned(FRONTEND_PORT_WORDS, 0);

/// Fragmented datagrams' ports, from their first fragments, for the later fragments (which carry
/// none), as Cilium tracks them. Not pinned: a datagram's fragments arrive within milliseconds,
/// so a restart loses at most the datagrams in flight.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::with_max_entries(MAX_FRAGMENTED_DATAGRAMS, 0);

/// The node's own sockets that the cgroup hooks sent to a backend: the frontend each asked for.
#[map]
pub static SOCKET_PEERS: LruHashMap<SocketPeerKey, SocketPeer> =
    LruHashMap::pinned(MAX_SOCKET_PEERS, 0);

/// The network namespaces (by cookie) whose sockets the cgroup hooks translate besides the
/// node's, when not all are (`ALL_NETNS`). Not pinned: each start fills its own.
#[map]
pub static SOCKET_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_SOCKET_NETNS, 0);

/// The frontend of a scope (`SCOPE_*`) on `addr:port`, if any (either family).
#[inline(always)]
pub fn lookup_frontend(addr: &Addr, port: u16, proto: u8, scope: u8) -> Option<&'static Frontend> {
    if addr.is_v4() {
        let key = key_words::frontend4(addr.v4_raw(), port, proto, scope);
        unsafe { FRONTENDS4.get(as_key(&key)) }
    } else {
        let key = key_words::frontend6(addr, port, proto, scope);
        unsafe { FRONTENDS6.get(as_key(&key)) }
    }
}

/// Set at load time: how local flows reach pods (`REDIRECT_*`). Off, a local flow costs no FIB lookup.
#[no_mangle]
static REDIRECT_TO_PODS: u8 = REDIRECT_OFF;

#[inline(always)]
fn redirect_mode() -> u8 {
    unsafe { core::ptr::read_volatile(&REDIRECT_TO_PODS) }
}

/// Set at load time (`--snat-port-range`): the source ports flows to remote backends are SNATed to.
#[no_mangle]
static SNAT_PORT_FIRST: u16 = SNAT_PORT_MIN;
#[no_mangle]
static SNAT_PORT_LAST: u16 = SNAT_PORT_MAX;

/// Read through volatile loads, or LLVM folds in the defaults.
#[inline(always)]
pub fn snat_ports() -> (u16, u16) {
    unsafe {
        (
            core::ptr::read_volatile(&SNAT_PORT_FIRST),
            core::ptr::read_volatile(&SNAT_PORT_LAST),
        )
    }
}

/// Set at load time (`--flow-timeout-*`): how long flows live after their last packet.
#[no_mangle]
static FLOW_LIFETIMES: FlowLifetimes = FlowLifetimes::DEFAULT;

/// The lifetimes set at load time, each read through a volatile load (or LLVM folds in the
/// defaults).
pub struct LoadedLifetimes;

impl Lifetimes for LoadedLifetimes {
    #[inline(always)]
    fn lifetime_ns(&self, phase: FlowPhase) -> u64 {
        let ns = &FLOW_LIFETIMES.ns;
        match ns.get(phase as usize) {
            Some(at) => unsafe { core::ptr::read_volatile(at) },
            None => CT_LIFETIME_NONTCP_NS,
        }
    }
}

/// Whether some frontend is on a port (host order).
#[inline(always)]
pub fn is_frontend_port(port: u16) -> bool {
    let (word, bit) = port_bit(port);
    FRONTEND_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// Whether a destination port (host order) is one replies of SNATed flows arrive on.
#[inline(always)]
pub fn is_snat_port(port: u16) -> bool {
    let (first, last) = snat_ports();
    first <= port && port <= last
}

/// Whether `addr` is the node's address on interface `ifindex`: the one flows leaving there are
/// SNATed to.
#[inline(always)]
pub fn is_node_addr(ifindex: u32, addr: &Addr) -> bool {
    let key = NodeAddrKey {
        ifindex,
        family: addr.family(),
    };
    unsafe { NODE_ADDRS.get(&key) }.is_some_and(|a| a == addr)
}

/// New local flows ask the FIB for the pod's interface.
#[inline(always)]
pub fn redirect_to_pods() -> bool {
    redirect_mode() != REDIRECT_OFF
}

/// Local flows to pods are handed to tc ingress, which moves them into the pod's namespace.
#[inline(always)]
pub fn redirect_at_tc() -> bool {
    redirect_mode() == REDIRECT_AT_TC
}

/// Set at load time: 0 makes XDP act as on a driver that keeps no XDP metadata (tests of the
/// path such drivers take).
#[no_mangle]
static XDP_METADATA: u8 = 1;

/// Whether XDP may leave metadata for tc (else as if the driver kept none).
#[inline(always)]
pub fn xdp_metadata() -> bool {
    unsafe { core::ptr::read_volatile(&XDP_METADATA) != 0 }
}

/// Entry 0 non-zero once XDP passed a remote flow's packet to the stack for tc ingress to send
/// without metadata (the driver keeps none): tc ingress then knows such packets by their tuple.
/// Other nodes' tc ingress pays nothing for it. Not pinned: XDP sets it before the packet it
/// passes, also after a restart.
#[map]
pub static HANDOFF_BY_TUPLE: Array<u32> = Array::with_max_entries(1, 0);

/// Notes that a packet is passed to tc ingress without metadata.
#[inline(always)]
pub fn hand_off_by_tuple() {
    if let Some(flag) = HANDOFF_BY_TUPLE.get_ptr_mut(0) {
        // Read first: one write per node, not a shared cache line written per packet.
        unsafe {
            if *flag == 0 {
                *flag = 1;
            }
        }
    }
}

/// Whether tc ingress must look for packets XDP passed without metadata.
#[inline(always)]
pub fn handoffs_by_tuple() -> bool {
    HANDOFF_BY_TUPLE.get(0).is_some_and(|flag| *flag != 0)
}

/// Working space for setting up a new flow: the entries being built and the FIB query. BPF gives a
/// program 512 bytes of stack for its whole call chain, and IPv6-sized entries don't fit there
/// beside the per-packet path (Cilium keeps such buffers in per-CPU maps too). One packet runs at a
/// time per CPU, so one entry per CPU is enough.
#[repr(C)]
pub struct Scratch {
    pub key: FlowKey,
    pub reply_key: FlowKey,
    pub flow: Flow,
    pub reply: Reply,
    pub fib: bpf_fib_lookup,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = STATS.get_ptr_mut(counter as u32) {
        unsafe { *c += 1 };
    }
}

/// Keeps a lookup in one family's map a call of its own. LLVM would merge the two branches'
/// calls into one call taking either map, and the verifier inlines a lookup only at a call that
/// sees a single map: elsewhere it becomes an indirect call (measured: ~10 ns per packet more).
#[inline(always)]
pub fn own_call_site() {
    core::hint::black_box(());
}

/// A key struct over its words ([`key_words`]); the sizes must match.
#[inline(always)]
pub fn as_key<K, W>(words: &W) -> &K {
    const { assert!(core::mem::size_of::<W>() == core::mem::size_of::<K>()) };
    // SAFETY: plain-old-data of the same size; the words' alignment (4 or 8) is at least the key's.
    unsafe { &*(words as *const W as *const K) }
}

/// Calls `v4` or `v6` with the 5-tuple's key for its family's map, built as whole words, each
/// branch its own call site.
#[inline(always)]
fn with_key<R>(k: &FlowKey, v4: impl FnOnce(&FlowKey4) -> R, v6: impl FnOnce(&FlowKey) -> R) -> R {
    if k.is_v4() {
        let (saddr, daddr) = (k.saddr.v4_raw(), k.daddr.v4_raw());
        let w = key_words::flow4(saddr, daddr, k.sport, k.dport, k.proto);
        let result = v4(as_key(&w));
        own_call_site();
        result
    } else {
        let w = key_words::flow6(&k.saddr, &k.daddr, k.sport, k.dport, k.proto);
        v6(as_key(&w))
    }
}

/// The entry for a 5-tuple in a per-family pair of flow maps.
#[inline(always)]
fn flow_entry<V>(
    v4: &LruHashMap<FlowKey4, V>,
    v6: &LruHashMap<FlowKey, V>,
    k: &FlowKey,
) -> Option<*mut V> {
    with_key(k, |k| v4.get_ptr_mut(k), |k| v6.get_ptr_mut(k))
}

/// Removes the entry if it is there (an LRU may have evicted it).
#[inline(always)]
fn remove_entry<V>(v4: &LruHashMap<FlowKey4, V>, v6: &LruHashMap<FlowKey, V>, k: &FlowKey) {
    with_key(
        k,
        |k| {
            let _ = v4.remove(k);
        },
        |k| {
            let _ = v6.remove(k);
        },
    )
}

#[inline(always)]
fn insert_entry<V>(
    v4: &LruHashMap<FlowKey4, V>,
    v6: &LruHashMap<FlowKey, V>,
    k: &FlowKey,
    value: &V,
    flags: u64,
) -> Result<(), ()> {
    with_key(
        k,
        |k| v4.insert(k, value, flags),
        |k| v6.insert(k, value, flags),
    )
    .map_err(|_| ())
}

#[inline(always)]
pub fn lookup_flow(key: &FlowKey) -> Option<*mut Flow> {
    flow_entry(&FLOWS4, &FLOWS6, key)
}

#[inline(always)]
pub fn insert_flow(key: &FlowKey, flow: &Flow, flags: u64) -> Result<(), ()> {
    insert_entry(&FLOWS4, &FLOWS6, key, flow, flags)
}

#[inline(always)]
pub fn remove_flow(key: &FlowKey) {
    remove_entry(&FLOWS4, &FLOWS6, key)
}

#[inline(always)]
pub fn remove_reply(key: &FlowKey) {
    remove_entry(&REPLIES4, &REPLIES6, key)
}

#[inline(always)]
pub fn lookup_reply(key: &FlowKey) -> Option<*mut Reply> {
    flow_entry(&REPLIES4, &REPLIES6, key)
}

#[inline(always)]
pub fn insert_reply(key: &FlowKey, reply: &Reply, flags: u64) -> Result<(), ()> {
    insert_entry(&REPLIES4, &REPLIES6, key, reply, flags)
}
