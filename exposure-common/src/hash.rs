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

/// The `attempt`th SNAT port (host order, in `first..=last`) a flow whose hash is `flow` tries.
/// Each attempt is an independent pick, not the next port: flows that all stepped through ports in
/// one order would crowd into runs of taken ports, and a new flow starting in a run would need many
/// tries (linear probing's clustering). Independent picks find a free port in 1 / (share free)
/// tries on average, however the taken ones lie.
#[inline(always)]
pub fn snat_port_candidate(flow: u32, attempt: u32, first: u16, last: u16) -> u16 {
    let range = last.saturating_sub(first) as u32 + 1;
    let pick = if attempt == 0 {
        flow
    } else {
        mix(flow ^ attempt.wrapping_mul(0x9e37_79b9))
    };
    first + (pick % range) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES};

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

    #[test]
    fn snat_candidates_stay_in_range_and_differ_per_attempt() {
        for flow in [0, 1, 0xffff_ffff, 0x1234_5678] {
            let ports: std::collections::BTreeSet<u16> = (0..SNAT_PORT_TRIES)
                .map(|a| snat_port_candidate(flow, a, SNAT_PORT_MIN, SNAT_PORT_MAX))
                .collect();
            assert!(ports
                .iter()
                .all(|p| (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(p)));
            // Independent picks among 4,536 ports: a few repeats at most.
            assert!(
                ports.len() as u32 >= SNAT_PORT_TRIES - 4,
                "flow {flow:#x}: {} distinct of {SNAT_PORT_TRIES}",
                ports.len()
            );
        }
        assert_eq!(
            snat_port_candidate(7, 0, SNAT_PORT_MIN, SNAT_PORT_MAX),
            SNAT_PORT_MIN + 7
        );
        // A configured range, down to one port.
        for a in 0..SNAT_PORT_TRIES {
            assert!((40000..=40099).contains(&snat_port_candidate(0xdead_beef, a, 40000, 40099)));
            assert_eq!(snat_port_candidate(0xdead_beef, a, 40000, 40000), 40000);
        }
    }

    /// Ports taken by flows that claimed them with these candidates, as the datapath does, until
    /// `share` of the range is taken; then how many of `trials` further flows find none.
    fn flows_without_a_port(share: f64, trials: u32) -> u32 {
        let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as usize + 1;
        let mut taken = vec![false; range];
        let claim = |taken: &mut Vec<bool>, flow: u32| {
            (0..SNAT_PORT_TRIES)
                .map(|a| {
                    (snat_port_candidate(flow, a, SNAT_PORT_MIN, SNAT_PORT_MAX) - SNAT_PORT_MIN)
                        as usize
                })
                .find(|&i| !taken[i])
                .map(|i| taken[i] = true)
        };
        let mut flow = 0u32;
        let mut held = 0;
        while (held as f64) < share * range as f64 {
            flow += 1;
            if claim(&mut taken, mix(flow)).is_some() {
                held += 1;
            }
        }
        (0..trials)
            .filter(|t| {
                let mut probe = taken.clone();
                claim(&mut probe, mix(0x8000_0000 | t)).is_none()
            })
            .count() as u32
    }

    #[test]
    fn snat_ports_are_found_until_the_range_is_nearly_full() {
        // Filled by the flows' own picks: no clustering, so a new flow's chance of finding no
        // port stays near (share taken)^tries: 0.9^64 is about 1 in 850.
        assert_eq!(flows_without_a_port(0.5, 2_000), 0);
        assert!(flows_without_a_port(0.9, 2_000) <= 10);
        // Nearly full, most flows still find one of the few ports left.
        assert!(flows_without_a_port(0.97, 1_000) < 300);
    }
}
