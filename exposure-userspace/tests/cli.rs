//! The CLI's contract where no lab is needed: clear errors for what is missing.

use std::{path::Path, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_exposure");

fn exposure(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    cmd
}

/// Runs `cmd`, which must fail and say `says` on stderr; its stderr.
fn fails_saying(cmd: &mut Command, says: &str) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains(says), "{err}");
    err
}

fn assert_nothing_pinned(pin_dir: &str) {
    assert!(!Path::new(pin_dir).exists(), "nothing pinned at {pin_dir}");
}

#[test]
fn agent_without_a_source_says_what_is_missing_before_touching_anything() {
    let pin_dir = "/sys/fs/bpf/exposure-cli-test";
    // No --manifests, no kubeconfig anywhere, not in a cluster.
    let mut agent = exposure(&["agent", "--iface", "lo", "--pin-dir", pin_dir]);
    agent
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST");
    fails_saying(&mut agent, "kubeconfig");
    assert_nothing_pinned(pin_dir);

    let mut agent = exposure(&["agent", "--iface", "lo", "--pin-dir", pin_dir]);
    agent.args(["--kubeconfig", "/nonexistent/config"]);
    fails_saying(&mut agent, "/nonexistent/config");
    assert_nothing_pinned(pin_dir);
}

#[test]
fn agent_with_unknown_interface_fails_clearly() {
    let dir = std::env::temp_dir().join(format!("exposure-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut agent = exposure(&["agent", "--iface", "nosuchif0"]);
    agent.args(["--pin-dir", "/sys/fs/bpf/exposure-cli-test2", "--manifests"]);
    agent.arg(&dir);
    let out = agent.output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuchif0"));
}

#[test]
fn status_without_a_running_agent_points_at_the_pin_dir() {
    let mut status = exposure(&["status", "--pin-dir", "/sys/fs/bpf/exposure-nothing-here"]);
    let err = fails_saying(&mut status, "exposure-nothing-here");
    assert!(err.contains("--pin-dir"), "{err}");
}

#[test]
fn an_empty_pod_interface_prefix_is_refused_before_touching_anything() {
    let pin_dir = "/sys/fs/bpf/exposure-cli-test3";
    // An empty prefix would match every interface: a mistake, not a request.
    for flag in ["--redirect-to-pods", "--xdp-redirect-to-pods"] {
        let mut agent = exposure(&["agent", "--iface", "lo", "--manifests", "/nonexistent"]);
        agent.args(["--pin-dir", pin_dir, flag, ""]);
        fails_saying(&mut agent, flag);
        assert_nothing_pinned(pin_dir);
    }
}

#[test]
fn both_ways_of_redirecting_to_pods_at_once_are_refused() {
    let pin_dir = "/sys/fs/bpf/exposure-cli-test4";
    let mut agent = exposure(&["agent", "--iface", "lo", "--manifests", "/nonexistent"]);
    agent.args(["--pin-dir", pin_dir, "--redirect-to-pods", "lxc"]);
    agent.args(["--xdp-redirect-to-pods", "lxc"]);
    let err = fails_saying(&mut agent, "--redirect-to-pods");
    assert!(err.contains("--xdp-redirect-to-pods"), "{err}");
    assert_nothing_pinned(pin_dir);
}

/// Each (value, what the error says) of `flag` makes the agent fail naming the flag, with nothing
/// pinned under `pin_dir`.
fn bad_values_are_refused_before_touching_anything(
    pin_dir: &str,
    flag: &str,
    cases: &[(&str, &str)],
) {
    for (value, says) in cases {
        let mut agent = exposure(&["agent", "--iface", "lo", "--manifests", "/nonexistent"]);
        agent.args(["--pin-dir", pin_dir, flag, value]);
        let err = fails_saying(&mut agent, flag);
        assert!(err.contains(says), "{value:?}: {err}");
        assert_nothing_pinned(pin_dir);
    }
}

#[test]
fn bad_socket_namespaces_are_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test7",
        "--socket-namespaces",
        &[
            ("pods", "absolute path"),
            ("/run/netns/a,run/netns/b", "absolute path"),
            ("/nonexistent/netns", "/nonexistent/netns"),
            ("/proc/self/ns/mnt", "not a network namespace"),
        ],
    );
}

#[test]
fn bad_nodeport_addresses_are_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test11",
        "--nodeport-addresses",
        &[
            ("198.18.0.1", "\"198.18.0.1\" is not a network"),
            ("198.18.0.0/24,primary", "\"primary\" is not a network"),
            ("198.18.0.0/33", "is not a network"),
            ("", "is not a network"),
        ],
    );
}

#[test]
fn a_bad_maps_check_period_is_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test12",
        "--maps-check-period",
        &[
            ("5", "\"5\" is not a period such as 30s"),
            ("1.5s", "is not a period"),
            ("10d", "is not a period"),
            ("s", "is not a period"),
        ],
    );
}

#[test]
fn bad_flow_timeouts_are_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test13",
        "--flow-timeout-udp",
        &[
            ("1s", "\"1s\" is shorter than 2s"),
            ("1500ms", "shorter than 2s"),
            ("0", "shorter than 2s"),
            ("30", "is not a period"),
        ],
    );
}

#[test]
fn a_bad_node_port_range_is_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test5",
        "--node-port-range",
        &[
            ("32767-30000", "ends before it starts"),
            ("30000-70000", "not a port number"),
            ("", "no ports"),
        ],
    );
}

#[test]
fn a_bad_snat_port_range_is_refused_before_touching_anything() {
    let pin_dir = "/sys/fs/bpf/exposure-cli-test6";
    for (flags, says) in [
        (
            &["--snat-port-range", "500-65535"][..],
            "1024 <= MIN <= MAX",
        ),
        (
            &["--snat-port-range", "65535-61000"][..],
            "1024 <= MIN <= MAX",
        ),
        (&["--snat-port-range", "61000"][..], "two port numbers"),
        (
            &[
                "--snat-port-range",
                "30000-40000",
                "--node-port-range",
                "30000-32767",
            ][..],
            "overlaps --node-port-range",
        ),
    ] {
        let mut agent = exposure(&["agent", "--iface", "lo", "--manifests", "/nonexistent"]);
        agent.args(["--pin-dir", pin_dir]).args(flags);
        let err = fails_saying(&mut agent, "--snat-port-range");
        assert!(err.contains(says), "{flags:?}: {err}");
        assert_nothing_pinned(pin_dir);
    }
}

#[test]
fn bad_iface_values_are_refused_before_touching_anything() {
    bad_values_are_refused_before_touching_anything(
        "/sys/fs/bpf/exposure-cli-test12",
        "--iface",
        &[
            ("+", "matches every interface"),
            ("eth0,", "`` is no interface name"),
            ("eth/0", "no interface name"),
            ("interface-name-too-long", "1-15 characters"),
            ("e+th+", "prefix (`eth+`) or `auto`"),
        ],
    );
}
