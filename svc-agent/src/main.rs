//! The svc-agent binary: see `svc-agent --help`.

use anyhow::Context as _;
use clap::Parser as _;
use svc_agent::{
    cli::{Cli, Command, Inspect, LogFormat, RunArgs, SocketLb},
    datapath::ReconcilerHandle as _,
    healthcheck, hostaddrs, ifaces, inspect, loader, metrics, pins, serve, standalone, startup,
};
use tracing::{error, info, warn};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_logging(format);
    let result = dispatch(cli).await;
    match result {
        // With JSON logs the fatal error is a log line like the others (`anyhow`'s `Error: ...`
        // would be the one line a collector cannot parse).
        Err(e) if format == LogFormat::Json => {
            error!("{e:#}");
            std::process::exit(1);
        }
        result => result,
    }
}

/// Log lines on stderr in `format`, at `RUST_LOG`'s levels (default `info`).
fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // The event's fields (`message` among them) at the top level of each object.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Inspect { .. }) {
        // On stderr: the tables on stdout stay as they are for scripts.
        eprintln!("{}", inspect::agent_status(&cli.bpffs));
    }
    match cli.command {
        Command::Run(args) => run(&cli.bpffs, &args).await,
        Command::Inspect {
            what: Inspect::Diff(args),
        } => std::process::exit(inspect_diff(&cli.bpffs, &args).await),
        Command::Inspect { what } => {
            print!("{}", inspect_text(&cli.bpffs, &what)?);
            Ok(())
        }
        Command::Cleanup => cleanup(&cli.bpffs),
    }
}

/// What `svc-agent inspect` prints (stdout), or why it cannot (nothing pinned, another
/// layout's pins: said plainly, exit 1).
fn inspect_text(bpffs: &std::path::Path, what: &Inspect) -> anyhow::Result<String> {
    if let Inspect::Trace(args) = what {
        // Bad arguments are said before anything is read.
        args.packet()?;
    }
    if let Some(why) = inspect::unreadable_pins(bpffs) {
        anyhow::bail!(why);
    }
    match what {
        Inspect::Stats(o) => inspect::format_stats(
            &inspect::read_pkt_stats(bpffs)?,
            &inspect::read_drop_stats(bpffs)?,
            o.format,
        ),
        Inspect::Services(o) => inspect::format_services(&inspect::read_services(bpffs)?, o.format),
        Inspect::Backends(args) => inspect::backends::format_backends(
            &inspect::read_services(bpffs)?,
            &args.filter(),
            args.output.format,
        ),
        Inspect::Affinity(args) => inspect::affinity::format_affinity(
            &inspect::affinity::read_affinity(bpffs)?,
            &inspect::read_services(bpffs)?,
            inspect::ct::monotonic_ns()?,
            &args.filter(),
            args.output.format,
        ),
        Inspect::Ct(args) => inspect::ct::format_ct(
            &inspect::ct::read_ct(bpffs)?,
            inspect::ct::monotonic_ns()?,
            &inspect::read_frontend_names(bpffs)?,
            &args.filter(),
            args.output.format,
        ),
        Inspect::Links(o) => inspect::format_links(bpffs, &inspect::read_links(bpffs)?, o.format),
        Inspect::Maps(o) => inspect::maps::format_maps(&inspect::maps::read_maps(bpffs)?, o.format),
        Inspect::Trace(args) => {
            let packet = args.packet()?;
            let maps = inspect::trace::pinned::PinnedMaps::open(bpffs)?;
            let walk = inspect::trace::trace(&maps, &packet, inspect::ct::monotonic_ns()?);
            inspect::trace::format_trace(&walk, args.output.format)
        }
        // Dispatched before (`inspect_diff`: exit codes of its own); never reached.
        Inspect::Diff(_) => anyhow::bail!("inspect diff sets its own exit code"),
        Inspect::Nat(o) => {
            let (entries, max) = inspect::nat::read_nat(bpffs)?;
            inspect::nat::format_nat(&entries, max, inspect::ct::monotonic_ns()?, o.format)
        }
    }
}

/// `svc-agent inspect diff`: prints the drift and returns the exit code (0: none, 1: drift,
/// 2: an error, said on stderr).
async fn inspect_diff(bpffs: &std::path::Path, args: &svc_agent::cli::DiffArgs) -> i32 {
    let run = async || -> anyhow::Result<(String, bool)> {
        let (nodeports, roles) = args.checked()?;
        if let Some(why) = inspect::unreadable_pins(bpffs) {
            anyhow::bail!(why);
        }
        // The node-facing interfaces' addresses serve NodePorts too, as in the agent.
        let host = svc_agent::hostaddrs::current(&roles).await?;
        let (state, notes) = if let Some(dir) = &args.from_dir {
            inspect::diff::desired_from_dir(dir, &args.node_name, nodeports, host)?
        } else {
            let connection = svc_agent::source::kube::Connection {
                kubeconfig: args.kubeconfig.clone(),
            };
            let client = connection.client().await?;
            inspect::diff::desired_from_api(&client, &args.node_name, nodeports, host).await?
        };
        for note in notes {
            eprintln!("{note}");
        }
        let desired = inspect::diff::desired_states(&state);
        let (have, backends) = inspect::diff::read_have(bpffs)?;
        let rows = inspect::diff::compare(&desired, &have, &backends);
        let text = inspect::diff::format_diff(&rows, &desired, args.output.format)?;
        Ok((text, !rows.is_empty()))
    };
    match run().await {
        Ok((text, drift)) => {
            print!("{text}");
            i32::from(drift)
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            2
        }
    }
}

/// The standalone source on `dir` as `args` configure it, reporting to `recorder` and
/// serving health-check ports through `health_checks`.
fn standalone(
    dir: &std::path::Path,
    args: &RunArgs,
    recorder: &metrics::Recorder,
    health_checks: &healthcheck::Publisher,
) -> anyhow::Result<standalone::Standalone> {
    let coalesce = std::time::Duration::from_millis(args.coalesce_ms);
    let mut directory =
        standalone::Standalone::new(dir, &args.node_name, coalesce, args.audit_interval())
            .with_nodeport_addresses(args.nodeport_addresses()?);
    directory.report_to(recorder.clone());
    directory.serve_health_checks(health_checks.clone());
    Ok(directory)
}

/// `svc-agent cleanup`: removes every layout's pins. Unpinned links release their programs
/// (the kernel detaches them, asynchronously, within moments); maps go with the last program.
fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    let root = bpffs.join(svc_common::PIN_ROOT);
    let meta = match std::fs::symlink_metadata(&root) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(dir = %root.display(), "nothing pinned");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", root.display())),
    };
    if !meta.is_dir() {
        std::fs::remove_file(&root).with_context(|| format!("removing {}", root.display()))?;
        warn!(path = %root.display(), "removed a non-directory where the pin directory belongs");
        return Ok(());
    }
    // Refuses while an agent runs (it holds the lock): removing its pins under it would detach
    // its programs while it goes on programming maps nobody reads. Held while removing, so no
    // agent starts in the middle.
    let _lock = pins::lock_dir(&root).context("cleanup refuses while an agent runs")?;
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
        snat: args.max_snat_entries,
    };
    info!(?sizes, approx_mib = sizes.approx_bytes() >> 20, "map sizes");
    let globals = loader::Globals {
        sock_lb_netns: match args.socket_lb {
            SocketLb::HostOnly => loader::own_netns_cookie()?,
            SocketLb::All | SocketLb::Off => 0,
        },
        maglev_size: args.maglev_table_size,
    };
    info!(
        socket_lb = ?args.socket_lb,
        netns_cookie = globals.sock_lb_netns,
        "connect-time translation scope"
    );
    Ok((sizes, globals))
}

/// Another layout's pins (an upgrade or a rollback), logged: this layout is built beside them
/// and they are removed after the first sync (svc-ebpf/DESIGN.md, "Layout versions").
fn other_layouts(bpffs: &std::path::Path) -> anyhow::Result<Vec<pins::OtherLayout>> {
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
    Ok(others)
}

/// Waits for SIGTERM or SIGINT on a task of its own; the receiver is told at once, and the
/// process exits after [`STOP_GRACE`] if it has not by then (a pass still writing is cut short:
/// every map write is whole and in the safe order, as when the agent is killed mid-pass, and
/// the next agent's first pass completes the change).
fn on_stop_signal(
    mut term: tokio::signal::unix::Signal,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stopping_tx.send(());
        tokio::time::sleep(STOP_GRACE).await;
        warn!(
            grace = ?STOP_GRACE,
            "a pass was still writing the maps after the stop signal: exiting in the middle of it"
        );
        std::process::exit(0);
    });
    (task, stopping)
}

/// How long a stop signal waits for a running pass to end before the agent exits anyway (the
/// `DaemonSet`'s grace period is 10 s).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(900);

/// Removes the other layouts' pins: their links unpinned (their programs detach), their maps
/// freed. Only once this layout's programs are attached and its maps programmed.
fn remove_other_layouts(others: &[pins::OtherLayout]) {
    for other in others {
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
}

/// The interface task: follows pod-facing and node-facing interfaces once the programs are
/// attached, for the agent's life; fails as soon as loading or attaching them does (the start
/// fails at once, also while the source still waits for its first sync).
async fn follow_ifaces(
    attached: tokio::sync::oneshot::Receiver<anyhow::Result<startup::Attached>>,
) -> anyhow::Result<()> {
    let startup::Attached {
        mut ebpf,
        watch,
        links,
    } = attached
        .await
        .context("the thread loading the programs ended without a word")??;
    ifaces::follow(&mut ebpf, watch, links).await
}

/// The arguments, and the capabilities: a missing one is named (and what it is for), rather
/// than a bare `EPERM` from the kernel halfway through the start.
fn check_first(args: &RunArgs) -> anyhow::Result<()> {
    args.check()?;
    svc_agent::caps::check(
        svc_agent::caps::effective()?,
        args.socket_lb != SocketLb::Off,
    )
}

async fn run(bpffs: &std::path::Path, args: &RunArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Everything that can be checked is checked before anything touches the kernel or the
    // bpffs: a bad argument fails the start with nothing loaded, attached or pinned.
    check_first(args)?;
    let (sizes, globals) = load_settings(args)?;
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
    // One agent per node: the lock on `<bpffs>/svc` is held until this function returns (the
    // kernel releases it however the process ends).
    let lock = pins::lock_pin_root(bpffs)?;
    info!(dir = %lock.path().display(), pid = std::process::id(), "holding the pin directory's lock");
    // Metrics and health are served from here on (after the lock: a second agent is refused
    // for the lock, not for the ports), on tasks of their own; a port that cannot be bound
    // fails the start before anything is loaded.
    let recorder = metrics::Recorder::new(Some(bpffs.to_owned()), args.healthz_stale_after());
    serve::start(args.metrics_addr()?, args.healthz_addr()?, &recorder).await?;
    // The health-check node ports, on a task of their own, following what each pass publishes.
    let health_checks = healthcheck::Publisher::start(recorder.clone());
    let pin_dir = loader::pin_dir(bpffs);
    // Another layout's pins (an upgrade or a rollback): this layout is built beside them and
    // they are removed after the first sync (svc-ebpf/DESIGN.md, "Layout versions").
    let others = other_layouts(bpffs)?;
    // Pod-facing and node-facing interfaces, those there now (the watch's first listing) and
    // those that appear later (netlink link events), get their role's TC programs; they are
    // followed for the agent's life.
    let watch = ifaces::IfaceWatch::start(args.iface_roles()?).await?;
    // Their addresses serve NodePorts with the Node's (a change recomputes those Services).
    let host_addresses = hostaddrs::follow(args.iface_roles()?).await?;
    // External flows to other nodes' endpoints get source ports of this range: the node's own
    // sockets must never pick them (svc-ebpf/DESIGN.md, "North-south").
    let snat_ports = args.snat_ports()?;
    svc_agent::datapath::snat::reserve_ports_or_warn(&args.proc_sys_net, &snat_ports);
    // The maps are created (or adopted), the programs loaded (verifier) and attached on a thread
    // of its own while the source lists and computes: the first pass waits for the maps only
    // (svc-ebpf/DESIGN.md, "A starting agent, in this order").
    let (mut datapath, attaching, attached) = startup::start(startup::Plan {
        bpffs: bpffs.to_owned(),
        sizes,
        globals,
        cgroup: args.socket_lb.cgroup(&args.cgroup).to_owned(),
        watch,
        metrics: recorder.clone(),
        snat_ports,
        maglev_size: args.maglev_table_size,
        xdp: args.xdp,
    })?;
    // After the first sync, and once this layout's programs are attached: another layout's
    // programs go only once this layout's maps hold the desired state (until then its TC links
    // run first on every hook and translate what they know, which this layout's programs
    // behind them then leave alone, and its connect-time programs translate before this
    // layout's see the call).
    let node_name = args.node_name.clone();
    let running = {
        let pin_dir = pin_dir.clone();
        move || -> anyhow::Result<()> {
            attaching.wait()?;
            remove_other_layouts(&others);
            info!(
                node = %node_name,
                pin_dir = %pin_dir.display(),
                startup_ms = startup::ms(started.elapsed()),
                "svc-agent running"
            );
            Ok(())
        }
    };
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let source = async {
        // `client` is the API server's client, or (`Err`) the directory to follow.
        match client {
            Err(dir) => {
                // The first sync happens before "running" is announced.
                let mut directory = standalone(dir, args, &recorder, &health_checks)?;
                directory.follow_host_addresses(host_addresses);
                directory.sync(&mut datapath)?;
                running()?;
                directory.follow(datapath.reconciler()?).await
            }
            Ok(client) => {
                let options = svc_agent::source::kube::Options {
                    node_name: args.node_name.clone(),
                    coalesce: std::time::Duration::from_millis(args.coalesce_ms),
                    events: !args.no_events,
                    audit_interval: args.audit_interval(),
                    metrics: recorder.clone(),
                    nodeport_addresses: args.nodeport_addresses()?,
                    health_checks: Some(health_checks.clone()),
                    host_addresses: Some(host_addresses),
                };
                info!(node = %args.node_name, "following the Kubernetes API server");
                svc_agent::source::kube::follow(client, &options, &mut datapath, running).await
            }
        }
    };
    // Interfaces and signals have tasks of their own: neither waits behind a pass (which holds
    // this task for seconds at 100,000 Services).
    let mut ifaces = tokio::spawn(follow_ifaces(attached));
    let (stop, stopping) = on_stop_signal(term);
    tokio::select! {
        r = source => r?,
        r = &mut ifaces => r.context("the interface task failed")??,
        _ = stopping => {}
    }
    stop.abort();
    ifaces.abort();
    info!(
        links = %pins::links_dir(&pin_dir).display(),
        "stopping: the programs stay attached through their pinned links and keep translating \
         with the pinned maps until the next agent takes over (`svc-agent cleanup` removes them)"
    );
    // The loading thread, should a stop have come during the start, ends before the lock goes
    // (no next agent starts while it still attaches).
    drop(datapath);
    drop(lock);
    Ok(())
}
