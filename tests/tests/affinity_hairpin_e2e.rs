//! `ClientIP` session affinity and hairpin end to end, through the real agent: two emulated
//! nodes, one `svc-agent run --from-dir` per node (each in its node's namespace, cgroup and
//! bpffs, all following the same directory of Kubernetes YAML generated from the topology's
//! pod addresses), TCP and UDP servers in backend pods that answer with their pod's name and
//! the client address they saw, client pods (and a host-network client in node1's cgroup)
//! talking to the Service VIPs.
//!
//! - **Affinity** (`sessionAffinity: ClientIP`): every new connection (new source port) and
//!   every new UDP socket of one client reaches the same backend, per client, per family and
//!   protocol; a host-network process (connect-time translation) sticks too, also across
//!   processes (host processes are one client: the node). With a 1 s timeout the entry is
//!   refreshed by use (requests 0.5 s apart stick for longer than the timeout) and expires
//!   when idle (after 1.5 s without traffic the client is re-balanced). Switching affinity off
//!   by editing the Service spreads the same client again; switching it on makes it sticky.
//! - **Hairpin**: a pod that is the only endpoint of a Service reaches itself through the VIP
//!   (TCP and UDP, IPv4 and IPv6): its own server answers and sees the connection coming from
//!   the VIP (the source translation that makes the reply come back through the datapath),
//!   and the client sees the VIP and service port as its peer. With two more endpoints, every
//!   request succeeds, the hairpinned ones seen from the VIP, the others from the pod.
//! - **Affinity with `internalTrafficPolicy: Local`**: only local endpoints, one per client;
//!   a client whose affinity entry names an endpoint that is not local (still known to the
//!   node for established connections) is moved to a local one.
//!
//! Every test builds its own topology and removes it at the end (and asserts that nothing of
//! the run remains); every socket operation has a timeout and every loop is bounded. Needs
//! root, `python3` (the host-network client) and a built agent (`cargo build -p svc-agent`):
//! fails, never skips, without them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use svc_agent::loader::{self, pin_dir};
use svc_common::{
    addr::{self, FAMILY_V4, FAMILY_V6},
    affinity::{AffinityKey, AffinityValue, CLIENT_NETNS},
    service::{Backend, backend_flags},
};
use svc_tests::{
    k8s::{
        self, Agent, Answer, Backends, EndpointSlice, Programmed, Protocol, Service, TcpSession,
        frontend_key,
    },
    netns::Netns,
    testbed::{TestBed, family, vip4, vip6},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP requests are sent at most this many times (same flow) ...
const UDP_ATTEMPTS: u32 = 3;
/// Source ports of UDP requests, one per request (below the ephemeral range).
const UDP_PORTS: std::ops::Range<u16> = 20_000..32_000;
/// ... waiting this long for each answer.
const UDP_WAIT: Duration = Duration::from_millis(700);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The backends' port.
const BACKEND_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// New flows per check of stickiness (or of spread).
const REQUESTS: usize = 30;
/// `timeoutSeconds` of the expiry test: the smallest the API allows, so waiting is short.
const SHORT_TIMEOUT_S: u32 = 1;
/// Requests this far apart keep a [`SHORT_TIMEOUT_S`] entry alive (refreshed on use) ...
const REFRESH_GAP: Duration = Duration::from_millis(500);
/// ... this many times (2.5 s in all: longer than the timeout).
const REFRESH_REQUESTS: usize = 5;
/// Idle time after which a [`SHORT_TIMEOUT_S`] entry has expired.
const IDLE: Duration = Duration::from_millis(1500);
/// Most rounds of (idle, requests) waiting for a re-balanced client.
const EXPIRY_ROUNDS: usize = 10;
/// `kubectl get -o yaml`'s `timeoutSeconds` when a Service sets `ClientIP` without one.
const DEFAULT_TIMEOUT_S: u32 = 10_800;
/// How long one host-network client run may take (every socket has a 1-2 s timeout).
const CLIENT_RUN: Duration = Duration::from_secs(30);

fn proto_name(p: Protocol) -> &'static str {
    p.as_k8s()
}

const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A Service's `sessionAffinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Affinity {
    /// `sessionAffinity: None`.
    Off,
    /// `sessionAffinity: ClientIP` without `sessionAffinityConfig` (the agent's default
    /// applies, as the API server's would).
    ClientIp,
    /// `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`.
    ClientIpFor(u32),
}

impl Affinity {
    /// What `inspect services` notes for a frontend of such a Service.
    fn note(self) -> Option<String> {
        match self {
            Self::Off => None,
            Self::ClientIp => Some(format!("affinity {DEFAULT_TIMEOUT_S}s")),
            Self::ClientIpFor(t) => Some(format!("affinity {t}s")),
        }
    }

    /// Whether `notes` (of one frontend in `inspect services`) match this affinity.
    fn matches(self, notes: &str) -> bool {
        match self.note() {
            Some(note) => notes.split(", ").any(|n| n == note),
            None => !notes.contains("affinity"),
        }
    }
}

/// `svc` as YAML with `affinity` (the builder prints `sessionAffinity: None`; the keys stay
/// sorted as `kubectl get -o yaml` prints them).
fn service_yaml(svc: &Service, affinity: Affinity) -> String {
    let yaml = svc.to_yaml();
    let none = "  sessionAffinity: None\n";
    assert!(yaml.contains(none), "unexpected Service YAML:\n{yaml}");
    let spec = match affinity {
        Affinity::Off => return yaml,
        Affinity::ClientIp => "  sessionAffinity: ClientIP\n".to_owned(),
        Affinity::ClientIpFor(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
             timeoutSeconds: {t}\n"
        ),
    };
    yaml.replace(none, &spec)
}

/// One test's cluster. Fields drop in order: servers, then agents, then the topology (whose
/// guard removes namespaces, mounts, cgroups and the run directory with the manifests).
struct Cluster {
    backends: Backends,
    /// The next UDP source port: every UDP request gets its own (see [`Cluster::answers`]).
    udp_port: AtomicU16,
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
    /// A topology with `pods` ((node index, name), created in this order, so each node's pods
    /// get `.10`, `.11`, ... in that order) and a manifest directory holding the two Nodes.
    fn new(pods: &[(usize, &str)]) -> Self {
        Self {
            backends: Backends::new(),
            udp_port: AtomicU16::new(UDP_PORTS.start),
            bed: TestBed::new(pods),
        }
    }

    /// `pods`' addresses of `vip`'s family with [`BACKEND_PORT`], as `inspect services`
    /// prints backends.
    fn backend_set(&self, pods: &[&str], vip: IpAddr) -> BTreeSet<String> {
        pods.iter()
            .map(|n| SocketAddr::new(self.pod_ip(n, vip), BACKEND_PORT).to_string())
            .collect()
    }

    /// `svc` (with `affinity`) and one `EndpointSlice` per family of its VIPs listing `pods`
    /// as ready endpoints, as YAML documents.
    fn service_docs(&self, svc: &Service, affinity: Affinity, pods: &[&str]) -> Vec<String> {
        let mut docs = vec![service_yaml(svc, affinity)];
        for ip in &svc.cluster_ips {
            let pods = pods.iter().map(|n| self.pod(n));
            docs.push(
                EndpointSlice::new(&svc.name, ip.is_ipv6())
                    .ports_of(svc, &[])
                    .ready_pods(&self.bed.topo, pods)
                    .to_yaml(),
            );
        }
        docs
    }

    /// Writes `file` (the documents joined into one YAML stream).
    fn write(&self, file: &str, docs: &[String]) {
        self.bed
            .manifests
            .write(file, &k8s::documents(docs))
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    /// Serves TCP and UDP on [`BACKEND_PORT`] of both of `pod`'s addresses, answering with
    /// the pod's name.
    fn serve(&self, pod: &str) {
        let p = self.pod(pod);
        for ip in [IpAddr::from(p.ipv4), p.ipv6.into()] {
            self.backends
                .serve(&p.ns, pod, SocketAddr::new(ip, BACKEND_PORT))
                .unwrap_or_else(|e| panic!("serving {pod} on {ip}:{BACKEND_PORT}: {e:#}"));
        }
    }

    /// What both agents programmed and counted, and node1's log, for failure messages.
    fn diag(&self) -> String {
        let mut out = self.bed.diag();
        if let Some(agent) = self.agents.first() {
            let _ = write!(out, "--- node1: agent log ---\n{}", agent.log());
        }
        out
    }

    /// Asserts that node `node` programs every port of `svc` with exactly `pods` and notes
    /// `affinity`.
    fn expect_programmed(&self, node: usize, svc: &Service, pods: &[&str], affinity: Affinity) {
        let p = self.programmed(node);
        if let Err(e) = programmed_as(&p, &self.frontends(svc, pods), affinity) {
            panic!("node{}: {e}:\n{}", node + 1, p.text);
        }
    }

    /// Every frontend of `svc` (VIP x port) with the backends `pods` give it.
    fn frontends(&self, svc: &Service, pods: &[&str]) -> Vec<(String, BTreeSet<String>)> {
        let mut out = Vec::new();
        for &vip in &svc.cluster_ips {
            for p in &svc.ports {
                out.push((
                    frontend_key(SocketAddr::new(vip, p.port), p.protocol),
                    self.backend_set(pods, vip),
                ));
            }
        }
        out
    }

    /// Writes `file`, waits until every agent logged a sync after it, then (bounded) until
    /// node `node` programs `svc` with `pods` and `affinity`.
    fn edit(
        &mut self,
        what: &str,
        (file, docs): (&str, &[String]),
        node: usize,
        (svc, pods, affinity): (&Service, &[&str], Affinity),
    ) {
        let before: Vec<usize> = self.agents.iter().map(Agent::syncs).collect();
        let want = self.frontends(svc, pods);
        let t = Instant::now();
        self.write(file, docs);
        for (agent, before) in self.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        let synced = t.elapsed();
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let p = self.programmed(node);
            let Err(e) = programmed_as(&p, &want, affinity) else {
                break;
            };
            assert!(
                Instant::now() < deadline,
                "{what}: node{} did not reach the expected state within {SYNC_TIMEOUT:?} \
                 ({e}):\n{}{}",
                node + 1,
                p.text,
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.step(&format!(
            "{what}: both agents synced after {:.0} ms, node{} programmed after {:.0} ms",
            synced.as_secs_f64() * 1e3,
            node + 1,
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// Runs `f` in `pod`'s namespace; an error fails the test with the agents' state.
    fn in_pod<T: Send>(&self, pod: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> T {
        self.pod(pod)
            .ns
            .run(f)
            .unwrap_or_else(|e| panic!("{e:#}{}", self.diag()))
    }

    /// `n` requests from `pod` to `dst` over `proto`, each on a new connection / socket (a
    /// new flow, so a new backend choice unless affinity holds it). Checks that each is
    /// answered from `dst` (the reverse translation); returns the answers.
    ///
    /// Each UDP request is sent from a port of its own (below the ephemeral range): a port the
    /// system handed out again would continue an earlier flow of an earlier phase, with the
    /// backend it had (conntrack comes before affinity, as in kube-proxy).
    fn answers(
        &self,
        pod: &str,
        dst: SocketAddr,
        proto: Protocol,
        n: usize,
        tag: &str,
    ) -> Vec<Answer> {
        let tag = tag.to_owned();
        let ports = &self.udp_port;
        self.in_pod(pod, move || {
            let mut answers = Vec::with_capacity(n);
            for i in 0..n {
                let request = format!("{tag}-{i}");
                let answer = match proto {
                    Protocol::Udp => {
                        let port = ports.fetch_add(1, Ordering::Relaxed);
                        ensure!(UDP_PORTS.contains(&port), "out of UDP source ports");
                        k8s::udp_request_from(port, dst, &request, UDP_WAIT, UDP_ATTEMPTS)?.0
                    }
                    _ => k8s::tcp_request(dst, &request, IO_TIMEOUT)?,
                };
                ensure!(
                    answer.from == dst,
                    "{request}: the answer came from {}, not from the service {dst}",
                    answer.from
                );
                answers.push(answer);
            }
            Ok(answers)
        })
    }

    /// Like [`Cluster::answers`] to `vip`'s service port, also checking that every server saw
    /// `pod`'s own address (no source translation off the hairpin path); answers per backend.
    fn requests(
        &self,
        pod: &str,
        vip: IpAddr,
        proto: Protocol,
        n: usize,
        tag: &str,
    ) -> BTreeMap<String, usize> {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let own = self.pod_ip(pod, vip);
        let answers = self.answers(pod, dst, proto, n, tag);
        for a in &answers {
            assert_eq!(
                a.client_seen,
                own,
                "{pod} -> {dst} {}: {} saw the client as {}, not {own}{}",
                proto_name(proto),
                a.label,
                a.client_seen,
                self.diag()
            );
        }
        tally(&answers)
    }

    /// `n` requests from `pod` to `vip` over `proto` must all reach one backend; returns it.
    fn sticky(&self, pod: &str, vip: IpAddr, proto: Protocol, n: usize, tag: &str) -> String {
        let tally = self.requests(pod, vip, proto, n, tag);
        assert_eq!(
            tally.len(),
            1,
            "{pod} -> {vip} {}: {n} new flows reached {} backends ({}), want one (ClientIP \
             affinity){}",
            proto_name(proto),
            tally.len(),
            show(&tally),
            self.diag()
        );
        tally.into_keys().next().unwrap_or_default()
    }

    /// Stops servers and agents (which must exit cleanly and without warnings), drops the
    /// topology and asserts that nothing of the run remains.
    fn finish(self) {
        let Self { backends, bed, .. } = self;
        drop(backends);
        bed.finish();
    }
}

/// Whether `p` programs exactly `want` (frontend key -> backends) with `affinity`; else why not.
fn programmed_as(
    p: &Programmed,
    want: &[(String, BTreeSet<String>)],
    affinity: Affinity,
) -> Result<(), String> {
    for (key, backends) in want {
        let Some(fe) = p.frontends.get(key) else {
            return Err(format!("{key} not programmed"));
        };
        let got: BTreeSet<String> = fe.backends.iter().cloned().collect();
        if &got != backends {
            return Err(format!("{key} has backends {got:?}, want {backends:?}"));
        }
        if !affinity.matches(&fe.notes) {
            return Err(format!(
                "{key} notes {:?}, want affinity {:?}",
                fe.notes,
                affinity.note()
            ));
        }
    }
    Ok(())
}

fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for a in answers {
        *tally.entry(a.label.clone()).or_default() += 1;
    }
    tally
}

/// `tally` as `web-0 31, web-1 29`.
fn show(tally: &BTreeMap<String, usize>) -> String {
    tally
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or_default() - before.get(key).copied().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Pinned maps (read directly, to show why a client went where it went)
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

/// `AFFINITY_V1` as the node's agent pinned it.
fn affinity_entries(bpffs: &Path) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>> {
    let map: BpfHashMap<_, AffinityKey, AffinityValue> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, "AFFINITY_V1")?))?;
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .context("reading AFFINITY_V1")
}

/// `BACKENDS_V1` as the node's agent pinned it.
fn backend_entries(bpffs: &Path) -> anyhow::Result<BTreeMap<u32, Backend>> {
    let map: BpfHashMap<_, u32, Backend> =
        BpfHashMap::try_from(Map::HashMap(open_pinned(bpffs, "BACKENDS_V1")?))?;
    map.iter()
        .collect::<Result<BTreeMap<_, _>, _>>()
        .context("reading BACKENDS_V1")
}

/// How an affinity entry names a client: its address (the packet path) or its network
/// namespace's cookie (the connect-time path, `affinity::CLIENT_NETNS`).
fn client_key(ns: &Netns, client: IpAddr) -> (addr::Addr, u8) {
    if !k8s::pods_at_socket() {
        return map_addr(client);
    }
    let cookie = ns
        .run(loader::own_netns_cookie)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&cookie.to_ne_bytes());
    (key, CLIENT_NETNS)
}

/// The backends node `node`'s affinity entries send pod `client` to for frontends of `vip`'s
/// family: (address, port, local) per entry, in map order.
fn affinity_targets(
    c: &Cluster,
    node: usize,
    client: &str,
    vip: IpAddr,
) -> Vec<(IpAddr, u16, bool)> {
    let bpffs = c.agent(node).bpffs();
    let entries = affinity_entries(bpffs).unwrap_or_else(|e| panic!("{e:#}"));
    let backends = backend_entries(bpffs).unwrap_or_else(|e| panic!("{e:#}"));
    let (addr, fam) = client_key(&c.pod(client).ns, c.pod_ip(client, vip));
    let want_family = map_addr(vip).1;
    entries
        .iter()
        .filter(|(k, _)| k.client == addr && k.family == fam)
        .map(|(_, v)| {
            backends.get(&v.backend_id).unwrap_or_else(|| {
                panic!(
                    "affinity entry of {client} names backend {} that BACKENDS_V1 lacks{}",
                    v.backend_id,
                    c.diag()
                )
            })
        })
        // A namespace is a client of both families' frontends.
        .filter(|b| b.family == want_family)
        .map(|b| {
            let ip = if b.family == FAMILY_V4 {
                IpAddr::from([b.addr[0], b.addr[1], b.addr[2], b.addr[3]])
            } else {
                IpAddr::from(b.addr)
            };
            (ip, b.port.to_host(), b.flags & backend_flags::LOCAL != 0)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Affinity from pods
// ---------------------------------------------------------------------------------------------

#[test]
fn client_ip_affinity_keeps_each_client_pod_on_one_backend() {
    let mut c = Cluster::new(&[
        (0, "client"),
        (0, "client-b"),
        (0, "web-0"),
        (1, "web-1"),
        (1, "web-2"),
    ]);
    let svc = Service::cluster_ip("sticky", &[vip4(70), vip6(70)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1", "web-2"];
    let affinity = Affinity::ClientIpFor(DEFAULT_TIMEOUT_S);
    c.write("sticky.yaml", &c.service_docs(&svc, affinity, &web));
    for name in web {
        c.serve(name);
    }
    c.start_agents();
    for node in 0..2 {
        c.expect_programmed(node, &svc, &web, affinity);
    }
    c.step("node1 and node2 programmed 4 frontends with web-0/1/2 and affinity 10800s");

    let before = c.stats(0);
    let t = Instant::now();
    let clients = ["client", "client-b"];
    for client in clients {
        let line = sticky_everywhere(&c, client, &svc.cluster_ips, client);
        c.step(&format!(
            "{client}: {REQUESTS} new flows per frontend, each frontend's to one backend: {line}"
        ));
    }
    let flows = clients.len() * svc.cluster_ips.len() * PROTOCOLS.len() * REQUESTS;
    let after = c.stats(0);
    let (fwd, rev) = (k8s::forward_counter(), k8s::reverse_counter());
    c.step(&format!(
        "{flows} flows in {:.0} ms; node1 {fwd} +{} {rev} +{} dropped +{}",
        t.elapsed().as_secs_f64() * 1e3,
        delta(&after, &before, fwd),
        delta(&after, &before, rev),
        delta(&after, &before, "dropped")
    ));
    assert!(
        delta(&after, &before, fwd) >= flows as u64,
        "node1 {fwd} +{}, want >= {flows}{}",
        delta(&after, &before, fwd),
        c.diag()
    );
    assert_eq!(
        delta(&after, &before, "dropped"),
        0,
        "node1 dropped{}",
        c.diag()
    );
    // One entry per client pod and frontend (2 pods x 2 VIPs x 2 protocols).
    for client in clients {
        for &vip in &svc.cluster_ips {
            let targets = affinity_targets(&c, 0, client, vip);
            assert_eq!(
                targets.len(),
                2,
                "node1 AFFINITY_V1 entries of {client} ({}): {targets:?}{}",
                family(vip),
                c.diag()
            );
        }
    }
    c.step("node1 AFFINITY_V1 holds one entry per client pod, VIP and protocol");
    c.finish();
}

/// From `pod`, [`REQUESTS`] new flows per VIP of `vips` and protocol must each stick to one
/// backend; returns which, for the log.
fn sticky_everywhere(c: &Cluster, pod: &str, vips: &[IpAddr], tag: &str) -> String {
    let mut line = Vec::new();
    for &vip in vips {
        for proto in PROTOCOLS {
            let backend = c.sticky(pod, vip, proto, REQUESTS, tag);
            line.push(format!(
                "{} {} -> {backend}",
                family(vip),
                proto_name(proto)
            ));
        }
    }
    line.join(", ")
}

/// Refreshed on use: one TCP request per VIP every 0.5 s for 2.5 s keeps the backend the
/// client is `stuck` to, although the entry is older than its 1 s timeout by the end.
fn check_refresh(c: &Cluster, stuck: &BTreeMap<IpAddr, String>) {
    for i in 0..REFRESH_REQUESTS {
        std::thread::sleep(REFRESH_GAP);
        for (&vip, want) in stuck {
            let backend = c.sticky("client", vip, Protocol::Tcp, 1, &format!("refresh{i}"));
            assert_eq!(
                &backend,
                want,
                "{vip}: request {i} ({REFRESH_GAP:?} after the previous one) left the backend \
                 the client was stuck to: the entry was not refreshed by use{}",
                c.diag()
            );
        }
    }
    c.step(&format!(
        "refreshed by use: {REFRESH_REQUESTS} requests {REFRESH_GAP:?} apart ({:?} in all, \
         timeout {SHORT_TIMEOUT_S}s) all stayed",
        REFRESH_GAP * u32::try_from(REFRESH_REQUESTS).unwrap_or(u32::MAX)
    ));
}

/// Expires when idle: after [`IDLE`] without traffic the next flow is a fresh uniform choice
/// among 3 (and sticks again: 3 flows right after each other agree). A VIP is done once its
/// client has been on 2 different backends (starting from `stuck`).
///
/// With a correct datapath a VIP stays on its first backend for 10 rounds with probability
/// (1/3)^10 = 1.7e-5; for either of the 2 VIPs 3.4e-5: a false failure about once in 30,000
/// runs. A datapath that never expires entries fails every time.
fn check_expiry(c: &Cluster, stuck: &BTreeMap<IpAddr, String>) {
    let mut seen: BTreeMap<IpAddr, BTreeSet<String>> = stuck
        .iter()
        .map(|(vip, b)| (*vip, BTreeSet::from([b.clone()])))
        .collect();
    let mut rounds = 0;
    let mut history: Vec<String> = Vec::new();
    while rounds < EXPIRY_ROUNDS && seen.values().any(|s| s.len() < 2) {
        rounds += 1;
        std::thread::sleep(IDLE);
        for (&vip, backends) in &mut seen {
            if backends.len() >= 2 {
                continue;
            }
            let backend = c.sticky("client", vip, Protocol::Tcp, 3, &format!("idle{rounds}"));
            history.push(format!("round {rounds} {} -> {backend}", family(vip)));
            backends.insert(backend);
        }
    }
    c.step(&format!(
        "after {IDLE:?} idle (> {SHORT_TIMEOUT_S}s): re-balanced within {rounds} round(s): {}",
        history.join(", ")
    ));
    for (vip, backends) in &seen {
        assert!(
            backends.len() >= 2,
            "{vip}: after {rounds} rounds of {IDLE:?} idle the client only ever reached \
             {backends:?}: affinity entries do not expire{}",
            c.diag()
        );
    }
}

#[test]
fn affinity_timeout_refresh_expiry_and_switching_affinity_off_and_on() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (1, "web-2")]);
    let svc = Service::cluster_ip("flip", &[vip4(71), vip6(71)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1", "web-2"];
    let short = Affinity::ClientIpFor(SHORT_TIMEOUT_S);
    c.write("flip.yaml", &c.service_docs(&svc, short, &web));
    for name in web {
        c.serve(name);
    }
    c.start_agents();
    c.expect_programmed(0, &svc, &web, short);
    let vips = svc.cluster_ips.clone();

    // Sticky with the short timeout (30 flows take a few ms).
    let stuck: BTreeMap<IpAddr, String> = vips
        .iter()
        .map(|&vip| {
            (
                vip,
                c.sticky("client", vip, Protocol::Tcp, REQUESTS, "short"),
            )
        })
        .collect();
    c.step(&format!(
        "timeoutSeconds {SHORT_TIMEOUT_S}: {REQUESTS} TCP flows per family stick: {stuck:?}"
    ));
    check_refresh(&c, &stuck);
    check_expiry(&c, &stuck);

    // Off: the same client spreads again. P(30 uniform flows on one of 3) = 3^-29 per check.
    c.edit(
        "sessionAffinity None",
        ("flip.yaml", &c.service_docs(&svc, Affinity::Off, &web)),
        0,
        (&svc, &web, Affinity::Off),
    );
    for &vip in &vips {
        for proto in PROTOCOLS {
            let tally = c.requests("client", vip, proto, REQUESTS, "off");
            c.step(&format!(
                "affinity off: {} {} -> {}",
                family(vip),
                proto_name(proto),
                show(&tally)
            ));
            assert!(
                tally.len() >= 2,
                "{vip} {}: with affinity off {REQUESTS} new flows all reached {tally:?}{}",
                proto_name(proto),
                c.diag()
            );
        }
    }

    // On again (no sessionAffinityConfig: the default timeout): sticky again.
    c.edit(
        "sessionAffinity ClientIP (default timeout)",
        ("flip.yaml", &c.service_docs(&svc, Affinity::ClientIp, &web)),
        0,
        (&svc, &web, Affinity::ClientIp),
    );
    let line = sticky_everywhere(&c, "client", &vips, "on");
    c.step(&format!(
        "affinity on again: {REQUESTS} flows per frontend stick: {line}"
    ));
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Affinity from a host-network process (connect-time translation)
// ---------------------------------------------------------------------------------------------

/// The host-network client: runs `mode address port count` groups in order, prints one line
/// per request (`tcp <peer> <port> <answering pod>` / `udp <sender> <port> <answering pod>`,
/// or what failed), then `DONE`, and waits to be stopped (so its output is complete before it
/// exits). Every socket has a timeout; every loop is bounded by `count` and 3 attempts.
const CLIENT_PY: &str = r#"
import errno, socket, sys, time

def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET

def err(e):
    if isinstance(e, socket.timeout):
        return "TIMEOUT"
    return errno.errorcode.get(e.errno, str(e.errno))

def first_word(data):
    words = data.decode(errors="replace").split()
    return words[0] if words else "-"

def tcp(ip, port, n):
    for i in range(n):
        s = socket.socket(family(ip), socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((ip, port))
            peer = s.getpeername()
            s.sendall(b"host-%d\n" % i)
            data = b""
            while not data.endswith(b"\n") and len(data) < 512:
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
            print("tcp", peer[0], peer[1], first_word(data), flush=True)
        except OSError as e:
            print("tcp-error", err(e), flush=True)
        finally:
            s.close()

def udp(ip, port, n):
    for i in range(n):
        s = socket.socket(family(ip), socket.SOCK_DGRAM)
        s.settimeout(1)
        line = ["udp-timeout"]
        for _ in range(3):
            try:
                s.sendto(b"host-%d" % i, (ip, port))
                data, sender = s.recvfrom(512)
            except socket.timeout:
                continue
            except OSError as e:
                line = ["udp-error", err(e)]
                break
            line = ["udp", sender[0], sender[1], first_word(data)]
            break
        s.close()
        print(*line, flush=True)

MODES = {"tcp": tcp, "udp": udp}
args = sys.argv[1:]
for i in range(0, len(args), 4):
    mode, ip, port, n = args[i:i + 4]
    MODES[mode](ip, int(port), int(n))
print("DONE", flush=True)
time.sleep(60)
"#;

/// Runs the client script in node1's namespace and cgroup with `groups` (mode, VIP, count);
/// returns, per group, the pods that answered; fails unless every request was answered from
/// `VIP:SERVICE_PORT` (`getpeername()` / `recvfrom()`).
fn host_client(
    c: &Cluster,
    script: &Path,
    groups: &[(&str, IpAddr, usize)],
) -> anyhow::Result<Vec<Vec<String>>> {
    let node = c.bed.topo.node(0);
    let mut command = Command::new("python3");
    command.arg(script);
    for (mode, ip, n) in groups {
        command.args([
            (*mode).to_owned(),
            ip.to_string(),
            SERVICE_PORT.to_string(),
            n.to_string(),
        ]);
    }
    let mut client = node.spawn(&command)?;
    client.wait_for_output("DONE", CLIENT_RUN)?;
    let output = client.output();
    client.stop()?;
    let mut lines = output.lines().take_while(|l| *l != "DONE");
    let mut out = Vec::new();
    for (mode, vip, n) in groups {
        let mut names = Vec::new();
        for _ in 0..*n {
            let line = lines.next().context("the client printed too few lines")?;
            let f: Vec<&str> = line.split_whitespace().collect();
            let [got_mode, ip, port, name] = f.as_slice() else {
                bail!("{mode} to {vip}: {line}");
            };
            ensure!(got_mode == mode, "expected a {mode} line, got {line}");
            let peer = SocketAddr::new(ip.parse()?, port.parse()?);
            ensure!(
                peer == SocketAddr::new(*vip, SERVICE_PORT),
                "{mode} to {vip}: the socket reported its peer as {peer}, not the service \
                 ({line})"
            );
            names.push((*name).to_owned());
        }
        out.push(names);
    }
    Ok(out)
}

fn python3() -> anyhow::Result<()> {
    let out = Command::new("python3")
        .arg("--version")
        .output()
        .context("running python3 (the host-network client; install the python3 package)")?;
    ensure!(out.status.success(), "python3 --version failed: {out:?}");
    Ok(())
}

#[test]
fn host_network_client_in_the_node_cgroup_sticks_to_one_backend() {
    python3().unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = Cluster::new(&[(0, "web-0"), (1, "web-1"), (1, "web-2")]);
    let svc = Service::cluster_ip("sticky", &[vip4(72), vip6(72)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1", "web-2"];
    let affinity = Affinity::ClientIpFor(DEFAULT_TIMEOUT_S);
    c.write("sticky.yaml", &c.service_docs(&svc, affinity, &web));
    for name in web {
        c.serve(name);
    }
    let script = c.bed.topo.run_dir().join("client.py");
    std::fs::write(&script, CLIENT_PY).expect("writing the client");
    c.start_agents();
    c.expect_programmed(0, &svc, &web, affinity);

    let (v4, v6) = (svc.cluster_ips[0], svc.cluster_ips[1]);
    let groups = [
        ("tcp", v4, REQUESTS),
        ("tcp", v6, REQUESTS),
        ("udp", v4, REQUESTS / 2),
        ("udp", v6, REQUESTS / 2),
    ];
    // Two client processes one after the other: host processes share the node's identity,
    // so the second sticks where the first did.
    let mut runs = Vec::new();
    for run in 1..=2 {
        let t = Instant::now();
        let names =
            host_client(&c, &script, &groups).unwrap_or_else(|e| panic!("{e:#}{}", c.diag()));
        let mut line = Vec::new();
        for ((mode, vip, n), names) in groups.iter().zip(&names) {
            let distinct: BTreeSet<&String> = names.iter().collect();
            assert_eq!(
                distinct.len(),
                1,
                "host client run {run}: {n} {mode} flows to {vip} reached {distinct:?}, want \
                 one backend (ClientIP affinity){}",
                c.diag()
            );
            line.push(format!("{n} {mode} {} -> {}", family(*vip), names[0]));
        }
        c.step(&format!(
            "host client run {run} (node1's cgroup) in {:.0} ms, peer = VIP:{SERVICE_PORT}, \
             one backend per frontend: {}",
            t.elapsed().as_secs_f64() * 1e3,
            line.join(", ")
        ));
        runs.push(names.iter().map(|n| n[0].clone()).collect::<Vec<_>>());
    }
    assert_eq!(
        runs[0],
        runs[1],
        "the second host client process did not stick where the first did{}",
        c.diag()
    );
    let node_ns = &c.topo.node(0).ns;
    let cookie = node_ns
        .run(loader::own_netns_cookie)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut node_key = [0u8; 16];
    node_key[..8].copy_from_slice(&cookie.to_ne_bytes());
    let of_node = affinity_entries(c.agent(0).bpffs())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .iter()
        .filter(|(k, _)| k.client == node_key && k.family == CLIENT_NETNS)
        .count();
    c.step(&format!(
        "both runs on the same backends; node1 AFFINITY_V1 entries keyed by node1's network \
         namespace (host processes share it, as they share the node's address): {of_node}"
    ));
    assert_eq!(
        of_node,
        4,
        "want one entry per frontend (2 VIPs x TCP/UDP) for node1's host processes{}",
        c.diag()
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Hairpin
// ---------------------------------------------------------------------------------------------

/// The client is the only endpoint of `own`: every flow is hairpinned. Its own server must
/// answer every TCP and UDP request, seeing the VIP as the client, and the client must see the
/// answers coming from the VIP and service port.
fn check_hairpin_only_endpoint(c: &Cluster, own: &Service) {
    let before = c.stats(0);
    for &vip in &own.cluster_ips {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let pod_ip = c.pod_ip("client", vip);
        // TCP: 5 connections, 2 requests each (the second one over the established flow, both
        // legs through the connection table).
        let tcp = c.in_pod("client", move || {
            let mut out = Vec::new();
            for i in 0..5 {
                let mut s = TcpSession::connect(dst, IO_TIMEOUT)?;
                let local = s.local_addr()?;
                ensure!(
                    local.ip() == pod_ip,
                    "connection {i} bound to {local}, not to the pod's own address {pod_ip}"
                );
                for j in 0..2 {
                    out.push(s.ask(&format!("hairpin-{i}-{j}"))?);
                }
            }
            Ok(out)
        });
        let udp = c.answers("client", dst, Protocol::Udp, 5, "hairpin-udp");
        let udp_connected = c.in_pod("client", move || {
            (0..3)
                .map(|i| {
                    k8s::udp_request_connected(dst, &format!("hairpin-udpc-{i}"), UDP_WAIT, 3)
                        .map(|(a, _)| a)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        });
        // Per packet, the source must become the VIP so the answer comes back through the
        // translation; at the socket the connection is the pod's own, from and to its address
        // (nothing to translate on the wire), and only the socket calls show the VIP.
        let seen = if k8s::pods_at_socket() { pod_ip } else { vip };
        for (what, answers) in [
            ("TCP", &tcp),
            ("UDP", &udp),
            ("UDP (connected)", &udp_connected),
        ] {
            for a in answers {
                assert_eq!(
                    (a.label.as_str(), a.client_seen, a.from),
                    ("client", seen, dst),
                    "{what} {dst} from the client, its only endpoint: want the client's own \
                     server to answer, seeing {seen} as the client, and the answer from the \
                     VIP{}",
                    c.diag()
                );
            }
        }
        c.step(&format!(
            "{} self {dst}: {} TCP requests over 5 connections, {} UDP (+{} connected) all \
             answered by the client itself, which saw {seen} as its peer; getpeername() / \
             recvfrom() = {dst}",
            family(vip),
            tcp.len(),
            udp.len(),
            udp_connected.len()
        ));
    }
    let after = c.stats(0);
    let d = |key: &str| delta(&after, &before, key);
    let fwd = k8s::forward_counter();
    c.step(&format!(
        "node1 {fwd} +{} {} +{} dropped +{}",
        d(fwd),
        k8s::reverse_counter(),
        d(k8s::reverse_counter()),
        d("dropped")
    ));
    // Per packet, each hairpinned request is at least its forward packet and its answer, both
    // translated: (5 x 2 TCP + 5 + 3 UDP) x 2 families = 36 requests. At the socket, each
    // connection and each datagram is translated once: (5 + 5 + 3) x 2 = 26.
    let want = if k8s::pods_at_socket() { 26 } else { 72 };
    assert!(d(fwd) >= want, "node1 {fwd} +{}{}", d(fwd), c.diag());
    assert_eq!(d("dropped"), 0, "node1 dropped packets{}", c.diag());
}

/// The client and two other endpoints behind `mixed`: every request works, whichever
/// endpoint it reaches; the hairpinned ones are seen from the VIP, the others from the pod.
///
/// Each request lands on the client with probability 1/3: P(none of 30 does) = (2/3)^30 =
/// 5.2e-6 per (family, protocol), 2.1e-5 for any of the 4 (a false failure once in ~48,000
/// runs); P(all 30 do) = 3^-30 is negligible.
fn check_hairpin_among_others(c: &Cluster, mixed: &Service) {
    for &vip in &mixed.cluster_ips {
        let dst = SocketAddr::new(vip, SERVICE_PORT);
        let pod_ip = c.pod_ip("client", vip);
        for proto in PROTOCOLS {
            let answers = c.answers("client", dst, proto, REQUESTS, "mixed");
            let mut hairpinned = 0;
            for a in &answers {
                let want = if a.label == "client" {
                    hairpinned += 1;
                    // At the socket a pod reaching itself connects to its own address.
                    if k8s::pods_at_socket() { pod_ip } else { vip }
                } else {
                    pod_ip
                };
                assert_eq!(
                    a.client_seen,
                    want,
                    "{dst} {}: {} saw the client as {}, want {want}{}",
                    proto_name(proto),
                    a.label,
                    a.client_seen,
                    c.diag()
                );
            }
            let tally = tally(&answers);
            c.step(&format!(
                "{} mixed {dst} {}: {REQUESTS}/{REQUESTS} answered ({}), {hairpinned} \
                 hairpinned, the others seen from {pod_ip}",
                family(vip),
                proto_name(proto),
                show(&tally)
            ));
            assert!(
                hairpinned > 0 && hairpinned < REQUESTS,
                "{dst} {}: want some requests hairpinned and some not: {tally:?}{}",
                proto_name(proto),
                c.diag()
            );
        }
    }
}

#[test]
fn hairpin_pod_reaches_itself_through_its_own_service() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let own = Service::cluster_ip("self", &[vip4(80), vip6(80)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let mixed = Service::cluster_ip("mixed", &[vip4(81), vip6(81)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let all = ["client", "web-0", "web-1"];
    let mut docs = c.service_docs(&own, Affinity::Off, &["client"]);
    docs.extend(c.service_docs(&mixed, Affinity::Off, &all));
    c.write("hairpin.yaml", &docs);
    for name in all {
        c.serve(name);
    }
    c.start_agents();
    c.expect_programmed(0, &own, &["client"], Affinity::Off);
    c.expect_programmed(0, &mixed, &all, Affinity::Off);
    c.step("node1 programmed self (client only) and mixed (client, web-0, web-1)");

    check_hairpin_only_endpoint(&c, &own);
    check_hairpin_among_others(&c, &mixed);
    c.finish();
}

// ---------------------------------------------------------------------------------------------
// Affinity with internalTrafficPolicy Local
// ---------------------------------------------------------------------------------------------

/// From `pod`, `n` new flows per VIP of `vips` and protocol must each reach one backend,
/// one of `allowed`; returns which, for the log.
fn sticky_within(
    c: &Cluster,
    pod: &str,
    vips: &[IpAddr],
    allowed: &[&str],
    n: usize,
    tag: &str,
) -> String {
    let mut line = Vec::new();
    for &vip in vips {
        for proto in PROTOCOLS {
            let backend = c.sticky(pod, vip, proto, n, tag);
            assert!(
                allowed.contains(&backend.as_str()),
                "{vip} {}: {pod} reached {backend}, want one of {allowed:?}{}",
                proto_name(proto),
                c.diag()
            );
            line.push(format!(
                "{} {} -> {backend}",
                family(vip),
                proto_name(proto)
            ));
        }
    }
    line.join(", ")
}

/// node1's affinity entries of the client pod: 2 per VIP of `vips` (TCP and UDP), each of
/// which must `want` (checked by `ok` with the VIP and the entry's backend address, port and
/// locality); returns them.
fn client_entries(
    c: &Cluster,
    vips: &[IpAddr],
    want: &str,
    ok: impl Fn(IpAddr, (IpAddr, u16, bool)) -> bool,
) -> Vec<(IpAddr, u16, bool)> {
    let mut all = Vec::new();
    for &vip in vips {
        let targets = affinity_targets(c, 0, "client", vip);
        assert!(
            targets.len() == 2 && targets.iter().all(|&t| ok(vip, t)),
            "node1 AFFINITY_V1 entries of the client ({}): {targets:?}, want 2 that {want}{}",
            family(vip),
            c.diag()
        );
        all.extend(targets);
    }
    all
}

#[test]
fn affinity_with_internal_traffic_policy_local_sticks_to_a_local_endpoint() {
    let mut c = Cluster::new(&[
        (0, "client"),
        (0, "web-0"),
        (0, "web-1"),
        (1, "web-2"),
        (1, "client-2"),
    ]);
    let local = Service::cluster_ip("local", &[vip4(90), vip6(90)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT)
        .internal_traffic_policy_local();
    let mut cluster = local.clone();
    cluster.internal_traffic_policy_local = false;
    let web = ["web-0", "web-1", "web-2"];
    let node1_local = ["web-0", "web-1"];
    let affinity = Affinity::ClientIpFor(DEFAULT_TIMEOUT_S);
    c.write("local.yaml", &c.service_docs(&local, affinity, &web));
    for name in web {
        c.serve(name);
    }
    c.start_agents();
    c.expect_programmed(0, &local, &node1_local, affinity);
    c.expect_programmed(1, &local, &["web-2"], affinity);
    c.step("node1 programmed web-0/web-1, node2 web-2, both with affinity 10800s");

    // Only local endpoints, and one of them per client and frontend.
    let vips = local.cluster_ips.clone();
    let line = sticky_within(&c, "client", &vips, &node1_local, REQUESTS, "local");
    c.step(&format!(
        "client (node1): {REQUESTS} flows per frontend, one node1 endpoint each: {line}"
    ));
    sticky_within(&c, "client-2", &vips, &["web-2"], 10, "local2");
    c.step("client-2 (node2): 10 flows per frontend, all to web-2 (node2's only endpoint)");

    // Cluster policy with web-2 as the only endpoint: the client's entries now name web-2
    // (its old backends are gone, so it is re-balanced onto the only one).
    c.edit(
        "internalTrafficPolicy Cluster, endpoints web-2 only",
        (
            "local.yaml",
            &c.service_docs(&cluster, affinity, &["web-2"]),
        ),
        0,
        (&cluster, &["web-2"], affinity),
    );
    sticky_within(&c, "client", &vips, &["web-2"], 10, "remote");
    c.step("client: 10 flows per frontend, all to web-2 on node2 (its affinity entries now)");

    // Back to Local with all three: web-2 stays known to node1 (for established connections)
    // but is not local, so the entries naming it must not be honoured.
    c.edit(
        "internalTrafficPolicy Local, endpoints web-0/1/2",
        ("local.yaml", &c.service_docs(&local, affinity, &web)),
        0,
        (&local, &node1_local, affinity),
    );
    let stale = client_entries(
        &c,
        &vips,
        "name web-2, not local",
        |vip, (ip, port, is_local)| {
            SocketAddr::new(ip, port) == SocketAddr::new(c.pod_ip("web-2", vip), BACKEND_PORT)
                && !is_local
        },
    );
    c.step(&format!(
        "node1 AFFINITY_V1: the client's 4 entries name web-2, known to node1 but not local: \
         {stale:?}"
    ));
    let line = sticky_within(&c, "client", &vips, &node1_local, REQUESTS, "local-again");
    c.step(&format!(
        "client (node1): moved off web-2 to node1 endpoints, sticky again: {line}"
    ));
    client_entries(&c, &vips, "be local", |_, (_, _, is_local)| is_local);
    c.step("node1 AFFINITY_V1: the client's entries now name local endpoints");
    c.finish();
}
