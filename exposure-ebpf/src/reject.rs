//! Refusing flows to a Service without endpoints: ICMP port unreachable, as kube-proxy's REJECT does
//! (Linux turns it into ECONNREFUSED for TCP and UDP sockets alike).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use exposure_common::checksum;

use crate::parse::*;

const IP_ICMP_LEN: usize = 28;
const ICMP_OFF: usize = ETH_LEN + IPV4_MIN_LEN;
/// ICMP header + the largest quote (60-byte IP header + 8 bytes), in 16-bit words.
const MAX_ICMP_WORDS: usize = (8 + 60 + 8) / 2;

/// Turns the frame into an ICMP port unreachable quoting it, addressed back to its sender.
#[inline(always)]
pub fn port_unreachable(ctx: &XdpContext, p: &Packet) -> Result<u32, ()> {
    let eth: *const [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    let [node_mac, client_mac] = unsafe { *eth };
    let quoted = p.l4_off - ETH_LEN + 8;

    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IP_ICMP_LEN as i32)) } != 0 {
        return Err(());
    }
    // Layout now: [28 free][old Ethernet][old IP header + L4...]: the quote is already in place.
    let want = ICMP_OFF + 8 + quoted;
    let have = ctx.data_end() - ctx.data();
    if have < want {
        return Err(());
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - have as i32) } != 0 {
        return Err(());
    }

    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    unsafe { eth.write_unaligned([client_mac, node_mac]) };
    let ether_type: *mut [u8; 2] = ptr_at(ctx, 12)?;
    unsafe { ether_type.write_unaligned(ETH_P_IP.to_be_bytes()) };

    let tot_len = ((IPV4_MIN_LEN + 8 + quoted) as u16).to_be_bytes();
    let s = p.daddr.to_ne_bytes();
    let d = p.saddr.to_ne_bytes();
    let mut ip: [u8; 20] = [
        0x45,
        0,
        tot_len[0],
        tot_len[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    let c = checksum::checksum(&ip).to_ne_bytes();
    ip[IP_CHECK] = c[0];
    ip[IP_CHECK + 1] = c[1];
    let ip_hdr: *mut [u8; 20] = ptr_at(ctx, ETH_LEN)?;
    unsafe { ip_hdr.write_unaligned(ip) };

    // Type 3 (destination unreachable), code 3 (port unreachable), checksum 0 while summing.
    let icmp: *mut [u8; 8] = ptr_at(ctx, ICMP_OFF)?;
    unsafe { icmp.write_unaligned([3, 3, 0, 0, 0, 0, 0, 0]) };
    let icmp_len = 8 + quoted;
    let mut sum = 0u32;
    for i in 0..MAX_ICMP_WORDS {
        if i * 2 >= icmp_len {
            break;
        }
        let w: *const u16 = ptr_at(ctx, ICMP_OFF + i * 2)?;
        sum += unsafe { w.read_unaligned() } as u32;
    }
    let check: *mut u16 = ptr_at(ctx, ICMP_OFF + 2)?;
    unsafe { check.write_unaligned(!checksum::fold(sum)) };
    Ok(xdp_action::XDP_TX)
}
