//! Map keys and values. Field order is large to small with explicit padding, so there is no implicit
//! padding for the kernel to see as uninitialised memory.

use crate::addr::Addr;

/// IP protocol numbers we translate.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Default capacities (overridable at load time).
pub const MAX_FRONTENDS: u32 = 65_536;
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
/// Entries (backend ids) of the shared Maglev array holding every service's table.
pub const MAX_MAGLEV_ENTRIES: u32 = 4 * 1024 * 1024;
/// Maglev entries per element of the `MAGLEV` array: the kernel stores an array's values in 8-byte
/// slots, so one u64 holds two 4-byte backend ids (4 bytes per entry, not 8). Entry `e` is
/// element `e / 2`, in its low half when `e` is even: the little-endian layout the agent's mapping
/// of the array sees as consecutive u32 words, so entry `e` is word `e` there.
pub const MAGLEV_ENTRIES_PER_ELEMENT: u32 = 2;

/// The backend id of Maglev entry `entry`, out of its element (see [`MAGLEV_ENTRIES_PER_ELEMENT`]).
#[inline(always)]
pub fn maglev_entry(element: u64, entry: u32) -> u32 {
    (element >> ((entry & 1) * 32)) as u32
}
/// `BPF_F_MMAPABLE`: the agent writes Maglev tables as memory, not one syscall per entry.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
pub const MAX_FLOWS: u32 = 262_144;
/// Largest number of backends a single service can select from (slot index is a u16).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_535;

/// The default SNAT source ports for flows to remote backends (`--snat-port-range`): above the
/// kernel's default ephemeral range (32768-60999), and reserved from it by the agent, so the node's
/// own sockets never pick them.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Words of `FRONTEND_PORTS`: one bit for each of the 65,536 ports.
pub const FRONTEND_PORT_WORDS: u32 = 1024;

/// Where a port's bit is in `FRONTEND_PORTS`: (word index, the bit in that word).
#[inline(always)]
pub fn port_bit(port: u16) -> (u32, u64) {
    (u32::from(port >> 6), 1 << (port & 63))
}
/// How many candidate ports a new remote flow tries before giving up (bounded loop in BPF). With
/// independent picks a flow finds none with probability (share taken)^tries: at 90% taken about
/// 1 in 850 (netfilter's NAT gives up after a few hundred tries, in runs of 128 down to 16).
pub const SNAT_PORT_TRIES: u32 = 64;

/// Connection-tracking lifetimes (Cilium's defaults for TCP).
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * 1_000_000_000;
/// A UDP flow of entries made before the exchange bits existed (Cilium's non-TCP lifetime).
pub const CT_LIFETIME_NONTCP_NS: u64 = 60 * 1_000_000_000;
/// A UDP flow that is a single exchange so far, a query and its answers (netfilter's
/// `nf_conntrack_udp_timeout`, what kube-proxy's users have): DNS-style flows free their entries
/// and SNAT ports after 30 s.
pub const CT_LIFETIME_UDP_NS: u64 = 30 * 1_000_000_000;
/// A UDP flow whose client went on after an answer, a stream (netfilter's
/// `nf_conntrack_udp_timeout_stream`).
pub const CT_LIFETIME_UDP_STREAM_NS: u64 = 120 * 1_000_000_000;
pub const CT_LIFETIME_CLOSING_NS: u64 = 10 * 1_000_000_000;
/// A TCP flow whose handshake has not completed (Cilium's `CT_SYN_TIMEOUT`; netfilter keeps
/// SYN_RECV 60 s): SYNs that are never answered, or answered but never acknowledged (a SYN flood),
/// must not hold flow entries and SNAT ports for the established lifetime.
pub const CT_LIFETIME_SYN_NS: u64 = 60 * 1_000_000_000;
/// `last_seen` is refreshed at most this often, so established flows rarely write to the map.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Map names, as pinned under the agent's pin directory. Frontends and flows have a map per
/// family: the kernel hashes the whole key on every lookup, and IPv4 keys in IPv6-sized form cost
/// twice the hashing.
pub mod names {
    pub const FRONTENDS4: &str = "FRONTENDS4";
    pub const FRONTENDS6: &str = "FRONTENDS6";
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS4: &str = "FLOWS4";
    pub const FLOWS6: &str = "FLOWS6";
    pub const REPLIES4: &str = "REPLIES4";
    pub const REPLIES6: &str = "REPLIES6";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const STATS: &str = "STATS";
    pub const NEIGH_MISSES: &str = "NEIGH_MISSES";
    pub const FRONTEND_STATS: &str = "FRONTEND_STATS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const POD_IFACES: &str = "POD_IFACES";
    pub const XDP_IFACES: &str = "XDP_IFACES";
    pub const FRONTEND_PORTS: &str = "FRONTEND_PORTS";
    pub const SOCKET_PEERS: &str = "SOCKET_PEERS";
    /// Not pinned: filled at each start from `--socket-namespaces`.
    pub const SOCKET_NETNS: &str = "SOCKET_NETNS";
    pub const ALL: [&str; 19] = [
        FRONTENDS4,
        FRONTENDS6,
        SERVICES,
        MAGLEV,
        BACKENDS,
        FLOWS4,
        FLOWS6,
        REPLIES4,
        REPLIES6,
        NODE_ADDRS,
        STATS,
        NEIGH_MISSES,
        FRONTEND_STATS,
        AFFINITY,
        SOURCE_RANGES,
        POD_IFACES,
        XDP_IFACES,
        FRONTEND_PORTS,
        SOCKET_PEERS,
    ];
    /// Maps of earlier builds, unpinned when found: one map for both families; the generic-XDP
    /// interfaces alone (now in `XDP_IFACES` with the native ones).
    pub const RETIRED: [&str; 4] = ["FRONTENDS", "FLOWS", "REPLIES", "GENERIC_XDP_IFACES"];
}

/// A translated address: node IP:nodePort, LoadBalancer IP:port or external IP:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// Who the frontend serves: [`SCOPE_EXTERNAL`] or [`SCOPE_NODE_SOCKETS`].
    pub scope: u8,
}

/// `FrontendKey::scope`: packets that arrive on `--iface` (and the node's own sockets, unless a
/// [`SCOPE_NODE_SOCKETS`] twin exists).
pub const SCOPE_EXTERNAL: u8 = 0;
/// `FrontendKey::scope`: the node's own sockets only, where they must reach other backends than
/// outside clients: every ready endpoint of an `externalTrafficPolicy: Local` Service, as
/// kube-proxy (its rules for traffic from the node) and Cilium (its internal scope) give them.
pub const SCOPE_NODE_SOCKETS: u8 = 1;

impl FrontendKey {
    /// The key as `FRONTENDS4` holds it (meaningful for an IPv4 frontend only).
    #[inline(always)]
    pub fn v4(&self) -> FrontendKey4 {
        FrontendKey4 {
            addr: self.addr.v4_raw(),
            port: self.port,
            proto: self.proto,
            scope: self.scope,
        }
    }
}

/// An IPv4 [`FrontendKey`] in `FRONTENDS4`: 8 bytes to hash instead of 20.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendKey4 {
    /// Wire order, as [`Addr::v4_raw`].
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl From<FrontendKey4> for FrontendKey {
    fn from(k: FrontendKey4) -> Self {
        FrontendKey {
            addr: Addr::v4(k.addr),
            port: k.port,
            proto: k.proto,
            scope: k.scope,
        }
    }
}

pub const FRONTEND_NODEPORT: u16 = 1;
pub const FRONTEND_LOADBALANCER: u16 = 2;
pub const FRONTEND_EXTERNAL_IP: u16 = 4;
/// A ClusterIP (only the socket hooks look it up): with no endpoints, the connection is refused
/// at `connect()`, as no node holds the address to refuse it.
pub const FRONTEND_CLUSTER_IP: u16 = 8;
/// A TCP frontend no Service has any more, kept while connections made through it go on (as
/// kube-proxy's conntrack entries keep translating a removed Service's connections): their packets
/// are translated, any other packet is passed to the kernel as if there were no frontend. The
/// agent removes it once no live flow uses it. Its `service_id` is [`NO_SERVICE`].
pub const FRONTEND_DRAINING: u16 = 16;
/// `Frontend::service_id` of a draining frontend: it selects no backend.
pub const NO_SERVICE: u32 = u32::MAX;
/// `FrontendKey::port` of a ClusterIP's frontend for the ports its Service does not have (the
/// socket hooks look it up when a socket's address is no frontend, and refuse the call).
pub const OTHER_PORTS: u16 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index into `SERVICES`: one per Service port.
    pub service_id: u32,
    /// Index into `FRONTEND_STATS`.
    pub id: u32,
    /// `FRONTEND_*` kind.
    pub flags: u16,
    pub _pad: u16,
}

impl Frontend {
    /// Whether it only serves the connections made through it (see [`FRONTEND_DRAINING`]).
    #[inline(always)]
    pub fn is_draining(&self) -> bool {
        self.flags & FRONTEND_DRAINING != 0
    }
}

/// Per-frontend traffic (per CPU), for metrics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// One Service port's current backend set: its Maglev table is `MAGLEV[table_offset ..
/// table_offset + table_size]`. The agent writes a new table into free space, then points the
/// service at it in one map update, so no packet sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub table_offset: u32,
    pub table_size: u32,
    pub backend_count: u32,
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout; 0: no affinity.
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// `Service::flags`: new flows to its LoadBalancer frontends need a source in `SOURCE_RANGES`.
pub const SERVICE_SOURCE_RANGES: u32 = 2;
/// `Service::flags`: the entry is in use (so a Service without backends is not an all-zero entry,
/// which the agent reads back as free after a restart).
pub const SERVICE_IN_USE: u32 = 1 << 31;
pub const MAX_SOURCE_RANGES: u32 = 65_536;
/// Pod interfaces XDP may redirect to (`POD_IFACES`).
pub const MAX_POD_IFACES: u32 = 4_096;
/// Interfaces the agent attached XDP to, by the mode it runs in (`XDP_IFACES`: ifindex -> one of
/// the two below).
pub const MAX_XDP_IFACES: u32 = 256;
/// In the driver: the interface also takes frames other interfaces' XDP programs redirect to it.
pub const XDP_MODE_NATIVE: u8 = 1;
/// On the kernel's skb, which goes on whatever the verdict (with its checksum requests).
pub const XDP_MODE_GENERIC: u8 = 2;

/// `loadBalancerSourceRanges` entry data, after the LPM prefix length: the service id (always wholly
/// inside the prefix) then the source address in wire order, so a prefix is a network prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub service_id: u32,
    pub addr: Addr,
}

/// LPM prefix length of a `loadBalancerSourceRanges` network: the service id, then the network in
/// [`Addr`] form (an IPv4 network also matches the IPv4-mapped prefix, so only IPv4 sources).
pub fn source_range_prefix(addr: &Addr, len: u8) -> u32 {
    let family_bits = if addr.is_v4() { 96 } else { 0 };
    32 + family_bits + len as u32
}

/// The network's own prefix length back from an LPM prefix length ([`source_range_prefix`]).
pub fn source_range_len(addr: &Addr, prefix: u32) -> u8 {
    let family_bits = if addr.is_v4() { 96 } else { 0 };
    prefix.saturating_sub(32 + family_bits) as u8
}

/// Session affinity: which backend a client of a service last got.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// Refreshed on each new flow, as kube-proxy's `recent` match does.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// `Service::flags`: with no backends, drop new flows instead of refusing them (kube-proxy's
/// behaviour for `externalTrafficPolicy: Local` when only other nodes have endpoints).
pub const SERVICE_DROP_WHEN_EMPTY: u32 = 1;

pub const BACKEND_LOCAL: u16 = 1;

/// `NODE_ADDRS` key: the node's address of a family on an interface (the SNAT source there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeAddrKey {
    pub ifindex: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

/// An endpoint address, indexed by backend id (0 is never used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub flags: u16,
}

/// Map keys as the programs hand them to the kernel: built in registers and stored as whole
/// words. The kernel hashes a key in 4-byte loads right after the program stores it, and a load
/// spanning several narrower stores (a u16 port beside a u16 port) is not forwarded from the store
/// buffer but waits for the stores to reach the cache: measured ~6 ns per lookup. Byte for byte
/// the key structs (little-endian, as BPF and the hosts Exposure runs on).
pub mod key_words {
    use super::Addr;

    /// A [`super::FrontendKey4`].
    #[inline(always)]
    pub fn frontend4(addr: u32, port: u16, proto: u8, scope: u8) -> [u64; 1] {
        [addr as u64 | (port as u64) << 32 | (proto as u64) << 48 | (scope as u64) << 56]
    }

    /// A [`super::FrontendKey`] (20 bytes: 4-byte words).
    #[inline(always)]
    pub fn frontend6(addr: &Addr, port: u16, proto: u8, scope: u8) -> [u32; 5] {
        let a = addr.0;
        [
            a[0],
            a[1],
            a[2],
            a[3],
            port as u32 | (proto as u32) << 16 | (scope as u32) << 24,
        ]
    }

    /// A [`super::FlowKey4`].
    #[inline(always)]
    pub fn flow4(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> [u64; 2] {
        [
            saddr as u64 | (daddr as u64) << 32,
            sport as u64 | (dport as u64) << 16 | (proto as u64) << 32,
        ]
    }

    /// A [`super::FlowKey`].
    #[inline(always)]
    pub fn flow6(saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, proto: u8) -> [u64; 5] {
        let (s, d) = (saddr.0, daddr.0);
        let pair = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        [
            pair(s[0], s[1]),
            pair(s[2], s[3]),
            pair(d[0], d[1]),
            pair(d[2], d[3]),
            sport as u64 | (dport as u64) << 16 | (proto as u64) << 32,
        ]
    }
}

/// A packet's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.saddr.is_v4()
    }

    /// The key as `FLOWS4`/`REPLIES4` hold it (meaningful for an IPv4 flow only).
    #[inline(always)]
    pub fn v4(&self) -> FlowKey4 {
        FlowKey4 {
            saddr: self.saddr.v4_raw(),
            daddr: self.daddr.v4_raw(),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// An IPv4 [`FlowKey`] in `FLOWS4`/`REPLIES4`: 16 bytes to hash instead of 40.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    /// Wire order, as [`Addr::v4_raw`].
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl From<FlowKey4> for FlowKey {
    fn from(k: FlowKey4) -> Self {
        FlowKey {
            saddr: Addr::v4(k.saddr),
            daddr: Addr::v4(k.daddr),
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad: [0; 3],
        }
    }
}

/// The state bits of a flow's entries (both directions carry them).
pub const FLOW_CLOSING: u32 = 1;
pub const FLOW_REMOTE: u32 = 2;
/// Both directions have sent FIN (tracked separately, as Cilium does: a half-closed TCP stream may
/// still carry data the other way).
pub const FLOW_FIN_CLIENT: u32 = 4;
pub const FLOW_FIN_BACKEND: u32 = 8;
/// A local flow sent straight to the pod's interface (`ifindex`, MACs from the FIB), not through
/// the node's stack (`--redirect-to-pods`, `--xdp-redirect-to-pods`); its replies go back past the
/// stack too (from the pod's interface to the reply entry's `ifindex`).
pub const FLOW_TO_POD: u32 = 16;
/// A flow whose first packet made its entries (every flow since these bits exist): a TCP flow lives
/// `CT_LIFETIME_SYN_NS` until `FLOW_ESTABLISHED`, a UDP flow `CT_LIFETIME_UDP_NS` until then.
/// Entries from builds without the bits have none of them and keep the lifetimes they had, so an
/// agent upgrade shortens no open connection.
pub const FLOW_OPENING: u32 = 32;
/// The backend has answered.
pub const FLOW_REPLIED: u32 = 64;
/// The client went on after the backend answered (for TCP without SYN): the handshake is done, or
/// a UDP flow is a stream rather than one query.
pub const FLOW_ESTABLISHED: u32 = 128;
/// An entry the node's own connection holds (or one the kernel NATed to the node's address, as
/// kube-proxy's masquerade does), on the tuple its replies arrive with, where they would be taken
/// for a flow's: it leaves from a SNAT port (a reply entry: SNAT picks no port it holds), or from a
/// frontend's port on the node's address (a flow entry: its replies are not a new flow). Its
/// packets are the kernel's at XDP while it lives.
pub const FLOW_HOST: u32 = 256;

/// How local flows reach pods (`REDIRECT_TO_PODS`, set at load time): through the node's stack;
/// from tc ingress into the pod's namespace (`bpf_redirect_peer`, `--redirect-to-pods`); or from
/// XDP to the pod's veth (`--xdp-redirect-to-pods`).
pub const REDIRECT_OFF: u8 = 0;
pub const REDIRECT_AT_TC: u8 = 1;
pub const REDIRECT_AT_XDP: u8 = 2;

/// What XDP leaves in a translated packet's metadata for tc ingress, where the skb exists: where
/// the packet goes. XDP can neither move a packet into another namespace nor send it through a
/// device without XDP, so the work is split between them as Cilium splits it between its XDP and
/// tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcHandoff {
    /// [`HANDOFF_TO_POD`], [`HANDOFF_OUT`] or [`HANDOFF_AS_IS`]; metadata some other program
    /// left is none of them.
    pub magic: u32,
    pub ifindex: u32,
}

/// `--redirect-to-pods`: addressed to the pod's MAC, into the pod behind `ifindex` (a host-side
/// veth).
pub const HANDOFF_TO_POD: u32 = 0x6578_706f;
/// A packet XDP cannot send out of interface `ifindex` (a tunnel, an interface without native
/// XDP, a GSO packet in generic XDP), translated for a remote backend: out of there, the kernel
/// routing it and filling in the link layer, if any (`bpf_redirect_neigh`).
pub const HANDOFF_OUT: u32 = 0x6578_6f75;
/// The same for a reply to a client, whose MACs XDP has set: out of `ifindex` as it is.
pub const HANDOFF_AS_IS: u32 = 0x6578_6173;

/// Forward direction (client -> frontend), keyed by the client's [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub last_seen_ns: u64,
    pub backend_addr: Addr,
    /// Node address the flow is SNATed to (remote backends), else unspecified.
    pub snat_addr: Addr,
    pub backend_port: u16,
    pub snat_port: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub flags: u32,
    /// Egress for remote backends, from the FIB lookup at flow start.
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

/// Reply direction (backend -> client or node), keyed by the reply's [`FlowKey`]: restores the
/// frontend as source and the client as destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub last_seen_ns: u64,
    pub frontend_addr: Addr,
    pub client_addr: Addr,
    pub frontend_port: u16,
    pub client_port: u16,
    pub flags: u32,
    /// Where the client's packets came in, and the MACs to send replies with (remote backends,
    /// and local ones with `FLOW_TO_POD`).
    pub ifindex: u32,
    pub client_mac: [u8; 6],
    pub node_mac: [u8; 6],
}

/// A fragmented datagram in `FRAGMENTS`, told apart as the kernel's reassembly does: addresses,
/// IP ID (IPv4's 16 bits widened) and protocol. Only its first fragment carries the ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A fragmented datagram's ports (wire order), as its first fragment had them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Fragmented datagrams whose ports are remembered at once: an LRU, as a datagram's fragments
/// arrive within milliseconds of each other (Cilium's default is the same).
pub const MAX_FRAGMENTED_DATAGRAMS: u32 = 8192;

/// `SOCKET_PEERS` key: a socket of the node's own (by its cookie) that the cgroup hooks sent to a
/// backend instead of a frontend, and that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketPeerKey {
    pub cookie: u64,
    pub backend: Addr,
    /// Wire order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// The frontend such a socket asked for: what it is shown as its peer (recvmsg, getpeername), so
/// the application sees the address it connected or sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketPeer {
    pub frontend: Addr,
    /// Wire order.
    pub port: u16,
    pub _pad: u16,
}

/// Sockets' frontend/backend pairs remembered for [`SocketPeer`] (least recently used go first).
pub const MAX_SOCKET_PEERS: u32 = 65_536;
/// Network namespaces `--socket-namespaces` may list (`SOCKET_NETNS`).
pub const MAX_SOCKET_NETNS: u32 = 256;

/// Per-CPU counters in `STATS`, by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    FrontendPackets = 0,
    NewFlows,
    ToLocal,
    ToRemote,
    RepliesXdp,
    RepliesTc,
    NoBackend,
    DroppedNoLocalBackend,
    SourceRangeDenied,
    IcmpErrorsTranslated,
    FibFailed,
    NeighborMissing,
    SnatExhausted,
    /// Later fragments whose first fragment was not seen: passed to the kernel untranslated.
    Fragments,
    Malformed,
    RedirectedToPod,
    HostCollision,
    /// Packets too big for the interface they were to leave by (answered with ICMP).
    TooBig,
    /// Connections (TCP, connected UDP) and datagrams the node's own sockets addressed to a
    /// frontend, sent to a backend by the cgroup hooks.
    NodeSockets,
    /// Connections and datagrams of those sockets refused at a ClusterIP: it has no endpoints, or
    /// not the port.
    NodeSocketsRefused,
    /// New flows to a local backend whose tuple there an open flow of the same client (to another
    /// frontend, from the same port) holds: dropped, as conntrack drops a connection whose reply
    /// tuple clashes, rather than taking the open one's answers.
    TupleCollision,
    /// Replies of flows sent straight to their pod, sent back the same way (from the pod's
    /// interface to the one the client's packets came in on, past the node's stack).
    RepliesFromPod,
    /// Translated packets XDP handed to tc ingress to send out of another interface (to remote
    /// backends, and their replies to clients): [`HANDOFF_OUT`], [`HANDOFF_AS_IS`].
    SentFromTc,
    /// Of those, packets XDP passed without metadata (the driver keeps none), which tc ingress
    /// knew by their tuple.
    SentFromTcByTuple,
}

impl Counter {
    pub const COUNT: u32 = 24;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::FrontendPackets,
        Counter::NewFlows,
        Counter::ToLocal,
        Counter::ToRemote,
        Counter::RepliesXdp,
        Counter::RepliesTc,
        Counter::NoBackend,
        Counter::DroppedNoLocalBackend,
        Counter::SourceRangeDenied,
        Counter::IcmpErrorsTranslated,
        Counter::FibFailed,
        Counter::NeighborMissing,
        Counter::SnatExhausted,
        Counter::Fragments,
        Counter::Malformed,
        Counter::RedirectedToPod,
        Counter::HostCollision,
        Counter::TooBig,
        Counter::NodeSockets,
        Counter::NodeSocketsRefused,
        Counter::TupleCollision,
        Counter::RepliesFromPod,
        Counter::SentFromTc,
        Counter::SentFromTcByTuple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::FrontendPackets => "frontend_packets",
            Counter::NewFlows => "new_flows",
            Counter::ToLocal => "to_local_backend",
            Counter::ToRemote => "to_remote_backend",
            Counter::RepliesXdp => "replies_xdp",
            Counter::RepliesTc => "replies_tc",
            Counter::NoBackend => "refused_no_backend",
            Counter::DroppedNoLocalBackend => "dropped_no_local_backend",
            Counter::SourceRangeDenied => "dropped_source_range",
            Counter::IcmpErrorsTranslated => "icmp_errors_translated",
            Counter::FibFailed => "fib_lookup_failed",
            Counter::NeighborMissing => "neighbor_missing",
            Counter::SnatExhausted => "snat_ports_exhausted",
            Counter::Fragments => "fragments_passed",
            Counter::Malformed => "malformed",
            Counter::RedirectedToPod => "to_local_backend_redirected",
            Counter::HostCollision => "dropped_host_collision",
            Counter::TooBig => "too_big_for_next_hop",
            Counter::NodeSockets => "node_sockets_translated",
            Counter::NodeSocketsRefused => "node_sockets_refused",
            Counter::TupleCollision => "dropped_tuple_collision",
            Counter::RepliesFromPod => "replies_from_pod_redirected",
            Counter::SentFromTc => "sent_from_tc",
            Counter::SentFromTcByTuple => "sent_from_tc_without_metadata",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for FlowLifetimes {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for FrontendKey4 {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Reply {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for SocketPeerKey {}
    unsafe impl aya::Pod for SocketPeer {}
}

/// Host-side conversions to the wire-order integers the maps hold.
pub fn port(p: u16) -> u16 {
    p.to_be()
}

pub fn port_host(raw: u16) -> u16 {
    u16::from_be(raw)
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn maglev_entries_are_the_words_of_their_element_in_memory_order() {
        // What the agent's mapping of the array holds: entry e is u32 word e.
        let words: [u32; 4] = [7, 9, 0, 65_535];
        for (entry, word) in words.iter().enumerate() {
            let element = entry / MAGLEV_ENTRIES_PER_ELEMENT as usize;
            let pair = &words[element * 2..element * 2 + 2];
            let bytes: Vec<u8> = pair.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let element = u64::from_ne_bytes(bytes.try_into().unwrap());
            assert_eq!(maglev_entry(element, entry as u32), *word, "entry {entry}");
        }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<FrontendKey>(), 16 + 4);
        assert_eq!(size_of::<Frontend>(), 12);
        assert_eq!(size_of::<Service>(), 24);
        assert_eq!(size_of::<Backend>(), 16 + 4);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 8);
        assert_eq!(size_of::<FrontendKey4>(), 4 + 4);
        assert_eq!(size_of::<FlowKey4>(), 4 + 4 + 8);
        assert_eq!(
            size_of::<Flow>(),
            8 + 16 + 16 + 2 + 2 + 4 + 4 + 4 + 4 + 6 + 6
        );
        assert_eq!(size_of::<Reply>(), 8 + 16 + 16 + 2 + 2 + 4 + 4 + 6 + 6);
        assert_eq!(size_of::<AffinityKey>(), 4 + 16);
        assert_eq!(size_of::<SourceRange>(), 4 + 16);
        assert_eq!(size_of::<NodeAddrKey>(), 8);
        assert_eq!(size_of::<FragmentKey>(), 16 + 16 + 4 + 4);
        assert_eq!(size_of::<FragmentPorts>(), 4);
        assert_eq!(size_of::<SocketPeerKey>(), 8 + 16 + 8);
        assert_eq!(size_of::<SocketPeer>(), 16 + 4);
    }

    #[test]
    fn every_port_has_its_own_bit() {
        let mut seen = [0u64; FRONTEND_PORT_WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, bit) = port_bit(port);
            assert_eq!(bit.count_ones(), 1, "{port}");
            assert_eq!(seen[word as usize] & bit, 0, "{port} shares a bit");
            seen[word as usize] |= bit;
        }
        assert!(seen.iter().all(|w| *w == u64::MAX));
        assert_eq!(port_bit(30_080), (470, 1 << 0));
        assert_eq!(port_bit(443), (6, 1 << 59));
    }

    #[test]
    fn source_range_prefixes_cover_the_family_and_round_trip() {
        let v4 = Addr::v4(u32::from_ne_bytes([198, 18, 0, 0]));
        let v6 = Addr::from_octets([0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // An IPv4 /24 also fixes the 96 bits of the IPv4-mapped prefix: no IPv6 source matches it.
        assert_eq!(source_range_prefix(&v4, 24), 32 + 96 + 24);
        assert_eq!(source_range_prefix(&v6, 48), 32 + 48);
        assert_eq!(
            source_range_prefix(&v4, 0),
            32 + 96,
            "0.0.0.0/0 is every IPv4 source"
        );
        for (a, len) in [(v4, 24), (v4, 0), (v6, 48), (v6, 128)] {
            assert_eq!(source_range_len(&a, source_range_prefix(&a, len)), len);
        }
    }

    #[test]
    fn ipv4_keys_narrow_and_widen_without_loss() {
        let a = Addr::v4(u32::from_ne_bytes([198, 18, 0, 1]));
        let b = Addr::v4(u32::from_ne_bytes([198, 19, 0, 2]));
        let flow = FlowKey {
            saddr: a,
            daddr: b,
            sport: port(40000),
            dport: port(30080),
            proto: PROTO_UDP,
            _pad: [0; 3],
        };
        assert!(flow.is_v4());
        let narrow = flow.v4();
        assert_eq!(narrow.saddr.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(narrow.daddr.to_ne_bytes(), [198, 19, 0, 2]);
        assert_eq!(FlowKey::from(narrow), flow);
        let v6 = Addr::from_octets([0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(!FlowKey { saddr: v6, ..flow }.is_v4());
        let frontend = FrontendKey {
            addr: b,
            port: port(30080),
            proto: PROTO_TCP,
            scope: SCOPE_NODE_SOCKETS,
        };
        assert_eq!(frontend.v4().addr.to_ne_bytes(), [198, 19, 0, 2]);
        assert_eq!(FrontendKey::from(frontend.v4()), frontend);
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: plain-old-data structs and arrays, without padding (see the layout test).
        unsafe { core::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }.to_vec()
    }

    #[test]
    fn key_words_are_the_key_structs_byte_for_byte() {
        let s6 = Addr::from_octets([0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0xa, 0xb, 0xc, 1]);
        let d6 = Addr::from_octets([0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0xd, 0xe, 0xf, 2]);
        let (s4, d4) = (
            u32::from_ne_bytes([198, 18, 0, 1]),
            u32::from_ne_bytes([198, 19, 0, 2]),
        );
        let (sport, dport) = (port(40000), port(30080));
        let flow6 = FlowKey {
            saddr: s6,
            daddr: d6,
            sport,
            dport,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(
            bytes_of(&key_words::flow6(&s6, &d6, sport, dport, PROTO_TCP)),
            bytes_of(&flow6)
        );
        let flow4 = FlowKey {
            saddr: Addr::v4(s4),
            daddr: Addr::v4(d4),
            ..flow6
        };
        assert_eq!(
            bytes_of(&key_words::flow4(s4, d4, sport, dport, PROTO_TCP)),
            bytes_of(&flow4.v4())
        );
        for scope in [SCOPE_EXTERNAL, SCOPE_NODE_SOCKETS] {
            let frontend = FrontendKey {
                addr: s6,
                port: dport,
                proto: PROTO_UDP,
                scope,
            };
            assert_eq!(
                bytes_of(&key_words::frontend6(&s6, dport, PROTO_UDP, scope)),
                bytes_of(&frontend)
            );
            let frontend4 = FrontendKey {
                addr: Addr::v4(d4),
                ..frontend
            };
            assert_eq!(
                bytes_of(&key_words::frontend4(d4, dport, PROTO_UDP, scope)),
                bytes_of(&frontend4.v4())
            );
        }
    }

    #[test]
    fn wire_order_roundtrip() {
        assert_eq!(port_host(port(60000)), 60000);
        assert_eq!(port(60000).to_ne_bytes(), 60000u16.to_be_bytes());
    }
}

/// TCP header flags.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The state bits a packet of a flow adds to both directions' entries (`flags`: what they hold
/// now), seen from the client (`from_client`) or the backend: close bits for TCP's RST and FIN,
/// and the exchange's progress (answered, then gone on).
#[inline(always)]
pub fn conn_bits(proto: u8, tcp_flags: u8, from_client: bool, flags: u32) -> u32 {
    let tcp = proto == PROTO_TCP;
    let close = if !tcp {
        0
    } else if tcp_flags & TCP_RST != 0 {
        FLOW_CLOSING
    } else if tcp_flags & TCP_FIN != 0 {
        if from_client {
            FLOW_FIN_CLIENT
        } else {
            FLOW_FIN_BACKEND
        }
    } else {
        0
    };
    let exchange = if !from_client {
        FLOW_REPLIED
    } else if (!tcp || tcp_flags & TCP_SYN == 0) && flags & FLOW_REPLIED != 0 {
        FLOW_ESTABLISHED
    } else {
        0
    };
    close | exchange
}

/// Which lifetime a flow has after its last packet, by protocol and state: an index into
/// [`FlowLifetimes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum FlowPhase {
    /// TCP after RST or both FINs.
    Closing = 0,
    /// TCP before its handshake completed.
    TcpOpening = 1,
    /// TCP once established.
    TcpOpen = 2,
    /// Not TCP, from a build before the exchange bits (no `FLOW_OPENING`).
    Unmarked = 3,
    /// UDP, one exchange so far: a query and its answers.
    UdpExchange = 4,
    /// UDP whose client went on after an answer.
    UdpStream = 5,
}

pub const FLOW_PHASES: usize = 6;

#[inline(always)]
pub fn flow_phase(proto: u8, flags: u32) -> FlowPhase {
    if flow_closing(flags) {
        FlowPhase::Closing
    } else if proto == PROTO_TCP {
        if flags & (FLOW_OPENING | FLOW_ESTABLISHED) == FLOW_OPENING {
            FlowPhase::TcpOpening
        } else {
            FlowPhase::TcpOpen
        }
    } else if flags & FLOW_OPENING == 0 {
        FlowPhase::Unmarked
    } else if flags & FLOW_ESTABLISHED != 0 {
        FlowPhase::UdpStream
    } else {
        FlowPhase::UdpExchange
    }
}

/// How long a flow lives after its last packet, in ns, by [`FlowPhase`] (`--flow-timeout-*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLifetimes {
    pub ns: [u64; FLOW_PHASES],
}

impl FlowLifetimes {
    pub const DEFAULT: FlowLifetimes = FlowLifetimes {
        ns: [
            CT_LIFETIME_CLOSING_NS,
            CT_LIFETIME_SYN_NS,
            CT_LIFETIME_TCP_NS,
            CT_LIFETIME_NONTCP_NS,
            CT_LIFETIME_UDP_NS,
            CT_LIFETIME_UDP_STREAM_NS,
        ],
    };
}

/// Where flow lifetimes come from: the programs read those set at load time, host code holds its
/// own [`FlowLifetimes`].
pub trait Lifetimes {
    fn lifetime_ns(&self, phase: FlowPhase) -> u64;
}

impl Lifetimes for FlowLifetimes {
    #[inline(always)]
    fn lifetime_ns(&self, phase: FlowPhase) -> u64 {
        self.ns[phase as usize]
    }
}

/// Whether an entry last seen at `last_seen_ns` still holds at `now_ns`.
#[inline(always)]
pub fn flow_alive(
    proto: u8,
    flags: u32,
    last_seen_ns: u64,
    now_ns: u64,
    lifetimes: &impl Lifetimes,
) -> bool {
    now_ns.wrapping_sub(last_seen_ns) < lifetimes.lifetime_ns(flow_phase(proto, flags))
}

/// A flow is closing once RST was seen or both sides sent FIN: a new SYN then starts a new flow.
#[inline(always)]
pub fn flow_closing(flags: u32) -> bool {
    let both_fin = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
    flags & FLOW_CLOSING != 0 || flags & both_fin == both_fin
}

/// What a packet of the node's own connection, leaving from a SNAT port or a frontend's, does with
/// the entry on its reverse tuple (`held`: that entry's flags and last sighting), where XDP looks
/// for a flow's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostClaim {
    /// Nothing holds the tuple, or only a flow that is over or closing (as the kernel's NAT lets a
    /// new SYN take a closing connection's tuple): a host entry takes it.
    Claim,
    /// The connection's own host entry: its state goes on.
    Refresh,
    /// An open flow holds the tuple (the kernel's NAT picked the port without knowing): the
    /// packet is dropped, as the kernel's NAT drops a connection it cannot make unique, rather
    /// than the packets of both going to one.
    Collision,
}

#[inline(always)]
pub fn host_claim(
    proto: u8,
    tcp_flags: u8,
    held: Option<(u32, u64)>,
    now_ns: u64,
    lifetimes: &impl Lifetimes,
) -> HostClaim {
    let Some((flags, last_seen_ns)) = held else {
        return HostClaim::Claim;
    };
    let alive = flow_alive(proto, flags, last_seen_ns, now_ns, lifetimes);
    let closed = proto == PROTO_TCP && flow_closing(flags);
    let new_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if flags & FLOW_HOST != 0 {
        if alive && !(closed && new_syn) {
            HostClaim::Refresh
        } else {
            HostClaim::Claim
        }
    } else if alive && !closed {
        HostClaim::Collision
    } else {
        HostClaim::Claim
    }
}

#[cfg(test)]
mod host_claim_tests {
    use super::*;

    #[test]
    fn host_connections_take_free_over_and_closed_tuples_and_never_open_flows() {
        const S: u64 = 1_000_000_000;
        let now = 100_000 * S;
        let open = FLOW_REMOTE | FLOW_OPENING | FLOW_REPLIED | FLOW_ESTABLISHED;
        let both_fin = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
        let host = FLOW_HOST | FLOW_OPENING;
        for (proto, tcp_flags, held, claim, why) in [
            (PROTO_TCP, TCP_SYN, None, HostClaim::Claim, "free"),
            (
                PROTO_TCP,
                TCP_SYN,
                Some((open, now - S)),
                HostClaim::Collision,
                "an open SNATed flow",
            ),
            (
                PROTO_UDP,
                0,
                Some((FLOW_REMOTE | FLOW_OPENING, now - S)),
                HostClaim::Collision,
                "an open SNATed UDP flow",
            ),
            (
                PROTO_TCP,
                TCP_SYN,
                Some((open | both_fin, now - S)),
                HostClaim::Claim,
                "a SNATed flow closed both ways",
            ),
            (
                PROTO_TCP,
                TCP_SYN,
                Some((open | FLOW_CLOSING, now - S)),
                HostClaim::Claim,
                "a reset SNATed flow",
            ),
            (
                PROTO_UDP,
                0,
                Some((FLOW_REMOTE | FLOW_OPENING, now - 31 * S)),
                HostClaim::Claim,
                "a SNATed UDP query that is over",
            ),
            (
                PROTO_TCP,
                TCP_ACK,
                Some((host | FLOW_REPLIED, now - S)),
                HostClaim::Refresh,
                "its own entry",
            ),
            (
                PROTO_TCP,
                TCP_SYN,
                Some((host | both_fin, now - S)),
                HostClaim::Claim,
                "a new connection on a closed one's tuple",
            ),
            (
                PROTO_TCP,
                TCP_ACK,
                Some((host, now - 61 * S)),
                HostClaim::Claim,
                "its own entry, over",
            ),
        ] {
            let lifetimes = FlowLifetimes::DEFAULT;
            assert_eq!(
                host_claim(proto, tcp_flags, held, now, &lifetimes),
                claim,
                "{why}"
            );
        }
    }
}

#[cfg(test)]
mod lifetime_tests {
    use super::*;

    /// The default lifetime of a flow in that state.
    fn flow_lifetime_ns(proto: u8, flags: u32) -> u64 {
        FlowLifetimes::DEFAULT.lifetime_ns(flow_phase(proto, flags))
    }

    #[test]
    fn lifetimes_follow_protocol_and_state() {
        let (opening, replied, established) = (FLOW_OPENING, FLOW_REPLIED, FLOW_ESTABLISHED);
        let both_fin = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
        for (proto, flags, lifetime, why) in [
            (PROTO_TCP, 0, CT_LIFETIME_TCP_NS, "an older build's entry"),
            (
                PROTO_UDP,
                0,
                CT_LIFETIME_NONTCP_NS,
                "an older build's entry",
            ),
            (
                PROTO_TCP,
                FLOW_FIN_CLIENT,
                CT_LIFETIME_TCP_NS,
                "half-closed stays",
            ),
            (
                PROTO_TCP,
                both_fin,
                CT_LIFETIME_CLOSING_NS,
                "closed both ways",
            ),
            (
                PROTO_TCP,
                FLOW_CLOSING | FLOW_REMOTE,
                CT_LIFETIME_CLOSING_NS,
                "reset",
            ),
            (PROTO_TCP, opening, CT_LIFETIME_SYN_NS, "unanswered"),
            (
                PROTO_TCP,
                opening | replied,
                CT_LIFETIME_SYN_NS,
                "answered only",
            ),
            (
                PROTO_TCP,
                opening | replied | established,
                CT_LIFETIME_TCP_NS,
                "handshake done",
            ),
            (
                PROTO_TCP,
                opening | FLOW_CLOSING,
                CT_LIFETIME_CLOSING_NS,
                "reset while opening",
            ),
            (PROTO_UDP, opening, CT_LIFETIME_UDP_NS, "a query"),
            (
                PROTO_UDP,
                opening | replied,
                CT_LIFETIME_UDP_NS,
                "a query and its answer",
            ),
            (
                PROTO_UDP,
                opening | replied | established,
                CT_LIFETIME_UDP_STREAM_NS,
                "a stream",
            ),
        ] {
            assert_eq!(flow_lifetime_ns(proto, flags), lifetime, "{why}");
        }
        assert!(flow_closing(FLOW_CLOSING));
        assert!(!flow_closing(FLOW_REMOTE | FLOW_FIN_BACKEND));
    }

    /// The bits the packets of one TCP connection add, in order, as both entries accumulate them.
    fn replay(packets: &[(u8, bool)]) -> u32 {
        packets
            .iter()
            .fold(FLOW_OPENING, |flags, &(tcp, from_client)| {
                flags | conn_bits(PROTO_TCP, tcp, from_client, flags)
            })
    }

    #[test]
    fn handshake_and_close_bits_follow_the_connection() {
        const C: bool = true;
        const B: bool = false;
        let syn_ack = TCP_SYN | TCP_ACK;
        assert_eq!(
            replay(&[(TCP_SYN, C), (TCP_SYN, C)]),
            FLOW_OPENING,
            "unanswered"
        );
        assert_eq!(
            replay(&[(TCP_SYN, C), (syn_ack, B), (TCP_SYN, C)]),
            FLOW_OPENING | FLOW_REPLIED,
            "answered, never acknowledged: a SYN flood's"
        );
        let open = replay(&[(TCP_SYN, C), (syn_ack, B), (TCP_ACK, C)]);
        assert_eq!(open, FLOW_OPENING | FLOW_REPLIED | FLOW_ESTABLISHED);
        assert_eq!(flow_lifetime_ns(PROTO_TCP, open), CT_LIFETIME_TCP_NS);
        // A client going on without SYN before any answer is not established yet.
        assert_eq!(replay(&[(TCP_ACK, C)]), FLOW_OPENING);
        // A stray ACK the backend answers with RST: closing.
        let reset = replay(&[(TCP_ACK, C), (TCP_RST, B)]);
        assert!(flow_closing(reset));
        let closed = replay(&[
            (TCP_SYN, C),
            (syn_ack, B),
            (TCP_ACK, C),
            (TCP_FIN | TCP_ACK, C),
            (TCP_FIN | TCP_ACK, B),
        ]);
        assert_eq!(
            closed & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND),
            FLOW_FIN_CLIENT | FLOW_FIN_BACKEND
        );
        assert_eq!(flow_lifetime_ns(PROTO_TCP, closed), CT_LIFETIME_CLOSING_NS);
    }

    #[test]
    fn udp_flows_are_one_exchange_until_the_client_goes_on() {
        let udp = |packets: &[bool]| {
            packets.iter().fold(FLOW_OPENING, |flags, &from_client| {
                flags | conn_bits(PROTO_UDP, 0, from_client, flags)
            })
        };
        // A DNS query and its answer; two queries before any answer (A and AAAA from one socket).
        let query = udp(&[true, false]);
        assert_eq!(query, FLOW_OPENING | FLOW_REPLIED);
        assert_eq!(flow_lifetime_ns(PROTO_UDP, query), CT_LIFETIME_UDP_NS);
        assert_eq!(
            udp(&[true, true, false, false]),
            FLOW_OPENING | FLOW_REPLIED
        );
        // The client goes on after an answer: a stream.
        let stream = udp(&[true, false, true]);
        assert_eq!(
            flow_lifetime_ns(PROTO_UDP, stream),
            CT_LIFETIME_UDP_STREAM_NS
        );
        // No close bits, whatever the byte where TCP keeps its flags holds.
        assert_eq!(conn_bits(PROTO_UDP, 0xff, false, 0), FLOW_REPLIED);
        assert!(!flow_closing(udp(&[true, false, true, false])));
    }

    #[test]
    fn alive_until_lifetime_passes() {
        let t0 = 5_000_000_000u64;
        let default = FlowLifetimes::DEFAULT;
        assert!(flow_alive(
            PROTO_UDP,
            0,
            t0,
            t0 + CT_LIFETIME_NONTCP_NS - 1,
            &default
        ));
        assert!(!flow_alive(
            PROTO_UDP,
            0,
            t0,
            t0 + CT_LIFETIME_NONTCP_NS,
            &default
        ));
        assert!(!flow_alive(
            PROTO_TCP,
            FLOW_CLOSING,
            t0,
            t0 + CT_LIFETIME_CLOSING_NS + 1,
            &default
        ));
        // Configured lifetimes: each phase its own.
        let mut short = FlowLifetimes::DEFAULT;
        short.ns[FlowPhase::UdpExchange as usize] = 5_000_000_000;
        let query = FLOW_OPENING | FLOW_REPLIED;
        assert!(flow_alive(PROTO_UDP, query, t0, t0 + 4_999_999_999, &short));
        assert!(!flow_alive(
            PROTO_UDP,
            query,
            t0,
            t0 + 5_000_000_000,
            &short
        ));
        let stream = query | FLOW_ESTABLISHED;
        assert!(flow_alive(
            PROTO_UDP,
            stream,
            t0,
            t0 + 5_000_000_000,
            &short
        ));
        assert!(flow_alive(
            PROTO_UDP,
            query,
            t0,
            t0 + 5_000_000_000,
            &default
        ));
    }
}
