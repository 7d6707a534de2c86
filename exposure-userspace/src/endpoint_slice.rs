//! EndpointSlices as the agent keeps them: the fields it reads, decoded straight from what the API
//! server or a manifest holds. k8s-openapi's `Endpoint` also carries its pod (`targetRef`), hostname
//! and deprecated topology: 352 bytes before any string, against 128 here, so with 100,000
//! endpoints in the stores the agent's peak memory went from 220 to 196 MiB. The fields it does
//! not read are skipped as they are decoded, never allocated.
//!
//! Field names and types are k8s-openapi's (its `EndpointConditions`, `EndpointHints` and
//! `EndpointPort` as they are), so the model reads either the same way; missing or null required
//! fields become empty, as k8s-openapi decodes them.

use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<Endpoint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint: its addresses, readiness, topology hints, node and zone.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<EndpointConditions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<EndpointHints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A required field that is null decodes as empty (k8s-openapi's way), not as an error.
fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

// What kube-rs needs to list and watch the type (through its impl for k8s-openapi resources).
impl k8s_openapi::Resource for EndpointSlice {
    const API_VERSION: &'static str = "discovery.k8s.io/v1";
    const GROUP: &'static str = "discovery.k8s.io";
    const KIND: &'static str = "EndpointSlice";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "endpointslices";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::ListableResource for EndpointSlice {
    const LIST_KIND: &'static str = "EndpointSliceList";
}

impl k8s_openapi::Metadata for EndpointSlice {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1 as full;
    use serde_json::json;

    use super::*;

    /// The fields the agent reads, from k8s-openapi's type.
    fn read_fields(s: &full::EndpointSlice) -> EndpointSlice {
        let endpoints = s.endpoints.as_ref().map(|eps| {
            eps.iter()
                .map(|e| Endpoint {
                    addresses: e.addresses.clone(),
                    conditions: e.conditions.clone(),
                    hints: e.hints.clone(),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                })
                .collect()
        });
        EndpointSlice {
            metadata: s.metadata.clone(),
            address_type: s.address_type.clone(),
            endpoints,
            ports: s.ports.clone(),
        }
    }

    #[test]
    fn decodes_what_k8s_openapi_decodes_of_the_fields_read() {
        // As the EndpointSlice controller writes them: pods as targets, managed fields, hints.
        let mut slices: Vec<serde_json::Value> = exposure_lab::scale::objects(3, 120, "node-a")
            .into_iter()
            .filter(|o| o["kind"] == "EndpointSlice")
            .collect();
        assert!(slices.len() > 3, "more than one slice per Service");
        slices.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "ns", "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["2001:2::1"], "conditions": {"ready": false, "serving": true, "terminating": true},
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
                "nodeName": "node-a", "zone": "z1", "hostname": "pod-0", "deprecatedTopology": {"k": "v"},
                "targetRef": {"kind": "Pod", "name": "pod-0", "namespace": "ns", "uid": "u"}}],
            "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "appProtocol": "dns"}]}));
        // Null and missing required fields, as k8s-openapi takes them.
        slices.push(json!({"metadata": {"name": "t"}, "addressType": null,
            "endpoints": [{"addresses": null}, {}], "ports": null}));
        for value in slices {
            let text = value.to_string();
            let full: full::EndpointSlice =
                serde_json::from_str(&text).expect("k8s-openapi decodes it");
            let slim: EndpointSlice = serde_json::from_str(&text).expect("decodes it");
            assert_eq!(slim, read_fields(&full), "{text}");
        }
    }

    #[test]
    fn a_wrong_type_is_an_error_naming_what_was_expected() {
        let err = serde_json::from_value::<EndpointSlice>(
            json!({"endpoints": [{"addresses": "198.18.0.1"}]}),
        )
        .expect_err("addresses is a list");
        assert!(err.to_string().contains("expected a sequence"), "{err}");
    }

    #[test]
    fn an_endpoint_is_well_under_half_of_k8s_openapis() {
        let (slim, full) = (size_of::<Endpoint>(), size_of::<full::Endpoint>());
        assert!(slim * 2 < full, "{slim} of {full} bytes");
    }
}
