//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size M in which
//! each backend owns ≈ M/N entries, and adding or removing one backend moves only ≈ 1/N of them.
//! The table depends only on the backends' addresses, so every node builds the same one and a flow
//! without a conntrack entry goes to the same backend whichever node it reaches.

use std::net::IpAddr;

/// Table sizes (primes, as Cilium offers); the smallest at least 100 × backends is used.
pub const TABLE_SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Table size for `backends`: ≥ 100 × backends where the cap allows.
pub fn table_size(backends: usize, max: u32) -> u32 {
    let want = (backends as u64 * 100).max(1);
    TABLE_SIZES
        .iter()
        .copied()
        .filter(|m| *m <= max.max(TABLE_SIZES[0]))
        .find(|m| *m as u64 >= want)
        .unwrap_or_else(|| {
            TABLE_SIZES
                .iter()
                .copied()
                .filter(|m| *m <= max.max(TABLE_SIZES[0]))
                .max()
                .unwrap_or(TABLE_SIZES[0])
        })
}

/// 64-bit FNV-1a with a seed: stable across runs, nodes and versions.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV alone mixes the last bytes weakly; finish with a murmur3-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The Maglev table for `backends` (any order: they are sorted here): entry i is an index into the
/// sorted backend list.
pub fn build(backends: &[(IpAddr, u16)], m: u32) -> Vec<u32> {
    let mut sorted: Vec<(IpAddr, u16)> = backends.to_vec();
    sorted.sort();
    sorted.dedup();
    let n = sorted.len();
    let m = m as usize;
    if n == 0 {
        return Vec::new();
    }
    // Each backend walks its own permutation of the entries, offset, offset + skip, … (mod m):
    // `next` holds where its walk stands. Adding skip and wrapping once is the same walk as
    // computing (offset + j × skip) mod m afresh, without a division per probe.
    let (mut next, skips): (Vec<usize>, Vec<usize>) = sorted
        .iter()
        .map(|(ip, port)| {
            let mut id = [0u8; 18];
            let len = match ip {
                IpAddr::V4(v4) => {
                    id[..4].copy_from_slice(&v4.octets());
                    4
                }
                IpAddr::V6(v6) => {
                    id[..16].copy_from_slice(&v6.octets());
                    16
                }
            };
            id[len..len + 2].copy_from_slice(&port.to_be_bytes());
            let id = &id[..len + 2];
            let offset = (fnv(0x6d61_676c, id) % m as u64) as usize;
            let skip = (fnv(0x6576_2121, id) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .unzip();
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, (c, &skip)) in next.iter_mut().zip(&skips).enumerate() {
            // Each backend takes its next preferred free entry, in turn.
            while table[*c] != u32::MAX {
                *c = step(*c, skip, m);
            }
            table[*c] = i as u32;
            *c = step(*c, skip, m);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

/// The entry after `c` in a walk of step `skip` through `m` entries (both below `m`).
#[inline(always)]
fn step(c: usize, skip: usize, m: usize) -> usize {
    let c = c + skip;
    if c >= m {
        c - m
    } else {
        c
    }
}

/// Backends in the order `build` indexes them.
pub fn order(backends: &[(IpAddr, u16)]) -> Vec<(IpAddr, u16)> {
    let mut sorted = backends.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<(IpAddr, u16)> {
        (0..n)
            .map(|i| {
                (
                    IpAddr::from(std::net::Ipv4Addr::from(0xc613_0100 + i)),
                    8080,
                )
            })
            .collect()
    }

    /// The backend each entry maps to, by address.
    fn owners(b: &[(IpAddr, u16)], m: u32) -> Vec<(IpAddr, u16)> {
        let sorted = order(b);
        build(b, m)
            .into_iter()
            .map(|i| sorted[i as usize])
            .collect()
    }

    /// The table as the paper writes it down (and as earlier builds made it): entry j of backend
    /// i's permutation computed as (offset + j × skip) mod m.
    fn build_by_formula(backends: &[(IpAddr, u16)], m: u32) -> Vec<u32> {
        let sorted = order(backends);
        let m = m as usize;
        let perms: Vec<(usize, usize)> = sorted
            .iter()
            .map(|(ip, port)| {
                let mut id = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                id.extend_from_slice(&port.to_be_bytes());
                let offset = (fnv(0x6d61_676c, &id) % m as u64) as usize;
                let skip = (fnv(0x6576_2121, &id) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; perms.len()];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        table
    }

    /// Tables already in the maps were written by earlier builds: a restarted agent must make the
    /// same ones, or it would rewrite (and move flows of) every Service.
    #[test]
    fn tables_are_those_of_the_formula_for_both_families_and_every_size() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for m in TABLE_SIZES {
            for n in [1usize, 2, 3, 10, 57, 300] {
                let b: Vec<(IpAddr, u16)> = (0..n)
                    .map(|_| {
                        let r = random();
                        let ip = if r & 1 == 0 {
                            IpAddr::from(std::net::Ipv4Addr::from(r as u32))
                        } else {
                            IpAddr::from(std::net::Ipv6Addr::from(
                                (r as u128) << 64 | random() as u128,
                            ))
                        };
                        (ip, (r >> 40) as u16)
                    })
                    .collect();
                assert_eq!(build(&b, m), build_by_formula(&b, m), "m={m} n={n}");
            }
        }
    }

    #[test]
    fn sizes_are_primes_above_100_per_backend_within_the_cap() {
        for m in TABLE_SIZES {
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} is not prime"
            );
        }
        assert_eq!(table_size(1, 65521), 251);
        assert_eq!(table_size(3, 65521), 509);
        assert_eq!(table_size(10, 65521), 1021);
        assert_eq!(table_size(600, 65521), 65521);
        assert_eq!(table_size(600, 4093), 4093, "capped");
    }

    #[test]
    fn every_backend_gets_its_share_and_order_does_not_matter() {
        for n in [1u32, 2, 3, 7, 10, 50] {
            let b = backends(n);
            let m = table_size(n as usize, 65521);
            let t = build(&b, m);
            assert_eq!(t.len(), m as usize);
            let mut counts = vec![0u32; n as usize];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let fair = m / n;
            for c in &counts {
                assert!(
                    c.abs_diff(fair) <= fair / 50 + 1,
                    "n={n}: {counts:?} (fair {fair})"
                );
            }
            let mut reversed = b.clone();
            reversed.reverse();
            assert_eq!(
                build(&reversed, m),
                t,
                "same inputs, same table on every node"
            );
        }
    }

    #[test]
    fn one_backend_more_or_less_moves_about_one_nth_of_the_entries() {
        for n in [5u32, 10, 40] {
            let b = backends(n + 1);
            let m = table_size(n as usize + 1, 65521);
            let full = owners(&b, m);
            for removed in [0usize, n as usize / 2, n as usize] {
                let mut fewer = b.clone();
                let gone = fewer.remove(removed);
                let after = owners(&fewer, m);
                let moved = full.iter().zip(&after).filter(|(x, y)| x != y).count();
                let must = full.iter().filter(|x| **x == gone).count();
                // Entries of the removed backend must move; few others may.
                assert!(moved >= must);
                assert!(
                    (moved - must) as f64 <= 0.05 * m as f64,
                    "n={n}: {moved} moved, {must} had to (m={m})"
                );
                // Adding it back is the same question the other way round.
                assert_eq!(owners(&b, m), full);
            }
        }
    }
}
