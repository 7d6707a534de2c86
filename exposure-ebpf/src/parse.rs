//! Bounds-checked packet access and the header offsets we use.

use aya_ebpf::programs::XdpContext;

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_LEN: usize = 20;
pub const IPPROTO_ICMP: u8 = 1;
/// Byte offsets inside the IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_FRAG_OFF: usize = 6;
pub const IP_PROTO: usize = 9;
pub const IP_CHECK: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Byte offsets inside TCP/UDP headers.
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// What the datapath needs from an IPv4 TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l4_off: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

pub enum Parsed {
    /// Not IPv4 TCP/UDP/ICMP: not ours.
    Other,
    /// An ICMP message; its header starts at this offset.
    Icmp(usize),
    /// A non-first or more-fragments IPv4 packet: passed to the kernel untouched.
    Fragment,
    Packet(Packet),
}

/// Parses Ethernet + IPv4 (with options) + the TCP/UDP ports.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, ()> {
    let ether_type: *const u16 = ptr_at(ctx, 12)?;
    if u16::from_be(unsafe { *ether_type }) != ETH_P_IP {
        return Ok(Parsed::Other);
    }
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
    if proto == IPPROTO_ICMP
        && u16::from_be_bytes([ip[IP_FRAG_OFF], ip[IP_FRAG_OFF + 1]]) & 0x3fff == 0
    {
        return Ok(Parsed::Icmp(ETH_LEN + ihl));
    }
    if proto != exposure_common::PROTO_TCP && proto != exposure_common::PROTO_UDP {
        return Ok(Parsed::Other);
    }
    // MF set or a fragment offset: only the first fragment has ports, so don't guess.
    if u16::from_be_bytes([ip[IP_FRAG_OFF], ip[IP_FRAG_OFF + 1]]) & 0x3fff != 0 {
        return Ok(Parsed::Fragment);
    }
    let l4_off = ETH_LEN + ihl;
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off)?;
    let ports = unsafe { *ports };
    let tcp_flags = if proto == exposure_common::PROTO_TCP {
        let hdr: *const [u8; 20] = ptr_at(ctx, l4_off)?;
        unsafe { (*hdr)[TCP_FLAGS] }
    } else {
        let _hdr: *const [u8; 8] = ptr_at(ctx, l4_off)?;
        0
    };
    Ok(Parsed::Packet(Packet {
        l4_off,
        proto,
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
    }))
}
