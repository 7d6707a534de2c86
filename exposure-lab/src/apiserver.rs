//! A test Kubernetes API server that speaks the real list/watch protocol over HTTP, for the objects the
//! agent reads (Services, EndpointSlices, Nodes):
//! - lists with `resourceVersion` and `limit`/`continue` paging;
//! - chunked watch streams from a resourceVersion: replayed history, then live events, periodic
//!   BOOKMARKs (`allowWatchBookmarks`), ending after `timeoutSeconds`;
//! - `410 Gone` ("too old resource version") once history before the requested version is compacted;
//! - `labelSelector` (`key`, `!key`, `key=value`, `key!=value`) and the agent's `fieldSelector` on
//!   lists and watches; in a watch, an object that stops matching is DELETED and one that starts
//!   matching is ADDED, as the API server's watch cache sends them;
//! - faults on demand: an outage (connections dropped), HTTP 500s, slow responses, dropped watches.
//!
//! One global resourceVersion counter orders every change, as etcd does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    ops::Bound,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

/// The kinds served, with their list paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }
    fn of(obj: &Value) -> Option<Self> {
        match obj["kind"].as_str()? {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Node => ("v1", "NodeList"),
        }
    }
    fn item(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "Service"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Kind::Node => ("v1", "Node"),
        }
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
    /// The object before this change (a MODIFIED's or DELETED's), for selectors.
    prev: Option<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version at or below this get 410 Gone.
    compacted: u64,
    down: bool,
    fail_next: u32,
    delay: Duration,
    watches_started: u64,
    /// Every `labelSelector` asked for, per kind ("" for none).
    label_selectors: BTreeMap<Kind, BTreeSet<String>>,
}

/// Handle to control a running test API server.
#[derive(Clone)]
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
    /// Dropping all watch streams: bump to make every open stream end abruptly.
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

fn key_of(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    (kind, ns, name)
}

impl ApiServer {
    /// Starts serving on `bind` (port 0: any) on the given runtime. The listening socket belongs to
    /// the network namespace of the calling thread.
    pub fn start(rt: &tokio::runtime::Handle, bind: SocketAddr) -> std::io::Result<Self> {
        let listener = rt.block_on(TcpListener::bind(bind))?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(65_536);
        let (cut, _) = tokio::sync::watch::channel(0);
        let server = ApiServer {
            addr,
            state: Arc::default(),
            events,
            cut: Arc::new(cut),
        };
        let s = server.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move { s.handle(stream).await });
            }
        });
        Ok(server)
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.addr
        )
    }

    /// Creates or replaces an object (a full manifest with apiVersion/kind), as `kubectl apply` would.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = Kind::of(&obj).expect("a Service, EndpointSlice or Node");
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if kind != Kind::Node && obj["metadata"]["namespace"].is_null() {
            obj["metadata"]["namespace"] = json!("default");
        }
        let key = key_of(kind, &obj);
        let prev = st.objects.insert(key, obj.clone());
        let event = if prev.is_some() { "MODIFIED" } else { "ADDED" };
        let change = Change {
            rv,
            kind,
            event,
            object: obj,
            prev,
        };
        st.history.push(change.clone());
        let _ = self.events.send(change);
        rv
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        let Some(mut obj) = st
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            kind,
            event: "DELETED",
            object: obj.clone(),
            prev: Some(obj),
        };
        st.history.push(change.clone());
        let _ = self.events.send(change);
        true
    }

    /// Forgets history: watches from any version before now get 410 Gone and must re-list.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// An outage: every open connection is cut and new ones are dropped until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        if down {
            self.drop_watches();
        }
    }

    /// Ends every open watch stream abruptly (no final chunk), as a dying load balancer would.
    pub fn drop_watches(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// The next `n` requests get HTTP 500.
    pub fn fail_next(&self, n: u32) {
        self.state.lock().unwrap().fail_next = n;
    }

    /// Every response waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    pub fn watches_started(&self) -> u64 {
        self.state.lock().unwrap().watches_started
    }

    /// The label selectors lists and watches of this kind have asked for ("" for none).
    pub fn label_selectors(&self, kind: Kind) -> BTreeSet<String> {
        let st = self.state.lock().unwrap();
        st.label_selectors.get(&kind).cloned().unwrap_or_default()
    }

    async fn handle(&self, mut stream: TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 65_536 {
                return;
            }
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();

        let (down, fail, delay) = {
            let mut st = self.state.lock().unwrap();
            let fail = st.fail_next > 0;
            if fail {
                st.fail_next -= 1;
            }
            (st.down, fail, st.delay)
        };
        if down {
            return; // connection dropped without a response
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fail {
            let body = status(500, "InternalError", "injected failure");
            let _ = respond(&mut stream, 500, &body).await;
            return;
        }
        let Some(kind) = Kind::from_path(path) else {
            let _ = respond(
                &mut stream,
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )
            .await;
            return;
        };
        let selector = params.get("labelSelector").cloned().unwrap_or_default();
        let valid = labels_match(&selector, &Value::Null);
        (self.state.lock().unwrap().label_selectors)
            .entry(kind)
            .or_default()
            .insert(selector);
        if let Err(e) = valid {
            let _ = respond(&mut stream, 400, &status(400, "BadRequest", &e)).await;
            return;
        }
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            self.watch(stream, kind, &params).await;
        } else {
            let body = self.list(kind, &params);
            let _ = respond(&mut stream, 200, &body).await;
        }
    }

    fn matches(kind: Kind, obj: &Value, params: &BTreeMap<String, String>) -> bool {
        // The agent asks for its own Node with fieldSelector=metadata.name=NAME.
        let fields = match params
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
        {
            Some(name) if kind == Kind::Node => obj["metadata"]["name"].as_str() == Some(name),
            _ => true,
        };
        fields
            && params
                .get("labelSelector")
                .is_none_or(|s| labels_match(s, &obj["metadata"]["labels"]) == Ok(true))
    }

    /// A change as a watch with these selectors sees it, as the API server's watch cache sends it:
    /// the event for an object that matched before or matches now, none for one that did neither.
    fn seen_by(kind: Kind, c: &Change, params: &BTreeMap<String, String>) -> Option<Value> {
        let now = c.event != "DELETED" && Self::matches(kind, &c.object, params);
        let before = c
            .prev
            .as_ref()
            .is_some_and(|p| Self::matches(kind, p, params));
        let (event, object) = match (before, now) {
            (false, false) => return None,
            (false, true) => ("ADDED", c.object.clone()),
            (true, true) => ("MODIFIED", c.object.clone()),
            // The object as it was, at this change's version.
            (true, false) => {
                let mut prev = c.prev.clone().unwrap_or_default();
                prev["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                ("DELETED", prev)
            }
        };
        Some(json!({"type": event, "object": object}))
    }

    fn list(&self, kind: Kind, params: &BTreeMap<String, String>) -> Value {
        let st = self.state.lock().unwrap();
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        // As a real API server's, the token names the last key listed: the next page starts
        // after it, so a full list costs its objects once, not once per page.
        let after: Option<(Kind, String, String)> = params
            .get("continue")
            .and_then(|c| c.split_once(':'))
            .and_then(|(_, key)| key.split_once('/'))
            .map(|(ns, name)| (kind, ns.to_string(), name.to_string()));
        let from = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let mut matching = st
            .objects
            .range((from, Bound::Unbounded))
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|(_, o)| Self::matches(kind, o, params));
        let page: Vec<(&(Kind, String, String), Value)> = matching
            .by_ref()
            .take(limit)
            .map(|(key, o)| {
                // Real list items carry no apiVersion/kind.
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                (key, o)
            })
            .collect();
        let mut meta = json!({"resourceVersion": st.rv.to_string()});
        if let (Some(((_, ns, name), _)), Some(_)) = (page.last(), matching.next()) {
            meta["continue"] = json!(format!("{}:{ns}/{name}", st.rv));
        }
        let page: Vec<Value> = page.into_iter().map(|(_, o)| o).collect();
        let (api_version, list_kind) = kind.list_kind();
        json!({"apiVersion": api_version, "kind": list_kind, "metadata": meta, "items": page})
    }

    async fn watch(&self, mut stream: TcpStream, kind: Kind, params: &BTreeMap<String, String>) {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let bookmarks = params
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(Duration::from_secs(30), |t| Duration::from_secs(t.min(30)));
        let mut live = self.events.subscribe();
        let mut cut = self.cut.subscribe();
        let (replay, gone, current) = {
            let mut st = self.state.lock().unwrap();
            st.watches_started += 1;
            let gone = from != 0 && from < st.compacted;
            let replay: Vec<Change> = if from == 0 {
                // No version: the current state as ADDED events, then changes (watch "Any").
                st.objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == kind && Self::matches(kind, o, params))
                    .map(|(_, o)| Change {
                        rv: st.rv,
                        kind,
                        event: "ADDED",
                        object: o.clone(),
                        prev: None,
                    })
                    .collect()
            } else {
                st.history
                    .iter()
                    .filter(|c| c.rv > from && c.kind == kind)
                    .cloned()
                    .collect()
            };
            (replay, gone, st.rv)
        };
        let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        if stream.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        if gone {
            let err = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({})", current))});
            let _ = chunk(&mut stream, &err).await;
            let _ = stream.write_all(b"0\r\n\r\n").await;
            return;
        }
        let mut last = from.max(current);
        for event in replay.iter().filter_map(|c| Self::seen_by(kind, c, params)) {
            if chunk(&mut stream, &event).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                // A cut wins over anything else ready at the same time: nothing leaks past an outage.
                biased;
                _ = cut.changed() => return, // abrupt end: no terminating chunk
                _ = tokio::time::sleep_until(deadline) => break,
                _ = bookmark.tick(), if bookmarks => {
                    let (api_version, k) = kind.item();
                    let rv = self.state.lock().unwrap().rv.max(last);
                    let ev = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": k, "metadata": {"resourceVersion": rv.to_string()}}});
                    if chunk(&mut stream, &ev).await.is_err() { return; }
                }
                change = live.recv() => match change {
                    Ok(c) if c.kind == kind && c.rv > last => {
                        last = c.rv;
                        let Some(event) = Self::seen_by(kind, &c, params) else { continue };
                        if chunk(&mut stream, &event).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
}

/// Whether `labels` (an object's `metadata.labels`) satisfy a label selector of comma-separated
/// requirements, each `key`, `!key`, `key=value`, `key==value` or `key!=value`; set-based ones
/// (`in`, `notin`) are not served.
fn labels_match(selector: &str, labels: &Value) -> Result<bool, String> {
    let mut all = true;
    for requirement in selector.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let label = |key: &str| labels.get(key.trim()).and_then(Value::as_str);
        let holds = if let Some((key, value)) = requirement.split_once("!=") {
            label(key) != Some(value.trim())
        } else if let Some((key, value)) = requirement
            .split_once("==")
            .or_else(|| requirement.split_once('='))
        {
            label(key) == Some(value.trim())
        } else if requirement.contains(' ') || requirement.contains('(') {
            return Err(format!(
                "unsupported label selector requirement {requirement:?}"
            ));
        } else if let Some(key) = requirement.strip_prefix('!') {
            labels.get(key.trim()).is_none()
        } else {
            labels.get(requirement).is_some()
        };
        all &= holds;
    }
    Ok(all)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

async fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    stream
        .write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await?;
    stream.flush().await
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_field_selectors() {
        assert_eq!(
            percent_decode("metadata.name%3Dnode-1"),
            "metadata.name=node-1"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}

#[cfg(test)]
mod protocol_tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn svc(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": {}})
    }

    #[test]
    fn lists_pages_and_outages() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = ApiServer::start(rt.handle(), "127.0.0.1:0".parse().unwrap()).unwrap();
        for n in ["a", "b", "c"] {
            api.apply(svc(n));
        }
        let page = get(api.addr, "/api/v1/services?limit=2");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        let body: Value = serde_json::from_str(page.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["items"].as_array().unwrap().len(), 2);
        assert_eq!(body["metadata"]["resourceVersion"], "3");
        let token = body["metadata"]["continue"].as_str().unwrap().to_string();
        // A listed object deleted meanwhile moves nothing: the token names where the page ended.
        assert!(api.delete(Kind::Service, "default", "a"));
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}));
        let rest = get(
            api.addr,
            &format!("/api/v1/services?limit=2&continue={token}"),
        );
        let body: Value = serde_json::from_str(rest.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["items"][0]["metadata"]["name"], "c");
        assert_eq!(body["items"].as_array().unwrap().len(), 1, "no Node");
        assert!(body["metadata"].get("continue").is_none(), "the last page");
        assert!(
            body["items"][0].get("kind").is_none(),
            "list items carry no kind"
        );

        api.set_down(true);
        assert_eq!(
            get(api.addr, "/api/v1/services"),
            "",
            "outage: connection dropped without an answer"
        );
        api.set_down(false);
        api.fail_next(1);
        assert!(get(api.addr, "/api/v1/services").starts_with("HTTP/1.1 500"));
        assert!(get(api.addr, "/api/v1/services").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn watches_replay_and_expire() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = ApiServer::start(rt.handle(), "127.0.0.1:0".parse().unwrap()).unwrap();
        api.apply(svc("a"));
        api.apply(svc("b"));
        api.delete(Kind::Service, "default", "a");
        let w = get(
            api.addr,
            "/api/v1/services?watch=true&resourceVersion=1&timeoutSeconds=1",
        );
        let events: Vec<&str> = w.lines().filter(|l| l.starts_with('{')).collect();
        assert_eq!(events.len(), 2, "{w}");
        assert!(events[0].contains("\"ADDED\"") && events[0].contains("\"b\""));
        assert!(events[1].contains("\"DELETED\""));
        api.compact();
        api.apply(svc("c"));
        let w = get(
            api.addr,
            "/api/v1/services?watch=true&resourceVersion=2&timeoutSeconds=1",
        );
        assert!(w.contains("\"code\":410"), "{w}");
        let w = get(api.addr, "/api/v1/services?watch=true&resourceVersion=4&timeoutSeconds=1&allowWatchBookmarks=true");
        assert!(w.contains("\"BOOKMARK\""), "{w}");
    }

    #[test]
    fn label_selectors_filter_lists_and_turn_watch_events_into_entering_and_leaving() {
        assert_eq!(labels_match("!a,b=1", &json!({"b": "1"})), Ok(true));
        assert_eq!(
            labels_match("!a,b=1", &json!({"a": "", "b": "1"})),
            Ok(false)
        );
        assert_eq!(labels_match("b==1,c!=2", &json!({"b": "1"})), Ok(true));
        assert_eq!(labels_match("b!=1", &json!({"b": "1"})), Ok(false));
        assert_eq!(labels_match("a", &json!({})), Ok(false));
        assert!(labels_match("a in (x)", &Value::Null).is_err());

        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = ApiServer::start(rt.handle(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let labelled = |name: &str, labels: Value| {
            let mut s = svc(name);
            s["metadata"]["labels"] = labels;
            s
        };
        api.apply(svc("plain"));
        api.apply(labelled("other", json!({"proxy": "x"})));
        let selector = "labelSelector=%21proxy";
        let list = get(api.addr, &format!("/api/v1/services?{selector}"));
        assert!(
            list.contains("\"plain\"") && !list.contains("\"other\""),
            "{list}"
        );
        assert_eq!(
            api.label_selectors(Kind::Service),
            BTreeSet::from(["!proxy".into()])
        );
        assert!(get(api.addr, "/api/v1/services?labelSelector=a%20in%20(b)")
            .starts_with("HTTP/1.1 400"));

        api.apply(labelled("plain", json!({"proxy": "x"}))); // leaves the selection
        api.apply(labelled("plain", json!({"proxy": "x", "more": "1"}))); // unseen
        api.apply(labelled("other", json!({}))); // enters it
        api.apply(labelled("other", json!({"more": "1"})));
        api.delete(Kind::Service, "default", "plain"); // unseen: it did not match
        api.delete(Kind::Service, "default", "other");
        let w = get(
            api.addr,
            &format!("/api/v1/services?watch=true&resourceVersion=2&timeoutSeconds=1&{selector}"),
        );
        let events: Vec<Value> = w
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<(&str, &str, &str)> = events
            .iter()
            .map(|e| {
                let meta = &e["object"]["metadata"];
                (
                    e["type"].as_str().unwrap(),
                    meta["name"].as_str().unwrap(),
                    meta["resourceVersion"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("DELETED", "plain", "3"),
                ("ADDED", "other", "5"),
                ("MODIFIED", "other", "6"),
                ("DELETED", "other", "8"),
            ]
        );
        assert!(
            events[0]["object"]["metadata"]["labels"].is_null(),
            "a leaving object is sent as it was: {}",
            events[0]
        );
    }
}
