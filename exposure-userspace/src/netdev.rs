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
    require_named(names, &found)?;
    Ok(found)
}

/// An error naming the first of `names` that is not among `found`.
pub fn require_named(names: &[String], found: &[Interface]) -> anyhow::Result<()> {
    match names.iter().find(|n| !found.iter().any(|i| &i.name == *n)) {
        Some(missing) => anyhow::bail!("interface {missing} not found"),
        None => Ok(()),
    }
}

/// The named interfaces that exist now: one deleted (and not yet made again) is left out, and
/// the others are still followed meanwhile.
pub fn present_interfaces(names: &[String]) -> anyhow::Result<Vec<Interface>> {
    Ok(present_interfaces_among(names, &addresses()?))
}

/// [`present_interfaces`] with the namespace's [`addresses`] already read.
pub fn present_interfaces_among(names: &[String], all: &[(String, IpAddr)]) -> Vec<Interface> {
    let mut addrs: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (name, ip) in all.iter().cloned() {
        // Link-local addresses are per link, not a node's address for clients.
        if matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
            continue;
        }
        let of_iface = addrs.entry(name).or_default();
        if !of_iface.contains(&ip) {
            of_iface.push(ip);
        }
    }
    let unpreferred = unpreferred_ipv6();
    names
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
        .collect()
}

/// One `--iface` value: an interface's name, a name prefix (`eth+`: every interface whose name
/// starts with `eth`, as in Cilium's `--devices` and iptables' `-i`), or `auto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceSpec {
    Name(String),
    Prefix(String),
    Auto,
}

impl std::str::FromStr for IfaceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // IFNAMSIZ is 16 with the terminating NUL.
        let valid = |name: &str| {
            !name.is_empty()
                && name.len() < 16
                && !name.contains(|c: char| "/,+".contains(c) || c.is_whitespace())
        };
        match s {
            "auto" => Ok(IfaceSpec::Auto),
            "+" => Err(
                "`+` alone matches every interface, the loopback and the pods' ones too: \
                        give a prefix (`eth+`) or `auto`"
                    .into(),
            ),
            _ => match s.strip_suffix('+') {
                Some(prefix) if valid(prefix) => Ok(IfaceSpec::Prefix(prefix.into())),
                None if valid(s) => Ok(IfaceSpec::Name(s.into())),
                _ => Err(format!(
                    "`{s}` is no interface name (1-15 characters, no `/`, `,`, `+` or spaces), \
                     prefix (`eth+`) or `auto`"
                )),
            },
        }
    }
}

/// What the `--iface` values select together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceSelector {
    /// Named ones: each must exist when the agent starts (a typo should not silently expose
    /// nothing), and is taken whatever it is.
    pub names: Vec<String>,
    pub prefixes: Vec<String>,
    /// `auto`: the interfaces [`detected`] picks.
    pub auto: bool,
}

impl IfaceSelector {
    pub fn new(specs: impl IntoIterator<Item = IfaceSpec>) -> Self {
        let mut s = IfaceSelector::default();
        for spec in specs {
            match spec {
                IfaceSpec::Name(n) if !s.names.contains(&n) => s.names.push(n),
                IfaceSpec::Prefix(p) if !s.prefixes.contains(&p) => s.prefixes.push(p),
                IfaceSpec::Auto => s.auto = true,
                _ => {}
            }
        }
        s
    }

    /// Only names: nothing to detect, the set never changes.
    pub fn is_static(&self) -> bool {
        self.prefixes.is_empty() && !self.auto
    }

    /// Whether `link` is selected, and if not why (for the log).
    pub fn selects(&self, link: &Link, pod_prefixes: &[String]) -> Result<(), &'static str> {
        if self.names.contains(&link.name) {
            return Ok(());
        }
        if self
            .prefixes
            .iter()
            .any(|p| link.name.starts_with(p.as_str()))
        {
            return if link.loopback() {
                Err("the loopback")
            } else {
                Ok(())
            };
        }
        if !self.auto {
            return Err("not named by --iface");
        }
        if pod_prefixes
            .iter()
            .any(|p| link.name.starts_with(p.as_str()))
        {
            return Err("a pod interface (--redirect-to-pods)");
        }
        detected(link)
    }

    /// The names of the interfaces in `links` it selects, in the kernel's order.
    pub fn select(&self, links: &[Link], pod_prefixes: &[String]) -> Vec<String> {
        links
            .iter()
            .filter(|l| self.selects(l, pod_prefixes).is_ok())
            .map(|l| l.name.clone())
            .collect()
    }
}

impl std::fmt::Display for IfaceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let specs: Vec<String> = (self.names.iter().cloned())
            .chain(self.prefixes.iter().map(|p| format!("{p}+")))
            .chain(self.auto.then(|| "auto".to_string()))
            .collect();
        f.write_str(&specs.join(","))
    }
}

/// Name prefixes `auto` never takes: other datapaths' and container runtimes' devices (Cilium's
/// list).
const NOT_DETECTED_PREFIXES: [&str; 5] = ["cilium_", "lo", "lxc", "cni", "docker"];

/// Link kinds `auto` never takes: bridges (the node's uplink is their port, or they join pods),
/// Ethernet tunnels between nodes (another CNI's overlay: the Services' clients are not behind
/// it) and dummies (`kube-ipvs0` and `nodelocaldns` hold Service addresses, not a network).
const NOT_DETECTED_KINDS: [&str; 9] = [
    "bridge",
    "openvswitch",
    "vxlan",
    "geneve",
    "gretap",
    "ip6gretap",
    "erspan",
    "dummy",
    "tun",
];

/// Cilium's device detection, which `--iface auto` follows: an interface that is up, an Ethernet
/// device (the datapath parses Ethernet frames) that is no bridge's or bond's port, has a global
/// unicast address, and is not of a kind or name another datapath uses
/// ([`NOT_DETECTED_KINDS`], [`NOT_DETECTED_PREFIXES`]); a veth only with a default route (a
/// node in a container, as with kind), since pods' veths and other CNIs' leftovers are veths too.
pub fn detected(link: &Link) -> Result<(), &'static str> {
    const IFF_UP: u32 = libc::IFF_UP as u32;
    const IFF_SLAVE: u32 = libc::IFF_SLAVE as u32;
    const ARPHRD_ETHER: u16 = 1;
    if link.loopback() {
        return Err("the loopback");
    }
    if link.flags & IFF_UP == 0 {
        return Err("down");
    }
    if link.master || link.flags & IFF_SLAVE != 0 {
        return Err("a bridge's or bond's port");
    }
    if link.link_type != ARPHRD_ETHER {
        return Err("no Ethernet device");
    }
    if NOT_DETECTED_PREFIXES
        .iter()
        .any(|p| link.name.starts_with(p))
    {
        return Err("named like another datapath's device");
    }
    match link.kind.as_deref() {
        Some(kind) if NOT_DETECTED_KINDS.contains(&kind) => {
            return Err("a bridge, tunnel, dummy or tap device")
        }
        Some("veth") if !link.default_route => return Err("a veth without a default route"),
        _ => {}
    }
    if !link.global_addr {
        return Err("no global unicast address");
    }
    Ok(())
}

/// Link kinds of the tunnels overlays carry pods' packets between nodes through: flannel's and
/// Calico's VXLAN, Calico's IPIP, GRE, Geneve (OVN, Antrea), WireGuard (flannel's, Calico's).
const OVERLAY_TUNNEL_KINDS: [&str; 6] = ["vxlan", "geneve", "ipip", "gre", "gretap", "wireguard"];

/// IPv4 reverse-path filtering in strict mode (`rp_filter` 1).
const RP_FILTER_STRICT: u8 = 1;

/// The tunnels here whose strict rp_filter drops the flows other nodes' agents send to this
/// node's pods if an overlay reaches them through it: tunnels that are up and that `selected`
/// does not name. Another node's agent, configured alike, SNATs a flow it sends through such a
/// tunnel to the address of the interface the flow came in by (its LAN address), which this node
/// routes by another interface, so strict reverse-path filtering drops the flow here.
/// `rp_filter`: an interface's own setting by name, `all` for `net.ipv4.conf.all`; the kernel
/// takes the larger of the two.
pub fn tunnels_dropping_other_nodes_flows<'a>(
    links: &'a [Link],
    selected: &[String],
    rp_filter: impl Fn(&str) -> Option<u8>,
) -> Vec<&'a Link> {
    let all = rp_filter("all").unwrap_or(0);
    links
        .iter()
        .filter(|l| {
            l.kind
                .as_deref()
                .is_some_and(|k| OVERLAY_TUNNEL_KINDS.contains(&k))
        })
        // Down: not in use (the kernel's fallback devices, `tunl0` and `gre0`, are made down
        // when their module loads).
        .filter(|l| l.flags & libc::IFF_UP as u32 != 0)
        .filter(|l| !selected.contains(&l.name))
        .filter(|l| rp_filter(&l.name).is_some_and(|own| own.max(all) == RP_FILTER_STRICT))
        .collect()
}

/// An interface's IPv4 `rp_filter` in this thread's network namespace (`all` for the setting of
/// all), if it has one.
pub fn rp_filter(iface: &str) -> Option<u8> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The interfaces of this thread's network namespace, as [`links`] gives them but without
/// addresses and routes.
pub fn bare_links() -> anyhow::Result<Vec<Link>> {
    rtnetlink_links().context("listing interfaces (RTM_GETLINK)")
}

/// An interface as device detection sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// `IFF_*`.
    pub flags: u32,
    /// `ARPHRD_*`.
    pub link_type: u16,
    /// A bridge's or bond's port (`IFLA_MASTER`).
    pub master: bool,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `bond`, ...); none for a physical device.
    pub kind: Option<String>,
    /// Holds an address a client may use: IPv4 other than loopback and link-local, global IPv6.
    pub global_addr: bool,
    /// Carries a default route (IPv4 or IPv6).
    pub default_route: bool,
    /// Has an XDP program in generic mode, on the kernel's skb (`IFLA_XDP_ATTACHED`).
    pub generic_xdp: bool,
}

impl Link {
    fn loopback(&self) -> bool {
        self.flags & libc::IFF_LOOPBACK as u32 != 0
    }
}

/// This thread's network namespace's interfaces, for device detection: rtnetlink's link dump
/// (sysfs shows the namespace it was mounted in, not necessarily this one), with `addrs` (its
/// [`addresses`]) and the default routes.
pub fn links(addrs: &[(String, IpAddr)]) -> anyhow::Result<Vec<Link>> {
    let mut links = bare_links()?;
    let global: HashSet<&str> = addrs
        .iter()
        .filter(|(_, ip)| is_global_unicast(*ip))
        .map(|(name, _)| name.as_str())
        .collect();
    let read = |file: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{file}"));
    let defaults = default_route_devices(
        &read("route").unwrap_or_default(),
        &read("ipv6_route").unwrap_or_default(),
    );
    for link in &mut links {
        link.global_addr = global.contains(link.name.as_str());
        link.default_route = defaults.contains(&link.name);
    }
    Ok(links)
}

/// Whether interface `ifindex` has an XDP program in generic mode (one attached by an earlier run,
/// whose mode this run did not choose).
pub fn has_generic_xdp(ifindex: u32) -> anyhow::Result<bool> {
    Ok(bare_links()?
        .iter()
        .any(|l| l.index == ifindex && l.generic_xdp))
}

/// An address clients may reach the node on (Go's `IsGlobalUnicast`, which Cilium's detection
/// uses).
fn is_global_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// The devices that carry a default route, from `/proc/net/route` (IPv4: destination and mask
/// 0) and `/proc/net/ipv6_route` (`::/0`, not an unreachable route, which sits on `lo`).
fn default_route_devices(route: &str, ipv6_route: &str) -> HashSet<String> {
    const RTF_REJECT: u32 = 0x200;
    let v4 = route.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    });
    let v6 = ipv6_route.lines().filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
        (f.len() > 9
            && f[0].bytes().all(|b| b == b'0')
            && f[1] == "00"
            && flags & RTF_REJECT == 0
            && f[9] != "lo")
            .then(|| f[9].to_string())
    });
    v4.chain(v6).collect()
}

/// `RTM_GETLINK` dump over rtnetlink.
fn rtnetlink_links() -> anyhow::Result<Vec<Link>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const RTM_GETLINK: u16 = 18;
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink socket");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes), ifinfomsg (16 bytes, all zero: every family), then IFLA_EXT_MASK
    // asking to leave the statistics out (the agent looks every 200 ms; a node has many veths).
    const IFLA_EXT_MASK: u16 = 29;
    const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[32..34].copy_from_slice(&8u16.to_ne_bytes());
    req[34..36].copy_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    req[36..40].copy_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink send");
    }
    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("netlink recv");
        }
        if parse_link_dump(&buf[..n as usize], &mut links)? {
            return Ok(links);
        }
    }
}

/// Parses one datagram of an `RTM_GETLINK` dump into `links`; true once the dump is done.
fn parse_link_dump(mut buf: &[u8], links: &mut Vec<Link>) -> anyhow::Result<bool> {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const RTM_NEWLINK: u16 = 16;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MASTER: u16 = 10;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const XDP_ATTACHED_SKB: u8 = 2;
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let c_string = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    while buf.len() >= 16 {
        let len = u32_at(buf, 0) as usize;
        if len < 16 || len > buf.len() {
            anyhow::bail!("netlink message of {len} bytes in {}", buf.len());
        }
        let (msg, rest) = buf.split_at(len);
        buf = rest.get(align4(len) - len..).unwrap_or_default();
        match u16_at(msg, 4) {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = if msg.len() >= 20 {
                    u32_at(msg, 16) as i32
                } else {
                    0
                };
                return Err(std::io::Error::from_raw_os_error(-errno)).context("netlink dump");
            }
            RTM_NEWLINK if msg.len() >= 32 => {
                let mut link = Link {
                    link_type: u16_at(msg, 18),
                    index: u32_at(msg, 20),
                    flags: u32_at(msg, 24),
                    ..Link::default()
                };
                for (kind, value) in attributes(&msg[32..]) {
                    match kind {
                        IFLA_IFNAME => link.name = c_string(value),
                        IFLA_MASTER => link.master = value.len() >= 4 && u32_at(value, 0) != 0,
                        IFLA_LINKINFO => {
                            link.kind = attributes(value)
                                .find(|(k, _)| *k == IFLA_INFO_KIND)
                                .map(|(_, v)| c_string(v))
                        }
                        IFLA_XDP => {
                            link.generic_xdp = attributes(value).any(|(k, v)| {
                                k == IFLA_XDP_ATTACHED && v.first() == Some(&XDP_ATTACHED_SKB)
                            })
                        }
                        _ => {}
                    }
                }
                links.push(link);
            }
            _ => {}
        }
    }
    Ok(false)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message's attributes (`rtattr`: length, type, value, padded to 4 bytes); the type
/// without its nested/byte-order flags.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// Every IPv4 and IPv6 address of this thread's network namespace, by interface name, in the
/// kernel's order.
pub fn addresses() -> anyhow::Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        let Some(a) = ifa.address.as_ref() else {
            continue;
        };
        let ip = if let Some(sin) = a.as_sockaddr_in() {
            IpAddr::V4(sin.ip())
        } else if let Some(sin6) = a.as_sockaddr_in6() {
            IpAddr::V6(sin6.ip())
        } else {
            continue;
        };
        out.push((ifa.interface_name, ip));
    }
    Ok(out)
}

/// Pods' interfaces: the ones `--redirect-to-pods` / `--xdp-redirect-to-pods` name by prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces {
    /// The veths (and netkit devices) by index, with their names.
    pub veths: std::collections::BTreeMap<u32, String>,
    /// Named by a prefix but not a veth (or netkit): a bridge, say, which neither redirect can
    /// deliver through. Left out, so their pods' flows stay with the stack.
    pub not_veth: Vec<String>,
}

/// Kinds of device (`IFLA_INFO_KIND`) that have a peer in the pod's namespace: what both
/// redirects need.
const POD_KINDS: [&str; 2] = ["veth", "netkit"];

/// The interfaces whose names start with one of `prefixes`, except those in `exclude` (the node's
/// own, where the XDP program runs). One rtnetlink dump: this runs on every tick.
pub fn pod_interfaces(prefixes: &[String], exclude: &[String]) -> PodInterfaces {
    let mut found = PodInterfaces::default();
    let Ok(links) = rtnetlink_links() else {
        return found;
    };
    for link in links {
        if !prefixes.iter().any(|p| link.name.starts_with(p.as_str()))
            || exclude.contains(&link.name)
        {
            continue;
        }
        if link.kind.as_deref().is_some_and(|k| POD_KINDS.contains(&k)) {
            found.veths.insert(link.index, link.name);
        } else {
            found.not_veth.push(link.name);
        }
    }
    found
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
        assert_eq!(found.veths, [(vp1, "vp1".to_string())].into());
        assert_eq!(found.not_veth, ["vpbr0"]);
        let (_, found) = in_node(&["vp1"]);
        assert!(found.veths.is_empty(), "{found:?}");
        assert_eq!(found.not_veth, ["vpbr0"]);
    }

    #[test]
    fn iface_values_are_names_prefixes_or_auto_and_anything_else_is_refused() {
        let spec = |s: &str| s.parse::<IfaceSpec>();
        assert_eq!(spec("eth0"), Ok(IfaceSpec::Name("eth0".into())));
        assert_eq!(spec("en+"), Ok(IfaceSpec::Prefix("en".into())));
        assert_eq!(spec("auto"), Ok(IfaceSpec::Auto));
        for bad in ["", "+", "a/b", "eth 0", "a-name-that-is-too-long", "++"] {
            let err = spec(bad).expect_err(bad);
            assert!(err.contains("auto"), "{bad}: {err}");
        }
        assert!(spec("+").unwrap_err().contains("every interface"));
        let sel =
            IfaceSelector::new(["eth0", "en+", "auto", "eth0", "en+"].map(|s| spec(s).unwrap()));
        assert_eq!(sel.to_string(), "eth0,en+,auto", "each once");
        assert!(!sel.is_static());
        assert!(IfaceSelector::new([IfaceSpec::Name("eth0".into())]).is_static());
    }

    /// A link as rtnetlink and the address and route tables show it: up, Ethernet, a global
    /// address; `kind` none for a physical device.
    fn link(name: &str, kind: Option<&str>) -> Link {
        Link {
            name: name.into(),
            index: 7,
            flags: libc::IFF_UP as u32,
            link_type: 1,
            master: false,
            kind: kind.map(Into::into),
            global_addr: true,
            default_route: false,
            generic_xdp: false,
        }
    }

    #[test]
    fn auto_takes_what_ciliums_device_detection_takes() {
        let taken = |l: &Link| detected(l).is_ok();
        // Physical NICs, bonds, VLANs, macvlans: the node's own networks.
        for kind in [
            None,
            Some("bond"),
            Some("vlan"),
            Some("macvlan"),
            Some("ipvlan"),
        ] {
            assert!(taken(&link("uplink", kind)), "{kind:?}");
        }
        // A veth only with a default route (a node in a container).
        let veth = link("eth0", Some("veth"));
        assert_eq!(detected(&veth), Err("a veth without a default route"));
        assert!(taken(&Link {
            default_route: true,
            ..veth
        }));
        // Bridges, tunnels, dummies (kube-ipvs0), taps: never.
        for kind in ["bridge", "openvswitch", "vxlan", "geneve", "dummy", "tun"] {
            assert!(!taken(&link("x", Some(kind))), "{kind}");
        }
        // Down, a port of a bond or bridge, no Ethernet (wireguard, tun), the loopback.
        let nic = link("eth1", None);
        for (l, why) in [
            (
                Link {
                    flags: 0,
                    ..nic.clone()
                },
                "down",
            ),
            (
                Link {
                    master: true,
                    ..nic.clone()
                },
                "a bridge's or bond's port",
            ),
            (
                Link {
                    flags: (libc::IFF_UP | libc::IFF_SLAVE) as u32,
                    ..nic.clone()
                },
                "a bridge's or bond's port",
            ),
            (
                Link {
                    link_type: 65534,
                    ..nic.clone()
                },
                "no Ethernet device",
            ),
            (
                Link {
                    global_addr: false,
                    ..nic.clone()
                },
                "no global unicast address",
            ),
            (
                Link {
                    flags: (libc::IFF_UP | libc::IFF_LOOPBACK) as u32,
                    ..nic.clone()
                },
                "the loopback",
            ),
        ] {
            assert_eq!(detected(&l), Err(why), "{l:?}");
        }
        // Other datapaths' and runtimes' devices, by name.
        for name in ["cilium_host", "lxc1234", "cni0", "docker0", "lo1"] {
            assert!(!taken(&link(name, None)), "{name}");
        }
    }

    #[test]
    fn unselected_tunnels_that_are_up_with_strict_rp_filter_drop_other_nodes_flows() {
        let links = [
            link("flannel.1", Some("vxlan")),
            link("tunl0", Some("ipip")),
            link("flannel-wg", Some("wireguard")),
            link("genev_sys_6081", Some("geneve")),
            link("gre1", Some("gre")),
            // The kernel's fallback device, made down.
            Link {
                flags: 0,
                ..link("gre0", Some("gre"))
            },
            // Not tunnels.
            link("eth0", None),
            link("eth0.100", Some("vlan")),
            link("cni0", Some("bridge")),
        ];
        let names = |found: Vec<&Link>| -> Vec<String> {
            found.into_iter().map(|l| l.name.clone()).collect()
        };
        // Strict on every interface: every unselected tunnel that is up.
        let strict = |_: &str| Some(1);
        let none: &[String] = &[];
        assert_eq!(
            names(tunnels_dropping_other_nodes_flows(&links, none, strict)),
            ["flannel.1", "tunl0", "flannel-wg", "genev_sys_6081", "gre1"]
        );
        // A selected tunnel is SNATed to its own address, which passes.
        let selected = ["eth0".to_string(), "flannel.1".to_string()];
        assert_eq!(
            names(tunnels_dropping_other_nodes_flows(
                &links, &selected, strict
            )),
            ["tunl0", "flannel-wg", "genev_sys_6081", "gre1"]
        );
        // The kernel takes the larger of `all` and the interface's own: loose (2) in either
        // passes, strict in either with the other off drops (the other tunnels are loose).
        for (all, own, drops) in [
            (0, 0, false),
            (0, 1, true),
            (1, 0, true),
            (1, 1, true),
            (1, 2, false),
            (2, 1, false),
            (2, 2, false),
        ] {
            let rp = |iface: &str| match iface {
                "all" => Some(all),
                "flannel.1" => Some(own),
                _ => Some(2),
            };
            assert_eq!(
                names(tunnels_dropping_other_nodes_flows(&links, none, rp)),
                if drops { vec!["flannel.1"] } else { vec![] },
                "all {all}, own {own}"
            );
        }
        // An interface without the setting (gone meanwhile) is left out.
        let gone = |iface: &str| (iface == "all").then_some(1);
        assert!(tunnels_dropping_other_nodes_flows(&links, none, gone).is_empty());
    }

    #[test]
    fn names_and_prefixes_select_what_they_name_and_auto_adds_the_detected() {
        let links = [
            link("lo", None),
            link("eth0", None),
            link("eth1", Some("veth")),
            link("ens5", None),
            link("br0", Some("bridge")),
            link("vp12", Some("veth")),
        ];
        let links = {
            let mut l = links;
            l[0].flags |= libc::IFF_LOOPBACK as u32;
            l[5].default_route = true;
            l
        };
        let select = |specs: &[&str], pods: &[&str]| {
            let sel = IfaceSelector::new(specs.iter().map(|s| s.parse().unwrap()));
            let pods: Vec<String> = pods.iter().map(|p| p.to_string()).collect();
            sel.select(&links, &pods)
        };
        // A name takes its interface whatever it is (a bridge, a veth).
        assert_eq!(select(&["br0", "eth1"], &[]), ["eth1", "br0"]);
        // A prefix takes every interface it names, but the loopback.
        assert_eq!(select(&["eth+", "l+"], &[]), ["eth0", "eth1"]);
        // Auto: ens5, eth0, and a veth with a default route, unless a redirect names it a pod's.
        assert_eq!(select(&["auto"], &[]), ["eth0", "ens5", "vp12"]);
        assert_eq!(select(&["auto"], &["vp"]), ["eth0", "ens5"]);
        assert_eq!(select(&["auto", "br0"], &["vp"]), ["eth0", "ens5", "br0"]);
    }

    #[test]
    fn default_routes_are_read_from_both_route_tables() {
        let route = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
        let ipv6_route = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     ens5
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
20010002000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
";
        let mut found: Vec<String> = default_route_devices(route, ipv6_route)
            .into_iter()
            .collect();
        found.sort();
        assert_eq!(found, ["ens5", "eth0"]);
    }

    #[test]
    fn a_link_dump_is_parsed_from_rtnetlinks_messages() {
        // RTM_NEWLINK for index 5 "uplink" (up, Ethernet), enslaved (IFLA_MASTER 3), kind "veth"
        // nested in IFLA_LINKINFO, XDP attached in generic mode (IFLA_XDP_ATTACHED 2, after
        // IFLA_XDP_FD) nested in IFLA_XDP; then NLMSG_DONE.
        let attr = |kind: u16, value: &[u8]| {
            let mut a = Vec::new();
            a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            a.extend_from_slice(&kind.to_ne_bytes());
            a.extend_from_slice(value);
            a.resize(align4(a.len()), 0);
            a
        };
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&1u16.to_ne_bytes());
        body.extend_from_slice(&5u32.to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend(attr(3, b"uplink\0"));
        body.extend(attr(10, &3u32.to_ne_bytes()));
        body.extend(attr(18 | 0x8000, &attr(1, b"veth\0")));
        let mut xdp = attr(1, &(-1i32).to_ne_bytes());
        xdp.extend(attr(2, &[2]));
        body.extend(attr(43 | 0x8000, &xdp));
        let message = |kind: u16, body: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(body);
            m
        };
        let mut links = Vec::new();
        let dump = message(16, &body);
        assert!(!parse_link_dump(&dump, &mut links).unwrap(), "not done yet");
        assert!(parse_link_dump(&message(3, &[0; 4]), &mut links).unwrap());
        let want = Link {
            name: "uplink".into(),
            index: 5,
            flags: libc::IFF_UP as u32,
            link_type: 1,
            master: true,
            kind: Some("veth".into()),
            generic_xdp: true,
            ..Link::default()
        };
        assert_eq!(links, [want]);
        // A truncated message is an error, not a wrong link.
        let err = parse_link_dump(&dump[..dump.len() - 8], &mut links).unwrap_err();
        assert!(format!("{err:#}").contains("netlink message"), "{err:#}");
        // The kernel's error answer is reported with its errno.
        let mut nack = (-libc::EPERM).to_ne_bytes().to_vec();
        nack.extend_from_slice(&[0; 16]);
        let err = parse_link_dump(&message(2, &nack), &mut links).unwrap_err();
        assert!(format!("{err:#}").contains("not permitted"), "{err:#}");
    }

    #[test]
    fn a_namespaces_links_are_listed_with_their_kind_port_addresses_and_default_routes() {
        use exposure_lab::netns::{unique_prefix, Netns};
        let node = Netns::create(&unique_prefix("dl")).unwrap();
        for cmd in [
            "link add uplink type veth peer name peer0",
            "link add mv0 link peer0 type macvlan",
            "link add br0 type bridge",
            "link add port0 type veth peer name port1",
            "link set port0 master br0",
            "addr add 198.18.0.10/24 dev uplink",
            "addr add 198.18.1.10/24 dev mv0",
            "addr add 169.254.0.10/16 dev peer0",
            "addr add 198.18.2.10/24 dev br0",
        ] {
            node.ip(cmd).unwrap();
        }
        for l in ["uplink", "peer0", "mv0", "br0", "port0", "port1", "lo"] {
            node.ip(&format!("link set {l} up")).unwrap();
        }
        let detect = || {
            node.run(|| {
                let links = links(&addresses().unwrap()).unwrap();
                let found: BTreeMap<String, Link> =
                    links.into_iter().map(|l| (l.name.clone(), l)).collect();
                found
            })
            .unwrap()
        };
        let found = detect();
        let kind = |n: &str| found[n].kind.clone();
        assert_eq!(kind("uplink").as_deref(), Some("veth"));
        assert_eq!(kind("mv0").as_deref(), Some("macvlan"));
        assert_eq!(kind("br0").as_deref(), Some("bridge"));
        assert!(found["port0"].master && !found["port1"].master);
        assert!(found["uplink"].global_addr && found["br0"].global_addr);
        assert!(!found["peer0"].global_addr, "link-local only");
        assert!(found["lo"].loopback() && !found["lo"].global_addr);
        let detected: Vec<&str> = found
            .values()
            .filter(|l| super::detected(l).is_ok())
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(detected, ["mv0"], "the veth has no default route yet");
        // A default route through a neighbour inside this namespace's own network.
        node.ip("route add default via 198.18.0.1 dev uplink")
            .unwrap();
        let found = detect();
        assert!(found["uplink"].default_route && !found["mv0"].default_route);
        let detected: Vec<&str> = found
            .values()
            .filter(|l| super::detected(l).is_ok())
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(detected, ["mv0", "uplink"]);
    }
}
