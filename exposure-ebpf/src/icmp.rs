//! ICMP and ICMPv6 errors about translated flows (destination unreachable incl. fragmentation
//! needed / packet too big, time exceeded, parameter problem) travel back to the client translated like the flow's replies, as
//! conntrack does for RELATED packets: path MTU discovery and port-unreachable reach the client.
//!
//! The quoted packet is the one the backend side saw (our translated one), so its reversed 5-tuple
//! is the key of the flow's `REPLIES4`/`REPLIES6` entry.

use exposure_common::{checksum, Addr, FlowKey, Reply, PROTO_TCP, PROTO_UDP};

use crate::parse::IP_CHECK;

/// ICMP types that quote the packet they are about.
pub fn is_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 11 | 12)
}

/// Offsets inside an ICMP error: the quoted IPv4 header (no options) and its first 8 L4 bytes.
pub const QUOTE_IP: usize = 8;
pub const QUOTE_L4: usize = QUOTE_IP + 20;
/// Bytes we read and rewrite: ICMP header + quoted IP header + quoted ports and UDP checksum.
pub const SPAN: usize = QUOTE_L4 + 8;

/// The reply-direction key of the flow a quoted packet belongs to.
#[inline(always)]
pub fn quoted_flow(icmp: &[u8; SPAN]) -> Option<FlowKey> {
    let ip = &icmp[QUOTE_IP..QUOTE_L4];
    if ip[0] != 0x45 {
        return None; // options in the quote: leave it to the kernel
    }
    let proto = ip[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // A later fragment's quote has payload where ports would be (RFC 1122 forbids such errors).
    if ip[6] & 0x1f != 0 || ip[7] != 0 {
        return None;
    }
    let l4 = &icmp[QUOTE_L4..SPAN];
    Some(FlowKey {
        // The quoted packet went towards the backend; its reply comes from there.
        saddr: Addr::v4(u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]])),
        daddr: Addr::v4(u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]])),
        sport: u16::from_ne_bytes([l4[2], l4[3]]),
        dport: u16::from_ne_bytes([l4[0], l4[1]]),
        proto,
        _pad: [0; 3],
    })
}

#[inline(always)]
fn word(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn put(b: &mut [u8], at: usize, v: u16) {
    let v = v.to_ne_bytes();
    b[at] = v[0];
    b[at + 1] = v[1];
}

#[inline(always)]
fn put4(b: &mut [u8], at: usize, v: u32) {
    let v = v.to_ne_bytes();
    b[at..at + 4].copy_from_slice(&v);
}

/// Rewrites the quote so it shows the client's packet to the frontend, fixing the quoted IP and UDP
/// checksums and the ICMP checksum incrementally. `icmp` holds the first `SPAN` bytes.
#[inline(always)]
pub fn translate_quote(icmp: &mut [u8; SPAN], r: &Reply) {
    let (client_addr, frontend_addr) = (r.client_addr.v4_raw(), r.frontend_addr.v4_raw());
    let old_src = u32::from_ne_bytes([
        icmp[QUOTE_IP + 12],
        icmp[QUOTE_IP + 13],
        icmp[QUOTE_IP + 14],
        icmp[QUOTE_IP + 15],
    ]);
    let old_dst = u32::from_ne_bytes([
        icmp[QUOTE_IP + 16],
        icmp[QUOTE_IP + 17],
        icmp[QUOTE_IP + 18],
        icmp[QUOTE_IP + 19],
    ]);
    let old_sport = word(icmp, QUOTE_L4);
    let old_dport = word(icmp, QUOTE_L4 + 2);
    let old_ip_check = word(icmp, QUOTE_IP + IP_CHECK);
    let udp = icmp[QUOTE_IP + 9] == PROTO_UDP;
    let old_udp_check = word(icmp, QUOTE_L4 + 6);

    let ip_check = checksum::replace4(
        checksum::replace4(old_ip_check, old_src, client_addr),
        old_dst,
        frontend_addr,
    );
    let mut udp_check = old_udp_check;
    if udp {
        udp_check = checksum::udp_replace4(udp_check, old_src, client_addr);
        udp_check = checksum::udp_replace4(udp_check, old_dst, frontend_addr);
        udp_check = checksum::udp_replace2(udp_check, old_sport, r.client_port);
        udp_check = checksum::udp_replace2(udp_check, old_dport, r.frontend_port);
    }
    // The ICMP checksum covers every quoted byte we change (and no pseudo-header).
    let mut c = word(icmp, 2);
    c = checksum::replace4(c, old_src, client_addr);
    c = checksum::replace4(c, old_dst, frontend_addr);
    c = checksum::replace2(c, old_sport, r.client_port);
    c = checksum::replace2(c, old_dport, r.frontend_port);
    c = checksum::replace2(c, old_ip_check, ip_check);
    if udp {
        c = checksum::replace2(c, old_udp_check, udp_check);
    }

    put4(icmp, QUOTE_IP + 12, client_addr);
    put4(icmp, QUOTE_IP + 16, frontend_addr);
    put(icmp, QUOTE_L4, r.client_port);
    put(icmp, QUOTE_L4 + 2, r.frontend_port);
    put(icmp, QUOTE_IP + IP_CHECK, ip_check);
    if udp {
        put(icmp, QUOTE_L4 + 6, udp_check);
    }
    put(icmp, 2, c);
}

/// ICMPv6 types that quote the packet they are about (destination unreachable, packet too big, time
/// exceeded, parameter problem). Informational ones, neighbour discovery among them, are not ours.
pub fn is_error6(icmp_type: u8) -> bool {
    matches!(icmp_type, 1..=4)
}

/// Offsets inside an ICMPv6 error: the quoted IPv6 header and its first 8 L4 bytes.
pub const QUOTE6_IP: usize = 8;
pub const QUOTE6_L4: usize = QUOTE6_IP + 40;
pub const SPAN6: usize = QUOTE6_L4 + 8;

#[inline(always)]
fn addr_at(b: &[u8], at: usize) -> Addr {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Addr([w(at), w(at + 4), w(at + 8), w(at + 12)])
}

#[inline(always)]
fn put16(b: &mut [u8], at: usize, a: &Addr) {
    for (i, w) in a.0.iter().enumerate() {
        put4(b, at + i * 4, *w);
    }
}

/// [`quoted_flow`] for ICMPv6 (a quote with extension headers is left to the kernel).
#[inline(always)]
pub fn quoted_flow6(icmp: &[u8; SPAN6]) -> Option<FlowKey> {
    let ip = &icmp[QUOTE6_IP..QUOTE6_L4];
    if ip[0] >> 4 != 6 {
        return None;
    }
    let proto = ip[6];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = &icmp[QUOTE6_L4..SPAN6];
    Some(FlowKey {
        saddr: addr_at(ip, 24),
        daddr: addr_at(ip, 8),
        sport: u16::from_ne_bytes([l4[2], l4[3]]),
        dport: u16::from_ne_bytes([l4[0], l4[1]]),
        proto,
        _pad: [0; 3],
    })
}

/// [`translate_quote`] for ICMPv6: the quote shows the client's packet to the frontend, with the
/// quoted UDP checksum and the ICMPv6 checksum updated. The ICMPv6 checksum also covers the outer
/// addresses (pseudo-header): the caller adds their change.
#[inline(always)]
pub fn translate_quote6(icmp: &mut [u8; SPAN6], r: &Reply) {
    let old_src = addr_at(icmp, QUOTE6_IP + 8);
    let old_dst = addr_at(icmp, QUOTE6_IP + 24);
    let old_sport = word(icmp, QUOTE6_L4);
    let old_dport = word(icmp, QUOTE6_L4 + 2);
    let udp = icmp[QUOTE6_IP + 6] == PROTO_UDP;
    let old_udp_check = word(icmp, QUOTE6_L4 + 6);

    let mut udp_check = old_udp_check;
    if udp {
        udp_check = checksum::udp_replace16(udp_check, &old_src.0, &r.client_addr.0);
        udp_check = checksum::udp_replace16(udp_check, &old_dst.0, &r.frontend_addr.0);
        udp_check = checksum::udp_replace2(udp_check, old_sport, r.client_port);
        udp_check = checksum::udp_replace2(udp_check, old_dport, r.frontend_port);
    }
    let mut c = word(icmp, 2);
    c = checksum::replace16(c, &old_src.0, &r.client_addr.0);
    c = checksum::replace16(c, &old_dst.0, &r.frontend_addr.0);
    c = checksum::replace2(c, old_sport, r.client_port);
    c = checksum::replace2(c, old_dport, r.frontend_port);
    if udp {
        c = checksum::replace2(c, old_udp_check, udp_check);
        put(icmp, QUOTE6_L4 + 6, udp_check);
    }
    put16(icmp, QUOTE6_IP + 8, &r.client_addr);
    put16(icmp, QUOTE6_IP + 24, &r.frontend_addr);
    put(icmp, QUOTE6_L4, r.client_port);
    put(icmp, QUOTE6_L4 + 2, r.frontend_port);
    put(icmp, 2, c);
}

/// Adds an outer address change to the ICMPv6 checksum held in `icmp[2..4]`.
#[inline(always)]
pub fn outer_address_changed6(icmp: &mut [u8; SPAN6], old: &Addr, new: &Addr) {
    let c = checksum::replace16(word(icmp, 2), &old.0, &new.0);
    put(icmp, 2, c);
}
