//! Azure NPM v2's chain names, marks and comment conventions in iptables (the hashing behind
//! set and chain names is [`crate::dataplane::azure`]'s): policy chains are
//! `AZURE-NPM-INGRESS-<hash>` and `AZURE-NPM-EGRESS-<hash>` with the hash of the policy's
//! readable name (`util.Hash(policyKey)`), as every released Azure NPM v2 names them.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::dataplane::azure::{SET_PREFIX, hash, hashed_set_name};

/// The address family a ruleset is for: IPv4 in iptables with `family inet` sets, IPv6 in
/// ip6tables with `family inet6` sets. The two rulesets have the same chains (ip6tables has
/// its own tables); sets share one namespace, so an IPv6 set is named as its IPv4 twin with
/// `inet6:` before it (kube-router's convention: Azure NPM has no IPv6 on Linux).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

/// What an IPv6 set's name starts with, before its IPv4 twin's.
pub const INET6_PREFIX: &str = "inet6:";

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn holds(self, ip: IpAddr) -> bool {
        Family::of(ip) == self
    }

    pub fn holds_net(self, net: &IpNet) -> bool {
        Family::of(net.addr()) == self
    }

    /// ipset's `family`.
    pub fn inet(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    /// The prefix length of one address.
    pub fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// Every address, as the two halves that `hash:net` can hold (it holds no /0).
    pub fn halves(self) -> [&'static str; 2] {
        match self {
            Family::V4 => ["0.0.0.0/1", "128.0.0.0/1"],
            Family::V6 => ["::/1", "8000::/1"],
        }
    }

    /// The kernel name of the set with readable name `readable` (Azure NPM's hash).
    pub fn set_name(self, readable: &str) -> String {
        match self {
            Family::V4 => hashed_set_name(readable),
            Family::V6 => format!("{INET6_PREFIX}{}", hashed_set_name(readable)),
        }
    }

    /// Whether a kernel set of the layout's (`azure-npm-…`, `inet6:azure-npm-…`) is this
    /// family's.
    pub fn owns_set(self, name: &str) -> bool {
        match self {
            Family::V4 => name.starts_with(SET_PREFIX),
            Family::V6 => {
                name.strip_prefix(INET6_PREFIX).is_some_and(|n| n.starts_with(SET_PREFIX))
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Whether a kernel set is one of the layout's, of either family.
pub fn is_layout_set(name: &str) -> bool {
    Family::BOTH.iter().any(|f| f.owns_set(name))
}

/// The chain FORWARD jumps to for new connections.
pub const AZURE_NPM: &str = "AZURE-NPM";
pub const INGRESS: &str = "AZURE-NPM-INGRESS";
pub const INGRESS_ALLOW_MARK: &str = "AZURE-NPM-INGRESS-ALLOW-MARK";
pub const EGRESS: &str = "AZURE-NPM-EGRESS";
pub const ACCEPT: &str = "AZURE-NPM-ACCEPT";
/// The base chains, in Azure NPM's order (never treated as stale).
pub const BASE_CHAINS: [&str; 5] = [AZURE_NPM, INGRESS, INGRESS_ALLOW_MARK, EGRESS, ACCEPT];
/// Every chain of the layout (base and per-policy) starts with this.
pub const CHAIN_PREFIX: &str = "AZURE-NPM";

/// Marks, masked so that other users of the mark (kube-proxy's 0x4000 and 0x8000) are left
/// alone: the 10th, 11th and 12th bits (and the 13th for ClusterNetworkPolicy's `Pass`).
pub const INGRESS_ALLOW_MARK_HEX: &str = "0x200/0x200";
pub const INGRESS_DROP_MARK_HEX: &str = "0x400/0x400";
pub const EGRESS_DROP_MARK_HEX: &str = "0x800/0x800";
/// Set by a ClusterNetworkPolicy's `Pass` in the Admin tier: the group skips the tier's other
/// policies (cleared before a tier of several policies is walked).
pub const PASS_MARK_HEX: &str = "0x1000/0x1000";
pub const PASS_MARK_CLEAR_HEX: &str = "0x0/0x1000";
pub const INGRESS_ALLOW_MARK_BITS: (u32, u32) = (0x200, 0x200);
pub const INGRESS_DROP_MARK_BITS: (u32, u32) = (0x400, 0x400);
pub const EGRESS_DROP_MARK_BITS: (u32, u32) = (0x800, 0x800);

/// The jump from FORWARD (inserted first), as `iptables-save` prints it. Azure NPM v2 jumps
/// for NEW only, which lets what conntrack calls INVALID (SYN+FIN, a bad checksum, an ICMP
/// error about no connection) skip every policy; here it is judged by policy like NEW.
pub const FORWARD_JUMP: &str = "-m conntrack --ctstate INVALID,NEW -j AZURE-NPM";

/// The longest comment the kernel keeps (XT_MAX_COMMENT_LEN is 256 with the NUL).
pub const MAX_COMMENT: usize = 255;

/// The chain of a policy (readable name `ns/name`) for one direction.
pub fn policy_chain(ingress: bool, policy: &str) -> String {
    format!("{}-{}", if ingress { INGRESS } else { EGRESS }, hash(policy))
}

/// The chain of a ClusterNetworkPolicy (readable name: its name) for one direction:
/// `AZURE-NPM-ADM-IN-<hash>` / `AZURE-NPM-ADM-EG-<hash>` in the Admin tier,
/// `AZURE-NPM-BASE-IN-<hash>` / `AZURE-NPM-BASE-EG-<hash>` in the Baseline tier (28
/// characters at most).
pub fn tier_chain(admin: bool, ingress: bool, policy: &str) -> String {
    format!(
        "AZURE-NPM-{}-{}-{}",
        if admin { "ADM" } else { "BASE" },
        if ingress { "IN" } else { "EG" },
        hash(policy)
    )
}

/// Whether a chain of the layout judges ingress (`Some(true)`), egress (`Some(false)`) or
/// neither: what its `DROP` rules count as.
pub fn chain_direction(chain: &str) -> Option<bool> {
    if chain.contains("INGRESS") || chain.contains("-IN-") {
        Some(true)
    } else if chain.contains("EGRESS") || chain.contains("-EG-") {
        Some(false)
    } else {
        None
    }
}

/// The chain of the policies that local endpoints walk together (readable name: the
/// policies' names, joined by `,`), for one direction: `AZURE-NPM-IN-PODS-<hash>` or
/// `AZURE-NPM-EG-PODS-<hash>` (28 characters at most, the kernel's limit).
pub fn group_chain(ingress: bool, policies: &str) -> String {
    format!("AZURE-NPM-{}-PODS-{}", if ingress { "IN" } else { "EG" }, hash(policies))
}

/// A comment as `iptables-save` prints it: bare when it is only letters, digits, `-` and `_`,
/// else in double quotes with `"`, `\` and `'` escaped; cut to the kernel's limit.
pub fn quote_comment(comment: &str) -> String {
    let mut c: String = comment.chars().filter(|ch| !ch.is_control()).collect();
    if c.len() > MAX_COMMENT {
        let mut cut = MAX_COMMENT - 3;
        while !c.is_char_boundary(cut) {
            cut -= 1;
        }
        c.truncate(cut);
        c.push_str("...");
    }
    quote_word(&c)
}

/// A word as `iptables-save` prints it (see [`quote_comment`]).
pub fn quote_word(w: &str) -> String {
    let bare =
        !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        return w.to_string();
    }
    let mut out = String::with_capacity(w.len() + 2);
    out.push('"');
    for ch in w.chars() {
        if matches!(ch, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// Splits a rule as `iptables-save` prints it into words, undoing [`quote_word`].
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut w = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            w.push(n);
                        }
                    }
                    '"' => break,
                    c => w.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
        }
        words.push(w);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_azure_npm() {
        // From Azure NPM's own test data (npm/pkg/dataplane/testdata/iptablesave-v2): policy
        // y/base has chains AZURE-NPM-{INGRESS,EGRESS}-2697641196, and its jump matches the
        // sets of podlabel-pod:a and ns-y.
        assert_eq!(policy_chain(true, "y/base"), "AZURE-NPM-INGRESS-2697641196");
        assert_eq!(
            policy_chain(false, "kube-system/konnectivity-agent"),
            "AZURE-NPM-EGRESS-3618314628"
        );
        let pair = [
            crate::dataplane::azure::hashed_set_name("podlabel-pod:a"),
            crate::dataplane::azure::hashed_set_name("ns-y"),
        ];
        assert!(pair.contains(&"azure-npm-3922407721".to_string()), "{pair:?}");
        assert!(pair.contains(&"azure-npm-2837910840".to_string()), "{pair:?}");
    }

    #[test]
    fn quoting_round_trips() {
        for c in [
            "DROP-ALL",
            "ALLOW-FROM-cidr-10.0.0.0/8-ON-TCP-TO-PORT-80",
            "a \"quoted\" 'x' \\ y",
            "",
        ] {
            let q = quote_comment(c);
            assert_eq!(split_words(&format!("-m comment --comment {q} -j X"))[3], c, "{q}");
        }
        assert_eq!(quote_comment("DROP-ALL"), "DROP-ALL");
        assert_eq!(quote_comment("a/b"), "\"a/b\"");
        let long = quote_comment(&"x".repeat(300));
        assert_eq!(split_words(&long)[0].len(), MAX_COMMENT);
    }
}
