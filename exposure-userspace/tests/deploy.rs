//! `deploy/` is what `kubectl apply -f deploy/` installs: every manifest must parse into its
//! k8s-openapi type, grant no more than the agent reads, and run the agent with flags it has.

use std::{collections::BTreeSet, path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

const BIN: &str = env!("CARGO_BIN_EXE_exposure");

#[derive(Default)]
struct Deploy {
    daemonsets: Vec<DaemonSet>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn load() -> Deploy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut d = Deploy::default();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let what = format!("{}: {kind}", path.display());
            match kind.as_str() {
                "DaemonSet" => d
                    .daemonsets
                    .push(serde_yaml::from_value(value).expect(&what)),
                "ServiceAccount" => d.accounts.push(serde_yaml::from_value(value).expect(&what)),
                "ClusterRole" => d.roles.push(serde_yaml::from_value(value).expect(&what)),
                "ClusterRoleBinding" => {
                    d.bindings.push(serde_yaml::from_value(value).expect(&what))
                }
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
        }
    }
    d
}

#[test]
fn rbac_grants_only_reads_of_what_the_agent_watches() {
    let d = load();
    assert_eq!(d.roles.len(), 1);
    let mut resources = BTreeSet::new();
    for rule in d.roles[0].rules.iter().flatten() {
        for verb in &rule.verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "verb {verb} is more than a read"
            );
        }
        resources.extend(rule.resources.iter().flatten().cloned());
    }
    assert_eq!(
        resources,
        BTreeSet::from(["endpointslices".into(), "nodes".into(), "services".into()])
    );
    let binding = &d.bindings[0];
    assert_eq!(
        binding.role_ref.name,
        d.roles[0].metadata.name.clone().unwrap()
    );
    let subject = &binding.subjects.as_ref().unwrap()[0];
    let sa = &d.accounts[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_the_agent_on_the_host_network_with_narrow_capabilities() {
    let d = load();
    let ds = &d.daemonsets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name, d.accounts[0].metadata.name);
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("agent container");
    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent itself is not privileged"
    );
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    for needed in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(added.contains(needed), "missing {needed}");
    }
    assert!(
        !added.contains("SYS_ADMIN"),
        "bpffs is mounted by the init container, not the agent"
    );
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(agent
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path == "/sys/fs/bpf"));
    // The socket hooks go on the host's cgroup2 root: in the container's own cgroup namespace
    // they would see the agent's sockets only.
    let cgroup_root = agent
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--cgroup-root="))
        .expect("--cgroup-root");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == cgroup_root)
        .expect("a volume mounted at --cgroup-root");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&agent.readiness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(probe_path(&agent.liveness_probe).as_deref(), Some("/livez"));
}

#[test]
fn daemonset_uses_only_flags_the_agent_has() {
    let d = load();
    let pod = d.daemonsets[0].spec.template.spec.as_ref().unwrap();
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let args = agent.args.as_ref().unwrap();
    assert_eq!(args[0], "agent");
    let help = Command::new(BIN)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "`exposure agent` has no {flag}");
    }
    // No --manifests: in a cluster the agent watches the API.
    assert!(!args.iter().any(|a| a.starts_with("--manifests")));
}
