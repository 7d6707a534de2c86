//! Sending translated frames back out: FIB lookup for new remote flows, XDP_TX/redirect.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, xdp_md, BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_meta},
    programs::XdpContext,
    EbpfContext,
};

use exposure_common::{Addr, Counter, TcHandoff, XDP_MODE_NATIVE};

use crate::{
    maps::{count, xdp_metadata, xdp_mode, NEIGH_MISSES},
    nat::on_skb,
    parse::ETH_LEN,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Asks the kernel's FIB where a packet to `daddr` goes (the answer lands in `params`); the
/// `BPF_FIB_LKUP_RET_*` code.
#[inline(always)]
pub fn fib_query(
    ctx: &XdpContext,
    params: &mut bpf_fib_lookup,
    daddr: &Addr,
    proto: u8,
    tot_len: u16,
) -> i64 {
    *params = unsafe { core::mem::zeroed() };
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    if daddr.is_v4() {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = daddr.v4_raw();
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = daddr.0;
    }
    unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// Where the kernel's routing table would send a packet to `daddr` (needs a resolved neighbour).
/// No MTU check here: every packet of the flow gets one when it is sent ([`mtu_exceeded`]).
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    params: &mut bpf_fib_lookup,
    daddr: &Addr,
    proto: u8,
) -> Option<NextHop> {
    let v4 = daddr.is_v4();
    let rc = fib_query(ctx, params, daddr, proto, 0);
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The FIB filled in the next hop; leave it for the agent to resolve.
        let gateway = if v4 {
            Addr::v4(unsafe { params.__bindgen_anon_4.ipv4_dst })
        } else {
            Addr(unsafe { params.__bindgen_anon_4.ipv6_dst })
        };
        let _ = NEIGH_MISSES.insert(&gateway, &params.ifindex, BPF_ANY as u64);
        count(Counter::NeighborMissing);
        aya_log_ebpf::warn!(ctx, "no neighbour entry for a next hop; asking the agent");
        return None;
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        count(Counter::FibFailed);
        aya_log_ebpf::warn!(ctx, "no route to a backend (fib lookup {})", rc);
        return None;
    }
    Some(NextHop {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// `bpf_check_mtu`'s answer when the frame is longer than the interface takes.
const MTU_CHK_RET_FRAG_NEEDED: i64 = 1;

/// The MTU of interface `ifindex` when the frame, sent there, would not fit it. Only a frame that
/// leaves by another interface than it came in asks: one fits where it came from (a node on two
/// networks, say jumbo frames on one, is where a frame may not fit).
#[inline(always)]
pub fn mtu_exceeded(ctx: &XdpContext, ifindex: u32) -> Option<u32> {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return None;
    }
    // In: 0, "the frame's own length"; out: the interface's MTU.
    let mut mtu = 0u32;
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, 0) };
    (rc == MTU_CHK_RET_FRAG_NEEDED).then_some(mtu)
}

/// Whether the frame is longer than interface `ifindex` takes. Only an skb's GSO packet is (generic
/// XDP sees GRO's merged packets and a local sender's GSO ones), which the kernel's generic
/// redirect drops and its forwarding segments. A frame of Ethernet's usual size asks nothing.
#[inline(always)]
pub fn longer_than_mtu(ctx: &XdpContext, ifindex: u32) -> bool {
    if ctx.data_end() - ctx.data() <= ETH_LEN + 1500 {
        return false;
    }
    let mut mtu = 0u32;
    unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, 0) == MTU_CHK_RET_FRAG_NEEDED }
}

/// [`exposure_send_by`]: XDP hands the frame to tc ingress, which sends it as an skb.
pub const BY_TC: u32 = 1;
/// [`exposure_send_by`]: the frame may be a GSO packet, whose segments the kernel sizes when it
/// sends them: not measured whole against an MTU.
pub const UNMEASURED: u32 = 2;

/// How a translated frame leaves by interface `out` (bits): 0 when XDP sends it (XDP_TX back
/// where it came in; XDP_REDIRECT from native XDP to an interface the agent runs native XDP on, as
/// a driver takes redirected frames only then). Else [`BY_TC`]: to any other interface (a tunnel
/// device never takes them), and from generic XDP to another interface (its redirect drops GSO
/// packets, and a flow's packets keep one path), with [`UNMEASURED`] for a frame longer than
/// Ethernet's there. A global function: the verifier checks it once, and its callers get a value,
/// not paths.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exposure_send_by(ctx: *mut xdp_md, out: u32) -> u32 {
    let ctx = &XdpContext::new(ctx);
    if out == ctx.ingress_ifindex() as u32 {
        return 0;
    }
    if on_skb(ctx) {
        let long = ctx.data_end() - ctx.data() > ETH_LEN + 1500;
        return BY_TC | if long { UNMEASURED } else { 0 };
    }
    (xdp_mode(out) != XDP_MODE_NATIVE) as u32 * BY_TC
}

/// Whether every frame that interface `ifindex` may send fits interface `to` (its MTU is at least
/// as large). An error reads as "no".
#[inline(always)]
pub fn mtu_fits(ctx: &XdpContext, to: u32) -> bool {
    // Each call gives the interface's MTU; 0 in `from` is the frame's own interface.
    let (mut from_mtu, mut to_mtu) = (0u32, 0u32);
    unsafe {
        bpf_check_mtu(ctx.as_ptr(), 0, &mut from_mtu, 0, 0) >= 0
            && bpf_check_mtu(ctx.as_ptr(), to, &mut to_mtu, 0, 0) >= 0
            && to_mtu >= from_mtu
    }
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

/// Leaves where the frame goes in its metadata for tc ingress to act on (a [`TcHandoff`]): into
/// the pod behind `ifindex` (`HANDOFF_TO_POD`), or out of `ifindex` (`HANDOFF_OUT`,
/// `HANDOFF_AS_IS`). Err: the driver keeps no metadata, or has no room for it.
#[inline(always)]
pub fn hand_to_tc(ctx: &XdpContext, magic: u32, ifindex: u32) -> Result<(), ()> {
    const LEN: usize = core::mem::size_of::<TcHandoff>();
    if !xdp_metadata() {
        return Err(());
    }
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(LEN as i32)) } != 0 {
        return Err(());
    }
    let meta = ctx.metadata();
    if meta + LEN > ctx.data() {
        return Err(());
    }
    let handoff = meta as *mut TcHandoff;
    unsafe { handoff.write_unaligned(TcHandoff { magic, ifindex }) };
    Ok(())
}
