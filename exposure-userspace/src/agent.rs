//! The agent loop: watch a source, translate (pure), reconcile into the maps, report.
//! Both sources — a manifest directory and the Kubernetes API — go through the same model and sync.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use aya::programs::XdpMode;
use exposure_common::NodeAddrKey;

use crate::{
    datapath::{self, Capacity, Datapath, KernelMaps},
    health::{self, Health},
    kube_source::{self, KubeSource},
    local_ports::{self, PortSet, Reservation},
    manifests::{ManifestDir, Objects},
    metrics::Metrics,
    model::{self, NodeContext},
    netdev, sock_diag,
    sync::{DatapathMaps as _, Limits, Reconciler, SyncError},
};

pub struct AgentConfig {
    /// `--iface`: the interfaces the datapath is attached to.
    pub ifaces: netdev::IfaceSelector,
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub pin_dir: PathBuf,
    pub healthz: SocketAddr,
    pub metrics: SocketAddr,
    pub xdp_mode: XdpMode,
    pub capacity: Capacity,
    pub limits: Limits,
    /// `--redirect-to-pods` / `--xdp-redirect-to-pods`: name prefixes of pod interfaces.
    pub pod_iface_prefixes: Vec<String>,
    /// Ports to keep the node's own connections off (NodePorts and SNAT ports); `None`: leave the
    /// node's reserved ports alone.
    pub reserve_local_ports: Option<PortSet>,
    /// Hook the sockets of the node and its pods (`--translate-node-sockets`).
    pub node_sockets: Option<NodeSockets>,
    /// ClusterIPs for packets arriving on `--iface` too (`--external-cluster-ips`).
    pub external_cluster_ips: bool,
    /// How often the Service maps are compared with what the agent wrote (`--maps-check-period`).
    pub maps_check_period: Option<Duration>,
    /// Which of the node's addresses NodePorts are served on (`--nodeport-addresses`).
    pub node_port_addresses: model::NodePortAddresses,
}

/// Where the socket hooks go and whose sockets they translate.
pub struct NodeSockets {
    /// The cgroup2 directory (`--cgroup-root`); `None`: the node's cgroup2 root, found or mounted.
    pub cgroup: Option<PathBuf>,
    /// The namespaces `--socket-namespaces` lists (file, cookie), when it lists them.
    pub netns: Vec<(PathBuf, u64)>,
    /// `--socket-namespaces all`: every namespace's sockets.
    pub every_netns: bool,
    /// NodePorts on 127.0.0.1 too (`--localhost-node-ports`).
    pub localhost_node_ports: bool,
    /// ClusterIPs for the sockets too (`--cluster-ips`).
    pub cluster_ips: bool,
}

/// Ends the connected UDP sockets the socket hooks sent over a (frontend, endpoint) pair that
/// is gone (`left`), found through `SOCKET_PEERS`: their application gets an error and connects
/// again, to an endpoint that is there (as Cilium's socket LB terminates them). Best effort: a
/// failure is logged, and such a socket goes on as before.
fn end_udp_sockets(
    pin_dir: &std::path::Path,
    left: &BTreeSet<(model::AddrPort, model::AddrPort)>,
    sockets: &NodeSockets,
) {
    use exposure_common::{names, port_host, SocketPeer, SocketPeerKey};
    let peers = match datapath::open_pinned_lru::<SocketPeerKey, SocketPeer>(
        pin_dir,
        names::SOCKET_PEERS,
    ) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("{e:#}: connected UDP sockets to endpoints that left are not ended");
            return;
        }
    };
    let targets: std::collections::HashSet<sock_diag::Target> = peers
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, p)| {
            let frontend = (std::net::IpAddr::from(p.frontend), port_host(p.port));
            let endpoint = (std::net::IpAddr::from(k.backend), port_host(k.port));
            left.contains(&(frontend, endpoint))
        })
        .map(|(k, _)| sock_diag::Target {
            cookie: k.cookie,
            backend: k.backend,
            port: k.port,
        })
        .collect();
    if targets.is_empty() {
        return;
    }
    let listed: Vec<PathBuf> = sockets.netns.iter().map(|(p, _)| p.clone()).collect();
    let mut ended = 0;
    let mut not_entered = 0;
    for netns in sock_diag::namespaces(&listed, sockets.every_netns) {
        match sock_diag::destroy_in(&netns, &targets) {
            Ok(done) => ended += done.len(),
            Err(e) => {
                let denied = e.chain().any(|c| {
                    c.downcast_ref::<nix::errno::Errno>() == Some(&nix::errno::Errno::EPERM)
                });
                if denied {
                    not_entered += 1;
                }
                // A namespace gone meanwhile (its last process ended) has no sockets left.
                tracing::debug!("{e:#}");
            }
        }
    }
    if not_entered > 0 {
        tracing::warn!(
            namespaces = not_entered,
            "cannot enter pods' network namespaces (CAP_SYS_ADMIN) to end their sockets"
        );
    }
    tracing::info!(
        ended,
        of = targets.len(),
        "ended connected UDP sockets whose endpoint left their Service"
    );
}

/// Housekeeping period: manifest directory checks, interface addresses, neighbour requests.
const TICK: Duration = Duration::from_millis(200);
/// Events closer together than this are applied as one sync.
const COALESCE: Duration = Duration::from_millis(5);
/// How often draining frontends are checked for flows still using them.
const DRAIN_CHECK: Duration = Duration::from_secs(5);

enum Source {
    Dir {
        dir: ManifestDir,
        /// Whether the last poll failed (reported once while that lasts).
        unreadable: bool,
    },
    Kube(KubeSource),
}

impl Source {
    /// Resolves when the API source has news; the directory is polled on the tick instead.
    async fn changed(&self) {
        match self {
            Source::Dir { .. } => std::future::pending().await,
            Source::Kube(k) => k.changed().await,
        }
    }

    /// Looks at the manifest directory (on every tick): whether its objects changed. While it
    /// cannot be read, what it gave keeps serving.
    fn poll_dir(&mut self) -> bool {
        match self {
            Source::Dir { dir, unreadable } => match dir.poll() {
                Ok(changed) => {
                    if std::mem::take(unreadable) {
                        tracing::info!(dir = %dir.path().display(), "the manifest directory can be read again");
                    }
                    changed
                }
                Err(e) => {
                    if !std::mem::replace(unreadable, true) {
                        tracing::warn!(dir = %dir.path().display(), error = %e, "cannot read the manifest directory; keeping the current state");
                    }
                    false
                }
            },
            Source::Kube(_) => false,
        }
    }

    /// The objects now, and problems found reading them.
    fn load(&self) -> (Objects, Vec<String>) {
        match self {
            Source::Dir { dir, .. } => {
                let (objects, errors) = dir.objects();
                (objects, errors.iter().map(ToString::to_string).collect())
            }
            Source::Kube(k) => (k.objects(), Vec::new()),
        }
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    if let Some(dir) = &cfg.manifests {
        if !dir.is_dir() {
            bail!("--manifests {}: not a directory", dir.display());
        }
    }
    // Configuration errors first, before anything touches the datapath.
    let client = match &cfg.manifests {
        Some(_) => None,
        None => Some(kube_source::client(cfg.kubeconfig.as_deref()).await?),
    };
    datapath::check_privileges()?;
    let ifaces = selected_interfaces(&cfg, &HashMap::new(), true)?;
    // Each named interface must be there (a typo should not silently expose nothing).
    netdev::require_named(&cfg.ifaces.names, &ifaces)?;
    if ifaces.is_empty() {
        tracing::warn!(
            iface = %cfg.ifaces,
            "selects no interface (yet): nothing from outside is served until one is found (looked for every 200 ms)"
        );
    }
    warn_if_not_forwarding(&ifaces);
    if let Some(ports) = &cfg.reserve_local_ports {
        reserve_local_ports(ports);
    }

    let health = Health::default();
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(health::serve(
        health::bind(cfg.healthz).await?,
        health::healthz_routes(health.clone()),
    ));
    let metrics_listener = health::bind(cfg.metrics).await.context("metrics address")?;

    // The first list (seconds at 10,000 Services) runs on the runtime's workers while this thread
    // loads the programs (the verifier takes most of a second) and restores the maps.
    let kube = client.map(|client| {
        let kube = KubeSource::start(client, &cfg.node_name);
        *metrics.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(kube.stats.clone());
        kube
    });
    let mut dp = Datapath::load_with(&cfg.pin_dir, cfg.capacity)?;
    let mut maps = KernelMaps::open(&cfg.pin_dir)?;
    for iface in ifaces
        .iter()
        .filter(|i| !i.addrs.iter().any(IpAddr::is_ipv4))
    {
        tracing::warn!(
            iface = iface.name,
            "no IPv4 address (yet): no IPv4 NodePorts and no IPv4 SNAT source on it"
        );
    }
    // What the pins hold may be an earlier run's: addresses change while no agent runs.
    let mut snat_sources = maps.snat_sources()?;
    update_snat_sources(&mut maps, &mut snat_sources, netdev::snat_sources(&ifaces));
    if cfg.pod_iface_prefixes.is_empty() {
        // Without a redirect flag, flows an earlier run redirected go back to the stack, and so
        // do their replies.
        maps.set_pod_ifaces(&Default::default())
            .context("clearing the pod interfaces")?;
        dp.link_pod_interfaces(&Default::default());
    }
    let snapshot = maps.snapshot().context("reading pinned maps")?;
    // The UDP pairs an earlier run programmed: endpoints that left while no agent ran are found
    // against them at the first sync.
    let mut restored_udp_pairs = cfg.node_sockets.is_some().then(|| snapshot.udp_pairs());
    let mut reconciler = Reconciler::restore(snapshot, cfg.limits);
    let names: Vec<String> = ifaces.iter().map(|i| i.name.clone()).collect();
    for iface in dp.detach_other_interfaces(&names) {
        tracing::info!(
            iface,
            "detached: an earlier run attached the datapath here, and --iface does not select it now"
        );
    }
    // Which interface each name was attached to: one deleted and made again (a hot-plugged NIC,
    // a rebuilt bond) is a new interface, with no programs on it.
    let mut attached: HashMap<String, u32> = HashMap::new();
    // Interfaces (name, index) whose attach failed, reported once; tried again on every tick.
    let mut attach_failed: HashSet<(String, u32)> = HashSet::new();
    for iface in &ifaces {
        if cfg.ifaces.names.contains(&iface.name) {
            dp.attach(&iface.name, cfg.xdp_mode)?;
            attached.insert(iface.name.clone(), iface.index);
        }
    }
    // Those a prefix or `auto` found: one that cannot be attached must not stop the others.
    let found: Vec<netdev::Interface> = ifaces
        .iter()
        .filter(|i| !attached.contains_key(&i.name))
        .cloned()
        .collect();
    attach_to_new_interfaces(
        &mut dp,
        cfg.xdp_mode,
        &mut attached,
        &mut attach_failed,
        &found,
    );
    unmark_detached(&mut dp, &attached);
    match &cfg.node_sockets {
        Some(sockets) => {
            let cgroup = match &sockets.cgroup {
                Some(dir) => dir.clone(),
                None => datapath::cgroup2_root()?,
            };
            let cookies: Vec<u64> = sockets.netns.iter().map(|(_, c)| *c).collect();
            dp.attach_node_sockets(&cgroup, &cookies).context(
                "hooking the sockets of the node and its pods (--translate-node-sockets false runs without)",
            )?;
        }
        None => dp.detach_node_sockets(),
    }
    serve_metrics(metrics_listener, metrics.clone(), cfg.pin_dir.clone());
    if cfg.capacity.bpf_log_level > 0 {
        forward_bpf_logs(dp.bpf_logger(log::logger())?)?;
    }

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut source = match (kube, &cfg.manifests) {
        (None, Some(dir)) => Source::Dir {
            dir: ManifestDir::new(dir),
            unreadable: false,
        },
        (kube, _) => {
            let kube = kube.context("no Kubernetes client")?;
            tracing::info!("waiting for the first full list from the API server; the pinned datapath keeps serving meanwhile");
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                ready = kube.ready() => ready?,
            }
            Source::Kube(kube)
        }
    };
    tracing::info!(node = cfg.node_name, pin_dir = %cfg.pin_dir.display(), "agent started");

    let mut last_node_addrs: Option<Vec<IpAddr>> = None;
    // What the last sync programmed: UDP endpoints that leave are found against it.
    let mut programming = crate::metrics::ProgrammingLatency::new(SystemTime::now());
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut translator = model::Translator::default();
    let mut health_checks = crate::health_check::HealthCheckServers::default();
    let mut dirty = true;
    // Interfaces already reported as not veths (each is reported once).
    let mut not_veth: BTreeSet<String> = BTreeSet::new();
    // Pod interfaces the replies' program could not be attached to, reported once while that lasts.
    let mut unlinked: BTreeSet<String> = BTreeSet::new();
    // healthCheckNodePorts that could not be bound, reported once while that lasts (kube-proxy,
    // when kept for ClusterIPs, serves the same ports with the same answers).
    let mut unbound: BTreeSet<String> = BTreeSet::new();
    let mut maps_check = cfg.maps_check_period.map(MapsCheck::new);
    // Reconciles so far: a check whose read overlapped one cannot tell who changed the maps.
    let mut syncs: u64 = 0;
    let mut ticker = tokio::time::interval(TICK);
    let mut last_drain_check = Instant::now();
    let mut rp_filter_check = RpFilterCheck::default();
    // Logged once: XDP passed a packet to tc without metadata.
    let mut without_metadata_seen = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = source.changed() => {
                dirty = true;
                tokio::time::sleep(COALESCE).await;
            }
            _ = ticker.tick() => {}
        }
        health.pass(Instant::now());
        for (hop, ifindex) in maps.take_neighbor_misses() {
            resolve_neighbor(hop, ifindex);
        }
        if !cfg.pod_iface_prefixes.is_empty() {
            // Pods come and go: their interfaces are looked up again on every tick.
            let node_ifaces: Vec<String> = attached.keys().cloned().collect();
            let pods = netdev::pod_interfaces(&cfg.pod_iface_prefixes, &node_ifaces);
            for name in &pods.not_veth {
                if not_veth.insert(name.clone()) {
                    tracing::warn!(
                        iface = name,
                        "matches a pod interface prefix but is not a veth: its pods' flows stay with the stack"
                    );
                }
            }
            // Their replies' program first: only an interface that has it takes redirected flows.
            let (linked, failed) = dp.link_pod_interfaces(&pods.veths);
            let mut failing = BTreeSet::new();
            for (name, e) in failed {
                if !unlinked.contains(&name) {
                    tracing::warn!(
                        iface = name,
                        error = %format!("{e:#}"),
                        "cannot attach the pod replies' tc program: this pod's flows stay with the stack (tried again every 200 ms)"
                    );
                }
                failing.insert(name);
            }
            unlinked = failing;
            match maps.set_pod_ifaces(&linked) {
                Ok(0) => {}
                Ok(_) => {
                    tracing::info!(count = linked.len(), "pod interfaces for redirect")
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot update the pod interfaces")
                }
            }
        }
        rp_filter_check.tick(&attached);
        if !without_metadata_seen && dp.handed_off_by_tuple().unwrap_or(false) {
            without_metadata_seen = true;
            tracing::warn!(
                "a driver here keeps no XDP metadata: flows to remote pods through an interface \
                 XDP cannot send on (a tunnel) are known at tc ingress by their tuple instead \
                 (sent_from_tc_without_metadata); replies XDP cannot send to their client, and \
                 --redirect-to-pods, need metadata and do not work where it is missing"
            );
        }
        let ifaces_now = selected_interfaces(&cfg, &attached, false).ok();
        if let Some(ifs) = &ifaces_now {
            attach_to_new_interfaces(
                &mut dp,
                cfg.xdp_mode,
                &mut attached,
                &mut attach_failed,
                ifs,
            );
            update_snat_sources(&mut maps, &mut snat_sources, netdev::snat_sources(ifs));
        }
        // The interfaces' addresses, their own (SNAT source) ones first: the fallback for
        // `--nodeport-addresses primary`.
        let iface_addrs: Option<Vec<IpAddr>> = ifaces_now.map(|ifs| {
            let own = [false, true].map(|v6| ifs.iter().find_map(|i| i.snat_source(v6)));
            let mut rest: Vec<IpAddr> = ifs.into_iter().flat_map(|i| i.addrs).collect();
            rest.sort();
            rest.retain(|a| !own.contains(&Some(*a)));
            own.into_iter().flatten().chain(rest).collect()
        });
        let iface_addrs = iface_addrs
            .or_else(|| last_node_addrs.clone())
            .unwrap_or_default();
        if let Some(check) = &mut maps_check {
            let ready = !dirty && health.is_synced();
            let state = (&maps, &mut reconciler, cfg.limits, &*metrics);
            dirty |= check.tick(ready, syncs, &cfg.pin_dir, state).await;
        }
        // (The clock first: counting the draining frontends walks them all.)
        if last_drain_check.elapsed() >= DRAIN_CHECK && reconciler.draining() > 0 {
            last_drain_check = Instant::now();
            let in_use = maps.tcp_frontends_in_use(&cfg.capacity.flow_lifetimes);
            let (ended, errors) = reconciler.end_drains(&in_use, &mut maps);
            // Map writes: a maps check reading meanwhile must not take them for drift.
            syncs += u64::from(!ended.is_empty() || !errors.is_empty());
            for frontend in ended {
                tracing::info!(frontend, "drained: no connection goes through it any more");
            }
            report_draining(&reconciler, &metrics);
            for e in errors {
                tracing::error!("sync: {e}");
            }
        }
        let started = Instant::now();
        let dir_changed = source.poll_dir();
        if !dirty && !dir_changed && Some(&iface_addrs) == last_node_addrs.as_ref() {
            continue;
        }
        if matches!(&source, Source::Dir { dir, .. } if !dir.read_once()) {
            // Never read (the directory is not there yet): the pinned maps keep serving.
            continue;
        }
        let (objects, mut problems) = source.load();
        let loaded = started.elapsed();
        let node_object_addrs = objects.node_addrs(&cfg.node_name);
        let node_addrs = cfg.node_port_addresses.select(
            &[iface_addrs.as_slice(), &node_object_addrs].concat(),
            &model::primary_addrs(&node_object_addrs, &iface_addrs),
        );
        if node_addrs.is_empty() && !iface_addrs.is_empty() {
            problems.push(format!(
                "--nodeport-addresses {} matches none of this node's addresses ({}): its NodePorts are not served",
                cfg.node_port_addresses,
                iface_addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let draining = objects.node_draining(&cfg.node_name);
        if health.set_draining(draining) {
            if draining {
                tracing::warn!(
                    "this node is being deleted: /healthz answers 503, so load balancers drain it"
                );
            } else {
                tracing::info!("this node is no longer being deleted: /healthz answers 200 again");
            }
        }
        // healthCheckNodePorts listen where NodePorts are served (kube-proxy's), all by default.
        let health_checks_on =
            (cfg.node_port_addresses != model::NodePortAddresses::All).then(|| node_addrs.clone());
        let node = NodeContext {
            node_name: cfg.node_name.clone(),
            node_addrs,
            zone: objects.zone_of(&cfg.node_name),
            node_sockets: cfg.node_sockets.is_some(),
            localhost_node_ports: cfg
                .node_sockets
                .as_ref()
                .is_some_and(|s| s.localhost_node_ports)
                && cfg.node_port_addresses.include_ipv4_loopback(),
            cluster_ips: cfg.node_sockets.as_ref().is_some_and(|s| s.cluster_ips),
            external_cluster_ips: cfg.external_cluster_ips,
        };
        let changed = translator.update(&objects.services, &objects.endpoint_slices, &node);
        let desired = translator.state();
        let translated = started.elapsed();
        let report = reconciler.reconcile_changed(desired, &changed, &mut maps);
        syncs += 1;
        if let Some(sockets) = &cfg.node_sockets {
            let left = match restored_udp_pairs.take() {
                Some(restored) => restored
                    .difference(&model::udp_pairs(desired))
                    .copied()
                    .collect(),
                None => model::udp_pairs_left(&changed, desired),
            };
            if !left.is_empty() {
                end_udp_sockets(&cfg.pin_dir, &left, sockets);
            }
        }
        let now_unbound: BTreeSet<String> = health_checks
            .apply(&desired.health_checks, health_checks_on.as_deref())
            .await
            .into_iter()
            .collect();
        for e in now_unbound.difference(&unbound) {
            tracing::warn!("{e} (retried at every sync; reported once)");
        }
        unbound = now_unbound;
        let took = started.elapsed();

        problems.extend(translator.errors().map(ToString::to_string));
        let now: BTreeSet<String> = problems.into_iter().collect();
        for e in now.difference(&reported) {
            tracing::warn!("skipped: {e}");
        }
        reported = now;
        for e in &report.errors {
            tracing::error!("sync: {e}");
        }
        for frontend in &report.draining {
            tracing::info!(
                frontend,
                "left its Service: draining (its TCP connections go on, new ones are not served)"
            );
        }
        // Retry failed writes on the next tick; limits only change when the objects do.
        dirty = report
            .errors
            .iter()
            .any(|e| matches!(e, SyncError::Write { .. }));
        last_node_addrs = Some(iface_addrs);
        let (came, went) = translator.slices_changed();
        let programmed = programming.programmed(came, went, SystemTime::now());
        if let Ok(mut h) = metrics.network_programming.lock() {
            programmed.into_iter().for_each(|d| h.observe(d));
        }
        record(&metrics, &mut reconciler, &report, reported.len(), took);
        if let Ok(mut n) = metrics.no_local_endpoints.lock() {
            *n = desired.no_local_endpoints;
        }
        if !dirty {
            metrics.synced_at(SystemTime::now());
        }
        tracing::info!(
            services = desired.services.len(),
            frontends = desired.frontend_count(),
            writes = report.writes,
            skipped = reported.len(),
            took_us = took.as_micros() as u64,
            load_us = loaded.as_micros() as u64,
            model_us = (translated - loaded).as_micros() as u64,
            retranslated = translator.retranslated,
            reassembled = translator.reassembled,
            swapped_alone = translator.swapped_alone,
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

/// `--maps-check-period`: the Service maps are read on a blocking thread (at 10,000 Services that
/// is most of a check), then compared in the loop, only if no sync wrote them meanwhile: a
/// difference is then someone else's.
struct MapsCheck {
    period: Duration,
    next: Instant,
    /// The read in progress, and how many syncs had run when it began.
    reading: Option<(tokio::task::JoinHandle<MapsRead>, u64)>,
}

impl MapsCheck {
    fn new(period: Duration) -> Self {
        MapsCheck {
            period,
            next: Instant::now(),
            reading: None,
        }
    }

    /// Starts a read when one is due and the maps are as the last sync left them (`ready`), or
    /// compares a finished one. True: the maps were changed by something else, and `reconciler`
    /// now holds what they hold, so a sync must rewrite them.
    async fn tick(
        &mut self,
        ready: bool,
        syncs: u64,
        pin_dir: &Path,
        (maps, reconciler, limits, metrics): (
            &KernelMaps,
            &mut Reconciler,
            crate::sync::Limits,
            &Metrics,
        ),
    ) -> bool {
        match self.reading.take() {
            Some((task, began_at)) if task.is_finished() => {
                let read = task.await.unwrap_or_else(|e| MapsRead {
                    snapshot: Err(anyhow::anyhow!("{e}")),
                    took: Duration::ZERO,
                });
                // Otherwise read again at once.
                if began_at == syncs && ready {
                    self.next = Instant::now() + self.period;
                    return check_maps(read, maps, reconciler, limits, metrics);
                }
            }
            Some(pending) => self.reading = Some(pending),
            None if ready && Instant::now() >= self.next => {
                let (services, backends) = reconciler.ids_in_use();
                let pin_dir = pin_dir.to_path_buf();
                let maglev = maps.maglev.mapping();
                let task = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let snapshot = KernelMaps::open(&pin_dir).and_then(|mut m| {
                        m.maglev.share_mapping(maglev);
                        m.check_snapshot(services, backends)
                    });
                    MapsRead {
                        snapshot,
                        took: started.elapsed(),
                    }
                });
                self.reading = Some((task, syncs));
            }
            None => {}
        }
        false
    }
}

/// The Service maps as a check read them, and how long that took.
struct MapsRead {
    snapshot: anyhow::Result<crate::sync::Snapshot>,
    took: Duration,
}

/// Compares the Service maps as read with what `reconciler` wrote. When something else changed
/// them, logs what, counts it, and restores `reconciler` from the maps as a restart does, so the
/// next sync (true is returned) rewrites what differs.
fn check_maps(
    read: MapsRead,
    maps: &KernelMaps,
    reconciler: &mut Reconciler,
    limits: crate::sync::Limits,
    metrics: &Metrics,
) -> bool {
    let started = Instant::now();
    let differences = match &read.snapshot {
        Ok(actual) => reconciler.differences(actual),
        Err(e) => vec![format!("cannot read them: {e:#}")],
    };
    let took = read.took + started.elapsed();
    metrics
        .maps_check_us
        .store(took.as_micros() as u64, Ordering::Relaxed);
    if differences.is_empty() {
        metrics.synced_at(SystemTime::now());
        return false;
    }
    tracing::warn!(
        differences = differences.join("; "),
        "the Service maps differ from what the agent wrote (changed by something else?): rewriting them"
    );
    metrics.map_repairs.fetch_add(1, Ordering::Relaxed);
    match maps.snapshot() {
        Ok(all) => {
            *reconciler = Reconciler::restore(all, limits);
            true
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot read the Service maps; not rewriting them");
            false
        }
    }
}

fn record(
    metrics: &Metrics,
    reconciler: &mut Reconciler,
    report: &crate::sync::SyncReport,
    skipped: usize,
    took: Duration,
) {
    let errors = &report.errors;
    if let Ok(mut h) = metrics.sync_duration.lock() {
        h.observe(took);
    }
    metrics
        .sync_errors
        .fetch_add(errors.len() as u64, Ordering::Relaxed);
    metrics
        .skipped_objects
        .store(skipped as u64, Ordering::Relaxed);
    let (services, backends) = reconciler.counts();
    metrics.services.store(services as u64, Ordering::Relaxed);
    metrics.backends.store(backends as u64, Ordering::Relaxed);
    report_draining(reconciler, metrics);
    if let Ok(mut labels) = metrics.frontends.lock() {
        reconciler.update_frontend_labels(&mut labels);
    }
}

/// `/metrics`, reading the datapath's counters from the pinned maps at scrape time.
fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, pin_dir: PathBuf) {
    let maps = KernelMaps::open(&pin_dir).ok().map(std::sync::Mutex::new);
    let route: Arc<dyn Fn(&str) -> health::Response + Send + Sync> =
        Arc::new(move |path| match path {
            "/metrics" => {
                let guard = maps.as_ref().and_then(|m| m.lock().ok());
                health::Response::new(
                    200,
                    "text/plain; version=0.0.4",
                    metrics.render(guard.as_deref()),
                )
            }
            _ => health::Response::new(404, "text/plain", "not found\n"),
        });
    tokio::spawn(health::serve(listener, route));
}

/// The gauge of draining frontends, after a sync or a drain check changed them.
fn report_draining(reconciler: &Reconciler, metrics: &Metrics) {
    metrics
        .frontends_draining
        .store(reconciler.draining() as u64, Ordering::Relaxed);
}

/// The interfaces `--iface` selects now (those that exist), with their addresses, read once. A
/// selection sticks while the interface lasts (`attached`: name -> ifindex), so one that loses its
/// address for a moment, or its default route, keeps its programs and its flows. `explain`: log
/// why each other interface is not taken.
fn selected_interfaces(
    cfg: &AgentConfig,
    attached: &HashMap<String, u32>,
    explain: bool,
) -> anyhow::Result<Vec<netdev::Interface>> {
    let addrs = netdev::addresses()?;
    if cfg.ifaces.is_static() {
        return Ok(netdev::present_interfaces_among(&cfg.ifaces.names, &addrs));
    }
    let links = netdev::links(&addrs)?;
    let mut names = cfg.ifaces.select(&links, &cfg.pod_iface_prefixes);
    for link in &links {
        if attached.get(&link.name) == Some(&link.index) && !names.contains(&link.name) {
            names.push(link.name.clone());
        }
    }
    if explain {
        for link in links.iter().filter(|l| !names.contains(&l.name)) {
            if let Err(why) = cfg.ifaces.selects(link, &cfg.pod_iface_prefixes) {
                tracing::debug!(iface = link.name, why, "not selected by --iface");
            }
        }
    }
    Ok(netdev::present_interfaces_among(&names, &addrs))
}

/// Attaches the programs to each interface that is not the one its name had (`attached`: name ->
/// ifindex): newly selected, or deleted and made again. A failed attach is reported once and
/// tried again at the next tick.
fn attach_to_new_interfaces(
    dp: &mut Datapath,
    mode: XdpMode,
    attached: &mut HashMap<String, u32>,
    failed: &mut HashSet<(String, u32)>,
    ifaces: &[netdev::Interface],
) {
    let mut newly_attached = false;
    for iface in ifaces {
        let known = attached.get(&iface.name).copied();
        if known == Some(iface.index) {
            continue;
        }
        let why = if known.is_some() {
            "attached again: the interface is new"
        } else {
            "attached: newly selected by --iface"
        };
        match dp.attach(&iface.name, mode) {
            Ok(()) => {
                tracing::info!(iface = iface.name, "{why}");
                attached.insert(iface.name.clone(), iface.index);
                failed.remove(&(iface.name.clone(), iface.index));
                newly_attached = true;
            }
            Err(e) => {
                if failed.insert((iface.name.clone(), iface.index)) {
                    tracing::warn!(
                        iface = iface.name,
                        error = %format!("{e:#}"),
                        "cannot attach ({why}); trying again"
                    )
                }
            }
        }
    }
    if newly_attached {
        // An interface made anew leaves its old index's mark behind.
        unmark_detached(dp, attached);
    }
}

/// Keeps `XDP_IFACES` to the interfaces attached now (`attached`: name -> ifindex): an
/// interface that is gone, or no longer selected, leaves it.
fn unmark_detached(dp: &mut Datapath, attached: &HashMap<String, u32>) {
    let now: std::collections::BTreeSet<u32> = attached.values().copied().collect();
    if let Err(e) = dp.unmark_xdp_except(&now) {
        tracing::warn!(error = %format!("{e:#}"), "cannot update XDP_IFACES");
    }
}

/// Brings `NODE_ADDRS` (each interface's SNAT source per family; `had`: what it holds) to `want`,
/// so flows to remote backends leave from an address the node has now (as Cilium follows the
/// node's addresses). A write that fails is tried again at the next tick.
fn update_snat_sources(
    maps: &mut KernelMaps,
    had: &mut HashMap<NodeAddrKey, IpAddr>,
    want: HashMap<NodeAddrKey, IpAddr>,
) {
    for (key, addr) in &want {
        if had.get(key) == Some(addr) {
            continue;
        }
        match maps.set_node_addr(key.ifindex, *addr) {
            Ok(()) => {
                tracing::info!(ifindex = key.ifindex, %addr, "SNAT source address");
                had.insert(*key, *addr);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot set the SNAT source"),
        }
    }
    let gone: Vec<NodeAddrKey> = had
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    for key in gone {
        match maps.clear_node_addr(&key) {
            Ok(()) => {
                tracing::info!(
                    ifindex = key.ifindex,
                    family = key.family,
                    "no SNAT source address any more"
                );
                had.remove(&key);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot clear the SNAT source"),
        }
    }
}

/// XDP cannot resolve ARP or neighbour discovery; the kernel does when it has something to send
/// there. One datagram to the discard port makes it resolve the next hop, so the client's retransmit
/// finds the neighbour. (`ifindex` scopes a link-local IPv6 next hop.)
fn resolve_neighbor(hop: IpAddr, ifindex: u32) {
    tracing::debug!(%hop, "resolving next hop for the datapath");
    let (bind, to) = match hop {
        IpAddr::V4(v4) => ("0.0.0.0:0", SocketAddr::from((v4, 9))),
        IpAddr::V6(v6) => (
            "[::]:0",
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, 9, 0, ifindex)),
        ),
    };
    if let Ok(sock) = std::net::UdpSocket::bind(bind) {
        let _ = sock.send_to(&[], to);
    }
}

fn warn_if_not_forwarding(ifaces: &[netdev::Interface]) {
    let off = |path: &str| {
        std::fs::read_to_string(Path::new(path))
            .map(|v| v.trim() != "1")
            .unwrap_or(false)
    };
    if off("/proc/sys/net/ipv4/ip_forward") {
        tracing::warn!("net.ipv4.ip_forward is off: traffic to local backends is DNATed but the kernel will not route it to the pods");
    }
    let has_v6 = ifaces.iter().any(|i| i.addrs.iter().any(IpAddr::is_ipv6));
    if has_v6 && off("/proc/sys/net/ipv6/conf/all/forwarding") {
        tracing::warn!("net.ipv6.conf.all.forwarding is off: IPv6 traffic to local backends is DNATed but the kernel will not route it to the pods");
    }
}

/// How often the overlay tunnels' rp_filter is looked at: a CNI makes its tunnel when it starts,
/// which may be after the agent.
const RP_FILTER_CHECK: Duration = Duration::from_secs(2);

/// Warns of overlay tunnels whose strict rp_filter drops the flows other nodes send to this
/// node's pods ([`netdev::tunnels_dropping_other_nodes_flows`]), once each, and says when one
/// no longer does (loosened, selected or gone): otherwise those flows only time out.
#[derive(Default)]
struct RpFilterCheck {
    last: Option<Instant>,
    /// Tunnels warned about (name, ifindex).
    warned: BTreeSet<(String, u32)>,
}

impl RpFilterCheck {
    fn tick(&mut self, attached: &HashMap<String, u32>) {
        if self.last.is_some_and(|t| t.elapsed() < RP_FILTER_CHECK) {
            return;
        }
        self.last = Some(Instant::now());
        let Ok(links) = netdev::bare_links() else {
            return;
        };
        let selected: Vec<String> = attached.keys().cloned().collect();
        let now: BTreeSet<(String, u32)> =
            netdev::tunnels_dropping_other_nodes_flows(&links, &selected, netdev::rp_filter)
                .into_iter()
                .map(|l| (l.name.clone(), l.index))
                .collect();
        for (iface, _) in now.difference(&self.warned) {
            tracing::warn!(
                iface,
                "strict rp_filter on this tunnel, which --iface does not select: if it is the \
                 overlay to other nodes' pods, their agents SNAT the flows they send through it \
                 to this node's pods to their own LAN address, which this node routes by another \
                 interface, so the kernel drops them here. Select the tunnel on every node \
                 (--iface ...,{iface}), or make its rp_filter loose \
                 (net.ipv4.conf.{}.rp_filter=2)",
                iface.replace('.', "/")
            );
        }
        for (iface, _) in self.warned.difference(&now) {
            tracing::info!(
                iface,
                "rp_filter on this tunnel no longer drops other nodes' flows (loose, off, down, \
                 selected or gone)"
            );
        }
        self.warned = now;
    }
}

/// Keeps the node's own connections off the ports the datapath translates by (`local_ports`). A
/// failure only warns: the datapath works without it, and a node that never opens connections
/// from those ports loses nothing.
fn reserve_local_ports(ports: &PortSet) {
    match local_ports::reserve(ports) {
        Ok(Reservation::AlreadyReserved) => {
            tracing::info!(ports = %ports, "local ports already reserved")
        }
        Ok(Reservation::Reserve(list)) => tracing::info!(
            ports = %ports,
            "reserved from the node's ephemeral ports (net.ipv4.ip_local_reserved_ports = {list})"
        ),
        Ok(Reservation::WouldStarve { left, ephemeral }) => tracing::warn!(
            ports = %ports,
            "not reserving these ports: the node's ephemeral range {}-{} would keep only {left}; \
             its own connections from them may have replies translated by the datapath",
            ephemeral.start(),
            ephemeral.end()
        ),
        Err(e) => tracing::warn!(
            ports = %ports,
            "could not reserve these ports from the node's ephemeral ports: {e:#}; its own \
             connections from them may have replies translated by the datapath"
        ),
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

/// Drains the programs' log ring into the agent's own log (through the `log` -> `tracing` bridge).
fn forward_bpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd owns the logger.
    let mut ring = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the programs' log ring: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
