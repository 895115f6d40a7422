//! Graceful termination end to end, through the real agent: a rolling replacement of every
//! endpoint of a dual-stack `ClusterIP` Service (TCP and UDP) under a steady load, and the
//! terminating fallback (a Service whose endpoints are all terminating still serves).
//!
//! Two emulated nodes, one `svc-agent run --from-dir` per node following the same directory of
//! Kubernetes YAML, a client pod on each node, backend pods on both. A rolling replacement does
//! what a Deployment rollout does to the Service's `EndpointSlice`s, per old pod: the new pod
//! becomes a ready endpoint; the old one becomes terminating (`ready: false, serving: true,
//! terminating: true`) while its established connections drain; then it leaves the slices and
//! only after that its server stops. What must hold (kube-proxy's semantics,
//! `shared/notes/service-semantics.md`):
//! - no request of the load fails (TCP and UDP, IPv4 and IPv6, from both nodes);
//! - no request started after an endpoint became terminating reaches it;
//! - long-lived TCP connections and UDP flows on a terminating endpoint keep working until it
//!   is removed;
//! - a UDP flow on a removed endpoint moves at once: its next datagram is answered by a live
//!   endpoint on the first try (the agent cleared the flow; it logs how many it cleared).
//!
//! Every test builds its own topology and removes it at the end (and asserts that nothing of
//! the run remains); every socket operation has a timeout and every loop is bounded in count
//! and time. Needs root and a built agent (`cargo build -p svc-agent`): fails, never skips,
//! without them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{
        self, Agent, Backends, Endpoint, EndpointSlice, Protocol, Service, TcpSession, UdpSession,
        frontend_key,
    },
    netns::Pod,
    testbed::{TestBed, family, vip4, vip6},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP requests are sent at most this many times (same flow) ...
const UDP_ATTEMPTS: u32 = 3;
/// ... waiting this long for each answer.
const UDP_WAIT: Duration = Duration::from_millis(700);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The backends' port.
const BACKEND_PORT: u16 = 8080;
/// The Service's port (TCP and UDP).
const SERVICE_PORT: u16 = 80;
/// How long each old endpoint stays terminating (with the load running) before it is removed.
const TERMINATING_FOR: Duration = Duration::from_millis(1500);
/// How often the long-lived sessions on a terminating endpoint are asked while it drains.
const SESSION_PING: Duration = Duration::from_millis(300);
/// Pause between two rounds of a load thread (one TCP and one UDP request per round).
const LOAD_PAUSE: Duration = Duration::from_millis(15);
/// Bounds on each load thread: rounds, and time.
const LOAD_MAX_ROUNDS: u16 = 5000;
const LOAD_MAX_TIME: Duration = Duration::from_mins(2);
/// Long-lived sessions are opened until each old endpoint has this many of each protocol (at
/// most [`SESSION_TRIES`] tries per protocol).
const SESSIONS_PER_BACKEND: usize = 2;
const SESSION_TRIES: usize = 80;

/// An endpoint's state in the slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Condition {
    Ready,
    Terminating,
}

/// One test's cluster. Fields drop in order: servers, then agents, then the topology (whose
/// guard removes namespaces, mounts, cgroups and the run directory with the manifests).
struct Cluster {
    /// One server set per backend pod, so each can be stopped on its own.
    servers: BTreeMap<String, Backends>,
    bed: TestBed,
}

impl std::ops::Deref for Cluster {
    type Target = TestBed;
    fn deref(&self) -> &TestBed {
        &self.bed
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut TestBed {
        &mut self.bed
    }
}

impl Cluster {
    /// A topology with `pods` ((node index, name)) and a manifest directory holding the Nodes.
    fn new(pods: &[(usize, &str)]) -> Self {
        Self {
            servers: BTreeMap::new(),
            bed: TestBed::new(pods),
        }
    }

    /// Serves TCP and UDP on [`BACKEND_PORT`] of both of `pod`'s addresses, answering as the
    /// pod's name.
    fn serve(&mut self, pod: &str) {
        let backends = Backends::new();
        let p = self.pod(pod);
        for ip in [IpAddr::from(p.ipv4), p.ipv6.into()] {
            backends
                .serve(&p.ns, pod, SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("serving {pod} on {ip}: {e:#}"));
        }
        self.servers.insert(pod.to_owned(), backends);
    }

    /// Stops `pod`'s servers (closing their sockets and connections).
    fn stop_serving(&mut self, pod: &str) {
        drop(self.servers.remove(pod));
    }

    /// The Service `svc` with one slice per family listing `endpoints`, as YAML.
    fn service_yaml(&self, svc: &Service, endpoints: &[(String, Condition)]) -> String {
        let mut docs = vec![svc.to_yaml()];
        for ip in &svc.cluster_ips {
            let ipv6 = ip.is_ipv6();
            let mut slice = EndpointSlice::new(&svc.name, ipv6).ports_of(svc, &[]);
            for (pod, condition) in endpoints {
                let pod = self.pod(pod);
                slice = slice.endpoint(match condition {
                    Condition::Ready => Endpoint::ready(&self.bed.topo, pod, ipv6),
                    Condition::Terminating => Endpoint::terminating(&self.bed.topo, pod, ipv6),
                });
            }
            docs.push(slice.to_yaml());
        }
        k8s::documents(&docs)
    }

    /// Writes `file`, waits until every agent logged a sync after it, then until every node
    /// programs `frontends` as `slots` (see [`Cluster::wait_programmed`]).
    fn edit(
        &mut self,
        what: &str,
        file: &str,
        yaml: &str,
        frontends: &[SocketAddr],
        slots: &[&str],
    ) {
        let before: Vec<usize> = self.agents.iter().map(Agent::syncs).collect();
        let t = Instant::now();
        self.bed
            .manifests
            .write(file, yaml)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        for (agent, before) in self.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        self.wait_programmed(what, frontends, slots);
        self.step(&format!(
            "{what}: synced and programmed on both nodes after {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// Waits (bounded) until every node programs each of `frontends`, TCP and UDP, with
    /// exactly the slots `slots` (pod names).
    fn wait_programmed(&self, what: &str, frontends: &[SocketAddr], slots: &[&str]) {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let mismatch = self.agents.iter().zip(1..).find_map(|(agent, node)| {
                let p = agent
                    .services()
                    .unwrap_or_else(|e| panic!("inspect services on node{node}: {e:#}"));
                frontends.iter().find_map(|fe| {
                    [Protocol::Tcp, Protocol::Udp]
                        .into_iter()
                        .find_map(|proto| {
                            let key = frontend_key(*fe, proto);
                            let want: BTreeSet<String> = slots
                                .iter()
                                .map(|pod| {
                                    SocketAddr::new(self.pod_ip(pod, fe.ip()), BACKEND_PORT)
                                        .to_string()
                                })
                                .collect();
                            (p.backends(&key).as_ref() != Some(&want))
                                .then(|| format!("node{node} {key}: want {want:?}\n{}", p.text))
                        })
                })
            });
            let Some(mismatch) = mismatch else { return };
            assert!(
                Instant::now() < deadline,
                "{what}: not programmed within {SYNC_TIMEOUT:?}: {mismatch}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every "cleared N UDP flows" count `node`'s agent logged so far, in order.
    fn cleared_udp_flows(&self, node: usize) -> Vec<u64> {
        self.agents[node]
            .log()
            .lines()
            .filter_map(|l| {
                let rest = l.split_once("cleared ")?.1;
                let (n, rest) = rest.split_once(' ')?;
                rest.starts_with("UDP flows of ").then(|| n.parse().ok())?
            })
            .collect()
    }

    /// Stops servers and agents (which must exit cleanly, without a warning), drops the
    /// topology and asserts that nothing of the run remains.
    fn finish(self) {
        let Self { servers, bed, .. } = self;
        drop(servers);
        bed.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// One request of the load: a new TCP connection or a new UDP socket (a new flow each).
#[derive(Debug)]
struct Request {
    client: &'static str,
    proto: Protocol,
    dst: SocketAddr,
    started: Instant,
    /// The backend that answered, or why it failed.
    outcome: Result<String, String>,
    /// UDP re-sends it needed.
    resent: u32,
}

/// Sets the flag when dropped: load threads stop also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// UDP requests of round `n` of the load are sent from port `LOAD_UDP_PORTS + n`: below the
/// ephemeral range (32768 and up), so no other socket of the test has it, and each round's
/// port is its own. With ports the system hands out, a request may get a port an earlier
/// request used; its datagram then continues that flow (conntrack, and this datapath, cannot
/// tell a new socket from an old one on the same addresses and ports), backend included, even
/// when that backend is terminating by now.
const LOAD_UDP_PORTS: u16 = 20_000;

/// Runs rounds of one new TCP and one new UDP request, alternating between `vips`, from
/// `pod` until `stop` is set (at most [`LOAD_MAX_ROUNDS`] rounds and [`LOAD_MAX_TIME`]).
/// Every answer must come from the VIP and port asked, and name the client's own address.
fn load(
    pod: &Pod,
    client: &'static str,
    vips: &[IpAddr],
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Request>> {
    let (v4, v6): (IpAddr, IpAddr) = (pod.ipv4.into(), pod.ipv6.into());
    pod.ns.run(|| {
        let deadline = Instant::now() + LOAD_MAX_TIME;
        let mut done = Vec::new();
        for round in 0..LOAD_MAX_ROUNDS {
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            let vip = vips[usize::from(round) % vips.len()];
            let dst = SocketAddr::new(vip, SERVICE_PORT);
            let me = if vip.is_ipv6() { v6 } else { v4 };
            for proto in [Protocol::Tcp, Protocol::Udp] {
                let request = format!("{client}-{}-{round}", proto.as_k8s());
                let started = Instant::now();
                let (answer, resent) = match proto {
                    Protocol::Udp => match k8s::udp_request_from(
                        LOAD_UDP_PORTS + round,
                        dst,
                        &request,
                        UDP_WAIT,
                        UDP_ATTEMPTS,
                    ) {
                        Ok((a, attempt)) => (Ok(a), attempt - 1),
                        Err(e) => (Err(e), UDP_ATTEMPTS),
                    },
                    _ => (k8s::tcp_request(dst, &request, IO_TIMEOUT), 0),
                };
                let outcome = answer
                    .and_then(|a| {
                        anyhow::ensure!(a.from == dst, "answered from {}, not {dst}", a.from);
                        anyhow::ensure!(
                            a.client_seen == me,
                            "{} saw the client as {}",
                            a.label,
                            a.client_seen
                        );
                        Ok(a.label)
                    })
                    .map_err(|e| format!("{request} to {dst}: {e:#}"));
                done.push(Request {
                    client,
                    proto,
                    dst,
                    started,
                    outcome,
                    resent,
                });
            }
            std::thread::sleep(LOAD_PAUSE);
        }
        Ok(done)
    })
}

// ---------------------------------------------------------------------------------------------
// Long-lived sessions
// ---------------------------------------------------------------------------------------------

/// A connection or flow opened before the rollout, asked again at every step.
struct Long {
    /// `client-1` or `client-2`.
    client: &'static str,
    /// The node the client runs on (whose agent tracks the flow).
    node: usize,
    dst: SocketAddr,
    session: Session,
    /// The backend it is on (a UDP flow moves when its backend is removed).
    backend: String,
    asked: u32,
}

enum Session {
    Tcp(TcpSession),
    Udp(UdpSession),
}

impl Long {
    fn proto(&self) -> Protocol {
        match self.session {
            Session::Tcp(_) => Protocol::Tcp,
            Session::Udp(_) => Protocol::Udp,
        }
    }

    /// One more request; returns the backend that answered and the UDP re-sends needed.
    fn ask(&mut self, tag: &str) -> anyhow::Result<(String, u32)> {
        self.asked += 1;
        let request = format!("{}-long-{tag}-{}", self.client, self.asked);
        let (answer, resent) = match &mut self.session {
            Session::Tcp(s) => (s.ask(&request)?, 0),
            Session::Udp(s) => {
                let (a, attempt) = s.ask(&request, UDP_ATTEMPTS)?;
                (a, attempt - 1)
            }
        };
        anyhow::ensure!(
            answer.from == self.dst,
            "{request}: answered from {}, not {}",
            answer.from,
            self.dst
        );
        Ok((answer.label, resent))
    }

    fn describe(&self) -> String {
        format!(
            "{} {} session of {} to {} on {}",
            family(self.dst.ip()),
            self.proto().as_k8s(),
            self.client,
            self.dst,
            self.backend
        )
    }
}

/// Opens sessions of `proto` from the clients (alternating clients and `vips`) until each of
/// `backends` has [`SESSIONS_PER_BACKEND`] of them, closing the extra ones (at most
/// [`SESSION_TRIES`] tries).
fn open_sessions(
    c: &Cluster,
    clients: &[(&'static str, usize)],
    vips: &[IpAddr],
    proto: Protocol,
    backends: &[&str],
) -> Vec<Long> {
    let mut kept: Vec<Long> = Vec::new();
    for i in 0..SESSION_TRIES {
        let have = |b: &str| kept.iter().filter(|l| l.backend == b).count();
        if backends.iter().all(|b| have(b) >= SESSIONS_PER_BACKEND) {
            break;
        }
        let (client, node) = clients[i % clients.len()];
        let dst = SocketAddr::new(vips[(i / clients.len()) % vips.len()], SERVICE_PORT);
        let session = c
            .pod(client)
            .ns
            .run(|| {
                Ok(match proto {
                    Protocol::Udp => Session::Udp(UdpSession::open(dst, UDP_WAIT)?),
                    _ => Session::Tcp(TcpSession::connect(dst, IO_TIMEOUT)?),
                })
            })
            .unwrap_or_else(|e| panic!("opening a session from {client} to {dst}: {e:#}"));
        let mut long = Long {
            client,
            node,
            dst,
            session,
            backend: String::new(),
            asked: 0,
        };
        let (backend, _) = long
            .ask("hello")
            .unwrap_or_else(|e| panic!("first request of a session: {e:#}{}", c.diag()));
        if have(&backend) < SESSIONS_PER_BACKEND {
            long.backend = backend;
            kept.push(long);
        }
    }
    for b in backends {
        assert!(
            kept.iter().filter(|l| l.backend == *b).count() >= SESSIONS_PER_BACKEND,
            "{SESSION_TRIES} {proto} sessions did not give {b} {SESSIONS_PER_BACKEND} of them"
        );
    }
    kept
}

// ---------------------------------------------------------------------------------------------

/// What happened to one old endpoint during the rollout.
#[derive(Debug)]
struct Replaced {
    old: String,
    /// When both nodes had it programmed as terminating, and as removed.
    terminating_at: Instant,
    removed_at: Instant,
    /// Requests its long-lived sessions answered while it was terminating.
    drained: u32,
    /// UDP flows on it that moved to a live endpoint with their next datagram.
    udp_moved: usize,
    /// "cleared N UDP flows" per node for its removal.
    cleared: [u64; 2],
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, told in order: setup, rollout, then the checks on what was recorded"
)]
fn rolling_replacement_under_load_drops_nothing_and_drains_terminating_endpoints() {
    let olds = ["old-0", "old-1", "old-2"];
    let news = ["new-0", "new-1", "new-2"];
    let mut c = Cluster::new(&[
        (0, "client-1"),
        (1, "client-2"),
        (0, "old-0"),
        (1, "old-1"),
        (0, "old-2"),
        (1, "new-0"),
        (0, "new-1"),
        (1, "new-2"),
    ]);
    let (v4, v6) = (vip4(30), vip6(30));
    let vips = [v4, v6];
    let frontends = vips.map(|v| SocketAddr::new(v, SERVICE_PORT));
    let svc = Service::cluster_ip("roll", &[v4, v6])
        .port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let mut endpoints: Vec<(String, Condition)> = olds
        .iter()
        .map(|p| ((*p).to_owned(), Condition::Ready))
        .collect();
    c.bed
        .manifests
        .write("roll.yaml", &c.service_yaml(&svc, &endpoints))
        .expect("writing the Service");
    for pod in olds {
        c.serve(pod);
    }
    c.start_agents();

    let clients = [("client-1", 0), ("client-2", 1)];
    let mut long = open_sessions(&c, &clients, &vips, Protocol::Tcp, &olds);
    long.extend(open_sessions(&c, &clients, &vips, Protocol::Udp, &olds));
    c.step(&format!(
        "{} long-lived sessions open: {}",
        long.len(),
        olds.iter()
            .map(|b| {
                let on = |p| {
                    long.iter()
                        .filter(|l| l.backend == *b && l.proto() == p)
                        .count()
                };
                format!("{b} {} TCP + {} UDP", on(Protocol::Tcp), on(Protocol::Udp))
            })
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let stop = AtomicBool::new(false);
    let (loads, replaced) = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let loaders: Vec<_> = clients
            .iter()
            .map(|(client, _)| {
                let (pod, stop) = (c.pod(client).clone(), &stop);
                scope.spawn(move || load(&pod, client, &vips, stop))
            })
            .collect();
        // Let the load run on the old endpoints first.
        std::thread::sleep(Duration::from_millis(500));

        let mut replaced = Vec::new();
        for (old, new) in olds.iter().zip(news) {
            // 1. The new pod is up and ready.
            c.serve(new);
            endpoints.push((new.to_owned(), Condition::Ready));
            let ready: Vec<String> = ready_pods(&endpoints);
            c.edit(
                &format!("{new} ready"),
                "roll.yaml",
                &c.service_yaml(&svc, &endpoints),
                &frontends,
                &ready.iter().map(String::as_str).collect::<Vec<_>>(),
            );

            // 2. The old pod terminates: out of the slots, its flows drain.
            let entry = endpoints
                .iter_mut()
                .find(|(p, _)| p == old)
                .expect("old listed");
            entry.1 = Condition::Terminating;
            let ready: Vec<String> = ready_pods(&endpoints);
            c.edit(
                &format!("{old} terminating"),
                "roll.yaml",
                &c.service_yaml(&svc, &endpoints),
                &frontends,
                &ready.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let terminating_at = Instant::now();
            let mut drained = 0;
            let until = terminating_at + TERMINATING_FOR;
            while Instant::now() < until {
                for l in long.iter_mut().filter(|l| l.backend == *old) {
                    let (backend, resent) = l
                        .ask("draining")
                        .unwrap_or_else(|e| panic!("{}: {e:#}{}", l.describe(), c.diag()));
                    assert_eq!(
                        (backend.as_str(), resent),
                        (*old, 0),
                        "{} left its terminating backend (or needed re-sends){}",
                        l.describe(),
                        c.diag()
                    );
                    drained += 1;
                }
                std::thread::sleep(SESSION_PING);
            }
            c.step(&format!(
                "{old} terminating for {:.1} s: its long-lived sessions answered {drained} \
                 requests, all by {old}",
                TERMINATING_FOR.as_secs_f64()
            ));

            // 3. The old pod leaves the slices (its server still runs).
            let cleared_before = [c.cleared_udp_flows(0).len(), c.cleared_udp_flows(1).len()];
            endpoints.retain(|(p, _)| p != old);
            let ready: Vec<String> = ready_pods(&endpoints);
            c.edit(
                &format!("{old} removed"),
                "roll.yaml",
                &c.service_yaml(&svc, &endpoints),
                &frontends,
                &ready.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            let removed_at = Instant::now();
            let mut udp_moved = 0;
            let mut udp_on_old = [0u64; 2];
            for l in long.iter_mut().filter(|l| l.backend == *old) {
                if l.proto() != Protocol::Udp {
                    continue;
                }
                udp_on_old[l.node] += 1;
                let (backend, resent) = l
                    .ask("moved")
                    .unwrap_or_else(|e| panic!("{}: {e:#}{}", l.describe(), c.diag()));
                assert!(
                    backend != *old && ready.contains(&backend) && resent == 0,
                    "{}: the first datagram after the removal was answered by {backend} after \
                     {resent} re-sends; want a live endpoint at once{}",
                    l.describe(),
                    c.diag()
                );
                l.backend = backend;
                udp_moved += 1;
            }
            // A TCP connection to a removed pod ends with the pod: close them.
            long.retain(|l| l.backend != *old);
            let mut cleared = [0u64; 2];
            for node in 0..2 {
                let lines = c.cleared_udp_flows(node);
                assert_eq!(
                    lines.len(),
                    cleared_before[node] + 1,
                    "node{}: want one \"cleared N UDP flows\" line for {old}'s removal; log:\n{}",
                    node + 1,
                    c.agents[node].log()
                );
                cleared[node] = lines[lines.len() - 1];
                assert!(
                    cleared[node] >= udp_on_old[node],
                    "node{}: cleared {} UDP flows, but {} long-lived ones were on {old}",
                    node + 1,
                    cleared[node],
                    udp_on_old[node]
                );
            }
            c.step(&format!(
                "{old} removed: {udp_moved} UDP flows on it answered at once by live endpoints; \
                 agents cleared {} (node1) and {} (node2) UDP flows",
                cleared[0], cleared[1]
            ));

            // 4. Only now does the old pod's server stop.
            c.stop_serving(old);
            replaced.push(Replaced {
                old: (*old).to_owned(),
                terminating_at,
                removed_at,
                drained,
                udp_moved,
                cleared,
            });
        }
        // The remaining sessions (all moved UDP flows now) still work.
        for l in &mut long {
            let (backend, _) = l
                .ask("after")
                .unwrap_or_else(|e| panic!("{}: {e:#}{}", l.describe(), c.diag()));
            assert_eq!(backend, l.backend, "{} changed backend", l.describe());
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let loads: Vec<Request> = loaders
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(Ok(requests)) => requests,
                Ok(Err(e)) => panic!("load: {e:#}"),
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect();
        (loads, replaced)
    });

    // What the load saw.
    let failed: Vec<&Request> = loads.iter().filter(|r| r.outcome.is_err()).collect();
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_kind: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
    for r in &loads {
        if let Ok(label) = &r.outcome {
            *per_backend.entry(label.as_str()).or_default() += 1;
        }
        *per_kind
            .entry((r.client, family(r.dst.ip()), r.proto.as_k8s()))
            .or_default() += 1;
    }
    let resent: u32 = loads.iter().map(|r| r.resent).sum();
    c.step(&format!(
        "load: {} requests ({} TCP, {} UDP), {} failed, {resent} UDP re-sends; by backend: {}",
        loads.len(),
        loads.iter().filter(|r| r.proto == Protocol::Tcp).count(),
        loads.iter().filter(|r| r.proto == Protocol::Udp).count(),
        failed.len(),
        per_backend
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failed.len(),
        loads.len(),
        failed.first().map(|r| &r.outcome)
    );
    // Veths do not lose datagrams; a re-send or two would point at a slow first lookup.
    assert!(resent <= 2, "{resent} UDP re-sends were needed");
    for ((client, fam, proto), n) in &per_kind {
        assert!(
            *n >= 20,
            "only {n} {fam} {proto} requests from {client}: too little load"
        );
    }
    for name in olds.iter().chain(&news) {
        assert!(
            per_backend.get(name).copied().unwrap_or_default() > 0,
            "{name} answered no request of the load: {per_backend:?}"
        );
    }
    for r in &replaced {
        let during: Vec<&Request> = loads
            .iter()
            .filter(|q| q.started >= r.terminating_at)
            .collect();
        let on_old: Vec<&&Request> = during
            .iter()
            .filter(|q| q.outcome.as_deref() == Ok(r.old.as_str()))
            .collect();
        let while_terminating = during.iter().filter(|q| q.started < r.removed_at).count();
        c.step(&format!(
            "{}: {while_terminating} new requests while it was terminating, {} of all {} \
             started since reached it; {} drained requests on its sessions, {} UDP flows moved \
             at once, agents cleared {} + {} UDP flows",
            r.old,
            on_old.len(),
            during.len(),
            r.drained,
            r.udp_moved,
            r.cleared[0],
            r.cleared[1]
        ));
        assert!(
            on_old.is_empty(),
            "{} new requests reached {} after it became terminating: {:?}",
            on_old.len(),
            r.old,
            on_old.first()
        );
        assert!(
            while_terminating >= 20,
            "only {while_terminating} requests while {} was terminating: too little load",
            r.old
        );
        assert!(r.drained > 0 && r.udp_moved > 0, "{r:?}");
    }
    c.finish();
}

/// The pods of `endpoints` that are ready, or (none being ready) the terminating ones: the
/// backends new connections may choose.
fn ready_pods(endpoints: &[(String, Condition)]) -> Vec<String> {
    let of = |want| -> Vec<String> {
        endpoints
            .iter()
            .filter(|(_, c)| *c == want)
            .map(|(p, _)| p.clone())
            .collect()
    };
    let ready = of(Condition::Ready);
    if ready.is_empty() {
        of(Condition::Terminating)
    } else {
        ready
    }
}

/// New requests to a Service whose endpoints are all terminating (and serving) still get
/// answered, by all of them; once a ready endpoint appears, new requests go to it alone while
/// a connection opened during the fallback keeps its terminating endpoint.
#[test]
fn a_service_with_only_terminating_endpoints_still_serves_them() {
    let pods = ["fb-0", "fb-1", "fb-2"];
    let mut c = Cluster::new(&[(0, "client-1"), (0, "fb-0"), (1, "fb-1"), (1, "fb-2")]);
    let (v4, v6) = (vip4(31), vip6(31));
    let frontends = [v4, v6].map(|v| SocketAddr::new(v, SERVICE_PORT));
    let svc = Service::cluster_ip("fallback", &[v4, v6])
        .port("tcp", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let mut endpoints = vec![
        ("fb-0".to_owned(), Condition::Terminating),
        ("fb-1".to_owned(), Condition::Terminating),
    ];
    c.bed
        .manifests
        .write("fallback.yaml", &c.service_yaml(&svc, &endpoints))
        .expect("writing the Service");
    for pod in pods {
        c.serve(pod);
    }
    c.start_agents();
    c.wait_programmed("all endpoints terminating", &frontends, &["fb-0", "fb-1"]);
    c.step("all endpoints terminating: both nodes program fb-0 and fb-1 in the slots");

    let seen = ask_each(&c, "client-1", &frontends, "fallback", LOAD_UDP_PORTS);
    let both: BTreeSet<String> = ["fb-0", "fb-1"].map(str::to_owned).into();
    for (frontend, labels) in &seen {
        assert_eq!(labels, &both, "{frontend:?}{}", c.diag());
    }
    c.step(&format!(
        "only terminating endpoints: {} x {FALLBACK_REQUESTS} new requests answered, each \
         frontend by fb-0 and fb-1",
        seen.len()
    ));

    // A connection opened now, on a terminating endpoint.
    let (mut kept, kept_on) = c
        .pod("client-1")
        .ns
        .run(|| {
            let mut s = TcpSession::connect(frontends[0], IO_TIMEOUT)?;
            let label = s.ask("kept-0")?.label;
            Ok((s, label))
        })
        .unwrap_or_else(|e| panic!("{e:#}"));

    endpoints.push(("fb-2".to_owned(), Condition::Ready));
    c.edit(
        "fb-2 ready",
        "fallback.yaml",
        &c.service_yaml(&svc, &endpoints),
        &frontends,
        &["fb-2"],
    );
    let seen = ask_each(&c, "client-1", &frontends, "ready", LOAD_UDP_PORTS + 1000);
    for (frontend, labels) in &seen {
        assert_eq!(
            labels,
            &BTreeSet::from(["fb-2".to_owned()]),
            "{frontend:?}: a new request reached a terminating endpoint{}",
            c.diag()
        );
    }
    for i in 1..=3 {
        let label = kept
            .ask(&format!("kept-{i}"))
            .unwrap_or_else(|e| panic!("the connection on {kept_on}: {e:#}"))
            .label;
        assert_eq!(
            label, kept_on,
            "the connection left its terminating endpoint"
        );
    }
    c.step(&format!(
        "fb-2 ready: {} x {FALLBACK_REQUESTS} new requests all answered by fb-2; the \
         connection opened during the fallback stays on {kept_on}",
        seen.len()
    ));
    drop(kept);
    c.finish();
}

/// New requests per (frontend, protocol) in the fallback test: P(one of two backends never
/// answers) = 2 x 2^-20 per set.
const FALLBACK_REQUESTS: usize = 20;

/// [`FALLBACK_REQUESTS`] new requests from `client` per frontend and protocol; the backends
/// that answered each (frontend, protocol). Every answer must come from the frontend asked.
/// UDP requests use the source ports from `first_port` on, one each (see [`LOAD_UDP_PORTS`]
/// for why).
fn ask_each(
    c: &Cluster,
    client: &str,
    frontends: &[SocketAddr],
    tag: &str,
    first_port: u16,
) -> BTreeMap<(SocketAddr, &'static str), BTreeSet<String>> {
    c.pod(client)
        .ns
        .run(|| {
            let mut seen: BTreeMap<(SocketAddr, &'static str), BTreeSet<String>> = BTreeMap::new();
            let mut port = first_port;
            for dst in frontends {
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    for i in 0..FALLBACK_REQUESTS {
                        let request = format!("{tag}-{}-{i}", proto.as_k8s());
                        let answer = match proto {
                            Protocol::Udp => {
                                port += 1;
                                k8s::udp_request_from(port, *dst, &request, UDP_WAIT, UDP_ATTEMPTS)?
                                    .0
                            }
                            _ => k8s::tcp_request(*dst, &request, IO_TIMEOUT)?,
                        };
                        anyhow::ensure!(answer.from == *dst, "{request}: from {}", answer.from);
                        seen.entry((*dst, proto.as_k8s()))
                            .or_default()
                            .insert(answer.label);
                    }
                }
            }
            Ok(seen)
        })
        .unwrap_or_else(|e| panic!("{e:#}{}", c.diag()))
}
