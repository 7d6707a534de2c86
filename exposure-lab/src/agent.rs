//! Running the real `exposure` binary on a lab node, and stopping it (also on panic, via Drop).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::lab::Node;

/// Where an agent reads the cluster from.
pub enum Source<'a> {
    Manifests(&'a Path),
    Kubeconfig(&'a Path),
}

pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
}

/// Where a node's agent pins its maps: unique per lab, so agents on one kernel never collide.
pub fn pin_dir(lab_prefix: &str, node: &Node) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{lab_prefix}-{}", node.name))
}

impl Agent {
    /// Starts `exposure agent` in the node's namespace and waits until /healthz says synced.
    pub fn start(
        bin: &Path,
        lab_prefix: &str,
        node: &Node,
        source: &Source,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut agent = Self::spawn(bin, lab_prefix, node, source, log_dir)?;
        agent.wait_healthy(node)?;
        Ok(agent)
    }

    /// Starts `exposure agent` without waiting for it to report healthy.
    pub fn spawn(
        bin: &Path,
        lab_prefix: &str,
        node: &Node,
        source: &Source,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(bin, lab_prefix, node, source, log_dir, &[])
    }

    /// [`Agent::spawn`] with extra agent flags.
    pub fn spawn_with(
        bin: &Path,
        lab_prefix: &str,
        node: &Node,
        source: &Source,
        log_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, lab_prefix, node, source, log_dir, extra, &[])
    }

    /// [`Agent::spawn_with`] with `env` added to the agent's environment.
    pub fn spawn_with_env(
        bin: &Path,
        lab_prefix: &str,
        node: &Node,
        source: &Source,
        log_dir: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let pin_dir = pin_dir(lab_prefix, node);
        // One kernel plays every machine of the lab: the socket hooks must take the sockets of
        // this node and its pods only, not the client's or other nodes' (a real node's are all
        // its own).
        let pods: Vec<String> = node
            .pods
            .iter()
            .map(|p| p.ns.path().display().to_string())
            .collect();
        let socket_namespaces = if pods.is_empty() {
            "host".to_string()
        } else {
            pods.join(",")
        };
        let own_namespaces = !extra.contains(&"--socket-namespaces");
        // The node's lab interface, unless the test says which interfaces.
        let iface = (!extra
            .iter()
            .any(|f| *f == "--iface" || f.starts_with("--iface=")))
        .then_some(["--iface", node.iface]);
        let log = log_dir.join(format!("agent-{}.log", node.name));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = node
            .ns
            .command(bin)?
            .args(["agent", "--node-name", &node.name])
            .args(iface.iter().flatten())
            .args(match source {
                Source::Manifests(dir) => ["--manifests".as_ref(), dir.as_os_str()],
                Source::Kubeconfig(file) => ["--kubeconfig".as_ref(), file.as_os_str()],
            })
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(
                own_namespaces
                    .then_some(["--socket-namespaces", socket_namespaces.as_str()])
                    .iter()
                    .flatten(),
            )
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Agent {
            child: Some(child),
            log,
            pin_dir,
        })
    }

    pub fn wait_healthy(&mut self, node: &Node) -> anyhow::Result<()> {
        self.wait_healthy_within(node, Duration::from_secs(30))
    }

    pub fn wait_healthy_within(&mut self, node: &Node, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("agent exited with {status}; log:\n{}", self.log_text());
                }
            }
            if healthz(node).unwrap_or(0) == 200 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "agent on {} not healthy within {limit:?}; log:\n{}",
            node.name,
            self.log_text()
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 5 s. Pins stay, as after a real agent restart.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    /// Stops the process only: its pins outlive it, as on a real node, so a replacement agent finds
    /// them. The [`Lab`](crate::lab::Lab) removes them when it goes.
    fn drop(&mut self) {
        self.stop();
    }
}

/// GET `path` from `port` on the node's loopback: (status code, body).
fn get(node: &Node, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    node.ns.run(move || -> anyhow::Result<(u16, String)> {
        let mut s =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        Ok((
            code,
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        ))
    })?
}

/// Status code of GET /healthz on the node's loopback.
pub fn healthz(node: &Node) -> anyhow::Result<u16> {
    Ok(get(node, 10256, "/healthz")?.0)
}

/// The status code of the agent's `/livez` on the node's loopback.
pub fn livez(node: &Node) -> anyhow::Result<u16> {
    Ok(get(node, 10256, "/livez")?.0)
}

/// The agent's Prometheus text from `/metrics` on the node's loopback.
pub fn metrics(node: &Node) -> anyhow::Result<String> {
    Ok(get(node, 10249, "/metrics")?.1)
}
