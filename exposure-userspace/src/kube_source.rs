//! The Kubernetes API source: kube-rs watchers and reflector stores for Services, EndpointSlices and
//! this node's Node. The stores feed the same pure model as the manifest directory.
//!
//! While the API server is away the stores keep their last contents and the datapath is not touched;
//! the watchers reconnect with backoff and re-list after 410 Gone, and a re-list replaces a store
//! atomically when it completes, so the model never sees a half-listed cluster.
//!
//! As kube-proxy, the agent asks the API server only for Services and EndpointSlices without the
//! `service-proxy-name` and `headless` labels, and it stores objects without what it never reads
//! (`trim_*`): in a real cluster an object's managedFields and kubectl's last-applied copy of it
//! take more memory than the rest of it.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource,
};
use tokio::sync::Notify;

use crate::{
    endpoint_slice::EndpointSlice,
    manifests::Objects,
    metrics::LAST_CHANGE_TRIGGER_TIME,
    model::{HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL},
};

/// kubectl's client-side apply keeps the whole applied object in this annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Watch health, for metrics and logs.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Re-lists after the first one (reconnects that needed a full list, e.g. after 410 Gone).
    pub restarts: AtomicU64,
    pub errors: AtomicU64,
}

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    changed: Arc<Notify>,
    pub stats: Arc<WatchStats>,
}

/// A client from `--kubeconfig`, else `KUBECONFIG`/~/.kube/config, else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not running in a cluster")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// kube-proxy's selection: Services (and their slices) that another proxy owns, and headless
/// Services' slices, are not this proxy's to hold (the model ignores them too, as the manifest
/// directory has no server to ask).
fn proxied_objects() -> watcher::Config {
    watcher::Config::default().labels(&format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"))
}

/// Drops the metadata the agent never reads: the writers' managedFields, kubectl's last-applied
/// copy and the owners. Labels and the other annotations stay (the model and the metrics read some).
fn trim_metadata<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Keeps only the entries of `map` under `keys` (none left: no map).
fn keep_only(map: &mut Option<BTreeMap<String, String>>, keys: &[&str]) {
    if let Some(m) = map.as_mut() {
        m.retain(|k, _| keys.contains(&k.as_str()));
        if m.is_empty() {
            *map = None;
        }
    }
}

/// Of a Service's labels only kube-proxy's skip label is read; its annotations and selector
/// (pods are found through its slices) are not.
fn trim_service(svc: &mut Service) {
    trim_metadata(svc);
    keep_only(&mut svc.metadata.labels, &[SERVICE_PROXY_NAME_LABEL]);
    svc.metadata.annotations = None;
    if let Some(spec) = svc.spec.as_mut() {
        spec.selector = None;
    }
}

/// Of a slice's labels only its Service's name and kube-proxy's skip labels are read, of its
/// annotations only the trigger time (for the network programming metric). Its endpoints' pods
/// (`targetRef`) are not even decoded (see [`EndpointSlice`]).
fn trim_endpoint_slice(slice: &mut EndpointSlice) {
    trim_metadata(slice);
    let labels = [SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL];
    keep_only(&mut slice.metadata.labels, &labels);
    keep_only(&mut slice.metadata.annotations, &[LAST_CHANGE_TRIGGER_TIME]);
}

/// A Node's images and volumes are not read (only its labels, taints and addresses).
fn trim_node(node: &mut Node) {
    trim_metadata(node);
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
    }
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    changed: Arc<Notify>,
    stats: Arc<WatchStats>,
) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    tokio::spawn(async move {
        let mut lists = 0u64;
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => {
                    lists += 1;
                    if lists > 1 {
                        stats.restarts.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(kind, "re-listing");
                    }
                }
                // Mid-list: the store is swapped only at InitDone.
                Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => changed.notify_one(),
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff (serving the last known state)");
                }
            }
        }
    });
    store
}

impl KubeSource {
    pub fn start(client: Client, node_name: &str) -> Self {
        let changed = Arc::new(Notify::new());
        let stats = Arc::new(WatchStats::default());
        let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        KubeSource {
            services: watch(
                Api::all(client.clone()),
                proxied_objects(),
                trim_service,
                changed.clone(),
                stats.clone(),
            ),
            slices: watch(
                Api::all(client.clone()),
                proxied_objects(),
                trim_endpoint_slice,
                changed.clone(),
                stats.clone(),
            ),
            nodes: watch(
                Api::all(client),
                node_config,
                trim_node,
                changed.clone(),
                stats.clone(),
            ),
            changed,
            stats,
        }
    }

    /// Resolves once every store has completed its first list.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.services
            .wait_until_ready()
            .await
            .context("Service watch ended")?;
        self.slices
            .wait_until_ready()
            .await
            .context("EndpointSlice watch ended")?;
        self.nodes
            .wait_until_ready()
            .await
            .context("Node watch ended")?;
        Ok(())
    }

    /// Resolves after the next change to any store.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            nodes: self.nodes.state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::{
        metrics::LAST_CHANGE_TRIGGER_TIME,
        model::{desired_state, NodeContext},
    };

    fn of_kind<K: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<K> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(|o| serde_json::from_value(o.clone()).expect("a valid object"))
            .collect()
    }

    fn json_bytes<K: serde::Serialize>(objects: &[K]) -> usize {
        objects
            .iter()
            .map(|o| serde_json::to_vec(o).map_or(0, |v| v.len()))
            .sum()
    }

    #[test]
    fn trimmed_objects_translate_as_before_and_lose_most_of_their_size() {
        // As the API server holds them: kubectl's and the controllers' metadata, pods as targets.
        let objects = exposure_lab::scale::objects(3, 150, "node-a");
        let services: Vec<Service> = of_kind(&objects, "Service");
        let slices: Vec<EndpointSlice> = of_kind(&objects, "EndpointSlice");
        let (mut trimmed_services, mut trimmed_slices) = (services.clone(), slices.clone());
        trimmed_services.iter_mut().for_each(trim_service);
        trimmed_slices.iter_mut().for_each(trim_endpoint_slice);

        let node = NodeContext {
            node_name: "node-a".into(),
            node_addrs: vec!["198.18.0.10".parse().unwrap()],
            zone: None,
            node_sockets: true,
            localhost_node_ports: true,
            cluster_ips: true,
            external_cluster_ips: false,
        };
        let before = desired_state(&services, &slices, &node);
        assert_eq!(before.0.services.len(), 3);
        assert_eq!(
            before,
            desired_state(&trimmed_services, &trimmed_slices, &node)
        );

        let kept = |m: &Option<BTreeMap<String, String>>| -> Vec<String> {
            m.iter().flat_map(|m| m.keys().cloned()).collect()
        };
        assert!(services[0].metadata.managed_fields.is_some());
        assert!(
            services[0].metadata.labels.is_some() && services[0].metadata.annotations.is_some()
        );
        for svc in &trimmed_services {
            let meta = &svc.metadata;
            assert_eq!(
                (&meta.managed_fields, &meta.labels, &meta.annotations),
                (&None, &None, &None)
            );
            assert_eq!(svc.spec.as_ref().unwrap().selector, None);
        }
        for slice in &trimmed_slices {
            let meta = &slice.metadata;
            assert_eq!(
                (&meta.managed_fields, &meta.owner_references),
                (&None, &None)
            );
            assert_eq!(kept(&meta.annotations), [LAST_CHANGE_TRIGGER_TIME]);
            assert_eq!(kept(&meta.labels), [SERVICE_NAME_LABEL]);
            assert!(slice.endpoints.iter().flatten().count() > 0);
        }
        // The labels the model skips objects by stay.
        let (mut other_proxy, mut headless) = (services[0].clone(), slices[0].clone());
        let label = |meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                     key: &str| {
            meta.labels
                .get_or_insert_default()
                .insert(key.into(), "x".into());
        };
        label(&mut other_proxy.metadata, SERVICE_PROXY_NAME_LABEL);
        label(&mut headless.metadata, HEADLESS_LABEL);
        label(&mut headless.metadata, SERVICE_PROXY_NAME_LABEL);
        trim_service(&mut other_proxy);
        trim_endpoint_slice(&mut headless);
        assert_eq!(
            kept(&other_proxy.metadata.labels),
            [SERVICE_PROXY_NAME_LABEL]
        );
        assert_eq!(
            kept(&headless.metadata.labels),
            [SERVICE_NAME_LABEL, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL],
            "(sorted)"
        );
        // What the stores keep against what the API server sends.
        let (full, trimmed) = (
            json_bytes(&objects),
            json_bytes(&trimmed_services) + json_bytes(&trimmed_slices),
        );
        assert!(trimmed * 2 < full, "{trimmed} of {full} bytes");
    }

    #[test]
    fn a_trimmed_node_keeps_its_zone_addresses_and_taints() {
        let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"},
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.10"}],
                "images": [{"names": ["registry.example/app@sha256:0123", "registry.example/app:1.0"], "sizeBytes": 1000}],
                "volumesInUse": ["kubernetes.io/csi/driver^vol-1"]}}))
        .unwrap();
        let mut trimmed = node.clone();
        trim_node(&mut trimmed);
        let status = trimmed.status.as_ref().unwrap();
        assert_eq!((&status.images, &status.volumes_in_use), (&None, &None));
        assert_eq!(trimmed.metadata.managed_fields, None);
        let objects = |node: Node| Objects {
            nodes: vec![Arc::new(node)],
            ..Objects::default()
        };
        let (full, trimmed) = (objects(node), objects(trimmed));
        assert_eq!(trimmed.zone_of("node-a").as_deref(), Some("zone-1"));
        assert_eq!(trimmed.node_addrs("node-a"), full.node_addrs("node-a"));
        assert!(!trimmed.node_addrs("node-a").is_empty());
        assert!(trimmed.node_draining("node-a"));
    }
}
