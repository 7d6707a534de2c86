//! The pure translation from Kubernetes objects to the datapath's desired state: which frontends exist
//! and which backends each Service port selects from. No I/O here, so every rule is unit-tested.
//!
//! Semantics follow kube-proxy: NodePort/LoadBalancer/externalIP frontends are exposed on the NIC,
//! ClusterIPs only to the sockets of the node and its pods (unless `--external-cluster-ips`), only
//! ready endpoints take new flows, `externalTrafficPolicy: Local` keeps outside traffic on the
//! node's own endpoints (`internalTrafficPolicy: Local` a ClusterIP's), and a Service without
//! endpoints refuses (without *local* endpoints under Local policy, drops).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Service;

use crate::endpoint_slice::EndpointSlice;

/// Label kube-proxy honours: another proxy owns Services that carry it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on a headless Service's slices (which the controller also
/// gives its Service's labels, the one above included); kube-proxy ignores slices with either.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => exposure_common::PROTO_TCP,
            Protocol::Udp => exposure_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            exposure_common::PROTO_TCP => Some(Protocol::Tcp),
            exposure_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    fn parse(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(other.to_string()),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An IP family, as `spec.ipFamilies` and `EndpointSlice.addressType` name them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    #[default]
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The Kubernetes spelling (`IPv4`/`IPv6`).
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

/// Identity of one Service port of one IP family: what a service id in the maps stands for. A
/// dual-stack Service has one per family, each with its own frontends and endpoints (as kube-proxy
/// runs one proxier per family).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: Protocol,
    pub family: IpFamily,
    /// [`Scope::NodeSockets`]: the twin of an `externalTrafficPolicy: Local` port that serves the
    /// sockets of the node and its pods, or the entry of a port's ClusterIPs where no other entry
    /// has the endpoints `internalTrafficPolicy` gives them.
    pub scope: Scope,
}

/// Whom a frontend (and the service port it leads to) serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scope {
    /// Packets arriving on `--iface`, and the sockets of the node and its pods where no twin
    /// exists.
    #[default]
    External,
    /// Only the sockets of the node and its pods (the socket hooks): an `externalTrafficPolicy:
    /// Local` Service's twin, with every ready endpoint of the cluster (kube-proxy routes traffic
    /// from the node and its pods to all endpoints; Cilium keeps such a twin as its internal
    /// scope), localhost NodePorts and ClusterIPs (unless `--external-cluster-ips`).
    NodeSockets,
}

impl Scope {
    /// `FrontendKey::scope`.
    pub fn number(self) -> u8 {
        match self {
            Scope::External => exposure_common::SCOPE_EXTERNAL,
            Scope::NodeSockets => exposure_common::SCOPE_NODE_SOCKETS,
        }
    }

    pub fn from_number(n: u8) -> Self {
        if n == exposure_common::SCOPE_NODE_SOCKETS {
            Scope::NodeSockets
        } else {
            Scope::External
        }
    }
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)?;
        if self.family == IpFamily::V6 {
            write!(f, "/IPv6")?;
        }
        if self.scope == Scope::NodeSockets {
            write!(f, " (node sockets)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    NodePort,
    LoadBalancer,
    ExternalIp,
    /// Only for the sockets of the node and its pods ([`Scope::NodeSockets`]).
    ClusterIp,
}

/// [`FrontendAddr::port`] of a ClusterIP's frontend for the ports its Service does not have:
/// the socket hooks refuse connections to them.
pub use exposure_common::OTHER_PORTS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

/// `address:port`, with `*` for [`OTHER_PORTS`].
pub fn display_addr_port(ip: IpAddr, port: u16) -> String {
    if port != OTHER_PORTS {
        return std::net::SocketAddr::new(ip, port).to_string();
    }
    match ip {
        IpAddr::V4(ip) => format!("{ip}:*"),
        IpAddr::V6(ip) => format!("[{ip}]:*"),
    }
}

impl std::fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = display_addr_port(self.ip, self.port);
        write!(f, "{at}/{}", self.protocol)?;
        if self.scope == Scope::NodeSockets {
            write!(f, " (node sockets)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (no SNAT; replies come back through the node's stack).
    pub local: bool,
}

/// What to do with a new flow when the backend set is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WhenEmpty {
    /// No endpoints at all: ICMP port unreachable, like kube-proxy's REJECT.
    #[default]
    Reject,
    /// `externalTrafficPolicy: Local` and endpoints exist only on other nodes: drop, like kube-proxy.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredService {
    /// `loadBalancerSourceRanges` (networks of this port's family) for the LoadBalancer frontends;
    /// `None`: anyone.
    pub source_ranges: Option<Vec<(IpAddr, u8)>>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0: none.
    pub affinity_timeout_s: u32,
    pub frontends: BTreeMap<FrontendAddr, FrontendKind>,
    /// Sorted and deduplicated, so the same inputs give the same slot table on every node.
    pub backends: Vec<BackendAddr>,
    /// The port's other endpoints that still serve (terminating while others are ready, on
    /// another node under a Local policy, hinted elsewhere), sorted: no new flow goes to them,
    /// but UDP flows to them go on, as kube-proxy deletes UDP conntrack entries only for
    /// endpoints that stop serving or go.
    pub still_serving: Vec<BackendAddr>,
    pub when_empty: WhenEmpty,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// Shared with the translation cache: an unchanged Service costs a reference count per sync.
    pub services: BTreeMap<ServicePortName, Arc<DesiredService>>,
    /// `healthCheckNodePort` -> what its HTTP server reports (`externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub no_local_endpoints: NoLocalEndpoints,
}

/// Service ports (each family counted) with a Local traffic policy whose endpoints are all on
/// other nodes, so this node drops their new connections: kube-proxy's
/// `sync_proxy_rules_no_local_endpoints_total` gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// `internalTrafficPolicy: Local`.
    pub internal: usize,
    /// `externalTrafficPolicy: Local`, of ports with frontends outside the cluster.
    pub external: usize,
}

impl NoLocalEndpoints {
    /// Takes one Service's counts out and another's in.
    fn swap(&mut self, was: &NoLocalEndpoints, now: &NoLocalEndpoints) {
        self.internal = self.internal - was.internal + now.internal;
        self.external = self.external - was.external + now.external;
    }
}

/// An address and port: a frontend's or an endpoint's.
pub type AddrPort = (IpAddr, u16);

/// The (frontend, endpoint) pairs of UDP service ports as they were before `changed` whose
/// endpoint `after` no longer has behind that frontend: a connected UDP socket the socket hooks
/// sent over such a pair would go on sending to an endpoint that left (see `sock_diag`).
pub fn udp_pairs_left(changed: &Changed, after: &DesiredState) -> BTreeSet<(AddrPort, AddrPort)> {
    let mut left = BTreeSet::new();
    for (key, was) in changed
        .iter()
        .filter_map(|(k, was)| Some((k, was.as_ref()?)))
    {
        if key.protocol != Protocol::Udp {
            continue;
        }
        let now = after.services.get(key);
        let same = |now: &DesiredService| {
            now.backends == was.backends && now.still_serving == was.still_serving
        };
        if now.is_some_and(|now| Arc::ptr_eq(now, was) || same(now)) {
            continue;
        }
        // An endpoint that still serves keeps its sockets, as its UDP flows.
        let staying: BTreeSet<AddrPort> = now
            .map(|s| s.backends.iter().chain(&s.still_serving))
            .into_iter()
            .flatten()
            .map(|b| (b.ip, b.port))
            .collect();
        for b in was.backends.iter().chain(&was.still_serving) {
            if staying.contains(&(b.ip, b.port)) {
                continue;
            }
            for f in was.frontends.keys().filter(|f| is_udp_peer(f)) {
                left.insert(((f.ip, f.port), (b.ip, b.port)));
            }
        }
    }
    left
}

/// Every (frontend, endpoint) pair of the UDP service ports in `state`, endpoints that still serve
/// included.
pub fn udp_pairs(state: &DesiredState) -> BTreeSet<(AddrPort, AddrPort)> {
    let mut pairs = BTreeSet::new();
    for (_, s) in state
        .services
        .iter()
        .filter(|(k, _)| k.protocol == Protocol::Udp)
    {
        for f in s.frontends.keys().filter(|f| is_udp_peer(f)) {
            let endpoints = s.backends.iter().chain(&s.still_serving);
            pairs.extend(endpoints.map(|b| ((f.ip, f.port), (b.ip, b.port))));
        }
    }
    pairs
}

/// A frontend a UDP socket can be connected through (not a ClusterIP's other ports, nor a
/// TCP one that shares the entry).
pub fn is_udp_peer(f: &FrontendAddr) -> bool {
    f.protocol == Protocol::Udp && f.port != OTHER_PORTS
}

/// A `healthCheckNodePort`'s answer: load balancers send traffic only to nodes that have local
/// endpoints for the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

impl DesiredState {
    pub fn frontend_count(&self) -> usize {
        self.services.values().map(|s| s.frontends.len()).sum()
    }
}

/// What the node contributes: its name (for locality), its NodePort addresses (both families) and
/// its zone (the `topology.kubernetes.io/zone` label, for topology hints).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
    pub node_addrs: Vec<IpAddr>,
    pub zone: Option<String>,
    /// The sockets of the node and its pods are translated (`--translate-node-sockets`): Local
    /// Services get their [`Scope::NodeSockets`] twins.
    pub node_sockets: bool,
    /// With `node_sockets`, NodePorts are also on 127.0.0.1 for the node's own sockets
    /// (`--localhost-node-ports`).
    pub localhost_node_ports: bool,
    /// With `node_sockets`, the Services' ClusterIPs are frontends for the sockets of the node and
    /// its pods (`--cluster-ips`), as kube-proxy and Cilium's socket LB serve them.
    pub cluster_ips: bool,
    /// ClusterIPs are frontends for packets arriving on `--iface` too (`--external-cluster-ips`,
    /// Cilium's `bpf-lb-external-clusterip`): for networks that route Service CIDRs to the nodes.
    pub external_cluster_ips: bool,
}

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("Service {0}: has no metadata.name")]
    Unnamed(String),
    #[error(
        "Service {service}: port {port}: protocol {protocol} is not supported (TCP and UDP are)"
    )]
    UnsupportedProtocol {
        service: String,
        port: String,
        protocol: String,
    },
    #[error("Service {service}: port {port}: {field} {value} is not a valid port")]
    InvalidPort {
        service: String,
        port: String,
        field: &'static str,
        value: i32,
    },
    #[error("Service {service}: {field} {value:?} is not an IP address")]
    InvalidAddress {
        service: String,
        field: &'static str,
        value: String,
    },
    #[error("Service {service}: sessionAffinityConfig.clientIP.timeoutSeconds {value} is outside 1..=86400; using 10800")]
    InvalidAffinityTimeout { service: String, value: i32 },
    #[error("Service {service}: loadBalancerSourceRanges entry {value:?} is not a CIDR; ignored")]
    InvalidSourceRange { service: String, value: String },
    #[error(
        "Service {service}: healthCheckNodePort {port} is already used by {owner}; ignored here"
    )]
    HealthCheckConflict {
        service: String,
        port: u16,
        owner: String,
    },
    #[error("Service {service}: frontend {frontend} is already used by {owner}; ignored here")]
    FrontendConflict {
        service: String,
        frontend: FrontendAddr,
        owner: ServicePortName,
    },
}

fn object_name(ns: &Option<String>, name: &str) -> String {
    format!("{}/{}", ns.as_deref().unwrap_or("default"), name)
}

/// Does this Service get frontends from us at all? (kube-proxy's skip rules.)
fn is_ours(svc: &Service) -> bool {
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    // Headless: no virtual IP, so nothing for a proxy to do.
    spec.cluster_ip.as_deref() != Some("None")
}

fn valid_port(
    service: &str,
    port: &str,
    field: &'static str,
    value: i32,
) -> Result<u16, ModelError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ModelError::InvalidPort {
            service: service.to_string(),
            port: port.to_string(),
            field,
            value,
        })
}

/// Addresses parsed from a list (both families); invalid ones reported.
fn ip_list<'a>(
    service: &str,
    field: &'static str,
    values: impl Iterator<Item = &'a str>,
    errors: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for v in values {
        match v.trim().parse::<IpAddr>() {
            Ok(ip) => out.push(ip),
            Err(_) => errors.push(ModelError::InvalidAddress {
                service: service.to_string(),
                field,
                value: v.to_string(),
            }),
        }
    }
    out
}

/// The networks of `loadBalancerSourceRanges` (both families; each port family uses its own). A
/// non-empty list restricts even a family it has no entry for (then no source of that family is
/// allowed); invalid entries are reported and ignored.
fn source_ranges(
    service: &str,
    values: &[String],
    errors: &mut Vec<ModelError>,
) -> Option<Vec<(IpAddr, u8)>> {
    if values.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for v in values {
        match parse_cidr(v) {
            Some(net) => out.push(net),
            None => errors.push(ModelError::InvalidSourceRange {
                service: service.to_string(),
                value: v.clone(),
            }),
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// A network: an address masked to its prefix length.
pub type Cidr = (IpAddr, u8);

/// `ADDR/LEN` (surrounding blanks allowed), its address masked to the prefix; `None` when it is
/// not one.
pub fn parse_cidr(text: &str) -> Option<Cidr> {
    let (ip, len) = text.trim().split_once('/')?;
    let len = len.parse::<u8>().ok()?;
    Some(match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) if len <= 32 => (IpAddr::V4(mask_v4(ip, len)), len),
        IpAddr::V6(ip) if len <= 128 => (IpAddr::V6(mask_v6(ip, len)), len),
        _ => return None,
    })
}

fn mask_v4(ip: std::net::Ipv4Addr, len: u8) -> std::net::Ipv4Addr {
    (u32::from(ip) & u32::MAX.checked_shl(32 - len as u32).unwrap_or(0)).into()
}

fn mask_v6(ip: std::net::Ipv6Addr, len: u8) -> std::net::Ipv6Addr {
    (u128::from(ip) & u128::MAX.checked_shl(128 - len as u32).unwrap_or(0)).into()
}

/// Whether `ip` is in the network `(net, len)` (never across families).
pub fn cidr_contains((net, len): Cidr, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(ip, len) == net,
        (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(ip, len) == net,
        _ => false,
    }
}

/// Which of the node's addresses its NodePorts are served on (`--nodeport-addresses`, as
/// kube-proxy's and Cilium's flag of that name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the `--iface` interfaces and of the node's Node object.
    #[default]
    All,
    /// Each family's primary address only (see [`primary_addrs`]).
    Primary,
    /// The addresses in these networks.
    In(Vec<Cidr>),
}

impl std::str::FromStr for NodePortAddresses {
    type Err = String;

    /// `primary`, or comma-separated CIDRs (kube-proxy's forms). An empty value is refused: leaving
    /// the flag out means every address.
    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim() == "primary" {
            return Ok(NodePortAddresses::Primary);
        }
        let mut nets: Vec<Cidr> = text
            .split(',')
            .map(|v| {
                parse_cidr(v).ok_or_else(|| {
                    format!(
                        "{:?} is not a network (e.g. 198.18.0.0/15) nor `primary`",
                        v.trim()
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        nets.sort();
        nets.dedup();
        Ok(NodePortAddresses::In(nets))
    }
}

impl std::fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodePortAddresses::All => f.write_str("all"),
            NodePortAddresses::Primary => f.write_str("primary"),
            NodePortAddresses::In(nets) => {
                let nets: Vec<String> =
                    nets.iter().map(|(ip, len)| format!("{ip}/{len}")).collect();
                f.write_str(&nets.join(","))
            }
        }
    }
}

impl NodePortAddresses {
    /// The NodePort addresses among `addrs` (the interfaces' and the Node object's), given the
    /// node's `primary` ones.
    pub fn select(&self, addrs: &[IpAddr], primary: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match self {
            NodePortAddresses::All => addrs.to_vec(),
            NodePortAddresses::Primary => primary.to_vec(),
            NodePortAddresses::In(nets) => addrs
                .iter()
                .copied()
                .filter(|ip| nets.iter().any(|net| cidr_contains(*net, *ip)))
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }

    /// Whether 127.0.0.1 is among the addresses: kube-proxy serves localhost NodePorts only then.
    pub fn include_ipv4_loopback(&self) -> bool {
        match self {
            NodePortAddresses::All => true,
            NodePortAddresses::Primary => false,
            NodePortAddresses::In(nets) => nets
                .iter()
                .any(|net| cidr_contains(*net, IpAddr::from([127, 0, 0, 1]))),
        }
    }
}

/// The node's primary address of each family (kube-proxy's node IPs): its Node object's first
/// InternalIP of that family, else its first ExternalIP of it, else `fallback`'s first of it (the
/// `--iface` interfaces' own addresses). `node_object` lists the Node's addresses as
/// [`node_object_addrs`] does.
pub fn primary_addrs(node_object: &[IpAddr], fallback: &[IpAddr]) -> Vec<IpAddr> {
    [false, true]
        .into_iter()
        .filter_map(|v6| {
            let of_family = |ip: &&IpAddr| ip.is_ipv6() == v6;
            node_object
                .iter()
                .find(of_family)
                .or_else(|| fallback.iter().find(of_family))
                .copied()
        })
        .collect()
}

/// A Node's addresses: its InternalIPs, then its ExternalIPs, each in the order it lists them.
pub fn node_object_addrs(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpAddr> {
    let listed = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten());
    let of_type = |kind: &'static str| {
        listed
            .clone()
            .filter(move |a| a.type_ == kind)
            .filter_map(|a| a.address.trim().parse::<IpAddr>().ok())
    };
    of_type("InternalIP").chain(of_type("ExternalIP")).collect()
}

/// A Service port's usable endpoints of one family from all its slices, deduplicated: the ready ones, and
/// the serving-but-terminating ones that take new flows only when none is ready (KEP-1669, as
/// kube-proxy does). `ready` unset means ready; `serving` unset means `ready`.
#[derive(Default)]
struct Endpoints {
    ready: Vec<BackendAddr>,
    terminating: Vec<BackendAddr>,
    /// The ready endpoints' topology hints (`hints.forNodes`, `hints.forZones`), by endpoint.
    hints: BTreeMap<BackendAddr, Hints>,
}

#[derive(Clone, Debug, Default)]
struct Hints {
    nodes: BTreeSet<String>,
    zones: BTreeSet<String>,
}

/// Which ready endpoints topology hints leave to this node (kube-proxy's rules): those hinted for
/// this node if every ready endpoint has node hints and one names this node; else those hinted for
/// its zone if every ready endpoint has zone hints and one names its zone; else all. Hints are
/// missing on some endpoint while the EndpointSlice controller switches modes, and a node whose
/// zone no endpoint serves would otherwise get none: both fall back to all endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    Node(&'a str),
    Zone(&'a str),
    Any,
}

impl Endpoints {
    /// The serving endpoints not in `backends`, sorted.
    fn serving_beyond(&self, backends: &[BackendAddr]) -> Vec<BackendAddr> {
        let taken: BTreeSet<(IpAddr, u16)> = backends.iter().map(|b| (b.ip, b.port)).collect();
        let serving = self.ready.iter().chain(&self.terminating);
        let rest: BTreeSet<BackendAddr> = serving
            .filter(|b| !taken.contains(&(b.ip, b.port)))
            .copied()
            .collect();
        rest.into_iter().collect()
    }

    fn topology<'a>(&self, node: &'a NodeContext) -> Topology<'a> {
        let hints: Vec<&Hints> = self
            .ready
            .iter()
            .filter_map(|b| self.hints.get(b))
            .collect();
        let all_have = |f: fn(&Hints) -> &BTreeSet<String>| {
            hints.len() == self.ready.len() && hints.iter().all(|h| !f(h).is_empty())
        };
        let any_names = |f: fn(&Hints) -> &BTreeSet<String>, name: &str| {
            hints.iter().any(|h| f(h).contains(name))
        };
        if all_have(|h| &h.nodes) && any_names(|h| &h.nodes, &node.node_name) {
            return Topology::Node(&node.node_name);
        }
        match node.zone.as_deref() {
            Some(zone) if all_have(|h| &h.zones) && any_names(|h| &h.zones, zone) => {
                Topology::Zone(zone)
            }
            _ => Topology::Any,
        }
    }

    /// kube-proxy's choice for one scope: only this node's endpoints (`externalTrafficPolicy:
    /// Local`, where hints don't apply), or the cluster's as topology hints narrow them.
    fn pick(&self, local_only: bool, node: &NodeContext) -> Vec<BackendAddr> {
        let topology = if local_only {
            Topology::Any
        } else {
            self.topology(node)
        };
        let hinted = |b: &BackendAddr| {
            let hints = self.hints.get(b);
            match topology {
                Topology::Node(name) => hints.is_some_and(|h| h.nodes.contains(name)),
                Topology::Zone(zone) => hints.is_some_and(|h| h.zones.contains(zone)),
                Topology::Any => true,
            }
        };
        let ready: Vec<BackendAddr> = self
            .ready
            .iter()
            .filter(|b| (!local_only || b.local) && hinted(b))
            .copied()
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.terminating
            .iter()
            .filter(|b| !local_only || b.local)
            .copied()
            .collect()
    }
}

fn usable_endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
    node_name: &str,
) -> Endpoints {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    let mut hints: BTreeMap<BackendAddr, Hints> = BTreeMap::new();
    for slice in slices {
        if IpFamily::parse(&slice.address_type) != Some(family) {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()).ok() == Some(protocol)
        }) else {
            continue;
        };
        let Some(port) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .filter(|ip| IpFamily::of(ip) == family)
            else {
                continue;
            };
            let backend = BackendAddr {
                ip,
                port,
                local: ep.node_name.as_deref() == Some(node_name),
            };
            let c = ep.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if is_ready {
                ready.insert(backend);
                if let Some(h) = &ep.hints {
                    let entry = hints.entry(backend).or_default();
                    let names = h.for_nodes.iter().flatten().map(|n| n.name.clone());
                    entry.nodes.extend(names);
                    let names = h.for_zones.iter().flatten().map(|z| z.name.clone());
                    entry.zones.extend(names);
                }
            } else if serving && is_terminating {
                terminating.insert(backend);
            }
        }
    }
    Endpoints {
        ready: ready.into_iter().collect(),
        terminating: terminating.into_iter().collect(),
        hints,
    }
}

/// One Service translated on its own: its ports' frontends (before conflicts between Services are
/// resolved) and backends, and the problems found.
#[derive(Clone, Debug, Default)]
pub struct Translated {
    /// Display name (`namespace/name`) for conflict errors.
    display: String,
    ports: Vec<(ServicePortName, Arc<DesiredService>)>,
    health_check: Option<(u16, HealthCheck)>,
    no_local_endpoints: NoLocalEndpoints,
    errors: Vec<ModelError>,
}

/// Translates one Service with its EndpointSlices.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Translated {
    let mut out = Translated::default();
    let errors = &mut out.errors;
    let Some(name) = svc.metadata.name.clone() else {
        errors.push(ModelError::Unnamed(object_name(
            &svc.metadata.namespace,
            "<unnamed>",
        )));
        return out;
    };
    if !is_ours(svc) {
        return out;
    }
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let display = format!("{namespace}/{name}");
    let Some(spec) = &svc.spec else { return out };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let exposes_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let local_only = spec.external_traffic_policy.as_deref() == Some("Local");

    let lb_ips = if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        // `ipMode: Proxy` (KEP-1860): the load balancer delivers to the node's own address and
        // port, not to the LB address; like kube-proxy, leave that address alone.
        let ips = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_deref());
        ip_list(&display, "status.loadBalancer.ingress.ip", ips, errors)
    } else {
        Vec::new()
    };
    let external_ips = ip_list(
        &display,
        "spec.externalIPs",
        spec.external_ips.iter().flatten().map(String::as_str),
        errors,
    );

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) if (1..=86_400).contains(&t) => t as u32,
                Some(t) => {
                    errors.push(ModelError::InvalidAffinityTimeout {
                        service: display.clone(),
                        value: t,
                    });
                    DEFAULT_AFFINITY_TIMEOUT_S
                }
            }
        }
        _ => 0,
    };
    let source_ranges = if svc_type == "LoadBalancer" {
        source_ranges(
            &display,
            spec.load_balancer_source_ranges.as_deref().unwrap_or(&[]),
            errors,
        )
    } else {
        None
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let for_sockets = node.node_sockets && node.cluster_ips;
    let cluster_scope = if node.external_cluster_ips {
        Scope::External // the socket hooks look there too
    } else {
        Scope::NodeSockets
    };
    let cluster_ips = if for_sockets || node.external_cluster_ips {
        // `clusterIPs` (dual-stack), else the older single `clusterIP`; "" is not allocated yet.
        let listed = spec.cluster_ips.as_deref().filter(|l| !l.is_empty());
        let ips = listed
            .unwrap_or(spec.cluster_ip.as_slice())
            .iter()
            .map(String::as_str)
            .filter(|ip| !ip.is_empty() && *ip != "None");
        ip_list(&display, "spec.clusterIPs", ips, errors)
    } else {
        Vec::new()
    };
    let families = service_families(spec);
    let mut local_endpoints = BTreeSet::new();
    // Families whose ClusterIPs have their other ports' frontends already.
    let mut other_ports_of = BTreeSet::new();
    for (sp, family) in spec
        .ports
        .iter()
        .flatten()
        .flat_map(|sp| families.iter().map(move |f| (sp, *f)))
    {
        let of_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
        let port_name = sp.name.clone().unwrap_or_default();
        let protocol = match Protocol::parse(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(protocol) => {
                errors.push(ModelError::UnsupportedProtocol {
                    service: display.clone(),
                    port: port_name,
                    protocol,
                });
                continue;
            }
        };
        let port = match valid_port(&display, &port_name, "port", sp.port) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let mut frontends = Vec::new();
        let mut node_port = None;
        if exposes_node_ports {
            match sp.node_port {
                None => {} // e.g. allocateLoadBalancerNodePorts: false
                Some(np) => match valid_port(&display, &port_name, "nodePort", np) {
                    Ok(np) => {
                        node_port = Some(np);
                        frontends.extend(node.node_addrs.iter().filter(of_family).map(|ip| {
                            (
                                FrontendAddr {
                                    ip: *ip,
                                    port: np,
                                    protocol,
                                    scope: Scope::External,
                                },
                                FrontendKind::NodePort,
                            )
                        }))
                    }
                    Err(e) => errors.push(e),
                },
            }
        }
        frontends.extend(lb_ips.iter().filter(of_family).map(|ip| {
            (
                FrontendAddr {
                    ip: *ip,
                    port,
                    protocol,
                    scope: Scope::External,
                },
                FrontendKind::LoadBalancer,
            )
        }));
        frontends.extend(external_ips.iter().filter(of_family).map(|ip| {
            (
                FrontendAddr {
                    ip: *ip,
                    port,
                    protocol,
                    scope: Scope::External,
                },
                FrontendKind::ExternalIp,
            )
        }));
        let cluster_frontends: Vec<FrontendAddr> = cluster_ips
            .iter()
            .filter(of_family)
            .map(|ip| FrontendAddr {
                ip: *ip,
                port,
                protocol,
                scope: cluster_scope,
            })
            .collect();
        if frontends.is_empty() && cluster_frontends.is_empty() {
            continue; // Nothing exposed from the NIC and no ClusterIP.
        }
        let endpoints = usable_endpoints(slices, &port_name, protocol, family, &node.node_name);
        // The health check counts the primary family's endpoints (a dual-stack pod has two IPs).
        if Some(&family) == families.first() {
            local_endpoints.extend(endpoints.pick(true, node).iter().map(|b| b.ip));
        }
        let all = endpoints.pick(false, node);
        if !all.is_empty() && endpoints.pick(true, node).is_empty() {
            let counts = &mut out.no_local_endpoints;
            counts.internal += usize::from(internal_local);
            counts.external += usize::from(local_only && !frontends.is_empty());
        }
        // Where the ClusterIPs lead: `internalTrafficPolicy: Local`, this node's endpoints only
        // (with endpoints only elsewhere, new connections go nowhere: kube-proxy drops them).
        let cluster_wanted = match (cluster_frontends.is_empty(), internal_local) {
            (true, _) => None,
            (false, false) => Some((all.clone(), WhenEmpty::Reject)),
            (false, true) => {
                let when_empty = if all.is_empty() {
                    WhenEmpty::Reject
                } else {
                    WhenEmpty::Drop
                };
                Some((endpoints.pick(true, node), when_empty))
            }
        };
        let (backends, when_empty, everyone) = if local_only {
            // Endpoints elsewhere but none here: drop (kube-proxy); none anywhere: refuse.
            let when_empty = if all.is_empty() {
                WhenEmpty::Reject
            } else {
                WhenEmpty::Drop
            };
            (endpoints.pick(true, node), when_empty, Some(all))
        } else {
            (all, WhenEmpty::Reject, None)
        };
        let key = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port: port_name,
            protocol,
            family,
            scope: Scope::External,
        };
        let mut desired = DesiredService {
            backends,
            when_empty,
            affinity_timeout_s,
            source_ranges: source_ranges
                .as_ref()
                .map(|r| r.iter().filter(|(ip, _)| of_family(&ip)).copied().collect()),
            ..Default::default()
        };
        for (addr, kind) in frontends {
            desired.frontends.entry(addr).or_insert(kind);
        }
        // `127.0.0.1:<nodePort>` for the node's own sockets, as kube-proxy's localhost NodePorts
        // and Cilium's socket LB serve it (IPv4 only, as both do).
        let localhost = node_port
            .filter(|_| node.node_sockets && node.localhost_node_ports && family == IpFamily::V4)
            .map(|port| FrontendAddr {
                ip: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                port,
                protocol,
                scope: Scope::NodeSockets,
            });
        let mut twin = None;
        if let Some(all) = everyone.filter(|_| node.node_sockets) {
            // The sockets of the node and its pods reach every endpoint, as kube-proxy sends
            // traffic from them: a twin on the same addresses, which only the socket hooks look up.
            twin = Some(DesiredService {
                frontends: desired
                    .frontends
                    .iter()
                    .map(|(addr, kind)| {
                        let addr = FrontendAddr {
                            scope: Scope::NodeSockets,
                            ..*addr
                        };
                        (addr, *kind)
                    })
                    .collect(),
                backends: all,
                still_serving: Vec::new(), // below
                when_empty: WhenEmpty::Reject,
                affinity_timeout_s,
                // Pods' sockets leave a LoadBalancer address with source ranges to the packet
                // path, where the ranges apply; the node's own pass (see `sock.rs`).
                source_ranges: desired.source_ranges.clone(),
            });
        }
        if let Some(addr) = localhost {
            // The node's sockets, so the twin's where there is one (every endpoint).
            let owner = twin.as_mut().unwrap_or(&mut desired);
            owner.frontends.insert(addr, FrontendKind::NodePort);
        }
        let mut own_entry = None;
        if let Some((wanted, when_empty)) = cluster_wanted {
            // Shared with the entry that already has these endpoints (one Maglev table); an
            // entry of their own only where none has (then there is no twin).
            let owner = match (&mut twin, &mut desired) {
                (Some(t), _) if t.backends == wanted => t,
                (_, d) if d.backends == wanted => d,
                _ => own_entry.insert(DesiredService {
                    backends: wanted,
                    when_empty,
                    affinity_timeout_s,
                    ..Default::default()
                }),
            };
            // The ports a ClusterIP does not serve are refused (kube-proxy's nftables rules
            // reject them, Cilium drops them): port 0 stands for them, on the first port's entry.
            // Only the socket hooks refuse them: a packet from outside is left to the node.
            if for_sockets && other_ports_of.insert(family) {
                for addr in &cluster_frontends {
                    for protocol in [Protocol::Tcp, Protocol::Udp] {
                        let other_ports = FrontendAddr {
                            port: OTHER_PORTS,
                            protocol,
                            scope: Scope::NodeSockets,
                            ..*addr
                        };
                        owner.frontends.insert(other_ports, FrontendKind::ClusterIp);
                    }
                }
            }
            for addr in cluster_frontends {
                owner.frontends.insert(addr, FrontendKind::ClusterIp);
            }
        }
        if let Some(mut entry) = twin.or(own_entry) {
            entry.still_serving = endpoints.serving_beyond(&entry.backends);
            let entry_key = ServicePortName {
                scope: Scope::NodeSockets,
                ..key.clone()
            };
            out.ports.push((entry_key, Arc::new(entry)));
        }
        desired.still_serving = endpoints.serving_beyond(&desired.backends);
        out.ports.push((key, Arc::new(desired)));
    }
    if local_only {
        if let Some(port) = spec.health_check_node_port {
            match valid_port(&display, "", "healthCheckNodePort", port) {
                Ok(port) => {
                    let hc = HealthCheck {
                        namespace,
                        name,
                        local_endpoints: local_endpoints.len(),
                    };
                    out.health_check = Some((port, hc));
                }
                Err(e) => out.errors.push(e),
            }
        }
    }
    // A port's problem shows once, not once per family.
    out.errors.dedup();
    out.display = display;
    out
}

/// The families a Service is served in: `spec.ipFamilies`, else its cluster IPs' families (objects
/// written before dual-stack), else IPv4. kube-proxy likewise serves a Service in each family it
/// has a cluster IP of.
fn service_families(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<IpFamily> {
    let mut families: Vec<IpFamily> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| IpFamily::parse(f))
        .collect();
    if families.is_empty() {
        families = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| IpFamily::of(&ip))
            .collect();
    }
    let mut seen = BTreeSet::new();
    families.retain(|f| seen.insert(*f));
    if families.is_empty() {
        families.push(IpFamily::V4);
    }
    families
}

/// The Service a slice belongs to, unless kube-proxy would ignore the slice.
fn slice_owner(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL) {
        return None;
    }
    let svc = labels.get(SERVICE_NAME_LABEL)?;
    Some((
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        svc.as_str(),
    ))
}

fn service_id(svc: &Service) -> (&str, &str) {
    (
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or(""),
    )
}

/// Puts translated Services together. Sorted by namespace/name, so which of two Services claiming
/// the same frontend wins is the same on every node and every run. Each Service's problems come
/// out apart (its own, then its conflicts with earlier Services), in the order given.
fn assemble<'a>(
    translated: impl Iterator<Item = &'a Translated>,
) -> (DesiredState, Vec<Vec<ModelError>>) {
    let mut problems = Vec::new();
    let mut state = DesiredState::default();
    let mut owners: BTreeMap<FrontendAddr, &ServicePortName> = BTreeMap::new();
    for t in translated {
        let mut errors = t.errors.clone();
        state.no_local_endpoints.internal += t.no_local_endpoints.internal;
        state.no_local_endpoints.external += t.no_local_endpoints.external;
        if let Some((port, hc)) = &t.health_check {
            match state.health_checks.get(port) {
                Some(owner) => errors.push(ModelError::HealthCheckConflict {
                    service: t.display.clone(),
                    port: *port,
                    owner: format!("{}/{}", owner.namespace, owner.name),
                }),
                None => {
                    state.health_checks.insert(*port, hc.clone());
                }
            }
        }
        for (key, want) in &t.ports {
            let taken = |addr: &FrontendAddr| owners.get(addr).is_some_and(|owner| *owner != key);
            let desired = if want.frontends.keys().any(taken) {
                // Some frontends belong to an earlier Service: keep the rest (rare, so copy here).
                let mut mine = (**want).clone();
                mine.frontends.retain(|addr, _| {
                    let free = !taken(addr);
                    if !free {
                        errors.push(ModelError::FrontendConflict {
                            service: t.display.clone(),
                            frontend: *addr,
                            owner: owners[addr].clone(),
                        });
                    }
                    free
                });
                Arc::new(mine)
            } else {
                Arc::clone(want)
            };
            if desired.frontends.is_empty() {
                continue;
            }
            for addr in desired.frontends.keys() {
                owners.insert(*addr, key);
            }
            state.services.insert(key.clone(), desired);
        }
        problems.push(errors);
    }
    (state, problems)
}

fn group_slices<E: std::borrow::Borrow<EndpointSlice>>(
    slices: &[E],
) -> HashMap<(&str, &str), Vec<&E>> {
    let mut by_service: HashMap<(&str, &str), Vec<&E>> = HashMap::new();
    for slice in slices {
        if let Some(owner) = slice_owner(slice.borrow()) {
            by_service.entry(owner).or_default().push(slice);
        }
    }
    by_service
}

/// Services and EndpointSlices -> desired state, plus every problem found on the way. A problem
/// costs only the part of the object it concerns; everything else is still translated.
pub fn desired_state<S: std::borrow::Borrow<Service>, E: std::borrow::Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: &NodeContext,
) -> (DesiredState, Vec<ModelError>) {
    let by_service = group_slices(slices);
    let mut sorted: Vec<&Service> = services.iter().map(|s| s.borrow()).collect();
    sorted.sort_by_key(|s| service_id(s));
    let translated: Vec<Translated> = sorted
        .iter()
        .map(|svc| {
            let slices: Vec<&EndpointSlice> = by_service
                .get(&service_id(svc))
                .into_iter()
                .flatten()
                .map(|s| (*s).borrow())
                .collect();
            translate_service(svc, &slices, node)
        })
        .collect();
    let (state, problems) = assemble(translated.iter());
    (state, problems.into_iter().flatten().collect())
}

/// A Service's namespace and name, as its EndpointSlices name it.
type ServiceId = (String, String);

fn owned((namespace, name): (&str, &str)) -> ServiceId {
    (namespace.to_owned(), name.to_owned())
}

/// The service ports whose entry in [`DesiredState::services`] an update may have changed, with
/// the entry each had before (`None`: it had none). Every other entry is as it was (mostly the
/// same `Arc`).
pub type Changed = BTreeMap<ServicePortName, Option<Arc<DesiredService>>>;

/// [`desired_state`], kept up to date from one call to the next at the cost of what changed: the
/// API source's stores keep an unchanged object's `Arc`, so identity tells which objects came,
/// went or were replaced; only their Services are translated again. When those claim the same
/// frontends and health check port as before (an endpoint change), their entries are replaced in
/// place; when nobody else claims what they claimed or claim (a Service added or removed, as a
/// rule), their entries are swapped whole: either way without assembling the whole state.
/// Otherwise (a contested frontend or health check port involved, the node changed) the state is
/// assembled again from every Service's translation.
#[derive(Default)]
pub struct Translator {
    node: Option<NodeContext>,
    /// The objects of the last call, sorted by identity (held, so no address is reused).
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// Each Service's object, its slices (by identity) and translation, in assembly order.
    by_id: BTreeMap<ServiceId, Memo>,
    /// Slices whose Service is not there (yet).
    orphans: HashMap<ServiceId, Vec<Arc<EndpointSlice>>>,
    state: DesiredState,
    /// Each Service's problems as [`assemble`] gives them; only Services that have some.
    problems: BTreeMap<ServiceId, Vec<ModelError>>,
    /// The claims of every translation in `by_id`.
    claims: Claims,
    /// How many Services the last call translated afresh (the rest came from the memo).
    pub retranslated: usize,
    /// Whether the last call assembled the state anew (rather than replacing entries in place).
    pub reassembled: bool,
    /// How many Services the last call placed, replaced or removed whole without assembling,
    /// because what they claimed and claim is theirs alone (a Service added or removed, say).
    pub swapped_alone: usize,
    /// The slice objects the last call found new and gone.
    slices_added: Vec<Arc<EndpointSlice>>,
    slices_removed: Vec<Arc<EndpointSlice>>,
}

struct Memo {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    out: Arc<Translated>,
}

/// The frontends and health check port a translation claims: when a Service's stay the same, the
/// outcome of every conflict between Services does too.
fn same_claims(a: &Translated, b: &Translated) -> bool {
    a.ports.len() == b.ports.len()
        && a.ports
            .iter()
            .zip(&b.ports)
            .all(|((ka, wa), (kb, wb))| ka == kb && wa.frontends.keys().eq(wb.frontends.keys()))
        && a.health_check.as_ref().map(|(p, _)| p) == b.health_check.as_ref().map(|(p, _)| p)
}

/// How many claims there are on each frontend (one per service port that wants it) and each
/// health check port (one per Service), over every Service's translation.
#[derive(Default)]
struct Claims {
    frontends: HashMap<FrontendAddr, u32>,
    health_checks: HashMap<u16, u32>,
}

impl Claims {
    /// Counts a translation's claims in (`true`) or out.
    fn count(&mut self, t: &Translated, add: bool) {
        fn step<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K, add: bool) {
            if add {
                *counts.entry(key).or_default() += 1;
            } else if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        for (_, want) in &t.ports {
            for addr in want.frontends.keys() {
                step(&mut self.frontends, *addr, add);
            }
        }
        if let Some((port, _)) = &t.health_check {
            step(&mut self.health_checks, *port, add);
        }
    }

    /// Whether each of a translation's claims is the only one on what it claims (the
    /// translation's own claims counted in).
    fn alone(&self, t: &Translated) -> bool {
        t.ports.iter().all(|(_, want)| {
            want.frontends
                .keys()
                .all(|addr| self.frontends.get(addr).is_none_or(|n| *n <= 1))
        }) && t
            .health_check
            .as_ref()
            .is_none_or(|(port, _)| self.health_checks.get(port).is_none_or(|n| *n <= 1))
    }
}

/// Objects in identity order, and what one list of them adds to and removes from another.
struct ByIdentity<T> {
    sorted: Vec<Arc<T>>,
    added: Vec<Arc<T>>,
    removed: Vec<Arc<T>>,
}

/// `now` sorted by identity, and what it adds to and removes from `before` (sorted the same way).
fn by_identity<T>(before: &[Arc<T>], now: &[Arc<T>]) -> ByIdentity<T> {
    let mut sorted = now.to_vec();
    sorted.sort_unstable_by_key(|o| Arc::as_ptr(o) as usize);
    sorted.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < sorted.len() {
        let b = before.get(i).map(|o| Arc::as_ptr(o) as usize);
        let n = sorted.get(j).map(|o| Arc::as_ptr(o) as usize);
        match (b, n) {
            (Some(b), Some(n)) if b == n => (i, j) = (i + 1, j + 1),
            (Some(b), n) if n.is_none_or(|n| b < n) => {
                removed.push(Arc::clone(&before[i]));
                i += 1;
            }
            _ => {
                added.push(Arc::clone(&sorted[j]));
                j += 1;
            }
        }
    }
    ByIdentity {
        sorted,
        added,
        removed,
    }
}

impl Translator {
    /// The desired state as of the last [`Translator::update`].
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The slice objects the last [`Translator::update`] found new (new slices, and new versions)
    /// and gone (old versions too).
    pub fn slices_changed(&self) -> (&[Arc<EndpointSlice>], &[Arc<EndpointSlice>]) {
        (&self.slices_added, &self.slices_removed)
    }

    /// The problems found by the last [`Translator::update`], as [`desired_state`] lists them.
    pub fn errors(&self) -> impl Iterator<Item = &ModelError> {
        self.problems.values().flatten()
    }

    /// Brings the state to [`desired_state`] of these objects; returns what changed.
    pub fn update(
        &mut self,
        objects: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeContext,
    ) -> Changed {
        self.retranslated = 0;
        self.reassembled = false;
        self.swapped_alone = 0;
        if self.node.as_ref() != Some(node) {
            // Everything depends on the node: start over.
            let before = std::mem::take(&mut self.state);
            *self = Translator {
                node: Some(node.clone()),
                state: before,
                ..Translator::default()
            };
        }
        let services = by_identity(&self.services, objects);
        let slices_now = by_identity(&self.slices, slices);
        let (added_services, removed_services) = (services.added, services.removed);
        let (added_slices, removed_slices) = (slices_now.added, slices_now.removed);
        self.services = services.sorted;
        self.slices = slices_now.sorted;
        self.slices_added.clone_from(&added_slices);
        self.slices_removed.clone_from(&removed_slices);

        let mut dirty: BTreeSet<ServiceId> = BTreeSet::new();
        let first = self.by_id.is_empty();
        // The translations of Services gone in this call.
        let mut gone: Vec<(ServiceId, Arc<Translated>)> = Vec::new();
        for slice in &removed_slices {
            let Some(owner) = slice_owner(slice).map(owned) else {
                continue;
            };
            self.slices_of(&owner).retain(|s| !Arc::ptr_eq(s, slice));
            if self.orphans.get(&owner).is_some_and(Vec::is_empty) {
                self.orphans.remove(&owner);
            }
            dirty.insert(owner);
        }
        let mut added: BTreeMap<ServiceId, Arc<Service>> = BTreeMap::new();
        for service in &added_services {
            if added
                .insert(owned(service_id(service)), Arc::clone(service))
                .is_some()
            {
                // Two objects under one name (not from a store): the plain model decides.
                return self.replace_state(desired_state(objects, slices, node));
            }
        }
        for service in &removed_services {
            let id = owned(service_id(service));
            match (added.remove(&id), self.by_id.get_mut(&id)) {
                // Updated: a new object in the same place.
                (Some(new), Some(memo)) => memo.service = new,
                (new, _) => {
                    // Gone: its slices wait for a Service of that name.
                    if let Some(memo) = self.by_id.remove(&id) {
                        if !memo.slices.is_empty() {
                            self.orphans.insert(id.clone(), memo.slices);
                        }
                        gone.push((id.clone(), memo.out));
                    }
                    if let Some(new) = new {
                        added.insert(id.clone(), new);
                    }
                }
            }
            dirty.insert(id);
        }
        for (id, service) in added {
            if self.by_id.contains_key(&id) {
                return self.replace_state(desired_state(objects, slices, node));
            }
            let slices = self.orphans.remove(&id).unwrap_or_default();
            // A new Service had no translation: it claimed nothing.
            let out = Arc::new(Translated::default());
            self.by_id.insert(
                id.clone(),
                Memo {
                    service,
                    slices,
                    out,
                },
            );
            dirty.insert(id);
        }
        for slice in &added_slices {
            let Some(owner) = slice_owner(slice).map(owned) else {
                continue;
            };
            let list = self.slices_of(&owner);
            let at = list.partition_point(|s| Arc::as_ptr(s) < Arc::as_ptr(slice));
            list.insert(at, Arc::clone(slice));
            dirty.insert(owner);
        }

        // Translate the Services whose inputs changed; keep the translations they had.
        let mut swaps: Vec<(ServiceId, Arc<Translated>, Arc<Translated>)> = Vec::new();
        for id in &dirty {
            let Some(memo) = self.by_id.get_mut(id) else {
                continue;
            };
            self.retranslated += 1;
            let refs: Vec<&EndpointSlice> = memo.slices.iter().map(|s| s.as_ref()).collect();
            let out = Arc::new(translate_service(&memo.service, &refs, node));
            let was = std::mem::replace(&mut memo.out, Arc::clone(&out));
            swaps.push((id.clone(), was, out));
        }
        let nothing = Arc::new(Translated::default());
        swaps.extend(
            gone.into_iter()
                .map(|(id, was)| (id, was, Arc::clone(&nothing))),
        );

        // Entries can be swapped without looking at other Services when their claims stay the
        // same, or when nobody else claims what they claimed or claim (before and after).
        let moved =
            |(_, was, now): &&(ServiceId, Arc<Translated>, Arc<Translated>)| !same_claims(was, now);
        let alone_before = swaps
            .iter()
            .filter(moved)
            .all(|(_, was, _)| self.claims.alone(was));
        for (_, was, now) in swaps.iter().filter(moved) {
            self.claims.count(was, false);
            self.claims.count(now, true);
        }
        let alone_after = swaps
            .iter()
            .filter(moved)
            .all(|(_, _, now)| self.claims.alone(now));
        if first || !alone_before || !alone_after {
            self.reassembled = true;
            let (state, problems) = assemble(self.by_id.values().map(|m| m.out.as_ref()));
            self.problems = self
                .by_id
                .keys()
                .zip(problems)
                .filter(|(_, p)| !p.is_empty())
                .map(|(id, p)| (id.clone(), p))
                .collect();
            let old = std::mem::replace(&mut self.state, state);
            return changed_between(&old, &self.state);
        }
        let mut changed = Changed::new();
        for (id, was, now) in swaps {
            let gauges = &mut self.state.no_local_endpoints;
            gauges.swap(&was.no_local_endpoints, &now.no_local_endpoints);
            if same_claims(&was, &now) {
                self.replace_in_place(&id, &was, &now, &mut changed);
            } else {
                self.swapped_alone += 1;
                self.replace_alone(&id, &was, &now, &mut changed);
            }
        }
        changed
    }

    /// The slices of Service `id` (kept aside while there is no such Service), by identity.
    fn slices_of(&mut self, id: &ServiceId) -> &mut Vec<Arc<EndpointSlice>> {
        match self.by_id.get_mut(id) {
            Some(memo) => &mut memo.slices,
            None => self.orphans.entry(id.clone()).or_default(),
        }
    }

    /// Swaps one Service's translation for another that claims the same (see [`same_claims`]):
    /// each port keeps the frontends it had (the ones no earlier Service took), the health check
    /// port stays with whoever had it, and the conflicts found stay as they were.
    fn replace_in_place(
        &mut self,
        id: &ServiceId,
        was: &Translated,
        now: &Translated,
        changed: &mut Changed,
    ) {
        let state = &mut self.state;
        if let Some((port, hc)) = &now.health_check {
            if let Some(owner) = state.health_checks.get_mut(port) {
                if (owner.namespace.as_str(), owner.name.as_str()) == (id.0.as_str(), id.1.as_str())
                {
                    *owner = hc.clone();
                }
            }
        }
        for (key, want) in &now.ports {
            let Some(placed) = state.services.get(key) else {
                // Every frontend of it went to earlier Services (or it has none): still so.
                continue;
            };
            let desired = if placed.frontends.keys().eq(want.frontends.keys()) {
                Arc::clone(want)
            } else {
                let mut mine = (**want).clone();
                mine.frontends
                    .retain(|addr, _| placed.frontends.contains_key(addr));
                Arc::new(mine)
            };
            let old = state.services.insert(key.clone(), desired);
            changed.entry(key.clone()).or_insert(old);
        }
        // Its own problems, then its conflicts (the same as before).
        let problems = self.problems.remove(id).unwrap_or_default();
        let conflicts = problems.into_iter().skip(was.errors.len());
        let mine: Vec<ModelError> = now.errors.iter().cloned().chain(conflicts).collect();
        if !mine.is_empty() {
            self.problems.insert(id.clone(), mine);
        }
    }

    /// Swaps one Service's translation for another when nobody else claims what either claims
    /// (see [`Claims::alone`]): so no conflict involves it, before or after, and its ports get
    /// every frontend they want.
    fn replace_alone(
        &mut self,
        id: &ServiceId,
        was: &Translated,
        now: &Translated,
        changed: &mut Changed,
    ) {
        let state = &mut self.state;
        if let Some((port, _)) = &was.health_check {
            state.health_checks.remove(port);
        }
        if let Some((port, hc)) = &now.health_check {
            state.health_checks.insert(*port, hc.clone());
        }
        for (key, _) in &was.ports {
            if let Some(old) = state.services.remove(key) {
                changed.entry(key.clone()).or_insert(Some(old));
            }
        }
        for (key, want) in &now.ports {
            if !want.frontends.is_empty() {
                let old = state.services.insert(key.clone(), Arc::clone(want));
                changed.entry(key.clone()).or_insert(old);
            }
        }
        self.problems.remove(id);
        if !now.errors.is_empty() {
            self.problems.insert(id.clone(), now.errors.clone());
        }
    }

    /// Takes a state the plain model computed (and forgets what it knew of the objects).
    fn replace_state(&mut self, (state, errors): (DesiredState, Vec<ModelError>)) -> Changed {
        let node = self.node.take();
        let old = std::mem::take(&mut self.state);
        *self = Translator {
            node,
            state,
            reassembled: true,
            slices_added: std::mem::take(&mut self.slices_added),
            slices_removed: std::mem::take(&mut self.slices_removed),
            problems: BTreeMap::from([(ServiceId::default(), errors)]),
            ..Translator::default()
        };
        changed_between(&old, &self.state)
    }

    /// [`Translator::update`], returning a copy of the state and problems.
    #[cfg(test)]
    pub fn desired_state(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeContext,
    ) -> (DesiredState, Vec<ModelError>) {
        self.update(services, slices, node);
        (self.state.clone(), self.errors().cloned().collect())
    }
}

/// The entries that differ between two states (by identity or value), with `before`'s.
pub fn changed_between(before: &DesiredState, after: &DesiredState) -> Changed {
    let mut changed = Changed::new();
    for (key, was) in &before.services {
        match after.services.get(key) {
            Some(now) if Arc::ptr_eq(now, was) || now == was => {}
            _ => {
                changed.insert(key.clone(), Some(Arc::clone(was)));
            }
        }
    }
    for key in after.services.keys() {
        if !before.services.contains_key(key) {
            changed.insert(key.clone(), None);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("test Service parses")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("test EndpointSlice parses")
    }

    /// hello-world's slice (TCP port 50000) with these endpoint entries (YAML list items).
    fn hello_slice_with(endpoints: &str) -> EndpointSlice {
        slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: h, namespace: default, labels: {{kubernetes.io/service-name: hello-world}}}}\naddressType: IPv4\nports: [{{name: \"\", protocol: TCP, port: 50000}}]\nendpoints:\n{endpoints}"
        ))
    }

    /// [`hello_slice_with`] endpoints given as (address, conditions, node).
    fn hello_slice_of(endpoints: &[(&str, &str, &str)]) -> EndpointSlice {
        let mut eps = String::new();
        for (ip, conditions, node) in endpoints {
            eps +=
                &format!("- addresses: [{ip}]\n  conditions: {conditions}\n  nodeName: {node}\n");
        }
        hello_slice_with(&eps)
    }

    const NO_SLICES: &[EndpointSlice] = &[];

    fn node() -> NodeContext {
        NodeContext {
            node_sockets: false,
            localhost_node_ports: false,
            cluster_ips: false,
            external_cluster_ips: false,
            node_name: "node-a".into(),
            node_addrs: vec![
                IpAddr::from([198, 18, 0, 10]),
                IpAddr::from([198, 18, 0, 11]),
            ],
            zone: None,
        }
    }

    const HELLO: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: hello-world, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {greeting: hello, department: world}
  ports:
  - {protocol: TCP, port: 60000, targetPort: 50000, nodePort: 30600}
"#;

    const HELLO_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hello-world-abc
  namespace: default
  labels: {kubernetes.io/service-name: hello-world}
addressType: IPv4
ports: [{name: "", protocol: TCP, port: 50000}]
endpoints:
- addresses: [198.19.1.2]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [198.19.2.2]
  conditions: {ready: true}
  nodeName: node-b
- addresses: [198.19.2.3]
  conditions: {ready: false}
  nodeName: node-b
- addresses: [198.19.2.4]
  nodeName: node-b
"#;

    fn key(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol,
            family: IpFamily::V4,
            scope: Scope::External,
        }
    }

    fn be(ip: [u8; 4], port: u16, local: bool) -> BackendAddr {
        BackendAddr {
            ip: ip.into(),
            port,
            local,
        }
    }

    #[test]
    fn nodeport_on_every_node_address_with_ready_backends() {
        let (state, errors) = desired_state(&[svc(HELLO)], &[slice(HELLO_SLICE)], &node());
        assert!(errors.is_empty(), "{errors:?}");
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        let fronts: Vec<_> = s.frontends.keys().map(|f| f.to_string()).collect();
        assert_eq!(fronts, ["198.18.0.10:30600/TCP", "198.18.0.11:30600/TCP"]);
        // not-ready 198.19.2.3 excluded; unset `ready` (198.19.2.4) counts as ready.
        assert_eq!(
            s.backends,
            [
                be([198, 19, 1, 2], 50000, true),
                be([198, 19, 2, 2], 50000, false),
                be([198, 19, 2, 4], 50000, false)
            ]
        );
        assert_eq!(s.when_empty, WhenEmpty::Reject);
    }

    #[test]
    fn cluster_ip_is_never_exposed() {
        let cip = HELLO.replace("type: NodePort", "type: ClusterIP");
        let (state, errors) = desired_state(&[svc(&cip)], &[slice(HELLO_SLICE)], &node());
        assert!(errors.is_empty());
        assert!(state.services.is_empty());
    }

    /// `--cluster-ips`: a Service's ClusterIPs are frontends for the socket hooks only, sharing
    /// the entry (and Maglev table) that already has the endpoints they lead to.
    #[test]
    fn cluster_ips_are_node_sockets_frontends_with_the_endpoints_internal_traffic_policy_gives() {
        let sockets = NodeContext {
            node_sockets: true,
            cluster_ips: true,
            ..node()
        };
        let cip = |ip: &str| FrontendAddr {
            ip: ip.parse().unwrap(),
            port: 60000,
            protocol: Protocol::Tcp,
            scope: Scope::NodeSockets,
        };
        // The ClusterIP's port, and port 0 for the other ports of either protocol (refused).
        let only_cluster_ip = |ip: &str| {
            let other = |protocol| FrontendAddr {
                port: OTHER_PORTS,
                protocol,
                ..cip(ip)
            };
            BTreeMap::from([
                (cip(ip), FrontendKind::ClusterIp),
                (other(Protocol::Tcp), FrontendKind::ClusterIp),
                (other(Protocol::Udp), FrontendKind::ClusterIp),
            ])
        };
        let name = key("hello-world", "", Protocol::Tcp);
        let own_name = ServicePortName {
            scope: Scope::NodeSockets,
            ..name.clone()
        };
        let every = vec![
            be([198, 19, 1, 2], 50000, true),
            be([198, 19, 2, 2], 50000, false),
            be([198, 19, 2, 4], 50000, false),
        ];
        let here = vec![be([198, 19, 1, 2], 50000, true)];
        let with = |svc_type: &str, extra: &str| {
            let yaml = HELLO.replace("type: NodePort", &format!("type: {svc_type}{extra}"));
            desired_state(&[svc(&yaml)], &[slice(HELLO_SLICE)], &sockets)
        };

        // A ClusterIP Service: one entry, its ClusterIP only, never on the NIC.
        let (state, errors) = with("ClusterIP", "");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.services.len(), 1);
        let entry = &state.services[&name];
        assert_eq!(entry.frontends, only_cluster_ip("10.96.0.10"));
        assert_eq!(entry.backends, every);

        // A NodePort Service: the ClusterIP joins the NodePorts' entry.
        let (state, _) = with("NodePort", "");
        assert_eq!(state.services.len(), 1);
        let entry = &state.services[&name];
        assert_eq!(
            entry.frontends.len(),
            5,
            "2 NodePorts, the ClusterIP, its other ports"
        );
        assert_eq!(
            entry.frontends.get(&cip("10.96.0.10")),
            Some(&FrontendKind::ClusterIp)
        );

        // externalTrafficPolicy: Local: the twin's (every endpoint), not the local entry.
        let (state, _) = with("NodePort", "\n  externalTrafficPolicy: Local");
        assert!(!state.services[&name]
            .frontends
            .contains_key(&cip("10.96.0.10")));
        assert_eq!(state.services[&name].backends, here);
        let twin = &state.services[&own_name];
        assert!(twin.frontends.contains_key(&cip("10.96.0.10")));
        assert_eq!(twin.backends, every);

        // internalTrafficPolicy: Local: this node's endpoints; the local entry where one exists,
        // else an entry of its own.
        let (state, _) = with(
            "NodePort",
            "\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
        );
        assert!(state.services[&name]
            .frontends
            .contains_key(&cip("10.96.0.10")));
        assert!(!state.services[&own_name]
            .frontends
            .contains_key(&cip("10.96.0.10")));
        for svc_type in ["NodePort", "ClusterIP"] {
            let (state, _) = with(svc_type, "\n  internalTrafficPolicy: Local");
            let own = &state.services[&own_name];
            assert_eq!(own.frontends, only_cluster_ip("10.96.0.10"), "{svc_type}");
            assert_eq!(own.backends, here, "{svc_type}");
        }
        // No endpoint here: nothing, while endpoints elsewhere exist (kube-proxy drops).
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..sockets.clone()
        };
        let yaml = HELLO.replace(
            "type: NodePort",
            "type: ClusterIP\n  internalTrafficPolicy: Local",
        );
        let (state, _) = desired_state(&[svc(&yaml)], &[slice(HELLO_SLICE)], &elsewhere);
        assert!(state.services[&own_name].backends.is_empty());
        assert_eq!(state.services[&own_name].when_empty, WhenEmpty::Drop);

        // Dual-stack: each family's entry has its own ClusterIP; a bad one is reported.
        let dual = HELLO.replace(
            "clusterIP: 10.96.0.10",
            "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::10\", bogus]\n  ipFamilies: [IPv4, IPv6]",
        );
        let (state, errors) = desired_state(&[svc(&dual)], &[slice(HELLO_SLICE)], &sockets);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("bogus"), "{errors:?}");
        assert!(state.services[&name]
            .frontends
            .contains_key(&cip("10.96.0.10")));
        let v6 = ServicePortName {
            family: IpFamily::V6,
            ..name.clone()
        };
        // No IPv6 endpoints, so refused; and no IPv4 address in the IPv6 entry.
        let v6_entry = &state.services[&v6];
        assert_eq!(v6_entry.frontends, only_cluster_ip("fd00::10"));
        assert!(v6_entry.backends.is_empty());

        // Two ports: the other ports' frontends once, on the first port's entry, no conflict.
        let two = HELLO.replace("type: NodePort", "type: ClusterIP").replace(
            "  - {protocol: TCP, port: 60000, targetPort: 50000, nodePort: 30600}",
            "  - {name: a, protocol: TCP, port: 60000, targetPort: 50000}\n  - {name: b, protocol: UDP, port: 53, targetPort: 50000}",
        );
        let (state, errors) = desired_state(&[svc(&two)], NO_SLICES, &sockets);
        assert!(errors.is_empty(), "{errors:?}");
        let fronts: Vec<String> = state
            .services
            .values()
            .map(|s| {
                s.frontends
                    .keys()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            fronts,
            [
                "10.96.0.10:*/TCP (node sockets) 10.96.0.10:*/UDP (node sockets) 10.96.0.10:60000/TCP (node sockets)",
                "10.96.0.10:53/UDP (node sockets)"
            ]
        );

        // `--external-cluster-ips`: the ClusterIP is a packet frontend too (the hooks look
        // there as well), with or without the hooks; its other ports stay the hooks' alone.
        for node_sockets in [true, false] {
            let external = NodeContext {
                external_cluster_ips: true,
                node_sockets,
                ..sockets.clone()
            };
            let yaml = HELLO.replace("type: NodePort", "type: ClusterIP");
            let (state, _) = desired_state(&[svc(&yaml)], &[slice(HELLO_SLICE)], &external);
            let fronts: Vec<String> = state.services[&name]
                .frontends
                .keys()
                .map(|f| f.to_string())
                .collect();
            let mut want = vec!["10.96.0.10:60000/TCP"];
            if node_sockets {
                want.splice(
                    0..0,
                    [
                        "10.96.0.10:*/TCP (node sockets)",
                        "10.96.0.10:*/UDP (node sockets)",
                    ],
                );
            }
            assert_eq!(fronts, want, "node sockets: {node_sockets}");
            assert_eq!(state.services[&name].backends, every);
        }

        // Off, or without the socket hooks: none.
        for node in [
            NodeContext {
                cluster_ips: false,
                ..sockets.clone()
            },
            NodeContext {
                node_sockets: false,
                ..sockets.clone()
            },
        ] {
            let (state, _) = with_node(&node);
            assert!(state.services.is_empty());
        }
        fn with_node(node: &NodeContext) -> (DesiredState, Vec<ModelError>) {
            let yaml = HELLO.replace("type: NodePort", "type: ClusterIP");
            desired_state(&[svc(&yaml)], &[slice(HELLO_SLICE)], node)
        }
    }

    #[test]
    fn external_ips_expose_even_cluster_ip_services() {
        let cip = HELLO.replace(
            "type: NodePort",
            "type: ClusterIP\n  externalIPs: [198.18.7.7, 'fd00::1', bogus]",
        );
        let (state, errors) = desired_state(&[svc(&cip)], NO_SLICES, &node());
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        let fronts: Vec<_> = s
            .frontends
            .iter()
            .map(|(f, k)| (f.to_string(), *k))
            .collect();
        assert_eq!(
            fronts,
            [("198.18.7.7:60000/TCP".to_string(), FrontendKind::ExternalIp)]
        );
        assert!(s.backends.is_empty());
        assert_eq!(
            errors.len(),
            1,
            "only the unparsable address is an error: {errors:?}"
        );
        assert!(errors[0].to_string().contains("bogus"));
    }

    #[test]
    fn load_balancer_ingress_ips_are_frontends() {
        let lb = HELLO.replace("type: NodePort", "type: LoadBalancer")
            + "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1}, {hostname: lb.example}]\n";
        let (state, _) = desired_state(&[svc(&lb)], &[slice(HELLO_SLICE)], &node());
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        assert_eq!(s.frontends.len(), 3);
        let lbf = FrontendAddr {
            ip: IpAddr::from([198, 18, 100, 1]),
            port: 60000,
            protocol: Protocol::Tcp,
            scope: Scope::External,
        };
        assert_eq!(s.frontends[&lbf], FrontendKind::LoadBalancer);

        // `ipMode: Proxy`: the LB sends to node addresses; its own address is not ours to take.
        let proxied = HELLO.replace("type: NodePort", "type: LoadBalancer")
            + "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1, ipMode: VIP}, {ip: 198.18.100.2, ipMode: Proxy}]\n";
        let (state, errors) = desired_state(&[svc(&proxied)], &[slice(HELLO_SLICE)], &node());
        assert!(errors.is_empty(), "{errors:?}");
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        let lb_addrs: Vec<IpAddr> = s
            .frontends
            .iter()
            .filter(|(_, kind)| **kind == FrontendKind::LoadBalancer)
            .map(|(f, _)| f.ip)
            .collect();
        assert_eq!(lb_addrs, [IpAddr::from([198, 18, 100, 1])]);
        assert_eq!(s.frontends.len(), 3, "both NodePorts stay");
    }

    #[test]
    fn external_traffic_policy_local_keeps_only_local_endpoints() {
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let (state, _) = desired_state(&[svc(&local)], &[slice(HELLO_SLICE)], &node());
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        assert_eq!(s.backends, [be([198, 19, 1, 2], 50000, true)]);

        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        let (state, _) = desired_state(&[svc(&local)], &[slice(HELLO_SLICE)], &elsewhere);
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        assert!(s.backends.is_empty());
        assert_eq!(
            s.when_empty,
            WhenEmpty::Drop,
            "endpoints elsewhere: drop, not reject"
        );
    }

    #[test]
    fn udp_pairs_left_are_each_frontend_with_each_endpoint_gone_from_behind_it() {
        let ip = |last: u8| IpAddr::from([198, 19, 1, last]);
        let fe = |addr: [u8; 4], port: u16, protocol| FrontendAddr {
            ip: IpAddr::from(addr),
            port,
            protocol,
            scope: Scope::External,
        };
        let service = |protocol, backends: &[u8]| {
            Arc::new(DesiredService {
                frontends: [
                    (
                        fe([198, 18, 0, 10], 30600, protocol),
                        FrontendKind::NodePort,
                    ),
                    (fe([127, 0, 0, 1], 30600, protocol), FrontendKind::NodePort),
                ]
                .into(),
                backends: backends
                    .iter()
                    .map(|&b| BackendAddr {
                        ip: ip(b),
                        port: 50000,
                        local: false,
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let (udp, tcp, gone) = (
            key("dns", "", Protocol::Udp),
            key("web", "", Protocol::Tcp),
            key("old", "", Protocol::Udp),
        );
        let unchanged = service(Protocol::Udp, &[7]);
        let before = DesiredState {
            services: [
                (udp.clone(), service(Protocol::Udp, &[2, 3])),
                (tcp.clone(), service(Protocol::Tcp, &[2, 3])),
                (gone, service(Protocol::Udp, &[4])),
                (key("same", "", Protocol::Udp), unchanged.clone()),
            ]
            .into(),
            ..Default::default()
        };
        let after = DesiredState {
            services: [
                (udp, service(Protocol::Udp, &[3, 5])),
                (tcp, service(Protocol::Tcp, &[3])),
                (key("same", "", Protocol::Udp), unchanged),
            ]
            .into(),
            ..Default::default()
        };
        let pair = |f: [u8; 4], b: u8| ((IpAddr::from(f), 30600), (ip(b), 50000));
        assert_eq!(
            udp_pairs_left(&changed_between(&before, &after), &after),
            BTreeSet::from([
                pair([198, 18, 0, 10], 2),
                pair([127, 0, 0, 1], 2),
                // The whole Service went.
                pair([198, 18, 0, 10], 4),
                pair([127, 0, 0, 1], 4),
            ])
        );
        assert!(udp_pairs_left(&changed_between(&after, &after), &after).is_empty());
        // An endpoint that takes no new flows but still serves keeps its sockets; once it stops
        // serving, they are left.
        let dns = key("dns", "", Protocol::Udp);
        let with = |backends: &[u8], serving: &[u8]| {
            let mut s = (*service(Protocol::Udp, backends)).clone();
            s.still_serving = service(Protocol::Udp, serving).backends.clone();
            DesiredState {
                services: [(dns.clone(), Arc::new(s))].into(),
                ..Default::default()
            }
        };
        let (both, terminating, stopped) = (with(&[3, 5], &[]), with(&[5], &[3]), with(&[5], &[]));
        assert!(udp_pairs_left(&changed_between(&both, &terminating), &terminating).is_empty());
        assert!(udp_pairs(&terminating).contains(&pair([198, 18, 0, 10], 3)));
        assert_eq!(
            udp_pairs_left(&changed_between(&terminating, &stopped), &stopped),
            BTreeSet::from([pair([198, 18, 0, 10], 3), pair([127, 0, 0, 1], 3)])
        );
    }

    #[test]
    fn localhost_node_ports_are_for_the_nodes_own_sockets_with_every_endpoint() {
        let localhost = FrontendAddr {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 30600,
            protocol: Protocol::Tcp,
            scope: Scope::NodeSockets,
        };
        let sockets = NodeContext {
            node_sockets: true,
            localhost_node_ports: true,
            ..node()
        };
        let name = key("hello-world", "", Protocol::Tcp);
        let twin_name = ServicePortName {
            scope: Scope::NodeSockets,
            ..name.clone()
        };
        let (state, _) = desired_state(&[svc(HELLO)], &[slice(HELLO_SLICE)], &sockets);
        let cluster = state.services[&name].clone();
        assert_eq!(
            cluster.frontends.get(&localhost),
            Some(&FrontendKind::NodePort)
        );
        assert_eq!(cluster.frontends.len(), 3, "beside the two node addresses");

        // Local policy: the twin's (every endpoint), not the Service's (this node's only).
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let (state, _) = desired_state(&[svc(&local)], &[slice(HELLO_SLICE)], &sockets);
        assert!(!state.services[&name].frontends.contains_key(&localhost));
        let twin = &state.services[&twin_name];
        assert!(twin.frontends.contains_key(&localhost));
        assert_eq!(twin.backends, cluster.backends);
        assert!(state.services[&name].backends.len() < cluster.backends.len());

        // Off, or without the socket hooks, or without a nodePort: none.
        for node in [
            NodeContext {
                localhost_node_ports: false,
                ..sockets.clone()
            },
            NodeContext {
                node_sockets: false,
                ..sockets.clone()
            },
        ] {
            let (state, _) = desired_state(&[svc(HELLO)], &[slice(HELLO_SLICE)], &node);
            assert!(!state.services[&name].frontends.contains_key(&localhost));
        }
        let lb = HELLO
            .replace(
                "type: NodePort",
                "type: LoadBalancer\n  externalIPs: [198.18.7.7]",
            )
            .replace(", nodePort: 30600", "");
        let (state, _) = desired_state(&[svc(&lb)], &[slice(HELLO_SLICE)], &sockets);
        let frontends = &state.services[&name].frontends;
        assert!(
            frontends.keys().all(|f| f.scope == Scope::External),
            "{frontends:?}"
        );
    }

    #[test]
    fn local_policy_gets_a_twin_with_every_endpoint_for_the_nodes_own_sockets() {
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let sockets = NodeContext {
            node_sockets: true,
            ..node()
        };
        let (state, _) = desired_state(&[svc(&local)], &[slice(HELLO_SLICE)], &sockets);
        let external = &state.services[&key("hello-world", "", Protocol::Tcp)];
        assert_eq!(external.backends, [be([198, 19, 1, 2], 50000, true)]);
        let twin_key = ServicePortName {
            scope: Scope::NodeSockets,
            ..key("hello-world", "", Protocol::Tcp)
        };
        let twin = &state.services[&twin_key];
        let (cluster, _) = desired_state(&[svc(HELLO)], &[slice(HELLO_SLICE)], &sockets);
        let everyone = &cluster.services[&key("hello-world", "", Protocol::Tcp)].backends;
        assert_eq!(&twin.backends, everyone, "what Cluster policy would have");
        assert!(everyone.len() > 1);
        assert_eq!(twin.when_empty, WhenEmpty::Reject);
        let scoped = |s: &DesiredService| -> Vec<(IpAddr, u16, Scope)> {
            s.frontends
                .keys()
                .map(|f| (f.ip, f.port, f.scope))
                .collect()
        };
        let twin_frontends: Vec<_> = scoped(external)
            .into_iter()
            .map(|(ip, port, _)| (ip, port, Scope::NodeSockets))
            .collect();
        assert_eq!(
            scoped(twin),
            twin_frontends,
            "the same addresses, node scope"
        );
        assert_eq!(
            twin_key.to_string(),
            "default/hello-world/TCP (node sockets)"
        );
        assert_eq!(state.services.len(), 2);

        // A LoadBalancer's source ranges come along: the socket hooks leave pods' sockets to
        // the packet path for such a Service.
        let ranged = local.replace(
            "type: NodePort",
            "type: LoadBalancer\n  loadBalancerSourceRanges: [198.18.0.0/24]",
        );
        let (ranged, _) = desired_state(&[svc(&ranged)], &[slice(HELLO_SLICE)], &sockets);
        let ranges = Some(vec![(IpAddr::from([198, 18, 0, 0]), 24)]);
        assert_eq!(ranged.services[&twin_key].source_ranges, ranges);
        assert_eq!(
            ranged.services[&key("hello-world", "", Protocol::Tcp)].source_ranges,
            ranges
        );

        // Not for Cluster policy (the Service serves the node as it is), nor with the hooks off.
        assert_eq!(cluster.services.len(), 1);
        let (state, _) = desired_state(&[svc(&local)], &[slice(HELLO_SLICE)], &node());
        assert_eq!(state.services.len(), 1);
    }

    #[test]
    fn skips_what_kube_proxy_skips() {
        let other_proxy = HELLO.replace(
            "metadata: {name: hello-world, namespace: default}",
            "metadata: {name: hello-world, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
        let headless = HELLO.replace("clusterIP: 10.96.0.10", "clusterIP: None");
        let external_name = HELLO.replace(
            "type: NodePort",
            "type: ExternalName\n  externalName: example.org",
        );
        for yaml in [other_proxy, headless, external_name] {
            let (state, errors) = desired_state(&[svc(&yaml)], &[slice(HELLO_SLICE)], &node());
            assert!(state.services.is_empty(), "{yaml}");
            assert!(errors.is_empty());
        }
        // Slices labelled for another proxy or as a headless Service's: not the Service's endpoints.
        let backends = |slices: &[EndpointSlice]| {
            let (state, _) = desired_state(&[svc(HELLO)], slices, &node());
            let all: BTreeSet<_> = state
                .services
                .values()
                .flat_map(|s| s.backends.iter().map(|b| b.ip))
                .collect();
            all
        };
        let ours = backends(&[slice(HELLO_SLICE)]);
        let another = HELLO_SLICE
            .replace("hello-world-abc", "hello-world-def")
            .replace("198.19.1.2", "198.19.1.3");
        assert!(backends(&[slice(HELLO_SLICE), slice(&another)]).len() > ours.len());
        for label in [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL] {
            let theirs = another.replace("hello-world}", &format!("hello-world, {label}: x}}"));
            assert_eq!(
                backends(&[slice(HELLO_SLICE), slice(&theirs)]),
                ours,
                "{label}"
            );
        }
    }

    #[test]
    fn slices_are_merged_deduplicated_and_matched_by_port_name_and_protocol() {
        let multi = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  type: NodePort
  ports:
  - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
  - {name: dns-tcp, protocol: TCP, port: 53, nodePort: 30053}
"#;
        let s1 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, protocol: UDP, port: 5353}, {name: dns-tcp, protocol: TCP, port: 5354}]
endpoints: [{addresses: [198.19.1.5], nodeName: node-a}, {addresses: [198.19.1.6], nodeName: node-a}]
"#;
        let s2 = s1
            .replace("dns-1", "dns-2")
            .replace("198.19.1.6", "198.19.1.7");
        let wrong_ns = s1.replace("kube-system", "default");
        let v6 = s1
            .replace("dns-1", "dns-v6")
            .replace("IPv4", "IPv6")
            .replace("198.19.1.5", "fd00::5");
        let slices = [slice(s1), slice(&s2), slice(&wrong_ns), slice(&v6)];
        let (state, errors) = desired_state(&[svc(multi)], &slices, &node());
        assert!(errors.is_empty(), "{errors:?}");
        let udp = &state.services[&ServicePortName {
            namespace: "kube-system".into(),
            name: "dns".into(),
            port: "dns".into(),
            protocol: Protocol::Udp,
            family: IpFamily::V4,
            scope: Scope::External,
        }];
        let ips: Vec<_> = udp
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.port))
            .collect();
        assert_eq!(
            ips,
            [
                ("198.19.1.5".into(), 5353),
                ("198.19.1.6".into(), 5353),
                ("198.19.1.7".into(), 5353)
            ]
        );
        let tcp = &state.services[&ServicePortName {
            namespace: "kube-system".into(),
            name: "dns".into(),
            port: "dns-tcp".into(),
            protocol: Protocol::Tcp,
            family: IpFamily::V4,
            scope: Scope::External,
        }];
        assert!(tcp.backends.iter().all(|b| b.port == 5354));
        assert_eq!(tcp.backends.len(), 3);
    }

    #[test]
    fn bad_ports_and_protocols_cost_only_their_port() {
        let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  type: NodePort
  ports:
  - {name: a, protocol: SCTP, port: 80, nodePort: 30080}
  - {name: b, protocol: TCP, port: 81, nodePort: 70000}
  - {name: c, protocol: TCP, port: 82, nodePort: 30082}
"#;
        let (state, errors) = desired_state(&[svc(bad)], NO_SLICES, &node());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(errors[0], ModelError::UnsupportedProtocol { .. }));
        assert!(matches!(
            errors[1],
            ModelError::InvalidPort {
                field: "nodePort",
                value: 70000,
                ..
            }
        ));
        assert_eq!(state.services.len(), 1);
        assert!(state
            .services
            .contains_key(&key("mixed", "c", Protocol::Tcp)));
    }

    #[test]
    fn frontend_conflicts_keep_the_first_service_by_name() {
        let a = HELLO.replace("hello-world", "aaa");
        let b = HELLO.replace("hello-world", "bbb");
        let (state, errors) = desired_state(&[svc(&b), svc(&a)], NO_SLICES, &node());
        assert_eq!(state.services.len(), 1);
        assert!(state.services.contains_key(&key("aaa", "", Protocol::Tcp)));
        assert_eq!(errors.len(), 2, "one per node address: {errors:?}");
        assert!(errors[0].to_string().contains("default/bbb"));
    }

    #[test]
    fn same_port_number_on_tcp_and_udp_are_two_frontends() {
        let both = r#"
apiVersion: v1
kind: Service
metadata: {name: both}
spec:
  type: NodePort
  ports:
  - {name: t, protocol: TCP, port: 53, nodePort: 30053}
  - {name: u, protocol: UDP, port: 53, nodePort: 30053}
"#;
        let (state, errors) = desired_state(&[svc(both)], NO_SLICES, &node());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(state.frontend_count(), 4);
    }

    #[test]
    fn translator_matches_the_plain_model_and_follows_changes() {
        let hello = Arc::new(svc(HELLO));
        let other = Arc::new(svc(&HELLO
            .replace("hello-world", "other")
            .replace("30600", "30601")));
        let slice1 = Arc::new(slice(HELLO_SLICE));
        let mut t = Translator::default();
        let services = vec![hello.clone(), other.clone()];
        let slices = vec![slice1.clone()];
        let plain = desired_state(&services, &slices, &node());
        let memo = t.desired_state(&services, &slices, &node());
        assert_eq!(plain.0, memo.0);
        assert_eq!(
            t.desired_state(&services, &slices, &node()).0,
            plain.0,
            "unchanged inputs, same output"
        );

        // A new slice object (as the store makes on an update) is picked up.
        let fewer = Arc::new(slice(&HELLO_SLICE.replace(
            "- addresses: [198.19.2.2]\n  conditions: {ready: true}\n  nodeName: node-b\n",
            "",
        )));
        let (state, _) = t.desired_state(&services, std::slice::from_ref(&fewer), &node());
        let s = &state.services[&key("hello-world", "", Protocol::Tcp)];
        assert!(!s
            .backends
            .iter()
            .any(|b| b.ip == IpAddr::from([198, 19, 2, 2])));
        assert_eq!(state, desired_state(&services, &[fewer], &node()).0);

        // Node addresses change: everything is re-translated.
        let moved = NodeContext {
            node_addrs: vec![IpAddr::from([198, 18, 0, 99])],
            ..node()
        };
        let (state, _) = t.desired_state(&services, &slices, &moved);
        assert_eq!(state, desired_state(&services, &slices, &moved).0);
        // A removed Service disappears.
        let (state, _) = t.desired_state(&[other], &slices, &moved);
        assert_eq!(state.services.len(), 1);
    }

    /// A random Service of a few names, ports and addresses, so Services often claim the same
    /// frontends and health check ports.
    fn random_service(rng: &mut exposure_lab::rng::Rng, name: &str) -> Arc<Service> {
        let kind = rng.pick(&["NodePort", "LoadBalancer", "ClusterIP"]);
        // Half the time from few addresses and ports (conflicts), else from many (mostly none).
        let spread = if rng.one_in(2) { 3 } else { 50 };
        let mut ports = Vec::new();
        for p in 0..1 + rng.below(2) {
            // Now and then a port that is reported and not served.
            let protocol = match rng.below(10) {
                0 => "SCTP",
                n => ["TCP", "UDP"][n % 2],
            };
            let node_port = 30000 + rng.below(spread);
            ports.push(
                serde_json::json!({"name": format!("p{p}"), "protocol": protocol,
                "port": 80 + p, "targetPort": 8080 + p, "nodePort": node_port}),
            );
        }
        let mut spec = serde_json::json!({"type": kind, "ports": ports,
            "externalIPs": [format!("198.18.9.{}", rng.below(spread))]});
        if kind != "ClusterIP" && rng.one_in(2) {
            spec["externalTrafficPolicy"] = "Local".into();
            spec["healthCheckNodePort"] = (32000 + rng.below(spread - 1)).into();
        }
        let ingress = serde_json::json!([{"ip": format!("198.18.8.{}", rng.below(spread))}]);
        Arc::new(
            serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec,
                "status": {"loadBalancer": {"ingress": ingress}}}))
            .expect("random Service parses"),
        )
    }

    /// A random EndpointSlice of Service `name`: endpoints here and elsewhere, ready or not,
    /// now and then one kube-proxy ignores.
    fn random_slice(rng: &mut exposure_lab::rng::Rng, name: &str) -> Arc<EndpointSlice> {
        let mut labels = serde_json::json!({SERVICE_NAME_LABEL: name});
        if rng.one_in(10) {
            labels[HEADLESS_LABEL] = "".into();
        }
        let endpoints: Vec<_> = (0..rng.below(4))
            .map(|_| {
                serde_json::json!({"addresses": [format!("198.19.1.{}", rng.below(8))],
                    "conditions": {"ready": !rng.one_in(4), "serving": true},
                    "nodeName": rng.pick(&["node-a", "node-b"])})
            })
            .collect();
        let ports: Vec<_> = (0..2)
            .map(|p| serde_json::json!({"name": format!("p{p}"), "protocol": rng.pick(&["TCP", "UDP"]), "port": 8080 + p}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({"apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice", "metadata": {"name": format!("{name}-{}", rng.below(1000)),
                "namespace": "default", "labels": labels}, "addressType": "IPv4",
                "endpoints": endpoints, "ports": ports}))
            .expect("random slice parses"),
        )
    }

    #[test]
    fn translator_updates_give_the_plain_models_state_and_name_every_change() {
        let mut rng = exposure_lab::rng::Rng::from_env("EXPOSURE_TEST_SEED", 7);
        let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
        let mut services: Vec<Arc<Service>> = Vec::new();
        let mut slices: Vec<Arc<EndpointSlice>> = Vec::new();
        let mut t = Translator::default();
        let mut node = node();
        let (mut in_place, mut rebuilt, mut alone) = (0, 0, 0);
        for step in 0..3000 {
            match rng.below(20) {
                // Endpoint changes are the common case.
                0..=9 if !slices.is_empty() => {
                    let i = rng.below(slices.len());
                    let owner =
                        slices[i].metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL].clone();
                    slices[i] = random_slice(&mut rng, &owner);
                }
                10..=11 => {
                    let name = rng.pick(&names);
                    slices.push(random_slice(&mut rng, &name));
                }
                12 if !slices.is_empty() => {
                    slices.swap_remove(rng.below(slices.len()));
                }
                13..=14 => {
                    let name = rng.pick(&names);
                    let new = random_service(&mut rng, &name);
                    match services
                        .iter()
                        .position(|s| s.metadata.name.as_deref() == Some(&name))
                    {
                        Some(i) => services[i] = new,
                        None => services.push(new),
                    }
                }
                15 if !services.is_empty() => {
                    services.swap_remove(rng.below(services.len()));
                }
                16 if rng.one_in(5) => {
                    node.node_addrs = vec![IpAddr::from([198, 18, 0, 10 + rng.below(2) as u8])];
                }
                17 if rng.one_in(10) && !services.is_empty() => {
                    // Two objects under one name, for a while.
                    let twin = Arc::new((*services[0]).clone());
                    services.push(twin);
                }
                18 => {
                    // Nothing changed (a store's order may).
                    services.reverse();
                }
                _ => {}
            }
            if step % 50 == 49 {
                let name = |s: &Arc<Service>| s.metadata.name.clone();
                let mut seen = BTreeSet::new();
                services.retain(|s| seen.insert(name(s)));
            }
            let before = t.state().clone();
            let changed = t.update(&services, &slices, &node);
            let (plain, errors) = desired_state(&services, &slices, &node);
            assert_eq!(
                t.state(),
                &plain,
                "step {step}: the state is the plain model's"
            );
            assert_eq!(
                t.errors().cloned().collect::<Vec<_>>(),
                errors,
                "step {step}"
            );
            let keys: BTreeSet<&ServicePortName> = before
                .services
                .keys()
                .chain(plain.services.keys())
                .collect();
            for key in keys {
                let (was, now) = (before.services.get(key), plain.services.get(key));
                match changed.get(key) {
                    Some(recorded) => assert_eq!(recorded.as_ref(), was, "step {step}: {key}"),
                    None => assert!(
                        match (was, t.state().services.get(key)) {
                            (Some(a), Some(b)) => a == b,
                            (a, b) => a.is_none() && b.is_none(),
                        },
                        "step {step}: {key} changed unnamed ({was:?} -> {now:?})"
                    ),
                }
            }
            match (t.retranslated, t.reassembled, t.swapped_alone) {
                (_, true, _) => rebuilt += 1,
                (_, false, 1..) => alone += 1,
                (1.., false, 0) => in_place += 1,
                _ => {}
            }
        }
        // Every way of updating was exercised.
        assert!(
            in_place > 500 && rebuilt > 100 && alone > 100,
            "in place {in_place}, rebuilt {rebuilt}, swapped alone {alone}"
        );
    }

    #[test]
    fn terminating_endpoints_take_new_flows_only_when_none_is_ready() {
        let with = |conds: &[(&str, &str)]| {
            let on_a: Vec<(&str, &str, &str)> =
                conds.iter().map(|(ip, c)| (*ip, *c, "node-a")).collect();
            hello_slice_of(&on_a)
        };
        let ips = |state: &DesiredState| -> Vec<String> {
            state.services[&key("hello-world", "", Protocol::Tcp)]
                .backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect()
        };
        let term = "{ready: false, serving: true, terminating: true}";
        let gone = "{ready: false, serving: false, terminating: true}";
        let ready = "{ready: true}";
        // A ready endpoint exists: terminating ones get no new flows.
        let (s, _) = desired_state(
            &[svc(HELLO)],
            &[with(&[("198.19.1.2", ready), ("198.19.1.3", term)])],
            &node(),
        );
        assert_eq!(ips(&s), ["198.19.1.2"]);
        // None ready: serving terminating endpoints take them; non-serving ones never do.
        let (s, _) = desired_state(
            &[svc(HELLO)],
            &[with(&[("198.19.1.3", term), ("198.19.1.4", gone)])],
            &node(),
        );
        assert_eq!(ips(&s), ["198.19.1.3"]);
        // Local policy applies the rule to this node's endpoints.
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let elsewhere = slice(&HELLO_SLICE.replace("nodeName: node-a", "nodeName: node-z"));
        let mine = with(&[("198.19.1.3", term)]);
        let (s, _) = desired_state(&[svc(&local)], &[elsewhere, mine], &node());
        assert_eq!(
            ips(&s),
            ["198.19.1.3"],
            "the local terminating endpoint, not remote ready ones"
        );
    }

    /// The endpoints that still serve but take no new flow are listed, so that UDP flows to them
    /// go on (kube-proxy deletes UDP conntrack entries only for endpoints that stop serving).
    #[test]
    fn endpoints_that_still_serve_are_kept_beside_the_backends() {
        let ips =
            |bs: &[BackendAddr]| -> Vec<String> { bs.iter().map(|b| b.ip.to_string()).collect() };
        let term = "{ready: false, serving: true, terminating: true}";
        let gone = "{ready: false, serving: false, terminating: true}";
        let ready = "{ready: true}";
        let eps = hello_slice_of(&[
            ("198.19.1.2", ready, "node-a"),
            ("198.19.1.3", term, "node-a"),
            ("198.19.1.4", gone, "node-a"),
            ("198.19.1.5", ready, "node-z"),
        ]);
        let (s, _) = desired_state(&[svc(HELLO)], std::slice::from_ref(&eps), &node());
        let d = &s.services[&key("hello-world", "", Protocol::Tcp)];
        assert_eq!(ips(&d.backends), ["198.19.1.2", "198.19.1.5"]);
        assert_eq!(
            ips(&d.still_serving),
            ["198.19.1.3"],
            "serving, not ready; not the one that stopped"
        );
        // Under a Local policy, the other node's ready endpoint still serves too.
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let (s, _) = desired_state(&[svc(&local)], &[eps], &node());
        let d = &s.services[&key("hello-world", "", Protocol::Tcp)];
        assert_eq!(ips(&d.backends), ["198.19.1.2"]);
        assert_eq!(ips(&d.still_serving), ["198.19.1.3", "198.19.1.5"]);
    }

    #[test]
    fn topology_hints_narrow_cluster_endpoints_as_kube_proxy_does() {
        // Endpoints as (ip, zone hints, node hints, ready).
        let with = |eps: &[(&str, &[&str], &[&str], bool)]| {
            let mut text = String::new();
            for (ip, zones, nodes, ready) in eps {
                text += &format!("- addresses: [{ip}]\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n  nodeName: node-z\n", !ready);
                if !zones.is_empty() || !nodes.is_empty() {
                    let names = |v: &[&str]| {
                        v.iter()
                            .map(|n| format!("{{name: {n}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    text += &format!(
                        "  hints: {{forZones: [{}], forNodes: [{}]}}\n",
                        names(zones),
                        names(nodes)
                    );
                }
            }
            hello_slice_with(&text)
        };
        let in_zone = |zone: Option<&str>| NodeContext {
            zone: zone.map(str::to_owned),
            ..node()
        };
        let ips = |svc_yaml: &str, eps: &EndpointSlice, node: &NodeContext| -> Vec<String> {
            let (state, errors) = desired_state(&[svc(svc_yaml)], std::slice::from_ref(eps), node);
            assert!(errors.is_empty(), "{errors:?}");
            state.services[&key("hello-world", "", Protocol::Tcp)]
                .backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect()
        };
        let hinted = with(&[
            ("198.19.1.2", &["zone-1"], &[], true),
            ("198.19.1.3", &["zone-2"], &[], true),
            ("198.19.1.4", &["zone-1", "zone-2"], &[], true),
        ]);
        let (a, b) = (in_zone(Some("zone-1")), in_zone(Some("zone-2")));
        assert_eq!(ips(HELLO, &hinted, &a), ["198.19.1.2", "198.19.1.4"]);
        assert_eq!(ips(HELLO, &hinted, &b), ["198.19.1.3", "198.19.1.4"]);
        // Safeguards, all falling back to every endpoint: a node without a zone, a zone no hint
        // names, a ready endpoint without hints (the controller is switching modes).
        let everyone = ["198.19.1.2", "198.19.1.3", "198.19.1.4"];
        assert_eq!(ips(HELLO, &hinted, &in_zone(None)), everyone);
        assert_eq!(ips(HELLO, &hinted, &in_zone(Some("zone-9"))), everyone);
        let partly = with(&[
            ("198.19.1.2", &["zone-1"], &[], true),
            ("198.19.1.3", &[], &[], true),
        ]);
        assert_eq!(ips(HELLO, &partly, &a), ["198.19.1.2", "198.19.1.3"]);
        // An unready endpoint's missing hints don't count; hints don't apply to the terminating
        // fallback.
        let unready = with(&[
            ("198.19.1.2", &["zone-1"], &[], true),
            ("198.19.1.3", &["zone-2"], &[], true),
            ("198.19.1.5", &[], &[], false),
        ]);
        assert_eq!(ips(HELLO, &unready, &a), ["198.19.1.2"]);
        let draining = with(&[("198.19.1.5", &["zone-2"], &[], false)]);
        assert_eq!(ips(HELLO, &draining, &a), ["198.19.1.5"]);
        // Node hints (trafficDistribution: PreferSameNode) come before zone hints.
        let same_node = with(&[
            ("198.19.1.2", &["zone-1"], &["node-a"], true),
            ("198.19.1.3", &["zone-1"], &["node-b"], true),
            ("198.19.1.4", &["zone-2"], &["node-c"], true),
        ]);
        assert_eq!(ips(HELLO, &same_node, &a), ["198.19.1.2"]);
        let other_node = NodeContext {
            node_name: "node-x".into(),
            ..a.clone()
        };
        assert_eq!(
            ips(HELLO, &same_node, &other_node),
            ["198.19.1.2", "198.19.1.3"],
            "no endpoint for this node: its zone's"
        );
        // externalTrafficPolicy: Local is about this node's endpoints; hints play no part.
        let local = HELLO.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let here = |z: &str| {
            let text = HELLO_SLICE.replace(
                "nodeName: node-a",
                &format!("nodeName: node-a\n  hints: {{forZones: [{{name: {z}}}]}}"),
            );
            slice(&text)
        };
        assert_eq!(ips(&local, &here("zone-2"), &a), ["198.19.1.2"]);
    }

    #[test]
    fn health_check_node_port_reports_local_endpoints() {
        let lb = HELLO.replace(
            "type: NodePort",
            "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
        );
        let (state, errors) = desired_state(&[svc(&lb)], &[slice(HELLO_SLICE)], &node());
        assert!(errors.is_empty(), "{errors:?}");
        let hc = &state.health_checks[&32000];
        assert_eq!(
            (hc.namespace.as_str(), hc.name.as_str(), hc.local_endpoints),
            ("default", "hello-world", 1)
        );
        let elsewhere = NodeContext {
            node_name: "node-c".into(),
            ..node()
        };
        let (state, _) = desired_state(&[svc(&lb)], &[slice(HELLO_SLICE)], &elsewhere);
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);
        // Cluster policy has no health check node port to serve.
        let cluster = HELLO.replace(
            "type: NodePort",
            "type: LoadBalancer\n  healthCheckNodePort: 32000",
        );
        assert!(
            desired_state(&[svc(&cluster)], &[slice(HELLO_SLICE)], &node())
                .0
                .health_checks
                .is_empty()
        );
        // Two Services on one port: the first keeps it.
        let other = lb.replace("hello-world", "zzz");
        let (state, errors) = desired_state(&[svc(&other), svc(&lb)], NO_SLICES, &node());
        assert_eq!(state.health_checks[&32000].name, "hello-world");
        assert!(
            errors
                .iter()
                .any(|e| matches!(e, ModelError::HealthCheckConflict { port: 32000, .. })),
            "{errors:?}"
        );
    }

    #[test]
    fn client_ip_session_affinity_and_its_timeout() {
        let timeout = |extra: &str| {
            let yaml = HELLO.replace("type: NodePort", &format!("type: NodePort\n{extra}"));
            let (state, errors) = desired_state(&[svc(&yaml)], NO_SLICES, &node());
            (
                state.services[&key("hello-world", "", Protocol::Tcp)].affinity_timeout_s,
                errors.len(),
            )
        };
        assert_eq!(timeout(""), (0, 0));
        assert_eq!(timeout("  sessionAffinity: None"), (0, 0));
        assert_eq!(timeout("  sessionAffinity: ClientIP"), (10_800, 0));
        assert_eq!(timeout("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"), (60, 0));
        assert_eq!(
            timeout("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}"),
            (10_800, 1),
            "invalid timeout: reported, default used"
        );
    }

    #[test]
    fn load_balancer_source_ranges_parse_to_networks() {
        let ranges = |list: &str, svc_type: &str| {
            let yaml = HELLO.replace(
                "type: NodePort",
                &format!("type: {svc_type}\n  loadBalancerSourceRanges: {list}"),
            );
            let (state, errors) = desired_state(&[svc(&yaml)], NO_SLICES, &node());
            (
                state.services[&key("hello-world", "", Protocol::Tcp)]
                    .source_ranges
                    .clone(),
                errors.len(),
            )
        };
        let net = |a: [u8; 4], l: u8| (IpAddr::from(a), l);
        assert_eq!(
            ranges(
                "[198.18.0.7/24, 10.0.0.1/32, 'fd00::/8', nonsense]",
                "LoadBalancer"
            ),
            (
                Some(vec![net([10, 0, 0, 1], 32), net([198, 18, 0, 0], 24)]),
                1
            ),
            "host bits cleared, IPv6 left to IPv6, the invalid one reported"
        );
        assert_eq!(
            ranges("['fd00::/8']", "LoadBalancer"),
            (Some(vec![]), 0),
            "restricted, but no IPv4 source allowed"
        );
        assert_eq!(ranges("[]", "LoadBalancer"), (None, 0));
        assert_eq!(
            ranges("[198.18.0.0/24]", "NodePort"),
            (None, 0),
            "only LoadBalancer Services"
        );
    }

    #[test]
    fn local_policies_with_endpoints_only_elsewhere_are_counted_as_kube_proxy_does() {
        let slices = [slice(HELLO_SLICE)];
        let count = |svc_type: &str, policies: &str, node_name: &str, slices: &[EndpointSlice]| {
            let yaml = HELLO.replace("type: NodePort", &format!("type: {svc_type}\n  {policies}"));
            let node = NodeContext {
                node_name: node_name.into(),
                node_sockets: true,
                cluster_ips: true,
                ..node()
            };
            let (state, errors) = desired_state(&[svc(&yaml)], slices, &node);
            assert!(errors.is_empty(), "{errors:?}");
            let counts = state.no_local_endpoints;
            (counts.internal, counts.external)
        };
        let both = "externalTrafficPolicy: Local\n  internalTrafficPolicy: Local";
        assert_eq!(
            count("NodePort", both, "node-z", &slices),
            (1, 1),
            "all elsewhere"
        );
        assert_eq!(
            count("NodePort", both, "node-a", &slices),
            (0, 0),
            "one here"
        );
        assert_eq!(
            count("NodePort", both, "node-z", NO_SLICES),
            (0, 0),
            "none anywhere"
        );
        let etp = "externalTrafficPolicy: Local";
        assert_eq!(count("NodePort", etp, "node-z", &slices), (0, 1));
        let itp = "internalTrafficPolicy: Local";
        assert_eq!(count("ClusterIP", itp, "node-z", &slices), (1, 0));
        assert_eq!(
            count("NodePort", "", "node-z", &slices),
            (0, 0),
            "Cluster policies"
        );
    }

    #[test]
    fn nodeport_addresses_parse_as_kube_proxys_flag() {
        let parse = |text: &str| text.parse::<NodePortAddresses>();
        assert_eq!(parse("primary"), Ok(NodePortAddresses::Primary));
        assert_eq!(
            parse("198.18.0.7/24, 2001:db8::1/64,198.18.0.0/24"),
            Ok(NodePortAddresses::In(vec![
                (IpAddr::from([198, 18, 0, 0]), 24),
                ("2001:db8::".parse().unwrap(), 64),
            ])),
            "host bits cleared, duplicates dropped"
        );
        for bad in [
            "",
            "198.18.0.1",
            "198.18.0.0/33",
            "2001:db8::/129",
            "eth0/8",
            "primary,198.18.0.0/24",
            "198.18.0.0/24,",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("is not a network"), "{bad}: {err}");
        }
        for text in ["primary", "198.18.0.0/24,2001:db8::/64"] {
            assert_eq!(parse(text).unwrap().to_string(), text, "shown as given");
        }
    }

    #[test]
    fn nodeport_addresses_select_the_nodes_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [
            ip("198.18.0.1"),
            ip("198.18.0.5"),
            ip("198.19.7.1"),
            ip("2001:db8::1"),
        ];
        let primary = [ip("198.18.0.1"), ip("2001:db8::1")];
        let select = |text: &str| {
            text.parse::<NodePortAddresses>()
                .unwrap()
                .select(&addrs, &primary)
        };
        assert_eq!(
            NodePortAddresses::All.select(&addrs, &primary),
            addrs.to_vec()
        );
        assert_eq!(select("primary"), primary.to_vec());
        assert_eq!(
            select("198.18.0.0/24"),
            vec![ip("198.18.0.1"), ip("198.18.0.5")]
        );
        assert_eq!(
            select("198.19.0.0/16,2001:db8::/32"),
            vec![ip("198.19.7.1"), ip("2001:db8::1")]
        );
        assert_eq!(select("198.18.0.5/32"), vec![ip("198.18.0.5")]);
        assert!(select("203.0.113.0/24").is_empty());
        assert_eq!(
            select("::/0"),
            vec![ip("2001:db8::1")],
            "never across families"
        );

        // Localhost NodePorts go with 127.0.0.1 (kube-proxy's ContainsIPv4Loopback).
        assert!(NodePortAddresses::All.include_ipv4_loopback());
        assert!(!NodePortAddresses::Primary.include_ipv4_loopback());
        let loopback = |text: &str| {
            text.parse::<NodePortAddresses>()
                .unwrap()
                .include_ipv4_loopback()
        };
        assert!(loopback("198.18.0.0/15,127.0.0.0/8"));
        assert!(loopback("0.0.0.0/0"));
        assert!(!loopback("198.18.0.0/15"));
        assert!(!loopback("::/0"));
    }

    #[test]
    fn primary_addresses_come_from_the_node_object_then_the_interfaces() {
        let node: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(
            "metadata: {name: node-a}\nstatus:\n  addresses:\n  - {type: Hostname, address: node-a}\n  - {type: ExternalIP, address: 203.0.113.9}\n  - {type: InternalIP, address: 198.18.0.9}\n  - {type: InternalIP, address: not-an-ip}\n  - {type: InternalIP, address: 198.18.0.10}\n  - {type: ExternalIP, address: '2001:db8::9'}\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let listed = node_object_addrs(&node);
        assert_eq!(
            listed,
            vec![
                ip("198.18.0.9"),
                ip("198.18.0.10"),
                ip("203.0.113.9"),
                ip("2001:db8::9")
            ],
            "InternalIPs first, in their order; hostnames and bad addresses left out"
        );
        let ifaces = [ip("198.18.0.1"), ip("2001:db8::1"), ip("2001:db8::2")];
        assert_eq!(
            primary_addrs(&listed, &ifaces),
            vec![ip("198.18.0.9"), ip("2001:db8::9")],
            "an ExternalIP of a family without InternalIP"
        );
        assert_eq!(
            primary_addrs(&listed[..2], &ifaces),
            vec![ip("198.18.0.9"), ip("2001:db8::1")],
            "a family the Node lacks from the interfaces"
        );
        assert_eq!(
            primary_addrs(&[], &ifaces),
            vec![ip("198.18.0.1"), ip("2001:db8::1")]
        );
        assert!(primary_addrs(&[], &[]).is_empty());
    }

    const DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.20, "fd00::20"]
  externalIPs: [198.18.200.1, "2001:2:0:200::1"]
  loadBalancerSourceRanges: ["2001:2::/64"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports:
  - {protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: bad, protocol: SCTP, port: 81}
status:
  loadBalancer:
    ingress: [{ip: 198.18.100.9}, {ip: "2001:2:0:100::9"}]
"#;

    fn dual_slice(family: &str, addrs: &[&str]) -> EndpointSlice {
        let eps: String = addrs
            .iter()
            .map(|a| format!("- addresses: [\"{a}\"]\n  nodeName: node-a\n"))
            .collect();
        slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-{family}\n  namespace: default\n  labels: {{kubernetes.io/service-name: dual}}\naddressType: {family}\nports: [{{name: \"\", protocol: TCP, port: 8080}}]\nendpoints:\n{eps}"
        ))
    }

    fn dual_node() -> NodeContext {
        NodeContext {
            node_sockets: false,
            localhost_node_ports: false,
            cluster_ips: false,
            external_cluster_ips: false,
            node_name: "node-a".into(),
            node_addrs: vec![
                "198.18.0.10".parse().unwrap(),
                "2001:2::10".parse().unwrap(),
            ],
            zone: None,
        }
    }

    #[test]
    fn dual_stack_service_gets_one_service_port_per_family_with_its_own_addresses() {
        let slices = [
            dual_slice("IPv4", &["198.19.1.2"]),
            dual_slice("IPv6", &["2001:2:0:1::2", "2001:2:0:1::3"]),
        ];
        let (state, errors) = desired_state(&[svc(DUAL)], &slices, &dual_node());
        assert_eq!(
            errors.len(),
            1,
            "the SCTP port, once (not per family): {errors:?}"
        );
        let v4 = &state.services[&key("dual", "", Protocol::Tcp)];
        let v6 = &state.services[&ServicePortName {
            family: IpFamily::V6,
            ..key("dual", "", Protocol::Tcp)
        }];
        let ips = |s: &DesiredService| -> Vec<String> {
            s.frontends.keys().map(|f| f.to_string()).collect()
        };
        assert_eq!(
            ips(v4),
            [
                "198.18.0.10:30080/TCP",
                "198.18.100.9:80/TCP",
                "198.18.200.1:80/TCP"
            ]
        );
        assert_eq!(
            ips(v6),
            [
                "[2001:2::10]:30080/TCP",
                "[2001:2:0:100::9]:80/TCP",
                "[2001:2:0:200::1]:80/TCP"
            ]
        );
        // Localhost NodePorts are IPv4's only (as kube-proxy's and Cilium's).
        let sockets = NodeContext {
            node_sockets: true,
            localhost_node_ports: true,
            ..dual_node()
        };
        let (with_localhost, _) = desired_state(&[svc(DUAL)], &slices, &sockets);
        let localhost = |family| -> Vec<String> {
            with_localhost
                .services
                .iter()
                .filter(|(k, _)| k.family == family)
                .flat_map(|(_, s)| s.frontends.keys())
                .filter(|f| f.ip.is_loopback())
                .map(|f| f.to_string())
                .collect()
        };
        assert_eq!(
            localhost(IpFamily::V4),
            ["127.0.0.1:30080/TCP (node sockets)"]
        );
        assert!(localhost(IpFamily::V6).is_empty());
        assert_eq!(v4.backends.len(), 1);
        assert!(v6.backends.iter().all(|b| b.ip.is_ipv6() && b.local));
        assert_eq!(v6.backends.len(), 2);
        // An IPv6-only range list admits no IPv4 source (kube-proxy: the list restricts the family).
        assert_eq!(v4.source_ranges, Some(vec![]));
        assert_eq!(
            v6.source_ranges,
            Some(vec![("2001:2::".parse().unwrap(), 64)])
        );
        // The health check counts the primary (first) family's local endpoints.
        assert_eq!(state.health_checks[&32000].local_endpoints, 1);
        assert_eq!(
            v6.frontends.keys().next().map(|_| ServicePortName {
                family: IpFamily::V6,
                ..key("dual", "", Protocol::Tcp)
            }
            .to_string()),
            Some("default/dual/TCP/IPv6".to_string())
        );
    }

    #[test]
    fn families_come_from_ip_families_then_cluster_ips_then_default_to_ipv4() {
        let families = |extra: &str| {
            let s = svc(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: f}}\nspec:\n  type: NodePort\n{extra}  ports: [{{port: 80, nodePort: 30080}}]\n"
            ));
            service_families(s.spec.as_ref().unwrap())
        };
        assert_eq!(families(""), [IpFamily::V4]);
        assert_eq!(families("  clusterIP: fd00::1\n"), [IpFamily::V6]);
        assert_eq!(
            families("  clusterIPs: [\"fd00::1\", 10.0.0.1]\n"),
            [IpFamily::V6, IpFamily::V4]
        );
        assert_eq!(
            families("  ipFamilies: [IPv6]\n  clusterIP: 10.0.0.1\n"),
            [IpFamily::V6],
            "ipFamilies wins"
        );
        // An IPv6-only Service gets no IPv4 NodePort, and IPv4 endpoints are not its backends.
        let (state, _) = desired_state(
            &[svc(&DUAL.replace(
                "ipFamilies: [IPv4, IPv6]",
                "ipFamilies: [IPv6]",
            ))],
            &[dual_slice("IPv4", &["198.19.1.2"])],
            &dual_node(),
        );
        assert_eq!(state.services.len(), 1);
        let (name, only) = state.services.iter().next().unwrap();
        assert_eq!(name.family, IpFamily::V6);
        assert!(only.backends.is_empty());
        assert!(only.frontends.keys().all(|f| f.ip.is_ipv6()));
    }
}
