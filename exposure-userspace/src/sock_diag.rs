//! Ends connected UDP sockets that the socket hooks sent to an endpoint that has since left its
//! Service, as Cilium's socket LB terminates them (kube-proxy deletes such flows' conntrack
//! entries; a socket connected to the endpoint's own address has no entry to delete). UDP has no
//! end of its own: without this, the application would go on sending into the void. Done with
//! sock_diag's SOCK_DESTROY (`CONFIG_INET_DIAG_DESTROY`), which works in the caller's network
//! namespace only, so each namespace is visited from a thread that enters it.

use std::{
    collections::{BTreeSet, HashSet},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use exposure_common::Addr;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR: usize = 16;
const SOCK_ID: usize = 48;
const REQ_LEN: usize = 8 + SOCK_ID;
/// `inet_diag_msg`: family, state, timer, retrans, the socket id, then five u32s.
const MSG_LEN: usize = 4 + SOCK_ID + 20;

/// A socket to end: its cookie and the endpoint it is connected to (wire-order port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub cookie: u64,
    pub backend: Addr,
    pub port: u16,
}

/// A UDP socket as sock_diag lists it: the raw socket id (to hand back to SOCK_DESTROY) and what
/// it says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    family: u8,
    id: [u8; SOCK_ID],
}

impl Listed {
    fn target(&self) -> Target {
        let id = &self.id;
        let backend = if self.family == libc::AF_INET as u8 {
            Addr::v4(u32::from_ne_bytes([id[20], id[21], id[22], id[23]]))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&id[20..36]);
            Addr::from_octets(o)
        };
        let cookie = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]) as u64
            | (u32::from_ne_bytes([id[44], id[45], id[46], id[47]]) as u64) << 32;
        Target {
            cookie,
            backend,
            port: u16::from_ne_bytes([id[2], id[3]]),
        }
    }
}

/// A netlink request: header, then `inet_diag_req_v2` for UDP of `family` and socket id `id`.
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCK_ID]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(kind.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // sequence
    m.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.extend([family, libc::IPPROTO_UDP as u8, 0, 0]);
    m.extend(u32::MAX.to_ne_bytes()); // every state
    m.extend(id);
    m
}

/// The sockets in a dump's messages (`inet_diag_msg`s), until its end; an error message ends it
/// with that error.
fn parse_dump(buf: &[u8], out: &mut Vec<Listed>) -> io::Result<bool> {
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDR || at + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &buf[at + NLMSG_HDR..at + len];
        match kind as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(
                    body.get(..4)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or_default(),
                );
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ if body.len() >= MSG_LEN => {
                let mut id = [0u8; SOCK_ID];
                id.copy_from_slice(&body[4..4 + SOCK_ID]);
                out.push(Listed {
                    family: body[0],
                    id,
                });
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    Ok(false)
}

fn netlink() -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The UDP sockets of the calling thread's network namespace, both families.
fn udp_sockets() -> io::Result<Vec<Listed>> {
    let fd = netlink()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        send(
            &fd,
            &request(SOCK_DIAG_BY_FAMILY, flags, family, &[0; SOCK_ID]),
        )?;
        loop {
            let n = recv(&fd, &mut buf)?;
            if n == 0 || parse_dump(&buf[..n], &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

/// Ends the UDP sockets of the calling thread's network namespace that are among `targets`.
/// Returns the targets it ended.
pub fn destroy_here(targets: &HashSet<Target>) -> io::Result<Vec<Target>> {
    let found: Vec<(Listed, Target)> = udp_sockets()?
        .into_iter()
        .map(|s| {
            let t = s.target();
            (s, t)
        })
        .filter(|(_, t)| targets.contains(t))
        .collect();
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let fd = netlink()?;
    let mut buf = vec![0u8; 4096];
    let mut ended = Vec::new();
    for (s, t) in found {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        send(&fd, &request(SOCK_DESTROY, flags, s.family, &s.id))?;
        let n = recv(&fd, &mut buf)?;
        match parse_dump(&buf[..n], &mut Vec::new()) {
            Ok(_) => ended.push(t),
            // Closed meanwhile: nothing left to end.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ended)
}

/// [`destroy_here`] in the network namespace whose file is `netns`.
pub fn destroy_in(netns: &Path, targets: &HashSet<Target>) -> anyhow::Result<Vec<Target>> {
    if netns == Path::new(OWN) {
        return destroy_here(targets).context("ending sockets in the agent's own namespace");
    }
    crate::datapath::in_netns(netns, || {
        destroy_here(targets).with_context(|| format!("ending sockets in {}", netns.display()))
    })
}

/// The agent's own network namespace, as [`namespaces`] lists it: [`destroy_in`] works there
/// without entering it (which takes CAP_SYS_ADMIN).
pub const OWN: &str = "/proc/thread-self/ns/net";

/// The network namespaces to look in: the agent's own ([`OWN`], first), `listed`, and with
/// `every` those of every named namespace (`/run/netns`, where CNI runtimes keep pods') and every
/// thread the agent can see in `/proc`, each once.
pub fn namespaces(listed: &[PathBuf], every: bool) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut candidates: Vec<PathBuf> = vec![PathBuf::from(OWN)];
    candidates.extend(listed.iter().cloned());
    if every {
        for dir in ["/run/netns", "/var/run/netns"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                candidates.extend(entries.flatten().map(|e| e.path()));
            }
        }
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                if let Ok(tasks) = std::fs::read_dir(p.path().join("task")) {
                    candidates.extend(tasks.flatten().map(|t| t.path().join("ns/net")));
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    candidates
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_is_read_to_its_end_and_an_error_is_one() {
        let mut id = [0u8; SOCK_ID];
        id[2..4].copy_from_slice(&50000u16.to_be_bytes());
        id[20..24].copy_from_slice(&[198, 19, 1, 2]);
        id[40..44].copy_from_slice(&7u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        let mut msg = request(SOCK_DIAG_BY_FAMILY, 0, libc::AF_INET as u8, &id);
        // As a reply: an inet_diag_msg is the request's first 4 bytes, the id, then 20 more.
        msg.truncate(NLMSG_HDR);
        msg.extend([libc::AF_INET as u8, 7, 0, 0]);
        msg.extend(id);
        msg.extend([0u8; 20]);
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        let mut done = [0u8; NLMSG_HDR + 4];
        let len = done.len() as u32;
        done[..4].copy_from_slice(&len.to_ne_bytes());
        done[4..6].copy_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());

        let mut out = Vec::new();
        assert!(!parse_dump(&msg, &mut out).unwrap(), "not the end yet");
        let both: Vec<u8> = msg.iter().chain(done.iter()).copied().collect();
        assert!(parse_dump(&both, &mut out).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].target(),
            Target {
                cookie: 7 | 1 << 32,
                backend: Addr::from(std::net::Ipv4Addr::new(198, 19, 1, 2)),
                port: exposure_common::port(50000),
            }
        );

        let mut error = vec![0u8; NLMSG_HDR + 4];
        let len = error.len() as u32;
        error[..4].copy_from_slice(&len.to_ne_bytes());
        error[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        error[NLMSG_HDR..].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let err = parse_dump(&error, &mut out).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert!(
            parse_dump(&error[..10], &mut out).is_ok(),
            "too short for a header: nothing"
        );
    }

    fn socket_cookie(s: &std::net::UdpSocket) -> u64 {
        crate::datapath::socket_option_u64(s.as_raw_fd(), libc::SO_COOKIE).expect("SO_COOKIE")
    }

    /// Connected UDP sockets: the one targeted by its cookie and endpoint is ended (its next send
    /// has no destination left), the others are left alone, a target that is no socket is none.
    #[test]
    fn a_connected_udp_socket_is_ended_by_its_cookie_and_endpoint() {
        let endpoint = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let connected = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(endpoint).unwrap();
            s
        };
        let (ended, kept, other_endpoint) = (connected(), connected(), connected());
        let target = |s: &std::net::UdpSocket, port: u16| Target {
            cookie: socket_cookie(s),
            backend: Addr::from(std::net::Ipv4Addr::LOCALHOST),
            port: exposure_common::port(port),
        };
        let targets = HashSet::from([
            target(&ended, 9),
            // The right socket, another endpoint: not this one's.
            target(&other_endpoint, 10),
            Target {
                cookie: u64::MAX,
                ..target(&kept, 9)
            },
        ]);
        let done = destroy_here(&targets).expect("SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY)");
        assert_eq!(done, [target(&ended, 9)]);
        let err = ended.send(b"x").expect_err("ended");
        assert_eq!(err.raw_os_error(), Some(libc::EDESTADDRREQ), "{err}");
        kept.send(b"x").expect("left alone");
        other_endpoint.send(b"x").expect("left alone");
        // In another namespace's file: the same, from a thread that enters it.
        let again = connected();
        let t = HashSet::from([target(&again, 9)]);
        let done = destroy_in(Path::new("/proc/self/ns/net"), &t).unwrap();
        assert_eq!(done.len(), 1);
        assert!(again.send(b"x").is_err());
    }

    #[test]
    fn namespaces_are_each_visited_once() {
        let own = namespaces(&[PathBuf::from("/proc/self/ns/net")], false);
        assert_eq!(own.len(), 1, "the listed one is the agent's own: {own:?}");
        let every = namespaces(&[], true);
        assert!(!every.is_empty());
        use std::os::unix::fs::MetadataExt as _;
        // Threads end meanwhile (other tests'): count the files still there.
        let ids: Vec<_> = every
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let distinct: BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "each namespace once");
    }
}
