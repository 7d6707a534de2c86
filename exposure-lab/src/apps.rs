//! Servers that answer with who they are and whom they see, and the clients that ask them. Servers
//! and clients run on threads inside namespaces; every wait is bounded.

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::Netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Stops its server threads when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The answer line: `<ident> <peer ip>:<peer port>`.
fn answer(ident: &str, peer: SocketAddr) -> String {
    format!("{ident} {peer}\n")
}

/// A socket bound to `addr`; an IPv6 one takes IPv6 only, so IPv4 peers keep their plain addresses
/// on the IPv4 socket beside it.
fn bound(addr: SocketAddr, ty: socket2::Type) -> anyhow::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, ty, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    Ok(sock)
}

/// TCP and UDP servers on `port` in `ns`, on IPv4 and IPv6. TCP connections answer every line they
/// get, so a held connection shows which pod it still talks to.
pub fn serve(ns: &Netns, port: u16, ident: &str) -> anyhow::Result<Server> {
    serve_at(
        ns,
        &[
            SocketAddr::from(([0u8; 4], port)),
            SocketAddr::from(([0u16; 8], port)),
        ],
        ident,
    )
}

/// [`serve`] bound to the given addresses: a UDP server then answers from the address it was
/// asked at, as servers on a host with many addresses must (one bound to the wildcard answers
/// from the address the route to the client prefers).
pub fn serve_at(ns: &Netns, addrs: &[SocketAddr], ident: &str) -> anyhow::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for &any in addrs {
        let (tcp, udp) = ns.run(move || -> anyhow::Result<(TcpListener, UdpSocket)> {
            let tcp = bound(any, socket2::Type::STREAM)?;
            tcp.listen(128)?;
            let tcp = TcpListener::from(tcp);
            tcp.set_nonblocking(true)?;
            let udp = UdpSocket::from(bound(any, socket2::Type::DGRAM)?);
            udp.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok((tcp, udp))
        })??;
        serve_on(tcp, udp, ident, &stop, &mut threads);
    }
    Ok(Server { stop, threads })
}

fn serve_on(
    tcp: TcpListener,
    udp: UdpSocket,
    ident: &str,
    stop: &Arc<AtomicBool>,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) {
    let (s, id) = (stop.clone(), ident.to_string());
    threads.push(std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match tcp.accept() {
                Ok((stream, peer)) => {
                    let (s, id) = (s.clone(), id.clone());
                    conns.push(std::thread::spawn(move || {
                        serve_conn(stream, peer, &id, &s)
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    }));
    let (s, id) = (stop.clone(), ident.to_string());
    threads.push(std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let mut reply = answer(&id, peer).into_bytes();
                // A large request is answered as large: both go fragmented above the MTU.
                if buf[..n].starts_with(BIG_UDP) {
                    reply.extend((reply.len()..n).map(bulk_byte));
                }
                let _ = udp.send_to(&reply, peer);
            }
        }
    }));
}

fn serve_conn(stream: TcpStream, peer: SocketAddr, ident: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                let request = line.trim();
                let written = if let Some(n) = request.strip_prefix("bulk ") {
                    match n.parse::<usize>() {
                        Ok(n) if n <= BULK_MAX => write_bulk(&mut writer, n),
                        _ => return,
                    }
                } else if let Some(n) = request.strip_prefix("upload ") {
                    match n.parse::<usize>() {
                        Ok(n) if n <= BULK_MAX => match read_bulk(&mut reader, n) {
                            Ok(verdict) => {
                                writer.write_all(format!("{ident} {verdict}\n").as_bytes())
                            }
                            Err(_) => return,
                        },
                        _ => return,
                    }
                } else {
                    writer.write_all(answer(ident, peer).as_bytes())
                };
                if written.is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// The most a `bulk N` request may ask for.
pub const BULK_MAX: usize = 64 << 20;

/// Byte `i` of every bulk answer: a pattern with no short period, so a lost, repeated or
/// misplaced segment shows.
fn bulk_byte(i: usize) -> u8 {
    (i % 251) as u8 ^ (i / 251) as u8
}

fn write_bulk(w: &mut impl Write, n: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0;
    while sent < n {
        let len = buf.len().min(n - sent);
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = bulk_byte(sent + j);
        }
        w.write_all(&buf[..len])?;
        sent += len;
    }
    Ok(())
}

/// Runs a socket call again when a signal interrupted it (EINTR: a concurrent test's child
/// exiting; a call with a timeout is never restarted by the kernel), at most 100 times.
fn retry_interrupted<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    for _ in 0..100 {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
    call()
}

/// Reads `n` bytes of the bulk pattern: "received N", or where the first wrong byte was. The
/// connection's short read timeout (the server's poll) is waited out for up to [`IO_TIMEOUT`]
/// without a byte: a lost segment's retransmission timer (200 ms at least) stalls a stream.
fn read_bulk(r: &mut impl Read, n: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    let mut wrong = None;
    while got < n {
        let len = buf.len().min(n - got);
        let since = std::time::Instant::now();
        let read = loop {
            match retry_interrupted(|| r.read(&mut buf[..len])) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && since.elapsed() < IO_TIMEOUT => {}
                read => break read?,
            }
        };
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if wrong.is_none() {
            wrong = (0..read)
                .find(|&j| buf[j] != bulk_byte(got + j))
                .map(|j| got + j);
        }
        got += read;
    }
    Ok(match wrong {
        Some(at) => format!("byte {at} is wrong"),
        None => format!("received {n}"),
    })
}

/// Sends a [`serve`] server `bytes` bytes on a fresh connection, which it checks one by one;
/// returns the server's name. Large requests leave a client that offloads as GSO packets with
/// partial checksums.
pub fn tcp_send_bulk(ns: &Netns, to: SocketAddr, bytes: usize) -> anyhow::Result<String> {
    anyhow::ensure!(bytes <= BULK_MAX, "at most {BULK_MAX} bytes");
    let mut session = TcpSession::connect(ns, to)?;
    session
        .writer
        .write_all(format!("upload {bytes}\n").as_bytes())?;
    write_bulk(&mut session.writer, bytes).with_context(|| format!("sending {bytes} bytes"))?;
    let mut verdict = String::new();
    session
        .reader
        .read_line(&mut verdict)
        .context("reading the server's verdict")?;
    match verdict.trim().split_once(' ') {
        Some((server, said)) if said == format!("received {bytes}") => Ok(server.to_string()),
        _ => anyhow::bail!("the server says: {verdict:?}"),
    }
}

/// Asks a [`serve`] server for `bytes` bytes on a fresh connection and checks every one of them:
/// large replies leave the pod as offloaded (GSO, checksum-partial) packets.
pub fn tcp_fetch_bulk(ns: &Netns, to: SocketAddr, bytes: usize) -> anyhow::Result<()> {
    anyhow::ensure!(bytes <= BULK_MAX, "at most {BULK_MAX} bytes");
    let mut session = TcpSession::connect(ns, to)?;
    session
        .writer
        .write_all(format!("bulk {bytes}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < bytes {
        let want = buf.len().min(bytes - got);
        let n = retry_interrupted(|| session.reader.read(&mut buf[..want]))
            .with_context(|| format!("reading byte {got} of {bytes}"))?;
        anyhow::ensure!(n > 0, "connection closed after {got} of {bytes} bytes");
        if let Some(j) = (0..n).find(|&j| buf[j] != bulk_byte(got + j)) {
            anyhow::bail!("byte {} of {bytes} is wrong", got + j);
        }
        got += n;
    }
    Ok(())
}

/// An open TCP connection, made from inside a namespace.
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TcpSession {
    pub fn connect(ns: &Netns, to: SocketAddr) -> anyhow::Result<Self> {
        let stream = ns.run(move || TcpStream::connect_timeout(&to, IO_TIMEOUT))??;
        Self::over(stream)
    }

    /// A connection from a chosen local address and port (bound first, as some clients do).
    pub fn connect_from(ns: &Netns, from: SocketAddr, to: SocketAddr) -> anyhow::Result<Self> {
        let stream = ns.run(move || -> anyhow::Result<TcpStream> {
            let sock = bound(from, socket2::Type::STREAM)?;
            sock.connect_timeout(&to.into(), IO_TIMEOUT)
                .with_context(|| format!("connect {from} -> {to}"))?;
            Ok(sock.into())
        })??;
        Self::over(stream)
    }

    /// The peer the connection reports (getpeername).
    pub fn peer(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.writer.peer_addr()?)
    }

    fn over(stream: TcpStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(TcpSession {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Closes the connection both ways: sends FIN, then waits for the other side's.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.writer.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .context("waiting for the other side to close")?;
        Ok(())
    }

    /// Sends a line and returns the answer line (trimmed).
    pub fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .context("reading the answer")?;
        anyhow::ensure!(n > 0, "connection closed by the other side");
        Ok(answer.trim().to_string())
    }
}

/// The fewest requests a test sends to see which pods a frontend reaches: each new flow's pod is
/// a hash pick, so with 4 equally likely pods one goes unseen in 20 requests 1.3% of the time
/// (2 pods in 10: 0.2%, which failed a CI run), in 60 about once in 10 million.
pub const SPREAD_MIN: usize = 60;

/// One TCP request on a fresh connection.
pub fn tcp_ask(ns: &Netns, to: SocketAddr) -> anyhow::Result<String> {
    TcpSession::connect(ns, to)?.ask("hello")
}

/// The start of a UDP request to be answered with a datagram as large as itself.
const BIG_UDP: &[u8] = b"big\n";

/// A connected UDP socket made inside a namespace: every datagram from the same source port, one
/// flow to the datapath.
pub struct UdpSession {
    sock: UdpSocket,
}

impl UdpSession {
    pub fn connect(ns: &Netns, to: SocketAddr) -> anyhow::Result<Self> {
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let sock = ns.run(move || UdpSocket::bind(any))??;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.connect(to)?;
        Ok(UdpSession { sock })
    }

    /// The peer the socket reports (getpeername).
    pub fn peer(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.sock.peer_addr()?)
    }

    /// Sends a datagram and returns the answer (trimmed).
    pub fn ask(&mut self, text: &str) -> anyhow::Result<String> {
        self.sock.send(text.as_bytes())?;
        let mut buf = [0u8; 1500];
        let n =
            retry_interrupted(|| self.sock.recv(&mut buf)).context("waiting for the UDP answer")?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    }

    /// Sends a datagram of `bytes` bytes and checks that the answer is as long and carries the
    /// bulk pattern after its answer line, which it returns (trimmed). Above the MTU, both
    /// datagrams travel as IP fragments.
    pub fn ask_big(&mut self, bytes: usize) -> anyhow::Result<String> {
        anyhow::ensure!((BIG_UDP.len()..=60_000).contains(&bytes));
        let mut request = BIG_UDP.to_vec();
        request.extend((request.len()..bytes).map(bulk_byte));
        self.sock.send(&request)?;
        let mut buf = vec![0u8; 64 << 10];
        let n = retry_interrupted(|| self.sock.recv(&mut buf))
            .context("waiting for the large UDP answer")?;
        anyhow::ensure!(n == bytes, "answered with {n} bytes, not {bytes}");
        let line_end = buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .context("no answer line")?;
        let pattern_ok = (line_end + 1..n).all(|i| buf[i] == bulk_byte(i));
        anyhow::ensure!(
            pattern_ok,
            "the answer's bytes after its line are not the pattern"
        );
        Ok(String::from_utf8_lossy(&buf[..line_end]).trim().to_string())
    }
}

/// One UDP request from a fresh socket.
pub fn udp_ask(ns: &Netns, to: SocketAddr) -> anyhow::Result<String> {
    UdpSession::connect(ns, to)?.ask("hello")
}

/// One UDP request from a fresh unconnected socket (`sendto`/`recvfrom`, as DNS resolvers do): the
/// answer (trimmed) and the address it came from.
pub fn udp_ask_unconnected(ns: &Netns, to: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let sock = ns.run(move || UdpSocket::bind(any))??;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.send_to(b"hello", to)?;
    let mut buf = [0u8; 1500];
    let (n, from) =
        retry_interrupted(|| sock.recv_from(&mut buf)).context("waiting for the UDP answer")?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

/// Splits an answer into (pod ident, the client address the pod saw).
pub fn parse_answer(answer: &str) -> Option<(&str, SocketAddr)> {
    let (ident, peer) = answer.split_once(' ')?;
    Some((ident, peer.parse().ok()?))
}

/// A TCP server on `port` in `ns` that reads and discards whatever each connection sends (for
/// connection-rate and throughput runs). One thread polls the listener and every connection
/// without blocking: a thread per connection would not keep up with a fast connecting client.
pub fn discard(ns: &Netns, port: u16) -> anyhow::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let listener = ns.run(move || -> anyhow::Result<TcpListener> {
        let sock = bound(SocketAddr::from(([0u8; 4], port)), socket2::Type::STREAM)?;
        // A deep accept queue: a burst of connections must not overflow it between polls.
        sock.listen(4096)?;
        let l = TcpListener::from(sock);
        l.set_nonblocking(true)?;
        Ok(l)
    })??;
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        while !s.load(Ordering::Relaxed) {
            let mut busy = false;
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    conns.push(stream);
                }
                busy = true;
            }
            conns.retain_mut(|c| match std::io::Read::read(c, &mut buf) {
                Ok(0) => false,
                Ok(_) => {
                    busy = true;
                    true
                }
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
            if !busy {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    });
    Ok(Server {
        stop,
        threads: vec![thread],
    })
}

/// TCP connections per second from `ns` to `to`: `threads` clients each connecting and closing
/// (with RST, so no TIME_WAIT piles up) for `duration`. A connect that times out counts as none.
pub fn tcp_connect_rate(
    ns: &Netns,
    to: SocketAddr,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let start = std::time::Instant::now();
    let handles = (0..threads)
        .map(|_| {
            ns.spawn_thread(move || {
                let deadline = std::time::Instant::now() + duration;
                let mut done = 0u64;
                while std::time::Instant::now() < deadline {
                    if let Ok(s) = TcpStream::connect_timeout(&to, IO_TIMEOUT) {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        done += 1;
                    }
                }
                done
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second one TCP connection from `ns` to `to` carries for `duration`.
pub fn tcp_throughput(ns: &Netns, to: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    ns.run(move || -> anyhow::Result<f64> {
        let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let buf = vec![0u8; 256 * 1024];
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            sent += s.write(&buf)? as u64;
        }
        Ok(sent as f64 / start.elapsed().as_secs_f64())
    })?
}
