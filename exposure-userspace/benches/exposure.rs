//! `cargo xtask bench`: measurements that tests must not time.
//!
//! Control plane: the real agent (release build) in the namespace lab watching the test API server
//! with N LoadBalancer Services of 10 endpoints each: time from agent start to the first full sync
//! (process start, BPF load, list, translate, map writes), the reconcile step alone, the agent's peak
//! RSS, and how long an EndpointSlice change takes to reach the datapath's maps.
//!
//! Datapath: per-packet cost through BPF_PROG_TEST_RUN beside a no-op floor and a one-lookup
//! reference. End to end (`exposure/forwarding.rs`): packets/s, TCP connections/s and throughput
//! through a lab node for Exposure (also with `--redirect-to-pods` and `--xdp-redirect-to-pods`,
//! and in generic XDP),
//! kube-proxy's iptables and nftables layouts, and plain forwarding without and with a no-op XDP
//! program on the nodes (the end-to-end floor).
//!
//! Writes `bench/results/<date>.md` with SVG charts beside it and prints it. `--quick` runs the
//! small sizes only. While working on one part: `EXPOSURE_BENCH_CONTROL_PLANE_ONLY=<Services>`,
//! `EXPOSURE_BENCH_DATAPATH_ONLY=<backends>` (per-packet costs at 1,000 Services, or
//! `EXPOSURE_BENCH_SERVICES`; `EXPOSURE_BENCH_REPEAT` runs per measurement, long enough for
//! `perf record`) or `EXPOSURE_BENCH_E2E_ONLY=<0..8>` (one end-to-end variant at 10 Services, in
//! the order of `forwarding::Variant::ALL` then `GENERIC`; `EXPOSURE_BENCH_PACKETS` per run, 300,000 by default;
//! `EXPOSURE_BENCH_NODE_CONNTRACK=1` with a NAT rule on the nodes, so they track connections).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use exposure::datapath::KernelMaps;
use exposure_common::{port, Addr, FrontendKey, MAX_FLOWS, PROTO_TCP, SCOPE_EXTERNAL};
use exposure_lab::{
    agent::{Agent, Source},
    apiserver::Kind,
    control_plane::ControlPlane,
    lab::Lab,
    netns::unique_prefix,
    scale,
};
use serde_json::{json, Value};

#[path = "exposure/chart.rs"]
mod chart;
#[path = "exposure/forwarding.rs"]
mod forwarding;

const BIN: &str = env!("CARGO_BIN_EXE_exposure");
const PER_SERVICE: usize = 10;
const CHANGES: usize = 25;
/// Rounds of the per-packet measurements: each round runs every program once with a fifth of
/// the repeats, and each cost is the least of its rounds. Another tenant of the host or an
/// interrupt only ever adds time, and a round takes a fraction of a second, so one quiet round
/// in five suffices; a single run of the whole count on a host that got busy partway measured
/// an established flow 20-100% over its cost.
const ROUNDS: u32 = 5;

/// Runs `round` [`ROUNDS`] times, with the round's number, and gives each slot's least of what
/// the rounds reported for it through `keep(slot, ns)`.
fn least_of_rounds<const N: usize>(
    mut round: impl FnMut(u16, &mut dyn FnMut(usize, f64)),
) -> [f64; N] {
    let mut least = [f64::INFINITY; N];
    for r in 0..ROUNDS as u16 {
        round(r, &mut |slot, ns| least[slot] = least[slot].min(ns));
    }
    least
}

/// A run's time, once it gave the verdict it must.
fn checked((verdict, ns): (u32, f64), want: i32, what: &str) -> f64 {
    assert_eq!(verdict as i32, want, "{what}");
    ns
}

struct ControlPlaneResult {
    services: usize,
    full_sync: Duration,
    reconcile: Duration,
    peak_rss_kib: u64,
    change_latency: Vec<Duration>,
    /// A new Service (and its slice) applied → the datapath selects all its endpoints.
    add_latency: Vec<Duration>,
    /// That Service deleted → the datapath selects none of them.
    delete_latency: Vec<Duration>,
    /// The agent's first check of its maps (`exposure_maps_check_duration_seconds`).
    maps_check: Duration,
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The agent logs `took_us=N` for each sync; the first is the full initial reconcile.
fn first_sync_us(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("synced"))
        .find_map(|l| l.split("took_us=").nth(1))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Backend addresses the datapath currently selects from for Service `i`.
fn live_backends(maps: &KernelMaps, i: usize) -> Vec<(Addr, u16)> {
    let vip: Ipv4Addr = scale::vip(i).parse().unwrap();
    let key = FrontendKey {
        addr: Addr::from(vip),
        port: port(80),
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    };
    let Some(fe) = maps.frontend(&key) else {
        return Vec::new();
    };
    let Ok(svc) = maps.services.get(&fe.service_id, 0) else {
        return Vec::new();
    };
    let Ok(table) = maps.maglev.read(svc.table_offset, svc.table_size) else {
        return Vec::new();
    };
    let ids: std::collections::BTreeSet<u32> = table.into_iter().collect();
    ids.into_iter()
        .filter_map(|bid| maps.backends.get(&bid, 0).ok())
        .map(|b| (b.addr, b.port))
        .collect()
}

fn control_plane(services: usize) -> ControlPlaneResult {
    forwarding::wait_for_quiet();
    let prefix = unique_prefix("b");
    let lab = Lab::new(&prefix, &[0]).expect("lab");
    let node = &lab.nodes[0];
    let dir = std::env::temp_dir().join(&prefix);
    let cp = ControlPlane::start(&lab, &dir).unwrap();
    // The objects of CHANGES more Services, created and deleted once synced.
    let mut objects: Vec<Value> = scale::objects(services + CHANGES, PER_SERVICE, &node.name);
    let first_extra = format!("svc-{services:05}");
    let split = objects
        .iter()
        .position(|o| o["metadata"]["name"] == first_extra.as_str())
        .unwrap();
    let extra = objects.split_off(split);
    cp.apply_all(objects.iter().cloned());
    let (api, kubeconfig) = (&cp.api, cp.kubeconfig.clone());

    let started = Instant::now();
    let mut agent = Agent::spawn_with(
        Path::new(BIN),
        &prefix,
        node,
        &Source::Kubeconfig(&kubeconfig),
        &dir,
        &["--max-maglev-entries", "12000000"],
    )
    .unwrap();
    agent
        .wait_healthy_within(node, Duration::from_secs(600))
        .expect("first full sync");
    let full_sync = started.elapsed();
    let reconcile = Duration::from_micros(first_sync_us(&agent.log_text()));
    // The agent checks its maps once it has synced (then every --maps-check-period).
    let t = Instant::now();
    let maps_check = loop {
        let checked = exposure_lab::agent::metrics(node).ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("exposure_maps_check_duration_seconds "))
                .and_then(|v| v.parse::<f64>().ok())
        });
        match checked {
            Some(secs) if secs > 0.0 => break Duration::from_secs_f64(secs),
            _ if t.elapsed() > Duration::from_secs(60) => break Duration::ZERO,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };

    // Change one endpoint of a Service and time until the datapath selects the new one.
    let maps = KernelMaps::open(&agent.pin_dir).unwrap();
    let mut change_latency = Vec::new();
    for k in 0..CHANGES {
        let i = (k * 7919) % services;
        let name = format!("svc-{i:05}");
        let new_ip: Ipv4Addr = Ipv4Addr::new(198, 19, 255, k as u8 + 1);
        let slice = objects
            .iter()
            .find(|o| {
                o["kind"] == "EndpointSlice"
                    && o["metadata"]["labels"]["kubernetes.io/service-name"] == name.as_str()
            })
            .cloned()
            .unwrap();
        let mut changed = slice.clone();
        changed["endpoints"][0]["addresses"] = json!([new_ip.to_string()]);
        let want = (
            Addr::from(new_ip),
            port(changed["ports"][0]["port"].as_u64().unwrap() as u16),
        );
        let t = Instant::now();
        api.apply(changed);
        while !live_backends(&maps, i).contains(&want) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "change to {name} never reached the datapath"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        change_latency.push(t.elapsed());
        api.apply(slice);
    }

    // Create Services one at a time, each with its slice, and time until the datapath selects
    // all their endpoints; then delete each and time until it selects none.
    let (mut add_latency, mut delete_latency) = (Vec::new(), Vec::new());
    for k in 0..CHANGES {
        let i = services + k;
        let name = format!("svc-{i:05}");
        let mine = extra.iter().filter(|o| {
            o["metadata"]["name"] == name.as_str()
                || o["metadata"]["labels"]["kubernetes.io/service-name"] == name.as_str()
        });
        let t = Instant::now();
        for o in mine {
            api.apply(o.clone());
        }
        while live_backends(&maps, i).len() < PER_SERVICE {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "new Service {name} never reached the datapath"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        add_latency.push(t.elapsed());
    }
    for k in 0..CHANGES {
        let i = services + k;
        let name = format!("svc-{i:05}");
        let t = Instant::now();
        assert!(api.delete(Kind::Service, "scale", &name));
        while !live_backends(&maps, i).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "deleted Service {name} is still in the datapath"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        delete_latency.push(t.elapsed());
    }
    let peak_rss_kib = agent.pid().map(peak_rss_kib).unwrap_or(0);
    drop(agent);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    change_latency.sort();
    add_latency.sort();
    delete_latency.sort();
    ControlPlaneResult {
        services,
        full_sync,
        reconcile,
        peak_rss_kib,
        change_latency,
        add_latency,
        delete_latency,
        maps_check,
    }
}

/// Mean ns per run of each scenario at one Service count.
struct PacketCosts {
    services: usize,
    /// Backends of the Service the established and new flows go to.
    backends: usize,
    floor: f64,
    /// A program doing nothing but one 16-byte LRU hash lookup (a hit): what any stateful
    /// datapath pays at least per packet.
    one_lookup: f64,
    non_service: f64,
    established: f64,
    floor_single: f64,
    new_flow: f64,
    /// A new flow to a remote backend: FIB lookup, SNAT port claimed, sent back out (XDP_TX).
    new_flow_remote: f64,
    /// A program doing nothing but insert a new key into each of two LRU tables of the flow
    /// tables' size (a flow and its reply entry), single runs: what a new flow pays at least.
    two_inserts: f64,
    /// The same with both tables full, so each insert evicts (a busy node's steady state).
    two_inserts_full: f64,
    /// A new flow to a local backend with the flow tables full.
    new_flow_full: f64,
    /// A remote backend's reply, translated at XDP and sent straight back.
    reply_xdp: f64,
    /// A local backend's reply, translated at tc egress.
    reply_tc: f64,
    /// Any other packet leaving through tc egress (not a reply): what every packet the node sends costs.
    other_egress_tc: f64,
    /// A tc program that returns `TC_ACT_OK`, on the same reply (tc's own floor: an skb per run).
    tc_floor: f64,
    /// The redirect modes' program on a pod's interface: a redirected flow's reply, sent on to the
    /// client's interface (translated there at tc egress, as `reply_tc`).
    reply_from_pod: f64,
    /// The same program on any other packet a pod sends (what the redirect modes add to it).
    other_pod_egress: f64,
    /// An established IPv6 flow.
    established6: f64,
}

fn xdp_ns(dp: &mut exposure::datapath::Datapath, frame: &[u8], repeat: u32) -> (u32, f64) {
    xdp_ns_on(dp, None, frame, repeat)
}

/// [`xdp_ns`] for a frame arriving on interface `ifindex` (else the loopback device).
fn xdp_ns_on(
    dp: &mut exposure::datapath::Datapath,
    ifindex: Option<u32>,
    frame: &[u8],
    repeat: u32,
) -> (u32, f64) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Option<Vec<u8>> = ifindex.map(|i| {
        [0, frame.len() as u32, 0, i, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect()
    });
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx.as_deref(),
        repeat,
        ..Default::default()
    };
    let r = dp.xdp().unwrap().test_run(opts).expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration.as_nanos() as f64)
}

/// The frame after one run of the XDP program.
fn xdp_out(dp: &mut exposure::datapath::Datapath, frame: &[u8]) -> Vec<u8> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let r = dp.xdp().unwrap().test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    out
}

fn tc_ns(dp: &mut exposure::datapath::Datapath, frame: &[u8], repeat: u32) -> (u32, f64) {
    tc_program_ns(dp, exposure::datapath::TC_PROGRAM, frame, repeat)
}

fn tc_program_ns(
    dp: &mut exposure::datapath::Datapath,
    program: &str,
    frame: &[u8],
    repeat: u32,
) -> (u32, f64) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let r = dp
        .tc_program(program)
        .unwrap()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN (tc)");
    (r.return_value, r.duration.as_nanos() as f64)
}

/// Fills the IPv4 flow and reply tables with `count` made-up flows each (198.19.128.0/17 clients),
/// from userspace: past the tables' size, each insert evicts, so they are full.
fn fill_flow_tables(maps: &mut KernelMaps, count: u32) {
    let base = u32::from(Ipv4Addr::new(198, 19, 128, 0));
    let now = exposure::datapath::datapath_clock_ns();
    for i in 0..count {
        let key = exposure_common::FlowKey4 {
            saddr: (base + i / 40_000).to_be(),
            daddr: u32::from(Ipv4Addr::new(198, 18, 0, 200)).to_be(),
            sport: port(1024 + (i % 40_000) as u16),
            dport: port(80),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let flow = exposure_common::Flow {
            last_seen_ns: now,
            ..Default::default()
        };
        let reply = exposure_common::Reply {
            last_seen_ns: now,
            ..Default::default()
        };
        maps.flows4.insert(key, flow, 0).unwrap();
        maps.replies4.insert(key, reply, 0).unwrap();
    }
}

fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    exposure_lab::frame::FrameSpec::tcp(src, dst, exposure_lab::frame::ACK).build()
}

/// Per-packet cost through BPF_PROG_TEST_RUN, in a private network namespace, with `services`
/// Services; the one that established and new flows go to has `backends` backends.
fn packet_costs(services: usize, backends: usize, repeat: u32) -> PacketCosts {
    use std::sync::Arc;

    use exposure::{
        datapath::{Capacity, Datapath},
        model::{
            BackendAddr, DesiredService, DesiredState, FrontendAddr, FrontendKind, Protocol,
            ServicePortName,
        },
        sync::{DatapathMaps as _, Limits, Reconciler},
    };
    // The previous stage's lab and maps (up to 128 MiB of Maglev array) are freed by kernel
    // workers after the fact: measure once that is done.
    forwarding::wait_for_quiet();
    let prefix = unique_prefix("d");
    let ns = exposure_lab::netns::Netns::create(&format!("{prefix}-dp")).unwrap();
    // The node's interface towards other nodes: remote backends are behind a neighbour on it.
    for cmd in [
        "link add eth0 type veth peer name eth0p",
        "addr add 198.18.0.10/24 dev eth0",
        "link set eth0 up",
        "link set eth0p up",
        "neigh add 198.18.0.20 lladdr 02:00:00:00:00:20 dev eth0 nud permanent",
        "route add 198.18.250.0/24 via 198.18.0.20",
    ] {
        ns.ip(cmd).unwrap();
    }
    // bpf_fib_lookup answers "forwarding disabled" otherwise, as the kernel would for routing.
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.run(move || {
        let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/{prefix}"));
        // Removes the pins even if a measurement panics.
        struct Unpin(std::path::PathBuf);
        impl Drop for Unpin {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _unpin = Unpin(pin_dir.clone());
        let capacity = Capacity {
            frontends: 131_072,
            services: 131_072,
            // 100,000 tables of 251 entries (4 bytes each in the kernel: 128 MiB).
            maglev_entries: 32 * 1024 * 1024,
            ..Default::default()
        };
        let mut dp = Datapath::load_with(&pin_dir, capacity).unwrap();
        let mut maps = KernelMaps::open(&pin_dir).unwrap();
        let limits = Limits {
            frontends: 131_072,
            services: 131_072,
            maglev_entries: 32 * 1024 * 1024,
            ..Default::default()
        };
        let eth0 = nix::net::if_::if_nametoindex("eth0").unwrap();
        maps.set_node_addr(eth0, Ipv4Addr::new(198, 18, 0, 10).into())
            .unwrap();
        let mut reconciler = Reconciler::restore(maps.snapshot().unwrap(), limits);
        let svc = |name: String, front: (Ipv4Addr, u16), back: Ipv4Addr| {
            let mut d = DesiredService::default();
            d.frontends.insert(
                FrontendAddr {
                    ip: front.0.into(),
                    port: front.1,
                    protocol: Protocol::Tcp,
                    scope: exposure::model::Scope::External,
                },
                FrontendKind::LoadBalancer,
            );
            // The ping-pong pair's backends are each other's frontends (port 80); the rest use 8080.
            let port = if back.octets()[2] == 255 { 80 } else { 8080 };
            d.backends = vec![BackendAddr {
                ip: back.into(),
                port,
                local: true,
            }];
            (
                ServicePortName {
                    namespace: "bench".into(),
                    name,
                    port: String::new(),
                    protocol: Protocol::Tcp,
                    family: exposure::model::IpFamily::V4,
                    scope: exposure::model::Scope::External,
                },
                Arc::new(d),
            )
        };
        let mut state = DesiredState::default();
        for i in 0..services {
            // 65,536 VIPs fit the lab's range; beyond that, more ports on them.
            let front = (
                scale::vip(i % 65_536).parse().unwrap(),
                80 + (i / 65_536) as u16,
            );
            let (n, d) = svc(
                format!("s{i}"),
                front,
                Ipv4Addr::new(198, 19, (i / 256 % 255) as u8, (i % 256) as u8),
            );
            state.services.insert(n, d);
        }
        // Two frontends whose backends are each other: every run of the same buffer translates an
        // established flow, alternating between the two, with no state created after the first two.
        // "ping" has `backends` backends, each the frontend of a "pong" whose backend is ping.
        let p = Ipv4Addr::new(198, 19, 255, 1);
        let pong = |j: usize| {
            (
                Ipv4Addr::new(198, 19, 255, 2 + (j % 250) as u8),
                80 + (j / 250) as u16,
            )
        };
        let (ping_key, mut ping) = svc("ping".into(), (p, 80), p);
        Arc::make_mut(&mut ping).backends = (0..backends)
            .map(|j| BackendAddr {
                ip: pong(j).0.into(),
                port: pong(j).1,
                local: true,
            })
            .collect();
        state.services.insert(ping_key, ping);
        for j in 0..backends {
            let (key, d) = svc(format!("pong{j}"), pong(j), p);
            state.services.insert(key, d);
        }
        // A Service whose one backend is on another node: new flows to it are SNATed and sent
        // back out.
        let remote_front = Ipv4Addr::new(198, 18, 0, 100);
        let (remote_key, mut remote) = svc(
            "remote".into(),
            (remote_front, 80),
            Ipv4Addr::new(198, 18, 250, 1),
        );
        Arc::make_mut(&mut remote).backends[0].local = false;
        state.services.insert(remote_key, remote);
        // The same pair in IPv6.
        let (p6, q6): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "2001:2:0:ff::1".parse().unwrap(),
            "2001:2:0:ff::2".parse().unwrap(),
        );
        for (name, front, back) in [("ping6", p6, q6), ("pong6", q6, p6)] {
            let mut d = DesiredService::default();
            let addr = FrontendAddr {
                ip: front.into(),
                port: 80,
                protocol: Protocol::Tcp,
                scope: exposure::model::Scope::External,
            };
            d.frontends.insert(addr, FrontendKind::LoadBalancer);
            d.backends = vec![BackendAddr {
                ip: back.into(),
                port: 80,
                local: true,
            }];
            let key = ServicePortName {
                namespace: "bench".into(),
                name: name.into(),
                port: String::new(),
                protocol: Protocol::Tcp,
                family: exposure::model::IpFamily::V6,
                scope: exposure::model::Scope::External,
            };
            state.services.insert(key, Arc::new(d));
        }
        let report = reconciler.reconcile(&state, &mut maps);
        assert!(
            report.errors.is_empty(),
            "{} errors, the first: {:?}",
            report.errors.len(),
            report.errors.first()
        );

        let floor_prog = exposure_lab::xdp_pass::load().unwrap();
        let client = Ipv4Addr::new(198, 18, 0, 1);
        let other = frame((client, 40000), (Ipv4Addr::new(198, 18, 0, 10), 22));
        let (lookup_prog, _lookup_map) = exposure_lab::xdp_pass::load_one_lookup().unwrap();
        let ping = frame((client, 40000), (p, 80));
        // The first run picks ping's backend; the second makes the pong flow it leads to.
        let out = xdp_out(&mut dp, &ping);
        xdp_ns(&mut dp, &out, 1);
        let frame6 = |dst| {
            exposure_lab::frame::FrameSpec6::tcp(
                ("2001:2::1".parse().unwrap(), 40000),
                (dst, 80),
                exposure_lab::frame::ACK,
            )
            .build()
        };
        let ping6 = frame6(p6);
        xdp_ns(&mut dp, &ping6, 1);
        xdp_ns(&mut dp, &frame6(q6), 1);
        // Replies. An entry whose translation is the identity keeps the buffer a reply on every
        // repeat, so each run is a full reply translation (lookup, rewrite, checksums, send).
        let (backend, node) = (
            Ipv4Addr::new(198, 19, 254, 1),
            Ipv4Addr::new(198, 18, 0, 10),
        );
        let reply_to = |to: Ipv4Addr, to_port: u16, remote: bool| {
            let key = exposure_common::FlowKey {
                saddr: Addr::from(backend),
                daddr: Addr::from(to),
                sport: port(8080),
                dport: port(to_port),
                proto: PROTO_TCP,
                _pad: [0; 3],
            };
            let reply = exposure_common::Reply {
                // Seen now, on the programs' clock: a reply of a flow that is over is passed.
                last_seen_ns: exposure::datapath::datapath_clock_ns(),
                frontend_addr: key.saddr,
                frontend_port: key.sport,
                client_addr: key.daddr,
                client_port: key.dport,
                flags: if remote {
                    exposure_common::FLOW_REMOTE
                } else {
                    0
                },
                ifindex: 1, // the test run's ingress (loopback): XDP_TX
                ..Default::default()
            };
            (key, reply)
        };
        let (key, reply) = reply_to(node, 61_000, true);
        maps.insert_reply(&key, &reply).unwrap();
        let remote_reply = frame((backend, 8080), (node, 61_000));
        let (key, reply) = reply_to(client, 40001, false);
        maps.insert_reply(&key, &reply).unwrap();
        let local_reply = frame((backend, 8080), (client, 40001));
        let other_egress = frame((node, 22), (client, 40009));
        // The same reply from a pod whose flow was sent to it (redirect modes), and any other
        // packet from the pod.
        let (key, mut reply) = reply_to(client, 40002, false);
        reply.flags |= exposure_common::FLOW_TO_POD;
        maps.insert_reply(&key, &reply).unwrap();
        let from_pod = exposure::datapath::TC_FROM_POD_PROGRAM;
        let pod_reply = frame((backend, 8080), (client, 40002));
        let pod_other = frame((backend, 40000), (client, 443));
        let tc_floor_prog = exposure_lab::xdp_pass::load_tc_ok().unwrap();

        // Each repeated measurement in ROUNDS rounds of repeat / ROUNDS, all of them in each
        // round, keeping each one's least.
        let r = (repeat / ROUNDS).max(1);
        // A run of one of the lab's reference programs.
        let lab_run = |prog: &std::os::fd::OwnedFd, f: &[u8], repeat: u32| -> (u32, f64) {
            let (verdict, ns) = exposure_lab::xdp_pass::test_run(prog, f, repeat).unwrap();
            (verdict, ns as f64)
        };
        let floor_run = |f: &[u8], repeat: u32| lab_run(&floor_prog, f, repeat);
        let (pass, tx, ok, unspec, redirect) = (2, 3, 0, -1, 7);
        let [floor, non_service, one_lookup, established, established6, reply_xdp, reply_tc, other_egress_tc, reply_from_pod, other_pod_egress, tc_floor] =
            least_of_rounds(|_, keep| {
                keep(0, checked(floor_run(&other, r), pass, "the floor passes"));
                keep(1, checked(xdp_ns(&mut dp, &other, r), pass, "XDP_PASS: no Service"));
                let lookup = lab_run(&lookup_prog, &other, r);
                keep(2, checked(lookup, pass, "the lookup finds its entry"));
                let established = xdp_ns(&mut dp, &ping, r);
                keep(3, checked(established, pass, "XDP_PASS after DNAT to a local backend"));
                let established6 = xdp_ns(&mut dp, &ping6, r);
                keep(4, checked(established6, pass, "XDP_PASS after DNAT to a local IPv6 backend"));
                let reply = xdp_ns(&mut dp, &remote_reply, r);
                keep(5, checked(reply, tx, "XDP_TX back towards the client"));
                let reply = tc_ns(&mut dp, &local_reply, r);
                keep(6, checked(reply, ok, "TC_ACT_OK after restoring the frontend"));
                let other = tc_ns(&mut dp, &other_egress, r);
                keep(7, checked(other, unspec, "TC_ACT_UNSPEC: not a reply"));
                let reply = tc_program_ns(&mut dp, from_pod, &pod_reply, r);
                keep(8, checked(reply, redirect, "TC_ACT_REDIRECT to the client's interface"));
                let other = tc_program_ns(&mut dp, from_pod, &pod_other, r);
                keep(9, checked(other, unspec, "TC_ACT_UNSPEC: not a reply"));
                let floor = lab_run(&tc_floor_prog, &local_reply, r);
                keep(10, checked(floor, ok, "the tc floor returns TC_ACT_OK"));
            });
        // New flows: one run each (so each is new); the floor measured the same way alongside.
        // Rounds as above: each round's median, and the least of the rounds' medians.
        let n = (repeat / 50).clamp(1_000, 20_000) as u16;
        let per_round = n / ROUNDS as u16;
        // To ping: with one backend it is like any other Service; with more, the Maglev pick.
        let target = p;
        // The `k`th new client (address and port) of a run.
        let new_client = |k: u16| {
            let ip = Ipv4Addr::new(198, 18, 1 + (k / 250) as u8 % 200, (k % 250) as u8 + 1);
            (ip, 1024 + k)
        };
        let median = |mut runs: Vec<f64>| {
            runs.sort_by(f64::total_cmp);
            runs[runs.len() / 2]
        };
        // The least a new flow pays (an entry in each of two LRU tables of the flow tables'
        // size), then both that and Exposure's new flows once the tables are full: every insert
        // then evicts the least recently used entry, as on a busy node.
        let values = [
            size_of::<exposure_common::Flow>(),
            size_of::<exposure_common::Reply>(),
        ];
        let (inserts_prog, insert_maps) =
            exposure_lab::xdp_pass::load_inserts(&values.map(|v| v as u32), MAX_FLOWS).unwrap();
        let new_flow_frame = frame(new_client(0), (target, 80));
        let insert_runs = |n: u16| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let (verdict, ns) =
                        exposure_lab::xdp_pass::test_run(&inserts_prog, &new_flow_frame, 1)
                            .unwrap();
                    assert_eq!(verdict, 2, "both inserts succeed");
                    ns as f64
                })
                .collect()
        };
        // New flows to the remote backend, fewer: each holds one of the pair's 4,536 SNAT ports,
        // and a fuller range would cost more tries per flow.
        let remote_per_round = n.min(1_000) / ROUNDS as u16;
        let [new_flow, floor_single, new_flow_remote, two_inserts] = least_of_rounds(|round, keep| {
            let (mut new_runs, mut floor_runs) = (Vec::new(), Vec::new());
            for k in round * per_round..(round + 1) * per_round {
                let f = frame(new_client(k), (target, 80));
                new_runs.push(xdp_ns(&mut dp, &f, 1).1);
                floor_runs.push(floor_run(&f, 1).1);
            }
            keep(0, median(new_runs));
            keep(1, median(floor_runs));
            let remote_runs = (round * remote_per_round..(round + 1) * remote_per_round)
                .map(|k| {
                    let f = frame(new_client(k), (remote_front, 80));
                    let run = xdp_ns_on(&mut dp, Some(eth0), &f, 1);
                    checked(run, tx, "XDP_TX towards the remote backend")
                })
                .collect();
            keep(2, median(remote_runs));
            keep(3, median(insert_runs(per_round)));
        });
        let (verdict, _) = exposure_lab::xdp_pass::test_run(
            &inserts_prog,
            &new_flow_frame,
            MAX_FLOWS + MAX_FLOWS / 8,
        )
        .unwrap();
        assert_eq!(verdict, 2, "inserts into full tables succeed");
        for map in &insert_maps {
            let held = exposure_lab::xdp_pass::count_keys(map, 16).unwrap();
            assert!(
                held as u32 > MAX_FLOWS / 10 * 9,
                "the reference tables are full: {held}"
            );
        }
        fill_flow_tables(&mut maps, MAX_FLOWS + MAX_FLOWS / 8);
        let [two_inserts_full, new_flow_full] = least_of_rounds(|round, keep| {
            keep(0, median(insert_runs(per_round)));
            let new_full_runs = (n + round * per_round..n + (round + 1) * per_round)
                .map(|k| {
                    let f = frame(new_client(k), (target, 80));
                    let run = xdp_ns(&mut dp, &f, 1);
                    checked(run, pass, "XDP_PASS after DNAT to a local backend")
                })
                .collect();
            keep(1, median(new_full_runs));
        });
        let held = maps.flow_count();
        assert!(
            held as u32 > MAX_FLOWS / 10 * 9,
            "Exposure's flow table is full: {held}"
        );
        drop(maps);
        drop(dp);
        PacketCosts {
            services,
            backends,
            floor,
            one_lookup,
            non_service,
            established,
            floor_single,
            new_flow,
            new_flow_remote,
            two_inserts,
            two_inserts_full,
            new_flow_full,
            reply_xdp,
            reply_tc,
            other_egress_tc,
            tc_floor,
            reply_from_pod,
            other_pod_egress,
            established6,
        }
    })
    .unwrap()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let quick = args.iter().any(|a| a == "--quick");
    if let Ok(n) = std::env::var("EXPOSURE_BENCH_CONTROL_PLANE_ONLY") {
        // For working on the agent: one control-plane size alone.
        let r = control_plane(n.parse().unwrap_or(10_000));
        eprintln!(
            "{} Services: synced in {}, reconcile {}, change median {}, created median {} max {}, deleted median {} max {}, maps check {}, peak RSS {} MiB",
            r.services,
            ms(r.full_sync),
            ms(r.reconcile),
            ms(r.change_latency[r.change_latency.len() / 2]),
            ms(r.add_latency[CHANGES / 2]),
            ms(r.add_latency[CHANGES - 1]),
            ms(r.delete_latency[CHANGES / 2]),
            ms(r.delete_latency[CHANGES - 1]),
            ms(r.maps_check),
            r.peak_rss_kib / 1024
        );
        return;
    }
    if let Ok(b) = std::env::var("EXPOSURE_BENCH_DATAPATH_ONLY") {
        // For working on the datapath: the per-packet costs alone, the target Service with
        // `EXPOSURE_BENCH_DATAPATH_ONLY=<backends>` backends (default 1), among
        // `EXPOSURE_BENCH_SERVICES` Services (default 1,000).
        let services = std::env::var("EXPOSURE_BENCH_SERVICES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000);
        let repeat = std::env::var("EXPOSURE_BENCH_REPEAT")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(200_000);
        let c = packet_costs(services, b.parse().unwrap_or(1).max(1), repeat);
        eprintln!(
            "floor {:.0} one lookup {:.0} non-service {:.0} established {:.0} (IPv6 {:.0}) reply xdp {:.0} reply tc {:.0} (other egress {:.0}, tc floor {:.0}) from pod: reply {:.0}, other {:.0}; new flow {:.0} (remote {:.0}; two inserts {:.0}) ns; tables full: new flow {:.0}, two inserts {:.0} ns",
            c.floor, c.one_lookup, c.non_service, c.established, c.established6, c.reply_xdp, c.reply_tc, c.other_egress_tc, c.tc_floor, c.reply_from_pod, c.other_pod_egress, c.new_flow, c.new_flow_remote, c.two_inserts, c.new_flow_full, c.two_inserts_full
        );
        return;
    }
    if let Ok(v) = std::env::var("EXPOSURE_BENCH_E2E_ONLY") {
        // For working on the end-to-end part alone: `EXPOSURE_BENCH_E2E_ONLY=<variant number>`.
        let every: Vec<_> = forwarding::Variant::ALL
            .into_iter()
            .chain(forwarding::Variant::GENERIC)
            .collect();
        let variant = every[v.parse::<usize>().unwrap_or(1) % every.len()];
        let packets = std::env::var("EXPOSURE_BENCH_PACKETS")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(300_000);
        // `EXPOSURE_BENCH_NODE_CONNTRACK=1`: with a NAT rule on the nodes (connection tracking on).
        let netfilter = if std::env::var("EXPOSURE_BENCH_NODE_CONNTRACK").is_ok_and(|v| v == "1") {
            forwarding::NodeNetfilter::Conntrack
        } else {
            forwarding::NodeNetfilter::Bare
        };
        let (runs, tcp) = forwarding::measure(variant, netfilter, 10, packets, Path::new(BIN));
        for r in runs {
            eprintln!("{r:?}");
        }
        for r in tcp {
            eprintln!("{r:?}");
        }
        return;
    }
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Exposure benchmarks, {date}{}\n",
        if quick { " (quick)" } else { "" }
    );
    let _ = writeln!(report, "Machine: {}\n", machine());
    let _ = writeln!(report, "## Control plane (Kubernetes API source)\n");
    let _ = writeln!(report, "The release agent in the namespace lab, watching the test API server (real list/watch over HTTP,");
    let _ = writeln!(
        report,
        "500-object pages) with N LoadBalancer Services of {PER_SERVICE} ready endpoints each, the objects"
    );
    let _ = writeln!(report, "as a real API server holds them (managedFields, kubectl's last-applied annotation, slices as the");
    let _ = writeln!(
        report,
        "EndpointSlice controller writes them, with pods as targets).\n"
    );
    let _ = writeln!(report, "| Services | Endpoints | agent start → synced | reconcile (translate + map writes) | peak RSS | EndpointSlice change → datapath (median / p90 / max of {CHANGES}) | Service created → datapath (median / max) | Service deleted → datapath (median / max) | maps check |");
    let _ = writeln!(
        report,
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"
    );
    for &n in sizes {
        eprintln!("control plane: {n} Services ...");
        let r = control_plane(n);
        let l = &r.change_latency;
        let _ = writeln!(
            report,
            "| {} | {} | {} | {} | {:.0} MiB | {} / {} / {} | {} / {} | {} / {} | {} |",
            r.services,
            r.services * PER_SERVICE,
            ms(r.full_sync),
            ms(r.reconcile),
            r.peak_rss_kib as f64 / 1024.0,
            ms(l[l.len() / 2]),
            ms(l[l.len() * 9 / 10]),
            ms(l[l.len() - 1]),
            ms(r.add_latency[CHANGES / 2]),
            ms(r.add_latency[CHANGES - 1]),
            ms(r.delete_latency[CHANGES / 2]),
            ms(r.delete_latency[CHANGES - 1]),
            ms(r.maps_check),
        );
    }
    let _ = writeln!(report, "\n*Maps check*: the agent's first `--maps-check-period` check (reading the Service maps back and comparing them with what it wrote; every 60 s by default, between syncs). Created: the Service and its slice applied, until the datapath selects all its endpoints; deleted: the Service deleted, until it selects none. Change latency includes the API server's watch delivery and the agent's 5 ms burst coalescing. Peak RSS includes the Maglev array the agent maps to write tables (here `--max-maglev-entries 12000000`: 48 MB of kernel memory, mapped once).");

    published_control_plane(&mut report);

    let repeat = if quick { 200_000 } else { 1_000_000 };
    let _ = writeln!(
        report,
        "\n## Datapath: per-packet cost (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(report, "Mean ns per packet as the kernel measures it over {} repeats, the least of {ROUNDS} rounds (each round runs every", repeat / ROUNDS);
    let _ = writeln!(report, "program below once: the host's other work only adds time), beside a two-instruction XDP_PASS");
    let _ = writeln!(report, "program measured in the same rounds (the floor: what any XDP program costs). \"Established\" runs one");
    let _ = writeln!(report, "buffer through two frontends that DNAT into each other, so every run is a full established-flow");
    let _ = writeln!(report, "translation (parse, frontend, conntrack hit, rewrite, checksums, counters). New flows are single");
    let _ = writeln!(
        report,
        "runs (each one new; the least of the rounds' medians), beside the floor measured the same way; to a local pod, and to a"
    );
    let _ = writeln!(report, "pod on another node (FIB lookup, a SNAT port claimed, sent back out). Replies run a reply whose");
    let _ = writeln!(report, "translation is the identity, so every repeat is a full reply translation; tc's floor is a program that");
    let _ = writeln!(report, "only returns TC_ACT_OK, run the same way (a tc test run builds an skb, hence its higher floor); *other");
    let _ = writeln!(report, "egress*: a packet that is no reply through the same tc program (what every other packet the node sends pays).");
    let _ = writeln!(report, "*One lookup*: a program that only looks up a 16-byte key (an IPv4 5-tuple) in a one-entry LRU hash map (a hit),");
    let _ = writeln!(
        report,
        "the least any datapath that keeps per-flow state pays per packet.\n"
    );
    let _ = writeln!(report, "| Services | floor | one lookup | non-service packet | established flow | established / floor | established IPv6 flow | reply at XDP (remote backend) | reply at tc (local backend; other egress; tc floor) | new flow (floor, single runs) | new flow, remote backend |");
    let _ = writeln!(
        report,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let service_counts: &[usize] = if quick {
        &[1, 1_000]
    } else {
        &[1, 1_000, 100_000]
    };
    let mut per_packet = Vec::new();
    let mut relative = Vec::new();
    let mut new_flows = Vec::new();
    let mut from_pods = Vec::new();
    for &n in service_counts {
        eprintln!("datapath: {n} Services ...");
        let c = packet_costs(n, 1, repeat);
        relative.push((
            c.one_lookup / c.floor.max(1.0),
            c.established / c.one_lookup.max(1.0),
        ));
        per_packet.push((
            format!("{n} Services"),
            vec![
                c.floor,
                c.one_lookup,
                c.non_service,
                c.established,
                c.reply_xdp,
                c.reply_tc,
            ],
        ));
        let _ = writeln!(
            report,
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.2}x | {:.0} ns | {:.0} ns | {:.0} ns ({:.0} ns; {:.0} ns) | {:.0} ns ({:.0} ns) | {:.0} ns |",
            c.services,
            c.floor,
            c.one_lookup,
            c.non_service,
            c.established,
            c.established / c.floor.max(1.0),
            c.established6,
            c.reply_xdp,
            c.reply_tc,
            c.other_egress_tc,
            c.tc_floor,
            c.new_flow,
            c.floor_single,
            c.new_flow_remote
        );
        new_flows.push(format!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns |",
            c.services,
            c.floor_single,
            c.two_inserts,
            c.new_flow,
            c.two_inserts_full,
            c.new_flow_full,
            c.new_flow_full - c.two_inserts_full,
        ));
        from_pods.push(format!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns |",
            c.services,
            c.tc_floor,
            c.reply_from_pod,
            c.reply_from_pod + c.reply_tc,
            c.other_pod_egress,
        ));
    }
    let (lookup_x, est_x) = relative
        .iter()
        .fold((0.0f64, 0.0f64), |(a, b), (x, y)| (a.max(*x), b.max(*y)));
    let _ = writeln!(report, "\nOne hash lookup alone costs up to {lookup_x:.1}x the floor here, so no datapath that keeps per-flow");
    let _ = writeln!(report, "state can come within 1.5x of it; Exposure's established flow costs up to {est_x:.1}x one lookup (it");
    let _ = writeln!(report, "also looks up the frontend, rewrites addresses and ports with their checksums, and counts).");
    let _ = writeln!(report, "IPv4 frontends and flows are keyed by 8- and 16-byte keys the program stores as whole words:");
    let _ = writeln!(report, "the kernel hashes a key right after it is written, and 4-byte loads spanning narrower stores");
    let _ = writeln!(report, "(a port beside a port) wait for them to reach the cache (on the Intel Xeon host of 2026-11-26");
    let _ = writeln!(
        report,
        "this took the established flow from about 56 to 43 ns, and a non-service packet from 21 to 16 ns)."
    );
    let _ = writeln!(report, "\nNew flows against their own floor: a new flow to a local pod writes two entries, the flow and");
    let _ = writeln!(report, "its reply's translation, each in an LRU hash table of {MAX_FLOWS} entries (the default `--max-flows`).");
    let _ = writeln!(report, "*Two inserts*: a program that only inserts a new 16-byte key into each of two such tables (values of");
    let _ = writeln!(report, "the flow and reply entries' sizes), the least any datapath that keeps both directions' state pays");
    let _ = writeln!(report, "per new flow. Single runs (the least of the rounds' medians), first into tables that hold few entries, then into full");
    let _ = writeln!(report, "tables (each insert evicts the least recently used entry: a busy node's steady state, reached");
    let _ = writeln!(report, "after as many new flows as the table holds), Exposure's filled from userspace the same way.\n");
    let _ = writeln!(report, "| Services | floor (single runs) | two inserts | new flow | two inserts, tables full | new flow, tables full | new flow − two inserts, full |");
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &new_flows {
        let _ = writeln!(report, "{row}");
    }
    let _ = writeln!(report, "\nThe redirect modes' program on the pods' interfaces (tc ingress), run the same way: a reply of a");
    let _ = writeln!(report, "flow sent to its pod, sent on to the interface its client's packets came in on (where tc egress then");
    let _ = writeln!(report, "translates it: *with tc egress* adds the reply at tc above), and any other packet a pod sends (what");
    let _ = writeln!(report, "the redirect modes add to it).\n");
    let _ = writeln!(
        report,
        "| Services | tc floor | reply from a pod | with tc egress | other packet from a pod |"
    );
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: |");
    for row in &from_pods {
        let _ = writeln!(report, "{row}");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    let _ = std::fs::create_dir_all(&dir);
    let stem = format!("{date}{}", if quick { "-quick" } else { "" });
    let name = format!("{stem}-per-packet.svg");
    let _ = std::fs::write(
        dir.join(&name),
        chart::grouped(
            "Datapath ns per packet (BPF_PROG_TEST_RUN), lower is better",
            "ns",
            &[
                "no-op floor",
                "one lookup",
                "non-Service",
                "established",
                "reply at XDP",
                "reply at tc",
            ],
            &per_packet,
        ),
    );
    let _ = writeln!(report, "\n![ns per packet]({name})");
    backends_per_service(&mut report, quick, repeat);
    end_to_end(&mut report, quick, &dir, &stem);
    print!("{report}");
    let file = dir.join(format!("{stem}.md"));
    std::fs::write(&file, &report).expect("write the report");
    eprintln!("wrote {}", file.display());
}

/// kube-proxy's own published control-plane figures, for the table above. Quoted, not measured
/// here: a real cluster can't run on this machine.
fn published_control_plane(report: &mut String) {
    let _ = writeln!(report, "\nkube-proxy's published figures for the same quantities (change → datapath, which Kubernetes");
    let _ = writeln!(report, "calls network programming latency, and memory):\n");
    let _ = writeln!(report, "| Source | Setting | Figure |");
    let _ = writeln!(report, "| --- | --- | --- |");
    let _ = writeln!(report, "| [KEP-3453](https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/3453-minimize-iptables-restore), kube-proxy iptables | the 5,000-node scalability test | network programming latency p50 about 27 s with full `iptables-restore` syncs, about 13 s with partial syncs (MinimizeIPTablesRestore, default since 1.27), about 5 s with `--iptables-min-sync-period 1s`; p90/p99 dominated by full resyncs |");
    let _ = writeln!(report, "| [kube-proxy docs](https://kubernetes.io/docs/reference/networking/virtual-ips/#optimizing-iptables-mode-performance), iptables | defaults `minSyncPeriod: 1s`, `syncPeriod: 30s` | each change may wait up to `minSyncPeriod` (1 s) before it is applied, by design, to batch changes |");
    let _ = writeln!(report, "| [kubernetes#65441](https://github.com/kubernetes/kubernetes/issues/65441), kube-proxy iptables (2018) | the 5,000-node scale-performance test | memory on a node the OOM killer reported: kube-proxy 239,100 pages RSS (about 930 MiB), two `iptables` processes beside it 213,077 and 140,203 pages (about 830 and 550 MiB) |");
    let _ = writeln!(report, "\nExposure applies each change on its own (5 ms coalescing), so its change → datapath time above is");
    let _ = writeln!(report, "that of one incremental map update plus the watch, not of a ruleset rewrite. How long the kernel");
    let _ = writeln!(report, "takes to load kube-proxy's whole rulesets on this machine is measured in the end-to-end section.");
    let _ = writeln!(report, "The memory figure is of another era and scale (a reference, not a ratio): Exposure's peak RSS above");
    let _ = writeln!(
        report,
        "is the whole agent's, and it runs no other process to program the datapath."
    );
}

/// Established and new flows to a Service with 1 to 1,000 backends, among 1,000 Services.
fn backends_per_service(report: &mut String, quick: bool, repeat: u32) {
    let counts: &[usize] = if quick {
        &[1, 1_000]
    } else {
        &[1, 10, 100, 1_000]
    };
    let _ = writeln!(report, "\nBy backends per Service, at 1,000 Services: the established flow's Service has N backends");
    let _ = writeln!(
        report,
        "(its pair has one), and new flows go to it, so each one is a Maglev pick among N.\n"
    );
    let _ = writeln!(report, "| backends | floor | established flow | established / floor | new flow (floor, single runs) |");
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: |");
    for &b in counts {
        eprintln!("datapath: {b} backends ...");
        let c = packet_costs(1_000, b, repeat);
        let _ = writeln!(
            report,
            "| {} | {:.0} ns | {:.0} ns | {:.2}x | {:.0} ns ({:.0} ns) |",
            c.backends,
            c.floor,
            c.established,
            c.established / c.floor.max(1.0),
            c.new_flow,
            c.floor_single
        );
    }
}

/// The end-to-end comparison: every variant at every Service count, a table and a chart.
fn end_to_end(report: &mut String, quick: bool, dir: &Path, stem: &str) {
    use exposure_lab::traffic::Flows;
    use forwarding::{NodeNetfilter, Target, Variant};
    let sizes: &[usize] = if quick {
        &[10, 1_000]
    } else {
        &[10, 1_000, 10_000]
    };
    let packets: u32 = if quick { 300_000 } else { 1_000_000 };
    let mut runs = Vec::new();
    let mut tcp = Vec::new();
    for &n in sizes {
        for v in Variant::ALL {
            eprintln!("end to end: {} with {n} Services ...", v.name());
            let (r, t) = forwarding::measure(v, NodeNetfilter::Bare, n, packets, Path::new(BIN));
            runs.extend(r);
            tcp.extend(t);
        }
    }
    // The Exposure modes again on nodes that track connections (one NAT rule), at one size.
    let conntrack_size = 1_000;
    let conntrack_variants = [
        Variant::Plain,
        Variant::Exposure,
        Variant::ExposureTcRedirect,
        Variant::ExposureRedirect,
    ];
    // The UDP runs of some variants at that one size, beside the main table.
    let runs_at_one_size = |variants: &[Variant], netfilter: NodeNetfilter, what: &str| {
        let mut runs = Vec::new();
        for &v in variants {
            eprintln!(
                "end to end: {} with {conntrack_size} Services{what} ...",
                v.name()
            );
            let (r, _) = forwarding::measure(v, netfilter, conntrack_size, packets, Path::new(BIN));
            runs.extend(r);
        }
        runs
    };
    let conntrack_runs = runs_at_one_size(
        &conntrack_variants,
        NodeNetfilter::Conntrack,
        ", conntrack on the nodes",
    );
    // Generic XDP (a NIC whose driver has none, or refuses it).
    let generic_runs = runs_at_one_size(&Variant::GENERIC, NodeNetfilter::Bare, "");
    let _ = writeln!(report, "\n## End to end: packets/s through a node\n");
    let _ = writeln!(report, "64-byte UDP packets from the lab's client to a NodePort on node-1, by an XDP live-frames generator");
    let _ = writeln!(
        report,
        "(BPF_PROG_TEST_RUN, {packets} packets per run, {} for new flows; the median of {} runs, a run that",
        forwarding::NEW_FLOWS_PER_RUN,
        forwarding::RUNS
    );
    let _ = writeln!(report, "loses over 1% of one flow's packets run again up to {} more times: generator and node share a CPU,", forwarding::RUNS);
    let _ = writeln!(report, "so such a loss means the node's work was deferred to ksoftirqd and the run timed that, not the node), to");
    let _ = writeln!(report, "node-1's own pod (local) or node-2's pod (remote), each variant in a fresh lab once the CPUs are idle.");
    let _ = writeln!(report, "The N Services are the two targets plus LoadBalancer fillers with one endpoint each. *One flow*: every");
    let _ = writeln!(report, "packet the same (an established flow); *new flows*: a random source address and port per packet.");
    let _ = writeln!(report, "kube-proxy's rules are generated in its own layouts (`exposure-lab/src/kube_proxy.rs`); plain");
    let _ = writeln!(
        report,
        "forwarding sends to the pod address with no Service at all (*with no-op XDP*: behind a"
    );
    let _ = writeln!(
        report,
        "two-instruction XDP_PASS program on the nodes' NICs). *Exposure, redirect* runs the agent"
    );
    let _ = writeln!(report, "with `--redirect-to-pods vp`: local pods' packets, translated at XDP, go from tc ingress into the");
    let _ = writeln!(report, "pod's namespace (`bpf_redirect_peer`), skipping node-1's second pass through its stack; *XDP");
    let _ = writeln!(report, "redirect* with `--xdp-redirect-to-pods vp`: from XDP straight to the pod's veth (its pod side");
    let _ = writeln!(report, "runs NAPI, as that mode requires), before any skb exists on node-1. The LAN switches frames in");
    let _ = writeln!(report, "XDP (`Lab::fast_lan`), so they reach the nodes as from a NIC, before any skb exists, and the");
    let _ = writeln!(report, "nodes' ends have GRO on. The whole path runs on one CPU in softirq, so 1/(packets/s) is its cost");
    let _ = writeln!(report, "per packet, and the difference to plain forwarding is the Service translation's. Thousands of");
    let _ = writeln!(
        report,
        "packets/s; below 99% delivered the share is shown.\n"
    );
    let _ = writeln!(report, "| Services | backend | flows | plain forwarding | with no-op XDP | Exposure | Exposure, redirect | Exposure, XDP redirect | kube-proxy iptables | kube-proxy nftables | Exposure ÷ iptables | redirect ÷ iptables | XDP redirect ÷ iptables | Exposure ÷ nftables |");
    let _ = writeln!(
        report,
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let find = |v: Variant, n: usize, t: Target, f: Flows| find_run(&runs, v, n, t, f);
    let cell = |r: Option<&forwarding::Run>| match r {
        Some(r) if r.delivered * 100 >= r.sent * 99 => format!("{:.0}", r.pps / 1e3),
        Some(r) => format!(
            "{:.0} ({:.0}% delivered)",
            r.pps / 1e3,
            r.delivered as f64 * 100.0 / r.sent as f64
        ),
        None => "-".into(),
    };
    for (n, t, f) in scenarios(sizes) {
        let pps = |v| find(v, n, t, f).map_or(0.0, |r| r.pps);
        let ratio = |ours, v| times(pps(ours), pps(v));
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            flows_label(f),
            cell(find(Variant::Plain, n, t, f)),
            cell(find(Variant::NoopXdp, n, t, f)),
            cell(find(Variant::Exposure, n, t, f)),
            cell(find(Variant::ExposureTcRedirect, n, t, f)),
            cell(find(Variant::ExposureRedirect, n, t, f)),
            cell(find(Variant::Iptables, n, t, f)),
            cell(find(Variant::Nftables, n, t, f)),
            ratio(Variant::Exposure, Variant::Iptables),
            ratio(Variant::ExposureTcRedirect, Variant::Iptables),
            ratio(Variant::ExposureRedirect, Variant::Iptables),
            ratio(Variant::Exposure, Variant::Nftables),
        );
    }
    host_steadiness(report, &runs, sizes);
    let _ = writeln!(report, "\nGetting the Services into node-1's datapath, in the same runs: `iptables-restore` / `nft -f` of");
    let _ = writeln!(report, "the whole generated ruleset (what a full kube-proxy sync hands the kernel; kube-proxy's own");
    let _ = writeln!(report, "processing comes on top), and for Exposure the agent's start until healthy (process start, BPF");
    let _ = writeln!(
        report,
        "load, reading the manifests, translation, map writes).\n"
    );
    let _ = writeln!(
        report,
        "| Services | Exposure (agent start → synced) | iptables-restore | nft -f |"
    );
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: |");
    for &n in sizes {
        let prog = |v| {
            runs.iter()
                .find(|r| r.variant == v && r.services == n)
                .map_or_else(|| "-".to_string(), |r| ms(r.programming))
        };
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {} |",
            prog(Variant::Exposure),
            prog(Variant::Iptables),
            prog(Variant::Nftables)
        );
    }
    // What the node adds per packet over plain forwarding: the translation's own cost.
    let _ = writeln!(report, "\nThe same runs as nanoseconds per packet above plain forwarding (1/rate − 1/plain rate): what the");
    let _ = writeln!(report, "Service translation costs the node. Negative: faster than the kernel forwarding the packet itself");
    let _ = writeln!(report, "(Exposure sends remote-backend traffic straight back out with XDP_TX, and with redirect local");
    let _ = writeln!(
        report,
        "pods' traffic into the pod, skipping the node's routing and netfilter).\n"
    );
    let _ = writeln!(report, "| Services | backend | flows | Exposure | Exposure, redirect | Exposure, XDP redirect | kube-proxy iptables | kube-proxy nftables | iptables ÷ Exposure |");
    let _ = writeln!(
        report,
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (n, t, f) in scenarios(sizes) {
        let pps = |v| find(v, n, t, f).map_or(0.0, |r| r.pps);
        let plain = pps(Variant::Plain);
        let extra = |v| {
            let p = pps(v);
            if p > 0.0 && plain > 0.0 {
                1e9 / p - 1e9 / plain
            } else {
                f64::NAN
            }
        };
        let (e, et, er, i, nf) = (
            extra(Variant::Exposure),
            extra(Variant::ExposureTcRedirect),
            extra(Variant::ExposureRedirect),
            extra(Variant::Iptables),
            extra(Variant::Nftables),
        );
        let ratio = if e > 0.0 {
            format!("{:.1}x", i / e)
        } else {
            "Exposure below forwarding".into()
        };
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {e:.0} ns | {et:.0} ns | {er:.0} ns | {i:.0} ns | {nf:.0} ns | {ratio} |",
            t.label(),
            flows_label(f),
        );
    }
    // The floor (a no-op XDP program) read end to end: the same program on the nodes'
    // NICs in front of plain forwarding, against Exposure's established flow in its place.
    let _ = writeln!(report, "\nEstablished flows against the floor end to end: cost per packet (1/packets/s) of each Exposure");
    let _ = writeln!(report, "mode ÷ that of plain forwarding with a two-instruction XDP_PASS program on the nodes' NICs (the");
    let _ = writeln!(report, "per-packet floor program, in the place Exposure's program runs). Below 1: cheaper than the");
    let _ = writeln!(
        report,
        "kernel forwarding the packet behind the no-op program.\n"
    );
    let _ = writeln!(
        report,
        "| Services | backend | floor (no-op XDP) | Exposure ÷ floor | redirect ÷ floor | XDP redirect ÷ floor |"
    );
    let _ = writeln!(report, "| ---: | --- | ---: | ---: | ---: | ---: |");
    for (n, t, f) in scenarios(sizes).filter(|s| s.2 == Flows::One) {
        let pps = |v| find(v, n, t, f).map_or(0.0, |r| r.pps);
        let floor = pps(Variant::NoopXdp);
        let cost = |v| {
            if floor > 0.0 {
                times(floor, pps(v))
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            report,
            "| {n} | {} | {} | {} | {} | {} |",
            t.label(),
            cell(find(Variant::NoopXdp, n, t, f)),
            cost(Variant::Exposure),
            cost(Variant::ExposureTcRedirect),
            cost(Variant::ExposureRedirect),
        );
    }
    // The Exposure nodes above track no connections; many real nodes do (any NAT rule), and then
    // every packet the default mode hands the kernel pays for it, as kube-proxy's always do.
    let _ = writeln!(report, "\nOn nodes that track connections. The Exposure runs above are on nodes without netfilter rules, so");
    let _ = writeln!(report, "the packets the default mode hands the kernel skip connection tracking (kube-proxy's rules need it");
    let _ = writeln!(report, "and bring it). Many nodes track connections anyway: any NAT rule turns it on for all traffic");
    let _ = writeln!(report, "through the node (a CNI's masquerade for pod egress, kube-proxy kept for ClusterIPs). The same");
    let _ = writeln!(report, "runs at {conntrack_size} Services with one such rule on each node (`iptables -t nat -A POSTROUTING -s");
    let _ = writeln!(
        report,
        "198.18.250.0/24 -j MASQUERADE`, matching nothing), against kube-proxy's runs above (which"
    );
    let _ = writeln!(
        report,
        "track connections either way). Thousands of packets/s.\n"
    );
    let _ = writeln!(report, "| backend | flows | plain forwarding | Exposure | Exposure, redirect | Exposure, XDP redirect | kube-proxy iptables (above) | Exposure ÷ iptables | redirect ÷ iptables | XDP redirect ÷ iptables |");
    let _ = writeln!(
        report,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (n, t, f) in scenarios(&[conntrack_size]) {
        let tracked = |v: Variant| find_run(&conntrack_runs, v, n, t, f);
        let iptables = find(Variant::Iptables, n, t, f).map_or(0.0, |r| r.pps);
        let ratio = |v| times(tracked(v).map_or(0.0, |r| r.pps), iptables);
        let _ = writeln!(
            report,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            flows_label(f),
            cell(tracked(Variant::Plain)),
            cell(tracked(Variant::Exposure)),
            cell(tracked(Variant::ExposureTcRedirect)),
            cell(tracked(Variant::ExposureRedirect)),
            cell(find(Variant::Iptables, n, t, f)),
            ratio(Variant::Exposure),
            ratio(Variant::ExposureTcRedirect),
            ratio(Variant::ExposureRedirect),
        );
    }
    let _ = writeln!(report, "\nIn generic XDP (`--xdp-mode generic`, as `auto` falls back to where the driver has no native XDP");
    let _ = writeln!(report, "or refuses it): the program runs on the skb the kernel has already built, after GRO. The same");
    let _ = writeln!(report, "runs at {conntrack_size} Services, beside plain forwarding behind a generic no-op XDP program (this");
    let _ = writeln!(report, "mode's floor) and the runs above. On the lab's veths the kernel builds an skb for every frame");
    let _ = writeln!(report, "it passes in either mode (a veth's native XDP runs on the frames the switch redirected to it,");
    let _ = writeln!(report, "and builds the skb after it), so here generic differs from native less than on a NIC, whose");
    let _ = writeln!(report, "native XDP runs before any skb exists: read generic against its own floor and against iptables.");
    let _ = writeln!(report, "Thousands of packets/s.\n");
    let _ = writeln!(report, "| backend | flows | plain forwarding, generic no-op XDP | Exposure, generic XDP | Exposure (above) | kube-proxy iptables (above) | generic ÷ iptables | generic ÷ its floor (cost per packet) |");
    let _ = writeln!(
        report,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (n, t, f) in scenarios(&[conntrack_size]) {
        let generic = |v: Variant| find_run(&generic_runs, v, n, t, f);
        let pps = |r: Option<&forwarding::Run>| r.map_or(0.0, |r| r.pps);
        let ours = pps(generic(Variant::ExposureGenericXdp));
        let _ = writeln!(
            report,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            flows_label(f),
            cell(generic(Variant::NoopGenericXdp)),
            cell(generic(Variant::ExposureGenericXdp)),
            cell(find(Variant::Exposure, n, t, f)),
            cell(find(Variant::Iptables, n, t, f)),
            times(ours, pps(find(Variant::Iptables, n, t, f))),
            times(pps(generic(Variant::NoopGenericXdp)), ours),
        );
    }
    let _ = writeln!(report, "\nTCP through the same node, after the UDP runs (pods now answering): new connections per second");
    let _ = writeln!(report, "(one client connecting and closing with RST, 1 s) and one connection's throughput (1 s of 256 KiB");
    let _ = writeln!(
        report,
        "writes; segmentation offload makes this insensitive to per-packet cost).\n"
    );
    let _ = writeln!(report, "| Services | backend | plain forwarding | with no-op XDP | Exposure | Exposure, redirect | Exposure, XDP redirect | kube-proxy iptables | kube-proxy nftables |");
    let _ = writeln!(
        report,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &n in sizes {
        for t in [Target::Local, Target::Remote] {
            let cell = |v: Variant| {
                tcp.iter()
                    .find(|r| r.variant == v && r.services == n && r.target == t)
                    .map_or_else(
                        || "-".to_string(),
                        |r| {
                            format!(
                                "{:.0} conn/s, {:.1} Gbit/s",
                                r.connections_per_s,
                                r.bytes_per_s * 8.0 / 1e9
                            )
                        },
                    )
            };
            let _ = writeln!(
                report,
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.label(),
                cell(Variant::Plain),
                cell(Variant::NoopXdp),
                cell(Variant::Exposure),
                cell(Variant::ExposureTcRedirect),
                cell(Variant::ExposureRedirect),
                cell(Variant::Iptables),
                cell(Variant::Nftables),
            );
        }
    }
    let _ = writeln!(report, "\nThe node's own connections: new TCP connections per second from a process on node-1 to the");
    let _ = writeln!(report, "same NodePorts on node-1 (connecting and closing with RST, 1 s). Exposure's socket hooks send the");
    let _ = writeln!(
        report,
        "socket to the pod at `connect()`, so its packets go out as the node's own, untranslated;"
    );
    let _ = writeln!(report, "kube-proxy DNATs them in its OUTPUT chain (connection tracking and NAT for each); *to the pod*");
    let _ = writeln!(report, "connects to the pod's address with no Service at all (*with no-op XDP*: behind the two-instruction");
    let _ = writeln!(report, "XDP_PASS program on the nodes' NICs, where Exposure's XDP program sits in its runs: each connection's");
    let _ = writeln!(report, "packets cross the NICs of both nodes).\n");
    let _ = writeln!(report, "| Services | backend | to the pod | with no-op XDP | Exposure | kube-proxy iptables | kube-proxy nftables | Exposure ÷ iptables | Exposure ÷ nftables |");
    let _ = writeln!(
        report,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &n in sizes {
        for t in [Target::Local, Target::Remote] {
            let rate = |v: Variant| {
                tcp.iter()
                    .find(|r| r.variant == v && r.services == n && r.target == t)
                    .map_or(0.0, |r| r.from_node_per_s)
            };
            let _ = writeln!(
                report,
                "| {n} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                t.label(),
                rate(Variant::Plain),
                rate(Variant::NoopXdp),
                rate(Variant::Exposure),
                rate(Variant::Iptables),
                rate(Variant::Nftables),
                times(rate(Variant::Exposure), rate(Variant::Iptables)),
                times(rate(Variant::Exposure), rate(Variant::Nftables)),
            );
        }
    }
    let mut groups = Vec::new();
    for &n in sizes {
        for t in [Target::Local, Target::Remote] {
            let rate = |v: Variant| {
                tcp.iter()
                    .find(|r| r.variant == v && r.services == n && r.target == t)
                    .map_or(0.0, |r| r.connections_per_s / 1e3)
            };
            groups.push((
                format!("{n} {}", t.label()),
                Variant::ALL.iter().map(|v| rate(*v)).collect(),
            ));
        }
    }
    let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
    let tcp_name = format!("{stem}-tcp-connections.svg");
    let _ = std::fs::write(
        dir.join(&tcp_name),
        chart::grouped(
            "Thousand new TCP connections/s through a node (Services, backend), higher is better",
            "k conn/s",
            &names,
            &groups,
        ),
    );
    let _ = writeln!(report, "\n![TCP connections/s]({tcp_name})");
    let svg = chart::forwarding(&runs, sizes);
    let name = format!("{stem}-end-to-end.svg");
    let _ = std::fs::write(dir.join(&name), svg);
    let _ = writeln!(report, "\n![packets/s by variant]({name})");
}

/// Whether the host stayed quiet through the end-to-end runs: plain forwarding, with and without a
/// no-op XDP program, does the same work at every Service count, so its established-flow rates
/// at the different sizes (measured minutes apart) differ only by what else the host did.
fn host_steadiness(report: &mut String, runs: &[forwarding::Run], sizes: &[usize]) {
    use exposure_lab::traffic::{spread, Flows, STEADY_SPREAD};
    use forwarding::{Target, Variant};
    let mut widest: Option<(f64, String)> = None;
    for v in [Variant::Plain, Variant::NoopXdp] {
        for t in [Target::Local, Target::Remote] {
            let rates: Vec<f64> = sizes
                .iter()
                .map(|&n| find_run(runs, v, n, t, Flows::One).map_or(0.0, |r| r.pps))
                .collect();
            let Some(s) = spread(&rates) else { continue };
            if widest.as_ref().is_none_or(|(w, _)| s > *w) {
                widest = Some((s, format!("{}, {}", v.name(), t.label())));
            }
        }
    }
    let Some((s, which)) = widest else { return };
    let pct = s * 100.0;
    let limit = STEADY_SPREAD * 100.0;
    let quiet = s <= STEADY_SPREAD;
    let _ = writeln!(report, "\nHost steadiness: plain forwarding does the same work at every Service count. Its one-flow rates");
    let _ = writeln!(report, "across the sizes differ by up to {pct:.0}% ({which}), {} the {limit:.0}% a quiet host keeps{}", if quiet { "within" } else { "above" }, if quiet { "," } else { ":" });
    if quiet {
        let _ = writeln!(report, "so rows compare with each other too.");
    } else {
        let _ = writeln!(report, "the host was busy during part of this run, so compare the variants within a row (measured one");
        let _ = writeln!(
            report,
            "after another) rather than across rows (minutes apart)."
        );
    }
    eprintln!(
        "end to end: plain forwarding's rates differ by up to {pct:.0}% across sizes ({which}); {}",
        if quiet {
            "the host was steady"
        } else {
            "the host was busy: this run's figures are noisy"
        }
    );
}

/// `num ÷ den` as a table cell ("1.23x"), or "-" without a denominator.
fn times(num: f64, den: f64) -> String {
    if den > 0.0 {
        format!("{:.2}x", num / den)
    } else {
        "-".into()
    }
}

/// The run of one variant in one scenario.
fn find_run(
    runs: &[forwarding::Run],
    v: forwarding::Variant,
    n: usize,
    t: forwarding::Target,
    f: exposure_lab::traffic::Flows,
) -> Option<&forwarding::Run> {
    runs.iter()
        .find(|r| r.variant == v && r.services == n && r.target == t && r.flows == f)
}

/// Every (Service count, backend, flows) the end-to-end runs cover, in report order.
fn scenarios(
    sizes: &[usize],
) -> impl Iterator<Item = (usize, forwarding::Target, exposure_lab::traffic::Flows)> + '_ {
    use exposure_lab::traffic::Flows;
    use forwarding::Target;
    sizes.iter().flat_map(|&n| {
        [Target::Local, Target::Remote]
            .into_iter()
            .flat_map(move |t| [Flows::One, Flows::New].into_iter().map(move |f| (n, t, f)))
    })
}

fn flows_label(f: exposure_lab::traffic::Flows) -> &'static str {
    match f {
        exposure_lab::traffic::Flows::One => "one flow",
        exposure_lab::traffic::Flows::New => "new flows",
    }
}
