//! Validation of NetworkPolicies (and the selectors inside them) into the model's types.
//!
//! Every problem is reported with the object it is in and the field path, the way the API
//! server words them (`spec.ingress[0].from[1].ipBlock.except[0]`). An object with any
//! problem is rejected whole: the caller reports it, counts it and carries on with the rest.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CidrBlock, LabelSelector, NamespaceScope, ObjectKey, Operator, Peer, Policy, PortSpec,
    Protocol, Requirement, Rule,
};

/// One problem in one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, as the API server prints it.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// An object that was rejected, with every problem found in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidObject {
    /// `NetworkPolicy`, `Pod`, ...
    pub kind: &'static str,
    /// `namespace/name` (or what could be read of it).
    pub object: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {}: ", self.kind, self.object)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors while walking an object.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }
}

/// The most (peer, port) pairs one direction of a policy may expand to. Each pair becomes an
/// entry of every profile holding the policy (Cilium's default per-endpoint policy map holds
/// 16,384), and in iptables mode a rule, and for an ipBlock a set, of Azure NPM's layout: a
/// policy beyond it could not be enforced within a node's maps, memory and time, so it is
/// rejected whole, as an invalid object, rather than stalling the agent or being enforced in
/// part. At the limit, one policy costs the agent's loop 0.2 s in eBPF mode and 5-7 s in
/// iptables mode (docs/BENCHMARKS.md, "One huge policy").
pub const MAX_DIRECTION_ENTRIES: usize = 10_000;

/// Validates a NetworkPolicy and converts it into the model's [`Policy`].
pub fn network_policy(np: &net::NetworkPolicy) -> Result<Policy, InvalidObject> {
    let mut errs = Errors::default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    if name.is_empty() {
        errs.add("metadata.name", "required");
    }
    if namespace.is_empty() {
        errs.add("metadata.namespace", "required");
    }
    let key = ObjectKey::new(namespace.clone(), name);
    let default_spec = net::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    let pod_selector = match &spec.pod_selector {
        Some(s) => label_selector(s, "spec.podSelector", &mut errs),
        None => LabelSelector::everything(),
    };

    // policyTypes: as the API server defaults it, Ingress always, plus Egress when the
    // policy has egress rules.
    // As the API server validates it: at most two entries, each Ingress or Egress (so a list
    // that names one twice and the other once, `[Ingress, Ingress, Egress]`, is rejected).
    let (mut has_ingress, mut has_egress) = (false, false);
    match &spec.policy_types {
        Some(types) if types.len() > 2 => {
            errs.add(
                "spec.policyTypes",
                format!(
                    "may not specify more than two policyTypes (found {}: {types:?})",
                    types.len()
                ),
            );
        }
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => errs.add(
                        format!("spec.policyTypes[{i}]"),
                        format!(
                            "unsupported value {other:?}: supported values: \"Ingress\", \"Egress\""
                        ),
                    ),
                }
            }
        }
        _ => {
            has_ingress = true;
            has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }

    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(
            &namespace,
            r.from.as_deref(),
            r.ports.as_deref(),
            &path,
            "from",
            &mut errs,
        ));
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(&namespace, r.to.as_deref(), r.ports.as_deref(), &path, "to", &mut errs));
    }

    for (field, rules) in [("spec.ingress", &ingress), ("spec.egress", &egress)] {
        let pairs: usize =
            rules.iter().map(|r| r.peers.len().max(1).saturating_mul(r.ports.len().max(1))).sum();
        if pairs > MAX_DIRECTION_ENTRIES {
            errs.add(
                field,
                format!(
                    "{} rules expand to {pairs} (peer, port) pairs, more than the {MAX_DIRECTION_ENTRIES} this agent enforces in one direction of one policy",
                    rules.len()
                ),
            );
        }
    }
    if !errs.0.is_empty() {
        return Err(InvalidObject {
            kind: "NetworkPolicy",
            object: key.to_string(),
            errors: errs.0,
        });
    }
    Ok(Policy {
        key,
        pod_selector,
        ingress: has_ingress.then_some(ingress),
        egress: has_egress.then_some(egress),
    })
}

fn rule(
    namespace: &str,
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    path: &str,
    peers_field: &str,
    errs: &mut Errors,
) -> Rule {
    let mut out = Rule::default();
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        let path = format!("{path}.{peers_field}[{i}]");
        if let Some(peer) = peer(namespace, p, &path, errs)
            && !out.peers.contains(&peer)
        {
            out.peers.push(peer);
        }
    }
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        let path = format!("{path}.ports[{i}]");
        if let Some(port) = port(p, &path, errs)
            && !out.ports.contains(&port)
        {
            out.ports.push(port);
        }
    }
    out
}

fn peer(
    namespace: &str,
    p: &net::NetworkPolicyPeer,
    path: &str,
    errs: &mut Errors,
) -> Option<Peer> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => ip_block(b, &format!("{path}.ipBlock"), errs).map(Peer::Block),
        (Some(_), _, _) => {
            errs.add(path, "may not specify both ipBlock and another peer");
            None
        }
        (None, None, None) => {
            errs.add(path, "must specify a peer");
            None
        }
        (None, ns, pods) => {
            let namespaces = match ns {
                Some(s) => NamespaceScope::Selector(label_selector(
                    s,
                    &format!("{path}.namespaceSelector"),
                    errs,
                )),
                None => NamespaceScope::Named(namespace.to_string()),
            };
            let pods = match pods {
                Some(s) => label_selector(s, &format!("{path}.podSelector"), errs),
                None => LabelSelector::everything(),
            };
            Some(Peer::Pods { namespaces, pods })
        }
    }
}

fn parse_cidr(s: &str) -> Option<IpNet> {
    // The API server accepts host bits set ("10.0.0.5/24" means 10.0.0.0/24).
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    } else {
        len.parse().ok()?
    };
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

fn ip_block(b: &net::IPBlock, path: &str, errs: &mut Errors) -> Option<CidrBlock> {
    let Some(cidr) = parse_cidr(&b.cidr) else {
        errs.add(
            format!("{path}.cidr"),
            format!(
                "invalid CIDR {:?}: must be an address/prefix length such as 10.0.0.0/16",
                b.cidr
            ),
        );
        return None;
    };
    let mut except = Vec::new();
    let mut ok = true;
    for (i, e) in b.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        match parse_cidr(e) {
            None => {
                errs.add(field, format!("invalid CIDR {e:?}"));
                ok = false;
            }
            Some(n) if n.prefix_len() <= cidr.prefix_len() || !cidr.contains(&n) => {
                errs.add(field, format!("{e:?} must be a strict subset of cidr {:?}", b.cidr));
                ok = false;
            }
            Some(n) => except.push(n),
        }
    }
    ok.then(|| CidrBlock::new(cidr, except))
}

fn port(p: &net::NetworkPolicyPort, path: &str, errs: &mut Errors) -> Option<PortSpec> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::parse(s) {
            Some(proto) => proto,
            None => {
                errs.add(
                    format!("{path}.protocol"),
                    format!(
                        "unsupported value {s:?}: supported values: \"TCP\", \"UDP\", \"SCTP\""
                    ),
                );
                return None;
            }
        },
    };
    let spec = match &p.port {
        None => {
            if p.end_port.is_some() {
                errs.add(
                    format!("{path}.endPort"),
                    "may not be specified when `port` is not specified",
                );
                return None;
            }
            PortSpec::Protocol(protocol)
        }
        Some(IntOrString::Int(n)) => {
            let Some(first) = valid_port(*n) else {
                errs.add(
                    format!("{path}.port"),
                    format!("invalid port {n}: must be between 1 and 65535, inclusive"),
                );
                return None;
            };
            let last = match p.end_port {
                None => first,
                Some(e) => match valid_port(e) {
                    Some(last) if last >= first => last,
                    Some(_) => {
                        errs.add(
                            format!("{path}.endPort"),
                            format!("{e} must be greater than or equal to `port` ({first})"),
                        );
                        return None;
                    }
                    None => {
                        errs.add(
                            format!("{path}.endPort"),
                            format!("invalid port {e}: must be between 1 and 65535, inclusive"),
                        );
                        return None;
                    }
                },
            };
            PortSpec::Range { protocol, first, last }
        }
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                errs.add(
                    format!("{path}.endPort"),
                    "may not be specified when `port` is a named port",
                );
                return None;
            }
            if let Err(why) = valid_port_name(name) {
                errs.add(format!("{path}.port"), format!("invalid port name {name:?}: {why}"));
                return None;
            }
            PortSpec::Named { protocol, name: name.clone() }
        }
    };
    Some(spec)
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// An IANA service name, as Kubernetes requires of port names.
pub fn valid_port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("must be 1 to 15 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("must contain only lowercase letters, digits and '-'");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("must not begin or end with '-' or contain '--'");
    }
    Ok(())
}

/// Validates an API label selector into the model's normalized form. Bad parts are
/// reported; the rest of the selector is still returned (the caller rejects the object).
pub fn label_selector(
    s: &meta::LabelSelector,
    path: &str,
    errs_out: &mut impl ErrorSink,
) -> LabelSelector {
    let mut errs = Errors::default();
    let mut reqs = Vec::new();
    for (k, v) in s.match_labels.iter().flatten() {
        let field = format!("{path}.matchLabels");
        if let Err(why) = valid_label_key(k) {
            errs.add(field.clone(), format!("invalid label key {k:?}: {why}"));
        }
        if let Err(why) = valid_label_value(v) {
            errs.add(field, format!("invalid label value {v:?} for key {k:?}: {why}"));
        }
        reqs.push(Requirement {
            key: k.clone(),
            operator: Operator::In,
            values: BTreeSet::from([v.clone()]),
        });
    }
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let field = format!("{path}.matchExpressions[{i}]");
        if let Err(why) = valid_label_key(&e.key) {
            errs.add(format!("{field}.key"), format!("invalid label key {:?}: {why}", e.key));
        }
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        for v in &values {
            if let Err(why) = valid_label_value(v) {
                errs.add(format!("{field}.values"), format!("invalid label value {v:?}: {why}"));
            }
        }
        let operator = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                errs.add(
                    format!("{field}.operator"),
                    format!(
                        "not a valid selector operator: {other:?} (In, NotIn, Exists, DoesNotExist)"
                    ),
                );
                continue;
            }
        };
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                errs.add(
                    format!("{field}.values"),
                    format!("must be specified when `operator` is '{}'", e.operator),
                );
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                errs.add(
                    format!("{field}.values"),
                    format!("may not be specified when `operator` is '{}'", e.operator),
                );
            }
            _ => {}
        }
        reqs.push(Requirement { key: e.key.clone(), operator, values });
    }
    for e in errs.0 {
        errs_out.push(e);
    }
    LabelSelector::new(reqs)
}

/// Where [`label_selector`] reports its problems.
pub trait ErrorSink {
    fn push(&mut self, e: FieldError);
}

impl ErrorSink for Errors {
    fn push(&mut self, e: FieldError) {
        self.0.push(e);
    }
}

impl ErrorSink for Vec<FieldError> {
    fn push(&mut self, e: FieldError) {
        Vec::push(self, e);
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of alphanumerics, `-`, `_` and `.`, beginning and ending alphanumeric.
pub fn valid_label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let dns_ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !dns_ok {
            return Err("prefix must be a DNS subdomain");
        }
    }
    if name.is_empty() {
        return Err("name part must not be empty");
    }
    valid_label_value(name)
}

/// A label value: empty, or at most 63 characters of alphanumerics, `-`, `_` and `.`,
/// beginning and ending alphanumeric.
pub fn valid_label_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 {
        return Err("must be no more than 63 characters");
    }
    let b = v.as_bytes();
    if !b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) {
        return Err("must consist of alphanumeric characters, '-', '_' or '.'");
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must start and end with an alphanumeric character");
    }
    Ok(())
}
