//! The Kubernetes API source end to end: the namespace lab, the real `exposure` binary on each node
//! watching a test API server (real list/watch protocol over HTTP, on the lab LAN), real traffic.
//! Covers the API going away (traffic keeps flowing), objects changing meanwhile, 410 Gone, HTTP
//! 500s, slow responses, dropped watches, and an agent restart while the API is down.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use exposure_lab::{
    agent::{self, Agent, Source},
    apiserver::Kind,
    apps::{self, parse_answer, Server},
    control_plane::ControlPlane,
    lab::{lb_ip, pod_ip, Lab, CLIENT_IP},
    netns::unique_prefix,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_exposure");

struct Cluster {
    agents: Vec<Agent>,
    _servers: Vec<Server>,
    cp: ControlPlane,
    dir: PathBuf,
    lab: Lab,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn service_json(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

fn slice_json(svc: &str, ports: Value, endpoints: &[(Ipv4Addr, String)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": node}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{svc}-x1"), "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": ports, "endpoints": eps})
}

fn hello_world() -> Value {
    service_json(
        "hello-world",
        json!({"type": "NodePort", "clusterIP": "198.18.50.10",
        "ports": [{"protocol": "TCP", "port": 60000, "targetPort": 50000, "nodePort": 30600}]}),
    )
}

fn hello_slice(endpoints: &[(Ipv4Addr, String)]) -> Value {
    slice_json(
        "hello-world",
        json!([{"name": "", "protocol": "TCP", "port": 50000}]),
        endpoints,
    )
}

fn everyone(pods: &[usize]) -> Vec<(Ipv4Addr, String)> {
    let mut out = Vec::new();
    for (n, count) in pods.iter().enumerate() {
        for p in 0..*count {
            out.push((pod_ip(n, p), format!("node-{}", n + 1)));
        }
    }
    out
}

impl Cluster {
    fn start(pods: &[usize], objects: Vec<Value>) -> Cluster {
        let prefix = unique_prefix("a");
        let lab = Lab::new(&prefix, pods).expect("lab");
        let servers = lab
            .pods()
            .map(|(_, p)| apps::serve(&p.ns, 50000, &p.name).expect("server"))
            .collect();
        let dir = std::env::temp_dir().join(&prefix);
        let cp = ControlPlane::start(&lab, &dir).expect("API server");
        cp.apply_all(objects);
        let mut c = Cluster {
            agents: Vec::new(),
            _servers: servers,
            cp,
            dir,
            lab,
        };
        for n in 0..c.lab.nodes.len() {
            let agent = c.agent(n, true);
            c.agents.push(agent);
        }
        c
    }

    fn agent(&self, n: usize, wait: bool) -> Agent {
        let source = Source::Kubeconfig(&self.cp.kubeconfig);
        let node = &self.lab.nodes[n];
        let result = if wait {
            Agent::start(Path::new(BIN), &self.lab.prefix, node, &source, &self.dir)
        } else {
            Agent::spawn(Path::new(BIN), &self.lab.prefix, node, &source, &self.dir)
        };
        result.expect("agent starts")
    }

    fn node(&self, n: usize, port: u16) -> SocketAddr {
        SocketAddr::from((self.lab.nodes[n].ip, port))
    }

    /// Which pods answer `count` fresh TCP connections (at least [`apps::SPREAD_MIN`]).
    fn pods_answering(&self, to: SocketAddr, count: usize) -> BTreeSet<String> {
        (0..count.max(apps::SPREAD_MIN))
            .map(|_| {
                let a = apps::tcp_ask(&self.lab.client, to).unwrap_or_else(|e| {
                    panic!("TCP to {to}: {e:#}\n{}", self.agents[0].log_text())
                });
                parse_answer(&a).expect("answer").0.to_string()
            })
            .collect()
    }

    fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{what}: not true within 40 s; agent log:\n{}",
            self.agents[0].log_text()
        );
    }
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn topology_hints_keep_traffic_in_the_node_zone() {
    let pods = [2, 2];
    // Every endpoint hinted for its own node's zone, as the EndpointSlice controller does for
    // `trafficDistribution: PreferClose`.
    let hinted = |unhinted: Option<Ipv4Addr>| {
        let mut slice = hello_slice(&everyone(&pods));
        for ep in slice["endpoints"].as_array_mut().unwrap() {
            let zone = if ep["nodeName"] == "node-1" {
                "zone-a"
            } else {
                "zone-b"
            };
            if ep["addresses"][0] != unhinted.map(|ip| ip.to_string()).unwrap_or_default() {
                ep["hints"] = json!({"forZones": [{"name": zone}]});
            }
        }
        slice
    };
    let c = Cluster::start(&pods, vec![hello_world(), hinted(None)]);
    let all = names(&["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"]);
    // The Nodes have no zone yet: hints are not used.
    assert_eq!(c.pods_answering(c.node(0, 30600), 60), all);
    // The Nodes get their zones through the watch: each node keeps to its zone's endpoints.
    for (n, zone) in [(1, "zone-a"), (2, "zone-b")] {
        let ip = c.lab.nodes[n - 1].ip.to_string();
        c.cp.api.apply(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{n}"), "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}));
    }
    let zone_a = names(&["pod-1-1", "pod-1-2"]);
    let zone_b = names(&["pod-2-1", "pod-2-2"]);
    c.eventually("node-1 serves from zone-a only", || {
        c.pods_answering(c.node(0, 30600), 30) == zone_a
    });
    c.eventually("node-2 serves from zone-b only", || {
        c.pods_answering(c.node(1, 30600), 30) == zone_b
    });
    // One ready endpoint without hints (the controller changing modes): all endpoints again.
    c.cp.api.apply(hinted(Some(pod_ip(1, 0))));
    c.eventually("hints are ignored while one is missing", || {
        c.pods_answering(c.node(0, 30600), 60) == all
    });
}

#[test]
fn objects_from_the_api_are_served_like_manifests() {
    let pods = [2, 2];
    let echo = service_json(
        "echo",
        json!({"type": "LoadBalancer", "clusterIP": "198.18.50.11",
        "ports": [{"name": "udp", "protocol": "UDP", "port": 7, "targetPort": 50000, "nodePort": 30700}]}),
    );
    let mut echo = echo;
    echo["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.100.1"}]}});
    let echo_slice = slice_json(
        "echo",
        json!([{"name": "udp", "protocol": "UDP", "port": 50000}]),
        &everyone(&pods),
    );
    let c = Cluster::start(
        &pods,
        vec![
            hello_world(),
            hello_slice(&everyone(&pods)),
            echo,
            echo_slice,
        ],
    );
    let all = names(&["pod-1-1", "pod-1-2", "pod-2-1", "pod-2-2"]);
    assert_eq!(c.pods_answering(c.node(0, 30600), 60), all);
    assert_eq!(c.pods_answering(c.node(1, 30600), 60), all);
    let udp: BTreeSet<String> = (0..60)
        .map(|_| {
            parse_answer(&apps::udp_ask(&c.lab.client, SocketAddr::from((lb_ip(1), 7))).unwrap())
                .unwrap()
                .0
                .to_string()
        })
        .collect();
    assert_eq!(udp, all);

    // Metrics: per-frontend traffic and the gauges, in Prometheus text format.
    let m = agent::metrics(&c.lab.nodes[0]).unwrap();
    let packets = metric(&m, "exposure_frontend_packets_total{frontend=\"198.18.0.10:30600/TCP\",service=\"default/hello-world/TCP\"}");
    assert!(packets.is_some_and(|p| p >= 60.0), "{m}");
    assert!(
        metric(
            &m,
            "exposure_frontend_bytes_total{frontend=\"198.18.0.10:30600/TCP\""
        )
        .is_some_and(|b| b > 0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "exposure_services "), Some(2.0), "{m}");
    assert_eq!(metric(&m, "exposure_backends "), Some(4.0), "{m}");
    assert!(
        metric(&m, "exposure_conntrack_entries ").is_some_and(|n| n >= 60.0),
        "{m}"
    );
    assert!(
        metric(&m, "exposure_sync_duration_seconds_count ").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "exposure_sync_errors_total "), Some(0.0), "{m}");

    // Network programming latency, as kube-proxy reports it: a slice change carrying the
    // EndpointSlice controller's trigger time is timed from it to the sync that applied it.
    let programming = |m: &str, what: &str| {
        metric(
            m,
            &format!("exposure_network_programming_duration_seconds_{what} "),
        )
    };
    assert_eq!(
        programming(&m, "count"),
        Some(0.0),
        "no trigger times yet: {m}"
    );
    let mut changed = hello_slice(&everyone(&[2, 1]));
    changed["metadata"]["annotations"] = json!({
        "endpoints.kubernetes.io/last-change-trigger-time":
            k8s_openapi::jiff::Timestamp::now().to_string()
    });
    c.cp.api.apply(changed);
    c.eventually("the change is timed", || {
        let m = agent::metrics(&c.lab.nodes[0]).unwrap();
        programming(&m, "count") == Some(1.0)
    });
    let m = agent::metrics(&c.lab.nodes[0]).unwrap();
    let took = programming(&m, "sum").unwrap_or(f64::NAN);
    assert!((0.0..10.0).contains(&took), "{took} s: {m}");
    assert_eq!(
        c.pods_answering(c.node(0, 30600), 40),
        names(&["pod-1-1", "pod-1-2", "pod-2-1"])
    );
}

#[test]
fn an_api_outage_never_touches_traffic_and_changes_made_meanwhile_converge() {
    let pods = [2, 1];
    let c = Cluster::start(&pods, vec![hello_world(), hello_slice(&everyone(&pods))]);
    assert_eq!(
        c.pods_answering(c.node(0, 30600), 40),
        names(&["pod-1-1", "pod-1-2", "pod-2-1"])
    );

    c.cp.api.set_down(true);
    // Changes while the agents cannot see them: one endpoint goes, a Service arrives.
    let remaining = vec![
        (pod_ip(0, 0), "node-1".to_string()),
        (pod_ip(1, 0), "node-2".to_string()),
    ];
    c.cp.api.apply(hello_slice(&remaining));
    c.cp.api.apply(service_json("late", json!({"type": "NodePort", "ports": [{"protocol": "TCP", "port": 80, "targetPort": 50000, "nodePort": 30680}]})));
    c.cp.api.apply(slice_json(
        "late",
        json!([{"name": "", "protocol": "TCP", "port": 50000}]),
        &remaining,
    ));
    std::thread::sleep(Duration::from_secs(2));
    // The last synced state keeps serving, through both nodes.
    assert_eq!(
        c.pods_answering(c.node(0, 30600), 40),
        names(&["pod-1-1", "pod-1-2", "pod-2-1"])
    );
    assert_eq!(
        c.pods_answering(c.node(1, 30600), 20),
        names(&["pod-1-1", "pod-1-2", "pod-2-1"])
    );
    assert!(
        apps::tcp_ask(&c.lab.client, c.node(0, 30680)).is_err(),
        "not yet known to the agents"
    );

    c.cp.api.set_down(false);
    c.eventually("the Service created during the outage is served", || {
        apps::tcp_ask(&c.lab.client, c.node(0, 30680)).is_ok()
    });
    c.eventually(
        "the endpoint removed during the outage gets no new flows",
        || c.pods_answering(c.node(0, 30600), 20) == names(&["pod-1-1", "pod-2-1"]),
    );
    let m = agent::metrics(&c.lab.nodes[0]).unwrap();
    assert!(
        metric(&m, "exposure_api_watch_errors_total ").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // The new Service's frontend has its own series (labels kept up to date by change), beside
    // the earlier one's.
    for (port, service) in [(30680, "late"), (30600, "hello-world")] {
        let series = format!(
            "exposure_frontend_packets_total{{frontend=\"198.18.0.10:{port}/TCP\",service=\"default/{service}/TCP\"}}"
        );
        assert!(
            metric(&m, &series).is_some_and(|p| p >= 1.0),
            "{series}: {m}"
        );
    }
}

#[test]
fn watch_faults_410_gone_500s_slow_responses_and_dropped_streams_all_converge() {
    let pods = [2, 0];
    let one = vec![(pod_ip(0, 0), "node-1".to_string())];
    let both = everyone(&pods);
    let c = Cluster::start(&pods, vec![hello_world(), hello_slice(&one)]);
    assert_eq!(c.pods_answering(c.node(0, 30600), 10), names(&["pod-1-1"]));

    // 410 Gone: while the agents are cut off, objects change and history is compacted past the
    // version they last saw, so their resumed watches are refused and they must re-list.
    let watches = c.cp.api.watches_started();
    c.cp.api.set_down(true);
    c.cp.api.apply(hello_slice(&both));
    c.cp.api.compact();
    c.cp.api.set_down(false);
    c.eventually("re-list after 410 Gone picks up the change", || {
        c.pods_answering(c.node(0, 30600), 20) == names(&["pod-1-1", "pod-1-2"])
    });
    assert!(c.cp.api.watches_started() > watches);
    c.eventually("the re-list is counted", || {
        agent::metrics(&c.lab.nodes[0])
            .ok()
            .and_then(|m| metric(&m, "exposure_api_watch_restarts_total "))
            .is_some_and(|n| n >= 1.0)
    });

    // HTTP 500s on the next requests after the streams drop.
    c.cp.api.fail_next(6);
    c.cp.api.drop_watches();
    c.cp.api.apply(hello_slice(&one));
    c.eventually("converges through 500s", || {
        c.pods_answering(c.node(0, 30600), 10) == names(&["pod-1-1"])
    });

    // Slow responses.
    c.cp.api.set_delay(Duration::from_millis(700));
    c.cp.api.drop_watches();
    c.cp.api.apply(hello_slice(&both));
    c.eventually("converges through slow responses", || {
        c.pods_answering(c.node(0, 30600), 20) == names(&["pod-1-1", "pod-1-2"])
    });
    c.cp.api.set_delay(Duration::ZERO);
}

#[test]
fn agent_restarted_while_the_api_is_down_keeps_serving_from_the_pinned_maps() {
    let pods = [1, 1];
    let mut c = Cluster::start(&pods, vec![hello_world(), hello_slice(&everyone(&pods))]);
    let mut held = apps::TcpSession::connect(&c.lab.client, c.node(0, 30600)).unwrap();
    let held_pod = parse_answer(&held.ask("hi").unwrap())
        .unwrap()
        .0
        .to_string();

    c.cp.api.set_down(true);
    c.agents[0].stop();
    c.agents[0] = c.agent(0, false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent::healthz(&c.lab.nodes[0]).unwrap_or(0),
        503,
        "not synced while the API is away"
    );
    assert_eq!(
        parse_answer(&held.ask("still?").unwrap()).unwrap().0,
        held_pod
    );
    assert_eq!(
        c.pods_answering(c.node(0, 30600), 20),
        names(&["pod-1-1", "pod-2-1"]),
        "new flows served from pinned state"
    );
    let seen: BTreeSet<IpAddr> = (0..10)
        .map(|_| {
            parse_answer(&apps::tcp_ask(&c.lab.client, c.node(0, 30600)).unwrap())
                .unwrap()
                .1
                .ip()
        })
        .collect();
    assert!(seen.contains(&IpAddr::V4(CLIENT_IP)));

    c.cp.api.set_down(false);
    c.agents[0]
        .wait_healthy(&c.lab.nodes[0])
        .expect("synced once the API is back");
    assert_eq!(
        parse_answer(&held.ask("and now?").unwrap()).unwrap().0,
        held_pod
    );
}

#[test]
fn services_and_slices_of_another_proxy_or_headless_are_left_out_as_kube_proxy_leaves_them() {
    let pods = [2, 2];
    let ours = hello_slice(&everyone(&[2]));
    // Slices kube-proxy's informers never see: one labelled for another proxy, one a headless
    // Service's. Both name hello-world, and each holds one of node-2's pods.
    let foreign = |n: usize, label: Value| {
        let mut slice = hello_slice(&[(pod_ip(1, n), "node-2".to_string())]);
        slice["metadata"]["name"] = json!(format!("hello-world-foreign{n}"));
        slice["metadata"]["labels"] = label;
        slice
    };
    let mut their_service = hello_world();
    their_service["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "other"});
    let c = Cluster::start(
        &pods,
        vec![
            hello_world(),
            ours,
            foreign(
                0,
                json!({"kubernetes.io/service-name": "hello-world",
                "service.kubernetes.io/service-proxy-name": "other"}),
            ),
            foreign(
                1,
                json!({"kubernetes.io/service-name": "hello-world",
                "service.kubernetes.io/headless": ""}),
            ),
        ],
    );
    let node_1_pods = names(&["pod-1-1", "pod-1-2"]);
    assert_eq!(c.pods_answering(c.node(0, 30600), 40), node_1_pods);
    // As kube-proxy's informers, the agents do not even ask for them.
    for kind in [Kind::Service, Kind::EndpointSlice] {
        assert_eq!(
            c.cp.api.label_selectors(kind),
            BTreeSet::from([
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless".into()
            ]),
            "{kind:?}"
        );
    }

    // The Service handed to another proxy leaves the agents' watch (a DELETED event), and
    // comes back when the label goes.
    c.cp.api.apply(their_service);
    c.eventually("the other proxy's Service is withdrawn", || {
        apps::tcp_ask(&c.lab.client, c.node(0, 30600)).is_err()
    });
    c.cp.api.apply(hello_world());
    c.eventually("served again once ours", || {
        apps::tcp_ask(&c.lab.client, c.node(0, 30600)).is_ok()
    });
    assert_eq!(c.pods_answering(c.node(0, 30600), 40), node_1_pods);
}
