//! Internet checksum (RFC 1071) and incremental updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! All values are 16-bit words as loaded from the packet in host order; the one's-complement sum is
//! byte-order independent, so no swapping is needed as long as the checksum field is loaded the same way.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit halves of `v` to `sum`.
#[inline(always)]
fn add32(sum: u32, v: u32) -> u32 {
    sum + (v & 0xffff) + (v >> 16)
}

/// New checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// New checksum after a 32-bit field (e.g. an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = add32(add32(!check as u32, !old), new);
    !fold(sum)
}

/// UDP uses 0 for "no checksum"; a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_replace4(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// UDP variant of [`replace2`]: keeps a disabled checksum disabled.
#[inline(always)]
pub fn udp_replace2(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace2(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// New checksum after a 16-byte field (an IPv6 address, or IPv4-mapped: then only the last word
/// differs, and the others cancel out) changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut sum = !check as u32;
    for i in 0..4 {
        sum = add32(add32(sum, !old[i]), new[i]);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !fold(sum)
}

/// UDP variant of [`replace16`].
#[inline(always)]
pub fn udp_replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Several fields' changes summed before one fold (RFC 1624 eqn. 3 over all of them at once, as the
/// kernel's `csum_diff` does): a NAT rewrite folds once per checksum instead of once per field.
/// Fields are in host order as loaded from the packet (see the module note).
#[derive(Clone, Copy, Default)]
pub struct Delta(u64);

impl Delta {
    /// Adds a 32-bit field's change from `old` to `new` (an IPv4 address).
    #[inline(always)]
    pub fn word(self, old: u32, new: u32) -> Delta {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// Adds a 16-bit field's change (a port).
    #[inline(always)]
    pub fn port(self, old: u16, new: u16) -> Delta {
        Delta(self.0 + (!old) as u64 + new as u64)
    }

    /// Both sets of changes.
    #[inline(always)]
    pub fn with(self, other: Delta) -> Delta {
        Delta(self.0 + other.0)
    }

    /// Adds a 16-byte field's change (an IPv6 address).
    #[inline(always)]
    pub fn words(self, old: &[u32; 4], new: &[u32; 4]) -> Delta {
        self.word(old[0], new[0])
            .word(old[1], new[1])
            .word(old[2], new[2])
            .word(old[3], new[3])
    }

    /// The changes as one 32-bit one's-complement sum, as the kernel's `csum_diff` gives them: for
    /// `bpf_l4_csum_replace` with a precomputed difference (size 0), which also knows how to
    /// update a checksum-offloaded packet's partial sum.
    #[inline(always)]
    pub fn wsum(self) -> u32 {
        let sum = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum as u32
    }

    /// A partial sum (what an offloading sender leaves in the field: the pseudo-header's sum, not
    /// inverted) after all the changes: only the addresses' belong there.
    #[inline(always)]
    pub fn apply_partial(self, partial: u16) -> u16 {
        !self.apply(!partial)
    }

    /// The checksum after all the changes.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let sum = (!check) as u64 + self.0;
        // Under 2^37 (a check and up to 16 words, each counted twice): two folds bring it under 2^32.
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        !fold(sum as u32)
    }

    /// [`Delta::apply`] for UDP: a disabled checksum (0) stays disabled, a computed 0 is sent as
    /// 0xffff (RFC 768).
    #[inline(always)]
    pub fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// The IPv4 pseudo-header's sum, folded and not inverted, for a segment of `len` bytes between
/// `saddr` and `daddr` (as loaded): what a sender that offloads its checksum (Linux's
/// `CHECKSUM_PARTIAL`) leaves in the TCP/UDP checksum field for the device to complete.
#[inline(always)]
pub fn pseudo_header4(saddr: u32, daddr: u32, proto: u8, len: u16) -> u16 {
    let sum = add32(add32(0, saddr), daddr);
    with_proto_and_len(sum, proto, len)
}

/// The addresses' sum `sum` with the pseudo-header's protocol and length added, folded.
#[inline(always)]
fn with_proto_and_len(sum: u32, proto: u8, len: u16) -> u16 {
    fold(sum + u16::from_ne_bytes([0, proto]) as u32 + u16::from_ne_bytes(len.to_be_bytes()) as u32)
}

/// [`pseudo_header4`] for IPv6.
#[inline(always)]
pub fn pseudo_header6(saddr: &[u32; 4], daddr: &[u32; 4], proto: u8, len: u16) -> u16 {
    // Word by word (an iterator's loads of the copied addresses trip the verifier's stack checks).
    let sum = add32(
        add32(add32(add32(0, saddr[0]), saddr[1]), saddr[2]),
        saddr[3],
    );
    let sum = add32(
        add32(add32(add32(sum, daddr[0]), daddr[1]), daddr[2]),
        daddr[3],
    );
    with_proto_and_len(sum, proto, len)
}

/// Whether a TCP/UDP checksum field `field` holds a sender's partial sum ([`pseudo_header4`] /
/// [`pseudo_header6`] of the packet: `pseudo`) rather than a full checksum. A full checksum
/// equals it once in 65,536 packets, so `segment` (the one's-complement sum of the whole segment
/// as it is, field included) decides then: a full checksum sums, with the pseudo-header, to
/// 0xffff.
#[inline(always)]
pub fn is_partial(field: u16, pseudo: u16, segment: u32) -> bool {
    field == pseudo && fold64(segment as u64 + pseudo as u64) != 0xffff
}

/// The full checksum of a segment that summed to `segment` (field included) with the partial
/// sum `field` in its checksum field, once `changes` (its ports) are made and its pseudo-header
/// is `pseudo` (the new addresses'): for a frame sent from XDP, where no device completes it.
#[inline(always)]
pub fn complete(segment: u32, field: u16, changes: Delta, pseudo: u16) -> u16 {
    let sum = segment as u64 + (!field) as u64 + changes.wsum() as u64 + pseudo as u64;
    !fold64(sum)
}

/// The value of a checksum field that a device asked to complete it leaves as it is: for a region
/// whose other bytes sum (one's complement, folded) to `rest`, the `f` with `!fold(rest + f) == f`
/// (a device writes the complement of the region's sum, field included, into the field). As
/// 2 x 32768 = 1 modulo 65535, `f` is half of `-rest` there. There is none for a `rest` of 0, the
/// sum of nothing but zeros, which a TCP or UDP header (its ports) never is.
#[inline(always)]
pub fn self_completing(rest: u16) -> u16 {
    let minus_rest = (0xffff - rest as u32) % 0xffff;
    ((minus_rest * 0x8000) % 0xffff) as u16
}

/// Folds a 64-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub fn fold64(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32)
}

/// One's-complement sum of `data` (odd trailing byte padded with zero), not yet inverted.
pub fn sum_bytes(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u16::from_ne_bytes([c[0], c[1]]) as u32);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u16::from_ne_bytes([*last, 0]) as u32);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Full checksum of `data` as it would be stored in the packet.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(data, 0))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be zero).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    let sum = sum_bytes(segment, sum_bytes(&pseudo, 0));
    !fold(sum)
}

/// TCP/UDP/ICMPv6 checksum over the IPv6 pseudo-header and `segment` (checksum field zero).
pub fn l4_checksum6(src: [u8; 16], dst: [u8; 16], next_header: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src);
    pseudo[16..32].copy_from_slice(&dst);
    pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo[39] = next_header;
    let sum = sum_bytes(segment, sum_bytes(&pseudo, 0));
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_completing_field_is_what_a_device_would_write_there_for_every_rest() {
        for rest in 1..=u16::MAX {
            let f = self_completing(rest);
            assert_eq!(!fold(rest as u32 + f as u32), f, "rest {rest:#06x}");
        }
    }

    fn header() -> [u8; 20] {
        [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 198, 18, 0, 1, 198, 18, 1, 2,
        ]
    }

    fn set_check(h: &mut [u8; 20]) {
        h[10] = 0;
        h[11] = 0;
        let c = checksum(h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
    }

    #[test]
    fn full_checksum_verifies_to_zero() {
        let mut h = header();
        set_check(&mut h);
        assert_ne!(u16::from_ne_bytes([h[10], h[11]]), 0);
        assert_eq!(checksum(&h), 0, "a correct header sums to 0xffff");
    }

    #[test]
    fn known_vector() {
        // RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2 (in wire order).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let sum = fold(sum_bytes(&data, 0));
        assert_eq!(u16::from_be_bytes(sum.to_ne_bytes()), 0xddf2);
    }

    #[test]
    fn incremental_address_change_matches_recompute() {
        let mut h = header();
        set_check(&mut h);
        let old = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        for new_addr in [
            [198, 18, 5, 9],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [198, 19, 200, 1],
        ] {
            let mut n = h;
            n[16..20].copy_from_slice(&new_addr);
            let check = u16::from_ne_bytes([h[10], h[11]]);
            let inc = replace4(check, old, u32::from_ne_bytes(new_addr));
            let mut full = n;
            set_check(&mut full);
            assert_eq!(inc.to_ne_bytes(), [full[10], full[11]], "addr {new_addr:?}");
        }
    }

    #[test]
    fn incremental_port_change_matches_recompute() {
        let src = [198, 18, 0, 1];
        let dst = [198, 18, 1, 2];
        let mut seg = [0u8; 12];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&60000u16.to_be_bytes());
        seg[4..6].copy_from_slice(&12u16.to_be_bytes());
        seg[8..12].copy_from_slice(b"ping");
        let c = l4_checksum(src, dst, 17, &seg);
        let mut after = seg;
        after[2..4].copy_from_slice(&50000u16.to_be_bytes());
        let want = l4_checksum(src, dst, 17, &after);
        let got = udp_replace2(
            c,
            u16::from_ne_bytes(60000u16.to_be_bytes()),
            u16::from_ne_bytes(50000u16.to_be_bytes()),
        );
        assert_eq!(got, want);
    }

    #[test]
    fn incremental_ipv6_address_change_matches_recompute() {
        let src: [u8; 16] = "2001:2::1".parse::<core::net::Ipv6Addr>().unwrap().octets();
        let dst: [u8; 16] = "2001:2::10"
            .parse::<core::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let words = |o: [u8; 16]| {
            core::array::from_fn::<u32, 4, _>(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        };
        let mut seg = [0u8; 13];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&30600u16.to_be_bytes());
        seg[4..6].copy_from_slice(&13u16.to_be_bytes());
        seg[8..13].copy_from_slice(b"hello");
        let c = l4_checksum6(src, dst, 17, &seg);
        for new in ["2001:2:0:1::2", "ffff:ffff::", "::", "2001:2::10"] {
            let new = new.parse::<core::net::Ipv6Addr>().unwrap().octets();
            let want = l4_checksum6(src, new, 17, &seg);
            assert_eq!(udp_replace16(c, &words(dst), &words(new)), want);
            assert_eq!(replace16(c, &words(dst), &words(new)), want);
        }
    }

    /// xorshift64: varied inputs without a dependency; fixed seed, so a failure reproduces.
    fn random_words(seed: &mut u64) -> u32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        // Extremes too: all-zero and all-one words are where one's-complement edge cases live.
        match *seed % 8 {
            0 => 0,
            1 => u32::MAX,
            _ => (*seed >> 16) as u32,
        }
    }

    fn addr(seed: &mut u64) -> [u32; 4] {
        core::array::from_fn(|_| random_words(seed))
    }

    /// An address's words as the packet carries them.
    fn bytes(w: [u32; 4]) -> [u8; 16] {
        w.map(u32::to_ne_bytes).concat().try_into().unwrap()
    }

    fn ne_words<const N: usize>(bytes: &[u8]) -> [u32; N] {
        core::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    /// Source and destination port as loaded from a TCP/UDP header.
    fn halves(bytes: &[u8]) -> [u16; 2] {
        [
            u16::from_ne_bytes([bytes[0], bytes[1]]),
            u16::from_ne_bytes([bytes[2], bytes[3]]),
        ]
    }

    /// A TCP (6) or UDP (17) header with payload, random but for the zeroed checksum field.
    fn random_segment(seed: &mut u64, proto: u8) -> [u8; 24] {
        let mut seg = [0u8; 24];
        for chunk in seg.chunks_mut(4) {
            chunk.copy_from_slice(&random_words(seed).to_ne_bytes());
        }
        let check_at = if proto == 6 { 16 } else { 6 };
        seg[check_at..check_at + 2].fill(0);
        seg
    }

    /// A computed checksum as a packet carries it: UDP sends 0 as 0xffff (0 means "none").
    fn as_sent(proto: u8, check: u16) -> u16 {
        if proto == 17 && check == 0 {
            0xffff
        } else {
            check
        }
    }

    /// An incremental checksum against a recomputed one. A recomputed checksum is never 0xffff's
    /// twin 0x0000 unless everything sums to zero; the incremental one may give either form of
    /// zero, which receivers accept alike.
    fn assert_same_checksum(got: u16, want: u16, round: usize) {
        assert!(
            got == want || (got ^ want == 0xffff && (got == 0 || want == 0)),
            "round {round}: {got:#x} vs {want:#x}"
        );
    }

    #[test]
    fn delta_over_a_whole_ipv4_nat_matches_recompute() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2_000 {
            let proto = if round % 2 == 0 { 6 } else { 17 };
            let mut h = header();
            h[9] = proto;
            h[12..20].copy_from_slice(
                &[random_words(&mut seed), random_words(&mut seed)]
                    .map(u32::to_ne_bytes)
                    .concat(),
            );
            set_check(&mut h);
            let seg = random_segment(&mut seed, proto);
            let (src, dst) = (h[12..16].try_into().unwrap(), h[16..20].try_into().unwrap());
            let c = as_sent(proto, l4_checksum(src, dst, proto, &seg));
            let new: [u32; 3] = core::array::from_fn(|_| random_words(&mut seed));

            let old: [u32; 2] = ne_words(&h[12..20]);
            let addrs = Delta::default().word(old[0], new[0]).word(old[1], new[1]);
            let (old_ports, new_ports) = (halves(&seg[0..4]), halves(&new[2].to_ne_bytes()));
            let all = addrs
                .port(old_ports[0], new_ports[0])
                .port(old_ports[1], new_ports[1]);
            let ip_check = addrs.apply(u16::from_ne_bytes([h[10], h[11]]));
            let l4_check = if proto == 6 {
                all.apply(c)
            } else {
                all.apply_udp(c)
            };

            let mut nh = h;
            nh[12..16].copy_from_slice(&new[0].to_ne_bytes());
            nh[16..20].copy_from_slice(&new[1].to_ne_bytes());
            set_check(&mut nh);
            assert_eq!(ip_check.to_ne_bytes(), [nh[10], nh[11]], "round {round}");
            let mut nseg = seg;
            nseg[0..4].copy_from_slice(&new[2].to_ne_bytes());
            let want = l4_checksum(
                nh[12..16].try_into().unwrap(),
                nh[16..20].try_into().unwrap(),
                proto,
                &nseg,
            );
            assert_same_checksum(l4_check, as_sent(proto, want), round);
        }
    }

    #[test]
    fn delta_over_ipv6_addresses_and_ports_matches_recompute() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        for round in 0..2_000 {
            let proto = if round % 2 == 0 { 6 } else { 17 };
            let (src, dst, new_src, new_dst) = (
                addr(&mut seed),
                addr(&mut seed),
                addr(&mut seed),
                addr(&mut seed),
            );
            let seg = random_segment(&mut seed, proto);
            let c = as_sent(proto, l4_checksum6(bytes(src), bytes(dst), proto, &seg));
            let ports = random_words(&mut seed);
            let (old_ports, new_ports) = (halves(&seg[0..4]), halves(&ports.to_ne_bytes()));
            let d = Delta::default()
                .words(&src, &new_src)
                .words(&dst, &new_dst)
                .port(old_ports[0], new_ports[0])
                .port(old_ports[1], new_ports[1]);
            let got = if proto == 6 {
                d.apply(c)
            } else {
                d.apply_udp(c)
            };
            let mut nseg = seg;
            nseg[0..4].copy_from_slice(&ports.to_ne_bytes());
            let want = l4_checksum6(bytes(new_src), bytes(new_dst), proto, &nseg);
            assert_same_checksum(got, as_sent(proto, want), round);
        }
    }

    /// The kernel's 32-bit one's-complement add (`csum_add`).
    fn csum_add(a: u32, b: u32) -> u32 {
        let (sum, carry) = a.overflowing_add(b);
        sum + carry as u32
    }

    /// What `bpf_l4_csum_replace` does with a precomputed difference and `BPF_F_PSEUDO_HDR`
    /// (`inet_proto_csum_replace_by_diff`): to a full checksum, or to an offloaded packet's
    /// partial sum of the pseudo-header (`CHECKSUM_PARTIAL`).
    fn kernel_replace_by_diff(check: u16, diff: u32, partial: bool) -> u16 {
        if partial {
            fold(csum_add(diff, check as u32))
        } else {
            !fold(csum_add(diff, !(check as u32)))
        }
    }

    #[test]
    fn wsum_through_the_kernels_diff_update_matches_recompute() {
        let mut seed = 0x51_7cc1_b727_220a;
        for round in 0..2_000 {
            let proto = if round % 2 == 0 { 6 } else { 17 };
            // Every other round an IPv4 address (IPv4-mapped), as `Addr` holds it.
            let (src, dst, new_src) = if round % 4 < 2 {
                (addr(&mut seed), addr(&mut seed), addr(&mut seed))
            } else {
                let v4 = |seed: &mut u64| [0, 0, 0xffffu32.to_be(), random_words(seed)];
                (v4(&mut seed), v4(&mut seed), v4(&mut seed))
            };
            let diff = Delta::default().words(&src, &new_src).wsum();
            let seg = random_segment(&mut seed, proto);
            let full = l4_checksum6(bytes(src), bytes(dst), proto, &seg);
            let want = l4_checksum6(bytes(new_src), bytes(dst), proto, &seg);
            assert_same_checksum(kernel_replace_by_diff(full, diff, false), want, round);
            // A partial sum is the pseudo-header's sum alone, not inverted.
            let pseudo = |s: [u32; 4]| !l4_checksum6(bytes(s), bytes(dst), proto, &[]);
            let got = kernel_replace_by_diff(pseudo(src), diff, true);
            assert_same_checksum(got, pseudo(new_src), round);
        }
    }

    #[test]
    fn delta_keeps_a_disabled_udp_checksum_disabled() {
        assert_eq!(Delta::default().word(1, 2).apply_udp(0), 0);
    }

    #[test]
    fn udp_zero_checksum_stays_disabled() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }

    #[test]
    fn odd_length_padding() {
        assert_eq!(sum_bytes(&[0xab], 0), u16::from_ne_bytes([0xab, 0]) as u32);
    }

    /// A TCP or UDP segment (header and `payload`) between two IPv4 or IPv6 addresses, with its
    /// checksum field as an offloading Linux sender leaves it (`~tcp_v4_check(len, s, d, 0)`).
    fn partial_segment(
        proto: u8,
        payload: &[u8],
        v6: bool,
    ) -> (Vec<u8>, usize, [u32; 4], [u32; 4]) {
        let header = if proto == 6 { 20 } else { 8 };
        let mut seg = vec![0u8; header];
        seg[0..4].copy_from_slice(&[0xc3, 0x51, 0x77, 0x88]);
        if proto == 6 {
            seg[12] = 0x50;
            seg[13] = 0x02;
        } else {
            let len = (header + payload.len()) as u16;
            seg[4..6].copy_from_slice(&len.to_be_bytes());
        }
        seg.extend_from_slice(payload);
        let check_at = if proto == 6 { 16 } else { 6 };
        let (s, d) = if v6 {
            (
                [0x2001_0002u32.to_be(), 0, 0, 0x20u32.to_be()],
                [0x2001_0002u32.to_be(), 0, 7, 0x10u32.to_be()],
            )
        } else {
            (
                [0xc612_c801u32.to_be(), 0, 0, 0],
                [0xc612_c80au32.to_be(), 0, 0, 0],
            )
        };
        let len = seg.len() as u16;
        let partial = if v6 {
            pseudo_header6(&s, &d, proto, len)
        } else {
            pseudo_header4(s[0], d[0], proto, len)
        };
        // The kernel's value, from the full checksum of an empty segment of that length.
        let octets = |w: &[u32; 4]| -> [u8; 16] {
            let mut o = [0u8; 16];
            for (i, x) in w.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
            }
            o
        };
        let zeros = vec![0u8; seg.len()];
        let empty = if v6 {
            l4_checksum6(octets(&s), octets(&d), proto, &zeros)
        } else {
            let (a, b) = (octets(&s), octets(&d));
            l4_checksum(
                a[..4].try_into().unwrap(),
                b[..4].try_into().unwrap(),
                proto,
                &zeros,
            )
        };
        assert_eq!(
            partial, !empty,
            "the pseudo-header's sum, as Linux leaves it"
        );
        seg[check_at..check_at + 2].copy_from_slice(&partial.to_ne_bytes());
        (seg, check_at, s, d)
    }

    #[test]
    fn a_partial_checksum_is_told_apart_and_completed_after_a_translation() {
        for (proto, v6, payload) in [
            (6u8, false, &b"GET / HTTP/1.1\r\n\r\n"[..]),
            (17, false, &b"hello"[..]),
            (6, true, &b"x"[..]),
            (17, true, &[0xffu8; 301][..]),
        ] {
            let (mut seg, at, s, d) = partial_segment(proto, payload, v6);
            let field = u16::from_ne_bytes([seg[at], seg[at + 1]]);
            let len = seg.len() as u16;
            let pseudo = |s: &[u32; 4], d: &[u32; 4]| {
                if v6 {
                    pseudo_header6(s, d, proto, len)
                } else {
                    pseudo_header4(s[0], d[0], proto, len)
                }
            };
            let sum = sum_bytes(&seg, 0);
            assert!(is_partial(field, pseudo(&s, &d), sum), "{proto} {v6}");
            // DNAT to a pod and its port, as XDP does.
            let pod = if v6 {
                [0x2001_0002u32.to_be(), 0, 1, 2u32.to_be()]
            } else {
                [0xc613_0102u32.to_be(), 0, 0, 0]
            };
            let old_port = u16::from_ne_bytes([seg[2], seg[3]]);
            let new_port = 50000u16.to_be();
            let ports = Delta::default().port(old_port, new_port);
            let addrs = if v6 {
                Delta::default().words(&d, &pod)
            } else {
                Delta::default().word(d[0], pod[0])
            };
            // Kept partial (the kernel completes it): the new pseudo-header's sum.
            assert_eq!(addrs.apply_partial(field), pseudo(&s, &pod));
            // Completed (sent from XDP): the full checksum of the new segment.
            let full = complete(sum, field, ports, pseudo(&s, &pod));
            seg[2..4].copy_from_slice(&new_port.to_ne_bytes());
            seg[at..at + 2].copy_from_slice(&[0, 0]);
            let octets =
                |w: &[u32; 4]| -> Vec<u8> { w.iter().flat_map(|x| x.to_ne_bytes()).collect() };
            let want = if v6 {
                l4_checksum6(
                    octets(&s).try_into().unwrap(),
                    octets(&pod).try_into().unwrap(),
                    proto,
                    &seg,
                )
            } else {
                l4_checksum(
                    octets(&s)[..4].try_into().unwrap(),
                    octets(&pod)[..4].try_into().unwrap(),
                    proto,
                    &seg,
                )
            };
            assert_eq!(full, want, "{proto} {v6}");
            // A full checksum is no partial one, also when it happens to equal the pseudo-header's
            // sum: a payload word chosen to make it so.
            seg[at..at + 2].copy_from_slice(&want.to_ne_bytes());
            let p = pseudo(&s, &pod);
            assert!(!is_partial(want, p, sum_bytes(&seg, 0)));
            let w = seg.len() - 2 - (seg.len() % 2);
            seg[w..w + 2].copy_from_slice(&[0, 0]);
            seg[at..at + 2].copy_from_slice(&[0, 0]);
            let x = fold(p as u32 + sum_bytes(&seg, 0));
            seg[w..w + 2].copy_from_slice(&fold(!p as u32 + !x as u32).to_ne_bytes());
            seg[at..at + 2].copy_from_slice(&p.to_ne_bytes());
            let valid = fold(p as u32 + sum_bytes(&seg, 0));
            assert_eq!(valid, 0xffff, "a valid checksum equal to it");
            assert!(!is_partial(p, p, sum_bytes(&seg, 0)), "{proto} {v6}");
        }
    }
}
