//! `healthCheckNodePort` servers for `externalTrafficPolicy: Local` Services, answering as
//! kube-proxy does: 200 with the local endpoint count when this node has local endpoints, 503 when it
//! has none, so external load balancers only send to nodes that can serve locally.

use std::{
    collections::{BTreeMap, HashMap},
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

/// The running servers, one per port, following the desired state.
#[derive(Default)]
pub struct HealthCheckServers {
    current: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    running: HashMap<u16, tokio::task::JoinHandle<()>>,
}

impl HealthCheckServers {
    /// Starts servers for new ports, stops removed ones, and updates what every port reports.
    /// A port that cannot be bound is returned as an error message and retried at the next sync.
    pub async fn apply(&mut self, desired: &BTreeMap<u16, HealthCheck>) -> Vec<String> {
        if let Ok(mut current) = self.current.lock() {
            current.clone_from(desired);
        }
        self.running.retain(|port, task| {
            let keep = desired.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for port in desired.keys() {
            if self.running.contains_key(port) {
                continue;
            }
            // Both families on one socket (`[::]` takes IPv4 too); IPv4 alone where IPv6 is off.
            let bound = match health::bind(std::net::SocketAddr::from(([0u16; 8], *port))).await {
                Ok(listener) => Ok(listener),
                Err(_) => health::bind(std::net::SocketAddr::from(([0, 0, 0, 0], *port))).await,
            };
            match bound {
                Ok(listener) => {
                    let current = self.current.clone();
                    let port_no = *port;
                    let route: Arc<dyn Fn(&str) -> Response + Send + Sync> =
                        Arc::new(move |_path| {
                            let current = current.lock().ok();
                            answer(current.as_ref().and_then(|c| c.get(&port_no)))
                        });
                    self.running
                        .insert(*port, tokio::spawn(health::serve(listener, route)));
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
        let errors = servers.apply(&BTreeMap::from([(port, hc(1))])).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(get(port).await.as_deref().map(status), Some(200));
        servers.apply(&BTreeMap::from([(port, hc(0))])).await;
        assert_eq!(get(port).await.as_deref().map(status), Some(503));
        servers.apply(&BTreeMap::new()).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(get(port).await.is_none(), "stopped with its Service");
    }

    fn status(reply: &str) -> u16 {
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    async fn get(port: u16) -> Option<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    }
}
