//! Azure NPM's names, which its users know from `ipset list`, `iptables-save`, HNS and the
//! `npm_ipset_counts` metric: a set's kernel name is `azure-npm-` and the FNV-1a (32-bit) hash
//! of its readable name in decimal (`util.GetHashedName`). Shared by the dataplanes that name
//! sets (iptables, HNS) and by the eBPF dataplane's figures, which name its sets the same way.

/// Every set of the layout starts with this.
pub const SET_PREFIX: &str = "azure-npm-";

/// FNV-1a, 32 bits (Go's `hash/fnv` `New32a`).
pub fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// FNV-1a, 64 bits: content digests for readable names (not a kernel name).
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Azure NPM's `util.Hash`: the FNV-1a hash in decimal.
pub fn hash(s: &str) -> String {
    fnv1a32(s).to_string()
}

/// Azure NPM's `util.GetHashedName`: the kernel name of the set with readable name `s`.
pub fn hashed_set_name(readable: &str) -> String {
    format!("{SET_PREFIX}{}", hash(readable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_go() {
        // Known FNV-1a values (Go's hash/fnv).
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c_292c);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hashed_set_name(""), "azure-npm-2166136261");
    }
}
