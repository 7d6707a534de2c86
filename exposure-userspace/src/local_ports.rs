//! Ports the node's own connections must not take. The datapath translates, by destination port
//! alone, packets to NodePorts and replies to SNAT ports (`--snat-port-range`). A connection the
//! node itself opens from such a port (its ephemeral range is a sysctl; `1024 65535` is a common
//! tuning) would have its replies taken for a Service's or a client's. So the agent reserves both
//! ranges in `net.ipv4.ip_local_reserved_ports` (for IPv6 too), as Cilium protects its NodePort
//! range: the kernel then never picks them for an unbound socket, and explicit `bind()`s still work.

use std::{fmt, ops::RangeInclusive, path::Path};

use anyhow::Context as _;

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Fewest ephemeral ports the reservation may leave the node: below that the node's own outgoing
/// connections would fail, which is worse than the collisions the reservation prevents.
pub const MIN_EPHEMERAL_LEFT: u32 = 1_024;

/// A set of ports as sorted, disjoint, non-adjacent ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad port list {text:?}: {why}")]
pub struct PortListError {
    text: String,
    why: &'static str,
}

impl PortListError {
    fn new(text: &str, why: &'static str) -> PortListError {
        PortListError {
            text: text.trim().to_string(),
            why,
        }
    }
}

impl PortSet {
    pub fn new(ranges: impl IntoIterator<Item = RangeInclusive<u16>>) -> PortSet {
        let mut ranges: Vec<_> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
        ranges.sort_by_key(|r| *r.start());
        let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(*r.start()) <= u32::from(*last.end()) + 1 => {
                    *last = *last.start()..=(*last.end()).max(*r.end());
                }
                _ => merged.push(r),
            }
        }
        PortSet(merged)
    }

    /// The kernel's list form: `1,3-5` (empty for none), as `ip_local_reserved_ports` shows it.
    pub fn parse(text: &str) -> Result<PortSet, PortListError> {
        let err = |why| PortListError::new(text, why);
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| err("not a port number"))
        };
        let mut ranges = Vec::new();
        for item in text.trim().split(',').filter(|s| !s.trim().is_empty()) {
            let range = match item.split_once('-') {
                Some((a, b)) => port(a)?..=port(b)?,
                None => port(item)?..=port(item)?,
            };
            if range.is_empty() {
                return Err(err("a range ends before it starts"));
            }
            ranges.push(range);
        }
        Ok(PortSet::new(ranges))
    }

    pub fn union(&self, other: &PortSet) -> PortSet {
        PortSet::new(self.0.iter().chain(&other.0).cloned())
    }

    pub fn contains_all(&self, other: &PortSet) -> bool {
        self.union(other) == *self
    }

    pub fn overlaps(&self, other: &PortSet) -> bool {
        self.0.iter().any(|a| {
            other
                .0
                .iter()
                .any(|b| a.start() <= b.end() && b.start() <= a.end())
        })
    }

    /// How many ports of `range` are not in the set.
    pub fn free_in(&self, range: &RangeInclusive<u16>) -> u32 {
        let len = |r: &RangeInclusive<u16>| {
            (u32::from(*r.end()) + 1).saturating_sub(u32::from(*r.start()))
        };
        let taken: u32 = self
            .0
            .iter()
            .map(|r| len(&((*r.start()).max(*range.start())..=(*r.end()).min(*range.end()))))
            .sum();
        len(range) - taken
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            if r.start() == r.end() {
                write!(f, "{sep}{}", r.start())?;
            } else {
                write!(f, "{sep}{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

/// The node's ephemeral range as `ip_local_port_range` shows it (`32768\t60999`).
pub fn parse_ephemeral(text: &str) -> Result<RangeInclusive<u16>, PortListError> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Ok(low..=high),
        _ => Err(PortListError::new(text, "not two ports, low then high")),
    }
}

/// What reserving `wanted` comes to, given the reserved list and ephemeral range now.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    AlreadyReserved,
    /// Write this list (what was reserved, with `wanted`).
    Reserve(PortSet),
    /// Left as it is: reserving would leave the node only `left` ephemeral ports.
    WouldStarve {
        left: u32,
        ephemeral: RangeInclusive<u16>,
    },
}

pub fn plan(reserved: &PortSet, ephemeral: &RangeInclusive<u16>, wanted: &PortSet) -> Reservation {
    if reserved.contains_all(wanted) {
        return Reservation::AlreadyReserved;
    }
    let after = reserved.union(wanted);
    let left = after.free_in(ephemeral);
    if left < MIN_EPHEMERAL_LEFT {
        Reservation::WouldStarve {
            left,
            ephemeral: ephemeral.clone(),
        }
    } else {
        Reservation::Reserve(after)
    }
}

/// Reserves `wanted` in this network namespace's `ip_local_reserved_ports`, keeping what was there.
pub fn reserve(wanted: &PortSet) -> anyhow::Result<Reservation> {
    let read = |path: &str| {
        std::fs::read_to_string(Path::new(path)).with_context(|| format!("reading {path}"))
    };
    let reserved = PortSet::parse(&read(RESERVED)?)?;
    let ephemeral = parse_ephemeral(&read(EPHEMERAL)?)?;
    let outcome = plan(&reserved, &ephemeral, wanted);
    if let Reservation::Reserve(list) = &outcome {
        std::fs::write(RESERVED, list.to_string())
            .with_context(|| format!("writing {RESERVED}"))?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PortSet {
        PortSet::parse(text).unwrap()
    }

    #[test]
    fn parses_and_prints_the_kernels_list_form() {
        assert_eq!(set(""), PortSet::default());
        assert_eq!(set("\n"), PortSet::default());
        assert_eq!(
            set("100,30000-32767,61000-65535\n").to_string(),
            "100,30000-32767,61000-65535"
        );
        // Sorted, overlapping and adjacent ranges merged, as the kernel shows them.
        assert_eq!(set("8080,10-20,15-30,31,5").to_string(), "5,10-31,8080");
        assert_eq!(set("65535").to_string(), "65535");
    }

    #[test]
    fn bad_lists_are_errors_that_say_why() {
        for bad in ["x", "1-", "20-10", "70000", "1,,2-x"] {
            let e = PortSet::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{:?}", bad.trim())), "{e}");
        }
        assert!(parse_ephemeral("60999 32768").is_err());
        assert!(parse_ephemeral("1024").is_err());
        assert_eq!(parse_ephemeral("32768\t60999\n"), Ok(32768..=60999));
    }

    #[test]
    fn overlaps_when_a_port_is_in_both() {
        let node_ports = set("30000-32767");
        assert!(!node_ports.overlaps(&set("61000-65535")));
        assert!(!node_ports.overlaps(&set("29999,32768")));
        assert!(node_ports.overlaps(&set("32767-40000")));
        assert!(node_ports.overlaps(&set("1,31000")));
        assert!(!node_ports.overlaps(&set("")));
    }

    #[test]
    fn free_ports_of_a_range() {
        let s = set("30000-32767,61000-65535");
        assert_eq!(s.free_in(&(32768..=60999)), 28_232);
        assert_eq!(s.free_in(&(1024..=65535)), 64_512 - 2_768 - 4_536);
        assert_eq!(s.free_in(&(30000..=30000)), 0);
        assert_eq!(set("").free_in(&(0..=65535)), 65_536);
    }

    #[test]
    fn reservation_keeps_what_was_reserved_and_adds_the_rest() {
        let wanted = set("30000-32767,61000-65535");
        let default_range = 32768..=60999;
        assert_eq!(
            plan(&set(""), &default_range, &wanted),
            Reservation::Reserve(wanted.clone())
        );
        assert_eq!(
            plan(&set("9100,31000-31010"), &(1024..=65535), &wanted),
            Reservation::Reserve(set("9100,30000-32767,61000-65535"))
        );
        assert_eq!(
            plan(&set("61000-65535,30000-40000"), &default_range, &wanted),
            Reservation::AlreadyReserved
        );
        // A node whose ephemeral ports lie almost all in the ranges keeps its list: its own
        // connections would otherwise fail.
        assert_eq!(
            plan(&set(""), &(60000..=65535), &wanted),
            Reservation::WouldStarve {
                left: 1_000,
                ephemeral: 60000..=65535
            }
        );
    }
}
