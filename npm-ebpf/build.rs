//! Building this crate for the BPF target has an undeclared dependency on the `bpf-linker`
//! binary. Re-run (and so rebuild the object) whenever the `bpf-linker` found on `PATH` changes,
//! as the aya-template does. Host builds do not need `bpf-linker`, so its absence is not an error.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let found: Option<PathBuf> = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("bpf-linker"))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None => println!("cargo:rerun-if-changed=build.rs"),
    }
}
