//! The svc-agent binary: see `svc-agent --help`.

use clap::Parser as _;
use svc_agent::{
    cli::{Cli, Command, Inspect, RunArgs, SocketLb},
    datapath::{AyaMaps, Reconciler},
    ifaces, inspect, loader, pins, standalone,
};
use tracing::{info, warn};

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
        Command::Inspect { what: Inspect::Ct } => {
            let tables = inspect::ct::read_ct(&cli.bpffs)?;
            print!(
                "{}",
                inspect::ct::format_ct(&tables, inspect::ct::monotonic_ns()?)
            );
            Ok(())
        }
        Command::Inspect {
            what: Inspect::Links,
        } => {
            print!(
                "{}",
                inspect::format_links(&cli.bpffs, &inspect::read_links(&cli.bpffs)?)
            );
            Ok(())
        }
        Command::Cleanup => cleanup(&cli.bpffs),
    }
}

/// `svc-agent cleanup`: removes every layout's pins. Unpinned links release their programs
/// (the kernel detaches them, asynchronously, within moments); maps go with the last program.
fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let root = bpffs.join(svc_common::PIN_ROOT);
    if !root.exists() {
        info!(dir = %root.display(), "nothing pinned");
        return Ok(());
    }
    let removed = pins::remove_tree(&root)?;
    info!(
        dir = %root.display(),
        links = removed.links,
        maps = removed.maps,
        "removed the pinned state: links unpinned (their programs detach), maps freed with them"
    );
    Ok(())
}

/// The map sizes and load-time constants `svc-agent run` loads the programs with (and logs).
fn load_settings(args: &RunArgs) -> anyhow::Result<(loader::MapSizes, loader::Globals)> {
    let sizes = loader::MapSizes {
        services: args.max_service_entries,
        backends: args.max_backends,
        conntrack: args.max_conntrack_entries,
        conntrack_new: args.max_ct_new_entries,
        affinity: args.max_affinity_entries,
        sock_revnat: args.max_sock_revnat_entries,
        sock_pin: args.max_sock_pin_entries,
    };
    info!(?sizes, approx_mib = sizes.approx_bytes() >> 20, "map sizes");
    let globals = loader::Globals {
        sock_lb_netns: match args.socket_lb {
            SocketLb::HostOnly => loader::own_netns_cookie()?,
            SocketLb::All | SocketLb::Off => 0,
        },
    };
    info!(
        socket_lb = ?args.socket_lb,
        netns_cookie = globals.sock_lb_netns,
        "connect-time translation scope"
    );
    Ok((sizes, globals))
}

async fn run(bpffs: &std::path::Path, args: &RunArgs) -> anyhow::Result<()> {
    // The API server's configuration is checked before anything touches the kernel, so a bad
    // kubeconfig (or no cluster at all) fails the start with nothing loaded or attached.
    let client = if let Some(dir) = &args.from_dir {
        Err(dir)
    } else {
        let connection = svc_agent::source::kube::Connection {
            kubeconfig: args.kubeconfig.clone(),
        };
        Ok(connection.client().await?)
    };
    loader::ensure_bpffs(bpffs)?;
    let pin_dir = loader::pin_dir(bpffs);
    // Another layout's pins (an upgrade or a rollback): this layout is built beside them and
    // they are removed after the first sync (svc-ebpf/DESIGN.md, "Layout versions").
    let (others, unknown) = pins::other_layouts(bpffs)?;
    for path in &unknown {
        warn!(path = %path.display(), "not a layout directory of svc-agent: left alone");
    }
    for other in &others {
        info!(
            dir = %other.path.display(),
            version = other.version,
            relation = %other.relation(),
            "found the pins of another layout: building layout v{} beside it; its links and maps \
             are removed once this agent's programs are attached and its maps programmed, and \
             its connection tracking and affinity state are not carried over",
            svc_common::MAP_LAYOUT_VERSION
        );
    }
    let (sizes, globals) = load_settings(args)?;
    let mut ebpf = loader::load_pinned(bpffs, sizes, globals)?;
    loader::load_programs(&mut ebpf)?;
    let patterns = loader::IfacePatterns::parse(&args.pod_ifaces)?;
    let mut reconciler = Reconciler::adopt(AyaMaps::take(&mut ebpf)?)?;
    // Warns while the table of answered connections is nearly full (svc-ebpf/DESIGN.md,
    // "Conntrack under pressure").
    svc_agent::datapath::pressure::watch(&pin_dir)?;
    // Connected UDP sockets translated to backends that a pass ends are destroyed from a thread
    // of their own (svc-ebpf/DESIGN.md, "Connected UDP sockets of ended backends").
    reconciler.send_ended_to(svc_agent::sockets::SocketDestroyer::start(&mut ebpf)?);
    // Connect-time programs, then pod-facing ones: each takes over what an earlier agent of this
    // layout pinned (same maps, so at once), or goes beside another layout's (see below).
    svc_agent::cgroup::attach_from_arg(&mut ebpf, args.socket_lb.cgroup(&args.cgroup), &pin_dir)?;
    // Pod-facing interfaces, those there now (the watch's first listing) and those that appear
    // later (netlink link events), get the TC programs; they are followed for the agent's life.
    let mut iface_watch = ifaces::IfaceWatch::start(patterns).await?;
    let mut pod_links = ifaces::PodIfaceLinks::new(&pin_dir);
    ifaces::attach_listed(&mut ebpf, &mut iface_watch, &mut pod_links)?;
    // After the first sync: another layout's programs go only once this layout's maps hold the
    // desired state (until then its TC links run first on every hook and translate what they
    // know, which this layout's programs behind them then leave alone, and its connect-time
    // programs translate before this layout's see the call).
    let node_name = args.node_name.clone();
    let running = {
        let pin_dir = pin_dir.clone();
        move || {
            for other in &others {
                match pins::remove_tree(&other.path) {
                    Ok(removed) => info!(
                        dir = %other.path.display(),
                        version = other.version,
                        links = removed.links,
                        maps = removed.maps,
                        "replaced the {} layout: its links unpinned (its programs detach), its maps removed",
                        other.relation()
                    ),
                    Err(e) => warn!(
                        dir = %other.path.display(), error = %format!("{e:#}"),
                        "could not remove another layout's pins: both layouts stay attached \
                         (the other one first on each hook); remove it by hand"
                    ),
                }
            }
            info!(node = %node_name, pin_dir = %pin_dir.display(), "svc-agent running");
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let source = async {
        // `client` is the API server's client, or (`Err`) the directory to follow.
        match client {
            Err(dir) => {
                // The first sync happens before "running" is announced.
                standalone::sync_once(dir, &args.node_name, &mut reconciler)?;
                running();
                standalone::follow(dir, &args.node_name, &mut reconciler).await
            }
            Ok(client) => {
                let options = svc_agent::source::kube::Options {
                    node_name: args.node_name.clone(),
                    coalesce: std::time::Duration::from_millis(args.coalesce_ms),
                    events: !args.no_events,
                };
                info!(node = %args.node_name, "following the Kubernetes API server");
                svc_agent::source::kube::follow(client, &options, &mut reconciler, running).await
            }
        }
    };
    tokio::select! {
        r = source => r?,
        r = ifaces::follow(&mut ebpf, iface_watch, pod_links) => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!(
        links = %pins::links_dir(&pin_dir).display(),
        "stopping: the programs stay attached through their pinned links and keep translating \
         with the pinned maps until the next agent takes over (`svc-agent cleanup` removes them)"
    );
    Ok(())
}
