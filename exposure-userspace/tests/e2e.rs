//! End to end: the namespace lab (client, node-1 and node-2 with pods), the real `exposure` binary on
//! each node reading a manifest directory, real TCP/UDP servers in the pods and real clients.
//! Addresses are all in 198.18.0.0/15; namespaces, pins and processes are removed even on failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use exposure::datapath::KernelMaps;
use exposure_lab::{
    agent::{pin_dir, Agent, Source},
    apps::{self, parse_answer, Server, TcpSession, UdpSession},
    lab::{lb_ip, node_ip, Lab, CLIENT_IP},
    netns::unique_prefix,
};

const BIN: &str = env!("CARGO_BIN_EXE_exposure");

struct Cluster {
    agents: Vec<Agent>,
    /// Extra flags for every agent.
    agent_flags: Vec<String>,
    /// Added to every agent's environment.
    agent_env: Vec<(String, String)>,
    _servers: Vec<Server>,
    manifests: PathBuf,
    log_dir: PathBuf,
    lab: Lab,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.manifests);
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

impl Cluster {
    /// A lab with `pods[i]` pods on node i (each serving TCP+UDP on 50000), the given manifest files,
    /// and an agent on every node.
    fn start(pods: &[usize], files: &[(&str, String)]) -> Cluster {
        Self::start_with(pods, files, &[])
    }

    /// [`Cluster::start`] with extra flags for every agent.
    fn start_with(pods: &[usize], files: &[(&str, String)], agent_flags: &[&str]) -> Cluster {
        Self::start_prepared(pods, files, agent_flags, |_| {})
    }

    /// [`Cluster::start_with`], with `prepare` run on the lab before the agents start.
    fn start_prepared(
        pods: &[usize],
        files: &[(&str, String)],
        agent_flags: &[&str],
        prepare: impl FnOnce(&Lab),
    ) -> Cluster {
        Self::start_prepared_env(pods, files, agent_flags, &[], prepare)
    }

    /// [`Cluster::start_prepared`], with `agent_env` in every agent's environment.
    fn start_prepared_env(
        pods: &[usize],
        files: &[(&str, String)],
        agent_flags: &[&str],
        agent_env: &[(&str, &str)],
        prepare: impl FnOnce(&Lab),
    ) -> Cluster {
        let prefix = unique_prefix("e");
        let lab = Lab::new(&prefix, pods).expect("lab");
        prepare(&lab);
        let servers = lab
            .pods()
            .map(|(_, p)| apps::serve(&p.ns, 50000, &p.name).expect("server"))
            .collect();
        let base = std::env::temp_dir().join(&prefix);
        let manifests = base.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        for (name, text) in files {
            std::fs::write(manifests.join(name), text).unwrap();
        }
        let mut cluster = Cluster {
            agents: Vec::new(),
            agent_flags: agent_flags.iter().map(|f| f.to_string()).collect(),
            agent_env: agent_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _servers: servers,
            manifests,
            log_dir: base,
            lab,
        };
        for n in 0..cluster.lab.nodes.len() {
            cluster.start_agent(n);
        }
        cluster
    }

    fn start_agent(&mut self, n: usize) {
        let source = Source::Manifests(&self.manifests);
        let flags: Vec<&str> = self.agent_flags.iter().map(String::as_str).collect();
        let node = &self.lab.nodes[n];
        let mut agent = Agent::spawn_with_env(
            Path::new(BIN),
            &self.lab.prefix,
            node,
            &source,
            &self.log_dir,
            &flags,
            &self.agent_env,
        )
        .expect("agent starts");
        agent
            .wait_healthy(node)
            .expect("agent starts and reports healthy");
        if n < self.agents.len() {
            self.agents[n] = agent;
        } else {
            self.agents.push(agent);
        }
    }

    fn write(&self, name: &str, text: &str) {
        // Write then rename, as editors and kubectl do, so the agent never reads half a file.
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join(name)).unwrap();
    }

    fn node(&self, n: usize, port: u16) -> SocketAddr {
        SocketAddr::from((self.lab.nodes[n].ip, port))
    }

    /// Which pods answer `count` fresh TCP connections (at least [`apps::SPREAD_MIN`]), and the client
    /// addresses they saw.
    fn tcp_spread(&self, to: SocketAddr, count: usize) -> (BTreeSet<String>, BTreeSet<IpAddr>) {
        let mut pods = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for _ in 0..count.max(apps::SPREAD_MIN) {
            let answer = apps::tcp_ask(&self.lab.client, to)
                .unwrap_or_else(|e| panic!("TCP to {to}: {e:#}"));
            let (pod, peer) = parse_answer(&answer).expect("answer format");
            pods.insert(pod.to_string());
            seen.insert(peer.ip());
        }
        (pods, seen)
    }

    /// Which pods answer `count` fresh TCP connections; `None` if one is not answered.
    fn tcp_spread_if_served(&self, to: SocketAddr, count: usize) -> Option<BTreeSet<String>> {
        (0..count)
            .map(|_| apps::tcp_ask(&self.lab.client, to))
            .map(|answer| Some(parse_answer(&answer.ok()?)?.0.to_string()))
            .collect()
    }

    /// Which pods answer `count` fresh UDP flows (at least [`apps::SPREAD_MIN`]).
    fn udp_spread(&self, to: SocketAddr, count: usize) -> BTreeSet<String> {
        (0..count.max(apps::SPREAD_MIN))
            .map(|_| {
                let answer = apps::udp_ask(&self.lab.client, to)
                    .unwrap_or_else(|e| panic!("UDP to {to}: {e:#}"));
                parse_answer(&answer).expect("answer format").0.to_string()
            })
            .collect()
    }

    /// Retries until `check` holds (bounded), for changes the agent applies asynchronously.
    fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{what}: not true within 15 s; agent log:\n{}",
            self.agents[0].log_text()
        );
    }
}

fn pods_named(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A Service manifest. `extra` is appended to the spec (indented two spaces).
fn service(name: &str, svc_type: &str, ports: &str, extra: &str) -> String {
    let cluster_ip = cluster_ip(name);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {svc_type}\n  clusterIP: {cluster_ip}\n  ports:\n{ports}{extra}"
    )
}

/// The ClusterIP [`service`] gives a Service: one of its own (by its name's hash), as the API
/// server allocates them.
fn cluster_ip(name: &str) -> Ipv4Addr {
    let hash = name.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ b as u32).wrapping_mul(16_777_619)
    });
    Ipv4Addr::new(198, 18, 50, 1 + (hash % 250) as u8)
}

/// An EndpointSlice for `svc` listing `endpoints` (ip, node) on target port 50000.
fn slice(svc: &str, ports: &str, endpoints: &[(Ipv4Addr, impl AsRef<str>)]) -> String {
    let mut eps = String::new();
    for (ip, node) in endpoints {
        let node = node.as_ref();
        eps += &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n");
    }
    if endpoints.is_empty() {
        eps = "[]\n".into();
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports:\n{ports}endpoints:\n{eps}"
    )
}

fn all_pods(pods: &[usize]) -> Vec<(Ipv4Addr, String)> {
    let mut out = Vec::new();
    for (n, count) in pods.iter().enumerate() {
        for p in 0..*count {
            out.push((exposure_lab::lab::pod_ip(n, p), format!("node-{}", n + 1)));
        }
    }
    out
}

fn hello_world(endpoints: &[(Ipv4Addr, String)]) -> String {
    service(
        "hello-world",
        "NodePort",
        "  - {protocol: TCP, port: 60000, targetPort: 50000, nodePort: 30600}\n",
        "",
    ) + "---\n"
        + &slice(
            "hello-world",
            "- {name: \"\", protocol: TCP, port: 50000}\n",
            endpoints,
        )
}

const CLIENT: IpAddr = IpAddr::V4(CLIENT_IP);

#[test]
fn nodeport_reaches_every_backend_through_both_nodes() {
    let c = Cluster::start(&[2, 2], &[("hello.yaml", hello_world(&all_pods(&[2, 2])))]);
    let everyone = pods_named(&["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"]);
    for n in 0..2 {
        let (pods, seen) = c.tcp_spread(c.node(n, 30600), 60);
        assert_eq!(pods, everyone, "via node-{}", n + 1);
        // Local pods see the client, remote pods see the node that SNATed the flow.
        assert_eq!(
            seen,
            BTreeSet::from([CLIENT, IpAddr::V4(c.lab.nodes[n].ip)]),
            "via node-{}",
            n + 1
        );
    }
}

#[test]
fn load_balancer_ip_on_tcp_and_udp() {
    let ports = "  - {name: tcp, protocol: TCP, port: 7, targetPort: 50000, nodePort: 30700}\n  - {name: udp, protocol: UDP, port: 7, targetPort: 50000, nodePort: 30700}\n";
    let svc = service(
        "echo",
        "LoadBalancer",
        ports,
        "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1}]\n",
    );
    let eps = [
        (exposure_lab::lab::pod_ip(0, 0), "node-1"),
        (exposure_lab::lab::pod_ip(1, 0), "node-2"),
    ];
    let manifest = svc + "---\n" + &slice("echo", "- {name: tcp, protocol: TCP, port: 50000}\n- {name: udp, protocol: UDP, port: 50000}\n", &eps);
    let c = Cluster::start(&[1, 1], &[("echo.yaml", manifest)]);
    let both = pods_named(&["pod-1-1", "pod-2-1"]);
    let (tcp, _) = c.tcp_spread(SocketAddr::from((lb_ip(1), 7)), 40);
    assert_eq!(tcp, both);
    assert_eq!(c.udp_spread(SocketAddr::from((lb_ip(1), 7)), 40), both);
    // The same Service over its NodePort, UDP, through node-2.
    assert_eq!(c.udp_spread(c.node(1, 30700), 40), both);
}

/// `externalTrafficPolicy: Local`: outside clients reach the node's own pods and keep their
/// address; the node's own connections reach every pod (kube-proxy's rules for traffic from the
/// node itself, Cilium's internal scope).
#[test]
fn external_traffic_policy_local_keeps_the_client_ip() {
    let eps = all_pods(&[1, 1]);
    let manifest = service(
        "hello-local",
        "NodePort",
        "  - {protocol: TCP, port: 60001, targetPort: 50000, nodePort: 30601}\n",
        "  externalTrafficPolicy: Local\n",
    ) + "---\n"
        + &slice(
            "hello-local",
            "- {name: \"\", protocol: TCP, port: 50000}\n",
            &eps,
        );
    let c = Cluster::start(&[1, 1], &[("local.yaml", manifest)]);
    for n in 0..2 {
        let (pods, seen) = c.tcp_spread(c.node(n, 30601), 20);
        assert_eq!(
            pods,
            pods_named(&[&format!("pod-{}-1", n + 1)]),
            "only node-{}'s own pod",
            n + 1
        );
        assert_eq!(
            seen,
            BTreeSet::from([CLIENT]),
            "the pod sees the real client address"
        );
        // The node's own connections reach every pod, as kube-proxy sends them.
        let from_node: BTreeSet<String> = (0..20)
            .map(|_| {
                let answer = apps::tcp_ask(&c.lab.nodes[n].ns, c.node(n, 30601))
                    .expect("the node to its NodePort");
                parse_answer(&answer).expect("answer format").0.to_string()
            })
            .collect();
        assert_eq!(
            from_node,
            pods_named(&["pod-1-1", "pod-2-1"]),
            "node-{}'s own connections",
            n + 1
        );
    }
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    let manifest = service(
        "empty",
        "NodePort",
        "  - {name: t, protocol: TCP, port: 80, targetPort: 50000, nodePort: 30800}\n  - {name: u, protocol: UDP, port: 80, targetPort: 50000, nodePort: 30800}\n",
        "",
    );
    let c = Cluster::start(&[1, 0], &[("empty.yaml", manifest)]);
    let started = Instant::now();
    let tcp = apps::tcp_ask(&c.lab.client, c.node(0, 30800)).expect_err("must be refused");
    assert_refused(&tcp);
    let udp = apps::udp_ask(&c.lab.client, c.node(0, 30800)).expect_err("must be refused");
    assert_refused(&udp);
    // Refused, not timed out: both answers came long before the 3 s client timeout.
    assert!(
        started.elapsed() < apps::IO_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
}

const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";

#[test]
fn the_nodes_own_connections_stay_off_nodeports_and_snat_ports() {
    // The Service's only endpoint is on node-2, so node-1 SNATs, from a configured range.
    let mut c = Cluster::start_with(
        &[1, 1],
        &[("svc.yaml", hello_world(&all_pods(&[0, 1])))],
        &["--snat-port-range", "40000-40999"],
    );
    let node = &c.lab.nodes[0];
    assert_eq!(
        node.ns.sysctl_value(RESERVED_PORTS).unwrap(),
        "30000-32767,40000-40999",
        "the agent reserves the NodePort and SNAT ranges"
    );
    for i in 0..5 {
        let answer = apps::tcp_ask(&c.lab.client, c.node(0, 30600))
            .unwrap_or_else(|e| panic!("NodePort connection {i}: {e:#}"));
        let (_, peer) = parse_answer(&answer).expect("answer format");
        assert_eq!(peer.ip(), IpAddr::V4(node.ip), "SNAT to node-1");
        assert!(
            (40000..=40999).contains(&peer.port()),
            "SNAT port {}",
            peer.port()
        );
    }
    // A node tuned to a wide ephemeral range (here 32752-32799, half of it NodePorts): its own
    // connections get only ports outside the reserved ranges. Without the reservation a third of
    // them would start from a NodePort, and their replies would be taken for the Service.
    node.ns
        .sysctl("net.ipv4.ip_local_port_range", "32752 32799")
        .unwrap();
    let pod = SocketAddr::from((node.pods[0].ip, 50000));
    for i in 0..24 {
        let answer =
            apps::tcp_ask(&node.ns, pod).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        let (_, peer) = parse_answer(&answer).expect("answer format");
        assert!(
            (32768..=32799).contains(&peer.port()),
            "connection {i} from port {}",
            peer.port()
        );
    }
    // A restarted agent finds them reserved, and keeps a list the node had of its own.
    c.agents[0].stop();
    let reserved = "9100,30000-32767,40000-40999";
    node.ns.sysctl(RESERVED_PORTS, reserved).unwrap();
    c.start_agent(0);
    assert_eq!(
        c.lab.nodes[0].ns.sysctl_value(RESERVED_PORTS).unwrap(),
        reserved
    );
    assert!(c.agents[0].log_text().contains("already reserved"));
}

/// The node's own connections may leave from ports whose packets XDP takes all the same (a socket
/// bound there; kube-proxy's masquerade picks source ports at random, reservations or not): one
/// from the SNAT port a closed flow to the same pod had gets its own answers, and flows leave the
/// port to it while it is open; one from a frontend's port (a NodePort, an externalIP that is the
/// node's address) gets its answers, not the Service.
#[test]
fn the_nodes_own_connections_from_snat_ports_and_frontends_ports_get_their_own_answers() {
    // The Service's only endpoint is on node-2, and node-1 has four SNAT ports to reuse.
    let endpoints = all_pods(&[0, 1]);
    let on_node = service(
        "on-node",
        "ClusterIP",
        "  - {name: t, protocol: TCP, port: 8443, targetPort: 50000}\n",
        &format!("  externalIPs: [{}]\n", node_ip(0)),
    ) + "---\n"
        + &slice(
            "on-node",
            "- {name: t, protocol: TCP, port: 50000}\n",
            &endpoints,
        );
    let c = Cluster::start_with(
        &[1, 1],
        &[
            ("svc.yaml", hello_world(&endpoints)),
            ("on-node.yaml", on_node),
        ],
        &["--snat-port-range", "40000-40003"],
    );
    let node = &c.lab.nodes[0];
    // Each flow closed both ways before the test goes on: a connection of the node's racing a
    // flow's last packets for its tuple would find it open (and lose its first SYN).
    let flow_port = |i: usize| {
        let answer = apps::TcpSession::connect(&c.lab.client, c.node(0, 30600))
            .and_then(|mut s| {
                let answer = s.ask("hello")?;
                s.finish()?;
                Ok(answer)
            })
            .unwrap_or_else(|e| panic!("NodePort connection {i}: {e:#}"));
        parse_answer(&answer).expect("answer format").1.port()
    };
    let port = flow_port(0);
    let pod = SocketAddr::from((c.lab.nodes[1].pods[0].ip, 50000));
    let from = SocketAddr::from((node.ip, port));
    let mut own = apps::TcpSession::connect_from(&node.ns, from, pod)
        .unwrap_or_else(|e| panic!("the node's connection from {from}: {e:#}"));
    let answer = own.ask("hello").expect("the node's connection answered");
    assert_eq!(
        parse_answer(&answer).expect("answer format"),
        ("pod-2-1", from)
    );
    for i in 1..13 {
        assert_ne!(flow_port(i), port, "flow {i} took the node's port");
    }
    let answer = own
        .ask("hello again")
        .expect("the node's connection still answered");
    assert_eq!(parse_answer(&answer).expect("answer format").0, "pod-2-1");

    // A server outside, reached from the NodePort's port and from the externalIP's, which the
    // Service is on too.
    let _outside = apps::serve(&c.lab.client, 50000, "outside").expect("server");
    let to = SocketAddr::from((CLIENT_IP, 50000));
    for port in [30600, 8443] {
        let from = SocketAddr::from((node.ip, port));
        let answer = apps::tcp_ask(&c.lab.client, from)
            .unwrap_or_else(|e| panic!("the Service at {from}: {e:#}"));
        assert_eq!(parse_answer(&answer).expect("answer format").0, "pod-2-1");
        let answer = apps::TcpSession::connect_from(&node.ns, from, to)
            .and_then(|mut s| s.ask("hello"))
            .unwrap_or_else(|e| panic!("the node's connection from {from}: {e:#}"));
        assert_eq!(
            parse_answer(&answer).expect("answer format"),
            ("outside", from)
        );
    }
    let metrics = exposure_lab::agent::metrics(node).expect("metrics");
    assert!(
        metrics.contains("exposure_datapath_events_total{event=\"dropped_host_collision\"} 0"),
        "no collision, and the counter is exported"
    );
}

/// The node's address changes while the agent runs (as a DHCP lease can): the NodePort moves to
/// the new address, and flows to a remote pod are SNATed to it, not to the one the node lost.
#[test]
fn a_renumbered_node_serves_and_snats_from_its_new_address() {
    let c = Cluster::start(&[1, 1], &[("svc.yaml", hello_world(&all_pods(&[0, 1])))]);
    let node = &c.lab.nodes[0];
    let new_ip = Ipv4Addr::new(198, 18, 0, 110);
    // The new address first, then the old one goes (the kernel promotes the new to primary).
    node.ns
        .sysctl("net.ipv4.conf.eth0.promote_secondaries", "1")
        .unwrap();
    node.ns
        .ip(&format!("addr add {new_ip}/24 dev eth0"))
        .unwrap();
    node.ns
        .ip(&format!("addr del {}/24 dev eth0", node.ip))
        .unwrap();
    let to = SocketAddr::from((new_ip, 30600));
    c.eventually(
        "node-2's pod answers through the new address, seeing it as the source",
        || {
            apps::tcp_ask(&c.lab.client, to).is_ok_and(|answer| {
                parse_answer(&answer)
                    .is_some_and(|(who, seen)| who == "pod-2-1" && seen.ip() == IpAddr::V4(new_ip))
            })
        },
    );
}

/// A VIP added beside node-1's address (as keepalived or kube-vip add one: a /32, here numerically
/// below the node's) is a NodePort address too, but flows to a remote pod keep the node's own
/// address as their source: the VIP may move to another node, and their replies with it.
#[test]
fn a_vip_beside_the_nodes_address_is_served_but_not_snated_to() {
    let c = Cluster::start(&[1, 1], &[("svc.yaml", hello_world(&all_pods(&[0, 1])))]);
    let node = &c.lab.nodes[0];
    let vip = Ipv4Addr::new(198, 18, 0, 5);
    node.ns.ip(&format!("addr add {vip}/32 dev eth0")).unwrap();
    let at_vip = SocketAddr::from((vip, 30600));
    c.eventually("the NodePort served on the VIP", || {
        apps::tcp_ask(&c.lab.client, at_vip).is_ok()
    });
    for to in [at_vip, c.node(0, 30600)] {
        let answer =
            apps::tcp_ask(&c.lab.client, to).unwrap_or_else(|e| panic!("TCP to {to}: {e:#}"));
        assert_eq!(
            parse_answer(&answer).map(|(who, seen)| (who, seen.ip())),
            Some(("pod-2-1", IpAddr::V4(node.ip))),
            "via {to}"
        );
    }
}

/// `--nodeport-addresses`, as kube-proxy's flag: NodePorts are served on the node's addresses in
/// the networks given, and the rest (a VIP beside node-1's address, 127.0.0.1 for the node's own
/// sockets) are left to the node, which refuses them. With `primary`, each node's NodePort address
/// is its Node object's InternalIP (here the VIP), or without a Node its interface's own address.
#[test]
fn nodeport_addresses_choose_where_nodeports_are_served() {
    let hello = hello_world(&all_pods(&[1, 1]));
    let web = service(
        "web",
        "NodePort",
        "  - {protocol: TCP, port: 80, targetPort: 50000, nodePort: 30080}\n",
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
    ) + "---\n"
        + &slice(
            "web",
            "- {name: \"\", protocol: TCP, port: 50000}\n",
            &[(exposure_lab::lab::pod_ip(0, 0), "node-1")],
        );
    let mut c = Cluster::start_with(
        &[1, 1],
        &[("svc.yaml", hello), ("web.yaml", web)],
        &["--nodeport-addresses", "198.18.0.10/32,198.18.0.20/31"],
    );
    let vip = Ipv4Addr::new(198, 18, 0, 5);
    c.lab.nodes[0]
        .ns
        .ip(&format!("addr add {vip}/32 dev eth0"))
        .unwrap();
    // A full sync that has seen the VIP, so the VIP is refused because of the flag, not too soon.
    c.agents[0].stop();
    c.start_agent(0);
    let at_vip = SocketAddr::from((vip, 30600));
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    for node in [0, 1] {
        assert_eq!(
            c.tcp_spread(c.node(node, 30600), 20).0,
            everyone,
            "node-{}",
            node + 1
        );
    }
    assert_refused(&apps::tcp_ask(&c.lab.client, at_vip).expect_err("the VIP is left to the node"));
    let localhost = SocketAddr::from(([127, 0, 0, 1], 30600));
    let node_1 = &c.lab.nodes[0].ns;
    assert_refused(&apps::tcp_ask(node_1, localhost).expect_err("no localhost NodePort"));
    apps::tcp_ask(node_1, c.node(0, 30600)).expect("the node's own socket to its address");
    // The healthCheckNodePort listens where NodePorts are served, as kube-proxy's.
    assert_eq!(http_get(&c, c.node(0, 32000), "/healthz").0, 200);
    let hc_at_vip = SocketAddr::from((vip, 32000));
    assert_refused(&apps::tcp_ask(&c.lab.client, hc_at_vip).expect_err("no health check"));

    // `primary`: node-1's Node says its InternalIP is the VIP; node-2 has no Node object.
    c.write(
        "node.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {vip}}}\n  - {{type: ExternalIP, address: {}}}\n",
            c.lab.nodes[0].ip
        ),
    );
    c.agent_flags = vec!["--nodeport-addresses".into(), "primary".into()];
    for node in [0, 1] {
        c.agents[node].stop();
        c.start_agent(node);
    }
    assert_eq!(
        c.tcp_spread(at_vip, 20).0,
        everyone,
        "the Node's InternalIP"
    );
    assert_eq!(http_get(&c, hc_at_vip, "/healthz").0, 200);
    let hc_at_node = c.node(0, 32000);
    assert_refused(&apps::tcp_ask(&c.lab.client, hc_at_node).expect_err("no health check"));
    assert_eq!(
        c.tcp_spread(c.node(1, 30600), 20).0,
        everyone,
        "node-2's own address"
    );
    assert_refused(
        &apps::tcp_ask(&c.lab.client, c.node(0, 30600))
            .expect_err("node-1's address is not primary"),
    );

    // Networks that hold none of the node's addresses: said so in the log.
    c.agent_flags = vec!["--nodeport-addresses".into(), "198.19.255.0/24".into()];
    c.agents[1].stop();
    c.start_agent(1);
    assert_refused(&apps::tcp_ask(&c.lab.client, c.node(1, 30600)).expect_err("nowhere"));
    assert!(c.agents[1].log_text().contains(
        "--nodeport-addresses 198.19.255.0/24 matches none of this node's addresses (198.18.0.20"
    ));
}

/// node-1's agent's `exposure_map_repairs_total`.
fn map_repairs(c: &Cluster) -> f64 {
    metric(c, 0, "exposure_map_repairs_total").unwrap_or(-1.0)
}

/// The value of the sample `name` (with its labels) on node `n`'s `/metrics`.
fn metric(c: &Cluster, n: usize, name: &str) -> Option<f64> {
    let m = exposure_lab::agent::metrics(&c.lab.nodes[n]).ok()?;
    let prefix = format!("{name} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// Service map entries changed by something other than the agent (a person with bpftool, a
/// second agent on the same pin directory) are found at the next check and rewritten, as
/// kube-proxy's periodic sync restores rules removed behind its back. Traffic and the agent's
/// own syncs are never taken for such a change.
#[test]
fn service_maps_changed_behind_the_agents_back_are_rewritten() {
    use exposure::sync::DatapathMaps as _;
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    let c = Cluster::start_with(
        &[1, 1],
        &[("svc.yaml", hello_world(&all_pods(&[1, 1])))],
        &["--maps-check-period", "100ms"],
    );
    assert_eq!(c.tcp_spread(c.node(0, 30600), 20).0, everyone);
    c.write("svc.yaml", &hello_world(&all_pods(&[1, 0])));
    c.eventually("only pod-1-1", || {
        c.tcp_spread(c.node(0, 30600), 10).0 == pods_named(&["pod-1-1"])
    });
    c.write("svc.yaml", &hello_world(&all_pods(&[1, 1])));
    c.eventually("both pods again", || {
        c.tcp_spread(c.node(0, 30600), 20).0 == everyone
    });
    // With nothing to sync, each clean check moves the time the maps were last known right.
    let last_synced = || metric(&c, 0, "exposure_sync_last_timestamp_seconds").unwrap_or(0.0);
    let before = last_synced();
    c.eventually("a clean check since", || last_synced() > before);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        map_repairs(&c),
        0.0,
        "nothing to repair after traffic and syncs"
    );
    // The checks (every 100 ms here) read the Maglev tables through the agent's own mapping of
    // the array: a mapping of their own would add the whole array (16 MiB by default) to the
    // agent's resident size at every check, as the kernel maps all its pages at once.
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.agents[0].pid().unwrap()))
        .expect("the agent's status");
    let kib = |field: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (peak, now) = (kib("VmHWM:"), kib("VmRSS:"));
    assert!(
        peak < now + 8 * 1024,
        "peak resident size {peak} KiB against {now} KiB now"
    );

    // Someone deletes node-1's NodePort and points pod-2-1's backend elsewhere.
    let mut maps = KernelMaps::open(&c.agents[0].pin_dir).expect("the pinned maps");
    let actual = maps.snapshot().unwrap();
    let (key, _) = actual
        .frontends
        .iter()
        .find(|(k, _)| {
            IpAddr::from(k.addr) == IpAddr::V4(c.lab.nodes[0].ip)
                && exposure_common::port_host(k.port) == 30600
                && k.proto == exposure_common::PROTO_TCP
                && k.scope == 0
        })
        .expect("node-1's TCP NodePort");
    maps.remove_frontend(key).unwrap();
    let pod_2_1 = IpAddr::V4(exposure_lab::lab::pod_ip(1, 0));
    let (id, backend) = actual
        .backends
        .iter()
        .find(|(_, b)| IpAddr::from(b.addr) == pod_2_1)
        .expect("pod-2-1's backend");
    let elsewhere = exposure_common::Backend {
        addr: exposure_common::Addr::from(IpAddr::from([198, 19, 255, 9])),
        ..*backend
    };
    maps.write_backend(*id, &elsewhere).unwrap();
    // And one entry of the NodePort's Maglev table names another of its backends (the checks
    // compare each table by a digest of its entries).
    let tampered = actual.frontends[key].service_id;
    let service = actual.services[&tampered];
    let table = actual.tables[&tampered].entries();
    let other = *table
        .iter()
        .find(|b| **b != table[0])
        .expect("two backends");
    maps.maglev.write(service.table_offset, &[other]).unwrap();
    c.eventually("both pods answer through node-1 again", || {
        c.tcp_spread_if_served(c.node(0, 30600), 20) == Some(everyone.clone())
    });
    assert_eq!(map_repairs(&c), 1.0);
    let log = c.agents[0].log_text();
    assert!(
        log.contains("the Service maps differ from what the agent wrote")
            && log.contains(&format!(
                "frontends: 1 missing ({}:30600/TCP)",
                c.lab.nodes[0].ip
            ))
            && log.contains(&format!("backends: 1 changed (id {id})"))
            && log.contains(&format!("Maglev tables: 1 changed (id {tampered})")),
        "{log}"
    );
    // The table selects as before (backend ids may have changed with the repair).
    let repaired = KernelMaps::open(&c.agents[0].pin_dir)
        .unwrap()
        .snapshot()
        .unwrap();
    let addrs = |read: &exposure::sync::Snapshot, ids: &[u32]| -> Vec<IpAddr> {
        ids.iter()
            .map(|id| IpAddr::from(read.backends[id].addr))
            .collect()
    };
    let now = repaired.frontends[key].service_id;
    assert_eq!(
        addrs(&repaired, repaired.tables[&now].entries()),
        addrs(&actual, table),
        "the table is rewritten"
    );
}

/// Endpoints on the nodes' own addresses (`hostNetwork` pods: an ingress controller on the host
/// network, or the API servers behind the `kubernetes` Service): NodePorts reach the local one
/// with the client's address and the remote one SNATed, over TCP and UDP, and the sockets of a
/// pod and of the node reach both through the ClusterIP and the NodePort.
#[test]
fn endpoints_on_the_nodes_own_addresses_are_served() {
    let nodes: Vec<(Ipv4Addr, String)> = vec![
        (node_ip(0), "node-1".to_string()),
        (node_ip(1), "node-2".to_string()),
    ];
    let ports = "  - {name: t, protocol: TCP, port: 443, targetPort: 51000, nodePort: 30650}\n  - {name: u, protocol: UDP, port: 443, targetPort: 51000, nodePort: 30650}\n";
    let slice_ports =
        "- {name: t, protocol: TCP, port: 51000}\n- {name: u, protocol: UDP, port: 51000}\n";
    let manifest = service("host-net", "NodePort", ports, "")
        + "---\n"
        + &slice("host-net", slice_ports, &nodes);
    let c = Cluster::start(&[1, 1], &[("host-net.yaml", manifest)]);
    // Bound to the node's address, so UDP answers come from the address asked (as the API
    // server binds its advertise address): one bound to the wildcard would answer the pod from
    // the pod's gateway address, which its connected socket (or kube-proxy's conntrack) rejects.
    let _servers: Vec<Server> = c
        .lab
        .nodes
        .iter()
        .map(|n| {
            apps::serve_at(&n.ns, &[SocketAddr::from((n.ip, 51000))], &n.name)
                .expect("a server on the node's network")
        })
        .collect();
    let both = pods_named(&["node-1", "node-2"]);
    for (via, other) in [(0, 1), (1, 0)] {
        let (answered, seen) = c.tcp_spread(c.node(via, 30650), 30);
        assert_eq!(answered, both, "TCP through node-{}", via + 1);
        assert_eq!(
            seen,
            BTreeSet::from([CLIENT, IpAddr::V4(node_ip(via))]),
            "the local endpoint sees the client, node-{} the node's SNAT address",
            other + 1
        );
        assert_eq!(
            c.udp_spread(c.node(via, 30650), 30),
            both,
            "UDP through node-{}",
            via + 1
        );
    }
    let pod = &c.lab.nodes[0].pods[0];
    let cluster_ip = SocketAddr::from((cluster_ip("host-net"), 443));
    assert_every_socket_reaches(&pod.ns, cluster_ip, Some(IpAddr::V4(pod.ip)), &both, 20);
    let node_1 = &c.lab.nodes[0].ns;
    assert_every_socket_reaches(node_1, c.node(0, 30650), None, &both, 20);
}

/// `--iface` deleted and made again while the agent runs (a hot-plugged NIC, a rebuilt bond): a new
/// interface under the old name, with no programs on it, gets the datapath again.
#[test]
fn an_interface_made_anew_gets_the_datapath_again() {
    let mut c = Cluster::start(&[1, 1], &[("hello.yaml", hello_world(&all_pods(&[1, 1])))]);
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    assert_eq!(c.tcp_spread(c.node(0, 30600), 20).0, everyone);
    c.lab.replug_node(0).expect("eth0 made again");
    c.eventually("node-1's NodePort served again, by both pods", || {
        c.tcp_spread_if_served(c.node(0, 30600), 20) == Some(everyone.clone())
    });
    assert!(c.agents[0]
        .log_text()
        .contains("attached again: the interface is new"));
}

/// A node on two networks (`--iface eth+`: eth0 and eth1): a client on the second one reaches the
/// NodePort on that network's address. A local pod is served through eth1 (replies at eth1's tc);
/// a remote pod's flow leaves through eth0, SNATed to eth0's address, and its replies go back out
/// of eth1 (XDP redirect between the interfaces). Too big packets get the MTU back; while eth1 is
/// gone, eth0 is still followed, and eth1 made again is served again. The client there leaves its
/// checksums to the device (partial ones arrive): kept partial for the kernel, made whole for
/// frames sent from XDP.
#[test]
fn a_node_on_two_networks_serves_clients_on_each() {
    // TCP and UDP on NodePort 30600.
    let mut c = Cluster::start(&[1, 1], &[("hello.yaml", hello_dual_stack(&[1, 1]))]);
    let front = exposure_lab::netns::Netns::create(&format!("{}-front", c.lab.prefix)).unwrap();
    let _front_xdp = plug_second_network(&c.lab.nodes[0].ns, &front);
    c.agents[0].stop();
    c.agent_flags = vec!["--iface".into(), "eth+".into()];
    c.start_agent(0);

    let to = SocketAddr::from(([198, 18, 200, 10], 30600));
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        for answer in [apps::tcp_ask(&front, to), apps::udp_ask(&front, to)] {
            let answer = answer.unwrap_or_else(|e| panic!("{to} from the second network: {e:#}"));
            let (pod, peer) = parse_answer(&answer).expect("answer format");
            seen.insert(pod.to_string(), peer.ip());
        }
    }
    let client2 = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1));
    let eth0 = IpAddr::V4(c.lab.nodes[0].ip);
    assert_eq!(
        seen,
        [
            ("pod-1-1".to_string(), client2),
            ("pod-2-1".to_string(), eth0)
        ]
        .into(),
        "the local pod sees the client, the remote one eth0's address (where its flow leaves)"
    );
    // The first network is served as before.
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    assert_eq!(c.tcp_spread(c.node(0, 30600), 20).0, everyone);

    // Larger frames on the second network (3,000 bytes: veth's most with XDP on its peer): a
    // 2,900-byte datagram goes in one packet, too big for the 1,500-byte networks behind. Whether
    // the kernel forwards it to the local pod or XDP sends it to the remote one, the client is
    // told the MTU (its first try fails with EMSGSIZE), learns it, and its next try goes in
    // fragments that fit.
    c.lab.nodes[0].ns.ip("link set eth1 mtu 3000").unwrap();
    front.ip("link set eth0 mtu 3000").unwrap();
    let pods = all_pods(&[1, 1]);
    for (pod, node_port) in [(0, 30701), (1, 30702)] {
        let pod_name = ["pod-1-1", "pod-2-1"][pod];
        let name = format!("one-pod-{node_port}");
        let ports = format!(
            "  - {{name: udp, protocol: UDP, port: 53, targetPort: 50000, nodePort: {node_port}}}\n"
        );
        let endpoint = "- {name: udp, protocol: UDP, port: 50000}\n";
        c.write(
            &format!("{name}.yaml"),
            &(service(&name, "NodePort", &ports, "")
                + "---\n"
                + &slice(&name, endpoint, &pods[pod..=pod])),
        );
        let to = SocketAddr::from(([198, 18, 200, 10], node_port));
        c.eventually("the Service is served", || {
            apps::udp_ask(&front, to).is_ok()
        });
        assert_told_the_mtu_then_fragments(&front, to, 2900, pod_name);
    }
    assert!(agent_counter(&c, "too_big_for_next_hop") >= 1.0);

    // The second network goes (its interface deleted): the first is still followed, so an
    // address added to eth0 meanwhile is served. Then eth1 is back, and served again.
    let node = &c.lab.nodes[0];
    node.ns.ip("link del eth1").unwrap();
    let vip = SocketAddr::from(([198, 18, 0, 6], 30600));
    node.ns.ip("addr add 198.18.0.6/32 dev eth0").unwrap();
    c.eventually(
        "an address added to eth0 while eth1 is gone is served",
        || apps::tcp_ask(&c.lab.client, vip).is_ok(),
    );
    let _front_xdp = plug_second_network(&node.ns, &front);
    c.eventually("the second network served again", || {
        apps::tcp_ask(&front, to).is_ok()
    });
    assert!(c.agents[0]
        .log_text()
        .contains("attached again: the interface is new"));
}

/// A UDP datagram of `payload` bytes from `ns` to `to`, above the path's MTU (what `ns` learned of
/// it forgotten first): the first try fails with EMSGSIZE (told the MTU, not left to time out),
/// and the next goes in fragments that fit, answered by `pod`.
fn assert_told_the_mtu_then_fragments(
    ns: &exposure_lab::netns::Netns,
    to: SocketAddr,
    payload: usize,
    pod: &str,
) {
    ns.ip("route flush cache").unwrap();
    let mut s = UdpSession::connect(ns, to).unwrap();
    let first = s
        .ask_big(payload)
        .expect_err("a packet above the path's MTU");
    let io = first.root_cause().downcast_ref::<std::io::Error>();
    assert_eq!(
        io.and_then(|e| e.raw_os_error()),
        Some(libc::EMSGSIZE),
        "told the MTU, not left to time out, via {to} to {pod}: {first:#}"
    );
    let answer = s
        .ask_big(payload)
        .unwrap_or_else(|e| panic!("once the client knows the MTU, via {to}: {e:#}"));
    assert_eq!(parse_answer(&answer).unwrap().0, pod);
}

/// `eth1` on `node`, to `front`'s `eth0`: 198.18.200.10 and .1 on 198.18.200.0/24. The client's
/// checksums arrive partial (left to a device).
/// The returned XDP link (a two-instruction XDP_PASS on the client's side) lives as long as the
/// network is used.
#[must_use]
fn plug_second_network(
    node: &exposure_lab::netns::Netns,
    front: &exposure_lab::netns::Netns,
) -> std::os::fd::OwnedFd {
    node.ip(&format!(
        "link add eth1 type veth peer name eth0 netns {}",
        front.name()
    ))
    .unwrap();
    node.exec("ethtool", &["-K", "eth1", "tx", "off"]).unwrap();
    // The client leaves its checksums to the device, as a veth does by default (a node in a
    // container reached from its host, as with kind): its TCP and UDP checksums arrive partial.
    // Frames the node sends there from XDP (replies redirected from eth0, ICMP errors sent back
    // with XDP_TX) need NAPI on the far end. With GRO alone, a "fragmentation needed" sent with
    // XDP_TX sometimes never reached the client's IP layer on a loaded machine (about 1 run in
    // 10); with an XDP program, as on the lab's LAN, none was lost in 30 such runs.
    let xdp = exposure_lab::xdp_pass::attach(front, "eth0").unwrap();
    node.ip("addr add 198.18.200.10/24 dev eth1").unwrap();
    node.ip("link set eth1 up").unwrap();
    front.ip("addr add 198.18.200.1/24 dev eth0").unwrap();
    front.ip("link set eth0 up").unwrap();
    front
        .exec("ping", &["-c", "1", "-W", "2", "198.18.200.10"])
        .unwrap();
    xdp
}

#[test]
fn an_xdp_mode_named_replaces_an_earlier_runs_link_of_the_other_mode() {
    let files = [("hello.yaml", hello_world(&all_pods(&[1, 1])))];
    let mut c = Cluster::start_with(&[1, 1], &files, &["--xdp-mode", "generic"]);
    let ns = c.lab.nodes[0].ns.name().to_string();
    let all = pods_named(&["pod-1-1", "pod-2-1"]);
    assert_eq!(xdp_modes(&ns)["eth0"], XDP_ATTACHED_SKB);
    assert_eq!(
        status_json(&c, 0)["generic_xdp_interfaces"],
        serde_json::json!(["eth0"])
    );
    assert_eq!(c.tcp_spread(c.node(0, 30600), 0).0, all);
    for (flags, want, generic) in [
        (
            &["--xdp-mode", "native"][..],
            XDP_ATTACHED_DRV,
            serde_json::json!([]),
        ),
        // `auto` keeps the link it finds, in its mode.
        (&[][..], XDP_ATTACHED_DRV, serde_json::json!([])),
        (
            &["--xdp-mode", "generic"][..],
            XDP_ATTACHED_SKB,
            serde_json::json!(["eth0"]),
        ),
        (&[][..], XDP_ATTACHED_SKB, serde_json::json!(["eth0"])),
    ] {
        c.agents[0].stop();
        c.agent_flags = flags.iter().map(|f| f.to_string()).collect();
        c.start_agent(0);
        assert_eq!(xdp_modes(&ns)["eth0"], want, "{flags:?}");
        assert_eq!(
            status_json(&c, 0)["generic_xdp_interfaces"],
            generic,
            "{flags:?}"
        );
        assert_eq!(c.tcp_spread(c.node(0, 30600), 0).0, all, "{flags:?}");
    }
}

/// `IFLA_XDP_ATTACHED`'s modes, as `ip -j link` shows them.
const XDP_ATTACHED_DRV: u64 = 1;
const XDP_ATTACHED_SKB: u64 = 2;

/// The XDP mode of each interface of namespace `ns` that has an XDP program.
fn xdp_modes(ns: &str) -> BTreeMap<String, u64> {
    let out =
        exposure_lab::netns::run("ip", &["-n", ns, "-j", "link", "show"]).expect("ip -j link show");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ip's JSON");
    links
        .iter()
        .filter_map(|l| {
            let mode = l.get("xdp")?.get("mode")?.as_u64()?;
            Some((l.get("ifname")?.as_str()?.to_string(), mode))
        })
        .collect()
}

/// The interfaces of namespace `ns` that have an XDP program attached.
fn with_xdp(ns: &str) -> BTreeSet<String> {
    xdp_modes(ns).into_keys().collect()
}

/// `--iface auto` attaches where Cilium's device detection would: to the node's network (here a
/// macvlan on a second link, as on a host whose NIC carries macvlans), not to a bridge, a VXLAN
/// tunnel, a tap or a veth without a default route (the lab's own eth0 is one, so an earlier
/// run's programs there are detached). A network that appears later is served within a tick, and
/// `auto` goes with names.
#[test]
fn auto_attaches_to_the_nodes_networks_and_follows_new_ones() {
    let mut c = Cluster::start(&[2], &[("hello.yaml", hello_world(&all_pods(&[2])))]);
    let everyone = pods_named(&["pod-1-1", "pod-1-2"]);
    let ns = c.lab.nodes[0].ns.name().to_string();
    let node = |cmd: &str| {
        let mut args = vec!["-n", ns.as_str()];
        args.extend(cmd.split_whitespace());
        exposure_lab::netns::run("ip", &args).map(drop)
    };
    let front = exposure_lab::netns::Netns::create(&format!("{}-front", c.lab.prefix)).unwrap();
    node(&format!(
        "link add lan1 type veth peer name eth0 netns {}",
        front.name()
    ))
    .unwrap();
    for cmd in [
        "link add mv1 link lan1 type macvlan mode bridge",
        "addr add 198.18.200.10/24 dev mv1",
        // Decoys, each with an address of its own network.
        "link add br9 type bridge",
        "addr add 198.18.201.10/24 dev br9",
        "link add vx9 type vxlan id 9 dstport 4789 dev lan1",
        "addr add 198.18.202.10/24 dev vx9",
        "link add vt9 type veth peer name vt9p",
        "addr add 198.18.203.10/24 dev vt9",
        "tuntap add tp9 mode tap",
        "addr add 198.18.204.10/24 dev tp9",
    ] {
        node(cmd).unwrap();
    }
    // lan1 holds no address: only the macvlans answer ARP for theirs (by default any interface
    // answers for all the node's addresses, and the client's frames would go to lan1's MAC).
    c.lab.nodes[0]
        .ns
        .exec("sysctl", &["-qw", "net.ipv4.conf.lan1.arp_ignore=1"])
        .unwrap();
    for l in ["lan1", "mv1", "br9", "vx9", "vt9", "vt9p", "tp9"] {
        node(&format!("link set {l} up")).unwrap();
    }
    // The client leaves its checksums to the device (a veth's default): partial ones reach mv1.
    front.ip("addr add 198.18.200.1/24 dev eth0").unwrap();
    front.ip("link set eth0 up").unwrap();
    let ifaces =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    assert_eq!(with_xdp(&ns), ifaces(&["eth0"]), "--iface eth0 first");

    c.agents[0].stop();
    c.agent_flags = vec!["--iface".into(), "auto".into()];
    c.start_agent(0);
    assert_eq!(with_xdp(&ns), ifaces(&["mv1"]));
    let status = status_json(&c, 0);
    assert_eq!(status["interfaces"], serde_json::json!(["mv1"]), "{status}");
    // A macvlan has no native XDP.
    assert_eq!(status["generic_xdp_interfaces"], serde_json::json!(["mv1"]));
    assert!(c.agents[0]
        .log_text()
        .contains("--iface does not select it now"));
    let front_spread = |to: SocketAddr, client: &str| {
        let mut pods = BTreeSet::new();
        for _ in 0..apps::SPREAD_MIN {
            let answer = apps::tcp_ask(&front, to).ok()?;
            let (pod, peer) = parse_answer(&answer)?;
            assert_eq!(peer.ip().to_string(), client, "the client's address");
            pods.insert(pod.to_string());
        }
        Some(pods)
    };
    let nodeport_on_mv1 = SocketAddr::from(([198, 18, 200, 10], 30600));
    assert_eq!(
        front_spread(nodeport_on_mv1, "198.18.200.1"),
        Some(everyone.clone())
    );
    // eth0 has no programs now: its NodePort reaches the node's stack, which has no listener.
    assert_refused(&apps::tcp_ask(&c.lab.client, c.node(0, 30600)).unwrap_err());

    // A network that comes later.
    node("link add mv2 link lan1 type macvlan mode bridge").unwrap();
    node("addr add 198.18.205.10/24 dev mv2").unwrap();
    node("link set mv2 up").unwrap();
    front.ip("addr add 198.18.205.1/24 dev eth0").unwrap();
    let nodeport_on_mv2 = SocketAddr::from(([198, 18, 205, 10], 30600));
    c.eventually("mv2 attached and its NodePort served", || {
        with_xdp(&ns).contains("mv2") && front_spread(nodeport_on_mv2, "198.18.205.1").is_some()
    });
    assert!(c.agents[0]
        .log_text()
        .lines()
        .any(|l| l.contains("newly selected by --iface") && l.contains("\"mv2\"")));

    assert_eq!(
        status_json(&c, 0)["generic_xdp_interfaces"],
        serde_json::json!(["mv1", "mv2"])
    );

    // `auto` and a name: eth0 again (native), beside the detected ones; mv2, deleted while no
    // agent ran, is no longer marked.
    c.agents[0].stop();
    node("link del mv2").unwrap();
    c.agent_flags = vec!["--iface".into(), "auto,eth0".into()];
    c.start_agent(0);
    assert_eq!(with_xdp(&ns), ifaces(&["eth0", "mv1"]));
    let [eth0, mv1] = ["eth0", "mv1"].map(|name| {
        c.lab.nodes[0]
            .ns
            .run(move || nix::net::if_::if_nametoindex(name))
            .unwrap()
            .unwrap()
    });
    let marks =
        aya::maps::MapData::from_pin(pin_dir(&c.lab.prefix, &c.lab.nodes[0]).join("XDP_IFACES"))
            .unwrap();
    let marks: aya::maps::HashMap<_, u32, u8> = aya::maps::Map::HashMap(marks).try_into().unwrap();
    let marked: BTreeMap<u32, u8> = marks.iter().map(Result::unwrap).collect();
    assert_eq!(
        marked,
        BTreeMap::from([
            (eth0, exposure_common::XDP_MODE_NATIVE),
            (mv1, exposure_common::XDP_MODE_GENERIC)
        ])
    );
    assert_eq!(c.tcp_spread(c.node(0, 30600), 0).0, everyone);
    assert_eq!(
        front_spread(nodeport_on_mv1, "198.18.200.1"),
        Some(everyone.clone())
    );
}

#[test]
fn traffic_that_is_not_for_a_service_is_untouched() {
    let c = Cluster::start(&[1, 1], &[("hello.yaml", hello_world(&all_pods(&[1, 1])))]);
    // A server on node-1 itself (like sshd or the kubelet), on TCP and UDP.
    let _host = apps::serve(&c.lab.nodes[0].ns, 8080, "node-1-host").unwrap();
    let answer = apps::tcp_ask(&c.lab.client, c.node(0, 8080)).unwrap();
    let (who, peer) = parse_answer(&answer).unwrap();
    assert_eq!(
        (who, peer.ip()),
        ("node-1-host", CLIENT),
        "reaches the node's own server, unchanged"
    );
    assert!(apps::udp_ask(&c.lab.client, c.node(0, 8080))
        .unwrap()
        .starts_with("node-1-host "));
    // ICMP and ARP (ping resolves the neighbour) pass too.
    c.lab
        .client
        .exec(
            "ping",
            &["-c", "2", "-W", "2", &c.lab.nodes[0].ip.to_string()],
        )
        .expect("ping the node");
    // A port no Service uses reaches the node's own stack, which refuses it.
    let err = apps::tcp_ask(&c.lab.client, c.node(0, 31999)).expect_err("nothing listens");
    assert_refused(&err);
    // And the Service still works beside all that.
    assert!(apps::tcp_ask(&c.lab.client, c.node(0, 30600)).is_ok());
}

#[test]
fn held_connections_survive_endpoint_changes_and_agent_restarts() {
    let pods = all_pods(&[2, 2]);
    let mut c = Cluster::start(&[2, 2], &[("hello.yaml", hello_world(&pods))]);
    let mut held = local_and_remote(|| {
        let mut s = TcpSession::connect(&c.lab.client, c.node(0, 30600)).unwrap();
        let pod = parse_answer(&s.ask("hi").unwrap()).unwrap().0.to_string();
        (s, pod)
    });

    // Remove both held pods' endpoints: their connections keep going, new ones avoid them.
    let gone: Vec<String> = held.iter().map(|(_, p)| p.clone()).collect();
    c.write("hello.yaml", &hello_world(&without(&pods, &gone)));
    c.eventually("removed endpoints get no new flows", || {
        let (pods, _) = c.tcp_spread(c.node(0, 30600), 12);
        pods.is_disjoint(&gone.iter().cloned().collect())
    });
    for (s, pod) in held.iter_mut() {
        let again = s
            .ask("still there?")
            .expect("held connection survives the endpoint change");
        assert_eq!(parse_answer(&again).unwrap().0, pod);
    }

    // Restart node-1's agent: the datapath and its flows stay.
    c.agents[0].stop();
    for (s, pod) in held.iter_mut() {
        let again = s
            .ask("agent is down")
            .expect("held connection survives while the agent is away");
        assert_eq!(parse_answer(&again).unwrap().0, pod);
    }
    c.start_agent(0);
    for (s, pod) in held.iter_mut() {
        let again = s
            .ask("agent is back")
            .expect("held connection survives the restart");
        assert_eq!(parse_answer(&again).unwrap().0, pod);
    }
    let (pods, _) = c.tcp_spread(c.node(0, 30600), 12);
    assert!(
        pods.is_disjoint(&gone.iter().cloned().collect()),
        "restart resurrected removed endpoints: {pods:?}"
    );
}

/// NodePort 30053/UDP ("dns") with `endpoints` on port 50000.
fn dns_echo(endpoints: &[(Ipv4Addr, String)]) -> String {
    let ports = "  - {name: udp, protocol: UDP, port: 53, targetPort: 50000, nodePort: 30053}\n";
    service("dns", "NodePort", ports, "")
        + "---\n"
        + &slice(
            "dns",
            "- {name: udp, protocol: UDP, port: 50000}\n",
            endpoints,
        )
}

/// `--flow-timeout-udp` reaches the datapath: a query-and-answer flow is over after it, so the
/// same socket's next query starts a new flow (with the default 30 s it would still be the old).
#[test]
fn a_udp_flow_ends_after_the_configured_timeout() {
    let c = Cluster::start_with(
        &[1, 1],
        &[("dns.yaml", dns_echo(&all_pods(&[1, 1])))],
        &["--flow-timeout-udp", "2s"],
    );
    let mut session = UdpSession::connect(&c.lab.client, c.node(0, 30053)).expect("socket");
    let new_flows = || agent_counter(&c, "new_flows");
    session.ask("one").expect("answered");
    let first = new_flows();
    std::thread::sleep(Duration::from_millis(2_500));
    session.ask("two").expect("answered");
    assert_eq!(new_flows(), first + 1.0, "a new flow after 2 s");
}

#[test]
fn udp_clients_move_on_when_their_endpoint_is_removed() {
    let echo = dns_echo;
    let pods = all_pods(&[2, 2]);
    let c = Cluster::start(&[2, 2], &[("dns.yaml", echo(&pods))]);
    let mut held = local_and_remote(|| {
        let mut s = UdpSession::connect(&c.lab.client, c.node(0, 30053)).unwrap();
        let pod = parse_answer(&s.ask("hi").unwrap()).unwrap().0.to_string();
        (s, pod)
    });

    // Their endpoints go (the pods themselves keep answering, so only the datapath can tell).
    let gone: Vec<String> = held.iter().map(|(_, p)| p.clone()).collect();
    c.write("dns.yaml", &echo(&without(&pods, &gone)));
    c.eventually("removed endpoints get no new flows", || {
        c.udp_spread(c.node(0, 30053), 12)
            .is_disjoint(&gone.iter().cloned().collect())
    });
    // The same sockets, same flows: answered by the endpoints that remain, from the Service.
    for (s, pod) in held.iter_mut() {
        let answer = s.ask("still there?").expect("the flow is answered");
        let (now, _) = parse_answer(&answer).unwrap();
        assert!(
            !gone.iter().any(|g| g == now),
            "datagrams of {pod}'s flow still go to a removed endpoint: {answer}"
        );
    }
}

/// UDP datagrams above the MTU (a large DNS answer, RADIUS with certificates) cross the node as IP
/// fragments both ways, over IPv4 and IPv6: each fragment is translated, the later ones by the
/// ports of their first.
#[test]
fn udp_datagrams_above_the_mtu_reach_local_and_remote_pods_and_come_back_whole() {
    use exposure_lab::lab::CLIENT_IP6;
    let c = Cluster::start(&[1, 1], &[("hello.yaml", hello_dual_stack(&[1, 1]))]);
    let node = &c.lab.nodes[0];
    for (to, client, snat) in [
        (c.node(0, 30600), CLIENT, IpAddr::V4(node.ip)),
        (
            SocketAddr::from((node.ip6, 30600)),
            IpAddr::V6(CLIENT_IP6),
            IpAddr::V6(node.ip6),
        ),
    ] {
        let held = local_and_remote(|| {
            let mut s = UdpSession::connect(&c.lab.client, to).unwrap();
            // 4,000 bytes: three fragments on the lab's 1,500-byte MTU.
            let answer = s
                .ask_big(4000)
                .unwrap_or_else(|e| panic!("a 4,000-byte datagram to {to}: {e:#}"));
            let (pod, peer) = parse_answer(&answer).expect("answer format");
            let pod = pod.to_string();
            ((s, peer.ip()), pod)
        });
        for ((mut s, seen), pod) in held {
            let expected = if pod.starts_with("pod-1-") {
                client
            } else {
                snat
            };
            assert_eq!(seen, expected, "the address {pod} saw via {to}");
            // The same flow again, and a datagram of 60,000 bytes (41 fragments).
            for bytes in [4000, 60_000] {
                let answer = s
                    .ask_big(bytes)
                    .unwrap_or_else(|e| panic!("{bytes} bytes to {to}: {e:#}"));
                assert_eq!(parse_answer(&answer).unwrap().0, pod);
            }
        }
    }
}

#[test]
fn node_manifests_give_zones_and_hinted_endpoints_stay_in_them() {
    let pods = all_pods(&[2, 2]);
    // Each endpoint hinted for its own node's zone (PreferClose), and a Node per zone.
    let zone = |node: &str| if node == "node-1" { "zone-a" } else { "zone-b" };
    let hinted: String = hello_world(&pods)
        .lines()
        .map(|l| match l.strip_prefix("  nodeName: ") {
            Some(node) => format!("{l}\n  hints: {{forZones: [{{name: {}}}]}}\n", zone(node)),
            None => format!("{l}\n"),
        })
        .collect();
    let nodes: String = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}, labels: {{topology.kubernetes.io/zone: {}}}}}\n",
                zone(n)
            )
        })
        .collect();
    let c = Cluster::start(&[2, 2], &[("hello.yaml", hinted), ("nodes.yaml", nodes)]);
    let (via_1, _) = c.tcp_spread(c.node(0, 30600), 30);
    assert_eq!(via_1, pods_named(&["pod-1-1", "pod-1-2"]));
    let (via_2, _) = c.tcp_spread(c.node(1, 30600), 30);
    assert_eq!(via_2, pods_named(&["pod-2-1", "pod-2-2"]));
    // Without the Nodes, no zones: hints are not used.
    c.write("nodes.yaml", "");
    c.eventually("every pod again without zones", || {
        c.tcp_spread(c.node(0, 30600), 40).0
            == pods_named(&["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"])
    });
}

/// Sessions opened through node-1 (`open` gives one and the pod that answered it) until one is
/// with a pod of node-1 (local) and one with a pod of node-2 (remote).
fn local_and_remote<S>(mut open: impl FnMut() -> (S, String)) -> Vec<(S, String)> {
    let mut held: Vec<(S, String)> = Vec::new();
    for _ in 0..40 {
        let (s, pod) = open();
        let local = pod.starts_with("pod-1-");
        if !held.iter().any(|(_, p)| p.starts_with("pod-1-") == local) {
            held.push((s, pod));
        }
        if held.len() == 2 {
            break;
        }
    }
    assert_eq!(held.len(), 2, "found a local and a remote backend");
    held
}

/// `pods` without the ones named in `gone`.
fn without(pods: &[(Ipv4Addr, String)], gone: &[String]) -> Vec<(Ipv4Addr, String)> {
    pods.iter()
        .filter(|(ip, _)| !gone.contains(&pod_name(*ip)))
        .cloned()
        .collect()
}

fn pod_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("pod-{}-{}", o[2], o[3] - 1)
}

/// A Service removed while connections through it are open: they go on to their pods (as
/// kube-proxy's conntrack keeps them), new connections are refused by the node as at any port
/// nothing serves, and once the connections have ended the agent removes the frontend. The
/// Service, added again, is served again.
#[test]
fn connections_through_a_removed_service_go_on_until_they_end() {
    let hello = hello_world(&all_pods(&[1, 1]));
    let flags = ["--flow-timeout-tcp-closing", "2s"];
    let c = Cluster::start_with(&[1, 1], &[("hello.yaml", hello.clone())], &flags);
    let to = c.node(0, 30600);
    // One connection to each pod (node-1's own and node-2's), held.
    let mut held: BTreeMap<String, TcpSession> = BTreeMap::new();
    for _ in 0..apps::SPREAD_MIN {
        let mut s = TcpSession::connect(&c.lab.client, to).unwrap();
        let pod = parse_answer(&s.ask("hi").unwrap()).unwrap().0.to_string();
        held.entry(pod).or_insert(s);
        if held.len() == 2 {
            break;
        }
    }
    assert_eq!(held.len(), 2, "a connection to each pod");

    std::fs::remove_file(c.manifests.join("hello.yaml")).unwrap();
    let frontend = format!("{to}/TCP");
    let logged = |what: &str| {
        let log = c.agents[0].log_text();
        log.lines()
            .any(|l| l.contains(&frontend) && l.contains(what))
    };
    c.eventually("new connections are refused", || {
        apps::tcp_ask(&c.lab.client, to).is_err()
    });
    for (pod, s) in held.iter_mut() {
        let answer = s.ask("still there?").expect("the held connection goes on");
        assert_eq!(parse_answer(&answer).unwrap().0, pod);
    }
    assert!(logged("draining"), "{}", c.agents[0].log_text());
    // The NodePort, and the LB address until a check finds no flow through it (TCP: UDP's
    // frontends go at once).
    let draining = metric(&c, 0, "exposure_frontends_draining").unwrap_or(0.0);
    assert!((1.0..=2.0).contains(&draining), "{draining} draining");
    assert!(
        !logged("drained"),
        "drained while connections went through it"
    );
    for (_, s) in held {
        s.finish().expect("closed both ways");
    }
    c.eventually("the frontend goes once its connections have", || {
        logged("drained")
    });
    assert_eq!(metric(&c, 0, "exposure_frontends_draining"), Some(0.0));
    assert!(apps::tcp_ask(&c.lab.client, to).is_err());

    c.write("hello.yaml", &hello);
    c.eventually("served again", || apps::tcp_ask(&c.lab.client, to).is_ok());
    let (pods, _) = c.tcp_spread(to, 20);
    assert_eq!(pods, pods_named(&["pod-1-1", "pod-2-1"]));
}

#[test]
fn broken_manifests_are_reported_and_do_not_disturb_the_rest() {
    let broken_yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n".to_string();
    let invalid_object = service(
        "bad-port",
        "NodePort",
        "  - {protocol: TCP, port: 80, nodePort: 99999}\n",
        "",
    );
    let mut c = Cluster::start(
        &[1, 1],
        &[
            ("hello.yaml", hello_world(&all_pods(&[1, 1]))),
            ("broken.yaml", broken_yaml),
            ("bad.yaml", invalid_object),
        ],
    );
    let (pods, _) = c.tcp_spread(c.node(0, 30600), 20);
    assert_eq!(pods, pods_named(&["pod-1-1", "pod-2-1"]));
    let log = c.agents[0].log_text();
    assert!(
        log.contains("broken.yaml") && log.contains("not valid YAML"),
        "log names the file and reason:\n{log}"
    );
    assert!(
        log.contains("default/bad-port") && log.contains("99999"),
        "log names the object and reason:\n{log}"
    );

    // While running: a new broken file and a new good Service arrive together.
    c.write("worse.yaml", "{{{{");
    let eps = [(exposure_lab::lab::pod_ip(1, 0), "node-2")];
    c.write(
        "second.yaml",
        &(service(
            "second",
            "NodePort",
            "  - {protocol: TCP, port: 81, targetPort: 50000, nodePort: 30681}\n",
            "",
        ) + "---\n"
            + &slice(
                "second",
                "- {name: \"\", protocol: TCP, port: 50000}\n",
                &eps,
            )),
    );
    c.eventually("the new Service is served", || {
        apps::tcp_ask(&c.lab.client, c.node(0, 30681)).is_ok()
    });
    let (pods, _) = c.tcp_spread(c.node(0, 30600), 20);
    assert_eq!(
        pods,
        pods_named(&["pod-1-1", "pod-2-1"]),
        "the first Service is undisturbed"
    );

    // hello.yaml breaks while a connection through it is open: caught half-written, then with
    // its Service made invalid. Each is reported, and the Service goes on as it was.
    let mut held = TcpSession::connect(&c.lab.client, c.node(0, 30600)).unwrap();
    let pod = parse_answer(&held.ask("hi").unwrap())
        .unwrap()
        .0
        .to_string();
    let hello = hello_world(&all_pods(&[1, 1]));
    let half_written = hello[..hello.find("nodePort").unwrap()].to_string();
    let invalid = hello.replace("port: 60000", "port: sixty");
    for (broken, reason, kept) in [
        (
            half_written,
            "not valid YAML",
            "what the file gave before stays in use",
        ),
        (
            invalid,
            "invalid Service",
            "its last valid version stays in use",
        ),
    ] {
        c.write("hello.yaml", &broken);
        let reported = || {
            let log = c.agents[0].log_text();
            log.lines()
                .find(|l| l.contains("hello.yaml") && l.contains(reason))
                .map(str::to_owned)
        };
        c.eventually("the broken hello.yaml is reported", || reported().is_some());
        let again = held
            .ask("still there?")
            .expect("the held connection goes on");
        assert_eq!(parse_answer(&again).unwrap().0, pod);
        let (pods, _) = c.tcp_spread(c.node(0, 30600), 20);
        assert_eq!(pods, pods_named(&["pod-1-1", "pod-2-1"]), "{reason}");
        let line = reported().unwrap_or_default();
        assert!(line.contains(kept), "{line}");
    }

    // `exposure status` shows both from the pinned maps.
    let out = std::process::Command::new(BIN)
        .args(["status", "--pin-dir"])
        .arg(pin_dir(&c.lab.prefix, &c.lab.nodes[0]))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("198.18.0.10:30600/TCP") && table.contains("198.18.0.10:30681/TCP"),
        "{table}"
    );
    assert!(table.contains("198.19.1.2:50000 (local)"), "{table}");
    // And as JSON, for scripts.
    let out = std::process::Command::new(BIN)
        .args(["status", "-o", "json", "--pin-dir"])
        .arg(pin_dir(&c.lab.prefix, &c.lab.nodes[0]))
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let frontend = json["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "198.18.0.10:30681/TCP")
        .expect("the new Service's NodePort");
    assert_eq!(frontend["kind"], "NodePort");
    assert_eq!(
        frontend["backends"],
        serde_json::json!([{"address": "198.19.2.2", "port": 50000, "local": false}])
    );
    assert!(
        json["counters"]["new_flows"].as_u64().unwrap() > 0,
        "{json}"
    );
    c.agents.truncate(0);
}

#[test]
fn remote_backends_work_when_the_node_has_not_resolved_its_neighbours_yet() {
    let eps: Vec<(Ipv4Addr, String)> = all_pods(&[0, 2]);
    let c = Cluster::start(&[0, 2], &[("hello.yaml", hello_world(&eps))]);
    c.lab.nodes[0].ns.ip("neigh flush all").unwrap();
    // The first SYN finds no neighbour for node-2; the agent has the kernel resolve it, and the
    // client's retransmit (1 s later, inside the 3 s client timeout) gets through.
    let (pods, seen) = c.tcp_spread(c.node(0, 30600), 10);
    assert_eq!(pods, pods_named(&["pod-2-1", "pod-2-2"]));
    assert_eq!(seen, BTreeSet::from([IpAddr::V4(c.lab.nodes[0].ip)]));
}

fn hello_with_conditions(endpoints: &[(Ipv4Addr, &str, &str)]) -> String {
    let mut eps = String::new();
    for (ip, node, conditions) in endpoints {
        eps += &format!("- addresses: [{ip}]\n  conditions: {conditions}\n  nodeName: {node}\n");
    }
    let ports = "  - {name: t, protocol: TCP, port: 60000, targetPort: 50000, nodePort: 30600}\n  - {name: u, protocol: UDP, port: 60000, targetPort: 50000, nodePort: 30600}\n";
    service("hello-world", "NodePort", ports, "")
        + "---\n"
        + &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hello-world-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: hello-world\naddressType: IPv4\nports:\n- {{name: t, protocol: TCP, port: 50000}}\n- {{name: u, protocol: UDP, port: 50000}}\nendpoints:\n{eps}"
        )
}

#[test]
fn terminating_endpoints_keep_their_flows_and_serve_only_when_nothing_is_ready() {
    const READY: &str = "{ready: true, serving: true, terminating: false}";
    const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
    const GONE: &str = "{ready: false, serving: false, terminating: true}";
    let (a, b) = (
        exposure_lab::lab::pod_ip(0, 0),
        exposure_lab::lab::pod_ip(0, 1),
    );
    let mut c = Cluster::start(
        &[2, 0],
        &[(
            "hello.yaml",
            hello_with_conditions(&[(a, "node-1", READY), (b, "node-1", READY)]),
        )],
    );
    let mut held = TcpSession::connect(&c.lab.client, c.node(0, 30600)).unwrap();
    let held_pod = parse_answer(&held.ask("hi").unwrap())
        .unwrap()
        .0
        .to_string();
    let (term_ip, other_pod) = if held_pod == "pod-1-1" {
        (a, "pod-1-2")
    } else {
        (b, "pod-1-1")
    };
    let other_ip = if term_ip == a { b } else { a };
    // A UDP session (a stream: a game, QUIC, a tunnel) with the same pod.
    let mut udp = (0..apps::SPREAD_MIN)
        .map(|_| UdpSession::connect(&c.lab.client, c.node(0, 30600)).unwrap())
        .find_map(|mut s| {
            let pod = parse_answer(&s.ask("hi").ok()?)?.0.to_string();
            (pod == held_pod).then_some(s)
        })
        .expect("a UDP session with the held connection's pod");

    // The held connection's pod starts terminating: its flow goes on, new flows go elsewhere.
    c.write(
        "hello.yaml",
        &hello_with_conditions(&[
            (term_ip, "node-1", TERMINATING),
            (other_ip, "node-1", READY),
        ]),
    );
    c.eventually("new flows avoid the terminating endpoint", || {
        c.tcp_spread(c.node(0, 30600), 12).0 == pods_named(&[other_pod])
    });
    assert_eq!(
        parse_answer(&held.ask("still?").unwrap()).unwrap().0,
        held_pod
    );
    // The UDP session too: its pod still serves (kube-proxy deletes UDP conntrack entries only
    // for endpoints that stop serving).
    assert_eq!(
        parse_answer(&udp.ask("still?").unwrap()).unwrap().0,
        held_pod
    );

    // Nothing ready any more: the serving terminating endpoint takes new flows (kube-proxy's rule).
    c.write(
        "hello.yaml",
        &hello_with_conditions(&[(term_ip, "node-1", TERMINATING), (other_ip, "node-1", GONE)]),
    );
    c.eventually("falls back to serving terminating endpoints", || {
        c.tcp_spread(c.node(0, 30600), 12).0 == pods_named(&[held_pod.as_str()])
    });
    // The UDP session's pod stops serving while the other is ready again: the session moves.
    c.write(
        "hello.yaml",
        &hello_with_conditions(&[(term_ip, "node-1", GONE), (other_ip, "node-1", READY)]),
    );
    c.eventually("the UDP session moves once its pod stops serving", || {
        udp.ask("moved?")
            .ok()
            .and_then(|a| Some(parse_answer(&a)?.0 == other_pod))
            .unwrap_or(false)
    });
    c.agents.truncate(0);
}

/// GET `path` from inside the client namespace: (status, body).
fn http_get(c: &Cluster, to: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let path = path.to_string();
    c.lab
        .client
        .run(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&to, apps::IO_TIMEOUT).expect("connect");
            s.set_read_timeout(Some(apps::IO_TIMEOUT)).unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes())
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            let code = out
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (
                code,
                out.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default(),
            )
        })
        .unwrap()
}

#[test]
fn health_check_node_port_tells_load_balancers_which_nodes_have_local_endpoints() {
    let manifest = service(
        "web",
        "LoadBalancer",
        "  - {protocol: TCP, port: 80, targetPort: 50000, nodePort: 30080}\n",
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1}]\n",
    ) + "---\n"
        + &slice("web", "- {name: \"\", protocol: TCP, port: 50000}\n", &[(exposure_lab::lab::pod_ip(0, 0), "node-1")]);
    let c = Cluster::start(&[1, 1], &[("web.yaml", manifest.clone())]);
    let (code, body) = http_get(&c, c.node(0, 32000), "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"localEndpoints\": 1") && body.contains("\"name\": \"web\""),
        "{body}"
    );
    let (code, body) = http_get(&c, c.node(1, 32000), "/healthz");
    assert_eq!(code, 503, "node-2 has no local endpoint: {body}");
    // As kube-proxy's sync_proxy_rules_no_local_endpoints_total.
    let no_local = r#"exposure_no_local_endpoints{traffic_policy="external"}"#;
    assert_eq!(
        (metric(&c, 0, no_local), metric(&c, 1, no_local)),
        (Some(0.0), Some(1.0))
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let synced = metric(&c, 1, "exposure_sync_last_timestamp_seconds").unwrap();
    assert!((now - 120.0..=now).contains(&synced), "{synced} vs {now}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    // Load balancers in front of a dual-stack cluster may check over IPv6: same answers.
    let over_v6 = |n: usize| {
        http_get(
            &c,
            SocketAddr::from((c.lab.nodes[n].ip6, 32000)),
            "/healthz",
        )
        .0
    };
    assert_eq!((over_v6(0), over_v6(1)), (200, 503));
    // And the Service itself, through the node that has the endpoint, keeps the client address.
    let (pods, seen) = c.tcp_spread(c.node(0, 30080), 5);
    assert_eq!(
        (pods, seen),
        (pods_named(&["pod-1-1"]), BTreeSet::from([CLIENT]))
    );

    // A port another process holds (kube-proxy's, when it runs beside): retried at every sync,
    // reported once.
    let held = c.lab.nodes[0]
        .ns
        .run(|| std::net::TcpListener::bind("[::]:32001"))
        .unwrap()
        .unwrap();
    let log = || c.agents[0].log_text();
    for round in 0..3 {
        let synced = log().matches("synced").count();
        let moved = manifest.replacen("32000", "32001", 1).replacen(
            "namespace: default\n",
            &format!("namespace: default\n  annotations: {{round: \"{round}\"}}\n"),
            1,
        );
        c.write("web.yaml", &moved);
        c.eventually("a sync", || log().matches("synced").count() > synced);
    }
    let warnings = log().matches("healthCheckNodePort 32001").count();
    assert_eq!(warnings, 1, "{}", log());
    assert_eq!(
        http_get(&c, c.node(1, 32001), "/healthz").0,
        503,
        "node-2 took the port"
    );
    drop(held);
}

#[test]
fn client_ip_session_affinity_keeps_a_client_on_one_pod() {
    let eps = all_pods(&[2, 2]);
    let manifest = service(
        "sticky",
        "NodePort",
        "  - {protocol: TCP, port: 80, targetPort: 50000, nodePort: 30090}\n",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
    ) + "---\n"
        + &slice(
            "sticky",
            "- {name: \"\", protocol: TCP, port: 50000}\n",
            &eps,
        );
    let c = Cluster::start(&[2, 2], &[("sticky.yaml", manifest)]);
    for n in 0..2 {
        let (pods, _) = c.tcp_spread(c.node(n, 30090), 20);
        assert_eq!(
            pods.len(),
            1,
            "via node-{}: one client, one pod: {pods:?}",
            n + 1
        );
        // The node's own sockets (translated at connect, before they have a source address)
        // are one client too.
        let from_node: BTreeSet<String> = (0..20)
            .map(|_| {
                let answer = apps::tcp_ask(&c.lab.nodes[n].ns, c.node(n, 30090))
                    .expect("the node to its NodePort");
                parse_answer(&answer).expect("answer format").0.to_string()
            })
            .collect();
        assert_eq!(
            from_node.len(),
            1,
            "node-{}'s own connections: {from_node:?}",
            n + 1
        );
    }
}

#[test]
fn shared_lb_ip_multi_port_external_ips_and_source_ranges() {
    let eps = [
        (exposure_lab::lab::pod_ip(0, 0), "node-1"),
        (exposure_lab::lab::pod_ip(1, 0), "node-2"),
    ];
    let both_ports =
        "- {name: t, protocol: TCP, port: 50000}\n- {name: u, protocol: UDP, port: 50000}\n";
    let lb = "status:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1}]\n";
    // Two Services on one LB address: `open` (TCP and UDP on port 80) admits the lab's LAN, `closed`
    // (port 81) admits only a network the client is not in.
    let open = service(
        "open",
        "LoadBalancer",
        "  - {name: t, protocol: TCP, port: 80, targetPort: 50000, nodePort: 30081}\n  - {name: u, protocol: UDP, port: 80, targetPort: 50000, nodePort: 30081}\n",
        &format!("  loadBalancerSourceRanges: [198.18.0.0/28]\n{lb}"),
    ) + "---\n"
        + &slice("open", both_ports, &eps);
    let closed = service(
        "closed",
        "LoadBalancer",
        "  - {name: t, protocol: TCP, port: 81, targetPort: 50000, nodePort: 30082}\n",
        &format!("  loadBalancerSourceRanges: [198.18.5.0/24]\n{lb}"),
    ) + "---\n"
        + &slice("closed", "- {name: t, protocol: TCP, port: 50000}\n", &eps);
    let external = service(
        "external",
        "ClusterIP",
        "  - {name: t, protocol: TCP, port: 82, targetPort: 50000}\n",
        "  externalIPs: [198.18.100.2]\n",
    ) + "---\n"
        + &slice(
            "external",
            "- {name: t, protocol: TCP, port: 50000}\n",
            &eps,
        );
    let c = Cluster::start(
        &[1, 1],
        &[
            ("open.yaml", open),
            ("closed.yaml", closed),
            ("external.yaml", external),
        ],
    );
    let both = pods_named(&["pod-1-1", "pod-2-1"]);
    let lb1 = |port| SocketAddr::from((lb_ip(1), port));
    assert_eq!(
        c.tcp_spread(lb1(80), 30).0,
        both,
        "TCP on the shared LB address"
    );
    assert_eq!(c.udp_spread(lb1(80), 30), both, "UDP on the same port");
    assert!(
        apps::tcp_ask(&c.lab.client, lb1(81)).is_err(),
        "source not in the other Service's ranges"
    );
    assert!(agent_counter(&c, "dropped_source_range") >= 1.0);
    // The restricted Service's NodePort is open to anyone, as with kube-proxy.
    assert_eq!(c.tcp_spread(c.node(0, 30082), 20).0, both);
    assert_eq!(
        c.tcp_spread(SocketAddr::from((Ipv4Addr::new(198, 18, 100, 2), 82)), 30)
            .0,
        both,
        "externalIP"
    );
}

fn agent_counter(c: &Cluster, event: &str) -> f64 {
    metric(
        c,
        0,
        &format!("exposure_datapath_events_total{{event=\"{event}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Packets that node-1's rules in `table`/`chain` whose listing line contains `matching` have
/// counted so far.
fn rule_packets(c: &Cluster, table: &str, chain: &str, matching: &str) -> u64 {
    rule_packets_of(c, "iptables", table, chain, matching)
}

/// [`rule_packets`] of `tool`'s rules (`iptables`, `ip6tables`).
fn rule_packets_of(c: &Cluster, tool: &str, table: &str, chain: &str, matching: &str) -> u64 {
    let out = c.lab.nodes[0]
        .ns
        .exec(tool, &["-w", "-t", table, "-L", chain, "-v", "-x", "-n"])
        .unwrap_or_else(|e| panic!("{tool} -L: {e:#}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(matching))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Packets node-1's netfilter forwarded to its pods' veths so far (a counting rule in FORWARD).
fn forwarded_to_pods(c: &Cluster) -> u64 {
    rule_packets(c, "filter", "FORWARD", "to-pods")
}

/// Packets node-1's netfilter forwarded from its pods' veths so far.
fn forwarded_from_pods(c: &Cluster) -> u64 {
    rule_packets(c, "filter", "FORWARD", "from-pods")
}

/// `exposure status -o json` of node `n`'s agent, run in the node's namespace (where the
/// interfaces are), with the pins in sight.
fn status_json(c: &Cluster, n: usize) -> serde_json::Value {
    let pin_dir = c.agents[n].pin_dir.display().to_string();
    let out = c.lab.nodes[n]
        .ns
        .command(BIN)
        .unwrap()
        .args(["status", "--pin-dir", &pin_dir, "-o", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The pinned links of the pod replies' program under agent `n`'s pin directory.
fn pod_reply_links(c: &Cluster, n: usize) -> usize {
    std::fs::read_dir(c.agents[n].pin_dir.join("links"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pod-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn redirect_to_pods_serves_local_pods_past_the_nodes_stack() {
    // From tc ingress into the pod's namespace: the pod's side of the veth needs nothing (GRO off,
    // no XDP), where an XDP redirect would lose every frame.
    redirect_to_pods_serves_local_pods(&["--redirect-to-pods", "vp"], false);
}

#[test]
fn xdp_redirect_to_pods_serves_local_pods_past_the_nodes_stack() {
    // Redirected frames need the pod side of the veth to run NAPI (here: GRO on).
    redirect_to_pods_serves_local_pods(&["--xdp-redirect-to-pods", "vp"], true);
}

fn redirect_to_pods_serves_local_pods(flags: &[&str], pod_gro: bool) {
    let eps = all_pods(&[2, 1]);
    let ports = "  - {name: tcp, protocol: TCP, port: 7, targetPort: 50000, nodePort: 30700}\n  - {name: udp, protocol: UDP, port: 7, targetPort: 50000, nodePort: 30700}\n";
    let manifest = service("echo", "NodePort", ports, "")
        + "---\n"
        + &slice(
            "echo",
            "- {name: tcp, protocol: TCP, port: 50000}\n- {name: udp, protocol: UDP, port: 50000}\n",
            &eps,
        );
    let c = Cluster::start_with(&[2, 1], &[("echo.yaml", manifest)], flags);
    for (_, pod) in c.lab.pods() {
        let gro = if pod_gro { "on" } else { "off" };
        pod.ns
            .exec("ethtool", &["-K", "eth0", "gro", gro])
            .expect("ethtool");
    }
    let node = &c.lab.nodes[0].ns;
    for (dir, name) in [("-o", "to-pods"), ("-i", "from-pods")] {
        node.exec(
            "iptables",
            &[
                "-w",
                "-A",
                "FORWARD",
                dir,
                "vp+",
                "-m",
                "comment",
                "--comment",
                name,
            ],
        )
        .expect("a counting rule");
    }
    // The masquerade of pods' traffic leaving the pod network that flannel (`--ip-masq`) and
    // Calico (`natOutgoing`) install: the pods' replies to a flow the node's netfilter never saw
    // begin would be taken for new connections of theirs and SNATed to the node's address.
    node.exec(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "198.19.0.0/16",
            "!",
            "-d",
            "198.19.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    )
    .expect("a masquerade rule");
    let everyone = pods_named(&["pod-1-1", "pod-1-2", "pod-2-1"]);
    let (tcp, seen) = c.tcp_spread(c.node(0, 30700), 60);
    assert_eq!(tcp, everyone);
    assert_eq!(
        seen,
        BTreeSet::from([CLIENT, IpAddr::V4(c.lab.nodes[0].ip)]),
        "local pods still see the client"
    );
    assert_eq!(c.udp_spread(c.node(0, 30700), 40), everyone);
    // The first flows may go through the stack while the node learns the pods' neighbours; later
    // ones are sent straight to the pods' interfaces.
    c.eventually("local flows redirected to the pods' interfaces", || {
        c.udp_spread(c.node(0, 30700), 10);
        agent_counter(&c, "to_local_backend_redirected") >= 1.0
    });
    assert!(c.agents[0]
        .log_text()
        .contains("pod interfaces for redirect"));
    // Large answers sent back from the pods' interfaces: a TCP stream leaves a pod as GSO,
    // checksum-partial packets; a 60,000-byte datagram as 41 fragments.
    let replies_before = agent_counter(&c, "replies_from_pod_redirected");
    for _ in 0..4 {
        apps::tcp_fetch_bulk(&c.lab.client, c.node(0, 30700), 4 << 20).expect("a TCP stream");
        let mut s = UdpSession::connect(&c.lab.client, c.node(0, 30700)).unwrap();
        let answer = s.ask_big(60_000).expect("a 60,000-byte datagram");
        assert!(parse_answer(&answer).is_some(), "{answer}");
    }
    assert!(agent_counter(&c, "replies_from_pod_redirected") >= replies_before + 41.0);
    // A bridge the prefix also names is left out, and said so: no redirect delivers through one.
    c.lab.nodes[0].ns.ip("link add vpbr0 type bridge").unwrap();
    c.eventually("a bridge named like a pod interface reported", || {
        let log = c.agents[0].log_text();
        log.contains("not a veth") && log.contains("vpbr0")
    });
    // tc ingress has its program (XDP hands packets over to it with `--redirect-to-pods`, and
    // remote flows through a tunnel in any mode).
    let ingress_link = c.agents[0].pin_dir.join("links/tc-ingress-eth0");
    assert!(ingress_link.exists());

    // A connection to a local pod, redirected while the option is on: its packets pass neither
    // the node's routing nor its netfilter ...
    let mut held = (0..40)
        .find_map(|_| {
            let mut s = TcpSession::connect(&c.lab.client, c.node(0, 30700)).ok()?;
            let pod = parse_answer(&s.ask("hi").ok()?)?.0.to_string();
            pod.starts_with("pod-1-").then_some((s, pod))
        })
        .expect("a connection to a local pod");
    let before = agent_counter(&c, "to_local_backend_redirected");
    let replies_before = agent_counter(&c, "replies_from_pod_redirected");
    let forwarded = forwarded_to_pods(&c);
    let forwarded_back = forwarded_from_pods(&c);
    for _ in 0..5 {
        held.0.ask("redirected").expect("held connection answers");
    }
    assert!(agent_counter(&c, "to_local_backend_redirected") >= before + 5.0);
    assert_eq!(
        forwarded_to_pods(&c),
        forwarded,
        "redirected packets went through FORWARD"
    );
    // ... and its replies go back the same way, past the masquerade.
    assert!(agent_counter(&c, "replies_from_pod_redirected") >= replies_before + 5.0);
    assert_eq!(
        forwarded_from_pods(&c),
        forwarded_back,
        "replies went through FORWARD"
    );
    // Each local pod's interface has the replies' program, pinned for the agent's restarts (and
    // `exposure status` names them); a new pod's interface gets it, and a deleted one's pin goes.
    assert_eq!(pod_reply_links(&c, 0), 2);
    let status = status_json(&c, 0);
    assert_eq!(
        status["pod_interfaces"],
        serde_json::json!(["vp1", "vp2"]),
        "{status}"
    );
    node.ip("link add vp9 type veth peer name other9").unwrap();
    c.eventually("a new pod interface gets the replies' program", || {
        pod_reply_links(&c, 0) == 3
    });
    node.ip("link del vp9").unwrap();
    c.eventually("a deleted pod interface's link unpinned", || {
        pod_reply_links(&c, 0) == 2
    });

    // While no agent runs (an upgrade), the pinned programs go on both ways; a new agent with the
    // flag takes them over.
    let mut c = c;
    c.agents[0].stop();
    let forwarded_back = forwarded_from_pods(&c);
    let answer = held.0.ask("agent away").expect("held connection answers");
    assert_eq!(parse_answer(&answer).unwrap().0, held.1);
    assert_eq!(
        forwarded_from_pods(&c),
        forwarded_back,
        "replies past the stack"
    );
    c.start_agent(0);
    held.0.ask("agent back").expect("held connection answers");
    assert_eq!(
        forwarded_from_pods(&c),
        forwarded_back,
        "replies past the stack"
    );
    assert_eq!(pod_reply_links(&c, 0), 2);

    // ... and it keeps working, through the stack, once the agent runs without it; so does
    // everything else.
    c.agents[0].stop();
    c.agent_flags.clear();
    c.start_agent(0);
    let before = agent_counter(&c, "to_local_backend_redirected");
    let forwarded = forwarded_to_pods(&c);
    let again = held.0.ask("after").expect("held connection survives");
    assert_eq!(parse_answer(&again).unwrap().0, held.1);
    assert!(forwarded_to_pods(&c) > forwarded, "back through the stack");
    assert_eq!(c.udp_spread(c.node(0, 30700), 40), everyone);
    assert_eq!(c.tcp_spread(c.node(0, 30700), 30).0, everyone);
    assert_eq!(agent_counter(&c, "to_local_backend_redirected"), before);
    assert!(ingress_link.exists(), "tc ingress kept");
    assert_eq!(pod_reply_links(&c, 0), 0, "the pods' programs detached");
}

#[test]
fn redirected_ipv6_flows_and_their_replies_pass_a_masquerading_node() {
    use exposure_lab::lab::CLIENT_IP6;
    // IPv6 pods on node-1 behind an IPv6 masquerade of their egress (as a dual-stack CNI sets
    // it up): redirected flows' replies must go back past it, as in IPv4.
    let c = Cluster::start_with(
        &[2, 1],
        &[("hello.yaml", hello_dual_stack(&[2, 1]))],
        &["--redirect-to-pods", "vp"],
    );
    let node = &c.lab.nodes[0].ns;
    for rule in [
        "-t nat -A POSTROUTING -s 2001:2:0:1::/64 ! -d 2001:2:0:1::/64 -j MASQUERADE",
        "-A FORWARD -i vp+ -m comment --comment from-pods",
    ] {
        let args: Vec<&str> = std::iter::once("-w").chain(rule.split(' ')).collect();
        node.exec("ip6tables", &args).expect("an ip6tables rule");
    }
    let forwarded_back = || rule_packets_of(&c, "ip6tables", "filter", "FORWARD", "from-pods");
    let node6 = SocketAddr::from((c.lab.nodes[0].ip6, 30600));
    let everyone = pods_named(&["pod-1-1", "pod-1-2", "pod-2-1"]);
    // The first flows may go through the stack while the node learns the pods' neighbours.
    c.eventually("IPv6 replies sent back from the pods' interfaces", || {
        c.udp_spread(node6, 10);
        agent_counter(&c, "replies_from_pod_redirected") >= 1.0
    });
    let (pods, seen) = c.tcp_spread(node6, 60);
    assert_eq!(pods, everyone);
    assert!(seen.contains(&IpAddr::V6(CLIENT_IP6)), "{seen:?}");
    assert_eq!(c.udp_spread(node6, 40), everyone);
    // A held connection to a local pod: its replies skip FORWARD (and the masquerade).
    let mut held = (0..40)
        .find_map(|_| {
            let mut s = TcpSession::connect(&c.lab.client, node6).ok()?;
            let pod = parse_answer(&s.ask("hi").ok()?)?.0.to_string();
            pod.starts_with("pod-1-").then_some(s)
        })
        .expect("a connection to a local pod");
    let (replies, back) = (
        agent_counter(&c, "replies_from_pod_redirected"),
        forwarded_back(),
    );
    for _ in 0..5 {
        held.ask("redirected").expect("held connection answers");
    }
    assert!(agent_counter(&c, "replies_from_pod_redirected") >= replies + 5.0);
    assert_eq!(forwarded_back(), back, "replies went through FORWARD");
}

#[test]
fn icmp_errors_from_backends_reach_the_client() {
    let c = nolisten_cluster(&[]);
    for n in 0..2 {
        assert_udp_refused(&c, c.node(n, 30053), &format!("via node-{}", n + 1));
    }
}

#[test]
fn icmp_errors_from_redirected_pods_reach_the_client_past_netfilter() {
    // Past the node's stack, conntrack never sees the flow, so it would find no connection for
    // the pod's error: rules that drop such INVALID packets (kube-proxy's, Calico's) would drop
    // it. It goes back the way the flow came.
    let c = nolisten_cluster(&["--redirect-to-pods", "vp"]);
    c.lab.nodes[0]
        .ns
        .exec(
            "iptables",
            &[
                "-w",
                "-A",
                "FORWARD",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ],
        )
        .expect("an INVALID rule");
    // The first flows may go through the stack while the node learns the pod's neighbour.
    c.eventually("an error sent back from the pod's interface", || {
        assert_udp_refused(&c, c.node(0, 30053), "via node-1");
        agent_counter(&c, "replies_from_pod_redirected") >= 1.0
    });
    for _ in 0..3 {
        assert_udp_refused(&c, c.node(0, 30053), "via node-1, redirected");
    }
}

/// A UDP NodePort (30053) whose one endpoint, node-1's pod, is ready but has nothing listening on
/// the target port: it answers ICMP port unreachable, which must reach the client translated
/// (via node-1 the pod is local, via node-2 remote).
fn nolisten_cluster(flags: &[&str]) -> Cluster {
    let manifest = service(
        "nolisten",
        "NodePort",
        "  - {name: u, protocol: UDP, port: 53, targetPort: 50001, nodePort: 30053}\n",
        "",
    ) + "---\n"
        + &slice(
            "nolisten",
            "- {name: u, protocol: UDP, port: 50001}\n",
            &[(exposure_lab::lab::pod_ip(0, 0), "node-1")],
        );
    Cluster::start_with(&[1, 0], &[("nolisten.yaml", manifest)], flags)
}

/// A UDP query to `to` is refused promptly (the client's socket gets the ICMP error).
fn assert_udp_refused(c: &Cluster, to: SocketAddr, what: &str) {
    let started = Instant::now();
    let err = apps::udp_ask(&c.lab.client, to).expect_err("nothing listens");
    let kind = err
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .map(|e| e.kind());
    assert_eq!(kind, Some(ErrorKind::ConnectionRefused), "{what}: {err:#}");
    assert!(
        started.elapsed() < apps::IO_TIMEOUT,
        "{what}: refused, not timed out"
    );
}

/// Packets kube-proxy's NodePort rules on node-1 have matched so far.
fn kube_proxy_nodeport_packets(c: &Cluster) -> u64 {
    rule_packets(c, "nat", "KUBE-NODEPORTS", "dpt:30600")
}

/// Beside kube-proxy (its iptables rules on node-1, as it lays them out), traffic from outside is
/// served in XDP before the rules see it, the node's own connections to its NodePort and a pod's
/// to the ClusterIP by the socket hooks before its rules do; with the hooks off, by those rules.
#[test]
fn alongside_kube_proxy_outside_traffic_and_sockets_are_served_first() {
    let pods = all_pods(&[1, 1]);
    let mut c = Cluster::start(&[1, 1], &[("hello.yaml", hello_world(&pods))]);
    let hello = exposure_lab::kube_proxy::ServicePort {
        namespace: "default".into(),
        name: "hello-world".into(),
        protocol: "tcp",
        cluster_ip: cluster_ip("hello-world"),
        port: 60000,
        load_balancer_ip: None,
        node_port: Some(30600),
        endpoints: pods.iter().map(|(ip, _)| (*ip, 50000)).collect(),
    };
    let node = &c.lab.nodes[0];
    node.ns
        .exec_with_input(
            "iptables-restore",
            &[],
            &exposure_lab::kube_proxy::iptables_rules(&[hello]),
        )
        .expect("kube-proxy's rules load");
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);

    let (answered, seen) = c.tcp_spread(c.node(0, 30600), 40);
    assert_eq!(answered, everyone, "from outside");
    assert!(
        seen.contains(&CLIENT),
        "the local pod saw the client, not a masquerade"
    );
    assert_eq!(
        kube_proxy_nodeport_packets(&c),
        0,
        "kube-proxy's rules saw outside traffic"
    );
    assert!(agent_counter(&c, "frontend_packets") > 0.0);

    let from_node = |c: &Cluster| {
        let mut answered = BTreeSet::new();
        for _ in 0..20 {
            let answer = apps::tcp_ask(&c.lab.nodes[0].ns, c.node(0, 30600))
                .expect("the node to its NodePort");
            answered.insert(parse_answer(&answer).expect("answer format").0.to_string());
        }
        answered
    };
    assert_eq!(from_node(&c), everyone, "from the node itself");
    assert_eq!(
        kube_proxy_nodeport_packets(&c),
        0,
        "the node's own connections went to the pods from connect()"
    );
    let cluster_ip = SocketAddr::from((cluster_ip("hello-world"), 60000));
    let from_pod = |c: &Cluster| {
        let answer =
            apps::tcp_ask(&c.lab.nodes[0].pods[0].ns, cluster_ip).expect("a pod to the ClusterIP");
        assert!(everyone.contains(parse_answer(&answer).expect("answer format").0));
    };
    let kube_proxy_cluster_ip_packets =
        |c: &Cluster| rule_packets(c, "nat", "KUBE-SERVICES", &cluster_ip.ip().to_string());
    from_pod(&c);
    assert_eq!(
        kube_proxy_cluster_ip_packets(&c),
        0,
        "the pod's connection went to the pods from connect()"
    );
    c.agent_flags = vec!["--translate-node-sockets".into(), "false".into()];
    c.agents[0].stop();
    c.start_agent(0);
    assert_eq!(
        from_node(&c),
        everyone,
        "from the node itself, through kube-proxy's rules"
    );
    assert!(kube_proxy_nodeport_packets(&c) > 0);
    from_pod(&c);
    assert!(
        kube_proxy_cluster_ip_packets(&c) > 0,
        "through kube-proxy's rules"
    );
}

/// Large answers leave a pod as offloaded packets (GSO, checksum-partial): at tc egress the reply
/// rewrite must keep them intact, as must XDP for a remote pod's replies, in both families.
#[test]
fn bulk_answers_arrive_intact_from_local_and_remote_pods() {
    let c = Cluster::start(&[1, 0], &[("hello.yaml", hello_dual_stack(&[1, 0]))]);
    // The lab's veths send full checksums, as from a NIC. The pod here offloads instead, as pods
    // do: its answers leave as GSO packets with partial checksums, and node-1's interface (no
    // offload) segments them and completes the checksums after tc, from the partial sums in the
    // packets, as a NIC would. The client checks every segment.
    c.lab.nodes[0].pods[0]
        .ns
        .exec(
            "ethtool",
            &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
        )
        .expect("ethtool: offload on in the pod");
    for n in 0..2 {
        let path = if n == 0 { "local" } else { "remote" };
        for to in [
            c.node(n, 30600),
            SocketAddr::from((c.lab.nodes[n].ip6, 30600)),
        ] {
            apps::tcp_fetch_bulk(&c.lab.client, to, 8 << 20)
                .unwrap_or_else(|e| panic!("8 MiB from a {path} pod via {to}: {e:#}"));
        }
    }
    // Big answers from the local pod went through tc egress, not around it.
    assert!(agent_counter(&c, "replies_tc") > 100.0);
}

#[test]
fn a_nic_that_refuses_native_xdp_gets_generic_xdp_and_serves_offloading_clients() {
    generic_xdp_serves_offloading_clients(&[]);
}

#[test]
fn generic_xdp_redirects_to_pods_and_leaves_gso_packets_to_the_kernel() {
    generic_xdp_serves_offloading_clients(&["--xdp-redirect-to-pods", "vp"]);
}

#[test]
fn generic_xdp_hands_flows_to_pods_at_tc() {
    generic_xdp_serves_offloading_clients(&["--redirect-to-pods", "vp"]);
}

fn generic_xdp_serves_offloading_clients(flags: &[&str]) {
    // node-1's NIC may be sent 9,000-byte frames (its peer's MTU, on the LAN): too large for a
    // veth's native XDP, as ENA's 9001-byte MTU on AWS is for its driver's. The client offloads
    // (as one on the same host does; GRO makes the same of a NIC's packets): its TCP leaves as
    // GSO packets of up to 64 KiB with partial checksums, which the LAN passes on whole and
    // generic XDP sees as they are. The client's own port on the LAN completes checksums in
    // software, so the client checks every one it is sent.
    let empty = service(
        "empty",
        "NodePort",
        "  - {name: t, protocol: TCP, port: 80, targetPort: 50000, nodePort: 30800}\n  - {name: u, protocol: UDP, port: 80, targetPort: 50000, nodePort: 30800}\n",
        &format!(
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [{}, \"2001:2:0:50::80\"]\n",
            cluster_ip("empty")
        ),
    );
    let files = [
        ("hello.yaml", hello_dual_stack(&[1, 1])),
        ("empty.yaml", empty),
    ];
    let c = Cluster::start_prepared(&[1, 1], &files, flags, |lab| {
        lab.lan.ip("link set n1 mtu 9000").unwrap();
        lab.nodes[0]
            .ns
            .exec("ethtool", &["-K", "eth0", "gro", "on"])
            .unwrap();
        client_offloads_to_node_1(lab);
    });
    let log = c.agents[0].log_text();
    assert!(
        log.contains("native XDP unavailable here: attached in generic mode"),
        "{log}"
    );
    let link = c.lab.nodes[0]
        .ns
        .exec("ip", &["-d", "link", "show", "eth0"])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("xdpgeneric"), "{link}");
    let status = status_json(&c, 0);
    assert_eq!(
        status["generic_xdp_interfaces"],
        serde_json::json!(["eth0"])
    );
    // Refusals are built in the packet and sent back from generic XDP too: to node-2, which sends
    // whole checksums, as from a NIC, and to the client, whose skbs still ask for their checksum
    // to be completed at the quoted header (its LAN port does that, in software).
    for (from, ns) in [
        ("node-2", &c.lab.nodes[1].ns),
        ("the client", &c.lab.client),
    ] {
        for to in [
            c.node(0, 30800),
            SocketAddr::from((c.lab.nodes[0].ip6, 30800)),
        ] {
            let tcp = apps::tcp_ask(ns, to).expect_err("refused");
            let refused = Some(ErrorKind::ConnectionRefused);
            assert_eq!(
                error_kind(&tcp),
                refused,
                "TCP from {from} to {to}: {tcp:#}"
            );
            let udp = apps::udp_ask(ns, to).expect_err("refused");
            assert_eq!(
                error_kind(&udp),
                refused,
                "UDP from {from} to {to}: {udp:#}"
            );
        }
    }
    // By node-1's XDP, not its stack. (An IPv6 SYN is refused twice: in the lab the first refusal
    // reaches the sender while its connect() still holds the socket, which Linux then only notes
    // (TcpExtLockDroppedIcmps), and the retransmitted SYN's is taken.)
    let refused = agent_counter(&c, "refused_no_backend");
    assert!((8.0..=12.0).contains(&refused), "{refused} refusals");
    let all = pods_named(&["pod-1-1", "pod-2-1"]);
    for to in [
        c.node(0, 30600),
        SocketAddr::from((c.lab.nodes[0].ip6, 30600)),
    ] {
        assert_eq!(c.tcp_spread(to, 0).0, all, "TCP via {to}");
        assert_eq!(c.udp_spread(to, 0), all, "UDP via {to}");
        // As packets of many segments: 16 MiB is 11,586 full-sized ones.
        bulk_to_and_from_every_pod(&c, to, &all, Some(3000.0));
    }
    if !flags.is_empty() {
        // The local pod's packets went past the stack (with the XDP redirect, GSO ones through
        // it: the kernel's generic redirect drops a packet longer than the MTU).
        assert!(agent_counter(&c, "to_local_backend_redirected") > 0.0);
    }
}

/// The client leaves checksums and segmentation to its device, and node-1's LAN port passes its
/// GSO packets on whole: its TCP reaches node-1 in packets of up to 64 KiB with partial checksums.
/// (The client's own LAN port still completes checksums in software, so the client checks every
/// one it is sent.)
fn client_offloads_to_node_1(lab: &Lab) {
    let offload = ["tx", "on", "tso", "on", "gso", "on"];
    lab.client
        .exec("ethtool", &[&["-K", "eth0"][..], &offload].concat())
        .unwrap();
    lab.lan
        .exec("ethtool", &[&["-K", "n1"][..], &offload].concat())
        .unwrap();
}

/// Sends 16 MiB to and fetches 8 MiB from the pods behind `to`, until each of `pods` had an upload
/// (a new flow's pod is a hash pick), every byte checked; with `max_packets`, each upload must
/// reach node-1's XDP in fewer packets (GSO packets of many segments).
fn bulk_to_and_from_every_pod(
    c: &Cluster,
    to: SocketAddr,
    pods: &BTreeSet<String>,
    max_packets: Option<f64>,
) {
    let mut sent_to = BTreeSet::new();
    for _ in 0..apps::SPREAD_MIN {
        if sent_to == *pods {
            break;
        }
        let before = agent_counter(c, "frontend_packets");
        let pod = apps::tcp_send_bulk(&c.lab.client, to, 16 << 20)
            .unwrap_or_else(|e| panic!("16 MiB to a pod via {to}: {e:#}"));
        let packets = agent_counter(c, "frontend_packets") - before;
        if let Some(max) = max_packets {
            assert!(packets < max, "16 MiB to {pod} in {packets} packets");
        }
        sent_to.insert(pod);
        apps::tcp_fetch_bulk(&c.lab.client, to, 8 << 20)
            .unwrap_or_else(|e| panic!("8 MiB from a pod via {to}: {e:#}"));
    }
    assert_eq!(sent_to, *pods, "16 MiB uploads via {to}");
}

#[test]
fn remote_pods_behind_a_vxlan_overlay_are_reached_through_the_tunnel() {
    overlay_serves_remote_pods(Overlay::Native);
}

#[test]
fn generic_xdp_sends_remote_flows_into_a_vxlan_overlay_from_tc() {
    overlay_serves_remote_pods(Overlay::Generic);
}

#[test]
fn a_selected_tunnel_takes_remote_flows_with_its_own_address_past_strict_rp_filter() {
    overlay_serves_remote_pods(Overlay::TunnelSelected);
}

#[test]
fn without_xdp_metadata_remote_flows_still_go_into_a_vxlan_overlay_from_tc() {
    overlay_serves_remote_pods(Overlay::NoMetadata);
}

/// Strict rp_filter on a tunnel `--iface` does not select drops the flows other nodes' agents
/// send through it (SNATed to their LAN address): each agent says so, naming the tunnel and the
/// remedies, and says again when its rp_filter is loosened, after which those flows get through.
#[test]
fn strict_rp_filter_on_an_unselected_tunnel_is_reported_until_loosened() {
    let pods = [0, 1];
    let c = Cluster::start_prepared(
        &pods,
        &[("hello.yaml", hello_dual_stack(&pods))],
        &[],
        |lab| {
            lab.vxlan_overlay().expect("VXLAN overlay");
            for node in &lab.nodes {
                node.ns
                    .sysctl("net.ipv4.conf.flannel/1.rp_filter", "1")
                    .unwrap();
            }
        },
    );
    const WARNING: &str = "strict rp_filter on this tunnel, which --iface does not select";
    let said = |n: usize, what: &str| {
        let log = c.agents[n].log_text();
        log.lines()
            .any(|l| l.contains(what) && l.contains("flannel.1"))
    };
    for n in 0..2 {
        c.eventually("the warning", || said(n, WARNING));
        assert!(
            said(n, "--iface ...,flannel.1") && said(n, "net.ipv4.conf.flannel/1.rp_filter=2"),
            "the remedies: {}",
            c.agents[n].log_text()
        );
    }
    // As it says: node-2 drops what node-1 sends its pod through the tunnel.
    let to = c.node(0, 30600);
    assert!(apps::udp_ask(&c.lab.client, to).is_err(), "UDP via node-1");
    for node in &c.lab.nodes {
        node.ns
            .sysctl("net.ipv4.conf.flannel/1.rp_filter", "2")
            .unwrap();
    }
    for n in 0..2 {
        c.eventually("loosened", || said(n, "no longer drops other nodes' flows"));
    }
    assert_eq!(c.udp_spread(to, 0), pods_named(&["pod-2-1"]));
    assert_eq!(c.tcp_spread(to, 0).0, pods_named(&["pod-2-1"]));
}

#[derive(Clone, Copy, PartialEq)]
enum Overlay {
    /// `--iface eth0`, native XDP.
    Native,
    /// `--xdp-mode generic`, with a client that offloads.
    Generic,
    /// `--iface eth0,flannel.1`, on nodes whose tunnel has strict rp_filter.
    TunnelSelected,
    /// Native XDP as on a driver that keeps no XDP metadata (`EXPOSURE_TEST_NO_XDP_METADATA`).
    NoMetadata,
}

/// The nodes' pods on a flannel-style VXLAN overlay ([`Lab::vxlan_overlay`]): a remote pod's route
/// leaves by `flannel.1`, a device XDP cannot send frames through. Its flows are SNATed in XDP
/// and sent from tc ingress (the kernel encapsulates them); the pod answers the node's address
/// over the LAN, where XDP translates its replies as ever. In generic XDP the client offloads, so
/// its uploads reach XDP as GSO packets of up to 64 KiB. With the tunnel selected too, flows
/// through it are SNATed to its address, as kube-proxy's masquerade does, which strict rp_filter
/// on the pod's node lets through; their replies come back through it, to the tunnel's generic
/// XDP, and go on to the client from tc (GRO's merged ones too).
fn overlay_serves_remote_pods(variant: Overlay) {
    let generic = variant == Overlay::Generic;
    let flags: &[&str] = match variant {
        Overlay::Native => &[],
        Overlay::Generic => &["--xdp-mode", "generic"],
        Overlay::TunnelSelected => &["--iface", "eth0,flannel.1"],
        Overlay::NoMetadata => &[],
    };
    let env: &[(&str, &str)] = match variant {
        Overlay::NoMetadata => &[("EXPOSURE_TEST_NO_XDP_METADATA", "1")],
        _ => &[],
    };
    let pods = [1, 1];
    let remote_only = {
        let ports =
            "  - {name: udp, protocol: UDP, port: 53, targetPort: 50000, nodePort: 30702}\n";
        let endpoint = "- {name: udp, protocol: UDP, port: 50000}\n";
        service("remote-only", "NodePort", ports, "")
            + "---\n"
            + &slice("remote-only", endpoint, &all_pods(&pods)[1..])
    };
    let files = [
        ("hello.yaml", hello_dual_stack(&pods)),
        ("remote-only.yaml", remote_only),
    ];
    let c = Cluster::start_prepared_env(&pods, &files, flags, env, |lab| {
        lab.vxlan_overlay().expect("VXLAN overlay");
        if variant == Overlay::TunnelSelected {
            for node in &lab.nodes {
                node.ns
                    .sysctl("net.ipv4.conf.flannel/1.rp_filter", "1")
                    .unwrap();
            }
        }
        if generic {
            client_offloads_to_node_1(lab);
        }
    });
    let all = pods_named(&["pod-1-1", "pod-2-1"]);
    for n in 0..2 {
        // The remote pod sees the address of the interface the flow came in by (where its
        // answers go back), not the tunnel's; or the tunnel's, when it is selected.
        let (spread, seen) = c.tcp_spread(c.node(n, 30600), 0);
        assert_eq!(spread, all, "TCP via node-{}", n + 1);
        let node = match variant {
            Overlay::TunnelSelected => IpAddr::V4(Ipv4Addr::new(198, 19, n as u8 + 1, 0)),
            _ => IpAddr::V4(c.lab.nodes[n].ip),
        };
        assert_eq!(seen, BTreeSet::from([CLIENT, node]), "via node-{}", n + 1);
    }
    for to in [
        c.node(0, 30600),
        SocketAddr::from((c.lab.nodes[0].ip6, 30600)),
    ] {
        assert_eq!(c.tcp_spread(to, 0).0, all, "TCP via {to}");
        assert_eq!(c.udp_spread(to, 0), all, "UDP via {to}");
        bulk_to_and_from_every_pod(&c, to, &all, generic.then_some(3000.0));
    }
    // A datagram of 1,500 bytes fits the LAN but not the tunnel: the client is told the tunnel's
    // MTU (its first try fails with EMSGSIZE), and its next try goes in fragments that fit.
    assert_told_the_mtu_then_fragments(&c.lab.client, c.node(0, 30702), 1472, "pod-2-1");
    assert!(agent_counter(&c, "too_big_for_next_hop") >= 1.0);
    // Sent from tc ingress, by the kernel through the tunnel (and back to the client).
    assert!(agent_counter(&c, "sent_from_tc") > 100.0);
    // Known there by their tuple where XDP could leave no metadata.
    let by_tuple = agent_counter(&c, "sent_from_tc_without_metadata");
    let said = c.agents[0]
        .log_text()
        .contains("a driver here keeps no XDP metadata");
    match variant {
        Overlay::NoMetadata => assert!(by_tuple > 100.0 && said, "{by_tuple}, said: {said}"),
        _ => assert!(by_tuple == 0.0 && !said, "{by_tuple}, said: {said}"),
    }
    if variant == Overlay::TunnelSelected {
        // No packet of the flows taken for the node's own at tc egress, where tc sends them.
        assert_eq!(agent_counter(&c, "dropped_host_collision"), 0.0);
        // Selected, its strict rp_filter drops nothing: no warning.
        for agent in &c.agents {
            assert!(!agent.log_text().contains("strict rp_filter"));
        }
    }
}

/// hello-world's IPv6 ClusterIP in [`hello_dual_stack`].
const HELLO_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x50, 0, 0, 0, 1);

/// hello-world as a dual-stack LoadBalancer Service: cluster IPs, LoadBalancer addresses and one
/// EndpointSlice per family, as a dual-stack cluster writes them.
fn hello_dual_stack(pods: &[usize]) -> String {
    let (ip6, ip) = (HELLO_CLUSTER_IP6, cluster_ip("hello-world"));
    let svc = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: hello-world\n  namespace: default\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIP: {ip6}\n  clusterIPs: [\"{ip6}\", {ip}]\n  ports:\n  - {{protocol: TCP, port: 60000, targetPort: 50000, nodePort: 30600}}\n  - {{name: dns, protocol: UDP, port: 60000, targetPort: 50000, nodePort: 30600}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: \"2001:2:0:100::1\"}}, {{ip: 198.18.100.1}}]\n");
    let ports =
        "- {name: \"\", protocol: TCP, port: 50000}\n- {name: dns, protocol: UDP, port: 50000}\n";
    let mut out = svc;
    for (family, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
        let mut eps = String::new();
        for (n, count) in pods.iter().enumerate() {
            for p in 0..*count {
                let ip = if family == "IPv4" {
                    exposure_lab::lab::pod_ip(n, p).to_string()
                } else {
                    format!("\"{}\"", exposure_lab::lab::pod_ip6(n, p))
                };
                eps += &format!(
                    "- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: node-{}\n",
                    n + 1
                );
            }
        }
        out += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hello-world-{suffix}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: hello-world\naddressType: {family}\nports:\n{ports}endpoints:\n{eps}"
        );
    }
    out
}

/// Frontend/backend pairs node-1's socket hooks remember (`SOCKET_PEERS`).
fn socket_peers(c: &Cluster) -> usize {
    use exposure_common::{names, SocketPeer, SocketPeerKey};
    let pin_dir = &c.agents[0].pin_dir;
    exposure::datapath::open_pinned_lru::<SocketPeerKey, SocketPeer>(pin_dir, names::SOCKET_PEERS)
        .expect("SOCKET_PEERS pinned")
        .keys()
        .filter_map(Result::ok)
        .count()
}

/// The node's own sockets to its frontends never cross XDP (a connection to the node's own
/// address goes through loopback): the cgroup hooks send them to the Service's pods, local and
/// remote, over TCP and UDP (connected or not), IPv4 and IPv6 (and IPv4 from IPv6 sockets),
/// NodePort and LoadBalancer addresses, and the application sees the frontend it asked for as its
/// peer.
#[test]
fn the_nodes_own_sockets_reach_the_pods_through_its_frontends() {
    use exposure_lab::lab::lb_ip6;
    let empty = service(
        "empty",
        "NodePort",
        "  - {name: t, protocol: TCP, port: 80, targetPort: 50000, nodePort: 30800}\n",
        "",
    );
    let mut c = Cluster::start(
        &[1, 1],
        &[
            ("hello.yaml", hello_dual_stack(&[1, 1])),
            ("empty.yaml", empty),
        ],
    );
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    let node = &c.lab.nodes[0].ns;
    let frontends = [
        c.node(0, 30600),
        SocketAddr::from((c.lab.nodes[0].ip6, 30600)),
        SocketAddr::from((lb_ip(1), 60000)),
        SocketAddr::from((lb_ip6(1), 60000)),
        // An IPv6 socket naming an IPv4 frontend.
        SocketAddr::from((c.lab.nodes[0].ip.to_ipv6_mapped(), 30600)),
        // kube-proxy's localhost NodePort.
        SocketAddr::from(([127, 0, 0, 1], 30600)),
    ];
    for fe in frontends {
        assert_every_socket_reaches(node, fe, None, &everyone, 24);
    }
    assert!(agent_counter(&c, "node_sockets_translated") >= 6.0 * 24.0 * 3.0);
    // Closed sockets took their pairs along, but for unconnected UDP's (which name no peer).
    assert_eq!(
        socket_peers(&c),
        frontends.len() * 24,
        "{}",
        c.agents[0].log_text()
    );
    // A Service without endpoints is refused, as kube-proxy's REJECT does.
    let refused = apps::tcp_ask(node, c.node(0, 30800)).expect_err("no endpoints");
    assert_refused(&refused);
    // Other namespaces' sockets are left to XDP: the local pod sees the outside client.
    let (pods, seen) = c.tcp_spread(c.node(0, 30600), 20);
    assert_eq!(pods, everyone);
    assert!(seen.contains(&CLIENT), "{seen:?}");

    // A restarted agent swaps its hooks in: a connection opened before still shows the frontend,
    // and new ones are served.
    let held = TcpSession::connect(node, frontends[0]).expect("connection before the restart");
    c.agents[0].stop();
    c.start_agent(0);
    let node = &c.lab.nodes[0].ns;
    assert_eq!(
        held.peer().unwrap(),
        frontends[0],
        "peer across the restart"
    );
    let answer = apps::tcp_ask(node, frontends[0]).expect("served after the restart");
    assert!(everyone.contains(parse_answer(&answer).expect("answer format").0));
    let links = std::fs::read_dir(c.agents[0].pin_dir.join("links")).unwrap();
    let hooks = links
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("sock-"))
        .count();
    assert_eq!(hooks, 9, "one link per hook, the earlier run's replaced");

    // Without localhost NodePorts, 127.0.0.1 is the node's own loopback again.
    c.agent_flags = vec!["--localhost-node-ports".into(), "false".into()];
    c.agents[0].stop();
    c.start_agent(0);
    let localhost = SocketAddr::from(([127, 0, 0, 1], 30600));
    let off = apps::tcp_ask(&c.lab.nodes[0].ns, localhost).expect_err("no localhost NodePort");
    assert_refused(&off);
    apps::tcp_ask(&c.lab.nodes[0].ns, frontends[0]).expect("the node's address still served");

    // Turned off, the hooks are gone: the node's own connection meets the node's closed port.
    c.agent_flags = vec!["--translate-node-sockets".into(), "false".into()];
    c.agents[0].stop();
    c.start_agent(0);
    let off = apps::tcp_ask(&c.lab.nodes[0].ns, frontends[0]).expect_err("not translated when off");
    assert_refused(&off);
}

/// A pod's packets to another node's NodePort (its IPv4 and IPv6 addresses) leave its node
/// untranslated (node-1's maps have no frontend there) and are served by node-2's XDP like any
/// client's: node-2's pod sees the pod's own address, and node-1's pod, the pod itself included,
/// node-2's SNAT address; TCP, connected and unconnected UDP.
#[test]
fn a_pod_reaches_another_nodes_node_port() {
    let c = Cluster::start(&[1, 1], &[("hello.yaml", hello_dual_stack(&[1, 1]))]);
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    let pod = &c.lab.nodes[0].pods[0];
    for fe in [
        c.node(1, 30600),
        SocketAddr::from((c.lab.nodes[1].ip6, 30600)),
    ] {
        assert_every_socket_reaches(&pod.ns, fe, None, &everyone, 16);
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let answer = apps::tcp_ask(&pod.ns, fe).expect("TCP answer");
            let (name, peer) = parse_answer(&answer).expect("answer format");
            seen.insert((name.to_string(), peer.ip()));
        }
        let (own, node_2) = match fe {
            SocketAddr::V4(_) => (IpAddr::V4(pod.ip), IpAddr::V4(c.lab.nodes[1].ip)),
            SocketAddr::V6(_) => (pod.addr_towards(&fe), IpAddr::V6(c.lab.nodes[1].ip6)),
        };
        assert_eq!(
            seen,
            BTreeSet::from([
                ("pod-1-1".to_string(), node_2),
                ("pod-2-1".to_string(), own)
            ]),
            "via {fe}"
        );
    }
}

/// A pod's packets to its own node's NodePort arrive on the pod's veth, not on XDP's interface
/// (and a LoadBalancer address is not even routed back to the node it is on): the socket hooks
/// send the pods' sockets to the Service's pods as they do the node's, as Cilium's socket LB
/// does and kube-proxy's PREROUTING rules do for pods' packets.
#[test]
fn a_nodes_pods_reach_its_own_frontends() {
    use exposure_lab::lab::lb_ip6;
    let eps = [(exposure_lab::lab::pod_ip(0, 0), "node-1")];
    // Only the lab's LAN may use this LoadBalancer address: a pod's socket to it is left to the
    // packet path, where the ranges apply (here: no route, so it fails; a pod is no exception).
    let ranged = service(
        "ranged",
        "LoadBalancer",
        "  - {name: t, protocol: TCP, port: 81, targetPort: 50000, nodePort: 30082}\n",
        "  loadBalancerSourceRanges: [198.18.0.0/28]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.18.100.1}]\n",
    ) + "---\n"
        + &slice("ranged", "- {name: t, protocol: TCP, port: 50000}\n", &eps);
    let mut c = Cluster::start(
        &[1, 1],
        &[
            ("hello.yaml", hello_dual_stack(&[1, 1])),
            ("ranged.yaml", ranged),
        ],
    );
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    let pod = &c.lab.nodes[0].pods[0];
    let frontends = [
        c.node(0, 30600),
        SocketAddr::from((c.lab.nodes[0].ip6, 30600)),
        SocketAddr::from((lb_ip(1), 60000)),
        SocketAddr::from((lb_ip6(1), 60000)),
    ];
    for fe in frontends {
        let own = pod.addr_towards(&fe);
        // Not SNATed: the pods see pod-1-1 itself, as Cilium's socket LB leaves it.
        assert_every_socket_reaches(&pod.ns, fe, Some(own), &everyone, 16);
    }

    // 127.0.0.1 in a pod is the pod itself: its localhost is not the node's NodePort.
    let own = apps::tcp_ask(&pod.ns, SocketAddr::from(([127, 0, 0, 1], 30600)))
        .expect_err("the pod's own loopback");
    assert_refused(&own);

    let translated = agent_counter(&c, "node_sockets_translated");
    let ranged = SocketAddr::from((lb_ip(1), 81));
    apps::tcp_ask(&pod.ns, ranged).expect_err("a pod's socket to a ranged address is not sent on");
    assert_eq!(agent_counter(&c, "node_sockets_translated"), translated);
    // The node's own socket to it is (source ranges do not apply to the node's sockets).
    let answer = apps::tcp_ask(&c.lab.nodes[0].ns, ranged).expect("from the node");
    assert_eq!(parse_answer(&answer).expect("answer format").0, "pod-1-1");

    // `--socket-namespaces host`: the node's own sockets only; pod-1-1 meets the node's
    // closed port again.
    c.agent_flags = vec!["--socket-namespaces".into(), "host".into()];
    c.agents[0].stop();
    c.start_agent(0);
    let pod = &c.lab.nodes[0].pods[0];
    let refused = apps::tcp_ask(&pod.ns, c.node(0, 30600)).expect_err("pods left alone");
    assert_refused(&refused);
    let answer = apps::tcp_ask(&c.lab.nodes[0].ns, c.node(0, 30600)).expect("the node's own");
    assert!(everyone.contains(parse_answer(&answer).expect("answer format").0));
}

/// Over TCP, connected UDP and unconnected UDP (`tries` sockets each), sockets of `ns` to `fe`
/// are answered by each of `everyone`, see `fe` as their peer (the application sees the address
/// it asked for), and, when `own` is given, the pods see that source address.
fn assert_every_socket_reaches(
    ns: &exposure_lab::netns::Netns,
    fe: SocketAddr,
    own: Option<IpAddr>,
    everyone: &BTreeSet<String>,
    tries: usize,
) {
    let mut tcp = BTreeSet::new();
    let mut connected = BTreeSet::new();
    let mut unconnected = BTreeSet::new();
    for _ in 0..tries {
        let mut session =
            TcpSession::connect(ns, fe).unwrap_or_else(|e| panic!("TCP to {fe}: {e:#}"));
        assert_eq!(session.peer().unwrap(), fe, "TCP peer");
        let answer = session.ask("hello").expect("TCP answer");
        let (name, seen) = parse_answer(&answer).expect("answer format");
        if let Some(own) = own {
            assert_eq!(seen.ip(), own, "{answer}");
        }
        tcp.insert(name.to_string());

        let mut udp = UdpSession::connect(ns, fe).expect("UDP socket");
        assert_eq!(udp.peer().unwrap(), fe, "connected UDP peer");
        let answer = udp
            .ask("hello")
            .unwrap_or_else(|e| panic!("connected UDP to {fe}: {e:#}"));
        connected.insert(parse_answer(&answer).expect("answer format").0.to_string());

        let (answer, from) = apps::udp_ask_unconnected(ns, fe)
            .unwrap_or_else(|e| panic!("unconnected UDP to {fe}: {e:#}"));
        assert_eq!(from, fe, "the answer comes from the address asked");
        unconnected.insert(parse_answer(&answer).expect("answer format").0.to_string());
    }
    assert_eq!(&tcp, everyone, "TCP to {fe}");
    assert_eq!(&connected, everyone, "connected UDP to {fe}");
    assert_eq!(&unconnected, everyone, "unconnected UDP to {fe}");
}

/// The error kind of a failed connection.
fn error_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    err.chain()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .map(|e| e.kind())
}

/// `--cluster-ips` (the default): the sockets of the node and of its pods reach a Service's
/// ClusterIPs, as kube-proxy and Cilium's socket LB serve them, with no other component: both
/// families, TCP and UDP, the application seeing the ClusterIP as its peer;
/// `internalTrafficPolicy: Local` keeps them on this node's endpoints; a ClusterIP without
/// endpoints, or on a port its Service does not have, refuses the connection at once (with
/// endpoints only on other nodes under Local policy: "no route to host", where kube-proxy drops
/// and the client waits).
#[test]
fn the_node_and_its_pods_reach_cluster_ips() {
    let pods = all_pods(&[1, 1]);
    let ports = "  - {name: t, protocol: TCP, port: 80, targetPort: 50000}\n";
    let slice_ports = "- {name: t, protocol: TCP, port: 50000}\n";
    let itp_local = "  internalTrafficPolicy: Local\n";
    let elsewhere = [(exposure_lab::lab::pod_ip(1, 0), "node-2")];
    let none: [(Ipv4Addr, &str); 0] = [];
    let manifests = [
        ("hello.yaml", hello_dual_stack(&[1, 1])),
        (
            "local.yaml",
            service("local", "ClusterIP", ports, itp_local)
                + "---\n"
                + &slice("local", slice_ports, &pods),
        ),
        (
            "elsewhere.yaml",
            service("elsewhere", "ClusterIP", ports, itp_local)
                + "---\n"
                + &slice("elsewhere", slice_ports, &elsewhere),
        ),
        (
            "empty.yaml",
            service(
                "empty",
                "ClusterIP",
                &format!("{ports}  - {{name: u, protocol: UDP, port: 80, targetPort: 50000}}\n"),
                "",
            ) + "---\n"
                + &slice("empty", slice_ports, &none),
        ),
    ];
    let mut c = Cluster::start(&[1, 1], &manifests);
    let everyone = pods_named(&["pod-1-1", "pod-2-1"]);
    let hello = [
        SocketAddr::from((cluster_ip("hello-world"), 60000)),
        SocketAddr::from((HELLO_CLUSTER_IP6, 60000)),
    ];
    let pod = &c.lab.nodes[0].pods[0];
    for fe in hello {
        let own = pod.addr_towards(&fe);
        assert_every_socket_reaches(&pod.ns, fe, Some(own), &everyone, 16);
        assert_every_socket_reaches(&c.lab.nodes[0].ns, fe, None, &everyone, 16);
    }

    // internalTrafficPolicy: Local: this node's pod only, from the pod and from the node.
    let local = SocketAddr::from((cluster_ip("local"), 80));
    for ns in [&pod.ns, &c.lab.nodes[0].ns] {
        for _ in 0..16 {
            let answer = apps::tcp_ask(ns, local).expect("to the Local ClusterIP");
            assert_eq!(parse_answer(&answer).expect("answer format").0, "pod-1-1");
        }
    }

    // No endpoints: refused at connect(), over TCP and connected UDP.
    let empty = SocketAddr::from((cluster_ip("empty"), 80));
    let refused = apps::tcp_ask(&pod.ns, empty).expect_err("no endpoints");
    assert_refused(&refused);
    let refused = UdpSession::connect(&pod.ns, empty)
        .err()
        .expect("no endpoints");
    assert_refused(&refused);
    let elsewhere = SocketAddr::from((cluster_ip("elsewhere"), 80));
    let unreachable = apps::tcp_ask(&pod.ns, elsewhere).expect_err("no local endpoint");
    assert_eq!(
        error_kind(&unreachable),
        Some(ErrorKind::HostUnreachable),
        "{unreachable:#}"
    );
    // A port the Service does not have: refused too (kube-proxy's nftables rules reject it),
    // over either protocol, from the pod and from the node, in both families.
    for to in [
        SocketAddr::from((cluster_ip("hello-world"), 60001)),
        SocketAddr::from((HELLO_CLUSTER_IP6, 60001)),
        SocketAddr::from((cluster_ip("local"), 53)),
    ] {
        for ns in [&pod.ns, &c.lab.nodes[0].ns] {
            let refused = apps::tcp_ask(ns, to).expect_err("a port the Service lacks");
            assert_refused(&refused);
            let refused = UdpSession::connect(ns, to)
                .err()
                .expect("a port the Service lacks");
            assert_refused(&refused);
        }
    }
    assert!(agent_counter(&c, "node_sockets_refused") >= 15.0);

    // `--cluster-ips false`: ClusterIPs are left to something else (nothing here: unreachable),
    // while the NodePort is still served to the pod.
    c.agent_flags = vec!["--cluster-ips".into(), "false".into()];
    c.agents[0].stop();
    c.start_agent(0);
    let pod = &c.lab.nodes[0].pods[0];
    let left = apps::tcp_ask(&pod.ns, hello[0]).expect_err("ClusterIPs not served");
    assert!(
        matches!(
            error_kind(&left),
            Some(ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable)
        ),
        "{left:#}"
    );
    let answer = apps::tcp_ask(&pod.ns, c.node(0, 30600)).expect("the NodePort");
    assert!(everyone.contains(parse_answer(&answer).expect("answer format").0));
}

/// A node being deleted (the cluster autoscaler's taint, or a deletion timestamp on its Node):
/// its `/healthz` answers 503, as kube-proxy's does, so load balancers health-checking it drain it
/// first, while it still serves what reaches it; `/livez` stays 200 (the agent is fine).
#[test]
fn a_node_being_deleted_fails_its_healthz_so_load_balancers_drain_it() {
    let pods = all_pods(&[1, 1]);
    let c = Cluster::start(&[1, 1], &[("hello.yaml", hello_world(&pods))]);
    let node = |taints: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\nspec:\n  taints: {taints}\n"
        )
    };
    c.write(
        "node.yaml",
        &node("[{key: ToBeDeletedByClusterAutoscaler, value: \"1764200000\", effect: NoSchedule}]"),
    );
    c.eventually("node-1's /healthz fails", || {
        exposure_lab::agent::healthz(&c.lab.nodes[0]).ok() == Some(503)
    });
    assert_eq!(
        exposure_lab::agent::healthz(&c.lab.nodes[1]).ok(),
        Some(200),
        "node-2's"
    );
    assert_eq!(
        exposure_lab::agent::livez(&c.lab.nodes[0]).ok(),
        Some(200),
        "node-1's /livez"
    );
    let (answered, _) = c.tcp_spread(c.node(0, 30600), 20);
    assert_eq!(
        answered,
        pods_named(&["pod-1-1", "pod-2-1"]),
        "still served"
    );

    c.write("node.yaml", &node("[]"));
    c.eventually("node-1's /healthz passes again", || {
        exposure_lab::agent::healthz(&c.lab.nodes[0]).ok() == Some(200)
    });
}

/// `--external-cluster-ips` (Cilium's `bpf-lb-external-clusterip`): where the network routes a
/// Service CIDR to the nodes (a BGP speaker advertising it, say), packets to a ClusterIP that
/// arrive on `--iface` are served in XDP like an externalIP's, the local pod seeing the client;
/// off (the default), they are left to the node.
#[test]
fn external_cluster_ips_serve_packets_the_network_routes_to_the_node() {
    let pods = all_pods(&[1, 1]);
    let manifests = [("hello.yaml", hello_world(&pods))];
    let mut c = Cluster::start_with(&[1, 1], &manifests, &["--external-cluster-ips", "true"]);
    let cluster_ip = cluster_ip("hello-world");
    c.lab
        .client
        .ip(&format!(
            "route add {cluster_ip}/32 via {}",
            c.lab.nodes[0].ip
        ))
        .expect("the client routes the ClusterIP to node-1");
    let to = SocketAddr::from((cluster_ip, 60000));
    let (answered, seen) = c.tcp_spread(to, 40);
    assert_eq!(answered, pods_named(&["pod-1-1", "pod-2-1"]));
    assert!(
        seen.contains(&CLIENT),
        "the local pod saw the client: {seen:?}"
    );
    assert!(agent_counter(&c, "frontend_packets") > 0.0);

    c.agent_flags.clear();
    c.agents[0].stop();
    c.start_agent(0);
    let left = apps::tcp_ask(&c.lab.client, to).expect_err("left to node-1, which has no route");
    assert!(
        matches!(
            error_kind(&left),
            Some(ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable)
        ),
        "{left:#}"
    );
}

/// A connected UDP socket of the node or of its pod that the socket hooks sent to an endpoint
/// is ended when that endpoint leaves the Service (as Cilium's socket LB does; kube-proxy deletes
/// such a flow's conntrack entry): the application's next send fails, and a new socket reaches an
/// endpoint that is there. Sockets to the endpoint that stays go on. An endpoint that leaves
/// while the agent is stopped is found when it starts again.
#[test]
fn connected_udp_sockets_to_an_endpoint_that_left_are_ended() {
    let echo = dns_echo;
    let pods = all_pods(&[1, 1]);
    let mut c = Cluster::start(&[1, 1], &[("dns.yaml", echo(&pods))]);
    let gone = without(&pods, &["pod-2-1".to_string()]);

    let mut held = udp_sockets_on_each_endpoint(&c, c.node(0, 30053));
    c.write("dns.yaml", &echo(&gone));
    assert_ended_but_for_pod_1_1(&c, &mut held);
    // Connected again, the node reaches the endpoint that is there.
    let mut again = UdpSession::connect(&c.lab.nodes[0].ns, c.node(0, 30053)).unwrap();
    assert_eq!(
        parse_answer(&again.ask("hi").unwrap()).unwrap().0,
        "pod-1-1"
    );
    assert!(c.agents[0]
        .log_text()
        .contains("ended connected UDP sockets whose endpoint left their Service"));

    // An endpoint that leaves while the agent is down is found against the pinned maps when it
    // starts again (here through the ClusterIP).
    c.write("dns.yaml", &echo(&pods));
    let cluster_ip = SocketAddr::from((cluster_ip("dns"), 53));
    c.eventually("pod-2-1 is back behind the ClusterIP", || {
        (0..16).any(|_| {
            apps::udp_ask(&c.lab.nodes[0].ns, cluster_ip).is_ok_and(|a| a.starts_with("pod-2-1"))
        })
    });
    let mut held = udp_sockets_on_each_endpoint(&c, cluster_ip);
    c.agents[0].stop();
    c.write("dns.yaml", &echo(&gone));
    c.start_agent(0);
    assert_ended_but_for_pod_1_1(&c, &mut held);
}

/// From node-1 and from its pod, a connected UDP socket on each of pod-1-1 and pod-2-1 through
/// `to`: (who, pod, socket).
fn udp_sockets_on_each_endpoint(
    c: &Cluster,
    to: SocketAddr,
) -> Vec<(&'static str, String, UdpSession)> {
    let mut held = Vec::new();
    for (who, ns) in [
        ("node-1", &c.lab.nodes[0].ns),
        ("pod-1-1", &c.lab.nodes[0].pods[0].ns),
    ] {
        let mut on = std::collections::BTreeMap::new();
        for _ in 0..64 {
            let mut s = UdpSession::connect(ns, to).unwrap();
            let pod = parse_answer(&s.ask("hi").unwrap()).unwrap().0.to_string();
            on.entry(pod).or_insert(s);
            if on.len() == 2 {
                break;
            }
        }
        assert_eq!(on.len(), 2, "{who}'s sockets to {to} reach both endpoints");
        held.extend(on.into_iter().map(|(pod, s)| (who, pod, s)));
    }
    held
}

/// pod-2-1 left the Service: the sockets on it are ended (the next send fails), though pod-2-1
/// itself still answers, so only the agent can have ended them; those on pod-1-1 go on.
fn assert_ended_but_for_pod_1_1(c: &Cluster, held: &mut [(&str, String, UdpSession)]) {
    for (who, pod, s) in held.iter_mut().filter(|(_, pod, _)| pod == "pod-2-1") {
        c.eventually(&format!("{who}'s socket to {pod} is ended"), || {
            s.ask("still there?").is_err()
        });
        let err = s.ask("again?").expect_err("ended for good");
        let errno = err
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.raw_os_error());
        assert_eq!(errno, Some(libc::EDESTADDRREQ), "{who}: {err:#}");
    }
    for (who, pod, s) in held.iter_mut().filter(|(_, pod, _)| pod == "pod-1-1") {
        let answer = s
            .ask("still there?")
            .unwrap_or_else(|e| panic!("{who}'s socket to {pod}: {e:#}"));
        assert_eq!(parse_answer(&answer).unwrap().0, "pod-1-1");
    }
}

/// The error of a connection the node refused (a closed port, or kube-proxy's REJECT).
fn assert_refused(err: &anyhow::Error) {
    assert_eq!(
        error_kind(err),
        Some(ErrorKind::ConnectionRefused),
        "{err:#}"
    );
}

/// A cgroup of a test's own, removed when dropped (after the processes in it have ended).
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `--socket-namespaces all`, the default (a real node's namespaces are all its own), takes the
/// sockets of every namespace. Tried on a cgroup of the test's own (`--cgroup-root`), so other
/// labs on this kernel are not touched: a process in it, in the lab client's namespace (any
/// namespace will do), is sent to the pods by the socket hooks; outside it, XDP serves it.
#[test]
fn with_every_namespace_translated_the_hooks_take_every_socket_in_their_cgroup() {
    let root = exposure::datapath::cgroup2_root().expect("cgroup2");
    let cgroup = TestCgroup(root.join(unique_prefix("cg")));
    std::fs::create_dir(&cgroup.0).expect("a cgroup of the test's own");
    let mut c = Cluster::start(&[1, 1], &[("hello.yaml", hello_dual_stack(&[1, 1]))]);
    let cgroup_root = cgroup.0.display().to_string();
    c.agent_flags = vec![
        "--socket-namespaces".into(),
        "all".into(),
        "--cgroup-root".into(),
        cgroup_root.clone(),
    ];
    c.agents[0].stop();
    c.start_agent(0);
    // Sent to a pod, the client's socket needs a route to the pods.
    c.lab
        .client
        .ip(&format!(
            "route add 198.19.0.0/16 via {}",
            c.lab.nodes[0].ip
        ))
        .unwrap();
    let fe = c.node(0, 30600);
    let ask = format!(
        "exec 3<>/dev/tcp/{}/{} && echo hello >&3 && head -n 1 <&3",
        fe.ip(),
        fe.port()
    );
    let in_cgroup = format!(
        "echo $$ > {cgroup_root}/cgroup.procs && exec ip netns exec {} bash -c '{ask}'",
        c.lab.client.name()
    );
    let before = agent_counter(&c, "node_sockets_translated");
    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let out = std::process::Command::new("bash")
            .args(["-c", &in_cgroup])
            .output()
            .expect("bash");
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (name, client) = parse_answer(answer.trim()).expect("answer format");
        // Not through node-1's XDP, which SNATs flows to node-2's pod: the client itself.
        assert_eq!(client.ip(), CLIENT, "{answer}");
        seen.insert(name.to_string());
    }
    assert_eq!(seen, pods_named(&["pod-1-1", "pod-2-1"]));
    assert_eq!(agent_counter(&c, "node_sockets_translated") - before, 16.0);
    // Outside the cgroup, the same client's socket is left to XDP.
    let answer = apps::tcp_ask(&c.lab.client, fe).expect("through XDP");
    assert!(parse_answer(&answer).is_some(), "{answer}");
    assert_eq!(agent_counter(&c, "node_sockets_translated") - before, 16.0);
}

#[test]
fn dual_stack_service_is_reachable_over_ipv6_and_ipv4_and_neighbour_discovery_still_works() {
    use exposure_lab::lab::{lb_ip6, CLIENT_IP6};
    let c = Cluster::start(&[2, 2], &[("hello.yaml", hello_dual_stack(&[2, 2]))]);
    let everyone = pods_named(&["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"]);
    for n in 0..2 {
        let node6 = SocketAddr::from((c.lab.nodes[n].ip6, 30600));
        let (pods, seen) = c.tcp_spread(node6, 60);
        assert_eq!(pods, everyone, "IPv6 via node-{}", n + 1);
        // Local pods see the client, remote pods the node's IPv6 address it was SNATed to.
        assert_eq!(
            seen,
            BTreeSet::from([IpAddr::V6(CLIENT_IP6), IpAddr::V6(c.lab.nodes[n].ip6)]),
            "IPv6 via node-{}",
            n + 1
        );
        let (pods, _) = c.tcp_spread(c.node(n, 30600), 40);
        assert_eq!(pods, everyone, "IPv4 via node-{}", n + 1);
    }
    let lb6 = SocketAddr::from((lb_ip6(1), 60000));
    assert_eq!(
        c.udp_spread(lb6, 40),
        everyone,
        "UDP to the IPv6 LB address"
    );
    let (pods, _) = c.tcp_spread(SocketAddr::from((lb_ip(1), 60000)), 40);
    assert_eq!(pods, everyone, "TCP to the IPv4 LB address");

    // Neighbour discovery and ICMPv6 pass the XDP program: forget the neighbours, then ping.
    c.lab.client.ip("-6 neigh flush all").unwrap();
    for node in &c.lab.nodes {
        node.ns.ip("-6 neigh flush all").unwrap();
        let ping = c
            .lab
            .client
            .exec("ping", &["-c", "1", "-W", "2", &node.ip6.to_string()]);
        assert!(ping.is_ok(), "ping {}: {ping:?}", node.ip6);
    }
    // And the datapath still works after the node re-learned its neighbours through it.
    let (pods, _) = c.tcp_spread(SocketAddr::from((c.lab.nodes[0].ip6, 30600)), 40);
    assert_eq!(pods, everyone);
}
