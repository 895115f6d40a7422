//! `ClusterIP` end to end, through the real agent: two emulated nodes, one `svc-agent run
//! --from-dir` per node (each in its node's namespace, cgroup and bpffs, all following the same
//! directory of Kubernetes YAML generated from the topology's pod addresses), TCP and UDP
//! servers in backend pods, a client pod on node1 talking to the Service VIPs.
//!
//! Every test builds its own topology and removes it at the end (and asserts that nothing of
//! the run remains); every socket operation has a timeout and every loop is bounded. Needs
//! root and a built agent (`cargo build -p svc-agent`): fails, never skips, without them.
//!
//! A service without endpoints must refuse at once: the datapath answers with a TCP reset or
//! an ICMP port unreachable (counted `rejected`), and the client sees a refusal, not a timeout.
//! Session affinity and hairpin are covered by `affinity_hairpin_e2e.rs`, host-network clients
//! (connect-time translation) by `connect_e2e.rs`, interfaces created after the agent starts by
//! `iface_follow_e2e.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{
        self, Agent, Answer, Backends, EndpointSlice, ManifestDir, Programmed, Protocol, Service,
        TcpSession, frontend_key,
    },
    netns::Pod,
    testbed::{TestBed, family, vip4, vip6},
};

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a request that is expected to fail (nothing answers: it can only time out).
const FAIL_TIMEOUT: Duration = Duration::from_millis(300);
/// UDP requests expected to be answered are sent at most this many times (same flow) ...
const UDP_ATTEMPTS: u32 = 3;
/// ... waiting this long for each answer.
const UDP_WAIT: Duration = Duration::from_millis(700);
/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The backends' port (every Service here targets it unless said otherwise).
const BACKEND_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;

fn proto_name(p: Protocol) -> &'static str {
    p.as_k8s()
}

/// One test's cluster. Fields drop in order: servers, then agents, then the topology (whose
/// guard removes namespaces, mounts, cgroups and the run directory with the manifests).
struct Cluster {
    backends: Backends,
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
    /// The agents are started by [`Cluster::start_agents`], once the test wrote its objects.
    fn new(pods: &[(usize, &str)]) -> Self {
        Self {
            backends: Backends::new(),
            bed: TestBed::new(pods),
        }
    }

    fn pods(&self, names: &[&str]) -> Vec<&Pod> {
        names.iter().map(|n| self.pod(n)).collect()
    }

    /// `pod`'s address of `vip`'s family, with `port`, as `inspect services` prints it.
    fn backend_addr(&self, pod: &str, vip: IpAddr, port: u16) -> String {
        let pod = self.pod(pod);
        let ip: IpAddr = if vip.is_ipv6() {
            pod.ipv6.into()
        } else {
            pod.ipv4.into()
        };
        SocketAddr::new(ip, port).to_string()
    }

    /// The client pod's address of `vip`'s family.
    fn client_ip(&self, vip: IpAddr) -> IpAddr {
        let client = self.pod("client");
        if vip.is_ipv6() {
            client.ipv6.into()
        } else {
            client.ipv4.into()
        }
    }

    /// Writes `file` (the documents joined into one YAML stream).
    fn write(&self, file: &str, docs: &[String]) {
        self.bed
            .manifests
            .write(file, &k8s::documents(docs))
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    /// Serves TCP and UDP on `port` of both of `pod`'s addresses, answering as `label`.
    fn serve(&self, pod: &str, port: u16, label: &str) {
        let pod = self.pod(pod);
        for ip in [IpAddr::from(pod.ipv4), pod.ipv6.into()] {
            self.backends
                .serve(&pod.ns, label, SocketAddr::new(ip, port))
                .unwrap_or_else(|e| panic!("serving {label} on {ip}:{port}: {e:#}"));
        }
    }

    /// Makes a change to the directory, waits until every agent logged a sync after it, then
    /// (bounded) until node1's programmed frontends satisfy `done`.
    fn edit(
        &mut self,
        what: &str,
        change: impl FnOnce(&ManifestDir) -> anyhow::Result<()>,
        done: impl Fn(&Programmed) -> bool,
    ) {
        let before: Vec<usize> = self.agents.iter().map(Agent::syncs).collect();
        let t = Instant::now();
        change(&self.bed.manifests).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        for (agent, before) in self.agents.iter_mut().zip(before) {
            agent
                .wait_syncs(before + 1, SYNC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        }
        let synced = t.elapsed();
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let programmed = self.programmed(0);
            if done(&programmed) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: node1 did not reach the expected state within {SYNC_TIMEOUT:?}:\n{}\
                 agent log:\n{}",
                programmed.text,
                self.agent(0).log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.step(&format!(
            "{what}: both agents synced after {:.0} ms, node1 programmed after {:.0} ms",
            synced.as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64() * 1e3
        ));
    }

    /// Runs `f` in the client pod's namespace.
    fn in_client<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> T {
        self.pod("client")
            .ns
            .run(f)
            .unwrap_or_else(|e| panic!("{e:#}{}", self.diag()))
    }

    /// `n` requests to `vip:port` over `proto`, each on a new connection / socket (so each is a
    /// new flow and a new backend choice). Checks each is answered by a server that saw the
    /// client's own address, and that the answer comes from `vip:port`. Returns answers per
    /// label and the UDP re-sends that were needed.
    fn requests(
        &self,
        vip: IpAddr,
        port: u16,
        proto: Protocol,
        n: usize,
        tag: &str,
    ) -> (BTreeMap<String, usize>, u32) {
        let dst = SocketAddr::new(vip, port);
        let client_ip = self.client_ip(vip);
        let tag = tag.to_owned();
        self.in_client(move || {
            let mut tally = BTreeMap::new();
            let mut resent = 0;
            for i in 0..n {
                let request = format!("{tag}-{i}");
                let answer: Answer = match proto {
                    Protocol::Udp => {
                        let (answer, attempt) =
                            k8s::udp_request(dst, &request, UDP_WAIT, UDP_ATTEMPTS)?;
                        resent += attempt - 1;
                        answer
                    }
                    _ => k8s::tcp_request(dst, &request, IO_TIMEOUT)?,
                };
                anyhow::ensure!(
                    answer.from == dst,
                    "{request}: the answer came from {}, not from the service {dst}",
                    answer.from
                );
                anyhow::ensure!(
                    answer.client_seen == client_ip,
                    "{request}: {} saw the client as {}, not {client_ip}",
                    answer.label,
                    answer.client_seen
                );
                *tally.entry(answer.label).or_default() += 1;
            }
            Ok((tally, resent))
        })
    }

    /// `n` requests to `vip:port` over `proto` that must all fail (no answer within
    /// [`FAIL_TIMEOUT`]). Returns how they failed.
    fn failing_requests(&self, vip: IpAddr, port: u16, proto: Protocol, n: usize) -> Failures {
        let dst = SocketAddr::new(vip, port);
        self.in_client(move || {
            let mut failures = Failures::default();
            for i in 0..n {
                let request = format!("doomed-{i}");
                let t = Instant::now();
                let outcome = match proto {
                    // Connected: an ICMP rejection fails the receive at once.
                    Protocol::Udp => {
                        k8s::udp_request_connected(dst, &request, FAIL_TIMEOUT, 1).map(|(a, _)| a)
                    }
                    _ => k8s::tcp_request(dst, &request, FAIL_TIMEOUT),
                };
                let error = match outcome {
                    Ok(answer) => anyhow::bail!(
                        "{} {dst} answered by {} ({request}) but should have failed",
                        proto_name(proto),
                        answer.label
                    ),
                    Err(e) => e,
                };
                let kind = error
                    .chain()
                    .find_map(|c| c.downcast_ref::<std::io::Error>())
                    .map(std::io::Error::kind);
                failures.add(kind, t.elapsed());
            }
            Ok(failures)
        })
    }

    /// Stops servers and agents (which must exit cleanly), drops the topology and asserts
    /// that nothing of the run remains.
    fn finish(self) {
        let Self { backends, bed, .. } = self;
        drop(backends);
        bed.finish();
    }
}

/// How requests that were meant to fail failed.
#[derive(Debug, Default)]
struct Failures {
    /// Refused at once (TCP reset, or ICMP unreachable on a connected UDP socket).
    refused: usize,
    /// Nothing came back before the timeout (dropped).
    timed_out: usize,
    /// Anything else (for example no route to the address), by kind.
    other: BTreeMap<String, usize>,
    /// The longest time one took.
    slowest: Duration,
}

impl Failures {
    fn add(&mut self, kind: Option<std::io::ErrorKind>, took: Duration) {
        use std::io::ErrorKind::{ConnectionRefused, TimedOut, WouldBlock};
        match kind {
            Some(ConnectionRefused) => self.refused += 1,
            Some(WouldBlock | TimedOut) => self.timed_out += 1,
            other => {
                let name = other.map_or_else(|| "error".to_owned(), |k| format!("{k:?}"));
                *self.other.entry(name).or_default() += 1;
            }
        }
        self.slowest = self.slowest.max(took);
    }
}

impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.refused > 0 {
            parts.push(format!("{} refused", self.refused));
        }
        if self.timed_out > 0 {
            parts.push(format!("{} timed out", self.timed_out));
        }
        for (kind, n) in &self.other {
            parts.push(format!("{n} {kind}"));
        }
        write!(
            f,
            "{} (slowest {} ms)",
            parts.join(", "),
            self.slowest.as_millis()
        )
    }
}

/// `tally` as `web-0 31, web-1 29, web-2 30`.
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

/// Fixture helpers shared by the tests.
impl Cluster {
    /// One `EndpointSlice` per family of `svc`'s VIPs, listing `pods` as ready endpoints
    /// (named target ports resolved through `named`), as YAML documents.
    fn slice_docs(&self, svc: &Service, pods: &[&str], named: &[(&str, u16)]) -> Vec<String> {
        svc.cluster_ips
            .iter()
            .map(|ip| {
                EndpointSlice::new(&svc.name, ip.is_ipv6())
                    .ports_of(svc, named)
                    .ready_pods(&self.bed.topo, self.pods(pods))
                    .to_yaml()
            })
            .collect()
    }

    /// `svc` followed by its slices (see [`Cluster::slice_docs`]).
    fn service_docs(&self, svc: &Service, pods: &[&str], named: &[(&str, u16)]) -> Vec<String> {
        let mut docs = vec![svc.to_yaml()];
        docs.extend(self.slice_docs(svc, pods, named));
        docs
    }

    /// `pods`' addresses of `vip`'s family with `port`, as `inspect services` prints backends.
    fn backend_set(&self, pods: &[&str], vip: IpAddr, port: u16) -> BTreeSet<String> {
        pods.iter()
            .map(|n| self.backend_addr(n, vip, port))
            .collect()
    }

    /// Asserts that `p` (node `node`'s view) programs `vip:port/proto` with exactly `pods` on
    /// `target`.
    fn expect_backends(
        &self,
        p: &Programmed,
        node: usize,
        (vip, port, proto): (IpAddr, u16, Protocol),
        pods: &[&str],
        target: u16,
    ) {
        let key = frontend_key(SocketAddr::new(vip, port), proto);
        let want = self.backend_set(pods, vip, target);
        assert_eq!(
            p.backends(&key).as_ref(),
            Some(&want),
            "node{} {key}:\n{}",
            node + 1,
            p.text
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// Per (family, protocol): this many requests, each a new flow ...
const SPREAD_REQUESTS: usize = 90;
/// ... and each of the 3 backends must answer at least this many of them.
///
/// A backend's count is Binomial(90, 1/3) (mean 30, sd 4.5) when the choice is uniform. The
/// chance it falls below 12 (4 sd under the mean) is P(X <= 11) = 3.9e-6; with 3 backends x
/// 4 (family, protocol) pairs checked, a correct datapath fails this test with probability
/// at most 12 x 3.9e-6 = 4.7e-5 (union bound): about once in 21,000 runs. A datapath that
/// never picks a backend, or favours one heavily (e.g. slot 1 half the time), fails it.
const SPREAD_MIN: usize = 12;

/// [`SPREAD_REQUESTS`] requests to `vip` over `proto`: all answered (from the VIP, by servers
/// that saw the client's address), each backend at least [`SPREAD_MIN`] times. Returns the
/// UDP re-sends needed.
fn check_spread(c: &Cluster, vip: IpAddr, proto: Protocol) -> u32 {
    let tag = format!("{}-{}", family(vip), proto_name(proto));
    let (tally, resent) = c.requests(vip, SERVICE_PORT, proto, SPREAD_REQUESTS, &tag);
    let resends = if resent > 0 {
        format!(" ({resent} UDP re-sends)")
    } else {
        String::new()
    };
    c.step(&format!(
        "{} {} {}: {SPREAD_REQUESTS}/{SPREAD_REQUESTS} answered from the VIP, by {}{resends}",
        family(vip),
        proto_name(proto),
        SocketAddr::new(vip, SERVICE_PORT),
        show(&tally),
    ));
    assert_eq!(
        tally.len(),
        3,
        "not every backend answered: {tally:?}{}",
        c.diag()
    );
    for (label, n) in &tally {
        assert!(
            *n >= SPREAD_MIN,
            "{tag}: {label} answered {n} of {SPREAD_REQUESTS} (want >= {SPREAD_MIN}): \
             {tally:?}{}",
            c.diag()
        );
    }
    resent
}

#[test]
fn pod_reaches_dual_stack_cluster_ip_over_tcp_and_udp_on_every_backend() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (0, "web-1"), (1, "web-2")]);
    let (v4, v6) = (vip4(10), vip6(10));
    let svc = Service::cluster_ip("web", &[v4, v6])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1", "web-2"];
    c.write("web.yaml", &c.service_docs(&svc, &web, &[]));
    for name in web {
        c.serve(name, BACKEND_PORT, name);
    }
    c.start_agents();

    // Programmed as written: 2 VIPs x 2 protocols, 3 backends each, on both nodes.
    for node in 0..2 {
        let p = c.programmed(node);
        for vip in [v4, v6] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                c.expect_backends(&p, node, (vip, SERVICE_PORT, proto), &web, BACKEND_PORT);
            }
        }
    }
    c.step("node1 and node2 programmed 4 frontends (2 VIPs x TCP/UDP) with 3 backends each");

    let before = [c.stats(0), c.stats(1)];
    let t = Instant::now();
    let mut resent = 0;
    for vip in [v4, v6] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            resent += check_spread(&c, vip, proto);
        }
    }
    let elapsed = t.elapsed();
    let after = [c.stats(0), c.stats(1)];
    let requests = 4 * SPREAD_REQUESTS as u64;
    let d = |node: usize, key: &str| delta(&after[node], &before[node], key);
    let (fwd, rev) = (k8s::forward_counter(), k8s::reverse_counter());
    c.step(&format!(
        "{requests} requests in {:.0} ms (pods translated {}); node1 {fwd} +{} {rev} +{} \
         dropped +{}; node2 {fwd} +{} {rev} +{}",
        elapsed.as_secs_f64() * 1e3,
        if k8s::pods_at_socket() {
            "at the socket"
        } else {
            "per packet"
        },
        d(0, fwd),
        d(0, rev),
        d(0, "dropped"),
        d(1, fwd),
        d(1, rev)
    ));
    // Each request is at least one translation each way on the client's node (a packet, or a
    // connect/sendto and a recvfrom/getpeername at the socket); the backend's node translates
    // nothing (the client's node did it).
    for key in [fwd, rev, "dnat", "rev_nat"] {
        if k8s::pods_at_socket() && (key == "dnat" || key == "rev_nat") {
            // At the socket no packet needs translating at all.
            assert_eq!(d(0, key), 0, "node1 {key} moved{}", c.diag());
            continue;
        }
        assert!(
            d(0, key) >= requests,
            "node1 {key} +{}, want >= {requests}{}",
            d(0, key),
            c.diag()
        );
        assert_eq!(d(1, key), 0, "node2 {key} moved{}", c.diag());
    }
    assert_eq!(d(0, "dropped"), 0, "node1 dropped packets{}", c.diag());
    // Veths do not lose packets; a re-send or two would point at a slow first lookup.
    assert!(resent <= 2, "{resent} UDP re-sends were needed");
    c.finish();
}

#[test]
fn multi_port_service_with_named_target_port_reaches_the_right_backend_ports() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let (v4, v6) = (vip4(20), vip6(20));
    // `http` targets the container port named `web`, which the pods declare as 8080.
    let svc = Service::cluster_ip("multi", &[v4, v6])
        .port("http", Protocol::Tcp, 80, "web")
        .port("metrics", Protocol::Tcp, 9090, 9100);
    let web = ["web-0", "web-1"];
    c.write("multi.yaml", &c.service_docs(&svc, &web, &[("web", 8080)]));
    // The real ports, and decoys on the service ports: a translation of the address alone
    // would reach those.
    for name in web {
        for port in [8080, 9100, 80, 9090] {
            c.serve(name, port, &format!("{name}:{port}"));
        }
    }
    c.start_agents();
    let p = c.programmed(0);
    for vip in [v4, v6] {
        for (port, target) in [(80, 8080), (9090, 9100)] {
            c.expect_backends(&p, 0, (vip, port, Protocol::Tcp), &web, target);
        }
    }
    c.step("node1 programmed http 80 -> 8080 (named targetPort web) and metrics 9090 -> 9100");

    // 20 requests per (family, port): P(one of the 2 backends never answers) = 2 x 2^-20.
    for vip in [v4, v6] {
        for (port, target) in [(80, 8080), (9090, 9100)] {
            let dst = SocketAddr::new(vip, port);
            let (tally, _) = c.requests(vip, port, Protocol::Tcp, 20, &format!("port-{port}"));
            c.step(&format!("{} {dst} -> {}", family(vip), show(&tally)));
            let want: BTreeSet<String> = web.iter().map(|n| format!("{n}:{target}")).collect();
            let got: BTreeSet<String> = tally.keys().cloned().collect();
            assert_eq!(
                got,
                want,
                "{dst} answered by {tally:?}, want both backends on {target}{}",
                c.diag()
            );
        }
    }
    c.finish();
}

/// Opens connections to `dst` from the client until `n` of them landed on a backend other
/// than `avoid` (closing those that landed on it; at most `6 * n` tries). Returns the kept
/// connections with their backend, and how many were closed.
fn sessions_avoiding(
    c: &Cluster,
    dst: SocketAddr,
    avoid: &'static str,
    n: usize,
) -> (Vec<(TcpSession, String)>, usize) {
    c.in_client(move || {
        let mut kept: Vec<(TcpSession, String)> = Vec::new();
        let mut closed = 0;
        for i in 0..6 * n {
            if kept.len() == n {
                break;
            }
            let mut s = TcpSession::connect(dst, IO_TIMEOUT)?;
            let answer = s.ask(&format!("hello-{i}"))?;
            if answer.label == avoid {
                closed += 1;
            } else {
                kept.push((s, answer.label));
            }
        }
        anyhow::ensure!(
            kept.len() == n,
            "only {} of {} connections avoided {avoid}",
            kept.len(),
            6 * n
        );
        Ok((kept, closed))
    })
}

#[test]
fn established_connections_survive_endpoint_churn() {
    let mut c = Cluster::new(&[
        (0, "client"),
        (0, "web-0"),
        (0, "web-1"),
        (1, "web-2"),
        (0, "web-3"),
        (1, "web-4"),
    ]);
    let vip = vip4(30);
    let dst = SocketAddr::new(vip, SERVICE_PORT);
    let svc = Service::cluster_ip("churn", &[vip]).port(
        "tcp-echo",
        Protocol::Tcp,
        SERVICE_PORT,
        BACKEND_PORT,
    );
    let changed_pods = ["web-0", "web-2", "web-3", "web-4"];
    let changed = c.slice_docs(&svc, &changed_pods, &[]);
    c.write("churn-svc.yaml", &[svc.to_yaml()]);
    c.write(
        "churn-slice.yaml",
        &c.slice_docs(&svc, &["web-0", "web-1", "web-2"], &[]),
    );
    for name in ["web-0", "web-1", "web-2", "web-3", "web-4"] {
        c.serve(name, BACKEND_PORT, name);
    }
    c.start_agents();

    // web-1 is the endpoint that will be removed: keep 10 connections that landed elsewhere,
    // so removing it breaks none of them. Each connection avoids web-1 with probability 2/3:
    // 60 tries leave fewer than 10 with probability < 1e-13.
    let (mut sessions, closed) = sessions_avoiding(&c, dst, "web-1", 10);
    let mut landed = BTreeMap::<String, usize>::new();
    for (_, label) in &sessions {
        *landed.entry(label.clone()).or_default() += 1;
    }
    c.step(&format!(
        "10 connections open to {dst}: {} ({closed} that landed on web-1 closed)",
        show(&landed)
    ));

    let want = c.backend_set(&changed_pods, vip, BACKEND_PORT);
    let key = frontend_key(dst, Protocol::Tcp);
    c.edit(
        "slice edited: +web-3 +web-4 -web-1",
        |m| m.write("churn-slice.yaml", &k8s::documents(&changed)),
        |p| p.backends(&key).as_ref() == Some(&want),
    );
    let web1_before = c.backends.served().get("web-1").copied();

    for (i, (session, label)) in sessions.iter_mut().enumerate() {
        let answer = session.ask(&format!("after-{i}")).unwrap_or_else(|e| {
            panic!(
                "connection {i} (on {label}) after the edit: {e:#}{}",
                c.diag()
            )
        });
        assert_eq!(
            &answer.label, label,
            "connection {i} moved from {label} to {}",
            answer.label
        );
    }
    c.step("every old connection still answered by its own backend");
    drop(sessions);

    let (tally, _) = c.requests(vip, SERVICE_PORT, Protocol::Tcp, 30, "new");
    c.step(&format!("30 new connections: {}", show(&tally)));
    assert!(
        !tally.contains_key("web-1"),
        "the removed endpoint web-1 got new connections: {tally:?}{}",
        c.diag()
    );
    assert_eq!(
        c.backends.served().get("web-1").copied(),
        web1_before,
        "web-1 served requests after its removal"
    );
    // Each new connection lands on web-3 or web-4 with probability 1/2: P(none) = 2^-30.
    assert!(
        tally.contains_key("web-3") || tally.contains_key("web-4"),
        "the added endpoints got no connection: {tally:?}{}",
        c.diag()
    );
    c.finish();
}

#[test]
fn removing_the_service_stops_translation_and_restoring_it_brings_it_back() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let vip = vip4(40);
    let svc = Service::cluster_ip("web", &[vip])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let web = ["web-0", "web-1"];
    c.write("web-svc.yaml", &[svc.to_yaml()]);
    c.write("web-slice.yaml", &c.slice_docs(&svc, &web, &[]));
    for name in web {
        c.serve(name, BACKEND_PORT, name);
    }
    c.start_agents();
    let keys =
        [Protocol::Tcp, Protocol::Udp].map(|p| frontend_key(SocketAddr::new(vip, SERVICE_PORT), p));
    let want = c.backend_set(&web, vip, BACKEND_PORT);
    let works = |c: &Cluster, when: &str| {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let (tally, _) = c.requests(vip, SERVICE_PORT, proto, 5, when);
            c.step(&format!(
                "{when}: {} {vip}:{SERVICE_PORT} -> {}",
                proto_name(proto),
                show(&tally)
            ));
        }
    };
    works(&c, "before");

    c.edit(
        "web-svc.yaml removed",
        |m| m.remove("web-svc.yaml"),
        |p| p.frontends.is_empty(),
    );
    let served = c.backends.total_served();
    let before = c.stats(0);
    let tcp = c.failing_requests(vip, SERVICE_PORT, Protocol::Tcp, 3);
    let udp = c.failing_requests(vip, SERVICE_PORT, Protocol::Udp, 3);
    c.step(&format!(
        "without the Service (VIP not routed anywhere): TCP {tcp}; UDP {udp}"
    ));
    let after = c.stats(0);
    assert_eq!(c.backends.total_served(), served, "a backend answered");
    // Not a service any more: not translated, not counted as a service drop or reject.
    for key in ["dnat", "dropped", "no_endpoints", "rejected"] {
        assert_eq!(
            delta(&after, &before, key),
            0,
            "node1 {key} moved{}",
            c.diag()
        );
    }

    c.edit(
        "web-svc.yaml restored",
        |m| m.write("web-svc.yaml", &k8s::documents(&[svc.to_yaml()])),
        |p| keys.iter().all(|k| p.backends(k).as_ref() == Some(&want)),
    );
    works(&c, "restored");
    c.finish();
}

/// Asserts what each node programs for the Local services of the test below: only its own
/// endpoints, and a drop for `remote` on node1 (whose endpoints are all on node2).
fn check_local_programming(c: &Cluster, local: &Service, remote: &Service) {
    for (node, local_pods) in [(0, vec!["web-0", "web-1"]), (1, vec!["web-2"])] {
        let p = c.programmed(node);
        for (&lv, &rv) in local.cluster_ips.iter().zip(&remote.cluster_ips) {
            c.expect_backends(
                &p,
                node,
                (lv, SERVICE_PORT, Protocol::Tcp),
                &local_pods,
                BACKEND_PORT,
            );
            let key = frontend_key(SocketAddr::new(rv, SERVICE_PORT), Protocol::Tcp);
            let fe = p
                .frontends
                .get(&key)
                .unwrap_or_else(|| panic!("{key} not programmed:\n{}", p.text));
            if node == 0 {
                assert!(
                    fe.backends.is_empty() && fe.notes.contains("no local endpoint"),
                    "node1 {key}:\n{}",
                    p.text
                );
            } else {
                c.expect_backends(
                    &p,
                    node,
                    (rv, SERVICE_PORT, Protocol::Tcp),
                    &["web-2"],
                    BACKEND_PORT,
                );
            }
        }
    }
    c.step("node1 programmed local-web with web-0/web-1 only and remote-web as drop; node2 web-2");
}

#[test]
fn internal_traffic_policy_local_uses_only_endpoints_on_the_clients_node() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (0, "web-1"), (1, "web-2")]);
    let local = Service::cluster_ip("local-web", &[vip4(50), vip6(50)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .internal_traffic_policy_local();
    let remote = Service::cluster_ip("remote-web", &[vip4(51), vip6(51)])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .internal_traffic_policy_local();
    let mut docs = c.service_docs(&local, &["web-0", "web-1", "web-2"], &[]);
    docs.extend(c.service_docs(&remote, &["web-2"], &[]));
    c.write("local.yaml", &docs);
    for name in ["web-0", "web-1", "web-2"] {
        c.serve(name, BACKEND_PORT, name);
    }
    c.start_agents();
    check_local_programming(&c, &local, &remote);

    // 30 requests per family; P(one of the 2 local backends never answers) = 2 x 2^-30.
    for &vip in &local.cluster_ips {
        let (tally, _) = c.requests(vip, SERVICE_PORT, Protocol::Tcp, 30, "local");
        c.step(&format!(
            "{} local-web {vip}: {}",
            family(vip),
            show(&tally)
        ));
        let got: BTreeSet<&str> = tally.keys().map(String::as_str).collect();
        assert_eq!(
            got,
            BTreeSet::from(["web-0", "web-1"]),
            "{tally:?}{}",
            c.diag()
        );
    }

    let before = c.stats(0);
    let served = c.backends.total_served();
    let mut how = Vec::new();
    for &vip in &remote.cluster_ips {
        let failures = c.failing_requests(vip, SERVICE_PORT, Protocol::Tcp, 3);
        how.push(format!("{} {failures}", family(vip)));
        // Local with no local endpoint means drop (kube-proxy too), not reject.
        assert_eq!(
            failures.timed_out,
            3,
            "{vip}: {failures}, want 3 timed out (dropped){}",
            c.diag()
        );
    }
    let after = c.stats(0);
    let dropped = delta(&after, &before, "no_local_endpoint");
    c.step(&format!(
        "remote-web (only endpoint on node2): {}; node1 no_local_endpoint +{dropped}",
        how.join("; ")
    ));
    assert_eq!(c.backends.total_served(), served, "a backend answered");
    // At least the 6 SYNs (one per attempt) were dropped and counted.
    assert!(
        dropped >= 6,
        "node1 no_local_endpoint +{dropped}, want >= 6{}",
        c.diag()
    );
    for key in ["no_endpoints", "rejected", "dnat"] {
        assert_eq!(
            delta(&after, &before, key),
            0,
            "node1 {key} moved{}",
            c.diag()
        );
    }
    c.finish();
}

#[test]
fn service_without_endpoints_fails_requests_and_counts_them() {
    let mut c = Cluster::new(&[(0, "client"), (0, "web-0"), (1, "web-1")]);
    let vip = vip4(60);
    let svc = Service::cluster_ip("web", &[vip])
        .port("tcp-echo", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .port("udp-echo", Protocol::Udp, SERVICE_PORT, BACKEND_PORT);
    let empty = c.slice_docs(&svc, &[], &[]);
    c.write("web-svc.yaml", &[svc.to_yaml()]);
    c.write(
        "web-slice.yaml",
        &c.slice_docs(&svc, &["web-0", "web-1"], &[]),
    );
    for name in ["web-0", "web-1"] {
        c.serve(name, BACKEND_PORT, name);
    }
    c.start_agents();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let (tally, _) = c.requests(vip, SERVICE_PORT, proto, 4, "before");
        c.step(&format!(
            "{} {vip}:{SERVICE_PORT} -> {}",
            proto_name(proto),
            show(&tally)
        ));
    }

    let keys =
        [Protocol::Tcp, Protocol::Udp].map(|p| frontend_key(SocketAddr::new(vip, SERVICE_PORT), p));
    c.edit(
        "slice emptied (endpoints: null)",
        |m| m.write("web-slice.yaml", &k8s::documents(&empty)),
        |p| {
            keys.iter().all(|k| {
                p.frontends
                    .get(k)
                    .is_some_and(|f| f.backends.is_empty() && f.notes.contains("no endpoints"))
            })
        },
    );
    let served = c.backends.total_served();
    let before = c.stats(0);
    let tcp = c.failing_requests(vip, SERVICE_PORT, Protocol::Tcp, 3);
    let udp = c.failing_requests(vip, SERVICE_PORT, Protocol::Udp, 3);
    let after = c.stats(0);
    let dropped = delta(&after, &before, "no_endpoints");
    let rejected = delta(&after, &before, "rejected");
    c.step(&format!(
        "no endpoints: TCP {tcp}; UDP {udp}; node1 no_endpoints +{dropped}, rejected +{rejected}"
    ));
    assert_eq!(c.backends.total_served(), served, "a backend answered");
    assert_eq!(delta(&after, &before, "dnat"), 0, "{}", c.diag());
    // Every attempt is answered at once with a reset or a port unreachable (counted
    // `rejected`), never dropped: the client sees a refusal, not a timeout.
    assert_eq!(
        dropped,
        0,
        "node1 dropped {dropped} packets to a service without endpoints{}",
        c.diag()
    );
    assert!(
        rejected >= 6,
        "node1 rejected +{rejected}, want >= 6{}",
        c.diag()
    );
    assert_eq!(
        tcp.refused + udp.refused,
        6,
        "rejected +{rejected}, yet TCP {tcp}, UDP {udp}{}",
        c.diag()
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------------
