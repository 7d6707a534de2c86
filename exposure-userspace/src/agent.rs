//! The agent loop: watch the source, translate (pure), reconcile into the maps, report.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::programs::XdpMode;

use crate::{
    datapath::{self, Datapath, KernelMaps},
    health::{self, Health},
    manifests,
    model::{self, NodeContext},
    netdev,
    sync::{DatapathMaps as _, Limits, Reconciler},
};

pub struct AgentConfig {
    pub ifaces: Vec<String>,
    pub manifests: Option<PathBuf>,
    pub node_name: String,
    pub pin_dir: PathBuf,
    pub healthz: SocketAddr,
    pub xdp_mode: XdpMode,
}

/// How often the manifest directory is checked for changes (well inside the 1 s promise).
const POLL: Duration = Duration::from_millis(200);

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let Some(manifest_dir) = cfg.manifests.clone() else {
        bail!(
            "no --manifests DIR given: watching the Kubernetes API is not implemented yet, so the agent \
             needs a directory of Service and EndpointSlice manifests"
        );
    };
    if !manifest_dir.is_dir() {
        bail!("--manifests {}: not a directory", manifest_dir.display());
    }
    datapath::check_privileges()?;
    let ifaces = netdev::interfaces(&cfg.ifaces)?;
    warn_if_not_forwarding();

    let healthz = health::bind(cfg.healthz).await?;
    let health = Health::default();
    tokio::spawn(health::serve(healthz, health.clone()));

    let mut dp = Datapath::load(&cfg.pin_dir)?;
    let mut maps = KernelMaps::open(&cfg.pin_dir)?;
    for iface in &ifaces {
        match iface.ipv4.first() {
            Some(addr) => maps.set_node_addr(iface.index, *addr)?,
            None => tracing::warn!(
                iface = iface.name,
                "no IPv4 address: no NodePorts and no SNAT source on it"
            ),
        }
    }
    let mut reconciler = Reconciler::restore(
        maps.snapshot().context("reading pinned maps")?,
        Limits::default(),
    );
    for iface in &ifaces {
        dp.attach(&iface.name, cfg.xdp_mode)?;
    }
    tracing::info!(node = cfg.node_name, pin_dir = %cfg.pin_dir.display(), manifests = %manifest_dir.display(), "agent started");

    let mut last_fingerprint = None;
    let mut last_node_addrs = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut retry = false;
    let mut ticker = tokio::time::interval(POLL);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        for hop in maps.take_neighbor_misses() {
            resolve_neighbor(hop);
        }
        let fingerprint = manifests::fingerprint(&manifest_dir).ok();
        let node_addrs: Vec<_> = netdev::interfaces(&cfg.ifaces)
            .map(|ifs| ifs.into_iter().flat_map(|i| i.ipv4).collect())
            .unwrap_or_else(|_| last_node_addrs.clone());
        if !retry
            && fingerprint.is_some()
            && fingerprint == last_fingerprint
            && node_addrs == last_node_addrs
        {
            continue;
        }
        let started = Instant::now();
        let (objects, file_errors) = match manifests::load_dir(&manifest_dir) {
            Ok(r) => r,
            Err(e) => {
                // The directory vanished or is unreadable: keep serving what we have.
                tracing::warn!(dir = %manifest_dir.display(), error = %e, "cannot read manifests; keeping the current state");
                continue;
            }
        };
        let node = NodeContext {
            node_name: cfg.node_name.clone(),
            node_addrs: node_addrs.clone(),
        };
        let (desired, model_errors) =
            model::desired_state(&objects.services, &objects.endpoint_slices, &node);
        let report = reconciler.reconcile(&desired, &mut maps);

        let now: BTreeSet<String> = file_errors
            .iter()
            .map(ToString::to_string)
            .chain(model_errors.iter().map(ToString::to_string))
            .collect();
        for e in now.difference(&reported) {
            tracing::warn!("skipped: {e}");
        }
        reported = now;
        for e in &report.errors {
            tracing::error!("sync: {e}");
        }
        retry = report
            .errors
            .iter()
            .any(|e| matches!(e, crate::sync::SyncError::Write { .. }));
        last_fingerprint = fingerprint;
        last_node_addrs = node_addrs;
        tracing::info!(
            services = desired.services.len(),
            frontends = desired.frontend_count(),
            writes = report.writes,
            skipped = reported.len(),
            took_us = started.elapsed().as_micros() as u64,
            "synced"
        );
        if !health.is_synced() {
            health.set_synced();
        }
    }
    // Pins stay: the programs keep forwarding established flows while the agent is away.
    tracing::info!("agent stopping; datapath stays attached (use `exposure cleanup` to remove it)");
    Ok(())
}

/// XDP cannot resolve ARP; the kernel does when it has something to send there. One datagram to the
/// discard port makes it resolve the next hop, so the client's retransmit finds the neighbour.
fn resolve_neighbor(hop: std::net::Ipv4Addr) {
    tracing::debug!(%hop, "resolving next hop for the datapath");
    if let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") {
        let _ = sock.send_to(&[], (hop, 9));
    }
}

fn warn_if_not_forwarding() {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    if std::fs::read_to_string(path)
        .map(|v| v.trim() != "1")
        .unwrap_or(false)
    {
        tracing::warn!("net.ipv4.ip_forward is off: traffic to local backends is DNATed but the kernel will not route it to the pods");
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
