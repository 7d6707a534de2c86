//! `cargo xtask`: setup, build, test and run Exposure. Every command first installs what is missing
//! (idempotent, and quick when everything is there), so a fresh machine needs nothing else.

mod demo;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

const USAGE: &str = "\
usage: cargo xtask <command>

  setup                 install what the build and tests need (nightly rust-src, bpf-linker, iproute2, ...)
  build                 build the eBPF programs and the agent: target/release/exposure
  test [ARGS]           run every test (unit, packet, end-to-end); needs root. ARGS go to `cargo test`
  run [--once]          build, start the namespace lab with agents on two nodes, send requests and show
                        which pod answers; keeps serving until Ctrl-C (--once: exit after the requests)
    run -- agent ARGS     build, then run the agent for real on this host: `exposure agent ARGS`
  bench [--quick]       measure (release build) and write bench/results/<date>.md; needs root
";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build() -> anyhow::Result<PathBuf> {
    setup::ensure()?;
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "exposure-userspace",
        "--bin",
        "exposure",
    ]))?;
    Ok(workspace_root().join("target/release/exposure"))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: it loads eBPF programs and creates network namespaces");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    match command {
        "setup" => setup::ensure(),
        "build" => build().map(|bin| println!("built {}", bin.display())),
        "test" => {
            require_root("cargo xtask test")?;
            setup::ensure()?;
            status(
                cargo()
                    .args(["test", "--workspace", "--exclude", "exposure-ebpf"])
                    .args(rest),
            )
        }
        "run" => match rest {
            [] => {
                require_root("cargo xtask run")?;
                demo::run(&build()?, &workspace_root().join("examples"), false)
            }
            [once] if once == "--once" => {
                require_root("cargo xtask run")?;
                demo::run(&build()?, &workspace_root().join("examples"), true)
            }
            [dashdash, agent_args @ ..] if dashdash == "--" => {
                let bin = build()?;
                let err =
                    std::os::unix::process::CommandExt::exec(Command::new(&bin).args(agent_args));
                Err(err).with_context(|| format!("executing {}", bin.display()))
            }
            _ => bail!("unexpected arguments to run: {rest:?}\n{USAGE}"),
        },
        "bench" => {
            require_root("cargo xtask bench")?;
            setup::ensure()?;
            status(
                cargo()
                    .args([
                        "bench",
                        "--package",
                        "exposure-userspace",
                        "--bench",
                        "exposure",
                        "--",
                    ])
                    .args(rest),
            )
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}
