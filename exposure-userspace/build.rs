//! Builds the eBPF programs (nightly + build-std, bpf-linker) and leaves the object in OUT_DIR, where
//! `datapath.rs` embeds it. `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../exposure-common/src");
    if which_bpf_linker().is_none() {
        anyhow::bail!("bpf-linker is not installed: run `cargo xtask setup` (or any `cargo xtask` command) first");
    }
    let package = aya_build::Package {
        name: "exposure-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../exposure-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}
