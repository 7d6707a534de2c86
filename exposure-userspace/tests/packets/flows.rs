//! Flows over time: seeded random sequences of a few dozen clients' TCP and UDP packets to a
//! NodePort and an LB IP (each client port to both), their backends' answers (also late ones, of flows that have moved on), changes to the
//! Service's endpoints, and time passing (the entries aged), through the XDP and tc egress
//! programs, checked packet by packet against a model of what kube-proxy's conntrack and NAT
//! would do:
//!
//! - a flow keeps its backend and SNAT port until it closes (RST, or FIN both ways) and the
//!   client's next SYN starts a new one, or its lifetime passes (by its state: closing, a
//!   handshake, a UDP exchange or stream); a UDP flow leaves an endpoint that left, and stays
//!   with one that takes no new flows but still serves;
//! - a new flow gets a current endpoint, or a refusal when there is none;
//! - a SNAT port goes to a new flow only if no open flow to that backend holds it (a closed one's
//!   is taken over at once), and a new flow is dropped for want of one only when all are held; a
//!   new flow to a local pod is dropped only when the client's open flow through the other
//!   frontend holds the tuple there;
//! - every answer goes back, from the frontend, to the client whose flow holds its tuple now, and
//!   only that flow's state follows it; an answer on the tuple of a flow that is over is the
//!   kernel's, untouched;
//! - every entry's connection state is the model's;
//! - while the Service is removed, its UDP frontends are gone and its TCP ones drain: only the
//!   flows that are not over go on (answers too), anything else is the kernel's, untouched; a
//!   drain ends exactly when no flow through the frontend is left.
//!
//! Four SNAT ports per backend, so they run out and are taken over often. In IPv4, and in IPv6
//! (whose flows and replies have maps and keys of their own).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::*;

const STEPS: usize = 8_000;
const SEED: u64 = 0xf10e_5eed_0dd5_0001;
const SNAT_FIRST: u16 = 61_000;
const SNAT_LAST: u16 = 61_003;
/// What clients send: mostly the usual, now and then a SYN on a flow that is open.
const CLIENT_FLAGS: [u8; 7] = [SYN, ACK, 0x18, FIN | ACK, RST, RST | ACK, SYN];
const BACKEND_FLAGS: [u8; 5] = [SYN | ACK, ACK, 0x18, FIN | ACK, RST | ACK];

/// A client's flow: (protocol, address, port, and the frontend it sends to).
type ClientKey = (u8, IpAddr, u16, (IpAddr, u16));
/// Where a flow's answers arrive: (protocol, backend, the address and port it answers to: the
/// node's SNAT port for a remote backend, the client's for a local one).
type ReplyKey = (u8, IpAddr, IpAddr, u16);

/// The addresses of one family's run.
#[derive(Clone)]
struct Family {
    node: IpAddr,
    /// The Service's frontends: its NodePort, and its LB IP (a client may reach both from one port).
    frontends: [(IpAddr, u16); 2],
    /// The first is the local pod on `lxc1`, the interface listed for the redirect modes.
    locals: [IpAddr; 2],
    remotes: [IpAddr; 3],
    clients: Vec<(IpAddr, u16)>,
}

impl Family {
    fn v4() -> Family {
        Family {
            node: NODE.into(),
            frontends: [(NODE.into(), NODE_PORT), (LB.into(), 60000)],
            locals: [LOCAL_POD.into(), Ipv4Addr::new(198, 19, 1, 3).into()],
            remotes: [
                REMOTE_POD.into(),
                Ipv4Addr::new(198, 19, 2, 3).into(),
                Ipv4Addr::new(198, 19, 2, 4).into(),
            ],
            clients: (0..6u16)
                .flat_map(|i| (0..3u16).map(move |p| (nth_client(1, i).into(), 40_000 + p)))
                .collect(),
        }
    }

    fn v6() -> Family {
        let pod = |node: u16, n: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, node, 0, 0, 0, n));
        Family {
            node: NODE6.into(),
            frontends: [(NODE6.into(), NODE_PORT), (LB6.into(), 60000)],
            locals: [LOCAL_POD6.into(), pod(1, 3)],
            remotes: [REMOTE_POD6.into(), pod(2, 3), pod(2, 4)],
            clients: (0..6u16)
                .flat_map(|i| {
                    let ip = Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, 1 + i);
                    (0..3u16).map(move |p| (ip.into(), 40_000 + p))
                })
                .collect(),
        }
    }
}

/// The state both directions' entries carry: the datapath's connection bits (`FLOW_*`), and how
/// long ago the entry was last refreshed as far as the test has aged the entries (in steps of
/// 10 s, as are the lifetimes it meets: the few seconds the test itself runs never tip one).
#[derive(Clone, Copy, Debug)]
struct Conn {
    bits: u32,
    age_s: u64,
}

/// The bits the datapath keeps track of.
const CONN_BITS: u32 = FLOW_CLOSING
    | exposure_common::FLOW_FIN_CLIENT
    | exposure_common::FLOW_FIN_BACKEND
    | FLOW_OPENING
    | FLOW_REPLIED
    | FLOW_ESTABLISHED;

impl Conn {
    /// A new flow's, from its first packet.
    fn new(proto: u8, flags: u8) -> Conn {
        Conn {
            bits: FLOW_OPENING | exposure_common::conn_bits(proto, flags, true, 0),
            age_s: 0,
        }
    }

    fn closing(&self) -> bool {
        exposure_common::flow_closing(self.bits)
    }

    /// Whether its flow still holds its tuple: neither over nor a closed TCP connection.
    fn holds_tuple(&self, proto: u8) -> bool {
        !(proto == TCP && self.closing()) && self.alive(proto)
    }

    fn alive(&self, proto: u8) -> bool {
        let phase = exposure_common::flow_phase(proto, self.bits);
        self.age_s * 1_000_000_000 < exposure_common::FlowLifetimes::DEFAULT.ns[phase as usize]
    }
}

/// A packet on entry `seen`, whose other direction's entry is `other` (if still linked): both
/// take the packet's bits when it brings new ones, or when `seen` is due a refresh (once a
/// second in the datapath: here, once the test aged it).
fn touch(seen: &mut Conn, other: Option<&mut Conn>, proto: u8, flags: u8, from_client: bool) {
    let bits = exposure_common::conn_bits(proto, flags, from_client, seen.bits);
    if bits & !seen.bits == 0 && seen.age_s == 0 {
        return;
    }
    for conn in std::iter::once(seen).chain(other) {
        conn.bits |= bits;
        conn.age_s = 0;
    }
}

/// A client's flow as the datapath keeps it.
#[derive(Clone, Copy, Debug)]
struct Flow {
    backend: IpAddr,
    /// The node's port towards a remote backend.
    snat: Option<u16>,
    /// The backend's generation when the flow chose it: one that left and came back is another.
    generation: u32,
    conn: Conn,
}

impl Flow {
    fn reply_key(&self, client: ClientKey, node: IpAddr) -> ReplyKey {
        match self.snat {
            Some(port) => (client.0, self.backend, node, port),
            None => (client.0, self.backend, client.1, client.2),
        }
    }
}

/// A reply entry: whose flow it answers, and that connection's state.
#[derive(Clone, Copy, Debug)]
struct Reply {
    client: ClientKey,
    conn: Conn,
}

struct Model {
    /// The node's address, SNAT source towards remote backends.
    node: IpAddr,
    locals: [IpAddr; 2],
    flows: BTreeMap<ClientKey, Flow>,
    replies: BTreeMap<ReplyKey, Reply>,
    endpoints: BTreeSet<IpAddr>,
    generation: BTreeMap<IpAddr, u32>,
    /// `sessionAffinity: ClientIP`: the backend each (protocol, client address) sticks to;
    /// `None` once one was chosen for a flow that was then dropped (so not seen here).
    sticky: Option<BTreeMap<(u8, IpAddr), Option<IpAddr>>>,
    /// Endpoints that still serve but take no new flows (terminating while others are ready):
    /// UDP flows to them go on.
    serving: BTreeSet<IpAddr>,
    /// The Service is removed (its endpoints, kept here, come back with it).
    removed: bool,
    /// While it is: its TCP frontends still draining.
    draining: BTreeSet<(IpAddr, u16)>,
}

impl Model {
    /// A client's packet on its flow: the flow's entry and its reply entry, if still linked.
    fn client_packet(&mut self, client: ClientKey, flags: u8) {
        let Some(f) = self.flows.get_mut(&client) else {
            return;
        };
        let other = self
            .replies
            .get_mut(&f.reply_key(client, self.node))
            .filter(|r| r.client == client)
            .map(|r| &mut r.conn);
        touch(&mut f.conn, other, client.0, flags, true);
    }

    /// A backend's answer on reply entry `key`: it and its flow's entry, if the flow still
    /// leads to it. Whether the answer was late (its flow has moved on).
    fn backend_packet(&mut self, key: ReplyKey, flags: u8) -> bool {
        let Some(r) = self.replies.get_mut(&key) else {
            return false;
        };
        let client = r.client;
        let other = self
            .flows
            .get_mut(&client)
            .filter(|f| f.reply_key(client, self.node) == key)
            .map(|f| &mut f.conn);
        let late = other.is_none();
        touch(&mut r.conn, other, key.0, flags, false);
        late
    }

    /// Whether a new flow of `client` to local `backend` finds its tuple there held by an open
    /// flow of the same client port through another frontend (then it is dropped).
    fn tuple_held(&self, client: ClientKey, backend: IpAddr) -> bool {
        let (proto, ip, port, frontend) = client;
        self.replies
            .get(&(proto, backend, ip, port))
            .is_some_and(|r| r.client.3 != frontend && r.conn.holds_tuple(proto))
    }

    /// Whether a new flow to `backend` may take SNAT `port`: nothing holds it, its flow is over,
    /// or it is a closed TCP connection (UDP flows hold theirs for their lifetime).
    fn port_free(&self, proto: u8, backend: IpAddr, port: u16) -> bool {
        self.replies
            .get(&(proto, backend, self.node, port))
            .is_none_or(|r| !r.conn.holds_tuple(proto))
    }

    /// Whether a TCP flow that is not over goes through `frontend`.
    fn tcp_flow_through(&self, frontend: (IpAddr, u16)) -> bool {
        let mut flows = self.flows.iter();
        flows.any(|(c, f)| c.0 == TCP && c.3 == frontend && f.conn.alive(TCP))
    }

    /// Time passes for every entry.
    fn age(&mut self, secs: u64) {
        let flows = self.flows.values_mut().map(|f| &mut f.conn);
        for conn in flows.chain(self.replies.values_mut().map(|r| &mut r.conn)) {
            conn.age_s += secs;
        }
    }

    fn is_local(&self, backend: IpAddr) -> bool {
        self.locals.contains(&backend)
    }
}

/// How often each path was taken, so the test fails if the generator stops reaching one.
#[derive(Debug, Default)]
struct Reached {
    new_flows: usize,
    kept: usize,
    reselected_after_close: usize,
    udp_moved: usize,
    refused: usize,
    ports_exhausted: usize,
    ports_taken_over: usize,
    answers: usize,
    late_answers: usize,
    endpoint_changes: usize,
    /// New flows that went where their client's affinity said.
    sticky: usize,
    /// New flows of clients whose flow had outlived its lifetime.
    renewed_after_lifetime: usize,
    /// Answers on the tuple of a flow that is over (left to the kernel).
    answers_after_lifetime: usize,
    aged: usize,
    /// Local flows handed to tc or redirected at XDP, to their pod's interface.
    to_pod: usize,
    /// Their pod's answers, sent back from its interface to eth0.
    replies_from_pod: usize,
    /// New flows dropped because the client's flow through the other frontend holds the tuple.
    collisions: usize,
    /// Flows that went on through a draining frontend, and packets passed for want of a Service.
    kept_draining: usize,
    passed_without_service: usize,
    drains_ended: usize,
    /// UDP flows that went on to an endpoint that takes no new flows but still serves.
    kept_serving: usize,
}

struct Run<'h> {
    h: &'h mut Harness,
    rng: Rng,
    model: Model,
    reached: Reached,
    family: Family,
    mode: RedirectToPods,
}

impl Run<'_> {
    /// The Service's endpoints become `endpoints`, and those that still serve `serving`.
    fn set_endpoints(&mut self, endpoints: BTreeSet<IpAddr>, serving: BTreeSet<IpAddr>) {
        if !self.model.removed {
            self.leave(&endpoints, &serving);
        }
        self.model.endpoints = endpoints;
        self.model.serving = serving;
        self.program();
        self.reached.endpoint_changes += 1;
    }

    /// The model's endpoints in neither `endpoints` nor `serving` leave the datapath (a new
    /// generation when they come back), and the clients stuck to any not in `endpoints` are
    /// forgotten.
    fn leave(&mut self, endpoints: &BTreeSet<IpAddr>, serving: &BTreeSet<IpAddr>) {
        let m = &mut self.model;
        for gone in m.endpoints.union(&m.serving) {
            if !endpoints.contains(gone) && !serving.contains(gone) {
                *m.generation.entry(*gone).or_default() += 1;
            }
        }
        if let Some(sticky) = &mut self.model.sticky {
            sticky.retain(|_, b| b.is_none_or(|b| endpoints.contains(&b)));
        }
    }

    /// Programs the model's Service (or its absence).
    fn program(&mut self) {
        if self.model.removed {
            self.h.program(&DesiredState::default());
            return;
        }
        let list = self
            .model
            .endpoints
            .iter()
            .map(|ip| (*ip, self.model.is_local(*ip)));
        let mut state = match self.family.node {
            IpAddr::V4(_) => hello(&list.map(|(ip, l)| (v4(ip), l)).collect::<Vec<_>>()),
            IpAddr::V6(_) => hello6(&list.map(|(ip, l)| (v6(ip), l)).collect::<Vec<_>>()),
        };
        let serving: Vec<BackendAddr> = self
            .model
            .serving
            .iter()
            .map(|ip| BackendAddr {
                ip: *ip,
                port: 50000,
                local: self.model.is_local(*ip),
            })
            .collect();
        for s in state.services.values_mut() {
            std::sync::Arc::make_mut(s).still_serving = serving.clone();
        }
        if self.model.sticky.is_some() {
            for s in state.services.values_mut() {
                std::sync::Arc::make_mut(s).affinity_timeout_s = 600;
            }
        }
        self.h.program(&state);
    }

    /// The Service is removed (its TCP frontends drain), or comes back.
    fn toggle_service(&mut self) {
        let m = &mut self.model;
        m.removed = !m.removed;
        if m.removed {
            // Its endpoints leave the datapath with it, and its clients' affinity.
            self.leave(&BTreeSet::new(), &BTreeSet::new());
            self.model.draining = self.family.frontends.into_iter().collect();
        } else {
            self.model.draining.clear();
        }
        self.program();
        let draining = self.h.reconciler.draining();
        assert_eq!(draining, self.model.draining.len(), "draining frontends");
    }

    /// Time passes: 10 to 60 s.
    fn age(&mut self) {
        let secs = self.rng.pick(&[10, 10, 20, 30, 60]);
        self.model.age(secs);
        age_flows(self.h, secs);
        self.reached.aged += 1;
    }

    /// The agent's check of draining frontends: exactly those no flow goes through any more end.
    fn end_drains(&mut self, step: usize) {
        let lifetimes = exposure_common::FlowLifetimes::DEFAULT;
        let in_use = self.h.maps.tcp_frontends_in_use(&lifetimes);
        let (ended, errors) = self.h.reconciler.end_drains(&in_use, &mut self.h.maps);
        assert!(errors.is_empty(), "step {step}: {errors:?}");
        let m = &mut self.model;
        let over: BTreeSet<(IpAddr, u16)> = m
            .draining
            .iter()
            .filter(|fe| !m.tcp_flow_through(**fe))
            .copied()
            .collect();
        let display =
            |(ip, port): &(IpAddr, u16)| format!("{}/TCP", SocketAddr::from((*ip, *port)));
        let want: BTreeSet<String> = over.iter().map(display).collect();
        assert_eq!(
            ended.into_iter().collect::<BTreeSet<_>>(),
            want,
            "step {step}"
        );
        m.draining.retain(|fe| !over.contains(fe));
        self.reached.drains_ended += over.len();
    }

    fn random_endpoints(&mut self) -> BTreeSet<IpAddr> {
        if self.rng.one_in(12) {
            return BTreeSet::new();
        }
        let all = self.family.locals.iter().chain(&self.family.remotes);
        let mut set: BTreeSet<IpAddr> = all.filter(|_| self.rng.below(5) < 3).copied().collect();
        if set.is_empty() {
            set.insert(self.rng.pick(&self.family.remotes));
        }
        set
    }

    /// Which of the others still serve (terminating while `endpoints` are ready): none when no
    /// endpoint is ready, as then they would be the endpoints.
    fn random_serving(&mut self, endpoints: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        if endpoints.is_empty() {
            return BTreeSet::new();
        }
        let all = self.family.locals.iter().chain(&self.family.remotes);
        let others = all.filter(|ip| !endpoints.contains(*ip));
        others.filter(|_| self.rng.below(3) < 2).copied().collect()
    }

    /// A client's packet to the NodePort, and what must come of it.
    fn client_sends(&mut self, step: usize) {
        let (ip, port) = self.rng.pick(&self.family.clients);
        let proto = self.rng.pick(&[TCP, UDP]);
        let flags = if proto == TCP {
            self.rng.pick(&CLIENT_FLAGS)
        } else {
            0
        };
        let frontend = self.rng.pick(&self.family.frontends);
        let client: ClientKey = (proto, ip, port, frontend);
        let frame = self.frame(Sender::Client, (ip, port), frontend, proto, flags);
        let new_flows = self.h.counter(Counter::NewFlows);
        let (verdict, out) = self.h.xdp(&frame);
        let out = self.without_handoff(verdict, out, frame.len());
        if verdict == XDP_REDIRECT {
            self.reached.to_pod += 1;
        }
        let made_new = self.h.counter(Counter::NewFlows) > new_flows;
        let what = format!("step {step}: {client:?} flags {flags:#x}");
        let m = &mut self.model;
        let new_syn = proto == TCP && flags & (SYN | ACK) == SYN;
        let existing = m.flows.get(&client).copied().filter(|f| {
            // A UDP flow keeps an endpoint that still serves.
            let there = m.endpoints.contains(&f.backend) || m.serving.contains(&f.backend);
            let same = m.generation.get(&f.backend).copied().unwrap_or(0) == f.generation;
            // An endpoint that left and came back may have its old id again: then it is the
            // same to the flow, or else a new one; both are right.
            let came_back = there && !same && !made_new && {
                let src = f.snat.map_or(port, |snat| snat);
                seen(&out).is_some_and(|p| (p.dst.0, p.src.1) == (f.backend, src))
            };
            f.conn.alive(proto)
                && !(new_syn && f.conn.closing())
                && (proto == TCP || (there && same) || came_back)
        });
        assert!(
            existing.is_none() || !made_new,
            "{what}: a new flow, though {:?} holds",
            existing
        );
        if m.removed {
            // No Service: only a TCP flow through a frontend still draining goes on.
            let draining = proto == TCP && m.draining.contains(&frontend);
            if !draining || existing.is_none() {
                assert_eq!((verdict, &out), (XDP_PASS, &frame), "{what}: the kernel's");
                assert!(!made_new, "{what}: a new flow without a Service");
                self.reached.passed_without_service += 1;
                return;
            }
            self.reached.kept_draining += 1;
        }
        if let Some(f) = existing {
            self.expect_translated(&what, verdict, &out, client, f.backend, f.snat);
            self.reached.kept += 1;
            if proto == UDP && !self.model.endpoints.contains(&f.backend) {
                self.reached.kept_serving += 1;
            }
            self.model.client_packet(client, flags);
            return;
        }
        // A new flow.
        let before = m.flows.get(&client).copied();
        if m.endpoints.is_empty() {
            let p = seen(&out).unwrap_or_else(|| panic!("{what}: {out:02x?}"));
            assert_eq!(
                (verdict, p.unreachable, p.dst.0),
                (XDP_TX, true, ip),
                "{what}: refused with ICMP unreachable"
            );
            self.reached.refused += 1;
            return;
        }
        let stuck = m.sticky.as_ref().and_then(|s| s.get(&(proto, ip)).copied());
        if verdict == XDP_DROP {
            // Only for want of a SNAT port: a remote endpoint (the client's, if it sticks to
            // one) whose ports open flows all hold; or a local one where the client's open flow
            // through the other frontend holds the tuple.
            let mine =
                |b: &IpAddr| m.endpoints.contains(b) && stuck.flatten().is_none_or(|s| s == *b);
            let exhausted = self
                .family
                .remotes
                .iter()
                .filter(|b| mine(b))
                .any(|b| (SNAT_FIRST..=SNAT_LAST).all(|port| !m.port_free(proto, *b, port)));
            let collided = self
                .family
                .locals
                .iter()
                .filter(|b| mine(b))
                .any(|b| m.tuple_held(client, *b));
            let collisions = self.h.counter(Counter::TupleCollision) as usize;
            if collisions > self.reached.collisions {
                assert!(collided, "{what}: dropped for a tuple no open flow holds");
                self.reached.collisions = collisions;
            } else {
                assert!(exhausted, "{what}: dropped with free SNAT ports");
                self.reached.ports_exhausted += 1;
            }
            if let Some(sticky) = &mut self.model.sticky {
                sticky.entry((proto, ip)).or_insert(None);
            }
            return;
        }
        let p = seen(&out).unwrap_or_else(|| panic!("{what}: {out:02x?}"));
        assert!(!p.unreachable, "{what}: refused, with endpoints");
        assert!(
            made_new,
            "{what}: translated as an existing flow, though none holds"
        );
        let backend = p.dst.0;
        assert!(
            m.endpoints.contains(&backend),
            "{what}: new flow to {backend}, not an endpoint of {:?}",
            m.endpoints
        );
        assert!(
            !m.is_local(backend) || !m.tuple_held(client, backend),
            "{what}: took the tuple an open flow through the other frontend holds: {:?}",
            m.replies.get(&(proto, backend, ip, port))
        );
        if let Some(Some(stuck)) = stuck {
            assert_eq!(backend, stuck, "{what}: left its affinity");
            self.reached.sticky += 1;
        }
        if let Some(sticky) = &mut m.sticky {
            sticky.insert((proto, ip), Some(backend));
        }
        let snat = (!m.is_local(backend)).then_some(p.src.1);
        if let Some(port) = snat {
            assert!(
                m.port_free(proto, backend, port),
                "{what}: SNAT port {port} to {backend} taken from an open flow {:?}",
                m.replies.get(&(proto, backend, m.node, port))
            );
            if m.replies.contains_key(&(proto, backend, m.node, port)) {
                self.reached.ports_taken_over += 1;
            }
        }
        self.expect_translated(&what, verdict, &out, client, backend, snat);
        match before {
            Some(b) if !b.conn.alive(proto) => self.reached.renewed_after_lifetime += 1,
            Some(b) if proto == TCP && b.conn.closing() => self.reached.reselected_after_close += 1,
            Some(_) if proto == UDP => self.reached.udp_moved += 1,
            _ => {}
        }
        self.reached.new_flows += 1;
        let m = &mut self.model;
        let conn = Conn::new(proto, flags);
        let flow = Flow {
            backend,
            snat,
            generation: m.generation.get(&backend).copied().unwrap_or(0),
            conn,
        };
        m.replies
            .insert(flow.reply_key(client, m.node), Reply { client, conn });
        m.flows.insert(client, flow);
    }

    /// Checks a client's packet went on to `backend` (from `snat`, or the client's own address).
    fn expect_translated(
        &self,
        what: &str,
        verdict: u32,
        out: &[u8],
        client: ClientKey,
        backend: IpAddr,
        snat: Option<u16>,
    ) {
        let p = seen(out).unwrap_or_else(|| panic!("{what}: {out:02x?}"));
        let (want_verdict, src) = match snat {
            Some(port) => (XDP_TX, (self.family.node, port)),
            // Only the first local pod's interface is listed (and routed).
            None if self.mode == RedirectToPods::AtXdp && backend == self.family.locals[0] => {
                (XDP_REDIRECT, (client.1, client.2))
            }
            None => (XDP_PASS, (client.1, client.2)),
        };
        assert_eq!(
            (verdict, p.src, p.dst),
            (want_verdict, src, (backend, 50000)),
            "{what}"
        );
    }

    /// A frame passed up with a [`TcHandoff`] in front (`--redirect-to-pods`), without it: the
    /// hand-off names the local pod's interface.
    fn without_handoff(&mut self, verdict: u32, out: Vec<u8>, input_len: usize) -> Vec<u8> {
        let meta = std::mem::size_of::<TcHandoff>();
        if self.mode != RedirectToPods::AtTc || verdict != XDP_PASS || out.len() != input_len + meta
        {
            return out;
        }
        let word = |i: usize| u32::from_ne_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]);
        assert_eq!((word(0), word(4)), (HANDOFF_TO_POD, self.h.pod_ifindex));
        let to = seen(&out[meta..]).map(|p| p.dst.0);
        assert_eq!(to, Some(self.family.locals[0]));
        self.reached.to_pod += 1;
        out[meta..].to_vec()
    }

    /// A backend answers on one of the reply entries: it goes to that entry's client.
    fn backend_sends(&mut self, step: usize) {
        // Mostly on the tuples of flows that are not over.
        let any = self.rng.one_in(5);
        let keys: Vec<ReplyKey> = self
            .model
            .replies
            .iter()
            .filter(|(k, r)| any || r.conn.alive(k.0))
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        let key = self.rng.pick(&keys);
        let (proto, backend, to, to_port) = key;
        let flags = if proto == TCP {
            self.rng.pick(&BACKEND_FLAGS)
        } else {
            0
        };
        let local = self.model.is_local(backend);
        let from = ((backend, 50000), (to, to_port));
        let spec_frame = self.frame(Sender::Pod, from.0, from.1, proto, flags);
        let peer_frame = self.frame(Sender::PeerNode, from.0, from.1, proto, flags);
        let reply = self.model.replies[&key];
        let what = format!("step {step}: answer on {key:?} flags {flags:#x}, for {reply:?}");
        if local && self.mode != RedirectToPods::Off {
            // From the pod's interface: the replies of flows sent to the pod go back the same
            // way, to eth0, where tc egress translates them; everything else is the stack's.
            let (verdict, out) = self.h.tc_from_pod(&spec_frame);
            if backend == self.family.locals[0] && reply.conn.alive(proto) {
                assert_eq!(verdict, TC_ACT_REDIRECT, "{what}: from the pod");
                assert_eq!(out[12..], spec_frame[12..], "{what}: from the pod");
                self.reached.replies_from_pod += 1;
            } else {
                assert_eq!(
                    (verdict, &out),
                    (TC_ACT_UNSPEC as u32, &spec_frame),
                    "{what}: from the pod"
                );
            }
        }
        let (verdict, out) = if local {
            self.h.tc(&spec_frame)
        } else {
            self.h.xdp(&peer_frame)
        };
        if !reply.conn.alive(proto) {
            // Its flow is over: the packet is the kernel's, untouched.
            let untouched = if local {
                TC_ACT_UNSPEC as u32
            } else {
                XDP_PASS
            };
            let sent = if local { spec_frame } else { peer_frame };
            assert_eq!((verdict, out), (untouched, sent), "{what}");
            self.reached.answers_after_lifetime += 1;
            return;
        }
        let p = seen(&out).unwrap_or_else(|| panic!("{what}: {out:02x?}"));
        let want_verdict = if local { TC_ACT_OK } else { XDP_TX };
        assert_eq!(
            (verdict, p.src, p.dst),
            (
                want_verdict,
                reply.client.3,
                (reply.client.1, reply.client.2)
            ),
            "{what}"
        );
        self.reached.answers += 1;
        if self.model.backend_packet(key, flags) {
            self.reached.late_answers += 1;
        }
    }

    /// The datapath's entries agree with the model's: each flow's backend, SNAT port and
    /// whether it is closing; each reply entry's client and whether it is closing.
    fn check_entries(&self, step: usize) {
        let maps = &self.h.maps;
        let replies: Vec<(FlowKey, exposure_common::Reply)> = match self.family.node {
            IpAddr::V4(_) => maps
                .replies4
                .iter()
                .filter_map(Result::ok)
                .map(|(k, r)| (k.into(), r))
                .collect(),
            IpAddr::V6(_) => maps.replies6.iter().filter_map(Result::ok).collect(),
        };
        let replies: BTreeMap<ReplyKey, exposure_common::Reply> = replies
            .into_iter()
            .map(|(k, r)| {
                let key = (
                    k.proto,
                    k.saddr.into(),
                    k.daddr.into(),
                    exposure_common::port_host(k.dport),
                );
                (key, r)
            })
            .collect();
        for (key, want) in &self.model.replies {
            let got = replies
                .get(key)
                .unwrap_or_else(|| panic!("step {step}: no reply entry {key:?}"));
            let client = (
                IpAddr::from(got.client_addr),
                exposure_common::port_host(got.client_port),
                IpAddr::from(got.frontend_addr),
                exposure_common::port_host(got.frontend_port),
            );
            let (_, ip, port, (frontend, frontend_port)) = want.client;
            assert_eq!(
                (client, got.flags & CONN_BITS),
                ((ip, port, frontend, frontend_port), want.conn.bits),
                "step {step}: reply entry {key:?}"
            );
        }
        for (client, f) in &self.model.flows {
            let (proto, ip, port, frontend) = *client;
            let key = FlowKey {
                saddr: ip.into(),
                daddr: frontend.0.into(),
                sport: exposure_common::port(port),
                dport: exposure_common::port(frontend.1),
                proto,
                _pad: [0; 3],
            };
            let got = maps
                .flow(&key)
                .unwrap_or_else(|| panic!("step {step}: no entry for {client:?}"));
            let snat =
                (got.flags & FLOW_REMOTE != 0).then(|| exposure_common::port_host(got.snat_port));
            assert_eq!(
                (IpAddr::from(got.backend_addr), snat, got.flags & CONN_BITS),
                (f.backend, f.snat, f.conn.bits),
                "step {step}: entry of {client:?}"
            );
        }
    }

    /// A TCP segment (`flags`) or UDP datagram from `src` to `dst`, in the run's family, with the
    /// MACs its sender gives it (a client's own is the frames' default).
    fn frame(
        &self,
        sender: Sender,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
        proto: u8,
        flags: u8,
    ) -> Vec<u8> {
        let (src_mac, dst_mac) = match sender {
            Sender::Client => (None, Some(self.h.node_mac)),
            Sender::PeerNode => (Some(self.h.peer_mac), Some(self.h.node_mac)),
            Sender::Pod => (None, None),
        };
        match (src.0, dst.0) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut spec = FrameSpec::of(proto, (s, src.1), (d, dst.1), flags);
                spec.src_mac = src_mac.unwrap_or(spec.src_mac);
                spec.dst_mac = dst_mac.unwrap_or(spec.dst_mac);
                spec.build()
            }
            (s, d) => {
                let mut spec = frame::FrameSpec6::of(proto, (v6(s), src.1), (v6(d), dst.1), flags);
                spec.src_mac = src_mac.unwrap_or(spec.src_mac);
                spec.dst_mac = dst_mac.unwrap_or(spec.dst_mac);
                spec.build()
            }
        }
    }
}

/// Who sends a frame: a client (to the node's MAC), the other node (a remote pod's answer), or a
/// local pod (its answer, as tc egress sees it).
#[derive(Clone, Copy)]
enum Sender {
    Client,
    PeerNode,
    Pod,
}

/// A frame the programs sent on, its checksums checked.
struct Seen {
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    /// An ICMP destination unreachable (ICMPv6 in IPv6).
    unreachable: bool,
}

fn seen(out: &[u8]) -> Option<Seen> {
    if let Some(p) = frame::parse(out) {
        assert_checksums(&p);
        return Some(Seen {
            src: (p.src.into(), p.sport),
            dst: (p.dst.into(), p.dport),
            unreachable: p.proto == frame::ICMP && p.l4.first() == Some(&3),
        });
    }
    let p = frame::parse6(out)?;
    assert!(p.l4_checksum_ok, "L4 checksum wrong: {p:?}");
    Some(Seen {
        src: (p.src.into(), p.sport),
        dst: (p.dst.into(), p.dport),
        unreachable: p.next_header == ICMPV6 && p.l4.first() == Some(&1),
    })
}

const ICMPV6: u8 = 58;

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} in an IPv4 run"),
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => panic!("{ip} in an IPv6 run"),
    }
}

#[test]
fn flows_over_time_keep_their_backends_ports_and_answers_as_conntrack_would() {
    flows_over_time(Family::v4(), false, RedirectToPods::Off);
}

/// With `sessionAffinity: ClientIP`: also each client's new flows go to the endpoint it sticks
/// to, while that one is an endpoint.
#[test]
fn flows_over_time_with_client_ip_affinity() {
    flows_over_time(Family::v4(), true, RedirectToPods::Off);
}

/// With `--redirect-to-pods`: the pod's flows leave XDP with its interface in the metadata.
#[test]
fn flows_over_time_with_local_flows_handed_to_tc() {
    flows_over_time(Family::v4(), false, RedirectToPods::AtTc);
}

/// With `--xdp-redirect-to-pods`: the pod's flows are redirected from XDP.
#[test]
fn flows_over_time_with_local_flows_redirected_at_xdp() {
    flows_over_time(Family::v4(), false, RedirectToPods::AtXdp);
}

/// In IPv6, with client IP affinity (its /128 in IPv6).
#[test]
fn flows_over_time_in_ipv6() {
    flows_over_time(Family::v6(), true, RedirectToPods::Off);
}

/// In IPv6, with local flows handed to tc.
#[test]
fn flows_over_time_in_ipv6_with_local_flows_handed_to_tc() {
    flows_over_time(Family::v6(), false, RedirectToPods::AtTc);
}

/// In IPv6, with local flows redirected at XDP.
#[test]
fn flows_over_time_in_ipv6_with_local_flows_redirected_at_xdp() {
    flows_over_time(Family::v6(), false, RedirectToPods::AtXdp);
}

fn flows_over_time(family: Family, affinity: bool, mode: RedirectToPods) {
    let capacity = exposure::datapath::Capacity {
        snat_ports: exposure::datapath::PortRange {
            first: SNAT_FIRST,
            last: SNAT_LAST,
        },
        redirect_to_pods: mode,
        ..Default::default()
    };
    with_datapath_config(capacity, move |h| {
        if mode != RedirectToPods::Off {
            h.maps.set_pod_ifaces(&[h.pod_ifindex].into()).unwrap();
        }
        let mut run = Run {
            h,
            rng: Rng::from_env("EXPOSURE_FLOWS_SEED", SEED),
            model: Model {
                node: family.node,
                locals: family.locals,
                flows: BTreeMap::new(),
                replies: BTreeMap::new(),
                endpoints: BTreeSet::new(),
                generation: BTreeMap::new(),
                sticky: affinity.then(BTreeMap::new),
                serving: BTreeSet::new(),
                removed: false,
                draining: BTreeSet::new(),
            },
            reached: Reached::default(),
            family: family.clone(),
            mode,
        };
        let all = family.locals.iter().chain(&family.remotes);
        run.set_endpoints(all.copied().collect(), BTreeSet::new());
        for step in 0..STEPS {
            let removed = run.model.removed;
            match run.rng.below(80) {
                0..=3 => {
                    let endpoints = run.random_endpoints();
                    let serving = run.random_serving(&endpoints);
                    run.set_endpoints(endpoints, serving);
                }
                // Past a closing connection's lifetime, a UDP exchange's, a handshake's; more
                // often while the Service is removed, so that drains end.
                4 => run.age(),
                7..=11 if removed => run.age(),
                // Now and then the Service goes, for about 40 steps.
                5 => run.toggle_service(),
                15 if removed => run.toggle_service(),
                6 | 12..=14 if removed => run.end_drains(step),
                6..=46 => run.client_sends(step),
                _ => run.backend_sends(step),
            }
            if step % 50 == 0 {
                run.check_entries(step);
            }
        }
        let r = &run.reached;
        eprintln!("{r:?}");
        assert_eq!(
            run.h.counter(Counter::SnatExhausted) as usize,
            r.ports_exhausted
        );
        for (what, n) in [
            ("new flows", r.new_flows),
            ("kept", r.kept),
            ("reselected after close", r.reselected_after_close),
            ("UDP flows moved", r.udp_moved),
            ("refused", r.refused),
            ("ports exhausted", r.ports_exhausted),
            ("tuple collisions", r.collisions),
            ("ports taken over", r.ports_taken_over),
            ("answers", r.answers),
            ("late answers", r.late_answers),
            ("sticky", if affinity { r.sticky } else { 20 }),
            ("renewed after their lifetime", r.renewed_after_lifetime),
            ("answers after their lifetime", r.answers_after_lifetime),
            ("kept through a draining frontend", r.kept_draining),
            ("passed without a Service", r.passed_without_service),
            ("drains ended", r.drains_ended),
            ("UDP flows kept by a still-serving endpoint", r.kept_serving),
            (
                "to the pod",
                if mode == RedirectToPods::Off {
                    20
                } else {
                    r.to_pod
                },
            ),
            (
                "answers from the pod",
                if mode == RedirectToPods::Off {
                    20
                } else {
                    r.replies_from_pod
                },
            ),
        ] {
            assert!(n >= 20, "{what}: reached only {n} times ({r:?})");
        }
    });
}
