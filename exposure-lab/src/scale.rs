//! Objects for scale runs (the scale test and `cargo xtask bench`): `services` LoadBalancer
//! Services, each with its own VIP and `per_service` ready endpoints, every endpoint a distinct
//! address:port. All addresses in 198.18.0.0/15.

use serde_json::{json, Value};

/// VIP of service `i`: 198.18.128.0 onwards (room for 65,536, up to 198.19.127.255). Backends use
/// ports other than the VIPs' port 80, so a VIP never doubles as a backend address:port.
pub fn vip(i: usize) -> String {
    let base = u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0));
    std::net::Ipv4Addr::from(base + i as u32).to_string()
}

/// Endpoint `j` of service `i`: 198.19.0.0/16 addresses, the port making wrap-arounds distinct.
pub fn endpoint(i: usize, j: usize, per_service: usize) -> (String, u16) {
    let n = i * per_service + j;
    (
        format!("198.19.{}.{}", (n / 256) % 256, n % 256),
        8000 + (n / 65_536) as u16,
    )
}

/// The Services and their EndpointSlices, ready for `ApiServer::apply`.
pub fn objects(services: usize, per_service: usize, node_name: &str) -> Vec<Value> {
    let mut out = Vec::with_capacity(services * 2);
    for i in 0..services {
        let name = format!("svc-{i:05}");
        out.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "scale"},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": vip(i)}]}}}));
        // EndpointSlices hold up to 100 endpoints each by default; group them the same way.
        for (k, chunk) in (0..per_service).collect::<Vec<_>>().chunks(100).enumerate() {
            let mut ports = Vec::new();
            let endpoints: Vec<Value> = chunk
                .iter()
                .map(|j| {
                    let (ip, port) = endpoint(i, *j, per_service);
                    ports.push(port);
                    json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node_name})
                })
                .collect();
            // One port per slice: split by port when the endpoint numbering wrapped.
            ports.dedup();
            for port in ports {
                let eps: Vec<Value> = endpoints
                    .iter()
                    .zip(chunk)
                    .filter(|(_, j)| endpoint(i, **j, per_service).1 == port)
                    .map(|(e, _)| e.clone())
                    .collect();
                out.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-{k}-{port}"), "namespace": "scale",
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": port}],
                    "endpoints": eps}));
            }
        }
    }
    out
}
