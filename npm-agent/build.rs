//! Builds the eBPF programs (`npm-ebpf`) for the BPF target and leaves the object in `OUT_DIR`,
//! where the agent embeds it with
//! `aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npm-ebpf"))`.
//!
//! aya-build runs a nested `rustup run nightly cargo build --package npm-ebpf --bins --release
//! --target bpfel-unknown-none -Z build-std=core` (target dir `OUT_DIR/aya-build/target/npm-ebpf`)
//! and copies each binary to `OUT_DIR/<bin name>`. That needs the nightly toolchain with `rust-src`
//! and `bpf-linker` on `PATH`; `cargo xtask setup` installs them. So plain `cargo build` and
//! `cargo test` work on stable.
//!
//! Other target systems (Windows, for the HNS dataplane) build no object.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (aya-build honours it); an empty placeholder object is
//! written instead so the agent still compiles, and loading the programs fails at run time.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// Package (and `[[bin]]`) name of the eBPF crate; also the file name of the object in `OUT_DIR`.
const EBPF_PACKAGE: &str = "npm-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let workspace_dir =
        manifest_dir.parent().ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let ebpf_dir = workspace_dir.join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", ebpf_dir.display()))?;
    let ebpf_dir =
        ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;

    // aya-build re-runs us when the eBPF crate changes; it cannot know about the crate's path
    // dependencies and the workspace manifest, so name those too.
    for path in ["npm-common", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace_dir.join(path).display());
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join(EBPF_PACKAGE);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    // The eBPF dataplane exists on Linux only: a Windows build (the HNS dataplane) needs no
    // object, nor the nightly toolchain.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Ok(());
    }

    aya_build::build_ebpf(
        [aya_build::Package { name: EBPF_PACKAGE, root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; they need the nightly toolchain with rust-src and \
         bpf-linker (run `cargo xtask setup`), or set AYA_BUILD_SKIP=1 to build without them",
    )?;

    if skip && !object.exists() {
        fs::write(&object, b"")
            .with_context(|| format!("failed to write placeholder {}", object.display()))?;
    }
    if !object.exists() {
        return Err(anyhow!("aya-build did not produce {}", object.display()));
    }
    Ok(())
}
