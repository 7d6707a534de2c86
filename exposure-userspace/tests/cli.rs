//! The CLI's contract where no lab is needed: clear errors for what is missing.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_exposure");

#[test]
fn agent_without_a_source_says_what_is_missing_before_touching_anything() {
    // No --manifests, no kubeconfig anywhere, not in a cluster.
    let out = Command::new(BIN)
        .args([
            "agent",
            "--iface",
            "lo",
            "--pin-dir",
            "/sys/fs/bpf/exposure-cli-test",
        ])
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubeconfig"), "{err}");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/exposure-cli-test").exists(),
        "nothing pinned"
    );

    let out = Command::new(BIN)
        .args([
            "agent",
            "--iface",
            "lo",
            "--kubeconfig",
            "/nonexistent/config",
            "--pin-dir",
            "/sys/fs/bpf/exposure-cli-test",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config"));
    assert!(
        !std::path::Path::new("/sys/fs/bpf/exposure-cli-test").exists(),
        "nothing pinned"
    );
}

#[test]
fn agent_with_unknown_interface_fails_clearly() {
    let dir = std::env::temp_dir().join(format!("exposure-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args([
            "agent",
            "--iface",
            "nosuchif0",
            "--pin-dir",
            "/sys/fs/bpf/exposure-cli-test2",
            "--manifests",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuchif0"));
}

#[test]
fn status_without_a_running_agent_points_at_the_pin_dir() {
    let out = Command::new(BIN)
        .args(["status", "--pin-dir", "/sys/fs/bpf/exposure-nothing-here"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exposure-nothing-here") && err.contains("--pin-dir"),
        "{err}"
    );
}

#[test]
fn an_empty_pod_interface_prefix_is_refused_before_touching_anything() {
    // An empty prefix would match every interface: a mistake, not a request.
    let out = Command::new(BIN)
        .args([
            "agent",
            "--iface",
            "lo",
            "--manifests",
            "/nonexistent",
            "--pin-dir",
            "/sys/fs/bpf/exposure-cli-test3",
            "--xdp-redirect-to-pods",
            "",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--xdp-redirect-to-pods"));
    assert!(!std::path::Path::new("/sys/fs/bpf/exposure-cli-test3").exists());
}
