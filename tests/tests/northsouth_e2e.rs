//! North-south end to end: clients outside the cluster (the external namespace on the
//! underlay, as a load balancer or a user would be) reach Services through `NodePort`s,
//! external IPs and load-balancer IPs, on the node-facing programs of each node's `eth0`.
//!
//! - `NodePort` via every node address (IPv4 and IPv6, TCP and UDP) reaches the endpoint on the
//!   node itself with the client's address kept, and the endpoint on the other node through
//!   SNAT (the endpoint sees the node's address; the reply comes back through the node, which
//!   puts the client back): without SNAT that reply would go from the other node straight to
//!   the client with the pod's address and be lost.
//! - `externalTrafficPolicy: Local`: only this node's endpoint, the client's address seen by
//!   the endpoint; a node without a local endpoint drops (counted `no_local_endpoint`) instead.
//! - An external IP and a load-balancer IP routed to a node are served like the `NodePort`;
//!   pods reach them too (any endpoint).
//! - Established external connections (SNAT'd and not) survive an agent SIGKILL and restart.
//! - Addresses added to a node's uplink (not in its Node object) serve node ports on that node
//!   only, until they are removed.
//!
//! Needs root and the agent binary (`cargo build -p svc-agent`): fails, never skips, without
//! them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike (external clients are never
//! translated at the socket).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{
        self, Agent, Answer, Backends, Endpoint, EndpointSlice, Protocol, Service, TcpSession,
        UdpSession,
    },
    netns::{ETH0, Netns},
    testbed::{TestBed, vip4, vip6},
};

const NODE_PORT: u16 = 30080;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Bound on every connect, read and write expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a request expected to go unanswered (dropped).
const FAIL_TIMEOUT: Duration = Duration::from_millis(400);
/// How long the agents may take to program a change.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections per node address: enough that a uniform choice between two endpoints
/// reaches both (a miss has probability 2^-23).
const CONNECTIONS: usize = 24;
/// An external IP and a load-balancer IP, routed by the external client to node1 (outside the
/// underlay and the pod CIDRs).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 1);
/// Addresses added to node1's uplink (not in its Node object) by the interface-address case.
const EXTRA_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 202, 1);
const EXTRA_NODE_IP6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x202, 0, 0, 0, 0, 1);
/// Flows the ECMP case sends through each node.
const FLOWS: u16 = 12;

/// One test's cluster; fields drop in order: servers, then agents and topology.
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

impl Cluster {
    /// web-0 on node1 and web-1 on node2 serving TCP and UDP on both families, a client pod
    /// on node1, `service` with those endpoints written, the agents started and the
    /// Service's external frontend programmed on both nodes.
    fn start(service: &Service, endpoints: &[&str]) -> Self {
        Self::start_on(service, endpoints, false)
    }

    /// [`start`](Self::start), on an underlay made a wire (`wire`) whatever the run's XDP mode:
    /// for tests that turn XDP on themselves.
    fn start_on(service: &Service, endpoints: &[&str], wire: bool) -> Self {
        let pods = [(0, "web-0"), (1, "web-1"), (0, "client")];
        let mut bed = if wire {
            TestBed::new_on_a_wire(&pods)
        } else {
            TestBed::new(&pods)
        };
        let backends = Backends::new();
        for name in ["web-0", "web-1"] {
            let pod = bed.pod(name);
            for ip in [IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)] {
                backends
                    .serve(&pod.ns, name, SocketAddr::new(ip, BACKEND_PORT))
                    .unwrap_or_else(|e| panic!("serving on {name}: {e:#}"));
            }
        }
        write_service(&bed, service, endpoints);
        bed.start_agents();
        let cluster = Self { backends, bed };
        for node in 0..2 {
            let key = format!("{}:{NODE_PORT} TCP external", cluster.node_ip(node, false));
            cluster.wait_programmed(node, &key);
        }
        cluster
    }

    /// Waits until node `node` programmed frontend `key` with exactly `pods`' IPv4 addresses
    /// as its backends (on [`BACKEND_PORT`]).
    fn wait_backends(&self, node: usize, key: &str, pods: &[&str]) {
        let want: BTreeSet<String> = pods
            .iter()
            .map(|p| format!("{}:{BACKEND_PORT}", self.pod(p).ipv4))
            .collect();
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while self.programmed(node).backends(key).unwrap_or_default() != want {
            assert!(
                Instant::now() < deadline,
                "node{} did not program {key} with {want:?} within {SYNC_TIMEOUT:?}:{}",
                node + 1,
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `node`'s underlay address of a family.
    fn node_ip(&self, node: usize, ipv6: bool) -> IpAddr {
        let n = self.topo.node(node);
        if ipv6 {
            n.underlay_v6.into()
        } else {
            n.underlay_v4.into()
        }
    }

    /// The external client's address of a family.
    fn external_ip(&self, ipv6: bool) -> IpAddr {
        let e = self.topo.external();
        if ipv6 { e.ipv6.into() } else { e.ipv4.into() }
    }

    fn external_ns(&self) -> &Netns {
        &self.topo.external().ns
    }

    /// With `--xdp generic|native` (`SVC_TEST_XDP`): node1's uplink has the XDP program on a
    /// pinned XDP link of that mode, and it decided frames itself (counted `xdp`, in node1's
    /// `stats`); with XDP off, it is nowhere and decided nothing.
    fn expect_xdp_as_configured(&self, stats: &BTreeMap<String, u64>) {
        let mode = svc_tests::netns::xdp_mode();
        self.expect_xdp_link(mode);
        let decided = stats.get("xdp").copied().unwrap_or_default();
        if mode == "off" {
            assert_eq!(decided, 0, "XDP off, yet frames counted xdp{}", self.diag());
        } else {
            assert!(
                decided > 0,
                "--xdp {mode}: node1's XDP program decided no frame{}",
                self.diag()
            );
            self.step(&format!(
                "--xdp {mode}: XDP decided {decided} frames on node1"
            ));
        }
    }

    /// node1's pinned XDP links are what `--xdp mode` asks for: none for `off`, else one,
    /// pinned as `xdp-<mode>`, running `svc_xdp_from_world`.
    fn expect_xdp_link(&self, mode: &str) {
        let links = k8s::agent_command(
            &self.agent_bin,
            self.agent(0).bpffs(),
            &["inspect", "links", "-o", "json"],
        )
        .expect("inspect links");
        let links: Vec<svc_agent::inspect::PinnedLinkView> = serde_json::from_str(&links)
            .unwrap_or_else(|e| panic!("inspect links -o json: {e}\n{links}"));
        let xdp: Vec<_> = links.iter().filter(|l| l.link_type == "xdp").collect();
        if mode == "off" {
            assert!(xdp.is_empty(), "XDP links with --xdp off: {xdp:?}");
        } else {
            assert!(
                xdp.len() == 1
                    && xdp[0].pin.ends_with(format!("xdp-{mode}"))
                    && xdp[0].program.starts_with("svc_xdp_from_w"),
                "node1 should have one XDP link, pinned as xdp-{mode}: {links:?}"
            );
        }
    }

    /// Waits until node `node` programmed frontend `key` (`inspect services` key form).
    fn wait_programmed(&self, node: usize, key: &str) {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while self.programmed(node).backends(key).is_none() {
            assert!(
                Instant::now() < deadline,
                "node{} did not program {key} within {SYNC_TIMEOUT:?}:{}",
                node + 1,
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CONNECTIONS` new TCP connections from the external client to `dst`, one request each:
    /// who answered, how often, and what they saw as the client.
    fn tcp_from_outside(&self, dst: SocketAddr) -> BTreeMap<String, BTreeSet<IpAddr>> {
        let answers: Vec<Answer> = (0..CONNECTIONS)
            .map(|i| {
                let request = format!("ext-{i}");
                let answer = self
                    .external_ns()
                    .run(|| k8s::tcp_request(dst, &request, IO_TIMEOUT))
                    .unwrap_or_else(|e| panic!("TCP to {dst} from outside: {e:#}{}", self.diag()));
                assert_eq!(answer.from, dst, "the answer names the address asked");
                answer
            })
            .collect();
        seen_by(&answers)
    }

    /// As [`tcp_from_outside`](Self::tcp_from_outside) over UDP (each request a new flow).
    fn udp_from_outside(&self, dst: SocketAddr) -> BTreeMap<String, BTreeSet<IpAddr>> {
        let answers: Vec<Answer> = (0..CONNECTIONS)
            .map(|i| {
                let request = format!("ext-udp-{i}");
                let session = self
                    .external_ns()
                    .run(|| UdpSession::open(dst, Duration::from_millis(700)))
                    .expect("opening a UDP socket outside");
                let (answer, _) = session
                    .ask(&request, 3)
                    .unwrap_or_else(|e| panic!("UDP to {dst} from outside: {e:#}{}", self.diag()));
                assert_eq!(answer.from, dst, "the answer names the address asked");
                answer
            })
            .collect();
        seen_by(&answers)
    }

    /// The answers of node `node`'s endpoint and the other's, for `answers` through node
    /// `node`: the local one sees the external client, the remote one the node's address
    /// (SNAT).
    fn expect_local_and_snat(
        &self,
        node: usize,
        ipv6: bool,
        answers: &BTreeMap<String, BTreeSet<IpAddr>>,
    ) {
        let (local, remote) = if node == 0 {
            ("web-0", "web-1")
        } else {
            ("web-1", "web-0")
        };
        let want = BTreeMap::from([
            (local.to_owned(), BTreeSet::from([self.external_ip(ipv6)])),
            (
                remote.to_owned(),
                BTreeSet::from([self.node_ip(node, ipv6)]),
            ),
        ]);
        assert_eq!(
            answers,
            &want,
            "through node{}: the local endpoint sees the client, the remote one the node{}",
            node + 1,
            self.diag()
        );
    }
}

/// Who answered and the client addresses each saw.
fn seen_by(answers: &[Answer]) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for a in answers {
        out.entry(a.label.clone())
            .or_default()
            .insert(a.client_seen);
    }
    out
}

/// The web Service: dual-stack, TCP and UDP on port 80 (node port 30080 for both).
fn web() -> Service {
    Service::cluster_ip("web", &[vip4(150), vip6(150)])
        .port("http", Protocol::Tcp, SERVICE_PORT, BACKEND_PORT)
        .node_port(NODE_PORT)
        .port("dns", Protocol::Udp, SERVICE_PORT, BACKEND_PORT)
        .node_port(NODE_PORT)
}

#[test]
fn node_ports_reach_local_endpoints_directly_and_remote_ones_through_snat() {
    let c = Cluster::start(&web(), &["web-0", "web-1"]);
    for ipv6 in [false, true] {
        for node in 0..2 {
            let dst = SocketAddr::new(c.node_ip(node, ipv6), NODE_PORT);
            let tcp = c.tcp_from_outside(dst);
            c.expect_local_and_snat(node, ipv6, &tcp);
            let udp = c.udp_from_outside(dst);
            c.expect_local_and_snat(node, ipv6, &udp);
            c.step(&format!(
                "{dst}: TCP and UDP from outside reach both endpoints, SNAT to the remote one"
            ));
        }
    }
    let stats = c.stats(0);
    for counter in ["ext_dnat", "snat", "rev_snat"] {
        assert!(
            stats.get(counter).copied().unwrap_or_default() > 0,
            "node1 counted no {counter}:{}",
            c.diag()
        );
    }
    c.expect_xdp_as_configured(&stats);
    // `inspect nat` shows the SNAT'd flows: from the external client, as node1, to web-1.
    let nat = k8s::agent_command(
        &c.agent_bin,
        c.agent(0).bpffs(),
        &["inspect", "nat", "-o", "json"],
    )
    .expect("inspect nat");
    let rows: Vec<svc_agent::inspect::nat::NatRow> =
        serde_json::from_str(&nat).unwrap_or_else(|e| panic!("inspect nat -o json: {e}\n{nat}"));
    let web1 = c.pod("web-1");
    assert!(
        rows.iter().any(|r| r.client_address == c.external_ip(false)
            && r.translated
                .starts_with(&format!("{}:", c.node_ip(0, false)))
            && r.endpoint == format!("{}:{BACKEND_PORT}", web1.ipv4)),
        "inspect nat on node1 does not show the SNAT'd flows to web-1:\n{nat}"
    );
    // A pod reaches the NodePort too (any endpoint, its own address kept).
    let client = c.pod("client");
    let dst = SocketAddr::new(c.node_ip(1, false), NODE_PORT);
    let answers: BTreeSet<String> = (0..CONNECTIONS)
        .map(|i| {
            client
                .ns
                .run(|| k8s::tcp_request(dst, &format!("pod-{i}"), IO_TIMEOUT))
                .unwrap_or_else(|e| panic!("from the client pod to {dst}: {e:#}{}", c.diag()))
                .label
        })
        .collect();
    assert_eq!(answers, BTreeSet::from(["web-0".into(), "web-1".into()]));
    c.step("a pod reaches node2's NodePort: both endpoints");
    drop(c.backends);
    c.bed.finish();
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_a_local_endpoint() {
    let service = web().external_traffic_policy_local();
    // Only web-0 (node1) is an endpoint.
    let c = Cluster::start(&service, &["web-0"]);
    for ipv6 in [false, true] {
        let dst = SocketAddr::new(c.node_ip(0, ipv6), NODE_PORT);
        let answers = c.tcp_from_outside(dst);
        assert_eq!(
            answers,
            BTreeMap::from([("web-0".to_owned(), BTreeSet::from([c.external_ip(ipv6)]))]),
            "node1 serves from its own endpoint, the client's address kept{}",
            c.diag()
        );
        // node2 has no local endpoint: external traffic is dropped, not rejected.
        let dst = SocketAddr::new(c.node_ip(1, ipv6), NODE_PORT);
        let before = c
            .stats(1)
            .get("no_local_endpoint")
            .copied()
            .unwrap_or_default();
        let result = c
            .external_ns()
            .run(|| k8s::tcp_request(dst, "nothing-local", FAIL_TIMEOUT));
        assert!(result.is_err(), "node2 answered without a local endpoint");
        let after = c
            .stats(1)
            .get("no_local_endpoint")
            .copied()
            .unwrap_or_default();
        assert!(after > before, "node2 did not count the drop{}", c.diag());
        c.step(&format!(
            "eTP Local over {}: node1 keeps the client address, node2 drops",
            if ipv6 { "IPv6" } else { "IPv4" }
        ));
    }
    // A pod reaching its own node's NodePort is not "external": it is served (here by the
    // only endpoint) at the socket or on its veth, never dropped by the Local policy. (A pod
    // reaching another node's NodePort arrives there as outside traffic: see DESIGN.md.)
    let client = c.pod("client");
    let dst = SocketAddr::new(c.node_ip(0, false), NODE_PORT);
    let answer = client
        .ns
        .run(|| k8s::tcp_request(dst, "from-a-pod", IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("from the client pod to {dst}: {e:#}{}", c.diag()));
    assert_eq!(answer.label, "web-0");
    drop(c.backends);
    c.bed.finish();
}

#[test]
fn external_and_load_balancer_ips_routed_to_a_node_are_served() {
    let service = web()
        .external_ips(&[EXTERNAL_IP.into()])
        .load_balancer(&[LB_IP.into()]);
    let c = Cluster::start(&service, &["web-0", "web-1"]);
    let via = c.topo.node(0).underlay_v4;
    for ip in [EXTERNAL_IP, LB_IP] {
        c.external_ns()
            .ip(["route", "add", &format!("{ip}/32"), "via", &via.to_string()])
            .expect("routing the address to node1");
        let key = format!("{ip}:{SERVICE_PORT} TCP external");
        c.wait_programmed(0, &key);
        let dst = SocketAddr::new(ip.into(), SERVICE_PORT);
        let tcp = c.tcp_from_outside(dst);
        c.expect_local_and_snat(0, false, &tcp);
        // A pod reaches it as well (scope internal, any endpoint).
        let client = c.pod("client");
        let answer = client
            .ns
            .run(|| k8s::tcp_request(dst, "pod-to-lb", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("from the client pod to {dst}: {e:#}{}", c.diag()));
        assert!(answer.label.starts_with("web-"));
        c.step(&format!(
            "{dst} from outside (through node1) and from a pod"
        ));
    }
    drop(c.backends);
    c.bed.finish();
}

#[test]
fn node_ports_follow_the_addresses_of_the_node_facing_interfaces() {
    let c = Cluster::start(&web(), &["web-0", "web-1"]);
    let node1 = c.topo.node(0);
    let via = |ipv6: bool| c.node_ip(0, ipv6).to_string();
    // Addresses the Node object does not list, added to node1's uplink as an operator (or a
    // keepalived VIP) would, and routed to node1 by the external client.
    let extra = [
        (IpAddr::from(EXTRA_NODE_IP), false),
        (IpAddr::from(EXTRA_NODE_IP6), true),
    ];
    for &(ip, ipv6) in &extra {
        let prefix = if ipv6 { 128 } else { 32 };
        let mut add = vec!["addr".to_owned(), "add".to_owned()];
        add.extend([format!("{ip}/{prefix}"), "dev".into(), ETH0.into()]);
        if ipv6 {
            add.push("nodad".into());
        }
        node1
            .ns
            .ip(&add)
            .expect("adding an address to node1's uplink");
        let route = format!("{ip}/{prefix}");
        let family = if ipv6 { "-6" } else { "-4" };
        c.external_ns()
            .ip([family, "route", "add", &route, "via", &via(ipv6)])
            .expect("routing the address to node1");
    }
    for &(ip, ipv6) in &extra {
        let dst = SocketAddr::new(ip, NODE_PORT);
        c.wait_programmed(0, &format!("{dst} TCP external"));
        let tcp = c.tcp_from_outside(dst);
        c.expect_local_and_snat(0, ipv6, &tcp);
        assert!(
            c.programmed(1)
                .backends(&format!("{dst} TCP external"))
                .is_none(),
            "node2 does not have {ip}, yet serves a node port on it{}",
            c.diag()
        );
        c.step(&format!(
            "{dst}: an address of node1's uplink only, served as a node port (node2 does not)"
        ));
    }
    for &(ip, ipv6) in &extra {
        let prefix = if ipv6 { 128 } else { 32 };
        node1
            .ns
            .ip(["addr", "del", &format!("{ip}/{prefix}"), "dev", ETH0])
            .expect("removing the address");
        let key = format!("{} TCP external", SocketAddr::new(ip, NODE_PORT));
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while c.programmed(0).backends(&key).is_some() {
            assert!(
                Instant::now() < deadline,
                "node1 still serves {key} {SYNC_TIMEOUT:?} after the address went{}",
                c.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The Node object's addresses were never affected.
    let dst = SocketAddr::new(c.node_ip(0, false), NODE_PORT);
    c.expect_local_and_snat(0, false, &c.tcp_from_outside(dst));
    c.step("the addresses removed: their node ports go, the Node's address still serves");
    drop(c.backends);
    c.bed.finish();
}

#[test]
fn established_external_connections_survive_an_agent_sigkill_and_restart() {
    let mut c = Cluster::start(&web(), &["web-0", "web-1"]);
    let mut sessions = sessions_to_both_endpoints(&c);
    let node = c.topo.node(0).clone();
    let agent: Agent = c.bed.agents.remove(0);
    agent.kill().expect("killing node1's agent");
    c.step("node1's agent killed (SIGKILL)");
    for (label, s) in &mut sessions {
        let answer = s
            .ask("while-down")
            .unwrap_or_else(|e| panic!("{label} while the agent is down: {e:#}"));
        assert_eq!(&answer.label, label);
    }
    let restarted = Agent::start(&c.bed.agent_bin, &node, c.bed.manifests.path())
        .expect("restarting node1's agent");
    c.bed.agents.insert(0, restarted);
    c.step("node1's agent restarted");
    for (label, s) in &mut sessions {
        for i in 0..3 {
            let answer = s
                .ask(&format!("after-{i}"))
                .unwrap_or_else(|e| panic!("{label} after the restart: {e:#}{}", c.diag()));
            assert_eq!(&answer.label, label, "the connection kept its endpoint");
        }
    }
    c.step("both external connections (local and SNAT'd) kept working");
    drop(sessions);
    drop(c.backends);
    c.bed.finish();
}

/// Writes `service` with `endpoints` (ready, both families) to the agents' directory.
fn write_service(bed: &TestBed, service: &Service, endpoints: &[&str]) {
    let mut docs = vec![service.to_yaml()];
    for ipv6 in [false, true] {
        let mut slice = EndpointSlice::new(&service.name, ipv6).ports_of(service, &[]);
        for name in endpoints {
            slice = slice.endpoint(Endpoint::ready(&bed.topo, bed.pod(name), ipv6));
        }
        docs.push(slice.to_yaml());
    }
    bed.manifests
        .write("web.yaml", &k8s::documents(&docs))
        .expect("writing the Service");
}

#[test]
fn udp_to_a_node_port_follows_its_endpoints_as_they_cycle() {
    let c = Cluster::start(&web(), &["web-0", "web-1"]);
    let dst = SocketAddr::new(c.node_ip(0, false), NODE_PORT);
    let key = format!("{dst} UDP external");
    // One socket for the whole test: a client that keeps its source port, as a DNS or game
    // client does, through node1 (web-0 local, web-1 through SNAT).
    let session = c
        .external_ns()
        .run(|| UdpSession::open(dst, Duration::from_millis(700)))
        .expect("opening a UDP socket outside");
    let ask = |what: &str| -> String {
        session
            .ask(what, 3)
            .unwrap_or_else(|e| panic!("UDP {what} to {dst} from outside: {e:#}{}", c.diag()))
            .0
            .label
    };
    let first = ask("start");
    let other = if first == "web-0" { "web-1" } else { "web-0" };
    for (gone, stays) in [(first.as_str(), other), (other, first.as_str())] {
        // The endpoint the flow goes to leaves: its next datagram goes to the one that stays.
        write_service(&c.bed, &web(), &[stays]);
        c.wait_backends(0, &key, &[stays]);
        for i in 0..3 {
            assert_eq!(ask(&format!("without-{gone}-{i}")), stays);
        }
        // It comes back: the flow stays where it is now.
        write_service(&c.bed, &web(), &["web-0", "web-1"]);
        c.wait_backends(0, &key, &["web-0", "web-1"]);
        assert_eq!(ask(&format!("{gone}-back")), stays);
        c.step(&format!(
            "{gone} left and came back: the datagrams went to {stays}"
        ));
    }
    // No endpoint at all: rejected (port unreachable), nothing answers.
    write_service(&c.bed, &web(), &[]);
    c.wait_backends(0, &key, &[]);
    assert!(
        session.ask("none", 1).is_err(),
        "a datagram to {dst} without endpoints was answered"
    );
    // One comes back: the same socket is answered again.
    write_service(&c.bed, &web(), &["web-1"]);
    c.wait_backends(0, &key, &["web-1"]);
    assert_eq!(ask("again"), "web-1");
    c.step("no endpoints: unanswered; web-1 back: answered, through SNAT, on the same socket");
    drop(session);
    drop(c.backends);
    c.bed.finish();
}

/// Connections from outside until one lands on each endpoint (local and SNAT'd), by endpoint.
fn sessions_to_both_endpoints(c: &Cluster) -> BTreeMap<String, TcpSession> {
    let dst = SocketAddr::new(c.node_ip(0, false), NODE_PORT);
    let mut sessions: BTreeMap<String, TcpSession> = BTreeMap::new();
    for i in 0..64 {
        let mut s = c
            .external_ns()
            .run(|| TcpSession::connect(dst, IO_TIMEOUT))
            .expect("connecting from outside");
        let answer = s.ask(&format!("open-{i}")).expect("first request");
        sessions.entry(answer.label).or_insert(s);
        if sessions.len() == 2 {
            return sessions;
        }
    }
    panic!("64 connections did not reach both endpoints");
}

#[test]
fn xdp_mode_changes_across_restarts_keep_established_external_connections() {
    let mut c = Cluster::start_on(&web(), &["web-0", "web-1"], true);
    let mut sessions = sessions_to_both_endpoints(&c);
    let node = c.topo.node(0).clone();
    // Each restart takes over the earlier agent's links: XDP on, off, in the other mode.
    for mode in ["generic", "off", "native", "generic"] {
        let agent: Agent = c.bed.agents.remove(0);
        agent.kill().expect("killing node1's agent");
        let env = format!("SVC_XDP={mode}");
        let launcher = [std::ffi::OsStr::new("env"), std::ffi::OsStr::new(&env)];
        let restarted =
            Agent::start_under(&launcher, &c.bed.agent_bin, &node, c.bed.manifests.path())
                .expect("restarting node1's agent");
        c.bed.agents.insert(0, restarted);
        c.expect_xdp_link(mode);
        for (label, s) in &mut sessions {
            let answer = s.ask(&format!("xdp-{mode}")).unwrap_or_else(|e| {
                panic!(
                    "{label} after a restart with --xdp {mode}: {e:#}{}",
                    c.diag()
                )
            });
            assert_eq!(&answer.label, label, "the connection kept its endpoint");
        }
        // New connections too, through both endpoints.
        let fresh = sessions_to_both_endpoints(&c);
        assert_eq!(fresh.len(), 2);
        c.step(&format!(
            "node1's agent restarted with --xdp {mode}: its links as asked, both connections and new ones served"
        ));
    }
    drop(sessions);
    drop(c.backends);
    c.bed.finish();
}

#[test]
fn two_nodes_behind_an_ecmp_router_pick_the_same_endpoint_for_the_same_flow() {
    let service = web().load_balancer(&[LB_IP.into()]);
    // Two endpoints: agreeing by chance on every flow would be (1/2)^FLOWS.
    let c = Cluster::start(&service, &["web-0", "web-1"]);
    let dst = SocketAddr::new(LB_IP.into(), SERVICE_PORT);
    for node in 0..2 {
        c.wait_programmed(node, &format!("{dst} UDP external"));
    }
    // The same flows (client address and port, LB IP and port) through node1, then through
    // node2, as an ECMP router would send them after a change of its next hops.
    let mut picks: [BTreeMap<u16, String>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (node, pick) in picks.iter_mut().enumerate() {
        let via = c.topo.node(node).underlay_v4.to_string();
        c.external_ns()
            .ip(["route", "replace", &format!("{LB_IP}/32"), "via", &via])
            .expect("routing the LB IP");
        for port in 0..FLOWS {
            let local_port = 40_000 + port;
            let (answer, _) = c
                .external_ns()
                .run(|| {
                    k8s::udp_request_from(local_port, dst, "ecmp", Duration::from_millis(700), 3)
                })
                .unwrap_or_else(|e| {
                    panic!(
                        "UDP from :{local_port} via node{}: {e:#}{}",
                        node + 1,
                        c.diag()
                    )
                });
            pick.insert(local_port, answer.label);
        }
    }
    assert_eq!(
        picks[0],
        picks[1],
        "the same flows picked different endpoints on the two nodes{}",
        c.diag()
    );
    let used: BTreeSet<&String> = picks[0].values().collect();
    assert_eq!(
        used.len(),
        2,
        "{FLOWS} flows all went to one endpoint: {:?}",
        picks[0]
    );
    c.step("12 flows, through node1 and then node2: the same endpoint for each (Maglev)");
    drop(c.backends);
    c.bed.finish();
}
