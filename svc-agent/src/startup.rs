//! The kernel half of a start, on a thread of its own while the source lists, computes and
//! writes the first pass (svc-ebpf/DESIGN.md, "A starting agent, in this order").
//!
//! Creating the maps (about 0.17 s at the default sizes: the kernel preallocates and charges
//! some 500 MiB) and loading the programs (the verifier, 0.1-0.5 s for the ten programs) need
//! nothing the source does, and the source needs nothing of them until its first pass, which
//! needs only the reconciler over the maps. So [`start`] hands everything to a thread that, in
//! this order:
//! 1. loads the object with its maps pinned (adopting, creating or migrating them;
//!    [`loader::load_pinned`]) and builds the reconciler over them ([`Reconciler::adopt`]
//!    rebuilds the ids and settles `ADDRS_V1` before any of this agent's programs can read it),
//!    with its helper threads, and the `CT_V1` pressure watch;
//! 2. hands the reconciler over ([`Datapath`]: the first pass waits for it there) - unless a
//!    map migration is under way: [`Migration::finish`](crate::migrate::Migration::finish)
//!    copies into the new maps what they lack, so it must come before the first pass deletes
//!    anything from them (else it would bring deleted entries back), and the reconciler is
//!    handed over only after step 5;
//! 3. loads the programs (verifier);
//! 4. attaches the connect-time programs to the cgroup, then the TC programs to the
//!    pod-facing and node-facing interfaces of the first listing (each its role's pair), each
//!    taking over an earlier agent's pinned link;
//! 5. finishes a map migration;
//! 6. says it is done ([`Attaching::wait`], which the agent calls before it says "svc-agent
//!    running" and before it removes another layout's pins) and hands the object, the
//!    interface watch and the links ([`Attached`]) to the task that follows interfaces.
//!
//! A failure at any step reaches both the first pass (through [`Datapath`]) and the
//! interface task, which fails the start as soon as it happens (also while the source still
//! waits for the API server).
//!
//! The programs' instructions name the maps by the descriptors the object was loaded with
//! (aya relocates them at [`aya::EbpfLoader::load`]): the maps handed over in step 2 must stay
//! open until the programs are loaded in step 3. [`Datapath`]'s drop ensures it by joining the
//! thread before it drops the reconciler.

use std::{
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::Ebpf;
use tracing::{debug, info, warn};

use crate::{
    datapath::{AyaMaps, Reconciler, ReconcilerHandle},
    ifaces::{IfaceLinks, IfaceWatch},
    loader,
};

/// What the thread loads and attaches, and where.
#[derive(Debug)]
pub struct Plan {
    /// The bpf filesystem (mounted).
    pub bpffs: PathBuf,
    /// The map sizes.
    pub sizes: loader::MapSizes,
    /// The programs' load-time constants.
    pub globals: loader::Globals,
    /// `--cgroup` as `svc-agent run` resolved it (empty: connect-time translation off).
    pub cgroup: String,
    /// The pod-facing and node-facing interfaces, listed; the thread attaches to those of the
    /// listing.
    pub watch: IfaceWatch,
    /// Where the `CT_V1` pressure thread reports its counts.
    pub metrics: crate::metrics::Recorder,
    /// The SNAT port range (`--snat-port-range`).
    pub snat_ports: crate::datapath::snat::PortRange,
    /// The external frontends' Maglev table size (`--maglev-table-size`; 0: off).
    pub maglev_size: u32,
    /// How the XDP program goes on node-facing interfaces (`--xdp`).
    pub xdp: crate::pins::XdpAttach,
}

/// The programs loaded and attached, for the task that follows interfaces from then on.
pub struct Attached {
    /// The object, its programs loaded (and attached).
    pub ebpf: Ebpf,
    /// The interface watch, its first listing handled.
    pub watch: IfaceWatch,
    /// The pinned links of the TC programs (both roles).
    pub links: IfaceLinks,
}

/// The reconciler, once the thread has built it. Dropping it waits for the thread (see the
/// module docs).
pub struct Datapath {
    pending: Option<mpsc::Receiver<Result<Reconciler<AyaMaps>, String>>>,
    reconciler: Option<Reconciler<AyaMaps>>,
    thread: Option<JoinHandle<()>>,
}

impl ReconcilerHandle<AyaMaps> for Datapath {
    fn reconciler(&mut self) -> anyhow::Result<&mut Reconciler<AyaMaps>> {
        if let Some(pending) = self.pending.take() {
            let since = Instant::now();
            let built = pending
                .recv()
                .map_err(|_| anyhow!("the thread loading the maps ended without a word"))?
                .map_err(|e| anyhow!(e))?;
            debug!(
                waited_ms = ms(since.elapsed()),
                "the first pass has its reconciler"
            );
            self.reconciler = Some(built);
        }
        self.reconciler
            .as_mut()
            .ok_or_else(|| anyhow!("the maps could not be loaded"))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Bounded by the verifier; its outcome was reported through the channels. The
            // reconciler (and one still in the channel) is dropped after.
            let _ = thread.join();
        }
    }
}

/// Tells whether the programs are attached.
#[derive(Debug)]
pub struct Attaching {
    done: mpsc::Receiver<Result<(), String>>,
}

impl Attaching {
    /// Waits until the programs are attached (and a migration finished): blocks for what is
    /// left of the verifier, if anything.
    ///
    /// # Errors
    /// When loading or attaching failed (the same error the [`Attached`] receiver gets).
    pub fn wait(self) -> anyhow::Result<()> {
        let since = Instant::now();
        self.done
            .recv()
            .unwrap_or_else(|_| Err("the thread loading the programs ended without a word".into()))
            .map_err(|e| anyhow!(e))?;
        debug!(waited_ms = ms(since.elapsed()), "the programs are attached");
        Ok(())
    }
}

/// Where the thread reports.
struct Report {
    reconciler: Option<mpsc::SyncSender<Result<Reconciler<AyaMaps>, String>>>,
    done: mpsc::SyncSender<Result<(), String>>,
    attached: tokio::sync::oneshot::Sender<anyhow::Result<Attached>>,
}

impl Report {
    /// Hands the reconciler over (once; nobody may be waiting any more: then it stays in the
    /// channel until [`Datapath`] drops).
    fn reconciler(&mut self, built: Result<Reconciler<AyaMaps>, String>) {
        if let Some(tx) = self.reconciler.take() {
            let _ = tx.send(built);
        }
    }
}

/// Starts the thread that loads the maps and the programs and attaches the programs as `plan`
/// says. Returns the reconciler's handle for the source, the handle to wait for the attach
/// on, and the receiver of the outcome for the interface task.
///
/// # Errors
/// When the thread cannot be started.
pub fn start(
    plan: Plan,
) -> anyhow::Result<(
    Datapath,
    Attaching,
    tokio::sync::oneshot::Receiver<anyhow::Result<Attached>>,
)> {
    let (reconciler_tx, pending) = mpsc::sync_channel(1);
    let (done_tx, done) = mpsc::sync_channel(1);
    let (attached_tx, attached) = tokio::sync::oneshot::channel();
    let mut report = Report {
        reconciler: Some(reconciler_tx),
        done: done_tx,
        attached: attached_tx,
    };
    let thread = std::thread::Builder::new()
        .name("svc-load".into())
        .spawn(move || {
            let outcome = load_and_attach(plan, &mut report);
            let said = outcome.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
            if let Err(e) = &said {
                // Only if it was not handed over before the failure.
                report.reconciler(Err(e.clone()));
            }
            // Receivers may be gone (the agent stopping): nothing to tell then.
            let _ = report.done.send(said);
            let _ = report.attached.send(outcome);
        })
        .context("starting the thread that loads the maps and programs")?;
    Ok((
        Datapath {
            pending: Some(pending),
            reconciler: None,
            thread: Some(thread),
        },
        Attaching { done },
        attached,
    ))
}

fn load_and_attach(plan: Plan, report: &mut Report) -> anyhow::Result<Attached> {
    let Plan {
        bpffs,
        sizes,
        globals,
        cgroup,
        mut watch,
        metrics,
        snat_ports,
        maglev_size,
        xdp,
    } = plan;
    let pin_dir = loader::pin_dir(&bpffs);
    let since = Instant::now();
    let (mut ebpf, migration) =
        loader::load_pinned(&bpffs, sizes, globals).context("loading the maps")?;
    info!(
        took_ms = ms(since.elapsed()),
        "maps ready (pinned ones adopted, missing ones created)"
    );
    let since = Instant::now();
    let reconciler = reconciler(&mut ebpf, snat_ports, maglev_size).context("adopting the maps")?;
    info!(
        took_ms = ms(since.elapsed()),
        frontends = reconciler.current().services.len(),
        backends = reconciler.current().backends.len(),
        "adopted what the maps hold"
    );
    // Warns while the table of answered connections is nearly full (svc-ebpf/DESIGN.md,
    // "Conntrack under pressure").
    crate::datapath::pressure::watch(&pin_dir, metrics)?;
    // Kept here while a migration is under way (see the module docs).
    let held = if migration.is_empty() {
        report.reconciler(Ok(reconciler));
        None
    } else {
        Some(reconciler)
    };
    let since = Instant::now();
    loader::load_programs(&mut ebpf, xdp.pin_name().is_some()).context("loading the programs")?;
    let verified = since.elapsed();
    info!(took_ms = ms(verified), "programs loaded (verifier)");
    // Connect-time programs, then the TC ones (pod-facing and node-facing interfaces): each
    // takes over what an earlier agent of this layout pinned (same maps, so at once), or goes
    // beside another layout's.
    crate::cgroup::attach_from_arg(&mut ebpf, &cgroup, &pin_dir)?;
    let mut links = IfaceLinks::new(&pin_dir, xdp);
    crate::ifaces::attach_listed(&mut ebpf, &mut watch, &mut links)?;
    // Maps of another size were migrated: the programs now attached use the new maps; what the
    // old programs added meanwhile is copied over and the old maps' pins go. Only then may the
    // first pass write (and delete).
    if let Some(reconciler) = held {
        migration.finish(&pin_dir)?;
        report.reconciler(Ok(reconciler));
    }
    // Only this build's programs record flows now: the record of the pods they translate for
    // can be completed (svc-ebpf/DESIGN.md, "Replies to pods translated at the socket").
    fill_tc_clients(&pin_dir);
    info!(
        took_ms = ms(since.elapsed().saturating_sub(verified)),
        "programs attached"
    );
    Ok(Attached { ebpf, watch, links })
}

/// Completes `TC_CLIENTS_V1` over the flows an older build tracked and marks it ready
/// ([`crate::datapath::tc_clients`]). A failure only leaves replies to pods on their conntrack
/// lookups: logged, not fatal.
fn fill_tc_clients(pin_dir: &std::path::Path) {
    use crate::datapath::tc_clients::{
        Filled, TcClientMaps, attached_interfaces, fill_and_mark_ready,
    };
    let since = Instant::now();
    let filled = attached_interfaces(pin_dir).and_then(|interfaces| {
        let mut maps = TcClientMaps::pinned(pin_dir)?;
        fill_and_mark_ready(&mut maps, &interfaces)
    });
    match filled {
        Ok(Filled::AlreadyReady) => {}
        Ok(Filled::Ready(interfaces)) => info!(
            interfaces,
            took_ms = ms(since.elapsed()),
            "recorded the pods with flows translated at TC (all interfaces when the connection \
             tables hold any): replies to other pods skip conntrack"
        ),
        Err(e) => warn!(
            "could not complete the record of pods with flows translated at TC (every reply from \
             a backend address keeps its conntrack lookups until the next start): {e:#}"
        ),
    }
}

/// The reconciler over the loaded maps (adopting what they hold), with its helper threads (and
/// the SNAT one, `datapath::snat`): the
/// one that clears flow state a pass ends (UDP flows, affinity, UDP sockets' backends), so the
/// next change never waits behind a pass over the connection table, and the one that destroys
/// connected UDP sockets translated to ended backends (svc-ebpf/DESIGN.md, "Connected UDP
/// sockets of ended backends").
fn reconciler(
    ebpf: &mut Ebpf,
    snat_ports: crate::datapath::snat::PortRange,
    maglev_size: u32,
) -> anyhow::Result<Reconciler<AyaMaps>> {
    // Before the connection tables are taken out of the object: its thread reads them.
    let snat = crate::datapath::snat::Snat::start(ebpf, snat_ports)?;
    let maps = AyaMaps::take(ebpf)?;
    let flow_tables = maps.flow_tables()?;
    let mut reconciler = Reconciler::adopt(maps)?;
    reconciler.sweep_in_background(flow_tables)?;
    reconciler.send_ended_to(crate::sockets::SocketDestroyer::start(ebpf)?);
    reconciler.follow_snat(snat);
    reconciler.follow_maglev(crate::datapath::maglev::Maglev::take(ebpf, maglev_size)?);
    Ok(reconciler)
}

/// Milliseconds, with a tenth, for log fields.
#[must_use]
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
