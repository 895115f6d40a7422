//! Services over Pods, end to end in standalone mode: the directory holds a Service with a
//! `selector` and `v1` Pods (their real addresses, nodes, labels and `Ready` conditions), no
//! `EndpointSlice` at all; the agents compute the endpoints as the Kubernetes `EndpointSlice`
//! controller would (`svc-agent/src/model/pods.rs`) and follow edits of the Pods live.
//!
//! One test, in steps: TCP and UDP over IPv4 and IPv6 with named `targetPort`s resolved from
//! the Pods' container ports; a relabelled Pod leaves the Service; a Pod marked not Ready
//! takes no new connection while its established ones go on; `publishNotReadyAddresses`
//! brings it back. Needs root and a built agent (`cargo build -p svc-agent`): fails, never
//! skips, without them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Agent, Backends, Programmed, Protocol, Service, TcpSession, frontend_key},
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
/// The container ports the Pods declare (`http`/TCP and `dns`/UDP) and serve on.
const HTTP_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;
/// The Service's ports.
const SERVICE_HTTP: u16 = 80;
const SERVICE_DNS: u16 = 53;
/// New connections (and UDP sockets) per check.
const REQUESTS: usize = 30;

/// One test's cluster: servers drop first, then the agents and the topology.
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

/// A `v1` Pod as the API server shows it once it runs: labels, node, a container declaring
/// the named ports, both addresses, the `Ready` condition.
fn pod_yaml(bed: &TestBed, name: &str, app: &str, ready: bool) -> String {
    let pod = bed.pod(name);
    let node = bed.node_name(pod);
    let status = if ready { "True" } else { "False" };
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  uid: 00000000-0000-4000-8000-{uid:012}
  labels:
    app: {app}
spec:
  nodeName: {node}
  containers:
  - name: server
    image: registry.example/server:1
    ports:
    - name: http
      containerPort: {HTTP_PORT}
      protocol: TCP
    - name: dns
      containerPort: {DNS_PORT}
      protocol: UDP
status:
  phase: Running
  podIP: {v4}
  podIPs:
  - ip: {v4}
  - ip: {v6}
  conditions:
  - type: Ready
    status: \"{status}\"
",
        uid = name.bytes().map(u64::from).sum::<u64>(),
        v4 = pod.ipv4,
        v6 = pod.ipv6,
    );
    y
}

impl Cluster {
    fn pod_file(name: &str) -> String {
        format!("pod-{name}.yaml")
    }

    /// Writes (or rewrites) the Pod `name`'s file.
    fn write_pod(&self, name: &str, app: &str, ready: bool) {
        let file = Self::pod_file(name);
        self.bed
            .manifests
            .write(&file, &pod_yaml(&self.bed, name, app, ready))
            .unwrap_or_else(|e| panic!("writing {file}: {e:#}"));
    }

    fn write_service(&self, svc: &Service) {
        self.bed
            .manifests
            .write("web-svc.yaml", &svc.to_yaml())
            .unwrap_or_else(|e| panic!("writing web-svc.yaml: {e:#}"));
    }

    /// The backends `pods` give `vip`'s frontend of `port` (`inspect services` form).
    fn backend_set(&self, pods: &[&str], vip: IpAddr, port: u16) -> BTreeSet<String> {
        pods.iter()
            .map(|p| SocketAddr::new(self.pod_ip(p, vip), port).to_string())
            .collect()
    }

    /// Whether `p` programs both ports of both VIPs with exactly `pods`.
    fn programs(&self, p: &Programmed, vips: &[IpAddr], pods: &[&str]) -> bool {
        vips.iter().all(|&vip| {
            [
                (SERVICE_HTTP, Protocol::Tcp, HTTP_PORT),
                (SERVICE_DNS, Protocol::Udp, DNS_PORT),
            ]
            .iter()
            .all(|&(port, proto, target)| {
                let key = frontend_key(SocketAddr::new(vip, port), proto);
                p.backends(&key).as_ref() == Some(&self.backend_set(pods, vip, target))
            })
        })
    }

    /// Makes a change (nothing when `change` is `None`), waits until every agent synced after
    /// it and until both nodes program exactly `pods` on every frontend (bounded).
    fn settle(
        &mut self,
        what: &str,
        change: Option<&dyn Fn(&Self)>,
        vips: &[IpAddr],
        pods: &[&str],
    ) {
        let before: Vec<usize> = self.bed.agents.iter().map(Agent::syncs).collect();
        let t = Instant::now();
        if let Some(change) = change {
            change(self);
            for (agent, before) in self.bed.agents.iter_mut().zip(before) {
                agent
                    .wait_syncs(before + 1, SYNC_TIMEOUT)
                    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            }
        }
        let deadline = Instant::now() + SYNC_TIMEOUT;
        for node in 0..self.agents.len() {
            loop {
                let programmed = self.programmed(node);
                if self.programs(&programmed, vips, pods) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: node{} does not program {pods:?} within {SYNC_TIMEOUT:?}:\n{}\
                     agent log:\n{}",
                    node + 1,
                    programmed.text,
                    self.agent(node).log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.step(&format!(
            "{what}: both nodes program {} after {:.0} ms",
            pods.join(", "),
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

    /// [`REQUESTS`] requests to `vip:port` over `proto`, each a new connection or socket, all
    /// answered from the VIP; answers per Pod.
    fn requests(
        &self,
        vip: IpAddr,
        port: u16,
        proto: Protocol,
        tag: &str,
    ) -> BTreeMap<String, usize> {
        let dst = SocketAddr::new(vip, port);
        let tag = tag.to_owned();
        self.in_client(move || {
            let mut tally = BTreeMap::new();
            for i in 0..REQUESTS {
                let request = format!("{tag}-{i}");
                let answer = match proto {
                    Protocol::Udp => k8s::udp_request(dst, &request, UDP_WAIT, UDP_ATTEMPTS)?.0,
                    _ => k8s::tcp_request(dst, &request, IO_TIMEOUT)?,
                };
                anyhow::ensure!(
                    answer.from == dst,
                    "{request}: answered from {}, not from {dst}",
                    answer.from
                );
                *tally.entry(answer.label).or_default() += 1;
            }
            Ok(tally)
        })
    }

    /// Requests over TCP and UDP to every VIP; asserts exactly `pods` answered (each of
    /// [`REQUESTS`] new flows chooses among at most 3 Pods: one is missed with probability
    /// below 3 x (2/3)^30 = 1.6e-5).
    fn check_answered_by(&self, vips: &[IpAddr], pods: &[&str], tag: &str) {
        for &vip in vips {
            for (port, proto) in [(SERVICE_HTTP, Protocol::Tcp), (SERVICE_DNS, Protocol::Udp)] {
                let tally = self.requests(vip, port, proto, tag);
                let answered: BTreeSet<&str> = tally.keys().map(String::as_str).collect();
                let want: BTreeSet<&str> = pods.iter().copied().collect();
                self.step(&format!(
                    "{tag}: {} {} {}: {REQUESTS} new flows answered by {tally:?}",
                    family(vip),
                    proto.as_k8s(),
                    SocketAddr::new(vip, port)
                ));
                assert_eq!(answered, want, "{tag}: {tally:?}{}", self.diag());
            }
        }
    }
}

/// Opens TCP connections to `dst` until `n` landed on `on` (closing the others; at most 40
/// tries: with 2 Pods each lands there with probability 1/2, P(fewer than 3 in 40) < 1e-9).
fn sessions_on(c: &Cluster, dst: SocketAddr, on: &'static str, n: usize) -> Vec<TcpSession> {
    c.in_client(move || {
        let mut kept = Vec::new();
        for i in 0..40 {
            if kept.len() == n {
                break;
            }
            let mut s = TcpSession::connect(dst, IO_TIMEOUT)?;
            if s.ask(&format!("hello-{i}"))?.label == on {
                kept.push(s);
            }
        }
        anyhow::ensure!(
            kept.len() == n,
            "only {} of 40 connections landed on {on}",
            kept.len()
        );
        Ok(kept)
    })
}

#[test]
fn pods_alone_serve_a_selector_service_and_follow_labels_and_readiness() {
    let mut c = Cluster {
        backends: Backends::new(),
        bed: TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (0, "web-2")]),
    };
    let vips = [vip4(60), vip6(60)];
    let svc = Service::cluster_ip("web", &vips)
        .port("http", Protocol::Tcp, SERVICE_HTTP, "http")
        .port("dns", Protocol::Udp, SERVICE_DNS, "dns")
        .select("app", "web");
    c.write_service(&svc);
    for name in ["web-0", "web-1", "web-2"] {
        c.write_pod(name, "web", true);
        let pod = c.pod(name);
        for ip in [IpAddr::from(pod.ipv4), pod.ipv6.into()] {
            for port in [HTTP_PORT, DNS_PORT] {
                c.backends
                    .serve(&pod.ns, name, SocketAddr::new(ip, port))
                    .unwrap_or_else(|e| panic!("serving {name} on {ip}:{port}: {e:#}"));
            }
        }
    }
    // The client is a Pod too, labelled for another Service: never selected.
    c.write_pod("client", "client", true);
    c.bed.start_agents();

    let all = ["web-0", "web-1", "web-2"];
    c.settle("Pods only, no EndpointSlice", None, &vips, &all);
    // `inspect services` names the Pod behind each backend (BACKEND_NAMES_V1, pinned).
    for node in 0..2 {
        let programmed = c.programmed(node);
        let text = &programmed.text;
        for &vip in &vips {
            for pod in all {
                let addr = SocketAddr::new(c.pod_ip(pod, vip), HTTP_PORT);
                assert!(
                    programmed.pod_of(&addr.to_string()) == Some(format!("default/{pod}").as_str()),
                    "node{}: inspect services does not name {pod} behind {addr}:\n{text}",
                    node + 1
                );
            }
        }
    }
    c.step("inspect services names the Pod behind every backend on both nodes");
    c.check_answered_by(&vips, &all, "selected");

    c.settle(
        "web-2 relabelled app: web -> canary",
        Some(&|c: &Cluster| c.write_pod("web-2", "canary", true)),
        &vips,
        &["web-0", "web-1"],
    );
    c.check_answered_by(&vips, &["web-0", "web-1"], "relabelled");

    let dst = SocketAddr::new(vips[0], SERVICE_HTTP);
    let mut sessions = sessions_on(&c, dst, "web-1", 3);
    c.step(&format!("3 connections open to {dst} on web-1"));
    c.settle(
        "web-1 marked not Ready",
        Some(&|c: &Cluster| c.write_pod("web-1", "web", false)),
        &vips,
        &["web-0"],
    );
    for (i, s) in sessions.iter_mut().enumerate() {
        let answer = s.ask(&format!("after-not-ready-{i}")).unwrap_or_else(|e| {
            panic!("connection {i} to web-1 after not Ready: {e:#}{}", c.diag())
        });
        assert_eq!(answer.label, "web-1", "connection {i} moved");
    }
    c.step("the 3 established connections to web-1 are still answered by web-1");
    c.check_answered_by(&vips, &["web-0"], "not-ready");
    drop(sessions);

    c.settle(
        "publishNotReadyAddresses: true",
        Some(&|c: &Cluster| c.write_service(&svc.clone().publish_not_ready_addresses())),
        &vips,
        &["web-0", "web-1"],
    );
    c.check_answered_by(&vips, &["web-0", "web-1"], "published");

    // The names come from pinned state: `inspect` shows them with node2's agent stopped.
    let Cluster { backends, mut bed } = c;
    let agent = bed.agents.pop().expect("node2's agent");
    let bpffs = agent.bpffs().to_owned();
    let (status, log) = agent.stop_with_log().expect("stopping node2's agent");
    assert!(
        status.success(),
        "node2's agent ended with {status}:\n{log}"
    );
    assert!(
        !log.contains(" WARN ") && !log.contains(" ERROR "),
        "node2's agent warned:\n{log}"
    );
    let json = ["inspect", "services", "-o", "json"];
    let text = k8s::agent_command(&bed.agent_bin, &bpffs, &json)
        .unwrap_or_else(|e| panic!("inspect with the agent stopped: {e:#}"));
    let programmed = k8s::Programmed::parse(&text);
    for pod in ["web-0", "web-1"] {
        let addr = SocketAddr::new(bed.pod_ip(pod, vips[0]), HTTP_PORT);
        assert!(
            programmed.pod_of(&addr.to_string()) == Some(format!("default/{pod}").as_str()),
            "node2, agent stopped: inspect services does not name {pod} behind {addr}:\n{text}"
        );
    }
    bed.step("node2's agent stopped: inspect services still names the Pods (pinned)");
    drop(backends);
    bed.finish();
}
