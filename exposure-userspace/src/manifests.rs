//! The manifest-directory source: Kubernetes YAML/JSON as `kubectl get -o yaml` writes it (single
//! objects, multi-document files, or `kind: List`). A file or object that is broken is reported and
//! skipped; everything else keeps working.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

/// Everything the directory currently says.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Shared, so a sync never deep-copies the cluster (and unchanged objects keep their identity).
    pub services: Vec<std::sync::Arc<Service>>,
    pub endpoint_slices: Vec<std::sync::Arc<EndpointSlice>>,
    /// Nodes: only the agent's own is used (its zone label for topology hints, its addresses,
    /// whether it is being deleted).
    pub nodes: Vec<std::sync::Arc<Node>>,
}

impl Objects {
    /// The Node named `node_name`.
    fn node(&self, node_name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))
            .map(|n| n.as_ref())
    }

    /// The zone of the node named `node_name`, from its `topology.kubernetes.io/zone` label.
    pub fn zone_of(&self, node_name: &str) -> Option<String> {
        self.node(node_name)
            .and_then(|n| {
                n.metadata
                    .labels
                    .as_ref()?
                    .get(crate::model::ZONE_LABEL)
                    .cloned()
            })
            .filter(|zone| !zone.is_empty())
    }

    /// The addresses of the node named `node_name` from its Node object (InternalIPs, then
    /// ExternalIPs): NodePort addresses beside the interfaces' own.
    pub fn node_addrs(&self, node_name: &str) -> Vec<std::net::IpAddr> {
        self.node(node_name)
            .map(crate::model::node_object_addrs)
            .unwrap_or_default()
    }

    /// Whether the node named `node_name` is being deleted: its Node has a deletion timestamp, or
    /// the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint (what kube-proxy checks).
    pub fn node_draining(&self, node_name: &str) -> bool {
        self.node(node_name).is_some_and(|n| {
            n.metadata.deletion_timestamp.is_some()
                || n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
        })
    }
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A problem with one file or one object in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name`, or the document number when the object has no identity yet.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.object,
            self.reason
        )
    }
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The manifest files in `dir`, sorted (so the first definition of a duplicate wins predictably).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Cheap change detection: names, sizes and modification times of the manifest files.
pub fn fingerprint(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    Ok(manifest_files(dir)?
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect())
}

/// Reads and parses every manifest in `dir`.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<ManifestError>), std::io::Error> {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for file in manifest_files(dir)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_into(&file, &text, &mut objects, &mut errors),
            Err(e) => errors.push(ManifestError {
                file: file.clone(),
                object: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    dedupe(&mut objects, &mut errors);
    Ok((objects, errors))
}

/// Parses one file's documents into `objects`, reporting what can't be used.
pub fn parse_into(file: &Path, text: &str, objects: &mut Objects, errors: &mut Vec<ManifestError>) {
    let err = |object: String, reason: String| ManifestError {
        file: file.to_path_buf(),
        object,
        reason,
    };
    for (n, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document, e.g. a trailing `---`
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: nothing after it in this file can be trusted.
                errors.push(err(
                    format!("document {}", n + 1),
                    format!("not valid YAML: {e}"),
                ));
                return;
            }
        };
        add_object(
            value,
            &format!("document {}", n + 1),
            objects,
            &mut |o, r| errors.push(err(o, r)),
        );
    }
}

fn add_object(
    value: serde_yaml::Value,
    position: &str,
    objects: &mut Objects,
    report: &mut dyn FnMut(String, String),
) {
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let api_version = field("apiVersion").unwrap_or_default();
    let Some(kind) = field("kind") else {
        report(position.to_string(), "has no `kind`".into());
        return;
    };
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_owned();
    let namespace = namespace.as_str();
    let object = match &name {
        // Nodes have no namespace.
        Some(name) if kind == "Node" => format!("{kind} {name}"),
        Some(name) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} ({position})"),
    };

    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_object(
                    item,
                    &format!("{position}, item {}", i + 1),
                    objects,
                    report,
                );
            }
        }
        ("v1", "Service" | "Node") | ("discovery.k8s.io/v1", "EndpointSlice") if name.is_none() => {
            report(object, "has no metadata.name".into());
        }
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(s) => objects
                .services
                .push(std::sync::Arc::new(with_namespace(s, namespace))),
            Err(e) => report(object, format!("invalid Service: {e}")),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(s) => objects
                    .endpoint_slices
                    .push(std::sync::Arc::new(with_namespace(s, namespace))),
                Err(e) => report(object, format!("invalid EndpointSlice: {e}")),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(n) => objects.nodes.push(std::sync::Arc::new(n)),
            Err(e) => report(object, format!("invalid Node: {e}")),
        },
        (_, "Service" | "EndpointSlice" | "Node") => {
            report(
                object,
                format!("unsupported apiVersion {api_version:?} for {kind}"),
            );
        }
        // Deployments and the like often share a file with their Service: not ours, not an error.
        _ => tracing::debug!(%object, "ignoring object of a kind the datapath does not use"),
    }
}

/// `kubectl apply` puts namespaceless objects in `default`; do the same so slices find their Service.
fn with_namespace<
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    mut obj: T,
    namespace: &str,
) -> T {
    obj.metadata_mut().namespace = Some(namespace.to_string());
    obj
}

/// The same object defined twice: the first (by file order) wins, the rest are reported.
fn dedupe(objects: &mut Objects, errors: &mut Vec<ManifestError>) {
    fn keep_first<T>(
        items: &mut Vec<T>,
        id: impl Fn(&T) -> String,
        errors: &mut Vec<ManifestError>,
    ) {
        let mut seen = BTreeSet::new();
        items.retain(|o| {
            let id = id(o);
            let fresh = seen.insert(id.clone());
            if !fresh {
                errors.push(ManifestError {
                    file: PathBuf::from("(directory)"),
                    object: id,
                    reason: "defined more than once; the first definition is used".into(),
                });
            }
            fresh
        });
    }
    let id = |kind: &str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        format!(
            "{kind} {}/{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or("")
        )
    };
    keep_first(
        &mut objects.services,
        |s| id("Service", &s.metadata),
        errors,
    );
    keep_first(
        &mut objects.endpoint_slices,
        |s| id("EndpointSlice", &s.metadata),
        errors,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Objects, Vec<ManifestError>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        parse_into(Path::new("x.yaml"), text, &mut objects, &mut errors);
        (objects, errors)
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []\n";

    #[test]
    fn a_node_being_deleted_is_draining() {
        let node = |extra: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-a{extra}}}\n")
        };
        let tainted = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec:\n  taints:\n  - {key: other, effect: NoSchedule}\n  - {key: ToBeDeletedByClusterAutoscaler, value: \"1764200000\", effect: NoSchedule}\n";
        let other_taint = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec:\n  taints: [{key: other, effect: NoSchedule}]\n";
        for (text, draining) in [
            (node(""), false),
            (node(", deletionTimestamp: \"2026-11-27T10:00:00Z\""), true),
            (tainted.to_string(), true),
            (other_taint.to_string(), false),
        ] {
            let (o, e) = parse(&text);
            assert!(e.is_empty(), "{e:?}");
            assert_eq!(o.node_draining("node-a"), draining, "{text}");
            assert!(
                !o.node_draining("node-b"),
                "another node's Node says nothing"
            );
        }
    }

    #[test]
    fn nodes_give_the_zone_of_the_named_node() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-1}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-c, labels: {topology.kubernetes.io/zone: \"\"}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: bad}\nspec: {unschedulable: maybe}\n";
        let (o, e) = parse(text);
        assert_eq!(o.nodes.len(), 3);
        assert_eq!(o.zone_of("node-a").as_deref(), Some("zone-1"));
        assert_eq!(o.zone_of("node-b"), None, "no label");
        assert_eq!(o.zone_of("node-c"), None, "an empty label is no zone");
        assert_eq!(o.zone_of("node-z"), None, "no such node");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].to_string().contains("Node bad") && e[0].reason.contains("invalid Node"),
            "{e:?}"
        );
    }

    #[test]
    fn multi_document_files_and_other_kinds() {
        let text = format!("{SVC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n{SLICE}---\n");
        let (o, e) = parse(&text);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.endpoint_slices.len(), 1);
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn kubectl_list_output() {
        let text = "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: prod}\n  spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {namespace: prod}\n";
        let (o, e) = parse(text);
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(e.len(), 1);
        assert!(e[0].object.contains("item 2"), "{e:?}");
        assert!(e[0].reason.contains("metadata.name"));
    }

    #[test]
    fn invalid_object_is_reported_and_its_neighbours_kept() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: eighty}]}\n";
        let text = format!("{bad}---\n{SVC}");
        let (o, e) = parse(&text);
        assert_eq!(o.services.len(), 1, "the good Service survives");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].object, "Service default/broken");
        assert!(e[0].reason.starts_with("invalid Service"), "{}", e[0]);
    }

    #[test]
    fn syntax_error_and_unsupported_versions() {
        let (o, e) = parse("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n");
        assert!(o.services.is_empty());
        assert!(e[0].reason.contains("not valid YAML"));
        let (_, e) = parse(
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\n",
        );
        assert!(e[0].reason.contains("unsupported apiVersion"));
        let (_, e) = parse("apiVersion: v1\nmetadata: {name: nokind}\n");
        assert!(e[0].reason.contains("kind"));
    }

    #[test]
    fn json_is_yaml_too() {
        let (o, e) = parse(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"ports":[{"port":1}]}}"#,
        );
        assert!(e.is_empty());
        assert_eq!(o.services.len(), 1);
    }

    #[test]
    fn directory_loading_dedupes_and_ignores_other_files() {
        let dir = std::env::temp_dir().join(format!("exposure-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.join("b.yml"), format!("{SVC}---\n{SLICE}")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "{{{").unwrap();
        let (o, e) = load_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.endpoint_slices.len(), 1);
        assert_eq!(e.len(), 1);
        assert!(e[0].reason.contains("more than once"));
    }
}
