//! Mangled frames: many random frames through the XDP and tc egress programs, as a NIC and the
//! node's pods would hand them over. Requests to the frontends and elsewhere, with IPv4 options,
//! IPv6 extension headers, fragments and zero UDP checksums, the backends' replies and ICMP errors
//! about the flows they make, and a third of them cut short or with a header field changed (then
//! half of those with their checksums made right again, so they get past the checks into the
//! translation).
//!
//! What must hold for every frame: no program aborts; a frame the programs change and send on
//! verifies as it did before (IPv4 header and TCP/UDP/ICMP checksums, read as the receiving kernel
//! reads them); a frame the programs make (an ICMP error) verifies; and every well-formed request
//! to a frontend with endpoints is translated to an endpoint, whose answer comes back from the
//! frontend. The generator is seeded, so a failure's seed and case number reproduce it.

use std::{net::IpAddr, ops::Range};

use exposure_common::checksum;

use super::*;

/// A frontend without endpoints (TCP and UDP, both families): its requests are refused with ICMP.
const EMPTY_PORT: u16 = 30601;
/// The IPv4 LB IP's `loadBalancerSourceRanges`: a quarter of the clients.
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
const CASES: usize = 20_000;
const SEED: u64 = 0x5eed_0fe7_905e_5e5e;

/// Where a frame's checksummed parts lie, read as the receiving kernel reads it.
struct Layout {
    v6: bool,
    /// IPv4: the header its checksum covers.
    ip_header: Option<Range<usize>>,
    /// TCP, UDP, ICMP or ICMPv6 and its whole segment; `None` for a fragment, another protocol,
    /// or a segment too short for its header.
    l4: Option<(u8, Range<usize>)>,
}

fn layout(f: &[u8]) -> Option<Layout> {
    match f.get(12..14)? {
        [0x08, 0x00] => {
            let ip = f.get(14..34)?;
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || f.len() < 14 + total {
                return None;
            }
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            let l4 = (!fragment && total - ihl >= header_len(ip[9]))
                .then(|| (ip[9], 14 + ihl..14 + total));
            Some(Layout {
                v6: false,
                ip_header: Some(14..14 + ihl),
                l4,
            })
        }
        [0x86, 0xdd] => {
            let ip = f.get(14..54)?;
            let end = 54 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if ip[0] >> 4 != 6 || f.len() < end {
                return None;
            }
            let (mut next, mut at) = (ip[6], 54);
            for _ in 0..8 {
                if ![frame::HOPOPTS, frame::ROUTING, frame::DSTOPTS].contains(&next) {
                    break;
                }
                let hdr = f.get(at..at + 2)?;
                next = hdr[0];
                at += (hdr[1] as usize + 1) * 8;
            }
            let mut whole = true;
            if next == 44 {
                // A fragment header: an atomic fragment (offset 0, no more) is a whole datagram.
                let hdr = f.get(at..at + 8)?;
                whole = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff9 == 0;
                (next, at) = (hdr[0], at + 8);
            }
            let l4 =
                (whole && at <= end && end - at >= header_len(next)).then_some((next, at..end));
            Some(Layout {
                v6: true,
                ip_header: None,
                l4,
            })
        }
        _ => None,
    }
}

/// The fixed header's length of the protocols whose checksums we check; others never fit.
fn header_len(proto: u8) -> usize {
    match proto {
        TCP => 20,
        UDP | frame::ICMP | frame::ICMPV6 => 8,
        _ => usize::MAX,
    }
}

/// Where in its header the protocol's checksum is.
fn checksum_at(proto: u8) -> usize {
    match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    }
}

/// A TCP/UDP frame's (source, destination) addresses and ports.
fn ends(f: &[u8], lay: &Layout, seg: &Range<usize>) -> ((IpAddr, u16), (IpAddr, u16)) {
    let (src, len) = if lay.v6 { (22, 16) } else { (26, 4) };
    let addr = |at: usize| -> IpAddr {
        match <[u8; 16]>::try_from(&f[at..at + len]) {
            Ok(octets) => Ipv6Addr::from(octets).into(),
            Err(_) => Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]).into(),
        }
    };
    let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    (
        (addr(src), port(seg.start)),
        (addr(src + len), port(seg.start + 2)),
    )
}

/// Swaps a TCP/UDP frame's source and destination addresses and ports: the answer's ends.
fn swap_ends(f: &mut [u8], lay: &Layout, seg: &Range<usize>) {
    let (src, len) = if lay.v6 { (22, 16) } else { (26, 4) };
    let (a, b) = f[src..src + 2 * len].split_at_mut(len);
    a.swap_with_slice(b);
    let (a, b) = f[seg.start..seg.start + 4].split_at_mut(2);
    a.swap_with_slice(b);
}

/// The one's complement sum over the segment (and its pseudo-header, but for ICMPv4) with its
/// checksum in place: 0 when it verifies.
fn l4_sum(f: &[u8], lay: &Layout, proto: u8, seg: &Range<usize>) -> u16 {
    let segment = &f[seg.clone()];
    if lay.v6 {
        let addr = |at: usize| <[u8; 16]>::try_from(&f[at..at + 16]).unwrap();
        return checksum::l4_checksum6(addr(22), addr(38), proto, segment);
    }
    if proto == frame::ICMP {
        return checksum::checksum(segment);
    }
    let addr = |at: usize| <[u8; 4]>::try_from(&f[at..at + 4]).unwrap();
    checksum::l4_checksum(addr(26), addr(30), proto, segment)
}

/// Whether a frame's checksums verify, as far as the kernel would check them: `None` when it is
/// no whole IPv4/IPv6 packet.
fn checksums_verify(f: &[u8]) -> Option<bool> {
    let lay = layout(f)?;
    let ip_ok = lay
        .ip_header
        .as_ref()
        .is_none_or(|r| checksum::checksum(&f[r.clone()]) == 0);
    let l4_ok = lay.l4.as_ref().is_none_or(|(proto, seg)| {
        let at = seg.start + checksum_at(*proto);
        let no_checksum = !lay.v6 && *proto == UDP && f[at..at + 2] == [0, 0];
        no_checksum || l4_sum(f, &lay, *proto, seg) == 0
    });
    Some(ip_ok && l4_ok)
}

/// Sets a frame's checksums right (a zero IPv4 UDP checksum stays "none").
fn fix_checksums(f: &mut [u8]) {
    let Some(lay) = layout(f) else { return };
    if let Some(r) = &lay.ip_header {
        f[r.start + 10..r.start + 12].fill(0);
        let c = checksum::checksum(&f[r.clone()]);
        f[r.start + 10..r.start + 12].copy_from_slice(&c.to_ne_bytes());
    }
    if let Some((proto, seg)) = &lay.l4 {
        let at = seg.start + checksum_at(*proto);
        if !lay.v6 && *proto == UDP && f[at..at + 2] == [0, 0] {
            return;
        }
        f[at..at + 2].fill(0);
        let c = match l4_sum(f, &lay, *proto, seg) {
            0 if *proto == UDP => 0xffff,
            c => c,
        };
        f[at..at + 2].copy_from_slice(&c.to_ne_bytes());
    }
}

/// Which program a frame goes through: XDP on eth0 (from the network), or tc egress on eth0 (sent
/// by the node, e.g. a local pod's answer after the node routed it).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    Xdp,
    TcEgress,
}

/// What a random frame is: where it comes from and goes to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// A client to a frontend with endpoints.
    ToFrontend,
    /// A client to the frontend without endpoints.
    ToEmptyFrontend,
    /// A client to another port of the node's or the LB's address.
    ToOtherPort,
    /// The remote pod to one of the node's SNAT ports (an answer, if a flow holds the port).
    ToSnatPort,
    /// The local pod to a client, leaving through eth0 (an answer, if a flow is the client's).
    FromLocalPod,
    /// A client to a pod's address: routed traffic, no Service's.
    ToPod,
}

const ROLES: [Role; 6] = [
    Role::ToFrontend,
    Role::ToEmptyFrontend,
    Role::ToOtherPort,
    Role::ToSnatPort,
    Role::FromLocalPod,
    Role::ToPod,
];

/// A random frame and what it was made as.
struct Made {
    frame: Vec<u8>,
    hook: Hook,
    /// A well-formed TCP SYN or UDP request to a frontend with endpoints, which must be
    /// translated: the client's and the frontend's (address, port).
    request: Option<((IpAddr, u16), (IpAddr, u16))>,
}

struct Fuzz<'h> {
    h: &'h mut Harness,
    rng: Rng,
    mode: RedirectToPods,
    /// Frames the programs changed and sent on, to answer and to report errors about.
    sent: Vec<(Vec<u8>, Hook)>,
    /// How often each property was exercised, so the test fails if the generator stops reaching
    /// a path.
    translated_valid: usize,
    made_by_program: usize,
    round_trips: usize,
    /// Frames passed up with a hand-off to tc (`--redirect-to-pods`).
    handed_off: usize,
    /// The local pod's answers sent from its interface to eth0 (either redirect mode).
    replies_from_pod: usize,
    /// Requests to the LB IP from outside its source ranges (dropped).
    denied: usize,
}

const FLAG_CHOICES: [u8; 7] = [SYN, ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, 0x18];

impl Fuzz<'_> {
    fn flags(&mut self) -> u8 {
        if self.rng.one_in(8) {
            self.rng.next_u64() as u8
        } else {
            self.rng.pick(&FLAG_CHOICES)
        }
    }

    fn client_port(&mut self) -> u16 {
        1024 + self.rng.below(60000) as u16
    }

    fn snat_port(&mut self) -> u16 {
        SNAT_PORT_MIN + self.rng.below((SNAT_PORT_MAX - SNAT_PORT_MIN) as usize + 1) as u16
    }

    /// (source, destination, hook) for `role` in IPv4.
    fn ends4(&mut self, role: Role) -> ((Ipv4Addr, u16), (Ipv4Addr, u16), Hook) {
        // From 198.18.1.1 on: clear of the node's and its peer's addresses.
        let client = (
            nth_client(1, self.rng.below(1000) as u16),
            self.client_port(),
        );
        let frontend = self.rng.pick(&[NODE, LB]);
        match role {
            Role::ToFrontend => (
                client,
                (frontend, frontend_port(frontend == NODE)),
                Hook::Xdp,
            ),
            Role::ToEmptyFrontend => (client, (NODE, EMPTY_PORT), Hook::Xdp),
            Role::ToOtherPort => (client, (frontend, self.client_port()), Hook::Xdp),
            Role::ToSnatPort => ((REMOTE_POD, 50000), (NODE, self.snat_port()), Hook::Xdp),
            Role::FromLocalPod => ((LOCAL_POD, 50000), client, Hook::TcEgress),
            Role::ToPod => (
                client,
                (self.rng.pick(&[LOCAL_POD, REMOTE_POD]), 50000),
                Hook::Xdp,
            ),
        }
    }

    fn ends6(&mut self, role: Role) -> ((Ipv6Addr, u16), (Ipv6Addr, u16), Hook) {
        // 2001:2::c00:x, clear of the node's and its peer's addresses.
        let mut octets = CLIENT6.octets();
        octets[12] = 0x0c;
        octets[14..].copy_from_slice(&(self.rng.below(1000) as u16 + 1).to_be_bytes());
        let client = (Ipv6Addr::from(octets), self.client_port());
        let frontend = self.rng.pick(&[NODE6, LB6]);
        match role {
            Role::ToFrontend => (
                client,
                (frontend, frontend_port(frontend == NODE6)),
                Hook::Xdp,
            ),
            Role::ToEmptyFrontend => (client, (NODE6, EMPTY_PORT), Hook::Xdp),
            Role::ToOtherPort => (client, (frontend, self.client_port()), Hook::Xdp),
            Role::ToSnatPort => ((REMOTE_POD6, 50000), (NODE6, self.snat_port()), Hook::Xdp),
            Role::FromLocalPod => ((LOCAL_POD6, 50000), client, Hook::TcEgress),
            Role::ToPod => (
                client,
                (self.rng.pick(&[LOCAL_POD6, REMOTE_POD6]), 50000),
                Hook::Xdp,
            ),
        }
    }

    /// The MACs a frame from `src_ip` carries on eth0: the peer node's for the remote pod's, the
    /// node's own for what it sends.
    fn macs(&self, hook: Hook, from_remote_pod: bool) -> ([u8; 6], [u8; 6]) {
        match (hook, from_remote_pod) {
            (Hook::TcEgress, _) => (self.h.node_mac, self.h.peer_mac),
            (Hook::Xdp, true) => (self.h.peer_mac, self.h.node_mac),
            (Hook::Xdp, false) => ([0x02, 0, 0, 0, 0, 0x01], self.h.node_mac),
        }
    }

    fn random4(&mut self, role: Role) -> Made {
        let (src, dst, hook) = self.ends4(role);
        let proto = self.rng.pick(&[TCP, UDP]);
        let flags = self.flags();
        let mut spec = FrameSpec::of(proto, src, dst, flags);
        (spec.src_mac, spec.dst_mac) = self.macs(hook, src.0 == REMOTE_POD);
        let payload_len = self.rng.below(48);
        spec.payload = self.rng.bytes(payload_len);
        if self.rng.one_in(4) {
            // NOPs, then an end of options.
            spec.ip_options = vec![1; 4 * (1 + self.rng.below(10)) - 1];
            spec.ip_options.push(0);
        }
        if self.rng.one_in(8) {
            let offset = 1 + self.rng.below(0x1fff) as u16;
            spec.frag = self.rng.pick(&[0x4000, 0x2000, 0x2000 | offset, offset]);
        }
        spec.udp_no_checksum = self.rng.one_in(6);
        let whole = spec.frag & 0x3fff == 0;
        let request = (role == Role::ToFrontend && whole && (proto == UDP || flags == SYN))
            .then_some(((src.0.into(), src.1), (dst.0.into(), dst.1)));
        Made {
            frame: spec.build(),
            hook,
            request,
        }
    }

    fn random6(&mut self, role: Role) -> Made {
        let (src, dst, hook) = self.ends6(role);
        let proto = self.rng.pick(&[TCP, UDP]);
        let flags = self.flags();
        let mut spec = frame::FrameSpec6::of(proto, src, dst, flags);
        (spec.src_mac, spec.dst_mac) = self.macs(hook, src.0 == REMOTE_POD6);
        let payload_len = self.rng.below(48);
        spec.payload = self.rng.bytes(payload_len);
        let mut f = spec.build();
        let mut translatable = true;
        if self.rng.one_in(8) {
            let pieces =
                frame::fragment6(&f, self.rng.next_u64() as u32, 8 * (1 + self.rng.below(4)));
            f = self.rng.pick(&pieces);
            // An atomic fragment (one piece) is a whole datagram.
            translatable = pieces.len() == 1;
        } else if self.rng.one_in(3) {
            let chain: Vec<_> = (0..1 + self.rng.below(5))
                .map(|_| match self.rng.below(3) {
                    0 => frame::options6(frame::HOPOPTS, 8 * (1 + self.rng.below(2))),
                    1 => frame::options6(frame::DSTOPTS, 8 * (1 + self.rng.below(2))),
                    _ => frame::routing6(self.rng.pick(&[0, 0, 1]), NODE6),
                })
                .collect();
            // The kernel's: more than four headers, or a routing header with segments left.
            translatable = chain.len() <= 4
                && chain
                    .iter()
                    .all(|(kind, body)| *kind != frame::ROUTING || body[1] == 0);
            f = frame::with_ext_headers6(&f, &chain);
        }
        let request = (role == Role::ToFrontend && translatable && (proto == UDP || flags == SYN))
            .then_some(((src.0.into(), src.1), (dst.0.into(), dst.1)));
        Made {
            frame: f,
            hook,
            request,
        }
    }

    /// An answer to, or an ICMP error about, a frame the programs sent on: from where it went,
    /// through the hook that sees that side's packets.
    fn about_sent(&mut self) -> Option<Made> {
        let (out, _) = self.rng.pick(&self.sent);
        let lay = layout(&out)?;
        let (proto, seg) = lay.l4.clone()?;
        if proto != TCP && proto != UDP {
            return None;
        }
        let (from, to) = ends(&out, &lay, &seg);
        let to_local_pod = [IpAddr::from(LOCAL_POD), LOCAL_POD6.into()].contains(&to.0);
        let hook = if to_local_pod {
            Hook::TcEgress
        } else {
            Hook::Xdp
        };
        let from_remote = !to_local_pod;
        let mut f = out.clone();
        if self.rng.one_in(3) {
            // An ICMP error from the destination about `out` (its start, as routers quote).
            let quote_len = (seg.start - 14 + 8 + self.rng.below(16)).min(out.len() - 14);
            let quote = &out[14..14 + quote_len];
            f = match (to.0, from.0) {
                (IpAddr::V6(src), IpAddr::V6(dst)) => {
                    let mut body = vec![0; 4];
                    body.extend_from_slice(quote);
                    frame::icmp6(src, dst, 1, 4, &body)
                }
                (IpAddr::V4(src), IpAddr::V4(dst)) => {
                    let mut padded = out[..14 + quote_len.max(28)].to_vec();
                    padded.resize(14 + 28, 0);
                    let mut e = icmp_error(src, dst, 3, self.rng.pick(&[3, 4]), &padded);
                    // icmp_error quotes 28 bytes; quote the chosen length instead.
                    e.truncate(14 + 20 + 8);
                    e.extend_from_slice(quote);
                    let total = (e.len() - 14) as u16;
                    e[16..18].copy_from_slice(&total.to_be_bytes());
                    e
                }
                _ => return None,
            };
        } else {
            // The answer: addresses, ports and MACs swapped.
            swap_ends(&mut f, &lay, &seg);
            if proto == TCP {
                f[seg.start + 13] = self.flags();
            }
        }
        let (src_mac, dst_mac) = self.macs(hook, from_remote);
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        fix_checksums(&mut f);
        Some(Made {
            frame: f,
            hook,
            request: None,
        })
    }

    /// Cuts the frame short or changes a header field, then perhaps makes its checksums right.
    fn mangle(&mut self, f: &mut Vec<u8>) {
        let ip = 14;
        match self.rng.below(4) {
            0 => f.truncate(14 + self.rng.below(f.len() - 14)),
            1 => {
                let at = ip + self.rng.below((f.len() - ip).min(100));
                f[at] ^= 1 << self.rng.below(8);
            }
            2 => {
                // A length, header length or protocol field.
                let v6 = f[12..14] == [0x86, 0xdd];
                let field = if v6 {
                    self.rng.pick(&[ip + 4, ip + 5, ip + 6, ip + 41])
                } else {
                    self.rng.pick(&[ip, ip + 2, ip + 3, ip + 6, ip + 9])
                };
                if field < f.len() {
                    f[field] = self.rng.next_u64() as u8;
                }
            }
            _ => {
                // The TCP data offset or UDP length: wherever the L4 header is.
                if let Some((_, seg)) = layout(f).and_then(|l| l.l4) {
                    let at = seg.start + self.rng.pick(&[4, 5, 12]);
                    if at < f.len() {
                        f[at] = self.rng.next_u64() as u8;
                    }
                }
            }
        }
        if self.rng.one_in(2) {
            fix_checksums(f);
        }
    }

    fn run(&mut self, hook: Hook, f: &[u8]) -> (u32, Vec<u8>) {
        match hook {
            Hook::Xdp => self.h.xdp(f),
            Hook::TcEgress if self.mode != RedirectToPods::Off => {
                // A local pod's packet meets the program on its interface first: it sends a
                // redirected flow's answers, and only those, to eth0 (new MACs, nothing else).
                let (verdict, out) = self.h.tc_from_pod(f);
                if verdict == TC_ACT_REDIRECT {
                    assert_eq!(out[12..], f[12..], "from the pod: {}", hex(f));
                    self.replies_from_pod += 1;
                } else {
                    assert_eq!(
                        (verdict as i32, &out[..]),
                        (TC_ACT_UNSPEC, f),
                        "from the pod: {}",
                        hex(f)
                    );
                }
                self.h.tc(&out)
            }
            Hook::TcEgress => self.h.tc(f),
        }
    }

    /// Runs one frame and checks what must hold for every frame.
    fn check(&mut self, case: usize, made: &Made) -> (u32, Vec<u8>) {
        let input = &made.frame;
        let (verdict, mut out) = self.run(made.hook, input);
        if made.hook == Hook::Xdp && verdict == XDP_PASS {
            out = self.without_handoff(out, input.len());
        }
        let what = || format!("case {case} ({:?}): {}", made.hook, hex(input));
        let sent_on = match made.hook {
            Hook::Xdp => {
                assert!(
                    [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&verdict),
                    "verdict {verdict}, {}",
                    what()
                );
                verdict != XDP_DROP
            }
            Hook::TcEgress => {
                let verdict = verdict as i32;
                assert!(
                    [TC_ACT_UNSPEC, TC_ACT_OK as i32, TC_ACT_SHOT as i32, 7].contains(&verdict),
                    "verdict {verdict}, {}",
                    what()
                );
                verdict != TC_ACT_SHOT as i32
            }
        };
        if !sent_on || out == *input {
            return (verdict, out);
        }
        if out.len() != input.len() {
            // A message the program made (an ICMP error): right whatever it answers.
            assert_eq!(
                checksums_verify(&out),
                Some(true),
                "made {}, {}",
                hex(&out),
                what()
            );
            self.made_by_program += 1;
        } else if checksums_verify(input) == Some(true) {
            assert_eq!(
                checksums_verify(&out),
                Some(true),
                "sent on {}, {}",
                hex(&out),
                what()
            );
            self.translated_valid += 1;
        }
        if self.sent.len() < 256 {
            self.sent.push((out.clone(), made.hook));
        } else {
            let i = self.rng.below(256);
            self.sent[i] = (out.clone(), made.hook);
        }
        (verdict, out)
    }

    /// A frame passed up with a [`TcHandoff`] in front (`--redirect-to-pods`), without it: the
    /// hand-off names the local pod's interface.
    fn without_handoff(&mut self, out: Vec<u8>, input_len: usize) -> Vec<u8> {
        let meta = std::mem::size_of::<TcHandoff>();
        if self.mode != RedirectToPods::AtTc || out.len() != input_len + meta {
            return out;
        }
        let word = |i: usize| u32::from_ne_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]);
        assert_eq!(
            (word(0), word(4)),
            (HANDOFF_TO_POD, self.h.pod_ifindex),
            "metadata {}",
            hex(&out)
        );
        self.handed_off += 1;
        out[meta..].to_vec()
    }

    /// A request that must be translated: to an endpoint, and its answer back from the frontend.
    fn round_trip(&mut self, case: usize, made: &Made, verdict: u32, out: &[u8]) {
        let Some((client, frontend)) = made.request else {
            return;
        };
        let what = format!("case {case}: {}", hex(&made.frame));
        if let (IpAddr::V4(from), IpAddr::V4(to)) = (client.0, frontend.0) {
            if to == LB && from.octets()[..3] != ALLOWED.octets()[..3] {
                assert_eq!(
                    verdict, XDP_DROP,
                    "a source outside the LB's ranges, {what}"
                );
                self.denied += 1;
                return;
            }
        }
        let lay = layout(out).unwrap_or_else(|| panic!("no IP packet sent on, {what}"));
        let (proto, seg) = lay.l4.clone().unwrap_or_else(|| panic!("no L4, {what}"));
        let (_, backend) = ends(out, &lay, &seg);
        let local = [IpAddr::from(LOCAL_POD), LOCAL_POD6.into()].contains(&backend.0);
        let remote = [IpAddr::from(REMOTE_POD), REMOTE_POD6.into()].contains(&backend.0);
        // Local flows may be redirected to their pod (IPv4 here: the harness's pod interface
        // has no IPv6 neighbour, so those go up the stack).
        let to_local =
            verdict == XDP_PASS || (self.mode == RedirectToPods::AtXdp && verdict == XDP_REDIRECT);
        assert!(
            backend.1 == 50000 && ((local && to_local) || (remote && verdict == XDP_TX)),
            "to {backend:?} with verdict {verdict}, {what}"
        );
        // The endpoint answers whoever the request came from (the client, or the node's SNAT).
        let mut answer = out.to_vec();
        swap_ends(&mut answer, &lay, &seg);
        if proto == TCP {
            answer[seg.start + 13] = SYN | ACK;
        }
        let hook = if local { Hook::TcEgress } else { Hook::Xdp };
        let (src_mac, dst_mac) = self.macs(hook, remote);
        answer[0..6].copy_from_slice(&dst_mac);
        answer[6..12].copy_from_slice(&src_mac);
        fix_checksums(&mut answer);
        let (_, back) = self.run(hook, &answer);
        let lay = layout(&back).unwrap_or_else(|| panic!("answer lost, {what}"));
        let seg = lay
            .l4
            .as_ref()
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("answer lost, {what}"));
        assert_eq!(
            ends(&back, &lay, seg),
            (frontend, client),
            "answer {}, {what}",
            hex(&back)
        );
        assert_eq!(
            checksums_verify(&back),
            Some(true),
            "answer {}, {what}",
            hex(&back)
        );
        self.round_trips += 1;
    }
}

fn frontend_port(node_port: bool) -> u16 {
    if node_port {
        NODE_PORT
    } else {
        60000
    }
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// hello-world over both families with a local and a remote endpoint (IPv4: its LB IP only for
/// [`ALLOWED`] sources, and client IP affinity), and a Service with no endpoints on
/// [`EMPTY_PORT`].
fn services() -> DesiredState {
    let mut state = hello(&[(LOCAL_POD, true), (REMOTE_POD, false)]);
    for s in state.services.values_mut() {
        let s = std::sync::Arc::make_mut(s);
        s.source_ranges = Some(vec![(ALLOWED.into(), 24)]);
        s.affinity_timeout_s = 60;
    }
    state
        .services
        .extend(hello6(&[(LOCAL_POD6, true), (REMOTE_POD6, false)]).services);
    for (family, node) in [
        (exposure::model::IpFamily::V4, std::net::IpAddr::from(NODE)),
        (exposure::model::IpFamily::V6, NODE6.into()),
    ] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let mut s = DesiredService::default();
            let addr = FrontendAddr {
                ip: node,
                port: EMPTY_PORT,
                protocol,
                scope: exposure::model::Scope::External,
            };
            s.frontends.insert(addr, FrontendKind::NodePort);
            let key = ServicePortName {
                protocol,
                family,
                ..name("empty")
            };
            state.services.insert(key, std::sync::Arc::new(s));
        }
    }
    state
}

#[test]
fn mangled_frames_never_abort_and_what_is_sent_on_verifies() {
    mangled_frames(RedirectToPods::Off);
}

/// With `--redirect-to-pods`: local flows leave XDP with the pod's interface in the metadata.
#[test]
fn mangled_frames_with_local_flows_handed_to_tc() {
    mangled_frames(RedirectToPods::AtTc);
}

/// With `--xdp-redirect-to-pods`: local flows are redirected from XDP.
#[test]
fn mangled_frames_with_local_flows_redirected_at_xdp() {
    mangled_frames(RedirectToPods::AtXdp);
}

fn mangled_frames(mode: RedirectToPods) {
    let capacity = exposure::datapath::Capacity {
        redirect_to_pods: mode,
        ..Default::default()
    };
    with_datapath_config(capacity, move |h| {
        h.program(&services());
        if mode != RedirectToPods::Off {
            h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap();
        }
        let mut fuzz = Fuzz {
            h,
            rng: Rng::from_env("EXPOSURE_MANGLED_SEED", SEED),
            mode,
            sent: Vec::new(),
            translated_valid: 0,
            made_by_program: 0,
            round_trips: 0,
            handed_off: 0,
            replies_from_pod: 0,
            denied: 0,
        };
        for case in 0..CASES {
            let mut made = if !fuzz.sent.is_empty() && fuzz.rng.one_in(4) {
                match fuzz.about_sent() {
                    Some(made) => made,
                    None => continue,
                }
            } else {
                let role = fuzz.rng.pick(&ROLES);
                if fuzz.rng.one_in(2) {
                    fuzz.random6(role)
                } else {
                    fuzz.random4(role)
                }
            };
            if fuzz.rng.one_in(3) {
                fuzz.mangle(&mut made.frame);
                made.request = None;
            }
            // The kernel refuses tc test runs without a whole fixed IP header (and the node's
            // stack sends none).
            let ip_header = if made.frame[12..14] == [0x86, 0xdd] {
                40
            } else {
                20
            };
            if made.hook == Hook::TcEgress && made.frame.len() < 14 + ip_header {
                continue;
            }
            let (verdict, out) = fuzz.check(case, &made);
            fuzz.round_trip(case, &made, verdict, &out);
        }
        let (valid, made, trips) = (
            fuzz.translated_valid,
            fuzz.made_by_program,
            fuzz.round_trips,
        );
        eprintln!("{valid} translated, {made} made by the programs, {trips} round trips");
        // Each path was reached often: the generator still makes what it should.
        assert!(valid > CASES / 10, "{valid} translated");
        assert!(made > CASES / 100, "{made} made by the programs");
        assert!(trips > CASES / 40, "{trips} round trips");
        assert!(fuzz.denied > CASES / 200, "{} denied", fuzz.denied);
        if mode != RedirectToPods::Off {
            assert!(fuzz.h.counter(Counter::RedirectedToPod) > 0 || mode == RedirectToPods::AtTc);
            assert!(fuzz.handed_off > 0 || mode == RedirectToPods::AtXdp);
            assert!(
                fuzz.replies_from_pod > CASES / 100,
                "{}",
                fuzz.replies_from_pod
            );
            assert_eq!(
                fuzz.h.counter(Counter::RepliesFromPod),
                fuzz.replies_from_pod as u64
            );
        }
        for counter in [
            Counter::RepliesXdp,
            Counter::RepliesTc,
            Counter::IcmpErrorsTranslated,
            Counter::Malformed,
        ] {
            assert!(fuzz.h.counter(counter) > 0, "{counter:?} never counted");
        }
    });
}

/// An ICMP error whose IP length ends inside the quoted ports or UDP checksum (the bytes after it
/// are none of it) is the kernel's: there is nothing of it to rewrite. Whole, it is translated.
#[test]
fn icmp_errors_too_short_for_the_quoted_ports_are_the_kernels() {
    with_datapath(|h| {
        let mut state = hello(&[(REMOTE_POD, false)]);
        state
            .services
            .extend(hello6(&[(REMOTE_POD6, false)]).services);
        h.program(&state);
        let mut request = FrameSpec::udp((CLIENT, 46000), (NODE, NODE_PORT));
        request.dst_mac = h.node_mac;
        let (verdict, sent) = h.xdp(&request.build());
        assert_eq!(verdict, XDP_TX);
        let error4 = icmp_error(REMOTE_POD, NODE, 3, 3, &sent);
        let mut request = frame::FrameSpec6::udp((CLIENT6, 46000), (NODE6, NODE_PORT));
        request.dst_mac = h.node_mac;
        let (verdict, sent) = h.xdp(&request.build());
        assert_eq!(verdict, XDP_TX);
        let mut body = vec![0; 4];
        body.extend_from_slice(&sent[14..14 + 48]);
        let mut error6 = frame::icmp6(REMOTE_POD6, NODE6, 1, 4, &body);
        error6[0..6].copy_from_slice(&h.node_mac);
        error6[6..12].copy_from_slice(&h.peer_mac);

        for (error, length_at) in [(&error4, 14 + 2), (&error6, 14 + 4)] {
            for short_by in 1..=8u16 {
                let mut short = error.clone();
                let len = u16::from_be_bytes([short[length_at], short[length_at + 1]]) - short_by;
                short[length_at..length_at + 2].copy_from_slice(&len.to_be_bytes());
                fix_checksums(&mut short);
                assert_eq!(checksums_verify(&short), Some(true));
                assert_eq!(h.xdp(&short), (XDP_PASS, short.clone()), "{short_by} short");
            }
            let (verdict, out) = h.xdp(error);
            assert_eq!(verdict, XDP_TX, "whole");
            assert_eq!(checksums_verify(&out), Some(true));
        }
        assert_eq!(h.counter(Counter::IcmpErrorsTranslated), 2);
    });
}
