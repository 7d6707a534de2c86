//! The manifest-directory source: Kubernetes YAML/JSON as `kubectl get -o yaml` writes it (single
//! objects, multi-document files, or `kind: List`). A file or object that is broken is reported;
//! what it held before stays in use (as the API server keeps an object whose update it rejects),
//! and everything else keeps working.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize;

use crate::endpoint_slice::EndpointSlice;

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
    fn extend(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().cloned());
        self.endpoint_slices
            .extend(other.endpoint_slices.iter().cloned());
        self.nodes.extend(other.nodes.iter().cloned());
    }

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
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// What a manifest file looked like when listed: a file whose stamp changes is read again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// A file replaced by a rename (an atomic write) is another inode.
    inode: u64,
}

/// The manifest files in `dir` with their stamps.
fn stamps(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
    Ok(manifest_files(dir)?
        .into_iter()
        .filter_map(|p| {
            // Gone since the listing: as if it had not been listed.
            let meta = std::fs::metadata(&p).ok()?;
            let stamp = Stamp {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: meta.ino(),
            };
            Some((p, stamp))
        })
        .collect())
}

/// One file's contribution: the objects it last gave (while it is broken, those it gave before)
/// and the problems found in the reading that gave them.
#[derive(Clone, Debug)]
struct LoadedFile {
    stamp: Stamp,
    objects: Objects,
    errors: Vec<ManifestError>,
    /// Why the file as it is now could not be read or parsed.
    broken: Option<ManifestError>,
}

/// The manifest directory as the agent reads it. A changed file is read once it has stayed the same
/// for one poll, so a file caught half-written (`kubectl get -o yaml > file` truncates it first
/// and writes once the API server answers) is not taken for its contents. A file that cannot be
/// read or does not parse keeps giving what it gave before, and an object that became invalid its
/// last valid version: a broken edit never takes a working Service away.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    /// Whether the directory has been read once (its files are read at once the first time).
    read_once: bool,
    files: BTreeMap<PathBuf, LoadedFile>,
    /// Files seen changed at the last poll, as they were then.
    changing: BTreeMap<PathBuf, Stamp>,
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        ManifestDir {
            dir: dir.to_path_buf(),
            read_once: false,
            files: BTreeMap::new(),
            changing: BTreeMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory has been read (a poll succeeded).
    pub fn read_once(&self) -> bool {
        self.read_once
    }

    /// Looks at the directory: reads the files that changed and have since settled, forgets the
    /// removed ones. Whether the objects changed. An error (the directory is gone or unreadable)
    /// changes nothing.
    pub fn poll(&mut self) -> std::io::Result<bool> {
        let now = stamps(&self.dir)?;
        let mut changed = false;
        self.files.retain(|path, _| {
            let kept = now.contains_key(path);
            changed |= !kept;
            kept
        });
        self.changing.retain(|path, _| now.contains_key(path));
        for (path, stamp) in now {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                self.changing.remove(&path);
                continue;
            }
            if self.read_once && self.changing.get(&path) != Some(&stamp) {
                self.changing.insert(path, stamp);
                continue;
            }
            self.changing.remove(&path);
            let file = self.read(&path, stamp);
            self.files.insert(path, file);
            changed = true;
        }
        changed |= !self.read_once;
        self.read_once = true;
        Ok(changed)
    }

    /// Everything the directory says now, duplicates removed, and the problems found.
    pub fn objects(&self) -> (Objects, Vec<ManifestError>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for file in self.files.values() {
            objects.extend(&file.objects);
            errors.extend(file.broken.iter().chain(&file.errors).cloned());
        }
        dedupe(&mut objects, &mut errors);
        (objects, errors)
    }

    fn read(&self, path: &Path, stamp: Stamp) -> LoadedFile {
        let before = self.files.get(path);
        // A file that can't be read, or whose YAML breaks off, gives what it gave before.
        let as_before = |error: ManifestError| match before {
            Some(before) => LoadedFile {
                stamp: stamp.clone(),
                broken: Some(ManifestError {
                    reason: format!("{}; what the file gave before stays in use", error.reason),
                    ..error
                }),
                ..before.clone()
            },
            None => LoadedFile {
                stamp: stamp.clone(),
                objects: Objects::default(),
                errors: Vec::new(),
                broken: Some(error),
            },
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                return as_before(ManifestError {
                    file: path.to_path_buf(),
                    object: "(file)".into(),
                    reason: format!("cannot read: {e}"),
                })
            }
        };
        let mut parsed = parse_file(path, &text);
        if let Some(at) = parsed.broken_at {
            if before.is_some() {
                return as_before(parsed.errors.swap_remove(at));
            }
        }
        for (id, at) in parsed.invalid {
            if self.carry_over(&id, &mut parsed.objects) {
                parsed.errors[at]
                    .reason
                    .push_str("; its last valid version stays in use");
            }
        }
        LoadedFile {
            stamp,
            objects: parsed.objects,
            errors: parsed.errors,
            broken: None,
        }
    }

    /// Adds the object `id` names, as the directory gave it so far, to `into`: whether there was one.
    fn carry_over(&self, id: &ObjectId, into: &mut Objects) -> bool {
        fn find<'a, T: k8s_openapi::Metadata<Ty = ObjectMeta> + 'a>(
            mut all: impl Iterator<Item = &'a Arc<T>>,
            id: &ObjectId,
            into: &mut Vec<Arc<T>>,
        ) -> bool {
            let found = all.find(|o| {
                let m = o.metadata();
                m.name.as_deref() == Some(id.name.as_str())
                    && m.namespace.as_deref().unwrap_or("") == id.namespace
            });
            found.map(|o| into.push(o.clone())).is_some()
        }
        let all = || self.files.values().map(|f| &f.objects);
        match id.kind {
            Kind::Service => find(all().flat_map(|o| &o.services), id, &mut into.services),
            Kind::EndpointSlice => find(
                all().flat_map(|o| &o.endpoint_slices),
                id,
                &mut into.endpoint_slices,
            ),
            Kind::Node => find(all().flat_map(|o| &o.nodes), id, &mut into.nodes),
        }
    }
}

type ObjectMeta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// Which object a document meant to be, as far as it says: its last valid version can stand in.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ObjectId {
    kind: Kind,
    /// Empty for a Node.
    namespace: String,
    name: String,
}

/// One file's documents, parsed.
#[derive(Default)]
struct ParsedFile {
    objects: Objects,
    errors: Vec<ManifestError>,
    /// Named objects that are invalid, each with the index of its error.
    invalid: Vec<(ObjectId, usize)>,
    /// The index of the error where the YAML stream broke off (nothing after it could be read).
    broken_at: Option<usize>,
}

/// Parses one file's documents, reporting what can't be used.
fn parse_file(file: &Path, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    for (n, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document, e.g. a trailing `---`
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: nothing after it in this file can be trusted.
                parsed.broken_at = Some(parsed.errors.len());
                parsed.errors.push(ManifestError {
                    file: file.to_path_buf(),
                    object: format!("document {}", n + 1),
                    reason: format!("not valid YAML: {e}"),
                });
                break;
            }
        };
        let ParsedFile {
            objects,
            errors,
            invalid,
            ..
        } = &mut parsed;
        add_object(
            value,
            &format!("document {}", n + 1),
            objects,
            &mut |object, reason, id| {
                if let Some(id) = id {
                    invalid.push((id, errors.len()));
                }
                errors.push(ManifestError {
                    file: file.to_path_buf(),
                    object,
                    reason,
                });
            },
        );
    }
    parsed
}

/// Reports a problem with an object: its description, the reason, and which object it is when
/// it says (an invalid object whose last valid version can stand in).
type Report<'a> = dyn FnMut(String, String, Option<ObjectId>) + 'a;

fn add_object(
    value: serde_yaml::Value,
    position: &str,
    objects: &mut Objects,
    report: &mut Report,
) {
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let api_version = field("apiVersion").unwrap_or_default();
    let Some(kind) = field("kind") else {
        report(position.to_string(), "has no `kind`".into(), None);
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
    let id = |kind: Kind| {
        Some(ObjectId {
            kind,
            namespace: if kind == Kind::Node {
                String::new()
            } else {
                namespace.to_owned()
            },
            name: name.clone()?,
        })
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
            report(object, "has no metadata.name".into(), None);
        }
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(s) => objects
                .services
                .push(Arc::new(with_namespace(s, namespace))),
            Err(e) => report(object, format!("invalid Service: {e}"), id(Kind::Service)),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_yaml::from_value::<EndpointSlice>(value) {
                Ok(s) => objects
                    .endpoint_slices
                    .push(Arc::new(with_namespace(s, namespace))),
                Err(e) => report(
                    object,
                    format!("invalid EndpointSlice: {e}"),
                    id(Kind::EndpointSlice),
                ),
            }
        }
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(n) => objects.nodes.push(Arc::new(n)),
            Err(e) => report(object, format!("invalid Node: {e}"), id(Kind::Node)),
        },
        (_, "Service" | "EndpointSlice" | "Node") => {
            report(
                object,
                format!("unsupported apiVersion {api_version:?} for {kind}"),
                None,
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
        let parsed = parse_file(Path::new("x.yaml"), text);
        (parsed.objects, parsed.errors)
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

    /// A directory of its own for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("exposure-manifests-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: impl AsRef<[u8]>) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The node ports of the directory's Services, by name.
    fn node_ports(dir: &ManifestDir) -> BTreeMap<String, i32> {
        dir.objects()
            .0
            .services
            .iter()
            .map(|s| {
                let port = s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port;
                (s.metadata.name.clone().unwrap(), port.unwrap_or(0))
            })
            .collect()
    }

    fn web(node_port: u16) -> String {
        SVC.replace("30080", &node_port.to_string())
    }

    #[test]
    fn directory_loading_dedupes_and_ignores_other_files() {
        let tmp = TempDir::new("dedupe");
        tmp.write("a.yaml", SVC);
        tmp.write("b.yml", format!("{SVC}---\n{SLICE}"));
        tmp.write("notes.txt", "not a manifest");
        tmp.write(".hidden.yaml", "{{{");
        let mut dir = ManifestDir::new(&tmp.0);
        assert!(dir.poll().unwrap(), "the first poll reads every file");
        let (o, e) = dir.objects();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.endpoint_slices.len(), 1);
        assert_eq!(e.len(), 1);
        assert!(e[0].reason.contains("more than once"));
        assert!(!dir.poll().unwrap(), "nothing changed");
    }

    #[test]
    fn a_changed_file_is_read_once_it_has_settled() {
        let tmp = TempDir::new("settle");
        tmp.write("web.yaml", web(30080));
        let mut dir = ManifestDir::new(&tmp.0);
        assert!(dir.poll().unwrap());
        // `kubectl get -o yaml > web.yaml`: the shell empties the file, kubectl writes it later.
        tmp.write("web.yaml", "");
        assert!(!dir.poll().unwrap(), "a file just changed is not read yet");
        assert_eq!(node_ports(&dir), BTreeMap::from([("web".into(), 30080)]));
        tmp.write("web.yaml", web(30081));
        assert!(!dir.poll().unwrap(), "changed again since the last poll");
        assert_eq!(node_ports(&dir), BTreeMap::from([("web".into(), 30080)]));
        assert!(dir.poll().unwrap(), "the same as at the last poll: read");
        assert_eq!(node_ports(&dir), BTreeMap::from([("web".into(), 30081)]));
        // A new file settles the same way; a removed one goes at once.
        tmp.write("other.yaml", web(30090).replace("name: web", "name: other"));
        assert!(!dir.poll().unwrap());
        assert!(dir.poll().unwrap());
        assert_eq!(node_ports(&dir).get("other"), Some(&30090));
        std::fs::remove_file(tmp.0.join("web.yaml")).unwrap();
        assert!(dir.poll().unwrap(), "a removed file's objects go at once");
        assert_eq!(node_ports(&dir), BTreeMap::from([("other".into(), 30090)]));
        // An empty file that stays empty is read: its objects are gone.
        tmp.write("other.yaml", "");
        assert!(!dir.poll().unwrap());
        assert!(dir.poll().unwrap());
        assert!(node_ports(&dir).is_empty());
    }

    /// Polls until the directory has read its changes.
    fn settle(dir: &mut ManifestDir) {
        assert!(!dir.poll().unwrap());
        assert!(dir.poll().unwrap());
    }

    #[test]
    fn a_broken_file_keeps_giving_what_it_gave_before() {
        let tmp = TempDir::new("broken");
        tmp.write("web.yaml", format!("{}---\n{SLICE}", web(30080)));
        let mut dir = ManifestDir::new(&tmp.0);
        dir.poll().unwrap();
        for broken in [
            // Half written: cut inside a document's braces.
            format!(
                "{}---\n{}",
                web(30081),
                &SLICE[..SLICE.find("labels").unwrap()]
            )
            .into_bytes(),
            b"apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n".to_vec(),
            // Not UTF-8: the file can't be read as text.
            vec![0xff, 0xfe, b'\n'],
        ] {
            tmp.write("web.yaml", &broken);
            settle(&mut dir);
            let (o, e) = dir.objects();
            assert_eq!(node_ports(&dir), BTreeMap::from([("web".into(), 30080)]));
            assert_eq!(o.endpoint_slices.len(), 1, "the slice stays too");
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].reason
                    .contains("what the file gave before stays in use")
                    && (e[0].reason.contains("not valid YAML")
                        || e[0].reason.contains("cannot read")),
                "{}",
                e[0]
            );
        }
        tmp.write("web.yaml", web(30082));
        settle(&mut dir);
        let (o, e) = dir.objects();
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(node_ports(&dir), BTreeMap::from([("web".into(), 30082)]));
        assert!(o.endpoint_slices.is_empty(), "the fixed file has no slice");
        // A file broken from the start gives what parses before the break.
        tmp.write(
            "new.yaml",
            format!(
                "{}---\n{{{{{{",
                web(30083).replace("name: web", "name: new")
            ),
        );
        settle(&mut dir);
        assert_eq!(node_ports(&dir).get("new"), Some(&30083));
    }

    #[test]
    fn an_invalid_object_keeps_its_last_valid_version() {
        let tmp = TempDir::new("invalid");
        let other = web(30090).replace("name: web", "name: other");
        tmp.write("web.yaml", format!("{}---\n{other}", web(30080)));
        let mut dir = ManifestDir::new(&tmp.0);
        dir.poll().unwrap();
        let bad = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: eighty}}]}}\n")
        };
        // `web` turns invalid, `other` changes, `fresh` is invalid from the start.
        tmp.write(
            "web.yaml",
            format!(
                "{}---\n{}---\n{}",
                bad("web"),
                other.replace("30090", "30091"),
                bad("fresh")
            ),
        );
        settle(&mut dir);
        let (_, e) = dir.objects();
        assert_eq!(
            node_ports(&dir),
            BTreeMap::from([("web".into(), 30080), ("other".into(), 30091)])
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].object == "Service default/web"
                && e[0].reason.contains("its last valid version stays in use"),
            "{}",
            e[0]
        );
        assert!(
            e[1].object == "Service default/fresh" && !e[1].reason.contains("stays in use"),
            "{}",
            e[1]
        );
        // Still invalid at the next change: still the last valid version.
        tmp.write("web.yaml", format!("{}---\n{other}", bad("web")));
        settle(&mut dir);
        assert_eq!(
            node_ports(&dir),
            BTreeMap::from([("web".into(), 30080), ("other".into(), 30090)])
        );
        // Its last valid version is also found in another file it moved from.
        tmp.write("moved.yaml", bad("other"));
        tmp.write("web.yaml", web(30080));
        settle(&mut dir);
        assert_eq!(
            node_ports(&dir),
            BTreeMap::from([("web".into(), 30080), ("other".into(), 30090)])
        );
    }
}
