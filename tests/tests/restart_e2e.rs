//! Agent restarts drop nothing, end to end through the real agent: the programs stay attached
//! through their pinned links while no agent runs, and a new agent takes them over.
//!
//! - **Restart under load** (SIGKILL, then SIGTERM): a `ClusterIP` Service with backends on
//!   both nodes and a `ClientIP`-affinity Service; a client pod on node1 holds 120 long-lived
//!   TCP connections through the VIPs (IPv4 and IPv6), each asking and getting an answer
//!   every round, plus a steady, bounded stream of new short TCP and UDP requests. node1's
//!   agent is killed, stays down 1.5 s with the traffic flowing, is started again; later the
//!   same with a graceful stop. Every long-lived connection must keep answering from the same
//!   backend, no request may fail, the restarted agent's first sync must write nothing,
//!   conntrack and affinity entries must be the same ones, and the TC links must be the same
//!   links with the new programs in them (`BPF_LINK_UPDATE`), the cgroup links new ones, the
//!   old programs off every hook. While killed, the record of pods with TC flows
//!   (`TC_CLIENTS_V1`) is marked not complete, as a build without it leaves it: the restarted
//!   agent must complete it (naming the client's interface when its flows are translated at
//!   TC, not when at the socket); after the graceful stop it must read nothing. At the end `svc-agent cleanup` removes everything.
//! - **Stale pins**: interfaces deleted, renamed away or created while no agent ran: the new
//!   agent removes the pins of the first two (detaching the renamed one), attaches to the new
//!   one, and goes on following interfaces.
//! - **Another layout's pins** (here: this layout's directory renamed to `svc/v0`, which is
//!   what an older agent would have left): the agent builds its layout beside it, attaches,
//!   then removes the old one; new connections work, and each hook carries one program.
//! - **The Kubernetes API source**: an agent following the test API server is killed and
//!   restarted; its first sync writes nothing and long-lived connections keep their backend.
//!
//! Every test builds its own topology and removes it at the end (and asserts that nothing of
//! the run remains); every socket operation has a timeout and every loop is bounded in count
//! and time. Needs root and a built agent (`cargo build -p svc-agent`): fails, never skips,
//! without them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use svc_agent::{
    inspect::{PinnedLinkView, read_links},
    loader::pin_dir,
};
use svc_common::{
    addr::{self, FAMILY_V4, FAMILY_V6},
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue, dir},
    net::ipproto,
    sock::{SockRevNatKey, SockRevNatValue},
    tc_clients::{TC_CLIENTS_READY, TcClient, TcClientsReady},
};
use svc_tests::{
    apiserver::{ApiServer, Options as ApiOptions},
    k8s::{self, Agent, Answer, Backends, EndpointSlice, Protocol, Service, TcpSession},
    netns::{self, Node, Pod, Topology},
    testbed::{TestBed, vip4, vip6},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP request is sent once and must be answered within this.
const UDP_WAIT: Duration = Duration::from_secs(1);
/// Long-lived connections per family.
const LONG_V4: usize = 100;
const LONG_V6: usize = 20;
/// Every long-lived connection asks once per round; rounds are this far apart ...
const ROUND_GAP: Duration = Duration::from_millis(100);
/// ... and there are at most this many.
const MAX_ROUNDS: u32 = 600;
/// New short requests are this far apart ...
const SHORT_GAP: Duration = Duration::from_millis(10);
/// ... and there are at most this many.
const MAX_SHORT: u32 = 6_000;
/// How long the agent stays down.
const DOWNTIME: Duration = Duration::from_millis(1500);
/// Traffic before the first stop and after each restart.
const STEADY: Duration = Duration::from_millis(700);
/// How long the kernel may take to release an unpinned link.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);
/// The backends' port.
const BACKEND_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// VIP hosts: `web` (no affinity) and `sticky` (`ClientIP`).
const WEB: u32 = 10;
const STICKY: u32 = 11;

/// What the agent on node1 is doing; traffic is counted per phase.
const PHASES: [&str; 5] = [
    "running",
    "down (SIGKILL)",
    "restarted",
    "down (SIGTERM)",
    "restarted again",
];

fn must_be_root() {
    if let Err(e) = netns::require_root() {
        panic!("{e:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// One test's cluster. Fields drop in order: servers, agents, then the topology (whose guard
/// removes namespaces, mounts, cgroups and the run directory).
struct Cluster {
    backends: Backends,
    agents: Vec<Option<Agent>>,
    bed: TestBed,
}

impl std::ops::Deref for Cluster {
    type Target = TestBed;
    fn deref(&self) -> &TestBed {
        &self.bed
    }
}

impl Cluster {
    /// A topology with `pods` ((node, name)) and a manifest directory holding the Nodes.
    fn new(pods: &[(usize, &str)]) -> Self {
        Self {
            backends: Backends::new(),
            agents: Vec::new(),
            bed: TestBed::new(pods),
        }
    }

    fn node(&self, index: usize) -> &Node {
        self.bed.topo.node(index)
    }

    /// Serves TCP and UDP on [`BACKEND_PORT`] of both of `pod`'s addresses.
    fn serve(&self, pod: &str) {
        let p = self.pod(pod);
        for ip in [IpAddr::from(p.ipv4), p.ipv6.into()] {
            self.backends
                .serve(&p.ns, pod, SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("serving {pod} on {ip}: {e:#}"));
        }
    }

    /// Writes `web` (TCP and UDP, no affinity) and `sticky` (TCP, `ClientIP`), both dual
    /// stack with `pods` as ready endpoints.
    fn write_services(&self, pods: &[&str]) {
        let web = Service::cluster_ip("web", &[vip4(WEB), vip6(WEB)])
            .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
            .port("dns", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
        let sticky = Service::cluster_ip("sticky", &[vip4(STICKY), vip6(STICKY)]).port(
            "http",
            Protocol::Tcp,
            SERVICE_PORT,
            BACKEND_PORT,
        );
        let mut docs = Vec::new();
        for (svc, affinity) in [(&web, false), (&sticky, true)] {
            let yaml = svc.to_yaml();
            let none = "  sessionAffinity: None\n";
            assert!(yaml.contains(none), "unexpected Service YAML:\n{yaml}");
            docs.push(if affinity {
                yaml.replace(none, "  sessionAffinity: ClientIP\n")
            } else {
                yaml
            });
            for ipv6 in [false, true] {
                let pods = pods.iter().map(|n| self.pod(n));
                docs.push(
                    EndpointSlice::new(&svc.name, ipv6)
                        .ports_of(svc, &[])
                        .ready_pods(&self.bed.topo, pods)
                        .to_yaml(),
                );
            }
        }
        self.bed
            .manifests
            .write("services.yaml", &k8s::documents(&docs))
            .expect("writing the Services");
    }

    /// Starts the agent on node `node` (it programs the manifests before it says it runs).
    fn start_agent(&mut self, node: usize) -> &Agent {
        let agent = Agent::start(
            &self.bed.agent_bin,
            self.node(node),
            self.bed.manifests.path(),
        )
        .unwrap_or_else(|e| panic!("starting svc-agent on node{}: {e:#}", node + 1));
        if self.agents.len() <= node {
            self.agents.resize_with(node + 1, || None);
        }
        self.agents[node] = Some(agent);
        self.agent(node)
    }

    fn agent(&self, node: usize) -> &Agent {
        self.agents
            .get(node)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("no agent runs on node{}", node + 1))
    }

    fn take_agent(&mut self, node: usize) -> Agent {
        self.agents
            .get_mut(node)
            .and_then(Option::take)
            .unwrap_or_else(|| panic!("no agent runs on node{}", node + 1))
    }

    /// Stops the remaining agents (each must exit cleanly, without warnings), drops the
    /// topology and asserts that nothing of the run remains.
    fn finish(self) {
        let Self {
            backends,
            agents,
            bed,
        } = self;
        drop(backends);
        let mut bed = bed;
        bed.agents.extend(agents.into_iter().flatten());
        bed.finish();
    }
}

/// Asserts the agent logged no warning or error.
fn assert_quiet(log: &str, node: &str) {
    assert!(
        !log.contains(" WARN ") && !log.contains(" ERROR "),
        "svc-agent on {node} warned:\n{log}"
    );
}

/// Asserts the agent's first sync wrote and deleted nothing: it adopted the maps as they were.
fn assert_first_sync_wrote_nothing(agent: &Agent) -> String {
    let line = agent
        .first_sync_line()
        .unwrap_or_else(|| panic!("no sync logged:\n{}", agent.log()));
    for field in [
        "services_written=0",
        "services_deleted=0",
        "backends_written=0",
        "backends_deleted=0",
    ] {
        assert!(
            line.split_whitespace().any(|w| w == field),
            "the restarted agent's first sync rewrote the maps ({field} missing): {line}"
        );
    }
    line
}

// ---------------------------------------------------------------------------------------------
// Kernel state: maps, links, TCX hooks
// ---------------------------------------------------------------------------------------------

fn map_addr(ip: IpAddr) -> (addr::Addr, u8) {
    match ip {
        IpAddr::V4(v4) => (addr::from_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn open_pinned(bpffs: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir(bpffs).join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))
}

/// The TCP forward conntrack entries (`client:port -> VIP:port` => backend id).
fn ct_forward(bpffs: &Path) -> anyhow::Result<BTreeMap<(addr::Addr, u16, addr::Addr, u16), u32>> {
    let map: BpfHashMap<_, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, "CT_V1")?))?;
    // Entries of short flows come and go while this iterates: a key gone between listing and
    // reading is skipped; the long-lived flows' entries are used all the time and stay.
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.dir == dir::FORWARD && k.proto == ipproto::TCP)
        .map(|(k, v)| {
            (
                (k.src, k.sport.to_host(), k.dst, k.dport.to_host()),
                v.backend_id,
            )
        })
        .collect())
}

/// `TC_CLIENTS_READY_V1`'s value: whether `TC_CLIENTS_V1` names every client.
fn tc_clients_ready(bpffs: &Path) -> anyhow::Result<u32> {
    let map: Array<_, TcClientsReady> =
        Array::try_from(Map::Array(open_pinned(bpffs, "TC_CLIENTS_READY_V1")?))?;
    Ok(map.get(&0, 0)?.ready)
}

fn set_tc_clients_ready(bpffs: &Path, ready: u32) -> anyhow::Result<()> {
    let mut map: Array<_, TcClientsReady> =
        Array::try_from(Map::Array(open_pinned(bpffs, "TC_CLIENTS_READY_V1")?))?;
    map.set(0, TcClientsReady { ready }, 0)?;
    Ok(())
}

/// The pod-facing interfaces `TC_CLIENTS_V1` names.
fn tc_clients(bpffs: &Path) -> anyhow::Result<BTreeSet<u32>> {
    let map: BpfHashMap<_, u32, TcClient> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, "TC_CLIENTS_V1")?))?;
    Ok(map.keys().filter_map(Result::ok).collect())
}

/// After a restart: the record of pods with flows translated at TC is complete and names the
/// client's interface exactly when its flows are translated at TC. With `filled`, the map had
/// been left not ready (as an older build leaves it), and the new agent must have completed
/// it, saying so; otherwise it was ready and the agent read nothing.
fn check_tc_clients(node: &Node, log: &str, client_if: &str, filled: bool) {
    let at_socket = k8s::pods_at_socket();
    let said = log
        .lines()
        .find(|l| l.contains("recorded the pods with flows translated at TC"));
    if filled {
        let line = said.unwrap_or_else(|| panic!("the agent did not fill TC_CLIENTS_V1:\n{log}"));
        // At TC the connection tables hold the long-lived flows: every interface is recorded.
        assert_eq!(
            line.contains("interfaces=0 "),
            at_socket,
            "interfaces recorded (pods at the socket: {at_socket}): {line}"
        );
    } else {
        assert!(
            said.is_none(),
            "a ready TC_CLIENTS_V1 was filled again:\n{log}"
        );
    }
    let ready = tc_clients_ready(&node.bpffs).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        ready, TC_CLIENTS_READY,
        "TC_CLIENTS_READY_V1 after the restart"
    );
    let recorded = tc_clients(&node.bpffs).unwrap_or_else(|e| panic!("{e:#}"));
    // At the socket, the client's connections never reach conntrack: replies to it skip it.
    assert_eq!(
        recorded.contains(&ifindex(node, client_if)),
        !at_socket,
        "TC_CLIENTS_V1 and the client's interface {client_if} (pods at the socket: \
         {at_socket}): {recorded:?}"
    );
}

/// The connect-time reverse entries (`(socket cookie, backend, port)` => service address and
/// port).
fn sock_revnat(bpffs: &Path) -> anyhow::Result<BTreeMap<(u64, addr::Addr, u16), SocketAddr>> {
    let map: BpfHashMap<_, SockRevNatKey, SockRevNatValue> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, "SOCK_REVNAT_V1")?))?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            let ip = if k.family == FAMILY_V4 {
                IpAddr::from([v.addr[0], v.addr[1], v.addr[2], v.addr[3]])
            } else {
                IpAddr::from(v.addr)
            };
            (
                (k.cookie, k.addr, k.port.to_host()),
                SocketAddr::new(ip, v.port.to_host()),
            )
        })
        .collect())
}

/// The affinity entries (`(client, frontend id, family)` => backend id).
fn affinity(bpffs: &Path) -> anyhow::Result<BTreeMap<(addr::Addr, u32, u8), u32>> {
    let map: BpfHashMap<_, AffinityKey, AffinityValue> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, "AFFINITY_V1")?))?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.client, k.frontend_id, k.family), v.backend_id))
        .collect())
}

/// The links pinned on `node`, by pin path (relative to `links/`).
fn pinned_links(node: &Node) -> BTreeMap<PathBuf, PinnedLinkView> {
    read_links(&node.bpffs)
        .unwrap_or_else(|e| panic!("reading the links pinned on {}: {e:#}", node.name))
        .into_iter()
        .map(|l| (l.pin.clone(), l))
        .collect()
}

/// The ids of the programs on the TCX `hook` of `iface` in `node`'s namespace.
fn tcx_programs(node: &Node, iface: &str, hook: TcAttachType) -> anyhow::Result<Vec<u32>> {
    node.ns.run(|| {
        let (_, progs) = SchedClassifier::query_tcx(iface, hook)
            .with_context(|| format!("querying {hook:?} of {iface}"))?;
        Ok(progs.iter().map(aya::programs::ProgramInfo::id).collect())
    })
}

/// `(ingress, egress)` program ids of `iface`.
fn tcx_both(node: &Node, iface: &str) -> (Vec<u32>, Vec<u32>) {
    let get = |hook| tcx_programs(node, iface, hook).unwrap_or_else(|e| panic!("{e:#}"));
    (get(TcAttachType::Ingress), get(TcAttachType::Egress))
}

fn ifindex(node: &Node, iface: &str) -> u32 {
    node.ns
        .run(|| nix::net::if_::if_nametoindex(iface).with_context(|| format!("ifindex of {iface}")))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Program ids that some link in the system still runs, out of `ids`.
fn still_linked(ids: &BTreeSet<u32>) -> BTreeSet<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.program_id())
        .filter(|id| ids.contains(id))
        .collect()
}

/// Waits (bounded) until no link in the system runs any of `ids` (released links go
/// asynchronously).
fn wait_unlinked(ids: &BTreeSet<u32>, what: &str) -> Duration {
    let t = Instant::now();
    loop {
        let left = still_linked(ids);
        if left.is_empty() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < RELEASE_TIMEOUT,
            "{what}: programs {left:?} still linked after {RELEASE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `check` every 10 ms for at most `timeout`; panics with `what` and the last state.
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> (bool, T),
) -> T {
    let t = Instant::now();
    loop {
        let (done, state) = check();
        if done {
            return state;
        }
        assert!(
            t.elapsed() < timeout,
            "{what} within {timeout:?}; last: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Requests answered and failed per phase, and the first failures.
#[derive(Default)]
struct Tally {
    ok: [AtomicU64; PHASES.len()],
    failed: [AtomicU64; PHASES.len()],
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self, phase: usize) {
        self.ok[phase].fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, phase: usize, why: &str) {
        self.failed[phase].fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() < 20 {
            errors.push(format!("[{}] {why}", PHASES[phase]));
        }
    }

    fn ok_in(&self, phase: usize) -> u64 {
        self.ok[phase].load(Ordering::Relaxed)
    }

    fn total_ok(&self) -> u64 {
        self.ok.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn total_failed(&self) -> u64 {
        self.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn per_phase(&self) -> String {
        PHASES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.ok_in(*i) + self.failed[*i].load(Ordering::Relaxed) > 0)
            .map(|(i, name)| {
                format!(
                    "{name}: {} ok / {} failed",
                    self.ok_in(i),
                    self.failed[i].load(Ordering::Relaxed)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One long-lived connection through a VIP and the backend that answered its first request.
struct LongConn {
    session: TcpSession,
    dst: SocketAddr,
    local: SocketAddr,
    backend: String,
    dead: bool,
}

/// Local ports of long-lived connections: below the ephemeral range (32768-60999), so no
/// short connection the system gives a port can get one of theirs. Per packet, two flows from
/// the same client port to two Services that share a backend would be one tuple at the
/// backend (the datapath does not remap source ports yet; kernel conntrack NAT does), and the
/// restart checks would fail for that, not for the restart.
static LONG_PORTS: AtomicU16 = AtomicU16::new(20_000);

/// Opens `n` connections from `client` to `dst` and asks once on each.
fn open_long(client: &Pod, dst: SocketAddr, n: usize) -> Vec<LongConn> {
    client
        .ns
        .run(|| {
            let mut conns = Vec::with_capacity(n);
            for i in 0..n {
                let port = LONG_PORTS.fetch_add(1, Ordering::Relaxed);
                let mut session = TcpSession::connect_from(port, dst, IO_TIMEOUT)?;
                let local = session.local_addr()?;
                let answer = session.ask(&format!("open{i}"))?;
                ensure!(answer.from == dst, "open{i}: answered from {}", answer.from);
                conns.push(LongConn {
                    session,
                    dst,
                    local,
                    backend: answer.label,
                    dead: false,
                });
            }
            Ok(conns)
        })
        .unwrap_or_else(|e| panic!("opening long-lived connections to {dst}: {e:#}"))
}

/// Every round, one request on every live connection: answered by the connection's own
/// backend, from the VIP. A connection that fails once is counted and not asked again.
fn run_long(conns: &mut [LongConn], stop: &AtomicBool, phase: &AtomicUsize, tally: &Tally) -> u32 {
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && !stop.load(Ordering::Relaxed) {
        for (i, c) in conns.iter_mut().enumerate().filter(|(_, c)| !c.dead) {
            let p = phase.load(Ordering::Relaxed);
            let request = format!("long{i}-r{rounds}");
            match c.session.ask(&request) {
                Ok(a) if a.label == c.backend && a.from == c.dst => tally.ok(p),
                Ok(a) => {
                    c.dead = true;
                    tally.fail(
                        p,
                        &format!(
                            "{request} {} -> {}: answered by {} from {}, not by {} from the VIP",
                            c.local, c.dst, a.label, a.from, c.backend
                        ),
                    );
                }
                Err(e) => {
                    c.dead = true;
                    tally.fail(p, &format!("{request} {} -> {}: {e:#}", c.local, c.dst));
                }
            }
        }
        rounds += 1;
        std::thread::sleep(ROUND_GAP);
    }
    rounds
}

/// Where the short requests go, in turn.
#[derive(Clone, Debug)]
struct ShortTarget {
    dst: SocketAddr,
    proto: Protocol,
    /// The backend that must answer (affinity), if one must.
    expect: Option<String>,
}

impl ShortTarget {
    /// Requests to `dst` that any backend may answer.
    fn any(dst: SocketAddr, proto: Protocol) -> Self {
        Self {
            dst,
            proto,
            expect: None,
        }
    }
}

/// New connections (TCP) and new sockets (UDP, one datagram, no retry) one after the other,
/// each checked for an answer from the VIP (and from the expected backend). Call it in the
/// client's namespace.
fn run_short(
    targets: &[ShortTarget],
    stop: &AtomicBool,
    phase: &AtomicUsize,
    tally: &Tally,
) -> u32 {
    let mut sent = 0;
    while sent < MAX_SHORT && !stop.load(Ordering::Relaxed) {
        let t = &targets[sent as usize % targets.len()];
        let p = phase.load(Ordering::Relaxed);
        let request = format!("short{sent}");
        let answer: anyhow::Result<Answer> = match t.proto {
            Protocol::Udp => {
                k8s::udp_request_connected(t.dst, &request, UDP_WAIT, 1).map(|(a, _)| a)
            }
            _ => k8s::tcp_request(t.dst, &request, IO_TIMEOUT),
        };
        match answer {
            Ok(a) if a.from == t.dst && t.expect.as_ref().is_none_or(|e| *e == a.label) => {
                tally.ok(p);
            }
            Ok(a) => tally.fail(
                p,
                &format!(
                    "{request} {:?} -> {}: answered by {} from {}, expected {:?}",
                    t.proto, t.dst, a.label, a.from, t.expect
                ),
            ),
            Err(e) => tally.fail(p, &format!("{request} {:?} -> {}: {e:#}", t.proto, t.dst)),
        }
        sent += 1;
        std::thread::sleep(SHORT_GAP);
    }
    sent
}

/// The traffic of the restart test, running in background threads until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    long: Arc<Tally>,
    short: Arc<Tally>,
    long_thread: Option<JoinHandle<(Vec<LongConn>, u32)>>,
    short_thread: Option<JoinHandle<anyhow::Result<u32>>>,
}

impl Load {
    fn start(mut conns: Vec<LongConn>, client: &Pod, targets: Vec<ShortTarget>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let long = Arc::new(Tally::default());
        let short = Arc::new(Tally::default());
        let long_thread = {
            let (stop, phase, tally) = (Arc::clone(&stop), Arc::clone(&phase), Arc::clone(&long));
            std::thread::spawn(move || {
                let rounds = run_long(&mut conns, &stop, &phase, &tally);
                (conns, rounds)
            })
        };
        let short_thread = {
            let (stop, phase, tally) = (Arc::clone(&stop), Arc::clone(&phase), Arc::clone(&short));
            let ns = client.ns.clone();
            std::thread::spawn(move || ns.run(|| Ok(run_short(&targets, &stop, &phase, &tally))))
        };
        Self {
            stop,
            phase,
            long,
            short,
            long_thread: Some(long_thread),
            short_thread: Some(short_thread),
        }
    }

    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Stops both threads (each finishes its current request, bounded by the timeouts) and
    /// returns the connections, the rounds and the short requests sent.
    fn finish(mut self) -> (Vec<LongConn>, u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        let (conns, rounds) = self
            .long_thread
            .take()
            .map(|t| {
                t.join()
                    .expect("the long-lived connections' thread panicked")
            })
            .unwrap_or_default();
        let sent = self
            .short_thread
            .take()
            .map(|t| t.join().expect("the short requests' thread panicked"))
            .transpose()
            .unwrap_or_else(|e| panic!("short requests: {e:#}"))
            .unwrap_or_default();
        (conns, rounds, sent)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A panicking test still stops its traffic threads (and so its sockets).
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.long_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.short_thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restart under load
// ---------------------------------------------------------------------------------------------

/// What the kernel holds on node1 at one moment.
struct Snapshot {
    ct: BTreeMap<(addr::Addr, u16, addr::Addr, u16), u32>,
    revnat: BTreeMap<(u64, addr::Addr, u16), SocketAddr>,
    affinity: BTreeMap<(addr::Addr, u32, u8), u32>,
    links: BTreeMap<PathBuf, PinnedLinkView>,
}

impl Snapshot {
    fn take(node: &Node) -> Self {
        Self {
            ct: ct_forward(&node.bpffs).unwrap_or_else(|e| panic!("{e:#}")),
            revnat: sock_revnat(&node.bpffs).unwrap_or_else(|e| panic!("{e:#}")),
            affinity: affinity(&node.bpffs).unwrap_or_else(|e| panic!("{e:#}")),
            links: pinned_links(node),
        }
    }

    /// What the kernel holds that keeps `flows` (`client:port`, `VIP:port`) on their backends
    /// and shows them the service: per packet, the backend id of each flow's conntrack entry;
    /// at the socket (the connections themselves need no state), the reverse entries of the
    /// sockets that reached the flows' services, one at least per flow.
    fn flow_state(&self, flows: &[(SocketAddr, SocketAddr)]) -> anyhow::Result<Vec<String>> {
        if !k8s::pods_at_socket() {
            return Ok(self
                .backends_of(flows)?
                .iter()
                .map(u32::to_string)
                .collect());
        }
        let services: BTreeSet<SocketAddr> = flows.iter().map(|(_, dst)| *dst).collect();
        let entries: Vec<String> = self
            .revnat
            .iter()
            .filter(|(_, service)| services.contains(service))
            .map(|(key, service)| format!("{key:?} -> {service}"))
            .collect();
        ensure!(
            entries.len() >= flows.len(),
            "{} SOCK_REVNAT_V1 entries for {services:?}, want at least one per flow ({})",
            entries.len(),
            flows.len()
        );
        Ok(entries)
    }

    /// The backend id conntrack holds for each of `flows` (`client:port`, `VIP:port`).
    fn backends_of(&self, flows: &[(SocketAddr, SocketAddr)]) -> anyhow::Result<Vec<u32>> {
        flows
            .iter()
            .map(|(local, dst)| {
                let (src, _) = map_addr(local.ip());
                let (vip, _) = map_addr(dst.ip());
                self.ct
                    .get(&(src, local.port(), vip, dst.port()))
                    .copied()
                    .with_context(|| format!("no conntrack entry for {local} -> {dst}"))
            })
            .collect()
    }

    fn program_ids(&self) -> BTreeSet<u32> {
        self.links.values().map(|l| l.program_id).collect()
    }
}

/// Checks node1 after a restart against the snapshot taken before the stop: same pins; TC
/// links the same links with new programs, cgroup links new links with new programs; no old
/// program linked anywhere; the client's hooks carry exactly the new programs; the same
/// conntrack and affinity entries. Returns how long the old programs took to go.
fn check_taken_over(
    c: &Cluster,
    before: &Snapshot,
    flows: &[(SocketAddr, SocketAddr)],
    what: &str,
) -> Duration {
    let node1 = c.node(0);
    let after = Snapshot::take(node1);
    assert_eq!(
        after.links.keys().collect::<Vec<_>>(),
        before.links.keys().collect::<Vec<_>>(),
        "{what}: the pins changed"
    );
    for (pin, old) in &before.links {
        let new = &after.links[pin];
        assert_ne!(
            new.program_id,
            old.program_id,
            "{what}: {} still runs the old program",
            pin.display()
        );
        if pin.starts_with("tc") {
            assert_eq!(
                new.link_id,
                old.link_id,
                "{what}: {} is a new link, not the old one with the new program",
                pin.display()
            );
        } else {
            assert_ne!(
                new.link_id,
                old.link_id,
                "{what}: {} kept its old link",
                pin.display()
            );
        }
    }
    let released = wait_unlinked(&before.program_ids(), what);
    let client_if = &c.pod("client").host_ifname;
    let (ingress, egress) = tcx_both(node1, client_if);
    let want = |hook: &str| {
        let pin = PathBuf::from(format!("tc/{}/{hook}", ifindex(node1, client_if)));
        vec![after.links[&pin].program_id]
    };
    assert_eq!(ingress, want("ingress"), "{what}: ingress of {client_if}");
    assert_eq!(egress, want("egress"), "{what}: egress of {client_if}");
    let (old_state, new_state) = (
        before
            .flow_state(flows)
            .unwrap_or_else(|e| panic!("{what}, before: {e:#}")),
        after
            .flow_state(flows)
            .unwrap_or_else(|e| panic!("{what}, after: {e:#}")),
    );
    if k8s::pods_at_socket() {
        // Short connections add entries meanwhile; none of the earlier ones may be lost.
        let kept: BTreeSet<&String> = new_state.iter().collect();
        let lost: Vec<&String> = old_state.iter().filter(|e| !kept.contains(e)).collect();
        assert!(
            lost.is_empty(),
            "{what}: connect-time reverse entries lost: {lost:?}"
        );
    } else {
        assert_eq!(
            new_state, old_state,
            "{what}: conntrack sends long-lived flows elsewhere"
        );
    }
    for (key, backend) in &before.affinity {
        assert_eq!(
            after.affinity.get(key),
            Some(backend),
            "{what}: affinity entry {key:?} lost or changed"
        );
    }
    released
}

#[test]
fn long_lived_connections_survive_agent_restarts_sigkill_and_sigterm() {
    let mut c = Cluster::new(&[(0, "client"), (0, "backend-a"), (1, "backend-b")]);
    c.serve("backend-a");
    c.serve("backend-b");
    c.write_services(&["backend-a", "backend-b"]);
    c.start_agent(0);
    c.start_agent(1);
    c.step("svc-agent running on node1 and node2");
    let client = c.pod("client").clone();
    let (conns, targets) = open_traffic(&c, &client);
    let flows: Vec<(SocketAddr, SocketAddr)> = conns.iter().map(|l| (l.local, l.dst)).collect();
    let load = Load::start(conns, &client, targets);
    std::thread::sleep(STEADY);
    let downtimes = [
        restart_under_load(&mut c, &load, &flows, false, 1),
        restart_under_load(&mut c, &load, &flows, true, 3),
    ];
    check_load(load, downtimes);
    check_cleanup(&mut c);
    c.finish();
}

/// Opens the long-lived connections (they must reach both backends) and learns the client's
/// affinity backends; returns the connections and the targets of the short requests.
fn open_traffic(c: &Cluster, client: &Pod) -> (Vec<LongConn>, Vec<ShortTarget>) {
    let web4 = SocketAddr::new(vip4(WEB), SERVICE_PORT);
    let web6 = SocketAddr::new(vip6(WEB), SERVICE_PORT);
    let mut conns = open_long(client, web4, LONG_V4);
    conns.extend(open_long(client, web6, LONG_V6));
    let spread = spread(&conns);
    assert_eq!(
        spread.len(),
        2,
        "the long-lived connections should reach both backends: {spread:?}"
    );
    c.step(&format!(
        "{} long-lived connections open, by backend: {spread:?}",
        conns.len()
    ));
    let mut targets = vec![
        ShortTarget::any(web4, Protocol::Tcp),
        ShortTarget::any(web6, Protocol::Tcp),
        ShortTarget::any(web4, Protocol::Udp),
        ShortTarget::any(web6, Protocol::Udp),
    ];
    // The client's affinity backend, per family: every later request must reach it.
    for vip in [vip4(STICKY), vip6(STICKY)] {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let labels: BTreeSet<String> = client
            .ns
            .run(|| {
                (0..5)
                    .map(|i| Ok(k8s::tcp_request(dst, &format!("stick{i}"), IO_TIMEOUT)?.label))
                    .collect()
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(labels.len(), 1, "ClientIP affinity to {dst}: {labels:?}");
        targets.push(ShortTarget {
            dst,
            proto: Protocol::Tcp,
            expect: labels.into_iter().next(),
        });
    }
    c.step(&format!(
        "affinity: {}",
        targets[4..]
            .iter()
            .map(|t| format!("{} -> {}", t.dst, t.expect.as_deref().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    (conns, targets)
}

/// Stops node1's agent (SIGTERM when `graceful`, else SIGKILL) under `load`, checks that the
/// datapath stayed, starts it again after [`DOWNTIME`] and checks the take-over. Returns the
/// time from the stop to the new agent's "running".
fn restart_under_load(
    c: &mut Cluster,
    load: &Load,
    flows: &[(SocketAddr, SocketAddr)],
    graceful: bool,
    down_phase: usize,
) -> Duration {
    let kind = if graceful { "SIGTERM" } else { "SIGKILL" };
    let node1 = c.node(0).clone();
    let client_if = c.pod("client").host_ifname.clone();
    let before = Snapshot::take(&node1);
    let hooks_before = tcx_both(&node1, &client_if);
    let agent = c.take_agent(0);
    let t_stop = Instant::now();
    let status = if graceful {
        let (status, log) = agent.stop_with_log().expect("stopping svc-agent");
        assert!(
            status.success(),
            "SIGTERM must stop the agent cleanly: {status}\n{log}"
        );
        assert!(
            log.contains("the programs stay attached"),
            "the stopping agent did not say the datapath stays:\n{log}"
        );
        status
    } else {
        let status = agent.kill().expect("killing svc-agent");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the agent must die of SIGKILL: {status}"
        );
        status
    };
    load.set_phase(down_phase);
    if !graceful {
        // As an agent of a build without the record of TC clients leaves the map: not filled.
        // The programs go on looking replies up in conntrack; the next agent fills it.
        set_tc_clients_ready(&node1.bpffs, 0).unwrap_or_else(|e| panic!("{e:#}"));
    }
    // Nothing of the datapath went with the agent.
    assert_eq!(
        tcx_both(&node1, &client_if),
        hooks_before,
        "{kind}: the client's hooks changed"
    );
    assert_eq!(
        pinned_links(&node1).len(),
        before.links.len(),
        "{kind}: pins went with the agent"
    );
    c.step(&format!(
        "node1's agent stopped ({kind}, {status}); {} links still pinned, the client's hooks \
         still carry programs {hooks_before:?}",
        before.links.len()
    ));
    std::thread::sleep(DOWNTIME.saturating_sub(t_stop.elapsed()));
    let agent = c.start_agent(0);
    let downtime = t_stop.elapsed();
    load.set_phase(down_phase + 1);
    let sync = assert_first_sync_wrote_nothing(agent);
    let log = agent.log();
    assert_quiet(&log, "node1");
    for pod in ["client", "backend-a"] {
        let iface = &c.pod(pod).host_ifname;
        assert!(
            log.lines()
                .any(|l| l.contains("took over the pinned TC links")
                    && l.contains(&format!("iface={iface} "))),
            "the restarted agent did not take over {iface}'s links:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("attached connect-time translation") && l.contains("replaced=8")),
        "the restarted agent did not replace the 8 connect-time links:\n{log}"
    );
    check_tc_clients(&node1, &log, &client_if, !graceful);
    c.step(&format!(
        "{kind}: agent running again {:.0} ms after the stop; its first sync: {}",
        downtime.as_secs_f64() * 1e3,
        sync.split_once("INFO ").map_or(sync.as_str(), |(_, s)| s)
    ));
    let released = check_taken_over(c, &before, flows, kind);
    // What operators see: every pin with its link and the program it runs now.
    let listing = c
        .agent(0)
        .inspect("links")
        .expect("svc-agent inspect links");
    let listed: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("tc/") || l.starts_with("cgroup/"))
        .collect();
    assert!(
        listed.len() == before.links.len() && listed.iter().all(|l| l.contains(" svc_")),
        "inspect links:\n{listing}"
    );
    c.step(&format!(
        "{kind}: {} pins kept, TC links updated in place (same link ids, new programs), \
         connect-time links replaced, old programs unlinked within {:.0} ms; conntrack entries \
         of all {} long-lived flows and {} affinity entries unchanged",
        before.links.len(),
        released.as_secs_f64() * 1e3,
        flows.len(),
        before.affinity.len()
    ));
    std::thread::sleep(STEADY);
    downtime
}

/// Stops the load, asks once more on every long-lived connection, prints the figures and
/// asserts: every connection kept (same backend), no request failed, traffic flowed while
/// the agent was down.
fn check_load(load: Load, downtimes: [Duration; 2]) {
    let (long_tally, short_tally) = (Arc::clone(&load.long), Arc::clone(&load.short));
    let (mut conns, rounds, sent) = load.finish();
    let mut kept = 0;
    for (i, l) in conns.iter_mut().enumerate().filter(|(_, l)| !l.dead) {
        let a = l
            .session
            .ask(&format!("final{i}"))
            .unwrap_or_else(|e| panic!("final request on {} -> {}: {e:#}", l.local, l.dst));
        assert_eq!(
            (a.label.as_str(), a.from),
            (l.backend.as_str(), l.dst),
            "final request on {}",
            l.local
        );
        kept += 1;
    }
    println!(
        "RESULT connections kept: {kept}/{} on the same backend over {rounds} rounds; \
         long-lived requests ok {} failed {}; new short requests ok {} failed {} (of {sent}); \
         agent down {:.0} ms (SIGKILL) and {:.0} ms (SIGTERM)",
        conns.len(),
        long_tally.total_ok(),
        long_tally.total_failed(),
        short_tally.total_ok(),
        short_tally.total_failed(),
        downtimes[0].as_secs_f64() * 1e3,
        downtimes[1].as_secs_f64() * 1e3,
    );
    println!("RESULT long-lived by phase: {}", long_tally.per_phase());
    println!("RESULT short by phase: {}", short_tally.per_phase());
    let errors: Vec<String> = long_tally
        .errors()
        .into_iter()
        .chain(short_tally.errors())
        .collect();
    assert!(
        long_tally.total_failed() == 0 && short_tally.total_failed() == 0,
        "requests failed:\n{}",
        errors.join("\n")
    );
    assert_eq!(kept, conns.len(), "long-lived connections were lost");
    let min_long = 2 * conns.len() as u64;
    for phase in [1, 3] {
        assert!(
            short_tally.ok_in(phase) >= 20 && long_tally.ok_in(phase) >= min_long,
            "too little traffic while the agent was {}: long {} short {}",
            PHASES[phase],
            long_tally.ok_in(phase),
            short_tally.ok_in(phase)
        );
    }
}

/// `svc-agent cleanup` on node1 (after stopping its agent) removes everything: pins, links
/// (programs off the hooks), maps.
fn check_cleanup(c: &mut Cluster) {
    let node1 = c.node(0).clone();
    let client_if = c.pod("client").host_ifname.clone();
    let before = Snapshot::take(&node1);
    let agent = c.take_agent(0);
    let (status, log) = agent.stop_with_log().expect("stopping svc-agent");
    assert!(status.success(), "{status}\n{log}");
    assert_quiet(&log, "node1");
    k8s::agent_command(&c.bed.agent_bin, &node1.bpffs, &["cleanup"]).expect("svc-agent cleanup");
    let root = node1.bpffs.join(svc_common::PIN_ROOT);
    assert!(!root.exists(), "cleanup left {}", root.display());
    let released = wait_unlinked(&before.program_ids(), "cleanup");
    // A link whose last pin went is released by the kernel asynchronously (deferred work), like
    // those `wait_unlinked` waits for: the hooks get empty shortly after, or never (a leak).
    wait_for(
        &format!("cleanup leaves no program on {client_if}"),
        RELEASE_TIMEOUT,
        || {
            let hooks = tcx_both(&node1, &client_if);
            (hooks == (vec![], vec![]), hooks)
        },
    );
    c.step(&format!(
        "svc-agent cleanup: pins gone, {} links released within {:.0} ms, {client_if}'s hooks empty",
        before.links.len(),
        released.as_secs_f64() * 1e3
    ));
}

/// Long-lived connections per backend.
fn spread(conns: &[LongConn]) -> BTreeMap<String, usize> {
    conns.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(l.backend.clone()).or_default() += 1;
        m
    })
}

// ---------------------------------------------------------------------------------------------
// Interfaces that changed while no agent ran
// ---------------------------------------------------------------------------------------------

/// The ifindexes that have pins below `links/tc` on `node`.
fn tc_pinned_ifindexes(node: &Node) -> BTreeSet<u32> {
    pinned_links(node)
        .keys()
        .filter_map(|p| {
            let mut parts = p.iter();
            (parts.next()? == "tc").then_some(())?;
            parts.next()?.to_str()?.parse().ok()
        })
        .collect()
}

/// Whether `iface` carries exactly the programs its pins on `node` hold, once each.
fn carries_its_pins(node: &Node, iface: &str) -> (bool, String) {
    let links = pinned_links(node);
    let index = ifindex(node, iface);
    let pinned = |hook: &str| {
        links
            .get(&PathBuf::from(format!("tc/{index}/{hook}")))
            .map(|l| vec![l.program_id])
    };
    let (ingress, egress) = tcx_both(node, iface);
    let ok =
        pinned("ingress").as_ref() == Some(&ingress) && pinned("egress").as_ref() == Some(&egress);
    (
        ok,
        format!(
            "{iface} (ifindex {index}): hooks {ingress:?} / {egress:?}, pins {:?} / {:?}",
            pinned("ingress"),
            pinned("egress")
        ),
    )
}

/// The follower goes on with pinned links after a restart: a new interface gets them once, a
/// deleted one loses its pins.
fn follower_goes_on(c: &mut Cluster) {
    let node1 = c.node(0).clone();
    let added = c.bed.topo.add_pod(0, "later").expect("adding a pod");
    let added_idx = ifindex(&node1, &added.host_ifname);
    let state = wait_for(
        "the new interface carries its pinned programs",
        RELEASE_TIMEOUT,
        || carries_its_pins(&node1, &added.host_ifname),
    );
    node1
        .ns
        .ip(["link", "del", &added.host_ifname])
        .expect("deleting a pod's veth");
    wait_for(
        "the deleted interface's pins removed",
        RELEASE_TIMEOUT,
        || {
            let pinned = tc_pinned_ifindexes(&node1);
            (!pinned.contains(&added_idx), pinned)
        },
    );
    c.step(&format!("follower: {state}; deleted, its pins removed"));
}

#[test]
fn pins_of_interfaces_changed_while_no_agent_ran_are_cleaned_up() {
    let mut c = Cluster::new(&[(0, "gone"), (0, "moved"), (0, "stays"), (1, "server")]);
    c.serve("server");
    c.write_services(&["server"]);
    c.start_agent(0);
    let node1 = c.node(0).clone();
    let ifname = |c: &Cluster, pod: &str| c.pod(pod).host_ifname.clone();
    let (gone_if, moved_if, stays_if) =
        (ifname(&c, "gone"), ifname(&c, "moved"), ifname(&c, "stays"));
    let (gone_idx, moved_idx, stays_idx) = (
        ifindex(&node1, &gone_if),
        ifindex(&node1, &moved_if),
        ifindex(&node1, &stays_if),
    );
    // The node's uplink is node-facing (`--node-ifaces eth0`) and keeps its pins throughout.
    let uplink_idx = ifindex(&node1, netns::ETH0);
    assert_eq!(
        tc_pinned_ifindexes(&node1),
        [uplink_idx, gone_idx, moved_idx, stays_idx]
            .into_iter()
            .collect(),
        "every pod interface and the uplink get pinned links"
    );
    let moved_progs = tcx_both(&node1, &moved_if);
    let status = c.take_agent(0).kill().expect("killing svc-agent");
    c.step(&format!("node1's agent killed ({status})"));

    // While no agent runs: one interface is deleted, one renamed out of the patterns, one pod
    // added.
    let renamed = "svcmoved0";
    node1
        .ns
        .ip(["link", "del", &gone_if])
        .expect("deleting a pod's veth");
    node1
        .ns
        .ip_batch(&[
            format!("link set {moved_if} down"),
            format!("link set {moved_if} name {renamed}"),
        ])
        .expect("renaming a pod's veth");
    let late = c.bed.topo.add_pod(0, "late").expect("adding a pod");
    let late_idx = ifindex(&node1, &late.host_ifname);
    assert_eq!(
        tcx_both(&node1, renamed),
        moved_progs,
        "the renamed interface keeps its programs while no agent runs (its pins hold them)"
    );
    c.step(&format!(
        "while no agent ran: {gone_if} (ifindex {gone_idx}) deleted, {moved_if} (ifindex \
         {moved_idx}) renamed to {renamed}, {} (ifindex {late_idx}) added",
        late.host_ifname
    ));

    let log = c.start_agent(0).log();
    for idx in [gone_idx, moved_idx] {
        assert!(
            log.lines().any(|l| l.contains("removed stale TC link pins")
                && l.split_whitespace()
                    .any(|w| w.ends_with(&format!("/links/tc/{idx}")))),
            "no stale-pin removal for ifindex {idx}:\n{log}"
        );
    }
    assert_eq!(
        tc_pinned_ifindexes(&node1),
        [uplink_idx, stays_idx, late_idx].into_iter().collect(),
        "pins after the restart"
    );
    let hooks = wait_for(
        "the renamed interface's programs detached",
        RELEASE_TIMEOUT,
        || {
            let h = tcx_both(&node1, renamed);
            (h == (vec![], vec![]), h)
        },
    );
    for iface in [&stays_if, &late.host_ifname] {
        let (ok, state) = carries_its_pins(&node1, iface);
        assert!(ok, "{state}");
    }
    c.step(&format!(
        "restarted: stale pins of ifindex {gone_idx} and {moved_idx} removed, {renamed}'s hooks \
         {hooks:?}, {stays_if} taken over, {} attached",
        late.host_ifname
    ));

    follower_goes_on(&mut c);

    // Pods behind taken-over and new links reach the Service.
    let dst = SocketAddr::new(vip4(WEB), SERVICE_PORT);
    for pod in ["stays", "late"] {
        let answer = c
            .pod(pod)
            .ns
            .run(|| k8s::tcp_request(dst, &format!("from-{pod}"), IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("{pod} -> {dst}: {e:#}"));
        assert_eq!((answer.label.as_str(), answer.from), ("server", dst));
    }
    c.step("pods on taken-over and new links reach the Service");
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Another layout's pins
// ---------------------------------------------------------------------------------------------

#[test]
fn another_layouts_pins_are_replaced_after_this_layout_is_attached() {
    let mut c = Cluster::new(&[(0, "client"), (0, "backend-a"), (1, "backend-b")]);
    c.serve("backend-a");
    c.serve("backend-b");
    c.write_services(&["backend-a", "backend-b"]);
    c.start_agent(0);
    let node1 = c.node(0).clone();
    let client = c.pod("client").clone();
    let web4 = SocketAddr::new(vip4(WEB), SERVICE_PORT);
    let mut conns = open_long(&client, web4, 10);
    let old = pinned_links(&node1);
    let old_programs: BTreeSet<u32> = old.values().map(|l| l.program_id).collect();
    let status = c.take_agent(0).kill().expect("killing svc-agent");

    // What an agent of layout 0 would have left: its maps and links below svc/v0.
    let root = node1.bpffs.join(svc_common::PIN_ROOT);
    std::fs::rename(root.join("v1"), root.join("v0")).expect("renaming svc/v1 to svc/v0");
    c.step(&format!(
        "agent killed ({status}); its {} links and maps moved to {}",
        old.len(),
        root.join("v0").display()
    ));

    let log = c.start_agent(0).log();
    for needle in [
        "found the pins of another layout",
        "relation=older",
        &format!(
            "replaced the older layout: its links unpinned (its programs detach), its maps removed dir={} version=0 links={}",
            root.join("v0").display(),
            old.len()
        ),
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
    let sync = c.agent(0).first_sync_line().unwrap_or_default();
    assert!(
        !sync.contains("services_written=0 "),
        "a new layout starts from empty maps and must program them: {sync}"
    );
    assert!(!root.join("v0").exists(), "svc/v0 is still there");
    let new = pinned_links(&node1);
    assert_eq!(
        new.keys().collect::<Vec<_>>(),
        old.keys().collect::<Vec<_>>(),
        "layout 1 pins the same links"
    );
    let released = wait_unlinked(&old_programs, "the old layout's programs");
    let (ok, state) = carries_its_pins(&node1, &client.host_ifname);
    assert!(ok, "{state}");
    c.step(&format!(
        "restarted: layout v0 replaced, its programs unlinked within {:.0} ms; {state}",
        released.as_secs_f64() * 1e3
    ));

    // New connections go through the new layout.
    let web6 = SocketAddr::new(vip6(WEB), SERVICE_PORT);
    let answered = client
        .ns
        .run(|| {
            let mut n = 0;
            for i in 0..20 {
                for dst in [web4, web6] {
                    let a = k8s::tcp_request(dst, &format!("new{i}"), IO_TIMEOUT)?;
                    ensure!(a.from == dst, "answer from {}", a.from);
                    let (a, _) = k8s::udp_request_connected(dst, &format!("new{i}"), UDP_WAIT, 1)?;
                    ensure!(a.from == dst, "answer from {}", a.from);
                    n += 2;
                }
            }
            Ok(n)
        })
        .unwrap_or_else(|e| panic!("new requests after the layout change: {e:#}"));
    // Connection tracking of layout 0 is gone: an established connection survives only if
    // the new layout happens to choose the same backend for its next packet.
    let mut survived = 0;
    for l in &mut conns {
        let same = l
            .session
            .ask("after")
            .is_ok_and(|a| a.label == l.backend && a.from == l.dst);
        survived += usize::from(same);
    }
    c.step(&format!(
        "{answered} new requests answered; {survived} of {} connections opened before the \
         layout change still answer (conntrack is not carried over)",
        conns.len()
    ));
    drop(conns);
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// The Kubernetes API source
// ---------------------------------------------------------------------------------------------

/// Long-lived connections asked once each: `(backend, ok)` per connection.
fn ask_all(conns: &mut [LongConn], tag: &str) -> Vec<(String, bool)> {
    conns
        .iter_mut()
        .enumerate()
        .map(|(i, l)| {
            let ok = l
                .session
                .ask(&format!("{tag}{i}"))
                .is_ok_and(|a| a.label == l.backend && a.from == l.dst);
            (l.backend.clone(), ok)
        })
        .collect()
}

/// The Nodes, and `web` (IPv4, TCP) with `backends` as ready endpoints, as one YAML stream.
fn api_objects(topo: &Topology, backends: &[Pod]) -> String {
    let web = Service::cluster_ip("web", &[vip4(WEB)]).port(
        "http",
        Protocol::Tcp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    let slice = EndpointSlice::new("web", false)
        .ports_of(&web, &[])
        .ready_pods(topo, backends.iter());
    let mut docs: Vec<String> = topo.nodes().iter().map(k8s::node_yaml).collect();
    docs.extend([web.to_yaml(), slice.to_yaml()]);
    k8s::documents(&docs)
}

#[test]
fn an_agent_following_the_api_server_takes_over_too() {
    must_be_root();
    let started = Instant::now();
    let step = |what: &str| println!("[{:>6.2}s] {what}", started.elapsed().as_secs_f64());
    let agent_bin = k8s::agent_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let mut topo = Topology::new().expect("building the topology");
    for (node, name) in [(0, "client"), (0, "backend-a"), (1, "backend-b")] {
        topo.add_pod(node, name)
            .unwrap_or_else(|e| panic!("adding pod {name}: {e:#}"));
    }
    let pod = |name: &str| {
        topo.pods()
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no pod {name}"))
    };
    let (client, backends) = (pod("client"), [pod("backend-a"), pod("backend-b")]);
    let node1 = topo.node(0).clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let api = rt
        .block_on(ApiServer::start_in(
            &node1.ns,
            SocketAddr::new(node1.underlay_v4.into(), 0),
            ApiOptions::default(),
        ))
        .expect("starting the API server in node1's namespace");
    let kubeconfig = topo.run_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .expect("writing the kubeconfig");
    api.apply_yaml(&api_objects(&topo, &backends))
        .expect("storing the objects");
    let servers = Backends::new();
    for b in &backends {
        servers
            .serve(&b.ns, &b.name, SocketAddr::new(b.ipv4.into(), BACKEND_PORT))
            .unwrap_or_else(|e| panic!("serving on {}: {e:#}", b.name));
    }
    let agent = Agent::start_kube(&agent_bin, &node1, &kubeconfig)
        .unwrap_or_else(|e| panic!("starting svc-agent: {e:#}"));
    step(&format!(
        "topology {} up, API server on {}, svc-agent following it on node1",
        topo.prefix(),
        api.url()
    ));

    let web4 = SocketAddr::new(vip4(WEB), SERVICE_PORT);
    let mut conns = open_long(&client, web4, 20);
    let flows: Vec<(SocketAddr, SocketAddr)> = conns.iter().map(|l| (l.local, l.dst)).collect();
    let before = Snapshot::take(&node1)
        .flow_state(&flows)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let status = agent.kill().expect("killing svc-agent");
    let down = ask_all(&mut conns, "down");
    let agent = Agent::start_kube(&agent_bin, &node1, &kubeconfig)
        .unwrap_or_else(|e| panic!("restarting svc-agent: {e:#}"));
    let sync = assert_first_sync_wrote_nothing(&agent);
    let log = agent.log();
    assert_quiet(&log, "node1");
    assert!(
        log.contains("took over the pinned TC links"),
        "the restarted agent did not take over the TC links:\n{log}"
    );
    let after = Snapshot::take(&node1)
        .flow_state(&flows)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let up = ask_all(&mut conns, "up");
    let failed = down.iter().chain(&up).filter(|(_, ok)| !ok).count();
    println!(
        "RESULT API server source: {} connections, agent killed ({status}) and restarted; \
         requests while down ok {} / after ok {}, failed {failed}; spread {:?}",
        conns.len(),
        down.iter().filter(|(_, ok)| *ok).count(),
        up.iter().filter(|(_, ok)| *ok).count(),
        spread(&conns)
    );
    assert_eq!(failed, 0, "requests on long-lived connections failed");
    assert_eq!(
        after, before,
        "the flows' state (conntrack, or connect-time reverse entries) changed"
    );
    step(&format!(
        "restarted agent's first sync: {}",
        sync.split_once("INFO ").map_or(sync.as_str(), |(_, s)| s)
    ));
    drop(conns);
    let (status, log) = agent.stop_with_log().expect("stopping svc-agent");
    assert!(status.success(), "{status}\n{log}");
    drop(servers);
    drop(api);
    drop(rt);
    let prefix = topo.prefix().to_owned();
    drop(topo);
    netns::assert_run_gone(&prefix);
    step(&format!("agent stopped, nothing of {prefix} remains"));
}
