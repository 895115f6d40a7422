//! The svc-agent binary: see `svc-agent --help`.

use anyhow::Context as _;
use clap::Parser as _;
use svc_agent::{
    cli::{Cli, Command, Inspect, RunArgs},
    datapath::{AyaMaps, Reconciler},
    inspect, loader, standalone,
};
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&cli.bpffs, &args).await,
        Command::Inspect {
            what: Inspect::Stats,
        } => {
            print!(
                "{}",
                inspect::format_pkt_stats(&inspect::read_pkt_stats(&cli.bpffs)?)
            );
            print!(
                "{}",
                inspect::format_drop_stats(&inspect::read_drop_stats(&cli.bpffs)?)
            );
            Ok(())
        }
        Command::Inspect {
            what: Inspect::Services,
        } => {
            print!(
                "{}",
                inspect::format_services(&inspect::read_services(&cli.bpffs)?)
            );
            Ok(())
        }
        Command::Cleanup => {
            let dir = loader::pin_dir(&cli.bpffs);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => info!(dir = %dir.display(), "removed pinned state"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => info!("nothing pinned"),
                Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
            }
            Ok(())
        }
    }
}

async fn run(bpffs: &std::path::Path, args: &RunArgs) -> anyhow::Result<()> {
    loader::ensure_bpffs(bpffs)?;
    let sizes = loader::MapSizes {
        services: args.max_service_entries,
        backends: args.max_backends,
        conntrack: args.max_conntrack_entries,
        affinity: args.max_affinity_entries,
    };
    info!(?sizes, approx_mib = sizes.approx_bytes() >> 20, "map sizes");
    let mut ebpf = loader::load_pinned(bpffs, sizes)?;
    loader::load_programs(&mut ebpf)?;
    let patterns = loader::IfacePatterns::parse(&args.pod_ifaces)?;
    // Held until run() returns: dropping the links detaches the connect-time programs.
    let _cgroup_links = svc_agent::cgroup::attach_from_arg(&mut ebpf, &args.cgroup)?;
    let mut reconciler = Reconciler::adopt(AyaMaps::take(&mut ebpf)?)?;
    // Pod-facing interfaces, those there now (the watch's first listing) and those that appear
    // later (netlink link events), get the TC programs; they are followed for the agent's life.
    let iface_watch = svc_agent::ifaces::IfaceWatch::start(patterns).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let source = async {
        if let Some(dir) = &args.from_dir {
            // The first sync happens before "running" is announced.
            standalone::sync_once(dir, &args.node_name, &mut reconciler)?;
            info!(node = %args.node_name, pin_dir = %loader::pin_dir(bpffs).display(), "svc-agent running");
            standalone::follow(dir, &args.node_name, &mut reconciler).await
        } else {
            let connection = svc_agent::source::kube::Connection {
                kubeconfig: args.kubeconfig.clone(),
            };
            let options = svc_agent::source::kube::Options {
                node_name: args.node_name.clone(),
                coalesce: std::time::Duration::from_millis(args.coalesce_ms),
                events: !args.no_events,
            };
            let client = connection.client().await?;
            info!(node = %args.node_name, "following the Kubernetes API server");
            svc_agent::source::kube::follow(client, &options, &mut reconciler, || {
                info!(node = %args.node_name, pin_dir = %loader::pin_dir(bpffs).display(), "svc-agent running");
            })
            .await
        }
    };
    tokio::select! {
        r = source => r?,
        r = svc_agent::ifaces::follow(&mut ebpf, iface_watch) => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("stopping: programs detach with this process, pinned maps stay for the next agent");
    Ok(())
}
