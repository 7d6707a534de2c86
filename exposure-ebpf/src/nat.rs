//! Address/port translation with incremental IPv4/IPv6 and TCP/UDP checksum updates.

use aya_ebpf::programs::XdpContext;
use exposure_common::{checksum::Delta, Addr, PROTO_TCP};

use crate::parse::*;

/// The 4-tuple a packet should carry after translation (same family as the packet). Addresses by
/// reference, usually into a map value: copies would cost stack, of which BPF has 512 bytes.
#[derive(Clone, Copy)]
pub struct Tuple<'a> {
    pub saddr: &'a Addr,
    pub daddr: &'a Addr,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn load<T: Copy>(p: *mut T) -> T {
    unsafe { p.read_unaligned() }
}

#[inline(always)]
fn store<T>(p: *mut T, v: T) {
    unsafe { p.write_unaligned(v) }
}

/// Rewrites the packet's addresses and ports to `to`, updating checksums incrementally. Not inlined:
/// the checksum arithmetic keeps many values live, and its spills would otherwise sit in the frame
/// of every caller, beside whatever else that caller calls.
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, p: &Packet, to: &Tuple<'_>) -> Result<(), ()> {
    let ctx = &own_ctx(ctx);
    // Every field's change is summed first and folded once per checksum.
    let addrs = if p.v6 {
        // No IP header checksum in IPv6; the pseudo-header's addresses are in the L4 checksum.
        let saddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_SADDR)?;
        let daddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_DADDR)?;
        store(saddr, to.saddr.0);
        store(daddr, to.daddr.0);
        Delta::default()
            .words(&p.saddr.0, &to.saddr.0)
            .words(&p.daddr.0, &to.daddr.0)
    } else {
        let ip_check: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK)?;
        let saddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_SADDR)?;
        let daddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_DADDR)?;
        let (new_s, new_d) = (to.saddr.v4_raw(), to.daddr.v4_raw());
        let addrs = Delta::default()
            .word(p.saddr.v4_raw(), new_s)
            .word(p.daddr.v4_raw(), new_d);
        store(ip_check, addrs.apply(load(ip_check)));
        store(saddr, new_s);
        store(daddr, new_d);
        addrs
    };
    // The ports and the L4 checksum (over the whole datagram) are in the first fragment only.
    if p.later_fragment {
        return Ok(());
    }
    // In the frame: the parser read the whole L4 header.
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4_off)?;
    let l4_check: *mut u16 = if p.proto == PROTO_TCP {
        ptr_at(ctx, p.l4_off + TCP_CHECK)?
    } else {
        ptr_at(ctx, p.l4_off + UDP_CHECK)?
    };
    let l4 = addrs.port(p.sport, to.sport).port(p.dport, to.dport);
    let c = load(l4_check);
    let c = if p.proto == PROTO_TCP {
        l4.apply(c)
    } else {
        l4.apply_udp(c)
    };
    store(l4_check, c);
    store(ports, [to.sport, to.dport]);
    Ok(())
}

/// Sets the Ethernet addresses for a frame we transmit ourselves.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    store(eth, [*dst, *src]);
    Ok(())
}
