//! ICMP (ICMPv6) errors the datapath answers a packet with, quoting it: port unreachable for flows
//! to a Service without endpoints, as kube-proxy's REJECT does (Linux turns it into ECONNREFUSED
//! for TCP and UDP sockets alike), and fragmentation needed (packet too big) for packets that do
//! not fit the interface they are to leave by.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use exposure_common::{checksum, PROTO_TCP};

use crate::{
    nat::{left_to_device, store_addr6},
    parse::*,
};

const IP_ICMP_LEN: usize = 28;
const ICMP_OFF: usize = ETH_LEN + IPV4_MIN_LEN;
/// ICMP header + the largest quote (60-byte IP header + a 20-byte TCP header), in 32-bit words.
const MAX_ICMP_WORDS: usize = (8 + 60 + 20) / 4;

/// How much of the L4 header a quote holds: 8 bytes (the ports), as RFC 792 asks; when the skb
/// asks for its checksum to be completed (generic XDP, a sender on this host: see
/// [`settle_quoted_check`]), up to and with the checksum field (the whole 20-byte TCP header; UDP's
/// 8 bytes hold it). Branch-free, so the verifier walks what follows once, with a range.
#[inline(always)]
fn l4_quote_len(settles: bool, p: &Packet) -> usize {
    8 + 12 * (settles & (p.proto == PROTO_TCP)) as usize
}

/// In generic XDP the skb of a sender on this host keeps asking for its checksum to be completed
/// at its L4 header, which is now inside the quote: the device (or the kernel) will sum from there
/// to the end and write the result into the checksum field. The field gets the value that sum
/// writes back ([`checksum::self_completing`]), so the message stays as sent and its own
/// checksum right. `off`: the quoted L4 header, which ends the frame ([`l4_quote_len`] bytes).
#[inline(always)]
fn settle_quoted_check(ctx: &XdpContext, settles: bool, off: usize, tcp: bool) {
    // Called either way, the choice made inside: a branch here would double what follows.
    exposure_settle_quoted_check(ctx.ctx, settles as u64, off as u64, tcp as u64);
}

/// [`settle_quoted_check`] as a global function: the verifier checks it once, on its own, not
/// for every way a packet reaches a refusal.
#[no_mangle]
#[inline(never)]
pub extern "C" fn exposure_settle_quoted_check(
    ctx: *mut xdp_md,
    settles: u64,
    off: u64,
    tcp: u64,
) -> i32 {
    if settles == 0 {
        return 0;
    }
    let ctx = &XdpContext::new(ctx);
    // A bound the verifier can see (a global function knows nothing of its arguments).
    let off = off as usize & 0x1ff;
    let (field, len) = if tcp != 0 {
        (TCP_CHECK, 20)
    } else {
        (UDP_CHECK, 8)
    };
    let Ok(check) = ptr_at::<u16, _>(ctx, off + field) else {
        return 0;
    };
    unsafe { check.write_unaligned(0) };
    let Ok(rest) = sum_words::<{ 20 / 4 }>(ctx, off, len) else {
        return 0;
    };
    unsafe { check.write_unaligned(checksum::self_completing(rest as u16)) };
    1
}

/// Makes room for a new IP + ICMP header in front of the received packet's own IP header (which
/// becomes the quote, already in place), trims the frame to `len` bytes, and addresses the Ethernet
/// header back to the sender: `[headroom][old Ethernet][old IP + L4]` becomes
/// `[Ethernet][new IP][ICMP][quote]`.
#[inline(always)]
fn reshape(ctx: &XdpContext, headroom: usize, len: usize, ether_type: u16) -> Result<(), ()> {
    let eth: *const [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    let [node_mac, client_mac] = unsafe { *eth };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(headroom as i32)) } != 0 {
        return Err(());
    }
    let have = ctx.data_end() - ctx.data();
    if have < len {
        return Err(());
    }
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - have as i32) } != 0 {
        return Err(());
    }
    let eth: *mut [[u8; 6]; 2] = ptr_at(ctx, 0)?;
    unsafe { eth.write_unaligned([client_mac, node_mac]) };
    let ty: *mut [u8; 2] = ptr_at(ctx, 12)?;
    unsafe { ty.write_unaligned(ether_type.to_be_bytes()) };
    Ok(())
}

/// Turns the frame into an ICMP port unreachable quoting it, addressed back to its sender.
#[inline(always)]
pub fn port_unreachable(ctx: &XdpContext, p: &Packet) -> u32 {
    // Type 3 (destination unreachable), code 3 (port unreachable).
    icmp_error(ctx, p, [3, 3, 0, 0, 0, 0, 0, 0])
}

/// Turns the frame into an ICMP fragmentation needed (type 3, code 4) with the next hop's `mtu`.
#[inline(always)]
pub fn fragmentation_needed(ctx: &XdpContext, p: &Packet, mtu: u32) -> u32 {
    let [hi, lo] = (mtu.min(u16::MAX as u32) as u16).to_be_bytes();
    icmp_error(ctx, p, [3, 4, 0, 0, 0, 0, hi, lo])
}

/// Turns the frame into the ICMP error whose header (checksum zero) is `head`, quoting the frame,
/// addressed back to its sender: XDP_TX, or XDP_DROP if the frame could not be reshaped. Returns
/// the verdict itself, not a `Result`: that would come back through memory, and whatever stack
/// pointer r0 held at the exit would fail the verifier ("cannot return stack pointer").
#[inline(never)]
fn icmp_error(ctx: &XdpContext, p: &Packet, head: [u8; 8]) -> u32 {
    write_icmp_error(&own_ctx(ctx), p, head).unwrap_or(xdp_action::XDP_DROP)
}

#[inline(always)]
fn write_icmp_error(ctx: &XdpContext, p: &Packet, head: [u8; 8]) -> Result<u32, ()> {
    let settles = left_to_device(ctx, p);
    let l4_len = l4_quote_len(settles, p);
    let quoted = p.l4_off - ETH_LEN + l4_len;
    reshape(ctx, IP_ICMP_LEN, ICMP_OFF + 8 + quoted, ETH_P_IP)?;

    let tot_len = ((IPV4_MIN_LEN + 8 + quoted) as u16).to_be_bytes();
    let s = p.daddr.v4_raw().to_ne_bytes();
    let d = p.saddr.v4_raw().to_ne_bytes();
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

    let icmp: *mut [u8; 8] = ptr_at(ctx, ICMP_OFF)?;
    unsafe { icmp.write_unaligned(head) };
    let l4_at = ICMP_OFF + 8 + (p.l4_off - ETH_LEN);
    settle_quoted_check(ctx, settles, l4_at, p.proto == PROTO_TCP);
    let sum = sum_words::<MAX_ICMP_WORDS>(ctx, ICMP_OFF, 8 + quoted)?;
    let check: *mut u16 = ptr_at(ctx, ICMP_OFF + 2)?;
    unsafe { check.write_unaligned(!checksum::fold(sum)) };
    Ok(xdp_action::XDP_TX)
}

/// IPv6 header + ICMPv6 header.
const IP6_ICMP6_LEN: usize = IPV6_LEN + 8;
const ICMP6_OFF: usize = ETH_LEN + IPV6_LEN;
/// The longest quote: the fixed header, the extension headers and 8 bytes after them, up to this
/// (cut there: its sender may then not match it to a socket, as with any quote too short).
const MAX_QUOTE6_LEN: usize = 256;
/// ICMPv6 header + the longest quote, in 32-bit words.
const MAX_ICMP6_WORDS: usize = (8 + MAX_QUOTE6_LEN) / 4;

/// [`port_unreachable`] for IPv6: ICMPv6 destination unreachable, code 4 (port unreachable).
#[inline(always)]
pub fn port_unreachable6(ctx: &XdpContext, p: &Packet) -> u32 {
    icmp6_error(ctx, p, [1, 4, 0, 0, 0, 0, 0, 0])
}

/// [`fragmentation_needed`] for IPv6: ICMPv6 packet too big (type 2) with the next hop's `mtu`.
#[inline(always)]
pub fn packet_too_big6(ctx: &XdpContext, p: &Packet, mtu: u32) -> u32 {
    let [a, b, c, d] = mtu.to_be_bytes();
    icmp6_error(ctx, p, [2, 0, 0, 0, a, b, c, d])
}

/// [`icmp_error`] for IPv6: the ICMPv6 message whose header (checksum zero) is `head`.
#[inline(never)]
fn icmp6_error(ctx: &XdpContext, p: &Packet, head: [u8; 8]) -> u32 {
    write_icmp6_error(&own_ctx(ctx), p, head).unwrap_or(xdp_action::XDP_DROP)
}

#[inline(always)]
fn write_icmp6_error(ctx: &XdpContext, p: &Packet, head: [u8; 8]) -> Result<u32, ()> {
    // Up to the first 8 bytes after the headers: the ports, after extension and fragment headers.
    let settles = left_to_device(ctx, p);
    let l4_len = l4_quote_len(settles, p);
    let quoted = (p.l4_off - ETH_LEN + l4_len).min(MAX_QUOTE6_LEN);
    reshape(ctx, IP6_ICMP6_LEN, ICMP6_OFF + 8 + quoted, ETH_P_IPV6)?;

    let payload_len = ((8 + quoted) as u16).to_be_bytes();
    let ip_head: *mut [u8; 8] = ptr_at(ctx, ETH_LEN)?;
    unsafe {
        ip_head.write_unaligned([
            0x60,
            0,
            0,
            0,
            payload_len[0],
            payload_len[1],
            IPPROTO_ICMPV6,
            64,
        ])
    };
    let saddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_SADDR)?;
    let daddr: *mut [u32; 4] = ptr_at(ctx, ETH_LEN + IP6_DADDR)?;
    store_addr6(saddr, &p.daddr.0);
    store_addr6(daddr, &p.saddr.0);

    let icmp: *mut [u8; 8] = ptr_at(ctx, ICMP6_OFF)?;
    unsafe { icmp.write_unaligned(head) };
    // A quote cut before the L4 header's end leaves the field to the kernel (which drops it).
    let whole = p.l4_off - ETH_LEN + l4_len <= MAX_QUOTE6_LEN;
    let l4_at = ICMP6_OFF + 8 + (p.l4_off - ETH_LEN);
    settle_quoted_check(ctx, settles & whole, l4_at, p.proto == PROTO_TCP);
    // The pseudo-header's length and next header, then its addresses and the message: both in
    // the frame, one after the other.
    let mut sum = u16::from_ne_bytes(payload_len) as u32;
    sum += u16::from_ne_bytes([0, IPPROTO_ICMPV6]) as u32;
    sum += sum_words::<{ 8 + MAX_ICMP6_WORDS }>(ctx, ETH_LEN + IP6_SADDR, 32 + 8 + quoted)?;
    let check: *mut u16 = ptr_at(ctx, ICMP6_OFF + 2)?;
    unsafe { check.write_unaligned(!checksum::fold(sum)) };
    Ok(xdp_action::XDP_TX)
}

/// The one's complement sum of the `len` bytes (a multiple of 4, at most `MAX_WORDS` 32-bit
/// words) at `off`, folded to 16 bits. Whole words: half the loads and iterations of 16-bit ones
/// (the verifier walks each), and the same sum.
#[inline(always)]
fn sum_words<const MAX_WORDS: usize>(ctx: &XdpContext, off: usize, len: usize) -> Result<u32, ()> {
    let mut sum = 0u64;
    for i in 0..MAX_WORDS {
        if i * 4 >= len {
            break;
        }
        let w: *const u32 = ptr_at(ctx, off + i * 4)?;
        sum += unsafe { w.read_unaligned() } as u64;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    Ok(checksum::fold(sum as u32) as u32)
}
