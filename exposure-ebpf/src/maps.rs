//! The maps, named by what they hold. All pinned by name under the agent's pin directory, so a
//! restarted agent finds the same state and established flows keep their backends.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use exposure_common::*;

#[map]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(MAX_FRONTENDS, 0);
#[map]
pub static SERVICES: Array<Service> = Array::pinned(MAX_SERVICES, 0);
/// Every service's Maglev table (backend ids), in regions the agent allocates.
#[map]
pub static MAGLEV: Array<u32> = Array::pinned(MAX_MAGLEV_ENTRIES, BPF_F_MMAPABLE);
#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(MAX_FLOWS, BPF_F_NO_COMMON_LRU);
#[map]
pub static REPLIES: LruHashMap<FlowKey, Reply> = LruHashMap::pinned(MAX_FLOWS, BPF_F_NO_COMMON_LRU);
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
/// Pods' interfaces (ifindex -> ifindex) that local flows may be redirected to from XDP: filled by
/// the agent from `--xdp-redirect-to-pods` name prefixes, else empty.
#[map]
pub static POD_IFACES: DevMapHash = DevMapHash::pinned(MAX_POD_IFACES, 0);

/// Set at load time (`--xdp-redirect-to-pods`): new local flows ask the FIB for the pod's
/// interface. Off, a local flow costs no FIB lookup.
#[no_mangle]
static REDIRECT_TO_PODS: u8 = 0;

#[inline(always)]
pub fn redirect_to_pods() -> bool {
    unsafe { core::ptr::read_volatile(&REDIRECT_TO_PODS) != 0 }
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
