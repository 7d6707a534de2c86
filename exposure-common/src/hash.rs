//! Flow hashing for backend selection and SNAT port choice. Deterministic and identical on every node,
//! so independent nodes pick the same backend for the same flow and table.

use crate::addr::Addr;

/// murmur3's 32-bit finaliser: full avalanche in a few multiplies, cheap in BPF.
#[inline(always)]
pub fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    x
}

/// Hash of a flow's 5-tuple as it arrives (values in wire order, loaded natively).
#[inline(always)]
pub fn flow_hash(saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix(0x9e37_79b9 ^ proto as u32);
    h = mix(h ^ saddr.fold());
    h = mix(h ^ daddr.fold());
    mix(h ^ (((sport as u32) << 16) | dport as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(raw: u32) -> Addr {
        Addr::v4(raw)
    }

    #[test]
    fn deterministic_and_sensitive_to_every_field() {
        let base = flow_hash(&v4(1), &v4(2), 3, 4, 6);
        assert_eq!(base, flow_hash(&v4(1), &v4(2), 3, 4, 6));
        let v6 = Addr([0x0220_0120, 0, 0, 1]);
        for other in [
            flow_hash(&v4(9), &v4(2), 3, 4, 6),
            flow_hash(&v4(1), &v4(9), 3, 4, 6),
            flow_hash(&v4(1), &v4(2), 9, 4, 6),
            flow_hash(&v4(1), &v4(2), 3, 9, 6),
            flow_hash(&v4(1), &v4(2), 3, 4, 17),
            flow_hash(&v6, &v4(2), 3, 4, 6),
            flow_hash(&Addr([0x0220_0120, 0, 0, 2]), &v4(2), 3, 4, 6),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn spreads_client_ports_evenly_over_buckets() {
        let buckets = 7u32;
        let mut counts = [0u32; 7];
        for sport in 30000u16..44000 {
            counts[(flow_hash(
                &v4(0x0112_12c6),
                &v4(0x0201_12c6),
                sport.to_be(),
                60000u16.to_be(),
                6,
            ) % buckets) as usize] += 1;
        }
        let expect = 14000 / buckets;
        for c in counts {
            assert!(
                c > expect * 9 / 10 && c < expect * 11 / 10,
                "uneven: {counts:?}"
            );
        }
    }
}
