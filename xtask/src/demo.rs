//! `cargo xtask run`: the namespace lab with the real agent on two nodes and the `examples/` manifests.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use anyhow::Context as _;
use exposure_lab::{
    agent::{pin_dir, Agent, Source},
    apps::{self, parse_answer},
    lab::{lb_ip, lb_ip6, Lab, CLIENT_IP, CLIENT_IP6},
    netns::{unique_prefix, Netns},
};
use nix::sys::signal::{SigSet, Signal};

const REQUESTS: usize = 6;

fn ask(lab: &Lab, label: &str, to: SocketAddr, udp: bool) {
    let client = [CLIENT_IP.into(), CLIENT_IP6.into()];
    ask_from(&lab.client, &client, label, to, udp);
}

/// `REQUESTS` requests from `ns`, whose own addresses are `own`, printing who answered.
fn ask_from(ns: &Netns, own: &[IpAddr], label: &str, to: SocketAddr, udp: bool) {
    println!("\n{label}  ->  {to} ({})", if udp { "UDP" } else { "TCP" });
    for i in 1..=REQUESTS {
        let answer = if udp {
            apps::udp_ask(ns, to)
        } else {
            apps::tcp_ask(ns, to)
        };
        match answer {
            Ok(a) => match parse_answer(&a) {
                Some((pod, seen)) => {
                    let who = if own.contains(&seen.ip()) {
                        "the sender's own address"
                    } else {
                        "a node address (SNAT)"
                    };
                    println!("  request {i}: answered by {pod:<8}  (pod saw {seen}: {who})");
                }
                None => println!("  request {i}: unexpected answer {a:?}"),
            },
            Err(e) => println!("  request {i}: failed: {e:#}"),
        }
    }
}

pub fn run(bin: &Path, examples: &Path, once: bool) -> anyhow::Result<()> {
    // Block Ctrl-C/TERM in every thread (they inherit this mask) so we can clean up on it.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if !once {
        signals.thread_block()?;
    }

    let prefix = unique_prefix("run");
    println!(
        "Building the lab {prefix}: an external client, node-1 and node-2 with two pods each ..."
    );
    let lab = Lab::new(&prefix, &[2, 2])?;
    let _servers = lab
        .pods()
        .map(|(_, pod)| apps::serve(&pod.ns, 50000, &pod.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log_dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&log_dir)?;
    let mut agents = Vec::new();
    for node in &lab.nodes {
        agents.push(
            Agent::start(bin, &prefix, node, &Source::Manifests(examples), &log_dir)
                .with_context(|| format!("agent on {}", node.name))?,
        );
        println!(
            "  agent up on {} ({}, {}), iface {}, manifests {}",
            node.name,
            node.ip,
            node.ip6,
            node.iface,
            examples.display()
        );
    }
    for (node, pod) in lab.pods() {
        println!("  {:<8} {} {} on {}", pod.name, pod.ip, pod.ip6, node.name);
    }

    ask(
        &lab,
        "hello-world (NodePort) via node-1",
        SocketAddr::from((lab.nodes[0].ip, 30600)),
        false,
    );
    ask(
        &lab,
        "hello-world (NodePort) via node-2",
        SocketAddr::from((lab.nodes[1].ip, 30600)),
        false,
    );
    ask(
        &lab,
        "echo (LoadBalancer)",
        SocketAddr::from((lb_ip(1), 7)),
        false,
    );
    ask(
        &lab,
        "echo (LoadBalancer)",
        SocketAddr::from((lb_ip(1), 7)),
        true,
    );
    ask(
        &lab,
        "echo (LoadBalancer, IPv6)",
        SocketAddr::from((lb_ip6(1), 7)),
        false,
    );
    ask(
        &lab,
        "echo (NodePort, IPv6) via node-2",
        SocketAddr::from((lab.nodes[1].ip6, 30700)),
        true,
    );
    ask(
        &lab,
        "hello-local (externalTrafficPolicy: Local) via node-2",
        SocketAddr::from((lab.nodes[1].ip, 30601)),
        false,
    );
    let pod = &lab.nodes[0].pods[0];
    ask_from(
        &pod.ns,
        &[pod.ip.into(), pod.ip6.into()],
        &format!(
            "hello-world's ClusterIP from {} (the socket hooks)",
            pod.name
        ),
        SocketAddr::from(([198, 18, 50, 10], 60000)),
        false,
    );
    ask(
        &lab,
        "a port nothing serves (passes to node-1's own stack)",
        SocketAddr::from((lab.nodes[0].ip, 30999)),
        false,
    );

    println!("\n`exposure status` on node-1:");
    let _ = Command::new(bin)
        .args(["status", "--pin-dir"])
        .arg(pin_dir(&prefix, &lab.nodes[0]))
        .status();

    if !once {
        println!(
            "\nServing. From the client: `ip netns exec {prefix}-client curl ...` or nc; edit {}/*.yaml and \
             the agents pick it up. Agent logs: {}. Ctrl-C to stop and clean up.",
            examples.display(),
            log_dir.display()
        );
        let _ = signals.wait();
        println!("\nCleaning up ...");
    }
    drop(agents);
    drop(lab);
    let _ = std::fs::remove_dir_all(&log_dir);
    Ok(())
}
