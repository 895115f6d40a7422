//! Command-line interface of `svc-agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The svc node agent: an eBPF service dataplane for Kubernetes.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// Where the bpf filesystem is (mounted there if it is not); state is pinned in `svc/v1`.
    #[arg(long, global = true, default_value = "/sys/fs/bpf", env = "SVC_BPFFS")]
    pub bpffs: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the dataplane, then keep it programmed until stopped.
    Run(RunArgs),
    /// Show the dataplane's state from its pinned maps.
    Inspect {
        /// What to show.
        #[command(subcommand)]
        what: Inspect,
    },
    /// Detach everything and remove the pinned state.
    Cleanup,
}

/// Arguments of `svc-agent run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// This node's name (decides which endpoints are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Comma-separated globs naming the pod-facing interfaces (host ends of pod veths).
    #[arg(long, default_value = "svcpod*,lxc*,veth*", env = "SVC_POD_IFACES")]
    pub pod_ifaces: String,
}

/// `svc-agent inspect` subjects.
#[derive(Subcommand, Debug)]
pub enum Inspect {
    /// Parser counters (packets and bytes per protocol and per malformed-input reason).
    Stats,
}
