//! The node's interfaces: index and addresses (the NodePort addresses; IPv6 link-local ones excluded).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;
use exposure_common::{Addr, NodeAddrKey};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// In the kernel's order: IPv4 primary addresses in the order they were added, then secondary
    /// ones; IPv6 addresses newest first.
    pub addrs: Vec<IpAddr>,
    /// Its IPv6 addresses the kernel would not pick as a source ([`unpreferred_ipv6`]).
    pub unpreferred: HashSet<IpAddr>,
}

impl Interface {
    /// The address flows of a family leaving here are SNATed to: the one the interface was set up
    /// with, not one added beside it later (a VIP that keepalived or kube-vip moves between
    /// nodes, which would take the flows' replies with it). In the kernel's order that is the
    /// first IPv4 address and the last IPv6 one, of those the kernel would pick as a source (an
    /// old prefix is deprecated while a network renumbers), if any is.
    pub fn snat_source(&self, v6: bool) -> Option<IpAddr> {
        if !v6 {
            return self.addrs.iter().copied().find(IpAddr::is_ipv4);
        }
        let of_family = || self.addrs.iter().copied().filter(IpAddr::is_ipv6);
        of_family()
            .rfind(|a| !self.unpreferred.contains(a))
            .or_else(|| of_family().next_back())
    }
}

/// The address flows leaving each interface are SNATed to, per family (`NODE_ADDRS`): its
/// [`Interface::snat_source`]. An interface with no address of a family has no entry for it.
pub fn snat_sources(ifaces: &[Interface]) -> HashMap<NodeAddrKey, IpAddr> {
    let mut sources = HashMap::new();
    for iface in ifaces {
        for addr in [false, true]
            .into_iter()
            .filter_map(|v6| iface.snat_source(v6))
        {
            let key = NodeAddrKey {
                ifindex: iface.index,
                family: Addr::from(addr).family(),
            };
            sources.insert(key, addr);
        }
    }
    sources
}

/// `IFA_F_*` flags of IPv6 addresses the kernel does not pick as a source: temporary (privacy),
/// duplicate detection failed, deprecated, tentative (still in duplicate detection).
const UNPREFERRED_FLAGS: u8 = 0x01 | 0x08 | 0x20 | 0x40;

/// The IPv6 addresses of this thread's network namespace that the kernel would not pick as a
/// source, from `/proc/net/if_inet6` (getifaddrs has no address flags); none if it is unreadable.
fn unpreferred_ipv6() -> HashSet<IpAddr> {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        .map(|text| parse_unpreferred_ipv6(&text))
        .unwrap_or_default()
}

/// `/proc/net/if_inet6` lines: address, ifindex, prefix length, scope, flags (hex), name.
fn parse_unpreferred_ipv6(text: &str) -> HashSet<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = u128::from_str_radix(fields.next()?, 16).ok()?;
            let flags = u8::from_str_radix(fields.nth(3)?, 16).ok()?;
            (flags & UNPREFERRED_FLAGS != 0).then(|| IpAddr::V6(Ipv6Addr::from(addr)))
        })
        .collect()
}

/// Looks up each named interface; a missing one is an error (a typo should not silently expose nothing).
pub fn interfaces(names: &[String]) -> anyhow::Result<Vec<Interface>> {
    let found = present_interfaces(names)?;
    if let Some(missing) = names.iter().find(|n| !found.iter().any(|i| &i.name == *n)) {
        anyhow::bail!("interface {missing} not found");
    }
    Ok(found)
}

/// The named interfaces that exist now: one deleted (and not yet made again) is left out, and
/// the others are still followed meanwhile.
pub fn present_interfaces(names: &[String]) -> anyhow::Result<Vec<Interface>> {
    let mut addrs: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        let Some(a) = ifa.address.as_ref() else {
            continue;
        };
        let ip = if let Some(sin) = a.as_sockaddr_in() {
            IpAddr::V4(sin.ip())
        } else if let Some(sin6) = a.as_sockaddr_in6() {
            let ip = sin6.ip();
            // Link-local addresses are per link, not a node's address for clients.
            if ip.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        let of_iface = addrs.entry(ifa.interface_name.clone()).or_default();
        if !of_iface.contains(&ip) {
            of_iface.push(ip);
        }
    }
    let unpreferred = unpreferred_ipv6();
    Ok(names
        .iter()
        .filter_map(|name| {
            let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            let addrs = addrs.get(name).cloned().unwrap_or_default();
            let unpreferred = addrs
                .iter()
                .filter(|a| unpreferred.contains(a))
                .copied()
                .collect();
            Some(Interface {
                name: name.clone(),
                index,
                addrs,
                unpreferred,
            })
        })
        .collect())
}

/// Pods' interfaces: the ones `--redirect-to-pods` / `--xdp-redirect-to-pods` name by prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces {
    pub indexes: std::collections::BTreeSet<u32>,
    /// Named by a prefix but not a veth (or netkit): a bridge, say, which neither redirect can
    /// deliver through. Left out, so their pods' flows stay with the stack.
    pub not_veth: Vec<String>,
}

/// Drivers whose devices have a peer in the pod's namespace: what both redirects need.
const POD_DRIVERS: [&str; 2] = ["veth", "netkit"];

/// The interfaces whose names start with one of `prefixes`, except those in `exclude` (the node's
/// own, where the XDP program runs).
pub fn pod_interfaces(prefixes: &[String], exclude: &[String]) -> PodInterfaces {
    let mut found = PodInterfaces::default();
    let Ok(all) = nix::net::if_::if_nameindex() else {
        return found;
    };
    for i in all.iter() {
        let Ok(name) = i.name().to_str() else {
            continue;
        };
        if !prefixes.iter().any(|p| name.starts_with(p.as_str()))
            || exclude.iter().any(|e| e == name)
        {
            continue;
        }
        if driver(name).is_some_and(|d| POD_DRIVERS.contains(&d.as_str())) {
            found.indexes.insert(i.index());
        } else {
            found.not_veth.push(name.to_string());
        }
    }
    found
}

/// The interface's driver name, as `ethtool -i` shows it (`ETHTOOL_GDRVINFO`).
pub fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32] and the rest (196 bytes in all).
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return None;
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = info.as_mut_ptr().cast();
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .ok()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    if unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) } != 0 {
        return None;
    }
    let driver = &info[4..36];
    let len = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    Some(String::from_utf8_lossy(&driver[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_has_its_address_and_missing_interfaces_are_errors() {
        let lo = interfaces(&["lo".to_string()]).expect("lo exists");
        assert_eq!(
            lo[0].snat_source(false),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert!(lo[0].index > 0);
        let names = ["lo".to_string(), "no-such-if0".to_string()];
        let err = interfaces(&names).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"));
        // While the agent runs, the ones that are there are followed.
        let present = present_interfaces(&names).unwrap();
        assert_eq!(present, lo);
    }

    #[test]
    fn each_interface_is_snated_to_the_address_it_was_set_up_with_in_each_family() {
        // As the kernel lists them: IPv4 in the order added, IPv6 newest first.
        let iface = |index, addrs: &[&str]| Interface {
            name: format!("eth{index}"),
            index,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            unpreferred: HashSet::new(),
        };
        let sources = snat_sources(&[
            iface(2, &["198.18.0.10", "198.18.0.5", "2001:2::5", "2001:2::10"]),
            iface(3, &["2001:2::31", "2001:2::30"]),
            iface(4, &[]),
        ]);
        let key = |ifindex, v6: bool| NodeAddrKey {
            ifindex,
            family: if v6 {
                exposure_common::FAMILY_V6
            } else {
                exposure_common::FAMILY_V4
            },
        };
        let want: HashMap<NodeAddrKey, IpAddr> = [
            (key(2, false), "198.18.0.10"),
            (key(2, true), "2001:2::10"),
            (key(3, true), "2001:2::30"),
        ]
        .into_iter()
        .map(|(k, a)| (k, a.parse().unwrap()))
        .collect();
        assert_eq!(sources, want);
    }

    #[test]
    fn addresses_added_beside_an_interfaces_own_are_not_its_snat_source() {
        use exposure_lab::netns::{unique_prefix, Netns};
        let node = Netns::create(&unique_prefix("sa")).unwrap();
        node.ip("link add eth0 type veth peer name peer0").unwrap();
        node.ip("link set eth0 up").unwrap();
        // The node's own addresses, then a VIP of each family (a /32 and a /128: primaries, as
        // kube-vip adds them) and a second address in the node's subnets, each numerically
        // below the node's.
        for addr in [
            "198.18.0.10/24",
            "2001:2::10/64",
            "198.18.0.5/32",
            "2001:2::5/128",
            "198.18.0.7/24",
            "2001:2::7/64",
        ] {
            node.ip(&format!("addr add {addr} dev eth0 nodad")).unwrap();
        }
        let eth0 = node
            .run(|| interfaces(&["eth0".to_string()]))
            .unwrap()
            .unwrap()
            .remove(0);
        assert_eq!(eth0.addrs.len(), 6, "{:?}", eth0.addrs);
        assert_eq!(
            eth0.snat_source(false),
            Some("198.18.0.10".parse().unwrap())
        );
        assert_eq!(eth0.snat_source(true), Some("2001:2::10".parse().unwrap()));
        // An IPv6 network renumbering: the new prefix is added and the old one deprecated.
        let eth0 = || {
            node.run(|| interfaces(&["eth0".to_string()]))
                .unwrap()
                .unwrap()
                .remove(0)
        };
        node.ip("addr add 2001:3::10/64 dev eth0 nodad").unwrap();
        for old in ["2001:2::10/64", "2001:2::5/128", "2001:2::7/64"] {
            node.ip(&format!("addr change {old} dev eth0 preferred_lft 0"))
                .unwrap();
        }
        assert_eq!(
            eth0().snat_source(true),
            Some("2001:3::10".parse().unwrap())
        );
        // With none preferred, still the oldest.
        node.ip("addr change 2001:3::10/64 dev eth0 preferred_lft 0")
            .unwrap();
        assert_eq!(
            eth0().snat_source(true),
            Some("2001:2::10".parse().unwrap())
        );
    }

    #[test]
    fn the_kernels_unpreferred_ipv6_addresses_are_read_from_their_flags() {
        let text = "\
20010002000000000000000000000020 03 40 00 82       a0
20010002000000000000000000000010 03 40 00 a2       a0
20010002000000000000000000000011 03 40 00 01       a0
20010002000000000000000000000012 03 40 00 c0       a0
fe800000000000000000000000000001 03 40 20 80       a0
not an address line
";
        let mut found: Vec<IpAddr> = parse_unpreferred_ipv6(text).into_iter().collect();
        found.sort();
        let want: Vec<IpAddr> = ["2001:2::10", "2001:2::11", "2001:2::12"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, want, "deprecated, temporary, tentative");
    }

    #[test]
    fn pod_interfaces_are_the_veths_a_prefix_names_except_the_nodes_own() {
        use exposure_lab::netns::{unique_prefix, Netns};
        let prefix = unique_prefix("pi");
        let node = Netns::create(&format!("{prefix}-node")).unwrap();
        let pod = Netns::create(&format!("{prefix}-pod")).unwrap();
        node.ip(&format!(
            "link add vp1 type veth peer name eth0 netns {}",
            pod.name()
        ))
        .unwrap();
        // A bridge the prefix also names: neither redirect can deliver through it.
        node.ip("link add vpbr0 type bridge").unwrap();
        node.ip("link add other0 type bridge").unwrap();
        let in_node = |exclude: &'static [&'static str]| {
            node.run(move || {
                let exclude: Vec<String> = exclude.iter().map(|e| e.to_string()).collect();
                let vp1 = nix::net::if_::if_nametoindex("vp1").unwrap();
                (vp1, pod_interfaces(&["vp".to_string()], &exclude))
            })
            .unwrap()
        };
        let (vp1, found) = in_node(&[]);
        assert_eq!(found.indexes, [vp1].into());
        assert_eq!(found.not_veth, ["vpbr0"]);
        let (_, found) = in_node(&["vp1"]);
        assert!(found.indexes.is_empty(), "{found:?}");
        let driver_of = |name: &'static str| node.run(move || driver(name)).unwrap();
        assert_eq!(driver_of("vp1").as_deref(), Some("veth"));
        assert_eq!(driver_of("vpbr0").as_deref(), Some("bridge"));
        assert_eq!(driver_of("no-such-if0"), None);
    }
}
