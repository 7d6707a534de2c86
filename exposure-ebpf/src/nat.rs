//! Address/port translation with incremental IPv4 and TCP/UDP checksum updates.

use aya_ebpf::programs::XdpContext;
use exposure_common::{checksum, PROTO_TCP};

use crate::parse::*;

/// The 4-tuple a packet should carry after translation.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
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

/// Rewrites the packet's addresses and ports to `to`; fields that don't change cost nothing.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, p: &Packet, to: &Tuple) -> Result<(), ()> {
    let ip_check: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CHECK)?;
    let saddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_SADDR)?;
    let daddr: *mut u32 = ptr_at(ctx, ETH_LEN + IP_DADDR)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4_off)?;
    let l4_check: *mut u16 = if p.proto == PROTO_TCP {
        ptr_at(ctx, p.l4_off + TCP_CHECK)?
    } else {
        ptr_at(ctx, p.l4_off + UDP_CHECK)?
    };

    let mut c = load(ip_check);
    c = checksum::replace4(c, p.saddr, to.saddr);
    c = checksum::replace4(c, p.daddr, to.daddr);
    store(ip_check, c);

    let mut c = load(l4_check);
    if p.proto == PROTO_TCP {
        c = checksum::replace4(c, p.saddr, to.saddr);
        c = checksum::replace4(c, p.daddr, to.daddr);
        c = checksum::replace2(c, p.sport, to.sport);
        c = checksum::replace2(c, p.dport, to.dport);
    } else {
        c = checksum::udp_replace4(c, p.saddr, to.saddr);
        c = checksum::udp_replace4(c, p.daddr, to.daddr);
        c = checksum::udp_replace2(c, p.sport, to.sport);
        c = checksum::udp_replace2(c, p.dport, to.dport);
    }
    store(l4_check, c);

    store(saddr, to.saddr);
    store(daddr, to.daddr);
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
