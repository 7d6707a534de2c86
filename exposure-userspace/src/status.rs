//! `exposure status`: what the pinned maps say, as a table.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use exposure_common::{
    port_host, Counter, BACKEND_LOCAL, FRONTEND_CLUSTER_IP, FRONTEND_EXTERNAL_IP,
    FRONTEND_LOADBALANCER, SERVICE_DROP_WHEN_EMPTY,
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

/// Renders the frontends -> backends table, then flow and counter totals.
pub fn render(s: &Snapshot, flows: usize, counters: &[(Counter, u64)]) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    for (key, fe) in &s.frontends {
        let frontend = frontend_display(key);
        let svc = s.services.get(&fe.service_id).copied().unwrap_or_default();
        let mut found = s.backends_of(fe.service_id);
        found.sort_by_key(|b| (IpAddr::from(b.addr), port_host(b.port)));
        let backends: Vec<String> = found
            .into_iter()
            .map(|b| {
                let local = if b.flags & BACKEND_LOCAL != 0 {
                    " (local)"
                } else {
                    ""
                };
                let at = std::net::SocketAddr::new(IpAddr::from(b.addr), port_host(b.port));
                format!("{at}{local}")
            })
            .collect();
        let backends = if backends.is_empty() {
            if svc.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
                "(none on this node: drop)"
            } else {
                "(none: refuse)"
            }
            .to_string()
        } else {
            backends.join(", ")
        };
        rows.push([
            frontend,
            kind(fe.flags).to_string(),
            fe.service_id.to_string(),
            backends,
        ]);
    }
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
    let services: BTreeMap<u32, ()> = s.frontends.values().map(|f| (f.service_id, ())).collect();
    let _ = writeln!(
        out,
        "\n{} frontends, {} service ports, {} backends, {} tracked flows",
        s.frontends.len(),
        services.len(),
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
    out
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

    #[test]
    fn table_lists_frontends_with_their_backends() {
        let mut svc = DesiredService::default();
        svc.frontends.insert(
            FrontendAddr {
                ip: IpAddr::from([198, 18, 0, 10]),
                port: 30600,
                protocol: Protocol::Tcp,
                scope: Scope::External,
            },
            FrontendKind::NodePort,
        );
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
        let name = ServicePortName {
            namespace: "default".into(),
            name: "hello-world".into(),
            port: String::new(),
            protocol: Protocol::Tcp,
            family: crate::model::IpFamily::V4,
            scope: Scope::External,
        };
        let mut maps = FakeMaps::default();
        Reconciler::restore(Snapshot::default(), Limits::default()).reconcile(
            &DesiredState {
                services: [(name, std::sync::Arc::new(svc))].into(),
                ..Default::default()
            },
            &mut maps,
        );
        let out = render(&maps.snapshot().unwrap(), 3, &[(Counter::NewFlows, 3)]);
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
    }
}
