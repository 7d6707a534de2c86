//! One address type for both families, as Katran keys its maps: 16 bytes in wire order, IPv4 held as
//! the IPv4-mapped IPv6 address `::ffff:a.b.c.d`. A key never matches across families. The maps
//! looked up on every packet (frontends, flows) keep IPv4 keys in a compact form of their own
//! ([`crate::FlowKey4`], [`crate::FrontendKey4`]): the kernel hashes every key byte per lookup.

/// The third word of an IPv4-mapped address (`0000:ffff`), as loaded natively from the packet.
pub const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `NodeAddrKey::family` and the family numbers the programs use.
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);

impl Addr {
    /// An IPv4 address as loaded from the packet (wire order).
    #[inline(always)]
    pub const fn v4(raw: u32) -> Self {
        Addr([0, 0, V4_MAPPED, raw])
    }

    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED
    }

    /// The IPv4 address in wire order (meaningful when [`Addr::is_v4`]).
    #[inline(always)]
    pub fn v4_raw(&self) -> u32 {
        self.0[3]
    }

    /// An address in 127.0.0.0/8 (IPv4 loopback).
    #[inline(always)]
    pub fn is_v4_loopback(&self) -> bool {
        self.is_v4()
            && self.v4_raw() & u32::from_ne_bytes([255, 0, 0, 0])
                == u32::from_ne_bytes([127, 0, 0, 0])
    }

    #[inline(always)]
    pub fn is_unspecified(&self) -> bool {
        self.0 == [0; 4] || *self == Addr::v4(0)
    }

    /// XOR of the four words: the input to the flow hash.
    #[inline(always)]
    pub fn fold(&self) -> u32 {
        self.0[0] ^ self.0[1] ^ self.0[2] ^ self.0[3]
    }

    /// A socket's client for ClientIP affinity at the socket hooks, which run before the socket
    /// has a source address: its network namespace (as Cilium's socket LB does), so the node is
    /// one client and each pod another. An address in 100::/64, the discard-only prefix (RFC
    /// 6666), is never a packet's source.
    #[inline(always)]
    pub const fn of_netns(cookie: u64) -> Self {
        Addr([
            u32::from_ne_bytes([1, 0, 0, 0]),
            0,
            (cookie >> 32) as u32,
            cookie as u32,
        ])
    }

    pub fn from_octets(o: [u8; 16]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Addr([w(0), w(4), w(8), w(12)])
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        for (i, w) in self.0.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o
    }

    pub fn family(&self) -> u32 {
        if self.is_v4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::v4(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => Addr::from_octets(v6.octets()),
        }
    }
}

impl From<core::net::Ipv4Addr> for Addr {
    fn from(ip: core::net::Ipv4Addr) -> Self {
        Addr::v4(u32::from_ne_bytes(ip.octets()))
    }
}

impl From<core::net::Ipv6Addr> for Addr {
    fn from(ip: core::net::Ipv6Addr) -> Self {
        Addr::from_octets(ip.octets())
    }
}

impl From<Addr> for core::net::IpAddr {
    fn from(a: Addr) -> Self {
        if a.is_v4() {
            core::net::IpAddr::V4(core::net::Ipv4Addr::from(a.v4_raw().to_ne_bytes()))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from(a.octets()))
        }
    }
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&core::net::IpAddr::from(*self), f)
    }
}

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn ipv4_loopback_is_all_of_127_slash_8_and_nothing_else() {
        for (ip, loopback) in [
            ([127, 0, 0, 1], true),
            ([127, 255, 3, 9], true),
            ([128, 0, 0, 1], false),
            ([198, 18, 0, 127], false),
            ([1, 0, 0, 127], false),
        ] {
            assert_eq!(
                Addr::from(Ipv4Addr::from(ip)).is_v4_loopback(),
                loopback,
                "{ip:?}"
            );
        }
        assert!(!Addr::from(Ipv6Addr::LOCALHOST).is_v4_loopback());
        let mapped = Addr::from(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()));
        assert!(mapped.is_v4_loopback(), "as an IPv6 socket names it");
    }

    #[test]
    fn a_network_namespace_is_a_client_in_the_discard_prefix() {
        let a = Addr::of_netns(0x0123_4567_89ab_cdef);
        let ip = Ipv6Addr::from(a.octets());
        assert_eq!(ip.segments()[..4], [0x100, 0, 0, 0], "{ip}");
        assert!(!a.is_v4() && !a.is_unspecified());
        assert_ne!(a, Addr::of_netns(0x0123_4567_89ab_cdee));
        assert_ne!(
            a,
            Addr::of_netns(0x0123_4566_89ab_cdef),
            "both halves count"
        );
    }

    #[test]
    fn ipv4_is_mapped_and_round_trips() {
        let ip = Ipv4Addr::new(198, 18, 0, 10);
        let a = Addr::from(ip);
        assert!(a.is_v4());
        assert_eq!(a.v4_raw().to_ne_bytes(), ip.octets());
        assert_eq!(a.octets(), ip.to_ipv6_mapped().octets());
        assert_eq!(IpAddr::from(a), IpAddr::V4(ip));
        assert_eq!(a.family(), FAMILY_V4);
        assert_eq!(a.to_string(), "198.18.0.10");
    }

    #[test]
    fn ipv6_round_trips_and_differs_from_every_ipv4() {
        let ip: Ipv6Addr = "2001:2::10".parse().unwrap();
        let a = Addr::from(ip);
        assert!(!a.is_v4());
        assert_eq!(a.octets(), ip.octets());
        assert_eq!(IpAddr::from(a), IpAddr::V6(ip));
        assert_eq!(a.family(), FAMILY_V6);
        assert_ne!(
            Addr::from(Ipv6Addr::UNSPECIFIED),
            Addr::from(Ipv4Addr::UNSPECIFIED)
        );
        assert!(Addr::from(Ipv6Addr::UNSPECIFIED).is_unspecified());
        assert!(Addr::from(Ipv4Addr::UNSPECIFIED).is_unspecified());
        assert!(!a.is_unspecified());
    }
}
