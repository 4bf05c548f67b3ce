//! Manifest files as the files source reads them (YAML streams, lists, JSON): never a panic,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (yaml, json) = (std::path::Path::new("m.yaml"), std::path::Path::new("m.json"));
    let _ = npm_agent::source::files::check_manifests(yaml, text);
    let _ = npm_agent::source::files::check_manifests(json, text);
});
