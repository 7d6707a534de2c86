//! `exposure status`: what the pinned maps say, as a table.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use exposure_common::{
    port_host, Counter, BACKEND_LOCAL, FRONTEND_CLUSTER_IP, FRONTEND_EXTERNAL_IP,
    FRONTEND_LOADBALANCER, NO_SERVICE, SERVICE_DROP_WHEN_EMPTY,
};

use crate::sync::{frontend_display, Snapshot};

fn kind(flags: u16) -> &'static str {
    if flags & FRONTEND_LOADBALANCER != 0 {
        "LoadBalancer"
    } else if flags & FRONTEND_EXTERNAL_IP != 0 {
        "ExternalIP"
    } else if flags & FRONTEND_CLUSTER_IP != 0 {
        "ClusterIP"
    } else {
        "NodePort"
    }
}

/// One frontend as the maps hold it.
struct FrontendRow {
    key: exposure_common::FrontendKey,
    kind: &'static str,
    service_id: u32,
    /// (address, local), sorted.
    backends: Vec<(SocketAddr, bool)>,
    /// What a connection gets when there are no backends: "refuse" or "drop".
    when_empty: &'static str,
    /// Left by its Service: serves only the connections made through it.
    draining: bool,
}

fn rows(s: &Snapshot) -> Vec<FrontendRow> {
    s.frontends
        .iter()
        .map(|(key, fe)| {
            let svc = s.services.get(&fe.service_id).copied().unwrap_or_default();
            let mut backends: Vec<(SocketAddr, bool)> = s
                .backends_of(fe.service_id)
                .into_iter()
                .map(|b| {
                    let at = SocketAddr::new(IpAddr::from(b.addr), port_host(b.port));
                    (at, b.flags & BACKEND_LOCAL != 0)
                })
                .collect();
            backends.sort();
            FrontendRow {
                key: *key,
                kind: kind(fe.flags),
                service_id: fe.service_id,
                backends,
                when_empty: if svc.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
                    "drop"
                } else {
                    "refuse"
                },
                draining: fe.is_draining(),
            }
        })
        .collect()
}

/// The same as [`render`], as one JSON object (for scripts): `frontends` (each with its
/// `backends`), `service_ports`, `backends`, `flows`, every counter, the `interfaces` (those in
/// generic XDP also in `generic_xdp_interfaces`) and the `pod_interfaces`.
pub fn render_json(
    s: &Snapshot,
    flows: usize,
    counters: &[(Counter, u64)],
    interfaces: &Interfaces,
) -> String {
    let frontends: Vec<serde_json::Value> = rows(s)
        .into_iter()
        .map(|r| {
            let scope = match crate::model::Scope::from_number(r.key.scope) {
                crate::model::Scope::External => "external",
                crate::model::Scope::NodeSockets => "node-sockets",
            };
            let protocol = crate::model::Protocol::from_number(r.key.proto)
                .map_or_else(|| r.key.proto.to_string(), |p| p.to_string());
            let backends: Vec<serde_json::Value> = r
                .backends
                .iter()
                .map(|(at, local)| {
                    serde_json::json!({"address": at.ip().to_string(), "port": at.port(), "local": local})
                })
                .collect();
            let port = port_host(r.key.port);
            serde_json::json!({
                "frontend": frontend_display(&r.key),
                "address": IpAddr::from(r.key.addr).to_string(),
                // 0: the ClusterIP's other ports (shown as `*`).
                "port": port,
                "protocol": protocol,
                "scope": scope,
                "kind": r.kind,
                "service": (!r.draining).then_some(r.service_id),
                "backends": backends,
                "when_empty": r.when_empty,
                "draining": r.draining,
            })
        })
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = counters
        .iter()
        .map(|(c, v)| (c.name().to_string(), (*v).into()))
        .collect();
    let out = serde_json::json!({
        "frontends": frontends,
        "service_ports": service_ports(s),
        "backends": s.backends.len(),
        "flows": flows,
        "counters": counters,
        "interfaces": interfaces.node,
        "generic_xdp_interfaces": interfaces.generic_xdp,
        "pod_interfaces": interfaces.pods,
    });
    format!("{out:#}\n")
}

/// Service ports that some frontend leads to.
fn service_ports(s: &Snapshot) -> usize {
    s.frontends
        .values()
        .map(|f| f.service_id)
        .filter(|id| *id != NO_SERVICE)
        .collect::<std::collections::BTreeSet<u32>>()
        .len()
}

/// Renders the frontends -> backends table, then flow and counter totals, and the interfaces the
/// datapath is attached to.
pub fn render(
    s: &Snapshot,
    flows: usize,
    counters: &[(Counter, u64)],
    interfaces: &Interfaces,
) -> String {
    let rows: Vec<[String; 4]> = rows(s)
        .into_iter()
        .map(|r| {
            let backends = if r.draining {
                "(draining: its open connections only)".to_string()
            } else if r.backends.is_empty() {
                match r.when_empty {
                    "drop" => "(none on this node: drop)",
                    _ => "(none: refuse)",
                }
                .to_string()
            } else {
                let shown: Vec<String> = r
                    .backends
                    .iter()
                    .map(|(at, local)| format!("{at}{}", if *local { " (local)" } else { "" }))
                    .collect();
                shown.join(", ")
            };
            [
                frontend_display(&r.key),
                r.kind.to_string(),
                if r.draining {
                    "-".to_string()
                } else {
                    r.service_id.to_string()
                },
                backends,
            ]
        })
        .collect();
    let header = ["FRONTEND", "KIND", "SERVICE", "BACKENDS"].map(String::from);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    let draining = s.frontends.values().filter(|f| f.is_draining()).count();
    let _ = writeln!(
        out,
        "\n{} frontends{}, {} service ports, {} backends, {} tracked flows",
        s.frontends.len(),
        if draining > 0 {
            format!(" ({draining} draining)")
        } else {
            String::new()
        },
        service_ports(s),
        s.backends.len(),
        flows
    );
    let nonzero: Vec<String> = counters
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(c, v)| format!("{}={v}", c.name()))
        .collect();
    if !nonzero.is_empty() {
        let _ = writeln!(out, "counters: {}", nonzero.join(" "));
    }
    let _ = writeln!(
        out,
        "interfaces: {}",
        if interfaces.node.is_empty() {
            "none".to_string()
        } else {
            let named = |i: &String| match interfaces.generic_xdp.contains(i) {
                true => format!("{i} (generic XDP)"),
                false => i.clone(),
            };
            interfaces
                .node
                .iter()
                .map(named)
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    if !interfaces.pods.is_empty() {
        let _ = writeln!(
            out,
            "pod interfaces (replies sent back past the stack): {}",
            interfaces.pods.join(" ")
        );
    }
    out
}

/// Where the programs are attached: the node's interfaces (XDP, tc), and the pods' interfaces
/// whose replies go back past the stack (`--redirect-to-pods`, `--xdp-redirect-to-pods`).
#[derive(Clone, Debug, Default)]
pub struct Interfaces {
    pub node: Vec<String>,
    /// Those of `node` whose XDP program runs in generic mode.
    pub generic_xdp: Vec<String>,
    pub pods: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{
            BackendAddr, DesiredService, DesiredState, FrontendAddr, FrontendKind, Protocol, Scope,
            ServicePortName,
        },
        sync::{DatapathMaps as _, FakeMaps, Limits, Reconciler},
    };

    /// hello-world's NodePort on the node's address.
    fn node_port() -> FrontendAddr {
        FrontendAddr {
            ip: IpAddr::from([198, 18, 0, 10]),
            port: 30600,
            protocol: Protocol::Tcp,
            scope: Scope::External,
        }
    }

    fn hello_world() -> ServicePortName {
        ServicePortName {
            namespace: "default".into(),
            name: "hello-world".into(),
            port: String::new(),
            protocol: Protocol::Tcp,
            family: crate::model::IpFamily::V4,
            scope: Scope::External,
        }
    }

    #[test]
    fn table_lists_frontends_with_their_backends() {
        let mut svc = DesiredService::default();
        svc.frontends.insert(node_port(), FrontendKind::NodePort);
        svc.frontends.insert(
            FrontendAddr {
                ip: IpAddr::from([198, 18, 50, 10]),
                port: 60000,
                protocol: Protocol::Tcp,
                scope: Scope::NodeSockets,
            },
            FrontendKind::ClusterIp,
        );
        svc.backends = vec![
            BackendAddr {
                ip: IpAddr::from([198, 19, 1, 2]),
                port: 50000,
                local: true,
            },
            BackendAddr {
                ip: IpAddr::from([198, 19, 2, 2]),
                port: 50000,
                local: false,
            },
        ];
        let mut maps = FakeMaps::default();
        Reconciler::restore(Snapshot::default(), Limits::default()).reconcile(
            &DesiredState {
                services: [(hello_world(), std::sync::Arc::new(svc))].into(),
                ..Default::default()
            },
            &mut maps,
        );
        let out = render(
            &maps.snapshot().unwrap(),
            3,
            &[(Counter::NewFlows, 3)],
            &Interfaces {
                node: vec!["eth0".into(), "mv1".into()],
                generic_xdp: vec!["mv1".into()],
                pods: Vec::new(),
            },
        );
        assert!(
            out.contains("198.18.0.10:30600/TCP                  NodePort"),
            "{out}"
        );
        assert!(
            out.contains("198.18.50.10:60000/TCP (node sockets)  ClusterIP"),
            "{out}"
        );
        assert!(
            out.contains("198.19.1.2:50000 (local), 198.19.2.2:50000"),
            "{out}"
        );
        assert!(
            out.contains("2 frontends, 1 service ports, 2 backends, 3 tracked flows"),
            "{out}"
        );
        assert!(out.contains("new_flows=3"));
        assert!(
            out.ends_with("\ninterfaces: eth0 mv1 (generic XDP)\n"),
            "{out}"
        );
        let with_pods = render(
            &maps.snapshot().unwrap(),
            3,
            &[],
            &Interfaces {
                node: vec!["eth0".into()],
                pods: vec!["lxc1".into(), "lxc2".into()],
                ..Default::default()
            },
        );
        assert!(
            with_pods.ends_with(
                "\ninterfaces: eth0\npod interfaces (replies sent back past the stack): lxc1 lxc2\n"
            ),
            "{with_pods}"
        );

        let json: serde_json::Value = serde_json::from_str(&render_json(
            &maps.snapshot().unwrap(),
            3,
            &[(Counter::NewFlows, 3), (Counter::NoBackend, 0)],
            &Interfaces {
                node: vec!["eth0".into(), "mv1".into()],
                generic_xdp: vec!["mv1".into()],
                pods: vec!["lxc1".into()],
            },
        ))
        .expect("JSON");
        assert_eq!(json["flows"], 3);
        assert_eq!(json["interfaces"], serde_json::json!(["eth0", "mv1"]));
        assert_eq!(json["generic_xdp_interfaces"], serde_json::json!(["mv1"]));
        assert_eq!(json["pod_interfaces"], serde_json::json!(["lxc1"]));
        assert_eq!(json["service_ports"], 1);
        assert_eq!(json["backends"], 2);
        assert_eq!(json["counters"]["new_flows"], 3);
        assert_eq!(json["counters"]["refused_no_backend"], 0, "zeros too");
        let frontends = json["frontends"].as_array().unwrap();
        assert_eq!(frontends.len(), 2);
        let node_port = &frontends[0];
        assert_eq!(node_port["frontend"], "198.18.0.10:30600/TCP");
        assert_eq!(
            (
                &node_port["address"],
                &node_port["port"],
                &node_port["protocol"]
            ),
            (&"198.18.0.10".into(), &30600.into(), &"TCP".into())
        );
        assert_eq!(
            (&node_port["kind"], &node_port["scope"]),
            (&"NodePort".into(), &"external".into())
        );
        assert_eq!(node_port["when_empty"], "refuse");
        assert_eq!(
            node_port["backends"],
            serde_json::json!([
                {"address": "198.19.1.2", "port": 50000, "local": true},
                {"address": "198.19.2.2", "port": 50000, "local": false},
            ])
        );
        let cluster_ip = &frontends[1];
        assert_eq!(
            (&cluster_ip["kind"], &cluster_ip["scope"]),
            (&"ClusterIP".into(), &"node-sockets".into())
        );
        assert_eq!(cluster_ip["service"], node_port["service"]);
        assert_eq!(node_port["draining"], false);
    }

    #[test]
    fn a_draining_frontend_shows_as_such() {
        let mut svc = DesiredService::default();
        svc.frontends.insert(node_port(), FrontendKind::NodePort);
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(Snapshot::default(), Limits::default());
        let state = DesiredState {
            services: [(hello_world(), std::sync::Arc::new(svc))].into(),
            ..Default::default()
        };
        r.reconcile(&state, &mut maps);
        r.reconcile(&DesiredState::default(), &mut maps);
        let out = render(&maps.snapshot().unwrap(), 1, &[], &Interfaces::default());
        assert!(
            out.contains(
                "198.18.0.10:30600/TCP  NodePort  -        (draining: its open connections only)"
            ),
            "{out}"
        );
        assert!(
            out.contains("1 frontends (1 draining), 0 service ports"),
            "{out}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(
            &maps.snapshot().unwrap(),
            1,
            &[],
            &Interfaces::default(),
        ))
        .unwrap();
        let fe = &json["frontends"][0];
        assert_eq!(
            (&fe["draining"], &fe["service"]),
            (&true.into(), &serde_json::Value::Null)
        );
    }
}
