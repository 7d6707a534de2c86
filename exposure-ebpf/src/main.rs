//! Exposure's datapath. One path per packet, as in Katran and Cilium:
//! parse -> reply of a translated flow? -> look up frontend -> conntrack hit? -> select backend ->
//! translate -> forward. Replies from local backends are translated back at tc egress.
#![no_std]
#![no_main]

mod forward;
mod host;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod sock;

use aya_ebpf::maps::{lpm_trie::Key, LruHashMap};
use aya_ebpf::{
    bindings::{
        xdp_action, xdp_md, BPF_ANY, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_UNSPEC,
    },
    helpers::{bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{debug, warn};
use exposure_common::*;

use crate::{
    forward::{
        exposure_send_by, fib_query, hand_to_tc, longer_than_mtu, mtu_exceeded, mtu_fits, next_hop,
        transmit, BY_TC, UNMEASURED,
    },
    host::host_connection,
    maps::*,
    nat::{rewrite, set_macs, store_addr6, Leaves, Tuple},
    parse::*,
    select::{select_backend, sticky_backend},
};

/// Logs a line about two `address:port` endpoints. aya-log's `{:i}` shows a `u32` as IPv4 and 16
/// bytes as IPv6, so the family picks the argument type (IPv4 would read `::ffff:a.b.c.d` otherwise).
macro_rules! log_endpoints {
    ($level:ident, $ctx:expr, $fmt:literal, $a:expr, $a_port:expr, $b:expr, $b_port:expr) => {
        if $a.is_v4() {
            $level!(
                $ctx,
                $fmt,
                u32::from_be($a.v4_raw()),
                port_host($a_port),
                u32::from_be($b.v4_raw()),
                port_host($b_port)
            )
        } else {
            $level!(
                $ctx,
                $fmt,
                $a.octets(),
                port_host($a_port),
                $b.octets(),
                port_host($b_port)
            )
        }
    };
}

#[xdp]
pub fn exposure_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) => action,
        // A frame we can't parse is the kernel's business, not ours: pass it, but count it.
        Err(()) => {
            count(Counter::Malformed);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let p = match parse(ctx)? {
        Parsed::Other => return Ok(xdp_action::XDP_PASS),
        // Sent from here: the error functions' frames and the send's would not fit in BPF's
        // 512 bytes of stack together.
        Parsed::Icmp(off) => {
            return Ok(
                icmp_error_to_client(ctx, off).map_or(xdp_action::XDP_PASS, |ifindex| {
                    send_to_client(ctx, ifindex, exposure_send_by(ctx.ctx, ifindex))
                }),
            )
        }
        Parsed::Icmp6(off) => {
            return Ok(
                icmp6_error_to_client(ctx, off).map_or(xdp_action::XDP_PASS, |ifindex| {
                    send_to_client(ctx, ifindex, exposure_send_by(ctx.ctx, ifindex))
                }),
            )
        }
        Parsed::Fragment => {
            count(Counter::Fragments);
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Packet(p) => p,
    };
    // Only SNATed flows have replies arriving here, and only on SNAT ports: other traffic skips this lookup.
    if is_snat_port(port_host(p.dport)) {
        if let Some(reply) = packet_entry(&p, &REPLIES4, &REPLIES6) {
            return reply_to_client(ctx, &p, reply);
        }
    }
    // Most of what a node receives is for no frontend's port (the answers to its own and its
    // pods' connections, the overlay's): one array read rather than a hash lookup passes it on.
    if !is_frontend_port(port_host(p.dport)) {
        return Ok(xdp_action::XDP_PASS);
    }
    let frontend = if p.v6 {
        let key = key_words::frontend6(&p.daddr, p.dport, p.proto, SCOPE_EXTERNAL);
        unsafe { FRONTENDS6.get(as_key(&key)) }
    } else {
        let key = key_words::frontend4(p.daddr.v4_raw(), p.dport, p.proto, SCOPE_EXTERNAL);
        let found = unsafe { FRONTENDS4.get(as_key(&key)) };
        own_call_site();
        found
    };
    match frontend {
        Some(fe) => {
            if let Some(t) = FRONTEND_STATS.get_ptr_mut(fe.id) {
                unsafe {
                    (*t).packets += 1;
                    (*t).bytes += (ctx.data_end() - ctx.data()) as u64;
                }
            }
            to_backend(ctx, &p, fe)
        }
        None => Ok(xdp_action::XDP_PASS),
    }
}

/// The entry keyed by the packet's own 5-tuple in a per-family pair of maps. Each family's key
/// is built in its own branch only: the stack is tight.
#[inline(always)]
fn packet_entry<T>(
    p: &Packet,
    v4: &LruHashMap<FlowKey4, T>,
    v6: &LruHashMap<FlowKey, T>,
) -> Option<*mut T> {
    if p.v6 {
        let key = key_words::flow6(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
        v6.get_ptr_mut(as_key(&key))
    } else {
        let (saddr, daddr) = (p.saddr.v4_raw(), p.daddr.v4_raw());
        let key = key_words::flow4(saddr, daddr, p.sport, p.dport, p.proto);
        let found = v4.get_ptr_mut(as_key(&key));
        own_call_site();
        found
    }
}

/// Copies an address between two map values a word at a time: LLVM cannot tell the two apart, so
/// a plain assignment becomes a call of `memmove`, which copies a byte per loop.
#[inline(always)]
fn copy_addr(to: &mut Addr, from: &Addr) {
    for (t, f) in to.0.iter_mut().zip(from.0) {
        *t = f;
    }
}

#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// The key of the packet going the other way on `p`'s connection.
#[inline(always)]
fn reversed_key(p: &Packet) -> FlowKey {
    FlowKey {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// Conntrack time: the coarse clock (jiffies resolution) is plenty for lifetimes of seconds and
/// much cheaper per packet than `bpf_ktime_get_ns`.
#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The key of the flow (client -> frontend) a reply entry belongs to.
#[inline(always)]
fn client_key(r: &Reply, proto: u8) -> FlowKey {
    FlowKey {
        saddr: r.client_addr,
        daddr: r.frontend_addr,
        sport: r.client_port,
        dport: r.frontend_port,
        proto,
        _pad: [0; 3],
    }
}

/// The client's flow that reply entry `reply`, hit by the backend's packet `p`, belongs to: only
/// while that flow still goes to this backend (and SNAT port). A client that reused its port after
/// a connection closed has a new flow, perhaps elsewhere; the old connection's late packets (a
/// retransmitted FIN, an RST) still reach the client, but must not close the new one.
#[inline(always)]
fn flow_of_reply(reply: *const Reply, p: &Packet) -> Option<*mut Flow> {
    lookup_flow(&client_key(unsafe { &*reply }, p.proto)).filter(|&f| {
        let f = unsafe { &*f };
        f.backend_addr == p.saddr
            && f.backend_port == p.sport
            && (f.flags & FLOW_REMOTE == 0 || (f.snat_addr == p.daddr && f.snat_port == p.dport))
    })
}

/// Whether reply entry `r` answers the flow client packet `p` belongs to (its client and
/// frontend).
#[inline(always)]
fn answers(r: &Reply, p: &Packet) -> bool {
    r.client_port == p.sport
        && r.client_addr == p.saddr
        && r.frontend_port == p.dport
        && r.frontend_addr == p.daddr
}

/// The key under which the replies of a client's (`addr:port`) flow arrive.
#[inline(always)]
fn reply_key(client_addr: &Addr, client_port: u16, proto: u8, flow: &Flow) -> FlowKey {
    let (daddr, dport) = if flow.flags & FLOW_REMOTE != 0 {
        (flow.snat_addr, flow.snat_port)
    } else {
        (*client_addr, client_port)
    };
    FlowKey {
        saddr: flow.backend_addr,
        daddr,
        sport: flow.backend_port,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// The connection state both directions' entries carry.
trait ConnState {
    fn state(&mut self) -> (&mut u32, &mut u64);
    /// The interface the entry's own packets come in by: a remote flow's replies, for its flow
    /// entry; the client's packets, for its reply entry.
    fn comes_in_by(&self) -> u32;
}

impl ConnState for Flow {
    #[inline(always)]
    fn state(&mut self) -> (&mut u32, &mut u64) {
        (&mut self.flags, &mut self.last_seen_ns)
    }
    #[inline(always)]
    fn comes_in_by(&self) -> u32 {
        self.ifindex
    }
}

impl ConnState for Reply {
    #[inline(always)]
    fn state(&mut self) -> (&mut u32, &mut u64) {
        (&mut self.flags, &mut self.last_seen_ns)
    }
    #[inline(always)]
    fn comes_in_by(&self) -> u32 {
        self.ifindex
    }
}

/// Keeps both directions' state in step with packet `p` (from the client or the backend): the
/// state bits it adds (`conn_bits`: each is new once per connection) and an occasional `last_seen`
/// refresh (not per packet, so established flows rarely write to the maps). `seen` is the entry
/// the packet hit; the other direction's is looked up only when something is to be written: most
/// packets never need it.
#[inline(always)]
fn touch<A: ConnState, B: ConnState>(
    seen: *mut A,
    other: impl FnOnce() -> Option<*mut B>,
    p: &Packet,
    from_client: bool,
    now: u64,
) {
    let (flags, last_seen) = unsafe { (*seen).state() };
    let bits = conn_bits(p.proto, p.tcp_flags, from_client, *flags);
    if bits & !*flags != 0 || now.wrapping_sub(*last_seen) > CT_REFRESH_NS {
        *flags |= bits;
        *last_seen = now;
        if let Some(other) = other() {
            let (flags, last_seen) = unsafe { (*other).state() };
            *flags |= bits;
            *last_seen = now;
        }
    }
}

enum Selected {
    Flow,
    NoBackend,
    NoLocalBackend,
    SourceDenied,
    Drop,
}

/// A packet to a frontend: existing flow or a new one, then translate and send.
#[inline(always)]
fn to_backend(ctx: &XdpContext, p: &Packet, fe: &Frontend) -> Result<u32, ()> {
    count(Counter::FrontendPackets);
    let now = now_ns();
    let existing = packet_entry(p, &FLOWS4, &FLOWS6).filter(|&f| {
        let f = unsafe { &*f };
        let new_syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && flow_closing(f.flags);
        flow_alive(p.proto, f.flags, f.last_seen_ns, now, &LoadedLifetimes)
            && !new_syn
            && (p.proto == PROTO_TCP || f.flags & FLOW_HOST != 0 || backend_still_there(f))
    });
    let flow = match existing {
        // The node's own connection from the frontend's port: its replies are the kernel's.
        Some(f) if unsafe { (*f).flags } & FLOW_HOST != 0 => {
            touch(f, || None::<*mut Reply>, p, false, now);
            return Ok(xdp_action::XDP_PASS);
        }
        Some(f) => {
            let reply = || {
                let rk = reply_key(&p.saddr, p.sport, p.proto, unsafe { &*f });
                // Only this flow's own entry: a closed flow's SNAT port may serve a new flow now,
                // and a local pod's tuple the same client's flow through another frontend.
                lookup_reply(&rk).filter(|&r| answers(unsafe { &*r }, p))
            };
            touch(f, reply, p, true, now);
            f
        }
        // A frontend whose Service is gone serves only the connections it has.
        None if fe.is_draining() => return Ok(xdp_action::XDP_PASS),
        // The rest of a datagram whose first fragment started no flow (refused, or dropped):
        // that fragment was counted, and only it may be answered with an ICMP error.
        None if p.later_fragment => return Ok(xdp_action::XDP_DROP),
        None => match new_flow(ctx, p, fe, now) {
            Selected::Flow => {
                let Some(s) = SCRATCH.get_ptr_mut(0) else {
                    return Ok(xdp_action::XDP_DROP);
                };
                let flow = unsafe { &mut (*s).flow };
                if flow.flags & FLOW_REMOTE != 0 {
                    if exposure_claim_snat_port(own_ctx(ctx).ctx, now) == 0 {
                        return Ok(xdp_action::XDP_DROP);
                    }
                } else {
                    if redirect_to_pods() {
                        to_pod(ctx, p, flow);
                    }
                    let (key, reply) = unsafe { (&(*s).reply_key, &(*s).reply) };
                    if insert_reply(key, reply, BPF_ANY as u64).is_err() {
                        return Ok(xdp_action::XDP_DROP);
                    }
                }
                // The first packet is translated from the entry as built, not looked up again:
                // a lookup would also mark the entry used, and flows that never see a second
                // packet (scans, floods) should be the first the LRU evicts.
                if insert_flow(unsafe { &(*s).key }, flow, BPF_ANY as u64).is_err() {
                    return Ok(xdp_action::XDP_DROP);
                }
                count(Counter::NewFlows);
                flow as *mut Flow
            }
            refused => return refuse(ctx, p, refused),
        },
    };
    translate_to_backend(ctx, p, unsafe { &*flow })
}

/// Whether a UDP flow's backend is still an endpoint: when it leaves (its pod is gone), the flow
/// picks a new backend, as kube-proxy deletes the conntrack entries of removed UDP endpoints. UDP
/// has no end of its own: a client that keeps sending would otherwise keep sending into the void
/// (a DNS client and a replaced DNS pod). TCP flows keep their backend; its RST or a timeout ends them.
#[inline(always)]
fn backend_still_there(f: &Flow) -> bool {
    BACKENDS
        .get(f.backend_id)
        .is_some_and(|b| b.addr == f.backend_addr && b.port == f.backend_port)
}

/// A new flow that gets no backend: refused (ICMP port unreachable) or dropped, counted and logged.
/// Not inlined: a rare path whose locals needn't weigh on every packet's stack.
#[inline(never)]
fn refuse(ctx: &XdpContext, p: &Packet, why: Selected) -> Result<u32, ()> {
    let ctx = &own_ctx(ctx);
    match why {
        Selected::NoBackend => {
            count(Counter::NoBackend);
            log_endpoints!(
                debug,
                ctx,
                "refused {:i}:{} -> {:i}:{}: no endpoints",
                p.saddr,
                p.sport,
                p.daddr,
                p.dport
            );
            Ok(if p.v6 {
                reject::port_unreachable6(ctx, p)
            } else {
                reject::port_unreachable(ctx, p)
            })
        }
        Selected::SourceDenied => {
            count(Counter::SourceRangeDenied);
            log_endpoints!(
                debug,
                ctx,
                "dropped {:i}:{} -> {:i}:{}: source not in loadBalancerSourceRanges",
                p.saddr,
                p.sport,
                p.daddr,
                p.dport
            );
            Ok(xdp_action::XDP_DROP)
        }
        Selected::NoLocalBackend => {
            count(Counter::DroppedNoLocalBackend);
            log_endpoints!(
                debug,
                ctx,
                "dropped {:i}:{} -> {:i}:{}: no local endpoints",
                p.saddr,
                p.sport,
                p.daddr,
                p.dport
            );
            Ok(xdp_action::XDP_DROP)
        }
        Selected::Flow | Selected::Drop => Ok(xdp_action::XDP_DROP),
    }
}

/// A packet of a flow that does not fit the interface it is to leave by (`mtu`): XDP cannot
/// fragment it, so its sender is told the MTU (ICMP fragmentation needed, ICMPv6 packet too big),
/// as the kernel does when it forwards, and sends smaller packets. The kernel would fragment a
/// packet without DF instead; the sender gets the same message for it (Linux lowers its path MTU
/// for it just the same), rather than silence.
#[inline(never)]
fn too_big(ctx: &XdpContext, p: &Packet, mtu: u32) -> Result<u32, ()> {
    let ctx = &own_ctx(ctx);
    count(Counter::TooBig);
    log_endpoints!(
        debug,
        ctx,
        "too big for the next hop: {:i}:{} -> {:i}:{}",
        p.saddr,
        p.sport,
        p.daddr,
        p.dport
    );
    Ok(if p.v6 {
        reject::packet_too_big6(ctx, p, mtu)
    } else {
        reject::fragmentation_needed(ctx, p, mtu)
    })
}

/// Picks a backend for a new flow, builds both directions' entries in `SCRATCH` and records the
/// reply's (for a remote backend, that claims the SNAT port); the caller records the flow's. Not
/// inlined: its locals would push the one-function stack past BPF's 512 bytes.
#[inline(never)]
fn new_flow(ctx: &XdpContext, p: &Packet, fe: &Frontend, now: u64) -> Selected {
    let ctx = &own_ctx(ctx);
    let service_id = fe.service_id;
    let Some(service) = SERVICES.get(service_id).copied() else {
        return Selected::NoBackend;
    };
    // loadBalancerSourceRanges restrict the LoadBalancer address only, as in kube-proxy.
    if fe.flags & FRONTEND_LOADBALANCER != 0 && service.flags & SERVICE_SOURCE_RANGES != 0 {
        let key = Key::new(
            (core::mem::size_of::<SourceRange>() * 8) as u32,
            SourceRange {
                service_id,
                addr: p.saddr,
            },
        );
        if SOURCE_RANGES.get(&key).is_none() {
            return Selected::SourceDenied;
        }
    }
    let hash = hash::flow_hash(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
    let selected = if service.affinity_timeout_s != 0 {
        sticky_backend(&p.saddr, service_id, &service, hash, now)
    } else {
        select_backend(&service, hash)
    };
    let Some(backend_id) = selected else {
        return if service.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
            Selected::NoLocalBackend
        } else {
            Selected::NoBackend
        };
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Selected::NoBackend;
    };
    if backend.addr.is_unspecified() {
        return Selected::NoBackend;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Selected::Drop;
    };
    let s = unsafe { &mut *s };
    let eth: Result<*mut [[u8; 6]; 2], ()> = ptr_at(ctx, 0);
    let Ok(eth) = eth else { return Selected::Drop };
    let [node_mac, client_mac] = unsafe { *eth };
    let bits = FLOW_OPENING | conn_bits(p.proto, p.tcp_flags, true, 0);
    s.key = flow_key(p);
    let flow = &mut s.flow;
    flow.last_seen_ns = now;
    copy_addr(&mut flow.backend_addr, &backend.addr);
    flow.backend_port = backend.port;
    flow.backend_id = backend_id;
    flow.service_id = service_id;
    flow.flags = bits;
    flow.snat_addr = Addr::default();
    flow.snat_port = 0;
    flow.ifindex = 0;
    flow.dmac = [0; 6];
    flow.smac = [0; 6];
    let reply = &mut s.reply;
    reply.last_seen_ns = now;
    reply.frontend_addr = p.daddr;
    reply.frontend_port = p.dport;
    reply.client_addr = p.saddr;
    reply.client_port = p.sport;
    reply.flags = bits;
    reply.ifindex = ctx.ingress_ifindex() as u32;
    reply.client_mac = client_mac;
    reply.node_mac = node_mac;
    if backend.flags & BACKEND_LOCAL == 0 {
        let Some(hop) = next_hop(ctx, &mut s.fib, &backend.addr, p.proto) else {
            return Selected::Drop;
        };
        let family = if p.v6 { FAMILY_V6 } else { FAMILY_V4 };
        let on = |ifindex| NodeAddrKey { ifindex, family };
        let snat_addr = match unsafe {
            NODE_ADDRS
                .get(&on(hop.ifindex))
                .or_else(|| NODE_ADDRS.get(&on(s.reply.ifindex)))
        } {
            Some(a) => a,
            None => {
                count(Counter::FibFailed);
                return Selected::Drop;
            }
        };
        let flow = &mut s.flow;
        flow.flags |= FLOW_REMOTE;
        copy_addr(&mut flow.snat_addr, snat_addr);
        flow.ifindex = hop.ifindex;
        flow.dmac = hop.dmac;
        flow.smac = hop.smac;
        // Its SNAT port is claimed by the caller (`exposure_claim_snat_port`).
        s.reply.flags |= FLOW_REMOTE;
    } else {
        s.reply_key = reply_key(&s.key.saddr, s.key.sport, s.key.proto, &s.flow);
        // The client may reach this backend from the same port through another frontend too:
        // while that flow is open, the answers are its. Conntrack drops such a clashing new
        // connection; taking the entry would send the open one's answers from the wrong frontend.
        if let Some(held) = lookup_reply(&s.reply_key).map(|r| unsafe { &*r }) {
            // The test `claim_snat_port` makes of a taken port, written out again: as one shared
            // function it cost the verifier 85,000 more instructions.
            let closed = p.proto == PROTO_TCP && flow_closing(held.flags);
            let alive = flow_alive(
                p.proto,
                held.flags,
                held.last_seen_ns,
                now,
                &LoadedLifetimes,
            );
            if !answers(held, p) && !closed && alive {
                count(Counter::TupleCollision);
                return Selected::Drop;
            }
        }
        // Its reply entry is written by the caller, once it knows whether the flow goes to the pod.
    }
    log_endpoints!(
        debug,
        ctx,
        "new flow {:i}:{} -> backend {:i}:{}",
        p.saddr,
        p.sport,
        backend.addr,
        backend.port
    );
    Selected::Flow
}

/// A new local flow (being built in `SCRATCH`) whose pod sits behind one of `POD_IFACES`: record
/// that interface and the MACs the FIB gives, so this and later packets skip the node's stack (as
/// the FIB would route them, but without a second pass through the stack), and so do the pod's
/// replies ([`exposure_tc_from_pod`]). Otherwise the flow
/// stays with the kernel's routing. Not inlined, and a sibling of `new_flow` rather than its
/// callee: the stack budget.
#[inline(never)]
fn to_pod(ctx: &XdpContext, p: &Packet, flow: &mut Flow) {
    let ctx = &own_ctx(ctx);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let fib = unsafe { &mut (*s).fib };
    // No neighbour entry yet: the stack resolves it while it forwards this flow.
    if fib_query(ctx, fib, &flow.backend_addr, p.proto, p.ip_len) != BPF_FIB_LKUP_RET_SUCCESS as i64
    {
        return;
    }
    // The agent never lists the node's own interfaces, so this is a pod's.
    if POD_IFACES.get_ifindex(fib.ifindex).is_none() {
        return;
    }
    // A pod interface with a smaller MTU than the node's (an overlay's, say) would drop the
    // larger frames sent past the stack; through the stack they are fragmented, or their sender
    // is told the MTU. Checked once per flow, so redirected packets pay nothing for it.
    if !mtu_fits(ctx, fib.ifindex) {
        return;
    }
    flow.ifindex = fib.ifindex;
    flow.dmac = fib.dmac;
    flow.smac = fib.smac;
    flow.flags |= FLOW_TO_POD;
    unsafe { (*s).reply.flags |= FLOW_TO_POD };
}

/// Claims a SNAT port for the remote flow being set up in `SCRATCH` (1), or counts and logs that
/// none is free (0). A global function: the verifier checks its tries once, on their own, rather
/// than once for every way a packet reaches them (which took most of the XDP program's budget
/// of verified instructions), at the cost of one more stack frame, next to the XDP program's.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exposure_claim_snat_port(ctx: *mut xdp_md, now: u64) -> i32 {
    let ctx = &XdpContext::new(ctx);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let s = unsafe { &mut *s };
    if let Some(port) = claim_snat_port(s, now) {
        s.flow.snat_port = port;
        return 1;
    }
    count(Counter::SnatExhausted);
    log_endpoints!(
        warn,
        ctx,
        "no free SNAT port for {:i}:{} towards {:i}:{}",
        s.key.saddr,
        s.key.sport,
        s.flow.backend_addr,
        s.flow.backend_port
    );
    0
}

/// Finds a free SNAT port for the remote flow being set up in `s` and reserves it by inserting its
/// reply entry.
#[inline(always)]
fn claim_snat_port(s: &mut Scratch, now: u64) -> Option<u16> {
    let key = &s.key;
    let start = hash::flow_hash(&key.saddr, &key.daddr, key.sport, key.dport, key.proto);
    let proto = key.proto;
    s.reply_key = FlowKey {
        saddr: s.flow.backend_addr,
        daddr: s.flow.snat_addr,
        sport: s.flow.backend_port,
        dport: 0,
        proto,
        _pad: [0; 3],
    };
    let (first, last) = snat_ports();
    for attempt in 0..SNAT_PORT_TRIES {
        let candidate = port(hash::snat_port_candidate(start, attempt, first, last));
        s.reply_key.dport = candidate;
        // Looked up before inserting: a failed insert costs the kernel an LRU entry taken and
        // given back, and most tries fail once the range fills up.
        let Some(old) = lookup_reply(&s.reply_key).map(|r| unsafe { &*r }) else {
            if insert_reply(&s.reply_key, &s.reply, BPF_NOEXIST as u64).is_ok() {
                return Some(candidate);
            }
            continue; // Taken since the lookup, by another CPU.
        };
        // Taken: reuse it if that flow is over, or is a TCP connection already closed by RST or
        // FIN both ways (as the kernel's NAT lets a new SYN take a closing connection's tuple):
        // waiting out the closing lifetime would cap new connections to one backend at a few
        // hundred per second.
        let closed = proto == PROTO_TCP && flow_closing(old.flags);
        if (closed || !flow_alive(proto, old.flags, old.last_seen_ns, now, &LoadedLifetimes))
            && insert_reply(&s.reply_key, &s.reply, BPF_ANY as u64).is_ok()
        {
            return Some(candidate);
        }
    }
    None
}

#[inline(always)]
fn translate_to_backend(ctx: &XdpContext, p: &Packet, flow: &Flow) -> Result<u32, ()> {
    if flow.flags & FLOW_REMOTE != 0 {
        // Which way the frame leaves is a value (a global function's): the verifier walks the
        // rewrite once for both.
        let by = exposure_send_by(ctx.ctx, flow.ifindex);
        if by & UNMEASURED == 0 {
            if let Some(mtu) = mtu_exceeded(ctx, flow.ifindex) {
                return too_big(ctx, p, mtu);
            }
        }
        let to = Tuple {
            saddr: &flow.snat_addr,
            daddr: &flow.backend_addr,
            sport: flow.snat_port,
            dport: flow.backend_port,
        };
        rewrite(ctx, p, &to, Leaves::to_kernel_if(by & BY_TC))?;
        count(Counter::ToRemote);
        // Still addressed to this node, so the stack takes it up to tc ingress. XDP could only
        // send it where tc would not, so without metadata (the driver keeps none) tc ingress
        // knows it by its tuple.
        if by & BY_TC != 0 {
            if hand_to_tc(ctx, HANDOFF_OUT, flow.ifindex).is_err() {
                hand_off_by_tuple();
            }
            return Ok(xdp_action::XDP_PASS);
        }
        set_macs(ctx, &flow.dmac, &flow.smac)?;
        Ok(transmit(ctx, flow.ifindex))
    } else {
        // DNAT only: the pod sees the client's address; the kernel routes it to the pod.
        let to = Tuple {
            saddr: &p.saddr,
            daddr: &flow.backend_addr,
            sport: p.sport,
            dport: flow.backend_port,
        };
        // Redirected from XDP into the pod, or handed to the kernel (also for the tc redirect).
        let leaves = if flow.flags & FLOW_TO_POD != 0 && !redirect_at_tc() {
            Leaves::FromXdp
        } else {
            Leaves::ToKernel
        };
        rewrite(ctx, p, &to, leaves)?;
        count(Counter::ToLocal);
        if flow.flags & FLOW_TO_POD != 0 {
            // Both fall back to the stack if the agent has since taken the interface out.
            if redirect_at_tc() {
                // The pod's MAC only once the hand-off is sure: the stack drops frames to others.
                if POD_IFACES.get_ifindex(flow.ifindex).is_some()
                    && hand_to_tc(ctx, HANDOFF_TO_POD, flow.ifindex).is_ok()
                {
                    set_macs(ctx, &flow.dmac, &flow.smac)?;
                }
                return Ok(xdp_action::XDP_PASS);
            }
            // A GSO packet (generic XDP) goes through the stack, which takes it whole: the
            // kernel's generic redirect drops a packet longer than the MTU. Its checksum was
            // rewritten as for the kernel all the same (see `rewrite`: an skb goes on).
            if longer_than_mtu(ctx, flow.ifindex) {
                return Ok(xdp_action::XDP_PASS);
            }
            if let Ok(action) = POD_IFACES.redirect(flow.ifindex, xdp_action::XDP_PASS as u64) {
                set_macs(ctx, &flow.dmac, &flow.smac)?;
                count(Counter::RedirectedToPod);
                return Ok(action);
            }
        }
        Ok(xdp_action::XDP_PASS)
    }
}

/// A remote backend's reply to a SNATed flow: restore frontend -> client and send it straight back.
#[inline(always)]
fn reply_to_client(ctx: &XdpContext, p: &Packet, reply: *mut Reply) -> Result<u32, ()> {
    let r = unsafe { &*reply };
    let now = now_ns();
    if r.flags & FLOW_REMOTE == 0 {
        if r.flags & FLOW_HOST != 0 {
            // The node's own connection: its state goes on (answered, closed), then the kernel's.
            touch(reply, || None::<*mut Flow>, p, false, now);
        }
        return Ok(xdp_action::XDP_PASS);
    }
    // A SNATed flow that is over owns its tuple no more: what arrives on it is the kernel's (a
    // connection of the node's that took the port, as its NAT does not know ours).
    if !flow_alive(p.proto, r.flags, r.last_seen_ns, now, &LoadedLifetimes) {
        return Ok(xdp_action::XDP_PASS);
    }
    let by = exposure_send_by(ctx.ctx, r.ifindex);
    if by & UNMEASURED == 0 {
        if let Some(mtu) = mtu_exceeded(ctx, r.ifindex) {
            return too_big(ctx, p, mtu);
        }
    }
    touch(reply, || flow_of_reply(reply, p), p, false, now);
    let to = Tuple {
        saddr: &r.frontend_addr,
        daddr: &r.client_addr,
        sport: r.frontend_port,
        dport: r.client_port,
    };
    rewrite(ctx, p, &to, Leaves::to_kernel_if(by & BY_TC))?;
    set_macs(ctx, &r.client_mac, &r.node_mac)?;
    count(Counter::RepliesXdp);
    Ok(send_to_client(ctx, r.ifindex, by))
}

/// Sends a frame translated for a client (its MACs set) out of `ifindex`, where the client's
/// packets came in: from XDP, or handed to tc where XDP cannot send it (`by`, from
/// [`exposure_send_by`]). Addressed to the client's MAC, it is still taken up to tc ingress.
#[inline(always)]
fn send_to_client(ctx: &XdpContext, ifindex: u32, by: u32) -> u32 {
    if by & BY_TC != 0 && hand_to_tc(ctx, HANDOFF_AS_IS, ifindex).is_ok() {
        return xdp_action::XDP_PASS;
    }
    transmit(ctx, ifindex)
}

/// An ICMP error about a SNATed flow (from its backend, or a router on the way): translate it like the
/// flow's replies, for the client; the interface to send it out of. Anything else ICMP is the
/// kernel's (Err).
#[inline(never)]
fn icmp_error_to_client(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let ctx = &own_ctx(ctx);
    // Rewritten in place: copies of the message would cost stack.
    let msg: *mut [u8; icmp::SPAN] = ptr_at(ctx, off)?;
    let b = unsafe { &mut *msg };
    if !icmp::is_error(b[0]) {
        return Err(());
    }
    let key = icmp::quoted_flow(b).ok_or(())?;
    if !is_snat_port(port_host(key.dport)) {
        return Err(());
    }
    let r = unsafe { REPLIES4.get(&key.v4()) }.ok_or(())?;
    if r.flags & FLOW_REMOTE == 0 {
        return Err(());
    }
    icmp::translate_quote(b, r);
    let check: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK)?;
    let saddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_SADDR)?;
    let daddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_DADDR)?;
    unsafe {
        let mut c = check.read_unaligned();
        c = checksum::replace4(c, saddr.read_unaligned(), r.frontend_addr.v4_raw());
        c = checksum::replace4(c, daddr.read_unaligned(), r.client_addr.v4_raw());
        check.write_unaligned(c);
        saddr.write_unaligned(r.frontend_addr.v4_raw());
        daddr.write_unaligned(r.client_addr.v4_raw());
    }
    set_macs(ctx, &r.client_mac, &r.node_mac)?;
    count(Counter::IcmpErrorsTranslated);
    Ok(r.ifindex)
}

/// [`icmp_error_to_client`] for ICMPv6; neighbour discovery and echo are never touched.
#[inline(never)]
fn icmp6_error_to_client(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let ctx = &own_ctx(ctx);
    let msg: *mut [u8; icmp::SPAN6] = ptr_at(ctx, off)?;
    let b = unsafe { &mut *msg };
    if !icmp::is_error6(b[0]) {
        return Err(());
    }
    let key = icmp::quoted_flow6(b).ok_or(())?;
    if !is_snat_port(port_host(key.dport)) {
        return Err(());
    }
    let r = unsafe { REPLIES6.get(&key) }.ok_or(())?;
    if r.flags & FLOW_REMOTE == 0 {
        return Err(());
    }
    icmp::translate_quote6(b, r);
    let saddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_SADDR)?;
    let daddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_DADDR)?;
    let (old_s, old_d) = unsafe { (Addr(saddr.read_unaligned()), Addr(daddr.read_unaligned())) };
    icmp::outer_address_changed6(b, &old_s, &r.frontend_addr);
    icmp::outer_address_changed6(b, &old_d, &r.client_addr);
    store_addr6(saddr, &r.frontend_addr.0);
    store_addr6(daddr, &r.client_addr.0);
    set_macs(ctx, &r.client_mac, &r.node_mac)?;
    count(Counter::IcmpErrorsTranslated);
    Ok(r.ifindex)
}

/// The `REPLIES4`/`REPLIES6` entry of a local backend's flow that a quoted packet belongs to.
#[inline(always)]
fn local_reply(key: &FlowKey) -> Option<Reply> {
    let r = unsafe { *lookup_reply(key)? };
    (r.flags & FLOW_REMOTE == 0).then_some(r)
}

/// An ICMP error a local backend sends about its flow: quote and source as the client expects.
#[inline(always)]
fn tc_icmp_error(ctx: &TcContext, l4_off: usize) -> Result<i32, ()> {
    let mut b: [u8; icmp::SPAN] = ctx.load(l4_off).map_err(|_| ())?;
    if !icmp::is_error(b[0]) {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(r) = icmp::quoted_flow(&b).and_then(|k| local_reply(&k)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    icmp::translate_quote(&mut b, &r);
    let frontend = r.frontend_addr.v4_raw();
    let old_src: u32 = ctx.load(ETH_LEN + IP_SADDR).map_err(|_| ())?;
    ctx.store(l4_off, &b, 0).map_err(|_| ())?;
    ctx.l3_csum_replace(ETH_LEN + IP_CHECK, old_src as u64, frontend as u64, 4)
        .map_err(|_| ())?;
    ctx.store(ETH_LEN + IP_SADDR, &frontend, 0)
        .map_err(|_| ())?;
    count(Counter::IcmpErrorsTranslated);
    Ok(TC_ACT_OK)
}

/// [`tc_icmp_error`] for ICMPv6 (no IP checksum; the ICMPv6 one covers the outer source).
#[inline(always)]
fn tc_icmp6_error(ctx: &TcContext, l4_off: usize) -> Result<i32, ()> {
    let mut b: [u8; icmp::SPAN6] = ctx.load(l4_off).map_err(|_| ())?;
    if !icmp::is_error6(b[0]) {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(r) = icmp::quoted_flow6(&b).and_then(|k| local_reply(&k)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    icmp::translate_quote6(&mut b, &r);
    let old_src: [u32; 4] = ctx.load(ETH_LEN + IP6_SADDR).map_err(|_| ())?;
    icmp::outer_address_changed6(&mut b, &Addr(old_src), &r.frontend_addr);
    ctx.store(l4_off, &b, 0).map_err(|_| ())?;
    ctx.store(ETH_LEN + IP6_SADDR, &r.frontend_addr.0, 0)
        .map_err(|_| ())?;
    count(Counter::IcmpErrorsTranslated);
    Ok(TC_ACT_OK)
}

/// `--redirect-to-pods`: a local flow's packet, translated at XDP, goes from here into its pod's
/// namespace (`bpf_redirect_peer`: no second pass through the node's stack, and the pod's veth
/// needs nothing special, unlike XDP redirect). Everything else goes on untouched.
#[classifier]
pub fn exposure_tc_ingress(ctx: TcContext) -> i32 {
    try_tc_ingress(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_tc_ingress(ctx: &TcContext) -> Result<i32, ()> {
    const LEN: usize = core::mem::size_of::<TcHandoff>();
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + LEN > ctx.data() {
        if handoffs_by_tuple() {
            return tc_out_by_tuple(ctx);
        }
        return Ok(TC_ACT_UNSPEC);
    }
    let handoff = unsafe { (meta as *const TcHandoff).read_unaligned() };
    match handoff.magic {
        HANDOFF_TO_POD => {
            count(Counter::RedirectedToPod);
            Ok(unsafe { bpf_redirect_peer(handoff.ifindex, 0) } as i32)
        }
        HANDOFF_OUT => {
            count(Counter::SentFromTc);
            // The kernel routes it out of that interface and fills in the link layer (none on a
            // WireGuard or IPIP device), resolving the neighbour if need be.
            Ok(unsafe { bpf_redirect_neigh(handoff.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        }
        HANDOFF_AS_IS => {
            count(Counter::SentFromTc);
            Ok(unsafe { bpf_redirect(handoff.ifindex, 0) } as i32)
        }
        _ => Ok(TC_ACT_UNSPEC),
    }
}

/// A remote flow's packet that XDP translated and passed without metadata (its driver keeps
/// none), known by its tuple: from a SNAT port of the node's, to the backend, the reverse of a
/// reply entry's key whose flow is SNATed to just that. Only this node's translation makes such a
/// packet arrive (the kernel drops one from its own address). Sent out as [`HANDOFF_OUT`] does.
#[inline(never)]
fn tc_out_by_tuple(ctx: &TcContext) -> Result<i32, ()> {
    let Parsed::Packet(p) = parse_skb(ctx)? else {
        return Ok(TC_ACT_UNSPEC);
    };
    if !is_snat_port(port_host(p.sport)) {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(reply) = lookup_reply(&reversed_key(&p)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let r = unsafe { &*reply };
    if r.flags & (FLOW_REMOTE | FLOW_HOST) != FLOW_REMOTE {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(flow) = lookup_flow(&client_key(r, p.proto)) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let f = unsafe { &*flow };
    if f.flags & FLOW_REMOTE == 0
        || f.snat_port != p.sport
        || f.backend_port != p.dport
        || f.snat_addr != p.saddr
        || f.backend_addr != p.daddr
    {
        return Ok(TC_ACT_UNSPEC);
    }
    count(Counter::SentFromTc);
    count(Counter::SentFromTcByTuple);
    Ok(unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// `--redirect-to-pods` / `--xdp-redirect-to-pods`, on the pods' interfaces (tc ingress): the
/// replies of a flow sent straight to its pod go back past the node's stack as its packets came,
/// to the interface the client's packets came in on and the MAC they came from, where tc egress
/// translates them as any local backend's reply. Through the stack they would meet netfilter as a
/// connection it never saw the start of, and a CNI's masquerade of pod egress (flannel's, Calico's
/// `natOutgoing`) would take them for new connections of the pod's and SNAT them. Everything else
/// (other pods' traffic, flows through the stack) goes on untouched.
#[classifier]
pub fn exposure_tc_from_pod(ctx: TcContext) -> i32 {
    try_tc_from_pod(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn try_tc_from_pod(ctx: &TcContext) -> Result<i32, ()> {
    let (key, alive) = match parse_skb(ctx)? {
        Parsed::Packet(p) => (flow_key(&p), Some(p.proto)),
        // An ICMP error about such a flow (a closed port, a smaller MTU) too: conntrack finds no
        // connection for it, and netfilter's rules against INVALID packets (kube-proxy's,
        // Calico's) would drop it.
        Parsed::Icmp(l4_off) => {
            let b: [u8; icmp::SPAN] = ctx.load(l4_off).map_err(|_| ())?;
            match icmp::quoted_flow(&b).filter(|_| icmp::is_error(b[0])) {
                Some(key) => (key, None),
                None => return Ok(TC_ACT_UNSPEC),
            }
        }
        Parsed::Icmp6(l4_off) => {
            let b: [u8; icmp::SPAN6] = ctx.load(l4_off).map_err(|_| ())?;
            match icmp::quoted_flow6(&b).filter(|_| icmp::is_error6(b[0])) {
                Some(key) => (key, None),
                None => return Ok(TC_ACT_UNSPEC),
            }
        }
        Parsed::Fragment | Parsed::Other => return Ok(TC_ACT_UNSPEC),
    };
    let Some(reply) = lookup_reply(&key) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let r = unsafe { &*reply };
    if r.flags & (FLOW_TO_POD | FLOW_REMOTE | FLOW_HOST) != FLOW_TO_POD {
        return Ok(TC_ACT_UNSPEC);
    }
    // A flow that is over owns its tuple no more (as at tc egress): the pod's packet is its own.
    if let Some(proto) = alive {
        if !flow_alive(proto, r.flags, r.last_seen_ns, now_ns(), &LoadedLifetimes) {
            return Ok(TC_ACT_UNSPEC);
        }
    }
    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    unsafe { eth.write_unaligned([r.client_mac, r.node_mac]) };
    count(Counter::RepliesFromPod);
    Ok(unsafe { bpf_redirect(r.ifindex, 0) } as i32)
}

/// Replies from local backends leave through the node's stack: restore the frontend as source.
#[classifier]
pub fn exposure_tc_egress(ctx: TcContext) -> i32 {
    try_tc_egress(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

/// The most of an egress packet's headers the reply path reads: Ethernet, IPv4 with options, TCP.
const TC_HEADERS: u32 = (ETH_LEN + 60 + 20) as u32;

/// An skb's headers, read in place as at XDP (helper calls per field cost more than the
/// translation). An skb whose headers are not all in its linear part gets them pulled in (a
/// malformed one is pulled for nothing, and still fails). Writing in place makes the verifier
/// un-share a cloned skb's linear part on entry: nothing to copy for TCP's clones when the payload
/// is in pages (devices with scatter-gather), a copy of the linear part otherwise.
#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Result<Parsed, ()> {
    match parse(ctx) {
        Ok(parsed) => Ok(parsed),
        Err(()) => {
            ctx.pull_data(ctx.len().min(TC_HEADERS)).map_err(|_| ())?;
            parse(ctx)
        }
    }
}

#[inline(always)]
fn try_tc_egress(ctx: &TcContext) -> Result<i32, ()> {
    match parse_skb(ctx)? {
        Parsed::Packet(p) => tc_reply(ctx, &p),
        Parsed::Icmp(l4_off) => tc_icmp_error(ctx, l4_off),
        Parsed::Icmp6(l4_off) => tc_icmp6_error(ctx, l4_off),
        Parsed::Fragment | Parsed::Other => Ok(TC_ACT_UNSPEC),
    }
}

/// A local backend's reply on its way out: frontend address and port as source again.
#[inline(always)]
fn tc_reply(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    let key = flow_key(p);
    let Some(reply) = lookup_reply(&key) else {
        return host_connection(ctx, p);
    };
    let r = unsafe { *reply };
    if r.flags & (FLOW_REMOTE | FLOW_HOST) != 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    // A flow that is over owns its tuple no more (as at XDP): the pod's packet is its own.
    let now = now_ns();
    if !flow_alive(p.proto, r.flags, r.last_seen_ns, now, &LoadedLifetimes) {
        return Ok(TC_ACT_UNSPEC);
    }
    touch(reply, || flow_of_reply(reply, p), p, false, now);
    if !p.later_fragment {
        tc_reply_ports(ctx, p, &r)?;
    }
    if p.v6 {
        let saddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_SADDR)?;
        store_addr6(saddr, &r.frontend_addr.0);
    } else {
        // The IPv4 header's checksum is never offloaded: an incremental update.
        let check: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK)?;
        let saddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_SADDR)?;
        let addr = checksum::Delta::default().word(p.saddr.v4_raw(), r.frontend_addr.v4_raw());
        unsafe {
            check.write_unaligned(addr.apply(check.read_unaligned()));
            saddr.write_unaligned(r.frontend_addr.v4_raw());
        }
    }
    count(Counter::RepliesTc);
    Ok(TC_ACT_OK)
}

/// The source port of a local backend's reply (a whole datagram or a first fragment), with the L4
/// checksum for it and for the source address the caller writes.
#[inline(always)]
fn tc_reply_ports(ctx: &TcContext, p: &Packet, r: &Reply) -> Result<(), ()> {
    // The L4 checksum through the helpers: they also handle CHECKSUM_PARTIAL skbs (a local
    // sender's, with offload), which a plain incremental update would corrupt.
    let (check_off, mangled) = if p.proto == PROTO_TCP {
        (TCP_CHECK, 0)
    } else {
        (UDP_CHECK, BPF_F_MARK_MANGLED_0 as u64)
    };
    let csum = p.l4_off + check_off;
    // The source address (in the pseudo-header) as one difference, whatever the family (size 0:
    // a precomputed difference); the port separately, as it is not in the partial sum.
    let addr = checksum::Delta::default();
    let addr = if p.v6 {
        addr.words(&p.saddr.0, &r.frontend_addr.0)
    } else {
        addr.word(p.saddr.v4_raw(), r.frontend_addr.v4_raw())
    };
    ctx.l4_csum_replace(
        csum,
        0,
        addr.wsum() as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(csum, p.sport as u64, r.frontend_port as u64, mangled | 2)
        .map_err(|_| ())?;
    // The helpers moved the packet's pointers: find the field again.
    let port: *mut u16 = ptr_at(ctx, p.l4_off)?;
    unsafe { port.write_unaligned(r.frontend_port) };
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
