//! `cargo xtask bench`: measurements that tests must not time.
//!
//! Control plane: the real agent (release build) in the namespace lab watching the test API server
//! with N LoadBalancer Services of 10 endpoints each: time from agent start to the first full sync
//! (process start, BPF load, list, translate, map writes), the reconcile step alone, the agent's peak
//! RSS, and how long an EndpointSlice change takes to reach the datapath's maps.
//!
//! Writes `bench/results/<date>.md` and prints it. `--quick` runs the small size only.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use exposure::datapath::KernelMaps;
use exposure_common::{ipv4, port, FrontendKey, PROTO_TCP};
use exposure_lab::{
    agent::{Agent, Source},
    control_plane::ControlPlane,
    lab::Lab,
    netns::unique_prefix,
    scale,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_exposure");
const PER_SERVICE: usize = 10;
const CHANGES: usize = 25;

struct ControlPlaneResult {
    services: usize,
    full_sync: Duration,
    reconcile: Duration,
    peak_rss_kib: u64,
    change_latency: Vec<Duration>,
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The agent logs `took_us=N` for each sync; the first is the full initial reconcile.
fn first_sync_us(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("synced"))
        .find_map(|l| l.split("took_us=").nth(1))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Backend addresses the datapath currently selects from for Service `i`.
fn live_backends(maps: &KernelMaps, i: usize) -> Vec<(u32, u16)> {
    let vip: Ipv4Addr = scale::vip(i).parse().unwrap();
    let key = FrontendKey {
        addr: ipv4(vip.octets()),
        port: port(80),
        proto: PROTO_TCP,
        _pad: 0,
    };
    let Ok(fe) = maps.frontends.get(&key, 0) else {
        return Vec::new();
    };
    let Ok(svc) = maps.services.get(&fe.service_id, 0) else {
        return Vec::new();
    };
    let Ok(table) = maps.maglev.read(svc.table_offset, svc.table_size) else {
        return Vec::new();
    };
    let ids: std::collections::BTreeSet<u32> = table.into_iter().collect();
    ids.into_iter()
        .filter_map(|bid| maps.backends.get(&bid, 0).ok())
        .map(|b| (b.addr, b.port))
        .collect()
}

fn control_plane(services: usize) -> ControlPlaneResult {
    let prefix = unique_prefix("b");
    let lab = Lab::new(&prefix, &[0]).expect("lab");
    let node = &lab.nodes[0];
    let dir = std::env::temp_dir().join(&prefix);
    let cp = ControlPlane::start(&lab, &dir).unwrap();
    let objects: Vec<Value> = scale::objects(services, PER_SERVICE, &node.name);
    cp.apply_all(objects.iter().cloned());
    let (api, kubeconfig) = (&cp.api, cp.kubeconfig.clone());

    let started = Instant::now();
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
        .wait_healthy_within(node, Duration::from_secs(600))
        .expect("first full sync");
    let full_sync = started.elapsed();
    let reconcile = Duration::from_micros(first_sync_us(&agent.log_text()));

    // Change one endpoint of a Service and time until the datapath selects the new one.
    let maps = KernelMaps::open(&agent.pin_dir).unwrap();
    let mut change_latency = Vec::new();
    for k in 0..CHANGES {
        let i = (k * 7919) % services;
        let name = format!("svc-{i:05}");
        let new_ip: Ipv4Addr = Ipv4Addr::new(198, 19, 255, k as u8 + 1);
        let slice = objects
            .iter()
            .find(|o| {
                o["kind"] == "EndpointSlice"
                    && o["metadata"]["labels"]["kubernetes.io/service-name"] == name.as_str()
            })
            .cloned()
            .unwrap();
        let mut changed = slice.clone();
        changed["endpoints"][0]["addresses"] = json!([new_ip.to_string()]);
        let want = (
            ipv4(new_ip.octets()),
            port(changed["ports"][0]["port"].as_u64().unwrap() as u16),
        );
        let t = Instant::now();
        api.apply(changed);
        while !live_backends(&maps, i).contains(&want) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "change to {name} never reached the datapath"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        change_latency.push(t.elapsed());
        api.apply(slice);
    }
    let peak_rss_kib = agent.pid().map(peak_rss_kib).unwrap_or(0);
    drop(agent);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    change_latency.sort();
    ControlPlaneResult {
        services,
        full_sync,
        reconcile,
        peak_rss_kib,
        change_latency,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let quick = args.iter().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Exposure benchmarks, {date}{}\n",
        if quick { " (quick)" } else { "" }
    );
    let _ = writeln!(report, "Machine: {}\n", machine());
    let _ = writeln!(report, "## Control plane (Kubernetes API source)\n");
    let _ = writeln!(report, "The release agent in the namespace lab, watching the test API server (real list/watch over HTTP,");
    let _ = writeln!(
        report,
        "500-object pages) with N LoadBalancer Services of {PER_SERVICE} ready endpoints each.\n"
    );
    let _ = writeln!(report, "| Services | Endpoints | agent start → synced | reconcile (translate + map writes) | peak RSS | EndpointSlice change → datapath (median / p90 / max of {CHANGES}) |");
    let _ = writeln!(report, "| ---: | ---: | ---: | ---: | ---: | --- |");
    for &n in sizes {
        eprintln!("control plane: {n} Services ...");
        let r = control_plane(n);
        let l = &r.change_latency;
        let _ = writeln!(
            report,
            "| {} | {} | {} | {} | {:.0} MiB | {} / {} / {} |",
            r.services,
            r.services * PER_SERVICE,
            ms(r.full_sync),
            ms(r.reconcile),
            r.peak_rss_kib as f64 / 1024.0,
            ms(l[l.len() / 2]),
            ms(l[l.len() * 9 / 10]),
            ms(l[l.len() - 1]),
        );
    }
    let _ = writeln!(report, "\nChange latency includes the API server's watch delivery and the agent's 5 ms burst coalescing.");
    print!("{report}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{date}{}.md", if quick { "-quick" } else { "" }));
    std::fs::write(&file, &report).expect("write the report");
    eprintln!("wrote {}", file.display());
}
