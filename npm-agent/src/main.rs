//! The `npm-agent` command: a thin shell over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "npm-agent", version, about = "Kubernetes NetworkPolicy enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay conformance cases through the compiler and compare the connectivity tables.
    /// Needs no root and no kernel support. Exit status 0 only when every table matches.
    Simulate {
        /// Print a machine-readable JSON report instead of text.
        #[arg(long)]
        json: bool,
        /// Also write one self-contained page: every case's state after each step, the
        /// matrix of each port its step expects, every cell opening its explanation.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Case files (see shared/conformance/FORMAT.md).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Run the node agent (the DaemonSet's entry point). SIGTERM and SIGINT stop it and
    /// leave enforcement in place.
    Run {
        /// A config file (YAML; every key is also a flag; flags override the file; keys the
        /// file leaves out keep their defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Enter this network namespace (a file such as /run/netns/NAME) before anything
        /// else, keeping the mount namespace.
        #[cfg(target_os = "linux")]
        #[arg(long)]
        netns: Option<PathBuf>,
        #[command(flatten)]
        settings: npm_agent::agent::Settings,
    },
    /// Why is a connection allowed or denied? The verdict of each side (the source's
    /// egress, the destination's ingress), the policies selecting each end and the rules
    /// admitting it (`spec.ingress[1].from[0]`), from the compiler that enforces. Exit
    /// status: 0 allowed, 1 denied, 2 error.
    Explain {
        /// The source: NAMESPACE/POD or an IP address.
        #[arg(long, required_unless_present = "html", requires = "to")]
        from: Option<String>,
        /// The destination: NAMESPACE/POD or an IP address.
        #[arg(long, required_unless_present = "html", requires = "from")]
        to: Option<String>,
        /// The destination port and protocol: 80/TCP, 53/UDP (with --html, repeat it for
        /// one matrix each) [default: 80/TCP].
        #[arg(long)]
        port: Vec<String>,
        /// Write one self-contained page: the pods-by-pods matrix of each --port, every cell
        /// opening its explanation, and the policies.
        #[arg(long)]
        html: Option<PathBuf>,
        /// The cluster from a directory of manifests (YAML, as `--source files:DIR`).
        #[arg(long, conflicts_with_all = ["case", "kube"], required_unless_present_any = ["case", "kube"])]
        manifests: Option<PathBuf>,
        /// The cluster from a case file (shared/conformance/FORMAT.md): its model and steps.
        #[arg(long, conflicts_with = "kube")]
        case: Option<PathBuf>,
        /// With --case: only the first N steps (0: the model alone) [default: every step].
        #[arg(long, requires = "case")]
        step: Option<usize>,
        /// The cluster from the Kubernetes API (KUBECONFIG or in-cluster), read only.
        #[arg(long)]
        kube: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Azure NPM's debug commands, answering from this node's iptables layout (iptables
    /// mode; in eBPF mode use `explain` and `counters`).
    #[cfg(target_os = "linux")]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
        /// Read the rules from this `iptables-save -t filter` output instead of the node.
        #[arg(long, global = true)]
        iptables_save: Option<PathBuf>,
        /// Read the sets from this `ipset save` output instead of the node.
        #[arg(long, global = true)]
        ipset_save: Option<PathBuf>,
    },
    /// The network-namespace lab: conformance cases on real packets, one agent per node.
    #[cfg(target_os = "linux")]
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Print the eBPF dataplane's packet counters (passed and dropped, by direction and
    /// reason) from an agent's pin root.
    #[cfg(target_os = "linux")]
    Counters {
        #[arg(long, default_value = npm_agent::dataplane::ebpf::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// The packets the agent on this node dropped, named: the pod, the 5-tuple, the reason
    /// and the policies that isolate the pod (eBPF dataplane; as many as its rate limiter,
    /// --drop-events-rate, lets through). Run it where the agent runs (`kubectl exec`).
    #[cfg(unix)]
    Drops {
        /// Keep printing new drops until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only drops at pods of this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only drops at this pod (in --namespace, or in any namespace).
        #[arg(short = 'p', long)]
        pod: Option<String>,
        /// How many of the latest drops to print first.
        #[arg(long, default_value_t = 100)]
        recent: usize,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
        /// The agent's socket (its drops-socket setting).
        #[arg(long, default_value = npm_agent::agent::config::DEFAULT_DROPS_SOCKET)]
        socket: PathBuf,
    },
    /// Remove everything the agent installed (pinned programs, links and maps; AZURE-NPM
    /// chains and azure-npm- sets), for uninstall. Run it after the agent has stopped.
    Cleanup {
        /// The pin root to remove [default: the config file's pin-root, else /sys/fs/bpf/npm-rs].
        #[arg(long)]
        pin_root: Option<PathBuf>,
        /// The agent's config file (for its pin-root).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[cfg(target_os = "linux")]
#[derive(Subcommand)]
enum DebugCommand {
    /// The AZURE-NPM rules a new connection from SRC to DST walks, and the verdict (exit
    /// status 0 allowed, 1 dropped).
    Gettuples {
        #[arg(short = 's', long)]
        src: String,
        #[arg(short = 'd', long)]
        dst: String,
        /// The destination port and protocol.
        #[arg(long, default_value = "80/TCP")]
        port: String,
        /// Answer from the eBPF maps pinned under this root (eBPF mode) instead of the
        /// iptables tables [default: the maps when the agent's pin root holds them].
        #[arg(long)]
        pin_root: Option<PathBuf>,
        /// Answer from the iptables tables even when eBPF maps are pinned.
        #[arg(long, conflicts_with = "pin_root")]
        iptables: bool,
    },
    /// The AZURE-NPM chains as JSON: each rule's sets, ports, comment and target.
    Convertiptable,
}

#[cfg(target_os = "linux")]
#[derive(Subcommand)]
enum LabCommand {
    /// Build each case's cluster from network namespaces (as root), run the real agent on
    /// every node, apply the steps through it and probe every pair with real packets. Prints
    /// and exits exactly as `simulate` does; removes everything it created.
    Run {
        /// The dataplane the agents use.
        #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "iptables"])]
        dataplane: String,
        /// Nodes of the lab cluster; pods are spread over them.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Print a machine-readable JSON report instead of text.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Show one case on a lab cluster: connectivity before any policy and after each step,
    /// node-0's metrics forwarded to the host while it runs. Exits by itself unless --hold.
    Demo {
        #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "iptables"])]
        dataplane: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Keep the lab up for exploration until Ctrl-C.
        #[arg(long)]
        hold: bool,
        /// Where the host serves node-0's metrics.
        #[arg(long, default_value = "0.0.0.0:10091")]
        metrics_addr: String,
        case: PathBuf,
    },
    /// The connection rate (and the request rate on one connection) between pods on two lab
    /// nodes: without any agent, and with each dataplane holding N policies that select the
    /// server, interleaved over rounds.
    Crr {
        /// Setups in the order of the table (`none` first: the others are given as a share of
        /// it): none, ebpf, iptables-legacy, iptables-nft.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,ebpf,iptables-legacy,iptables-nft"
        )]
        setups: Vec<String>,
        /// Policies selecting the server, for each setup with an agent.
        #[arg(long, value_delimiter = ',', default_value = "0,100,1000,10000")]
        policies: Vec<usize>,
        /// Seconds of each kind of traffic per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// What the policies other than the admitting one admit: a /32 ipBlock each
        /// (`blocks`), or a pod label each (`selectors`), on ports of their own.
        #[arg(long, value_enum, default_value = "blocks")]
        others: npm_agent::lab::throughput::OtherPeers,
    },
    /// iperf3 between pods on two lab nodes: without any agent, then with each dataplane
    /// holding N policies that select the server.
    Throughput {
        /// Dataplanes to measure in order (`none` = no agent).
        #[arg(long, value_delimiter = ',', default_value = "none,ebpf")]
        dataplanes: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Between the pods' IPv6 addresses (the pods are dual stack).
        #[arg(long)]
        ipv6: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate { json, html, cases } => {
            let code = npm_agent::simulate::cli(&cases, json);
            match html.map(|out| npm_agent::explain::html_cases(&cases, &out)) {
                Some(Err(e)) => {
                    eprintln!("npm-agent simulate: --html: {e:#}");
                    ExitCode::from(2)
                }
                _ => code,
            }
        }
        Command::Explain { from, to, port, html, manifests, case, step, kube, json } => {
            use npm_agent::explain::{ClusterFrom, cli, html_cli};
            let cluster = match (manifests, case, kube) {
                (Some(dir), _, _) => ClusterFrom::Manifests(dir),
                (_, Some(path), _) => ClusterFrom::Case { path, steps: step },
                _ => ClusterFrom::Kube,
            };
            let ports = if port.is_empty() { vec!["80/TCP".to_string()] } else { port };
            match (html, from, to) {
                (Some(out), None, None) => html_cli(&cluster, &ports, &out),
                (None, Some(from), Some(to)) if ports.len() == 1 => {
                    cli(&cluster, &from, &to, &ports[0], json)
                }
                _ => {
                    eprintln!(
                        "npm-agent explain: either --from, --to and one --port, or --html with any --port"
                    );
                    ExitCode::from(2)
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        Command::Run { config, settings } => run(config.as_deref(), settings),
        #[cfg(target_os = "linux")]
        Command::Run { config, netns, settings } => {
            // Before any thread exists: setns affects only the calling thread.
            if let Some(ns) = &netns
                && let Err(e) = npm_agent::netns::enter(ns)
            {
                eprintln!("npm-agent: {e:#}");
                return ExitCode::FAILURE;
            }
            run(config.as_deref(), settings)
        }
        #[cfg(target_os = "linux")]
        Command::Lab { command: LabCommand::Run { dataplane, nodes, json, cases } } => {
            npm_agent::lab::run_cli(
                &cases,
                &npm_agent::lab::LabOptions::new(&dataplane, nodes),
                json,
            )
        }
        #[cfg(target_os = "linux")]
        Command::Lab {
            command: LabCommand::Throughput { dataplanes, policies, seconds, runs, ipv6 },
        } => npm_agent::lab::throughput::throughput_cli(&dataplanes, policies, seconds, runs, ipv6),
        #[cfg(target_os = "linux")]
        Command::Lab { command: LabCommand::Crr { setups, policies, seconds, rounds, others } } => {
            npm_agent::lab::crr::crr_cli(&setups, &policies, seconds, rounds, others)
        }
        #[cfg(target_os = "linux")]
        Command::Lab {
            command: LabCommand::Demo { dataplane, nodes, hold, metrics_addr, case },
        } => npm_agent::lab::demo_cli(
            &case,
            &npm_agent::lab::LabOptions::new(&dataplane, nodes),
            hold,
            &metrics_addr,
        ),
        #[cfg(target_os = "linux")]
        Command::Debug { command, iptables_save, ipset_save } => {
            let tables = npm_agent::debug::Tables { iptables_save, ipset_save };
            match command {
                DebugCommand::Gettuples { src, dst, port, pin_root, iptables } => {
                    let default = PathBuf::from(npm_agent::dataplane::ebpf::DEFAULT_PIN_ROOT);
                    let explicit = pin_root.is_some();
                    let root = pin_root.unwrap_or(default);
                    let ebpf = !iptables
                        && tables.iptables_save.is_none()
                        && (explicit || root.join("maps").join(npm_common::MAP_ENDPOINTS).exists());
                    if ebpf {
                        npm_agent::debug::gettuples_ebpf(&root, &src, &dst, &port)
                    } else {
                        npm_agent::debug::gettuples(&tables, &src, &dst, &port)
                    }
                }
                DebugCommand::Convertiptable => npm_agent::debug::convertiptable(&tables),
            }
        }
        #[cfg(target_os = "linux")]
        Command::Counters { pin_root } => {
            match npm_agent::dataplane::ebpf::pinned_counters(&pin_root) {
                Ok(c) => {
                    println!("{:<14} {:>14} {:>14}", "reason", "ingress", "egress");
                    for r in npm_common::Reason::ALL {
                        let tag = if r.allowed() { "passed" } else { "DROPPED" };
                        println!(
                            "{:<14} {:>14} {:>14}   {tag}",
                            r.name(),
                            c.get(npm_common::DIR_INGRESS, r),
                            c.get(npm_common::DIR_EGRESS, r)
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("npm-agent counters: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(unix)]
        Command::Drops { follow, namespace, pod, recent, json, socket } => {
            use npm_agent::drops::{Filter, client, server::Request};
            let req = Request { filter: Filter { namespace, pod }, recent, follow };
            let mut out = std::io::stdout().lock();
            let mut count = 0usize;
            let printed = client::read(&socket, &req, |r| {
                count += 1;
                use std::io::Write as _;
                let line = if json {
                    serde_json::to_string(&r).unwrap_or_default()
                } else {
                    r.to_string()
                };
                writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
            });
            match printed {
                Ok(()) => {
                    if count == 0 && !follow {
                        eprintln!(
                            "npm-agent drops: no drop events{} since the agent started (it reports drop-events-rate drops a second per CPU; --follow waits for new ones)",
                            if req.filter == Filter::default() { "" } else { " matching" }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("npm-agent drops: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup { pin_root, config } => cleanup(pin_root, config.as_deref()),
    }
}

fn run(config_file: Option<&Path>, flags: npm_agent::agent::Settings) -> ExitCode {
    use npm_agent::agent;
    let config = match agent::Config::load(config_file, flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("npm-agent: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    agent::init_logging(config.log_level.as_deref());
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let stop = agent::stop_on_signals();
    match agent::run(&config, stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("npm-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cleanup(pin_root: Option<PathBuf>, config_file: Option<&Path>) -> ExitCode {
    use npm_agent::agent;
    let from_file = match config_file.map(agent::Settings::from_file).transpose() {
        Ok(s) => s.and_then(|s| s.pin_root),
        Err(e) => {
            eprintln!("npm-agent: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let pin_root = pin_root
        .or(from_file)
        .unwrap_or_else(|| PathBuf::from(npm_agent::dataplane::ebpf::DEFAULT_PIN_ROOT));
    match agent::cleanup(&pin_root) {
        #[cfg(windows)]
        Ok(_) => {
            println!("hns: removed the ACLs and SetPolicies of the agent");
            ExitCode::SUCCESS
        }
        #[cfg(target_os = "linux")]
        Ok(r) => {
            if r.ebpf.existed {
                println!(
                    "{}: removed {} pinned links and {} pinned maps",
                    r.ebpf.pin_root.display(),
                    r.ebpf.links,
                    r.ebpf.maps
                );
            } else {
                println!("{}: nothing to remove", r.ebpf.pin_root.display());
            }
            for (backend, chains) in &r.iptables.chains {
                println!("iptables-{}: removed {chains} AZURE-NPM chains", backend.as_str());
            }
            if r.iptables.sets > 0 {
                println!("ipset: removed {} azure-npm- sets", r.iptables.sets);
            }
            for p in &r.iptables.problems {
                eprintln!("npm-agent: cleanup: {p}");
            }
            if r.iptables.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("npm-agent: cleanup: {e:#}");
            ExitCode::FAILURE
        }
    }
}
