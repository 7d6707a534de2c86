//! Loading, pinning and attaching the eBPF programs, and typed access to their maps.
//!
//! Everything lives under one pin directory: the maps (so a restarted agent finds the same flows and
//! services) and the XDP/tc links (so the programs stay attached while the agent restarts, and a new
//! agent swaps its program in atomically with BPF_LINK_UPDATE).

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier,
        TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use exposure_common::{
    names, Addr, Backend, Counter, Flow, FlowKey, FlowKey4, Frontend, FrontendKey, FrontendKey4,
    NodeAddrKey, Reply, Service, XDP_MODE_GENERIC, XDP_MODE_NATIVE,
};

use crate::sync::{DatapathMaps, Snapshot, TableRead};

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exposure"));

pub const XDP_PROGRAM: &str = "exposure_xdp";
pub const TC_PROGRAM: &str = "exposure_tc_egress";
pub const TC_INGRESS_PROGRAM: &str = "exposure_tc_ingress";
/// On the pods' interfaces the redirect flags list: their replies go back past the node's stack
/// (each link pinned as `links/pod-<ifindex>`).
pub const TC_FROM_POD_PROGRAM: &str = "exposure_tc_from_pod";
/// The cgroup hooks for the sockets of the node and its pods (`exposure-ebpf/src/sock.rs`),
/// each pinned as `links/sock-<hook>`.
pub const NODE_SOCKET_PROGRAMS: [&str; 8] = [
    "exposure_connect4",
    "exposure_sendmsg4",
    "exposure_recvmsg4",
    "exposure_getpeername4",
    "exposure_connect6",
    "exposure_sendmsg6",
    "exposure_recvmsg6",
    "exposure_getpeername6",
];
/// Forgets a closing socket's frontend/backend pair (`links/sock-sock_release`). Needs Linux 5.18
/// (a 2-byte `bpf_sock.dst_port`); without it the pairs only age out of their LRU.
pub const SOCKET_RELEASE_PROGRAM: &str = "exposure_sock_release";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the agent mounts cgroup2 when the node has it nowhere (as Cilium does, under /run).
pub const CGROUP2_FALLBACK: &str = "/run/exposure/cgroupv2";

/// Mounts bpffs at /sys/fs/bpf when it is missing, as Cilium does.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if is_bpffs {
        return Ok(());
    }
    mount_kernel_fs("bpf", root)
}

/// Mounts a kernel filesystem (`bpf`, `cgroup2`) at `at`, making the directory first.
fn mount_kernel_fs(fstype: &str, at: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    nix::mount::mount(
        Some(fstype),
        at,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting {fstype} at {}", at.display()))?;
    tracing::info!("mounted {fstype} at {}", at.display());
    Ok(())
}

/// The root of the node's cgroup2 hierarchy, where the node socket hooks go: the mount
/// mountinfo lists, else one made at [`CGROUP2_FALLBACK`].
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    // thread-self: a thread may have a mount namespace of its own (the tests' do).
    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .context("reading /proc/thread-self/mountinfo")?;
    if let Some(root) = cgroup2_mount(&mountinfo) {
        return Ok(root);
    }
    let root = Path::new(CGROUP2_FALLBACK);
    mount_kernel_fs("cgroup2", root)?;
    Ok(root.to_path_buf())
}

/// The first whole cgroup2 hierarchy (its root, not a subtree bound elsewhere) in a mountinfo
/// text: `id parent dev root mountpoint options [tags] - fstype source options`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        let (root, at) = (fields.get(3)?, fields.get(4)?);
        (fs.split(' ').next() == Some("cgroup2") && *root == "/").then(|| unescape_mount_path(at))
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mount_path(path: &str) -> PathBuf {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, b| n.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14): the node
/// socket hooks translate only sockets of this namespace.
pub fn netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("opening a socket to read the network namespace cookie")?;
    socket_option_u64(sock.as_raw_fd(), libc::SO_NETNS_COOKIE)
        .context("reading SO_NETNS_COOKIE (Linux >= 5.14)")
}

/// A socket's 8-byte `SOL_SOCKET` option (`SO_COOKIE`, `SO_NETNS_COOKIE`).
pub fn socket_option_u64(fd: std::os::fd::RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The cookie of the network namespace whose file is `path` (e.g. `/run/netns/NAME`,
/// `/proc/PID/ns/net`).
pub fn netns_cookie_at(path: &Path) -> anyhow::Result<u64> {
    in_netns(path, netns_cookie)
}

/// Runs `f` on a thread of its own that enters the network namespace whose file is `path`
/// (which takes CAP_SYS_ADMIN); the caller's thread stays where it is.
pub fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the network namespace {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| {
                format!(
                    "cannot enter {} (not a network namespace, or no CAP_SYS_ADMIN)",
                    path.display()
                )
            })?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {} panicked", path.display()))?
    })
}

/// Whose sockets the socket hooks translate (`--socket-namespaces`). The node's own always are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SocketNamespaces {
    /// Every network namespace's: the node's and its pods' (Cilium's socket LB default).
    #[default]
    All,
    /// The node's only (Cilium's `bpf-lb-sock-hostns-only`: service meshes whose sidecars must
    /// see the frontend).
    Node,
    /// The node's and those of these namespace files: a lab whose namespaces play several
    /// machines on one kernel.
    Listed(Vec<PathBuf>),
}

impl std::str::FromStr for SocketNamespaces {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => return Ok(SocketNamespaces::All),
            "host" => return Ok(SocketNamespaces::Node),
            _ => {}
        }
        let paths: Vec<PathBuf> = s.split(',').map(|p| PathBuf::from(p.trim())).collect();
        if paths.len() > exposure_common::MAX_SOCKET_NETNS as usize {
            return Err(format!(
                "at most {} network namespaces, not {}",
                exposure_common::MAX_SOCKET_NETNS,
                paths.len()
            ));
        }
        if let Some(bad) = paths.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "expected `all`, `host` or network namespace files by absolute path \
                 (comma-separated), not {:?}",
                bad.display().to_string()
            ));
        }
        Ok(SocketNamespaces::Listed(paths))
    }
}

/// Kernels >= 5.11 account BPF memory to the cgroup; older ones need RLIMIT_MEMLOCK raised.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::warn!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11",
            io::Error::last_os_error()
        );
    }
}

fn is_not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

/// The expected key size, value size and map flags of each pinned map (as the eBPF object
/// declares them; aya-ebpf adds `BPF_F_NO_PREALLOC` to LPM tries and `BPF_F_RDONLY_PROG` to
/// devmaps), to detect an incompatible pin from another version.
fn expected_layout(name: &str) -> Option<(u32, u32, u32)> {
    use exposure_common::{Affinity, AffinityKey, NodeAddrKey, SourceRange, Traffic};
    use std::mem::size_of;
    const BPF_F_NO_PREALLOC: u32 = 1;
    const BPF_F_RDONLY_PROG: u32 = 1 << 7;
    let with_flags = |k: usize, v: usize, flags: u32| Some((k as u32, v as u32, flags));
    let sz = |k: usize, v: usize| with_flags(k, v, 0);
    match name {
        names::FRONTENDS4 => sz(size_of::<FrontendKey4>(), size_of::<Frontend>()),
        names::FRONTENDS6 => sz(size_of::<FrontendKey>(), size_of::<Frontend>()),
        names::SERVICES => sz(4, size_of::<Service>()),
        // Two entries per 8-byte element; earlier builds' one per element (4-byte values) is
        // carried over (`carry_maglev_over`).
        names::MAGLEV => with_flags(4, 8, exposure_common::BPF_F_MMAPABLE),
        names::BACKENDS => sz(4, size_of::<Backend>()),
        // One LRU list for all CPUs: earlier builds' per-CPU lists (`BPF_F_NO_COMMON_LRU`) split
        // the capacity among the CPUs.
        names::FLOWS4 => sz(size_of::<FlowKey4>(), size_of::<Flow>()),
        names::FLOWS6 => sz(size_of::<FlowKey>(), size_of::<Flow>()),
        names::REPLIES4 => sz(size_of::<FlowKey4>(), size_of::<Reply>()),
        names::REPLIES6 => sz(size_of::<FlowKey>(), size_of::<Reply>()),
        names::NODE_ADDRS => sz(size_of::<NodeAddrKey>(), size_of::<Addr>()),
        names::STATS => sz(4, 8),
        names::NEIGH_MISSES => sz(size_of::<Addr>(), 4),
        names::SOURCE_RANGES => with_flags(4 + size_of::<SourceRange>(), 4, BPF_F_NO_PREALLOC),
        names::AFFINITY => sz(size_of::<AffinityKey>(), size_of::<Affinity>()),
        names::FRONTEND_STATS => sz(4, size_of::<Traffic>()),
        // Key and `struct bpf_devmap_val` (ifindex, program).
        names::POD_IFACES => with_flags(4, 8, BPF_F_RDONLY_PROG),
        names::XDP_IFACES => sz(4, 1),
        names::FRONTEND_PORTS => sz(4, 8),
        names::SOCKET_PEERS => sz(
            size_of::<exposure_common::SocketPeerKey>(),
            size_of::<exposure_common::SocketPeer>(),
        ),
        _ => None,
    }
}

/// Map capacities, set at load time (the `--max-*` flags).
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// aya-log level for the programs' own log lines: 0 off, 1 error ... 4 debug.
    pub bpf_log_level: u8,
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub flows: u32,
    /// Entries of the shared Maglev array (every service's table).
    pub maglev_entries: u32,
    /// Whether, and from where, local flows are sent straight to the pod's interface when it is in
    /// `POD_IFACES`.
    pub redirect_to_pods: RedirectToPods,
    /// The source ports flows to remote backends are SNATed to (`--snat-port-range`).
    pub snat_ports: PortRange,
    /// Whether the socket hooks translate the sockets of every network namespace (pods too), or
    /// only the node's and those given to [`Datapath::attach_node_sockets`].
    pub sockets_of_every_netns: bool,
    /// How long flows live after their last packet (`--flow-timeout-*`).
    pub flow_lifetimes: exposure_common::FlowLifetimes,
    /// Whether XDP leaves metadata for tc; false makes it act as on a driver that keeps none
    /// (for tests: `EXPOSURE_TEST_NO_XDP_METADATA=1` in the agent's environment).
    pub xdp_metadata: bool,
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const SNAT_DEFAULT: PortRange = PortRange {
        first: exposure_common::SNAT_PORT_MIN,
        last: exposure_common::SNAT_PORT_MAX,
    };
}

/// How local flows reach pods whose interfaces are in `POD_IFACES`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedirectToPods {
    /// Through the node's stack, as any routed packet.
    #[default]
    Off,
    /// `--redirect-to-pods`: from tc ingress into the pod's namespace (`bpf_redirect_peer`).
    AtTc,
    /// `--xdp-redirect-to-pods`: from XDP to the pod's veth (needs NAPI on the pod side).
    AtXdp,
}

impl RedirectToPods {
    /// The `REDIRECT_TO_PODS` value the programs read.
    fn global(self) -> u8 {
        match self {
            RedirectToPods::Off => exposure_common::REDIRECT_OFF,
            RedirectToPods::AtTc => exposure_common::REDIRECT_AT_TC,
            RedirectToPods::AtXdp => exposure_common::REDIRECT_AT_XDP,
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            bpf_log_level: 0,
            maglev_entries: exposure_common::MAX_MAGLEV_ENTRIES,
            frontends: exposure_common::MAX_FRONTENDS,
            services: exposure_common::MAX_SERVICES,
            backends: exposure_common::MAX_BACKENDS,
            flows: exposure_common::MAX_FLOWS,
            redirect_to_pods: RedirectToPods::Off,
            snat_ports: PortRange::SNAT_DEFAULT,
            sockets_of_every_netns: true,
            flow_lifetimes: exposure_common::FlowLifetimes::DEFAULT,
            xdp_metadata: true,
        }
    }
}

impl Capacity {
    /// `max_entries` per map.
    fn of(&self, name: &str) -> Option<u32> {
        match name {
            names::FRONTENDS4 | names::FRONTENDS6 | names::FRONTEND_STATS => Some(self.frontends),
            names::SERVICES => Some(self.services),
            names::BACKENDS => Some(self.backends),
            names::MAGLEV => Some(
                self.maglev_entries
                    .div_ceil(exposure_common::MAGLEV_ENTRIES_PER_ELEMENT),
            ),
            names::FLOWS4 | names::FLOWS6 | names::REPLIES4 | names::REPLIES6 | names::AFFINITY => {
                Some(self.flows)
            }
            // Fixed by this build, but a pin from a build with fewer counters must be recreated.
            names::STATS => Some(Counter::COUNT),
            _ => None,
        }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The pod interfaces (by index) whose links run this run's [`TC_FROM_POD_PROGRAM`].
    pod_links: std::collections::BTreeSet<u32>,
}

impl Datapath {
    /// Loads the programs, reusing maps already pinned under `pin_dir` (state survives restarts).
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        Self::load_with(pin_dir, Capacity::default())
    }

    pub fn load_with(pin_dir: &Path, capacity: Capacity) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        raise_memlock();
        std::fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let earlier_maglev = earlier_maglev_tables(pin_dir);
        drop_incompatible_pins(pin_dir, &capacity);
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        // Off by default: a log statement then costs one load and compare.
        loader.override_global(aya_log::LEVEL, &capacity.bpf_log_level, true);
        let redirect_to_pods = capacity.redirect_to_pods.global();
        loader.override_global("REDIRECT_TO_PODS", &redirect_to_pods, true);
        loader.override_global("SNAT_PORT_FIRST", &capacity.snat_ports.first, true);
        loader.override_global("SNAT_PORT_LAST", &capacity.snat_ports.last, true);
        loader.override_global("FLOW_LIFETIMES", &capacity.flow_lifetimes, true);
        // 0 (no namespace has it) where the kernel can't tell: the socket hooks then do nothing.
        let netns = netns_cookie().unwrap_or_else(|e| {
            tracing::warn!("{e:#}; the node's own sockets will not be translated");
            0
        });
        loader.override_global("NODE_NETNS_COOKIE", &netns, true);
        let every_netns = capacity.sockets_of_every_netns as u8;
        loader.override_global("ALL_NETNS", &every_netns, true);
        // Before 5.18 the hooks refuse a ClusterIP with EPERM instead of the error they choose.
        let set_retval = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 18, 0))
            as u8;
        loader.override_global("SET_RETVAL", &set_retval, true);
        let xdp_metadata = capacity.xdp_metadata as u8;
        loader.override_global("XDP_METADATA", &xdp_metadata, true);
        for name in names::ALL {
            if let Some(n) = capacity.of(name) {
                loader.map_max_entries(name, n);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?.try_into()?;
        load_program(|| xdp.load()).context("verifying the XDP program")?;
        for name in [TC_PROGRAM, TC_INGRESS_PROGRAM, TC_FROM_POD_PROGRAM] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            load_program(|| tc.load())
                .with_context(|| format!("verifying the tc program {name}"))?;
        }
        if let Some(tables) = earlier_maglev {
            carry_maglev_over(pin_dir, &tables);
        }
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            pod_links: Default::default(),
        })
    }

    /// Forwards the programs' aya-log records to `logger`; poll the returned value's fd and `flush`.
    pub fn bpf_logger<T: log::Log>(&mut self, logger: T) -> anyhow::Result<aya_log::EbpfLogger<T>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("opening the programs' log ring")
    }

    pub fn xdp(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(program(&mut self.ebpf, XDP_PROGRAM)?.try_into()?)
    }

    pub fn tc(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        self.tc_program(TC_PROGRAM)
    }

    pub fn tc_program(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(program(&mut self.ebpf, name)?.try_into()?)
    }

    /// XDP on ingress and tc on ingress and egress of `iface`; replaces our own earlier programs
    /// atomically.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> anyhow::Result<()> {
        // Before XDP starts handing packets over (remote flows through a tunnel, say, and pods'
        // with `--redirect-to-pods`): without it they would be lost.
        self.attach_tc(iface, TC_INGRESS_PROGRAM, TcAttachType::Ingress)?;
        let xdp_pin = self
            .pin_dir
            .join("links")
            .join(format!("xdp-{}", pin_name(iface)));
        let ifindex =
            nix::net::if_::if_nametoindex(iface).with_context(|| format!("interface {iface}"))?;
        let pinned = match PinnedLink::from_pin(&xdp_pin) {
            Ok(old) => Some(old),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(e).context("opening the pinned XDP link"),
        };
        // An earlier run's link keeps the mode that run attached it in, unless `mode` names the
        // other one: then it goes, and a new one is attached.
        let generic = crate::netdev::has_generic_xdp(ifindex)?;
        let other_mode = match mode {
            XdpMode::Driver => generic,
            XdpMode::Skb => !generic,
            _ => false,
        };
        let replaced = match pinned {
            Some(_) if other_mode => {
                // Detached now: unpinned, the kernel would only free it later, and an interface
                // takes one XDP program.
                detach_pinned_link(&xdp_pin).context("detaching the earlier run's XDP link")?;
                false
            }
            Some(old) => match aya::programs::xdp::XdpLink::try_from(FdLink::from(old)) {
                Ok(link) => self.xdp()?.attach_to_link(link).is_ok(),
                Err(_) => false,
            },
            None => false,
        };
        if replaced {
            let mode = if generic {
                XDP_MODE_GENERIC
            } else {
                XDP_MODE_NATIVE
            };
            self.mark_xdp(ifindex, Some(mode))?;
        } else {
            // Missing, or left behind by an interface that no longer exists.
            let _ = std::fs::remove_file(&xdp_pin);
            let id = self.attach_xdp(iface, ifindex, mode)?;
            let link: FdLink = self
                .xdp()?
                .take_link(id)?
                .try_into()
                .context("XDP link is not a bpf_link")?;
            link.pin(&xdp_pin)
                .with_context(|| format!("pinning {}", xdp_pin.display()))?;
        }
        self.attach_tc(iface, TC_PROGRAM, TcAttachType::Egress)?;
        tracing::info!(iface, "datapath attached (XDP and tc ingress, tc egress)");
        Ok(())
    }

    /// Attaches XDP to `iface` in `mode`; `Default` is native XDP, else generic where the driver has
    /// none or refuses it (an MTU too large for its XDP, as ENA's 9001 on AWS; offloads a virtio
    /// host will not turn off), as libxdp falls back. The interface is marked in `XDP_IFACES`: as
    /// generic before its program sees a packet, as native once the program runs (only then may
    /// frames be redirected there).
    fn attach_xdp(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> anyhow::Result<aya::programs::xdp::XdpLinkId> {
        let native_refused = if mode == XdpMode::Skb {
            None
        } else {
            self.mark_xdp(ifindex, None)?;
            let native = if mode == XdpMode::Default {
                XdpMode::Driver
            } else {
                mode
            };
            match self.xdp()?.attach(iface, native) {
                Ok(id) => {
                    self.mark_xdp(ifindex, Some(XDP_MODE_NATIVE))?;
                    return Ok(id);
                }
                Err(e) if mode == XdpMode::Default => Some(anyhow::Error::from(e)),
                Err(e) => return Err(e).with_context(|| format!("attaching XDP to {iface}")),
            }
        };
        self.mark_xdp(ifindex, Some(XDP_MODE_GENERIC))?;
        let id =
            self.xdp()?
                .attach(iface, XdpMode::Skb)
                .with_context(|| match &native_refused {
                    Some(native) => {
                        format!("attaching XDP to {iface} (native: {native:#}; generic)")
                    }
                    None => format!("attaching XDP to {iface}"),
                })?;
        if let Some(native) = native_refused {
            tracing::warn!(
                iface,
                native = %format!("{native:#}"),
                "native XDP unavailable here: attached in generic mode, which costs more per packet"
            );
        }
        Ok(id)
    }

    /// Marks interface `ifindex` in `XDP_IFACES` as running XDP in `mode` (`XDP_MODE_*`), or not.
    fn mark_xdp(&mut self, ifindex: u32, mode: Option<u8>) -> anyhow::Result<()> {
        let mut marked = self.xdp_ifaces()?;
        match mode {
            Some(mode) => marked.insert(ifindex, mode, 0),
            None => already_gone(marked.remove(&ifindex)),
        }
        .with_context(|| format!("XDP_IFACES[{ifindex}]"))
    }

    /// Unmarks in `XDP_IFACES` every interface but those in `attached` (ifindexes).
    pub fn unmark_xdp_except(
        &mut self,
        attached: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        let mut marked = self.xdp_ifaces()?;
        let gone: Vec<u32> = marked
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !attached.contains(i))
            .collect();
        for ifindex in gone {
            already_gone(marked.remove(&ifindex))
                .with_context(|| format!("XDP_IFACES[{ifindex}]"))?;
        }
        Ok(())
    }

    /// Whether XDP has passed a packet to tc without metadata (`HANDOFF_BY_TUPLE`): a driver here
    /// keeps none.
    pub fn handed_off_by_tuple(&self) -> anyhow::Result<bool> {
        let map = self
            .ebpf
            .map("HANDOFF_BY_TUPLE")
            .context("no HANDOFF_BY_TUPLE map")?;
        let flag: aya::maps::Array<&aya::maps::MapData, u32> = aya::maps::Array::try_from(map)?;
        Ok(flag.get(&0, 0)? != 0)
    }

    fn xdp_ifaces(
        &mut self,
    ) -> anyhow::Result<aya::maps::HashMap<&mut aya::maps::MapData, u32, u8>> {
        let map = self
            .ebpf
            .map_mut(names::XDP_IFACES)
            .context("no XDP_IFACES map")?;
        Ok(aya::maps::HashMap::try_from(map)?)
    }

    /// The replies program ([`TC_FROM_POD_PROGRAM`]) at tc ingress of each pod interface in `pods`
    /// (index → name), before XDP may send a flow there: one redirected while its replies went
    /// through the stack would meet netfilter's NAT as a connection it never saw begin. Attached once
    /// per run (an earlier run's pinned link gets this run's program); the links of interfaces
    /// no longer in `pods` are unpinned. Returns the interfaces that have it, and the errors of
    /// those it could not be attached to.
    pub fn link_pod_interfaces(
        &mut self,
        pods: &std::collections::BTreeMap<u32, String>,
    ) -> (
        std::collections::BTreeSet<u32>,
        Vec<(String, anyhow::Error)>,
    ) {
        let mut failed = Vec::new();
        self.pod_links.retain(|ifindex| pods.contains_key(ifindex));
        for (&ifindex, name) in pods {
            if self.pod_links.contains(&ifindex) {
                continue;
            }
            let pin = pod_pin(&self.pin_dir, ifindex);
            match self.attach_tc_pinned(name, TC_FROM_POD_PROGRAM, TcAttachType::Ingress, &pin) {
                Ok(()) => {
                    self.pod_links.insert(ifindex);
                }
                Err(e) => failed.push((name.clone(), e)),
            }
        }
        // A deleted pod's interface took its program with it; its pin is all that is left.
        for (pin, ifindex) in pod_link_pins(&self.pin_dir) {
            if !pods.contains_key(&ifindex) {
                let _ = std::fs::remove_file(pin);
            }
        }
        (self.pod_links.clone(), failed)
    }

    fn attach_tc(&mut self, iface: &str, name: &str, at: TcAttachType) -> anyhow::Result<()> {
        let pin = tc_pin(&self.pin_dir, iface, at);
        self.attach_tc_pinned(iface, name, at, &pin)
    }

    fn attach_tc_pinned(
        &mut self,
        iface: &str,
        name: &str,
        at: TcAttachType,
        pin: &Path,
    ) -> anyhow::Result<()> {
        let tc = self.tc_program(name)?;
        let replaced = match PinnedLink::from_pin(pin) {
            Ok(old) => match aya::programs::tc::SchedClassifierLink::try_from(FdLink::from(old)) {
                Ok(link) => tc.attach_to_link(link).is_ok(),
                Err(_) => false,
            },
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(e).with_context(|| format!("opening {}", pin.display())),
        };
        if !replaced {
            let _ = std::fs::remove_file(pin);
            if aya::util::KernelVersion::current()
                .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0))
            {
                // Before TCX, tc programs hang off a clsact qdisc.
                let _ = tc::qdisc_add_clsact(iface);
            }
            let id = tc
                .attach(iface, at)
                .with_context(|| format!("attaching tc {at:?} to {iface}"))?;
            let link = tc.take_link(id)?;
            match FdLink::try_from(link) {
                Ok(link) => {
                    link.pin(pin)
                        .with_context(|| format!("pinning {}", pin.display()))?;
                }
                // Netlink tc attachments (old kernels) live on the qdisc; nothing to pin.
                Err(_) => tracing::debug!(iface, "tc attached via netlink; not pinned"),
            }
        }
        Ok(())
    }
}

impl Datapath {
    /// The node socket hooks on the cgroup `cgroup` (the root: every process of the node), so the
    /// connections and datagrams of the node and its pods to its frontends reach backends too.
    /// `netns`: the cookies of the network namespaces translated besides the node's when not
    /// all are ([`Capacity::sockets_of_every_netns`]; see [`netns_cookie_at`]). Replaces an
    /// earlier run's hooks (both run for a moment: the second finds a backend, not a frontend,
    /// and leaves it).
    pub fn attach_node_sockets(&mut self, cgroup: &Path, netns: &[u64]) -> anyhow::Result<()> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        let mut listed: aya::maps::HashMap<_, u64, u8> = self
            .ebpf
            .map_mut(names::SOCKET_NETNS)
            .context("SOCKET_NETNS map")?
            .try_into()?;
        for &cookie in netns {
            listed
                .insert(cookie, 1, 0)
                .context("adding a network namespace to SOCKET_NETNS")?;
        }
        for name in NODE_SOCKET_PROGRAMS {
            let hook: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into()?;
            load_program(|| hook.load()).with_context(|| format!("verifying {name}"))?;
            // As a bpf_link (Linux >= 5.7, which aya uses there) it sits beside other programs on
            // the cgroup whatever the mode; link_create refuses the multi flag itself.
            let id = hook
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link = hook
                .take_link(id)?
                .try_into()
                .with_context(|| format!("{name}: not a bpf_link"))?;
            self.pin_node_socket_link(name, link)?;
        }
        if let Err(e) = self.attach_socket_release(&dir) {
            tracing::warn!("{e:#}: pairs of closed sockets only age out of SOCKET_PEERS");
        }
        tracing::info!(cgroup = %cgroup.display(), "node socket hooks attached");
        Ok(())
    }

    fn attach_socket_release(&mut self, cgroup: &std::fs::File) -> anyhow::Result<()> {
        let name = SOCKET_RELEASE_PROGRAM;
        let hook: &mut CgroupSock = program(&mut self.ebpf, name)?.try_into()?;
        load_program(|| hook.load()).with_context(|| format!("verifying {name}"))?;
        let id = hook
            .attach(cgroup, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name}"))?;
        let link = hook
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{name}: not a bpf_link"))?;
        self.pin_node_socket_link(name, link)
    }

    /// Pins a node socket hook's link in place of an earlier run's, which is detached once its
    /// pin is gone.
    fn pin_node_socket_link(&self, name: &str, link: FdLink) -> anyhow::Result<()> {
        let pin = node_socket_pin(&self.pin_dir, name);
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }

    /// Detaches the programs an earlier run attached to interfaces other than `keep` (an
    /// interface `--iface` no longer selects); returns those interfaces' names.
    pub fn detach_other_interfaces(&self, keep: &[String]) -> Vec<String> {
        let mut detached = std::collections::BTreeSet::new();
        for (pin, ifaces) in interface_links(&self.pin_dir) {
            if ifaces.iter().any(|i| keep.contains(i)) {
                continue;
            }
            if std::fs::remove_file(pin).is_ok() {
                detached.insert(ifaces[0].clone());
            }
        }
        detached.into_iter().collect()
    }

    /// Detaches an earlier run's node socket hooks (`--translate-node-sockets false`).
    pub fn detach_node_sockets(&self) {
        for name in NODE_SOCKET_PROGRAMS.iter().chain([&SOCKET_RELEASE_PROGRAM]) {
            let _ = std::fs::remove_file(node_socket_pin(&self.pin_dir, name));
        }
    }
}

/// The pinned links of the interfaces' programs, each with the interface(s) its name may be of:
/// `tc-ingress-eth0` is eth0's ingress link, or the egress link of an `ingress-eth0`.
fn interface_links(pin_dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            let ifaces: Vec<String> = ["xdp-", "tc-ingress-", "tc-"]
                .iter()
                .filter_map(|prefix| file.strip_prefix(prefix))
                .map(iface_of_pin_name)
                .collect();
            (!ifaces.is_empty()).then(|| (entry.path(), ifaces))
        })
        .collect()
}

/// The interfaces of this network namespace the XDP program is attached to (by the pins under
/// `pin_dir`; a deleted interface's pin stays until the agent attaches there again), sorted.
pub fn attached_interfaces(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = interface_links(pin_dir)
        .into_iter()
        .filter(|(pin, _)| {
            pin.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("xdp-"))
        })
        .map(|(_, ifaces)| ifaces[0].clone())
        .filter(|name| nix::net::if_::if_nametoindex(name.as_str()).is_ok())
        .collect();
    names.sort();
    names
}

/// The interfaces of this network namespace marked as running generic XDP (in `XDP_IFACES`),
/// sorted; none when the map cannot be read.
pub fn generic_xdp_interfaces(pin_dir: &Path) -> Vec<String> {
    let Ok(map) = open_map(pin_dir, names::XDP_IFACES) else {
        return Vec::new();
    };
    let Ok(map) = aya::maps::HashMap::<_, u32, u8>::try_from(Map::HashMap(map)) else {
        return Vec::new();
    };
    sorted_names(
        map.iter()
            .filter_map(Result::ok)
            .filter(|(_, mode)| *mode == XDP_MODE_GENERIC)
            .map(|(ifindex, _)| ifindex),
    )
}

/// The pod interfaces of this network namespace the replies program is attached to (by the pins
/// under `pin_dir`), sorted.
pub fn linked_pod_interfaces(pin_dir: &Path) -> Vec<String> {
    sorted_names(
        pod_link_pins(pin_dir)
            .into_iter()
            .map(|(_, ifindex)| ifindex),
    )
}

/// The names of the interfaces of this network namespace among `ifindexes`, sorted (those gone
/// left out).
fn sorted_names(ifindexes: impl Iterator<Item = u32>) -> Vec<String> {
    let mut names: Vec<String> = ifindexes
        .filter_map(|ifindex| nix::net::if_::if_indextoname(ifindex).ok())
        .filter_map(|name| name.into_string().ok())
        .collect();
    names.sort();
    names
}

fn node_socket_pin(pin_dir: &Path, program: &str) -> PathBuf {
    let hook = program.trim_start_matches("exposure_");
    pin_dir.join("links").join(format!("sock-{hook}"))
}

/// Where the link of a tc program on `iface` is pinned (egress keeps its original name).
fn tc_pin(pin_dir: &Path, iface: &str, at: TcAttachType) -> PathBuf {
    let name = match at {
        TcAttachType::Ingress => format!("tc-ingress-{}", pin_name(iface)),
        _ => format!("tc-{}", pin_name(iface)),
    };
    pin_dir.join("links").join(name)
}

/// `iface` as it goes into a pin's name: bpffs refuses names with a dot (reserved), which VLANs
/// (`eth0.100`) and flannel's `flannel.1` have; so `.` is written `%2e`, and `%` itself `%25`.
fn pin_name(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

/// The interface name in a pin's name ([`pin_name`] undone).
fn iface_of_pin_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = &rest[at..];
        if let Some(after) = code.strip_prefix("%2e") {
            out.push('.');
            rest = after;
        } else if let Some(after) = code.strip_prefix("%25") {
            out.push('%');
            rest = after;
        } else {
            out.push('%');
            rest = &code[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Where the link of the replies program on pod interface `ifindex` is pinned: by index, as a
/// new pod's interface may take a deleted one's name.
fn pod_pin(pin_dir: &Path, ifindex: u32) -> PathBuf {
    pin_dir.join("links").join(format!("pod-{ifindex}"))
}

/// The pinned links of the replies program, each with its pod interface's index.
fn pod_link_pins(pin_dir: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name();
            let ifindex = file.to_str()?.strip_prefix("pod-")?.parse().ok()?;
            Some((entry.path(), ifindex))
        })
        .collect()
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}

/// The entries of an earlier build's `MAGLEV` array (one entry per element), up to its last one in
/// use, before [`drop_incompatible_pins`] replaces it: the pinned services point into it, and a
/// fresh array would leave them without backends until the first sync (longer with the API
/// server away).
fn earlier_maglev_tables(pin_dir: &Path) -> Option<Vec<u32>> {
    let path = pin_dir.join(names::MAGLEV);
    let info = MapInfo::from_pin(&path).ok()?;
    if info.value_size() != 4 {
        return None;
    }
    let earlier = MaglevArray::open(MapData::from_pin(&path).ok()?).ok()?;
    let mut entries = earlier.read(0, earlier.entries).ok()?;
    entries.truncate(entries.iter().rposition(|id| *id != 0).map_or(0, |i| i + 1));
    Some(entries)
}

/// Writes an earlier build's Maglev entries into this build's array, at the same offsets.
fn carry_maglev_over(pin_dir: &Path, entries: &[u32]) {
    let carried = open_map(pin_dir, names::MAGLEV)
        .and_then(MaglevArray::open)
        .and_then(|mut maglev| {
            let fits = entries.len().min(maglev.entries as usize);
            maglev.write(0, &entries[..fits])?;
            Ok(fits)
        });
    match carried {
        Ok(n) => tracing::info!(
            entries = n,
            "Maglev tables carried over from an earlier build's array (half the size per entry now)"
        ),
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "could not carry the Maglev tables over; rewritten at the first sync"
        ),
    }
}

/// A pinned map from an older, incompatible build would be silently misread: unpin it (losing only
/// that map's state) so a fresh one is created.
fn drop_incompatible_pins(pin_dir: &Path, capacity: &Capacity) {
    for name in names::RETIRED {
        let path = pin_dir.join(name);
        if path.exists() {
            tracing::warn!(map = name, "unpinning a map this build no longer uses");
            let _ = std::fs::remove_file(&path);
        }
    }
    for name in names::ALL {
        let path = pin_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        if let Some((k, v, flags)) = expected_layout(name) {
            let resized = capacity.of(name).is_some_and(|n| n != info.max_entries());
            let layout = (info.key_size(), info.value_size(), info.map_flags());
            if layout != (k, v, flags) || resized {
                tracing::warn!(
                    map = name,
                    "pinned map has another layout, capacity or flags; recreating it (its state is lost)"
                );
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Removes everything pinned under `pin_dir`: detaches the programs and frees the maps.
pub fn unpin_all(pin_dir: &Path) -> anyhow::Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(())
}

/// A pinned LRU hash map of the agent's (`SOCKET_PEERS`, say), to read.
pub fn open_pinned_lru<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> anyhow::Result<aya::maps::HashMap<MapData, K, V>> {
    let data = open_map(pin_dir, name)?;
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
        .with_context(|| format!("{name} is not an LRU hash map of the expected types"))
}

fn open_map(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the agent running with this --pin-dir?)",
            path.display()
        )
    })
}

/// Typed handles on the pinned maps.
pub struct KernelMaps {
    pub frontends4: HashMap<MapData, FrontendKey4, Frontend>,
    pub frontends6: HashMap<MapData, FrontendKey, Frontend>,
    pub services: Array<MapData, Service>,
    pub maglev: MaglevArray,
    pub backends: Array<MapData, Backend>,
    pub flows4: HashMap<MapData, FlowKey4, Flow>,
    pub flows6: HashMap<MapData, FlowKey, Flow>,
    pub replies4: HashMap<MapData, FlowKey4, Reply>,
    pub replies6: HashMap<MapData, FlowKey, Reply>,
    pub node_addrs: HashMap<MapData, NodeAddrKey, Addr>,
    pub stats: PerCpuArray<MapData, u64>,
    pub neigh_misses: HashMap<MapData, Addr, u32>,
    pub frontend_stats: PerCpuArray<MapData, exposure_common::Traffic>,
    pub affinity: HashMap<MapData, exposure_common::AffinityKey, exposure_common::Affinity>,
    pub source_ranges: aya::maps::LpmTrie<MapData, exposure_common::SourceRange, u32>,
    pub pod_ifaces: aya::maps::DevMapHash<MapData>,
    pub frontend_ports: Array<MapData, u64>,
}

impl KernelMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let hash = |name| open_map(pin_dir, name).map(Map::HashMap);
        let lru = |name| open_map(pin_dir, name).map(Map::LruHashMap);
        let array = |name| open_map(pin_dir, name).map(Map::Array);
        Ok(KernelMaps {
            frontends4: hash(names::FRONTENDS4)?.try_into()?,
            frontends6: hash(names::FRONTENDS6)?.try_into()?,
            services: array(names::SERVICES)?.try_into()?,
            maglev: MaglevArray::open(open_map(pin_dir, names::MAGLEV)?)?,
            backends: array(names::BACKENDS)?.try_into()?,
            flows4: lru(names::FLOWS4)?.try_into()?,
            flows6: lru(names::FLOWS6)?.try_into()?,
            replies4: lru(names::REPLIES4)?.try_into()?,
            replies6: lru(names::REPLIES6)?.try_into()?,
            node_addrs: hash(names::NODE_ADDRS)?.try_into()?,
            stats: open_map(pin_dir, names::STATS)
                .map(Map::PerCpuArray)?
                .try_into()?,
            neigh_misses: hash(names::NEIGH_MISSES)?.try_into()?,
            frontend_stats: open_map(pin_dir, names::FRONTEND_STATS)
                .map(Map::PerCpuArray)?
                .try_into()?,
            affinity: lru(names::AFFINITY)?.try_into()?,
            source_ranges: open_map(pin_dir, names::SOURCE_RANGES)
                .map(Map::LpmTrie)?
                .try_into()?,
            pod_ifaces: open_map(pin_dir, names::POD_IFACES)
                .map(Map::DevMapHash)?
                .try_into()?,
            frontend_ports: array(names::FRONTEND_PORTS)?.try_into()?,
        })
    }

    /// Sets the SNAT source address of `addr`'s family for flows leaving through `ifindex`.
    pub fn set_node_addr(&mut self, ifindex: u32, addr: std::net::IpAddr) -> anyhow::Result<()> {
        let addr = Addr::from(addr);
        let key = NodeAddrKey {
            ifindex,
            family: addr.family(),
        };
        self.node_addrs.insert(key, addr, 0)?;
        Ok(())
    }

    /// The SNAT source addresses in `NODE_ADDRS`.
    pub fn snat_sources(
        &self,
    ) -> anyhow::Result<std::collections::HashMap<NodeAddrKey, std::net::IpAddr>> {
        let mut sources = std::collections::HashMap::new();
        for item in self.node_addrs.iter() {
            let (key, addr) = item.context("reading NODE_ADDRS")?;
            sources.insert(key, std::net::IpAddr::from(addr));
        }
        Ok(sources)
    }

    /// No SNAT source for that interface and family (it has no address of that family now).
    pub fn clear_node_addr(&mut self, key: &NodeAddrKey) -> anyhow::Result<()> {
        already_gone(self.node_addrs.remove(key)).with_context(|| format!("NODE_ADDRS {key:?}"))
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self.stats.get(&(*c as u32), 0)?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Takes the next hops (and their interface) the datapath found no neighbour entry for.
    pub fn take_neighbor_misses(&mut self) -> Vec<(std::net::IpAddr, u32)> {
        let misses: Vec<(Addr, u32)> = self.neigh_misses.iter().filter_map(Result::ok).collect();
        for (a, _) in &misses {
            let _ = self.neigh_misses.remove(a);
        }
        misses
            .into_iter()
            .map(|(a, ifindex)| (std::net::IpAddr::from(a), ifindex))
            .collect()
    }

    /// Makes `POD_IFACES` hold exactly `ifindexes`; returns how many entries changed.
    pub fn set_pod_ifaces(
        &mut self,
        ifindexes: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<usize> {
        let current: std::collections::BTreeSet<u32> =
            self.pod_ifaces.keys().filter_map(Result::ok).collect();
        let mut changed = 0;
        for gone in current.difference(ifindexes) {
            // An interface that vanished may be gone from the map already.
            let _ = self.pod_ifaces.remove(*gone);
            changed += 1;
        }
        for new in ifindexes.difference(&current) {
            self.pod_ifaces
                .insert(*new, *new, None, 0)
                .with_context(|| format!("POD_IFACES[{new}]"))?;
            changed += 1;
        }
        Ok(changed)
    }

    pub fn flow_count(&self) -> usize {
        count_entries(&self.flows4) + count_entries(&self.flows6)
    }

    /// The frontends (address, port) of the TCP flows that are still alive under `lifetimes`:
    /// what draining frontends still serve. The node's own connections' entries go through none.
    pub fn tcp_frontends_in_use(
        &self,
        lifetimes: &exposure_common::FlowLifetimes,
    ) -> std::collections::BTreeSet<(exposure_common::Addr, u16)> {
        let now = datapath_clock_ns();
        let mut in_use = std::collections::BTreeSet::new();
        let mut visit = |k: FlowKey, f: Flow| {
            if k.proto == exposure_common::PROTO_TCP
                && f.flags & exposure_common::FLOW_HOST == 0
                && exposure_common::flow_alive(k.proto, f.flags, f.last_seen_ns, now, lifetimes)
            {
                in_use.insert((k.daddr, k.dport));
            }
        };
        for_each_entry(&self.flows4, |k, f| visit(FlowKey::from(k), f));
        for_each_entry(&self.flows6, &mut visit);
        in_use
    }

    /// Every tracked flow's key, both families.
    pub fn flow_keys(&self) -> Vec<FlowKey> {
        let mut keys = Vec::new();
        for_each_entry(&self.flows4, |k, _| keys.push(FlowKey::from(k)));
        for_each_entry(&self.flows6, |k, _| keys.push(k));
        keys
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        if key.is_v4() {
            self.flows4.get(&key.v4(), 0).ok()
        } else {
            self.flows6.get(key, 0).ok()
        }
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> anyhow::Result<()> {
        let removed = if key.is_v4() {
            self.flows4.remove(&key.v4())
        } else {
            self.flows6.remove(key)
        };
        already_gone(removed).with_context(|| format!("FLOWS {key:?}"))
    }

    pub fn insert_reply(&mut self, key: &FlowKey, reply: &Reply) -> anyhow::Result<()> {
        let inserted = if key.is_v4() {
            self.replies4.insert(key.v4(), reply, 0)
        } else {
            self.replies6.insert(key, reply, 0)
        };
        inserted.with_context(|| format!("REPLIES {key:?}"))
    }

    pub fn frontend(&self, key: &FrontendKey) -> Option<Frontend> {
        if key.addr.is_v4() {
            self.frontends4.get(&key.v4(), 0).ok()
        } else {
            self.frontends6.get(key, 0).ok()
        }
    }
}

impl DatapathMaps for KernelMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("BACKENDS[{id}]"))
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends
            .set(id, Backend::default(), 0)
            .with_context(|| format!("BACKENDS[{id}]"))
    }
    fn write_table(&mut self, offset: u32, entries: &[u32]) -> anyhow::Result<()> {
        self.maglev.write(offset, entries)
    }
    fn write_service(&mut self, id: u32, service: &Service) -> anyhow::Result<()> {
        self.services
            .set(id, service, 0)
            .with_context(|| format!("SERVICES[{id}]"))
    }
    fn write_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> anyhow::Result<()> {
        let written = if key.addr.is_v4() {
            self.frontends4.insert(key.v4(), frontend, 0)
        } else {
            self.frontends6.insert(key, frontend, 0)
        };
        written.with_context(|| format!("FRONTENDS {key:?}"))
    }
    fn remove_frontend(&mut self, key: &FrontendKey) -> anyhow::Result<()> {
        let removed = if key.addr.is_v4() {
            self.frontends4.remove(&key.v4())
        } else {
            self.frontends6.remove(key)
        };
        already_gone(removed).with_context(|| format!("FRONTENDS {key:?}"))
    }
    fn write_frontend_ports(&mut self, word: u32, bits: u64) -> anyhow::Result<()> {
        self.frontend_ports
            .set(word, bits, 0)
            .with_context(|| format!("FRONTEND_PORTS[{word}]"))
    }
    fn add_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()> {
        let key = range_key(service_id, addr, prefix_len);
        self.source_ranges
            .insert(&key, 1, 0)
            .with_context(|| format!("SOURCE_RANGES service {service_id}"))
    }
    fn remove_source_range(
        &mut self,
        service_id: u32,
        addr: Addr,
        prefix_len: u8,
    ) -> anyhow::Result<()> {
        already_gone(
            self.source_ranges
                .remove(&range_key(service_id, addr, prefix_len)),
        )
        .with_context(|| format!("SOURCE_RANGES service {service_id}"))
    }
    fn sweep_affinity(
        &mut self,
        live: &std::collections::BTreeMap<u32, std::collections::BTreeSet<u32>>,
    ) -> anyhow::Result<usize> {
        let mut stale: Vec<exposure_common::AffinityKey> = Vec::new();
        for_each_entry(&self.affinity, |k, a| {
            let current = live.get(&k.service_id);
            if !current.is_some_and(|backends| backends.contains(&a.backend_id)) {
                stale.push(k);
            }
        });
        let forgotten = stale.len();
        for k in stale {
            let _ = self.affinity.remove(&k); // an LRU may have evicted it meanwhile
        }
        Ok(forgotten)
    }
    fn purge_udp_flows(&mut self, service_id: u32, backends: &[u32]) -> anyhow::Result<()> {
        // The node's own connections' entries belong to no Service.
        let stale = |k: &FlowKey, f: &Flow| {
            k.proto == exposure_common::PROTO_UDP
                && f.flags & exposure_common::FLOW_HOST == 0
                && f.service_id == service_id
                && backends.contains(&f.backend_id)
        };
        let (mut stale4, mut stale6): (Vec<FlowKey4>, Vec<FlowKey>) = Default::default();
        for_each_entry(&self.flows4, |k, f| {
            if stale(&FlowKey::from(k), &f) {
                stale4.push(k);
            }
        });
        for_each_entry(&self.flows6, |k, f| {
            if stale(&k, &f) {
                stale6.push(k);
            }
        });
        // An LRU may have evicted one meanwhile.
        for k in stale4 {
            let _ = self.flows4.remove(&k);
        }
        for k in stale6 {
            let _ = self.flows6.remove(&k);
        }
        Ok(())
    }
    fn reset_frontend_stats(&mut self, id: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![exposure_common::Traffic::default(); cpus])?;
        self.frontend_stats
            .set(id, zeros, 0)
            .with_context(|| format!("FRONTEND_STATS[{id}]"))
    }
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.read_snapshot(u32::MAX, u32::MAX, false)
    }
}

impl KernelMaps {
    /// What a check of what the reconciler wrote ([`crate::sync::Reconciler::differences`])
    /// needs: [`DatapathMaps::snapshot`] with only the first `services` and `backends` entries
    /// of those arrays (each is a syscall), and the Maglev tables' digests, not their entries.
    pub fn check_snapshot(&self, services: u32, backends: u32) -> anyhow::Result<Snapshot> {
        self.read_snapshot(services, backends, true)
    }

    fn read_snapshot(
        &self,
        services: u32,
        backends: u32,
        digests: bool,
    ) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot::default();
        for key in self.source_ranges.keys() {
            let key = key?;
            let r = key.data();
            s.source_ranges.insert((
                r.service_id,
                r.addr,
                exposure_common::source_range_len(&r.addr, key.prefix_len()),
            ));
        }
        for item in self.frontends4.iter() {
            let (k, v) = item?;
            s.frontends.insert(k.into(), v);
        }
        for item in self.frontends6.iter() {
            let (k, v) = item?;
            s.frontends.insert(k, v);
        }
        // Arrays hold every index; only ids in use matter. Ids 0.. are dense, so scan the used prefix.
        let mut services_in_use = Vec::new();
        for_each_element(&self.services, services as usize, |id, v| {
            if v != Service::default() {
                services_in_use.push((id, v));
            }
        })?;
        for (id, v) in services_in_use {
            s.services.insert(id, v);
            let ids = self.maglev.read(v.table_offset, v.table_size)?;
            let table = if digests {
                TableRead::Digest(TableRead::digest_of(ids.into_iter()))
            } else {
                TableRead::Entries(ids)
            };
            s.tables.insert(id, table);
        }
        for_each_element(&self.backends, backends as usize, |id, v| {
            if v.addr != Addr::default() {
                s.backends.insert(id, v);
            }
        })?;
        for_each_element(&self.frontend_ports, usize::MAX, |word, bits| {
            if bits != 0 {
                s.frontend_ports.insert(word, bits);
            }
        })?;
        Ok(s)
    }
}

/// The `MAGLEV` array mapped into memory (`BPF_F_MMAPABLE`): a service's whole table is written with
/// plain stores, not one syscall per entry, before the service entry points at it.
pub struct MaglevArray {
    map: MapData,
    entries: u32,
    /// u32 words per entry in the mapping: 1 (two entries per element), or 2 in an earlier build's
    /// array (one entry per element, its value rounded up to 8 bytes).
    stride: usize,
    /// Mapped on first use: readers of other maps (e.g. `/metrics`) never map it. Shared with
    /// the maps check's reader ([`MaglevArray::share_mapping`]): the kernel maps a BPF array's
    /// every page at mmap time, so each mapping of its own would cost the whole array again in
    /// page tables and resident size (48 MB for 12M entries), once a minute.
    mapping: MaglevMapping,
}

/// The process's mapping of the `MAGLEV` array, made once and shared.
#[derive(Clone, Default)]
pub struct MaglevMapping(std::sync::Arc<std::sync::OnceLock<Mapping>>);

struct Mapping {
    ptr: *mut u32,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through &self/&mut self.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `MaglevArray::mapped` mapped, once nothing shares it.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// Bytes per array element: two entries of 4 ([`exposure_common::MAGLEV_ENTRIES_PER_ELEMENT`]), so
/// that entry `e` is the mapping's u32 word `e` (an earlier build's array: one entry of 4).
const ELEM_BYTES: usize = 8;

impl MaglevArray {
    fn open(map: MapData) -> anyhow::Result<Self> {
        let info = map.info().context("MAGLEV map info")?;
        let (elements, one_per_element) = (info.max_entries(), info.value_size() == 4);
        let (entries, stride) = if one_per_element {
            (elements, 2)
        } else {
            let per_element = exposure_common::MAGLEV_ENTRIES_PER_ELEMENT;
            (elements.saturating_mul(per_element), 1)
        };
        Ok(MaglevArray {
            map,
            entries,
            stride,
            mapping: MaglevMapping::default(),
        })
    }

    /// This array's mapping, to share with another handle on the same pinned map.
    pub fn mapping(&self) -> MaglevMapping {
        self.mapping.clone()
    }

    /// Uses `mapping` (another handle's on the same pinned map) instead of a mapping of its own.
    pub fn share_mapping(&mut self, mapping: MaglevMapping) {
        self.mapping = mapping;
    }

    fn mapped(&self) -> anyhow::Result<*mut u32> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        if let Some(m) = self.mapping.0.get() {
            return Ok(m.ptr);
        }
        let elements = self.entries as usize * self.stride / 2;
        let bytes = (elements * ELEM_BYTES).div_ceil(4096) * 4096;
        let fd = self.map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's own memory, sized to the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mapping the MAGLEV array: {}", io::Error::last_os_error());
        }
        let mapping = Mapping {
            ptr: ptr.cast(),
            bytes,
        };
        // Another thread may have mapped it meanwhile: then this one is dropped (unmapped).
        let _ = self.mapping.0.set(mapping);
        Ok(self
            .mapping
            .0
            .get()
            .map(|m| m.ptr)
            .unwrap_or(std::ptr::null_mut()))
    }

    fn range(&self, offset: u32, len: usize) -> anyhow::Result<std::ops::Range<usize>> {
        let start = offset as usize;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.entries as usize);
        end.map(|end| start..end).with_context(|| {
            format!(
                "MAGLEV[{start}..+{len}] is outside its {} entries",
                self.entries
            )
        })
    }

    pub fn write(&mut self, offset: u32, entries: &[u32]) -> anyhow::Result<()> {
        let r = self.range(offset, entries.len())?;
        let base = self.mapped()?;
        for (i, id) in r.zip(entries) {
            // SAFETY: element i is inside the mapping (range checked above).
            unsafe { base.add(i * self.stride).write_volatile(*id) };
        }
        // Orders the table before the service-entry update (a syscall) that makes it live.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn read(&self, offset: u32, len: u32) -> anyhow::Result<Vec<u32>> {
        let r = self.range(offset, len as usize)?;
        let base = self.mapped()?;
        // SAFETY: every element in range is inside the mapping.
        Ok(
            r.map(|i| unsafe { base.add(i * self.stride).read_volatile() })
                .collect(),
        )
    }
}

/// Now on the datapath's clock (`bpf_ktime_get_coarse_ns`: the monotonic clock, coarse), in
/// which flows' `last_seen_ns` are written.
pub fn datapath_clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Cannot fail for this clock with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every entry of a hash map, read `BPF_MAP_LOOKUP_BATCH` at a time (Linux 5.6; earlier kernels
/// walk the keys and look each one up): thousands per system call, where the walk takes two per
/// entry (a full flow table of 262,144 entries: 0.3 s to walk its keys, 83 ms in batches). Entries
/// that come and go meanwhile may be seen or not, as with the walk.
fn for_each_entry<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<MapData, K, V>,
    mut visit: impl FnMut(K, V),
) {
    use aya::maps::IterableMap as _;
    if lookup_batches(map.map(), usize::MAX, &mut visit).is_err() {
        map.iter()
            .filter_map(Result::ok)
            .for_each(|(k, v)| visit(k, v));
    }
}

/// The first `limit` elements of an array, in index order, as [`for_each_entry`] reads a hash
/// map's (an array of 65,536 Services: 65,536 system calls one by one, 16 in batches).
fn for_each_element<V: aya::Pod>(
    array: &Array<MapData, V>,
    limit: usize,
    mut visit: impl FnMut(u32, V),
) -> Result<(), aya::maps::MapError> {
    use aya::maps::IterableMap as _;
    if lookup_batches(array.map(), limit, &mut visit).is_err() {
        for (i, v) in array.iter().take(limit).enumerate() {
            visit(i as u32, v?);
        }
    }
    Ok(())
}

/// Reads `map`'s entries with `BPF_MAP_LOOKUP_BATCH` (hash maps and arrays alike: a token names
/// where the next batch starts) until `limit` are visited. Err: the kernel has no batches for this
/// map, and nothing was visited.
fn lookup_batches<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    limit: usize,
    visit: &mut impl FnMut(K, V),
) -> Result<(), ()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    /// `union bpf_attr`'s member for the batch commands.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 4096;
    let (key_size, value_size) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u8; CHUNK * key_size];
    let mut values = vec![0u8; CHUNK * value_size];
    // Where the next batch starts: a hash map's bucket index or an array's last index (4 bytes),
    // room for 8.
    let (mut next, mut after) = (0u64, 0u64);
    let mut left = limit;
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        if left == 0 {
            return Ok(());
        }
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &next as *const u64 as u64 },
            out_batch: &mut after as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK.min(left) as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and values, and at the tokens.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let errno = (r != 0).then(|| io::Error::last_os_error().raw_os_error());
        if errno.is_some() && errno != Some(Some(libc::ENOENT)) {
            // No batch commands (before 5.6), or a bucket larger than a batch: the caller walks
            // the keys (only on the first call: a later failure would visit entries twice).
            return if first { Err(()) } else { Ok(()) };
        }
        let got = (attr.count as usize).min(CHUNK).min(left);
        for i in 0..got {
            // SAFETY: the kernel wrote `count` keys and values of these sizes; `Pod` types
            // have no invalid bit patterns.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                )
            };
            visit(k, v);
        }
        left -= got;
        // ENOENT: that was the last batch.
        if errno.is_some() {
            return Ok(());
        }
        next = after;
    }
    Ok(())
}

/// The number of entries of a hash map (see [`for_each_entry`]).
fn count_entries<K: aya::Pod, V: aya::Pod>(map: &aya::maps::HashMap<MapData, K, V>) -> usize {
    let mut n = 0;
    for_each_entry(map, |_, _| n += 1);
    n
}

/// Detaches the BPF link pinned at `pin` from its hook at once (`BPF_LINK_DETACH`, Linux 5.9),
/// whoever holds it.
fn detach_pinned_link(pin: &Path) -> io::Result<()> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 2]| {
        // SAFETY: `attr` is a zeroed, large enough `union bpf_attr` for both commands.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as u32,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // `obj_get`: the path, then the fd and flags (zero).
    let fd = bpf(BPF_OBJ_GET, &mut [path.as_ptr() as u64, 0])?;
    // SAFETY: BPF_OBJ_GET returned a new fd, owned from here on.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // `link_detach`: the link's fd.
    bpf(BPF_LINK_DETACH, &mut [link.as_raw_fd() as u64, 0]).map(drop)
}

/// A removal whose key is already gone (e.g. evicted, or removed by an earlier failed sync) is done.
/// (aya reports a hash map's missing key on removal as the syscall's ENOENT.)
fn already_gone(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// LPM key: the service id's 32 bits are always in the prefix, then the network's.
fn range_key(
    service_id: u32,
    addr: Addr,
    prefix_len: u8,
) -> aya::maps::lpm_trie::Key<exposure_common::SourceRange> {
    aya::maps::lpm_trie::Key::new(
        exposure_common::source_range_prefix(&addr, prefix_len),
        exposure_common::SourceRange { service_id, addr },
    )
}

/// How often a program load is tried while the kernel answers EAGAIN (libbpf's number).
const PROGRAM_LOAD_ATTEMPTS: u32 = 5;

/// Runs `load` (BPF_PROG_LOAD) again while it fails with EAGAIN, as libbpf does: the verifier
/// gives up that way when a signal is pending for the loading thread, which says nothing about the
/// program (seen once in CI, with tests starting processes beside a half-second verification).
fn load_program(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { ref io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN)
                    && attempt < PROGRAM_LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Fails early with a clear message when not root / no BPF capability.
pub fn check_privileges() -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    bail!("exposure needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON) to load and attach eBPF programs")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LLVM turns a 16-byte copy between two places it cannot tell apart (a map value and the
    /// frame) into a call of `memmove`, which copies a byte per loop: two such calls were a
    /// seventh of an IPv6 packet's time. The programs write addresses a word at a time instead;
    /// no call of `memmove` may come back.
    #[test]
    fn no_program_calls_memmove() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        let file = object::File::parse(EBPF_OBJECT).expect("the eBPF object parses");
        let memmove = file
            .symbols()
            .find(|s| s.name() == Ok("memmove"))
            .map(|s| s.index());
        let mut relocations = 0;
        let mut calls = Vec::new();
        for section in file.sections() {
            for (offset, r) in section.relocations() {
                relocations += 1;
                if matches!(r.target(), RelocationTarget::Symbol(i) if Some(i) == memmove) {
                    calls.push(format!("{} +{offset:#x}", section.name().unwrap_or("?")));
                }
            }
        }
        assert!(relocations > 100, "relocations read: {relocations}");
        assert!(calls.is_empty(), "calls of memmove at {calls:?}");
    }

    #[test]
    fn interface_names_in_pins_have_no_dot_and_come_back_whole() {
        for (iface, pin) in [
            ("eth0", "eth0"),
            ("eth0.100", "eth0%2e100"),
            ("flannel.1", "flannel%2e1"),
            ("a%2eb", "a%252eb"),
            ("x.%.y", "x%2e%25%2ey"),
        ] {
            assert_eq!(pin_name(iface), pin);
            assert!(!pin_name(iface).contains('.'));
            assert_eq!(iface_of_pin_name(pin), iface);
        }
        // Pins of earlier builds (names without a dot or percent) read as they are.
        assert_eq!(iface_of_pin_name("bond0"), "bond0");
        assert_eq!(iface_of_pin_name("odd%zz"), "odd%zz");
    }

    #[test]
    fn removing_a_key_that_is_gone_is_done_and_other_errors_stay() {
        let syscall = |errno| {
            Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            }))
        };
        assert!(already_gone(syscall(libc::ENOENT)).is_ok());
        assert!(already_gone(Err(aya::maps::MapError::KeyNotFound)).is_ok());
        assert!(already_gone(syscall(libc::EPERM)).is_err());
    }

    #[test]
    fn socket_namespaces_are_all_host_or_absolute_paths() {
        use SocketNamespaces::*;
        assert_eq!("all".parse(), Ok(All));
        assert_eq!("host".parse(), Ok(Node));
        assert_eq!(
            "/run/netns/a, /proc/1/ns/net".parse(),
            Ok(Listed(vec!["/run/netns/a".into(), "/proc/1/ns/net".into()]))
        );
        for bad in [
            "",
            "pods",
            "/run/netns/a,",
            "all,/run/netns/a",
            "run/netns/a",
        ] {
            let err = bad.parse::<SocketNamespaces>().expect_err(bad);
            assert!(err.contains("absolute path"), "{bad:?}: {err}");
        }
        // SOCKET_NETNS's size.
        let many = |n: usize| vec!["/run/netns/x"; n].join(",");
        let max = exposure_common::MAX_SOCKET_NETNS as usize;
        assert!(many(max).parse::<SocketNamespaces>().is_ok());
        let err = many(max + 1).parse::<SocketNamespaces>().unwrap_err();
        assert!(err.contains("at most 256"), "{err}");
    }

    #[test]
    fn a_namespace_files_cookie_is_that_of_its_sockets() {
        let own = netns_cookie().expect("SO_NETNS_COOKIE");
        assert_eq!(
            netns_cookie_at(Path::new("/proc/self/ns/net")).unwrap(),
            own
        );
        // Another namespace has another cookie.
        let other = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let file = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
            (netns_cookie().unwrap(), file)
        })
        .join()
        .unwrap();
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&other.1)
        );
        let cookie = netns_cookie_at(Path::new(&path)).unwrap();
        assert_eq!(cookie, other.0);
        assert_ne!(cookie, own);
        let err = netns_cookie_at(Path::new("/proc/self/ns/mnt")).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a network namespace"),
            "{err:#}"
        );
        let err = netns_cookie_at(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/ns"), "{err:#}");
    }

    fn load_error(errno: i32) -> ProgramError {
        ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        }
    }

    #[test]
    fn the_cgroup2_root_is_found_in_mountinfo() {
        // A hybrid host (systemd's "unified" beside v1 controllers), as this test machine.
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A subtree bound into a container is not the root; an escaped space is unescaped; the
        // optional tags may be absent.
        let bound = "\
40 30 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:30 / /run/my\\040cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(bound), Some(PathBuf::from("/run/my cgroup")));
        assert_eq!(
            cgroup2_mount("27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn without_a_cgroup2_mount_one_is_made() {
        const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
        // On a thread with a mount namespace of its own, every cgroup2 mount detached there.
        let found = std::thread::spawn(|| -> anyhow::Result<(PathBuf, bool)> {
            use nix::mount::{mount, umount2, MntFlags, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
            mount(None::<&str>, "/", None::<&str>, private, None::<&str>)?;
            for _ in 0..16 {
                let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
                let Some(at) = cgroup2_mount(&mountinfo) else {
                    break;
                };
                umount2(&at, MntFlags::MNT_DETACH)?;
            }
            let root = cgroup2_root()?;
            let fs = nix::sys::statfs::statfs(&root)?.filesystem_type().0;
            Ok((root, fs == CGROUP2_SUPER_MAGIC))
        })
        .join()
        .expect("the namespaced thread")
        .expect("cgroup2 found or mounted");
        // The mount went with the thread's namespace; the directories it was made on stay.
        let _ = std::fs::remove_dir(CGROUP2_FALLBACK);
        let _ = std::fs::remove_dir(Path::new(CGROUP2_FALLBACK).parent().unwrap());
        assert_eq!(found, (PathBuf::from(CGROUP2_FALLBACK), true));
    }

    #[test]
    fn program_loads_are_tried_again_only_while_the_kernel_says_eagain() {
        let mut calls = 0;
        let loaded = load_program(|| {
            calls += 1;
            if calls < 3 {
                Err(load_error(libc::EAGAIN))
            } else {
                Ok(())
            }
        });
        assert!(loaded.is_ok());
        assert_eq!(calls, 3);

        let mut calls = 0;
        let always = load_program(|| {
            calls += 1;
            Err(load_error(libc::EAGAIN))
        });
        assert!(always.is_err());
        assert_eq!(calls, PROGRAM_LOAD_ATTEMPTS, "gives up in the end");

        let mut calls = 0;
        let rejected = load_program(|| {
            calls += 1;
            Err(load_error(libc::EACCES))
        });
        assert!(rejected.is_err());
        assert_eq!(calls, 1, "a verifier rejection is final");
    }
}
