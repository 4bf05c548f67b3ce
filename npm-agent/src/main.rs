//! The `npm-agent` command: a thin shell over the library.

use std::path::PathBuf;
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
        /// Case files (see shared/conformance/FORMAT.md).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate { json, cases } => npm_agent::simulate::cli(&cases, json),
    }
}
