//! Frames for packet tests: built with correct checksums, parsed back with the checksums verified.

use std::net::{Ipv4Addr, Ipv6Addr};

use exposure_common::checksum;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (padded to 4 bytes by the caller).
    pub ip_options: Vec<u8>,
    /// Flags + fragment offset field, host order (0x2000 = more fragments).
    pub frag: u16,
    /// UDP only: send a zero ("no checksum") checksum.
    pub udp_no_checksum: bool,
}

impl FrameSpec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        FrameSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x10],
            src: src.0,
            dst: dst.0,
            proto: TCP,
            sport: src.1,
            dport: dst.1,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
            ip_options: Vec::new(),
            frag: 0,
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        FrameSpec {
            proto: UDP,
            tcp_flags: 0,
            ..Self::tcp(src, dst, 0)
        }
    }

    /// A TCP segment with `flags` when `proto` is TCP, else a UDP datagram.
    pub fn of(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        if proto == TCP {
            Self::tcp(src, dst, flags)
        } else {
            Self::udp(src, dst)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4_len = if self.proto == TCP { 20 } else { 8 } + self.payload.len();
        let ihl = 20 + self.ip_options.len();
        let mut f = Vec::with_capacity(14 + ihl + l4_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip[20..].copy_from_slice(&self.ip_options);
        let c = checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        f.extend_from_slice(&ip);

        let mut l4 = segment(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        if self.proto == TCP || !self.udp_no_checksum {
            let c = checksum::l4_checksum(self.src.octets(), self.dst.octets(), self.proto, &l4);
            set_l4_checksum(&mut l4, self.proto, c);
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// A TCP (header with `tcp_flags`) or UDP segment carrying `payload`, checksum zero.
fn segment(proto: u8, sport: u16, dport: u16, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; if proto == TCP { 20 } else { 8 } + payload.len()];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = tcp_flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        l4[20..].copy_from_slice(payload);
    } else {
        let len = l4.len() as u16;
        l4[4..6].copy_from_slice(&len.to_be_bytes());
        l4[8..].copy_from_slice(payload);
    }
    l4
}

/// Stores a computed checksum in its field; UDP sends a computed 0 as 0xffff (0 means none).
fn set_l4_checksum(l4: &mut [u8], proto: u8, c: u16) {
    let (at, c) = match proto {
        TCP => (16, c),
        _ if c == 0 => (6, 0xffff),
        _ => (6, c),
    };
    l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
}

/// A frame read back, with its checksums checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_checksum_ok: bool,
    /// TCP/UDP/ICMP checksum verifies (a zero UDP checksum counts as ok).
    pub l4_checksum_ok: bool,
    pub udp_checksum_zero: bool,
    pub l4: Vec<u8>,
}

pub fn parse(f: &[u8]) -> Option<Parsed> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip.len() < total || total < ihl + 8 {
        return None;
    }
    let l4 = &ip[ihl..total];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let udp_zero = proto == UDP && l4[6..8] == [0, 0];
    let l4_ok = match proto {
        TCP | UDP => udp_zero || checksum::l4_checksum(src.octets(), dst.octets(), proto, l4) == 0,
        _ => checksum::checksum(l4) == 0,
    };
    let (sport, dport) = match proto {
        TCP | UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        _ => (0, 0),
    };
    Some(Parsed {
        dst_mac: f[0..6].try_into().ok()?,
        src_mac: f[6..12].try_into().ok()?,
        src,
        dst,
        proto,
        ttl: ip[8],
        sport,
        dport,
        ip_checksum_ok: checksum::checksum(&ip[..ihl]) == 0,
        l4_checksum_ok: l4_ok,
        udp_checksum_zero: udp_zero,
        l4: l4.to_vec(),
    })
}

/// An IPv6 TCP/UDP frame (no extension headers), built with a correct checksum.
#[derive(Clone, Debug)]
pub struct FrameSpec6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

impl FrameSpec6 {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Self {
        FrameSpec6 {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x10],
            src: src.0,
            dst: dst.0,
            proto: TCP,
            sport: src.1,
            dport: dst.1,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Self {
        FrameSpec6 {
            proto: UDP,
            tcp_flags: 0,
            ..Self::tcp(src, dst, 0)
        }
    }

    /// A TCP segment with `flags` when `proto` is TCP, else a UDP datagram.
    pub fn of(proto: u8, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Self {
        if proto == TCP {
            Self::tcp(src, dst, flags)
        } else {
            Self::udp(src, dst)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = segment(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        let c = checksum::l4_checksum6(self.src.octets(), self.dst.octets(), self.proto, &l4);
        set_l4_checksum(&mut l4, self.proto, c);
        ipv6_frame(
            self.dst_mac,
            self.src_mac,
            self.src,
            self.dst,
            self.proto,
            &l4,
        )
    }
}

/// Ethernet + IPv6 header (hop limit 64) around `payload`.
pub fn ipv6_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.push(next_header);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// An ICMPv6 message (`body` after the 4-byte type/code/checksum header) with its checksum.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![icmp_type, code, 0, 0];
    msg.extend_from_slice(body);
    let c = checksum::l4_checksum6(src.octets(), dst.octets(), ICMPV6, &msg);
    msg[2..4].copy_from_slice(&c.to_ne_bytes());
    ipv6_frame(
        [0x02, 0, 0, 0, 0, 0x10],
        [0x02, 0, 0, 0, 0, 0x01],
        src,
        dst,
        ICMPV6,
        &msg,
    )
}

pub const ICMPV6: u8 = 58;

/// An IPv6 frame read back, with its L4 checksum checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP/UDP/ICMPv6 checksum (all over the IPv6 pseudo-header) verifies.
    pub l4_checksum_ok: bool,
    pub l4: Vec<u8>,
}

pub fn parse6(f: &[u8]) -> Option<Parsed6> {
    if f.len() < 54 || f[12..14] != [0x86, 0xdd] {
        return None;
    }
    let ip = &f[14..];
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if ip.len() < 40 + len {
        return None;
    }
    let l4 = &ip[40..40 + len];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
    let next_header = ip[6];
    let (sport, dport) = match next_header {
        TCP | UDP if l4.len() >= 4 => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        _ => (0, 0),
    };
    Some(Parsed6 {
        dst_mac: f[0..6].try_into().ok()?,
        src_mac: f[6..12].try_into().ok()?,
        src,
        dst,
        next_header,
        hop_limit: ip[7],
        sport,
        dport,
        l4_checksum_ok: checksum::l4_checksum6(src.octets(), dst.octets(), next_header, l4) == 0,
        l4: l4.to_vec(),
    })
}

/// Splits a whole IPv4 frame into fragments of `chunk` bytes of IP payload (a multiple of 8, but
/// the last), with IP ID `id`, as a sender's stack does for a datagram above the MTU.
pub fn fragment4(frame: &[u8], id: u16, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let (head, payload) = frame.split_at(14 + ihl);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = head.to_vec();
            let ip = &mut f[14..];
            ip[2..4].copy_from_slice(&((ihl + piece.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&(more | (i * chunk / 8) as u16).to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&ip[..ihl]);
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            f.extend_from_slice(piece);
            f
        })
        .collect()
}

/// One fragment as reassembly sees it.
struct Piece<'a> {
    /// Where its payload goes in the datagram's, in bytes.
    offset: usize,
    more: bool,
    /// The fields every fragment of the datagram has the same (addresses, ID, protocol).
    datagram: Vec<u8>,
    payload: &'a [u8],
}

/// The fragments' payloads joined in offset order: `None` unless they are of one datagram and
/// cover it without gaps, up to a last fragment.
fn join(mut pieces: Vec<Piece<'_>>) -> Option<Vec<u8>> {
    let datagram = &pieces.first()?.datagram;
    if pieces.iter().any(|p| p.datagram != *datagram) {
        return None;
    }
    pieces.sort_by_key(|p| p.offset);
    let mut joined = Vec::new();
    for p in &pieces {
        if joined.len() != p.offset {
            return None;
        }
        joined.extend_from_slice(p.payload);
    }
    if pieces.last()?.more {
        return None; // The last fragment is missing.
    }
    Some(joined)
}

/// Puts IPv4 fragments (in any order) back into one frame, as the receiver's reassembly would:
/// `None` unless every fragment's header checksum is right, they agree on addresses, ID and
/// protocol, and they cover the datagram without gaps. Headers are the first fragment's.
pub fn reassemble4(frags: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut pieces = Vec::new();
    for f in frags {
        let ip = f.get(14..)?;
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if checksum::checksum(ip.get(..ihl)?) != 0 {
            return None;
        }
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        pieces.push(Piece {
            offset: ((frag & 0x1fff) as usize) * 8,
            more: frag & 0x2000 != 0,
            datagram: [&ip[4..6], &ip[9..10], &ip[12..20]].concat(),
            payload: ip.get(ihl..total)?,
        });
    }
    let payload = join(pieces)?;
    let first = frags
        .iter()
        .find(|f| f[14 + 6] & 0x1f == 0 && f[14 + 7] == 0)?;
    let ihl = ((first[14] & 0x0f) as usize) * 4;
    let mut f = first[..14 + ihl].to_vec();
    let ip = &mut f[14..];
    ip[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&[0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&payload);
    Some(f)
}

/// The fragment header's length (IPv6).
const FRAG_HDR: usize = 8;

pub const HOPOPTS: u8 = 0;
pub const ROUTING: u8 = 43;
pub const DSTOPTS: u8 = 60;

/// An extension header of `kind` whose bytes after the first two (next header, length) are
/// `body` (6 + a multiple of 8 bytes).
pub fn ext_header6(kind: u8, body: &[u8]) -> (u8, Vec<u8>) {
    assert_eq!((body.len() + 2) % 8, 0, "a multiple of 8 bytes in all");
    (kind, body.to_vec())
}

/// A hop-by-hop or destination options header of `len` bytes (8, 16, ...) holding only padding.
pub fn options6(kind: u8, len: usize) -> (u8, Vec<u8>) {
    let mut body = vec![1, (len - 4) as u8]; // PadN over the rest
    body.resize(len - 2, 0);
    ext_header6(kind, &body)
}

/// A segment routing header (type 4) with `segments_left` and one segment, `segment`.
pub fn routing6(segments_left: u8, segment: Ipv6Addr) -> (u8, Vec<u8>) {
    let mut body = vec![4, segments_left, 0, 0, 0, 0];
    body.extend_from_slice(&segment.octets());
    ext_header6(ROUTING, &body)
}

/// `frame` (IPv6, no extension headers) with `headers` inserted after its fixed header, chained
/// to the upper-layer protocol it had.
pub fn with_ext_headers6(frame: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let upper = frame[14 + 6];
    let mut out = frame[..14 + 40].to_vec();
    let mut added = 0;
    for (i, (kind, body)) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map_or(upper, |(k, _)| *k);
        if i == 0 {
            out[14 + 6] = *kind;
        }
        out.push(next);
        out.push(((body.len() + 2) / 8 - 1) as u8);
        out.extend_from_slice(body);
        added += body.len() + 2;
    }
    out.extend_from_slice(&frame[14 + 40..]);
    let len = u16::from_be_bytes([frame[18], frame[19]]) as usize + added;
    out[18..20].copy_from_slice(&(len as u16).to_be_bytes());
    out
}

/// `frame` without the hop-by-hop, destination options and routing headers after its fixed
/// header, and those headers' bytes.
pub fn without_ext_headers6(frame: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut next = frame[14 + 6];
    let mut at = 14 + 40;
    while [HOPOPTS, ROUTING, DSTOPTS].contains(&next) {
        next = frame[at];
        at += (frame[at + 1] as usize + 1) * 8;
    }
    let removed = at - (14 + 40);
    let mut out = frame[..14 + 40].to_vec();
    out[14 + 6] = next;
    let len = u16::from_be_bytes([frame[18], frame[19]]) as usize - removed;
    out[18..20].copy_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&frame[at..]);
    (out, frame[14 + 40..at].to_vec())
}

/// Splits a whole IPv6 frame (no extension headers) into fragments of `chunk` bytes of its
/// payload (a multiple of 8, but the last), each with a fragment header with ID `id`.
pub fn fragment6(frame: &[u8], id: u32, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0);
    let (head, payload) = frame.split_at(14 + 40);
    let next_header = head[14 + 6];
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = head.to_vec();
            f[14 + 4..14 + 6].copy_from_slice(&((FRAG_HDR + piece.len()) as u16).to_be_bytes());
            f[14 + 6] = 44;
            let more = u16::from(i + 1 < pieces.len());
            f.extend_from_slice(&[next_header, 0]);
            f.extend_from_slice(&(((i * chunk) as u16) | more).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(piece);
            f
        })
        .collect()
}

/// [`reassemble4`] for IPv6 fragments made by [`fragment6`]: one frame without the fragment header.
pub fn reassemble6(frags: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut pieces = Vec::new();
    for f in frags {
        let ip = f.get(14..)?;
        if ip[6] != 44 {
            return None;
        }
        let len = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let hdr = ip.get(40..40 + FRAG_HDR)?;
        let frag = u16::from_be_bytes([hdr[2], hdr[3]]);
        pieces.push(Piece {
            offset: (frag & 0xfff8) as usize,
            more: frag & 1 != 0,
            datagram: [&ip[8..40], &hdr[..1], &hdr[4..8]].concat(),
            payload: ip.get(40 + FRAG_HDR..len)?,
        });
    }
    let payload = join(pieces)?;
    let first = frags
        .iter()
        .find(|f| u16::from_be_bytes([f[14 + 42], f[14 + 43]]) & 0xfff8 == 0)?;
    let mut f = first[..14 + 40].to_vec();
    f[14 + 4..14 + 6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    f[14 + 6] = first[14 + 40]; // the fragment header's next header
    f.extend_from_slice(&payload);
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify() {
        let a = (Ipv4Addr::new(198, 18, 0, 1), 40000);
        let b = (Ipv4Addr::new(198, 18, 0, 10), 30600);
        for spec in [FrameSpec::tcp(a, b, SYN), FrameSpec::udp(a, b)] {
            let p = parse(&spec.build()).unwrap();
            assert!(p.ip_checksum_ok && p.l4_checksum_ok);
            assert_eq!((p.src, p.sport, p.dst, p.dport), (a.0, a.1, b.0, b.1));
        }
        let mut bad = FrameSpec::udp(a, b).build();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(
            !parse(&bad).unwrap().l4_checksum_ok,
            "a corrupted payload must fail the check"
        );
    }

    #[test]
    fn fragments_reassemble_to_the_datagram_in_any_order() {
        let a = (Ipv4Addr::new(198, 18, 0, 1), 40000);
        let b = (Ipv4Addr::new(198, 18, 0, 10), 30600);
        let mut spec = FrameSpec::udp(a, b);
        spec.payload = (0..1000u32).map(|i| i as u8).collect();
        let whole = spec.build();
        let mut frags = fragment4(&whole, 0x1234, 400); // the ID the frame has
        assert_eq!(frags.len(), 3);
        frags.swap(0, 2);
        assert_eq!(reassemble4(&frags), Some(whole.clone()));
        assert_eq!(reassemble4(&frags[..2]), None, "a fragment missing");
        frags[1][14 + 4] ^= 1;
        assert_eq!(reassemble4(&frags), None, "another datagram's fragment");

        let a6 = ("2001:2::1".parse().unwrap(), 40000);
        let b6 = ("2001:2::10".parse().unwrap(), 30600);
        let mut spec6 = FrameSpec6::udp(a6, b6);
        spec6.payload = spec.payload.clone();
        let whole6 = spec6.build();
        let mut frags6 = fragment6(&whole6, 7, 400);
        assert_eq!(frags6.len(), 3);
        frags6.swap(0, 1);
        assert_eq!(reassemble6(&frags6), Some(whole6));
        assert_eq!(reassemble6(&frags6[1..]), None);
    }

    #[test]
    fn built_ipv6_frames_verify() {
        let a = ("2001:2::1".parse().unwrap(), 40000);
        let b = ("2001:2::10".parse().unwrap(), 30600);
        for spec in [FrameSpec6::tcp(a, b, SYN), FrameSpec6::udp(a, b)] {
            let p = parse6(&spec.build()).unwrap();
            assert!(p.l4_checksum_ok);
            assert_eq!((p.src, p.sport, p.dst, p.dport), (a.0, a.1, b.0, b.1));
        }
        let echo = parse6(&icmp6(a.0, b.0, 128, 0, &[0, 1, 0, 1, 9, 9])).unwrap();
        assert!(echo.l4_checksum_ok);
        let mut bad = FrameSpec6::udp(a, b).build();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(!parse6(&bad).unwrap().l4_checksum_ok);
    }
}
