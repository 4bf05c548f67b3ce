//! The lab cluster of conformance case 47 after its first step, on real agents: x/a isolated
//! for ingress by a-from-y (namespace y) and all-from-c (x/c), x/b and x/c by all-from-c.
//! For the lab tests of the tools that read a running agent (`debug`, `drops`).

use std::path::{Path, PathBuf};

use npm_agent::lab::{LabCluster, LabOptions, net};
use npm_agent::simulate::Enforcer;
use npm_agent::simulate::case::{self, ActionOutcome, CaseCluster};

pub struct UnionLab {
    pub lab: LabCluster,
    pub cluster: CaseCluster,
}

impl UnionLab {
    /// `None` (having printed SKIPPED) without root and iproute2.
    pub fn start(dataplane: &str, nodes: usize, agent_args: &[&str]) -> Option<UnionLab> {
        if let Err(e) = net::check_environment() {
            println!("SKIPPED: the lab needs root and iproute2: {e:#}");
            return None;
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/conformance/47-union-of-policies.yaml");
        let c = case::load(&path).unwrap();
        let mut cluster = CaseCluster::new(&c).unwrap();
        let mut opts = LabOptions::new(dataplane, nodes);
        opts.agent = PathBuf::from(env!("CARGO_BIN_EXE_npm-agent"));
        opts.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
        let mut lab = LabCluster::new(opts).expect("building the lab");
        let initial = cluster.initial_events();
        lab.apply(&cluster, &initial).unwrap();
        for a in &c.steps[0].actions {
            if let ActionOutcome::Events(events) = cluster.action(a).unwrap() {
                lab.apply(&cluster, &events).unwrap();
            }
        }
        Some(UnionLab { lab, cluster })
    }
}
