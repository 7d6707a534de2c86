//! `exposure`: the Kubernetes Service datapath agent and its tools.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use exposure::{agent, datapath, status};

#[derive(Parser)]
#[command(
    name = "exposure",
    version,
    about = "Kubernetes NodePort/LoadBalancer datapath in XDP"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusOutput {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum BpfLogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native (driver) XDP when the driver has it, else generic.
    Auto,
    Native,
    Generic,
}

#[derive(Subcommand)]
// Parsed once at start: the agent's many flags needn't be boxed.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the agent: attach the datapath to the interfaces and keep the maps in sync.
    Agent {
        /// Interface(s) to serve NodePorts/LoadBalancer IPs on (repeatable, or comma-separated):
        /// a name, a name prefix (`eth+`), or `auto` (Cilium's device detection: up Ethernet
        /// devices with a global address, no bridges, tunnels or ports of one; veths only with a
        /// default route). Prefixes and `auto` are looked at again every 200 ms.
        #[arg(long = "iface", required = true, value_delimiter = ',')]
        ifaces: Vec<exposure::netdev::IfaceSpec>,
        /// Directory of Service and EndpointSlice manifests (YAML/JSON), watched for changes; a
        /// Node named like this node gives its zone. Without it the agent watches the Kubernetes API.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the API source (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
        #[arg(long, conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// This node's name, which decides which endpoints are local (default: hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// Where maps and program links are pinned (bpffs).
        #[arg(long, default_value = "/sys/fs/bpf/exposure")]
        pin_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: SocketAddr,
        /// Prometheus metrics (`/metrics`), kube-proxy's default address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_bind_address: SocketAddr,
        /// Frontends (address:port/protocol) the maps can hold.
        #[arg(long, default_value_t = exposure_common::MAX_FRONTENDS, value_parser = clap::value_parser!(u32).range(1..))]
        max_frontends: u32,
        /// Service ports the maps can hold.
        #[arg(long, default_value_t = exposure_common::MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..))]
        max_services: u32,
        /// Distinct backends (endpoint address:port) the maps can hold.
        #[arg(long, default_value_t = exposure_common::MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(1..))]
        max_backends: u32,
        /// Backends one Service port may have.
        #[arg(long, default_value_t = exposure_common::MAX_BACKENDS_PER_SERVICE, value_parser = clap::value_parser!(u32).range(1..=65535))]
        max_backends_per_service: u32,
        /// Log lines from the XDP/tc programs themselves (refusals, drops, missing neighbours;
        /// new flows at debug), into the agent's log. Off costs nothing measurable.
        #[arg(long, value_enum, default_value = "off")]
        bpf_log_level: BpfLogLevel,
        /// Entries of the array holding every Service's Maglev table (4 bytes each). A Service with N
        /// backends takes the smallest prime >= 100 x N of 251 .. --maglev-max-table-size.
        #[arg(long, default_value_t = exposure_common::MAX_MAGLEV_ENTRIES, value_parser = clap::value_parser!(u32).range(65521..))]
        max_maglev_entries: u32,
        /// Largest Maglev table for one Service (251, 509, 1021, 2039, 4093, 8191, 16381, 32749 or 65521).
        #[arg(long, default_value_t = 65521, value_parser = maglev_table_size)]
        maglev_max_table_size: u32,
        /// Tracked flows per address family (connection tracking entries; least recently used are
        /// evicted).
        #[arg(long, default_value_t = exposure_common::MAX_FLOWS, value_parser = clap::value_parser!(u32).range(1024..))]
        max_flows: u32,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: Mode,
        /// Send local pods' traffic straight into the pod's namespace (from tc ingress, with
        /// `bpf_redirect_peer`), skipping the node's second pass through its stack, when the route
        /// to the pod leaves through a veth whose name starts with PREFIX (repeatable; e.g. `lxc`,
        /// `cali`: the CNI's host-side veths). The packets skip the node's netfilter (and
        /// NetworkPolicy enforced there). Off by default.
        #[arg(long = "redirect-to-pods", value_name = "PREFIX", value_parser = clap::builder::NonEmptyStringValueParser::new(), conflicts_with = "xdp_pod_iface_prefixes")]
        pod_iface_prefixes: Vec<String>,
        /// As --redirect-to-pods, but from XDP to the pod's veth: faster still, but the pod side of
        /// each such veth must run NAPI (GRO on, or an XDP program), or the kernel drops the
        /// redirected frames.
        #[arg(long = "xdp-redirect-to-pods", value_name = "PREFIX", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        xdp_pod_iface_prefixes: Vec<String>,
        /// The source ports flows to remote backends are SNATed to, `MIN-MAX` (at least 1024):
        /// as many concurrent flows from this node to one backend. Reserved from the node's
        /// ephemeral ports (--reserve-local-ports). Changing it cuts remote flows in progress.
        #[arg(long, default_value = "61000-65535", value_parser = snat_port_range)]
        snat_port_range: datapath::PortRange,
        /// The ports NodePorts are allocated from (kube-apiserver's --service-node-port-range), as
        /// `MIN-MAX` (or a list: `30000-32767,40000`). Reserved with the SNAT ports from the
        /// node's ephemeral ports, see --reserve-local-ports.
        #[arg(long, default_value = "30000-32767", value_parser = port_set)]
        node_port_range: exposure::local_ports::PortSet,
        /// Add the NodePort and SNAT port ranges to net.ipv4.ip_local_reserved_ports, so the node's
        /// own connections never take a port whose replies the datapath would translate (skipped,
        /// with a warning, if it would leave the node fewer than 1,024 ephemeral ports).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        reserve_local_ports: bool,
        /// Send the connections and datagrams of the node itself and of its pods to its
        /// NodePort, LoadBalancer and externalIP frontends to backends too (they never cross
        /// XDP): cgroup connect, sendmsg, recvmsg and getpeername hooks, as Cilium's socket LB.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        translate_node_sockets: bool,
        /// Whose sockets --translate-node-sockets translates: `all` (the node's and every pod's),
        /// `host` (the node's own network namespace only, as Cilium's bpf-lb-sock-hostns-only:
        /// for service meshes whose sidecars must see the frontend), or network namespace files
        /// by path, comma-separated, besides the node's (e.g. /run/netns/NAME; for labs where
        /// namespaces on one kernel play several machines).
        #[arg(long, default_value = "all", value_name = "all|host|PATH,...")]
        socket_namespaces: datapath::SocketNamespaces,
        /// With --translate-node-sockets, NodePorts are also served on 127.0.0.1 to the node's
        /// own sockets (`curl 127.0.0.1:<nodePort>` on the node), as kube-proxy's localhost
        /// NodePorts and Cilium's socket LB do (IPv4 only, as in both).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        localhost_node_ports: bool,
        /// With --translate-node-sockets, the Services' ClusterIPs are served to the sockets of
        /// the node and its pods (whose --socket-namespaces translates), as kube-proxy and
        /// Cilium's socket LB serve them; false leaves ClusterIPs to something else (kube-proxy,
        /// the CNI).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        cluster_ips: bool,
        /// ClusterIPs are also served to packets arriving on --iface, as Cilium's
        /// bpf-lb-external-clusterip does: for networks that route the Service CIDR to the nodes
        /// (a BGP speaker advertising it, say).
        #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
        external_cluster_ips: bool,
        /// Which of the node's addresses NodePorts are served on, as kube-proxy's and Cilium's
        /// flag: comma-separated networks (e.g. `198.18.0.0/24,2001:db8::/64`), or `primary`
        /// (each family's first InternalIP of this node's Node, else ExternalIP, else the
        /// --iface's own address). Default: every address of the --iface interfaces and the Node.
        /// Localhost NodePorts need 127.0.0.1 among them; healthCheckNodePorts listen on them
        /// alone. LoadBalancer IPs and externalIPs are not affected.
        #[arg(long = "nodeport-addresses", value_name = "CIDR,...|primary")]
        node_port_addresses: Option<exposure::model::NodePortAddresses>,
        /// How long an established TCP flow lives after its last packet (kube-proxy's
        /// --conntrack-tcp-timeout-established, Cilium's bpf-ct-timeout-regular-tcp).
        #[arg(long, default_value = "6h", value_parser = flow_timeout)]
        flow_timeout_tcp: std::time::Duration,
        /// How long a TCP flow whose handshake has not completed lives (Cilium's
        /// bpf-ct-timeout-regular-tcp-syn): it holds its SNAT port that long.
        #[arg(long, default_value = "60s", value_parser = flow_timeout)]
        flow_timeout_tcp_syn: std::time::Duration,
        /// How long a TCP flow lives after RST or FIN both ways (Cilium's
        /// bpf-ct-timeout-regular-tcp-fin).
        #[arg(long, default_value = "10s", value_parser = flow_timeout)]
        flow_timeout_tcp_closing: std::time::Duration,
        /// How long a UDP flow of one exchange (a query and its answers) lives after its last
        /// packet (kube-proxy's --conntrack-udp-timeout): it holds its SNAT port that long.
        #[arg(long, default_value = "30s", value_parser = flow_timeout)]
        flow_timeout_udp: std::time::Duration,
        /// How long a UDP flow whose client went on after an answer lives after its last packet
        /// (kube-proxy's --conntrack-udp-timeout-stream).
        #[arg(long, default_value = "120s", value_parser = flow_timeout)]
        flow_timeout_udp_stream: std::time::Duration,
        /// How often the agent reads the Service maps back and compares them with what it wrote
        /// (`30s`, `5m`, `1h`; `0` never): entries changed by anything else (a person with bpftool,
        /// a second agent on the same --pin-dir) are logged, counted in
        /// exposure_map_repairs_total and rewritten, as kube-proxy's periodic full sync restores
        /// rules removed behind its back.
        #[arg(long, default_value = "60s", value_parser = period)]
        maps_check_period: std::time::Duration,
        /// The cgroup2 directory the socket hooks are attached to (default: the root of the
        /// node's cgroup2 hierarchy, mounted at /run/exposure/cgroupv2 if it is nowhere).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
    /// Print services, frontends and backends from the pinned maps.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/exposure")]
        pin_dir: PathBuf,
        /// `json`: one object with every frontend, its backends, and the counters, for scripts.
        #[arg(short, long, value_enum, default_value = "table")]
        output: StatusOutput,
    },
    /// Detach the datapath and remove everything pinned under --pin-dir.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/exposure")]
        pin_dir: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn hostname() -> anyhow::Result<String> {
    Ok(nix::unistd::gethostname()
        .context("reading hostname")?
        .to_string_lossy()
        .into_owned())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Agent {
            ifaces,
            manifests,
            kubeconfig,
            node_name,
            pin_dir,
            healthz_bind_address,
            metrics_bind_address,
            xdp_mode,
            max_frontends,
            max_services,
            max_backends,
            max_backends_per_service,
            max_flows,
            bpf_log_level,
            max_maglev_entries,
            maglev_max_table_size,
            pod_iface_prefixes,
            xdp_pod_iface_prefixes,
            snat_port_range,
            node_port_range,
            reserve_local_ports,
            translate_node_sockets,
            socket_namespaces,
            localhost_node_ports,
            cluster_ips,
            external_cluster_ips,
            node_port_addresses,
            maps_check_period,
            flow_timeout_tcp,
            flow_timeout_tcp_syn,
            flow_timeout_tcp_closing,
            flow_timeout_udp,
            flow_timeout_udp_stream,
            cgroup_root,
        } => {
            let snat_ports =
                exposure::local_ports::PortSet::new([snat_port_range.first..=snat_port_range.last]);
            // Replies to a SNAT port are taken before any frontend: the ranges must not meet.
            if snat_ports.overlaps(&node_port_range) {
                anyhow::bail!(
                    "--snat-port-range {snat_ports} overlaps --node-port-range {node_port_range}"
                );
            }
            let every_netns = socket_namespaces == datapath::SocketNamespaces::All;
            // Resolved before anything is loaded: a wrong path is reported with nothing touched.
            let listed_netns = match &socket_namespaces {
                datapath::SocketNamespaces::Listed(paths) => paths
                    .iter()
                    .map(|p| Ok((p.clone(), datapath::netns_cookie_at(p)?)))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .context("--socket-namespaces")?,
                _ => Vec::new(),
            };
            let (redirect_to_pods, pod_iface_prefixes) =
                match (pod_iface_prefixes, xdp_pod_iface_prefixes) {
                    (tc, _) if !tc.is_empty() => (datapath::RedirectToPods::AtTc, tc),
                    (_, xdp) if !xdp.is_empty() => (datapath::RedirectToPods::AtXdp, xdp),
                    _ => (datapath::RedirectToPods::Off, Vec::new()),
                };
            let cfg = agent::AgentConfig {
                ifaces: exposure::netdev::IfaceSelector::new(ifaces),
                manifests,
                kubeconfig,
                metrics: metrics_bind_address,
                capacity: datapath::Capacity {
                    bpf_log_level: bpf_log_level as u8,
                    frontends: max_frontends,
                    services: max_services,
                    backends: max_backends,
                    flows: max_flows,
                    maglev_entries: max_maglev_entries,
                    redirect_to_pods,
                    snat_ports: snat_port_range,
                    sockets_of_every_netns: every_netns,
                    flow_lifetimes: {
                        use exposure_common::FlowPhase;
                        let mut l = exposure_common::FlowLifetimes::DEFAULT;
                        for (phase, timeout) in [
                            (FlowPhase::TcpOpen, flow_timeout_tcp),
                            (FlowPhase::TcpOpening, flow_timeout_tcp_syn),
                            (FlowPhase::Closing, flow_timeout_tcp_closing),
                            (FlowPhase::UdpExchange, flow_timeout_udp),
                            (FlowPhase::UdpStream, flow_timeout_udp_stream),
                        ] {
                            l.ns[phase as usize] = timeout.as_nanos() as u64;
                        }
                        l
                    },
                    // Tests of the path taken on drivers that keep no XDP metadata.
                    xdp_metadata: std::env::var_os("EXPOSURE_TEST_NO_XDP_METADATA")
                        .is_none_or(|v| v != "1"),
                },
                pod_iface_prefixes,
                reserve_local_ports: reserve_local_ports
                    .then(|| node_port_range.union(&snat_ports)),
                external_cluster_ips,
                node_port_addresses: node_port_addresses.unwrap_or_default(),
                maps_check_period: (!maps_check_period.is_zero()).then_some(maps_check_period),
                node_sockets: translate_node_sockets.then_some(agent::NodeSockets {
                    cgroup: cgroup_root,
                    netns: listed_netns,
                    every_netns,
                    localhost_node_ports,
                    cluster_ips,
                }),
                limits: exposure::sync::Limits {
                    frontends: max_frontends,
                    services: max_services,
                    backends: max_backends,
                    backends_per_service: max_backends_per_service,
                    maglev_entries: max_maglev_entries,
                    maglev_table_max: maglev_max_table_size,
                },
                node_name: match node_name {
                    Some(n) => n,
                    None => hostname()?,
                },
                pin_dir,
                healthz: healthz_bind_address,
                xdp_mode: match xdp_mode {
                    Mode::Auto => XdpMode::Default,
                    Mode::Native => XdpMode::Driver,
                    Mode::Generic => XdpMode::Skb,
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::Status { pin_dir, output } => {
            let maps = datapath::KernelMaps::open(&pin_dir)?;
            let snapshot = exposure::sync::DatapathMaps::snapshot(&maps)?;
            let render = match output {
                StatusOutput::Table => status::render,
                StatusOutput::Json => status::render_json,
            };
            print!(
                "{}",
                render(
                    &snapshot,
                    maps.flow_count(),
                    &maps.counters()?,
                    &status::Interfaces {
                        node: datapath::attached_interfaces(&pin_dir),
                        generic_xdp: datapath::generic_xdp_interfaces(&pin_dir),
                        pods: datapath::linked_pod_interfaces(&pin_dir),
                    }
                )
            );
            Ok(())
        }
        Command::Cleanup { pin_dir } => datapath::unpin_all(&pin_dir),
    }
}

fn snat_port_range(s: &str) -> Result<datapath::PortRange, String> {
    let range = s
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
    match range {
        Some((first, last)) if 1024 <= first && first <= last => {
            Ok(datapath::PortRange { first, last })
        }
        Some(_) => Err("must be MIN-MAX with 1024 <= MIN <= MAX".into()),
        None => Err("must be MIN-MAX, two port numbers".into()),
    }
}

/// `N` followed by `ms`, `s`, `m` or `h`; a bare `0` is zero.
fn period(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a period such as 30s, 5m or 1h");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if n == 0 => 0,
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_millis(n.saturating_mul(unit_ms)))
}

/// A flow lifetime: a [`period`] of at least 2 s (flows note their last packet once a second).
fn flow_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = period(s)?;
    if d < std::time::Duration::from_secs(2) {
        return Err(format!("{s:?} is shorter than 2s"));
    }
    Ok(d.min(std::time::Duration::from_secs(365 * 86_400)))
}

fn port_set(s: &str) -> Result<exposure::local_ports::PortSet, String> {
    let set = exposure::local_ports::PortSet::parse(s).map_err(|e| e.to_string())?;
    if set == exposure::local_ports::PortSet::default() {
        return Err("no ports".into());
    }
    Ok(set)
}

fn maglev_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if exposure::maglev::TABLE_SIZES.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "must be one of {:?}",
            exposure::maglev::TABLE_SIZES
        ))
    }
}
