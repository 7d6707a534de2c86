//! The node's interfaces: index and IPv4 addresses (the NodePort addresses).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub ipv4: Vec<Ipv4Addr>,
}

/// Looks up each named interface; a missing one is an error (a typo should not silently expose nothing).
pub fn interfaces(names: &[String]) -> anyhow::Result<Vec<Interface>> {
    let mut addrs: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            addrs
                .entry(ifa.interface_name.clone())
                .or_default()
                .push(sin.ip());
        }
    }
    names
        .iter()
        .map(|name| {
            let index = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("interface {name} not found"))?;
            let mut ipv4 = addrs.get(name).cloned().unwrap_or_default();
            ipv4.sort();
            ipv4.dedup();
            Ok(Interface {
                name: name.clone(),
                index,
                ipv4,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_address_and_missing_interfaces_are_errors() {
        let lo = interfaces(&["lo".to_string()]).expect("lo exists");
        assert_eq!(lo[0].ipv4, [Ipv4Addr::LOCALHOST]);
        assert!(lo[0].index > 0);
        let err = interfaces(&["no-such-if0".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"));
    }
}
