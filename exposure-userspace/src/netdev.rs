//! The node's interfaces: index and addresses (the NodePort addresses; IPv6 link-local ones excluded).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Context as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// Sorted: IPv4 first, then IPv6.
    pub addrs: Vec<IpAddr>,
}

impl Interface {
    /// The address used as SNAT source for `family`'s flows leaving here: the first one.
    pub fn first_of(&self, v6: bool) -> Option<IpAddr> {
        self.addrs.iter().copied().find(|a| a.is_ipv6() == v6)
    }
}

/// Looks up each named interface; a missing one is an error (a typo should not silently expose nothing).
pub fn interfaces(names: &[String]) -> anyhow::Result<Vec<Interface>> {
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
        addrs
            .entry(ifa.interface_name.clone())
            .or_default()
            .push(ip);
    }
    names
        .iter()
        .map(|name| {
            let index = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("interface {name} not found"))?;
            let mut found = addrs.get(name).cloned().unwrap_or_default();
            found.sort();
            found.dedup();
            Ok(Interface {
                name: name.clone(),
                index,
                addrs: found,
            })
        })
        .collect()
}

/// Indexes of the interfaces whose names start with one of `prefixes`, except those in `exclude`
/// (the node's own, where the XDP program runs).
pub fn indexes_with_prefix(
    prefixes: &[String],
    exclude: &[String],
) -> std::collections::BTreeSet<u32> {
    let Ok(all) = nix::net::if_::if_nameindex() else {
        return Default::default();
    };
    all.iter()
        .filter_map(|i| {
            let name = i.name().to_str().ok()?;
            let wanted = prefixes.iter().any(|p| name.starts_with(p.as_str()))
                && !exclude.iter().any(|e| e == name);
            wanted.then_some(i.index())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_has_its_address_and_missing_interfaces_are_errors() {
        let lo = interfaces(&["lo".to_string()]).expect("lo exists");
        assert_eq!(lo[0].first_of(false), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(lo[0].index > 0);
        let err = interfaces(&["no-such-if0".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"));
    }

    #[test]
    fn pod_interfaces_by_prefix_leave_out_the_nodes_own() {
        let lo = nix::net::if_::if_nametoindex("lo").expect("lo exists");
        let prefixes = ["l".to_string()];
        assert!(indexes_with_prefix(&prefixes, &[]).contains(&lo));
        assert!(!indexes_with_prefix(&prefixes, &["lo".to_string()]).contains(&lo));
        assert!(!indexes_with_prefix(&["no-such-".to_string()], &[]).contains(&lo));
    }
}
