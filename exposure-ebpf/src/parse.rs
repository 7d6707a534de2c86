//! Bounds-checked packet access and the header offsets we use.

use aya_ebpf::{
    bindings::BPF_ANY,
    programs::{TcContext, XdpContext},
};
use exposure_common::{Addr, FragmentKey, FragmentPorts, PROTO_TCP, PROTO_UDP};

use crate::{icmp, maps::FRAGMENTS};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV6_LEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// Hop-by-hop, destination options and routing headers skipped before the rest (Cilium's
/// `IPV6_MAX_HEADERS`); a packet with more is the kernel's.
const IPV6_MAX_EXT_HEADERS: usize = 4;
pub const IPV6_FRAG_HDR_LEN: usize = 8;
/// Byte offsets inside the IPv6 header.
pub const IP6_SADDR: usize = 8;
pub const IP6_DADDR: usize = 24;
pub const IPV4_MIN_LEN: usize = 20;
pub const IPPROTO_ICMP: u8 = 1;
/// Byte offsets inside the IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_ID: usize = 4;
pub const IP_FRAG_OFF: usize = 6;
pub const IP_PROTO: usize = 9;
pub const IP_CHECK: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Byte offsets inside TCP/UDP headers.
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

/// The context as a non-inlined function must see it. LLVM would otherwise pass such a function
/// the loaded `data`/`data_end` values instead of the context, and zero-extend them there: pointer
/// arithmetic the verifier rejects. A volatile read of the context pointer keeps it an argument.
#[inline(always)]
pub fn own_ctx(ctx: &XdpContext) -> XdpContext {
    XdpContext::new(unsafe { core::ptr::read_volatile(&ctx.ctx) })
}

/// A packet the program reads in place: an XDP frame, or the linear part of a tc program's skb.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the frame.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// What the datapath needs from an IPv4 or IPv6 TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l4_off: usize,
    pub v6: bool,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IP total length (IPv6: payload + fixed header), for the FIB's MTU check.
    pub ip_len: u16,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    /// A fragment after its datagram's first: no L4 header here (ports from [`FRAGMENTS`]), so
    /// only the IP header is translated.
    pub later_fragment: bool,
}

pub enum Parsed {
    /// Not TCP/UDP/ICMP over IPv4 or IPv6: not ours.
    Other,
    /// An ICMP message long enough to quote a packet's addresses and ports (by its IP header's
    /// length, not the frame's: bytes past it are no part of it); its header starts at this offset.
    Icmp(usize),
    /// [`Parsed::Icmp`] for ICMPv6.
    Icmp6(usize),
    /// A later fragment whose first was not seen (lost, reordered, or before the datapath was
    /// loaded), or an IPv6 fragment of something other than TCP/UDP: passed to the kernel untouched.
    Fragment,
    Packet(Packet),
}

/// Parses Ethernet + IPv4 (with options) or IPv6 + the TCP/UDP ports.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Parsed, ()> {
    let ether_type: *const u16 = ptr_at(ctx, 12)?;
    match u16::from_be(unsafe { *ether_type }) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_v4<C: Frame>(ctx: &C) -> Result<Parsed, ()> {
    let ip: *const [u8; IPV4_MIN_LEN] = ptr_at(ctx, ETH_LEN)?;
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 4 {
        return Err(());
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_LEN {
        return Err(());
    }
    let proto = ip[IP_PROTO];
    // Flags and fragment offset: MF or an offset make a fragment.
    let frag = u16::from_be_bytes([ip[IP_FRAG_OFF], ip[IP_FRAG_OFF + 1]]);
    if proto == IPPROTO_ICMP && frag & 0x3fff == 0 {
        let len = u16::from_be_bytes([ip[IP_TOT_LEN], ip[IP_TOT_LEN + 1]]) as usize;
        if len < ihl + icmp::SPAN {
            return Ok(Parsed::Other);
        }
        return Ok(Parsed::Icmp(ETH_LEN + ihl));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Parsed::Other);
    }
    let l4_off = ETH_LEN + ihl;
    let saddr = Addr::v4(u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]));
    let daddr = Addr::v4(u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]));
    let fragment = (frag & 0x3fff != 0).then(|| Fragment {
        id: u16::from_ne_bytes([ip[IP_ID], ip[IP_ID + 1]]) as u32,
        first: frag & 0x1fff == 0,
    });
    let Some((sport, dport, tcp_flags, later_fragment)) =
        l4_ports(ctx, l4_off, proto, &saddr, &daddr, fragment)?
    else {
        return Ok(Parsed::Fragment);
    };
    Ok(Parsed::Packet(Packet {
        l4_off,
        v6: false,
        proto,
        tcp_flags,
        ip_len: u16::from_be_bytes([ip[IP_TOT_LEN], ip[IP_TOT_LEN + 1]]),
        saddr,
        daddr,
        sport,
        dport,
        later_fragment,
    }))
}

/// IPv6 with TCP, UDP or ICMPv6 after the fixed header and up to four hop-by-hop, destination
/// options or routing headers (skipped and kept, as Cilium's `ipv6_hdrlen` does), then perhaps a
/// fragment header right before TCP/UDP. Anything else (AH, ESP, a routing header with segments
/// left: this node is a waypoint, not the destination) leaves the packet to the kernel.
#[inline(always)]
fn parse_v6<C: Frame>(ctx: &C) -> Result<Parsed, ()> {
    let ip: *const [u32; IPV6_LEN / 4] = ptr_at(ctx, ETH_LEN)?;
    let ip = unsafe { &*ip };
    let head = ip[0].to_ne_bytes();
    if head[0] >> 4 != 6 {
        return Err(());
    }
    let lens = ip[1].to_ne_bytes();
    let mut proto = lens[2];
    let mut l4_off = ETH_LEN + IPV6_LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        if proto != IPPROTO_HOPOPTS && proto != IPPROTO_DSTOPTS && proto != IPPROTO_ROUTING {
            break;
        }
        // Next header, length in 8-byte units after the first 8, [routing type, segments left].
        let hdr: *const [u8; 4] = ptr_at(ctx, l4_off)?;
        let hdr = unsafe { *hdr };
        if proto == IPPROTO_ROUTING && hdr[3] != 0 {
            return Ok(Parsed::Other);
        }
        proto = hdr[0];
        l4_off += (hdr[1] as usize + 1) * 8;
    }
    let mut fragment = None;
    if proto == IPPROTO_FRAGMENT {
        let hdr: *const [u8; IPV6_FRAG_HDR_LEN] = ptr_at(ctx, l4_off)?;
        let hdr = unsafe { &*hdr };
        proto = hdr[0];
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Ok(Parsed::Fragment);
        }
        l4_off += IPV6_FRAG_HDR_LEN;
        // Offset (13 bits, in 8-byte units) above two reserved bits and M (more fragments).
        let frag = u16::from_be_bytes([hdr[2], hdr[3]]);
        // An atomic fragment (offset 0, no more) is a whole datagram.
        if frag & 0xfff9 != 0 {
            fragment = Some(Fragment {
                id: u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
                first: frag & 0xfff8 == 0,
            });
        }
    }
    match proto {
        IPPROTO_ICMPV6 => {
            let end = ETH_LEN + IPV6_LEN + u16::from_be_bytes([lens[0], lens[1]]) as usize;
            if end < l4_off + icmp::SPAN6 {
                return Ok(Parsed::Other);
            }
            return Ok(Parsed::Icmp6(l4_off));
        }
        PROTO_TCP | PROTO_UDP => {}
        _ => return Ok(Parsed::Other),
    }
    let saddr = Addr([ip[2], ip[3], ip[4], ip[5]]);
    let daddr = Addr([ip[6], ip[7], ip[8], ip[9]]);
    let Some((sport, dport, tcp_flags, later_fragment)) =
        l4_ports(ctx, l4_off, proto, &saddr, &daddr, fragment)?
    else {
        return Ok(Parsed::Fragment);
    };
    Ok(Parsed::Packet(Packet {
        l4_off,
        v6: true,
        proto,
        tcp_flags,
        ip_len: u16::from_be_bytes([lens[0], lens[1]]).wrapping_add(IPV6_LEN as u16),
        saddr,
        daddr,
        sport,
        dport,
        later_fragment,
    }))
}

/// What a fragment's IP header says of it (IPv4: MF set or an offset; IPv6: a fragment header
/// that is not atomic).
#[derive(Clone, Copy)]
struct Fragment {
    /// The IP ID, as on the wire.
    id: u32,
    /// Offset 0: the fragment with the L4 header.
    first: bool,
}

/// Ports (wire order), TCP flags and whether the packet is a later fragment. A first fragment's
/// ports are remembered for its datagram's later fragments, which take them from there (and no
/// TCP flags: those are in the first). `None`: a later fragment whose first was not seen.
#[inline(always)]
fn l4_ports<C: Frame>(
    ctx: &C,
    l4_off: usize,
    proto: u8,
    saddr: &Addr,
    daddr: &Addr,
    fragment: Option<Fragment>,
) -> Result<Option<(u16, u16, u8, bool)>, ()> {
    let Some(fragment) = fragment else {
        let (sport, dport, tcp_flags) = ports(ctx, l4_off, proto)?;
        return Ok(Some((sport, dport, tcp_flags, false)));
    };
    let key = FragmentKey {
        saddr: *saddr,
        daddr: *daddr,
        id: fragment.id,
        proto,
        _pad: [0; 3],
    };
    if fragment.first {
        let (sport, dport, tcp_flags) = ports(ctx, l4_off, proto)?;
        // A failed insert only costs the later fragments their translation.
        let _ = FRAGMENTS.insert(&key, &FragmentPorts { sport, dport }, BPF_ANY as u64);
        return Ok(Some((sport, dport, tcp_flags, false)));
    }
    Ok(unsafe { FRAGMENTS.get(&key) }.map(|p| (p.sport, p.dport, 0, true)))
}

/// Ports (wire order) and TCP flags, once the whole L4 header is known to be in the frame.
#[inline(always)]
fn ports<C: Frame>(ctx: &C, l4_off: usize, proto: u8) -> Result<(u16, u16, u8), ()> {
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off)?;
    let ports = unsafe { *ports };
    let tcp_flags = if proto == PROTO_TCP {
        let hdr: *const [u8; 20] = ptr_at(ctx, l4_off)?;
        unsafe { (*hdr)[TCP_FLAGS] }
    } else {
        let _hdr: *const [u8; 8] = ptr_at(ctx, l4_off)?;
        0
    };
    Ok((ports[0], ports[1], tcp_flags))
}
