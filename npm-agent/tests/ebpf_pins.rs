//! What the eBPF dataplane does with the maps an earlier agent pinned: a map of this build's
//! definition is reused (its contents reconciled), and a map of another definition (left by an
//! agent whose layout differed, as after an upgrade) is created anew instead of failing the
//! load or being misread by the new programs.
//!
//! Needs root; without it each test says so and passes.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_common::{EndpointInfo, MAP_ENDPOINTS, MAP_IDENTITIES};

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A throw-away pin root, removed when dropped.
struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(root: &Path) -> EbpfDataplane {
    EbpfDataplane::open(EbpfConfig {
        pin_root: root.to_path_buf(),
        drop_events: Default::default(),
        attach: false,
    })
    .expect("load")
}

/// Creates a BPF hash map of the given sizes with raw bpf(2) calls (as an older agent built
/// with another layout would have) and pins it at `path`.
fn pin_hash_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    // union bpf_attr, map-create part: map_type, key_size, value_size, max_entries, ...
    let mut attr = [0u8; 128];
    for (i, v) in [BPF_MAP_TYPE_HASH, key_size, value_size, max_entries].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: attr is a zeroed bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    assert!(fd >= 0, "creating a map: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // union bpf_attr, obj-pin part: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: attr points at a valid C string that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    assert_eq!(rc, 0, "pinning {}: {}", path.display(), std::io::Error::last_os_error());
}

#[test]
fn a_pinned_map_of_another_layout_is_created_anew_and_a_matching_one_is_reused() {
    if !root() {
        println!("SKIPPED: needs root");
        return;
    }
    let root = PinRoot(PathBuf::from(format!("/sys/fs/bpf/npm-test-{}-pins", std::process::id())));
    let maps = root.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let endpoints = maps.join(MAP_ENDPOINTS);
    // The endpoint map as an agent with a 4-byte endpoint value left it.
    pin_hash_map(&endpoints, 4, 4, 16);
    let old = MapInfo::from_pin(&endpoints).unwrap();
    assert_eq!(old.value_size(), 4);

    let dp = open(&root.0);
    let new = MapInfo::from_pin(&endpoints).expect("the endpoint map is pinned again");
    assert_ne!(new.id(), old.id(), "the map of the old layout was replaced");
    assert_eq!(new.value_size() as usize, size_of::<EndpointInfo>());
    let identities = MapInfo::from_pin(maps.join(MAP_IDENTITIES)).unwrap();
    drop(dp);

    // A restart finds every map of its own definition and reuses it.
    let dp = open(&root.0);
    assert_eq!(MapInfo::from_pin(&endpoints).unwrap().id(), new.id(), "a matching map is reused");
    assert_eq!(MapInfo::from_pin(maps.join(MAP_IDENTITIES)).unwrap().id(), identities.id());
    drop(dp);
}
