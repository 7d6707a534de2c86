//! Packet tests: the real eBPF object, real maps, crafted frames through BPF_PROG_TEST_RUN; we assert
//! on the verdict and on every rewritten byte, and recompute all checksums.
//!
//! Each test gets its own network namespace (a node with a LAN peer acting as the other node, so the
//! FIB lookup for remote backends is real) and its own bpffs pin directory.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use aya::programs::{TestRun, TestRunOptions};
use exposure::{
    datapath::{
        Datapath, KernelMaps, RedirectToPods, TC_FROM_POD_PROGRAM, TC_INGRESS_PROGRAM, TC_PROGRAM,
    },
    model::{
        BackendAddr, DesiredService, DesiredState, FrontendAddr, FrontendKind, Protocol,
        ServicePortName, WhenEmpty,
    },
    sync::{DatapathMaps as _, Limits, Reconciler},
};
use exposure_common::{
    Counter, FlowKey, TcHandoff, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_OPENING, FLOW_REMOTE,
    FLOW_REPLIED, FLOW_TO_POD, HANDOFF_AS_IS, HANDOFF_OUT, HANDOFF_TO_POD, SNAT_PORT_MAX,
    SNAT_PORT_MIN,
};
use exposure_lab::{
    frame::{self, FrameSpec, ACK, FIN, RST, SYN, TCP, UDP},
    netns::{mac_text, unique_prefix, Netns},
    rng::Rng,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_UNSPEC: i32 = -1;

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
const NODE_PORT: u16 = 30600;
/// The local pod's MAC, as the node's neighbour table has it (on the pod's interface `lxc1`).
const LOCAL_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
// IPv6 (the 2001:2::/48 benchmarking range): the same roles.
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);
const PEER_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);
const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2);

/// A node namespace whose eth0 faces a peer node namespace; the datapath loaded but not attached.
struct Harness {
    dp: Datapath,
    maps: KernelMaps,
    reconciler: Reconciler,
    ifindex: u32,
    node_mac: [u8; 6],
    peer_mac: [u8; 6],
    pin_dir: PathBuf,
    /// The node side of the local pod's veth (`lxc1`), the route to LOCAL_POD.
    pod_ifindex: u32,
    pod_iface_mac: [u8; 6],
    /// The namespace at the other end of `eth0`.
    peer_netns: String,
}

/// Removes a test's pins, also when loading failed before there was a harness.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `test` inside a fresh node namespace with a loaded datapath.
fn with_datapath(test: impl FnOnce(&mut Harness) + Send + 'static) {
    with_datapath_logging(0, test)
}

fn with_datapath_logging(bpf_log_level: u8, test: impl FnOnce(&mut Harness) + Send + 'static) {
    with_datapath_config(
        exposure::datapath::Capacity {
            bpf_log_level,
            ..Default::default()
        },
        test,
    )
}

fn with_datapath_config(
    capacity: exposure::datapath::Capacity,
    test: impl FnOnce(&mut Harness) + Send + 'static,
) {
    let prefix = unique_prefix("p");
    let node = Netns::create(&format!("{prefix}-node")).unwrap();
    let peer = Netns::create(&format!("{prefix}-peer")).unwrap();
    node.ip(&format!(
        "link add eth0 type veth peer name eth0 netns {}",
        peer.name()
    ))
    .unwrap();
    node.ip(&format!("addr add {NODE}/24 dev eth0")).unwrap();
    peer.ip(&format!("addr add {PEER_NODE}/24 dev eth0"))
        .unwrap();
    node.ip("link set eth0 up").unwrap();
    peer.ip("link set eth0 up").unwrap();
    node.ip(&format!("route add 198.19.2.0/24 via {PEER_NODE}"))
        .unwrap();
    node.ip(&format!("addr add {NODE6}/64 dev eth0 nodad"))
        .unwrap();
    peer.ip(&format!("addr add {PEER_NODE6}/64 dev eth0 nodad"))
        .unwrap();
    node.ip(&format!("-6 route add 2001:2:0:2::/64 via {PEER_NODE6}"))
        .unwrap();
    // bpf_fib_lookup answers "forwarding disabled" otherwise, as the kernel would for routing.
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();
    node.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    for peer_ip in [PEER_NODE.to_string(), PEER_NODE6.to_string()] {
        node.exec("ping", &["-c", "1", "-W", "2", &peer_ip])
            .unwrap();
    }
    // The local pod's interface: routed and with a known neighbour, as a CNI sets it up.
    node.ip("link add lxc1 type veth peer name lxc1p").unwrap();
    node.ip("link set lxc1 up").unwrap();
    node.ip("link set lxc1p up").unwrap();
    node.ip(&format!("route add {LOCAL_POD}/32 dev lxc1"))
        .unwrap();
    node.ip(&format!(
        "neigh add {LOCAL_POD} lladdr {} dev lxc1 nud permanent",
        mac_text(LOCAL_POD_MAC)
    ))
    .unwrap();
    node.ip(&format!("-6 route add {LOCAL_POD6}/128 dev lxc1"))
        .unwrap();
    node.ip(&format!(
        "-6 neigh add {LOCAL_POD6} lladdr {} dev lxc1 nud permanent",
        mac_text(LOCAL_POD_MAC)
    ))
    .unwrap();
    let pod_iface_mac = node.mac("lxc1").unwrap();
    let node_mac = node.mac("eth0").unwrap();
    let peer_mac = peer.mac("eth0").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{prefix}")));
    let pin_dir = pins.0.clone();
    let peer_netns = peer.name().to_string();
    node.run(move || {
        let dp = Datapath::load_with(&pin_dir, capacity).expect("load datapath");
        let mut maps = KernelMaps::open(&pin_dir).expect("open maps");
        let ifindex = nix::net::if_::if_nametoindex("eth0").expect("eth0");
        let pod_ifindex = nix::net::if_::if_nametoindex("lxc1").expect("lxc1");
        maps.set_node_addr(ifindex, NODE.into()).unwrap();
        maps.set_node_addr(ifindex, NODE6.into()).unwrap();
        let reconciler = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let mut h = Harness {
            dp,
            maps,
            reconciler,
            ifindex,
            node_mac,
            peer_mac,
            pin_dir,
            pod_ifindex,
            pod_iface_mac,
            peer_netns,
        };
        test(&mut h);
    })
    .unwrap();
    drop(peer);
}

/// [`with_datapath`] with the SNAT ports `first..=last` (`--snat-port-range`).
fn with_snat_ports(first: u16, last: u16, test: impl FnOnce(&mut Harness) + Send + 'static) {
    let capacity = exposure::datapath::Capacity {
        snat_ports: exposure::datapath::PortRange { first, last },
        ..Default::default()
    };
    with_datapath_config(capacity, test)
}

/// The `i`th of many client addresses, 250 to a /24 from 198.18.`subnet`.0 on.
fn nth_client(subnet: u8, i: u16) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, subnet + (i / 250) as u8, (i % 250) as u8 + 1)
}

fn name(n: &str) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: n.into(),
        port: String::new(),
        protocol: Protocol::Tcp,
        family: exposure::model::IpFamily::V4,
        scope: exposure::model::Scope::External,
    }
}

/// hello-world: NodePort 30600 + LB IP, TCP and UDP, with the given backends (port 50000).
fn hello(backends: &[(Ipv4Addr, bool)]) -> DesiredState {
    let mut state = DesiredState::default();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mut s = DesiredService::default();
        s.frontends.insert(
            FrontendAddr {
                ip: NODE.into(),
                port: NODE_PORT,
                protocol,
                scope: exposure::model::Scope::External,
            },
            FrontendKind::NodePort,
        );
        s.frontends.insert(
            FrontendAddr {
                ip: LB.into(),
                port: 60000,
                protocol,
                scope: exposure::model::Scope::External,
            },
            FrontendKind::LoadBalancer,
        );
        s.backends = backends
            .iter()
            .map(|(ip, local)| BackendAddr {
                ip: (*ip).into(),
                port: 50000,
                local: *local,
            })
            .collect();
        state.services.insert(
            ServicePortName {
                protocol,
                family: exposure::model::IpFamily::V4,
                ..name("hello-world")
            },
            std::sync::Arc::new(s),
        );
    }
    state
}

impl Harness {
    /// A frame from a client, addressed to the node's MAC (as XDP_TX and the FIB lookup of a
    /// remote flow need it).
    fn client_frame(&self, mut frame: FrameSpec) -> Vec<u8> {
        frame.dst_mac = self.node_mac;
        frame.build()
    }

    /// A frame from the peer node (the remote pod's), to the node's MAC.
    fn peer_frame(&self, mut frame: FrameSpec) -> Vec<u8> {
        frame.src_mac = self.peer_mac;
        frame.dst_mac = self.node_mac;
        frame.build()
    }

    /// A TCP segment from `client` to the NodePort.
    fn tcp_to_node_port(&self, client: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
        self.client_frame(FrameSpec::tcp(client, (NODE, NODE_PORT), flags))
    }

    /// A TCP segment from the remote pod to the node's SNAT `port`.
    fn tcp_from_remote_pod(&self, port: u16, flags: u8) -> Vec<u8> {
        self.peer_frame(FrameSpec::tcp((REMOTE_POD, 50000), (NODE, port), flags))
    }

    fn program(&mut self, state: &DesiredState) {
        let report = self.reconciler.reconcile(state, &mut self.maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }

    fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.xdp_on(self.ifindex, frame)
    }

    /// [`Harness::xdp`] for a frame that arrives on interface `ifindex`.
    fn xdp_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut ctx = [0u32; 6]; // struct xdp_md
        ctx[1] = frame.len() as u32; // data_end
        ctx[3] = ifindex; // ingress_ifindex
        let ctx: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        };
        let r = self
            .dp
            .xdp()
            .unwrap()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN (xdp)");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run(TC_PROGRAM, frame)
    }

    fn tc_ingress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run(TC_INGRESS_PROGRAM, frame)
    }

    /// A frame from a pod, at tc ingress of its interface.
    fn tc_from_pod(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run(TC_FROM_POD_PROGRAM, frame)
    }

    /// [`Harness::tc`] for a packet that came in by interface `ingress_ifindex` (one XDP handed
    /// to tc ingress, which sent it on here), not from the node itself.
    fn tc_came_in_by(&mut self, ingress_ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run_from(TC_PROGRAM, ingress_ifindex, frame)
    }

    fn tc_run(&mut self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc_run_from(program, 0, frame)
    }

    fn tc_run_from(&mut self, program: &str, ingress_ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct __sk_buff up to `cb`, with the device the packet is on: eth0, where tc is.
        let mut ctx = [0u32; 12];
        ctx[9] = ingress_ifindex;
        ctx[10] = self.ifindex; // ifindex
        let ctx: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        };
        let r = self
            .dp
            .tc_program(program)
            .unwrap()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN (tc)");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.maps
            .counters()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| v)
    }

    /// The backend a UDP datagram from the client's `sport` to `to` is translated to.
    fn udp_backend(&mut self, sport: u16, to: (Ipv4Addr, u16)) -> Ipv4Addr {
        let (_, out) = self.xdp(&FrameSpec::udp((CLIENT, sport), to).build());
        frame::parse(&out).unwrap().dst
    }

    /// UDP flows from `sports` to `to` once `gone` left the Service: those that went to it go on
    /// to another backend (and their flow records it), the rest stay where `first` says.
    fn assert_udp_flows_left(
        &mut self,
        sports: std::ops::Range<u16>,
        to: (Ipv4Addr, u16),
        first: &[Ipv4Addr],
        gone: Ipv4Addr,
    ) {
        for (i, sport) in sports.enumerate() {
            let now = self.udp_backend(sport, to);
            if first[i] == gone {
                assert_ne!(
                    now, gone,
                    "flow {sport} still sent to the endpoint that left"
                );
                assert_eq!(
                    self.flow((CLIENT, sport), to, UDP).unwrap().backend_addr,
                    exposure_common::Addr::from(now),
                    "flow {sport} does not record its new backend"
                );
            } else {
                assert_eq!(now, first[i], "flow {sport} moved");
            }
        }
    }

    /// The IPv4 reply entry of the flow whose client sends from `port`.
    fn reply_for_client_port(&self, port: u16) -> Option<exposure_common::Reply> {
        let port = exposure_common::port(port);
        let mut replies = self.maps.replies4.iter().filter_map(Result::ok);
        replies.find(|(_, r)| r.client_port == port).map(|(_, r)| r)
    }

    fn flow(
        &self,
        client: (Ipv4Addr, u16),
        frontend: (Ipv4Addr, u16),
        proto: u8,
    ) -> Option<exposure_common::Flow> {
        let key = FlowKey {
            saddr: exposure_common::Addr::from(client.0),
            daddr: exposure_common::Addr::from(frontend.0),
            sport: exposure_common::port(client.1),
            dport: exposure_common::port(frontend.1),
            proto,
            _pad: [0; 3],
        };
        self.maps.flow(&key)
    }
}

fn assert_checksums(p: &frame::Parsed) {
    assert!(p.ip_checksum_ok, "IPv4 header checksum wrong: {p:?}");
    assert!(p.l4_checksum_ok, "L4 checksum wrong: {p:?}");
}

#[test]
fn tcp_to_local_backend_is_dnated_and_passed_up() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        // Without --xdp-redirect-to-pods a listed pod interface changes nothing.
        h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap();
        let input = FrameSpec::tcp((CLIENT, 40000), (NODE, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        let p = frame::parse(&out).unwrap();
        assert_eq!(
            (p.src, p.sport),
            (CLIENT, 40000),
            "client address preserved"
        );
        assert_eq!((p.dst, p.dport), (LOCAL_POD, 50000));
        assert_checksums(&p);
        assert_eq!(
            out[..12],
            input[..12],
            "MACs untouched: the kernel routes it to the pod"
        );
        let flow = h
            .flow((CLIENT, 40000), (NODE, NODE_PORT), TCP)
            .expect("flow tracked");
        assert_eq!(flow.flags & FLOW_REMOTE, 0);
        assert_eq!(h.counter(Counter::ToLocal), 1);
    });
}

#[test]
fn local_flows_go_straight_to_a_listed_pod_interface() {
    local_flows_to_a_listed_pod_interface(RedirectToPods::AtXdp);
}

#[test]
fn local_flows_to_a_listed_pod_interface_are_handed_to_tc() {
    local_flows_to_a_listed_pod_interface(RedirectToPods::AtTc);
}

fn local_flows_to_a_listed_pod_interface(mode: RedirectToPods) {
    let capacity = exposure::datapath::Capacity {
        redirect_to_pods: mode,
        ..Default::default()
    };
    let at_tc = mode == RedirectToPods::AtTc;
    // XDP redirects the frame itself; for tc it passes the frame up with the pod's interface in
    // its metadata (a test run's output starts at the metadata).
    let (sent, meta) = if at_tc {
        (XDP_PASS, std::mem::size_of::<TcHandoff>())
    } else {
        (XDP_REDIRECT, 0)
    };
    // Counted where it leaves for the pod: at XDP, or at tc (which these runs do not reach).
    let redirected = if at_tc { 0 } else { 3 };
    with_datapath_config(capacity, move |h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        // lxc1 not listed yet: the kernel routes the flow, as without the option.
        let stack = FrameSpec::tcp((CLIENT, 40000), (NODE, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&stack);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out.len(), stack.len(), "no metadata");
        assert_eq!(out[..12], stack[..12], "MACs untouched");

        assert_eq!(h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap(), 1);
        for flags in [SYN, ACK] {
            let input = FrameSpec::tcp((CLIENT, 40001), (NODE, NODE_PORT), flags).build();
            let (verdict, out) = h.xdp(&input);
            assert_eq!(verdict, sent, "flags {flags:#x}");
            assert_eq!(out.len(), meta + input.len());
            if at_tc {
                let word = |i: usize| u32::from_ne_bytes(out[i..i + 4].try_into().unwrap());
                assert_eq!((word(0), word(4)), (HANDOFF_TO_POD, h.pod_ifindex));
            }
            let out = &out[meta..];
            let p = frame::parse(out).unwrap();
            assert_eq!(
                (p.src, p.sport),
                (CLIENT, 40001),
                "client address preserved"
            );
            assert_eq!((p.dst, p.dport), (LOCAL_POD, 50000));
            assert_checksums(&p);
            assert_eq!(out[..6], LOCAL_POD_MAC, "to the pod's MAC");
            assert_eq!(out[6..12], h.pod_iface_mac, "from the pod interface's MAC");
        }
        // A checksum left partial by a local sender: made whole for the frame XDP redirects, kept
        // partial for the skb the kernel hands to tc.
        let input = partial(FrameSpec::tcp((CLIENT, 40009), (NODE, NODE_PORT), SYN).build());
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, sent);
        let out = &out[meta..];
        assert_eq!(frame::parse(out).unwrap().dst, LOCAL_POD);
        if at_tc {
            assert!(is_partial(out), "partial, with the pod's address");
        } else {
            assert_checksums(&frame::parse(out).unwrap());
        }
        let flow = h
            .flow((CLIENT, 40001), (NODE, NODE_PORT), TCP)
            .expect("flow tracked");
        assert_ne!(flow.flags & FLOW_TO_POD, 0);
        assert_eq!(flow.ifindex, h.pod_ifindex);
        assert_eq!(h.counter(Counter::RedirectedToPod), redirected);
        assert_eq!(h.counter(Counter::ToLocal), 4);

        // The flow that started before lxc1 was listed stays with the kernel's routing.
        let input = FrameSpec::tcp((CLIENT, 40000), (NODE, NODE_PORT), ACK).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out.len(), input.len(), "no metadata");

        // Interface taken out (the pod is gone): its flows fall back to the stack, MACs untouched.
        assert_eq!(h.maps.set_pod_ifaces(&Default::default()).unwrap(), 1);
        let input = FrameSpec::tcp((CLIENT, 40001), (NODE, NODE_PORT), ACK).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out[..12], input[..12]);
        assert_eq!(out.len(), input.len(), "no metadata");
        assert_eq!(frame::parse(&out).unwrap().dst, LOCAL_POD);
        assert_eq!(h.counter(Counter::RedirectedToPod), redirected);

        // A pod interface with a smaller MTU than eth0's: its new flows stay with the stack,
        // which fragments or answers too big packets; an MTU as large is fine.
        assert_eq!(h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap(), 1);
        for (mtu, client_port, to_pod) in [(1400, 40002, false), (1500, 40003, true)] {
            ip(&format!("link set lxc1 mtu {mtu}"));
            let input = FrameSpec::tcp((CLIENT, client_port), (NODE, NODE_PORT), SYN).build();
            let (verdict, out) = h.xdp(&input);
            let flow = h
                .flow((CLIENT, client_port), (NODE, NODE_PORT), TCP)
                .unwrap();
            assert_eq!(flow.flags & FLOW_TO_POD != 0, to_pod, "lxc1 MTU {mtu}");
            if !to_pod {
                assert_eq!((verdict, out.len()), (XDP_PASS, input.len()));
                assert_eq!(out[..12], input[..12], "MACs untouched");
            }
        }
    });
}

#[test]
fn replies_of_flows_sent_to_a_pod_go_back_past_the_stack() {
    for mode in [RedirectToPods::AtXdp, RedirectToPods::AtTc] {
        replies_of_flows_sent_to_a_pod(mode);
    }
}

/// The client's router, as the frames of these tests come from it.
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn replies_of_flows_sent_to_a_pod(mode: RedirectToPods) {
    let capacity = exposure::datapath::Capacity {
        redirect_to_pods: mode,
        ..Default::default()
    };
    with_datapath_config(capacity, move |h| {
        let mut both = hello(&[(LOCAL_POD, true)]);
        both.services.extend(hello6(&[(LOCAL_POD6, true)]).services);
        h.program(&both);
        let from_router = |h: &Harness, mut spec: FrameSpec| {
            spec.src_mac = ROUTER_MAC;
            spec.dst_mac = h.node_mac;
            spec.build()
        };
        // A flow that started before lxc1 was listed goes through the stack both ways.
        h.xdp(&from_router(
            h,
            FrameSpec::tcp((CLIENT, 41000), (NODE, NODE_PORT), SYN),
        ));
        h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap();
        let tcp = |sport, flags| FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), flags);
        h.xdp(&from_router(h, tcp(41001, SYN)));
        h.xdp(&from_router(
            h,
            FrameSpec::udp((CLIENT, 41002), (LB, 60000)),
        ));
        let mut spec6 = frame::FrameSpec6::tcp((CLIENT6, 41003), (NODE6, NODE_PORT), SYN);
        spec6.src_mac = ROUTER_MAC;
        spec6.dst_mac = h.node_mac;
        h.xdp(&spec6.build());

        // Their replies, as the pod sends them (to its interface's MAC, from the pod's address):
        // back to the client's router from the interface its packets came in on, untranslated
        // (tc egress there translates, as for any local reply).
        let pod_iface_mac = h.pod_iface_mac;
        let from_pod = |mut spec: FrameSpec| {
            spec.src_mac = LOCAL_POD_MAC;
            spec.dst_mac = pod_iface_mac;
            spec.build()
        };
        for reply in [
            from_pod(FrameSpec::tcp(
                (LOCAL_POD, 50000),
                (CLIENT, 41001),
                SYN | ACK,
            )),
            from_pod(FrameSpec::udp((LOCAL_POD, 50000), (CLIENT, 41002))),
        ] {
            let (verdict, out) = h.tc_from_pod(&reply);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out[..6], ROUTER_MAC, "to the client's router");
            assert_eq!(out[6..12], h.node_mac, "from the node's interface");
            assert_eq!(out[12..], reply[12..], "the packet itself untouched");
        }
        let mut reply6 = frame::FrameSpec6::tcp((LOCAL_POD6, 50000), (CLIENT6, 41003), SYN | ACK);
        reply6.src_mac = LOCAL_POD_MAC;
        reply6.dst_mac = h.pod_iface_mac;
        let reply6 = reply6.build();
        let (verdict, out) = h.tc_from_pod(&reply6);
        assert_eq!(verdict, TC_ACT_REDIRECT, "IPv6");
        assert_eq!(out[..12], [ROUTER_MAC, h.node_mac].concat());
        assert_eq!(out[12..], reply6[12..]);
        // tc egress on eth0, where they arrive, translates them.
        let (verdict, out) = h.tc(&out);
        assert_eq!(verdict, TC_ACT_OK);
        let p = parse6_ok(&out);
        assert_eq!((p.src, p.sport), (NODE6, NODE_PORT));
        // So do the pod's ICMP errors about such flows (conntrack would find no connection).
        let macs = [ROUTER_MAC, h.node_mac].concat();
        let with_pod_macs = |mut f: Vec<u8>| {
            f[..12].copy_from_slice(&[pod_iface_mac, LOCAL_POD_MAC].concat());
            f
        };
        let got = FrameSpec::udp((CLIENT, 41002), (LOCAL_POD, 50000)).build();
        let error = with_pod_macs(icmp_error(LOCAL_POD, CLIENT, 3, 3, &got));
        let (verdict, out) = h.tc_from_pod(&error);
        assert_eq!((verdict, &out[..12]), (TC_ACT_REDIRECT, &macs[..]));
        let (verdict, out) = h.tc(&out);
        assert_eq!(verdict, TC_ACT_OK);
        assert_icmp_quote(&out, (LB, CLIENT), (CLIENT, 41002), (LB, 60000));
        let got6 = frame::FrameSpec6::tcp((CLIENT6, 41003), (LOCAL_POD6, 50000), SYN).build();
        let error6 = with_pod_macs(icmp6_error(LOCAL_POD6, CLIENT6, 1, 4, &got6));
        let (verdict, out) = h.tc_from_pod(&error6);
        assert_eq!((verdict, &out[..12]), (TC_ACT_REDIRECT, &macs[..]));
        let (verdict, out) = h.tc(&out);
        assert_eq!(verdict, TC_ACT_OK);
        assert_icmp6_quote(&out, (NODE6, CLIENT6), (CLIENT6, 41003), (NODE6, NODE_PORT));
        assert_eq!(h.counter(Counter::RepliesFromPod), 5);

        // Left to the stack: the replies of the flow it routes, the pod's other traffic, and
        // the replies of a flow that is over.
        let rst = from_pod(FrameSpec::tcp((LOCAL_POD, 50000), (CLIENT, 41001), RST));
        let stack_flow = FrameSpec::tcp((CLIENT, 41000), (LOCAL_POD, 50000), SYN).build();
        for other in [
            with_pod_macs(icmp_error(LOCAL_POD, CLIENT, 3, 3, &stack_flow)),
            from_pod(FrameSpec::tcp(
                (LOCAL_POD, 50000),
                (CLIENT, 41000),
                SYN | ACK,
            )),
            from_pod(FrameSpec::udp((LOCAL_POD, 50000), (CLIENT, 41009))),
            from_pod(FrameSpec::tcp((LOCAL_POD, 40000), (PEER_NODE, 443), SYN)),
        ] {
            let (verdict, out) = h.tc_from_pod(&other);
            assert_eq!(verdict as i32, TC_ACT_UNSPEC);
            assert_eq!(out, other);
        }
        // The pod resets its connection: the reset goes the same way, and ends the flow there.
        assert_eq!(h.tc_from_pod(&rst).0, TC_ACT_REDIRECT);
        assert_eq!(h.tc(&rst).0, TC_ACT_OK);
        age_flows(h, 11);
        let (verdict, out) = h.tc_from_pod(&rst);
        assert_eq!(
            (verdict as i32, out),
            (TC_ACT_UNSPEC, rst),
            "a flow that is over"
        );
        assert_eq!(h.counter(Counter::RepliesFromPod), 6);
    });
}

#[test]
fn tc_ingress_leaves_packets_without_a_hand_off_alone() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        // A test run's skb has no XDP metadata: whatever the packet, tc ingress lets it be.
        for input in [
            FrameSpec::tcp((CLIENT, 40000), (LOCAL_POD, 50000), ACK).build(),
            FrameSpec::udp((CLIENT, 40000), (NODE, NODE_PORT)).build(),
        ] {
            let (verdict, out) = h.tc_ingress(&input);
            assert_eq!(verdict as i32, TC_ACT_UNSPEC);
            assert_eq!(out, input);
        }
        assert_eq!(h.counter(Counter::RedirectedToPod), 0);
    });
}

#[test]
fn udp_to_load_balancer_ip_and_zero_checksum_stays_zero() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let (verdict, out) = h.xdp(&FrameSpec::udp((CLIENT, 5353), (LB, 60000)).build());
        assert_eq!(verdict, XDP_PASS);
        let p = frame::parse(&out).unwrap();
        assert_eq!((p.dst, p.dport, p.proto), (LOCAL_POD, 50000, UDP));
        assert_checksums(&p);
        assert!(!p.udp_checksum_zero);

        let mut spec = FrameSpec::udp((CLIENT, 5354), (LB, 60000));
        spec.udp_no_checksum = true;
        let (_, out) = h.xdp(&spec.build());
        let p = frame::parse(&out).unwrap();
        assert_eq!(p.dst, LOCAL_POD);
        assert!(
            p.udp_checksum_zero,
            "a disabled UDP checksum must stay disabled"
        );
        assert!(p.ip_checksum_ok);
    });
}

#[test]
fn remote_backend_gets_snat_and_is_sent_back_out_then_reply_is_reversed() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let mut input = FrameSpec::tcp((CLIENT, 40001), (NODE, NODE_PORT), SYN);
        input.dst_mac = h.node_mac;
        let input = input.build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(
            verdict, XDP_TX,
            "same interface: transmitted straight back out"
        );
        let p = frame::parse(&out).unwrap();
        assert_eq!((p.dst, p.dport), (REMOTE_POD, 50000));
        assert_eq!(p.src, NODE, "SNAT to the node address");
        assert!(
            p.sport >= SNAT_PORT_MIN,
            "SNAT port {} outside the reserved range",
            p.sport
        );
        assert_eq!(p.dst_mac, h.peer_mac, "next hop is the other node");
        assert_eq!(p.src_mac, h.node_mac);
        assert_checksums(&p);
        assert_eq!(h.counter(Counter::ToRemote), 1);

        // The remote pod answers the node on the SNAT port.
        let mut reply = FrameSpec::tcp((REMOTE_POD, 50000), (NODE, p.sport), SYN | ACK);
        reply.src_mac = h.peer_mac;
        reply.dst_mac = h.node_mac;
        let (verdict, out) = h.xdp(&reply.build());
        assert_eq!(verdict, XDP_TX);
        let r = frame::parse(&out).unwrap();
        assert_eq!(
            (r.src, r.sport),
            (NODE, NODE_PORT),
            "client sees the NodePort"
        );
        assert_eq!((r.dst, r.dport), (CLIENT, 40001));
        assert_eq!(
            r.dst_mac,
            input[6..12],
            "back to the MAC the client's frame came from"
        );
        assert_eq!(r.src_mac, h.node_mac);
        assert_checksums(&r);
        assert_eq!(h.counter(Counter::RepliesXdp), 1);
    });
}

#[test]
fn local_backend_reply_is_reversed_at_tc_egress() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        h.xdp(&FrameSpec::tcp((CLIENT, 40002), (NODE, NODE_PORT), SYN).build());
        for proto in [TCP, UDP] {
            if proto == UDP {
                h.xdp(&FrameSpec::udp((CLIENT, 40002), (NODE, NODE_PORT)).build());
            }
            let reply = match proto {
                TCP => FrameSpec::tcp((LOCAL_POD, 50000), (CLIENT, 40002), SYN | ACK),
                _ => FrameSpec::udp((LOCAL_POD, 50000), (CLIENT, 40002)),
            };
            let (verdict, out) = h.tc(&reply.build());
            assert_eq!(verdict, TC_ACT_OK);
            let p = frame::parse(&out).unwrap();
            assert_eq!((p.src, p.sport), (NODE, NODE_PORT));
            assert_eq!((p.dst, p.dport), (CLIENT, 40002));
            assert_checksums(&p);
        }
        // Unrelated egress traffic is left alone.
        let other = FrameSpec::tcp((LOCAL_POD, 50000), (CLIENT, 49999), ACK).build();
        let (verdict, out) = h.tc(&other);
        assert_ne!(verdict, TC_ACT_OK);
        assert_eq!(out, other);
    });
}

/// Egress skbs may carry their headers outside the linear part (a large frame from a packet
/// socket has only its Ethernet header there): tc reads headers in place, so it pulls them first.
#[test]
fn a_reply_with_headers_outside_the_linear_part_is_reversed_at_tc_egress() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        h.xdp(&FrameSpec::udp((CLIENT, 40003), (NODE, NODE_PORT)).build());
        h.dp.attach("eth0", aya::programs::XdpMode::Skb).unwrap();
        // Frames above a page are paged by the packet socket; the veth takes them with a larger MTU.
        // This namespace's end, then the peer's.
        ip("link set eth0 mtu 9000");
        ip(&format!("-n {} link set eth0 mtu 9000", h.peer_netns));
        let mut reply = FrameSpec::udp((LOCAL_POD, 50000), (CLIENT, 40003));
        reply.payload = vec![7; 6000];
        let reply = reply.build();
        let tap = PacketSocket::bound(h.ifindex);
        PacketSocket::bound(h.ifindex).send(&reply);
        // What left eth0 after tc egress: the tap sees frames as the device sends them.
        let sent = (0..100)
            .filter_map(|_| tap.recv())
            .filter_map(|f| frame::parse(&f))
            .find(|p| p.dport == 40003)
            .expect("the reply left eth0");
        assert_eq!((sent.src, sent.sport), (NODE, NODE_PORT));
        assert_eq!(sent.l4.len(), 8 + 6000);
        assert_checksums(&sent);
        assert_eq!(h.counter(Counter::RepliesTc), 1);
    });
}

/// An `AF_PACKET` socket on one interface of the calling thread's namespace: sends frames as
/// they are and receives every frame the interface sends or receives (200 ms timeout).
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bound(ifindex: u32) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd};
        let all = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as i32) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = all;
        at.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &at as *const _ as *const libc::sockaddr,
                len,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                len,
            )
        };
        assert_eq!(r, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    fn recv(&self) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 16384];
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}

#[test]
fn non_service_traffic_passes_untouched() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let tcp_other_port = FrameSpec::tcp((CLIENT, 40000), (NODE, 22), SYN).build();
        let udp_other_addr =
            FrameSpec::udp((CLIENT, 40000), (Ipv4Addr::new(198, 18, 0, 99), NODE_PORT)).build();
        let cluster_ip = FrameSpec::tcp(
            (CLIENT, 40000),
            (Ipv4Addr::new(198, 18, 50, 10), 60000),
            SYN,
        )
        .build();
        let mut icmp = FrameSpec::udp((CLIENT, 0), (NODE, 0)).build();
        icmp[14 + 9] = frame::ICMP;
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        let mut ipv6 = vec![0u8; 14 + 40 + 20];
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        for frame in [tcp_other_port, udp_other_addr, cluster_ip, icmp, arp, ipv6] {
            let (verdict, out) = h.xdp(&frame);
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(out, frame, "must not be modified");
        }
        assert_eq!(h.counter(Counter::FrontendPackets), 0);
    });
}

#[test]
fn truncated_and_garbage_frames_pass_safely() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let good = FrameSpec::tcp((CLIENT, 40000), (NODE, NODE_PORT), SYN).build();
        // Cut inside Ethernet, inside IPv4, inside the ports and inside the TCP header.
        for len in [0usize, 6, 13, 14, 20, 33, 34, 36, 40, 53] {
            let frame = &good[..len];
            if frame.len() < 14 {
                continue; // BPF_PROG_TEST_RUN itself requires an Ethernet header
            }
            let (verdict, out) = h.xdp(frame);
            assert_eq!(verdict, XDP_PASS, "len {len}");
            assert_eq!(out, frame, "len {len}");
            // tc egress, which pulls headers it can't see in place, leaves them alone too (its
            // test runs need the whole IPv4 header).
            if len >= 34 {
                let (verdict, out) = h.tc(frame);
                assert_eq!(verdict as i32, TC_ACT_UNSPEC, "len {len}");
                assert_eq!(out, frame, "len {len}");
            }
        }
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x43; // IHL 3 < 5
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        let mut seed = 0x1234_5678u32;
        let mut garbage = vec![0u8; 80];
        for b in garbage.iter_mut() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (seed >> 16) as u8;
        }
        garbage[12..14].copy_from_slice(&[0x08, 0x00]);
        for frame in [bad_ihl, bad_version, garbage] {
            let (verdict, out) = h.xdp(&frame);
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(out, frame);
            let (verdict, out) = h.tc(&frame);
            assert_eq!(verdict as i32, TC_ACT_UNSPEC);
            assert_eq!(out, frame);
        }
        assert!(h.counter(Counter::Malformed) >= 2);
    });
}

/// A datagram of 1,000 bytes of payload in `spec` (which gives addresses, ports and protocol)
/// and its three IPv4 fragments (IP ID `id`).
fn fragmented(mut spec: FrameSpec, id: u16) -> (Vec<u8>, Vec<Vec<u8>>) {
    spec.payload = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let whole = spec.build();
    let frags = frame::fragment4(&whole, id, 400);
    assert_eq!(frags.len(), 3);
    (whole, frags)
}

/// Runs every fragment through `run`, asserts each one's verdict and that its IP ID stayed, and
/// returns the datagram they make, checksums checked.
fn through(
    frags: &[Vec<u8>],
    verdict: u32,
    mut run: impl FnMut(&[u8]) -> (u32, Vec<u8>),
) -> frame::Parsed {
    let outs: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let (v, out) = run(f);
            assert_eq!(v, verdict);
            assert_eq!(out[18..20], f[18..20], "IP ID kept");
            out
        })
        .collect();
    let whole = frame::reassemble4(&outs).expect("fragments reassemble (IP checksums right)");
    let p = frame::parse(&whole).unwrap();
    assert_checksums(&p);
    p
}

#[test]
fn fragmented_datagrams_to_a_local_backend_and_their_replies_are_translated() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        for (proto, sport) in [(UDP, 40100), (TCP, 40101)] {
            let spec = |src, dst| match proto {
                TCP => FrameSpec::tcp(src, dst, SYN),
                _ => FrameSpec::udp(src, dst),
            };
            let (sent, frags) = fragmented(spec((CLIENT, sport), (NODE, NODE_PORT)), 0x4001);
            let p = through(&frags, XDP_PASS, |f| h.xdp(f));
            assert_eq!((p.src, p.sport), (CLIENT, sport));
            assert_eq!((p.dst, p.dport), (LOCAL_POD, 50000));
            let header = if proto == TCP { 20 } else { 8 };
            assert_eq!(
                p.l4[header..],
                sent[14 + 20 + header..],
                "payload untouched"
            );

            // The pod's answer, fragmented by its stack, leaves through tc.
            let (_, frags) = fragmented(spec((LOCAL_POD, 50000), (CLIENT, sport)), 0x4002);
            let r = through(&frags, TC_ACT_OK, |f| h.tc(f));
            assert_eq!((r.src, r.sport), (NODE, NODE_PORT), "frontend restored");
            assert_eq!((r.dst, r.dport), (CLIENT, sport));
        }
        assert_eq!(h.counter(Counter::NewFlows), 2);
        assert_eq!(h.counter(Counter::ToLocal), 6);
        assert_eq!(h.counter(Counter::RepliesTc), 6);
        assert_eq!(h.counter(Counter::Fragments), 0);
    });
}

#[test]
fn fragmented_datagrams_to_a_remote_backend_and_their_replies_are_translated() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let mut spec = FrameSpec::udp((CLIENT, 40102), (LB, 60000));
        spec.dst_mac = h.node_mac;
        let (_, frags) = fragmented(spec, 0x4003);
        let p = through(&frags, XDP_TX, |f| h.xdp(f));
        assert_eq!((p.src, p.dst, p.dport), (NODE, REMOTE_POD, 50000));
        assert!(p.sport >= SNAT_PORT_MIN, "SNAT port {}", p.sport);
        assert_eq!((p.dst_mac, p.src_mac), (h.peer_mac, h.node_mac));

        let mut reply = FrameSpec::udp((REMOTE_POD, 50000), (NODE, p.sport));
        reply.src_mac = h.peer_mac;
        reply.dst_mac = h.node_mac;
        let (_, frags) = fragmented(reply, 0x4004);
        let r = through(&frags, XDP_TX, |f| h.xdp(f));
        assert_eq!((r.src, r.sport), (LB, 60000), "client sees the LB address");
        assert_eq!((r.dst, r.dport), (CLIENT, 40102));
        assert_eq!(
            r.dst_mac,
            [0x02, 0, 0, 0, 0, 0x01],
            "back to the client's MAC"
        );
        assert_eq!(h.counter(Counter::ToRemote), 3);
        assert_eq!(h.counter(Counter::RepliesXdp), 3);
    });
}

/// Later fragments take their datagram's ports from its first fragment: without it they are
/// left alone, and after a refused first fragment they are dropped (only the first is answered).
#[test]
fn fragments_without_their_first_or_after_a_refused_one_are_not_translated() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        // The first fragment was lost (or came before the datapath): the rest pass untouched.
        let (_, frags) = fragmented(FrameSpec::udp((CLIENT, 40103), (NODE, NODE_PORT)), 0x4005);
        for f in &frags[1..] {
            assert_eq!(h.xdp(f), (XDP_PASS, f.clone()));
        }
        assert_eq!(h.counter(Counter::Fragments), 2);
        // Another datagram between the same hosts (another IP ID) is not mistaken for it.
        let (_, other) = fragmented(FrameSpec::udp((CLIENT, 40104), (NODE, NODE_PORT)), 0x4006);
        h.xdp(&other[0]);
        assert_eq!(h.xdp(&frags[2]), (XDP_PASS, frags[2].clone()));
        assert_eq!(h.counter(Counter::Fragments), 3);
        // Not for a frontend: every fragment is the kernel's.
        let (_, ssh) = fragmented(FrameSpec::tcp((CLIENT, 40105), (NODE, 22), ACK), 0x4007);
        for f in &ssh {
            assert_eq!(h.xdp(f), (XDP_PASS, f.clone()));
        }

        h.program(&hello(&[]));
        let (_, frags) = fragmented(FrameSpec::udp((CLIENT, 40106), (NODE, NODE_PORT)), 0x4008);
        let (verdict, out) = h.xdp(&frags[0]);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            frame::parse(&out).unwrap().l4[..2],
            [3, 3],
            "port unreachable"
        );
        for f in &frags[1..] {
            assert_eq!(h.xdp(f).0, XDP_DROP);
        }
        assert_eq!(h.counter(Counter::NoBackend), 1);
        assert_eq!(h.counter(Counter::NewFlows), 1, "only the other datagram's");
    });
}

#[test]
fn ip_options_are_handled() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let mut opts = FrameSpec::tcp((CLIENT, 40003), (NODE, NODE_PORT), SYN);
        opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let (verdict, out) = h.xdp(&opts.build());
        assert_eq!(verdict, XDP_PASS);
        let p = frame::parse(&out).unwrap();
        assert_eq!((p.dst, p.dport, p.sport), (LOCAL_POD, 50000, 40003));
        assert_checksums(&p);
    });
}

#[test]
fn no_endpoints_refuses_with_icmp_port_unreachable() {
    with_datapath(|h| {
        h.program(&hello(&[]));
        let input = FrameSpec::tcp((CLIENT, 40004), (NODE, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_TX);
        let p = frame::parse(&out).unwrap();
        assert_eq!(p.proto, frame::ICMP);
        assert_eq!((p.src, p.dst), (NODE, CLIENT));
        assert_eq!(
            &p.l4[..2],
            &[3, 3],
            "destination unreachable / port unreachable"
        );
        assert_eq!(
            &p.l4[8..28],
            &input[14..34],
            "quotes the original IP header"
        );
        assert_eq!(
            &p.l4[28..36],
            &input[34..42],
            "and the first 8 bytes of TCP"
        );
        assert_eq!(p.dst_mac, input[6..12]);
        assert_checksums(&p);
        assert!(h.flow((CLIENT, 40004), (NODE, NODE_PORT), TCP).is_none());
        assert_eq!(h.counter(Counter::NoBackend), 1);
    });
}

#[test]
fn local_policy_without_local_endpoints_drops() {
    with_datapath(|h| {
        let mut state = hello(&[]);
        for s in state.services.values_mut() {
            std::sync::Arc::make_mut(s).when_empty = WhenEmpty::Drop;
        }
        h.program(&state);
        let (verdict, _) = h.xdp(&FrameSpec::udp((CLIENT, 40005), (NODE, NODE_PORT)).build());
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(h.counter(Counter::DroppedNoLocalBackend), 1);
    });
}

#[test]
fn flows_stick_to_their_backend_and_new_flows_avoid_removed_ones() {
    with_datapath(|h| {
        let pods: Vec<Ipv4Addr> = (2..5).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        h.program(&hello(&pods.iter().map(|p| (*p, true)).collect::<Vec<_>>()));
        let mut first = Vec::new();
        for sport in 41000..41060u16 {
            let (_, out) = h.xdp(&FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), SYN).build());
            first.push(frame::parse(&out).unwrap().dst);
        }
        for pod in &pods {
            assert!(
                first.contains(pod),
                "{pod} never chosen: selection does not spread"
            );
        }
        // Remove one endpoint: established flows keep theirs, new flows never get it.
        let removed = pods[0];
        h.program(&hello(
            &pods[1..].iter().map(|p| (*p, true)).collect::<Vec<_>>(),
        ));
        for (i, sport) in (41000..41060u16).enumerate() {
            let (_, out) = h.xdp(&FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), ACK).build());
            assert_eq!(
                frame::parse(&out).unwrap().dst,
                first[i],
                "flow {sport} moved"
            );
        }
        for sport in 42000..42100u16 {
            let (_, out) = h.xdp(&FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), SYN).build());
            assert_ne!(frame::parse(&out).unwrap().dst, removed);
        }
    });
}

#[test]
fn udp_flows_leave_a_removed_endpoint_and_the_others_stay() {
    with_datapath(|h| {
        let pods: Vec<Ipv4Addr> = (2..5).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        h.program(&hello(&pods.iter().map(|p| (*p, true)).collect::<Vec<_>>()));
        let first: Vec<Ipv4Addr> = (41000..41060u16)
            .map(|sport| h.udp_backend(sport, (NODE, NODE_PORT)))
            .collect();
        let removed = pods[0];
        assert!(
            first.contains(&removed),
            "no flow on the endpoint to remove"
        );
        h.program(&hello(
            &pods[1..].iter().map(|p| (*p, true)).collect::<Vec<_>>(),
        ));
        // As kube-proxy clears a removed UDP endpoint's conntrack entries: the same datagram flow
        // goes on to a remaining endpoint instead of into the void; the other flows stay put.
        h.assert_udp_flows_left(41000..41060, (NODE, NODE_PORT), &first, removed);
    });
}

#[test]
fn udp_flows_leave_an_endpoint_that_only_another_service_keeps() {
    with_datapath(|h| {
        let pods: Vec<Ipv4Addr> = (2..5).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        // "a" on the NodePort with all three pods; "b" on the LB address with the first only.
        let state = |a_pods: &[Ipv4Addr]| {
            let svc = |front: (Ipv4Addr, u16), backends: &[Ipv4Addr]| {
                let mut s = DesiredService::default();
                let addr = FrontendAddr {
                    ip: front.0.into(),
                    port: front.1,
                    protocol: Protocol::Udp,
                    scope: exposure::model::Scope::External,
                };
                s.frontends.insert(addr, FrontendKind::NodePort);
                s.backends = backends
                    .iter()
                    .map(|ip| BackendAddr {
                        ip: (*ip).into(),
                        port: 50000,
                        local: true,
                    })
                    .collect();
                std::sync::Arc::new(s)
            };
            let udp = |n: &str| ServicePortName {
                protocol: Protocol::Udp,
                ..name(n)
            };
            let mut state = DesiredState::default();
            state
                .services
                .insert(udp("a"), svc((NODE, NODE_PORT), a_pods));
            state
                .services
                .insert(udp("b"), svc((LB, 60000), &pods[..1]));
            state
        };
        h.program(&state(&pods));
        let first: Vec<Ipv4Addr> = (41000..41060u16)
            .map(|sport| h.udp_backend(sport, (NODE, NODE_PORT)))
            .collect();
        let shared = pods[0];
        assert!(first.contains(&shared), "no flow on the shared endpoint");
        assert_eq!(h.udp_backend(42000, (LB, 60000)), shared);
        h.program(&state(&pods[1..]));
        h.assert_udp_flows_left(41000..41060, (NODE, NODE_PORT), &first, shared);
        assert_eq!(
            h.udp_backend(42000, (LB, 60000)),
            shared,
            "b's flow keeps its endpoint"
        );
    });
}

#[test]
fn rst_closes_the_flow_and_a_new_syn_reselects() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40006);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), RST).build());
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_ne!(flow.flags & FLOW_CLOSING, 0);
        // Port reuse: a new SYN starts a new flow (with the new backend set).
        let other = Ipv4Addr::new(198, 19, 1, 9);
        h.program(&hello(&[(other, true)]));
        let (_, out) = h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        assert_eq!(frame::parse(&out).unwrap().dst, other);
        assert_eq!(
            h.flow(client, (NODE, NODE_PORT), TCP).unwrap().flags & FLOW_CLOSING,
            0
        );
    });
}

#[test]
fn a_reset_from_the_backend_closes_the_flow() {
    with_datapath(|h| {
        // A local backend: its RST is seen at tc egress.
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40007);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        let rst = FrameSpec::tcp((LOCAL_POD, 50000), client, RST | ACK).build();
        assert_eq!(h.tc(&rst).0, TC_ACT_OK);
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_ne!(flow.flags & FLOW_CLOSING, 0, "local flow closed by the pod");

        // A remote backend: its RST comes back to the SNAT port, at XDP.
        h.program(&hello(&[(REMOTE_POD, false)]));
        let client = (CLIENT, 40008);
        let syn = h.tcp_to_node_port(client, SYN);
        let (_, out) = h.xdp(&syn);
        let snat_port = frame::parse(&out).unwrap().sport;
        assert_eq!(
            h.xdp(&h.tcp_from_remote_pod(snat_port, RST | ACK)).0,
            XDP_TX
        );
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_ne!(
            flow.flags & FLOW_CLOSING,
            0,
            "remote flow closed by the pod"
        );
        // So the client's next SYN from that port is a new flow at once.
        let (_, out) = h.xdp(&syn);
        assert_eq!(frame::parse(&out).unwrap().dst, REMOTE_POD);
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_eq!(flow.flags & FLOW_CLOSING, 0, "a new flow");
    });
}

/// A client that reuses its port after a connection closed gets a new flow, perhaps to another
/// backend. The old backend's late packets (a retransmitted FIN, an RST) still reach the client
/// as the old connection's, but must not touch the new connection's state: a stray RST marked it
/// closing, so it ended after a closing connection's lifetime idle (and its next packet was a
/// new flow with another SNAT port: to its backend, a stranger).
#[test]
fn late_packets_of_a_closed_connection_leave_the_new_one_on_its_port_alone() {
    with_datapath(|h| {
        let other_remote = Ipv4Addr::new(198, 19, 2, 3);
        let other_local = Ipv4Addr::new(198, 19, 1, 3);
        // Remote: the old connection's backend answers at XDP, to its SNAT port.
        h.program(&hello(&[(REMOTE_POD, false)]));
        let client = (CLIENT, 40009);
        let (_, out) = h.xdp(&h.tcp_to_node_port(client, SYN));
        let old_port = frame::parse(&out).unwrap().sport;
        h.xdp(&h.tcp_to_node_port(client, RST));
        h.program(&hello(&[(other_remote, false)]));
        let (_, out) = h.xdp(&h.tcp_to_node_port(client, SYN));
        let new = frame::parse(&out).unwrap();
        assert_eq!(new.dst, other_remote);
        let late = h.tcp_from_remote_pod(old_port, RST | ACK);
        let (verdict, out) = h.xdp(&late);
        assert_eq!(
            verdict, XDP_TX,
            "the old connection's packet goes to its client"
        );
        assert_eq!(frame::parse(&out).unwrap().dport, client.1);
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_eq!(flow.flags & FLOW_CLOSING, 0, "the new connection closed");
        // Past a closing connection's lifetime, idle: still the same connection.
        age_flows(h, 30);
        let (_, out) = h.xdp(&h.tcp_to_node_port(client, ACK));
        let later = frame::parse(&out).unwrap();
        assert_eq!((later.dst, later.sport), (other_remote, new.sport));

        // Local: the old connection's pod answers through tc egress.
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40010);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), RST).build());
        h.program(&hello(&[(other_local, true)]));
        let (_, out) = h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        assert_eq!(frame::parse(&out).unwrap().dst, other_local);
        let late = FrameSpec::tcp((LOCAL_POD, 50000), client, RST | ACK).build();
        let (verdict, out) = h.tc(&late);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(frame::parse(&out).unwrap().src, NODE, "from the frontend");
        let flow = h.flow(client, (NODE, NODE_PORT), TCP).unwrap();
        assert_eq!(
            flow.flags & FLOW_CLOSING,
            0,
            "the new local connection closed"
        );
    });
}

/// A client that reaches a local pod from one port through two frontends (the NodePort and the
/// LB IP: a NAT in front of many clients does that) would put both flows on one tuple at the pod.
/// While the first is open the second is dropped and counted, as conntrack drops a connection
/// whose reply tuple clashes; the first keeps its answers. Once it is over, the second goes.
#[test]
fn a_second_frontend_from_the_same_port_to_a_local_pod_waits_for_the_first_flow() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let answer_from = |h: &mut Harness, client: (Ipv4Addr, u16), proto: u8| {
            let answer = FrameSpec::of(proto, (LOCAL_POD, 50000), client, ACK).build();
            let (verdict, out) = h.tc(&answer);
            assert_eq!(verdict, TC_ACT_OK);
            let p = frame::parse(&out).unwrap();
            (p.src, p.sport)
        };
        for (proto, client) in [(TCP, (CLIENT, 40400)), (UDP, (CLIENT, 40401))] {
            let to =
                |dst: (Ipv4Addr, u16), flags: u8| FrameSpec::of(proto, client, dst, flags).build();
            assert_eq!(h.xdp(&to((NODE, NODE_PORT), SYN)).0, XDP_PASS);
            assert_eq!(answer_from(h, client, proto), (NODE, NODE_PORT));
            let collisions = h.counter(Counter::TupleCollision);
            assert_eq!(h.xdp(&to((LB, 60000), SYN)).0, XDP_DROP, "proto {proto}");
            assert_eq!(h.counter(Counter::TupleCollision), collisions + 1);
            assert_eq!(
                answer_from(h, client, proto),
                (NODE, NODE_PORT),
                "the first's"
            );
            // The first is over (closed, or its lifetime passed): the second takes the tuple.
            if proto == TCP {
                h.xdp(&to((NODE, NODE_PORT), RST));
            } else {
                age_flows(h, 31);
            }
            assert_eq!(h.xdp(&to((LB, 60000), SYN)).0, XDP_PASS, "proto {proto}");
            assert_eq!(answer_from(h, client, proto), (LB, 60000));
            if proto == TCP {
                // The closed first flow's late FIN reaches the pod, but leaves the second's
                // state alone.
                h.xdp(&to((NODE, NODE_PORT), FIN | ACK));
                let reply = h
                    .reply_for_client_port(client.1)
                    .expect("the second flow's reply entry");
                let fin = exposure_common::FLOW_FIN_CLIENT;
                assert_eq!(reply.flags & fin, 0, "the second flow closing");
            }
        }
    });
}

#[test]
fn snat_ports_of_closed_connections_are_reused_at_once() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        // More connections to one remote backend than there are SNAT ports (4,536), one after
        // another, each reset by the client: every one gets a port.
        let total = SNAT_PORT_MAX - SNAT_PORT_MIN + 1 + 1_500;
        for i in 0..total {
            let client = (nth_client(1, i), 10_000 + i);
            assert_eq!(
                h.xdp(&h.tcp_to_node_port(client, SYN)).0,
                XDP_TX,
                "connection {i}"
            );
            assert_eq!(
                h.xdp(&h.tcp_to_node_port(client, RST)).0,
                XDP_TX,
                "reset {i}"
            );
        }
        assert_eq!(h.counter(Counter::SnatExhausted), 0);
        // An open connection on a port taken over from a closed one: a stray RST from the old
        // client must not close the new connection's entry.
        let fresh = (Ipv4Addr::new(198, 18, 250, 1), 33_333);
        let (_, out) = h.xdp(&h.tcp_to_node_port(fresh, SYN));
        let snat_port = exposure_common::port(frame::parse(&out).unwrap().sport);
        let old = h
            .maps
            .flows4
            .iter()
            .filter_map(Result::ok)
            .find(|(k, f)| f.snat_port == snat_port && k.sport != exposure_common::port(fresh.1))
            .map(|(k, _)| FlowKey::from(k))
            .expect("the port was a closed connection's");
        let old_client = (
            std::net::IpAddr::from(old.saddr),
            exposure_common::port_host(old.sport),
        );
        let std::net::IpAddr::V4(old_ip) = old_client.0 else {
            panic!("IPv4 client expected");
        };
        // Past the refresh interval, so the old flow's RST would write through to a reply entry.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        h.xdp(&h.tcp_to_node_port((old_ip, old_client.1), RST));
        let reply_of_fresh = h
            .reply_for_client_port(fresh.1)
            .expect("the new connection's reply entry");
        assert_eq!(reply_of_fresh.flags & FLOW_CLOSING, 0);
        // Open connections keep theirs: with the ports all held, new ones are refused (dropped,
        // counted) rather than given a port in use.
        for i in 0..total {
            h.xdp(&h.tcp_to_node_port((nth_client(210, i), 20_000), SYN));
        }
        assert!(h.counter(Counter::SnatExhausted) > 0);
    });
}

#[test]
fn open_connections_get_snat_ports_until_the_range_is_nearly_full() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        // Connections that stay open, to one remote backend, until 90% of its SNAT ports are
        // held: each new one still finds a free port (with a few tries only, about half of the
        // range was usable before some new connections found none).
        let range = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;
        let open = range * 9 / 10;
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..open {
            let (verdict, out) = h.xdp(&h.tcp_to_node_port((nth_client(1, i), 10_000 + i), SYN));
            assert_eq!(verdict, XDP_TX, "connection {i} of {open}");
            let sport = frame::parse(&out).unwrap().sport;
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&sport));
            assert!(ports.insert(sport), "port {sport} given twice");
        }
        assert_eq!(h.counter(Counter::SnatExhausted), 0);
    });
}

/// Every flow entry, both directions and families, made `secs` older.
fn age_flows(h: &mut Harness, secs: u64) {
    fn age<K: aya::Pod, V: aya::Pod + LastSeen>(
        map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
        secs: u64,
    ) {
        let entries: Vec<_> = map.iter().filter_map(Result::ok).collect();
        for (k, mut v) in entries {
            let t = v.last_seen();
            *t = t.wrapping_sub(secs * 1_000_000_000);
            map.insert(k, v, 0).unwrap();
        }
    }
    let maps = &mut h.maps;
    age(&mut maps.flows4, secs);
    age(&mut maps.flows6, secs);
    age(&mut maps.replies4, secs);
    age(&mut maps.replies6, secs);
}

/// The clock reading of a flow or reply entry's last refresh.
trait LastSeen {
    fn last_seen(&mut self) -> &mut u64;
}

impl LastSeen for exposure_common::Flow {
    fn last_seen(&mut self) -> &mut u64 {
        &mut self.last_seen_ns
    }
}

impl LastSeen for exposure_common::Reply {
    fn last_seen(&mut self) -> &mut u64 {
        &mut self.last_seen_ns
    }
}

/// `--flow-timeout-*`: the lifetimes set at load time decide when a flow is over, each phase by
/// its own (here a UDP exchange 5 s, an established TCP connection 100 s).
#[test]
fn flows_end_after_the_lifetimes_set_at_load_time() {
    let mut lifetimes = exposure_common::FlowLifetimes::DEFAULT;
    lifetimes.ns[exposure_common::FlowPhase::UdpExchange as usize] = 5_000_000_000;
    lifetimes.ns[exposure_common::FlowPhase::TcpOpen as usize] = 100_000_000_000;
    let capacity = exposure::datapath::Capacity {
        flow_lifetimes: lifetimes,
        ..Default::default()
    };
    with_datapath_config(capacity, |h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let (udp_client, tcp_client) = ((CLIENT, 40100), (CLIENT, 40101));
        let query = FrameSpec::udp(udp_client, (NODE, NODE_PORT)).build();
        assert_eq!(h.xdp(&query).0, XDP_PASS);
        let answer = FrameSpec::udp((LOCAL_POD, 50000), udp_client).build();
        assert_eq!(h.tc(&answer).0, TC_ACT_OK);
        h.xdp(&FrameSpec::tcp(tcp_client, (NODE, NODE_PORT), SYN).build());
        h.tc(&FrameSpec::tcp((LOCAL_POD, 50000), tcp_client, SYN | ACK).build());
        let ack = FrameSpec::tcp(tcp_client, (NODE, NODE_PORT), ACK).build();
        h.xdp(&ack);
        let tcp_flags = h.flow(tcp_client, (NODE, NODE_PORT), TCP).unwrap().flags;
        assert_ne!(tcp_flags & FLOW_ESTABLISHED, 0);
        assert_eq!(h.counter(Counter::NewFlows), 2);

        // 6 s on: the UDP exchange is over (the default keeps it 30 s), TCP goes on.
        age_flows(h, 6);
        assert_eq!(h.xdp(&query).0, XDP_PASS);
        assert_eq!(
            h.counter(Counter::NewFlows),
            3,
            "the query starts a new flow"
        );
        assert_eq!(h.xdp(&ack).0, XDP_PASS);
        assert_eq!(
            h.counter(Counter::NewFlows),
            3,
            "the connection's flow holds"
        );
        // 101 s after its last packet (the default keeps it 6 h): over.
        age_flows(h, 101);
        assert_eq!(h.xdp(&ack).0, XDP_PASS);
        assert_eq!(
            h.counter(Counter::NewFlows),
            4,
            "the connection's flow was over"
        );
    });
}

#[test]
fn connections_that_never_complete_their_handshake_give_up_their_snat_ports_after_a_minute() {
    with_datapath(|h| {
        // A local backend's answer is seen at tc egress: the handshake completes there too.
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40009);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        let handshake = FLOW_OPENING | FLOW_REPLIED | FLOW_ESTABLISHED;
        let state = |h: &Harness| h.flow(client, (NODE, NODE_PORT), TCP).unwrap().flags & handshake;
        assert_eq!(state(h), FLOW_OPENING);
        let syn_ack = FrameSpec::tcp((LOCAL_POD, 50000), client, SYN | ACK).build();
        assert_eq!(h.tc(&syn_ack).0, TC_ACT_OK);
        assert_eq!(state(h), FLOW_OPENING | FLOW_REPLIED);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), ACK).build());
        assert_eq!(state(h), handshake);

        h.program(&hello(&[(REMOTE_POD, false)]));
        // Unanswered SYNs (a backend that hangs, or a SYN flood the backend answers but no client
        // acknowledges) from more clients than there are SNAT ports: the ports run out.
        let range = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;
        let mut answered = 0;
        for i in 0..range + 500 {
            let (verdict, out) = h.xdp(&h.tcp_to_node_port((nth_client(1, i), 20_000), SYN));
            if verdict == XDP_TX && i % 2 == 0 {
                let snat_port = frame::parse(&out).unwrap().sport;
                assert_eq!(
                    h.xdp(&h.tcp_from_remote_pod(snat_port, SYN | ACK)).0,
                    XDP_TX
                );
                answered += 1;
            }
        }
        assert!(answered > 2_000);
        let exhausted = h.counter(Counter::SnatExhausted);
        assert!(exhausted > 0, "the range is full");
        // A minute on, the half-open connections' ports are free: a new client gets one, and
        // completes its handshake.
        age_flows(h, 61);
        let done = (Ipv4Addr::new(198, 18, 250, 9), 40_000);
        let (verdict, out) = h.xdp(&h.tcp_to_node_port(done, SYN));
        assert_eq!(verdict, XDP_TX, "a port freed by a half-open connection");
        assert_eq!(h.counter(Counter::SnatExhausted), exhausted);
        let snat_port = frame::parse(&out).unwrap().sport;
        assert_eq!(
            h.xdp(&h.tcp_from_remote_pod(snat_port, SYN | ACK)).0,
            XDP_TX
        );
        assert_eq!(h.xdp(&h.tcp_to_node_port(done, ACK)).0, XDP_TX);
        let flow = h.flow(done, (NODE, NODE_PORT), TCP).unwrap();
        assert_eq!(
            flow.flags & (FLOW_OPENING | FLOW_REPLIED | FLOW_ESTABLISHED),
            FLOW_OPENING | FLOW_REPLIED | FLOW_ESTABLISHED
        );
        // A minute on, the established connection holds on to its port and backend; the
        // half-open ones are gone, so every new client gets a port again.
        age_flows(h, 61);
        let new_flows = h.counter(Counter::NewFlows);
        let (verdict, out) = h.xdp(&h.tcp_to_node_port(done, ACK));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(frame::parse(&out).unwrap().sport, snat_port);
        assert_eq!(h.counter(Counter::NewFlows), new_flows, "the same flow");
        for i in 0..500 {
            let client = (nth_client(210, i), 30_000);
            assert_eq!(
                h.xdp(&h.tcp_to_node_port(client, SYN)).0,
                XDP_TX,
                "new client {i}"
            );
        }
        assert_eq!(h.counter(Counter::SnatExhausted), exhausted);
    });
}

#[test]
fn udp_queries_end_after_30_s_and_streams_after_2_minutes() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let datagram = |h: &mut Harness, sport: u16| {
            let (verdict, out) =
                h.xdp(&h.client_frame(FrameSpec::udp((CLIENT, sport), (NODE, NODE_PORT))));
            assert_eq!(verdict, XDP_TX);
            frame::parse(&out).unwrap().sport
        };
        let answer = |h: &mut Harness, snat_port: u16| {
            let frame = h.peer_frame(FrameSpec::udp((REMOTE_POD, 50000), (NODE, snat_port)));
            assert_eq!(h.xdp(&frame).0, XDP_TX);
        };
        // A query and its answer; a stream (the client goes on after the answer).
        let query = datagram(h, 5301);
        answer(h, query);
        let stream = datagram(h, 5302);
        answer(h, stream);
        assert_eq!(datagram(h, 5302), stream);
        let state = |h: &Harness, sport| {
            h.flow((CLIENT, sport), (NODE, NODE_PORT), UDP)
                .unwrap()
                .flags
                & (FLOW_REPLIED | FLOW_ESTABLISHED)
        };
        assert_eq!(state(h, 5301), FLOW_REPLIED);
        assert_eq!(state(h, 5302), FLOW_REPLIED | FLOW_ESTABLISHED);
        // Half a minute on, the query's flow is over (its next datagram starts a new one); the
        // stream's holds, with its SNAT port.
        age_flows(h, 31);
        let new_flows = h.counter(Counter::NewFlows);
        assert_eq!(datagram(h, 5302), stream);
        assert_eq!(h.counter(Counter::NewFlows), new_flows, "the stream's flow");
        datagram(h, 5301);
        assert_eq!(h.counter(Counter::NewFlows), new_flows + 1, "a new flow");
        // Two minutes after its last datagram, the stream's is over too.
        age_flows(h, 121);
        datagram(h, 5302);
        assert_eq!(h.counter(Counter::NewFlows), new_flows + 2);
    });
}

#[test]
fn a_configured_snat_port_range_is_the_one_flows_take_and_replies_come_back_on() {
    with_snat_ports(40_000, 40_099, |h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..90u16 {
            let (verdict, out) = h.xdp(&h.tcp_to_node_port((CLIENT, 20_000 + i), SYN));
            assert_eq!(verdict, XDP_TX, "connection {i}");
            ports.insert(frame::parse(&out).unwrap().sport);
        }
        assert_eq!(ports.len(), 90);
        assert!(
            ports.iter().all(|p| (40_000..=40_099).contains(p)),
            "{ports:?}"
        );
        // A reply on one of them is translated back to its client.
        let snat_port = *ports.first().unwrap();
        let (verdict, out) = h.xdp(&h.tcp_from_remote_pod(snat_port, SYN | ACK));
        assert_eq!(verdict, XDP_TX);
        let back = frame::parse(&out).unwrap();
        assert_eq!((back.src, back.sport), (NODE, NODE_PORT));
        assert_eq!(back.dst, CLIENT);
        // A port of the default range is no SNAT port here: such a packet is the kernel's.
        assert_eq!(
            h.xdp(&h.tcp_from_remote_pod(SNAT_PORT_MIN, ACK)).0,
            XDP_PASS
        );
        // 100 ports: the 101st open connection finds none.
        for i in 90..120u16 {
            h.xdp(&h.tcp_to_node_port((CLIENT, 20_000 + i), SYN));
        }
        assert!(h.counter(Counter::SnatExhausted) >= 20);
    });
}

#[test]
fn cluster_traffic_to_snat_ports_without_state_passes() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let stray = FrameSpec::tcp((REMOTE_POD, 50000), (NODE, 61234), ACK).build();
        let (verdict, out) = h.xdp(&stray);
        assert_eq!((verdict, out), (XDP_PASS, stray));
    });
}

/// A segment of the node's own connection from `port` to the remote pod, as it leaves at tc egress
/// (from a socket bound there, or NATed there by the kernel: kube-proxy's masquerade picks source
/// ports at random).
fn own_to_remote_pod(port: u16, flags: u8) -> Vec<u8> {
    FrameSpec::tcp((NODE, port), (REMOTE_POD, 50000), flags).build()
}

#[test]
fn a_node_connection_on_a_closed_flows_snat_port_gets_its_own_replies() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let client = (CLIENT, 40100);
        let (_, out) = h.xdp(&h.tcp_to_node_port(client, SYN));
        let snat_port = frame::parse(&out).unwrap().sport;
        h.xdp(&h.tcp_to_node_port(client, FIN | ACK));
        assert_eq!(
            h.xdp(&h.tcp_from_remote_pod(snat_port, FIN | ACK)).0,
            XDP_TX
        );
        // The node's own connection leaves from that port to the same pod: it goes out as it is,
        // and the pod's answer is the kernel's, not sent to the old client.
        let own = own_to_remote_pod(snat_port, SYN);
        let (verdict, out) = h.tc(&own);
        assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, own));
        let answer = h.tcp_from_remote_pod(snat_port, SYN | ACK);
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer.clone()));
        assert_eq!(
            h.tc(&own_to_remote_pod(snat_port, ACK)).0 as i32,
            TC_ACT_UNSPEC
        );
        // A straggler of the old client's (its last ACK) is a new flow, on another port.
        let (verdict, out) = h.xdp(&h.tcp_to_node_port(client, ACK));
        assert_eq!(verdict, XDP_TX);
        assert_ne!(frame::parse(&out).unwrap().sport, snat_port);
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer));
    });
}

#[test]
fn new_flows_take_no_snat_port_a_node_connection_holds_until_it_closes() {
    with_snat_ports(40_000, 40_003, |h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        // The node's connections to the remote pod hold three of the four ports; one is answered.
        for port in 40_000..40_003 {
            assert_eq!(h.tc(&own_to_remote_pod(port, SYN)).0 as i32, TC_ACT_UNSPEC);
        }
        let answer = h.tcp_from_remote_pod(40_001, SYN | ACK);
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer));
        h.tc(&own_to_remote_pod(40_001, ACK));
        // A new flow gets the fourth; the next finds none.
        let (verdict, out) = h.xdp(&h.tcp_to_node_port((CLIENT, 20_000), SYN));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(frame::parse(&out).unwrap().sport, 40_003);
        assert_eq!(
            h.xdp(&h.tcp_to_node_port((CLIENT, 20_001), SYN)).0,
            XDP_DROP
        );
        assert_eq!(h.counter(Counter::SnatExhausted), 1);
        // The answered connection closes (FIN both ways): its port serves the next flow.
        h.tc(&own_to_remote_pod(40_001, FIN | ACK));
        assert_eq!(h.xdp(&h.tcp_from_remote_pod(40_001, FIN | ACK)).0, XDP_PASS);
        let (verdict, out) = h.xdp(&h.tcp_to_node_port((CLIENT, 20_002), SYN));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(frame::parse(&out).unwrap().sport, 40_001);
        // A minute on, the unanswered ones have given theirs up (as have the flows, unanswered
        // too): four new flows take the four ports.
        age_flows(h, 61);
        let ports: std::collections::BTreeSet<u16> = (0..4)
            .map(|i| {
                let (verdict, out) = h.xdp(&h.tcp_to_node_port((CLIENT, 20_010 + i), SYN));
                assert_eq!(verdict, XDP_TX, "flow {i}");
                frame::parse(&out).unwrap().sport
            })
            .collect();
        assert_eq!(ports, (40_000..=40_003).collect());
    });
}

#[test]
fn a_node_connection_colliding_with_an_open_flow_is_dropped_and_counted() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let client = (CLIENT, 40200);
        let (_, out) = h.xdp(&h.tcp_to_node_port(client, SYN));
        let snat_port = frame::parse(&out).unwrap().sport;
        assert_eq!(
            h.xdp(&h.tcp_from_remote_pod(snat_port, SYN | ACK)).0,
            XDP_TX
        );
        h.xdp(&h.tcp_to_node_port(client, ACK));
        // The kernel's NAT picked the port an open flow to the same pod has: its SYN would make the
        // pod answer to the flow's client. It is dropped, and counted.
        assert_eq!(h.tc(&own_to_remote_pod(snat_port, SYN)).0, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::HostCollision), 1);
        let (verdict, out) = h.xdp(&h.tcp_from_remote_pod(snat_port, ACK));
        assert_eq!(verdict, XDP_TX, "the open flow keeps its replies");
        assert_eq!(frame::parse(&out).unwrap().dst, CLIENT);
        // To another peer the same source port is no collision.
        let elsewhere = FrameSpec::tcp((NODE, snat_port), (PEER_NODE, 50000), SYN).build();
        assert_eq!(h.tc(&elsewhere).0 as i32, TC_ACT_UNSPEC);
        assert_eq!(h.counter(Counter::HostCollision), 1);
        // Nor from the NodePort's port to the open flow's client (its peer would answer to the
        // flow's backend).
        let to_client = FrameSpec::tcp((NODE, NODE_PORT), client, SYN).build();
        assert_eq!(h.tc(&to_client).0, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::HostCollision), 2);
        assert_eq!(h.xdp(&h.tcp_to_node_port(client, ACK)).0, XDP_TX);
    });
}

#[test]
fn a_node_connection_from_a_node_port_gets_its_own_replies() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        // The kernel's NAT gave the node's connections to a peer the NodePort as source port.
        let peer = (PEER_NODE, 443);
        let tcp_own = |flags| FrameSpec::tcp((NODE, NODE_PORT), peer, flags).build();
        let tcp_answer =
            |h: &Harness, flags| h.peer_frame(FrameSpec::tcp(peer, (NODE, NODE_PORT), flags));
        let own = tcp_own(SYN);
        let (verdict, out) = h.tc(&own);
        assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, own));
        let answer = tcp_answer(h, SYN | ACK);
        assert_eq!(
            h.xdp(&answer),
            (XDP_PASS, answer),
            "not a flow to the Service"
        );
        let own = FrameSpec::udp((NODE, NODE_PORT), peer).build();
        assert_eq!(h.tc(&own).0 as i32, TC_ACT_UNSPEC);
        let answer = h.peer_frame(FrameSpec::udp(peer, (NODE, NODE_PORT)));
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer));
        assert_eq!(h.counter(Counter::NewFlows), 0);
        // A port no frontend is on holds nothing.
        let elsewhere = FrameSpec::tcp((NODE, NODE_PORT + 1), peer, SYN).build();
        assert_eq!(h.tc(&elsewhere).0 as i32, TC_ACT_UNSPEC);
        assert_eq!(
            h.maps.flows4.iter().count(),
            2,
            "the TCP and UDP connections'"
        );
        // They belong to no Service: an endpoint change purging UDP flows leaves them.
        h.maps.purge_udp_flows(0, &[0]).unwrap();
        assert_eq!(h.maps.flows4.iter().count(), 2);
        // Once the TCP connection has closed, the peer connecting from that port is a client
        // of the Service.
        h.tc(&tcp_own(FIN | ACK));
        assert_eq!(h.xdp(&tcp_answer(h, FIN | ACK)).0, XDP_PASS);
        let (verdict, out) = h.xdp(&tcp_answer(h, SYN));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(frame::parse(&out).unwrap().dst, LOCAL_POD);
        assert_eq!(h.counter(Counter::NewFlows), 1);
    });
}

#[test]
fn a_node_connection_from_any_frontends_address_and_port_gets_its_own_replies() {
    with_datapath(|h| {
        // Besides the NodePort on the node's (SNAT) address and the LB IP: an externalIP that is
        // the node's address (as k3s's ServiceLB gives LoadBalancers) on a port no NodePort range
        // holds, and the NodePort on a second address of the node.
        let second = Ipv4Addr::new(198, 18, 0, 11);
        let with_more = |more: bool| {
            let mut state = hello(&[(LOCAL_POD, true)]);
            for (name, s) in state.services.iter_mut() {
                let at = |ip: Ipv4Addr, port| FrontendAddr {
                    ip: ip.into(),
                    port,
                    protocol: name.protocol,
                    scope: exposure::model::Scope::External,
                };
                let s = std::sync::Arc::make_mut(s);
                if more {
                    s.frontends.insert(at(NODE, 8443), FrontendKind::ExternalIp);
                    s.frontends
                        .insert(at(second, NODE_PORT), FrontendKind::NodePort);
                }
            }
            state
        };
        h.program(&with_more(true));
        // The LB IP as the node's (kube-vip puts it on the node's interface).
        let frontends = [(NODE, 8443), (second, NODE_PORT), (LB, 60000)];
        for (i, from) in frontends.into_iter().enumerate() {
            let peer = (PEER_NODE, 443 + i as u16);
            let own = FrameSpec::tcp(from, peer, SYN).build();
            assert_eq!(h.tc(&own).0 as i32, TC_ACT_UNSPEC, "{from:?}");
            let answer = h.peer_frame(FrameSpec::tcp(peer, from, SYN | ACK));
            assert_eq!(
                h.xdp(&answer),
                (XDP_PASS, answer),
                "from {from:?}: the node's, not a flow to the Service"
            );
        }
        assert_eq!(h.counter(Counter::NewFlows), 0);
        // With those frontends gone (their drains over: the node's connections are no flows
        // through them), their tuples hold nothing.
        h.program(&with_more(false));
        let in_use = h
            .maps
            .tcp_frontends_in_use(&exposure_common::FlowLifetimes::DEFAULT);
        let (ended, errors) = h.reconciler.end_drains(&in_use, &mut h.maps);
        assert_eq!((ended.len(), errors.len()), (2, 0), "{ended:?} {errors:?}");
        for from in [(NODE, 8443), (second, NODE_PORT)] {
            let own = FrameSpec::tcp(from, (PEER_NODE, 500), SYN).build();
            assert_eq!(h.tc(&own).0 as i32, TC_ACT_UNSPEC);
        }
        assert_eq!(h.maps.flows4.iter().count(), 3, "the first connections'");
    });
}

#[test]
fn a_node_connection_taking_a_closed_flows_tuple_leaves_the_flow_on_its_port_since_alone() {
    with_snat_ports(40_000, 40_003, |h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        // A flow from a client's port is reset; new flows from others take its SNAT port too.
        let closed = (CLIENT, 41_000);
        let (_, out) = h.xdp(&h.tcp_to_node_port(closed, SYN));
        let port = frame::parse(&out).unwrap().sport;
        h.xdp(&h.tcp_to_node_port(closed, RST));
        let other = (0..4)
            .map(|i| (nth_client(1, i), 20_000))
            .find(|&client| {
                let (_, out) = h.xdp(&h.tcp_to_node_port(client, SYN));
                frame::parse(&out).unwrap().sport == port
            })
            .expect("a new flow on the port");
        // The node's connection from the NodePort to that client's port takes the reset flow's
        // tuple; the other flow keeps its port and its replies.
        let own = FrameSpec::tcp((NODE, NODE_PORT), closed, SYN).build();
        assert_eq!(h.tc(&own).0 as i32, TC_ACT_UNSPEC);
        let (verdict, out) = h.xdp(&h.tcp_from_remote_pod(port, SYN | ACK));
        assert_eq!(verdict, XDP_TX);
        let back = frame::parse(&out).unwrap();
        assert_eq!((back.dst, back.dport), other);
    });
}

#[test]
fn replies_on_the_snat_port_of_a_flow_that_is_over_are_the_kernels() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        let (_, out) = h.xdp(&h.tcp_to_node_port((CLIENT, 40300), SYN));
        let snat_port = frame::parse(&out).unwrap().sport;
        // Never answered, the flow is over after a minute: a connection of the node's made before
        // the agent ran (so never seen at tc) may have the tuple, and gets its packets.
        age_flows(h, 61);
        let answer = h.tcp_from_remote_pod(snat_port, SYN | ACK);
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer));
    });
}

/// Likewise at tc: a local pod's packet on the tuple of a flow that is over is no answer of the
/// Service's (conntrack's entry would be gone too): it leaves with the pod's address, untouched.
/// Within the flow's lifetime it is translated.
#[test]
fn a_local_pods_packets_on_the_tuple_of_a_flow_that_is_over_are_left_alone() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40301);
        h.xdp(&FrameSpec::udp(client, (NODE, NODE_PORT)).build());
        let answer = FrameSpec::udp((LOCAL_POD, 50000), client).build();
        let (verdict, out) = h.tc(&answer);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(frame::parse(&out).unwrap().src, NODE);
        // A UDP exchange is over 30 s after its last datagram.
        age_flows(h, 31);
        let (verdict, out) = h.tc(&answer);
        assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, answer));
        assert_eq!(h.counter(Counter::RepliesTc), 1);
    });
}

#[test]
fn only_the_nodes_own_connections_from_snat_ports_hold_a_tuple() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        for (from, why) in [
            ((LOCAL_POD, 62_000), "a pod's, forwarded"),
            ((NODE, 45_000), "from an ephemeral port"),
        ] {
            let segment = FrameSpec::tcp(from, (REMOTE_POD, 50000), SYN).build();
            let (verdict, out) = h.tc(&segment);
            assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, segment), "{why}");
        }
        assert_eq!(h.maps.replies4.iter().count(), 0);
    });
}

/// Runs `ip` with `args` in the namespace the harness runs in (the node's).
fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(status.success(), "ip {args}");
}

/// Programs hello-world in both families with one remote pod, 198.19.9.2 and 2001:2:0:9::2 (the
/// test routes 198.19.9.0/24 and 2001:2:0:9::/64 through an interface of its own); its addresses.
fn program_pod_behind_9(h: &mut Harness) -> (Ipv4Addr, Ipv6Addr) {
    let (pod, pod6): (Ipv4Addr, Ipv6Addr) = (
        "198.19.9.2".parse().unwrap(),
        "2001:2:0:9::2".parse().unwrap(),
    );
    let mut state = hello(&[(pod, false)]);
    state.services.extend(hello6(&[(pod6, false)]).services);
    h.program(&state);
    (pod, pod6)
}

/// A frame of `spec` with `len` bytes of payload.
fn sized(mut spec: FrameSpec, len: usize) -> Vec<u8> {
    spec.payload = vec![7; len];
    spec.build()
}

/// A node on two networks: remote pods behind eth9 (MTU 1280), clients on eth0. A packet that
/// does not fit the interface its flow leaves by is answered with ICMP fragmentation needed (or
/// packet too big) carrying that MTU, in both directions, as the kernel answers when it forwards.
#[test]
fn packets_too_big_for_the_interface_they_leave_by_are_answered_with_its_mtu() {
    with_datapath(|h| {
        ip("link add eth9 mtu 1280 type veth peer name eth9p");
        ip("link set eth9 up");
        ip("link set eth9p up");
        ip("addr add 198.18.9.10/24 dev eth9");
        ip("addr add 2001:2:9::10/64 dev eth9 nodad");
        ip("route add 198.19.9.0/24 via 198.18.9.20");
        ip("-6 route add 2001:2:0:9::/64 via 2001:2:9::20");
        ip("neigh add 198.18.9.20 lladdr 02:00:00:00:00:99 dev eth9 nud permanent");
        ip("-6 neigh add 2001:2:9::20 lladdr 02:00:00:00:00:99 dev eth9 nud permanent");
        let eth9 = nix::net::if_::if_nametoindex("eth9").unwrap();
        // Both attached in native XDP (so XDP may send frames there), as the agent marks them.
        mark_xdp(h, eth9, exposure_common::XDP_MODE_NATIVE);
        mark_xdp(h, h.ifindex, exposure_common::XDP_MODE_NATIVE);
        let (node9, node9_6): (Ipv4Addr, Ipv6Addr) = (
            "198.18.9.10".parse().unwrap(),
            "2001:2:9::10".parse().unwrap(),
        );
        h.maps.set_node_addr(eth9, node9.into()).unwrap();
        h.maps.set_node_addr(eth9, node9_6.into()).unwrap();
        let (pod, _) = program_pod_behind_9(h);

        // Fits: SNATed to eth9's address and sent there.
        let fits = sized(FrameSpec::udp((CLIENT, 40300), (NODE, NODE_PORT)), 1200);
        let (verdict, out) = h.xdp(&fits);
        assert_eq!(verdict, XDP_REDIRECT);
        let p = frame::parse(&out).unwrap();
        assert_eq!((p.src, p.dst), (node9, pod));
        let snat_port = p.sport;
        // 1,328 bytes of IP: the flow's next packet does not fit.
        let big = sized(FrameSpec::udp((CLIENT, 40300), (NODE, NODE_PORT)), 1300);
        let (verdict, out) = h.xdp(&big);
        assert_eq!(verdict, XDP_TX, "answered, back where it came from");
        let icmp = frame::parse(&out).unwrap();
        assert_checksums(&icmp);
        assert_eq!(
            (icmp.proto, icmp.src, icmp.dst),
            (frame::ICMP, NODE, CLIENT)
        );
        assert_eq!(icmp.l4[..2], [3, 4], "fragmentation needed");
        assert_eq!(icmp.l4[6..8], 1280u16.to_be_bytes(), "eth9's MTU");
        assert_eq!(icmp.l4[8..36], big[14..42], "quotes the client's packet");
        assert_eq!(icmp.dst_mac, big[6..12]);
        // A new flow whose first packet is too big: the same.
        let big_first = sized(FrameSpec::udp((CLIENT, 40301), (NODE, NODE_PORT)), 1300);
        assert_eq!(h.xdp(&big_first).0, XDP_TX);
        // IPv6: packet too big.
        let mut big6 = frame::FrameSpec6::udp((CLIENT6, 40302), (NODE6, NODE_PORT));
        big6.payload = vec![7; 1300];
        let big6 = big6.build();
        let (verdict, out) = h.xdp(&big6);
        assert_eq!(verdict, XDP_TX);
        let icmp6 = parse6_ok(&out);
        assert_eq!(
            (icmp6.next_header, icmp6.src, icmp6.dst),
            (58, NODE6, CLIENT6)
        );
        assert_eq!(icmp6.l4[..2], [2, 0], "packet too big");
        assert_eq!(icmp6.l4[4..8], 1280u32.to_be_bytes());
        assert_eq!(icmp6.l4[8..56], big6[14..62], "quotes the client's packet");
        assert_eq!(h.counter(Counter::TooBig), 3);
        assert_eq!(h.counter(Counter::ToRemote), 1);

        // The other way: the pod's replies arrive on eth9 and leave by eth0, now the smaller.
        ip("link set eth9 mtu 9000");
        ip("link set eth0 mtu 1280");
        let reply = |len| sized(FrameSpec::udp((pod, 50000), (node9, snat_port)), len);
        let (verdict, out) = h.xdp_on(eth9, &reply(1200));
        assert_eq!(verdict, XDP_REDIRECT);
        let r = frame::parse(&out).unwrap();
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (NODE, NODE_PORT, CLIENT, 40300)
        );
        let big_reply = reply(1300);
        let (verdict, out) = h.xdp_on(eth9, &big_reply);
        assert_eq!(verdict, XDP_TX, "back to the pod");
        let icmp = frame::parse(&out).unwrap();
        assert_checksums(&icmp);
        assert_eq!((icmp.src, icmp.dst), (node9, pod));
        assert_eq!(icmp.l4[..2], [3, 4]);
        assert_eq!(icmp.l4[6..8], 1280u16.to_be_bytes(), "eth0's MTU");
        assert_eq!(icmp.l4[8..36], big_reply[14..42]);
        assert_eq!(h.counter(Counter::TooBig), 4);
        assert_eq!(h.counter(Counter::RepliesXdp), 1);
    });
}

/// A flannel-style VXLAN device `vx9` (MTU 1450) to the pods behind 198.19.9.0/24 and
/// 2001:2:0:9::/64 ([`program_pod_behind_9`]); its index.
fn tunnel_to_pods_behind_9() -> u32 {
    ip("link add vx9 type vxlan id 9 dstport 8472 nolearning");
    ip("link set vx9 mtu 1450 up");
    ip("route add 198.19.9.0/24 via 198.19.9.0 dev vx9 onlink");
    ip("neigh add 198.19.9.0 lladdr 02:00:00:00:00:99 dev vx9 nud permanent");
    ip("-6 route add 2001:2:0:9::/64 via 2001:2:0:9:: dev vx9 onlink");
    ip("-6 neigh add 2001:2:0:9:: lladdr 02:00:00:00:00:99 dev vx9 nud permanent");
    nix::net::if_::if_nametoindex("vx9").unwrap()
}

/// On a driver that keeps no XDP metadata (ENA, gVNIC and netvsc among them), XDP cannot hand a
/// remote flow's packet to tc in it: it passes the packet translated, and tc ingress knows it by
/// its tuple (from a SNAT port of the node's to the backend, a flow's own) and sends it out of the
/// tunnel. Anything else from a SNAT port is left alone.
#[test]
fn without_xdp_metadata_tc_ingress_knows_remote_flows_by_their_tuple() {
    let capacity = exposure::datapath::Capacity {
        xdp_metadata: false,
        ..Default::default()
    };
    with_datapath_config(capacity, |h| {
        let vx9 = tunnel_to_pods_behind_9();
        let (pod, pod6) = program_pod_behind_9(h);
        let mut forwards = Vec::new();
        for (i, input) in [
            FrameSpec::tcp((CLIENT, 40400), (NODE, NODE_PORT), SYN).build(),
            FrameSpec::tcp((CLIENT, 40400), (NODE, NODE_PORT), ACK).build(),
            partial(FrameSpec::tcp((CLIENT, 40401), (NODE, NODE_PORT), SYN).build()),
            FrameSpec::udp((CLIENT, 40402), (NODE, NODE_PORT)).build(),
        ]
        .into_iter()
        .enumerate()
        {
            let (verdict, out) = h.xdp(&input);
            assert_eq!(
                (verdict, out.len()),
                (XDP_PASS, input.len()),
                "no metadata ({i})"
            );
            assert_eq!(
                out[..12],
                input[..12],
                "MACs untouched: addressed to this node"
            );
            let p = frame::parse(&out).unwrap();
            assert_eq!((p.src, p.dst, p.dport), (NODE, pod, 50000));
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p.sport));
            if i == 2 {
                assert!(is_partial(&out), "partial, with the new addresses");
            } else {
                assert_checksums(&p);
            }
            forwards.push(out);
        }
        let input = frame::FrameSpec6::tcp((CLIENT6, 40403), (NODE6, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!((verdict, out.len()), (XDP_PASS, input.len()));
        let p6 = parse6_ok(&out);
        assert_eq!((p6.src, p6.dst, p6.dport), (NODE6, pod6, 50000));
        forwards.push(out);
        assert_eq!(
            h.flow((CLIENT, 40400), (NODE, NODE_PORT), TCP)
                .unwrap()
                .ifindex,
            vx9
        );
        // tc ingress sends each out of the tunnel, untouched.
        for forward in &forwards {
            let (verdict, out) = h.tc_ingress(forward);
            assert_eq!((verdict, &out), (TC_ACT_REDIRECT, forward));
        }
        assert_eq!(h.counter(Counter::SentFromTcByTuple), forwards.len() as u64);
        assert_eq!(h.counter(Counter::SentFromTc), forwards.len() as u64);
        // Not a flow's: another SNAT port, another backend port, not from a SNAT port (a client
        // to a NodePort, the pod's answer), left to the kernel.
        let p = frame::parse(&forwards[0]).unwrap();
        for other in [
            FrameSpec::tcp((NODE, p.sport + 1), (pod, 50000), ACK).build(),
            FrameSpec::tcp((NODE, p.sport), (pod, 50001), ACK).build(),
            FrameSpec::tcp((CLIENT, 40400), (NODE, NODE_PORT), ACK).build(),
            FrameSpec::tcp((pod, 50000), (NODE, p.sport), ACK).build(),
        ] {
            let (verdict, out) = h.tc_ingress(&other);
            assert_eq!((verdict as i32, &out), (TC_ACT_UNSPEC, &other));
        }
        assert_eq!(h.counter(Counter::SentFromTcByTuple), forwards.len() as u64);
        // The pod's answer comes back over the LAN and goes back from XDP, as with metadata.
        let answer = FrameSpec::tcp((pod, 50000), (NODE, p.sport), SYN | ACK).build();
        let (verdict, out) = h.xdp(&answer);
        assert_eq!(verdict, XDP_TX);
        let r = frame::parse(&out).unwrap();
        assert_eq!((r.src, r.dst, r.dport), (NODE, CLIENT, 40400));
    });
}

/// Remote pods behind a VXLAN tunnel (`vx9`, as flannel's `flannel.1`), a device XDP cannot send
/// frames through: their flows are SNATed in XDP and passed up with the tunnel in the metadata,
/// for tc ingress to send there (`bpf_redirect_neigh`). So are a flow that arrives in generic
/// XDP (the kernel's generic redirect drops GSO packets) and, while it is not attached in native
/// XDP, one to another interface.
#[test]
fn remote_flows_through_a_device_xdp_cannot_send_on_are_handed_to_tc() {
    with_datapath(|h| {
        let vx9 = tunnel_to_pods_behind_9();
        let (pod, pod6) = program_pod_behind_9(h);
        let meta = std::mem::size_of::<TcHandoff>();
        // The tunnel in the metadata, then the frame SNATed to the address of the interface the
        // flow came in by (where the pod's answers come back), still addressed to this node.
        let handed = |out: &[u8], input: &[u8]| {
            assert_eq!(out.len(), meta + input.len());
            let word = |i: usize| u32::from_ne_bytes(out[i..i + 4].try_into().unwrap());
            assert_eq!((word(0), word(4)), (HANDOFF_OUT, vx9));
            assert_eq!(out[meta..meta + 12], input[..12], "MACs untouched");
            out[meta..].to_vec()
        };
        let mut snat_port = 0;
        for flags in [SYN, ACK] {
            let input = FrameSpec::tcp((CLIENT, 40400), (NODE, NODE_PORT), flags).build();
            let (verdict, out) = h.xdp(&input);
            assert_eq!(verdict, XDP_PASS, "flags {flags:#x}");
            let p = frame::parse(&handed(&out, &input)).unwrap();
            assert_eq!((p.src, p.dst, p.dport), (NODE, pod, 50000));
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p.sport));
            assert_checksums(&p);
            snat_port = p.sport;
        }
        let flow = h
            .flow((CLIENT, 40400), (NODE, NODE_PORT), TCP)
            .expect("flow tracked");
        assert_eq!(flow.ifindex, vx9);
        // tc sends it on, and if it meets tc egress (the tunnel's, where it is selected too) it
        // is the flow's own packet, not the node's colliding with the flow: it came in by the
        // client's interface, the node's own come in by none.
        let input = FrameSpec::tcp((CLIENT, 40400), (NODE, NODE_PORT), ACK).build();
        let forward = handed(&h.xdp(&input).1, &input);
        let (verdict, out) = h.tc_came_in_by(h.ifindex, &forward);
        assert_eq!((verdict as i32, &out), (TC_ACT_UNSPEC, &forward));
        assert_eq!(h.counter(Counter::HostCollision), 0);
        // With metadata, tc ingress never looks for such packets by their tuple (a test run's
        // skb has no metadata).
        assert_eq!(h.tc_ingress(&forward).0 as i32, TC_ACT_UNSPEC);
        assert_eq!(h.counter(Counter::SentFromTcByTuple), 0);
        let (verdict, _) = h.tc(&forward);
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "the node's own, on the open flow's tuple"
        );
        assert_eq!(h.counter(Counter::HostCollision), 1);
        // The pod's answer comes back over the LAN to that address, and goes back from XDP.
        let answer = FrameSpec::tcp((pod, 50000), (NODE, snat_port), SYN | ACK).build();
        let (verdict, out) = h.xdp(&answer);
        assert_eq!(verdict, XDP_TX);
        let r = frame::parse(&out).unwrap();
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (NODE, NODE_PORT, CLIENT, 40400)
        );

        // A checksum a local sender left partial stays partial: the skb goes on, through tc.
        let input = partial(FrameSpec::tcp((CLIENT, 40401), (NODE, NODE_PORT), SYN).build());
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        let out = handed(&out, &input);
        assert_eq!(frame::parse(&out).unwrap().dst, pod);
        assert!(is_partial(&out), "partial, with the new addresses");

        // Too big for the tunnel: answered with its MTU, as the kernel would when it forwards.
        let big = sized(FrameSpec::udp((CLIENT, 40402), (NODE, NODE_PORT)), 1440);
        let (verdict, out) = h.xdp(&big);
        assert_eq!(verdict, XDP_TX);
        let icmp = frame::parse(&out).unwrap();
        assert_eq!(icmp.l4[..2], [3, 4], "fragmentation needed");
        assert_eq!(icmp.l4[6..8], 1450u16.to_be_bytes(), "the tunnel's MTU");
        assert_eq!(h.counter(Counter::TooBig), 1);

        // An answer that comes in by another interface than the client's (the tunnel here: a node
        // whose pods answer through it) goes back from tc too while the client's interface runs
        // no native XDP: as it is, to the client's MAC.
        let answer = FrameSpec::tcp((pod, 50000), (NODE, snat_port), ACK).build();
        let (verdict, out) = h.xdp_on(vx9, &answer);
        assert_eq!(verdict, XDP_PASS);
        let word = |i: usize| u32::from_ne_bytes(out[i..i + 4].try_into().unwrap());
        assert_eq!((word(0), word(4)), (HANDOFF_AS_IS, h.ifindex));
        let r = frame::parse(&out[meta..]).unwrap();
        assert_eq!((r.src, r.dst, r.dport), (NODE, CLIENT, 40400));
        assert_eq!(
            r.dst_mac,
            FrameSpec::tcp((CLIENT, 1), (NODE, 1), SYN).src_mac
        );
        assert_checksums(&r);
        // At the client's interface's tc egress, from the frontend's port: the flow's reply,
        // which came in by the interface its replies come in by, not the node's connection.
        let (verdict, sent) = h.tc_came_in_by(vx9, &out[meta..]);
        assert_eq!((verdict as i32, &sent[..]), (TC_ACT_UNSPEC, &out[meta..]));
        assert_eq!(h.counter(Counter::HostCollision), 1);

        // IPv6 the same.
        let input = frame::FrameSpec6::tcp((CLIENT6, 40403), (NODE6, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        let p6 = parse6_ok(&handed(&out, &input));
        assert_eq!((p6.src, p6.dst, p6.dport), (NODE6, pod6, 50000));

        // In generic XDP a frame longer than Ethernet's may be a GSO packet: not measured whole
        // (the kernel segments it to sizes that fit), but handed on.
        mark_generic_xdp(h);
        let long = sized(FrameSpec::udp((CLIENT, 40402), (NODE, NODE_PORT)), 4000);
        let (verdict, out) = h.xdp(&long);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(frame::parse(&handed(&out, &long)).unwrap().dst, pod);
        // A frame of Ethernet's size is still measured.
        assert_eq!(h.xdp(&big).0, XDP_TX);
        assert_eq!(h.counter(Counter::TooBig), 2);

        // Through an interface attached in native XDP: from XDP, but not from generic XDP.
        mark_xdp(h, vx9, exposure_common::XDP_MODE_NATIVE);
        let input = FrameSpec::tcp((CLIENT, 40404), (NODE, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_PASS);
        handed(&out, &input);
        mark_xdp(h, h.ifindex, exposure_common::XDP_MODE_NATIVE);
        let input = FrameSpec::tcp((CLIENT, 40405), (NODE, NODE_PORT), SYN).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out.len(), input.len(), "no metadata");
        assert_eq!(out[..6], [2, 0, 0, 0, 0, 0x99], "to the next hop's MAC");
        assert_eq!(h.counter(Counter::ToRemote), 8);
        // The answer the same: redirected from native XDP to native XDP, handed to tc from
        // generic XDP, a long one (GRO's, say) unmeasured, though longer than eth0's MTU.
        let (verdict, out) = h.xdp_on(vx9, &answer);
        assert_eq!((verdict, out.len()), (XDP_REDIRECT, answer.len()));
        mark_xdp(h, vx9, exposure_common::XDP_MODE_GENERIC);
        let long = sized(FrameSpec::tcp((pod, 50000), (NODE, snat_port), ACK), 4000);
        for answer in [&answer, &long] {
            let (verdict, out) = h.xdp_on(vx9, answer);
            assert_eq!(verdict, XDP_PASS);
            assert_eq!((word(0), word(4)), (HANDOFF_AS_IS, h.ifindex));
            assert_eq!(frame::parse(&out[meta..]).unwrap().dst, CLIENT);
        }
        assert_eq!(h.counter(Counter::TooBig), 2);
        assert_eq!(h.counter(Counter::RepliesXdp), 5);
    });
}

#[test]
fn unresolved_next_hop_is_dropped_and_left_for_the_agent_to_resolve() {
    with_datapath(|h| {
        // 198.19.3.0/24 is routed via a next hop nobody has resolved (and nobody answers for).
        ip("route add 198.19.3.0/24 via 198.18.0.30");
        let pod = Ipv4Addr::new(198, 19, 3, 2);
        h.program(&hello(&[(pod, false)]));
        let (verdict, _) = h.xdp(&FrameSpec::tcp((CLIENT, 40007), (NODE, NODE_PORT), SYN).build());
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(h.counter(Counter::NeighborMissing), 1);
        assert_eq!(
            h.maps.take_neighbor_misses(),
            [(Ipv4Addr::new(198, 18, 0, 30).into(), h.ifindex)],
            "the gateway, not the pod"
        );
        assert!(
            h.flow((CLIENT, 40007), (NODE, NODE_PORT), TCP).is_none(),
            "no half-made flow left behind"
        );
    });
}

/// Collects the programs' log lines.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn kernel_log_lines_reach_the_agent_only_when_enabled() {
    for level in [4u8, 0] {
        with_datapath_logging(level, move |h| {
            let captured = Captured::default();
            let mut logger = h.dp.bpf_logger(captured.clone()).unwrap();
            h.program(&hello(&[]));
            h.xdp(&FrameSpec::tcp((CLIENT, 40010), (NODE, NODE_PORT), SYN).build());
            logger.flush();
            let lines = captured.0.lock().unwrap().clone();
            if level == 0 {
                assert!(lines.is_empty(), "logging is off: {lines:?}");
            } else {
                assert_eq!(
                    lines,
                    ["DEBUG refused 198.18.0.1:40010 -> 198.18.0.10:30600: no endpoints"]
                );
            }
        });
    }
}

/// A new flow that finds no free SNAT port is logged (from its own BPF function).
#[test]
fn kernel_log_names_a_flow_that_finds_no_snat_port() {
    let capacity = exposure::datapath::Capacity {
        bpf_log_level: 3,
        snat_ports: exposure::datapath::PortRange {
            first: 61000,
            last: 61000,
        },
        ..Default::default()
    };
    with_datapath_config(capacity, |h| {
        let captured = Captured::default();
        let mut logger = h.dp.bpf_logger(captured.clone()).unwrap();
        h.program(&hello(&[(REMOTE_POD, false)]));
        assert_eq!(h.xdp(&h.tcp_to_node_port((CLIENT, 40011), SYN)).0, XDP_TX);
        let second = (Ipv4Addr::new(198, 18, 0, 2), 40012);
        assert_eq!(h.xdp(&h.tcp_to_node_port(second, SYN)).0, XDP_DROP);
        assert_eq!(h.counter(Counter::SnatExhausted), 1);
        logger.flush();
        let lines = captured.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            ["WARN no free SNAT port for 198.18.0.2:40012 towards 198.19.2.2:50000"]
        );
    });
}

#[test]
fn client_ip_affinity_sticks_across_flows_until_the_backend_leaves() {
    with_datapath(|h| {
        let pods: Vec<Ipv4Addr> = (2..6).map(|i| Ipv4Addr::new(198, 19, 1, i)).collect();
        let sticky = |pods: &[Ipv4Addr]| {
            let mut state = hello(&pods.iter().map(|p| (*p, true)).collect::<Vec<_>>());
            for s in state.services.values_mut() {
                std::sync::Arc::make_mut(s).affinity_timeout_s = 60;
            }
            state
        };
        h.program(&sticky(&pods));
        let dst_of = |h: &mut Harness, client: Ipv4Addr, sport: u16| {
            let (_, out) = h.xdp(&FrameSpec::tcp((client, sport), (NODE, NODE_PORT), SYN).build());
            frame::parse(&out).unwrap().dst
        };
        let first = dst_of(h, CLIENT, 43000);
        for sport in 43001..43040 {
            assert_eq!(
                dst_of(h, CLIENT, sport),
                first,
                "new flow {sport} left its affinity"
            );
        }
        // Other clients still spread over all backends.
        let others: std::collections::BTreeSet<Ipv4Addr> = (10..60)
            .map(|i| dst_of(h, Ipv4Addr::new(198, 18, 0, i), 43000))
            .collect();
        assert_eq!(others.len(), pods.len());
        // The backend leaves: the client's next flow goes to one that is still there, and sticks.
        let remaining: Vec<Ipv4Addr> = pods.iter().copied().filter(|p| *p != first).collect();
        h.program(&sticky(&remaining));
        let next = dst_of(h, CLIENT, 43100);
        assert_ne!(next, first);
        assert_eq!(dst_of(h, CLIENT, 43101), next);
        // Affinity turned off forgets it all, so a backend that leaves meanwhile holds no client
        // once it is back on: the client's next flow gets one that is there (not a refusal).
        h.program(&hello(
            &remaining.iter().map(|p| (*p, true)).collect::<Vec<_>>(),
        ));
        assert_eq!(h.maps.affinity.keys().count(), 0, "affinity kept while off");
        let rest: Vec<Ipv4Addr> = remaining.iter().copied().filter(|p| *p != next).collect();
        h.program(&hello(&rest.iter().map(|p| (*p, true)).collect::<Vec<_>>()));
        h.program(&sticky(&rest));
        let (verdict, out) =
            h.xdp(&FrameSpec::tcp((CLIENT, 43200), (NODE, NODE_PORT), SYN).build());
        assert_eq!(verdict, XDP_PASS, "{out:02x?}");
        assert!(rest.contains(&frame::parse(&out).unwrap().dst));
        // A removed Service's clients are forgotten with it.
        h.program(&DesiredState::default());
        assert_eq!(
            h.maps.affinity.keys().count(),
            0,
            "affinity kept for a removed Service"
        );
    });
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_sources_on_the_lb_address() {
    with_datapath(|h| {
        let mut state = hello(&[(LOCAL_POD, true)]);
        for s in state.services.values_mut() {
            std::sync::Arc::make_mut(s).source_ranges =
                Some(vec![(Ipv4Addr::new(198, 18, 0, 0).into(), 28)]);
        }
        h.program(&state);
        let to_lb = |src: Ipv4Addr, sport| FrameSpec::tcp((src, sport), (LB, 60000), SYN).build();
        let (verdict, out) = h.xdp(&to_lb(CLIENT, 44000));
        assert_eq!(
            (verdict, frame::parse(&out).unwrap().dst),
            (XDP_PASS, LOCAL_POD),
            "198.18.0.1 is in 198.18.0.0/28"
        );
        let outsider = Ipv4Addr::new(198, 18, 0, 77);
        assert_eq!(h.xdp(&to_lb(outsider, 44001)).0, XDP_DROP);
        assert_eq!(h.counter(Counter::SourceRangeDenied), 1);
        // The NodePort is not restricted (kube-proxy applies the ranges to the LB address only).
        let (verdict, out) =
            h.xdp(&FrameSpec::tcp((outsider, 44002), (NODE, NODE_PORT), SYN).build());
        assert_eq!(
            (verdict, frame::parse(&out).unwrap().dst),
            (XDP_PASS, LOCAL_POD)
        );
        // Lifting the restriction admits everyone.
        h.program(&hello(&[(LOCAL_POD, true)]));
        assert_eq!(h.xdp(&to_lb(outsider, 44003)).0, XDP_PASS);
        assert!(
            h.maps.snapshot().unwrap().source_ranges.is_empty(),
            "entries removed with the restriction"
        );
    });
}

impl Harness {
    /// Forgets every tracked flow, so the next packet of each is selected afresh.
    fn forget_flows(&mut self) {
        for k in self.maps.flow_keys() {
            self.maps.remove_flow(&k).unwrap();
        }
    }

    fn backend_of(&mut self, client: (Ipv4Addr, u16)) -> Ipv4Addr {
        let (_, out) = self.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        frame::parse(&out).unwrap().dst
    }
}

#[test]
fn maglev_moves_only_the_flows_of_a_removed_backend() {
    with_datapath(|h| {
        let pods: Vec<(Ipv4Addr, bool)> = (2..12)
            .map(|i| (Ipv4Addr::new(198, 19, 1, i), true))
            .collect();
        h.program(&hello(&pods));
        let clients: Vec<(Ipv4Addr, u16)> = (0..2000u16)
            .map(|i| (nth_client(1, i), 40000 + i))
            .collect();
        let before: Vec<Ipv4Addr> = clients.iter().map(|c| h.backend_of(*c)).collect();
        let removed = pods[3].0;
        h.program(&hello(
            &pods
                .iter()
                .copied()
                .filter(|p| p.0 != removed)
                .collect::<Vec<_>>(),
        ));
        h.forget_flows();
        let after: Vec<Ipv4Addr> = clients.iter().map(|c| h.backend_of(*c)).collect();
        let had_to = before.iter().filter(|b| **b == removed).count();
        assert!(had_to > 100, "the removed backend had its share ({had_to})");
        assert!(!after.contains(&removed));
        let moved_needlessly = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        // Maglev's promise: ~1/N move; others move only by the table's small disruption.
        assert!(
            moved_needlessly * 100 <= clients.len() * 3,
            "{moved_needlessly} of {} flows moved needlessly",
            clients.len()
        );
    });
}

#[test]
fn one_cpu_can_fill_the_whole_flow_table() {
    // Flows reach CPUs as the NIC spreads them, often unevenly (one queue on many VMs' NICs):
    // the CPU that sees them all can still keep as many as --max-flows, none evicted before.
    let capacity = exposure::datapath::Capacity {
        flows: 4096,
        ..Default::default()
    };
    with_datapath_config(capacity, |h| {
        let mut cpu = nix::sched::CpuSet::new();
        cpu.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
        h.program(&hello(&[(LOCAL_POD, true)]));
        let flows = 3000u16;
        for i in 0..flows {
            let client = (nth_client(1, i), 40000 + i);
            let input = FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build();
            assert_eq!(h.xdp(&input).0, XDP_PASS);
        }
        assert_eq!(h.maps.flow_count(), flows as usize, "flows kept");
        assert_eq!(h.counter(Counter::NewFlows), flows as u64);
    });
}

#[test]
fn a_flood_of_one_packet_flows_evicts_them_and_not_a_connection() {
    let capacity = exposure::datapath::Capacity {
        flows: 4096,
        ..Default::default()
    };
    with_datapath_config(capacity, |h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 40000);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), SYN).build());
        let syn_ack = FrameSpec::tcp((LOCAL_POD, 50000), client, SYN | ACK).build();
        assert_eq!(h.tc(&syn_ack).0, TC_ACT_OK);
        h.xdp(&FrameSpec::tcp(client, (NODE, NODE_PORT), ACK).build());
        // Twice the table in SYNs that never go further, as a scan or a SYN flood sends them.
        for i in 0..8192u16 {
            let from = (nth_client(2, i), 1024 + i);
            h.xdp(&FrameSpec::tcp(from, (NODE, NODE_PORT), SYN).build());
        }
        assert!(h.maps.flow_count() <= 4096, "the flood filled the table");
        assert!(
            h.flow(client, (NODE, NODE_PORT), TCP).is_some(),
            "the connection's flow is kept"
        );
        let (verdict, out) = h.tc(&FrameSpec::tcp((LOCAL_POD, 50000), client, ACK).build());
        assert_eq!(verdict, TC_ACT_OK, "and its reply entry");
        let p = frame::parse(&out).unwrap();
        assert_eq!((p.src, p.sport), (NODE, NODE_PORT));
    });
}

#[test]
fn maps_of_earlier_builds_are_unpinned_at_load() {
    with_datapath(|h| {
        // An earlier build's flow table for both families, as an upgrade finds it.
        let (old, current) = (h.pin_dir.join("FLOWS"), h.pin_dir.join("FLOWS6"));
        std::fs::rename(&current, &old).unwrap();
        // And an IPv4 flow table with per-CPU LRU lists, as earlier builds made it.
        let flows4 = h.pin_dir.join("FLOWS4");
        let info = aya::maps::MapInfo::from_pin(&flows4).unwrap();
        std::fs::remove_file(&flows4).unwrap();
        pin_lru_hash(&flows4, &info, BPF_F_NO_COMMON_LRU);
        let map_id = |name: &str| {
            let info = aya::maps::MapInfo::from_pin(h.pin_dir.join(name));
            info.map(|i| i.id()).ok()
        };
        let others = exposure_common::names::ALL
            .into_iter()
            .filter(|name| !["FLOWS4", "FLOWS6"].contains(name));
        let before: Vec<_> = others.map(|name| (name, map_id(name))).collect();
        let _again = Datapath::load(&h.pin_dir).unwrap();
        assert!(!old.exists(), "the retired pin is gone");
        assert!(current.exists(), "this build's map is pinned again");
        let info = aya::maps::MapInfo::from_pin(&flows4).unwrap();
        assert_eq!(info.map_flags(), 0, "one LRU list shared by all CPUs");
        for (name, id) in before {
            assert!(id.is_some(), "{name} pinned");
            assert_eq!(map_id(name), id, "{name} kept as it was");
        }
    });
}

#[test]
fn maglev_tables_of_an_earlier_build_are_carried_over_at_load() {
    with_datapath(|h| {
        let pods = [
            LOCAL_POD,
            Ipv4Addr::new(198, 19, 1, 3),
            Ipv4Addr::new(198, 19, 1, 4),
        ];
        h.program(&hello(&pods.map(|p| (p, true))));
        let before = h.maps.snapshot().unwrap();
        let path = h.pin_dir.join("MAGLEV");
        let value_size = || aya::maps::MapInfo::from_pin(&path).unwrap().value_size();
        assert_eq!(value_size(), 8, "two 4-byte entries per element");
        // An earlier build's array, one entry per element, as an upgrade finds it (the pinned
        // services point into it).
        let earlier = exposure_lab::xdp_pass::create_array(
            4,
            exposure_common::MAX_MAGLEV_ENTRIES,
            exposure_common::BPF_F_MMAPABLE,
        )
        .unwrap();
        for (id, service) in &before.services {
            for (i, backend) in before.tables[id].entries().iter().enumerate() {
                let entry = service.table_offset + i as u32;
                exposure_lab::xdp_pass::update_elem(
                    &earlier,
                    &entry.to_ne_bytes(),
                    &backend.to_ne_bytes(),
                )
                .unwrap();
            }
        }
        std::fs::remove_file(&path).unwrap();
        exposure_lab::xdp_pass::pin(&earlier, &path).unwrap();

        // This build loads over it; no sync follows.
        h.dp = Datapath::load(&h.pin_dir).unwrap();
        h.maps = KernelMaps::open(&h.pin_dir).unwrap();
        assert_eq!(value_size(), 8, "this build's array");
        let after = h.maps.snapshot().unwrap();
        assert_eq!(after.tables, before.tables, "every table carried over");
        for table in after.tables.values() {
            let named: std::collections::BTreeSet<_> = table.entries().iter().collect();
            assert_eq!(named.len(), pods.len(), "each table names every pod");
        }
        // New flows pick their backends from the carried tables, by this build's lookup.
        let (_, tcp) = (after.frontends.iter())
            .find(|(k, _)| {
                (k.addr, k.port, k.proto) == (NODE.into(), exposure_common::port(NODE_PORT), TCP)
            })
            .expect("the TCP NodePort");
        let (service, table) = (
            &after.services[&tcp.service_id],
            after.tables[&tcp.service_id].entries(),
        );
        let mut picked = std::collections::BTreeSet::new();
        for sport in 41000..41060 {
            let syn = FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), SYN).build();
            let (verdict, out) = h.xdp(&syn);
            assert_eq!(verdict, XDP_PASS);
            let p = frame::parse(&out).unwrap();
            let hash = exposure_common::hash::flow_hash(
                &CLIENT.into(),
                &NODE.into(),
                exposure_common::port(sport),
                exposure_common::port(NODE_PORT),
                TCP,
            );
            let id = table[(hash % service.table_size) as usize];
            assert_eq!(std::net::IpAddr::from(after.backends[&id].addr), p.dst);
            picked.insert(p.dst);
        }
        assert_eq!(picked.len(), pods.len(), "{picked:?}");
    });
}

const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Creates an LRU hash map shaped as `like` but with `flags`, and pins it at `path`.
fn pin_lru_hash(path: &std::path::Path, like: &aya::maps::MapInfo, flags: u32) {
    let (key, value) = (like.key_size(), like.value_size());
    let map = exposure_lab::xdp_pass::create_lru_hash(key, value, like.max_entries(), flags);
    exposure_lab::xdp_pass::pin(&map.unwrap(), path).unwrap();
}

#[test]
fn independent_nodes_pick_the_same_backend_for_a_flow() {
    with_datapath(|h| {
        // A second, independently loaded datapath (its own maps and ids) as another node would have.
        let pin_dir = PathBuf::from(format!("{}-other", h.pin_dir.display()));
        let _pins = PinDir(pin_dir.clone());
        let dp = Datapath::load(&pin_dir).unwrap();
        let mut maps = KernelMaps::open(&pin_dir).unwrap();
        maps.set_node_addr(h.ifindex, NODE.into()).unwrap();
        // Ids differ between nodes: give the other one a backend the first never sees, first.
        let mut reconciler = Reconciler::restore(maps.snapshot().unwrap(), Limits::default());
        let mut warmup = hello(&[(Ipv4Addr::new(198, 19, 9, 9), true)]);
        let (name, s) = std::mem::take(&mut warmup.services)
            .into_iter()
            .next()
            .unwrap();
        warmup.services.insert(
            ServicePortName {
                name: "warmup".into(),
                ..name
            },
            std::sync::Arc::new(DesiredService {
                frontends: [(
                    FrontendAddr {
                        ip: NODE.into(),
                        port: 31999,
                        protocol: Protocol::Tcp,
                        scope: exposure::model::Scope::External,
                    },
                    FrontendKind::NodePort,
                )]
                .into(),
                ..(*s).clone()
            }),
        );
        reconciler.reconcile(&warmup, &mut maps);
        let mut other = Harness {
            dp,
            maps,
            reconciler,
            ifindex: h.ifindex,
            node_mac: h.node_mac,
            peer_mac: h.peer_mac,
            pin_dir,
            pod_ifindex: h.pod_ifindex,
            pod_iface_mac: h.pod_iface_mac,
            peer_netns: h.peer_netns.clone(),
        };
        let pods: Vec<(Ipv4Addr, bool)> = (2..9)
            .map(|i| (Ipv4Addr::new(198, 19, 1, i), true))
            .collect();
        let mut shuffled = pods.clone();
        shuffled.reverse();
        h.program(&hello(&pods));
        let mut state = hello(&shuffled);
        state.services.extend(warmup.services);
        other.program(&state);
        for i in 0..300u16 {
            let client = (Ipv4Addr::new(198, 18, 2, (i % 200) as u8 + 1), 41000 + i);
            assert_eq!(
                h.backend_of(client),
                other.backend_of(client),
                "flow {client:?}"
            );
        }
    });
}

/// An ICMP error from `from` to `to` quoting `quoted` (its IP header and first 8 L4 bytes).
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[14..14 + 28];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc]; // next-hop MTU 1500 for code 4
    icmp.extend_from_slice(quote);
    let c = exposure_common::checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut spec = FrameSpec::udp((from, 0), (to, 0));
    spec.payload = Vec::new();
    let mut f = spec.build();
    f.truncate(14 + 20);
    f[14 + 9] = frame::ICMP;
    let total = (20 + icmp.len()) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = exposure_common::checksum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// Checks an ICMP error's outer and quoted headers after translation.
fn assert_icmp_quote(
    out: &[u8],
    outer: (Ipv4Addr, Ipv4Addr),
    quote_src: (Ipv4Addr, u16),
    quote_dst: (Ipv4Addr, u16),
) {
    let p = frame::parse(out).unwrap();
    assert_eq!(p.proto, frame::ICMP);
    assert_eq!((p.src, p.dst), outer);
    assert!(
        p.ip_checksum_ok && p.l4_checksum_ok,
        "outer IP / ICMP checksum"
    );
    let q = &p.l4[8..];
    assert_eq!(
        exposure_common::checksum::checksum(&q[..20]),
        0,
        "quoted IP header checksum"
    );
    let ip = |o: usize| Ipv4Addr::new(q[o], q[o + 1], q[o + 2], q[o + 3]);
    let port = |o: usize| u16::from_be_bytes([q[o], q[o + 1]]);
    assert_eq!((ip(12), port(20)), quote_src);
    assert_eq!((ip(16), port(22)), quote_dst);
}

#[test]
fn icmp_errors_about_snated_flows_reach_the_client_translated() {
    with_datapath(|h| {
        h.program(&hello(&[(REMOTE_POD, false)]));
        for (proto, from, icmp_type, code) in [
            (UDP, REMOTE_POD, 3, 3),
            (TCP, Ipv4Addr::new(198, 18, 0, 20), 3, 4),
        ] {
            let client = (CLIENT, 45000 + proto as u16);
            let mut first = if proto == UDP {
                FrameSpec::udp(client, (NODE, NODE_PORT))
            } else {
                FrameSpec::tcp(client, (NODE, NODE_PORT), SYN)
            };
            first.dst_mac = h.node_mac;
            let first = first.build();
            let (verdict, sent) = h.xdp(&first);
            assert_eq!(verdict, XDP_TX);
            // The backend (port unreachable) or a router on the way (fragmentation needed) answers.
            let (verdict, out) = h.xdp(&icmp_error(from, NODE, icmp_type, code, &sent));
            assert_eq!(verdict, XDP_TX, "type {icmp_type} code {code}");
            assert_icmp_quote(&out, (NODE, CLIENT), client, (NODE, NODE_PORT));
            assert_eq!(out[..6], first[6..12], "to the client's MAC");
        }
        assert_eq!(h.counter(Counter::IcmpErrorsTranslated), 2);
        // About a later fragment, whose quote has payload where the ports would be (here, bytes
        // that match a flow's): untouched.
        let mut spec = FrameSpec::udp((CLIENT, 45100), (NODE, NODE_PORT));
        spec.dst_mac = h.node_mac;
        let (_, mut sent) = h.xdp(&spec.build());
        sent[14 + 6..14 + 8].copy_from_slice(&50u16.to_be_bytes()); // offset 400
        let later = icmp_error(REMOTE_POD, NODE, 3, 3, &sent);
        assert_eq!(h.xdp(&later), (XDP_PASS, later.clone()));
        assert_eq!(h.counter(Counter::IcmpErrorsTranslated), 2);
        // Not about any flow of ours, or not an error: untouched.
        let unrelated = FrameSpec::udp((REMOTE_POD, 50000), (NODE, 61999)).build();
        let stray = icmp_error(REMOTE_POD, NODE, 3, 3, &unrelated);
        assert_eq!(h.xdp(&stray), (XDP_PASS, stray.clone()));
        let mut echo = icmp_error(CLIENT, NODE, 8, 0, &unrelated);
        echo[34] = 8;
        assert_eq!(h.xdp(&echo).0, XDP_PASS);
    });
}

#[test]
fn icmp_errors_from_local_backends_are_translated_at_tc() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        let client = (CLIENT, 45100);
        let (_, delivered) = h.xdp(&FrameSpec::udp(client, (NODE, NODE_PORT)).build());
        // The pod has nothing on that port and says so, to the client, quoting what it got.
        let (verdict, out) = h.tc(&icmp_error(LOCAL_POD, CLIENT, 3, 3, &delivered));
        assert_eq!(verdict, TC_ACT_OK);
        assert_icmp_quote(&out, (NODE, CLIENT), client, (NODE, NODE_PORT));
    });
}

/// hello-world's IPv6 half: NodePort 30600 on the node's IPv6 address and an IPv6 LB address.
fn hello6(backends: &[(Ipv6Addr, bool)]) -> DesiredState {
    let mut state = DesiredState::default();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mut s = DesiredService::default();
        for (ip, port, kind) in [
            (NODE6, NODE_PORT, FrontendKind::NodePort),
            (LB6, 60000, FrontendKind::LoadBalancer),
        ] {
            let addr = FrontendAddr {
                ip: ip.into(),
                port,
                protocol,
                scope: exposure::model::Scope::External,
            };
            s.frontends.insert(addr, kind);
        }
        s.backends = backends
            .iter()
            .map(|(ip, local)| BackendAddr {
                ip: (*ip).into(),
                port: 50000,
                local: *local,
            })
            .collect();
        let key = ServicePortName {
            protocol,
            family: exposure::model::IpFamily::V6,
            ..name("hello-world")
        };
        state.services.insert(key, std::sync::Arc::new(s));
    }
    state
}

fn parse6_ok(out: &[u8]) -> frame::Parsed6 {
    let p = frame::parse6(out).expect("an IPv6 frame");
    assert!(p.l4_checksum_ok, "L4 checksum wrong: {p:?}");
    p
}

#[test]
fn ipv6_to_local_backend_is_dnated_and_the_reply_reversed_at_tc() {
    with_datapath(|h| {
        h.program(&hello6(&[(LOCAL_POD6, true)]));
        for (proto, sport) in [(TCP, 40000), (UDP, 40001)] {
            let spec = frame::FrameSpec6::of(proto, (CLIENT6, sport), (NODE6, NODE_PORT), SYN);
            let (verdict, out) = h.xdp(&spec.build());
            assert_eq!(verdict, XDP_PASS, "local backend: up to the kernel");
            let p = parse6_ok(&out);
            assert_eq!((p.src, p.sport), (CLIENT6, sport), "client preserved");
            assert_eq!((p.dst, p.dport), (LOCAL_POD6, 50000));
            assert_eq!(p.next_header, proto);

            let reply =
                frame::FrameSpec6::of(proto, (LOCAL_POD6, 50000), (CLIENT6, sport), SYN | ACK);
            let (verdict, out) = h.tc(&reply.build());
            assert_eq!(verdict, TC_ACT_OK);
            let r = parse6_ok(&out);
            assert_eq!((r.src, r.sport), (NODE6, NODE_PORT), "frontend restored");
            assert_eq!((r.dst, r.dport), (CLIENT6, sport));
        }
        assert_eq!(h.counter(Counter::ToLocal), 2);
        assert_eq!(h.counter(Counter::RepliesTc), 2);
    });
}

#[test]
fn ipv6_remote_backend_gets_snat_and_the_reply_is_reversed_at_xdp() {
    with_datapath(|h| {
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        let mut input = frame::FrameSpec6::tcp((CLIENT6, 40002), (LB6, 60000), SYN);
        input.dst_mac = h.node_mac;
        let input = input.build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_TX);
        let p = parse6_ok(&out);
        assert_eq!((p.dst, p.dport), (REMOTE_POD6, 50000));
        assert_eq!(p.src, NODE6, "SNAT to the node's IPv6 address");
        assert!(p.sport >= SNAT_PORT_MIN);
        assert_eq!(p.dst_mac, h.peer_mac, "next hop from the IPv6 FIB");
        assert_eq!(p.src_mac, h.node_mac);

        let mut reply = frame::FrameSpec6::tcp((REMOTE_POD6, 50000), (NODE6, p.sport), SYN | ACK);
        reply.src_mac = h.peer_mac;
        reply.dst_mac = h.node_mac;
        let (verdict, out) = h.xdp(&reply.build());
        assert_eq!(verdict, XDP_TX);
        let r = parse6_ok(&out);
        assert_eq!((r.src, r.sport), (LB6, 60000), "client sees the LB address");
        assert_eq!((r.dst, r.dport), (CLIENT6, 40002));
        assert_eq!(r.dst_mac, input[6..12]);
        assert_eq!(h.counter(Counter::ToRemote), 1);
        assert_eq!(h.counter(Counter::RepliesXdp), 1);
    });
}

/// Hop-by-hop, destination options and finished routing headers before TCP/UDP are skipped and
/// kept, as Cilium's parser does: flows to local and remote backends are translated both ways
/// with their headers intact. A routing header with segments left (this node is a waypoint) and
/// more than four headers leave the packet to the kernel.
#[test]
fn ipv6_extension_headers_are_skipped_and_kept() {
    with_datapath(|h| {
        let chains = [
            vec![frame::options6(frame::HOPOPTS, 8)],
            vec![
                frame::options6(frame::HOPOPTS, 8),
                frame::options6(frame::DSTOPTS, 16),
            ],
            vec![
                frame::options6(frame::HOPOPTS, 8),
                frame::routing6(0, NODE6),
                frame::options6(frame::DSTOPTS, 8),
            ],
        ];
        let spec = |proto: u8, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8| {
            if proto == TCP {
                frame::FrameSpec6::tcp(src, dst, flags)
            } else {
                frame::FrameSpec6::udp(src, dst)
            }
        };
        let mut sport = 41000;
        for (backend, local) in [(LOCAL_POD6, true), (REMOTE_POD6, false)] {
            h.program(&hello6(&[(backend, local)]));
            for chain in &chains {
                for proto in [TCP, UDP] {
                    sport += 1;
                    let mut request = spec(proto, (CLIENT6, sport), (NODE6, NODE_PORT), SYN);
                    request.dst_mac = h.node_mac;
                    let input = frame::with_ext_headers6(&request.build(), chain);
                    let (verdict, out) = h.xdp(&input);
                    assert_eq!(verdict, if local { XDP_PASS } else { XDP_TX });
                    let (out, kept) = frame::without_ext_headers6(&out);
                    assert_eq!(kept, input[54..54 + kept.len()], "headers kept");
                    let p = parse6_ok(&out);
                    assert_eq!(p.next_header, proto);
                    assert_eq!((p.dst, p.dport), (backend, 50000));
                    let (client_side, reply_to) = if local {
                        ((CLIENT6, sport), (CLIENT6, sport))
                    } else {
                        assert_eq!(p.src, NODE6, "SNAT");
                        ((p.src, p.sport), (NODE6, p.sport))
                    };
                    assert_eq!((p.src, p.sport), client_side);

                    let mut reply = spec(proto, (backend, 50000), reply_to, SYN | ACK);
                    reply.src_mac = h.peer_mac;
                    reply.dst_mac = h.node_mac;
                    let reply = frame::with_ext_headers6(&reply.build(), chain);
                    let out = if local {
                        let (verdict, out) = h.tc(&reply);
                        assert_eq!(verdict, TC_ACT_OK);
                        out
                    } else {
                        let (verdict, out) = h.xdp(&reply);
                        assert_eq!(verdict, XDP_TX);
                        out
                    };
                    let (out, kept) = frame::without_ext_headers6(&out);
                    assert_eq!(kept, reply[54..54 + kept.len()], "headers kept");
                    let r = parse6_ok(&out);
                    assert_eq!((r.src, r.sport), (NODE6, NODE_PORT), "the frontend");
                    assert_eq!((r.dst, r.dport), (CLIENT6, sport));
                }
            }
        }
        assert_eq!(h.counter(Counter::ToLocal), 6);
        assert_eq!(h.counter(Counter::ToRemote), 6);

        // The kernel's: a waypoint's routing header, five headers.
        let plain = frame::FrameSpec6::udp((CLIENT6, 42000), (NODE6, NODE_PORT)).build();
        for chain in [
            vec![frame::routing6(1, REMOTE_POD6)],
            vec![frame::options6(frame::DSTOPTS, 8); 5],
        ] {
            let input = frame::with_ext_headers6(&plain, &chain);
            assert_eq!(h.xdp(&input), (XDP_PASS, input.clone()));
        }
        assert_eq!(h.counter(Counter::NewFlows), 12);
    });
}

/// A request with extension headers to a Service without endpoints is refused with a port
/// unreachable that quotes them and the ports, its checksum over all of it; a quote longer than
/// 256 bytes is cut there.
#[test]
fn refusals_quote_ipv6_extension_headers() {
    with_datapath(|h| {
        h.program(&hello6(&[]));
        let mut sport = 43000;
        for (chain, quoted) in [
            (vec![frame::options6(frame::HOPOPTS, 8)], 40 + 8 + 8),
            (
                vec![
                    frame::options6(frame::HOPOPTS, 8),
                    frame::routing6(0, NODE6),
                    frame::options6(frame::DSTOPTS, 16),
                ],
                40 + 8 + 24 + 16 + 8,
            ),
            (
                vec![
                    frame::options6(frame::HOPOPTS, 8),
                    frame::options6(frame::DSTOPTS, 256),
                ],
                256,
            ),
        ] {
            for proto in [TCP, UDP] {
                sport += 1;
                let mut request = if proto == TCP {
                    frame::FrameSpec6::tcp((CLIENT6, sport), (NODE6, NODE_PORT), SYN)
                } else {
                    frame::FrameSpec6::udp((CLIENT6, sport), (NODE6, NODE_PORT))
                };
                request.dst_mac = h.node_mac;
                let input = frame::with_ext_headers6(&request.build(), &chain);
                let (verdict, out) = h.xdp(&input);
                assert_eq!(verdict, XDP_TX);
                let p = parse6_ok(&out);
                assert_eq!((p.src, p.dst), (NODE6, CLIENT6));
                assert_eq!(p.next_header, frame::ICMPV6);
                assert_eq!(
                    p.l4[..2],
                    [1, 4],
                    "destination unreachable, port unreachable"
                );
                assert_eq!(p.l4[8..], input[14..14 + quoted], "the quote");
            }
        }
        assert_eq!(h.counter(Counter::NoBackend), 6);
    });
}

/// [`fragmented`] for IPv6: a datagram of 1,000 bytes of payload, in three fragments.
fn fragmented6(mut spec: frame::FrameSpec6, id: u32) -> Vec<Vec<u8>> {
    spec.payload = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let frags = frame::fragment6(&spec.build(), id, 400);
    assert_eq!(frags.len(), 3);
    frags
}

/// [`through`] for IPv6 fragments: the fragment header's ID is kept.
fn through6(
    frags: &[Vec<u8>],
    verdict: u32,
    mut run: impl FnMut(&[u8]) -> (u32, Vec<u8>),
) -> frame::Parsed6 {
    let outs: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let (v, out) = run(f);
            assert_eq!(v, verdict);
            assert_eq!(
                out[14 + 40..14 + 48],
                f[14 + 40..14 + 48],
                "fragment header kept"
            );
            out
        })
        .collect();
    parse6_ok(&frame::reassemble6(&outs).expect("fragments reassemble"))
}

#[test]
fn ipv6_fragmented_datagrams_and_their_replies_are_translated() {
    with_datapath(|h| {
        h.program(&hello6(&[(LOCAL_POD6, true)]));
        // Local: DNAT at XDP, the pod's fragmented answer at tc.
        let frags = fragmented6(
            frame::FrameSpec6::udp((CLIENT6, 40200), (NODE6, NODE_PORT)),
            1,
        );
        let p = through6(&frags, XDP_PASS, |f| h.xdp(f));
        assert_eq!((p.src, p.sport), (CLIENT6, 40200));
        assert_eq!((p.dst, p.dport), (LOCAL_POD6, 50000));
        let frags = fragmented6(
            frame::FrameSpec6::udp((LOCAL_POD6, 50000), (CLIENT6, 40200)),
            2,
        );
        let r = through6(&frags, TC_ACT_OK, |f| h.tc(f));
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (NODE6, NODE_PORT, CLIENT6, 40200)
        );

        // Remote: SNAT and back out at XDP, and the answer back to the client.
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        let mut spec = frame::FrameSpec6::udp((CLIENT6, 40201), (LB6, 60000));
        spec.dst_mac = h.node_mac;
        let p = through6(&fragmented6(spec, 3), XDP_TX, |f| h.xdp(f));
        assert_eq!((p.src, p.dst, p.dport), (NODE6, REMOTE_POD6, 50000));
        let mut reply = frame::FrameSpec6::udp((REMOTE_POD6, 50000), (NODE6, p.sport));
        reply.src_mac = h.peer_mac;
        reply.dst_mac = h.node_mac;
        let r = through6(&fragmented6(reply, 4), XDP_TX, |f| h.xdp(f));
        assert_eq!(
            (r.src, r.sport, r.dst, r.dport),
            (LB6, 60000, CLIENT6, 40201)
        );

        // A later fragment whose first was not seen passes untouched.
        let frags = fragmented6(
            frame::FrameSpec6::udp((CLIENT6, 40202), (NODE6, NODE_PORT)),
            5,
        );
        assert_eq!(h.xdp(&frags[1]), (XDP_PASS, frags[1].clone()));
        assert_eq!(h.counter(Counter::Fragments), 1);
        assert_eq!(h.counter(Counter::NewFlows), 2);

        // A refused first fragment: the quote reaches past the fragment header to the ports,
        // which the client's stack needs to find its socket.
        h.program(&hello6(&[]));
        let spec = frame::FrameSpec6::udp((CLIENT6, 40203), (NODE6, NODE_PORT));
        let frags = fragmented6(spec, 6);
        let (verdict, out) = h.xdp(&frags[0]);
        assert_eq!(verdict, XDP_TX);
        let icmp6 = parse6_ok(&out);
        assert_eq!(icmp6.l4[..2], [1, 4], "port unreachable");
        assert_eq!(icmp6.l4[8..], frags[0][14..14 + 40 + 8 + 8]);
    });
}

#[test]
fn ipv6_node_connections_on_a_reset_flows_snat_port_get_their_own_replies() {
    with_datapath(|h| {
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        let client = |h: &Harness, flags| {
            let mut f = frame::FrameSpec6::tcp((CLIENT6, 40003), (LB6, 60000), flags);
            f.dst_mac = h.node_mac;
            f.build()
        };
        let (_, out) = h.xdp(&client(h, SYN));
        let snat_port = parse6_ok(&out).sport;
        assert_eq!(h.xdp(&client(h, RST)).0, XDP_TX);
        let own = frame::FrameSpec6::tcp((NODE6, snat_port), (REMOTE_POD6, 50000), SYN).build();
        let (verdict, out) = h.tc(&own);
        assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, own));
        let mut answer =
            frame::FrameSpec6::tcp((REMOTE_POD6, 50000), (NODE6, snat_port), SYN | ACK);
        answer.src_mac = h.peer_mac;
        answer.dst_mac = h.node_mac;
        let answer = answer.build();
        assert_eq!(h.xdp(&answer), (XDP_PASS, answer));
    });
}

#[test]
fn an_ipv6_node_connection_from_a_node_port_gets_its_own_replies() {
    with_datapath(|h| {
        h.program(&hello6(&[(LOCAL_POD6, true)]));
        let peer = (PEER_NODE6, 443);
        let own = frame::FrameSpec6::tcp((NODE6, NODE_PORT), peer, SYN).build();
        let (verdict, out) = h.tc(&own);
        assert_eq!((verdict as i32, out), (TC_ACT_UNSPEC, own));
        let mut answer = frame::FrameSpec6::tcp(peer, (NODE6, NODE_PORT), SYN | ACK);
        answer.src_mac = h.peer_mac;
        answer.dst_mac = h.node_mac;
        let answer = answer.build();
        assert_eq!(
            h.xdp(&answer),
            (XDP_PASS, answer),
            "not a flow to the Service"
        );
        assert_eq!(h.counter(Counter::NewFlows), 0);
    });
}

#[test]
fn ipv6_without_endpoints_is_refused_with_icmpv6_port_unreachable() {
    with_datapath(|h| {
        h.program(&hello6(&[]));
        let input = frame::FrameSpec6::udp((CLIENT6, 40003), (NODE6, NODE_PORT)).build();
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_TX);
        let p = parse6_ok(&out);
        assert_eq!(p.next_header, frame::ICMPV6);
        assert_eq!((p.src, p.dst), (NODE6, CLIENT6));
        assert_eq!((p.l4[0], p.l4[1]), (1, 4), "destination unreachable: port");
        assert_eq!(
            &p.l4[8..56],
            &input[14..62],
            "quotes the IPv6 header and 8 bytes"
        );
        assert_eq!(p.dst_mac, input[6..12]);
        assert_eq!(h.counter(Counter::NoBackend), 1);
    });
}

#[test]
fn icmpv6_and_neighbour_discovery_pass_untouched() {
    with_datapath(|h| {
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        let solicited: Ipv6Addr = "ff02::1:ff00:10".parse().unwrap();
        let mut ns_body = vec![0u8; 4];
        ns_body.extend_from_slice(&NODE6.octets());
        ns_body.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]);
        let mut ra_body = vec![64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        ra_body.truncate(12);
        for f in [
            frame::icmp6(CLIENT6, solicited, 135, 0, &ns_body), // neighbour solicitation
            frame::icmp6(NODE6, CLIENT6, 136, 0, &ns_body),     // neighbour advertisement
            frame::icmp6(PEER_NODE6, "ff02::1".parse().unwrap(), 134, 0, &ra_body),
            frame::icmp6(CLIENT6, NODE6, 128, 0, &[0, 1, 0, 1, 1, 2, 3, 4]), // echo request
            // An error about a flow we don't have.
            frame::icmp6(REMOTE_POD6, NODE6, 1, 4, &[0u8; 52]),
        ] {
            assert_eq!(h.xdp(&f), (XDP_PASS, f.clone()));
        }
        // Not a frontend port, and a frontend behind a header the datapath does not skip (AH):
        // the kernel's.
        let other = frame::FrameSpec6::tcp((CLIENT6, 40004), (NODE6, 22), SYN).build();
        assert_eq!(h.xdp(&other), (XDP_PASS, other.clone()));
        let plain = frame::FrameSpec6::udp((CLIENT6, 40005), (NODE6, NODE_PORT)).build();
        let auth = frame::with_ext_headers6(&plain, &[frame::ext_header6(51, &[0; 14])]);
        assert_eq!(h.xdp(&auth), (XDP_PASS, auth.clone()));
        let mut fragment = frame::FrameSpec6::udp((CLIENT6, 40006), (NODE6, NODE_PORT)).build();
        fragment[14 + 6] = 44;
        assert_eq!(h.xdp(&fragment), (XDP_PASS, fragment.clone()));
        assert_eq!(h.counter(Counter::Fragments), 1);
        assert_eq!(h.counter(Counter::NewFlows), 0);
    });
}

/// An ICMPv6 error from `from` to `to` quoting the first 48 bytes of the IPv6 packet in `sent`.
fn icmp6_error(from: Ipv6Addr, to: Ipv6Addr, icmp_type: u8, code: u8, sent: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0, 0x05, 0x00]; // MTU 1280 for packet too big
    body.extend_from_slice(&sent[14..14 + 48]);
    frame::icmp6(from, to, icmp_type, code, &body)
}

fn assert_icmp6_quote(
    out: &[u8],
    outer: (Ipv6Addr, Ipv6Addr),
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
) {
    let p = parse6_ok(out);
    assert_eq!(p.next_header, frame::ICMPV6);
    assert_eq!((p.src, p.dst), outer);
    let q = &p.l4[8..];
    let ip = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&q[o..o + 16]).unwrap());
    let port = |o: usize| u16::from_be_bytes([q[o], q[o + 1]]);
    assert_eq!((ip(8), port(40)), src);
    assert_eq!((ip(24), port(42)), dst);
}

#[test]
fn icmpv6_errors_about_translated_flows_reach_the_client_translated() {
    with_datapath(|h| {
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        // Packet too big from a router on the way to a remote backend: path MTU discovery.
        let client = (CLIENT6, 45000);
        let mut first = frame::FrameSpec6::tcp(client, (NODE6, NODE_PORT), SYN);
        first.dst_mac = h.node_mac;
        let first = first.build();
        let (verdict, sent) = h.xdp(&first);
        assert_eq!(verdict, XDP_TX);
        let (verdict, out) = h.xdp(&icmp6_error(PEER_NODE6, NODE6, 2, 0, &sent));
        assert_eq!(verdict, XDP_TX);
        assert_icmp6_quote(&out, (NODE6, CLIENT6), client, (NODE6, NODE_PORT));
        assert_eq!(out[..6], first[6..12], "to the client's MAC");

        // Port unreachable from a local backend, leaving through tc.
        h.program(&hello6(&[(LOCAL_POD6, true)]));
        let client = (CLIENT6, 45001);
        let (_, delivered) = h.xdp(&frame::FrameSpec6::udp(client, (NODE6, NODE_PORT)).build());
        let (verdict, out) = h.tc(&icmp6_error(LOCAL_POD6, CLIENT6, 1, 4, &delivered));
        assert_eq!(verdict, TC_ACT_OK);
        assert_icmp6_quote(&out, (NODE6, CLIENT6), client, (NODE6, NODE_PORT));
        // The quoted UDP checksum was translated too: the quote is the client's original datagram.
        let quoted_udp = &parse6_ok(&out).l4[48..56];
        let sent_udp = &frame::FrameSpec6::udp(client, (NODE6, NODE_PORT)).build()[54..62];
        assert_eq!(quoted_udp, sent_udp);
        assert_eq!(h.counter(Counter::IcmpErrorsTranslated), 2);
    });
}

#[test]
fn ipv6_source_ranges_and_affinity_use_ipv6_networks() {
    with_datapath(|h| {
        let mut state = hello6(&[(LOCAL_POD6, true), (REMOTE_POD6, false)]);
        for s in state.services.values_mut() {
            let s = std::sync::Arc::make_mut(s);
            s.source_ranges = Some(vec![("2001:2::".parse::<Ipv6Addr>().unwrap().into(), 64)]);
            s.affinity_timeout_s = 60;
        }
        h.program(&state);
        let inside = (CLIENT6, 46000);
        let outside = ("2001:2:0:5::1".parse().unwrap(), 46001);
        let lb = (LB6, 60000);
        let (verdict, _) = h.xdp(&frame::FrameSpec6::udp(outside, lb).build());
        assert_eq!(verdict, XDP_DROP, "outside the range on the LB address");
        assert_eq!(h.counter(Counter::SourceRangeDenied), 1);
        let (verdict, first) = h.xdp(&frame::FrameSpec6::udp(inside, lb).build());
        assert_ne!(verdict, XDP_DROP, "inside the range");
        let backend = parse6_ok(&first).dst;
        // ClientIP affinity: every new flow of this client goes to the same backend.
        for sport in 46002..46012 {
            let (_, out) = h.xdp(&frame::FrameSpec6::udp((CLIENT6, sport), lb).build());
            assert_eq!(parse6_ok(&out).dst, backend, "sport {sport}");
        }
    });
}

#[test]
fn dual_stack_service_serves_each_family_from_its_own_endpoints() {
    with_datapath(|h| {
        let mut state = hello(&[(LOCAL_POD, true)]);
        state
            .services
            .extend(hello6(&[(LOCAL_POD6, true)]).services);
        h.program(&state);
        let (_, out4) = h.xdp(&FrameSpec::tcp((CLIENT, 47000), (NODE, NODE_PORT), SYN).build());
        assert_eq!(frame::parse(&out4).unwrap().dst, LOCAL_POD);
        let (_, out6) =
            h.xdp(&frame::FrameSpec6::tcp((CLIENT6, 47000), (NODE6, NODE_PORT), SYN).build());
        assert_eq!(parse6_ok(&out6).dst, LOCAL_POD6);
        assert_eq!(h.counter(Counter::NewFlows), 2);
    });
}

mod flows;
mod mangled;

/// The kernel checks at most 1,000,000 instructions' worth of paths per program; the programs
/// stay within half of that, with kernel logging on or off: older kernels prune paths less well
/// than this one, and a change should not find the limit by accident. (The XDP program used
/// 626,501 while the verifier checked its SNAT port tries once for every path that reached them;
/// a one-line change then took it past the limit.)
#[test]
fn the_programs_verify_well_inside_the_kernels_budget() {
    for bpf_log_level in [0, 4] {
        with_datapath_logging(bpf_log_level, move |h| {
            let verified = |info: aya::programs::ProgramInfo| {
                info.verified_instruction_count()
                    .expect("Linux 5.16 or later reports it")
            };
            let xdp = verified(h.dp.xdp().unwrap().info().unwrap());
            let egress = verified(h.dp.tc_program(TC_PROGRAM).unwrap().info().unwrap());
            let from_pod = verified(
                h.dp.tc_program(TC_FROM_POD_PROGRAM)
                    .unwrap()
                    .info()
                    .unwrap(),
            );
            let ingress = verified(h.dp.tc_program(TC_INGRESS_PROGRAM).unwrap().info().unwrap());
            eprintln!(
                "log level {bpf_log_level}: XDP {xdp}, tc egress {egress}, tc ingress {ingress}, tc from pods {from_pod} instructions verified"
            );
            assert!(
                from_pod < 500_000 && ingress < 500_000,
                "tc from pods: {from_pod}, tc ingress {ingress} (log level {bpf_log_level})"
            );
            assert!(
                xdp < 500_000,
                "XDP: {xdp} of 1,000,000 (log level {bpf_log_level})"
            );
            assert!(
                egress < 500_000,
                "tc egress: {egress} (log level {bpf_log_level})"
            );
        });
    }
}

/// The agent reads whole flow tables a batch of entries per system call: counting them
/// (`exposure_conntrack_entries`, `exposure status`) and finding a UDP endpoint's flows to delete
/// see every entry once, with its value, across batches.
#[test]
fn whole_flow_tables_are_counted_and_purged_across_batches() {
    use exposure::sync::DatapathMaps as _;
    with_datapath(|h| {
        // Service 7's UDP flows, to backends 1 and 2 in turn.
        let flow = |i: u32| exposure_common::Flow {
            service_id: 7,
            backend_id: 1 + i % 2,
            ..Default::default()
        };
        for i in 0..10_000u32 {
            let key = exposure_common::FlowKey4 {
                saddr: (0xc612_0000 + i).to_be(),
                daddr: u32::from(NODE).to_be(),
                sport: exposure_common::port(40_000),
                dport: exposure_common::port(NODE_PORT),
                proto: UDP,
                _pad: [0; 3],
            };
            h.maps.flows4.insert(key, flow(i), 0).unwrap();
        }
        for i in 0..5_000u16 {
            let key = FlowKey {
                saddr: Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, i).into(),
                daddr: NODE6.into(),
                sport: exposure_common::port(40_000),
                dport: exposure_common::port(NODE_PORT),
                proto: UDP,
                _pad: [0; 3],
            };
            h.maps.flows6.insert(key, flow(i.into()), 0).unwrap();
        }
        let walked = h.maps.flows4.keys().count() + h.maps.flows6.keys().count();
        assert_eq!(walked, 15_000);
        assert_eq!(h.maps.flow_count(), 15_000);
        h.maps.purge_udp_flows(7, &[1]).unwrap();
        assert_eq!(h.maps.flow_count(), 7_500, "backend 1's half gone");
        let left: std::collections::BTreeSet<u32> = (h.maps.flows4.iter().map(|e| e.unwrap().1))
            .chain(h.maps.flows6.iter().map(|e| e.unwrap().1))
            .map(|f| f.backend_id)
            .collect();
        assert_eq!(left, std::collections::BTreeSet::from([2]));
    });
}

/// A Service that goes (deleted, or its port or address changed) leaves its TCP frontends
/// draining, as kube-proxy's conntrack entries keep translating a removed Service's connections:
/// an established flow goes on to its backend (local or remote), a new one is passed to the
/// kernel untranslated, as with no frontend. UDP frontends go at once (kube-proxy deletes their
/// conntrack entries). A drain ends once no live flow goes through the frontend.
#[test]
fn a_removed_services_tcp_connections_go_on_until_they_end() {
    use exposure_common::{FlowLifetimes, FlowPhase};
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true), (REMOTE_POD, false)]));
        // Held connections: find a client port for each backend.
        let mut held = std::collections::BTreeMap::new();
        for sport in 45000..45100 {
            let syn = h.client_frame(FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), SYN));
            let (_, out) = h.xdp(&syn);
            held.entry(frame::parse(&out).unwrap().dst).or_insert(sport);
            if held.len() == 2 {
                break;
            }
        }
        let (local, remote) = (held[&LOCAL_POD], held[&REMOTE_POD]);
        let udp = |h: &Harness| h.client_frame(FrameSpec::udp((CLIENT, 45200), (NODE, NODE_PORT)));
        let (_, out) = h.xdp(&udp(h));
        assert_eq!(frame::parse(&out).unwrap().dport, 50000, "a UDP flow too");
        let new_flows = h.counter(Counter::NewFlows);

        h.program(&DesiredState::default());
        assert_eq!(
            h.reconciler.draining(),
            2,
            "the NodePort's and the LB's TCP frontends"
        );
        let ack = |h: &Harness, sport| {
            h.client_frame(FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), ACK))
        };
        let (verdict, out) = h.xdp(&ack(h, local));
        let p = frame::parse(&out).unwrap();
        assert_eq!((verdict, p.dst, p.dport), (XDP_PASS, LOCAL_POD, 50000));
        assert_checksums(&p);
        let (verdict, out) = h.xdp(&ack(h, remote));
        let p = frame::parse(&out).unwrap();
        assert_eq!((verdict, p.dst, p.src), (XDP_TX, REMOTE_POD, NODE));
        assert_checksums(&p);
        // A new connection, and a SYN on a port no flow holds, reach the node as sent.
        for sport in [45300, 45301] {
            let syn = h.client_frame(FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), SYN));
            let (verdict, out) = h.xdp(&syn);
            assert_eq!(
                (verdict, out),
                (XDP_PASS, syn),
                "new flow through a draining frontend"
            );
        }
        let to_lb = h.client_frame(FrameSpec::tcp((CLIENT, 45302), (LB, 60000), SYN));
        assert_eq!(h.xdp(&to_lb), (XDP_PASS, to_lb));
        assert_eq!(h.counter(Counter::NewFlows), new_flows, "no flow made");
        // UDP's frontend is gone: its flow's next datagram too.
        let datagram = udp(h);
        assert_eq!(h.xdp(&datagram), (XDP_PASS, datagram));

        // The LB's frontend has no flow: its drain ends; the NodePort's flows are alive.
        let lifetimes = FlowLifetimes::DEFAULT;
        let in_use = h.maps.tcp_frontends_in_use(&lifetimes);
        let (ended, errors) = h.reconciler.end_drains(&in_use, &mut h.maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ended, ["198.18.100.1:60000/TCP"]);
        assert_eq!(h.reconciler.draining(), 1);
        let (verdict, out) = h.xdp(&ack(h, local));
        assert_eq!(
            (verdict, frame::parse(&out).unwrap().dst),
            (XDP_PASS, LOCAL_POD)
        );
        // Its connections close (RST): once their flows are over (no closing time left here),
        // the drain ends and their packets reach the node as sent.
        for sport in [local, remote] {
            let rst = h.client_frame(FrameSpec::tcp((CLIENT, sport), (NODE, NODE_PORT), RST));
            assert_ne!(h.xdp(&rst).1, rst, "the RST is translated");
        }
        // (The SYNs that found the held ports made flows too: theirs are over first.)
        let mut over = lifetimes;
        over.ns[FlowPhase::TcpOpening as usize] = 0;
        let in_use = h.maps.tcp_frontends_in_use(&over);
        assert_eq!(in_use.len(), 1, "closing, not over");
        over.ns[FlowPhase::Closing as usize] = 0;
        let in_use = h.maps.tcp_frontends_in_use(&over);
        let (ended, _) = h.reconciler.end_drains(&in_use, &mut h.maps);
        assert_eq!(ended, ["198.18.0.10:30600/TCP"]);
        assert_eq!(h.reconciler.draining(), 0);
        let late = ack(h, local);
        assert_eq!(h.xdp(&late), (XDP_PASS, late));
        assert_eq!(
            h.reconciler.differences(&h.maps.snapshot().unwrap()),
            Vec::<String>::new()
        );
    });
}

/// [`a_removed_services_tcp_connections_go_on_until_they_end`] over IPv6: a held flow through a
/// removed Service's NodePort goes on, a new one passes untranslated, and the drain ends once the
/// flow is over.
#[test]
fn a_removed_services_ipv6_connections_go_on_until_they_end() {
    use exposure_common::{FlowLifetimes, FlowPhase};
    with_datapath(|h| {
        h.program(&hello6(&[(LOCAL_POD6, true)]));
        let to_node_port = |sport, flags| {
            frame::FrameSpec6::tcp((CLIENT6, sport), (NODE6, NODE_PORT), flags).build()
        };
        assert_eq!(
            parse6_ok(&h.xdp(&to_node_port(46000, SYN)).1).dst,
            LOCAL_POD6
        );
        h.program(&DesiredState::default());
        assert_eq!(h.reconciler.draining(), 2);
        let (verdict, out) = h.xdp(&to_node_port(46000, ACK));
        assert_eq!((verdict, parse6_ok(&out).dst), (XDP_PASS, LOCAL_POD6));
        let new = to_node_port(46001, SYN);
        assert_eq!(h.xdp(&new), (XDP_PASS, new.clone()));
        let in_use = h.maps.tcp_frontends_in_use(&FlowLifetimes::DEFAULT);
        let (ended, _) = h.reconciler.end_drains(&in_use, &mut h.maps);
        assert_eq!(ended, ["[2001:2:0:100::1]:60000/TCP"]);
        h.xdp(&to_node_port(46000, RST));
        let mut over = FlowLifetimes::DEFAULT;
        over.ns[FlowPhase::Closing as usize] = 0;
        let in_use = h.maps.tcp_frontends_in_use(&over);
        let (ended, _) = h.reconciler.end_drains(&in_use, &mut h.maps);
        assert_eq!(ended, ["[2001:2::10]:30600/TCP"]);
        let late = to_node_port(46000, ACK);
        assert_eq!(h.xdp(&late), (XDP_PASS, late));
    });
}

/// A UDP flow keeps an endpoint that still serves though it takes no new flows (terminating
/// while others are ready): kube-proxy deletes UDP conntrack entries only for endpoints that stop
/// serving. Once it stops, the flow's next datagram goes to one that is there.
#[test]
fn a_udp_flow_keeps_an_endpoint_that_still_serves() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true), (REMOTE_POD, false)]));
        let datagram =
            |h: &Harness, sport| h.client_frame(FrameSpec::udp((CLIENT, sport), (NODE, NODE_PORT)));
        let to = |h: &mut Harness, sport| {
            let (_, out) = h.xdp(&datagram(h, sport));
            frame::parse(&out).unwrap().dst
        };
        let sport = (47000..47100)
            .find(|p| to(h, *p) == LOCAL_POD)
            .expect("a flow to the local pod");
        // The local pod terminates, still serving: new flows go to the remote one only.
        let mut terminating = hello(&[(REMOTE_POD, false)]);
        for s in terminating.services.values_mut() {
            std::sync::Arc::make_mut(s).still_serving = vec![BackendAddr {
                ip: LOCAL_POD.into(),
                port: 50000,
                local: true,
            }];
        }
        h.program(&terminating);
        assert_eq!(to(h, sport), LOCAL_POD, "the flow keeps its endpoint");
        for new in 47200..47220 {
            assert_eq!(
                to(h, new),
                REMOTE_POD,
                "a new flow to a terminating endpoint"
            );
        }
        // It stops serving: the flow moves.
        h.program(&hello(&[(REMOTE_POD, false)]));
        assert_eq!(to(h, sport), REMOTE_POD);
    });
}

/// `frame` as a sender that leaves its checksum to the device sends it (Linux's `CHECKSUM_PARTIAL`
/// through a veth: a node in a container, as with kind, reached from its host): the TCP/UDP
/// checksum field holds only the pseudo-header's sum.
fn partial(mut frame: Vec<u8>) -> Vec<u8> {
    use exposure_common::checksum::{pseudo_header4, pseudo_header6};
    let word = |f: &[u8], at: usize| u32::from_ne_bytes(f[at..at + 4].try_into().unwrap());
    let words = |f: &[u8], at: usize| [0, 4, 8, 12].map(|i| word(f, at + i));
    let (l4, proto, sum) = if frame[12..14] == [0x86, 0xdd] {
        let len = u16::from_be_bytes([frame[18], frame[19]]);
        let proto = frame[20];
        (
            54,
            proto,
            pseudo_header6(&words(&frame, 22), &words(&frame, 38), proto, len),
        )
    } else {
        let ihl = (frame[14] & 0xf) as usize * 4;
        let len = u16::from_be_bytes([frame[16], frame[17]]) - ihl as u16;
        let proto = frame[23];
        (
            14 + ihl,
            proto,
            pseudo_header4(word(&frame, 26), word(&frame, 30), proto, len),
        )
    };
    let at = l4 + if proto == TCP { 16 } else { 6 };
    frame[at..at + 2].copy_from_slice(&sum.to_ne_bytes());
    frame
}

/// Whether the frame's TCP/UDP checksum field holds its pseudo-header's sum (is still partial).
fn is_partial(frame: &[u8]) -> bool {
    partial(frame.to_vec()) == frame
}

/// A client on this host that leaves its checksums to the device (their fields hold only the
/// pseudo-header's sum): to a local pod the sum is kept partial, with the new addresses', for
/// the device that completes it; a frame sent from XDP (to a remote pod, the reply back) gets
/// its whole checksum, over segments of every size (256-byte chunks, words and a last byte).
#[test]
fn partial_checksums_stay_partial_for_the_kernel_and_are_completed_when_sent_from_xdp() {
    with_datapath(|h| {
        h.program(&hello(&[(LOCAL_POD, true)]));
        for proto in [TCP, UDP] {
            let spec = match proto {
                TCP => FrameSpec::tcp((CLIENT, 41000), (NODE, NODE_PORT), SYN),
                _ => FrameSpec::udp((CLIENT, 41000), (NODE, NODE_PORT)),
            };
            let (verdict, out) = h.xdp(&partial(h.client_frame(spec)));
            assert_eq!(verdict, XDP_PASS);
            let p = frame::parse(&out).unwrap();
            assert_eq!((p.dst, p.dport), (LOCAL_POD, 50000));
            assert!(p.ip_checksum_ok);
            assert!(is_partial(&out), "{proto}: partial, with the pod's address");
        }

        h.program(&hello(&[(REMOTE_POD, false)]));
        for (i, size) in [0usize, 1, 3, 255, 256, 1000, 1301, 1452]
            .into_iter()
            .enumerate()
        {
            for proto in [TCP, UDP] {
                let (out, back) = remote_partial_round_trip(h, i, size, proto);
                let p = frame::parse(&out).unwrap();
                assert_eq!((p.dst, p.src), (REMOTE_POD, NODE));
                assert_checksums(&p);
                let r = frame::parse(&back).unwrap();
                assert_eq!((r.src, r.dst), (NODE, CLIENT));
                assert_checksums(&r);
            }
        }

        h.program(&hello6(&[(REMOTE_POD6, false)]));
        for proto in [TCP, UDP] {
            let mut spec = match proto {
                TCP => frame::FrameSpec6::tcp((CLIENT6, 43000), (LB6, 60000), SYN),
                _ => frame::FrameSpec6::udp((CLIENT6, 43000), (LB6, 60000)),
            };
            spec.dst_mac = h.node_mac;
            spec.payload = vec![0x5a; 517];
            let (verdict, out) = h.xdp(&partial(spec.build()));
            assert_eq!(verdict, XDP_TX);
            let p = parse6_ok(&out);
            assert_eq!(p.dst, REMOTE_POD6);
        }
    });
}

/// In generic XDP a refusal of a packet whose skb asks for its checksum to be completed (a sender
/// on this host) keeps asking, at the L4 header now in the quote: the quote holds the whole TCP
/// header, and the field the value a device would write there, so the message stays as sent.
/// Whole checksums, and native XDP, get the usual 8 bytes.
#[test]
fn refusals_of_partial_sums_in_generic_xdp_quote_a_field_the_device_leaves_alone() {
    use exposure_common::checksum::{fold, sum_bytes};
    with_datapath(|h| {
        h.program(&hello(&[]));
        let tcp = || FrameSpec::tcp((CLIENT, 40010), (NODE, NODE_PORT), SYN);
        let udp = || FrameSpec::udp((CLIENT, 40011), (NODE, NODE_PORT));
        // Native: 8 bytes of TCP, partial or not.
        let (_, out) = h.xdp(&partial(h.client_frame(tcp())));
        assert_eq!(frame::parse(&out).unwrap().l4.len(), 8 + 20 + 8);
        mark_generic_xdp(h);
        for (spec, l4_len, field) in [(tcp(), 20, 16), (udp(), 8, 6)] {
            let input = partial(h.client_frame(spec));
            let (verdict, out) = h.xdp(&input);
            assert_eq!(verdict, XDP_TX);
            let p = frame::parse(&out).unwrap();
            assert_eq!(p.proto, frame::ICMP);
            assert!(p.ip_checksum_ok && p.l4_checksum_ok, "ICMP checksum");
            assert_eq!(
                p.l4.len(),
                8 + 20 + l4_len,
                "quotes the L4 header to its checksum"
            );
            let quoted = &p.l4[28..];
            assert_eq!(&quoted[..field], &input[34..34 + field], "as sent");
            // What a device completing the checksum from the L4 header would write: the same.
            let f = u16::from_ne_bytes([quoted[field], quoted[field + 1]]);
            assert_eq!(
                !fold(sum_bytes(quoted, 0)),
                f,
                "a field the device leaves alone"
            );
        }
        // A whole checksum: the usual 8 bytes.
        let (_, out) = h.xdp(&h.client_frame(tcp()));
        assert_eq!(frame::parse(&out).unwrap().l4.len(), 8 + 20 + 8);
        // IPv6: the quote after the 40-byte header.
        h.program(&hello6(&[]));
        let mut spec = frame::FrameSpec6::tcp((CLIENT6, 40012), (NODE6, NODE_PORT), SYN);
        spec.dst_mac = h.node_mac;
        let input = partial(spec.build());
        let (verdict, out) = h.xdp(&input);
        assert_eq!(verdict, XDP_TX);
        let p = parse6_ok(&out);
        assert_eq!(p.l4.len(), 8 + 40 + 20);
        let quoted = &p.l4[48..];
        assert_eq!(&quoted[..16], &input[54..70]);
        let f = u16::from_ne_bytes([quoted[16], quoted[17]]);
        assert_eq!(!fold(sum_bytes(quoted, 0)), f);
    });
}

/// Marks the harness's interface as running generic XDP.
fn mark_generic_xdp(h: &Harness) {
    mark_xdp(h, h.ifindex, exposure_common::XDP_MODE_GENERIC);
}

/// Marks interface `ifindex` in `XDP_IFACES` as the agent does once it attached XDP there in
/// `mode` (`XDP_MODE_*`).
fn mark_xdp(h: &Harness, ifindex: u32, mode: u8) {
    let marks = aya::maps::MapData::from_pin(h.pin_dir.join("XDP_IFACES")).unwrap();
    let mut marks: aya::maps::HashMap<_, u32, u8> =
        aya::maps::Map::HashMap(marks).try_into().unwrap();
    marks.insert(ifindex, mode, 0).unwrap();
}

/// A request with a partial checksum from the client (source port 42000 + `i`, `size` bytes of
/// payload) through XDP to the remote pod, then the pod's answer, partial too (its node forwards
/// what its pod left): the frames XDP sent on with XDP_TX, the request's and the answer's.
fn remote_partial_round_trip(
    h: &mut Harness,
    i: usize,
    size: usize,
    proto: u8,
) -> (Vec<u8>, Vec<u8>) {
    let client = (CLIENT, 42000 + i as u16);
    let mut spec = match proto {
        TCP => FrameSpec::tcp(client, (NODE, NODE_PORT), SYN),
        _ => FrameSpec::udp(client, (NODE, NODE_PORT)),
    };
    spec.payload = (0..size).map(|b| (b * 7 + 3) as u8).collect();
    let (verdict, out) = h.xdp(&partial(h.client_frame(spec)));
    assert_eq!(verdict, XDP_TX, "{proto} {size}");
    let snat_port = frame::parse(&out).unwrap().sport;
    let mut answer = match proto {
        TCP => FrameSpec::tcp((REMOTE_POD, 50000), (NODE, snat_port), SYN | ACK),
        _ => FrameSpec::udp((REMOTE_POD, 50000), (NODE, snat_port)),
    };
    answer.payload = vec![0xa5; size];
    let (verdict, back) = h.xdp(&partial(h.peer_frame(answer)));
    assert_eq!(verdict, XDP_TX, "{proto} {size}: the answer");
    (out, back)
}

/// In generic XDP the skb goes on whatever the verdict, so a partial sum stays partial also when
/// the packet is sent from XDP, both ways: the device completes it, or the kernel when it
/// segments a GSO packet (a completed sum would be summed again, and the pod drop the packet).
#[test]
fn partial_checksums_stay_partial_on_an_interface_in_generic_xdp() {
    with_datapath(|h| {
        mark_generic_xdp(h);
        h.program(&hello(&[(REMOTE_POD, false)]));
        for (i, size) in [0usize, 1, 3, 1000, 1452].into_iter().enumerate() {
            for proto in [TCP, UDP] {
                let (out, back) = remote_partial_round_trip(h, i, size, proto);
                let p = frame::parse(&out).unwrap();
                assert_eq!((p.dst, p.dport, p.src), (REMOTE_POD, 50000, NODE));
                assert!(p.ip_checksum_ok);
                assert!(
                    is_partial(&out),
                    "{proto} {size}: partial, with the new addresses"
                );
                let r = frame::parse(&back).unwrap();
                assert_eq!((r.src, r.sport, r.dst), (NODE, NODE_PORT, CLIENT));
                assert!(
                    is_partial(&back),
                    "{proto} {size}: the answer stays partial"
                );
            }
        }
        h.program(&hello6(&[(REMOTE_POD6, false)]));
        let mut spec = frame::FrameSpec6::tcp((CLIENT6, 43000), (LB6, 60000), SYN);
        spec.dst_mac = h.node_mac;
        spec.payload = vec![0x5a; 517];
        let (verdict, out) = h.xdp(&partial(spec.build()));
        assert_eq!(verdict, XDP_TX);
        assert_eq!(frame::parse6(&out).unwrap().dst, REMOTE_POD6);
        assert!(is_partial(&out), "IPv6: partial");
        // Whole checksums are updated as anywhere else.
        h.program(&hello(&[(REMOTE_POD, false)]));
        let (verdict, out) =
            h.xdp(&h.client_frame(FrameSpec::tcp((CLIENT, 44000), (NODE, NODE_PORT), SYN)));
        assert_eq!(verdict, XDP_TX);
        assert_checksums(&frame::parse(&out).unwrap());
    });
}

/// A restart restores what the arrays hold wherever its ids lie (ids freed by churn leave gaps),
/// read in batches: across a batch's end, up to the last element; the maps check reads only the
/// ids below its limits.
#[test]
fn the_service_and_backend_arrays_are_read_back_wherever_their_ids_lie() {
    with_datapath(|h| {
        let last_service = h.maps.services.len() - 1;
        let last_backend = h.maps.backends.len() - 1;
        let service_ids = [0, 4095, 4096, 4097, 9000, last_service];
        let backend_ids = [1, 4095, 4096, 8192, 70_000, last_backend];
        for (n, id) in service_ids.iter().enumerate() {
            let service = exposure_common::Service {
                backend_count: n as u32,
                flags: exposure_common::SERVICE_IN_USE,
                ..Default::default()
            };
            h.maps.services.set(*id, service, 0).unwrap();
        }
        for (n, id) in backend_ids.iter().enumerate() {
            let backend = exposure_common::Backend {
                addr: Ipv4Addr::new(198, 19, 7, n as u8 + 1).into(),
                port: 8080,
                flags: 0,
            };
            h.maps.backends.set(*id, backend, 0).unwrap();
        }
        let all = h.maps.snapshot().unwrap();
        assert_eq!(
            all.services.keys().copied().collect::<Vec<_>>(),
            service_ids
        );
        for (n, id) in service_ids.iter().enumerate() {
            assert_eq!(all.services[id].backend_count, n as u32, "service {id}");
        }
        assert_eq!(
            all.backends.keys().copied().collect::<Vec<_>>(),
            backend_ids
        );
        for (n, id) in backend_ids.iter().enumerate() {
            let want: exposure_common::Addr = Ipv4Addr::new(198, 19, 7, n as u8 + 1).into();
            assert_eq!(all.backends[id].addr, want, "backend {id}");
        }
        let below = h.maps.check_snapshot(4097, 8193).unwrap();
        assert_eq!(
            below.services.keys().copied().collect::<Vec<_>>(),
            [0, 4095, 4096]
        );
        assert_eq!(
            below.backends.keys().copied().collect::<Vec<_>>(),
            [1, 4095, 4096, 8192]
        );
    });
}
