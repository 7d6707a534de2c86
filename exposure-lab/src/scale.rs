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

/// The Services and their EndpointSlices, ready for `ApiServer::apply`, as a real API server holds
/// them: kubectl's last-applied annotation and managedFields, the fields the API server defaults,
/// and slices as the EndpointSlice controller writes them (owner, labels, trigger time, pods as
/// targets). Apart from the metadata, a Service has no ClusterIP, so only its VIP is served.
pub fn objects(services: usize, per_service: usize, node_name: &str) -> Vec<Value> {
    let mut out = Vec::with_capacity(services * 2);
    for i in 0..services {
        let name = format!("svc-{i:05}");
        let service_uid = uid(1, i);
        let labels = json!({"app.kubernetes.io/name": name, "app.kubernetes.io/instance": "scale",
            "app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "scale-1.0.0"});
        let ports = json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]);
        let applied = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"annotations": {}, "labels": labels, "name": name, "namespace": "scale"},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": ports,
                     "selector": {"app.kubernetes.io/name": name}}});
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "scale", "uid": service_uid,
                "creationTimestamp": CREATED, "labels": labels,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")},
                "managedFields": [
                    managed("kubectl-client-side-apply", "v1", None, json!({
                        "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                                       "f:labels": fields(&labels)},
                        "f:spec": {"f:allocateLoadBalancerNodePorts": {}, "f:externalTrafficPolicy": {},
                            "f:internalTrafficPolicy": {},
                            "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {},
                                "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                            "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}})),
                    managed("metallb-controller", "v1", Some("status"),
                        json!({"f:status": {"f:loadBalancer": {"f:ingress": {}}}})),
                ]},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": ports,
                     "selector": {"app.kubernetes.io/name": name}, "sessionAffinity": "None",
                     "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster",
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"},
            "status": {"loadBalancer": {"ingress": [{"ip": vip(i), "ipMode": "VIP"}]}}}));
        // EndpointSlices hold up to 100 endpoints each by default; group them the same way.
        for (k, chunk) in (0..per_service).collect::<Vec<_>>().chunks(100).enumerate() {
            let mut ports = Vec::new();
            let endpoints: Vec<Value> = chunk
                .iter()
                .map(|j| {
                    let (ip, port) = endpoint(i, *j, per_service);
                    ports.push(port);
                    json!({"addresses": [ip],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": node_name,
                        "targetRef": {"kind": "Pod", "namespace": "scale",
                            "name": format!("{name}-5d8c7b9f4-{j:05x}"), "uid": uid(3, i * per_service + j)}})
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
                let mut slice_labels = labels.clone();
                slice_labels["kubernetes.io/service-name"] = json!(name);
                slice_labels["endpointslice.kubernetes.io/managed-by"] =
                    json!("endpointslice-controller.k8s.io");
                out.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-{k}-{port}"), "generateName": format!("{name}-"),
                        "namespace": "scale", "uid": uid(2, out.len()), "generation": 1,
                        "creationTimestamp": CREATED, "labels": slice_labels,
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                            "uid": service_uid, "controller": true, "blockOwnerDeletion": true}],
                        "managedFields": [managed("kube-controller-manager", "discovery.k8s.io/v1", None, json!({
                            "f:addressType": {}, "f:endpoints": {}, "f:ports": {},
                            "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                                "f:generateName": {}, "f:labels": fields(&slice_labels),
                                "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{service_uid}\"}}"): {}}}}))]},
                    "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": port}],
                    "endpoints": eps}));
            }
        }
    }
    out
}

const CREATED: &str = "2026-01-01T00:00:00Z";

/// A UID, distinct per `kind` tag and index.
fn uid(kind: u32, i: usize) -> String {
    format!("{kind:08x}-5ca1-4e00-8000-{i:012x}")
}

/// One managedFields entry.
fn managed(manager: &str, api_version: &str, subresource: Option<&str>, fields: Value) -> Value {
    let mut entry = json!({"manager": manager, "operation": "Update", "apiVersion": api_version,
        "time": CREATED, "fieldsType": "FieldsV1", "fieldsV1": fields});
    if let Some(s) = subresource {
        entry["subresource"] = json!(s);
    }
    entry
}

/// A map's keys as managedFields list them (`f:key: {}`, and `.` for the map itself).
fn fields(map: &Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(".".into(), json!({}));
    for key in map.as_object().into_iter().flat_map(|m| m.keys()) {
        out.insert(format!("f:{key}"), json!({}));
    }
    Value::Object(out)
}
