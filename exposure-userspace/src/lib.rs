//! Exposure's agent: sources (manifest directory), the pure model, the map reconciler, the datapath
//! loader, and the small HTTP endpoints. The `exposure` binary wires them together.

pub mod agent;
pub mod datapath;
pub mod endpoint_slice;
pub mod health;
pub mod health_check;
pub mod kube_source;
pub mod local_ports;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod sock_diag;
pub mod status;
pub mod sync;
