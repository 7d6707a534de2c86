//! Sending translated frames back out: FIB lookup for new remote flows, XDP_TX/redirect.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};

use exposure_common::Counter;

use crate::maps::{count, NEIGH_MISSES};

const AF_INET: u8 = 2;

pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Where the kernel's routing table would send a packet to `daddr` (needs a resolved neighbour).
#[inline(always)]
pub fn next_hop(ctx: &XdpContext, daddr: u32, proto: u8, tot_len: u16) -> Option<NextHop> {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The FIB filled in the next hop; leave it for the agent to resolve.
        let gateway = unsafe { params.__bindgen_anon_4.ipv4_dst };
        let _ = NEIGH_MISSES.insert(&gateway, &params.ifindex, BPF_ANY as u64);
        count(Counter::NeighborMissing);
        aya_log_ebpf::warn!(
            ctx,
            "no neighbour entry for next hop {:i}; asking the agent",
            u32::from_be(gateway)
        );
        return None;
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        count(Counter::FibFailed);
        aya_log_ebpf::warn!(
            ctx,
            "no route to backend {:i} (fib lookup {})",
            u32::from_be(daddr),
            rc
        );
        return None;
    }
    Some(NextHop {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// Transmits the (already rewritten) frame on `ifindex`.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}
