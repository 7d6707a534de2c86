//! `healthCheckNodePort` servers for `externalTrafficPolicy: Local` Services, answering as
//! kube-proxy does: 200 with the local endpoint count when this node has local endpoints, 503 when it
//! has none, so external load balancers only send to nodes that can serve locally.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    health::{self, Response},
    model::HealthCheck,
};

/// kube-proxy's body and headers for a health check answer.
pub fn answer(hc: Option<&HealthCheck>) -> Response {
    let Some(hc) = hc else {
        return Response::new(404, "text/plain", "no such health check\n");
    };
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": true\n}}",
        hc.namespace, hc.name, hc.local_endpoints
    );
    let code = if hc.local_endpoints > 0 { 200 } else { 503 };
    let mut r = Response::new(code, "application/json", body);
    r.headers.push(("X-Content-Type-Options", "nosniff".into()));
    r.headers.push((
        "X-Load-Balancing-Endpoint-Weight",
        hc.local_endpoints.to_string(),
    ));
    r
}

/// The running servers, one per port and address, following the desired state.
#[derive(Default)]
pub struct HealthCheckServers {
    current: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    /// By port and address; `None` is every address.
    running: HashMap<(u16, Option<IpAddr>), tokio::task::JoinHandle<()>>,
}

impl HealthCheckServers {
    /// Starts servers for new ports, stops removed ones, and updates what every port reports.
    /// Each port listens on every address, or with `only_on` on those addresses alone (the
    /// NodePort addresses `--nodeport-addresses` selects, as kube-proxy's do). A port that cannot
    /// be bound is returned as an error message and retried at the next sync.
    pub async fn apply(
        &mut self,
        desired: &BTreeMap<u16, HealthCheck>,
        only_on: Option<&[IpAddr]>,
    ) -> Vec<String> {
        if let Ok(mut current) = self.current.lock() {
            current.clone_from(desired);
        }
        let addrs: Vec<Option<IpAddr>> = match only_on {
            None => vec![None],
            Some(addrs) => addrs.iter().copied().map(Some).collect(),
        };
        let wanted: BTreeSet<(u16, Option<IpAddr>)> = desired
            .keys()
            .flat_map(|port| addrs.iter().map(move |addr| (*port, *addr)))
            .collect();
        let gone: Vec<_> = self
            .running
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in gone {
            if let Some(task) = self.running.remove(&key) {
                // Waited for, so its socket is closed before the port is bound again elsewhere.
                task.abort();
                let _ = task.await;
            }
        }
        let mut errors = Vec::new();
        for (port, addr) in wanted {
            if self.running.contains_key(&(port, addr)) {
                continue;
            }
            let bound = match addr {
                Some(addr) => health::bind(SocketAddr::from((addr, port))).await,
                // Both families on one socket (`[::]` takes IPv4 too); IPv4 alone where IPv6 is off.
                None => match health::bind(SocketAddr::from(([0u16; 8], port))).await {
                    Ok(listener) => Ok(listener),
                    Err(_) => health::bind(SocketAddr::from(([0, 0, 0, 0], port))).await,
                },
            };
            match bound {
                Ok(listener) => {
                    let current = self.current.clone();
                    let route: Arc<dyn Fn(&str) -> Response + Send + Sync> =
                        Arc::new(move |_path| {
                            let current = current.lock().ok();
                            answer(current.as_ref().and_then(|c| c.get(&port)))
                        });
                    self.running
                        .insert((port, addr), tokio::spawn(health::serve(listener, route)));
                }
                Err(e) => errors.push(format!("healthCheckNodePort {port}: {e:#}")),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy() {
        let r = answer(Some(&hc(2)));
        assert_eq!(r.code, 200);
        assert!(r.body.contains("\"localEndpoints\": 2"));
        assert!(r.body.contains("\"name\": \"web\""));
        assert!(r
            .headers
            .contains(&("X-Load-Balancing-Endpoint-Weight", "2".into())));
        assert_eq!(answer(Some(&hc(0))).code, 503);
        assert_eq!(answer(None).code, 404);
    }

    #[tokio::test]
    async fn servers_follow_the_desired_ports() {
        let mut servers = HealthCheckServers::default();
        // An ephemeral free port, found by binding and releasing it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let errors = servers.apply(&BTreeMap::from([(port, hc(1))]), None).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(get(LOCALHOST, port).await.as_deref().map(status), Some(200));
        assert_eq!(
            get(OTHER, port).await.as_deref().map(status),
            Some(200),
            "every address"
        );
        servers.apply(&BTreeMap::from([(port, hc(0))]), None).await;
        assert_eq!(get(LOCALHOST, port).await.as_deref().map(status), Some(503));

        // Narrowed to one address (`--nodeport-addresses`), then moved to another.
        for (on, off) in [(OTHER, LOCALHOST), (LOCALHOST, OTHER)] {
            let errors = servers
                .apply(&BTreeMap::from([(port, hc(1))]), Some(&[on]))
                .await;
            assert!(errors.is_empty(), "{errors:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(
                get(on, port).await.as_deref().map(status),
                Some(200),
                "{on}"
            );
            assert!(get(off, port).await.is_none(), "not on {off}");
        }
        servers.apply(&BTreeMap::new(), Some(&[LOCALHOST])).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            get(LOCALHOST, port).await.is_none(),
            "stopped with its Service"
        );
    }

    const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    /// Another of the loopback's addresses.
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn status(reply: &str) -> u16 {
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    async fn get(ip: IpAddr, port: u16) -> Option<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    }
}
