//! The Kubernetes API source: kube-rs watchers and reflector stores for Services, EndpointSlices and
//! this node's Node. The stores feed the same pure model as the manifest directory.
//!
//! While the API server is away the stores keep their last contents and the datapath is not touched;
//! the watchers reconnect with backoff and re-list after 410 Gone, and a re-list replaces a store
//! atomically when it completes, so the model never sees a half-listed cluster.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource,
};
use tokio::sync::Notify;

use crate::manifests::Objects;

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

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
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
                watcher::Config::default(),
                changed.clone(),
                stats.clone(),
            ),
            slices: watch(
                Api::all(client.clone()),
                watcher::Config::default(),
                changed.clone(),
                stats.clone(),
            ),
            nodes: watch(
                Api::all(client),
                node_config,
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
