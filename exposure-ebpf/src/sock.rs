//! Sockets of the node and of its pods to the node's frontends and to ClusterIPs. Their packets
//! never cross XDP on `--iface` (a connection to one of the node's addresses goes through
//! loopback, a pod's arrives on its veth, a ClusterIP is no node's), so, as Cilium's socket LB
//! does, cgroup hooks send them to a backend before any packet exists: connect (TCP, connected
//! UDP) and sendmsg (unconnected UDP) rewrite the destination; recvmsg and getpeername show the
//! frontend again, so the application sees the address it asked for; the socket's release
//! forgets it.

use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_set_retval,
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use exposure_common::*;

use crate::{
    maps::{count, lookup_frontend, BACKENDS, SERVICES, SOCKET_NETNS, SOCKET_PEERS},
    select::{select_backend, sticky_backend},
};

/// Set at load time: the cookie of the node's network namespace (the agent's). 0: unknown (the
/// kernel can't tell), and then no socket is translated.
#[no_mangle]
static NODE_NETNS_COOKIE: u64 = 0;

/// Set at load time: 1 when the sockets of every network namespace are translated (the node's
/// and its pods'; the hooks sit on the cgroup root, so they see them all), 0 when only the
/// node's and those in `SOCKET_NETNS` are.
#[no_mangle]
static ALL_NETNS: u8 = 0;

/// Set at load time: 1 when the kernel has `bpf_set_retval` (Linux 5.18). 0: a refused call
/// fails with EPERM, and the verifier, which knows this read-only value, never sees the helper
/// (older kernels would refuse to load a program that calls it).
#[no_mangle]
static SET_RETVAL: u8 = 0;

/// What a sock_addr hook returns to let the call go on.
const PROCEED: i32 = 1;
/// What it returns to fail the call, with the error `bpf_set_retval` gave (else EPERM).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn exposure_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn exposure_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn exposure_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, false);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn exposure_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, false);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn exposure_connect6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn exposure_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn exposure_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, true);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn exposure_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, true);
    PROCEED
}

/// A closing socket's pair goes with it, so `SOCKET_PEERS` holds about the live sockets: an LRU
/// that only fills evicts on every new connection (measured: ~0.7 µs per connection). An
/// unconnected UDP socket names no peer here; its pairs age out.
#[cgroup_sock(sock_release)]
pub fn exposure_sock_release(ctx: SockContext) -> i32 {
    forget_peer(&ctx);
    PROCEED
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
fn forget_peer(ctx: &SockContext) {
    if socket_netns(ctx.as_ptr()).is_none() {
        return;
    }
    let sk = ctx.sock;
    let port = unsafe { read_volatile(&(*sk).dst_port) };
    if port == 0 {
        return;
    }
    // Every field read up front: LLVM would merge per-family loads into one load at a computed
    // offset, and the verifier takes context fields at constant offsets only.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).dst_ip4),
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ],
        )
    };
    let backend = match family {
        AF_INET => Addr::v4(ip4),
        AF_INET6 => Addr(ip6),
        _ => return,
    };
    let key = SocketPeerKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend,
        port,
        _pad: [0; 3],
    };
    let _ = SOCKET_PEERS.remove(&key);
}

/// The network namespace of a hook's socket.
#[derive(Clone, Copy)]
struct SocketNetns {
    cookie: u64,
    /// The node's own (the agent's), rather than a pod's.
    of_node: bool,
}

/// The network namespace of a hook's socket, if its sockets are translated.
#[inline(always)]
fn socket_netns(ctx: *mut c_void) -> Option<SocketNetns> {
    let node = unsafe { read_volatile(&NODE_NETNS_COOKIE) };
    if node == 0 {
        return None;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx) };
    let of_node = cookie == node;
    let translated = of_node
        || unsafe { read_volatile(&ALL_NETNS) } != 0
        || unsafe { SOCKET_NETNS.get(&cookie) }.is_some();
    translated.then_some(SocketNetns { cookie, of_node })
}

/// A socket addressing a frontend is sent to one of its backends. A Service without any is left
/// alone (the node refuses it, as kube-proxy's REJECT does), but at a ClusterIP, which no node
/// holds, the call itself is refused.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(netns) = socket_netns(ctx.as_ptr()) else {
        return PROCEED;
    };
    let sa = ctx.sock_addr;
    let proto = unsafe { read_volatile(&(*sa).protocol) };
    if proto != PROTO_TCP as u32 && proto != PROTO_UDP as u32 {
        return PROCEED;
    }
    let frontend = user_addr(sa, v6);
    // 127.0.0.1:<nodePort> is the node's only: a pod's loopback is the pod's own.
    if !netns.of_node && frontend.is_v4_loopback() {
        return PROCEED;
    }
    let port = unsafe { read_volatile(&(*sa).user_port) } as u16;
    // An `externalTrafficPolicy: Local` Service has a twin for the sockets of the node and its
    // pods, with every endpoint of the cluster. ClusterIPs are in that scope too (in the
    // external one with `--external-cluster-ips`).
    let Some(fe) = lookup_frontend(&frontend, port, proto as u8, SCOPE_NODE_SOCKETS)
        .or_else(|| lookup_frontend(&frontend, port, proto as u8, SCOPE_EXTERNAL))
    else {
        // A port the ClusterIP's Service does not have.
        if lookup_frontend(&frontend, OTHER_PORTS, proto as u8, SCOPE_NODE_SOCKETS).is_some() {
            return refuse(ECONNREFUSED);
        }
        return PROCEED;
    };
    // A draining frontend's `NO_SERVICE` has no entry: as if there were no frontend.
    let Some(service) = SERVICES.get(fe.service_id).copied() else {
        return PROCEED;
    };
    // loadBalancerSourceRanges: a socket has no source address yet to check. A pod's is left to
    // the packet path, where the ranges apply; the node's own passes (a limit in the README).
    if !netns.of_node
        && fe.flags & FRONTEND_LOADBALANCER != 0
        && service.flags & SERVICE_SOURCE_RANGES != 0
    {
        return PROCEED;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A connection has no source port yet: the socket is the flow, so each socket gets its own
    // pick and keeps it (unconnected UDP comes through here per datagram).
    let hash = hash::mix(cookie as u32 ^ hash::mix((cookie >> 32) as u32));
    let selected = if service.affinity_timeout_s != 0 {
        // ClientIP affinity: a namespace is one client (its sockets have no source address yet).
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let client = Addr::of_netns(netns.cookie);
        sticky_backend(&client, fe.service_id, &service, hash, now)
    } else {
        select_backend(&service, hash)
    };
    let Some(backend) = selected.and_then(|id| BACKENDS.get(id)) else {
        if fe.flags & FRONTEND_CLUSTER_IP != 0 && service.backend_count == 0 {
            // Under Local policy with endpoints only elsewhere: kube-proxy drops such packets,
            // leaving the client to time out; "no route to host" says so at once.
            return refuse(if service.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
                EHOSTUNREACH
            } else {
                ECONNREFUSED
            });
        }
        return PROCEED;
    };
    if backend.addr.is_unspecified() || backend.addr.is_v4() != frontend.is_v4() {
        return PROCEED;
    }
    let key = SocketPeerKey {
        cookie,
        backend: backend.addr,
        port: backend.port,
        _pad: [0; 3],
    };
    let peer = SocketPeer {
        frontend,
        port,
        _pad: 0,
    };
    // Written only when new: unconnected UDP sends every datagram through here. Unremembered, the
    // application would see answers from an address it never sent to: leave such a socket alone.
    if unsafe { SOCKET_PEERS.get(&key) } != Some(&peer)
        && SOCKET_PEERS.insert(&key, &peer, BPF_ANY as u64).is_err()
    {
        return PROCEED;
    }
    set_user_addr(sa, v6, &backend.addr, backend.port);
    count(Counter::NodeSockets);
    PROCEED
}

/// A ClusterIP that cannot take the socket (no endpoints, or a port its Service does not have):
/// the call fails with `error`, as kube-proxy's REJECT answers. No node holds the address to
/// answer for it.
#[inline(always)]
fn refuse(error: i32) -> i32 {
    if unsafe { read_volatile(&SET_RETVAL) } != 0 {
        unsafe { bpf_set_retval(-error) };
    }
    count(Counter::NodeSocketsRefused);
    REFUSE
}

/// A socket sent to a backend sees the frontend it asked for as its peer.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext, v6: bool) {
    if socket_netns(ctx.as_ptr()).is_none() {
        return;
    }
    let sa = ctx.sock_addr;
    let key = SocketPeerKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: user_addr(sa, v6),
        port: unsafe { read_volatile(&(*sa).user_port) } as u16,
        _pad: [0; 3],
    };
    if let Some(peer) = unsafe { SOCKET_PEERS.get(&key) } {
        set_user_addr(sa, v6, &peer.frontend, peer.port);
    }
}

/// The address the call names. An IPv6 socket naming an IPv4 address (`::ffff:a.b.c.d`) gives
/// the IPv4 [`Addr`], so it finds IPv4 frontends.
#[inline(always)]
fn user_addr(sa: *const bpf_sock_addr, v6: bool) -> Addr {
    unsafe {
        if v6 {
            Addr([
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ])
        } else {
            Addr::v4(read_volatile(&(*sa).user_ip4))
        }
    }
}

/// The context's fields take 4-byte stores only; the port sits in the low half, in wire order.
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, v6: bool, addr: &Addr, port: u16) {
    unsafe {
        if v6 {
            write_volatile(&mut (*sa).user_ip6[0], addr.0[0]);
            write_volatile(&mut (*sa).user_ip6[1], addr.0[1]);
            write_volatile(&mut (*sa).user_ip6[2], addr.0[2]);
            write_volatile(&mut (*sa).user_ip6[3], addr.0[3]);
        } else {
            write_volatile(&mut (*sa).user_ip4, addr.v4_raw());
        }
        write_volatile(&mut (*sa).user_port, port as u32);
    }
}
