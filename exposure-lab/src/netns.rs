//! Named network namespaces (`ip netns`), deleted on drop, so a failing test still cleans up.

use std::{
    fs::File,
    os::fd::AsFd as _,
    os::unix::process::CommandExt as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// A short prefix unique to this process and call, for namespace names.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "x{}{}{}",
        tag,
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it fails.
/// A MAC address as `ip` writes and reads it (`02:00:00:00:00:42`).
/// A sysctl(8) key as a path under /proc/sys: dots and slashes swap.
fn sysctl_path(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect()
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        // A namespace left by a crashed run with the same name would make this fail: remove it first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file (where `ip netns` keeps it).
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...` (space-separated).
    pub fn ip(&self, args: &str) -> anyhow::Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args.split_whitespace());
        run("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace with `input` on its standard input (e.g. `nft -f -`).
    pub fn exec_with_input(&self, cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command(cmd)?
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The MAC address of `dev` in this namespace (see [`mac_text`] for `ip`'s notation).
    pub fn mac(&self, dev: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes = text
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("MAC of {dev}: {text:?}"))?;
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("MAC of {dev}: {text:?}"))
    }

    /// Sets a sysctl, its key written as sysctl(8) takes it: `/` for a dot in an interface's
    /// name (`net.ipv4.conf.flannel/1.rp_filter`).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", sysctl_path(key));
        self.exec("sh", &["-c", &format!("echo {value} > {path}")])?;
        Ok(())
    }

    /// A sysctl's value as this namespace sees it (`net.ipv4.ip_forward`), trimmed.
    pub fn sysctl_value(&self, key: &str) -> anyhow::Result<String> {
        let path = format!("/proc/sys/{}", sysctl_path(key));
        let value = self
            .run(move || std::fs::read_to_string(&path))?
            .with_context(|| format!("reading {key} in netns {}", self.name))?;
        Ok(value.trim().to_string())
    }

    fn file(&self) -> anyhow::Result<File> {
        File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))
    }

    /// Runs `f` on a thread inside the namespace. Sockets made there stay in the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = self.file()?;
        std::thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        // A failed assertion inside the namespace fails the caller with the same message.
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Like [`Netns::run`] but returns at once with the thread's handle.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<T>> {
        let file = self.file()?;
        Ok(std::thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the lab namespace");
            f()
        }))
    }

    /// Prepares `cmd` to start inside the namespace. Unlike `ip netns exec` this keeps the mount
    /// namespace, so bpffs pins stay visible to other processes (and to a restarted agent).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let file = self.file()?;
        let mut cmd = Command::new(program);
        unsafe {
            cmd.pre_exec(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
