//! A test API server on the lab's LAN, with the lab's Nodes registered and a kubeconfig for agents.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

use crate::{
    apiserver::ApiServer,
    lab::{Lab, CONTROL_PLANE_IP},
};

pub struct ControlPlane {
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
    // Serves the API server's connections; dropped last.
    _rt: tokio::runtime::Runtime,
}

impl ControlPlane {
    /// Starts the API server in the LAN namespace, applies a Node per lab node (`InternalIP` its LAN
    /// address) and writes a kubeconfig into `dir`.
    pub fn start(lab: &Lab, dir: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let api = lab
            .lan
            .run(move || ApiServer::start(&handle, SocketAddr::from((CONTROL_PLANE_IP, 0))))??;
        for node in &lab.nodes {
            api.apply(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
                "status": {"addresses": [{"type": "InternalIP", "address": node.ip.to_string()},
                                         {"type": "Hostname", "address": node.name}]}}),
            );
        }
        std::fs::create_dir_all(dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        Ok(ControlPlane {
            api,
            kubeconfig,
            _rt: rt,
        })
    }

    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) {
        for o in objects {
            self.api.apply(o);
        }
    }
}
