//! Scale: 10,000 Services with 100,000 endpoints from the test API server sync completely into the
//! maps. (How long it takes, and the agent's peak memory, are measured by `cargo xtask bench`.)

use std::{collections::BTreeSet, path::Path, time::Duration};

use exposure::{datapath::KernelMaps, sync::DatapathMaps as _};
use exposure_common::port_host;
use exposure_lab::{
    agent::{Agent, Source},
    control_plane::ControlPlane,
    lab::Lab,
    netns::unique_prefix,
    scale,
};

const BIN: &str = env!("CARGO_BIN_EXE_exposure");
const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

#[test]
fn ten_thousand_services_with_a_hundred_thousand_endpoints_sync_completely() {
    let prefix = unique_prefix("s");
    let lab = Lab::new(&prefix, &[0]).unwrap();
    let node = &lab.nodes[0];
    let dir = std::env::temp_dir().join(&prefix);
    let cp = ControlPlane::start(&lab, &dir).unwrap();
    cp.apply_all(scale::objects(SERVICES, PER_SERVICE, &node.name));
    let kubeconfig = cp.kubeconfig.clone();

    let mut agent = Agent::spawn_with(
        Path::new(BIN),
        &prefix,
        node,
        &Source::Kubeconfig(&kubeconfig),
        &dir,
        &["--max-maglev-entries", "12000000"],
    )
    .unwrap();
    agent
        .wait_healthy_within(node, Duration::from_secs(300))
        .expect("first full sync");

    let maps = KernelMaps::open(&agent.pin_dir).unwrap();
    let s = maps.snapshot().unwrap();
    assert_eq!(
        s.frontends.len(),
        SERVICES,
        "one LoadBalancer frontend per Service"
    );
    assert_eq!(s.services.len(), SERVICES);
    assert_eq!(s.backends.len(), SERVICES * PER_SERVICE);
    // Every Maglev table is complete and points at the right endpoints.
    let mut seen = BTreeSet::new();
    for fe in s.frontends.values() {
        let svc = s.services[&fe.service_id];
        assert_eq!(svc.backend_count as usize, PER_SERVICE);
        let table = s.tables[&fe.service_id].entries();
        assert_eq!(table.len(), 1021, "Maglev: a prime >= 100 x backends");
        let distinct: BTreeSet<u32> = table.iter().copied().collect();
        assert_eq!(distinct.len(), PER_SERVICE, "every backend owns entries");
        for bid in distinct {
            let b = s.backends[&bid];
            seen.insert((std::net::IpAddr::from(b.addr), port_host(b.port)));
        }
    }
    assert_eq!(
        seen.len(),
        SERVICES * PER_SERVICE,
        "every endpoint reachable from its Service"
    );
    let (ip, port) = scale::endpoint(SERVICES - 1, PER_SERVICE - 1, PER_SERVICE);
    assert!(seen.contains(&(ip.parse().unwrap(), port)));
    assert!(
        !agent.log_text().contains("skipped:"),
        "nothing was skipped"
    );
    if std::env::var_os("EXPOSURE_SCALE_PROBE").is_some() {
        // Manual profiling aid: touch one slice and print the agent's sync breakdown.
        cp.api
            .apply(scale::objects(1, PER_SERVICE, &node.name).pop().unwrap());
        std::thread::sleep(Duration::from_secs(2));
        eprintln!("{}", agent.log_text());
    }
    drop(agent);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
