//! `cargo xtask bench cluster`: an emulated cluster under a controller's load (a benchmark, not
//! a test: it prints figures, asserts nothing and stays out of CI).
//!
//! N emulated nodes (`SVC_BENCH_NODES`, default 3, at most 10), each a network namespace with
//! its own bpffs and cgroup running one `svc-agent run` as shipped (default flags and map
//! sizes) that follows the test API server (`tests/src/apiserver`, in node 1's namespace) with
//! the real kube client. Every node has echo pods (the end-to-end tests' TCP echo servers) and
//! one client pod. The load generator ([`svc_tests::loadgen`]) writes Services and
//! `EndpointSlices` through a `kube::Client` at `SVC_BENCH_RATE` writes per second: first the
//! Services clients use (`SVC_BENCH_SERVICES`, each `SVC_BENCH_REPLICAS` endpoints drawn from
//! every node's echo pods), then `SVC_BENCH_ROUNDS` rounds of rollouts (maxSurge 1), HPA steps
//! (`SVC_BENCH_HPA_STEP` endpoints up, then down) and churn (`SVC_BENCH_CHURN` other Services
//! created and deleted).
//!
//! Measured per node (one row of the Markdown table):
//!
//! - **network programming latency**: from the moment the API server acknowledged a write
//!   until that node's pinned `SERVICES_V1` / `BACKENDS_V1` show the Service's frontend picking
//!   among exactly the expected backends (or the frontend gone), polled every 100 µs from this
//!   process; only writes that change what a node must program are timed (a not-ready endpoint
//!   appearing changes nothing); p50 / p99 / max, how many never showed within 30 s (missed)
//!   and how many were overtaken by the Service's next write before they showed (superseded).
//! - **failed requests**: the node's client pod sends one request per new TCP connection to the
//!   Services being rolled, round robin, every 20 ms, from before the first rollout to after
//!   the last write; a request fails when the connection or its answer does not come within
//!   1 s. Counted separately during rollouts and HPA steps and at other times. Here the pods
//!   of removed endpoints keep running, so a failure is the dataplane's alone.
//! - **agent CPU and memory**: the agent's utime + stime over the load (and as a share of one
//!   core), and its peak RSS (`VmHWM`) at the end.
//!
//! Run as root. Everything the run creates (namespaces, bpffs mounts, cgroups, agents, the API
//! server, the echo servers) is removed when it ends, also on error.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering},
        mpsc::{self, Receiver, Sender, TryRecvError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_agent::{
    datapath::render::{frontend_key, map_addr},
    model::{FrontendKey, Protocol, Scope},
};
use svc_common::service::{Backend, ServiceKey, ServiceValue};
use svc_tests::{
    apiserver::{ApiServer, Options},
    k8s::{self, Agent, AgentSource, Backends},
    loadgen::{self, Config, Expect, Generator, Phase, PoolPod, ServiceSpec, Written},
    loadgen_remote,
    loadgen_table::{self, NodeRow},
    netns::{MAX_NODES, Pod, Topology},
    procfs::{cpu_time, status_kib},
    testbed::vip4,
};

/// The Services' port.
const PORT: u16 = 80;
/// The echo pods' port.
const TARGET_PORT: u16 = 8080;
/// Where the generator's objects live.
const NAMESPACE: &str = "bench";
/// How often an observer looks at its node's maps.
const POLL: Duration = Duration::from_micros(100);
/// Bound on one write showing in a node's maps.
const MISS_AFTER: Duration = Duration::from_secs(30);
/// A client's pause between requests.
const REQUEST_GAP: Duration = Duration::from_millis(20);
/// A request's bound (connect, then the answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on an agent's start.
#[expect(
    clippy::duration_suboptimal_units,
    reason = "Duration::from_mins needs Rust 1.91; the workspace supports 1.89"
)]
const AGENT_START: Duration = Duration::from_secs(60);
/// Bound on a client's loop.
#[expect(
    clippy::duration_suboptimal_units,
    reason = "Duration::from_mins needs Rust 1.91; the workspace supports 1.89"
)]
const CLIENT_BOUND: Duration = Duration::from_secs(600);

type ServicesMap = BpfHashMap<MapData, ServiceKey, ServiceValue>;
type BackendsMap = BpfHashMap<MapData, u32, Backend>;

/// The run's knobs (from the environment).
struct Bench {
    nodes: usize,
    load: Config,
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    std::env::var(name).map_or(Ok(default), |v| {
        v.trim().parse().with_context(|| format!("{name}={v}"))
    })
}

impl Bench {
    fn from_env() -> anyhow::Result<Self> {
        let nodes: usize = number("SVC_BENCH_NODES", 3)?;
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("SVC_BENCH_NODES={nodes}: the emulated cluster has 1 to {MAX_NODES} nodes");
        }
        let services: u32 = number("SVC_BENCH_SERVICES", 4)?;
        let churn: u32 = number("SVC_BENCH_CHURN", 4)?;
        if services == 0 || services > 100 || churn > 100 {
            bail!("SVC_BENCH_SERVICES must be 1 to 100 and SVC_BENCH_CHURN at most 100");
        }
        let load = Config {
            namespace: NAMESPACE.to_owned(),
            services: (0..services)
                .map(|i| ServiceSpec {
                    name: format!("roll-{i}"),
                    cluster_ip: Some(vip4(10 + i)),
                })
                .collect(),
            churn: (0..churn)
                .map(|i| ServiceSpec {
                    name: format!("churn-{i}"),
                    cluster_ip: Some(vip4(200 + i)),
                })
                .collect(),
            replicas: number("SVC_BENCH_REPLICAS", 3)?,
            hpa_step: number("SVC_BENCH_HPA_STEP", 2)?,
            rounds: number("SVC_BENCH_ROUNDS", 2)?,
            port: PORT,
            target_port: TARGET_PORT,
            rate: number("SVC_BENCH_RATE", 20.0)?,
        };
        Ok(Self { nodes, load })
    }

    /// Echo pods per node: enough for a rollout's surge and an HPA step, at least two.
    fn echo_pods_per_node(&self) -> usize {
        let need = self.load.replicas + self.load.hpa_step.max(1);
        need.div_ceil(self.nodes).max(2)
    }
}

fn main() -> anyhow::Result<()> {
    if let Some(kubeconfig) = std::env::var_os("SVC_BENCH_KUBECONFIG") {
        return on_a_real_cluster(Path::new(&kubeconfig));
    }
    svc_tests::netns::require_root()?;
    let bench = Bench::from_env()?;
    let agent_bin = k8s::agent_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _rt = rt.enter();
    let started = Instant::now();
    let progress = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());

    let (topo, backends, pool, clients) = build_cluster(&bench)?;
    let plan = loadgen::plan(&bench.load, &pool)?;
    let setup = plan.iter().take_while(|p| p.phase == Phase::Setup).count();
    progress(&format!(
        "{} nodes, {} echo pods, {} client pods; plan: {} writes ({} timed), {setup} of them setup",
        bench.nodes,
        pool.len(),
        clients.len(),
        plan.len(),
        plan.iter()
            .filter(|p| p.expect != Expect::Unchanged)
            .count()
    ));
    let (api, agents) = start_control_plane(&rt, &topo, &agent_bin)?;
    progress("svc-agent running on every node (as shipped: default flags and map sizes)");

    let run = Run {
        bench: &bench,
        topo: &topo,
        api: &api,
        agents: &agents,
        pool: &pool,
        plan: &plan,
        setup,
    };
    let result = run.load(&clients, &progress);

    // Teardown: the agents first (each must stop cleanly), then the servers and the topology.
    let mut stops = Vec::new();
    for agent in agents {
        let node = agent.node().to_owned();
        let (status, log) = agent.stop_with_log()?;
        if !status.success() {
            stops.push(format!(
                "svc-agent on {node} ended with {status}; log:\n{log}"
            ));
        }
    }
    drop(api);
    drop(backends);
    drop(topo);
    let rows = result?;
    println!(
        "\n## svc-bench-cluster: {} emulated nodes, {} Services x {} replicas rolled {} times \
         (HPA step {}), {} churned Services, {} writes/s\n",
        bench.nodes,
        bench.load.services.len(),
        bench.load.replicas,
        bench.load.rounds,
        bench.load.hpa_step,
        bench.load.churn.len(),
        bench.load.rate
    );
    print!("{}", loadgen_table::markdown(&rows));
    println!(
        "\nlatency: API server acknowledged the write -> the node's SERVICES_V1/BACKENDS_V1 \
         show it (timed writes only: those that change what a node programs); requests: one \
         per new TCP connection from each node's client pod to the rolled Services, failed = no \
         answer within {}s; CPU: the agent's utime+stime over the load; RSS: its VmHWM.",
        REQUEST_TIMEOUT.as_secs()
    );
    println!("run took {:.0} s", started.elapsed().as_secs_f64());
    if !stops.is_empty() {
        bail!("{}", stops.join("\n"));
    }
    Ok(())
}

/// `cargo xtask kind bench`: the same plan against the cluster `kubeconfig` points at, with
/// the echo pods of `manifests/kind/echo.yaml` (namespace `svc-bench`) as endpoints and the
/// `ClusterIPs` the API server allocates; per node what its proxy's metrics report (see
/// [`svc_tests::loadgen_remote`]).
fn on_a_real_cluster(kubeconfig: &Path) -> anyhow::Result<()> {
    let mut bench = Bench::from_env()?;
    "svc-bench".clone_into(&mut bench.load.namespace);
    for s in bench.load.services.iter_mut().chain(&mut bench.load.churn) {
        s.cluster_ip = None;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = rt.block_on(loadgen_remote::run(kubeconfig, &bench.load))?;
    println!(
        "\n## svc-bench-cluster on {}: {} Services x {} replicas rolled {} times (HPA step {}), \
         {} churned Services, {} writes/s\n",
        kubeconfig.display(),
        bench.load.services.len(),
        bench.load.replicas,
        bench.load.rounds,
        bench.load.hpa_step,
        bench.load.churn.len(),
        bench.load.rate
    );
    print!("{}", loadgen_table::markdown(&rows));
    println!(
        "\nlatency: each node's {} histogram over the run (from the slices' \
         last-change-trigger-time, set at each write), every observation counted as its \
         bucket's upper bound; missed: beyond the last finite bucket; CPU: \
         process_cpu_seconds_total where the proxy exports it; requests and RSS: not measured on \
         a real cluster.",
        loadgen_remote::PROGRAMMING
    );
    Ok(())
}

/// The nodes, echo pods (serving, the generator's pool) and one client pod per node.
fn build_cluster(bench: &Bench) -> anyhow::Result<(Topology, Backends, Vec<PoolPod>, Vec<Pod>)> {
    let mut topo = Topology::with_nodes(bench.nodes)?;
    let backends = Backends::new();
    let mut pool = Vec::new();
    let mut clients = Vec::new();
    for node in 0..bench.nodes {
        for k in 0..bench.echo_pods_per_node() {
            let pod = topo.add_pod(node, &format!("echo-{}-{k}", node + 1))?;
            backends.serve(
                &pod.ns,
                &pod.name,
                SocketAddr::new(pod.ipv4.into(), TARGET_PORT),
            )?;
            pool.push(PoolPod {
                ip: pod.ipv4.into(),
                node: topo.node(node).name.clone(),
                name: pod.name.clone(),
            });
        }
        clients.push(topo.add_pod(node, &format!("client-{}", node + 1))?);
    }
    Ok((topo, backends, pool, clients))
}

/// The API server (writable, in node 1's namespace on its underlay address, so every node
/// reaches it) holding the Nodes, and one agent per node following it.
fn start_control_plane(
    rt: &tokio::runtime::Runtime,
    topo: &Topology,
    agent_bin: &Path,
) -> anyhow::Result<(ApiServer, Vec<Agent>)> {
    let node1 = topo.node(0);
    let api = rt.block_on(ApiServer::start_in(
        &node1.ns,
        SocketAddr::new(node1.underlay_v4.into(), 0),
        Options {
            writable: true,
            ..Options::default()
        },
    ))?;
    for node in topo.nodes() {
        api.apply_yaml(&k8s::node_yaml(node))?;
    }
    let kubeconfig = topo.run_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut agents = Vec::new();
    for node in topo.nodes() {
        agents.push(
            Agent::start_with_flags(
                agent_bin,
                node,
                &AgentSource::Kube(&kubeconfig),
                &[],
                AGENT_START,
            )
            .with_context(|| format!("starting svc-agent on {}", node.name))?,
        );
    }
    Ok((api, agents))
}

/// What one observer sends back.
#[derive(Default)]
struct Observed {
    latencies: Vec<Duration>,
    missed: usize,
    superseded: usize,
}

/// What the generator tells the observers.
enum Msg {
    /// A write was acknowledged.
    Write(Box<Written>),
    /// Answer once everything sent so far showed (or was missed).
    Barrier(Sender<()>),
}

/// What one client counted: (sent, failed) during rollouts/HPA, and otherwise; a few errors.
#[derive(Default)]
struct Requests {
    rollout: (u64, u64),
    other: (u64, u64),
    errors: Vec<String>,
}

/// One run's parts.
struct Run<'a> {
    bench: &'a Bench,
    topo: &'a Topology,
    api: &'a ApiServer,
    agents: &'a [Agent],
    pool: &'a [PoolPod],
    plan: &'a [loadgen::Planned],
    /// How many of the plan's first writes are the setup.
    setup: usize,
}

/// The generator thread's handshakes with the benchmark: it says when the setup is programmed
/// everywhere, and waits for the go before the load.
struct Handshake {
    setup_done: Sender<()>,
    go: Receiver<()>,
}

impl Run<'_> {
    /// The setup, then clients, then the load; one row per node.
    fn load(&self, clients: &[Pod], progress: &dyn Fn(&str)) -> anyhow::Result<Vec<NodeRow>> {
        // One observer per node, reading that node's pinned maps.
        let mut to_observers = Vec::new();
        let mut observers = Vec::new();
        for agent in self.agents {
            let (tx, rx) = mpsc::channel();
            to_observers.push(tx);
            let bpffs = agent.bpffs().to_owned();
            observers.push(std::thread::spawn(move || observe(&bpffs, &rx)));
        }
        let phase = Arc::new(AtomicU8::new(0));
        let (setup_done, setup_done_rx) = mpsc::channel::<()>();
        let (go_tx, go) = mpsc::channel::<()>();
        let generator = self.spawn_generator(
            to_observers,
            Arc::clone(&phase),
            Handshake { setup_done, go },
        )?;
        let stop_clients = Arc::new(AtomicBool::new(false));
        let started = (|| -> anyhow::Result<_> {
            setup_done_rx
                .recv()
                .context("the load generator ended during the setup")?;
            progress("setup programmed on every node; clients start, then the load");
            let vips: Vec<IpAddr> = self
                .bench
                .load
                .services
                .iter()
                .filter_map(|s| s.cluster_ip)
                .collect();
            let client_threads: Vec<JoinHandle<anyhow::Result<Requests>>> = clients
                .iter()
                .map(|c| {
                    let (ns, stop, phase) =
                        (c.ns.clone(), Arc::clone(&stop_clients), Arc::clone(&phase));
                    let vips = vips.clone();
                    std::thread::spawn(move || {
                        ns.run(move || Ok(send_requests(&vips, &stop, &phase)))
                    })
                })
                .collect();
            // Requests before the load too: every Service answers at rest.
            std::thread::sleep(Duration::from_secs(1));
            let cpu_before: Vec<Duration> = self
                .agents
                .iter()
                .map(|a| cpu_time(a.pid()))
                .collect::<anyhow::Result<_>>()?;
            go_tx
                .send(())
                .context("the load generator ended before the load")?;
            Ok((client_threads, cpu_before))
        })();
        let generated = generator
            .join()
            .map_err(|_| anyhow::anyhow!("the load generator panicked"));
        // Clients stop a second after the last write (or at once after an error).
        if started.is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
        stop_clients.store(true, Ordering::Relaxed);
        // The generator's own error says more than "it ended early".
        let load = match (generated, started) {
            (Ok(Err(e)), _) => return Err(e.context("the load generator")),
            (Err(e), _) | (_, Err(e)) => return Err(e),
            (Ok(Ok(load)), Ok(started)) => (load, started),
        };
        let (load, (client_threads, cpu_before)) = load;
        progress(&format!(
            "load done in {:.1} s; {} writes acknowledged by the API server",
            load.as_secs_f64(),
            self.plan.len()
        ));
        let mut rows = Vec::new();
        for ((agent, observer), (client, before)) in self
            .agents
            .iter()
            .zip(observers)
            .zip(client_threads.into_iter().zip(cpu_before))
        {
            let observed = observer
                .join()
                .map_err(|_| anyhow::anyhow!("an observer panicked"))??;
            let requests = client
                .join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
            for e in &requests.errors {
                eprintln!("  {}: failed request: {e}", agent.node());
            }
            rows.push(NodeRow {
                node: agent.node().to_owned(),
                latencies: observed.latencies,
                missed: Some(observed.missed),
                superseded: Some(observed.superseded),
                rollout_requests: Some(requests.rollout),
                other_requests: Some(requests.other),
                cpu: Some((cpu_time(agent.pid())?.saturating_sub(before), load)),
                peak_rss_kib: Some(status_kib(agent.pid(), "VmHWM:")?),
            });
        }
        Ok(rows)
    }

    /// The generator: in node 1's namespace (where the API server listens), on a runtime of
    /// its own on that thread, so its client's sockets are made there. Returns the load's
    /// duration (after the setup).
    fn spawn_generator(
        &self,
        to_observers: Vec<Sender<Msg>>,
        phase: Arc<AtomicU8>,
        handshake: Handshake,
    ) -> anyhow::Result<JoinHandle<anyhow::Result<Duration>>> {
        let ns = self.topo.node(0).ns.clone();
        let api_config = self.api.config()?;
        let (load, pool, plan) = (
            self.bench.load.clone(),
            self.pool.to_vec(),
            self.plan.to_vec(),
        );
        let setup = self.setup;
        Ok(std::thread::spawn(move || {
            ns.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let client = kube::Client::try_from(api_config)?;
                    let mut generator = Generator::new(&client, &load, &pool)?;
                    let send = |w: &Written| {
                        phase.store(phase_code(w.planned.phase), Ordering::Relaxed);
                        for tx in &to_observers {
                            let _ = tx.send(Msg::Write(Box::new(w.clone())));
                        }
                    };
                    let t = Instant::now();
                    generator.run(&plan[..setup], 0, send).await?;
                    let written = t.elapsed();
                    barrier(&to_observers)?;
                    eprintln!(
                        "  setup: {setup} writes acknowledged in {:.2} s, shown on every node \
                         {:.2} s later",
                        written.as_secs_f64(),
                        t.elapsed().saturating_sub(written).as_secs_f64()
                    );
                    let _ = handshake.setup_done.send(());
                    handshake
                        .go
                        .recv()
                        .context("the benchmark gave up before the load")?;
                    let load_started = Instant::now();
                    generator.run(&plan[setup..], setup, send).await?;
                    barrier(&to_observers)?;
                    Ok(load_started.elapsed())
                })
            })
        }))
    }
}

/// Sends a barrier to every observer and waits for all of them.
fn barrier(observers: &[Sender<Msg>]) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel();
    for o in observers {
        o.send(Msg::Barrier(tx.clone()))
            .context("an observer ended early")?;
    }
    for _ in observers {
        rx.recv().context("an observer ended early")?;
    }
    Ok(())
}

fn phase_code(phase: Phase) -> u8 {
    match phase {
        Phase::Setup => 0,
        Phase::Rollout => 1,
        Phase::Hpa => 2,
        Phase::Churn => 3,
    }
}

/// One node's observer: times every write until the node's maps show it.
fn observe(bpffs: &Path, rx: &Receiver<Msg>) -> anyhow::Result<Observed> {
    let services = open_map(bpffs, "SERVICES_V1")?;
    let services: ServicesMap = BpfHashMap::try_from(services)?;
    let backends: BackendsMap = BpfHashMap::try_from(open_map(bpffs, "BACKENDS_V1")?)?;
    let mut out = Observed::default();
    let mut pending: BTreeMap<String, Written> = BTreeMap::new();
    let mut barriers: Vec<Sender<()>> = Vec::new();
    let mut closed = false;
    loop {
        // Nothing to look for: wait for the next message instead of polling.
        let first = if pending.is_empty() && !closed {
            rx.recv().ok()
        } else {
            None
        };
        closed |= pending.is_empty() && first.is_none();
        for msg in first
            .into_iter()
            .map(Ok)
            .chain(std::iter::from_fn(|| match rx.try_recv() {
                Ok(msg) => Some(Ok(msg)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Err(())),
            }))
        {
            match msg {
                Ok(Msg::Write(w)) => {
                    if w.planned.expect != Expect::Unchanged
                        && pending.insert(w.service.clone(), *w).is_some()
                    {
                        out.superseded += 1;
                    }
                }
                Ok(Msg::Barrier(tx)) => barriers.push(tx),
                Err(()) => {
                    closed = true;
                    break;
                }
            }
        }
        pending.retain(|_, w| {
            if shows(&services, &backends, w) {
                out.latencies.push(w.acked.elapsed());
                false
            } else if w.acked.elapsed() > MISS_AFTER {
                out.missed += 1;
                false
            } else {
                true
            }
        });
        if pending.is_empty() {
            for b in barriers.drain(..) {
                let _ = b.send(());
            }
            if closed {
                return Ok(out);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the node's maps show what `w` expects of its Service.
fn shows(services: &ServicesMap, backends: &BackendsMap, w: &Written) -> bool {
    let Some(vip) = w.cluster_ip else {
        return false;
    };
    let now = programmed(services, backends, vip);
    match &w.planned.expect {
        Expect::Unchanged => true,
        Expect::Absent => now.is_none(),
        Expect::Backends(ips) => {
            now == Some(
                ips.iter()
                    .map(|ip| map_addr(*ip).0)
                    .collect::<BTreeSet<_>>(),
            )
        }
    }
}

/// The backend addresses `vip`'s frontend picks among (`None`: no frontend). A slot or backend
/// missing (the agent writing meanwhile) gives a set that matches nothing expected.
fn programmed(
    services: &ServicesMap,
    backends: &BackendsMap,
    vip: IpAddr,
) -> Option<BTreeSet<[u8; 16]>> {
    let key = frontend_key(&FrontendKey {
        addr: vip,
        port: PORT,
        proto: Protocol::Tcp,
        scope: Scope::Internal,
    });
    let frontend = services.get(&key, 0).ok()?;
    let mut set = BTreeSet::new();
    for slot in 1..=frontend.count {
        let slot_key = ServiceKey { slot, ..key };
        let Some(backend) = services
            .get(&slot_key, 0)
            .ok()
            .and_then(|s| backends.get(&s.id, 0).ok())
        else {
            return Some(BTreeSet::new());
        };
        set.insert(backend.addr);
    }
    Some(set)
}

fn open_map(bpffs: &Path, name: &str) -> anyhow::Result<Map> {
    let path: PathBuf = bpffs.join(svc_common::PIN_SUBDIR).join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::HashMap(data))
}

/// A client pod's loop (run inside its namespace): one request per new connection to each
/// Service in turn until `stop` (bounded: at most [`CLIENT_BOUND`]).
fn send_requests(vips: &[IpAddr], stop: &AtomicBool, phase: &AtomicU8) -> Requests {
    let mut out = Requests::default();
    let deadline = Instant::now() + CLIENT_BOUND;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for &vip in vips {
            let rolling = matches!(phase.load(Ordering::Relaxed), 1 | 2);
            let counts = if rolling {
                &mut out.rollout
            } else {
                &mut out.other
            };
            counts.0 += 1;
            n += 1;
            let dst = SocketAddr::new(vip, PORT);
            if let Err(e) = k8s::tcp_request(dst, &format!("r{n}"), REQUEST_TIMEOUT) {
                counts.1 += 1;
                if out.errors.len() < 5 {
                    out.errors.push(format!("{dst}: {e:#}"));
                }
            }
            std::thread::sleep(REQUEST_GAP);
        }
    }
    out
}
