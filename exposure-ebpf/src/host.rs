//! The node's own connections on ports whose packets XDP takes: held at tc egress so their
//! replies stay the kernel's.

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use exposure_common::*;

use crate::{
    client_key, maps::*, now_ns, parse::Packet, reply_key, reversed_key, touch, ConnState,
};

/// A packet of the node's own connection (a socket bound there, or a connection the kernel NATed
/// there: kube-proxy's masquerade picks source ports at random) leaving from a tuple whose
/// packets XDP takes: the SNAT address and a SNAT port (its replies would go to a SNATed flow's
/// client), or a frontend's address and port (they would be a new flow to a backend: a NodePort
/// on any of the node's addresses, an externalIP or LoadBalancer IP the node has). Its tuple back
/// is held for the connection, so XDP leaves its packets to the kernel, and SNAT gives no flow
/// that tuple.
#[inline(always)]
pub fn host_connection(ctx: &TcContext, p: &Packet) -> Result<i32, ()> {
    let sport = port_host(p.sport);
    let snat = is_snat_port(sport);
    if snat {
        if !is_node_addr(unsafe { (*ctx.skb.skb).ifindex }, &p.saddr) {
            return Ok(TC_ACT_UNSPEC);
        }
    } else if !is_frontend_port(sport)
        || lookup_frontend(&p.saddr, p.sport, p.proto, SCOPE_EXTERNAL).is_none()
    {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = reversed_key(p);
    let now = now_ns();
    let came_in_by = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let held = if snat {
        hold_for_host(p, lookup_reply(&key), came_in_by, now, |taken| {
            // The closing flow whose reply entry this was goes too (unless its client has
            // started another since): its client's stragglers start a new flow rather than reach
            // the peer as part of this connection.
            if let Some(reply) = taken {
                let client = client_key(reply, p.proto);
                let replies_here =
                    |f: &Flow| reply_key(&client.saddr, client.sport, p.proto, f) == key;
                if lookup_flow(&client).is_some_and(|f| replies_here(unsafe { &*f })) {
                    remove_flow(&client);
                }
            }
            insert_reply(&key, &host_entry::<Reply>(p, now), BPF_ANY as u64)
        })
    } else {
        hold_for_host(p, lookup_flow(&key), came_in_by, now, |taken| {
            // Likewise its backend's stragglers, unless its SNAT port serves another flow now.
            if let Some(flow) = taken {
                let rk = reply_key(&key.saddr, key.sport, p.proto, flow);
                let of_this_flow = |r: &Reply| client_key(r, p.proto) == key;
                if lookup_reply(&rk).is_some_and(|r| of_this_flow(unsafe { &*r })) {
                    remove_reply(&rk);
                }
            }
            insert_flow(&key, &host_entry::<Flow>(p, now), BPF_ANY as u64)
        })
    };
    if held {
        Ok(TC_ACT_UNSPEC)
    } else {
        count(Counter::HostCollision);
        Ok(TC_ACT_SHOT)
    }
}

/// Holds the tuple of `held` (the entry there, if any) for the node's connection that `p` is a
/// packet of; `take` writes the host's entry, given the flow's entry it replaces, if any. False
/// when an open flow holds the tuple. A packet that came in (`came_in_by`; the node's own came
/// in by none) by the interface the flow's own packets come in by is the flow's, translated by
/// XDP and sent by tc ingress (a remote flow through a tunnel, a reply from generic XDP): it goes
/// on, and holds nothing.
#[inline(always)]
fn hold_for_host<E: ConnState + Default>(
    p: &Packet,
    held: Option<*mut E>,
    came_in_by: u32,
    now: u64,
    take: impl FnOnce(Option<&E>) -> Result<(), ()>,
) -> bool {
    if let Some(e) = held.map(|e| unsafe { &mut *e }) {
        let flow = *e.state().0 & FLOW_HOST == 0;
        if flow && came_in_by != 0 && e.comes_in_by() == came_in_by {
            return true;
        }
    }
    let state = held.map(|e| {
        let (flags, last_seen) = unsafe { (*e).state() };
        (*flags, *last_seen)
    });
    match (
        host_claim(p.proto, p.tcp_flags, state, now, &LoadedLifetimes),
        held,
    ) {
        (HostClaim::Collision, _) => false,
        (HostClaim::Refresh, Some(entry)) => {
            touch(entry, || None::<*mut E>, p, true, now);
            true
        }
        (_, held) => {
            let flows = state.is_some_and(|(flags, _)| flags & FLOW_HOST == 0);
            let _ = take(held.filter(|_| flows).map(|e| unsafe { &*e }));
            true
        }
    }
}

/// A new entry held for the node's connection `p` is a packet of.
#[inline(always)]
fn host_entry<E: ConnState + Default>(p: &Packet, now: u64) -> E {
    let mut entry = E::default();
    let (flags, last_seen) = entry.state();
    *flags = FLOW_HOST | FLOW_OPENING | conn_bits(p.proto, p.tcp_flags, true, 0);
    *last_seen = now;
    entry
}
